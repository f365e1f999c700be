"""Projectors: the registry, the module layouts, and loading official LLaVA / HF LLaVA weights.

docs/concepts.md, The projector: ``mlp2x_gelu`` is ``Linear -> GELU (exact erf) -> Linear`` with keys
``model.mm_projector.{0,2}.{weight,bias}`` in an official ``mm_projector.bin``; HF's
``LlavaMultiModalProjector`` is the same shape with keys ``linear_1`` / ``linear_2``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

import mmconnect
from mmconnect import (
    ConnectorConfig,
    DenseConnector,
    MLPSpec,
    ProjectorSpec,
    SCISpec,
    SingleLayerSpec,
    build_projector,
    list_projectors,
)
from mmconnect import projectors as projectors_module

EXACT = {"atol": 0.0, "rtol": 0.0}
VISION, LLM = 8, 12


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def isolated_registry(monkeypatch):
    """Register into a copy of the registry so no test leaks a projector into another."""
    monkeypatch.setattr(projectors_module, "_PROJECTORS", projectors_module._PROJECTORS.copy())


# ---------------------------------------------------------------------------- registry


def test_list_projectors_exact():
    """The built-in kinds among the registered ones (the zoo's modules add theirs), by name."""
    assert {"identity", "linear", "mlp"} <= set(list_projectors())
    assert list_projectors() == sorted(list_projectors())
    assert mmconnect.list_projectors is list_projectors


def test_register_projector_refuses_duplicates(isolated_registry):
    with pytest.raises(ValueError, match="a projector named 'mlp' is already registered"):
        mmconnect.register_projector("mlp", nn.Linear)
    with pytest.raises(ValueError, match="projector name 'mlp2x_gelu' spells an MLP"):
        mmconnect.register_projector("mlp2x_gelu", nn.Linear)
    mmconnect.register_projector("my_linear", lambda i, o: nn.Linear(i, o, bias=False))
    assert "my_linear" in list_projectors()
    assert build_projector("my_linear", 3, 4).bias is None
    with pytest.raises(ValueError, match="'my_linear' is already registered"):
        mmconnect.register_projector("my_linear", nn.Linear)


def test_registry_is_restored_after_isolated_test():
    assert "my_linear" not in list_projectors()


@pytest.mark.parametrize(("name", "error"), [("", ValueError), (None, TypeError), (3, TypeError)])
def test_register_projector_refuses_bad_names(isolated_registry, name, error):
    with pytest.raises(error, match="projector name must be a non-empty str"):
        mmconnect.register_projector(name, nn.Linear)


@pytest.mark.parametrize("name", ["mlp2x_tanh_", "MLP2x_gelu", "mlpx_gelu", "mlp2x_gelu "])
def test_unknown_projector_lists_known_ones(name):
    known = ", ".join(list_projectors())
    with pytest.raises(
        ValueError, match=re.escape(f"unknown projector {name!r}; known projectors: {known}")
    ):
        build_projector(name, 4, 4)


@pytest.mark.parametrize(
    ("argument", "dims", "error"),
    [
        ("in_dim", (0, 4), ValueError),
        ("out_dim", (4, -1), ValueError),
        ("in_dim", (True, 4), TypeError),
        ("out_dim", (4, 2.0), TypeError),
    ],
)
def test_bad_widths(argument, dims, error):
    with pytest.raises(error, match=f"{argument} must be a positive int"):
        build_projector("linear", *dims)


@pytest.mark.parametrize("depth", [1, 2, 3, 9])
def test_llava_mlp_names_build_mlps_of_their_depth(depth):
    projector = build_projector(f"mlp{depth}x_gelu", 4, 6)
    assert [type(module).__name__ for module in projector] == ["Linear"] + ["GELU", "Linear"] * (
        depth - 1
    )
    assert (
        build_projector(MLPSpec(depth=depth), 4, 6).state_dict().keys()
        == projector.state_dict().keys()
    )


def test_mlp_activation_is_a_parameter():
    projector = build_projector(MLPSpec(depth=2, activation="silu"), 4, 6)
    assert isinstance(projector[1], nn.SiLU)
    assert MLPSpec(depth=2, activation="silu").name == "mlp2x_silu"


@dataclass(frozen=True, kw_only=True)
class BottleneckSpec(ProjectorSpec):
    """A user projector with its own parameter."""

    kind: str = field(default="bottleneck", init=False)
    hidden: int = 2


def _bottleneck(in_dim: int, out_dim: int, *, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim))


