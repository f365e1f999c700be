"""The integration contracts in bf16 as well as fp32, on the CPU (issue 12, item 5).

The contracts the fp32 suites check per family, run with the whole model in ``torch.bfloat16``
next to the same model in fp32: Dense LLaVA converted from a stock HF LLaVA cast with
``.to(torch.bfloat16)`` (DCI, STI and the efficient DCI preset), a bf16 tower under an fp32 LLM,
Dense LLaVA-NeXT (AnyRes), Dense Mini-Gemini (HD mode too), the Mini-Gemini codebase swap, image
and video chat, one optimizer step of each training stage (bf16 weights, and fp32 weights under
the Trainer's bf16 autocast), a LoRA stage and Mini-Gemini's stage-1 backward. The exact
image-feature checks of the DCI presets also run in fp16. The tiny models and inputs are those of
each family's own tests (tests/support/*_toys.py, built with
:mod:`mmconnect.integrations.applications.tiny_models`), so both suites test the same models.
The LLaVA-codebase swap is checked in fp32 and bf16 in ``test_llava_codebase.py``, whose
stand-ins load their tower the way LLaVA's builder does.

Exact checks (``torch.equal``): image features against the tap and the connector run by hand and
against the tower's ``output_hidden_states``, reloaded checkpoints against the saved model.
bf16 against fp32 is a tolerance check on the logits (bf16 keeps 8 bits of mantissa).

Two transformers behaviours the checks take into account:

* ``model.to(torch.bfloat16)`` also casts the LLM's rotary ``inv_freq`` buffer to bf16, while
  ``from_pretrained`` / ``from_config`` with ``dtype=torch.bfloat16`` keep it in fp32, so a
  ``.to()``-cast model and its reloaded checkpoint differ in the logits (by up to 0.002 here).
  The save / reload checks start from models built as ``from_pretrained`` builds them.
* transformers refuses bf16 autocast without an accelerator unless ``use_cpu=True``;
  ``StageConfig(bf16=True)`` sets it on such machines, so the training checks pass only
  ``bf16=True``.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    LlavaNextForConditionalGeneration,
)

from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures  # noqa: E402
from mmconnect.integrations.chat.answering import (  # noqa: E402
    answer_image,
    answer_video,
    encode_image,
    prompt_embeddings,
)
from mmconnect.integrations.codebases.mini_gemini import swap_connector as swap_mgm  # noqa: E402
from mmconnect.integrations.families.llava import from_llava  # noqa: E402
from mmconnect.integrations.families.llava_next import (  # noqa: E402
    DenseLlavaNextForConditionalGeneration,
    from_llava_next,
)
from mmconnect.integrations.training.stages import (  # noqa: E402
    LoraSettings,
    StageConfig,
    prepare_stage,
    train_stage,
)
from mmconnect.video import POOLINGS, count_video_tokens, sample_frame_indices  # noqa: E402
from tests.support import (  # noqa: E402
    chat_toys,
    llava_next_toys,
    llava_toys,
    mini_gemini_codebase_toys,
    mini_gemini_toys,
    training_toys,
)

DTYPES = [torch.float32, torch.bfloat16]
#: Parametrize a test over fp32 and bf16.
each_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
#: Relative L2 error of bf16 logits against the same weights' fp32 logits: measured 0.9-1.3 % on
#: these models (bf16 keeps 8 bits of mantissa); a DCI connector that loses one layer group is off
#: by 57 %, another image's features by 126 % (measured on the Dense LLaVA DCI model).
BF16_RELATIVE_ERROR = 0.03


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in fp32."""
    difference = actual.float() - expected.float()
    return float(difference.norm() / expected.float().norm())


def float_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes of ``module``'s floating parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return {tensor.dtype for tensor in tensors if tensor.is_floating_point()}


def parameter_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {parameter.dtype for parameter in module.parameters()}


def checkpoint_dtypes(directory) -> set[str]:
    """The dtypes of the floating tensors in ``directory/model.safetensors`` (header only)."""
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        names = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
    return names - {"I64"}  # the connector's config fingerprint


