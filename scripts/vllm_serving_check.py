"""Serve an exported Dense model with vLLM and compare its greedy outputs with transformers'.

A GPU-only check, never part of the test suite or CI: vLLM needs a CUDA device and is not a
dependency of mmconnect. It

1. builds a small random Dense LLaVA with a DCI connector (CLIP tower of 4 blocks, 64 wide, 56 px
   images of 14 px patches; a 2-layer Llama 256 wide with 64-wide attention heads, which vLLM's
   attention kernels take) and its processor, or takes a saved Dense model (``--dense DIR``);
2. exports it to a stock ``LlavaForConditionalGeneration`` checkpoint
   (:func:`mmconnect.integrations.export.export_to_stock`);
3. answers a few image prompts greedily with transformers (the exported checkpoint, loaded by
   ``AutoModelForImageTextToText``) and with vLLM serving the same directory;
4. prints one JSON object per prompt (both token sequences, whether they agree, and where they
   first differ the gap between transformers' two best logits at that step, since two engines'
   kernels can break a near-tie differently) and exits with status 1 when a prompt disagrees.

Usage, on a machine with a GPU and ``pip install vllm``::

    python scripts/vllm_serving_check.py --out /tmp/stock-llava [--dense DIR] [--dtype bfloat16]

``--transformers-only`` runs steps 1-3 without vLLM (to check the preparation on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPTS = (
    "USER : <image> what is in the image ASSISTANT :",
    "USER : <image> describe this photo ASSISTANT :",
    "<image> what is on the mat",
)


def build_dense(directory: Path) -> None:
    """Save a small random Dense LLaVA (DCI) and its processor to ``directory``."""
    from mmconnect import ConnectorConfig, DCISpec
    from mmconnect.integrations.applications.tiny_models import (
        tiny_llava_processor,
        tiny_llava_tokenizer,
        tiny_text_config,
        tiny_vision_config,
    )
    from mmconnect.integrations.families.llava import (
        DenseLlavaConfig,
        DenseLlavaForConditionalGeneration,
    )

    tokenizer = tiny_llava_tokenizer()
    vision = tiny_vision_config("clip", blocks=4, width=64, heads=2, image_size=56)
    text = tiny_text_config(
        "llama", tokenizer=tokenizer, width=256, blocks=2, heads=4, max_position_embeddings=1024
    )
    connector = ConnectorConfig(
        vision_dim=64, llm_dim=256, num_layers=4, fusion=DCISpec(groups=((0, 1), (2, 3)))
    )
    config = DenseLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        connector=connector.to_dict(),
    )
    torch.manual_seed(0)
    DenseLlavaForConditionalGeneration(config).save_pretrained(directory)
    tiny_llava_processor(tokenizer, connector, image_size=56).save_pretrained(directory)


def images() -> list[Image.Image]:
    """One seeded random RGB image per prompt, of different sizes."""
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (80, 120), (200, 90)][: len(PROMPTS)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def transformers_answers(directory: Path, dtype: torch.dtype, max_tokens: int) -> list[dict]:
    """Greedy new tokens of the exported checkpoint under transformers, with the top-2 logit
    gap of every step."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(directory)
    answers = []
    for prompt, image in zip(PROMPTS, images(), strict=True):
        inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,  # a random model may emit </s> at once
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        gaps = [float(step[0].float().topk(2).values.diff().abs()) for step in out.scores]
        answers.append({"tokens": tokens, "top2_gaps": gaps})
    return answers


def vllm_answers(directory: Path, dtype: str, max_tokens: int) -> list[list[int]]:
    """Greedy new tokens of vLLM serving the exported checkpoint."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(directory),
        dtype=dtype,
        max_model_len=1024,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    requests = [
        {"prompt": prompt, "multi_modal_data": {"image": image}}
        for prompt, image in zip(PROMPTS, images(), strict=True)
    ]
    return [list(output.outputs[0].token_ids) for output in llm.generate(requests, params)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="where the export goes")
    parser.add_argument("--dense", type=Path, help="a saved Dense model (default: build one)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--transformers-only", action="store_true", help="do not start vLLM")
    arguments = parser.parse_args()

    from mmconnect.integrations.export import export_to_stock

    dense = arguments.dense
    if dense is None:
        dense = arguments.out.with_name(arguments.out.name + "-dense")
        build_dense(dense)
    report = export_to_stock(dense, arguments.out)
    print(json.dumps({"export": str(report.directory), "layers": report.vision_feature_layer}))
    dtype = getattr(torch, arguments.dtype)
    reference = transformers_answers(arguments.out, dtype, arguments.max_tokens)
    if arguments.transformers_only:
        print(json.dumps({"transformers": [answer["tokens"] for answer in reference]}))
        return 0
    served = vllm_answers(arguments.out, arguments.dtype, arguments.max_tokens)
    failures = 0
    for prompt, expected, got in zip(PROMPTS, reference, served, strict=True):
        tokens = expected["tokens"]
        differ = next(
            (i for i, (a, b) in enumerate(zip(tokens, got, strict=False)) if a != b), None
        )
        if differ is None and len(tokens) != len(got):
            differ = min(len(tokens), len(got))
        failures += differ is not None
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "transformers": tokens,
                    "vllm": got,
                    "agree": differ is None,
                    "first_difference": differ,
                    "top2_gap_there": None
                    if differ is None or differ >= len(expected["top2_gaps"])
                    else expected["top2_gaps"][differ],
                }
            )
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
