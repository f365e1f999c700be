"""``benchmarks/report_families.py`` and the family sections of ``benchmarks/report.py``.

The inputs are pytest-benchmark JSON objects built here with chosen medians and peaks, so every
expected ratio is computed from them by hand.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.paths import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the report modules import one another by name

import report  # noqa: E402
import report_families  # noqa: E402
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


def _tap(tower: str, variant: str, median: float, peak_mib: float) -> dict:
    return _entry(
        "family-tap",
        {"tap_tower": tower, "variant": variant},
        median,
        peak_bytes=int(peak_mib * MIB),
        encoder=f"{tower} tower",
        tokens=1024,
    )


def _prefill(family: str, part: str, median: float, tokens: int = 256) -> dict:
    params = {"family": family} | ({} if part == "llm" else {"connector": part[len("image-") :]})
    extra = {"part": part, "model": f"{family} model", "unit": "one tile", "visual_tokens": tokens}
    if part == "llm":
        extra |= {"total_tokens": tokens + 64, "llm": "llama, width 64, 2 layers"}
    else:
        extra |= {"preset": f"{family}-{part}"}
    return _entry("family-prefill", params, median, **extra)


def _family_results() -> dict:
    entries = [
        _tap("qwen", "plain-forward", 10.0, 100),
        _tap("qwen", "output-hidden-states", 11.0, 300),
        _tap("qwen", "tap-dci-streaming", 9.0, 120),
        _prefill("alpha", "image-native", 4.0),
        _prefill("alpha", "image-dense", 5.0),
        _prefill("alpha", "llm", 1.0),
        _prefill("beta", "image-native", 2.0),  # an interrupted run: beta lacks two parts
    ]
    return {
        "benchmarks": entries,
        "machine_info": {"mmconnect": {"cpu_model": "Test CPU", "cpu_count": 2}},
        "datetime": "2026-12-02T15:50:00",
    }


def test_tap_rows_compare_each_tower_with_its_own_plain_forward():
    rows = report_families.family_tap_rows(load_run(_family_results()))
    by_variant = {row["variant"]: row for row in rows}
    assert [row["key"] for row in rows] == [
        ("qwen", "plain-forward"),
        ("qwen", "output-hidden-states"),
        ("qwen", "tap-dci-streaming"),
    ]
    assert by_variant["tap-dci-streaming"]["time_ratio"] == pytest.approx(0.9)
    assert by_variant["tap-dci-streaming"]["overhead_mib"] == pytest.approx(20.0)
    assert by_variant["tap-dci-streaming"]["overhead_ratio"] == pytest.approx(20 / 200)
    assert by_variant["output-hidden-states"]["overhead_ratio"] == pytest.approx(1.0)


def test_tap_rows_refuse_a_tower_without_its_plain_forward():
    results = _family_results()
    results["benchmarks"] = results["benchmarks"][1:]
    with pytest.raises(ValueError, match=r"no \['plain-forward'\] entry for 'qwen'"):
        report_families.family_tap_rows(load_run(results))


def test_prefill_rows_add_the_llm_to_each_image_path_and_name_incomplete_families():
    run = load_run(_family_results())
    (row,) = report_families.family_prefill_rows(run)
    assert row["key"] == "alpha"
    assert row["native_total_s"] == pytest.approx(5.0)
    assert row["dense_total_s"] == pytest.approx(6.0)
    assert row["image_ratio"] == pytest.approx(1.25)
    assert row["total_ratio"] == pytest.approx(1.2)
    assert report_families.incomplete_families(run) == {"beta": ["image-dense", "llm"]}
    table = report_families.family_prefill_table(run)
    assert any("| 1.250x |" in line and "| 1.200x |" in line for line in table)
    assert table[-1] == "Not complete in this run, so not shown: beta (no image-dense, llm)."
    assert "- alpha model: llama, width 64, 2 layers; 320 tokens" in table


def test_report_takes_the_family_sections_from_their_own_run(tmp_path):
    cpu_results = {
        "benchmarks": [
            _entry("prefill", {"variant": "standard-576"}, 3.0, visual_tokens=576, total_tokens=640)
        ],
        "machine_info": {"mmconnect": {"cpu_model": "Test CPU", "cpu_count": 2}},
        "datetime": "2026-11-28T10:00:00",
    }
    (tmp_path / "cpu.json").write_text(json.dumps(cpu_results))
    (tmp_path / "families.json").write_text(json.dumps(_family_results()))
    page = tmp_path / "docs" / "benchmarks.md"
    written = report.write_report(
        tmp_path / "cpu.json",
        page,
        family_results=[tmp_path / "families.json"],
        families_note="measured on a quiet machine",
    )
    text = page.read_text()
    assert "## Tap capture on today's towers" in text and "{#family-tap-capture}" in text
    assert "{#family-prefill}" in text
    assert "**Measured in a separate run:** Test CPU (2 logical cores)" in text
    assert text.count("> **Note on these figures:** measured on a quiet machine") == 2
    charts = {path.name for path in written[1:]}
    assert {"bench_family_tap.png", "bench_family_prefill.png"} <= charts
    for name in ("bench_family_tap.png", "bench_family_prefill.png"):
        assert (tmp_path / "docs" / "images" / name).read_bytes()[:8] == PNG_SIGNATURE


def test_report_refuses_a_families_run_without_family_groups(tmp_path):
    results = _family_results()
    results["benchmarks"] = [
        _entry("prefill", {"variant": "standard-576"}, 3.0, visual_tokens=576, total_tokens=640)
    ]
    (tmp_path / "other.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"--families .* must be a CPU run holding a group"):
        report.write_report(
            tmp_path / "other.json",
            tmp_path / "page.md",
            family_results=[tmp_path / "other.json"],
            charts=False,
        )


def test_prefill_table_of_a_run_without_a_complete_family_says_so(tmp_path):
    results = _family_results()
    results["benchmarks"] = [entry for entry in results["benchmarks"] if "beta" in entry["name"]]
    run = load_run(results)
    assert report_families.family_prefill_rows(run) == []
    assert report_families.family_prefill_table(run) == [
        "No family timed all three parts in this run (measured in part: beta (no image-dense, llm))."
    ]
    assert report_families.write_family_charts({"family-prefill": run}, tmp_path) == {}
