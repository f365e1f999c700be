"""HF LLaVA-OneVision with a Dense Connector (:mod:`mmconnect.integrations.families.llava_onevision`).

Tiny models built from configs (tests/support/llava_onevision_toys.py): a SigLIP tower (width 16,
4 blocks, 70 px crops of 14 px patches: a 5 x 5 grid), a 2-layer Qwen2 (width 32, vocabulary 120)
and pinpoints up to 4 x 4 tiles, so ``anyres_max_9`` resizes the largest maps. Parity first: the
native connector (``hidden_states[-1]``, ``mlp2x_gelu``) gives the stock model's logits bit for
bit for one image, images of different sizes in one batch, a multi-image sample, videos, and
images with a video, in fp32 and bf16. Then the Dense connectors (per crop; for video the fusion
before the pooling), the tap, the processor's counts, training, generate, save / reload, bad
inputs and the shared family contract.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from mmconnect import ConnectorConfig, SingleLayerSpec, STISpec, build_projector
from mmconnect.injection import DeepStackSpec
from mmconnect.integrations.applications.tiny_models import tiny_llava_tokenizer
from mmconnect.integrations.families.anyres import (
    anyres_token_count,
    capped_size,
    check_anyres_max,
    pack_anyres,
    unpadded_size,
)
from mmconnect.integrations.families.llava_onevision import (
    DenseLlavaOnevisionConfig,
    DenseLlavaOnevisionForConditionalGeneration,
    DenseLlavaOnevisionModel,
    DenseLlavaOnevisionProcessor,
    from_llava_onevision,
)
from mmconnect.integrations.families.protocol import TowerGeometry, family_model
from mmconnect.integrations.training.stages import (
    LoraSettings,
    StageConfig,
    parameter_groups,
    prepare_stage,
    train_stage,
)
from mmconnect.zoo.pooled import OnevisionPoolSpec, onevision_pool_state_from_hf
from tests.integrations.families.family_contract import FamilyContractTests
from tests.support import llava_onevision_toys as toys
from tests.support.llava_onevision_toys import (
    BLOCKS,
    CONNECTORS,
    IMAGE_TOKEN,
    LLM,
    PAD,
    PATCH,
    PINPOINTS,
    TILE,
    VIDEO_TOKEN,
    VISION,
    VOCAB,
)

#: (height, width): square (1 x 1 tiles), wide, capped 4 x 4 and 4 x 3 tilings, one pixel high.
SIZES = [(70, 70), (60, 150), (300, 300), (1000, 700), (1, 300)]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_model() -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(toys.onevision_config()).eval()


@pytest.fixture(scope="module")
def dense(hf_model) -> dict[str, DenseLlavaOnevisionForConditionalGeneration]:
    """One converted model per connector; all share the HF model's tower, LLM and newline."""
    torch.manual_seed(1)
    return {
        name: from_llava_onevision(hf_model, config).eval() for name, config in CONNECTORS.items()
    }


@pytest.fixture(scope="module")
def tokenizer():
    return toys.tokenizer()


def _processor(tokenizer, name: str) -> DenseLlavaOnevisionProcessor:
    return DenseLlavaOnevisionProcessor(
        image_processor=toys.image_processor(),
        tokenizer=tokenizer,
        video_processor=toys.video_processor(),
        patch_size=PATCH,
        connector=CONNECTORS[name],
    )


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------- native parity


def test_conversion_shares_the_stock_parts_and_reuses_the_projector(hf_model, dense):
    model = dense["native"]
    assert isinstance(model, DenseLlavaOnevisionForConditionalGeneration)
    assert model.model.vision_tower is hf_model.model.vision_tower
    assert model.model.language_model is hf_model.model.language_model
    assert model.model.image_newline is hf_model.model.image_newline
    assert model.lm_head is hf_model.lm_head
    stock = hf_model.model.multi_modal_projector
    assert torch.equal(model.connector.projector[0].weight, stock.linear_1.weight)
    assert torch.equal(model.connector.projector[2].bias, stock.linear_2.bias)


def test_conversion_reuses_the_stock_projector_in_the_zoos_onevision_pool(hf_model, caplog):
    """A connector reading H[-1] through the zoo's onevision_pool gets the stock Linears
    (through ``onevision_pool_state_from_hf``), without a warning that they were not reused;
    its video tokens are then the stock ones."""
    connector = CONNECTORS["native"].replace(projector=OnevisionPoolSpec())
    with caplog.at_level("WARNING"):
        model = from_llava_onevision(hf_model, connector).eval()
    assert "not reusing" not in caplog.text
    stock = hf_model.model.multi_modal_projector
    assert torch.equal(model.connector.projector.linear_1.weight, stock.linear_1.weight)
    assert torch.equal(model.connector.projector.linear_2.bias, stock.linear_2.bias)
    frames = toys.video(1, 2, seed=10)
    with torch.no_grad():
        ours = model.model.get_video_features(frames).pooler_output
        # per frame the pooled projector already pools 5x5 -> 3x3; the video path pools again
        assert ours.shape == (1, 2 * 4 + 1, LLM)


