"""The complete Mini-Gemini MLLM: ``DenseMGMForConditionalGeneration``, its processor,
``replace_connector``, HD mode, save / load and two-stage training.

Tiny models from configs (nothing downloaded; tests/support/mini_gemini_toys.py): a CLIP tower
with CLIP-L/336's depth and grid (24 blocks, 336 px / patch 14 -> 24x24) but 16 wide, a 4-stage
ConvNeXt 8/16/32/64 wide (timm ``convnext_atto`` resized: 120 HR channels), a 2-layer Llama 32
wide.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
)

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.integrations.applications.tiny_models import (
    tiny_llava_tokenizer,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.mini_gemini import (
    DenseMGMConfig,
    DenseMGMForConditionalGeneration,
    DenseMGMProcessor,
    replace_connector,
)
from mmconnect.integrations.training.stages import (
    StageConfig,
    parameter_groups,
    prepare_stage,
    train_stage,
)
from tests.support.mini_gemini_toys import (
    AUX,
    IMAGE,
    LLM,
    VISION,
    build,
    connector,
    hr_pixels,
    prompt,
)

OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def mined(model, lr_view: torch.Tensor, hr_map: torch.Tensor) -> torch.Tensor:
    """One view by hand: CLIP H[-2] without CLS, the mining formula of docs/mini-gemini.md, the projector."""
    inner = model.model
    states = inner.vision_tower(lr_view, output_hidden_states=True).hidden_states
    tokens = states[-2][0, 1:]  # [576, C]
    windows = hr_map[0].reshape(-1, 24, 8, 24, 8).permute(1, 3, 2, 4, 0).reshape(576, 64, -1)
    q = inner.mining.query(tokens)
    k, v = inner.mining.key(windows), inner.mining.value(windows)
    attention = torch.softmax(torch.einsum("nc,nrc->nr", q, k) / VISION**0.5, dim=-1)
    return inner.connector.projector(tokens + torch.einsum("nr,nrc->nc", attention, v))


def hr_map(model, pixels: torch.Tensor) -> torch.Tensor:
    convnext = model.model.vision_tower_aux
    x = convnext.stem(pixels)
    maps = []
    for stage in convnext.stages:
        x = stage(x)
        maps.append(x)
    size = maps[0].shape[-2:]
    return torch.cat(
        [maps[0]]
        + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]],
        dim=1,
    )


# ---------------------------------------------------------------------------- shapes and parity


@pytest.mark.parametrize(
    ("preset", "placement", "tokens"),
    [
        ("baseline-clip-l-336", "after", 576),
        ("dc-dci-clip-l-336", "after", 576),
        ("dc-dci-clip-l-336", "before", 576),
        ("dc-sti-clip-l-336", "after", 720),
        ("dc-dci-clip-l-336-efficient", "after", 144),
    ],
)
def test_token_counts_and_loss_at_336_768(preset, placement, tokens):
    model = build(preset, mining_placement=placement)
    assert model.config.image_seq_length == tokens
    assert model.model.image_token_count() == tokens
    assert model.model.mining.lr_dim == (3 * VISION if placement == "before" else VISION)
    ids = prompt(tokens)
    output = model(input_ids=ids, pixel_values=hr_pixels(), labels=ids)
    assert output.logits.shape == (1, tokens + 4, 40)
    assert torch.isfinite(output.loss)
    features = model.model.get_image_features(hr_pixels(count=2)).pooler_output
    assert [tuple(f.shape) for f in features] == [(tokens, LLM)] * 2


def test_baseline_matches_the_reference_semantics_by_hand():
    model = build("baseline-clip-l-336")
    pixels = hr_pixels(seed=5)
    with torch.no_grad():
        actual = model.model.get_image_features(pixels).pooler_output[0]
        lr = F.interpolate(pixels, size=(336, 336), mode="bilinear", align_corners=False)
        expected = mined(model, lr, hr_map(model, pixels))
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_hd_mode_2880_tokens_in_global_00_01_10_11_order():
    model = build("baseline-clip-l-336", hd=True)
    assert model.config.image_seq_length == 2880
    pixels = hr_pixels(1536, seed=6)
    with torch.no_grad():
        actual = model.model.get_image_features(pixels).pooler_output[0]
        assert actual.shape == (2880, LLM)
        lr672 = F.interpolate(pixels, size=(672, 672), mode="bilinear", align_corners=False)
        full_map = hr_map(model, pixels)  # [1, 120, 384, 384]
        glance = F.interpolate(lr672, size=(336, 336), mode="bilinear", align_corners=False)
        glance_map = F.interpolate(full_map, size=(192, 192), mode="bilinear", align_corners=False)
        views = [(glance, glance_map)]
        for row in range(2):
            for column in range(2):
                crop = lr672[:, :, 336 * row : 336 * (row + 1), 336 * column : 336 * (column + 1)]
                window = full_map[
                    :, :, 192 * row : 192 * (row + 1), 192 * column : 192 * (column + 1)
                ]
                views.append((crop, window))
        expected = torch.cat([mined(model, lr, hr) for lr, hr in views])
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_hd_mode_with_a_dense_connector_runs_per_view():
    model = build("dc-dci-clip-l-336", hd=True)
    ids = prompt(2880)
    output = model(input_ids=ids, pixel_values=hr_pixels(1536), labels=ids)
    assert output.logits.shape == (1, 2884, 40)


# ---------------------------------------------------------------------------- training


def test_stage_one_trains_projector_and_mining_only():
    model = build("dc-dci-clip-l-336").train()
    trainable = prepare_stage(model, StageConfig(stage="align", output_dir="unused"))
    groups = parameter_groups(trainable)
    mining = sum(p.numel() for p in model.model.mining.parameters())
    projector = sum(p.numel() for p in model.model.connector.parameters())
    assert groups["connector"] == (mining + projector, mining + projector)
    assert groups["vision_tower"][0] == 0 and groups["llm"][0] == 0
    ids = prompt(576)
    trainable(input_ids=ids, pixel_values=hr_pixels(), labels=ids).loss.backward()
    inner = model.model
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner.mining.parameters())
    assert all(p.grad is not None for p in inner.connector.projector.parameters())
    frozen = [inner.vision_tower, inner.vision_tower_aux, inner.language_model, model.lm_head]
    assert all(p.grad is None for module in frozen for p in module.parameters())


def test_stage_two_adds_the_llm_but_not_the_towers():
    model = build("dc-dci-clip-l-336").train()
    prepare_stage(model, StageConfig(stage="instruct", output_dir="unused"))
    inner = model.model
    assert all(p.requires_grad for p in inner.language_model.parameters())
    assert all(p.requires_grad for p in inner.mining.parameters())
    assert not any(p.requires_grad for p in inner.vision_tower_aux.parameters())
    assert not any(p.requires_grad for p in inner.vision_tower.parameters())


class _Toy(torch.utils.data.Dataset):
    def __init__(self, tokens: int) -> None:
        generator = torch.Generator().manual_seed(3)
        self.tokens = tokens
        self.pixels = torch.randn(4, 3, 768, 768, generator=generator)
        self.answers = torch.randint(11, 39, (4, 3), generator=generator)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        head = prompt(self.tokens)[0, :-2]
        ids = torch.cat([head, self.answers[index]])
        labels = torch.cat([torch.full_like(head, -100), self.answers[index]])
        return {"input_ids": ids, "labels": labels, "pixel_values": self.pixels[index]}


def _collate(samples):
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


@pytest.mark.slow
def test_two_stage_training_then_auto_load(tmp_path):
    model = build("dc-dci-clip-l-336").train()
    tower_before = {k: v.clone() for k, v in model.model.vision_tower_aux.state_dict().items()}
    mining_before = {k: v.clone() for k, v in model.model.mining.state_dict().items()}
    common = {"max_steps": 2, "per_device_train_batch_size": 2, "disable_tqdm": True}
    first = train_stage(
        model,
        _Toy(576),
        _collate,
        StageConfig(stage="align", output_dir=str(tmp_path / "s1"), **common),
    )
    second = train_stage(
        first.model,
        _Toy(576),
        _collate,
        StageConfig(stage="instruct", output_dir=str(tmp_path / "s2"), **common),
    )
    trained = second.model
    assert any(
        not torch.equal(mining_before[k], v) for k, v in trained.model.mining.state_dict().items()
    )
    assert all(
        torch.equal(tower_before[k], v)
        for k, v in trained.model.vision_tower_aux.state_dict().items()
    )
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "s2").eval()
    assert type(loaded) is DenseMGMForConditionalGeneration
    ids = prompt(576)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, pixel_values=hr_pixels()).logits,
            trained.eval()(input_ids=ids, pixel_values=hr_pixels()).logits,
        )


# ---------------------------------------------------------------------------- save / load, swap


def test_save_pretrained_then_auto_from_pretrained(tmp_path):
    model = build("dc-dci-clip-l-336", mining_placement="before")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dense_mgm"
    assert (saved["mining_placement"], saved["image_size_aux"]) == ("before", 768)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DenseMGMConfig)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is DenseMGMForConditionalGeneration
    assert loaded.connector.config == model.connector.config
    ids = prompt(576)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=hr_pixels()).logits
        actual = loaded(input_ids=ids, pixel_values=hr_pixels()).logits
    assert torch.equal(actual, expected)


def test_replace_connector_switches_the_config_and_round_trips(tmp_path, caplog):
    model = build("baseline-clip-l-336")
    mining = model.model.mining
    replace_connector(model, "dc-dci-clip-l-336")
    assert model.model.mining is mining  # after mining: CLIP's width, trained mining kept
    assert model.config.connector == connector("dc-dci-clip-l-336").to_dict()
    replace_connector(model, DenseConnector(connector("dc-sti-clip-l-336")))
    assert model.model.mining is mining
    assert (model.config.mining_placement, model.config.image_seq_length) == ("after", 720)
    assert "untrained mining" not in caplog.text
    replace_connector(model, connector("dc-sci-clip-l-336"), placement="before")
    assert model.model.mining.lr_dim == 3 * VISION
    assert "mining queries change width 16 -> 48: new, untrained mining projections" in caplog.text
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    ids = prompt(576)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, pixel_values=hr_pixels()).logits,
            model(input_ids=ids, pixel_values=hr_pixels()).logits,
        )


def test_generate_with_the_processor(tmp_path):
    tokenizer = tiny_llava_tokenizer()
    model = build("dc-dci-clip-l-336", hd=True)
    processor = DenseMGMProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 1536}, crop_size={"height": 1536, "width": 1536}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        connector=model.connector.config,
        image_size=336,
        image_size_aux=1536,
        image_grid=2,
        image_global=True,
        aux_normalization=OPENAI_CLIP,
    )
    picture = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    inputs = processor(images=[picture], text=["<image> what is in the image"], return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE).sum()) == 2880
    assert inputs["pixel_values"].shape == (1, 3, 1536, 1536)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    processor.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert type(again) is DenseMGMProcessor
    assert (again.image_size_aux, again.image_grid, again.image_global) == (1536, 2, True)
    assert (
        again(images=[picture], text=["<image> what"], return_tensors="pt")["input_ids"].shape[1]
        == 2881  # no BOS: this word-level tokenizer adds none
    )


# ---------------------------------------------------------------------------- bad input


def test_hr_size_that_is_not_a_multiple_of_the_lr_grid():
    with pytest.raises(
        ValueError, match=r"image_size_aux=700 gives a 175x175 HR map .* multiple of 96"
    ):
        build(image_size_aux=700)
    with pytest.raises(ValueError, match=r"image_size_aux=864 .*108 cells a side per view"):
        build(image_size_aux=864, image_grid=2)


def test_bad_hd_and_placement_fields():
    with pytest.raises(ValueError, match="image_global=True adds a global view"):
        build(image_global=True)
    with pytest.raises(ValueError, match="image_grid must be a positive int"):
        build(image_grid=0)
    with pytest.raises(
        ValueError, match=r"mining_placement must be one of \('after', 'before'\), got 'inside'"
    ):
        build(mining_placement="inside")
    with pytest.raises(ValueError, match="placement='before' mines on the encoder grid"):
        build("dc-dci-clip-l-336-efficient", mining_placement="before")
    with pytest.raises(ValueError, match="STI appends pooled tokens that have none"):
        build("dc-sti-clip-l-336", mining_placement="before")


def test_pixels_of_another_size_and_wrong_image_token_count():
    model = build()
    with pytest.raises(ValueError, match=re.escape("[images, 3, 768, 768] (image_size_aux=768)")):
        model.model.get_image_features(hr_pixels(336))
    with pytest.raises(ValueError, match=r"holds 144 image tokens but 1 image\(s\) fill 576"):
        model(input_ids=prompt(144), pixel_values=hr_pixels())


def test_connector_that_does_not_fit_the_tower():
    with pytest.raises(ValueError, match=r"connector vision_dim=24 does not match"):
        DenseMGMForConditionalGeneration(
            DenseMGMConfig(
                vision_config=tiny_vision_config(
                    "clip",
                    blocks=24,
                    width=VISION,
                    intermediate_size=32,
                    heads=2,
                    image_size=336,
                ),
                text_config=tiny_text_config(width=LLM, blocks=1, heads=2),
                connector=ConnectorConfig.from_preset(
                    "dc-dci-clip-l-336", vision_dim=24, llm_dim=LLM
                ).to_dict(),
                aux_encoder=AUX,
            )
        )
    model = build()
    with pytest.raises(ValueError, match=r"connector vision_dim=24 does not match"):
        replace_connector(
            model, ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=24, llm_dim=LLM)
        )
    with pytest.raises(TypeError, match="must be a DenseMGMForConditionalGeneration"):
        replace_connector(torch.nn.Linear(2, 2), "dc-dci-clip-l-336")


def test_processor_normalisation_and_size_checks():
    tokenizer = tiny_llava_tokenizer()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    options = {
        "tokenizer": tokenizer,
        "patch_size": 14,
        "connector": connector("baseline-clip-l-336"),
        "image_size": 336,
        "image_size_aux": 768,
    }
    with pytest.raises(ValueError, match="different normalisation statistics"):
        DenseMGMProcessor(
            image_processor=CLIPImageProcessor(), aux_normalization=imagenet, **options
        )
    small = DenseMGMProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        **options,
    )
    picture = np.zeros((30, 30, 3), dtype=np.uint8)
    with pytest.raises(
        ValueError,
        match="made 336x336 pixels but Mini-Gemini takes the HR image at image_size_aux=768",
    ):
        small(images=[picture], text=["<image> what"], return_tensors="pt")


def test_checkpoint_without_mining_weights_is_refused(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".mining." not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match=re.escape("missing query.1.weight")):
        DenseMGMForConditionalGeneration.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- the HF model contract
# (issue 12: defects transformers' own tests found; issue 11: inputs refused early)


def test_init_weights_after_a_meta_build_sets_the_config_fingerprint():
    from mmconnect.connector import config_fingerprint

    config = build("dc-dci-clip-l-336").config
    with torch.device("meta"):
        model = DenseMGMForConditionalGeneration(config)
    model.to_empty(device="cpu")
    model.init_weights()
    expected = config_fingerprint(connector("dc-dci-clip-l-336"))
    assert int(model.connector.config_fingerprint) == expected
    model.load_state_dict(model.state_dict())


def test_forward_and_get_image_features_follow_the_stock_contract():
    """Positional arguments after ``pixel_values`` work; ``get_image_features`` returns the CLIP
    tower's tapped final layer per view as ``last_hidden_state`` and a tuple on request."""
    import inspect

    from transformers import LlavaModel

    from mmconnect.integrations.families.mini_gemini import DenseMGMModel

    assert inspect.signature(DenseMGMModel.forward) == inspect.signature(LlavaModel.forward)
    model = build()
    ids, pixels = prompt(576), hr_pixels()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        positional = model.model(ids, pixels, mask).last_hidden_state
        named = model.model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        features = model.model.get_image_features(pixels)
        as_tuple = model.model.get_image_features(pixels, return_dict=False)
    assert torch.equal(positional, named.last_hidden_state)
    assert tuple(features.last_hidden_state.shape) == (1, 576, VISION)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], features.last_hidden_state)


