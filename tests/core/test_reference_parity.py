"""Parity of every preset with the official Dense Connector code's semantics (docs/concepts.md,
Fusion ops and Presets).

Tiny encoders of the real depth and token grid (CLIP-L/336: 24 blocks, 336 px / patch 14, CLS;
SigLIP-SO400M/384: 27 blocks, 384 px / patch 14, no CLS) with narrow widths. Expected values are
computed here from HF ``hidden_states`` with plain torch, written out the way docs/concepts.md states
them, independently of mmconnect's fusion code.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures
from mmconnect.integrations.applications.tiny_models import PUBLISHED_GEOMETRY, tiny_vision_tower

WIDTH = 16
LLM_DIM = 24


def _tiny(family: str) -> torch.nn.Module:
    """The narrow tower of ``family`` at its published depth and grid (seed 0, eval mode)."""
    return tiny_vision_tower(
        family, width=WIDTH, intermediate_size=32, **PUBLISHED_GEOMETRY[family]
    )


@functools.cache
def _encoder_and_states(family: str):
    model = _tiny(family)
    size = 336 if family == "clip" else 384
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = model(pixels, output_hidden_states=True).hidden_states
    prefix = 1 if family == "clip" else 0
    plain = [state[:, prefix:] for state in states]  # P(x): CLS dropped for CLIP
    return model, pixels, plain


def _expected_fused(preset: str, h: list[torch.Tensor]) -> torch.Tensor:
    """docs/concepts.md (Fusion ops, Presets, Efficient Dense Connector), written out literally."""
    clip = "clip" in preset
    final = h[23] if clip else h[26]
    if preset.startswith("baseline"):
        return final
    if "-sti-" in preset:

        def pool(x: torch.Tensor) -> torch.Tensor:  # 1-D window 8, stride 8 over the raster order
            windows = x.shape[1] // 8
            return x[:, : windows * 8].reshape(x.shape[0], windows, 8, x.shape[2]).mean(dim=2)

        return torch.cat([final, pool(h[7]), pool(h[15])], dim=1)
    if "-sci-" in preset:
        return torch.cat([final, h[7], h[15]], dim=-1)
    first, second = (range(0, 12), range(12, 24)) if clip else (range(0, 13), range(13, 26))
    g1 = torch.stack([h[k] for k in first]).sum(dim=0) / len(first)
    g2 = torch.stack([h[k] for k in second]).sum(dim=0) / len(second)
    fused = torch.cat([final, g1, g2], dim=-1)
    if preset.endswith("-efficient"):
        grid = fused.reshape(fused.shape[0], 24, 24, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(12, 12), mode="bilinear", align_corners=False)
        fused = grid.permute(0, 2, 3, 1).reshape(fused.shape[0], 144, -1)
    return fused


# (encoder family, preset, output tokens, fused channels): docs/concepts.md, Presets.
CASES = [
    ("clip", "baseline-clip-l-336", 576, WIDTH),
    ("clip", "dc-sti-clip-l-336", 720, WIDTH),
    ("clip", "dc-sci-clip-l-336", 576, 3 * WIDTH),
    ("clip", "dc-dci-clip-l-336", 576, 3 * WIDTH),
    ("clip", "dc-dci-clip-l-336-efficient", 144, 3 * WIDTH),
    ("siglip", "dc-sti-siglip-so400m", 911, WIDTH),
    ("siglip", "dc-sci-siglip-so400m", 729, 3 * WIDTH),
    ("siglip", "dc-dci-siglip-so400m", 729, 3 * WIDTH),
]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming-tap", "full-tap"])
@pytest.mark.parametrize(("family", "preset", "tokens", "channels"), CASES)
def test_preset_matches_reference(family, preset, tokens, channels, streaming):
    model, pixels, h = _encoder_and_states(family)
    torch.manual_seed(2)
    connector = DenseConnector(
        ConnectorConfig.from_preset(preset, vision_dim=WIDTH, llm_dim=LLM_DIM)
    ).eval()
    tap = connector.make_tap(model, streaming=streaming)
    with torch.no_grad():
        features = tap(pixels)
        fused = connector.fuse(features)
        output = connector(features)

    expected = _expected_fused(preset, h)
    assert fused.shape == (2, tokens, channels) == expected.shape
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-6)

    # docs/concepts.md, The projector: Linear -> exact-erf GELU -> Linear, both with bias.
    first, second = connector.projector[0], connector.projector[2]
    projected = F.linear(
        F.gelu(F.linear(expected, first.weight, first.bias)), second.weight, second.bias
    )
    assert output.shape == (2, tokens, LLM_DIM)
    assert connector.num_tokens((24, 24) if family == "clip" else (27, 27)) == tokens
    torch.testing.assert_close(output, projected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("family", "preset"), [case[:2] for case in CASES])
def test_preset_from_hidden_states_tuple(family, preset):
    """Code that already has HF hidden_states (output_hidden_states=True) gets the same result."""
    model, pixels, h = _encoder_and_states(family)
    connector = DenseConnector(
        ConnectorConfig.from_preset(preset, vision_dim=WIDTH, llm_dim=LLM_DIM)
    )
    with torch.no_grad():
        states = model(pixels, output_hidden_states=True).hidden_states
        features = LayerFeatures.from_hidden_states(
            states, num_prefix_tokens=1 if family == "clip" else 0
        )
        fused = connector.fuse(features)
    torch.testing.assert_close(fused, _expected_fused(preset, h), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_final_layer_is_hidden_states_minus_two_and_last_block_never_runs(family):
    """F = hidden_states[-2]; with early exit the last block (H[L], never used) does not run."""
    model, pixels, h = _encoder_and_states(family)
    preset = "dc-dci-clip-l-336" if family == "clip" else "dc-dci-siglip-so400m"
    connector = DenseConnector(
        ConnectorConfig.from_preset(preset, vision_dim=WIDTH, llm_dim=LLM_DIM)
    )
    assert connector.individual_layers[0] == len(h) - 2
    calls = []
    handle = model.encoder.layers[-1].register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            connector.make_tap(model)(pixels)
    finally:
        handle.remove()
    assert calls == []


def test_paper_layer_numbering_maps_to_official_indices():
    from mmconnect import paper_layer

    # The paper's layers 8 and 16 and groups (1-12), (13-24) are H[7], H[15], H[0..11], H[12..23].
    assert [paper_layer(8), paper_layer(16)] == [7, 15]
    config = ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=WIDTH, llm_dim=LLM_DIM)
    assert config.fusion.groups == (
        tuple(paper_layer(i) for i in range(1, 13)),
        tuple(paper_layer(i) for i in range(13, 25)),
    )
    assert ConnectorConfig.from_preset("dc-sci-clip-l-336").fusion.extra_layers == (
        paper_layer(8),
        paper_layer(16),
    )
