"""The tiny LLaVA models and inputs of the LLaVA family tests, shared with the bf16 suite.

Built with :mod:`mmconnect.integrations.applications.tiny_models`: a CLIP tower with the depth
and grid of CLIP-L/336 (24 blocks, 336 px / patch 14 -> 24x24) and a SigLIP tower with those of
SO400M/384 (27 blocks, 384 px / patch 14 -> 27x27), both 16 wide, so every preset applies with
``vision_dim`` / ``llm_dim`` overrides and gives its published token count. The LLM is a 2-layer
Llama (CLIP) or Qwen2 (SigLIP), 32 wide, vocabulary 120, with the ids of
:func:`~mmconnect.integrations.applications.tiny_models.tiny_llava_tokenizer`.
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mmconnect import ConnectorConfig
from mmconnect.integrations.applications.tiny_models import (
    BOS,
    EOS,
    IMAGE,
    PAD,
    PUBLISHED_GEOMETRY,
    tiny_connector,
    tiny_dense_llava,
    tiny_dense_llava_config,
    tiny_llava_processor,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.llava import (
    DenseLlavaConfig,
    DenseLlavaForConditionalGeneration,
    DenseLlavaProcessor,
)

__all__ = ["BOS", "EOS", "IMAGE", "PAD"]  # the token ids, re-exported for the tests

VISION, LLM, VOCAB = 16, 32, 120

#: preset -> visual tokens per image on the tower's native grid (CLIP 24x24, SigLIP 27x27).
TOKENS = {
    "baseline-clip-l-336": 576,
    "dc-sti-clip-l-336": 720,
    "dc-sci-clip-l-336": 576,
    "dc-dci-clip-l-336": 576,
    "dc-dci-clip-l-336-efficient": 144,
    "dc-sti-siglip-so400m": 911,
    "dc-sci-siglip-so400m": 729,
    "dc-dci-siglip-so400m": 729,
}

#: Side of the small tower's images: 2 x 2 patches of 14 px on a 4-block tower.
TINY_SIZE = 28


def clip_config():
    """CLIP tower: 24 blocks, width 16, 336 px / patch 14 (24x24 grid, 1 CLS)."""
    return tiny_vision_config("clip", width=VISION, **PUBLISHED_GEOMETRY["clip"])


def siglip_config():
    """SigLIP tower: 27 blocks, width 16, 384 px / patch 14 (27x27 grid, no prefix)."""
    return tiny_vision_config("siglip", width=VISION, **PUBLISHED_GEOMETRY["siglip"])


def llm_config(kind: str = "llama"):
    """A 2-block Llama or Qwen2, width 32, vocabulary 120, pad 0 / bos 1 / eos 2."""
    return tiny_text_config(
        kind,
        vocab_size=VOCAB,
        width=LLM,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def is_siglip(preset: str) -> bool:
    return "siglip" in preset


def connector_config(preset: str, **overrides) -> ConnectorConfig:
    return ConnectorConfig.from_preset(
        preset, **{"vision_dim": VISION, "llm_dim": LLM, **overrides}
    )


def build_dense(preset: str, seed: int = 0) -> DenseLlavaForConditionalGeneration:
    """The Dense LLaVA of ``preset``: CLIP presets on a Llama LLM, SigLIP presets on a Qwen2."""
    siglip = is_siglip(preset)
    return tiny_dense_llava(
        seed=seed,
        connector=connector_config(preset),
        vision_config=siglip_config() if siglip else clip_config(),
        text_config=llm_config("qwen2" if siglip else "llama"),
        image_token_id=IMAGE,
    )


def stock_llava_config(vision_feature_layer, act: str = "gelu") -> LlavaConfig:
    """A stock HF LLaVA config of the CLIP tower and the Llama LLM, reading
    ``vision_feature_layer`` through a 2-layer ``act`` projector."""
    return LlavaConfig(
        vision_config=clip_config(),
        text_config=llm_config(),
        image_token_id=IMAGE,
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act=act,
    )


def build_llava(vision_feature_layer, act: str = "gelu") -> LlavaForConditionalGeneration:
    """The stock HF LLaVA of :func:`stock_llava_config` (seed 0, eval mode)."""
    config = stock_llava_config(vision_feature_layer, act)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def build_processor(preset: str, tokenizer) -> DenseLlavaProcessor:
    """The processor of ``preset`` at its tower's native size (336 or 384 px)."""
    family = "siglip" if is_siglip(preset) else "clip"
    return tiny_llava_processor(
        tokenizer,
        connector_config(preset),
        family=family,
        image_size=PUBLISHED_GEOMETRY[family]["image_size"],
    )


def _tiny_parts(connector: ConnectorConfig | None) -> dict:
    return {
        "connector": connector or tiny_connector(vision_dim=VISION, llm_dim=LLM),
        "vision_config": tiny_vision_config("clip", width=VISION, image_size=TINY_SIZE),
        "text_config": llm_config(),
        "image_token_id": IMAGE,
    }


def tiny_config(connector: ConnectorConfig | None = None) -> DenseLlavaConfig:
    """A Dense LLaVA of a 4-block CLIP tower at 28 px (a 2x2 grid) and :func:`llm_config`;
    ``connector`` ``None``: DCI over ``((0, 1), (2, 3))``."""
    return tiny_dense_llava_config(**_tiny_parts(connector))


def tiny_dense(
    seed: int = 0, connector: ConnectorConfig | None = None
) -> DenseLlavaForConditionalGeneration:
    """The model of :func:`tiny_config` (eval mode)."""
    return tiny_dense_llava(seed=seed, **_tiny_parts(connector))


def pixels(count: int, size: int = 336, seed: int = 0) -> torch.Tensor:
    """``[count, 3, size, size]`` standard-normal pixels."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_ids(image_tokens: int, batch: int = 1) -> torch.Tensor:
    """``<s> what <image>*n is in the image`` per row (one image per row)."""
    row = [BOS, 7, *[IMAGE] * image_tokens, 8, 9, 10, 11]
    return torch.tensor([row] * batch)
