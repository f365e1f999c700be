"""The tiny Gemma 3 models, tokenizer and inputs of the Gemma 3 family tests.

A SigLIP tower as Gemma 3 configures it (no attention-pooling head) with 4 blocks, width 16 and
56 px images of 14 px patches (a 4x4 grid, no prefix tokens); Gemma 3's projector pools it to
2x2 (``mm_tokens_per_image=4``, kernel 2). The LLM is a 2-layer Gemma 3 text model, width 32,
one sliding-window layer (window 4, so the window cuts through the prompts) and one global
layer. The tokenizer is word-level with Gemma 3's three image tokens: ``<start_of_image>``
(``boi``, id 4), ``<end_of_image>`` (``eoi``, 5) and ``<image_soft_token>`` (the placeholder
the connector's tokens replace, 6).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from mmconnect import ConnectorConfig, DCISpec, SCISpec, SingleLayerSpec
from mmconnect.zoo.pooled import Gemma3PoolSpec

VISION, LLM, BLOCKS, SIDE, PATCH = 16, 32, 4, 56, 14
#: Gemma 3's tokens per crop for the tiny tower: its 4x4 grid pooled to 2x2.
TOKENS_PER_CROP = 4
PAD, EOS, BOS, UNK, BOI, EOI, IMAGE = 0, 1, 2, 3, 4, 5, 6
WORDS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "user",
    "model",
    "what",
    "is",
    "in",
    "the",
    "image",
    "?",
    # the words of Gemma3Processor's pan-and-scan sentence
    "Here",
    "original",
    "and",
    "here",
    "are",
    "some",
    "crops",
    "to",
    "help",
    "you",
    "see",
    "better",
)
VOCAB = len(WORDS)
#: One prompt per image (``<start_of_image>`` where the image goes, as Gemma 3's chat template).
PROMPT = "user <start_of_image> what is in the image ?"


def tokenizer():
    """Word-level over :data:`WORDS` with Gemma 3's ``image_token``, ``boi_token`` and
    ``eoi_token``; split on whitespace (the processor's ``\\n\\n`` around images vanish)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )


def vision_config(blocks: int = BLOCKS, side: int = SIDE) -> SiglipVisionConfig:
    """Gemma 3's SigLIP tower in small: ``blocks`` blocks, width 16, ``side`` px, patch 14."""
    return SiglipVisionConfig(
        hidden_size=VISION,
        intermediate_size=2 * VISION,
        num_hidden_layers=blocks,
        num_attention_heads=2,
        image_size=side,
        patch_size=PATCH,
        vision_use_head=False,
    )


def text_config() -> Gemma3TextConfig:
    """A 2-layer Gemma 3 LLM: a sliding-window layer (window 4) then a global one."""
    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=LLM,
        intermediate_size=2 * LLM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
    )


def stock_config(blocks: int = BLOCKS, side: int = SIDE, tokens: int = TOKENS_PER_CROP):
    """The stock HF ``Gemma3Config`` of the tiny parts (``mm_tokens_per_image=tokens``)."""
    return Gemma3Config(
        vision_config=vision_config(blocks, side),
        text_config=text_config(),
        mm_tokens_per_image=tokens,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMAGE,
    )


def stock_model(seed: int = 0, **config) -> Gemma3ForConditionalGeneration:
    """The stock HF Gemma 3 of :func:`stock_config` (eval mode), with a random projector and
    norm: HF initialises both to zeros (checkpoints fill them), which would hide any error in
    how the connector reads the tower."""
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(stock_config(**config)).eval()
    projector = model.model.multi_modal_projector
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        weight = projector.mm_input_projection_weight
        weight.copy_(torch.randn(weight.shape, generator=generator) / VISION**0.5)
        norm = projector.mm_soft_emb_norm.weight
        norm.copy_(torch.randn(norm.shape, generator=generator) * 0.1)
    return model


def connector(kind: str, blocks: int = BLOCKS) -> ConnectorConfig:
    """The tiny connectors, all into Gemma 3's 2x2 pool.

    ``"native"``: the tower's output (layer ``blocks``, after ``post_layernorm``), Gemma 3's own;
    ``"dci"``: that layer and the means of the two halves of the blocks; ``"sci"``: that layer
    and two intermediate ones (DCI's widths, another meaning).
    """
    common = {"vision_dim": VISION, "llm_dim": LLM, "num_layers": blocks}
    pool = Gemma3PoolSpec(grid=(2, 2))
    half = blocks // 2
    fusions = {
        "native": SingleLayerSpec(final_layer=blocks),
        "dci": DCISpec(
            final_layer=blocks, groups=(tuple(range(0, half)), tuple(range(half, blocks)))
        ),
        "sci": SCISpec(final_layer=blocks, extra_layers=(1, half)),
    }
    return ConnectorConfig(fusion=fusions[kind], projector=pool, **common)


def image_processor(side: int = SIDE, **options) -> Gemma3ImageProcessor:
    """Gemma 3's image processor at ``side`` px (``options``: pan-and-scan settings)."""
    return Gemma3ImageProcessor(size={"height": side, "width": side}, **options)


def sample_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A random RGB image of ``(height, width)`` pixels (uint8 noise, ``seed``)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
