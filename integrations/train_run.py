"""One YAML file per training run: ``mmconnect train --config FILE.yaml``.

Example file::

    model: runs/demo/dci/stage1        # a Dense LLaVA directory with its processor
    output_dir: runs/my-run
    data:
      image_folder: data
      stage1: data/stage1.json         # omit a stage's file to skip that stage
      stage2: data/stage2.json
      stage1_template: plain
      stage2_template: vicuna_v1
      max_length: 512
    stage1:                            # every StageConfig field except stage / output_dir
      max_steps: 200
      per_device_train_batch_size: 16
    stage2:
      learning_rate: 2.0e-4
      lora: {rank: 8, alpha: 16, dropout: 0.05}

Stage 2 starts from stage 1's result when both run. Every record is validated before training;
problems (missing or unreadable images, ``<image>`` counts, truncation) are listed, never
silently dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmconnect.integrations.training import LoraSettings, StageConfig, train_stage


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """Where the LLaVA JSON files and images are, and how to render them."""

    image_folder: str
    stage1: str | None = None
    stage2: str | None = None
    stage1_template: str = "plain"
    stage2_template: str = "vicuna_v1"
    max_length: int | None = None


@dataclass(frozen=True, kw_only=True)
class TrainRun:
    """A two-stage run: the starting model, the data, and both stages' options."""

    model: str
    output_dir: str
    data: DataSettings
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)

    def stage_config(self, stage: str) -> StageConfig:
        """The :class:`StageConfig` of ``"align"`` (stage1) or ``"instruct"`` (stage2)."""
        section = "stage1" if stage == "align" else "stage2"
        options = dict(getattr(self, section))
        reserved = sorted({"stage", "output_dir"} & set(options))
        if reserved:
            raise ValueError(
                f"{section} may not set {reserved}: the run decides the stage, and output_dir/{section} "
                "is where it goes"
            )
        if "lora" in options and options["lora"] is not None:
            options["lora"] = _build(LoraSettings, options["lora"], f"{section}.lora")
        return _build(
            StageConfig,
            {**options, "stage": stage, "output_dir": str(Path(self.output_dir) / section)},
            section,
        )


def _build(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{section} must be a mapping of {cls.__name__} fields, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    reserved = {"stage", "output_dir"} if cls is StageConfig else set()
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown keys in {section}: {unknown}; known keys: {sorted(known - reserved)}"
        )
    if isinstance(values.get("target_modules"), list):
        values = {**values, "target_modules": tuple(values["target_modules"])}
    return cls(**values)


def load_train_run(path: str | Path) -> TrainRun:
    """Read and check a run file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, unknown or missing keys (named), a stage section that is not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} must hold a mapping with model, output_dir, data, stage1, stage2"
        )
    missing = sorted({"model", "output_dir", "data"} - set(data))
    if missing:
        raise ValueError(f"{str(path)!r} is missing {missing}")
    run = _build(TrainRun, {**data, "data": _build(DataSettings, data["data"], "data")}, str(path))
    for stage in ("align", "instruct"):
        run.stage_config(stage)  # fail on a bad stage section before any work
    return run


def run_training(run: TrainRun) -> dict[str, Any]:
    """Run the stages ``run`` asks for; returns their loss curves and output directories.

    Raises:
        ValueError: the data have problems (all listed) or no stage has a data file.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmconnect.integrations.data import (
        DataCollator,
        LlavaDataset,
        load_llava_json,
    )

    stages = [
        (stage, path, template)
        for stage, path, template in (
            ("align", run.data.stage1, run.data.stage1_template),
            ("instruct", run.data.stage2, run.data.stage2_template),
        )
        if path
    ]
    if not stages:
        raise ValueError("the run has no data: set data.stage1 and/or data.stage2")
    model = AutoModelForImageTextToText.from_pretrained(run.model)
    processor = AutoProcessor.from_pretrained(run.model)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    image_tokens = model.model.image_tokens_per_image()
    results: dict[str, Any] = {}
    for stage, path, template in stages:
        dataset = LlavaDataset(
            load_llava_json(path),
            image_folder=run.data.image_folder,
            template=template,
            tokenizer=tokenizer,
            image_processor=image_processor,
            image_tokens=image_tokens,
            image_token_id=model.config.image_token_id,
            max_length=run.data.max_length,
        )
        dataset.validate(strict=True)  # every problem listed before any training
        config = run.stage_config(stage)
        result = train_stage(model, dataset, DataCollator.from_tokenizer(tokenizer), config)
        processor.save_pretrained(config.output_dir)
        model = result.model
        results[stage] = {"losses": result.losses, "output_dir": str(result.output_dir)}
    return results
