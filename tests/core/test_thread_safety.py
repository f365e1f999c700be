"""One model, many threads: taps on a shared tower give each thread its own features (issue 11).

Every ``tap(...)`` call registers hooks on the shared tower's blocks. Before the fix, another
thread's forward fired them too: a thread got "the encoder's forward ended before reaching
layers [...]", another thread's layers, or its forward stopped by a foreign early exit. Here
several threads hammer one Dense LLaVA (``get_image_features``, and the model's forward) and one
bare CLIP tower (a tap per call, and one tap shared by all threads) with different images, and
every result must equal the single-threaded one exactly, with no hook left behind.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mmconnect import ConnectorConfig, DCISpec, DenseConnector, MultiLayerFeatureTap

transformers = pytest.importorskip("transformers")

from mmconnect.integrations.applications.tiny_models import (  # noqa: E402
    tiny_dense_llava,
    tiny_text_config,
    tiny_vision_config,
    tiny_vision_tower,
)
from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration  # noqa: E402

THREADS, CALLS = 4, 10
VISION, LLM, BLOCKS, IMAGE_SIZE, PATCH = 16, 32, 4, 56, 14  # a 4 x 4 token grid
IMAGE_TOKEN = 3
#: The CLIP tower: 4 blocks, width 16, 56 px / patch 14 (a 4 x 4 grid, 1 CLS).
TOWER = {"blocks": BLOCKS, "width": VISION, "image_size": IMAGE_SIZE, "patch_size": PATCH}
#: DCI on the 4-block tower: F = H[3], means of H[0..1] and H[2..3].
CONNECTOR = ConnectorConfig(
    fusion=DCISpec(groups=((0, 1), (2, 3))), vision_dim=VISION, llm_dim=LLM, num_layers=BLOCKS
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Python threads supply the concurrency; one intra-op thread each keeps 2 cores usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_dense_llava() -> DenseLlavaForConditionalGeneration:
    """Dense LLaVA (DCI) of the :data:`TOWER` CLIP and a 1-block Llama 32 wide (seed 0, eval)."""
    text = tiny_text_config(
        width=LLM,
        blocks=1,
        vocab_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return tiny_dense_llava(
        connector=CONNECTOR,
        vision_config=tiny_vision_config("clip", **TOWER),
        text_config=text,
        image_token_id=IMAGE_TOKEN,
    )


def image(thread: int, call: int, batch: int = 1) -> Tensor:
    """A different image for every (thread, call)."""
    generator = torch.Generator().manual_seed(1000 * thread + call)
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._backward_hooks),
        )
        for name, module in model.named_modules()
    }


def hammer(work: Callable[[int, int], object]) -> dict[tuple[int, int], object]:
    """Run ``work(thread, call)`` for CALLS calls in each of THREADS threads started together.

    Returns ``(thread, call) -> result``; re-raises the first exception a thread met.
    """
    results: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(thread: int) -> None:
        try:
            start.wait()
            for call in range(CALLS):
                results[thread, call] = work(thread, call)
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    workers = [threading.Thread(target=run, args=(thread,)) for thread in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return results


def assert_all_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    wrong = []
    for key, value in expected.items():
        got = actual[key]
        pairs = zip(got, value, strict=True) if isinstance(value, tuple) else [(got, value)]
        if not all(torch.equal(a, b) for a, b in pairs):
            wrong.append(key)
    assert wrong == [], f"{len(wrong)} of {len(expected)} (thread, call) results differ"


def features_tuple(features) -> tuple[Tensor, ...]:
    return (*(features[k] for k in sorted(features)), *features.group_means.values())


# ---------------------------------------------------------------------------------- Dense LLaVA
@pytest.fixture(scope="module")
def dense_llava() -> DenseLlavaForConditionalGeneration:
    return build_dense_llava()


def test_get_image_features_from_many_threads(dense_llava):
    model = dense_llava
    hooks_before = hook_counts(model)

    def work(thread: int, call: int) -> tuple[Tensor, ...]:
        with torch.no_grad():
            output = model.model.get_image_features(pixel_values=image(thread, call, batch=2))
        return (*output.pooler_output, output.last_hidden_state)

    expected = {(t, c): work(t, c) for t in range(THREADS) for c in range(CALLS)}
    assert_all_equal(hammer(work), expected)
    assert hook_counts(model) == hooks_before


def test_forward_from_many_threads(dense_llava):
    """The whole model's forward (image features spliced into the prompt) in every thread."""
    model = dense_llava
    tokens = DenseConnector(CONNECTOR).num_tokens((4, 4))
    ids = torch.tensor([[1, 7, *[IMAGE_TOKEN] * tokens, 8, 9]])

    def work(thread: int, call: int) -> Tensor:
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=image(thread, call)).logits

    expected = {(t, c): work(t, c) for t in range(THREADS) for c in range(CALLS)}
    assert_all_equal(hammer(work), expected)


