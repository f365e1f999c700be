"""The tiny model builders (:mod:`mmconnect.integrations.applications.tiny_models`): each gives the
geometry its docstring states, two calls give identical weights (and another seed other weights),
models come in eval mode and fp32, and every ``mmconnect inspect`` name still resolves.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from mmconnect import MultiLayerFeatureTap
from mmconnect.fusion import DCISpec
from mmconnect.integrations.applications import tiny_models
from mmconnect.integrations.applications.encoders import (
    describe_encoder,
    load_encoder,
)
from mmconnect.integrations.applications.tiny_models import (
    PUBLISHED_GEOMETRY,
    TINY_ENCODERS,
    build_word_tokenizer,
    tiny_connector,
    tiny_dense_llava,
    tiny_dense_llava_config,
    tiny_encoder,
    tiny_llava_processor,
    tiny_llava_tokenizer,
    tiny_text_config,
    tiny_vision_config,
    tiny_vision_tower,
    word_level_tokenizer,
)


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    one, two = first.state_dict(), second.state_dict()
    return list(one) == list(two) and all(torch.equal(one[key], two[key]) for key in one)


def assert_eval_fp32(model: torch.nn.Module) -> None:
    assert not any(module.training for module in model.modules())
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def tap_geometry(model: torch.nn.Module, size: int) -> tuple[int, int | None, tuple[int, int]]:
    """``(blocks, prefix tokens, grid)`` as the tap finds them on one ``size`` px image."""
    tap = MultiLayerFeatureTap(model, layers=[0])
    with torch.no_grad():
        features = tap(torch.zeros(1, 3, size, size))
    return tap.num_layers, tap.num_prefix_tokens, features.grid(0)


# ---------------------------------------------------------------------------- vision towers


@pytest.mark.parametrize(
    ("family", "tokens"), [("clip", 1 + 9), ("siglip", 9)], ids=["clip", "siglip"]
)
def test_vision_tower_defaults(family, tokens):
    """4 blocks, width 32 (MLP 64), 42 px / patch 14: a 3x3 grid; CLIP adds a CLS token."""
    config = tiny_vision_config(family)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (4, 32, 64)
    assert (config.image_size, config.patch_size, config.num_attention_heads) == (42, 14, 2)
    tower = tiny_vision_tower(family)
    assert_eval_fp32(tower)
    with torch.no_grad():
        output = tower(torch.zeros(1, 3, 42, 42), output_hidden_states=True)
    assert output.last_hidden_state.shape == (1, tokens, 32)
    assert len(output.hidden_states) == 4 + 1
    assert tap_geometry(tower, 42) == (4, tokens - 9, (3, 3))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vision_tower_of_the_published_geometry(family):
    """CLIP-L/336: 24 blocks, 24x24; SigLIP-SO400M/384: 27 blocks, 27x27 (width as asked)."""
    config = tiny_vision_config(family, width=16, **PUBLISHED_GEOMETRY[family])
    blocks = {"clip": 24, "siglip": 27}[family]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        blocks,
        16,
        32,
    )
    assert config.image_size // config.patch_size == blocks  # the grid side equals the depth here


def test_vision_tower_is_deterministic_and_seeded():
    first, second = tiny_vision_tower("clip"), tiny_vision_tower("clip")
    assert same_weights(first, second)
    torch.manual_seed(123)  # the global state before the call does not matter
    assert same_weights(first, tiny_vision_tower("clip"))
    assert not same_weights(first, tiny_vision_tower("clip", seed=1))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"family": "vit"}, ValueError, "family"),
        ({"blocks": 0}, ValueError, "blocks"),
        ({"width": 2.0}, TypeError, "width"),
        ({"image_size": 0}, ValueError, "image_size"),
    ],
)
def test_vision_config_refuses_bad_arguments(arguments, error, message):
    with pytest.raises(error, match=message):
        tiny_vision_config(**arguments)


def test_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed must be an int, got '0' \\(str\\)"):
        tiny_vision_tower("clip", seed="0")


def test_clip_model_holds_both_towers():
    model = tiny_models.tiny_clip_model()
    assert_eval_fp32(model)
    assert len(model.vision_model.encoder.layers) == 4
    assert len(model.text_model.encoder.layers) == 1
    assert model.config.projection_dim == 16
    assert same_weights(model, tiny_models.tiny_clip_model())
    vision = model.config.vision_config  # the default tower's geometry
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size) == (4, 32, 42)


def test_timm_vit_with_registers():
    """1 CLS + 4 registers in front of a 3x3 grid, 3 blocks, width 32."""
    model = tiny_models.tiny_timm_vit_reg()
    assert_eval_fp32(model)
    assert (len(model.blocks), model.embed_dim, model.num_prefix_tokens) == (3, 32, 5)
    with torch.no_grad():
        tokens = model.forward_features(torch.zeros(1, 3, 42, 42))
    assert tokens.shape == (1, 5 + 9, 32)
    assert tap_geometry(model, 42) == (3, 5, (3, 3))
    assert same_weights(model, tiny_models.tiny_timm_vit_reg())


def test_timm_convnext():
    """4 stages of one block, widths 8 / 16 / 24 / 32, stride 32: a 2x2 map at 64 px."""
    model = tiny_models.tiny_timm_convnext()
    assert_eval_fp32(model)
    assert [len(stage.blocks) for stage in model.stages] == [1, 1, 1, 1]
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 32, 2, 2)
    assert same_weights(model, tiny_models.tiny_timm_convnext())
    full = tiny_models.tiny_timm_convnext(dims=None, depths=None, num_classes=0)
    assert [len(stage.blocks) for stage in full.stages] == [2, 2, 6, 2]  # convnext_atto's own
    assert full.num_classes == 0


def test_openclip_models():
    pytest.importorskip("open_clip")
    vit = tiny_models.tiny_openclip_vit()
    assert_eval_fp32(vit)
    assert (len(vit.transformer.resblocks), vit.transformer.width) == (3, 32)
    assert tap_geometry(vit, 42) == (3, 1, (3, 3))
    clip = tiny_models.tiny_openclip_clip()
    assert len(clip.visual.transformer.resblocks) == 3 and len(clip.transformer.resblocks) == 1
    convnext = tiny_models.tiny_openclip_convnext()
    assert len(convnext.trunk.stages) == 4
    for build, model in [
        (tiny_models.tiny_openclip_vit, vit),
        (tiny_models.tiny_openclip_clip, clip),
        (tiny_models.tiny_openclip_convnext, convnext),
    ]:
        assert same_weights(model, build())


# ---------------------------------------------------------------------------- inspect names


@pytest.mark.parametrize(
    ("name", "size", "blocks", "prefix", "grid"),
    [
        ("tiny-clip-l-336", 336, 24, 1, (24, 24)),
        ("tiny-siglip-so400m", 384, 27, 0, (27, 27)),
        ("tiny-timm-vit-reg4", 56, 4, 5, (4, 4)),
        ("tiny-timm-convnext", 64, 4, None, (16, 16)),  # layer 0: the stride-4 stem
    ],
)
def test_every_inspect_name_resolves(name, size, blocks, prefix, grid):
    encoder, native = load_encoder(name)
    assert native == size
    assert_eval_fp32(encoder)
    again, _ = tiny_encoder(name)
    assert same_weights(encoder, again)
    description = describe_encoder(encoder, size)
    assert (description.num_layers, description.num_prefix_tokens) == (blocks, prefix)
    assert description.grid == grid


def test_inspect_names_are_the_documented_ones():
    assert list(TINY_ENCODERS) == [
        "tiny-clip-l-336",
        "tiny-siglip-so400m",
        "tiny-timm-vit-reg4",
        "tiny-timm-convnext",
    ]
    with pytest.raises(ValueError, match="tiny-clip-l-336"):
        tiny_encoder("tiny-clip")


def test_inspect_clip_is_the_published_geometry_tower():
    encoder, _ = tiny_encoder("tiny-clip-l-336")
    assert same_weights(encoder, tiny_vision_tower("clip", **PUBLISHED_GEOMETRY["clip"]))


# ---------------------------------------------------------------------------- LLMs, tokenizers


def test_text_config_defaults_and_families():
    llama = tiny_text_config()
    assert type(llama).__name__ == "LlamaConfig"
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (32, 64, 2)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.vocab_size) == (2, 2, 120)
    qwen = tiny_text_config("qwen2", vocab_size=40, width=8, blocks=1, pad_token_id=0)
    assert type(qwen).__name__ == "Qwen2Config"
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.vocab_size, qwen.pad_token_id) == (
        8,
        1,
        40,
        0,
    )
    with pytest.raises(ValueError, match="family"):
        tiny_text_config("gpt2")


def test_text_config_grouped_query_heads_and_further_fields():
    """The benchmarks' Llama shapes: fewer key-value heads, an untied head, SDPA."""
    config = tiny_text_config(
        width=64, heads=4, kv_heads=2, tie_word_embeddings=False, attn_implementation="sdpa"
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is False
    assert config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"^kv_heads must be a positive int, got 0$"):
        tiny_text_config(kv_heads=0)
    with pytest.raises(TypeError, match=r"sets hidden_size from its own arguments"):
        tiny_text_config(hidden_size=64)


