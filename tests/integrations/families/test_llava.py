"""HF LLaVA with a Dense Connector: ``DenseLlavaForConditionalGeneration``, ``from_llava`` and
``DenseLlavaProcessor``.

Tiny models built from configs (random weights, nothing downloaded): a CLIP tower with the depth
and grid of CLIP-L/336 (24 blocks, 336 px / patch 14 -> 24x24) and a SigLIP tower with those of
SO400M/384 (27 blocks, 384 px / patch 14 -> 27x27), both 16 wide, so every preset applies with
``vision_dim`` / ``llm_dim`` overrides and gives its published token count. The LLM is a 2-layer
Llama (CLIP) or Qwen2 (SigLIP), 32 wide, vocabulary 120 (tests/support/llava_toys.py, over
:mod:`mmconnect.integrations.applications.tiny_models`, which also builds the tokenizer).
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmconnect import ConnectorConfig, SCISpec, STISpec  # noqa: E402
from mmconnect.integrations.applications.tiny_models import (  # noqa: E402
    tiny_connector,
    tiny_llava_tokenizer,
)
from mmconnect.integrations.families.llava import (  # noqa: E402
    DenseLlavaConfig,
    DenseLlavaForConditionalGeneration,
    DenseLlavaProcessor,
    from_llava,
)
from mmconnect.presets import PUBLISHED_PRESETS  # noqa: E402
from tests.support.llava_toys import (  # noqa: E402
    IMAGE,
    LLM,
    TINY_SIZE,
    TOKENS,
    VISION,
    VOCAB,
    build_dense,
    build_llava,
    build_processor,
    clip_config,
    connector_config,
    is_siglip,
    llm_config,
    pixels,
    prompt_ids,
    siglip_config,
    tiny_config,
    tiny_dense,
)

EXACT = {"atol": 1e-6, "rtol": 0.0}


def test_every_published_preset_is_covered():
    """The paper's presets on CLIP / SigLIP towers (the zoo's are tested with their modules)."""
    assert sorted(TOKENS) == sorted(PUBLISHED_PRESETS)


# ---------------------------------------------------------------------------- inputs


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def count_calls(module: torch.nn.Module, calls: list[int]):
    return module.register_forward_hook(lambda *_: calls.append(1))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_llava_tokenizer()


@pytest.fixture(scope="module")
def dense_models():
    """preset -> Dense LLaVA in eval mode, built once per module (tests must not change them)."""
    cache: dict[str, DenseLlavaForConditionalGeneration] = {}

    def get(preset: str) -> DenseLlavaForConditionalGeneration:
        if preset not in cache:
            cache[preset] = build_dense(preset)
        return cache[preset]

    return get


@pytest.fixture(scope="module")
def llava_multi():
    """HF LLaVA reading ``vision_feature_layer=[-2, 7, 15]`` (HF's own SCI)."""
    return build_llava([-2, 7, 15])


@pytest.fixture(scope="module")
def llava_single():
    """HF LLaVA-1.5 layout: ``vision_feature_layer=-2``, ``mlp2x_gelu`` projector."""
    return build_llava(-2)


@pytest.fixture(scope="module")
def saved_dense(tmp_path_factory):
    """The directory of a Dense LLaVA (DCI) saved with ``save_pretrained``."""
    model = build_dense("dc-dci-clip-l-336")
    directory = tmp_path_factory.mktemp("dense_llava")
    model.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------- HF parity / conversion


def test_sci_conversion_of_list_valued_llava_reproduces_its_logits(llava_multi):
    """HF's list-valued ``vision_feature_layer`` is SCI: converting it to an SCI connector on the
    same layers reuses the projector and gives the same logits."""
    dense = from_llava(llava_multi, connector_config("dc-sci-clip-l-336"))
    assert isinstance(dense, DenseLlavaForConditionalGeneration)
    assert dense.config.model_type == "dense_llava"
    assert dense.config.image_seq_length == 576
    ids, images = prompt_ids(576, batch=2), pixels(2)
    with torch.no_grad():
        expected = llava_multi(input_ids=ids, pixel_values=images).logits
        actual = dense(input_ids=ids, pixel_values=images).logits
    assert_close(actual, expected, **EXACT)


def test_from_llava_shares_tower_llm_and_head_and_copies_projector(llava_single):
    dense = from_llava(llava_single, "baseline-clip-l-336")  # a preset name, resized to the model
    source = llava_single.model
    assert dense.model.vision_tower is source.vision_tower
    assert dense.model.language_model is source.language_model
    assert dense.lm_head is llava_single.lm_head
    for name, parameter in source.vision_tower.named_parameters():
        assert dense.model.vision_tower.get_parameter(name) is parameter
    for name, parameter in source.language_model.named_parameters():
        assert dense.model.language_model.get_parameter(name) is parameter
    projector = dense.connector.projector
    assert torch.equal(projector[0].weight, source.multi_modal_projector.linear_1.weight)
    assert torch.equal(projector[0].bias, source.multi_modal_projector.linear_1.bias)
    assert torch.equal(projector[2].weight, source.multi_modal_projector.linear_2.weight)
    assert torch.equal(projector[2].bias, source.multi_modal_projector.linear_2.bias)
    ids, images = prompt_ids(576), pixels(1, seed=1)
    with torch.no_grad():
        expected = llava_single(input_ids=ids, pixel_values=images).logits
        actual = dense(input_ids=ids, pixel_values=images).logits
    assert_close(actual, expected, **EXACT)


@pytest.mark.parametrize(
    ("source", "reason"),
    [("single", "projector weights do not fit Sequential"), ("relu", "'relu' activation")],
)
def test_from_llava_starts_fresh_when_projector_does_not_fit(source, reason, llava_single, caplog):
    llava = llava_single if source == "single" else build_llava(-2, act="relu")
    preset = "dc-sci-clip-l-336" if source == "single" else "baseline-clip-l-336"
    with caplog.at_level(logging.WARNING, logger="mmconnect.integrations.families.llava"):
        dense = from_llava(llava, connector_config(preset))
    assert "not reusing the projector weights" in caplog.text
    assert reason in caplog.text
    assert dense.model.vision_tower is llava.model.vision_tower  # tower / LLM reused all the same
    assert dense.model.language_model is llava.model.language_model
    fresh = dense.connector.projector[2].weight
    assert not torch.equal(fresh, llava.model.multi_modal_projector.linear_2.weight)


def test_siglip_llava_with_full_strategy_converts_exactly():
    """SigLIP has no CLS token: HF's ``"full"`` strategy keeps all 729 tokens, as the tap does."""
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=siglip_config(),
            text_config=llm_config("qwen2"),
            image_token_id=IMAGE,
            vision_feature_layer=-2,
            vision_feature_select_strategy="full",
        )
    ).eval()
    connector = ConnectorConfig(fusion="none", vision_dim=VISION, llm_dim=LLM, num_layers=27)
    dense = from_llava(llava, connector)
    assert dense.config.image_seq_length == 729
    ids, images = prompt_ids(729), pixels(1, size=384)
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=images).logits
        actual = dense(input_ids=ids, pixel_values=images).logits
    assert_close(actual, expected, **EXACT)


