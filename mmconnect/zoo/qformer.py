"""BLIP-2's Q-Former as a connector: learned queries read the fused tokens, then a Linear.

Source: Li, Li, Savarese, Hoi, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models" (ICML 2023), section 3.1 and figure 2; Hugging Face
transformers ``models/blip_2/modeling_blip_2.py`` (``Blip2QFormerModel`` and the
``query_tokens`` / ``language_projection`` of ``Blip2ForConditionalGeneration``); the original
code is LAVIS ``lavis/models/blip2_models/Qformer.py`` (a BERT-base with cross-attention).

``M`` learned queries ``Q`` (``[1, M, H]``) attend to the image tokens ``X`` (``[B, N, C]``,
``C`` the fused width) through ``L`` post-LayerNorm BERT layers of width ``H``; every
``f``-th layer (``l % f == 0``) also cross-attends to ``X``; a Linear maps the result to the
LLM width ``D``::

    Z_0 = Dropout(LN_0(Q))                                               [B, M, H]
    for l in 0 .. L-1:
        A = LN(Z_l + Dropout(W_o MHA(Z_l W_q, Z_l W_k, Z_l W_v)))        self-attention
        if l % f == 0:
            A = LN(A + Dropout(W_o' MHA(A W_q', X W_k', X W_v')))        cross-attention, k/v: C -> H
        Z_{l+1} = LN(A + Dropout(W_2 GELU(W_1 A)))                       H -> I -> H
    Y = Z_L W_p + b_p                                                    [B, M, D]

    MHA(q, k, v) = concat over heads h of softmax(q_h k_h^T / sqrt(H / heads)) v_h

GELU is the exact-erf one; every LayerNorm uses ``layer_norm_eps`` (BLIP-2: 1e-12). The queries
form no spatial grid: the output grid is ``(0, 0)`` and the count ``num_queries`` whatever the
input grid (:class:`QFormerProjector`).

Difference from BLIP-2: there ``X`` is the vision model's last hidden state *with* its class
token, after the vision tower's ``post_layernorm`` (EVA ViT-g/14 at 224 px: 1 + 16 x 16 = 257
tokens of width 1408). Here ``X`` is whatever the connector's fusion gives: the tapped hidden
states with the prefix (class) token dropped and no extra LayerNorm (a block's output, or SCI /
DCI's channel concatenation of several). Parity with Hugging Face is of the module: the same
tokens in give the same tokens out (the tests also feed a tiny BLIP-2's own image tokens,
class token included, through both).
The text branch of the Q-Former (its ``intermediate`` / ``output`` feed-forward for text
tokens, used in BLIP-2's first-stage image-text losses) never acts on the queries and is not
part of the connector.

Examples:
    >>> from mmconnect import ConnectorConfig, DenseConnector, SingleLayerSpec
    >>> spec = QFormerSpec(num_queries=4, depth=2, num_heads=2, hidden_size=16,
    ...                    intermediate_size=32)
    >>> config = ConnectorConfig(vision_dim=24, llm_dim=40, num_layers=3,
    ...                          fusion=SingleLayerSpec(final_layer=-1), projector=spec)
    >>> connector = DenseConnector(config)
    >>> connector.num_tokens((24, 24)), connector.token_grid((24, 24))
    (4, (0, 0))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect.checkpoint import shape_problems, weights_under_prefix
from mmconnect.fusion import DCISpec, SingleLayerSpec
from mmconnect.presets import CLIP_L_336, EncoderGeometry, register_preset
from mmconnect.projectors import GridProjector, ProjectorSpec, register_projector
from mmconnect.validation import (
    check_float,
    check_int_pair,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "EVA_VIT_G_224",
    "QFormerAttention",
    "QFormerFeedForward",
    "QFormerLayer",
    "QFormerProjector",
    "QFormerSpec",
    "qformer_state_from_hf",
]


@dataclass(frozen=True, kw_only=True)
class QFormerSpec(ProjectorSpec):
    """``kind="qformer"``: BLIP-2's Q-Former and its language projection.

    The defaults are BLIP-2's (``Blip2QFormerConfig``: a BERT-base with cross-attention every
    second layer, 32 queries). The widths in and out come from the connector config: the
    cross-attention keys / values read the fused width (``vision_dim`` after fusion; BLIP-2:
    1408), the projection writes ``llm_dim`` (BLIP-2 OPT-2.7b: 2560).

    Attributes:
        num_queries: learned query tokens, the output token count (32).
        depth: Q-Former layers (12).
        num_heads: attention heads; must divide ``hidden_size`` (12).
        hidden_size: the Q-Former width ``H`` (768).
        intermediate_size: the feed-forward width ``I`` (3072).
        cross_attention_frequency: layer ``l`` cross-attends to the image tokens when
            ``l % cross_attention_frequency == 0`` (2: layers 0, 2, 4, ...).
        layer_norm_eps: epsilon of every LayerNorm (1e-12).
        dropout: dropout after the query LayerNorm and after each attention / feed-forward
            output projection, in training mode (0.1).
        attention_dropout: dropout on the attention probabilities, in training mode (0.1).

    Examples:
        >>> QFormerSpec().to_dict()["num_queries"]
        32
        >>> QFormerSpec(hidden_size=100, num_heads=12)
        Traceback (most recent call last):
        ...
        ValueError: hidden_size=100 must be a multiple of num_heads=12 (the head width)
    """

    kind: str = field(default="qformer", init=False)
    num_queries: int = 32
    depth: int = 12
    num_heads: int = 12
    hidden_size: int = 768
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "num_queries",
            "depth",
            "num_heads",
            "hidden_size",
            "intermediate_size",
            "cross_attention_frequency",
        ):
            check_positive_int(getattr(self, name), name)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads} "
                "(the head width)"
            )
        eps = check_positive_float(self.layer_norm_eps, "layer_norm_eps")
        object.__setattr__(self, "layer_norm_eps", eps)
        for name in ("dropout", "attention_dropout"):
            rate = check_float(
                getattr(self, name), name, minimum=0, maximum=1, exclusive_maximum=True
            )
            object.__setattr__(self, name, rate)


class QFormerAttention(nn.Module):
    """Multi-head attention with a residual and a post-LayerNorm (a BERT attention block).

    ``forward(hidden [B, M, H], source [B, N, S] or None) -> [B, M, H]``: queries from
    ``hidden``, keys and values from ``source`` (cross-attention, ``S = source_size``) or from
    ``hidden`` itself (self-attention, ``source=None``);
    ``LN(hidden + Dropout(out(MHA(...))))``.

    Hugging Face: ``Blip2QFormerAttention`` (``attention.query/key/value`` are ours
    ``query/key/value``, ``output.dense`` ours ``out``, ``output.LayerNorm`` ours ``norm``).
    """

    def __init__(
        self,
        hidden_size: int,
        source_size: int,
        num_heads: int,
        *,
        layer_norm_eps: float,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(source_size, hidden_size)
        self.value = nn.Linear(source_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, hidden: Tensor, source: Tensor | None = None) -> Tensor:
        source = hidden if source is None else source
        query, key, value = (
            rearrange(projection(states), "b n (h d) -> b h n d", h=self.num_heads)
            for projection, states in (
                (self.query, hidden),
                (self.key, source),
                (self.value, source),
            )
        )
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scale,
        )
        attended = rearrange(attended, "b h n d -> b n (h d)")
        return self.norm(hidden + self.dropout(self.out(attended)))


class QFormerFeedForward(nn.Module):
    """The queries' feed-forward block: ``LN(x + Dropout(down(GELU(up(x)))))``, ``[B, M, H]``.

    Hugging Face: ``intermediate_query.dense`` is ours ``up``, ``output_query.dense`` ours
    ``down``, ``output_query.LayerNorm`` ours ``norm``.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, layer_norm_eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden + self.dropout(self.down(F.gelu(self.up(hidden)))))


