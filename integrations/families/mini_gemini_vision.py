"""Mini-Gemini's dual-encoder vision path with patch info mining, and the Dense Connector in it.

Mini-Gemini's path as docs/mini-gemini.md (The vision path) states it, re-derived:

* the high-resolution (HR) image goes through a ConvNeXt (timm, or open_clip's timm trunk): stem
  and four stages; stages 2-4 are bilinearly upsampled to stage 1's size and all four are
  concatenated along channels (``[B, sum(stage widths), H/4, W/4]``; 192 + 384 + 768 + 1536 = 2880
  channels for ConvNeXt-L, derived from the stages by :func:`hr_map_width`);
* the low-resolution (LR) image is a bilinear downsample of the same normalised HR tensor and goes
  through the CLIP tower, ``hidden_states[-2]`` without CLS;
* patch info mining: ``q = Linear(LN(lr))``, ``k, v = Linear(LN(hr))``; every LR token ``(i, j)``
  attends only to its own ``r x r`` window of HR cells (``r`` = HR map size / LR grid), one head,
  scaled by ``sqrt(width)``, softmax over the window; the result is added to the LR features;
* then the projector.

HD mode (``image_grid=2``, ``image_global=True``): the LR image is made at twice the CLIP size
and split into 2x2 crops, plus a global view (that LR image downsampled to the CLIP size); the HR
map is split the same way for the crops and bilinearly downsampled for the global view, so every
view is mined against its own HR window map. Views are ordered ``[global, 00, 01, 10, 11]``: 5 x 576
= 2880 tokens for CLIP-L/336 at HR 1536.

With a Dense Connector the fusion either follows mining (``placement="after"``, default: the mined
final layer leads the fused channels, mining keeps CLIP's width) or precedes it (``"before"``: the
fused features are the queries, mining works at the fused width). In HD mode it runs per view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from mmconnect import DenseConnector, LayerFeatures, MultiLayerFeatureTap
from mmconnect.validation import check_bool, check_choice, check_positive_int

Placement = Literal["after", "before"]


class PatchInfoMining(nn.Module):
    """Window-local cross-attention from LR tokens to HR cells, added to the LR tokens.

    Args:
        lr_dim: width of the LR tokens (the queries and the output).
        hr_dim: channel width of the HR map (keys and values are projected to ``lr_dim``).
    """

    def __init__(self, lr_dim: int, hr_dim: int) -> None:
        super().__init__()
        self.lr_dim, self.hr_dim = lr_dim, hr_dim
        self.query = nn.Sequential(nn.LayerNorm(lr_dim), nn.Linear(lr_dim, lr_dim))
        self.key = nn.Sequential(nn.LayerNorm(hr_dim), nn.Linear(hr_dim, lr_dim))
        self.value = nn.Sequential(nn.LayerNorm(hr_dim), nn.Linear(hr_dim, lr_dim))

    def forward(self, lr_tokens: Tensor, hr_map: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, lr_dim]`` and ``[B, hr_dim, H, W]`` -> ``[B, h*w, lr_dim]``.

        Raises:
            ValueError: widths differ from the module's, the tokens do not form ``grid``, or the
                HR size is not a multiple of the LR grid.
        """
        height, width = grid
        if (
            lr_tokens.dim() != 3
            or lr_tokens.shape[1] != height * width
            or lr_tokens.shape[-1] != self.lr_dim
        ):
            raise ValueError(
                f"lr_tokens must be [batch, {height}*{width}, {self.lr_dim}], got {tuple(lr_tokens.shape)}"
            )
        if hr_map.dim() != 4 or hr_map.shape[1] != self.hr_dim:
            raise ValueError(
                f"the HR features have {hr_map.shape[1] if hr_map.dim() == 4 else 'no'} channels but the "
                f"mining projections expect hr_dim={self.hr_dim} ([batch, {self.hr_dim}, H, W]), got "
                f"{tuple(hr_map.shape)}"
            )
        hr_height, hr_width = hr_map.shape[-2:]
        if hr_height % height or hr_width % width:
            raise ValueError(
                f"the HR map {hr_height}x{hr_width} is not a multiple of the LR grid {height}x{width}: "
                "every LR token needs a whole window of HR cells"
            )
        windows = rearrange(
            hr_map, "b c (h rh) (w rw) -> b (h w) (rh rw) c", h=height, w=width
        )  # [B, N, r*r, C_hr]: the HR cells under each LR token
        query = self.query(lr_tokens)
        key, value = self.key(windows), self.value(windows)
        scores = einsum(query, key, "b n c, b n r c -> b n r") / math.sqrt(self.lr_dim)
        mined = einsum(scores.softmax(dim=-1), value, "b n r, b n r c -> b n c")
        return lr_tokens + mined