def test_full_strategy_on_a_tower_with_cls_is_refused():
    llava = build_llava(-2)
    llava.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="'full' keeps the CLS token"):
        from_llava(llava, "baseline-clip-l-336")


def test_from_llava_rejects_other_models(dense_models):
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration, got DenseLlava"):
        from_llava(dense_models("baseline-clip-l-336"), "baseline-clip-l-336")


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("preset", "freeze_tower"), [("dc-dci-clip-l-336", False), ("dc-sti-clip-l-336", True)]
)
def test_loss_with_labels_and_backward(preset, freeze_tower):
    model = build_dense(preset).train()
    if freeze_tower:
        model.model.vision_tower.requires_grad_(False)
    ids = prompt_ids(TOKENS[preset])
    labels = ids.masked_fill(ids == IMAGE, -100)
    output = model(input_ids=ids, pixel_values=pixels(1), labels=labels)
    assert torch.isfinite(output.loss)
    expected = F.cross_entropy(
        output.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100
    )  # HF shifts the labels by one
    assert_close(output.loss, expected, atol=1e-5, rtol=1e-5)
    output.loss.backward()

    for name, parameter in model.connector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None
    blocks = model.model.vision_tower.encoder.layers
    if freeze_tower:
        assert all(p.grad is None for p in model.model.vision_tower.parameters())
    else:
        assert blocks[0].mlp.fc1.weight.grad is not None  # DCI reads H[0] .. H[23]
        assert blocks[22].mlp.fc1.weight.grad is not None
        # block 24 never runs (early exit), so it cannot get a gradient
        assert all(p.grad is None for p in blocks[23].parameters())


