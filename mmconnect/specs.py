"""What fusion and projector specs share: a registered ``kind`` plus the component's own parameters.

A spec class is a frozen dataclass with a ``kind`` field; a class made for one kind fixes it
(``kind: str = field(default="qformer", init=False)``), the base class of a family of kinds
leaves it to the caller (``FusionSpec(kind="mine")``). :mod:`mmconnect.fusion` and
:mod:`mmconnect.projectors` keep their own registries and call these helpers to read a spec from a
name or a mapping (what JSON configs hold) and to write one back.

Examples:
    >>> from mmconnect.projectors import MLPSpec
    >>> fixed_kind(MLPSpec)
    'mlp'
    >>> spec_from_mapping({"kind": "mlp", "depth": 3}, lambda kind: MLPSpec, what="projector")
    MLPSpec(kind='mlp', depth=3, activation='gelu')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

_S = TypeVar("_S")


def json_ready(value: Any) -> Any:
    """A spec field as JSON holds it: tuples and lists (also nested) become lists."""
    if isinstance(value, tuple | list):
        return [json_ready(item) for item in value]
    return value


def fixed_kind(spec: type) -> str | None:
    """The ``kind`` a spec class fixes (``field(default=..., init=False)``), or ``None``."""
    kind = next(f for f in dataclasses.fields(spec) if f.name == "kind")
    return None if kind.init else kind.default


def parameter_names(spec: type) -> tuple[str, ...]:
    """The parameters a spec class takes (``kind`` excluded)."""
    return tuple(f.name for f in dataclasses.fields(spec) if f.init and f.name != "kind")


def construct_spec(spec: type[_S], kind: str, parameters: Mapping[str, Any], *, what: str) -> _S:
    """``spec(**parameters)`` for ``kind``, naming the parameters a caller left out.

    Raises:
        ValueError: a parameter without a default is missing (``what`` names the component:
            ``"fusion"``, ``"projector"``).
    """
    required = [
        f.name
        for f in dataclasses.fields(spec)
        if f.init
        and f.name != "kind"
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in parameters
    ]
    if required:
        raise ValueError(
            f"{what} kind {kind!r} needs the parameters {required}; pass a {spec.__name__}"
        )
    values = dict(parameters)
    if fixed_kind(spec) is None:
        values = {"kind": kind, **values}
    return spec(**values)


def spec_from_mapping(
    data: Mapping[str, Any], spec_of: Callable[[Any], type[_S]], *, what: str
) -> _S:
    """A spec from ``{"kind": ..., **parameters}``, the class found by ``spec_of(kind)``.

    Raises:
        ValueError: no ``kind`` key, keys the kind's spec does not take (the message lists its
            parameters), a missing required parameter, or an unknown kind (``spec_of``'s error).
    """
    values = dict(data)
    if "kind" not in values:
        raise ValueError(f"a {what} spec needs a 'kind' key, got keys {sorted(values)}")
    kind = values.pop("kind")
    spec = spec_of(kind)
    unknown = sorted(set(values) - set(parameter_names(spec)))
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} for {what} kind {kind!r}; its parameters are "
            f"{list(parameter_names(spec))}"
        )
    return construct_spec(spec, kind, values, what=what)
