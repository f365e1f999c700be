"""C-Abstractor (Honeybee) and LDPv2 (MobileVLM V2): parity, hand values, counts, specs, presets.

Neither connector is in Hugging Face transformers, so the references are assembled here exactly
as the original repositories assemble them: Honeybee's ``CAbstractor`` (``kakaobrain/honeybee``,
``honeybee/projectors/projectors.py``) from timm's own ``RegStage`` with ``stride=1``,
``dilation=1``, ``act_layer=nn.SiLU``, ``norm_layer=LayerNorm2d`` around an
``nn.AdaptiveAvgPool2d`` and a SiLU readout MLP; MobileVLM's ``LDPNetV2Projector``
(``Meituan-AutoML/MobileVLM``, ``mobilevlm/model/vision_projector.py``) from ``nn.Linear``,
``nn.GELU``, ``nn.AdaptiveAvgPool2d`` and the depthwise ``nn.Conv2d`` under the original module
names, so both state dicts carry the original checkpoint keys. Besides, values derived by hand
from the definitions (a block on a 1x1 grid, blocks whose branch is zeroed, the pooling
windows) check the equations without either reference.
"""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from einops import rearrange
from torch import nn

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    build_projector,
)
from mmconnect.presets import preset_geometry
from mmconnect.projectors import parse_projector
from mmconnect.zoo.abstractors import (
    CAbstractor,
    CAbstractorSpec,
    LDPv2,
    LDPv2Spec,
    RegBottleneck,
    c_abstractor_state_from_honeybee,
    ldpv2_state_from_mobilevlm,
)