def test_peft_lora_on_the_llm():
    peft = pytest.importorskip("peft")
    model = build_dense("dc-sci-clip-l-336")
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=r".*vision_tower.*",  # the recipe never adapts the vision tower
        modules_to_save=["multi_modal_projector"],  # the connector trains fully
    )
    wrapped = peft.get_peft_model(model, lora)
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("language_model" in name and "lora_A" in name for name in trainable)
    assert any("multi_modal_projector" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)

    ids = prompt_ids(576)
    labels = ids.masked_fill(ids == IMAGE, -100)
    output = wrapped(input_ids=ids, pixel_values=pixels(1), labels=labels)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    with_grad = {name for name, p in wrapped.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)


# ---------------------------------------------------------------------------- generate / early exit


@pytest.mark.parametrize("preset", sorted(TOKENS))
def test_generate_every_preset(preset, dense_models, tokenizer):
    """Prompt built by the processor (count from the connector), greedy generation, and the
    tower stops after the last layer the connector reads (its last block never runs)."""
    model = dense_models(preset)
    processor = build_processor(preset, tokenizer)
    inputs = processor(
        images=[image()], text=["USER : <image> what is this ASSISTANT :"], return_tensors="pt"
    )
    assert int((inputs["input_ids"] == IMAGE).sum()) == TOKENS[preset]
    assert model.model.image_token_count() == TOKENS[preset]
    assert model.config.image_seq_length == TOKENS[preset]

    blocks = model.model.vision_tower.encoder.layers
    last, penultimate = [], []
    handles = [count_calls(blocks[-1], last), count_calls(blocks[-2], penultimate)]
    try:
        output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    assert output.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert ((output[:, -3:] >= 0) & (output[:, -3:] < VOCAB)).all()
    assert (len(last), len(penultimate)) == (0, 1)  # one prefill, early exit after block 23 / 26


