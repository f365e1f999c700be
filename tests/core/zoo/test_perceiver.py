"""Idefics2's connector (SwiGLU projection + Perceiver resampler): parity with Hugging Face, the
token contract, specs, the converter, presets.

docs/zoo/perceiver.md: ``c = SwiGLU(x)``; ``depth`` blocks of ``z += Attn(RMSNorm(z),
[RMSNorm(c); RMSNorm(z)])``, ``z += SwiGLU(RMSNorm(z))``; ``RMSNorm(z)``; ``n_latents`` tokens
forming no grid. Parity is against ``Idefics2Connector`` with eager attention and converted
weights.
"""

from __future__ import annotations

import pytest
import torch

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    ResampleSpec,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    build_projector,
    list_presets,
    pool_tokens,
    preset_geometry,
)
from mmconnect.projectors import parse_projector
from mmconnect.zoo.perceiver import (
    IDEFICS2_SIGLIP_SO400M_980,
    PerceiverConnector,
    PerceiverSpec,
    perceiver_spec_from_hf,
    perceiver_state_from_hf,
)

transformers = pytest.importorskip("transformers")
from transformers.models.idefics2 import modeling_idefics2 as hf_idefics2  # noqa: E402

VISION, LLM = 24, 32
TINY = PerceiverSpec(
    n_latents=5, depth=2, heads=4, head_dim=6, kv_heads=2, intermediate_size=48, rms_eps=1e-6
)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hf_config(attn_implementation: str = "eager", **perceiver):
    """A tiny ``Idefics2Config`` whose connector is TINY's (GQA with two query heads per key/value
    head, two blocks)."""
    return transformers.Idefics2Config(
        vision_config={"hidden_size": VISION, "intermediate_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2},
        text_config={"model_type": "mistral", "hidden_size": LLM, "intermediate_size": 48,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "hidden_act": "silu"},
        perceiver_config={"hidden_size": LLM, "resampler_n_latents": 5, "resampler_depth": 2,
                          "resampler_n_heads": 4, "resampler_head_dim": 6,
                          "num_key_value_heads": 2, "rms_norm_eps": 1e-6, **perceiver},
        attn_implementation=attn_implementation,
    )  # fmt: skip


def _hf_connector(attn_implementation: str = "eager", seed: int = 0):
    """HF's ``Idefics2Connector`` with every weight from N(0, 0.3), norms around 1 and distinct
    latents (HF's init fills them with ones), in eval mode."""
    connector = hf_idefics2.Idefics2Connector(_hf_config(attn_implementation))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in connector.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.3
            parameter.copy_(values + 1 if "norm" in name else values)
    return connector.eval()


def _ours_from(hf) -> PerceiverConnector:
    ours = build_projector(TINY, VISION, LLM)
    ours.load_state_dict(perceiver_state_from_hf(hf.state_dict()))
    return ours.eval()


def _all_ones(batch: int, count: int) -> torch.Tensor:
    # What Idefics2Model passes for unpadded images (its patch attention mask).
    return torch.ones(batch, count, dtype=torch.long)


# ---------------------------------------------------------------------------- parity with HF


def test_fp32_output_equals_hf_idefics2_connector_exactly():
    """Same operations in the same order as HF's eager path: bit-identical in fp32."""
    hf = _hf_connector()
    ours = _ours_from(hf)
    tokens = _randn(1, 3, 12, VISION)
    with torch.no_grad():
        expected = hf(tokens, attention_mask=_all_ones(3, 12))
        output = ours(tokens, (3, 4))
    assert output.shape == (3, 5, LLM)
    assert torch.equal(output, expected)


def test_bf16_output_equals_hf_idefics2_connector_exactly():
    """In bf16 too (RMSNorm and softmax in fp32, cast back where HF casts): measured bound 0."""
    hf = _hf_connector().to(torch.bfloat16)
    ours = _ours_from(_hf_connector()).to(torch.bfloat16)
    tokens = _randn(2, 2, 20, VISION).to(torch.bfloat16)
    with torch.no_grad():
        expected = hf(tokens, attention_mask=_all_ones(2, 20))
        output = ours(tokens, (4, 5))
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, expected)


