"""Dense Idefics3 (mmconnect.integrations.families.idefics3): parity with the stock HF model,
tiling and token counts, the processor, Dense connectors, the tap, training, bad inputs and the
family contract.

The tiny parts (tests/support/idefics3_toys.py): a 4-block SigLIP-style tower 16 wide with 56 px
tiles (4x4 patches), a pixel shuffle by 2 (4 tokens per tile), a 2-layer Llama 32 wide. Sample
images of 60x60, 30x120 and 100x50 px become 17, 5 and 9 tiles (written out in the toys).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import pytest
import torch
from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Model

from mmconnect import ConnectorConfig, DeepStackSpec
from mmconnect.integrations.families.idefics3 import (
    DenseIdefics3Config,
    DenseIdefics3ForConditionalGeneration,
    DenseIdefics3Model,
    DenseIdefics3Processor,
    from_idefics3,
    native_connector,
    split_layout,
    tiles_per_image,
)
from mmconnect.integrations.families.protocol import TowerGeometry, convert_to_dense
from tests.integrations.families.family_contract import FamilyContractTests
from tests.support import idefics3_toys as toys

PROMPT = "USER : <image> what is in the image ASSISTANT :"
SIZES = tuple(toys.SAMPLE_TILES)


@pytest.fixture(scope="module")
def stock() -> Idefics3ForConditionalGeneration:
    return toys.stock_idefics3()


@pytest.fixture(scope="module")
def dense(stock) -> DenseIdefics3ForConditionalGeneration:
    return from_idefics3(stock, toys.connectors("idefics3")["native"]).eval()


@pytest.fixture(scope="module")
def stock_processor():
    return toys.stock_idefics3_processor()


def processor(connector: ConnectorConfig, **fields: Any) -> DenseIdefics3Processor:
    return DenseIdefics3Processor(
        toys.image_processor("idefics3", **fields),
        toys.tokenizer(),
        connector=connector,
        patch_size=toys.PATCH,
    )


def images(sizes=SIZES) -> list:
    return [toys.sample_image(size, seed) for seed, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def split_batch(stock_processor) -> dict[str, torch.Tensor]:
    """Three prompts, one image each (17, 5 and 9 tiles), and a fourth with two images."""
    pictures = images()
    nested = [[picture] for picture in pictures] + [[pictures[1], pictures[2]]]
    texts = [PROMPT] * 3 + ["USER : <image> and <image> ASSISTANT :"]
    return dict(stock_processor(images=nested, text=texts, return_tensors="pt", padding=True))


# ---------------------------------------------------------------------------- parity


def test_conversion_shares_the_stock_parts(stock, dense):
    assert dense.model.vision_model is stock.model.vision_model
    assert dense.model.text_model is stock.model.text_model
    assert dense.lm_head is stock.lm_head
    assert dense.model.language_model is stock.model.text_model
    assert torch.equal(
        dense.connector.projector.proj.weight, stock.model.connector.modality_projection.proj.weight
    )
    assert dense.config.image_seq_len == 4 == stock.model.image_seq_len


def test_native_connector_is_the_toys_native(stock):
    assert native_connector(stock.config) == toys.connectors("idefics3")["native"]


def test_single_unsplit_image_logits_are_bit_exact(stock, dense):
    unsplit = DenseIdefics3Processor(
        toys.image_processor("idefics3", do_image_splitting=False),
        toys.tokenizer(),
        connector=native_connector(stock.config),
        patch_size=toys.PATCH,
    )
    batch = dict(unsplit(images=images()[:1], text=[PROMPT], return_tensors="pt"))
    assert tuple(batch["pixel_values"].shape) == (1, 1, 3, 56, 56)
    assert int((batch["input_ids"] == toys.IMAGE).sum()) == 4
    with torch.no_grad():
        assert torch.equal(dense(**batch).logits, stock(**batch).logits)


def test_split_images_of_different_sizes_in_one_batch_are_bit_exact(stock, dense, split_batch):
    # tiles per row: 17, 5, 9 and 5 + 9 (padded to 17 with all-zero tiles)
    counts = (split_batch["input_ids"] == toys.IMAGE).sum(dim=1).tolist()
    assert counts == [68, 20, 36, 56]
    assert tuple(split_batch["pixel_values"].shape) == (4, 17, 3, 56, 56)
    with torch.no_grad():
        expected = stock(**split_batch).logits
        actual = dense(**split_batch).logits
        stock_images = stock.model.get_image_features(
            split_batch["pixel_values"], split_batch["pixel_attention_mask"]
        )
        dense_images = dense.model.get_image_features(
            split_batch["pixel_values"], split_batch["pixel_attention_mask"]
        )
    assert torch.equal(actual, expected)
    assert [tuple(row.shape) for row in dense_images.pooler_output] == [
        (68, 32),
        (20, 32),
        (36, 32),
        (56, 32),
    ]
    for ours, theirs in zip(dense_images.pooler_output, stock_images.pooler_output, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(dense_images.last_hidden_state, stock_images.last_hidden_state)


def test_hidden_states_when_asked_for(stock, dense, split_batch):
    pixels = split_batch["pixel_values"][:1]
    with torch.no_grad():
        ours = dense.model.get_image_features(pixels, output_hidden_states=True)
        theirs = stock.model.get_image_features(pixels, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 5
    for mine, stock_state in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert torch.equal(mine, stock_state)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)


def test_bf16_logits_match_the_stock_bf16_model(split_batch):
    stock = toys.stock_idefics3().to(torch.bfloat16)
    dense = from_idefics3(stock, toys.connectors("idefics3")["native"]).eval()
    batch = split_batch | {"pixel_values": split_batch["pixel_values"].to(torch.bfloat16)}
    with torch.no_grad():
        expected = stock(**batch).logits
        actual = dense(**batch).logits
    # measured: bit-exact (the same bf16 ops in the same order); the bound allows no drift
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------- tiling and counts


@pytest.mark.parametrize(
    "size",
    [(60, 60), (30, 120), (100, 50), (20, 20), (56, 56), (57, 55), (224, 223), (1, 300),
     (300, 1), (5000, 100), (97, 211), (333, 111), (13, 4000)],
)  # fmt: skip
def test_split_layout_is_the_image_processors(size):
    image_processor = toys.image_processor("idefics3")
    out = image_processor(
        images=[[toys.sample_image(size, 0)]], return_row_col_info=True, return_tensors="pt"
    )
    rows, cols = out["rows"][0][0], out["cols"][0][0]
    assert split_layout(size, 224, 56) == (rows, cols)
    assert out["pixel_values"].shape[1] == tiles_per_image((rows, cols))


def test_split_layout_without_splitting():
    assert split_layout((500, 900), 224, 56, do_image_splitting=False) == (0, 0)
    assert tiles_per_image((0, 0)) == 1


def test_image_token_count_per_image_size(dense):
    inner = dense.model
    assert [inner.image_token_count(size) for size in SIZES] == [68, 20, 36]
    assert inner.image_token_count(torch.tensor([30, 120])) == 20
    assert inner.image_token_count() == 4
    with pytest.raises(ValueError, match=r"image_size must be a \(height, width\) pair"):
        inner.image_token_count((0, 120))
    with pytest.raises(TypeError, match=r"image_size must be a \(height, width\) pair"):
        inner.image_token_count("30x120")


@pytest.mark.parametrize("name", ["sci", "dci", "mlp", "sti"])
def test_dense_connectors_forward_with_their_token_counts(stock, name):
    connector = toys.connectors("idefics3")[name]
    model = from_idefics3(stock, connector).eval()
    per_tile = connector.num_tokens((4, 4))
    assert per_tile == {"sci": 4, "dci": 4, "mlp": 16, "sti": 18}[name]
    assert model.config.image_seq_len == per_tile
    family_processor = processor(connector)
    batch = family_processor(images=images(), text=[PROMPT] * 3, return_tensors="pt", padding=True)
    counts = (batch["input_ids"] == toys.IMAGE).sum(dim=1).tolist()
    assert counts == [tiles * per_tile for tiles in toys.SAMPLE_TILES.values()]
    assert [model.model.image_token_count(size) for size in SIZES] == counts
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_preset_on_a_27_block_tower():
    """A DC preset for SigLIP-SO400M's depth converts a model with a 27-block tower."""
    config = toys.idefics3_config()
    config.vision_config.num_hidden_layers = 27
    config.vision_config.image_size = 28  # 2x2 patches: cheap
    torch.manual_seed(0)
    stock = Idefics3ForConditionalGeneration(config).eval()
    model = from_idefics3(stock, "dc-dci+pixel-shuffle-idefics3-364")
    assert model.connector.config.num_layers == 27
    assert model.connector.config.fusion.groups == (tuple(range(1, 14)), tuple(range(14, 27)))
    assert model.config.image_seq_len == 1
    pixels = torch.randn(1, 2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.model.get_image_features(pixels).pooler_output
    assert tokens[0].shape == (2, 32)


# ---------------------------------------------------------------------------- processor


def test_native_processor_writes_the_stock_prompt(stock_processor):
    ours = processor(toys.connectors("idefics3")["native"])
    nested = [[picture] for picture in images()]
    kwargs = {"text": [PROMPT] * 3, "return_tensors": "pt", "padding": True}
    expected = stock_processor(images=nested, **kwargs)
    actual = ours(images=nested, **kwargs)
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert ours.image_seq_len == stock_processor.image_seq_len == 4


def test_processor_save_and_reload_keeps_the_connector(tmp_path):
    from transformers import AutoProcessor

    import mmconnect.integrations  # noqa: F401  (registers the families)

    connector = toys.connectors("idefics3")["mlp"]
    ours = processor(connector)
    ours.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DenseIdefics3Processor
    assert ConnectorConfig.from_dict(loaded.connector) == connector
    assert (loaded.image_seq_len, loaded.patch_size) == (16, toys.PATCH)
    batch = loaded(images=images()[:1], text=[PROMPT], return_tensors="pt")
    assert int((batch["input_ids"] == toys.IMAGE).sum()) == 17 * 16


def test_processor_refuses_a_disagreeing_image_seq_len():
    connector = toys.connectors("idefics3")["native"]
    with pytest.raises(ValueError, match=r"image_seq_len=169 differs from the connector's 4"):
        DenseIdefics3Processor(
            toys.image_processor("idefics3"),
            toys.tokenizer(),
            image_seq_len=169,
            connector=connector,
            patch_size=toys.PATCH,
        )
    ours = processor(connector)
    with pytest.raises(ValueError, match=r"image_seq_len=9 differs from the connector's 4"):
        ours(images=images()[:1], text=[PROMPT], image_seq_len=9)


def test_processor_needs_connector_and_whole_patches():
    with pytest.raises(ValueError, match=r"DenseIdefics3Processor needs connector="):
        DenseIdefics3Processor(toys.image_processor("idefics3"), toys.tokenizer(), patch_size=14)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 200}, max_image_size={"longest_edge": 50}
    )
    with pytest.raises(ValueError, match=r"max_image_size=50 is not a multiple of patch_size=14"):
        DenseIdefics3Processor(
            image_processor,
            toys.tokenizer(),
            connector=toys.connectors("idefics3")["native"],
            patch_size=14,
        )


