"""``mmconnect export`` in a fresh process, and the export loaded where mmconnect cannot be imported.

The Dense model and what it computes are made here; the export runs as users run it
(``python -m mmconnect.integrations.cli export``), and a second fresh interpreter that refuses
every ``mmconnect`` import loads the result with transformers' Auto classes, runs the processor
and the model and compares with the Dense model's prompt ids, logits and greedy tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmconnect import ConnectorConfig, DCISpec, STISpec
from mmconnect.integrations.applications.tiny_models import (
    tiny_dense_llava,
    tiny_llava_processor,
    tiny_llava_tokenizer,
    tiny_vision_config,
)
from tests.support import llava_toys

SIZE = 28
PROMPT = "USER : <image> what is in the image ASSISTANT :"

# Runs in a fresh interpreter: argv[1] the export, argv[2] the expected values. Any import of
# mmconnect fails, so the export must load with transformers alone.
_LOAD_WITHOUT_MMCONNECT = """
import json, sys
from importlib.abc import MetaPathFinder

class RefuseMmconnect(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mmconnect" or name.startswith("mmconnect."):
            raise ImportError("mmconnect must not be imported here: " + name)
        return None

sys.meta_path.insert(0, RefuseMmconnect())
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
expected = load_file(sys.argv[2])
image = Image.new("RGB", (40, 30), (200, 10, 10))
inputs = processor(images=[image], text=[sys.argv[3]], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
print(json.dumps({
    "classes": [type(model).__name__, type(processor).__name__],
    "model_type": model.config.model_type,
    "same_ids": torch.equal(inputs["input_ids"], expected["input_ids"]),
    "logit_difference": (logits - expected["logits"]).abs().max().item(),
    "same_tokens": torch.equal(tokens, expected["tokens"]),
    "mmconnect_imported": any(name.split(".")[0] == "mmconnect" for name in sys.modules),
}))
"""


def run(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        check=False,
    )


def save_dense(directory: Path, fusion) -> tuple:
    """A tiny Dense LLaVA (CLIP, 4 blocks, 2x2 grid) and its processor saved to ``directory``."""
    connector = ConnectorConfig(vision_dim=16, llm_dim=32, num_layers=4, fusion=fusion)
    model = tiny_dense_llava(
        seed=5,
        connector=connector,
        vision_config=tiny_vision_config("clip", width=16, image_size=SIZE),
        text_config=llava_toys.llm_config(),
        image_token_id=llava_toys.IMAGE,
    )
    processor = tiny_llava_processor(tiny_llava_tokenizer(), connector, image_size=SIZE)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


@pytest.mark.slow  # two fresh interpreters importing transformers
def test_exported_dci_model_loads_and_answers_without_mmconnect(tmp_path):
    model, processor = save_dense(tmp_path / "dense", DCISpec(groups=((0, 1), (2, 3))))
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        expected = {
            "input_ids": inputs["input_ids"],
            "logits": model(**inputs).logits,
            "tokens": model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0),
        }
    save_file(expected, tmp_path / "expected.safetensors")

    exported = run("-m", "mmconnect.integrations.cli", "export", "dense", "stock", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert lines[0] == "LlavaForConditionalGeneration written to stock"
    assert lines[1] == (
        "vision_feature_layer=[3, 0, 1, 2] (4 layers), vision_feature_select_strategy='default'"
    )
    assert lines[2].startswith("projector input 48 -> 64 channels, 4 image tokens")
    assert lines[3].startswith("self-check: visual tokens differ by ")

    loaded = run(
        "-c",
        _LOAD_WITHOUT_MMCONNECT,
        "stock",
        "expected.safetensors",
        PROMPT,
        cwd=tmp_path,
    )
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["classes"] == ["LlavaForConditionalGeneration", "LlavaProcessor"]
    assert report["model_type"] == "llava"
    assert report["same_ids"] and report["same_tokens"]
    assert report["logit_difference"] <= 1e-5
    assert not report["mmconnect_imported"]


# In-process: the command's refusals (exit status and message; nothing written).


def test_export_command_refuses_sti_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from mmconnect.integrations.cli import main

    save_dense(tmp_path / "dense", STISpec(extra_layers=(1, 2), window=2))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "dense", "stock"]) == 2
    assert (
        "mmconnect export: cannot export a connector with fusion 'sti' to stock LLaVA: STI "
        "appends each extra layer's pooled tokens"
    ) in capsys.readouterr().err
    assert not (tmp_path / "stock").exists()


def test_export_command_names_a_missing_directory(tmp_path, capsys, monkeypatch):
    from mmconnect.integrations.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", "absent", "stock"]) == 2
    assert "mmconnect export: model directory not found: 'absent'" in capsys.readouterr().err
