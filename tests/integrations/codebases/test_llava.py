"""``swap_connector``: a Dense Connector in code derived from the original LLaVA repository.

The LLaVA classes of tests/support/llava_codebase_toys.py reproduce the behaviour of
haotian-liu/LLaVA (commit c121f04, transformers 4.37.2) on the paths the adapter touches; they
are written there from that behaviour, nothing is imported from LLaVA (CI cannot install
transformers 4.37.2 beside 5.x):

* ``CLIPVisionTower`` loads its HF CLIP from a name (here a local directory) in ``load_model``,
  built with ``delay_load`` inside ``from_pretrained``, and returns ``hidden_states[-2]``
  without CLS in the images' dtype, under ``no_grad``;
* ``build_vision_projector`` accepts ``linear``, ``mlpNx_gelu`` and ``identity`` and raises
  ``ValueError: Unknown projector type`` for anything else;
* ``initialize_vision_modules`` writes the model args into the config and loads
  ``pretrain_mm_mlp_adapter`` with a strict ``load_state_dict`` of the keys after
  ``mm_projector.``; stage 1 saves ``named_parameters()`` only (no buffers);
* the LLM consumes the projector's output in the model's dtype (LLaVA's builder loads fp16);
* ``merge_image_features`` is LLaVA-1.6's AnyRes packing: base view first, the crops reshaped by
  ``num_patches_per_side`` (with its ``assert``), unpadded and given a newline column.

The CLIP tower is tiny (width 16) but has CLIP-L's 24 blocks, so every CLIP preset applies;
forwards run at 112 px (an 8x8 grid), token counts are also checked at 336 px (24x24).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")


from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures, ResampleSpec  # noqa: E402
from mmconnect.integrations.codebases.llava import (  # noqa: E402
    CONFIG_KEY,
    DENSE_PROJECTOR_TYPE,
    DenseVisionTower,
    load_pretrained,
    restore_connector,
    save_pretrained,
    swap_connector,
)
from tests.support.llava_codebase_toys import (  # noqa: E402
    LLM,
    VISION,
    VOCAB,
    CLIPVisionTower,
    LlavaConfig,
    LlavaLlamaForCausalLM,
    connector,
    llava_config,
    save_clip,
)

EXACT = {"atol": 1e-6, "rtol": 0.0}
DTYPES = [torch.float32, torch.bfloat16]
CLIP_PRESETS = [
    "baseline-clip-l-336",
    "dc-sti-clip-l-336",
    "dc-sci-clip-l-336",
    "dc-dci-clip-l-336",
    "dc-dci-clip-l-336-efficient",
]


# ---------------------------------------------------------------------------- LLaVA's classes


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory) -> dict[int, Path]:
    """Tiny random CLIP towers saved where LLaVA's tower loads them from, by image size."""
    return {size: save_clip(tmp_path_factory.mktemp(f"clip{size}"), size) for size in (112, 336)}


@pytest.fixture
def build_llava(clip_dirs):
    """``build_llava(image_size=112, seed=0, dtype=None, **config)``: a loaded LLaVA model, cast
    to ``dtype`` with its tower as LLaVA's builder does."""

    def build(image_size: int = 112, seed: int = 0, dtype=None, **overrides):
        torch.manual_seed(seed)
        model = LlavaLlamaForCausalLM(llava_config(clip_dirs[image_size], **overrides))
        model.get_vision_tower().load_model()
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    return build


def official_keys(projector: nn.Module) -> dict[str, torch.Tensor]:
    """A projector's weights as the original code saves them in ``mm_projector.bin``."""
    return {f"model.mm_projector.{key}": value for key, value in projector.state_dict().items()}


