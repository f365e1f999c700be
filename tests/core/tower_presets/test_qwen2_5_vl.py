"""Qwen2.5-VL's tower presets (``mmconnect.tower_presets.qwen2_5_vl``): layers, exact token
counts per processed image size, widths at real size, and the grids they refuse."""

from __future__ import annotations

import doctest

import pytest
import torch

import mmconnect.tower_presets.qwen2_5_vl as presets_module
from mmconnect import ConnectorConfig, DenseConnector, list_presets, preset_geometry
from mmconnect.fusion import DCISpec, SCISpec, SingleLayerSpec
from mmconnect.projectors import MLPSpec
from mmconnect.zoo.patch_merger import QWEN2_5_VL_MERGER

NATIVE = "qwen2.5-vl-7b-merger-448"
MERGED = (NATIVE, "dc-dci+qwen2.5-merger-qwen2.5-vl-448", "dc-sci+qwen2.5-merger-qwen2.5-vl-448")
UNMERGED = "dc-dci-qwen2.5-vl-448"

#: processed image (height, width) in pixels -> (patch grid, merged tokens, one per patch).
SIZES = {
    (224, 224): ((16, 16), 64, 256),
    (448, 448): ((32, 32), 256, 1024),
    (644, 868): ((46, 62), 713, 2852),
    (812, 1204): ((58, 86), 1247, 4988),
    (1120, 1120): ((80, 80), 1600, 6400),
}


def test_every_preset_is_registered_for_the_qwen2_5_vl_tower() -> None:
    for name in (*MERGED, UNMERGED):
        assert name in list_presets()
        geometry = preset_geometry(name)
        assert (geometry.num_layers, geometry.width, geometry.patch_size) == (32, 1280, 14)
        assert (geometry.grid, geometry.num_prefix_tokens) == ((32, 32), 0)
        config = ConnectorConfig.from_preset(name)
        assert (config.vision_dim, config.llm_dim, config.num_layers) == (1280, 3584, 32)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_token_counts_per_image_size(size) -> None:
    grid, merged, unmerged = SIZES[size]
    assert grid == (size[0] // 14, size[1] // 14)
    for name in MERGED:
        config = ConnectorConfig.from_preset(name)
        assert config.num_tokens(grid) == merged, name
        with torch.device("meta"):
            connector = DenseConnector(config)
        assert connector.token_grid(grid) == (grid[0] // 2, grid[1] // 2)
        assert connector.extra_tokens(grid) == 0
    config = ConnectorConfig.from_preset(UNMERGED)
    assert config.num_tokens(grid) == unmerged
    with torch.device("meta"):
        assert DenseConnector(config).token_grid(grid) == grid


def test_layers_of_each_preset() -> None:
    native = ConnectorConfig.from_preset(NATIVE)
    assert native.fusion == SingleLayerSpec(final_layer=32)
    assert native.projector == QWEN2_5_VL_MERGER
    dci = ConnectorConfig.from_preset("dc-dci+qwen2.5-merger-qwen2.5-vl-448").fusion
    assert isinstance(dci, DCISpec)
    assert dci.final_layer == 32
    assert dci.groups == (tuple(range(16)), tuple(range(16, 32)))
    sci = ConnectorConfig.from_preset("dc-sci+qwen2.5-merger-qwen2.5-vl-448").fusion
    assert isinstance(sci, SCISpec)
    assert (sci.final_layer, sci.extra_layers) == (32, (11, 21))
    unmerged = ConnectorConfig.from_preset(UNMERGED)
    assert unmerged.fusion == dci and unmerged.projector == MLPSpec()


def test_widths_at_real_size() -> None:
    """The native merger is Qwen2.5-VL-7B's (1280 -> 5120 -> 3584); behind DCI / SCI it takes
    3 x 1280 channels per token."""
    expected = {
        NATIVE: {
            "norm.weight": (1280,),
            "fc1.weight": (5120, 5120),
            "fc1.bias": (5120,),
            "fc2.weight": (3584, 5120),
            "fc2.bias": (3584,),
        },
        "dc-dci+qwen2.5-merger-qwen2.5-vl-448": {
            "norm.weight": (3840,),
            "fc1.weight": (15360, 15360),
            "fc1.bias": (15360,),
            "fc2.weight": (3584, 15360),
            "fc2.bias": (3584,),
        },
        UNMERGED: {
            "0.weight": (3584, 3840),
            "0.bias": (3584,),
            "2.weight": (3584, 3584),
            "2.bias": (3584,),
        },
    }
    for name, shapes in expected.items():
        with torch.device("meta"):
            projector = DenseConnector(ConnectorConfig.from_preset(name)).projector
        assert {key: tuple(value.shape) for key, value in projector.state_dict().items()} == shapes


@pytest.mark.parametrize("grid", [(15, 16), (32, 33)])
def test_merged_presets_refuse_odd_grids(grid) -> None:
    """No Qwen2.5-VL processor makes an odd patch grid; the 2x2 merger refuses one by name."""
    for name in MERGED:
        with pytest.raises(ValueError, match=r"multiples of 2, got a \d+x\d+ grid"):
            ConnectorConfig.from_preset(name).num_tokens(grid)


def test_module_examples() -> None:
    failures, attempted = doctest.testmod(presets_module)
    assert attempted and not failures
