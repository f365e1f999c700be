"""Shared fixtures: tiny vision encoders built from configs (random weights, never downloaded).

Every builder seeds torch itself, so two fixtures of the same kind hold identical weights. The
encoders are in eval mode and fp32; tests that need another mode or dtype change their own copy.
Transformers, timm and open_clip are imported lazily, so tests of the core need none of them.
"""

from __future__ import annotations

import pytest
import torch

#: Side of the square test images for the ViT-like encoders: 3 x 3 patches of 14 pixels.
TINY_IMAGE_SIZE = 42
TINY_PATCH_SIZE = 14


def _tiny_hf_vision_kwargs() -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": TINY_PATCH_SIZE,
    }


@pytest.fixture
def tiny_clip_vision():
    """HF ``CLIPVisionModel``: 4 blocks, width 32, 1 CLS + 3 x 3 patch tokens."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**_tiny_hf_vision_kwargs())
    return transformers.CLIPVisionModel(config).eval()


@pytest.fixture
def tiny_siglip_vision():
    """HF ``SiglipVisionModel``: 4 blocks, width 32, 3 x 3 patch tokens, no prefix token."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(**_tiny_hf_vision_kwargs())
    return transformers.SiglipVisionModel(config).eval()


@pytest.fixture
def tiny_clip_model():
    """HF ``CLIPModel`` (vision + text towers): vision blocks at ``vision_model.encoder.layers``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    config = transformers.CLIPConfig(
        vision_config=_tiny_hf_vision_kwargs(), text_config=text, projection_dim=16
    )
    return transformers.CLIPModel(config).eval()


@pytest.fixture
def tiny_timm_vit_reg():
    """timm ``VisionTransformer`` with a CLS and 4 register tokens: 3 blocks, width 32."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        img_size=TINY_IMAGE_SIZE,
        depth=3,
        embed_dim=32,
        num_heads=2,
    ).eval()


@pytest.fixture
def tiny_timm_convnext():
    """timm ``ConvNeXt``: 4 stages of one block (widths 8..32), total stride 32."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "convnext_atto", pretrained=False, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)
    ).eval()


#: Shared by the open_clip ``VisionTransformer`` and the vision tower of the open_clip ``CLIP``.
_TINY_OPENCLIP_VISION = {
    "image_size": TINY_IMAGE_SIZE,
    "patch_size": TINY_PATCH_SIZE,
    "width": 32,
    "layers": 3,
    "mlp_ratio": 2.0,
}


@pytest.fixture
def tiny_openclip_vit():
    """open_clip ``VisionTransformer``: 3 blocks, width 32, 1 CLS + 3 x 3 patch tokens."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(
        **_TINY_OPENCLIP_VISION, heads=2, output_dim=16
    ).eval()


@pytest.fixture
def tiny_openclip_clip():
    """open_clip ``CLIP`` (image + text): vision blocks at ``visual.transformer.resblocks``, its
    text tower's blocks at the top-level ``transformer.resblocks``."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    vision = {**_TINY_OPENCLIP_VISION, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


@pytest.fixture
def tiny_openclip_convnext():
    """open_clip ``TimmModel`` around a timm ``convnext_atto`` trunk (blocks at ``trunk.stages``)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return open_clip.timm_model.TimmModel(
        "convnext_atto", embed_dim=16, image_size=32, pretrained=False
    ).eval()


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers of transformers' own test modules, which tests/integrations/families/test_hf_contract.py
    runs (the suite uses --strict-markers)."""
    from tests.support.hf_upstream import register_markers

    register_markers(config)
