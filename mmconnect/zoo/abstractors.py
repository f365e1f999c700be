"""Convolutional abstractors: Honeybee's C-Abstractor and MobileVLM V2's LDPv2.

Two connectors that keep the token grid's locality (convolutions on the ``(h, w)`` grid) and
reduce it to a fixed grid by adaptive average pooling. Neither is in Hugging Face transformers:
the definitions below are written from the papers and the original repositories' code.

**C-Abstractor** (``kind="c_abstractor"``, :class:`CAbstractorSpec`; Cha et al., "Honeybee:
Locality-enhanced Projector for Multimodal LLM", CVPR 2024; ``kakaobrain/honeybee``,
``honeybee/projectors/projectors.py``, class ``CAbstractor``, which builds its stages from timm's
``timm.models.regnet.RegStage``). For fused tokens ``X`` ``[B, h*w, C]`` on the ``(h, w)`` grid,
the pooled grid ``(H, W)``, ``d = depth`` blocks per stage and hidden width ``E``::

    X' = X + P                              (P: [1, h*w, C] learned, only with pos_embed_grid)
    F  = Stage_d(C -> E)(X' on the grid)    [B, E, h, w]
    G  = AdaptiveAvgPool(F, (H, W))         [B, E, H, W]
    K  = Stage_d(E -> E)(G)                 [B, E, H, W]
    Y  = Readout(K in raster order)         [B, H*W, D]  (Linear, SiLU, Linear, ... mlp_depth)

Each stage is ``d`` bottleneck blocks (RegNet-Y's, as timm's ``Bottleneck`` with
``bottle_ratio=1``, ``group_size=1``, ``se_ratio=0.25``, ``act_layer=SiLU``,
``norm_layer=LayerNorm2d``: the first block maps ``c_in -> c_out``, the others
``c_out -> c_out``)::

    t = SiLU(LN(Conv1x1(x)))                           c_in -> c_out, no bias
    t = SiLU(LN(DepthwiseConv3x3(t)))                  padding 1, groups = c_out, no bias
    t = t * sigmoid(Conv1x1_b(SiLU(Conv1x1_a(mean_hw(t)))))   squeeze-excitation, r = round(c_in / 4)
    t = LN(Conv1x1(t))                                 c_out -> c_out, no bias
    y = SiLU(t + S(x))                                 S = LN(Conv1x1(x)) if c_in != c_out, else x

``LN`` normalises over the channels of each position (timm's ``LayerNormAct2d``, which
``ConvNormAct`` builds from ``LayerNorm2d``: epsilon ``1e-5``, affine). ``r`` is the squeeze
width, computed from the block's *input* width (``round(0.25 * c_in)``, Python's rounding; when
that is 0, i.e. ``c_in <= 2``, timm's ``SEModule`` falls back to
``max(8, floor(c_out / 16 + 4) // 8 * 8)`` and so does ours). ``depth=0`` leaves only the pooling and the readout (from ``C``), as Honeybee.
Honeybee's learned position embedding ``P`` belongs to the tower's grid (576 positions for
CLIP-L/336): a spec with ``pos_embed_grid=(24, 24)`` accepts only that input grid and refuses
any other with a ``ValueError`` from :meth:`CAbstractor.output_grid` (Honeybee itself would fail
with a shape error). Honeybee adds ``P`` in place to the tensor it receives; ours returns a new
tensor and leaves the input untouched. Honeybee's ``prenorm`` and ``num_eos_tokens`` options (off
in its released C-Abstractor configs) are not part of this connector.

**LDPv2** (``kind="ldpv2"``, :class:`LDPv2Spec`; Chu et al., "MobileVLM V2: Faster and Stronger
Baseline for Vision Language Model", 2024; ``Meituan-AutoML/MobileVLM``,
``mobilevlm/model/vision_projector.py``, class ``LDPNetV2Projector`` with ``FeatureIRLayer``,
``TokenDownLayer`` and ``PosInjectLayer``)::

    Z = Linear_2(GELU(Linear_1(X)))         [B, h*w, D]  (C -> E -> D; E = D in MobileVLM V2)
    G = AdaptiveAvgPool(Z on the grid, (H, W))           [B, D, H, W]
    Y = DepthwiseConv3x3(G) + G             [B, H*W, D]  (PEG: padding 1, groups = D, bias)

``GELU`` is the exact (erf) one, as ``nn.GELU()``. MobileVLM V2 uses ``(H, W) = (12, 12)``.

**Adaptive average pooling** (``torch.nn.functional.adaptive_avg_pool2d``, what both originals
use) takes any input grid, square or not, to any output grid: output row ``i`` of ``H``
averages input rows ``floor(i * h / H)`` to ``ceil((i + 1) * h / H) - 1`` (columns likewise,
with ``w`` and ``W``). When ``H`` divides ``h`` the windows tile the grid (24 -> 12: 2x2
blocks). When it does not, neighbouring windows share rows: 27 -> 12 takes windows of 3 rows
starting at rows 0, 2, 4, 6, 9, 11, 13, 15, 18, 20, 22, 24 (rows 2, 4, 6, 11, ... count twice);
20 -> 12 mixes windows of 2 and 3 columns. An input side smaller than the output side repeats
rows (5 -> 12: windows of 1 or 2 rows, each row used three or four times). The originals take
only square grids (they recover the side as ``sqrt(N)``); ours take the grid they are given.

Token counts: ``output_grid(grid) = (H, W)`` for every accepted grid, ``num_tokens = H * W``.

Converters: :func:`c_abstractor_state_from_honeybee` (Honeybee's ``abstractor.*`` keys, e.g.
``abstractor.net.0.b1.conv1.conv.weight``) and :func:`ldpv2_state_from_mobilevlm` (MobileVLM's
``model.mm_projector.*`` keys, e.g. ``model.mm_projector.mlp.mlp.0.weight``).

Examples:
    >>> from mmconnect import build_projector
    >>> abstractor = build_projector(CAbstractorSpec(depth=1, hidden_dim=8), in_dim=8, out_dim=16)
    >>> abstractor.output_grid((27, 27)), abstractor.num_tokens((24, 20))
    ((12, 12), 144)
    >>> ldp = build_projector(LDPv2Spec(pooled_grid=(6, 6)), in_dim=8, out_dim=16)
    >>> ldp(torch.zeros(2, 24 * 24, 8), (24, 24)).shape
    torch.Size([2, 36, 16])
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect.checkpoint import weights_under_prefix
from mmconnect.fusion import DCISpec, SingleLayerSpec
from mmconnect.presets import CLIP_L_336, register_preset
from mmconnect.projectors import GridProjector, ProjectorSpec, register_projector
from mmconnect.validation import check_int, check_int_pair, check_positive_int

__all__ = [
    "CAbstractor",
    "CAbstractorSpec",
    "LDPv2",
    "LDPv2Spec",
    "RegBottleneck",
    "SqueezeExcitation",
    "c_abstractor_state_from_honeybee",
    "ldpv2_state_from_mobilevlm",
]

#: Epsilon of the channel LayerNorms of the C-Abstractor's blocks (timm's ``LayerNormAct2d``).
LAYER_NORM_EPS = 1e-5
#: Squeeze width of a block's squeeze-excitation, as a fraction of the block's input width.
SE_RATIO = 0.25


# ---------------------------------------------------------------------------- specs


@dataclass(frozen=True, kw_only=True)
class CAbstractorSpec(ProjectorSpec):
    """``kind="c_abstractor"``: Honeybee's C-Abstractor (two RegNet stages around a pooling).

    The defaults are Honeybee's (``configs/model_config/c-abs.yaml``: ``depth: 3``,
    ``mlp_depth: 2``, ``hidden_size: 1024``, ``num_query_tokens: 144``) except the position
    embedding, which is off by default because it fixes the input grid; Honeybee's models set
    it on (``pos_emb: True``): ``pos_embed_grid=(24, 24)`` for CLIP-L/336.

    Attributes:
        depth: bottleneck blocks per stage (``0``: pooling and readout only).
        hidden_dim: the stages' width ``E`` (Honeybee ``hidden_size``).
        pooled_grid: the output grid ``(H, W)``; Honeybee's ``num_query_tokens = H * W``
            (144 -> ``(12, 12)``).
        mlp_depth: Linears of the readout, with SiLU between them (Honeybee ``mlp_depth``).
        pos_embed_grid: the input grid of a learned position embedding added to the tokens
            first (Honeybee ``pos_emb``), or ``None`` for none; with it, only that grid is
            accepted.

    Examples:
        >>> CAbstractorSpec().pooled_grid
        (12, 12)
        >>> CAbstractorSpec(pooled_grid=(12, 0))
        Traceback (most recent call last):
        ...
        ValueError: pooled_grid must be a (height, width) pair of positive ints, got (12, 0)
    """

    kind: str = field(default="c_abstractor", init=False)
    depth: int = 3
    hidden_dim: int = 1024
    pooled_grid: tuple[int, int] = (12, 12)
    mlp_depth: int = 2
    pos_embed_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.depth, "depth", minimum=0)
        check_positive_int(self.hidden_dim, "hidden_dim")
        object.__setattr__(self, "pooled_grid", check_int_pair(self.pooled_grid, "pooled_grid"))
        check_positive_int(self.mlp_depth, "mlp_depth")
        if self.pos_embed_grid is not None:
            grid = check_int_pair(self.pos_embed_grid, "pos_embed_grid")
            object.__setattr__(self, "pos_embed_grid", grid)


@dataclass(frozen=True, kw_only=True)
class LDPv2Spec(ProjectorSpec):
    """``kind="ldpv2"``: MobileVLM V2's lightweight downsample projector.

    Attributes:
        pooled_grid: the output grid ``(H, W)`` (MobileVLM V2: ``(12, 12)``, fixed in its code).
        hidden_dim: the MLP's middle width ``E``; ``None`` (MobileVLM V2) is the output width.

    Examples:
        >>> LDPv2Spec().to_dict()
        {'kind': 'ldpv2', 'pooled_grid': [12, 12], 'hidden_dim': None}
    """

    kind: str = field(default="ldpv2", init=False)
    pooled_grid: tuple[int, int] = (12, 12)
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "pooled_grid", check_int_pair(self.pooled_grid, "pooled_grid"))
        if self.hidden_dim is not None:
            check_positive_int(self.hidden_dim, "hidden_dim")


# ---------------------------------------------------------------------------- layers


def _channel_layer_norm(maps: Tensor, norm: nn.LayerNorm) -> Tensor:
    """LayerNorm over the channels of every position: ``[B, C, h, w] -> [B, C, h, w]``."""
    normed = F.layer_norm(
        maps.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps
    )
    return normed.permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    """Channel gating from the spatial mean: ``x * sigmoid(W_b SiLU(W_a mean_hw(x) + a) + b)``.

    ``[B, C, h, w] -> [B, C, h, w]``; ``W_a``: ``C -> r``, ``W_b``: ``r -> C`` (1x1 convolutions
    with bias, named ``reduce`` and ``expand``).
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, kernel_size=1)
        self.expand = nn.Conv2d(squeeze, channels, kernel_size=1)

    def forward(self, maps: Tensor) -> Tensor:
        squeezed = maps.mean((2, 3), keepdim=True)
        return maps * torch.sigmoid(self.expand(F.silu(self.reduce(squeezed))))


