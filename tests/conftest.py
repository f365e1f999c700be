"""Shared fixtures: tiny vision encoders built from configs (random weights, never downloaded).

Each fixture is one call of a builder of :mod:`mmconnect.integrations.applications.tiny_models`
(the one home of the tiny models; sizes in its docstrings): every builder seeds torch itself, so
two fixtures of the same kind hold identical weights, and returns its encoder in eval mode and
fp32; tests that need another mode or dtype change their own copy. Transformers, timm and
open_clip are imported lazily (a fixture skips its test when its library is missing), so tests of
the core need none of them.
"""

from __future__ import annotations

import pytest


def _tiny_models():
    """The builders' module, imported on first use (importing ``mmconnect.integrations`` loads
    transformers when it is installed, which tests of the core do not need)."""
    from mmconnect.integrations.applications import tiny_models

    return tiny_models


@pytest.fixture
def tiny_clip_vision():
    """HF ``CLIPVisionModel``: 4 blocks, width 32, 1 CLS + 3 x 3 patch tokens."""
    pytest.importorskip("transformers")
    return _tiny_models().tiny_vision_tower("clip")


@pytest.fixture
def tiny_siglip_vision():
    """HF ``SiglipVisionModel``: 4 blocks, width 32, 3 x 3 patch tokens, no prefix token."""
    pytest.importorskip("transformers")
    return _tiny_models().tiny_vision_tower("siglip")


@pytest.fixture
def tiny_clip_model():
    """HF ``CLIPModel`` (vision + text towers): vision blocks at ``vision_model.encoder.layers``."""
    pytest.importorskip("transformers")
    return _tiny_models().tiny_clip_model()


@pytest.fixture
def tiny_timm_vit_reg():
    """timm ``VisionTransformer`` with a CLS and 4 register tokens: 3 blocks, width 32."""
    pytest.importorskip("timm")
    return _tiny_models().tiny_timm_vit_reg()


@pytest.fixture
def tiny_timm_convnext():
    """timm ``ConvNeXt``: 4 stages of one block (widths 8..32), total stride 32."""
    pytest.importorskip("timm")
    return _tiny_models().tiny_timm_convnext()


@pytest.fixture
def tiny_openclip_vit():
    """open_clip ``VisionTransformer``: 3 blocks, width 32, 1 CLS + 3 x 3 patch tokens."""
    pytest.importorskip("open_clip")
    return _tiny_models().tiny_openclip_vit()


@pytest.fixture
def tiny_openclip_clip():
    """open_clip ``CLIP`` (image + text): vision blocks at ``visual.transformer.resblocks``, its
    text tower's blocks at the top-level ``transformer.resblocks``."""
    pytest.importorskip("open_clip")
    return _tiny_models().tiny_openclip_clip()


@pytest.fixture
def tiny_openclip_convnext():
    """open_clip ``TimmModel`` around a timm ``convnext_atto`` trunk (blocks at ``trunk.stages``)."""
    pytest.importorskip("open_clip")
    return _tiny_models().tiny_openclip_convnext()


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers of transformers' own test modules, which tests/integrations/families/test_hf_contract.py
    runs (the suite uses --strict-markers)."""
    from tests.support.hf_upstream import register_markers

    register_markers(config)
