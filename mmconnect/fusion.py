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

What a fusion computes is described by a spec (:class:`FusionSpec`: its ``kind`` and only its own
parameters; :class:`SingleLayerSpec`, :class:`STISpec`, :class:`SCISpec`, :class:`DCISpec` for
the published fusions), held by :class:`mmconnect.ConnectorConfig` as ``fusion``. The fusion
registry maps each kind to its spec class and a builder ``builder(spec) -> Fusion``; the four
published fusions (``none``, ``sti``, ``sci``, ``dci``) are registered through
:func:`register_fusion` like any user fusion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect.features import LayerFeatures, check_grid
from mmconnect.layers import (
    check_layer_index,
    normalize_groups,
    normalize_layer,
    normalize_layers,
)
from mmconnect.registry import Registry, describe_callable
from mmconnect.specs import (
    construct_spec,
    fixed_kind,
    json_ready,
    parameter_names,
    spec_from_mapping,
)
from mmconnect.validation import check_choice, check_positive_int, check_str

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
        TypeError: ``window`` is not an int.
        ValueError: ``window`` is below 1 or exceeds the sequence (or grid), ``mode`` is neither
            ``"raster"`` nor ``"grid"``, or the tokens do not form ``grid``.
    """
    check_positive_int(window, "window")
    check_choice(mode, "mode", ("raster", "grid"))
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
    if grid is None:
        raise ValueError("mode='grid' needs grid=(height, width)")
    check_grid(tokens, grid, argument="tokens")
    height, width = grid
    if window > min(height, width):
        raise ValueError(f"window={window} is larger than the {height}x{width} grid it pools")
    maps = rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
    pooled = F.avg_pool2d(maps, kernel_size=window, stride=window)
    return rearrange(pooled, "b c h w -> b (h w) c")


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
            f"{available} (build the tap with connector.make_tap, or capture connector.captured_layers, or pass all "
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
        extra_layers: the layers read one by one after the final layer (STI / SCI), in output
            order.
        individual_layers: every layer the module reads one by one: the final layer, then the
            extra layers (a streaming tap captures these, plus the group means).
        groups: the layer groups it averages (empty unless DCI).
        accumulate_dtype: the dtype group means are summed in (``None``: the features' dtype,
            as the official code); read by the connector's streaming tap.
    """

    accumulate_dtype: torch.dtype | None = None

    def __init__(
        self,
        final_layer: int,
        extra_layers: Sequence[int] = (),
        groups: Sequence[Sequence[int]] = (),
    ):
        super().__init__()
        self.final_layer = final_layer
        self.extra_layers = tuple(extra_layers)
        self.individual_layers = (final_layer, *self.extra_layers)
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
        return vision_dim * len(self.individual_layers)

    def forward(self, features: Mapping[int, Tensor], grid: tuple[int, int]) -> Tensor:
        tensors = [require_layer(features, layer) for layer in self.individual_layers]
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
        return (
            f"individual_layers={self.individual_layers}, window={self.window}, mode={self.mode!r}"
        )


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


# ---------------------------------------------------------------------------- specs


def parse_dtype(name: str | None, *, argument: str = "accumulate_dtype") -> torch.dtype | None:
    """Parse a floating dtype name such as ``"float32"``; ``None`` stays ``None``.

    Raises:
        TypeError: ``name`` is neither a string nor ``None``.
        ValueError: ``name`` names no floating torch dtype.
    """
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(
            f"{argument} must be None or a dtype name such as 'float32', got {name!r} "
            f"({type(name).__name__})"
        )
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{argument} must be None or a floating dtype name such as 'float32', got {name!r}"
        )
    return dtype


def _index_tuple(value: Any, argument: str) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(
            f"{argument} must be a sequence of layer indices, got {value!r} ({type(value).__name__})"
        )
    indices = tuple(value)
    for position, index in enumerate(indices):
        check_layer_index(index, f"{argument}[{position}]")
    return indices


