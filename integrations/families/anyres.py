"""LLaVA-NeXT AnyRes bookkeeping for any connector: tile selection, token counts, packing.

An AnyRes image is ``[base, tile_00, tile_01, ...]``: the base is the image resized to the tile
size, the tiles cover the best-fitting pinpoint resolution in row-major order. Every crop goes
through tower -> Dense Connector independently (the official Dense Connector AnyRes path). The
connector's leading ``h x w`` tokens per crop form a grid (the encoder grid, or the resample target
for the efficient Dense Connector); the tiles' grids are stitched, the padding is cropped back to
the image's aspect ratio, and a learned newline token ends each row. STI's pooled tokens form no
grid: they are appended after packing, base first, then the tiles in row-major order.

Token count: ``h*w + H'*(W'+1) + extra * (1 + tiles)`` where ``H' x W'`` is the unpadded map
(672x672 -> 2928, 1920x1080 -> 1948 for a 24x24 grid; see docs/llava-next.md, Token bookkeeping).

LLaVA-OneVision's ``anyres_max_N`` (``max_crops=N``) caps the unpadded map: when it holds more
than about ``N`` crops' worth of tokens (``ratio = sqrt(H'*W' / (N*h*w)) > 1.1``) it is resized
bilinearly to ``floor(H' / ratio) x floor(W' / ratio)`` before the newline tokens are added
(:func:`capped_size`; see docs/llava-onevision.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.validation import check_int_pair, check_sequence


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int) -> None:
    """Raise a clear error unless every ``(height, width)`` pinpoint is a multiple of the tile.

    Raises:
        TypeError: ``pinpoints`` is not a list of pairs of ints.
        ValueError: no pinpoint, or a pinpoint that is not two positive multiples of the tile.
    """
    check_sequence(pinpoints, "image_grid_pinpoints", of="(height, width) pairs")
    if not pinpoints:
        raise ValueError(
            f"image_grid_pinpoints must be a non-empty list of (height, width) pairs, got {pinpoints!r}"
        )
    for position, pinpoint in enumerate(pinpoints):
        argument = f"image_grid_pinpoints[{position}]"
        hint = f"pinpoints are positive multiples of the tile size {tile_size}"
        sides = check_int_pair(_shown(pinpoint), argument, hint=hint)
        if any(side % tile_size for side in sides):
            raise ValueError(
                f"{argument}={_shown(pinpoint)} is not a (height, width) pair of positive "
                f"multiples of the tile size {tile_size}"
            )


def check_image_size(image_size: object, argument: str = "image_size") -> tuple[int, int]:
    """An image's original ``(height, width)`` in pixels as two positive ints.

    Args:
        image_size: a pair (list, tuple, or a tensor row of ``image_sizes``).
        argument: how the message names it (e.g. ``"image_sizes[1]"``).

    Raises:
        TypeError: not a pair of ints.
        ValueError: a side below 1 (``(0, 0)`` would divide by zero in the tile choice, a
            negative side has no best resolution), or not two sides.
    """
    values = image_size.tolist() if hasattr(image_size, "tolist") else image_size
    return check_int_pair(
        _shown(values),
        argument,
        hint="the original image size in pixels, as the processor's image_sizes",
    )


def check_image_sizes(image_sizes: object) -> list[tuple[int, int]]:
    """Every row of ``image_sizes`` (``[images, 2]``) checked with :func:`check_image_size`.

    Raises:
        TypeError: ``image_sizes`` is not a sequence, or a row is not a pair of ints (named).
        ValueError: a row with a side below 1 or not two sides (named), or no row.
    """
    rows = image_sizes.tolist() if hasattr(image_sizes, "tolist") else image_sizes
    check_sequence(rows, "image_sizes", of="original (height, width) sizes, one per image")
    if not rows:
        raise ValueError(
            f"image_sizes must hold one original (height, width) per image ([images, 2]), got "
            f"{rows!r}"
        )
    return [check_image_size(row, f"image_sizes[{index}]") for index, row in enumerate(rows)]


def _shown(pinpoint: object) -> object:
    return list(pinpoint) if isinstance(pinpoint, Sequence) else pinpoint


def tile_grid(
    image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int
) -> tuple[int, int]:
    """``(rows, columns)`` of tiles for an image of ``(height, width)`` pixels.

    Raises:
        ValueError: a pinpoint is not a ``(height, width)`` pair of multiples of ``tile_size``,
            or ``image_size`` is not two positive ints.
    """
    check_pinpoints(pinpoints, tile_size)
    image_height, image_width = check_image_size(image_size)
    height, width = select_best_resolution(
        [image_height, image_width], [list(p) for p in pinpoints]
    )
    return height // tile_size, width // tile_size


def crop_layout(
    connector: DenseConnector | ConnectorConfig, encoder_grid: tuple[int, int]
) -> tuple[tuple[int, int], int]:
    """The grid of each crop's leading tokens and how many extra (STI) tokens follow it.

    Needs only the connector's config: processors count tokens without building a connector.
    """
    config = connector.config if isinstance(connector, DenseConnector) else connector
    return config.token_grid(encoder_grid), config.extra_tokens(encoder_grid)


def unpadded_size(stitched: tuple[int, int], image_size: Sequence[int]) -> tuple[int, int]:
    """The map size after cropping the padding of a ``stitched`` ``(H, W)`` map (HF's rule)."""
    return tuple(
        unpad_image(torch.empty(0, *stitched), [int(image_size[0]), int(image_size[1])]).shape[1:]
    )


#: ``anyres_max_N`` resizes the unpadded map only when it exceeds ``N`` crops' tokens by more
#: than this factor in each side (``ratio > 1.1``), as LLaVA-OneVision does.
CAP_TOLERANCE = 1.1


def check_anyres_max(vision_aspect_ratio: object) -> int:
    """``N`` of an ``"anyres_max_N"`` aspect-ratio setting (LLaVA-OneVision's ``vision_aspect_ratio``).

    Raises:
        ValueError: not a string ``"anyres_max_N"`` with ``N`` a positive integer.
    """
    match = (
        re.fullmatch(r"anyres_max_([1-9][0-9]*)", vision_aspect_ratio)
        if isinstance(vision_aspect_ratio, str)
        else None
    )
    if match is None:
        raise ValueError(
            f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported; expected "
            "'anyres_max_N' with N a positive integer (LLaVA-OneVision: 'anyres_max_9')"
        )
    return int(match.group(1))


def capped_size(
    size: tuple[int, int], crop_grid: tuple[int, int], max_crops: int | None
) -> tuple[int, int]:
    """The ``(H, W)`` an unpadded map of ``size`` keeps under ``anyres_max_{max_crops}``.

    ``ratio = sqrt(H*W / (max_crops * h*w))`` with ``(h, w)`` the grid of one crop; when
    ``ratio > 1.1`` the map shrinks to ``(floor(H / ratio), floor(W / ratio))``, else it stays.
    ``max_crops=None`` (LLaVA-NeXT) never caps.
    """
    if max_crops is None:
        return size
    height, width = size
    ratio = math.sqrt(height * width / (max_crops * crop_grid[0] * crop_grid[1]))
    if ratio > CAP_TOLERANCE:
        return int(height // ratio), int(width // ratio)
    return size


def anyres_token_count(
    connector: DenseConnector | ConnectorConfig,
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    encoder_grid: tuple[int, int],
    *,
    max_crops: int | None = None,
) -> int:
    """Visual tokens one AnyRes image of ``image_size = (height, width)`` pixels fills.

    ``max_crops``: LLaVA-OneVision's ``anyres_max_N`` cap on the unpadded map
    (:func:`capped_size`); ``None`` for LLaVA-NeXT.
    """
    (height, width), extra = crop_layout(connector, encoder_grid)
    rows, columns = tile_grid(image_size, pinpoints, tile_size)
    map_size = unpadded_size((rows * height, columns * width), image_size)
    map_height, map_width = capped_size(map_size, (height, width), max_crops)
    return height * width + map_height * (map_width + 1) + extra * (1 + rows * columns)


def pack_anyres(
    crop_tokens: Tensor,
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    grid: tuple[int, int],
    newline: Tensor,
    *,
    max_crops: int | None = None,
) -> Tensor:
    """Pack one image's crops into its LLM token sequence.

    Args:
        crop_tokens: ``[1 + tiles, h*w + extra, D]``, the connector output of base and tiles.
        image_size: the original ``(height, width)`` in pixels.
        pinpoints: the AnyRes ``(height, width)`` resolutions.
        tile_size: the tower's image size.
        grid: ``(h, w)``, the grid of each crop's leading tokens.
        newline: ``[D]``, the learned row terminator.
        max_crops: LLaVA-OneVision's ``anyres_max_N``: the unpadded map is resized bilinearly
            (``align_corners=False``) to :func:`capped_size` before the newlines; ``None``
            (LLaVA-NeXT) keeps it.

    Returns:
        ``[h*w + H'*(W'+1) + extra*(1 + tiles), D]``.
    """
    height, width = grid
    rows, columns = tile_grid(image_size, pinpoints, tile_size)
    if crop_tokens.shape[0] != 1 + rows * columns:
        raise ValueError(
            f"an image of size {list(image_size)} needs 1 + {rows}x{columns} crops, got {crop_tokens.shape[0]}"
        )
    grid_tokens, extra_tokens = crop_tokens[:, : height * width], crop_tokens[:, height * width :]
    stitched = rearrange(
        grid_tokens[1:],
        "(gh gw) (h w) d -> d (gh h) (gw w)",
        gh=rows,
        gw=columns,
        h=height,
        w=width,
    )
    stitched = unpad_image(stitched, [int(image_size[0]), int(image_size[1])])
    capped = capped_size(tuple(stitched.shape[1:]), grid, max_crops)
    if capped != tuple(stitched.shape[1:]):
        stitched = F.interpolate(stitched[None], size=capped, mode="bilinear")[0]
    newlines = newline.to(stitched)[:, None, None].expand(-1, stitched.shape[1], 1)
    rows_with_newlines = rearrange(torch.cat([stitched, newlines], dim=-1), "d h w -> (h w) d")
    parts = [grid_tokens[0], rows_with_newlines]
    if extra_tokens.shape[1]:
        parts.append(rearrange(extra_tokens, "crops n d -> (crops n) d"))
    return torch.cat(parts, dim=0)
