"""Presets for SigLIP-SO400M as LLaVA-OneVision uses it: 26 blocks at 384 px.

OneVision's tower is SigLIP-SO400M/14 at 384 px (a 27x27 grid, no prefix token) with its last
block removed: Hugging Face's OneVision configs build the SigLIP vision model with
``num_hidden_layers=26`` and read ``vision_feature_layer=-1`` with
``vision_feature_select_strategy="full"``. SigLIP's ``hidden_states[-1]`` is the raw output of
the last block, *before* ``post_layernorm``; so the native connector reads **layer 26** of the
26-block tower, in the ``hidden_states`` convention (layer 0: the patch embeddings). That is the
same tensor as ``hidden_states[-2]`` of the full 27-block SO400M, which the official Dense
Connector's SigLIP presets call ``F = H[26]`` too; here ``num_layers=26``, so a 27-block preset
(``dc-dci-siglip-so400m``, the zoo's ``*+onevision-pool-siglip-so400m``) is refused by the
26-block tower with a clear error, and these presets are refused by a 27-block one.

=============================  =====  =====  =====  ======  ======  ======
geometry                       size   patch  grid   blocks  width   prefix
=============================  =====  =====  =====  ======  ======  ======
``ONEVISION_SIGLIP_SO400M``    384    14     27x27  26      1152    0
=============================  =====  =====  =====  ======  ======  ======

The presets project to Qwen2-7B's width (3584, LLaVA-OneVision-7B; override ``llm_dim`` for
0.5B: 896, 72B: 8192):

=========================================  ====================================  =========  ====  =====
preset                                     fusion (layers)                       projector  crop  frame
=========================================  ====================================  =========  ====  =====
``onevision-mlp-siglip-so400m-26``         H[26] (native)                        mlp2x      729   196
``dc-sci-onevision-siglip-so400m-26``      SCI: H[26], H[7], H[15] (3456 ch)     mlp2x      729   196
``dc-dci-onevision-siglip-so400m-26``      DCI: H[26], mean H[0..12],            mlp2x      729   196
                                           mean H[13..25] (3456 ch)
``dc-dci+onevision-pool-siglip-so400m-26`` DCI as above                          mlp2x +    196   49
                                                                                 pool 2x
=========================================  ====================================  =========  ====  =====

``crop``: tokens per AnyRes crop (and per image of a multi-image sample, which then adds one
newline token); ``frame``: tokens per video frame after OneVision's 2x bilinear pooling of the
crop's grid (``ceil(27/2) = 14``; ``ceil(14/2) = 7`` after the pooled projector), and each video
adds one newline token. The SCI and DCI layers are the official Dense Connector's SigLIP
choices, which already read block 26 as ``F``: on OneVision's tower they need no change but the
depth. The last preset feeds DCI into the zoo's ``onevision_pool`` projector (LLaVA's MLP, then
OneVision's 2x bilinear pooling) on every crop, so images cost about a quarter of the tokens.

An image alone in its sample is tiled AnyRes-style over OneVision's 36 pinpoints (1 x 1 to 6 x 6
tiles of 384 px) and capped at ``anyres_max_9``: once the unpadded map of stitched tiles holds
more than 9 crops' worth of tokens by a factor ``ratio**2`` with ``ratio > 1.1``, it is resized
bilinearly to ``floor(H / ratio) x floor(W / ratio)``. Tokens per image ``(height, width)``
(base crop + rows with their newline tokens), equal to the stock ``LlavaOnevisionProcessor``'s
counts for the native connector:

============  =====  ===============  =============================
image (h, w)  tiles  native/SCI/DCI   DCI + onevision pool
============  =====  ===============  =============================
384 x 384     1x1    1485             406
480 x 640     2x2    2929             834
768 x 768     2x2    3699             1008
1152 x 1152   3x3    7371             2002
1080 x 1920   3x5    7269 (capped)    1932
2304 x 2304   6x6    7371 (capped)    2002
============  =====  ===============  =============================

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> ConnectorConfig.from_preset("dc-dci-onevision-siglip-so400m-26").num_tokens((27, 27))
    729
"""

from __future__ import annotations

from mmconnect.fusion import DCISpec, SCISpec, SingleLayerSpec
from mmconnect.presets import EncoderGeometry, register_preset
from mmconnect.zoo.pooled import OnevisionPoolSpec

__all__ = ["DCI_GROUPS", "FINAL_LAYER", "ONEVISION_SIGLIP_SO400M", "SCI_LAYERS"]

#: SigLIP-SO400M/14 at 384 px without its last block, as LLaVA-OneVision builds it.
ONEVISION_SIGLIP_SO400M = EncoderGeometry(
    image_size=384, patch_size=14, num_layers=26, num_prefix_tokens=0, width=1152
)
#: The native connector's input: HF ``hidden_states[-1]`` of the 26 blocks (no post-LayerNorm).
FINAL_LAYER = 26
#: SCI's extra layers: the official Dense Connector's SigLIP choice, H[7] and H[15].
SCI_LAYERS = (7, 15)
#: DCI's groups: layers 0-12 and 13-25 (embeddings and the blocks before the last, in halves).
DCI_GROUPS = (tuple(range(0, 13)), tuple(range(13, 26)))

_TOWER = {"vision_dim": 1152, "num_layers": 26, "llm_dim": 3584}
_DCI = DCISpec(final_layer=FINAL_LAYER, groups=DCI_GROUPS)

for _name, _fields in (
    ("onevision-mlp-siglip-so400m-26", {"fusion": SingleLayerSpec(final_layer=FINAL_LAYER)}),
    (
        "dc-sci-onevision-siglip-so400m-26",
        {"fusion": SCISpec(final_layer=FINAL_LAYER, extra_layers=SCI_LAYERS)},
    ),
    ("dc-dci-onevision-siglip-so400m-26", {"fusion": _DCI}),
    ("dc-dci+onevision-pool-siglip-so400m-26", {"fusion": _DCI, "projector": OnevisionPoolSpec()}),
):
    register_preset(_name, {**_TOWER, **_fields}, geometry=ONEVISION_SIGLIP_SO400M)