# ---------------------------------------------------------------------------- the tap


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(sub._forward_hooks) + len(sub._forward_pre_hooks) for sub in module.modules())


def test_no_hook_leaks_after_a_forward_and_after_one_that_raises(dense, split_batch):
    tower = dense.model.vision_model
    before = _hooks(tower)
    with torch.no_grad():
        dense(**split_batch)
    assert _hooks(tower) == before

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = tower.encoder.layers[1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            dense(**split_batch)
    finally:
        handle.remove()
    assert _hooks(tower) == before


def test_early_exit_stops_after_the_deepest_layer_read(stock):
    """SCI on layers 1, 2 and DCI groups 1-2, 3: a connector reading up to layer 2 runs blocks 0
    and 1 only; layer 4 (the native F) runs all four and the post-LayerNorm once."""
    from mmconnect import SCISpec
    from mmconnect.zoo.pixel_shuffle import PixelShuffleSpec

    shallow = ConnectorConfig(
        fusion=SCISpec(final_layer=2, extra_layers=(1,)),
        projector=PixelShuffleSpec(factor=2),
        vision_dim=16,
        llm_dim=32,
        num_layers=4,
    )
    for connector, blocks, norms in ((shallow, 2, 0), (toys.connectors("idefics3")["dci"], 4, 1)):
        model = from_idefics3(stock, connector).eval()
        tower = model.model.vision_model
        ran: list[str] = []
        handles = [
            block.register_forward_hook(
                lambda *_, index=index, ran=ran: ran.append(f"block{index}")
            )
            for index, block in enumerate(tower.encoder.layers)
        ]
        handles.append(
            tower.post_layernorm.register_forward_hook(lambda *_, ran=ran: ran.append("norm"))
        )
        try:
            with torch.no_grad():
                model.model.get_image_features(torch.randn(1, 1, 3, 56, 56))
        finally:
            for handle in handles:
                handle.remove()
        assert ran == [f"block{index}" for index in range(blocks)] + ["norm"] * norms


def test_streaming_group_sums_equal_the_member_layers(stock):
    """DCI through the streaming tap == the connector fusing the member layers it holds."""
    model = from_idefics3(stock, toys.connectors("idefics3")["dci"]).eval()
    tower = model.model.vision_model
    pixels = torch.randn(2, 3, 56, 56)
    connector = model.connector
    norm = tower.post_layernorm
    with torch.no_grad():
        streamed = connector(connector.make_tap(tower, final_norm=norm)(pixels), (4, 4))
        held = connector(
            connector.make_tap(tower, streaming=False, final_norm=norm)(pixels), (4, 4)
        )
    assert torch.equal(streamed, held)


# ---------------------------------------------------------------------------- training


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {
        name
        for name, tensor in module.state_dict().items()
        if not torch.equal(tensor, before[name])
    }


@pytest.mark.slow
def test_two_stages_train_the_connector_then_lora(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmconnect.integrations.training.stages import (
        LoraSettings,
        StageConfig,
        check_resume_checkpoint,
        parameter_groups,
        train_stage,
    )

    model = from_idefics3(toys.stock_idefics3(), toys.connectors("idefics3")["dci"])
    tower, llm = _snapshot(model.model.vision_model), _snapshot(model.model.text_model)
    connector = _snapshot(model.connector)
    common = {"per_device_train_batch_size": 2, "max_steps": 2, "disable_tqdm": True}
    align = StageConfig(stage="align", output_dir=str(tmp_path / "align"), save_steps=2, **common)
    train_stage(model, toys.TileDataset(4, 56), toys.collate_tiles, align)
    # The checkpoint keeps the connector under Idefics3's own child name (model.connector.):
    # resuming from it is checked against that prefix, not LLaVA's multi_modal_projector.
    check_resume_checkpoint(tmp_path / "align" / "checkpoint-2", model)
    other = from_idefics3(toys.stock_idefics3(), toys.connectors("idefics3")["sci"])
    with pytest.raises(ValueError, match=r"do not match the connector config"):
        check_resume_checkpoint(tmp_path / "align" / "checkpoint-2", other)
    assert _changed(tower, model.model.vision_model) == set()
    assert _changed(llm, model.model.text_model) == set()
    assert _changed(connector, model.connector) == {"projector.proj.weight"}

    stage1 = AutoModelForImageTextToText.from_pretrained(tmp_path / "align")
    assert type(stage1) is DenseIdefics3ForConditionalGeneration
    instruct = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path / "instruct"),
        lora=LoraSettings(rank=2, alpha=4, target_modules=("q_proj", "v_proj")),
        **common,
    )
    tower = _snapshot(stage1.model.vision_model)
    result = train_stage(stage1, toys.TileDataset(4, 56), toys.collate_tiles, instruct)
    groups = parameter_groups(result.model)
    assert groups["vision_tower"][0] == 0
    assert _changed(tower, result.model.model.vision_model) == set()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct")
    batch = toys.collate_tiles([toys.TileDataset(4, 56)[0]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch).logits, result.model(**batch).logits, atol=1e-5, rtol=1e-5
        )


