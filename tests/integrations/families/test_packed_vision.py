"""Packed Qwen2-VL-family image tokens: block order -> raster order, per-grid batches, M-RoPE grids.

Ground truth comes from HF itself: ``get_vision_position_ids`` gives each processor-order token
its ``(row, column)``, ``get_vision_window_index`` Qwen2.5-VL's window permutation, and a tiny
stock Qwen2.5-VL tower's own merger the tokens our zoo merger must reproduce.
"""

from __future__ import annotations

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    LayerFeatures,
    MultiLayerFeatureTap,
    ResampleSpec,
    SCISpec,
    SingleLayerSpec,
    STISpec,
)
from mmconnect.integrations.families.packed_vision import (
    PackedImages,
    check_grid_thw,
    check_packed_pixels,
    check_positional_connector,
    connector_token_count,
    processor_to_raster,
    rope_grid_thw,
    window_index,
)
from mmconnect.zoo.patch_merger import QWEN2_5_VL_MERGER, qwen2_5_vl_merger_state_from_hf
from tests.support import qwen_vl_toys as toys

#: Two images of different sizes, a video of 2 temporal slices, and a repeat of the first grid.
GRID_THW = torch.tensor([[1, 4, 6], [1, 8, 6], [2, 4, 4], [1, 4, 6]])
MERGE = 2


def _coordinates(grid_thw: torch.Tensor) -> torch.Tensor:
    """``[1, seq, 3]`` processor-order features: (image * 100 + slice, row, column) per token."""
    positions = get_vision_position_ids(grid_thw, MERGE).float()
    labels = torch.cat(
        [
            torch.arange(t).repeat_interleave(h * w).float() + 100 * image
            for image, (t, h, w) in enumerate(grid_thw.tolist())
        ]
    )
    return torch.cat([labels[:, None], positions], dim=1)[None]


