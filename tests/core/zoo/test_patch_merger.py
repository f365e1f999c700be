"""The 2x2 patch mergers (issue 14): Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and DeepStack), Mistral 3.

Parity: HF's modules (transformers ``qwen2_vl.PatchMerger``, ``qwen2_5_vl.Qwen2_5_VLPatchMerger``,
``qwen3_vl.Qwen3VLVisionPatchMerger``, ``mistral3.Mistral3MultiModalProjector``) built from tiny
configs with seeded random weights (norms included), converted into ours, fed the same tokens:
ours in raster order, Qwen's in the 2x2-block order its processor makes, Mistral 3's in raster
order per image with its ``image_sizes``. Measured: equal bit for bit (``torch.equal``) in fp32
and in bf16 on the CPU — the same operations run in the same order (the norm before or after the
regrouping is per token), so no tolerance is needed.
"""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch
from einops import rearrange
from torch import Tensor, nn
from torch.testing import assert_close

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    preset_geometry,
)
from mmconnect.presets import preset_fields
from mmconnect.projectors import build_projector, parse_projector
from mmconnect.zoo import patch_merger as patch_merger_module
from mmconnect.zoo.patch_merger import (
    MISTRAL3_MERGER,
    QWEN2_5_VL_MERGER,
    QWEN2_VL_MERGER,
    QWEN3_VL_DEEPSTACK_MERGER,
    QWEN3_VL_MERGER,
    Mistral3MergerSpec,
    Mistral3Projector,
    PatchMerger,
    PatchMergerSpec,
    mistral3_projector_state_from_hf,
    qwen2_5_vl_merger_state_from_hf,
    qwen2_vl_merger_state_from_hf,
    qwen3_vl_merger_state_from_hf,
)

C, D, BATCH, PATCH = 8, 12, 2, 14


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter (norm weights and biases too) drawn from a seeded normal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


