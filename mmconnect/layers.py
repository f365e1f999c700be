"""Layer indices in the Hugging Face ``hidden_states`` convention.

Every layer index in mmconnect means the same thing, whatever the encoder family:

* ``0`` is the embedding output (the input of the first block; for HF CLIP after
  ``pre_layrnorm``, for SigLIP the patch convolution plus position embedding, for a ConvNeXt the
  stem output),
* ``k >= 1`` is the output of block ``k`` (1-based; for a ConvNeXt, of stage ``k``),
* negative indices count from the end: ``-1`` is the last block, ``-2`` the one before
  (LLaVA's ``select_layer=-2``).

An encoder with ``L`` blocks therefore has ``L + 1`` valid non-negative indices ``0 .. L``.

Other numberings map onto it:

* timm / open_clip ``forward_intermediates`` block ``i`` (0-based) is ``i + 1``;
* the Dense Connector paper's "layer ``i``" (1-based, e.g. groups (1-12), (13-24), layers 8
  and 16) is ``i - 1``, as in its official code: see :func:`paper_layer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mmconnect.validation import check_int, check_positive_int

_INDEX_HINT = "a layer index in the hidden_states convention (0 is the embedding output)"


def check_layer_index(value: object, argument: str = "layer") -> int:
    """Return ``value`` if it is an ``int`` layer index (any sign; the range needs the encoder depth).

    Raises:
        TypeError: ``value`` is not an ``int`` (``bool``, ``float`` and ``str`` included).

    Examples:
        >>> check_layer_index(-2, "final_layer")
        -2
    """
    return check_int(value, argument, hint=_INDEX_HINT)


def normalize_layer(index: int, num_layers: int, *, argument: str = "layer") -> int:
    """Map one layer index to its non-negative ``hidden_states`` position.

    Args:
        index: a layer index in the HF ``hidden_states`` convention; negatives count from the end.
        num_layers: the number of blocks ``L`` of the encoder (``L + 1`` hidden states).
        argument: the argument name used in error messages.

    Returns:
        An index in ``0 .. num_layers``.

    Raises:
        TypeError: ``index`` or ``num_layers`` is not an ``int``.
        ValueError: ``index`` is outside ``-(L + 1) .. L``, or ``num_layers`` is below 1.

    Examples:
        >>> normalize_layer(-2, 24)
        23
    """
    check_layer_index(index, argument)
    check_positive_int(num_layers, "num_layers", hint="the encoder's number of blocks")
    if not -(num_layers + 1) <= index <= num_layers:
        raise ValueError(
            f"{argument}={index} is out of range for an encoder with {num_layers} blocks: "
            f"expected an index in {-(num_layers + 1)}..{num_layers} (0 is the embedding output, "
            f"k the output of block k, negatives count from the end)"
        )
    return index if index >= 0 else num_layers + 1 + index


def normalize_layers(
    indices: Iterable[int], num_layers: int, *, argument: str = "layers"
) -> tuple[int, ...]:
    """Normalise several layer indices (see :func:`normalize_layer`), keeping their order.

    Raises:
        TypeError: ``indices`` is not a collection of ints (e.g. a bare int).
        ValueError: an index is out of range, or two indices name the same layer.
    """
    _check_collection(indices, argument, "int layer indices")
    normalized: list[int] = []
    for position, index in enumerate(indices):
        value = normalize_layer(index, num_layers, argument=f"{argument}[{position}]")
        if value in normalized:
            raise ValueError(
                f"{argument} names layer {value} twice (as {index!r}); each layer may appear once"
            )
        normalized.append(value)
    return tuple(normalized)


def normalize_groups(
    groups: Sequence[Iterable[int]], num_layers: int, *, argument: str = "groups"
) -> tuple[tuple[int, ...], ...]:
    """Validate layer groups (for grouped averaging) and normalise their indices.

    Each group is a non-empty collection of layer indices; no layer may appear twice, neither
    inside one group nor across groups.

    Raises:
        TypeError: ``groups`` is not a collection of collections of ints.
        ValueError: a group is empty, a layer repeats or two groups overlap.
    """
    _check_collection(groups, argument, "layer groups, e.g. [range(0, 12), range(12, 24)]")
    normalized: list[tuple[int, ...]] = []
    seen: dict[int, int] = {}
    for position, group in enumerate(groups):
        members = normalize_layers(group, num_layers, argument=f"{argument}[{position}]")
        if not members:
            raise ValueError(
                f"{argument}[{position}] is empty: every group needs at least one layer"
            )
        for layer in members:
            if layer in seen:
                raise ValueError(
                    f"{argument}[{position}] overlaps {argument}[{seen[layer]}]: both contain "
                    f"layer {layer}; groups must be disjoint"
                )
            seen[layer] = position
        normalized.append(members)
    return tuple(normalized)


def _check_collection(value: object, argument: str, expected: str) -> None:
    """Refuse a bare value where a collection is expected (``layers=-2`` instead of ``[-2]``)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(
            f"{argument} must be a collection of {expected}, got {value!r} ({type(value).__name__})"
        )


def paper_layer(layer: int) -> int:
    """Convert the Dense Connector paper's 1-based "layer i" to the ``hidden_states`` index.

    The official code reads the paper's layer ``i`` as ``hidden_states[i - 1]``: "layers 8 and
    16" are ``H[7]`` and ``H[15]``, the group "(1-12)" is ``H[0..11]``.

    Examples:
        >>> [paper_layer(i) for i in (8, 16)]
        [7, 15]
    """
    return check_positive_int(layer, "layer", hint="a 1-based paper layer number") - 1
