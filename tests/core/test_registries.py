"""The core's registries: fusions, resample modes, projectors and presets (issue 13).

Each registry refuses duplicates naming the existing entry, lists its names publicly, and is what
``ConnectorConfig`` consults: a name registered by a user is accepted like a built-in one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

import mmconnect
from mmconnect import (
    ConnectorConfig,
    DenseConnector,
    EncoderGeometry,
    Fusion,
    FusionSpec,
    ResampleSpec,
    STISpec,
    list_fusions,
    list_resamplers,
    preset_geometry,
    register_fusion,
    register_preset,
    register_resampler,
    resample_tokens,
)
from mmconnect import fusion as fusion_module
from mmconnect import presets as presets_module
from mmconnect import resample as resample_module
from mmconnect.fusion import require_layer
from mmconnect.integrations.cli import main
from mmconnect.presets import PUBLISHED_PRESETS

EXACT = {"atol": 0.0, "rtol": 0.0}
BASE = {"vision_dim": 4, "llm_dim": 6, "num_layers": 6}


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def isolated_fusions(monkeypatch):
    """Register into a copy of the fusion registry so no test leaks a fusion into another."""
    monkeypatch.setattr(fusion_module, "_FUSIONS", fusion_module._FUSIONS.copy())


@pytest.fixture
def isolated_resamplers(monkeypatch):
    monkeypatch.setattr(resample_module, "_RESAMPLERS", resample_module._RESAMPLERS.copy())


class LayerDifference(Fusion):
    """A toy fusion: ``F - f[l1]`` per token, ``[B, N, C] -> [B, N, C]``."""

    def forward(self, features: Mapping[int, Tensor], grid: tuple[int, int]) -> Tensor:
        return require_layer(features, self.final_layer) - require_layer(
            features, self.extra_layers[0]
        )


@dataclass(frozen=True, kw_only=True)
class DifferenceSpec(FusionSpec):
    """The toy fusion's own parameter: the one layer subtracted from the final layer."""

    kind: str = field(default="difference", init=False)
    subtracted: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.subtracted, int) or isinstance(self.subtracted, bool):
            raise TypeError(f"subtracted must be an int layer index, got {self.subtracted!r}")

    def _normalized_fields(self, num_layers: int, final_layer: int) -> dict:
        subtracted = mmconnect.normalize_layer(self.subtracted, num_layers, argument="subtracted")
        if subtracted == final_layer:
            raise ValueError(
                f"fusion 'difference' subtracts the final layer {final_layer} from itself"
            )
        return {"subtracted": subtracted}


def _build_difference(spec: DifferenceSpec) -> Fusion:
    return LayerDifference(spec.final_layer, [spec.subtracted])


# ---------------------------------------------------------------------------- fusions


def test_list_fusions_exact():
    assert list_fusions() == ["none", "sti", "sci", "dci"]
    assert mmconnect.list_fusions is list_fusions


@pytest.mark.parametrize("name", ["none", "sti", "sci", "dci"])
def test_register_fusion_refuses_builtin_duplicates(name):
    entry = fusion_module._FUSIONS[name]
    with pytest.raises(
        ValueError,
        match=rf"a fusion named '{name}' is already registered \(spec {entry.spec.__name__}, "
        rf"builder mmconnect\.fusion\.{entry.builder.__qualname__}\); pick another name",
    ):
        register_fusion(name, _build_difference)
    assert list_fusions() == ["none", "sti", "sci", "dci"]


def test_register_fusion_refuses_user_duplicates_and_bad_arguments(isolated_fusions):
    register_fusion("difference", _build_difference, spec=DifferenceSpec)
    assert list_fusions() == ["none", "sti", "sci", "dci", "difference"]
    with pytest.raises(
        ValueError,
        match=r"'difference' is already registered \(spec DifferenceSpec, builder .*_build_difference\)",
    ):
        register_fusion("difference", _build_difference)
    with pytest.raises(ValueError, match="fusion name must be a non-empty str, got ''"):
        register_fusion("", _build_difference)
    with pytest.raises(TypeError, match="fusion builder must be callable, got str"):
        register_fusion("other", "LayerDifference")
    with pytest.raises(TypeError, match="spec must be a FusionSpec subclass, got 3"):
        register_fusion("other", _build_difference, spec=3)
    with pytest.raises(ValueError, match="spec DifferenceSpec fixes kind='difference'"):
        register_fusion("other", _build_difference, spec=DifferenceSpec)
    assert "other" not in list_fusions()