def _block_order(tokens: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """Raster ``[B, h*w, C]`` -> Qwen's flat ``[B*h*w, C]`` in (h/m, w/m, m, m) block order."""
    return rearrange(
        tokens,
        "b (h p w q) c -> (b h w p q) c",
        h=grid[0] // size,
        p=size,
        w=grid[1] // size,
        q=size,
    )


# ---------------------------------------------------------------------------- HF modules


def _hf_qwen2(size: int, postshuffle: bool = False) -> nn.Module:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as HFPatchMerger

    return HFPatchMerger(dim=D, context_dim=C, spatial_merge_size=size)


def _hf_qwen2_5(size: int, postshuffle: bool = False) -> nn.Module:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    return Qwen2_5_VLPatchMerger(dim=D, context_dim=C, spatial_merge_size=size)


def _hf_qwen3(size: int, postshuffle: bool = False) -> nn.Module:
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    config = Qwen3VLVisionConfig(hidden_size=C, out_hidden_size=D, spatial_merge_size=size)
    return Qwen3VLVisionPatchMerger(config, use_postshuffle_norm=postshuffle)


def _hf_mistral3(size: int, bias: bool) -> nn.Module:
    from transformers import Mistral3Config
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    config = Mistral3Config(
        vision_config={
            "model_type": "pixtral",
            "hidden_size": C,
            "patch_size": PATCH,
            "num_attention_heads": 2,
            "head_dim": 4,
        },
        text_config={"model_type": "mistral", "hidden_size": D, "rms_norm_eps": 1e-5},
        spatial_merge_size=size,
        multimodal_projector_bias=bias,
    )
    return Mistral3MultiModalProjector(config)


QWEN_CASES = {
    "qwen2_vl": (_hf_qwen2, qwen2_vl_merger_state_from_hf, QWEN2_VL_MERGER, False),
    "qwen2_5_vl": (_hf_qwen2_5, qwen2_5_vl_merger_state_from_hf, QWEN2_5_VL_MERGER, False),
    "qwen3_vl": (_hf_qwen3, qwen3_vl_merger_state_from_hf, QWEN3_VL_MERGER, False),
    "qwen3_vl_deepstack": (
        _hf_qwen3,
        qwen3_vl_merger_state_from_hf,
        QWEN3_VL_DEEPSTACK_MERGER,
        True,
    ),
}


def _qwen_pair(case: str, size: int) -> tuple[nn.Module, PatchMerger]:
    pytest.importorskip("transformers")
    build_hf, convert, spec, postshuffle = QWEN_CASES[case]
    hf = _randomized(build_hf(size, postshuffle), seed=0)
    ours = PatchMerger(C, D, **dataclasses.replace(spec, merge_size=size).parameters())
    ours.load_state_dict(convert(hf.state_dict()))
    return hf.eval(), ours.eval()


def _mistral3_pair(size: int, bias: bool) -> tuple[nn.Module, Mistral3Projector]:
    pytest.importorskip("transformers")
    hf = _randomized(_hf_mistral3(size, bias), seed=0)
    ours = Mistral3Projector(C, D, merge_size=size, bias=bias)
    ours.load_state_dict(mistral3_projector_state_from_hf(hf.state_dict()))
    return hf.eval(), ours.eval()


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("size", "grid"), [(2, (4, 6)), (2, (6, 2)), (3, (6, 9))])
@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen_mergers_equal_hf_bit_for_bit(case, size, grid, dtype):
    hf, ours = _qwen_pair(case, size)
    hf.to(dtype), ours.to(dtype)
    tokens = _randn(1, BATCH, grid[0] * grid[1], C).to(dtype)
    with torch.no_grad():
        expected = hf(_block_order(tokens, grid, size)).reshape(BATCH, -1, D)
        output = ours(tokens, grid)
    assert output.shape == (BATCH, ours.num_tokens(grid), D)
    assert output.dtype == dtype
    assert torch.equal(output, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(("size", "grid"), [(2, (4, 6)), (2, (6, 2)), (3, (6, 9))])
def test_mistral3_projector_equals_hf_bit_for_bit(size, grid, bias, dtype):
    hf, ours = _mistral3_pair(size, bias)
    hf.to(dtype), ours.to(dtype)
    tokens = _randn(2, BATCH, grid[0] * grid[1], C).to(dtype)
    # HF: the images' tokens one after the other, each in raster order, sizes in pixels.
    image_sizes = torch.tensor([[grid[0] * PATCH, grid[1] * PATCH]] * BATCH)
    with torch.no_grad():
        expected = hf(tokens.reshape(-1, C), image_sizes).reshape(BATCH, -1, D)
        output = ours(tokens, grid)
    assert output.shape == (BATCH, ours.num_tokens(grid), D)
    assert torch.equal(output, expected)


def test_mistral3_projector_matches_hf_on_images_of_different_sizes():
    """HF projects several images of different sizes in one call; ours one grid per call.

    The regrouping is exact: our layers on the concatenated blocks give HF's output bit for bit.
    One call per image gives the same values to float32 rounding only (measured max |diff|
    1.4e-6 on outputs of magnitude ~3, a few ulp): the matmul kernels block the rows
    differently for 6 + 1 + 6 rows than for 13, so the sums round differently.
    """
    hf, ours = _mistral3_pair(2, bias=False)
    grids = [(4, 6), (2, 2), (6, 4)]
    images = [_randn(10 + index, 1, h * w, C) for index, (h, w) in enumerate(grids)]
    sizes = torch.tensor([[h * PATCH, w * PATCH] for h, w in grids])
    with torch.no_grad():
        expected = hf(torch.cat([image[0] for image in images]), sizes)
        blocks = torch.cat(
            [
                rearrange(ours.norm(image), "b (h p w q) c -> (b h w) (c p q)", h=h // 2, p=2, q=2)
                for image, (h, _) in zip(images, grids, strict=True)
            ]
        )
        assert torch.equal(ours.fc2(ours.act(ours.fc1(ours.merge(blocks)))), expected)
        output = torch.cat(
            [ours(image, grid)[0] for image, grid in zip(images, grids, strict=True)]
        )
    assert_close(output, expected, rtol=1.3e-6, atol=1e-5)


def test_regrouping_concatenates_each_block_in_the_reference_order():
    """By hand on a 4x6 grid of 1-channel tokens numbered 0..23 in raster order: output token
    (0, 1) merges tokens 2, 3, 8, 9; Qwen concatenates them token by token (p, q, c), Mistral 3
    channel-major (c, p, q) as torch's unfold."""
    tokens = torch.arange(24.0).reshape(1, 24, 1).repeat(1, 1, 2)
    tokens[..., 1] += 100  # channel 1 of token t is 100 + t
    captured = {}
    qwen = PatchMerger(2, 3, norm="rmsnorm", postshuffle_norm=True, norm_eps=1.0)
    mistral = Mistral3Projector(2, 3)
    for name, module, layer in (("qwen", qwen, qwen.norm), ("mistral", mistral, mistral.merge)):
        layer.register_forward_pre_hook(
            lambda _, args, name=name: captured.setdefault(name, args[0])
        )
        with torch.no_grad():
            module.norm.weight.fill_(1.0)
            module(tokens, (4, 6))
    assert captured["qwen"][0, 1].tolist() == [2, 102, 3, 103, 8, 108, 9, 109]
    # Mistral 3 norms first: undo the (per-token) RMSNorm to read the token ids back.
    normed = mistral.norm(tokens)[0]
    order = [(2, 0), (3, 0), (8, 0), (9, 0), (2, 1), (3, 1), (8, 1), (9, 1)]
    assert torch.equal(captured["mistral"][0, 1], torch.stack([normed[t, c] for t, c in order]))
    assert captured["qwen"].shape == (1, 6, 8) and captured["mistral"].shape == (1, 6, 8)


# ---------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("module", [PatchMerger(C, D), Mistral3Projector(C, D)], ids=["qwen", "m3"])
def test_exact_token_counts_and_grids(module):
    assert (module.output_grid((24, 24)), module.num_tokens((24, 24))) == ((12, 12), 144)
    assert (module.output_grid((4, 6)), module.num_tokens((4, 6))) == ((2, 3), 6)
    assert (module.output_grid((16, 2)), module.num_tokens((16, 2))) == ((8, 1), 8)
    assert module(_randn(0, 1, 16 * 2, C), (16, 2)).shape == (1, 8, D)


def test_merge_size_three_counts():
    merger = PatchMerger(C, D, merge_size=3)
    assert (merger.output_grid((27, 27)), merger.num_tokens((27, 27))) == ((9, 9), 81)
    assert merger.num_tokens((6, 9)) == 6
    with pytest.raises(ValueError, match="sides are multiples of 3, got a 24x25 grid"):
        merger.num_tokens((24, 25))


@pytest.mark.parametrize("module", [PatchMerger(C, D), Mistral3Projector(C, D)], ids=["qwen", "m3"])
@pytest.mark.parametrize("grid", [(27, 27), (24, 25), (5, 4), (1, 1)])
def test_a_grid_with_an_odd_side_is_refused_before_running(module, grid):
    message = f"sides are multiples of 2, got a {grid[0]}x{grid[1]} grid"
    with pytest.raises(ValueError, match=message):
        module.output_grid(grid)
    with pytest.raises(ValueError, match=message):
        module.num_tokens(grid)
    with pytest.raises(ValueError, match=message):
        module(_randn(0, 1, grid[0] * grid[1], C), grid)


@pytest.mark.parametrize("module", [PatchMerger(C, D), Mistral3Projector(C, D)], ids=["qwen", "m3"])
def test_tokens_that_do_not_fit_the_grid_or_width_are_refused(module):
    with pytest.raises(ValueError, match=r"tokens must be \[batch, 4\*6, 8\] .* got \(1, 20, 8\)"):
        module(_randn(0, 1, 20, C), (4, 6))
    with pytest.raises(ValueError, match=r"got \(1, 24, 4\)"):
        module(_randn(0, 1, 24, 4), (4, 6))
    with pytest.raises(TypeError, match="grid must be a"):
        module.num_tokens((4.0, 6))


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "changes", "error", "argument"),
    [
        (PatchMergerSpec, {"merge_size": 2.0}, TypeError, "merge_size"),
        (PatchMergerSpec, {"merge_size": True}, TypeError, "merge_size"),
        (PatchMergerSpec, {"merge_size": 0}, ValueError, "merge_size"),
        (PatchMergerSpec, {"norm": "batchnorm"}, ValueError, "norm"),
        (PatchMergerSpec, {"postshuffle_norm": 1}, TypeError, "postshuffle_norm"),
        (PatchMergerSpec, {"hidden_dim": "64"}, TypeError, "hidden_dim"),
        (PatchMergerSpec, {"hidden_dim": 0}, ValueError, "hidden_dim"),
        (PatchMergerSpec, {"norm_eps": "1e-6"}, TypeError, "norm_eps"),
        (PatchMergerSpec, {"norm_eps": 0.0}, ValueError, "norm_eps"),
        (PatchMergerSpec, {"norm_eps": float("nan")}, ValueError, "norm_eps"),
        (Mistral3MergerSpec, {"merge_size": "2"}, TypeError, "merge_size"),
        (Mistral3MergerSpec, {"merge_size": -2}, ValueError, "merge_size"),
        (Mistral3MergerSpec, {"norm_eps": -1e-5}, ValueError, "norm_eps"),
        (Mistral3MergerSpec, {"bias": None}, TypeError, "bias"),
    ],
)
def test_spec_validation(spec, changes, error, argument):
    with pytest.raises(error, match=f"^{argument} must be"):
        spec(**changes)
    with pytest.raises(error, match=f"^{argument} must be"):  # the module checks through the spec
        (PatchMerger if spec is PatchMergerSpec else Mistral3Projector)(C, D, **changes)