def test_default_connector_is_onevisions_own(hf_model):
    """Without connector=, the Dense config reads vision_feature_layer=-1 through mlp2x_gelu."""
    data = hf_model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    config = DenseLlavaOnevisionConfig(**data)
    assert config.connector_config == CONNECTORS["native"]
    assert config.image_seq_length == 25


@pytest.mark.parametrize("size", SIZES)
def test_image_features_equal_the_stock_ones_bit_for_bit(hf_model, dense, size):
    pixels, sizes = toys.pixels([size]), torch.tensor([size])
    with torch.no_grad():
        expected = hf_model.model.get_image_features(pixels, sizes).pooler_output
        ours = dense["native"].model.get_image_features(pixels, sizes).pooler_output
    count = dense["native"].model.image_token_count(size)
    assert ours[0].shape == expected[0].shape == (count, LLM)
    assert torch.equal(ours[0], expected[0])


def test_anyres_max_9_caps_the_large_tilings(dense):
    """4 x 4 tiles (300 x 300): a 20 x 20 map, sqrt(400 / (9 * 25)) = 1.33 > 1.1, resized to
    15 x 15; 4 x 3 tiles (1000 x 700): 20 x 15, nothing to unpad, ratio 1.15 -> 17 x 12;
    3 x 3 tiles (60 x 150): unpadded to 7 x 15, ratio 0.68, kept."""
    model = dense["native"].model
    assert toys.crops((300, 300)) == 17 and model.image_token_count((300, 300)) == 25 + 15 * 16
    assert unpadded_size((20, 15), (1000, 700)) == (20, 15)
    assert capped_size((20, 15), (5, 5), 9) == (17, 12)
    assert model.image_token_count((1000, 700)) == 25 + 17 * 13
    assert unpadded_size((15, 15), (60, 150)) == (7, 15)
    assert capped_size((7, 15), (5, 5), 9) == (7, 15)
    assert model.image_token_count((60, 150)) == 25 + 7 * 16
    assert capped_size((20, 20), (5, 5), None) == (20, 20)  # LLaVA-NeXT: never capped


@pytest.mark.parametrize(
    "case", ["one image", "sizes in one batch", "multi-image sample", "videos", "image and video"]
)
def test_logits_equal_the_stock_model_bit_for_bit(hf_model, dense, case):
    model = dense["native"]
    if case == "one image":
        inputs = toys.inputs(model, [(60, 150)])
    elif case == "sizes in one batch":  # different crop counts and token counts per image
        inputs = toys.inputs(model, [(60, 150), (300, 300), (1, 300)], seed=1)
    elif case == "multi-image sample":
        inputs = toys.multi_image_inputs(model, [(60, 150), (300, 300), (70, 70)], seed=2)
    elif case == "videos":
        inputs = toys.video_inputs(model, videos=2, frames=3, seed=3)
    else:
        video = model.model.video_token_count(2)
        image = model.model.image_token_count((60, 150))
        inputs = toys.batch([toys.prompt(images=image, videos=video)]) | {
            "pixel_values": toys.pixels([(60, 150)], seed=4),
            "image_sizes": torch.tensor([(60, 150)]),
            "pixel_values_videos": toys.video(1, 2, seed=4),
        }
    assert torch.equal(_logits(model, inputs), _logits(hf_model, inputs))


@pytest.mark.slow
def test_bf16_logits_equal_the_stock_model():
    """bf16 tower and LLM: measured bit-exact for images of several sizes and for a video (the
    same ops in the same order). Against the fp32 model the bf16 logits (|logits| <= 0.42 here)
    moved by at most 0.0043 when measured; the bound asserted is 0.01."""
    torch.manual_seed(0)
    stock = LlavaOnevisionForConditionalGeneration(toys.onevision_config()).eval()
    reference = copy.deepcopy(stock)
    stock = stock.to(torch.bfloat16)
    model = from_llava_onevision(stock, CONNECTORS["native"]).eval()
    assert model.connector.projector[0].weight.dtype == torch.bfloat16
    for inputs in (
        toys.inputs(model, [(60, 150), (300, 300)], seed=5),
        toys.video_inputs(model, videos=1, frames=2, seed=6),
    ):
        ours = _logits(model, inputs)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, _logits(stock, inputs))
        assert_close(ours.float(), _logits(reference, inputs), atol=0.01, rtol=0)


