"""Tiny random models built from configs (never downloaded): the one home of the small vision
towers, LLMs, tokenizers and Dense LLaVAs that the tests, the benchmarks, the demo and
``mmconnect inspect tiny-...`` use.

Every model builder seeds torch itself (``seed``, default 0) right before building, so two calls
with the same arguments give identical weights, and returns its model in eval mode and fp32;
callers that need another mode or dtype change their own copy. Config builders consume no random
numbers. Transformers, timm, open_clip and tokenizers are imported inside the builders, so
importing this module needs only torch.

Sizes are stated in each docstring as blocks (transformer layers or ConvNeXt stages), width
(hidden size), token grid (``image_size // patch_size`` per side) and prefix tokens (CLS /
register tokens in front of the patch tokens).

Example:
    >>> from mmconnect.integrations.applications.tiny_models import tiny_vision_tower
    >>> tower = tiny_vision_tower("clip")  # 4 blocks, width 32, 42 px / patch 14: a 3x3 grid
    >>> tower(torch.zeros(1, 3, 42, 42)).last_hidden_state.shape  # 1 CLS + 9 patch tokens
    torch.Size([1, 10, 32])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmconnect import ConnectorConfig
from mmconnect.validation import check_choice, check_int, check_positive_int

if TYPE_CHECKING:
    from mmconnect.integrations.families.llava import (
        DenseLlavaConfig,
        DenseLlavaForConditionalGeneration,
        DenseLlavaProcessor,
    )

#: Side in pixels of the default square test image of the ViT-like towers: 3 x 3 patches of 14.
TINY_IMAGE_SIZE = 42
#: Patch size of every tiny ViT-like tower.
TINY_PATCH_SIZE = 14

#: Depth and native image size of the published towers the presets were made for:
#: CLIP-L/336 (24 blocks, 336 px / patch 14: a 24x24 grid) and SigLIP-SO400M/384 (27 blocks,
#: 384 px / patch 14: a 27x27 grid). ``tiny_vision_config(family, **PUBLISHED_GEOMETRY[family])``
#: gives a narrow tower on which every preset of that family applies.
PUBLISHED_GEOMETRY: Mapping[str, Mapping[str, int]] = {
    "clip": {"blocks": 24, "image_size": 336},
    "siglip": {"blocks": 27, "image_size": 384},
}

#: The special tokens of :func:`build_word_tokenizer`'s vocabulary, in id order (0 to 4); every
#: word-level tokenizer here has them.
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")

#: Token ids the tiny Dense LLaVA's LLM and :func:`tiny_llava_tokenizer` agree on.
PAD, BOS, EOS, IMAGE = 0, 1, 2, 3

VISION_FAMILIES = ("clip", "siglip")
TEXT_FAMILIES = ("llama", "qwen2")


def _seeded(seed: int) -> None:
    """Seed torch for the builder about to run (a wrong ``seed`` type is a ``TypeError``)."""
    torch.manual_seed(check_int(seed, "seed"))


# ---------------------------------------------------------------------------- vision towers


def tiny_vision_config(
    family: str = "clip",
    *,
    blocks: int = 4,
    width: int = 32,
    intermediate_size: int | None = None,
    heads: int = 2,
    image_size: int = TINY_IMAGE_SIZE,
    patch_size: int = TINY_PATCH_SIZE,
) -> Any:
    """An HF ``CLIPVisionConfig`` / ``SiglipVisionConfig`` of a tiny ViT.

    The defaults: 4 blocks, width 32 (MLP 64), 2 heads, 42 px images of 14 px patches, so a 3x3
    token grid; a CLIP tower puts 1 CLS prefix token in front of the patch tokens, a SigLIP tower
    none.

    Args:
        family: ``"clip"`` or ``"siglip"``.
        blocks: number of transformer blocks (HF ``num_hidden_layers``).
        width: hidden size.
        intermediate_size: MLP width; ``None``: ``2 * width``.
        heads: attention heads.
        image_size: native square image side in pixels; the grid side is
            ``image_size // patch_size`` (SigLIP-SO400M's 384 px give 27).
        patch_size: patch side in pixels.

    Raises:
        ValueError: an unknown family or a size below 1.
        TypeError: a size that is not an int.
    """
    check_choice(family, "family", VISION_FAMILIES)
    for name, value in (
        ("blocks", blocks),
        ("width", width),
        ("heads", heads),
        ("image_size", image_size),
        ("patch_size", patch_size),
    ):
        check_positive_int(value, name)
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    config_class = CLIPVisionConfig if family == "clip" else SiglipVisionConfig
    return config_class(
        hidden_size=width,
        intermediate_size=2 * width if intermediate_size is None else intermediate_size,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )


def tiny_vision_tower(family: str = "clip", *, seed: int = 0, **config: Any) -> nn.Module:
    """An HF ``CLIPVisionModel`` / ``SiglipVisionModel`` of :func:`tiny_vision_config`.

    Default geometry: 4 blocks, width 32, a 3x3 grid at 42 px; CLIP: 1 CLS + 9 patch tokens,
    SigLIP: 9 patch tokens, no prefix.

    Args:
        family: ``"clip"`` or ``"siglip"``.
        seed: torch seed set right before the model is built.
        **config: :func:`tiny_vision_config`'s keyword arguments (``blocks``, ``width``, ...).
    """
    vision_config = tiny_vision_config(family, **config)
    from transformers import CLIPVisionModel, SiglipVisionModel

    _seeded(seed)
    model_class = CLIPVisionModel if family == "clip" else SiglipVisionModel
    return model_class(vision_config).eval()


def tiny_clip_model(*, seed: int = 0) -> nn.Module:
    """An HF ``CLIPModel`` (vision and text towers): its vision blocks at
    ``vision_model.encoder.layers``.

    Vision: :func:`tiny_vision_config`'s defaults (4 blocks, width 32, 3x3 grid at 42 px, 1 CLS).
    Text: 1 block, width 32, vocabulary 64, 16 positions. Projection to 16.
    """
    from transformers import CLIPConfig, CLIPModel

    vision = tiny_vision_config("clip").to_dict()
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
    _seeded(seed)
    return CLIPModel(config).eval()


def tiny_timm_vit_reg(
    *,
    image_size: int = TINY_IMAGE_SIZE,
    blocks: int = 3,
    width: int = 32,
    heads: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A timm ``VisionTransformer`` (``vit_small_patch14_reg4_dinov2`` resized) with 1 CLS and 4
    register tokens: 5 prefix tokens in front of the patch tokens.

    Defaults: 3 blocks, width 32, 42 px images of 14 px patches: a 3x3 grid.
    """
    import timm

    _seeded(seed)
    return timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        img_size=image_size,
        depth=blocks,
        embed_dim=width,
        num_heads=heads,
    ).eval()


