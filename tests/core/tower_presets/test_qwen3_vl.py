"""Qwen3-VL's tower presets (``mmconnect.tower_presets.qwen3_vl``): layers, exact token counts
per image size, widths at real size, and the grids they refuse."""

from __future__ import annotations

import pytest
import torch

from mmconnect import ConnectorConfig, DenseConnector, list_presets, preset_geometry
from mmconnect.fusion import DCISpec, SCISpec, SingleLayerSpec
from mmconnect.zoo.patch_merger import QWEN3_VL_DEEPSTACK_MERGER, QWEN3_VL_MERGER

MERGED = (
    "qwen3-vl-8b+deepstack-768",
    "dc-dci+qwen3-merger-qwen3-vl-768",
    "dc-dci+qwen3-merger+deepstack-qwen3-vl-768",
    "dc-sci+qwen3-merger-qwen3-vl-768",
)
UNMERGED = "dc-dci-qwen3-vl-768"

#: image (height, width) in pixels -> (patch grid, merged tokens, one token per patch).
SIZES = {
    (448, 448): ((28, 28), 196, 784),
    (512, 512): ((32, 32), 256, 1024),
    (768, 768): ((48, 48), 576, 2304),
    (1024, 768): ((64, 48), 768, 3072),
    (640, 1280): ((40, 80), 800, 3200),
}


def test_every_preset_is_registered_for_the_qwen3_vl_tower() -> None:
    for name in (*MERGED, UNMERGED):
        assert name in list_presets()
        geometry = preset_geometry(name)
        assert (geometry.num_layers, geometry.width, geometry.patch_size) == (27, 1152, 16)
        assert (geometry.grid, geometry.num_prefix_tokens) == ((48, 48), 0)
        config = ConnectorConfig.from_preset(name)
        assert (config.vision_dim, config.llm_dim, config.num_layers) == (1152, 4096, 27)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_token_counts_per_image_size(size) -> None:
    grid, merged, unmerged = SIZES[size]
    assert grid == (size[0] // 16, size[1] // 16)
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
    dci = ConnectorConfig.from_preset("dc-dci+qwen3-merger-qwen3-vl-768").fusion
    assert isinstance(dci, DCISpec)
    assert dci.final_layer == 27
    assert dci.groups == (tuple(range(0, 14)), tuple(range(14, 27)))
    assert ConnectorConfig.from_preset(UNMERGED).fusion == dci
    sci = ConnectorConfig.from_preset("dc-sci+qwen3-merger-qwen3-vl-768").fusion
    assert isinstance(sci, SCISpec)
    assert (sci.final_layer, sci.extra_layers) == (27, (9, 18))
    native = ConnectorConfig.from_preset("qwen3-vl-8b+deepstack-768")
    assert native.fusion == SingleLayerSpec(final_layer=27)
    deep = ConnectorConfig.from_preset("dc-dci+qwen3-merger+deepstack-qwen3-vl-768")
    for config in (native, deep):
        assert config.projector == QWEN3_VL_MERGER
        assert config.injection.layers == (9, 17, 25)
        assert config.injection.projector == QWEN3_VL_DEEPSTACK_MERGER
    for name in ("dc-dci+qwen3-merger-qwen3-vl-768", "dc-sci+qwen3-merger-qwen3-vl-768"):
        assert ConnectorConfig.from_preset(name).injection is None


def test_merger_widths_at_real_size() -> None:
    """Behind DCI (3 x 1152 channels) the merger's norm and first Linear are three times wider
    than Qwen3-VL-8B's own (1152 per token, 4608 merged)."""
    with torch.device("meta"):
        native = DenseConnector(ConnectorConfig.from_preset("qwen3-vl-8b+deepstack-768"))
        dci = DenseConnector(ConnectorConfig.from_preset("dc-dci+qwen3-merger-qwen3-vl-768"))
    assert tuple(native.projector.norm.weight.shape) == (1152,)
    assert tuple(native.projector.fc1.weight.shape) == (4608, 4608)
    assert tuple(native.projector.fc2.weight.shape) == (4096, 4608)
    assert tuple(dci.projector.norm.weight.shape) == (3456,)
    assert tuple(dci.projector.fc1.weight.shape) == (13824, 13824)
    assert tuple(dci.projector.fc2.weight.shape) == (4096, 13824)


@pytest.mark.parametrize("name", [*MERGED])
def test_a_grid_the_merge_cannot_take_is_refused(name) -> None:
    config = ConnectorConfig.from_preset(name)
    with pytest.raises(ValueError, match=r"multiples of 2, got a 47x48 grid"):
        config.num_tokens((47, 48))