def test_specs_round_trip_through_the_config_and_parse_by_name():
    for spec in (QWEN2_5_VL_MERGER, PatchMergerSpec(hidden_dim=16, postshuffle_norm=True)):
        config = ConnectorConfig(
            vision_dim=C, llm_dim=D, num_layers=4, fusion="none", projector=spec
        )
        assert ConnectorConfig.from_dict(config.to_dict()) == config
    assert parse_projector("patch_merger") == QWEN2_VL_MERGER == QWEN3_VL_MERGER
    assert parse_projector("mistral3_merger") == MISTRAL3_MERGER
    assert parse_projector({"kind": "mistral3_merger", "bias": True}) == Mistral3MergerSpec(
        bias=True
    )
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        parse_projector({"kind": "patch_merger", "depth": 2})
    assert Mistral3MergerSpec(norm_eps=1).norm_eps == 1.0
    with pytest.raises(ValueError, match="in_dim must be a positive int, got 0"):
        build_projector(QWEN2_VL_MERGER, 0, D)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_module_layouts():
    assert _shapes(PatchMerger(C, D)) == {
        "norm.weight": (8,),
        "norm.bias": (8,),
        "fc1.weight": (32, 32),
        "fc1.bias": (32,),
        "fc2.weight": (12, 32),
        "fc2.bias": (12,),
    }
    assert _shapes(PatchMerger(C, D, norm="rmsnorm", postshuffle_norm=True, hidden_dim=5)) == {
        "norm.weight": (32,),
        "fc1.weight": (5, 32),
        "fc1.bias": (5,),
        "fc2.weight": (12, 5),
        "fc2.bias": (12,),
    }
    assert _shapes(Mistral3Projector(C, D)) == {
        "norm.weight": (8,),
        "merge.weight": (8, 32),
        "fc1.weight": (12, 8),
        "fc2.weight": (12, 12),
    }


