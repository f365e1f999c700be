"""Training-free video (FreeVA): frame sampling, temporal pooling and visual-token budgets.

An image MLLM answers questions about a video without video training: sample ``T`` frames,
send each through the normal image path (tower -> tap -> Dense Connector -> projector), pool the
frames' tokens over time and put them all where one ``<image>`` placeholder stands.

* :func:`sample_frame_indices` picks the frames exactly as FreeVA does (see docs/video.md, Frame sampling):
  ``T = min(total_frames, num_frames)``, ``seg = (total_frames - 1) / T`` and frame ``i`` is
  ``(round(seg * i) + round(seg * (i + 1))) // 2`` with round-half-to-even. Asking for more frames
  than the video has is not an error: ``T`` is clamped to the video's length.
* :func:`pool_frames` aggregates the projected tokens of the frames, ``[T, N, C] -> [1, M, C]``,
  in one of five published ways (:data:`POOLINGS`):

  ============= ============================================================ ===================
  pooling       what it does                                                 tokens (24x24 grid)
  ============= ============================================================ ===================
  ``concat``    FreeVA: all frames' tokens, frame after frame                ``T * 576``
  ``maxpool1d`` Dense Connector video: 1-D max-pool (window 2, stride 2)     ``T * 288``
                over each frame's raster token sequence, then concat
  ``mean``      average over the frames, token by token                      ``576``
  ``avgpool2d`` LLaVA-NeXT-Video: 2-D average pool, stride 2, on each         ``T * 144``
                frame's grid (``floor(h/2) x floor(w/2)``)
  ``bilinear``  LLaVA-OneVision: each frame's grid resized bilinearly to      ``T * 144``
                ``ceil(h/2) x ceil(w/2)`` (27x27 -> 14x14 = 196 for SigLIP)
  ============= ============================================================ ===================

* :func:`count_video_tokens` gives those counts without running anything, and
  :func:`plan_video_tokens` picks the number of frames and the pooling that fit a maximum number
  of visual tokens.

Everything here works on tensors; decoding video files lives in
:mod:`mmconnect.integrations.chat.video_io` (PyAV), the LLaVA chat path in
:mod:`mmconnect.integrations.chat.answering`.

Example:
    >>> sample_frame_indices(100, 8)
    [6, 18, 31, 43, 56, 68, 80, 93]
    >>> count_video_tokens(8, 576, "maxpool1d")
    2304
    >>> plan_video_tokens(2304, tokens_per_frame=576, grid=(24, 24))
    VideoPlan(num_frames=8, pooling='maxpool1d', num_tokens=2304)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from mmconnect.resample import resample_tokens
from mmconnect.validation import check_choice, check_int_pair, check_positive_int

Pooling = Literal["concat", "maxpool1d", "mean", "avgpool2d", "bilinear"]
#: Every temporal pooling :func:`pool_frames` knows.
POOLINGS: tuple[str, ...] = ("concat", "maxpool1d", "mean", "avgpool2d", "bilinear")
#: The poolings that need each frame's tokens to form a ``(height, width)`` grid.
GRID_POOLINGS: tuple[str, ...] = ("avgpool2d", "bilinear")
#: :func:`plan_video_tokens`' default preference order: no loss first, then the per-frame poolers
#: from the one that keeps most tokens to the one that keeps fewest. ``mean`` is left out because
#: it merges the frames (the order of events is lost); pass it explicitly to allow it.
PLAN_POOLINGS: tuple[str, ...] = ("concat", "maxpool1d", "bilinear", "avgpool2d")


# ---------------------------------------------------------------------------- checks


def _check_pooling(pooling: object) -> str:
    return check_choice(pooling, "pooling", POOLINGS)


def _check_frame_grid(grid: object, tokens_per_frame: int) -> tuple[int, int] | None:
    if grid is None:
        return None
    height, width = check_int_pair(grid, "grid", hint="or None when the frame tokens form no grid")
    if height * width != tokens_per_frame:
        raise ValueError(
            f"grid {height}x{width} holds {height * width} tokens but each frame has "
            f"{tokens_per_frame}; pass grid=None when the tokens form no grid (e.g. STI, whose "
            "pooled tokens follow the grid)"
        )
    return height, width


def _inapplicable(pooling: str, tokens_per_frame: int, grid: tuple[int, int] | None) -> str | None:
    """Why ``pooling`` cannot pool frames of this layout, or ``None`` when it can."""
    if pooling == "maxpool1d" and tokens_per_frame < 2:
        return f"maxpool1d needs at least 2 tokens per frame, got {tokens_per_frame}"
    if pooling in GRID_POOLINGS:
        if grid is None:
            return (
                f"{pooling} pools each frame's 2-D token grid, but the frame tokens form no grid "
                "(e.g. STI appends pooled tokens after the grid); use concat, maxpool1d or mean"
            )
        if pooling == "avgpool2d" and min(grid) < 2:
            return f"avgpool2d needs a grid of at least 2x2, got {grid[0]}x{grid[1]}"
    return None


# ---------------------------------------------------------------------------- frame sampling


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """FreeVA's frame indices: the midpoints of ``T`` equal segments (docs/video.md, Frame sampling).

    ``T = min(total_frames, num_frames)``, ``seg = (total_frames - 1) / T``; frame ``i`` is
    ``(round(seg * i) + round(seg * (i + 1))) // 2``, rounding half to even (as ``numpy.round``;
    Python's ``round`` on a float does the same). Indices are ascending but may repeat when ``T``
    is close to ``total_frames`` (the reference rule; e.g. 5 of 5 frames gives ``[0, 1, 2, 2, 3]``).

    Args:
        total_frames: frames in the video (at least 1).
        num_frames: frames wanted (at least 1). More than the video has is clamped to
            ``total_frames``: a short video gives fewer indices, never an error.

    Returns:
        ``T`` frame indices in ``0 .. total_frames - 1``.

    Raises:
        ValueError: ``total_frames`` or ``num_frames`` is below 1 (an empty video; no frames
            requested).
        TypeError: either is not an int.
    """
    total_frames = check_positive_int(total_frames, "total_frames", hint="frames in the video")
    num_frames = check_positive_int(num_frames, "num_frames")
    count = min(total_frames, num_frames)
    segment = float(total_frames - 1) / count
    return [(round(segment * i) + round(segment * (i + 1))) // 2 for i in range(count)]


# ---------------------------------------------------------------------------- token counts


def pooled_frame_tokens(
    pooling: Pooling, tokens_per_frame: int, grid: tuple[int, int] | None = None
) -> int:
    """Tokens one frame keeps after ``pooling`` (``mean`` keeps all of them, merged over frames).

    Args:
        pooling: one of :data:`POOLINGS`.
        tokens_per_frame: the connector's output tokens per frame.
        grid: ``(height, width)`` of those tokens (needed by ``avgpool2d`` and ``bilinear``);
            ``None`` when they form no grid.

    Raises:
        ValueError: unknown pooling, a grid that does not hold ``tokens_per_frame`` tokens, or a
            pooling that cannot apply (a grid pooling without a grid, ``maxpool1d`` on one token).
        TypeError: ``tokens_per_frame`` is not an int, or ``grid`` is not a pair of ints.
    """
    pooling = _check_pooling(pooling)
    tokens_per_frame = check_positive_int(tokens_per_frame, "tokens_per_frame")
    grid = _check_frame_grid(grid, tokens_per_frame)
    reason = _inapplicable(pooling, tokens_per_frame, grid)
    if reason is not None:
        raise ValueError(reason)
    if pooling in ("concat", "mean"):
        return tokens_per_frame
    if pooling == "maxpool1d":
        return tokens_per_frame // 2
    height, width = grid
    if pooling == "avgpool2d":
        return (height // 2) * (width // 2)
    return math.ceil(height / 2) * math.ceil(width / 2)


def count_video_tokens(
    num_frames: int,
    tokens_per_frame: int,
    pooling: Pooling,
    grid: tuple[int, int] | None = None,
) -> int:
    """The visual tokens of ``num_frames`` frames after ``pooling`` (what :func:`pool_frames`
    returns), without running anything.

    ``concat``: ``T * N``; ``maxpool1d``: ``T * (N // 2)``; ``mean``: ``N``; ``avgpool2d``:
    ``T * (h // 2) * (w // 2)``; ``bilinear``: ``T * ceil(h / 2) * ceil(w / 2)``.

    Raises:
        ValueError: as :func:`pooled_frame_tokens`, or ``num_frames`` below 1.
        TypeError: as :func:`pooled_frame_tokens`, or ``num_frames`` is not an int.
    """
    num_frames = check_positive_int(num_frames, "num_frames")
    per_frame = pooled_frame_tokens(pooling, tokens_per_frame, grid)
    return per_frame if pooling == "mean" else num_frames * per_frame


# ---------------------------------------------------------------------------- pooling


def pool_frames(
    frame_tokens: Tensor, pooling: Pooling = "concat", grid: tuple[int, int] | None = None
) -> Tensor:
    """Aggregate the projected tokens of a video's frames into one token sequence.

    Args:
        frame_tokens: ``[T, N, C]``, frame ``t``'s ``N`` tokens in raster order (the connector's
            output for each frame, in time order).
        pooling: one of :data:`POOLINGS` (see the module docstring).
        grid: ``(h, w)`` with ``h * w == N``, needed by ``avgpool2d`` and ``bilinear``.

    Returns:
        ``[1, count_video_tokens(T, N, pooling, grid), C]``; frames stay in time order.

    Raises:
        ValueError: ``frame_tokens`` is not ``[T, N, C]`` with ``T >= 1``, or as
            :func:`pooled_frame_tokens`.
    """
    if frame_tokens.dim() != 3:
        raise ValueError(
            f"frame_tokens must be [frames, tokens, channels], got shape {tuple(frame_tokens.shape)}"
        )
    frames, tokens, _ = frame_tokens.shape
    if frames < 1 or tokens < 1:
        raise ValueError(
            f"frame_tokens must hold at least one frame of at least one token, got shape "
            f"{tuple(frame_tokens.shape)}"
        )
    pooling = _check_pooling(pooling)
    pooled_frame_tokens(pooling, tokens, grid)  # validates the grid and the pooling's needs
    if pooling == "concat":
        return rearrange(frame_tokens, "t n c -> 1 (t n) c")
    if pooling == "mean":
        return frame_tokens.mean(dim=0, keepdim=True)
    if pooling == "maxpool1d":
        pooled = F.max_pool1d(rearrange(frame_tokens, "t n c -> t c n"), kernel_size=2, stride=2)
        return rearrange(pooled, "t c n -> 1 (t n) c")
    height, width = grid
    if pooling == "avgpool2d":
        maps = rearrange(frame_tokens, "t (h w) c -> t c h w", h=height, w=width)
        pooled = F.avg_pool2d(maps, kernel_size=2, stride=2)
        return rearrange(pooled, "t c h w -> 1 (t h w) c")
    target = (math.ceil(height / 2), math.ceil(width / 2))
    resized = resample_tokens(frame_tokens, (height, width), target, mode="bilinear")
    return rearrange(resized, "t n c -> 1 (t n) c")


# ---------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class VideoPlan:
    """What :func:`plan_video_tokens` chose.

    Attributes:
        num_frames: frames to sample (``sample_frame_indices(total, num_frames)``).
        pooling: the temporal pooling.
        num_tokens: the visual tokens this gives (at most the budget).
    """

    num_frames: int
    pooling: str
    num_tokens: int


def plan_video_tokens(
    max_tokens: int,
    *,
    tokens_per_frame: int,
    grid: tuple[int, int] | None = None,
    max_frames: int = 8,
    total_frames: int | None = None,
    poolings: Sequence[str] = PLAN_POOLINGS,
) -> VideoPlan:
    """Pick the number of frames and the pooling that fit ``max_tokens`` visual tokens.

    Rule: temporal coverage first, then detail. Start from ``T = min(max_frames, total_frames)``
    frames (the same clamp as :func:`sample_frame_indices`); at each ``T``, from the most down to
    one, take the first pooling of ``poolings`` (a preference order; default
    :data:`PLAN_POOLINGS`: ``concat``, ``maxpool1d``, ``bilinear``, ``avgpool2d``, i.e. least lossy
    first) whose :func:`count_video_tokens` fits. Poolings that cannot apply to the frame layout
    (grid poolings without a grid) are skipped. With the defaults, 8 frames of CLIP-L's 576 tokens
    under a budget of 2304 give ``maxpool1d`` (the Dense Connector video setting); ``mean``, when
    listed, fits every ``T`` with ``N`` tokens.

    Args:
        max_tokens: the most visual tokens the video may take (e.g. the LLM's context minus the
            text).
        tokens_per_frame: the connector's output tokens per frame.
        grid: ``(h, w)`` of those tokens, or ``None`` when they form no grid (STI).
        max_frames: the most frames to sample.
        total_frames: frames in the video, if known (clamps ``max_frames``).
        poolings: the poolings allowed, in order of preference (one name: only that pooling).

    Raises:
        ValueError: even one frame does not fit ``max_tokens`` with any allowed pooling (the
            message gives the smallest count possible), no allowed pooling applies, or a bad
            argument (named).
        TypeError: a count that is not an int, or a grid that is not a pair of ints.
    """
    max_tokens = check_positive_int(max_tokens, "max_tokens")
    tokens_per_frame = check_positive_int(tokens_per_frame, "tokens_per_frame")
    grid = _check_frame_grid(grid, tokens_per_frame)
    frames = check_positive_int(max_frames, "max_frames")
    if total_frames is not None:
        frames = min(frames, check_positive_int(total_frames, "total_frames"))
    if isinstance(poolings, str):
        poolings = (poolings,)
    poolings = tuple(_check_pooling(pooling) for pooling in poolings)
    if not poolings:
        raise ValueError(f"poolings must name at least one of {POOLINGS}, got none")
    usable = [p for p in poolings if _inapplicable(p, tokens_per_frame, grid) is None]
    if not usable:
        reasons = "; ".join(str(_inapplicable(p, tokens_per_frame, grid)) for p in poolings)
        raise ValueError(f"no allowed pooling applies to these frames: {reasons}")
    for count in range(frames, 0, -1):
        for pooling in usable:
            tokens = count_video_tokens(count, tokens_per_frame, pooling, grid)
            if tokens <= max_tokens:
                return VideoPlan(num_frames=count, pooling=pooling, num_tokens=tokens)
    smallest = min(usable, key=lambda p: count_video_tokens(1, tokens_per_frame, p, grid))
    layout = f" on a {grid[0]}x{grid[1]} grid" if grid is not None else ""
    raise ValueError(
        f"max_tokens={max_tokens} is too small for even one frame: a frame has "
        f"{tokens_per_frame} tokens{layout} and the fewest any allowed pooling keeps is "
        f"{count_video_tokens(1, tokens_per_frame, smallest, grid)} ({smallest}); raise the "
        f"budget, allow another pooling (allowed: {', '.join(poolings)}) or use a connector with "
        "fewer tokens per image (e.g. the efficient Dense Connector)"
    )
