"""Output folders of demo / lab / train: refuse what they did not create, delete only their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmconnect.integrations.applications.output_folders import (
    check_output_folder,
    claim_output_folder,
)


def _write(names: list[str], content: bytes) -> object:
    def write(folder: Path) -> list[str]:
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
        return names

    return write


def test_a_new_or_empty_folder_is_taken_and_marked(tmp_path):
    assert check_output_folder(tmp_path / "new", tool="demo", overwrite=False, option="--output")
    assert not (tmp_path / "new").exists()  # checking writes nothing
    claimed = claim_output_folder(tmp_path / "new", tool="demo", overwrite=False, option="--output")
    marker = json.loads((tmp_path / "new" / ".mmconnect-demo").read_text())
    assert marker == {"format_version": 1, "created_by": "mmconnect demo", "files": []}
    assert claimed.recorded_files() == []
    (tmp_path / "empty").mkdir()
    claim_output_folder(tmp_path / "empty", tool="lab", overwrite=False, option="--output")
    assert (tmp_path / "empty" / ".mmconnect-lab").is_file()


def test_a_foreign_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text(name)
    with pytest.raises(FileExistsError) as error:
        check_output_folder(tmp_path, tool="demo", overwrite=False, option="--output")
    assert str(error.value).startswith(
        f"--output {str(tmp_path)!r} is not empty (a.txt, b.txt, c.txt and 1 more) and was not "
        "created by mmconnect demo (no .mmconnect-demo file)"
    )
    # Another command's marker does not make it the demo's.
    (tmp_path / ".mmconnect-lab").write_text("{}")
    with pytest.raises(FileExistsError):
        check_output_folder(tmp_path, tool="demo", overwrite=False, option="--output")
    assert check_output_folder(tmp_path, tool="demo", overwrite=True, option="--output") == tmp_path
    (tmp_path / ".mmconnect-demo").write_text("{}")
    assert (
        check_output_folder(tmp_path, tool="demo", overwrite=False, option="--output") == tmp_path
    )


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--output '.*file' exists and is not a folder"):
        check_output_folder(tmp_path / "file", tool="demo", overwrite=True, option="--output")


def test_overwrite_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match=r"overwrite must be a bool \(True or False\), got 'no'"):
        check_output_folder(tmp_path, tool="demo", overwrite="no", option="--output")


def test_rewriting_replaces_its_own_files_and_deletes_only_those_it_wrote_before(tmp_path):
    folder = claim_output_folder(tmp_path, tool="demo", overwrite=False, option="--output")
    result, fresh = folder.write_subfolder(
        "data", _write(["x.json", "images/1.png", "images/2.png"], b"old")
    )
    assert result == ["x.json", "images/1.png", "images/2.png"]
    assert not fresh.exists()  # the scratch folder is gone
    assert folder.moved(fresh / "images" / "1.png", fresh, "data") == tmp_path / "data/images/1.png"
    (tmp_path / "data" / "images" / "mine.png").write_bytes(b"user")
    (tmp_path / "data" / "images" / "3.png").write_bytes(b"user too")
    folder.write_subfolder("data", _write(["x.json", "images/1.png"], b"new"))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        ".mmconnect-demo",
        "data/images/1.png",
        "data/images/3.png",  # never written by the demo: kept
        "data/images/mine.png",
        "data/x.json",
    ]
    assert (tmp_path / "data" / "x.json").read_bytes() == b"new"
    assert (tmp_path / "data" / "images" / "3.png").read_bytes() == b"user too"
    assert folder.recorded_files() == ["data/images/1.png", "data/x.json"]
    # A later claim keeps the record: the files are still the demo's.
    again = claim_output_folder(tmp_path, tool="demo", overwrite=False, option="--output")
    assert again.recorded_files() == ["data/images/1.png", "data/x.json"]
