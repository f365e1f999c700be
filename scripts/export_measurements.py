"""Measure what the stock export of a DCI model costs and how far it moves the outputs.

Builds a Dense LLaVA of real CLIP-L/336 shape (24 blocks, width 1024, 16 heads, MLP 4096,
336 px / patch 14: a 24x24 grid) with the published DCI preset (``dc-dci-clip-l-336``: the final
layer ``hidden_states[-2]`` and the means of blocks 0-11 and 12-23) projecting to a 4096-wide LLM
(one Llama layer of LLaMA-7B's shape, vocabulary 1000, so that the model fits a small machine),
random weights (seed 0), exports it in memory (:func:`mmconnect.integrations.export.stock_model.stock_model`)
and prints one JSON line per measurement as soon as it has it:

* ``parameters`` and ``gflop_per_image``: the first projector Linear and the whole projector of
  the Dense model and of the export, and the tower (Dense: stopped after the deepest layer it
  reads; export: the layers HF computes), GFLOP counted by ``torch.utils.flop_counter`` on one
  image;
* ``*_seconds`` and ``*_ratio``: median wall time of the projector alone and of the whole image path
  (``get_image_features``: tower + fusion + projector; the Dense tower stops after the deepest
  layer it reads, the stock one runs every block), Dense and export measured in alternation,
  and export / Dense;
* ``*_difference``: for fp32 and bf16 models, ``max |export - Dense|`` of the visual tokens and of
  the logits of one prompt (576 image tokens and 6 words), absolute and relative to the Dense
  values' largest magnitude.

Run from the repository root: ``.venv/bin/python scripts/export_measurements.py [--repeats N]``.
CPU only; on 2 shared cores it takes a few minutes and about 4 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig

from mmconnect import ConnectorConfig
from mmconnect.integrations.export.stock_model import stock_model
from mmconnect.integrations.families.llava import (
    DenseLlavaConfig,
    DenseLlavaForConditionalGeneration,
)

IMAGE_TOKEN = 999


def build_dense() -> DenseLlavaForConditionalGeneration:
    """CLIP-L/336-shaped tower, DCI preset, one LLaMA-7B-shaped layer (random, seed 0)."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=1000,
    )
    connector = ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=1024, llm_dim=4096)
    config = DenseLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=IMAGE_TOKEN,
        connector=connector.to_dict(),
    )
    torch.manual_seed(0)
    return DenseLlavaForConditionalGeneration(config).eval()


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each call, the calls run in alternation (one warm-up round first)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def gflop(call: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops() / 1e9


def difference(got: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    delta = (got.float() - expected.float()).abs().max().item()
    return {"max_abs": delta, "relative": delta / expected.float().abs().max().item()}


def emit(section: str, value: object) -> None:
    """Print one section as a JSON line as soon as it is measured (long runs keep what they did)."""
    print(json.dumps({section: value}), flush=True)


@torch.no_grad()
def measure(repeats: int) -> None:
    dense = build_dense()
    stock = stock_model(dense)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    tokens = dense.model.image_token_count()
    input_ids = torch.tensor([[1, 5, *[IMAGE_TOKEN] * tokens, 6, 7, 8, 9, 10]])

    connector = dense.model.connector
    tap = connector.make_tap(dense.model.vision_tower)
    features = tap(pixels)
    layers = stock.config.vision_feature_layer
    hidden = dense.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    stacked = torch.cat([hidden[layer][:, 1:] for layer in layers], dim=-1)
    projector = stock.model.multi_modal_projector
    dense_first = connector.projector[0]

    emit(
        "shape",
        "CLIP-L/336 tower (24 blocks, 1024 wide, 24x24 grid), dc-dci-clip-l-336, LLM width 4096",
    )
    emit("stock_vision_feature_layer", layers)
    emit(
        "parameters",
        {
            "first_linear_dense": sum(p.numel() for p in dense_first.parameters()),
            "first_linear_export": sum(p.numel() for p in projector.linear_1.parameters()),
            "projector_dense": sum(p.numel() for p in connector.projector.parameters()),
            "projector_export": sum(p.numel() for p in projector.parameters()),
        },
    )
    emit(
        "gflop_per_image",
        {
            "projector_dense": gflop(lambda: connector.projector(connector.fuse(features))),
            "projector_export": gflop(lambda: projector(stacked)),
            "tower_dense": gflop(lambda: tap(pixels)),
            "tower_export": gflop(
                lambda: dense.model.vision_tower(pixels, output_hidden_states=layers)
            ),
        },
    )
    emit(
        "float32_difference",
        {
            "visual_tokens": difference(
                stock.model.get_image_features(pixels).pooler_output[0],
                dense.model.get_image_features(pixels).pooler_output[0],
            ),
            "logits": difference(
                stock(input_ids=input_ids, pixel_values=pixels).logits,
                dense(input_ids=input_ids, pixel_values=pixels).logits,
            ),
        },
    )
    projector_seconds = median_seconds(
        {
            "projector_dense": lambda: connector(features),
            "projector_export": lambda: projector(stacked),
        },
        repeats,
    )
    emit("projector_seconds", projector_seconds)
    emit(
        "projector_ratio",
        projector_seconds["projector_export"] / projector_seconds["projector_dense"],
    )
    path_seconds = median_seconds(
        {
            "image_path_dense": lambda: dense.model.get_image_features(pixels),
            "image_path_export": lambda: stock.model.get_image_features(pixels),
        },
        repeats,
    )
    emit("image_path_seconds", path_seconds)
    emit("image_path_ratio", path_seconds["image_path_export"] / path_seconds["image_path_dense"])
    emit("torch_threads", torch.get_num_threads())
    model = dense.to(torch.bfloat16)
    exported = stock_model(model)  # exported from the bf16 model, as users would
    images = pixels.to(torch.bfloat16)
    emit(
        "bfloat16_difference",
        {
            "visual_tokens": difference(
                exported.model.get_image_features(images).pooler_output[0],
                model.model.get_image_features(images).pooler_output[0],
            ),
        },
    )
    emit(
        "bfloat16_logits_difference",
        difference(
            exported(input_ids=input_ids, pixel_values=images).logits,
            model(input_ids=input_ids, pixel_values=images).logits,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after 1 warm-up)")
    arguments = parser.parse_args()
    measure(arguments.repeats)


if __name__ == "__main__":
    main()
