"""Dense Qwen3-VL (``mmconnect.integrations.families.qwen3_vl``) on tiny random models.

Parity first: with Qwen3-VL's own connector (the final merger and three DeepStack mergers,
weights converted through the zoo by ``from_qwen3_vl``) the logits equal the stock
``Qwen3VLForConditionalGeneration``'s for one image, several images of different sizes in one
batch, a video, and images with a video in one prompt (fp32 and bf16). Then the Dense
connectors (DCI into the merger with and without DeepStack, DCI into ``mlp2x_gelu`` with its
unmerged token grid on M-RoPE), the tap (early exit, streaming group sums, no hook leaks), the
processor's counts, two-stage training, bad inputs, and the shared family contract.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

from mmconnect import ConnectorConfig, LayerFeatures, SCISpec, STISpec
from mmconnect.integrations.families.protocol import TowerGeometry, family_model
from mmconnect.integrations.families.qwen3_vl import (
    DenseQwen3VLConfig,
    DenseQwen3VLForConditionalGeneration,
    DenseQwen3VLModel,
    DenseQwen3VLProcessor,
    from_qwen3_vl,
    native_connector,
)
from mmconnect.integrations.training.stages import (
    LoraSettings,
    StageConfig,
    parameter_groups,
    prepare_stage,
)
from tests.integrations.families.family_contract import FamilyContractTests
from tests.support import qwen3_vl_toys as toys

#: (height, width) of the sample images: the processor keeps the first three (multiples of
#: 16 px) and resizes 44 x 40 to 48 x 32.
SIZES = ((32, 32), (48, 64), (16, 48), (44, 40))
#: Patch grids the processor makes of them, and the merged tokens per image (h/2 * w/2).
GRIDS = ((4, 4), (6, 8), (2, 6), (6, 4))
MERGED_TOKENS = (4, 12, 3, 6)


def _images(count: int = 3) -> list:
    return [toys.sample_image(size, seed) for seed, size in enumerate(SIZES[:count])]


@pytest.fixture(scope="module")
def stock():
    return toys.stock_model()


@pytest.fixture(scope="module")
def native(stock):
    return from_qwen3_vl(stock, native_connector(stock.config))


@pytest.fixture(scope="module")
def processor():
    return toys.stock_processor()


def _batch(processor, images=None, videos=None, texts=None):
    return dict(
        processor(images=images, videos=videos, text=texts, return_tensors="pt", padding=True)
    )


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------- parity


def test_native_connector_is_the_zoo_preset_at_real_size() -> None:
    from transformers import Qwen3VLConfig

    config = Qwen3VLConfig(
        text_config={"hidden_size": 4096}, vision_config={"out_hidden_size": 4096}
    )
    assert native_connector(config) == ConnectorConfig.from_preset("qwen3-vl-8b+deepstack-768")


def test_single_image_logits_equal_the_stock_model_bit_for_bit(stock, native, processor) -> None:
    inputs = _batch(processor, images=_images(1), texts=[toys.IMAGE_PROMPT])
    assert int((inputs["input_ids"] == toys.IMAGE_TOKEN).sum()) == MERGED_TOKENS[0]
    assert torch.equal(_logits(native, inputs), _logits(stock, inputs))


def test_images_of_different_sizes_in_one_batch(stock, native, processor) -> None:
    """Three sizes (4x4, 6x8 and 2x6 patches), two prompts, one with two images: the connector
    runs once per grid; within 1e-5 of the stock logits (measured: 1.0e-7, fp32)."""
    texts = [toys.IMAGE_PROMPT, f"{toys.IMAGE_PROMPT} {toys.IMAGE_PROMPT}"]
    inputs = _batch(processor, images=_images(3), texts=texts)
    assert inputs["image_grid_thw"].tolist() == [[1, *grid] for grid in GRIDS[:3]]
    expected = _logits(stock, inputs)
    torch.testing.assert_close(_logits(native, inputs), expected, atol=1e-5, rtol=0)


def test_video_and_images_with_a_video(stock, native, processor) -> None:
    video = toys.sample_video(4, (32, 48), seed=5)  # 2 temporal slices of 4x6 patches
    inputs = _batch(processor, videos=[video], texts=[toys.VIDEO_PROMPT])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert int((inputs["input_ids"] == toys.VIDEO_TOKEN).sum()) == 12
    assert torch.equal(_logits(native, inputs), _logits(stock, inputs))
    mixed = _batch(
        processor,
        images=_images(2),
        videos=[video],
        texts=[f"{toys.IMAGE_PROMPT} {toys.VIDEO_PROMPT} {toys.IMAGE_PROMPT}"],
    )
    torch.testing.assert_close(_logits(native, mixed), _logits(stock, mixed), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_bf16_logits_equal_the_stock_model(processor) -> None:
    """bf16 towers and LLM: measured bit-exact on the batch of three sizes and on a video."""
    stock = toys.stock_model().to(torch.bfloat16)
    dense = from_qwen3_vl(stock, native_connector(stock.config))
    texts = [toys.IMAGE_PROMPT, f"{toys.IMAGE_PROMPT} {toys.IMAGE_PROMPT}"]
    inputs = _batch(processor, images=_images(3), texts=texts)
    assert torch.equal(_logits(dense, inputs), _logits(stock, inputs))
    video = _batch(processor, videos=[toys.sample_video(4, (32, 48), 5)], texts=[toys.VIDEO_PROMPT])
    assert torch.equal(_logits(dense, video), _logits(stock, video))


def test_conversion_shares_the_stock_modules_and_reuses_the_mergers(stock, native) -> None:
    assert native.model.language_model is stock.model.language_model
    assert native.lm_head is stock.lm_head
    for name in ("patch_embed", "pos_embed", "rotary_pos_emb", "blocks"):
        assert getattr(native.model.visual, name) is getattr(stock.model.visual, name)
    merger = stock.model.visual.merger
    projector = native.connector.projector
    assert torch.equal(projector.fc1.weight, merger.linear_fc1.weight)
    assert torch.equal(projector.norm.weight, merger.norm.weight)
    for ours, theirs in zip(
        native.connector.injection, stock.model.visual.deepstack_merger_list, strict=True
    ):
        assert torch.equal(ours.fc2.weight, theirs.linear_fc2.weight)
    assert not any(name.startswith("model.visual.merger") for name, _ in native.named_parameters())


def test_get_image_features_in_the_stock_layout(stock, native, processor) -> None:
    inputs = _batch(processor, images=_images(3), texts=[toys.IMAGE_PROMPT] * 3)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        ours = native.model.get_image_features(pixels, grid)
        theirs = stock.model.get_image_features(pixels, grid)
    assert [tuple(t.shape) for t in ours.pooler_output] == [(n, 32) for n in MERGED_TOKENS[:3]]
    for mine, reference in zip(ours.pooler_output, theirs.pooler_output, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)
    assert len(ours.deepstack_features) == 3
    for level, reference in zip(ours.deepstack_features, theirs.deepstack_features, strict=True):
        for mine, expected in zip(level, reference, strict=True):
            torch.testing.assert_close(mine, expected, atol=1e-6, rtol=0)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)


# ---------------------------------------------------------------------------- Dense connectors


@pytest.mark.parametrize("deepstack", [False, True])
def test_dci_into_the_merger(stock, processor, deepstack) -> None:
    """DCI feeding Qwen3-VL's merger: the stock token counts and positions; with DeepStack the
    stock mergers are reused and the residuals change the logits."""
    dense = from_qwen3_vl(stock, toys.dci_connector(deepstack=deepstack))
    inputs = _batch(processor, images=_images(3), texts=[toys.IMAGE_PROMPT] * 3)
    logits = _logits(dense, inputs)
    assert logits.shape == (3, inputs["input_ids"].shape[1], toys.VOCAB)
    assert torch.isfinite(logits).all()
    if deepstack:
        deep = stock.model.visual.deepstack_merger_list
        assert torch.equal(dense.connector.injection[2].fc1.weight, deep[2].linear_fc1.weight)
        with torch.no_grad():
            for projector in dense.connector.injection:
                projector.fc2.weight.zero_(), projector.fc2.bias.zero_()
            plain = from_qwen3_vl(stock, toys.dci_connector(deepstack=False))
            shared = {
                key: value
                for key, value in dense.connector.state_dict().items()
                if key.startswith(("fusion.", "projector."))
            }
            plain.connector.load_state_dict(shared, strict=False)
        torch.testing.assert_close(
            _logits(plain, inputs), _logits(dense, inputs), atol=1e-6, rtol=0
        )


def test_unmerged_tokens_get_their_own_grid_positions(stock) -> None:
    """DCI into mlp2x_gelu keeps one token per patch: the processor inserts h*w tokens and
    M-RoPE places them on the (h, w) grid, as the stock index places a merger's tokens on
    (h/2, w/2)."""
    connector = toys.dci_connector(projector="mlp")
    dense = from_qwen3_vl(stock, connector)
    processor = toys.dense_processor(connector)
    inputs = _batch(processor, images=[toys.sample_image((48, 64), 1)], texts=[toys.IMAGE_PROMPT])
    assert int((inputs["input_ids"] == toys.IMAGE_TOKEN).sum()) == 48  # 6 x 8 patches
    positions, _ = dense.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    image = (inputs["input_ids"][0] == toys.IMAGE_TOKEN).nonzero()[:, 0]
    start = int(positions[0, 0, image[0]])
    rows = positions[1, 0, image] - start
    columns = positions[2, 0, image] - start
    assert rows.tolist() == [row for row in range(6) for _ in range(8)]
    assert columns.tolist() == list(range(8)) * 6
    assert (positions[0, 0, image] == start).all()
    after = int(image[-1]) + 1  # the next text token follows the grid's larger side
    assert int(positions[0, 0, after]) == start + 8
    assert torch.isfinite(_logits(dense, inputs)).all()


def test_a_connector_whose_tokens_form_no_grid_is_refused(stock) -> None:
    sti = ConnectorConfig(
        vision_dim=toys.WIDTH,
        llm_dim=toys.LLM_WIDTH,
        num_layers=toys.DEPTH,
        fusion=STISpec(final_layer=toys.DEPTH, extra_layers=(2,), window=2),
    )
    with pytest.raises(
        ValueError, match=r"Dense Qwen3-VL cannot use a connector whose tokens form no grid"
    ):
        from_qwen3_vl(stock, sti)


def test_a_preset_for_another_tower_depth_is_refused(stock) -> None:
    with pytest.raises(ValueError, match=r"connector num_layers=27 does not match .*\(5\)"):
        from_qwen3_vl(stock, "dc-dci+qwen3-merger+deepstack-qwen3-vl-768")


def test_from_qwen3_vl_refuses_other_models(native) -> None:
    with pytest.raises(TypeError, match=r"must be an HF Qwen3VLForConditionalGeneration"):
        from_qwen3_vl(native, "qwen3-vl-8b+deepstack-768")
    with pytest.raises(TypeError, match=r"must be an HF Qwen3VLForConditionalGeneration"):
        from_qwen3_vl(torch.nn.Linear(2, 2), "qwen3-vl-8b+deepstack-768")


# ---------------------------------------------------------------------------- the tap


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(sub._forward_hooks) + len(sub._forward_pre_hooks) for sub in module.modules())


def test_early_exit_and_streaming_group_means(stock, processor) -> None:
    """DCI reads layers up to hidden_states[5] (the last block): every block runs; an SCI on
    layers 1 and 3 stops after block 3. The streamed group means equal the means of the
    tower's own hidden_states."""
    dense = from_qwen3_vl(stock, toys.dci_connector())
    inputs = _batch(processor, images=_images(2), texts=[toys.IMAGE_PROMPT] * 2)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    tap = dense.connector.make_tap(dense.model.visual, num_prefix_tokens=0)
    with torch.no_grad():
        features = tap(pixels, grid_thw=grid)
        hidden = stock.model.visual(pixels, grid_thw=grid, output_hidden_states=True).hidden_states
    assert len(hidden) == toys.DEPTH + 1  # hidden_states[k]: the output of block k - 1
    states = LayerFeatures({k: state[None] for k, state in enumerate(hidden)})
    assert torch.equal(features[5], states[5])
    stacked = torch.stack([states[k] for k in (3, 4)])
    assert torch.equal(features.group_means[(3, 4)], stacked.sum(0) / 2)
    sci = ConnectorConfig(
        vision_dim=toys.WIDTH,
        llm_dim=toys.LLM_WIDTH,
        num_layers=toys.DEPTH,
        fusion=SCISpec(final_layer=3, extra_layers=(1,)),
    )
    early = from_qwen3_vl(stock, sci)
    calls = []
    handles = [
        block.register_forward_hook(lambda *_, index=index: calls.append(index))
        for index, block in enumerate(early.model.visual.blocks)
    ]
    try:
        with torch.no_grad():
            early.model.get_image_features(pixels, grid)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1, 2]


