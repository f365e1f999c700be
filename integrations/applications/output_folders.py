"""Output folders that never lose a user's files: ``mmconnect demo``, ``lab`` and ``train``.

The rule, the same for every command that writes a folder of results:

* a folder that does not exist, or is empty, is taken and marked with a marker file
  (``.mmconnect-demo``, ``.mmconnect-lab``, ``.mmconnect-train``) that records the files the
  command wrote there;
* a non-empty folder without that command's marker is refused unless the caller asks to
  overwrite (``--overwrite``); it could hold anything;
* even then, and on a re-run into a marked folder, a command only replaces the files it writes
  itself, and deletes only files its marker says it wrote in an earlier run (for example images
  of a larger earlier data set). Nothing else in the folder is touched.

Checking (:func:`check_output_folder`) writes nothing, so a command checks its folders together
with its other arguments before it touches the disk, then :func:`claim_output_folder` marks them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mmconnect.validation import check_bool

T = TypeVar("T")

#: Format of the marker file's JSON.
MARKER_FORMAT_VERSION = 1


def marker_name(tool: str) -> str:
    """The marker file of ``tool`` (``"demo"`` -> ``.mmconnect-demo``)."""
    return f".mmconnect-{tool}"


def _read_manifest(marker: Path) -> list[str]:
    """Files (relative paths) the marker says its command wrote; ``[]`` when unreadable."""
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # an old or damaged marker: still ours, but nothing known to clean up
    files = data.get("files") if isinstance(data, dict) else None
    return [name for name in files if isinstance(name, str)] if isinstance(files, list) else []


def check_output_folder(folder: str | Path, *, tool: str, overwrite: bool, option: str) -> Path:
    """Check that ``tool`` may write into ``folder``; writes nothing.

    Args:
        folder: the output folder.
        tool: the command (``"demo"``, ``"lab"``, ``"train"``): names the marker file.
        overwrite: write into a non-empty folder without the marker (only the command's own
            files are replaced).
        option: how the user names the folder in messages (``"--output"``, ``"output_dir"``).

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        ValueError: ``folder`` exists and is not a folder.
        TypeError: ``overwrite`` is not a bool.
        FileExistsError: ``folder`` is not empty, has no marker of ``tool`` and ``overwrite`` is
            false.
    """
    check_bool(overwrite, "overwrite")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} exists and is not a folder; choose a folder")
    if not path.is_dir() or (path / marker_name(tool)).is_file() or overwrite:
        return path
    entries = sorted(entry.name for entry in path.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (
            f" and {len(entries) - 3} more" if len(entries) > 3 else ""
        )
        raise FileExistsError(
            f"{option} {str(path)!r} is not empty ({shown}) and was not created by mmconnect "
            f"{tool} (no {marker_name(tool)} file): its files could be overwritten. Choose a new "
            "or empty folder, or ask to overwrite (--overwrite on the command line; overwrite: "
            f"true / overwrite=True in a config): only the files mmconnect {tool} writes are "
            "then replaced, nothing else is deleted"
        )
    return path


@dataclass(frozen=True)
class OutputFolder:
    """A folder claimed by :func:`claim_output_folder`.

    Attributes:
        path: the folder.
        tool: the command that owns the marker.
    """

    path: Path
    tool: str

    @property
    def marker(self) -> Path:
        """The marker file."""
        return self.path / marker_name(self.tool)

    def recorded_files(self) -> list[str]:
        """Files (relative to the folder) this command wrote here, per the marker."""
        return _read_manifest(self.marker)

    def record(self, files: list[str]) -> None:
        """Write the marker with ``files`` (relative paths) as the files the command wrote."""
        data = {
            "format_version": MARKER_FORMAT_VERSION,
            "created_by": f"mmconnect {self.tool}",
            "files": sorted(set(files)),
        }
        temporary = self.marker.with_name(self.marker.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, self.marker)  # a marker is always whole

    def write_subfolder(self, subfolder: str, write: Callable[[Path], T]) -> tuple[T, Path]:
        """Let ``write(fresh_folder)`` write files, then move them into ``path / subfolder``.

        ``write`` works in an empty temporary folder beside the target (nothing it might do to
        existing files can reach the user's). Its files then replace same-named files under
        ``subfolder``; files under ``subfolder`` that an earlier run of this command wrote (per
        the marker) and this run did not are deleted; every other file is left alone.

        Returns:
            ``(what write returned, the temporary folder it wrote to)``: paths inside the
            result point into the temporary folder, which no longer exists; map them with
            :meth:`moved`.
        """
        target = self.path / subfolder
        target.mkdir(parents=True, exist_ok=True)
        previous = [name for name in self.recorded_files() if Path(name).parts[:1] == (subfolder,)]
        with tempfile.TemporaryDirectory(dir=self.path, prefix=f".{subfolder}-") as scratch:
            fresh = Path(scratch)
            result = write(fresh)
            written = sorted(
                f"{subfolder}/{file.relative_to(fresh).as_posix()}"
                for file in fresh.rglob("*")
                if file.is_file()
            )
            # Recorded before the move: a run killed while moving still knows its files.
            self.record([*self.recorded_files(), *written])
            for name in written:
                destination = self.path / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(fresh / Path(name).relative_to(subfolder), destination)
        kept = set(written)
        for name in previous:
            stale = self.path / name
            if name not in kept and stale.is_file():
                stale.unlink()
        others = [name for name in self.recorded_files() if Path(name).parts[:1] != (subfolder,)]
        self.record([*others, *written])
        return result, fresh

    def moved(self, path: Any, fresh: Path, subfolder: str) -> Path:
        """Where ``path`` (inside the temporary folder ``fresh``) now is under ``subfolder``."""
        return self.path / subfolder / Path(path).relative_to(fresh)


def claim_output_folder(
    folder: str | Path, *, tool: str, overwrite: bool, option: str
) -> OutputFolder:
    """Check ``folder`` (:func:`check_output_folder`), create it and write ``tool``'s marker.

    A marker already there keeps the files it lists (they are still the command's).
    """
    path = check_output_folder(folder, tool=tool, overwrite=overwrite, option=option)
    try:
        path.mkdir(parents=True, exist_ok=True)
        claimed = OutputFolder(path, tool)
        claimed.record(claimed.recorded_files())
    except OSError as error:
        raise ValueError(f"{option} {str(path)!r} cannot be created or written: {error}") from None
    return claimed