def test_hf_builds_no_attention_bias_for_an_unpadded_image():
    """Without padding HF's mask helper returns None, so its eager attention adds nothing to the
    scores: the same computation as ours without ``mask``. HF's resampler itself requires a
    mask (None fails), which Idefics2Model always builds."""
    hf = _hf_connector()
    resampler = hf.perceiver_resampler
    mask = transformers.masking_utils.create_bidirectional_mask(
        config=resampler.config,
        inputs_embeds=torch.zeros(2, 5, LLM),
        attention_mask=_all_ones(2, 12 + 5),
    )
    assert mask is None
    with pytest.raises(AttributeError):
        hf(_randn(3, 2, 12, VISION), attention_mask=None)


def test_padding_mask_equals_hf_exactly():
    """Padded patches (Idefics2's pixel_attention_mask): masked tokens change nothing, and the
    output equals HF's with the same patch mask, bit for bit."""
    hf = _hf_connector()
    ours = _ours_from(hf)
    tokens = _randn(4, 2, 12, VISION)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 8:] = False
    with torch.no_grad():
        expected = hf(tokens, attention_mask=keep.long())
        output = ours(tokens, (3, 4), mask=keep)
        alone = ours(tokens[1:, :8], (2, 4))
    assert torch.equal(output, expected)
    assert not torch.equal(output[1], ours(tokens, (3, 4))[1])  # the mask matters
    # = the unpadded tokens alone, up to the rounding of softmax sums over 17 vs 13 terms
    torch.testing.assert_close(output[1:], alone, atol=1e-5, rtol=1e-5)


def test_hf_sdpa_agrees_within_a_measured_bound():
    """HF's default (sdpa) attention is another kernel (fused softmax): not bit-equal; measured
    max |diff| 2.3e-6 on outputs of size ~1 (CPU, fp32), asserted <= 1e-5."""
    hf = _hf_connector("sdpa")
    ours = _ours_from(hf)
    tokens = _randn(5, 3, 12, VISION)
    with torch.no_grad():
        difference = (hf(tokens, attention_mask=_all_ones(3, 12)) - ours(tokens, (3, 4))).abs()
    assert 0 < difference.max() <= 1e-5


def test_output_does_not_depend_on_token_order():
    """The latents read a set: permuting the input tokens changes only the summation order."""
    ours = build_projector(TINY, VISION, LLM).eval()
    tokens = _randn(6, 2, 12, VISION)
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(tokens[:, permutation], (3, 4)), ours(tokens, (3, 4)), atol=1e-5, rtol=1e-5
        )


def test_whole_idefics2_model_image_features_equal_ours_on_its_vision_output():
    """A whole tiny Idefics2ForConditionalGeneration: ``get_image_features`` (tower, patch mask,
    connector) equals ours on the tower's ``last_hidden_state``, with the weights converted from
    the model's own state dict at ``prefix="model.connector."``. That input is the last block's
    output after the tower's ``post_layernorm``, not the tapped ``hidden_states[-1]``."""
    config = _hf_config()
    config.vision_config.image_size, config.vision_config.patch_size = 56, 14
    torch.manual_seed(0)
    model = hf_idefics2.Idefics2ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.model.connector.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    pixels = _randn(7, 1, 2, 3, 56, 56)  # one sample, two 56 px images: 4x4 patches each
    ours = build_projector(perceiver_spec_from_hf(config), VISION, LLM).eval()
    ours.load_state_dict(perceiver_state_from_hf(model.state_dict(), prefix="model.connector."))
    with torch.no_grad():
        expected = model.get_image_features(pixels, return_dict=True).pooler_output[0]
        vision = model.model.vision_model(pixel_values=pixels[0], output_hidden_states=True)
        output = ours(vision.last_hidden_state, (4, 4))
        post_norm = model.model.vision_model.post_layernorm(vision.hidden_states[-1])
    assert torch.equal(output.reshape(expected.shape), expected)
    assert torch.equal(vision.last_hidden_state, post_norm)