def test_generate_matches_forward(dense_models):
    """Greedy generation's first step sees the same image features as a plain forward."""
    model = dense_models("dc-dci-clip-l-336-efficient")
    ids, images = prompt_ids(144), pixels(1, seed=3)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=images).logits[:, -1]
    output = model.generate(
        input_ids=ids,
        pixel_values=images,
        max_new_tokens=1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert_close(output.logits[0], logits, atol=1e-5, rtol=1e-5)
    assert output.sequences[0, -1] == logits.argmax(-1)[0]


def test_batched_generate_with_left_padding(dense_models):
    """Two prompts of different lengths in one batch generate what each generates alone."""
    preset = "dc-dci-clip-l-336-efficient"
    model = dense_models(preset)
    left_padding = tiny_llava_tokenizer()  # not the shared fixture: padding_side is changed here
    left_padding.padding_side = "left"
    processor = build_processor(preset, left_padding)
    texts = ["<image> what", "USER : <image> describe this photo ASSISTANT :"]
    images = [image(0), image(1)]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    output = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for row, (text, picture) in enumerate(zip(texts, images, strict=True)):
        alone = processor(images=[picture], text=[text], return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(output[row, -3:], expected[0, -3:])


def test_early_exit_runs_only_the_blocks_the_connector_needs():
    connector = ConnectorConfig(
        fusion=SCISpec(final_layer=15, extra_layers=(7,)),
        vision_dim=VISION,
        llm_dim=LLM,
        num_layers=24,
    )
    config = DenseLlavaConfig(
        vision_config=clip_config().to_dict(),
        text_config=llm_config().to_dict(),
        image_token_id=IMAGE,
        connector=connector.to_dict(),
    )
    torch.manual_seed(0)
    model = DenseLlavaForConditionalGeneration(config).eval()
    tower = model.model.vision_tower
    calls = [[] for _ in tower.encoder.layers]
    post = []
    handles = [count_calls(block, calls[i]) for i, block in enumerate(tower.encoder.layers)]
    post_layernorm = next(m for name, m in tower.named_modules() if name.endswith("post_layernorm"))
    handles.append(count_calls(post_layernorm, post))
    try:
        with torch.no_grad():
            model(input_ids=prompt_ids(576), pixel_values=pixels(1))
    finally:
        for handle in handles:
            handle.remove()
    assert [len(c) for c in calls] == [1] * 15 + [0] * 9  # H[15] is the output of block 15
    assert post == []


# ---------------------------------------------------------------------------- save / load


def test_save_pretrained_then_auto_from_pretrained(tmp_path, dense_models):
    model = dense_models("dc-sti-clip-l-336")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dense_llava"
    assert saved["connector"] == connector_config("dc-sti-clip-l-336").to_dict()

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DenseLlavaConfig)
    assert config.connector_config == model.connector.config
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is DenseLlavaForConditionalGeneration
    assert loaded.config.model_type == "dense_llava"
    assert loaded.config.image_seq_length == 720
    assert loaded.connector.config == model.connector.config

    ids, images = prompt_ids(720), pixels(1, seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=images).logits
        actual = loaded(input_ids=ids, pixel_values=images).logits
    assert torch.equal(actual, expected)


def _edit_connector(source, target, **changes):
    shutil.copytree(source, target)
    path = target / "config.json"
    data = json.loads(path.read_text())
    data["connector"].update(changes)
    path.write_text(json.dumps(data))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"fusion": {"kind": "none", "final_layer": 23}},
            "fusion='none', vision_dim=16, llm_dim=32, projector='mlp2x_gelu'): "
            "projector.0.weight: (32, 48) in the weights, (32, 16) expected by the config",
        ),
        (
            {"fusion": {"kind": "sti", "final_layer": 23, "extra_layers": [7, 15]}},
            "fusion='sti'" + ".*" + "projector.0.weight: (32, 48) in the weights, (32, 16)",
        ),
        ({"projector": "mlp3x_gelu"}, "missing projector.4.weight; missing projector.4.bias"),
        (
            {"vision_dim": 24},
            "connector vision_dim=24 does not match the vision tower's hidden_size (16)",
        ),
        ({"llm_dim": 64}, "connector llm_dim=64 does not match the LLM's hidden_size (32)"),
        # Same shapes, other meaning: only the saved config fingerprint tells.
        (
            {"fusion": {"kind": "sci", "final_layer": 23, "extra_layers": [7, 15]}},
            "fusion='sci'.*saved with a different connector config",
        ),
        (
            {
                "fusion": {
                    "kind": "dci",
                    "final_layer": 23,
                    "groups": [list(range(0, 8)), list(range(8, 24))],
                }
            },
            "saved with a different connector config",
        ),
        (
            {
                "fusion": {
                    "kind": "dci",
                    "final_layer": -1,
                    "groups": [list(range(0, 12)), list(range(12, 24))],
                }
            },
            "saved with a different connector config",
        ),
    ],
    ids=[
        "fusion-none",
        "fusion-sti",
        "projector",
        "vision_dim",
        "llm_dim",
        "sci-same-shapes",
        "groups",
        "final-layer",
    ],
)
def test_checkpoint_whose_connector_config_does_not_match_its_weights(
    saved_dense, tmp_path, changes, message
):
    """HF alone would re-initialise missing connector weights silently, or fail on a shape with
    an error that does not say why: the library checks the saved connector first."""
    directory = _edit_connector(saved_dense, tmp_path / "edited", **changes)
    pattern = ".*".join(re.escape(part) for part in message.split(".*"))
    with pytest.raises(ValueError, match=pattern):
        AutoModelForImageTextToText.from_pretrained(directory)


# ---------------------------------------------------------------------------- official weights


@pytest.mark.parametrize(
    ("preset", "in_dim"),
    [
        ("baseline-clip-l-336", VISION),
        ("dc-sci-clip-l-336", 3 * VISION),
        ("dc-dci-clip-l-336", 3 * VISION),
    ],
)
def test_load_official_mm_projector_bin(tmp_path, preset, in_dim):
    """LLaVA-1.5 (in = C) and Dense Connector (in = 3C) checkpoints: ``model.mm_projector.{0,2}``."""
    model = build_dense(preset)
    generator = torch.Generator().manual_seed(7)
    state = {
        "model.mm_projector.0.weight": torch.randn(LLM, in_dim, generator=generator),
        "model.mm_projector.0.bias": torch.randn(LLM, generator=generator),
        "model.mm_projector.2.weight": torch.randn(LLM, LLM, generator=generator),
        "model.mm_projector.2.bias": torch.randn(LLM, generator=generator),
    }
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)
    model.connector.load_projector_weights(path)
    projector = model.connector.projector
    assert torch.equal(projector[0].weight, state["model.mm_projector.0.weight"])
    assert torch.equal(projector[0].bias, state["model.mm_projector.0.bias"])
    assert torch.equal(projector[2].weight, state["model.mm_projector.2.weight"])
    assert torch.equal(projector[2].bias, state["model.mm_projector.2.bias"])


