"""PNG charts of the benchmark groups (matplotlib, Agg canvas: no display needed).

Each chart shows the CPU run's ratios against the group's baseline (and the GPU run's, when
given, as a second series) and the absolute figures on the bars or in their own panel::

    written = write_charts(cpu_run, gpu_run, Path("docs/images"))   # {group: path}

The rows come from ``report_tables`` so that tables and charts show the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from report_results import Run
from report_tables import (
    CAPTURE,
    CONNECTOR,
    PREFILL,
    TRAINING,
    TRAINING_BASELINE,
    ZOO,
    capture_rows,
    connector_rows,
    milliseconds,
    prefill_rows,
    training_rows,
    zoo_rows,
)

#: File names of the charts, per group.
CHART_FILES = {
    CAPTURE: "bench_tap_capture.png",
    CONNECTOR: "bench_connector.png",
    PREFILL: "bench_prefill.png",
    TRAINING: "bench_training_step.png",
    ZOO: "bench_zoo.png",
}
_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")


def _figure(panels: int, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * panels, height), layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _bars(
    axes,
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    notes: dict[str, Sequence[str]] | None = None,
) -> None:
    """Grouped horizontal bars: one group per label, one bar per series, notes at the bar ends."""
    count = len(series)
    height = 0.8 / count
    for index, (name, values) in enumerate(series.items()):
        offsets = [position + (index - (count - 1) / 2) * height for position in range(len(labels))]
        bars = axes.barh(offsets, values, height=height, label=name, color=_COLOURS[index % 4])
        texts = (notes or {}).get(name)
        if texts is not None:
            axes.bar_label(bars, labels=list(texts), padding=3, fontsize=8)
    axes.set_yticks(range(len(labels)), labels=list(labels), fontsize=8)
    axes.invert_yaxis()  # first row on top, as in the tables
    axes.margins(x=0.25)
    if count > 1:
        axes.legend(fontsize=8, loc="lower right")


def _thousands(axes) -> None:
    """Tick labels like ``1,500,000`` instead of an offset exponent."""
    from matplotlib.ticker import StrMethodFormatter

    axes.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    axes.tick_params(axis="x", labelrotation=30, labelsize=8)


def _series_names(cpu: Run, gpu: Run | None) -> tuple[str, str]:
    return f"CPU ({cpu.dtype})", (f"{gpu.device_name} ({gpu.dtype})" if gpu else "")


def _matched(gpu_rows: list[dict] | None, keys: list, field: str) -> list[float]:
    by_key = {row["key"]: row for row in gpu_rows or []}
    return [by_key[key][field] if key in by_key else float("nan") for key in keys]


def capture_chart(cpu: Run, gpu: Run | None, path: Path) -> Path:
    """Time vs the plain forward, and capture overhead in MiB, per capture variant."""
    rows = capture_rows(cpu)
    labels = [row["key"] for row in rows]
    cpu_name, gpu_name = _series_names(cpu, gpu)
    gpu_rows = capture_rows(gpu) if gpu and gpu.group(CAPTURE) else None
    figure, (time_axes, memory_axes) = _figure(2)
    times = {cpu_name: [row["time_ratio"] for row in rows]}
    time_notes = {cpu_name: [f"{row['time_ratio']:.2f}x ({row['median_s']:.2f} s)" for row in rows]}
    memory = {cpu_name: [row["overhead_mib"] for row in rows]}
    memory_notes = {cpu_name: [f"{row['overhead_mib']:.1f}" for row in rows]}
    if gpu_rows is not None:
        times[gpu_name] = _matched(gpu_rows, labels, "time_ratio")
        time_notes[gpu_name] = [f"{value:.2f}x" for value in times[gpu_name]]
        memory[gpu_name] = _matched(gpu_rows, labels, "overhead_mib")
        memory_notes[gpu_name] = [f"{value:.1f}" for value in memory[gpu_name]]
    _bars(time_axes, labels, times, time_notes)
    time_axes.axvline(1.0, color="grey", linewidth=0.8)
    time_axes.set_xlabel("time / plain forward (lower is better)")
    _bars(memory_axes, labels, memory, memory_notes)
    memory_axes.set_xlabel("peak memory above the plain forward (MiB)")
    figure.suptitle("Capturing the DCI inputs at CLIP-L/336, batch 4")
    figure.savefig(path, dpi=110)
    return path


def connector_chart(cpu: Run, gpu: Run | None, path: Path) -> Path:
    """Visual tokens per second, and connector time / bare projector matmuls, per preset."""
    rows = connector_rows(cpu)
    labels = [row["key"] for row in rows]
    cpu_name, gpu_name = _series_names(cpu, gpu)
    gpu_rows = connector_rows(gpu) if gpu and gpu.group(CONNECTOR) else None
    figure, panels = _figure(3 if gpu_rows is not None else 2)
    _bars(
        panels[0],
        labels,
        {cpu_name: [row["tokens_per_s"] for row in rows]},
        {cpu_name: [f"{row['tokens_per_s']:,.0f}" for row in rows]},
    )
    panels[0].set_xlabel(f"visual tokens per second, {cpu_name}")
    _thousands(panels[0])
    ratios = {cpu_name: [row["ratio"] for row in rows]}
    if gpu_rows is not None:
        ratios[gpu_name] = _matched(gpu_rows, labels, "ratio")
    _bars(
        panels[1],
        labels,
        ratios,
        {name: [f"{value:.2f}x" for value in values] for name, values in ratios.items()},
    )
    panels[1].axvline(1.2, color="grey", linestyle="--", linewidth=0.8)
    panels[1].set_xlabel("connector time / bare projector matmuls (dashed: 1.2x target)")
    if gpu_rows is not None:
        throughput = _matched(gpu_rows, labels, "tokens_per_s")
        _bars(
            panels[2],
            labels,
            {gpu_name: throughput},
            {gpu_name: [f"{value:,.0f}" for value in throughput]},
        )
        panels[2].set_xlabel(f"visual tokens per second, {gpu_name}")
        _thousands(panels[2])
    figure.suptitle("Connector (fuse + project), batch 4, to 4096")
    figure.savefig(path, dpi=110)
    return path


def prefill_chart(cpu: Run, gpu: Run | None, path: Path) -> Path:
    """Prefill speed-up vs 576 visual tokens per variant, with the absolute times."""
    rows = prefill_rows(cpu)
    labels = [f"{row['key']} ({row['visual_tokens']} visual)" for row in rows]
    keys = [row["key"] for row in rows]
    cpu_name, gpu_name = _series_names(cpu, gpu)
    speedups = {cpu_name: [row["speedup"] for row in rows]}
    notes = {cpu_name: [f"{row['speedup']:.2f}x ({row['median_s']:.2f} s)" for row in rows]}
    if gpu and gpu.group(PREFILL):
        gpu_rows = prefill_rows(gpu)
        speedups[gpu_name] = _matched(gpu_rows, keys, "speedup")
        times = _matched(gpu_rows, keys, "median_s")
        notes[gpu_name] = [
            f"{value:.2f}x ({milliseconds(time)} ms)"
            for value, time in zip(speedups[gpu_name], times, strict=True)
        ]
    figure, (axes,) = _figure(1, width=8.0)
    _bars(axes, labels, speedups, notes)
    axes.axvline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("prefill speed-up vs 576 visual tokens (higher is better)")
    figure.suptitle("LLM prefill (1.1B Llama shape), batch 1, 64 text tokens")
    figure.savefig(path, dpi=110)
    return path


def training_chart(cpu: Run, gpu: Run | None, path: Path) -> Path:
    """Step time vs the baseline connector's, per stage (one panel each) and connector."""
    rows = training_rows(cpu)
    stages = list(dict.fromkeys(row["stage"] for row in rows))
    cpu_name, gpu_name = _series_names(cpu, gpu)
    gpu_rows = training_rows(gpu) if gpu and gpu.group(TRAINING) else None
    figure, panels = _figure(len(stages))
    for axes, stage in zip(panels, stages, strict=True):
        stage_rows = [row for row in rows if row["stage"] == stage]
        keys = [row["key"] for row in stage_rows]
        series = {cpu_name: [row["vs_baseline"] for row in stage_rows]}
        notes = {
            cpu_name: [f"{row['vs_baseline']:.2f}x ({row['median_s']:.2f} s)" for row in stage_rows]
        }
        if gpu_rows is not None:
            series[gpu_name] = _matched(gpu_rows, keys, "vs_baseline")
            times = _matched(gpu_rows, keys, "median_s")
            notes[gpu_name] = [
                f"{value:.2f}x ({milliseconds(time)} ms)"
                for value, time in zip(series[gpu_name], times, strict=True)
            ]
        _bars(axes, [row["connector"] for row in stage_rows], series, notes)
        axes.axvline(1.0, color="grey", linewidth=0.8)
        axes.set_title(stage, fontsize=10)
        axes.set_xlabel(f"step time / {TRAINING_BASELINE} (lower is better)")
    figure.suptitle("One optimizer step of a Dense LLaVA (CLIP-L/336 tower, small Llama)")
    figure.savefig(path, dpi=110)
    return path


