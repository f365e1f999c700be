"""Pixel-shuffle connectors: space-to-depth by a factor, then an MLP (InternVL, Idefics3, SmolVLM).

Pixel shuffle (space-to-depth) folds every ``f x f`` block of neighbouring tokens into one token
whose channels are the block's tokens side by side: ``f**2`` times fewer tokens, ``f**2`` times
wider. A projector then maps the wide tokens to the LLM width.

For fused tokens ``X`` on an ``(h, w)`` grid (``X[y, x]`` in ``R^C``, raster index ``y*w + x``)
and a factor ``f`` dividing both ``h`` and ``w``::

    S[i, j] = concat over r < f (row offset), then a < f (column offset) of X[i*f + r, j*f + a]
    S[i, j][(r*f + a)*C + c] = X[i*f + r, j*f + a][c]        i < h/f, j < w/f, c < C

The output tokens ``S[i, j]`` are in raster order on the ``(h/f, w/f)`` grid (index
``i*(w/f) + j``); channels run row offset, then column offset, then the input channel
(einops: ``b (i r j a) c -> b (i j) (r a c)``). Two heads, two projector kinds:

* ``pixel_shuffle`` (:class:`PixelShuffleSpec`, :class:`PixelShuffleLinear`): Idefics3's and
  SmolVLM's connector, one bias-free Linear: ``Y = S W^T`` with ``W`` in ``R^{D x f^2 C}``.
* ``pixel_shuffle_mlp`` (:class:`PixelShuffleMLPSpec`, :class:`PixelShuffleMLP`): InternVL's
  projector, a LayerNorm over the ``f^2 C`` channels, then a two-Linear MLP at the LLM width:
  ``Y = W_2 act(W_1 LN(S) + b_1) + b_2`` with ``W_1`` in ``R^{D x f^2 C}``, ``W_2`` in
  ``R^{D x D}`` (LayerNorm eps ``1e-5``, with affine weights).

Shapes: ``[B, h*w, C] -> [B, (h/f)*(w/f), D]``; ``C`` is the fused width (``vision_dim`` times
the layers for SCI / DCI), ``D`` the LLM width. A grid with a side not divisible by ``f`` is
refused by ``output_grid`` (so a connector fails when it counts tokens,
before anything runs): SigLIP-SO400M's 27x27 grid at 384 px takes ``f = 3`` (SmolVLM) but not
``f = 2`` (Idefics3 resizes to 364 px for a 26x26 grid).

Why one shuffle and two kinds: the two Hugging Face shuffles write different reshape / transpose
sequences (InternVL's ``view -> permute -> view -> permute`` on a ``[B, h, w, C]`` map whose
first axis its code names "width"; Idefics3's ``view -> view -> permute -> reshape -> permute``
on the token sequence), but both transposes cancel and the two give the same token order and
the same channel order, the one above (the parity tests check both, element for element). What
differs is the head: its parameters (norm, biases, depth) and so its state dict. A kind per
head keeps each spec to the parameters its module has, as Hugging Face keeps two classes.
(InternVL's original repository also has ``ps_version="v1"``, without the final transpose,
which leaves the tokens in column-major order; Hugging Face's InternVL implements only the
transposed ``"v2"`` order, the one reproduced here.)

Sources:

* InternVL 1.5: Chen et al., "How Far Are We to GPT-4V? Closing the Gap to Commercial
  Multimodal Models with Open-Source Suites" (2024); Hugging Face
  ``transformers/models/internvl/modeling_internvl.py``: ``InternVLModel.pixel_shuffle`` with
  ``downsample_ratio = 1/f = 0.5`` and ``InternVLMultiModalProjector`` (``layer_norm``,
  ``linear_1``, ``act`` = ``projector_hidden_act`` (``"gelu"``), ``linear_2``).
* Idefics3: Laurençon et al., "Building and better understanding vision-language models:
  insights and future directions" (2024); ``transformers/models/idefics3/modeling_idefics3.py``:
  ``Idefics3Connector.pixel_shuffle(x, scale_factor)`` and ``Idefics3SimpleMLP`` (``proj``,
  bias-free).
* SmolVLM: Marafioti et al., "SmolVLM: Redefining small and efficient multimodal models"
  (2025); ``transformers/models/smolvlm/modeling_smolvlm.py``: ``SmolVLMConnector`` and
  ``SmolVLMSimpleMLP`` are Idefics3's code and keys under another name, so
  :func:`smolvlm_state_from_hf` is :func:`idefics3_state_from_hf`.

Hugging Face's Idefics3 / SmolVLM shuffle takes the grid side from ``sqrt(N)`` (square grids
only); InternVL's takes a ``[B, h, w, C]`` map, so non-square grids match it as well. Ours takes
any ``(h, w)`` with both sides divisible by ``f``.

Examples:
    >>> import torch
    >>> tokens = torch.arange(16.0).reshape(1, 16, 1)           # a 4x4 grid, 1 channel
    >>> pixel_shuffle(tokens, (4, 4), 2)[0].tolist()             # 2x2 blocks, row by row
    [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0], [8.0, 9.0, 12.0, 13.0], [10.0, 11.0, 14.0, 15.0]]
    >>> PixelShuffleLinear(8, 16, factor=3).num_tokens((27, 27))
    81
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from einops import rearrange
from torch import Tensor, nn

from mmconnect.checkpoint import shape_problems, weights_under_prefix
from mmconnect.features import check_grid
from mmconnect.fusion import DCISpec, SingleLayerSpec
from mmconnect.presets import (
    SIGLIP_SO400M_384,
    EncoderGeometry,
    preset_fields,
    register_preset,
)
from mmconnect.projectors import (
    MLP_ACTIVATIONS,
    GridProjector,
    ProjectorSpec,
    register_projector,
)
from mmconnect.validation import check_choice, check_int_pair, check_positive_int

__all__ = [
    "INTERNVIT_6B_448",
    "INTERNVIT_300M_448",
    "SIGLIP_B16_512",
    "SIGLIP_SO400M_364",
    "PixelShuffleLinear",
    "PixelShuffleMLP",
    "PixelShuffleMLPSpec",
    "PixelShuffleSpec",
    "idefics3_state_from_hf",
    "internvl_state_from_hf",
    "pixel_shuffle",
    "pixel_shuffle_grid",
    "smolvlm_state_from_hf",
]


# ----------------------------------------------------------------------------- the shuffle
def pixel_shuffle_grid(grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """The ``(h/f, w/f)`` grid a pixel shuffle by ``factor`` makes of an ``(h, w)`` grid.

    Raises:
        ValueError: a side of ``grid`` is not divisible by ``factor`` (the message names the
            grid and the requirement), or ``grid`` is no pair of positive ints.
        TypeError: ``grid`` is no pair of ints or ``factor`` no int.
    """
    height, width = check_int_pair(grid, "grid")
    check_positive_int(factor, "factor")
    if height % factor or width % factor:
        raise ValueError(
            f"a pixel shuffle by factor {factor} needs both grid sides divisible by {factor}, "
            f"got grid {height}x{width}; use an image size whose patch grid sides are multiples "
            f"of {factor}, or a factor that divides both sides"
        )
    return height // factor, width // factor


def pixel_shuffle(tokens: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """Fold each ``factor x factor`` block of tokens into one token (space-to-depth).

    Shapes: ``[B, h*w, C]`` in raster order on ``grid = (h, w)`` -> ``[B, (h/f)*(w/f), f*f*C]``
    in raster order on ``(h/f, w/f)``; output channel ``(r*f + a)*C + c`` of token ``(i, j)``
    is channel ``c`` of input token ``(i*f + r, j*f + a)`` (the order of Hugging Face's InternVL
    and Idefics3 / SmolVLM shuffles).

    Raises:
        ValueError: a side of ``grid`` is not divisible by ``factor``, or ``tokens`` is not
            ``[B, h*w, C]``.
    """
    out_height, out_width = pixel_shuffle_grid(grid, factor)
    check_grid(tokens, grid, argument="tokens")
    return rearrange(
        tokens,
        "b (i r j a) c -> b (i j) (r a c)",
        i=out_height,
        r=factor,
        j=out_width,
        a=factor,
    )


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True, kw_only=True)
class PixelShuffleSpec(ProjectorSpec):
    """``kind="pixel_shuffle"``: pixel shuffle by ``factor``, then one bias-free Linear.

    Idefics3's and SmolVLM's connector (``scale_factor``: 2 in Idefics3-8B, 3 in
    SmolVLM-Instruct).

    Attributes:
        factor: the block side ``f``: ``f x f`` tokens -> one token of ``f**2`` times the width.

    Examples:
        >>> PixelShuffleSpec(factor=3).to_dict()
        {'kind': 'pixel_shuffle', 'factor': 3}
    """

    kind: str = field(default="pixel_shuffle", init=False)
    factor: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.factor, "factor", hint="the pixel-shuffle block side (2: 2x2)")


@dataclass(frozen=True, kw_only=True)
class PixelShuffleMLPSpec(ProjectorSpec):
    """``kind="pixel_shuffle_mlp"``: pixel shuffle by ``factor``, LayerNorm, Linear, act, Linear.

    InternVL's projector (``downsample_ratio = 1 / factor``: 0.5 in every InternVL release;
    ``projector_hidden_act``: ``"gelu"``). The hidden width is the LLM width, as InternVL's.

    Attributes:
        factor: the block side ``f``.
        activation: the activation between the Linears, one of
            :data:`mmconnect.projectors.MLP_ACTIVATIONS` (``"gelu"`` is exact-erf GELU).

    Examples:
        >>> PixelShuffleMLPSpec().to_dict()
        {'kind': 'pixel_shuffle_mlp', 'factor': 2, 'activation': 'gelu'}
    """

    kind: str = field(default="pixel_shuffle_mlp", init=False)
    factor: int = 2
    activation: str = "gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.factor, "factor", hint="the pixel-shuffle block side (2: 2x2)")
        check_choice(self.activation, "activation", tuple(MLP_ACTIVATIONS))


# ----------------------------------------------------------------------------- modules
class _PixelShuffleProjector(GridProjector):
    """The shuffle and the token contract shared by both heads."""

    def __init__(self, in_dim: int, factor: int) -> None:
        super().__init__()
        self.in_dim = check_positive_int(in_dim, "in_dim")
        self.factor = check_positive_int(factor, "factor")

    @property
    def shuffled_dim(self) -> int:
        """The width after the shuffle: ``factor**2 * in_dim``."""
        return self.factor**2 * self.in_dim

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``(h/f, w/f)``; a ``ValueError`` when a side is not divisible by ``f``."""
        return pixel_shuffle_grid(grid, self.factor)

    def _shuffle(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        if tokens.dim() == 3 and tokens.shape[-1] != self.in_dim:
            raise ValueError(
                f"tokens have {tokens.shape[-1]} channels but the projector was built for "
                f"in_dim={self.in_dim}"
            )
        return pixel_shuffle(tokens, grid, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class PixelShuffleLinear(_PixelShuffleProjector):
    """Pixel shuffle, then a bias-free Linear (Idefics3 / SmolVLM).

    ``[B, h*w, in_dim] -> [B, (h/f)*(w/f), out_dim]``.

    Attributes:
        proj: ``nn.Linear(f*f*in_dim, out_dim, bias=False)`` (Hugging Face's
            ``connector.modality_projection.proj``).
    """

    def __init__(self, in_dim: int, out_dim: int, *, factor: int = 2) -> None:
        super().__init__(in_dim, factor)
        check_positive_int(out_dim, "out_dim")
        self.proj = nn.Linear(self.shuffled_dim, out_dim, bias=False)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, in_dim]`` in raster order on ``grid`` -> ``[B, (h/f)*(w/f), out_dim]``."""
        return self.proj(self._shuffle(tokens, grid))


class PixelShuffleMLP(_PixelShuffleProjector):
    """Pixel shuffle, LayerNorm, Linear, activation, Linear (InternVL).

    ``[B, h*w, in_dim] -> [B, (h/f)*(w/f), out_dim]``.

    Attributes:
        norm: ``nn.LayerNorm(f*f*in_dim)`` (eps ``1e-5``; Hugging Face's ``layer_norm``).
        fc1: ``nn.Linear(f*f*in_dim, out_dim)`` (``linear_1``).
        act: the activation (``act``).
        fc2: ``nn.Linear(out_dim, out_dim)`` (``linear_2``).
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, factor: int = 2, activation: str = "gelu"
    ) -> None:
        super().__init__(in_dim, factor)
        check_positive_int(out_dim, "out_dim")
        check_choice(activation, "activation", tuple(MLP_ACTIVATIONS))
        self.norm = nn.LayerNorm(self.shuffled_dim)
        self.fc1 = nn.Linear(self.shuffled_dim, out_dim)
        self.act = MLP_ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, in_dim]`` in raster order on ``grid`` -> ``[B, (h/f)*(w/f), out_dim]``."""
        return self.fc2(self.act(self.fc1(self.norm(self._shuffle(tokens, grid)))))


register_projector("pixel_shuffle", PixelShuffleLinear, spec=PixelShuffleSpec)
register_projector("pixel_shuffle_mlp", PixelShuffleMLP, spec=PixelShuffleMLPSpec)


# ----------------------------------------------------------------------------- converters


def _convert(
    state: Mapping[str, Tensor],
    prefix: str,
    names: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    module: str,
) -> dict[str, Tensor]:
    found = weights_under_prefix(state, prefix, required=False)
    problems = shape_problems(
        {key: tuple(value.shape) for key, value in found.items()},
        shapes,
        where="in the state dict",
    )
    if problems:
        raise ValueError(
            f"found no complete {module} under prefix {prefix!r}: " + "; ".join(problems)
        )
    return {ours: found[theirs] for theirs, ours in names.items()}


def _matrix_shape(
    state: Mapping[str, Tensor], prefix: str, key: str, module: str
) -> tuple[int, int]:
    """The shape of the matrix ``prefix + key``, whose shape fixes every other key's."""
    found = weights_under_prefix(state, prefix, required=False)
    weight = found.get(key)
    if weight is None or weight.dim() != 2:
        what = "missing" if weight is None else f"of shape {tuple(weight.shape)}, not a matrix"
        keys = sorted(found)
        listed = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ValueError(
            f"found no complete {module} under prefix {prefix!r}: {key!r} is {what} (keys "
            f"under the prefix: {listed or 'none'}; pass the prefix the module has in the model)"
        )
    rows, columns = weight.shape
    return rows, columns