def native_in(dtype: torch.dtype, config, seed: int = 0):
    """The model of ``config`` built as ``from_pretrained(..., dtype=dtype)`` builds it (rotary
    frequencies in fp32, every weight in ``dtype``), with seeded random weights."""
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()


def logits_of(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------- Dense LLaVA

LLAVA_PRESETS = ["dc-dci-clip-l-336", "dc-sti-clip-l-336", "dc-dci-clip-l-336-efficient"]


@pytest.fixture(scope="module")
def dense_llava():
    """``(preset, dtype) -> Dense LLaVA`` converted with ``from_llava`` from a stock HF LLaVA
    cast to ``dtype``, in eval mode, built once per module (tests must not change it)."""
    cache = {}

    def get(preset: str, dtype: torch.dtype):
        if (preset, dtype) not in cache:
            stock = llava_toys.build_llava(-2).to(dtype)
            cache[preset, dtype] = from_llava(stock, llava_toys.connector_config(preset))
        return cache[preset, dtype]

    return get


def llava_inputs(preset: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """One prompt with the preset's image tokens, fp32 pixels (as a processor gives them), labels."""
    ids = llava_toys.prompt_ids(llava_toys.TOKENS[preset])
    labels = ids.masked_fill(ids == llava_toys.IMAGE, -100)
    return {"input_ids": ids, "pixel_values": llava_toys.pixels(1, seed=seed), "labels": labels}


@each_dtype
@pytest.mark.parametrize("preset", LLAVA_PRESETS)
def test_llava_forward_with_labels_and_generate(dense_llava, preset, dtype):
    model = dense_llava(preset, dtype)
    assert float_dtypes(model.connector) == {dtype}  # the new connector follows the tower
    assert model.connector.config_fingerprint.dtype == torch.int64
    inputs = llava_inputs(preset)
    ids = inputs["input_ids"]
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits.dtype == dtype
    assert output.logits.shape == (1, ids.shape[1], llava_toys.VOCAB)
    assert torch.isfinite(output.loss) and torch.isfinite(output.logits).all()
    if dtype != torch.float32:  # the same weights in fp32 give nearly the same logits
        reference = logits_of(dense_llava(preset, torch.float32), **inputs)
        assert relative_error(output.logits, reference) < BF16_RELATIVE_ERROR

    generated = model.generate(
        input_ids=ids,
        pixel_values=inputs["pixel_values"],
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    sequences = generated.sequences
    assert sequences.shape == (1, ids.shape[1] + 3)
    assert torch.equal(sequences[:, : ids.shape[1]], ids)
    # The first step sees the same image features as the forward: same logits (generate
    # returns them upcast to fp32), same token.
    assert_close(generated.logits[0], output.logits[:, -1].float(), atol=1e-5, rtol=0)
    assert sequences[0, ids.shape[1]] == output.logits[0, -1].argmax()


#: ``(preset, dtype)`` of the exact image-feature checks: every preset in fp32 and bf16, the DCI
#: presets (whose group means are where precision bites) also in fp16, the dtype LLaVA's own
#: builder loads models in.
FEATURE_CASES = [
    *[(preset, dtype) for dtype in DTYPES for preset in LLAVA_PRESETS],
    ("dc-dci-clip-l-336", torch.float16),
    ("dc-dci-clip-l-336-efficient", torch.float16),
]


@pytest.mark.parametrize(
    ("preset", "dtype"),
    FEATURE_CASES,
    ids=[f"{preset}-{str(dtype).removeprefix('torch.')}" for preset, dtype in FEATURE_CASES],
)
def test_llava_image_features_are_the_connector_on_the_towers_layers(dense_llava, preset, dtype):
    """``get_image_features`` equals, bit for bit, (1) the connector on a tap of the model's
    tower run by hand and (2) the connector on the tower's own ``output_hidden_states`` (every
    layer stored, DCI groups averaged by the fusion), with the pixels cast to the tower's dtype."""
    model = dense_llava(preset, dtype)
    tower, connector = model.model.vision_tower, model.connector
    pixels = llava_toys.pixels(1, seed=2)  # fp32 pixels, as a processor gives them
    with torch.no_grad():
        features = model.model.get_image_features(pixels).pooler_output
        tapped = connector.make_tap(tower, keep_prefix=False)(pixels.to(dtype))
        by_tap = connector(tapped, (24, 24))
        states = tower(pixels.to(dtype), output_hidden_states=True).hidden_states
        by_states = connector(LayerFeatures.from_hidden_states(states, num_prefix_tokens=1))
    assert [f.dtype for f in features] == [dtype]
    assert [tuple(f.shape) for f in features] == [(llava_toys.TOKENS[preset], llava_toys.LLM)]
    assert torch.equal(features[0], by_tap[0]), "differs from the tap run by hand"
    assert torch.equal(features[0], by_states[0]), "differs from the hidden-states path"


@each_dtype
def test_llava_save_and_reload_keep_dtype_and_logits(tmp_path, dtype):
    stock = native_in(dtype, llava_toys.stock_llava_config(-2))
    model = from_llava(stock, llava_toys.connector_config("dc-dci-clip-l-336"))
    model.save_pretrained(tmp_path)
    assert checkpoint_dtypes(tmp_path) == {"F32" if dtype == torch.float32 else "BF16"}
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert parameter_dtypes(loaded) == {dtype}
    assert loaded.connector.config_fingerprint.dtype == torch.int64
    inputs = llava_inputs("dc-dci-clip-l-336", seed=4)
    del inputs["labels"]
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = loaded(**inputs).logits
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)


def test_llava_bf16_tower_under_an_fp32_llm():
    """A bf16 vision tower under an fp32 LLM: ``from_llava`` puts the new connector in the
    tower's dtype (bf16) and HF casts its tokens to the LLM's; a connector cast to fp32 takes
    the bf16 features and projects them in fp32 (``DenseConnector.forward`` casts the fused
    features to its projector's dtype)."""
    stock = llava_toys.build_llava(-2)
    stock.model.vision_tower.to(torch.bfloat16)
    model = from_llava(stock, llava_toys.connector_config("dc-dci-clip-l-336"))
    assert float_dtypes(model.connector) == {torch.bfloat16}
    inputs = llava_inputs("dc-dci-clip-l-336", seed=5)
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits.dtype == torch.float32 and torch.isfinite(output.loss)

    connector = model.connector.float()
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixels).pooler_output[0]
        tapped = connector.make_tap(model.model.vision_tower, keep_prefix=False)(
            pixels.to(torch.bfloat16)
        )
        fused = connector.fuse(tapped, (24, 24))
        output = model(**inputs)
    assert fused.dtype == torch.bfloat16 and features.dtype == torch.float32
    assert torch.equal(features, connector.projector(fused.float())[0])
    assert output.logits.dtype == torch.float32 and torch.isfinite(output.loss)


# ---------------------------------------------------------------------------- Dense LLaVA-NeXT

NEXT_CONNECTORS = ["dci", "sti", "efficient"]
NEXT_SIZES = [(60, 150), (1080, 1920)]


@pytest.fixture(scope="module")
def dense_next():
    """``(connector name, dtype) -> Dense LLaVA-NeXT`` converted from the stock model in dtype."""
    cache = {}

    def get(name: str, dtype: torch.dtype) -> DenseLlavaNextForConditionalGeneration:
        if (name, dtype) not in cache:
            torch.manual_seed(0)
            stock = (
                LlavaNextForConditionalGeneration(llava_next_toys.llava_next_config())
                .eval()
                .to(dtype)
            )
            torch.manual_seed(1)
            cache[name, dtype] = from_llava_next(stock, llava_next_toys.CONNECTORS[name]).eval()
        return cache[name, dtype]

    return get


def next_labels(inputs: dict) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    labels[(labels == llava_next_toys.IMAGE_TOKEN) | (inputs["attention_mask"] == 0)] = -100
    return labels


@each_dtype
@pytest.mark.parametrize("name", NEXT_CONNECTORS)
def test_llava_next_forward_with_labels_and_generate(dense_next, name, dtype):
    model = dense_next(name, dtype)
    assert float_dtypes(model.connector) == {dtype}
    assert model.model.image_newline.dtype == dtype
    inputs = llava_next_toys.inputs(model, NEXT_SIZES)
    with torch.no_grad():
        output = model(**inputs, labels=next_labels(inputs))
    assert output.logits.dtype == dtype
    assert output.logits.shape == (*inputs["input_ids"].shape, llava_next_toys.VOCAB)
    assert torch.isfinite(output.loss) and torch.isfinite(output.logits).all()
    if dtype != torch.float32:
        reference = logits_of(dense_next(name, torch.float32), **inputs)
        assert relative_error(output.logits, reference) < BF16_RELATIVE_ERROR

    one = llava_next_toys.inputs(model, [(150, 60)])
    generated = model.generate(
        **one, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=llava_next_toys.PAD
    )
    assert generated.shape == (1, one["input_ids"].shape[1] + 3)
    assert torch.equal(generated[:, : one["input_ids"].shape[1]], one["input_ids"])


@each_dtype
@pytest.mark.parametrize("name", NEXT_CONNECTORS)
def test_llava_next_base_crop_features_are_the_connector_by_hand(dense_next, name, dtype):
    """The packed image starts with the base crop's connector tokens (its grid, no newlines)."""
    model = dense_next(name, dtype)
    size = (60, 150)
    pixels = llava_next_toys.pixels([size])
    crops = pixels[0, : llava_next_toys.crops(size)]
    connector, tower = model.connector, model.model.vision_tower
    with torch.no_grad():
        packed = model.model.get_image_features(pixels, torch.tensor([size])).pooler_output[0]
        by_hand = connector(connector.make_tap(tower)(crops.to(dtype)), (4, 4))
    assert packed.dtype == dtype
    assert packed.shape == (model.model.image_token_count(size), llava_next_toys.LLM)
    rows, columns = connector.token_grid((4, 4))
    assert torch.equal(packed[: rows * columns], by_hand[0, : rows * columns])


@each_dtype
def test_llava_next_save_and_reload_keep_dtype_and_logits(tmp_path, dtype):
    stock = native_in(dtype, llava_next_toys.llava_next_config())
    torch.manual_seed(1)
    model = from_llava_next(stock, llava_next_toys.CONNECTORS["sti"]).eval()
    model.save_pretrained(tmp_path)
    assert checkpoint_dtypes(tmp_path) == {"F32" if dtype == torch.float32 else "BF16"}
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is DenseLlavaNextForConditionalGeneration
    assert parameter_dtypes(loaded) == {dtype}
    inputs = llava_next_toys.inputs(loaded, NEXT_SIZES)
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = loaded(**inputs).logits
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------- Dense Mini-Gemini

MGM_PRESET = "dc-dci-clip-l-336"


@pytest.fixture(scope="module")
def dense_mgm():
    """``dtype -> Dense MGM`` with a DCI connector (``mini_gemini_toys.build``, then cast)."""
    cache = {}

    def get(dtype: torch.dtype):
        if dtype not in cache:
            cache[dtype] = mini_gemini_toys.build(MGM_PRESET).to(dtype)
        return cache[dtype]

    return get


def mgm_inputs(seed: int) -> dict[str, torch.Tensor]:
    """A 768 px HR image and a prompt with its 576 image tokens, labels on the text only."""
    ids = mini_gemini_toys.prompt(576)
    labels = ids.masked_fill(ids == mini_gemini_toys.IMAGE, -100)
    return {
        "input_ids": ids,
        "pixel_values": mini_gemini_toys.hr_pixels(seed=seed),
        "labels": labels,
    }


@each_dtype
def test_mgm_forward_with_labels_and_generate(dense_mgm, dtype):
    model = dense_mgm(dtype)
    inner = model.model
    assert float_dtypes(inner.connector) == float_dtypes(inner.mining) == {dtype}
    assert float_dtypes(inner.vision_tower_aux) == {dtype}
    inputs = mgm_inputs(seed=2)
    ids = inputs["input_ids"]
    with torch.no_grad():
        output = model(**inputs)
        features = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
    assert output.logits.dtype == features.dtype == dtype
    assert features.shape == (576, mini_gemini_toys.LLM)
    assert torch.isfinite(output.loss) and torch.isfinite(output.logits).all()
    if dtype != torch.float32:
        reference = logits_of(dense_mgm(torch.float32), **inputs)
        assert relative_error(output.logits, reference) < BF16_RELATIVE_ERROR

    generated = model.generate(
        input_ids=ids,
        pixel_values=inputs["pixel_values"],
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert generated.sequences.shape == (1, ids.shape[1] + 3)
    assert_close(generated.logits[0], output.logits[:, -1].float(), atol=1e-5, rtol=0)


@each_dtype
def test_mgm_save_and_reload_keep_dtype_and_logits(tmp_path, dtype):
    config = mini_gemini_toys.build(MGM_PRESET, mining_placement="before").config
    model = native_in(dtype, config)
    model.save_pretrained(tmp_path)
    assert checkpoint_dtypes(tmp_path) == {"F32" if dtype == torch.float32 else "BF16"}
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert parameter_dtypes(loaded) == {dtype}
    assert loaded.config.mining_placement == "before"
    inputs = mgm_inputs(seed=3)
    del inputs["labels"]
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = loaded(**inputs).logits
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)


@pytest.mark.slow
@each_dtype
def test_mgm_hd_mode_forward_with_labels(dtype):
    """HD: 1536 px HR image, 2 x 2 crops and the global view, 5 x 576 visual tokens."""
    model = mini_gemini_toys.build("dc-dci-clip-l-336", hd=True).to(dtype)
    ids = mini_gemini_toys.prompt(2880)
    labels = ids.masked_fill(ids == mini_gemini_toys.IMAGE, -100)
    with torch.no_grad():
        output = model(
            input_ids=ids, pixel_values=mini_gemini_toys.hr_pixels(1536, seed=6), labels=labels
        )
    assert output.logits.dtype == dtype
    assert output.logits.shape == (1, 2884, 40)
    assert torch.isfinite(output.loss) and torch.isfinite(output.logits).all()


# ---------------------------------------------------------------------------- codebase swaps


def mgm_style_model(dtype: torch.dtype):
    """The codebase tests' MGM-style model (their towers; mining weights under seed 3), cast to
    ``dtype``."""
    clip, convnext = mini_gemini_codebase_toys.towers()
    torch.manual_seed(3)
    return mini_gemini_codebase_toys.MGMStyleModel(clip, convnext).to(dtype)


@pytest.mark.parametrize(
    ("placement", "dtype"),
    [("after", torch.float32), ("after", torch.bfloat16), ("before", torch.bfloat16)],
    ids=["after-fp32", "after-bf16", "before-bf16"],  # before-fp32: the codebase tests
)
def test_mgm_codebase_swap_in_the_models_dtype(dtype, placement):
    """Mining and connector by hand from the MGM model's own pieces (``unified_resampler``,
    aux tower) give ``encode_images``'s tokens bit for bit, in the model's dtype."""
    model = mgm_style_model(dtype)
    connector = DenseConnector(
        ConnectorConfig.from_preset(
            "dc-dci-clip-l-336",
            vision_dim=mini_gemini_codebase_toys.WIDTH,
            llm_dim=mini_gemini_codebase_toys.LLM,
        )
    )
    swap_mgm(model, connector, placement=placement)
    inner = model.get_model()
    connector = inner.mm_projector
    assert float_dtypes(connector) == float_dtypes(inner.vlm_uni_query_projector) == {dtype}
    images, hr = mini_gemini_codebase_toys.mgm_inputs(768, 1, False, seed=4)
    images, hr = images.to(dtype), hr.to(dtype)
    tokens = model.encode_images(images, hr)
    with torch.no_grad():
        features = connector.make_tap(inner.vision_tower.vision_tower, keep_prefix=False)(images)
        hr_map = inner.get_vision_tower_aux()(hr)
        final = connector.individual_layers[0]
        if placement == "after":
            kept, mined = model.unified_resampler(features[final], hr_map)
            layers = {k: (kept + mined if k == final else v) for k, v in features.items()}
            replaced = LayerFeatures(layers, grids=features.grids, group_means=features.group_means)
            expected = connector(replaced, (24, 24))
        else:
            kept, mined = model.unified_resampler(connector.fuse(features, (24, 24)), hr_map)
            expected = connector.projector(kept + mined)
    assert tokens.dtype == dtype
    assert tokens.shape == (2, 576, mini_gemini_codebase_toys.LLM)
    assert torch.equal(tokens.detach(), expected)
    tokens.float().square().mean().backward()  # the connector trains in the model's dtype
    assert all(p.grad is not None and p.grad.dtype == dtype for p in connector.parameters())


# ---------------------------------------------------------------------------- video chat


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The chat tests' word-level tokenizer over the vicuna_v1 prompt."""
    return chat_toys.tokenizer()


@pytest.fixture(scope="module")
def chat_llava(chat_tokenizer):
    """``dtype -> (Dense LLaVA DCI, processor)`` of the chat tests, cast to dtype."""
    processor = chat_toys.llava_processor(chat_tokenizer)
    return lambda dtype: (chat_toys.llava(chat_tokenizer).to(dtype), processor)


@each_dtype
def test_answer_image_and_video_on_a_dense_llava(chat_llava, chat_tokenizer, tmp_path, dtype):
    v = chat_toys
    model, processor = chat_llava(dtype)
    picture = v.frames(1, seed=5)[0]
    answer = answer_image(model, processor, picture, v.QUESTION, max_new_tokens=3)
    visual = encode_image(model, processor.image_processor, picture)
    assert visual.dtype == dtype
    assert isinstance(answer.text, str) and answer.num_visual_tokens == v.TOKENS
    # The answer is what greedy decoding over the same embeddings gives, in this dtype too.
    embeds, _ = prompt_embeddings(model, chat_tokenizer, v.QUESTION, visual)
    assert embeds.dtype == dtype
    expected = v.greedy(model, embeds, chat_tokenizer.eos_token_id, steps=3)
    assert answer.text == chat_tokenizer.decode(expected, skip_special_tokens=True).strip()

    path = v.write_mp4(tmp_path / "clip.mp4")
    answer = answer_video(model, processor, path, v.QUESTION, num_frames=4, max_new_tokens=3)
    assert isinstance(answer.text, str)
    assert answer.frame_indices == tuple(sample_frame_indices(12, 4))
    assert (answer.pooling, answer.num_visual_tokens) == ("concat", 4 * v.TOKENS)
    for pooling in POOLINGS:  # each temporal pooling on the model's dtype
        pooled = answer_video(
            model, processor, v.frames(6), v.QUESTION, pooling=pooling, max_new_tokens=2
        )
        assert isinstance(pooled.text, str) and pooled.pooling == pooling
        assert pooled.num_visual_tokens == count_video_tokens(6, v.TOKENS, pooling, (4, 4))


@each_dtype
def test_answer_video_on_a_dense_llava_next(chat_tokenizer, dtype):
    """LLaVA-NeXT: each frame's base crop through the tower and connector, no AnyRes tiles."""
    v = chat_toys
    model = chat_toys.llava_next(chat_tokenizer).to(dtype)
    processor = chat_toys.llava_next_processor(chat_tokenizer)
    answer = answer_video(model, processor, v.frames(6), v.QUESTION, num_frames=4, max_new_tokens=3)
    assert isinstance(answer.text, str)
    assert answer.frame_indices == (0, 1, 3, 4)
    assert answer.num_visual_tokens == 4 * v.TOKENS
    image = answer_image(model, processor, v.frames(1, seed=5)[0], v.QUESTION, max_new_tokens=3)
    assert isinstance(image.text, str)
    assert image.num_visual_tokens == model.model.image_token_count((60, 80))


# ---------------------------------------------------------------------------- training


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, t in module.state_dict().items() if not torch.equal(t, before[name])}


