"""``mmconnect train --config FILE.yaml``: run both training stages from one file
(:mod:`mmconnect.integrations.training.run_file`). Needs the ``hf`` extra."""

from __future__ import annotations

import argparse
import sys


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    train = subparsers.add_parser("train", help="run both training stages from one YAML file")
    train.add_argument(
        "--config",
        required=True,
        help="the run's YAML file (see mmconnect.integrations.training.run_file)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="train into non-empty stage folders that mmconnect training did not create (as "
        "overwrite: true in the run file; only the files training writes are replaced)",
    )


def run(arguments: argparse.Namespace) -> int:
    """Run both stages and print each final loss; exit status 2 with the reason on bad input."""
    from mmconnect.integrations.training.run_file import load_train_run, run_training

    try:
        # The whole run file (types, paths, output folders) is checked before any work.
        run_file = load_train_run(arguments.config, overwrite=arguments.overwrite)
        results = run_training(run_file)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"mmconnect train: {error}", file=sys.stderr)
        return 2
    for stage, entry in results.items():
        final = entry["losses"][-1][1] if entry["losses"] else float("nan")
        print(f"{stage}: final loss {final:.4f}, model in {entry['output_dir']}")
    return 0
