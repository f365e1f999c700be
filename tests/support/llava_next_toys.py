"""The tiny LLaVA-NeXT (AnyRes) models and inputs of the LLaVA-NeXT family tests, shared with the
bf16 suite.

Built with :mod:`mmconnect.integrations.applications.tiny_models`: a CLIP tower (width 16,
8 blocks, 56 px images of 14 px patches: a 4 x 4 grid per crop, 1 CLS), a 2-layer Llama (width 32,
vocabulary 120) and pinpoints that are multiples of 56; the stock HF model reads
``vision_feature_layer=[-2, 3, 5]`` (HF's own SCI).
"""

from __future__ import annotations

import torch
from transformers import LlavaNextConfig

from mmconnect import ConnectorConfig, DCISpec, ResampleSpec, SCISpec, STISpec
from mmconnect.integrations.applications.tiny_models import (
    tiny_text_config,
    tiny_vision_config,
    word_level_tokenizer,
)
from mmconnect.integrations.families.anyres import tile_grid

VOCAB, IMAGE_TOKEN, PAD, BOS, EOS = 120, 119, 1, 2, 3
TILE, PATCH, VISION, LLM, BLOCKS = 56, 14, 16, 32, 8
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]

_COMMON = {"vision_dim": VISION, "llm_dim": LLM, "num_layers": BLOCKS}
_DCI = DCISpec(groups=((0, 1, 2, 3), (4, 5, 6, 7)))
#: The connectors the tests convert the stock model to.
CONNECTORS = {
    "sci": ConnectorConfig(fusion=SCISpec(extra_layers=(3, 5)), **_COMMON),
    "dci": ConnectorConfig(fusion=_DCI, **_COMMON),
    # 16 tokens pooled by 8: 2 per layer, 4 per crop after the 4 x 4 grid
    "sti": ConnectorConfig(fusion=STISpec(extra_layers=(3, 5)), **_COMMON),
    "efficient": ConnectorConfig(fusion=_DCI, resample=ResampleSpec(grid=(2, 2)), **_COMMON),
}


def llava_next_config() -> LlavaNextConfig:
    """The stock HF LLaVA-NeXT config: the tower and LLM above, SCI on layers -2, 3 and 5."""
    return LlavaNextConfig(
        vision_config=tiny_vision_config(
            "clip", blocks=BLOCKS, width=VISION, image_size=TILE, patch_size=PATCH
        ),
        text_config=tiny_text_config(
            vocab_size=VOCAB, width=LLM, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS
        ),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=[-2, 3, 5],
        vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS,
    )


def tokenizer():
    """Word-level: ``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3, ``w0`` .. ``w114``, then
    ``<image>`` 119."""
    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 5)]
    return word_level_tokenizer(
        {word: index for index, word in enumerate(words)} | {"<image>": IMAGE_TOKEN}
    )


def crops(size: tuple[int, int]) -> int:
    """Crops of an image of ``size`` (height, width): the base crop and its AnyRes tiles."""
    rows, columns = tile_grid(size, PINPOINTS, TILE)
    return 1 + rows * columns


def pixels(sizes, seed: int = 0) -> torch.Tensor:
    """``[images, max crops, 3, 56, 56]``, zero-padded past each image's crops (as HF's processor)."""
    generator = torch.Generator().manual_seed(seed)
    counts = [crops(size) for size in sizes]
    values = torch.zeros(len(sizes), max(counts), 3, TILE, TILE)
    for image, count in enumerate(counts):
        values[image, :count] = torch.randn(count, 3, TILE, TILE, generator=generator)
    return values


def prompt(count: int, before: int = 2, after: int = 3) -> list[int]:
    """``<s>``, ``before`` words, ``count`` image tokens, ``after`` words."""
    return [BOS, *range(10, 10 + before), *[IMAGE_TOKEN] * count, *range(40, 40 + after)]


def inputs(model, sizes, seed: int = 0) -> dict:
    """One prompt per image, right-padded, each with the model's own image-token count."""
    prompts = [
        prompt(model.model.image_token_count(size), before=1 + i) for i, size in enumerate(sizes)
    ]
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), PAD)
    mask = torch.zeros_like(ids)
    for row, ids_of_row in enumerate(prompts):
        ids[row, : len(ids_of_row)] = torch.tensor(ids_of_row)
        mask[row, : len(ids_of_row)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels(sizes, seed),
        "image_sizes": torch.tensor(sizes),
    }
