"""Capturing the Dense Connector's DCI inputs: tap vs ``output_hidden_states=True`` vs nothing.

At CLIP-L/336 with batch 4 (24 blocks, 577 tokens, width 1024), three ways to run the tower:

* ``plain-forward``: the tower alone, capturing nothing (the floor);
* ``output-hidden-states``: what LLaVA and the official Dense Connector code do, keeping all 25
  hidden states;
* ``tap-dci-streaming``: ``DenseConnector.make_tap`` for the DCI preset, which keeps ``F`` and one
  running sum per group and stops after block 23.

Capture overhead = peak tensor memory above the plain forward's. Targets: the tap's overhead at
most a quarter of ``output_hidden_states``'s, and its time no slower than the plain forward.

Each variant first runs once under the memory tracker (``benchmarks/memory.py``), which also
warms it up, so the timed rounds need no further warm-up round on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, ROUNDS, WARMUP_ROUNDS, record, synchronized, targets_apply
from memory import peak_bytes

from mmconnect import ConnectorConfig, DenseConnector

GROUP = "tap-capture"
VARIANTS = ("plain-forward", "output-hidden-states", "tap-dci-streaming")


def _capture_function(variant: str, tower, pixel_values, clip_size):
    if variant == "plain-forward":
        return lambda: tower(pixel_values).last_hidden_state
    if variant == "output-hidden-states":
        return lambda: tower(pixel_values, output_hidden_states=True).hidden_states
    config = ConnectorConfig.from_preset(
        "dc-dci-clip-l-336", vision_dim=clip_size.width, llm_dim=clip_size.llm_dim
    )
    tap = DenseConnector(config).make_tap(tower)
    return lambda: tap(pixel_values)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", VARIANTS)
def test_capture(benchmark, variant, clip_tower, pixel_values, clip_size, measurements):
    capture = synchronized(_capture_function(variant, clip_tower, pixel_values, clip_size))
    # The tracked call warms the CPU run up; CUDA still gets its warm-up rounds (kernel choice).
    warmup = WARMUP_ROUNDS if DEVICE == "cuda" else 0
    with torch.no_grad():
        peak = peak_bytes(capture, DEVICE)
        benchmark.pedantic(capture, rounds=ROUNDS, iterations=1, warmup_rounds=warmup)
    record(benchmark, measurements, GROUP, variant, peak_bytes=peak)


def test_capture_targets(measurements):
    results = measurements.get(GROUP, {})
    if not targets_apply() or set(results) != set(VARIANTS):
        pytest.skip("targets are checked at real size on the CPU after all capture variants ran")
    plain, hidden, tap = (results[variant] for variant in VARIANTS)
    tap_overhead = tap["peak_bytes"] - plain["peak_bytes"]
    hidden_overhead = hidden["peak_bytes"] - plain["peak_bytes"]
    assert tap_overhead <= 0.25 * hidden_overhead, (tap_overhead, hidden_overhead)
    assert tap["median_s"] <= plain["median_s"], (tap["median_s"], plain["median_s"])
