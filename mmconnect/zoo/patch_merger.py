"""Spatial patch mergers: each ``m x m`` block of tokens becomes one (Qwen2/2.5/3-VL, Mistral 3).

Two registered projectors, both :class:`~mmconnect.projectors.GridProjector` s that divide each
side of the token grid by the merge size ``m`` (2 in every released model):

``patch_merger`` (:class:`PatchMergerSpec`, module :class:`PatchMerger`) — the Qwen-VL merger.
For a block of ``m * m`` neighbouring tokens ``x_1 .. x_{m^2}`` (row-major inside the block),
each ``[C]``:

    z = concat(N(x_1), ..., N(x_{m^2}))             [m^2 C]   (pre-shuffle norm, default)
    z = N(concat(x_1, ..., x_{m^2}))                 [m^2 C]   (``postshuffle_norm=True``)
    y = W_2 GELU(W_1 z + b_1) + b_2                  [D]

with ``W_1: [H, m^2 C]`` (``H = hidden_dim``, by default ``m^2 C`` as in every Qwen model),
``W_2: [D, H]``, GELU the exact erf form and ``N`` a LayerNorm (``norm="layernorm"``) or an
RMSNorm (``norm="rmsnorm"``), both with ``eps = 1e-6`` as Qwen's. The Hugging Face modules this
reproduces (transformers ``models/<family>/modeling_<family>.py``):

* Qwen2-VL (Wang et al., 2024, arXiv:2409.12191): ``qwen2_vl.PatchMerger``, LayerNorm, pre-shuffle
  — :data:`QWEN2_VL_MERGER`, weights from :func:`qwen2_vl_merger_state_from_hf`;
* Qwen2.5-VL (Bai et al., 2025, arXiv:2502.13923): ``qwen2_5_vl.Qwen2_5_VLPatchMerger``, RMSNorm
  — :data:`QWEN2_5_VL_MERGER`, :func:`qwen2_5_vl_merger_state_from_hf`;
* Qwen3-VL: ``qwen3_vl.Qwen3VLVisionPatchMerger``: the final merger (LayerNorm, pre-shuffle,
  :data:`QWEN3_VL_MERGER`) and the DeepStack per-layer mergers (``use_postshuffle_norm=True``,
  the norm over the merged ``m^2 C`` width: :data:`QWEN3_VL_DEEPSTACK_MERGER`); both load with
  :func:`qwen3_vl_merger_state_from_hf`. A DeepStack injector builds one :class:`PatchMerger`
  per tapped layer with that spec (``PatchMerger(C, D, postshuffle_norm=True)``).

``mistral3_merger`` (:class:`Mistral3MergerSpec`, module :class:`Mistral3Projector`) — Mistral 3's
multimodal projector (``mistral3.Mistral3MultiModalProjector`` with its ``Mistral3PatchMerger``;
Mistral-Small-3.1). Per block, with the unfold's channel-major order
``u = [x_1[0], x_2[0], ..., x_{m^2}[0], x_1[1], ...]`` of the normed tokens:

    x'_i = RMSNorm(x_i)                              [C]       (eps 1e-5: the text model's)
    u    = unfold_m(x')                              [C m^2]   (channel-major, see above)
    v    = W_m u                                     [C]       (bias-free)
    y    = W_2 GELU(W_1 v + b_1) + b_2               [D]       (biases only with ``bias=True``)

Token order. Our input is ``[B, h*w, C]`` in raster order on the ``(h, w)`` grid, as every
fusion produces; the modules regroup the blocks themselves. The output is
``[B, (h/m)*(w/m), D]`` in raster order on the merged grid. (Qwen's HF mergers instead receive
their tokens already in block order, ``(h/m, w/m, m, m)``, because Qwen's image processor
arranges the patches so; Mistral 3's tokens are in raster order per image, as ours.)

A grid whose sides are not multiples of ``m`` is refused (``ValueError`` from
``output_grid`` / ``num_tokens``, before anything runs): Qwen's processors and Mistral 3's
resize images so that the grid is always a multiple; HF's unfold would silently drop the last
row or column.

Widths: ``in_dim`` is the fused width ``C`` (``vision_dim`` times the layers for SCI / DCI),
``out_dim`` the LLM width ``D``. Mistral 3's HF projector norms and merges over the tower width
and only supports one feature layer there; here the norm and the merge run over the fused width.

Examples:
    >>> merger = PatchMerger(8, 16)                 # Qwen2-VL's merger, C = 8 -> D = 16
    >>> merger.output_grid((4, 6)), merger.num_tokens((4, 6))
    ((2, 3), 6)
    >>> merger(torch.randn(1, 24, 8), (4, 6)).shape
    torch.Size([1, 6, 16])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from mmconnect.checkpoint import shape_problems, weights_under_prefix
from mmconnect.fusion import DCISpec
from mmconnect.presets import CLIP_L_336, register_preset
from mmconnect.projectors import GridProjector, ProjectorSpec, register_projector
from mmconnect.validation import (
    check_bool,
    check_choice,
    check_int_pair,
    check_optional_int,
    check_positive_float,
    check_positive_int,
)

#: The norms a :class:`PatchMergerSpec` may use.
MERGER_NORMS = ("layernorm", "rmsnorm")


# ---------------------------------------------------------------------------- specs


@dataclass(frozen=True, kw_only=True)
class PatchMergerSpec(ProjectorSpec):
    """``kind="patch_merger"``: the Qwen-VL ``m x m`` merger (norm, concat, Linear-GELU-Linear).

    Attributes:
        merge_size: the block side ``m`` (Qwen's ``spatial_merge_size``, 2).
        norm: ``"layernorm"`` (Qwen2-VL, Qwen3-VL) or ``"rmsnorm"`` (Qwen2.5-VL).
        postshuffle_norm: norm the concatenated ``m^2 C`` vector instead of each token (Qwen3-VL's
            DeepStack mergers, ``use_postshuffle_norm=True``).
        hidden_dim: the width between the two Linears; ``None`` (Qwen): ``m^2 C``.
        norm_eps: the norm's epsilon (Qwen: ``1e-6``).

    Examples:
        >>> PatchMergerSpec(norm="rmsnorm").to_dict()["norm"]
        'rmsnorm'
    """

    kind: str = field(default="patch_merger", init=False)
    merge_size: int = 2
    norm: str = "layernorm"
    postshuffle_norm: bool = False
    hidden_dim: int | None = None
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.merge_size, "merge_size")
        check_choice(self.norm, "norm", MERGER_NORMS)
        check_bool(self.postshuffle_norm, "postshuffle_norm")
        check_optional_int(self.hidden_dim, "hidden_dim", minimum=1)
        object.__setattr__(self, "norm_eps", check_positive_float(self.norm_eps, "norm_eps"))


@dataclass(frozen=True, kw_only=True)
class Mistral3MergerSpec(ProjectorSpec):
    """``kind="mistral3_merger"``: Mistral 3's projector (RMSNorm, ``m x m`` unfold merge,
    Linear-GELU-Linear).

    Attributes:
        merge_size: the block side ``m`` (``Mistral3Config.spatial_merge_size``, 2).
        norm_eps: the RMSNorm epsilon (Mistral 3 uses the text model's ``rms_norm_eps``,
            ``1e-5`` for Mistral-Small-3.1).
        bias: biases on the two Linears after the merge (``multimodal_projector_bias``, False);
            the merging Linear never has one.

    Examples:
        >>> Mistral3MergerSpec().parameters()
        {'merge_size': 2, 'norm_eps': 1e-05, 'bias': False}
    """

    kind: str = field(default="mistral3_merger", init=False)
    merge_size: int = 2
    norm_eps: float = 1e-5
    bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.merge_size, "merge_size")
        object.__setattr__(self, "norm_eps", check_positive_float(self.norm_eps, "norm_eps"))
        check_bool(self.bias, "bias")


#: Qwen2-VL's merger (``qwen2_vl.PatchMerger``).
QWEN2_VL_MERGER = PatchMergerSpec()
#: Qwen2.5-VL's merger (``qwen2_5_vl.Qwen2_5_VLPatchMerger``): RMSNorm.
QWEN2_5_VL_MERGER = PatchMergerSpec(norm="rmsnorm")
#: Qwen3-VL's final merger (``Qwen3VLVisionPatchMerger(use_postshuffle_norm=False)``).
QWEN3_VL_MERGER = PatchMergerSpec()
#: Qwen3-VL's DeepStack mergers (``Qwen3VLVisionPatchMerger(use_postshuffle_norm=True)``).
QWEN3_VL_DEEPSTACK_MERGER = PatchMergerSpec(postshuffle_norm=True)
#: Mistral 3's projector as in Mistral-Small-3.1 (``Mistral3MultiModalProjector``).
MISTRAL3_MERGER = Mistral3MergerSpec()


# ---------------------------------------------------------------------------- modules


class _RMSNorm(nn.Module):
    """``w * (x / sqrt(mean(x^2) + eps))``: ``[..., C] -> [..., C]``.

    Computed in fp32 and rounded to the input's dtype before the weight multiplies, as Qwen2.5-VL's
    and Mistral 3's RMSNorm (so bf16 results match theirs, not only fp32 ones).
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, tokens: Tensor) -> Tensor:
        wide = tokens.to(torch.float32)
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _BlockMerger(GridProjector):
    """The grid bookkeeping both mergers share: ``(h, w) -> (h / m, w / m)``."""

    merge_size: int
    in_dim: int

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``(h / m, w / m)``.

        Raises:
            ValueError: a side of ``grid`` is not a multiple of the merge size ``m``.
            TypeError: ``grid`` is not a pair of ints.
        """
        height, width = check_int_pair(grid, "grid")
        size = self.merge_size
        if height % size or width % size:
            raise ValueError(
                f"the {size}x{size} {type(self).__name__} needs a grid whose sides are multiples "
                f"of {size}, got a {height}x{width} grid; resize the image (or resample the "
                "tokens) to such a grid"
            )
        return height // size, width // size

    def _check_tokens(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[int, int]:
        merged = self.output_grid(grid)
        if (
            tokens.dim() != 3
            or tokens.shape[1] != grid[0] * grid[1]
            or tokens.shape[2] != self.in_dim
        ):
            raise ValueError(
                f"tokens must be [batch, {grid[0]}*{grid[1]}, {self.in_dim}] for the "
                f"{grid[0]}x{grid[1]} grid, got {tuple(tokens.shape)}"
            )
        return merged


class PatchMerger(_BlockMerger):
    """The Qwen-VL patch merger: ``[B, h*w, C]`` (raster) ``-> [B, (h/m)*(w/m), D]``.

    Parameters (our names): ``norm`` (``[C]``, or ``[m^2 C]`` after the shuffle; a LayerNorm also
    has a bias), ``fc1`` (``[H, m^2 C]`` + bias), ``fc2`` (``[D, H]`` + bias). See the module
    docstring for the equations and :class:`PatchMergerSpec` for the arguments.

    Args:
        in_dim: the input width ``C``.
        out_dim: the output width ``D``.
        merge_size: the block side ``m`` (see :class:`PatchMergerSpec`).
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        postshuffle_norm: norm the merged ``m^2 C`` vector instead of each token.
        hidden_dim: the width between the Linears; ``None``: ``m^2 C``.
        norm_eps: the norm's epsilon.

    Raises:
        TypeError: a width or parameter of the wrong type (the spec's checks).
        ValueError: a width or parameter out of range.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        merge_size: int = 2,
        norm: str = "layernorm",
        postshuffle_norm: bool = False,
        hidden_dim: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        spec = PatchMergerSpec(
            merge_size=merge_size,
            norm=norm,
            postshuffle_norm=postshuffle_norm,
            hidden_dim=hidden_dim,
            norm_eps=norm_eps,
        )
        self.in_dim = check_positive_int(in_dim, "in_dim")
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.merge_size = spec.merge_size
        self.postshuffle_norm = spec.postshuffle_norm
        merged = in_dim * merge_size**2
        hidden = merged if spec.hidden_dim is None else spec.hidden_dim
        normed = merged if postshuffle_norm else in_dim
        if spec.norm == "layernorm":
            self.norm = nn.LayerNorm(normed, eps=spec.norm_eps)
        else:
            self.norm = _RMSNorm(normed, spec.norm_eps)
        self.fc1 = nn.Linear(merged, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, C]`` in raster order -> ``[B, (h/m)*(w/m), D]`` in raster order."""
        rows, columns = self._check_tokens(tokens, grid)
        if not self.postshuffle_norm:
            tokens = self.norm(tokens)
        size = self.merge_size
        merged = rearrange(
            tokens, "b (h p w q) c -> b (h w) (p q c)", h=rows, p=size, w=columns, q=size
        )
        if self.postshuffle_norm:
            merged = self.norm(merged)
        return self.fc2(self.act(self.fc1(merged)))


class Mistral3Projector(_BlockMerger):
    """Mistral 3's projector: ``[B, h*w, C]`` (raster) ``-> [B, (h/m)*(w/m), D]``.

    Parameters (our names): ``norm`` (RMSNorm ``[C]``), ``merge`` (``[C, C m^2]``, no bias),
    ``fc1`` (``[D, C]``), ``fc2`` (``[D, D]``), the last two with biases only when ``bias``.
    See the module docstring for the equations.

    Args:
        in_dim: the input width ``C``.
        out_dim: the output width ``D``.
        merge_size: the block side ``m`` (see :class:`Mistral3MergerSpec`).
        norm_eps: the RMSNorm epsilon.
        bias: biases on the two Linears after the merge.

    Raises:
        TypeError: a width or parameter of the wrong type (the spec's checks).
        ValueError: a width or parameter out of range.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        merge_size: int = 2,
        norm_eps: float = 1e-5,
        bias: bool = False,
    ) -> None:
        super().__init__()
        spec = Mistral3MergerSpec(merge_size=merge_size, norm_eps=norm_eps, bias=bias)
        self.in_dim = check_positive_int(in_dim, "in_dim")
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.merge_size = spec.merge_size
        self.norm = _RMSNorm(in_dim, spec.norm_eps)
        self.merge = nn.Linear(in_dim * merge_size**2, in_dim, bias=False)
        self.fc1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, C]`` in raster order -> ``[B, (h/m)*(w/m), D]`` in raster order."""
        rows, columns = self._check_tokens(tokens, grid)
        size = self.merge_size
        # Channel-major inside a block, as torch's unfold orders Mistral 3's merged vector.
        blocks = rearrange(
            self.norm(tokens), "b (h p w q) c -> b (h w) (c p q)", h=rows, p=size, w=columns, q=size
        )
        return self.fc2(self.act(self.fc1(self.merge(blocks))))


register_projector("patch_merger", PatchMerger, spec=PatchMergerSpec)
register_projector("mistral3_merger", Mistral3Projector, spec=Mistral3MergerSpec)


# ---------------------------------------------------------------------------- HF weights


def _rename(
    state: Mapping[str, Tensor],
    prefix: str,
    names: Mapping[str, str],
    optional: tuple[str, ...],
    module: str,
) -> dict[str, Tensor]:
    """``names`` (HF key -> ours) applied to the keys of ``state`` under ``prefix``."""
    found = weights_under_prefix(state, prefix, required=False)
    missing = sorted(key for key in names if key not in found and key not in optional)
    unexpected = sorted(key for key in found if key not in names)
    if missing or unexpected:
        raise ValueError(
            f"the weights under prefix {prefix!r} do not fit HF's {module}: missing keys "
            f"{[prefix + key for key in missing]}, unexpected keys "
            f"{[prefix + key for key in unexpected]}"
        )
    return {names[key]: value for key, value in found.items()}


def _merged_width(norm: int, fc1_in: int, what: str) -> None:
    ratio = fc1_in // norm if norm and fc1_in % norm == 0 else 0
    if not ratio or math.isqrt(ratio) ** 2 != ratio:
        raise ValueError(
            f"{what}: the first Linear takes {fc1_in} inputs, which is not m^2 times the norm's "
            f"width {norm} for any merge size m"
        )


def _check_merger_shapes(merger: dict[str, Tensor], module: str) -> dict[str, Tensor]:
    """The Qwen layout's shapes agree with each other (a checkpoint of one merger, not parts)."""
    width = merger["norm.weight"].shape[0]
    hidden, merged = merger["fc1.weight"].shape
    out = merger["fc2.weight"].shape[0]
    expected = {
        "norm.weight": (width,),
        "fc1.weight": (hidden, merged),
        "fc1.bias": (hidden,),
        "fc2.weight": (out, hidden),
        "fc2.bias": (out,),
    }
    if "norm.bias" in merger:
        expected["norm.bias"] = (width,)
    problems = shape_problems({key: value.shape for key, value in merger.items()}, expected)
    if problems:
        raise ValueError(f"HF's {module} weights are inconsistent: " + "; ".join(problems))
    # Pre-shuffle: the norm is C wide and fc1 takes m^2 C; post-shuffle: both m^2 C (ratio 1).
    _merged_width(width, merged, f"HF's {module} weights")
    return merger


