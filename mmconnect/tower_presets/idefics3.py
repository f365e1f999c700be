"""Presets for the SigLIP towers as Idefics3 and SmolVLM use them (SO400M; B/16 in SmolVLM-256M
and -500M): Dense Connector fusions into their pixel shuffle.

Both families tile every image (a grid of ``rows x cols`` tiles of the tower's image size plus
one global tile of the whole image, or the whole image alone) and send each tile through the
tower and the connector on its own, so every count below is **per tile**; an image fills
``(rows * cols + 1) * per_tile`` image tokens when it is split, ``per_tile`` when it is not.

The tower (geometries here, in pixels and blocks):

=============================  =====  =====  =====  ======  ======  =========
geometry                       size   patch  grid   blocks  width   prefix
=============================  =====  =====  =====  ======  ======  =========
``SIGLIP_SO400M_364`` (zoo)    364    14     26x26  27      1152    0
``SIGLIP_SO400M_384``          384    14     27x27  27      1152    0
``SIGLIP_B16_512`` (zoo)       512    16     32x32  12      768     0
=============================  =====  =====  =====  ======  ======  =========

Idefics3-8B resizes its tiles to 364 px (a 26x26 grid, which a shuffle by 2 divides); SmolVLM
(2B) keeps SigLIP's 384 px (27x27, shuffled by 3); SmolVLM-256M and -500M use SigLIP-B/16 at
512 px (32x32, shuffled by 4) into SmolLM2-135M (576) and -360M (960). The native connectors
read the tower's ``last_hidden_state``: the last block's output **after** the tower's
``post_layernorm``. In the Dense models that is layer 27 on SO400M, 12 on B/16 (the families'
tap applies ``post_layernorm`` to it, see
:class:`mmconnect.MultiLayerFeatureTap`'s ``final_norm``); the layers below it are the embeddings and
the raw block outputs, in the ``hidden_states`` convention.

The presets (the native ones live in :mod:`mmconnect.zoo.pixel_shuffle`; the Dense ones here):

=============================================  ====================================  ======  ======  ========
preset                                         fusion (layers)                       shuffle  LLM     per tile
=============================================  ====================================  ======  ======  ========
``idefics3-pixel-shuffle-siglip-so400m-364``   27 (native)                           2       4096    169
``dc-sci+pixel-shuffle-idefics3-364``          SCI: 27, 9, 18                        2       4096    169
``dc-dci+pixel-shuffle-idefics3-364``          DCI: 27, mean 1-13, mean 14-26        2       4096    169
``smolvlm-pixel-shuffle-siglip-so400m``        27 (native)                           3       2048    81
``dc-sci+pixel-shuffle-smolvlm``               SCI: 27, 9, 18                        3       2048    81
``dc-dci+pixel-shuffle-smolvlm``               DCI: 27, mean 1-13, mean 14-26        3       2048    81
``smolvlm-256m-pixel-shuffle-siglip-b16-512``  12 (native)                           4       576     64
``dc-sci+pixel-shuffle-smolvlm-256m``          SCI: 12, 4, 8                         4       576     64
``dc-dci+pixel-shuffle-smolvlm-256m``          DCI: 12, mean 1-6, mean 7-11          4       576     64
``smolvlm-500m-pixel-shuffle-siglip-b16-512``  12 (native)                           4       960     64
``dc-sci+pixel-shuffle-smolvlm-500m``          SCI: 12, 4, 8                         4       960     64
``dc-dci+pixel-shuffle-smolvlm-500m``          DCI: 12, mean 1-6, mean 7-11          4       960     64
=============================================  ====================================  ======  ======  ========

The Dense fusions keep the native final layer (27, post-LayerNorm) as their ``F`` and concatenate
two more feature maps along the channels (3 x 1152 = 3456 channels; the shuffle makes
``f**2 * 3456``), so the token counts and the LLM side stay the native ones:

* SCI adds the raw outputs of blocks 9 and 18 (a third and two thirds of the depth);
* DCI adds the means of the blocks before the last in two halves, layers 1-13 and 14-26
  (embeddings excluded; block 27 is in ``F``).

SigLIP-B/16's 12 blocks follow the same rule (:func:`dense_fusions`): ``F`` = layer 12, SCI adds
blocks 4 and 8, DCI the means of blocks 1-6 and 7-11 (the first half takes the odd block).

Per image with splitting (Idefics3's processor: longest edge resized to 4 x 364 = 1456 px, then
both sides rounded up to multiples of 364): a 1456 x 1456 image is 4 x 4 tiles + 1 global tile
= 17 x 169 = 2873 image tokens; 728 x 1456 (h x w) is 2 x 4 + 1 = 9 tiles, 1521 tokens. SmolVLM
at 4 x 384 = 1536 px: 1536 x 1536 is 17 tiles x 81 = 1377 tokens. Unsplit images and video
frames are one tile each.

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> ConnectorConfig.from_preset("dc-dci+pixel-shuffle-idefics3-364").num_tokens((26, 26))
    169
"""

