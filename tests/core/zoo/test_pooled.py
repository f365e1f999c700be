"""Pooled projectors (mmconnect.zoo.pooled): Gemma 3's and LLaVA-OneVision's, against Hugging Face.

docs/zoo/pooled.md: ``gemma3_pool`` is average pooling to the spec's grid, Gemma's offset RMSNorm
and a matmul (``Gemma3MultiModalProjector``); ``onevision_pool`` is LLaVA's MLP then a bilinear
resize to ``ceil(h/2) x ceil(w/2)`` (``LlavaOnevisionMultiModalProjector`` +
``LlavaOnevisionModel.apply_pooling``). The parity tests copy the weights of a tiny seeded Hugging
Face model into ours and compare outputs bit for bit, in float32 and bfloat16.
"""

from __future__ import annotations

import doctest
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mmconnect.zoo.pooled as pooled_module
from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    build_projector,
    list_projectors,
    preset_geometry,
)
from mmconnect.zoo.pooled import (
    GEMMA3_SIGLIP_SO400M_896,
    Gemma3PooledProjector,
    Gemma3PoolSpec,
    OnevisionPooledProjector,
    OnevisionPoolSpec,
    gemma3_pool_state_from_hf,
    onevision_pool_state_from_hf,
)

VISION, LLM = 8, 16
HF_PREFIX = "model.multi_modal_projector."


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seed_parameters(module: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (Gemma's zero-initialised ones too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


_TINY_SIGLIP = {
    "model_type": "siglip_vision_model",
    "hidden_size": VISION,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
}


@pytest.fixture(scope="module")
def gemma3():
    """A tiny Gemma 3: an 8x8 patch grid (32 px / 4) pooled to 2x2 (``mm_tokens_per_image=4``)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma3Config(
        vision_config={**_TINY_SIGLIP, "image_size": 32, "patch_size": 4},
        text_config={
            "hidden_size": LLM,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "intermediate_size": 32,
            "vocab_size": 64,
        },
        mm_tokens_per_image=4,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _seed_parameters(model.model.multi_modal_projector, seed=1)
    return model


@pytest.fixture(scope="module")
def onevision():
    """A tiny LLaVA-OneVision whose video path pools a 7x7 grid (28 px / 4) to 4x4."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlavaOnevisionConfig(
        vision_config={**_TINY_SIGLIP, "image_size": 28, "patch_size": 4},
        text_config={
            "model_type": "qwen2",
            "hidden_size": LLM,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 32,
            "vocab_size": 64,
        },
    )
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    _seed_parameters(model.model.multi_modal_projector, seed=2)
    return model


# ------------------------------------------------------------------------------ parity


def _gemma3_ours(model) -> Gemma3PooledProjector:
    eps = model.config.vision_config.layer_norm_eps
    ours = build_projector(Gemma3PoolSpec(grid=2, eps=eps), in_dim=VISION, out_dim=LLM)
    ours.load_state_dict(gemma3_pool_state_from_hf(model.state_dict(), prefix=HF_PREFIX))
    return ours


def test_gemma3_pool_matches_hf_exactly_in_fp32(gemma3):
    ours = _gemma3_ours(gemma3)
    tokens = _randn(3, 2, 64, VISION)
    with torch.no_grad():
        expected = gemma3.model.multi_modal_projector(tokens)
        output = ours(tokens, (8, 8))
    assert expected.shape == output.shape == (2, 4, LLM)
    assert torch.equal(output, expected)  # the same ops in the same order: bit for bit


def test_gemma3_pool_matches_hf_exactly_in_bf16(gemma3):
    hf = gemma3.model.multi_modal_projector
    ours = _gemma3_ours(gemma3).to(torch.bfloat16)
    tokens = _randn(4, 2, 64, VISION).to(torch.bfloat16)
    original = {name: value.clone() for name, value in hf.state_dict().items()}
    try:
        hf.to(torch.bfloat16)
        with torch.no_grad():
            expected = hf(tokens)
            output = ours(tokens, (8, 8))
    finally:
        hf.to(torch.float32).load_state_dict(original)
    assert output.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(output, expected)  # measured: identical in bf16 as well


def _onevision_ours(model) -> OnevisionPooledProjector:
    ours = build_projector(OnevisionPoolSpec(), in_dim=VISION, out_dim=LLM)
    ours.load_state_dict(onevision_pool_state_from_hf(model.state_dict(), prefix=HF_PREFIX))
    return ours


def test_onevision_pool_matches_hf_exactly_in_fp32(onevision):
    ours = _onevision_ours(onevision)
    tokens = _randn(5, 3, 49, VISION)
    with torch.no_grad():
        expected = onevision.model.apply_pooling(onevision.model.multi_modal_projector(tokens))
        output = ours(tokens, (7, 7))
    assert expected.shape == output.shape == (3, 16, LLM)
    assert torch.equal(output, expected)


def test_onevision_pool_matches_hf_exactly_in_bf16(onevision):
    hf = onevision.model.multi_modal_projector
    ours = _onevision_ours(onevision).to(torch.bfloat16)
    tokens = _randn(6, 3, 49, VISION).to(torch.bfloat16)
    original = {name: value.clone() for name, value in hf.state_dict().items()}
    try:
        hf.to(torch.bfloat16)
        with torch.no_grad():
            expected = onevision.model.apply_pooling(hf(tokens))
            output = ours(tokens, (7, 7))
    finally:
        hf.to(torch.float32).load_state_dict(original)
    assert output.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(output, expected)


def test_gemma3_image_path_end_to_end(gemma3):
    """``Gemma3Model.get_image_features`` equals a ``none`` connector on the tower's last layer
    once the tower's post-LayerNorm is applied to it (Gemma 3 projects ``last_hidden_state``)."""
    pixels = _randn(11, 2, 3, 32, 32)
    connector = DenseConnector(
        ConnectorConfig(
            vision_dim=VISION,
            llm_dim=LLM,
            num_layers=1,
            fusion=SingleLayerSpec(final_layer=-1),
            projector=Gemma3PoolSpec(grid=2),
        )
    )
    connector.projector.load_state_dict(
        gemma3_pool_state_from_hf(gemma3.state_dict(), prefix=HF_PREFIX)
    )
    tower = gemma3.model.vision_tower
    with torch.no_grad():
        expected = gemma3.model.get_image_features(pixels, return_dict=True).pooler_output
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        output = connector(
            {1: getattr(tower, "vision_model", tower).post_layernorm(hidden[-1])}, (8, 8)
        )
    assert expected.shape == output.shape == (2, 4, LLM)
    assert torch.equal(output, expected)


def test_onevision_video_path_end_to_end(onevision):
    """``LlavaOnevisionModel.get_video_features`` (layer -1, ``"full"``) equals a ``none``
    connector on the tower's last layer, frame by frame, before OneVision's trailing newline."""
    assert onevision.config.vision_feature_layer == -1
    assert onevision.config.vision_feature_select_strategy == "full"
    video = _randn(12, 1, 2, 3, 28, 28)
    connector = DenseConnector(
        ConnectorConfig(
            vision_dim=VISION,
            llm_dim=LLM,
            num_layers=1,
            fusion=SingleLayerSpec(final_layer=-1),
            projector=OnevisionPoolSpec(),
        )
    )
    connector.projector.load_state_dict(
        onevision_pool_state_from_hf(onevision.state_dict(), prefix=HF_PREFIX)
    )
    with torch.no_grad():
        expected = onevision.model.get_video_features(pixel_values_videos=video, return_dict=True)
        hidden = onevision.model.vision_tower(video.flatten(0, 1), output_hidden_states=True)
        output = connector({1: hidden.hidden_states[-1]}, (7, 7))
    assert output.shape == (2, 16, LLM)
    assert expected.pooler_output.shape == (1, 2 * 16 + 1, LLM)  # + image_newline
    assert torch.equal(output.reshape(1, 32, LLM), expected.pooler_output[:, :-1])


def test_gemma3_pool_non_square_grid_exact_values():
    """Hugging Face pools square grids only; ours applies the rule per side: a 4x6 grid to a
    2x3 output pools 2x2 blocks, checked here against the equations written out."""
    torch.manual_seed(0)
    ours = build_projector(Gemma3PoolSpec(grid=(2, 3), eps=1e-6), in_dim=VISION, out_dim=LLM)
    _seed_parameters(ours, seed=7)
    tokens = _randn(8, 1, 24, VISION)
    maps = tokens[0].reshape(4, 6, VISION)
    pooled = torch.stack(
        [
            maps[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(0, 1))
            for i in range(2)
            for j in range(3)
        ]
    )
    normed = pooled / torch.sqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = (normed * (1 + ours.norm.weight)) @ ours.projection
    with torch.no_grad():
        output = ours(tokens, (4, 6))
    assert output.shape == (1, 6, LLM)
    torch.testing.assert_close(output[0], expected.detach(), atol=1e-5, rtol=1e-5)


def test_onevision_pool_odd_side_exact_weights():
    """align_corners=False bilinear from 3 rows to 2: rows 0.75 z0 + 0.25 z1 and 0.25 z1 + 0.75 z2
    (a width of 1 stays 1, so only the rows mix)."""
    ours = build_projector(OnevisionPoolSpec(depth=1), in_dim=2, out_dim=2)
    with torch.no_grad():
        ours.linear_1.weight.copy_(torch.eye(2))
        ours.linear_1.bias.zero_()
    tokens = torch.tensor([[[4.0, 0.0], [8.0, 4.0], [0.0, 16.0]]])
    with torch.no_grad():
        output = ours(tokens, (3, 1))
    assert torch.equal(output, torch.tensor([[[5.0, 1.0], [2.0, 13.0]]]))


def test_onevision_pool_on_even_sides_is_2x2_average_pooling():
    """At stride 2 on even sides every output sample sits between four inputs: the resize is a
    2x2 average (non-square grid included)."""
    torch.manual_seed(0)
    ours = build_projector(OnevisionPoolSpec(), in_dim=VISION, out_dim=LLM)
    tokens = _randn(9, 2, 24, VISION)
    with torch.no_grad():
        projected = ours.linear_2(ours.act(ours.linear_1(tokens)))
        maps = projected.transpose(1, 2).reshape(2, LLM, 4, 6)
        expected = F.avg_pool2d(maps, 2).flatten(2).transpose(1, 2)
        output = ours(tokens, (4, 6))
    assert output.shape == (2, 6, LLM)
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("spec", "grid", "out_grid"),
    [
        (Gemma3PoolSpec(grid=16), (64, 64), (16, 16)),  # Gemma 3: 896 px / 14
        (Gemma3PoolSpec(grid=12), (24, 24), (12, 12)),
        (Gemma3PoolSpec(grid=9), (27, 27), (9, 9)),
        (Gemma3PoolSpec(grid=(16, 16)), (64, 32), (16, 16)),  # kernel 4x2
        (Gemma3PoolSpec(grid=(3, 5)), (6, 20), (3, 5)),
        (OnevisionPoolSpec(), (27, 27), (14, 14)),
        (OnevisionPoolSpec(), (24, 24), (12, 12)),
        (OnevisionPoolSpec(), (7, 4), (4, 2)),
        (OnevisionPoolSpec(), (1, 1), (1, 1)),
        (OnevisionPoolSpec(stride=3), (27, 26), (9, 9)),
    ],
)
def test_token_counts_and_grids(spec, grid, out_grid):
    projector = build_projector(spec, in_dim=VISION, out_dim=LLM)
    assert projector.output_grid(grid) == out_grid
    assert projector.num_tokens(grid) == out_grid[0] * out_grid[1]
    tokens = _randn(0, 1, grid[0] * grid[1], VISION)
    with torch.no_grad():
        assert projector(tokens, grid).shape == (1, out_grid[0] * out_grid[1], LLM)


