"""The tiny Dense Mini-Gemini of the Mini-Gemini family tests, shared with the bf16 suite.

Built with :mod:`mmconnect.integrations.applications.tiny_models`: a CLIP tower with CLIP-L/336's
depth and grid (24 blocks, 336 px / patch 14 -> 24x24) but 16 wide, a 4-stage ConvNeXt 8/16/32/64
wide (timm ``convnext_atto`` resized: 120 HR channels), a 2-layer Llama 32 wide with vocabulary
40; ``<image>`` is id 3, as in
:func:`~mmconnect.integrations.applications.tiny_models.tiny_llava_tokenizer`.
"""

from __future__ import annotations

import torch

from mmconnect import ConnectorConfig
from mmconnect.integrations.applications.tiny_models import (
    IMAGE,
    PUBLISHED_GEOMETRY,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.mini_gemini import (
    DenseMGMConfig,
    DenseMGMForConditionalGeneration,
)

__all__ = ["IMAGE"]  # the image token id, re-exported for the tests

VISION, LLM = 16, 32
#: The HR encoder: timm ``convnext_atto`` with one block per stage, 8 / 16 / 32 / 64 wide.
AUX = {"name": "convnext_atto", "dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}


def connector(preset: str) -> ConnectorConfig:
    return ConnectorConfig.from_preset(preset, vision_dim=VISION, llm_dim=LLM)


def build(
    preset: str = "baseline-clip-l-336", *, hd: bool = False, seed: int = 0, **fields
) -> DenseMGMForConditionalGeneration:
    """The Dense MGM of ``preset`` (eval mode); ``hd``: 1536 px HR images split in a 2x2 grid
    plus a global view; ``fields``: more ``DenseMGMConfig`` fields (``mining_placement``)."""
    torch.manual_seed(seed)
    config = DenseMGMConfig(
        vision_config=tiny_vision_config("clip", width=VISION, **PUBLISHED_GEOMETRY["clip"]),
        text_config=tiny_text_config(vocab_size=40, width=LLM),
        image_token_index=IMAGE,
        connector=connector(preset).to_dict(),
        aux_encoder=AUX,
        **({"image_size_aux": 1536, "image_grid": 2, "image_global": True} if hd else {}) | fields,
    )
    return DenseMGMForConditionalGeneration(config).eval()


def hr_pixels(size: int = 768, count: int = 1, seed: int = 1) -> torch.Tensor:
    """``[count, 3, size, size]`` standard-normal pixels (the HR view; the model resizes it for
    the CLIP tower)."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt(image_tokens: int, count: int = 1) -> torch.Tensor:
    """``count`` rows of ``[1, 8, <image> * image_tokens, 9, 10]``."""
    return torch.tensor([[1, 8] + [IMAGE] * image_tokens + [9, 10]] * count)
