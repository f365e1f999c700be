"""Two-stage training on the HF Trainer: freezing, learning rates, LoRA, logging, resuming."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from mmconnect.integrations.training.stages import (
    BASE_FINGERPRINT_NAME,
    LoraSettings,
    StageConfig,
    base_fingerprint,
    check_resume_checkpoint,
    parameter_groups,
    prepare_stage,
    train_stage,
)
from tests.support.paths import REPO_ROOT
from tests.support.training_toys import ToyDataset, build_model, collate


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
    with caplog.at_level(logging.INFO, logger="mmconnect.integrations.training.stages"):
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
    from mmconnect.integrations.training.stages import DenseConnectorTrainer

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


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """An uninterrupted 6-step stage-1 run and one stopped after its step-3 checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    uninterrupted = train_stage(
        build_model(), ToyDataset(), collate, stage(root / "a", max_steps=6)
    )
    config = stage(root / "b", max_steps=6, save_steps=3)
    first = train_stage(build_model(), ToyDataset(), collate, config, callbacks=[_StopAt(3)])
    assert [step for step, _ in first.losses] == [1, 2, 3]
    return {
        "expected": dict(uninterrupted.losses),
        "first": dict(first.losses),
        "config": config,
        "checkpoint": root / "b" / "align" / "checkpoint-3",
    }


def with_new_connector(model, seed: int = 1):
    """The same base (tower, LLM) with another initialisation of the connector."""
    torch.manual_seed(seed)
    for parameter in model.connector.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return model


def with_other_llm(model):
    """The same tower and connector, an LLM whose weights differ in one matrix."""
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight.add_(0.01)
    return model


def resume(run, model, **overrides):
    config = dataclasses.replace(run["config"], **overrides)
    return train_stage(
        model, ToyDataset(), collate, config, resume_from_checkpoint=run["checkpoint"]
    )


def test_resuming_gives_the_losses_of_an_uninterrupted_run(interrupted_run):
    # same base, other connector weights: the connector must come from the checkpoint
    resumed = resume(interrupted_run, with_new_connector(build_model()))
    losses = interrupted_run["first"] | dict(resumed.losses)
    expected = interrupted_run["expected"]
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_checkpoints_record_the_base_fingerprint(interrupted_run):
    recorded = json.loads((interrupted_run["checkpoint"] / BASE_FINGERPRINT_NAME).read_text())
    assert recorded["base_fingerprint"] == base_fingerprint(build_model())
    assert set(recorded["base_fingerprint"]) == {"vision_tower", "language_model", "lm_head"}
    stage_folder = interrupted_run["checkpoint"].parent / BASE_FINGERPRINT_NAME
    assert json.loads(stage_folder.read_text()) == recorded


def test_resuming_onto_another_base_is_refused(interrupted_run):
    model = with_other_llm(build_model())
    saved = base_fingerprint(build_model())["language_model"]
    other = base_fingerprint(model)["language_model"]
    assert saved != other
    with pytest.raises(ValueError) as error:
        resume(interrupted_run, model)
    message = str(error.value)
    assert "trained on another base model" in message and "checkpoint-3" in message
    assert f"language_model: checkpoint {saved}, model {other}" in message
    assert "vision_tower" not in message and "allow_different_base=True" in message


def test_resuming_onto_another_base_with_the_override(interrupted_run, caplog):
    # a full checkpoint holds every weight: with the override the run continues exactly
    with caplog.at_level(logging.WARNING, logger="mmconnect.integrations.training.stages"):
        resumed = resume(interrupted_run, build_model(seed=1), allow_different_base=True)
    assert "allow_different_base=True" in caplog.text
    expected = interrupted_run["expected"]
    assert [step for step, _ in resumed.losses] == [4, 5, 6]
    for step, loss in resumed.losses:
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def copy_of_checkpoint(run, tmp_path):
    copy = tmp_path / "checkpoint-3"
    shutil.copytree(run["checkpoint"], copy)
    return copy


