"""Presets for the InternViT towers as InternVL uses them: InternViT-300M-448px (InternVL 2.5 / 3
1B-14B) and InternViT-6B-448px (26B-78B). Dense Connector fusions into InternVL's pixel shuffle
+ MLP, and with the Dense Connector's own MLP.

The towers (from the zoo, :mod:`mmconnect.zoo.pixel_shuffle`):

=======================  =====  =====  =====  ======  =====  ======
geometry                 size   patch  grid   blocks  width  prefix
=======================  =====  =====  =====  ======  =====  ======
``INTERNVIT_300M_448``   448    14     32x32  24      1024   1 (CLS)
``INTERNVIT_6B_448``     448    14     32x32  45      3200   1 (CLS)
=======================  =====  =====  =====  ======  =====  ======

InternViT-6B-448px (V1.5 and V2.5, as InternVL 1.5 / 2.5 / 3 load it) keeps 45 of the 48 blocks
InternViT-6B was pretrained with, 3200 wide with 25 heads, RMSNorm and QK-normalisation.

InternVL tiles every image: its processor resizes the image to the ``cols x rows`` canvas of
448 px tiles whose aspect ratio is closest to the image's (1 to 12 tiles by default) and adds a
thumbnail of the whole image when there is more than one tile. Each tile goes through the tower
and the connector alone, so every count below is **per tile**; an image fills ``tiles x
per_tile`` image tokens, a video frame is one tile. InternVL's connector reads
``vision_feature_layer=-1``, the tower's ``last_hidden_state``: layer 24 on InternViT-300M (it
mean-pools, so its final ``layernorm`` is an identity and layer 24 is block 24's output), layer
45 on InternViT-6B (after the tower's final ``layernorm`` when it has one, as the Dense
InternVL's tap reads it).

The presets (the first two and ``internvl-pixel-shuffle-internvit-6b`` live in
:mod:`mmconnect.zoo.pixel_shuffle`, the others here):

============================================  =================================  ==========  ========
preset                                        fusion (``hidden_states`` layers)  projector   per tile
============================================  =================================  ==========  ========
``internvl-pixel-shuffle-internvit-300m``     24 (native)                        shuffle 2   256
``dc-dci+pixel-shuffle-mlp-internvit-300m``   DCI: 24, mean 0-11, mean 12-23     shuffle 2   256
``dc-sci+pixel-shuffle-mlp-internvit-300m``   SCI: 24, 8, 16                     shuffle 2   256
``dc-dci-internvit-300m``                     DCI: 24, mean 0-11, mean 12-23     mlp2x_gelu  1024
``dc-dci-internvit-300m-efficient``           as above, bilinear to 16x16        mlp2x_gelu  256
``internvl-pixel-shuffle-internvit-6b``       45 (native)                        shuffle 2   256
``dc-dci+pixel-shuffle-mlp-internvit-6b``     DCI: 45, mean 0-22, mean 23-44     shuffle 2   256
``dc-sci+pixel-shuffle-mlp-internvit-6b``     SCI: 45, 15, 30                    shuffle 2   256
``dc-dci-internvit-6b``                       DCI: 45, mean 0-22, mean 23-44     mlp2x_gelu  1024
``dc-dci-internvit-6b-efficient``             as above, bilinear to 16x16        mlp2x_gelu  256
============================================  =================================  ==========  ========

"shuffle 2" is InternVL's projector (``pixel_shuffle_mlp``, factor 2: 32x32 -> 16x16, then
LayerNorm, Linear, GELU, Linear); the fusions feed it 3 x 1024 = 3072 channels (12288 after the
shuffle) on InternViT-300M, 3 x 3200 = 9600 (38400) on InternViT-6B. One rule
(:func:`dense_fusions`) gives both towers' layers: SCI adds the outputs of blocks a third and two
thirds of the depth (8 and 16; 15 and 30); DCI the means of the layers before the last (the
embeddings and the blocks before the last block) in two halves (0-11 and 12-23, as the Dense
Connector's CLIP-L presets split their 24 layers; 0-22 and 23-44). The LLM width is
InternVL3-8B's (Qwen2.5-7B, 3584) on InternViT-300M except the zoo's DCI preset (4096), and
InternVL3-38B's (Qwen2.5-32B, 5120) on InternViT-6B (InternVL3-78B's Qwen2.5-72B is 8192);
override ``llm_dim`` for another LLM.

Per image with InternVL's default tiling (1 to 12 tiles, thumbnail when tiled):

=================  =====  ======================  ==========================
image (h x w)      tiles  256 per tile (shuffle)  1024 per tile (DCI + MLP)
=================  =====  ======================  ==========================
448 x 448          1      256                     1024
448 x 896          3      768                     3072
1080 x 1920        9      2304                    9216
1024 x 1024        10     2560                    10240
768 x 1024         13     3328                    13312
=================  =====  ======================  ==========================

(``448 x 896``: a 2 x 1 canvas + thumbnail; ``1080 x 1920``: 4 x 2 + thumbnail; ``1024 x
1024``: 3 x 3 + thumbnail; ``768 x 1024``: 4 x 3 + thumbnail, the most 12 tiles allow.)

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> ConnectorConfig.from_preset("dc-sci+pixel-shuffle-mlp-internvit-300m").num_tokens((32, 32))
    256
    >>> ConnectorConfig.from_preset("dc-dci-internvit-300m").num_tokens((32, 32))
    1024
"""

