"""The command line as users run it: every command in a fresh process (``python -m mmconnect.integrations.cli``).

A test that calls ``main([...])`` inside the test process sees whatever earlier tests imported
(the Dense model types registered by importing the demo, for instance); a fresh process sees only
what the command itself imports. The user flow of the docs runs here end to end: demo -> a run
file -> ``train --config`` -> ``chat`` on the result.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import REPO_ROOT
from tests.support.saved_models import save_tiny_dense_llava

ROOT = REPO_ROOT


def mmconnect(*arguments: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``mmconnect ARGUMENTS`` in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, "-m", "mmconnect.integrations.cli", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def python(code: str, *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def snapshot(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``folder``."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A saved tiny Dense LLaVA with its processor (made in this process, loaded in others)."""
    return save_tiny_dense_llava(tmp_path_factory.mktemp("dense") / "model")


def _user_files(folder: Path) -> dict[str, str]:
    """Files a user keeps where the demo would write (same names) and beside them."""
    (folder / "data" / "images").mkdir(parents=True)
    (folder / "data" / "stage1.json").write_text('[{"id": "mine"}]\n')
    (folder / "data" / "images" / "train_00000.png").write_bytes(b"my own picture")
    (folder / "data" / "images" / "eval_00001.png").write_bytes(b"another of mine")
    (folder / "notes.txt").write_text("do not lose me\n")
    return snapshot(folder)


# ---------------------------------------------------------------------------- model types


def test_saved_dense_llava_loads_with_the_auto_classes_after_importing_integrations(
    dense_dir, tmp_path
):
    code = f"""
import json
import mmconnect.integrations as integrations
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
integrations.register_dense_models()  # idempotent: a second registration changes nothing
from mmconnect.integrations.families import llava
from mmconnect.integrations.families.protocol import register_family
register_family(llava.FAMILY)  # the same family again: nothing changes
path = {str(dense_dir)!r}
print(json.dumps({{
    "config": AutoConfig.from_pretrained(path).model_type,
    "model": type(AutoModel.from_pretrained(path)).__name__,
    "generation": type(AutoModelForImageTextToText.from_pretrained(path)).__name__,
    "processor": type(AutoProcessor.from_pretrained(path)).__name__,
    "types": [AutoConfig.for_model(name).model_type
              for name in ("dense_llava", "dense_llava_next", "dense_mgm")],
    "error": integrations.REGISTRATION_ERROR,
}}))
"""
    result = python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "config": "dense_llava",
        "model": "DenseLlavaModel",
        "generation": "DenseLlavaForConditionalGeneration",
        "processor": "DenseLlavaProcessor",
        "types": ["dense_llava", "dense_llava_next", "dense_mgm"],
        "error": None,
    }


def test_integrations_import_without_transformers_and_say_what_to_install(tmp_path):
    # A core-only install: transformers cannot be imported. The subpackage still imports, the
    # codebase swap (core only) works, nothing is printed, and the reason is kept.
    code = """
import importlib.abc, sys
class NoTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTransformers())
import mmconnect.integrations as integrations
import mmconnect.integrations.codebases.llava
print(integrations.REGISTRATION_ERROR)
"""
    result = python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == (
        'transformers is not installed; install the Hugging Face extra: pip install "mmconnect[hf]"'
    )