def test_text_config_from_a_tokenizer():
    tokenizer = build_word_tokenizer(["red green"])
    config = tiny_text_config(tokenizer=tokenizer, eos_token_id=4)
    assert config.vocab_size == len(tokenizer) == 7
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 2, 4)


def test_demo_word_tokenizer():
    """Special tokens first, then the sorted pieces; newlines and punctuation are tokens."""
    tokenizer = build_word_tokenizer(["red, green\nblue"])
    assert tokenizer.get_vocab() == {
        "<unk>": 0,
        "<pad>": 1,
        "<s>": 2,
        "</s>": 3,
        "<image>": 4,
        "\n": 5,
        ",": 6,
        "blue": 7,
        "green": 8,
        "red": 9,
    }
    assert tokenizer("red,\nyellow")["input_ids"] == [9, 6, 5, 0]


def test_llava_tokenizer():
    tokenizer = tiny_llava_tokenizer()
    assert len(tokenizer) == 21
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == 3
    assert tokenizer("what is <image> zebra")["input_ids"] == [8, 9, 3, 4]


def test_word_level_tokenizer_needs_the_special_tokens():
    with pytest.raises(ValueError, match="lacks the special tokens <s>, </s>"):
        word_level_tokenizer(["<unk>", "<pad>", "<image>", "cat"])


