"""Connector presets for Qwen2.5-VL's vision tower (Qwen2.5-VL-3B / 7B / 32B / 72B).

The tower: 32 blocks 1280 wide, 14 px patches (two frames per temporal patch), no class token,
2-D rotary positions instead of a position table, window attention in 112 px windows (8 x 8
patches) except in the full-attention blocks 7, 15, 23 and 31, and no final norm (its merger
reads the last block's output, ``hidden_states[32]``). Qwen2.5-VL's processor resizes every
image to sides that are multiples of 28 px (14 px patches, 2x2 merge), so an image of
``H x W`` processed pixels gives an ``(H/14, W/14)`` patch grid; the resolution is dynamic, and
the presets count their tokens at a 448 x 448 reference image (:data:`QWEN2_5_VL_VIT_448`).

Layer indices are HF ``hidden_states`` indices (``H[k]`` is the output of block ``k - 1``;
``H[32]`` the last block's).

============================================  =======================================  ==========
preset                                        connector                                tokens
============================================  =======================================  ==========
``qwen2.5-vl-7b-merger-448`` (native)         Qwen2.5-VL's own: its merger on           ``HW/784``
                                              ``H[32]``
``dc-dci+qwen2.5-merger-qwen2.5-vl-448``      DCI (``H[32]``, mean ``H[0..15]``, mean  ``HW/784``
                                              ``H[16..31]``) -> Qwen2.5-VL's merger
``dc-sci+qwen2.5-merger-qwen2.5-vl-448``      SCI (``H[32], H[11], H[21]``) -> merger   ``HW/784``
``dc-dci-qwen2.5-vl-448``                     DCI as above -> ``mlp2x_gelu`` (no        ``HW/196``
                                              merge: one token per patch)
============================================  =======================================  ==========

DCI's groups split the 32 layers below the final one, ``H[0] .. H[31]``, into two contiguous
halves, as the Dense Connector splits a tower's layers below its final one; SCI takes the final
layer and ``H[11]``, ``H[21]`` (a third and two thirds of the depth, rounded). The merger is
Qwen2.5-VL's (:data:`~mmconnect.zoo.patch_merger.QWEN2_5_VL_MERGER`: RMSNorm per token, 2x2
concat, Linear-GELU-Linear); behind DCI or SCI its norm is 3 x 1280 = 3840 wide per token and its
Linears 15360 wide per merged token instead of 5120. All presets map to Qwen2.5-VL-7B's LLM
width, 3584 (give ``llm_dim=`` for another size: 2048 for 3B, 5120 for 32B, 8192 for 72B).

Tokens per image (exact; processed sizes, multiples of 28 px):

==============  ===========  =============  =========================
image (px)      patch grid   merged tokens  ``dc-dci-qwen2.5-vl-448``
==============  ===========  =============  =========================
224 x 224       16 x 16      64             256
448 x 448       32 x 32      256            1024
644 x 868       46 x 62      713            2852
812 x 1204      58 x 86      1247           4988
1120 x 1120     80 x 80      1600           6400
==============  ===========  =============  =========================

A video's temporal slices (2 frames each) count as images of the frames' size.

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> config = ConnectorConfig.from_preset("dc-dci+qwen2.5-merger-qwen2.5-vl-448")
    >>> config.num_tokens((46, 62)), config.fusion.final_layer
    (713, 32)
"""

from __future__ import annotations

from typing import Any

from mmconnect.fusion import DCISpec, SCISpec, SingleLayerSpec
from mmconnect.presets import EncoderGeometry, register_preset
from mmconnect.projectors import MLPSpec
from mmconnect.zoo.patch_merger import QWEN2_5_VL_MERGER

#: The tower's depth; its merger reads ``hidden_states[32]``.
QWEN2_5_VL_DEPTH = 32

#: Qwen2.5-VL's vision tower at the 448 x 448 reference image (32 x 32 patches of 14 px).
QWEN2_5_VL_VIT_448 = EncoderGeometry(
    image_size=448, patch_size=14, num_layers=QWEN2_5_VL_DEPTH, num_prefix_tokens=0, width=1280
)

#: DCI on Qwen2.5-VL's tower: the merger's layer ``H[32]`` and the means of ``H[0..15]`` and
#: ``H[16..31]``.
QWEN2_5_VL_DCI = DCISpec(
    final_layer=QWEN2_5_VL_DEPTH, groups=(tuple(range(0, 16)), tuple(range(16, QWEN2_5_VL_DEPTH)))
)
#: SCI on Qwen2.5-VL's tower: ``H[32]``, then ``H[11]`` and ``H[21]``.
QWEN2_5_VL_SCI = SCISpec(final_layer=QWEN2_5_VL_DEPTH, extra_layers=(11, 21))

#: Qwen2.5-VL-7B's widths: the tower's 1280, the LLM's 3584.
_QWEN2_5_VL_7B: dict[str, Any] = {
    "vision_dim": 1280,
    "llm_dim": 3584,
    "num_layers": QWEN2_5_VL_DEPTH,
}

register_preset(
    "qwen2.5-vl-7b-merger-448",
    {
        **_QWEN2_5_VL_7B,
        "fusion": SingleLayerSpec(final_layer=QWEN2_5_VL_DEPTH),
        "projector": QWEN2_5_VL_MERGER,
    },
    geometry=QWEN2_5_VL_VIT_448,
)
register_preset(
    "dc-dci+qwen2.5-merger-qwen2.5-vl-448",
    {**_QWEN2_5_VL_7B, "fusion": QWEN2_5_VL_DCI, "projector": QWEN2_5_VL_MERGER},
    geometry=QWEN2_5_VL_VIT_448,
)
register_preset(
    "dc-sci+qwen2.5-merger-qwen2.5-vl-448",
    {**_QWEN2_5_VL_7B, "fusion": QWEN2_5_VL_SCI, "projector": QWEN2_5_VL_MERGER},
    geometry=QWEN2_5_VL_VIT_448,
)
register_preset(
    "dc-dci-qwen2.5-vl-448",
    {**_QWEN2_5_VL_7B, "fusion": QWEN2_5_VL_DCI, "projector": MLPSpec()},
    geometry=QWEN2_5_VL_VIT_448,
)
