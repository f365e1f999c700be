"""Mini-Gemini vision path: window-local patch info mining and the Dense Connector placements."""

from __future__ import annotations

import pytest
import timm
import torch

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.integrations.applications.tiny_models import tiny_vision_tower
from mmconnect.integrations.families.mini_gemini_vision import (
    MGMVisionPath,
    PatchInfoMining,
    check_views,
    convnext_hr_features,
)

WIDTH, LLM = 16, 24


@pytest.fixture(scope="module")
def towers():
    clip = tiny_vision_tower(
        "clip", seed=0, blocks=24, width=WIDTH, intermediate_size=32, heads=2, image_size=336
    )
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()
    clip.requires_grad_(False)
    convnext.requires_grad_(False)
    return clip, convnext


HR_CHANNELS = 40 + 80 + 160 + 320  # convnext_atto stage widths


def test_hr_features_at_768_are_the_upsampled_stage_concatenation(towers):
    _, convnext = towers
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hr = convnext_hr_features(convnext, pixels)
        stem = convnext.stem(pixels)
        first = convnext.stages[0](stem)
        second = convnext.stages[1](first)
    assert hr.shape == (1, HR_CHANNELS, 192, 192)
    torch.testing.assert_close(hr[:, :40], first)
    upsampled = torch.nn.functional.interpolate(
        second, size=(192, 192), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(hr[:, 40:120], upsampled)


def test_mining_is_window_local():
    torch.manual_seed(0)
    mining = PatchInfoMining(8, 12)
    lr = torch.randn(1, 4 * 4, 8)
    hr = torch.randn(1, 12, 32, 32)  # 8x8 HR cells under each of the 4x4 LR tokens
    before = mining(lr, hr, (4, 4))
    changed = hr.clone()
    changed[:, :, 8:16, 16:24] = torch.randn(1, 12, 8, 8)  # the window of LR token (1, 2)
    after = mining(lr, changed, (4, 4))
    moved = (after - before).abs().amax(dim=-1)[0].reshape(4, 4)
    assert moved[1, 2] > 1e-3
    moved[1, 2] = 0
    assert moved.max() == 0


def test_mining_matches_the_reference_formula():
    torch.manual_seed(0)
    mining = PatchInfoMining(8, 12)
    lr, hr = torch.randn(2, 4, 8), torch.randn(2, 12, 6, 6)
    out = mining(lr, hr, (2, 2))
    for b in range(2):
        for i in range(2):
            for j in range(2):
                window = hr[b, :, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3].reshape(12, 9).T  # [9, 12]
                q = mining.query(lr[b, 2 * i + j])
                k, v = mining.key(window), mining.value(window)
                attention = torch.softmax(k @ q / 8**0.5, dim=0)
                torch.testing.assert_close(out[b, 2 * i + j], lr[b, 2 * i + j] + attention @ v)


@pytest.mark.parametrize(
    ("preset", "placement", "mining_width"),
    [
        ("baseline-clip-l-336", "after", WIDTH),
        ("dc-dci-clip-l-336", "after", WIDTH),
        ("dc-dci-clip-l-336", "before", 3 * WIDTH),
        ("dc-sci-clip-l-336", "before", 3 * WIDTH),
    ],
)
def test_vision_path_shapes_placements_and_gradients(towers, preset, placement, mining_width):
    clip, convnext = towers
    torch.manual_seed(3)
    connector = DenseConnector(ConnectorConfig.from_preset(preset, vision_dim=WIDTH, llm_dim=LLM))
    path = MGMVisionPath(
        clip, convnext, connector, hr_channels=HR_CHANNELS, lr_size=336, placement=placement
    )
    assert path.mining.lr_dim == mining_width
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(4))
    tokens = path(pixels)
    assert tokens.shape == (1, 576, LLM)
    tokens.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in path.mining.parameters())
    assert all(p.grad is not None for p in connector.projector.parameters())
    assert all(p.grad is None for p in [*clip.parameters(), *convnext.parameters()])