def _squeeze_width(in_dim: int, out_dim: int) -> int:
    """The squeeze width of a block: ``round(in_dim / 4)``, or timm's fallback when that is 0."""
    return round(in_dim * SE_RATIO) or max(8, int(out_dim / 16 + 4) // 8 * 8)


class RegBottleneck(nn.Module):
    """RegNet-Y bottleneck block with channel LayerNorms and SiLU (the C-Abstractor's block).

    ``[B, in_dim, h, w] -> [B, out_dim, h, w]`` (stride 1): the equations in the module
    docstring. Parameters: ``conv1`` / ``norm1`` (1x1), ``conv2`` / ``norm2`` (3x3 depthwise),
    ``se`` (:class:`SqueezeExcitation`, squeeze width ``round(in_dim / 4)``, see the module
    docstring for ``in_dim <= 2``), ``conv3`` /
    ``norm3`` (1x1), and ``shortcut_conv`` / ``shortcut_norm`` when ``in_dim != out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        self.norm1 = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim, bias=False)
        self.norm2 = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
        self.se = SqueezeExcitation(out_dim, _squeeze_width(in_dim, out_dim))
        self.conv3 = nn.Conv2d(out_dim, out_dim, kernel_size=1, bias=False)
        self.norm3 = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
        if in_dim != out_dim:
            self.shortcut_conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
            self.shortcut_norm = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
        else:
            self.shortcut_conv = self.shortcut_norm = None

    def forward(self, maps: Tensor) -> Tensor:
        branch = F.silu(_channel_layer_norm(self.conv1(maps), self.norm1))
        branch = F.silu(_channel_layer_norm(self.conv2(branch), self.norm2))
        branch = _channel_layer_norm(self.conv3(self.se(branch)), self.norm3)
        shortcut = maps
        if self.shortcut_conv is not None:
            shortcut = _channel_layer_norm(self.shortcut_conv(maps), self.shortcut_norm)
        return F.silu(branch + shortcut)


def _stage(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        *(RegBottleneck(in_dim if index == 0 else out_dim, out_dim) for index in range(depth))
    )


def _readout(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        modules += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*modules)


# ---------------------------------------------------------------------------- connectors


class CAbstractor(GridProjector):
    """Honeybee's C-Abstractor: ``[B, h*w, in_dim] -> [B, H*W, out_dim]`` (module docstring).

    Parameters: ``pos_embed`` ``[1, h*w, in_dim]`` (only with ``pos_embed_grid``), ``stage1``
    and ``stage2`` (``nn.Sequential`` of :class:`RegBottleneck`), ``readout``
    (``nn.Sequential``, Linears at 0, 2, ...).

    Args:
        in_dim: the fused width ``C``.
        out_dim: the LLM width ``D``.
        depth: blocks per stage (:class:`CAbstractorSpec`).
        hidden_dim: the stages' width.
        pooled_grid: the output grid ``(H, W)``.
        mlp_depth: Linears of the readout.
        pos_embed_grid: the grid of the learned position embedding, or ``None`` for none.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        depth: int = 3,
        hidden_dim: int = 1024,
        pooled_grid: tuple[int, int] = (12, 12),
        mlp_depth: int = 2,
        pos_embed_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        spec = CAbstractorSpec(
            depth=depth,
            hidden_dim=hidden_dim,
            pooled_grid=pooled_grid,
            mlp_depth=mlp_depth,
            pos_embed_grid=pos_embed_grid,
        )
        self.pooled_grid = spec.pooled_grid
        self.pos_embed_grid = spec.pos_embed_grid
        if self.pos_embed_grid is not None:
            height, width = self.pos_embed_grid
            self.pos_embed = nn.Parameter(torch.empty(1, height * width, in_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)  # Honeybee's initialisation
        else:
            self.register_parameter("pos_embed", None)
        self.stage1 = _stage(depth, in_dim, hidden_dim)
        self.stage2 = _stage(depth, hidden_dim, hidden_dim)
        self.readout = _readout(mlp_depth, hidden_dim if depth else in_dim, out_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``pooled_grid`` for any grid (any grid but ``pos_embed_grid`` is refused when set).

        Raises:
            ValueError: ``grid`` is not a pair of positive ints, or differs from the position
                embedding's grid.
        """
        grid = check_int_pair(grid, "grid")
        if self.pos_embed_grid is not None and grid != self.pos_embed_grid:
            raise ValueError(
                f"C-Abstractor with a learned position embedding for the grid "
                f"{self.pos_embed_grid} cannot take the grid {grid}: it needs exactly that grid "
                "(use pos_embed_grid=None for any grid)"
            )
        return self.pooled_grid

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, in_dim]`` in raster order on ``grid`` -> ``[B, H*W, out_dim]``."""
        self.output_grid(grid)
        height, width = grid
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        maps = rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
        maps = self.stage1(maps)
        maps = F.adaptive_avg_pool2d(maps, self.pooled_grid)
        maps = self.stage2(maps)
        return self.readout(rearrange(maps, "b c h w -> b (h w) c"))


class LDPv2(GridProjector):
    """MobileVLM V2's LDPv2: ``[B, h*w, in_dim] -> [B, H*W, out_dim]`` (module docstring).

    Parameters: ``mlp`` (``nn.Sequential``: Linear, GELU, Linear at 0, 1, 2) and ``peg`` (the
    depthwise 3x3 ``nn.Conv2d`` with bias).

    Args:
        in_dim: the fused width ``C``.
        out_dim: the LLM width ``D``.
        pooled_grid: the output grid ``(H, W)`` (:class:`LDPv2Spec`).
        hidden_dim: the MLP's middle width; ``None`` for ``out_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        pooled_grid: tuple[int, int] = (12, 12),
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        spec = LDPv2Spec(pooled_grid=pooled_grid, hidden_dim=hidden_dim)
        self.pooled_grid = spec.pooled_grid
        hidden = out_dim if spec.hidden_dim is None else spec.hidden_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.peg = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, groups=out_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``pooled_grid`` for any grid.

        Raises:
            ValueError: ``grid`` is not a pair of positive ints.
        """
        check_int_pair(grid, "grid")
        return self.pooled_grid

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, in_dim]`` in raster order on ``grid`` -> ``[B, H*W, out_dim]``."""
        self.output_grid(grid)
        height, width = grid
        maps = rearrange(self.mlp(tokens), "b (h w) c -> b c h w", h=height, w=width)
        pooled = F.adaptive_avg_pool2d(maps, self.pooled_grid)
        return rearrange(self.peg(pooled) + pooled, "b c h w -> b (h w) c")


def _build_c_abstractor(in_dim: int, out_dim: int, **parameters: Any) -> CAbstractor:
    return CAbstractor(in_dim, out_dim, **parameters)


def _build_ldpv2(in_dim: int, out_dim: int, **parameters: Any) -> LDPv2:
    return LDPv2(in_dim, out_dim, **parameters)


register_projector("c_abstractor", _build_c_abstractor, spec=CAbstractorSpec)
register_projector("ldpv2", _build_ldpv2, spec=LDPv2Spec)


# ---------------------------------------------------------------------------- converters

# timm's Bottleneck names -> ours (ConvNormAct keeps its conv in .conv and its norm in .bn).
_BLOCK_KEYS = {
    "conv1.conv.weight": "conv1.weight",
    "conv1.bn.weight": "norm1.weight",
    "conv1.bn.bias": "norm1.bias",
    "conv2.conv.weight": "conv2.weight",
    "conv2.bn.weight": "norm2.weight",
    "conv2.bn.bias": "norm2.bias",
    "se.fc1.weight": "se.reduce.weight",
    "se.fc1.bias": "se.reduce.bias",
    "se.fc2.weight": "se.expand.weight",
    "se.fc2.bias": "se.expand.bias",
    "conv3.conv.weight": "conv3.weight",
    "conv3.bn.weight": "norm3.weight",
    "conv3.bn.bias": "norm3.bias",
}
_SHORTCUT_KEYS = {
    "downsample.conv.weight": "shortcut_conv.weight",
    "downsample.bn.weight": "shortcut_norm.weight",
    "downsample.bn.bias": "shortcut_norm.bias",
}
_HONEYBEE_BLOCK = re.compile(r"^net\.(0|2)\.b(\d+)\.(.+)$")
_HONEYBEE_READOUT = re.compile(r"^readout\.(\d+)\.(weight|bias)$")


def _raise_problems(what: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise ValueError(
            f"{what} state dict does not fit: missing keys {sorted(missing)}, unexpected keys "
            f"{sorted(unexpected)}"
        )


def c_abstractor_state_from_honeybee(
    state: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """Our :class:`CAbstractor` state dict from Honeybee's ``CAbstractor`` keys.

    Honeybee keeps the abstractor at ``abstractor.`` in ``HoneybeeForConditionalGeneration``
    (pass ``prefix="abstractor."`` for a whole-model state dict). Mapping: ``pos_emb`` ->
    ``pos_embed``; ``net.0.b{i}.*`` / ``net.2.b{i}.*`` (the two timm ``RegStage`` around the
    pooling at ``net.1``) -> ``stage1.{i-1}.*`` / ``stage2.{i-1}.*`` with timm's block names
    (``conv1.conv`` / ``conv1.bn``, ``se.fc1``, ``downsample.conv`` ...) renamed to ours
    (``conv1`` / ``norm1``, ``se.reduce``, ``shortcut_conv`` ...); ``readout.{k}`` unchanged.
    An old checkpoint whose ``pos_emb`` has one position more than a square grid (a class-token
    position Honeybee's own loader drops) loses that first position, as Honeybee's loader does.

    Raises:
        ValueError: no key under ``prefix``, keys that are not a C-Abstractor's (unexpected), or
            a block, readout Linear or stage missing some of its keys (missing).
        TypeError: ``state`` is no mapping or ``prefix`` no str.
    """
    found = weights_under_prefix(state, prefix)
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    blocks: dict[tuple[str, int], set[str]] = {}
    readout: dict[int, set[str]] = {}
    for key, value in found.items():
        block = _HONEYBEE_BLOCK.match(key)
        linear = _HONEYBEE_READOUT.match(key)
        if key == "pos_emb":
            tokens = value.shape[1] if value.dim() == 3 else -1
            side = math.isqrt(max(tokens - 1, 0))
            if tokens > 1 and math.isqrt(tokens) ** 2 != tokens and side * side == tokens - 1:
                value = value[:, 1:]
            converted["pos_embed"] = value
        elif block:
            stage = "stage1" if block.group(1) == "0" else "stage2"
            index, name = int(block.group(2)), block.group(3)
            ours = _BLOCK_KEYS.get(name) or _SHORTCUT_KEYS.get(name)
            if ours is None or index < 1:
                unexpected.append(prefix + key)
                continue
            converted[f"{stage}.{index - 1}.{ours}"] = value
            blocks.setdefault((stage, index), set()).add(name)
        elif linear:
            converted[key] = value
            readout.setdefault(int(linear.group(1)), set()).add(linear.group(2))
        else:
            unexpected.append(prefix + key)
    missing: list[str] = []
    for (stage, index), names in sorted(blocks.items()):
        net = "net.0" if stage == "stage1" else "net.2"
        expected = set(_BLOCK_KEYS)
        if names & set(_SHORTCUT_KEYS):
            expected |= set(_SHORTCUT_KEYS)
        missing += [f"{prefix}{net}.b{index}.{name}" for name in sorted(expected - names)]
    depths = {
        stage: max((index for name, index in blocks if name == stage), default=0)
        for stage in ("stage1", "stage2")
    }
    if depths["stage1"] != depths["stage2"]:
        missing.append(
            f"(the stages have {depths['stage1']} and {depths['stage2']} blocks; a C-Abstractor's "
            "have the same depth)"
        )
    for stage, depth in depths.items():
        net = "net.0" if stage == "stage1" else "net.2"
        missing += [
            f"{prefix}{net}.b{index}.*"
            for index in range(1, depth + 1)
            if (stage, index) not in blocks
        ]
    if not readout:
        missing.append(f"{prefix}readout.0.weight")
    for index in range(0, max(readout, default=0) + 1, 2):
        missing += [
            f"{prefix}readout.{index}.{name}"
            for name in ("weight", "bias")
            if name not in readout.get(index, set())
        ]
    unexpected += [f"{prefix}readout.{index}.*" for index in readout if index % 2]
    _raise_problems("Honeybee C-Abstractor", missing, unexpected)
    return converted


_MOBILEVLM_KEYS = {
    "mlp.mlp.0.weight": "mlp.0.weight",
    "mlp.mlp.0.bias": "mlp.0.bias",
    "mlp.mlp.2.weight": "mlp.2.weight",
    "mlp.mlp.2.bias": "mlp.2.bias",
    "peg.peg.0.weight": "peg.weight",
    "peg.peg.0.bias": "peg.bias",
}


def ldpv2_state_from_mobilevlm(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our :class:`LDPv2` state dict from MobileVLM's ``LDPNetV2Projector`` keys.

    MobileVLM keeps the projector at ``model.mm_projector.`` in ``MobileLlamaForCausalLM`` (and
    saves it under those keys in ``mm_projector.bin``): pass ``prefix="model.mm_projector."``.
    Mapping: ``mlp.mlp.{0,2}.*`` -> ``mlp.{0,2}.*``, ``peg.peg.0.*`` -> ``peg.*``.

    Raises:
        ValueError: no key under ``prefix``, or keys missing / unexpected (listed).
        TypeError: ``state`` is no mapping or ``prefix`` no str.
    """
    found = weights_under_prefix(state, prefix)
    missing = [prefix + key for key in _MOBILEVLM_KEYS if key not in found]
    unexpected = [prefix + key for key in found if key not in _MOBILEVLM_KEYS]
    _raise_problems("MobileVLM LDPv2", missing, unexpected)
    return {ours: found[theirs] for theirs, ours in _MOBILEVLM_KEYS.items()}


# ---------------------------------------------------------------------------- presets

_CLIP_L_DCI = DCISpec(final_layer=23, groups=(tuple(range(0, 12)), tuple(range(12, 24))))
_CLIP_L = {"vision_dim": 1024, "num_layers": 24}
#: Honeybee's C-Abstractor at 144 queries on CLIP-L/336 (hidden 1024, position embedding on).
_HONEYBEE_M144 = CAbstractorSpec(
    depth=3, hidden_dim=1024, pooled_grid=(12, 12), mlp_depth=2, pos_embed_grid=(24, 24)
)

for _name, _fields in (
    # Dense Connector DCI (as dc-dci-clip-l-336) feeding the convolutional abstractors.
    (
        "dc-dci+c-abstractor-clip-l-336",
        {**_CLIP_L, "llm_dim": 4096, "fusion": _CLIP_L_DCI, "projector": _HONEYBEE_M144},
    ),
    (
        "dc-dci+ldpv2-clip-l-336",
        {**_CLIP_L, "llm_dim": 4096, "fusion": _CLIP_L_DCI, "projector": LDPv2Spec()},
    ),
    # The reference models: Honeybee-C-7B-M144 reads hidden_states[-1] (feature_layer_index -1),
    # MobileVLM V2 hidden_states[-2] (mm_vision_select_layer -2); both drop the class token.
    (
        "honeybee-c-abstractor-m144-clip-l-336",
        {
            **_CLIP_L,
            "llm_dim": 4096,
            "fusion": SingleLayerSpec(final_layer=24),
            "projector": _HONEYBEE_M144,
        },
    ),
    *(
        (
            f"mobilevlm-v2-{size}-ldpv2-clip-l-336",
            {
                **_CLIP_L,
                "llm_dim": llm_dim,
                "fusion": SingleLayerSpec(final_layer=23),
                "projector": LDPv2Spec(),
            },
        )
        for size, llm_dim in (("1.7b", 2048), ("3b", 2560), ("7b", 4096))
    ),
):
    register_preset(_name, _fields, geometry=CLIP_L_336)