def _window_order(packed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[1, seq, C]`` processor order -> the block order Qwen2.5-VL's tower gives its blocks."""
    units = packed[0].reshape(-1, MERGE * MERGE, packed.shape[-1])
    return units[index].reshape(1, -1, packed.shape[-1])


def _raster(label: float, h: int, w: int) -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(
        [torch.full((h * w,), label), rows.flatten().float(), columns.flatten().float()], 1
    )


@pytest.mark.parametrize("windows", [False, True])
def test_every_slice_comes_out_in_raster_order(windows) -> None:
    packed = _coordinates(GRID_THW)
    index = None
    if windows:  # Qwen2.5-VL: 56-px windows of 14-px patches are 2 x 2 merge units
        index, _ = get_vision_window_index(
            GRID_THW, spatial_merge_size=MERGE, window_size=56, patch_size=14
        )
        assert not torch.equal(index, torch.arange(index.numel()))  # the windows do permute
        packed = _window_order(packed, index)
    images = PackedImages(GRID_THW, merge_size=MERGE, window_index=index)
    features = LayerFeatures({3: packed, 5: packed * 2}, group_means={(1, 2): packed * 3})
    assert [(batch.grid, batch.slices) for batch in images.batches] == [
        ((4, 6), ((0, 0), (3, 0))),
        ((8, 6), ((1, 0),)),
        ((4, 4), ((2, 0), (2, 1))),
    ]
    for batch in images.batches:
        cut = images.cut(features, batch)
        h, w = batch.grid
        expected = torch.stack(
            [_raster(100 * image + frame, h, w) for image, frame in batch.slices]
        )
        assert torch.equal(cut[3], expected)
        assert torch.equal(cut[5], expected * 2)
        assert torch.equal(cut.group_means[(1, 2)], expected * 3)
        assert cut.grids == {3: (h, w), 5: (h, w)}
    total = sum(t * h * w for t, h, w in GRID_THW.tolist())
    assert sorted(images.raster_index.tolist()) == list(range(total))


def test_run_puts_outputs_back_per_image_slice_by_slice() -> None:
    packed = _coordinates(GRID_THW)
    images = PackedImages(GRID_THW, merge_size=MERGE)
    calls = []

    def first_token_and_count(features, grid):
        calls.append(grid)
        tokens = features[0]
        return tokens[:, :1], torch.full((tokens.shape[0], 2, 1), float(grid[0] * grid[1]))

    firsts, counts = images.run(LayerFeatures({0: packed}), first_token_and_count)
    assert calls == [(4, 6), (8, 6), (4, 4)]  # one connector call per distinct grid
    assert [first.tolist() for first in firsts] == [
        [[0.0, 0.0, 0.0]],
        [[100.0, 0.0, 0.0]],
        [[200.0, 0.0, 0.0], [201.0, 0.0, 0.0]],
        [[300.0, 0.0, 0.0]],
    ]
    assert [count.flatten().tolist() for count in counts] == [
        [24.0, 24.0],
        [48.0, 48.0],
        [16.0, 16.0, 16.0, 16.0],
        [24.0, 24.0],
    ]


def test_processor_to_raster_is_hf_position_ids_inverse() -> None:
    grid = (2, 4, 6)
    order = processor_to_raster(grid, MERGE)
    positions = get_vision_position_ids(torch.tensor([grid]), MERGE)
    raster = positions[order]
    rows, columns = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    expected = torch.stack([rows.flatten(), columns.flatten()], 1).repeat(2, 1)
    assert torch.equal(raster, expected)


def test_window_index_is_the_towers() -> None:
    config = toys.qwen2_5_vl_config().vision_config
    expected, _ = get_vision_window_index(
        GRID_THW, spatial_merge_size=2, window_size=56, patch_size=14
    )
    assert torch.equal(window_index(GRID_THW, config), expected)


@pytest.mark.parametrize(
    ("window_size", "grid_thw", "counts"),
    [
        (56, GRID_THW, [6, 12, 8, 6]),
        # Qwen2.5-VL's real 112 px windows (4 x 4 merge units) on a 280 x 392 px image, whose
        # 10 x 14 merge units leave partial windows at the right and bottom edges.
        (112, torch.tensor([[1, 20, 28], [2, 8, 12]]), [140, 48]),
    ],
)
def test_zoo_merger_on_raster_tokens_equals_the_stock_merger(window_size, grid_thw, counts):
    """The tiny tower's last block tapped (block order), put in raster order per slice, through
    the zoo's Qwen2.5-VL merger with the stock weights == the stock tower's pooler_output."""
    model = toys.qwen2_5_vl_model(window_size=window_size)
    tower = model.model.visual
    pixels = toys.packed_pixels(grid_thw)
    merger = DenseConnector(
        ConnectorConfig(
            fusion=SingleLayerSpec(final_layer=-1),
            projector=QWEN2_5_VL_MERGER,
            vision_dim=toys.QWEN25_WIDTH,
            llm_dim=toys.LLM_WIDTH,
            num_layers=toys.QWEN25_DEPTH,
        )
    )
    merger.projector.load_state_dict(
        qwen2_5_vl_merger_state_from_hf(model.state_dict(), "model.visual.merger.")
    )
    tap = merger.make_tap(tower)
    images = PackedImages(
        grid_thw, merge_size=MERGE, window_index=window_index(grid_thw, tower.config)
    )
    with torch.no_grad():
        stock = tower(pixels, grid_thw=grid_thw).pooler_output
        (tokens,) = images.run(tap(pixels, grid_thw=grid_thw), lambda f, g: (merger(f, g),))
    assert [token.shape[0] for token in tokens] == counts
    torch.testing.assert_close(torch.cat(tokens), stock, atol=1e-6, rtol=0)
    assert not tower._forward_hooks and not any(block._forward_hooks for block in tower.blocks)


# ---------------------------------------------------------------------------- counts and M-RoPE

_COMMON = {"vision_dim": 32, "llm_dim": 32, "num_layers": 4}
_MERGER = ConnectorConfig(
    fusion=SingleLayerSpec(final_layer=-1), projector=QWEN2_5_VL_MERGER, **_COMMON
)
_DCI = ConnectorConfig(fusion=DCISpec(groups=((0, 1), (2, 3))), **_COMMON)
_RESAMPLED = ConnectorConfig(
    fusion=SCISpec(extra_layers=(1,)), resample=ResampleSpec(grid=(2, 2)), **_COMMON
)


def test_connector_token_counts_per_image() -> None:
    assert connector_token_count(_MERGER, (2, 4, 6)) == 2 * 6
    assert connector_token_count(_DCI, (2, 4, 6)) == 2 * 24
    assert connector_token_count(DenseConnector(_RESAMPLED), (3, 8, 6)) == 3 * 4


def test_rope_grid_thw_divides_to_the_connectors_token_grid() -> None:
    assert torch.equal(rope_grid_thw(GRID_THW, _MERGER, merge_size=MERGE), GRID_THW)
    dci = torch.tensor([[1, 8, 12], [1, 16, 12], [2, 8, 8], [1, 8, 12]])
    assert torch.equal(rope_grid_thw(GRID_THW, _DCI, merge_size=MERGE), dci)
    fixed = torch.tensor([[1, 4, 4], [1, 4, 4], [2, 4, 4], [1, 4, 4]])
    assert torch.equal(rope_grid_thw(GRID_THW, _RESAMPLED, merge_size=MERGE), fixed)


@pytest.mark.parametrize(
    ("connector", "named"),
    [
        (ConnectorConfig(fusion=STISpec(extra_layers=(1, 2)), **_COMMON), r"fusion='sti'"),
        (
            ConnectorConfig(
                fusion=SingleLayerSpec(final_layer=-1), projector="perceiver", **_COMMON
            ),
            r"projector='perceiver'",
        ),
    ],
)
def test_connector_whose_tokens_form_no_grid_is_refused(connector, named) -> None:
    with pytest.raises(ValueError, match=rf"Dense Toy cannot use a connector .*{named}.*M-RoPE"):
        check_positional_connector(connector, family="Dense Toy", probe_grids=[(8, 8)])
    with pytest.raises(ValueError, match=r"do not form a token grid"):
        rope_grid_thw(GRID_THW[:1], connector, merge_size=MERGE)


def test_positional_connectors_pass_and_unfit_probes_are_named() -> None:
    for connector in (_MERGER, _DCI, _RESAMPLED):
        check_positional_connector(connector, family="Dense Toy", probe_grids=[(8, 8)])
    with pytest.raises(ValueError, match=r"accepts none of the patch grids \[\(3, 3\)\]"):
        check_positional_connector(_MERGER, family="Dense Toy", probe_grids=[(3, 3)])


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("grid_thw", "error", "message"),
    [
        (torch.tensor([[1.0, 4, 4]]), TypeError, r"image_grid_thw must be an integer torch.Tensor"),
        ([[1, 4, 4]], TypeError, r"image_grid_thw must be an integer torch.Tensor \[images, 3\]"),
        (torch.tensor([1, 4, 4]), ValueError, r"must be \[images, 3\].*got shape \(3,\)"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, r"got shape \(0, 3\)"),
        (
            torch.tensor([[1, 4, 0]]),
            ValueError,
            r"image_grid_thw\[0\] = \[1, 4, 0\] must be positive",
        ),
        (
            torch.tensor([[1, 4, 4], [1, 5, 4]]),
            ValueError,
            r"image_grid_thw\[1\] = \[1, 5, 4\]: h and w must be multiples of spatial_merge_size=2",
        ),
    ],
)
def test_bad_grid_thw(grid_thw, error, message) -> None:
    with pytest.raises(error, match=message):
        check_grid_thw(grid_thw, merge_size=MERGE)


