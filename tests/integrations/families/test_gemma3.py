"""Dense Gemma 3 (``dense_gemma3``) against HF's own Gemma 3 on tiny random configs.

The parts are :mod:`tests.support.gemma3_toys`: a 4-block SigLIP tower (56 px, a 4x4 grid),
Gemma 3's projector pooling to 2x2 (4 tokens per crop), a 2-layer Gemma 3 LLM with a sliding
window of 4 and a word-level tokenizer with Gemma 3's image tokens.
"""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModel,
    Gemma3ForConditionalGeneration,
    Gemma3Model,
    Gemma3Processor,
)

from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures, SingleLayerSpec
from mmconnect.injection import DeepStackSpec
from mmconnect.integrations.families.base import tower_features
from mmconnect.integrations.families.gemma3 import (
    DenseGemma3Config,
    DenseGemma3ForConditionalGeneration,
    DenseGemma3Model,
    DenseGemma3Processor,
    from_gemma3,
    native_connector,
)
from mmconnect.integrations.families.protocol import (
    TowerGeometry,
    convert_to_dense,
    family_model,
)
from mmconnect.integrations.training.stages import (
    LoraSettings,
    StageConfig,
    prepare_stage,
    train_stage,
)
from mmconnect.zoo.pooled import Gemma3PoolSpec
from tests.integrations.families.family_contract import _RELOAD_SCRIPT as RELOAD_SCRIPT
from tests.integrations.families.family_contract import FamilyContractTests
from tests.support import gemma3_toys as toys


def _pixels(count: int, side: int = toys.SIDE, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _forward_hooks(module: torch.nn.Module) -> dict[str, list[int]]:
    return {name: sorted(part._forward_hooks) for name, part in module.named_modules()}


# ---------------------------------------------------------------------------- the tap


@pytest.mark.parametrize("hidden", [False, True])
def test_tower_features_final_norm_gives_the_towers_last_hidden_state(hidden):
    """With ``final_norm=post_layernorm`` layer L is the tower's output (what Gemma 3's projector
    reads), bit for bit, with early exit and in the full run; the hooks are gone afterwards."""
    torch.manual_seed(0)
    tower = AutoModel.from_config(toys.vision_config()).eval()
    connector = DenseConnector(toys.connector("native"))
    pixels = _pixels(2)
    with torch.no_grad():
        # HF's own run installs its persistent output-capturing hooks: count only what follows
        expected = tower(pixel_values=pixels, output_hidden_states=hidden).last_hidden_state
        hooks = _forward_hooks(tower)
        _, outputs = tower_features(
            connector,
            tower,
            pixels,
            output_hidden_states=hidden,
            final_norm=tower.post_layernorm,
        )
        _, without = tower_features(connector, tower, pixels, output_hidden_states=hidden)
    assert torch.equal(outputs.last_hidden_state, expected)
    assert not torch.equal(without.last_hidden_state, expected)  # the last block's raw output
    assert (outputs.hidden_states is not None) == hidden
    assert _forward_hooks(tower) == hooks


# ---------------------------------------------------------------------------- fixtures


def _processor(connector=None, side: int = toys.SIDE, **image_options) -> DenseGemma3Processor:
    return DenseGemma3Processor(
        image_processor=toys.image_processor(side, **image_options),
        tokenizer=toys.tokenizer(),
        patch_size=toys.PATCH,
        connector=connector or toys.connector("native"),
    )


#: Pan-and-scan for the tiny images: crops of at least 32 px (HF's default is 256).
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
#: Images per sample (height, width): one plain, one of 3 crops + a plain one, one of 2 crops.
BATCH_SIZES = (((56, 56),), ((60, 150), (100, 100)), ((90, 40),))


def _images(sizes_per_sample) -> list[list]:
    seeds = iter(range(100))
    return [[toys.sample_image(size, next(seeds)) for size in sizes] for sizes in sizes_per_sample]


def _prompt(images: int) -> str:
    return "user " + " ".join(["<start_of_image>"] * images) + " what is in the image ?"


@pytest.fixture(scope="module")
def stock():
    return toys.stock_model()


@pytest.fixture(scope="module")
def dense(stock):
    return from_gemma3(stock, native_connector(stock.config)).eval()


@pytest.fixture(scope="module")
def processor():
    return _processor()


@pytest.fixture(scope="module")
def single(processor) -> dict[str, torch.Tensor]:
    images = _images(BATCH_SIZES[:1])
    return dict(processor(images=images, text=[toys.PROMPT], return_tensors="pt"))


@pytest.fixture(scope="module")
def batch(processor) -> dict[str, torch.Tensor]:
    """Three samples, four images, nine crops (1; 1 + 3 and 1; 1 + 2), left-padded."""
    processor.tokenizer.padding_side = "left"
    texts = [_prompt(len(sizes)) for sizes in BATCH_SIZES]
    return dict(
        processor(
            images=_images(BATCH_SIZES),
            text=texts,
            return_tensors="pt",
            padding=True,
            **PAN_AND_SCAN,
        )
    )


# ---------------------------------------------------------------------------- parity


def test_native_connector_single_image_logits_equal_stock_bit_for_bit(stock, dense, single):
    with torch.no_grad():
        expected = stock(**single).logits
        logits = dense(**single).logits
    assert single["pixel_values"].shape == (1, 3, toys.SIDE, toys.SIDE)
    assert int((single["input_ids"] == toys.IMAGE).sum()) == toys.TOKENS_PER_CROP
    assert torch.equal(logits, expected)


def test_native_connector_batch_with_pan_and_scan_equals_stock_bit_for_bit(stock, dense, batch):
    """Several images per sample, different crop counts per image, left padding: the Dense
    processor's inputs equal the stock processor's, and the logits the stock model's."""
    assert batch["pixel_values"].shape == (9, 3, toys.SIDE, toys.SIDE)
    counts = (batch["input_ids"] == toys.IMAGE).sum(dim=1).tolist()
    assert counts == [1 * 4, (4 + 1) * 4, 3 * 4]
    assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == toys.IMAGE)
    stock_processor = Gemma3Processor(
        image_processor=toys.image_processor(), tokenizer=toys.tokenizer(), image_seq_length=4
    )
    stock_processor.tokenizer.padding_side = "left"
    texts = [_prompt(len(sizes)) for sizes in BATCH_SIZES]
    stock_batch = stock_processor(
        images=_images(BATCH_SIZES), text=texts, return_tensors="pt", padding=True, **PAN_AND_SCAN
    )
    assert sorted(stock_batch) == sorted(batch)
    for key, value in stock_batch.items():
        assert torch.equal(value, batch[key]), key
    with torch.no_grad():
        expected = stock(**batch).logits
        logits = dense(**batch).logits
    assert torch.equal(logits, expected)


