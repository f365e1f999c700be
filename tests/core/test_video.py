"""Training-free video in the core (:mod:`mmconnect.video`): frame sampling, temporal pooling,
token counts and the token budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mmconnect.video import (
    PLAN_POOLINGS,
    POOLINGS,
    VideoPlan,
    count_video_tokens,
    plan_video_tokens,
    pool_frames,
    pooled_frame_tokens,
    sample_frame_indices,
)

CLIP, SIGLIP = (24, 24), (27, 27)


def numpy_reference(total: int, num: int) -> list[int]:
    """FreeVA's rule (docs/video.md, Frame sampling) written with numpy's round-half-to-even (vectorised)."""
    count = min(total, num)
    segment = float(total - 1) / count
    steps = np.arange(count + 1, dtype=np.float64)
    bounds = np.round(segment * steps)  # the same float64 products as segment * i
    return ((bounds[:-1] + bounds[1:]) // 2).astype(int).tolist()


# ---------------------------------------------------------------------------- frame sampling


def test_indices_match_the_numpy_formula_for_every_small_video():
    for total in range(1, 301):
        for num in range(1, 65):
            assert sample_frame_indices(total, num) == numpy_reference(total, num), (total, num)


@pytest.mark.parametrize(
    ("total", "num", "expected"),
    [
        # seg = 12.375: rounds 0, 12, 25, 37, 50 (49.5 -> 50), 62, 74, 87, 99
        (100, 8, [6, 18, 31, 43, 56, 68, 80, 93]),
        # seg = 2.5: round(2.5) = 2 (half to even); half-up would give [1, 4]
        (6, 2, [1, 3]),
        # seg = 1.25: round(2.5) = 2; half-up would give [0, 2, 3, 4]
        (6, 4, [0, 1, 3, 4]),
        # seg = 0.5: round(0.5) = 0; half-up would give [0, 1]
        (2, 2, [0, 0]),
        # seg = 0.8: the reference rule repeats frame 2 and never shows frame 4
        (5, 5, [0, 1, 2, 2, 3]),
        (10, 1, [4]),
        (1, 1, [0]),
        (1, 8, [0]),
    ],
)
def test_hand_computed_indices(total, num, expected):
    assert sample_frame_indices(total, num) == expected


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
@settings(max_examples=500)
def test_python_round_is_numpy_round(value):
    assert round(value) == int(np.round(value))


@given(st.integers(1, 100_000), st.integers(1, 256))
@settings(max_examples=300)
def test_indices_are_ascending_in_range_and_clamped(total, num):
    indices = sample_frame_indices(total, num)
    assert indices == numpy_reference(total, num)
    assert len(indices) == min(total, num)
    assert indices == sorted(indices)
    assert indices[0] >= 0 and indices[-1] < total


def test_more_frames_than_the_video_has_are_clamped():
    assert sample_frame_indices(5, 8) == sample_frame_indices(5, 5) == [0, 1, 2, 2, 3]
    assert len(sample_frame_indices(3, 1000)) == 3


@pytest.mark.parametrize(
    ("total", "num", "error", "message"),
    [
        (10, 0, ValueError, "num_frames must be a positive int, got 0"),
        (10, -3, ValueError, "num_frames must be a positive int, got -3"),
        (0, 8, ValueError, "total_frames must be a positive int, got 0; frames in the video"),
        (10, 2.0, TypeError, r"num_frames must be a positive int, got 2.0 \(float\)"),
        (10, "8", TypeError, r"num_frames must be a positive int, got '8' \(str\)"),
        (10, True, TypeError, r"num_frames must be a positive int, got True \(bool\)"),
        (10.0, 2, TypeError, r"total_frames must be a positive int, got 10.0 \(float\)"),
    ],
)
def test_bad_sampling_arguments(total, num, error, message):
    with pytest.raises(error, match=message):
        sample_frame_indices(total, num)


# ---------------------------------------------------------------------------- token counts


@pytest.mark.parametrize(
    ("grid", "frames", "expected"),
    [
        (
            CLIP,
            8,
            {"concat": 4608, "maxpool1d": 2304, "mean": 576, "avgpool2d": 1152, "bilinear": 1152},
        ),
        (
            CLIP,
            1,
            {"concat": 576, "maxpool1d": 288, "mean": 576, "avgpool2d": 144, "bilinear": 144},
        ),
        (
            SIGLIP,
            8,
            {"concat": 5832, "maxpool1d": 2912, "mean": 729, "avgpool2d": 1352, "bilinear": 1568},
        ),
        (
            SIGLIP,
            3,
            {"concat": 2187, "maxpool1d": 1092, "mean": 729, "avgpool2d": 507, "bilinear": 588},
        ),
        ((3, 5), 2, {"concat": 30, "maxpool1d": 14, "mean": 15, "avgpool2d": 4, "bilinear": 12}),
    ],
)
def test_token_counts_match_the_pooled_shapes(grid, frames, expected):
    tokens = grid[0] * grid[1]
    features = torch.randn(frames, tokens, 8)
    assert set(expected) == set(POOLINGS)
    for pooling, count in expected.items():
        assert count_video_tokens(frames, tokens, pooling, grid) == count
        assert pool_frames(features, pooling, grid).shape == (1, count, 8)


def test_per_frame_token_counts_of_the_published_settings():
    assert pooled_frame_tokens("maxpool1d", 576) == 288  # Dense Connector video, CLIP-L
    assert pooled_frame_tokens("avgpool2d", 576, CLIP) == 144  # LLaVA-NeXT-Video
    assert pooled_frame_tokens("bilinear", 729, SIGLIP) == 196  # OneVision, 27x27 -> 14x14
    assert pooled_frame_tokens("maxpool1d", 729) == 364  # odd: the last token is dropped
    assert pooled_frame_tokens("avgpool2d", 729, SIGLIP) == 169  # floor(27 / 2) = 13


# ---------------------------------------------------------------------------- pooling values


def test_concat_keeps_every_frame_in_time_order():
    features = torch.randn(3, 6, 4)
    assert torch.equal(pool_frames(features, "concat")[0], torch.cat(list(features)))


def test_maxpool1d_takes_the_larger_of_each_token_pair_per_frame():
    features = torch.randn(2, 5, 3)  # 5 tokens: pairs (0, 1), (2, 3); token 4 dropped
    expected = torch.cat(
        [torch.maximum(frame[0:4:2], frame[1:4:2]) for frame in features]
    )  # [2 frames * 2 tokens, 3]
    assert torch.equal(pool_frames(features, "maxpool1d")[0], expected)


def test_mean_averages_each_token_over_the_frames():
    features = torch.arange(24, dtype=torch.float32).reshape(3, 4, 2)
    assert torch.equal(pool_frames(features, "mean")[0], features[1])  # linear in the frame index


def test_avgpool2d_averages_2x2_cells_of_each_frame():
    features = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1)  # two 4x4 grids
    pooled = pool_frames(features, "avgpool2d", (4, 4))[0, :, 0]
    first = [
        (0 + 1 + 4 + 5) / 4,
        (2 + 3 + 6 + 7) / 4,
        (8 + 9 + 12 + 13) / 4,
        (10 + 11 + 14 + 15) / 4,
    ]
    assert pooled.tolist() == first + [value + 16 for value in first]


def test_bilinear_on_an_odd_grid_matches_hand_computed_values():
    # value(r, c) = 3r + c on a 3x3 grid; bilinear is exact on a linear map. align_corners=False
    # samples the 2x2 output at source coordinates (0.25, 1.75) on both axes.
    features = torch.tensor([3.0 * r + c for r in range(3) for c in range(3)]).reshape(1, 9, 1)
    pooled = pool_frames(features, "bilinear", (3, 3))[0, :, 0]
    assert_close(pooled, torch.tensor([1.0, 2.5, 5.5, 7.0]))


def test_bilinear_equals_avgpool2d_on_even_grids():
    features = torch.randn(4, 576, 16)
    assert_close(pool_frames(features, "bilinear", CLIP), pool_frames(features, "avgpool2d", CLIP))


def test_bilinear_matches_torch_interpolate_on_siglip_grids():
    features = torch.randn(2, 729, 5)
    maps = features.reshape(2, 27, 27, 5).permute(0, 3, 1, 2)
    expected = F.interpolate(maps, size=(14, 14), mode="bilinear", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 2 * 196, 5)
    assert_close(pool_frames(features, "bilinear", SIGLIP), expected)


def test_pooling_keeps_dtype_and_gradients():
    features = torch.randn(2, 16, 4, dtype=torch.float64, requires_grad=True)
    for pooling in POOLINGS:
        pooled = pool_frames(features, pooling, (4, 4))
        assert pooled.dtype == torch.float64
        pooled.sum().backward()
    assert features.grad is not None


@pytest.mark.parametrize(
    ("shape", "pooling", "grid", "message"),
    [
        ((16, 4), "concat", None, r"frame_tokens must be \[frames, tokens, channels\]"),
        ((0, 16, 4), "concat", None, "at least one frame"),
        ((2, 16, 4), "maxpool", None, "pooling must be one of"),
        ((2, 16, 4), "avgpool2d", None, "avgpool2d pools each frame's 2-D token grid"),
        ((2, 16, 4), "bilinear", (4, 5), "grid 4x5 holds 20 tokens but each frame has 16"),
        ((2, 1, 4), "maxpool1d", None, "maxpool1d needs at least 2 tokens per frame"),
        ((2, 3, 4), "avgpool2d", (1, 3), "avgpool2d needs a grid of at least 2x2"),
    ],
)
def test_bad_pooling_input(shape, pooling, grid, message):
    with pytest.raises(ValueError, match=message):
        pool_frames(torch.randn(*shape), pooling, grid)


# ---------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    ("budget", "options", "expected"),
    [
        (4608, {}, VideoPlan(8, "concat", 4608)),
        (2304, {}, VideoPlan(8, "maxpool1d", 2304)),  # the Dense Connector video setting
        (1152, {}, VideoPlan(8, "bilinear", 1152)),
        # 8 and 7 frames do not fit even at 144 per frame: 6 x 144 = 864
        (1000, {}, VideoPlan(6, "bilinear", 864)),
        (10_000, {"total_frames": 3}, VideoPlan(3, "concat", 1728)),
        (10_000, {"max_frames": 16}, VideoPlan(16, "concat", 9216)),
        (576, {"poolings": ("mean",)}, VideoPlan(8, "mean", 576)),
        (1000, {"poolings": "concat"}, VideoPlan(1, "concat", 576)),
        (144, {}, VideoPlan(1, "bilinear", 144)),
    ],
)
def test_plan_for_clip_frames(budget, options, expected):
    assert plan_video_tokens(budget, tokens_per_frame=576, grid=CLIP, **options) == expected


def test_plan_for_sti_frames_uses_only_the_1d_poolings():
    # STI: 720 tokens per frame, no grid. 7 x 360 = 2520 > 2304, 6 x 360 = 2160.
    assert plan_video_tokens(2304, tokens_per_frame=720) == VideoPlan(6, "maxpool1d", 2160)


def test_plan_for_siglip_frames_prefers_bilinear_over_avgpool2d():
    assert plan_video_tokens(196 * 8, tokens_per_frame=729, grid=SIGLIP) == VideoPlan(
        8, "bilinear", 1568
    )
    assert plan_video_tokens(
        1400, tokens_per_frame=729, grid=SIGLIP, poolings=("avgpool2d",)
    ) == VideoPlan(8, "avgpool2d", 1352)


def test_budget_too_small_for_one_frame():
    with pytest.raises(ValueError, match=r"max_tokens=100 is too small for even one frame") as info:
        plan_video_tokens(100, tokens_per_frame=576, grid=CLIP)
    assert "576 tokens on a 24x24 grid" in str(info.value)
    assert "the fewest any allowed pooling keeps is 144 (bilinear)" in str(info.value)
    with pytest.raises(ValueError, match="fewest any allowed pooling keeps is 360 \\(maxpool1d\\)"):
        plan_video_tokens(300, tokens_per_frame=720)


@pytest.mark.parametrize(
    ("budget", "options", "error", "message"),
    [
        (0, {}, ValueError, "max_tokens must be a positive int, got 0"),
        (100, {"max_frames": 0}, ValueError, "max_frames must be a positive int, got 0"),
        (100, {"total_frames": 0}, ValueError, "total_frames must be a positive int, got 0"),
        (100, {"poolings": ()}, ValueError, "poolings must name at least one"),
        (100, {"poolings": ("avg",)}, ValueError, "pooling must be one of"),
        (100, {"grid": None, "poolings": ("bilinear",)}, ValueError, "no allowed pooling applies"),
        (100.0, {}, TypeError, "max_tokens must be a positive int"),
        (100, {"grid": (24.0, 24)}, TypeError, "grid must be a \\(height, width\\) pair"),
        (100, {"grid": (0, 24)}, ValueError, "grid must be a \\(height, width\\) pair"),
    ],
)
def test_bad_plan_arguments(budget, options, error, message):
    options = {"tokens_per_frame": 576, "grid": CLIP} | options
    with pytest.raises(error, match=message):
        plan_video_tokens(budget, **options)


@given(
    budget=st.integers(1, 6000),
    side=st.integers(1, 30),
    max_frames=st.integers(1, 16),
    total=st.one_of(st.none(), st.integers(1, 40)),
)
@settings(max_examples=300, deadline=None)
def test_plan_fits_and_uses_the_most_frames_that_fit(budget, side, max_frames, total):
    tokens = side * side
    frames = min(max_frames, total) if total else max_frames
    usable = [p for p in PLAN_POOLINGS if not (p == "maxpool1d" and tokens < 2)]
    usable = [p for p in usable if not (p == "avgpool2d" and side < 2)]
    try:
        plan = plan_video_tokens(
            budget,
            tokens_per_frame=tokens,
            grid=(side, side),
            max_frames=max_frames,
            total_frames=total,
        )
    except ValueError:
        assert all(count_video_tokens(1, tokens, p, (side, side)) > budget for p in usable)
        return
    assert plan.num_tokens == count_video_tokens(
        plan.num_frames, tokens, plan.pooling, (side, side)
    )
    assert plan.num_tokens <= budget and 1 <= plan.num_frames <= frames
    if plan.num_frames < frames:  # one more frame fits with no pooling
        more = plan.num_frames + 1
        assert all(count_video_tokens(more, tokens, p, (side, side)) > budget for p in usable)
    earlier = usable[: usable.index(plan.pooling)]  # preferred poolings did not fit at this T
    assert all(
        count_video_tokens(plan.num_frames, tokens, p, (side, side)) > budget for p in earlier
    )
