"""HF LLaVA-NeXT (AnyRes) with a Dense Connector (:mod:`mmconnect.integrations.families.llava_next`).

Tiny models built from configs (tests/support/llava_next_toys.py): a CLIP tower (width 16,
8 blocks, 56 px images of 14 px patches: a 4 x 4 grid per crop), a 2-layer Llama (width 32,
vocabulary 120) and pinpoints that are multiples of 56. The SCI connector on the layers of HF's
list-valued ``vision_feature_layer`` reproduces HF's logits exactly; DCI, STI and the efficient
connector keep the token bookkeeping of the prompt, the processor and the model in agreement.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from transformers import (
    AutoModelForImageTextToText,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

from mmconnect import ConnectorConfig
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextConfig,
    DenseLlavaNextForConditionalGeneration,
    DenseLlavaNextProcessor,
    from_llava_next,
)
from tests.support import llava_next_toys
from tests.support.llava_next_toys import (
    BLOCKS,
    CONNECTORS,
    IMAGE_TOKEN,
    LLM,
    PAD,
    PATCH,
    PINPOINTS,
    TILE,
    VOCAB,
    llava_next_config,
)
from tests.support.llava_next_toys import crops as _crops
from tests.support.llava_next_toys import inputs as _inputs
from tests.support.llava_next_toys import pixels as _pixels
from tests.support.llava_next_toys import prompt as _prompt

#: (height, width): square, wide, tall, 16:9, extreme both ways, one pixel high.
SIZES = [(56, 56), (60, 150), (150, 60), (1080, 1920), (100, 100), (40, 400), (500, 30), (1, 300)]
TIGHT = {"atol": 1e-6, "rtol": 1e-5}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_model() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(llava_next_config()).eval()


@pytest.fixture(scope="module")
def dense(hf_model) -> dict[str, DenseLlavaNextForConditionalGeneration]:
    """One converted model per connector; all share the HF model's tower, LLM and newline."""
    torch.manual_seed(1)
    return {name: from_llava_next(hf_model, config).eval() for name, config in CONNECTORS.items()}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return llava_next_toys.tokenizer()


@pytest.fixture(scope="module")
def image_processor() -> LlavaNextImageProcessor:
    return LlavaNextImageProcessor(
        image_grid_pinpoints=PINPOINTS,
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
    )


@pytest.fixture(scope="module")
def saved_sti(dense, tmp_path_factory):
    """The STI model written with ``save_pretrained``."""
    directory = tmp_path_factory.mktemp("dense_llava_next_sti")
    dense["sti"].save_pretrained(directory)
    return directory


def _pil(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- SCI parity


def test_conversion_reuses_hf_parts(hf_model, dense):
    model = dense["sci"]
    assert isinstance(model, DenseLlavaNextForConditionalGeneration)
    assert model.model.vision_tower is hf_model.model.vision_tower
    assert model.model.language_model is hf_model.model.language_model
    assert model.model.image_newline is hf_model.model.image_newline
    hf_projector = hf_model.model.multi_modal_projector
    assert torch.equal(model.connector.projector[0].weight, hf_projector.linear_1.weight)
    assert torch.equal(model.connector.projector[2].bias, hf_projector.linear_2.bias)


@pytest.mark.parametrize("size", SIZES)
def test_sci_image_features_match_hf(hf_model, dense, size):
    pixels, sizes = _pixels([size]), torch.tensor([size])
    with torch.no_grad():
        expected = hf_model.model.get_image_features(pixels, sizes).pooler_output
        ours = dense["sci"].model.get_image_features(pixels, sizes).pooler_output
    assert len(ours) == len(expected) == 1
    assert ours[0].shape == expected[0].shape == (dense["sci"].model.image_token_count(size), LLM)
    assert_close(ours[0], expected[0], **TIGHT)


@pytest.mark.parametrize(
    "sizes", [[(56, 56)], [(60, 150)], [(150, 60)], [(1080, 1920)], [(60, 150), (500, 30)]]
)
def test_sci_logits_match_hf(hf_model, dense, sizes):
    inputs = _inputs(dense["sci"], sizes, seed=len(sizes))
    assert inputs["pixel_values"].dim() == 5
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        ours = dense["sci"](**inputs).logits
    assert_close(ours, expected, **TIGHT)


def test_sci_processor_batch_matches_hf_processor_and_logits(
    hf_model, dense, tokenizer, image_processor
):
    """The stock HF processor's prompts fit the SCI model exactly, and both models agree."""
    hf_processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ours = DenseLlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        connector=CONNECTORS["sci"],
    )
    images = [_pil((150, 60), 1), _pil((40, 400), 2)]
    text = ["w1 <image> w2 w3", "w4 <image> w5"]
    expected = hf_processor(images=images, text=text, padding=True, return_tensors="pt")
    got = ours(images=images, text=text, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert expected["pixel_values"].shape[:2] == (2, 4)  # padded to the larger crop count
    with torch.no_grad():
        assert_close(dense["sci"](**got).logits, hf_model(**expected).logits, **TIGHT)


# ---------------------------------------------------------------------------- other connectors


@pytest.mark.parametrize("name", ["dci", "sti", "efficient"])
def test_connectors_forward_with_own_token_counts(dense, name):
    model = dense[name]
    sizes = [(60, 150), (1080, 1920)]
    inputs = _inputs(model, sizes)
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"]
        ).pooler_output
        logits = model(**inputs).logits
    counts = [model.model.image_token_count(size) for size in sizes]
    assert [f.shape for f in features] == [(count, LLM) for count in counts]
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB)
    assert torch.isfinite(logits).all()