def test_image_features_equal_stock(stock, dense, batch):
    pixels = batch["pixel_values"]
    with torch.no_grad():
        expected = stock.model.get_image_features(pixels, output_hidden_states=True)
        features = dense.model.get_image_features(pixels)
        full = dense.model.get_image_features(pixels, output_hidden_states=True)
    assert features.pooler_output.shape == (9, toys.TOKENS_PER_CROP, toys.LLM)
    assert torch.equal(features.pooler_output, expected.pooler_output)
    assert torch.equal(features.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(full.pooler_output, expected.pooler_output)
    assert len(full.hidden_states) == len(expected.hidden_states) == toys.BLOCKS + 1
    for ours, theirs in zip(full.hidden_states, expected.hidden_states, strict=True):
        assert torch.equal(ours, theirs)


def test_image_blocks_attend_both_ways_as_in_stock(stock, dense, single):
    """Without token_type_ids both models fall back to a causal mask (the Dense one warns); with
    them the image tokens see each other (the logits at the image positions change)."""
    causal = {key: value for key, value in single.items() if key != "token_type_ids"}
    with torch.no_grad():
        both_ways = dense(**single).logits
        with pytest.warns(UserWarning, match=r"pixel_values without token_type_ids"):
            dense_causal = dense(**causal).logits
        stock_causal = stock(**causal).logits
    assert torch.equal(dense_causal, stock_causal)
    image = single["input_ids"][0] == toys.IMAGE
    first = int(image.nonzero()[0, 0])
    assert (both_ways[0, first] - dense_causal[0, first]).abs().max() > 1e-3
    assert torch.equal(both_ways[0, :first], dense_causal[0, :first])


def test_forward_keeps_the_stock_signature():
    assert inspect.signature(DenseGemma3Model.forward) == inspect.signature(Gemma3Model.forward)


def test_bf16_logits_within_the_measured_bound(stock, batch):
    """bf16 copies of both models: the Dense one equals the stock one bit for bit (the same
    ops in the same order); both are within 0.02 of the fp32 logits (measured: 0.0067 at most,
    logits up to 0.41, on these tiny random models)."""
    with torch.no_grad():
        reference = stock(**batch).logits
    stock_bf16 = copy.deepcopy(stock).to(torch.bfloat16)
    dense_bf16 = from_gemma3(stock_bf16, native_connector(stock.config)).eval()
    with torch.no_grad():
        expected = stock_bf16(**batch).logits
        logits = dense_bf16(**batch).logits
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, expected)
    assert (logits.float() - reference).abs().max() < 0.02