#: How the model trains: fp32 weights; bf16 weights (the model cast, optimizer on bf16 tensors);
#: fp32 weights under the Trainer's bf16 autocast (``bf16=True``, fp32 master weights).
TRAINING_MODES = ["fp32", "bf16-weights", "bf16-autocast"]


def training_options(mode: str) -> dict:
    """``StageConfig`` fields for one optimizer step at the recipe's rates in ``mode``."""
    return {
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "warmup_ratio": 0.0,  # no warm-up: the single step has the full learning rate
        "disable_tqdm": True,
        "bf16": mode == "bf16-autocast",  # StageConfig adds use_cpu=True without an accelerator
    }


@pytest.mark.parametrize("mode", TRAINING_MODES)
def test_one_step_of_each_stage(tmp_path, mode):
    """Stage 1 then stage 2 (from stage 1's model), one optimizer step each at the recipe's
    learning rates, the model cast with ``.to()`` for bf16 weights."""
    model = training_toys.build_model()
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    model.to(dtype)
    inner = model.model
    options = training_options(mode)
    for stage in ("align", "instruct"):
        tower, llm = snapshot(inner.vision_tower), snapshot(inner.language_model)
        head, connector = snapshot(model.lm_head), snapshot(inner.multi_modal_projector)
        result = train_stage(
            model,
            training_toys.ToyDataset(),
            training_toys.collate,
            StageConfig(stage=stage, output_dir=str(tmp_path / stage), **options),
        )
        assert result.model is model
        [(step, loss)] = result.losses
        assert step == 1 and loss == loss and abs(loss) < float("inf")  # finite
        assert parameter_dtypes(model) == {dtype}
        assert changed(connector, inner.multi_modal_projector) == {
            "projector.0.weight",
            "projector.0.bias",
            "projector.2.weight",
            "projector.2.bias",
        }
        assert changed(tower, inner.vision_tower) == set()
        if stage == "align":
            assert changed(llm, inner.language_model) == set()
            assert changed(head, model.lm_head) == set()
        else:
            moved = changed(llm, inner.language_model)
            assert changed(head, model.lm_head) == {"weight"}
            if mode == "bf16-weights":
                # Updates of about lr = 2e-5 fall below half a bf16 step of most weights and
                # round away; the optimizer still reaches the LLM.
                assert moved
            else:  # fp32 weights (also under bf16 autocast): every LLM tensor moves
                assert moved == set(llm)
        saved = checkpoint_dtypes(tmp_path / stage)
        assert saved == {"BF16" if dtype == torch.bfloat16 else "F32"}