def test_loss_reaches_only_the_trainable_connector(stock):
    model = from_idefics3(stock, toys.connectors("idefics3")["sci"])
    batch = toys.collate_tiles([toys.TileDataset(4, 56)[0]])
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    model(**batch).loss.backward()
    grad = model.connector.projector.proj.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)
    model.connector.zero_grad()


# ---------------------------------------------------------------------------- bad input


def test_preset_for_another_tower_depth_is_refused(stock):
    with pytest.raises(
        ValueError,
        match=r"connector num_layers=27 does not match the vision tower's num_hidden_layers \(4\)",
    ):
        from_idefics3(stock, "dc-dci+pixel-shuffle-idefics3-364")


def test_shuffle_that_does_not_divide_the_tile_grid_is_refused(stock):
    from mmconnect.zoo.pixel_shuffle import PixelShuffleSpec

    wrong = toys.connectors("idefics3")["native"].replace(projector=PixelShuffleSpec(factor=3))
    with pytest.raises(ValueError, match=r"divisible by 3, got grid 4x4"):
        from_idefics3(stock, wrong)


def test_other_models_are_refused(dense):
    with pytest.raises(TypeError, match=r"model must be an HF Idefics3ForConditionalGeneration"):
        from_idefics3(dense, toys.connectors("idefics3")["native"])
    with pytest.raises(TypeError, match=r"connector must be a ConnectorConfig or a preset name"):
        from_idefics3(toys.stock_idefics3(), 3)


