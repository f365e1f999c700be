"""Dense Qwen2.5-VL: stock parity with the native merger, other connectors and their M-RoPE
positions, the processor's counts, training, and bad inputs, on the tiny models of
:mod:`tests.support.qwen_vl_toys` (4-block tower with 2 x 2-unit windows, 2-layer LLM)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
)

from mmconnect import ConnectorConfig, DCISpec, SCISpec, SingleLayerSpec, STISpec
from mmconnect.integrations.families.protocol import TowerGeometry, convert_to_dense
from mmconnect.integrations.families.qwen2_5_vl import (
    DenseQwen2_5_VLConfig,
    DenseQwen2_5_VLForConditionalGeneration,
    DenseQwen2_5_VLModel,
    DenseQwen2_5_VLProcessor,
    from_qwen2_5_vl,
    native_connector,
)
from mmconnect.zoo.patch_merger import QWEN2_5_VL_MERGER
from tests.integrations.families.family_contract import FamilyContractTests, sample_image
from tests.support import qwen_vl_toys as toys

_COMMON = {"vision_dim": toys.QWEN25_WIDTH, "llm_dim": toys.LLM_WIDTH, "num_layers": 4}
#: DCI over the tiny tower into Qwen2.5-VL's merger (the merged token grid).
DCI_MERGER = ConnectorConfig(
    fusion=DCISpec(final_layer=4, groups=((0, 1), (2, 3))), projector=QWEN2_5_VL_MERGER, **_COMMON
)
#: DCI with mlp2x_gelu: one token per patch, a token grid twice the merged one a side.
DCI_MLP = ConnectorConfig(fusion=DCISpec(final_layer=4, groups=((0, 1), (2, 3))), **_COMMON)
NATIVE = ConnectorConfig(
    fusion=SingleLayerSpec(final_layer=-1), projector=QWEN2_5_VL_MERGER, **_COMMON
)


def processor(connector: ConnectorConfig) -> DenseQwen2_5_VLProcessor:
    return DenseQwen2_5_VLProcessor(
        image_processor=toys.qwen2_5_vl_image_processor(),
        tokenizer=toys.tokenizer(),
        video_processor=toys.qwen2_5_vl_video_processor(),
        connector=connector,
    )


def stock_processor() -> Any:
    from transformers import Qwen2_5_VLProcessor

    return Qwen2_5_VLProcessor(
        image_processor=toys.qwen2_5_vl_image_processor(),
        tokenizer=toys.tokenizer(),
        video_processor=toys.qwen2_5_vl_video_processor(),
    )


def video(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def stock() -> Qwen2_5_VLForConditionalGeneration:
    return toys.qwen2_5_vl_model()


@pytest.fixture(scope="module")
def native(stock) -> DenseQwen2_5_VLForConditionalGeneration:
    return from_qwen2_5_vl(stock, NATIVE).eval()


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------- parity


def test_native_connector_is_the_stock_merger_through_the_zoo(stock, native) -> None:
    config = native.config
    assert native.connector.config == native_connector(config)
    assert native.model.visual.blocks is stock.model.visual.blocks  # shared, not copied
    assert native.model.language_model is stock.model.language_model
    assert native.lm_head is stock.lm_head
    merger = stock.model.visual.merger
    projector = native.connector.projector
    assert torch.equal(projector.norm.weight, merger.ln_q.weight)
    assert torch.equal(projector.fc1.weight, merger.mlp[0].weight)
    assert torch.equal(projector.fc2.bias, merger.mlp[2].bias)
    assert isinstance(native.model.visual.merger, torch.nn.Identity)
    assert isinstance(stock.model.visual.merger, torch.nn.Module)  # the stock model is untouched


@pytest.mark.parametrize(
    "case", ["one image", "images of different sizes in a batch", "video", "image and video"]
)
def test_logits_equal_the_stock_model(stock, native, case) -> None:
    """fp32 logits within 1e-6 of the stock model on the same weights (measured: at most
    1.2e-7; the video alone is bit for bit)."""
    images = [sample_image((56, 84), 0), sample_image((112, 84), 1), sample_image((84, 140), 2)]
    clip = video(4, 56, 84)
    if case == "one image":
        request = {"images": images[:1], "text": [toys.IMAGE_PROMPT]}
    elif case == "images of different sizes in a batch":
        two = toys.IMAGE_PROMPT.replace("w3", "<|vision_start|><|image_pad|><|vision_end|> w3")
        request = {"images": images, "text": [toys.IMAGE_PROMPT, two], "padding": True}
    elif case == "video":
        request = {"videos": [clip], "text": [toys.VIDEO_PROMPT]}
    else:
        request = {
            "images": images[:1],
            "videos": [clip],
            "text": [toys.IMAGE_PROMPT + " " + toys.VIDEO_PROMPT],
        }
    inputs = dict(stock_processor()(**request, return_tensors="pt"))
    dense_inputs = dict(processor(NATIVE)(**request, return_tensors="pt"))
    assert dense_inputs.keys() == inputs.keys()
    for key in inputs:
        assert torch.equal(dense_inputs[key], inputs[key]), key
    expected, actual = _logits(stock, inputs), _logits(native, inputs)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    if case == "video":
        assert torch.equal(actual, expected)


@pytest.mark.slow
def test_bf16_logits_equal_the_stock_model() -> None:
    """bf16: the same ops in the same dtype give the stock logits bit for bit (measured over
    three seeds and two images of different sizes in one prompt)."""
    grid = torch.tensor([[1, 4, 6], [1, 8, 6]])
    ids = torch.tensor([toys.prompt_ids([6, 12])])
    for seed in range(3):
        stock = toys.qwen2_5_vl_model(seed).to(torch.bfloat16)
        dense = from_qwen2_5_vl(stock, NATIVE).eval()
        assert dense.connector.projector.fc1.weight.dtype == torch.bfloat16
        inputs = {
            "input_ids": ids,
            "pixel_values": toys.packed_pixels(grid, seed),
            "image_grid_thw": grid,
            "mm_token_type_ids": (ids == toys.IMAGE_TOKEN).long(),
        }
        assert torch.equal(_logits(dense, inputs), _logits(stock, inputs))


def test_generate_equals_the_stock_generate(stock, native) -> None:
    inputs = dict(
        stock_processor()(
            images=[sample_image((84, 112), 4)], text=[toys.IMAGE_PROMPT], return_tensors="pt"
        )
    )
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": toys.PAD}
    expected = stock.generate(**inputs, **options)
    assert torch.equal(native.generate(**inputs, **options), expected)


def test_batched_generate_with_left_padding_equals_the_stock_generate(stock, native) -> None:
    """Two prompts with images of different sizes, left-padded: the M-RoPE index skips the
    padding as the stock one does, and the generated tokens are the stock model's."""
    requests = stock_processor()
    requests.tokenizer.padding_side = "left"
    inputs = dict(
        requests(
            images=[sample_image((56, 56), 5), sample_image((112, 140), 6)],
            text=[toys.IMAGE_PROMPT, toys.IMAGE_PROMPT],
            padding=True,
            return_tensors="pt",
        )
    )
    assert inputs["attention_mask"][0, 0] == 0  # the first prompt is padded on the left
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": toys.PAD}
    assert torch.equal(native.generate(**inputs, **options), stock.generate(**inputs, **options))


