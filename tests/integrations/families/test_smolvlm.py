"""Dense SmolVLM (mmconnect.integrations.families.smolvlm): parity with the stock HF model on
images (split, of different sizes, in one batch) and video, the processor's image and video
counts, what differs from Idefics3, bad inputs and the family contract.

The tiny parts (tests/support/idefics3_toys.py): the Idefics3 toys' tower at 84 px tiles (6x6
patches), a pixel shuffle by 3 (4 tokens per tile), the same LLM and tokenizer. SmolVLM's
processor needs the ``num2words`` package (its video prompts spell the frame count).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from transformers import SmolVLMForConditionalGeneration, SmolVLMModel
from transformers.video_utils import VideoMetadata

from mmconnect import ConnectorConfig
from mmconnect.integrations.families.idefics3 import DenseIdefics3ForConditionalGeneration
from mmconnect.integrations.families.protocol import TowerGeometry, convert_to_dense
from mmconnect.integrations.families.smolvlm import (
    DenseSmolVLMConfig,
    DenseSmolVLMForConditionalGeneration,
    DenseSmolVLMModel,
    DenseSmolVLMProcessor,
    from_smolvlm,
)
from tests.integrations.families.family_contract import FamilyContractTests
from tests.support import idefics3_toys as toys

pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words")

PROMPT = "USER : <image> what is in the image ASSISTANT :"
VIDEO_PROMPT = "USER : <video> what is in the video ASSISTANT :"
SIZES = tuple(toys.SAMPLE_TILES)


@pytest.fixture(scope="module")
def stock() -> SmolVLMForConditionalGeneration:
    return toys.stock_smolvlm()


@pytest.fixture(scope="module")
def dense(stock) -> DenseSmolVLMForConditionalGeneration:
    return from_smolvlm(stock, toys.connectors("smolvlm")["native"]).eval()


@pytest.fixture(scope="module")
def stock_processor():
    return toys.stock_smolvlm_processor()


def processor(connector: ConnectorConfig) -> DenseSmolVLMProcessor:
    return DenseSmolVLMProcessor(**toys.smolvlm_parts(), connector=connector, patch_size=toys.PATCH)


def images(sizes=SIZES) -> list:
    return [toys.sample_image(size, seed) for seed, size in enumerate(sizes)]


def video_inputs(family_processor: Any, frames: int = 3) -> dict[str, torch.Tensor]:
    """One prompt with a ``frames``-frame video of 50x70 px (1 frame per second)."""
    metadata = VideoMetadata(
        total_num_frames=frames, fps=1.0, duration=float(frames), frames_indices=list(range(frames))
    )
    return dict(
        family_processor(
            videos=[toys.sample_video(frames, (50, 70), 0)],
            text=[VIDEO_PROMPT],
            video_metadata=[metadata],
            do_sample_frames=False,
            return_tensors="pt",
        )
    )


# ---------------------------------------------------------------------------- parity


def test_conversion_shares_the_stock_parts(stock, dense):
    assert dense.model.vision_model is stock.model.vision_model
    assert dense.model.text_model is stock.model.text_model
    assert dense.lm_head is stock.lm_head
    assert torch.equal(
        dense.connector.projector.proj.weight, stock.model.connector.modality_projection.proj.weight
    )
    assert dense.config.image_seq_len == 4 == stock.model.image_seq_len


def test_split_images_of_different_sizes_in_one_batch_are_bit_exact(stock, dense, stock_processor):
    pictures = images()
    nested = [[picture] for picture in pictures] + [[pictures[1], pictures[2]]]
    texts = [PROMPT] * 3 + ["USER : <image> and <image> ASSISTANT :"]
    batch = dict(stock_processor(images=nested, text=texts, return_tensors="pt", padding=True))
    assert (batch["input_ids"] == toys.IMAGE).sum(dim=1).tolist() == [68, 20, 36, 56]
    assert tuple(batch["pixel_values"].shape) == (4, 17, 3, 84, 84)
    with torch.no_grad():
        assert torch.equal(dense(**batch).logits, stock(**batch).logits)


def test_single_image_is_bit_exact(stock, dense, stock_processor):
    batch = dict(stock_processor(images=[images()[:1]], text=[PROMPT], return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(dense(**batch).logits, stock(**batch).logits)


def test_video_is_bit_exact(stock, dense, stock_processor):
    batch = video_inputs(stock_processor)
    # three frames, one unsplit tile each
    assert tuple(batch["pixel_values"].shape) == (1, 3, 3, 84, 84)
    assert int((batch["input_ids"] == toys.IMAGE).sum()) == 12
    with torch.no_grad():
        assert torch.equal(dense(**batch).logits, stock(**batch).logits)


def test_bf16_video_and_images_match_the_stock_bf16_model(stock_processor):
    stock = toys.stock_smolvlm().to(torch.bfloat16)
    dense = from_smolvlm(stock, toys.connectors("smolvlm")["native"]).eval()
    for batch in (
        video_inputs(stock_processor),
        dict(stock_processor(images=[images()[1:2]], text=[PROMPT], return_tensors="pt")),
    ):
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            # measured: bit-exact (the same bf16 ops in the same order)
            assert torch.equal(dense(**batch).logits, stock(**batch).logits)


def test_all_padding_tiles_keep_the_first_as_the_stock_model_does(stock, dense):
    """SmolVLM's stock model keeps tile 0 when every tile is padding (Idefics3 refuses)."""
    pixels = torch.zeros(1, 2, 3, 84, 84)
    with torch.no_grad():
        ours = dense.model.get_image_features(pixels).pooler_output
        theirs = stock.model.get_image_features(pixels).pooler_output
    assert [tuple(row.shape) for row in ours] == [(4, 32)]
    assert torch.equal(ours[0], theirs[0])


