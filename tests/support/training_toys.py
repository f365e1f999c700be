"""A tiny Dense LLaVA and a toy data set shared by the training tests and the DDP worker."""

from __future__ import annotations

import torch

from mmconnect.integrations.applications.tiny_models import (
    tiny_connector,
    tiny_dense_llava,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration

IMAGE_TOKEN = 99
TOKENS_PER_IMAGE = 16  # 56 px / patch 14 -> 4x4


def build_model(groups=((0, 1), (2, 3)), seed: int = 0) -> DenseLlavaForConditionalGeneration:
    """A Dense LLaVA in training mode: CLIP tower of 4 blocks, width 16, 56 px / patch 14 (a 4x4
    grid); DCI over ``groups``; a 2-block Llama 32 wide with vocabulary 100; ``<image>`` id 99."""
    return tiny_dense_llava(
        seed=seed,
        connector=tiny_connector(groups=groups),
        vision_config=tiny_vision_config("clip", width=16, image_size=56),
        text_config=tiny_text_config(vocab_size=100),
        image_token_id=IMAGE_TOKEN,
    ).train()


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


def end_process_group() -> None:
    """Destroy the process group torchrun set up, as a training script must before it exits:
    a process that leaves Gloo's worker threads running into interpreter shutdown can abort there
    (SIGABRT, "terminate called without an active exception"; seen once in CI, rank 1)."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
