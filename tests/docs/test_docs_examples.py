"""Every Python example in the README and docs/ runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.fixture
def isolated_registries(monkeypatch):
    """Pages register fusions, projectors, presets and families: keep them out of the other
    tests (the HF Auto classes keep a registered model type; nothing else reads it)."""
    from mmconnect import fusion, presets, projectors, resample
    from mmconnect.integrations.families import protocol

    for module, name in (
        (fusion, "_FUSIONS"),
        (projectors, "_PROJECTORS"),
        (resample, "_RESAMPLERS"),
        (presets, "_PRESETS"),
        (protocol, "_FAMILIES"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name).copy())


@pytest.mark.parametrize(
    "page",
    [page for page in PAGES if PYTHON_BLOCK.search(page.read_text())],
    ids=lambda page: page.relative_to(ROOT).as_posix(),
)
def test_python_examples_run(page: Path, capsys, isolated_registries):
    namespace: dict = {"__name__": f"docs_example_{page.stem}"}
    for block in PYTHON_BLOCK.findall(page.read_text()):
        # dont_inherit: the page runs as a user's script would, without this module's __future__
        # flags; the blocks share one namespace
        exec(compile(block, str(page), "exec", dont_inherit=True), namespace)
