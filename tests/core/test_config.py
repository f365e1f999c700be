"""``ConnectorConfig`` and its specs: validation per kind, serialisation, the format-1 upgrade,
presets (docs/concepts.md, Connector config)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import mmconnect
from mmconnect import (
    ConnectorConfig,
    DCISpec,
    FusionSpec,
    MLPSpec,
    ProjectorSpec,
    ResampleSpec,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    list_presets,
    list_projectors,
)
from mmconnect.config import FORMAT_VERSION, upgrade_format1

FIXTURES = Path(__file__).parents[1] / "fixtures" / "config_v1"
BASE = {"vision_dim": 8, "llm_dim": 16, "num_layers": 24}

CLIP = {"vision_dim": 1024, "llm_dim": 4096, "num_layers": 24}
SIGLIP = {"vision_dim": 1152, "llm_dim": 4096, "num_layers": 27}
CLIP_GROUPS = [list(range(0, 12)), list(range(12, 24))]  # H[0..11], H[12..23]
SIGLIP_GROUPS = [list(range(0, 13)), list(range(13, 26))]  # H[0..12], H[13..25]
MLP2 = {"kind": "mlp", "depth": 2, "activation": "gelu"}


def _sti(final: int) -> dict:
    return {
        "kind": "sti",
        "final_layer": final,
        "extra_layers": [7, 15],
        "window": 8,
        "pool": "raster",
    }


#: Every preset written out from docs/concepts.md (Presets), in the on-disk format.
EXPECTED_PRESETS = {
    "baseline-clip-l-336": {**CLIP, "fusion": {"kind": "none", "final_layer": 23}},
    "dc-sti-clip-l-336": {**CLIP, "fusion": _sti(23)},
    "dc-sci-clip-l-336": {
        **CLIP,
        "fusion": {"kind": "sci", "final_layer": 23, "extra_layers": [7, 15]},
    },
    "dc-dci-clip-l-336": {
        **CLIP,
        "fusion": {
            "kind": "dci",
            "final_layer": 23,
            "groups": CLIP_GROUPS,
            "accumulate_dtype": None,
        },
    },
    "dc-dci-clip-l-336-efficient": {
        **CLIP,
        "fusion": {
            "kind": "dci",
            "final_layer": 23,
            "groups": CLIP_GROUPS,
            "accumulate_dtype": None,
        },
        "resample": {"grid": [12, 12], "mode": "bilinear", "placement": "before_projector"},
    },
    "dc-sti-siglip-so400m": {**SIGLIP, "fusion": _sti(26)},
    "dc-sci-siglip-so400m": {
        **SIGLIP,
        "fusion": {"kind": "sci", "final_layer": 26, "extra_layers": [7, 15]},
    },
    "dc-dci-siglip-so400m": {
        **SIGLIP,
        "fusion": {
            "kind": "dci",
            "final_layer": 26,
            "groups": SIGLIP_GROUPS,
            "accumulate_dtype": None,
        },
    },
}


def _config(**changes) -> ConnectorConfig:
    return ConnectorConfig(**{**BASE, "fusion": SCISpec(extra_layers=(7, 15)), **changes})


# ---------------------------------------------------------------------------- spec validation

BAD_SPECS = [
    # (build, exception, message)
    (
        lambda: STISpec(extra_layers=()),
        ValueError,
        "fusion 'sti' needs at least one index in extra_layers",
    ),
    (
        lambda: SCISpec(extra_layers=[]),
        ValueError,
        "fusion 'sci' needs at least one index in extra_layers",
    ),
    (
        lambda: SCISpec(extra_layers=(7, "15")),
        TypeError,
        r"extra_layers\[1\] must be an int, got '15' \(str\); a layer index in the hidden_states",
    ),
    (
        lambda: SCISpec(extra_layers="7,15"),
        TypeError,
        "extra_layers must be a sequence of layer indices, got '7,15'",
    ),
    (
        lambda: SCISpec(extra_layers=7),
        TypeError,
        "extra_layers must be a sequence of layer indices, got 7",
    ),
    (
        lambda: SCISpec(extra_layers=(7,), final_layer=1.5),
        TypeError,
        r"final_layer must be an int, got 1.5 \(float\); a layer index",
    ),
    (
        lambda: STISpec(extra_layers=(7,), window=0),
        ValueError,
        "window must be a positive int, got 0",
    ),
    (
        lambda: STISpec(extra_layers=(7,), window=2.0),
        TypeError,
        "window must be a positive int, got 2.0",
    ),
    (
        lambda: STISpec(extra_layers=(7,), pool="conv"),
        ValueError,
        r"pool must be one of \('raster', 'grid'\)",
    ),
    (lambda: DCISpec(groups=()), ValueError, "fusion 'dci' needs at least one group in groups"),
    (lambda: DCISpec(groups=((0, 1), ())), ValueError, r"groups\[1\] is empty"),
    (
        lambda: DCISpec(groups=(0, 1)),
        TypeError,
        r"groups\[0\] must be a sequence of layer indices, got 0",
    ),
    (lambda: DCISpec(groups="01"), TypeError, "groups must be a sequence of layer groups"),
    (
        lambda: DCISpec(groups=((0,),), accumulate_dtype="int32"),
        ValueError,
        "accumulate_dtype must be None or a floating dtype name such as 'float32', got 'int32'",
    ),
    (lambda: DCISpec(groups=((0,),), accumulate_dtype="Tensor"), ValueError, "floating dtype name"),
    (
        lambda: DCISpec(groups=((0,),), accumulate_dtype=32),
        TypeError,
        "accumulate_dtype must be None or a dtype name",
    ),
    (lambda: FusionSpec(kind=""), ValueError, "fusion kind must be a non-empty str, got ''"),
    (lambda: FusionSpec(kind=3), TypeError, r"fusion kind must be a non-empty str, got 3 \(int\)"),
    (lambda: MLPSpec(depth=0), ValueError, "depth must be a positive int, got 0"),
    (lambda: MLPSpec(depth="2"), TypeError, "depth must be a positive int, got '2'"),
    (
        lambda: MLPSpec(activation="tanh"),
        ValueError,
        r"activation must be one of \('gelu', 'relu', 'silu'\)",
    ),
    (
        lambda: ResampleSpec(grid=(0, 12)),
        ValueError,
        r"grid must be a \(height, width\) pair of positive ints, got \(0, 12\)",
    ),
    (lambda: ResampleSpec(grid=(12,)), ValueError, r"grid must be a \(height, width\) pair"),
    (lambda: ResampleSpec(grid="12x12"), TypeError, r"grid must be a \(height, width\) pair"),
    (
        lambda: ResampleSpec(grid=(4, 4), mode="nearest"),
        ValueError,
        r"mode must be one of \('bilinear', 'avg', 'max'\)",
    ),
    (
        lambda: ResampleSpec(grid=(4, 4), placement="inside"),
        ValueError,
        "placement must be one of .*'after_projector'",
    ),
]


@pytest.mark.parametrize(("build", "error", "message"), BAD_SPECS)
def test_bad_spec(build, error, message):
    with pytest.raises(error, match=message):
        build()


BAD_CONFIGS = [
    # (changes, exception, message)
    ({"vision_dim": 0}, ValueError, "vision_dim must be a positive int, got 0"),
    ({"llm_dim": -4}, ValueError, "llm_dim must be a positive int, got -4"),
    ({"num_layers": True}, TypeError, "num_layers must be a positive int, got True"),
    (
        {"fusion": SCISpec(extra_layers=(7,), final_layer=25)},
        ValueError,
        r"final_layer=25 is out of range .* 24 blocks: expected an index in -25\.\.24",
    ),
    (
        {"fusion": SingleLayerSpec(final_layer=-26)},
        ValueError,
        r"final_layer=-26 is out of range .* -25\.\.24",
    ),
    (
        {"fusion": SCISpec(extra_layers=(7, 30))},
        ValueError,
        r"extra_layers\[1\]=30 is out of range .* -25\.\.24",
    ),
    (
        {"fusion": SCISpec(extra_layers=(7, 7))},
        ValueError,
        r"extra_layers names layer 7 twice \(as 7\)",
    ),
    (
        {"fusion": STISpec(extra_layers=(7, -18))},
        ValueError,
        r"extra_layers names layer 7 twice \(as -18\)",
    ),
    (
        {"fusion": SCISpec(extra_layers=(7, 23))},
        ValueError,
        r"extra_layers contains the final layer 23 \(final_layer=-2\)",
    ),
    ({"fusion": DCISpec(groups=((0, 1, 0),))}, ValueError, r"groups\[0\] names layer 0 twice"),
    (
        {"fusion": DCISpec(groups=((0, 1), (1, 2)))},
        ValueError,
        r"groups\[1\] overlaps groups\[0\]: both contain layer 1",
    ),
    (
        {"fusion": DCISpec(groups=((0, 24), (-1, 5)))},
        ValueError,
        r"groups\[1\] overlaps groups\[0\]: both contain layer 24",
    ),
    (
        {"fusion": DCISpec(groups=((0, 25),))},
        ValueError,
        r"groups\[0\]\[1\]=25 is out of range .* -25\.\.24",
    ),
    (
        {"fusion": "dense"},
        ValueError,
        r"fusion kind must be one of \('none', 'sti', 'sci', 'dci'\), got 'dense'",
    ),
    (
        {"fusion": "dci"},
        ValueError,
        r"fusion kind 'dci' needs the parameters \['groups'\]; pass a DCISpec",
    ),
    (
        {"fusion": FusionSpec(kind="dci")},
        TypeError,
        "fusion kind 'dci' takes a DCISpec, got a FusionSpec",
    ),
    ({"fusion": 3}, TypeError, r"fusion must be a FusionSpec \(e.g. DCISpec\(groups=...\)\)"),
    (
        {"fusion": {"kind": "none"}},
        TypeError,
        "fusion must be a FusionSpec or a fusion name, got a mapping",
    ),
    (
        {"fusion": STISpec(extra_layers=(7,)), "resample": ResampleSpec(grid=(12, 12))},
        ValueError,
        "resample cannot be used with fusion 'sti': its tokens do not all form the encoder's grid",
    ),
    ({"resample": (12, 12)}, TypeError, r"resample must be a ResampleSpec or None, got \(12, 12\)"),
    (
        {"projector": "mlp2x_tanh"},
        ValueError,
        r"activation must be one of \('gelu', 'relu', 'silu'\), got 'tanh'",
    ),
    (
        {"projector": "conv"},
        ValueError,
        # every registered kind is listed (the zoo's too), in name order
        "unknown projector 'conv'; known projectors: " + ", ".join(sorted(list_projectors())),
    ),
    ({"projector": "mlp0x_gelu"}, ValueError, "depth must be a positive int, got 0"),
    (
        {"projector": ProjectorSpec(kind="mlp")},
        TypeError,
        "projector kind 'mlp' takes a MLPSpec, got a ProjectorSpec",
    ),
    ({"projector": 2}, TypeError, "projector must be a ProjectorSpec or a projector name"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD_CONFIGS)
def test_bad_config(changes, error, message):
    with pytest.raises(error, match=message):
        _config(**changes)


def test_keyword_only_and_required_fields():
    with pytest.raises(TypeError):
        ConnectorConfig(8, 16, 24, "none")  # type: ignore[misc]
    with pytest.raises(TypeError, match="llm_dim"):
        ConnectorConfig(fusion="none", vision_dim=8, num_layers=24)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="final_layer"):
        ConnectorConfig(**BASE, fusion="none", final_layer=-2)  # type: ignore[call-arg]


def test_containers_are_normalised_to_tuples_and_indices_kept():
    spec = DCISpec(groups=[range(0, 3), [-3, -2]], final_layer=-1)
    assert spec.groups == ((0, 1, 2), (-3, -2))  # indices stay as written
    assert _config(fusion=spec).fusion.final_layer == -1
    assert SCISpec(extra_layers=[7, 15]).extra_layers == (7, 15)
    grid = ResampleSpec(grid=[3, 4]).grid
    assert grid == (3, 4)
    assert isinstance(grid, tuple)


def test_normalized_spec_has_non_negative_indices():
    spec = DCISpec(groups=[[-25, 1], [-2]], final_layer=-1)
    assert spec.normalized(24) == DCISpec(groups=((0, 1), (23,)), final_layer=24)
    assert STISpec(extra_layers=(-18,), window=4).normalized(24) == STISpec(
        extra_layers=(7,), window=4, final_layer=23
    )


def test_names_parse_into_specs():
    assert _config(fusion="none").fusion == SingleLayerSpec()
    assert _config(projector="mlp2x_gelu").projector == MLPSpec(depth=2)
    assert _config(projector="mlp3x_relu").projector == MLPSpec(depth=3, activation="relu")
    assert _config(projector="linear").projector == ProjectorSpec(kind="linear")
    assert _config(projector="mlp").projector == MLPSpec()
    assert _config().projector == MLPSpec(depth=2)  # LLaVA-1.5's projector by default


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        (MLPSpec(), "mlp2x_gelu"),
        (MLPSpec(depth=4), "mlp4x_gelu"),
        (MLPSpec(depth=1, activation="silu"), "mlp1x_silu"),
        (ProjectorSpec(kind="linear"), "linear"),
        (ProjectorSpec(kind="identity"), "identity"),
    ],
)
def test_projector_name_is_the_llava_name(spec, name):
    assert spec.name == name
    assert _config(projector=name).projector == spec


def test_accumulate_dtype_parses():
    assert (
        DCISpec(groups=((0,),), accumulate_dtype="float32").accumulate_torch_dtype is torch.float32
    )
    assert (
        DCISpec(groups=((0,),), accumulate_dtype="bfloat16").accumulate_torch_dtype
        is torch.bfloat16
    )
    assert DCISpec(groups=((0,),)).accumulate_torch_dtype is None


def test_resamplable_is_a_property_of_the_spec_class():
    assert [spec.resamplable for spec in (SingleLayerSpec, STISpec, SCISpec, DCISpec)] == [
        True,
        False,
        True,
        True,
    ]


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
        name, vision_dim=32, llm_dim=48, projector=MLPSpec(depth=3)
    )
    path = tmp_path / "config.json"
    config.save(path)
    assert json.loads(path.read_text()) == config.to_dict()
    loaded = ConnectorConfig.load(path)
    assert loaded == config
    assert loaded.fusion == config.fusion and loaded.resample == config.resample


def test_to_dict_is_nested_plain_json():
    config = ConnectorConfig.from_preset("dc-dci-clip-l-336-efficient")
    config = config.replace(fusion=dataclasses.replace(config.fusion, accumulate_dtype="float32"))
    assert config.to_dict() == {
        "format_version": FORMAT_VERSION,
        "vision_dim": 1024,
        "llm_dim": 4096,
        "num_layers": 24,
        "fusion": {
            "kind": "dci",
            "final_layer": 23,
            "groups": CLIP_GROUPS,
            "accumulate_dtype": "float32",
        },
        "projector": MLP2,
        "resample": {"grid": [12, 12], "mode": "bilinear", "placement": "before_projector"},
    }
    assert FORMAT_VERSION == 2


def test_from_dict_accepts_projector_names():
    data = {**_config().to_dict(), "projector": "mlp2x_gelu"}
    assert ConnectorConfig.from_dict(data) == _config()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"zeta": 1, "alpha": 2}, re.escape("unknown connector config keys ['alpha', 'zeta']")),
        (
            {"fusion": {"kind": "sci", "extra_layers": [7], "groups": [[0]]}},
            re.escape(
                "unknown keys ['groups'] for fusion kind 'sci'; its parameters are ['final_layer', 'extra_layers']"
            ),
        ),
        (
            {"fusion": {"kind": "dci", "groups": [[0]], "sti_window": 8}},
            re.escape("unknown keys ['sti_window'] for fusion kind 'dci'"),
        ),
        ({"fusion": {"final_layer": -2}}, "a fusion spec needs a 'kind' key"),
        ({"fusion": {"kind": "dense"}}, "fusion kind must be one of"),
        (
            {"projector": {"kind": "mlp", "depth": 2, "width": 8}},
            re.escape(
                "unknown keys ['width'] for projector kind 'mlp'; its parameters are ['depth', 'activation']"
            ),
        ),
        (
            {"projector": {"kind": "linear", "bias": False}},
            re.escape("unknown keys ['bias'] for projector kind 'linear'"),
        ),
        ({"resample": {"grid": [2, 2], "size": 4}}, re.escape("unknown resample keys ['size']")),
        ({"resample": {"mode": "avg"}}, "a resample spec needs a 'grid' key"),
    ],
)
def test_from_dict_unknown_keys_are_refused(change, message):
    data = {**_config().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        ConnectorConfig.from_dict(data)


def test_from_dict_newer_format_version_says_upgrade():
    data = {**_config().to_dict(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(
        ValueError, match=f"format_version {FORMAT_VERSION + 1}, newer than .*upgrade mmconnect"
    ):
        ConnectorConfig.from_dict(data)


@pytest.mark.parametrize(
    ("version", "error", "message"),
    [
        (0, ValueError, r"^format_version must be a positive int, got 0$"),
        ("2", TypeError, r"^format_version must be a positive int, got '2' \(str\)$"),
        (2.0, TypeError, r"^format_version must be a positive int, got 2.0 \(float\)$"),
        (None, ValueError, r"^a connector config needs a format_version"),
    ],
)
def test_from_dict_bad_format_version(version, error, message):
    data = {**_config().to_dict(), "format_version": version}
    with pytest.raises(error, match=message):
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


# ---------------------------------------------------------------------------- format 1

V1_COMMON = {"format_version": 2, "vision_dim": 8, "llm_dim": 16, "num_layers": 4}
#: What each committed format-1 file (tests/fixtures/config_v1) means in format 2.
V1_UPGRADED = {
    "none": {
        **V1_COMMON,
        "fusion": {"kind": "none", "final_layer": -2},
        "projector": {"kind": "linear"},
        "resample": None,
    },
    "sti": {
        **V1_COMMON,
        "fusion": {
            "kind": "sti",
            "final_layer": -2,
            "extra_layers": [1, 2],
            "window": 4,
            "pool": "grid",
        },
        "projector": MLP2,
        "resample": None,
    },
    "sci": {
        **V1_COMMON,
        "fusion": {"kind": "sci", "final_layer": -2, "extra_layers": [-4, 2]},
        "projector": {"kind": "mlp", "depth": 3, "activation": "gelu"},
        "resample": None,
    },
    "dci": {
        **V1_COMMON,
        "fusion": {
            "kind": "dci",
            "final_layer": -2,
            "groups": [[0, 1], [2, 3]],
            "accumulate_dtype": "float32",
        },
        "projector": MLP2,
        "resample": None,
    },
    "dci_resample": {
        **V1_COMMON,
        "fusion": {
            "kind": "dci",
            "final_layer": -2,
            "groups": [[0, 1], [2, 3]],
            "accumulate_dtype": None,
        },
        "projector": MLP2,
        "resample": {"grid": [2, 3], "mode": "avg", "placement": "after_projector"},
    },
}


@pytest.mark.parametrize("name", sorted(V1_UPGRADED))
def test_format1_fixture_is_upgraded(name):
    path = FIXTURES / f"{name}.json"
    assert json.loads(path.read_text())["format_version"] == 1
    config = ConnectorConfig.load(path)
    assert config.to_dict() == V1_UPGRADED[name]
    assert ConnectorConfig.from_dict(V1_UPGRADED[name]) == config


def test_format1_without_version_is_read_as_format1():
    data = json.loads((FIXTURES / "sci.json").read_text())
    del data["format_version"]
    assert ConnectorConfig.from_dict(data).to_dict() == V1_UPGRADED["sci"]


def test_format1_inert_fields_of_builtin_fusions_are_dropped():
    data = {**json.loads((FIXTURES / "dci.json").read_text()), "sti_window": 4, "sti_pool": "grid"}
    assert ConnectorConfig.from_dict(data).to_dict() == V1_UPGRADED["dci"]
    data = {**json.loads((FIXTURES / "sti.json").read_text()), "accumulate_dtype": "float32"}
    assert ConnectorConfig.from_dict(data).to_dict() == V1_UPGRADED["sti"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, re.escape("unknown format-1 connector config keys ['colour']")),
        (
            {"groups": [[0, 1]]},
            re.escape("format-1 field groups=[[0, 1]] has no place in fusion 'sci'"),
        ),
        ({"fusion": "dense"}, "fusion must be one of"),
        ({"fusion": "sti", "resample_grid": [2, 2]}, "resample cannot be used with fusion 'sti'"),
        ({"resample_grid": [2, 2], "resample_mode": "nearest"}, "mode must be one of"),
    ],
)
def test_bad_format1_configs(change, message):
    data = {**json.loads((FIXTURES / "sci.json").read_text()), **change}
    with pytest.raises(ValueError, match=message):
        ConnectorConfig.from_dict(data)


def test_upgrade_format1_is_public_and_pure():
    data = json.loads((FIXTURES / "dci_resample.json").read_text())
    before = json.dumps(data, sort_keys=True)
    assert upgrade_format1(data) == {**V1_UPGRADED["dci_resample"], "projector": "mlp2x_gelu"}
    assert json.dumps(data, sort_keys=True) == before


# ---------------------------------------------------------------------------- presets


def test_fusions_by_depth_with_and_without_the_embeddings():
    """The rule the tower presets share, written out by hand for the towers that use it."""
    from mmconnect.presets import fusions_by_depth

    so400m = fusions_by_depth(27, first_layer=1)  # Idefics3 / SmolVLM on SigLIP-SO400M
    assert so400m["sci"] == SCISpec(final_layer=27, extra_layers=(9, 18))
    assert so400m["dci"] == DCISpec(
        final_layer=27, groups=(tuple(range(1, 14)), tuple(range(14, 27)))
    )
    # SigLIP-B/16: 11 blocks before the last, the first half takes the odd one
    assert fusions_by_depth(12, first_layer=1)["dci"].groups == (
        (1, 2, 3, 4, 5, 6),
        (7, 8, 9, 10, 11),
    )
    internvit = fusions_by_depth(24, first_layer=0)  # InternViT-300M, embeddings included
    assert internvit["sci"] == SCISpec(final_layer=24, extra_layers=(8, 16))
    assert internvit["dci"].groups == (tuple(range(0, 12)), tuple(range(12, 24)))
    assert fusions_by_depth(45, first_layer=0)["dci"].groups == (
        tuple(range(0, 23)),
        tuple(range(23, 45)),
    )


@pytest.mark.parametrize(
    ("depth", "first_layer", "error", "message"),
    [
        (1, 0, ValueError, r"depth must be an int >= 2, got 1"),
        (12.0, 1, TypeError, r"depth must be an int >= 2, got 12\.0 \(float\)"),
        (12, 11, ValueError, r"first_layer must be an int in \[0, 10\], got 11; DCI needs two"),
        (12, -1, ValueError, r"first_layer must be an int in \[0, 10\], got -1"),
    ],
)
def test_fusions_by_depth_refuses_bad_arguments(depth, first_layer, error, message):
    from mmconnect.presets import fusions_by_depth

    with pytest.raises(error, match=message):
        fusions_by_depth(depth, first_layer=first_layer)


def test_presets_module_doctests_pass():
    import doctest

    import mmconnect.presets

    failures, attempted = doctest.testmod(mmconnect.presets)
    assert failures == 0 and attempted >= 2


def test_list_presets_exact():
    """The eight published presets, exactly; the connector zoo's modules register their own."""
    assert set(EXPECTED_PRESETS) <= set(list_presets())
    assert list_presets() == sorted(list_presets())
    assert mmconnect.list_presets is list_presets


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_contents(name):
    config = ConnectorConfig.from_preset(name)
    expected = {"format_version": 2, "projector": MLP2, "resample": None, **EXPECTED_PRESETS[name]}
    assert config.to_dict() == expected


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
    assert config.fusion == reference.fusion


