"""Two-process FSDP (FSDP2 through the HF Trainer and accelerate, gloo on the CPU) equals training
in one process with the same global batch, and its checkpoints reload in a single process.

accelerate (1.16) enables FSDP only on accelerator devices and trains a CPU run with DDP instead
(with the warning :func:`train_stage` logs, tested below); the worker switches accelerate's CPU
state to its FSDP state with the Trainer's own plugin, so the Trainer's and accelerate's FSDP2
code runs unchanged on gloo. One single-process run and one torchrun run (``tests/support/sharded_worker.py``) train stage 1
(connector), stage 2 full and stage 2 LoRA for three steps each; the tests compare their losses,
final parameters, saved checkpoints and logits. Measured on this machine: the parameters of the
two runs differ by at most 2.5e-7 (stage 2 full), 1.3e-8 (stage 1) and 7.5e-9 (stage 2 LoRA),
the losses by at most 4.8e-7 (stage 1: not at all): the sharded gradients are reduced in another
order, and Adam (update ~ lr x gradient / sqrt(its square)) carries rounding differences of tiny
gradients into the parameters. The bound 1e-5 is 1 % of one step at lr 1e-3 and 40 times the
largest difference measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.paths import REPO_ROOT
from tests.support.training_toys import ToyDataset, build_model, collate

WORKER = REPO_ROOT / "tests" / "support" / "sharded_worker.py"
STAGES = ("align", "instruct", "instruct-lora")
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}

pytestmark = pytest.mark.slow


def _run(command: list[str]) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``(folder, the torchrun process)``: ``none-STAGE`` (one process, batch 4),
    ``fsdp-STAGE`` (two processes under FSDP2, batch 2 each) and ``fsdp-requested-align`` (two
    processes asking for FSDP without the CPU shim: accelerate trains with DDP)."""
    folder = tmp_path_factory.mktemp("sharded")
    _run([sys.executable, str(WORKER), str(folder), "4", *(f"none:{s}" for s in STAGES)])
    sharded = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(folder),
            "2",
            "fsdp-requested:align",
            *(f"fsdp:{s}" for s in STAGES),
        ]
    )
    return folder, sharded


def _record(folder: Path, run: str) -> dict:
    return json.loads((folder / run / "run.json").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_fsdp_training_equals_one_process(runs, stage):
    folder, _ = runs
    one, two = _record(folder, f"none-{stage}"), _record(folder, f"fsdp-{stage}")
    assert two["sharded"] and not one["sharded"]  # FSDP really sharded the parameters
    assert [step for step, _ in two["losses"]] == [1, 2, 3]
    torch.testing.assert_close(
        torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-6, rtol=1e-6
    )
    single = load_file(str(folder / f"none-{stage}" / "model.safetensors"))
    sharded = load_file(str(folder / f"fsdp-{stage}" / "model.safetensors"))
    assert single.keys() == sharded.keys()
    assert not any("lora_" in key or "base_layer" in key for key in sharded)  # merged
    initial = build_model().state_dict()
    trained = [key for key in single if not torch.equal(single[key], initial[key])]
    assert any("multi_modal_projector.projector" in key for key in trained)
    assert any("language_model" in key for key in trained) == (stage != "align")
    assert all(not key.startswith("model.vision_tower") for key in trained)
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], **TOLERANCE, msg=key)


def test_fsdp_requested_on_the_cpu_falls_back_to_ddp_with_a_warning(runs):
    folder, sharded = runs
    record = _record(folder, "fsdp-requested-align")
    assert not record["sharded"]
    assert "FSDP requested but accelerate runs without it (distributed type MULTI_CPU)" in (
        sharded.stderr
    )
    single = load_file(str(folder / "none-align" / "model.safetensors"))
    ddp = load_file(str(folder / "fsdp-requested-align" / "model.safetensors"))
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], **TOLERANCE, msg=key)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    batch = collate([ToyDataset()[index] for index in range(4)])
    batch.pop("labels")
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("stage", STAGES)
def test_fsdp_checkpoints_reload_in_one_process(runs, stage):
    """The stage folder written under FSDP loads with the Auto class and the Dense class and
    gives the logits of the single-process run; the Trainer's ``checkpoint-3`` written under
    FSDP (the full model, or LoRA adapters with the connector) gives the stage folder's."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration

    folder, _ = runs
    stage_folder = folder / f"fsdp-{stage}"
    final = AutoModelForImageTextToText.from_pretrained(stage_folder)
    assert type(final) is DenseLlavaForConditionalGeneration
    reference = _logits(
        DenseLlavaForConditionalGeneration.from_pretrained(folder / f"none-{stage}")
    )
    logits = _logits(final)
    torch.testing.assert_close(logits, reference, **TOLERANCE)
    checkpoint = stage_folder / "checkpoint-3"
    if stage == "instruct-lora":
        adapted = PeftModel.from_pretrained(build_model(), checkpoint).merge_and_unload()
        torch.testing.assert_close(_logits(adapted), logits, atol=1e-6, rtol=1e-6)
    else:
        resumed = DenseLlavaForConditionalGeneration.from_pretrained(checkpoint)
        assert torch.equal(_logits(resumed), logits)


@pytest.mark.parametrize("stage", STAGES)
def test_fsdp_checkpoints_pass_the_resume_check(runs, stage, tmp_path):
    """``check_resume_checkpoint`` accepts a ``checkpoint-N`` written under FSDP (its
    ``torch.save`` files are ``.bin``) and refuses one whose FSDP optimizer state is truncated."""
    import shutil

    from mmconnect.integrations.training.stages import check_resume_checkpoint

    folder, _ = runs
    checkpoint = folder / f"fsdp-{stage}" / "checkpoint-3"
    check_resume_checkpoint(checkpoint, build_model())
    broken = shutil.copytree(checkpoint, tmp_path / "checkpoint-3")
    optimizer = broken / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"optimizer\.bin.* is not a complete torch\.save file"):
        check_resume_checkpoint(broken, build_model())
