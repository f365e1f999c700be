"""Pooled projectors: Gemma 3's average-pool + RMSNorm + matmul, LLaVA-OneVision's MLP + bilinear.

Two connectors that shrink the token grid by pooling it, one before and one after projecting.

**Gemma 3** (``kind="gemma3_pool"``, :class:`Gemma3PoolSpec`; Gemma Team, "Gemma 3 Technical
Report", 2025; Hugging Face ``transformers/models/gemma3/modeling_gemma3.py``,
``Gemma3MultiModalProjector`` with ``Gemma3RMSNorm``). For fused tokens ``X`` ``[B, h*w, C]`` on
the ``(h, w)`` grid and the output grid ``(H, W)`` of the spec, with the kernel
``(kh, kw) = (h / H, w / W)`` (whole numbers, else the grid is refused)::

    P[b, i, j]  = mean over kh x kw block (i, j) of X        (average pooling, stride = kernel)
    N           = P / sqrt(mean_c(P^2) + eps) * (1 + g)      (Gemma RMSNorm: g stored as an offset)
    Y           = N @ M                                      (M: [C, D], no bias)

``[B, h*w, C] -> [B, H*W, D]``. Gemma 3 itself pools SigLIP's 64x64 grid (896 px / 14) to 16x16
(``mm_tokens_per_image=256``, kernel 4). Hugging Face derives the kernel from the config as
``patches_per_side // tokens_per_side`` and assumes a square grid, so a grid that does not divide
evenly would silently lose its last rows and columns (``AvgPool2d`` floors); here the same rule
applies to each side separately (non-square grids and output grids are welcome) and a grid that
does not divide exactly by the output grid raises ``ValueError`` from ``num_tokens`` /
``output_grid``, before anything runs. The RMSNorm runs in float32 and casts back, as
Gemma's does. Hugging Face initialises ``M`` to zeros (checkpoints fill it); ours starts like an
``nn.Linear`` (uniform in ``+-1/sqrt(C)``) so a connector trained from scratch gets a gradient in
every parameter from the first step.

**LLaVA-OneVision** (``kind="onevision_pool"``, :class:`OnevisionPoolSpec`; Li et al.,
"LLaVA-OneVision: Easy Visual Task Transfer", 2024; Hugging Face
``transformers/models/llava_onevision/modeling_llava_onevision.py``,
``LlavaOnevisionMultiModalProjector`` and ``LlavaOnevisionModel.apply_pooling``; the original
``LLaVA-VL/LLaVA-NeXT`` ``llava/model/llava_arch.py``, ``get_2dPool`` with
``mm_spatial_pool_mode="bilinear"``), the path OneVision's video frames take::

    Z = Linear_N(act(... act(Linear_1(X))))                  (LLaVA's mlpNx_gelu, N = depth)
    Y = bilinear_resize(Z on the (h, w) grid, (ceil(h / s), ceil(w / s)))

with ``s = stride`` (2 in OneVision) and ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False, antialias=False)``, the arguments OneVision uses (it passes neither, so both
take their defaults). ``[B, h*w, C] -> [B, ceil(h/s) * ceil(w/s), D]``: SigLIP's 27x27 grid
becomes 14x14 (196 tokens). Every grid is accepted. The Linears are named ``linear_1``,
``linear_2``, ... as in Hugging Face's projector, so its weights load by key.

Converters: :func:`gemma3_pool_state_from_hf` and :func:`onevision_pool_state_from_hf` read the
Hugging Face modules' state-dict keys (under ``prefix``, e.g. ``"model.multi_modal_projector."``
inside ``Gemma3ForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration``).

Examples:
    >>> from mmconnect import build_projector
    >>> pool = build_projector(Gemma3PoolSpec(grid=16), in_dim=8, out_dim=16)
    >>> pool.num_tokens((64, 64)), pool.output_grid((64, 32))
    (256, (16, 16))
    >>> build_projector(OnevisionPoolSpec(), in_dim=8, out_dim=16).output_grid((27, 27))
    (14, 14)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect.checkpoint import shape_problems, weights_under_prefix
from mmconnect.fusion import DCISpec, SingleLayerSpec
from mmconnect.presets import SIGLIP_SO400M_384, EncoderGeometry, register_preset
from mmconnect.projectors import MLP_ACTIVATIONS, GridProjector, ProjectorSpec, register_projector
from mmconnect.validation import (
    check_bool,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_size_pair,
)

__all__ = [
    "GEMMA3_SIGLIP_SO400M_896",
    "Gemma3PoolSpec",
    "Gemma3PooledProjector",
    "OnevisionPoolSpec",
    "OnevisionPooledProjector",
    "gemma3_pool_state_from_hf",
    "onevision_pool_state_from_hf",
]


# --------------------------------------------------------------------------------- Gemma 3


@dataclass(frozen=True, kw_only=True)
class Gemma3PoolSpec(ProjectorSpec):
    """``kind="gemma3_pool"``: average-pool to ``grid``, Gemma RMSNorm, a bias-free matmul.

    Attributes:
        grid: the output token grid, ``(height, width)`` or one int for a square grid (Gemma 3:
            16, i.e. ``mm_tokens_per_image=256``); each input side must be a multiple of it.
        eps: the RMSNorm epsilon (Gemma 3: the SigLIP tower's ``layer_norm_eps``, 1e-6).

    Examples:
        >>> Gemma3PoolSpec(grid=16).to_dict()
        {'kind': 'gemma3_pool', 'grid': [16, 16], 'eps': 1e-06}
    """

    kind: str = field(default="gemma3_pool", init=False)
    grid: tuple[int, int] = (16, 16)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "grid", check_size_pair(self.grid, "grid"))
        object.__setattr__(self, "eps", check_positive_float(self.eps, "eps"))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the grid as a list)."""
        return {"kind": self.kind, "grid": list(self.grid), "eps": self.eps}


class _GemmaRMSNorm(nn.Module):
    """RMSNorm with the scale stored as an offset from 1: ``x / rms(x) * (1 + weight)``.

    Computed in float32 and cast back to the input dtype (Gemma multiplies before the cast).
    ``[..., C] -> [..., C]``.
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, tokens: Tensor) -> Tensor:
        x = tokens.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(tokens)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Gemma3PooledProjector(GridProjector):
    """Gemma 3's projector: ``[B, h*w, in_dim] -> [B, H*W, out_dim]`` for the output grid ``(H, W)``.

    Parameters: ``norm.weight`` ``[in_dim]`` (the RMSNorm scale offset, zeros = scale 1) and
    ``projection`` ``[in_dim, out_dim]`` (applied as ``tokens @ projection``, Hugging Face's
    ``mm_input_projection_weight`` layout).

    Args:
        in_dim: the fused width ``C``.
        out_dim: the LLM width ``D``.
        grid: the output grid ``(H, W)``.
        eps: the RMSNorm epsilon.
    """

    def __init__(self, in_dim: int, out_dim: int, *, grid: tuple[int, int], eps: float) -> None:
        super().__init__()
        self.grid = check_size_pair(grid, "grid")
        self.norm = _GemmaRMSNorm(in_dim, eps)
        self.projection = nn.Parameter(torch.empty(in_dim, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.projection, -bound, bound)

    def kernel(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The pooling kernel (= stride) ``(h / H, w / W)`` for an input grid ``(h, w)``.

        Raises:
            ValueError: a side of ``grid`` is no multiple of the output grid's side.
        """
        height, width = check_size_pair(grid, "grid")
        out_height, out_width = self.grid
        if height % out_height or width % out_width:
            raise ValueError(
                f"gemma3_pool cannot average-pool the {height}x{width} token grid to its "
                f"{out_height}x{out_width} output grid: each side must be a whole multiple of the "
                f"output side ({height} % {out_height} = {height % out_height}, {width} % "
                f"{out_width} = {width % out_width}); choose a Gemma3PoolSpec grid that divides "
                "the encoder grid"
            )
        return height // out_height, width // out_width

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)``, the spec's grid, for every input grid it divides (else ``ValueError``)."""
        self.kernel(grid)
        return self.grid

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, in_dim]`` in raster order -> ``[B, H*W, out_dim]`` in raster order."""
        kernel = self.kernel(grid)
        maps = rearrange(tokens, "b (h w) c -> b c h w", h=grid[0], w=grid[1]).contiguous()
        pooled = F.avg_pool2d(maps, kernel_size=kernel, stride=kernel)
        normed = self.norm(rearrange(pooled, "b c h w -> b (h w) c"))
        return torch.matmul(normed, self.projection).type_as(tokens)


def _build_gemma3_pool(
    in_dim: int, out_dim: int, *, grid: tuple[int, int], eps: float
) -> Gemma3PooledProjector:
    return Gemma3PooledProjector(in_dim, out_dim, grid=grid, eps=eps)


_GEMMA3_HF_KEYS = {
    "mm_soft_emb_norm.weight": "norm.weight",
    "mm_input_projection_weight": "projection",
}


def gemma3_pool_state_from_hf(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our :class:`Gemma3PooledProjector` state dict from ``Gemma3MultiModalProjector`` weights.

    ``mm_soft_emb_norm.weight`` -> ``norm.weight`` (both offsets from 1) and
    ``mm_input_projection_weight`` ``[C, D]`` -> ``projection`` (same layout). Keys outside
    ``prefix`` are ignored (pass a whole model's state dict with
    ``prefix="model.multi_modal_projector."``).

    Raises:
        ValueError: a key is missing or unexpected under ``prefix``, or the two widths disagree
            (the message lists every problem).
    """
    found = weights_under_prefix(state, prefix)
    problems = [f"missing {prefix}{key}" for key in _GEMMA3_HF_KEYS if key not in found]
    problems += [f"unexpected {prefix}{key}" for key in found if key not in _GEMMA3_HF_KEYS]
    if not problems:
        width = found["mm_soft_emb_norm.weight"].shape
        weight = found["mm_input_projection_weight"].shape
        if len(width) != 1 or len(weight) != 2 or weight[0] != width[0]:
            problems.append(
                f"{prefix}mm_input_projection_weight {tuple(weight)} must be [C, D] with C the "
                f"width of {prefix}mm_soft_emb_norm.weight {tuple(width)}"
            )
    if problems:
        raise ValueError("Gemma3MultiModalProjector weights do not fit: " + "; ".join(problems))
    return {ours: found[theirs] for theirs, ours in _GEMMA3_HF_KEYS.items()}


