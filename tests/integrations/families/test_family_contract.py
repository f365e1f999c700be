"""The shared family contract (``family_contract.py``) on LLaVA, LLaVA-NeXT and Mini-Gemini.

Every family is built from the same tiny parts
(:mod:`mmconnect.integrations.applications.tiny_models`): a CLIP tower of 4 blocks, width 16,
56 px images of 14 px patches (a 4x4 grid, 1 CLS token), a 2-block Llama 32 wide with
vocabulary 120, and the 21-word tokenizer whose ``<image>`` is id 3. The model's connector is
DCI over the two halves of the blocks (16 tokens per image); the other connectors are the
one-layer baseline (projector input 16 wide instead of 48) and SCI on two extra layers (the
same shapes as DCI, another meaning).

The expected token counts are exact: 16 per image for LLaVA and Mini-Gemini; for LLaVA-NeXT the
stock ``LlavaNextProcessor``'s counts for these sizes and pinpoints (DCI keeps HF's count).
"""

from __future__ import annotations

from typing import Any

from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextModel,
)

from mmconnect import ConnectorConfig
from mmconnect.fusion import SCISpec, SingleLayerSpec
from mmconnect.integrations.applications.tiny_models import (
    BOS,
    EOS,
    IMAGE,
    PAD,
    TINY_PATCH_SIZE,
    tiny_connector,
    tiny_llava_processor,
    tiny_llava_tokenizer,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.llava import (
    DenseLlavaConfig,
    DenseLlavaForConditionalGeneration,
    DenseLlavaModel,
    DenseLlavaProcessor,
)
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextConfig,
    DenseLlavaNextForConditionalGeneration,
    DenseLlavaNextModel,
    DenseLlavaNextProcessor,
)
from mmconnect.integrations.families.mini_gemini import (
    DenseMGMConfig,
    DenseMGMForConditionalGeneration,
    DenseMGMModel,
    DenseMGMProcessor,
)
from mmconnect.integrations.families.protocol import TowerGeometry
from tests.integrations.families.family_contract import FamilyContractTests