def test_inspect_a_saved_dense_llava_in_a_fresh_process(dense_dir, tmp_path):
    result = mmconnect("inspect", str(dense_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "encoder        CLIPVisionModel" in result.stdout
    assert "token grid     4x4 at 48 px" in result.stdout


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("0", "argument --image-size: expected a whole number >= 1, got '0'"),
        ("-3", "argument --image-size: expected a whole number >= 1, got '-3'"),
        (
            "64",
            "--image-size 64 is not a size CLIPVisionModel accepts: it takes 48 px images only",
        ),
    ],
)
def test_inspect_refuses_an_image_size_the_tower_does_not_take(dense_dir, tmp_path, size, message):
    result = mmconnect("inspect", str(dense_dir), "--image-size", size, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_train_reports_every_problem_of_a_run_file_as_file_field_problem(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "model: no/such/model\n"
        "output_dir: out\n"
        "data: {stage1: s1.json}\n"
        "stage1: {max_steps: ten, learning_rate: 1e-3}\n"
        "stage2:\n  lora: {rank: -4}\n"
    )
    result = mmconnect("train", "--config", "run.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.removeprefix("mmconnect train: ").strip().splitlines()
    assert lines == [
        "run.yaml:data.image_folder: missing (required)",
        "run.yaml:data.stage1: 's1.json' does not exist or is not a file",
        "run.yaml:stage1.max_steps: expected a whole number, got 'ten'",
        "run.yaml:stage2.lora.rank: must be a positive int, got -4",
        "run.yaml:model: 'no/such/model' does not exist or is not a folder; expected a saved "
        "Dense LLaVA folder (for example a demo's dci/stage1)",
    ]
    assert not (tmp_path / "out").exists()


def test_chat_names_a_missing_image_before_loading_the_model(dense_dir, tmp_path):
    result = mmconnect(
        "chat", "--model", str(dense_dir), "--image", "nope.png", "what?", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "nope.png" in result.stderr and "Traceback" not in result.stderr


def test_demo_refuses_a_folder_it_did_not_create_and_leaves_it_byte_identical(tmp_path):
    before = _user_files(tmp_path / "mine")
    result = mmconnect("demo", "--quick", "--output", "mine", cwd=tmp_path)
    assert result.returncode == 2
    assert "output_dir (--output) 'mine' is not empty" in result.stderr
    assert "--overwrite" in result.stderr
    assert snapshot(tmp_path / "mine") == before


def test_demo_refuses_a_bad_llm_path_before_writing_anything(tmp_path):
    # The reported loss: with a bad --llm the demo overwrote the data set, then failed.
    before = _user_files(tmp_path / "mine")
    result = mmconnect(
        "demo", "--quick", "--overwrite", "--output", "mine", "--llm", "no/such/llm", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "llm_path (--llm) 'no/such/llm' is not a folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path / "mine") == before


@pytest.mark.parametrize(("option", "value"), [("--threads", "0"), ("--jobs", "two")])
def test_demo_refuses_a_bad_thread_or_job_count(tmp_path, option, value):
    result = mmconnect("demo", option, value, cwd=tmp_path)
    assert result.returncode == 2
    assert f"argument {option}: expected a whole number >= 1, got '{value}'" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the user flow


@pytest.mark.slow
def test_demo_then_train_from_a_run_file_then_chat_each_in_a_fresh_process(tmp_path):
    """The documented flow, command by command, as a user types it."""
    demo = mmconnect("demo", "--quick", "--connectors", "dci", "--output", "demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "demo" / ".mmconnect-demo").is_file()
    run = {
        "model": "demo/dci/stage1",
        "output_dir": "run",
        "data": {
            "image_folder": "demo/data",
            "stage1": "demo/data/stage1.json",
            "stage2": "demo/data/stage2.json",
        },
        "stage1": {"max_steps": 2, "per_device_train_batch_size": 4, "disable_tqdm": True},
        "stage2": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "disable_tqdm": True,
            "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
    }
    # 1e-3 as people write it: PyYAML reads it as text; the run file accepts it as a number.
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    text = (
        (tmp_path / "run.yaml")
        .read_text()
        .replace("stage1:\n", "stage1:\n  learning_rate: 1e-3\n", 1)
    )
    (tmp_path / "run.yaml").write_text(text)
    train = mmconnect("train", "--config", "run.yaml", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "align: final loss" in train.stdout and "instruct: final loss" in train.stdout
    for stage in ("stage1", "stage2"):
        assert (tmp_path / "run" / stage / ".mmconnect-train").is_file()
        assert (tmp_path / "run" / stage / "model.safetensors").is_file()
    chat = mmconnect(
        "chat",
        "--model",
        "run/stage2",
        "--image",
        "demo/data/images/eval_00000.png",
        "--max-new-tokens",
        "4",
        "What colour is the shape?",
        cwd=tmp_path,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() != ""
    # A second training run into the same stage folders: they are training's own, so allowed.
    again = mmconnect("train", "--config", "run.yaml", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_demo_with_overwrite_replaces_only_its_own_files(tmp_path):
    before = _user_files(tmp_path / "mine")
    (tmp_path / "mine" / "data" / "images" / "train_99999.png").write_bytes(b"mine too")
    result = mmconnect(
        "demo", "--quick", "--connectors", "dci", "--overwrite", "--output", "mine", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    after = snapshot(tmp_path / "mine")
    # Files the demo does not write are untouched; same-named ones are the demo's now.
    assert after["notes.txt"] == before["notes.txt"]
    assert (tmp_path / "mine" / "data" / "images" / "train_99999.png").read_bytes() == b"mine too"
    for name in ("data/stage1.json", "data/images/train_00000.png", "data/images/eval_00001.png"):
        assert after[name] != before[name], name
    marker = json.loads((tmp_path / "mine" / ".mmconnect-demo").read_text())
    assert "notes.txt" not in marker["files"] and "data/stage1.json" in marker["files"]


@pytest.mark.slow
def test_demo_takes_tower_and_llm_from_a_saved_dense_llava_in_a_fresh_process(dense_dir, tmp_path):
    result = mmconnect(
        "demo",
        "--quick",
        "--connectors",
        "dci",
        "--vision",
        str(dense_dir),
        "--llm",
        str(dense_dir),
        "--output",
        "demo",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["connectors"]["dci"]["visual_tokens"] == 16  # the saved tower: 48 px / 12
    assert results["config"]["vision_path"] == results["config"]["llm_path"] == str(dense_dir)
