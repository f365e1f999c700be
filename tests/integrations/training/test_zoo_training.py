"""Every registered connector trains like the Dense Connector: stage 1 trains exactly its own
parameters (learned queries, norms and position embeddings included) with the tower and the LLM
frozen, and LoRA stage 2 keeps all of it trainable beside the adapters and saves it with them."""

from __future__ import annotations

import pytest
import torch

from mmconnect import ConnectorConfig, DCISpec, list_projectors
from mmconnect.integrations.applications.tiny_models import IMAGE, tiny_dense_llava
from mmconnect.integrations.families.protocol import family_model
from mmconnect.integrations.training.stages import (
    LoraSettings,
    StageConfig,
    parameter_groups,
    prepare_stage,
)
from tests.support.zoo_specs import PROJECTOR_SPECS

VISION, LLM = 16, 32  # the tiny Dense LLaVA's widths: CLIP 4 blocks on a 4x4 grid, Llama 32 wide
FUSION = DCISpec(groups=((1, 2), (3, 4)))


#: Every registered kind with parameters (``identity`` has none to train).
TRAINABLE = sorted(set(PROJECTOR_SPECS) - {"identity"})


def _model(kind: str) -> torch.nn.Module:
    connector = ConnectorConfig(
        vision_dim=VISION, llm_dim=LLM, num_layers=4, fusion=FUSION, projector=PROJECTOR_SPECS[kind]
    )
    return tiny_dense_llava(connector=connector).train()


def _loss(model: torch.nn.Module) -> torch.Tensor:
    inner = family_model(model)
    tokens = inner.image_token_count()
    ids = torch.tensor([[1, 8, *[IMAGE] * tokens, 9, 10]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, pixel_values=pixels, labels=ids).loss


def test_every_registered_kind_is_covered():
    assert sorted(PROJECTOR_SPECS) == sorted(list_projectors())


@pytest.mark.parametrize("kind", TRAINABLE)
def test_stage1_trains_exactly_the_connector(kind, tmp_path):
    model = prepare_stage(_model(kind), StageConfig(stage="align", output_dir=str(tmp_path)))
    connector = family_model(model).connector
    groups = parameter_groups(model)
    assert groups["connector"][0] == groups["connector"][1] > 0
    assert groups["vision_tower"][0] == 0 and groups["llm"][0] == 0
    _loss(model).backward()
    # Every parameter of the connector (queries, norms, position embeddings) learns; nothing else.
    for name, parameter in model.named_parameters():
        owned = any(parameter is p for p in connector.parameters())
        assert parameter.requires_grad == owned, name
        if owned:
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.parametrize("kind", sorted(set(PROJECTOR_SPECS) - {"identity", "linear", "mlp"}))
def test_lora_stage2_keeps_the_connector_trainable(kind, tmp_path):
    pytest.importorskip("peft")
    stage = StageConfig(
        stage="instruct",
        output_dir=str(tmp_path),
        lora=LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj")),
    )
    model = prepare_stage(_model(kind), stage)
    groups = parameter_groups(model)
    assert groups["lora"][0] > 0 and groups["llm"][0] == 0 and groups["vision_tower"][0] == 0
    # PEFT trains a copy of the connector saved beside the adapters (modules_to_save) and keeps
    # the original frozen: every parameter of the copy trains.
    copy = [
        (name, parameter)
        for name, parameter in model.named_parameters()
        if "multi_modal_projector.modules_to_save" in name
    ]
    assert copy and all(parameter.requires_grad for _, parameter in copy)
    assert sum(p.numel() for _, p in copy) == groups["connector"][0] == groups["connector"][1] // 2
    _loss(model).backward()
    trained = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not trained, f"trainable parameters without a gradient: {trained[:5]}"
