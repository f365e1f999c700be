"""The tiny chat models and inputs of the chat tests, shared with the bf16 suite.

Built with :mod:`mmconnect.integrations.applications.tiny_models`: a CLIP tower (width 16,
4 blocks, 56 px images of 14 px patches, so a 4 x 4 grid of 16 tokens per frame), a 2-layer Llama
(width 32) and the demo's word-level tokenizer over the vicuna_v1 prompt and a few answer words.
Weights are random: answers are whatever greedy decoding gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmconnect import ConnectorConfig, DCISpec, STISpec
from mmconnect.integrations.applications.tiny_models import (
    build_word_tokenizer,
    tiny_dense_llava,
    tiny_llava_processor,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.llava import (
    DenseLlavaForConditionalGeneration,
    DenseLlavaProcessor,
)
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextConfig,
    DenseLlavaNextForConditionalGeneration,
    DenseLlavaNextProcessor,
)
from mmconnect.integrations.training.data import Turn, get_template

SIZE, PATCH, VISION, LLM, BLOCKS = 56, 14, 16, 32, 4
TOKENS = (SIZE // PATCH) ** 2  # 16 per frame
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
QUESTION = "What colour is the circle? Answer with one word."
_COMMON = {"vision_dim": VISION, "llm_dim": LLM, "num_layers": BLOCKS}
DCI = ConnectorConfig(fusion=DCISpec(groups=((0, 1), (2, 3))), **_COMMON)
# STI pools layers 1 and 2 by 8: 16 grid tokens + 2 + 2 that form no grid
STI = ConnectorConfig(fusion=STISpec(extra_layers=(1, 2)), **_COMMON)


def tokenizer():
    """The demo's word-level tokenizer over the vicuna_v1 prompt of :data:`QUESTION` and colour
    and shape words."""
    system = get_template("vicuna_v1").render([Turn("human", QUESTION), Turn("gpt", "red")])
    return build_word_tokenizer([system, "red green blue yellow purple orange square triangle"])


def configs(tokenizer) -> dict:
    """The CLIP tower (4 blocks, width 16, a 4 x 4 grid at 56 px) and the 2-block Llama (width
    32) over ``tokenizer``'s vocabulary, as config fields of a Dense LLaVA(-NeXT)."""
    return {
        "vision_config": tiny_vision_config(
            "clip", blocks=BLOCKS, width=VISION, image_size=SIZE, patch_size=PATCH
        ),
        "text_config": tiny_text_config(
            tokenizer=tokenizer, width=LLM, max_position_embeddings=512
        ),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
    }


def llava(tokenizer, connector: ConnectorConfig = DCI) -> DenseLlavaForConditionalGeneration:
    """The Dense LLaVA of :func:`configs` and ``connector`` (seed 0, eval mode)."""
    parts = configs(tokenizer)
    return tiny_dense_llava(
        connector=connector,
        vision_config=parts["vision_config"],
        text_config=parts["text_config"],
        image_token_id=parts["image_token_index"],
    )


def llava_processor(tokenizer, connector: ConnectorConfig = DCI) -> DenseLlavaProcessor:
    return tiny_llava_processor(tokenizer, connector, image_size=SIZE, patch_size=PATCH)


def llava_next(
    tokenizer, connector: ConnectorConfig = DCI
) -> DenseLlavaNextForConditionalGeneration:
    """The Dense LLaVA-NeXT of :func:`configs`, ``connector`` and :data:`PINPOINTS` (seed 1, eval
    mode)."""
    config = DenseLlavaNextConfig(
        **configs(tokenizer), connector=connector.to_dict(), image_grid_pinpoints=PINPOINTS
    )
    torch.manual_seed(1)
    return DenseLlavaNextForConditionalGeneration(config).eval()


def llava_next_processor(tokenizer, connector: ConnectorConfig = DCI) -> DenseLlavaNextProcessor:
    from transformers import LlavaNextImageProcessor

    images = LlavaNextImageProcessor(
        image_grid_pinpoints=PINPOINTS,
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
    )
    return DenseLlavaNextProcessor(images, tokenizer, patch_size=PATCH, connector=connector)


def frames(count: int = 6, seed: int = 0) -> list[Image.Image]:
    """Random 60 x 80 RGB frames (not the tower's size: the processors resize)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(count)
    ]


def greedy(model, inputs_embeds: torch.Tensor, eos: int, steps: int) -> list[int]:
    """A hand-written greedy loop over full forwards (no cache)."""
    embeddings = model.get_input_embeddings()
    chosen: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(inputs_embeds=inputs_embeds).logits[0, -1].argmax())
            chosen.append(token)
            if token == eos:
                break
            inputs_embeds = torch.cat([inputs_embeds, embeddings(torch.tensor([[token]]))], dim=1)
    return chosen


def write_mp4(path: Path, count: int = 12) -> Path:
    """A 12-frame 64 x 48 mp4 of random plain colours at ``path`` (needs PyAV)."""
    import av

    rng = np.random.default_rng(3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(count):
            pixels = np.full((48, 64, 3), rng.integers(0, 256, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