from __future__ import annotations

from mmconnect.fusion import DCISpec, SCISpec
from mmconnect.presets import SIGLIP_SO400M_384, fusions_by_depth, register_preset
from mmconnect.zoo.pixel_shuffle import SIGLIP_B16_512, SIGLIP_SO400M_364, PixelShuffleSpec

__all__ = [
    "DCI_GROUPS",
    "FINAL_LAYER",
    "SCI_LAYERS",
    "SIGLIP_B16_512",
    "SIGLIP_SO400M_364",
    "SIGLIP_SO400M_384",
    "dense_fusions",
]

#: The native connectors' input: layer 27, the tower's output after ``post_layernorm``.
FINAL_LAYER = 27
#: SCI's extra layers: the raw outputs of blocks 9 and 18 (a third and two thirds of 27).
SCI_LAYERS = (9, 18)
#: DCI's groups: blocks 1-13 and 14-26 (the 26 blocks before the last, in two halves).
DCI_GROUPS = (tuple(range(1, 14)), tuple(range(14, 27)))


def dense_fusions(depth: int) -> dict[str, SCISpec | DCISpec]:
    """The Dense fusions of a tower of ``depth`` blocks read as these families read it.

    ``F`` is layer ``depth`` (the last block, after ``post_layernorm``); SCI adds the raw outputs
    of blocks ``depth // 3`` and ``2 * depth // 3``; DCI adds the means of blocks
    ``1 .. depth - 1`` in two halves (the first takes the middle block when their number is odd):
    :func:`mmconnect.presets.fusions_by_depth` without the embeddings.
    """
    return fusions_by_depth(depth, first_layer=1)


# family suffix -> (shuffle factor, LLM width, tower geometry)
_FAMILIES = {
    "idefics3-364": (2, 4096, SIGLIP_SO400M_364),  # Idefics3-8B: Llama-3.1-8B
    "smolvlm": (3, 2048, SIGLIP_SO400M_384),  # SmolVLM-Instruct (2B): SmolLM2-1.7B
    "smolvlm-256m": (4, 576, SIGLIP_B16_512),  # SmolVLM-256M: SmolLM2-135M
    "smolvlm-500m": (4, 960, SIGLIP_B16_512),  # SmolVLM-500M: SmolLM2-360M
}

for _suffix, (_factor, _llm_dim, _geometry) in _FAMILIES.items():
    for _kind, _fusion in dense_fusions(_geometry.num_layers).items():
        register_preset(
            f"dc-{_kind}+pixel-shuffle-{_suffix}",
            {
                "vision_dim": _geometry.width,
                "num_layers": _geometry.num_layers,
                "llm_dim": _llm_dim,
                "fusion": _fusion,
                "projector": PixelShuffleSpec(factor=_factor),
            },
            geometry=_geometry,
        )
