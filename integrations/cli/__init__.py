"""The ``mmconnect`` command line, at the application layer (``mmconnect.integrations.cli``).

One module per command, each with ``add_arguments(subparsers)`` and ``run(arguments) -> int``:

* ``mmconnect presets`` (:mod:`~mmconnect.integrations.cli.presets`) lists the built-in connector
  presets with the layers they read and the token count and projector width they produce at their
  native encoder grid; it needs only the core;
* ``mmconnect inspect ENCODER`` (:mod:`~mmconnect.integrations.cli.inspect_encoder`) describes a
  local checkpoint or a tiny test encoder: blocks, width, prefix tokens, token grid and the token
  count of every preset;
* ``mmconnect demo`` (:mod:`~mmconnect.integrations.cli.demo`) trains the baseline and a Dense
  Connector LLaVA on synthetic VQA in minutes on a CPU and compares their held-out accuracy;
* ``mmconnect lab`` (:mod:`~mmconnect.integrations.cli.lab`) trains the baseline, STI, SCI, DCI and
  efficient-DCI connectors over seeds on a pretrained tower whose last layers hold less colour and
  reports accuracy per question type as mean +- std;
* ``mmconnect train --config FILE.yaml`` (:mod:`~mmconnect.integrations.cli.train`) runs both
  training stages from one file;
* ``mmconnect chat --model DIR --video FILE "question"`` (or ``--image FILE``)
  (:mod:`~mmconnect.integrations.cli.chat`) asks a saved Dense model (any registered family) about a video
  without video training, or about an image;
* ``mmconnect export MODEL_DIR OUT_DIR`` (:mod:`~mmconnect.integrations.cli.export`) writes the
  stock HF LLaVA / LLaVA-NeXT checkpoint of a saved Dense model (baseline, SCI or DCI connector)
  with its processor, which loads without mmconnect.

The core (``mmconnect``) never imports this package. Each command imports its heavy packages
when it runs; when one is not installed, :func:`main` prints which extra installs it, e.g.
``mmconnect demo: needs the 'hf' extra (transformers is not installed): pip install
"mmconnect[hf]"``, and returns exit status 2. ``python -m mmconnect.integrations.cli`` runs the
same command line as the ``mmconnect`` console script.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mmconnect.integrations.cli import chat, demo, export, inspect_encoder, lab, presets, train
from mmconnect.integrations.cli.common import missing_extra

#: Each command's name and its module, in the order ``--help`` lists them.
COMMANDS = {
    "presets": presets,
    "inspect": inspect_encoder,
    "demo": demo,
    "lab": lab,
    "train": train,
    "chat": chat,
    "export": export,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mmconnect`` argument parser, one sub-command per module of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="mmconnect", description="Dense Connector for multimodal LLMs"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_arguments(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Returns:
        0 on success; 2 on bad input (argparse exits with 2 itself) or when the command needs an
        extra that is not installed (the message names the extra and the pip command).
    """
    arguments = build_parser().parse_args(argv)
    if arguments.command in ("demo", "train"):
        # Show the per-stage parameter-group lines (which groups train, how many parameters).
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("mmconnect").setLevel(logging.INFO)
    try:
        return COMMANDS[arguments.command].run(arguments)
    except ImportError as error:
        missing = missing_extra(error)
        if missing is None:
            raise  # not a missing extra: a real bug, shown with its traceback
        package, extra = missing
        print(
            f"mmconnect {arguments.command}: needs the '{extra}' extra ({package} is not "
            f'installed): pip install "mmconnect[{extra}]"',
            file=sys.stderr,
        )
        return 2
