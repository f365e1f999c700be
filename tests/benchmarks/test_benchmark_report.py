"""``benchmarks/report.py``: ratios from one run, GPU figures beside them, refusals, PNG charts.

The inputs are pytest-benchmark JSON objects built here with chosen medians, so every expected
ratio is computed from those medians by hand.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest

from tests.support.paths import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the report modules import one another by name

import report  # noqa: E402
import report_tables  # noqa: E402
from report_results import load_run  # noqa: E402

MIB = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _entry(group: str, params: dict, median: float, **extra) -> dict:
    return {
        "group": group,
        "name": f"test[{'-'.join(map(str, params.values()))}]",
        "params": params,
        "stats": {"median": median},
        "extra_info": {"size": "real", "device": "cpu", "dtype": "float32", **extra},
    }


def _results(scale: float = 1.0) -> dict:
    """A CPU run of all four groups; ``scale`` multiplies every median (a faster device)."""
    entries = [
        _entry("tap-capture", {"variant": "plain-forward"}, 2.0 * scale, peak_bytes=100 * MIB),
        _entry(
            "tap-capture", {"variant": "output-hidden-states"}, 2.5 * scale, peak_bytes=300 * MIB
        ),
        _entry("tap-capture", {"variant": "tap-dci-streaming"}, 1.5 * scale, peak_bytes=120 * MIB),
    ]
    for preset, tokens, connector, bare, encoder in (
        ("baseline-clip-l-336", 576, 1.0, 0.8, "CLIP-L/336"),
        ("dc-sti-siglip-so400m", 911, 2.0, 1.6, "SigLIP-SO400M/384"),
        ("dc-dci-clip-l-336-efficient", 144, 0.5, 0.25, "CLIP-L/336"),
    ):
        for implementation, median in (("connector", connector), ("bare-matmuls", bare)):
            entries.append(
                _entry(
                    "connector",
                    {"preset": preset, "implementation": implementation},
                    median * scale,
                    visual_tokens=4 * tokens,
                    tokens_per_image=tokens,
                    encoder=encoder,
                )
            )
    for variant, visual, median in (
        ("efficient-144", 144, 4.0),
        ("standard-576", 576, 12.0),
        ("sti-720", 720, 16.0),
    ):
        entries.append(
            _entry(
                "prefill",
                {"variant": variant},
                median * scale,
                visual_tokens=visual,
                total_tokens=visual + 64,
            )
        )
    for stage, base in (("stage1-align", 6.0), ("stage2-instruct-full", 8.0)):
        for connector, visual, factor in (
            ("baseline-clip-l-336", 576, 1.0),
            ("dc-dci-clip-l-336", 576, 1.25),
            ("dc-dci-clip-l-336-efficient", 144, 0.75),
        ):
            entries.append(
                _entry(
                    "training-step",
                    {"stage": stage, "connector": connector},
                    base * factor * scale,
                    visual_tokens=visual,
                    trainable_parameters=1000 + visual,
                )
            )
    machine = {
        "cpu": {"brand_raw": "Test CPU", "count": 2},
        "mmconnect": {"cpu_model": "Test CPU 9000", "cpu_count": 2, "torch": "2.99"},
    }
    return {"machine_info": machine, "datetime": "2026-11-28T10:00:00", "benchmarks": entries}


def _gpu_results() -> dict:
    results = _results(scale=0.01)
    results["machine_info"]["mmconnect"].update(device="cuda", device_name="NVIDIA H200")
    for entry in results["benchmarks"]:
        entry["extra_info"].update(device="cuda", dtype="bfloat16")
    # A GPU run that missed one preset: its row must show a dash, not fail.
    results["benchmarks"] = [
        entry
        for entry in results["benchmarks"]
        if entry["params"].get("preset") != "dc-sti-siglip-so400m"
    ]
    return results


def _row(rows: list[dict], key) -> dict:
    return next(row for row in rows if row["key"] == key)


def test_ratios_come_from_medians_of_the_same_run():
    run = load_run(_results())
    capture = report_tables.capture_rows(run)
    tap = _row(capture, "tap-dci-streaming")
    assert tap["time_ratio"] == pytest.approx(1.5 / 2.0)
    assert tap["overhead_mib"] == pytest.approx(20.0)
    assert tap["overhead_ratio"] == pytest.approx(20 / 200)

    connector = report_tables.connector_rows(run)
    # Sorted by encoder name, then run order.
    assert [row["key"] for row in connector] == [
        "baseline-clip-l-336",
        "dc-dci-clip-l-336-efficient",
        "dc-sti-siglip-so400m",
    ]
    sti = _row(connector, "dc-sti-siglip-so400m")
    assert sti["ratio"] == pytest.approx(2.0 / 1.6)
    assert sti["tokens_per_s"] == pytest.approx(4 * 911 / 2.0)
    assert sti["vs_baseline"] == pytest.approx((4 * 911 / 2.0) / (4 * 576 / 1.0))

    prefill = report_tables.prefill_rows(run)
    assert [row["key"] for row in prefill] == ["efficient-144", "standard-576", "sti-720"]
    assert [row["speedup"] for row in prefill] == pytest.approx([12 / 4, 1.0, 12 / 16])

    training = report_tables.training_rows(run)
    assert [row["key"][1] for row in training[:3]] == [
        "baseline-clip-l-336",
        "dc-dci-clip-l-336",
        "dc-dci-clip-l-336-efficient",
    ]
    assert [row["vs_baseline"] for row in training] == pytest.approx([1.0, 1.25, 0.75] * 2)


def test_tables_show_the_ratios_and_the_gpu_figures_beside_them():
    cpu, gpu = load_run(_results()), load_run(_gpu_results())
    lines = report_tables.connector_table(cpu, gpu)
    assert "connector (ms) (NVIDIA H200)" in lines[0]
    baseline = next(line for line in lines if "`baseline-clip-l-336`" in line)
    cells = [cell.strip() for cell in baseline.strip("|").split("|")]
    # CPU: 1000 ms, 800 ms, 1.25x, 2304 tokens/s, 1x; GPU: 10 ms, 230,400 tokens/s.
    assert cells[2:] == ["576", "1,000", "800", "1.250x", "2,304", "1.000x", "10.0", "230,400"]
    missing = next(line for line in lines if "`dc-sti-siglip-so400m`" in line)
    assert missing.rstrip(" |").endswith("— | —")

    prefill = report_tables.prefill_table(cpu, gpu)
    efficient = next(line for line in prefill if "`efficient-144`" in line)
    assert [cell.strip() for cell in efficient.strip("|").split("|")][3:] == [
        "4.000",
        "3.000x",
        "40.0",
        "3.000x",
    ]
    assert len(report_tables.prefill_table(cpu)[0].split("|")) == 7  # no GPU columns


def test_missing_baseline_is_named():
    results = _results()
    results["benchmarks"] = [
        entry for entry in results["benchmarks"] if entry["params"].get("variant") != "standard-576"
    ]
    with pytest.raises(ValueError, match="standard-576"):
        report_tables.prefill_rows(load_run(results))


def test_write_report_writes_the_page_and_one_png_per_group(tmp_path):
    cpu_path, gpu_path = tmp_path / "results.json", tmp_path / "results-gpu.json"
    cpu_path.write_text(json.dumps(_results()))
    gpu_path.write_text(json.dumps(_gpu_results()))
    page = tmp_path / "docs" / "benchmarks.md"
    written = report.write_report(cpu_path, page, gpu_results=gpu_path)
    charts = written[1:]
    assert written[0] == page
    assert [path.name for path in charts] == [
        "bench_tap_capture.png",
        "bench_connector.png",
        "bench_prefill.png",
        "bench_training_step.png",
    ]
    for chart in charts:
        assert chart.parent == tmp_path / "docs" / "images"
        assert chart.read_bytes()[:8] == PNG_SIGNATURE
        assert f"](images/{chart.name})" in page.read_text()
    text = page.read_text()
    assert "Test CPU 9000 (2 logical cores), torch 2.99" in text
    assert "**GPU run:** NVIDIA H200" in text
    assert text.count("\n## ") == 5  # four groups, then how the suite runs
    assert "\n## Running the suite" in text


def test_page_without_gpu_says_so(tmp_path):
    text = report.render(load_run(_results()))
    assert "no GPU figures yet" in text
    assert "(NVIDIA" not in text


def test_note_on_the_run_sits_under_the_machine_line():
    text = report.render(load_run(_results()), note="measured while other jobs ran")
    machine = text.index("**CPU run:**")
    assert text.index("> **Note on this run:** measured while other jobs ran") > machine
    assert "Note on this run" not in report.render(load_run(_results()))


def test_refusals(tmp_path):
    tiny = _results()
    for entry in tiny["benchmarks"]:
        entry["extra_info"]["size"] = "tiny"
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    (tmp_path / "gpu.json").write_text(json.dumps(_gpu_results()))
    (tmp_path / "cpu.json").write_text(json.dumps(_results()))
    page = tmp_path / "page.md"
    with pytest.raises(ValueError, match="size 'tiny'"):
        report.write_report(tmp_path / "tiny.json", page)
    assert report.write_report(tmp_path / "tiny.json", page, allow_tiny=True, charts=False) == [
        page
    ]
    assert "Size `tiny`" in page.read_text()
    assert "![" not in page.read_text()
    with pytest.raises(ValueError, match="first file must be the CPU run"):
        report.write_report(tmp_path / "gpu.json", page)
    with pytest.raises(ValueError, match="not a 'cuda' run"):
        report.write_report(tmp_path / "cpu.json", page, gpu_results=tmp_path / "cpu.json")
    assert report.main([str(tmp_path / "tiny.json"), str(page)]) == 1


def test_load_run_drops_disabled_entries_and_refuses_mixed_runs():
    results = _results()
    disabled = copy.deepcopy(results["benchmarks"][0])
    disabled["stats"] = None
    results["benchmarks"].append(disabled)
    assert len(load_run(results).entries) == len(_results()["benchmarks"])
    results["benchmarks"][0]["extra_info"]["device"] = "cuda"
    with pytest.raises(ValueError, match="mix devices"):
        load_run(results)
    with pytest.raises(ValueError, match="no timed benchmark"):
        load_run({"benchmarks": [disabled]})