timm_regnet = pytest.importorskip("timm.models.regnet")
timm_layers = pytest.importorskip("timm.layers")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(module: nn.Module, seed: int) -> None:
    """Every parameter random (norm weights and biases included), reproducibly."""
    generator = _generator(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


# ---------------------------------------------------------------------------- references


class HoneybeeReference(nn.Module):
    """Honeybee's C-Abstractor as its repository assembles it, from timm's ``RegStage``."""

    def __init__(self, in_dim, hidden_dim, out_dim, *, depth, mlp_depth, pooled, positions):
        super().__init__()
        stage = partial(
            timm_regnet.RegStage,
            stride=1,
            dilation=1,
            act_layer=nn.SiLU,
            norm_layer=timm_layers.LayerNorm2d,
        )
        sampler = nn.AdaptiveAvgPool2d(pooled)
        if depth:
            self.net = nn.Sequential(
                stage(depth, in_dim, hidden_dim), sampler, stage(depth, hidden_dim, hidden_dim)
            )
        else:
            self.net = sampler
        layers = [nn.Linear(hidden_dim if depth else in_dim, out_dim)]
        for _ in range(1, mlp_depth):
            layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*layers)
        self.pos_emb = nn.Parameter(torch.zeros(1, positions, in_dim)) if positions else None

    def forward(self, tokens, grid):
        if self.pos_emb is not None:
            tokens = tokens.clone()
            tokens += self.pos_emb  # Honeybee adds in place to what it receives
        maps = rearrange(tokens, "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        return self.readout(rearrange(self.net(maps), "b d h w -> b (h w) d"))


class _Holder(nn.Module):
    def __init__(self, name, module):
        super().__init__()
        self.add_module(name, module)


class MobileVLMReference(nn.Module):
    """MobileVLM V2's LDPNetV2Projector with its module names (``mlp.mlp``, ``peg.peg.0``)."""

    def __init__(self, in_dim, out_dim, pooled):
        super().__init__()
        self.mlp = _Holder(
            "mlp", nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        )
        self.dwn = _Holder("dwn", nn.Sequential(nn.AdaptiveAvgPool2d(pooled)))
        conv = nn.Conv2d(out_dim, out_dim, 3, 1, 1, bias=True, groups=out_dim)
        self.peg = _Holder("peg", nn.Sequential(conv))

    def forward(self, tokens, grid):
        batch, _, _ = tokens.shape
        tokens = self.mlp.mlp(tokens)
        maps = tokens.permute(0, 2, 1).reshape(batch, -1, *grid)
        tokens = self.dwn.dwn(maps).flatten(2).transpose(1, 2)
        channels = tokens.shape[-1]
        maps = tokens.transpose(1, 2).view(batch, channels, *self.dwn.dwn[0].output_size)
        return (self.peg.peg(maps) + maps).flatten(2).transpose(1, 2)


def _honeybee_pair(
    *,
    in_dim=6,
    hidden=10,
    out_dim=12,
    depth=2,
    mlp_depth=2,
    grid=(7, 7),
    pooled=(3, 3),
    positional=True,
    seed=0,
):
    reference = HoneybeeReference(
        in_dim,
        hidden,
        out_dim,
        depth=depth,
        mlp_depth=mlp_depth,
        pooled=pooled,
        positions=grid[0] * grid[1] if positional else 0,
    )
    _randomize(reference, seed)
    state = {f"abstractor.{key}": value for key, value in reference.state_dict().items()}
    ours = CAbstractor(
        in_dim,
        out_dim,
        depth=depth,
        hidden_dim=hidden,
        pooled_grid=pooled,
        mlp_depth=mlp_depth,
        pos_embed_grid=grid if positional else None,
    )
    ours.load_state_dict(c_abstractor_state_from_honeybee(state, prefix="abstractor."))
    return reference, ours, state


def _mobilevlm_pair(*, in_dim=6, out_dim=8, pooled=(3, 3), seed=0):
    reference = MobileVLMReference(in_dim, out_dim, pooled)
    _randomize(reference, seed)
    state = {f"model.mm_projector.{key}": value for key, value in reference.state_dict().items()}
    ours = LDPv2(in_dim, out_dim, pooled_grid=pooled)
    ours.load_state_dict(ldpv2_state_from_mobilevlm(state, prefix="model.mm_projector."))
    return reference, ours, state


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    ("grid", "pooled", "depth", "mlp_depth", "positional"),
    [
        ((7, 7), (3, 3), 2, 2, True),  # 7 -> 3 does not divide: overlapping windows
        ((6, 4), (3, 2), 3, 3, True),  # non-square, dividing
        ((5, 9), (4, 4), 1, 1, False),  # non-square, no position embedding
        ((4, 4), (2, 2), 0, 2, True),  # depth 0: pooling and readout only
    ],
)
def test_c_abstractor_equals_honeybee_assembly_fp32_and_bf16(
    grid, pooled, depth, mlp_depth, positional
):
    reference, ours, _ = _honeybee_pair(
        grid=grid, pooled=pooled, depth=depth, mlp_depth=mlp_depth, positional=positional
    )
    tokens = torch.randn(2, grid[0] * grid[1], 6, generator=_generator(1))
    with torch.no_grad():
        expected, got = reference(tokens, grid), ours(tokens, grid)
    assert got.shape == (2, pooled[0] * pooled[1], 12)
    assert torch.equal(got, expected)  # same ops in the same order: bit-identical
    reference, ours = reference.to(torch.bfloat16), ours.to(torch.bfloat16)
    with torch.no_grad():
        expected, got = reference(tokens.bfloat16(), grid), ours(tokens.bfloat16(), grid)
    assert torch.equal(got, expected)  # bf16 too (measured: max |diff| 0 on CPU)


def test_c_abstractor_leaves_its_input_untouched():
    _, ours, _ = _honeybee_pair()
    tokens = torch.randn(1, 49, 6, generator=_generator(2))
    before = tokens.clone()
    ours(tokens, (7, 7))
    assert torch.equal(tokens, before)


@pytest.mark.parametrize(
    ("grid", "pooled"),
    [((24, 24), (12, 12)), ((27, 27), (12, 12)), ((5, 7), (3, 3)), ((2, 3), (4, 4))],
)
def test_ldpv2_equals_mobilevlm_assembly_fp32_and_bf16(grid, pooled):
    reference, ours, _ = _mobilevlm_pair(pooled=pooled)
    tokens = torch.randn(2, grid[0] * grid[1], 6, generator=_generator(3))
    with torch.no_grad():
        expected, got = reference(tokens, grid), ours(tokens, grid)
    assert got.shape == (2, pooled[0] * pooled[1], 8)
    assert torch.equal(got, expected)
    reference, ours = reference.to(torch.bfloat16), ours.to(torch.bfloat16)
    with torch.no_grad():
        expected, got = reference(tokens.bfloat16(), grid), ours(tokens.bfloat16(), grid)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------- hand values


