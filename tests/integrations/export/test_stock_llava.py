"""The connector -> stock LLaVA rewrite: layer lists, the expanded first Linear, the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    MLPSpec,
    ResampleSpec,
    SCISpec,
    SingleLayerSpec,
    STISpec,
)
from mmconnect.injection import DeepStackSpec
from mmconnect.integrations.export.stock_llava import (
    expand_first_linear,
    stock_projection,
    stock_projector_state,
)

C, D = 4, 6


def config(fusion, **changes) -> ConnectorConfig:
    return ConnectorConfig(vision_dim=C, llm_dim=D, num_layers=6, fusion=fusion, **changes)


# ---------------------------------------------------------------------------- layer lists


def test_baseline_is_one_layer_as_an_int():
    projection = stock_projection(config(SingleLayerSpec(final_layer=-2)), prefix_tokens=1)
    assert projection.vision_feature_layer == 5
    assert projection.chunks == ((5,),)
    assert (projection.select_strategy, projection.activation, projection.exact) == (
        "default",
        "gelu",
        True,
    )


def test_sci_keeps_the_dense_order():
    projection = stock_projection(config(SCISpec(extra_layers=(3, 1))), prefix_tokens=1)
    assert projection.vision_feature_layer == [5, 3, 1]
    assert projection.exact


def test_dci_lists_the_final_layer_then_every_group_member_once():
    """The final layer (5) is also the last member of the second group: listed once."""
    fusion = DCISpec(groups=[(0, 1, 2), (3, 4, 5)], final_layer=-2)
    projection = stock_projection(config(fusion), prefix_tokens=0)
    assert projection.vision_feature_layer == [5, 0, 1, 2, 3, 4]
    assert projection.chunks == ((5,), (0, 1, 2), (3, 4, 5))
    assert (projection.select_strategy, projection.exact) == ("full", False)


def test_published_dci_preset_lists_all_24_layers_final_first():
    preset = ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=C, llm_dim=D)
    projection = stock_projection(preset, prefix_tokens=1)
    assert projection.vision_feature_layer == [23, *range(23)]


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_mlp2x_activations_map_to_hf_names(activation):
    spec = MLPSpec(depth=2, activation=activation)
    assert stock_projection(config("none", projector=spec), 1).activation == activation


# ---------------------------------------------------------------------------- the first Linear


def test_expansion_scales_and_sums_blocks_exactly():
    weight = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 6)  # 3 chunks of 2 columns
    layers, expanded = expand_first_linear(weight, [(5,), (3, 5), (7,)])
    assert layers == (5, 3, 7)
    w0, w1, w2 = weight[:, 0:2], weight[:, 2:4], weight[:, 4:6]
    assert torch.equal(expanded, torch.cat([w0 + w1 / 2, w1 / 2, w2], dim=1))


def test_layer_in_two_chunks_gets_both_blocks():
    """Not reachable from a DCI config (groups are disjoint) but the algebra must hold."""
    weight = torch.randn(3, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layers, expanded = expand_first_linear(weight, [(1,), (1, 2), (2, 1, 4)])
    assert layers == (1, 2, 4)
    w0, w1, w2 = weight[:, 0:3], weight[:, 3:6], weight[:, 6:9]
    torch.testing.assert_close(expanded[:, 0:3], w0 + w1 / 2 + w2 / 3, rtol=0, atol=1e-15)
    torch.testing.assert_close(expanded[:, 3:6], w1 / 2 + w2 / 3, rtol=0, atol=1e-15)
    torch.testing.assert_close(expanded[:, 6:9], w2 / 3, rtol=0, atol=1e-15)
    features = torch.randn(5, 3, dtype=torch.float64)
    h1, h2, h4 = (features * k for k in (1.0, -2.0, 0.5))
    dense = torch.cat([h1, (h1 + h2) / 2, (h2 + h1 + h4) / 3], dim=1) @ weight.T
    stock = torch.cat([h1, h2, h4], dim=1) @ expanded.T
    torch.testing.assert_close(stock, dense, rtol=0, atol=1e-12)


def test_single_layer_chunks_are_copied_bit_for_bit_in_bf16():
    weight = torch.randn(4, 8).to(torch.bfloat16)
    layers, expanded = expand_first_linear(weight, [(2,), (0,)])
    assert layers == (2, 0)
    assert expanded.dtype == torch.bfloat16
    assert torch.equal(expanded, weight)


def test_expansion_rounds_once_from_float64():
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _, expanded = expand_first_linear(weight, [(0,), (1, 2, 3)])
    exact = weight.double()[:, 3:6] / 3
    assert torch.equal(expanded[:, 3:6], exact.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("weight", "chunks", "message"),
    [
        (torch.zeros(6), [(0,)], r"\[out, in\]"),
        (torch.zeros(2, 5), [(0,), (1,)], "not a multiple of the 2 chunks"),
        (torch.zeros(2, 4), [(0,), ()], r"chunks\[1\] is empty"),
    ],
)
def test_expansion_refuses_bad_input(weight, chunks, message):
    with pytest.raises(ValueError, match=message):
        expand_first_linear(weight, chunks)


def test_projector_state_holds_the_stock_keys_and_shapes():
    dense = DenseConnector(config(DCISpec(groups=[(0, 1, 2), (3, 4, 5)], final_layer=-2)))
    projection = stock_projection(dense.config, prefix_tokens=1)
    state = stock_projector_state(dense, projection)
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        "linear_1.weight": (D, 6 * C),
        "linear_1.bias": (D,),
        "linear_2.weight": (D, D),
        "linear_2.bias": (D,),
    }
    assert torch.equal(state["linear_2.weight"], dense.projector[2].weight)
    assert torch.equal(state["linear_1.bias"], dense.projector[0].bias)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fusion": STISpec(extra_layers=(1, 3))}, "fusion 'sti'.*along the sequence"),
        (
            {"fusion": DCISpec(groups=[(0, 1), (2, 3)]), "resample": ResampleSpec(grid=(2, 2))},
            "resample=.*resizes the token grid",
        ),
        ({"fusion": "none", "projector": "linear"}, "projector 'linear'.*Linear -> activation"),
        ({"fusion": "none", "projector": "mlp3x_gelu"}, "projector 'mlp3x_gelu'"),
        (
            {"fusion": "none", "injection": DeepStackSpec(layers=(1, 2))},
            r"injection= \(DeepStack, vision layers \[1, 2\]\)",
        ),
    ],
)
def test_connectors_without_a_stock_equivalent_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        stock_projection(config(**changes), prefix_tokens=1)


def test_user_fusion_is_refused(monkeypatch):
    from mmconnect import fusion as fusion_module
    from mmconnect.fusion import ChannelConcat, FusionSpec, register_fusion

    monkeypatch.setattr(fusion_module, "_FUSIONS", fusion_module._FUSIONS.copy())
    register_fusion("mine", lambda spec: ChannelConcat(spec.final_layer))
    with pytest.raises(ValueError, match="fusion 'mine' is not one of the fusions stock LLaVA"):
        stock_projection(config(FusionSpec(kind="mine")), prefix_tokens=1)


def test_zoo_projector_is_refused():
    from mmconnect.zoo.pixel_shuffle import PixelShuffleSpec

    with pytest.raises(ValueError, match=r"zoo projectors.*no stock equivalent"):
        stock_projection(config("none", projector=PixelShuffleSpec(factor=2)), prefix_tokens=0)


def test_tower_with_register_tokens_is_refused():
    with pytest.raises(ValueError, match=r"5 prefix tokens.*drops exactly one"):
        stock_projection(config("none"), prefix_tokens=5)


def test_projector_state_refuses_a_projector_without_biases():
    dense = DenseConnector(config("none"))
    dense.projector = nn.Sequential(nn.Linear(C, D, bias=False), nn.GELU(), nn.Linear(D, D))
    with pytest.raises(ValueError, match="two Linears with biases"):
        stock_projector_state(dense, stock_projection(dense.config, prefix_tokens=1))