def test_the_video_path_is_the_zoos_onevision_pool_projector(hf_model, dense):
    """Native video tokens == the zoo's ``onevision_pool`` projector (weights converted by
    ``onevision_pool_state_from_hf``) on HF's ``hidden_states[-1]`` of every frame, then one
    newline per video."""
    frames = toys.video(1, 3, seed=7)
    projector = build_projector(OnevisionPoolSpec(), in_dim=VISION, out_dim=LLM)
    projector.load_state_dict(
        onevision_pool_state_from_hf(hf_model.state_dict(), "model.multi_modal_projector.")
    )
    with torch.no_grad():
        hidden = hf_model.model.vision_tower(frames[0], output_hidden_states=True).hidden_states
        expected = torch.cat(
            [projector(hidden[-1], toys.GRID).flatten(0, 1), hf_model.model.image_newline[None]]
        )
        ours = dense["native"].model.get_video_features(frames).pooler_output
    assert ours.shape == (1, 3 * 9 + 1, LLM)
    assert torch.equal(ours[0], expected)


# ---------------------------------------------------------------------------- Dense connectors


def _dci_tokens(model, hidden) -> torch.Tensor:
    """DCI by hand from HF's hidden states: [H[-1], mean H[0..1], mean H[2..3]] -> projector."""
    fused = torch.cat(
        [hidden[-1], (hidden[0] + hidden[1]) / 2, (hidden[2] + hidden[3]) / 2], dim=-1
    )
    return model.connector.projector(fused)


def test_dci_runs_per_crop_then_packs_and_caps(hf_model, dense):
    model = dense["dci"]
    size = (300, 300)  # 17 crops, capped
    pixels = toys.pixels([size], seed=8)
    with torch.no_grad():
        hidden = hf_model.model.vision_tower(pixels[0], output_hidden_states=True).hidden_states
        expected = pack_anyres(
            _dci_tokens(model, hidden),
            size,
            PINPOINTS,
            TILE,
            toys.GRID,
            hf_model.model.image_newline,
            max_crops=9,
        )
        ours = model.model.get_image_features(pixels, torch.tensor([size])).pooler_output[0]
    assert ours.shape == (25 + 15 * 16, LLM)
    assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_dci_video_fuses_before_the_pooling(hf_model, dense):
    """Each frame: DCI fusion -> mlp2x_gelu -> 5 x 5 bilinear to 3 x 3; a newline per video."""
    model = dense["dci"]
    frames = toys.video(1, 2, seed=9)
    with torch.no_grad():
        hidden = hf_model.model.vision_tower(frames[0], output_hidden_states=True).hidden_states
        tokens = _dci_tokens(model, hidden)
        maps = tokens.transpose(1, 2).reshape(2, LLM, 5, 5)
        pooled = torch.nn.functional.interpolate(maps, size=(3, 3), mode="bilinear")
        expected = torch.cat(
            [pooled.flatten(2).transpose(1, 2).flatten(0, 1), model.model.image_newline[None]]
        )
        ours = model.model.get_video_features(frames).pooler_output[0]
    assert_close(ours, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sci", "dci", "efficient", "pool"])
def test_dense_connectors_fill_their_own_token_counts(dense, name):
    model = dense[name]
    images = toys.inputs(model, [(60, 150), (300, 300)])
    videos = toys.video_inputs(model, videos=1, frames=2)
    with torch.no_grad():
        features = model.model.get_image_features(
            images["pixel_values"], images["image_sizes"]
        ).pooler_output
        assert model(**images).logits.shape == (*images["input_ids"].shape, VOCAB)
        assert torch.isfinite(model(**videos).logits).all()
    counts = [model.model.image_token_count(size) for size in ((60, 150), (300, 300))]
    assert [tuple(f.shape) for f in features] == [(count, LLM) for count in counts]


def test_token_counts_per_connector(dense):
    """SCI / DCI keep the native counts; the 3 x 3 grids (efficient, pooled projector) by hand."""
    for size in SIZES:
        native = dense["native"].model.image_token_count(size)
        assert dense["sci"].model.image_token_count(size) == native
        assert dense["dci"].model.image_token_count(size) == native
    for name in ("efficient", "pool"):
        model = dense[name].model
        # 70 x 70 -> 1 x 1 tile: a 3 x 3 map, nothing to crop: 9 + 3 * 4
        assert model.image_token_count((70, 70)) == 21
        # 300 x 300 -> 4 x 4 tiles: 12 x 12 = 144 > 1.21 * 81: ratio 1.33 -> 9 x 9: 9 + 9 * 10
        assert model.image_token_count((300, 300)) == 99
        assert model.multi_image_token_count() == 10
        assert model.video_token_count(2) == 2 * 4 + 1  # 3 x 3 pooled to 2 x 2
    assert dense["native"].model.video_token_count(2) == 2 * 9 + 1
    assert dense["native"].model.multi_image_token_count() == 26


def test_loss_backward_reaches_connector_and_newline(dense):
    model = dense["dci"]
    inputs = toys.inputs(model, [(60, 150), (300, 300)])
    labels = inputs["input_ids"].clone()
    labels[(labels == IMAGE_TOKEN) | (inputs["attention_mask"] == 0)] = -100
    model.zero_grad(set_to_none=True)
    try:
        loss = model(**inputs, labels=labels).loss
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = {name: p.grad for name, p in model.connector.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
        assert model.model.image_newline.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)  # shared with the other fixtures


# ---------------------------------------------------------------------------- the tap


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(sub._forward_hooks) + len(sub._forward_pre_hooks) for sub in module.modules())