def test_no_hooks_are_left_after_a_forward_or_a_failing_one(native, processor) -> None:
    tower = native.model.visual
    before = _hooks(tower)
    inputs = _batch(processor, images=_images(1), texts=[toys.IMAGE_PROMPT])
    _logits(native, inputs)
    assert _hooks(tower) == before  # HF's own output-recording hooks stay, ours are gone
    broken = inputs | {
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values": inputs["pixel_values"][:, :10],
    }
    with pytest.raises(ValueError):
        _logits(native, broken)

    def fail(*_):
        raise RuntimeError("block failed")

    handle = tower.blocks[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="block failed"):
        _logits(native, inputs)
    handle.remove()
    assert _hooks(tower) == before


# ---------------------------------------------------------------------------- processor


def test_processor_counts_images_and_video_slices() -> None:
    connector = toys.dci_connector(projector="mlp")
    processor = toys.dense_processor(connector)
    images = [toys.sample_image(size, seed) for seed, size in enumerate(SIZES)]
    batch = processor(
        images=images, text=[toys.IMAGE_PROMPT] * 4, return_tensors="pt", padding=True
    )
    counts = (batch["input_ids"] == toys.IMAGE_TOKEN).sum(1).tolist()
    assert counts == [h * w for h, w in GRIDS]
    assert [processor.num_image_tokens(*size) for size in SIZES] == counts
    data = processor._get_num_multimodal_tokens(image_sizes=[list(size) for size in SIZES])
    assert data["num_image_tokens"] == counts
    video = processor(
        videos=[toys.sample_video(4, (32, 48), 5)], text=[toys.VIDEO_PROMPT], return_tensors="pt"
    )
    ids = video["input_ids"][0].tolist()
    assert ids.count(toys.VIDEO_TOKEN) == 2 * 24  # 2 slices of 4x6 patches, one token each
    assert ids.count(toys.VISION_START) == 3  # the prompt's own, then one per slice
    with pytest.raises(ValueError, match=r"video_sizes= is not supported"):
        processor._get_num_multimodal_tokens(video_sizes=[[4, 32, 48]])


