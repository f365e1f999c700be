"""``mmconnect inspect ENCODER``: describe a local checkpoint or a tiny test encoder as the tap
sees it (blocks, width, prefix tokens, token grid and the token count of every preset).
Needs the ``hf`` extra (``timm`` / ``openclip`` for those encoders)."""

from __future__ import annotations

import argparse
import sys

from mmconnect.integrations.cli.common import positive_int


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` command."""
    inspect = subparsers.add_parser("inspect", help="describe a vision encoder as the tap sees it")
    inspect.add_argument("encoder", help="a local checkpoint directory or a tiny test encoder name")
    inspect.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="input size in pixels (default: the encoder's own)",
    )


def run(arguments: argparse.Namespace) -> int:
    """Describe the encoder; exit status 2 with the reason on bad input."""
    from mmconnect.integrations.applications.encoders import (
        check_image_size,
        describe_encoder,
        load_encoder,
    )

    try:
        encoder, native_size = load_encoder(arguments.encoder)
        if arguments.image_size is None and native_size is None:
            raise ValueError("the encoder does not state its image size; pass --image-size")
        size = native_size if arguments.image_size is None else arguments.image_size
        check_image_size(encoder, size, native_size, option="--image-size")
    except (ValueError, FileNotFoundError) as error:
        print(f"mmconnect inspect: {error}", file=sys.stderr)
        return 2
    print(describe_encoder(encoder, size).render())
    return 0