def test_no_hooks_are_left_after_a_forward_or_a_failing_one():
    torch.manual_seed(0)
    model = from_llava_onevision(
        LlavaOnevisionForConditionalGeneration(toys.onevision_config()), CONNECTORS["dci"]
    ).eval()
    tower = model.model.vision_tower
    assert _hooks(tower) == 0
    _logits(model, toys.inputs(model, [(60, 150)]))
    _logits(model, toys.video_inputs(model, videos=1, frames=2))
    assert _hooks(tower) == 0

    def fail(*_):
        raise RuntimeError("block failed")

    handle = tower.encoder.layers[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="block failed"):
        _logits(model, toys.inputs(model, [(60, 150)]))
    handle.remove()
    assert _hooks(tower) == 0


def test_early_exit_skips_the_blocks_after_the_deepest_layer(hf_model):
    """A connector reading H[2] runs blocks 0 and 1 only (of 4), on images and videos."""
    model = from_llava_onevision(
        hf_model, CONNECTORS["native"].replace(fusion=SingleLayerSpec(final_layer=2))
    ).eval()
    calls = []
    handles = [
        block.register_forward_hook(lambda *_, index=index: calls.append(index))
        for index, block in enumerate(model.model.vision_tower.encoder.layers)
    ]
    try:
        _logits(model, toys.inputs(model, [(60, 150)]))
        _logits(model, toys.video_inputs(model, videos=1, frames=2))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1, 0, 1]


def test_streaming_group_sums_equal_the_kept_layers(dense):
    """The model's streaming DCI tap gives the features a tap keeping every layer gives."""
    model = dense["dci"].model
    crops = toys.pixels([(60, 150)])[0]
    with torch.no_grad():
        streamed = model.connector(model.connector.make_tap(model.vision_tower)(crops), toys.GRID)
        kept = model.connector(
            model.connector.make_tap(model.vision_tower, streaming=False)(crops), toys.GRID
        )
    assert torch.equal(streamed, kept)


# ---------------------------------------------------------------------------- processor


def _stock_processor(tokenizer) -> LlavaOnevisionProcessor:
    return LlavaOnevisionProcessor(
        image_processor=toys.image_processor(),
        tokenizer=tokenizer,
        video_processor=toys.video_processor(),
        num_image_tokens=25,
        vision_feature_select_strategy="full",
    )


def test_stock_processor_prompts_fit_the_native_model(hf_model, dense, tokenizer):
    """The stock processor's and ours agree token for token for single images of several sizes,
    a multi-image sample and a video, and both models give the same logits."""
    stock, ours = _stock_processor(tokenizer), _processor(tokenizer, "native")
    requests = [
        {"images": [toys.pil((150, 60), 1), toys.pil((40, 400), 2)], "text": ["w1 <image> w2"] * 2},
        {"images": [[toys.pil((90, 90), 3), toys.pil((300, 200), 4)]], "text": ["<image> <image> w5"]},
        {"videos": [torch.randint(0, 256, (3, 50, 60, 3), dtype=torch.uint8)], "text": ["<video> w6"]},
    ]  # fmt: skip
    for request in requests:
        expected = stock(**request, padding=True, return_tensors="pt")
        got = ours(**request, padding=True, return_tensors="pt")
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(_logits(dense["native"], got), _logits(hf_model, expected))


