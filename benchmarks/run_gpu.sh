#!/usr/bin/env bash
# The benchmark suite at real size on one CUDA GPU in bf16, as one prepared script.
#
#   bash benchmarks/run_gpu.sh [RESULTS_JSON]     (default: benchmarks/results-gpu.json)
#
# Needs a python3 (or $PYTHON) with CUDA torch, transformers, peft, einops, safetensors and
# pytest-benchmark; installs this checkout into it without dependencies or network when it is not
# importable yet. Writes pytest-benchmark's JSON; render it beside the CPU run's figures with
#   .venv/bin/python benchmarks/report.py benchmarks/results.json docs/benchmarks.md \
#       --gpu benchmarks/results-gpu.json
# Ratio targets are CPU-calibrated and skip on the GPU; the GPU figures are absolute.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
RESULTS="${1:-benchmarks/results-gpu.json}"

"$PYTHON" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("run_gpu.sh: torch.cuda.is_available() is False: no CUDA GPU here")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
EOF
if ! "$PYTHON" -c "import mmconnect.integrations.llava" 2>/dev/null; then
    # Editable, so that mmconnect.integrations maps to integrations/ also from the repo root.
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

export MMCONNECT_BENCH_SIZE=real MMCONNECT_BENCH_DEVICE=cuda MMCONNECT_BENCH_DTYPE=bfloat16
export PYTHONUNBUFFERED=1
"$PYTHON" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$RESULTS" \
    --benchmark-columns=median,min,max,rounds
echo "wrote $RESULTS"