def test_after_placement_equals_mining_then_connector(towers):
    clip, convnext = towers
    torch.manual_seed(5)
    connector = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=WIDTH, llm_dim=LLM)
    )
    path = MGMVisionPath(clip, convnext, connector, hr_channels=HR_CHANNELS, lr_size=336)
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        lr = torch.nn.functional.interpolate(
            pixels, size=(336, 336), mode="bilinear", align_corners=False
        )
        states = clip(lr, output_hidden_states=True).hidden_states
        h = [state[:, 1:] for state in states]
        mined = path.mining(h[23], convnext_hr_features(convnext, pixels), (24, 24))
        g1 = torch.stack(h[0:12]).sum(0) / 12
        g2 = torch.stack(h[12:24]).sum(0) / 12
        expected = connector.projector(torch.cat([mined, g1, g2], dim=-1))
        torch.testing.assert_close(path(pixels), expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs(towers):
    clip, convnext = towers
    connector = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=WIDTH, llm_dim=LLM)
    )
    mining = PatchInfoMining(8, 12)
    with pytest.raises(ValueError, match=r"HR map 30x30 is not a multiple of the LR grid 4x4"):
        mining(torch.randn(1, 16, 8), torch.randn(1, 12, 30, 30), (4, 4))
    with pytest.raises(
        ValueError,
        match=r"HR features have 10 channels but the mining projections expect hr_dim=12",
    ):
        mining(torch.randn(1, 16, 8), torch.randn(1, 10, 32, 32), (4, 4))
    with pytest.raises(ValueError, match="different normalisation statistics"):
        MGMVisionPath(
            clip,
            convnext,
            connector,
            hr_channels=HR_CHANNELS,
            lr_size=336,
            lr_normalization=(
                (0.48145466, 0.4578275, 0.40821073),
                (0.26862954, 0.26130258, 0.27577711),
            ),
            hr_normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        )
    wide = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=32, llm_dim=LLM)
    )
    with pytest.raises(
        ValueError,
        match=r"connector vision_dim=32 does not match the LR tower's hidden_size \(16\)",
    ):
        MGMVisionPath(clip, convnext, wide, hr_channels=HR_CHANNELS, lr_size=336)
    efficient = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336-efficient", vision_dim=WIDTH, llm_dim=LLM)
    )
    with pytest.raises(ValueError, match="placement='before' mines on the encoder grid"):
        MGMVisionPath(
            clip, convnext, efficient, hr_channels=HR_CHANNELS, lr_size=336, placement="before"
        )


def test_open_clip_convnext_trunk_and_derived_width():
    """open_clip's ``TimmModel`` (the shape of MGM's ``convnext_large_d_320``) works through its
    ``trunk``; the HR width comes from the stages (ConvNeXt-L: 2880, not 3072)."""
    from open_clip.timm_model import TimmModel

    from mmconnect.integrations.families.mini_gemini_vision import hr_map_width, stage_widths

    torch.manual_seed(0)
    wrapped = TimmModel("convnext_atto", embed_dim=16, image_size=64, pool="", proj="mlp").eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(
            convnext_hr_features(wrapped, pixels), convnext_hr_features(wrapped.trunk, pixels)
        )
    assert hr_map_width(wrapped) == HR_CHANNELS
    with torch.device("meta"):
        large = timm.create_model("convnext_large", pretrained=False, num_classes=0)
    assert stage_widths(large) == [192, 384, 768, 1536]
    assert hr_map_width(large) == 2880
    with pytest.raises(ValueError, match="must be a timm ConvNeXt"):
        hr_map_width(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("image_grid", "image_global", "error", "message"),
    [
        (0, False, ValueError, r"image_grid must be a positive int, got 0; 1, or 2 for HD"),
        (2.0, False, TypeError, r"image_grid must be a positive int, got 2.0 \(float\)"),
        ("2", True, TypeError, r"image_grid must be a positive int, got '2' \(str\)"),
        (2, 1, TypeError, r"image_global must be a bool \(True or False\), got 1 \(int\)"),
        (1, True, ValueError, "image_global=True adds a global view"),
    ],
)
def test_check_views_follows_the_argument_rule(image_grid, image_global, error, message):
    assert check_views(2, True) == 5 and check_views(1, False) == 1
    with pytest.raises(error, match=message):
        check_views(image_grid, image_global)
