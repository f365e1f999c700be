"""``connector_config_from_official``: official Dense Connector / LLaVA ``config.json`` files.

The config dicts below have the fields the official training code writes (LLaVA's
``LlavaConfig`` plus ``mm_dense_connector_type``, ``is_video``), with the values its scripts use:
a CLIP-L/336 Vicuna-7B run, the published SigLIP-so400m checkpoints (7B / 13B widths) and a
plain LLaVA-1.5 checkpoint.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.official_checkpoint import (
    KNOWN_TOWERS,
    connector_config_from_official,
    read_official_config,
)


def official_config(**changes) -> dict:
    """``config.json`` of a Dense Connector run (DCI, CLIP-L/336, Vicuna-7B)."""
    config = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "is_video": False,
        "mm_dense_connector_type": "dci",
        "mm_hidden_size": 3072,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    return {**config, **changes}


SIGLIP = {"mm_vision_tower": "google/siglip-so400m-patch14-384"}


@pytest.mark.parametrize(
    ("changes", "preset"),
    [
        ({"mm_dense_connector_type": "sti", "mm_hidden_size": 1024}, "dc-sti-clip-l-336"),
        ({"mm_dense_connector_type": "sci"}, "dc-sci-clip-l-336"),
        ({}, "dc-dci-clip-l-336"),
        (
            {**SIGLIP, "mm_dense_connector_type": "sti", "mm_hidden_size": 1152},
            "dc-sti-siglip-so400m",
        ),
        (
            {**SIGLIP, "mm_dense_connector_type": "sci", "mm_hidden_size": 3456},
            "dc-sci-siglip-so400m",
        ),
        ({**SIGLIP, "mm_hidden_size": 3456}, "dc-dci-siglip-so400m"),
    ],
)
def test_official_configs_give_the_presets(changes, preset):
    assert connector_config_from_official(official_config(**changes)) == (
        ConnectorConfig.from_preset(preset)
    )


def test_13b_llm_width():
    config = connector_config_from_official(
        official_config(hidden_size=5120, **SIGLIP, mm_hidden_size=3456)
    )
    assert config == ConnectorConfig.from_preset("dc-dci-siglip-so400m", llm_dim=5120)


def test_plain_llava_15_is_the_baseline():
    llava = official_config(mm_hidden_size=1024)
    del llava["mm_dense_connector_type"], llava["is_video"]
    assert connector_config_from_official(llava) == ConnectorConfig.from_preset(
        "baseline-clip-l-336"
    )
    for value in (None, "none"):
        assert (
            connector_config_from_official({**llava, "mm_dense_connector_type": value}).fusion.kind
            == "none"
        )


def test_siglip_branch_ignores_the_select_layer_as_the_official_tower_does():
    config = official_config(**SIGLIP, mm_hidden_size=3456, mm_vision_select_layer=-1)
    assert connector_config_from_official(config).fusion.final_layer == 26


def test_clip_select_layer_is_followed():
    config = connector_config_from_official(official_config(mm_vision_select_layer=-1))
    assert config.fusion.final_layer == 24  # hidden_states[-1] of 24 blocks
    assert config.fusion.groups == (tuple(range(12)), tuple(range(12, 24)))


def test_linear_projector_and_llava_default():
    assert (
        connector_config_from_official(official_config(mm_projector_type="linear")).projector.name
        == "linear"
    )
    config = official_config()
    del config["mm_projector_type"]
    assert connector_config_from_official(config).projector.name == "linear"  # LLaVA's default


def test_reads_a_file_and_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(official_config()))
    expected = ConnectorConfig.from_preset("dc-dci-clip-l-336")
    assert connector_config_from_official(tmp_path) == expected
    assert connector_config_from_official(tmp_path / "config.json") == expected
    assert read_official_config(str(tmp_path))["mm_dense_connector_type"] == "dci"


def test_unknown_tower_needs_explicit_depth_and_branch():
    local = official_config(mm_vision_tower="/data/clip-vit-large-patch14-336")  # no guessing
    with pytest.raises(
        ValueError,
        match=re.escape(
            "mm_vision_tower='/data/clip-vit-large-patch14-336' is not one of the known official "
            "towers (google/siglip-so400m-patch14-384, openai/clip-vit-large-patch14, "
            "openai/clip-vit-large-patch14-336): pass num_layers="
        ),
    ):
        connector_config_from_official(local)
    with pytest.raises(ValueError, match="pass num_layers"):
        connector_config_from_official(local, num_layers=24)  # the branch is needed too
    config = connector_config_from_official(local, num_layers=24, tower_branch="clip")
    assert config == ConnectorConfig.from_preset("dc-dci-clip-l-336")


def test_explicit_arguments_must_agree_with_a_known_tower():
    with pytest.raises(
        ValueError, match=r"num_layers=27 contradicts the known tower .* \(num_layers=24\)"
    ):
        connector_config_from_official(official_config(), num_layers=27)
    with pytest.raises(ValueError, match=r"tower_branch='siglip' contradicts"):
        connector_config_from_official(official_config(), tower_branch="siglip")
    with pytest.raises(
        ValueError, match=r"tower_branch must be one of \('clip', 'siglip'\), got 'vit'"
    ):
        connector_config_from_official(official_config(), tower_branch="vit")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"mm_dense_connector_type": "dense"},
            r"mm_dense_connector_type='dense' is not one the official code knows",
        ),
        (
            {"mm_hidden_size": 1024},
            r"mm_hidden_size=1024 must be 3 x the tower width for mm_dense_connector_type=.dci.",
        ),
        (
            {"mm_hidden_size": 3456},
            r"gives a tower width of 1152 for 'dci', but the known tower's width is 1024",
        ),
        (
            {"mm_vision_select_feature": "cls_patch"},
            r"mm_vision_select_feature='cls_patch' is not supported",
        ),
        ({"mm_vision_select_layer": 30}, r"mm_vision_select_layer"),
        ({"mm_projector_type": "cross_attn_x"}, r"unknown projector 'cross_attn_x'"),
    ],
)
def test_bad_fields(changes, message):
    with pytest.raises(ValueError, match=message):
        connector_config_from_official(official_config(**changes))


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            {"hidden_size": None},
            TypeError,
            r"^hidden_size must be a positive int, got None \(NoneType\); a field of the "
            r"checkpoint's config.json$",
        ),
        ({"hidden_size": 0}, ValueError, r"^hidden_size must be a positive int, got 0; a field"),
        (
            {"mm_vision_select_layer": "-2"},
            TypeError,
            r"^mm_vision_select_layer must be an int, got '-2' \(str\); a layer index",
        ),
    ],
)
def test_badly_typed_fields(changes, error, message):
    with pytest.raises(error, match=message):
        connector_config_from_official(official_config(**changes))


def test_explicit_num_layers_is_checked():
    local = official_config(mm_vision_tower="/data/tower")
    with pytest.raises(TypeError, match=r"^num_layers must be a positive int, got 24.0 \(float\)"):
        connector_config_from_official(local, num_layers=24.0, tower_branch="clip")
    with pytest.raises(ValueError, match=r"^num_layers must be a positive int, got 0; the blocks"):
        connector_config_from_official(local, num_layers=0, tower_branch="clip")


def test_explicit_vision_dim_is_checked():
    local = official_config(mm_vision_tower="/data/tower", mm_hidden_size=48)
    with pytest.raises(ValueError, match=r"tower width of 16 for 'dci', but vision_dim is 32"):
        connector_config_from_official(local, num_layers=24, tower_branch="clip", vision_dim=32)
    config = connector_config_from_official(
        local, num_layers=24, tower_branch="clip", vision_dim=16
    )
    assert config.vision_dim == 16


def test_bad_source_type():
    with pytest.raises(TypeError, match="got int"):
        connector_config_from_official(3)


def test_tiny_official_checkpoint_round_trip(tmp_path):
    """A tiny checkpoint in the official layout: its config builds the connector its
    ``mm_projector.bin`` (or a LoRA run's ``non_lora_trainables.bin``) loads into."""
    config = official_config(
        mm_vision_tower=str(tmp_path / "tower"), mm_hidden_size=48, hidden_size=32
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    weights = {
        "model.mm_projector.0.weight": torch.randn(32, 48),
        "model.mm_projector.0.bias": torch.randn(32),
        "model.mm_projector.2.weight": torch.randn(32, 32),
        "model.mm_projector.2.bias": torch.randn(32),
    }
    torch.save(
        {f"base_model.model.{k}": v for k, v in weights.items()},
        tmp_path / "non_lora_trainables.bin",
    )
    connector = DenseConnector(
        connector_config_from_official(tmp_path, num_layers=24, tower_branch="clip")
    )
    connector.load_projector_weights(tmp_path / "non_lora_trainables.bin")
    assert torch.equal(connector.projector[0].weight, weights["model.mm_projector.0.weight"])
    assert connector.num_tokens((24, 24)) == 576 and connector.fused_dim == 48


def test_known_towers_match_the_presets():
    for name, preset in [
        ("openai/clip-vit-large-patch14-336", "dc-dci-clip-l-336"),
        ("google/siglip-so400m-patch14-384", "dc-dci-siglip-so400m"),
    ]:
        fields = ConnectorConfig.from_preset(preset)
        assert (KNOWN_TOWERS[name].vision_dim, KNOWN_TOWERS[name].num_layers) == (
            fields.vision_dim,
            fields.num_layers,
        )
