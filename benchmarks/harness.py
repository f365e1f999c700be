"""Sizes, devices and bookkeeping shared by the benchmark modules.

Environment variables:

* ``MMCONNECT_BENCH_SIZE=real`` (default) measures at the published sizes; ``tiny`` runs the same
  code on narrow models in seconds (the test suite does, so the benchmarks cannot rot). Ratio
  targets are asserted only at ``real`` size on the CPU, from figures measured in the same run.
* ``MMCONNECT_BENCH_DEVICE=cpu`` (default) or ``cuda``: where every model and tensor lives. On
  ``cuda`` each timed call ends with ``torch.cuda.synchronize()`` and peak memory comes from the
  CUDA allocator (``benchmarks/memory.py``).
* ``MMCONNECT_BENCH_DTYPE=float32`` (default on the CPU) or ``bfloat16`` (default on ``cuda``):
  the weights and inputs of the inference benchmarks; the training benchmark keeps fp32 weights
  and runs under ``torch.autocast`` in this dtype (mixed precision, as bf16 training does).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmconnect import EncoderGeometry, preset_geometry

SIZE = os.environ.get("MMCONNECT_BENCH_SIZE", "real")
if SIZE not in ("real", "tiny"):
    raise ValueError(f"MMCONNECT_BENCH_SIZE must be 'real' or 'tiny', got {SIZE!r}")
DEVICE = os.environ.get("MMCONNECT_BENCH_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"MMCONNECT_BENCH_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise ValueError("MMCONNECT_BENCH_DEVICE='cuda' but torch.cuda.is_available() is False")
DTYPE_NAME = os.environ.get("MMCONNECT_BENCH_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32")
if DTYPE_NAME not in ("float32", "bfloat16"):
    raise ValueError(f"MMCONNECT_BENCH_DTYPE must be 'float32' or 'bfloat16', got {DTYPE_NAME!r}")
DTYPE: torch.dtype = getattr(torch, DTYPE_NAME)

if DEVICE == "cuda":
    # GPU calls take milliseconds: many rounds cost little and steady the medians.
    ROUNDS, SHORT_CALL_ROUNDS, STEP_ROUNDS, WARMUP_ROUNDS = 20, 50, 10, 3
elif SIZE == "real":
    #: Timed rounds per variant of calls that take seconds (plus ``WARMUP_ROUNDS``).
    ROUNDS = 3
    #: More rounds for calls of about a second, whose medians otherwise move with machine noise.
    SHORT_CALL_ROUNDS = 9
    #: Timed optimizer steps per training variant (several seconds each on the CPU).
    STEP_ROUNDS = 2
    WARMUP_ROUNDS = 1
else:
    ROUNDS, SHORT_CALL_ROUNDS, STEP_ROUNDS, WARMUP_ROUNDS = 1, 1, 1, 0


@dataclass(frozen=True)
class TowerSize:
    """Dimensions of a benchmarked vision tower and the LLM width its connector projects to."""

    name: str
    width: int
    intermediate: int
    heads: int
    blocks: int
    image: int | tuple[int, int]
    patch: int
    batch: int
    llm_dim: int

    @property
    def grid(self) -> tuple[int, int]:
        height, width = _pair(self.image)
        return height // self.patch, width // self.patch

    def fits(self, geometry: EncoderGeometry) -> bool:
        """Whether this tower is the encoder ``geometry`` describes: its depth, image and patch
        size (so its token grid) and, at real size, its width."""
        return (self.blocks, _pair(self.image), self.patch) == (
            geometry.num_layers,
            _pair(geometry.image_size),
            geometry.patch_size,
        ) and (SIZE != "real" or self.width == geometry.width)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


CLIP_L_336 = TowerSize(
    name="CLIP-L/336",
    width=1024,
    intermediate=4096,
    heads=16,
    blocks=24,
    image=336,
    patch=14,
    batch=4,
    llm_dim=4096,
)
#: SigLIP-SO400M/384 (27 blocks, width 1152, 27 x 27 patches, no CLS token).
SIGLIP_SO400M_384 = TowerSize(
    name="SigLIP-SO400M/384",
    width=1152,
    intermediate=4304,
    heads=16,
    blocks=27,
    image=384,
    patch=14,
    batch=4,
    llm_dim=4096,
)
TINY = TowerSize(
    name="CLIP-L/336 (tiny)",
    width=32,
    intermediate=64,
    heads=2,
    blocks=24,
    image=336,
    patch=14,
    batch=2,
    llm_dim=64,
)
TINY_SIGLIP = TowerSize(
    name="SigLIP-SO400M/384 (tiny)",
    width=32,
    intermediate=64,
    heads=2,
    blocks=27,
    image=384,
    patch=14,
    batch=2,
    llm_dim=64,
)
#: The towers of this size setting, each matched to presets by their encoder geometry.
TOWER_SIZES = (CLIP_L_336, SIGLIP_SO400M_384) if SIZE == "real" else (TINY, TINY_SIGLIP)


def tower_size_for(preset: str) -> TowerSize:
    """The benchmarked tower of ``preset``: the one that is the encoder the preset is made for
    (:func:`mmconnect.preset_geometry`: depth, image and patch size, width at real size).

    A preset made for another encoder (a zoo preset's EVA or InternViT tower) gets a tower of its
    own geometry: its grid and depth, its width at real size (this setting's width when tiny),
    and this setting's batch and LLM width.
    """
    geometry = preset_geometry(preset)
    for size in TOWER_SIZES:
        if size.fits(geometry):
            return size
    template = TOWER_SIZES[0]
    width = geometry.width if SIZE == "real" else template.width
    height, side = _pair(geometry.image_size)
    return TowerSize(
        name=f"{geometry.num_layers}-block {height}x{side}/{geometry.patch_size}"
        + ("" if SIZE == "real" else " (tiny)"),
        width=width,
        intermediate=4 * width,
        heads=template.heads,
        blocks=geometry.num_layers,
        image=geometry.image_size,
        patch=geometry.patch_size,
        batch=template.batch,
        llm_dim=template.llm_dim,
    )


def synchronized(function: Callable[[], Any]) -> Callable[[], Any]:
    """``function`` that, on CUDA, returns only after the GPU finished its work (so timing is true)."""
    if DEVICE != "cuda":
        return function

    def run() -> Any:
        result = function()
        torch.cuda.synchronize()
        return result

    return run


def record(benchmark, measurements: dict, group: str, variant: str, **extra: float | str) -> None:
    """Keep a finished benchmark's median (and extra figures) for ratio checks in the same run.

    The extra figures, the size, the device and the dtype also go into pytest-benchmark's JSON
    (``extra_info``), which ``benchmarks/report.py`` renders into ``docs/benchmarks.md``.
    """
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    benchmark.extra_info.update(extra, size=SIZE, device=DEVICE, dtype=DTYPE_NAME)
    measurements.setdefault(group, {})[variant] = {
        "median_s": stats.median if stats is not None else float("nan"),
        **extra,
    }


def targets_apply() -> bool:
    """Ratio targets are calibrated for real size on the CPU in fp32; elsewhere only reported."""
    return SIZE == "real" and DEVICE == "cpu" and DTYPE_NAME == "float32"