def test_resume_checkpoint_with_a_truncated_or_missing_file(interrupted_run, tmp_path, caplog):
    checkpoint = copy_of_checkpoint(interrupted_run, tmp_path)
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [
        BASE_FINGERPRINT_NAME,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "scheduler.pt",
        "trainer_state.json",
        "training_args.bin",
    ]
    model = build_model()
    check_resume_checkpoint(checkpoint, model)  # intact
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    with pytest.raises(ValueError) as error:
        check_resume_checkpoint(checkpoint, model)
    assert str(error.value) == (
        f"{str(optimizer)!r} (1000 bytes) is not a complete torch.save file: it is truncated "
        "or corrupt (File is not a zip file)"
    )
    optimizer.unlink()
    with caplog.at_level(logging.WARNING, logger="mmconnect.integrations.training.stages"):
        check_resume_checkpoint(checkpoint, model)
    assert "holds no optimizer state (optimizer.pt): the optimizer starts afresh" in caplog.text
    shutil.copy(interrupted_run["checkpoint"] / "optimizer.pt", optimizer)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ValueError, match=re.escape(repr(str(weights))) + r" \(\d+ bytes\) is"):
        check_resume_checkpoint(checkpoint, model)
    shutil.copy(interrupted_run["checkpoint"] / "model.safetensors", weights)
    (checkpoint / "trainer_state.json").write_text('{"global_step": ')
    with pytest.raises(ValueError, match=r"trainer state .*trainer_state\.json' is not valid JSON"):
        check_resume_checkpoint(checkpoint, model)
    (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError) as missing:
        train_stage(
            model,
            ToyDataset(),
            collate,
            interrupted_run["config"],
            resume_from_checkpoint=checkpoint,
        )
    assert str(missing.value) == (
        f"resume checkpoint {str(checkpoint)!r} has no trainer_state.json: it is not a complete "
        "Trainer checkpoint (was the save interrupted?); resume from another checkpoint-N folder"
    )


def test_resume_checkpoint_that_is_a_file(interrupted_run):
    weights = interrupted_run["checkpoint"] / "model.safetensors"
    with pytest.raises(ValueError, match=re.escape(repr(str(weights))) + " is a file; expected"):
        check_resume_checkpoint(weights, build_model())


def test_fingerprint_ignores_lora_wrapping_and_sees_dtype(tmp_path):
    model = build_model()
    before = base_fingerprint(model)
    lora = LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    assert base_fingerprint(prepare_stage(model, stage(tmp_path, "instruct", lora=lora))) == before
    assert base_fingerprint(build_model(seed=1)) != before
    half = base_fingerprint(build_model().to(torch.bfloat16))
    assert half["language_model"] != before["language_model"]


@pytest.mark.slow
def test_lora_resume_onto_another_base(tmp_path):
    """A LoRA checkpoint holds only the adapters and the connector: the base must be the same."""
    lora = LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))

    def config(name, **overrides):
        return stage(tmp_path / name, "instruct", lora=lora, max_steps=4, **overrides)

    expected = dict(train_stage(build_model(), ToyDataset(), collate, config("a")).losses)
    interrupted = config("b", save_steps=2)
    first = train_stage(build_model(), ToyDataset(), collate, interrupted, callbacks=[_StopAt(2)])
    checkpoint = tmp_path / "b" / "instruct" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    same = train_stage(
        build_model(), ToyDataset(), collate, interrupted, resume_from_checkpoint=checkpoint
    )
    losses = dict(first.losses) | dict(same.losses)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="fingerprints of language_model differ"):
        train_stage(
            with_other_llm(build_model()),
            ToyDataset(),
            collate,
            interrupted,
            resume_from_checkpoint=checkpoint,
        )
    allowed = dataclasses.replace(interrupted, allow_different_base=True)
    drifted = train_stage(
        with_other_llm(build_model()),
        ToyDataset(),
        collate,
        allowed,
        resume_from_checkpoint=checkpoint,
    )
    # the adapters resumed onto the other LLM: the losses are no longer the uninterrupted ones
    assert [step for step, _ in drifted.losses] == [3, 4]
    assert dict(drifted.losses)[3] != pytest.approx(expected[3], rel=1e-5, abs=1e-6)


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without an accelerator")
def test_bf16_without_an_accelerator_trains_on_the_cpu(tmp_path):
    """transformers refuses ``bf16=True`` without an accelerator unless ``use_cpu`` is set."""
    stage = StageConfig(stage="align", output_dir=str(tmp_path), bf16=True)
    arguments = stage.training_arguments()
    assert arguments.bf16 and arguments.use_cpu
    kept = StageConfig(
        stage="align",
        output_dir=str(tmp_path),
        bf16=True,
        extra_training_arguments={"use_cpu": False, "logging_first_step": True},
    )
    with pytest.raises(ValueError, match="use_cpu"):  # the caller's explicit False is kept
        kept.training_arguments()


