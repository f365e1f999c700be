"""Checkpoints on disk: atomic saves, clear errors for files that are not what they claim, and
the base-model fingerprint checked when training resumes (issue 11, items 3, 7 and 9).

Saves that fail midway are provoked for real: a child process lowers its file-size limit
(``RLIMIT_FSIZE``) below the size of the new weights, so ``write`` fails with ``EFBIG`` inside the
save. The old checkpoint must still load and be byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect import checkpoint as ckpt
from mmconnect.checkpoint import atomic_save_directory
from tests.support.paths import REPO_ROOT

REPO = REPO_ROOT


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


def test_atomic_save_of_a_processor_keeps_the_model(tmp_path, exchange):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights saved by the model")
    (target / "config.json").write_text("{}")
    with atomic_save_directory(target) as tmp:  # writes no model file: supersedes none
        (tmp / "processor_config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "processor_config.json",
    ]


def test_atomic_save_superseded_patterns_can_be_switched_off(tmp_path, exchange):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model-00001-of-00002.safetensors").write_bytes(b"a shard")
    with atomic_save_directory(target, superseded=()) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
    assert sorted(p.name for p in target.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model.safetensors",
    ]


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


def test_atomic_save_into_the_working_directory(tmp_path, monkeypatch, exchange):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    monkeypatch.chdir(target)
    with atomic_save_directory(".") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        (tmp / "config.json").write_text("{}")
    assert Path(os.getcwd()) == target  # still valid: not the deleted old folder
    assert sorted(p.name for p in Path(".").iterdir()) == ["config.json", "notes.txt"]
    with atomic_save_directory("sub/..") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert sorted(p.name for p in Path(".").iterdir()) == ["model.safetensors", "notes.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_save_with_a_long_name(tmp_path, exchange):
    target = tmp_path / ("n" * 250)
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with atomic_save_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "notes.txt"]


def test_atomic_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with (
        pytest.raises(ValueError, match="exists and is not a directory"),
        atomic_save_directory(target),
    ):
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


# ---------------------------------------------------------------------------- Dense HF models and stages


def dense_llava(seed: int = 0):
    pytest.importorskip("transformers")
    from tests.support.training_toys import build_model

    return build_model(seed=seed)


def test_dense_llava_save_keeps_user_files_and_drops_stale_shards(tmp_path):
    target = tmp_path / "llava"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "model-00001-of-00003.safetensors").write_bytes(b"stale shard")
    (target / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    dense_llava().save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # a fresh process imports transformers
def test_dense_llava_save_that_fails_midway_keeps_the_old_checkpoint(tmp_path):
    from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration

    target = tmp_path / "llava"
    old = dense_llava(seed=0)
    old.save_pretrained(target)
    before = tree_hashes(target)
    size = (target / "model.safetensors").stat().st_size
    script = f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from tests.support.training_toys import build_model
        try:
            build_model(seed=1).save_pretrained({str(target)!r})
        except Exception as error:  # safetensors' own error type, with our note
            print("save failed:", "File too large" in str(error), *error.__notes__)
        else:
            print("save succeeded")
    """
    result = run_with_file_size_limit(script, size - 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"save failed: True the save into {str(target)!r} failed and was discarded: the "
        "directory is unchanged"
    ), result.stdout
    assert tree_hashes(target) == before
    assert leftovers(tmp_path) == []
    loaded = DenseLlavaForConditionalGeneration.from_pretrained(target)
    for key, value in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_dense_llava_from_pretrained_names_a_corrupt_file(tmp_path):
    from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration

    target = tmp_path / "llava"
    dense_llava().save_pretrained(target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ValueError) as error:
        DenseLlavaForConditionalGeneration.from_pretrained(target)
    assert str(error.value).startswith(
        f"weights file {str(weights)!r} ({len(data) - 100} bytes) is not a readable safetensors "
        "file: it is truncated or corrupt"
    )
    weights.write_bytes(data)
    config = target / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match=re.escape(repr(str(config))) + " is not valid JSON"):
        DenseLlavaForConditionalGeneration.from_pretrained(target)
    config.write_bytes(b"\xff\xfe{\x00}\x00")  # UTF-16
    with pytest.raises(ValueError, match=re.escape(repr(str(config))) + " is not UTF-8 text"):
        DenseLlavaForConditionalGeneration.from_pretrained(target)
    with pytest.raises(ValueError, match=re.escape(repr(str(weights))) + " is a file; Dense"):
        DenseLlavaForConditionalGeneration.from_pretrained(weights)