def test_user_projector_with_its_own_parameters(isolated_registry):
    mmconnect.register_projector("bottleneck", _bottleneck, spec=BottleneckSpec)
    config = ConnectorConfig(
        vision_dim=4, llm_dim=6, num_layers=2, fusion="none", projector=BottleneckSpec(hidden=3)
    )
    assert DenseConnector(config).projector[0].weight.shape == (3, 4)
    data = config.to_dict()
    assert data["projector"] == {"kind": "bottleneck", "hidden": 3}
    assert ConnectorConfig.from_dict(data) == config
    assert config.projector.name == "bottleneck"
    assert (
        ConnectorConfig(**{**BASE_SMALL, "projector": "bottleneck"}).projector == BottleneckSpec()
    )
    with pytest.raises(
        ValueError, match=r"unknown keys \['width'\] for projector kind 'bottleneck'"
    ):
        ConnectorConfig.from_dict({**data, "projector": {"kind": "bottleneck", "width": 3}})
    with pytest.raises(ValueError, match="spec BottleneckSpec fixes kind='bottleneck'"):
        mmconnect.register_projector("other", _bottleneck, spec=BottleneckSpec)
    with pytest.raises(TypeError, match="spec must be a ProjectorSpec subclass"):
        mmconnect.register_projector("other", _bottleneck, spec=dict)


BASE_SMALL = {"vision_dim": 4, "llm_dim": 6, "num_layers": 2, "fusion": "none"}


# ---------------------------------------------------------------------------- shapes


def test_linear_shape():
    projector = build_projector("linear", 6, 10)
    assert isinstance(projector, nn.Linear)
    assert sorted(projector.state_dict()) == ["bias", "weight"]
    assert projector(torch.zeros(2, 5, 6)).shape == (2, 5, 10)


@pytest.mark.parametrize("depth", range(2, 9))
def test_mlp_gelu_layout_and_shape(depth):
    projector = build_projector(f"mlp{depth}x_gelu", 6, 10)
    assert isinstance(projector, nn.Sequential)
    assert len(projector) == 2 * depth - 1
    linears = [module for module in projector if isinstance(module, nn.Linear)]
    gelus = [module for module in projector if isinstance(module, nn.GELU)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 10)] + [(10, 10)] * (
        depth - 1
    )
    assert len(gelus) == depth - 1
    assert all(isinstance(projector[i], nn.Linear) for i in range(0, 2 * depth - 1, 2))
    assert sorted(projector.state_dict()) == sorted(
        f"{2 * i}.{kind}" for i in range(depth) for kind in ("weight", "bias")
    )
    assert projector(torch.zeros(2, 5, 6)).shape == (2, 5, 10)


def test_identity_projector():
    projector = build_projector("identity", 7, 7)
    x = _randn(0, 2, 3, 7)
    assert projector(x) is x
    with pytest.raises(
        ValueError, match="identity projector needs in_dim == out_dim, got in_dim=7, out_dim=8"
    ):
        build_projector("identity", 7, 8)


def test_gelu_is_exact_erf():
    gelu = build_projector("mlp2x_gelu", 4, 4)[1]
    assert isinstance(gelu, nn.GELU)
    assert gelu.approximate == "none"
    x = torch.linspace(-6, 6, 1001)
    erf_gelu = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    assert_close(gelu(x), erf_gelu, atol=1e-6, rtol=1e-6)
    tanh_gelu = F.gelu(x, approximate="tanh")
    assert (gelu(x) - tanh_gelu).abs().max() > 1e-4  # really not the tanh approximation


# ---------------------------------------------------------------------------- official weights


def _official_state(in_dim: int, out_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "model.mm_projector.0.weight": _randn(seed, out_dim, in_dim),
        "model.mm_projector.0.bias": _randn(seed + 1, out_dim),
        "model.mm_projector.2.weight": _randn(seed + 2, out_dim, out_dim),
        "model.mm_projector.2.bias": _randn(seed + 3, out_dim),
    }


def _manual_mlp(
    state: dict[str, torch.Tensor], x: torch.Tensor, prefix="model.mm_projector."
) -> torch.Tensor:
    hidden = F.linear(x, state[f"{prefix}0.weight"], state[f"{prefix}0.bias"])
    return F.linear(F.gelu(hidden), state[f"{prefix}2.weight"], state[f"{prefix}2.bias"])