# ---------------------------------------------------------------------------- processor


def test_native_processor_writes_the_stock_image_and_video_prompts(stock_processor):
    ours = processor(toys.connectors("smolvlm")["native"])
    nested = [[picture] for picture in images()]
    kwargs = {"text": [PROMPT] * 3, "return_tensors": "pt", "padding": True}
    for expected, actual in (
        (stock_processor(images=nested, **kwargs), ours(images=nested, **kwargs)),
        (video_inputs(stock_processor), video_inputs(ours)),
    ):
        assert sorted(actual) == sorted(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key


def test_dense_connector_counts_for_images_and_video(stock):
    connector = toys.connectors("smolvlm")["mlp"]  # DCI, one token per patch: 36 per tile
    model = from_smolvlm(stock, connector).eval()
    ours = processor(connector)
    assert ours.image_seq_len == model.config.image_seq_len == 36
    video = video_inputs(ours)
    assert int((video["input_ids"] == toys.IMAGE).sum()) == 3 * 36
    batch = ours(images=images(), text=[PROMPT] * 3, return_tensors="pt", padding=True)
    counts = (batch["input_ids"] == toys.IMAGE).sum(dim=1).tolist()
    assert counts == [tiles * 36 for tiles in toys.SAMPLE_TILES.values()]
    assert [model.model.image_token_count(size) for size in SIZES] == counts
    with torch.no_grad():
        assert torch.isfinite(model(**video).logits).all()
        assert torch.isfinite(model(**batch).logits).all()


def test_flat_images_are_shared_out_among_the_prompts():
    """One image per ``<image>``, prompt by prompt: a flat list gives the nested list's inputs
    (the stock SmolVLM processor refuses a flat list with several prompts)."""
    ours = processor(toys.connectors("smolvlm")["native"])
    pictures = images()
    texts = [PROMPT, "USER : <image> and <image> ASSISTANT :"]
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
    flat = ours(images=pictures, **kwargs)
    nested = ours(images=[pictures[:1], pictures[1:]], **kwargs)
    assert sorted(flat) == sorted(nested)
    for key in nested:
        assert torch.equal(flat[key], nested[key]), key


def test_processor_save_and_reload_keeps_the_connector(tmp_path):
    from transformers import AutoProcessor

    import mmconnect.integrations  # noqa: F401  (registers the families)

    connector = toys.connectors("smolvlm")["dci"]
    processor(connector).save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DenseSmolVLMProcessor
    assert ConnectorConfig.from_dict(loaded.connector) == connector
    assert loaded.image_seq_len == 4


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
def test_stage_one_trains_exactly_the_connector(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmconnect.integrations.training.stages import StageConfig, train_stage

    model = from_smolvlm(toys.stock_smolvlm(), toys.connectors("smolvlm")["dci"])
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    align = StageConfig(
        stage="align",
        output_dir=str(tmp_path / "align"),
        per_device_train_batch_size=2,
        max_steps=2,
        disable_tqdm=True,
    )
    train_stage(model, toys.TileDataset(4, 84), toys.collate_tiles, align)
    changed = {
        name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])
    }
    assert changed == {"model.connector.projector.proj.weight"}
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "align")
    assert type(loaded) is DenseSmolVLMForConditionalGeneration
    batch = toys.collate_tiles([toys.TileDataset(4, 84)[0]])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)


