"""``benchmarks/report.py``'s connector-zoo section: ratios from chosen medians, a separate zoo run.

The inputs are pytest-benchmark JSON objects built here, so every expected figure in the table
is computed by hand from their medians.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # the report modules import one another by name

import report
from report_results import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _zoo_entry(implementation: str, median: float, tokens: int, parameters: int, gflop: float):
    return {
        "group": "zoo",
        "params": {"preset": "pixel", "implementation": implementation},
        "stats": {"median": median},
        "extra_info": {
            "size": "real",
            "device": "cpu",
            "dtype": "float32",
            "visual_tokens": 4 * tokens,
            "tokens_per_image": tokens,
            "parameters": parameters,
            "gflop": gflop,
            "projector": "pixel_shuffle",
            "fusion": "dci",
            "encoder": "27x27 patches, width 1152",
        },
    }


def _zoo_run(date: str = "2026-12-02T12:00:00") -> dict:
    return {
        "datetime": date,
        "machine_info": {"mmconnect": {"cpu_model": "Test CPU", "cpu_count": 2}},
        "benchmarks": [
            _zoo_entry("connector", 0.2, 81, 2_000_000, 13.8),
            _zoo_entry("bare-matmuls", 0.16, 81, 1_990_000, 13.7),
            _zoo_entry("llava-mlp", 0.5, 729, 30_900_000, 180.0),
        ],
    }


def test_zoo_table_compares_the_connector_with_its_gemms_and_llavas_mlp():
    lines = report.zoo_table(load_run(_zoo_run()))
    assert lines[2] == (
        "| `pixel` | `pixel_shuffle` (dci) | 27x27 patches, width 1152 | 81 / 729 | 2M / 30.9M "
        "| 13.8 / 13.7 / 180 | 200 | 160 | 500 | 1.250x | 0.400x | 1,620 |"
    )  # 0.2 / 0.16 = 1.25; 0.2 / 0.5 = 0.4; 4 * 81 / 0.2 = 1620 visual tokens per second


def test_a_separate_zoo_run_fills_the_zoo_section(tmp_path):
    main = tmp_path / "main.json"
    zoo = tmp_path / "zoo.json"
    main.write_text(json.dumps(_zoo_run("2026-11-28T10:00:00")))  # an older run of the zoo
    zoo.write_text(json.dumps(_zoo_run()))
    page = tmp_path / "benchmarks.md"
    written = report.write_report(main, page, zoo_results=zoo, zoo_note="only one preset")
    text = page.read_text()
    section = text[text.index("## Connector zoo") :]
    assert section.count("**Measured in a separate run:**") == 1
    assert "2026-12-02, size `real`" in section and "2026-11-28" not in section
    assert "> **Note on these figures:** only one preset" in section
    assert [path.name for path in written] == ["benchmarks.md", "bench_zoo.png"]
    assert written[1].read_bytes()[:8] == PNG_SIGNATURE


def test_zoo_results_without_a_zoo_group_are_refused(tmp_path):
    main = tmp_path / "main.json"
    main.write_text(json.dumps(_zoo_run()))
    other = _zoo_run()
    for entry in other["benchmarks"]:
        entry["group"] = "connector"
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="must be a CPU run holding the 'zoo' group"):
        report.write_report(main, tmp_path / "page.md", zoo_results=wrong, charts=False)


def test_a_zoo_preset_without_its_llava_mlp_is_named():
    results = _zoo_run()
    results["benchmarks"] = results["benchmarks"][:2]
    with pytest.raises(ValueError, match=r"'zoo:pixel' group .* no \['llava-mlp'\] entry"):
        report.zoo_table(load_run(results))