@pytest.fixture
def sci_connector() -> DenseConnector:
    torch.manual_seed(0)
    config = ConnectorConfig.from_preset("dc-sci-clip-l-336", vision_dim=VISION, llm_dim=LLM)
    return DenseConnector(config)


def _sci_features(seed: int = 5) -> dict[int, torch.Tensor]:
    return {layer: _randn(seed + layer, 2, 16, VISION) for layer in (7, 15, 23)}


def test_official_mm_projector_bin_into_connector(tmp_path, sci_connector):
    state = _official_state(3 * VISION, LLM)
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)
    sci_connector.load_projector_weights(path)
    features = _sci_features()
    fused = torch.cat([features[23], features[7], features[15]], dim=-1)  # [F, H7, H15]
    assert_close(sci_connector(features), _manual_mlp(state, fused), **EXACT)


@pytest.mark.parametrize("source", ["path", "str", "mapping"])
def test_official_weights_into_projector(tmp_path, source):
    state = _official_state(6, LLM, seed=3)
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)
    projector = build_projector("mlp2x_gelu", 6, LLM)
    mmconnect.load_projector_weights(
        projector, {"path": path, "str": str(path), "mapping": state}[source]
    )
    x = _randn(9, 2, 5, 6)
    assert_close(projector(x), _manual_mlp(state, x), **EXACT)


def test_official_linear_projector(tmp_path):
    state = {
        "model.mm_projector.weight": _randn(0, LLM, 6),
        "model.mm_projector.bias": _randn(1, LLM),
    }
    projector = build_projector("linear", 6, LLM)
    mmconnect.load_projector_weights(projector, state)
    x = _randn(2, 1, 3, 6)
    expected = F.linear(x, state["model.mm_projector.weight"], state["model.mm_projector.bias"])
    assert_close(projector(x), expected, **EXACT)


def test_safetensors_input(tmp_path, sci_connector):
    state = _official_state(3 * VISION, LLM, seed=11)
    path = tmp_path / "projector.safetensors"
    save_file(state, str(path))
    sci_connector.load_projector_weights(path)
    x = _randn(4, 1, 3, 3 * VISION)
    assert_close(sci_connector.projector(x), _manual_mlp(state, x), **EXACT)


def test_shape_mismatch_names_key_and_shapes(tmp_path, sci_connector):
    path = tmp_path / "mm_projector.bin"
    torch.save(_official_state(VISION, LLM), path)  # a plain LLaVA projector (in = 8, not 24)
    message = re.escape(
        f"projector weights do not fit Sequential: 0.weight: ({LLM}, {VISION}) in the file, "
        f"({LLM}, {3 * VISION}) expected by the config"
    )
    with pytest.raises(ValueError, match=message):
        sci_connector.load_projector_weights(path)


def test_missing_and_unexpected_keys(sci_connector):
    state = {"model.mm_projector.0.weight": torch.zeros(LLM, 3 * VISION)}
    with pytest.raises(
        ValueError,
        match=re.escape(
            "projector weights do not fit Sequential: missing 0.bias; missing 2.weight; "
            "missing 2.bias"
        ),
    ):
        sci_connector.load_projector_weights(state)
    state = {
        **_official_state(3 * VISION, LLM),
        "model.mm_projector.4.weight": torch.zeros(LLM, LLM),
    }
    with pytest.raises(ValueError, match=r"do not fit Sequential: unexpected 4\.weight$"):
        sci_connector.load_projector_weights(state)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_file_without_projector_keys(tmp_path, sci_connector, suffix):
    state = {"model.embed_tokens.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(4, 4)}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "found no projector weights: expected keys like 'model.mm_projector.0.weight'"
        ),
    ):
        sci_connector.load_projector_weights(path)


def test_missing_file(tmp_path, sci_connector):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sci_connector.load_projector_weights(tmp_path / "nope.bin")


def _lora_trainables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``non_lora_trainables.bin`` of an official LoRA run: PEFT's ``base_model.model.`` before
    the model's own keys, beside the other trainable non-LoRA weights."""
    extra = {
        "model.image_newline": _randn(40, LLM),
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": _randn(41, VISION),
    }
    return {f"base_model.model.{key}": value for key, value in {**state, **extra}.items()}


