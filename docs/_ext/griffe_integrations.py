"""Griffe extension for the API reference: ``mmconnect.integrations`` and reST roles.

1. pyproject.toml installs the ``integrations/`` folder as the subpackage
   ``mmconnect.integrations`` (setuptools ``package-dir``). Griffe reads sources statically and only
   looks inside ``mmconnect/``, so it would never find the subpackage. When the ``mmconnect``
   package is loaded, this visits ``integrations/*.py`` and attaches them under it, so the API
   pages, cross-references and imports between modules resolve under their installed names.
2. Module constants are documented with Sphinx-style ``#:`` comments above them, which Griffe
   does not read: they become the attributes' docstrings.
3. The docstrings cross-reference with reST roles (``:func:`paper_layer```), which Markdown shows
   verbatim. They become mkdocstrings cross-references (resolved in the docstring's scope, as
   Python resolves names; ``mkdocs build --strict`` fails on any that does not resolve).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

PACKAGE = "mmconnect"
SUBPACKAGE = "integrations"
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([\w.]+)(\(\))?`")


def _role_to_crossref(match: re.Match[str]) -> str:
    short, target, call = match.group(1), match.group(2), match.group(3) or ""
    title = target.rsplit(".", 1)[-1] if short else target
    return f"[`{title}{call}`][{target}]"


class IntegrationsSubpackage(griffe.Extension):
    """Attach ``integrations/`` to the loaded ``mmconnect`` package; turn roles into links."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        if SUBPACKAGE not in pkg.members:
            folder = Path(pkg.filepath).parent.parent / SUBPACKAGE  # beside mmconnect/
            init = folder / "__init__.py"
            if not init.is_file():
                raise FileNotFoundError(f"{init} not found: cannot document {PACKAGE}.{SUBPACKAGE}")
            subpackage = self._visit(SUBPACKAGE, init, pkg, loader)
            for path in sorted(folder.glob("*.py")):
                if path.name != "__init__.py":
                    subpackage.set_member(path.stem, self._visit(path.stem, path, subpackage, loader))
            pkg.set_member(SUBPACKAGE, subpackage)
        self._document(pkg, loader, {})

    @staticmethod
    def _visit(
        name: str, path: Path, parent: griffe.Module, loader: griffe.GriffeLoader
    ) -> griffe.Module:
        code = path.read_text(encoding="utf-8")
        loader.lines_collection[path] = code.splitlines()  # for line numbers in warnings
        return griffe.visit(
            name,
            filepath=path,
            code=code,
            extensions=loader.extensions,
            parent=parent,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )

    def _document(
        self, obj: griffe.Object, loader: griffe.GriffeLoader, sources: dict[Path, list[str]]
    ) -> None:
        if obj.docstring is None and obj.is_attribute and obj.lineno:
            comment = self._comment_above(obj, sources)
            if comment:
                obj.docstring = griffe.Docstring(
                    comment,
                    lineno=obj.lineno,
                    parent=obj,
                    parser=loader.docstring_parser,
                    parser_options=loader.docstring_options,
                )
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_role_to_crossref, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._document(member, loader, sources)

    @staticmethod
    def _comment_above(obj: griffe.Object, sources: dict[Path, list[str]]) -> str:
        """The ``#:`` comment lines right above ``obj``'s assignment, without their markers."""
        path = Path(obj.filepath)
        if path not in sources:
            sources[path] = path.read_text(encoding="utf-8").splitlines()
        lines = sources[path]
        comment: list[str] = []
        index = obj.lineno - 2  # the line above the assignment, 0-based
        while index >= 0 and lines[index].strip().startswith("#:"):
            comment.insert(0, lines[index].strip()[2:].strip())
            index -= 1
        return "\n".join(comment)
