"""Today's MLLM families at the benchmark's size: their stock HF configs, their connectors and
one unit of pixels each (an image, a tile or a crop), for the family benchmarks.

``MMCONNECT_BENCH_SIZE=real`` (default) builds each family's published vision tower exactly
(depth, width, MLP, heads, patch, merge / shuffle, window attention) with random weights, and an
LLM of the family's real hidden width (its real MLP width, query and key-value heads, head
size) cut to :data:`LLM_LAYERS` layers and a :data:`LLM_VOCAB`-token vocabulary: the real 7-8B
LLMs do not fit two CPU cores' time budget, so the LLM share of a prefill is that of two layers,
reported as such and never scaled up. ``tiny`` keeps every depth, grid and token count (the
presets are made for the real depths) and shrinks the widths to 32 (tower) and 64 (LLM).

Weights are random (never downloaded): cost depends on shapes, not values. They are written by
:func:`fill_random` instead of the models' own initialisers, which take longer than a tower pass
on two cores for 1-1.4 billion parameters. Standard library, torch and transformers only; the
Dense models come from :mod:`mmconnect.integrations.families`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from harness import DEVICE, ROUNDS, SIZE, WARMUP_ROUNDS

#: Layers of every family's LLM here (the real ones have 24-36): a share, not the whole.
#: Qwen3-VL's gets :data:`QWEN3_VL_LLM_LAYERS`: its DeepStack adds a level after each of the
#: first three layers.
LLM_LAYERS = 2
QWEN3_VL_LLM_LAYERS = 3
#: Vocabulary of every family's LLM here: the embedding lookup and the head's one position
#: are a negligible share of a prefill, the real 150-260K-token tables only cost memory.
LLM_VOCAB = 8192
#: Token ids of the families' special tokens, inside :data:`LLM_VOCAB`.
_IMAGE, _VIDEO, _START, _END = LLM_VOCAB - 1, LLM_VOCAB - 2, LLM_VOCAB - 3, LLM_VOCAB - 4
_REAL = SIZE == "real"
#: Timed rounds and warm-up calls of the family benchmarks. At real size on the CPU one timed
#: call after one warm-up: a tower pass takes 7-20 s on two cores and both suites must fit a
#: quiet quarter of an hour; elsewhere the harness's rounds.
FAMILY_ROUNDS, FAMILY_WARMUP_ROUNDS = (
    (1, 1) if _REAL and DEVICE == "cpu" else (ROUNDS, WARMUP_ROUNDS)
)
#: At real size on the CPU, a call whose tower needs more than this many GFLOP (estimated by
#: :func:`tower_gflop`) is skipped with its estimate named: about 20 s per call on two quiet
#: cores (Gemma 3's and SigLIP's 896 px towers need about 5,400). A GPU run measures them;
#: ``MMCONNECT_BENCH_CPU_GFLOP_LIMIT`` raises the limit for a CPU run with time.
CPU_GFLOP_LIMIT = float(os.environ.get("MMCONNECT_BENCH_CPU_GFLOP_LIMIT", "2000"))


#: Length of the block of random values :func:`fill_random` repeats (a prime, so the rows of
#: a matrix do not repeat with it).
_RANDOM_BLOCK = 1_000_003


def fill_random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter of ``module`` random values, fast; returns ``module``.

    Matrices, convolutions and embeddings repeat one block of :data:`_RANDOM_BLOCK` normal
    values (standard deviation 0.02, ``seed``); vectors named ``weight`` (norm scales) are 1 and
    other vectors (biases) 0. Buffers (rotary frequencies, position ids) are left as built.
    """
    block = torch.randn(_RANDOM_BLOCK, generator=torch.Generator().manual_seed(seed)) * 0.02
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() < 2:
                parameter.fill_(1.0 if name.rsplit(".", 1)[-1] == "weight" else 0.0)
                continue
            flat = parameter.view(-1)
            for start in range(0, flat.numel(), _RANDOM_BLOCK):
                piece = flat[start : start + _RANDOM_BLOCK]
                piece.copy_(block[: piece.numel()])
    return module