# ---------------------------------------------------------------------------- converters


def test_converters_read_under_a_prefix_and_ignore_the_rest():
    hf, ours = _qwen_pair("qwen2_5_vl", 2)
    state = {f"model.visual.merger.{key}": value for key, value in hf.state_dict().items()}
    state["model.visual.blocks.0.norm1.weight"] = torch.ones(C)
    state["model.visual.merger_extra.weight"] = torch.ones(C)  # not under "...merger."
    converted = qwen2_5_vl_merger_state_from_hf(state, prefix="model.visual.merger.")
    assert sorted(converted) == sorted(ours.state_dict())
    assert torch.equal(converted["fc1.weight"], hf.mlp[0].weight)
    # Qwen3-VL's DeepStack mergers by their index.
    hf3, _ = _qwen_pair("qwen3_vl_deepstack", 2)
    state = {
        f"model.visual.deepstack_merger_list.{index}.{key}": value
        for index in (0, 1)
        for key, value in hf3.state_dict().items()
    }
    deep = qwen3_vl_merger_state_from_hf(state, prefix="model.visual.deepstack_merger_list.1.")
    assert deep["norm.weight"].shape == (4 * C,)
    PatchMerger(C, D, **QWEN3_VL_DEEPSTACK_MERGER.parameters()).load_state_dict(deep)


