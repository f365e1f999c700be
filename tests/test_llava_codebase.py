"""``swap_connector``: a Dense Connector in code derived from the original LLaVA repository.

The LLaVA classes below reproduce the calling pattern of the original repository (its
``CLIPVisionTower`` wrapper and ``LlavaMetaForCausalLM.encode_images``); they are written here
from that pattern, nothing is imported from LLaVA. The CLIP tower is tiny (width 16) but has
CLIP-L's 24 blocks, so every CLIP preset applies; forwards run at 112 px (an 8x8 grid), token
counts are also checked at 336 px (24x24).
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures  # noqa: E402
from mmconnect.integrations.llava_codebase import DenseVisionTower, swap_connector  # noqa: E402

VISION, LLM = 16, 32
EXACT = {"atol": 1e-6, "rtol": 0.0}
CLIP_PRESETS = [
    "baseline-clip-l-336",
    "dc-sti-clip-l-336",
    "dc-sci-clip-l-336",
    "dc-dci-clip-l-336",
    "dc-dci-clip-l-336-efficient",
]


# ---------------------------------------------------------------------------- LLaVA's pattern


class CLIPVisionTower(nn.Module):
    """The original LLaVA tower wrapper: HF CLIP at ``.vision_tower``, ``hidden_states[-2]``
    without CLS, run under ``no_grad``."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.is_loaded = True
        self.select_layer = -2
        self.select_feature = "patch"
        self.vision_tower = CLIPVisionModel(config).eval()
        self.vision_tower.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images):
        if isinstance(images, list):
            return [self._features(image.unsqueeze(0)) for image in images]
        return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(
            images.to(device=self.device, dtype=self.dtype), output_hidden_states=True
        )
        return out.hidden_states[self.select_layer][:, 1:].to(images.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


class LlavaLlamaModel(nn.Module):
    """``LlavaMetaModel``'s part: the tower and ``mm_projector`` (``mlp2x_gelu``)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionTower(config)
        self.mm_projector = nn.Sequential(
            nn.Linear(config.hidden_size, LLM), nn.GELU(), nn.Linear(LLM, LLM)
        )

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        if type(vision_tower) is list:
            vision_tower = vision_tower[0]
        return vision_tower


class LlavaLlamaForCausalLM(nn.Module):
    """``LlavaMetaForCausalLM``'s ``encode_images``, exactly as the original code has it."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.model = LlavaLlamaModel(config)

    def get_model(self) -> LlavaLlamaModel:
        return self.model

    def encode_images(self, images):
        image_features = self.get_model().get_vision_tower()(images)
        image_features = self.get_model().mm_projector(image_features)
        return image_features


def clip_config(image_size: int = 112) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=VISION,
        intermediate_size=2 * VISION,
        num_hidden_layers=24,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )


def build_llava(image_size: int = 112, seed: int = 0) -> LlavaLlamaForCausalLM:
    torch.manual_seed(seed)
    return LlavaLlamaForCausalLM(clip_config(image_size))


def connector(preset: str, seed: int = 1, **overrides) -> DenseConnector:
    torch.manual_seed(seed)
    config = ConnectorConfig.from_preset(
        preset, **{"vision_dim": VISION, "llm_dim": LLM, **overrides}
    )
    return DenseConnector(config)


def official_keys(projector: nn.Module) -> dict[str, torch.Tensor]:
    """A projector's weights as the original code saves them in ``mm_projector.bin``."""
    return {f"model.mm_projector.{key}": value for key, value in projector.state_dict().items()}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- drop-in behaviour


@pytest.mark.parametrize("preset", CLIP_PRESETS)
def test_encode_images_gives_the_connector_on_the_tap(preset, images):
    llava = build_llava()
    hf_clip = llava.get_model().get_vision_tower().vision_tower
    dense = connector(preset)
    with torch.no_grad():
        expected = dense(dense.make_tap(hf_clip)(images))
    swap_connector(llava.get_model(), dense)
    assert llava.get_model().mm_projector is dense
    assert isinstance(llava.get_model().get_vision_tower(), DenseVisionTower)
    with torch.no_grad():
        tokens = llava.encode_images(images)
    assert tokens.shape == (2, dense.num_tokens((8, 8)), LLM)
    assert torch.equal(tokens, expected)


def test_baseline_reproduces_the_original_encode_images(images):
    llava = build_llava()
    with torch.no_grad():
        original = llava.encode_images(images)
    baseline = connector("baseline-clip-l-336")
    baseline.load_projector_weights(official_keys(llava.get_model().mm_projector))
    swap_connector(llava.get_model(), baseline)
    with torch.no_grad():
        swapped = llava.encode_images(images)
    assert swapped.shape == original.shape == (2, 64, LLM)
    assert_close(swapped, original, **EXACT)


def test_tower_attributes_still_answer():
    llava = build_llava(image_size=336)  # no forward: only attributes and token counts
    original = llava.get_model().get_vision_tower()
    assert original.num_patches == 576
    for preset, tokens in [
        ("baseline-clip-l-336", 576),
        ("dc-sti-clip-l-336", 720),
        ("dc-dci-clip-l-336", 576),
        ("dc-dci-clip-l-336-efficient", 144),
    ]:
        swap_connector(llava.get_model(), connector(preset))  # swapping again replaces the last
        tower = llava.get_model().get_vision_tower()
        assert tower.tower is original  # wraps the original wrapper, not a previous swap
        assert tower.num_patches == tokens, preset
        assert tower.hidden_size == VISION
        assert tower.config is original.config
        assert tower.dtype == torch.float32
        assert tower.device == torch.device("cpu")
        assert tower.is_loaded and tower.select_layer == -2
        assert tower.num_patches_per_side == 24


