"""The Qwen2-VL family's packed image tokens, laid out for a Dense Connector.

The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers take every image (and every video) of a call
as ONE packed sequence of patch tokens: ``pixel_values`` is ``[sum(t*h*w), 3*T*P*P]`` (flattened
``T x P x P`` patches, ``T`` frames per temporal patch) and ``grid_thw`` ``[images, 3]`` says
each image's ``(t, h, w)`` in patches; attention stays within each image through ``cu_seqlens``.
A tap on such a tower captures ``[1, seq, C]`` per layer (:class:`mmconnect.MultiLayerFeatureTap`).
Three token orders matter:

* **processor order** — per image, per temporal slice ``0 .. t-1``, merge-unit-major: the
  processor writes each ``m x m`` block of neighbouring patches (``m = spatial_merge_size``)
  contiguously, blocks in raster order over the ``(h/m, w/m)`` block grid, patches row-major
  inside a block, i.e. ``(t, h/m, w/m, m, m)``;
* **block order** — what the tower's blocks see. Qwen2.5-VL permutes the merge units of each
  image into attention windows before its first block (``window_index``, from HF's
  ``transformers.vision_utils.get_vision_window_index``: unit ``u`` of block order is unit
  ``window_index[u]`` of processor order; windows never cross images or temporal slices).
  Qwen2-VL and Qwen3-VL keep processor order (``window_index=None``);
* **raster order** — what every fusion and zoo connector takes: per temporal slice, the
  ``h x w`` patches row by row, ``[h*w, C]`` on the ``(h, w)`` grid.

:class:`PackedImages` undoes both reorderings (block -> processor -> raster), gives the
connector one batch per distinct ``(h, w)`` grid (every temporal slice of a video is one image
for the connector) and puts the connector's tokens back in the order the stock model's image
tokens take: image by image, slice by slice, each slice's tokens in the connector's raster order
on its token grid. For the native merger that is exactly the stock ``(t, h/m, w/m)`` order.

M-RoPE. The stock LLM gives image token ``(t', r, c)`` of an image the position
``(t', r, c) + offset`` on the token grid ``(t, h/m, w/m)`` that ``get_rope_index`` derives from
``grid_thw // m``. A Dense connector may make another token grid (DCI + ``mlp2x_gelu`` keeps
``h x w``; a resampler makes a fixed grid): :func:`rope_grid_thw` gives the ``grid_thw`` whose
``// m`` is the connector's token grid, so the stock ``get_rope_index`` positions the
connector's tokens exactly as it positions its own. A connector whose tokens form no grid (STI's
pooled tokens, learned queries) cannot be positioned so: :func:`check_positional_connector`
refuses it.

Examples:
    >>> grid_thw = torch.tensor([[1, 4, 6]])
    >>> packed = PackedImages(grid_thw, merge_size=2)
    >>> packed.raster_index[:6].tolist()   # the first raster row: units 0, 1, 2 side by side
    [0, 1, 4, 5, 8, 9]
    >>> [(batch.grid, batch.slices) for batch in packed.batches]
    [((4, 6), ((0, 0),))]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures
from mmconnect.validation import check_positive_int

#: The ``grid_thw`` of one image: ``(t, h, w)`` in patches.
GridTHW = tuple[int, int, int]


# ---------------------------------------------------------------------------- input checks


def check_grid_thw(
    grid_thw: Any, *, merge_size: int, argument: str = "image_grid_thw"
) -> tuple[GridTHW, ...]:
    """``grid_thw`` as ``(t, h, w)`` int triples, checked.

    Args:
        grid_thw: ``[images, 3]`` integer tensor (the processor's ``image_grid_thw`` /
            ``video_grid_thw``).
        merge_size: the tower's ``spatial_merge_size`` ``m``; ``h`` and ``w`` must be multiples.
        argument: the argument's name in messages.

    Raises:
        TypeError: ``grid_thw`` is not an integer tensor.
        ValueError: not ``[images, 3]``, empty, a value below 1, or ``h`` / ``w`` not a multiple
            of ``merge_size`` (no Qwen processor makes such a grid).
    """
    check_positive_int(merge_size, "merge_size")
    if (
        not isinstance(grid_thw, Tensor)
        or grid_thw.dtype.is_floating_point
        or grid_thw.is_complex()
    ):
        kind = grid_thw.dtype if isinstance(grid_thw, Tensor) else type(grid_thw).__name__
        raise TypeError(f"{argument} must be an integer torch.Tensor [images, 3], got {kind}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(
            f"{argument} must be [images, 3] (t, h, w in patches per image, at least one image), "
            f"got shape {tuple(grid_thw.shape)}"
        )
    grids = tuple((int(t), int(h), int(w)) for t, h, w in grid_thw.tolist())
    for index, (t, h, w) in enumerate(grids):
        if min(t, h, w) < 1:
            raise ValueError(f"{argument}[{index}] = {[t, h, w]} must be positive (t, h, w)")
        if h % merge_size or w % merge_size:
            raise ValueError(
                f"{argument}[{index}] = {[t, h, w]}: h and w must be multiples of "
                f"spatial_merge_size={merge_size} (the processor resizes images to multiples of "
                f"patch_size * {merge_size} pixels); got h={h}, w={w}"
            )
    return grids


def check_packed_pixels(
    pixel_values: Any,
    grids: Sequence[GridTHW],
    *,
    patch_width: int,
    argument: str = "pixel_values",
    grid_argument: str = "image_grid_thw",
) -> None:
    """``pixel_values`` must be the packed patches ``grids`` describe.

    Args:
        pixel_values: ``[sum(t*h*w), patch_width]`` (``patch_width = 3 * T * P * P``).
        grids: the checked ``(t, h, w)`` of each image (:func:`check_grid_thw`).
        patch_width: the values per flattened patch.
        argument: the name of ``pixel_values`` in messages.
        grid_argument: the name of ``grids`` in messages.

    Raises:
        TypeError: ``pixel_values`` is not a floating tensor.
        ValueError: not 2-D, another patch width, or another row count than the grids' sum.
    """
    if not isinstance(pixel_values, Tensor) or not pixel_values.dtype.is_floating_point:
        kind = (
            pixel_values.dtype if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        )
        raise TypeError(f"{argument} must be a floating torch.Tensor, got {kind}")
    rows = sum(t * h * w for t, h, w in grids)
    expected = f"[{rows}, {patch_width}]"
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_width:
        raise ValueError(
            f"{argument} must be the processor's flattened patches {expected} (rows: the "
            f"{grid_argument} products, {patch_width} values per patch), got shape "
            f"{tuple(pixel_values.shape)}; preprocess the images with the model's processor"
        )
    if pixel_values.shape[0] != rows:
        raise ValueError(
            f"{argument} holds {pixel_values.shape[0]} patches but {grid_argument} "
            f"{[list(grid) for grid in grids]} describes {rows} (sum of t*h*w); pass the "
            "processor's pixels and grids together"
        )


# ---------------------------------------------------------------------------- token orders


def processor_to_raster(grid: GridTHW, merge_size: int) -> Tensor:
    """Processor-order positions of one image's tokens, in raster order per temporal slice.

    ``[t*h*w]`` long: entry ``i`` is the processor-order position (within the image) of the
    ``i``-th token in ``(t, h, w)`` raster order.
    """
    t, h, w = grid
    positions = torch.arange(t * h * w)
    return rearrange(
        positions,
        "(t hb wb p q) -> (t hb p wb q)",
        t=t,
        hb=h // merge_size,
        wb=w // merge_size,
        p=merge_size,
        q=merge_size,
    )


@dataclass(frozen=True)
class GridBatch:
    """The temporal slices of one call that share a ``(h, w)`` grid: one connector batch.

    Attributes:
        grid: ``(h, w)`` in patches.
        slices: ``(image, temporal slice)`` of each batch row, in call order.
        index: ``[rows, h*w]`` long, the packed (block-order) positions of each row's tokens in
            raster order.
    """

    grid: tuple[int, int]
    slices: tuple[tuple[int, int], ...]
    index: Tensor


class PackedImages:
    """Where each image's tokens sit in a packed tower call, and how to bring them back.

    Args:
        grid_thw: ``[images, 3]`` (checked with :func:`check_grid_thw`).
        merge_size: the tower's ``spatial_merge_size``.
        window_index: Qwen2.5-VL's ``[seq / m^2]`` permutation of merge units (block-order unit
            ``u`` is processor-order unit ``window_index[u]``); ``None`` when the tower keeps
            processor order (Qwen2-VL, Qwen3-VL).
        argument: ``grid_thw``'s name in messages.

    Attributes:
        grids: each image's ``(t, h, w)``.
        merge_size: ``m``.
        sequence_length: tokens in the packed sequence, ``sum(t*h*w)``.
        raster_index: ``[sequence_length]`` long, the packed positions in raster order (image by
            image, slice by slice, row by row).
        batches: one :class:`GridBatch` per distinct ``(h, w)``, in order of first appearance.

    Raises:
        ValueError: bad ``grid_thw``, or a ``window_index`` that is not a permutation of the
            call's merge units.
    """

    def __init__(
        self,
        grid_thw: Tensor,
        *,
        merge_size: int,
        window_index: Tensor | None = None,
        argument: str = "image_grid_thw",
    ) -> None:
        self.grids = check_grid_thw(grid_thw, merge_size=merge_size, argument=argument)
        self.merge_size = merge_size
        self.sequence_length = sum(t * h * w for t, h, w in self.grids)
        processor_positions = []
        start = 0
        for grid in self.grids:
            processor_positions.append(processor_to_raster(grid, merge_size) + start)
            start += grid[0] * grid[1] * grid[2]
        raster = torch.cat(processor_positions)  # processor-order positions, raster order
        if window_index is not None:
            raster = self._through_windows(raster, window_index)
        self.raster_index = raster
        self.batches = self._group_slices()

    def _through_windows(self, processor_positions: Tensor, window_index: Tensor) -> Tensor:
        """Processor-order positions -> block-order positions under Qwen2.5-VL's windows."""
        unit = self.merge_size**2
        units = self.sequence_length // unit
        window_index = window_index.detach().to("cpu", torch.long).flatten()
        if window_index.numel() != units or not torch.equal(
            torch.sort(window_index).values, torch.arange(units)
        ):
            raise ValueError(
                f"window_index must be a permutation of the call's {units} merge units, got "
                f"{window_index.numel()} entries"
            )
        # Processor unit j sits at block-order unit where[j]; the token inside a unit keeps its place.
        where = torch.argsort(window_index)
        return where[processor_positions // unit] * unit + processor_positions % unit

    def _group_slices(self) -> tuple[GridBatch, ...]:
        rows: dict[tuple[int, int], list[tuple[int, int]]] = {}
        starts: dict[tuple[int, int], list[int]] = {}
        offset = 0
        for image, (t, h, w) in enumerate(self.grids):
            for frame in range(t):
                rows.setdefault((h, w), []).append((image, frame))
                starts.setdefault((h, w), []).append(offset)
                offset += h * w
        batches = []
        for grid, slices in rows.items():
            size = grid[0] * grid[1]
            index = torch.stack([self.raster_index[start : start + size] for start in starts[grid]])
            batches.append(GridBatch(grid=grid, slices=tuple(slices), index=index))
        return tuple(batches)

    # ------------------------------------------------------------------ features

    def cut(self, features: LayerFeatures, batch: GridBatch) -> LayerFeatures:
        """``batch``'s rows of the packed ``features``: ``[1, seq, C] -> [rows, h*w, C]``
        (raster order, grids recorded), every layer and group mean alike.

        Raises:
            ValueError: a captured tensor is not ``[1, sequence_length, C]``.
        """
        index = batch.index

        def take(tensor: Tensor) -> Tensor:
            if tensor.dim() != 3 or tensor.shape[0] != 1 or tensor.shape[1] != self.sequence_length:
                raise ValueError(
                    f"packed features must be [1, {self.sequence_length}, channels] (one packed "
                    f"sequence of the images {[list(grid) for grid in self.grids]}), got "
                    f"{tuple(tensor.shape)}"
                )
            return tensor[0, index.to(tensor.device)]

        grids = {layer: batch.grid for layer in features}
        return features.map(take, grids=grids)

    def run(
        self,
        features: LayerFeatures,
        function: Callable[[LayerFeatures, tuple[int, int]], Sequence[Tensor]],
    ) -> tuple[list[Tensor], ...]:
        """``function`` on each grid batch, its outputs put back per image in stock order.

        Args:
            features: the tap's packed features, ``[1, seq, C]`` per layer.
            function: ``(features [rows, h*w, C], (h, w)) -> (out_0, out_1, ...)``, each output
                ``[rows, N, D]`` (e.g. ``(connector(f, grid),)``, or the tokens and DeepStack
                residuals of ``connector.forward_with_injections``).

        Returns:
            One list per output of ``function``: for each image, its slices' rows concatenated
            in temporal order, ``[t * N, D]``.
        """
        results = [
            (batch, tuple(function(self.cut(features, batch), batch.grid)))
            for batch in self.batches
        ]
        count = len(results[0][1])  # there is at least one image (check_grid_thw)
        if any(len(outputs) != count for _, outputs in results):
            raise ValueError("function must return the same number of outputs for every grid")
        placed: list[dict[tuple[int, int], Tensor]] = [{} for _ in range(count)]
        for batch, outputs in results:
            for place, output in zip(placed, outputs, strict=True):
                for row, where in enumerate(batch.slices):
                    place[where] = output[row]
        return tuple(
            [
                torch.cat([place[(image, frame)] for frame in range(grid[0])])
                for image, grid in enumerate(self.grids)
            ]
            for place in placed
        )


# ---------------------------------------------------------------------------- token counts, M-RoPE


def _connector(connector: Any) -> Any:
    """``connector`` when it counts tokens as a :class:`mmconnect.DenseConnector` or
    :class:`mmconnect.ConnectorConfig` does (PEFT's ``modules_to_save`` wrapper of a connector
    forwards these)."""
    if not all(hasattr(connector, name) for name in ("num_tokens", "token_grid", "extra_tokens")):
        raise TypeError(
            f"connector must be a DenseConnector or ConnectorConfig, got {type(connector).__name__}"
        )
    return connector


def connector_token_count(connector: DenseConnector | ConnectorConfig, grid: GridTHW) -> int:
    """Tokens the connector makes for one image of ``(t, h, w)`` patches: ``t`` slices of
    ``connector.num_tokens((h, w))`` each."""
    t, h, w = grid
    return t * _connector(connector).num_tokens((h, w))


def rope_grid_thw(
    grid_thw: Tensor, connector: DenseConnector | ConnectorConfig, *, merge_size: int
) -> Tensor:
    """The ``grid_thw`` to give the stock ``get_rope_index`` so that it positions the
    connector's tokens: each row ``(t, h, w)`` becomes ``(t, m*gh, m*gw)`` with ``(gh, gw)``
    the connector's token grid for ``(h, w)`` (the stock index divides by ``m``).

    For the native merger ``(gh, gw) = (h/m, w/m)`` and the grid is unchanged.

    Raises:
        ValueError: bad ``grid_thw``, or the connector's tokens for a grid are not a whole
            token grid (:func:`check_positional_connector` refuses such connectors earlier).
    """
    grids = check_grid_thw(grid_thw, merge_size=merge_size, argument="grid_thw")
    connector = _connector(connector)
    rows = []
    for t, h, w in grids:
        height, width = connector.token_grid((h, w))
        extra = connector.extra_tokens((h, w))
        if extra or not height * width:
            raise ValueError(
                f"the connector's tokens for a {h}x{w} patch grid do not form a token grid "
                f"({extra} tokens outside the {height}x{width} grid), so M-RoPE cannot position "
                "them"
            )
        rows.append((t, height * merge_size, width * merge_size))
    return torch.tensor(rows, dtype=grid_thw.dtype, device=grid_thw.device)


def check_positional_connector(
    connector: ConnectorConfig, *, family: str, probe_grids: Sequence[tuple[int, int]]
) -> None:
    """Refuse a connector whose tokens form no grid: M-RoPE needs a ``(row, column)`` per token.

    STI's pooled tokens after the grid, and learned queries (Perceiver, Q-Former: token grid
    ``(0, 0)``), have no place on the image's grid. The connector is probed on ``probe_grids``
    (patch grids the family's processor makes); the first grid it accepts decides.

    Raises:
        ValueError: the connector's tokens form no grid (the message names the fusion and the
            projector), or it accepts none of ``probe_grids``.
    """
    connector = _connector(connector)
    errors = []
    with torch.device("meta"):
        module = DenseConnector(connector)
    for grid in probe_grids:
        try:
            lead, extra = module.token_grid(grid), module.extra_tokens(grid)
        except ValueError as error:
            errors.append(f"{grid}: {error}")
            continue
        if extra or lead[0] * lead[1] == 0:
            raise ValueError(
                f"{family} cannot use a connector whose tokens form no grid (fusion="
                f"{connector.fusion.kind!r}, projector={connector.projector.name!r}: "
                f"{extra or module.num_tokens(grid)} tokens for a {grid[0]}x{grid[1]} patch grid lie "
                f"outside its {lead[0]}x{lead[1]} token grid): the LLM's M-RoPE gives every image "
                "token a (row, column) position; use SCI / DCI / a single layer with a token-wise "
                "or grid projector"
            )
        return
    raise ValueError(
        f"{family}: the connector (fusion={connector.fusion.kind!r}, projector="
        f"{connector.projector.name!r}) accepts none of the patch grids {list(probe_grids)}: "
        + "; ".join(errors)
    )


def window_index(grid_thw: Tensor, vision_config: Any) -> Tensor:
    """Qwen2.5-VL's merge-unit permutation for ``grid_thw`` (``[seq / m^2]`` long), as the
    tower computes it (HF's ``get_vision_window_index`` with the config's
    ``spatial_merge_size``, ``window_size`` and ``patch_size``)."""
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=vision_config.spatial_merge_size,
        window_size=vision_config.window_size,
        patch_size=vision_config.patch_size,
    )
    return index