def _silu(value: float) -> float:
    return value / (1.0 + math.exp(-value))


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def _layer_norm(values, weight, bias, eps=1e-5):
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / len(values)
    return [
        (value - mean) / math.sqrt(variance + eps) * w + b
        for value, w, b in zip(values, weight, bias, strict=True)
    ]


def test_block_on_a_1x1_grid_by_hand():
    """One block, 4 channels, one position: only the depthwise kernel's centre sees data (the
    other taps multiply the zero padding), the SE gate is sigmoid(expand bias) when the reduce
    weights are zero, and the shortcut is the identity (in == out)."""
    block = RegBottleneck(4, 4)
    x = [1.0, -0.5, 2.0, 0.25]
    conv1 = [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 1.0, 0.0, 0.0],
        [0.0, 0.0, -1.0, 0.0],
        [0.0, 0.0, 0.0, 2.0],
    ]
    centre = [2.0, 3.0, -1.0, 0.5]
    conv3 = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    gate_bias = [0.0, math.log(3.0), -math.log(3.0), 0.0]  # gates 0.5, 0.75, 0.25, 0.5
    norm3_weight, norm3_bias = [1.0, 2.0, 0.5, 1.0], [0.1, 0.0, -0.2, 0.3]
    with torch.no_grad():
        block.conv1.weight.copy_(torch.tensor(conv1)[:, :, None, None])
        kernel = torch.full((4, 1, 3, 3), 7.0)
        kernel[:, 0, 1, 1] = torch.tensor(centre)
        block.conv2.weight.copy_(kernel)
        block.se.reduce.weight.zero_()
        block.se.reduce.bias.fill_(0.3)
        block.se.expand.weight.fill_(5.0)  # multiplies SiLU(0.3) > 0: part of the hand value
        block.se.expand.bias.copy_(torch.tensor(gate_bias))
        block.conv3.weight.copy_(torch.tensor(conv3)[:, :, None, None])
        block.norm3.weight.copy_(torch.tensor(norm3_weight))
        block.norm3.bias.copy_(torch.tensor(norm3_bias))
    ones, zeros = [1.0] * 4, [0.0] * 4
    t = [sum(conv1[o][i] * x[i] for i in range(4)) for o in range(4)]
    t = [_silu(v) for v in _layer_norm(t, ones, zeros)]
    t = [
        _silu(v) for v in _layer_norm([c * v for c, v in zip(centre, t, strict=True)], ones, zeros)
    ]
    squeeze = _silu(0.3)  # reduce: 1 channel (round(4 / 4)), zero weights, bias 0.3
    t = [v * _sigmoid(5.0 * squeeze + b) for v, b in zip(t, gate_bias, strict=True)]
    t = [sum(conv3[o][i] * t[i] for i in range(4)) for o in range(4)]
    t = _layer_norm(t, norm3_weight, norm3_bias)
    expected = torch.tensor([_silu(v + s) for v, s in zip(t, x, strict=True)])
    got = block(torch.tensor(x)[None, :, None, None]).flatten()
    assert block.se.reduce.out_channels == 1
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def test_c_abstractor_with_zeroed_branches_by_hand():
    """norm3 = 0 turns every block with equal widths into SiLU(x); an identity readout then
    leaves SiLU(pool(SiLU(x))): on a 2x2 grid pooled to 1x1, SiLU of the mean of SiLUs."""
    abstractor = CAbstractor(2, 2, depth=1, hidden_dim=2, pooled_grid=(1, 1), mlp_depth=1)
    _randomize(abstractor, 5)
    with torch.no_grad():
        for stage in (abstractor.stage1, abstractor.stage2):
            stage[0].norm3.weight.zero_()
            stage[0].norm3.bias.zero_()
        abstractor.readout[0].weight.copy_(torch.eye(2))
        abstractor.readout[0].bias.zero_()
    values = [[0.5, -1.0], [2.0, 0.0], [-0.25, 3.0], [1.0, 1.0]]  # 4 tokens x 2 channels
    expected = [_silu(sum(_silu(token[c]) for token in values) / 4) for c in range(2)]
    got = abstractor(torch.tensor([values]), (2, 2))
    assert got.shape == (1, 1, 2)
    assert torch.allclose(got.flatten(), torch.tensor(expected), rtol=0, atol=1e-6)


