"""Tests of ``MultiLayerFeatureTap``: parity with each encoder family's own layer outputs, block
discovery, early exit, hook hygiene, streaming group means, gradients and argument checking.

Reference values come from the encoders themselves: HF ``output_hidden_states=True``, timm and
open_clip ``forward_intermediates`` (block ``i`` == layer ``i + 1``, see docs/concepts.md, Layer indices).
All encoders are tiny random models from ``conftest.py``; values must match exactly in fp32.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable

import pytest
import torch
from einops import rearrange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmconnect import LayerFeatures, MultiLayerFeatureTap

IMAGE = (42, 42)  # 3 x 3 patches of 14 pixels for every ViT-like tiny encoder
CONVNEXT_IMAGE = (64, 48)  # non-square: stage grids (16, 12), (8, 6), (4, 3), (2, 1)
HF_LAYERS = 4  # blocks of the tiny HF encoders: valid layers 0..4, -5..-1

HF_VISION = [
    pytest.param("tiny_clip_vision", 1, id="clip"),
    pytest.param("tiny_siglip_vision", 0, id="siglip"),
]

#: (fixture, image size) of every tiny encoder family the tap supports.
ENCODERS = [
    pytest.param("tiny_clip_vision", IMAGE, id="hf-clip"),
    pytest.param("tiny_siglip_vision", IMAGE, id="hf-siglip"),
    pytest.param("tiny_timm_vit_reg", IMAGE, id="timm-vit-reg"),
    pytest.param("tiny_timm_convnext", CONVNEXT_IMAGE, id="timm-convnext"),
    pytest.param("tiny_openclip_vit", IMAGE, id="openclip-vit"),
]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread; a second one only adds contention on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixels(size: tuple[int, int] = IMAGE, *, batch: int = 2, seed: int = 0, dtype=torch.float32):
    """A deterministic ``[batch, 3, H, W]`` image batch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=generator).to(dtype)


def assert_same(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def assert_features_equal(actual: LayerFeatures, expected: LayerFeatures) -> None:
    assert set(actual) == set(expected)
    for layer in expected:
        assert_same(actual[layer], expected[layer])
    assert set(actual.group_means) == set(expected.group_means)
    for group, mean in expected.group_means.items():
        assert_same(actual.group_means[group], mean)
    assert actual.grids == expected.grids
    assert actual.num_prefix_tokens == expected.num_prefix_tokens


def hf_hidden_states(model: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return model(x, output_hidden_states=True).hidden_states


def as_tensors(output) -> Tensor | tuple[Tensor, ...]:
    """An encoder's output as tensors: HF ``ModelOutput`` -> its tuple, tensors unchanged."""
    return output if isinstance(output, Tensor) else output.to_tuple()


def block_index(layer: int) -> int:
    """timm / open_clip ``forward_intermediates`` index of tap layer ``layer`` (>= 1 or < 0)."""
    assert layer != 0
    return layer - 1 if layer > 0 else layer


def hook_table(model: nn.Module) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The ids of every hook of every submodule, to compare before and after."""
    return {
        name: tuple(tuple(getattr(module, attribute)) for attribute in _HOOK_DICTS)
        for name, module in model.named_modules()
    }


def assert_no_hooks(model: nn.Module) -> None:
    leftovers = {name: hooks for name, hooks in hook_table(model).items() if any(hooks)}
    assert leftovers == {}


def _boom(*args, **kwargs):
    raise RuntimeError("boom: this block must not run")


def break_block(monkeypatch: pytest.MonkeyPatch, block: nn.Module) -> None:
    """Make ``block`` raise whenever it runs."""
    monkeypatch.setattr(block, "forward", _boom)


def count_block_calls(monkeypatch: pytest.MonkeyPatch, blocks: Iterable[nn.Module]) -> list[int]:
    """Count the forward calls of each block; the list fills in as the blocks run."""
    blocks = list(blocks)
    calls = [0] * len(blocks)

    def counting(index: int, forward: Callable) -> Callable:
        def counted(*args, **kwargs):
            calls[index] += 1
            return forward(*args, **kwargs)

        return counted

    for index, block in enumerate(blocks):
        monkeypatch.setattr(block, "forward", counting(index, block.forward))
    return calls


def scalar_loss(features: LayerFeatures) -> Tensor:
    tensors = [*features.values(), *features.group_means.values()]
    return sum(tensor.float().square().mean() for tensor in tensors)


def parameter_grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {name: parameter.grad for name, parameter in model.named_parameters()}


def assert_grads_equal(actual: dict, expected: dict, *, atol: float = 0.0, rtol: float = 0.0):
    assert [name for name, grad in actual.items() if grad is None] == [
        name for name, grad in expected.items() if grad is None
    ]
    for name, grad in expected.items():
        if grad is not None:
            torch.testing.assert_close(actual[name], grad, atol=atol, rtol=rtol, msg=name)


def enable_hf_gradient_checkpointing(model: nn.Module, kwargs: dict | None) -> None:
    # transformers >= 5.2x renamed it; the old name still works but warns.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class _Holder(nn.Module):
    """Holds a vision model under an attribute, as older transformers / LLaVA towers did."""

    def __init__(self, name: str, inner: nn.Module) -> None:
        super().__init__()
        self.add_module(name, inner)
        self.inner_name = name

    def forward(self, pixel_values: Tensor, **kwargs):
        return getattr(self, self.inner_name)(pixel_values, **kwargs)


class _TupleBlock(nn.Module):
    """Returns ``(hidden_states, None)``, as transformers 4.x encoder layers did."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, None]:
        return self.block(hidden_states), None


class _ToyEncoder(nn.Module):
    """Patchify + CLS + blocks under a path no discovery rule knows (``body.layers``).

    ``patchify="conv"`` uses a ``Conv2d`` (the tap can read the patch grid off it);
    ``patchify="linear"`` unfolds and projects, leaving the prefix count unknowable.
    ``checkpointing`` wraps each block call in ``torch.utils.checkpoint`` (hooks inside).
    ``tuple_outputs`` makes the blocks return ``(hidden_states, None)``.
    """

    def __init__(
        self,
        patchify: str = "conv",
        checkpointing: str | None = None,
        tuple_outputs: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        width = 8
        if patchify == "conv":
            self.patchify = nn.Conv2d(3, width, kernel_size=14, stride=14)
        else:
            self.patchify = nn.Sequential(
                nn.Unfold(kernel_size=14, stride=14), nn.Linear(3 * 14 * 14, width)
            )
        self.is_conv = patchify == "conv"
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.body = nn.Module()
        blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3)]
        if tuple_outputs:
            blocks = [_TupleBlock(block) for block in blocks]
        self.body.layers = nn.ModuleList(blocks)
        self.unused = nn.ModuleList()
        self.checkpointing = checkpointing

    def embed(self, x: Tensor) -> Tensor:
        if self.is_conv:
            tokens = rearrange(self.patchify(x), "b c h w -> b (h w) c")
        else:
            tokens = self.patchify[1](self.patchify[0](x).transpose(1, 2))
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)

    def run_block(self, block: nn.Module, h: Tensor) -> Tensor:
        if self.checkpointing is None:
            out = block(h)
        else:
            out = checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
        return out[0] if isinstance(out, tuple) else out

    def hidden_states(self, x: Tensor) -> list[Tensor]:
        states = [self.embed(x)]
        for block in self.body.layers:
            states.append(self.run_block(block, states[-1]))
        return states

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden_states(x)[-1]