def test_token_counts_per_connector(dense):
    """SCI / DCI: HF's counts; STI: + 4 pooled tokens per crop; efficient: 2 x 2 grids per crop."""
    for size in SIZES:
        sci = dense["sci"].model.image_token_count(size)
        assert dense["dci"].model.image_token_count(size) == sci
        assert dense["sti"].model.image_token_count(size) == sci + 4 * _crops(size)
    # 56 x 56 -> 1 x 2 tiles: 2 x 4 map, cropped to 2 x 2: 4 + 2 * 3
    assert dense["efficient"].model.image_token_count((56, 56)) == 10
    # 112 x 112 -> 2 x 2 tiles: 4 x 4 map, nothing to crop: 4 + 4 * 5
    assert dense["efficient"].model.image_token_count((112, 112)) == 24
    # 60 x 150 -> 1 x 3 tiles: 2 x 6 map; the image spans 150 * 2 / 60 = 5 columns, (6 - 5) // 2 = 0 cropped
    assert dense["efficient"].model.image_token_count((60, 150)) == 4 + 2 * 7


def test_sti_packs_grid_then_pooled_tokens(dense):
    """STI's leading tokens are SCI-like packing of the final layer; pooled tokens close it."""
    size = (112, 112)  # 2 x 2 tiles, nothing cropped: 16 + 8 * 9 grid tokens, then 5 crops x 4
    model = dense["sti"]
    with torch.no_grad():
        packed = model.model.get_image_features(_pixels([size]), torch.tensor([size]))
    packed = packed.pooler_output[0]
    assert packed.shape[0] == 16 + 8 * 9 + 5 * 4
    newline = model.model.image_newline
    rows = packed[16 : 16 + 8 * 9].reshape(8, 9, LLM)
    assert torch.equal(rows[:, -1], newline.expand(8, -1))
    assert not (packed[16 + 8 * 9 :] == newline).all(dim=-1).any()


