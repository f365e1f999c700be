"""A tiny Dense LLaVA and a toy data set shared by the training tests and the DDP worker."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from mmconnect import ConnectorConfig
from mmconnect.integrations.families.llava import (
    DenseLlavaConfig,
    DenseLlavaForConditionalGeneration,
)

IMAGE_TOKEN = 99
TOKENS_PER_IMAGE = 16  # 56 px / patch 14 -> 4x4


def build_model(groups=((0, 1), (2, 3)), seed: int = 0) -> DenseLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    connector = ConnectorConfig(
        fusion="dci", final_layer=-2, groups=groups, vision_dim=16, llm_dim=32, num_layers=4
    )
    config = DenseLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        connector=connector.to_dict(),
    )
    return DenseLlavaForConditionalGeneration(config)


class ToyDataset(torch.utils.data.Dataset):
    """Eight samples: 2 text tokens, an image, 6 answer tokens (the answer depends on the image)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.pixels = torch.randn(8, 3, 56, 56, generator=generator)
        self.answers = torch.randint(1, 90, (8, 6), generator=generator)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        prompt = torch.tensor([1, 5] + [IMAGE_TOKEN] * TOKENS_PER_IMAGE)
        input_ids = torch.cat([prompt, self.answers[index]])
        labels = torch.cat([torch.full_like(prompt, -100), self.answers[index]])
        return {"input_ids": input_ids, "labels": labels, "pixel_values": self.pixels[index]}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch
