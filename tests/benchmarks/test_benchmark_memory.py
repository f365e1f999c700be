"""The benchmarks' peak-memory tracker counts allocations, not views of existing tensors."""

from __future__ import annotations

import importlib.util

import torch

from tests.support.paths import REPO_ROOT

_PATH = REPO_ROOT / "benchmarks" / "memory.py"
_SPEC = importlib.util.spec_from_file_location("mmconnect_benchmarks_memory", _PATH)
_MEMORY = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_MEMORY)
peak_tensor_bytes = _MEMORY.peak_tensor_bytes


def test_counts_only_tensors_allocated_inside():
    linear = torch.nn.Linear(1000, 1000)
    inputs = torch.randn(10, 1000)
    with torch.no_grad():
        # The Linear's weight (and its transposed view) existed before: only the output counts.
        assert peak_tensor_bytes(lambda: linear(inputs)) == 10 * 1000 * 4


def test_peak_is_the_high_water_mark_not_the_sum():
    def allocate_and_free():
        first = torch.zeros(1000, 1000)  # 4 MB
        second = torch.zeros(1000, 1000)
        del first
        third = torch.zeros(1000, 1000)
        return second, third

    assert peak_tensor_bytes(allocate_and_free) == 2 * 4_000_000


def test_views_of_new_tensors_are_counted_once():
    def views():
        base = torch.zeros(1000, 1000)
        return base.t(), base[1:], base.view(-1)

    assert peak_tensor_bytes(views) == 4_000_000
