"""``DenseConnector``: what it reads, token bookkeeping, forward errors, save / load, dtypes.

Presets run with tiny widths (``vision_dim=4``, ``llm_dim=6``) on features made here; the
encoder depth and token grids are the real ones (CLIP-L/336: 24 blocks, 24x24; SigLIP: 27, 27x27).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    LayerFeatures,
    ResampleSpec,
    SCISpec,
    list_presets,
)
from mmconnect.connector import config_fingerprint
from mmconnect.presets import PUBLISHED_PRESETS

EXACT = {"atol": 0.0, "rtol": 0.0}
VISION, LLM = 4, 6

CLIP_GROUPS = (tuple(range(0, 12)), tuple(range(12, 24)))
SIGLIP_GROUPS = (tuple(range(0, 13)), tuple(range(13, 26)))
#: preset -> (layers, individual_layers, groups, fused width / VISION, tokens on its own grid)
EXPECTED = {
    "baseline-clip-l-336": ((23,), (23,), (), 1, 576),
    "dc-sti-clip-l-336": ((7, 15, 23), (23, 7, 15), (), 1, 720),
    "dc-sci-clip-l-336": ((7, 15, 23), (23, 7, 15), (), 3, 576),
    "dc-dci-clip-l-336": (tuple(range(24)), (23,), CLIP_GROUPS, 3, 576),
    "dc-dci-clip-l-336-efficient": (tuple(range(24)), (23,), CLIP_GROUPS, 3, 144),
    "dc-sti-siglip-so400m": ((7, 15, 26), (26, 7, 15), (), 1, 911),
    "dc-sci-siglip-so400m": ((7, 15, 26), (26, 7, 15), (), 3, 729),
    "dc-dci-siglip-so400m": (tuple(range(27)), (26,), SIGLIP_GROUPS, 3, 729),
}


def _randn(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _connector(preset: str, seed: int = 0, *, fusion_changes=None, **overrides) -> DenseConnector:
    torch.manual_seed(seed)
    config = ConnectorConfig.from_preset(
        preset, **{"vision_dim": VISION, "llm_dim": LLM, **overrides}
    )
    if fusion_changes:
        config = config.replace(fusion=config.fusion.replace(**fusion_changes))
    return DenseConnector(config)


def _features(
    num_layers: int, tokens: int, *, batch: int = 2, width: int = VISION, dtype=torch.float32
):
    """All ``num_layers + 1`` hidden states, as a plain dict."""
    return {k: _randn(100 + k, batch, tokens, width, dtype=dtype) for k in range(num_layers + 1)}


def _own_grid(preset: str) -> tuple[int, int]:
    return (27, 27) if "siglip" in preset else (24, 24)


def test_expected_covers_every_published_preset():
    assert sorted(EXPECTED) == sorted(PUBLISHED_PRESETS)
    assert set(PUBLISHED_PRESETS) <= set(list_presets())


# ---------------------------------------------------------------------------- what it reads


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_layers_individual_layers_groups(preset):
    layers, individual, groups, _, _ = EXPECTED[preset]
    connector = _connector(preset)
    assert connector.captured_layers == layers
    assert connector.individual_layers == individual
    assert connector.groups == groups


# ---------------------------------------------------------------------------- token bookkeeping


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_num_tokens_and_widths_on_own_grid(preset):
    _, _, _, width_factor, tokens = EXPECTED[preset]
    connector = _connector(preset)
    grid = _own_grid(preset)
    assert connector.num_tokens(grid) == tokens
    assert connector.fused_dim == width_factor * VISION
    features = _features(connector.config.num_layers, grid[0] * grid[1], batch=1)
    fused = connector.fuse(features)
    assert fused.shape[-1] == connector.fused_dim
    assert connector(features).shape == (1, tokens, LLM)


# (preset, overrides, grid, tokens): non-square grids; STI raster pools 60 -> 7, grid pools 6x10 -> 3x5
NON_SQUARE = [
    ("baseline-clip-l-336", {}, (6, 10), 60),
    ("dc-sci-clip-l-336", {}, (6, 10), 60),
    ("dc-dci-siglip-so400m", {}, (10, 6), 60),
    ("dc-sti-clip-l-336", {}, (6, 10), 60 + 2 * 7),
    ("dc-sti-clip-l-336", {"fusion_changes": {"pool": "grid", "window": 2}}, (6, 10), 60 + 2 * 15),
    ("dc-sti-siglip-so400m", {"fusion_changes": {"window": 3}}, (5, 9), 45 + 2 * 15),
    ("dc-sti-siglip-so400m", {"fusion_changes": {"pool": "grid", "window": 3}}, (5, 9), 45 + 2 * 3),
    ("dc-dci-clip-l-336-efficient", {}, (6, 10), 144),
    ("dc-dci-clip-l-336", {"resample": ResampleSpec(grid=(3, 5), mode="avg")}, (6, 10), 15),
]


@pytest.mark.parametrize(("preset", "overrides", "grid", "tokens"), NON_SQUARE)
def test_num_tokens_non_square(preset, overrides, grid, tokens):
    connector = _connector(preset, **overrides)
    assert connector.num_tokens(grid) == tokens
    features = _features(connector.config.num_layers, grid[0] * grid[1])
    assert connector(features, grid=grid).shape == (2, tokens, LLM)
    # the grid may also come from LayerFeatures
    recorded = LayerFeatures(features, grids=dict.fromkeys(features, grid))
    assert_close(connector(recorded), connector(features, grid=grid), **EXACT)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("baseline-clip-l-336", [23]), ("dc-sci-clip-l-336", [23, 7, 15])],
)
def test_fuse_is_channel_concat_in_reference_order(preset, expected):
    connector = _connector(preset)
    features = _features(24, 16)
    assert_close(connector.fuse(features), torch.cat([features[k] for k in expected], -1), **EXACT)


def test_fuse_dci_reads_plain_dicts_and_streamed_means_alike():
    connector = _connector("dc-dci-clip-l-336")
    features = _features(24, 16)
    means = {
        group: torch.stack([features[k] for k in group]).sum(0) / len(group)
        for group in CLIP_GROUPS
    }
    streamed = LayerFeatures({23: features[23]}, group_means=means)
    expected = torch.cat([features[23], means[CLIP_GROUPS[0]], means[CLIP_GROUPS[1]]], -1)
    assert_close(connector.fuse(features), expected, **EXACT)
    assert_close(connector.fuse(streamed), expected, **EXACT)


# ---------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_save_pretrained_round_trip(tmp_path, preset):
    connector = _connector(preset, seed=3)
    connector.save_pretrained(tmp_path / "connector")
    assert sorted(path.name for path in (tmp_path / "connector").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = DenseConnector.from_pretrained(tmp_path / "connector")
    assert loaded.config == connector.config
    original, restored = connector.state_dict(), loaded.state_dict()
    assert list(restored) == list(original)
    for key, value in original.items():
        assert restored[key].dtype == value.dtype
        assert_close(restored[key], value, **EXACT)
    grid = _own_grid(preset)
    features = _features(connector.config.num_layers, grid[0] * grid[1], batch=1)
    with torch.no_grad():
        assert_close(loaded(features), connector(features), **EXACT)


def test_save_pretrained_identity_projector(tmp_path):
    config = ConnectorConfig(
        fusion=SCISpec(extra_layers=(0, 1)),
        vision_dim=2,
        llm_dim=6,
        num_layers=4,
        projector="identity",
    )
    connector = DenseConnector(config)
    connector.save_pretrained(tmp_path)
    loaded = DenseConnector.from_pretrained(tmp_path)
    features = _features(4, 9, width=2)
    assert_close(loaded(features), torch.cat([features[3], features[0], features[1]], -1), **EXACT)


def test_weights_that_do_not_fit_the_config(tmp_path):
    connector = _connector("dc-sci-clip-l-336", vision_dim=8)
    connector.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = re.escape(
        f"model.safetensors does not match the connector config: projector.0.weight: ({LLM}, 24) "
        f"in the file, ({LLM}, 48) expected by the config"
    )
    with pytest.raises(ValueError, match=message):
        DenseConnector.from_pretrained(tmp_path)


def test_weights_of_another_projector(tmp_path):
    _connector("dc-sci-clip-l-336").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["projector"] = "linear"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"missing projector\.weight; .*unexpected projector\.0\.weight"
    ):
        DenseConnector.from_pretrained(tmp_path)


def test_from_pretrained_missing_directory(tmp_path):
    missing = re.escape(repr(str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match=f"connector directory {missing} does not exist"):
        DenseConnector.from_pretrained(tmp_path / "nothing")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"connector config .*empty/config\.json' does not exist"
    ):
        DenseConnector.from_pretrained(tmp_path / "empty")


def _saved_connector(tmp_path):
    connector = _connector("dc-sti-clip-l-336")
    connector.save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def test_from_pretrained_truncated_or_garbage_weights(tmp_path):
    directory = _saved_connector(tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])  # the header is intact, the last tensor's bytes are not
    with pytest.raises(ValueError) as error:
        DenseConnector.from_pretrained(directory)
    assert str(error.value) == (
        f"weights file {str(weights)!r} ({len(data) - 10} bytes) is not a readable safetensors "
        "file: it is truncated or corrupt (Error while deserializing header: incomplete "
        "metadata, file not fully covered); save it again"
    )
    weights.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ValueError, match=re.escape(repr(str(weights))) + r" \(26 bytes\) is not"):
        DenseConnector.from_pretrained(directory)
    weights.unlink()
    weights.mkdir()
    with pytest.raises(ValueError, match=re.escape(repr(str(weights))) + " is a directory"):
        DenseConnector.from_pretrained(directory)


def test_from_pretrained_config_that_is_not_a_connector_config(tmp_path):
    directory = _saved_connector(tmp_path)
    config = directory / "config.json"
    config.write_text('{"fusion": "sti",')
    with pytest.raises(ValueError, match=r"connector config .*config\.json' is not valid JSON"):
        DenseConnector.from_pretrained(directory)
    config.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=r"config\.json' is not UTF-8 text \(byte 0"):
        DenseConnector.from_pretrained(directory)
    config.write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match=r"connector config .*config\.json': "):
        DenseConnector.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"model\.safetensors' is a file; DenseConnector"):
        DenseConnector.from_pretrained(directory / "model.safetensors")


# ---------------------------------------------------------------------------- bad input


def test_features_missing_a_needed_layer():
    connector = _connector("dc-sci-clip-l-336")
    features = _features(24, 16)
    del features[15]
    with pytest.raises(
        ValueError,
        match=r"features are missing layer 15, which the connector needs; they hold layers \[0, 1, .*, 14, 16, .*24\]",
    ):
        connector(features)


def test_features_missing_a_group_member():
    connector = _connector("dc-dci-clip-l-336")
    features = {k: v for k, v in _features(24, 16).items() if k != 5}
    with pytest.raises(ValueError, match="features are missing layer 5"):
        connector(features)


def test_features_not_a_mapping():
    connector = _connector("dc-sci-clip-l-336")
    with pytest.raises(TypeError, match="features must be a mapping from layer index"):
        connector(list(_features(24, 16).values()))


@pytest.mark.parametrize("preset", ["dc-sci-clip-l-336", "dc-sti-clip-l-336", "dc-dci-clip-l-336"])
def test_channel_width_differs_from_config(preset):
    connector = _connector(preset)
    with pytest.raises(
        ValueError, match=f"features layer 23 has 5 channels but config.vision_dim is {VISION}"
    ):
        connector(_features(24, 16, width=5))


@pytest.mark.parametrize("layer", [7, 15])
def test_one_layer_of_different_width(layer):
    connector = _connector("dc-sti-clip-l-336")
    features = _features(24, 16)
    features[layer] = _randn(0, 2, 16, 5)
    with pytest.raises(
        ValueError, match=f"features layer {layer} has 5 channels but config.vision_dim is {VISION}"
    ):
        connector(features)


def test_dci_group_of_different_width():
    # A whole group of another width would concatenate fine and fail deep inside the projector.
    connector = _connector("dc-dci-clip-l-336")
    features = _features(24, 16)
    features.update({k: _randn(k, 2, 16, 5) for k in range(12)})
    with pytest.raises(
        ValueError, match=f"features layer 0 has 5 channels but config.vision_dim is {VISION}"
    ):
        connector(features)


def test_streamed_group_mean_of_different_width():
    connector = _connector("dc-dci-clip-l-336")
    means = {CLIP_GROUPS[0]: _randn(0, 2, 16, 5), CLIP_GROUPS[1]: _randn(1, 2, 16, VISION)}
    features = LayerFeatures({23: _randn(2, 2, 16, VISION)}, group_means=means)
    with pytest.raises(
        ValueError, match=f"features group 0..11 has 5 channels but config.vision_dim is {VISION}"
    ):
        connector(features)


def test_non_square_tokens_without_grid():
    connector = _connector("dc-sci-clip-l-336")
    with pytest.raises(
        ValueError, match=r"60 tokens do not form a square grid; pass grid=\(height, width\)"
    ):
        connector(_features(24, 60))


@pytest.mark.parametrize("grid", [(5, 5), (4, 8), (36, 2)])
def test_explicit_grid_that_does_not_match(grid):
    connector = _connector("dc-sci-clip-l-336")
    message = re.escape(
        f"features[23] has 36 tokens, which do not form the stated grid {grid[0]}x{grid[1]}"
    )
    with pytest.raises(ValueError, match=message):
        connector(_features(24, 36), grid=grid)


def test_bad_config_type():
    with pytest.raises(TypeError, match="config must be a ConnectorConfig, got dict"):
        DenseConnector({"fusion": "sci"})


# ---------------------------------------------------------------------------- resampling


def test_resample_before_vs_after_projector():
    before = _connector("dc-dci-clip-l-336-efficient")
    after_projector = ResampleSpec(grid=(12, 12), placement="after_projector")
    after = DenseConnector(before.config.replace(resample=after_projector))
    after.projector.load_state_dict(before.projector.state_dict())
    features = _features(24, 576, batch=1)
    out_before, out_after = before(features), after(features)
    assert out_before.shape == out_after.shape == (1, 144, LLM)
    assert before.num_tokens((24, 24)) == after.num_tokens((24, 24)) == 144
    assert (out_before - out_after).abs().max() > 1e-3  # the GELU makes the order matter
    assert before.fuse(features).shape == (1, 144, 3 * VISION)  # resampled inside fuse
    assert after.fuse(features).shape == (1, 576, 3 * VISION)
    # linear maps commute with the (linear) bilinear resize: both placements agree without GELU
    first = _connector("dc-dci-clip-l-336-efficient", projector="linear")
    second = DenseConnector(first.config.replace(resample=after_projector))
    second.projector.load_state_dict(first.projector.state_dict())
    assert_close(first(features), second(features), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- dtype / gradients


def test_bf16_features_into_fp32_connector():
    connector = _connector("dc-sci-clip-l-336")
    features = _features(24, 16, dtype=torch.bfloat16)
    out = connector(features)
    assert out.dtype == torch.float32
    upcast = {k: v.float() for k, v in features.items()}
    assert_close(out, connector(upcast), **EXACT)  # concat, then an exact bf16 -> fp32 cast


@pytest.mark.parametrize("accumulate_dtype", [None, "float32"])
def test_bf16_dci_into_fp32_connector(accumulate_dtype):
    connector = _connector(
        "dc-dci-clip-l-336", fusion_changes={"accumulate_dtype": accumulate_dtype}
    )
    features = _features(24, 16, dtype=torch.bfloat16)
    fused = connector.fuse(features)
    assert fused.dtype == torch.bfloat16  # fusion stays in the features' dtype (official)
    out = connector(features)
    assert out.dtype == torch.float32
    assert_close(out, connector.projector(fused.float()), **EXACT)


def test_gradients_reach_projector_and_features():
    connector = _connector("dc-dci-clip-l-336")
    features = {k: v.requires_grad_() for k, v in _features(24, 16).items()}
    connector(features).square().sum().backward()
    for name, parameter in connector.projector.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    assert all(features[k].grad is not None and features[k].grad.abs().sum() > 0 for k in range(24))
    assert features[24].grad is None  # H[24] is never used


# ---------------------------------------------------------------------------- make_tap


@pytest.fixture(scope="module")
def tiny_clip():
    """HF CLIP tower: 3 blocks, width 8, 56 px / patch 14 (a 4 x 4 grid, 1 CLS)."""
    from mmconnect.integrations.applications.tiny_models import tiny_vision_tower

    return tiny_vision_tower(
        "clip", blocks=3, width=VISION * 2, intermediate_size=16, image_size=56
    )


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize(
    ("preset", "depth"),
    [
        ("dc-dci-clip-l-336", 24),
        ("dc-sci-clip-l-336", 24),
        ("baseline-clip-l-336", 24),
        ("dc-sti-siglip-so400m", 27),
    ],
)
def test_make_tap_on_encoder_of_other_depth(tiny_clip, preset, depth, streaming):
    connector = _connector(preset, vision_dim=VISION * 2)
    message = f"the encoder has 3 blocks but the connector config says num_layers={depth}"
    with pytest.raises(ValueError, match=message):
        connector.make_tap(tiny_clip, streaming=streaming)


def test_make_tap_on_deeper_encoder(tiny_clip):
    config = ConnectorConfig(
        fusion=SCISpec(extra_layers=(0,)), vision_dim=VISION * 2, llm_dim=LLM, num_layers=2
    )
    with pytest.raises(
        ValueError, match="the encoder has 3 blocks but the connector config says num_layers=2"
    ):
        DenseConnector(config).make_tap(tiny_clip)


@pytest.mark.parametrize("streaming", [True, False])
def test_make_tap_on_matching_encoder(tiny_clip, streaming):
    config = ConnectorConfig(
        fusion=DCISpec(groups=((0, 1), (2, 3))), vision_dim=VISION * 2, llm_dim=LLM, num_layers=3
    )
    connector = DenseConnector(config)
    pixels = _randn(0, 1, 3, 56, 56)
    with torch.no_grad():
        states = tiny_clip(pixels, output_hidden_states=True).hidden_states
        out = connector(connector.make_tap(tiny_clip, streaming=streaming)(pixels))
        expected = connector(LayerFeatures.from_hidden_states(states, num_prefix_tokens=1))
    assert out.shape == (1, 16, LLM)
    assert_close(out, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- config fingerprint


@pytest.mark.parametrize(
    "changes",
    [
        {"extra_layers": [6, 15]},
        {"kind": "dci", "groups": [[0, 1], [2, 3]]},
        {"final_layer": -1},
    ],
    ids=["other-layers", "sci-to-dci", "final-layer"],
)
def test_weights_saved_under_another_config_with_the_same_shapes_are_refused(tmp_path, changes):
    """SCI <-> DCI or other layers keep every shape: the saved fingerprint still tells them apart."""
    original = _connector("dc-sci-clip-l-336")
    original.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["fusion"] = {"final_layer": 23, **changes}
    if data["fusion"].get("kind") != "dci":
        data["fusion"] = {"kind": "sci", "extra_layers": [7, 15], **data["fusion"]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="saved with a different connector config"):
        DenseConnector.from_pretrained(tmp_path)
    edited = DenseConnector(ConnectorConfig.from_dict(data))
    with pytest.raises(ValueError, match="saved with a different connector config"):
        edited.load_state_dict(original.state_dict())


def test_equivalent_layer_spellings_share_a_fingerprint():
    negative = _connector(
        "dc-sci-clip-l-336", fusion=SCISpec(final_layer=-2, extra_layers=(-18, 15))
    )
    positive = DenseConnector(
        negative.config.replace(fusion=SCISpec(final_layer=23, extra_layers=(7, 15)))
    )
    positive.load_state_dict(negative.state_dict())
    assert torch.equal(positive.config_fingerprint, negative.config_fingerprint)


def test_accumulate_dtype_does_not_change_the_fingerprint():
    plain = _connector("dc-dci-clip-l-336")
    upcast = DenseConnector(
        plain.config.replace(fusion=plain.config.fusion.replace(accumulate_dtype="float32"))
    )
    upcast.load_state_dict(plain.state_dict())
    assert torch.equal(upcast.config_fingerprint, plain.config_fingerprint)


# ---------------------------------------------------------------------------- format-1 checkpoints

V1 = Path(__file__).parents[1] / "fixtures" / "config_v1"


def test_format1_fingerprints_are_unchanged():
    """Each format-1 fixture hashes, upgraded, to the fingerprint format 1 computed for it."""
    expected = json.loads((V1 / "fingerprints.json").read_text())
    for name, fingerprint in expected.items():
        assert config_fingerprint(ConnectorConfig.load(V1 / f"{name}.json")) == fingerprint, name


def test_format1_connector_loads_with_its_weights_and_outputs():
    connector = DenseConnector.from_pretrained(V1 / "connector_dci_resample")
    assert connector.config.to_dict()["format_version"] == 2
    assert connector.config.resample == ResampleSpec(
        grid=(2, 3), mode="avg", placement="after_projector"
    )
    saved = load_file(V1 / "connector_dci_resample" / "model.safetensors")
    state = connector.state_dict()
    assert sorted(state) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    recorded = load_file(V1 / "connector_dci_resample_io.safetensors")
    features = {int(key.split(".")[1]): value for key, value in recorded.items() if key != "output"}
    with torch.no_grad():
        output = connector(features, (4, 4))
    # Recorded on another CPU: the same weights and inputs, the matrix kernels' bits may differ.
    torch.testing.assert_close(output, recorded["output"], atol=1e-6, rtol=1e-5)


def test_format1_connector_saved_again_is_format2_and_loads(tmp_path):
    connector = DenseConnector.from_pretrained(V1 / "connector_dci_resample")
    connector.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["format_version"] == 2
    again = DenseConnector.from_pretrained(tmp_path)
    assert torch.equal(again.projector[0].weight, connector.projector[0].weight)


@pytest.mark.parametrize(
    "changes",
    [{"groups": [[0, 2], [1, 3]]}, {"resample_placement": "before_projector"}, {"final_layer": -1}],
    ids=["other-groups", "other-placement", "other-final-layer"],
)
def test_format1_connector_under_an_edited_config_is_refused(tmp_path, changes):
    """Every shape still fits, so only the fingerprint (format 1's) can tell."""
    directory = tmp_path / "connector"
    shutil.copytree(V1 / "connector_dci_resample", directory)
    data = {**json.loads((directory / "config.json").read_text()), **changes}
    (directory / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="saved with a different connector config"):
        DenseConnector.from_pretrained(directory)
