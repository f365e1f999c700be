"""Presets for InternViT-300M-448px and InternViT-6B-448px as InternVL uses them
(mmconnect.tower_presets.internvl):
geometry, layers, exact token counts per tile and per tiled image, widths at real size, and the
module's doctest."""

from __future__ import annotations

import doctest

import pytest
import torch

import mmconnect.tower_presets.internvl as internvl_presets
from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    MLPSpec,
    ResampleSpec,
    SCISpec,
    SingleLayerSpec,
    preset_geometry,
)
from mmconnect.zoo.pixel_shuffle import PixelShuffleMLPSpec

SHUFFLE = PixelShuffleMLPSpec(factor=2)
DCI = DCISpec(final_layer=24, groups=(tuple(range(0, 12)), tuple(range(12, 24))))
# preset -> (fusion, projector, resample, LLM width, tokens per 448 px tile); written by hand.
PRESETS = {
    "internvl-pixel-shuffle-internvit-300m": (
        SingleLayerSpec(final_layer=24),
        SHUFFLE,
        None,
        3584,
        256,
    ),
    "dc-dci+pixel-shuffle-mlp-internvit-300m": (DCI, SHUFFLE, None, 4096, 256),
    "dc-sci+pixel-shuffle-mlp-internvit-300m": (
        SCISpec(final_layer=24, extra_layers=(8, 16)),
        SHUFFLE,
        None,
        3584,
        256,
    ),
    "dc-dci-internvit-300m": (DCI, MLPSpec(depth=2), None, 3584, 1024),
    "dc-dci-internvit-300m-efficient": (
        DCI,
        MLPSpec(depth=2),
        ResampleSpec(grid=(16, 16)),
        3584,
        256,
    ),
}
#: (height, width) -> tiles of InternVL's default tiling (1 to 12, thumbnail when tiled), as
#: the module docstring's table states them (checked against HF's processor in
#: tests/integrations/families/test_internvl.py).
TILES = {(448, 448): 1, (448, 896): 3, (1080, 1920): 9, (1024, 1024): 10, (768, 1024): 13}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_geometry_layers_and_tokens_per_tile(name: str) -> None:
    fusion, projector, resample, llm_dim, per_tile = PRESETS[name]
    config = ConnectorConfig.from_preset(name)
    geometry = preset_geometry(name)
    assert geometry.grid == (32, 32)
    assert (geometry.num_layers, geometry.width, geometry.num_prefix_tokens) == (24, 1024, 1)
    assert (geometry.image_size, geometry.patch_size) == (448, 14)
    assert (config.vision_dim, config.num_layers, config.llm_dim) == (1024, 24, llm_dim)
    assert (config.fusion, config.projector, config.resample) == (fusion, projector, resample)
    assert config.num_tokens((32, 32)) == per_tile
    assert config.extra_tokens((32, 32)) == 0
    side = 16 if per_tile == 256 else 32
    assert config.token_grid((32, 32)) == (side, side)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tokens_per_tiled_image(name: str) -> None:
    """An image fills tiles x the per-tile count: the docstring's per-image table."""
    per_tile = PRESETS[name][-1]
    expected = {
        256: {(448, 448): 256, (448, 896): 768, (1080, 1920): 2304, (1024, 1024): 2560},
        1024: {(448, 448): 1024, (448, 896): 3072, (1080, 1920): 9216, (1024, 1024): 10240},
    }[per_tile]
    config = ConnectorConfig.from_preset(name)
    for size, tokens in expected.items():
        assert TILES[size] * config.num_tokens((32, 32)) == tokens
    assert TILES[(768, 1024)] * config.num_tokens((32, 32)) == 13 * per_tile


def test_dense_fusions_read_the_native_final_layer() -> None:
    assert internvl_presets.FINAL_LAYER == 24
    assert internvl_presets.SCI_LAYERS == (8, 16)
    # every layer before the last is in exactly one DCI group; layer 24 is F
    groups = internvl_presets.DCI_GROUPS
    assert sorted(layer for group in groups for layer in group) == list(range(24))
    assert internvl_presets.INTERNVIT_300M_448 is preset_geometry(
        "internvl-pixel-shuffle-internvit-300m"
    )


