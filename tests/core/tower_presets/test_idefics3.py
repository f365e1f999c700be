"""Presets for SigLIP-SO400M as Idefics3 / SmolVLM use it (mmconnect.tower_presets.idefics3):
geometry, layers, exact token counts per tile and per image, and the module's doctest."""

from __future__ import annotations

import doctest

import pytest
import torch

import mmconnect.tower_presets.idefics3 as idefics3_presets
from mmconnect import ConnectorConfig, DCISpec, DenseConnector, SCISpec, preset_geometry
from mmconnect.zoo.pixel_shuffle import PixelShuffleSpec

# preset -> (grid per tile, shuffle factor, LLM width, tokens per tile); written out by hand.
PRESETS = {
    "idefics3-pixel-shuffle-siglip-so400m-364": ((26, 26), 2, 4096, 169),
    "dc-sci+pixel-shuffle-idefics3-364": ((26, 26), 2, 4096, 169),
    "dc-dci+pixel-shuffle-idefics3-364": ((26, 26), 2, 4096, 169),
    "smolvlm-pixel-shuffle-siglip-so400m": ((27, 27), 3, 2048, 81),
    "dc-sci+pixel-shuffle-smolvlm": ((27, 27), 3, 2048, 81),
    "dc-dci+pixel-shuffle-smolvlm": ((27, 27), 3, 2048, 81),
    "smolvlm-256m-pixel-shuffle-siglip-b16-512": ((32, 32), 4, 576, 64),
    "dc-sci+pixel-shuffle-smolvlm-256m": ((32, 32), 4, 576, 64),
    "dc-dci+pixel-shuffle-smolvlm-256m": ((32, 32), 4, 576, 64),
    "smolvlm-500m-pixel-shuffle-siglip-b16-512": ((32, 32), 4, 960, 64),
    "dc-sci+pixel-shuffle-smolvlm-500m": ((32, 32), 4, 960, 64),
    "dc-dci+pixel-shuffle-smolvlm-500m": ((32, 32), 4, 960, 64),
}
# tower -> (blocks, width, patch, image size): SigLIP-SO400M (364 or 384 px), SigLIP-B/16 (512 px)
TOWERS = {26: (27, 1152, 14, 364), 27: (27, 1152, 14, 384), 32: (12, 768, 16, 512)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_geometry_and_tokens_per_tile(name: str) -> None:
    grid, factor, llm_dim, per_tile = PRESETS[name]
    blocks, width, patch, size = TOWERS[grid[0]]
    config = ConnectorConfig.from_preset(name)
    geometry = preset_geometry(name)
    assert geometry.grid == grid
    assert (geometry.num_layers, geometry.width, geometry.num_prefix_tokens) == (blocks, width, 0)
    assert geometry.patch_size == patch
    assert geometry.image_size in (size, (size, size))
    assert (config.vision_dim, config.num_layers, config.llm_dim) == (width, blocks, llm_dim)
    assert config.projector == PixelShuffleSpec(factor=factor)
    assert config.num_tokens(grid) == per_tile
    assert config.token_grid(grid) == (grid[0] // factor, grid[1] // factor)
    assert config.extra_tokens(grid) == 0


def test_dense_fusions_keep_the_native_final_layer() -> None:
    for suffix in ("idefics3-364", "smolvlm"):
        sci = ConnectorConfig.from_preset(f"dc-sci+pixel-shuffle-{suffix}").fusion
        dci = ConnectorConfig.from_preset(f"dc-dci+pixel-shuffle-{suffix}").fusion
        assert sci == SCISpec(final_layer=27, extra_layers=(9, 18))
        assert dci == DCISpec(final_layer=27, groups=(tuple(range(1, 14)), tuple(range(14, 27))))
    # every block before the last is in exactly one DCI group; block 27 is F
    groups = idefics3_presets.DCI_GROUPS
    assert sorted(layer for group in groups for layer in group) == list(range(1, 27))
    # SigLIP-B/16's 12 blocks: F = H[12]; SCI adds blocks 4 and 8; DCI's 11 blocks before the
    # last split 6 + 5
    for suffix in ("smolvlm-256m", "smolvlm-500m"):
        sci = ConnectorConfig.from_preset(f"dc-sci+pixel-shuffle-{suffix}").fusion
        dci = ConnectorConfig.from_preset(f"dc-dci+pixel-shuffle-{suffix}").fusion
        assert sci == SCISpec(final_layer=12, extra_layers=(4, 8))
        assert dci == DCISpec(final_layer=12, groups=((1, 2, 3, 4, 5, 6), (7, 8, 9, 10, 11)))


def test_shuffle_width_of_the_dense_fusions() -> None:
    """3 x 1152 channels, shuffled by f: the Linear takes f**2 * 3456 inputs."""
    for name, factor in (
        ("dc-dci+pixel-shuffle-idefics3-364", 2),
        ("dc-sci+pixel-shuffle-smolvlm", 3),
    ):
        with torch.device("meta"):
            connector = DenseConnector(ConnectorConfig.from_preset(name))
        weight = connector.projector.proj.weight
        llm_dim = ConnectorConfig.from_preset(name).llm_dim
        assert tuple(weight.shape) == (llm_dim, factor**2 * 3 * 1152)


@pytest.mark.parametrize(
    ("name", "tiles", "tokens"),
    [
        # (rows * cols + 1) tiles when split; 1 when not (written out by hand)
        ("dc-dci+pixel-shuffle-idefics3-364", 4 * 4 + 1, 2873),
        ("dc-dci+pixel-shuffle-idefics3-364", 2 * 4 + 1, 1521),
        ("dc-dci+pixel-shuffle-idefics3-364", 1, 169),
        ("dc-sci+pixel-shuffle-smolvlm", 4 * 4 + 1, 1377),
        ("dc-sci+pixel-shuffle-smolvlm", 1, 81),
        # SmolVLM-256M / 500M: longest edge 4 x 512 = 2048 px, 512 px tiles of 64 tokens
        ("dc-dci+pixel-shuffle-smolvlm-256m", 4 * 4 + 1, 1088),
        ("dc-dci+pixel-shuffle-smolvlm-500m", 1, 64),
    ],
)
def test_tokens_per_image_with_splitting(name: str, tiles: int, tokens: int) -> None:
    grid = preset_geometry(name).grid
    assert tiles * ConnectorConfig.from_preset(name).num_tokens(grid) == tokens


def test_idefics3_shuffle_refuses_the_384_grid() -> None:
    """Idefics3's factor 2 does not divide SmolVLM's 27x27 grid: refused when counting."""
    config = ConnectorConfig.from_preset("dc-dci+pixel-shuffle-idefics3-364")
    with pytest.raises(ValueError, match=r"divisible by 2, got grid 27x27"):
        config.num_tokens((27, 27))


def test_module_doctest() -> None:
    failures, tried = doctest.testmod(idefics3_presets, raise_on_error=False)
    assert tried >= 1 and failures == 0