@pytest.mark.parametrize(
    ("out", "grid"), [(16, (27, 27)), (16, (24, 24)), (9, (27, 28)), ((2, 3), (4, 4))]
)
def test_gemma3_pool_refuses_grids_it_cannot_pool_exactly(out, grid):
    projector = build_projector(Gemma3PoolSpec(grid=out), in_dim=VISION, out_dim=LLM)
    out_grid = (out, out) if isinstance(out, int) else out
    message = (
        f"gemma3_pool cannot average-pool the {grid[0]}x{grid[1]} token grid to its "
        f"{out_grid[0]}x{out_grid[1]} output grid: each side must be a whole multiple of the output side "
        rf"\({grid[0]} % {out_grid[0]} = {grid[0] % out_grid[0]}, {grid[1]} % {out_grid[1]} = "
        rf"{grid[1] % out_grid[1]}\); choose a Gemma3PoolSpec grid"
    )
    for declared in (projector.output_grid, projector.num_tokens):
        with pytest.raises(ValueError, match=message):
            declared(grid)
    with pytest.raises(ValueError, match=message):
        projector(_randn(0, 1, grid[0] * grid[1], VISION), grid)


# ------------------------------------------------------------------------------- specs


def test_specs_round_trip_through_json_configs():
    for projector in (Gemma3PoolSpec(grid=(2, 3), eps=1e-5), OnevisionPoolSpec(depth=3, stride=4)):
        config = ConnectorConfig(
            vision_dim=VISION,
            llm_dim=LLM,
            num_layers=4,
            fusion=SCISpec(extra_layers=(1,)),
            projector=projector,
        )
        again = ConnectorConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
        assert type(again.projector) is type(projector)
    assert Gemma3PoolSpec(grid=4).to_dict() == {"kind": "gemma3_pool", "grid": [4, 4], "eps": 1e-6}
    assert Gemma3PoolSpec(grid=[4, 2]).grid == (4, 2)
    assert {"gemma3_pool", "onevision_pool"} <= set(list_projectors())


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Gemma3PoolSpec(grid=2.0), TypeError, "grid must be an int or a"),
        (lambda: Gemma3PoolSpec(grid=(4, "4")), TypeError, r"grid\[1\] must be a positive int"),
        (lambda: Gemma3PoolSpec(grid=0), ValueError, "grid must be a positive int, got 0"),
        (lambda: Gemma3PoolSpec(grid=(4, 0)), ValueError, r"grid\[1\] must be a positive int"),
        (lambda: Gemma3PoolSpec(eps="1e-6"), TypeError, "eps must be a positive number"),
        (lambda: Gemma3PoolSpec(eps=0.0), ValueError, "eps must be a positive number, got 0.0"),
        (lambda: OnevisionPoolSpec(depth=2.0), TypeError, "depth must be a positive int"),
        (lambda: OnevisionPoolSpec(depth=0), ValueError, "depth must be a positive int, got 0"),
        (lambda: OnevisionPoolSpec(stride=True), TypeError, "stride must be a positive int"),
        (lambda: OnevisionPoolSpec(stride=0), ValueError, "stride must be a positive int, got 0"),
        (lambda: OnevisionPoolSpec(bias=1), TypeError, "bias must be a bool"),
        (lambda: OnevisionPoolSpec(activation="tanh"), ValueError, "activation must be one of"),
    ],
)
def test_spec_validation(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ------------------------------------------------------------------------- converters


def test_gemma3_converter_names_and_errors():
    weight, norm = _randn(0, VISION, LLM), _randn(1, VISION)
    state = {"x.mm_input_projection_weight": weight, "x.mm_soft_emb_norm.weight": norm, "y": norm}
    converted = gemma3_pool_state_from_hf(state, prefix="x.")
    assert converted.keys() == {"norm.weight", "projection"}
    assert converted["projection"] is weight and converted["norm.weight"] is norm
    with pytest.raises(ValueError, match=r"missing x\.mm_soft_emb_norm\.weight; unexpected x\.b"):
        gemma3_pool_state_from_hf({"x.mm_input_projection_weight": weight, "x.b": norm}, "x.")
    with pytest.raises(ValueError, match=r"mm_input_projection_weight \(16, 8\) must be \[C, D\]"):
        gemma3_pool_state_from_hf(
            {"mm_input_projection_weight": weight.T, "mm_soft_emb_norm.weight": norm}
        )
    with pytest.raises(ValueError, match=r"no keys start with prefix 'model\.'"):
        gemma3_pool_state_from_hf(state, prefix="model.")


def test_onevision_converter_errors():
    good = {
        "linear_1.weight": _randn(0, LLM, VISION),
        "linear_1.bias": _randn(1, LLM),
        "linear_2.weight": _randn(2, LLM, LLM),
        "linear_2.bias": _randn(3, LLM),
    }
    assert onevision_pool_state_from_hf(good) == good
    no_bias = {key: value for key, value in good.items() if key.endswith("weight")}
    ours = build_projector(OnevisionPoolSpec(bias=False), in_dim=VISION, out_dim=LLM)
    ours.load_state_dict(onevision_pool_state_from_hf(no_bias))
    with pytest.raises(ValueError, match=r"missing linear_2\.bias"):
        onevision_pool_state_from_hf({k: v for k, v in good.items() if k != "linear_2.bias"})
    with pytest.raises(ValueError, match=r"linear_2.weight: \(16, 8\) in the weights, \(16, 16\)"):
        onevision_pool_state_from_hf({**good, "linear_2.weight": _randn(4, LLM, VISION)})
    with pytest.raises(ValueError, match=r"unexpected act.scale.*found Linears \[1, 3\]"):
        onevision_pool_state_from_hf(
            {
                "linear_1.weight": good["linear_1.weight"],
                "linear_3.weight": good["linear_2.weight"],
                "act.scale": good["linear_1.bias"],
            }
        )


# ---------------------------------------------------------------------- composability

NUM_LAYERS = 4
FUSIONS = {
    "none": (SingleLayerSpec(final_layer=-1), VISION),
    "sci": (SCISpec(final_layer=-1, extra_layers=(1, 2)), 3 * VISION),
    "dci": (DCISpec(final_layer=-1, groups=((0, 1), (2, 3))), 3 * VISION),
}


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize(
    ("projector", "grid", "count"),
    [(Gemma3PoolSpec(grid=(2, 3)), (4, 6), 6), (OnevisionPoolSpec(), (5, 6), 9)],
    ids=["gemma3_pool", "onevision_pool"],
)
def test_dense_connector_composes_and_trains_every_parameter(fusion, projector, grid, count):
    spec, fused_dim = FUSIONS[fusion]
    config = ConnectorConfig(
        vision_dim=VISION, llm_dim=LLM, num_layers=NUM_LAYERS, fusion=spec, projector=projector
    )
    torch.manual_seed(0)
    connector = DenseConnector(config)
    assert connector.fused_dim == fused_dim
    features = {
        layer: _randn(10 + layer, 2, grid[0] * grid[1], VISION) for layer in range(NUM_LAYERS + 1)
    }
    output = connector(features, grid)
    assert output.shape == (2, connector.num_tokens(grid), LLM)
    assert connector.num_tokens(grid) == config.num_tokens(grid) == count
    output.square().mean().backward()
    parameters = dict(connector.named_parameters())
    assert parameters, "the connector has parameters"
    for name, parameter in parameters.items():
        assert parameter.requires_grad and parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    # Gemma's norm offset and projection are parameters of the connector (stage 1 trains them).
    if isinstance(projector, Gemma3PoolSpec):
        assert {"projector.norm.weight", "projector.projection"} <= parameters.keys()


@pytest.mark.parametrize("projector", [Gemma3PoolSpec(grid=2), OnevisionPoolSpec()])
def test_sti_cannot_feed_a_pooled_projector(projector):
    config = ConnectorConfig(
        vision_dim=VISION,
        llm_dim=LLM,
        num_layers=NUM_LAYERS,
        fusion=STISpec(final_layer=-1, extra_layers=(1,), window=2),
        projector=projector,
    )
    connector = DenseConnector(config)
    message = rf"fusion 'sti' gives 8 tokens after its 4x4 grid that form no grid, but the projector '{projector.kind}'"
    with pytest.raises(ValueError, match=message):
        connector.num_tokens((4, 4))
    features = {layer: _randn(layer, 1, 16, VISION) for layer in (1, NUM_LAYERS)}
    with pytest.raises(ValueError, match=message):
        connector(features, (4, 4))


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("name", "grid", "count", "llm_dim"),
    [
        ("baseline+gemma3-pool-siglip-so400m-896", (64, 64), 256, 2560),
        ("dc-dci+gemma3-pool-siglip-so400m", (27, 27), 81, 4096),
        ("baseline+onevision-pool-siglip-so400m", (27, 27), 196, 3584),
        ("dc-dci+onevision-pool-siglip-so400m", (27, 27), 196, 4096),
    ],
)
def test_presets_exact_token_counts(name, grid, count, llm_dim):
    assert preset_geometry(name).grid == grid
    config = ConnectorConfig.from_preset(name)
    assert config.num_tokens(grid) == count
    assert config.llm_dim == llm_dim
    small = ConnectorConfig.from_preset(name, vision_dim=4, llm_dim=8)
    features = {layer: _randn(layer, 1, grid[0] * grid[1], 4) for layer in range(28)}
    with torch.no_grad():
        assert DenseConnector(small)(features, grid).shape == (1, count, 8)


def test_gemma3_geometry_and_real_size_parameter_counts():
    assert GEMMA3_SIGLIP_SO400M_896.grid == (64, 64)
    with torch.device("meta"):
        gemma = build_projector(Gemma3PoolSpec(), in_dim=1152, out_dim=2560)
        onevision = build_projector(OnevisionPoolSpec(), in_dim=1152, out_dim=3584)
    assert sum(p.numel() for p in gemma.parameters()) == 1152 + 1152 * 2560 == 2_950_272
    assert sum(p.numel() for p in onevision.parameters()) == 16_980_992


def test_doctests_pass():
    failures, attempted = doctest.testmod(pooled_module)
    assert failures == 0 and attempted >= 5
