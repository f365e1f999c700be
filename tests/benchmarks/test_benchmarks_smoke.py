"""The benchmark suite runs at tiny size, covering every benchmark, and its report renders.

One run of ``pytest benchmarks`` at ``MMCONNECT_BENCH_SIZE=tiny`` (timed, one round each) writes
pytest-benchmark's JSON; the tests check that it holds every variant the suite promises (every
preset, every training stage and connector, ...) and that ``benchmarks/report.py`` renders it
into a Markdown page with one table and one PNG chart per group. So neither the benchmarks nor
the report can rot between real-size runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from mmconnect.presets import list_presets, preset_geometry
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> dict:
    """The JSON of one tiny-size run of the whole suite (it must pass)."""
    directory = tmp_path_factory.mktemp("benchmarks")
    results = directory / "results.json"
    # One thread: the tiny models are too small to gain from two, and a shared machine's
    # contention makes multi-threaded tiny ops many times slower.
    environment = {**os.environ, "MMCONNECT_BENCH_SIZE": "tiny", "OMP_NUM_THREADS": "1"}
    for name in ("MMCONNECT_BENCH_DEVICE", "MMCONNECT_BENCH_DTYPE"):
        environment.pop(name, None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={results}",
            str(ROOT / "benchmarks"),
        ],
        cwd=directory,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return {"path": results, "json": json.loads(results.read_text())}


@pytest.mark.slow
def test_every_benchmark_runs_at_tiny_size(tiny_results):
    entries = tiny_results["json"]["benchmarks"]
    found = {(entry["group"], tuple(sorted(entry["params"].items()))) for entry in entries}
    clip = preset_geometry("baseline-clip-l-336")
    clip_presets = [name for name in list_presets() if preset_geometry(name) == clip]
    expected = {
        *(
            ("tap-capture", (("variant", variant),))
            for variant in ("output-hidden-states", "plain-forward", "tap-dci-streaming")
        ),
        *(
            ("connector", (("implementation", implementation), ("preset", preset)))
            for preset in list_presets()
            for implementation in ("bare-matmuls", "connector")
        ),
        *(
            ("prefill", (("variant", variant),))
            for variant in ("efficient-144", "standard-576", "sti-720")
        ),
        *(
            ("training-step", (("connector", connector), ("stage", stage)))
            for connector in clip_presets
            for stage in ("stage1-align", "stage2-instruct-full")
        ),
    }
    assert found == expected
    for entry in entries:
        assert math.isfinite(entry["stats"]["median"]) and entry["stats"]["median"] > 0, entry
        assert entry["extra_info"]["size"] == "tiny"
        assert entry["extra_info"]["device"] == "cpu"
    # Each preset ran at its own encoder's tiny size: tokens per image as the preset promises.
    siglip = {
        entry["params"]["preset"]: entry["extra_info"]["tokens_per_image"]
        for entry in entries
        if entry["group"] == "connector" and "SigLIP" in entry["extra_info"]["encoder"]
    }
    assert siglip == {
        "dc-dci-siglip-so400m": 729,
        "dc-sci-siglip-so400m": 729,
        "dc-sti-siglip-so400m": 911,
    }
    machine = tiny_results["json"]["machine_info"]["mmconnect"]
    assert machine["device"] == "cpu" and machine["torch"] and machine["cpu_model"]


@pytest.mark.slow
def test_report_renders_a_table_and_a_png_per_group(tiny_results, tmp_path):
    page = tmp_path / "docs" / "benchmarks.md"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "report.py"),
            str(tiny_results["path"]),
            str(page),
            "--allow-tiny",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    text = page.read_text()
    charts = sorted((tmp_path / "docs" / "images").glob("bench_*.png"))
    assert [chart.name for chart in charts] == [
        "bench_connector.png",
        "bench_prefill.png",
        "bench_tap_capture.png",
        "bench_training_step.png",
    ]
    for chart in charts:
        assert chart.read_bytes()[:8] == PNG_SIGNATURE
        assert f"(images/{chart.name})" in text
    for preset in list_presets():
        assert f"| `{preset}` |" in text
    clip = preset_geometry("baseline-clip-l-336")
    clip_presets = [name for name in list_presets() if preset_geometry(name) == clip]
    assert text.count("| stage1-align |") == len(clip_presets)
    assert text.count("| stage2-instruct-full |") == len(clip_presets)
    assert "Size `tiny`" in text