def test_spec_from_hf_config_reads_every_field():
    assert perceiver_spec_from_hf(_hf_config()) == TINY
    with pytest.raises(ValueError, match="one activation"):
        perceiver_spec_from_hf(_hf_config(hidden_act="gelu"))


def test_real_size_hf_connector_converts_into_the_native_preset():
    """Idefics2-8B's connector (SigLIP 1152 -> Mistral 4096, 64 latents, 3 blocks, 16 x 96
    heads, 4 key/value heads), built on the meta device: every key and shape converts into the
    native preset's projector, with the same parameter count (743,219,200)."""
    config = transformers.Idefics2Config(
        vision_config={"hidden_size": 1152},
        text_config={"model_type": "mistral"},
        perceiver_config={"hidden_size": 4096},
    )
    assert perceiver_spec_from_hf(config) == PerceiverSpec()
    with torch.device("meta"):
        hf = hf_idefics2.Idefics2Connector(config)
        ours = DenseConnector(
            ConnectorConfig.from_preset("idefics2-perceiver-siglip-so400m-980")
        ).projector
    converted = perceiver_state_from_hf(
        {f"model.connector.{key}": value for key, value in hf.state_dict().items()},
        prefix="model.connector.",
    )
    assert {key: value.shape for key, value in converted.items()} == {
        key: value.shape for key, value in ours.state_dict().items()
    }
    count = sum(parameter.numel() for parameter in ours.parameters())
    assert count == sum(parameter.numel() for parameter in hf.parameters()) == 743_219_200


# ---------------------------------------------------------------------------- converter


def test_converter_reads_under_a_prefix_and_ignores_other_keys():
    hf = _hf_connector()
    state = {f"model.connector.{key}": value for key, value in hf.state_dict().items()}
    state["model.vision_model.post_layernorm.weight"] = torch.ones(VISION)
    converted = perceiver_state_from_hf(state, prefix="model.connector.")
    assert (
        converted["blocks.1.attention.key.weight"]
        is state["model.connector.perceiver_resampler.layers.1.self_attn.k_proj.weight"]
    )
    assert sorted(converted) == sorted(build_projector(TINY, VISION, LLM).state_dict())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("perceiver_resampler.norm.weight"), "missing perceiver_resampler.norm"),
        (
            lambda s: s.pop("perceiver_resampler.layers.0.self_attn.v_proj.weight"),
            "missing perceiver_resampler.layers.0.self_attn.v_proj.weight",
        ),
        (
            lambda s: s.update({"perceiver_resampler.layers.0.self_attn.q_proj.bias": 0}),
            "unexpected perceiver_resampler.layers.0.self_attn.q_proj.bias",
        ),
        (
            lambda s: s.update({"perceiver_resampler.latents": torch.zeros(5, LLM + 1)}),
            r"perceiver_resampler\.latents: \(5, 33\) in the HF weights, \(5, 32\) expected",
        ),
        (
            lambda s: s.update(
                {"perceiver_resampler.layers.1.mlp.up_proj.weight": torch.zeros(96, LLM)}
            ),
            r"layers\.1\.mlp\.up_proj\.weight: \(96, 32\) in the HF weights, \(128, 32\) expected",
        ),
        (
            lambda s: s.update({"perceiver_resampler.norm.weight": torch.ones(1, LLM)}),
            r"norm\.weight: \(1, 32\) has 2 dimensions, expected 1",
        ),
    ],
)
def test_converter_names_every_problem(edit, message):
    state = dict(_hf_connector().state_dict())
    edit(state)
    with pytest.raises(ValueError, match=message):
        perceiver_state_from_hf(state)


def test_converter_refuses_a_prefix_without_the_connector():
    state = {f"model.connector.{k}": v for k, v in _hf_connector().state_dict().items()}
    with pytest.raises(ValueError, match=r"no perceiver_resampler\.layers"):
        perceiver_state_from_hf(state, prefix="model.other.")
    with pytest.raises(TypeError, match="prefix must be a str"):
        perceiver_state_from_hf(state, prefix=None)


# ---------------------------------------------------------------------------- token contract


