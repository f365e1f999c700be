"""``mmconnect demo``: train the baseline and a Dense Connector LLaVA on synthetic VQA in minutes
on a CPU and compare their held-out accuracy (:mod:`mmconnect.integrations.applications.demo`).
Needs the ``hf`` extra."""

from __future__ import annotations

import argparse
import sys

from mmconnect.integrations.cli.common import comma_list, positive_int


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    demo = subparsers.add_parser(
        "demo", help="train baseline and Dense Connector LLaVAs on synthetic VQA and compare"
    )
    demo.add_argument("--output", default="mmconnect-demo", help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--connectors",
        default="baseline,dci",
        help="comma-separated: baseline, sti, sci, dci, dci-efficient",
    )
    demo.add_argument(
        "--vision",
        default=None,
        help="local vision tower checkpoint (default: random, from a config)",
    )
    demo.add_argument(
        "--llm", default=None, help="local LLM checkpoint with its tokenizer (default: random)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a one-minute smoke run with tiny budgets"
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output folder that no demo created (only the demo's own "
        "files are replaced; nothing else is deleted)",
    )
    demo.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads per training process (default 1: the tiny models gain little "
        "from more, and lose much when other jobs share the cores)",
    )
    demo.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="connectors trained at once, each in its own process (default: one per "
        "connector, at most one per available core)",
    )


def run(arguments: argparse.Namespace) -> int:
    """Run the demo and print its accuracy table; exit status 2 with the reason on bad input."""
    from mmconnect.integrations.applications.demo import DemoConfig, results_table, run_demo

    options: dict = {
        "output_dir": arguments.output,
        "seed": arguments.seed,
        "connectors": comma_list(arguments.connectors),
        "vision_path": arguments.vision,
        "llm_path": arguments.llm,
        "overwrite": arguments.overwrite,
        "num_threads": arguments.threads,
        "jobs": arguments.jobs,
    }
    if arguments.quick:
        options |= {
            "num_train_images": 64,
            "num_eval_images": 16,
            "stage1_steps": 4,
            "stage2_steps": 8,
            "batch_size": 8,
        }
    try:
        # DemoConfig and run_demo check every argument before anything is written.
        results = run_demo(DemoConfig(**options))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"mmconnect demo: {error}", file=sys.stderr)
        return 2
    print("\nHeld-out answer accuracy (%), exact greedy answers:\n")
    print(results_table(results))
    print(
        f"\n{results['seconds']:.0f} s; results.json and loss_curves.png are in {arguments.output}"
    )
    return 0
