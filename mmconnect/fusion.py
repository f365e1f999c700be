"""Fusion of several encoder layers into one token sequence: the Dense Connector's STI, SCI, DCI.

Pure functions on ``[B, N, C]`` tensors, composable into any variant:

* :func:`stack` concatenates along tokens, :func:`pool_tokens` shrinks a token sequence,
* :func:`concat` concatenates along channels,
* :func:`grouped_average` averages groups of layers.

The three published integrations are one line each (``f`` maps layer index to ``[B, N, C]``;
indices in the HF ``hidden_states`` convention)::

    sti = stack([f[23], pool_tokens(f[7], 8), pool_tokens(f[15], 8)])      # 576 + 72 + 72 tokens
    sci = concat([f[23], f[7], f[15]])                                      # 3 * C channels
    dci = concat([f[23], *grouped_average(f, [range(0, 12), range(12, 24)])])

The modules at the end (:class:`TokenStack`, :class:`ChannelConcat`, :class:`GroupedChannelConcat`)
wrap these compositions with the bookkeeping a connector needs: which layers they read, their
output width and the token contract (:meth:`Fusion.num_tokens`, :meth:`Fusion.output_grid`).

The fusion registry maps each ``ConnectorConfig.fusion`` name to a builder; the four published
fusions (``none``, ``sti``, ``sci``, ``dci``) are registered through :func:`register_fusion` like
any user fusion, and :class:`mmconnect.ConnectorConfig` accepts every registered name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect.features import LayerFeatures, check_grid
from mmconnect.layers import normalize_groups, normalize_layer, normalize_layers
from mmconnect.registry import Registry, describe_callable

if TYPE_CHECKING:  # the config module imports this one: no import at run time
    from mmconnect.config import ConnectorConfig

PoolMode = Literal["raster", "grid"]


def _check_token_tensors(tensors: Sequence[Tensor], argument: str) -> None:
    if isinstance(tensors, Tensor) or len(tensors) == 0:
        raise ValueError(
            f"{argument} must be a non-empty sequence of [batch, tokens, channels] tensors"
        )
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor) or tensor.dim() != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(
                f"{argument}[{position}] must be a [batch, tokens, channels] tensor, got {shape}"
            )
        if tensor.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                f"{argument} have different batch sizes: {tensors[0].shape[0]} and "
                f"{tensor.shape[0]} (at position {position})"
            )


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate token sequences along the token axis (STI), in the given order.

    Shapes: ``[B, N_i, C]`` each -> ``[B, sum(N_i), C]``.

    Raises:
        ValueError: the channel widths differ.
    """
    _check_token_tensors(tensors, "tensors")
    widths = [tensor.shape[-1] for tensor in tensors]
    if len(set(widths)) != 1:
        raise ValueError(
            f"cannot stack along tokens: channel widths differ across fused layers ({widths}); "
            "stacking needs one width (use concat for different widths)"
        )
    return torch.cat(list(tensors), dim=1)


