"""Render pytest-benchmark JSON files of this suite as ``docs/benchmarks.md`` and PNG charts.

Usage::

    python benchmarks/report.py benchmarks/results.json docs/benchmarks.md \\
        [--gpu benchmarks/results-gpu.json] [--zoo benchmarks/results-zoo.json] \\
        [--families benchmarks/results-families.json ...] \\
        [--images docs/images] [--allow-tiny] [--no-charts]

The first file is the CPU run (``MMCONNECT_BENCH_SIZE=real``); ``--gpu`` adds the run of
``benchmarks/run_gpu.sh`` (``MMCONNECT_BENCH_DEVICE=cuda``, bf16), whose absolute figures go
beside the CPU ratios with the device named; ``--zoo`` renders the connector zoo's section from
a separate CPU run of ``pytest benchmarks -k zoo`` (named in that section); ``--families``, one
or more CPU runs of the family suites (``test_family_tap.py``, ``test_family_prefill.py``), fill
the family sections the same way. Charts go to
``--images`` (default: ``images/`` beside the Markdown file) as ``bench_*.png``. Every ratio
compares figures measured in the same run (machines are noisy; only ratios carry over).
``--allow-tiny`` renders a ``MMCONNECT_BENCH_SIZE=tiny`` run (the smoke test does), marked as
such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from report_charts import write_charts
from report_families import (
    FAMILY_PREFILL,
    FAMILY_TAP,
    family_prefill_table,
    family_tap_table,
    write_family_charts,
)
from report_results import Run, load_run
from report_tables import (
    CAPTURE,
    CONNECTOR,
    PREFILL,
    TRAINING,
    ZOO,
    capture_table,
    connector_table,
    prefill_table,
    training_table,
    zoo_table,
)

COMMANDS = """```bash
# CPU, real size (about 13 minutes on 2 quiet cores)
.venv/bin/python -m pytest benchmarks --benchmark-json=benchmarks/results.json
# or only the connector zoo, into its own file (then pass --zoo below)
.venv/bin/python -m pytest benchmarks -k zoo --benchmark-json=benchmarks/results-zoo.json
# or only today's MLLM families (tap capture on their towers, prefill per image), into theirs
.venv/bin/python -m pytest benchmarks/test_family_tap.py benchmarks/test_family_prefill.py \\
    --benchmark-json=benchmarks/results-families.json
# GPU (optional): one CUDA GPU, bf16
bash benchmarks/run_gpu.sh benchmarks/results-gpu.json
# this page and its charts
.venv/bin/python benchmarks/report.py benchmarks/results.json docs/benchmarks.md \\
    [--gpu benchmarks/results-gpu.json] [--zoo benchmarks/results-zoo.json] \\
    [--families benchmarks/results-families.json]
```"""

SECTIONS = {
    CAPTURE: (
        "Capturing DCI inputs at CLIP-L/336, batch 4",
        "Three ways to run the tower: `plain-forward` (the tower alone, capturing nothing: the "
        "floor), `output-hidden-states` (what LLaVA and the official Dense Connector code do: all "
        "25 hidden states kept), and `tap-dci-streaming` (`DenseConnector.make_tap` for the DCI "
        "preset: `F` plus one running sum per group, stopping after block 23). Peak tensor "
        "memory counts the bytes of all tensors alive at once during the call (weights and "
        "inputs excluded), tracked exactly per storage on the CPU (`benchmarks/memory.py`) and "
        "by the CUDA allocator on a GPU. The capture overhead is the peak above the plain "
        "forward's. Targets: tap overhead at most 0.25 of `output_hidden_states`'s, tap time no "
        "slower than the plain forward.",
        capture_table,
    ),
    CONNECTOR: (
        "Connector throughput, every preset at its encoder's size, batch 4, to 4096",
        "Every preset of `mmconnect.presets.PUBLISHED_PRESETS` (the paper's eight; the zoo's "
        "have their own section) runs at the real size of the tower it is made for (`mmconnect.preset_geometry`: CLIP-L/336, width 1024, 24x24 patches; "
        "SigLIP-SO400M/384, width 1152, 27x27 patches; each other encoder at its own geometry) "
        "on features shaped like its tap's output. "
        "Baseline, per preset: the two matrix multiplies of its `mlp2x_gelu` projector on the "
        "already fused input (no bias, no GELU, no fusion) — the practical limit; target: the "
        "connector within 1.2x of it. Throughput counts the connector's output (visual) tokens "
        "per second; *tokens/s vs baseline* compares it with LLaVA-1.5's connector "
        "(`baseline-clip-l-336`) in the same run.",
        connector_table,
    ),
    PREFILL: (
        "LLM prefill with 144 / 576 / 720 visual tokens (Llama-shaped, 1.1B parameters)",
        "TinyLlama-1.1B's shape with random weights, batch 1, 64 text tokens around the visual "
        "tokens, `use_cache=True`, logits of the last position (what `generate()` does before "
        "its first token). 144 visual tokens: efficient Dense Connector; 576: LLaVA-1.5, SCI and "
        "DCI (the baseline); 720: STI. Target: 144 at least 2.5x faster than 576.",
        prefill_table,
    ),
    TRAINING: (
        "Training step time, stages 1 and 2, each connector vs the baseline connector",
        "One full optimizer step (forward, loss, backward, gradient clipping, AdamW step) of a "
        "`DenseLlavaForConditionalGeneration`, frozen for the stage by `prepare_stage` and with "
        "the optimizer of `DenseConnectorTrainer`: stage 1 (`align`) trains the connector with "
        "tower and LLM frozen; stage 2 (`instruct`, full fine-tuning) trains connector, LLM and "
        "LM head. Model (random weights, fp32 on the CPU): a CLIP-L/336-shaped tower (24 blocks, "
        "width 1024) and a small Llama (4 layers of width 1024, MLP 2816, 16 query / 4 KV heads, "
        "vocabulary 32000: 110,633,984 parameters) standing in for Vicuna-7B; batch 1; prompt of "
        "32 text tokens, the image's visual tokens and 32 answer tokens carrying the labels. "
        "No target: the frozen tower's forward costs the same for every connector and, with a "
        "small LLM, dominates the step, so these ratios understate what the token count saves "
        "with a 7B LLM (see the prefill section for the LLM's share).",
        training_table,
    ),
    ZOO: (
        "Connector zoo: every zoo preset at its family's size vs its bare GEMMs and LLaVA's MLP",
        "Every registered preset whose projector comes from `mmconnect.zoo` (found from the "
        "registries: `benchmarks/test_zoo_throughput.py`) runs at the size of the encoder it is "
        "made for (`mmconnect.preset_geometry`: the tower's width and token grid; CLIP-L/336 "
        "24x24, SigLIP-SO400M/384 27x27, ...), projecting to the preset's LLM width, batch 4, on "
        "random features shaped like its tap's output. Three implementations: `connector` (the "
        "`DenseConnector` forward: fusion, then the zoo projector, and with DeepStack the "
        "per-level projectors of `forward_with_injections`); `bare-matmuls` (exactly the "
        "GEMMs against its weights that one forward runs — every `nn.Linear`, convolution and "
        "weight matmul, recorded once on the meta device and replayed without biases on "
        "preallocated inputs: the floor of its arithmetic); `llava-mlp` (LLaVA's `mlp2x_gelu` "
        "on the same fusion of the same features: what the zoo connector replaces). What the "
        "connector adds beyond its GEMMs is the fusion, attention scores and softmax (Q-Former, "
        "Perceiver), norms, activations, pooling and the token regrouping. GFLOP are counted by "
        "`torch.utils.flop_counter` (matrix multiplies and convolutions, attention included). "
        "*connector / LLaVA MLP* < 1 means the zoo connector is faster than LLaVA's MLP on the "
        "same input; it usually also makes fewer visual tokens (first column pair), which is "
        "where the LLM saves (see the prefill section). No target is asserted. At real size on "
        "the CPU, presets needing more than 600 GFLOP per call (connector or MLP; e.g. the "
        "Perceiver resamplers) are skipped with their GFLOP named (a GPU run measures them; "
        "`MMCONNECT_BENCH_CPU_GFLOP_LIMIT` raises the limit for a CPU run with time). Rounds at real "
        "size on the CPU: 3 timed calls per implementation after one warm-up. Run only these: "
        "`.venv/bin/python -m pytest benchmarks -k zoo "
        "--benchmark-json=benchmarks/results-zoo.json`, then render with "
        "`--zoo benchmarks/results-zoo.json` (this section then names that run).",
        zoo_table,
    ),
    FAMILY_TAP: (
        "Tap capture on today's towers: Qwen2.5-VL and SigLIP-SO400M at real size",
        "The capture method above on the vision towers of today's MLLM families "
        "(`benchmarks/test_family_tap.py`), built from their configs at real size with random "
        "weights, one image each: Qwen2.5-VL-7B's tower (32 blocks, width 1280, 16 heads, patch "
        "14, merge 2, window attention in 112 px windows, full attention in blocks 7 / 15 / 23 "
        "/ 31) on one 448x448 image packed as its processor packs it (1024 patches), tapped by "
        "`packed_tower_features` (what the Dense Qwen2.5-VL runs) for "
        "`dc-dci+qwen2.5-merger-qwen2.5-vl-448`; SigLIP-SO400M/14 (27 blocks, width 1152, no "
        "pooling head) at 384 px (27x27 patches), tapped by `tower_features` after its "
        "`post_layernorm` as the Dense SmolVLM does, for `dc-dci+pixel-shuffle-smolvlm`; and the "
        "same tower at 896 px (64x64 patches) as Gemma 3 runs it, for "
        "`dc-dci+gemma3-pool-siglip-so400m-896`, which a CPU run skips above "
        "`MMCONNECT_BENCH_CPU_GFLOP_LIMIT` (default 2000 GFLOP per call; this tower needs about "
        "5,400). Variants per tower: `plain-forward` (the stock tower's forward; Qwen2.5-VL's "
        "includes its stock merger, about 1.7% of the tower's FLOPs, which the tap never runs), "
        "`output-hidden-states` (every block's hidden states kept) and `tap-dci-streaming` "
        "(`F` plus one running sum per DCI group, stopping after the deepest block read). Each "
        "variant runs once under the peak-memory tracker (its warm-up), then one timed call at "
        "real size on the CPU (both family suites must fit a quiet quarter of an hour on two "
        "cores). Target: the tap's capture overhead at most 0.25 of `output_hidden_states`'s.",
        family_tap_table,
    ),
    FAMILY_PREFILL: (
        "Prefill per image in today's MLLM families: native connector vs Dense Connector",
        "For each family (`benchmarks/test_family_prefill.py`, `benchmarks/family_models.py`), "
        "a stock HF model built from its config with random weights (`fill_random`; its "
        "published vision tower exactly; its LLM at the real hidden width, MLP width and heads "
        "but cut to 2 layers, 3 "
        "for Qwen3-VL whose DeepStack adds a level after each of the first three, and a "
        "8,192-token vocabulary), and two Dense models around it by `from_<family>` (tower, "
        "LLM and head shared): *native*, the family's own connector through the zoo (the stock "
        "weights reused: the stock model's logits), and *Dense*, the family's DCI preset into "
        "the same native connector, so both hand the LLM the same visual tokens (checked). The "
        "unit is one image at the family's default resolution for Qwen2.5-VL and Qwen3-VL "
        "(448x448) and LLaVA-OneVision (384x384: its base crop and one AnyRes crop), one tile "
        "or crop for the tiling families, whose default processors make up to 13-17 of them per "
        "image, each at this cost. Two parts are timed in the same run: the *image path*, the "
        "Dense model's own `get_image_features` (tower, tap, connector, the family's packing "
        "and AnyRes layout), per connector; and the *LLM prefill*, what `generate()` runs before "
        "its first token: 64 text tokens around the unit's visual tokens, `use_cache=True`, "
        "the head on the last position (Qwen3-VL's DeepStack levels added; M-RoPE positions and "
        "Gemma 3's bidirectional image blocks change no FLOP count and are left out). Per unit "
        "= image path + LLM prefill. The real 7-8B LLMs do not fit this CPU's time budget: the "
        "LLM column is a 2-3-layer share of a prefill, never scaled up, so the per-unit ratios "
        "overstate the connector's share of a real model's prefill. One timed call per part "
        "after one warm-up. Gemma 3's 896-px crop (about 5,400 GFLOP in the tower) is skipped "
        "on the CPU as above `MMCONNECT_BENCH_CPU_GFLOP_LIMIT` (default 2000). No target.",
        family_prefill_table,
    ),
}
#: Explicit heading anchors of sections other pages link to (``attr_list``).
ANCHORS = {FAMILY_TAP: "family-tap-capture", FAMILY_PREFILL: "family-prefill"}
#: The groups a ``--families`` run fills instead of the CPU run.
FAMILY_GROUPS = (FAMILY_TAP, FAMILY_PREFILL)


RUNNING = """## Running the suite

