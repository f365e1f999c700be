"""The tiny Idefics3 and SmolVLM models, processors and inputs of their family tests.

Idefics3: a SigLIP-style tower (width 16, 4 blocks, 56 px tiles of 14 px patches: a 4x4 grid
per tile), a pixel shuffle by 2 (4 tokens per tile) and a 2-layer Llama (width 32). SmolVLM: the
same tower at 84 px tiles (a 6x6 grid), a shuffle by 3 (4 tokens per tile). Both processors tile
with ``size["longest_edge"] = 4`` tiles, as the stock defaults do. The tokenizer is word-level
with the families' special tokens (``<fake_token_around_image>``, ``<global-img>``,
``<row_i_col_j>``, ``<end_of_utterance>``, ``<image>``, ``<video>``) as whole tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
)

from mmconnect import ConnectorConfig, DCISpec, SCISpec, SingleLayerSpec, STISpec
from mmconnect.integrations.applications.tiny_models import tiny_text_config, word_level_tokenizer
from mmconnect.zoo.pixel_shuffle import PixelShuffleSpec

VISION, LLM, BLOCKS, PATCH = 16, 32, 4, 14
#: Tile sides: Idefics3's 56 px (4x4 grid, shuffle 2), SmolVLM's 84 px (6x6 grid, shuffle 3).
TILES = {"idefics3": 56, "smolvlm": 84}
FACTORS = {"idefics3": 2, "smolvlm": 3}
ROW_COL = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
SPECIAL = ["<fake_token_around_image>", "<global-img>", *ROW_COL, "<end_of_utterance>", "<video>"]
WORDS = ["USER", "ASSISTANT", ":", "what", "is", "in", "the", "image", "Frame", "from", "video"]
VOCABULARY = ["<unk>", "<pad>", "<s>", "</s>", "<image>", *SPECIAL, *WORDS]
PAD, BOS, EOS, IMAGE = 1, 2, 3, 4
VOCAB = 64  # the LLM's vocabulary (>= len(VOCABULARY) = 56)

_COMMON = {"vision_dim": VISION, "llm_dim": LLM, "num_layers": BLOCKS}


def connectors(family: str) -> dict[str, ConnectorConfig]:
    """The connectors the tests use on a family's tiny tower (4 tokens per tile each but STI).

    ``native``: layer 4 (after ``post_layernorm``) into the family's shuffle; ``sci`` / ``dci``:
    Dense fusions into the same shuffle; ``mlp``: DCI into LLaVA's ``mlp2x_gelu`` (one token per
    patch); ``sti``: STI (pooled extra tokens) into ``mlp2x_gelu``.
    """
    shuffle = PixelShuffleSpec(factor=FACTORS[family])
    dci = DCISpec(final_layer=4, groups=((1, 2), (3,)))
    return {
        "native": ConnectorConfig(
            fusion=SingleLayerSpec(final_layer=4), projector=shuffle, **_COMMON
        ),
        "sci": ConnectorConfig(
            fusion=SCISpec(final_layer=4, extra_layers=(1, 2)), projector=shuffle, **_COMMON
        ),
        "dci": ConnectorConfig(fusion=dci, projector=shuffle, **_COMMON),
        "mlp": ConnectorConfig(fusion=dci, **_COMMON),
        "sti": ConnectorConfig(fusion=STISpec(final_layer=4, extra_layers=(2,)), **_COMMON),
    }


def vision_config(family: str, blocks: int = BLOCKS, image_size: int | None = None) -> dict:
    """The tiny SigLIP tower's fields (width 16, 2 heads, patch 14)."""
    return {
        "hidden_size": VISION,
        "intermediate_size": 2 * VISION,
        "num_hidden_layers": blocks,
        "num_attention_heads": 2,
        "image_size": TILES[family] if image_size is None else image_size,
        "patch_size": PATCH,
    }


