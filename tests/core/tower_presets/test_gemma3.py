"""Presets for SigLIP-SO400M at 896 px as Gemma 3 uses it (mmconnect.tower_presets.gemma3):
geometry, layers, exact token counts per crop and the module's doctest. The counts per image
with pan-and-scan need Gemma 3's image processor: tests/integrations/families/test_gemma3.py."""

from __future__ import annotations

import doctest

import pytest
import torch

import mmconnect.tower_presets.gemma3 as gemma3_presets
from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    LayerFeatures,
    SCISpec,
    SingleLayerSpec,
    preset_geometry,
)
from mmconnect.zoo.pooled import Gemma3PoolSpec

# preset -> (fusion, pool grid, tokens per crop); written out by hand.
PRESETS = {
    "baseline+gemma3-pool-siglip-so400m-896": (SingleLayerSpec(final_layer=27), (16, 16), 256),
    "dc-sci+gemma3-pool-siglip-so400m-896": (
        SCISpec(final_layer=27, extra_layers=(9, 18)),
        (16, 16),
        256,
    ),
    "dc-dci+gemma3-pool-siglip-so400m-896": (
        DCISpec(final_layer=27, groups=(tuple(range(1, 14)), tuple(range(14, 27)))),
        (16, 16),
        256,
    ),
    "dc-dci+gemma3-pool-64-siglip-so400m-896": (
        DCISpec(final_layer=27, groups=(tuple(range(1, 14)), tuple(range(14, 27)))),
        (8, 8),
        64,
    ),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_geometry_layers_and_tokens_per_crop(name: str) -> None:
    fusion, pool, per_crop = PRESETS[name]
    config = ConnectorConfig.from_preset(name)
    geometry = preset_geometry(name)
    assert geometry.grid == (64, 64)
    assert geometry.image_size in (896, (896, 896))
    assert (geometry.patch_size, geometry.num_layers, geometry.width) == (14, 27, 1152)
    assert geometry.num_prefix_tokens == 0
    assert (config.vision_dim, config.num_layers, config.llm_dim) == (1152, 27, 2560)
    assert config.fusion == fusion
    assert config.projector == Gemma3PoolSpec(grid=pool)
    assert config.num_tokens((64, 64)) == per_crop
    assert config.token_grid((64, 64)) == pool
    assert config.extra_tokens((64, 64)) == 0


def test_dci_groups_cover_every_block_before_the_last_once() -> None:
    groups = gemma3_presets.DCI_GROUPS
    assert sorted(layer for group in groups for layer in group) == list(range(1, 27))
    assert gemma3_presets.FINAL_LAYER == 27


@pytest.mark.parametrize(
    ("name", "width", "pool"),
    [
        ("baseline+gemma3-pool-siglip-so400m-896", 1152, (16, 16)),
        ("dc-sci+gemma3-pool-siglip-so400m-896", 3 * 1152, (16, 16)),
        ("dc-dci+gemma3-pool-64-siglip-so400m-896", 3 * 1152, (8, 8)),
    ],
)
def test_pool_widths_at_real_size(name: str, width: int, pool: tuple[int, int]) -> None:
    """The RMSNorm and the projection take the fused width (3 x 1152 for SCI / DCI)."""
    with torch.device("meta"):
        connector = DenseConnector(ConnectorConfig.from_preset(name))
    assert tuple(connector.projector.norm.weight.shape) == (width,)
    assert tuple(connector.projector.projection.shape) == (width, 2560)
    assert connector.projector.kernel((64, 64)) == (64 // pool[0], 64 // pool[1])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_grid_the_pool_does_not_divide_is_refused(name: str) -> None:
    """SigLIP at 384 px (27x27) does not divide by 16 or 8: refused before anything runs."""
    with pytest.raises(ValueError, match=r"cannot average-pool the 27x27 token grid"):
        ConnectorConfig.from_preset(name).num_tokens((27, 27))


def test_tiny_tower_of_the_same_depth_runs_every_preset() -> None:
    """Each preset with tiny widths on a 27-block tower's features of a 16x16 grid gives its
    token count's share (the pool divides 16 as it divides 64)."""
    for name, (_, pool, _) in PRESETS.items():
        config = ConnectorConfig.from_preset(name, vision_dim=8, llm_dim=12)
        connector = DenseConnector(config)
        layers = {layer: torch.randn(1, 256, 8) for layer in connector.captured_layers}
        tokens = connector(LayerFeatures(layers), (16, 16))
        assert tokens.shape == (1, pool[0] * pool[1], 12)


def test_module_doctest() -> None:
    assert doctest.testmod(gemma3_presets, raise_on_error=True).attempted == 2  # import, count
