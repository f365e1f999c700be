"""``mmconnect lab``: train the baseline, STI, SCI, DCI and efficient-DCI connectors, and any
``<fusion>+<projector kind>`` of the connector zoo, over seeds on a pretrained tower whose last
layers hold less colour than its shallow ones and report accuracy per question type as mean +- std
(:mod:`mmconnect.integrations.applications.lab`). Needs the ``hf`` extra."""

from __future__ import annotations

import argparse
import sys

from mmconnect.integrations.cli.common import comma_list


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``lab`` command."""
    lab = subparsers.add_parser(
        "lab",
        help="compare connectors (the five presets, any zoo projector behind their fusions) over "
        "seeds on a pretrained tower whose last layers hold less colour than its shallow ones",
    )
    lab.add_argument("--output", default="mmconnect-lab", help="output directory")
    lab.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2,3,4)")
    lab.add_argument(
        "--connectors",
        default=None,
        help="comma-separated: baseline, sti, sci, dci, dci-efficient (the presets; default: "
        "those five), or <fusion>+<projector kind> for a registered projector at its lab size "
        "behind a preset's fusion (fusion: baseline, sti, sci or dci; e.g. dci+pixel_shuffle, "
        "baseline+qformer, sti+perceiver; an unknown kind is answered with the registered ones)",
    )
    lab.add_argument("--quick", action="store_true", help="a one-minute smoke run, two seeds")
    lab.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="training runs at the same time, one process each (default: one per available "
        "core); results do not depend on it",
    )
    lab.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output folder that no lab created (only the lab's own "
        "files are replaced; nothing else is deleted)",
    )


def run(arguments: argparse.Namespace) -> int:
    """Run the lab and print its accuracy table; exit status 2 with the reason on bad input."""
    from mmconnect.integrations.applications.lab import (
        LabConfig,
        accuracy_table,
        quick_config,
        run_lab,
        significance_summary,
    )

    options: dict = {"output_dir": arguments.output, "overwrite": arguments.overwrite}
    try:
        if arguments.seeds is not None:
            try:
                options["seeds"] = tuple(int(seed) for seed in comma_list(arguments.seeds))
            except ValueError:
                raise ValueError(
                    f"--seeds must be comma-separated ints, got {arguments.seeds!r}"
                ) from None
        if arguments.connectors is not None:
            options["connectors"] = comma_list(arguments.connectors)
        if arguments.jobs is not None:
            options["jobs"] = arguments.jobs
        config = quick_config(**options) if arguments.quick else LabConfig(**options)
        results = run_lab(config)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"mmconnect lab: {error}", file=sys.stderr)
        return 2
    print("\nHeld-out answer accuracy (%), mean +- std over seeds:\n")
    print(accuracy_table(results))
    if results["statistics"] is not None:
        print("\n" + significance_summary(results["statistics"]))
    print(
        f"\n{results['seconds']['total']:.0f} s; results.md, results.json, accuracy.png, "
        f"overall.png and encoder_probe.png are in {arguments.output}"
    )
    return 0
