"""Finding the block list of a vision encoder from its structure (never from its name).

A multi-layer tap needs three facts about an encoder: the ordered list of blocks whose outputs are
the layers ``1 .. L``, how many prefix tokens (CLS, registers) lead each token sequence, and how to
read a block's output as ``[batch, tokens, channels]``. :func:`find_encoder_blocks` reads them off
the module tree, duck-typed:

================================  ====================================  =======================
layout                            block list                            prefix tokens from
================================  ====================================  =======================
HF CLIP / SigLIP (>= 5.6)         ``encoder.layers``                    ``embeddings`` positions
HF CLIP / SigLIP (older, or       ``vision_model.encoder.layers``       ``embeddings`` positions
the full CLIP model)
HF InternViT / DINOv2             ``encoder.layer``                     ``embeddings.cls_token``
                                                                        (+ ``register_tokens``)
timm ViT (CLS + registers)        ``blocks``                            ``num_prefix_tokens``
open_clip ``VisionTransformer``   ``transformer.resblocks``             ``class_embedding``
open_clip CLIP model              ``visual.transformer.resblocks``      ``class_embedding``
timm ConvNeXt                     ``stages``                            none (4-D outputs)
open_clip ConvNeXt (timm trunk)   ``trunk.stages`` / ``visual.trunk.*``  none (4-D outputs)
================================  ====================================  =======================

An encoder wrapped by ``torch.compile`` (``OptimizedModule``) is read through the module it wraps
(``_orig_mod``), see :func:`unwrap_compiled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmconnect.validation import check_optional_int, is_int

_PREFIX_HINT = "tokens before the patch tokens: 1 for CLIP's CLS token, 0 for SigLIP"

#: (block list path, owner path) pairs tried in order; the owner holds the embeddings.
#: A vision tower nested in a multimodal model is tried before the top-level layouts, because such
#: a model may keep its *text* tower at the top level (open_clip's ``CLIP`` holds its text
#: ``transformer.resblocks`` next to ``visual``).
_KNOWN_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("vision_model.encoder.layers", "vision_model"),
    ("vision_tower.encoder.layers", "vision_tower"),
    ("vision_tower.vision_model.encoder.layers", "vision_tower.vision_model"),
    ("vision_tower.encoder.layer", "vision_tower"),
    ("visual.transformer.resblocks", "visual"),
    ("visual.trunk.stages", "visual.trunk"),
    ("visual.trunk.blocks", "visual.trunk"),
    ("encoder.layers", ""),
    ("encoder.layer", ""),
    ("blocks", ""),
    ("transformer.resblocks", ""),
    ("stages", ""),
    ("trunk.stages", "trunk"),
    ("trunk.blocks", "trunk"),
)


@dataclass(frozen=True)
class EncoderBlocks:
    """The structure of a vision encoder as the tap sees it.

    Attributes:
        blocks: the ordered blocks; the output of ``blocks[k - 1]`` is layer ``k``.
        path: the dotted path of ``blocks`` inside the encoder.
        owner: the module that holds the embeddings (and the prefix-token parameters).
        num_prefix_tokens: CLS and register tokens leading every token sequence, or ``None``
            when the structure does not tell (then it is inferred from the patch grid at run time).
        patch_embedding: the convolution that makes the patch grid (its output's spatial shape
            is the token grid), or ``None``.
        batch_first: ``False`` when blocks exchange ``[tokens, batch, channels]`` tensors
            (open_clip built with ``batch_first=False``).
    """

    blocks: nn.ModuleList | nn.Sequential
    path: str
    owner: nn.Module
    num_prefix_tokens: int | None
    patch_embedding: nn.Conv2d | None
    batch_first: bool

    @property
    def num_layers(self) -> int:
        """The number of blocks ``L``; valid layer indices are ``0 .. L``."""
        return len(self.blocks)


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` wrappers (``OptimizedModule._orig_mod``), or ``module``.

    The wrapper holds no blocks of its own and answers attribute look-ups and ``len()`` by
    delegating to the wrapped module in ways that break structural discovery; hooks registered on
    the wrapped module's submodules still fire when the compiled wrapper runs.
    """
    seen: set[int] = set()
    while id(module) not in seen:  # a wrapper of a wrapper is unwrapped too
        seen.add(id(module))
        inner = module.__dict__.get("_modules", {}).get("_orig_mod")
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def _resolve(module: nn.Module, path: str) -> nn.Module | None:
    """Follow a dotted attribute path; ``None`` where any step is missing or not a module."""
    current: object = module
    for name in path.split(".") if path else ():
        current = getattr(current, name, None)
        if current is None:
            return None
    return current if isinstance(current, nn.Module) else None


def _is_block_list(module: nn.Module | None) -> bool:
    return isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > 0