def internvl_state_from_hf(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our :class:`PixelShuffleMLP` state dict from an ``InternVLMultiModalProjector``'s keys.

    ``layer_norm.*`` -> ``norm.*``, ``linear_1.*`` -> ``fc1.*``, ``linear_2.*`` -> ``fc2.*``.
    In ``InternVLForConditionalGeneration`` the projector lives under
    ``prefix="model.multi_modal_projector."``; keys outside the prefix are ignored.

    Raises:
        ValueError: a key is missing or unexpected under the prefix, or the shapes do not form
            one projector (the message lists every problem).
    """
    module = "InternVLMultiModalProjector"
    out_dim, wide = _matrix_shape(state, prefix, "linear_1.weight", module)
    names = {
        "layer_norm.weight": "norm.weight",
        "layer_norm.bias": "norm.bias",
        "linear_1.weight": "fc1.weight",
        "linear_1.bias": "fc1.bias",
        "linear_2.weight": "fc2.weight",
        "linear_2.bias": "fc2.bias",
    }
    shapes = {
        "layer_norm.weight": (wide,),
        "layer_norm.bias": (wide,),
        "linear_1.weight": (out_dim, wide),
        "linear_1.bias": (out_dim,),
        "linear_2.weight": (out_dim, out_dim),
        "linear_2.bias": (out_dim,),
    }
    return _convert(state, prefix, names, shapes, module)


def idefics3_state_from_hf(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our :class:`PixelShuffleLinear` state dict from an ``Idefics3Connector``'s keys.

    ``modality_projection.proj.weight`` -> ``proj.weight``. In
    ``Idefics3ForConditionalGeneration`` (and SmolVLM's) the connector lives under
    ``prefix="model.connector."``; keys outside the prefix are ignored.

    Raises:
        ValueError: the weight is missing or not a matrix, or other keys are under the prefix.
    """
    module = "Idefics3Connector"
    key = "modality_projection.proj.weight"
    shape = _matrix_shape(state, prefix, key, module)
    return _convert(state, prefix, {key: "proj.weight"}, {key: shape}, module)


#: ``SmolVLMConnector`` is ``Idefics3Connector`` under another name (same code, same keys).
smolvlm_state_from_hf = idefics3_state_from_hf


# ----------------------------------------------------------------------------- presets
#: InternViT-300M-448px (InternVL 2 / 2.5 / 3's small tower): 24 blocks, width 1024, a class
#: token, 448 px with patch 14 -> a 32x32 grid.
INTERNVIT_300M_448 = EncoderGeometry(
    image_size=448, patch_size=14, num_layers=24, num_prefix_tokens=1, width=1024
)
#: InternViT-6B-448px (V1.5 / V2.5: InternVL 1.5, 2.5 and 3's large tower, 26B-78B): 45 blocks,
#: width 3200, a class token, 448 px with patch 14 -> a 32x32 grid.
INTERNVIT_6B_448 = EncoderGeometry(
    image_size=448, patch_size=14, num_layers=45, num_prefix_tokens=1, width=3200
)
#: SigLIP-SO400M at Idefics3's 364 px: 27 blocks, width 1152, no prefix token, a 26x26 grid.
SIGLIP_SO400M_364 = EncoderGeometry(
    image_size=364, patch_size=14, num_layers=27, num_prefix_tokens=0, width=1152
)
#: SigLIP-B/16 at 512 px (SmolVLM-256M / 500M's 93M tower): 12 blocks, width 768, no prefix
#: token, 16 px patches -> a 32x32 grid.
SIGLIP_B16_512 = EncoderGeometry(
    image_size=512, patch_size=16, num_layers=12, num_prefix_tokens=0, width=768
)

_INTERNVIT = {"vision_dim": 1024, "num_layers": 24}
_SIGLIP = {"vision_dim": 1152, "num_layers": 27}

for _name, _fields, _geometry in (
    # InternVL3-8B: the last block's output (vision_feature_layer=-1; InternViT-300M has no
    # final norm) into pixel shuffle 2 + LN + MLP to Qwen2.5-7B (3584): 32x32 -> 256 tokens.
    (
        "internvl-pixel-shuffle-internvit-300m",
        {
            **_INTERNVIT,
            "llm_dim": 3584,
            "fusion": SingleLayerSpec(final_layer=24),
            "projector": PixelShuffleMLPSpec(factor=2),
        },
        INTERNVIT_300M_448,
    ),
    # InternVL3-38B: the same on InternViT-6B (layer 45) to Qwen2.5-32B (5120): 256 tokens.
    (
        "internvl-pixel-shuffle-internvit-6b",
        {
            "vision_dim": 3200,
            "num_layers": 45,
            "llm_dim": 5120,
            "fusion": SingleLayerSpec(final_layer=45),
            "projector": PixelShuffleMLPSpec(factor=2),
        },
        INTERNVIT_6B_448,
    ),
    # Idefics3-8B: the last block (the tower's post-LayerNorm follows it in Idefics3) into
    # pixel shuffle 2 + a bias-free Linear to Llama-3.1-8B (4096): 26x26 -> 169 tokens.
    (
        "idefics3-pixel-shuffle-siglip-so400m-364",
        {
            **_SIGLIP,
            "llm_dim": 4096,
            "fusion": SingleLayerSpec(final_layer=27),
            "projector": PixelShuffleSpec(factor=2),
        },
        SIGLIP_SO400M_364,
    ),
    # SmolVLM-Instruct (2B): as Idefics3 at 384 px, shuffle 3 to SmolLM2-1.7B (2048): 27x27 -> 81.
    (
        "smolvlm-pixel-shuffle-siglip-so400m",
        {
            **_SIGLIP,
            "llm_dim": 2048,
            "fusion": SingleLayerSpec(final_layer=27),
            "projector": PixelShuffleSpec(factor=3),
        },
        SIGLIP_SO400M_384,
    ),
    # SmolVLM-256M / 500M: the last block of SigLIP-B/16 (after its post-LayerNorm) into
    # pixel shuffle 4 + a bias-free Linear to SmolLM2-135M (576) / -360M (960): 32x32 -> 64.
    *(
        (
            f"smolvlm-{_size}-pixel-shuffle-siglip-b16-512",
            {
                "vision_dim": 768,
                "num_layers": 12,
                "llm_dim": _llm_dim,
                "fusion": SingleLayerSpec(final_layer=12),
                "projector": PixelShuffleSpec(factor=4),
            },
            SIGLIP_B16_512,
        )
        for _size, _llm_dim in (("256m", 576), ("500m", 960))
    ),
    # The Dense Connector's DCI (as dc-dci-siglip-so400m) into SmolVLM's shuffle by 3:
    # [F, mean H[0..12], mean H[13..25]] (3456 channels) on 27x27 -> 81 tokens of 4096.
    (
        "dc-dci+pixel-shuffle-siglip-so400m",
        {
            **_SIGLIP,
            "llm_dim": 4096,
            "fusion": preset_fields("dc-dci-siglip-so400m")["fusion"],
            "projector": PixelShuffleSpec(factor=3),
        },
        SIGLIP_SO400M_384,
    ),
    # DCI on InternViT-300M ([F = H[24], mean H[0..11], mean H[12..23]], 3072 channels) into
    # InternVL's shuffle + LN + MLP: 32x32 -> 256 tokens of 4096.
    (
        "dc-dci+pixel-shuffle-mlp-internvit-300m",
        {
            **_INTERNVIT,
            "llm_dim": 4096,
            "fusion": DCISpec(final_layer=24, groups=(tuple(range(0, 12)), tuple(range(12, 24)))),
            "projector": PixelShuffleMLPSpec(factor=2),
        },
        INTERNVIT_300M_448,
    ),
):
    register_preset(_name, _fields, geometry=_geometry)
