"""The container that carries captured layers from a tap to a connector."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import Tensor

from mmconnect.validation import check_int, check_int_pair


class LayerFeatures(Mapping[int, Tensor]):
    """Captured encoder layers: a mapping ``layer index -> [B, tokens, C]`` plus metadata.

    Keys are non-negative indices in the HF ``hidden_states`` convention (see
    :mod:`mmconnect.layers`). Prefix tokens are already dropped unless the tap kept them.

    Attributes:
        grids: the ``(height, width)`` token grid of each layer, where known.
        group_means: means over layer groups accumulated while streaming, keyed by the group's
            tuple of layer indices, each ``[B, tokens, C]``. A connector uses them instead of the
            per-layer tensors, which a streaming tap never holds.
        num_prefix_tokens: the prefix tokens still present in the tensors (0 when dropped).
    """

    def __init__(
        self,
        layers: Mapping[int, Tensor],
        *,
        grids: Mapping[int, tuple[int, int]] | None = None,
        group_means: Mapping[tuple[int, ...], Tensor] | None = None,
        num_prefix_tokens: int = 0,
    ) -> None:
        self._layers = dict(layers)
        self.grids = dict(grids or {})
        self.group_means = dict(group_means or {})
        self.num_prefix_tokens = num_prefix_tokens

    @classmethod
    def from_hidden_states(
        cls,
        hidden_states: Sequence[Tensor],
        *,
        num_prefix_tokens: int = 0,
        grid: tuple[int, int] | None = None,
    ) -> LayerFeatures:
        """Wrap an HF ``hidden_states`` tuple (``output_hidden_states=True``), dropping prefix tokens.

        The tensors keep their dtype (the tower's); the official Dense Connector fuses in the
        images' dtype, so cast the states to it first when the two differ.

        Args:
            hidden_states: ``L + 1`` tensors ``[B, prefix + tokens, C]``; entry ``k`` is layer ``k``.
            num_prefix_tokens: leading tokens to drop (1 for CLIP's CLS, 0 for SigLIP).
            grid: the ``(height, width)`` token grid, when it is not square.

        Raises:
            TypeError: ``hidden_states`` is not a sequence of tensors, ``num_prefix_tokens`` not
                an int, or ``grid`` not a pair of ints.
            ValueError: ``num_prefix_tokens`` is negative, ``grid`` has a side below 1, a state is not
                ``[B, N, C]``, or the tokens left after the prefix do not form a square grid
                (or ``grid``); the message names the prefix count that would.
        """
        if isinstance(hidden_states, Tensor) or not isinstance(hidden_states, Sequence):
            raise TypeError(
                "hidden_states must be a sequence of [B, tokens, C] tensors (HF's hidden_states "
                f"tuple), got {type(hidden_states).__name__}"
            )
        check_int(
            num_prefix_tokens,
            "num_prefix_tokens",
            minimum=0,
            hint="1 for CLIP's CLS token, 0 for SigLIP",
        )
        if grid is not None:
            grid = check_int_pair(grid, "grid")
        for index, state in enumerate(hidden_states):
            if not isinstance(state, Tensor) or state.dim() != 3:
                shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
                raise ValueError(
                    f"hidden_states[{index}] must be a [batch, tokens, channels] tensor, got {shape}"
                )
            _check_prefix(state.shape[1], num_prefix_tokens, grid, f"hidden_states[{index}]")
        layers = {index: state[:, num_prefix_tokens:] for index, state in enumerate(hidden_states)}
        grids = {index: grid for index in layers} if grid is not None else None
        return cls(layers, grids=grids)

    def __getitem__(self, layer: int) -> Tensor:
        return self._layers[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        shapes = {index: tuple(tensor.shape) for index, tensor in self._layers.items()}
        groups = {group: tuple(tensor.shape) for group, tensor in self.group_means.items()}
        return f"LayerFeatures(layers={shapes}, group_means={groups}, grids={self.grids})"

    def map(
        self,
        function: Callable[[Tensor], Tensor],
        *,
        grids: Mapping[int, tuple[int, int]] | None = None,
    ) -> LayerFeatures:
        """The same layers and group means, each passed through ``function``.

        Families with packed encoders use it to cut one image's tokens out of a packed
        sequence, or to put them back into raster order, before the connector fuses them.

        Args:
            function: ``[B, N, C] -> [B', N', C]``, the same for every tensor (it must keep
                token positions aligned across layers: fusion concatenates them along channels).
            grids: the token grids of the result (``None``: the grids are dropped, as the
                function may change the token layout).
        """
        return LayerFeatures(
            {layer: function(tensor) for layer, tensor in self._layers.items()},
            grids=grids,
            group_means={group: function(mean) for group, mean in self.group_means.items()},
            num_prefix_tokens=self.num_prefix_tokens,
        )

    def grid(self, layer: int | None = None) -> tuple[int, int]:
        """The ``(height, width)`` token grid of ``layer`` (default: any captured layer).

        Falls back to a square grid when the tap did not record one.

        Raises:
            ValueError: the token count is not a square and no grid was recorded.
        """
        if layer is None:
            if self.grids:
                return next(iter(self.grids.values()))
            tensors = list(self._layers.values()) or list(self.group_means.values())
            if not tensors:
                raise ValueError("no features captured: cannot tell the token grid")
            return infer_square_grid(tensors[0].shape[1] - self.num_prefix_tokens)
        if layer in self.grids:
            return self.grids[layer]
        return infer_square_grid(self._layers[layer].shape[1] - self.num_prefix_tokens)


def _check_prefix(
    num_tokens: int, num_prefix_tokens: int, grid: tuple[int, int] | None, argument: str
) -> None:
    """Refuse a prefix count that leaves no square grid (or not ``grid``), naming one that fits."""
    patches = num_tokens - num_prefix_tokens
    if grid is not None:
        height, width = grid
        if patches == height * width:
            return
        fitting = num_tokens - height * width
        expected = (
            f"num_prefix_tokens={fitting} would leave exactly grid={grid}"
            if fitting >= 0
            else f"grid={grid} needs {height * width} tokens, more than the state has"
        )
        raise ValueError(
            f"{argument} has {num_tokens} tokens: num_prefix_tokens={num_prefix_tokens} leaves "
            f"{patches}, which is not the {height}x{width} grid={grid} ({height * width} tokens); "
            f"{expected}"
        )
    if patches >= 1 and math.isqrt(patches) ** 2 == patches:
        return
    # The smallest prefix count that leaves a square: CLIP's 577 = 1 + 24 * 24 gives 1.
    fitting = next(
        (k for k in range(num_tokens) if math.isqrt(num_tokens - k) ** 2 == num_tokens - k), None
    )
    expected = (
        f"expected num_prefix_tokens={fitting} ({num_tokens} = {fitting} + "
        f"{math.isqrt(num_tokens - fitting)}x{math.isqrt(num_tokens - fitting)})"
        if fitting is not None
        else "no prefix count leaves a square"
    )
    raise ValueError(
        f"{argument} has {num_tokens} tokens: num_prefix_tokens={num_prefix_tokens} leaves "
        f"{patches}, which is not a square grid; {expected}, or pass grid=(height, width) for a "
        "non-square grid"
    )


def infer_square_grid(num_tokens: int) -> tuple[int, int]:
    """The square ``(n, n)`` grid of ``num_tokens`` tokens.

    Raises:
        ValueError: ``num_tokens`` is not a perfect square (pass the grid explicitly).
    """
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} tokens do not form a square grid; pass grid=(height, width) explicitly"
        )
    return side, side


def check_grid(tokens: Tensor, grid: tuple[int, int], *, argument: str = "features") -> None:
    """Raise a clear error unless ``tokens`` (``[B, N, C]``) has ``N == height * width``."""
    if tokens.dim() != 3:
        raise ValueError(
            f"{argument} must be [batch, tokens, channels], got shape {tuple(tokens.shape)}"
        )
    height, width = grid
    if tokens.shape[1] != height * width:
        raise ValueError(
            f"{argument} has {tokens.shape[1]} tokens, which do not form the stated grid "
            f"{height}x{width} (= {height * width} tokens)"
        )
