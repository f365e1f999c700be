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

Stage 2 starts from stage 1's result when both run. Paths are relative to the working
directory.

The whole file is checked before any work (:func:`load_train_run`): every problem is reported
as ``FILE:FIELD: problem`` (``run.yaml:stage2.lora.rank: must be a positive int, got -4``),
all of them at once. Numbers that YAML reads as text (``1e-3``: YAML 1.1 needs a dot,
``1.0e-3``) are accepted where a number is expected; ``max_steps: ten`` is not. Unknown keys,
missing ``data.image_folder``, a section that is not a mapping, paths that do not exist and
out-of-range values (a negative LoRA rank, a learning rate of 0) are refused.

Each stage trains into ``output_dir/stage1`` / ``output_dir/stage2``. A non-empty stage folder
that mmconnect training did not create (it has no ``.mmconnect-train`` file) is refused unless
``overwrite: true`` is set in the file (or ``--overwrite`` on the command line); then only the
files training writes are replaced (:mod:`mmconnect.integrations.applications.output_folders`).

Every record is validated before training; problems (missing or unreadable images, ``<image>``
counts, truncation) are listed, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmconnect.integrations.applications.output_folders import (
    check_output_folder,
    claim_output_folder,
)
from mmconnect.integrations.families.protocol import family_model, get_family, list_families
from mmconnect.integrations.training.stages import LoraSettings, StageConfig, train_stage
from mmconnect.validation import check_optional_int

#: The stage sections of a run file and their stages.
SECTIONS = {"stage1": "align", "stage2": "instruct"}


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """Where the LLaVA JSON files and images are, and how to render them."""

    image_folder: str
    stage1: str | None = None
    stage2: str | None = None
    stage1_template: str = "plain"
    stage2_template: str = "vicuna_v1"
    max_length: int | None = None

    def __post_init__(self) -> None:
        check_optional_int(
            self.max_length, "max_length", minimum=1, hint="None: no limit (tokens per sample)"
        )


@dataclass(frozen=True, kw_only=True)
class TrainRun:
    """A two-stage run: the starting model, the data, and both stages' options.

    Attributes:
        overwrite: train into non-empty stage folders that mmconnect training did not create.
    """

    model: str
    output_dir: str
    data: DataSettings
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False

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

    def stages(self) -> list[tuple[str, str, str]]:
        """``(stage, data file, template)`` of the stages that run (those with a data file)."""
        return [
            (stage, path, template)
            for stage, path, template in (
                ("align", self.data.stage1, self.data.stage1_template),
                ("instruct", self.data.stage2, self.data.stage2_template),
            )
            if path
        ]


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


# ---------------------------------------------------------------------------- validation


