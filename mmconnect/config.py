"""``ConnectorConfig``: everything that defines a Dense Connector, one spec per component.

A config holds the encoder and LLM widths, the encoder depth and three specs, each with only its
own parameters: the fusion (:class:`~mmconnect.fusion.FusionSpec`: ``SingleLayerSpec``,
``STISpec``, ``SCISpec``, ``DCISpec`` or a user's), the projector
(:class:`~mmconnect.projectors.ProjectorSpec`, e.g. ``MLPSpec(depth=2)``, LLaVA's
``"mlp2x_gelu"``) and the optional resampling (:class:`~mmconnect.resample.ResampleSpec`).

Layer indices follow the HF ``hidden_states`` convention (see :mod:`mmconnect.layers`) and may be
negative; they are validated against ``num_layers``, the number of blocks of the encoder.

On disk (format 2)::

    {"format_version": 2, "vision_dim": 1024, "llm_dim": 4096, "num_layers": 24,
     "fusion": {"kind": "dci", "final_layer": 23, "groups": [[0, ...], [12, ...]],
                "accumulate_dtype": null},
     "projector": {"kind": "mlp", "depth": 2, "activation": "gelu"},
     "resample": null}

Files of format 1 (one flat dict: ``fusion`` a name, ``layers``, ``groups``, ``sti_window``,
``sti_pool``, ``resample_grid``, ``resample_mode``, ``resample_placement``, ``projector`` a
name, ``accumulate_dtype``) are upgraded when read (:func:`upgrade_format1`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmconnect.checkpoint import read_json, write_json
from mmconnect.fusion import FusionSpec, fusion_spec_class, list_fusions, parse_fusion
from mmconnect.injection import DeepStackSpec
from mmconnect.projectors import MLPSpec, ProjectorSpec, parse_projector
from mmconnect.resample import ResampleSpec
from mmconnect.validation import check_positive_int

#: The on-disk config format this version writes and the newest it reads (it reads 1 and 2).
FORMAT_VERSION = 2

#: Format 1's flat fusion fields: format-1 name -> (the spec parameter it became, its format-1
#: default). The upgrade reads it one way, the weights fingerprint the other.
FORMAT1_FUSION_FIELDS: dict[str, tuple[str, Any]] = {
    "layers": ("extra_layers", ()),
    "groups": ("groups", ()),
    "sti_window": ("window", 8),
    "sti_pool": ("pool", "raster"),
    "accumulate_dtype": ("accumulate_dtype", None),
}
#: Format 1's resampling fields: format-1 name -> (the ResampleSpec field, its default).
FORMAT1_RESAMPLE_FIELDS: dict[str, tuple[str, Any]] = {
    "resample_grid": ("grid", None),
    "resample_mode": ("mode", "bilinear"),
    "resample_placement": ("placement", "before_projector"),
}
_FORMAT1_TOP = ("vision_dim", "llm_dim", "num_layers", "fusion", "final_layer", "projector")
#: Format-1 fusion fields that configs could set on any fusion, ignored by the built-in
#: fusions that do not read them; the upgrade drops them there.
_FORMAT1_TUNING = ("sti_window", "sti_pool", "accumulate_dtype")
_BUILTIN_FUSIONS = ("none", "sti", "sci", "dci")


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    """The full definition of a :class:`mmconnect.DenseConnector`.

    Attributes:
        vision_dim: channel width ``C`` of the encoder's hidden states.
        llm_dim: the LLM's embedding width, the projector's output.
        num_layers: the encoder's block count ``L`` (indices ``-(L + 1) .. L`` are valid).
        fusion: the fusion spec: :class:`~mmconnect.fusion.SingleLayerSpec` (the LLaVA baseline),
            :class:`~mmconnect.fusion.STISpec`, :class:`~mmconnect.fusion.SCISpec`,
            :class:`~mmconnect.fusion.DCISpec` or a user's (see :func:`mmconnect.register_fusion`);
            the name of a kind without required parameters (``"none"``) is accepted too.
        projector: the projector spec (default ``MLPSpec(depth=2)``, LLaVA's ``mlp2x_gelu``); a
            name such as ``"mlp2x_gelu"`` or ``"linear"`` is accepted and parsed.
        resample: how the fused token grid is resized (the efficient Dense Connector), or
            ``None``. Fusions whose tokens do not all form the grid (STI) refuse it.
        injection: vision layers added to the LLM's first hidden states besides the tokens
            (:class:`~mmconnect.injection.DeepStackSpec`, Qwen3-VL's DeepStack), or ``None``.

    Examples:
        >>> from mmconnect import DCISpec
        >>> config = ConnectorConfig(vision_dim=1024, llm_dim=4096, num_layers=24,
        ...                          fusion=DCISpec(groups=[range(0, 12), range(12, 24)]))
        >>> config.projector.name, config.to_dict()["fusion"]["kind"]
        ('mlp2x_gelu', 'dci')
    """

    vision_dim: int
    llm_dim: int
    num_layers: int
    fusion: FusionSpec
    projector: ProjectorSpec = field(default_factory=MLPSpec)
    resample: ResampleSpec | None = None
    injection: DeepStackSpec | None = None

    def __post_init__(self) -> None:
        for argument in ("vision_dim", "llm_dim", "num_layers"):
            check_positive_int(getattr(self, argument), argument)
        if isinstance(self.fusion, Mapping):
            raise TypeError(
                "fusion must be a FusionSpec or a fusion name, got a mapping; "
                "ConnectorConfig.from_dict reads dicts"
            )
        # The dataclass is frozen: parse names into specs once, here.
        object.__setattr__(self, "fusion", parse_fusion(self.fusion))
        if isinstance(self.projector, Mapping):
            raise TypeError(
                "projector must be a ProjectorSpec or a projector name, got a mapping; "
                "ConnectorConfig.from_dict reads dicts"
            )
        object.__setattr__(self, "projector", parse_projector(self.projector))
        # Range checks need the encoder depth, which only the config knows.
        self.fusion.normalized(self.num_layers)
        if self.resample is not None:
            if not isinstance(self.resample, ResampleSpec):
                raise TypeError(
                    "resample must be a ResampleSpec or None, got "
                    f"{self.resample!r} ({type(self.resample).__name__})"
                )
            if not type(self.fusion).resamplable:
                raise ValueError(
                    f"resample cannot be used with fusion {self.fusion.kind!r}: its tokens do not "
                    "all form the encoder's grid (STI appends pooled tokens); resample with "
                    "'none', 'sci' or 'dci'"
                )
        if self.injection is not None:
            if not isinstance(self.injection, DeepStackSpec):
                raise TypeError(
                    "injection must be a DeepStackSpec or None, got "
                    f"{self.injection!r} ({type(self.injection).__name__})"
                )
            self.injection.normalized(self.num_layers)  # index ranges need the depth

    # ------------------------------------------------------------------ derived
    def replace(self, **changes: Any) -> ConnectorConfig:
        """A copy with ``changes`` applied (validated like a new config).

        Examples:
            >>> efficient = ConnectorConfig.from_preset("dc-dci-clip-l-336").replace(
            ...     resample=ResampleSpec(grid=(12, 12)))
            >>> efficient.resample.grid
            (12, 12)
        """
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the token contract
    # The same three questions DenseConnector answers, for code that holds only a config
    # (processors, AnyRes counting, HF configs' image_seq_length): the answer is the connector's,
    # built on the meta device (no weights), so the two can never disagree.
    def num_tokens(self, grid: tuple[int, int]) -> int:
        """Output tokens of a connector of this config for an encoder grid ``(height, width)``
        (:meth:`mmconnect.connector.DenseConnector.num_tokens`); allocates no weights.

        Examples:
            >>> ConnectorConfig.from_preset("dc-sti-clip-l-336").num_tokens((24, 24))
            720
        """
        return self._layout_connector().num_tokens(grid)

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid the leading output tokens form (:meth:`mmconnect.connector.DenseConnector.token_grid`)."""
        return self._layout_connector().token_grid(grid)

    def extra_tokens(self, grid: tuple[int, int]) -> int:
        """Output tokens after the :meth:`token_grid` tokens that form no grid (STI's pooled
        tokens; :meth:`mmconnect.connector.DenseConnector.extra_tokens`)."""
        return self._layout_connector().extra_tokens(grid)

    def _layout_connector(self) -> Any:
        from mmconnect.connector import DenseConnector  # the connector imports this module

        with torch.device("meta"):  # bookkeeping only: the declared counts need no weights
            return DenseConnector(self)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of format :data:`FORMAT_VERSION` (tuples become lists)."""
        return {
            "format_version": FORMAT_VERSION,
            "vision_dim": self.vision_dim,
            "llm_dim": self.llm_dim,
            "num_layers": self.num_layers,
            "fusion": self.fusion.to_dict(),
            "projector": self.projector.to_dict(),
            "resample": None if self.resample is None else self.resample.to_dict(),
            # Written only when set, so configs without injection keep their format-2 dicts.
            **({} if self.injection is None else {"injection": self.injection.to_dict()}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectorConfig:
        """Build a config from :meth:`to_dict` output, or from a format-1 dict (upgraded).

        Raises:
            ValueError: unknown keys (at the top or in a spec; the message lists the known
                ones), a ``format_version`` newer than this library reads, or invalid values.
            TypeError: ``data`` or a spec is not a mapping, or a value has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a connector config must be a mapping, got {type(data).__name__}")
        version = data.get("format_version", 1 if isinstance(data.get("fusion"), str) else None)
        if version is None:
            raise ValueError(f"a connector config needs a format_version, got keys {sorted(data)}")
        check_positive_int(version, "format_version")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"this connector config has format_version {version}, newer than the "
                f"{FORMAT_VERSION} this mmconnect reads; upgrade mmconnect"
            )
        if version == 1:
            data = upgrade_format1(data)
        known = (
            "format_version",
            "vision_dim",
            "llm_dim",
            "num_layers",
            "fusion",
            "projector",
            "resample",
            "injection",
        )
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown connector config keys {unknown}; known keys: {list(known)}")
        missing = [
            key for key in ("vision_dim", "llm_dim", "num_layers", "fusion") if key not in data
        ]
        if missing:
            raise ValueError(f"the connector config misses the keys {missing}")
        for key in ("fusion", "projector"):
            if key in data and not isinstance(data[key], Mapping | str):
                raise TypeError(
                    f"connector config key {key!r} must be a mapping, got {data[key]!r}"
                )
        resample = data.get("resample")
        values: dict[str, Any] = {
            "vision_dim": data["vision_dim"],
            "llm_dim": data["llm_dim"],
            "num_layers": data["num_layers"],
            "fusion": parse_fusion(data["fusion"]),
            "resample": None if resample is None else ResampleSpec.from_dict(resample),
        }
        if data.get("injection") is not None:
            values["injection"] = DeepStackSpec.from_dict(data["injection"])
        if "projector" in data:
            values["projector"] = parse_projector(data["projector"])
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON."""
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> ConnectorConfig:
        """Read a config written by :meth:`save` (format 1 files are upgraded)."""
        return cls.from_dict(read_json(path))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ConnectorConfig:
        """A published configuration by name, with fields overridden (see :mod:`mmconnect.presets`).

        Overrides replace whole fields: ``vision_dim=``, ``llm_dim=``, ``num_layers=``, or a
        spec (``resample=ResampleSpec(grid=(12, 12))``, ``projector="linear"``).

        Examples:
            >>> ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=32, llm_dim=64).fusion.groups[1][:3]
            (12, 13, 14)
        """
        from mmconnect.presets import preset_fields

        return cls(**{**preset_fields(name), **overrides})


def upgrade_format1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A format-1 connector config dict (flat fields) as the format-2 dict it means.

    ``fusion``, ``final_layer`` and the fusion fields (``layers`` -> ``extra_layers``,
    ``groups``, ``sti_window`` -> ``window``, ``sti_pool`` -> ``pool``, ``accumulate_dtype``) go
    into the fusion spec, as far as its kind has them; ``projector`` (a LLaVA name) into the
    projector spec; ``resample_grid``, ``resample_mode``, ``resample_placement`` into the
    resample spec (``None`` without a grid). Format 1 let every fusion carry ``sti_window``,
    ``sti_pool`` and ``accumulate_dtype``; the built-in fusions that did not read them drop them.

    Examples:
        >>> upgrade_format1({"format_version": 1, "fusion": "sci", "vision_dim": 8, "llm_dim": 16,
        ...                  "num_layers": 4, "layers": [1, 2]})["fusion"]
        {'kind': 'sci', 'final_layer': -2, 'extra_layers': [1, 2]}

    Raises:
        ValueError: unknown keys, an unknown fusion kind, or a field the fusion's spec has no
            place for (layers for DCI, groups for SCI ...).
    """
    known = (*_FORMAT1_TOP, *FORMAT1_FUSION_FIELDS, *FORMAT1_RESAMPLE_FIELDS, "format_version")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown format-1 connector config keys {unknown}; known keys: {sorted(known)}"
        )
    kind = data.get("fusion")
    if kind not in list_fusions():
        raise ValueError(
            f"fusion must be one of {tuple(list_fusions())}, got {kind!r}; a new fusion is "
            "registered with mmconnect.register_fusion before a config names it"
        )
    parameters = fusion_spec_class(kind).parameter_names()
    fusion: dict[str, Any] = {"kind": kind, "final_layer": data.get("final_layer", -2)}
    for old, (new, default) in FORMAT1_FUSION_FIELDS.items():
        value = data.get(old, default)
        if new in parameters:
            fusion[new] = value
        elif _changed(value, default) and not (kind in _BUILTIN_FUSIONS and old in _FORMAT1_TUNING):
            raise ValueError(
                f"format-1 field {old}={value!r} has no place in fusion {kind!r}, whose "
                f"parameters are {list(parameters)}"
            )
    grid = data.get("resample_grid")
    resample = None
    if grid is not None:
        resample = {
            new: data.get(old, default) for old, (new, default) in FORMAT1_RESAMPLE_FIELDS.items()
        }
    upgraded = {key: data[key] for key in ("vision_dim", "llm_dim", "num_layers") if key in data}
    return {
        "format_version": FORMAT_VERSION,
        **upgraded,
        "fusion": fusion,
        "projector": data.get("projector", "mlp2x_gelu"),
        "resample": resample,
    }


