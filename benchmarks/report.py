"""Render a pytest-benchmark JSON file of this suite as ``docs/benchmarks.md``.

Usage::

    python benchmarks/report.py benchmarks/results.json docs/benchmarks.md

Every ratio compares figures measured in the same run (machines are noisy; only ratios carry
over). The machine, the size and the date come from the JSON.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from prefill_report import prefill_table

MIB = 1024 * 1024


def _by_group(benchmarks: list[dict]) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for entry in benchmarks:
        params = entry.get("params") or {}
        groups[entry["group"]][entry["name"]] = {
            "params": params,
            "stats": entry["stats"],
            "extra": entry["extra_info"],
        }
    return groups


def _capture_table(entries: dict[str, dict]) -> list[str]:
    by_variant = {entry["params"]["variant"]: entry for entry in entries.values()}
    plain = by_variant["plain-forward"]
    hidden = by_variant["output-hidden-states"]
    hidden_overhead = hidden["extra"]["peak_bytes"] - plain["extra"]["peak_bytes"]
    lines = [
        "| variant | median time (s) | time vs plain forward | peak tensor memory (MiB) | capture overhead (MiB) | overhead vs output_hidden_states |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in ("plain-forward", "output-hidden-states", "tap-dci-streaming"):
        entry = by_variant[variant]
        peak = entry["extra"]["peak_bytes"]
        overhead = peak - plain["extra"]["peak_bytes"]
        lines.append(
            f"| `{variant}` | {entry['stats']['median']:.3f} | "
            f"{entry['stats']['median'] / plain['stats']['median']:.3f}x | {peak / MIB:.1f} | "
            f"{overhead / MIB:.1f} | {overhead / hidden_overhead:.3f} |"
        )
    return lines


def _connector_table(groups: dict[str, dict[str, dict]]) -> list[str]:
    lines = [
        "| preset | connector median (ms) | bare matmuls median (ms) | connector / bare | visual tokens per second (connector) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, entries in sorted(groups.items()):
        if name != "connector":
            continue
        presets: dict[str, dict[str, dict]] = defaultdict(dict)
        for entry in entries.values():
            presets[entry["params"]["preset"]][entry["params"]["implementation"]] = entry
        for preset, pair in presets.items():
            connector, bare = pair["connector"], pair["bare-matmuls"]
            ratio = connector["stats"]["median"] / bare["stats"]["median"]
            throughput = connector["extra"]["visual_tokens"] / connector["stats"]["median"]
            lines.append(
                f"| `{preset}` | {connector['stats']['median'] * 1e3:.1f} | "
                f"{bare['stats']['median'] * 1e3:.1f} | {ratio:.3f}x | {throughput:,.0f} |"
            )
    return lines


def render(results: dict) -> str:
    machine = results.get("machine_info", {})
    groups = _by_group(results["benchmarks"])
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "unknown CPU"))
    sizes = {entry["extra_info"].get("size", "real") for entry in results["benchmarks"]}
    if sizes != {"real"}:
        raise SystemExit(
            f"refusing to render: these results were measured at size {sorted(sizes)}, not 'real'"
        )
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {cpu} ({machine.get('cpu', {}).get('count', '?')} logical cores), "
        f"{results.get('datetime', '')[:10]}, torch threads = cores, fp32, `torch.no_grad()`. "
        "Regenerate with the commands in the README; every ratio compares figures from the same run.",
        "",
    ]
    if "tap-capture" in groups:
        lines += [
            "## Capturing DCI inputs at CLIP-L/336, batch 4",
            "",
            "Peak tensor memory counts the bytes of all tensors alive at once during the call (weights "
            "and inputs excluded), tracked exactly per storage (`benchmarks/memory.py`). The capture "
            "overhead is the peak above the plain forward's. Targets: tap overhead at most 0.25 of "
            "`output_hidden_states`'s, tap time no slower than the plain forward.",
            "",
            *_capture_table(groups["tap-capture"]),
            "",
        ]
    if "connector" in groups:
        lines += [
            "## Connector (fuse + project) vs its bare matrix multiplies, CLIP-L/336, batch 4, to 4096",
            "",
            "The bare variant multiplies the already fused input by the projector's two weight "
            "matrices (no bias, no GELU, no fusion): the practical limit. Target: connector within 1.2x.",
            "",
            *_connector_table(groups),
            "",
        ]
    if "prefill" in groups:
        lines += [
            "## LLM prefill with 144 / 576 / 720 visual tokens (Llama-shaped, 1.1B parameters)",
            "",
            "TinyLlama-1.1B's shape with random weights, batch 1, 64 text tokens around the visual "
            "tokens, `use_cache=True`, logits of the last position (what `generate()` does before "
            "its first token). Target: 144 visual tokens (efficient Dense Connector) at least 2.5x "
            "faster than 576.",
            "",
            *prefill_table(groups),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, target = (Path(argument) for argument in argv)
    Path(target).write_text(render(json.loads(source.read_text())))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
