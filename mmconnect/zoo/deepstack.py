"""DeepStack presets: Qwen3-VL's multi-level injection, and Dense Connectors with it.

DeepStack (Meng et al., 2024, arXiv:2406.04334; Qwen3-VL's connector, transformers
``models/qwen3_vl/modeling_qwen3_vl.py``) keeps some vision layers apart from the visual tokens:
each goes through its own projector and is *added* to the LLM's hidden states at the image
positions, level ``i`` after LLM decoder layer ``i``. With ``H[k]`` the vision tower's
``hidden_states[k]`` (``[B, h*w, C]``), ``l_i`` the injected layers and ``h_j`` the LLM's hidden
states after decoder layer ``j`` (``[B, S, D]``), ``M`` the image positions of the prompt::

    T        = P(fuse(H))                        [B, N, D]  fills the <image> tokens of the prompt
    R_i      = P_i(H[l_i])                       [B, N, D]  i = 0 .. len(layers) - 1
    h_i[M]  <- LLMLayer_i(h_{i-1})[M] + R_i      (layers i >= len(layers) run unchanged)

The mechanism is part of the core connector contract, not of this module:
:class:`mmconnect.DeepStackSpec` in ``ConnectorConfig(injection=...)`` builds the per-level
projectors ``P_i`` (the connector's ``injection`` module list, trained with it),
:meth:`mmconnect.connector.DenseConnector.forward_with_injections` returns
``(T, (R_0, R_1, ...))`` with every ``R_i`` checked to have ``T``'s token count, and the Dense
LLaVA and Mini-Gemini families add the residuals to their LLM
(``mmconnect.integrations.families.base.injecting_forward``).
This module registers the presets.

Layer indices: Qwen3-VL's ``deepstack_visual_indexes = [8, 16, 24]`` count the tower's *blocks*
from 0; mmconnect indexes ``hidden_states`` (``H[k]`` is the output of block ``k - 1``), so the
same layers are ``layers=(9, 17, 25)``, and the final merger reads ``H[27]`` (the last block's
output; Qwen3-VL's tower has no final norm).

Presets (token counts at each geometry's grid):

* ``qwen3-vl-8b+deepstack-768``: Qwen3-VL-8B's connector — the final 2x2 patch merger
  (:data:`~mmconnect.zoo.patch_merger.QWEN3_VL_MERGER`) on ``H[27]`` and three DeepStack mergers
  (:data:`~mmconnect.zoo.patch_merger.QWEN3_VL_DEEPSTACK_MERGER`, norm after the 2x2 shuffle) on
  ``H[9], H[17], H[25]``, 1152 -> 4096 wide, on :data:`QWEN3_VL_VIT_768` (48x48 patches, the
  tower's native position grid): 576 tokens;
* ``dc-dci+deepstack-clip-l-336``: the Dense Connector's DCI tokens through ``mlp2x_gelu`` on
  CLIP-L/336 plus DeepStack levels ``H[9], H[17]`` (Qwen3-VL's blocks 8 and 16), each through
  its own ``mlp2x_gelu``: 576 tokens;
* ``dc-dci+qwen3-merger+deepstack-clip-l-336``: the same with Qwen3-VL's mergers (the final one
  on the 3072-wide DCI tokens, the DeepStack ones on ``H[9], H[17]``): 144 tokens.

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> config = ConnectorConfig.from_preset("qwen3-vl-8b+deepstack-768")
    >>> config.injection.layers, config.num_tokens((48, 48))
    ((9, 17, 25), 576)
"""

from __future__ import annotations

from typing import Any

from mmconnect.fusion import DCISpec, SingleLayerSpec
from mmconnect.injection import DeepStackSpec
from mmconnect.presets import CLIP_L_336, EncoderGeometry, register_preset
from mmconnect.projectors import MLPSpec
from mmconnect.zoo.patch_merger import QWEN3_VL_DEEPSTACK_MERGER, QWEN3_VL_MERGER

#: Qwen3-VL's vision tower (Qwen3-VL-8B / 30B-A3B / 235B-A22B: 27 blocks 1152 wide, patch 16, no
#: class token) at 768 px, the side of its 48x48 learned position grid
#: (``num_position_embeddings=2304``); Qwen3-VL itself takes any multiple of 32 px.
QWEN3_VL_VIT_768 = EncoderGeometry(
    image_size=768, patch_size=16, num_layers=27, num_prefix_tokens=0, width=1152
)

#: Qwen3-VL-8B's DeepStack levels: blocks 8, 16, 24 (``deepstack_visual_indexes``) as
#: ``hidden_states`` indices.
QWEN3_VL_8B_DEEPSTACK = DeepStackSpec(layers=(9, 17, 25), projector=QWEN3_VL_DEEPSTACK_MERGER)

_DCI_CLIP = DCISpec(final_layer=23, groups=(tuple(range(0, 12)), tuple(range(12, 24))))
_CLIP_L: dict[str, Any] = {"vision_dim": 1024, "llm_dim": 4096, "num_layers": 24}
#: CLIP-L's hidden_states 9 and 17: the outputs of blocks 8 and 16, as Qwen3-VL's first levels.
_CLIP_LEVELS = (9, 17)

register_preset(
    "qwen3-vl-8b+deepstack-768",
    {
        "vision_dim": 1152,
        "llm_dim": 4096,
        "num_layers": 27,
        "fusion": SingleLayerSpec(final_layer=27),
        "projector": QWEN3_VL_MERGER,
        "injection": QWEN3_VL_8B_DEEPSTACK,
    },
    geometry=QWEN3_VL_VIT_768,
)
register_preset(
    "dc-dci+deepstack-clip-l-336",
    {
        **_CLIP_L,
        "fusion": _DCI_CLIP,
        "projector": MLPSpec(),
        "injection": DeepStackSpec(layers=_CLIP_LEVELS, projector=MLPSpec()),
    },
    geometry=CLIP_L_336,
)
register_preset(
    "dc-dci+qwen3-merger+deepstack-clip-l-336",
    {
        **_CLIP_L,
        "fusion": _DCI_CLIP,
        "projector": QWEN3_VL_MERGER,
        "injection": DeepStackSpec(layers=_CLIP_LEVELS, projector=QWEN3_VL_DEEPSTACK_MERGER),
    },
    geometry=CLIP_L_336,
)