def _changed(value: Any, default: Any) -> bool:
    if isinstance(default, tuple):
        return bool(value)
    return value != default


def format1_fields(config: ConnectorConfig) -> dict[str, Any]:
    """``config`` in format 1's flat layout, layer indices non-negative (for the fingerprint).

    Every built-in fusion and projector maps exactly onto format 1, so a config and its format-1
    original give the same dict. Parameters format 1 had no field for (a user fusion's own, a
    user projector's beyond its name) are added under ``fusion.<name>`` / ``projector_spec``.
    """
    fusion = config.fusion.normalized(config.num_layers)
    fields: dict[str, Any] = {
        "vision_dim": config.vision_dim,
        "llm_dim": config.llm_dim,
        "num_layers": config.num_layers,
        "fusion": fusion.kind,
        "final_layer": fusion.final_layer,
    }
    spec = fusion.to_dict()
    mapped = set()
    for old, (new, default) in FORMAT1_FUSION_FIELDS.items():
        fields[old] = spec[new] if new in spec else _json(default)
        mapped.add(new)
    for name in fusion.parameter_names():
        if name not in mapped and name != "final_layer":
            fields[f"fusion.{name}"] = spec[name]
    resample = config.resample
    for old, (new, default) in FORMAT1_RESAMPLE_FIELDS.items():
        fields[old] = _json(default) if resample is None else resample.to_dict()[new]
    if config.injection is not None:  # absent otherwise: older fingerprints stay valid
        fields["injection"] = config.injection.normalized(config.num_layers).to_dict()
    fields["projector"] = config.projector.name
    if _parse_projector_or_none(config.projector.name) != config.projector:
        fields["projector_spec"] = config.projector.to_dict()
    return fields


def _parse_projector_or_none(name: str) -> ProjectorSpec | None:
    """The projector spec ``name`` parses to, or ``None`` when it names none on its own."""
    try:
        return parse_projector(name)
    except (TypeError, ValueError):
        return None


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
