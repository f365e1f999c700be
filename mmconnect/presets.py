"""Published Dense Connector configurations, reproducing the official code exactly.

Indices are HF ``hidden_states`` positions (the paper's 1-based "layer i" is ``i - 1``):

=============================  ========  ==============================================  ======
preset                         fusion    layers (CLIP-L/336: 24 blocks; SigLIP: 27)      tokens
=============================  ========  ==============================================  ======
baseline-clip-l-336            none      F = H[23] (LLaVA-1.5 ``hidden_states[-2]``)     576
dc-sti-clip-l-336              sti       F, H[7], H[15] each pooled 1-D by 8              720
dc-sci-clip-l-336              sci       [F, H[7], H[15]] along channels (3072)           576
dc-dci-clip-l-336              dci       [F, mean H[0..11], mean H[12..23]] (3072)        576
dc-dci-clip-l-336-efficient    dci       as above, bilinear to 12x12                      144
dc-sti-siglip-so400m           sti       F = H[26], H[7], H[15] pooled 1-D by 8           911
dc-sci-siglip-so400m           sci       [F, H[7], H[15]] (3456)                          729
dc-dci-siglip-so400m           dci       [F, mean H[0..12], mean H[13..25]] (3456)        729
=============================  ========  ==============================================  ======

Every preset projects with ``mlp2x_gelu`` to ``llm_dim=4096`` (Vicuna-7B). Override
``vision_dim``, ``llm_dim`` (and anything else) to run a preset on a tiny encoder of the same depth.
"""

from __future__ import annotations

from typing import Any

_CLIP_L_336: dict[str, Any] = {
    "vision_dim": 1024,
    "llm_dim": 4096,
    "num_layers": 24,
    "final_layer": 23,
}
# The official SigLIP tower drops block 27, so F = H[26] (= stock HF hidden_states[-2]).
_SIGLIP_SO400M: dict[str, Any] = {
    "vision_dim": 1152,
    "llm_dim": 4096,
    "num_layers": 27,
    "final_layer": 26,
}
_STI = {"fusion": "sti", "layers": (7, 15), "sti_window": 8, "sti_pool": "raster"}
_SCI = {"fusion": "sci", "layers": (7, 15)}

_PRESETS: dict[str, dict[str, Any]] = {
    "baseline-clip-l-336": {**_CLIP_L_336, "fusion": "none"},
    "dc-sti-clip-l-336": {**_CLIP_L_336, **_STI},
    "dc-sci-clip-l-336": {**_CLIP_L_336, **_SCI},
    "dc-dci-clip-l-336": {
        **_CLIP_L_336,
        "fusion": "dci",
        "groups": (tuple(range(0, 12)), tuple(range(12, 24))),
    },
    "dc-dci-clip-l-336-efficient": {
        **_CLIP_L_336,
        "fusion": "dci",
        "groups": (tuple(range(0, 12)), tuple(range(12, 24))),
        "resample_grid": (12, 12),
        "resample_mode": "bilinear",
        "resample_placement": "before_projector",
    },
    "dc-sti-siglip-so400m": {**_SIGLIP_SO400M, **_STI},
    "dc-sci-siglip-so400m": {**_SIGLIP_SO400M, **_SCI},
    "dc-dci-siglip-so400m": {
        **_SIGLIP_SO400M,
        "fusion": "dci",
        "groups": (tuple(range(0, 13)), tuple(range(13, 26))),
    },
}


def list_presets() -> list[str]:
    """The names of the built-in presets, sorted."""
    return sorted(_PRESETS)


def preset_fields(name: str) -> dict[str, Any]:
    """The :class:`mmconnect.ConnectorConfig` fields of the preset ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return dict(_PRESETS[name])