def test_converters_name_missing_and_unexpected_keys():
    hf, _ = _qwen_pair("qwen2_vl", 2)
    qwen2 = hf.state_dict()
    # A Qwen2-VL merger (LayerNorm) is not a Qwen2.5-VL one (RMSNorm): its ln_q.bias is extra.
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['ln_q.bias'\]"):
        qwen2_5_vl_merger_state_from_hf(qwen2)
    without = {key: value for key, value in qwen2.items() if key != "mlp.2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['p.mlp.2.bias'\]"):
        qwen2_vl_merger_state_from_hf({f"p.{k}": v for k, v in without.items()}, prefix="p.")
    with pytest.raises(ValueError, match=r"missing keys \['linear_fc1.bias', .*unexpected keys"):
        qwen3_vl_merger_state_from_hf(qwen2)
    with pytest.raises(ValueError, match="missing keys"):  # nothing under a wrong prefix
        qwen2_vl_merger_state_from_hf(qwen2, prefix="model.visual.merger.")
    with pytest.raises(TypeError, match="state must be a mapping"):
        qwen2_vl_merger_state_from_hf([("ln_q.weight", torch.ones(C))])
    with pytest.raises(TypeError, match="prefix must be a str"):
        qwen2_vl_merger_state_from_hf(qwen2, prefix=None)


def test_converters_refuse_inconsistent_shapes():
    hf, _ = _qwen_pair("qwen2_vl", 2)
    state = dict(hf.state_dict())
    state["mlp.2.bias"] = torch.zeros(D + 1)
    with pytest.raises(ValueError, match=r"fc2.bias: \(13,\) in the weights, \(12,\) expected"):
        qwen2_vl_merger_state_from_hf(state)
    state = dict(hf.state_dict()) | {"mlp.0.weight": torch.zeros(32, 24), "mlp.2.weight": None}
    state["mlp.2.weight"] = torch.zeros(D, 32)
    with pytest.raises(ValueError, match="24 inputs, which is not m\\^2 times the norm's width 8"):
        qwen2_vl_merger_state_from_hf(state)


def test_mistral3_converter_biases_both_or_neither():
    hf, _ = _mistral3_pair(2, bias=True)
    state = dict(hf.state_dict())
    assert sorted(mistral3_projector_state_from_hf(state)) == sorted(
        Mistral3Projector(C, D, bias=True).state_dict()
    )
    del state["linear_2.bias"]
    with pytest.raises(ValueError, match=r"have linear_1\.bias but not the other Linear's bias"):
        mistral3_projector_state_from_hf(state)
    hf, _ = _mistral3_pair(2, bias=False)
    state = dict(hf.state_dict()) | {"patch_merger.merging_layer.weight": torch.zeros(C, 4 * C + 1)}
    with pytest.raises(ValueError, match="33 inputs, which is not m\\^2 times"):
        mistral3_projector_state_from_hf(state)
    state = {f"model.multi_modal_projector.{k}": v for k, v in hf.state_dict().items()}
    state["model.multi_modal_projector.patch_merger.extra"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"unexpected keys \['model.multi_modal_projector.patch_merger.extra'\]"
    ):
        mistral3_projector_state_from_hf(state, prefix="model.multi_modal_projector.")


# ---------------------------------------------------------------------------- composition


FUSIONS = {
    "none": SingleLayerSpec(final_layer=-1),
    "sci": SCISpec(final_layer=-1, extra_layers=(1,)),
    "dci": DCISpec(final_layer=-1, groups=((0, 1), (2, 3))),
}


@pytest.mark.parametrize(
    "projector", [QWEN2_5_VL_MERGER, QWEN3_VL_DEEPSTACK_MERGER, MISTRAL3_MERGER]
)
@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_composes_with_every_fusion_and_trains_every_parameter(fusion, projector):
    torch.manual_seed(0)
    config = ConnectorConfig(
        vision_dim=4, llm_dim=6, num_layers=4, fusion=FUSIONS[fusion], projector=projector
    )
    connector = DenseConnector(config)
    fused = {"none": 4, "sci": 8, "dci": 12}[fusion]
    assert connector.projector.in_dim == fused
    for grid, merged in (((4, 6), (2, 3)), ((2, 2), (1, 1)), ((8, 8), (4, 4))):
        assert connector.num_tokens(grid) == config.num_tokens(grid) == merged[0] * merged[1]
        assert connector.token_grid(grid) == config.token_grid(grid) == merged
    features = {layer: _randn(layer, 2, 4 * 6, 4) for layer in range(5)}
    output = connector(features, (4, 6))
    assert output.shape == (2, connector.num_tokens((4, 6)), 6) == (2, 6, 6)
    output.square().mean().backward()
    parameters = dict(connector.projector.named_parameters())
    assert parameters and all(isinstance(p, nn.Parameter) for p in parameters.values())
    for name, parameter in parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert {name for name, _ in connector.named_parameters()} == {
        f"projector.{name}" for name in parameters
    }
    with pytest.raises(ValueError, match="sides are multiples of 2, got a 3x6 grid"):
        connector.num_tokens((3, 6))
    with pytest.raises(ValueError, match="sides are multiples of 2, got a 3x6 grid"):
        connector({layer: _randn(layer, 1, 18, 4) for layer in range(5)}, (3, 6))