def test_mm_projector_bin_of_another_width_is_refused(tmp_path):
    path = tmp_path / "mm_projector.bin"
    torch.save(
        {
            "model.mm_projector.0.weight": torch.zeros(LLM, VISION),
            "model.mm_projector.0.bias": torch.zeros(LLM),
            "model.mm_projector.2.weight": torch.zeros(LLM, LLM),
            "model.mm_projector.2.bias": torch.zeros(LLM),
        },
        path,
    )
    model = build_dense("dc-sci-clip-l-336")
    before = model.connector.projector[0].weight.clone()
    with pytest.raises(
        ValueError,
        match=re.escape("0.weight: (32, 16) in the file, (32, 48) expected by the config"),
    ):
        model.connector.load_projector_weights(path)
    assert torch.equal(model.connector.projector[0].weight, before)


# ---------------------------------------------------------------------------- processor


@pytest.mark.parametrize("preset", sorted(TOKENS))
def test_processor_counts_per_image(preset, tokenizer):
    processor = build_processor(preset, tokenizer)
    inputs = processor(
        images=[image(0), image(1), image(2)],
        text=["<image> what is this", "USER : <image> describe <image>"],
        return_tensors="pt",
        padding=True,
    )
    counts = (inputs["input_ids"] == IMAGE).sum(dim=1).tolist()
    assert counts == [TOKENS[preset], 2 * TOKENS[preset]]
    side = 384 if is_siglip(preset) else 336
    assert tuple(inputs["pixel_values"].shape) == (3, 3, side, side)
    assert processor.num_image_tokens(side, side) == TOKENS[preset]


def test_processor_save_and_load_keeps_the_connector(tmp_path, tokenizer):
    processor = build_processor("dc-sti-clip-l-336", tokenizer)
    processor.save_pretrained(tmp_path)
    loaded = DenseLlavaProcessor.from_pretrained(tmp_path)
    assert loaded.connector == connector_config("dc-sti-clip-l-336").to_dict()
    assert loaded.patch_size == 14
    inputs = loaded(images=[image()], text=["<image> what"], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE).sum()) == 720


def test_processor_needs_connector_and_patch_size(tokenizer):
    with pytest.raises(ValueError, match=r"needs connector=.*and patch_size="):
        DenseLlavaProcessor(
            image_processor=CLIPImageProcessor(), tokenizer=tokenizer, patch_size=14
        )


def test_processor_refuses_prompt_with_other_image_count(tokenizer):
    processor = build_processor("baseline-clip-l-336", tokenizer)
    with pytest.raises(ValueError, match=r"2 <image> tokens and 1 images"):
        processor(images=[image()], text=["<image> <image> what"], return_tensors="pt")


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("ids", "images", "message"),
    [
        (prompt_ids(575), 1, "the prompt holds 575 image tokens but 1 image(s) fill 576"),
        (prompt_ids(576), 2, "the prompt holds 576 image tokens but 2 image(s) fill 1152"),
        (prompt_ids(720), 1, "the prompt holds 720 image tokens but 1 image(s) fill 576"),
    ],
)
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_image_token_count_mismatch(dense_models, ids, images, message, call):
    """Both counts named, raised before the vision tower runs (also in generate, where HF
    encodes the images before the first forward)."""
    model = dense_models("baseline-clip-l-336")
    calls = []
    handle = count_calls(model.model.vision_tower.encoder.layers[0], calls)
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            if call == "forward":
                model(input_ids=ids, pixel_values=pixels(images))
            else:
                model.generate(input_ids=ids, pixel_values=pixels(images), max_new_tokens=1)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("size", [224, 392])
def test_pixel_size_must_match_the_tower(dense_models, size):
    model = dense_models("dc-sci-clip-l-336")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"[images, 3, 336, 336] (image_size=336) for this vision tower, got shape (1, 3, {size}, {size})"
        ),
    ):
        model(input_ids=prompt_ids(576), pixel_values=pixels(1, size=size))


