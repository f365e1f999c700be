"""Presets for InternViT-300M-448px as InternVL 2.5 / 3 (1B, 2B, 8B) use it: Dense Connector
fusions into InternVL's pixel shuffle + MLP, and with the Dense Connector's own MLP.

The tower (:data:`~mmconnect.zoo.pixel_shuffle.INTERNVIT_300M_448`, from the zoo):

=======================  =====  =====  =====  ======  =====  ======
geometry                 size   patch  grid   blocks  width  prefix
=======================  =====  =====  =====  ======  =====  ======
``INTERNVIT_300M_448``   448    14     32x32  24      1024   1 (CLS)
=======================  =====  =====  =====  ======  =====  ======

InternVL tiles every image: its processor resizes the image to the ``cols x rows`` canvas of
448 px tiles whose aspect ratio is closest to the image's (1 to 12 tiles by default) and adds a
thumbnail of the whole image when there is more than one tile. Each tile goes through the tower
and the connector alone, so every count below is **per tile**; an image fills ``tiles x
per_tile`` image tokens, a video frame is one tile. InternVL's connector reads
``vision_feature_layer=-1``, the tower's ``last_hidden_state``: layer 24 here (InternViT-300M
mean-pools, so its final ``layernorm`` is an identity and layer 24 is block 24's output).

The presets (the first two live in :mod:`mmconnect.zoo.pixel_shuffle`, the others here):

============================================  =================================  ==========  ========
preset                                        fusion (``hidden_states`` layers)  projector   per tile
============================================  =================================  ==========  ========
``internvl-pixel-shuffle-internvit-300m``     24 (native)                        shuffle 2   256
``dc-dci+pixel-shuffle-mlp-internvit-300m``   DCI: 24, mean 0-11, mean 12-23     shuffle 2   256
``dc-sci+pixel-shuffle-mlp-internvit-300m``   SCI: 24, 8, 16                     shuffle 2   256
``dc-dci-internvit-300m``                     DCI: 24, mean 0-11, mean 12-23     mlp2x_gelu  1024
``dc-dci-internvit-300m-efficient``           as above, bilinear to 16x16        mlp2x_gelu  256
============================================  =================================  ==========  ========

"shuffle 2" is InternVL's projector (``pixel_shuffle_mlp``, factor 2: 32x32 -> 16x16, then
LayerNorm, Linear, GELU, Linear); the fusions feed it 3 x 1024 = 3072 channels (12288 after the
shuffle). SCI adds the outputs of blocks 8 and 16 (a third and two thirds of the depth); DCI the
means of layers 0-11 and 12-23 (the embeddings and the 23 blocks before the last, in two
halves), as the Dense Connector's CLIP-L presets split their 24 layers. The LLM width is
InternVL3-8B's (Qwen2.5-7B, 3584) except the zoo's DCI preset (4096); override ``llm_dim`` for
another LLM.

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

InternViT-6B (InternVL's large tower) has no geometry here: its depth as the InternVL releases
load it is not stated in the repository's references.

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> ConnectorConfig.from_preset("dc-sci+pixel-shuffle-mlp-internvit-300m").num_tokens((32, 32))
    256
    >>> ConnectorConfig.from_preset("dc-dci-internvit-300m").num_tokens((32, 32))
    1024
"""

from __future__ import annotations

from mmconnect.fusion import DCISpec, SCISpec
from mmconnect.presets import register_preset
from mmconnect.resample import ResampleSpec
from mmconnect.zoo.pixel_shuffle import INTERNVIT_300M_448, PixelShuffleMLPSpec

__all__ = ["DCI_GROUPS", "FINAL_LAYER", "INTERNVIT_300M_448", "SCI_LAYERS"]

#: InternVL's connector input: layer 24, the tower's ``last_hidden_state``.
FINAL_LAYER = 24
#: SCI's extra layers: the outputs of blocks 8 and 16 (a third and two thirds of 24).
SCI_LAYERS = (8, 16)
#: DCI's groups: layers 0-11 and 12-23.
DCI_GROUPS = (tuple(range(0, 12)), tuple(range(12, 24)))

_INTERNVIT_300M = {"vision_dim": 1024, "num_layers": 24, "llm_dim": 3584}
_DCI = DCISpec(final_layer=FINAL_LAYER, groups=DCI_GROUPS)

for _name, _fields in (
    (
        "dc-sci+pixel-shuffle-mlp-internvit-300m",
        {
            **_INTERNVIT_300M,
            "fusion": SCISpec(final_layer=FINAL_LAYER, extra_layers=SCI_LAYERS),
            "projector": PixelShuffleMLPSpec(factor=2),
        },
    ),
    ("dc-dci-internvit-300m", {**_INTERNVIT_300M, "fusion": _DCI}),
    (
        "dc-dci-internvit-300m-efficient",
        {**_INTERNVIT_300M, "fusion": _DCI, "resample": ResampleSpec(grid=(16, 16))},
    ),
):
    register_preset(_name, _fields, geometry=INTERNVIT_300M_448)