def zoo_chart(cpu: Run, gpu: Run | None, path: Path) -> Path:
    """Per zoo preset: connector time / its bare GEMMs and / LLaVA's MLP, and visual tokens per
    second of the connector and of the MLP (a third panel: the GPU run's, when given)."""
    rows = zoo_rows(cpu)
    labels = [f"{row['key']} ({row['tokens_per_image']})" for row in rows]
    keys = [row["key"] for row in rows]
    cpu_name, gpu_name = _series_names(cpu, gpu)
    gpu_rows = zoo_rows(gpu) if gpu and gpu.group(ZOO) else None
    height = max(4.0, 0.45 * len(rows) + 1.5)
    figure, panels = _figure(3 if gpu_rows is not None else 2, height=height)
    ratios = {
        "connector / bare GEMMs": [row["vs_bare"] for row in rows],
        "connector / LLaVA MLP": [row["vs_mlp"] for row in rows],
    }
    _bars(
        panels[0],
        labels,
        ratios,
        {name: [f"{value:.2f}x" for value in values] for name, values in ratios.items()},
    )
    panels[0].axvline(1.0, color="grey", linewidth=0.8)
    panels[0].set_xscale("log")
    panels[0].set_xlabel(f"time ratio, {cpu_name} (log scale; lower is faster)")
    throughput = {
        "connector": [row["tokens_per_s"] for row in rows],
        "LLaVA MLP": [row["mlp_tokens_per_s"] for row in rows],
    }
    _bars(
        panels[1],
        labels,
        throughput,
        {name: [f"{value:,.0f}" for value in values] for name, values in throughput.items()},
    )
    panels[1].set_xlabel(f"visual tokens per second, {cpu_name}")
    _thousands(panels[1])
    if gpu_rows is not None:
        values = _matched(gpu_rows, keys, "tokens_per_s")
        _bars(panels[2], labels, {gpu_name: values}, {gpu_name: [f"{v:,.0f}" for v in values]})
        panels[2].set_xlabel(f"connector visual tokens per second, {gpu_name}")
        _thousands(panels[2])
    for axes in panels[:2]:  # above the bars: the last rows would hide under a legend inside
        axes.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    figure.suptitle("Connector zoo at each family's size (tokens per image in brackets)")
    figure.savefig(path, dpi=110)
    return path


_CHARTS = {
    CAPTURE: capture_chart,
    CONNECTOR: connector_chart,
    PREFILL: prefill_chart,
    TRAINING: training_chart,
    ZOO: zoo_chart,
}


def write_charts(
    cpu: Run, gpu: Run | None, directory: Path, *, zoo: Run | None = None
) -> dict[str, Path]:
    """Write the chart of every group ``cpu`` holds into ``directory``; ``{group: path}``. A
    separate ``zoo`` run draws the zoo chart instead of ``cpu``'s zoo group."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = {group: zoo if group == ZOO and zoo is not None else cpu for group in _CHARTS}
    return {
        group: chart(sources[group], gpu, directory / CHART_FILES[group])
        for group, chart in _CHARTS.items()
        if sources[group].group(group)
    }
