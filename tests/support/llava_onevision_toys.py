"""The tiny LLaVA-OneVision models and inputs of the OneVision family tests.

A SigLIP tower without the attention-pooling head (width 16, 4 blocks, 70 px crops of 14 px
patches: an odd 5 x 5 grid, so the video pooling's ``ceil(5 / 2) = 3`` is exercised, no prefix
token), a 2-layer Qwen2 (width 32, vocabulary 120) and pinpoints up to 4 x 4 tiles of 70 px, so
``anyres_max_9`` caps the largest maps (a 4 x 4 tiling stitches a 20 x 20 map: 400 tokens,
``sqrt(400 / (9 * 25)) = 1.33 > 1.1``, resized to 15 x 15). The stock HF model reads
``vision_feature_layer=-1`` with ``"full"``, as OneVision does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionVideoProcessor,
    SiglipVisionConfig,
)

from mmconnect import ConnectorConfig, DCISpec, ResampleSpec, SCISpec, SingleLayerSpec
from mmconnect.integrations.applications.tiny_models import tiny_text_config
from mmconnect.integrations.families.anyres import tile_grid
from mmconnect.zoo.pooled import OnevisionPoolSpec

VOCAB, IMAGE_TOKEN, VIDEO_TOKEN, PAD, BOS, EOS = 120, 119, 118, 1, 2, 3
TILE, PATCH, VISION, LLM, BLOCKS = 70, 14, 16, 32, 4
GRID = (TILE // PATCH, TILE // PATCH)
PINPOINTS = [
    [70, 70], [70, 140], [140, 70], [140, 140], [210, 210],
    [210, 280], [280, 210], [280, 280],
]  # fmt: skip

_COMMON = {"vision_dim": VISION, "llm_dim": LLM, "num_layers": BLOCKS}
_DCI = DCISpec(groups=((0, 1), (2, 3)))
#: The connectors the tests use; ``native`` is OneVision's own (H[-1], mlp2x_gelu).
CONNECTORS = {
    "native": ConnectorConfig(fusion=SingleLayerSpec(final_layer=-1), **_COMMON),
    "sci": ConnectorConfig(fusion=SCISpec(final_layer=-1, extra_layers=(1, 2)), **_COMMON),
    "dci": ConnectorConfig(fusion=DCISpec(final_layer=-1, groups=((0, 1), (2, 3))), **_COMMON),
    # the efficient Dense Connector: every crop's 5 x 5 grid resampled to 3 x 3
    "efficient": ConnectorConfig(fusion=_DCI, resample=ResampleSpec(grid=(3, 3)), **_COMMON),
    # DCI into the zoo's OneVision projector: every crop pooled to 3 x 3 already
    "pool": ConnectorConfig(fusion=_DCI, projector=OnevisionPoolSpec(), **_COMMON),
}


def vision_config() -> SiglipVisionConfig:
    """The tiny SigLIP tower, without the pooling head (as OneVision's)."""
    return SiglipVisionConfig(
        hidden_size=VISION,
        intermediate_size=2 * VISION,
        num_hidden_layers=BLOCKS,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        vision_use_head=False,
    )


def onevision_config(**changes) -> LlavaOnevisionConfig:
    """The stock HF LLaVA-OneVision config of the tiny parts (``changes`` override fields)."""
    fields = {
        "vision_config": vision_config(),
        "text_config": tiny_text_config(
            "qwen2",
            vocab_size=VOCAB,
            width=LLM,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        ),
        "image_token_index": IMAGE_TOKEN,
        "video_token_index": VIDEO_TOKEN,
        "image_grid_pinpoints": PINPOINTS,
    }
    return LlavaOnevisionConfig(**(fields | changes))


def tokenizer():
    """Word-level: ``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3, ``w0`` .. ``w113``, then
    ``<video>`` 118 and ``<image>`` 119."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 6)]
    vocabulary = {word: index for index, word in enumerate(words)}
    vocabulary |= {"<video>": VIDEO_TOKEN, "<image>": IMAGE_TOKEN}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def image_processor() -> LlavaOnevisionImageProcessor:
    return LlavaOnevisionImageProcessor(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )


def video_processor() -> LlavaOnevisionVideoProcessor:
    return LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE})


def crops(size: tuple[int, int]) -> int:
    """Crops of an image of ``size`` (height, width) alone in its sample: base and tiles."""
    rows, columns = tile_grid(size, PINPOINTS, TILE)
    return 1 + rows * columns


def pixels(sizes, seed: int = 0, counts=None) -> torch.Tensor:
    """``[images, max crops, 3, 70, 70]``, zero-padded past each image's crops (as HF's
    processor); ``counts`` overrides the crops per image (1 for multi-image samples)."""
    generator = torch.Generator().manual_seed(seed)
    counts = [crops(size) for size in sizes] if counts is None else counts
    values = torch.zeros(len(sizes), max(counts), 3, TILE, TILE)
    for image, count in enumerate(counts):
        values[image, :count] = torch.randn(count, 3, TILE, TILE, generator=generator)
    return values


def video(videos: int, frames: int, seed: int = 0) -> torch.Tensor:
    """``[videos, frames, 3, 70, 70]`` of noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(videos, frames, 3, TILE, TILE, generator=generator)


def prompt(images: int = 0, videos: int = 0, before: int = 2, after: int = 3) -> list[int]:
    """``<s>``, ``before`` words, ``images`` image tokens, ``videos`` video tokens, ``after``
    words."""
    return [
        BOS,
        *range(10, 10 + before),
        *[IMAGE_TOKEN] * images,
        *[VIDEO_TOKEN] * videos,
        *range(40, 40 + after),
    ]


def batch(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of ``prompts``."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), PAD)
    mask = torch.zeros_like(ids)
    for row, ids_of_row in enumerate(prompts):
        ids[row, : len(ids_of_row)] = torch.tensor(ids_of_row)
        mask[row, : len(ids_of_row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def inputs(model, sizes, seed: int = 0) -> dict:
    """One prompt per image (each alone in its sample), with the model's own token counts."""
    prompts = [
        prompt(model.model.image_token_count(size), before=1 + i) for i, size in enumerate(sizes)
    ]
    return batch(prompts) | {
        "pixel_values": pixels(sizes, seed),
        "image_sizes": torch.tensor(sizes),
    }


def multi_image_inputs(model, sizes, seed: int = 0) -> dict:
    """One sample holding every image of ``sizes`` (one crop each, ``batch_num_images``)."""
    count = len(sizes) * model.model.multi_image_token_count()
    return batch([prompt(count)]) | {
        "pixel_values": pixels(sizes, seed, counts=[1] * len(sizes)),
        "image_sizes": torch.tensor(sizes),
        "batch_num_images": torch.tensor([len(sizes)]),
    }


def video_inputs(model, videos: int, frames: int, seed: int = 0) -> dict:
    """One prompt per video, each with the model's video-token count."""
    count = model.model.video_token_count(frames)
    prompts = [prompt(videos=count, before=1 + i) for i in range(videos)]
    return batch(prompts) | {"pixel_values_videos": video(videos, frames, seed)}


def pil(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A random RGB image of ``(height, width)`` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