def test_convert_to_dense_finds_the_family(stock):
    assert type(convert_to_dense(stock, toys.connectors("idefics3")["native"])) is (
        DenseIdefics3ForConditionalGeneration
    )


def test_non_square_tiles_are_refused():
    data = toys.idefics3_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    data["vision_config"]["image_size"] = [56, 84]
    with pytest.raises(ValueError, match=r"image_size=\[56, 84\] is not square"):
        DenseIdefics3Config(**data)
    data["vision_config"]["image_size"] = [56, 56]  # a square pair is one tile side
    config = DenseIdefics3Config(**data)
    assert (config.image_seq_len, config.resize_longest_edge) == (4, 224)


def test_deepstack_connector_is_refused():
    connector = toys.connectors("idefics3")["native"].replace(
        injection=DeepStackSpec(layers=(1, 2))
    )
    data = toys.idefics3_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    with pytest.raises(ValueError, match=r"Dense Idefics3 does not support a connector with"):
        DenseIdefics3Config(**data, connector=connector.to_dict())


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.randn(17, 3, 56, 56), r"pixel_values must be \[tiles, 3, 56, 56\] for each batch "
         r"row, i\.e\. \[batch, tiles, 3, 56, 56\].*got shape \(17, 3, 56, 56\) \(4 dimensions\)"
         r": add the tiles dimension"),
        (torch.randn(1, 17, 1, 56, 56), r"pixel_values have 1 channel\(s\) but the vision tower "
         r"takes 3"),
        (torch.randn(1, 17, 3, 84, 84), r"pixel_values must be \[tiles, 3, 56, 56\].*image_size="
         r"56.*got shape \(1, 17, 3, 84, 84\)"),
        (torch.zeros(1, 0, 3, 56, 56), r"pixel_values holds no tile"),
        ([[0.0]], r"pixel_values must be a torch.Tensor, got list"),
    ],
)  # fmt: skip
def test_bad_pixel_values_are_refused_before_the_tower_runs(dense, split_batch, pixels, message):
    inputs = {"input_ids": split_batch["input_ids"][:1], "pixel_values": pixels}
    error = TypeError if isinstance(pixels, list) else ValueError
    with pytest.raises(error, match=message):
        dense(**inputs)