# ---------------------------------------------------------------------------- Dense LLaVA


def test_tiny_connector():
    connector = tiny_connector()
    assert (connector.vision_dim, connector.llm_dim, connector.num_layers) == (16, 32, 4)
    assert connector.fusion == DCISpec(groups=((0, 1), (2, 3)), final_layer=-2)
    assert tiny_connector(num_layers=6).fusion.groups == ((0, 1, 2), (3, 4, 5))


def test_dense_llava_defaults():
    """CLIP 4 blocks, width 16, a 4x4 grid at 56 px (16 image tokens); Llama 32 wide, vocab 120."""
    config = tiny_dense_llava_config()
    assert config.image_token_id == 3
    model = tiny_dense_llava()
    assert_eval_fp32(model)
    assert model.connector.num_tokens((4, 4)) == 16
    assert same_weights(model, tiny_dense_llava())
    assert not same_weights(model, tiny_dense_llava(seed=1))
    ids = torch.tensor([[1, *[3] * 16, 8, 9]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=torch.zeros(1, 3, 56, 56)).logits
    assert logits.shape == (1, 1 + 16 + 2, 120)


@pytest.mark.parametrize(
    ("family", "size", "tokens"), [("clip", 56, 16), ("siglip", 42, 9)], ids=["clip", "siglip"]
)
def test_llava_processor(family, size, tokens):
    """The processor resizes to the tower's size and inserts the connector's token count."""
    processor = tiny_llava_processor(
        tiny_llava_tokenizer(), tiny_connector(), family=family, image_size=size
    )
    image = torch.zeros(3, 30, 80, dtype=torch.uint8)
    batch = processor(images=[image], text=["<image> what"], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, size, size)
    assert int((batch["input_ids"] == 3).sum()) == tokens
