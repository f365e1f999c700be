"""Mini-Gemini's dual-encoder vision path with patch info mining, and the Dense Connector in it.

REFERENCE section 8, re-derived:

* the high-resolution (HR) image goes through a ConvNeXt (timm, or open_clip's timm trunk): stem
  and four stages; stages 2-4 are bilinearly upsampled to stage 1's size and all four are
  concatenated along channels (``[B, sum(stage widths), H/4, W/4]``);
* the low-resolution (LR) image is a bilinear downsample of the same normalised HR tensor and goes
  through the CLIP tower, ``hidden_states[-2]`` without CLS;
* patch info mining: ``q = Linear(LN(lr))``, ``k, v = Linear(LN(hr))``; every LR token ``(i, j)``
  attends only to its own ``r x r`` window of HR cells (``r`` = HR size / LR grid), one head,
  scaled by ``sqrt(width)``, softmax over the window; the result is added to the LR features;
* then the projector.

With a Dense Connector the fusion either follows mining (``placement="after"``, default: the mined
final layer leads the fused channels, mining keeps CLIP's width) or precedes it (``"before"``: the
fused features are the queries, mining works at the fused width).

Issue 5 is not finished: the full MGM MLLM (LLM, ``generate``, save / load), HD mode and the
adapter for the original MGM codebase are still to come.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from mmconnect import DenseConnector, LayerFeatures, MultiLayerFeatureTap

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


def convnext_hr_features(encoder: nn.Module, pixel_values: Tensor) -> Tensor:
    """MGM's HR map: the four stage outputs, stages 2-4 upsampled to stage 1's size, concatenated.

    ``[B, 3, S, S]`` -> ``[B, sum(stage widths), S/4, S/4]`` for a ConvNeXt (stem stride 4).
    """
    tap = MultiLayerFeatureTap(encoder, layers=[1, 2, 3, 4])
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


class MGMVisionPath(nn.Module):
    """LR CLIP tower + HR ConvNeXt + patch info mining + a (Dense) connector.

    Args:
        lr_tower: the CLIP tower (frozen by the caller as the recipe says).
        hr_tower: the ConvNeXt (timm ``ConvNeXt`` or open_clip's ``TimmModel``).
        connector: the connector; a ``fusion="none"`` connector is MGM's own ``mlp2x_gelu`` path.
        hr_channels: channel width of :func:`convnext_hr_features` (sum of the stage widths).
        lr_size: the CLIP tower's image size (the LR image is the HR image resized to it).
        placement: Dense Connector fusion ``"after"`` mining (default) or ``"before"`` it.
        lr_normalization / hr_normalization: ``(mean, std)`` each tower was trained with; both
            towers read one normalised tensor, so they must agree.
    """

    def __init__(
        self,
        lr_tower: nn.Module,
        hr_tower: nn.Module,
        connector: DenseConnector,
        *,
        hr_channels: int,
        lr_size: int,
        placement: Placement = "after",
        lr_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        hr_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        if placement not in ("after", "before"):
            raise ValueError(f"placement must be 'after' or 'before', got {placement!r}")
        if lr_normalization is not None and hr_normalization is not None:
            lr_stats = [list(map(float, values)) for values in lr_normalization]
            hr_stats = [list(map(float, values)) for values in hr_normalization]
            if not all(
                math.isclose(a, b, abs_tol=1e-6)
                for x, y in zip(lr_stats, hr_stats, strict=True)
                for a, b in zip(x, y, strict=True)
            ):
                raise ValueError(
                    f"the LR and HR towers were trained with different normalisation statistics "
                    f"(mean, std) {lr_stats} vs {hr_stats}; MGM feeds both one normalised tensor"
                )
        tower_width = getattr(getattr(lr_tower, "config", None), "hidden_size", None)
        if isinstance(tower_width, int) and tower_width != connector.config.vision_dim:
            raise ValueError(
                f"connector vision_dim={connector.config.vision_dim} does not match the LR tower's "
                f"hidden_size ({tower_width})"
            )
        if placement == "before" and connector.config.resample_grid is not None:
            raise ValueError(
                "placement='before' mines on the encoder grid, which a resampling connector has "
                "already shrunk; use placement='after' with resample_grid"
            )
        self.lr_tower, self.hr_tower, self.connector = lr_tower, hr_tower, connector
        self.lr_size, self.placement = lr_size, placement
        self._lr_tap = connector.make_tap(lr_tower)
        width = connector.config.vision_dim if placement == "after" else connector.fused_dim
        self.mining = PatchInfoMining(width, hr_channels)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[B, 3, S_hr, S_hr]`` (normalised) -> ``[B, connector tokens, llm_dim]``."""
        lr_pixels = F.interpolate(
            pixel_values, size=(self.lr_size, self.lr_size), mode="bilinear", align_corners=False
        )
        features = self._lr_tap(lr_pixels)
        grid = features.grid(self.connector.individual_layers[0])
        hr_map = convnext_hr_features(self.hr_tower, pixel_values)
        if self.placement == "before":
            fused = self.connector.fuse(features, grid)
            return self.connector.projector(self.mining(fused, hr_map, grid))
        final = self.connector.individual_layers[0]
        mined = self.mining(features[final], hr_map, grid)
        layers = {layer: (mined if layer == final else features[layer]) for layer in features}
        replaced = LayerFeatures(layers, grids=features.grids, group_means=features.group_means)
        return self.connector(replaced, grid)