def test_bad_packed_pixels() -> None:
    grids = check_grid_thw(torch.tensor([[1, 4, 4], [2, 2, 2]]), merge_size=MERGE)
    check_packed_pixels(torch.zeros(24, 12), grids, patch_width=12)
    with pytest.raises(
        ValueError,
        match=r"holds 23 patches but image_grid_thw \[\[1, 4, 4\], \[2, 2, 2\]\] describes 24",
    ):
        check_packed_pixels(torch.zeros(23, 12), grids, patch_width=12)
    with pytest.raises(
        ValueError,
        match=r"must be the processor's flattened patches \[24, 12\].*got shape \(24, 3, 2, 2\)",
    ):
        check_packed_pixels(torch.zeros(24, 3, 2, 2), grids, patch_width=12)
    with pytest.raises(
        TypeError, match=r"pixel_values must be a floating torch.Tensor, got torch.int64"
    ):
        check_packed_pixels(torch.zeros(24, 12, dtype=torch.long), grids, patch_width=12)


def test_window_index_must_permute_the_units() -> None:
    with pytest.raises(
        ValueError, match=r"window_index must be a permutation of the call's 4 merge units, got 3"
    ):
        PackedImages(torch.tensor([[1, 4, 4]]), merge_size=MERGE, window_index=torch.arange(3))
    with pytest.raises(ValueError, match=r"permutation of the call's 4 merge units"):
        PackedImages(
            torch.tensor([[1, 4, 4]]), merge_size=MERGE, window_index=torch.tensor([0, 0, 1, 2])
        )


def test_cut_refuses_features_of_another_call() -> None:
    images = PackedImages(torch.tensor([[1, 4, 4]]), merge_size=MERGE)
    with pytest.raises(
        ValueError, match=r"packed features must be \[1, 16, channels\].*got \(1, 20, 3\)"
    ):
        images.cut(LayerFeatures({0: torch.zeros(1, 20, 3)}), images.batches[0])


def _raise(*args) -> None:
    raise KeyError("inside the tower")


def test_tap_on_the_tower_early_exits_and_leaves_no_hooks() -> None:
    """A tap reading block 2 of the 4-block tower stops there (packed [1, seq, C] capture), and
    its hooks are gone after a normal call and after one that raises."""
    tower = toys.qwen2_5_vl_model().model.visual
    grid = torch.tensor([[1, 4, 4]])
    pixels = toys.packed_pixels(grid)
    ran = []
    handle = tower.blocks[3].register_forward_pre_hook(lambda *args: ran.append(3))
    try:
        tap = MultiLayerFeatureTap(tower, [2], groups=[(0, 1)])
        features = tap(pixels, grid_thw=grid)
    finally:
        handle.remove()
    assert ran == [] and features[2].shape == (1, 16, 32)
    assert features.group_means[(0, 1)].shape == (1, 16, 32)
    handle = tower.blocks[1].register_forward_pre_hook(_raise)
    try:
        with pytest.raises(KeyError, match="inside the tower"):
            tap(pixels, grid_thw=grid)
    finally:
        handle.remove()
    assert not tower._forward_hooks and not tower._forward_pre_hooks
    assert not any(block._forward_hooks or block._forward_pre_hooks for block in tower.blocks)
