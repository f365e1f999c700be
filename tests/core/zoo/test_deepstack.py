"""The DeepStack presets of mmconnect.zoo.deepstack: fields, geometry, exact token counts."""

from __future__ import annotations

import pytest
import torch

from mmconnect import ConnectorConfig, DeepStackSpec, DenseConnector, MLPSpec
from mmconnect.presets import CLIP_L_336, preset_geometry
from mmconnect.zoo.deepstack import QWEN3_VL_8B_DEEPSTACK, QWEN3_VL_VIT_768
from mmconnect.zoo.patch_merger import QWEN3_VL_DEEPSTACK_MERGER, QWEN3_VL_MERGER

#: name -> (geometry, grid, tokens per image, injected layers, injection projector)
PRESETS = {
    "qwen3-vl-8b+deepstack-768": (
        QWEN3_VL_VIT_768,
        (48, 48),
        576,
        (9, 17, 25),
        QWEN3_VL_DEEPSTACK_MERGER,
    ),
    "dc-dci+deepstack-clip-l-336": (CLIP_L_336, (24, 24), 576, (9, 17), MLPSpec()),
    "dc-dci+qwen3-merger+deepstack-clip-l-336": (
        CLIP_L_336,
        (24, 24),
        144,
        (9, 17),
        QWEN3_VL_DEEPSTACK_MERGER,
    ),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_token_counts_and_levels(name):
    geometry, grid, tokens, layers, projector = PRESETS[name]
    assert preset_geometry(name) == geometry
    assert geometry.grid == grid
    config = ConnectorConfig.from_preset(name)
    assert config.num_tokens(grid) == tokens
    assert config.injection == DeepStackSpec(layers=layers, projector=projector)
    small = DenseConnector(ConnectorConfig.from_preset(name, vision_dim=4, llm_dim=6))
    generator = torch.Generator().manual_seed(0)
    features = {
        layer: torch.randn(1, grid[0] * grid[1], 4, generator=generator)
        for layer in range(config.num_layers + 1)
    }
    out, residuals = small.forward_with_injections(features, grid)
    assert out.shape == (1, tokens, 6)
    assert [tuple(residual.shape) for residual in residuals] == [(1, tokens, 6)] * len(layers)


def test_qwen3_vl_8b_preset_is_its_connector():
    config = ConnectorConfig.from_preset("qwen3-vl-8b+deepstack-768")
    # blocks 8, 16, 24 (deepstack_visual_indexes) are hidden_states 9, 17, 25; the final merger
    # reads the last block's output, hidden_states[27]
    assert QWEN3_VL_8B_DEEPSTACK.layers == (9, 17, 25)
    assert config.fusion.final_layer == 27 and config.fusion.kind == "none"
    assert config.projector == QWEN3_VL_MERGER
    assert (config.vision_dim, config.llm_dim, config.num_layers) == (1152, 4096, 27)
    assert QWEN3_VL_VIT_768.num_prefix_tokens == 0 and QWEN3_VL_VIT_768.patch_size == 16
    with torch.device("meta"):
        connector = DenseConnector(config)
    # one merger: LayerNorm + fc1 4608x4608 + fc2 4096x4608 (+ biases); DeepStack's norm is
    # 4608 wide instead of 1152
    merger = 2 * 1152 + 4608 * 4608 + 4608 + 4096 * 4608 + 4096
    deep = merger - 2 * 1152 + 2 * 4608
    assert sum(p.numel() for p in connector.projector.parameters()) == merger == 40_119_040
    assert sum(p.numel() for p in connector.injection.parameters()) == 3 * deep == 120_377_856


def test_odd_grid_is_refused_before_anything_runs():
    config = ConnectorConfig.from_preset("dc-dci+qwen3-merger+deepstack-clip-l-336")
    with pytest.raises(ValueError, match="multiples of 2"):
        config.num_tokens((27, 27))
