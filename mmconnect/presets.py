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

Every preset projects with ``mlp2x_gelu`` (``MLPSpec(depth=2)``) to ``llm_dim=4096`` (Vicuna-7B).
Override ``vision_dim``, ``llm_dim`` (and any spec, e.g. ``resample=ResampleSpec(grid=(8, 8))``)
to run a preset on a tiny encoder of the same depth.

Each preset is registered with the geometry of the encoder it was made for
(:class:`EncoderGeometry`: image size, patch size, depth, prefix tokens, width), so tools read a
preset's native token grid from :func:`preset_geometry` instead of guessing it from the depth.
:func:`register_preset` adds presets; names are unique.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmconnect.config import ConnectorConfig
from mmconnect.fusion import DCISpec, SCISpec, SingleLayerSpec, STISpec
from mmconnect.registry import Registry
from mmconnect.resample import ResampleSpec
from mmconnect.validation import check_int, check_int_pair, check_positive_int


@dataclass(frozen=True, kw_only=True)
class EncoderGeometry:
    """The vision encoder a preset is made for.

    Attributes:
        image_size: input side in pixels, or ``(height, width)``.
        patch_size: patch side in pixels (the grid is ``image_size // patch_size`` per side, as a
            stride-``patch_size`` convolution gives).
        num_layers: the encoder's block count (the preset's ``num_layers``).
        num_prefix_tokens: tokens before the patch tokens (1: CLIP's class token; 0: SigLIP).
        width: the hidden-state width (the preset's ``vision_dim``).

    Examples:
        >>> EncoderGeometry(image_size=336, patch_size=14, num_layers=24, num_prefix_tokens=1,
        ...                 width=1024).grid
        (24, 24)
    """

    image_size: int | tuple[int, int]
    patch_size: int
    num_layers: int
    num_prefix_tokens: int
    width: int

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, list | tuple):
            object.__setattr__(self, "image_size", check_int_pair(size, "image_size"))
        else:
            check_positive_int(size, "image_size", hint="or a (height, width) pair")
        for argument in ("patch_size", "num_layers", "width"):
            check_positive_int(getattr(self, argument), argument)
        check_int(self.num_prefix_tokens, "num_prefix_tokens", minimum=0)
        height, width = self._size()
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(
                f"image_size={self.image_size!r} is smaller than patch_size={self.patch_size}"
            )

    def _size(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else size

    @property
    def grid(self) -> tuple[int, int]:
        """The ``(height, width)`` patch-token grid at ``image_size``."""
        height, width = self._size()
        return height // self.patch_size, width // self.patch_size


# Insertion order of registration; listing is sorted.
_PRESETS: Registry[tuple[dict[str, Any], EncoderGeometry]] = Registry(
    "preset",
    describe=lambda entry: (
        f"fusion {ConnectorConfig(**entry[0]).fusion.kind!r}, num_layers={entry[0].get('num_layers')}"
    ),
)


def register_preset(name: str, fields: Mapping[str, Any], *, geometry: EncoderGeometry) -> None:
    """Register a preset: :class:`mmconnect.ConnectorConfig` fields and the encoder they fit.

    Args:
        name: the exact name :meth:`ConnectorConfig.from_preset` takes.
        fields: the config's fields, as :class:`mmconnect.ConnectorConfig` takes them (specs
            for ``fusion``, ``projector``, ``resample``); validated now, as a config.
        geometry: the encoder the preset is made for; its ``num_layers`` and ``width`` must
            equal the fields' ``num_layers`` and ``vision_dim``.

    Raises:
        ValueError: ``name`` is empty or already registered, the fields make no valid config, or
            the geometry disagrees with them.
        TypeError: ``geometry`` is not an :class:`EncoderGeometry` or ``fields`` no mapping.
    """
    _PRESETS.check_available(name)
    if not isinstance(fields, Mapping):
        raise TypeError(f"preset fields must be a mapping, got {type(fields).__name__}")
    if not isinstance(geometry, EncoderGeometry):
        raise TypeError(f"geometry must be an EncoderGeometry, got {type(geometry).__name__}")
    try:
        config = ConnectorConfig(**fields)
    except (TypeError, ValueError) as error:
        raise type(error)(f"preset {name!r}: {error}") from None
    for config_field, geometry_field in (("num_layers", "num_layers"), ("vision_dim", "width")):
        if getattr(config, config_field) != getattr(geometry, geometry_field):
            raise ValueError(
                f"preset {name!r}: {config_field}={getattr(config, config_field)} but its "
                f"geometry says {geometry_field}={getattr(geometry, geometry_field)}"
            )
    _PRESETS.register(name, (dict(fields), geometry))


CLIP_L_336 = EncoderGeometry(
    image_size=336, patch_size=14, num_layers=24, num_prefix_tokens=1, width=1024
)
# 27 blocks as the presets read them (see the note on final_layer below); no class token.
SIGLIP_SO400M_384 = EncoderGeometry(
    image_size=384, patch_size=14, num_layers=27, num_prefix_tokens=0, width=1152
)

_CLIP_L_336: dict[str, Any] = {"vision_dim": 1024, "llm_dim": 4096, "num_layers": 24}
# The official SigLIP tower drops block 27, so F = H[26] (= stock HF hidden_states[-2]).
_SIGLIP_SO400M: dict[str, Any] = {"vision_dim": 1152, "llm_dim": 4096, "num_layers": 27}
_OFFICIAL_EXTRA = (7, 15)  # H[7], H[15]: the official STI / SCI layers
_DCI_CLIP = DCISpec(final_layer=23, groups=(tuple(range(0, 12)), tuple(range(12, 24))))

for _name, _fields, _geometry in (
    ("baseline-clip-l-336", {**_CLIP_L_336, "fusion": SingleLayerSpec(final_layer=23)}, CLIP_L_336),
    (
        "dc-sti-clip-l-336",
        {**_CLIP_L_336, "fusion": STISpec(final_layer=23, extra_layers=_OFFICIAL_EXTRA)},
        CLIP_L_336,
    ),
    (
        "dc-sci-clip-l-336",
        {**_CLIP_L_336, "fusion": SCISpec(final_layer=23, extra_layers=_OFFICIAL_EXTRA)},
        CLIP_L_336,
    ),
    ("dc-dci-clip-l-336", {**_CLIP_L_336, "fusion": _DCI_CLIP}, CLIP_L_336),
    (
        "dc-dci-clip-l-336-efficient",
        {**_CLIP_L_336, "fusion": _DCI_CLIP, "resample": ResampleSpec(grid=(12, 12))},
        CLIP_L_336,
    ),
    (
        "dc-sti-siglip-so400m",
        {**_SIGLIP_SO400M, "fusion": STISpec(final_layer=26, extra_layers=_OFFICIAL_EXTRA)},
        SIGLIP_SO400M_384,
    ),
    (
        "dc-sci-siglip-so400m",
        {**_SIGLIP_SO400M, "fusion": SCISpec(final_layer=26, extra_layers=_OFFICIAL_EXTRA)},
        SIGLIP_SO400M_384,
    ),
    (
        "dc-dci-siglip-so400m",
        {
            **_SIGLIP_SO400M,
            "fusion": DCISpec(final_layer=26, groups=(tuple(range(0, 13)), tuple(range(13, 26)))),
        },
        SIGLIP_SO400M_384,
    ),
):
    register_preset(_name, _fields, geometry=_geometry)

#: The Dense Connector paper's eight configurations (the connector zoo's modules register more).
PUBLISHED_PRESETS: tuple[str, ...] = (
    "baseline-clip-l-336",
    "dc-sti-clip-l-336",
    "dc-sci-clip-l-336",
    "dc-dci-clip-l-336",
    "dc-dci-clip-l-336-efficient",
    "dc-sti-siglip-so400m",
    "dc-sci-siglip-so400m",
    "dc-dci-siglip-so400m",
)


def fusions_by_depth(depth: int, *, first_layer: int) -> dict[str, SCISpec | DCISpec]:
    """SCI and DCI for a tower of ``depth`` blocks, by the rule the tower presets share.

    ``F`` is layer ``depth``; SCI adds the outputs of blocks ``depth // 3`` and
    ``2 * depth // 3`` (a third and two thirds of the depth); DCI adds the means of layers
    ``first_layer .. depth - 1`` in two halves, the first taking the middle layer when their
    number is odd. ``first_layer`` is 0 to include the embeddings (InternVL's towers), 1 to
    leave them out (the SigLIP towers of Idefics3 / SmolVLM).

    Examples:
        >>> fusions_by_depth(12, first_layer=1)["dci"].groups
        ((1, 2, 3, 4, 5, 6), (7, 8, 9, 10, 11))
    """
    check_int(depth, "depth", minimum=2)
    hint = f"DCI needs two layers from first_layer to depth - 1 = {depth - 1}"
    check_int(first_layer, "first_layer", minimum=0, maximum=depth - 2, hint=hint)
    middle = first_layer + (depth - first_layer + 1) // 2
    return {
        "sci": SCISpec(final_layer=depth, extra_layers=(depth // 3, 2 * depth // 3)),
        "dci": DCISpec(
            final_layer=depth,
            groups=(tuple(range(first_layer, middle)), tuple(range(middle, depth))),
        ),
    }


def list_presets() -> list[str]:
    """The names of the registered presets (built-in and added), sorted."""
    return sorted(_PRESETS)


def _entry(name: str) -> tuple[dict[str, Any], EncoderGeometry]:
    if not isinstance(name, str) or name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return _PRESETS[name]


def preset_geometry(name: str) -> EncoderGeometry:
    """The geometry of the encoder the preset ``name`` is made for.

    Examples:
        >>> preset_geometry("dc-sti-siglip-so400m").grid
        (27, 27)

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return _entry(name)[1]


def preset_fields(name: str) -> dict[str, Any]:
    """The :class:`mmconnect.ConnectorConfig` fields of the preset ``name`` (keyword arguments
    of the config: ``vision_dim``, ``llm_dim``, ``num_layers``, the ``fusion`` spec ...).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return dict(_entry(name)[0])
