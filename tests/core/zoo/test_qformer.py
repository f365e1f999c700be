"""BLIP-2's Q-Former connector: parity with Hugging Face, the token contract, specs, presets.

docs/zoo/qformer.md: ``M`` learned queries pass ``L`` BERT layers (self-attention, every
``f``-th layer cross-attention to the image tokens, feed-forward), then a Linear to the LLM
width; the output is ``num_queries`` tokens forming no grid. Parity is of the module against
``Blip2QFormerModel`` + ``query_tokens`` + ``language_projection`` with converted weights.
"""

from __future__ import annotations

import pytest
import torch

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    LayerFeatures,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    build_projector,
    list_presets,
    preset_geometry,
)
from mmconnect.projectors import parse_projector
from mmconnect.zoo.qformer import (
    EVA_VIT_G_224,
    QFormerProjector,
    QFormerSpec,
    qformer_state_from_hf,
)

transformers = pytest.importorskip("transformers")
from transformers.models.blip_2 import modeling_blip_2 as hf_blip2  # noqa: E402

VISION, LLM = 24, 40
TINY = {
    "num_queries": 5,
    "depth": 3,
    "num_heads": 4,
    "hidden_size": 32,
    "intermediate_size": 48,
    "cross_attention_frequency": 2,
    "layer_norm_eps": 1e-12,
}


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    """Every parameter from N(0, std) (LayerNorm weights around 1), so no layer is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * std
            norm = "LayerNorm.weight" in name or "layernorm.weight" in name
            parameter.copy_(values + 1 if norm else values)


class _HFQFormer(torch.nn.Module):
    """The connector part of ``Blip2ForConditionalGeneration``: the same attribute names and
    the same ``get_image_features`` steps (expand the queries, Q-Former, language projection)."""

    def __init__(self, attn_implementation: str = "sdpa", dropout: float = 0.0) -> None:
        super().__init__()
        config = transformers.Blip2QFormerConfig(
            hidden_size=TINY["hidden_size"],
            num_hidden_layers=TINY["depth"],
            num_attention_heads=TINY["num_heads"],
            intermediate_size=TINY["intermediate_size"],
            cross_attention_frequency=TINY["cross_attention_frequency"],
            layer_norm_eps=TINY["layer_norm_eps"],
            encoder_hidden_size=VISION,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        config._attn_implementation = attn_implementation
        self.query_tokens = torch.nn.Parameter(
            torch.zeros(1, TINY["num_queries"], TINY["hidden_size"])
        )
        self.qformer = hf_blip2.Blip2QFormerModel(config)
        self.language_projection = torch.nn.Linear(TINY["hidden_size"], LLM)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        mask = torch.ones(image.shape[:-1], dtype=torch.long)
        output = self.qformer(
            query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask
        )
        return self.language_projection(output.last_hidden_state)


def _pair(attn_implementation: str = "sdpa", dropout: float = 0.0, seed: int = 0, std: float = 0.5):
    reference = _HFQFormer(attn_implementation, dropout)
    _randomize(reference, seed, std)
    ours = build_projector(
        QFormerSpec(**TINY, dropout=dropout, attention_dropout=dropout), VISION, LLM
    )
    ours.load_hf_state_dict(reference.state_dict())
    return reference.eval(), ours.eval()


# ---------------------------------------------------------------------------- parity


def test_fp32_parity_with_hf_sdpa_is_exact():
    reference, ours = _pair("sdpa")
    image = _randn(1, 2, 6 * 4, VISION)
    with torch.no_grad():
        expected, actual = reference(image), ours(image, (6, 4))
    assert actual.shape == (2, TINY["num_queries"], LLM)
    # The same operations in the same order (SDPA with the same scale, no mask): bit for bit.
    assert torch.equal(actual, expected)


def test_hf_default_attention_is_sdpa():
    config = transformers.Blip2QFormerConfig(hidden_size=8, num_attention_heads=2)
    assert hf_blip2.Blip2QFormerModel(config).config._attn_implementation == "sdpa"


def test_fp32_parity_with_hf_eager_within_1e_6():
    # HF's eager attention is matmul -> softmax -> matmul; ours is SDPA (HF's default): the same
    # math rounded in another order, so not bit-equal. With weights from N(0, 0.1) (5x HF's
    # initialiser std) the outputs (max |y| ~2) differ by <= 6e-7 (measured, seeds 0-4).
    reference, ours = _pair("eager", seed=3, std=0.1)
    image = _randn(4, 3, 9, VISION)
    with torch.no_grad():
        actual, expected = ours(image, (3, 3)), reference(image)
    assert 0 < (actual - expected).abs().max().item() <= 1e-6
    # The whole difference is HF's own eager-vs-SDPA rounding: its SDPA module gives ours.
    reference.qformer.config._attn_implementation = "sdpa"
    with torch.no_grad():
        assert torch.equal(reference(image), actual)


def test_bf16_parity_with_hf():
    reference, ours = _pair("sdpa", seed=5)
    reference, ours = reference.to(torch.bfloat16), ours.to(torch.bfloat16)
    image = _randn(6, 2, 16, VISION).to(torch.bfloat16)
    with torch.no_grad():
        expected, actual = reference(image), ours(image, (4, 4))
    assert actual.dtype == torch.bfloat16
    assert torch.equal(actual, expected)


def test_training_mode_dropout_matches_hf_for_the_same_seed():
    # Dropout at the same places (query LayerNorm output, attention probabilities, each output
    # projection) drawn in the same order: seeded training forwards agree bit for bit.
    reference, ours = _pair("sdpa", dropout=0.3, seed=7)
    reference.train(), ours.train()
    image = _randn(8, 2, 12, VISION)
    torch.manual_seed(11)
    expected = reference(image)
    torch.manual_seed(11)
    actual = ours(image, (3, 4))
    torch.manual_seed(12)
    other = ours(image, (3, 4))
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, other)  # dropout is on


def test_full_blip2_model_keys_and_image_features():
    """A whole tiny ``Blip2ForConditionalGeneration``: the converter picks the connector's keys
    out of the full state dict, and ours fed BLIP-2's own image tokens (class token included,
    after the tower's post_layernorm: 1 + 4 x 4 tokens) equals ``get_image_features``."""
    vision = transformers.Blip2VisionConfig(
        hidden_size=VISION,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
    )
    qformer = transformers.Blip2QFormerConfig(
        hidden_size=TINY["hidden_size"],
        num_hidden_layers=TINY["depth"],
        num_attention_heads=TINY["num_heads"],
        intermediate_size=TINY["intermediate_size"],
    )
    text = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=LLM,
        num_hidden_layers=1,
        ffn_dim=16,
        num_attention_heads=2,
        word_embed_proj_dim=LLM,
    )
    config = transformers.Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=TINY["num_queries"],
    )
    torch.manual_seed(0)
    model = hf_blip2.Blip2ForConditionalGeneration(config).eval()
    _randomize(model.qformer, 1)
    with torch.no_grad():
        model.query_tokens.normal_(generator=torch.Generator().manual_seed(2))
    ours = QFormerProjector(VISION, LLM, QFormerSpec(**{**TINY, "layer_norm_eps": 1e-12})).eval()
    ours.load_hf_state_dict(model.state_dict())
    pixels = _randn(3, 2, 3, 28, 28)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        image_tokens = features.last_hidden_state
        assert image_tokens.shape == (2, 17, VISION)
        actual = ours(image_tokens, (1, 17))  # a set of 17 tokens: any grid of that area
    assert torch.equal(actual, features.pooler_output)


