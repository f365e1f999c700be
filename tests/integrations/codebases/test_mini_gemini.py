"""The adapter for the original Mini-Gemini codebase, tested on a model object with MGM's structure
and calling pattern: ``get_model()`` holding ``vision_tower`` (a wrapper around an HF CLIP that
returns one layer), ``vision_tower_aux`` (a wrapper returning the concatenated ConvNeXt map),
``mm_projector`` and the three ``vlm_uni_*`` mining projections; ``encode_images(images,
images_aux)`` and ``unified_resampler`` as MGM computes them (HD: crops then global in the tower
batch, global view first in the output)."""

from __future__ import annotations

import types

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.integrations.codebases.mini_gemini import swap_connector
from mmconnect.integrations.families.mini_gemini_vision import MGMVisionPath, PatchInfoMining

WIDTH, LLM = 16, 24


class CLIPTower(nn.Module):
    """MGM's ``CLIPVisionTower``: the HF model in ``vision_tower``, layer -2 without CLS."""

    def __init__(self, model: CLIPVisionModel) -> None:
        super().__init__()
        self.vision_tower = model
        self.hidden_size = model.config.hidden_size

    def forward(self, images):
        states = self.vision_tower(images, output_hidden_states=True).hidden_states
        return states[-2][:, 1:]


class ConvNeXtAux(nn.Module):
    """MGM's aux tower: stem + stages, every stage upsampled to the first and concatenated."""

    def __init__(self, trunk) -> None:
        super().__init__()
        self.vision_stem, self.vision_stages = trunk.stem, trunk.stages
        self.hidden_size = sum(stage.blocks[-1].conv_dw.out_channels for stage in trunk.stages)

    def forward(self, images):
        x, outputs = self.vision_stem(images), []
        for stage in self.vision_stages:
            x = stage(x)
            outputs.append(x)
        size = outputs[0].shape[-2:]
        return torch.cat(
            [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outputs],
            dim=1,
        )


def _projection(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, width_out))


class Inner(nn.Module):
    def __init__(self, clip, convnext) -> None:
        super().__init__()
        self.vision_tower, self.vision_tower_aux = CLIPTower(clip), ConvNeXtAux(convnext)
        aux = self.vision_tower_aux.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(WIDTH, LLM), nn.GELU(), nn.Linear(LLM, LLM))
        self.vlm_uni_query_projector = _projection(WIDTH, WIDTH)
        self.vlm_uni_aux_projector = _projection(aux, WIDTH)
        self.vlm_uni_val_projector = _projection(aux, WIDTH)

    def get_vision_tower(self):
        return self.vision_tower

    def get_vision_tower_aux(self):
        return self.vision_tower_aux