@pytest.mark.parametrize("grid", [(1, 1), (3, 4), (24, 24), (27, 27), (70, 70), (5, 2)])
def test_any_grid_gives_n_latents_tokens_forming_no_grid(grid):
    connector = build_projector(TINY, VISION, LLM)
    assert connector.num_tokens(grid) == 5
    assert connector.output_grid(grid) == (0, 0)


@pytest.mark.parametrize(
    ("grid", "error"),
    [((0, 4), ValueError), ((3,), ValueError), ((3, 4, 1), ValueError), ((2.5, 3), TypeError),
     ("24x24", TypeError), ((-1, 3), ValueError)],
)  # fmt: skip
def test_bad_grids_are_refused_before_running(grid, error):
    connector = build_projector(TINY, VISION, LLM)
    for call in (connector.num_tokens, connector.output_grid):
        with pytest.raises(error, match="grid must be a"):
            call(grid)
    with pytest.raises(error, match="grid must be a"):
        connector(_randn(0, 1, 4, VISION), grid)


def test_forward_refuses_inputs_that_do_not_fit():
    connector = build_projector(TINY, VISION, LLM)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, tokens, 24\]"):
        connector(_randn(0, 1, 12, VISION + 1), (3, 4))
    with pytest.raises(ValueError, match="fewer than the 3x4 grid's 12"):
        connector(_randn(0, 1, 11, VISION), (3, 4))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(1, 12\)"):
        connector(_randn(0, 1, 12, VISION), (3, 4), mask=torch.ones(1, 12, dtype=torch.long))


FUSIONS = {
    "none": (SingleLayerSpec(final_layer=3), 1),
    "sci": (SCISpec(final_layer=3, extra_layers=(1,)), 2),
    "dci": (DCISpec(final_layer=3, groups=((0, 1), (2,))), 3),
    "sti": (STISpec(final_layer=3, extra_layers=(1,), window=2), 1),
}


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize("grid", [(4, 4), (2, 6)])
def test_dense_connector_with_every_fusion_returns_the_declared_count(fusion, grid):
    """STI too: the latents read STI's pooled tokens with the grid's (a token-set connector)."""
    spec, layers = FUSIONS[fusion]
    config = ConnectorConfig(
        fusion=spec, projector=TINY, vision_dim=VISION // 3, llm_dim=LLM, num_layers=3
    )
    connector = DenseConnector(config)
    assert connector.fused_dim == layers * VISION // 3
    features = {layer: _randn(layer, 2, grid[0] * grid[1], VISION // 3) for layer in range(4)}
    output = connector(features, grid)
    assert output.shape == (2, connector.num_tokens(grid), LLM) == (2, 5, LLM)
    assert connector.token_grid(grid) == (0, 0) and connector.extra_tokens(grid) == 5
    assert config.num_tokens(grid) == 5


def test_resampling_works_before_the_latents_and_is_refused_after_them():
    """The efficient Dense Connector's resampling may shrink the grid the latents read; after
    the perceiver there is no grid left to resample."""
    spec, _ = FUSIONS["dci"]
    before = ConnectorConfig(
        fusion=spec, projector=TINY, vision_dim=8, llm_dim=LLM, num_layers=3,
        resample=ResampleSpec(grid=(2, 2)),
    )  # fmt: skip
    connector = DenseConnector(before)
    features = {layer: _randn(layer, 1, 16, 8) for layer in range(4)}
    assert connector(features, (4, 4)).shape == (1, 5, LLM) and before.num_tokens((4, 4)) == 5
    after = before.replace(resample=ResampleSpec(grid=(2, 2), placement="after_projector"))
    with pytest.raises(ValueError, match="form no grid"):
        after.num_tokens((4, 4))
    with pytest.raises(ValueError, match="form no grid"):
        DenseConnector(after)(features, (4, 4))


def test_sti_pooled_tokens_reach_the_latents():
    """The projector receives the grid's tokens followed by STI's pooled ones."""
    spec, _ = FUSIONS["sti"]
    config = ConnectorConfig(fusion=spec, projector=TINY, vision_dim=8, llm_dim=LLM, num_layers=3)
    connector = DenseConnector(config).eval()
    features = {layer: _randn(layer, 1, 16, 8) for layer in (1, 3)}
    stacked = torch.cat([features[3], pool_tokens(features[1], 2)], dim=1)
    with torch.no_grad():
        assert torch.equal(connector(features, (4, 4)), connector.projector(stacked, (4, 4)))
        assert not torch.equal(
            connector(features, (4, 4)), connector.projector(features[3], (4, 4))
        )


def test_every_parameter_is_trained_and_the_latents_are_distinct():
    """Stage 1 trains exactly the connector's parameters: each gets a gradient; the latents start
    distinct (HF's all-ones init would give identical tokens and identical gradients)."""
    connector = build_projector(TINY, VISION, LLM)
    parameters = dict(connector.named_parameters())
    assert {"latents", "norm.weight", "blocks.1.context_norm.weight"} <= set(parameters)
    assert len(parameters) == 5 + 2 * 10
    output = connector(_randn(0, 2, 12, VISION), (3, 4))
    assert len({tuple(token.tolist()) for token in output[0].round(decimals=4)}) == 5
    (output * _randn(1, *output.shape)).sum().backward()
    for name, parameter in parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"n_latents": 0}, ValueError, "n_latents must be a positive int"),
        ({"n_latents": 2.5}, TypeError, "n_latents must be a positive int"),
        ({"depth": True}, TypeError, "depth must be a positive int"),
        ({"heads": "16"}, TypeError, "heads must be a positive int"),
        ({"head_dim": -1}, ValueError, "head_dim must be a positive int"),
        ({"kv_heads": 0}, ValueError, "kv_heads must be a positive int"),
        ({"heads": 6, "kv_heads": 4}, ValueError, "kv_heads must divide heads"),
        ({"intermediate_size": None}, TypeError, "intermediate_size must be a positive int"),
        ({"activation": "tanh"}, ValueError, "activation must be one of"),
        ({"rms_eps": 0.0}, ValueError, "rms_eps must be a positive number"),
        ({"rms_eps": "1e-6"}, TypeError, "rms_eps must be a positive number"),
    ],
)
def test_spec_validation(change, error, message):
    with pytest.raises(error, match=message):
        PerceiverSpec(**change)