@pytest.mark.parametrize("name", ["sci", "dci", "sti", "efficient"])
def test_generate(dense, name):
    model = dense[name]
    inputs = _inputs(model, [(150, 60)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_loss_backward_reaches_connector_and_newline(dense):
    model = dense["sti"]
    inputs = _inputs(model, [(60, 150), (100, 100)])
    labels = inputs["input_ids"].clone()
    labels[(labels == IMAGE_TOKEN) | (inputs["attention_mask"] == 0)] = -100
    model.zero_grad(set_to_none=True)
    try:
        loss = model(**inputs, labels=labels).loss
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = {name: p.grad for name, p in model.connector.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
        newline = model.model.image_newline.grad
        assert newline is not None and newline.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)  # shared with the other fixtures


# ---------------------------------------------------------------------------- save / load


def test_save_and_auto_load_identical_logits(dense, saved_sti):
    config = json.loads((saved_sti / "config.json").read_text())
    assert config["model_type"] == "dense_llava_next"
    assert config["architectures"] == ["DenseLlavaNextForConditionalGeneration"]
    loaded = AutoModelForImageTextToText.from_pretrained(saved_sti).eval()
    assert type(loaded) is DenseLlavaNextForConditionalGeneration
    assert isinstance(loaded.config, DenseLlavaNextConfig)
    assert loaded.config.connector_config == CONNECTORS["sti"]
    assert torch.equal(loaded.model.image_newline, dense["sti"].model.image_newline)
    inputs = _inputs(loaded, [(60, 150), (500, 30)])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, dense["sti"](**inputs).logits)


# ---------------------------------------------------------------------------- processor

PROCESSOR_SIZES = [(56, 56), (60, 150), (150, 60), (37, 300), (300, 37), (200, 120), (120, 200)]


@pytest.mark.parametrize("name", ["sci", "dci", "sti", "efficient"])
def test_processor_expands_to_model_count(dense, tokenizer, image_processor, name):
    processor = DenseLlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        connector=CONNECTORS[name],
    )
    model = dense[name]
    for seed, size in enumerate(PROCESSOR_SIZES):
        out = processor(images=_pil(size, seed), text="w1 <image> w2", return_tensors="pt")
        assert out["image_sizes"].tolist() == [list(size)]
        found = int((out["input_ids"] == IMAGE_TOKEN).sum())
        assert found == model.model.image_token_count(size), (name, size)
    batch = processor(
        images=[_pil((37, 300)), _pil((200, 120))],
        text=["w1 <image> w2", "w3 w4 <image>"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, VOCAB)


def test_processor_save_load_keeps_connector(tokenizer, image_processor, tmp_path):
    processor = DenseLlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        connector=CONNECTORS["efficient"],
    )
    processor.save_pretrained(tmp_path)
    loaded = DenseLlavaNextProcessor.from_pretrained(tmp_path)
    assert ConnectorConfig.from_dict(loaded.connector) == CONNECTORS["efficient"]
    assert loaded.patch_size == PATCH
    image, text = _pil((60, 150)), "w1 <image> w2"
    assert torch.equal(
        loaded(images=image, text=text, return_tensors="pt")["input_ids"],
        processor(images=image, text=text, return_tensors="pt")["input_ids"],
    )


def test_processor_requires_connector(tokenizer, image_processor):
    with pytest.raises(ValueError, match="connector="):
        DenseLlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14)


# ---------------------------------------------------------------------------- bad input


def test_wrong_image_token_count(dense):
    model = dense["sti"]
    size = (60, 150)
    count = model.model.image_token_count(size)
    inputs = _inputs(model, [size])
    inputs["input_ids"] = torch.tensor([_prompt(count - 1)])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with pytest.raises(ValueError, match=rf"holds {count - 1} image tokens.* fill {count}"):
        model(**inputs)
    with pytest.raises(ValueError, match=rf"holds {count - 1} image tokens.* fill {count}"):
        model.generate(**inputs, max_new_tokens=1, pad_token_id=PAD)