# InternViT-6B (45 blocks, width 3200; InternVL3-38B: Qwen2.5-32B, 5120): preset -> (fusion,
# projector, resample, tokens per 448 px tile); written by hand.
DCI_6B = DCISpec(final_layer=45, groups=(tuple(range(0, 23)), tuple(range(23, 45))))
PRESETS_6B = {
    "internvl-pixel-shuffle-internvit-6b": (SingleLayerSpec(final_layer=45), SHUFFLE, None, 256),
    "dc-sci+pixel-shuffle-mlp-internvit-6b": (
        SCISpec(final_layer=45, extra_layers=(15, 30)),
        SHUFFLE,
        None,
        256,
    ),
    "dc-dci+pixel-shuffle-mlp-internvit-6b": (DCI_6B, SHUFFLE, None, 256),
    "dc-dci-internvit-6b": (DCI_6B, MLPSpec(depth=2), None, 1024),
    "dc-dci-internvit-6b-efficient": (DCI_6B, MLPSpec(depth=2), ResampleSpec(grid=(16, 16)), 256),
}


@pytest.mark.parametrize("name", sorted(PRESETS_6B))
def test_internvit_6b_geometry_layers_and_tokens_per_tile(name: str) -> None:
    fusion, projector, resample, per_tile = PRESETS_6B[name]
    config = ConnectorConfig.from_preset(name)
    geometry = preset_geometry(name)
    assert geometry is internvl_presets.INTERNVIT_6B_448
    assert (geometry.image_size, geometry.patch_size, geometry.grid) == (448, 14, (32, 32))
    assert (geometry.num_layers, geometry.width, geometry.num_prefix_tokens) == (45, 3200, 1)
    assert (config.vision_dim, config.num_layers, config.llm_dim) == (3200, 45, 5120)
    assert (config.fusion, config.projector, config.resample) == (fusion, projector, resample)
    assert config.num_tokens((32, 32)) == per_tile
    assert TILES[(1080, 1920)] * config.num_tokens((32, 32)) == 9 * per_tile


def test_dense_fusions_follow_one_rule_for_both_towers() -> None:
    """24 blocks give the 300M constants; 45 split their 45 layers before the last 23 + 22."""
    fusions = internvl_presets.dense_fusions(24)
    assert fusions["sci"] == SCISpec(final_layer=24, extra_layers=internvl_presets.SCI_LAYERS)
    assert fusions["dci"] == DCISpec(final_layer=24, groups=internvl_presets.DCI_GROUPS)
    assert internvl_presets.dense_fusions(45)["dci"] == DCI_6B


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        # InternVL3-38B's projector: LayerNorm(12800), Linear(12800 -> 5120), Linear(5120 -> 5120)
        (
            "internvl-pixel-shuffle-internvit-6b",
            {"norm.weight": (12800,), "fc1.weight": (5120, 12800), "fc2.weight": (5120, 5120)},
        ),
        # InternVL3-8B's projector: LayerNorm(4096), Linear(4096 -> 3584), Linear(3584 -> 3584)
        (
            "internvl-pixel-shuffle-internvit-300m",
            {"norm.weight": (4096,), "fc1.weight": (3584, 4096), "fc2.weight": (3584, 3584)},
        ),
        # 3 x 1024 channels shuffled by 2: 12288 into the MLP
        (
            "dc-sci+pixel-shuffle-mlp-internvit-300m",
            {"norm.weight": (12288,), "fc1.weight": (3584, 12288), "fc2.weight": (3584, 3584)},
        ),
        # mlp2x_gelu on 3072 channels
        ("dc-dci-internvit-300m", {"0.weight": (3584, 3072), "2.weight": (3584, 3584)}),
    ],
)
def test_projector_widths_at_real_size(name: str, shapes: dict) -> None:
    with torch.device("meta"):
        connector = DenseConnector(ConnectorConfig.from_preset(name))
    state = connector.projector.state_dict()
    assert {key: tuple(state[key].shape) for key in shapes} == shapes


def test_a_preset_refuses_a_tile_the_shuffle_cannot_divide() -> None:
    config = ConnectorConfig.from_preset("dc-sci+pixel-shuffle-mlp-internvit-300m")
    with pytest.raises(ValueError, match=r"divisible by 2, got grid 31x31"):
        config.num_tokens((31, 31))


def test_module_doctest() -> None:
    result = doctest.testmod(internvl_presets)
    assert result.attempted == 3
    assert result.failed == 0
