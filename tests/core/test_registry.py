"""``Registry``: the one name -> entry table behind fusions, projectors, resample modes, presets
and chat templates."""

from __future__ import annotations

import doctest
from functools import partial

import pytest

import mmconnect.registry
from mmconnect import fusion, presets, projectors, resample
from mmconnect.registry import Registry, describe_callable


def _double(value: int, *, factor: int = 2) -> int:
    return value * factor


def test_register_list_and_look_up_in_registration_order():
    registry: Registry[int] = Registry("widget")
    registry.register("zeta", 1)
    registry.register("alpha", 2)
    assert registry.names() == ["zeta", "alpha"]
    assert list(registry) == ["zeta", "alpha"] and len(registry) == 2
    assert "alpha" in registry and "beta" not in registry and 3 not in registry
    assert registry["alpha"] == 2
    with pytest.raises(KeyError):
        registry["beta"]


def test_duplicates_and_bad_names_are_refused_and_nothing_is_replaced():
    registry: Registry[int] = Registry("widget", describe=lambda value: f"value {value}")
    registry.register("a", 1)
    with pytest.raises(
        ValueError, match=r"^a widget named 'a' is already registered \(value 1\); pick another"
    ):
        registry.register("a", 2)
    assert registry["a"] == 1
    with pytest.raises(ValueError, match=r"^widget name must be a non-empty str, got ''$"):
        registry.register("", 1)
    for name in (None, 3):
        with pytest.raises(TypeError, match="widget name must be a non-empty str, got"):
            registry.register(name, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        registry.check_available("a")
    registry.check_available("b")  # free: no error, nothing added
    assert registry.names() == ["a"]


def test_copy_is_independent():
    registry: Registry[int] = Registry("widget")
    registry.register("a", 1)
    duplicate = registry.copy()
    duplicate.register("b", 2)
    assert registry.names() == ["a"] and duplicate.names() == ["a", "b"]
    assert duplicate.kind == "widget"


def test_describe_callable_names_functions_and_partials():
    assert describe_callable(_double) == f"{__name__}._double"
    assert describe_callable(partial(_double, factor=3)) == f"{__name__}._double(factor=3)"
    assert describe_callable(object()).startswith("<object object")


def test_every_extension_point_is_a_registry():
    # One implementation of "refuse duplicates, list in order" for all of them.
    for module, name in (
        (fusion, "_FUSIONS"),
        (projectors, "_PROJECTORS"),
        (resample, "_RESAMPLERS"),
        (presets, "_PRESETS"),
    ):
        assert isinstance(getattr(module, name), Registry), name


def test_module_example_runs():
    failures, attempted = doctest.testmod(mmconnect.registry, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0
