"""The documentation site is wired: every page in the nav, every module with an API page.

`mkdocs build --strict` (the README's test command) checks links, anchors and docstrings; these
tests check what it cannot: a page or module added without a nav entry or API page fails here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import griffe
import pytest
import yaml

from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
DOCS = ROOT / "docs"
EXTENSION = DOCS / "_ext" / "griffe_integrations.py"
# Each source folder, the dotted package it installs as, and where its API pages live.
API_PACKAGES = [
    (ROOT / "mmconnect", "mmconnect", DOCS / "api"),
    (ROOT / "integrations", "mmconnect.integrations", DOCS / "api" / "integrations"),
]


def nav_pages(entry) -> list[str]:
    """Every page path in a mkdocs ``nav`` entry (titles are dict keys, pages are strings)."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, list):
        return [page for item in entry for page in nav_pages(item)]
    if isinstance(entry, dict):
        return [page for value in entry.values() for page in nav_pages(value)]
    raise TypeError(f"unexpected nav entry {entry!r}")


@pytest.fixture(scope="module")
def nav() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    return nav_pages(config["nav"])


def markdown_pages() -> list[str]:
    """Every Markdown page of the site, relative to docs/ (docs/_ext holds build tooling)."""
    return sorted(
        page.relative_to(DOCS).as_posix()
        for page in DOCS.rglob("*.md")
        if not page.relative_to(DOCS).as_posix().startswith("_ext/")
    )


def modules(folder: Path) -> list[str]:
    """The modules and sub-packages (folders with ``__init__.py``, e.g. ``integrations/cli``)."""
    files = [path.stem for path in folder.glob("*.py") if path.name != "__init__.py"]
    packages = [path.name for path in folder.iterdir() if (path / "__init__.py").is_file()]
    return sorted(files + packages)


def test_every_nav_entry_exists(nav):
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist in docs/: {missing}"
    assert len(nav) == len(set(nav)), "a page appears twice in the nav"


def test_every_page_is_in_the_nav(nav):
    assert "index.md" in nav and "quickstart.md" in nav
    omitted = sorted(set(markdown_pages()) - set(nav))
    assert not omitted, f"pages missing from the mkdocs.yml nav: {omitted}"


def api_pages(folder: Path, package: str, api_dir: Path) -> list[tuple[str, Path]]:
    """``(dotted module, the API page that must render it)`` for every module under ``folder``.

    A module ``m`` has ``api_dir/m.md``. A sub-package ``s`` has one page ``api_dir/s.md`` when it
    is documented whole (the CLI), otherwise ``api_dir/s/index.md`` plus a page per module inside
    ``api_dir/s/``, recursively: the API reference mirrors the package layout.
    """
    pages = []
    for name in modules(folder):
        dotted = f"{package}.{name}"
        if not (folder / name / "__init__.py").is_file() or (api_dir / f"{name}.md").is_file():
            pages.append((dotted, api_dir / f"{name}.md"))
            continue
        pages.append((dotted, api_dir / name / "index.md"))
        pages.extend(api_pages(folder / name, dotted, api_dir / name))
    return pages


@pytest.mark.parametrize(
    ("folder", "package", "api_dir"), API_PACKAGES, ids=[p for _, p, _ in API_PACKAGES]
)
def test_every_module_has_an_api_page_in_the_nav(folder, package, api_dir, nav):
    problems = []
    for dotted, page in api_pages(folder, package, api_dir):
        if not page.is_file():
            problems.append(f"{dotted}: no API page {page.relative_to(ROOT)}")
            continue
        if f"::: {dotted}\n" not in page.read_text():
            problems.append(f"{page.relative_to(ROOT)} does not render '::: {dotted}'")
        if page.relative_to(DOCS).as_posix() not in nav:
            problems.append(f"{page.relative_to(ROOT)} is not in the mkdocs.yml nav")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("folder", "package", "api_dir"), API_PACKAGES, ids=[p for _, p, _ in API_PACKAGES]
)
def test_no_api_page_for_a_missing_module(folder, package, api_dir):
    expected = {page for _, page in api_pages(folder, package, api_dir)}
    top_index = api_dir / "index.md"
    stale = sorted(
        page.relative_to(ROOT).as_posix()
        for page in api_dir.rglob("*.md")
        if page not in expected
        and page != top_index
        and not (package == "mmconnect" and page.is_relative_to(DOCS / "api" / "integrations"))
    )
    assert not stale, f"API pages for modules that do not exist in {package}: {stale}"


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    install, test = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).strip().split("\n")
    assert "mkdocs build --strict" in test
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci[-2:] == [install, test]


# ---------------------------------------------------------------------------- the Griffe extension


def load_extension_module():
    spec = importlib.util.spec_from_file_location("griffe_integrations", EXTENSION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rst_tables_literal_markers_and_example_sections_become_markdown():
    text = (
        "Presets:\n"
        "\n"
        "=====  ===========\n"
        "name   tokens\n"
        "=====  ===========\n"
        "sti    720 | more\n"
        "       (pooled)\n"
        "dci    576\n"
        "=====  ===========\n"
        "\n"
        "Example file::\n"
        "\n"
        "    a: 1\n"
        "Example:\n"
        "    >>> [1][0]\n"
    )
    expected = (
        "Presets:\n"
        "\n"
        "\n"
        "| name | tokens |\n"
        "| --- | --- |\n"
        "| sti | 720 \\| more (pooled) |\n"
        "| dci | 576 |\n"
        "\n"
        "\n"
        "Example file:\n"
        "\n"
        "    a: 1\n"
        "Examples:\n"
        "    >>> [1][0]\n"
    )
    assert load_extension_module().rst_to_markdown(text) == expected


def test_griffe_extension_documents_integrations_under_their_installed_names():
    extension = load_extension_module().IntegrationsSubpackage()
    package = griffe.load(
        "mmconnect",
        search_paths=[ROOT],
        extensions=griffe.load_extensions(extension),
        docstring_parser="google",
    )
    integrations = package["integrations"]
    assert integrations.path == "mmconnect.integrations"
    assert sorted(integrations.modules) == modules(ROOT / "integrations")
    assert (
        package["integrations.families.llava.from_llava"].path
        == "mmconnect.integrations.families.llava.from_llava"
    )
    # reST roles become scoped cross-references; `#:` comments document constants.
    docstring = package["layers.normalize_layers"].docstring.value
    assert "[`normalize_layer`][normalize_layer]" in docstring and ":func:" not in docstring
    colours = package["integrations.applications.synthetic.COLOURS"].docstring.value
    assert colours.startswith("RGB fill of each colour name")
