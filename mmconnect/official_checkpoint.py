"""Read the ``config.json`` of an official Dense Connector (or LLaVA-1.5) checkpoint.

The official Dense Connector code is LLaVA's, with one more config field. What its
``encode_images`` computes follows from these ``config.json`` fields:

* ``mm_dense_connector_type``: ``"sti"``, ``"sci"`` or ``"dci"``; absent (a plain LLaVA-1.5
  checkpoint), ``null`` or ``"none"``: the single-layer baseline;
* ``mm_vision_tower``: the tower's hub name; it picks the official code's tower branch. The CLIP
  branch reads ``hidden_states[mm_vision_select_layer]`` without CLS
  (``mm_vision_select_feature="patch"``) and groups DCI layers 0..11 and 12..23. The SigLIP branch
  drops the tower's last block and reads the last remaining hidden state, i.e. layer ``L - 1`` of
  the stock ``L``-block tower whatever ``mm_vision_select_layer`` says, and groups DCI layers
  0..12 and 13..25. Both branches read layers 7 and 15 for STI / SCI (pooled 1-D by 8 for STI);
* ``mm_hidden_size``: the projector's input width, ``3 C`` for SCI / DCI, ``C`` otherwise;
* ``mm_projector_type``: the projector (``linear``, ``mlpNx_gelu``; ``linear`` when absent);
* ``hidden_size``: the LLM width, the projector's output.

Tower depth and branch cannot be read from a name safely, so they come from a table of the
official towers' exact hub names (:data:`KNOWN_TOWERS`) or from explicit arguments; any other
name (e.g. a local path) without them gets a clear error.

Examples:
    >>> config = connector_config_from_official({
    ...     "hidden_size": 4096, "mm_dense_connector_type": "dci", "mm_hidden_size": 3072,
    ...     "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
    ...     "mm_vision_select_feature": "patch",
    ...     "mm_vision_tower": "openai/clip-vit-large-patch14-336"})
    >>> config == ConnectorConfig.from_preset("dc-dci-clip-l-336")
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmconnect.checkpoint import CONFIG_NAME, read_json
from mmconnect.config import ConnectorConfig
from mmconnect.fusion import DCISpec, FusionSpec, SCISpec, SingleLayerSpec, STISpec
from mmconnect.layers import normalize_layer
from mmconnect.validation import check_choice, check_positive_int

TowerBranch = Literal["clip", "siglip"]
TOWER_BRANCHES: tuple[str, ...] = ("clip", "siglip")
#: Values of ``mm_dense_connector_type`` meaning "no Dense Connector" (the LLaVA baseline).
_BASELINE_TYPES = (None, "none")
_DENSE_TYPES = ("sti", "sci", "dci")
#: Layers the official STI / SCI read, in output order after the final layer.
_STI_SCI_LAYERS = (7, 15)


@dataclass(frozen=True)
class OfficialTower:
    """What the official code's tower gives the connector.

    Attributes:
        vision_dim: channel width ``C``.
        num_layers: blocks of the stock HF model (the one mmconnect taps).
        branch: the official code's tower branch, ``"clip"`` or ``"siglip"``.
    """

    vision_dim: int
    num_layers: int
    branch: TowerBranch


#: The towers of the official checkpoints and LLaVA-1.5, by exact hub name.
KNOWN_TOWERS: dict[str, OfficialTower] = {
    "openai/clip-vit-large-patch14-336": OfficialTower(1024, 24, "clip"),
    "openai/clip-vit-large-patch14": OfficialTower(1024, 24, "clip"),
    "google/siglip-so400m-patch14-384": OfficialTower(1152, 27, "siglip"),
}


def read_official_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint config as a dict: from a mapping, a ``config.json`` or its directory."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, str | Path):
        raise TypeError(
            "source must be a config mapping, a config.json path or a checkpoint directory, "
            f"got {type(source).__name__}"
        )
    path = Path(source)
    return read_json(path / CONFIG_NAME if path.is_dir() else path)


def connector_config_from_official(
    source: str | Path | Mapping[str, Any],
    *,
    vision_dim: int | None = None,
    num_layers: int | None = None,
    tower_branch: TowerBranch | None = None,
) -> ConnectorConfig:
    """The :class:`ConnectorConfig` computing what an official checkpoint's connector computes.

    Args:
        source: the checkpoint's ``config.json`` (a path, its directory or the loaded mapping).
        vision_dim: the tower width ``C``; default: from ``mm_hidden_size`` (checked against the
            known tower's width).
        num_layers: blocks of the stock HF tower mmconnect taps; required unless
            ``mm_vision_tower`` is one of :data:`KNOWN_TOWERS` (then checked against it).
        tower_branch: ``"clip"`` or ``"siglip"``, the official code's tower branch; required
            with ``num_layers`` for towers outside :data:`KNOWN_TOWERS`.

    Returns:
        The connector config; layer indices are non-negative HF ``hidden_states`` indices.

    Raises:
        ValueError: a field is missing or has a value the official code does not support, the
            tower is unknown and the explicit arguments are missing, or the arguments contradict
            the config or the known tower.
        TypeError: a count or layer index (in the config or the arguments) is not an int.
    """
    config = read_official_config(source)
    fusion = _fusion(config)
    llm_dim = _required_int(config, "hidden_size")
    tower = _tower(config, num_layers=num_layers, tower_branch=tower_branch)
    width = _vision_dim(config, fusion, explicit=vision_dim, known=tower)
    if tower.branch == "clip":
        feature = config.get("mm_vision_select_feature", "patch")
        if feature != "patch":
            raise ValueError(
                f"mm_vision_select_feature={feature!r} is not supported: the connector drops the "
                "CLS token as the official code does with 'patch'"
            )
        select = config.get("mm_vision_select_layer", -1)  # LLaVA's training default
        final = normalize_layer(select, tower.num_layers, argument="mm_vision_select_layer")
    else:  # the official SigLIP tower drops its last block and reads the last hidden state
        final = tower.num_layers - 1
    half = 12 if tower.branch == "clip" else 13
    specs: dict[str, FusionSpec] = {
        "none": SingleLayerSpec(final_layer=final),
        "sti": STISpec(final_layer=final, extra_layers=_STI_SCI_LAYERS, window=8, pool="raster"),
        "sci": SCISpec(final_layer=final, extra_layers=_STI_SCI_LAYERS),
        "dci": DCISpec(
            final_layer=final, groups=(tuple(range(0, half)), tuple(range(half, 2 * half)))
        ),
    }
    return ConnectorConfig(
        vision_dim=width,
        llm_dim=llm_dim,
        num_layers=tower.num_layers,
        fusion=specs[fusion],
        # LLaVA's names ("mlp2x_gelu", "linear") parse into projector specs; "linear" is
        # LLaVA's default.
        projector=config.get("mm_projector_type") or "linear",
    )


def _fusion(config: Mapping[str, Any]) -> str:
    kind = config.get("mm_dense_connector_type")
    if kind in _BASELINE_TYPES:
        return "none"
    if kind not in _DENSE_TYPES:
        raise ValueError(
            f"mm_dense_connector_type={kind!r} is not one the official code knows: expected one of "
            f"{_DENSE_TYPES}, or absent / null / 'none' for a plain LLaVA checkpoint"
        )
    return kind


def _required_int(config: Mapping[str, Any], key: str) -> int:
    return check_positive_int(config.get(key), key, hint="a field of the checkpoint's config.json")


def _tower(
    config: Mapping[str, Any], *, num_layers: int | None, tower_branch: str | None
) -> OfficialTower:
    name = config.get("mm_vision_tower", config.get("vision_tower"))
    if tower_branch is not None:
        check_choice(tower_branch, "tower_branch", TOWER_BRANCHES)
    known = KNOWN_TOWERS.get(name) if isinstance(name, str) else None
    if known is None:
        if num_layers is None or tower_branch is None:
            raise ValueError(
                f"mm_vision_tower={name!r} is not one of the known official towers "
                f"({', '.join(sorted(KNOWN_TOWERS))}): pass num_layers= (blocks of the stock HF "
                "tower) and tower_branch= ('clip' or 'siglip', the official code's branch for it)"
            )
        check_positive_int(num_layers, "num_layers", hint="the blocks of the stock HF tower")
        return OfficialTower(vision_dim=0, num_layers=num_layers, branch=tower_branch)
    for argument, given, expected in (
        ("num_layers", num_layers, known.num_layers),
        ("tower_branch", tower_branch, known.branch),
    ):
        if given is not None and given != expected:
            raise ValueError(
                f"{argument}={given!r} contradicts the known tower {name!r} ({argument}={expected!r})"
            )
    return known


def _vision_dim(
    config: Mapping[str, Any], fusion: str, *, explicit: int | None, known: OfficialTower
) -> int:
    projector_in = _required_int(config, "mm_hidden_size")
    copies = 3 if fusion in ("sci", "dci") else 1  # final layer + two extra layers / groups
    if projector_in % copies:
        raise ValueError(
            f"mm_hidden_size={projector_in} must be {copies} x the tower width for "
            f"mm_dense_connector_type={fusion!r}"
        )
    width = projector_in // copies
    for name, expected in (("vision_dim", explicit), ("the known tower's width", known.vision_dim)):
        if expected and expected != width:
            raise ValueError(
                f"mm_hidden_size={projector_in} gives a tower width of {width} for "
                f"{fusion!r}, but {name} is {expected}"
            )
    return width
