"""Property tests of the pure fusion and resampling ops (``mmconnect.fusion``, ``mmconnect.resample``).

Every property is checked against a plain-torch restatement (reshape + mean, avg_pool2d over
``[B, C, h, w]`` maps built with ``permute`` / ``reshape``) on grids that are usually not square.
Data come from a ``torch.Generator`` seeded by a hypothesis-drawn seed, so each example replays.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mmconnect import LayerFeatures, concat, grouped_average, pool_tokens, resample_tokens, stack
from mmconnect.fusion import ChannelConcat, GroupedChannelConcat, TokenStack
from mmconnect.resample import TokenResampler

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)
EPS = {"atol": 1e-6, "rtol": 1e-6}
EXACT = {"atol": 0.0, "rtol": 0.0}

batches = st.integers(1, 3)
sides = st.integers(1, 7)
channels = st.integers(1, 5)
seeds = st.integers(0, 2**31 - 1)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, h*w, C] -> [B, C, h, w]`` in raster order, written without einops."""
    batch, _, width = tokens.shape
    return tokens.reshape(batch, grid[0], grid[1], width).permute(0, 3, 1, 2)


def _tokens(maps: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, h*w, C]`` in raster order."""
    batch, width = maps.shape[:2]
    return maps.permute(0, 2, 3, 1).reshape(batch, -1, width)


# ---------------------------------------------------------------------------- stack / concat


@PROPERTY
@given(
    batch=batches,
    counts=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    width=channels,
    seed=seeds,
)
def test_stack_counts_and_order(batch, counts, width, seed):
    inputs = [_randn(seed + i, batch, count, width) for i, count in enumerate(counts)]
    out = stack(inputs)
    assert out.shape == (batch, sum(counts), width)
    start = 0
    for tensor in inputs:  # slices of the output are the inputs, in the given order
        assert_close(out[:, start : start + tensor.shape[1]], tensor, **EXACT)
        start += tensor.shape[1]


@PROPERTY
@given(
    batch=batches,
    count=st.integers(1, 9),
    widths=st.lists(channels, min_size=1, max_size=4),
    seed=seeds,
)
def test_concat_channel_order(batch, count, widths, seed):
    inputs = [_randn(seed + i, batch, count, width) for i, width in enumerate(widths)]
    out = concat(inputs)
    assert out.shape == (batch, count, sum(widths))
    start = 0
    for tensor in inputs:
        assert_close(out[..., start : start + tensor.shape[-1]], tensor, **EXACT)
        start += tensor.shape[-1]


# ---------------------------------------------------------------------------- pool_tokens


@PROPERTY
@given(batch=batches, count=st.integers(1, 40), width=channels, data=st.data(), seed=seeds)
def test_pool_tokens_raster_is_mean_over_consecutive_windows(batch, count, width, data, seed):
    window = data.draw(st.integers(1, count), label="window")
    tokens = _randn(seed, batch, count, width)
    kept = (count // window) * window  # the remainder is dropped
    expected = tokens[:, :kept].reshape(batch, count // window, window, width).mean(dim=2)
    out = pool_tokens(tokens, window)
    assert out.shape == (batch, count // window, width)
    assert_close(out, expected, **EPS)


def test_pool_tokens_raster_crosses_grid_rows_like_official_sti():
    # 3x4 grid, window 8: the first window takes row 0 and row 1 (1-D, not a 2-D patch).
    tokens = torch.arange(12.0).reshape(1, 12, 1)
    assert_close(pool_tokens(tokens, 8), torch.tensor([[[3.5]]]), **EXACT)
    assert pool_tokens(torch.zeros(1, 729, 2), 8).shape == (1, 91, 2)  # SigLIP: token 728 dropped


@PROPERTY
@given(batch=batches, height=sides, width=sides, dim=channels, data=st.data(), seed=seeds)
def test_pool_tokens_grid_is_2d_avg_pool(batch, height, width, dim, data, seed):
    window = data.draw(st.integers(1, min(height, width)), label="window")
    tokens = _randn(seed, batch, height * width, dim)
    rows, cols = height // window, width // window
    blocks = _maps(tokens, (height, width))[:, :, : rows * window, : cols * window]
    expected = _tokens(blocks.reshape(batch, dim, rows, window, cols, window).mean(dim=(3, 5)))
    out = pool_tokens(tokens, window, mode="grid", grid=(height, width))
    assert out.shape == (batch, rows * cols, dim)
    assert_close(out, expected, **EPS)


# ---------------------------------------------------------------------------- grouped_average


@st.composite
def partitions(draw):
    """A number of layers and a partition of (a subset of) them into non-empty groups."""
    num_layers = draw(st.integers(1, 8))
    order = draw(st.permutations(range(num_layers)))
    used = draw(st.integers(1, num_layers))
    cuts = sorted(draw(st.sets(st.integers(1, used - 1), max_size=used - 1))) if used > 1 else []
    bounds = [0, *cuts, used]
    groups = [list(order[a:b]) for a, b in itertools.pairwise(bounds)]
    return num_layers, groups


@PROPERTY
@given(batch=batches, count=st.integers(1, 6), width=channels, split=partitions(), seed=seeds)
def test_grouped_average_is_per_group_mean(batch, count, width, split, seed):
    num_layers, groups = split
    features = {layer: _randn(seed + layer, batch, count, width) for layer in range(num_layers)}
    means = grouped_average(features, groups)
    assert len(means) == len(groups)
    for group, mean in zip(groups, means, strict=True):
        expected = sum(features[layer] for layer in group) / len(group)
        assert mean.shape == (batch, count, width)
        assert_close(mean, expected, **EPS)


@PROPERTY
@given(
    count=st.integers(1, 6),
    width=channels,
    split=partitions(),
    shift=st.floats(-100, 100, allow_nan=False),
    seed=seeds,
)
def test_grouped_average_commutes_with_a_constant_shift(count, width, split, shift, seed):
    num_layers, groups = split
    features = {layer: _randn(seed + layer, 2, count, width) for layer in range(num_layers)}
    shifted = {layer: tensor + shift for layer, tensor in features.items()}
    for plain, moved in zip(
        grouped_average(features, groups), grouped_average(shifted, groups), strict=True
    ):
        assert_close(moved, plain + shift, atol=1e-4, rtol=1e-6)


def test_grouped_average_keeps_dtype_and_can_accumulate_in_fp32():
    features = {i: torch.full((1, 2, 3), 1.0 + i / 64, dtype=torch.bfloat16) for i in range(12)}
    native, upcast = (
        grouped_average(features, [range(12)], accumulate_dtype=dtype)[0]
        for dtype in (None, torch.float32)
    )
    assert native.dtype == upcast.dtype == torch.bfloat16
    exact = sum(1.0 + i / 64 for i in range(12)) / 12
    assert_close(upcast.float(), torch.full((1, 2, 3), exact).bfloat16().float(), **EXACT)


HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [(1, 256, 32), (2, 7, 5), (1, 3, 1)], ids=str)
def test_grouped_average_rounds_like_the_official_stack_sum_divide(dtype, shape):
    """Non-streaming DCI: ``torch.sum(torch.stack(group), 0) / n`` in the features' dtype,
    exactly; with ``accumulate_dtype=torch.float32``, summed and divided in fp32, rounded once."""
    generator = torch.Generator().manual_seed(7)
    features = {i: torch.randn(*shape, generator=generator).mul(8).to(dtype) for i in range(13)}
    group = list(range(13))
    stacked = torch.stack([features[i] for i in group])
    official, upcast = (
        grouped_average(features, [group], accumulate_dtype=accumulate)[0]
        for accumulate in (None, torch.float32)
    )
    assert torch.equal(official, torch.sum(stacked, 0) / 13)
    assert torch.equal(upcast, (stacked.float().sum(0) / 13).to(dtype))
    assert official.dtype == upcast.dtype == dtype


#: Group sizes around torch's CPU reduction blocks (16 members, then 16 blocks of 16).
GROUP_SIZES = [*range(1, 41), 63, 64, 65, 255, 256, 257, 300]


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (torch.bfloat16, (1, 64, 32)),
        (torch.float16, (1, 64, 32)),
        (torch.bfloat16, (2, 7, 5)),  # any element count in half precision
        (torch.float16, (1, 3, 1)),
        (torch.float32, (1, 64, 32)),  # fp32 / fp64: element counts that are multiples of 32
        (torch.float64, (2, 16, 48)),
    ],
    ids=str,
)
def test_streamed_group_sum_equals_the_stacked_sum_bit_for_bit(dtype, shape):
    """The tap's running sum (never holding the members) adds up in torch's CPU order: for
    every group size, including the 16-member blocks torch switches to, it equals
    ``torch.stack(members).sum(0)`` exactly (rounded once, in the members' dtype)."""
    from mmconnect.tap import _GroupSum

    generator = torch.Generator().manual_seed(3)
    members = [torch.randn(*shape, generator=generator).mul(5).to(dtype) for _ in range(300)]
    wrong = []
    for size in GROUP_SIZES:
        running = _GroupSum(size, dtype, dtype)
        for member in members[:size]:
            running.add(member)
        if not torch.equal(running.total(), torch.stack(members[:size]).sum(0)):
            wrong.append(size)
    assert wrong == []


def test_grouped_average_uses_a_streamed_group_mean():
    streamed = torch.full((1, 4, 2), 7.0)
    features = LayerFeatures({5: torch.zeros(1, 4, 2)}, group_means={(0, 1, 2): streamed})
    means = grouped_average(features, [(0, 1, 2)])
    assert means[0] is streamed


# ---------------------------------------------------------------------------- resample_tokens


@PROPERTY
@given(
    batch=batches,
    height=sides,
    width=sides,
    dim=channels,
    mode=st.sampled_from(["bilinear", "avg", "max"]),
    seed=seeds,
)
def test_resample_to_own_grid_is_identity(batch, height, width, dim, mode, seed):
    tokens = _randn(seed, batch, height * width, dim)
    assert_close(
        resample_tokens(tokens, (height, width), (height, width), mode=mode), tokens, **EXACT
    )


@PROPERTY
@given(
    batch=batches,
    target=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    factor=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dim=channels,
    seed=seeds,
)
def test_resample_avg_by_exact_factor_is_block_mean(batch, target, factor, dim, seed):
    (rows, cols), (fh, fw) = target, factor
    grid = (rows * fh, cols * fw)
    tokens = _randn(seed, batch, grid[0] * grid[1], dim)
    blocks = _maps(tokens, grid).reshape(batch, dim, rows, fh, cols, fw)
    out = resample_tokens(tokens, grid, target, mode="avg")
    assert out.shape == (batch, rows * cols, dim)
    assert_close(out, _tokens(blocks.mean(dim=(3, 5))), **EPS)
    assert_close(
        resample_tokens(tokens, grid, target, mode="max"), _tokens(blocks.amax(dim=(3, 5))), **EXACT
    )


@PROPERTY
@given(batch=batches, height=sides, width=sides, dim=channels, data=st.data(), seed=seeds)
def test_resample_max_dominates_avg(batch, height, width, dim, data, seed):
    target = (
        data.draw(st.integers(1, height), label="target_height"),
        data.draw(st.integers(1, width), label="target_width"),
    )
    tokens = _randn(seed, batch, height * width, dim)
    largest = resample_tokens(tokens, (height, width), target, mode="max")
    average = resample_tokens(tokens, (height, width), target, mode="avg")
    assert largest.shape == average.shape == (batch, target[0] * target[1], dim)
    assert bool((largest >= average - 1e-6).all())


@PROPERTY
@given(
    batch=batches,
    height=sides,
    width=sides,
    target=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dim=channels,
    seed=seeds,
)
def test_resample_bilinear_matches_interpolate(batch, height, width, target, dim, seed):
    tokens = _randn(seed, batch, height * width, dim)
    expected = F.interpolate(
        _maps(tokens, (height, width)), size=target, mode="bilinear", align_corners=False
    )
    out = resample_tokens(tokens, (height, width), target)
    assert_close(out, _tokens(expected), **EXACT)
    assert_close(TokenResampler(target)(tokens, (height, width)), out, **EXACT)


def test_resample_efficient_dc_576_to_144():
    tokens = _randn(0, 2, 576, 3)
    out = resample_tokens(tokens, (24, 24), (12, 12))
    assert out.shape == (2, 144, 3)
    # Halving with align_corners=False samples exactly between two pixels: a 2x2 block mean.
    blocks = _maps(tokens, (24, 24)).reshape(2, 3, 12, 2, 12, 2).mean(dim=(3, 5))
    assert_close(out, _tokens(blocks), **EPS)


# ---------------------------------------------------------------------------- thin modules


def _layer_features(layers, batch, grid, width, seed=0):
    return {layer: _randn(seed + layer, batch, grid[0] * grid[1], width) for layer in layers}


@PROPERTY
@given(
    batch=batches,
    grid=st.tuples(st.integers(2, 6), st.integers(2, 6)),
    width=channels,
    extra=st.integers(0, 3),
    data=st.data(),
)
def test_module_bookkeeping_matches_output(batch, grid, width, extra, data):
    mode = data.draw(st.sampled_from(["raster", "grid"]), label="mode")
    limit = min(grid) if mode == "grid" else grid[0] * grid[1]
    window = data.draw(st.integers(1, limit), label="window")
    extra_layers = list(range(1, 1 + extra))
    features = _layer_features([0, *extra_layers], batch, grid, width)
    modules = [
        TokenStack(0, extra_layers, window=window, mode=mode),
        ChannelConcat(0, extra_layers),
        GroupedChannelConcat(0, [[layer] for layer in extra_layers] or [[0]]),
    ]
    for module in modules:
        out = module(features, grid)
        assert out.shape == (batch, module.num_tokens(grid), module.output_channels(width))


def test_modules_compose_the_published_integrations():
    f = _layer_features(range(25), 2, (24, 24), 3)
    sti = TokenStack(23, [7, 15], window=8, mode="raster")(f, (24, 24))
    assert_close(sti, torch.cat([f[23], pool_tokens(f[7], 8), pool_tokens(f[15], 8)], 1), **EXACT)
    assert sti.shape == (2, 720, 3)
    sci = ChannelConcat(23, [7, 15])(f, (24, 24))
    assert_close(sci, torch.cat([f[23], f[7], f[15]], -1), **EXACT)
    dci = GroupedChannelConcat(23, [range(0, 12), range(12, 24)])(f, (24, 24))
    assert_close(dci[..., :3], f[23], **EXACT)
    assert_close(dci[..., 3:6], torch.stack([f[k] for k in range(12)]).sum(0) / 12, **EXACT)
    assert_close(dci[..., 6:], torch.stack([f[k] for k in range(12, 24)]).sum(0) / 12, **EXACT)


# ---------------------------------------------------------------------------- bad input


def test_stack_refuses_different_widths():
    with pytest.raises(
        ValueError, match=re.escape("channel widths differ across fused layers ([4, 5])")
    ):
        stack([torch.zeros(1, 3, 4), torch.zeros(1, 2, 5)])


def test_concat_refuses_different_token_counts():
    with pytest.raises(
        ValueError, match=re.escape("token counts differ across fused layers ([3, 2])")
    ):
        concat([torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "non-empty sequence"),
        (torch.zeros(1, 2, 3), "non-empty sequence"),
        (
            [torch.zeros(2, 3)],
            re.escape("tensors[0] must be a [batch, tokens, channels] tensor, got (2, 3)"),
        ),
        ([torch.zeros(1, 2, 3), torch.zeros(2, 2, 3)], "different batch sizes: 1 and 2"),
    ],
)
def test_stack_and_concat_refuse_malformed_sequences(inputs, message):
    for op in (stack, concat):
        with pytest.raises(ValueError, match=message):
            op(inputs)


