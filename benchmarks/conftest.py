"""Shared fixtures of the benchmark suite, and the machine description in its JSON.

``MMCONNECT_BENCH_SIZE=real`` (default) measures at the published sizes (CLIP-L/336: 24 blocks,
width 1024, 577 tokens, batch 4; projector to 4096); ``tiny`` runs the same code on a narrow
encoder in seconds, which the test suite uses to keep the benchmarks from rotting. Ratio targets
are checked only at ``real`` size on the CPU. ``MMCONNECT_BENCH_DEVICE`` / ``MMCONNECT_BENCH_DTYPE``
choose the device and dtype (``benchmarks/harness.py``).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
from harness import CLIP_L_336, DEVICE, DTYPE, DTYPE_NAME, SIZE, TINY, TowerSize


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what ``benchmarks/report.py`` names the machine by: CPU, cores, torch, device."""
    import transformers

    machine_info["mmconnect"] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "size": SIZE,
        "device": DEVICE,
        "device_name": torch.cuda.get_device_name() if DEVICE == "cuda" else _cpu_model(),
        "dtype": DTYPE_NAME,
    }


@pytest.fixture(scope="session")
def clip_size() -> TowerSize:
    return CLIP_L_336 if SIZE == "real" else TINY


@pytest.fixture(scope="session")
def clip_tower(clip_size):
    """A randomly initialised HF ``CLIPVisionModel`` of ``clip_size`` (seed 0, eval mode, on the
    benchmark device in the benchmark dtype), built by
    :func:`mmconnect.integrations.applications.tiny_models.tiny_vision_tower`."""
    from mmconnect.integrations.applications.tiny_models import tiny_vision_tower

    tower = tiny_vision_tower(
        "clip",
        blocks=clip_size.blocks,
        width=clip_size.width,
        intermediate_size=clip_size.intermediate,
        heads=clip_size.heads,
        image_size=clip_size.image,
        patch_size=clip_size.patch,
    )
    return tower.to(DEVICE, DTYPE)


@pytest.fixture(scope="session")
def pixel_values(clip_size):
    """``[batch, 3, image, image]`` random pixels on the benchmark device and dtype."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(clip_size.batch, 3, clip_size.image, clip_size.image, generator=generator)
    return pixels.to(DEVICE, DTYPE)


@pytest.fixture(scope="session")
def measurements() -> dict[str, dict[str, dict[str, float]]]:
    """Results shared across one run: ``measurements[group][variant] = {"median_s": ..., ...}``."""
    return {}