def test_user_fusion_is_accepted_by_the_config_and_runs(isolated_fusions):
    unregistered = (
        r"fusion kind must be one of \('none', 'sti', 'sci', 'dci'\), got 'difference'; a new "
        r"fusion is registered with mmconnect.register_fusion before a config names it"
    )
    with pytest.raises(ValueError, match=unregistered):
        ConnectorConfig(fusion=DifferenceSpec(subtracted=1), **BASE)
    unregistered_registry = fusion_module._FUSIONS.copy()  # what a fresh process has
    register_fusion("difference", _build_difference, spec=DifferenceSpec)
    config = ConnectorConfig(fusion=DifferenceSpec(subtracted=1), **BASE)
    # The spec's own checks run while the config validates itself, with the encoder depth.
    with pytest.raises(TypeError, match="subtracted must be an int layer index"):
        DifferenceSpec(subtracted="1")
    with pytest.raises(ValueError, match=r"fusion 'difference' subtracts the final layer 5"):
        ConnectorConfig(fusion=DifferenceSpec(subtracted=-2), **BASE)
    with pytest.raises(
        ValueError, match=r"fusion kind 'difference' needs the parameters \['subtracted'\]"
    ):
        ConnectorConfig(fusion="difference", **BASE)
    # Saved and read back like a built-in, its parameters in its own spec ...
    assert config.to_dict()["fusion"] == {"kind": "difference", "final_layer": -2, "subtracted": 1}
    assert ConnectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown keys \['groups'\] for fusion kind 'difference'"):
        ConnectorConfig.from_dict(
            {**config.to_dict(), "fusion": {**config.fusion.to_dict(), "groups": []}}
        )
    # ... and read in a process that has not registered it: the error says what to do.
    registered = fusion_module._FUSIONS
    fusion_module._FUSIONS = unregistered_registry
    try:
        with pytest.raises(ValueError, match=unregistered):
            ConnectorConfig.from_dict(config.to_dict())
    finally:
        fusion_module._FUSIONS = registered

    torch.manual_seed(0)
    connector = DenseConnector(config)
    assert isinstance(connector.fusion, LayerDifference)
    assert connector.captured_layers == (1, 5)
    features = {layer: _randn(layer, 2, 6, 4) for layer in (1, 5)}
    expected = connector.projector(features[5] - features[1])
    assert_close(connector(features, (2, 3)), expected, **EXACT)
    assert connector.num_tokens((2, 3)) == 6


def test_fusion_builder_must_return_a_fusion(isolated_fusions):
    register_fusion("broken", lambda spec: torch.nn.Identity())
    config = ConnectorConfig(fusion=FusionSpec(kind="broken"), **BASE)
    assert ConnectorConfig(fusion="broken", **BASE) == config  # no parameters: the name is enough
    with pytest.raises(
        TypeError,
        match=r"the builder of fusion 'broken' returned Identity, expected a mmconnect.fusion.Fusion",
    ):
        DenseConnector(config)


# ---------------------------------------------------------------------------- resamplers


def test_list_resamplers_exact():
    assert list_resamplers() == ["bilinear", "avg", "max"]
    assert mmconnect.list_resamplers is list_resamplers


def test_register_resampler_refuses_duplicates(isolated_resamplers):
    with pytest.raises(
        ValueError, match=r"a resample mode named 'avg' is already registered .*adaptive_avg_pool2d"
    ):
        register_resampler("avg", F.adaptive_max_pool2d)
    with pytest.raises(ValueError, match="resample mode name must be a non-empty str"):
        register_resampler("", F.adaptive_max_pool2d)
    with pytest.raises(TypeError, match="resize must be callable, got NoneType"):
        register_resampler("nearest", None)


def _nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(maps, size=size, mode="nearest")


def test_user_resampler_is_accepted_by_the_config_and_runs(isolated_resamplers):
    with pytest.raises(
        ValueError,
        match=r"mode must be one of \('bilinear', 'avg', 'max'\), got 'nearest'; "
        r"a new mode is registered with mmconnect.register_resampler first",
    ):
        ResampleSpec(grid=(2, 2), mode="nearest")
    register_resampler("nearest", _nearest, enlarges=True)
    assert list_resamplers() == ["bilinear", "avg", "max", "nearest"]
    config = ConnectorConfig(
        fusion="none",
        resample=ResampleSpec(grid=(2, 2), mode="nearest"),
        projector="identity",
        **{**BASE, "llm_dim": 4},
    )
    connector = DenseConnector(config)
    tokens = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 4)  # a 4x4 grid, value = index
    out = connector({5: tokens}, (4, 4))
    # nearest from 4x4 to 2x2 keeps the tokens at rows / columns 0 and 2.
    assert out[0, :, 0].tolist() == [0.0, 2.0, 8.0, 10.0]
    assert connector.num_tokens((4, 4)) == 4


def test_resampler_that_may_not_enlarge_is_refused_a_larger_target(isolated_resamplers):
    register_resampler("shrink_only", _nearest)
    with pytest.raises(ValueError, match="pooling target 3x3 is larger than the 2x2 grid"):
        resample_tokens(torch.zeros(1, 4, 2), (2, 2), (3, 3), mode="shrink_only")


def test_resampler_returning_another_grid_is_an_error(isolated_resamplers):
    register_resampler("wrong", lambda maps, size: maps)
    with pytest.raises(RuntimeError, match=r"resample mode 'wrong' returned a \(4, 4\) grid, "):
        resample_tokens(torch.zeros(1, 16, 2), (4, 4), (2, 2), mode="wrong")


# ---------------------------------------------------------------------------- presets