# ------------------------------------------------------------------ 1. HF index parity
@pytest.mark.parametrize(("encoder_name", "prefix"), HF_VISION)
@pytest.mark.parametrize(
    "layers", [[0], [1, 3], [-1], [-2, 0, 2], [-5, 4, -3], [0, 1, 2, 3, 4]], ids=str
)
def test_hf_layers_equal_hidden_states_without_prefix(request, encoder_name, prefix, layers):
    model = request.getfixturevalue(encoder_name)
    x = pixels()
    hidden = hf_hidden_states(model, x)
    tap = MultiLayerFeatureTap(model, layers=layers)
    assert (tap.num_layers, tap.num_prefix_tokens) == (HF_LAYERS, prefix)
    assert tap.individual_layers == tuple(layer % (HF_LAYERS + 1) for layer in layers)

    with torch.no_grad():
        features = tap(x)

    assert set(features) == set(tap.individual_layers)
    for layer in layers:
        captured = features[layer % (HF_LAYERS + 1)]
        assert captured.shape == (2, 9, 32)
        assert_same(captured, hidden[layer][:, prefix:])
    assert features.grids == dict.fromkeys(tap.individual_layers, (3, 3))
    assert features.num_prefix_tokens == 0
    assert features.group_means == {}


@pytest.mark.parametrize(("encoder_name", "prefix"), HF_VISION)
def test_hf_keep_prefix_keeps_the_cls_token(request, encoder_name, prefix):
    model = request.getfixturevalue(encoder_name)
    x = pixels()
    hidden = hf_hidden_states(model, x)

    features = MultiLayerFeatureTap(model, layers=[0, 2, -1], keep_prefix=True)(x)

    for layer in (0, 2, 4):
        assert_same(features[layer], hidden[layer])
        assert features[layer].shape[1] == prefix + 9
    assert features.num_prefix_tokens == prefix
    assert features.grid(2) == (3, 3)


def test_hf_non_square_grid_comes_from_the_patch_convolution(tiny_clip_vision):
    x = pixels((56, 28))  # 4 x 2 patches; extra arguments go through to the encoder
    with torch.no_grad():
        hidden = tiny_clip_vision(
            x, output_hidden_states=True, interpolate_pos_encoding=True
        ).hidden_states
        features = MultiLayerFeatureTap(tiny_clip_vision, layers=[0, -1])(
            x, interpolate_pos_encoding=True
        )
    assert features.grids == {0: (4, 2), 4: (4, 2)}
    assert features.grid() == (4, 2)
    for layer in (0, 4):
        assert_same(features[layer], hidden[layer][:, 1:])


def test_hf_num_prefix_tokens_override(tiny_clip_vision):
    x = pixels()
    hidden = hf_hidden_states(tiny_clip_vision, x)
    features = MultiLayerFeatureTap(tiny_clip_vision, layers=[1], num_prefix_tokens=0)(x)
    assert_same(features[1], hidden[1])  # nothing is treated as prefix: the CLS stays


@pytest.mark.parametrize("path", ["vision_model", "vision_tower", "vision_tower.vision_model"])
def test_hf_nested_vision_model_is_discovered(tiny_clip_vision, path):
    encoder = tiny_clip_vision
    for name in reversed(path.split(".")):
        encoder = _Holder(name, encoder)
    x = pixels()
    hidden = hf_hidden_states(tiny_clip_vision, x)

    tap = MultiLayerFeatureTap(encoder, layers=[0, -2])
    assert tap.structure.path == f"{path}.encoder.layers"
    assert tap.structure.blocks is tiny_clip_vision.encoder.layers
    assert tap.num_prefix_tokens == 1
    features = tap(x)

    assert_same(features[0], hidden[0][:, 1:])
    assert_same(features[3], hidden[3][:, 1:])


def test_hf_clip_model_uses_its_vision_tower(tiny_clip_model):
    x = pixels()
    hidden = hf_hidden_states(tiny_clip_model.vision_model, x)

    tap = MultiLayerFeatureTap(tiny_clip_model, layers=[0, 2, -1])
    assert tap.structure.path == "vision_model.encoder.layers"
    assert tap.structure.blocks is tiny_clip_model.vision_model.encoder.layers
    assert (tap.num_layers, tap.num_prefix_tokens) == (HF_LAYERS, 1)
    # CLIPModel.forward takes input_ids first, so run its image path inside the context.
    with torch.no_grad(), tap:
        tiny_clip_model.get_image_features(pixel_values=x)

    for layer in (0, 2, 4):
        assert_same(tap.features[layer], hidden[layer][:, 1:])


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_hf_random_layers_and_groups_match_hidden_states(tiny_clip_vision, data):
    """Any choice of layers (either sign) and disjoint groups agrees with ``hidden_states``."""
    x = pixels(batch=1)
    hidden = hf_hidden_states(tiny_clip_vision, x)
    count = HF_LAYERS + 1
    order = data.draw(st.permutations(range(count)))
    num_layers = data.draw(st.integers(0, count))
    chosen, rest = order[:num_layers], order[num_layers:]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rest)), max_size=3)))
    groups = [rest[a:b] for a, b in zip([0, *cuts], [*cuts, len(rest)], strict=True) if b > a]
    if not chosen and not groups:
        chosen = [0]
    signs = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
    layers = [layer - count if signs[layer] else layer for layer in chosen]

    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=layers, groups=groups)
    with torch.no_grad():
        features = tap(x)

    assert set(features) == set(chosen)
    for layer in chosen:
        assert_same(features[layer], hidden[layer][:, 1:])
    assert set(features.group_means) == {tuple(group) for group in groups}
    for group in groups:
        expected = torch.stack([hidden[k][:, 1:] for k in group]).sum(0) / len(group)
        torch.testing.assert_close(
            features.group_means[tuple(group)], expected, atol=1e-6, rtol=1e-6
        )


# ------------------------------------------------------------------------- 2. timm
@pytest.mark.parametrize("layers", [[1], [2, 3], [-1, -3], [3, -2]], ids=str)
def test_timm_vit_with_registers_matches_forward_intermediates(tiny_timm_vit_reg, layers):
    model = tiny_timm_vit_reg
    x = pixels()
    tap = MultiLayerFeatureTap(model, layers=layers)
    assert tap.structure.path == "blocks"
    assert tap.num_prefix_tokens == model.num_prefix_tokens == 5  # CLS + 4 registers

    with torch.no_grad():
        features = tap(x)
        for layer in layers:
            (expected,) = model.forward_intermediates(
                x, indices=[block_index(layer)], output_fmt="NLC", intermediates_only=True
            )
            assert_same(features[layer % 4], expected)
            assert features.grids[layer % 4] == (3, 3)


def test_timm_vit_layer0_and_keep_prefix(tiny_timm_vit_reg):
    model = tiny_timm_vit_reg
    x = pixels()
    with torch.no_grad():
        features = MultiLayerFeatureTap(model, layers=[0, 2], keep_prefix=True)(x)
        embedded = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        ((spatial, prefix),) = model.forward_intermediates(
            x, indices=[1], return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )

    assert_same(features[0], embedded)  # layer 0 is the input of the first block
    assert_same(features[2], torch.cat([prefix, spatial], dim=1))
    assert features.num_prefix_tokens == 5
    assert features.grids == {0: (3, 3), 2: (3, 3)}