# ---------------------------------------------------------------------------- bad input


def test_idefics3_shuffle_on_the_smolvlm_grid_is_refused(stock):
    from mmconnect.zoo.pixel_shuffle import PixelShuffleSpec

    wrong = toys.connectors("smolvlm")["native"].replace(projector=PixelShuffleSpec(factor=4))
    with pytest.raises(ValueError, match=r"divisible by 4, got grid 6x6"):
        from_smolvlm(stock, wrong)


def test_preset_for_another_tower_depth_is_refused(stock):
    with pytest.raises(ValueError, match=r"connector num_layers=27 does not match"):
        from_smolvlm(stock, "dc-sci+pixel-shuffle-smolvlm")


@pytest.mark.parametrize("size", ["256m", "500m"])
def test_small_smolvlm_presets_convert_a_model_of_their_depth_and_factor(size):
    """SmolVLM-256M / 500M's layout at tiny widths (a 12-block tower, 16 px patches, 128 px
    tiles: an 8x8 grid, shuffled by 4 into 4 tokens): the native preset reuses the stock
    connector and gives the stock logits; the Dense presets (resized to the widths) run on the
    same prompt."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    config = SmolVLMConfig(
        vision_config=toys.vision_config("smolvlm", blocks=12, image_size=128) | {"patch_size": 16},
        text_config=toys.text_config(),
        image_token_id=toys.IMAGE,
        scale_factor=4,
    )
    torch.manual_seed(0)
    stock = SmolVLMForConditionalGeneration(config).eval()
    pixels = torch.randn(1, 1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[toys.BOS, *[toys.IMAGE] * 4, toys.BOS + 1]])
    native = from_smolvlm(stock, f"smolvlm-{size}-pixel-shuffle-siglip-b16-512").eval()
    with torch.no_grad():
        expected = stock(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(native(input_ids=ids, pixel_values=pixels).logits, expected)
        for kind in ("sci", "dci"):
            dense = from_smolvlm(stock, f"dc-{kind}+pixel-shuffle-smolvlm-{size}").eval()
            assert dense.connector.config.fusion.final_layer == 12
            logits = dense(input_ids=ids, pixel_values=pixels).logits
            assert logits.shape == expected.shape and torch.isfinite(logits).all()


def test_convert_to_dense_picks_the_smolvlm_family(stock):
    converted = convert_to_dense(stock, toys.connectors("smolvlm")["native"])
    assert type(converted) is DenseSmolVLMForConditionalGeneration
    assert not isinstance(converted, DenseIdefics3ForConditionalGeneration)
    with pytest.raises(TypeError, match=r"model must be an HF SmolVLMForConditionalGeneration"):
        from_smolvlm(toys.stock_idefics3(), toys.connectors("smolvlm")["native"])


def test_frames_of_another_tile_size_are_refused(dense, stock_processor):
    batch = video_inputs(stock_processor)
    pixels = torch.nn.functional.interpolate(batch["pixel_values"][0], size=(56, 56))[None]
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, 84, 84\]"):
        dense(**(batch | {"pixel_values": pixels, "pixel_attention_mask": None}))


# ---------------------------------------------------------------------------- contract


class TestSmolVLMContract(FamilyContractTests):
    """The shared family contract on Dense SmolVLM (tile counts 17, 5 and 9 of 4 tokens)."""

    model_type = "dense_smolvlm"
    config_class = DenseSmolVLMConfig
    model_class = DenseSmolVLMModel
    generation_class = DenseSmolVLMForConditionalGeneration
    processor_class = DenseSmolVLMProcessor
    stock_model_class = SmolVLMModel
    stock_generation_class = SmolVLMForConditionalGeneration
    vision_tower_names = ("vision_model",)
    connector_module_names = ("connector",)
    geometry = TowerGeometry(
        width=16, depth=4, image_size=(84, 84), patch_size=14, grid=(6, 6), prefix_tokens=0
    )
    pixel_side = 84
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
        return toys.smolvlm_config()

    def connector(self, kind: str) -> ConnectorConfig:
        return toys.connectors("smolvlm")[
            {"dense": "dci", "baseline": "native", "same_shapes": "sci"}[kind]
        ]

    def processor(self, connector: ConnectorConfig):
        return processor(connector)
