"""HF InternVL with a Dense Connector (:mod:`mmconnect.integrations.families.internvl`).

Tiny models built from configs (tests/support/internvl_toys.py): an InternViT tower 16 wide of 4
blocks on 56 px tiles (a 4 x 4 grid + CLS), a 2-layer Qwen2 32 wide, 1 to 4 tiles per image.
The native connector expressed through the zoo (single layer -> pixel shuffle 2 -> LayerNorm ->
MLP) reproduces the stock ``InternVLForConditionalGeneration``'s logits bit for bit in fp32 and
bf16 (one tile, tiled images, images of different tile counts in one batch, video, a tower with
a final LayerNorm); the Dense connectors keep the processor's and the model's token counts in
agreement, train in two stages, and bad inputs are named.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLModel,
)

from mmconnect import ConnectorConfig, DCISpec, DeepStackSpec, SCISpec, SingleLayerSpec
from mmconnect.integrations.families.internvl import (
    DenseInternVLConfig,
    DenseInternVLForConditionalGeneration,
    DenseInternVLModel,
    DenseInternVLProcessor,
    from_internvl,
    native_connector,
    tile_count,
)
from mmconnect.integrations.families.protocol import TowerGeometry, family_model
from mmconnect.integrations.training.stages import (
    LoraSettings,
    StageConfig,
    parameter_groups,
    prepare_stage,
    train_stage,
)
from mmconnect.zoo.pixel_shuffle import PixelShuffleMLPSpec, internvl_state_from_hf
from tests.integrations.families.family_contract import FamilyContractTests
from tests.support import internvl_toys as toys
from tests.support.internvl_toys import (
    BLOCKS,
    CONNECTOR_TOKENS,
    CONNECTORS,
    IMG_CONTEXT,
    LLM,
    MAX_TILES,
    PATCH,
    PROMPT,
    TILE,
    TOKENS_PER_TILE,
    VISION,
)

VIDEO_PROMPT = "USER : <video> what is in the video ASSISTANT :"
#: (height, width) -> tiles with 1 to 4 tiles per image (thumbnail included when tiled),
#: written out by hand: 56x56 fits one tile; 60x150 is a 3 x 1 canvas, 150x60 a 1 x 3 canvas;
#: 100x100 a 2 x 2 canvas (ties go to more tiles while the image covers half the canvas);
#: 56x112 is 2 x 1; 1x300 and 40x400 are 4 x 1.
TILES = {
    (56, 56): 1,
    (60, 150): 4,
    (150, 60): 4,
    (100, 100): 5,
    (56, 112): 3,
    (1, 300): 5,
    (40, 400): 5,
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread; a second one only adds contention on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stock() -> InternVLForConditionalGeneration:
    return toys.stock_model()


@pytest.fixture(scope="module")
def native(stock) -> DenseInternVLForConditionalGeneration:
    return from_internvl(stock, native_connector(stock.config)).eval()


@pytest.fixture(scope="module")
def stock_processor():
    return toys.stock_processor()


def _images(*sizes: tuple[int, int]) -> list:
    return [toys.image(size, seed) for seed, size in enumerate(sizes)]


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------- tiling


def test_tile_count_is_what_the_processor_makes() -> None:
    processor = toys.image_processor()
    for size, tiles in TILES.items():
        assert tile_count(size, TILE, 1, MAX_TILES) == tiles, size
        made = processor(images=[toys.image(size, 0)], return_tensors="pt")
        assert made["num_patches"].tolist() == [tiles], size
        assert made["pixel_values"].shape == (tiles, 3, TILE, TILE)
        assert processor.get_number_of_image_patches(*size, {}) == tiles
    assert tile_count((1080, 1920), 448, 1, 12) == 9  # 4 x 2 + thumbnail (presets' table)
    assert tile_count((768, 1024), 448, 1, 12) == 13
    assert tile_count((300, 900), 56, 1, 1) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (((0, 56), 56, 1, 4), r"image_size"),
        (((56, 56), 56, 0, 4), r"min_tiles must be a positive int, got 0"),
        (((56, 56), 56, 5, 4), r"min_tiles=5 is larger than max_tiles=4"),
    ],
)
def test_tile_count_refuses_bad_arguments(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        tile_count(*arguments)


# ---------------------------------------------------------------------------- parity


def test_conversion_shares_the_stock_modules_and_copies_the_projector(stock, native) -> None:
    inner = native.model
    assert inner.vision_tower is stock.model.vision_tower
    assert inner.language_model is stock.model.language_model
    assert native.lm_head is stock.lm_head
    assert native.config.connector_config == native_connector(stock.config)
    ours = native.connector.projector.state_dict()
    theirs = internvl_state_from_hf(stock.model.multi_modal_projector.state_dict())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert native.config.image_seq_length == TOKENS_PER_TILE


@pytest.mark.parametrize(
    ("sizes", "texts", "videos"),
    [
        pytest.param([(56, 56)], [PROMPT], None, id="one-tile"),
        pytest.param([(100, 100)], [PROMPT], None, id="tiled"),
        pytest.param(
            [(56, 56), (60, 150), (100, 100)],
            [PROMPT, f"{PROMPT} and <IMG_CONTEXT>"],
            None,
            id="batch-of-different-tile-counts",
        ),
        pytest.param([], [VIDEO_PROMPT], [toys.video(3)], id="video"),
        pytest.param([(150, 60)], [f"{PROMPT} and <video>"], [toys.video(2)], id="image-and-video"),
    ],
)
def test_native_connector_logits_equal_stock(stock, native, stock_processor, sizes, texts, videos):
    """fp32, bit for bit: the tap's layer 4 is the stock last_hidden_state, the zoo's shuffle
    and MLP are the stock module's operations on the same weights."""
    inputs = dict(
        stock_processor(
            images=_images(*sizes) or None,
            videos=videos,
            text=texts,
            return_tensors="pt",
            padding=True,
        )
    )
    expected = _logits(stock, inputs)
    assert torch.equal(_logits(native, inputs), expected)
    with torch.no_grad():
        theirs = stock.model.get_image_features(pixel_values=inputs["pixel_values"])
        ours = native.model.get_image_features(pixel_values=inputs["pixel_values"])
    assert torch.equal(ours.pooler_output, theirs.pooler_output)
    assert ours.pooler_output.shape == (inputs["pixel_values"].shape[0], TOKENS_PER_TILE, LLM)