def test_pixel_size_mismatch_from_a_processor_for_another_size(dense_models, tokenizer):
    """A processor set up for 56 px images (16 tokens per image): the model names the pixel
    size the tower needs before it counts the prompt's image tokens."""
    processor = DenseLlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        connector=connector_config("baseline-clip-l-336"),
    )
    inputs = processor(images=[image()], text=["<image> what"], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE).sum()) == 16
    with pytest.raises(
        ValueError,
        match=re.escape(
            "pixel_values must be [images, 3, 336, 336] (image_size=336) for this vision tower, "
            "got shape (1, 3, 56, 56): resize the images with the model's processor"
        ),
    ):
        dense_models("baseline-clip-l-336")(**inputs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"vision_dim": 24},
            "connector vision_dim=24 does not match the vision tower's hidden_size (16)",
        ),
        ({"llm_dim": 64}, "connector llm_dim=64 does not match the LLM's hidden_size (32)"),
    ],
)
def test_connector_width_mismatch(llava_single, overrides, message):
    config = connector_config("dc-dci-clip-l-336", **overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        from_llava(llava_single, config)
    with pytest.raises(ValueError, match=re.escape(message)):
        DenseLlavaForConditionalGeneration(
            DenseLlavaConfig(
                vision_config=clip_config().to_dict(),
                text_config=llm_config().to_dict(),
                image_token_id=IMAGE,
                connector=config.to_dict(),
            )
        )


def test_connector_for_another_depth(llava_single):
    with pytest.raises(
        ValueError,
        match=re.escape("num_layers=27 does not match the vision tower's num_hidden_layers (24)"),
    ):
        from_llava(llava_single, connector_config("dc-sci-siglip-so400m"))


def test_vision_feature_layer_cannot_override_the_connector(dense_models):
    model = dense_models("dc-sci-clip-l-336")
    with pytest.raises(ValueError, match=r"vision_feature_layer=-3 cannot change them"):
        model.model.get_image_features(pixels(1), vision_feature_layer=-3)


# ---------------------------------------------------------------------------- the HF model contract
# (issue 12: the six defects transformers' own tests found; issue 11: inputs refused early)


def _rewrite_weights(directory, keep) -> None:
    """Rewrite ``model.safetensors`` of ``directory`` with only the keys ``keep`` accepts."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(path)
    save_file({k: v for k, v in state.items() if keep(k)}, path, metadata={"format": "pt"})


def test_init_weights_after_a_meta_build_sets_the_config_fingerprint(tmp_path):
    """Built on the meta device, materialised and initialised with ``init_weights()``, the
    model holds its connector's fingerprint: it accepts its own weights, and what it saves
    reloads (before: an uninitialised buffer, refused on reload)."""
    from mmconnect.connector import config_fingerprint

    config = tiny_config()
    with torch.device("meta"):
        model = DenseLlavaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    model.init_weights()
    expected = config_fingerprint(tiny_connector())
    assert int(model.connector.config_fingerprint) == expected
    model.load_state_dict(model.state_dict())  # its own weights
    model.save_pretrained(tmp_path)
    loaded = DenseLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert int(loaded.connector.config_fingerprint) == expected


def test_checkpoint_without_the_fingerprint_loads_and_round_trips(tmp_path):
    """A parameter-only checkpoint (no ``config_fingerprint``) loads with the fingerprint set from
    the config, gives the same logits, and its own save reloads."""
    from mmconnect.connector import config_fingerprint

    model = tiny_dense()
    model.save_pretrained(tmp_path / "full")
    _rewrite_weights(tmp_path / "full", lambda key: not key.endswith("config_fingerprint"))
    loaded = DenseLlavaForConditionalGeneration.from_pretrained(tmp_path / "full")
    assert int(loaded.connector.config_fingerprint) == config_fingerprint(tiny_connector())
    ids, images = prompt_ids(4), pixels(1, size=TINY_SIZE)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, pixel_values=images).logits,
            model(input_ids=ids, pixel_values=images).logits,
        )
    loaded.save_pretrained(tmp_path / "again")
    again = DenseLlavaForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert int(again.connector.config_fingerprint) == config_fingerprint(tiny_connector())


def test_vision_tower_weights_missing_from_a_checkpoint_get_clip_initialisation(tmp_path):
    """Stock LLaVA initialises missing tower weights as CLIP does (attention projections with
    std hidden**-0.5 * (2 * layers)**-0.5 = 16**-0.5 * 48**-0.5 = 0.0361 here, not the generic
    0.02); so does Dense LLaVA, compared on one checkpoint layout of each."""
    dense, stock = tmp_path / "dense", tmp_path / "stock"
    build_dense("baseline-clip-l-336").save_pretrained(dense)
    build_llava(-2).save_pretrained(stock)
    for directory in (dense, stock):
        _rewrite_weights(directory, lambda key: "vision_tower" not in key)
    torch.manual_seed(1)
    dense_tower = DenseLlavaForConditionalGeneration.from_pretrained(dense).model.vision_tower
    torch.manual_seed(1)
    stock_tower = LlavaForConditionalGeneration.from_pretrained(stock).model.vision_tower

    def spread(tower, name: str) -> float:
        weights = [layer.get_submodule(name).weight.flatten() for layer in tower.encoder.layers]
        return float(torch.cat(weights).detach().std())

    expected = {"self_attn.q_proj": 16**-0.5 * 48**-0.5, "mlp.fc1": 32**-0.5}
    for name, std in expected.items():
        assert spread(dense_tower, name) == pytest.approx(std, rel=0.05), name
        assert spread(stock_tower, name) == pytest.approx(std, rel=0.05), name
    class_embedding = dense_tower.embeddings.class_embedding.detach()
    assert float(class_embedding.std()) == pytest.approx(0.25, rel=0.25)


def test_get_image_features_returns_what_stock_llava_returns(llava_multi):
    """``last_hidden_state`` (the connector's final layer without CLS), ``hidden_states`` and
    ``attentions`` on request, a tuple for ``return_dict=False``; the pooled features equal the
    stock model's for the converted SCI connector."""
    dense = from_llava(llava_multi, connector_config("dc-sci-clip-l-336"))
    images = pixels(2, seed=4)
    with torch.no_grad():
        plain = dense.model.get_image_features(images)
        stock = llava_multi.model.get_image_features(images, return_dict=True)
        full = dense.model.get_image_features(images, output_hidden_states=True)
        as_tuple = dense.model.get_image_features(images, return_dict=False)
        tower = llava_multi.model.vision_tower(images, output_hidden_states=True)
    assert plain.hidden_states is None and plain.attentions is None
    assert torch.equal(plain.last_hidden_state, tower.hidden_states[-2][:, 1:])
    assert tuple(plain.last_hidden_state.shape) == (2, 576, VISION)
    for ours, theirs in zip(plain.pooler_output, stock.pooler_output, strict=True):
        assert_close(ours, theirs, **EXACT)
    assert len(full.hidden_states) == 25 and full.attentions is None
    assert torch.equal(full.last_hidden_state, plain.last_hidden_state)
    for ours, theirs in zip(full.hidden_states, tower.hidden_states, strict=True):
        assert torch.equal(ours, theirs)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], plain.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[1], plain.pooler_output, strict=True))


