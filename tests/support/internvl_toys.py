"""The tiny InternVL models, tokenizer and processors of the InternVL family tests.

* Tower: HF ``InternVLVisionModel`` 16 wide, 4 blocks (:data:`BLOCKS`), 56 px tiles of 14 px
  patches: a 4 x 4 grid per tile after its 1 CLS token; ``use_mean_pooling=True`` (the final
  ``layernorm`` is an identity, as in InternViT-300M) unless asked otherwise.
* LLM: a 2-layer Qwen2 32 wide (InternVL 3's LLM family) over :func:`tokenizer`'s vocabulary.
* Connector: InternVL's pixel shuffle by 2 (``downsample_ratio=0.5``) + LayerNorm + MLP, so
  :data:`TOKENS_PER_TILE` = 4 tokens per tile.
* Processor: ``GotOcr2ImageProcessor`` at 56 px, 1 to :data:`MAX_TILES` tiles per image (plus
  the thumbnail when there is more than one), ``InternVLVideoProcessor`` at 56 px.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from mmconnect import ConnectorConfig, DCISpec, ResampleSpec, SCISpec
from mmconnect.zoo.pixel_shuffle import PixelShuffleMLPSpec

VISION, LLM, BLOCKS, TILE, PATCH = 16, 32, 4, 56, 14
#: Tokens per tile of the native connector: the 4 x 4 grid shuffled by 2.
TOKENS_PER_TILE = 4
#: The processors' tile bound (InternVL's own is 12; 4 keeps the tests small).
MAX_TILES = 4

#: The tokenizer's vocabulary in id order: special tokens, InternVL's image tokens, words.
WORDS = (
    "<unk>",
    "<pad>",
    "<s>",
    "</s>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "USER",
    "ASSISTANT",
    ":",
    "what",
    "is",
    "in",
    "the",
    "image",
    "video",
    "and",
    *(f"Frame{index}" for index in range(1, 9)),
)
PAD, BOS, EOS, IMG_START, IMG_END, IMG_CONTEXT, VIDEO = range(1, 8)
VOCAB = len(WORDS)

#: One prompt per image, as InternVL's chat template writes it (the processor expands it).
PROMPT = "USER : <IMG_CONTEXT> what is in the image ASSISTANT :"


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over :data:`WORDS` with InternVL's four image / video special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(
        models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


def vision_config(*, blocks: int = BLOCKS, mean_pooling: bool = True) -> InternVLVisionConfig:
    """The tiny InternViT: ``blocks`` blocks, width 16, 56 px tiles / patch 14 (4 x 4, 1 CLS);
    ``mean_pooling=False`` gives it a final LayerNorm (``layernorm``) as InternViT-6B-style
    towers without mean pooling have."""
    return InternVLVisionConfig(
        hidden_size=VISION,
        num_hidden_layers=blocks,
        num_attention_heads=2,
        intermediate_size=2 * VISION,
        image_size=TILE,
        patch_size=PATCH,
        use_mean_pooling=mean_pooling,
    )


def text_config() -> Qwen2Config:
    """A 2-layer Qwen2, width 32, over :data:`WORDS`."""
    return Qwen2Config(
        hidden_size=LLM,
        intermediate_size=2 * LLM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def stock_config(
    *, blocks: int = BLOCKS, feature_layer: int = -1, mean_pooling: bool = True
) -> InternVLConfig:
    """The stock HF InternVL config of the tiny parts, reading ``vision_feature_layer``."""
    return InternVLConfig(
        vision_config=vision_config(blocks=blocks, mean_pooling=mean_pooling).to_dict(),
        text_config=text_config().to_dict(),
        image_token_id=IMG_CONTEXT,
        vision_feature_layer=feature_layer,
    )


def stock_model(seed: int = 0, **config) -> InternVLForConditionalGeneration:
    """The stock HF InternVL of :func:`stock_config` (``config``: its keywords), every weight
    random under ``seed`` (HF zeroes the CLS token and position embeddings: randomised too, so
    a wrong token order shows), eval mode."""
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(stock_config(**config)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():
        for parameter in (embeddings.cls_token, embeddings.position_embeddings):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        for name, parameter in model.model.multi_modal_projector.named_parameters():
            if name.startswith("layer_norm"):  # ones and zeros would hide a channel swap
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


_COMMON = {"vision_dim": VISION, "llm_dim": LLM, "num_layers": BLOCKS}
_SHUFFLE = PixelShuffleMLPSpec(factor=2)
#: Dense connectors on the tiny tower (the presets' shapes on 4 blocks).
CONNECTORS = {
    # [F, mean H[0..1], mean H[2..3]] into InternVL's shuffle + MLP: 4 tokens per tile
    "dci+shuffle": ConnectorConfig(
        fusion=DCISpec(final_layer=4, groups=((0, 1), (2, 3))), projector=_SHUFFLE, **_COMMON
    ),
    # [F, H[1], H[2]] into the shuffle + MLP: 4 tokens per tile
    "sci+shuffle": ConnectorConfig(
        fusion=SCISpec(final_layer=4, extra_layers=(1, 2)), projector=_SHUFFLE, **_COMMON
    ),
    # DCI with the Dense Connector's own mlp2x_gelu: 16 tokens per tile
    "dci": ConnectorConfig(fusion=DCISpec(final_layer=4, groups=((0, 1), (2, 3))), **_COMMON),
    # DCI resampled to 2 x 2: 4 tokens per tile
    "dci-efficient": ConnectorConfig(
        fusion=DCISpec(final_layer=4, groups=((0, 1), (2, 3))),
        resample=ResampleSpec(grid=(2, 2)),
        **_COMMON,
    ),
}
#: Tokens per tile of each connector of :data:`CONNECTORS`.
CONNECTOR_TOKENS = {"dci+shuffle": 4, "sci+shuffle": 4, "dci": 16, "dci-efficient": 4}


def image_processor(max_tiles: int = MAX_TILES) -> GotOcr2ImageProcessor:
    """InternVL's image processor at 56 px tiles, 1 to ``max_tiles`` tiles (+ thumbnail)."""
    return GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
    )


def video_processor(side: int = TILE) -> InternVLVideoProcessor:
    """InternVL's video processor resizing frames to ``side`` (the tile side by default)."""
    return InternVLVideoProcessor(size={"height": side, "width": side})


def stock_processor() -> InternVLProcessor:
    """The stock HF processor of the tiny parts (4 tokens per tile: InternVL's count)."""
    return InternVLProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer(),
        video_processor=video_processor(),
        image_seq_length=TOKENS_PER_TILE,
    )


def dense_processor(connector: ConnectorConfig):
    """:class:`DenseInternVLProcessor` of the tiny parts for ``connector``."""
    from mmconnect.integrations.families.internvl import DenseInternVLProcessor

    return DenseInternVLProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer(),
        video_processor=video_processor(),
        patch_size=PATCH,
        connector=connector,
    )


def image(size: tuple[int, int], seed: int) -> Image.Image:
    """A random RGB image of ``(height, width)`` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def video(frames: int, size: tuple[int, int] = (40, 70), seed: int = 0) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8 noise."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