def test_spec_defaults_are_idefics2_8b_and_round_trip():
    spec = PerceiverSpec()
    assert spec.to_dict() == {
        "kind": "perceiver",
        "n_latents": 64,
        "depth": 3,
        "heads": 16,
        "head_dim": 96,
        "kv_heads": 4,
        "intermediate_size": 14336,
        "activation": "silu",
        "rms_eps": 1e-6,
    }
    assert parse_projector(TINY.to_dict()) == TINY
    assert PerceiverSpec(rms_eps=1).rms_eps == 1.0 and isinstance(
        PerceiverSpec(rms_eps=1).rms_eps, float
    )
    config = ConnectorConfig(
        fusion=SingleLayerSpec(final_layer=3), projector=TINY, vision_dim=8, llm_dim=LLM,
        num_layers=3,
    )  # fmt: skip
    assert ConnectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        parse_projector({"kind": "perceiver", "latents": 64})


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("name", "grid", "fused"),
    [
        ("idefics2-perceiver-siglip-so400m-980", (70, 70), 1152),
        ("dc-dci+perceiver-siglip-so400m", (27, 27), 3456),
        ("dc-sti+perceiver-siglip-so400m", (27, 27), 1152),
    ],
)
def test_presets_give_64_tokens_at_their_geometry(name, grid, fused):
    assert name in list_presets()
    assert preset_geometry(name).grid == grid
    config = ConnectorConfig.from_preset(name)
    assert config.projector == PerceiverSpec() and config.llm_dim == 4096
    assert config.num_tokens(grid) == 64 and config.token_grid(grid) == (0, 0)
    with torch.device("meta"):
        assert DenseConnector(config).fused_dim == fused


def test_native_geometry_is_idefics2s_tower():
    assert IDEFICS2_SIGLIP_SO400M_980.grid == (70, 70)
    assert ConnectorConfig.from_preset("idefics2-perceiver-siglip-so400m-980").fusion == (
        SingleLayerSpec(final_layer=27)
    )