class RunFileError(ValueError):
    """Every problem of a run file, one ``FILE:FIELD: problem`` line each (in ``problems``)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


#: What each checked dataclass needs besides the one field being checked (:func:`_field_problem`);
#: a class not listed here (:class:`TrainRun`) has no checks of its own beyond the field types.
_REQUIRED_FIELDS: dict[type, dict[str, Any]] = {
    StageConfig: {"stage": "instruct", "output_dir": "."},
    LoraSettings: {},
    DataSettings: {"image_folder": "."},
}


def _field_problem(cls: type, name: str, value: Any) -> str | None:
    """What ``cls``'s own checks say about ``name=value`` alone, or ``None`` if they accept it.

    The ranges live in the dataclasses (``StageConfig``, ``LoraSettings``, ``DataSettings``):
    the reader converts the file's text to the field's type, then builds the class with that one
    field so that its message becomes the field's ``FILE:FIELD: problem`` line, while every other
    field is still checked (all problems at once).
    """
    if cls not in _REQUIRED_FIELDS:
        return None
    try:
        cls(**{**_REQUIRED_FIELDS[cls], name: value})
    except (TypeError, ValueError) as error:
        message = str(error)
        return message.removeprefix(f"{name} ")  # the line already names the field
    return None


class _Problems:
    """Collects ``FILE:FIELD: problem`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.lines.append(f"{self.path}:{where}: {problem}")


def _coerce(value: Any, hint: Any, where: str, problems: _Problems) -> tuple[bool, Any]:
    """``(ok, value converted to hint)``; a problem is recorded when not ok."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return True, None
        (hint,) = [option for option in options if option is not type(None)] or (Any,)
        origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is bool:
        if isinstance(value, bool):
            return True, value
        problems.add(where, f"expected true or false, got {value!r}")
        return False, None
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        problems.add(where, f"expected a whole number, got {value!r}")
        return False, None
    if hint is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as text: a number written that way is meant
            # as one.
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            problems.add(where, f"expected a number, got {value!r}")
            return False, None
        return True, number
    if hint is str:
        if isinstance(value, str):
            return True, value
        problems.add(where, f"expected text, got {value!r}")
        return False, None
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return True, value
        problems.add(where, f"expected one of {list(choices)}, got {value!r}")
        return False, None
    if origin is dict:
        if isinstance(value, dict):
            return True, value
        problems.add(where, f"expected a mapping, got {value!r}")
        return False, None
    if origin is tuple:
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return True, tuple(value)
        problems.add(where, f"expected a list of names, got {value!r}")
        return False, None
    return True, value  # a type this check does not know: the dataclass decides


def _check_fields(
    cls: type,
    values: Any,
    where: str,
    problems: _Problems,
    *,
    reserved: frozenset[str] = frozenset(),
    required: frozenset[str] = frozenset(),
) -> dict[str, Any] | None:
    """``values`` checked against ``cls``'s fields and converted; ``None`` if not a mapping."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.add(
            where,
            f"expected a mapping of {cls.__name__} fields (key: value lines), got "
            f"{type(values).__name__} {values!r}",
        )
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - reserved
    for name in sorted(set(values) - known):
        problem = (
            "is set by the run (the stage, and output_dir/<section>), not in the file"
            if name in reserved
            else f"unknown key; known keys: {', '.join(sorted(known))}"
        )
        problems.add(f"{where}.{name}" if where else str(name), problem)
    for name in sorted(required - set(values)):
        problems.add(f"{where}.{name}" if where else name, "missing (required)")
    checked: dict[str, Any] = {}
    for name in sorted(known & set(values)):
        key = f"{where}.{name}" if where else name
        if name == "lora" and cls is StageConfig:
            if values[name] is not None:
                lora = _check_fields(LoraSettings, values[name], key, problems)
                checked[name] = lora
            else:
                checked[name] = None
            continue
        ok, value = _coerce(values[name], hints[name], key, problems)
        if not ok:
            continue
        problem = _field_problem(cls, name, value)
        if problem is not None:
            problems.add(key, problem)
            continue
        if name == "lr_scheduler_type":
            from transformers import SchedulerType

            known_schedules = [schedule.value for schedule in SchedulerType]
            if value not in known_schedules:
                problems.add(key, f"expected one of {known_schedules}, got {value!r}")
                continue
        checked[name] = value
    return checked


def _check_model(model: str, problems: _Problems) -> None:
    """The starting model must be a saved Dense model folder with its processor, of a family
    whose images all fill the same number of tokens (the data pipeline encodes one count)."""
    from transformers import AutoConfig

    supported = [name for name in list_families() if get_family(name).fixed_image_tokens]
    directory = Path(model)
    if not directory.is_dir():
        problems.add(
            "model",
            f"{model!r} does not exist or is not a folder; expected a saved Dense LLaVA folder "
            "(for example a demo's dci/stage1)",
        )
        return
    if not (directory / "config.json").is_file():
        problems.add("model", f"{model!r} has no config.json; expected a saved Dense LLaVA folder")
        return
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, OSError, KeyError) as error:
        problems.add("model", f"{model!r}: config.json cannot be read: {error}")
        return
    if config.model_type not in supported:
        why = (
            "its images fill a number of tokens that depends on their size, and run files encode "
            "one count per image"
            if config.model_type in list_families()
            else "it is no registered Dense model family"
        )
        problems.add(
            "model",
            f"{model!r} holds a {config.model_type!r} model ({why}); expected one of {supported}",
        )
    if not (directory / "processor_config.json").is_file():
        problems.add(
            "model",
            f"{model!r} holds no processor (processor_config.json); save the model's processor "
            "there with processor.save_pretrained",
        )


def _check_data(data: dict[str, Any], problems: _Problems) -> None:
    from mmconnect.integrations.training.data import list_templates

    folder = data.get("image_folder")
    if isinstance(folder, str) and not Path(folder).is_dir():
        problems.add("data.image_folder", f"{folder!r} does not exist or is not a folder")
    for name in ("stage1", "stage2"):
        path = data.get(name)
        if isinstance(path, str) and not Path(path).is_file():
            problems.add(f"data.{name}", f"{path!r} does not exist or is not a file")
    for name in ("stage1_template", "stage2_template"):
        template = data.get(name)
        if isinstance(template, str) and template not in list_templates():
            problems.add(
                f"data.{name}", f"unknown template {template!r}; known: {list_templates()}"
            )


def load_train_run(path: str | Path, *, overwrite: bool = False) -> TrainRun:
    """Read a run file and check all of it before any work.

    Args:
        path: the YAML file.
        overwrite: train into non-empty stage folders that mmconnect training did not create
            (``--overwrite``; ``overwrite: true`` in the file does the same).

    Raises:
        FileNotFoundError: no such file.
        RunFileError: (a ``ValueError``) every problem, one ``FILE:FIELD: problem`` line each:
            not YAML, unknown or missing keys, a section that is not a mapping, a value of the
            wrong type or out of range, a path that does not exist, a stage folder holding
            files that training did not write.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run file {str(path)!r} does not exist")
    problems = _Problems(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RunFileError([f"{path}: not a valid YAML file: {error}"]) from None
    if not isinstance(data, dict):
        raise RunFileError(
            [
                f"{path}: expected a mapping with model, output_dir, data, stage1, stage2, got "
                f"{type(data).__name__} {data!r}"
            ]
        )
    top = (
        _check_fields(
            TrainRun,
            {name: value for name, value in data.items() if name not in ("data", *SECTIONS)},
            "",
            problems,
            required=frozenset({"model", "output_dir"}),
        )
        or {}
    )
    settings: dict[str, Any] | None = None
    if "data" not in data:
        problems.add("data", "missing (required): image_folder and stage1 / stage2 files")
    else:
        settings = _check_fields(
            DataSettings, data["data"], "data", problems, required=frozenset({"image_folder"})
        )
    if settings is not None:
        _check_data(settings, problems)
        if not settings.get("stage1") and not settings.get("stage2"):
            problems.add("data", "no stage has data: set stage1 and/or stage2 (LLaVA JSON files)")
    sections: dict[str, dict[str, Any]] = {}
    for section, stage in SECTIONS.items():
        checked = _check_fields(
            StageConfig,
            data.get(section),
            section,
            problems,
            reserved=frozenset({"stage", "output_dir"}),
        )
        if checked is None:
            continue
        sections[section] = checked
        lora = checked.get("lora")
        try:
            StageConfig(
                **{**checked, "lora": LoraSettings(**lora) if lora is not None else None},
                stage=stage,
                output_dir=".",
            )
        except (ValueError, TypeError) as error:  # StageConfig's own cross-field checks
            problems.add(section, str(error))
    if isinstance(top.get("model"), str):
        _check_model(top["model"], problems)
    run_overwrite = overwrite or bool(top.get("overwrite", False))
    if isinstance(top.get("output_dir"), str) and settings is not None:
        for section, name in (("stage1", "stage1"), ("stage2", "stage2")):
            if not settings.get(name):
                continue  # the stage does not run: its folder is not touched
            try:
                check_output_folder(
                    Path(top["output_dir"]) / section,
                    tool="train",
                    overwrite=run_overwrite,
                    option="stage folder",
                )
            except (ValueError, FileExistsError) as error:
                problems.add("output_dir", str(error))
    if problems.lines:
        raise RunFileError(problems.lines)
    return TrainRun(
        model=top["model"],
        output_dir=top["output_dir"],
        data=DataSettings(**settings),
        stage1=sections.get("stage1", {}),
        stage2=sections.get("stage2", {}),
        overwrite=run_overwrite,
    )


def run_training(run: TrainRun) -> dict[str, Any]:
    """Run the stages ``run`` asks for; returns their loss curves and output directories.

    Raises:
        ValueError: the data have problems (all listed) or no stage has a data file.
        FileExistsError: a stage folder holds files training did not write (and ``run`` does
            not overwrite).
    """
    # Importing mmconnect.integrations registered the Dense model types with these Auto classes.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmconnect.integrations.training.data import (
        DataCollator,
        LlavaDataset,
        load_llava_json,
    )

    stages = run.stages()
    if not stages:
        raise ValueError("the run has no data: set data.stage1 and/or data.stage2")
    for stage, _, _ in stages:  # every stage folder is checked before the first one trains
        check_output_folder(
            run.stage_config(stage).output_dir,
            tool="train",
            overwrite=run.overwrite,
            option="stage folder",
        )
    model = AutoModelForImageTextToText.from_pretrained(run.model)
    processor = AutoProcessor.from_pretrained(run.model)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    image_tokens = family_model(model).image_token_count()
    datasets = []
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
        dataset.validate(strict=True)  # every problem of every stage listed before training
        datasets.append((stage, dataset))
    results: dict[str, Any] = {}
    for stage, dataset in datasets:
        config = run.stage_config(stage)
        claim_output_folder(
            config.output_dir, tool="train", overwrite=run.overwrite, option="stage folder"
        )
        # The processor is saved in the stage's atomic save: the folder never pairs a new
        # model with an old processor.
        result = train_stage(
            model, dataset, DataCollator.from_tokenizer(tokenizer), config, processor=processor
        )
        model = result.model
        results[stage] = {"losses": result.losses, "output_dir": str(result.output_dir)}
    return results
