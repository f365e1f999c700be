"""A small spec of every registered projector kind: the built-in ones and the connector zoo's.

Tests that must hold for every connector (the token contract, training behaviour) iterate over
this table and check that it covers :func:`mmconnect.list_projectors`, so a new zoo module is
tested as soon as it exists (and fails those coverage checks until it has an entry here). The
specs are tiny (a few channels, one or two layers) so every combination runs in milliseconds on
grids of 4x4 and 4x6 tokens.
"""

from __future__ import annotations

from mmconnect.zoo.abstractors import CAbstractorSpec, LDPv2Spec
from mmconnect.zoo.patch_merger import Mistral3MergerSpec, PatchMergerSpec
from mmconnect.zoo.perceiver import PerceiverSpec
from mmconnect.zoo.pixel_shuffle import PixelShuffleMLPSpec, PixelShuffleSpec
from mmconnect.zoo.pooled import Gemma3PoolSpec, OnevisionPoolSpec
from mmconnect.zoo.qformer import QFormerSpec

PROJECTOR_SPECS = {
    "identity": "identity",
    "linear": "linear",
    "mlp": "mlp2x_gelu",
    "pixel_shuffle": PixelShuffleSpec(factor=2),
    "pixel_shuffle_mlp": PixelShuffleMLPSpec(factor=2),
    "patch_merger": PatchMergerSpec(merge_size=2, hidden_dim=5),
    "mistral3_merger": Mistral3MergerSpec(merge_size=2),
    "gemma3_pool": Gemma3PoolSpec(grid=(2, 2)),
    "onevision_pool": OnevisionPoolSpec(),
    "perceiver": PerceiverSpec(
        n_latents=3, depth=1, heads=2, head_dim=2, kv_heads=1, intermediate_size=4
    ),
    "qformer": QFormerSpec(
        num_queries=3,
        depth=2,
        num_heads=2,
        hidden_size=4,
        intermediate_size=8,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    "c_abstractor": CAbstractorSpec(depth=1, hidden_dim=4, pooled_grid=(2, 2)),
    "ldpv2": LDPv2Spec(pooled_grid=(2, 2)),
}