def test_bad_stage_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"stage must be one of \('align', 'instruct'\)"):
        StageConfig(stage="pretrain", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="lora is for stage 'instruct'"):
        StageConfig(stage="align", output_dir=str(tmp_path), lora=LoraSettings())
    with pytest.raises(ValueError, match=r"learning_rate must be a positive number, got 0\.0"):
        StageConfig(stage="align", output_dir=str(tmp_path), learning_rate=0.0)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"stage": "pretrain"}, ValueError, r"stage must be one of \('align', 'instruct'\)"),
        (
            {"learning_rate": "1e-3"},
            TypeError,
            r"learning_rate must be a positive number, got '1e-3' \(str\)",
        ),
        (
            {"learning_rate": float("nan")},
            ValueError,
            "learning_rate must be a positive number, got nan",
        ),
        ({"num_train_epochs": 0}, ValueError, "num_train_epochs must be a positive number, got 0"),
        ({"max_steps": 0}, ValueError, "max_steps must be a positive int, got 0; or -1 to train"),
        ({"max_steps": 2.0}, TypeError, r"max_steps must be an int, got 2.0 \(float\)"),
        (
            {"per_device_train_batch_size": "4"},
            TypeError,
            "per_device_train_batch_size must be a positive int",
        ),
        (
            {"gradient_accumulation_steps": 0},
            ValueError,
            "gradient_accumulation_steps must be a positive int",
        ),
        ({"save_steps": 0}, ValueError, "save_steps must be a positive int, got 0"),
        ({"warmup_ratio": 1.0}, ValueError, r"warmup_ratio must be a number in \[0, 1\), got 1.0"),
        (
            {"weight_decay": -0.1},
            ValueError,
            "weight_decay must be a non-negative number, got -0.1",
        ),
        ({"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
        (
            {"dataloader_num_workers": -1},
            ValueError,
            "dataloader_num_workers must be a non-negative int",
        ),
        ({"bf16": "yes"}, TypeError, r"bf16 must be a bool \(True or False\), got 'yes'"),
        ({"train_vision_tower": 1}, TypeError, "train_vision_tower must be a bool"),
        ({"lora": {"rank": 4}}, TypeError, "lora must be a LoraSettings or None"),
        ({"extra_training_arguments": None}, TypeError, "extra_training_arguments must be a dict"),
    ],
)
def test_stage_config_checks_every_field(tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        StageConfig(**({"stage": "instruct", "output_dir": str(tmp_path)} | changes))


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"rank": 0}, ValueError, "rank must be a positive int, got 0"),
        ({"alpha": 16.0}, TypeError, r"alpha must be a positive int, got 16.0 \(float\)"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": None}, TypeError, r"dropout must be a number in \[0, 1\), got None"),
        (
            {"target_modules": "q_proj"},
            TypeError,
            "target_modules must be a sequence of linear-layer suffixes",
        ),
        (
            {"target_modules": ("q_proj", 3)},
            TypeError,
            r"target_modules\[1\] must be a non-empty str",
        ),
    ],
)
def test_lora_settings_check_every_field(changes, error, message):
    with pytest.raises(error, match=message):
        LoraSettings(**changes)
    assert LoraSettings(target_modules=["q_proj"]).target_modules == ("q_proj",)


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
    worker = REPO_ROOT / "tests" / "support" / "ddp_worker.py"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
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