@dataclass(frozen=True, kw_only=True)
class FusionSpec:
    """What a fusion computes: its kind and its own parameters (the fusion part of a
    :class:`mmconnect.ConnectorConfig`).

    Each built-in fusion has a subclass holding only its parameters (:class:`SingleLayerSpec`,
    :class:`STISpec`, :class:`SCISpec`, :class:`DCISpec`). A user fusion registered with
    :func:`register_fusion` either subclasses this (fixing ``kind`` with
    ``field(default=name, init=False)``) or, with no parameters beyond ``final_layer``, is
    named by this class itself: ``FusionSpec(kind="mine")``.

    Layer indices follow the HF ``hidden_states`` convention and may be negative; each spec
    checks types and values here, and :meth:`normalized` checks them against the encoder depth
    (the config calls it, knowing ``num_layers``).

    Attributes:
        kind: the registered fusion name (``"none"``, ``"sti"``, ``"sci"``, ``"dci"`` or a user's).
        final_layer: the layer whose tokens lead the output (LLaVA's ``select_layer``, default -2).
        resamplable: (class attribute) whether every output token belongs to the encoder's token
            grid, so a resampler or a grid projector can take the fused tokens; ``False`` for STI,
            which appends pooled tokens that form no grid.
    """

    kind: str
    final_layer: int = -2

    resamplable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_str(self.kind, "fusion kind")
        check_layer_index(self.final_layer, "final_layer")

    def normalized(self, num_layers: int) -> Self:
        """A copy whose layer indices are the non-negative ones for a ``num_layers``-block encoder.

        Raises:
            ValueError: an index is out of range for ``num_layers`` blocks, or the indices
                clash (a layer twice, the final layer among the extra layers, overlapping
                groups).
        """
        final = normalize_layer(self.final_layer, num_layers, argument="final_layer")
        return dataclasses.replace(
            self, final_layer=final, **self._normalized_fields(num_layers, final)
        )

    def _normalized_fields(self, num_layers: int, final_layer: int) -> dict[str, Any]:
        """The fields besides ``final_layer`` that hold layer indices, normalised (subclasses)."""
        return {}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, validated like a new spec.

        Examples:
            >>> STISpec(extra_layers=(7, 15)).replace(window=4).window
            4
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``kind`` and every parameter (tuples become lists)."""
        return {f.name: json_ready(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The parameters a spec of this class takes (``kind`` excluded)."""
        return parameter_names(cls)


class _ExtraLayersSpec(FusionSpec):
    """Shared validation of the fusions that read ``extra_layers`` one by one (STI, SCI)."""

    extra_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        extra = _index_tuple(self.extra_layers, "extra_layers")
        if not extra:
            raise ValueError(
                f"fusion {self.kind!r} needs at least one index in extra_layers, got {self.extra_layers!r}"
            )
        object.__setattr__(self, "extra_layers", extra)

    def _normalized_fields(self, num_layers: int, final_layer: int) -> dict[str, Any]:
        extra = normalize_layers(self.extra_layers, num_layers, argument="extra_layers")
        if final_layer in extra:
            raise ValueError(
                f"extra_layers contains the final layer {final_layer} "
                f"(final_layer={self.final_layer}); list only the extra layers"
            )
        return {"extra_layers": extra}


@dataclass(frozen=True, kw_only=True)
class SingleLayerSpec(FusionSpec):
    """``kind="none"``: the final layer alone (the LLaVA baseline, no fusion).

    Examples:
        >>> SingleLayerSpec(final_layer=-2).to_dict()
        {'kind': 'none', 'final_layer': -2}
    """

    kind: str = field(default="none", init=False)


@dataclass(frozen=True, kw_only=True)
class STISpec(_ExtraLayersSpec):
    """``kind="sti"``: the final layer's tokens, then each extra layer's tokens average-pooled.

    Attributes:
        extra_layers: the layers pooled and appended after the final layer, in output order.
        window: pooling window and stride (8 in the official code: 576 -> 72 tokens per layer).
        pool: ``"raster"`` (1-D over the flattened sequence, as the official code) or ``"grid"``
            (2-D ``window x window`` on the token grid).
    """

    kind: str = field(default="sti", init=False)
    extra_layers: tuple[int, ...]
    window: int = 8
    pool: PoolMode = "raster"

    resamplable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.window, "window")
        check_choice(self.pool, "pool", STI_POOL_MODES)