@pytest.mark.parametrize("name", ["dci", "efficient", "pool"])
def test_processor_expands_to_the_model_counts(dense, tokenizer, name):
    processor, model = _processor(tokenizer, name), dense[name].model
    for seed, size in enumerate([(70, 70), (60, 150), (300, 300), (37, 300), (500, 90)]):
        out = processor(images=toys.pil(size, seed), text="w1 <image> w2", return_tensors="pt")
        assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == model.image_token_count(size)
    sample = processor(
        images=[[toys.pil((90, 90)), toys.pil((30, 200))]],
        text="<image> w1 <image>",
        return_tensors="pt",
    )
    assert int((sample["input_ids"] == IMAGE_TOKEN).sum()) == 2 * model.multi_image_token_count()
    video = torch.randint(0, 256, (4, 50, 60, 3), dtype=torch.uint8)
    out = processor(videos=[video], text="<video> w1", return_tensors="pt")
    assert int((out["input_ids"] == VIDEO_TOKEN).sum()) == model.video_token_count(4)
    with torch.no_grad():
        assert torch.isfinite(dense[name](**sample).logits).all()
        assert torch.isfinite(dense[name](**out).logits).all()


def test_processor_counts_for_sizes_without_images(dense, tokenizer):
    """``_get_num_multimodal_tokens`` (serving engines' count from sizes) agrees with the model."""
    processor, model = _processor(tokenizer, "pool"), dense["pool"].model
    counts = processor._get_num_multimodal_tokens(
        image_sizes=[(60, 150), (300, 300)], video_sizes=[(3, TILE, TILE)]
    )
    assert counts["num_image_tokens"] == [39, 99]
    assert [model.image_token_count(size) for size in ((60, 150), (300, 300))] == [39, 99]
    assert counts["num_video_tokens"] == [model.video_token_count(3)] == [13]


def test_processor_save_load_keeps_connector(tokenizer, tmp_path):
    processor = _processor(tokenizer, "efficient")
    processor.save_pretrained(tmp_path)
    loaded = DenseLlavaOnevisionProcessor.from_pretrained(tmp_path)
    assert ConnectorConfig.from_dict(loaded.connector) == CONNECTORS["efficient"]
    assert (loaded.patch_size, loaded.vision_aspect_ratio) == (PATCH, "anyres_max_9")
    image, text = toys.pil((60, 150)), "w1 <image> w2"
    assert torch.equal(
        loaded(images=image, text=text, return_tensors="pt")["input_ids"],
        processor(images=image, text=text, return_tensors="pt")["input_ids"],
    )


def test_real_size_counts_equal_the_stock_processors():
    """The presets' documented per-image counts at 384 px with OneVision's 36 pinpoints: the
    native one equals the stock LlavaOnevisionProcessor's (729 per crop, anyres_max_9)."""
    pinpoints = LlavaOnevisionConfig().image_grid_pinpoints
    stock = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(),
        tokenizer=tiny_llava_tokenizer(),
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    native = ConnectorConfig.from_preset("onevision-mlp-siglip-so400m-26")
    pooled = ConnectorConfig.from_preset("dc-dci+onevision-pool-siglip-so400m-26")
    documented = {  # docs/llava-onevision.md and the preset module's table
        (384, 384): (1485, 406),
        (480, 640): (2929, 834),
        (768, 768): (3699, 1008),
        (1152, 1152): (7371, 2002),
        (1080, 1920): (7269, 1932),
        (2304, 2304): (7371, 2002),
    }
    for size, (tokens, pooled_tokens) in documented.items():
        count = anyres_token_count(native, size, pinpoints, 384, (27, 27), max_crops=9)
        assert count == stock._get_number_of_features(*size, 384, 384) == tokens, size
        assert anyres_token_count(pooled, size, pinpoints, 384, (27, 27), max_crops=9) == (
            pooled_tokens
        )


# ---------------------------------------------------------------------------- training, generate


