"""``mmconnect presets``: the built-in connector presets with the layers they read and the token
count and projector width they produce at their native encoder grid. Needs only the core."""

from __future__ import annotations

import argparse

import torch

from mmconnect.config import ConnectorConfig
from mmconnect.connector import DenseConnector
from mmconnect.fusion import STISpec
from mmconnect.presets import list_presets, preset_geometry


def _describe_layers(config: ConnectorConfig, connector: DenseConnector) -> str:
    """The layers the connector reads: the final one, the extra ones (STI's spec pools them with
    its ``window``), and DCI's group means."""
    spec = config.fusion
    parts = [f"F=H[{connector.individual_layers[0]}]"]
    for layer in connector.individual_layers[1:]:
        parts.append(
            f"pool{spec.window}(H[{layer}])" if isinstance(spec, STISpec) else f"H[{layer}]"
        )
    parts += [f"mean H[{group[0]}..{group[-1]}]" for group in connector.groups]
    return ", ".join(parts)


def presets_table() -> str:
    """A plain-text table of every preset: fusion, layers, tokens, projector input width."""
    rows = [("preset", "fusion", "layers (HF hidden_states)", "tokens", "projector in")]
    for name in list_presets():
        config = ConnectorConfig.from_preset(name)
        with torch.device("meta"):  # bookkeeping only: no weights are allocated
            connector = DenseConnector(config)
        grid = preset_geometry(name).grid  # the preset's own encoder, not a guess from its depth
        rows.append(
            (
                name,
                config.fusion.kind,
                _describe_layers(config, connector),
                str(connector.num_tokens(grid)),
                str(connector.fused_dim),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``presets`` command."""
    subparsers.add_parser("presets", help="list the built-in connector presets")


def run(arguments: argparse.Namespace) -> int:
    """Print :func:`presets_table`; exit status 0."""
    print(presets_table())
    return 0