def text_config() -> Any:
    """A 2-layer Llama, width 32, vocabulary 64."""
    return tiny_text_config(
        "llama",
        vocab_size=VOCAB,
        width=LLM,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def idefics3_config(**fields: Any) -> Idefics3Config:
    """The stock tiny Idefics3 config (shuffle 2)."""
    return Idefics3Config(
        vision_config=vision_config("idefics3"),
        text_config=text_config(),
        image_token_id=IMAGE,
        scale_factor=FACTORS["idefics3"],
        **fields,
    )


def stock_idefics3(seed: int = 0) -> Idefics3ForConditionalGeneration:
    """The stock tiny Idefics3 (``seed``, eval mode)."""
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(idefics3_config()).eval()


def tokenizer() -> Any:
    """Word-level over :data:`VOCABULARY`, the special tokens whole."""
    words = word_level_tokenizer(VOCABULARY)
    words.add_special_tokens({"additional_special_tokens": SPECIAL})
    return words


def image_processor(family: str, processor_class: type = Idefics3ImageProcessor, **fields: Any):
    """The family's image processor at its tiny tile: longest edge 4 tiles."""
    tile = TILES[family]
    return processor_class(
        size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile}, **fields
    )


def stock_idefics3_processor() -> Idefics3Processor:
    """The stock processor with the native count (4 per tile)."""
    return Idefics3Processor(image_processor("idefics3"), tokenizer(), image_seq_len=4)


def sample_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Random RGB noise of ``(height, width)`` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


#: Sample image sizes (height, width) -> tiles the tiny processors cut (longest edge 4 tiles;
#: written out by hand): square -> 4 x 4 + 1, 1:4 wide -> 1 x 4 + 1, 2:1 tall -> 4 x 2 + 1.
SAMPLE_TILES = {(60, 60): 17, (30, 120): 5, (100, 50): 9}


# ---------------------------------------------------------------------------- SmolVLM


def smolvlm_config(**fields: Any):
    """The stock tiny SmolVLM config (84 px tiles, shuffle 3)."""
    from transformers import SmolVLMConfig

    return SmolVLMConfig(
        vision_config=vision_config("smolvlm"),
        text_config=text_config(),
        image_token_id=IMAGE,
        scale_factor=FACTORS["smolvlm"],
        **fields,
    )


def stock_smolvlm(seed: int = 0):
    """The stock tiny SmolVLM (``seed``, eval mode)."""
    from transformers import SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    return SmolVLMForConditionalGeneration(smolvlm_config()).eval()


def video_processor():
    """SmolVLM's video processor at the tiny tile (frames squared to 84 px)."""
    from transformers import SmolVLMVideoProcessor

    tile = TILES["smolvlm"]
    return SmolVLMVideoProcessor(
        size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile}
    )


def smolvlm_parts() -> dict[str, Any]:
    """The processor parts of the tiny SmolVLM: image processor, tokenizer, video processor."""
    from transformers import SmolVLMImageProcessor

    return {
        "image_processor": image_processor("smolvlm", SmolVLMImageProcessor),
        "tokenizer": tokenizer(),
        "video_processor": video_processor(),
    }


def stock_smolvlm_processor():
    """The stock SmolVLM processor with the native count (4 per tile)."""
    from transformers import SmolVLMProcessor

    return SmolVLMProcessor(**smolvlm_parts(), image_seq_len=4)


def sample_video(frames: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8 noise (a decoded video)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- training


class TileDataset(torch.utils.data.Dataset):
    """Four one-tile (unsplit) samples: ``<s> w <image> * per_tile w answer </s>``, labels on
    the answer and ``</s>`` only; pixels ``[1, 3, tile, tile]`` (seeded noise)."""

    def __init__(self, per_tile: int, tile: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for index in range(4):
            ids = [BOS, 5, *[IMAGE] * per_tile, 6, 45 + index, EOS]
            labels = [-100] * (len(ids) - 2) + ids[-2:]
            pixels = torch.randn(1, 3, tile, tile, generator=generator)
            self.items.append((torch.tensor(ids), torch.tensor(labels), pixels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def collate_tiles(items) -> dict[str, torch.Tensor]:
    """Stack :class:`TileDataset` samples (all of one length) into model inputs."""
    ids, labels, pixels = zip(*items, strict=True)
    return {
        "input_ids": torch.stack(ids),
        "attention_mask": torch.ones(len(ids), ids[0].shape[0], dtype=torch.long),
        "labels": torch.stack(labels),
        "pixel_values": torch.stack(pixels),
    }