# ---------------------------------------------------------------------------- HR encoder


def _convnext_trunk(encoder: nn.Module) -> nn.Module:
    """The timm ConvNeXt itself (open_clip's ``TimmModel`` keeps it as ``trunk``)."""
    trunk = getattr(encoder, "trunk", encoder)
    if not (hasattr(trunk, "stem") and hasattr(trunk, "stages")):
        raise ValueError(
            f"the HR encoder must be a timm ConvNeXt (stem + stages) or open_clip's TimmModel "
            f"around one, got {type(encoder).__name__}"
        )
    return trunk


def stage_widths(encoder: nn.Module) -> list[int]:
    """The channel width of each ConvNeXt stage, read from the stages themselves.

    timm ConvNeXt-L: ``[192, 384, 768, 1536]``.
    """
    trunk = _convnext_trunk(encoder)
    info = getattr(trunk, "feature_info", None)
    if info:  # timm records what every stage emits
        return [int(entry["num_chs"]) for entry in info][-len(trunk.stages) :]
    widths = []
    for stage in trunk.stages:
        norms = [m for m in stage.modules() if isinstance(m, nn.LayerNorm | nn.Conv2d)]
        widths.append(norms[-1].weight.shape[0])
    return widths


def hr_map_width(encoder: nn.Module) -> int:
    """Channels of the HR map :func:`convnext_hr_features` makes: the sum of the stage widths
    (2880 for ConvNeXt-L)."""
    return sum(stage_widths(encoder))


def convnext_hr_features(encoder: nn.Module, pixel_values: Tensor) -> Tensor:
    """MGM's HR map: the four stage outputs, stages 2-4 upsampled to stage 1's size, concatenated.

    ``[B, 3, S, S]`` -> ``[B, sum(stage widths), S/4, S/4]`` for a ConvNeXt (stem stride 4).
    """
    tap = MultiLayerFeatureTap(_convnext_trunk(encoder), layers=[1, 2, 3, 4])
    features = tap(pixel_values)
    maps = [
        rearrange(
            features[layer],
            "b (h w) c -> b c h w",
            h=features.grids[layer][0],
            w=features.grids[layer][1],
        )
        for layer in (1, 2, 3, 4)
    ]
    size = maps[0].shape[-2:]
    upsampled = [maps[0]] + [
        F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]
    ]
    return torch.cat(upsampled, dim=1)


# ---------------------------------------------------------------------------- views (HD mode)


def check_views(image_grid: int, image_global: bool) -> int:
    """The number of views per image: ``image_grid**2`` crops, plus one when ``image_global``.

    Raises:
        TypeError: ``image_grid`` is not an int or ``image_global`` not a bool.
        ValueError: ``image_grid`` is below 1, or ``image_global`` without a grid.
    """
    check_positive_int(image_grid, "image_grid", hint="1, or 2 for HD")
    check_bool(image_global, "image_global")
    if image_global and image_grid == 1:
        raise ValueError(
            "image_global=True adds a global view to a crop grid: needs image_grid > 1"
        )
    return image_grid**2 + int(image_global)