# ------------------------------------------------------------------------- LLaVA-OneVision


@dataclass(frozen=True, kw_only=True)
class OnevisionPoolSpec(ProjectorSpec):
    """``kind="onevision_pool"``: LLaVA's MLP, then a bilinear resize to ``ceil(h/s) x ceil(w/s)``.

    Attributes:
        depth: the number of Linears (OneVision: 2, ``mlp2x_gelu``).
        activation: one of :data:`mmconnect.projectors.MLP_ACTIVATIONS` (OneVision: ``"gelu"``,
            exact erf).
        bias: whether the Linears have biases (OneVision's ``multimodal_projector_bias``: True).
        stride: the pooling stride ``s`` (OneVision: 2).

    Examples:
        >>> OnevisionPoolSpec().to_dict()
        {'kind': 'onevision_pool', 'depth': 2, 'activation': 'gelu', 'bias': True, 'stride': 2}
    """

    kind: str = field(default="onevision_pool", init=False)
    depth: int = 2
    activation: str = "gelu"
    bias: bool = True
    stride: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.depth, "depth")
        check_choice(self.activation, "activation", tuple(MLP_ACTIVATIONS))
        check_bool(self.bias, "bias")
        check_positive_int(self.stride, "stride")


class OnevisionPooledProjector(GridProjector):
    """OneVision's projector + pooling: ``[B, h*w, in_dim] -> [B, ceil(h/s)*ceil(w/s), out_dim]``.

    Modules: ``linear_1`` (``in_dim -> out_dim``), then ``act`` and ``linear_k`` (``out_dim ->
    out_dim``) for ``k = 2 .. depth``, as Hugging Face's ``LlavaOnevisionMultiModalProjector``.

    Args:
        in_dim: the fused width ``C``.
        out_dim: the LLM width ``D``.
        depth: the number of Linears.
        activation: the activation between them.
        bias: whether the Linears have biases.
        stride: the pooling stride ``s``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, depth: int, activation: str, bias: bool, stride: int
    ) -> None:
        super().__init__()
        self.depth = check_positive_int(depth, "depth")
        self.stride = check_positive_int(stride, "stride")
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = MLP_ACTIVATIONS[check_choice(activation, "activation", tuple(MLP_ACTIVATIONS))]()
        for index in range(2, depth + 1):
            self.add_module(f"linear_{index}", nn.Linear(out_dim, out_dim, bias=bias))

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``(ceil(h / s), ceil(w / s))``: 27x27 -> 14x14, 24x24 -> 12x12 at ``s = 2``."""
        height, width = check_size_pair(grid, "grid")
        return math.ceil(height / self.stride), math.ceil(width / self.stride)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, in_dim]`` in raster order -> ``[B, ceil(h/s)*ceil(w/s), out_dim]``."""
        target = self.output_grid(grid)
        hidden = self.linear_1(tokens)
        for index in range(2, self.depth + 1):
            hidden = getattr(self, f"linear_{index}")(self.act(hidden))
        maps = rearrange(hidden, "b (h w) d -> b d h w", h=grid[0], w=grid[1]).contiguous()
        pooled = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        return rearrange(pooled, "b d h w -> b (h w) d")


def _build_onevision_pool(
    in_dim: int, out_dim: int, *, depth: int, activation: str, bias: bool, stride: int
) -> OnevisionPooledProjector:
    return OnevisionPooledProjector(
        in_dim, out_dim, depth=depth, activation=activation, bias=bias, stride=stride
    )


def onevision_pool_state_from_hf(
    state: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """Our :class:`OnevisionPooledProjector` state dict from ``LlavaOnevisionMultiModalProjector``.

    The keys are the same (``linear_1.weight``, ``linear_1.bias``, ``linear_2.weight``, ...); the
    pooling has no weights. Keys outside ``prefix`` are ignored (a whole model's state dict with
    ``prefix="model.multi_modal_projector."``).

    Raises:
        ValueError: no ``linear_1`` weight, a gap in the Linears, keys other than Linear weights
            and biases, biases on some Linears only, or widths that do not chain (the message
            lists every problem).
    """
    found = weights_under_prefix(state, prefix)
    linears = sorted(
        {int(key.split(".")[0][len("linear_") :]) for key in found if _is_linear_key(key)}
    )
    depth = len(linears)
    problems = [f"unexpected {prefix}{key}" for key in found if not _is_linear_key(key)]
    if depth == 0 or linears != list(range(1, depth + 1)):
        problems.append(
            f"expected {prefix}linear_1.weight, {prefix}linear_2.weight, ... without gaps, found "
            f"Linears {linears}"
        )
    if not problems:
        weight = found["linear_1.weight"]
        out_dim = weight.shape[0]
        with_bias = "linear_1.bias" in found
        expected = {"linear_1.weight": (out_dim, weight.shape[1])}
        expected |= {f"linear_{k}.weight": (out_dim, out_dim) for k in range(2, depth + 1)}
        if with_bias:
            expected |= {f"linear_{k}.bias": (out_dim,) for k in range(1, depth + 1)}
        saved = {key: tuple(value.shape) for key, value in found.items()}
        problems += [
            f"{problem} (under {prefix!r})" if prefix else problem
            for problem in shape_problems(saved, expected)
        ]
    if problems:
        raise ValueError(
            "LlavaOnevisionMultiModalProjector weights do not fit: " + "; ".join(problems)
        )
    return dict(found)


def _is_linear_key(key: str) -> bool:
    name, _, leaf = key.partition(".")
    return (
        name.startswith("linear_")
        and name[len("linear_") :].isdigit()
        and leaf in ("weight", "bias")
    )


register_projector("gemma3_pool", _build_gemma3_pool, spec=Gemma3PoolSpec)
register_projector("onevision_pool", _build_onevision_pool, spec=OnevisionPoolSpec)


# ---------------------------------------------------------------------------------- presets

#: Gemma 3's vision tower: SigLIP-SO400M at 896 px, patch 14 (a 64x64 grid), all 27 blocks.
GEMMA3_SIGLIP_SO400M_896 = EncoderGeometry(
    image_size=896, patch_size=14, num_layers=27, num_prefix_tokens=0, width=1152
)
_SIGLIP_DCI = DCISpec(final_layer=26, groups=(tuple(range(0, 13)), tuple(range(13, 26))))
_SIGLIP: dict[str, Any] = {"vision_dim": 1152, "num_layers": 27}

for _name, _fields, _geometry in (
    (  # Gemma 3 4B: the tower's last layer, 64x64 -> 16x16, to Gemma 3 4B's width 2560
        "baseline+gemma3-pool-siglip-so400m-896",
        {
            **_SIGLIP,
            "llm_dim": 2560,
            "fusion": SingleLayerSpec(final_layer=27),
            "projector": Gemma3PoolSpec(grid=(16, 16)),
        },
        GEMMA3_SIGLIP_SO400M_896,
    ),
    (  # Dense Connector DCI on SigLIP-384's 27x27 grid, pooled 3x3 to 9x9 (27 has no 16 divisor)
        "dc-dci+gemma3-pool-siglip-so400m",
        {
            **_SIGLIP,
            "llm_dim": 4096,
            "fusion": _SIGLIP_DCI,
            "projector": Gemma3PoolSpec(grid=(9, 9)),
        },
        SIGLIP_SO400M_384,
    ),
    (  # LLaVA-OneVision-7B's video path: H[26] of SigLIP-384, mlp2x_gelu to Qwen2-7B, 27 -> 14
        "baseline+onevision-pool-siglip-so400m",
        {
            **_SIGLIP,
            "llm_dim": 3584,
            "fusion": SingleLayerSpec(final_layer=26),
            "projector": OnevisionPoolSpec(),
        },
        SIGLIP_SO400M_384,
    ),
    (  # Dense Connector DCI feeding OneVision's MLP + 2x2 bilinear pooling: 27x27 -> 14x14
        "dc-dci+onevision-pool-siglip-so400m",
        {
            **_SIGLIP,
            "llm_dim": 4096,
            "fusion": _SIGLIP_DCI,
            "projector": OnevisionPoolSpec(),
        },
        SIGLIP_SO400M_384,
    ),
):
    register_preset(_name, _fields, geometry=_geometry)