# ---------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_conversion_keeps_the_attention_implementation(single, attention):
    """The masks are built from the Dense config for the stock layers: an eager stock model
    converts to an eager Dense one with the same logits."""
    torch.manual_seed(0)
    stock = Gemma3ForConditionalGeneration._from_config(
        toys.stock_config(), attn_implementation=attention
    ).eval()
    dense = from_gemma3(stock, native_connector(stock.config)).eval()
    for config in (dense.config, dense.config.text_config, dense.config.vision_config):
        assert config._attn_implementation == attention
    with torch.no_grad():
        assert torch.equal(dense(**single).logits, stock(**single).logits)


def test_conversion_shares_the_stock_parts_and_reuses_the_projector(stock, dense):
    assert dense.model.vision_tower is stock.model.vision_tower
    assert dense.model.language_model is stock.model.language_model
    assert dense.lm_head is stock.lm_head
    assert dense.lm_head.weight is stock.model.language_model.embed_tokens.weight  # tied
    projector = stock.model.multi_modal_projector
    assert torch.equal(dense.connector.projector.norm.weight, projector.mm_soft_emb_norm.weight)
    assert torch.equal(dense.connector.projector.projection, projector.mm_input_projection_weight)
    assert dense.config.mm_tokens_per_image == 4
    assert dense.config.connector_config == native_connector(stock.config)
    assert isinstance(dense, DenseGemma3ForConditionalGeneration)
    # the protocol's converter finds this family from the stock class
    converted = convert_to_dense(stock, toys.connector("dci"))
    assert isinstance(converted, DenseGemma3ForConditionalGeneration)
    assert converted.model.vision_tower is stock.model.vision_tower


@pytest.mark.parametrize("kind", ["dci", "sci"])
def test_dense_connectors_fill_the_pools_tokens(stock, batch, kind):
    model = from_gemma3(stock, toys.connector(kind)).eval()
    # the fused width is 3 x 16: Gemma 3's 16-wide projector cannot be reused
    assert model.connector.projector.norm.weight.shape == (3 * toys.VISION,)
    assert model.model.image_token_count() == 4
    with torch.no_grad():
        logits = model(**batch).logits
        native = from_gemma3(stock, native_connector(stock.config)).eval()(**batch).logits
    assert logits.shape == native.shape
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, native)


@pytest.mark.slow
def test_a_preset_of_the_real_tower_runs_on_a_tower_of_its_depth():
    """``dc-dci+gemma3-pool-64-siglip-so400m-896`` (DCI over 27 blocks, 8x8 pool) on a 27-block
    tiny tower at 224 px (a 16x16 grid): 64 tokens per crop, through the processor."""
    stock = toys.stock_model(blocks=27, side=224, tokens=64)
    model = from_gemma3(stock, "dc-dci+gemma3-pool-64-siglip-so400m-896").eval()
    assert model.config.mm_tokens_per_image == 64
    processor = _processor(model.connector.config, side=224)
    inputs = processor(images=_images(BATCH_SIZES[:1]), text=[toys.PROMPT], return_tensors="pt")
    assert int((inputs["input_ids"] == toys.IMAGE).sum()) == 64
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


# ---------------------------------------------------------------------------- processor