def concat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate token sequences along channels (SCI, DCI), in the given order.

    Shapes: ``[B, N, C_i]`` each -> ``[B, N, sum(C_i)]``.

    Raises:
        ValueError: the token counts differ.
    """
    _check_token_tensors(tensors, "tensors")
    counts = [tensor.shape[1] for tensor in tensors]
    if len(set(counts)) != 1:
        raise ValueError(
            f"cannot concatenate along channels: token counts differ across fused layers ({counts})"
        )
    return torch.cat(list(tensors), dim=-1)


def pool_tokens(
    tokens: Tensor, window: int, *, mode: PoolMode = "raster", grid: tuple[int, int] | None = None
) -> Tensor:
    """Average-pool a token sequence with a window equal to its stride (remainders dropped).

    ``mode="raster"`` pools the flattened raster sequence in 1-D, as the official STI does: windows
    cross grid rows, ``[B, N, C] -> [B, N // window, C]`` (576 -> 72 for window 8, 729 -> 91).
    ``mode="grid"`` pools the ``(height, width)`` grid in 2-D with a ``window x window`` kernel:
    ``[B, h*w, C] -> [B, (h // window) * (w // window), C]``.

    Raises:
        ValueError: ``window`` is not a positive int or exceeds the sequence (or grid), or the
            tokens do not form ``grid``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    _check_token_tensors([tokens], "tokens")
    if mode == "raster":
        if window > tokens.shape[1]:
            raise ValueError(
                f"window={window} is larger than the {tokens.shape[1]} tokens it pools"
            )
        pooled = F.avg_pool1d(
            rearrange(tokens, "b n c -> b c n"), kernel_size=window, stride=window
        )
        return rearrange(pooled, "b c n -> b n c")
    if mode == "grid":
        if grid is None:
            raise ValueError("mode='grid' needs grid=(height, width)")
        check_grid(tokens, grid, argument="tokens")
        height, width = grid
        if window > min(height, width):
            raise ValueError(f"window={window} is larger than the {height}x{width} grid it pools")
        maps = rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
        pooled = F.avg_pool2d(maps, kernel_size=window, stride=window)
        return rearrange(pooled, "b c h w -> b (h w) c")
    raise ValueError(f"mode must be 'raster' or 'grid', got {mode!r}")


def pooled_token_count(num_tokens: int, grid: tuple[int, int], window: int, mode: PoolMode) -> int:
    """How many tokens :func:`pool_tokens` returns, without running it."""
    if mode == "raster":
        return num_tokens // window
    return (grid[0] // window) * (grid[1] // window)


def require_layer(features: Mapping[int, Tensor], layer: int) -> Tensor:
    """``features[layer]`` with a clear error naming what is missing and what is there."""
    try:
        return features[layer]
    except (KeyError, IndexError):
        available = (
            sorted(features) if isinstance(features, Mapping) else list(range(len(features)))
        )
        raise ValueError(
            f"features are missing layer {layer}, which the connector needs; they hold layers "
            f"{available} (build the tap with connector.layers / connector.groups, or pass all "
            "hidden states)"
        ) from None


def grouped_average(
    features: Mapping[int, Tensor],
    groups: Iterable[Iterable[int]],
    *,
    accumulate_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Mean over each group of layers (DCI), one ``[B, N, C]`` tensor per group.

    With ``accumulate_dtype=None`` this is the official op sequence,
    ``torch.sum(torch.stack(group), 0) / len(group)`` in the features' dtype, so it rounds as the
    official code does (in bf16 / fp16 torch sums in fp32, rounds the sum once to the dtype and
    the division rounds again). With a dtype such as ``torch.float32`` the members are cast to it,
    summed and divided in it, and the mean is rounded once to the features' dtype (overflow-safe
    in fp16). The streaming tap computes the same two variants without holding the members (see
    :class:`mmconnect.MultiLayerFeatureTap`). When ``features`` is a :class:`LayerFeatures` that
    already holds a group's streamed mean, that mean is used.

    Args:
        features: layer index -> ``[B, N, C]`` (non-negative HF ``hidden_states`` indices).
        groups: the layer indices of each group, in the order they are stacked.
        accumulate_dtype: ``None`` (official rounding) or the dtype to sum and divide in.

    Raises:
        ValueError: a group is empty, a layer is missing, or shapes differ within a group.
    """
    streamed = features.group_means if isinstance(features, LayerFeatures) else {}
    means = []
    for position, group in enumerate(groups):
        members = tuple(group)
        if not members:
            raise ValueError(f"groups[{position}] is empty: every group needs at least one layer")
        if members in streamed:
            means.append(streamed[members])
            continue
        tensors = [require_layer(features, layer) for layer in members]
        shapes = {tuple(tensor.shape) for tensor in tensors}
        if len(shapes) != 1:
            raise ValueError(
                f"groups[{position}] mixes layers of different shapes: {sorted(shapes)}"
            )
        dtype = tensors[0].dtype
        # Exactly the official `torch.sum(torch.stack(...), 0) / n` (stack first: summing pairwise
        # would round after every addition in half precision).
        total = torch.sum(
            torch.stack([tensor.to(accumulate_dtype or dtype) for tensor in tensors]), 0
        )
        means.append((total / len(members)).to(dtype))
    return means


# ---------------------------------------------------------------------------- modules


class Fusion(nn.Module):
    """Base of the fusion modules: the final layer first, then the extra layers or groups.

    The token contract: for the encoder grid ``(h, w)`` it receives, a fusion returns
    :meth:`num_tokens` tokens whose leading ``output_grid`` tokens form that grid in raster
    order; any tokens after them (STI's pooled tokens) form no grid. Subclasses that change the
    count or the grid override both methods.

    Attributes:
        final_layer: the layer whose tokens lead the output (LLaVA's ``hidden_states[-2]``).
        layers: every individual layer the module reads, final layer first.
        groups: the layer groups it averages (empty unless DCI).
    """

    def __init__(
        self,
        final_layer: int,
        extra_layers: Sequence[int] = (),
        groups: Sequence[Sequence[int]] = (),
    ):
        super().__init__()
        self.final_layer = final_layer
        self.extra_layers = tuple(extra_layers)
        self.layers = (final_layer, *self.extra_layers)
        self.groups = tuple(tuple(group) for group in groups)

    def output_channels(self, vision_dim: int) -> int:
        """Channel width of the fused output for an encoder of width ``vision_dim``."""
        return vision_dim

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """Token count of the fused output for a ``(height, width)`` encoder token grid."""
        return grid[0] * grid[1]

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The ``(height, width)`` grid of the output's leading tokens for an encoder grid.

        Tokens beyond ``height * width`` (``num_tokens(grid)`` minus that) follow the grid and
        form none of their own.
        """
        return tuple(grid)

    def forward(
        self, features: Mapping[int, Tensor], grid: tuple[int, int]
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class ChannelConcat(Fusion):
    """SCI: ``concat([F, f[l1], f[l2], ...])`` along channels; with no extra layers, just ``F``.

    ``[B, N, C]`` per layer -> ``[B, N, C * (1 + len(extra_layers))]``.
    """

    def output_channels(self, vision_dim: int) -> int:
        return vision_dim * len(self.layers)

    def forward(self, features: Mapping[int, Tensor], grid: tuple[int, int]) -> Tensor:
        tensors = [require_layer(features, layer) for layer in self.layers]
        return tensors[0] if len(tensors) == 1 else concat(tensors)


class TokenStack(Fusion):
    """STI: ``stack([F, pool(f[l1]), pool(f[l2]), ...])`` along tokens; width unchanged.

    ``[B, N, C]`` per layer -> ``[B, N + len(extra_layers) * pooled, C]``.
    """

    def __init__(
        self, final_layer: int, extra_layers: Sequence[int], *, window: int, mode: PoolMode
    ):
        super().__init__(final_layer, extra_layers)
        self.window = window
        self.mode = mode

    def num_tokens(self, grid: tuple[int, int]) -> int:
        tokens = grid[0] * grid[1]
        if self.window > (tokens if self.mode == "raster" else min(grid)):
            raise ValueError(
                f"window={self.window} is larger than the {grid[0]}x{grid[1]} grid STI pools "
                f"(mode={self.mode!r})"
            )
        return tokens + len(self.extra_layers) * pooled_token_count(
            tokens, grid, self.window, self.mode
        )

    def forward(self, features: Mapping[int, Tensor], grid: tuple[int, int]) -> Tensor:
        final = require_layer(features, self.final_layer)
        shallow = [
            pool_tokens(require_layer(features, layer), self.window, mode=self.mode, grid=grid)
            for layer in self.extra_layers
        ]
        return stack([final, *shallow])

    def extra_repr(self) -> str:
        return f"layers={self.layers}, window={self.window}, mode={self.mode!r}"


class GroupedChannelConcat(Fusion):
    """DCI: ``concat([F, mean(group_1), mean(group_2), ...])`` along channels.

    ``[B, N, C]`` per layer -> ``[B, N, C * (1 + len(groups))]``. Means as
    :func:`grouped_average` computes them (``accumulate_dtype=None``: the official rounding).
    """

    def __init__(
        self,
        final_layer: int,
        groups: Sequence[Sequence[int]],
        *,
        accumulate_dtype: torch.dtype | None = None,
    ):
        super().__init__(final_layer, (), groups)
        self.accumulate_dtype = accumulate_dtype

    def output_channels(self, vision_dim: int) -> int:
        return vision_dim * (1 + len(self.groups))

    def forward(self, features: Mapping[int, Tensor], grid: tuple[int, int]) -> Tensor:
        final = require_layer(features, self.final_layer)
        means = grouped_average(features, self.groups, accumulate_dtype=self.accumulate_dtype)
        return concat([final, *means])

    def extra_repr(self) -> str:
        spans = ", ".join(f"{group[0]}..{group[-1]}" for group in self.groups)
        return f"final_layer={self.final_layer}, groups=[{spans}]"


# ---------------------------------------------------------------------------- registry

#: ``builder(config) -> Fusion``: reads the fields of a :class:`mmconnect.ConnectorConfig` it needs.
FusionBuilder = Callable[["ConnectorConfig"], Fusion]
#: ``check(config)``: raises ``ValueError`` for field combinations the fusion cannot use.
FusionCheck = Callable[["ConnectorConfig"], None]
# Insertion order is the listing order: the published fusions in the paper's order, then users'.
_FUSIONS: Registry[tuple[FusionBuilder, FusionCheck | None]] = Registry(
    "fusion", describe=lambda entry: f"builder {describe_callable(entry[0])}"
)


def register_fusion(name: str, builder: FusionBuilder, *, check: FusionCheck | None = None) -> None:
    """Register a fusion under ``ConnectorConfig.fusion == name``.

    Args:
        name: the exact name configs use.
        builder: ``builder(config) -> Fusion``; called by :class:`mmconnect.DenseConnector` with
            the validated config. Layer indices in the config may be negative: normalise them
            with :func:`mmconnect.normalize_layer` against ``config.num_layers``.
        check: optional ``check(config)`` run while the config validates itself, raising
            ``ValueError`` for fields the fusion cannot use (e.g. ``groups`` for SCI), so a bad
            config fails when it is made, not when a connector is built.

    Raises:
        ValueError: ``name`` is empty or already registered (registries never silently replace).
        TypeError: ``builder`` or ``check`` is not callable.
    """
    _FUSIONS.check_available(name)
    if not callable(builder):
        raise TypeError(f"fusion builder must be callable, got {type(builder).__name__}")
    if check is not None and not callable(check):
        raise TypeError(f"fusion check must be callable or None, got {type(check).__name__}")
    _FUSIONS.register(name, (builder, check))


def list_fusions() -> list[str]:
    """The registered fusion names: the published ``none``, ``sti``, ``sci``, ``dci``, then
    user registrations in the order they were made."""
    return _FUSIONS.names()


def check_fusion_config(config: ConnectorConfig) -> None:
    """Run the registered ``check`` of ``config.fusion`` (the config's own validation calls it).

    Raises:
        ValueError: unknown fusion name (the message lists the known ones) or a field
            combination the fusion refuses.
    """
    if config.fusion not in _FUSIONS:
        raise ValueError(f"fusion must be one of {tuple(_FUSIONS.names())}, got {config.fusion!r}")
    check = _FUSIONS[config.fusion][1]
    if check is not None:
        check(config)


def build_fusion(config: ConnectorConfig) -> Fusion:
    """The fusion module that ``config.fusion`` names, built from ``config``.

    Raises:
        ValueError: unknown fusion name.
        TypeError: the registered builder did not return a :class:`Fusion`.
    """
    if config.fusion not in _FUSIONS:
        raise ValueError(f"fusion must be one of {tuple(_FUSIONS.names())}, got {config.fusion!r}")
    fusion = _FUSIONS[config.fusion][0](config)
    if not isinstance(fusion, Fusion):
        # The connector relies on the Fusion bookkeeping (layers, widths, token contract).
        raise TypeError(
            f"the builder of fusion {config.fusion!r} returned {type(fusion).__name__}, "
            "expected a mmconnect.fusion.Fusion"
        )
    return fusion


def _final_and_layers(config: ConnectorConfig) -> tuple[int, tuple[int, ...]]:
    final = normalize_layer(config.final_layer, config.num_layers, argument="final_layer")
    return final, normalize_layers(config.layers, config.num_layers, argument="layers")


def _build_single_or_channels(config: ConnectorConfig) -> Fusion:
    return ChannelConcat(*_final_and_layers(config))  # "none" has no extra layers


def _build_token_stack(config: ConnectorConfig) -> Fusion:
    return TokenStack(*_final_and_layers(config), window=config.sti_window, mode=config.sti_pool)


def _build_grouped(config: ConnectorConfig) -> Fusion:
    final = normalize_layer(config.final_layer, config.num_layers, argument="final_layer")
    groups = normalize_groups(config.groups, config.num_layers, argument="groups")
    return GroupedChannelConcat(final, groups, accumulate_dtype=config.accumulate_torch_dtype)


def _check_none(config: ConnectorConfig) -> None:
    if config.layers or config.groups:
        raise ValueError("fusion='none' uses only final_layer; pass neither layers= nor groups=")


def _check_layers(config: ConnectorConfig) -> None:
    if not config.layers or config.groups:
        raise ValueError(
            f"fusion={config.fusion!r} needs at least one index in layers= and no groups="
        )


def _check_sti(config: ConnectorConfig) -> None:
    _check_layers(config)
    if config.resample_grid is not None:
        raise ValueError(
            "resample_grid cannot be used with fusion='sti': STI appends pooled tokens that "
            "form no grid; resample with 'none', 'sci' or 'dci'"
        )


def _check_dci(config: ConnectorConfig) -> None:
    if not config.groups or config.layers:
        raise ValueError("fusion='dci' needs at least one group in groups= and no layers=")


register_fusion("none", _build_single_or_channels, check=_check_none)
register_fusion("sti", _build_token_stack, check=_check_sti)
register_fusion("sci", _build_single_or_channels, check=_check_layers)
register_fusion("dci", _build_grouped, check=_check_dci)
