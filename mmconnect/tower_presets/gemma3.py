"""Presets for SigLIP-SO400M at 896 px as Gemma 3 uses it: Dense Connector fusions into Gemma 3's
pooled projector.

The tower (the zoo's :data:`~mmconnect.zoo.pooled.GEMMA3_SIGLIP_SO400M_896`):

==============================  =====  =====  =====  ======  ======  ======
geometry                        size   patch  grid   blocks  width   prefix
==============================  =====  =====  =====  ======  ======  ======
``GEMMA3_SIGLIP_SO400M_896``    896    14     64x64  27      1152    0
==============================  =====  =====  =====  ======  ======  ======

Gemma 3's native connector (:class:`~mmconnect.zoo.pooled.Gemma3PoolSpec`, registered by the
zoo as ``baseline+gemma3-pool-siglip-so400m-896``) reads the tower's ``last_hidden_state``: the
last block's output **after** the tower's ``post_layernorm``, which is layer 27 in a Dense
Gemma 3 (its tap applies ``post_layernorm`` there, see :class:`mmconnect.MultiLayerFeatureTap`'s
``final_norm``); layers 0-26 are the embeddings and the raw block outputs (the
``hidden_states`` convention). It averages 4x4 patches (64x64 -> 16x16), applies Gemma's
RMSNorm and a bias-free projection: 256 tokens per crop.

The presets (LLM width 2560, Gemma 3 4B's; override ``llm_dim`` for 12B's 3840 or 27B's 5376):

==============================================  ==============================  ====  ========
preset                                          fusion (layers)                 pool  per crop
==============================================  ==============================  ====  ========
``baseline+gemma3-pool-siglip-so400m-896``      27 (native, zoo)                4x4   256
``dc-sci+gemma3-pool-siglip-so400m-896``        SCI: 27, 9, 18                  4x4   256
``dc-dci+gemma3-pool-siglip-so400m-896``        DCI: 27, mean 1-13, mean 14-26  4x4   256
``dc-dci+gemma3-pool-64-siglip-so400m-896``     DCI: 27, mean 1-13, mean 14-26  8x8   64
==============================================  ==============================  ====  ========

The Dense fusions keep the native layer 27 as their ``F`` and concatenate two more maps along
the channels (3 x 1152 = 3456 channels into the RMSNorm and the projection), the same layers as
the Idefics3 / SmolVLM presets of this tower:

* SCI adds the raw outputs of blocks 9 and 18 (a third and two thirds of the depth);
* DCI adds the means of the blocks before the last in two halves, layers 1-13 and 14-26
  (embeddings excluded; block 27 is in ``F``);
* the ``pool-64`` preset pools 8x8 patches (64x64 -> 8x8), a quarter of the tokens, as the
  efficient Dense Connector shrinks LLaVA's 576 to 144.

Per image: every crop is a whole 896 x 896 image for the tower and fills the per-crop count.
Without pan-and-scan (Gemma 3's processor default) an image is one crop. With pan-and-scan
(``do_pan_and_scan=True``; HF's defaults: crops of at least 256 px, at most 4, from an aspect
ratio of 1.2) an image of ``k`` extra crops fills ``(1 + k) x per crop``: with the 256-token
presets, 896 x 896 (h x w) has no crops, 256 tokens; 896 x 1792 has 2 crops, 768 tokens;
600 x 2400 has 4 crops, 1280 tokens; 1800 x 600 has 3 crops, 1024 tokens (the processor puts
text between the crops, which is not counted here). Gemma 3 has no video path in Hugging Face.

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> ConnectorConfig.from_preset("dc-dci+gemma3-pool-siglip-so400m-896").num_tokens((64, 64))
    256
"""

from __future__ import annotations

from mmconnect.fusion import DCISpec, SCISpec
from mmconnect.presets import register_preset
from mmconnect.zoo.pooled import GEMMA3_SIGLIP_SO400M_896, Gemma3PoolSpec

__all__ = ["DCI_GROUPS", "FINAL_LAYER", "GEMMA3_SIGLIP_SO400M_896", "LLM_DIM", "SCI_LAYERS"]

#: The native connector's input: layer 27, the tower's output after ``post_layernorm``.
FINAL_LAYER = 27
#: SCI's extra layers: the raw outputs of blocks 9 and 18 (a third and two thirds of 27).
SCI_LAYERS = (9, 18)
#: DCI's groups: blocks 1-13 and 14-26 (the 26 blocks before the last, in two halves).
DCI_GROUPS = (tuple(range(1, 14)), tuple(range(14, 27)))
#: Gemma 3 4B's LLM width.
LLM_DIM = 2560

_COMMON = {"vision_dim": 1152, "num_layers": 27, "llm_dim": LLM_DIM}
_SCI = SCISpec(final_layer=FINAL_LAYER, extra_layers=SCI_LAYERS)
_DCI = DCISpec(final_layer=FINAL_LAYER, groups=DCI_GROUPS)

for _name, _fusion, _pool in (
    ("dc-sci+gemma3-pool-siglip-so400m-896", _SCI, (16, 16)),
    ("dc-dci+gemma3-pool-siglip-so400m-896", _DCI, (16, 16)),
    ("dc-dci+gemma3-pool-64-siglip-so400m-896", _DCI, (8, 8)),
):
    register_preset(
        _name,
        {**_COMMON, "fusion": _fusion, "projector": Gemma3PoolSpec(grid=_pool)},
        geometry=GEMMA3_SIGLIP_SO400M_896,
    )