@pytest.mark.slow
def test_stage_one_trains_exactly_the_connector(tmp_path):
    torch.manual_seed(0)
    model = from_llava_onevision(
        LlavaOnevisionForConditionalGeneration(toys.onevision_config()), CONNECTORS["dci"]
    ).train()
    count = model.model.image_token_count((60, 150))

    class Samples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            ids = torch.tensor(toys.prompt(count, before=1 + index % 2))
            labels = ids.clone()
            labels[ids == IMAGE_TOKEN] = -100
            return {
                "input_ids": ids,
                "labels": labels,
                "pixel_values": toys.pixels([(60, 150)], seed=index)[0],
                "image_sizes": torch.tensor([60, 150]),
            }

    def collate(samples):
        batch = toys.batch([sample["input_ids"].tolist() for sample in samples])
        labels = torch.full_like(batch["input_ids"], -100)
        for row, sample in enumerate(samples):
            labels[row, : len(sample["labels"])] = sample["labels"]
        return batch | {
            "labels": labels,
            "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
            "image_sizes": torch.stack([sample["image_sizes"] for sample in samples]),
        }

    before = {name: t.clone() for name, t in model.state_dict().items()}
    stage = StageConfig(
        stage="align",
        output_dir=str(tmp_path / "align"),
        per_device_train_batch_size=2,
        max_steps=2,
        disable_tqdm=True,
    )
    result = train_stage(model, Samples(), collate, stage)
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert changed and all(name.startswith("model.multi_modal_projector.") for name in changed)
    assert len(result.losses) == 2
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "align")
    assert type(loaded) is DenseLlavaOnevisionForConditionalGeneration


def test_stage_two_lora_trains_adapters_and_the_connector(tmp_path):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model = from_llava_onevision(
        LlavaOnevisionForConditionalGeneration(toys.onevision_config()), CONNECTORS["dci"]
    ).train()
    stage = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path),
        lora=LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj")),
    )
    wrapped = prepare_stage(model, stage)
    groups = parameter_groups(wrapped)
    assert groups["lora"][0] > 0 and groups["llm"][0] == 0 and groups["vision_tower"][0] == 0
    assert groups["connector"][0] > 0
    inner = family_model(wrapped)
    inputs = toys.inputs(model, [(60, 150)]) | toys.video_inputs(model, videos=1, frames=2)
    inputs["input_ids"] = torch.tensor(
        [toys.prompt(inner.image_token_count((60, 150)), inner.video_token_count(2))]
    )
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    wrapped(**inputs, labels=inputs["input_ids"]).loss.backward()
    missing = [name for name, p in wrapped.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["native", "pool"])
def test_generate_with_images_and_videos(dense, name):
    model = dense[name]
    for inputs in (
        toys.inputs(model, [(150, 60)]),
        toys.multi_image_inputs(model, [(60, 150), (70, 70)]),
        toys.video_inputs(model, videos=1, frames=2),
    ):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
        length = inputs["input_ids"].shape[1]
        assert out.shape == (1, length + 2)
        assert out[0, length] == _logits(model, inputs)[0, -1].argmax()


def test_chat_answers_an_image_and_frames_through_the_protocol(dense, tokenizer):
    """Chat's image path packs the AnyRes crops (137 tokens for 60 x 150); its training-free
    video path takes each frame's unpooled base crop (4 frames x 25 tokens)."""
    from mmconnect.integrations.chat.answering import answer_image, answer_video

    model, processor = dense["dci"], _processor(tokenizer, "dci")
    image = answer_image(model, processor, toys.pil((60, 150)), "w1 w2", max_new_tokens=2)
    assert image.num_visual_tokens == model.model.image_token_count((60, 150)) == 137
    frames = [toys.pil((60, 80), seed) for seed in range(4)]
    video = answer_video(model, processor, frames, "w1", max_new_tokens=2)
    assert (video.num_visual_tokens, video.frame_indices) == (4 * 25, (0, 1, 2, 3))


def test_save_and_auto_load_identical_logits(dense, tmp_path):
    dense["pool"].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dense_llava_onevision"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is DenseLlavaOnevisionForConditionalGeneration
    assert loaded.config.connector_config == CONNECTORS["pool"]
    for inputs in (
        toys.inputs(loaded, [(60, 150), (300, 300)]),
        toys.video_inputs(loaded, videos=1, frames=2),
    ):
        assert torch.equal(_logits(loaded, inputs), _logits(dense["pool"], inputs))


# ---------------------------------------------------------------------------- bad input


def test_wrong_image_and_video_token_counts(dense):
    model = dense["dci"]
    count = model.model.image_token_count((60, 150))
    inputs = toys.inputs(model, [(60, 150)]) | toys.batch([toys.prompt(count - 1)])
    message = rf"holds {count - 1} image tokens but the 1 image\(s\) fill {count}"
    with pytest.raises(ValueError, match=message):
        model(**inputs)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=1, pad_token_id=PAD)
    multi = toys.multi_image_inputs(model, [(60, 150), (70, 70)]) | toys.batch([toys.prompt(51)])
    with pytest.raises(
        ValueError, match=r"holds 51 image tokens but the 2 image\(s\) fill 52 \(\[26, 26\]"
    ):
        model(**multi)
    video = toys.video_inputs(model, videos=1, frames=2)
    video |= toys.batch([toys.prompt(videos=model.model.video_token_count(3))])
    message = r"holds 28 video tokens but the 1 video\(s\) of 2 frames fill 19"
    with pytest.raises(ValueError, match=message):
        model(**video)
    with pytest.raises(ValueError, match=message):
        model.generate(**video, max_new_tokens=1, pad_token_id=PAD)


