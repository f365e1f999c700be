"""Pixel-shuffle connectors (mmconnect.zoo.pixel_shuffle): order, parity with Hugging Face's
InternVL, Idefics3 and SmolVLM modules, token contract, specs, converters, presets."""

from __future__ import annotations

import doctest

import pytest
import torch

import mmconnect.zoo.pixel_shuffle as pixel_shuffle_module
from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    build_projector,
    preset_geometry,
)
from mmconnect.projectors import parse_projector
from mmconnect.zoo.pixel_shuffle import (
    PixelShuffleLinear,
    PixelShuffleMLP,
    PixelShuffleMLPSpec,
    PixelShuffleSpec,
    idefics3_state_from_hf,
    internvl_state_from_hf,
    pixel_shuffle,
    pixel_shuffle_grid,
    smolvlm_state_from_hf,
)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter (LayerNorm's ones / zeros would hide a swap)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def _by_definition(tokens: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """The shuffle written out with loops, from the module docstring's equation."""
    batch, _, channels = tokens.shape
    height, width = grid
    maps = tokens.reshape(batch, height, width, channels)
    rows = []
    for i in range(height // factor):
        for j in range(width // factor):
            parts = [
                maps[:, i * factor + r, j * factor + a]
                for r in range(factor)
                for a in range(factor)
            ]
            rows.append(torch.cat(parts, dim=-1))
    return torch.stack(rows, dim=1)


# ---------------------------------------------------------------------------- the shuffle
def test_shuffle_exact_values_on_a_small_grid():
    tokens = torch.arange(24.0).reshape(1, 24, 1)  # a 4x6 grid, one channel
    out = pixel_shuffle(tokens, (4, 6), 2)
    assert out[0].tolist() == [
        [0.0, 1.0, 6.0, 7.0],
        [2.0, 3.0, 8.0, 9.0],
        [4.0, 5.0, 10.0, 11.0],
        [12.0, 13.0, 18.0, 19.0],
        [14.0, 15.0, 20.0, 21.0],
        [16.0, 17.0, 22.0, 23.0],
    ]


@pytest.mark.parametrize(("grid", "factor"), [((6, 6), 2), ((6, 6), 3), ((4, 6), 2), ((6, 9), 3)])
def test_shuffle_equals_the_definition(grid, factor):
    tokens = torch.randn(2, grid[0] * grid[1], 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pixel_shuffle(tokens, grid, factor), _by_definition(tokens, grid, factor))


@pytest.mark.parametrize(("grid", "factor"), [((6, 6), 2), ((8, 8), 4), ((4, 6), 2), ((8, 4), 2)])
def test_shuffle_equals_internvl_order(grid, factor):
    """InternVL's shuffle takes a [B, h, w, C] map (non-square too) and the ratio 1/factor
    (its divisibility check, ``side % ratio``, passes only for ratios exact in binary: 1/2, 1/4)."""
    modeling = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    tokens = torch.randn(2, grid[0] * grid[1], 5, generator=torch.Generator().manual_seed(1))
    maps = tokens.reshape(2, *grid, 5)
    theirs = modeling.InternVLModel.pixel_shuffle(None, maps, scale_factor=1 / factor)
    assert torch.equal(pixel_shuffle(tokens, grid, factor), theirs.reshape(2, -1, 5 * factor**2))


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize(("side", "factor"), [(6, 2), (6, 3), (8, 4)])
def test_shuffle_equals_idefics3_order(family, side, factor):
    """Idefics3's / SmolVLM's shuffle reads the side from sqrt(N): square grids."""
    pytest.importorskip("transformers")
    connector = _hf_connector_class(family)
    tokens = torch.randn(2, side * side, 5, generator=torch.Generator().manual_seed(2))
    theirs = connector.pixel_shuffle(None, tokens, factor)
    assert torch.equal(pixel_shuffle(tokens, (side, side), factor), theirs)


# ---------------------------------------------------------------------------- HF parity
def _tiny_internvl():
    from transformers import InternVLConfig, InternVLModel

    config = InternVLConfig(
        vision_config={
            "hidden_size": 8,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": [16, 16],
            "patch_size": [4, 4],
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 32,
            "vocab_size": 64,
        },
    )
    torch.manual_seed(0)
    model = InternVLModel(config).eval()
    _randomize(model.multi_modal_projector, seed=3)
    return model


def _internvl_pair(dtype: torch.dtype):
    """HF InternVL's image features and ours from the same square image (tap: last block)."""
    pytest.importorskip("transformers")
    model = _tiny_internvl().to(dtype)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    connector = DenseConnector(
        ConnectorConfig(
            vision_dim=8,
            llm_dim=16,
            num_layers=2,
            fusion=SingleLayerSpec(final_layer=-1),
            projector=PixelShuffleMLPSpec(factor=2),
        )
    ).to(dtype)
    connector.projector.load_state_dict(
        internvl_state_from_hf(model.state_dict(), prefix="multi_modal_projector.")
    )
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=pixels).pooler_output
        hidden = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        ours = connector({2: hidden[2][:, 1:]}, (4, 4))  # class token dropped, as "default"
    return theirs, ours


