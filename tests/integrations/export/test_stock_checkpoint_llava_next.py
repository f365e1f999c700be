"""Exporting a Dense LLaVA-NeXT (AnyRes) to a stock ``LlavaNextForConditionalGeneration``.

The tiny models of the LLaVA-NeXT family tests (:mod:`tests.support.llava_next_toys`: a CLIP tower
of 8 blocks, 16 wide, 56 px tiles of 14 px patches, a 2-layer Llama, five pinpoints): SCI on
layers -2, 3, 5 and DCI over blocks 0-3 and 4-7 (the final layer 7 also in the second group). The
export's logits equal the Dense model's for images of several sizes (each with its own AnyRes
tiling and unpadding): bit for bit for SCI, within 1e-5 for DCI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from mmconnect.integrations.export import export_to_stock
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextProcessor,
    from_llava_next,
)
from tests.support import llava_next_toys
from tests.support.llava_next_toys import CONNECTORS, PATCH, PINPOINTS, TILE

SIZES = [[(56, 56)], [(60, 150)], [(150, 60), (500, 30)]]


@pytest.fixture(scope="module")
def dense() -> dict:
    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(llava_next_toys.llava_next_config()).eval()
    torch.manual_seed(1)
    return {name: from_llava_next(stock, CONNECTORS[name]).eval() for name in ("sci", "dci")}


def processor_of(model) -> DenseLlavaNextProcessor:
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=PINPOINTS,
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
    )
    return DenseLlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=llava_next_toys.tokenizer(),
        patch_size=PATCH,
        connector=model.connector.config,
    )


@pytest.fixture(scope="module")
def exported(dense, tmp_path_factory) -> dict:
    """Each model exported and loaded back with transformers' own classes."""
    result = {}
    for name, model in dense.items():
        directory = tmp_path_factory.mktemp(f"stock_{name}")
        report = export_to_stock(model, directory, processor=processor_of(model))
        loaded = LlavaNextForConditionalGeneration.from_pretrained(directory).eval()
        result[name] = (report, loaded, AutoProcessor.from_pretrained(directory))
    return result


def test_reports_and_configs(exported):
    sci, _, _ = exported["sci"]
    assert (sci.stock_class, sci.vision_feature_layer, sci.exact) == (
        "LlavaNextForConditionalGeneration",
        [7, 3, 5],
        True,
    )
    dci, model, _ = exported["dci"]
    assert (dci.vision_feature_layer, dci.exact) == ([7, 0, 1, 2, 3, 4, 5, 6], False)
    assert (dci.dense_projector_inputs, dci.stock_projector_inputs) == (48, 128)
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.image_grid_pinpoints == PINPOINTS


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("name", ["sci", "dci"])
def test_logits_equal_the_dense_model(dense, exported, name, sizes):
    inputs = llava_next_toys.inputs(dense[name], sizes, seed=len(sizes))
    with torch.no_grad():
        expected = dense[name](**inputs).logits
        got = exported[name][1](**inputs).logits
    if name == "sci":
        assert torch.equal(got, expected)
    else:
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_greedy_generation_gives_the_same_tokens(dense, exported):
    inputs = llava_next_toys.inputs(dense["dci"], [(60, 150), (150, 60)], seed=4)
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": llava_next_toys.PAD}
    with torch.no_grad():
        expected = dense["dci"].generate(**inputs, **options)
        got = exported["dci"][1].generate(**inputs, **options)
    assert torch.equal(got, expected)


def test_stock_processor_builds_the_dense_prompts(dense, exported):
    processor = exported["dci"][2]
    assert type(processor) is LlavaNextProcessor
    assert (processor.vision_feature_select_strategy, processor.num_additional_image_tokens) == (
        "default",
        1,
    )
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(150, 60), (40, 400), (56, 56)]
    ]
    text = ["w1 <image> w2", "w3 <image>", "<image> w4 w5"]
    want = processor_of(dense["dci"])(images=images, text=text, padding=True, return_tensors="pt")
    got = processor(images=images, text=text, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    with torch.no_grad():
        expected = dense["dci"](**want).logits
        assert (exported["dci"][1](**got).logits - expected).abs().max() <= 1e-5


def test_processor_with_other_pinpoints_is_refused(dense, tmp_path):
    processor = processor_of(dense["sci"])
    processor.image_processor.image_grid_pinpoints = [[56, 112], [112, 56]]
    with pytest.raises(ValueError, match=r"image_grid_pinpoints .* differ from the model's"):
        export_to_stock(dense["sci"], tmp_path / "stock", processor=processor)


def test_efficient_and_sti_are_refused(tmp_path):
    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(llava_next_toys.llava_next_config()).eval()
    for name, message in (("sti", "fusion 'sti'"), ("efficient", "resizes the token grid")):
        model = from_llava_next(stock, CONNECTORS[name])
        with pytest.raises(ValueError, match=message):
            export_to_stock(model, tmp_path / name, processor=processor_of(model))
        assert not (tmp_path / name).exists()
