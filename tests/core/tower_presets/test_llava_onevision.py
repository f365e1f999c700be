"""Presets for SigLIP-SO400M as LLaVA-OneVision uses it (mmconnect.tower_presets.llava_onevision):
the 26-block geometry, the layers read, exact token counts per crop, per video frame and per
image (worked out by hand below), and the module's doctest."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import mmconnect.tower_presets.llava_onevision as onevision_presets
from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    MLPSpec,
    SCISpec,
    SingleLayerSpec,
    preset_geometry,
)
from mmconnect.zoo.pooled import OnevisionPoolSpec

NATIVE = "onevision-mlp-siglip-so400m-26"
SCI = "dc-sci-onevision-siglip-so400m-26"
DCI = "dc-dci-onevision-siglip-so400m-26"
POOLED = "dc-dci+onevision-pool-siglip-so400m-26"
# preset -> (token grid per crop, tokens per crop, tokens per video frame after the 2x pooling)
PRESETS = {
    NATIVE: ((27, 27), 729, 14 * 14),
    SCI: ((27, 27), 729, 14 * 14),
    DCI: ((27, 27), 729, 14 * 14),
    POOLED: ((14, 14), 196, 7 * 7),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_geometry_and_tokens_per_crop_and_frame(name: str) -> None:
    token_grid, per_crop, per_frame = PRESETS[name]
    config = ConnectorConfig.from_preset(name)
    geometry = preset_geometry(name)
    assert geometry.grid == (27, 27)
    assert (geometry.num_layers, geometry.width, geometry.num_prefix_tokens) == (26, 1152, 0)
    assert (geometry.patch_size, geometry.image_size) == (14, 384)
    assert (config.vision_dim, config.num_layers, config.llm_dim) == (1152, 26, 3584)
    assert config.num_tokens((27, 27)) == per_crop
    assert config.token_grid((27, 27)) == token_grid
    assert config.extra_tokens((27, 27)) == 0  # the family needs every token on a grid
    rows, columns = token_grid
    assert math.ceil(rows / 2) * math.ceil(columns / 2) == per_frame


def test_layers_read() -> None:
    """The native connector reads H[26] (HF hidden_states[-1] of 26 blocks); SCI and DCI keep it
    as F with the official Dense Connector's SigLIP layers."""
    assert ConnectorConfig.from_preset(NATIVE).fusion == SingleLayerSpec(final_layer=26)
    assert ConnectorConfig.from_preset(NATIVE).projector == MLPSpec(depth=2)
    assert ConnectorConfig.from_preset(SCI).fusion == SCISpec(final_layer=26, extra_layers=(7, 15))
    dci = DCISpec(final_layer=26, groups=(tuple(range(0, 13)), tuple(range(13, 26))))
    assert ConnectorConfig.from_preset(DCI).fusion == dci
    assert ConnectorConfig.from_preset(POOLED).fusion == dci
    assert ConnectorConfig.from_preset(POOLED).projector == OnevisionPoolSpec()
    # layers 0-25 are each in exactly one DCI group; layer 26 (the last block) is F
    groups = onevision_presets.DCI_GROUPS
    assert sorted(layer for group in groups for layer in group) == list(range(26))


def test_projector_widths() -> None:
    """SCI / DCI concatenate three 1152-wide maps: the first Linear takes 3456 inputs."""
    with torch.device("meta"):
        native = DenseConnector(ConnectorConfig.from_preset(NATIVE))
        dci = DenseConnector(ConnectorConfig.from_preset(DCI))
        pooled = DenseConnector(ConnectorConfig.from_preset(POOLED))
    assert tuple(native.projector[0].weight.shape) == (3584, 1152)
    assert tuple(dci.projector[0].weight.shape) == (3584, 3 * 1152)
    assert tuple(pooled.projector.linear_1.weight.shape) == (3584, 3 * 1152)


def test_a_27_block_tower_is_not_onevisions() -> None:
    """The zoo's and the paper's SigLIP presets count 27 blocks; these count 26."""
    for name in ("dc-dci-siglip-so400m", "baseline+onevision-pool-siglip-so400m"):
        assert ConnectorConfig.from_preset(name).num_layers == 27
    assert {ConnectorConfig.from_preset(name).num_layers for name in PRESETS} == {26}


@pytest.mark.parametrize(
    ("name", "tiles", "tokens"),
    [
        # (rows, columns) of 384 px tiles of a square image: the stitched map is rows x columns
        # crop grids, nothing to unpad; anyres_max_9 caps it near 9 crops' tokens.
        (DCI, (1, 1), 729 + 27 * 28),  # 384 x 384: 1485
        (DCI, (2, 2), 729 + 54 * 55),  # 768 x 768: 3699
        (NATIVE, (3, 3), 729 + 81 * 82),  # 1152 x 1152: ratio 1, not capped: 7371
        (NATIVE, (6, 6), 729 + 81 * 82),  # 2304 x 2304: 162 x 162, ratio 2 -> 81 x 81: 7371
        (POOLED, (3, 3), 196 + 42 * 43),  # 14 x 14 per crop, 42 x 42 map: 2002
        (POOLED, (6, 6), 196 + 42 * 43),  # 84 x 84 map, ratio 2 -> 42 x 42: 2002
    ],
)
def test_tokens_per_square_image(name, tiles, tokens) -> None:
    """The documented per-image counts from the presets' crop grids and the count rule written
    out here: base crop + H * (W + 1) of the capped map (the family tests check the same
    numbers against the packing code and the stock processor)."""
    config = ConnectorConfig.from_preset(name)
    rows, columns = config.token_grid((27, 27))
    height, width = tiles[0] * rows, tiles[1] * columns
    ratio = math.sqrt(height * width / (9 * rows * columns))
    if ratio > 1.1:
        height, width = int(height // ratio), int(width // ratio)
    assert config.num_tokens((27, 27)) + height * (width + 1) == tokens


def test_module_doctest() -> None:
    result = doctest.testmod(onevision_presets, verbose=False)
    assert result.attempted >= 1 and result.failed == 0
