"""Two-stage training on the HF Trainer: freezing, learning rates, LoRA, logging, resuming."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_toys import ToyDataset, build_model, collate
from transformers import TrainerCallback

from mmconnect.integrations.training import (
    LoraSettings,
    StageConfig,
    parameter_groups,
    prepare_stage,
    train_stage,
)


def stage(tmp_path, name: str = "align", **overrides) -> StageConfig:
    options = {
        "stage": name,
        "output_dir": str(tmp_path / name),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "disable_tqdm": True,
        **overrides,
    }
    return StageConfig(**options)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {
        name
        for name, tensor in module.state_dict().items()
        if not torch.equal(tensor, before[name])
    }


def test_stage_one_trains_only_the_connector(tmp_path, caplog):
    model = build_model()
    tower, llm = snapshot(model.model.vision_tower), snapshot(model.model.language_model)
    connector = snapshot(model.connector)
    with caplog.at_level(logging.INFO, logger="mmconnect.integrations.training"):
        result = train_stage(model, ToyDataset(), collate, stage(tmp_path))
    assert changed(tower, model.model.vision_tower) == set()
    assert changed(llm, model.model.language_model) == set()
    assert changed(connector, model.connector) >= {"projector.0.weight", "projector.2.weight"}
    assert len(result.losses) == 4
    logged = caplog.text
    assert "stage align: connector" in logged and "vision_tower" in logged and "llm" in logged
    assert (tmp_path / "align" / "model.safetensors").is_file()


def test_parameter_groups_and_learning_rates_of_stage_two(tmp_path):
    model = build_model()
    trainable = prepare_stage(model, stage(tmp_path, "instruct"))
    groups = parameter_groups(trainable)
    assert groups["vision_tower"][0] == 0
    assert groups["connector"][0] == groups["connector"][1] > 0
    assert groups["llm"][0] == groups["llm"][1] > 0
    assert stage(tmp_path, "instruct").rates == (2e-5, 2e-5)
    assert stage(tmp_path, "instruct", lora=LoraSettings()).rates == (2e-4, 2e-5)
    assert stage(tmp_path).rates == (1e-3, 1e-3)


def test_connector_gets_its_own_learning_rate(tmp_path):
    from mmconnect.integrations.training import DenseConnectorTrainer

    model = build_model()
    config = stage(tmp_path, "instruct", learning_rate=1e-4, connector_learning_rate=5e-3)
    trainable = prepare_stage(model, config)
    trainer = DenseConnectorTrainer(
        model=trainable,
        args=config.training_arguments(),
        train_dataset=ToyDataset(),
        data_collator=collate,
        connector_learning_rate=config.rates[1],
    )
    optimizer = trainer.create_optimizer()
    connector_ids = {id(p) for p in model.connector.parameters()}
    by_rate = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_rate[5e-3] == connector_ids
    assert by_rate[1e-4] and not (by_rate[1e-4] & connector_ids)


def test_lora_adapts_only_the_llm(tmp_path):
    model = build_model()
    config = stage(
        tmp_path,
        "instruct",
        lora=LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
    )
    trainable = prepare_stage(model, config)
    lora_names = [name for name, _ in trainable.named_parameters() if "lora_" in name]
    assert lora_names and all("language_model" in name for name in lora_names)
    assert not any("vision_tower" in name for name in lora_names)
    groups = parameter_groups(trainable)
    assert groups["vision_tower"][0] == 0 and groups["llm"][0] == 0 and groups["lora"][0] > 0
    assert groups["connector"][0] > 0


def test_lora_stage_trains_and_saves_a_merged_dense_model(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = build_model()
    config = stage(tmp_path, "instruct", lora=LoraSettings(rank=4, alpha=8), max_steps=2)
    result = train_stage(model, ToyDataset(), collate, config)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct")
    batch = collate([ToyDataset()[0]])
    with torch.no_grad():
        expected = result.model(**batch).logits
        actual = loaded(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_resuming_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    uninterrupted = train_stage(
        build_model(), ToyDataset(), collate, stage(tmp_path / "a", max_steps=6)
    )
    interrupted_config = stage(tmp_path / "b", max_steps=6, save_steps=3)
    # The "interrupted" run: the same schedule, stopped after its step-3 checkpoint.
    first = train_stage(
        build_model(), ToyDataset(), collate, interrupted_config, callbacks=[_StopAt(3)]
    )
    assert [step for step, _ in first.losses] == [1, 2, 3]
    resumed = train_stage(
        build_model(seed=1),  # other initial weights: everything must come from the checkpoint
        ToyDataset(),
        collate,
        interrupted_config,
        resume_from_checkpoint=tmp_path / "b" / "align" / "checkpoint-3",
    )
    losses = dict(first.losses) | dict(resumed.losses)
    expected = dict(uninterrupted.losses)
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_resuming_from_a_checkpoint_of_another_connector_config_is_refused(tmp_path):
    config = stage(tmp_path, max_steps=2, save_steps=2)
    train_stage(build_model(), ToyDataset(), collate, config)
    other = build_model(groups=((0, 2), (1, 3)))  # same shapes, other layers
    with pytest.raises(ValueError, match="saved with a different connector config"):
        train_stage(
            other,
            ToyDataset(),
            collate,
            config,
            resume_from_checkpoint=tmp_path / "align" / "checkpoint-2",
        )


def test_bad_stage_arguments(tmp_path):
    with pytest.raises(ValueError, match="stage must be 'align' or 'instruct'"):
        StageConfig(stage="pretrain", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="lora is for stage 'instruct'"):
        StageConfig(stage="align", output_dir=str(tmp_path), lora=LoraSettings())
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        StageConfig(stage="align", output_dir=str(tmp_path), learning_rate=0.0)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot be written"):
        train_stage(
            build_model(), ToyDataset(), collate, stage(tmp_path, output_dir=str(blocker / "out"))
        )


class _StopAt(TrainerCallback):
    """Ends training after ``step`` (simulates an interruption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.slow
def test_two_process_data_parallel_equals_single_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 2 each == one process with batch 4."""
    worker = Path(__file__).with_name("ddp_worker.py")
    environment = {**os.environ, "PYTHONPATH": str(worker.parent), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "single"), "4"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(worker),
            str(tmp_path / "parallel"),
            "2",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "single" / "model.safetensors"))
    two = load_file(str(tmp_path / "parallel" / "model.safetensors"))
    assert one.keys() == two.keys()
    initial = build_model().state_dict()
    connector_keys = [key for key in one if "multi_modal_projector.projector" in key]
    assert connector_keys and all(not torch.equal(one[key], initial[key]) for key in connector_keys)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-5)
