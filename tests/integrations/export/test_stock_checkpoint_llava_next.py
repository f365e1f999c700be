"""Exporting a Dense LLaVA-NeXT (AnyRes) to a stock ``LlavaNextForConditionalGeneration``.

The tiny models of the LLaVA-NeXT family tests (:mod:`tests.support.llava_next_toys`: a CLIP tower
of 8 blocks, 16 wide, 56 px tiles of 14 px patches, a 2-layer Llama, five pinpoints): SCI on
layers -2, 3, 5 and DCI over blocks 0-3 and 4-7 (the final layer 7 also in the second group). The
export's logits equal the Dense model's for images of several sizes (each with its own AnyRes
tiling and unpadding): bit for bit for SCI, within 1e-5 for DCI. A SigLIP tower of the same
geometry (no CLS token: ``vision_feature_select_strategy="full"``) exports the same way, and so
do bf16 models saved and exported from their folders: SCI bit for bit, DCI within the bound of
the LLaVA export tests (measured here: at most 0.0039, 1.04 % of the largest logit, on both
towers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from mmconnect.integrations.applications.tiny_models import tiny_vision_config
from mmconnect.integrations.export import export_to_stock
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextProcessor,
    from_llava_next,
)
from tests.support import llava_next_toys
from tests.support.llava_next_toys import BLOCKS, CONNECTORS, PATCH, PINPOINTS, TILE, VISION

SIZES = [[(56, 56)], [(60, 150)], [(150, 60), (500, 30)]]


def stock_config(tower: str = "clip"):
    """The family tests' stock config; ``"siglip"``: a SigLIP tower of the same geometry, whose
    tokens are all patches (``vision_feature_select_strategy="full"``)."""
    config = llava_next_toys.llava_next_config()
    if tower == "siglip":
        config.vision_config = tiny_vision_config(
            "siglip", blocks=BLOCKS, width=VISION, image_size=TILE, patch_size=PATCH
        )
        config.vision_feature_select_strategy = "full"
    return config


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(150, 60), (40, 400), (56, 56)]
    ]


@pytest.fixture(scope="module")
def dense() -> dict:
    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(stock_config()).eval()
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
    images = sample_images()
    text = ["w1 <image> w2", "w3 <image>", "<image> w4 w5"]
    want = processor_of(dense["dci"])(images=images, text=text, padding=True, return_tensors="pt")
    got = processor(images=images, text=text, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    with torch.no_grad():
        expected = dense["dci"](**want).logits
        assert (exported["dci"][1](**got).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("name", "layers"), [("sci", [7, 3, 5]), ("dci", [7, 0, 1, 2, 3, 4, 5, 6])]
)
def test_siglip_tower_exports_with_the_full_strategy(name, layers, tmp_path):
    """No CLS token: the stock model reads every token ("full") and its processor adds none;
    the logits equal the Dense model's (SCI bit for bit, DCI within 1e-5) and the stock
    processor builds the Dense processor's prompts."""
    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(stock_config("siglip")).eval()
    torch.manual_seed(1)
    model = from_llava_next(stock, CONNECTORS[name]).eval()
    report = export_to_stock(model, tmp_path / "stock", processor=processor_of(model))
    assert (report.vision_feature_layer, report.exact) == (layers, name == "sci")
    exported = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "stock").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "stock")
    assert exported.config.vision_feature_select_strategy == "full"
    assert (processor.vision_feature_select_strategy, processor.num_additional_image_tokens) == (
        "full",
        0,
    )
    for sizes in SIZES:
        inputs = llava_next_toys.inputs(model, sizes, seed=len(sizes))
        with torch.no_grad():
            got, expected = exported(**inputs).logits, model(**inputs).logits
        if name == "sci":
            assert torch.equal(got, expected)
        else:
            assert (got - expected).abs().max() <= 1e-5
    text = ["w1 <image> w2", "w3 <image>", "<image> w4 w5"]
    want = processor_of(model)(images=sample_images(), text=text, padding=True, return_tensors="pt")
    got = processor(images=sample_images(), text=text, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["pixel_values"], want["pixel_values"])


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_bf16_export_from_a_saved_folder(tower, tmp_path):
    """A bf16 model saved with its processor and exported from the folder: the stock checkpoint
    loads in bf16 and answers as the Dense checkpoint does (both loaded, so both recompute the
    rotary frequencies in fp32): SCI bit for bit, DCI within 0.008 and 2 % of the largest logit."""
    for name in ("sci", "dci"):
        torch.manual_seed(0)
        stock = LlavaNextForConditionalGeneration(stock_config(tower)).eval()
        torch.manual_seed(1)  # .to() below casts the shared stock modules too: a fresh one each
        model = from_llava_next(stock, CONNECTORS[name]).to(torch.bfloat16)
        source, target = tmp_path / f"dense_{name}", tmp_path / f"stock_{name}"
        model.save_pretrained(source)
        processor_of(model).save_pretrained(source)
        report = export_to_stock(source, target)
        assert report.exact == (name == "sci")
        exported = LlavaNextForConditionalGeneration.from_pretrained(target, dtype="auto").eval()
        reloaded = AutoModelForImageTextToText.from_pretrained(source, dtype="auto").eval()
        assert exported.dtype == reloaded.dtype == torch.bfloat16
        for sizes in SIZES:
            inputs = llava_next_toys.inputs(model, sizes, seed=len(sizes))
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            with torch.no_grad():
                got = exported(**inputs).logits.float()
                expected = reloaded(**inputs).logits.float()
            if name == "sci":
                assert torch.equal(got, expected)
            else:
                delta = (got - expected).abs().max()
                assert delta <= 0.008
                assert delta <= 0.02 * expected.abs().max()


def test_processor_with_other_pinpoints_is_refused(dense, tmp_path):
    processor = processor_of(dense["sci"])
    processor.image_processor.image_grid_pinpoints = [[56, 112], [112, 56]]
    with pytest.raises(ValueError, match=r"image_grid_pinpoints .* differ from the model's"):
        export_to_stock(dense["sci"], tmp_path / "stock", processor=processor)


def test_efficient_and_sti_are_refused(tmp_path):
    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(stock_config()).eval()
    for name, message in (("sti", "fusion 'sti'"), ("efficient", "resizes the token grid")):
        model = from_llava_next(stock, CONNECTORS[name])
        with pytest.raises(ValueError, match=message):
            export_to_stock(model, tmp_path / name, processor=processor_of(model))
        assert not (tmp_path / name).exists()
