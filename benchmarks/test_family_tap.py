"""Capturing a Dense Connector's DCI inputs on today's towers: tap vs ``output_hidden_states``.

The method of ``test_tap_capture.py`` (CLIP-L/336) on the towers of today's MLLM families, at
their real size with random weights (``benchmarks/family_models.py``), one image each:

* ``qwen2.5-vl-448``: Qwen2.5-VL-7B's tower (32 blocks, width 1280, 16 heads, patch 14, merge 2,
  window attention in 112 px windows, full attention in blocks 7 / 15 / 23 / 31) on one packed
  448x448 image (1024 patches), tapped by ``packed_tower_features`` (what the Dense Qwen2.5-VL
  runs) for ``dc-dci+qwen2.5-merger-qwen2.5-vl-448``;
* ``siglip-so400m-384``: SigLIP-SO400M/14 (27 blocks, width 1152) at 384 px (27x27 patches),
  tapped by ``tower_features`` after ``post_layernorm`` as Dense SmolVLM does, for
  ``dc-dci+pixel-shuffle-smolvlm``;
* ``siglip-so400m-896``: the same tower at 896 px (64x64 patches) as Gemma 3 runs it, for
  ``dc-dci+gemma3-pool-siglip-so400m-896`` (skipped at real size on the CPU above
  ``family_models.CPU_GFLOP_LIMIT``: about 5,400 GFLOP per call).

Three ways to run each: ``plain-forward`` (the stock tower's forward, capturing nothing; for
Qwen2.5-VL it includes the stock merger, about 1.7% of the tower's FLOPs), ``output-hidden-states``
(the same forward keeping every block's hidden states) and ``tap-dci-streaming`` (the DCI tap:
``F`` plus one running sum per group, stopping after the deepest block it reads). Each variant
first runs once under the peak-memory tracker (``benchmarks/memory.py``; also its warm-up), then
``family_models.FAMILY_ROUNDS`` timed calls. Target (real size, CPU): the tap's memory above the
plain forward at most a quarter of ``output_hidden_states``'s; times are reported, not asserted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from family_models import (
    FAMILY_ROUNDS,
    build_random,
    qwen2_5_vl_config,
    siglip_so400m_config,
    skip_above_cpu_limit,
    tower_gflop,
)
from harness import DEVICE, DTYPE, SIZE, WARMUP_ROUNDS, record, synchronized, targets_apply
from memory import peak_bytes

from mmconnect import ConnectorConfig, DenseConnector

GROUP = "family-tap"
VARIANTS = ("plain-forward", "output-hidden-states", "tap-dci-streaming")
#: Target: the tap's capture overhead (peak above the plain forward's) / output_hidden_states's.
TARGET_OVERHEAD_RATIO = 0.25


@dataclass(frozen=True)
class TapTower:
    """One benchmarked tower: how to build it, its one image's inputs and its DCI preset."""

    name: str
    encoder: str
    preset: str
    build: Callable[[], Any]
    inputs: Callable[[Any], dict[str, torch.Tensor]]
    tokens: int
    gflop: float


def _qwen_tower() -> Any:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    return Qwen2_5_VisionTransformerPretrainedModel._from_config(qwen2_5_vl_config().vision_config)


def _qwen_inputs(tower: Any) -> dict[str, torch.Tensor]:
    """One 448x448 image as Qwen2.5-VL's processor packs it: ``[1024, 1176]`` and its grid."""
    config = tower.config
    values = config.in_channels * config.temporal_patch_size * config.patch_size**2
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(32 * 32, values, generator=generator),
        "grid_thw": torch.tensor([[1, 32, 32]]),
    }


def _siglip_tower(side: int) -> Callable[[], Any]:
    def build() -> Any:
        from transformers import SiglipVisionModel

        return SiglipVisionModel._from_config(siglip_so400m_config(side))

    return build


def _siglip_inputs(tower: Any) -> dict[str, torch.Tensor]:
    side = tower.config.image_size
    generator = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(1, 3, side, side, generator=generator)}


