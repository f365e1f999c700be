"""Checkpoints on disk: atomic saves, clear errors for files that are not what they claim, and
the base-model fingerprint checked when training resumes (issue 11, items 3, 7 and 9).

Saves that fail midway are provoked for real: a child process lowers its file-size limit
(``RLIMIT_FSIZE``) below the size of the new weights, so ``write`` fails with ``EFBIG`` inside the
save. The old checkpoint must still load and be byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect import checkpoint as ckpt
from mmconnect.checkpoint import atomic_save_directory

REPO = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``root`` (directories as ``"<dir>"``)."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        hashes[key] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary siblings that a save left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def run_with_file_size_limit(script: str, limit: int) -> subprocess.CompletedProcess:
    """Run ``script`` in a child Python whose files cannot grow beyond ``limit`` bytes."""
    prologue = textwrap.dedent(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises OSError (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# ---------------------------------------------------------------------------- the primitive


@pytest.fixture(params=[True, False], ids=["exchange", "two-renames"])
def exchange(request, monkeypatch):
    """Run each primitive test with renameat2(RENAME_EXCHANGE) and with the fallback."""
    if not request.param:
        monkeypatch.setattr(ckpt, "_exchange", lambda first, second: False)
    return request.param


def test_atomic_save_into_a_new_directory(tmp_path, exchange):
    target = tmp_path / "a" / "b"
    with atomic_save_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".b.tmp-")
        assert list(tmp.iterdir()) == []
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert leftovers(target.parent) == []


def test_atomic_save_keeps_what_it_did_not_rewrite(tmp_path, exchange):
    target = tmp_path / "stage1"
    (target / "checkpoint-2").mkdir(parents=True)
    (target / "checkpoint-2" / "model.safetensors").write_bytes(b"trainer checkpoint")
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text('{"old": true}')
    (target / "tokenizer.json").write_text("old tokenizer")
    # an earlier sharded save: its shards and index must not survive a single-file save
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard 1")
    (target / "model-00002-of-00002.safetensors").write_bytes(b"old shard 2")
    (target / "model.safetensors.index.json").write_text("{}")
    with atomic_save_directory(target) as tmp:
        (tmp / "config.json").write_text('{"new": true}')
        (tmp / "model.safetensors").write_bytes(b"new weights")
        (tmp / "tokenizer.json").write_text("new tokenizer")
    assert tree_hashes(target).keys() == {
        "checkpoint-2",
        "checkpoint-2/model.safetensors",
        "notes.txt",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert (target / "checkpoint-2" / "model.safetensors").read_bytes() == b"trainer checkpoint"
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "config.json").read_text() == '{"new": true}'
    assert (target / "tokenizer.json").read_text() == "new tokenizer"
    assert leftovers(tmp_path) == []


def test_atomic_save_superseded_patterns_can_be_switched_off(tmp_path, exchange):
    target = tmp_path / "processor"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights saved by the model")
    with atomic_save_directory(target, superseded=()) as tmp:
        (tmp / "processor_config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "processor_config.json"]


def test_atomic_save_that_raises_leaves_the_old_directory_identical(tmp_path, exchange):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    (target / "model.safetensors").write_bytes(b"old weights")
    before = tree_hashes(target)
    with pytest.raises(RuntimeError, match="midway"), atomic_save_directory(target) as tmp:
        (tmp / "config.json").write_text('{"new": true}')
        raise RuntimeError("failed midway")
    assert tree_hashes(target) == before
    assert leftovers(tmp_path) == []


def test_atomic_save_keeps_the_directory_permissions(tmp_path, exchange):
    target = tmp_path / "model"
    target.mkdir()
    target.chmod(0o750)
    with atomic_save_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert target.stat().st_mode & 0o777 == 0o750


def test_atomic_save_follows_a_symlink(tmp_path, exchange):
    real = tmp_path / "real"
    real.mkdir()
    (real / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_save_directory(link) as tmp:
        (tmp / "config.json").write_text("{}")
    assert link.is_symlink()
    assert sorted(p.name for p in real.iterdir()) == ["config.json", "notes.txt"]


def test_atomic_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        with atomic_save_directory(target):
            pass
    assert target.read_text() == "a file"


def test_exchange_is_used_on_linux(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux-only")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a").write_text("1")
    (second / "b").write_text("2")
    assert ckpt._exchange(first, second)
    assert [p.name for p in first.iterdir()] == ["b"]
    assert [p.name for p in second.iterdir()] == ["a"]


# ---------------------------------------------------------------------------- the connector


def tiny_connector(seed: int) -> DenseConnector:
    torch.manual_seed(seed)
    config = ConnectorConfig.from_preset("dc-sti-clip-l-336", vision_dim=16, llm_dim=32)
    return DenseConnector(config)


def test_connector_save_keeps_user_files(tmp_path):
    (tmp_path / "connector").mkdir()
    (tmp_path / "connector" / "README.md").write_text("my notes")
    tiny_connector(0).save_pretrained(tmp_path / "connector")
    assert (tmp_path / "connector" / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in (tmp_path / "connector").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def test_connector_save_that_fails_midway_keeps_the_old_checkpoint(tmp_path):
    target = tmp_path / "connector"
    old = tiny_connector(0)
    old.save_pretrained(target)
    before = tree_hashes(target)
    weights = (target / "model.safetensors").stat().st_size
    # the new connector is wider: its weights exceed the limit, its config does not
    script = f"""
        import torch
        from mmconnect import ConnectorConfig, DenseConnector
        torch.manual_seed(1)
        config = ConnectorConfig.from_preset("dc-sti-clip-l-336", vision_dim=16, llm_dim=256)
        try:
            DenseConnector(config).save_pretrained({str(target)!r})
        except OSError as error:
            print("save failed:", error.errno)
        else:
            print("save succeeded")
    """
    result = run_with_file_size_limit(script, weights + 1024)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "save failed: 27", result.stdout  # EFBIG
    assert tree_hashes(target) == before
    assert leftovers(tmp_path) == []
    loaded = DenseConnector.from_pretrained(target)
    for key, value in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