def test_tokens_that_do_not_form_the_grid():
    tokens = torch.zeros(1, 10, 2)
    stated = "tokens has 10 tokens, which do not form the stated grid 3x4"
    with pytest.raises(ValueError, match=stated):
        pool_tokens(tokens, 2, mode="grid", grid=(3, 4))
    with pytest.raises(ValueError, match=stated):
        resample_tokens(tokens, (3, 4), (2, 2))


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("target", [(5, 4), (4, 5)])
def test_pooling_target_larger_than_grid(mode, target):
    with pytest.raises(ValueError, match=r"pooling target \dx\d is larger than the 4x4 grid"):
        resample_tokens(torch.zeros(1, 16, 2), (4, 4), target, mode=mode)
    # bilinear may enlarge
    assert resample_tokens(torch.zeros(1, 16, 2), (4, 4), target).shape[1] == 20


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ((0, 2), ValueError),
        ((2,), ValueError),
        ((2, 2, 2), ValueError),
        ((2.0, 2), TypeError),
        ((True, 2), TypeError),
        ("2x2", TypeError),
        (None, TypeError),
    ],
)
def test_resample_bad_target(target, error):
    with pytest.raises(error, match=r"target must be a \(height, width\) pair of positive ints"):
        resample_tokens(torch.zeros(1, 4, 2), (2, 2), target)