@pytest.mark.parametrize(
    ("preset", "per_crop", "size", "crops"),
    [
        # pan-and-scan crops at HF's default settings, counted by hand
        ("dc-dci+gemma3-pool-siglip-so400m-896", 256, (896, 896), 0),
        ("dc-dci+gemma3-pool-siglip-so400m-896", 256, (896, 1792), 2),
        ("dc-dci+gemma3-pool-siglip-so400m-896", 256, (600, 2400), 4),
        ("dc-sci+gemma3-pool-siglip-so400m-896", 256, (1800, 600), 3),
        ("dc-dci+gemma3-pool-64-siglip-so400m-896", 64, (896, 1792), 2),
        ("baseline+gemma3-pool-siglip-so400m-896", 256, (600, 2400), 4),
    ],
)
def test_tokens_per_image_at_896_px_with_pan_and_scan(preset, per_crop, size, crops):
    processor = _processor(ConnectorConfig.from_preset(preset, vision_dim=16, llm_dim=32), 896)
    assert processor.image_seq_length == per_crop
    assert processor.image_token_count(size, do_pan_and_scan=True) == (1 + crops) * per_crop
    assert processor.image_token_count(size) == per_crop  # pan-and-scan is off by default


def test_processor_counts_are_what_it_inserts(processor):
    """Per image with pan-and-scan on the tiny tower: image_token_count == the tokens the
    processor puts into the prompt (one image per sample)."""
    sizes = [(56, 56), (60, 150), (150, 60), (90, 40), (100, 100)]
    for index, size in enumerate(sizes):
        inputs = processor(
            images=[[toys.sample_image(size, index)]],
            text=[toys.PROMPT],
            return_tensors="pt",
            **PAN_AND_SCAN,
        )
        found = int((inputs["input_ids"] == toys.IMAGE).sum())
        crops = inputs["pixel_values"].shape[0]
        assert found == processor.image_token_count(size, **PAN_AND_SCAN) == crops * 4, size
    assert [processor.image_token_count(size, **PAN_AND_SCAN) // 4 for size in sizes] == [
        1,
        4,
        4,
        3,
        1,
    ]


@pytest.mark.parametrize(
    ("size", "error", "message"),
    [
        ((0, 60), ValueError, r"image_size"),
        ((56,), ValueError, r"image_size"),
        ((56.0, 60), TypeError, r"image_size"),
        ("56x60", TypeError, r"image_size"),
    ],
)
def test_image_token_count_of_a_size_that_is_not_one(processor, size, error, message):
    with pytest.raises(error, match=message):
        processor.image_token_count(size, **PAN_AND_SCAN)


def test_processor_with_a_one_token_pool():
    connector = toys.connector("dci").replace(projector=Gemma3PoolSpec(grid=(1, 1)))
    processor = _processor(connector)
    assert processor.image_seq_length == 1
    inputs = processor(images=_images(BATCH_SIZES[:1]), text=[toys.PROMPT], return_tensors="pt")
    assert inputs["token_type_ids"].sum() == 1
    assert int((inputs["input_ids"] == toys.IMAGE).sum()) == 1


def test_processor_refuses_another_image_seq_length_and_a_missing_connector():
    with pytest.raises(ValueError, match=r"image_seq_length=256 but the connector fills 4 tokens"):
        DenseGemma3Processor(
            image_processor=toys.image_processor(),
            tokenizer=toys.tokenizer(),
            patch_size=toys.PATCH,
            connector=toys.connector("native"),
            image_seq_length=256,
        )
    with pytest.raises(ValueError, match=r"DenseGemma3Processor needs connector="):
        DenseGemma3Processor(
            image_processor=toys.image_processor(), tokenizer=toys.tokenizer(), patch_size=14
        )
    with pytest.raises(ValueError, match=r"patch_size"):
        DenseGemma3Processor(
            image_processor=toys.image_processor(),
            tokenizer=toys.tokenizer(),
            patch_size=0,
            connector=toys.connector("native"),
        )


def test_processor_refuses_a_tokenizer_without_gemma3s_image_tokens():
    from mmconnect.integrations.applications.tiny_models import tiny_llava_tokenizer

    message = r"lacks Gemma 3's boi_token, eoi_token; DenseGemma3Processor needs image_token"
    with pytest.raises(ValueError, match=message):
        DenseGemma3Processor(
            image_processor=toys.image_processor(),
            tokenizer=tiny_llava_tokenizer(),
            patch_size=toys.PATCH,
            connector=toys.connector("native"),
        )


# ---------------------------------------------------------------------------- bad input


def test_pixel_values_of_more_crops_than_the_prompt_fills(dense, single):
    pixels = torch.cat([single["pixel_values"]] * 2)
    message = r"holds 4 image tokens but the 2 crop\(s\) in pixel_values fill 8 \(4 per crop"
    with pytest.raises(ValueError, match=message):
        dense(**(single | {"pixel_values": pixels}))
    with pytest.raises(ValueError, match=message):
        dense.generate(**(single | {"pixel_values": pixels}), max_new_tokens=1)


