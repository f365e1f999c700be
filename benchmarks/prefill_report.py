"""The Markdown table of the prefill benchmark (``benchmarks/test_prefill.py``).

Takes the grouped entries that ``benchmarks/report.py``'s ``_by_group`` builds from a
pytest-benchmark JSON file and renders the ``prefill`` group::

    from prefill_report import prefill_table

    lines = prefill_table(_by_group(results["benchmarks"]))

Standard library only, like ``report.py``: rendering needs neither torch nor pytest.
"""

from __future__ import annotations

GROUP = "prefill"
#: The variant every speed-up is measured against: LLaVA-1.5's 576 visual tokens.
BASELINE = "standard-576"


def prefill_table(groups: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown lines of the prefill group: one row per variant, fewest visual tokens first.

    Args:
        groups: ``group -> test name -> {"params": ..., "stats": ..., "extra": ...}``, as
            ``report._by_group`` returns; the ``prefill`` group's entries carry
            ``params["variant"]`` and ``extra["visual_tokens"]`` / ``extra["total_tokens"]``.

    Returns:
        The table's lines (header, separator, rows): variant, visual tokens, total tokens
        (text + visual), median prefill time in seconds, and speed-up vs ``standard-576``
        (its median / the variant's median, both from the same run).

    Raises:
        ValueError: if ``groups`` has no ``prefill`` group or that group has no
            ``standard-576`` entry.
    """
    entries = groups.get(GROUP)
    if not entries:
        raise ValueError(
            f"groups has no {GROUP!r} group (groups: {sorted(groups)}); "
            "run benchmarks/test_prefill.py into the same JSON file"
        )
    by_variant = {entry["params"]["variant"]: entry for entry in entries.values()}
    if BASELINE not in by_variant:
        raise ValueError(
            f"the {GROUP!r} group has no {BASELINE!r} variant to compare with "
            f"(variants: {sorted(by_variant)})"
        )
    baseline = by_variant[BASELINE]["stats"]["median"]
    lines = [
        "| variant | visual tokens | total tokens | median time (s) | speed-up vs 576 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    ordered = sorted(by_variant.items(), key=lambda item: item[1]["extra"]["visual_tokens"])
    for variant, entry in ordered:
        median = entry["stats"]["median"]
        lines.append(
            f"| `{variant}` | {entry['extra']['visual_tokens']} | "
            f"{entry['extra']['total_tokens']} | {median:.3f} | {baseline / median:.2f}x |"
        )
    return lines