def timm_convnext_layer(model: nn.Module, x: Tensor, layer: int) -> Tensor:
    """``[B, C, H, W]`` of layer ``layer``: the stem output for 0, else a stage's output."""
    if layer == 0:
        return model.stem(x)
    (stage,) = model.forward_intermediates(x, indices=[block_index(layer)], intermediates_only=True)
    return stage


@pytest.mark.parametrize("layers", [[1, 2, 3, 4], [-1, -4], [0, -2]], ids=str)
def test_timm_convnext_stages_are_flattened_with_their_grids(tiny_timm_convnext, layers):
    model = tiny_timm_convnext
    x = pixels(CONVNEXT_IMAGE)
    tap = MultiLayerFeatureTap(model, layers=layers)
    assert (tap.structure.path, tap.num_layers, tap.num_prefix_tokens) == ("stages", 4, None)

    with torch.no_grad():
        features = tap(x)
        for layer in layers:
            expected = timm_convnext_layer(model, x, layer)
            assert_same(features[layer % 5], rearrange(expected, "b c h w -> b (h w) c"))
            assert features.grids[layer % 5] == tuple(expected.shape[-2:])

    all_grids = {0: (16, 12), 1: (16, 12), 2: (8, 6), 3: (4, 3), 4: (2, 1)}
    assert features.grids == {layer % 5: all_grids[layer % 5] for layer in layers}


# ---------------------------------------------------------------------- 3. open_clip
def make_sequence_first(model: nn.Module) -> None:
    """Switch an open_clip ``VisionTransformer`` to ``[tokens, batch, C]`` between blocks."""
    model.transformer.batch_first = False
    for block in model.transformer.resblocks:
        block.attn.batch_first = False


@pytest.mark.parametrize("batch_first", [True, False], ids=["NLD", "LND"])
@pytest.mark.parametrize("layers", [[1, 3], [-1, -3, 2]], ids=str)
def test_openclip_vit_matches_forward_intermediates(tiny_openclip_vit, batch_first, layers):
    model = tiny_openclip_vit
    x = pixels()
    with torch.no_grad():
        batch_first_features = MultiLayerFeatureTap(model, layers=layers)(x)
    if not batch_first:
        make_sequence_first(model)

    tap = MultiLayerFeatureTap(model, layers=[0, *layers])
    assert tap.structure.path == "transformer.resblocks"
    assert tap.structure.batch_first is batch_first
    assert tap.num_prefix_tokens == 1
    with torch.no_grad():
        features = tap(x)
        assert_same(features[0], model._embeds(x)[:, 1:])
        for layer in layers:
            expected = model.forward_intermediates(
                x, indices=[block_index(layer)], output_fmt="NLC", intermediates_only=True
            )["image_intermediates"][0]
            assert_same(features[layer % 4], expected)
            assert features.grids[layer % 4] == (3, 3)
            # The token layout between blocks does not change the captured values.
            torch.testing.assert_close(
                features[layer % 4], batch_first_features[layer % 4], atol=1e-6, rtol=1e-6
            )


def test_openclip_clip_model_taps_the_image_tower_not_the_text_tower(tiny_openclip_clip):
    model = tiny_openclip_clip
    x = pixels()
    tap = MultiLayerFeatureTap(model, layers=[1, -1])
    assert tap.structure.path == "visual.transformer.resblocks"
    assert tap.structure.blocks is model.visual.transformer.resblocks
    assert tap.num_prefix_tokens == 1

    with torch.no_grad():
        features = tap(x)  # CLIP.forward(image) runs the image tower only
        expected = model.visual.forward_intermediates(
            x, indices=[0, 2], output_fmt="NLC", intermediates_only=True
        )["image_intermediates"]

    assert_same(features[1], expected[0])
    assert_same(features[3], expected[1])


def test_openclip_timm_convnext_is_discovered_at_trunk_stages(tiny_openclip_convnext):
    model = tiny_openclip_convnext
    x = pixels((32, 32))
    tap = MultiLayerFeatureTap(model, layers=[1, -1])
    assert tap.structure.path == "trunk.stages"
    assert tap.structure.blocks is model.trunk.stages
    assert tap.num_layers == 4

    with torch.no_grad():
        features = tap(x)
        stages = model.trunk.forward_intermediates(x, indices=[0, 3], intermediates_only=True)

    for layer, stage in zip((1, 4), stages, strict=True):
        assert_same(features[layer], rearrange(stage, "b c h w -> b (h w) c"))
        assert features.grids[layer] == tuple(stage.shape[-2:])
    assert features.grids == {1: (8, 8), 4: (1, 1)}


# ------------------------------------------------------------------ 4. blocks override
def test_blocks_override_equals_discovery(tiny_clip_vision):
    x = pixels()
    discovered = MultiLayerFeatureTap(tiny_clip_vision, layers=[0, -1])
    explicit = MultiLayerFeatureTap(tiny_clip_vision, layers=[0, -1], blocks="encoder.layers")
    assert explicit.structure.blocks is discovered.structure.blocks
    assert explicit.num_prefix_tokens == 1
    with torch.no_grad():
        assert_features_equal(explicit(x), discovered(x))


def test_blocks_override_picks_the_named_list(tiny_openclip_clip):
    tap = MultiLayerFeatureTap(tiny_openclip_clip, layers=[1], blocks="transformer.resblocks")
    assert tap.structure.blocks is tiny_openclip_clip.transformer.resblocks  # the text tower
    assert tap.num_layers == 1


def test_unknown_encoder_needs_blocks_and_then_works():
    encoder = _ToyEncoder()
    with pytest.raises(ValueError, match=r"could not find the block list of _ToyEncoder.*blocks="):
        MultiLayerFeatureTap(encoder, layers=[1])

    tap = MultiLayerFeatureTap(encoder, layers=[0, 2, -1], blocks="body.layers")
    assert (tap.num_layers, tap.num_prefix_tokens) == (3, None)  # unknown until the forward
    with torch.no_grad():
        features = tap(pixels())
        hidden = encoder.hidden_states(pixels())

    # The prefix count is read off the patch grid at run time: 10 tokens - 3 x 3 patches.
    for layer in (0, 2, 3):
        assert_same(features[layer], hidden[layer][:, 1:])
        assert features.grids[layer] == (3, 3)


def test_blocks_returning_tuples():
    encoder = _ToyEncoder(tuple_outputs=True)
    with torch.no_grad():
        features = MultiLayerFeatureTap(encoder, layers=[1, 3], blocks="body.layers")(pixels())
        hidden = encoder.hidden_states(pixels())
    assert_same(features[1], hidden[1][:, 1:])
    assert_same(features[3], hidden[3][:, 1:])


def test_unknown_prefix_count_asks_for_num_prefix_tokens():
    encoder = _ToyEncoder(patchify="linear")  # no Conv2d: no patch grid to read
    tap = MultiLayerFeatureTap(encoder, layers=[1], blocks="body.layers")
    with pytest.raises(ValueError, match=r"prefix tokens .* num_prefix_tokens="):
        tap(pixels())
    assert not tap.attached
    assert_no_hooks(encoder)

    tap = MultiLayerFeatureTap(encoder, layers=[1], blocks="body.layers", num_prefix_tokens=1)
    with torch.no_grad():
        assert_same(tap(pixels())[1], encoder.hidden_states(pixels())[1][:, 1:])