def test_pixel_values_of_another_size_are_refused_before_the_tower(dense, single):
    small = single["pixel_values"][..., :28, :28]
    with pytest.raises(ValueError, match=r"pixel_values must be \[crops, 3, 56, 56\]"):
        dense.model.get_image_features(small)
    with pytest.raises(ValueError, match=r"interpolate_pos_encoding=True is not supported"):
        dense.model.get_image_features(single["pixel_values"], interpolate_pos_encoding=True)


@pytest.mark.parametrize(
    ("preset", "depth"),
    [("dc-dci+gemma3-pool-siglip-so400m-896", 27), ("dc-dci-clip-l-336", 24)],
)
def test_a_preset_for_another_tower_depth_is_refused(stock, preset, depth):
    message = (
        rf"connector num_layers={depth} does not match the vision tower's num_hidden_layers \(4\)"
    )
    with pytest.raises(ValueError, match=message):
        from_gemma3(stock, preset)


def test_a_pool_grid_that_does_not_divide_the_towers_grid_is_refused(stock):
    connector = toys.connector("native").replace(projector=Gemma3PoolSpec(grid=(3, 3)))
    with pytest.raises(ValueError, match=r"cannot average-pool the 4x4 token grid to its 3x3"):
        from_gemma3(stock, connector)


def test_conversion_refuses_other_models_and_connectors(stock, dense):
    with pytest.raises(TypeError, match=r"must be an HF Gemma3ForConditionalGeneration, got"):
        from_gemma3(dense, native_connector(stock.config))
    with pytest.raises(
        TypeError, match=r"must be an HF Gemma3ForConditionalGeneration, got Linear"
    ):
        from_gemma3(torch.nn.Linear(2, 2), native_connector(stock.config))
    with pytest.raises(TypeError, match=r"connector must be a ConnectorConfig or a preset name"):
        from_gemma3(stock, 3)


def test_config_refusals():
    with pytest.raises(ValueError, match=r"mm_tokens_per_image=8 must be a square number"):
        DenseGemma3Config(**_config_data(toys.stock_config(tokens=8)))
    injecting = toys.connector("native").replace(injection=DeepStackSpec(layers=(2,)))
    with pytest.raises(
        ValueError, match=r"Dense Gemma 3 does not support a connector with injection"
    ):
        DenseGemma3Config(**_config_data(toys.stock_config()), connector=injecting.to_dict())


def _config_data(config) -> dict:
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    return data


# ---------------------------------------------------------------------------- tap and hooks


def test_early_exit_skips_the_blocks_after_the_deepest_layer(stock):
    model = from_gemma3(
        stock, toys.connector("native").replace(fusion=SingleLayerSpec(final_layer=2))
    )
    calls = []
    blocks = model.model.vision_tower.encoder.layers
    handles = [
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model.model.get_image_features(_pixels(1))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1]


def test_streaming_group_sums_equal_the_means_of_the_hidden_states(stock):
    """DCI through the streaming tap == the connector on the tower's own hidden states (layer L
    after post_layernorm), bit for bit."""
    model = from_gemma3(stock, toys.connector("dci")).eval()
    tower = model.model.vision_tower
    pixels = _pixels(2)
    with torch.no_grad():
        tokens = model.model.get_image_features(pixels).pooler_output
        hidden = tower(pixel_values=pixels, output_hidden_states=True)
        layers = dict(enumerate(hidden.hidden_states))
        layers[toys.BLOCKS] = hidden.last_hidden_state
        expected = model.connector(LayerFeatures(layers), (4, 4))
    assert torch.equal(tokens, expected)


def test_no_hook_is_left_after_a_forward_or_one_that_raises(dense, single):
    tower = dense.model.vision_tower
    with torch.no_grad():
        dense(**single)
    hooks = _forward_hooks(tower)

    def fail(*_):
        raise RuntimeError("block 1 failed")

    handle = tower.encoder.layers[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="block 1 failed"), torch.no_grad():
            dense(**single)
    finally:
        handle.remove()
    assert _forward_hooks(tower) == hooks
    assert all(not part._forward_pre_hooks for part in tower.modules())


