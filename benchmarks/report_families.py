"""Rows, Markdown tables and PNG charts of the family benchmarks (``test_family_tap.py``,
``test_family_prefill.py``), from a :class:`report_results.Run`.

Every ratio divides two medians of the same run::

    lines = family_tap_table(run)
    written = write_family_charts(run, Path("docs/images"))   # {group: path}

Standard library (and matplotlib for the charts) only: rendering needs neither torch nor pytest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report_results import Entry, Run
from report_tables import MIB, _markdown, ratio, seconds

FAMILY_TAP = "family-tap"
FAMILY_PREFILL = "family-prefill"
FAMILY_TAP_VARIANTS = ("plain-forward", "output-hidden-states", "tap-dci-streaming")
#: File names of the charts, per group.
FAMILY_CHART_FILES = {
    FAMILY_TAP: "bench_family_tap.png",
    FAMILY_PREFILL: "bench_family_prefill.png",
}
Row = dict[str, Any]


def _key(entry: Entry) -> tuple[str, str]:
    """``(tower or family, variant or part)`` of an entry, from its parameters."""
    if "tap_tower" in entry.params:
        return entry.params["tap_tower"], entry.params["variant"]
    return entry.params["family"], entry.extra["part"]


def family_tap_rows(run: Run) -> list[Row]:
    """Per tower (run order) and capture variant: median, time vs the tower's plain forward,
    peak memory, capture overhead (peak above the plain forward's) and that overhead vs
    ``output_hidden_states``'s.

    Raises:
        ValueError: a tower lacks its ``plain-forward`` or ``output-hidden-states`` entry.
    """
    towers: dict[str, dict[str, Entry]] = {}
    for entry in run.group(FAMILY_TAP):
        tower, variant = _key(entry)
        towers.setdefault(tower, {})[variant] = entry
    rows = []
    for tower, variants in towers.items():
        missing = [name for name in FAMILY_TAP_VARIANTS[:2] if name not in variants]
        if missing:
            raise ValueError(f"the {FAMILY_TAP!r} group has no {missing} entry for {tower!r}")
        plain, hidden = variants["plain-forward"], variants["output-hidden-states"]
        hidden_overhead = hidden.extra["peak_bytes"] - plain.extra["peak_bytes"]
        for variant in FAMILY_TAP_VARIANTS:
            if variant not in variants:
                continue
            entry = variants[variant]
            overhead = entry.extra["peak_bytes"] - plain.extra["peak_bytes"]
            rows.append(
                {
                    "key": (tower, variant),
                    "tower": tower,
                    "variant": variant,
                    "encoder": entry.extra.get("encoder", tower),
                    "tokens": entry.extra.get("tokens"),
                    "median_s": entry.median_s,
                    "time_ratio": entry.median_s / plain.median_s,
                    "peak_mib": entry.extra["peak_bytes"] / MIB,
                    "overhead_mib": overhead / MIB,
                    "overhead_ratio": overhead / hidden_overhead
                    if hidden_overhead
                    else float("nan"),
                }
            )
    return rows


PREFILL_PARTS = ("image-native", "image-dense", "llm")


def _prefill_parts(run: Run) -> dict[str, dict[str, Entry]]:
    families: dict[str, dict[str, Entry]] = {}
    for entry in run.group(FAMILY_PREFILL):
        family, part = _key(entry)
        families.setdefault(family, {})[part] = entry
    return families


def incomplete_families(run: Run) -> dict[str, list[str]]:
    """``family -> parts it lacks`` for the families of a run that did not time all three parts
    (an interrupted run): they get no row, and the table names them."""
    return {
        family: [name for name in PREFILL_PARTS if name not in parts]
        for family, parts in _prefill_parts(run).items()
        if not set(PREFILL_PARTS) <= set(parts)
    }


def family_prefill_rows(run: Run) -> list[Row]:
    """Per family that timed all three parts (run order): the unit, its visual tokens, the image
    path with each connector, the LLM prefill, per-unit totals (image path + prefill) and the
    ratios dense / native. :func:`incomplete_families` names the others."""
    rows = []
    for family, parts in _prefill_parts(run).items():
        if not set(PREFILL_PARTS) <= set(parts):
            continue
        native, dense, llm = parts["image-native"], parts["image-dense"], parts["llm"]
        native_total = native.median_s + llm.median_s
        dense_total = dense.median_s + llm.median_s
        rows.append(
            {
                "key": family,
                "model": llm.extra.get("model", family),
                "unit": llm.extra.get("unit", "?"),
                "native_preset": native.extra.get("preset", "?"),
                "dense_preset": dense.extra.get("preset", "?"),
                "visual_tokens": llm.extra["visual_tokens"],
                "total_tokens": llm.extra["total_tokens"],
                "llm": llm.extra.get("llm", "?"),
                "native_s": native.median_s,
                "dense_s": dense.median_s,
                "llm_s": llm.median_s,
                "native_total_s": native_total,
                "dense_total_s": dense_total,
                "image_ratio": dense.median_s / native.median_s,
                "total_ratio": dense_total / native_total,
            }
        )
    return rows


def family_tap_table(cpu: Run, gpu: Run | None = None) -> list[str]:
    """Markdown lines of the family tap-capture group (see :func:`family_tap_rows`); CPU only."""
    rows = family_tap_rows(cpu)
    cells = [
        [
            f"{row['encoder']} ({row['tokens']} patches)",
            f"`{row['variant']}`",
            seconds(row["median_s"]),
            ratio(row["time_ratio"]),
            f"{row['peak_mib']:.1f}",
            f"{row['overhead_mib']:.1f}",
            f"{row['overhead_ratio']:.3f}",
        ]
        for row in rows
    ]
    return _markdown(
        [
            "tower, input",
            "variant",
            "median time (s)",
            "time vs plain forward",
            "peak tensor memory (MiB)",
            "capture overhead (MiB)",
            "overhead vs output_hidden_states",
        ],
        [False, False, *[True] * 5],
        cells,
    )


def family_prefill_table(cpu: Run, gpu: Run | None = None) -> list[str]:
    """Markdown lines of the family prefill group (see :func:`family_prefill_rows`), then the
    LLM each family's prefill ran on; CPU only."""
    rows = family_prefill_rows(cpu)
    incomplete = incomplete_families(cpu)
    if not rows:
        missing = "; ".join(
            f"{family} (no {', '.join(parts)})" for family, parts in incomplete.items()
        )
        return [f"No family timed all three parts in this run (measured in part: {missing})."]
    cells = [
        [
            f"{row['model']}: {row['unit']}",
            f"`{row['native_preset']}` / `{row['dense_preset']}`",
            str(row["visual_tokens"]),
            seconds(row["native_s"]),
            seconds(row["dense_s"]),
            ratio(row["image_ratio"]),
            seconds(row["llm_s"]),
            seconds(row["native_total_s"]),
            seconds(row["dense_total_s"]),
            ratio(row["total_ratio"]),
        ]
        for row in rows
    ]
    table = _markdown(
        [
            "family: unit",
            "native / Dense preset",
            "visual tokens",
            "image path, native (s)",
            "image path, Dense (s)",
            "image path Dense / native",
            "LLM prefill (s)",
            "per unit, native (s)",
            "per unit, Dense (s)",
            "per unit Dense / native",
        ],
        [False, False, *[True] * 8],
        cells,
    )
    llms = [f"- {row['model']}: {row['llm']}; {row['total_tokens']} tokens" for row in rows]
    lines = [*table, "", "The LLM of each prefill (random weights, eval mode, SDPA):", "", *llms]
    if incomplete:
        missing = "; ".join(
            f"{family} (no {', '.join(parts)})" for family, parts in incomplete.items()
        )
        lines += ["", f"Not complete in this run, so not shown: {missing}."]
    return lines


# ---------------------------------------------------------------------------- charts


def family_tap_chart(cpu: Run, path: Path) -> Path:
    """Time vs the plain forward, and capture overhead in MiB, per tower and variant."""
    from report_charts import _bars, _figure

    rows = family_tap_rows(cpu)
    labels = [f"{row['tower']}: {row['variant']}" for row in rows]
    figure, (time_axes, memory_axes) = _figure(2, width=6.5)
    name = f"CPU ({cpu.dtype})"
    _bars(
        time_axes,
        labels,
        {name: [row["time_ratio"] for row in rows]},
        {name: [f"{row['time_ratio']:.2f}x ({row['median_s']:.1f} s)" for row in rows]},
    )
    time_axes.axvline(1.0, color="grey", linewidth=0.8)
    time_axes.set_xlabel("time / the tower's plain forward (lower is better)")
    _bars(
        memory_axes,
        labels,
        {name: [row["overhead_mib"] for row in rows]},
        {name: [f"{row['overhead_mib']:.1f}" for row in rows]},
    )
    memory_axes.set_xlabel("peak memory above the plain forward (MiB)")
    figure.suptitle("Capturing DCI inputs on today's towers, one image each")
    figure.savefig(path, dpi=110)
    return path


def family_prefill_chart(cpu: Run, path: Path) -> Path:
    """Per family, native and Dense: seconds per unit split into image path and LLM prefill,
    with the ratio dense / native on the Dense bar."""
    from report_charts import _COLOURS, _figure

    rows = family_prefill_rows(cpu)
    figure, (axes,) = _figure(1, width=9.0, height=max(4.0, 0.7 * len(rows) + 1.5))
    positions, labels = [], []
    for index, row in enumerate(rows):
        for offset, connector in ((-0.2, "native"), (0.2, "dense")):
            positions.append(index + offset)
            labels.append(f"{row['model']} ({connector})")
    image = [value for row in rows for value in (row["native_s"], row["dense_s"])]
    llm = [value for row in rows for value in (row["llm_s"], row["llm_s"])]
    axes.barh(positions, image, height=0.38, color=_COLOURS[0], label="image path")
    bars = axes.barh(
        positions, llm, left=image, height=0.38, color=_COLOURS[1], label="LLM prefill"
    )
    notes = [
        text
        for row in rows
        for text in (f"{row['native_total_s']:.2f} s", f"{row['total_ratio']:.3f}x")
    ]
    axes.bar_label(bars, labels=notes, padding=3, fontsize=8)
    axes.set_yticks(positions, labels=labels, fontsize=8)
    axes.invert_yaxis()
    axes.margins(x=0.2)
    axes.legend(fontsize=8, loc="lower right")
    axes.set_xlabel("seconds per unit on the CPU (Dense bars: total Dense / native)")
    figure.suptitle("Prefill per image / tile: native connector vs Dense Connector (DCI)")
    figure.savefig(path, dpi=110)
    return path


_CHARTS = {FAMILY_TAP: family_tap_chart, FAMILY_PREFILL: family_prefill_chart}
_ROWS = {FAMILY_TAP: family_tap_rows, FAMILY_PREFILL: family_prefill_rows}


def write_family_charts(sources: dict[str, Run], directory: Path) -> dict[str, Path]:
    """Write the chart of each family group into ``directory`` from the run ``sources`` names
    for it (groups without a run, or without a complete row in it, get none); ``{group: path}``."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        group: chart(sources[group], directory / FAMILY_CHART_FILES[group])
        for group, chart in _CHARTS.items()
        if group in sources and sources[group].group(group) and _ROWS[group](sources[group])
    }
