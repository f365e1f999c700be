"""The ``mmconnect`` command line.

* ``mmconnect presets`` lists the built-in connector presets with the layers they read and the
  token count and projector width they produce at their native encoder grid;
* ``mmconnect inspect ENCODER`` describes a local checkpoint or a tiny test encoder: blocks, width,
  prefix tokens, token grid and the token count of every preset.

Commands that need transformers / timm import them when they run, never at ``import mmconnect``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from mmconnect.config import ConnectorConfig
from mmconnect.connector import DenseConnector
from mmconnect.presets import list_presets

#: Token grid of each preset's native encoder (CLIP-L/336: 24x24, SigLIP-SO400M/384: 27x27).
_NATIVE_GRIDS = {24: (24, 24), 27: (27, 27)}


def _describe_layers(connector: DenseConnector) -> str:
    parts = [f"F=H[{connector.individual_layers[0]}]"]
    window = getattr(connector.fusion, "window", None)  # STI pools its extra layers
    for layer in connector.individual_layers[1:]:
        parts.append(f"pool{window}(H[{layer}])" if window else f"H[{layer}]")
    parts += [f"mean H[{group[0]}..{group[-1]}]" for group in connector.groups]
    return ", ".join(parts)


def presets_table() -> str:
    """A plain-text table of every preset: fusion, layers, tokens, projector input width."""
    rows = [("preset", "fusion", "layers (HF hidden_states)", "tokens", "projector in")]
    for name in list_presets():
        config = ConnectorConfig.from_preset(name)
        with torch.device("meta"):  # bookkeeping only: no weights are allocated
            connector = DenseConnector(config)
        grid = _NATIVE_GRIDS[config.num_layers]
        rows.append(
            (
                name,
                config.fusion,
                _describe_layers(connector),
                str(connector.num_tokens(grid)),
                str(connector.fused_dim),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmconnect", description="Dense Connector for multimodal LLMs"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="list the built-in connector presets")
    inspect = commands.add_parser("inspect", help="describe a vision encoder as the tap sees it")
    inspect.add_argument("encoder", help="a local checkpoint directory or a tiny test encoder name")
    inspect.add_argument("--image-size", type=int, default=None, help="input size in pixels")
    arguments = parser.parse_args(argv)
    if arguments.command == "presets":
        print(presets_table())
    elif arguments.command == "inspect":
        return _inspect(arguments.encoder, arguments.image_size)
    return 0


def _inspect(spec: str, image_size: int | None) -> int:
    from mmconnect.integrations.encoders import describe_encoder, load_encoder

    try:
        encoder, native_size = load_encoder(spec)
    except ValueError as error:
        print(f"mmconnect inspect: {error}", file=sys.stderr)
        return 2
    size = image_size or native_size
    if size is None:
        print(
            "mmconnect inspect: the encoder does not state its image size; pass --image-size",
            file=sys.stderr,
        )
        return 2
    print(describe_encoder(encoder, size).render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