class QFormerLayer(nn.Module):
    """One Q-Former layer on the queries: self-attention, optional cross-attention to the image
    tokens, feed-forward. ``forward(queries [B, M, H], image [B, N, C]) -> [B, M, H]``.

    Attributes:
        self_attention: :class:`QFormerAttention` over the queries.
        cross_attention: :class:`QFormerAttention` from the queries to the image tokens, or
            ``None`` in a layer without cross-attention.
        feed_forward: :class:`QFormerFeedForward`.
    """

    def __init__(self, spec: QFormerSpec, image_size: int, *, cross_attention: bool) -> None:
        super().__init__()
        options = {
            "layer_norm_eps": spec.layer_norm_eps,
            "dropout": spec.dropout,
            "attention_dropout": spec.attention_dropout,
        }
        hidden, heads = spec.hidden_size, spec.num_heads
        self.self_attention = QFormerAttention(hidden, hidden, heads, **options)
        self.cross_attention = (
            QFormerAttention(hidden, image_size, heads, **options) if cross_attention else None
        )
        self.feed_forward = QFormerFeedForward(
            hidden, spec.intermediate_size, layer_norm_eps=spec.layer_norm_eps, dropout=spec.dropout
        )

    def forward(self, queries: Tensor, image: Tensor) -> Tensor:
        queries = self.self_attention(queries)
        if self.cross_attention is not None:
            queries = self.cross_attention(queries, image)
        return self.feed_forward(queries)