class MGMStyleModel(nn.Module):
    """The causal-LM object's image path, following MGM's calling pattern."""

    def __init__(self, clip, convnext, image_grid: int = 1, image_global: bool = False) -> None:
        super().__init__()
        self.model = Inner(clip, convnext)
        self.config = types.SimpleNamespace(image_grid=image_grid, image_global=image_global)

    def get_model(self):
        return self.model

    def encode_images(self, images, images_aux=None):
        grid, with_global = self.config.image_grid, self.config.image_global
        if grid > 1:
            batch = images.shape[0]
            if with_global:
                global_images = images[:, -1:].flatten(0, 1)
                grid_images = images[:, :-1].flatten(0, 1)
                images = torch.cat([grid_images, global_images], dim=0)
            else:
                images = images.flatten(0, 1)
        features = self.get_model().get_vision_tower()(images)
        if with_global:
            global_features = features[-len(global_images) :]
            features = features[: len(grid_images)]
        if images_aux is not None:
            aux = self.get_model().get_vision_tower_aux()(images_aux)
            if with_global:
                aux_global = F.interpolate(
                    aux, scale_factor=1 / grid, mode="bilinear", align_corners=False
                )
                global_features, global_mined = self.unified_resampler(global_features, aux_global)
            if grid > 1:
                b, c, h, w = aux.shape
                aux = aux.reshape(b, c, grid, h // grid, grid, w // grid)
                aux = aux.permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
            features, mined = self.unified_resampler(features, aux)
            if grid > 1:
                features = features.reshape(batch, grid**2 * features.shape[1], -1)
                mined = mined.reshape(batch, grid**2 * mined.shape[1], -1)
            if with_global:
                features = torch.cat([global_features, features], dim=1)
                mined = torch.cat([global_mined, mined], dim=1)
            features = features + mined
        return self.get_model().mm_projector(features)

    def unified_resampler(self, images, images_aux):
        side = int(images.shape[1] ** 0.5)
        cell = images_aux.shape[-1] // side
        windows = images_aux.permute(0, 2, 3, 1).reshape(
            len(images_aux), side, cell, side, cell, -1
        )
        windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(len(images_aux), side**2, cell**2, -1)
        query = self.get_model().vlm_uni_query_projector(images)
        key = self.get_model().vlm_uni_aux_projector(windows)
        value = self.get_model().vlm_uni_val_projector(windows)
        attention = query[:, :, None] @ (key.transpose(-1, -2) / key.shape[-1] ** 0.5)
        return images, (attention.nan_to_num().softmax(-1) @ value).mean(2)


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=WIDTH,
            intermediate_size=32,
            num_hidden_layers=24,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
        )
    ).eval()
    convnext = timm.create_model(
        "convnext_atto", pretrained=False, num_classes=0, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)
    ).eval()
    return clip.requires_grad_(False), convnext.requires_grad_(False)


def reference_path(model: MGMStyleModel, connector: DenseConnector, placement="after"):
    """mmconnect's own MGM vision path with the MGM-style model's towers and mining weights."""
    config = model.config
    path = MGMVisionPath(
        model.model.vision_tower.vision_tower,
        TrunkView(model.model.vision_tower_aux),
        connector,
        lr_size=336,
        placement=placement,
        image_grid=config.image_grid,
        image_global=config.image_global,
    )
    mining: PatchInfoMining = path.mining
    mining.query.load_state_dict(model.model.vlm_uni_query_projector.state_dict())
    mining.key.load_state_dict(model.model.vlm_uni_aux_projector.state_dict())
    mining.value.load_state_dict(model.model.vlm_uni_val_projector.state_dict())
    return path


class TrunkView(nn.Module):
    """The aux tower's stem and stages seen as a timm ConvNeXt trunk (shared, not copied)."""

    def __init__(self, aux: ConvNeXtAux) -> None:
        super().__init__()
        self.stem, self.stages = aux.vision_stem, aux.vision_stages
        self.feature_info = [
            {"num_chs": stage.blocks[-1].conv_dw.out_channels} for stage in aux.vision_stages
        ]

    def forward(self, images):
        return self.stages(self.stem(images))


def mgm_inputs(hr_size: int, grid: int, with_global: bool, seed: int = 1):
    """MGM's data pipeline: the LR images are bilinear downsamples of the normalised HR image."""
    hr = torch.randn(2, 3, hr_size, hr_size, generator=torch.Generator().manual_seed(seed))
    if grid == 1:
        return F.interpolate(hr, size=(336, 336), mode="bilinear", align_corners=False), hr
    large = F.interpolate(hr, size=(336 * grid,) * 2, mode="bilinear", align_corners=False)
    crops = large.reshape(2, 3, grid, 336, grid, 336).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
    views = [crops]
    if with_global:
        glance = F.interpolate(large, size=(336, 336), mode="bilinear", align_corners=False)
        views.append(glance[:, None])
    return torch.cat(views, dim=1), hr