@dataclass(frozen=True, kw_only=True)
class SCISpec(_ExtraLayersSpec):
    """``kind="sci"``: the final layer and the extra layers concatenated along channels.

    Attributes:
        extra_layers: the layers concatenated after the final layer, in output order.
    """

    kind: str = field(default="sci", init=False)
    extra_layers: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class DCISpec(FusionSpec):
    """``kind="dci"``: the final layer, then the mean of each layer group, along channels.

    Attributes:
        groups: the layer groups, each a tuple of layer indices, in output order; disjoint.
        accumulate_dtype: how the group means round. ``None`` (default): as the official code's
            ``torch.sum(torch.stack(group), 0) / n`` in the features' dtype, bit for bit on the
            CPU. A dtype name such as ``"float32"``: summed and divided in that dtype, rounded
            once to the features' dtype (overflow-safe in fp16).

    Examples:
        >>> DCISpec(groups=[range(0, 12), range(12, 24)]).groups[1][:3]
        (12, 13, 14)
    """

    kind: str = field(default="dci", init=False)
    groups: tuple[tuple[int, ...], ...]
    accumulate_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.groups, str | bytes) or not isinstance(self.groups, Iterable):
            raise TypeError(
                f"groups must be a sequence of layer groups, got {self.groups!r} "
                f"({type(self.groups).__name__})"
            )
        groups = tuple(
            _index_tuple(group, f"groups[{position}]") for position, group in enumerate(self.groups)
        )
        if not groups:
            raise ValueError("fusion 'dci' needs at least one group in groups, got none")
        for position, group in enumerate(groups):
            if not group:
                raise ValueError(
                    f"groups[{position}] is empty: every group needs at least one layer"
                )
        object.__setattr__(self, "groups", groups)
        parse_dtype(self.accumulate_dtype)

    @property
    def accumulate_torch_dtype(self) -> torch.dtype | None:
        """``accumulate_dtype`` as a ``torch.dtype``."""
        return parse_dtype(self.accumulate_dtype)

    def _normalized_fields(self, num_layers: int, final_layer: int) -> dict[str, Any]:
        return {"groups": normalize_groups(self.groups, num_layers, argument="groups")}


STI_POOL_MODES: tuple[str, ...] = ("raster", "grid")


# ---------------------------------------------------------------------------- registry

#: ``builder(spec) -> Fusion``: ``spec`` is the fusion's spec with non-negative layer indices
#: (:meth:`FusionSpec.normalized`).
FusionBuilder = Callable[[FusionSpec], Fusion]


@dataclass(frozen=True)
class _FusionEntry:
    spec: type[FusionSpec]
    builder: FusionBuilder


# Insertion order is the listing order: the published fusions in the paper's order, then users'.
_FUSIONS: Registry[_FusionEntry] = Registry(
    "fusion",
    describe=lambda entry: (
        f"spec {entry.spec.__name__}, builder {describe_callable(entry.builder)}"
    ),
)


def register_fusion(
    name: str, builder: FusionBuilder, *, spec: type[FusionSpec] = FusionSpec
) -> None:
    """Register a fusion: configs name it with a spec of kind ``name``.

    Args:
        name: the fusion's kind, as specs and config files spell it.
        builder: ``builder(spec) -> Fusion``, called by :class:`mmconnect.DenseConnector` with
            the validated spec, its layer indices already non-negative.
        spec: the spec class holding the fusion's parameters: a :class:`FusionSpec` subclass
            whose ``kind`` is fixed to ``name`` (``kind: str = field(default=name, init=False)``),
            validating itself in ``__post_init__`` and normalising its own layer indices in
            ``_normalized_fields``. The default, :class:`FusionSpec` itself, is for fusions with
            no parameter besides ``final_layer`` (then written ``FusionSpec(kind=name)``).

    Raises:
        ValueError: ``name`` is empty or already registered (registries never silently
            replace), or ``spec`` fixes another kind.
        TypeError: ``builder`` is not callable or ``spec`` is no :class:`FusionSpec` subclass.
    """
    _FUSIONS.check_available(name)
    if not callable(builder):
        raise TypeError(f"fusion builder must be callable, got {type(builder).__name__}")
    if not (isinstance(spec, type) and issubclass(spec, FusionSpec)):
        raise TypeError(f"spec must be a FusionSpec subclass, got {spec!r}")
    fixed = fixed_kind(spec)
    if fixed is not None and fixed != name:
        raise ValueError(
            f"spec {spec.__name__} fixes kind={fixed!r}, so it cannot be registered as {name!r}"
        )
    _FUSIONS.register(name, _FusionEntry(spec, builder))