def test_preset_spec_overrides():
    config = ConnectorConfig.from_preset("dc-dci-clip-l-336", resample=ResampleSpec(grid=(6, 6)))
    assert config.resample == ResampleSpec(grid=(6, 6))
    assert (
        ConnectorConfig.from_preset("dc-sci-clip-l-336", projector="linear").projector.name
        == "linear"
    )


def test_preset_overrides_are_validated():
    with pytest.raises(ValueError, match="resample cannot be used with fusion 'sti'"):
        ConnectorConfig.from_preset("dc-sti-clip-l-336", resample=ResampleSpec(grid=(12, 12)))
    with pytest.raises(TypeError):
        ConnectorConfig.from_preset("dc-sti-clip-l-336", vison_dim=4)
    with pytest.raises(TypeError):  # a format-1 field is no config field any more
        ConnectorConfig.from_preset("dc-dci-clip-l-336", resample_grid=(12, 12))


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
        config.fusion.extra_layers = (1, 2)  # type: ignore[misc]
    assert hash(config) == hash(ConnectorConfig.from_preset("dc-sci-clip-l-336"))


def test_replace():
    config = ConnectorConfig.from_preset("dc-dci-clip-l-336")
    smaller = config.replace(llm_dim=8, resample=ResampleSpec(grid=(6, 6)))
    assert (smaller.llm_dim, smaller.resample.grid) == (8, (6, 6))
    assert (config.llm_dim, config.resample) == (4096, None)
    assert smaller.fusion == config.fusion
    with pytest.raises(ValueError, match=r"extra_layers\[0\]=30 is out of range"):
        config.replace(fusion=SCISpec(extra_layers=(30,)))  # replace is validated like a new config
    with pytest.raises(TypeError):
        config.replace(colour="blue")