@pytest.mark.parametrize("projector", [QWEN2_VL_MERGER, MISTRAL3_MERGER])
def test_sti_into_a_merger_is_refused(projector):
    config = ConnectorConfig(
        vision_dim=4,
        llm_dim=6,
        num_layers=4,
        fusion=STISpec(final_layer=-1, extra_layers=(1,), window=2),
        projector=projector,
    )
    connector = DenseConnector(config)
    message = "gives 8 tokens after its 4x4 grid that form no grid"
    with pytest.raises(ValueError, match=message):
        connector.num_tokens((4, 4))
    with pytest.raises(ValueError, match=message):
        connector({layer: _randn(layer, 1, 16, 4) for layer in range(5)}, (4, 4))


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("name", "projector"),
    [
        ("dc-dci+qwen2-merger-clip-l-336", QWEN2_VL_MERGER),
        ("dc-dci+qwen2.5-merger-clip-l-336", QWEN2_5_VL_MERGER),
        ("dc-dci+mistral3-merger-clip-l-336", MISTRAL3_MERGER),
    ],
)
def test_presets_count_144_tokens_on_clip_l_336(name, projector):
    geometry = preset_geometry(name)
    assert geometry.grid == (24, 24)
    config = ConnectorConfig.from_preset(name)
    assert config.projector == projector
    assert config.fusion.kind == "dci" and (config.vision_dim, config.llm_dim) == (1024, 4096)
    assert config.num_tokens(geometry.grid) == 144
    assert config.token_grid(geometry.grid) == (12, 12)
    assert preset_fields(name)["projector"] == projector
    small = DenseConnector(ConnectorConfig.from_preset(name, vision_dim=2, llm_dim=3))
    assert small.projector.in_dim == 6  # DCI: three times the tower width
    features = {layer: _randn(layer, 1, 576, 2) for layer in range(25)}
    assert small(features, geometry.grid).shape == (1, 144, 3)


# ---------------------------------------------------------------------------- real sizes


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_parameters_at_real_size_equal_hf():
    """Built on the meta device (no memory): our modules have HF's parameter counts."""
    pytest.importorskip("transformers")
    from transformers import Mistral3Config, Qwen3VLVisionConfig
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as HFPatchMerger
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    with torch.device("meta"):
        # Qwen2-VL-7B / Qwen2.5-VL-7B: vision width 1280, LLM 3584.
        assert _count(PatchMerger(1280, 3584)) == _count(HFPatchMerger(3584, 1280)) == 44_575_744
        assert (
            _count(PatchMerger(1280, 3584, **QWEN2_5_VL_MERGER.parameters()))
            == _count(Qwen2_5_VLPatchMerger(3584, 1280))
            == 44_574_464
        )
        # Qwen3-VL's config defaults: vision width 1152, out 3584.
        vision = Qwen3VLVisionConfig()
        assert (vision.hidden_size, vision.out_hidden_size) == (1152, 3584)
        assert _count(PatchMerger(1152, 3584)) == _count(Qwen3VLVisionPatchMerger(vision))
        deep = PatchMerger(1152, 3584, **QWEN3_VL_DEEPSTACK_MERGER.parameters())
        assert _count(deep) == _count(Qwen3VLVisionPatchMerger(vision, True)) == 37_766_144
        # Mistral-Small-3.1 (Mistral3Config defaults): vision 1024, text 5120, eps 1e-5.
        config = Mistral3Config()
        assert (config.vision_config.hidden_size, config.text_config.hidden_size) == (1024, 5120)
        assert config.text_config.rms_norm_eps == MISTRAL3_MERGER.norm_eps
        ours = Mistral3Projector(1024, 5120, **MISTRAL3_MERGER.parameters())
        assert _count(ours) == _count(Mistral3MultiModalProjector(config)) == 35_652_608


def test_doctests_pass():
    failures, attempted = doctest.testmod(patch_merger_module)
    assert failures == 0 and attempted >= 5
