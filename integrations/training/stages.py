"""Two-stage training of a Dense Connector MLLM on the Hugging Face Trainer.

The LLaVA-1.5 / Dense Connector recipe (docs/training.md):

* stage 1, ``"align"``: vision tower and LLM frozen, the connector trains (lr 1e-3, cosine,
  warm-up 3 %, no weight decay);
* stage 2, ``"instruct"``: the connector and the LLM train, fully (lr 2e-5) or through LoRA on the
  LLM's linear layers (rank 128, alpha 256, dropout 0.05, lr 2e-4), never on the vision tower; the
  connector keeps its own learning rate (2e-5). It starts from stage 1's connector checkpoint.

Because it is the HF Trainer, the same code runs on one CPU and under ``torchrun`` /
``accelerate launch`` with DDP, FSDP or DeepSpeed. :func:`prepare_stage` logs which parameter
groups train and how many parameters each holds.

Checkpoints on disk:

* the stage's final save is atomic (:func:`mmconnect.checkpoint.atomic_save_directory`): a re-run
  that fails while saving leaves the earlier stage folder loadable and byte-identical, and the
  ``checkpoint-N/`` folders and other files in it are kept;
* every trainer checkpoint and the stage folder hold ``base_fingerprint.json``: the fingerprint
  (:func:`base_fingerprint`) of the vision tower(s) and the LLM the stage started from. Resuming
  checks the checkpoint first (:func:`check_resume_checkpoint`: a complete, readable Trainer
  checkpoint of the same connector config) and refuses a model whose tower / LLM differ from the
  one the checkpoint was trained on, unless ``StageConfig.allow_different_base``.

Examples:
    >>> stage = StageConfig(stage="align", output_dir="runs/stage1")        # doctest: +SKIP
    >>> train_stage(model, dataset, collator, stage)                       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from mmconnect.checkpoint import (
    atomic_save_directory,
    check_torch_archive,
    fingerprint_tensors,
    open_safetensors,
    read_json,
    write_json,
)
from mmconnect.integrations.families.base import check_checkpoint_connector
from mmconnect.integrations.families.protocol import family_model
from mmconnect.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_float,
    check_optional_int,
    check_positive_float,
    check_positive_int,
    check_sequence,
    check_str,
)

logger = logging.getLogger(__name__)

Stage = Literal["align", "instruct"]
#: Default learning rates of the published recipe: (LLM / LoRA, connector).
_DEFAULT_RATES = {"align": (1e-3, 1e-3), "instruct": (2e-5, 2e-5), "instruct-lora": (2e-4, 2e-5)}


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """LoRA on the LLM's linear layers (never on the vision tower or the connector).

    Attributes:
        rank, alpha, dropout: the LoRA hyper-parameters (published: 128, 256, 0.05).
        target_modules: suffixes of the LLM's ``nn.Linear`` names to adapt (e.g. ``("q_proj",
            "v_proj")``); empty means every linear layer of the LLM.
    """

    rank: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        check_positive_int(self.alpha, "alpha")
        check_float(self.dropout, "dropout", minimum=0, maximum=1, exclusive_maximum=True)
        modules = check_sequence(self.target_modules, "target_modules", of="linear-layer suffixes")
        for index, suffix in enumerate(modules):
            check_str(suffix, f"target_modules[{index}]")
        object.__setattr__(self, "target_modules", tuple(modules))


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One training stage. Learning rates default to the published recipe for the stage.

    Attributes:
        stage: ``"align"`` (stage 1) or ``"instruct"`` (stage 2).
        output_dir: where checkpoints and the final model go.
        learning_rate: for the LLM (full) or its LoRA weights; ``None``: recipe default.
        connector_learning_rate: for the connector; ``None``: recipe default.
        lora: LoRA settings for stage 2, or ``None`` for full fine-tuning.
        train_vision_tower: unfreeze the vision tower (off in the published recipe).
        allow_different_base: resume from a checkpoint although the model's vision tower or
            LLM differ from the ones the checkpoint was trained on (their fingerprints in
            ``base_fingerprint.json`` differ). Off: such a resume is refused, because a LoRA
            checkpoint does not hold the base weights and would silently train on another base.
    """

    stage: Stage
    output_dir: str
    learning_rate: float | None = None
    connector_learning_rate: float | None = None
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    lora: LoraSettings | None = None
    train_vision_tower: bool = False
    seed: int = 0
    logging_steps: int = 1
    save_steps: int | None = None
    save_total_limit: int | None = None
    gradient_checkpointing: bool = False
    bf16: bool = False
    disable_tqdm: bool = False
    dataloader_num_workers: int = 0
    allow_different_base: bool = False
    extra_training_arguments: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice(self.stage, "stage", ("align", "instruct"))
        if self.lora is not None and not isinstance(self.lora, LoraSettings):
            raise TypeError(f"lora must be a LoraSettings or None, got {self.lora!r}")
        if self.stage == "align" and self.lora is not None:
            raise ValueError(
                "lora is for stage 'instruct'; stage 'align' trains only the connector"
            )
        for name in ("learning_rate", "connector_learning_rate"):
            check_optional_float(
                getattr(self, name),
                name,
                minimum=0,
                exclusive_minimum=True,
                hint="None: recipe default",
            )
        check_positive_float(self.num_train_epochs, "num_train_epochs")
        check_int(self.max_steps, "max_steps", hint="-1 trains num_train_epochs")
        if self.max_steps != -1:
            check_positive_int(self.max_steps, "max_steps", hint="or -1 to train num_train_epochs")
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            check_positive_int(getattr(self, name), name)
        for name in ("save_steps", "save_total_limit"):
            check_optional_int(getattr(self, name), name, minimum=1)
        check_float(self.warmup_ratio, "warmup_ratio", minimum=0, maximum=1, exclusive_maximum=True)
        check_float(self.weight_decay, "weight_decay", minimum=0)
        check_str(self.lr_scheduler_type, "lr_scheduler_type")
        check_int(self.seed, "seed")
        check_int(self.dataloader_num_workers, "dataloader_num_workers", minimum=0)
        for name in (
            "train_vision_tower",
            "gradient_checkpointing",
            "bf16",
            "disable_tqdm",
            "allow_different_base",
        ):
            check_bool(getattr(self, name), name)
        if not isinstance(self.extra_training_arguments, dict):
            raise TypeError(
                "extra_training_arguments must be a dict of TrainingArguments fields, got "
                f"{self.extra_training_arguments!r}"
            )

    @property
    def rates(self) -> tuple[float, float]:
        """``(LLM or LoRA learning rate, connector learning rate)`` with recipe defaults filled."""
        key = "instruct-lora" if self.stage == "instruct" and self.lora is not None else self.stage
        default_llm, default_connector = _DEFAULT_RATES[key]
        return (
            self.learning_rate if self.learning_rate is not None else default_llm,
            self.connector_learning_rate
            if self.connector_learning_rate is not None
            else default_connector,
        )

    def training_arguments(self) -> TrainingArguments:
        """The HF ``TrainingArguments`` of this stage."""
        save = (
            {"save_strategy": "steps", "save_steps": self.save_steps}
            if self.save_steps
            else {"save_strategy": "no"}
        )
        extra = dict(self.extra_training_arguments)
        if self.bf16 and not _accelerator_available():
            # The Trainer refuses bf16 without an accelerator unless told to train on the CPU,
            # where bf16 autocast works (a CPU smoke run of a GPU recipe keeps bf16=True).
            extra.setdefault("use_cpu", True)
        return TrainingArguments(
            output_dir=self.output_dir,
            learning_rate=self.rates[0],
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            warmup_steps=self.warmup_ratio,  # a float below 1 is a ratio of the total steps
            weight_decay=self.weight_decay,
            lr_scheduler_type=self.lr_scheduler_type,
            seed=self.seed,
            data_seed=self.seed,
            logging_steps=self.logging_steps,
            save_total_limit=self.save_total_limit,
            activation_checkpointing=self.gradient_checkpointing,  # HF 5.x's name for it
            bf16=self.bf16,
            disable_tqdm=self.disable_tqdm,
            dataloader_num_workers=self.dataloader_num_workers,
            dataloader_pin_memory=torch.cuda.is_available(),
            remove_unused_columns=False,  # pixel_values are not in the LLM's signature
            report_to=[],
            **save,
            **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON / YAML-ready dict."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- freezing


def _accelerator_available() -> bool:
    """Whether torch sees a CUDA (or other) accelerator the Trainer could use."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _connector_modules(model: nn.Module) -> list[nn.Module]:
    """The connector and the modules trained with it (family protocol)."""
    return list(family_model(model).connector_modules().values())


def _connector_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [
        parameter
        for module in _connector_modules(model)
        for parameter in module.parameters()
        if parameter.requires_grad
    ]


def parameter_groups(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``group -> (trainable parameters, all parameters)`` for the vision tower(s), the connector
    (with the modules trained with it), the LLM (with its LM head) and LoRA adapters."""
    towers = family_model(model).vision_towers().values()
    tower = {id(p) for module in towers for p in module.parameters()}
    connector = {id(p) for module in _connector_modules(model) for p in module.parameters()}
    counts: dict[str, list[int]] = {
        name: [0, 0] for name in ("vision_tower", "connector", "llm", "lora")
    }
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            group = "lora"
        elif id(parameter) in tower:
            group = "vision_tower"
        elif id(parameter) in connector:
            group = "connector"
        else:
            group = "llm"
        counts[group][0] += parameter.numel() if parameter.requires_grad else 0
        counts[group][1] += parameter.numel()
    return {name: (trainable, total) for name, (trainable, total) in counts.items() if total}


def _llm_linear_names(model: nn.Module, suffixes: Iterable[str]) -> list[str]:
    llm_modules = {id(module) for module in family_model(model).language_model.modules()}
    wanted = tuple(suffixes)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and id(module) in llm_modules
        and (not wanted or name.rsplit(".", 1)[-1] in wanted)
    ]
    if not names:
        raise ValueError(f"no linear layer of the LLM matches target_modules={list(wanted)}")
    return names


