"""Packaging: ``import mmconnect`` stays light, its public names resolve, integrations install."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmconnect
from tests.support.paths import REPO_ROOT

HEAVY = ("transformers", "timm", "open_clip", "peft", "accelerate")

# One fresh interpreter: which heavy packages does `import mmconnect` pull in, and does the
# integrations subpackage then import under its installed name?
_PROBE = f"""
import json, sys
import mmconnect
heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)
import mmconnect.integrations as integrations
print(json.dumps({{"heavy": heavy, "integrations": integrations.__name__}}))
"""


def _probe() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fresh_import_is_light_and_integrations_resolve():
    report = _probe()
    assert report["heavy"] == [], f"import mmconnect imported {report['heavy']}"
    assert report["integrations"] == "mmconnect.integrations"


def test_all_names_resolve():
    assert len(mmconnect.__all__) == len(set(mmconnect.__all__))
    for name in mmconnect.__all__:
        assert getattr(mmconnect, name) is not None, name
    star: dict[str, object] = {}
    exec("from mmconnect import *", star)
    assert set(mmconnect.__all__) <= set(star)


def test_version():
    assert isinstance(mmconnect.__version__, str)
    assert mmconnect.__version__.count(".") >= 2


def test_integrations_is_a_subpackage():
    integrations = importlib.import_module("mmconnect.integrations")
    assert integrations.__name__ == "mmconnect.integrations"
    assert hasattr(integrations, "__path__")  # a package, not a module
    assert Path(integrations.__file__).parent.name == "integrations"


def test_every_package_folder_is_installed():
    """A wheel holds only the packages pyproject.toml lists: every folder with an __init__.py
    under mmconnect/ and integrations/ must be there (a new sub-package is easy to forget)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(
        tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for root, dotted in (("mmconnect", "mmconnect"), ("integrations", "mmconnect.integrations")):
        for init in (REPO_ROOT / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO_ROOT / root).parts
            found.add(".".join((dotted, *relative)))
    assert found == listed
