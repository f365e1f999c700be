"""Stage-1 training of the toy Dense LLaVA, run by ``test_training.py`` alone and under torchrun.

Usage: ``python ddp_worker.py OUTPUT_DIR PER_DEVICE_BATCH`` (torchrun sets the process group).
The global batch is PER_DEVICE_BATCH x processes; data are read in order so that one process
with batch 4 and two with batch 2 see the same samples at every step.
"""

from __future__ import annotations

import os
import sys

from mmconnect.integrations.training.stages import StageConfig, train_stage
from tests.support.training_toys import ToyDataset, build_model, collate, end_process_group


def main(output_dir: str, per_device_batch: int) -> None:
    options = {"train_sampling_strategy": "sequential", "use_cpu": True}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        options["ddp_backend"] = "gloo"
    stage = StageConfig(
        stage="align",
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=4,
        disable_tqdm=True,
        extra_training_arguments=options,
    )
    train_stage(build_model(), ToyDataset(), collate, stage)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