@pytest.fixture
def isolated_presets(monkeypatch):
    monkeypatch.setattr(presets_module, "_PRESETS", presets_module._PRESETS.copy())


CLIP = EncoderGeometry(
    image_size=336, patch_size=14, num_layers=24, num_prefix_tokens=1, width=1024
)
SIGLIP = EncoderGeometry(
    image_size=384, patch_size=14, num_layers=27, num_prefix_tokens=0, width=1152
)
#: A 12-block ViT-B/16 at 224 x 320 pixels: a depth and a grid no built-in preset has.
VIT_B = EncoderGeometry(
    image_size=(224, 320), patch_size=16, num_layers=12, num_prefix_tokens=1, width=768
)
VIT_B_FIELDS = {
    "fusion": STISpec(extra_layers=(3, 7), window=4),
    "vision_dim": 768,
    "llm_dim": 2048,
    "num_layers": 12,
}


@pytest.mark.parametrize("name", PUBLISHED_PRESETS)
def test_builtin_presets_carry_their_encoder_geometry(name):
    expected = CLIP if "clip-l-336" in name else SIGLIP
    assert preset_geometry(name) == expected
    assert preset_geometry(name).num_layers == ConnectorConfig.from_preset(name).num_layers


def test_encoder_geometry_grid_and_validation():
    assert CLIP.grid == (24, 24)
    assert SIGLIP.grid == (27, 27)  # 384 // 14, as the stride-14 patch convolution gives
    assert VIT_B.grid == (14, 20)
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        EncoderGeometry(image_size=224, patch_size=0, num_layers=12, num_prefix_tokens=1, width=8)
    with pytest.raises(ValueError, match=r"num_prefix_tokens must be a non-negative int, got -1"):
        EncoderGeometry(image_size=224, patch_size=16, num_layers=12, num_prefix_tokens=-1, width=8)
    with pytest.raises(TypeError, match=r"^width must be a positive int, got '8' \(str\)$"):
        EncoderGeometry(
            image_size=224, patch_size=16, num_layers=12, num_prefix_tokens=1, width="8"
        )
    with pytest.raises(
        ValueError,
        match=r"^image_size must be a \(height, width\) pair of positive ints, got \[224\]",
    ):
        EncoderGeometry(
            image_size=[224], patch_size=16, num_layers=12, num_prefix_tokens=1, width=8
        )
    with pytest.raises(TypeError, match=r"^image_size must be a positive int, got 224.0 \(float\)"):
        EncoderGeometry(
            image_size=224.0, patch_size=16, num_layers=12, num_prefix_tokens=1, width=8
        )
    with pytest.raises(ValueError, match=r"image_size=\(8, 224\) is smaller than patch_size=16"):
        EncoderGeometry(
            image_size=(8, 224), patch_size=16, num_layers=12, num_prefix_tokens=1, width=8
        )


def test_register_preset_refuses_duplicates_and_mismatches(isolated_presets):
    with pytest.raises(
        ValueError,
        match=r"a preset named 'dc-sti-clip-l-336' is already registered \(fusion 'sti', "
        r"num_layers=24\); pick another name",
    ):
        register_preset("dc-sti-clip-l-336", VIT_B_FIELDS, geometry=VIT_B)
    with pytest.raises(
        ValueError, match=r"preset 'vit': num_layers=12 but its geometry says num_layers=24"
    ):
        register_preset("vit", VIT_B_FIELDS, geometry=CLIP)
    with pytest.raises(
        ValueError, match=r"preset 'vit': vision_dim=768 but its geometry says width=1152"
    ):
        register_preset("vit", {**VIT_B_FIELDS, "num_layers": 27}, geometry=SIGLIP)
    with pytest.raises(ValueError, match=r"preset 'vit': extra_layers\[1\]=13 is out of range"):
        register_preset(
            "vit", {**VIT_B_FIELDS, "fusion": STISpec(extra_layers=(3, 13))}, geometry=VIT_B
        )
    with pytest.raises(TypeError, match="geometry must be an EncoderGeometry, got tuple"):
        register_preset("vit", VIT_B_FIELDS, geometry=(224, 16))
    assert "vit" not in mmconnect.list_presets()
    with pytest.raises(ValueError, match=r"unknown preset 'vit'; known presets: .*baseline-clip"):
        preset_geometry("vit")


def test_registered_preset_of_another_depth_is_listed_by_the_cli(isolated_presets, capsys):
    register_preset("dc-sti-vit-b-16", VIT_B_FIELDS, geometry=VIT_B)
    assert preset_geometry("dc-sti-vit-b-16") == VIT_B
    assert ConnectorConfig.from_preset("dc-sti-vit-b-16").num_layers == 12
    assert main(["presets"]) == 0  # a depth the CLI used to look up in a fixed table: KeyError
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(rows) == mmconnect.list_presets()
    # 14 x 20 = 280 tokens, plus two layers raster-pooled by 4: 2 * 70.
    assert rows["dc-sti-vit-b-16"][-2:] == ["420", "768"]
    assert rows["dc-sti-clip-l-336"][-2:] == ["720", "1024"]