@pytest.mark.slow  # a 24-block tower and a ConvNeXt aux encoder
def test_dense_mgm_save_is_atomic_and_a_corrupt_file_is_named(tmp_path):
    pytest.importorskip("timm")
    from mmconnect.integrations.families.mini_gemini import DenseMGMForConditionalGeneration
    from tests.support.mini_gemini_toys import build

    target = tmp_path / "mgm"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    build().save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert leftovers(tmp_path) == []
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(repr(str(weights))) + r" \(\d+ bytes\) is not"):
        DenseMGMForConditionalGeneration.from_pretrained(target)


@pytest.mark.slow  # a fresh process imports transformers
def test_stage_rerun_that_fails_while_saving_keeps_the_stage_folder(tmp_path):
    pytest.importorskip("transformers")
    from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration
    from mmconnect.integrations.training.stages import StageConfig, train_stage
    from tests.support.training_toys import ToyDataset, build_model, collate

    config = StageConfig(
        stage="align",
        output_dir=str(tmp_path / "stage1"),
        per_device_train_batch_size=4,
        max_steps=1,
        save_steps=1,
        disable_tqdm=True,
    )
    trained = train_stage(build_model(), ToyDataset(), collate, config).model
    stage_folder = tmp_path / "stage1"
    (stage_folder / "notes.txt").write_text("mine")
    assert (stage_folder / "checkpoint-1" / "trainer_state.json").is_file()
    before = tree_hashes(stage_folder)
    size = (stage_folder / "model.safetensors").stat().st_size
    # the re-run trains a model of the same size with another seed and no trainer checkpoints
    script = f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from tests.support.training_toys import ToyDataset, build_model, collate
        from mmconnect.integrations.training.stages import StageConfig, train_stage
        config = StageConfig(stage="align", output_dir={str(stage_folder)!r},
            per_device_train_batch_size=4, max_steps=1, disable_tqdm=True, seed=1)
        try:
            train_stage(build_model(seed=1), ToyDataset(), collate, config)
        except Exception as error:
            print("save failed:", "File too large" in str(error), error.__notes__[-1])
        else:
            print("save succeeded")
    """
    result = run_with_file_size_limit(script, size - 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"save failed: True the save into {str(stage_folder)!r} failed and was discarded: the "
        "directory is unchanged"
    ), result.stdout
    assert tree_hashes(stage_folder) == before
    assert leftovers(tmp_path) == []
    loaded = DenseLlavaForConditionalGeneration.from_pretrained(stage_folder)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_stage_rerun_keeps_trainer_checkpoints_and_user_files(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPImageProcessor

    from mmconnect.integrations.training.stages import StageConfig, train_stage
    from tests.support.training_toys import ToyDataset, build_model, collate

    stage_folder = tmp_path / "stage1"
    (stage_folder / "checkpoint-7").mkdir(parents=True)
    (stage_folder / "checkpoint-7" / "trainer_state.json").write_text("{}")
    (stage_folder / "notes.txt").write_text("mine")
    (stage_folder / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    config = StageConfig(
        stage="align",
        output_dir=str(stage_folder),
        per_device_train_batch_size=4,
        max_steps=1,
        disable_tqdm=True,
    )
    (stage_folder / "preprocessor_config.json").write_text("{}")
    processor = CLIPImageProcessor(crop_size=56, size={"shortest_edge": 56})
    train_stage(build_model(), ToyDataset(), collate, config, processor=processor)
    assert sorted(p.name for p in stage_folder.iterdir()) == [
        "base_fingerprint.json",
        "checkpoint-7",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
        "preprocessor_config.json",
    ]
    saved = CLIPImageProcessor.from_pretrained(stage_folder)  # the new one, saved with the model
    assert saved.crop_size == {"height": 56, "width": 56}
    assert (stage_folder / "checkpoint-7" / "trainer_state.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- readers


def test_read_state_dict_names_what_is_wrong(tmp_path):
    weights = tmp_path / "model.safetensors"
    ckpt.write_state_dict({"w": torch.arange(64.0)}, weights)
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])
    with pytest.raises(ValueError) as error:
        ckpt.read_state_dict(weights)
    assert str(error.value) == (
        f"weights file {str(weights)!r} ({len(data) - 8} bytes) is not a readable safetensors "
        "file: it is truncated or corrupt (Error while deserializing header: incomplete "
        "metadata, file not fully covered); save it again"
    )
    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"\(7 bytes\) is not a readable safetensors file"):
        ckpt.read_state_dict(weights)
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path))) + " is a directory"):
        ckpt.read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"weights file .*nothing\.bin' does not exist"):
        ckpt.read_state_dict(tmp_path / "nothing.bin")
    pickle = tmp_path / "mm_projector.bin"
    torch.save({"w": torch.arange(1000.0)}, pickle)
    pickle.write_bytes(pickle.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"mm_projector\.bin' \(500 bytes\) cannot be read as"):
        ckpt.read_state_dict(pickle)


def test_read_json_names_what_is_wrong(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1')
    with pytest.raises(ValueError, match=r"config file .*config\.json' is not valid JSON"):
        ckpt.read_json(path)
    path.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError) as error:
        ckpt.read_json(path)
    assert str(error.value) == (
        f"config file {str(path)!r} is not UTF-8 text (byte 7: invalid continuation byte); "
        "is it a JSON file?"
    )
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        ckpt.read_json(path)
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path))) + " is a directory"):
        ckpt.read_json(tmp_path)


def test_check_torch_archive(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: torch.zeros(100)}}, path)
    ckpt.check_torch_archive(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"optimizer\.pt' \(300 bytes\) is not a complete"):
        ckpt.check_torch_archive(path)


def test_projector_weights_path_that_is_a_directory(tmp_path):
    connector = tiny_connector(0)
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path))) + " is a directory"):
        connector.load_projector_weights(tmp_path)


def test_write_state_dict_names_the_file_it_cannot_write(tmp_path):
    target = tmp_path / "missing" / "model.safetensors"
    with pytest.raises(OSError, match=r"cannot write weights file .*missing/model\.safetensors"):
        ckpt.write_state_dict({"w": torch.zeros(2)}, target)


# ---------------------------------------------------------------------------- fingerprints


def test_fingerprint_tensors_is_exact_and_weight_dependent():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 7, generator=generator), torch.randn(5, generator=generator)
    reference = ckpt.fingerprint_tensors([("a", a), ("b", b)])
    assert ckpt.fingerprint_tensors([("b", b.clone()), ("a", a.clone())]) == reference
    assert ckpt.fingerprint_tensors([("a", a.t().contiguous().t()), ("b", b)]) == reference
    nudged = a.clone()
    nudged[123, 4] = torch.nextafter(nudged[123, 4], torch.tensor(10.0))  # one ulp, not sampled
    different = [
        [("a", nudged), ("b", b)],
        [("a", a), ("c", b)],
        [("a", a.reshape(7, 300)), ("b", b)],
        [("a", a.double()), ("b", b)],
        [("a", a)],
    ]
    for tensors in different:
        assert ckpt.fingerprint_tensors(tensors) != reference


# ---------------------------------------------------------------------------- LLaVA codebase swap


def test_llava_codebase_save_is_atomic_and_a_corrupt_file_is_named(tmp_path):
    """The swap for LLaVA's own code (its model classes re-created in
    tests/support/llava_codebase_toys.py)."""
    pytest.importorskip("transformers")
    from mmconnect.integrations.codebases.llava import (
        restore_connector,
        save_pretrained,
        swap_connector,
    )
    from tests.support.llava_codebase_toys import (
        LlavaLlamaForCausalLM,
        connector,
        llava_config,
        save_clip,
    )

    save_clip(tmp_path / "clip", 112)
    llava = LlavaLlamaForCausalLM(llava_config(tmp_path / "clip"))
    llava.get_vision_tower().load_model()
    swap_connector(llava.get_model(), connector("dc-sci-clip-l-336", seed=4))
    target = tmp_path / "swapped"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    save_pretrained(llava, target, safe_serialization=True)
    assert "notes.txt" in {p.name for p in target.iterdir()}
    assert (target / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    before = tree_hashes(target)
    llava.config.second_save = True  # the new config.json differs from the saved one
    with pytest.raises(RuntimeError, match="failed midway"):
        save_pretrained(llava, target, safe_serialization=True, state_dict=_Exploding())
    assert tree_hashes(target) == before
    # HF's own save, not atomic, has rewritten config.json by the time it fails
    plain = tmp_path / "plain"
    shutil.copytree(target, plain)
    with pytest.raises(RuntimeError, match="failed midway"):
        llava.save_pretrained(plain, safe_serialization=True, state_dict=_Exploding())
    assert tree_hashes(plain) != before
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(repr(str(weights))) + r" \(\d+ bytes\) is not"):
        restore_connector(llava, target)


class _Exploding(dict):
    """A ``state_dict=`` that fails once the save has started writing (after config.json)."""

    def items(self):
        raise RuntimeError("failed midway")

    def keys(self):
        raise RuntimeError("failed midway")