def tiny_timm_convnext(
    *,
    dims: Sequence[int] | None = (8, 16, 24, 32),
    depths: Sequence[int] | None = (1, 1, 1, 1),
    num_classes: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """A timm ``ConvNeXt`` (``convnext_atto`` resized): 4 stages, total stride 32, no prefix
    tokens.

    Defaults: one block per stage, widths 8 / 16 / 24 / 32 (so a 64 px image gives a 2x2 map).
    ``dims`` / ``depths`` ``None``: ``convnext_atto``'s own (40 / 80 / 160 / 320 wide, 2 / 2 / 6
    / 2 blocks); ``num_classes`` ``None``: timm's classifier head (1000 classes), 0: none.
    """
    import timm

    options: dict[str, Any] = {}
    if dims is not None:
        options["dims"] = tuple(dims)
    if depths is not None:
        options["depths"] = tuple(depths)
    if num_classes is not None:
        options["num_classes"] = num_classes
    _seeded(seed)
    return timm.create_model("convnext_atto", pretrained=False, **options).eval()


#: Shared by the open_clip ``VisionTransformer`` and the vision tower of the open_clip ``CLIP``.
_OPENCLIP_VISION = {
    "image_size": TINY_IMAGE_SIZE,
    "patch_size": TINY_PATCH_SIZE,
    "width": 32,
    "layers": 3,
    "mlp_ratio": 2.0,
}


def tiny_openclip_vit(*, seed: int = 0) -> nn.Module:
    """An open_clip ``VisionTransformer``: 3 blocks, width 32, 42 px / patch 14 (a 3x3 grid),
    1 CLS prefix token, output 16."""
    import open_clip

    _seeded(seed)
    return open_clip.transformer.VisionTransformer(
        **_OPENCLIP_VISION, heads=2, output_dim=16
    ).eval()


def tiny_openclip_clip(*, seed: int = 0) -> nn.Module:
    """An open_clip ``CLIP`` (image and text): vision blocks at ``visual.transformer.resblocks``
    (3 blocks, width 32, a 3x3 grid at 42 px, 1 CLS), its text tower's blocks (1, width 32,
    vocabulary 64, 8 positions) at the top-level ``transformer.resblocks``; embeddings of 16."""
    import open_clip

    _seeded(seed)
    vision = {**_OPENCLIP_VISION, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def tiny_openclip_convnext(*, seed: int = 0) -> nn.Module:
    """An open_clip ``TimmModel`` around a timm ``convnext_atto`` trunk (4 stages, blocks at
    ``trunk.stages``), 32 px images, embeddings of 16."""
    import open_clip

    _seeded(seed)
    return open_clip.timm_model.TimmModel(
        "convnext_atto", embed_dim=16, image_size=32, pretrained=False
    ).eval()


#: ``mmconnect inspect`` / :func:`tiny_encoder` names -> (builder, native image size): tiny
#: random encoders of the published depths and grids.
TINY_ENCODERS: Mapping[str, tuple[Callable[[], nn.Module], int]] = {
    # 24 blocks, width 32, 336 px / patch 14: 1 CLS + 24x24
    "tiny-clip-l-336": (lambda: tiny_vision_tower("clip", **PUBLISHED_GEOMETRY["clip"]), 336),
    # 27 blocks, width 32, 384 px / patch 14: 27x27, no prefix
    "tiny-siglip-so400m": (
        lambda: tiny_vision_tower("siglip", **PUBLISHED_GEOMETRY["siglip"]),
        384,
    ),
    # 4 blocks, width 32, 56 px / patch 14: 1 CLS + 4 registers + 4x4
    "tiny-timm-vit-reg4": (lambda: tiny_timm_vit_reg(image_size=56, blocks=4), 56),
    # convnext_atto's own widths and depths, no classifier: stride 4 to 32, 64 px -> 16x16 to 2x2
    "tiny-timm-convnext": (
        lambda: tiny_timm_convnext(dims=None, depths=None, num_classes=0),
        64,
    ),
}


def tiny_encoder(name: str) -> tuple[nn.Module, int]:
    """The tiny encoder ``name`` of :data:`TINY_ENCODERS` (seed 0, eval mode) and its native
    image size.

    Raises:
        ValueError: ``name`` is not one of :data:`TINY_ENCODERS`.
    """
    check_choice(name, "name", tuple(TINY_ENCODERS))
    build, size = TINY_ENCODERS[name]
    return build(), size


# ---------------------------------------------------------------------------- LLMs and tokenizers


def tiny_text_config(
    family: str = "llama",
    *,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    width: int = 32,
    blocks: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_position_embeddings: int | None = None,
    **fields: Any,
) -> Any:
    """An HF ``LlamaConfig`` / ``Qwen2Config`` of a decoder LLM (tiny by default).

    Defaults: 2 blocks, width 32 (MLP 64), 2 heads and 2 key-value heads, vocabulary 120, the
    config class's own special-token ids and positions. The benchmarks build their real-size
    Llama shapes here too (``kv_heads`` and ``fields``).

    Args:
        family: ``"llama"`` or ``"qwen2"``.
        vocab_size: vocabulary size; ``None``: ``len(tokenizer)``, or 120 without a tokenizer.
        tokenizer: when given, the vocabulary size and the pad / bos / eos ids not passed
            explicitly are taken from it.
        width: hidden size.
        blocks: decoder layers.
        heads: attention heads.
        kv_heads: key-value heads (grouped-query attention); ``None``: as many as ``heads``.
        intermediate_size: MLP width; ``None``: ``2 * width``.
        pad_token_id: the padding id; ``None``: the tokenizer's, else the config's default.
        bos_token_id: the begin-of-sequence id; ``None`` as ``pad_token_id``.
        eos_token_id: the end-of-sequence id; ``None`` as ``pad_token_id``.
        max_position_embeddings: positions; ``None``: the config class's default.
        **fields: further config fields, passed on as given (``tie_word_embeddings=False``,
            ``attn_implementation="sdpa"``).

    Raises:
        ValueError: an unknown family or a size below 1.
        TypeError: a size that is not an int, or ``fields`` naming a field the named arguments
            set (``hidden_size``: use ``width``).
    """
    check_choice(family, "family", TEXT_FAMILIES)
    kv_heads = heads if kv_heads is None else kv_heads
    for name, value in (
        ("width", width),
        ("blocks", blocks),
        ("heads", heads),
        ("kv_heads", kv_heads),
    ):
        check_positive_int(value, name)
    if tokenizer is not None:
        vocab_size = len(tokenizer) if vocab_size is None else vocab_size
        bos_token_id = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
        eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    required: dict[str, Any] = {
        "hidden_size": width,
        "intermediate_size": 2 * width if intermediate_size is None else intermediate_size,
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 120 if vocab_size is None else check_positive_int(vocab_size, "vocab_size"),
    }
    optional = {
        "max_position_embeddings": max_position_embeddings,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    clashing = sorted(set(fields) & {*required, *optional})
    if clashing:
        raise TypeError(
            f"tiny_text_config sets {', '.join(clashing)} from its own arguments (width, blocks, "
            "heads, kv_heads, vocab_size, ...); pass them by those names"
        )
    config_fields = {
        **fields,
        **required,
        **{name: value for name, value in optional.items() if value is not None},
    }
    from transformers import LlamaConfig, Qwen2Config

    return (LlamaConfig if family == "llama" else Qwen2Config)(**config_fields)


def word_level_tokenizer(vocabulary: Sequence[str] | Mapping[str, int]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over a fixed ``vocabulary``.

    The vocabulary must hold ``<unk>``, ``<pad>``, ``<s>``, ``</s>`` and ``<image>`` (the
    tokenizer's ``image_token``, as HF's multimodal processors expect it). Text is split into
    runs of word characters and runs of punctuation (``tokenizers``' ``Whitespace``).

    Args:
        vocabulary: the tokens in id order, or ``token -> id``.

    Raises:
        ValueError: a special token is missing from ``vocabulary``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocabulary, Mapping):
        vocabulary = {token: index for index, token in enumerate(vocabulary)}
    missing = [token for token in SPECIAL_TOKENS if token not in vocabulary]
    if missing:
        raise ValueError(
            f"vocabulary lacks the special tokens {', '.join(missing)}; expected all of "
            f"{', '.join(SPECIAL_TOKENS)}"
        )
    backend = Tokenizer(models.WordLevel(dict(vocabulary), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


#: The words of :func:`tiny_llava_tokenizer`, after its five special tokens (ids 5 to 20).
LLAVA_WORDS = (
    "USER",
    "ASSISTANT",
    ":",
    "what",
    "is",
    "in",
    "the",
    "image",
    "a",
    "cat",
    "dog",
    "on",
    "mat",
    "describe",
    "this",
    "photo",
)


def tiny_llava_tokenizer() -> Any:
    """A 21-token word-level tokenizer: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<image>`` 3,
    ``<unk>`` 4, then :data:`LLAVA_WORDS` (``what`` is 8); split on whitespace."""
    return word_level_tokenizer(["<pad>", "<s>", "</s>", "<image>", "<unk>", *LLAVA_WORDS])


def build_word_tokenizer(texts: Sequence[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` covering ``texts`` (words, punctuation, newlines).

    Ids: :data:`SPECIAL_TOKENS` first (``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3,
    ``<image>`` 4), then every distinct piece of ``texts`` in sorted order. Newlines are tokens of
    their own, spaces and tabs separate words, punctuation marks are tokens. This is the demo's
    tokenizer: it covers a synthetic data set and its chat templates exactly.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex("[ \t]+"), behavior="removed"),
            pre_tokenizers.Punctuation(),
        ]
    )
    words = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)})
    vocabulary = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )


# ---------------------------------------------------------------------------- Dense LLaVA


def tiny_connector(
    *,
    vision_dim: int = 16,
    llm_dim: int = 32,
    num_layers: int = 4,
    groups: Sequence[Sequence[int]] | None = None,
    final_layer: int = -2,
) -> ConnectorConfig:
    """A DCI connector for a ``num_layers``-block tower ``vision_dim`` wide and an LLM
    ``llm_dim`` wide (defaults: 4 blocks, 16, 32; the ``mlp2x_gelu`` projector).

    The final layer is ``hidden_states[final_layer]`` (default -2), followed by the mean of each
    layer group; ``groups`` ``None``: the two halves of the blocks (``((0, 1), (2, 3))`` on 4).
    """
    from mmconnect.fusion import DCISpec

    check_positive_int(num_layers, "num_layers")
    if groups is None:
        half = num_layers // 2
        groups = (tuple(range(half)), tuple(range(half, num_layers)))
    return ConnectorConfig(
        vision_dim=vision_dim,
        llm_dim=llm_dim,
        num_layers=num_layers,
        fusion=DCISpec(groups=groups, final_layer=final_layer),
    )


def tiny_dense_llava_config(
    *,
    connector: ConnectorConfig | None = None,
    vision_config: Any = None,
    text_config: Any = None,
    image_token_id: int = IMAGE,
) -> DenseLlavaConfig:
    """A ``DenseLlavaConfig`` of tiny parts.

    Defaults: a CLIP tower of 4 blocks, width 16, 56 px / patch 14 (a 4x4 grid, 16 image tokens,
    1 CLS dropped by the connector); a 2-block Llama 32 wide with vocabulary 120;
    :func:`tiny_connector` (DCI); ``<image>`` id 3.

    Args:
        connector: the connector (its widths and depth must fit the tower and the LLM).
        vision_config: an HF vision config (:func:`tiny_vision_config`).
        text_config: an HF text config (:func:`tiny_text_config`).
        image_token_id: the id of the image placeholder token.
    """
    from mmconnect.integrations.families.llava import DenseLlavaConfig

    if vision_config is None:
        vision_config = tiny_vision_config("clip", width=16, image_size=56)
    if text_config is None:
        text_config = tiny_text_config()
    return DenseLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        connector=(connector or tiny_connector()).to_dict(),
    )


def tiny_dense_llava(*, seed: int = 0, **config: Any) -> DenseLlavaForConditionalGeneration:
    """A ``DenseLlavaForConditionalGeneration`` of :func:`tiny_dense_llava_config` (``config``:
    its keyword arguments), random weights under ``seed``, eval mode."""
    from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration

    model_config = tiny_dense_llava_config(**config)
    _seeded(seed)
    return DenseLlavaForConditionalGeneration(model_config).eval()


def tiny_llava_processor(
    tokenizer: Any,
    connector: ConnectorConfig,
    *,
    family: str = "clip",
    image_size: int = 56,
    patch_size: int = TINY_PATCH_SIZE,
) -> DenseLlavaProcessor:
    """A ``DenseLlavaProcessor`` for a tower of ``family`` at ``image_size`` px.

    CLIP: a ``CLIPImageProcessor`` resizing the shortest edge to ``image_size`` and cropping the
    centre square; SigLIP: a ``SiglipImageProcessor`` resizing to ``image_size`` squared. The
    processor inserts the connector's token count per image on the ``image_size //
    patch_size`` grid.
    """
    check_choice(family, "family", VISION_FAMILIES)
    check_positive_int(image_size, "image_size")
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from mmconnect.integrations.families.llava import DenseLlavaProcessor

    if family == "siglip":
        images = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        images = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    return DenseLlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=patch_size, connector=connector
    )
