"""Tiny saved Dense LLaVA folders (model + processor), as ``mmconnect demo`` writes them.

Tests that run the command line in fresh processes load these folders there, so what they check
is what a user's new shell sees.
"""

from __future__ import annotations

from pathlib import Path


def save_tiny_dense_llava(directory: Path, *, seed: int = 0) -> Path:
    """Save a random Dense LLaVA (4-block 48 px CLIP tower, 12 px patches: a 4x4 grid; DCI; 1-block
    Llama) with its processor.

    The tokenizer covers the synthetic VQA vocabulary and the chat templates' words, so the
    folder trains on and answers about the demo's data.
    """
    from mmconnect.integrations.applications.demo import DemoConfig, build_demo_model
    from mmconnect.integrations.applications.synthetic import text_vocabulary
    from mmconnect.integrations.applications.tiny_models import (
        build_word_tokenizer,
        tiny_llava_processor,
    )

    texts = [
        " ".join(text_vocabulary()),
        "A chat between USER : ASSISTANT : \n , . ? - assistant user",
    ]
    tokenizer = build_word_tokenizer(texts)
    config = DemoConfig(
        seed=seed,
        image_size=48,
        patch_size=12,
        vision_width=16,
        vision_blocks=4,
        llm_width=32,
        llm_blocks=1,
        connectors=("dci",),
    )
    model = build_demo_model("dci", config, tokenizer)
    model.save_pretrained(directory)
    processor = tiny_llava_processor(
        tokenizer, model.connector.config, image_size=48, patch_size=12
    )
    processor.save_pretrained(directory)
    return directory