def test_tower_outputs_on_request(native) -> None:
    """``output_hidden_states=True`` runs the tower in full under the same tap: the same tokens,
    and the stock tower's hidden states (block order); ``return_dict=False`` gives a tuple."""
    grid = torch.tensor([[1, 4, 6], [1, 8, 6]])
    pixels = toys.packed_pixels(grid)
    model = native.model
    with torch.no_grad():
        early = model.get_image_features(pixels, grid)
        full = model.get_image_features(pixels, grid, output_hidden_states=True)
        stock = model.visual(pixels, grid_thw=grid, output_hidden_states=True)
        as_tuple = model.get_image_features(pixels, grid, return_dict=False)
    assert early.hidden_states is None and len(full.hidden_states) == 5
    for one, other in zip(early.pooler_output, full.pooler_output, strict=True):
        assert torch.equal(one, other)
    assert torch.equal(full.last_hidden_state, stock.last_hidden_state)
    for ours, theirs in zip(full.hidden_states, stock.hidden_states, strict=True):
        assert torch.equal(ours, theirs)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], early.last_hidden_state)


def test_convert_to_dense_finds_the_family(stock) -> None:
    dense = convert_to_dense(stock, DCI_MERGER)
    assert type(dense) is DenseQwen2_5_VLForConditionalGeneration
    assert dense.connector.config == DCI_MERGER


