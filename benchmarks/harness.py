"""Sizes and bookkeeping shared by the benchmark modules.

``MMCONNECT_BENCH_SIZE=real`` (default) measures at the published sizes; ``tiny`` runs the same
code on narrow models in seconds (the test suite does, so the benchmarks cannot rot). Ratio
targets are asserted only at ``real`` size, from figures measured in the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SIZE = os.environ.get("MMCONNECT_BENCH_SIZE", "real")
if SIZE not in ("real", "tiny"):
    raise ValueError(f"MMCONNECT_BENCH_SIZE must be 'real' or 'tiny', got {SIZE!r}")

#: Timed rounds per variant (plus one warm-up round at real size).
ROUNDS = 3 if SIZE == "real" else 1
WARMUP_ROUNDS = 1 if SIZE == "real" else 0
#: More rounds for calls of about a second, whose medians otherwise move with machine noise.
SHORT_CALL_ROUNDS = 9 if SIZE == "real" else 1


@dataclass(frozen=True)
class ClipSize:
    """Dimensions of the benchmarked CLIP tower and the LLM width it projects to."""

    width: int
    intermediate: int
    heads: int
    blocks: int
    image: int
    patch: int
    batch: int
    llm_dim: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image // self.patch
        return side, side


CLIP_L_336 = ClipSize(
    width=1024, intermediate=4096, heads=16, blocks=24, image=336, patch=14, batch=4, llm_dim=4096
)
TINY = ClipSize(
    width=32, intermediate=64, heads=2, blocks=24, image=336, patch=14, batch=2, llm_dim=64
)


def record(benchmark, measurements: dict, group: str, variant: str, **extra: float) -> None:
    """Keep a finished benchmark's median (and extra figures) for ratio checks in the same run.

    The extra figures also go into pytest-benchmark's JSON (``extra_info``), which
    ``benchmarks/report.py`` renders into ``docs/benchmarks.md``.
    """
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    benchmark.extra_info.update(extra, size=SIZE)
    measurements.setdefault(group, {})[variant] = {
        "median_s": stats.median if stats is not None else float("nan"),
        **extra,
    }