def test_native_generate_equals_stock_generate(stock, native, stock_processor) -> None:
    """Greedy decoding of a left-padded batch with tiled images: the same tokens and scores."""
    inputs = dict(
        stock_processor(
            images=_images((60, 150), (56, 56), (100, 100)),
            text=[PROMPT, f"{PROMPT} and <IMG_CONTEXT>"],
            return_tensors="pt",
            padding=True,
        )
    )
    options = {
        "max_new_tokens": 3,
        "min_new_tokens": 3,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    theirs = stock.generate(**inputs, **options)
    ours = native.generate(**inputs, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits, strict=True))


@pytest.mark.parametrize("feature_layer", [-1, -2, 2])
def test_native_parity_on_a_tower_with_a_final_layernorm(stock_processor, feature_layer) -> None:
    """Without mean pooling InternViT ends in a LayerNorm: HF's vision_feature_layer=-1 reads
    the normed last_hidden_state (the tap's final_norm), other layers the raw hidden_states."""
    model = toys.stock_model(feature_layer=feature_layer, mean_pooling=False)
    assert isinstance(model.model.vision_tower.layernorm, nn.LayerNorm)
    dense = from_internvl(model, native_connector(model.config)).eval()
    inputs = dict(stock_processor(images=_images((60, 150)), text=[PROMPT], return_tensors="pt"))
    assert torch.equal(_logits(dense, inputs), _logits(model, inputs))