def adapter_args(path: Path | None) -> SimpleNamespace:
    return SimpleNamespace(pretrain_mm_mlp_adapter=path, mm_projector_type="mlp2x_gelu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- drop-in behaviour


@pytest.mark.parametrize("preset", CLIP_PRESETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_images_gives_the_connector_on_the_tap(preset, dtype, images, build_llava):
    """In fp32 and bf16 (model and connector alike) LLaVA's own ``encode_images`` gives the
    connector's output on a tap of the tower, bit for bit."""
    llava = build_llava(dtype=dtype)
    hf_clip = llava.get_model().get_vision_tower().vision_tower
    dense = connector(preset).to(dtype)
    with torch.no_grad():
        expected = dense(dense.make_tap(hf_clip)(images.to(dtype)))
    swap_connector(llava.get_model(), dense)
    assert llava.get_model().mm_projector is dense
    assert isinstance(llava.get_model().get_vision_tower(), DenseVisionTower)
    with torch.no_grad():
        tokens = llava.encode_images(images.to(dtype))
    assert tokens.shape == (2, dense.num_tokens((8, 8)), LLM)
    assert tokens.dtype == dtype
    assert torch.equal(tokens, expected)


def test_baseline_reproduces_the_original_encode_images(images, build_llava):
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


def test_tower_attributes_still_answer(build_llava):
    llava = build_llava(image_size=336)  # no forward: only attributes and token counts
    original = llava.get_model().get_vision_tower()
    assert original.num_patches == 576
    for preset, tokens, side in [
        ("baseline-clip-l-336", 576, 24),
        ("dc-sci-clip-l-336", 576, 24),
        ("dc-dci-clip-l-336", 576, 24),
        ("dc-dci-clip-l-336-efficient", 144, 12),
    ]:
        swap_connector(llava.get_model(), connector(preset))  # swapping again replaces the last
        tower = llava.get_model().get_vision_tower()
        assert tower.tower is original  # wraps the original wrapper, not a previous swap
        assert tower.num_patches == tokens, preset
        assert tower.num_patches_per_side == side, preset  # the connector's grid, not the tower's
        assert tower.hidden_size == VISION
        assert tower.config is original.config
        assert tower.dtype == torch.float32
        assert tower.device == torch.device("cpu")
        assert tower.is_loaded and tower.select_layer == -2


def test_sti_has_no_grid_side(build_llava):
    llava = build_llava(image_size=336)
    swap_connector(llava.get_model(), connector("dc-sti-clip-l-336"))  # flat merge: fine
    tower = llava.get_model().get_vision_tower()
    assert tower.num_patches == 720
    with pytest.raises(ValueError, match=r"'sti' connector gives 720 tokens per image on a 24x24"):
        _ = tower.num_patches_per_side


def test_list_of_images(images, build_llava):
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


def test_tower_held_in_a_list_is_unwrapped(images, build_llava):
    """LLaVA keeps a not-yet-loaded tower in a list (``vision_tower = [tower]``) for FSDP."""
    llava = build_llava()
    model = llava.get_model()
    original = model.vision_tower
    del model.vision_tower  # LLaVA assigns the list before any module is registered there
    model.vision_tower = [original]
    swap_connector(model, connector("dc-sci-clip-l-336"))
    assert model.get_vision_tower().tower is original
    assert llava.encode_images(images).shape == (2, 64, LLM)


def test_connector_trains_through_encode_images(images, build_llava):
    """The tower stays frozen as in LLaVA's recipe; the connector gets gradients."""
    llava = build_llava()
    dense = connector("dc-dci-clip-l-336")
    swap_connector(llava.get_model(), dense)
    llava.encode_images(images).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dense.parameters())
    assert all(p.grad is None for p in llava.get_model().get_vision_tower().parameters())


# ---------------------------------------------------------------------------- AnyRes spatial merge


def test_efficient_dci_packs_anyres_crops_with_spatial_unpad(build_llava):
    """LLaVA-1.6 reshapes every crop by ``num_patches_per_side``: the efficient DCI's 12x12."""
    llava = build_llava(
        mm_patch_merge_type="spatial_unpad",
        image_aspect_ratio="anyres",
        image_grid_pinpoints=[[224, 224]],  # 2 x 2 crops of 112 px
    )
    swap_connector(llava.get_model(), connector("dc-dci-clip-l-336-efficient"))
    views = torch.randn(1, 5, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        (merged,) = llava.merge_image_features(views, [(300, 200)])
        base = llava.encode_images(views[:, 0])
    # base 144, then the 24 x 24 crop grid unpadded to 16 rows (300 x 200 image) + 1 newline column
    assert merged.shape == (144 + 16 * 25, LLM)
    assert torch.equal(merged[:144], base[0])


def test_sti_with_a_spatial_merge_is_refused(build_llava):
    llava = build_llava(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres")
    original = llava.get_model().mm_projector
    with pytest.raises(
        ValueError,
        match=r"mm_patch_merge_type='spatial_unpad' reshapes each image's tokens into a square "
        r"grid, which this connector cannot give: the 'sti' connector gives 80 tokens",
    ):
        swap_connector(llava.get_model(), connector("dc-sti-clip-l-336"))
    assert llava.get_model().mm_projector is original  # nothing changed


def test_non_square_resample_grid_with_a_spatial_merge_is_refused(build_llava):
    llava = build_llava(mm_patch_merge_type="spatial")
    wide = connector("dc-dci-clip-l-336-efficient", resample=ResampleSpec(grid=(6, 12)))
    with pytest.raises(ValueError, match=r"'dci' connector gives 72 tokens per image on a 6x12"):
        swap_connector(llava.get_model(), wide)


# ---------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16], ids=str)  # LLaVA's builder: fp16
def test_fresh_connector_takes_the_model_dtype(dtype, images, build_llava):
    """LLaVA's builder loads the model in half precision; a fresh fp32 connector must follow."""
    llava = build_llava(dtype=dtype)
    dense = connector("dc-dci-clip-l-336")
    swap_connector(llava.get_model(), dense)
    assert all(p.dtype == dtype for p in llava.get_model().mm_projector.parameters())
    assert llava.get_model().mm_projector.config_fingerprint.dtype == torch.int64
    with torch.no_grad():
        logits = llava(images.to(dtype))
    assert logits.dtype == dtype and logits.shape == (2, 64, VOCAB)


# ---------------------------------------------------------------------------- checkpoints


def test_state_dict_holds_the_tower_once(tmp_path, build_llava):
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


def stage1_projector_file(tmp_path: Path, build_llava, preset: str = "dc-dci-clip-l-336"):
    """What LLaVA's stage 1 writes after the swap: ``named_parameters()`` matching mm_projector."""
    llava = build_llava()
    trained = connector(preset, seed=5)
    swap_connector(llava.get_model(), trained)
    saved = {k: v.detach().clone() for k, v in llava.named_parameters() if "mm_projector" in k}
    path = tmp_path / "mm_projector.bin"
    torch.save(saved, path)
    return path, saved, trained


def test_llava_stage1_file_loads_through_llavas_strict_loader(tmp_path, build_llava):
    path, saved, trained = stage1_projector_file(tmp_path, build_llava)
    assert "model.mm_projector.config_fingerprint" not in saved  # parameters only
    again = build_llava(seed=2)
    swap_connector(again.get_model(), connector("dc-dci-clip-l-336", seed=7))
    again.get_model().initialize_vision_modules(adapter_args(path))  # strict load_state_dict
    loaded = again.get_model().mm_projector.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in trained.state_dict().items())


def test_stage1_file_loads_with_load_projector_weights(tmp_path, build_llava):
    path, _, trained = stage1_projector_file(tmp_path, build_llava)
    fresh = connector("dc-dci-clip-l-336", seed=6)
    fresh.load_projector_weights(path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True)
    )


def test_strict_load_still_lists_a_missing_parameter(tmp_path, build_llava):
    path, saved, _ = stage1_projector_file(tmp_path, build_llava)
    del saved["model.mm_projector.projector.2.bias"]
    torch.save(saved, path)
    again = build_llava()
    swap_connector(again.get_model(), connector("dc-dci-clip-l-336"))
    with pytest.raises(
        RuntimeError,
        match=r'Missing key\(s\) in state_dict: "config_fingerprint", "projector.2.bias"',
    ):
        again.get_model().initialize_vision_modules(adapter_args(path))


def test_stage1_file_of_another_connector_config_is_refused(tmp_path, build_llava):
    """A file saved with its fingerprint (a full state_dict) still gets the config check."""
    llava = build_llava()
    swap_connector(llava.get_model(), connector("dc-sci-clip-l-336"))
    path = tmp_path / "mm_projector.bin"
    torch.save({k: v for k, v in llava.state_dict().items() if "mm_projector" in k}, path)
    again = build_llava()
    swap_connector(again.get_model(), connector("dc-dci-clip-l-336"))  # same shapes, other config
    with pytest.raises(ValueError, match="saved with a different connector config"):
        again.get_model().initialize_vision_modules(adapter_args(path))


def test_dense_connector_checkpoint_into_llava_code(tmp_path, images, build_llava):
    trained = connector("dc-sti-clip-l-336", seed=3)
    trained.save_pretrained(tmp_path / "connector")
    llava = build_llava()
    swap_connector(llava.get_model(), DenseConnector.from_pretrained(tmp_path / "connector"))
    reference = build_llava()
    swap_connector(reference.get_model(), trained)
    with torch.no_grad():
        assert torch.equal(llava.encode_images(images), reference.encode_images(images))


# ---------------------------------------------------------------------------- save / reload


def test_swap_records_the_connector_in_the_model_config(build_llava):
    llava = build_llava()
    dense = connector("dc-dci-clip-l-336-efficient")
    swap_connector(llava.get_model(), dense)
    assert llava.config.mm_projector_type == DENSE_PROJECTOR_TYPE
    assert llava.config.mm_dense_original_projector_type == "mlp2x_gelu"
    assert ConnectorConfig.from_dict(getattr(llava.config, CONFIG_KEY)) == dense.config
    swap_connector(llava.get_model(), connector("dc-sci-clip-l-336"))  # a second swap
    assert llava.config.mm_dense_original_projector_type == "mlp2x_gelu"  # not "dense_connector"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_save_and_reload_a_swapped_model(dtype, tmp_path, images, build_llava):
    llava = build_llava(dtype=dtype)
    swap_connector(llava.get_model(), connector("dc-dci-clip-l-336-efficient", seed=9))
    # LLaVA's initialize_vision_modules rewrites mm_projector_type after the swap
    llava.get_model().initialize_vision_modules(adapter_args(None))
    assert llava.config.mm_projector_type == "mlp2x_gelu"
    with torch.no_grad():
        expected = llava.encode_images(images.to(dtype))
    save_pretrained(llava, tmp_path / "swapped")

    again = load_pretrained(LlavaLlamaForCausalLM, tmp_path / "swapped", dtype=dtype)
    assert isinstance(again.get_model().mm_projector, DenseConnector)
    with torch.no_grad():
        tokens = again.encode_images(images.to(dtype))
    assert tokens.dtype == dtype
    assert torch.equal(tokens, expected)


def test_plain_reload_of_a_swapped_model_is_refused(tmp_path, build_llava):
    """Without the adapter, LLaVA would build a fresh random mm_projector: it refuses instead."""
    llava = build_llava()
    swap_connector(llava.get_model(), connector("dc-dci-clip-l-336"))
    llava.save_pretrained(tmp_path / "swapped")  # even without our save_pretrained
    with pytest.raises(ValueError, match="Unknown projector type: dense_connector"):
        LlavaLlamaForCausalLM.from_pretrained(tmp_path / "swapped")


def test_restore_connector_on_a_model_loaded_by_other_means(tmp_path, images, build_llava):
    llava = build_llava()
    swap_connector(llava.get_model(), connector("dc-sci-clip-l-336", seed=4))
    with torch.no_grad():
        expected = llava.encode_images(images)
    save_pretrained(llava, tmp_path / "swapped", safe_serialization=True)
    config = LlavaConfig.from_pretrained(tmp_path / "swapped")
    config.mm_projector_type = "mlp2x_gelu"  # e.g. a builder that patches the config itself
    again = LlavaLlamaForCausalLM.from_pretrained(tmp_path / "swapped", config=config)
    again.get_vision_tower().load_model()
    restore_connector(again, tmp_path / "swapped")
    with torch.no_grad():
        assert torch.equal(again.encode_images(images), expected)


def test_restore_connector_from_shards_and_bin(tmp_path, images, build_llava):
    """Sharded safetensors (with their index) and LLaVA-era ``pytorch_model.bin`` files."""
    llava = build_llava()
    swap_connector(llava.get_model(), connector("dc-dci-clip-l-336", seed=8))
    with torch.no_grad():
        expected = llava.encode_images(images)
    save_pretrained(llava, tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    state = {k: v.contiguous() for k, v in llava.state_dict().items()}
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    for directory in ("sharded", "bin"):
        again = build_llava(seed=1)
        again.config = llava.config  # the saved config, record included
        again.get_model().config = llava.config
        restore_connector(again, tmp_path / directory)
        with torch.no_grad():
            assert torch.equal(again.encode_images(images), expected), directory


def test_reload_of_an_unswapped_checkpoint_is_refused(tmp_path, build_llava):
    build_llava().save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match=r"has no 'mm_dense_connector' in its config\.json"):
        load_pretrained(LlavaLlamaForCausalLM, tmp_path / "stock")


def test_save_pretrained_needs_a_swapped_model(tmp_path, build_llava):
    with pytest.raises(ValueError, match=r"mm_projector is a Sequential, not a DenseConnector"):
        save_pretrained(build_llava(), tmp_path / "x")


def test_restore_connector_without_weights(tmp_path, build_llava):
    llava = build_llava()
    swap_connector(llava.get_model(), connector("dc-sci-clip-l-336"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*empty' holds no weights"):
        restore_connector(llava, tmp_path / "empty")


# ---------------------------------------------------------------------------- bad input


def test_object_without_mm_projector(clip_dirs):
    class OnlyTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = CLIPVisionTower(str(clip_dirs[112]))

    with pytest.raises(ValueError, match=re.escape("OnlyTower has no 'mm_projector'")):
        swap_connector(OnlyTower(), connector("dc-sci-clip-l-336"))


def test_tower_not_loaded_yet(clip_dirs):
    """Inside from_pretrained LLaVA builds the tower with delay_load: no weights to tap yet."""
    torch.manual_seed(0)
    llava = LlavaLlamaForCausalLM(llava_config(clip_dirs[112]))
    with pytest.raises(ValueError, match=r"the vision tower '.*clip112.*' is not loaded yet"):
        swap_connector(llava.get_model(), connector("dc-sci-clip-l-336"))


def test_whole_model_instead_of_get_model(build_llava):
    llava = build_llava()
    with pytest.raises(ValueError, match=r"has no 'vision_tower'.*model\.get_model\(\)"):
        swap_connector(llava, connector("dc-sci-clip-l-336"))


def test_width_mismatch(build_llava):
    llava = build_llava()
    original = llava.get_model().mm_projector
    wide = connector("dc-sci-clip-l-336", vision_dim=24)
    with pytest.raises(
        ValueError,
        match=re.escape("connector vision_dim=24 does not match the tower's hidden_size (16)"),
    ):
        swap_connector(llava.get_model(), wide)
    assert llava.get_model().mm_projector is original  # nothing changed


def test_depth_mismatch(build_llava):
    llava = build_llava()
    with pytest.raises(ValueError, match=r"the encoder has 24 blocks but .* num_layers=27"):
        swap_connector(llava.get_model(), connector("dc-sci-siglip-so400m"))
