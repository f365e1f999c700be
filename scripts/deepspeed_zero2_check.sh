#!/usr/bin/env bash
# DeepSpeed ZeRO-2 through the HF Trainer equals one-process training: a GPU-only check, never
# part of the test suite or CI (DeepSpeed is not a dependency of mmconnect, and accelerate runs
# DeepSpeed only on accelerator devices).
#
#   bash scripts/deepspeed_zero2_check.sh [OUT_DIR]        (default: /tmp/mmconnect-zero2)
#
# Needs 1, 2 or 4 CUDA GPUs (GPUS=N picks how many; default: 2 if there are two or more, else 1)
# and a python3 (or $PYTHON) with CUDA torch, transformers, accelerate, peft and deepspeed
# (`pip install deepspeed`). It trains the toy Dense LLaVA of the test suite
# (tests/support/sharded_worker.py) for three steps of stage 1, stage 2 full and stage 2 LoRA:
# once in one CPU process with batch 4, once under torchrun on N GPUs with ZeRO-2 and batch 4 / N
# per GPU (the same global batch, the same samples in the same order), then compares the losses
# and every saved parameter (absolute and relative tolerance 1e-5, the bound the FSDP test uses)
# and reloads each ZeRO-2 stage folder with AutoModelForImageTextToText. TF32 is turned off
# (NVIDIA_TF32_OVERRIDE=0) so the GPU computes in full fp32 like the CPU reference.
# Exits non-zero on any difference beyond the tolerance.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${1:-/tmp/mmconnect-zero2}"

GPUS="${GPUS:-$("$PYTHON" -c 'import torch; print(min(2, torch.cuda.device_count()))')}"
if [[ "$GPUS" != 1 && "$GPUS" != 2 && "$GPUS" != 4 ]]; then
    echo "deepspeed_zero2_check.sh: needs 1, 2 or 4 CUDA GPUs (GPUS=$GPUS)" >&2
    exit 2
fi
"$PYTHON" -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
if ! "$PYTHON" -c "import mmconnect.integrations.training" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
fi

export PYTHONPATH="$PWD" OMP_NUM_THREADS=1 NVIDIA_TF32_OVERRIDE=0 PYTHONUNBUFFERED=1
STAGES=(align instruct instruct-lora)
rm -rf "$OUT"
"$PYTHON" tests/support/sharded_worker.py "$OUT" 4 "${STAGES[@]/#/none:}"
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" \
    tests/support/sharded_worker.py "$OUT" $((4 / GPUS)) "${STAGES[@]/#/deepspeed:}"

"$PYTHON" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import mmconnect.integrations.families.llava  # noqa: F401  (registers the Dense classes)

out = Path(sys.argv[1])
failed = False
for stage in ("align", "instruct", "instruct-lora"):
    one, zero2 = out / f"none-{stage}", out / f"deepspeed-{stage}"
    losses = [torch.tensor(json.loads((d / "run.json").read_text())["losses"]) for d in (one, zero2)]
    single, sharded = load_file(str(one / "model.safetensors")), load_file(str(zero2 / "model.safetensors"))
    worst = max((single[k].float() - sharded[k].float()).abs().max().item() for k in single)
    same = single.keys() == sharded.keys() and all(
        torch.allclose(sharded[k], single[k], atol=1e-5, rtol=1e-5) for k in single
    )
    same = same and torch.allclose(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    AutoModelForImageTextToText.from_pretrained(zero2)  # reloads in one process
    print(json.dumps({"stage": stage, "same": same, "max_parameter_difference": worst,
                      "losses": losses[1].tolist()}))
    failed |= not same
sys.exit(1 if failed else 0)
EOF
