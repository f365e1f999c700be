"""The connector-zoo table of docs/zoo/index.md is what the registered connectors compute.

Every row names a reference model's connector: its spec and real widths. The token counts for a
24x24 and a 27x27 grid and the parameter count are recomputed here (connectors built on the meta
device) and the page's table must equal the rendering below, so the page cannot drift from the
code; every registered zoo projector kind must appear in at least one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mmconnect import DeepStackSpec, build_projector, list_projectors
from mmconnect.zoo.abstractors import CAbstractorSpec, LDPv2Spec
from mmconnect.zoo.patch_merger import (
    MISTRAL3_MERGER,
    QWEN2_5_VL_MERGER,
    QWEN2_VL_MERGER,
    QWEN3_VL_DEEPSTACK_MERGER,
    QWEN3_VL_MERGER,
)
from mmconnect.zoo.perceiver import PerceiverSpec
from mmconnect.zoo.pixel_shuffle import PixelShuffleMLPSpec, PixelShuffleSpec
from mmconnect.zoo.pooled import Gemma3PoolSpec, OnevisionPoolSpec
from mmconnect.zoo.qformer import QFormerSpec
from tests.support.paths import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "zoo" / "index.md"
BUILT_IN = {"identity", "linear", "mlp"}


@dataclass(frozen=True)
class Row:
    connector: str  # the page's first column: the connector and its page
    origin: str
    spec: object
    in_dim: int  # the reference model's vision width into the connector
    out_dim: int  # its LLM width
    status: str  # exact-to-reference status, as each module's tests establish it


ROWS = (
    Row(
        "[Pixel shuffle + Linear](pixel_shuffle.md)",
        "Idefics3-8B",
        PixelShuffleSpec(factor=2),
        1152,
        4096,
        "HF `Idefics3Connector`: equal, fp32 and bf16",
    ),
    Row(
        "[Pixel shuffle + Linear](pixel_shuffle.md)",
        "SmolVLM-Instruct",
        PixelShuffleSpec(factor=3),
        1152,
        2048,
        "HF `SmolVLMConnector`: equal, fp32 and bf16",
    ),
    Row(
        "[Pixel shuffle + MLP](pixel_shuffle.md)",
        "InternVL3-8B",
        PixelShuffleMLPSpec(factor=2),
        1024,
        3584,
        "HF InternVL pixel shuffle + `InternVLMultiModalProjector`: equal, fp32 and bf16",
    ),
    Row(
        "[Patch merger](patch_merger.md)",
        "Qwen2-VL-7B",
        QWEN2_VL_MERGER,
        1280,
        3584,
        "HF `PatchMerger`: equal, fp32 and bf16",
    ),
    Row(
        "[Patch merger](patch_merger.md)",
        "Qwen2.5-VL-7B",
        QWEN2_5_VL_MERGER,
        1280,
        3584,
        "HF `Qwen2_5_VLPatchMerger`: equal, fp32 and bf16",
    ),
    Row(
        "[Patch merger](patch_merger.md)",
        "Qwen3-VL-8B",
        QWEN3_VL_MERGER,
        1152,
        3584,
        "HF `Qwen3VLVisionPatchMerger`: equal, fp32 and bf16",
    ),
    Row(
        "[Mistral 3 patch merger](patch_merger.md)",
        "Mistral-Small-3.1",
        MISTRAL3_MERGER,
        1024,
        5120,
        "HF `Mistral3MultiModalProjector`: equal, fp32 and bf16",
    ),
    Row(
        "[Gemma 3 pooling](pooled.md)",
        "Gemma 3 4B",
        Gemma3PoolSpec(grid=(16, 16)),
        1152,
        2560,
        "HF `Gemma3MultiModalProjector`: equal, fp32 and bf16",
    ),
    Row(
        "[OneVision 2x2 pooling](pooled.md)",
        "LLaVA-OneVision-7B",
        OnevisionPoolSpec(),
        1152,
        3584,
        "HF OneVision projector + `apply_pooling`: equal, fp32 and bf16",
    ),
    Row(
        "[Perceiver resampler](perceiver.md)",
        "Idefics2-8B",
        PerceiverSpec(),
        1152,
        4096,
        "HF `Idefics2Connector` (eager attention): equal, fp32 and bf16",
    ),
    Row(
        "[Q-Former](qformer.md)",
        "BLIP-2 OPT-2.7b",
        QFormerSpec(),
        1408,
        2560,
        "HF `Blip2QFormerModel` + projection: equal, fp32 and bf16",
    ),
    Row(
        "[C-Abstractor](abstractors.md)",
        "Honeybee-7B (M=144)",
        CAbstractorSpec(hidden_dim=1024, pooled_grid=(12, 12), pos_embed_grid=(24, 24)),
        1024,
        4096,
        "no HF module: equal to Honeybee's blocks assembled from timm (fp32, bf16), hand-derived values",
    ),
    Row(
        "[LDPv2](abstractors.md)",
        "MobileVLM V2 1.7B",
        LDPv2Spec(pooled_grid=(12, 12)),
        1024,
        2048,
        "no HF module: equal to MobileVLM's layers (fp32, bf16), hand-derived values",
    ),
    Row(
        "[DeepStack](deepstack.md)",
        "Qwen3-VL-8B (per level)",
        QWEN3_VL_DEEPSTACK_MERGER,
        1152,
        3584,
        "HF Qwen3-VL `deepstack_merger_list` and `_deepstack_process`: equal, fp32 and bf16",
    ),
)


def _tokens(projector: torch.nn.Module, grid: tuple[int, int]) -> str:
    if not hasattr(projector, "num_tokens"):
        return str(grid[0] * grid[1])  # a token-wise projector keeps the count
    try:
        return str(projector.num_tokens(grid))
    except ValueError:
        return "refused"


def render_table() -> str:
    """The table the page must hold, computed from the code."""
    lines = [
        "| connector | origin | tokens from 24x24 | tokens from 27x27 | parameters | exact to the reference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in ROWS:
        with torch.device("meta"):
            projector = build_projector(row.spec, row.in_dim, row.out_dim)
        parameters = sum(parameter.numel() for parameter in projector.parameters())
        lines.append(
            f"| {row.connector} | {row.origin} ({row.in_dim} -> {row.out_dim}) | "
            f"{_tokens(projector, (24, 24))} | {_tokens(projector, (27, 27))} | "
            f"{parameters:,} | {row.status} |"
        )
    return "\n".join(lines) + "\n"


def test_every_zoo_projector_kind_has_a_row():
    kinds = {row.spec.kind for row in ROWS}
    assert set(list_projectors()) - BUILT_IN <= kinds


def test_the_page_table_is_what_the_code_computes():
    text = PAGE.read_text()
    assert render_table() in text, "docs/zoo/index.md's table differs from render_table()"


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.origin)
def test_each_row_links_an_existing_page(row):
    page = row.connector.split("(", 1)[1].rstrip(")")
    assert (PAGE.parent / page).is_file()


def test_deepstack_row_is_a_level_of_an_injection():
    spec = DeepStackSpec(layers=(9, 17, 25), projector=ROWS[-1].spec)
    assert spec.projector.kind == "patch_merger" and spec.projector.postshuffle_norm