def test_processor_needs_a_connector() -> None:
    with pytest.raises(ValueError, match=r"DenseQwen3VLProcessor needs connector="):
        DenseQwen3VLProcessor(
            image_processor=toys.image_processor(),
            tokenizer=toys.tokenizer(),
            video_processor=toys.video_processor(),
        )


# ---------------------------------------------------------------------------- bad inputs


def test_pixels_and_grids_the_processor_would_not_make(native, processor) -> None:
    inputs = _batch(processor, images=_images(1), texts=[toys.IMAGE_PROMPT])
    pixels = inputs["pixel_values"]
    cases = {
        r"image_grid_thw\[0\] = \[1, 4, 3\]: h and w must be multiples of spatial_merge_size=2": {
            "image_grid_thw": torch.tensor([[1, 4, 3]]),
        },
        r"pixel_values holds 16 patches but image_grid_thw \[\[1, 4, 8\]\] describes 32": {
            "image_grid_thw": torch.tensor([[1, 4, 8]]),
        },
        r"pixel_values must be the processor's flattened patches \[16, 384\]": {
            "pixel_values": pixels[:, :100],
        },
        r"image_grid_thw\[0\] = \[2, 2, 4\]: an image has t=1": {
            "image_grid_thw": torch.tensor([[2, 2, 4]]),
        },
        r"pixel_values needs image_grid_thw": {"image_grid_thw": None},
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            native(**(inputs | change))


def test_wrong_video_token_count(native, processor) -> None:
    inputs = _batch(
        processor, videos=[toys.sample_video(4, (32, 48), 5)], texts=[toys.VIDEO_PROMPT]
    )
    ids = inputs["input_ids"]
    position = int((ids[0] == toys.VIDEO_TOKEN).nonzero()[0, 0])
    shorter = torch.cat([ids[:, :position], ids[:, position + 1 :]], dim=1)
    with pytest.raises(ValueError, match=r"holds 11 video tokens but 1 video\(s\) fill 12"):
        native(**(inputs | {"input_ids": shorter, "attention_mask": torch.ones_like(shorter)}))


def test_image_token_count_takes_the_processed_size(native) -> None:
    assert native.model.image_token_count((48, 64)) == 12
    with pytest.raises(ValueError, match=r"multiples of patch_size \* spatial_merge_size = 16 px"):
        native.model.image_token_count((40, 40))
    with pytest.raises(ValueError, match=r"image_size must be the \(height, width\)"):
        native.model.image_token_count(None)


# ---------------------------------------------------------------------------- training


def _loss(model, processor) -> torch.Tensor:
    inputs = _batch(processor, images=_images(2), texts=[toys.IMAGE_PROMPT] * 2)
    return model(**inputs, labels=inputs["input_ids"]).loss


def test_stage1_trains_exactly_the_connector_with_its_deepstack_projectors(stock, tmp_path) -> None:
    connector = toys.dci_connector(deepstack=True)
    model = from_qwen3_vl(toys.stock_model(), connector).train()
    model = prepare_stage(model, StageConfig(stage="align", output_dir=str(tmp_path)))
    groups = parameter_groups(model)
    assert groups["connector"][0] == groups["connector"][1] > 0
    assert groups["vision_tower"][0] == 0 and groups["llm"][0] == 0
    _loss(model, toys.dense_processor(connector)).backward()
    owned = {id(parameter) for parameter in family_model(model).connector.parameters()}
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (id(parameter) in owned), name
        if id(parameter) in owned:
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.slow
def test_lora_stage2_trains_adapters_and_the_connector(tmp_path) -> None:
    pytest.importorskip("peft")
    connector = toys.dci_connector(deepstack=True)
    model = from_qwen3_vl(toys.stock_model(), connector).train()
    stage = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path),
        lora=LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj")),
    )
    model = prepare_stage(model, stage)
    groups = parameter_groups(model)
    assert groups["lora"][0] > 0 and groups["llm"][0] == 0 and groups["vision_tower"][0] == 0
    _loss(model, toys.dense_processor(connector)).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    copy = [name for name, _ in model.named_parameters() if "modules_to_save" in name]
    assert any(".injection." in name for name in copy)


