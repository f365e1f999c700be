"""The adapter for the original Mini-Gemini codebase, tested on a model object with MGM's structure
and calling pattern (tests/support/mini_gemini_codebase_toys.py): ``get_model()`` holding
``vision_tower`` (a wrapper around an HF CLIP that returns one layer), ``vision_tower_aux`` (a
wrapper returning the concatenated ConvNeXt map), ``mm_projector`` and the three ``vlm_uni_*``
mining projections; ``encode_images(images, images_aux)`` and ``unified_resampler`` as MGM
computes them (HD: crops then global in the tower batch, global view first in the output)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.integrations.codebases.mini_gemini import swap_connector
from mmconnect.integrations.families.mini_gemini_vision import MGMVisionPath, PatchInfoMining
from tests.support import mini_gemini_codebase_toys
from tests.support.mini_gemini_codebase_toys import (
    LLM,
    WIDTH,
    ConvNeXtAux,
    MGMStyleModel,
    mgm_inputs,
)


@pytest.fixture(scope="module")
def towers():
    return mini_gemini_codebase_toys.towers()


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
    with pytest.raises(ValueError, match=r"placement must be one of \('after', 'before'\)"):
        swap_connector(MGMStyleModel(*towers), connector, placement="middle")
