"""Prefill cost per image of today's MLLM families: their native connector vs a Dense Connector.

For each family of :data:`family_models.FAMILY_CASES` (Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM,
LLaVA-OneVision, InternVL, Gemma 3), one stock HF model is built from its config with random
weights (the published vision tower at real size, the LLM at its real hidden width cut to a few
layers: ``benchmarks/family_models.py``), and two Dense models around it with
``from_<family>`` (tower, LLM and head shared):

* ``native``: the family's own connector expressed through the zoo (its preset; the stock
  connector's weights reused), which gives the stock model's logits;
* ``dense``: the family's DCI preset into the same native connector: the same visual tokens.

The unit is one image at the family's default resolution for Qwen (448x448) and LLaVA-OneVision
(384x384: its base crop and one AnyRes crop), one tile or crop for the tiling families (their
default processors make up to 13-17 of them per image; each costs the same). What ``generate()``
does before its first new token is timed in two parts, in the same run:

* ``image-native`` / ``image-dense``: the Dense model's own ``get_image_features`` on the unit's
  pixels (tower -> tap -> connector, the family's tiling / packing included);
* ``llm``: the LLM prefill of 64 text tokens (32 before, 32 after, embedded by the LLM's table)
  around the unit's visual tokens (random embeddings at the table's scale: their values do not
  change the cost), ``language_model(inputs_embeds=..., use_cache=True)`` with Qwen3-VL's
  DeepStack levels added after its first LLM layers, then the head on the last position. Both
  connectors make the same count (checked), so one prefill serves both.

Per image = image path + LLM prefill; the report divides the Dense total by the native total.
M-RoPE positions and Gemma 3's bidirectional image blocks change no FLOP count and are left out
(the text model's default positions, a causal mask). No target is asserted. At real size on the
CPU a family whose tower needs more than ``family_models.CPU_GFLOP_LIMIT`` per call (Gemma 3's
896 px crop) is skipped with its estimate named; ``MMCONNECT_BENCH_CPU_GFLOP_LIMIT`` raises it.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from family_models import (
    FAMILY_CASES,
    FAMILY_ROUNDS,
    FAMILY_WARMUP_ROUNDS,
    FamilyCase,
    skip_above_cpu_limit,
)
from harness import DEVICE, DTYPE, record, synchronized

import mmconnect.integrations  # noqa: F401  (registers the families)

GROUP = "family-prefill"
CONNECTORS = ("native", "dense")
#: Text tokens around the image (32 before, 32 after), as ``test_prefill.py``'s prompt.
TEXT_TOKENS = 64


@pytest.fixture(scope="module", params=[case.family for case in FAMILY_CASES])
def family(request) -> dict[str, Any]:
    """``{"case": FamilyCase, "native": model, "dense": model, "tokens": {...}}`` of one family,
    built once and dropped when the next family's tests start (a module-scoped parameter)."""
    case = next(case for case in FAMILY_CASES if case.family == request.param)
    skip_above_cpu_limit(case.tower_gflop(), f"{case.model}'s tower on {case.unit}")
    # from_<family> warns that the wider DCI connector cannot reuse the stock connector's
    # weights: expected here, and not worth a line in the benchmark's output.
    logging.getLogger("mmconnect").setLevel(logging.ERROR)
    stock = case.stock_model().to(DEVICE, DTYPE)
    models = {
        connector: case.dense_model(stock, _preset(case, connector)) for connector in CONNECTORS
    }
    return {"case": case, **models, "tokens": {}}


def _preset(case: FamilyCase, connector: str) -> str:
    return case.native_preset if connector == "native" else case.dense_preset


def _pixels(model: Any, case: FamilyCase) -> dict[str, torch.Tensor]:
    pixels = {name: value.to(DEVICE) for name, value in case.pixels(model.config).items()}
    pixels["pixel_values"] = pixels["pixel_values"].to(DTYPE)
    return pixels