def test_internvl_parity_fp32():
    theirs, ours = _internvl_pair(torch.float32)
    assert ours.shape == theirs.shape == (2, 4, 16)
    assert torch.equal(ours, theirs)


def test_internvl_parity_bf16():
    theirs, ours = _internvl_pair(torch.bfloat16)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)  # the same ops in the same order: bit for bit in bf16 too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_internvl_projector_parity_on_a_non_square_grid(dtype):
    """HF's shuffle + projector on a 4x6 map against ours on the raster tokens."""
    pytest.importorskip("transformers")
    model = _tiny_internvl().to(dtype)
    tokens = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    ours_module = build_projector(PixelShuffleMLPSpec(), 8, 16).to(dtype)
    ours_module.load_state_dict(
        internvl_state_from_hf(model.state_dict(), prefix="multi_modal_projector.")
    )
    with torch.no_grad():
        shuffled = model.pixel_shuffle(tokens.reshape(2, 4, 6, 8), scale_factor=0.5)
        theirs = model.multi_modal_projector(shuffled.reshape(2, -1, 32))
        ours = ours_module(tokens, (4, 6))
    assert ours.shape == (2, 6, 16)
    assert torch.equal(ours, theirs)


def _hf_connector_class(family: str):
    if family == "idefics3":
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

        return Idefics3Connector
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    return SmolVLMConnector