@pytest.mark.parametrize(
    ("blocks", "error", "match"),
    [
        ("encoder.nope", ValueError, r"blocks='encoder\.nope' does not name .*found nothing"),
        ("nope.layers", ValueError, r"blocks='nope\.layers' does not name .*found nothing"),
        ("embeddings", ValueError, r"blocks='embeddings' .*found CLIPVisionEmbeddings"),
        ("encoder.layers.0", ValueError, r"does not name a non-empty .*found CLIPEncoderLayer"),
        ("", TypeError, r"blocks must be a dotted module path"),
        (3, TypeError, r"blocks must be a dotted module path .* got 3"),
    ],
)
def test_bad_blocks_path(tiny_clip_vision, blocks, error, match):
    with pytest.raises(error, match=match):
        MultiLayerFeatureTap(tiny_clip_vision, layers=[1], blocks=blocks)


def test_blocks_path_to_an_empty_list():
    with pytest.raises(ValueError, match=r"blocks='unused' does not name a non-empty"):
        MultiLayerFeatureTap(_ToyEncoder(), layers=[1], blocks="unused")


# ------------------------------------------------------------------------ 5. early exit
@pytest.mark.parametrize(("encoder_name", "size"), ENCODERS)
def test_early_exit_gives_the_same_values_and_skips_later_blocks(
    request, monkeypatch, encoder_name, size
):
    model = request.getfixturevalue(encoder_name)
    x = pixels(size)
    full = MultiLayerFeatureTap(model, layers=[2], groups=[[0, 1]], early_exit=False)
    early = MultiLayerFeatureTap(model, layers=[2], groups=[[0, 1]])
    assert early.last_needed_layer == 2
    calls = count_block_calls(monkeypatch, full.structure.blocks)
    num_blocks = len(calls)

    with torch.no_grad():
        expected = full(x)
        assert calls == [1] * num_blocks
        actual = early(x)

    assert calls == [2, 2] + [1] * (num_blocks - 2)  # the later blocks ran only once
    assert_features_equal(actual, expected)


def test_early_exit_at_layer_0_runs_no_block(tiny_clip_vision, monkeypatch):
    x = pixels()
    hidden = hf_hidden_states(tiny_clip_vision, x)
    calls = count_block_calls(monkeypatch, tiny_clip_vision.encoder.layers)
    with torch.no_grad():
        features = MultiLayerFeatureTap(tiny_clip_vision, layers=[0])(x)
    assert calls == [0] * HF_LAYERS
    assert_same(features[0], hidden[0][:, 1:])


@pytest.mark.parametrize(("encoder_name", "size"), ENCODERS)
def test_blocks_after_the_last_needed_never_run(request, monkeypatch, encoder_name, size):
    model = request.getfixturevalue(encoder_name)
    x = pixels(size)
    with torch.no_grad():
        expected = MultiLayerFeatureTap(model, layers=[1, -2])(x)
    tap = MultiLayerFeatureTap(model, layers=[1, -2])
    break_block(monkeypatch, tap.structure.blocks[-1])

    with torch.no_grad():
        assert_features_equal(tap(x), expected)
        with pytest.raises(RuntimeError, match="boom"):
            MultiLayerFeatureTap(model, layers=[1, -2], early_exit=False)(x)


def test_context_manager_never_exits_early(tiny_clip_vision, monkeypatch):
    calls = count_block_calls(monkeypatch, tiny_clip_vision.encoder.layers)
    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=[1], early_exit=True)
    with torch.no_grad(), tap:
        output = tiny_clip_vision(pixels())
    assert calls == [1] * HF_LAYERS
    assert output.pooler_output.shape == (2, 32)


# --------------------------------------------------------------------- 6. hook hygiene
@pytest.mark.parametrize(("encoder_name", "size"), ENCODERS)
@pytest.mark.parametrize("form", ["call", "call-no-early-exit", "context"])
@pytest.mark.parametrize("failure", [None, "block-raises", "bad-input"])
def test_hooks_never_leak(request, monkeypatch, encoder_name, size, form, failure):
    model = request.getfixturevalue(encoder_name)
    x = pixels(size)
    tap = MultiLayerFeatureTap(
        model, layers=[1, -1], groups=[[0]], early_exit=form != "call-no-early-exit"
    )
    if failure == "block-raises":
        break_block(monkeypatch, tap.structure.blocks[1])
    elif failure == "bad-input":
        x = x[:, :1]  # one channel: the patch / stem convolution refuses it

    expectation = pytest.raises(RuntimeError) if failure else contextlib.nullcontext()
    with torch.no_grad(), expectation:
        if form == "context":
            with tap:
                assert tap.attached
                model(x)
        else:
            tap(x)

    assert not tap.attached
    assert_no_hooks(model)


def test_tap_is_reusable_after_a_failed_forward(tiny_clip_vision, monkeypatch):
    x = pixels()
    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=[1, -1])
    with torch.no_grad():
        expected = MultiLayerFeatureTap(tiny_clip_vision, layers=[1, -1])(x)
        monkeypatch.setattr(tiny_clip_vision.encoder.layers[2], "forward", _boom)
        with pytest.raises(RuntimeError, match="boom"):
            tap(x)
        with pytest.raises(RuntimeError, match=r"ended before reaching layers \[4\]"):
            _ = tap.features
        monkeypatch.undo()
        assert_features_equal(tap(x), expected)
    assert_no_hooks(tiny_clip_vision)


def test_hook_error_inside_the_forward_removes_hooks(tiny_timm_convnext):
    # Layers 1 (16 x 12) and 2 (8 x 6) cannot be averaged: the hook raises mid-forward.
    tap = MultiLayerFeatureTap(tiny_timm_convnext, groups=[[1, 2]])
    with pytest.raises(ValueError, match=r"groups\[0\] mixes layers of different shapes"):
        tap(pixels(CONVNEXT_IMAGE))
    assert not tap.attached
    assert_no_hooks(tiny_timm_convnext)


def test_a_tap_attaches_once_at_a_time(tiny_clip_vision):
    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=[1])
    with tap:
        with pytest.raises(RuntimeError, match="already attached"):
            tap(pixels())
        with pytest.raises(RuntimeError, match="already attached"), tap:
            pass
        assert tap.attached
    assert not tap.attached
    assert_no_hooks(tiny_clip_vision)
    tap.remove()  # idempotent


@pytest.mark.parametrize("tap_kwargs", [{}, {"output_hidden_states": True}], ids=["plain", "hs"])
def test_hf_model_works_normally_after_an_early_exit(tiny_clip_vision, tap_kwargs):
    model = tiny_clip_vision
    x = pixels()
    with torch.no_grad():
        before = model(x, output_hidden_states=True)
    hooks_before = hook_table(model)  # transformers keeps its own (inactive) capture hooks

    with torch.no_grad():
        MultiLayerFeatureTap(model, layers=[1])(x, **tap_kwargs)
        after = model(x, output_hidden_states=True)
        plain = model(x)

    assert hook_table(model) == hooks_before
    assert len(after.hidden_states) == HF_LAYERS + 1
    torch.testing.assert_close(as_tensors(after), as_tensors(before), atol=0, rtol=0)
    assert plain.hidden_states is None
    assert_same(plain.last_hidden_state, before.last_hidden_state)