# ---------------------------------------------------------------------------- generate


@pytest.mark.slow
def test_generate_equals_stock_generate(stock, dense, batch):
    options = {"max_new_tokens": 4, "do_sample": False}
    expected = stock.generate(**batch, **options)
    assert torch.equal(dense.generate(**batch, **options), expected)


def test_generate_from_inputs_embeds_equals_generate_from_input_ids(dense):
    """The chat path's ``generate(inputs_embeds=...)``, which HF's Gemma 3 refuses, gives the
    tokens of ``generate(input_ids=...)``."""
    ids = torch.tensor([[toys.BOS, 7, 9, 10, 11]])
    options = {"max_new_tokens": 4, "do_sample": False}
    from_ids = dense.generate(input_ids=ids, **options)
    from_embeddings = dense.generate(inputs_embeds=dense.get_input_embeddings()(ids), **options)
    assert torch.equal(from_embeddings, from_ids[:, ids.shape[1] :])


def test_chat_answers_about_an_image(dense, processor):
    """The family protocol's chat path (one crop's tokens in the embeddings) runs."""
    from mmconnect.integrations.chat.answering import generate_answer, prompt_embeddings

    visual = dense.model.image_features(processor.image_processor, toys.sample_image((60, 80), 0))
    assert visual.shape == (1, 4, toys.LLM)
    embeddings, mask = prompt_embeddings(
        dense, processor.tokenizer, "what is in the image ?", visual
    )
    answer = generate_answer(dense, processor.tokenizer, embeddings, mask, max_new_tokens=3)
    assert isinstance(answer, str) and answer


# ---------------------------------------------------------------------------- training


class _Samples(torch.utils.data.Dataset):
    """Four samples of one image each: the prompt, then four answer words to learn."""

    def __init__(self, processor) -> None:
        inputs = processor(
            images=_images(tuple(((56, 56),) for _ in range(4))),
            text=[toys.PROMPT + " the image is here"] * 4,
            return_tensors="pt",
        )
        self.inputs = dict(inputs)
        labels = inputs["input_ids"].clone()
        labels[:, :-4] = -100
        self.inputs["labels"] = labels

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.inputs.items()}


def _collate(samples):
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


def test_stage_one_trains_exactly_the_connector(stock, processor):
    model = prepare_stage(
        from_gemma3(copy.deepcopy(stock), toys.connector("dci")).train(),
        StageConfig(stage="align", output_dir="unused"),
    )
    connector = family_model(model).connector
    loss = model(**_collate([_Samples(processor)[0]])).loss
    loss.backward()
    for name, parameter in model.named_parameters():
        owned = any(parameter is p for p in connector.parameters())
        assert parameter.requires_grad == owned, name
        if owned:
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.slow
def test_two_stages_train_save_and_reload(stock, processor, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    model = from_gemma3(copy.deepcopy(stock), toys.connector("dci")).train()
    data = _Samples(processor)
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    llm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    before = {k: v.clone() for k, v in model.connector.state_dict().items()}
    align = StageConfig(
        stage="align",
        output_dir=str(tmp_path / "align"),
        max_steps=2,
        per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    first = train_stage(model, data, _collate, align)
    assert len(first.losses) == 2
    after = model.connector.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(v, tower[k]) for k, v in model.model.vision_tower.state_dict().items())
    assert all(torch.equal(v, llm[k]) for k, v in model.model.language_model.state_dict().items())
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "align").train()
    assert isinstance(loaded, DenseGemma3ForConditionalGeneration)
    instruct = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path / "instruct"),
        max_steps=2,
        per_device_train_batch_size=2,
        disable_tqdm=True,
        lora=LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj")),
    )
    second = train_stage(loaded, data, _collate, instruct, processor=processor)
    assert len(second.losses) == 2
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "instruct").eval()
    inputs = _collate([data[0]])
    with torch.no_grad():
        assert torch.isfinite(final(**inputs).logits).all()


# ---------------------------------------------------------------------------- family contract