def prepare_stage(model: nn.Module, stage: StageConfig) -> nn.Module:
    """Freeze and adapt ``model`` for ``stage``; returns the model to train (a PEFT model with LoRA).

    Stage ``align``: only the connector (and the modules trained with it, e.g. Mini-Gemini's
    patch info mining) trains. Stage ``instruct``: those and the LLM (or its LoRA adapters) train.
    The vision tower stays frozen unless ``train_vision_tower``; a second, HR tower always
    stays frozen.
    The trainable parameter groups are logged.
    """
    inner = family_model(model)
    model.requires_grad_(False)
    for module in _connector_modules(model):
        module.requires_grad_(True)
    if stage.train_vision_tower:
        inner.tapped_tower().requires_grad_(True)
    if stage.stage == "instruct":
        if stage.lora is None:
            inner.language_model.requires_grad_(True)
            model.get_output_embeddings().requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            lora = stage.lora
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=_llm_linear_names(model, lora.target_modules),
                # saved and resumed with the adapters
                modules_to_save=list(inner.connector_modules()),
            )
            model = get_peft_model(model, config)
    for group, (trainable, total) in parameter_groups(model).items():
        logger.info(
            "stage %s: %-12s %12d of %12d parameters train", stage.stage, group, trainable, total
        )
    return model


