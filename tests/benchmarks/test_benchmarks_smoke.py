"""The benchmark suite runs at tiny size, covering every benchmark, and its report renders.

One run of ``pytest benchmarks`` at ``MMCONNECT_BENCH_SIZE=tiny`` (timed, one round each) writes
pytest-benchmark's JSON; the tests check that it holds every variant the suite promises (every
published preset, every zoo preset with its three implementations, every training stage and
connector, ...) and that ``benchmarks/report.py`` renders it
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

from mmconnect import ConnectorConfig
from mmconnect.presets import PUBLISHED_PRESETS, list_presets, preset_geometry
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZOO_IMPLEMENTATIONS = ("bare-matmuls", "connector", "llava-mlp")
#: Today's MLLM families and towers of ``test_family_prefill.py`` / ``test_family_tap.py``.
FAMILIES = (
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "llava_onevision",
    "internvl",
    "gemma3",
)
TAP_TOWERS = ("qwen2.5-vl-448", "siglip-so400m-384", "siglip-so400m-896")
CAPTURE_VARIANTS = ("output-hidden-states", "plain-forward", "tap-dci-streaming")


def _zoo_presets() -> list[str]:
    """Every preset with a projector (or DeepStack projector) from ``mmconnect.zoo``, read from
    the registry here rather than from the benchmark module, so a zoo preset it missed fails."""
    zoo = []
    for name in list_presets():
        config = ConnectorConfig.from_preset(name)
        specs = [config.projector] + ([config.injection.projector] if config.injection else [])
        if any(type(spec).__module__.startswith("mmconnect.zoo.") for spec in specs):
            zoo.append(name)
    return zoo


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
    zoo_presets = _zoo_presets()
    assert zoo_presets, "no zoo preset is registered"
    expected = {
        *(
            ("tap-capture", (("variant", variant),))
            for variant in ("output-hidden-states", "plain-forward", "tap-dci-streaming")
        ),
        *(
            ("connector", (("implementation", implementation), ("preset", preset)))
            for preset in PUBLISHED_PRESETS
            for implementation in ("bare-matmuls", "connector")
        ),
        *(
            ("zoo", (("implementation", implementation), ("preset", preset)))
            for preset in zoo_presets
            for implementation in ZOO_IMPLEMENTATIONS
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
        *(
            ("family-tap", (("tap_tower", tower), ("variant", variant)))
            for tower in TAP_TOWERS
            for variant in CAPTURE_VARIANTS
        ),
        *(
            ("family-prefill", (("connector", connector), ("family", family)))
            for family in FAMILIES
            for connector in ("dense", "native")
        ),
        *(("family-prefill", (("family", family),)) for family in FAMILIES),
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
    # The zoo shrinks widths, never token counts: each connector made its preset's count at its
    # geometry's grid; its bare GEMMs (the connector's weights only) are a non-empty subset.
    zoo = {
        (entry["params"]["preset"], entry["params"]["implementation"]): entry["extra_info"]
        for entry in entries
        if entry["group"] == "zoo"
    }
    for preset in zoo_presets:
        tokens = ConnectorConfig.from_preset(preset).num_tokens(preset_geometry(preset).grid)
        connector, bare = zoo[preset, "connector"], zoo[preset, "bare-matmuls"]
        assert connector["tokens_per_image"] == bare["tokens_per_image"] == tokens, preset
        assert bare["gemm_calls"] >= 1 and 0 < bare["parameters"] <= connector["parameters"]
        assert 0 < bare["gflop"] <= connector["gflop"], preset
    # Each family's Dense preset keeps its native connector's visual tokens per unit.
    family_tokens: dict[str, set[int]] = {}
    for entry in entries:
        if entry["group"] == "family-prefill":
            family_tokens.setdefault(entry["params"]["family"], set()).add(
                entry["extra_info"]["visual_tokens"]
            )
    assert {family: len(counts) for family, counts in family_tokens.items()} == dict.fromkeys(
        FAMILIES, 1
    )
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
        "bench_family_prefill.png",
        "bench_family_tap.png",
        "bench_prefill.png",
        "bench_tap_capture.png",
        "bench_training_step.png",
        "bench_zoo.png",
    ]
    for chart in charts:
        assert chart.read_bytes()[:8] == PNG_SIGNATURE
        assert f"(images/{chart.name})" in text
    # A row for every preset the page promises one to: the paper's (connector table), the zoo's
    # and CLIP-L/336's (training steps). The presets of today's family towers with the paper's
    # own projectors (e.g. dc-dci-qwen2.5-vl-448) have no throughput benchmark (yet).
    clip = preset_geometry("baseline-clip-l-336")
    promised = {
        *PUBLISHED_PRESETS,
        *_zoo_presets(),
        *(name for name in list_presets() if preset_geometry(name) == clip),
    }
    for preset in promised:
        assert f"| `{preset}` |" in text
    # Every zoo preset has its row in the zoo table, with all three implementations' figures.
    zoo_section = text[text.index("## Connector zoo") :].split("\n## ")[0]
    zoo_rows = [line for line in zoo_section.splitlines() if line.startswith("| `")]
    assert sorted(row.split("`")[1] for row in zoo_rows) == sorted(_zoo_presets())
    for row in zoo_rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 12 and all(cells), row
        connector_ms, bare_ms, mlp_ms = (float(cell.replace(",", "")) for cell in cells[6:9])
        assert connector_ms > 0 and bare_ms > 0 and mlp_ms > 0, row
    clip_presets = [name for name in list_presets() if preset_geometry(name) == clip]
    assert text.count("| stage1-align |") == len(clip_presets)
    assert text.count("| stage2-instruct-full |") == len(clip_presets)
    assert "Size `tiny`" in text
