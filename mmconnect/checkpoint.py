"""Checkpoint I/O: safetensors weights and JSON configs on disk, no pickles.

A saved connector is a directory with ``config.json`` (a :class:`mmconnect.ConnectorConfig`) and
``model.safetensors``. Official PyTorch files (``mm_projector.bin``) are only ever read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read tensors from ``*.safetensors`` or a PyTorch file, never unpickling arbitrary objects.

    PyTorch files (``mm_projector.bin``) are read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def write_state_dict(state: Mapping[str, Tensor], path: str | Path) -> None:
    """Write tensors as safetensors (contiguous, detached copies; shared storage is fine)."""
    save_file({key: value.detach().contiguous().clone() for key, value in state.items()}, str(path))


def write_json(data: Mapping[str, Any], path: str | Path) -> None:
    """Write ``data`` as indented, key-sorted JSON with a trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from ``path`` with clear errors for missing or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def prepare_directory(directory: str | Path) -> Path:
    """Create ``directory`` (and parents) for writing; clear error if that is impossible."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot write to directory {str(directory)!r}: {error}") from None
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} exists and is not a directory")
    return directory