def test_pooling_windows_27_to_12_and_20_to_12():
    """Depth 0 + identity readout is the pooling itself: with channel 0 = row index and
    channel 1 = column index, output row i holds the mean of its window's rows."""
    abstractor = CAbstractor(2, 2, depth=0, pooled_grid=(12, 12), mlp_depth=1)
    with torch.no_grad():
        abstractor.readout[0].weight.copy_(torch.eye(2))
        abstractor.readout[0].bias.zero_()
    rows, columns = torch.meshgrid(torch.arange(27.0), torch.arange(20.0), indexing="ij")
    tokens = torch.stack([rows, columns], dim=-1).reshape(1, 27 * 20, 2)
    out = abstractor(tokens, (27, 20)).reshape(12, 12, 2)
    # 27 -> 12: windows of 3 rows from 0, 2, 4, 6, 9, 11, 13, 15, 18, 20, 22, 24
    row_means = [1.0, 3.0, 5.0, 7.0, 10.0, 12.0, 14.0, 16.0, 19.0, 21.0, 23.0, 25.0]
    assert out[:, 0, 0].tolist() == row_means
    # 20 -> 12: windows [0,2) [1,4) [3,5) [5,7) [6,9) [8,10) [10,12) [11,14) [13,15) [15,17)
    # [16,19) [18,20): means 0.5, 2, 3.5, 5.5, 7, 8.5, 10.5, 12, 13.5, 15.5, 17, 18.5
    column_means = [0.5, 2.0, 3.5, 5.5, 7.0, 8.5, 10.5, 12.0, 13.5, 15.5, 17.0, 18.5]
    assert out[0, :, 1].tolist() == column_means