# ---------------------------------------------------------------------------- trainer


class DenseConnectorTrainer(Trainer):
    """HF ``Trainer`` whose optimizer gives the connector its own learning rate."""

    def __init__(self, *args: Any, connector_learning_rate: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connector_learning_rate = connector_learning_rate

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            connector = {id(parameter) for parameter in _connector_parameters(opt_model)}
            trainable = [
                parameter for parameter in opt_model.parameters() if parameter.requires_grad
            ]
            groups = [
                {
                    "params": [p for p in trainable if id(p) not in connector],
                    "lr": self.args.learning_rate,
                },
                {
                    "params": [p for p in trainable if id(p) in connector],
                    "lr": self.connector_learning_rate,
                },
            ]
            groups = [
                {**group, "weight_decay": self.args.weight_decay}
                for group in groups
                if group["params"]
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class _LossHistory(TrainerCallback):
    """Keeps ``(step, loss)`` pairs of the run (also in ``trainer.state.log_history``)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


@dataclass(frozen=True)
class StageResult:
    """What :func:`train_stage` returns: the trained model and its loss curve."""

    model: nn.Module
    losses: list[tuple[int, float]]
    output_dir: Path


# ---------------------------------------------------------------------------- checkpoints

#: Written into every trainer checkpoint and stage folder: the fingerprint of the base model.
BASE_FINGERPRINT_NAME = "base_fingerprint.json"
_TRAINER_STATE_NAME = "trainer_state.json"


def _base_parts(model: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The parameters of the vision tower(s) and the LLM (with its LM head) by part, named as
    on a plain Dense model: a PEFT-wrapped model gives the same names (LoRA weights left out)."""
    inner = family_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = {
        **inner.vision_towers(),
        "language_model": inner.language_model,
        "lm_head": base.get_output_embeddings(),
    }
    parts: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for part, module in modules.items():
        if module is None:
            continue
        parts[part] = [
            (name.replace(".base_layer.", "."), parameter)
            for name, parameter in module.named_parameters()
            if "lora_" not in name
        ]
    return parts


def base_fingerprint(model: nn.Module) -> dict[str, str]:
    """``part -> fingerprint`` of the base a stage trains on: ``vision_tower`` (and
    ``vision_tower_aux``), ``language_model`` and ``lm_head``; the connector is not part of it.

    Each fingerprint (:func:`mmconnect.checkpoint.fingerprint_tensors`) covers the parameters'
    names, shapes, dtypes and values, so the same base model loaded in another dtype has another
    fingerprint. LoRA adapters are left out and PEFT's renaming undone, so a model gives the same
    fingerprint before and after :func:`prepare_stage`.
    """
    return {part: fingerprint_tensors(named) for part, named in _base_parts(model).items()}


def _write_base_fingerprint(directory: Path, fingerprint: dict[str, str]) -> None:
    write_json(
        {"format_version": 1, "base_fingerprint": fingerprint}, directory / BASE_FINGERPRINT_NAME
    )


class _BaseFingerprintCallback(TrainerCallback):
    """Writes ``base_fingerprint.json`` into each trainer checkpoint once the Trainer saved it."""

    def __init__(self, fingerprint: dict[str, str]) -> None:
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            _write_base_fingerprint(checkpoint, self.fingerprint)


def _check_checkpoint_files(checkpoint: Path) -> None:
    """A Trainer checkpoint must hold a readable ``trainer_state.json``; its ``torch.save`` files
    (optimizer, scheduler, RNG states) and safetensors weights must be complete."""
    state_file = checkpoint / _TRAINER_STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(
            f"resume checkpoint {str(checkpoint)!r} has no {_TRAINER_STATE_NAME}: it is not a "
            "complete Trainer checkpoint (was the save interrupted?); resume from another "
            "checkpoint-N folder"
        )
    read_json(state_file, what="trainer state")
    if not any(checkpoint.glob("optimizer*")) and not any(checkpoint.glob("global_step*")):
        # the Trainer would resume silently with a fresh optimizer (and learning-rate schedule)
        logger.warning(
            "resume checkpoint %s holds no optimizer state (optimizer.pt): the optimizer starts "
            "afresh, so the run will not continue exactly as it would have",
            checkpoint,
        )
    for file in sorted(checkpoint.iterdir()):
        if file.suffix in (".pt", ".pth", ".bin"):  # .bin: FSDP model and optimizer states
            check_torch_archive(file)
        elif file.suffix == ".safetensors":
            with open_safetensors(file):
                pass
        elif file.name.endswith(".index.json"):
            read_json(file, what="weights index")


def check_resume_checkpoint(
    checkpoint: str | Path,
    model: nn.Module,
    *,
    allow_different_base: bool = False,
    fingerprint: dict[str, str] | None = None,
) -> None:
    """Raise a clear error when ``checkpoint`` cannot be resumed onto ``model``.

    Checked, before any training: the checkpoint is a complete Trainer checkpoint (a readable
    ``trainer_state.json``; its optimizer / scheduler / RNG ``torch.save`` files and safetensors
    weights not truncated); its connector weights fit ``model``'s connector config; and the
    vision tower(s) and LLM of ``model`` are the ones the checkpoint was trained on (the
    fingerprint in its ``base_fingerprint.json``, see :func:`base_fingerprint`). A checkpoint
    without that file (written before fingerprints were recorded) is resumed with a warning.

    Args:
        checkpoint: a ``checkpoint-N`` folder written by :func:`train_stage`.
        model: the model to resume, as given to :func:`train_stage` (or already prepared).
        allow_different_base: accept a model whose tower / LLM fingerprint differs.
        fingerprint: ``base_fingerprint(model)`` when already computed.

    Raises:
        FileNotFoundError: the checkpoint directory or its ``trainer_state.json`` does not exist.
        ValueError: the checkpoint is a file, one of its files is truncated or corrupt, its
            connector weights or config fingerprint differ from ``model``'s connector, or
            ``model``'s base differs from the checkpoint's (naming both fingerprints).
    """
    checkpoint = Path(checkpoint)
    if checkpoint.exists() and not checkpoint.is_dir():
        raise ValueError(
            f"resume checkpoint {str(checkpoint)!r} is a file; expected a checkpoint-N folder "
            "written by the Trainer"
        )
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"resume checkpoint {str(checkpoint)!r} does not exist")
    _check_checkpoint_files(checkpoint)
    inner = family_model(model)
    # Where the family keeps its connector in a saved state dict (Idefics3: ``model.connector.``).
    prefixes = getattr(type(inner), "connector_prefixes", None)
    if prefixes is None:
        check_checkpoint_connector(checkpoint, inner.connector.config)
    else:
        check_checkpoint_connector(checkpoint, inner.connector.config, prefixes)
    record = checkpoint / BASE_FINGERPRINT_NAME
    if not record.is_file():
        logger.warning(
            "resume checkpoint %s has no %s: cannot check that the vision tower and LLM are the "
            "ones it was trained on",
            checkpoint,
            BASE_FINGERPRINT_NAME,
        )
        return
    saved = read_json(record, what="base fingerprint").get("base_fingerprint")
    if not isinstance(saved, dict):
        raise ValueError(f"base fingerprint {str(record)!r} has no base_fingerprint object")
    current = fingerprint if fingerprint is not None else base_fingerprint(model)
    differing = sorted(
        part for part in saved.keys() | current.keys() if saved.get(part) != current.get(part)
    )
    if not differing:
        return
    details = "; ".join(
        f"{part}: checkpoint {saved.get(part)}, model {current.get(part)}" for part in differing
    )
    if allow_different_base:
        logger.warning(
            "resuming %s onto another base model (allow_different_base=True): %s",
            checkpoint,
            details,
        )
        return
    raise ValueError(
        f"resume checkpoint {str(checkpoint)!r} was trained on another base model: the "
        f"fingerprints of {', '.join(differing)} differ ({details}). Load the base model the run "
        "started from (same weights and dtype), or set allow_different_base=True in the stage "
        "config to resume onto this one anyway"
    )


def _warn_if_sharding_dropped(trainer: Trainer) -> None:
    """Log a warning when the arguments ask for FSDP or DeepSpeed but accelerate runs without it.

    accelerate turns FSDP and DeepSpeed on only for accelerator devices: on the CPU (``use_cpu``,
    or no GPU) it drops them and trains with DDP (several processes) or in one process. The
    result is the same training, but nothing is sharded, which a CPU smoke run of a sharded
    recipe should say rather than hide.
    """
    args = trainer.args
    dropped = [
        name
        for name, requested, enabled in (
            ("FSDP", args.fsdp, trainer.is_fsdp_enabled),
            ("DeepSpeed", args.deepspeed, trainer.is_deepspeed_enabled),
        )
        if requested and not enabled
    ]
    if dropped:
        logger.warning(
            "%s requested but accelerate runs without it (distributed type %s): accelerate "
            "shards only on accelerator devices, so this run trains unsharded (DDP across "
            "processes, or one process) with the same updates",
            " and ".join(dropped),
            trainer.accelerator.distributed_type.value,
        )


def _gathered_state_dict(trainer: Trainer, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of ``model`` when FSDP shards it (gathered from every rank, on the CPU
    of rank 0), else ``None``: ``save_pretrained`` then reads the model's own parameters.

    Under FSDP each rank holds only its shard of every parameter (FSDP2: ``DTensor``), which
    ``save_pretrained`` cannot write; the gather is a collective, so every rank must call it.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(model)


def train_stage(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    collator: Any,
    stage: StageConfig,
    *,
    resume_from_checkpoint: str | Path | None = None,
    callbacks: list[TrainerCallback] | None = None,
    processor: Any = None,
) -> StageResult:
    """Run one stage and save its result into ``stage.output_dir``.

    The Dense model is saved with ``save_pretrained`` (after merging LoRA adapters), so stage 2
    can start from stage 1's directory and ``AutoModelForImageTextToText`` loads the end result.
    The save is atomic: a failure while saving leaves an earlier save in ``stage.output_dir``
    intact; its ``checkpoint-N/`` folders and other files are kept. Trainer checkpoints and the
    stage folder record the base model's fingerprint (``base_fingerprint.json``), checked on resume.
    A ``processor`` (anything with ``save_pretrained``) is saved in the same atomic step, so the
    folder never pairs a new model with an old processor.

    Under FSDP every rank takes part in gathering the full weights and rank 0 saves them; the
    returned model is then still sharded (load the stage folder for a plain one). When the
    training arguments ask for FSDP or DeepSpeed but accelerate runs without it (on the CPU),
    a warning says so.

    Raises:
        FileNotFoundError: ``resume_from_checkpoint`` or its ``trainer_state.json`` is missing.
        ValueError: the output directory cannot be written, or ``resume_from_checkpoint`` is
            incomplete, was made with a different connector config or on another base model
            (see :func:`check_resume_checkpoint`, ``StageConfig.allow_different_base``).
    """
    output_dir = Path(stage.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"output directory {str(output_dir)!r} cannot be written: {error}"
        ) from None
    fingerprint = base_fingerprint(model)  # before training: the base the stage starts from
    if resume_from_checkpoint is not None:
        check_resume_checkpoint(
            resume_from_checkpoint,
            model,
            allow_different_base=stage.allow_different_base,
            fingerprint=fingerprint,
        )
    trainable = prepare_stage(model, stage)
    history = _LossHistory()
    trainer = DenseConnectorTrainer(
        model=trainable,
        args=stage.training_arguments(),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[history, _BaseFingerprintCallback(fingerprint), *(callbacks or [])],
        connector_learning_rate=stage.rates[1],
    )
    _warn_if_sharding_dropped(trainer)
    trainer.train(
        resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None
    )
    trained = trainable.merge_and_unload() if hasattr(trainable, "merge_and_unload") else trainable
    gathered = _gathered_state_dict(trainer, trained)  # collective: every rank takes part
    if trainer.is_world_process_zero():
        with atomic_save_directory(output_dir) as staging:
            trained.save_pretrained(staging, state_dict=gathered)
            if processor is not None:
                processor.save_pretrained(staging)
            _write_base_fingerprint(staging, fingerprint)
    return StageResult(model=trained, losses=history.losses, output_dir=output_dir)