def _count_prefix_tokens(owner: nn.Module) -> int | None:
    """Prefix tokens from the owner's structure: timm attribute, HF positions, open_clip CLS."""
    timm_count = getattr(owner, "num_prefix_tokens", None)
    if is_int(timm_count):
        return timm_count
    embeddings = getattr(owner, "embeddings", None)
    positions = getattr(embeddings, "num_positions", None)
    patches = getattr(embeddings, "num_patches", None)
    if is_int(positions) and is_int(patches) and positions >= patches:
        # HF: CLIP has one position more than patches (its CLS token), SigLIP none.
        return positions - patches
    if hasattr(owner, "class_embedding"):
        return 0 if owner.class_embedding is None else 1
    if hasattr(embeddings, "cls_token"):
        # HF's BERT-style towers (InternViT, DINOv2) concatenate their ``cls_token``
        # ([1, 1, C]) and, in DINOv2 with registers, ``register_tokens`` ([1, R, C]) in front
        # of the patch tokens; their embeddings keep no position count to subtract.
        return sum(
            _token_rows(getattr(embeddings, name, None))
            for name in ("cls_token", "register_tokens")
        )
    return None


def _token_rows(parameter: object) -> int:
    """The tokens a ``[1, k, C]`` prefix parameter adds (0 for ``None``)."""
    return int(parameter.shape[1]) if isinstance(parameter, torch.Tensor) else 0


def _find_patch_embedding(owner: nn.Module, blocks: nn.Module) -> nn.Conv2d | None:
    """The first ``Conv2d`` of the owner that is not inside the block list."""
    inside_blocks = {id(module) for module in blocks.modules()}
    for module in owner.modules():
        if isinstance(module, nn.Conv2d) and id(module) not in inside_blocks:
            return module
    return None


def find_encoder_blocks(
    encoder: nn.Module, blocks: str | None = None, *, num_prefix_tokens: int | None = None
) -> EncoderBlocks:
    """Discover the block list, prefix-token count and token layout of a vision encoder.

    Args:
        encoder: an HF ``CLIPVisionModel`` / ``SiglipVisionModel`` (any transformers layout),
            an HF ``InternVLVisionModel`` (InternViT) or ``Dinov2WithRegistersModel``, a timm
            ``VisionTransformer`` or ``ConvNeXt``, an open_clip ``VisionTransformer``,
            ``TimmModel`` or full CLIP model, or any module whose blocks ``blocks`` names; or
            any of these wrapped by ``torch.compile`` (the wrapped module is read).
        blocks: a dotted path to the ``nn.ModuleList`` / ``nn.Sequential`` of blocks inside
            ``encoder`` (e.g. ``"encoder.layers"``); overrides discovery.
        num_prefix_tokens: overrides the prefix-token count read from the structure.

    Raises:
        TypeError: ``encoder`` is not an ``nn.Module``, or ``num_prefix_tokens`` not an int.
        ValueError: no block list is found (the message says how to pass ``blocks=``), or
            ``blocks`` does not name a non-empty block list.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    check_optional_int(num_prefix_tokens, "num_prefix_tokens", minimum=0, hint=_PREFIX_HINT)
    encoder = unwrap_compiled(encoder)

    if blocks is not None:
        if not isinstance(blocks, str) or not blocks:
            raise TypeError(
                f"blocks must be a dotted module path such as 'encoder.layers', got {blocks!r}"
            )
        found = _resolve(encoder, blocks)
        if not _is_block_list(found):
            raise ValueError(
                f"blocks={blocks!r} does not name a non-empty nn.ModuleList or nn.Sequential inside "
                f"{type(encoder).__name__} (found {type(found).__name__ if found is not None else 'nothing'})"
            )
        path, owner = blocks, encoder
    else:
        for candidate, owner_path in _KNOWN_LAYOUTS:
            found = _resolve(encoder, candidate)
            if _is_block_list(found):
                # Owner paths are prefixes of their block paths, so they resolve too.
                resolved = _resolve(encoder, owner_path)
                # Not `resolved or encoder`: a module's truth value may call len() on it.
                path, owner = candidate, resolved if resolved is not None else encoder
                break
        else:
            children = ", ".join(name for name, _ in encoder.named_children()) or "none"
            raise ValueError(
                f"could not find the block list of {type(encoder).__name__} (children: {children}); "
                f"pass blocks='dotted.path.to.blocks' naming its nn.ModuleList of blocks, "
                f"e.g. MultiLayerFeatureTap(encoder, layers, blocks='encoder.layers')"
            )

    parent = _resolve(encoder, path.rpartition(".")[0]) if "." in path else encoder
    return EncoderBlocks(
        blocks=found,
        path=path,
        owner=owner,
        num_prefix_tokens=num_prefix_tokens
        if num_prefix_tokens is not None
        else _count_prefix_tokens(owner),
        patch_embedding=_find_patch_embedding(owner, found),
        batch_first=bool(getattr(parent, "batch_first", True)),
    )
