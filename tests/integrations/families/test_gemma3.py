"""Dense Gemma 3 (``dense_gemma3``) against HF's own Gemma 3 on tiny random configs.

The parts are :mod:`tests.support.gemma3_toys`: a 4-block SigLIP tower (56 px, a 4x4 grid),
Gemma 3's projector pooling to 2x2 (4 tokens per crop), a 2-layer Gemma 3 LLM with a sliding
window of 4 and a word-level tokenizer with Gemma 3's image tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from mmconnect import DenseConnector
from mmconnect.integrations.families.base import tower_features
from tests.support import gemma3_toys as toys


def _pixels(count: int, side: int = toys.SIDE, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _forward_hooks(module: torch.nn.Module) -> dict[str, list[int]]:
    return {name: sorted(part._forward_hooks) for name, part in module.named_modules()}


# ---------------------------------------------------------------------------- the tap


@pytest.mark.parametrize("hidden", [False, True])
def test_tower_features_final_norm_gives_the_towers_last_hidden_state(hidden):
    """With ``final_norm=post_layernorm`` layer L is the tower's output (what Gemma 3's projector
    reads), bit for bit, with early exit and in the full run; the hooks are gone afterwards."""
    torch.manual_seed(0)
    tower = AutoModel.from_config(toys.vision_config()).eval()
    connector = DenseConnector(toys.connector("native"))
    pixels = _pixels(2)
    with torch.no_grad():
        # HF's own run installs its persistent output-capturing hooks: count only what follows
        expected = tower(pixel_values=pixels, output_hidden_states=hidden).last_hidden_state
        hooks = _forward_hooks(tower)
        _, outputs = tower_features(
            connector,
            tower,
            pixels,
            output_hidden_states=hidden,
            final_norm=tower.post_layernorm,
        )
        _, without = tower_features(connector, tower, pixels, output_hidden_states=hidden)
    assert torch.equal(outputs.last_hidden_state, expected)
    assert not torch.equal(without.last_hidden_state, expected)  # the last block's raw output
    assert (outputs.hidden_states is not None) == hidden
    assert _forward_hooks(tower) == hooks
