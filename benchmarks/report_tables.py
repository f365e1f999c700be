"""The figures of each benchmark group, derived from a :class:`report_results.Run`, as rows and
as Markdown tables.

Every ratio divides two medians of the same run. A ``*_rows`` function returns one dict per row
(used by the tables here and by ``report_charts``); a ``*_table`` function renders the CPU run's
rows with its absolute figures and ratios and, when a GPU run is given, that run's absolute
figures (and its own ratios) beside them, matched by the benchmark's parameters::

    lines = prefill_table(cpu_run, gpu_run)   # gpu_run may be None

Standard library only: rendering needs neither torch nor pytest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from report_results import Run

MIB = 1024 * 1024
CAPTURE = "tap-capture"
CONNECTOR = "connector"
PREFILL = "prefill"
TRAINING = "training-step"
ZOO = "zoo"
#: The three implementations every zoo preset runs (``benchmarks/test_zoo_throughput.py``).
ZOO_IMPLEMENTATIONS = ("connector", "bare-matmuls", "llava-mlp")
CAPTURE_VARIANTS = ("plain-forward", "output-hidden-states", "tap-dci-streaming")
#: Throughput of every preset is also compared with LLaVA-1.5's connector.
CONNECTOR_BASELINE = "baseline-clip-l-336"
#: The prefill variant every speed-up is measured against: LLaVA-1.5's 576 visual tokens.
PREFILL_BASELINE = "standard-576"
#: The connector every training step is compared with, per stage.
TRAINING_BASELINE = "baseline-clip-l-336"
Row = dict[str, Any]


def _require(run: Run, group: str, found: dict[str, Any], wanted: Sequence[str]) -> None:
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(
            f"the {group!r} group of the {run.device} run has no {missing} entry to compare with "
            f"(it has {sorted(found)})"
        )


# ---------------------------------------------------------------------------- rows


def capture_rows(run: Run) -> list[Row]:
    """Per capture variant: median, time vs the plain forward, peak memory, capture overhead
    (peak above the plain forward's) and that overhead vs ``output_hidden_states``'s."""
    by_variant = {entry.params["variant"]: entry for entry in run.group(CAPTURE)}
    _require(run, CAPTURE, by_variant, CAPTURE_VARIANTS[:2])
    plain, hidden = by_variant["plain-forward"], by_variant["output-hidden-states"]
    hidden_overhead = hidden.extra["peak_bytes"] - plain.extra["peak_bytes"]
    rows = []
    for variant in (*CAPTURE_VARIANTS, *sorted(set(by_variant) - set(CAPTURE_VARIANTS))):
        if variant not in by_variant:
            continue
        entry = by_variant[variant]
        overhead = entry.extra["peak_bytes"] - plain.extra["peak_bytes"]
        rows.append(
            {
                "key": variant,
                "median_s": entry.median_s,
                "time_ratio": entry.median_s / plain.median_s,
                "peak_mib": entry.extra["peak_bytes"] / MIB,
                "overhead_mib": overhead / MIB,
                "overhead_ratio": overhead / hidden_overhead if hidden_overhead else float("nan"),
            }
        )
    return rows


def connector_rows(run: Run) -> list[Row]:
    """Per preset: encoder, visual tokens, connector and bare-matmul medians, their ratio, the
    connector's visual tokens per second and that throughput vs ``baseline-clip-l-336``'s."""
    pairs: dict[str, dict[str, Any]] = {}
    for entry in run.group(CONNECTOR):
        pairs.setdefault(entry.params["preset"], {})[entry.params["implementation"]] = entry
    rows = []
    for preset, pair in pairs.items():
        _require(run, f"{CONNECTOR}:{preset}", pair, ("connector", "bare-matmuls"))
        connector, bare = pair["connector"], pair["bare-matmuls"]
        rows.append(
            {
                "key": preset,
                "encoder": connector.extra.get("encoder", "CLIP-L/336"),
                "visual_tokens": connector.extra["visual_tokens"],
                "tokens_per_image": connector.extra.get("tokens_per_image"),
                "connector_s": connector.median_s,
                "bare_s": bare.median_s,
                "ratio": connector.median_s / bare.median_s,
                "tokens_per_s": connector.extra["visual_tokens"] / connector.median_s,
            }
        )
    baseline = next((row for row in rows if row["key"] == CONNECTOR_BASELINE), None)
    for row in rows:
        row["vs_baseline"] = (
            row["tokens_per_s"] / baseline["tokens_per_s"] if baseline else float("nan")
        )
    order = {preset: index for index, preset in enumerate(pairs)}
    return sorted(rows, key=lambda row: (row["encoder"], order[row["key"]]))


def prefill_rows(run: Run) -> list[Row]:
    """Per variant, fewest visual tokens first: token counts, median, speed-up vs 576 tokens."""
    by_variant = {entry.params["variant"]: entry for entry in run.group(PREFILL)}
    _require(run, PREFILL, by_variant, (PREFILL_BASELINE,))
    baseline = by_variant[PREFILL_BASELINE].median_s
    rows = [
        {
            "key": variant,
            "visual_tokens": entry.extra["visual_tokens"],
            "total_tokens": entry.extra["total_tokens"],
            "median_s": entry.median_s,
            "speedup": baseline / entry.median_s,
        }
        for variant, entry in by_variant.items()
    ]
    return sorted(rows, key=lambda row: row["visual_tokens"])


def training_rows(run: Run) -> list[Row]:
    """Per stage and connector: visual tokens, trainable parameters, median step, step time vs
    the baseline connector's in the same stage. Keys are ``(stage, connector)``."""
    stages: dict[str, dict[str, Any]] = {}
    for entry in run.group(TRAINING):
        stages.setdefault(entry.params["stage"], {})[entry.params["connector"]] = entry
    rows = []
    for stage, by_connector in stages.items():
        _require(run, f"{TRAINING}:{stage}", by_connector, (TRAINING_BASELINE,))
        baseline = by_connector[TRAINING_BASELINE].median_s
        ordered = [TRAINING_BASELINE, *(c for c in by_connector if c != TRAINING_BASELINE)]
        for connector in ordered:
            entry = by_connector[connector]
            rows.append(
                {
                    "key": (stage, connector),
                    "stage": stage,
                    "connector": connector,
                    "visual_tokens": entry.extra["visual_tokens"],
                    "trainable_parameters": entry.extra["trainable_parameters"],
                    "median_s": entry.median_s,
                    "vs_baseline": entry.median_s / baseline,
                }
            )
    return rows


def zoo_rows(run: Run) -> list[Row]:
    """Per zoo preset: projector, fusion, encoder, tokens and parameters of the connector and of
    LLaVA's MLP, the three medians, connector time / bare GEMMs and / LLaVA MLP, GFLOP, and both
    throughputs in visual tokens per second. Run order (the presets sorted by name)."""
    presets: dict[str, dict[str, Any]] = {}
    for entry in run.group(ZOO):
        presets.setdefault(entry.params["preset"], {})[entry.params["implementation"]] = entry
    rows = []
    for preset, found in presets.items():
        _require(run, f"{ZOO}:{preset}", found, ZOO_IMPLEMENTATIONS)
        connector, bare, mlp = (found[name] for name in ZOO_IMPLEMENTATIONS)
        rows.append(
            {
                "key": preset,
                "projector": connector.extra.get("projector", "?"),
                "fusion": connector.extra.get("fusion", "?"),
                "encoder": connector.extra.get("encoder", "?"),
                "tokens_per_image": connector.extra["tokens_per_image"],
                "mlp_tokens_per_image": mlp.extra["tokens_per_image"],
                "parameters": connector.extra["parameters"],
                "mlp_parameters": mlp.extra["parameters"],
                "gflop": connector.extra.get("gflop", float("nan")),
                "gemm_gflop": bare.extra.get("gflop", float("nan")),
                "mlp_gflop": mlp.extra.get("gflop", float("nan")),
                "connector_s": connector.median_s,
                "bare_s": bare.median_s,
                "mlp_s": mlp.median_s,
                "vs_bare": connector.median_s / bare.median_s,
                "vs_mlp": connector.median_s / mlp.median_s,
                "tokens_per_s": connector.extra["visual_tokens"] / connector.median_s,
                "mlp_tokens_per_s": mlp.extra["visual_tokens"] / mlp.median_s,
            }
        )
    return rows


# ---------------------------------------------------------------------------- formatting


def seconds(value: float) -> str:
    """Seconds with three decimals (CPU figures)."""
    return f"{value:.3f}"


def milliseconds(value_s: float) -> str:
    """``value_s`` in milliseconds with three significant digits (GPU figures are short)."""
    ms = value_s * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def gflop(value: float) -> str:
    """GFLOP with three significant digits below 100 (tiny runs count fractions)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def count(value: float) -> str:
    """A parameter count with its unit: ``12.3M``, ``4.56K``, ``789``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def ratio(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}x"  # NaN: no baseline in this run


def _markdown(header: Sequence[str], right: Sequence[bool], rows: list[list[str]]) -> list[str]:
    separator = ["---:" if align else "---" for align in right]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(separator) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _with_gpu(
    header: list[str],
    right: list[bool],
    cells: list[list[str]],
    keys: list[Any],
    gpu_rows: list[Row] | None,
    gpu_columns: list[tuple[str, Callable[[Row], str]]],
    gpu_name: str,
) -> list[str]:
    """Append the GPU run's columns (``—`` where it lacks a row) and render the table."""
    if gpu_rows is not None:
        by_key = {row["key"]: row for row in gpu_rows}
        header = [*header, *(f"{title} ({gpu_name})" for title, _ in gpu_columns)]
        right = [*right, *(True for _ in gpu_columns)]
        cells = [
            [*row, *(show(by_key[key]) if key in by_key else "—" for _, show in gpu_columns)]
            for row, key in zip(cells, keys, strict=True)
        ]
    return _markdown(header, right, cells)


def _gpu_rows(gpu: Run | None, group: str, rows: Callable[[Run], list[Row]]) -> list[Row] | None:
    """The GPU run's rows of ``group``, or ``None`` when there is no GPU run or it lacks it."""
    return rows(gpu) if gpu is not None and gpu.group(group) else None


# ---------------------------------------------------------------------------- tables


def capture_table(cpu: Run, gpu: Run | None = None) -> list[str]:
    """Markdown lines of the tap-capture group (see :func:`capture_rows`)."""
    rows = capture_rows(cpu)
    cells = [
        [
            f"`{row['key']}`",
            seconds(row["median_s"]),
            ratio(row["time_ratio"]),
            f"{row['peak_mib']:.1f}",
            f"{row['overhead_mib']:.1f}",
            f"{row['overhead_ratio']:.3f}",
        ]
        for row in rows
    ]
    return _with_gpu(
        [
            "variant",
            "median time (s)",
            "time vs plain forward",
            "peak tensor memory (MiB)",
            "capture overhead (MiB)",
            "overhead vs output_hidden_states",
        ],
        [False, *[True] * 5],
        cells,
        [row["key"] for row in rows],
        _gpu_rows(gpu, CAPTURE, capture_rows),
        [
            ("median (ms)", lambda row: milliseconds(row["median_s"])),
            ("capture overhead (MiB)", lambda row: f"{row['overhead_mib']:.1f}"),
        ],
        gpu.device_name if gpu else "",
    )


def connector_table(cpu: Run, gpu: Run | None = None) -> list[str]:
    """Markdown lines of the connector group (see :func:`connector_rows`)."""
    rows = connector_rows(cpu)
    cells = [
        [
            f"`{row['key']}`",
            row["encoder"],
            str(row["tokens_per_image"] if row["tokens_per_image"] is not None else "?"),
            milliseconds(row["connector_s"]),
            milliseconds(row["bare_s"]),
            ratio(row["ratio"]),
            f"{row['tokens_per_s']:,.0f}",
            ratio(row["vs_baseline"]),
        ]
        for row in rows
    ]
    return _with_gpu(
        [
            "preset",
            "encoder size",
            "visual tokens per image",
            "connector (ms)",
            "bare matmuls (ms)",
            "connector / bare",
            "visual tokens per second",
            "tokens/s vs baseline",
        ],
        [False, False, *[True] * 6],
        cells,
        [row["key"] for row in rows],
        _gpu_rows(gpu, CONNECTOR, connector_rows),
        [
            ("connector (ms)", lambda row: milliseconds(row["connector_s"])),
            ("visual tokens per second", lambda row: f"{row['tokens_per_s']:,.0f}"),
        ],
        gpu.device_name if gpu else "",
    )


def prefill_table(cpu: Run, gpu: Run | None = None) -> list[str]:
    """Markdown lines of the prefill group (see :func:`prefill_rows`)."""
    rows = prefill_rows(cpu)
    cells = [
        [
            f"`{row['key']}`",
            str(row["visual_tokens"]),
            str(row["total_tokens"]),
            seconds(row["median_s"]),
            ratio(row["speedup"]),
        ]
        for row in rows
    ]
    return _with_gpu(
        ["variant", "visual tokens", "total tokens", "median time (s)", "speed-up vs 576"],
        [False, True, True, True, True],
        cells,
        [row["key"] for row in rows],
        _gpu_rows(gpu, PREFILL, prefill_rows),
        [
            ("median (ms)", lambda row: milliseconds(row["median_s"])),
            ("speed-up vs 576", lambda row: ratio(row["speedup"])),
        ],
        gpu.device_name if gpu else "",
    )


def training_table(cpu: Run, gpu: Run | None = None) -> list[str]:
    """Markdown lines of the training-step group (see :func:`training_rows`)."""
    rows = training_rows(cpu)
    cells = [
        [
            row["stage"],
            f"`{row['connector']}`",
            str(row["visual_tokens"]),
            f"{row['trainable_parameters']:,}",
            seconds(row["median_s"]),
            ratio(row["vs_baseline"]),
        ]
        for row in rows
    ]
    return _with_gpu(
        [
            "stage",
            "connector",
            "visual tokens",
            "trainable parameters",
            "step median (s)",
            "step vs baseline",
        ],
        [False, False, True, True, True, True],
        cells,
        [row["key"] for row in rows],
        _gpu_rows(gpu, TRAINING, training_rows),
        [
            ("step (ms)", lambda row: milliseconds(row["median_s"])),
            ("step vs baseline", lambda row: ratio(row["vs_baseline"])),
        ],
        gpu.device_name if gpu else "",
    )


def zoo_table(cpu: Run, gpu: Run | None = None) -> list[str]:
    """Markdown lines of the zoo group (see :func:`zoo_rows`)."""
    rows = zoo_rows(cpu)
    cells = [
        [
            f"`{row['key']}`",
            f"`{row['projector']}` ({row['fusion']})",
            row["encoder"],
            f"{row['tokens_per_image']} / {row['mlp_tokens_per_image']}",
            f"{count(row['parameters'])} / {count(row['mlp_parameters'])}",
            " / ".join(gflop(row[name]) for name in ("gflop", "gemm_gflop", "mlp_gflop")),
            milliseconds(row["connector_s"]),
            milliseconds(row["bare_s"]),
            milliseconds(row["mlp_s"]),
            ratio(row["vs_bare"]),
            ratio(row["vs_mlp"]),
            f"{row['tokens_per_s']:,.0f}",
        ]
        for row in rows
    ]
    return _with_gpu(
        [
            "preset",
            "projector (fusion)",
            "encoder",
            "visual tokens per image: connector / LLaVA MLP",
            "parameters: connector / LLaVA MLP",
            "GFLOP per call: connector / its GEMMs / LLaVA MLP",
            "connector (ms)",
            "bare GEMMs (ms)",
            "LLaVA MLP (ms)",
            "connector / bare GEMMs",
            "connector / LLaVA MLP",
            "visual tokens per second",
        ],
        [False, False, False, *[True] * 9],
        cells,
        [row["key"] for row in rows],
        _gpu_rows(gpu, ZOO, zoo_rows),
        [
            ("connector (ms)", lambda row: milliseconds(row["connector_s"])),
            ("connector / LLaVA MLP", lambda row: ratio(row["vs_mlp"])),
            ("visual tokens per second", lambda row: f"{row['tokens_per_s']:,.0f}"),
        ],
        gpu.device_name if gpu else "",
    )