# ---------------------------------------------------------------------------- contract


class TestQwen3VLContract(FamilyContractTests):
    """The family contract; the tests whose pixel layout assumptions (``[images, 3, S, S]``,
    a fixed image size, frames as images) do not hold for packed patches are overridden with
    the same intent."""

    model_type = "dense_qwen3_vl"
    config_class = DenseQwen3VLConfig
    model_class = DenseQwen3VLModel
    generation_class = DenseQwen3VLForConditionalGeneration
    processor_class = DenseQwen3VLProcessor
    stock_model_class = Qwen3VLModel
    stock_generation_class = Qwen3VLForConditionalGeneration
    vision_tower_names = ("visual",)
    connector_module_names = ("multi_modal_projector",)
    geometry = TowerGeometry(
        width=toys.WIDTH,
        depth=toys.DEPTH,
        image_size=(32, 32),
        patch_size=8,
        grid=(4, 4),
        prefix_tokens=0,
    )
    image_sizes = SIZES
    token_counts = MERGED_TOKENS
    fixed_image_tokens = False
    frames_are_images = False
    derived_config_keys = frozenset()
    prompt = toys.IMAGE_PROMPT

    def stock_config(self):
        return toys.stock_config()

    def connector(self, kind: str) -> ConnectorConfig:
        if kind == "dense":
            return toys.dci_connector(deepstack=True)
        if kind == "baseline":
            return native_connector(self.stock_config())
        return toys.dci_connector(deepstack=True).replace(
            fusion=toys.dci_connector().fusion.__class__(final_layer=5, groups=((0, 1), (2, 3, 4)))
        )

    def processor(self, connector: ConnectorConfig):
        return toys.dense_processor(connector)

    def image_token_id(self, processor) -> int:
        return toys.IMAGE_TOKEN

    # ------------------------------------------------------------------ overrides
    def test_tower_geometry_is_the_vision_config(self, model) -> None:
        inner = model.model
        geometry = inner.tower_geometry()
        assert geometry == self.geometry
        vision = model.config.vision_config
        assert (geometry.width, geometry.depth) == (vision.hidden_size, vision.depth)
        assert geometry.grid[0] ** 2 == vision.num_position_embeddings
        connector = inner.connector.config
        assert (connector.vision_dim, connector.num_layers) == (geometry.width, geometry.depth)

    def test_processor_puts_image_token_count_tokens_per_image(self, model, family_processor):
        """The processor's counts per image equal ``image_token_count`` at the processed size
        and its own ``num_image_tokens`` for the original size; the logits are finite."""
        images = self.images()
        batch = family_processor(
            images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True
        )
        counts = (batch["input_ids"] == toys.IMAGE_TOKEN).sum(dim=1).tolist()
        assert counts == list(self.token_counts)
        grids = batch["image_grid_thw"].tolist()
        assert [tuple(grid[1:]) for grid in grids] == list(GRIDS)
        inner = model.model
        assert [inner.image_token_count((h * 8, w * 8)) for _, h, w in grids] == counts
        assert [family_processor.num_image_tokens(*size) for size in self.image_sizes] == counts
        assert tuple(batch["pixel_values"].shape) == (sum(h * w for _, h, w in grids), 384)
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (*batch["input_ids"].shape, toys.VOCAB)
        assert torch.isfinite(logits).all()

    def test_image_features_are_what_forward_embeds(self, model, family_processor, single):
        inner = model.model
        with torch.no_grad():
            features = inner.image_features(family_processor.image_processor, self.images()[0])
            expected = inner.get_image_features(
                single["pixel_values"], single["image_grid_thw"]
            ).pooler_output[0]
        assert features.shape == (1, self.token_counts[0], toys.LLM_WIDTH)
        assert torch.equal(features[0], expected)

    def test_frame_features(self, model, family_processor):
        """Frames as separate images do not apply (packed patches need their grids): the
        protocol's frame path refuses, naming the video input to use."""
        inner = model.model
        with pytest.raises(ValueError, match=r"pixel_values_videos and video_grid_thw"):
            inner.frame_pixel_values(family_processor.image_processor, self.images()[:2])
        with pytest.raises(ValueError, match=r"pixel_values_videos and video_grid_thw"):
            inner.frame_features(torch.zeros(2, 3, 32, 32))

    def test_wrong_pixel_size(self, model, single) -> None:
        """Pixels of another size than the grid says (one patch row more)."""
        pixels = torch.cat([single["pixel_values"], single["pixel_values"][:4]])
        with pytest.raises(
            ValueError, match=r"holds 20 patches but image_grid_thw \[\[1, 4, 4\]\] describes 16"
        ):
            model(**(single | {"pixel_values": pixels}))

    def test_modules_and_parameters_match_the_stock_model(self) -> None:
        """As the stock model, but the tower's mergers live in the connector
        (``multi_modal_projector``), a child the stock model lacks."""
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
        skip = ("multi_modal_projector.", "visual.merger.", "visual.deepstack_merger_list.")
        assert _parameter_shapes(inner, skip) == _parameter_shapes(stock.model, skip)
        outer = tuple(f"model.{prefix}" for prefix in skip)
        assert _parameter_shapes(dense, outer) == _parameter_shapes(stock, outer)
        assert _public_attributes(inner) == _public_attributes(stock.model)
        assert _public_attributes(dense).keys() == _public_attributes(stock).keys()
        assert isinstance(inner.visual.merger, torch.nn.Identity)
        assert len(inner.visual.deepstack_merger_list) == 0


