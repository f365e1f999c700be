"""LLaVA-NeXT AnyRes bookkeeping (:mod:`mmconnect.integrations.families.anyres`): tile grids, token counts
against the published ones (docs/llava-next.md, Token bookkeeping) and HF's own processor, packing layout, pinpoint validation.

Connectors are the CLIP-L/336 presets at their real widths and 24 x 24 grid, built on the meta
device (token bookkeeping only, no weights allocated). No LLM is built here.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import (
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from mmconnect import ConnectorConfig, DenseConnector, ResampleSpec
from mmconnect.integrations.applications.tiny_models import tiny_llava_tokenizer
from mmconnect.integrations.families.anyres import (
    anyres_token_count,
    check_image_size,
    check_image_sizes,
    check_pinpoints,
    crop_layout,
    pack_anyres,
    tile_grid,
)

#: LLaVA-1.6 pinpoints for CLIP-336, ``(height, width)``.
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TILE, PATCH = 336, 14
GRID = (24, 24)
#: (height, width) -> tokens for SCI / DCI (docs/llava-next.md, Token bookkeeping) and tiles (rows, columns).
PUBLISHED_COUNTS = {(672, 672): 2928, (1080, 1920): 1948, (336, 336): 1176}
TILES = {(672, 672): (2, 2), (1080, 1920): (2, 2), (336, 336): (1, 2), (1008, 336): (3, 1)}
#: Aspect ratios from square to extreme (one pixel high / wide), ``(height, width)``.
SIZES = [
    (336, 336), (672, 672), (1080, 1920), (1920, 1080), (480, 640), (640, 480), (100, 100),
    (60, 150), (150, 60), (1008, 336), (336, 1008), (337, 1009), (3000, 200), (200, 3000),
    (50, 2000), (2000, 50), (1, 5000), (5000, 1), (1, 1), (7, 13), (4096, 4095), (333, 999),
]  # fmt: skip


def _meta_connector(preset: str) -> DenseConnector:
    with torch.device("meta"):
        return DenseConnector(ConnectorConfig.from_preset(preset))


@pytest.fixture(scope="module")
def connectors() -> dict[str, DenseConnector]:
    names = ("dc-sci-clip-l-336", "dc-dci-clip-l-336", "dc-sti-clip-l-336")
    names += ("dc-dci-clip-l-336-efficient", "baseline-clip-l-336")
    return {name: _meta_connector(name) for name in names}


def _count(connector: DenseConnector, size: tuple[int, int]) -> int:
    return anyres_token_count(connector, size, PINPOINTS, TILE, GRID)


@pytest.fixture(scope="module")
def hf_processor() -> LlavaNextProcessor:
    """Stock HF LLaVA-NeXT processor for CLIP-L/336 (``default`` strategy, CLS counted then removed)."""
    tokenizer = tiny_llava_tokenizer()  # the processor only needs its <image> token
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=PINPOINTS,
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _hf_count(processor: LlavaNextProcessor, size: tuple[int, int]) -> int:
    """What HF's processor writes into the prompt for one image (its ``replace_image_token``)."""
    count = processor._get_number_of_features(size[0], size[1], TILE, TILE)
    return count - 1  # vision_feature_select_strategy="default" drops the CLS it counted


# ---------------------------------------------------------------------------- tile grid


@pytest.mark.parametrize(("size", "tiles"), sorted(TILES.items()))
def test_tile_grid_is_rows_then_columns(size, tiles):
    assert tile_grid(size, PINPOINTS, TILE) == tiles


def test_tile_grid_wide_and_tall_images():
    # (height, width): a wide image gets one row of three tiles, a tall one three rows.
    assert tile_grid((300, 1000), PINPOINTS, TILE) == (1, 3)
    assert tile_grid((1000, 300), PINPOINTS, TILE) == (3, 1)


