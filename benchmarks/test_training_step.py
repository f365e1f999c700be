"""Training step time of stages 1 and 2 with each CLIP-L/336 connector vs the baseline connector.

One full optimizer step of a Dense LLaVA (``DenseLlavaForConditionalGeneration``): forward, the
language-model loss, backward, gradient clipping to 1.0 (the HF Trainer's default), AdamW step,
``zero_grad``. The stage comes from the library itself: :func:`prepare_stage` freezes the model
for :class:`StageConfig` ``align`` (stage 1: only the connector trains; tower and LLM frozen, the
gradient still flows back through the LLM) or ``instruct`` (stage 2, full fine-tuning: connector,
LLM and LM head train), and ``DenseConnectorTrainer.create_optimizer`` builds the optimizer
with the connector's own learning rate, exactly as :func:`train_stage` does.

The model at ``MMCONNECT_BENCH_SIZE=real`` (random weights, fp32, batch 1):

* vision tower: CLIP-L/336's shape (24 blocks, width 1024, 577 tokens);
* LLM: a small Llama (4 layers of width 1024, MLP 2816, 16 query / 4 KV heads, vocabulary
  32000: 110,633,984 parameters) — a CPU-feasible stand-in for Vicuna-7B;
* prompt: 32 text tokens, the image's visual tokens (144 to 720, by connector), 32 answer
  tokens that carry the labels.

Connectors: every preset made for CLIP-L/336 (24 blocks), projecting to the LLM's width 1024.
The tower and the LLM are built once and shared by all connectors (their values do not change
the cost). Reported, no target: the frozen tower's forward is the same for every connector, so
the ratios show what the connector and its token count add to a whole step. On a GPU the
weights stay fp32 and the step runs under ``torch.autocast`` in bf16 (mixed precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from harness import (
    DEVICE,
    DTYPE,
    DTYPE_NAME,
    SIZE,
    STEP_ROUNDS,
    WARMUP_ROUNDS,
    TowerSize,
    record,
    synchronized,
)
from llm_fixtures import SMALL_LLAMA, TINY_LLAMA, LlamaSize
from torch import nn

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.presets import list_presets, preset_geometry

GROUP = "training-step"
BASELINE = "baseline-clip-l-336"
#: Every preset made for the baseline's encoder (CLIP-L/336), the baseline first.
CONNECTORS = (
    BASELINE,
    *(
        p
        for p in list_presets()
        if p != BASELINE and preset_geometry(p) == preset_geometry(BASELINE)
    ),
)
#: ``stage id -> StageConfig.stage``; stage 2 fine-tunes the LLM fully (no LoRA).
STAGES = {"stage1-align": "align", "stage2-instruct-full": "instruct"}
#: Images per step.
BATCH = 1 if SIZE == "real" else 2


@dataclass
class SharedParts:
    """The vision tower, LLM body and LM head every connector's model shares."""

    vision_config: object
    text_config: object
    tower: nn.Module
    language_model: nn.Module
    lm_head: nn.Module
    image_token: int


@pytest.fixture(scope="module")
def training_llama_size() -> LlamaSize:
    return SMALL_LLAMA if SIZE == "real" else TINY_LLAMA


@pytest.fixture(scope="module")
def shared_parts(clip_size: TowerSize, training_llama_size: LlamaSize) -> SharedParts:
    """Tower (CLIP-L/336 shape), Llama body and head, fp32 on the benchmark device, built once."""
    from transformers import AutoModel

    from mmconnect.integrations.applications.tiny_models import tiny_vision_config

    torch.manual_seed(0)
    vision_config = tiny_vision_config(
        "clip",
        blocks=clip_size.blocks,
        width=clip_size.width,
        intermediate_size=clip_size.intermediate,
        heads=clip_size.heads,
        image_size=clip_size.image,
        patch_size=clip_size.patch,
    )
    text_config = training_llama_size.config()
    head = nn.Linear(training_llama_size.hidden, training_llama_size.vocab, bias=False)
    nn.init.normal_(head.weight, std=text_config.initializer_range)
    return SharedParts(
        vision_config=vision_config,
        text_config=text_config,
        tower=AutoModel.from_config(vision_config).to(DEVICE),
        language_model=AutoModel.from_config(text_config).to(DEVICE),
        lm_head=head.to(DEVICE),
        image_token=training_llama_size.vocab - 1,
    )


