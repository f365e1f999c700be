"""Token resampling: resize a token grid to another grid (the efficient Dense Connector).

The paper's efficient Dense Connector resizes the fused 24x24 grid to 12x12 (576 -> 144 tokens)
with 2-D bilinear interpolation (``align_corners=False``) and trains with it in place. Average and
max pooling to the target grid are offered too; :class:`TokenResampler` is the module form used by
:class:`mmconnect.DenseConnector`, before or after the projector.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect.features import check_grid

ResampleMode = Literal["bilinear", "avg", "max"]
RESAMPLE_MODES: tuple[str, ...] = ("bilinear", "avg", "max")


def check_target_grid(target: tuple[int, int], *, argument: str = "target") -> tuple[int, int]:
    """Validate a ``(height, width)`` target grid of positive ints and return it as a tuple."""
    if (
        not isinstance(target, tuple | list)
        or len(target) != 2
        or any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in target)
    ):
        raise ValueError(
            f"{argument} must be a (height, width) pair of positive ints, got {target!r}"
        )
    return int(target[0]), int(target[1])


def resample_tokens(
    tokens: Tensor,
    grid: tuple[int, int],
    target: tuple[int, int],
    *,
    mode: ResampleMode = "bilinear",
) -> Tensor:
    """Resize a token grid: ``[B, h*w, C] -> [B, th*tw, C]``, raster order in and out.

    Args:
        tokens: ``[B, h*w, C]`` tokens in raster (row-major) order.
        grid: ``(h, w)``, the grid the tokens form (non-square grids are fine).
        target: ``(th, tw)``, the grid to produce.
        mode: ``"bilinear"`` (``align_corners=False``, as the efficient Dense Connector),
            ``"avg"`` or ``"max"`` (adaptive pooling; the target may not exceed the grid).

    Raises:
        ValueError: the tokens do not form ``grid``, a pooling target is larger than the grid,
            or ``mode`` is unknown.
    """
    check_grid(tokens, grid, argument="tokens")
    height, width = grid
    target_height, target_width = check_target_grid(target)
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
    if mode != "bilinear" and (target_height > height or target_width > width):
        raise ValueError(
            f"pooling target {target_height}x{target_width} is larger than the {height}x{width} "
            "grid; pooling can only shrink a grid (use mode='bilinear' to enlarge)"
        )
    if (target_height, target_width) == (height, width):
        return tokens
    maps = rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
    if mode == "bilinear":
        maps = F.interpolate(
            maps, size=(target_height, target_width), mode="bilinear", align_corners=False
        )
    elif mode == "avg":
        maps = F.adaptive_avg_pool2d(maps, (target_height, target_width))
    else:
        maps = F.adaptive_max_pool2d(maps, (target_height, target_width))
    return rearrange(maps, "b c h w -> b (h w) c")


class TokenResampler(nn.Module):
    """Module form of :func:`resample_tokens` with a fixed target grid and mode."""

    def __init__(self, target: tuple[int, int], mode: ResampleMode = "bilinear") -> None:
        super().__init__()
        self.target = check_target_grid(target)
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, C] -> [B, th*tw, C]``."""
        return resample_tokens(tokens, grid, self.target, mode=self.mode)

    def extra_repr(self) -> str:
        return f"target={self.target}, mode={self.mode!r}"