# --------------------------------------------------------------- 7. context-manager form
@pytest.mark.parametrize(("encoder_name", "size"), ENCODERS)
def test_context_manager_matches_call_and_keeps_the_encoder_output(request, encoder_name, size):
    model = request.getfixturevalue(encoder_name)
    x = pixels(size)
    tap = MultiLayerFeatureTap(model, layers=[0, 2, -1], groups=[[1]])
    with torch.no_grad():
        plain_output = model(x)
        called = tap(x)
        with tap:
            output = model(x)

    assert_features_equal(tap.features, called)
    torch.testing.assert_close(as_tensors(output), as_tensors(plain_output), atol=0, rtol=0)


def test_context_manager_keeps_the_latest_forward(tiny_clip_vision):
    first, second = pixels(seed=1), pixels(seed=2)
    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=[2], groups=[[0, 1]])
    with torch.no_grad():
        expected = tap(second)
        with tap:
            tiny_clip_vision(first)
            tiny_clip_vision(second)
    assert_features_equal(tap.features, expected)


def test_features_before_any_forward_raise(tiny_clip_vision):
    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=[1])
    with pytest.raises(RuntimeError, match="no features captured yet"):
        _ = tap.features
    with tap, pytest.raises(RuntimeError, match="no features captured yet"):
        _ = tap.features


def test_features_of_a_forward_that_stopped_early_raise(tiny_clip_vision, monkeypatch):
    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=[1, -1])
    break_block(monkeypatch, tiny_clip_vision.encoder.layers[2])
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"), tap:
        tiny_clip_vision(pixels())
    with pytest.raises(RuntimeError, match=r"before reaching layers \[4\]; captured only \[1\]"):
        _ = tap.features


# --------------------------------------------------------------------- 8. group means
@pytest.mark.parametrize(("encoder_name", "prefix"), HF_VISION)
def test_group_means_equal_the_mean_of_hidden_states(request, encoder_name, prefix):
    model = request.getfixturevalue(encoder_name)
    x = pixels()
    hidden = hf_hidden_states(model, x)
    groups = [range(0, 2), range(2, 4)]

    tap = MultiLayerFeatureTap(model, groups=groups)
    assert tap.groups == ((0, 1), (2, 3))
    with torch.no_grad():
        features = tap(x)

    assert len(features) == 0  # grouped members are not kept one by one
    assert set(features.group_means) == {(0, 1), (2, 3)}
    for group in groups:
        expected = torch.stack([hidden[k][:, prefix:] for k in group]).sum(0) / len(group)
        mean = features.group_means[tuple(group)]
        assert mean.shape == (2, 9, 32)
        torch.testing.assert_close(mean, expected, atol=1e-6, rtol=1e-6)
    assert features.grids[0] == (3, 3)


def test_dci_style_layers_and_groups_together(tiny_clip_vision):
    x = pixels()
    hidden = hf_hidden_states(tiny_clip_vision, x)
    tap = MultiLayerFeatureTap(tiny_clip_vision, layers=[-2], groups=[range(0, 2), [-2, -3]])
    assert tap.groups == ((0, 1), (3, 2))
    with torch.no_grad():
        features = tap(x)

    assert set(features) == {3}  # layer 3 is both requested and grouped; 0, 1, 2 are not kept
    assert_same(features[3], hidden[3][:, 1:])
    expected = (hidden[3] + hidden[2])[:, 1:] / 2
    torch.testing.assert_close(features.group_means[(3, 2)], expected, atol=1e-6, rtol=1e-6)


def test_single_layer_group_is_the_layer_itself(tiny_siglip_vision):
    x = pixels()
    hidden = hf_hidden_states(tiny_siglip_vision, x)
    features = MultiLayerFeatureTap(tiny_siglip_vision, groups=[[3]])(x)
    assert_same(features.group_means[(3,)], hidden[3])


def test_group_means_in_bf16_with_fp32_accumulation(tiny_clip_vision):
    model = tiny_clip_vision.to(torch.bfloat16)
    x = pixels(dtype=torch.bfloat16)
    hidden = hf_hidden_states(model, x)
    group = tuple(range(HF_LAYERS + 1))
    members = torch.stack([hidden[k][:, 1:] for k in group])

    with torch.no_grad():
        upcast = MultiLayerFeatureTap(model, groups=[group], accumulate_dtype=torch.float32)(x)
        native = MultiLayerFeatureTap(model, groups=[group])(x)
    upcast, native = upcast.group_means[group], native.group_means[group]

    assert upcast.dtype == native.dtype == torch.bfloat16
    expected = (members.float().sum(0) / len(group)).to(torch.bfloat16)
    torch.testing.assert_close(upcast, expected)
    torch.testing.assert_close(native, expected, atol=0.05, rtol=0.02)
    exact = members.double().sum(0) / len(group)
    upcast_error = (upcast.double() - exact).abs().mean()
    native_error = (native.double() - exact).abs().mean()
    assert upcast_error <= native_error


# ------------------------------------------------------------------------ 9. gradients
def test_gradients_match_the_hidden_states_reference(tiny_clip_vision):
    model = tiny_clip_vision
    x = pixels()
    tap = MultiLayerFeatureTap(model, layers=[1, -3], groups=[range(0, 2)])

    features = tap(x)
    assert all(t.requires_grad for t in [*features.values(), *features.group_means.values()])
    scalar_loss(features).backward()
    tapped = parameter_grads(model)
    model.zero_grad(set_to_none=True)

    hidden = [state[:, 1:] for state in model(x, output_hidden_states=True).hidden_states]
    reference = LayerFeatures(
        {1: hidden[1], 2: hidden[2]},
        group_means={(0, 1): torch.stack(hidden[0:2]).sum(0) / 2},
    )
    scalar_loss(reference).backward()

    assert_grads_equal(tapped, parameter_grads(model), atol=1e-6, rtol=1e-5)
    assert tapped["encoder.layers.0.mlp.fc1.weight"].abs().sum() > 0
    assert tapped["embeddings.patch_embedding.weight"].abs().sum() > 0
    # Blocks after the last needed layer never ran, so they got no gradient.
    assert all(tapped[name] is None for name, _ in model.named_parameters() if "layers.2." in name)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize(("encoder_name", "size"), ENCODERS)
def test_no_grad_gives_identical_values(request, encoder_name, size, no_grad):
    # Train mode (no dropout in the tiny encoders): in eval mode nn.MultiheadAttention (open_clip)
    # takes a fused fast path under no_grad whose rounding differs from the autograd path.
    model = request.getfixturevalue(encoder_name).train()
    x = pixels(size)
    tap = MultiLayerFeatureTap(model, layers=[2, -1], groups=[[0, 1]])
    with_grad = tap(x)
    with no_grad():
        without_grad = tap(x)
    assert with_grad[2].requires_grad and with_grad.group_means[(0, 1)].requires_grad
    assert not without_grad[2].requires_grad
    assert not without_grad.group_means[(0, 1)].requires_grad
    assert_features_equal(without_grad, with_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("encoder_name", "prefix"), HF_VISION)
def test_half_and_full_precision(request, encoder_name, prefix, dtype):
    model = request.getfixturevalue(encoder_name).to(dtype)
    x = pixels(dtype=dtype)
    hidden = hf_hidden_states(model, x)

    features = MultiLayerFeatureTap(model, layers=[0, 2, -1], groups=[[1, 3]])(x)

    for layer in (0, 2, 4):
        assert features[layer].dtype == dtype
        assert_same(features[layer], hidden[layer][:, prefix:])
    mean = features.group_means[(1, 3)]
    assert mean.dtype == dtype
    torch.testing.assert_close(mean, (hidden[1] + hidden[3])[:, prefix:] / 2)
    scalar_loss(features).backward()
    assert model.encoder.layers[0].mlp.fc1.weight.grad.dtype == dtype


