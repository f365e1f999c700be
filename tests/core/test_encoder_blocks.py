"""Structural discovery (mmconnect.encoder_blocks) of HF's BERT-style towers, whose block list is
``encoder.layer`` and whose prefix tokens are ``embeddings.cls_token`` (+ ``register_tokens``):
InternVL's InternViT (alone and inside an ``InternVLModel``) and DINOv2 with registers; the tap
on InternViT equals HF's ``hidden_states`` with the CLS token dropped, stops early and leaves no
hook behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    InternVLConfig,
    InternVLModel,
    InternVLVisionConfig,
    InternVLVisionModel,
    Qwen2Config,
)

from mmconnect import MultiLayerFeatureTap, find_encoder_blocks

BLOCKS, WIDTH, SIDE, PATCH = 3, 16, 56, 14  # a 4x4 grid per image


def _internvit_config(**fields) -> InternVLVisionConfig:
    return InternVLVisionConfig(
        hidden_size=WIDTH,
        num_hidden_layers=BLOCKS,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        image_size=SIDE,
        patch_size=PATCH,
        **fields,
    )


@pytest.fixture(scope="module")
def internvit() -> InternVLVisionModel:
    torch.manual_seed(0)
    model = InternVLVisionModel(_internvit_config()).eval()
    with torch.no_grad():  # HF zeroes the CLS token: random, so dropping the wrong row shows
        model.embeddings.cls_token.normal_()
        model.embeddings.position_embeddings.normal_()
    return model


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def _hooks(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (
            tuple(module._forward_hooks),
            tuple(module._forward_pre_hooks),
        )
        for name, module in model.named_modules()
    }


def test_internvit_blocks_prefix_and_patch_convolution(internvit) -> None:
    found = find_encoder_blocks(internvit)
    assert found.path == "encoder.layer"
    assert found.blocks is internvit.encoder.layer
    assert found.num_layers == BLOCKS
    assert found.owner is internvit
    assert found.num_prefix_tokens == 1
    assert found.patch_embedding is internvit.embeddings.patch_embeddings.projection
    assert found.batch_first


def test_internvit_inside_the_internvl_model() -> None:
    config = InternVLConfig(
        vision_config=_internvit_config().to_dict(),
        text_config=Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=16,
        ).to_dict(),
    )
    with torch.device("meta"):
        model = InternVLModel(config)
    found = find_encoder_blocks(model)
    assert found.path == "vision_tower.encoder.layer"
    assert found.owner is model.vision_tower
    assert found.num_prefix_tokens == 1


def test_dinov2_registers_count_as_prefix_tokens() -> None:
    config = Dinov2WithRegistersConfig(
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=PATCH,
        num_register_tokens=4,
    )
    model = Dinov2WithRegistersModel(config).eval()
    found = find_encoder_blocks(model)
    assert (found.path, found.num_prefix_tokens) == ("encoder.layer", 5)
    with torch.no_grad():
        tokens = model(torch.zeros(1, 3, 28, 28)).last_hidden_state.shape[1]
    assert tokens == 5 + 2 * 2  # CLS + 4 registers + the 2x2 patch grid


def test_tap_equals_hf_hidden_states_without_the_cls_token(internvit) -> None:
    x = _pixels()
    with torch.no_grad():
        reference = internvit(x, output_hidden_states=True).hidden_states
        features = MultiLayerFeatureTap(internvit, [0, 1, 3], groups=[(1, 2)])(x)
    assert len(reference) == BLOCKS + 1
    for layer in (0, 1, 3):
        assert torch.equal(features[layer], reference[layer][:, 1:])
    mean = torch.stack([reference[1][:, 1:], reference[2][:, 1:]]).sum(0) / 2
    assert torch.equal(features.group_means[(1, 2)], mean)
    assert features.grids[3] == (SIDE // PATCH, SIDE // PATCH)


def test_final_norm_makes_the_last_layer_the_towers_output() -> None:
    """InternViT without mean pooling ends in a LayerNorm: layer L is then last_hidden_state."""
    torch.manual_seed(0)
    tower = InternVLVisionModel(_internvit_config(use_mean_pooling=False)).eval()
    assert isinstance(tower.layernorm, nn.LayerNorm)
    x = _pixels()
    with torch.no_grad():
        reference = tower(x, output_hidden_states=True)
        features = MultiLayerFeatureTap(tower, [BLOCKS - 1, BLOCKS], final_norm=tower.layernorm)(x)
    assert torch.equal(features[BLOCKS], reference.last_hidden_state[:, 1:])
    assert torch.equal(features[BLOCKS - 1], reference.hidden_states[BLOCKS - 1][:, 1:])
    assert not torch.equal(features[BLOCKS], reference.hidden_states[BLOCKS][:, 1:])


def test_early_exit_and_no_hooks_left(internvit, monkeypatch) -> None:
    before = _hooks(internvit)

    def boom(*args, **kwargs):
        raise RuntimeError("the last block must not run")

    monkeypatch.setattr(internvit.encoder.layer[BLOCKS - 1], "forward", boom)
    with torch.no_grad():
        features = MultiLayerFeatureTap(internvit, [BLOCKS - 1])(_pixels())
    assert features[BLOCKS - 1].shape == (2, 16, WIDTH)
    assert _hooks(internvit) == before
    with pytest.raises(RuntimeError, match="must not run"), torch.no_grad():
        MultiLayerFeatureTap(internvit, [BLOCKS])(_pixels())
    assert _hooks(internvit) == before
