"""The family protocol's registry and lookups: what training, chat, run files and conversion use
to reach any Dense model (the per-family behaviour is in test_family_contract.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from mmconnect.integrations.applications.tiny_models import tiny_dense_llava
from mmconnect.integrations.families import llava, llava_next, mini_gemini, protocol
from mmconnect.integrations.families.protocol import (
    convert_to_dense,
    family_model,
    generation_model,
    get_family,
    list_families,
    register_family,
)
from tests.support.llava_next_toys import CONNECTORS, llava_next_config


@pytest.fixture
def families(monkeypatch):
    """A copy of the family registry, so registrations here stay here."""
    monkeypatch.setattr(protocol, "_FAMILIES", protocol._FAMILIES.copy())


#: Every family module of the package and the model_type it registers.
EXPECTED_FAMILIES = {
    "dense_gemma3",
    "dense_idefics3",
    "dense_internvl",
    "dense_llava",
    "dense_llava_next",
    "dense_llava_onevision",
    "dense_mgm",
    "dense_qwen2_5_vl",
    "dense_qwen3_vl",
    "dense_smolvlm",
}


def test_every_family_module_registers_its_family_on_import():
    assert set(list_families()) == EXPECTED_FAMILIES
    assert len(list_families()) == len(EXPECTED_FAMILIES)
    assert get_family("dense_llava") is llava.FAMILY
    assert get_family("dense_mgm").source_class is None
    assert get_family("dense_llava_next").fixed_image_tokens is False
    with pytest.raises(
        ValueError, match=r"no Dense model family has model_type 'llava'.*dense_mgm"
    ):
        get_family("llava")


def test_registration_is_idempotent_and_refuses_another_family_under_a_taken_name(families):
    register_family(llava.FAMILY)  # the module imported again: nothing changes
    assert list_families().count("dense_llava") == 1
    other = dataclasses.replace(llava.FAMILY, description="someone else's")
    with pytest.raises(ValueError, match="dense_llava"):
        register_family(other)


def test_registration_checks_the_family(families):
    with pytest.raises(ValueError, match="source_class and convert go together"):
        register_family(dataclasses.replace(llava.FAMILY, model_type="x1", convert=None))
    plain = dataclasses.replace(llava.FAMILY, model_type="x2", model_class=torch.nn.Linear)
    with pytest.raises(ValueError, match="Linear must implement DenseFamilyModel"):
        register_family(plain)
    assert "x1" not in list_families() and "x2" not in list_families()


def test_family_model_reaches_the_inner_model_through_wrappers():
    peft = pytest.importorskip("peft")
    model = tiny_dense_llava()
    assert family_model(model) is model.model
    assert family_model(model.model) is model.model
    wrapped = peft.get_peft_model(
        model,
        peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["multi_modal_projector"]),
    )
    assert family_model(wrapped) is wrapped.get_base_model().model
    assert generation_model(wrapped) is wrapped
    with pytest.raises(TypeError, match="Linear is not a Dense model of a registered family"):
        family_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a DenseLlavaForConditionalGeneration"):
        generation_model(model.model)


def test_convert_to_dense_picks_the_family_of_the_stock_class():
    torch.manual_seed(0)
    stock_next = LlavaNextForConditionalGeneration(llava_next_config()).eval()
    dense_next = convert_to_dense(stock_next, CONNECTORS["dci"])
    assert type(dense_next) is llava_next.DenseLlavaNextForConditionalGeneration
    assert dense_next.model.vision_tower is stock_next.model.vision_tower
    dense = tiny_dense_llava()
    stock = LlavaForConditionalGeneration(
        LlavaConfig(
            **{
                key: value
                for key, value in dense.config.to_dict().items()
                if key not in ("connector", "model_type", "architectures", "transformers_version")
            }
        )
    ).eval()
    connector = dense.connector.config
    converted = convert_to_dense(stock, connector)
    assert type(converted) is llava.DenseLlavaForConditionalGeneration
    with pytest.raises(
        TypeError, match=r"no registered family converts a Linear.*LlavaForConditionalGeneration"
    ):
        convert_to_dense(torch.nn.Linear(2, 2), connector)


def test_mini_gemini_has_no_stock_class_but_implements_the_protocol():
    from tests.support.mini_gemini_toys import build

    model = build()
    inner = family_model(model)
    assert isinstance(inner, mini_gemini.DenseMGMModel)
    assert list(inner.vision_towers()) == ["vision_tower", "vision_tower_aux"]
    assert inner.tapped_tower() is inner.vision_tower
    assert list(inner.connector_modules()) == ["multi_modal_projector", "mining"]
    geometry = inner.tower_geometry()
    assert (geometry.width, geometry.depth, geometry.grid, geometry.prefix_tokens) == (
        16,
        24,
        (24, 24),
        1,
    )
    assert inner.image_token_count() == 576 == model.config.image_seq_length