class _Examples(torch.utils.data.Dataset):
    """Four processed one-image examples (the images of :data:`SIZES`) with their labels."""

    def __init__(self, processor) -> None:
        self.items = []
        for seed, size in enumerate(SIZES):
            inputs = _batch(
                processor, images=[toys.sample_image(size, seed)], texts=[toys.IMAGE_PROMPT]
            )
            self.items.append(inputs | {"labels": inputs["input_ids"].clone()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _one(examples: list[dict]) -> dict:
    """Batches of one example: the processor's tensors as they are."""
    (example,) = examples
    return example


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.slow
def test_two_stages_on_the_trainer_and_auto_reload(tmp_path) -> None:
    """Stage 1 on the HF Trainer changes exactly the connector (DeepStack projectors included);
    LoRA stage 2 starts from stage 1's saved directory; the result reloads with the Auto
    classes and gives the trained model's logits."""
    from transformers import AutoModelForImageTextToText

    from mmconnect.integrations.training.stages import train_stage

    connector = toys.dci_connector(deepstack=True)
    processor = toys.dense_processor(connector)
    data = _Examples(processor)
    model = from_qwen3_vl(toys.stock_model(), connector)
    tower, llm = _state(model.model.visual), _state(model.model.language_model)
    before = _state(model.connector)

    def stage(name: str, **options) -> StageConfig:
        return StageConfig(
            stage=name,
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=1,
            max_steps=2,
            disable_tqdm=True,
            **options,
        )

    first = train_stage(model, data, _one, stage("align"), processor=processor)
    assert _state(model.model.visual).keys() == tower.keys()
    assert all(torch.equal(value, tower[key]) for key, value in _state(model.model.visual).items())
    assert all(
        torch.equal(value, llm[key]) for key, value in _state(model.model.language_model).items()
    )
    moved = {
        key for key, value in _state(model.connector).items() if not torch.equal(value, before[key])
    }
    assert {"projector.fc1.weight", "projector.fc2.weight", "projector.norm.weight"} <= moved
    assert {f"injection.{level}.fc2.weight" for level in range(3)} <= moved
    assert len(first.losses) == 2

    aligned = AutoModelForImageTextToText.from_pretrained(tmp_path / "align")
    assert type(aligned) is DenseQwen3VLForConditionalGeneration
    lora = LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
    second = train_stage(aligned, data, _one, stage("instruct", lora=lora), processor=processor)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct").eval()
    batch = {key: value for key, value in data[1].items() if key != "labels"}
    with torch.no_grad():
        expected = second.model.eval()(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["unmerged", "video"])
def test_generate_equals_greedy_full_forwards(stock, kind) -> None:
    """Greedy ``generate`` (cache, M-RoPE deltas, DeepStack at prefill) picks the tokens that
    full forwards of the growing sequence pick: for DCI into mlp2x_gelu (one token per patch,
    positions on the unmerged grid) and for a video through Qwen3-VL's own connector."""
    if kind == "unmerged":
        connector = toys.dci_connector(projector="mlp")
        inputs = _batch(
            toys.dense_processor(connector),
            images=[toys.sample_image((48, 64), 1)],
            texts=[toys.IMAGE_PROMPT],
        )
    else:
        connector = native_connector(stock.config)
        inputs = _batch(
            toys.dense_processor(connector),
            videos=[toys.sample_video(4, (32, 48), 5)],
            texts=[toys.VIDEO_PROMPT],
        )
    model = from_qwen3_vl(stock, connector)
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    ids = inputs["input_ids"]
    for _ in range(3):
        step = inputs | {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": torch.nn.functional.pad(
                inputs["mm_token_type_ids"], (0, ids.shape[1] - inputs["input_ids"].shape[1])
            ),
        }
        next_id = _logits(model, step)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


def test_output_hidden_states_runs_the_tower_in_full(processor) -> None:
    """Asked for the tower's hidden states, the tower runs every block under the same tap: the
    tokens are the early-exit ones and the states are the stock tower's.

    Fresh models: HF records hidden states with hooks it installs once per model on the blocks,
    so blocks shared by a converted model and its source, both asked for hidden states, record
    each state twice."""
    native = from_qwen3_vl(toys.stock_model(), native_connector(toys.stock_config()))
    stock = toys.stock_model()  # the same weights (seed 0), its own blocks
    inputs = _batch(processor, images=_images(2), texts=[toys.IMAGE_PROMPT] * 2)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        full = native.model.get_image_features(pixels, grid, output_hidden_states=True)
        early = native.model.get_image_features(pixels, grid)
        reference = stock.model.visual(pixels, grid_thw=grid, output_hidden_states=True)
    assert early.hidden_states is None
    assert len(full.hidden_states) == toys.DEPTH + 1
    for ours, theirs in zip(full.hidden_states, reference.hidden_states, strict=True):
        assert torch.equal(ours, theirs)
    for mine, expected in zip(full.pooler_output, early.pooler_output, strict=True):
        assert torch.equal(mine, expected)