# ---------------------------------------------------------------------------- other connectors


def test_dci_without_merging_gets_positions_on_its_own_token_grid(stock) -> None:
    """DCI + mlp2x_gelu keeps the 8 x 6 patch grid: the processor inserts 48 tokens, and M-RoPE
    gives token (r, c) the position (r, c) from the image's start, as the stock index does on
    its merged 4 x 3 grid."""
    dense = from_qwen2_5_vl(stock, DCI_MLP).eval()
    batch = processor(DCI_MLP)(
        images=[sample_image((112, 84), 0)], text=[toys.IMAGE_PROMPT], return_tensors="pt"
    )
    assert batch["image_grid_thw"].tolist() == [[1, 8, 6]]
    ids = batch["input_ids"]
    image = ids[0] == toys.IMAGE_TOKEN
    assert int(image.sum()) == 48 == dense.model.image_token_count((112, 84))
    positions, deltas = dense.model.get_rope_index(
        ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    start = int(image.nonzero()[0, 0])
    rows, columns = torch.meshgrid(torch.arange(8), torch.arange(6), indexing="ij")
    assert torch.equal(positions[0, 0, image], torch.full((48,), start))
    assert torch.equal(positions[1, 0, image], rows.flatten() + start)
    assert torch.equal(positions[2, 0, image], columns.flatten() + start)
    after = int(image.nonzero()[-1, 0]) + 1
    assert positions[0, 0, after] == start + 8  # text resumes after max(8, 6) positions
    assert deltas.tolist() == [[start + 8 - after]]
    logits = _logits(dense, dict(batch))
    assert logits.shape == (1, ids.shape[1], toys.VOCAB) and torch.isfinite(logits).all()


def test_video_slices_are_images_to_the_connector(stock) -> None:
    """Each temporal slice of a video is its own attention segment in the tower and one image to
    the connector: the video's tokens are its slices' image tokens, slice by slice."""
    dense = from_qwen2_5_vl(stock, DCI_MERGER).eval()
    grid = torch.tensor([[3, 4, 6]])
    pixels = toys.packed_pixels(grid)
    with torch.no_grad():
        (tokens,) = dense.model.get_video_features(pixels, grid).pooler_output
        slices = dense.model.get_image_features(pixels, torch.tensor([[1, 4, 6]] * 3)).pooler_output
    assert tokens.shape == (18, toys.LLM_WIDTH)
    assert dense.model.visual_token_counts(grid, "video") == [18]
    torch.testing.assert_close(tokens, torch.cat(slices), atol=1e-6, rtol=0)


def test_streaming_and_kept_dci_groups_give_the_same_tokens(stock) -> None:
    dense = from_qwen2_5_vl(stock, DCI_MERGER).eval()
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])
    pixels = toys.packed_pixels(grid)
    model = dense.model
    packed = model._packed(pixels, grid, "image")
    with torch.no_grad():
        streamed = model.get_image_features(pixels, grid).pooler_output
        tap = model.connector.make_tap(model.visual, streaming=False)
        features = tap(pixels, grid_thw=grid)
        (kept,) = packed.run(features, lambda cut, g: (model.connector(cut, g),))
    assert not features.group_means
    for one, other in zip(streamed, kept, strict=True):
        assert torch.equal(one, other)


@pytest.mark.parametrize(
    ("connector", "named"),
    [
        (
            ConnectorConfig(fusion=STISpec(final_layer=4, extra_layers=(1, 2)), **_COMMON),
            "fusion='sti'",
        ),
        (
            ConnectorConfig(
                fusion=SingleLayerSpec(final_layer=4), projector="perceiver", **_COMMON
            ),
            "projector='perceiver'",
        ),
    ],
)
def test_connectors_whose_tokens_form_no_grid_are_refused(stock, connector, named) -> None:
    message = (
        rf"Dense Qwen2.5-VL cannot use a connector whose tokens form no grid \(.*{named}.*M-RoPE"
    )
    with pytest.raises(ValueError, match=message):
        from_qwen2_5_vl(stock, connector)
    data = toys.qwen2_5_vl_config().to_dict()
    data.pop("model_type")
    with pytest.raises(ValueError, match=message):
        DenseQwen2_5_VLConfig(**data, connector=connector.to_dict())