def test_real_size_parameter_count_equals_hf():
    """BLIP-2 OPT-2.7b's connector: 107,130,880 parameters (Q-Former 105,162,240 with its
    queries and LayerNorm, language projection 1,968,640), as HF's modules on the meta device."""
    with torch.device("meta"):
        ours = QFormerProjector(1408, 2560, QFormerSpec())
        reference = hf_blip2.Blip2QFormerModel(transformers.Blip2QFormerConfig())
    hf_count = sum(p.numel() for p in reference.parameters()) + 32 * 768 + 768 * 2560 + 2560
    assert sum(p.numel() for p in ours.parameters()) == hf_count == 107_130_880
    assert sum(layer.cross_attention is not None for layer in ours.layers) == 6


# ---------------------------------------------------------------------------- converter


def _hf_state(**changes):
    reference = _HFQFormer()
    _randomize(reference, 0)
    state = dict(reference.state_dict())
    state.update(changes)
    return state


def test_converter_maps_every_key_and_ignores_other_parts():
    state = _hf_state()
    state["vision_model.embeddings.class_embedding"] = torch.zeros(1)
    state["language_model.lm_head.weight"] = torch.zeros(1)
    converted = qformer_state_from_hf(state)
    ours = QFormerProjector(VISION, LLM, QFormerSpec(**TINY))
    assert sorted(converted) == sorted(ours.state_dict())
    assert (
        converted["layers.2.cross_attention.key.weight"]
        is state["qformer.encoder.layer.2.crossattention.attention.key.weight"]
    )
    assert (
        converted["layers.1.feed_forward.norm.bias"]
        is state["qformer.encoder.layer.1.output_query.LayerNorm.bias"]
    )
    assert "layers.1.cross_attention.key.weight" not in converted