def _visual_tokens(features: Any) -> torch.Tensor:
    """``get_image_features``' output -> the unit's ``[N, D]`` visual tokens."""
    pooled = features.pooler_output
    tokens = torch.cat(list(pooled), dim=0) if isinstance(pooled, list | tuple) else pooled
    return tokens.reshape(-1, tokens.shape[-1])


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("connector", CONNECTORS)
def test_family_image_path(benchmark, family, connector, measurements):
    case: FamilyCase = family["case"]
    model = family[connector]
    pixels = _pixels(model, case)

    @synchronized
    def image_path():
        return _visual_tokens(model.model.get_image_features(**pixels))

    with torch.no_grad():
        tokens = benchmark.pedantic(
            image_path, rounds=FAMILY_ROUNDS, iterations=1, warmup_rounds=FAMILY_WARMUP_ROUNDS
        )
    assert tokens.shape[-1] == model.config.text_config.hidden_size
    assert torch.isfinite(tokens).all()
    family["tokens"][connector] = tokens.shape[0]
    record(
        benchmark,
        measurements,
        GROUP,
        f"{case.family}:image-{connector}",
        family=case.family,
        model=case.model,
        part=f"image-{connector}",
        preset=_preset(case, connector),
        unit=case.unit,
        visual_tokens=tokens.shape[0],
    )


def _prompt(model: Any, visual_tokens: int) -> tuple[torch.Tensor, slice]:
    """``[1, 64 + visual_tokens, D]``: 32 text tokens, the visual tokens, 32 text tokens, and
    where the visual ones are. Text ids are random (seed 0) and embedded by the LLM's own
    table; the visual tokens are random at the weights' scale (``initializer_range``)."""
    generator = torch.Generator().manual_seed(0)
    text_config = model.config.text_config
    ids = torch.randint(text_config.vocab_size - 8, (1, TEXT_TOKENS), generator=generator)
    text = model.get_input_embeddings()(ids.to(DEVICE))
    visual = torch.randn(1, visual_tokens, text_config.hidden_size, generator=generator)
    visual = (visual * text_config.initializer_range).to(text.device, text.dtype)
    before = TEXT_TOKENS // 2
    embeddings = torch.cat([text[:, :before], visual, text[:, before:]], dim=1)
    return embeddings, slice(before, before + visual_tokens)


def _deepstack_levels(model: Any) -> int:
    """DeepStack levels the connector hands the LLM (0 without DeepStack)."""
    injection = model.model.connector.config.injection
    return len(injection.layers) if injection is not None else 0


@pytest.mark.benchmark(group=GROUP)
def test_family_llm_prefill(benchmark, family, measurements):
    case: FamilyCase = family["case"]
    counts = family["tokens"]
    if set(counts) != set(CONNECTORS):
        pytest.skip("the LLM prefill runs after both image paths gave their token counts")
    assert counts["native"] == counts["dense"], counts  # one prefill serves both connectors
    model = family["dense"]
    embeddings, visual = _prompt(model, counts["dense"])
    extra: dict[str, Any] = {}
    levels = _deepstack_levels(model)
    if levels:  # Qwen3-VL: each level added to the visual tokens after one early LLM layer
        positions = torch.zeros(embeddings.shape[:2], dtype=torch.bool, device=DEVICE)
        positions[:, visual] = True
        extra = {
            "visual_pos_masks": positions,
            "deepstack_visual_embeds": [embeddings[0, visual].clone() for _ in range(levels)],
        }
    mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=DEVICE)
    language_model = model.model.language_model

    @synchronized
    def prefill():
        output = language_model(
            inputs_embeds=embeddings, attention_mask=mask, use_cache=True, **extra
        )
        return model.lm_head(output.last_hidden_state[:, -1:]), output.past_key_values

    with torch.no_grad():
        logits, cache = benchmark.pedantic(
            prefill, rounds=FAMILY_ROUNDS, iterations=1, warmup_rounds=FAMILY_WARMUP_ROUNDS
        )
    text_config = model.config.text_config
    assert logits.shape == (1, 1, text_config.vocab_size)
    assert cache.get_seq_length() == embeddings.shape[1]
    record(
        benchmark,
        measurements,
        GROUP,
        f"{case.family}:llm",
        family=case.family,
        model=case.model,
        part="llm",
        unit=case.unit,
        visual_tokens=counts["dense"],
        total_tokens=embeddings.shape[1],
        deepstack_levels=levels,
        llm=(
            f"{text_config.model_type}, width {text_config.hidden_size}, MLP "
            f"{text_config.intermediate_size}, {text_config.num_attention_heads} query / "
            f"{text_config.num_key_value_heads} KV heads, {text_config.num_hidden_layers} "
            f"layers, vocabulary {text_config.vocab_size}"
        ),
    )