@pytest.mark.parametrize("mode", TRAINING_MODES)
def test_lora_stage_saves_a_merged_model_that_reloads_in_its_dtype(tmp_path, mode):
    """Stage 2 with LoRA: the adapters merge into the weights in the model's dtype, and the
    saved Dense model reloads with that dtype and the same logits."""
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    model = native_in(dtype, training_toys.build_model().config)
    stage = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path),
        lora=LoraSettings(rank=4, alpha=8),
        **training_options(mode),
    )
    result = train_stage(model, training_toys.ToyDataset(), training_toys.collate, stage)
    [(_, loss)] = result.losses
    assert loss == loss and abs(loss) < float("inf")  # finite
    merged = result.model.eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert parameter_dtypes(merged) == {dtype}
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert parameter_dtypes(loaded) == {dtype}
    batch = training_toys.collate([training_toys.ToyDataset()[0]])
    with torch.no_grad():
        expected = merged(**batch).logits
        actual = loaded(**batch).logits
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)


@each_dtype
def test_mgm_stage_one_backward_reaches_connector_and_mining_in_the_models_dtype(dtype):
    """Mini-Gemini's mining trains with the connector: both get gradients in the model's
    dtype, the two towers and the LLM none."""
    model = mini_gemini_toys.build(MGM_PRESET).to(dtype).train()
    trainable = prepare_stage(model, StageConfig(stage="align", output_dir="unused"))
    inputs = mgm_inputs(seed=4)
    loss = trainable(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    inner = model.model
    for module in (inner.mining, inner.connector):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.dtype == dtype, name
            assert parameter.grad.abs().sum() > 0, name
    frozen = (inner.vision_tower, inner.vision_tower_aux, inner.language_model, model.lm_head)
    assert all(p.grad is None for module in frozen for p in module.parameters())