def test_get_image_features_attentions_and_the_config_flags():
    """Attentions (eager attention) per block; the tower config's output_* flags count as
    requests, as HF reads them."""
    model = tiny_dense()
    model.set_attn_implementation("eager")
    images = pixels(2, size=TINY_SIZE)
    with torch.no_grad():
        plain = model.model.get_image_features(images)
        asked = model.model.get_image_features(images, output_attentions=True)
        model.config.vision_config.output_hidden_states = True
        from_config = model.model.get_image_features(images)
    assert asked.hidden_states is None
    assert [tuple(a.shape) for a in asked.attentions] == [(2, 2, 5, 5)] * 4
    assert len(from_config.hidden_states) == 5
    for outputs in (asked, from_config):
        assert torch.equal(outputs.last_hidden_state, plain.last_hidden_state)
        for ours, theirs in zip(outputs.pooler_output, plain.pooler_output, strict=True):
            assert torch.equal(ours, theirs)


def test_forward_keeps_the_stock_signature():
    """Positional arguments after ``pixel_values`` work as for HF's LlavaModel (before: a
    TypeError), and the signature is the stock one."""
    import inspect

    from transformers import LlavaModel

    from mmconnect.integrations.families.llava import DenseLlavaModel

    assert inspect.signature(DenseLlavaModel.forward) == inspect.signature(LlavaModel.forward)
    model = tiny_dense()
    ids, images = prompt_ids(4, batch=2), pixels(2, size=TINY_SIZE)
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    with torch.no_grad():
        positional = model.model(ids, images, mask).last_hidden_state
        named = model.model(input_ids=ids, pixel_values=images, attention_mask=mask)
    assert torch.equal(positional, named.last_hidden_state)
    with pytest.raises(ValueError, match=re.escape("the prompt holds 3 image tokens")):
        model.model(prompt_ids(3), pixels(1, size=TINY_SIZE))  # still checked first