- `MMCONNECT_BENCH_SIZE=real` (default) measures at the sizes above; `tiny` runs the same code on
  narrow models in about a minute (`tests/benchmarks/test_benchmarks_smoke.py` does, then renders this page
  and its charts from that run, so neither can rot).
- `MMCONNECT_BENCH_DEVICE=cuda` runs every model on the GPU, in `MMCONNECT_BENCH_DTYPE=bfloat16`
  by default (inference in bf16 weights; the training step keeps fp32 weights under bf16
  autocast), synchronising after each timed call and reading peak memory from the CUDA
  allocator. `benchmarks/run_gpu.sh` is that run as one script.
- Ratio targets are asserted only at real size on the CPU in fp32, from medians of the same run;
  on a GPU all figures are reported, none asserted.
- Rounds at real size on the CPU: 3 timed calls per variant for calls of seconds (tap capture,
  prefill; the tap-capture variants are warmed up by their memory-tracked call, the prefill by
  one untimed call), 9 for calls of about a second (connector) after one warm-up, 2 optimizer
  steps per training variant after one untimed step (which also allocates AdamW's state).
- The family suites (`test_family_tap.py`, `test_family_prefill.py`: the last two sections) time
  one call per variant after one warm-up at real size on the CPU (a tower pass takes 7-20 s on
  two cores), and skip a tower above `MMCONNECT_BENCH_CPU_GFLOP_LIMIT` GFLOP per call (default
  2000 for them; the zoo's default is 600) with its estimate named."""


def _gpu_paragraph(gpu: Run | None) -> str:
    if gpu is None:
        return (
            "**GPU:** no GPU figures yet — no accelerator was available to the session that "
            "measured this page. `benchmarks/run_gpu.sh` runs the same suite on one CUDA GPU in "
            "bf16 (`MMCONNECT_BENCH_DEVICE=cuda`); passing its JSON with `--gpu` puts the "
            "absolute GPU figures beside the CPU ratios. Nothing else depends on a GPU."
        )
    return (
        f"**GPU run:** {gpu.describe()}. Its absolute figures stand beside the CPU ratios, "
        "matched by benchmark; its ratios are its own (same run on the GPU)."
    )


def _source(group: str, cpu: Run, zoo: Run | None, families: Sequence[Run] = ()) -> Run:
    """The run a group's section comes from: ``zoo`` for the zoo group when given, the first of
    ``families`` holding a family group, else ``cpu``."""
    if group in FAMILY_GROUPS:
        return next((run for run in families if run.group(group)), cpu)
    return zoo if group == ZOO and zoo is not None else cpu


def render(
    cpu: Run,
    gpu: Run | None = None,
    charts: dict[str, str] | None = None,
    note: str | None = None,
    zoo: Run | None = None,
    zoo_note: str | None = None,
    families: Sequence[Run] = (),
    families_note: str | None = None,
) -> str:
    """The Markdown page: machine, commands, then one section per group ``cpu`` holds.

    Args:
        cpu: the CPU run (its ratios and absolute figures fill the tables).
        gpu: an optional GPU run of the same suite (its absolute figures are added).
        charts: ``group -> image link`` (relative to the page) of charts to show.
        note: what the person who ran the suite says about the run (e.g. other load on the
            machine), shown under the machine line.
        zoo: a separate CPU run whose zoo group fills the zoo section (named there) instead of
            ``cpu``'s.
        zoo_note: a remark about the zoo figures (e.g. which presets a partial run measured),
            shown above the zoo table.
        families: separate CPU runs of the family suites; each family group's section comes
            from the first that holds it (named there), else from ``cpu``.
        families_note: a remark about the family runs (the machine's load, what was skipped),
            shown above each family table.

    Raises:
        ValueError: ``cpu`` holds none of the suite's groups, or a group lacks its baseline.
    """
    present = [group for group in SECTIONS if _source(group, cpu, zoo, families).group(group)]
    if not present:
        groups = sorted({entry.group for entry in cpu.entries})
        raise ValueError(f"the results hold none of the groups {list(SECTIONS)} (found {groups})")
    charts = charts or {}
    lines = ["# Benchmarks", ""]
    if cpu.size != "real":
        lines += [
            f"> **Size `{cpu.size}`:** smoke-test figures from narrow models; they measure "
            "nothing. Regenerate at real size before reading them.",
            "",
        ]
    lines += [
        f"**CPU run:** {cpu.describe()}, size `{cpu.size}`. Every ratio compares two figures "
        "measured in the same run: machines are noisy, only ratios carry over between them.",
        "",
        *([f"> **Note on this run:** {note}", ""] if note else []),
        _gpu_paragraph(gpu),
        "",
        "Regenerate:",
        "",
        COMMANDS,
        "",
    ]
    for group in present:
        title, text, table = SECTIONS[group]
        source = _source(group, cpu, zoo, families)
        if source is not cpu:
            text = (
                f"**Measured in a separate run:** {source.describe()}, size `{source.size}`. {text}"
            )
        anchor = f" {{#{ANCHORS[group]}}}" if group in ANCHORS else ""
        lines += [f"## {title}{anchor}", "", text, ""]
        if group == ZOO and zoo_note:
            lines += [f"> **Note on these figures:** {zoo_note}", ""]
        if group in FAMILY_GROUPS and families_note:
            lines += [f"> **Note on these figures:** {families_note}", ""]
        lines += [*table(source, gpu), ""]
        if group in charts:
            lines += [f"![{title}]({charts[group]})", ""]
    lines += [RUNNING, ""]
    return "\n".join(lines)


def write_report(
    results: Path,
    markdown: Path,
    *,
    gpu_results: Path | None = None,
    zoo_results: Path | None = None,
    zoo_note: str | None = None,
    family_results: Sequence[Path] = (),
    families_note: str | None = None,
    images: Path | None = None,
    allow_tiny: bool = False,
    charts: bool = True,
    note: str | None = None,
) -> list[Path]:
    """Render ``results`` (and ``gpu_results``) into ``markdown`` and PNG charts in ``images``
    (default: ``images/`` beside ``markdown``; no charts when ``charts`` is false), with an
    optional ``note`` about the run under the machine line; ``zoo_results``, a separate CPU run
    of the zoo benchmarks, fills the zoo section, with an optional ``zoo_note`` above its table;
    ``family_results``, CPU runs of the family suites, fill the family sections, with an
    optional ``families_note`` above their tables.

    Returns:
        The written files: the Markdown page, then the charts.

    Raises:
        ValueError: the CPU (or zoo) results are not from a CPU run, the zoo results hold no zoo
            group, a family run is not a CPU run or holds no family group, the GPU results are
            not from a CUDA run, or any was measured at tiny size without ``allow_tiny``.
    """
    cpu = load_run(json.loads(Path(results).read_text()))
    gpu = load_run(json.loads(Path(gpu_results).read_text())) if gpu_results else None
    zoo = load_run(json.loads(Path(zoo_results).read_text())) if zoo_results else None
    if cpu.device != "cpu":
        raise ValueError(f"{results} is a {cpu.device!r} run; the first file must be the CPU run")
    if zoo is not None and (zoo.device != "cpu" or not zoo.group(ZOO)):
        raise ValueError(
            f"--zoo {zoo_results} must be a CPU run holding the {ZOO!r} group (it is a "
            f"{zoo.device!r} run with groups {sorted({entry.group for entry in zoo.entries})})"
        )
    families = [load_run(json.loads(Path(path).read_text())) for path in family_results]
    for run, path in zip(families, family_results, strict=True):
        if run.device != "cpu" or not any(run.group(group) for group in FAMILY_GROUPS):
            raise ValueError(
                f"--families {path} must be a CPU run holding a group of {list(FAMILY_GROUPS)} "
                f"(it is a {run.device!r} run with groups "
                f"{sorted({entry.group for entry in run.entries})})"
            )
    if gpu is not None and gpu.device != "cuda":
        raise ValueError(f"--gpu {gpu_results} is a {gpu.device!r} run, not a 'cuda' run")
    runs = (
        (cpu, results),
        (gpu, gpu_results),
        (zoo, zoo_results),
        *zip(families, family_results, strict=True),
    )
    for run, path in runs:
        if run is not None and run.size != "real" and not allow_tiny:
            raise ValueError(
                f"refusing to render {path}: measured at size {run.size!r}, not 'real' "
                "(pass --allow-tiny for a smoke test)"
            )
    markdown = Path(markdown)
    images = Path(images) if images is not None else markdown.parent / "images"
    written = write_charts(cpu, gpu, images, zoo=zoo) if charts else {}
    if charts:
        sources = {group: _source(group, cpu, zoo, families) for group in FAMILY_GROUPS}
        written |= write_family_charts(sources, images)
    links = {
        group: Path(os.path.relpath(path, markdown.parent)).as_posix()
        for group, path in written.items()
    }
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render(cpu, gpu, links, note, zoo, zoo_note, families, families_note))
    return [markdown, *written.values()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/report.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON of the CPU run")
    parser.add_argument("markdown", type=Path, help="the Markdown page to write")
    parser.add_argument("--gpu", type=Path, help="pytest-benchmark JSON of a CUDA run")
    parser.add_argument("--zoo", type=Path, help="pytest-benchmark JSON of a CPU zoo-only run")
    parser.add_argument("--zoo-note", help="a remark about the zoo figures, above its table")
    parser.add_argument(
        "--families",
        type=Path,
        nargs="+",
        default=[],
        help="pytest-benchmark JSON of CPU runs of the family suites",
    )
    parser.add_argument(
        "--families-note", help="a remark about the family runs, above their tables"
    )
    parser.add_argument("--images", type=Path, help="chart directory (default: images/ beside)")
    parser.add_argument("--allow-tiny", action="store_true", help="render a tiny-size run")
    parser.add_argument("--no-charts", action="store_true", help="write the Markdown page only")
    parser.add_argument("--note", help="a remark about the run, shown under the machine line")
    arguments = parser.parse_args(argv)
    try:
        written = write_report(
            arguments.results,
            arguments.markdown,
            gpu_results=arguments.gpu,
            zoo_results=arguments.zoo,
            zoo_note=arguments.zoo_note,
            family_results=arguments.families,
            families_note=arguments.families_note,
            images=arguments.images,
            allow_tiny=arguments.allow_tiny,
            charts=not arguments.no_charts,
            note=arguments.note,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
