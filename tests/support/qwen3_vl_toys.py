"""Tiny Qwen3-VL stock models, processors and inputs for the Dense Qwen3-VL tests.

The tower: 5 blocks, width 16, 2 heads, 8 px patches, temporal patch 2, merge 2, 16 learned
position embeddings (a 4x4 grid, 32 px at its native size), DeepStack after blocks 0, 1 and 3
(``hidden_states[1, 2, 4]``). The LLM: a 3-layer Qwen3-VL text model 32 wide (2 heads, 1
key-value head, head dim 16, interleaved M-RoPE sections ``[2, 3, 3]``), vocabulary
:data:`VOCAB`. The processor resizes images to multiples of 16 px between 16 x 16 and 64 x 64
pixels (patch grids 2x2 .. 8x8 in area); its video processor does the same per frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from mmconnect import ConnectorConfig, DCISpec

#: Vocabulary: ``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3, the words ``w0`` .. ``w51``,
#: the timestamp pieces, then the vision tokens.
VOCAB = 74
PAD, BOS, EOS = 1, 2, 3
VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN = 70, 71, 72, 73
PATCH, WIDTH, DEPTH, LLM_WIDTH, MERGE, LLM_LAYERS = 8, 16, 5, 32, 2, 3
#: Values per flattened patch (3 channels x 2 frames x 8 x 8).
PATCH_VALUES = 3 * 2 * PATCH * PATCH
#: ``deepstack_visual_indexes`` of the tiny tower (blocks), i.e. hidden_states 1, 2, 4.
DEEPSTACK_BLOCKS = (0, 1, 3)
#: One prompt per image; the processor expands the placeholder.
IMAGE_PROMPT = "w1 w2 <|vision_start|><|image_pad|><|vision_end|> w3 w4"
#: One prompt per video.
VIDEO_PROMPT = "w1 <|vision_start|><|video_pad|><|vision_end|> w5"
_SPECIAL = {
    "<|vision_start|>": VISION_START,
    "<|vision_end|>": VISION_END,
    "<|image_pad|>": IMAGE_TOKEN,
    "<|video_pad|>": VIDEO_TOKEN,
}
#: Pieces of the video timestamps ``<0.5 seconds>``.
_TIMESTAMP = ["<", ">", ".", "seconds", *[str(digit) for digit in range(10)]]
_TOKEN_IDS = {
    "image_token_id": IMAGE_TOKEN,
    "video_token_id": VIDEO_TOKEN,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


def stock_config(**vision: Any) -> Any:
    """The stock tiny ``Qwen3VLConfig`` (module docstring); ``vision`` overrides tower fields."""
    from transformers import Qwen3VLConfig

    vision_config = {
        "depth": DEPTH,
        "hidden_size": WIDTH,
        "intermediate_size": 32,
        "num_heads": 2,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "out_hidden_size": LLM_WIDTH,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": list(DEEPSTACK_BLOCKS),
    } | vision
    text_config = {
        "vocab_size": VOCAB,
        "hidden_size": LLM_WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": LLM_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
            "rope_theta": 1e4,
        },
    }
    return Qwen3VLConfig(vision_config=vision_config, text_config=text_config, **_TOKEN_IDS)


def stock_model(seed: int = 0, **vision: Any) -> Any:
    """A stock ``Qwen3VLForConditionalGeneration`` of :func:`stock_config` (``seed``, eval)."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(stock_config(**vision)).eval()


def dci_connector(*, projector: Any = "merger", deepstack: bool = False) -> ConnectorConfig:
    """DCI on the tiny tower: ``hidden_states[5]`` and the means of ``H[0..2]`` and ``H[3..4]``,
    into Qwen3-VL's merger (``projector="merger"``) or ``mlp2x_gelu`` (``"mlp"``); with
    ``deepstack`` the stock levels ``H[1, 2, 4]`` through Qwen3-VL's DeepStack mergers."""
    from mmconnect.injection import DeepStackSpec
    from mmconnect.projectors import MLPSpec
    from mmconnect.zoo.patch_merger import QWEN3_VL_DEEPSTACK_MERGER, QWEN3_VL_MERGER

    return ConnectorConfig(
        vision_dim=WIDTH,
        llm_dim=LLM_WIDTH,
        num_layers=DEPTH,
        fusion=DCISpec(final_layer=DEPTH, groups=((0, 1, 2), (3, 4))),
        projector=QWEN3_VL_MERGER if projector == "merger" else MLPSpec(),
        injection=(
            DeepStackSpec(
                layers=tuple(block + 1 for block in DEEPSTACK_BLOCKS),
                projector=QWEN3_VL_DEEPSTACK_MERGER,
            )
            if deepstack
            else None
        ),
    )


def tokenizer() -> Any:
    """Word-level tokenizer over :data:`VOCAB` ids with Qwen's vision tokens as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(52)] + _TIMESTAMP
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


_PIXELS = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}


def image_processor() -> Any:
    """Qwen2-VL's image processor for the tiny tower: 8 px patches, merge 2, 16^2 .. 64^2 px."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        patch_size=PATCH,
        temporal_patch_size=2,
        merge_size=MERGE,
        size=dict(_PIXELS),
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def video_processor() -> Any:
    """Qwen3-VL's video processor with the image processor's sizes, frames as given."""
    from transformers import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(
        patch_size=PATCH,
        temporal_patch_size=2,
        merge_size=MERGE,
        size={"shortest_edge": 16 * 16 * 2, "longest_edge": 64 * 64 * 4},
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def stock_processor() -> Any:
    """The stock ``Qwen3VLProcessor`` of the tiny parts."""
    from transformers import Qwen3VLProcessor

    return Qwen3VLProcessor(
        image_processor=image_processor(), tokenizer=tokenizer(), video_processor=video_processor()
    )


def dense_processor(connector: ConnectorConfig) -> Any:
    """``DenseQwen3VLProcessor`` of the tiny parts for ``connector``."""
    from mmconnect.integrations.families.qwen3_vl import DenseQwen3VLProcessor

    return DenseQwen3VLProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer(),
        video_processor=video_processor(),
        connector=connector,
    )


def sample_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A random RGB image of ``(height, width)`` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def sample_video(frames: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """``frames`` random RGB frames ``[frames, height, width, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