def test_official_non_lora_trainables_bin_into_connector(tmp_path, sci_connector):
    state = _official_state(3 * VISION, LLM, seed=21)
    path = tmp_path / "non_lora_trainables.bin"
    torch.save(_lora_trainables(state), path)
    assert "base_model.model.model.mm_projector.0.weight" in torch.load(path, weights_only=True)
    sci_connector.load_projector_weights(path)
    features = _sci_features()
    fused = torch.cat([features[23], features[7], features[15]], dim=-1)
    assert_close(sci_connector(features), _manual_mlp(state, fused), **EXACT)


def test_non_lora_trainables_of_a_swapped_model(tmp_path, sci_connector):
    """A LoRA run after swap_connector saves the connector's own keys under PEFT's prefix."""
    torch.manual_seed(4)
    trained = DenseConnector(sci_connector.config)
    state = {
        f"base_model.model.model.mm_projector.{name}": p.detach().clone()
        for name, p in trained.named_parameters()
    }
    path = tmp_path / "non_lora_trainables.bin"
    torch.save(state, path)
    mmconnect.load_projector_weights(sci_connector.projector, path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(sci_connector.parameters(), trained.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (  # LLaVA's builder: base_model. off, then model. off because model.model. keys exist
            ["base_model.model.model.mm_projector.0.weight", "base_model.model.lm_head.weight"],
            ["lm_head.weight", "model.mm_projector.0.weight"],
        ),
        (  # no model.model. keys: model. stays
            ["base_model.model.mm_projector.0.weight", "lm_head.weight"],
            ["lm_head.weight", "model.mm_projector.0.weight"],
        ),
        (
            ["model.mm_projector.0.weight", "model.layers.0.w"],
            ["model.layers.0.w", "model.mm_projector.0.weight"],
        ),
    ],
)
def test_strip_lora_prefixes_as_llavas_builder(keys, expected):
    state = {key: torch.zeros(1) for key in keys}
    assert sorted(projectors_module.strip_lora_prefixes(state)) == expected


def test_bin_is_read_without_unpickling_objects(tmp_path, sci_connector):
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "extra": object()}, path)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        sci_connector.load_projector_weights(path)


# ---------------------------------------------------------------------------- HF LLaVA weights


def _llava_config(feature_layer):
    from transformers import LlavaConfig

    from mmconnect.integrations.applications.tiny_models import (
        tiny_text_config,
        tiny_vision_config,
    )

    return LlavaConfig(
        vision_config=tiny_vision_config(
            "clip", blocks=2, width=VISION, intermediate_size=16, heads=2, image_size=28
        ),
        text_config=tiny_text_config(
            width=LLM, intermediate_size=16, blocks=1, heads=2, vocab_size=64
        ),
        projector_hidden_act="gelu",
        vision_feature_layer=feature_layer,
    )


@pytest.mark.parametrize("prefix", ["", "model.multi_modal_projector.", "multi_modal_projector."])
@pytest.mark.parametrize(
    ("feature_layer", "fusion"),
    [(-2, SingleLayerSpec()), ([-2, 0, 1], SCISpec(extra_layers=(0, 1)))],
)
def test_hf_llava_projector_weights(prefix, feature_layer, fusion):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    hf = LlavaMultiModalProjector(_llava_config(feature_layer)).eval()
    torch.manual_seed(1)  # a differently initialised connector, so equality proves the load
    connector = DenseConnector(
        ConnectorConfig(vision_dim=VISION, llm_dim=LLM, num_layers=4, fusion=fusion)
    )
    connector.load_projector_weights(
        {prefix + key: value for key, value in hf.state_dict().items()}
    )
    features = {layer: _randn(layer, 2, 4, VISION) for layer in range(5)}
    fused = connector.fuse(features)
    # HF's list-valued vision_feature_layer concatenates [H[-2], H[0], H[1]]: exactly SCI.
    assert fused.shape[-1] == hf.linear_1.in_features
    with torch.no_grad():
        assert_close(connector(features), hf(fused), **EXACT)


def test_hf_llava_full_checkpoint_safetensors(tmp_path):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_llava_config(-2)).eval()
    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    connector = DenseConnector(
        ConnectorConfig(fusion="none", vision_dim=VISION, llm_dim=LLM, num_layers=2)
    )
    connector.load_projector_weights(path)  # only the multi_modal_projector keys are taken
    x = _randn(0, 1, 4, VISION)
    with torch.no_grad():
        assert_close(connector.projector(x), model.model.multi_modal_projector(x), **EXACT)
