"""A Dense checkpoint saved in bf16 loads in its saved dtype (``dtype="auto"``, transformers 4's
``torch_dtype="auto"``, and transformers 5's default), in another dtype and with a
``device_map``, with the Auto class and the family's own class, for Dense LLaVA, LLaVA-NeXT and
Mini-Gemini; the logits are those of the model that was saved.

The bf16 model is made as HF makes one, by loading an fp32 checkpoint with ``dtype=torch.bfloat16``.
(``model.to(torch.bfloat16)`` also casts the LLM's rotary ``inv_freq`` buffers, which HF keeps
in fp32 and does not save: a model cast that way and its reload differ by up to 1e-3 in the
logits, for the stock LLaVA classes as for the Dense ones, see
:func:`test_cast_models_differ_only_by_the_unsaved_rotary_buffers`.) This machine has only a CPU,
so ``device_map`` places every module on it; ``"auto"`` is accepted and gives the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, LlavaNextForConditionalGeneration

from mmconnect.integrations.applications.tiny_models import (
    tiny_connector,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextForConditionalGeneration,
    from_llava_next,
)
from mmconnect.integrations.families.mini_gemini import (
    DenseMGMConfig,
    DenseMGMForConditionalGeneration,
)
from tests.support import llava_next_toys, llava_toys, mini_gemini_toys


def _llava() -> tuple[torch.nn.Module, dict]:
    model = llava_toys.tiny_dense()
    tokens = model.model.image_token_count()
    inputs = {
        "input_ids": llava_toys.prompt_ids(tokens, batch=2),
        "pixel_values": llava_toys.pixels(2, llava_toys.TINY_SIZE),
    }
    return model, inputs


def _llava_next() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(llava_next_toys.llava_next_config())
    model = from_llava_next(stock, llava_next_toys.CONNECTORS["dci"])
    return model, llava_next_toys.inputs(model, [(60, 150), (500, 30)])


def _mini_gemini() -> tuple[torch.nn.Module, dict]:
    """A 4-block CLIP tower at 56 px (a 4x4 grid), DCI, the toys' HR ConvNeXt at 64 px."""
    torch.manual_seed(0)
    config = DenseMGMConfig(
        vision_config=tiny_vision_config("clip", width=16, image_size=56),
        text_config=tiny_text_config(vocab_size=40, width=32),
        image_token_index=mini_gemini_toys.IMAGE,
        connector=tiny_connector(vision_dim=16, llm_dim=32).to_dict(),
        aux_encoder=mini_gemini_toys.AUX,
        image_size_aux=64,
    )
    model = DenseMGMForConditionalGeneration(config)
    tokens = model.model.image_token_count()
    pixels = mini_gemini_toys.hr_pixels(64, count=2)
    return model, {"input_ids": mini_gemini_toys.prompt(tokens, count=2), "pixel_values": pixels}


#: family -> (its Dense class, builder of a tiny fp32 model and inputs).
FAMILIES: dict[str, tuple[type, Callable[[], tuple[torch.nn.Module, dict]]]] = {
    "llava": (DenseLlavaForConditionalGeneration, _llava),
    "llava_next": (DenseLlavaNextForConditionalGeneration, _llava_next),
    "mini_gemini": (DenseMGMForConditionalGeneration, _mini_gemini),
}


class Saved:
    """A family's bf16 checkpoint folder, the model saved there and its logits."""

    def __init__(self, family: str, root: Path) -> None:
        self.dense_class, build = FAMILIES[family]
        model, self.inputs = build()
        model.save_pretrained(root / "fp32")
        self.model = self.dense_class.from_pretrained(root / "fp32", dtype=torch.bfloat16)
        self.folder = root / "bf16"
        self.model.save_pretrained(self.folder)
        self.logits = self.run(self.model)

    def run(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(**self.inputs).logits


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory) -> Saved:
    return Saved(request.param, tmp_path_factory.mktemp(request.param))


def test_checkpoint_is_stored_in_bf16(saved):
    assert {p.dtype for p in saved.model.parameters()} == {torch.bfloat16}
    assert json.loads((saved.folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(saved.folder / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
    assert dtypes == {"BF16", "I64"}  # I64: the connector's config fingerprint


@pytest.mark.parametrize(
    ("auto_class", "options"),
    [
        (True, {"dtype": "auto"}),
        (True, {"torch_dtype": "auto"}),
        (True, {}),
        (False, {"dtype": "auto"}),
    ],
    ids=["dtype-auto", "torch_dtype-auto", "default", "dense-class-dtype-auto"],
)
def test_auto_dtype_loads_the_saved_dtype_and_logits(saved, auto_class, options):
    loader = AutoModelForImageTextToText if auto_class else saved.dense_class
    loaded = loader.from_pretrained(saved.folder, **options)
    assert type(loaded) is saved.dense_class
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(saved.run(loaded), saved.logits)


@pytest.mark.parametrize(
    "options",
    [
        {"device_map": "cpu"},
        {"device_map": {"": "cpu"}},
        {"device_map": "auto"},
        {"device_map": "auto", "dtype": "auto"},
    ],
    ids=["cpu", "mapping", "auto", "auto-dtype-auto"],
)
def test_device_map_loads_on_the_cpu(saved, options):
    loaded = AutoModelForImageTextToText.from_pretrained(saved.folder, **options)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(saved.run(loaded), saved.logits)


def test_loads_in_another_dtype(saved):
    """fp32 from the bf16 checkpoint (with ``device_map="auto"``): the weights upcast exactly,
    the logits those of the bf16 model upcast after loading."""
    loaded = AutoModelForImageTextToText.from_pretrained(
        saved.folder, dtype=torch.float32, device_map="auto"
    )
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    upcast = saved.dense_class.from_pretrained(saved.folder, dtype="auto").float()
    for (name, tensor), (_, reference) in zip(
        loaded.state_dict().items(), upcast.state_dict().items(), strict=True
    ):
        assert torch.equal(tensor, reference), name
    assert torch.equal(saved.run(loaded), saved.run(upcast))


def test_sharded_checkpoint_loads_with_device_map_and_auto_dtype(saved, tmp_path):
    """Shards and their index (the connector check reads the index) load the same way."""
    saved.model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto", dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(saved.run(loaded), saved.logits)


def test_cast_models_differ_only_by_the_unsaved_rotary_buffers(saved, tmp_path):
    """``.to(torch.bfloat16)`` casts the rotary ``inv_freq`` buffers that HF computes in fp32 at
    load time and never saves; everything saved reloads bit for bit."""
    cast = saved.dense_class.from_pretrained(saved.folder).float().to(torch.bfloat16)
    cast.save_pretrained(tmp_path)
    loaded = saved.dense_class.from_pretrained(tmp_path, dtype="auto")
    saved_state, loaded_state = cast.state_dict(), loaded.state_dict()
    assert all(torch.equal(saved_state[key], loaded_state[key]) for key in saved_state)
    differing = {
        name
        for (name, buffer), (_, other) in zip(
            cast.named_buffers(), loaded.named_buffers(), strict=True
        )
        if buffer.dtype != other.dtype
    }
    assert differing and all(name.endswith("inv_freq") for name in differing)
