"""``ConnectorConfig``: validation, serialisation, presets (docs/concepts.md, Presets)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

import mmconnect
from mmconnect import ConnectorConfig, list_presets, list_projectors
from mmconnect.config import FORMAT_VERSION

BASE = {"vision_dim": 8, "llm_dim": 16, "num_layers": 24}

CLIP = {"vision_dim": 1024, "llm_dim": 4096, "num_layers": 24, "final_layer": 23}
SIGLIP = {"vision_dim": 1152, "llm_dim": 4096, "num_layers": 27, "final_layer": 26}
STI = {"fusion": "sti", "layers": (7, 15), "sti_window": 8, "sti_pool": "raster"}
SCI = {"fusion": "sci", "layers": (7, 15)}
CLIP_GROUPS = (tuple(range(0, 12)), tuple(range(12, 24)))  # H[0..11], H[12..23]
SIGLIP_GROUPS = (tuple(range(0, 13)), tuple(range(13, 26)))  # H[0..12], H[13..25]

#: Every preset written out from docs/concepts.md (Presets), field by field (defaults spelled out too).
EXPECTED_PRESETS = {
    "baseline-clip-l-336": {**CLIP, "fusion": "none"},
    "dc-sti-clip-l-336": {**CLIP, **STI},
    "dc-sci-clip-l-336": {**CLIP, **SCI},
    "dc-dci-clip-l-336": {**CLIP, "fusion": "dci", "groups": CLIP_GROUPS},
    "dc-dci-clip-l-336-efficient": {
        **CLIP,
        "fusion": "dci",
        "groups": CLIP_GROUPS,
        "resample_grid": (12, 12),
        "resample_mode": "bilinear",
        "resample_placement": "before_projector",
    },
    "dc-sti-siglip-so400m": {**SIGLIP, **STI},
    "dc-sci-siglip-so400m": {**SIGLIP, **SCI},
    "dc-dci-siglip-so400m": {**SIGLIP, "fusion": "dci", "groups": SIGLIP_GROUPS},
}
DEFAULTS = {
    "layers": (),
    "groups": (),
    "sti_window": 8,
    "sti_pool": "raster",
    "resample_grid": None,
    "resample_mode": "bilinear",
    "resample_placement": "before_projector",
    "projector": "mlp2x_gelu",
    "accumulate_dtype": None,
    "format_version": 1,
}


def _config(**changes) -> ConnectorConfig:
    return ConnectorConfig(**{**BASE, "fusion": "sci", "layers": (7, 15), **changes})


# ---------------------------------------------------------------------------- validation

BAD_CONFIGS = [
    # (changes, exception, message)
    (
        {"fusion": "dense"},
        ValueError,
        r"fusion must be one of \('none', 'sti', 'sci', 'dci'\), got 'dense'",
    ),
    ({"vision_dim": 0}, ValueError, "vision_dim must be a positive int, got 0"),
    ({"llm_dim": -4}, ValueError, "llm_dim must be a positive int, got -4"),
    ({"num_layers": True}, ValueError, "num_layers must be a positive int, got True"),
    ({"sti_window": 2.0}, ValueError, "sti_window must be a positive int, got 2.0"),
    (
        {"final_layer": 25},
        ValueError,
        r"final_layer=25 is out of range .* 24 blocks: expected an index in -25\.\.24",
    ),
    ({"final_layer": -26}, ValueError, r"final_layer=-26 is out of range .* -25\.\.24"),
    ({"final_layer": 1.5}, TypeError, "final_layer must be an int layer index, got 1.5"),
    ({"layers": (7, 30)}, ValueError, r"layers\[1\]=30 is out of range .* -25\.\.24"),
    ({"layers": (7, "15")}, TypeError, r"layers\[1\] must be an int layer index, got '15'"),
    ({"layers": "7,15"}, TypeError, "layers must be a sequence of layer indices, got '7,15'"),
    ({"layers": 7}, TypeError, "layers must be a sequence of layer indices, got 7"),
    ({"layers": (7, 7)}, ValueError, r"layers names layer 7 twice \(as 7\)"),
    ({"layers": (7, -18)}, ValueError, r"layers names layer 7 twice \(as -18\)"),
    ({"layers": (7, 23)}, ValueError, r"layers contains the final layer 23 \(final_layer=-2\)"),
    (
        {"fusion": "sti", "layers": ()},
        ValueError,
        "fusion='sti' needs at least one index in layers=",
    ),
    (
        {"fusion": "sci", "layers": ()},
        ValueError,
        "fusion='sci' needs at least one index in layers=",
    ),
    ({"fusion": "sci", "groups": ((0, 1),)}, ValueError, "fusion='sci' needs .* no groups="),
    (
        {"fusion": "dci", "layers": ()},
        ValueError,
        "fusion='dci' needs at least one group in groups=",
    ),
    ({"fusion": "dci", "groups": ((0, 1),)}, ValueError, "fusion='dci' needs .* no layers="),
    (
        {"fusion": "none"},
        ValueError,
        "fusion='none' uses only final_layer; pass neither layers= nor groups=",
    ),
    (
        {"fusion": "dci", "layers": (), "groups": ((0, 1, 0),)},
        ValueError,
        r"groups\[0\] names layer 0 twice",
    ),
    (
        {"fusion": "dci", "layers": (), "groups": ((0, 1), (1, 2))},
        ValueError,
        r"groups\[1\] overlaps groups\[0\]: both contain layer 1",
    ),
    (
        {"fusion": "dci", "layers": (), "groups": ((0, 24), (-1, 5))},
        ValueError,
        r"groups\[1\] overlaps groups\[0\]: both contain layer 24",
    ),
    ({"fusion": "dci", "layers": (), "groups": ((0, 1), ())}, ValueError, r"groups\[1\] is empty"),
    (
        {"fusion": "dci", "layers": (), "groups": ((0, 25),)},
        ValueError,
        r"groups\[0\]\[1\]=25 is out of range .* -25\.\.24",
    ),
    (
        {"fusion": "dci", "layers": (), "groups": (0, 1)},
        TypeError,
        r"groups\[0\] must be a sequence of layer indices, got 0",
    ),
    (
        {"fusion": "sti", "resample_grid": (12, 12)},
        ValueError,
        "resample_grid cannot be used with fusion='sti'",
    ),
    (
        {"resample_grid": (0, 12)},
        ValueError,
        r"resample_grid must be a \(height, width\) pair of positive ints, got \(0, 12\)",
    ),
    ({"resample_grid": (12,)}, ValueError, r"resample_grid must be a \(height, width\) pair"),
    ({"resample_grid": (12, 12.0)}, ValueError, r"resample_grid must be a \(height, width\) pair"),
    ({"resample_grid": "12x12"}, ValueError, r"resample_grid must be a \(height, width\) pair"),
    ({"resample_grid": 144}, ValueError, r"resample_grid must be a \(height, width\) pair"),
    (
        {"resample_mode": "nearest"},
        ValueError,
        r"resample_mode must be one of \('bilinear', 'avg', 'max'\)",
    ),
    (
        {"resample_placement": "inside"},
        ValueError,
        "resample_placement must be one of .*'after_projector'",
    ),
    ({"sti_pool": "conv"}, ValueError, r"sti_pool must be one of \('raster', 'grid'\)"),
    (
        {"projector": "mlp2x_relu"},
        ValueError,
        "unknown projector 'mlp2x_relu'; known projectors: "
        + re.escape(", ".join(list_projectors())),
    ),
    (
        {"accumulate_dtype": "int32"},
        ValueError,
        "accumulate_dtype must be None or a floating dtype name such as 'float32', got 'int32'",
    ),
    (
        {"accumulate_dtype": "float33"},
        ValueError,
        "accumulate_dtype must be None or a floating dtype name",
    ),
    (
        {"accumulate_dtype": "Tensor"},
        ValueError,
        "accumulate_dtype must be None or a floating dtype name",
    ),
    ({"format_version": 2}, ValueError, "format_version=2 is not supported"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD_CONFIGS)
def test_bad_config(changes, error, message):
    with pytest.raises(error, match=message):
        _config(**changes)


def test_keyword_only_and_required_fields():
    with pytest.raises(TypeError):
        ConnectorConfig("sci", 8, 16, 24)  # type: ignore[misc]
    with pytest.raises(TypeError, match="llm_dim"):
        ConnectorConfig(fusion="none", vision_dim=8, num_layers=24)  # type: ignore[call-arg]


def test_containers_are_normalised_to_tuples_and_indices_kept():
    config = _config(fusion="dci", layers=[], groups=[range(0, 3), [-3, -2]], final_layer=-1)
    assert config.layers == ()
    assert config.groups == ((0, 1, 2), (-3, -2))  # indices stay as written
    assert config.final_layer == -1
    grid = _config(fusion="none", layers=(), resample_grid=[3, 4]).resample_grid
    assert grid == (3, 4)
    assert isinstance(grid, tuple)


def test_accumulate_dtype_parses():
    import torch

    assert _config(accumulate_dtype="float32").accumulate_torch_dtype is torch.float32
    assert _config(accumulate_dtype="bfloat16").accumulate_torch_dtype is torch.bfloat16
    assert _config().accumulate_torch_dtype is None


# ---------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("name", list_presets())
def test_dict_round_trip(name):
    config = ConnectorConfig.from_preset(name)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-ready
    assert ConnectorConfig.from_dict(data) == config


@pytest.mark.parametrize("name", list_presets())
def test_save_load_round_trip(tmp_path, name):
    config = ConnectorConfig.from_preset(
        name, vision_dim=32, llm_dim=48, accumulate_dtype="float32"
    )
    path = tmp_path / "config.json"
    config.save(path)
    assert json.loads(path.read_text()) == config.to_dict()
    loaded = ConnectorConfig.load(path)
    assert loaded == config
    assert loaded.groups == config.groups
    assert loaded.resample_grid == config.resample_grid


def test_to_dict_is_plain_json_types():
    data = ConnectorConfig.from_preset("dc-dci-clip-l-336-efficient").to_dict()
    assert data["groups"] == [list(range(12)), list(range(12, 24))]
    assert data["resample_grid"] == [12, 12]
    assert data["format_version"] == FORMAT_VERSION
    assert set(data) == {field.name for field in dataclasses.fields(ConnectorConfig)}


def test_from_dict_unknown_keys_are_listed():
    data = {**ConnectorConfig.from_preset("dc-sci-clip-l-336").to_dict(), "zeta": 1, "alpha": 2}
    with pytest.raises(
        ValueError, match=re.escape("unknown connector config keys ['alpha', 'zeta']")
    ):
        ConnectorConfig.from_dict(data)


def test_from_dict_newer_format_version_says_upgrade():
    data = {
        **ConnectorConfig.from_preset("dc-sci-clip-l-336").to_dict(),
        "format_version": FORMAT_VERSION + 1,
    }
    with pytest.raises(
        ValueError, match=f"format_version {FORMAT_VERSION + 1}, newer than .*upgrade mmconnect"
    ):
        ConnectorConfig.from_dict(data)


def test_from_dict_needs_a_mapping():
    with pytest.raises(TypeError, match="a connector config must be a mapping, got list"):
        ConnectorConfig.from_dict([("fusion", "sci")])


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object")],
)
def test_load_bad_files(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        ConnectorConfig.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ConnectorConfig.load(tmp_path / "config.json")


# ---------------------------------------------------------------------------- presets


def test_list_presets_exact():
    assert list_presets() == sorted(EXPECTED_PRESETS)
    assert mmconnect.list_presets is list_presets


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_contents(name):
    config = ConnectorConfig.from_preset(name)
    expected = {**DEFAULTS, **EXPECTED_PRESETS[name]}
    assert dataclasses.asdict(config) == expected


def test_preset_unknown_name_lists_known():
    known = re.escape(", ".join(list_presets()))
    with pytest.raises(ValueError, match=f"unknown preset 'dc-dci-clip'; known presets: {known}"):
        ConnectorConfig.from_preset("dc-dci-clip")


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_overrides(name):
    config = ConnectorConfig.from_preset(name, vision_dim=32, llm_dim=64)
    assert (config.vision_dim, config.llm_dim) == (32, 64)
    reference = ConnectorConfig.from_preset(name)
    assert config == reference.replace(vision_dim=32, llm_dim=64)
    assert config.layers == reference.layers and config.groups == reference.groups


def test_preset_overrides_are_validated():
    with pytest.raises(ValueError, match="resample_grid cannot be used with fusion='sti'"):
        ConnectorConfig.from_preset("dc-sti-clip-l-336", resample_grid=(12, 12))
    with pytest.raises(TypeError):
        ConnectorConfig.from_preset("dc-sti-clip-l-336", vison_dim=4)


def test_preset_calls_do_not_share_state():
    first = ConnectorConfig.from_preset("dc-dci-clip-l-336", llm_dim=8)
    assert ConnectorConfig.from_preset("dc-dci-clip-l-336").llm_dim == 4096
    assert first.llm_dim == 8


# ---------------------------------------------------------------------------- frozen / replace


def test_frozen():
    config = ConnectorConfig.from_preset("dc-sci-clip-l-336")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fusion = "dci"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.layers = (1, 2)  # type: ignore[misc]
    assert hash(config) == hash(ConnectorConfig.from_preset("dc-sci-clip-l-336"))


def test_replace():
    config = ConnectorConfig.from_preset("dc-dci-clip-l-336")
    smaller = config.replace(llm_dim=8, resample_grid=(6, 6))
    assert (smaller.llm_dim, smaller.resample_grid) == (8, (6, 6))
    assert (config.llm_dim, config.resample_grid) == (4096, None)
    assert smaller.groups == config.groups
    with pytest.raises(ValueError, match="fusion='sti' needs at least one index in layers="):
        config.replace(fusion="sti")  # replace is validated like a new config
    with pytest.raises(TypeError):
        config.replace(colour="blue")
