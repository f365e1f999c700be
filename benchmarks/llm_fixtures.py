"""Llama-shaped LLMs with random weights: the prefill benchmark's (built once per module) and the
training-step benchmark's sizes.

``MMCONNECT_BENCH_SIZE=real`` (default) builds TinyLlama-1.1B's shape from a
``transformers.LlamaConfig`` made by the tiny-model builders' ``tiny_text_config`` (hidden 2048, MLP 5632, 22 layers, 32 query heads, 4 KV heads,
vocabulary 32000, untied output head: 1,100,048,384 parameters, 4.4 GB in fp32); ``tiny`` builds
a 2-layer, width-64 Llama that runs in milliseconds. Weights are random (never downloaded): the
prefill's cost depends on the shapes, not on the values.

Test modules use the fixtures by importing them::

    from llm_fixtures import llama, llama_size  # noqa: F401
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from harness import DEVICE, DTYPE, SIZE


@dataclass(frozen=True)
class LlamaSize:
    """Dimensions of the benchmarked Llama and of the text part of its prompt."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    #: Text tokens of the prompt around the image (system prompt, question, role tags).
    text_tokens: int

    def config(self) -> Any:
        """The ``transformers.LlamaConfig`` of this size (2048 positions, untied head, SDPA), from
        :func:`mmconnect.integrations.applications.tiny_models.tiny_text_config`."""
        from mmconnect.integrations.applications.tiny_models import tiny_text_config

        return tiny_text_config(
            "llama",
            width=self.hidden,
            intermediate_size=self.intermediate,
            blocks=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )


#: TinyLlama-1.1B's shape: 1,100,048,384 parameters.
TINYLLAMA_1B = LlamaSize(
    hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, text_tokens=64
)
TINY_LLAMA = LlamaSize(
    hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=1000, text_tokens=64
)
#: The LLM of the training-step benchmark: Llama-shaped, 4 layers of width 1024 (MLP 2816,
#: 16 query heads, 4 KV heads), vocabulary 32000, untied head: 110,633,984 parameters.
SMALL_LLAMA = LlamaSize(
    hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=32000, text_tokens=64
)


@pytest.fixture(scope="session")
def llama_size() -> LlamaSize:
    return TINYLLAMA_1B if SIZE == "real" else TINY_LLAMA


@pytest.fixture(scope="module")
def llama(llama_size):
    """A randomly initialised ``LlamaForCausalLM`` of ``llama_size`` (eval mode, SDPA, on the
    benchmark device in the benchmark dtype). Module-scoped: its 4.4 GB go when the module ends."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_size.config()).eval().to(DEVICE, DTYPE)