def test_a_preset_for_another_tower_depth_is_refused(stock) -> None:
    message = r"connector num_layers=32 does not match the vision tower's num_hidden_layers \(4\)"
    with pytest.raises(ValueError, match=message):
        from_qwen2_5_vl(stock, "dc-dci+qwen2.5-merger-qwen2.5-vl-448")


def test_conversion_refuses_other_models_and_connectors(native, stock) -> None:
    with pytest.raises(TypeError, match=r"must be an HF Qwen2_5_VLForConditionalGeneration"):
        from_qwen2_5_vl(native, NATIVE)
    with pytest.raises(TypeError, match=r"connector must be a ConnectorConfig or a preset name"):
        from_qwen2_5_vl(stock, 3)


def test_deepstack_injection_is_refused(stock) -> None:
    from mmconnect.injection import DeepStackSpec

    connector = NATIVE.replace(injection=DeepStackSpec(layers=(2,), projector=QWEN2_5_VL_MERGER))
    with pytest.raises(
        ValueError, match=r"Dense Qwen2.5-VL does not support a connector with injection="
    ):
        from_qwen2_5_vl(stock, connector)


# ---------------------------------------------------------------------------- processor


def test_processor_counts_every_image_and_video_with_the_connector() -> None:
    images = [sample_image((56, 56), 0), sample_image((84, 140), 1)]
    clip = video(6, 56, 84)
    for connector, counts in ((DCI_MERGER, (4, 15, 18)), (DCI_MLP, (16, 60, 72))):
        batch = processor(connector)(
            images=images,
            videos=[clip],
            text=[
                toys.IMAGE_PROMPT.replace("w3", "<|vision_start|><|image_pad|><|vision_end|> w3")
                + " "
                + toys.VIDEO_PROMPT
            ],
            return_tensors="pt",
        )
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 10]]
        assert batch["video_grid_thw"].tolist() == [[3, 4, 6]]
        ids = batch["input_ids"][0]
        assert int((ids == toys.IMAGE_TOKEN).sum()) == counts[0] + counts[1]
        assert int((ids == toys.VIDEO_TOKEN).sum()) == counts[2]
        numbers = processor(connector)._get_num_multimodal_tokens(
            image_sizes=[(56, 56), (84, 140)], video_sizes=[(6, 56, 84)]
        )
        assert numbers.num_image_tokens == list(counts[:2])
        assert numbers.num_video_tokens == [counts[2]]


def test_processor_needs_a_connector() -> None:
    with pytest.raises(ValueError, match=r"DenseQwen2_5_VLProcessor needs connector="):
        DenseQwen2_5_VLProcessor(
            image_processor=toys.qwen2_5_vl_image_processor(), tokenizer=toys.tokenizer()
        )


# ---------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def two_images() -> dict[str, torch.Tensor]:
    grid = torch.tensor([[1, 4, 6], [1, 8, 6]])
    ids = torch.tensor([toys.prompt_ids([6, 12])])
    return {
        "input_ids": ids,
        "pixel_values": toys.packed_pixels(grid),
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == toys.IMAGE_TOKEN).long(),
    }


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_wrong_image_token_count_names_both_counts(native, two_images, call) -> None:
    ids = torch.tensor([toys.prompt_ids([6, 11])])
    inputs = two_images | {"input_ids": ids, "mm_token_type_ids": (ids == toys.IMAGE_TOKEN).long()}
    message = r"the prompt holds 17 image tokens but the 2 image\(s\) fill 18 \(\[6, 12\] with"
    with pytest.raises(ValueError, match=message):
        if call == "forward":
            native(**inputs)
        else:
            native.generate(**inputs, max_new_tokens=1, do_sample=False)


