"""Tiny Qwen2.5-VL and Qwen3-VL stock models, processors and inputs for the Qwen families' tests.

Qwen2.5-VL: a 4-block vision tower (width 32, 2 heads, 14 px patches, temporal patch 2, merge
2, window 56 px = 2 x 2 merge units, full attention in blocks 1 and 3, no prefix tokens) whose
merger maps to a 2-layer Qwen2.5 LLM of width 32 (2 heads, 1 key-value head, head dim 16, M-RoPE
sections ``[2, 3, 3]``), vocabulary :data:`VOCAB`. The processor resizes images to multiples of
28 px between 56 x 56 and 168 x 168 pixels (patch grids 4 x 4 .. 12 x 12 in area).

Qwen3-VL: a 4-block tower (width 32, 16 px patches, merge 2, 16 learned position embeddings,
DeepStack on blocks 1 and 2) and a 2-layer Qwen3 LLM of width 32, the same vocabulary.

Builders only: each family's engineer may append functions; none is changed once in use.
"""

from __future__ import annotations

from typing import Any

import torch

#: Vocabulary: ``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3, the words ``w0`` .. ``w53``,
#: then the vision tokens.
VOCAB = 64
PAD, BOS, EOS = 1, 2, 3
VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN = 60, 61, 62, 63
_SPECIAL = {
    "<|vision_start|>": VISION_START,
    "<|vision_end|>": VISION_END,
    "<|image_pad|>": IMAGE_TOKEN,
    "<|video_pad|>": VIDEO_TOKEN,
}
#: Qwen2.5-VL tower sizes.
QWEN25_PATCH, QWEN25_WIDTH, QWEN25_DEPTH, LLM_WIDTH, MERGE = 14, 32, 4, 32, 2
#: Pixels per flattened Qwen2.5-VL patch (3 channels x 2 frames x 14 x 14).
QWEN25_PATCH_VALUES = 3 * 2 * QWEN25_PATCH * QWEN25_PATCH
#: Image prompt with one image placeholder the processor expands.
IMAGE_PROMPT = "w1 w2 <|vision_start|><|image_pad|><|vision_end|> w3 w4"
#: Video prompt with one video placeholder.
VIDEO_PROMPT = "w1 <|vision_start|><|video_pad|><|vision_end|> w5"


def _text_fields() -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": LLM_WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "max_position_embeddings": 512,
    }


_TOKEN_IDS = {
    "image_token_id": IMAGE_TOKEN,
    "video_token_id": VIDEO_TOKEN,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


def qwen2_5_vl_config(**vision: Any) -> Any:
    """The stock tiny ``Qwen2_5_VLConfig`` (module docstring); ``vision`` overrides tower fields."""
    from transformers import Qwen2_5_VLConfig

    vision_config = {
        "depth": QWEN25_DEPTH,
        "hidden_size": QWEN25_WIDTH,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": QWEN25_PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "window_size": 56,
        "out_hidden_size": LLM_WIDTH,
        "fullatt_block_indexes": [1, 3],
        "tokens_per_second": 2,
    } | vision
    text_config = _text_fields() | {
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}
    }
    return Qwen2_5_VLConfig(vision_config=vision_config, text_config=text_config, **_TOKEN_IDS)


def qwen2_5_vl_model(seed: int = 0, **vision: Any) -> Any:
    """A stock ``Qwen2_5_VLForConditionalGeneration`` of :func:`qwen2_5_vl_config` (``seed``,
    eval mode, eager-free sdpa as configured by default)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(**vision)).eval()


def tokenizer() -> Any:
    """Word-level tokenizer over :data:`VOCAB` ids with Qwen's vision tokens as special tokens
    (``image_token`` ``<|image_pad|>``, ``video_token`` ``<|video_pad|>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VISION_START - 4)]
    vocabulary = {word: index for index, word in enumerate(words)} | _SPECIAL
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def qwen2_5_vl_image_processor() -> Any:
    """Qwen2-VL's image processor for the tiny tower: 14 px patches, merge 2, 56^2 .. 168^2
    pixels."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        patch_size=QWEN25_PATCH,
        temporal_patch_size=2,
        merge_size=MERGE,
        size={"shortest_edge": 56 * 56, "longest_edge": 168 * 168},
    )


def qwen2_5_vl_video_processor() -> Any:
    """Qwen2-VL's video processor with the image processor's patch sizes and pixel bounds."""
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        patch_size=QWEN25_PATCH,
        temporal_patch_size=2,
        merge_size=MERGE,
        size={"shortest_edge": 56 * 56, "longest_edge": 168 * 168},
        do_sample_frames=False,
    )


def packed_pixels(grid_thw: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random packed Qwen2.5-VL patches for ``grid_thw``: ``[sum(t*h*w), 1176]``."""
    generator = torch.Generator().manual_seed(seed)
    rows = int(grid_thw.prod(-1).sum())
    return torch.randn(rows, QWEN25_PATCH_VALUES, generator=generator)


def prompt_ids(counts: list[int], *, token: int = IMAGE_TOKEN, before: int = 2, after: int = 3):
    """One prompt's ids: ``before`` words, then per count ``<|vision_start|>``, ``count``
    placeholders and ``<|vision_end|>``, then ``after`` words."""
    ids = [BOS] + [4 + index for index in range(before)]
    for count in counts:
        ids += [VISION_START] + [token] * count + [VISION_END]
    return ids + [10 + index for index in range(after)]


def qwen3_vl_config(**vision: Any) -> Any:
    """The stock tiny ``Qwen3VLConfig`` (module docstring); ``vision`` overrides tower fields."""
    from transformers import Qwen3VLConfig

    vision_config = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "out_hidden_size": LLM_WIDTH,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [1, 2],
    } | vision
    text_config = _text_fields() | {
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
            "rope_theta": 1e4,
        },
    }
    return Qwen3VLConfig(vision_config=vision_config, text_config=text_config, **_TOKEN_IDS)


def qwen3_vl_model(seed: int = 0, **vision: Any) -> Any:
    """A stock ``Qwen3VLForConditionalGeneration`` of :func:`qwen3_vl_config` (``seed``, eval)."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(qwen3_vl_config(**vision)).eval()