def test_ldpv2_by_hand_with_an_identity_mlp_and_a_centre_only_peg():
    """GELU between identity Linears on non-negative inputs is x * Phi(x); pooling a 2x2 grid
    to 1x1 averages; a PEG kernel with only its centre c and bias b gives (1 + c) g + b."""
    ldp = LDPv2(2, 2, pooled_grid=(1, 1))
    with torch.no_grad():
        for index in (0, 2):
            ldp.mlp[index].weight.copy_(torch.eye(2))
            ldp.mlp[index].bias.zero_()
        kernel = torch.full((2, 1, 3, 3), 9.0)
        kernel[:, 0, 1, 1] = torch.tensor([0.5, -2.0])
        ldp.peg.weight.copy_(kernel)
        ldp.peg.bias.copy_(torch.tensor([0.25, 1.0]))
    values = [[0.5, 1.0], [2.0, 0.0], [0.25, 3.0], [1.0, 1.5]]

    def gelu(v):
        return v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))

    pooled = [sum(gelu(token[c]) for token in values) / 4 for c in range(2)]
    expected = [(1 + 0.5) * pooled[0] + 0.25, (1 - 2.0) * pooled[1] + 1.0]
    got = ldp(torch.tensor([values]), (2, 2)).flatten()
    assert torch.allclose(got, torch.tensor(expected), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- converters


def test_honeybee_keys_map_to_ours():
    _, ours, state = _honeybee_pair(depth=2)
    converted = c_abstractor_state_from_honeybee(state, prefix="abstractor.")
    assert sorted(converted) == sorted(ours.state_dict())
    assert torch.equal(
        converted["stage1.0.shortcut_conv.weight"],
        state["abstractor.net.0.b1.downsample.conv.weight"],
    )
    assert torch.equal(
        converted["stage2.1.se.expand.bias"], state["abstractor.net.2.b2.se.fc2.bias"]
    )
    assert torch.equal(
        converted["stage1.1.norm3.weight"], state["abstractor.net.0.b2.conv3.bn.weight"]
    )
    assert "stage2.0.shortcut_conv.weight" not in converted  # hidden -> hidden: identity shortcut


def test_honeybee_old_checkpoint_class_position_is_dropped():
    _, _, state = _honeybee_pair(grid=(4, 4), pooled=(2, 2))
    old = dict(state)
    old["abstractor.pos_emb"] = torch.cat(
        [torch.full((1, 1, 6), 7.0), state["abstractor.pos_emb"]], 1
    )
    converted = c_abstractor_state_from_honeybee(old, prefix="abstractor.")
    assert torch.equal(converted["pos_embed"], state["abstractor.pos_emb"])
    assert converted["pos_embed"].shape == (1, 16, 6)


def test_honeybee_converter_errors():
    _, _, state = _honeybee_pair(depth=2)
    broken = {k: v for k, v in state.items() if k != "abstractor.net.2.b1.se.fc1.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['abstractor.net.2.b1.se.fc1.bias'\]"):
        c_abstractor_state_from_honeybee(broken, prefix="abstractor.")
    extra = {**state, "abstractor.eos_tokens": torch.zeros(1, 1, 12)}
    with pytest.raises(ValueError, match=r"unexpected keys \['abstractor.eos_tokens'\]"):
        c_abstractor_state_from_honeybee(extra, prefix="abstractor.")
    no_readout = {k: v for k, v in state.items() if "readout.0" not in k}  # readout.2 kept
    with pytest.raises(
        ValueError,
        match=r"missing keys \['abstractor.readout.0.bias', "
        r"'abstractor.readout.0.weight'\]",
    ):
        c_abstractor_state_from_honeybee(no_readout, prefix="abstractor.")
    with pytest.raises(ValueError, match=r"no keys start with prefix 'model\.abstractor\.'"):
        c_abstractor_state_from_honeybee(state, prefix="model.abstractor.")
    with pytest.raises(TypeError, match="state must be a mapping"):
        c_abstractor_state_from_honeybee([("pos_emb", torch.zeros(1))])


def test_mobilevlm_converter_keys_and_errors():
    _, ours, state = _mobilevlm_pair()
    assert sorted(state) == [
        "model.mm_projector.mlp.mlp.0.bias",
        "model.mm_projector.mlp.mlp.0.weight",
        "model.mm_projector.mlp.mlp.2.bias",
        "model.mm_projector.mlp.mlp.2.weight",
        "model.mm_projector.peg.peg.0.bias",
        "model.mm_projector.peg.peg.0.weight",
    ]
    converted = ldpv2_state_from_mobilevlm(state, prefix="model.mm_projector.")
    assert sorted(converted) == sorted(ours.state_dict())
    missing = {k: v for k, v in state.items() if not k.endswith("peg.peg.0.bias")}
    with pytest.raises(ValueError, match=r"missing keys \['model.mm_projector.peg.peg.0.bias'\]"):
        ldpv2_state_from_mobilevlm(missing, prefix="model.mm_projector.")
    extra = {**state, "model.mm_projector.dwn.extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['model.mm_projector.dwn.extra'\]"):
        ldpv2_state_from_mobilevlm(extra, prefix="model.mm_projector.")
    with pytest.raises(
        ValueError,
        match=r"missing keys \['mlp.mlp.0.bias', .*unexpected keys "
        r"\['model.mm_projector.mlp.mlp.0.bias'",
    ):
        ldpv2_state_from_mobilevlm(state)  # keys are under model.mm_projector., not bare
    with pytest.raises(ValueError, match=r"no keys start with prefix 'mm_projector\.'"):
        ldpv2_state_from_mobilevlm(state, prefix="mm_projector.")


# ---------------------------------------------------------------------------- counts and specs


@pytest.mark.parametrize("grid", [(24, 24), (27, 27), (24, 20), (5, 7), (1, 1)])
def test_any_grid_gives_the_pooled_grid(grid):
    for spec in (CAbstractorSpec(depth=1, hidden_dim=4), LDPv2Spec()):
        projector = build_projector(spec, in_dim=4, out_dim=6)
        assert projector.output_grid(grid) == (12, 12)
        assert projector.num_tokens(grid) == 144
        out = projector(torch.zeros(1, grid[0] * grid[1], 4), grid)
        assert out.shape == (1, 144, 6)
    small = build_projector(LDPv2Spec(pooled_grid=(3, 2)), in_dim=4, out_dim=6)
    assert small.output_grid((27, 27)) == (3, 2) and small.num_tokens((27, 27)) == 6


def test_position_embedding_fixes_the_grid():
    abstractor = build_projector(
        CAbstractorSpec(depth=1, hidden_dim=4, pos_embed_grid=(24, 24)), in_dim=4, out_dim=6
    )
    assert abstractor.num_tokens((24, 24)) == 144
    with pytest.raises(
        ValueError,
        match=r"position embedding for the grid \(24, 24\) cannot "
        r"take the grid \(27, 27\)",
    ):
        abstractor.num_tokens((27, 27))
    with pytest.raises(ValueError, match=r"cannot take the grid \(24, 20\)"):
        abstractor(torch.zeros(1, 480, 4), (24, 20))


@pytest.mark.parametrize("projector", [CAbstractor(4, 6, depth=1, hidden_dim=4), LDPv2(4, 6)])
def test_malformed_grids_are_refused(projector):
    with pytest.raises(ValueError, match="grid must be a"):
        projector.output_grid((24, 0))
    with pytest.raises(TypeError, match="grid must be a"):
        projector.output_grid(24)


@pytest.mark.parametrize(
    ("spec_class", "arguments", "error", "message"),
    [
        (CAbstractorSpec, {"depth": 2.5}, TypeError, "depth must be a non-negative int"),
        (CAbstractorSpec, {"depth": -1}, ValueError, "depth must be a non-negative int"),
        (CAbstractorSpec, {"hidden_dim": "8"}, TypeError, "hidden_dim must be a positive int"),
        (CAbstractorSpec, {"hidden_dim": 0}, ValueError, "hidden_dim must be a positive int"),
        (CAbstractorSpec, {"mlp_depth": 0}, ValueError, "mlp_depth must be a positive int"),
        (CAbstractorSpec, {"mlp_depth": True}, TypeError, "mlp_depth must be a positive int"),
        (CAbstractorSpec, {"pooled_grid": 12}, TypeError, "pooled_grid must be a"),
        (CAbstractorSpec, {"pooled_grid": (12, 0)}, ValueError, "pooled_grid must be a"),
        (CAbstractorSpec, {"pos_embed_grid": (24, "24")}, TypeError, "pos_embed_grid must be a"),
        (CAbstractorSpec, {"pos_embed_grid": (24, 24, 1)}, ValueError, "pos_embed_grid must be a"),
        (LDPv2Spec, {"pooled_grid": "12x12"}, TypeError, "pooled_grid must be a"),
        (LDPv2Spec, {"pooled_grid": (0, 12)}, ValueError, "pooled_grid must be a"),
        (LDPv2Spec, {"hidden_dim": 1.5}, TypeError, "hidden_dim must be a positive int"),
        (LDPv2Spec, {"hidden_dim": 0}, ValueError, "hidden_dim must be a positive int"),
    ],
)
def test_spec_validation(spec_class, arguments, error, message):
    with pytest.raises(error, match=message):
        spec_class(**arguments)


def test_specs_round_trip_through_json():
    for spec in (
        CAbstractorSpec(depth=2, hidden_dim=16, pooled_grid=[6, 4], pos_embed_grid=[8, 8]),
        LDPv2Spec(pooled_grid=(6, 6), hidden_dim=32),
    ):
        assert parse_projector(json.loads(json.dumps(spec.to_dict()))) == spec
    assert CAbstractorSpec(pooled_grid=[6, 4]).pooled_grid == (6, 4)


def test_ldpv2_hidden_width():
    assert LDPv2(4, 6).mlp[0].out_features == 6  # MobileVLM V2: the output width
    wide = LDPv2(4, 6, hidden_dim=10)
    widths = (wide.mlp[0].out_features, wide.mlp[2].in_features, wide.mlp[2].out_features)
    assert widths == (10, 10, 6)


# ---------------------------------------------------------------------------- composability

_FUSIONS = {
    "none": SingleLayerSpec(final_layer=3),
    "sci": SCISpec(final_layer=3, extra_layers=(1,)),
    "dci": DCISpec(final_layer=3, groups=((0, 1), (2, 3))),
}
_PROJECTORS = {
    "c_abstractor": CAbstractorSpec(depth=1, hidden_dim=6, pooled_grid=(3, 2), mlp_depth=2),
    "ldpv2": LDPv2Spec(pooled_grid=(3, 2), hidden_dim=5),
}


@pytest.mark.parametrize("fusion", sorted(_FUSIONS))
@pytest.mark.parametrize("projector", sorted(_PROJECTORS))
def test_dense_connector_composes(fusion, projector):
    config = ConnectorConfig(
        vision_dim=4,
        llm_dim=8,
        num_layers=4,
        fusion=_FUSIONS[fusion],
        projector=_PROJECTORS[projector],
    )
    connector = DenseConnector(config)
    generator = _generator(7)
    features = {layer: torch.randn(2, 5 * 7, 4, generator=generator) for layer in range(5)}
    out = connector(features, (5, 7))
    assert out.shape == (2, connector.num_tokens((5, 7)), 8) == (2, 6, 8)
    assert connector.token_grid((5, 7)) == (3, 2)
    assert ConnectorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("projector", sorted(_PROJECTORS))
def test_sti_cannot_feed_an_abstractor(projector):
    config = ConnectorConfig(
        vision_dim=4,
        llm_dim=8,
        num_layers=4,
        projector=_PROJECTORS[projector],
        fusion=STISpec(final_layer=3, extra_layers=(1,), window=2),
    )
    with pytest.raises(ValueError, match="form no grid, but the projector"):
        DenseConnector(config).num_tokens((4, 4))


@pytest.mark.parametrize(
    "spec",
    [
        CAbstractorSpec(depth=2, hidden_dim=6, pooled_grid=(2, 2), pos_embed_grid=(4, 4)),
        LDPv2Spec(pooled_grid=(2, 2)),
    ],
)
def test_every_parameter_is_trained(spec):
    config = ConnectorConfig(
        vision_dim=4, llm_dim=8, num_layers=4, fusion=_FUSIONS["dci"], projector=spec
    )
    connector = DenseConnector(config)
    generator = _generator(8)
    features = {layer: torch.randn(2, 16, 4, generator=generator) for layer in range(5)}
    connector(features, (4, 4)).square().sum().backward()
    parameters = dict(connector.named_parameters())
    assert parameters  # the projector's, all of them
    for name, parameter in parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    if isinstance(spec, CAbstractorSpec):
        assert "projector.pos_embed" in parameters


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("dc-dci+c-abstractor-clip-l-336", 44_871_680),
        ("dc-dci+ldpv2-clip-l-336", 29_409_280),
        ("honeybee-c-abstractor-m144-clip-l-336", 37_398_016),
        ("mobilevlm-v2-1.7b-ldpv2-clip-l-336", 6_316_032),
        ("mobilevlm-v2-3b-ldpv2-clip-l-336", 9_205_760),
        ("mobilevlm-v2-7b-ldpv2-clip-l-336", 21_020_672),
    ],
)
def test_presets_count_144_tokens_at_real_size(name, parameters):
    geometry = preset_geometry(name)
    assert geometry.grid == (24, 24)
    with torch.device("meta"):
        connector = DenseConnector(ConnectorConfig.from_preset(name))
    assert connector.num_tokens(geometry.grid) == 144
    assert connector.token_grid(geometry.grid) == (12, 12)
    assert sum(p.numel() for p in connector.parameters()) == parameters


