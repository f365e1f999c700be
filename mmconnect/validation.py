"""Argument checks shared by the whole library, so the same mistake raises the same exception.

The rule everywhere: a value of the wrong *type* (``window=2.5``, ``num_frames="8"``, ``True`` for
a count) raises ``TypeError``; a value of the right type outside its range or set
(``window=0``, ``pooling="max"``) raises ``ValueError``. Both messages name the argument,
the value given and what is expected. Text from files and command lines is converted by its
reader (the run-file reader, the CLI's argparse types) before it reaches these checks.

Examples:
    >>> check_int(4, "window", minimum=1)
    4
    >>> check_int(2.5, "window", minimum=1)
    Traceback (most recent call last):
    ...
    TypeError: window must be a positive int, got 2.5 (float)
    >>> check_choice("max", "pooling", ("spatial", "temporal"))
    Traceback (most recent call last):
    ...
    ValueError: pooling must be one of ('spatial', 'temporal'), got 'max'
    >>> check_positive_float("1e-3", "learning_rate")
    Traceback (most recent call last):
    ...
    TypeError: learning_rate must be a positive number, got '1e-3' (str)
    >>> check_bool(1, "overwrite")
    Traceback (most recent call last):
    ...
    TypeError: overwrite must be a bool (True or False), got 1 (int)
    >>> check_int_pair((24, 0), "grid")
    Traceback (most recent call last):
    ...
    ValueError: grid must be a (height, width) pair of positive ints, got (24, 0)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from numbers import Real
from typing import Any, TypeVar

_T = TypeVar("_T")


def _int_expectation(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an int in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive int"
    if minimum == 0:
        return "a non-negative int"
    if minimum is not None:
        return f"an int >= {minimum}"
    if maximum is not None:
        return f"an int <= {maximum}"
    return "an int"


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (``bool`` excluded: ``True`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    value: Any,
    argument: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hint: str = "",
) -> int:
    """Return ``value`` if it is an ``int`` in ``[minimum, maximum]``.

    Args:
        value: what the caller passed.
        argument: its name, as the caller knows it (``"window"``, ``"--jobs"``, ``"data.lr"``).
        minimum: inclusive lower bound; ``None`` for unbounded.
        maximum: inclusive upper bound; ``None`` for unbounded.
        hint: appended to the message after ``"; "`` (what the value means, an example).

    Raises:
        TypeError: ``value`` is not an int (``bool``, ``float`` and ``str`` included).
        ValueError: ``value`` is outside the bounds.
    """
    expected = _int_expectation(minimum, maximum)
    suffix = f"; {hint}" if hint else ""
    if not is_int(value):
        raise TypeError(
            f"{argument} must be {expected}, got {value!r} ({type(value).__name__}){suffix}"
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{argument} must be {expected}, got {value!r}{suffix}")
    return value


def check_positive_int(value: Any, argument: str, *, hint: str = "") -> int:
    """:func:`check_int` with ``minimum=1``: counts, sizes, steps."""
    return check_int(value, argument, minimum=1, hint=hint)


def check_optional_int(
    value: Any, argument: str, *, minimum: int | None = None, hint: str = ""
) -> int | None:
    """``None`` (meaning "automatic" or "unset"), or :func:`check_int`."""
    return None if value is None else check_int(value, argument, minimum=minimum, hint=hint)


def check_choice(value: _T, argument: str, choices: Collection[Any], *, hint: str = "") -> _T:
    """Return ``value`` if it is one of ``choices``; otherwise a ``ValueError`` listing them.

    A choice is a name or a flag: any value that is not one of them, whatever its type, is a
    wrong value (``ValueError``), not a wrong type.
    """
    try:
        found = value in choices
    except TypeError:  # unhashable value tested against a set
        found = False
    if not found:
        suffix = f"; {hint}" if hint else ""
        raise ValueError(f"{argument} must be one of {tuple(choices)}, got {value!r}{suffix}")
    return value


def check_size_pair(value: Any, argument: str) -> tuple[int, int]:
    """A size given as one positive int (square) or a ``(height, width)`` pair of positive ints.

    Image sizes, patch sizes and grids are written both ways in configs (HF towers use an int,
    non-square towers a pair); everything inside the library works on the pair.

    Examples:
        >>> check_size_pair(336, "image_size")
        (336, 336)
        >>> check_size_pair([224, 448], "image_size")
        (224, 448)

    Raises:
        TypeError: neither an int nor a sequence of two ints.
        ValueError: a side is not positive.
    """
    if is_int(value):
        check_positive_int(value, argument)
        return value, value
    if isinstance(value, str | bytes) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{argument} must be an int or a (height, width) pair, got {value!r}")
    height, width = value
    return (
        check_positive_int(height, f"{argument}[0]"),
        check_positive_int(width, f"{argument}[1]"),
    )


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (``int``, ``float``, numpy floats; ``bool`` excluded)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _float_expectation(
    minimum: float | None,
    maximum: float | None,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
) -> str:
    if minimum is not None and maximum is not None:
        left = "(" if exclusive_minimum else "["
        right = ")" if exclusive_maximum else "]"
        return f"a number in {left}{_bound(minimum)}, {_bound(maximum)}{right}"
    if minimum == 0:
        return "a positive number" if exclusive_minimum else "a non-negative number"
    if minimum is not None:
        return f"a number {'>' if exclusive_minimum else '>='} {_bound(minimum)}"
    if maximum is not None:
        return f"a number {'<' if exclusive_maximum else '<='} {_bound(maximum)}"
    return "a finite number"


def check_float(
    value: Any,
    argument: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    hint: str = "",
) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number within the bounds.

    An ``int`` is a number too (``weight_decay=0``); ``bool`` and ``str`` are not.

    Args:
        value: what the caller passed.
        argument: its name, as the caller knows it.
        minimum: lower bound; ``None`` for unbounded.
        maximum: upper bound; ``None`` for unbounded.
        exclusive_minimum: whether ``minimum`` itself is refused (``minimum=0,
            exclusive_minimum=True``: "a positive number").
        exclusive_maximum: whether ``maximum`` itself is refused.
        hint: appended to the message after ``"; "``.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or outside the bounds.

    Examples:
        >>> check_float(0.05, "dropout", minimum=0, maximum=1, exclusive_maximum=True)
        0.05
        >>> check_float(1.5, "dropout", minimum=0, maximum=1, exclusive_maximum=True)
        Traceback (most recent call last):
        ...
        ValueError: dropout must be a number in [0, 1), got 1.5
    """
    expected = _float_expectation(minimum, maximum, exclusive_minimum, exclusive_maximum)
    suffix = f"; {hint}" if hint else ""
    if not is_number(value):
        raise TypeError(
            f"{argument} must be {expected}, got {value!r} ({type(value).__name__}){suffix}"
        )
    number = float(value)
    if (
        not math.isfinite(number)
        or (minimum is not None and (number <= minimum if exclusive_minimum else number < minimum))
        or (maximum is not None and (number >= maximum if exclusive_maximum else number > maximum))
    ):
        raise ValueError(f"{argument} must be {expected}, got {value!r}{suffix}")
    return number


