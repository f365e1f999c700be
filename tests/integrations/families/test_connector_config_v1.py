"""A Dense LLaVA saved with connector config format 1 (tests/fixtures/config_v1/dense_llava_dci,
written by the format-1 code) loads with its weights and outputs, and its fingerprint still
refuses an edited connector config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from mmconnect import ConnectorConfig, DCISpec
from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration

FIXTURES = Path(__file__).parents[2] / "fixtures" / "config_v1"
SAVED = FIXTURES / "dense_llava_dci"


@pytest.mark.parametrize("load", ["class", "auto"])
def test_format1_dense_llava_loads_with_its_weights_and_outputs(load):
    assert json.loads((SAVED / "config.json").read_text())["connector"]["format_version"] == 1
    loader = DenseLlavaForConditionalGeneration if load == "class" else AutoModelForImageTextToText
    model = loader.from_pretrained(SAVED).eval()
    assert model.config.connector["format_version"] == 2  # upgraded when the config is read
    assert model.config.connector_config == ConnectorConfig(
        vision_dim=16, llm_dim=32, num_layers=4, fusion=DCISpec(groups=((0, 1), (2, 3)))
    )
    saved = load_file(SAVED / "model.safetensors")
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    recorded = load_file(FIXTURES / "dense_llava_dci_io.safetensors")
    with torch.no_grad():
        logits = model(
            input_ids=recorded["input_ids"], pixel_values=recorded["pixel_values"]
        ).logits
    # Recorded on another CPU: the same weights and inputs, the matrix kernels' bits may differ.
    torch.testing.assert_close(logits, recorded["logits"], atol=1e-5, rtol=1e-5)


def test_format1_dense_llava_saved_again_is_format2(tmp_path):
    model = DenseLlavaForConditionalGeneration.from_pretrained(SAVED).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["connector"]["format_version"] == 2
    again = DenseLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.connector_config == model.config.connector_config


@pytest.mark.parametrize(
    "changes",
    [
        {"groups": [[0, 2], [1, 3]]},
        {"final_layer": -1},
        {"fusion": "sci", "groups": [], "layers": [0, 1]},
    ],
    ids=["other-groups", "other-final-layer", "sci-same-shapes"],
)
def test_format1_dense_llava_under_an_edited_config_is_refused(tmp_path, changes):
    """Every shape still fits: only the fingerprint saved by the format-1 code can tell."""
    directory = tmp_path / "edited"
    shutil.copytree(SAVED, directory)
    data = json.loads((directory / "config.json").read_text())
    data["connector"].update(changes)
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="saved with a different connector config"):
        AutoModelForImageTextToText.from_pretrained(directory)