def test_c_abstractor_preset_refuses_another_grid():
    connector_config = ConnectorConfig.from_preset(
        "dc-dci+c-abstractor-clip-l-336", vision_dim=4, llm_dim=8
    )
    assert connector_config.projector.pos_embed_grid == (24, 24)
    with torch.device("meta"):
        connector = DenseConnector(connector_config)
    with pytest.raises(ValueError, match=r"cannot take the grid \(27, 27\)"):
        connector.num_tokens((27, 27))
    ldp = ConnectorConfig.from_preset("dc-dci+ldpv2-clip-l-336", vision_dim=4, llm_dim=8)
    with torch.device("meta"):
        assert DenseConnector(ldp).num_tokens((27, 27)) == 144


def test_reference_blocks_match_timm_names_used_by_the_converter():
    """The converter's key table names every tensor of timm's Bottleneck (both shortcut kinds)."""
    stage = timm_regnet.RegStage(
        2, 4, 8, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=timm_layers.LayerNorm2d
    )
    state = {f"net.0.{k}": v for k, v in stage.state_dict().items()}
    state |= {f"net.2.{k}": torch.zeros_like(v) for k, v in stage.state_dict().items()}
    state |= {"readout.0.weight": torch.zeros(3, 8), "readout.0.bias": torch.zeros(3)}
    converted = c_abstractor_state_from_honeybee(state)
    assert len(converted) == len(state)


def test_module_doctests_pass():
    import doctest

    from mmconnect.zoo import abstractors

    failures, attempted = doctest.testmod(abstractors)
    assert (failures, attempted) == (0, 8)