def test_wrong_video_token_count_names_both_counts(native) -> None:
    grid = torch.tensor([[2, 4, 4]])
    ids = torch.tensor([toys.prompt_ids([9], token=toys.VIDEO_TOKEN)])
    message = r"the prompt holds 9 video tokens but the 1 video\(s\) fill 8 \(\[8\] with"
    with pytest.raises(ValueError, match=message):
        native(input_ids=ids, pixel_values_videos=toys.packed_pixels(grid), video_grid_thw=grid)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"pixel_values": toys.packed_pixels(torch.tensor([[1, 4, 6], [1, 8, 4]]))},
            ValueError,
            r"pixel_values holds 56 patches but image_grid_thw \[\[1, 4, 6\], \[1, 8, 6\]\] "
            r"describes 72",
        ),
        (
            {"pixel_values": torch.zeros(72, 3, 28, 14)},
            ValueError,
            r"pixel_values must be the processor's flattened patches \[72, 1176\]",
        ),
        (
            {"image_grid_thw": torch.tensor([[1, 4, 6], [1, 9, 6]])},
            ValueError,
            r"image_grid_thw\[1\] = \[1, 9, 6\]: h and w must be multiples of spatial_merge_size=2",
        ),
        (
            {"image_grid_thw": None},
            ValueError,
            r"image_grid_thw is required with pixel_values",
        ),
        (
            {"image_grid_thw": torch.tensor([[1.0, 4, 6], [1, 8, 6]])},
            TypeError,
            r"image_grid_thw must be an integer torch.Tensor",
        ),
    ],
)
def test_pixels_and_grids_the_processor_would_not_make(native, two_images, change, error, message):
    with pytest.raises(error, match=message):
        native(**(two_images | change))


def test_image_token_count_needs_a_processed_size(native) -> None:
    assert native.model.image_token_count((112, 84)) == 12
    with pytest.raises(ValueError, match=r"image_size is required"):
        native.model.image_token_count()
    with pytest.raises(
        ValueError, match=r"image_size=\(100, 84\) is not a size the processor makes"
    ):
        native.model.image_token_count((100, 84))


def test_no_hooks_left_after_a_forward_and_after_one_that_raises(native, two_images) -> None:
    tower = native.model.visual

    def hooks() -> int:
        return sum(
            len(module._forward_hooks) + len(module._forward_pre_hooks)
            for module in tower.modules()
        )

    before = hooks()
    with torch.no_grad():
        native(**two_images)
    assert hooks() == before

    def fail(*args: Any) -> None:
        raise KeyError("inside the tower")

    handle = tower.blocks[2].register_forward_pre_hook(fail)
    try:
        with pytest.raises(KeyError, match="inside the tower"):
            native(**two_images)
    finally:
        handle.remove()
    assert hooks() == before


# ---------------------------------------------------------------------------- training


class _QwenToyData(torch.utils.data.Dataset):
    """Eight samples of one 56 x 84 image (4 x 6 patches, 6 merged tokens) and 4 answer tokens."""

    grid = (1, 4, 6)

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.pixels = torch.randn(8, 24, toys.QWEN25_PATCH_VALUES, generator=generator)
        self.answers = torch.randint(4, 50, (8, 4), generator=generator)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        prompt = torch.tensor(toys.prompt_ids([6], after=0))
        ids = torch.cat([prompt, self.answers[index]])
        labels = torch.cat([torch.full_like(prompt, -100), self.answers[index]])
        return {"input_ids": ids, "labels": labels, "pixel_values": self.pixels[index]}


def _collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([sample["input_ids"] for sample in samples])
    return {
        "input_ids": ids,
        "labels": torch.stack([sample["labels"] for sample in samples]),
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == toys.IMAGE_TOKEN).long(),
        "pixel_values": torch.cat([sample["pixel_values"] for sample in samples]),
        "image_grid_thw": torch.tensor([_QwenToyData.grid] * len(samples)),
    }


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, t in module.state_dict().items() if not torch.equal(t, before[name])}


