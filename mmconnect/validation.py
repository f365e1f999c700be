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
"""

from __future__ import annotations

from collections.abc import Collection
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