def lr_views(pixel_values: Tensor, lr_size: int, image_grid: int, image_global: bool) -> Tensor:
    """The LR images the CLIP tower sees, ``[B, 3, S, S]`` -> ``[B, views, 3, lr_size, lr_size]``.

    One view: the HR tensor resized to ``lr_size``. HD: resized to ``image_grid * lr_size``, split
    into row-major crops, with the global view (that image resized to ``lr_size``) first.
    """
    check_views(image_grid, image_global)
    side = lr_size * image_grid
    large = F.interpolate(pixel_values, size=(side, side), mode="bilinear", align_corners=False)
    views = rearrange(large, "b c (gh h) (gw w) -> b (gh gw) c h w", gh=image_grid, gw=image_grid)
    if image_global:
        glance = F.interpolate(large, size=(lr_size, lr_size), mode="bilinear", align_corners=False)
        views = torch.cat([glance.unsqueeze(1), views], dim=1)
    return views


def hr_views(hr_map: Tensor, image_grid: int, image_global: bool) -> Tensor:
    """Each view's HR window map, ``[B, C, H, W]`` -> ``[B, views, C, H/g, W/g]`` in the order of
    :func:`lr_views` (crops split row-major, the global view bilinearly downsampled).

    Raises:
        ValueError: the HR map does not split into ``image_grid`` x ``image_grid`` equal parts.
    """
    check_views(image_grid, image_global)
    height, width = hr_map.shape[-2:]
    if height % image_grid or width % image_grid:
        raise ValueError(
            f"the HR map {height}x{width} does not split into a {image_grid}x{image_grid} grid"
        )
    views = rearrange(hr_map, "b c (gh h) (gw w) -> b (gh gw) c h w", gh=image_grid, gw=image_grid)
    if image_global:
        size = (height // image_grid, width // image_grid)
        glance = F.interpolate(hr_map, size=size, mode="bilinear", align_corners=False)
        views = torch.cat([glance.unsqueeze(1), views], dim=1)
    return views


# ---------------------------------------------------------------------------- the path


def mine_and_connect(
    features: LayerFeatures,
    hr_map: Tensor,
    connector: DenseConnector,
    mining: Callable[[Tensor, Tensor, tuple[int, int]], Tensor],
    placement: Placement,
) -> Tensor:
    """Patch info mining and the connector on tapped LR features, one row per view.

    Args:
        features: the LR tower's tapped layers, ``[N, h*w, C]`` each.
        hr_map: each row's HR window map, ``[N, C_hr, H, W]``.
        connector: the (Dense) connector.
        mining: :class:`PatchInfoMining` or any callable ``(tokens, hr_map, grid) -> tokens``
            (``lr_dim`` = ``C`` after, the fused width before).
        placement: fuse ``"after"`` mining (the mined final layer leads) or ``"before"`` it.

    Returns:
        ``[N, connector tokens, llm_dim]``.
    """
    final = connector.individual_layers[0]
    grid = features.grid(final)
    if placement == "before":
        return connector.projector(mining(connector.fuse(features, grid), hr_map, grid))
    mined = mining(features[final], hr_map, grid)
    layers = {layer: (mined if layer == final else features[layer]) for layer in features}
    replaced = LayerFeatures(layers, grids=features.grids, group_means=features.group_means)
    return connector(replaced, grid)


def check_placement(placement: str, connector: DenseConnector) -> None:
    """Raise a clear ``ValueError`` for an unknown placement or one the connector cannot take."""
    check_choice(placement, "placement", ("after", "before"))
    if placement == "before" and not type(connector.config.fusion).resamplable:
        raise ValueError(
            "placement='before' mines every fused token against its HR window, but STI appends "
            "pooled tokens that have none; use placement='after' with STI"
        )
    if placement == "before" and connector.config.resample is not None:
        raise ValueError(
            "placement='before' mines on the encoder grid, which a resampling connector has "
            "already shrunk; use placement='after' with resampling"
        )


def mining_width(connector: DenseConnector, placement: Placement) -> int:
    """Width of the mining queries: the tower's after mining-then-fusion, the fused one before."""
    return connector.config.vision_dim if placement == "after" else connector.fused_dim


class MGMVisionPath(nn.Module):
    """LR CLIP tower + HR ConvNeXt + patch info mining + a (Dense) connector.

    Args:
        lr_tower: the CLIP tower (frozen by the caller as the recipe says).
        hr_tower: the ConvNeXt (timm ``ConvNeXt`` or open_clip's ``TimmModel``).
        connector: the connector; a ``fusion="none"`` connector is MGM's own ``mlp2x_gelu`` path.
        lr_size: the CLIP tower's image size (the LR image is the HR image resized to it).
        hr_channels: channel width of :func:`convnext_hr_features`; ``None`` derives it from the
            stages (:func:`hr_map_width`), a value that differs from them is an error.
        placement: Dense Connector fusion ``"after"`` mining (default) or ``"before"`` it.
        image_grid: ``2`` for HD mode's 2x2 crops (with ``image_global=True``).
        image_global: ``True`` for HD mode's global view beside the crops.
        lr_normalization: ``(mean, std)`` the CLIP tower was trained with; both towers read one
            normalised tensor, so it must agree with ``hr_normalization``.
        hr_normalization: ``(mean, std)`` the ConvNeXt was trained with.
    """

    def __init__(
        self,
        lr_tower: nn.Module,
        hr_tower: nn.Module,
        connector: DenseConnector,
        *,
        lr_size: int,
        hr_channels: int | None = None,
        placement: Placement = "after",
        image_grid: int = 1,
        image_global: bool = False,
        lr_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        hr_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        check_placement(placement, connector)
        self.num_views = check_views(image_grid, image_global)
        check_normalization(lr_normalization, hr_normalization)
        tower_width = getattr(getattr(lr_tower, "config", None), "hidden_size", None)
        if isinstance(tower_width, int) and tower_width != connector.config.vision_dim:
            raise ValueError(
                f"connector vision_dim={connector.config.vision_dim} does not match the LR tower's "
                f"hidden_size ({tower_width})"
            )
        derived = hr_map_width(hr_tower)
        if hr_channels is not None and hr_channels != derived:
            raise ValueError(
                f"hr_channels={hr_channels} does not match the HR encoder's stage widths "
                f"{stage_widths(hr_tower)} (sum {derived})"
            )
        self.lr_tower, self.hr_tower, self.connector = lr_tower, hr_tower, connector
        self.lr_size, self.placement = lr_size, placement
        self.image_grid, self.image_global = image_grid, image_global
        self._lr_tap = connector.make_tap(lr_tower)
        self.mining = PatchInfoMining(mining_width(connector, placement), derived)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, S_hr, S_hr]`` (normalised) -> ``[B, views * connector tokens, llm_dim]``."""
        views = lr_views(pixel_values, self.lr_size, self.image_grid, self.image_global)
        features = self._lr_tap(views.flatten(0, 1))
        hr_map = hr_views(
            convnext_hr_features(self.hr_tower, pixel_values), self.image_grid, self.image_global
        )
        tokens = mine_and_connect(
            features, hr_map.flatten(0, 1), self.connector, self.mining, self.placement
        )
        return rearrange(tokens, "(b v) t d -> b (v t) d", v=self.num_views)


def check_normalization(
    lr_normalization: tuple[Sequence[float], Sequence[float]] | None,
    hr_normalization: tuple[Sequence[float], Sequence[float]] | None,
) -> None:
    """Both towers read one normalised tensor: their ``(mean, std)`` must agree (when known).

    Raises:
        ValueError: naming both statistics.
    """
    if lr_normalization is None or hr_normalization is None:
        return
    lr_stats = [[float(v) for v in values] for values in lr_normalization]
    hr_stats = [[float(v) for v in values] for values in hr_normalization]
    same = len(lr_stats) == len(hr_stats) == 2 and all(
        len(x) == len(y)
        and all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(x, y, strict=True))
        for x, y in zip(lr_stats, hr_stats, strict=True)
    )
    if not same:
        raise ValueError(
            f"the LR and HR towers were trained with different normalisation statistics "
            f"(mean, std) {lr_stats} vs {hr_stats}; MGM feeds both one normalised tensor"
        )