def test_processor_tiles_are_row_major(hf_processor):
    """HF's image processor emits the tiles row by row; pack_anyres stitches them the same way."""
    rows, columns = 2, 2  # column-major would give the order 0, 2, 1, 3
    height, width = rows * TILE, columns * TILE
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for tile in range(rows * columns):  # tile t is a flat block of grey level 40 * (t + 1)
        r, c = divmod(tile, columns)
        pixels[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = 40 * (tile + 1)
    assert tile_grid((height, width), PINPOINTS, TILE) == (rows, columns)
    crops = hf_processor.image_processor(Image.fromarray(pixels), return_tensors="pt")
    crops = crops["pixel_values"][0]
    assert crops.shape[0] == 1 + rows * columns
    means = crops[1:, 0].mean(dim=(-1, -2))
    assert torch.all(means[1:] > means[:-1]), f"tiles out of row-major order: {means.tolist()}"


# ---------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("preset", ["dc-sci-clip-l-336", "dc-dci-clip-l-336"])
@pytest.mark.parametrize(("size", "expected"), sorted(PUBLISHED_COUNTS.items()))
def test_reference_counts_sci_dci(connectors, preset, size, expected):
    assert _count(connectors[preset], size) == expected


@pytest.mark.parametrize("preset", ["dc-sci-clip-l-336", "dc-dci-clip-l-336"])
@pytest.mark.parametrize("size", SIZES)
def test_counts_equal_hf_processor(connectors, hf_processor, preset, size):
    assert _count(connectors[preset], size) == _hf_count(hf_processor, size)


def test_counts_equal_hf_processor_public_api(connectors, hf_processor):
    """HF's ``_get_num_multimodal_tokens`` (what serving engines call) agrees as well."""
    counts = hf_processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    assert counts == [_count(connectors["dc-sci-clip-l-336"], size) for size in SIZES]


@settings(max_examples=150, deadline=None)
@given(height=st.integers(1, 6000), width=st.integers(1, 6000))
def test_counts_equal_hf_processor_any_size(connectors, hf_processor, height, width):
    expected = _hf_count(hf_processor, (height, width))
    assert _count(connectors["dc-sci-clip-l-336"], (height, width)) == expected
    assert _count(connectors["baseline-clip-l-336"], (height, width)) == expected


@pytest.mark.parametrize("size", SIZES)
def test_sti_counts_add_pooled_tokens_per_crop(connectors, size):
    """STI: 2 shallow layers x 576 / 8 = 144 pooled tokens for the base and for every tile."""
    rows, columns = tile_grid(size, PINPOINTS, TILE)
    expected = _count(connectors["dc-sci-clip-l-336"], size) + 144 * (1 + rows * columns)
    assert _count(connectors["dc-sti-clip-l-336"], size) == expected


def test_sti_reference_counts(connectors):
    sti = connectors["dc-sti-clip-l-336"]
    assert _count(sti, (672, 672)) == 2928 + 144 * 5
    assert _count(sti, (1080, 1920)) == 1948 + 144 * 5
    assert _count(sti, (336, 336)) == 1176 + 144 * 3
    assert _count(sti, (1008, 336)) == 2376 + 144 * 4


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # 2x2 tiles of 12x12 -> 24x24, nothing to crop: 144 + 24 * 25
        ((672, 672), 744),
        # 2x2 tiles -> 24x24; 1080 * 24 / 1920 = 13.5 -> 13 rows kept, padding (24 - 13) // 2 = 5
        # per side -> 14 rows: 144 + 14 * 25
        ((1080, 1920), 494),
        # 1x2 tiles -> 12x24; width 336 * 12 / 336 = 12, padding 6 per side -> 12x12: 144 + 12 * 13
        ((336, 336), 300),
        # 3x1 tiles -> 36x12, exact aspect ratio: 144 + 36 * 13
        ((1008, 336), 612),
    ],
)
def test_efficient_counts_by_hand(connectors, size, expected):
    assert _count(connectors["dc-dci-clip-l-336-efficient"], size) == expected


def test_crop_layout(connectors):
    assert crop_layout(connectors["dc-sci-clip-l-336"], GRID) == ((24, 24), 0)
    assert crop_layout(connectors["dc-sti-clip-l-336"], GRID) == ((24, 24), 144)
    assert crop_layout(connectors["dc-dci-clip-l-336-efficient"], GRID) == ((12, 12), 0)


def test_sti_with_resampling_is_refused_clearly():
    with pytest.raises(ValueError, match="resample cannot be used with fusion 'sti'"):
        ConnectorConfig.from_preset("dc-sti-clip-l-336", resample=ResampleSpec(grid=(12, 12)))


# ---------------------------------------------------------------------------- packing