def test_resample_unknown_mode():
    with pytest.raises(ValueError, match=r"mode must be one of .*'nearest'"):
        resample_tokens(torch.zeros(1, 4, 2), (2, 2), (1, 1), mode="nearest")
    with pytest.raises(ValueError, match="mode must be one of"):
        TokenResampler((1, 1), mode="nearest")


@pytest.mark.parametrize("window", [0, -8])
def test_pool_bad_window_value(window):
    with pytest.raises(ValueError, match=rf"^window must be a positive int, got {window}$"):
        pool_tokens(torch.zeros(1, 16, 2), window)


@pytest.mark.parametrize("window", [2.5, True, "8", None])
def test_pool_bad_window_type(window):
    with pytest.raises(TypeError, match=r"window must be a positive int, got .* \("):
        pool_tokens(torch.zeros(1, 16, 2), window)


def test_pool_window_larger_than_input():
    with pytest.raises(ValueError, match="window=17 is larger than the 16 tokens it pools"):
        pool_tokens(torch.zeros(1, 16, 2), 17)
    with pytest.raises(ValueError, match="window=3 is larger than the 2x8 grid it pools"):
        pool_tokens(torch.zeros(1, 16, 2), 3, mode="grid", grid=(2, 8))


def test_pool_bad_mode_or_missing_grid():
    with pytest.raises(ValueError, match=r"mode='grid' needs grid=\(height, width\)"):
        pool_tokens(torch.zeros(1, 16, 2), 2, mode="grid")
    with pytest.raises(ValueError, match=r"mode must be one of \('raster', 'grid'\), got 'cube'"):
        pool_tokens(torch.zeros(1, 16, 2), 2, mode="cube")


def test_grouped_average_empty_group():
    features = _layer_features(range(3), 1, (2, 2), 2)
    with pytest.raises(ValueError, match=r"groups\[1\] is empty"):
        grouped_average(features, [[0, 1], []])


def test_missing_layer_lists_available_layers():
    features = _layer_features(range(3), 1, (2, 2), 2)
    message = re.escape(
        "features are missing layer 5, which the connector needs; they hold layers [0, 1, 2]"
    )
    with pytest.raises(ValueError, match=message):
        grouped_average(features, [[0, 5]])
    with pytest.raises(ValueError, match=message):
        ChannelConcat(0, [5])(features, (2, 2))
    with pytest.raises(ValueError, match=message):
        TokenStack(5, [0], window=2, mode="raster")(features, (2, 2))


def test_grouped_average_refuses_mixed_shapes():
    features = {0: torch.zeros(1, 4, 2), 1: torch.zeros(1, 4, 3)}
    with pytest.raises(
        ValueError,
        match=re.escape("groups[0] mixes layers of different shapes: [(1, 4, 2), (1, 4, 3)]"),
    ):
        grouped_average(features, [[0, 1]])