@pytest.mark.parametrize(
    "checkpointing_kwargs",
    [None, {"use_reentrant": False}, {"use_reentrant": True}],
    ids=["default", "non-reentrant", "reentrant"],
)
def test_hf_gradient_checkpointing_gives_the_same_values_and_grads(
    tiny_clip_vision, checkpointing_kwargs
):
    plain = tiny_clip_vision.train()
    checkpointed = copy.deepcopy(plain)
    enable_hf_gradient_checkpointing(checkpointed, checkpointing_kwargs)
    checkpointed.train()
    assert all(layer.gradient_checkpointing for layer in checkpointed.encoder.layers)
    mlp_calls = []
    # A pre-hook: non-reentrant recomputation may stop before a module's forward hooks run.
    handle = checkpointed.encoder.layers[0].mlp.register_forward_pre_hook(
        lambda *_: mlp_calls.append(torch.is_grad_enabled())
    )
    x = pixels()

    results = []
    for model in (plain, checkpointed):
        features = MultiLayerFeatureTap(model, layers=[1, -2], groups=[range(0, 3)])(x)
        scalar_loss(features).backward()
        results.append((features, parameter_grads(model)))
    handle.remove()

    assert len(mlp_calls) == 2  # the forward and its replay during backward
    (expected, expected_grads), (actual, actual_grads) = results
    assert_features_equal(actual, expected)
    assert_grads_equal(actual_grads, expected_grads)


@pytest.mark.parametrize("encoder_name", ["tiny_timm_vit_reg", "tiny_openclip_vit"])
def test_timm_and_openclip_gradient_checkpointing(request, encoder_name):
    """timm and open_clip checkpoint whole blocks: the tap's hooks run inside the checkpoint."""
    plain = request.getfixturevalue(encoder_name).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = pixels()

    results = []
    for model in (plain, checkpointed):
        features = MultiLayerFeatureTap(model, layers=[1, -2], groups=[[0, 2]])(x)
        scalar_loss(features).backward()
        results.append((features, parameter_grads(model)))

    (expected, expected_grads), (actual, actual_grads) = results
    assert_features_equal(actual, expected)
    assert_grads_equal(actual_grads, expected_grads)


@pytest.mark.parametrize(
    "encoder_name", ["tiny_clip_vision", "tiny_timm_vit_reg", "tiny_openclip_vit"]
)
def test_checkpoint_replay_during_backward_is_not_captured(request, encoder_name):
    """A backward inside ``with tap:`` replays checkpointed blocks; the tap must ignore that."""
    model = request.getfixturevalue(encoder_name).train()
    if encoder_name == "tiny_clip_vision":
        enable_hf_gradient_checkpointing(model, None)
    else:
        model.set_grad_checkpointing(True)
    x = pixels()
    expected = MultiLayerFeatureTap(model, layers=[1, -1], groups=[[0, 2]])(x)

    tap = MultiLayerFeatureTap(model, layers=[1, -1], groups=[[0, 2]])
    with tap:
        output = model(x)
        features = tap.features
        output = output if isinstance(output, Tensor) else output.last_hidden_state
        (scalar_loss(features) + output.sum()).backward()
        assert tap.features is features

    assert_features_equal(features, expected)
    assert_no_hooks(model)


def test_checkpointed_blocks_with_hooks_inside_backpropagate():
    plain, checkpointed = _ToyEncoder(), _ToyEncoder(checkpointing="non-reentrant")
    results = []
    for model in (plain, checkpointed):
        features = MultiLayerFeatureTap(model, layers=[1, 2], blocks="body.layers")(pixels())
        scalar_loss(features).backward()
        results.append(parameter_grads(model))
    assert_grads_equal(results[1], results[0])


def test_reentrant_checkpointing_that_cuts_the_graph_is_reported():
    """A reentrant checkpoint runs the hooked block under no_grad: the tap says so instead of
    silently returning layers that no gradient can flow through."""
    model = _ToyEncoder(checkpointing="reentrant")
    with pytest.warns(RuntimeWarning, match=r"computed without grad .* use_reentrant=False"):
        MultiLayerFeatureTap(model, layers=[1, 2], blocks="body.layers")(pixels())


