"""``Registry``: the name -> entry table behind every extension point.

Fusions (:mod:`mmconnect.fusion`), projectors (:mod:`mmconnect.projectors`), resample modes
(:mod:`mmconnect.resample`), presets (:mod:`mmconnect.presets`) and chat templates
(:mod:`mmconnect.integrations.training.data`) each keep one :class:`Registry` in the module of their
concept. A registry never silently replaces an entry: registering a taken name raises a
``ValueError`` that names the entry already there. Listing keeps registration order (the
built-ins first, then the user's), so error messages and tables are stable.

Examples:
    >>> projectors = Registry("projector", describe=lambda builder: f"builder {builder.__name__}")
    >>> projectors.register("linear", len)
    >>> projectors.names(), "linear" in projectors, projectors["linear"] is len
    (['linear'], True, True)
    >>> projectors.register("linear", len)
    Traceback (most recent call last):
    ...
    ValueError: a projector named 'linear' is already registered (builder len); pick another name
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Generic, TypeVar

from mmconnect.validation import check_str

T = TypeVar("T")


def describe_callable(function: Callable) -> str:
    """``module.qualname`` of a function (with a ``partial``'s keywords) for error messages."""
    if isinstance(function, partial):
        keywords = ", ".join(f"{key}={value!r}" for key, value in function.keywords.items())
        return f"{describe_callable(function.func)}({keywords})"
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(function)


class Registry(Generic[T]):
    """Entries by exact name, in registration order; duplicates refused.

    Args:
        kind: what the entries are, as error messages say it (``"fusion"``, ``"projector"``).
        describe: how an entry already registered is named when a duplicate is refused.
    """

    def __init__(self, kind: str, *, describe: Callable[[T], str] = repr) -> None:
        self.kind = kind
        self._describe = describe
        self._entries: dict[str, T] = {}

    def check_available(self, name: object) -> None:
        """Raise unless ``name`` is a non-empty string no entry has yet.

        Registration functions call it before their own argument checks, so a taken name is
        reported as such whatever else is wrong.

        Raises:
            TypeError: ``name`` is not a string.
            ValueError: ``name`` is blank, or is taken (the message names the entry registered
                under it).
        """
        check_str(name, f"{self.kind} name")
        if name in self._entries:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered "
                f"({self._describe(self._entries[name])}); pick another name"
            )

    def register(self, name: str, entry: T) -> None:
        """Add ``entry`` under ``name``.

        Raises:
            TypeError, ValueError: see :meth:`check_available`.
        """
        self.check_available(name)
        self._entries[name] = entry

    def names(self) -> list[str]:
        """The registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def copy(self) -> Registry[T]:
        """An independent registry with the same entries (tests register into a copy)."""
        duplicate: Registry[T] = Registry(self.kind, describe=self._describe)
        duplicate._entries = dict(self._entries)
        return duplicate

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