def test_wrong_pixel_size(dense):
    model = dense["sci"]
    size = (60, 150)
    inputs = _inputs(model, [size])
    inputs["pixel_values"] = torch.randn(1, _crops(size), 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[crops, 3, 56, 56\] \(image_size=56\).*64, 64"):
        model(**inputs)
    with pytest.raises(ValueError, match=r"\[crops, 3, 56, 56\]"):
        model.model.get_image_features(torch.randn(_crops(size), 3, 42, 42), torch.tensor([size]))


def test_wrong_crop_count(dense):
    model = dense["sci"]
    size = (60, 150)  # 1 + 1 x 3 crops
    with pytest.raises(ValueError, match=r"holds 3 crops but image_sizes need 4"):
        model.model.get_image_features(torch.randn(3, 3, TILE, TILE), torch.tensor([size]))


def test_missing_image_sizes(dense):
    model = dense["dci"]
    inputs = _inputs(model, [(60, 150)])
    del inputs["image_sizes"]
    with pytest.raises(ValueError, match="image_sizes is required for AnyRes"):
        model(**inputs)
    with pytest.raises(ValueError, match="image_sizes"):
        model.model.get_image_features(inputs["pixel_values"])


def test_pinpoints_not_multiples_of_tile(hf_model):
    data = hf_model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    data |= {
        "image_grid_pinpoints": [[56, 112], [112, 100]],
        "connector": CONNECTORS["sci"].to_dict(),
    }
    with pytest.raises(ValueError, match=r"image_grid_pinpoints\[1\]=\[112, 100\].*tile size 56"):
        DenseLlavaNextConfig(**data)


def test_processor_pinpoints_not_multiples_of_tile(tokenizer):
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=[[56, 112], [112, 100]],
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
    )
    processor = DenseLlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        connector=CONNECTORS["sci"],
    )
    with pytest.raises(ValueError, match=r"\[112, 100\].*tile size 56"):
        processor(images=_pil((100, 100)), text="<image>", return_tensors="pt")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vision_dim": 24}, r"vision_dim=24 does not match the vision tower's hidden_size \(16\)"),
        ({"llm_dim": 48}, r"llm_dim=48 does not match the LLM's hidden_size \(32\)"),
    ],
)
def test_connector_width_mismatch(hf_model, changes, message):
    with pytest.raises(ValueError, match=message):
        from_llava_next(hf_model, CONNECTORS["sci"].replace(**changes))


def test_connector_preset_for_another_tower(hf_model):
    with pytest.raises(ValueError, match=r"num_layers=24 does not match .*num_hidden_layers \(8\)"):
        from_llava_next(hf_model, "dc-sci-clip-l-336")


def test_from_llava_next_refuses_other_models(dense):
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        from_llava_next(dense["sci"], CONNECTORS["sci"])


def _edited_checkpoint(saved, tmp_path, **changes):
    directory = tmp_path / "edited"
    shutil.copytree(saved, directory)
    config = json.loads((directory / "config.json").read_text())
    config["connector"].update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_checkpoint_with_other_vision_width(saved_sti, tmp_path):
    directory = _edited_checkpoint(saved_sti, tmp_path, vision_dim=24)
    with pytest.raises(ValueError, match=r"vision_dim=24 does not match .*hidden_size \(16\)"):
        AutoModelForImageTextToText.from_pretrained(directory)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        # STI weights (projector input 16) under an SCI / DCI config (input 3 x 16)
        (
            {"fusion": {"kind": "sci", "extra_layers": [3, 5]}},
            r"fusion='sci'.*projector.0.weight: \(32, 16\) .*\(32, 48\)",
        ),
        (
            {"fusion": {"kind": "dci", "groups": [[0, 1, 2, 3], [4, 5, 6, 7]]}},
            r"fusion='dci'.*projector.0.weight: \(32, 16\) .*\(32, 48\)",
        ),
        (
            {"projector": {"kind": "mlp", "depth": 3}},
            r"projector='mlp3x_gelu'.*missing projector.4.weight",
        ),
    ],
)
def test_checkpoint_with_other_fusion(saved_sti, tmp_path, changes, problem):
    directory = _edited_checkpoint(saved_sti, tmp_path, **changes)
    with pytest.raises(ValueError, match=r"do not match the connector config.*" + problem):
        AutoModelForImageTextToText.from_pretrained(directory)


# ---------------------------------------------------------------------------- the HF model contract
# (issue 12: defects transformers' own tests found; issue 11: inputs refused early)


@pytest.mark.parametrize("load", ["class", "auto"])
def test_processor_keeps_its_chat_template(tokenizer, image_processor, tmp_path, load):
    from transformers import AutoProcessor

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    DenseLlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        connector=CONNECTORS["dci"],
        chat_template=template,
    ).save_pretrained(tmp_path)
    loaded = (DenseLlavaNextProcessor if load == "class" else AutoProcessor).from_pretrained(
        tmp_path
    )
    assert type(loaded) is DenseLlavaNextProcessor
    assert loaded.chat_template == template