_QWEN2_NAMES = {
    "ln_q.weight": "norm.weight",
    "mlp.0.weight": "fc1.weight",
    "mlp.0.bias": "fc1.bias",
    "mlp.2.weight": "fc2.weight",
    "mlp.2.bias": "fc2.bias",
}


def qwen2_vl_merger_state_from_hf(
    state: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """A :class:`PatchMerger` state dict (:data:`QWEN2_VL_MERGER`) from HF's Qwen2-VL
    ``PatchMerger``.

    Keys ``ln_q.{weight,bias}``, ``mlp.0.*``, ``mlp.2.*`` become ``norm.*``, ``fc1.*``, ``fc2.*``.

    Args:
        state: a state dict holding the merger's weights (the whole model's is fine).
        prefix: where the merger sits in ``state``, with its trailing dot
            (``"model.visual.merger."`` in ``Qwen2VLForConditionalGeneration``); keys outside it
            are ignored.

    Raises:
        ValueError: keys under ``prefix`` are missing or unexpected (the message lists them), or
            the shapes do not form one merger.
        TypeError: ``state`` is no mapping or ``prefix`` no str.
    """
    names = {**_QWEN2_NAMES, "ln_q.bias": "norm.bias"}
    merger = _rename(state, prefix, names, (), "qwen2_vl.PatchMerger")
    return _check_merger_shapes(merger, "qwen2_vl.PatchMerger")


def qwen2_5_vl_merger_state_from_hf(
    state: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """A :class:`PatchMerger` state dict (:data:`QWEN2_5_VL_MERGER`) from HF's
    ``Qwen2_5_VLPatchMerger``: ``ln_q.weight`` (RMSNorm, no bias), ``mlp.0.*``, ``mlp.2.*``.

    Args:
        state: a state dict holding the merger's weights.
        prefix: the merger's prefix with its trailing dot (``"model.visual.merger."`` in
            ``Qwen2_5_VLForConditionalGeneration``).

    Raises:
        ValueError: missing or unexpected keys under ``prefix`` (a LayerNorm bias ``ln_q.bias``
            means a Qwen2-VL merger), or shapes that do not form one merger.
        TypeError: ``state`` is no mapping or ``prefix`` no str.
    """
    merger = _rename(state, prefix, _QWEN2_NAMES, (), "qwen2_5_vl.Qwen2_5_VLPatchMerger")
    return _check_merger_shapes(merger, "qwen2_5_vl.Qwen2_5_VLPatchMerger")


def qwen3_vl_merger_state_from_hf(
    state: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """A :class:`PatchMerger` state dict from HF's ``Qwen3VLVisionPatchMerger``.

    Keys ``norm.*``, ``linear_fc1.*``, ``linear_fc2.*`` become ``norm.*``, ``fc1.*``, ``fc2.*``.
    The final merger (prefix ``"model.visual.merger."``) loads into :data:`QWEN3_VL_MERGER`,
    each DeepStack merger (``"model.visual.deepstack_merger_list.<i>."``) into
    :data:`QWEN3_VL_DEEPSTACK_MERGER` (its norm is ``m^2`` times wider).

    Raises:
        ValueError: missing or unexpected keys under ``prefix`` or inconsistent shapes.
        TypeError: ``state`` is no mapping or ``prefix`` no str.
    """
    names = {
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
        "linear_fc1.weight": "fc1.weight",
        "linear_fc1.bias": "fc1.bias",
        "linear_fc2.weight": "fc2.weight",
        "linear_fc2.bias": "fc2.bias",
    }
    merger = _rename(state, prefix, names, (), "qwen3_vl.Qwen3VLVisionPatchMerger")
    return _check_merger_shapes(merger, "qwen3_vl.Qwen3VLVisionPatchMerger")


def mistral3_projector_state_from_hf(
    state: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """A :class:`Mistral3Projector` state dict from HF's ``Mistral3MultiModalProjector``.

    Keys ``norm.weight``, ``patch_merger.merging_layer.weight``, ``linear_1.*``, ``linear_2.*``
    become ``norm.weight``, ``merge.weight``, ``fc1.*``, ``fc2.*``. The Linear biases are there
    only when the model was made with ``multimodal_projector_bias=True`` (then build the
    projector with ``Mistral3MergerSpec(bias=True)``): both or neither.

    Args:
        state: a state dict holding the projector's weights.
        prefix: the projector's prefix with its trailing dot (``"model.multi_modal_projector."``
            in ``Mistral3ForConditionalGeneration``).

    Raises:
        ValueError: missing or unexpected keys under ``prefix`` (one bias without the other
            included) or inconsistent shapes.
        TypeError: ``state`` is no mapping or ``prefix`` no str.
    """
    module = "mistral3.Mistral3MultiModalProjector"
    names = {
        "norm.weight": "norm.weight",
        "patch_merger.merging_layer.weight": "merge.weight",
        "linear_1.weight": "fc1.weight",
        "linear_1.bias": "fc1.bias",
        "linear_2.weight": "fc2.weight",
        "linear_2.bias": "fc2.bias",
    }
    biases = ("linear_1.bias", "linear_2.bias")
    projector = _rename(state, prefix, names, biases, module)
    if ("fc1.bias" in projector) != ("fc2.bias" in projector):
        present = "linear_1.bias" if "fc1.bias" in projector else "linear_2.bias"
        raise ValueError(
            f"HF's {module} weights under prefix {prefix!r} have {prefix + present} but not the "
            "other Linear's bias; multimodal_projector_bias gives both Linears a bias or neither"
        )
    width = projector["norm.weight"].shape[0]
    out = projector["fc1.weight"].shape[0]
    merged = projector["merge.weight"].shape[1]
    expected = {
        "norm.weight": (width,),
        "merge.weight": (width, merged),
        "fc1.weight": (out, width),
        "fc2.weight": (out, out),
    }
    if "fc1.bias" in projector:
        expected |= {"fc1.bias": (out,), "fc2.bias": (out,)}
    problems = shape_problems({key: value.shape for key, value in projector.items()}, expected)
    if problems:
        raise ValueError(f"HF's {module} weights are inconsistent: " + "; ".join(problems))
    _merged_width(width, merged, f"HF's {module} weights")
    return projector


# ---------------------------------------------------------------------------- presets

_DCI_CLIP = DCISpec(final_layer=23, groups=(tuple(range(0, 12)), tuple(range(12, 24))))
_CLIP_DCI_FIELDS: dict[str, Any] = {
    "vision_dim": 1024,
    "llm_dim": 4096,
    "num_layers": 24,
    "fusion": _DCI_CLIP,
}
for _name, _projector in (
    ("dc-dci+qwen2-merger-clip-l-336", QWEN2_VL_MERGER),
    ("dc-dci+qwen2.5-merger-clip-l-336", QWEN2_5_VL_MERGER),
    ("dc-dci+mistral3-merger-clip-l-336", MISTRAL3_MERGER),
):
    # The official DCI fusion on CLIP-L/336 (3072 channels, 24x24), merged 2x2 to 12x12 = 144
    # tokens for a 4096-wide LLM (Vicuna-7B, as the Dense Connector presets).
    register_preset(_name, {**_CLIP_DCI_FIELDS, "projector": _projector}, geometry=CLIP_L_336)
