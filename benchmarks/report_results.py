"""One run of the benchmark suite, read from the JSON file pytest-benchmark writes.

``pytest benchmarks --benchmark-json=FILE`` stores each benchmark's statistics, its parameters
and the ``extra_info`` that ``harness.record`` adds (size, device, dtype, token counts, ...);
``conftest.pytest_benchmark_update_machine_info`` adds the machine (CPU model, cores, torch,
device). :func:`load_run` turns that into a :class:`Run`::

    run = load_run(json.loads(Path("benchmarks/results.json").read_text()))
    run.median("prefill", variant="standard-576")

Standard library only: rendering needs neither torch nor pytest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One benchmark of a run: its group, parameters, median seconds and extra figures."""

    group: str
    params: dict[str, Any]
    median_s: float
    extra: dict[str, Any]


@dataclass(frozen=True)
class Run:
    """A whole run: the machine, when, at which size / device / dtype, and its entries."""

    machine: dict[str, Any]
    date: str
    size: str
    device: str
    dtype: str
    entries: tuple[Entry, ...]

    def group(self, name: str) -> list[Entry]:
        """The entries of group ``name`` in run order (empty if the run has none)."""
        return [entry for entry in self.entries if entry.group == name]

    def find(self, group: str, **params: Any) -> Entry | None:
        """The entry of ``group`` whose parameters include ``params``, or ``None``."""
        for entry in self.group(group):
            if all(entry.params.get(key) == value for key, value in params.items()):
                return entry
        return None

    def median(self, group: str, **params: Any) -> float | None:
        """The median seconds of :meth:`find`'s entry, or ``None`` when there is none."""
        entry = self.find(group, **params)
        return entry.median_s if entry is not None else None

    @property
    def device_name(self) -> str:
        """The device the run measured on, e.g. ``"NVIDIA H200"`` or the CPU's model."""
        return str(self.machine.get("device_name") or self.machine.get("cpu_model", "unknown"))

    def describe(self) -> str:
        """One line naming the machine: device, cores, torch and transformers, dtype, date."""
        cores = self.machine.get("cpu_count", "?")
        threads = self.machine.get("torch_threads")
        torch_version = self.machine.get("torch", "unknown")
        parts = [f"{self.machine.get('cpu_model', 'unknown CPU')} ({cores} logical cores)"]
        if self.device == "cuda":
            parts.insert(0, self.device_name)
        parts.append(
            f"torch {torch_version}" + (f" (threads: {threads})" if threads is not None else "")
        )
        if "transformers" in self.machine:
            parts.append(f"transformers {self.machine['transformers']}")
        parts.append(self.dtype)
        if self.date:
            parts.append(self.date)
        return ", ".join(parts)


def _single(values: set[str], what: str, default: str) -> str:
    if not values:
        return default
    if len(values) > 1:
        raise ValueError(f"the results mix {what}s {sorted(values)}; render one run at a time")
    return next(iter(values))


def load_run(results: dict[str, Any]) -> Run:
    """A :class:`Run` from a parsed pytest-benchmark JSON file.

    Entries without a median (``--benchmark-disable``) are dropped. Runs written before the
    suite recorded devices count as CPU / fp32 runs.

    Raises:
        ValueError: ``results`` has no ``benchmarks`` list, no timed entry, or mixes sizes,
            devices or dtypes.
    """
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), list):
        raise ValueError("results must be a pytest-benchmark JSON object with a 'benchmarks' list")
    entries = tuple(
        Entry(
            group=item["group"],
            params=dict(item.get("params") or {}),
            median_s=float(item["stats"]["median"]),
            extra=dict(item.get("extra_info") or {}),
        )
        for item in results["benchmarks"]
        if item.get("stats") and item["stats"].get("median") is not None
    )
    if not entries:
        raise ValueError("the results hold no timed benchmark (was --benchmark-disable set?)")
    info = results.get("machine_info", {})
    machine = dict(info.get("mmconnect", {}))
    cpu = info.get("cpu", {})
    machine.setdefault("cpu_model", cpu.get("brand_raw") or info.get("processor") or "unknown CPU")
    machine.setdefault("cpu_count", cpu.get("count", "?"))
    return Run(
        machine=machine,
        date=str(results.get("datetime", ""))[:10],
        size=_single({e.extra.get("size", "real") for e in entries}, "size", "real"),
        device=_single({e.extra.get("device", "cpu") for e in entries}, "device", "cpu"),
        dtype=_single({e.extra.get("dtype", "float32") for e in entries}, "dtype", "float32"),
        entries=entries,
    )