class TestGemma3Contract(FamilyContractTests):
    """The shared family contract on the tiny Gemma 3 (no pan-and-scan: one crop per image).

    The model's connector is DCI into Gemma 3's 2x2 pool; ``"baseline"`` is the native
    connector (a 16-wide pool instead of 48), ``"same_shapes"`` SCI (DCI's shapes)."""

    model_type = "dense_gemma3"
    config_class = DenseGemma3Config
    model_class = DenseGemma3Model
    generation_class = DenseGemma3ForConditionalGeneration
    processor_class = DenseGemma3Processor
    stock_model_class = Gemma3Model
    stock_generation_class = Gemma3ForConditionalGeneration
    vision_tower_names = ("vision_tower",)
    connector_module_names = ("multi_modal_projector",)
    geometry = TowerGeometry(
        width=toys.VISION,
        depth=toys.BLOCKS,
        image_size=(toys.SIDE, toys.SIDE),
        patch_size=toys.PATCH,
        grid=(4, 4),
        prefix_tokens=0,
    )
    pixel_side = toys.SIDE
    image_sizes = ((56, 56), (60, 150), (150, 60), (100, 100))
    token_counts = (4, 4, 4, 4)
    fixed_image_tokens = False
    frame_tokens = 4
    derived_config_keys = frozenset({"mm_tokens_per_image"})
    prompt = toys.PROMPT

    def stock_config(self) -> Any:
        return toys.stock_config()

    def connector(self, kind: str) -> ConnectorConfig:
        return toys.connector({"dense": "dci", "baseline": "native", "same_shapes": "sci"}[kind])

    def processor(self, connector: ConnectorConfig) -> DenseGemma3Processor:
        return _processor(connector)

    def image_token_id(self, processor: Any) -> int:
        """Gemma 3's processor names ``<start_of_image>`` its ``image_token`` (what prompts
        hold); the placeholder the connector's tokens replace is the tokenizer's."""
        return processor.tokenizer.image_token_id

    # Gemma 3's processor takes the images of each prompt as a list (``[[image], [image]]``); a
    # flat list is one prompt's images. The two contract tests that pass one flat image per
    # prompt are kept here with the images nested per prompt.

    def test_processor_puts_image_token_count_tokens_per_image(
        self, model, family_processor
    ) -> None:
        inner = model.model
        assert [inner.image_token_count(size) for size in self.image_sizes] == list(
            self.token_counts
        )
        images = [[image] for image in self.images()]
        batch = family_processor(
            images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True
        )
        image_token = self.image_token_id(family_processor)
        assert image_token == model.config.image_token_id
        counts = (batch["input_ids"] == image_token).sum(dim=1).tolist()
        assert counts == list(self.token_counts)
        assert tuple(batch["pixel_values"].shape[-3:]) == (3, self.pixel_side, self.pixel_side)
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
        assert torch.isfinite(logits).all()

    @pytest.mark.slow
    def test_save_and_auto_reload_in_a_fresh_process(
        self, model, family_processor, tmp_path
    ) -> None:
        """The contract's fresh-process reload with one prompt holding every sample image
        (the flat image list the shared script passes is that prompt's images)."""
        from safetensors.torch import load_file, save_file

        directory = tmp_path / "saved"
        model.save_pretrained(directory)
        family_processor.save_pretrained(directory)
        paths = []
        for index, picture in enumerate(self.images()):
            paths.append(str(tmp_path / f"image{index}.png"))
            picture.save(paths[-1])
        images = [Image.open(path).convert("RGB") for path in paths]
        texts = [_prompt(len(images))]
        inputs = dict(family_processor(images=[images], text=texts, return_tensors="pt"))
        save_file(inputs, tmp_path / "inputs.safetensors")
        with torch.no_grad():
            expected = model(**load_file(tmp_path / "inputs.safetensors")).logits
        request = {"inputs": str(tmp_path / "inputs.safetensors"), "images": paths, "texts": texts}
        (tmp_path / "request.json").write_text(json.dumps(request))
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                RELOAD_SCRIPT,
                str(directory),
                str(tmp_path / "request.json"),
                str(tmp_path / "output.safetensors"),
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = json.loads(result.stdout.strip().splitlines()[-1])
        assert loaded == {
            "model": "DenseGemma3ForConditionalGeneration",
            "processor": "DenseGemma3Processor",
        }
        output = load_file(tmp_path / "output.safetensors")
        assert torch.equal(output.pop("logits"), expected)
        assert sorted(output) == sorted(f"processor.{key}" for key in inputs)
        for key, value in inputs.items():
            assert torch.equal(output[f"processor.{key}"], value), key
        assert int((inputs["input_ids"] == toys.IMAGE).sum()) == 4 * len(images)