def _hf_connector(family: str, factor: int):
    pytest.importorskip("transformers")
    from transformers import Idefics3Config, SmolVLMConfig

    config_class = Idefics3Config if family == "idefics3" else SmolVLMConfig
    config = config_class(
        vision_config={"hidden_size": 8, "num_attention_heads": 2},
        text_config={"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1},
        scale_factor=factor,
    )
    connector = _hf_connector_class(family)(config).eval()
    _randomize(connector, seed=6)
    return connector


def _idefics3_pair(family: str, factor: int, dtype: torch.dtype):
    theirs_module = _hf_connector(family, factor).to(dtype)
    converter = idefics3_state_from_hf if family == "idefics3" else smolvlm_state_from_hf
    ours_module = build_projector(PixelShuffleSpec(factor=factor), 8, 16).to(dtype)
    ours_module.load_state_dict(converter(theirs_module.state_dict()))
    # a 12x12 grid: every factor in use (2, 3, 4) divides it
    tokens = torch.randn(2, 144, 8, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        return theirs_module(tokens), ours_module(tokens, (12, 12))


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_idefics3_parity_fp32(family, factor):
    theirs, ours = _idefics3_pair(family, factor, torch.float32)
    assert ours.shape == theirs.shape == (2, 144 // factor**2, 16)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_idefics3_parity_bf16(family, factor):
    theirs, ours = _idefics3_pair(family, factor, torch.bfloat16)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)  # one bias-free matmul on the same operands


def test_idefics3_converter_reads_a_whole_model_under_its_prefix():
    pytest.importorskip("transformers")
    connector = _hf_connector("idefics3", 2)
    state = {f"model.connector.{k}": v for k, v in connector.state_dict().items()}
    state["model.text_model.embed_tokens.weight"] = torch.zeros(3, 16)  # outside: ignored
    converted = idefics3_state_from_hf(state, prefix="model.connector.")
    assert list(converted) == ["proj.weight"]
    assert converted["proj.weight"] is state["model.connector.modality_projection.proj.weight"]


# ---------------------------------------------------------------------------- converters
def _internvl_state(wide: int = 32, out: int = 16) -> dict[str, torch.Tensor]:
    return {
        "layer_norm.weight": torch.ones(wide),
        "layer_norm.bias": torch.zeros(wide),
        "linear_1.weight": torch.zeros(out, wide),
        "linear_1.bias": torch.zeros(out),
        "linear_2.weight": torch.zeros(out, out),
        "linear_2.bias": torch.zeros(out),
    }


def test_internvl_converter_names_and_prefix():
    state = {f"model.multi_modal_projector.{k}": v for k, v in _internvl_state().items()}
    state["model.vision_tower.embeddings.cls_token"] = torch.zeros(1, 1, 8)
    converted = internvl_state_from_hf(state, prefix="model.multi_modal_projector.")
    assert sorted(converted) == sorted(PixelShuffleMLP(8, 16).state_dict())


def test_internvl_converter_lists_missing_unexpected_and_misshapen_keys():
    state = _internvl_state()
    del state["linear_2.bias"]
    state["linear_3.weight"] = torch.zeros(1)
    state["layer_norm.weight"] = torch.ones(31)
    with pytest.raises(ValueError) as error:
        internvl_state_from_hf(state)
    message = str(error.value)
    assert "InternVLMultiModalProjector" in message
    assert "missing linear_2.bias" in message
    assert "unexpected linear_3.weight" in message
    assert "layer_norm.weight: (31,) in the state dict, (32,) expected" in message


def test_internvl_converter_without_the_projector_under_the_prefix():
    with pytest.raises(ValueError, match=r"prefix 'model\.': 'linear_1.weight' is missing"):
        internvl_state_from_hf(_internvl_state(), prefix="model.")


def test_idefics3_converter_errors():
    with pytest.raises(ValueError, match=r"'modality_projection.proj.weight' is missing"):
        idefics3_state_from_hf({"proj.weight": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match=r"of shape \(8,\), not a matrix"):
        idefics3_state_from_hf({"modality_projection.proj.weight": torch.zeros(8)})
    with pytest.raises(ValueError, match=r"unexpected modality_projection.proj.bias"):
        idefics3_state_from_hf(
            {
                "modality_projection.proj.weight": torch.zeros(4, 8),
                "modality_projection.proj.bias": torch.zeros(4),
            }
        )
    with pytest.raises(TypeError, match="prefix must be a str"):
        idefics3_state_from_hf({}, prefix=None)
    whole_model = {f"layer{index}.weight": torch.zeros(1) for index in range(10)}
    with pytest.raises(ValueError, match=r"prefix '': .*layer0.weight, .*layer7.weight and 2 more"):
        idefics3_state_from_hf(whole_model)
    with pytest.raises(ValueError, match=r"keys under the prefix: none"):
        idefics3_state_from_hf(whole_model, prefix="model.connector.")


def test_converted_weights_of_the_wrong_width_fail_to_load():
    projector = build_projector(PixelShuffleSpec(factor=2), 8, 16)
    converted = idefics3_state_from_hf({"modality_projection.proj.weight": torch.zeros(16, 72)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        projector.load_state_dict(converted)


# ---------------------------------------------------------------------------- token contract
@pytest.mark.parametrize(
    ("factor", "grid", "count", "out_grid"),
    [
        (2, (24, 24), 144, (12, 12)),
        (3, (27, 27), 81, (9, 9)),
        (2, (26, 26), 169, (13, 13)),
        (2, (32, 32), 256, (16, 16)),
        (2, (4, 6), 6, (2, 3)),
        (3, (24, 27), 72, (8, 9)),
        (4, (32, 16), 32, (8, 4)),
        (1, (5, 7), 35, (5, 7)),
    ],
)
@pytest.mark.parametrize("spec_class", [PixelShuffleSpec, PixelShuffleMLPSpec])
def test_counts_and_grids(spec_class, factor, grid, count, out_grid):
    projector = build_projector(spec_class(factor=factor), 4, 6)
    assert projector.num_tokens(grid) == count
    assert projector.output_grid(grid) == out_grid
    tokens = torch.randn(1, grid[0] * grid[1], 4)
    assert projector(tokens, grid).shape == (1, count, 6)


@pytest.mark.parametrize(
    ("factor", "grid"), [(2, (27, 27)), (2, (24, 25)), (3, (24, 26)), (4, (6, 8))]
)
def test_a_grid_not_divisible_by_the_factor_is_refused(factor, grid):
    projector = build_projector(PixelShuffleMLPSpec(factor=factor), 4, 6)
    message = rf"factor {factor} needs both grid sides divisible by {factor}, got grid {grid[0]}x{grid[1]}"
    with pytest.raises(ValueError, match=message):
        projector.num_tokens(grid)
    with pytest.raises(ValueError, match=message):
        projector.output_grid(grid)
    with pytest.raises(ValueError, match=message):
        projector(torch.randn(1, grid[0] * grid[1], 4), grid)


def test_bad_inputs_to_forward():
    projector = PixelShuffleLinear(4, 6, factor=2)
    with pytest.raises(ValueError, match="5 channels but the projector was built for in_dim=4"):
        projector(torch.randn(1, 16, 5), (4, 4))
    with pytest.raises(ValueError, match="15 tokens, which do not form the stated grid 4x4"):
        projector(torch.randn(1, 15, 4), (4, 4))
    with pytest.raises(ValueError, match=r"must be \[batch, tokens, channels\]"):
        projector(torch.randn(16, 4), (4, 4))
    with pytest.raises(TypeError, match="grid must be a"):
        pixel_shuffle_grid((4.0, 4), 2)
    with pytest.raises(ValueError, match="grid must be a"):
        pixel_shuffle_grid((4, 0), 2)


_FUSIONS = {
    "none": SingleLayerSpec(final_layer=4),
    "sci": SCISpec(final_layer=4, extra_layers=(1, 2)),
    "dci": DCISpec(final_layer=4, groups=((0, 1), (2, 3))),
}


@pytest.mark.parametrize("fusion", sorted(_FUSIONS))
@pytest.mark.parametrize("spec", [PixelShuffleSpec(factor=2), PixelShuffleMLPSpec(factor=3)])
@pytest.mark.parametrize("grid", [(6, 6), (6, 12)])
def test_composes_with_every_fusion(fusion, spec, grid):
    connector = DenseConnector(
        ConnectorConfig(
            vision_dim=4, llm_dim=8, num_layers=4, fusion=_FUSIONS[fusion], projector=spec
        )
    )
    generator = torch.Generator().manual_seed(8)
    features = {
        layer: torch.randn(2, grid[0] * grid[1], 4, generator=generator) for layer in range(5)
    }
    out = connector(features, grid)
    factor = spec.factor
    assert out.shape == (2, connector.num_tokens(grid), 8)
    assert connector.num_tokens(grid) == grid[0] * grid[1] // factor**2
    assert connector.token_grid(grid) == (grid[0] // factor, grid[1] // factor)
    wide = {"none": 4, "sci": 12, "dci": 12}[fusion] * factor**2
    assert connector.projector.shuffled_dim == wide


def test_sti_cannot_feed_a_pixel_shuffle():
    connector = DenseConnector(
        ConnectorConfig(
            vision_dim=4,
            llm_dim=8,
            num_layers=4,
            fusion=STISpec(final_layer=4, extra_layers=(2,), window=4),
            projector=PixelShuffleSpec(factor=2),
        )
    )
    with pytest.raises(ValueError, match="form no grid, but the projector 'pixel_shuffle' works"):
        connector.num_tokens((4, 4))
    features = {layer: torch.randn(1, 16, 4) for layer in (2, 4)}
    with pytest.raises(ValueError, match="form no grid"):
        connector(features, (4, 4))


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (PixelShuffleSpec(), ["projector.proj.weight"]),
        (
            PixelShuffleMLPSpec(),
            [
                "projector.fc1.bias",
                "projector.fc1.weight",
                "projector.fc2.bias",
                "projector.fc2.weight",
                "projector.norm.bias",
                "projector.norm.weight",
            ],
        ),
    ],
)
def test_every_parameter_gets_a_gradient(spec, names):
    connector = DenseConnector(
        ConnectorConfig(
            vision_dim=4, llm_dim=8, num_layers=4, fusion=_FUSIONS["dci"], projector=spec
        )
    )
    _randomize(connector, seed=9)
    features = {layer: torch.randn(2, 16, 4) for layer in range(5)}
    connector(features, (4, 4)).square().mean().backward()
    parameters = dict(connector.named_parameters())
    assert sorted(parameters) == names
    for name, parameter in parameters.items():
        assert isinstance(parameter, torch.nn.Parameter)
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec_class", [PixelShuffleSpec, PixelShuffleMLPSpec])
def test_spec_validation(spec_class):
    for bad in ("2", 2.0, True, None):
        with pytest.raises(TypeError, match="factor must be a positive int"):
            spec_class(factor=bad)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="factor must be a positive int"):
            spec_class(factor=bad)
    with pytest.raises(TypeError):
        spec_class(kind="mlp")


def test_mlp_spec_activation():
    assert PixelShuffleMLPSpec(activation="silu").activation == "silu"
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'relu', 'silu'\)"):
        PixelShuffleMLPSpec(activation="tanh")
    projector = build_projector(PixelShuffleMLPSpec(activation="relu"), 4, 6)
    assert isinstance(projector.act, torch.nn.ReLU)


@pytest.mark.parametrize(
    "spec", [PixelShuffleSpec(factor=3), PixelShuffleMLPSpec(factor=2, activation="silu")]
)
def test_specs_round_trip_through_configs(spec):
    assert parse_projector(spec.to_dict()) == spec
    config = ConnectorConfig(
        vision_dim=4, llm_dim=8, num_layers=4, fusion=_FUSIONS["sci"], projector=spec
    )
    assert ConnectorConfig.from_dict(config.to_dict()) == config
    assert parse_projector(spec.kind) == type(spec)()
    with pytest.raises(ValueError, match=r"unknown keys \['scale'\]"):
        parse_projector({"kind": spec.kind, "scale": 2})


# ---------------------------------------------------------------------------- presets
PRESET_COUNTS = {
    "internvl-pixel-shuffle-internvit-300m": ((32, 32), 256, 27_540_480),
    # LayerNorm(12800) + Linear(12800 -> 5120) + Linear(5120 -> 5120), with biases
    "internvl-pixel-shuffle-internvit-6b": ((32, 32), 256, 91_786_240),
    "idefics3-pixel-shuffle-siglip-so400m-364": ((26, 26), 169, 18_874_368),
    "smolvlm-pixel-shuffle-siglip-so400m": ((27, 27), 81, 21_233_664),
    # 576 x (16 x 768) and 960 x (16 x 768): one bias-free Linear
    "smolvlm-256m-pixel-shuffle-siglip-b16-512": ((32, 32), 64, 7_077_888),
    "smolvlm-500m-pixel-shuffle-siglip-b16-512": ((32, 32), 64, 11_796_480),
    "dc-dci+pixel-shuffle-siglip-so400m": ((27, 27), 81, 127_401_984),
    "dc-dci+pixel-shuffle-mlp-internvit-300m": ((32, 32), 256, 67_141_632),
}


@pytest.mark.parametrize("name", sorted(PRESET_COUNTS))
def test_presets_count_exactly_at_their_geometry(name):
    grid, count, parameters = PRESET_COUNTS[name]
    config = ConnectorConfig.from_preset(name)
    assert preset_geometry(name).grid == grid
    assert config.num_tokens(grid) == count
    with torch.device("meta"):
        connector = DenseConnector(config)
    assert sum(p.numel() for p in connector.parameters()) == parameters


@pytest.mark.parametrize(
    ("size", "llm_dim", "heads", "kv_heads"), [("256m", 576, 9, 3), ("500m", 960, 15, 5)]
)
def test_small_smolvlm_presets_equal_hf_smolvlm_connector_at_their_shapes(
    size, llm_dim, heads, kv_heads
):
    """The native preset at SmolVLM-256M / 500M's widths (SigLIP-B/16: 768; SmolLM2: 576 /
    960; scale factor 4) against HF's SmolVLMConnector of the same config, on the 32x32 grid of
    a 512 px tile: the same 64 tokens, bit for bit."""
    pytest.importorskip("transformers")
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    name = f"smolvlm-{size}-pixel-shuffle-siglip-b16-512"
    config = ConnectorConfig.from_preset(name)
    geometry = preset_geometry(name)
    hf_config = SmolVLMConfig(
        vision_config={"hidden_size": geometry.width, "num_attention_heads": 12},
        text_config={
            "hidden_size": llm_dim,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
        },
        scale_factor=4,
    )
    theirs = SmolVLMConnector(hf_config).eval()
    _randomize(theirs, seed=8)
    ours = DenseConnector(config).eval()
    ours.projector.load_state_dict(smolvlm_state_from_hf(theirs.state_dict()))
    # H[12] is the tower's output after post_layernorm: the connector's input in both
    tokens = torch.randn(1, 1024, 768, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = theirs(tokens)
        got = ours.projector(tokens, geometry.grid)
    assert got.shape == expected.shape == (1, 64, llm_dim)
    assert torch.equal(got, expected)


def test_the_dc_presets_refuse_a_grid_their_factor_does_not_divide():
    with pytest.raises(ValueError, match="divisible by 3, got grid 26x26"):
        ConnectorConfig.from_preset("dc-dci+pixel-shuffle-siglip-so400m").num_tokens((26, 26))
    with pytest.raises(ValueError, match="divisible by 2, got grid 27x27"):
        ConnectorConfig.from_preset("idefics3-pixel-shuffle-siglip-so400m-364").num_tokens((27, 27))
    assert (
        ConnectorConfig.from_preset("internvl-pixel-shuffle-internvit-300m").num_tokens((24, 24))
        == 144
    )


def test_doctests_pass():
    failures, attempted = doctest.testmod(pixel_shuffle_module)
    assert failures == 0 and attempted >= 5