def _assemble(preset: str, parts: SharedParts, clip_size: TowerSize) -> nn.Module:
    """A ``DenseLlavaForConditionalGeneration`` with ``preset``'s connector around ``parts``.

    The model is built on the meta device (no memory, no initialisation), then its tower, LLM
    and head are the shared ones and its connector a freshly seeded one.
    """
    from mmconnect.integrations.families.llava import (
        DenseLlavaConfig,
        DenseLlavaForConditionalGeneration,
    )

    connector_config = ConnectorConfig.from_preset(
        preset, vision_dim=clip_size.width, llm_dim=parts.text_config.hidden_size
    )
    config = DenseLlavaConfig(
        vision_config=parts.vision_config,
        text_config=parts.text_config,
        image_token_index=parts.image_token,
        connector=connector_config.to_dict(),
    )
    with torch.device("meta"):
        model = DenseLlavaForConditionalGeneration(config)
    model.model.vision_tower = parts.tower
    model.model.language_model = parts.language_model
    model.lm_head = parts.lm_head
    torch.manual_seed(0)
    model.model.multi_modal_projector = DenseConnector(connector_config).to(DEVICE)
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise RuntimeError(f"assembled model still holds meta tensors: {left[:5]}")
    return model


def _batch(model: nn.Module, parts: SharedParts, size: TowerSize, text_tokens: int) -> dict:
    """Input ids (text, image tokens, answer), labels on the answer only, pixels; on the device."""
    image_tokens = model.model.image_token_count()
    before = text_tokens // 2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(parts.image_token, (BATCH, text_tokens + image_tokens), generator=generator)
    ids[:, before : before + image_tokens] = parts.image_token
    labels = ids.clone()
    labels[:, : before + image_tokens] = -100  # prompt and image: no loss
    pixels = torch.randn(BATCH, 3, size.image, size.image, generator=generator)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": pixels,
    }
    return {name: tensor.to(DEVICE) for name, tensor in batch.items()}


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_training_step(
    benchmark,
    stage,
    connector,
    shared_parts,
    clip_size,
    training_llama_size,
    measurements,
    tmp_path,
):
    from mmconnect.integrations.training.stages import (
        DenseConnectorTrainer,
        StageConfig,
        parameter_groups,
        prepare_stage,
    )

    model = _assemble(connector, shared_parts, clip_size)
    stage_config = StageConfig(stage=STAGES[stage], output_dir=str(tmp_path), disable_tqdm=True)
    trainable = prepare_stage(model, stage_config)
    trainable.train()
    trainer = DenseConnectorTrainer(
        model=trainable,
        args=stage_config.training_arguments(),
        connector_learning_rate=stage_config.rates[1],
    )
    optimizer = trainer.create_optimizer()
    parameters = [parameter for parameter in trainable.parameters() if parameter.requires_grad]
    max_grad_norm = trainer.args.max_grad_norm
    batch = _batch(model, shared_parts, clip_size, training_llama_size.text_tokens)
    mixed_precision = DTYPE_NAME != "float32"

    @synchronized
    def step() -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=DTYPE, enabled=mixed_precision):
            loss = trainable(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # At least one untimed step everywhere: the first one also allocates AdamW's state.
    loss = benchmark.pedantic(
        step, rounds=STEP_ROUNDS, iterations=1, warmup_rounds=max(WARMUP_ROUNDS, 1)
    )
    assert math.isfinite(loss.item()), loss
    groups = parameter_groups(trainable)
    llm_trains = groups["llm"][0] > 0
    assert llm_trains == (STAGES[stage] == "instruct"), groups
    assert groups["vision_tower"][0] == 0, groups
    record(
        benchmark,
        measurements,
        f"{GROUP}:{stage}",
        connector,
        visual_tokens=model.model.image_token_count(),
        batch=BATCH,
        trainable_parameters=sum(count for count, _ in groups.values()),
        connector_parameters=groups["connector"][1],
    )
