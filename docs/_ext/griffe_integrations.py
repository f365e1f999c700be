"""Griffe extension for the API reference: ``mmconnect.integrations`` and reST roles.

1. pyproject.toml installs the ``integrations/`` folder as the subpackage
   ``mmconnect.integrations`` (setuptools ``package-dir``). Griffe reads sources statically and only
   looks inside ``mmconnect/``, so it would never find the subpackage. When the ``mmconnect``
   package is loaded, this visits ``integrations/*.py`` and its sub-packages (``integrations/cli/``)
   and attaches them under it, so the API
   pages, cross-references and imports between modules resolve under their installed names.
2. Module constants are documented with Sphinx-style ``#:`` comments above them, which Griffe
   does not read: they become the attributes' docstrings.
3. The docstrings cross-reference with reST roles (``:func:`paper_layer```), which Markdown shows
   verbatim. They become mkdocstrings cross-references (resolved in the docstring's scope, as
   Python resolves names; ``mkdocs build --strict`` fails on any that does not resolve).
4. reST simple tables (``=====  =====`` borders) become Markdown tables, and a paragraph ending in
   ``::`` ends in ``:`` (the indented block after it is a code block in Markdown too).
5. An ``Example:`` section (Napoleon accepts it) is read as Griffe's ``Examples:``, so its
   ``>>>`` lines render as code rather than as Markdown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

PACKAGE = "mmconnect"
SUBPACKAGE = "integrations"
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([\w.]+)(\(\))?`")
TABLE_BORDER = re.compile(r"^ *=+(?: +=+)+ *$")
LITERAL_MARKER = re.compile(r"(\S)::$", re.MULTILINE)
EXAMPLE_SECTION = re.compile(r"^(\s*)Example:$", re.MULTILINE)


def _role_to_crossref(match: re.Match[str]) -> str:
    short, target, call = match.group(1), match.group(2), match.group(3) or ""
    title = target.rsplit(".", 1)[-1] if short else target
    return f"[`{title}{call}`][{target}]"


def _table_rows(lines: list[str], starts: list[int]) -> list[list[str]]:
    """Cells of a reST simple table's rows; a row whose first cell is empty continues the last."""
    rows: list[list[str]] = []
    for line in lines:
        ends = [*starts[1:], len(line)]
        cells = [
            line[start:end].strip().replace("|", "\\|")
            for start, end in zip(starts, ends, strict=True)
        ]
        if rows and not cells[0]:
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


def rst_to_markdown(text: str) -> str:
    """Rewrite reST simple tables as Markdown tables, ``::`` paragraph ends as ``:`` and
    ``Example:`` section titles as ``Examples:``."""
    lines = text.split("\n")
    output: list[str] = []
    index = 0
    while index < len(lines):
        borders = [index] if TABLE_BORDER.match(lines[index]) else []
        probe = index + 1
        while borders and len(borders) < 3 and probe < len(lines) and lines[probe].strip():
            if TABLE_BORDER.match(lines[probe]):
                borders.append(probe)
            probe += 1
        if len(borders) < 3:  # not a table: border, header, border, body, border
            output.append(lines[index])
            index += 1
            continue
        starts = [match.start() for match in re.finditer(r"=+", lines[index])]
        header = _table_rows(lines[borders[0] + 1 : borders[1]], starts)
        body = _table_rows(lines[borders[1] + 1 : borders[2]], starts)
        output += ["", *(f"| {' | '.join(row)} |" for row in header)]
        output.append(f"| {' | '.join('---' for _ in starts)} |")
        output += [*(f"| {' | '.join(row)} |" for row in body), ""]
        index = borders[2] + 1
    text = LITERAL_MARKER.sub(r"\1:", "\n".join(output))
    return EXAMPLE_SECTION.sub(r"\1Examples:", text)


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
            pkg.set_member(SUBPACKAGE, self._visit_package(SUBPACKAGE, folder, pkg, loader))
        self._document(pkg, loader, {})

    def _visit_package(
        self, name: str, folder: Path, parent: griffe.Module, loader: griffe.GriffeLoader
    ) -> griffe.Module:
        """``folder``'s ``__init__.py``, its modules and (recursively) its sub-packages, such as
        ``integrations/cli/``, as the module ``name`` under ``parent``."""
        package = self._visit(name, folder / "__init__.py", parent, loader)
        for path in sorted(folder.glob("*.py")):
            if path.name not in ("__init__.py", "__main__.py"):
                package.set_member(path.stem, self._visit(path.stem, path, package, loader))
        for child in sorted(folder.iterdir()):
            if (child / "__init__.py").is_file():
                package.set_member(
                    child.name, self._visit_package(child.name, child, package, loader)
                )
        return package

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
            obj.docstring.value = ROLE.sub(_role_to_crossref, rst_to_markdown(obj.docstring.value))
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
