"""Token resampling: resize a token grid to another grid (the efficient Dense Connector).

The paper's efficient Dense Connector resizes the fused 24x24 grid to 12x12 (576 -> 144 tokens)
with 2-D bilinear interpolation (``align_corners=False``) and trains with it in place. Average and
max pooling to the target grid are offered too; :class:`TokenResampler` is the module form used by
:class:`mmconnect.DenseConnector`, before or after the projector.

A connector's resampling is described by a :class:`ResampleSpec` (target grid, mode, placement),
``ConnectorConfig.resample``. The modes form a registry (:class:`ResampleSpec` accepts every
registered name): :func:`register_resampler` adds one as a function on ``[B, C, h, w]`` maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect.features import check_grid
from mmconnect.registry import Registry
from mmconnect.validation import check_choice, check_int_pair

#: A registered resample mode name (``"bilinear"``, ``"avg"``, ``"max"`` or a user's).
ResampleMode = str
#: ``resize(maps, (th, tw))``: ``[B, C, h, w] -> [B, C, th, tw]``.
ResizeFn = Callable[[Tensor, tuple[int, int]], Tensor]


@dataclass(frozen=True)
class _Resampler:
    resize: ResizeFn
    enlarges: bool  # pooling modes can only shrink a grid


# Insertion order is the listing order (the paper's bilinear first).
_RESAMPLERS: Registry[_Resampler] = Registry(
    "resample mode", describe=lambda entry: repr(entry.resize)
)


def register_resampler(name: str, resize: ResizeFn, *, enlarges: bool = False) -> None:
    """Register a resample mode: ``resize(maps, (th, tw))`` maps ``[B, C, h, w]`` to
    ``[B, C, th, tw]``.

    Args:
        name: the exact ``resample_mode`` name configs use.
        resize: the resizing function; it receives the raster-ordered tokens as ``[B, C, h, w]``.
        enlarges: whether the mode may produce a grid larger than its input (interpolation can,
            pooling cannot: such targets are refused with a clear error).

    Raises:
        ValueError: ``name`` is empty or already registered (registries never silently replace).
        TypeError: ``resize`` is not callable.
    """
    _RESAMPLERS.check_available(name)
    if not callable(resize):
        raise TypeError(f"resize must be callable, got {type(resize).__name__}")
    _RESAMPLERS.register(name, _Resampler(resize, bool(enlarges)))


def list_resamplers() -> list[str]:
    """The registered resample mode names: ``bilinear``, ``avg``, ``max``, then user modes in
    registration order."""
    return _RESAMPLERS.names()


def check_resample_mode(mode: str, *, argument: str = "mode") -> str:
    """``mode`` if it is a registered resample mode, else a ``ValueError`` listing them."""
    if not isinstance(mode, str) or mode not in _RESAMPLERS:
        raise ValueError(f"{argument} must be one of {tuple(_RESAMPLERS.names())}, got {mode!r}")
    return mode


register_resampler(
    "bilinear",
    partial(F.interpolate, mode="bilinear", align_corners=False),
    enlarges=True,
)
register_resampler("avg", F.adaptive_avg_pool2d)
register_resampler("max", F.adaptive_max_pool2d)


#: Where the resampler runs: on the fused features (cheaper) or on the projected tokens.
PLACEMENTS: tuple[str, ...] = ("before_projector", "after_projector")


@dataclass(frozen=True, kw_only=True)
class ResampleSpec:
    """How a connector resizes its fused token grid (the efficient Dense Connector).

    Attributes:
        grid: ``(height, width)`` the fused token grid is resized to (``(12, 12)``: 576 -> 144).
        mode: ``"bilinear"`` (the paper), ``"avg"``, ``"max"`` or a mode added with
            :func:`register_resampler`.
        placement: ``"before_projector"`` (on the fused features, cheaper; default) or
            ``"after_projector"`` (on the projected tokens).

    Examples:
        >>> ResampleSpec(grid=[12, 12]).to_dict()
        {'grid': [12, 12], 'mode': 'bilinear', 'placement': 'before_projector'}
    """

    grid: tuple[int, int]
    mode: ResampleMode = "bilinear"
    placement: Literal["before_projector", "after_projector"] = "before_projector"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", check_int_pair(self.grid, "grid"))
        try:
            check_resample_mode(self.mode, argument="mode")
        except ValueError as error:
            raise ValueError(
                f"{error}; a new mode is registered with mmconnect.register_resampler first"
            ) from None
        check_choice(self.placement, "placement", PLACEMENTS)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the grid as a list)."""
        return {"grid": list(self.grid), "mode": self.mode, "placement": self.placement}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResampleSpec:
        """A spec from :meth:`to_dict` output.

        Raises:
            ValueError: unknown keys (the message lists the known ones) or bad values.
            TypeError: ``data`` is not a mapping.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a resample spec must be a mapping or null, got {type(data).__name__}")
        known = ("grid", "mode", "placement")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown resample keys {unknown}; known keys: {list(known)}")
        if "grid" not in data:
            raise ValueError(f"a resample spec needs a 'grid' key, got keys {sorted(data)}")
        return cls(**data)


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
            ``"avg"`` or ``"max"`` (adaptive pooling; the target may not exceed the grid), or a
            mode added with :func:`register_resampler`.

    Raises:
        TypeError: ``target`` is not a pair of ints.
        ValueError: the tokens do not form ``grid``, a pooling target is larger than the grid,
            a side of ``target`` is below 1, or ``mode`` is unknown.
    """
    check_grid(tokens, grid, argument="tokens")
    height, width = grid
    target_height, target_width = check_int_pair(target, "target")
    resampler = _RESAMPLERS[check_resample_mode(mode)]
    _check_reachable(mode, grid, (target_height, target_width))
    if (target_height, target_width) == (height, width):
        return tokens
    maps = rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)
    maps = resampler.resize(maps, (target_height, target_width))
    if tuple(maps.shape[-2:]) != (target_height, target_width):
        raise RuntimeError(
            f"resample mode {mode!r} returned a {tuple(maps.shape[-2:])} grid, "
            f"{(target_height, target_width)} was asked for"
        )
    return rearrange(maps, "b c h w -> b (h w) c")


def _check_reachable(mode: str, grid: tuple[int, int], target: tuple[int, int]) -> None:
    if not _RESAMPLERS[mode].enlarges and (target[0] > grid[0] or target[1] > grid[1]):
        raise ValueError(
            f"pooling target {target[0]}x{target[1]} is larger than the {grid[0]}x{grid[1]} "
            f"grid; mode {mode!r} can only shrink a grid (use mode='bilinear' to enlarge)"
        )


class TokenResampler(nn.Module):
    """Module form of :func:`resample_tokens` with a fixed target grid and mode.

    Token contract: any input grid -> the target grid (``num_tokens`` is its area).
    """

    def __init__(self, target: tuple[int, int], mode: ResampleMode = "bilinear") -> None:
        super().__init__()
        self.target = check_int_pair(target, "target")
        self.mode = check_resample_mode(mode)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """Output token count for an input grid: the target's area."""
        height, width = self.output_grid(grid)
        return height * width

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The output grid for an input grid: the target.

        Raises:
            ValueError: a pooling mode would have to enlarge ``grid`` (as :meth:`forward` would).
        """
        _check_reachable(self.mode, grid, self.target)
        return self.target

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, C] -> [B, th*tw, C]``."""
        return resample_tokens(tokens, grid, self.target, mode=self.mode)

    def extra_repr(self) -> str:
        return f"target={self.target}, mode={self.mode!r}"