def test_list_of_images(images):
    llava = build_llava()
    dense = connector("dc-sti-clip-l-336")
    swap_connector(llava.get_model(), dense)
    tower = llava.get_model().get_vision_tower()
    with torch.no_grad():
        batched = llava.encode_images(images)
        features = tower([images[0], images[1:2]])  # [3, H, W] and [1, 3, H, W]
        each = [llava.get_model().mm_projector(item) for item in features]
    assert isinstance(features, list) and len(features) == 2
    assert all(isinstance(item, LayerFeatures) for item in features)
    assert [tuple(item.shape) for item in each] == [(1, 80, LLM)] * 2  # 64 + 8 + 8 (STI)
    assert_close(torch.cat(each), batched, **EXACT)


def test_tower_held_in_a_list_is_unwrapped(images):
    """LLaVA keeps a not-yet-loaded tower in a list (``vision_tower = [tower]``) for FSDP."""
    llava = build_llava()
    model = llava.get_model()
    original = model.vision_tower
    del model.vision_tower  # LLaVA assigns the list before any module is registered there
    model.vision_tower = [original]
    swap_connector(model, connector("dc-sci-clip-l-336"))
    assert model.get_vision_tower().tower is original
    assert llava.encode_images(images).shape == (2, 64, LLM)


def test_connector_trains_through_encode_images(images):
    """The tower stays frozen as in LLaVA's recipe; the connector gets gradients."""
    llava = build_llava()
    dense = connector("dc-dci-clip-l-336")
    swap_connector(llava.get_model(), dense)
    llava.encode_images(images).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dense.parameters())
    assert all(p.grad is None for p in llava.get_model().get_vision_tower().parameters())


# ---------------------------------------------------------------------------- checkpoints


def test_state_dict_holds_the_tower_once(tmp_path):
    llava = build_llava()
    before = len(llava.state_dict())
    swap_connector(llava.get_model(), connector("dc-sci-clip-l-336"))
    state = llava.state_dict()
    # Same tensors: tower once, the connector's projector in place of the MLP, plus its config fingerprint.
    assert len(state) == before + 1
    assert "model.mm_projector.config_fingerprint" in state
    assert "model.vision_tower.tower.vision_tower.post_layernorm.weight" in state
    assert "model.mm_projector.projector.0.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))


def test_projector_saved_by_llava_code_after_the_swap_loads_back(tmp_path):
    """Stage 1 of LLaVA's training saves the keys matching ``mm_projector``; both its own loader
    (``initialize_vision_modules``) and ``load_projector_weights`` read that file back."""
    llava = build_llava()
    trained = connector("dc-dci-clip-l-336", seed=5)
    swap_connector(llava.get_model(), trained)
    saved = {k: v for k, v in llava.state_dict().items() if "mm_projector" in k}
    path = tmp_path / "mm_projector.bin"
    torch.save(saved, path)

    fresh = connector("dc-dci-clip-l-336", seed=6)
    fresh.load_projector_weights(path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True)
    )

    # LLaVA's own loader: strip everything up to "mm_projector." and load_state_dict
    again = build_llava()
    swap_connector(again.get_model(), connector("dc-dci-clip-l-336", seed=7))
    weights = torch.load(path, weights_only=True)
    again.get_model().mm_projector.load_state_dict(
        {k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector" in k}
    )
    assert torch.equal(
        again.get_model().mm_projector.projector[0].weight, trained.projector[0].weight
    )


def test_dense_connector_checkpoint_into_llava_code(tmp_path, images):
    trained = connector("dc-sti-clip-l-336", seed=3)
    trained.save_pretrained(tmp_path / "connector")
    llava = build_llava()
    swap_connector(llava.get_model(), DenseConnector.from_pretrained(tmp_path / "connector"))
    reference = build_llava()
    swap_connector(reference.get_model(), trained)
    with torch.no_grad():
        assert torch.equal(llava.encode_images(images), reference.encode_images(images))


# ---------------------------------------------------------------------------- bad input


def test_object_without_mm_projector():
    class OnlyTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = CLIPVisionTower(clip_config())

    with pytest.raises(ValueError, match=re.escape("OnlyTower has no 'mm_projector'")):
        swap_connector(OnlyTower(), connector("dc-sci-clip-l-336"))


def test_whole_model_instead_of_get_model():
    llava = build_llava()
    with pytest.raises(ValueError, match=r"has no 'vision_tower'.*model\.get_model\(\)"):
        swap_connector(llava, connector("dc-sci-clip-l-336"))


def test_width_mismatch():
    llava = build_llava()
    original = llava.get_model().mm_projector
    wide = connector("dc-sci-clip-l-336", vision_dim=24)
    with pytest.raises(
        ValueError,
        match=re.escape("connector vision_dim=24 does not match the tower's hidden_size (16)"),
    ):
        swap_connector(llava.get_model(), wide)
    assert llava.get_model().mm_projector is original  # nothing changed


def test_depth_mismatch():
    llava = build_llava()
    with pytest.raises(ValueError, match=r"the encoder has 24 blocks but .* num_layers=27"):
        swap_connector(llava.get_model(), connector("dc-sci-siglip-so400m"))
