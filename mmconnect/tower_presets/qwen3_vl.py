"""Connector presets for Qwen3-VL's vision tower (Qwen3-VL-8B / 30B-A3B / 235B-A22B).

The tower (:data:`~mmconnect.zoo.deepstack.QWEN3_VL_VIT_768`): 27 blocks 1152 wide, 16 px
patches, no class token, a learned 48x48 position grid interpolated to each image's grid, and
no final norm (the merger reads the last block's output, ``hidden_states[27]``). Qwen3-VL takes
images of any side that is a multiple of 32 px (16 px patches, 2x2 merge); its processor resizes
every image to such a size. An image of ``H x W`` pixels gives a ``(H/16, W/16)`` patch grid.

Layer indices are HF ``hidden_states`` indices (``H[k]`` is the output of block ``k - 1``;
Qwen3-VL's ``deepstack_visual_indexes = [8, 16, 24]`` are ``H[9], H[17], H[25]``).

========================================  =======================================  ============
preset                                    connector                                tokens
========================================  =======================================  ============
``qwen3-vl-8b+deepstack-768`` (the zoo)   Qwen3-VL's own: merger on ``H[27]`` +    ``HW/1024``
                                          DeepStack mergers on ``H[9, 17, 25]``
``dc-dci+qwen3-merger-qwen3-vl-768``      DCI (``H[27]``, mean ``H[0..13]``, mean  ``HW/1024``
                                          ``H[14..26]``) -> Qwen3-VL's merger
``dc-dci+qwen3-merger+deepstack-qwen3-``  the same plus Qwen3-VL's DeepStack        ``HW/1024``
``vl-768``                                levels ``H[9, 17, 25]``
``dc-sci+qwen3-merger-qwen3-vl-768``      SCI (``H[27], H[9], H[18]``) -> merger    ``HW/1024``
``dc-dci-qwen3-vl-768``                   DCI as above -> ``mlp2x_gelu`` (no        ``HW/256``
                                          merge: one token per patch)
========================================  =======================================  ============

DCI's groups split the 27 layers below the final one, ``H[0] .. H[26]``, into two contiguous
halves (14 and 13 layers), as the Dense Connector splits a tower's layers below its final one;
SCI takes the final layer and the thirds ``H[9]``, ``H[18]`` of the depth. The mergers are
Qwen3-VL's (:data:`~mmconnect.zoo.patch_merger.QWEN3_VL_MERGER`, LayerNorm before the 2x2
shuffle; the DeepStack ones :data:`~mmconnect.zoo.patch_merger.QWEN3_VL_DEEPSTACK_MERGER`, norm
after it); behind DCI the final merger's norm and first Linear are 3 x 1152 = 3456 wide per
token (13824 per merged token) instead of 1152.

Tokens per image (exact; the merged presets give ``(H/32) * (W/32)``, ``dc-dci-qwen3-vl-768``
``(H/16) * (W/16)``):

==============  ===========  =============  ============================
image (px)      patch grid   merged tokens  ``dc-dci-qwen3-vl-768``
==============  ===========  =============  ============================
448 x 448       28 x 28      196            784
512 x 512       32 x 32      256            1024
768 x 768       48 x 48      576            2304
1024 x 768      64 x 48      768            3072
640 x 1280      40 x 80      800            3200
==============  ===========  =============  ============================

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> config = ConnectorConfig.from_preset("dc-dci+qwen3-merger+deepstack-qwen3-vl-768")
    >>> config.num_tokens((64, 48)), config.injection.layers
    (768, (9, 17, 25))
"""

from __future__ import annotations

from typing import Any

from mmconnect.fusion import DCISpec, SCISpec
from mmconnect.presets import register_preset
from mmconnect.projectors import MLPSpec
from mmconnect.zoo.deepstack import QWEN3_VL_8B_DEEPSTACK, QWEN3_VL_VIT_768
from mmconnect.zoo.patch_merger import QWEN3_VL_MERGER

#: The tower's depth; its merger reads ``hidden_states[27]``.
QWEN3_VL_DEPTH = 27

#: DCI on Qwen3-VL's tower: the merger's layer ``H[27]`` and the means of ``H[0..13]`` and
#: ``H[14..26]`` (the 27 layers below it, split into contiguous halves).
QWEN3_VL_DCI = DCISpec(
    final_layer=QWEN3_VL_DEPTH, groups=(tuple(range(0, 14)), tuple(range(14, QWEN3_VL_DEPTH)))
)
#: SCI on Qwen3-VL's tower: ``H[27]``, then ``H[9]`` and ``H[18]`` (a third and two thirds of
#: the depth).
QWEN3_VL_SCI = SCISpec(final_layer=QWEN3_VL_DEPTH, extra_layers=(9, 18))

#: Qwen3-VL-8B's widths: the tower's 1152, the LLM's 4096.
_QWEN3_VL_8B: dict[str, Any] = {"vision_dim": 1152, "llm_dim": 4096, "num_layers": QWEN3_VL_DEPTH}

register_preset(
    "dc-dci+qwen3-merger-qwen3-vl-768",
    {**_QWEN3_VL_8B, "fusion": QWEN3_VL_DCI, "projector": QWEN3_VL_MERGER},
    geometry=QWEN3_VL_VIT_768,
)
register_preset(
    "dc-dci+qwen3-merger+deepstack-qwen3-vl-768",
    {
        **_QWEN3_VL_8B,
        "fusion": QWEN3_VL_DCI,
        "projector": QWEN3_VL_MERGER,
        "injection": QWEN3_VL_8B_DEEPSTACK,
    },
    geometry=QWEN3_VL_VIT_768,
)
register_preset(
    "dc-sci+qwen3-merger-qwen3-vl-768",
    {**_QWEN3_VL_8B, "fusion": QWEN3_VL_SCI, "projector": QWEN3_VL_MERGER},
    geometry=QWEN3_VL_VIT_768,
)
register_preset(
    "dc-dci-qwen3-vl-768",
    {**_QWEN3_VL_8B, "fusion": QWEN3_VL_DCI, "projector": MLPSpec()},
    geometry=QWEN3_VL_VIT_768,
)
