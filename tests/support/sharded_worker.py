"""Training stages of the toy Dense LLaVA, run in one process and under torchrun with FSDP: the
sharded-training tests (``tests/integrations/training/test_fsdp.py``) compare the two.

Usage: ``python sharded_worker.py OUTPUT_DIR PER_DEVICE_BATCH ENGINE:STAGE [ENGINE:STAGE ...]``
where ENGINE is ``none`` (plain: one process, or DDP under torchrun), ``fsdp`` (FSDP2 through the
Trainer's ``fsdp`` / ``fsdp_config`` arguments), ``fsdp-requested`` (the same arguments without
the CPU shim below, so accelerate falls back to DDP; it must come before any ``fsdp`` run) or
``deepspeed`` (ZeRO-2 through the Trainer's ``deepspeed`` argument, on the GPUs: only
``scripts/deepspeed_zero2_check.sh`` runs it, accelerate runs DeepSpeed only on accelerators) and
STAGE is ``align``, ``instruct`` or ``instruct-lora``. Each run trains the same toy model into
``OUTPUT_DIR/ENGINE-STAGE``, in the order given. torchrun sets the process group. The global
batch is PER_DEVICE_BATCH x processes; data are read in order so that one process with batch 4
and two with batch 2 see the same samples at every step. Rank 0 writes
``OUTPUT_DIR/ENGINE-STAGE/run.json``: the losses and whether the trained parameters were sharded
(FSDP2 ``DTensor``\\ s), so a test can tell FSDP from a silent fall-back to DDP.

accelerate (1.16) turns FSDP on only for accelerator devices: on the CPU it builds a ``MULTI_CPU``
(DDP) state and drops the FSDP plugin. For ENGINE ``fsdp`` this worker turns that state into
accelerate's FSDP state with the Trainer's own plugin (:func:`shard_on_the_cpu`), so the Trainer
and accelerate run their FSDP2 code (``fully_shard``, sharded optimizer, full-state-dict
gathering for saves) on gloo, as they do on GPUs with NCCL.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from torch.distributed.tensor import DTensor

from mmconnect.integrations.training.stages import LoraSettings, StageConfig, train_stage
from tests.support.training_toys import ToyDataset, build_model, collate, end_process_group

ENGINES = ("none", "fsdp", "fsdp-requested", "deepspeed")
STAGES = ("align", "instruct", "instruct-lora")


def shard_on_the_cpu() -> None:
    """Make accelerate keep the FSDP plugin it is given on a multi-process CPU run.

    accelerate's ``AcceleratorState`` picks ``MULTI_CPU`` for CPU processes and ignores the FSDP
    plugin there; after its own set-up this switches the state to ``DistributedType.FSDP`` with
    that plugin, which is the state it builds on GPUs. Nothing else is changed.
    """
    import accelerate.state
    from accelerate.utils import DistributedType

    initialise = accelerate.state.AcceleratorState.__init__
    if getattr(initialise, "shards_on_the_cpu", False):
        return

    def initialise_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    initialise_with_fsdp.shards_on_the_cpu = True
    accelerate.state.AcceleratorState.__init__ = initialise_with_fsdp


def stage_config(output_dir: Path, per_device_batch: int, engine: str, stage: str) -> StageConfig:
    """Three steps of ``stage`` (constant learning rate 1e-3, no warm-up) with a trainer
    checkpoint after the last step."""
    options = {"train_sampling_strategy": "sequential", "use_cpu": True}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and engine != "deepspeed":
        options["ddp_backend"] = "gloo"
    if engine in ("fsdp", "fsdp-requested"):
        options["fsdp"] = True
        options["fsdp_config"] = {"version": 2}
    if engine == "deepspeed":
        del options["use_cpu"]
        options["deepspeed"] = {
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    return StageConfig(
        stage="align" if stage == "align" else "instruct",
        output_dir=str(output_dir),
        learning_rate=1e-3,
        connector_learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        per_device_train_batch_size=per_device_batch,
        max_steps=3,
        save_steps=3,
        lora=LoraSettings(rank=4, alpha=8, dropout=0.0) if stage == "instruct-lora" else None,
        disable_tqdm=True,
        extra_training_arguments=options,
    )


def parse_runs(runs: list[str]) -> list[tuple[str, str]]:
    """``["fsdp:align", ...]`` -> ``[("fsdp", "align"), ...]``; usage on a bad list."""
    pairs = [tuple(run.split(":")) for run in runs]
    engines = [pair[0] for pair in pairs]
    valid = all(len(pair) == 2 and pair[0] in ENGINES and pair[1] in STAGES for pair in pairs)
    if not pairs or not valid:
        raise SystemExit(__doc__)
    if "fsdp" in engines and "fsdp-requested" in engines[engines.index("fsdp") :]:
        raise SystemExit("fsdp-requested runs must come before the fsdp runs (the shim stays on)")
    return pairs


def main(output_dir: str, per_device_batch: int, runs: list[str]) -> None:
    for engine, stage in parse_runs(runs):
        if engine == "fsdp":
            shard_on_the_cpu()
        folder = Path(output_dir) / f"{engine}-{stage}"
        config = stage_config(folder, per_device_batch, engine, stage)
        result = train_stage(build_model(), ToyDataset(), collate, config)
        sharded = any(isinstance(p, DTensor) for p in result.model.parameters())
        if int(os.environ.get("RANK", "0")) == 0:
            record = {"losses": result.losses, "sharded": sharded}
            (folder / "run.json").write_text(json.dumps(record))
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
