"""Idefics2's connector: a SwiGLU projection to the LLM width, then a Perceiver resampler.

Source: Laurençon et al., "What matters when building vision-language models?" (Idefics2,
2024), section 2; Hugging Face transformers ``models/idefics2/modeling_idefics2.py``
(``Idefics2Connector`` = ``Idefics2MLP`` ``modality_projection`` followed by
``Idefics2PerceiverResampler``). Written here from that definition.

Equations, for fused tokens ``x`` ``[B, N, C]`` (``C = in_dim``, ``D = out_dim`` the LLM width,
``act`` the spec's activation, SiLU in Idefics2)::

    c   = W_down (act(W_gate x) * W_up x)                 [B, N, D]     (SwiGLU, no biases)
    z_0 = Q                                               [B, L, D]     (L learned latents)
    for each of the `depth` blocks:
        a   = RMSNorm(z),  s = RMSNorm(c)
        kv  = concat([s, a]) along tokens                 [B, N + L, D] (context first)
        z   = z + W_o GQA(W_q a, W_k kv, W_v kv)          heads x head_dim, kv_heads shared
        z   = z + SwiGLU_4D(RMSNorm(z))                   (hidden width 4 D)
    out = RMSNorm(z)                                      [B, L, D]

``RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)`` computed in fp32 and cast back before the
weight, as HF's ``Idefics2RMSNorm``. ``GQA`` is softmax attention with scale
``head_dim ** -0.5``, each key / value head serving ``heads / kv_heads`` consecutive query heads
(HF's ``repeat_kv``); the softmax runs in fp32 and is cast back to the input dtype, as HF's
eager attention. Each block normalises the (projected) context afresh from ``c``; the latents
attend to the context and to themselves.

Token contract: the output is ``L = n_latents`` tokens whatever the input grid; learned latents
form no spatial grid, so :meth:`PerceiverConnector.output_grid` is ``(0, 0)`` and the count lives
in :meth:`PerceiverConnector.num_tokens`. The latents read their input as a set (no position
information enters), so the input's token order does not matter.

Masks: Idefics2 passes a patch mask that is all ones for an unpadded image; HF then builds no
attention bias at all (``create_bidirectional_mask`` returns ``None``), exactly what this module
computes without ``mask``. Padded patches (Idefics2 batches images of different sizes on one
padded canvas) are the optional ``mask`` argument of :meth:`PerceiverConnector.forward`: masked
context tokens get ``finfo.min`` added to their scores, as HF's eager mask does.

Initialisation: HF fills the latents with ones (a value overwritten when weights load); here
they are drawn from ``N(0, 1)``, because identical latents give identical output tokens whose
gradients are identical too, so training from scratch (stage 1) could never tell them apart.

Examples:
    >>> from mmconnect import build_projector
    >>> spec = PerceiverSpec(n_latents=4, depth=1, heads=2, head_dim=8, kv_heads=1,
    ...                      intermediate_size=32)
    >>> connector = build_projector(spec, in_dim=12, out_dim=16)
    >>> connector.num_tokens((27, 27)), connector.output_grid((27, 27))
    (4, (0, 0))
    >>> connector(torch.randn(2, 6, 12), (2, 3)).shape
    torch.Size([2, 4, 16])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from mmconnect.checkpoint import shape_problems, weights_under_prefix
from mmconnect.fusion import DCISpec, SingleLayerSpec, STISpec
from mmconnect.presets import SIGLIP_SO400M_384, EncoderGeometry, register_preset
from mmconnect.projectors import (
    MLP_ACTIVATIONS,
    GridProjector,
    ProjectorSpec,
    register_projector,
)
from mmconnect.validation import (
    check_choice,
    check_int_pair,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "IDEFICS2_SIGLIP_SO400M_980",
    "PERCEIVER_MLP_RATIO",
    "PerceiverBlock",
    "PerceiverConnector",
    "PerceiverCrossAttention",
    "PerceiverSpec",
    "RMSNorm",
    "SwiGLU",
    "perceiver_spec_from_hf",
    "perceiver_state_from_hf",
]

#: The hidden width of each block's SwiGLU as a multiple of the latent width (HF fixes
#: ``intermediate_size=config.hidden_size * 4`` in ``Idefics2PerceiverLayer``).
PERCEIVER_MLP_RATIO = 4


@dataclass(frozen=True, kw_only=True)
class PerceiverSpec(ProjectorSpec):
    """``kind="perceiver"``: Idefics2's connector (SwiGLU projection + Perceiver resampler).

    The defaults are Idefics2-8B's (``HuggingFaceM4/idefics2-8b``: Mistral-7B's
    ``intermediate_size`` and ``hidden_act`` for the projection, the perceiver config's values
    for the rest); the widths come from the connector config (``vision_dim`` after fusion,
    ``llm_dim``, which is also the latents' width).

    Attributes:
        n_latents: the learned latents, i.e. the output token count (HF ``resampler_n_latents``).
        depth: Perceiver blocks (HF ``resampler_depth``).
        heads: query heads of the cross-attention (HF ``resampler_n_heads``).
        head_dim: width of each head (HF ``resampler_head_dim``); ``heads * head_dim`` need not
            equal ``llm_dim`` (Idefics2-8B: 16 x 96 = 1536 against 4096).
        kv_heads: key / value heads, each shared by ``heads / kv_heads`` query heads (HF
            ``num_key_value_heads``); must divide ``heads``.
        intermediate_size: hidden width of the projection's SwiGLU (HF
            ``text_config.intermediate_size``).
        activation: the SwiGLU gate activation of the projection and of every block, one of
            :data:`mmconnect.projectors.MLP_ACTIVATIONS` (HF ``hidden_act``; ``"gelu"`` is
            exact-erf, as HF's).
        rms_eps: the RMSNorms' epsilon (HF perceiver ``rms_norm_eps``; Idefics2-8B leaves it at
            the default ``1e-6``).

    Examples:
        >>> PerceiverSpec(n_latents=32).to_dict()["n_latents"]
        32
        >>> PerceiverSpec(heads=6, kv_heads=4)
        Traceback (most recent call last):
        ...
        ValueError: kv_heads must divide heads (each key/value head serves heads / kv_heads query heads), got heads=6, kv_heads=4
    """

    kind: str = field(default="perceiver", init=False)
    n_latents: int = 64
    depth: int = 3
    heads: int = 16
    head_dim: int = 96
    kv_heads: int = 4
    intermediate_size: int = 14336
    activation: str = "silu"
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_latents", "depth", "heads", "head_dim", "kv_heads", "intermediate_size"):
            check_positive_int(getattr(self, name), name)
        check_choice(self.activation, "activation", tuple(MLP_ACTIVATIONS))
        object.__setattr__(self, "rms_eps", check_positive_float(self.rms_eps, "rms_eps"))
        if self.heads % self.kv_heads:
            raise ValueError(
                "kv_heads must divide heads (each key/value head serves heads / kv_heads query "
                f"heads), got heads={self.heads}, kv_heads={self.kv_heads}"
            )


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2, -1) + eps)``: ``[..., D] -> [..., D]``.

    Normalised in fp32 and cast back to the input dtype before the weight multiplies, as HF's
    ``Idefics2RMSNorm`` (LLaMA's), so bf16 results round as HF's do.
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalised.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``down(act(gate(x)) * up(x))`` without biases: ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: str) -> None:
        super().__init__()
        self.gate = nn.Linear(in_dim, hidden_dim, bias=False)
        self.up = nn.Linear(in_dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, out_dim, bias=False)
        self.act = MLP_ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class PerceiverCrossAttention(nn.Module):
    """Latents attend to ``[context; latents]`` with grouped-query heads, without biases.

    ``latents [B, L, D]``, ``context [B, N, D]`` (both normalised) ``-> [B, L, D]``.
    """

    def __init__(self, width: int, heads: int, head_dim: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.scale = head_dim**-0.5
        self.query = nn.Linear(width, heads * head_dim, bias=False)
        self.key = nn.Linear(width, kv_heads * head_dim, bias=False)
        self.value = nn.Linear(width, kv_heads * head_dim, bias=False)
        self.output = nn.Linear(heads * head_dim, width, bias=False)

    def forward(self, latents: Tensor, context: Tensor, bias: Tensor | None = None) -> Tensor:
        """``bias``: ``[B, 1, 1, N + L]`` added to the scores (``finfo.min`` where masked)."""
        sequence = torch.cat([context, latents], dim=1)
        query = rearrange(self.query(latents), "b l (h d) -> b h l d", h=self.heads)
        key = rearrange(self.key(sequence), "b s (h d) -> b h s d", h=self.kv_heads)
        value = rearrange(self.value(sequence), "b s (h d) -> b h s d", h=self.kv_heads)
        groups = self.heads // self.kv_heads
        if groups > 1:  # key/value head j serves query heads j*groups .. (j+1)*groups - 1
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scale  # [B, H, L, N + L]
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        attended = torch.matmul(weights, value)  # [B, H, L, head_dim]
        return self.output(rearrange(attended, "b h l d -> b l (h d)"))


class PerceiverBlock(nn.Module):
    """One Perceiver block (HF ``Idefics2PerceiverLayer``): ``latents [B, L, D]`` and the
    projected ``context [B, N, D]`` -> ``[B, L, D]``.

    ``z + Attn(RMSNorm(z), RMSNorm(c))``, then ``z + SwiGLU(RMSNorm(z))`` (hidden width
    :data:`PERCEIVER_MLP_RATIO` x ``D``).
    """

    def __init__(
        self, width: int, heads: int, head_dim: int, kv_heads: int, activation: str, eps: float
    ) -> None:
        super().__init__()
        self.latent_norm = RMSNorm(width, eps)
        self.context_norm = RMSNorm(width, eps)
        self.attention = PerceiverCrossAttention(width, heads, head_dim, kv_heads)
        self.mlp_norm = RMSNorm(width, eps)
        self.mlp = SwiGLU(width, PERCEIVER_MLP_RATIO * width, width, activation)

    def forward(self, latents: Tensor, context: Tensor, bias: Tensor | None = None) -> Tensor:
        latents = latents + self.attention(
            self.latent_norm(latents), self.context_norm(context), bias
        )
        return latents + self.mlp(self.mlp_norm(latents))


def _check_grid(grid: Any) -> tuple[int, int]:
    return check_int_pair(grid, "grid")


class PerceiverConnector(GridProjector):
    """Idefics2's connector: ``[B, N, in_dim]`` -> ``[B, n_latents, out_dim]``.

    ``projection`` (SwiGLU, ``in_dim -> intermediate_size -> out_dim``), ``latents``
    ``[n_latents, out_dim]``, ``blocks`` (``depth`` :class:`PerceiverBlock`), ``norm``. Any input
    grid gives ``n_latents`` tokens forming no grid (:meth:`output_grid` is ``(0, 0)``).

    The latents read their input as a token set, so tokens after the grid that form none (STI's
    pooled tokens) are read like the grid's (``accepts_extra_tokens``).

    The keyword arguments are :class:`PerceiverSpec`'s fields (``n_latents``, ``depth``,
    ``heads``, ``head_dim``, ``kv_heads``, ``intermediate_size``, ``activation``, ``rms_eps``).

    Args:
        in_dim: the fused width (``vision_dim`` x layers for SCI / DCI).
        out_dim: the LLM width, also the latents' width.
    """

    accepts_extra_tokens: ClassVar[bool] = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        n_latents: int,
        depth: int,
        heads: int,
        head_dim: int,
        kv_heads: int,
        intermediate_size: int,
        activation: str,
        rms_eps: float,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.n_latents = in_dim, out_dim, n_latents
        self.projection = SwiGLU(in_dim, intermediate_size, out_dim, activation)
        self.latents = nn.Parameter(torch.randn(n_latents, out_dim))
        self.blocks = nn.ModuleList(
            PerceiverBlock(out_dim, heads, head_dim, kv_heads, activation, rms_eps)
            for _ in range(depth)
        )
        self.norm = RMSNorm(out_dim, rms_eps)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``(0, 0)``: the latents form no spatial grid.

        Raises:
            ValueError: ``grid`` is no ``(height, width)`` pair of positive ints.
        """
        _check_grid(grid)
        return 0, 0

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """``n_latents``, whatever the grid.

        Raises:
            ValueError: ``grid`` is no ``(height, width)`` pair of positive ints.
        """
        _check_grid(grid)
        return self.n_latents

    def forward(self, tokens: Tensor, grid: tuple[int, int], mask: Tensor | None = None) -> Tensor:
        """``[B, N, in_dim]`` -> ``[B, n_latents, out_dim]``.

        Args:
            tokens: the fused tokens: the grid's ``h*w`` in raster order, possibly followed by
                tokens that form no grid (``N >= h*w``).
            grid: the ``(h, w)`` grid of the leading tokens.
            mask: optional ``[B, N]`` bool, ``False`` for padding tokens the latents must not
                read (HF's patch attention mask); ``None`` reads every token.

        Raises:
            ValueError: ``tokens`` is not ``[B, N, in_dim]``, has fewer than ``h*w`` tokens, or
                ``mask`` does not fit it.
        """
        height, width = _check_grid(grid)
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(
                f"tokens must be [batch, tokens, {self.in_dim}], got {tuple(tokens.shape)}"
            )
        if tokens.shape[1] < height * width:
            raise ValueError(
                f"tokens has {tokens.shape[1]} tokens, fewer than the {height}x{width} grid's "
                f"{height * width}"
            )
        context = self.projection(tokens)
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        bias = None if mask is None else self._bias(mask, context)
        for block in self.blocks:
            latents = block(latents, context, bias)
        return self.norm(latents)

    def _bias(self, mask: Tensor, context: Tensor) -> Tensor:
        """``[B, 1, 1, N + L]``: 0 where read, ``finfo.min`` at masked context tokens."""
        batch, count = context.shape[:2]
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, count):
            raise ValueError(
                f"mask must be a bool tensor of shape {(batch, count)}, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        keep = torch.cat([mask, mask.new_ones(batch, self.n_latents)], dim=1)
        bias = torch.zeros(keep.shape, dtype=context.dtype, device=context.device)
        bias = bias.masked_fill(~keep.to(context.device), torch.finfo(context.dtype).min)
        return bias[:, None, None, :]


def _build(in_dim: int, out_dim: int, **parameters: Any) -> PerceiverConnector:
    return PerceiverConnector(in_dim, out_dim, **parameters)


register_projector("perceiver", _build, spec=PerceiverSpec)


# ---------------------------------------------------------------------------- HF weights

#: HF ``Idefics2Connector`` key -> ours, outside the blocks.
_HF_TOP = {
    "modality_projection.gate_proj.weight": "projection.gate.weight",
    "modality_projection.up_proj.weight": "projection.up.weight",
    "modality_projection.down_proj.weight": "projection.down.weight",
    "perceiver_resampler.latents": "latents",
    "perceiver_resampler.norm.weight": "norm.weight",
}
#: HF ``Idefics2PerceiverLayer`` key -> ours, inside block ``i``.
_HF_BLOCK = {
    "input_latents_norm.weight": "latent_norm.weight",
    "input_context_norm.weight": "context_norm.weight",
    "self_attn.q_proj.weight": "attention.query.weight",
    "self_attn.k_proj.weight": "attention.key.weight",
    "self_attn.v_proj.weight": "attention.value.weight",
    "self_attn.o_proj.weight": "attention.output.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
_HF_LAYER = re.compile(r"^perceiver_resampler\.layers\.(\d+)\.(.+)$")


#: The tensors whose shapes fix the connector's sizes, and the sizes each fixes.
_SIZE_SOURCES = {
    "projection.gate.weight": ("intermediate", "in_dim"),
    "latents": ("n_latents", None),
    "norm.weight": ("width",),
    "blocks.0.attention.query.weight": ("inner", None),
    "blocks.0.attention.key.weight": ("kv_inner", None),
}


def _expected_shapes(
    state: Mapping[str, Tensor], depth: int
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The shape every key must have, with the sizes read from :data:`_SIZE_SOURCES` (so a
    wrong tensor elsewhere is the one named), or the problems with those source tensors."""
    sizes: dict[str, int] = {}
    problems = []
    for key, names in _SIZE_SOURCES.items():
        shape = tuple(state[key].shape)
        if len(shape) != len(names):
            problems.append(f"{key}: {shape} has {len(shape)} dimensions, expected {len(names)}")
            continue
        sizes.update({name: size for name, size in zip(names, shape, strict=True) if name})
    if problems:
        return {}, problems
    width, inner, kv_inner = sizes["width"], sizes["inner"], sizes["kv_inner"]
    intermediate, hidden = sizes["intermediate"], PERCEIVER_MLP_RATIO * width
    shapes: dict[str, tuple[int, ...]] = {
        "projection.gate.weight": (intermediate, sizes["in_dim"]),
        "projection.up.weight": (intermediate, sizes["in_dim"]),
        "projection.down.weight": (width, intermediate),
        "latents": (sizes["n_latents"], width),
        "norm.weight": (width,),
    }
    for index in range(depth):
        block = {
            "latent_norm.weight": (width,),
            "context_norm.weight": (width,),
            "attention.query.weight": (inner, width),
            "attention.key.weight": (kv_inner, width),
            "attention.value.weight": (kv_inner, width),
            "attention.output.weight": (width, inner),
            "mlp_norm.weight": (width,),
            "mlp.gate.weight": (hidden, width),
            "mlp.up.weight": (hidden, width),
            "mlp.down.weight": (width, hidden),
        }
        shapes.update({f"blocks.{index}.{key}": shape for key, shape in block.items()})
    return shapes, []


def perceiver_state_from_hf(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our :class:`PerceiverConnector` state dict from HF ``Idefics2Connector`` weights.

    Args:
        state: a state dict holding an ``Idefics2Connector`` under ``prefix`` (keys such as
            ``modality_projection.gate_proj.weight``,
            ``perceiver_resampler.layers.0.self_attn.q_proj.weight``); other keys are ignored.
        prefix: where the connector sits in ``state``: ``"model.connector."`` in an
            ``Idefics2ForConditionalGeneration`` checkpoint, ``""`` for the module's own.

    Returns:
        ``projection.{gate,up,down}.weight``, ``latents``, ``blocks.<i>.{latent_norm,
        context_norm, attention.{query,key,value,output}, mlp_norm, mlp.{gate,up,down}}.weight``,
        ``norm.weight`` (the tensors themselves, not copies).

    Raises:
        ValueError: a key under ``prefix`` is unknown or missing, the layers are not numbered
            ``0 .. depth-1``, or the shapes do not form one connector (the sizes are read from
            the modality projection's gate, the latents, the final norm and block 0's query and
            key; each other tensor must fit them); the message lists every problem (by HF key).
    """
    ours: dict[str, Tensor] = {}
    unexpected: list[str] = []
    layers: set[int] = set()
    for name, tensor in weights_under_prefix(state, prefix, required=False).items():
        layer = _HF_LAYER.match(name)
        if name in _HF_TOP:
            ours[_HF_TOP[name]] = tensor
        elif layer and layer.group(2) in _HF_BLOCK:
            layers.add(int(layer.group(1)))
            ours[f"blocks.{layer.group(1)}.{_HF_BLOCK[layer.group(2)]}"] = tensor
        else:
            unexpected.append(prefix + name)
    depth = max(layers) + 1 if layers else 0
    expected = [*_HF_TOP.values()]
    expected += [f"blocks.{index}.{key}" for index in range(depth) for key in _HF_BLOCK.values()]
    hf_name = {value: prefix + key for key, value in _HF_TOP.items()}
    hf_name.update(
        {
            f"blocks.{index}.{value}": f"{prefix}perceiver_resampler.layers.{index}.{key}"
            for index in range(depth)
            for key, value in _HF_BLOCK.items()
        }
    )
    problems = [f"missing {hf_name[key]}" for key in expected if key not in ours]
    problems += [f"unexpected {key}" for key in unexpected]
    if not depth:
        problems.append(f"no perceiver_resampler.layers.<i>.* keys under prefix {prefix!r}")
    if not problems:  # every key is there: do the shapes form one connector?
        expected, problems = _expected_shapes(ours, depth)
        problems = problems or shape_problems(
            {hf_name[key]: tuple(tensor.shape) for key, tensor in ours.items()},
            {hf_name[key]: shape for key, shape in expected.items()},
            where="in the HF weights",
        )
    if problems:
        raise ValueError(
            f"not the weights of an HF Idefics2Connector under prefix {prefix!r}: "
            + "; ".join(problems)
        )
    return ours


def perceiver_spec_from_hf(config: Any) -> PerceiverSpec:
    """The :class:`PerceiverSpec` of an HF ``Idefics2Config`` (read by attribute, so any object
    with ``text_config`` and ``perceiver_config`` of the same fields works).

    The connector's widths are the config's ``vision_config.hidden_size`` (``vision_dim`` with
    no fusion) and ``text_config.hidden_size`` (``llm_dim``).

    Raises:
        ValueError: the projection's and the perceiver's activations differ (the spec has one),
            or a value is out of the spec's range.
    """
    text, perceiver = config.text_config, config.perceiver_config
    if text.hidden_act != perceiver.hidden_act:
        raise ValueError(
            "PerceiverSpec has one activation, but the config's text_config.hidden_act is "
            f"{text.hidden_act!r} and perceiver_config.hidden_act {perceiver.hidden_act!r}"
        )
    return PerceiverSpec(
        n_latents=perceiver.resampler_n_latents,
        depth=perceiver.resampler_depth,
        heads=perceiver.resampler_n_heads,
        head_dim=perceiver.resampler_head_dim,
        kv_heads=perceiver.num_key_value_heads,
        intermediate_size=text.intermediate_size,
        activation=perceiver.hidden_act,
        rms_eps=perceiver.rms_norm_eps,
    )


# ---------------------------------------------------------------------------- presets

#: Idefics2's vision tower: SigLIP-SO400M with its position embeddings interpolated to 980 px
#: (patch 14: a 70 x 70 grid of 4900 tokens at the longest side's maximum), 27 blocks, no class
#: token, width 1152.
IDEFICS2_SIGLIP_SO400M_980 = EncoderGeometry(
    image_size=980, patch_size=14, num_layers=27, num_prefix_tokens=0, width=1152
)

_IDEFICS2_8B: dict[str, Any] = {"vision_dim": 1152, "llm_dim": 4096, "num_layers": 27}

register_preset(
    "idefics2-perceiver-siglip-so400m-980",
    {**_IDEFICS2_8B, "fusion": SingleLayerSpec(final_layer=27), "projector": PerceiverSpec()},
    geometry=IDEFICS2_SIGLIP_SO400M_980,
)
register_preset(
    "dc-sti+perceiver-siglip-so400m",
    {
        **_IDEFICS2_8B,
        "fusion": STISpec(final_layer=26, extra_layers=(7, 15)),
        "projector": PerceiverSpec(),
    },
    geometry=SIGLIP_SO400M_384,
)
register_preset(
    "dc-dci+perceiver-siglip-so400m",
    {
        **_IDEFICS2_8B,
        "fusion": DCISpec(final_layer=26, groups=(tuple(range(0, 13)), tuple(range(13, 26)))),
        "projector": PerceiverSpec(),
    },
    geometry=SIGLIP_SO400M_384,
)