@pytest.mark.slow
def test_stage_one_trains_exactly_the_connector(tmp_path, caplog) -> None:
    from mmconnect.integrations.training.stages import StageConfig, train_stage

    model = from_qwen2_5_vl(toys.qwen2_5_vl_model(), DCI_MERGER).train()
    tower, llm = _snapshot(model.model.visual), _snapshot(model.model.language_model)
    connector = _snapshot(model.connector)
    stage = StageConfig(
        stage="align",
        output_dir=str(tmp_path / "align"),
        per_device_train_batch_size=4,
        max_steps=3,
        disable_tqdm=True,
    )
    with caplog.at_level(logging.INFO, logger="mmconnect.integrations.training.stages"):
        result = train_stage(model, _QwenToyData(), _collate, stage)
    assert _changed(tower, model.model.visual) == set()
    assert _changed(llm, model.model.language_model) == set()
    assert _changed(connector, model.connector) >= {"projector.fc1.weight", "projector.fc2.weight"}
    assert len(result.losses) == 3 and all(np.isfinite(loss) for _, loss in result.losses)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "align")
    assert type(reloaded) is DenseQwen2_5_VLForConditionalGeneration
    batch = _collate([_QwenToyData()[0]])
    model.eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_stage_two_lora_adapts_the_llm_and_trains_the_connector(tmp_path) -> None:
    from mmconnect.integrations.training.stages import (
        LoraSettings,
        StageConfig,
        parameter_groups,
        prepare_stage,
        train_stage,
    )

    model = from_qwen2_5_vl(toys.qwen2_5_vl_model(), DCI_MERGER).train()
    stage = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path / "instruct"),
        per_device_train_batch_size=4,
        max_steps=2,
        disable_tqdm=True,
        lora=LoraSettings(rank=2, alpha=4, target_modules=("q_proj", "v_proj")),
    )
    groups = parameter_groups(prepare_stage(model, stage))
    assert groups["vision_tower"][0] == 0 and groups["llm"][0] == 0
    assert groups["lora"][0] > 0 and groups["connector"][0] > 0
    model = from_qwen2_5_vl(toys.qwen2_5_vl_model(), DCI_MERGER).train()  # not yet adapted
    connector = _snapshot(model.connector)
    result = train_stage(model, _QwenToyData(), _collate, stage)
    assert len(result.losses) == 2 and all(np.isfinite(loss) for _, loss in result.losses)
    assert _changed(connector, result.model.connector)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct")
    batch = _collate([_QwenToyData()[1]])
    result.model.eval()
    torch.testing.assert_close(
        _logits(loaded, batch), _logits(result.model, batch), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------- family contract

#: Processed sample images (multiples of 28 px inside the processor's 56^2 .. 168^2 bounds,
#: so it keeps them): 4 x 4, 6 x 10 and 8 x 6 patches, 4, 15 and 12 merged tokens.
_SIZES = ((56, 56), (84, 140), (112, 84))


class TestQwen2_5_VLContract(FamilyContractTests):
    model_type = "dense_qwen2_5_vl"
    config_class = DenseQwen2_5_VLConfig
    model_class = DenseQwen2_5_VLModel
    generation_class = DenseQwen2_5_VLForConditionalGeneration
    processor_class = DenseQwen2_5_VLProcessor
    stock_model_class = Qwen2_5_VLModel
    stock_generation_class = Qwen2_5_VLForConditionalGeneration
    vision_tower_names = ("visual",)
    connector_module_names = ("multi_modal_projector",)
    # The 448 x 448 reference image: 32 x 32 patches of 14 px.
    geometry = TowerGeometry(
        width=32, depth=4, image_size=(448, 448), patch_size=14, grid=(32, 32), prefix_tokens=0
    )
    pixel_side = 448  # video frames are resized to the reference image
    image_sizes = _SIZES
    token_counts = (4, 15, 12)
    fixed_image_tokens = False
    frames_are_images = False  # frames take the reference size, images their own
    frame_tokens = 256  # 32 x 32 patches merged 2 x 2
    derived_config_keys = frozenset()
    prompt = toys.IMAGE_PROMPT

    def stock_config(self) -> Qwen2_5_VLConfig:
        return toys.qwen2_5_vl_config()

    def connector(self, kind: str) -> ConnectorConfig:
        if kind == "dense":
            return DCI_MERGER
        if kind == "baseline":  # the native merger: its norm and first Linear are 3x narrower
            return NATIVE
        if kind == "same_shapes":  # SCI on three layers: DCI's widths, another meaning
            return ConnectorConfig(
                fusion=SCISpec(final_layer=4, extra_layers=(1, 2)),
                projector=QWEN2_5_VL_MERGER,
                **_COMMON,
            )
        raise ValueError(f"unknown connector kind {kind!r}")

    def processor(self, connector: ConnectorConfig) -> DenseQwen2_5_VLProcessor:
        return processor(connector)

    # Qwen2.5-VL's resolution is dynamic and its pixels are packed patches, not
    # [images, 3, S, S]: these tests keep the mixin's intent with Qwen's layout.

    def test_tower_geometry_is_the_vision_config(self, model) -> None:
        inner = model.model
        geometry = inner.tower_geometry()
        assert geometry == self.geometry
        vision = model.config.vision_config
        assert (geometry.width, geometry.depth) == (vision.hidden_size, vision.depth)
        assert geometry.patch_size == vision.patch_size
        assert geometry.grid == tuple(side // vision.patch_size for side in geometry.image_size)
        connector = inner.connector.config
        assert (connector.vision_dim, connector.num_layers) == (geometry.width, geometry.depth)

    def test_processor_puts_image_token_count_tokens_per_image(self, model, family_processor):
        inner = model.model
        assert [inner.image_token_count(size) for size in self.image_sizes] == list(
            self.token_counts
        )
        images = self.images()
        batch = family_processor(
            images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True
        )
        assert batch["image_grid_thw"].tolist() == [
            [1, height // 14, width // 14] for height, width in self.image_sizes
        ]
        counts = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
        assert counts == list(self.token_counts)
        assert tuple(batch["pixel_values"].shape) == (
            sum(height * width // 196 for height, width in self.image_sizes),
            toys.QWEN25_PATCH_VALUES,
        )
        logits = _logits(model, dict(batch))
        assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
        assert torch.isfinite(logits).all()

    def test_image_features_are_what_forward_embeds(self, model, family_processor, single):
        inner = model.model
        with torch.no_grad():
            features = inner.image_features(family_processor.image_processor, self.images()[0])
            expected = inner.get_image_features(
                single["pixel_values"], single["image_grid_thw"]
            ).pooler_output[0]
        assert features.shape == (1, self.token_counts[0], model.config.text_config.hidden_size)
        assert torch.equal(features[0], expected)

    def test_frame_pixels_are_the_processors_patches(self, model, family_processor) -> None:
        """Frames laid out as pixels and patched again are the processor's patches, bit for bit
        (so the frame path is the image path at the reference size)."""
        from PIL import Image

        inner = model.model
        frame = self.images()[1]
        pixels = inner.frame_pixel_values(family_processor.image_processor, [frame])
        resized = frame.resize((448, 448), Image.BICUBIC)
        inputs = family_processor.image_processor(
            images=[resized],
            size={"shortest_edge": 448 * 448, "longest_edge": 448 * 448},
            return_tensors="pt",
        )
        with torch.no_grad():
            expected = inner.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"]
            ).pooler_output[0]
            actual = inner.frame_features(pixels)[0]
        assert torch.equal(actual, expected)

    def test_wrong_pixel_size(self, model, single) -> None:
        """Pixels of another patch size (a processor of another tower) are named with the
        expected packed shape."""
        rows = single["pixel_values"].shape[0]
        pixels = torch.zeros(rows, 3 * 2 * 16 * 16)  # 16-px patches
        message = (
            rf"pixel_values must be the processor's flattened patches \[{rows}, 1176\].*got "
            rf"shape \({rows}, 1536\)"
        )
        with pytest.raises(ValueError, match=message):
            model(**(single | {"pixel_values": pixels}))

    def test_modules_and_parameters_match_the_stock_model(self) -> None:
        """The stock children and parameters, except that the tower's merger is the connector
        (``multi_modal_projector``; the tower's ``merger`` is an ``nn.Identity``)."""
        from tests.integrations.families.family_contract import (
            _parameter_shapes,
            _public_attributes,
        )

        torch.manual_seed(0)
        stock = self.stock_generation_class(self.stock_config()).eval()
        dense = self.build(None)
        inner = dense.model
        assert {name for name, _ in inner.named_children()} == {
            name for name, _ in stock.model.named_children()
        } | {"multi_modal_projector"}
        assert isinstance(inner.visual.merger, torch.nn.Identity)
        skip = ("multi_modal_projector.", "visual.merger.")
        assert _parameter_shapes(inner, skip) == _parameter_shapes(stock.model, skip)
        assert _public_attributes(inner) == _public_attributes(stock.model)
        assert _public_attributes(dense).keys() == _public_attributes(stock).keys()
        stock_merger = {
            name.removeprefix("visual.merger."): tuple(parameter.shape)
            for name, parameter in stock.model.named_parameters()
            if name.startswith("visual.merger.")
        }
        assert len(stock_merger) == 5  # ln_q.weight, mlp.{0,2}.{weight,bias}
        native = {
            name: tuple(parameter.shape)
            for name, parameter in inner.connector.projector.named_parameters()
        }
        assert sorted(native.values()) == sorted(stock_merger.values())