from __future__ import annotations

from mmconnect.fusion import DCISpec, SCISpec
from mmconnect.presets import fusions_by_depth, register_preset
from mmconnect.resample import ResampleSpec
from mmconnect.zoo.pixel_shuffle import INTERNVIT_6B_448, INTERNVIT_300M_448, PixelShuffleMLPSpec

__all__ = [
    "DCI_GROUPS",
    "FINAL_LAYER",
    "INTERNVIT_6B_448",
    "INTERNVIT_300M_448",
    "SCI_LAYERS",
    "dense_fusions",
]

#: InternVL's connector input on InternViT-300M: layer 24, the tower's ``last_hidden_state``.
FINAL_LAYER = 24
#: SCI's extra layers on InternViT-300M: blocks 8 and 16 (a third and two thirds of 24).
SCI_LAYERS = (8, 16)
#: DCI's groups on InternViT-300M: layers 0-11 and 12-23.
DCI_GROUPS = (tuple(range(0, 12)), tuple(range(12, 24)))


def dense_fusions(depth: int) -> dict[str, SCISpec | DCISpec]:
    """The Dense fusions of an InternViT of ``depth`` blocks read as InternVL reads it.

    ``F`` is layer ``depth`` (``last_hidden_state``); SCI adds the outputs of blocks
    ``depth // 3`` and ``2 * depth // 3``; DCI adds the means of layers ``0 .. depth - 1`` (the
    embeddings and the blocks before the last) in two halves, the first taking the middle layer
    when their number is odd: :func:`mmconnect.presets.fusions_by_depth` with the embeddings.
    ``dense_fusions(24)`` gives :data:`SCI_LAYERS` / :data:`DCI_GROUPS`.
    """
    return fusions_by_depth(depth, first_layer=0)


# tower name -> (geometry, LLM width): InternVL3-8B (Qwen2.5-7B), InternVL3-38B (Qwen2.5-32B)
_TOWERS = {"300m": (INTERNVIT_300M_448, 3584), "6b": (INTERNVIT_6B_448, 5120)}

for _tower, (_geometry, _llm_dim) in _TOWERS.items():
    _common = {
        "vision_dim": _geometry.width,
        "num_layers": _geometry.num_layers,
        "llm_dim": _llm_dim,
    }
    _fusions = dense_fusions(_geometry.num_layers)
    _presets = {
        f"dc-sci+pixel-shuffle-mlp-internvit-{_tower}": {
            **_common,
            "fusion": _fusions["sci"],
            "projector": PixelShuffleMLPSpec(factor=2),
        },
        f"dc-dci-internvit-{_tower}": {**_common, "fusion": _fusions["dci"]},
        f"dc-dci-internvit-{_tower}-efficient": {
            **_common,
            "fusion": _fusions["dci"],
            "resample": ResampleSpec(grid=(16, 16)),
        },
    }
    if _tower != "300m":  # the zoo registers InternViT-300M's (at LLM width 4096)
        _presets[f"dc-dci+pixel-shuffle-mlp-internvit-{_tower}"] = {
            **_common,
            "fusion": _fusions["dci"],
            "projector": PixelShuffleMLPSpec(factor=2),
        }
    for _name, _fields in _presets.items():
        register_preset(_name, _fields, geometry=_geometry)