def test_image_sizes_and_pixel_values_that_disagree(dense):
    model = dense["native"].model
    size = (60, 150)  # 1 + 3 x 3 crops
    with pytest.raises(ValueError, match=r"holds 3 crops but image_sizes need 10 \(\[10\]\)"):
        model.get_image_features(torch.randn(3, 3, TILE, TILE), torch.tensor([size]))
    with pytest.raises(ValueError, match=r"holds 2 images but image_sizes 1"):
        model.get_image_features(toys.pixels([size, size]), torch.tensor([size]))
    with pytest.raises(ValueError, match=r"holds 2 crops per image but image_sizes need up to 17"):
        model.get_image_features(toys.pixels([(70, 70)]), torch.tensor([(300, 300)]))
    with pytest.raises(
        ValueError, match=r"batch_num_images=\[3\] counts 3 images but image_sizes holds 2"
    ):
        model.get_image_features(
            toys.pixels([size, size], counts=[1, 1]),
            torch.tensor([size, size]),
            batch_num_images=[3],
        )
    with pytest.raises(ValueError, match="image_sizes is required for AnyRes"):
        model.get_image_features(toys.pixels([size]))
    with pytest.raises(
        ValueError, match=re.escape("image_sizes[0] must be a (height, width) pair")
    ):
        model.get_image_features(toys.pixels([size]), torch.tensor([[0, 0]]))


def test_pixels_of_a_size_the_processor_would_not_produce(dense):
    model = dense["native"]
    inputs = toys.inputs(model, [(60, 150)])
    inputs["pixel_values"] = torch.randn(1, 10, 3, 84, 84)
    with pytest.raises(ValueError, match=r"\[crops, 3, 70, 70\] \(image_size=70\).*84, 84"):
        model(**inputs)
    video = toys.video_inputs(model, videos=1, frames=2)
    message = r"pixel_values_videos must be \[frames, 3, 70, 70\] \(image_size=70\).*84, 84"
    with pytest.raises(ValueError, match=message):
        model(**(video | {"pixel_values_videos": torch.randn(1, 2, 3, 84, 84)}))
    with pytest.raises(
        ValueError, match=r"pixel_values_videos must be \[videos, frames, 3, 70, 70\]"
    ):
        model.model.get_video_features(torch.randn(2, 3, TILE, TILE))
    with pytest.raises(
        TypeError, match=re.escape("pixel_values_videos must be a torch.Tensor, got list")
    ):
        model.model.get_video_features([torch.randn(2, 3, TILE, TILE)])


def test_preset_for_another_tower_depth(hf_model):
    """SigLIP's 27-block presets on OneVision's tower (here 4 blocks) name both depths."""
    with pytest.raises(ValueError, match=r"num_layers=27 does not match .*num_hidden_layers \(4\)"):
        from_llava_onevision(hf_model, "dc-dci-siglip-so400m")
    with pytest.raises(ValueError, match=r"num_layers=26 does not match .*num_hidden_layers \(4\)"):
        from_llava_onevision(hf_model, "dc-dci-onevision-siglip-so400m-26")


def test_presets_on_a_26_block_tower():
    """OneVision's depth (26 blocks, tiny widths): the -26 presets convert (widths taken from the
    model), SigLIP's 27-block presets are refused naming both depths."""
    vision = toys.vision_config()
    vision.num_hidden_layers = 26
    stock = LlavaOnevisionForConditionalGeneration(toys.onevision_config(vision_config=vision))
    model = from_llava_onevision(stock, "dc-dci-onevision-siglip-so400m-26")
    assert model.connector.config.num_layers == 26
    assert (model.connector.config.vision_dim, model.connector.config.llm_dim) == (VISION, LLM)
    message = r"connector num_layers=27 does not match the vision tower's num_hidden_layers \(26\)"
    for preset in ("dc-dci-siglip-so400m", "baseline+onevision-pool-siglip-so400m"):
        with pytest.raises(ValueError, match=message):
            from_llava_onevision(stock, preset)


def test_connector_width_mismatch(hf_model):
    with pytest.raises(ValueError, match=r"vision_dim=24 does not match .*hidden_size \(16\)"):
        from_llava_onevision(hf_model, CONNECTORS["dci"].replace(vision_dim=24))