def test_only_padding_tiles_are_refused(dense):
    with pytest.raises(ValueError, match=r"holds only padding tiles \(all zeros\)"):
        dense.model.get_image_features(torch.zeros(1, 2, 3, 56, 56))


def test_partially_padded_tile_is_refused(dense, split_batch):
    mask = split_batch["pixel_attention_mask"].clone()
    mask[2, 3, 50:, :] = 0
    with pytest.raises(ValueError, match=r"marks padding inside tile 3 of batch row 2"):
        dense(**(split_batch | {"pixel_attention_mask": mask}))
    with pytest.raises(ValueError, match=r"pixel_attention_mask must be \[batch, tiles, height"):
        dense.model.get_image_features(
            split_batch["pixel_values"], split_batch["pixel_attention_mask"][:, :, :10]
        )


def test_prompt_count_is_checked_against_the_real_tiles(dense, split_batch):
    ids = split_batch["input_ids"].clone()
    ids[0, (ids[0] == toys.IMAGE).nonzero()[0, 0]] = 10
    with pytest.raises(
        ValueError,
        match=r"holds 179 image tokens but the 45 tile\(s\) of pixel_values fill 180 \(4 per "
        r"tile with this connector\); build the prompt with DenseIdefics3Processor",
    ):
        dense(**(split_batch | {"input_ids": ids}))