def check_positive_float(value: Any, argument: str, *, hint: str = "") -> float:
    """:func:`check_float` of a number ``> 0``: learning rates, scales."""
    return check_float(value, argument, minimum=0, exclusive_minimum=True, hint=hint)


def check_optional_float(
    value: Any,
    argument: str,
    *,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    hint: str = "",
) -> float | None:
    """``None`` (meaning "default" or "unset"), or :func:`check_float`."""
    if value is None:
        return None
    return check_float(
        value, argument, minimum=minimum, exclusive_minimum=exclusive_minimum, hint=hint
    )


def check_bool(value: Any, argument: str, *, hint: str = "") -> bool:
    """Return ``value`` if it is a ``bool``; ``1``, ``"yes"`` or ``None`` are wrong types.

    Raises:
        TypeError: ``value`` is not a ``bool``.
    """
    if not isinstance(value, bool):
        suffix = f"; {hint}" if hint else ""
        raise TypeError(
            f"{argument} must be a bool (True or False), got {value!r} "
            f"({type(value).__name__}){suffix}"
        )
    return value


def check_str(value: Any, argument: str, *, empty: bool = False, hint: str = "") -> str:
    """Return ``value`` if it is a ``str``; blank (empty or only spaces) only when ``empty``.

    Raises:
        TypeError: ``value`` is not a ``str`` (``bytes`` and ``None`` included).
        ValueError: ``value`` is blank and ``empty`` is false.

    Examples:
        >>> check_str("  ", "question")
        Traceback (most recent call last):
        ...
        ValueError: question must be a non-empty str, got '  '
    """
    expected = "a str" if empty else "a non-empty str"
    suffix = f"; {hint}" if hint else ""
    if not isinstance(value, str):
        raise TypeError(
            f"{argument} must be {expected}, got {value!r} ({type(value).__name__}){suffix}"
        )
    if not empty and not value.strip():
        raise ValueError(f"{argument} must be {expected}, got {value!r}{suffix}")
    return value


def check_int_pair(
    value: Any,
    argument: str,
    *,
    minimum: int = 1,
    what: str = "(height, width) pair",
    hint: str = "",
) -> tuple[int, int]:
    """Return ``value`` as a tuple if it is a pair (tuple or list) of ints ``>= minimum``.

    Args:
        value: what the caller passed.
        argument: its name.
        minimum: the smallest side allowed.
        what: what the pair is (``"(height, width) pair"``, ``"(rows, columns) pair"``).
        hint: appended to the message after ``"; "``.

    Raises:
        TypeError: ``value`` is not a tuple or list, or a side is not an int.
        ValueError: ``value`` does not have two sides, or a side is below ``minimum``.
    """
    sides = {1: "positive ints", 0: "non-negative ints"}.get(minimum, f"ints >= {minimum}")
    expected = f"a {what} of {sides}"
    suffix = f"; {hint}" if hint else ""
    if not isinstance(value, tuple | list) or not all(is_int(side) for side in value):
        raise TypeError(
            f"{argument} must be {expected}, got {value!r} ({type(value).__name__}){suffix}"
        )
    if len(value) != 2 or any(side < minimum for side in value):
        raise ValueError(f"{argument} must be {expected}, got {value!r}{suffix}")
    return value[0], value[1]


def check_sequence(value: Any, argument: str, *, of: str, hint: str = "") -> Sequence[Any]:
    """Return ``value`` if it is a sequence (tuple, list, range), not a ``str`` or a bare value.

    Args:
        of: what the items are, for the message (``"ints"``, ``"connector names"``).

    Raises:
        TypeError: ``value`` is a ``str`` / ``bytes`` or not a sequence.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        suffix = f"; {hint}" if hint else ""
        raise TypeError(
            f"{argument} must be a sequence of {of}, got {value!r} ({type(value).__name__}){suffix}"
        )
    return value
