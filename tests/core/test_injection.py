"""DeepStack injection in the connector: spec, config round trip, fingerprint, token contract,
the residuals' values, the tap capturing the injected layers, and training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DeepStackSpec,
    DenseConnector,
    MLPSpec,
    ResampleSpec,
    SCISpec,
    SingleLayerSpec,
    STISpec,
)
from mmconnect.connector import config_fingerprint
from mmconnect.projectors import GridProjector

NUM_LAYERS = 6


def _config(**changes) -> ConnectorConfig:
    values = {
        "vision_dim": 4,
        "llm_dim": 8,
        "num_layers": NUM_LAYERS,
        "fusion": DCISpec(groups=((1, 2), (3, 4))),
        "injection": DeepStackSpec(layers=(2, -3)),
    }
    return ConnectorConfig(**{**values, **changes})


def _features(grid=(3, 4), seed=0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    return {
        layer: torch.randn(2, tokens, 4, generator=generator) for layer in range(NUM_LAYERS + 1)
    }


def test_spec_normalises_validates_and_round_trips():
    spec = DeepStackSpec(layers=[2, -3], projector="linear")
    assert spec.layers == (2, -3) and spec.projector.kind == "linear"
    assert spec.normalized(NUM_LAYERS).layers == (2, 4)
    assert DeepStackSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="at least one vision layer"):
        DeepStackSpec(layers=())
    with pytest.raises(TypeError, match=r"injection.layers must be a sequence of layer indices"):
        DeepStackSpec(layers=3)
    with pytest.raises(ValueError, match=r"injection.layers names layer 4 twice \(as -3\)"):
        DeepStackSpec(layers=(4, -3)).normalized(NUM_LAYERS)
    with pytest.raises(ValueError, match=r"injection.layers\[0\]=9 is out of range"):
        _config(injection=DeepStackSpec(layers=(9,)))
    with pytest.raises(ValueError, match=r"unknown injection spec keys \['level'\]"):
        DeepStackSpec.from_dict({"layers": [1], "level": 2})
    with pytest.raises(TypeError, match="injection must be a DeepStackSpec or None"):
        _config(injection={"layers": [1]})


def test_config_round_trip_and_fingerprints():
    config = _config()
    data = config.to_dict()
    assert data["injection"] == {
        "layers": [2, -3],
        "projector": {"kind": "mlp", "depth": 2, "activation": "gelu"},
    }
    assert ConnectorConfig.from_dict(data) == config
    plain = config.replace(injection=None)
    assert "injection" not in plain.to_dict()  # configs without it keep their dicts
    # -3 and 4 name the same layer; an injection changes what the weights mean.
    assert config_fingerprint(config) == config_fingerprint(
        config.replace(injection=DeepStackSpec(layers=(2, 4)))
    )
    assert config_fingerprint(config) != config_fingerprint(plain)
    assert config_fingerprint(config) != config_fingerprint(
        config.replace(injection=DeepStackSpec(layers=(2, 3)))
    )


def test_residuals_are_each_layer_through_its_own_projector():
    torch.manual_seed(0)
    connector = DenseConnector(_config())
    assert connector.injection_layers == (2, 4)
    assert connector.individual_layers == (5, 2, 4)
    assert connector.captured_layers == (1, 2, 3, 4, 5)
    features = _features()
    tokens, residuals = connector.forward_with_injections(features, (3, 4))
    assert torch.equal(tokens, connector(features, (3, 4)))
    assert len(residuals) == 2
    for layer, projector, residual in zip((2, 4), connector.injection, residuals, strict=True):
        first, second = projector[0], projector[2]
        expected = second(nn.functional.gelu(first(features[layer])))
        assert torch.equal(residual, expected)
        assert residual.shape == tokens.shape == (2, 12, 8)
    assert (
        DenseConnector(_config(injection=None)).forward_with_injections(features, (3, 4))[1] == ()
    )


def test_the_streaming_tap_captures_the_injected_layers(tiny_clip_vision):
    """A tap built by the connector captures the injected layers next to the fused ones."""
    config = ConnectorConfig(
        vision_dim=32,
        llm_dim=8,
        num_layers=4,
        fusion=DCISpec(groups=((1, 2), (3, 4))),
        injection=DeepStackSpec(layers=(1, 3)),
    )
    connector = DenseConnector(config)
    pixels = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        streamed = connector.forward_with_injections(connector.make_tap(tiny_clip_vision)(pixels))
        hidden = tiny_clip_vision(pixels, output_hidden_states=True).hidden_states
        every = {layer: state[:, 1:] for layer, state in enumerate(hidden)}  # CLS dropped
        reference = connector.forward_with_injections(every, (3, 3))
    assert torch.equal(streamed[0], reference[0])
    for got, expected in zip(streamed[1], reference[1], strict=True):
        assert torch.equal(got, expected)


class HalvingMerge(GridProjector):
    """A 2x2 merge (as Qwen3-VL's mergers): [B, h*w, C] -> [B, h*w/4, D]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4 * in_dim, out_dim)

    def output_grid(self, grid):
        return grid[0] // 2, grid[1] // 2

    def forward(self, tokens, grid):
        h, w = self.output_grid(grid)
        blocks = tokens.view(tokens.shape[0], h, 2, w, 2, -1).permute(0, 1, 3, 2, 4, 5)
        return self.linear(blocks.reshape(tokens.shape[0], h * w, -1))


def test_every_level_must_give_the_connector_count(monkeypatch):
    from mmconnect import projectors

    monkeypatch.setattr(projectors, "_PROJECTORS", projectors._PROJECTORS.copy())
    projectors.register_projector("halving_merge", HalvingMerge)
    # Both paths merge 2x2: counts agree (the Qwen3-VL layout).
    merged = DenseConnector(
        _config(
            fusion=SingleLayerSpec(final_layer=-1),
            projector="halving_merge",
            injection=DeepStackSpec(layers=(2, 4), projector="halving_merge"),
        )
    )
    tokens, residuals = merged.forward_with_injections(_features((4, 6)), (4, 6))
    assert tokens.shape == residuals[0].shape == residuals[1].shape == (2, 6, 8)
    # A token-wise injection next to a merged main path: 24 vs 6 tokens, refused before running.
    mismatched = DenseConnector(_config(projector="halving_merge"))
    message = (
        r"injection projector of layer 2 gives 24 tokens for the 4x6 grid but the connector gives 6"
    )
    with pytest.raises(ValueError, match=message):
        mismatched.num_tokens((4, 6))
    with pytest.raises(ValueError, match=message):
        mismatched.forward_with_injections(_features((4, 6)), (4, 6))
    for changes in (
        {"resample": ResampleSpec(grid=(2, 2))},
        {"fusion": STISpec(extra_layers=(1,), window=2)},
    ):
        with pytest.raises(ValueError, match="DeepStack adds each level"):
            DenseConnector(_config(**changes)).num_tokens((4, 4))


def test_injection_projectors_train_with_the_connector():
    connector = DenseConnector(
        _config(
            fusion=SCISpec(extra_layers=(1,)),
            injection=DeepStackSpec(layers=(2,), projector=MLPSpec(depth=1)),
        )
    )
    tokens, residuals = connector.forward_with_injections(_features(), (3, 4))
    (tokens.square().mean() + residuals[0].square().mean()).backward()
    names = {name for name, parameter in connector.named_parameters() if parameter.grad is not None}
    assert names == {name for name, _ in connector.named_parameters()}
    assert {"injection.0.0.weight", "injection.0.0.bias"} <= names