def test_forward_keeps_the_stock_signature():
    assert inspect.signature(DenseIdefics3Model.forward) == inspect.signature(Idefics3Model.forward)


# ---------------------------------------------------------------------------- contract


class TestIdefics3Contract(FamilyContractTests):
    """The shared family contract on Dense Idefics3 (tile counts 17, 5 and 9 of 4 tokens)."""

    model_type = "dense_idefics3"
    config_class = DenseIdefics3Config
    model_class = DenseIdefics3Model
    generation_class = DenseIdefics3ForConditionalGeneration
    processor_class = DenseIdefics3Processor
    stock_model_class = Idefics3Model
    stock_generation_class = Idefics3ForConditionalGeneration
    vision_tower_names = ("vision_model",)
    connector_module_names = ("connector",)
    geometry = TowerGeometry(
        width=16, depth=4, image_size=(56, 56), patch_size=14, grid=(4, 4), prefix_tokens=0
    )
    pixel_side = 56
    image_sizes = SIZES
    token_counts = (68, 20, 36)
    fixed_image_tokens = False
    frames_are_images = False  # a frame is one unsplit tile, an image is tiled
    frame_tokens = 4
    derived_config_keys: ClassVar[frozenset[str]] = frozenset()
    extra_config_keys: ClassVar[frozenset[str]] = frozenset(
        {"connector", "image_seq_len", "resize_longest_edge", "do_image_splitting"}
    )
    prompt = PROMPT

    def stock_config(self):
        return toys.idefics3_config()

    def connector(self, kind: str) -> ConnectorConfig:
        # baseline: the native one-layer shuffle (Linear 64 wide); same_shapes: SCI (as DCI)
        return toys.connectors("idefics3")[
            {"dense": "dci", "baseline": "native", "same_shapes": "sci"}[kind]
        ]

    def processor(self, connector: ConnectorConfig):
        return processor(connector)


def test_tile_count_arithmetic_of_the_samples():
    """The sample tile counts in the toys, from the rule: longest edge 224 px, 56 px tiles."""
    for (height, width), tiles in toys.SAMPLE_TILES.items():
        scale = 224 / max(height, width)
        rows = math.ceil(round(height * scale) / 56)
        cols = math.ceil(round(width * scale) / 56)
        assert rows * cols + 1 == tiles