# ----------------------------------------------------------------------- 10. bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": [5]}, ValueError, r"layers\[0\]=5 is out of range .* 4 blocks.* -5\.\.4"),
        ({"layers": [0, -6]}, ValueError, r"layers\[1\]=-6 is out of range .* -5\.\.4"),
        ({"layers": [1, -4]}, ValueError, r"layers names layer 1 twice \(as -4\)"),
        ({"layers": [2, 2]}, ValueError, r"layers names layer 2 twice"),
        ({"layers": [1.0]}, TypeError, r"layers\[0\] must be an int, got 1\.0 \(float\); a layer"),
        ({"layers": [True]}, TypeError, r"layers\[0\] must be an int, got True \(bool\)"),
        ({"layers": -2}, TypeError, r"layers must be a collection of int layer indices, got -2"),
        ({"groups": [[0, 1], [1, 2]]}, ValueError, r"groups\[1\] overlaps groups\[0\].*layer 1"),
        ({"groups": [[0, 1], [-4]]}, ValueError, r"groups\[1\] overlaps groups\[0\].*layer 1"),
        ({"groups": [[0, 0]]}, ValueError, r"groups\[0\] names layer 0 twice"),
        ({"groups": [[2, -3]]}, ValueError, r"groups\[0\] names layer 2 twice"),
        ({"groups": [[0], []]}, ValueError, r"groups\[1\] is empty"),
        ({"groups": [range(0, 0)]}, ValueError, r"groups\[0\] is empty"),
        ({"groups": [[0], [9]]}, ValueError, r"groups\[1\]\[0\]=9 is out of range .* -5\.\.4"),
        ({"groups": range(0, 4)}, TypeError, r"groups\[0\] must be a collection of int"),
        ({"groups": None}, TypeError, r"groups must be a collection of layer groups"),
        ({}, ValueError, r"nothing to capture"),
        ({"layers": [], "groups": []}, ValueError, r"nothing to capture"),
        ({"layers": [1], "accumulate_dtype": torch.int32}, ValueError, r"accumulate_dtype"),
        ({"layers": [1], "accumulate_dtype": "float32"}, TypeError, r"accumulate_dtype"),
        ({"layers": [1], "num_prefix_tokens": -1}, ValueError, r"num_prefix_tokens must be"),
        ({"layers": [1], "num_prefix_tokens": 1.0}, TypeError, r"num_prefix_tokens must be"),
        ({"layers": [1], "keep_prefix": 1}, TypeError, r"keep_prefix must be a bool"),
        ({"layers": [1], "early_exit": None}, TypeError, r"early_exit must be a bool"),
    ],
)
def test_bad_arguments_give_clear_errors(tiny_clip_vision, kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiLayerFeatureTap(tiny_clip_vision, **kwargs)
    assert_no_hooks(tiny_clip_vision)


@pytest.mark.parametrize(
    "encoder", [lambda x: x, {"encoder.layers": []}, None], ids=["function", "dict", "none"]
)
def test_encoder_must_be_a_module(encoder):
    with pytest.raises(TypeError, match=r"encoder must be a torch\.nn\.Module, got"):
        MultiLayerFeatureTap(encoder, layers=[1])


# ------------------------------------------------------------------- 11. torch.compile
def _compile_counter():
    """A dynamo backend that runs graphs eagerly and counts the frames it compiled."""
    from torch._dynamo.testing import CompileCounter

    return CompileCounter()


@pytest.mark.slow  # dynamo's first trace costs ~10 s on 2 shared cores
@pytest.mark.parametrize(
    ("encoder_name", "size"),
    [
        pytest.param("tiny_clip_vision", IMAGE, id="hf-clip"),
        pytest.param("tiny_timm_vit_reg", IMAGE, id="timm-vit-reg"),
    ],
)
def test_compiled_encoder_gives_the_plain_features(request, encoder_name, size):
    """``MultiLayerFeatureTap(torch.compile(tower))`` finds the blocks of the wrapped module (it
    raised ``TypeError: ... does not support len()`` before), runs the compiled forward, and gives
    the uncompiled tap's features exactly, with early exit and without."""
    model = request.getfixturevalue(encoder_name)
    x = pixels(size)
    counter = _compile_counter()
    compiled = torch.compile(model, backend=counter)
    for early_exit in (True, False):
        plain_tap = MultiLayerFeatureTap(
            model, layers=[1, -2], groups=[[0, 2]], early_exit=early_exit
        )
        tap = MultiLayerFeatureTap(compiled, layers=[1, -2], groups=[[0, 2]], early_exit=early_exit)
        assert tap.num_layers == plain_tap.num_layers
        assert tap.num_prefix_tokens == plain_tap.num_prefix_tokens
        with torch.no_grad():
            expected, actual = plain_tap(x), tap(x)
        assert_features_equal(actual, expected)
    assert counter.frame_count > 0  # the compiled forward ran
    assert_no_hooks(model)


@pytest.mark.slow
def test_compiled_tower_with_the_eager_backend_through_a_connector(tiny_clip_vision):
    """``DenseConnector.make_tap`` checks the depth of a compiled tower and taps it; with
    ``backend="eager"`` the fused output equals the uncompiled one, with grad too."""
    from mmconnect import ConnectorConfig, DCISpec, DenseConnector

    config = ConnectorConfig(
        fusion=DCISpec(groups=[[0, 1], [2, 3]]), vision_dim=32, llm_dim=16, num_layers=HF_LAYERS
    )
    connector = DenseConnector(config)
    compiled = torch.compile(tiny_clip_vision, backend="eager")
    x = pixels()
    expected = connector(connector.make_tap(tiny_clip_vision)(x))
    actual = connector(connector.make_tap(compiled)(x))
    assert_same(actual, expected)
    assert actual.requires_grad
    with pytest.raises(ValueError, match=r"the encoder has 4 blocks but the connector config says"):
        DenseConnector(config.replace(num_layers=5)).make_tap(compiled)
    assert_no_hooks(tiny_clip_vision)


def test_compiled_wrappers_are_unwrapped_for_discovery(tiny_clip_vision):
    """Discovery reads ``_orig_mod`` without compiling anything (no dynamo trace needed)."""
    from mmconnect.encoder_blocks import find_encoder_blocks, unwrap_compiled

    compiled = torch.compile(tiny_clip_vision, backend="eager")
    assert unwrap_compiled(compiled) is tiny_clip_vision
    assert unwrap_compiled(tiny_clip_vision) is tiny_clip_vision
    structure = find_encoder_blocks(compiled)
    assert structure.blocks is tiny_clip_vision.encoder.layers
    assert structure.num_prefix_tokens == 1


def test_gradient_checkpointing_reaches_tower_and_connector(tiny_clip_vision):
    """HF ``gradient_checkpointing_enable()`` in training mode: a streaming DCI connector on the
    tap gets the same gradients, and so does the tower, as without checkpointing."""
    from mmconnect import ConnectorConfig, DCISpec, DenseConnector

    config = ConnectorConfig(
        fusion=DCISpec(groups=[[0, 1], [2, 3]]), vision_dim=32, llm_dim=16, num_layers=HF_LAYERS
    )
    torch.manual_seed(1)
    connector = DenseConnector(config)
    plain = tiny_clip_vision.train()
    checkpointed = copy.deepcopy(plain)
    enable_hf_gradient_checkpointing(checkpointed, None)  # HF's default kwargs
    checkpointed.train()
    assert all(layer.gradient_checkpointing for layer in checkpointed.encoder.layers)
    x = pixels()

    grads = []
    for model in (plain, checkpointed):
        connector.zero_grad(set_to_none=True)
        connector(connector.make_tap(model)(x)).square().mean().backward()
        grads.append((parameter_grads(model), parameter_grads(connector)))
    (tower_plain, connector_plain), (tower_checkpointed, connector_checkpointed) = grads
    assert_grads_equal(tower_checkpointed, tower_plain)
    assert_grads_equal(connector_checkpointed, connector_plain)
    assert tower_checkpointed["embeddings.patch_embedding.weight"].abs().sum() > 0
    assert all(grad is not None for grad in connector_checkpointed.values())


# ------------------------------------------------------------ 12. dtype and group means
@pytest.mark.parametrize("images", [torch.float32, torch.float16], ids=str)
def test_features_come_in_the_images_dtype(tiny_clip_vision, images):
    """A bf16 tower fed images of another dtype: each layer is cast to the images' dtype as it is
    captured (as the official code casts every hidden state), before any averaging."""
    model = tiny_clip_vision.to(torch.bfloat16)
    x = pixels(dtype=images)
    hidden = [state[:, 1:].to(images) for state in hf_hidden_states(model, x)]
    tap = MultiLayerFeatureTap(model, layers=[2], groups=[[0, 1, 3]])
    for features in (tap(x), _context_features(tap, model, x)):
        assert features[2].dtype == images
        assert_same(features[2], hidden[2])
        mean = features.group_means[(0, 1, 3)]
        assert mean.dtype == images
        assert_same(mean, torch.sum(torch.stack([hidden[0], hidden[1], hidden[3]]), 0) / 3)


def _context_features(tap: MultiLayerFeatureTap, model: nn.Module, x: Tensor) -> LayerFeatures:
    with torch.no_grad(), tap:
        model(pixel_values=x)  # the images given by keyword are seen too
    return tap.features


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_streamed_means_round_like_stack_sum_divide(tiny_clip_vision, dtype):
    """The default rounds like ``torch.sum(torch.stack(group), 0) / n`` in the dtype (the
    official code), bit for bit; ``accumulate_dtype=torch.float32`` divides in fp32 and rounds
    once, like ``(stack(...).float().sum(0) / n).to(dtype)``; the two differ."""
    model = tiny_clip_vision.to(dtype)
    x = pixels(dtype=dtype, seed=3).mul(4)
    hidden = [state[:, 1:] for state in hf_hidden_states(model, x)]
    group = tuple(range(HF_LAYERS + 1))
    stacked = torch.stack([hidden[k] for k in group])
    with torch.no_grad():
        official = MultiLayerFeatureTap(model, groups=[group])(x).group_means[group]
        upcast = MultiLayerFeatureTap(model, groups=[group], accumulate_dtype=torch.float32)(x)
    upcast = upcast.group_means[group]
    assert official.dtype == upcast.dtype == dtype
    assert torch.equal(official, torch.sum(stacked, 0) / len(group))
    assert torch.equal(upcast, (stacked.float().sum(0) / len(group)).to(dtype))
    assert not torch.equal(official, upcast)


class _ConstantBlocks(nn.Module):
    """Twelve blocks, each a zero-weight Linear whose output is ``value`` everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(12))
        with torch.no_grad():
            for block in self.blocks:
                block.weight.zero_()
                block.bias.fill_(value)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_fp16_upcast_accumulation_avoids_the_official_overflow():
    """In fp16 the official sum is rounded to fp16 before dividing: 12 layers of 6000 sum to
    72000 > 65504, so the mean is inf; ``accumulate_dtype=torch.float32`` gives 6000."""
    model = _ConstantBlocks(6000.0).to(torch.float16)
    x = torch.zeros(1, 9, 4, dtype=torch.float16)  # [B, tokens, C] straight into the blocks
    group = tuple(range(1, 13))
    options = {"groups": [group], "num_prefix_tokens": 0}
    with torch.no_grad():
        official = MultiLayerFeatureTap(model, **options)(x).group_means[group]
        upcast = MultiLayerFeatureTap(model, accumulate_dtype=torch.float32, **options)(x)
    assert torch.isinf(official).all()
    assert (upcast.group_means[group] == 6000).all()


# --------------------------------------------------------- 13. LayerFeatures.from_hidden_states
@pytest.mark.parametrize(
    ("tokens", "prefix", "grid", "match"),
    [
        (
            577,
            0,
            None,
            r"num_prefix_tokens=0 leaves 577, .* expected num_prefix_tokens=1 \(577 = 1 \+ 24x24\)",
        ),
        (
            729,
            1,
            None,
            r"num_prefix_tokens=1 leaves 728, .* expected num_prefix_tokens=0 \(729 = 0 \+ 27x27\)",
        ),
        (14, 0, None, r"expected num_prefix_tokens=5 \(14 = 5 \+ 3x3\)"),
        (577, 0, (24, 24), r"not the 24x24 grid=\(24, 24\).*num_prefix_tokens=1 would leave"),
        (4, 0, (3, 3), r"grid=\(3, 3\) needs 9 tokens, more than the state has"),
        (577, -1, None, r"num_prefix_tokens must be a non-negative int, got -1; 1 for CLIP"),
        (577, 1, (24, 0), r"grid must be a \(height, width\) pair of positive ints, got \(24, 0\)"),
    ],
)
def test_from_hidden_states_refuses_a_wrong_prefix_count(tokens, prefix, grid, match):
    states = tuple(torch.zeros(1, tokens, 4) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        LayerFeatures.from_hidden_states(states, num_prefix_tokens=prefix, grid=grid)


@pytest.mark.parametrize(
    ("prefix", "grid", "match"),
    [
        (1.0, None, r"num_prefix_tokens must be a non-negative int, got 1\.0 \(float\)"),
        (True, None, r"num_prefix_tokens must be a non-negative int, got True \(bool\)"),
        (
            1,
            (24.0, 24),
            r"grid must be a \(height, width\) pair of positive ints, got \(24\.0, 24\)",
        ),
        (1, 576, r"grid must be a \(height, width\) pair of positive ints, got 576 \(int\)"),
    ],
)
def test_from_hidden_states_refuses_wrong_types(prefix, grid, match):
    states = tuple(torch.zeros(1, 577, 4) for _ in range(3))
    with pytest.raises(TypeError, match=match):
        LayerFeatures.from_hidden_states(states, num_prefix_tokens=prefix, grid=grid)


def test_from_hidden_states_accepts_right_counts_and_non_square_grids():
    states = (torch.randn(1, 577, 4), torch.randn(1, 577, 4))
    features = LayerFeatures.from_hidden_states(states, num_prefix_tokens=1)
    assert_same(features[1], states[1][:, 1:])
    wide = LayerFeatures.from_hidden_states(states, num_prefix_tokens=1, grid=(16, 36))
    assert wide.grid(0) == (16, 36)
    with pytest.raises(
        ValueError, match=r"hidden_states\[1\] must be a \[batch, tokens, channels\]"
    ):
        LayerFeatures.from_hidden_states((states[0], torch.zeros(577, 4)), num_prefix_tokens=1)


# ---------------------------------------------------------------------------- packed encoders


class _PackedEncoder(nn.Module):
    """Blocks that exchange ``[seq, C]`` packed sequences, as the Qwen2-VL towers' do."""

    def __init__(self, depth: int = 4, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, tokens: Tensor, cu_seqlens: Tensor) -> Tensor:
        hidden = tokens
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def _packed_states(encoder: _PackedEncoder, tokens: Tensor) -> list[Tensor]:
    states = [tokens]
    for block in encoder.blocks:
        states.append(block(states[-1]))
    return states


def test_packed_block_outputs_are_one_batch_row_in_block_order():
    torch.manual_seed(0)
    encoder = _PackedEncoder()
    tokens = torch.randn(10, 8)
    tap = MultiLayerFeatureTap(encoder, [0, 3], groups=[(1, 2, 4)], num_prefix_tokens=0)
    with torch.no_grad():
        features = tap(tokens, torch.tensor([0, 6, 10]))
        states = _packed_states(encoder, tokens)
    assert torch.equal(features[0], states[0][None])
    assert torch.equal(features[3], states[3][None])
    expected = torch.stack([states[1], states[2], states[4]]).sum(0) / 3
    assert torch.equal(features.group_means[(1, 2, 4)], expected[None])
    assert features.grids == {}


def test_packed_block_outputs_refuse_prefix_tokens():
    tap = MultiLayerFeatureTap(_PackedEncoder(), [2], num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"packed \[tokens, channels\].*num_prefix_tokens=1"):
        tap(torch.randn(6, 8), torch.tensor([0, 6]))


def test_final_norm_applies_to_the_last_layer_only(tiny_siglip_vision):
    tower = tiny_siglip_vision
    pixels = torch.randn(2, 3, tower.config.image_size, tower.config.image_size)
    depth = tower.config.num_hidden_layers
    tap = MultiLayerFeatureTap(
        tower, [depth, 1], groups=[(depth - 1, depth)], final_norm=tower.post_layernorm
    )
    with torch.no_grad():
        features = tap(pixels)
        outputs = tower(pixels, output_hidden_states=True)
    assert torch.equal(features[depth], outputs.last_hidden_state)
    assert torch.equal(features[1], outputs.hidden_states[1])
    mean = (outputs.hidden_states[depth - 1] + outputs.last_hidden_state) / 2
    torch.testing.assert_close(features.group_means[(depth - 1, depth)], mean)


def test_final_norm_must_be_a_module(tiny_siglip_vision):
    with pytest.raises(TypeError, match=r"final_norm must be None or the encoder's output norm"):
        MultiLayerFeatureTap(tiny_siglip_vision, [1], final_norm="post_layernorm")


def test_layer_features_map_applies_to_layers_and_group_means():
    features = LayerFeatures(
        {1: torch.arange(12.0).view(1, 6, 2)},
        grids={1: (2, 3)},
        group_means={(2, 3): torch.ones(1, 6, 2)},
    )
    cut = features.map(lambda tensor: tensor[:, 2:4], grids={1: (1, 2)})
    assert torch.equal(cut[1], features[1][:, 2:4])
    assert torch.equal(cut.group_means[(2, 3)], torch.ones(1, 2, 2))
    assert cut.grids == {1: (1, 2)}
    assert features.map(lambda tensor: tensor).grids == {}