def packed_tower_features(
    connector: DenseConnector,
    tower: Any,
    pixel_values: Tensor,
    grid_thw: Tensor,
    *,
    output_hidden_states: Any = None,
    output_attentions: Any = None,
) -> tuple[LayerFeatures, Any]:
    """Tap a packed tower (``tower(pixel_values, grid_thw=...)``) for ``connector``.

    Without ``output_hidden_states`` / ``output_attentions`` (arguments, else the tower config's
    fields) the tower stops after the deepest layer the connector reads (early exit); with
    either it runs in full under the same tap and returns its own ``hidden_states`` /
    ``attentions`` (block order, as HF's).

    Returns:
        The tapped features (``[1, seq, C]`` per layer, block order) and a
        ``BaseModelOutputWithPooling`` whose ``last_hidden_state`` is the connector's final
        layer, ``[seq, C]`` in block order (the stock tower's own ``last_hidden_state`` when
        that layer is its last block), with ``hidden_states`` / ``attentions`` when asked for.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    config = tower.config
    hidden = (
        output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    )
    attentions = output_attentions if output_attentions is not None else config.output_attentions
    tap = connector.make_tap(tower, keep_prefix=False)
    outputs = None
    if hidden or attentions:
        with tap:
            outputs = tower(
                pixel_values,
                grid_thw=grid_thw,
                output_hidden_states=bool(hidden),
                output_attentions=bool(attentions),
                return_dict=True,
            )
        features = tap.features
    else:
        features = tap(pixel_values, grid_thw=grid_thw)
    final = features[connector.individual_layers[0]][0]
    return features, BaseModelOutputWithPooling(
        last_hidden_state=final,
        hidden_states=outputs.hidden_states if outputs is not None and hidden else None,
        attentions=outputs.attentions if outputs is not None and attentions else None,
    )