#: The 896 px tower at tiny size runs at 448 px: its 64x64 grid's attention would dominate.
_SIGLIP_WIDE = 896 if SIZE == "real" else 448
TAP_TOWERS = (
    TapTower(
        name="qwen2.5-vl-448",
        encoder="Qwen2.5-VL-7B tower, one 448x448 image",
        preset="dc-dci+qwen2.5-merger-qwen2.5-vl-448",
        build=_qwen_tower,
        inputs=_qwen_inputs,
        tokens=1024,
        gflop=tower_gflop(blocks=32, width=1280, mlp=3420, tokens=1024, gated=True),
    ),
    TapTower(
        name="siglip-so400m-384",
        encoder="SigLIP-SO400M/14, one 384x384 image",
        preset="dc-dci+pixel-shuffle-smolvlm",
        build=_siglip_tower(384),
        inputs=_siglip_inputs,
        tokens=27 * 27,
        gflop=tower_gflop(blocks=27, width=1152, mlp=4304, tokens=27 * 27),
    ),
    TapTower(
        name="siglip-so400m-896",
        encoder=f"SigLIP-SO400M/14, one {_SIGLIP_WIDE}x{_SIGLIP_WIDE} image",
        preset="dc-dci+gemma3-pool-siglip-so400m-896",
        build=_siglip_tower(_SIGLIP_WIDE),
        inputs=_siglip_inputs,
        tokens=(_SIGLIP_WIDE // 14) ** 2,
        gflop=tower_gflop(blocks=27, width=1152, mlp=4304, tokens=(_SIGLIP_WIDE // 14) ** 2),
    ),
)


@pytest.fixture(scope="module", params=[tower.name for tower in TAP_TOWERS])
def tap_tower(request) -> dict[str, Any]:
    """``{"spec": TapTower, "tower": module, "inputs": {...}, "connector": DenseConnector}``,
    built once per tower and dropped when the next tower's tests start."""
    spec = next(tower for tower in TAP_TOWERS if tower.name == request.param)
    skip_above_cpu_limit(spec.gflop, spec.encoder)
    tower = build_random(spec.build).to(DEVICE, DTYPE)
    inputs = {name: value.to(DEVICE) for name, value in spec.inputs(tower).items()}
    floating = next(name for name in ("hidden_states", "pixel_values") if name in inputs)
    inputs[floating] = inputs[floating].to(DTYPE)
    width = tower.config.hidden_size
    llm_dim = getattr(tower.config, "out_hidden_size", None) or (2048 if SIZE == "real" else 64)
    config = ConnectorConfig.from_preset(spec.preset, vision_dim=width, llm_dim=llm_dim)
    connector = DenseConnector(config).to(DEVICE, DTYPE)  # its tap only: weights unused
    return {"spec": spec, "tower": tower, "inputs": inputs, "connector": connector}


def _capture_function(variant: str, tower: Any, inputs: dict, connector: DenseConnector):
    from mmconnect.integrations.families.base import tower_features
    from mmconnect.integrations.families.packed_vision import packed_tower_features

    packed = "grid_thw" in inputs
    if variant == "plain-forward":
        return lambda: tower(**inputs).last_hidden_state
    if variant == "output-hidden-states":
        return lambda: tower(**inputs, output_hidden_states=True).hidden_states
    if packed:
        pixels, grid = inputs["hidden_states"], inputs["grid_thw"]
        return lambda: packed_tower_features(connector, tower, pixels, grid)[0]
    final_norm = tower.post_layernorm
    pixels = inputs["pixel_values"]
    return lambda: tower_features(connector, tower, pixels, final_norm=final_norm)[0]


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", VARIANTS)
def test_family_capture(benchmark, tap_tower, variant, measurements):
    spec: TapTower = tap_tower["spec"]
    capture = synchronized(
        _capture_function(variant, tap_tower["tower"], tap_tower["inputs"], tap_tower["connector"])
    )
    # The tracked call warms the CPU run up; CUDA still gets its warm-up rounds (kernel choice).
    warmup = WARMUP_ROUNDS if DEVICE == "cuda" else 0
    with torch.no_grad():
        peak = peak_bytes(capture, DEVICE)
        benchmark.pedantic(capture, rounds=FAMILY_ROUNDS, iterations=1, warmup_rounds=warmup)
    record(
        benchmark,
        measurements,
        GROUP,
        f"{spec.name}:{variant}",
        peak_bytes=peak,
        encoder=spec.encoder,
        preset=spec.preset,
        tokens=spec.tokens,
        blocks=tap_tower["connector"].config.num_layers,
        width=tap_tower["tower"].config.hidden_size,
    )


@pytest.mark.parametrize("tower", [tower.name for tower in TAP_TOWERS])
def test_family_capture_target(tower, measurements):
    results = measurements.get(GROUP, {})
    found = {variant: results.get(f"{tower}:{variant}") for variant in VARIANTS}
    if not targets_apply() or None in found.values():
        pytest.skip(
            "the target is checked at real size on the CPU after the tower's three variants ran"
        )
    plain, hidden, tap = (found[variant]["peak_bytes"] for variant in VARIANTS)
    assert tap - plain <= TARGET_OVERHEAD_RATIO * (hidden - plain), (tower, found)
