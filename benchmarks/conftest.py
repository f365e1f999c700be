"""Shared fixtures of the benchmark suite.

``MMCONNECT_BENCH_SIZE=real`` (default) measures at the published sizes (CLIP-L/336: 24 blocks,
width 1024, 577 tokens, batch 4; projector to 4096); ``tiny`` runs the same code on a narrow
encoder in seconds, which the test suite uses to keep the benchmarks from rotting. Ratio targets
are checked only at ``real`` size.
"""

from __future__ import annotations

import pytest
import torch
from harness import CLIP_L_336, SIZE, TINY, ClipSize


@pytest.fixture(scope="session")
def clip_size() -> ClipSize:
    return CLIP_L_336 if SIZE == "real" else TINY


@pytest.fixture(scope="session")
def clip_tower(clip_size):
    """A randomly initialised HF ``CLIPVisionModel`` of ``clip_size`` (eval mode, fp32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=clip_size.width,
        intermediate_size=clip_size.intermediate,
        num_attention_heads=clip_size.heads,
        num_hidden_layers=clip_size.blocks,
        image_size=clip_size.image,
        patch_size=clip_size.patch,
    )
    return CLIPVisionModel(config).eval()


@pytest.fixture(scope="session")
def pixel_values(clip_size):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(clip_size.batch, 3, clip_size.image, clip_size.image, generator=generator)


@pytest.fixture(scope="session")
def measurements() -> dict[str, dict[str, dict[str, float]]]:
    """Results shared across one run: ``measurements[group][variant] = {"median_s": ..., ...}``."""
    return {}