@pytest.mark.parametrize("load", ["class", "auto"])
def test_processor_keeps_its_chat_template(tmp_path, tokenizer, load):
    processor = build_processor("dc-dci-clip-l-336", tokenizer)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    processor = DenseLlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        connector=connector_config("dc-dci-clip-l-336"),
        chat_template=template,
    )
    processor.save_pretrained(tmp_path)
    loader = DenseLlavaProcessor if load == "class" else transformers.AutoProcessor
    loaded = loader.from_pretrained(tmp_path)
    assert type(loaded) is DenseLlavaProcessor
    assert loaded.chat_template == template
    assert loaded.connector == connector_config("dc-dci-clip-l-336").to_dict()


@pytest.mark.parametrize(("fusion", "tokens"), [("none", 16), ("sti", 20)])
def test_num_multimodal_tokens_is_what_the_processor_inserts(tokenizer, fusion, tokens):
    """What serving engines read (``_get_num_multimodal_tokens``) equals the processor's
    expansion: 4 x 4 patches at 56 px, plus STI's 4 pooled tokens (before: 15, one less)."""
    config = ConnectorConfig(
        fusion=STISpec(extra_layers=(7, 15)) if fusion == "sti" else fusion,
        vision_dim=VISION,
        llm_dim=LLM,
        num_layers=24,
    )
    processor = DenseLlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        connector=config,
    )
    data = processor._get_num_multimodal_tokens(image_sizes=[(48, 64), (300, 100)])
    assert data.num_image_tokens == [tokens, tokens]
    assert data.num_image_patches == [1, 1]
    inputs = processor(images=[image()], text=["<image> what"], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE).sum()) == tokens


def test_num_multimodal_tokens_with_a_siglip_image_processor(tokenizer):
    processor = build_processor("dc-dci-siglip-so400m", tokenizer)
    assert processor._get_num_multimodal_tokens(image_sizes=[(10, 10)]).num_image_tokens == [729]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (
            torch.zeros(0, 3, TINY_SIZE, TINY_SIZE),
            "pixel_values holds 0 images (shape (0, 3, 28, 28)); pass at least one image "
            "[images, 3, 28, 28], or pixel_values=None",
        ),
        (
            torch.zeros(3, TINY_SIZE, TINY_SIZE),
            "pixel_values of shape (3, 28, 28) is one unbatched image; this vision tower takes "
            "a batch [images, 3, 28, 28]: add the batch dimension (pixel_values.unsqueeze(0))",
        ),
        (
            torch.zeros(1, 1, TINY_SIZE, TINY_SIZE),
            "pixel_values have 1 channel(s) but this vision tower takes 3 (RGB), "
            "[images, 3, 28, 28], got shape (1, 1, 28, 28): convert the images to RGB",
        ),
        (
            torch.zeros(1, 3, 56, 56),
            "pixel_values must be [images, 3, 28, 28] (image_size=28) for this vision tower, got "
            "shape (1, 3, 56, 56): resize the images with the model's processor (Dense models "
            "do not interpolate position embeddings, interpolate_pos_encoding is not supported)",
        ),
    ],
    ids=["no-images", "unbatched", "one-channel", "larger"],
)
@pytest.mark.parametrize("call", ["forward", "generate", "get_image_features"])
def test_bad_pixel_values_are_refused_before_the_tower_runs(images, message, call):
    model = tiny_dense()
    calls = []
    handle = count_calls(model.model.vision_tower.encoder.layers[0], calls)
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            if call == "forward":
                model(input_ids=prompt_ids(4), pixel_values=images)
            elif call == "generate":
                model.generate(input_ids=prompt_ids(4), pixel_values=images, max_new_tokens=1)
            else:
                model.model.get_image_features(images)
    finally:
        handle.remove()
    assert calls == []


def test_interpolate_pos_encoding_is_refused():
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True is not supported"):
        tiny_dense().model.get_image_features(
            pixels(1, size=TINY_SIZE), interpolate_pos_encoding=True
        )
