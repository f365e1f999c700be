"""The connector (fuse + project) vs the bare matmuls of its projector, every published preset.

Every preset of :data:`mmconnect.presets.PUBLISHED_PRESETS` (the paper's eight; the zoo's are in
``test_zoo_throughput.py``) runs at the real size of the encoder it is made for (its
:func:`mmconnect.preset_geometry`: CLIP-L/336, 1024 wide, 24 x 24 patches; SigLIP-SO400M/384,
1152 wide, 27 x 27 patches; any other encoder at its own geometry), batch 4, projecting to 4096.
The connector runs on what its tap delivers (the final layer plus extra layers or streamed group
means) and is compared with the two matrix multiplies its ``mlp2x_gelu`` projector cannot avoid,
on an already fused input: the practical limit. Target: within 1.2x of that limit. Throughput is
reported in visual tokens (the connector's output tokens) per second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import (
    DEVICE,
    DTYPE,
    SHORT_CALL_ROUNDS,
    WARMUP_ROUNDS,
    TowerSize,
    record,
    synchronized,
    targets_apply,
    tower_size_for,
)

from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures
from mmconnect.presets import PUBLISHED_PRESETS

GROUP = "connector"
PRESETS = PUBLISHED_PRESETS  # mlp2x_gelu presets; the zoo's run in test_zoo_throughput.py
#: Target: median connector time / median bare-matmul time, at most this.
TARGET_RATIO = 1.2


def _tap_output(connector: DenseConnector, size: TowerSize) -> LayerFeatures:
    """Random features shaped like a streaming tap's output for ``connector``."""
    generator = torch.Generator().manual_seed(0)
    grid = size.grid
    shape = (size.batch, grid[0] * grid[1], size.width)

    def features() -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(DEVICE, DTYPE)

    layers = {layer: features() for layer in connector.individual_layers}
    means = {group: features() for group in connector.groups}
    return LayerFeatures(layers, grids=dict.fromkeys(layers, grid), group_means=means)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("implementation", ["connector", "bare-matmuls"])
@pytest.mark.parametrize("preset", PRESETS)
def test_connector(benchmark, preset, implementation, measurements):
    size = tower_size_for(preset)
    torch.manual_seed(0)
    config = ConnectorConfig.from_preset(preset, vision_dim=size.width, llm_dim=size.llm_dim)
    connector = DenseConnector(config).eval().to(DEVICE, DTYPE)
    features = _tap_output(connector, size)
    with torch.no_grad():
        if implementation == "connector":
            run = synchronized(lambda: connector(features))
            tokens = connector(features).shape[1]
        else:
            fused = connector.fuse(features).contiguous()
            first, second = connector.projector[0].weight, connector.projector[2].weight
            # The same GEMMs the projector's Linears run, without bias, GELU or fusion.
            run = synchronized(lambda: F.linear(F.linear(fused, first), second))
            tokens = fused.shape[1]
        benchmark.pedantic(run, rounds=SHORT_CALL_ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    record(
        benchmark,
        measurements,
        f"{GROUP}:{preset}",
        implementation,
        visual_tokens=tokens * size.batch,
        tokens_per_image=tokens,
        batch=size.batch,
        encoder=size.name,
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_connector_target(preset, measurements):
    results = measurements.get(f"{GROUP}:{preset}", {})
    if not targets_apply() or set(results) != {"connector", "bare-matmuls"}:
        pytest.skip("targets are checked at real size on the CPU after both implementations ran")
    ratio = results["connector"]["median_s"] / results["bare-matmuls"]["median_s"]
    assert ratio <= TARGET_RATIO, ratio
