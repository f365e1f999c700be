"""``benchmarks/test_zoo_throughput.py``'s floor: the weight GEMMs a connector's forward runs.

The zoo benchmark records, on the meta device, every GEMM call with one of the connector's
parameters as an operand and replays exactly those without biases. These tests pin what is
recorded for small connectors whose GEMMs are known by hand (LLaVA's MLP: two ``F.linear``;
Gemma 3: one ``tokens @ projection``; a Perceiver: its Linears, but not its attention scores).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.fusion import DCISpec, SingleLayerSpec
from mmconnect.projectors import MLPSpec
from mmconnect.zoo.perceiver import PerceiverSpec
from mmconnect.zoo.pooled import Gemma3PoolSpec
from tests.support.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # the benchmark modules import harness by name

import test_zoo_throughput as zoo

DCI = DCISpec(final_layer=3, groups=((0, 1), (2, 3)))


def test_mlp_records_its_two_linears_and_replays_them_without_bias():
    config = ConnectorConfig(
        vision_dim=8, llm_dim=16, num_layers=4, fusion=DCI, projector=MLPSpec()
    )
    calls, connector_gflop, gemm_gflop = zoo._on_meta(config, (2, 3), batch=2)
    assert calls == [
        (
            F.linear,
            (
                zoo._Input((2, 6, 24)),
                zoo._Weight("projector.0.weight"),
                zoo._Weight("projector.0.bias"),
            ),
            {},
        ),
        (
            F.linear,
            (
                zoo._Input((2, 6, 16)),
                zoo._Weight("projector.2.weight"),
                zoo._Weight("projector.2.bias"),
            ),
            {},
        ),
    ]
    flops = 2 * 2 * 6 * (24 * 16 + 16 * 16)
    assert connector_gflop == gemm_gflop == flops / 1e9
    connector = DenseConnector(config)
    run, parameters = zoo._replay(calls, connector, torch.zeros)
    assert parameters == 24 * 16 + 16 * 16  # the two weights; biases are not part of the floor
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    assert counter.get_total_flops() == flops


def test_a_raw_weight_matmul_is_recorded():
    config = ConnectorConfig(
        vision_dim=8,
        llm_dim=16,
        num_layers=4,
        fusion=SingleLayerSpec(final_layer=3),
        projector=Gemma3PoolSpec(grid=(2, 2)),
    )
    calls, connector_gflop, gemm_gflop = zoo._on_meta(config, (4, 4), batch=3)
    assert calls == [
        (torch.matmul, (zoo._Input((3, 4, 8)), zoo._Weight("projector.projection")), {})
    ]
    assert connector_gflop == gemm_gflop == 2 * 3 * 4 * 8 * 16 / 1e9


def test_attention_scores_are_not_part_of_the_floor():
    spec = PerceiverSpec(
        n_latents=4, depth=1, heads=2, head_dim=4, kv_heads=1, intermediate_size=32
    )
    config = ConnectorConfig(
        vision_dim=8,
        llm_dim=16,
        num_layers=4,
        fusion=SingleLayerSpec(final_layer=3),
        projector=spec,
    )
    calls, connector_gflop, gemm_gflop = zoo._on_meta(config, (3, 3), batch=1)
    assert calls and all(func is F.linear for func, _, _ in calls)
    # Every recorded GEMM reads a Linear weight; the score / value matmuls are left out.
    assert all(args[1].name.endswith(".weight") for _, args, _ in calls)
    assert 0 < gemm_gflop < connector_gflop