def test_processor_keeps_its_chat_template_and_counts_tokens(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    processor = DenseMGMProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 1536}, crop_size={"height": 1536, "width": 1536}
        ),
        tokenizer=tiny_llava_tokenizer(),
        patch_size=14,
        connector=connector("dc-dci-clip-l-336"),
        image_size=336,
        image_size_aux=1536,
        image_grid=2,
        image_global=True,
        chat_template=template,
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DenseMGMProcessor
    assert loaded.chat_template == template
    # what serving engines read: all five views' tokens (before: the stock count for 1536-px
    # crops of 14-px patches less CLS, 109 * 109 - 1 = 11880)
    assert loaded._get_num_multimodal_tokens(image_sizes=[(40, 50)]).num_image_tokens == [2880]


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (
            torch.zeros(0, 3, 768, 768),
            "pixel_values holds 0 images (shape (0, 3, 768, 768)); pass at least one image",
        ),
        (
            torch.zeros(3, 768, 768),
            "pixel_values of shape (3, 768, 768) is one unbatched image; Mini-Gemini's HR "
            "image takes a batch [images, 3, 768, 768]",
        ),
        (
            torch.zeros(1, 1, 768, 768),
            "pixel_values have 1 channel(s) but Mini-Gemini's HR image takes 3 (RGB)",
        ),
    ],
    ids=["no-images", "unbatched", "one-channel"],
)
def test_bad_pixel_values_are_refused_before_the_towers_run(pixels, message):
    model = build()
    with pytest.raises(ValueError, match=re.escape(message)):
        model(input_ids=prompt(576), pixel_values=pixels)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.model.get_image_features(pixels)


def test_unknown_timm_name_for_the_hr_encoder():
    """Refused when the config is made (before: timm's RuntimeError when the model was built)."""
    with pytest.raises(
        ValueError,
        match=re.escape("aux_encoder name 'convnext_hugee' is not a timm model (timm ")
        + r".*expected a timm ConvNeXt name such as 'convnext_large'",
    ):
        DenseMGMConfig(
            vision_config=tiny_vision_config("clip", blocks=24, width=VISION, image_size=336),
            text_config=tiny_text_config(width=LLM, vocab_size=40),
            connector=connector("baseline-clip-l-336").to_dict(),
            aux_encoder={"name": "convnext_hugee"},
        )