def test_forward_keeps_the_stock_signature(dense):
    """Positional arguments after ``pixel_values`` reach HF's LlavaNextModel.forward
    (``input_ids, pixel_values, image_sizes, attention_mask``) as for the stock class."""
    import inspect

    from transformers import LlavaNextModel

    from mmconnect.integrations.families.llava_next import DenseLlavaNextModel

    assert inspect.signature(DenseLlavaNextModel.forward) == inspect.signature(
        LlavaNextModel.forward
    )
    model = dense["dci"]
    inputs = _inputs(model, [(60, 150), (56, 56)])
    with torch.no_grad():
        positional = model.model(
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs["image_sizes"],
            inputs["attention_mask"],
        ).last_hidden_state
        named = model.model(**inputs).last_hidden_state
    assert torch.equal(positional, named)


def test_get_image_features_returns_what_stock_llava_next_returns(hf_model, dense):
    """SCI on HF's own layers: the packed features equal HF's; ``last_hidden_state`` is each
    crop's final layer without CLS (``[crops, 16, C]``), hidden states on request, a tuple for
    ``return_dict=False``."""
    size = (60, 150)
    pixels, sizes = _pixels([size]), torch.tensor([size])
    crops = pixels[0, : _crops(size)]
    with torch.no_grad():
        ours = dense["sci"].model.get_image_features(pixels, sizes, output_hidden_states=True)
        stock = hf_model.model.get_image_features(pixels, sizes, return_dict=True)
        tower = hf_model.model.vision_tower(crops, output_hidden_states=True)
        as_tuple = dense["sci"].model.get_image_features(pixels, sizes, return_dict=False)
    assert_close(ours.pooler_output[0], stock.pooler_output[0], **TIGHT)
    assert torch.equal(ours.last_hidden_state, tower.hidden_states[-2][:, 1:])
    assert len(ours.hidden_states) == BLOCKS + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], ours.last_hidden_state)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([[0, 0]], "image_sizes[0] must be a (height, width) pair of positive ints, got [0, 0]"),
        (
            [[60, 150], [-5, 20]],
            "image_sizes[1] must be a (height, width) pair of positive ints, got [-5, 20]",
        ),
    ],
)
@pytest.mark.parametrize("call", ["forward", "get_image_features"])
def test_image_sizes_that_are_not_sizes(dense, sizes, message, call):
    """Before: ZeroDivisionError for (0, 0), a TypeError for a negative side."""
    model = dense["sci"]
    pixels = _pixels([(60, 150)] * len(sizes))
    expected = message + "; the original image size in pixels, as the processor's image_sizes"
    with pytest.raises(ValueError, match=re.escape(expected)):
        if call == "forward":
            model(input_ids=torch.tensor([_prompt(4)]), pixel_values=pixels, image_sizes=sizes)
        else:
            model.model.get_image_features(pixels, torch.tensor(sizes))


@pytest.mark.parametrize(
    ("pixels", "sizes", "message"),
    [
        (
            torch.zeros(0, 5, 3, TILE, TILE),
            torch.zeros(0, 2, dtype=torch.long),
            "pixel_values holds 0 images (shape (0, 5, 3, 56, 56)); pass at least one image "
            "[images, crops, 3, 56, 56], or pixel_values=None",
        ),
        (
            torch.zeros(3, TILE, TILE),
            torch.tensor([[56, 56]]),
            "pixel_values of shape (3, 56, 56) is one unbatched image",
        ),
        (
            torch.zeros(1, 3, 1, TILE, TILE),
            torch.tensor([[60, 150]]),
            "pixel_values have 1 channel(s) but this vision tower takes 3 (RGB)",
        ),
    ],
    ids=["no-images", "unbatched", "one-channel"],
)
def test_bad_pixel_values_are_refused_before_the_tower_runs(dense, pixels, sizes, message):
    model = dense["sci"]
    with pytest.raises(ValueError, match=re.escape(message)):
        model(input_ids=torch.tensor([_prompt(4)]), pixel_values=pixels, image_sizes=sizes)