def _crop_tokens(crops: int, grid_tokens: int, extra: int) -> torch.Tensor:
    """``[crops, grid_tokens + extra, 3]``: channel 0 = crop, 1 = token index, 2 = 1 (never -1)."""
    crop = torch.arange(crops, dtype=torch.float32)[:, None].expand(-1, grid_tokens + extra)
    token = torch.arange(grid_tokens + extra, dtype=torch.float32)[None].expand(crops, -1)
    return torch.stack([crop, token, torch.ones_like(crop)], dim=-1)


def _expected_pack(tokens, size, grid, extra, newline):
    """Stitch, unpad and add newlines with plain loops (independent of pack_anyres' einops)."""
    rows, columns = tile_grid(size, PINPOINTS, TILE)
    h, w = grid
    stitched_h, stitched_w = rows * h, columns * w
    height, width = size
    if width / height > stitched_w / stitched_h:
        kept = int(round(height * (stitched_w / width), 7))
        pad = (stitched_h - kept) // 2
        row_range, col_range = range(pad, stitched_h - pad), range(stitched_w)
    else:
        kept = int(round(width * (stitched_h / height), 7))
        pad = (stitched_w - kept) // 2
        row_range, col_range = range(stitched_h), range(pad, stitched_w - pad)
    out = [tokens[0, i] for i in range(h * w)]
    for r in row_range:
        for c in col_range:
            tile = (r // h) * columns + c // w
            out.append(tokens[1 + tile, (r % h) * w + c % w])
        out.append(newline)
    for crop in range(1 + rows * columns):
        out += [tokens[crop, h * w + i] for i in range(extra)]
    return torch.stack(out), len(row_range), len(col_range)


@pytest.mark.parametrize(
    "preset", ["dc-sci-clip-l-336", "dc-sti-clip-l-336", "dc-dci-clip-l-336-efficient"]
)
@pytest.mark.parametrize(
    "size", [(672, 672), (1080, 1920), (1920, 1080), (336, 336), (1008, 336), (50, 2000), (1, 5000)]
)
def test_pack_anyres_layout(connectors, preset, size):
    connector = connectors[preset]
    grid, extra = crop_layout(connector, GRID)
    rows, columns = tile_grid(size, PINPOINTS, TILE)
    tokens = _crop_tokens(1 + rows * columns, grid[0] * grid[1], extra)
    newline = torch.tensor([-1.0, -1.0, -1.0])
    packed = pack_anyres(tokens, size, PINPOINTS, TILE, grid, newline)

    assert packed.shape == (_count(connector, size), 3)
    expected, kept_rows, kept_columns = _expected_pack(tokens, size, grid, extra, newline)
    torch.testing.assert_close(packed, expected, rtol=0, atol=0)
    # base tokens first, in order
    base = grid[0] * grid[1]
    assert torch.equal(packed[:base], tokens[0, :base])
    # a newline ends every row of the unpadded map, and only there
    is_newline = (packed == newline).all(dim=-1)
    positions = base + torch.arange(1, kept_rows + 1) * (kept_columns + 1) - 1
    assert torch.equal(is_newline.nonzero().flatten(), positions)
    # STI extras close the sequence, base first, then the tiles in row-major order
    tail = packed[packed.shape[0] - extra * (1 + rows * columns) :]
    if extra:
        assert torch.equal(
            tail[:, 0], torch.arange(1 + rows * columns).repeat_interleave(extra).float()
        )
        assert torch.equal(
            tail[:, 1], (base + torch.arange(extra)).repeat(1 + rows * columns).float()
        )


def test_pack_anyres_real_connector_shapes():
    """A real (tiny-width) STI connector's output packs to exactly its AnyRes count."""
    torch.manual_seed(0)
    connector = DenseConnector(
        ConnectorConfig.from_preset("dc-sti-clip-l-336", vision_dim=4, llm_dim=6)
    )
    size = (1080, 1920)
    rows, columns = tile_grid(size, PINPOINTS, TILE)
    features = {k: torch.randn(1 + rows * columns, 576, 4) for k in connector.captured_layers}
    out = connector(features, GRID)
    grid, _ = crop_layout(connector, GRID)
    packed = pack_anyres(out, size, PINPOINTS, TILE, grid, torch.zeros(6))
    assert packed.shape == (anyres_token_count(connector, size, PINPOINTS, TILE, GRID), 6)


def test_pack_anyres_wrong_crop_count():
    tokens = _crop_tokens(3, 576, 0)  # 672x672 needs 1 + 2x2 crops
    with pytest.raises(ValueError, match=r"needs 1 \+ 2x2 crops, got 3"):
        pack_anyres(tokens, (672, 672), PINPOINTS, TILE, GRID, torch.zeros(3))


# ---------------------------------------------------------------------------- pinpoint checks


def test_check_pinpoints_accepts_multiples():
    check_pinpoints(PINPOINTS, TILE)
    check_pinpoints([(336, 336)], TILE)


@pytest.mark.parametrize(
    ("pinpoints", "shown"),
    [
        ([[336, 600]], r"image_grid_pinpoints\[0\]=\[336, 600\]"),
        ([[336, 672], [500, 336]], r"image_grid_pinpoints\[1\]=\[500, 336\]"),
        ([[0, 336]], r"\[0, 336\]"),
        ([[-336, 336]], r"\[-336, 336\]"),
        ([[336, 672, 1008]], r"\[336, 672, 1008\]"),
        ([[336]], r"\[336\]"),
    ],
)
def test_check_pinpoints_errors(pinpoints, shown):
    with pytest.raises(ValueError, match=shown + r".*multiples of the tile size 336"):
        check_pinpoints(pinpoints, TILE)


@pytest.mark.parametrize(
    ("pinpoints", "shown"),
    [
        ([[336.0, 672]], r"image_grid_pinpoints\[0\] must be .* ints, got \[336.0, 672\] \(list\)"),
        ([336, 672], r"image_grid_pinpoints\[0\] must be .* ints, got 336 \(int\)"),
        ("336x672", r"image_grid_pinpoints must be a sequence of \(height, width\) pairs"),
    ],
)
def test_check_pinpoints_type_errors(pinpoints, shown):
    with pytest.raises(TypeError, match=shown):
        check_pinpoints(pinpoints, TILE)


def test_check_pinpoints_empty():
    with pytest.raises(ValueError, match="non-empty list of"):
        check_pinpoints([], TILE)


def test_counts_refuse_bad_pinpoints(connectors):
    """Every entry point checks the pinpoints (HF's own helpers would floor-divide silently)."""
    with pytest.raises(ValueError, match=r"\[672, 700\].*tile size 336"):
        anyres_token_count(connectors["dc-sci-clip-l-336"], (700, 700), [[672, 700]], TILE, GRID)
    with pytest.raises(ValueError, match=r"\[672, 700\].*tile size 336"):
        tile_grid((700, 700), [[672, 700]], TILE)


# ---------------------------------------------------------------------------- image size checks (issue 11)


@pytest.mark.parametrize(
    ("size", "error", "shown"),
    [
        ((0, 0), ValueError, "[0, 0]"),  # before: ZeroDivisionError in the tile choice
        ((-5, 20), ValueError, "[-5, 20]"),  # before: TypeError (no best resolution)
        ((336,), ValueError, "[336]"),
        ((336.5, 336), TypeError, "[336.5, 336] (list)"),
        ((True, 336), TypeError, "[True, 336] (list)"),
    ],
)
def test_counts_refuse_sizes_that_are_not_image_sizes(connectors, size, error, shown):
    message = (
        f"image_size must be a (height, width) pair of positive ints, got {shown}; the original "
        "image size in pixels"
    )
    for call in (
        lambda: anyres_token_count(connectors["dc-sci-clip-l-336"], size, PINPOINTS, TILE, GRID),
        lambda: tile_grid(size, PINPOINTS, TILE),
    ):
        with pytest.raises(error, match=re.escape(message)):
            call()


def test_image_size_checks_accept_tensors_and_name_the_row():
    assert check_image_size(torch.tensor([60, 150])) == (60, 150)
    assert check_image_sizes(torch.tensor([[60, 150], [1, 1]])) == [(60, 150), (1, 1)]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "image_sizes[1] must be a (height, width) pair of positive ints, got [0, 7]"
        ),
    ):
        check_image_sizes(torch.tensor([[60, 150], [0, 7]]))
    with pytest.raises(ValueError, match=re.escape("image_sizes must hold one original")):
        check_image_sizes([])