def test_threads_asking_for_hidden_states_and_early_exits_mixed(dense_llava):
    """Half the calls run the tower in full under ``with tap:`` (hidden states requested), the
    others stop it early: neither kind may stop or feed the other."""
    model = dense_llava

    def work(thread: int, call: int) -> tuple[Tensor, ...]:
        full = (thread + call) % 2 == 0
        with torch.no_grad():
            output = model.model.get_image_features(
                pixel_values=image(thread, call), output_hidden_states=full
            )
        states = tuple(output.hidden_states) if full else ()
        return (*output.pooler_output, output.last_hidden_state, *states)

    expected = {(t, c): work(t, c) for t in range(THREADS) for c in range(CALLS)}
    assert_all_equal(hammer(work), expected)


# ----------------------------------------------------------------------------- bare CLIP tower
@pytest.fixture(scope="module")
def tower() -> nn.Module:
    return tiny_vision_tower("clip", **TOWER)


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "all-layers"])
def test_a_tap_per_call_on_one_shared_tower(tower, streaming):
    connector = DenseConnector(CONNECTOR)
    hooks_before = hook_counts(tower)

    def work(thread: int, call: int) -> tuple[Tensor, ...]:
        with torch.no_grad():
            features = connector.make_tap(tower, streaming=streaming)(image(thread, call))
        return (*features_tuple(features), connector.fuse(features))

    expected = {(t, c): work(t, c) for t in range(THREADS) for c in range(CALLS)}
    assert_all_equal(hammer(work), expected)
    assert hook_counts(tower) == hooks_before


@pytest.mark.parametrize("form", ["call", "context"])
def test_one_tap_shared_by_all_threads(tower, form):
    tap = MultiLayerFeatureTap(tower, layers=[1, -2], groups=[[0, 2]])
    hooks_before = hook_counts(tower)

    def work(thread: int, call: int) -> tuple[Tensor, ...]:
        with torch.no_grad():
            if form == "call":
                features = tap(image(thread, call))
                assert tap.features is features  # this thread's latest capture
            else:
                with tap:
                    assert tap.attached
                    tower(image(thread, call))
                assert not tap.attached
                features = tap.features
        return features_tuple(features)

    expected = {(t, c): work(t, c) for t in range(THREADS) for c in range(CALLS)}
    assert_all_equal(hammer(work), expected)
    assert hook_counts(tower) == hooks_before


def test_with_grad_each_thread_backpropagates_its_own_graph(tower):
    """With autograd on, each thread's features carry its own graph: the input gradient of a
    thread's loss equals the single-threaded one."""
    tap = MultiLayerFeatureTap(tower, layers=[-2], groups=[[0, 1, 2]])

    def work(thread: int, call: int) -> Tensor:
        pixels = image(thread, call).requires_grad_(True)
        features = tap(pixels)
        loss = sum(tensor.square().sum() for tensor in features_tuple(features))
        (grad,) = torch.autograd.grad(loss, pixels)
        return grad

    expected = {(t, c): work(t, c) for t in range(THREADS) for c in range(CALLS)}
    assert_all_equal(hammer(work), expected)


def test_a_thread_inside_with_tap_does_not_block_other_threads(tower):
    """``with tap:`` in one thread attaches for that thread only: another thread may call the
    same tap meanwhile, and its hooks never see the first thread's forward."""
    tap = MultiLayerFeatureTap(tower, layers=[2])
    with torch.no_grad():
        expected_main, expected_other = tap(image(0, 0))[2], tap(image(1, 0))[2]
    other: list[Tensor] = []
    with torch.no_grad(), tap:
        worker = threading.Thread(target=lambda: other.append(tap(image(1, 0))[2]))
        worker.start()
        worker.join()
        assert tap.attached  # still attached in this thread
        tower(image(0, 0))
    assert torch.equal(other[0], expected_other)
    assert torch.equal(tap.features[2], expected_main)
    with pytest.raises(RuntimeError, match="already attached in this thread"), tap, tap:
        pass


def test_a_tap_is_copied_without_its_captures(tower):
    """Thread-local capture state stays behind when a model holding a tap is deep-copied (as
    ``copy.deepcopy(model)`` does to an integration that keeps its tap): the copy taps the
    copied tower and has no features yet."""
    tap = MultiLayerFeatureTap(tower, layers=[2])
    with torch.no_grad():
        expected = tap(image(0, 0))[2]
    holder = nn.Module()
    holder.tower, holder.tap = tower, tap
    copied = copy.deepcopy(holder)
    assert copied.tap.encoder is copied.tower
    assert copied.tap.structure.blocks is copied.tower.encoder.layers
    with pytest.raises(RuntimeError, match="no features captured yet"):
        _ = copied.tap.features
    with torch.no_grad():
        assert torch.equal(copied.tap(image(0, 0))[2], expected)
    assert hook_counts(copied.tower) == hook_counts(tower)