class QFormerProjector(GridProjector):
    """BLIP-2's Q-Former and language projection: ``[B, N, in_dim] -> [B, num_queries, out_dim]``.

    The tokens are read as a set (cross-attention has no positions), so their order and grid
    do not matter, and tokens after the grid that form none (STI's pooled tokens) are read as
    well (``accepts_extra_tokens``). The output is ``num_queries`` tokens that form no
    grid: :meth:`output_grid` is ``(0, 0)``.

    Attributes:
        query_tokens: the learned queries, ``[1, num_queries, hidden_size]`` (HF
            ``query_tokens``).
        norm: the LayerNorm on the queries (HF ``qformer.layernorm``).
        layers: the :class:`QFormerLayer` stack (HF ``qformer.encoder.layer``).
        projection: ``Linear(hidden_size, out_dim)`` (HF ``language_projection``).
    """

    accepts_extra_tokens: ClassVar[bool] = True

    def __init__(self, in_dim: int, out_dim: int, spec: QFormerSpec) -> None:
        super().__init__()
        if not isinstance(spec, QFormerSpec):
            raise TypeError(f"spec must be a QFormerSpec, got {type(spec).__name__}")
        self.spec = spec
        self.in_dim = check_positive_int(in_dim, "in_dim")
        self.out_dim = check_positive_int(out_dim, "out_dim")
        # N(0, 0.02) as BLIP-2 trained them from scratch (Hugging Face's constructor leaves zeros
        # for a checkpoint to fill; identical queries would never tell themselves apart in stage 1).
        self.query_tokens = nn.Parameter(
            torch.empty(1, spec.num_queries, spec.hidden_size).normal_(0.0, 0.02)
        )
        self.norm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.dropout = nn.Dropout(spec.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(spec, in_dim, cross_attention=index % spec.cross_attention_frequency == 0)
            for index in range(spec.depth)
        )
        self.projection = nn.Linear(spec.hidden_size, out_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``(0, 0)``: the queries form no spatial grid (any input grid is taken)."""
        check_int_pair(grid, "grid")
        return 0, 0

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """``num_queries``, whatever the input grid."""
        check_int_pair(grid, "grid")
        return self.spec.num_queries

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, N, in_dim]`` with ``N >= h * w`` (the grid's tokens, then any extra tokens) ->
        ``[B, num_queries, out_dim]``.

        Raises:
            ValueError: ``tokens`` is not ``[B, N, in_dim]`` with at least ``h * w`` tokens.
        """
        height, width = check_int_pair(grid, "grid")
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim or tokens.shape[1] < height * width:
            raise ValueError(
                f"tokens must be [batch, >= {height * width} tokens (the {height}x{width} grid), "
                f"{self.in_dim} channels], got {tuple(tokens.shape)}"
            )
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
        queries = self.dropout(self.norm(queries))
        for layer in self.layers:
            queries = layer(queries, tokens)
        return self.projection(queries)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_queries={self.spec.num_queries}"

    def load_hf_state_dict(self, state: Mapping[str, Tensor], prefix: str = "") -> None:
        """Load Hugging Face BLIP-2 weights (:func:`qformer_state_from_hf`) into this module.

        Args:
            state: a ``Blip2ForConditionalGeneration`` / ``Blip2Model`` state dict, or the part
                of one holding ``query_tokens``, ``qformer.*`` and ``language_projection.*``.
            prefix: what precedes those keys in ``state``.

        Raises:
            ValueError: keys are missing or unexpected, or shapes differ from this module's
                (one line each: a spec or width that does not fit the checkpoint).
        """
        converted = qformer_state_from_hf(state, prefix)
        expected = {key: value.shape for key, value in self.state_dict().items()}
        problems = shape_problems(
            {key: value.shape for key, value in converted.items()},
            expected,
            where="in the Hugging Face weights",
        )
        if problems:
            raise ValueError(
                f"the BLIP-2 weights do not fit this Q-Former ({self.spec}, in_dim={self.in_dim}, "
                f"out_dim={self.out_dim}): " + "; ".join(problems)
            )
        self.load_state_dict(converted)


def _build_qformer(in_dim: int, out_dim: int, **parameters: Any) -> QFormerProjector:
    return QFormerProjector(in_dim, out_dim, QFormerSpec(**parameters))


register_projector("qformer", _build_qformer, spec=QFormerSpec)


# ---------------------------------------------------------------------------- Hugging Face keys

# HF name (after "qformer.encoder.layer.<i>.") -> ours (after "layers.<i>.").
_HF_LAYER_NAMES = {
    "attention.attention.query": "self_attention.query",
    "attention.attention.key": "self_attention.key",
    "attention.attention.value": "self_attention.value",
    "attention.output.dense": "self_attention.out",
    "attention.output.LayerNorm": "self_attention.norm",
    "crossattention.attention.query": "cross_attention.query",
    "crossattention.attention.key": "cross_attention.key",
    "crossattention.attention.value": "cross_attention.value",
    "crossattention.output.dense": "cross_attention.out",
    "crossattention.output.LayerNorm": "cross_attention.norm",
    "intermediate_query.dense": "feed_forward.up",
    "output_query.dense": "feed_forward.down",
    "output_query.LayerNorm": "feed_forward.norm",
}
_HF_TOP_NAMES = {
    "query_tokens": "query_tokens",
    "qformer.layernorm.weight": "norm.weight",
    "qformer.layernorm.bias": "norm.bias",
    "language_projection.weight": "projection.weight",
    "language_projection.bias": "projection.bias",
}
_HF_LAYER_KEY = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
# The text tokens' feed-forward (Blip2QFormerConfig.use_qformer_text_input): never on the queries.
_HF_TEXT_BRANCH = ("intermediate.dense", "output.dense", "output.LayerNorm")
_HF_ROOTS = ("query_tokens", "qformer.", "language_projection.")


def qformer_state_from_hf(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our :class:`QFormerProjector` state dict from Hugging Face BLIP-2 keys.

    Reads ``<prefix>query_tokens``, ``<prefix>qformer.*`` and ``<prefix>language_projection.*``
    (a ``Blip2ForConditionalGeneration`` state dict has them at ``prefix=""``); every other key
    (``vision_model.*``, ``language_model.*``) is not the connector's and is left out, and so is
    the Q-Former's text-token feed-forward (``qformer.encoder.layer.<i>.intermediate.*`` /
    ``output.*``, present with ``use_qformer_text_input``), which never acts on the queries.

    Key names (Hugging Face -> ours):

    - ``query_tokens`` -> ``query_tokens``; ``qformer.layernorm.*`` -> ``norm.*``;
      ``language_projection.*`` -> ``projection.*``;
    - ``qformer.encoder.layer.<i>.attention.*`` -> ``layers.<i>.self_attention.*`` and
      ``...crossattention.*`` -> ``layers.<i>.cross_attention.*``;
    - ``...intermediate_query.dense`` / ``output_query.dense`` / ``output_query.LayerNorm`` ->
      ``layers.<i>.feed_forward.up`` / ``down`` / ``norm``

    (inside an attention: ``attention.query/key/value`` -> ``query/key/value``,
    ``output.dense`` -> ``out``, ``output.LayerNorm`` -> ``norm``). Tensors are passed through,
    not copied or cast.

    Raises:
        ValueError: ``prefix`` selects no BLIP-2 connector keys, a key under ``qformer.`` or
            ``language_projection.`` is unknown, or a key is missing (the query tokens, the
            LayerNorm, the projection, a layer's self-attention or feed-forward, part of a
            cross-attention, or a layer between others); the message lists them.
        TypeError: ``prefix`` is not a str.
    """
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for name, value in weights_under_prefix(state, prefix, required=False).items():
        if not name.startswith(_HF_ROOTS):
            continue
        if name in _HF_TOP_NAMES:
            converted[_HF_TOP_NAMES[name]] = value
            continue
        match = _HF_LAYER_KEY.match(name)
        if match and match.group(2) in _HF_LAYER_NAMES:
            index, module, kind = match.groups()
            converted[f"layers.{int(index)}.{_HF_LAYER_NAMES[module]}.{kind}"] = value
        elif not (match and match.group(2) in _HF_TEXT_BRANCH):
            unexpected.append(prefix + name)
    if not converted and not unexpected:
        raise ValueError(
            f"found no BLIP-2 connector keys under prefix {prefix!r}: expected "
            f"'{prefix}query_tokens', '{prefix}qformer.*' and '{prefix}language_projection.*', "
            f"got {', '.join(list(state)[:5]) or 'an empty state dict'}"
        )
    missing = _missing_keys(converted)
    if missing or unexpected:
        raise ValueError(
            f"the BLIP-2 Q-Former keys under prefix {prefix!r} are incomplete or unknown: "
            f"missing {missing} (ours), unexpected {unexpected}"
        )
    return converted


def _missing_keys(converted: Mapping[str, Tensor]) -> list[str]:
    """Our keys a complete Q-Former needs but ``converted`` lacks (its depth read from it)."""
    layers = {int(key.split(".")[1]) for key in converted if key.startswith("layers.")}
    required = set(_HF_TOP_NAMES.values())
    for index in range(max(layers, default=-1) + 1):
        modules = [ours for ours in _HF_LAYER_NAMES.values() if not ours.startswith("cross_")]
        if any(key.startswith(f"layers.{index}.cross_attention.") for key in converted):
            modules += [ours for ours in _HF_LAYER_NAMES.values() if ours.startswith("cross_")]
        required |= {
            f"layers.{index}.{module}.{kind}" for module in modules for kind in ("weight", "bias")
        }
    return sorted(required - set(converted))


# ---------------------------------------------------------------------------- presets

#: BLIP-2's image encoder: EVA-CLIP ViT-g/14 at 224 px (16 x 16 patches, a class token), 39
#: blocks of width 1408 as BLIP-2 keeps them (the 40th block is removed; HF
#: ``Blip2VisionConfig``).
EVA_VIT_G_224 = EncoderGeometry(
    image_size=224, patch_size=14, num_layers=39, num_prefix_tokens=1, width=1408
)

register_preset(
    "baseline+qformer-eva-vit-g-224",
    {
        "vision_dim": 1408,
        "llm_dim": 2560,  # OPT-2.7b
        "num_layers": 39,
        "fusion": SingleLayerSpec(final_layer=-1),
        "projector": QFormerSpec(),
    },
    geometry=EVA_VIT_G_224,
)
register_preset(
    "dc-dci+qformer-clip-l-336",
    {
        "vision_dim": 1024,
        "llm_dim": 4096,
        "num_layers": 24,
        "fusion": DCISpec(final_layer=23, groups=(tuple(range(0, 12)), tuple(range(12, 24)))),
        "projector": QFormerSpec(),
    },
    geometry=CLIP_L_336,
)