def build_random(factory: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``factory()`` built without its initialisers (HF's ``no_init_weights``), then
    :func:`fill_random` (``seed``), in eval mode."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        module = factory()
    return fill_random(module, seed).eval()


def tower_gflop(
    *, blocks: int, width: int, mlp: int, tokens: int, passes: int = 1, gated: bool = False
) -> float:
    """Estimated GFLOP of ``passes`` passes of a ViT-style tower over ``tokens`` tokens each.

    Per block and token: the attention projections (``4 C^2`` multiply-adds) and the MLP
    (``2 C I``, ``3 C I`` when ``gated``); per block, full attention scores and their weighted
    sum (``2 n^2 C``), an upper bound for window attention. Two FLOPs per multiply-add.
    """
    per_block = 2 * tokens * (4 * width**2 + (3 if gated else 2) * width * mlp)
    per_block += 4 * tokens**2 * width
    return passes * blocks * per_block / 1e9


def skip_above_cpu_limit(gflop: float, what: str) -> None:
    """``pytest.skip`` a call of ``gflop`` above :data:`CPU_GFLOP_LIMIT` at real size on the CPU."""
    import pytest

    if _REAL and DEVICE == "cpu" and gflop > CPU_GFLOP_LIMIT:
        pytest.skip(
            f"{what}: about {gflop:,.0f} GFLOP per call, above the CPU limit of "
            f"{CPU_GFLOP_LIMIT:,.0f} (MMCONNECT_BENCH_CPU_GFLOP_LIMIT raises it)"
        )


def _vision(real: dict[str, Any], **shared: Any) -> dict[str, Any]:
    """``real`` tower widths at real size, width 32 / MLP 64 / 2 heads when tiny; ``shared``
    fields (depth, patch, image size, ...) at both sizes."""
    tiny = {key: value for key, value in real.items() if key not in _VISION_WIDTHS}
    tiny |= {key: _VISION_WIDTHS[key] for key in real if key in _VISION_WIDTHS}
    return (real if _REAL else tiny) | shared


_VISION_WIDTHS = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "num_attention_heads": 2,
    "out_hidden_size": 64,
}


def _text(
    hidden: int, intermediate: int, heads: int, kv_heads: int, **extra: Any
) -> dict[str, Any]:
    """An LLM of the family's widths (real) or width 64 (tiny), :data:`LLM_LAYERS` layers
    unless ``extra`` says otherwise."""
    fields = {
        "hidden_size": hidden if _REAL else 64,
        "intermediate_size": intermediate if _REAL else 128,
        "num_attention_heads": heads if _REAL else 4,
        "num_key_value_heads": kv_heads if _REAL else 2,
        "num_hidden_layers": LLM_LAYERS,
        "vocab_size": LLM_VOCAB,
        "max_position_embeddings": 8192,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if "head_dim" in extra and not _REAL:
        extra = extra | {"head_dim": 16}
    return fields | extra


def _mrope(real_sections: list[int], theta: float) -> dict[str, Any]:
    """M-RoPE parameters: the real sections, or ``[2, 3, 3]`` for the tiny head size 16."""
    sections = real_sections if _REAL else [2, 3, 3]
    return {
        "rope_parameters": {"rope_type": "default", "mrope_section": sections, "rope_theta": theta}
    }


@dataclass(frozen=True)
class FamilyCase:
    """One family as benchmarked: its stock model, its native and Dense presets and its input.

    Attributes:
        family: the module name in :mod:`mmconnect.integrations.families` (``qwen2_5_vl``).
        model: the published model whose tower (and LLM widths) this is.
        native_preset: the preset of the family's own connector (what ``from_<family>`` reuses
            the stock weights into).
        dense_preset: the Dense Connector preset compared with it (DCI into the native
            connector: the same visual tokens per unit).
        unit: what one call encodes, in words (``"one 448x448 image"``, ``"one 364x364 tile"``).
        image: ``(height, width)`` in pixels of that unit at this size.
        stock_config: the family's stock HF config at this size.
        pixels: the keyword arguments of the Dense model's ``get_image_features`` for one unit.
        passes: tower passes per unit (LLaVA-OneVision: its base crop and one AnyRes crop).
    """

    family: str
    model: str
    native_preset: str
    dense_preset: str
    unit: str
    image: tuple[int, int]
    stock_config: Callable[[], Any]
    pixels: Callable[[Any], dict[str, torch.Tensor]]
    passes: int = 1

    def tower_gflop(self) -> float:
        """:func:`tower_gflop` of one unit through this family's tower at this size."""
        vision = self.stock_config().vision_config
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        return tower_gflop(
            blocks=getattr(vision, "depth", None) or vision.num_hidden_layers,
            width=vision.hidden_size,
            mlp=vision.intermediate_size,
            tokens=(self.image[0] // patch) * (self.image[1] // patch),
            passes=self.passes,
            gated=self.family == "qwen2_5_vl",
        )

    def stock_model(self) -> Any:
        """The stock HF ``*ForConditionalGeneration`` with random weights (:func:`build_random`,
        seed 0; eval mode)."""
        import transformers

        model_class = getattr(transformers, _STOCK_CLASSES[self.family])
        return build_random(lambda: model_class(self.stock_config()))

    def dense_model(self, stock: Any, preset: str) -> Any:
        """``from_<family>(stock, preset)``: the family's Dense model sharing ``stock``'s tower,
        LLM and head, with the preset's connector at the stock model's widths (its weights
        random by :func:`fill_random`, seed 1; eval mode)."""
        import importlib

        from transformers.initialization import no_init_weights

        module = importlib.import_module(f"mmconnect.integrations.families.{self.family}")
        with no_init_weights():
            dense = getattr(module, f"from_{self.family}")(stock, preset)
        fill_random(dense.model.connector, seed=1)
        return dense.eval()


_STOCK_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


def _random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _packed(config: Any, image: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Qwen-VL packed patches of one image: ``pixel_values [h*w, 3*T*P*P]``, ``grid [1, 3]``."""
    vision = config.vision_config
    rows, columns = image[0] // vision.patch_size, image[1] // vision.patch_size
    values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {
        "pixel_values": _random(rows * columns, values),
        "image_grid_thw": torch.tensor([[1, rows, columns]]),
    }


def _tiles(image: tuple[int, int]) -> Callable[[Any], dict[str, torch.Tensor]]:
    """Idefics3 / SmolVLM: one image of one tile, ``[1, 1, 3, S, S]``, and its pixel mask."""

    def pixels(config: Any) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": _random(1, 1, 3, *image),
            "pixel_attention_mask": torch.ones(1, 1, *image, dtype=torch.bool),
        }

    return pixels


# ---------------------------------------------------------------------------- the families


def qwen2_5_vl_config() -> Any:
    """Qwen2.5-VL-7B's stock config at this size (its tower exactly at real size)."""
    return _qwen2_5_vl()


def siglip_so400m_config(image_size: int, blocks: int = 27) -> Any:
    """A ``SiglipVisionConfig`` of SigLIP-SO400M/14 at ``image_size`` (no pooling head, as
    Gemma 3, LLaVA-OneVision and Idefics3 / SmolVLM use it), tiny-width when tiny."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**_siglip(image_size, blocks, vision_use_head=False))


def _qwen2_5_vl() -> Any:
    from transformers import Qwen2_5_VLConfig

    vision = _vision(
        {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584},
        depth=32,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        hidden_act="silu",
    )
    text = _text(3584, 18944, 28, 4) | _mrope([16, 24, 24], 1e6)
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=_IMAGE,
        video_token_id=_VIDEO,
        vision_start_token_id=_START,
        vision_end_token_id=_END,
    )


def _qwen3_vl() -> Any:
    from transformers import Qwen3VLConfig

    vision = _vision(
        {"hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096},
        depth=27,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
        hidden_act="gelu_pytorch_tanh",
    )
    text = _text(4096, 12288, 32, 8, head_dim=128, num_hidden_layers=QWEN3_VL_LLM_LAYERS)
    text |= _mrope([24, 20, 20], 5e6)
    return Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=_IMAGE,
        video_token_id=_VIDEO,
        vision_start_token_id=_START,
        vision_end_token_id=_END,
    )


def _siglip(image_size: int, blocks: int = 27, **extra: Any) -> dict[str, Any]:
    """SigLIP-SO400M/14 at ``image_size`` (width 1152, MLP 4304, 16 heads) or its tiny width."""
    return _vision(
        {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16},
        num_hidden_layers=blocks,
        patch_size=14,
        image_size=image_size,
        **extra,
    )


def _idefics3() -> Any:
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=_siglip(364),
        text_config={"model_type": "llama", **_text(4096, 14336, 32, 8, rope_theta=5e5)},
        scale_factor=2,
        image_token_id=_IMAGE,
    )


def _smolvlm() -> Any:
    from transformers import SmolVLMConfig

    return SmolVLMConfig(
        vision_config=_siglip(384),
        text_config={"model_type": "llama", **_text(2048, 8192, 32, 32, rope_theta=1.3e5)},
        scale_factor=3,
        image_token_id=_IMAGE,
    )


def _llava_onevision() -> Any:
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            **_siglip(384, 26, vision_use_head=False),
        },
        text_config={"model_type": "qwen2", **_text(3584, 18944, 28, 4, rope_theta=1e6)},
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_token_index=_IMAGE,
        video_token_index=_VIDEO,
    )


def _internvl() -> Any:
    from transformers import InternVLConfig

    vision = _vision(
        {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16},
        num_hidden_layers=24,
        patch_size=14,
        image_size=448,
        use_mean_pooling=True,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **_text(3584, 18944, 28, 4, rope_theta=1e6)},
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        image_token_id=_IMAGE,
    )


def _gemma3() -> Any:
    from transformers import Gemma3Config

    side = 896 if _REAL else 448  # tiny: a 32x32 grid still pools to Gemma 3's 16x16
    text = _text(
        2560,
        10240,
        8,
        4,
        head_dim=256,
        query_pre_attn_scalar=256 if _REAL else 16,
        sliding_window=1024,
        layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", **_siglip(side, vision_use_head=False)},
        text_config={"model_type": "gemma3_text", **text},
        mm_tokens_per_image=256,
        image_token_index=_IMAGE,
        boi_token_index=_START,
        eoi_token_index=_END,
    )


def _square(side: int) -> tuple[int, int]:
    return side, side


#: Every family benchmarked, in the order of the report (LLaVA-OneVision, the longest at real
#: size, last: an interrupted run keeps the others complete).
FAMILY_CASES: tuple[FamilyCase, ...] = (
    FamilyCase(
        family="qwen2_5_vl",
        model="Qwen2.5-VL-7B",
        native_preset="qwen2.5-vl-7b-merger-448",
        dense_preset="dc-dci+qwen2.5-merger-qwen2.5-vl-448",
        unit="one 448x448 image (32x32 patches)",
        image=_square(448),
        stock_config=_qwen2_5_vl,
        pixels=lambda config: _packed(config, _square(448)),
    ),
    FamilyCase(
        family="qwen3_vl",
        model="Qwen3-VL-8B",
        native_preset="qwen3-vl-8b+deepstack-768",
        dense_preset="dc-dci+qwen3-merger+deepstack-qwen3-vl-768",
        unit="one 448x448 image (28x28 patches)",
        image=_square(448),
        stock_config=_qwen3_vl,
        pixels=lambda config: _packed(config, _square(448)),
    ),
    FamilyCase(
        family="idefics3",
        model="Idefics3-8B-Llama3",
        native_preset="idefics3-pixel-shuffle-siglip-so400m-364",
        dense_preset="dc-dci+pixel-shuffle-idefics3-364",
        unit="one 364x364 tile",
        image=_square(364),
        stock_config=_idefics3,
        pixels=_tiles(_square(364)),
    ),
    FamilyCase(
        family="smolvlm",
        model="SmolVLM-Instruct (2B)",
        native_preset="smolvlm-pixel-shuffle-siglip-so400m",
        dense_preset="dc-dci+pixel-shuffle-smolvlm",
        unit="one 384x384 tile",
        image=_square(384),
        stock_config=_smolvlm,
        pixels=_tiles(_square(384)),
    ),
    FamilyCase(
        family="internvl",
        model="InternVL3-8B",
        native_preset="internvl-pixel-shuffle-internvit-300m",
        dense_preset="dc-dci+pixel-shuffle-mlp-internvit-300m",
        unit="one 448x448 tile",
        image=_square(448),
        stock_config=_internvl,
        pixels=lambda config: {"pixel_values": _random(1, 3, 448, 448)},
    ),
    FamilyCase(
        family="gemma3",
        model="Gemma 3 4B",
        native_preset="baseline+gemma3-pool-siglip-so400m-896",
        dense_preset="dc-dci+gemma3-pool-siglip-so400m-896",
        unit="one 896x896 crop" if _REAL else "one 448x448 crop (tiny)",
        image=_square(896 if _REAL else 448),
        stock_config=_gemma3,
        pixels=lambda config: {"pixel_values": _random(1, 3, *_square(896 if _REAL else 448))},
    ),
    FamilyCase(
        family="llava_onevision",
        model="LLaVA-OneVision-7B",
        native_preset="onevision-mlp-siglip-so400m-26",
        dense_preset="dc-dci-onevision-siglip-so400m-26",
        unit="one 384x384 image (base crop + 1 AnyRes crop)",
        image=_square(384),
        stock_config=_llava_onevision,
        pixels=lambda config: {
            "pixel_values": _random(1, 2, 3, 384, 384),
            "image_sizes": torch.tensor([[384, 384]]),
        },
        passes=2,
    ),
)
