"""LLM prefill latency vs the number of visual tokens: efficient Dense Connector (144) vs 576.

The efficient Dense Connector (docs/concepts.md, Efficient Dense Connector) resizes the fused 24x24 grid to 12x12 and
hands the LLM 144 visual tokens instead of LLaVA-1.5's 576; STI hands it 720 (576 + 144 from its
extra layers). What that buys is in the LLM, so this suite times the LLM's prefill alone:

* the LLM: TinyLlama-1.1B's shape built from a ``transformers.LlamaConfig`` with random weights
  (hidden 2048, MLP 5632, 22 layers, 32 query heads, 4 KV heads, vocabulary 32000, untied head:
  1,100,048,384 parameters), fp32 (bf16 on a GPU), SDPA attention, eval mode,
  ``torch.no_grad()``;
* the prompt: batch 1, 64 text tokens (32 before the image, 32 after, embedded by the LLM's own
  table) around the visual tokens, which are random embeddings standing in for the connector's
  output (their values do not change the cost) and passed as ``inputs_embeds``;
* one call: ``model(inputs_embeds=..., attention_mask=..., use_cache=True, logits_to_keep=1)``,
  a fresh KV cache each time, logits of the last position only: what ``generate()`` does before
  its first new token.

Variants: ``efficient-144`` (64 + 144 = 208 tokens), ``standard-576`` (640 tokens) and
``sti-720`` (784 tokens, reported, no target). Target: prefill with 144 visual tokens at least
2.5x faster than with 576 (ratio of the medians measured in the same run).

``MMCONNECT_BENCH_SIZE=tiny`` runs the same code on a 2-layer, width-64 Llama in seconds;
``MMCONNECT_BENCH_DEVICE=cuda`` runs it on the GPU in bf16 (``benchmarks/harness.py``).
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, ROUNDS, WARMUP_ROUNDS, record, synchronized, targets_apply
from llm_fixtures import llama, llama_size  # noqa: F401  (fixtures used by name)

GROUP = "prefill"
#: ``variant -> visual tokens`` handed to the LLM.
VISUAL_TOKENS = {"efficient-144": 144, "standard-576": 576, "sti-720": 720}
#: Target: median prefill time with 576 visual tokens / with 144, at least this.
TARGET_SPEEDUP = 2.5


def _prompt_embeddings(model, text_tokens: int, visual_tokens: int) -> torch.Tensor:
    """``[1, text_tokens + visual_tokens, hidden]``: text, then the image's tokens, then text.

    The text ids are random (fixed seed) and embedded by ``model``'s own table; the visual
    tokens are random embeddings at the table's scale (the weights' ``initializer_range``).
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (1, text_tokens), generator=generator)
    text = model.get_input_embeddings()(ids.to(model.device))
    visual = torch.randn(1, visual_tokens, model.config.hidden_size, generator=generator)
    visual = (visual * model.config.initializer_range).to(text.device, text.dtype)
    before = text_tokens // 2
    return torch.cat([text[:, :before], visual, text[:, before:]], dim=1)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", list(VISUAL_TOKENS))
def test_prefill(benchmark, variant, llama, llama_size, measurements):  # noqa: F811
    visual_tokens = VISUAL_TOKENS[variant]
    with torch.no_grad():
        embeddings = _prompt_embeddings(llama, llama_size.text_tokens, visual_tokens)
        total_tokens = embeddings.shape[1]
        attention_mask = torch.ones(1, total_tokens, dtype=torch.long, device=DEVICE)

        @synchronized
        def prefill():
            return llama(
                inputs_embeds=embeddings,
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=1,
            )

        output = benchmark.pedantic(
            prefill, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS
        )
    assert output.logits.shape == (1, 1, llama.config.vocab_size)
    assert output.past_key_values.get_seq_length() == total_tokens
    record(
        benchmark,
        measurements,
        GROUP,
        variant,
        visual_tokens=visual_tokens,
        total_tokens=total_tokens,
    )


def test_prefill_target(measurements):
    results = measurements.get(GROUP, {})
    if not targets_apply() or not {"efficient-144", "standard-576"} <= set(results):
        pytest.skip(
            "the target is checked at real size on the CPU after the 144 and 576 variants ran"
        )
    speedup = results["standard-576"]["median_s"] / results["efficient-144"]["median_s"]
    assert speedup >= TARGET_SPEEDUP, (speedup, results)