#: The tiny towers: CLIP 4 blocks, width 16, 56 px / patch 14 (4x4 grid); Llama width 32.
VISION, LLM, BLOCKS, SIDE = 16, 32, 4, 56
GEOMETRY = TowerGeometry(
    width=VISION,
    depth=BLOCKS,
    image_size=(SIDE, SIDE),
    patch_size=TINY_PATCH_SIZE,
    grid=(4, 4),
    prefix_tokens=1,
)
#: (height, width) of the sample images: square, wide, tall, and one the towers do not divide.
SIZES = ((56, 56), (60, 150), (150, 60), (100, 100))
#: LLaVA-NeXT's pinpoints: multiples of the 56 px tile.
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
#: Mini-Gemini's HR image: 128 px, a 32x32 ConvNeXt map (8x8 cells per LR token).
HR_SIDE = 128
#: The HR ConvNeXt: timm ``convnext_atto`` with one block per stage, 8 / 16 / 32 / 64 wide.
AUX = {"name": "convnext_atto", "dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}


def vision_config() -> Any:
    return tiny_vision_config("clip", blocks=BLOCKS, width=VISION, image_size=SIDE)


def text_config() -> Any:
    return tiny_text_config(
        width=LLM, vocab_size=120, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS
    )


class _TinyParts:
    """Connectors and tokenizer shared by the three testers."""

    def connector(self, kind: str) -> ConnectorConfig:
        if kind == "dense":  # DCI: final layer + the means of blocks (0, 1) and (2, 3)
            return tiny_connector(vision_dim=VISION, llm_dim=LLM, num_layers=BLOCKS)
        if kind == "baseline":  # LLaVA-1.5: H[-2] alone
            return ConnectorConfig(
                vision_dim=VISION,
                llm_dim=LLM,
                num_layers=BLOCKS,
                fusion=SingleLayerSpec(final_layer=-2),
            )
        if kind == "same_shapes":  # 3 layers concatenated: DCI's widths
            return ConnectorConfig(
                vision_dim=VISION,
                llm_dim=LLM,
                num_layers=BLOCKS,
                fusion=SCISpec(extra_layers=(1, 2), final_layer=-2),
            )
        raise ValueError(f"unknown connector kind {kind!r}")


class TestLlavaContract(_TinyParts, FamilyContractTests):
    model_type = "dense_llava"
    config_class = DenseLlavaConfig
    model_class = DenseLlavaModel
    generation_class = DenseLlavaForConditionalGeneration
    processor_class = DenseLlavaProcessor
    stock_model_class = LlavaModel
    stock_generation_class = LlavaForConditionalGeneration
    vision_tower_names = ("vision_tower",)
    connector_module_names = ("multi_modal_projector",)
    geometry = GEOMETRY
    pixel_side = SIDE
    image_sizes = SIZES
    token_counts = (16, 16, 16, 16)
    frame_tokens = 16

    def stock_config(self) -> LlavaConfig:
        return LlavaConfig(
            vision_config=vision_config(), text_config=text_config(), image_token_id=IMAGE
        )

    def processor(self, connector: ConnectorConfig) -> DenseLlavaProcessor:
        return tiny_llava_processor(tiny_llava_tokenizer(), connector, image_size=SIDE)


class TestLlavaNextContract(_TinyParts, FamilyContractTests):
    model_type = "dense_llava_next"
    config_class = DenseLlavaNextConfig
    model_class = DenseLlavaNextModel
    generation_class = DenseLlavaNextForConditionalGeneration
    processor_class = DenseLlavaNextProcessor
    stock_model_class = LlavaNextModel
    stock_generation_class = LlavaNextForConditionalGeneration
    vision_tower_names = ("vision_tower",)
    connector_module_names = ("multi_modal_projector",)
    geometry = GEOMETRY
    pixel_side = SIDE
    image_sizes = SIZES
    # The stock LlavaNextProcessor's counts (CLS dropped) for these sizes and pinpoints.
    token_counts = (36, 52, 56, 88)
    fixed_image_tokens = False
    frames_are_images = False  # a frame is the base crop alone: 16 tokens, no tiles
    frame_tokens = 16

    def stock_config(self) -> LlavaNextConfig:
        return LlavaNextConfig(
            vision_config=vision_config(),
            text_config=text_config(),
            image_token_id=IMAGE,
            image_grid_pinpoints=PINPOINTS,
        )

    def processor(self, connector: ConnectorConfig) -> DenseLlavaNextProcessor:
        return DenseLlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                image_grid_pinpoints=PINPOINTS,
                size={"shortest_edge": SIDE},
                crop_size={"height": SIDE, "width": SIDE},
            ),
            tokenizer=tiny_llava_tokenizer(),
            patch_size=TINY_PATCH_SIZE,
            connector=connector,
        )


class TestMiniGeminiContract(_TinyParts, FamilyContractTests):
    model_type = "dense_mgm"
    config_class = DenseMGMConfig
    model_class = DenseMGMModel
    generation_class = DenseMGMForConditionalGeneration
    processor_class = DenseMGMProcessor
    stock_model_class = LlavaModel
    stock_generation_class = LlavaForConditionalGeneration
    vision_tower_names = ("vision_tower", "vision_tower_aux")
    connector_module_names = ("multi_modal_projector", "mining")
    extra_children = frozenset({"vision_tower_aux", "mining"})
    extra_config_keys = frozenset(
        {
            "connector",
            "aux_encoder",
            "image_size_aux",
            "image_grid",
            "image_global",
            "mining_placement",
        }
    )
    geometry = GEOMETRY
    pixel_side = HR_SIDE
    image_sizes = SIZES
    token_counts = (16, 16, 16, 16)
    frame_tokens = 16

    def stock_config(self) -> LlavaConfig:
        return LlavaConfig(
            vision_config=vision_config(), text_config=text_config(), image_token_id=IMAGE
        )

    def dense_fields(self) -> dict[str, Any]:
        return {"aux_encoder": AUX, "image_size_aux": HR_SIDE}

    def processor(self, connector: ConnectorConfig) -> DenseMGMProcessor:
        return DenseMGMProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": HR_SIDE}, crop_size={"height": HR_SIDE, "width": HR_SIDE}
            ),
            tokenizer=tiny_llava_tokenizer(),
            patch_size=TINY_PATCH_SIZE,
            connector=connector,
            image_size=SIDE,
            image_size_aux=HR_SIDE,
        )