@pytest.mark.parametrize(("hr_size", "grid", "with_global"), [(768, 1, False), (1536, 2, True)])
def test_unchanged_mgm_equals_mmconnects_vision_path(towers, hr_size, grid, with_global):
    """Before any swap: mmconnect's MGM path (baseline connector) reproduces MGM's numbers."""
    torch.manual_seed(2)
    model = MGMStyleModel(*towers, image_grid=grid, image_global=with_global)
    baseline = DenseConnector(
        ConnectorConfig.from_preset("baseline-clip-l-336", vision_dim=WIDTH, llm_dim=LLM)
    )
    baseline.load_projector_weights(
        {f"mm_projector.{k}": v for k, v in model.model.mm_projector.state_dict().items()}
    )
    images, hr = mgm_inputs(hr_size, grid, with_global)
    with torch.no_grad():
        expected = model.encode_images(images, hr)
        actual = reference_path(model, baseline)(hr)
    assert expected.shape == (2, (grid**2 + with_global) * 576, LLM)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("hr_size", "grid", "with_global"), [(768, 1, False), (1536, 2, True)])
@pytest.mark.parametrize("preset", ["dc-dci-clip-l-336", "dc-sci-clip-l-336"])
def test_swapped_connector_after_mining(towers, hr_size, grid, with_global, preset):
    torch.manual_seed(3)
    model = MGMStyleModel(*towers, image_grid=grid, image_global=with_global)
    connector = DenseConnector(ConnectorConfig.from_preset(preset, vision_dim=WIDTH, llm_dim=LLM))
    query = model.model.vlm_uni_query_projector
    swap_connector(model, connector)
    assert model.model.mm_projector is connector
    assert model.model.vlm_uni_query_projector is query  # mining untouched after
    assert model.config.mm_dense_connector == connector.config.to_dict()
    images, hr = mgm_inputs(hr_size, grid, with_global, seed=4)
    with torch.no_grad():
        actual = model.encode_images(images, hr)
        expected = reference_path(model, connector)(hr)
    assert actual.shape == (2, (grid**2 + with_global) * 576, LLM)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_swapped_connector_before_mining_rebuilds_the_projections(towers, caplog):
    torch.manual_seed(5)
    model = MGMStyleModel(*towers, image_grid=2, image_global=True)
    connector = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=WIDTH, llm_dim=LLM)
    )
    swap_connector(model, connector, placement="before")
    assert "new untrained vlm_uni projections" in caplog.text
    assert model.model.vlm_uni_query_projector[-1].in_features == 3 * WIDTH
    assert model.model.vlm_uni_val_projector[-1].out_features == 3 * WIDTH
    images, hr = mgm_inputs(1536, 2, True, seed=6)
    tokens = model.encode_images(images, hr)
    with torch.no_grad():
        expected = reference_path(model, connector, placement="before")(hr)
    assert_close(tokens.detach(), expected, atol=1e-5, rtol=1e-5)
    tokens.square().mean().backward()
    assert all(p.grad is not None for p in model.model.vlm_uni_query_projector.parameters())
    assert all(p.grad is not None for p in connector.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_without_aux_images_no_mining(towers):
    model = MGMStyleModel(*towers)
    connector = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=WIDTH, llm_dim=LLM)
    )
    swap_connector(model, connector)
    images, _ = mgm_inputs(768, 1, False)
    with torch.no_grad():
        tap = connector.make_tap(model.model.vision_tower.vision_tower)
        expected = connector(tap(images), (24, 24))
        assert_close(model.encode_images(images), expected)


def test_bad_models_and_connectors(towers):
    connector = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=WIDTH, llm_dim=LLM)
    )
    with pytest.raises(ValueError, match="Linear has no 'get_model'"):
        swap_connector(nn.Linear(2, 2), connector)
    model = MGMStyleModel(*towers)
    del model.model.vlm_uni_val_projector
    with pytest.raises(ValueError, match="has no 'vlm_uni_val_projector': not an MGM model"):
        swap_connector(model, connector)
    wide = DenseConnector(
        ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=32, llm_dim=LLM)
    )
    with pytest.raises(
        ValueError, match=r"vision_dim=32 does not match the CLIP tower's hidden_size \(16\)"
    ):
        swap_connector(MGMStyleModel(*towers), wide)
    with pytest.raises(ValueError, match="placement must be 'after' or 'before'"):
        swap_connector(MGMStyleModel(*towers), connector, placement="middle")