def list_fusions() -> list[str]:
    """The registered fusion kinds: the published ``none``, ``sti``, ``sci``, ``dci``, then
    user registrations in the order they were made."""
    return _FUSIONS.names()


def _entry(kind: Any) -> _FusionEntry:
    if kind not in _FUSIONS:
        # A config saved with a user's fusion loads only once that fusion is registered again.
        raise ValueError(
            f"fusion kind must be one of {tuple(_FUSIONS.names())}, got {kind!r}; a new fusion "
            "is registered with mmconnect.register_fusion before a config names it"
        )
    return _FUSIONS[kind]


def fusion_spec_class(kind: str) -> type[FusionSpec]:
    """The spec class registered for the fusion ``kind``.

    Raises:
        ValueError: unknown kind (the message lists the known ones).
    """
    return _entry(kind).spec


def check_fusion_spec(spec: Any) -> FusionSpec:
    """``spec`` if it is a spec of a registered fusion, of the class registered for its kind.

    Raises:
        TypeError: ``spec`` is no :class:`FusionSpec`, or of another class than its kind's.
        ValueError: unknown kind.
    """
    if not isinstance(spec, FusionSpec):
        raise TypeError(
            "fusion must be a FusionSpec (e.g. DCISpec(groups=...)) or the name of a fusion "
            f"without required parameters, got {spec!r} ({type(spec).__name__})"
        )
    expected = _entry(spec.kind).spec
    if not isinstance(spec, expected):
        raise TypeError(
            f"fusion kind {spec.kind!r} takes a {expected.__name__}, got a {type(spec).__name__}"
        )
    return spec


def parse_fusion(value: FusionSpec | str | Mapping[str, Any]) -> FusionSpec:
    """A fusion spec from a spec, a kind name (kinds whose parameters all have defaults, e.g.
    ``"none"``) or a :meth:`FusionSpec.to_dict` mapping.

    Raises:
        ValueError: unknown kind, unknown keys (the message lists the kind's parameters), a
            name whose kind has required parameters, or a bad parameter value.
        TypeError: a parameter of the wrong type, or a value of none of these types.
    """
    if isinstance(value, FusionSpec):
        return check_fusion_spec(value)
    if isinstance(value, str):
        return construct_spec(_entry(value).spec, value, {}, what="fusion")
    if isinstance(value, Mapping):
        return spec_from_mapping(value, lambda kind: _entry(kind).spec, what="fusion")
    return check_fusion_spec(value)


def build_fusion(spec: FusionSpec, num_layers: int) -> Fusion:
    """The fusion module ``spec`` describes, for an encoder of ``num_layers`` blocks.

    Raises:
        ValueError: unknown kind, or layer indices out of range for ``num_layers``.
        TypeError: the registered builder did not return a :class:`Fusion`.
    """
    spec = check_fusion_spec(spec)
    fusion = _entry(spec.kind).builder(spec.normalized(num_layers))
    if not isinstance(fusion, Fusion):
        # The connector relies on the Fusion bookkeeping (layers, widths, token contract).
        raise TypeError(
            f"the builder of fusion {spec.kind!r} returned {type(fusion).__name__}, "
            "expected a mmconnect.fusion.Fusion"
        )
    return fusion


def _build_single(spec: SingleLayerSpec) -> Fusion:
    return ChannelConcat(spec.final_layer)


def _build_channels(spec: SCISpec) -> Fusion:
    return ChannelConcat(spec.final_layer, spec.extra_layers)


def _build_token_stack(spec: STISpec) -> Fusion:
    return TokenStack(spec.final_layer, spec.extra_layers, window=spec.window, mode=spec.pool)


def _build_grouped(spec: DCISpec) -> Fusion:
    return GroupedChannelConcat(
        spec.final_layer, spec.groups, accumulate_dtype=spec.accumulate_torch_dtype
    )


register_fusion("none", _build_single, spec=SingleLayerSpec)
register_fusion("sti", _build_token_stack, spec=STISpec)
register_fusion("sci", _build_channels, spec=SCISpec)
register_fusion("dci", _build_grouped, spec=DCISpec)
