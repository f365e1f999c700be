"""``ConnectorConfig``: everything that defines a Dense Connector, as a frozen dataclass.

Layer indices follow the HF ``hidden_states`` convention (see :mod:`mmconnect.layers`) and may be
negative; they are validated against ``num_layers``, the number of blocks of the encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmconnect.checkpoint import read_json, write_json
from mmconnect.fusion import check_fusion_config, list_fusions
from mmconnect.layers import normalize_groups, normalize_layer, normalize_layers
from mmconnect.projectors import list_projectors
from mmconnect.resample import check_resample_mode, check_target_grid

#: The on-disk config format this version writes and the newest it reads.
FORMAT_VERSION = 1

#: A registered fusion name: ``"none"``, ``"sti"``, ``"sci"``, ``"dci"`` or one added with
#: :func:`mmconnect.register_fusion`.
FusionKind = str
PLACEMENTS: tuple[str, ...] = ("before_projector", "after_projector")
STI_POOL_MODES: tuple[str, ...] = ("raster", "grid")


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")
    return value


def _choice(value: Any, argument: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return value


def parse_dtype(name: str | None, *, argument: str = "accumulate_dtype") -> torch.dtype | None:
    """Parse a floating dtype name such as ``"float32"``; ``None`` stays ``None``."""
    if name is None:
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{argument} must be None or a floating dtype name such as 'float32', got {name!r}"
        )
    return dtype


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    """The full definition of a :class:`mmconnect.DenseConnector`.

    Attributes:
        fusion: ``"none"`` (only ``final_layer``: the LLaVA baseline), ``"sti"`` (stack pooled
            ``layers`` as extra tokens), ``"sci"`` (concatenate ``layers`` along channels),
            ``"dci"`` (concatenate the means of ``groups`` along channels), or any name added
            with :func:`mmconnect.register_fusion` (see :func:`mmconnect.list_fusions`).
        vision_dim: channel width ``C`` of the encoder's hidden states.
        llm_dim: the LLM's embedding width, the projector's output.
        num_layers: the encoder's block count ``L`` (indices ``-(L + 1) .. L`` are valid).
        final_layer: the layer whose tokens come first (LLaVA's ``select_layer``, default -2).
        layers: extra layers for STI / SCI, in output order.
        groups: layer groups for DCI, each a tuple of layer indices, in output order.
        sti_window: STI pooling window and stride (8 in the official code).
        sti_pool: ``"raster"`` (1-D over the flattened sequence, official) or ``"grid"`` (2-D).
        resample_grid: ``(height, width)`` to resize the fused token grid to (efficient DC), or
            ``None``.
        resample_mode: ``"bilinear"`` (paper), ``"avg"``, ``"max"`` or a mode added with
            :func:`mmconnect.register_resampler`.
        resample_placement: ``"before_projector"`` (cheaper, default) or ``"after_projector"``.
        projector: a registered projector name (see :func:`mmconnect.list_projectors`).
        accumulate_dtype: how DCI group means round. ``None`` (default): as the official code's
            ``torch.sum(torch.stack(group), 0) / n`` in the features' dtype, bit for bit on the
            CPU. A dtype name such as ``"float32"``: summed and divided in that dtype, rounded
            once to the features' dtype (overflow-safe in fp16).
        format_version: the config format; newer versions than this library knows are refused.
    """

    fusion: FusionKind
    vision_dim: int
    llm_dim: int
    num_layers: int
    final_layer: int = -2
    layers: tuple[int, ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()
    sti_window: int = 8
    sti_pool: Literal["raster", "grid"] = "raster"
    resample_grid: tuple[int, int] | None = None
    resample_mode: str = "bilinear"
    resample_placement: Literal["before_projector", "after_projector"] = "before_projector"
    projector: str = "mlp2x_gelu"
    accumulate_dtype: str | None = None
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.fusion not in list_fusions():
            # A config saved with a user's fusion loads only once that fusion is registered again.
            raise ValueError(
                f"fusion must be one of {tuple(list_fusions())}, got {self.fusion!r}; a new fusion "
                "is registered with mmconnect.register_fusion before a config names it"
            )
        for argument in ("vision_dim", "llm_dim", "num_layers", "sti_window"):
            _positive_int(getattr(self, argument), argument)
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version={self.format_version!r} is not supported: this mmconnect reads "
                f"format_version {FORMAT_VERSION}"
            )
        _check_iterable(self.layers, "layers")
        _check_iterable(self.groups, "groups")
        # The dataclass is frozen: normalise containers (lists, ranges) to tuples once, here.
        object.__setattr__(self, "layers", tuple(self.layers))
        groups = tuple(
            tuple(_check_iterable(group, f"groups[{i}]")) for i, group in enumerate(self.groups)
        )
        object.__setattr__(self, "groups", groups)
        final = normalize_layer(self.final_layer, self.num_layers, argument="final_layer")
        extra = normalize_layers(self.layers, self.num_layers, argument="layers")
        normalize_groups(self.groups, self.num_layers, argument="groups")
        if final in extra:
            raise ValueError(
                f"layers contains the final layer {final} (final_layer={self.final_layer}); list only the extra layers"
            )
        _choice(self.sti_pool, "sti_pool", STI_POOL_MODES)
        try:
            check_resample_mode(self.resample_mode, argument="resample_mode")
        except ValueError as error:
            raise ValueError(
                f"{error}; a new mode is registered with mmconnect.register_resampler first"
            ) from None
        _choice(self.resample_placement, "resample_placement", PLACEMENTS)
        if self.resample_grid is not None:
            grid = check_target_grid(self.resample_grid, argument="resample_grid")
            object.__setattr__(self, "resample_grid", grid)
        if self.projector not in list_projectors():
            raise ValueError(
                f"unknown projector {self.projector!r}; known projectors: "
                f"{', '.join(list_projectors())} (register one with mmconnect.register_projector)"
            )
        parse_dtype(self.accumulate_dtype)
        # The fusion's own rules (which of layers= / groups= it reads, whether its tokens can be
        # resampled) live with the fusion in its registry entry.
        check_fusion_config(self)

    # ------------------------------------------------------------------ derived
    @property
    def accumulate_torch_dtype(self) -> torch.dtype | None:
        """``accumulate_dtype`` as a ``torch.dtype``."""
        return parse_dtype(self.accumulate_dtype)

    def replace(self, **changes: Any) -> ConnectorConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["groups"] = [list(group) for group in self.groups]
        data["resample_grid"] = list(self.resample_grid) if self.resample_grid is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectorConfig:
        """Build a config from :meth:`to_dict` output.

        Raises:
            ValueError: unknown keys, or a ``format_version`` newer than this library reads.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a connector config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown connector config keys {unknown}; known keys: {sorted(known)}"
            )
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(
                f"this connector config has format_version {version}, newer than the {FORMAT_VERSION} "
                "this mmconnect reads; upgrade mmconnect"
            )
        values = dict(data)
        if values.get("resample_grid") is not None:
            values["resample_grid"] = tuple(values["resample_grid"])
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON."""
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> ConnectorConfig:
        """Read a config written by :meth:`save`."""
        return cls.from_dict(read_json(path))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ConnectorConfig:
        """A published configuration by name, with fields overridden (see :mod:`mmconnect.presets`).

        Examples:
            >>> ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=32, llm_dim=64).groups[1][:3]
            (12, 13, 14)
        """
        from mmconnect.presets import preset_fields

        return cls(**{**preset_fields(name), **overrides})


def _check_iterable(value: Any, argument: str) -> Iterable:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{argument} must be a sequence of layer indices, got {value!r}")
    return value