def test_the_raw_last_block_of_a_normed_tower_is_refused() -> None:
    config = toys.stock_config(feature_layer=BLOCKS, mean_pooling=False)
    with pytest.raises(ValueError, match=r"vision_feature_layer=4 reads the last block's output"):
        native_connector(config)
    # without the final LayerNorm, layer 4 is the tower's output either way
    assert native_connector(toys.stock_config(feature_layer=BLOCKS)).fusion.final_layer == BLOCKS


def test_native_parity_bf16(stock_processor) -> None:
    """bf16 weights and activations: measured, the same bits as the stock model (max |diff| 0)."""
    model = toys.stock_model().to(torch.bfloat16)
    dense = from_internvl(model, native_connector(model.config)).eval()
    inputs = dict(
        stock_processor(
            images=_images((56, 56), (100, 100)),
            text=[PROMPT, PROMPT],
            return_tensors="pt",
            padding=True,
        )
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    expected, ours = _logits(model, inputs), _logits(dense, inputs)
    assert ours.dtype == torch.bfloat16
    assert float((ours.float() - expected.float()).abs().max()) == 0.0


def test_dense_processor_with_the_native_connector_is_the_stock_processor(
    native, stock_processor
) -> None:
    dense_processor = toys.dense_processor(native.connector.config)
    assert dense_processor.image_seq_length == TOKENS_PER_TILE
    for kwargs in (
        {"images": _images((56, 56), (100, 100)), "text": [PROMPT, PROMPT]},
        {"videos": [toys.video(3)], "text": [VIDEO_PROMPT]},
    ):
        ours = dense_processor(**kwargs, return_tensors="pt", padding=True)
        theirs = stock_processor(**kwargs, return_tensors="pt", padding=True)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_frames_are_preprocessed_as_the_video_processor_does(native) -> None:
    """The protocol's frame path (training-free video answering) gives the stock video
    processor's pixels: one tile per frame, the same resize and normalisation."""
    from PIL import Image

    video = toys.video(3)
    frames = [Image.fromarray(frame) for frame in video]
    ours = native.model.frame_pixel_values(toys.image_processor(), frames)
    theirs = toys.video_processor()(videos=[video], return_tensors="pt")["pixel_values_videos"][0]
    assert ours.shape == (3, 3, TILE, TILE)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------- Dense connectors


@pytest.fixture(scope="module")
def dense(stock) -> dict[str, DenseInternVLForConditionalGeneration]:
    """One converted model per Dense connector; all share the stock tower and LLM."""
    torch.manual_seed(1)
    return {name: from_internvl(stock, config).eval() for name, config in CONNECTORS.items()}


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_dense_connectors_fill_what_their_processor_inserts(dense, name) -> None:
    model = dense[name]
    per_tile = CONNECTOR_TOKENS[name]
    assert model.model.tokens_per_tile() == per_tile
    assert model.config.image_seq_length == per_tile
    sizes = [(56, 56), (60, 150), (100, 100)]
    model.config.max_tiles = MAX_TILES
    assert [model.model.image_token_count(size) for size in sizes] == [
        TILES[size] * per_tile for size in sizes
    ]
    processor = toys.dense_processor(model.connector.config)
    inputs = dict(
        processor(
            images=_images(*sizes),
            text=[PROMPT, f"{PROMPT} and <IMG_CONTEXT>"],
            return_tensors="pt",
            padding=True,
        )
    )
    counts = (inputs["input_ids"] == IMG_CONTEXT).sum(1).tolist()
    assert counts == [TILES[(56, 56)] * per_tile, (TILES[(60, 150)] + TILES[(100, 100)]) * per_tile]
    logits = _logits(model, inputs)
    assert logits.shape == (*inputs["input_ids"].shape, toys.VOCAB)
    assert torch.isfinite(logits).all()


def test_a_dense_connector_does_not_take_the_stock_projector(stock, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mmconnect.integrations.families.internvl"):
        model = from_internvl(stock, CONNECTORS["dci+shuffle"])
    assert "not reusing InternVL's projector weights" in caplog.text
    assert model.connector.projector.norm.weight.shape == (4 * 3 * VISION,)


def test_presets_resized_to_the_tower(stock) -> None:
    """A preset of InternViT-300M's depth fits a 24-block tower, resized to its widths."""
    model = toys.stock_model(blocks=24)
    dense = from_internvl(model, "dc-sci+pixel-shuffle-mlp-internvit-300m")
    assert dense.connector.config.fusion.extra_layers == (8, 16)
    assert (dense.connector.config.vision_dim, dense.connector.config.llm_dim) == (VISION, LLM)
    assert dense.model.tokens_per_tile() == TOKENS_PER_TILE


def test_internvit_6b_presets_convert_a_tower_of_its_depth(stock_processor) -> None:
    """InternViT-6B's layout at tiny widths (45 blocks, RMSNorm, QK-norm, no attention bias): the
    native 6B preset, resized to the widths, reuses the stock projector and gives the stock
    logits; the Dense 6B presets read layers 15 / 30 and 0-22 / 23-44 and fill the same tiles."""
    vision = toys.vision_config(blocks=45).to_dict() | {
        "norm_type": "rms_norm",
        "use_qk_norm": True,
        "attention_bias": False,
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=toys.text_config().to_dict(),
        image_token_id=toys.IMG_CONTEXT,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    stock = InternVLForConditionalGeneration(config).eval()
    inputs = dict(stock_processor(images=_images((60, 150)), text=[PROMPT], return_tensors="pt"))
    native = from_internvl(stock, "internvl-pixel-shuffle-internvit-6b").eval()
    assert torch.equal(_logits(native, inputs), _logits(stock, inputs))
    for name, fusion in (
        ("dc-sci+pixel-shuffle-mlp-internvit-6b", SCISpec(final_layer=45, extra_layers=(15, 30))),
        (
            "dc-dci+pixel-shuffle-mlp-internvit-6b",
            DCISpec(final_layer=45, groups=(tuple(range(0, 23)), tuple(range(23, 45)))),
        ),
    ):
        dense = from_internvl(stock, name).eval()
        assert dense.connector.config.fusion == fusion
        logits = _logits(dense, inputs)
        assert logits.shape == _logits(stock, inputs).shape and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------- the tap


def _hook_table(module: nn.Module) -> dict[str, tuple]:
    return {
        name: (tuple(sub._forward_hooks), tuple(sub._forward_pre_hooks))
        for name, sub in module.named_modules()
    }


def test_no_hook_is_left_after_a_forward_or_an_error(dense, monkeypatch) -> None:
    model = dense["dci+shuffle"]
    tower = model.model.vision_tower
    before = _hook_table(tower)
    pixels = torch.randn(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.get_image_features(pixels)
    assert _hook_table(tower) == before

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(tower.encoder.layer[1], "forward", boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model.model.get_image_features(pixels)
    assert _hook_table(tower) == before


def test_early_exit_and_full_run_for_hidden_states(stock, monkeypatch) -> None:
    """A connector reading layers up to 2 never runs blocks 3 and 4; asking for hidden_states
    runs the tower in full and returns HF's."""
    connector = ConnectorConfig(
        fusion=DCISpec(final_layer=2, groups=((0,), (1,))),
        projector=PixelShuffleMLPSpec(factor=2),
        vision_dim=VISION,
        llm_dim=LLM,
        num_layers=BLOCKS,
    )
    model = from_internvl(stock, connector).eval()
    pixels = torch.randn(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.model.get_image_features(pixels, output_hidden_states=True)
        reference = stock.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(full.hidden_states) == BLOCKS + 1
    assert all(torch.equal(a, b) for a, b in zip(full.hidden_states, reference, strict=True))
    assert torch.equal(full.last_hidden_state, reference[2][:, 1:])

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("block 3 ran")

    monkeypatch.setattr(stock.model.vision_tower.encoder.layer[2], "forward", boom)
    with torch.no_grad():
        early = model.model.get_image_features(pixels)
    assert early.hidden_states is None
    assert torch.equal(early.pooler_output, full.pooler_output)


def test_streaming_group_sums_equal_the_stacked_means(dense) -> None:
    model = dense["dci+shuffle"]
    connector, tower = model.connector, model.model.vision_tower
    pixels = torch.randn(3, 3, TILE, TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        streamed = connector.make_tap(tower)(pixels)
        held = connector.make_tap(tower, streaming=False)(pixels)
    for group in ((0, 1), (2, 3)):
        mean = torch.stack([held[layer] for layer in group]).sum(0) / len(group)
        assert torch.equal(streamed.group_means[group], mean)


# ---------------------------------------------------------------------------- training


def _training_batch(model: nn.Module) -> dict[str, torch.Tensor]:
    tiles = 3
    count = tiles * family_model(model).tokens_per_tile()
    ids = torch.tensor([[toys.BOS, 11, toys.IMG_START, *[IMG_CONTEXT] * count, toys.IMG_END, 12]])
    pixels = torch.randn(tiles, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels, "labels": ids}


def test_stage_one_trains_exactly_the_connector(stock, tmp_path) -> None:
    model = from_internvl(toys.stock_model(), CONNECTORS["dci+shuffle"]).train()
    model = prepare_stage(model, StageConfig(stage="align", output_dir=str(tmp_path)))
    connector = family_model(model).connector
    groups = parameter_groups(model)
    assert groups["connector"][0] == groups["connector"][1] > 0
    assert groups["vision_tower"][0] == 0 and groups["llm"][0] == 0
    model(**_training_batch(model)).loss.backward()
    for name, parameter in model.named_parameters():
        owned = any(parameter is p for p in connector.parameters())
        assert parameter.requires_grad == owned, name
        if owned:
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


def test_stage_two_lora_trains_adapters_and_connector(tmp_path) -> None:
    pytest.importorskip("peft")
    model = from_internvl(toys.stock_model(), CONNECTORS["dci"]).train()
    stage = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path),
        lora=LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj")),
    )
    model = prepare_stage(model, stage)
    groups = parameter_groups(model)
    assert groups["lora"][0] > 0 and groups["llm"][0] == 0 and groups["vision_tower"][0] == 0
    assert groups["connector"][0] > 0
    lora_in_tower = [
        name
        for name in dict(model.named_parameters())
        if "vision_tower" in name and "lora_" in name
    ]
    assert lora_in_tower == []  # the adapters go into the LLM only
    model(**_training_batch(model)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_stage_two_full_trains_llm_and_connector(tmp_path) -> None:
    model = from_internvl(toys.stock_model(), CONNECTORS["sci+shuffle"]).train()
    model = prepare_stage(model, StageConfig(stage="instruct", output_dir=str(tmp_path)))
    groups = parameter_groups(model)
    assert groups["llm"][0] == groups["llm"][1] > 0
    assert groups["connector"][0] == groups["connector"][1]
    assert groups["vision_tower"][0] == 0


class _TiledToyData(torch.utils.data.Dataset):
    """Four samples: 2 text tokens, an image of ``index % 2 + 1`` tiles between ``<img>`` and
    ``</img>``, 4 random answer tokens (the only labels)."""

    def __init__(self, per_tile: int) -> None:
        generator = torch.Generator().manual_seed(3)
        self.per_tile = per_tile
        self.pixels = [torch.randn(i % 2 + 1, 3, TILE, TILE, generator=generator) for i in range(4)]
        self.answers = torch.randint(11, 17, (4, 4), generator=generator)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tiles = self.pixels[index]
        image = [toys.IMG_START, *[IMG_CONTEXT] * (tiles.shape[0] * self.per_tile), toys.IMG_END]
        prompt = torch.tensor([toys.BOS, 11, *image])
        ids = torch.cat([prompt, self.answers[index]])
        labels = torch.cat([torch.full_like(prompt, -100), self.answers[index]])
        return {"input_ids": ids, "labels": labels, "pixel_values": tiles}


def _collate_tiles(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pads the prompts; every sample's tiles follow each other in ``pixel_values``."""
    length = max(len(sample["input_ids"]) for sample in samples)
    ids = torch.full((len(samples), length), toys.PAD)
    labels = torch.full((len(samples), length), -100)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        size = len(sample["input_ids"])
        ids[row, :size] = sample["input_ids"]
        labels[row, :size] = sample["labels"]
        mask[row, :size] = 1
    pixels = torch.cat([sample["pixel_values"] for sample in samples])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


@pytest.mark.slow
def test_two_stages_train_save_and_reload(tmp_path) -> None:
    """Stage 1 (align) changes the connector alone; stage 2 (LoRA) starts from stage 1's saved
    model, which the Auto classes reload with the same logits."""
    from transformers import AutoModelForImageTextToText

    model = from_internvl(toys.stock_model(), CONNECTORS["dci+shuffle"]).train()
    data = _TiledToyData(model.model.tokens_per_tile())
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    llm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    connector = {k: v.clone() for k, v in model.connector.state_dict().items()}
    common = {"per_device_train_batch_size": 2, "max_steps": 2, "disable_tqdm": True}
    align = StageConfig(stage="align", output_dir=str(tmp_path / "align"), **common)
    result = train_stage(model, data, _collate_tiles, align)
    assert len(result.losses) == 2
    state = model.model.vision_tower.state_dict()
    assert all(torch.equal(state[k], tower[k]) for k in tower)
    state = model.model.language_model.state_dict()
    assert all(torch.equal(state[k], llm[k]) for k in llm)
    state = model.connector.state_dict()
    assert not torch.equal(state["projector.fc1.weight"], connector["projector.fc1.weight"])

    stage_one = AutoModelForImageTextToText.from_pretrained(tmp_path / "align")
    assert type(stage_one) is DenseInternVLForConditionalGeneration
    batch = _collate_tiles([data[0], data[1]])
    model.eval()
    assert torch.equal(_logits(stage_one.eval(), batch), _logits(model, batch))

    instruct = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path / "instruct"),
        lora=LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj")),
        **common,
    )
    result = train_stage(stage_one.train(), data, _collate_tiles, instruct)
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct").eval()
    torch.testing.assert_close(
        _logits(final, batch), _logits(result.model.eval(), batch), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------- bad inputs


def test_a_preset_for_another_tower_depth(stock) -> None:
    message = r"connector num_layers=24 does not match the vision tower's num_hidden_layers \(4\)"
    with pytest.raises(ValueError, match=message):
        from_internvl(stock, "dc-dci+pixel-shuffle-mlp-internvit-300m")


def test_a_stock_model_keeping_the_cls_token_is_refused() -> None:
    model = toys.stock_model()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match=r"'full' keeps the CLS token"):
        from_internvl(model, CONNECTORS["dci"])


def test_from_internvl_refuses_other_models(native) -> None:
    with pytest.raises(TypeError, match=r"model must be an HF InternVLForConditionalGeneration"):
        from_internvl(native, CONNECTORS["dci"])
    with pytest.raises(TypeError, match=r"model must be an HF InternVLForConditionalGeneration"):
        from_internvl(nn.Linear(2, 2), CONNECTORS["dci"])


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.zeros(1, 3, 70, 70), r"pixel_values must be \[tiles, 3, 56, 56\].*\(1, 3, 70, 70\)"),
        (torch.zeros(1, 3, 56, 70), r"pixel_values must be \[tiles, 3, 56, 56\]"),
        (torch.zeros(3, 56, 56), r"one unbatched image"),
        (torch.zeros(0, 3, 56, 56), r"pixel_values holds 0 tiles"),
        (torch.zeros(1, 1, 56, 56), r"1 channel\(s\) but .* takes 3"),
    ],
)
def test_tiles_of_another_size_are_refused_before_the_tower_runs(native, pixels, message):
    ids = torch.tensor([[toys.BOS, *[IMG_CONTEXT] * TOKENS_PER_TILE, 12]])
    with pytest.raises(ValueError, match=message):
        native(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match=message):
        native.model.get_image_features(pixels)


def test_wrong_token_count_names_tiles_and_counts(native) -> None:
    ids = torch.tensor([[toys.BOS, *[IMG_CONTEXT] * 7, 12]])
    pixels = torch.zeros(2, 3, TILE, TILE)
    message = r"holds 7 image tokens but the 2 tile\(s\) in pixel_values fill 8 \(4 per tile"
    with pytest.raises(ValueError, match=message):
        native(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match=message):
        native.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=1)


def test_another_vision_feature_layer_is_refused(native) -> None:
    with pytest.raises(ValueError, match=r"vision_feature_layer=-2 cannot change them"):
        native.model.get_image_features(torch.zeros(1, 3, TILE, TILE), vision_feature_layer=-2)


def test_image_token_count_needs_the_image_size(native) -> None:
    with pytest.raises(ValueError, match=r"image_size is required"):
        native.model.image_token_count()


def _dense_config(**fields) -> DenseInternVLConfig:
    data = toys.stock_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    return DenseInternVLConfig(**{**data, **fields})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_tiles": 3, "max_tiles": 2}, r"min_tiles=3 is larger than max_tiles=2"),
        ({"max_tiles": 0}, r"max_tiles must be a positive int, got 0"),
        (
            {"vision_feature_layer": [-1, -2]},
            r"vision_feature_layer=\[-1, -2\]: HF's InternVL reads one layer",
        ),
        ({"downsample_ratio": 0.3}, r"downsample_ratio=0.3 is not 1 / a whole number"),
        (
            {
                "connector": ConnectorConfig(
                    fusion=SingleLayerSpec(final_layer=-1),
                    projector=PixelShuffleMLPSpec(factor=2),
                    injection=DeepStackSpec(layers=(1, 2), projector=PixelShuffleMLPSpec(factor=2)),
                    vision_dim=VISION,
                    llm_dim=LLM,
                    num_layers=BLOCKS,
                ).to_dict()
            },
            r"Dense InternVL does not support a connector with injection=",
        ),
    ],
)
def test_bad_configs(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        _dense_config(**fields)


def test_a_non_square_tower_is_refused() -> None:
    data = toys.stock_config().to_dict()
    data.pop("model_type")
    data["vision_config"]["image_size"] = [56, 84]
    with pytest.raises(ValueError, match=r"image_size=\[56, 84\] is not square"):
        DenseInternVLConfig(**data)


def test_processor_refuses_mismatched_parts() -> None:
    connector = CONNECTORS["dci"]
    tokenizer = toys.tokenizer()
    with pytest.raises(ValueError, match=r"needs connector= .* and patch_size="):
        DenseInternVLProcessor(image_processor=toys.image_processor(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"video_processor resizes frames to .*tiles are 56x56"):
        DenseInternVLProcessor(
            image_processor=toys.image_processor(),
            tokenizer=tokenizer,
            video_processor=toys.video_processor(side=42),
            patch_size=PATCH,
            connector=connector,
        )
    with pytest.raises(ValueError, match=r"tile side 60 is not a multiple of patch_size=14"):
        DenseInternVLProcessor(
            image_processor=GotOcr2ImageProcessor(size={"height": 60, "width": 60}),
            tokenizer=tokenizer,
            patch_size=PATCH,
            connector=connector,
        )
    with pytest.raises(ValueError, match=r"image_processor.size must be a square"):
        DenseInternVLProcessor(
            image_processor=GotOcr2ImageProcessor(size={"height": 56, "width": 112}),
            tokenizer=tokenizer,
            patch_size=PATCH,
            connector=connector,
        )


def test_processor_save_and_load_keep_the_connector(tmp_path) -> None:
    processor = toys.dense_processor(CONNECTORS["dci"])
    processor.save_pretrained(tmp_path)
    loaded = DenseInternVLProcessor.from_pretrained(tmp_path)
    assert ConnectorConfig.from_dict(loaded.connector) == CONNECTORS["dci"]
    assert loaded.image_seq_length == CONNECTOR_TOKENS["dci"] == 16
    batch = loaded(images=_images((100, 100)), text=[PROMPT], return_tensors="pt")
    assert int((batch["input_ids"] == IMG_CONTEXT).sum()) == 5 * 16


def test_processor_tells_serving_engines_the_connector_count() -> None:
    """``_get_num_multimodal_tokens``: ``<img>`` + tiles x the connector's count + ``</img>``."""
    processor = toys.dense_processor(CONNECTORS["dci"])
    counts = processor._get_num_multimodal_tokens(image_sizes=[[56, 56], [100, 100]])
    assert counts.num_image_patches == [1, 5]
    assert counts.num_image_tokens == [2 + 16, 2 + 5 * 16]


# ---------------------------------------------------------------------------- contract


class TestInternVLContract(FamilyContractTests):
    model_type = "dense_internvl"
    config_class = DenseInternVLConfig
    model_class = DenseInternVLModel
    generation_class = DenseInternVLForConditionalGeneration
    processor_class = DenseInternVLProcessor
    stock_model_class = InternVLModel
    stock_generation_class = InternVLForConditionalGeneration
    vision_tower_names = ("vision_tower",)
    connector_module_names = ("multi_modal_projector",)
    geometry = TowerGeometry(
        width=VISION,
        depth=BLOCKS,
        image_size=(TILE, TILE),
        patch_size=PATCH,
        grid=(4, 4),
        prefix_tokens=1,
    )
    pixel_side = TILE
    image_sizes = ((56, 56), (60, 150), (150, 60), (100, 100))
    # tiles (1, 4, 4, 5) x 4 tokens per tile (DCI into the shuffle by 2 on the 4 x 4 grid)
    token_counts = (4, 16, 16, 20)
    fixed_image_tokens = False
    frames_are_images = False  # a frame is one tile; an image is tiled
    frame_tokens = 4
    extra_config_keys = frozenset({"connector", "min_tiles", "max_tiles"})
    prompt = PROMPT

    def stock_config(self) -> InternVLConfig:
        return toys.stock_config()

    def dense_fields(self) -> dict[str, Any]:
        return {"max_tiles": MAX_TILES}

    def connector(self, kind: str) -> ConnectorConfig:
        if kind == "dense":
            return CONNECTORS["dci+shuffle"]
        if kind == "baseline":  # InternVL's own: 16 channels into the shuffle, not 48
            return native_connector(toys.stock_config())
        if kind == "same_shapes":
            return CONNECTORS["sci+shuffle"]
        raise ValueError(f"unknown connector kind {kind!r}")

    def processor(self, connector: ConnectorConfig) -> DenseInternVLProcessor:
        return toys.dense_processor(connector)

    # InternVL keeps image_size as a (height, width) pair in its vision config.
    def test_tower_geometry_is_the_vision_config(self, model) -> None:
        inner = model.model
        geometry = inner.tower_geometry()
        assert geometry == self.geometry
        vision = model.config.vision_config
        assert (geometry.width, geometry.depth) == (vision.hidden_size, vision.num_hidden_layers)
        assert geometry.image_size == tuple(vision.image_size)
        assert geometry.grid == (
            vision.image_size[0] // vision.patch_size[0],
            vision.image_size[1] // vision.patch_size[1],
        )
        connector = inner.connector.config
        assert (connector.vision_dim, connector.num_layers) == (geometry.width, geometry.depth)

    # An image's tokens are its tiles' in order: the protocol's one-image path concatenates
    # get_image_features' per-tile rows.
    def test_image_features_are_what_forward_embeds(self, model, family_processor, single):
        inner = model.model
        image = self.images()[1]  # 4 tiles
        pixels = family_processor.image_processor(
            images=[image], crop_to_patches=True, return_tensors="pt"
        )["pixel_values"]
        with torch.no_grad():
            features = inner.image_features(family_processor.image_processor, image)
            expected = inner.get_image_features(pixels).pooler_output
        assert pixels.shape[0] == 4
        assert features.shape == (1, self.token_counts[1], model.config.text_config.hidden_size)
        assert torch.equal(features[0], expected.reshape(-1, expected.shape[-1]))