def test_refused_connectors_and_settings(hf_model):
    data = hf_model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    sti = ConnectorConfig(
        vision_dim=VISION, llm_dim=LLM, num_layers=BLOCKS, fusion=STISpec(extra_layers=(1, 2))
    )
    with pytest.raises(
        ValueError, match=r"fusion 'sti' adds 6 pooled tokens per crop after the grid"
    ):
        DenseLlavaOnevisionConfig(**data, connector=sti.to_dict())
    deepstack = CONNECTORS["dci"].replace(injection=DeepStackSpec(layers=(1,)))
    with pytest.raises(ValueError, match=r"Dense LLaVA-OneVision does not support .*injection="):
        DenseLlavaOnevisionConfig(**data, connector=deepstack.to_dict())
    with pytest.raises(ValueError, match=r"vision_aspect_ratio='anyres' is not supported"):
        DenseLlavaOnevisionConfig(**(data | {"vision_aspect_ratio": "anyres"}))
    with pytest.raises(ValueError, match=r"image_grid_pinpoints\[1\]=\[140, 100\].*tile size 70"):
        DenseLlavaOnevisionConfig(**(data | {"image_grid_pinpoints": [[70, 140], [140, 100]]}))
    assert check_anyres_max("anyres_max_9") == 9
    with pytest.raises(ValueError, match="vision_aspect_ratio='anyres_max_0'"):
        check_anyres_max("anyres_max_0")


def test_refuses_default_strategy_on_a_tower_without_cls():
    stock = LlavaOnevisionForConditionalGeneration(
        toys.onevision_config(vision_feature_select_strategy="default")
    )
    with pytest.raises(ValueError, match="'default' drops the first token"):
        from_llava_onevision(stock, CONNECTORS["native"])


def test_other_vision_aspect_ratio_at_call_time(dense):
    with pytest.raises(ValueError, match=r"vision_aspect_ratio='anyres_max_4' differs"):
        dense["native"].model.get_image_features(
            toys.pixels([(70, 70)]), torch.tensor([(70, 70)]), vision_aspect_ratio="anyres_max_4"
        )


def test_from_llava_onevision_refuses_other_models(dense):
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        from_llava_onevision(dense["native"], CONNECTORS["native"])


def test_forward_keeps_the_stock_signature():
    import inspect

    assert inspect.signature(DenseLlavaOnevisionModel.forward) == inspect.signature(
        LlavaOnevisionModel.forward
    )


# ---------------------------------------------------------------------------- contract


class TestLlavaOnevisionContract(FamilyContractTests):
    """The shared family contract on the tiny OneVision parts with the DCI connector."""

    model_type = "dense_llava_onevision"
    config_class = DenseLlavaOnevisionConfig
    model_class = DenseLlavaOnevisionModel
    generation_class = DenseLlavaOnevisionForConditionalGeneration
    processor_class = DenseLlavaOnevisionProcessor
    stock_model_class = LlavaOnevisionModel
    stock_generation_class = LlavaOnevisionForConditionalGeneration
    vision_tower_names = ("vision_tower",)
    connector_module_names = ("multi_modal_projector",)
    geometry = TowerGeometry(
        width=VISION,
        depth=BLOCKS,
        image_size=(TILE, TILE),
        patch_size=PATCH,
        grid=toys.GRID,
        prefix_tokens=0,
    )
    pixel_side = TILE
    image_sizes = ((70, 70), (60, 150), (150, 60), (300, 300))
    # The stock LlavaOnevisionProcessor's counts (25 per crop, anyres_max_9) for these sizes.
    token_counts = (55, 137, 145, 265)
    fixed_image_tokens = False
    frames_are_images = False  # a frame is the base crop alone: 25 tokens, no tiles
    frame_tokens = 25
    extra_config_keys = frozenset({"connector", "image_seq_length"})
    prompt = "w1 <image> w2 w3"

    def stock_config(self) -> LlavaOnevisionConfig:
        return toys.onevision_config()

    def connector(self, kind: str) -> ConnectorConfig:
        if kind == "dense":
            return CONNECTORS["dci"]
        if kind == "baseline":  # one layer: the projector takes 16 channels, not 48
            return CONNECTORS["native"]
        if kind == "same_shapes":  # three layers concatenated: DCI's widths
            return CONNECTORS["sci"]
        raise ValueError(f"unknown connector kind {kind!r}")

    def processor(self, connector: ConnectorConfig) -> DenseLlavaOnevisionProcessor:
        return DenseLlavaOnevisionProcessor(
            image_processor=toys.image_processor(),
            tokenizer=toys.tokenizer(),
            video_processor=toys.video_processor(),
            patch_size=PATCH,
            connector=connector,
        )