def test_converter_with_prefix_and_text_branch():
    state = {f"model.{key}": value for key, value in _hf_state().items()}
    state["model.qformer.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(1)
    state["model.qformer.encoder.layer.0.output.LayerNorm.bias"] = torch.zeros(1)
    converted = qformer_state_from_hf(state, prefix="model.")
    assert sorted(converted) == sorted(
        QFormerProjector(VISION, LLM, QFormerSpec(**TINY)).state_dict()
    )


def test_converter_errors_list_missing_and_unexpected_keys():
    state = _hf_state()
    del state["qformer.encoder.layer.1.attention.output.dense.bias"]
    del state["qformer.encoder.layer.2.crossattention.attention.value.weight"]
    state["qformer.embeddings.word_embeddings.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        qformer_state_from_hf(state)
    assert str(error.value) == (
        "the BLIP-2 Q-Former keys under prefix '' are incomplete or unknown: missing "
        "['layers.1.self_attention.out.bias', 'layers.2.cross_attention.value.weight'] (ours), "
        "unexpected ['qformer.embeddings.word_embeddings.weight']"
    )
    with pytest.raises(ValueError, match=r"found no BLIP-2 connector keys under prefix 'x\.'"):
        qformer_state_from_hf(_hf_state(), prefix="x.")
    with pytest.raises(TypeError, match="prefix must be a str"):
        qformer_state_from_hf(_hf_state(), prefix=None)


def test_load_refuses_weights_of_another_size():
    ours = QFormerProjector(VISION + 1, LLM, QFormerSpec(**{**TINY, "depth": 2}))
    with pytest.raises(ValueError) as error:
        ours.load_hf_state_dict(_hf_state())
    message = str(error.value)
    assert "unexpected layers.2.self_attention.query.weight" in message
    assert (
        "layers.0.cross_attention.key.weight: (32, 24) in the Hugging Face weights, (32, 25) "
        "expected by the config" in message
    )


# ---------------------------------------------------------------------------- token contract


@pytest.mark.parametrize("grid", [(24, 24), (27, 27), (3, 5), (1, 1)])
def test_token_count_and_grid(grid):
    projector = QFormerProjector(VISION, LLM, QFormerSpec(**TINY))
    assert projector.num_tokens(grid) == 5
    assert projector.output_grid(grid) == (0, 0)
    if grid[0] * grid[1] <= 15:
        assert projector(_randn(0, 2, grid[0] * grid[1], VISION), grid).shape == (2, 5, LLM)


@pytest.mark.parametrize(
    ("grid", "error"),
    [((0, 4), ValueError), ((4,), ValueError), ((4, 4.0), TypeError), ("4x4", TypeError)],
)
def test_bad_grids(grid, error):
    projector = QFormerProjector(VISION, LLM, QFormerSpec(**TINY))
    with pytest.raises(error, match="grid must be a"):
        projector.num_tokens(grid)
    with pytest.raises(error, match="grid must be a"):
        projector.output_grid(grid)


def test_bad_token_tensors():
    projector = QFormerProjector(VISION, LLM, QFormerSpec(**TINY))
    with pytest.raises(
        ValueError, match=r"tokens must be \[batch, >= 12 tokens \(the 3x4 grid\), 24"
    ):
        projector(_randn(0, 2, 11, VISION), (3, 4))
    with pytest.raises(ValueError, match=r"got \(2, 12, 23\)"):
        projector(_randn(0, 2, 12, VISION - 1), (3, 4))


def _features(num_layers: int, grid: tuple[int, int], seed: int = 0) -> LayerFeatures:
    hidden = [_randn(seed + i, 2, grid[0] * grid[1], VISION) for i in range(num_layers + 1)]
    return LayerFeatures(dict(enumerate(hidden)), grids={i: grid for i in range(num_layers + 1)})


@pytest.mark.parametrize(
    ("fusion", "fused"),
    [
        (SingleLayerSpec(final_layer=-2), VISION),
        (SCISpec(final_layer=-2, extra_layers=(1, 2)), 3 * VISION),
        (DCISpec(final_layer=-2, groups=((0, 1), (2, 3))), 3 * VISION),
        (STISpec(final_layer=-2, extra_layers=(1,), window=2), VISION),
    ],
    ids=["none", "sci", "dci", "sti"],
)
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_composes_with_every_fusion(fusion, fused, grid):
    config = ConnectorConfig(
        vision_dim=VISION, llm_dim=LLM, num_layers=5, fusion=fusion, projector=QFormerSpec(**TINY)
    )
    connector = DenseConnector(config)
    assert connector.projector.in_dim == fused
    output = connector(_features(5, grid), grid)
    assert output.shape == (2, connector.num_tokens(grid), LLM) == (2, 5, LLM)
    assert connector.token_grid(grid) == (0, 0)
    assert connector.extra_tokens(grid) == 5


def test_sti_extra_tokens_are_read():
    # STI appends pooled tokens after the grid; the queries attend to them too.
    config = ConnectorConfig(
        vision_dim=VISION,
        llm_dim=LLM,
        num_layers=5,
        fusion=STISpec(final_layer=-2, extra_layers=(1,), window=2),
        projector=QFormerSpec(**TINY),
    )
    connector = DenseConnector(config).eval()
    features = _features(5, (4, 4))
    changed = LayerFeatures({**features, 1: features[1] + 1}, grids={i: (4, 4) for i in range(6)})
    with torch.no_grad():
        assert not torch.equal(connector(features, (4, 4)), connector(changed, (4, 4)))


def test_resampling_before_the_queries_only():
    from mmconnect.resample import ResampleSpec

    def config(placement):
        return ConnectorConfig(
            vision_dim=VISION,
            llm_dim=LLM,
            num_layers=5,
            fusion=SingleLayerSpec(),
            projector=QFormerSpec(**TINY),
            resample=ResampleSpec(grid=(2, 2), placement=placement),
        )

    connector = DenseConnector(config("before_projector"))
    assert connector(_features(5, (4, 4)), (4, 4)).shape == (2, connector.num_tokens((4, 4)), LLM)
    assert connector.num_tokens((4, 4)) == 5
    with pytest.raises(ValueError, match="form no grid"):  # the queries form no grid to resample
        DenseConnector(config("after_projector")).num_tokens((4, 4))


def test_every_parameter_gets_a_gradient():
    config = ConnectorConfig(
        vision_dim=VISION,
        llm_dim=LLM,
        num_layers=5,
        fusion=DCISpec(final_layer=-2, groups=((0, 1), (2, 3))),
        projector=QFormerSpec(**TINY),
    )
    connector = DenseConnector(config)
    with torch.no_grad():  # the queries start at zero, as in HF: give them values
        connector.projector.query_tokens.normal_(generator=torch.Generator().manual_seed(0))
    connector(_features(5, (3, 4)), (3, 4)).square().mean().backward()
    names = [name for name, _ in connector.named_parameters()]
    assert "projector.query_tokens" in names and "projector.norm.weight" in names
    assert len(names) == 5 + 3 * 16 + 2 * 10  # queries, norm, projection; 3 layers; 2 cross
    for name, parameter in connector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------- spec


def test_spec_defaults_are_blip2s_and_round_trip():
    spec = QFormerSpec()
    assert spec.to_dict() == {
        "kind": "qformer",
        "num_queries": 32,
        "depth": 12,
        "num_heads": 12,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "cross_attention_frequency": 2,
        "layer_norm_eps": 1e-12,
        "dropout": 0.1,
        "attention_dropout": 0.1,
    }
    assert parse_projector(spec.to_dict()) == spec
    assert parse_projector("qformer") == spec
    config = ConnectorConfig(
        vision_dim=8,
        llm_dim=8,
        num_layers=2,
        fusion=SingleLayerSpec(),
        projector=QFormerSpec(**TINY),
    )
    assert ConnectorConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"num_queries": 0}, ValueError, "num_queries must be a positive int, got 0"),
        ({"depth": 2.0}, TypeError, r"depth must be a positive int, got 2.0 \(float\)"),
        ({"num_heads": True}, TypeError, "num_heads must be a positive int, got True"),
        ({"hidden_size": -8}, ValueError, "hidden_size must be a positive int"),
        ({"intermediate_size": "64"}, TypeError, "intermediate_size must be a positive int"),
        ({"cross_attention_frequency": 0}, ValueError, "cross_attention_frequency must be"),
        ({"hidden_size": 30, "num_heads": 4}, ValueError, "hidden_size=30 must be a multiple"),
        ({"layer_norm_eps": 0.0}, ValueError, "layer_norm_eps must be a positive number"),
        ({"layer_norm_eps": "1e-12"}, TypeError, "layer_norm_eps must be a positive number"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"attention_dropout": None}, TypeError, "attention_dropout must be a number"),
    ],
)
def test_spec_validation(changes, error, message):
    with pytest.raises(error, match=message):
        QFormerSpec(**{**TINY, **changes})


def test_unknown_spec_key():
    with pytest.raises(
        ValueError, match=r"unknown keys \['queries'\] for projector kind 'qformer'"
    ):
        parse_projector({"kind": "qformer", "queries": 4})


# ---------------------------------------------------------------------------- presets


def test_presets_token_counts_at_their_geometry():
    assert {"baseline+qformer-eva-vit-g-224", "dc-dci+qformer-clip-l-336"} <= set(list_presets())
    assert preset_geometry("baseline+qformer-eva-vit-g-224") == EVA_VIT_G_224
    assert EVA_VIT_G_224.grid == (16, 16)
    assert preset_geometry("dc-dci+qformer-clip-l-336").grid == (24, 24)
    for name, grid, fused in (
        ("baseline+qformer-eva-vit-g-224", (16, 16), 1408),
        ("dc-dci+qformer-clip-l-336", (24, 24), 3072),
    ):
        config = ConnectorConfig.from_preset(name)
        assert config.num_tokens(grid) == 32
        assert config.token_grid(grid) == (0, 0)
        with torch.device("meta"):
            connector = DenseConnector(config)
        assert connector.projector.in_dim == fused
    assert ConnectorConfig.from_preset("baseline+qformer-eva-vit-g-224").llm_dim == 2560
