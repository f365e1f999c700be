"""The stock HF processor of an exported model, checked to build the Dense processor's prompts.

A Dense processor (``DenseLlavaProcessor``, ``DenseLlavaNextProcessor``) inserts the connector's
image-token count per image. The stock one (``LlavaProcessor``, ``LlavaNextProcessor``) counts
the tower's tokens itself: ``rows * columns + num_additional_image_tokens``, minus one for
``vision_feature_select_strategy="default"`` (plus AnyRes tiles and newlines for LLaVA-NeXT).
With the tower's prefix tokens as ``num_additional_image_tokens`` (1 for CLIP's CLS, 0 for
SigLIP) and the exported strategy (``"default"`` / ``"full"``), that is the Dense count for every
connector stock LLaVA expresses (baseline, SCI, DCI keep one token per patch).
:func:`stock_processor` builds it from the Dense processor's image processor, tokenizer and chat
template and refuses to return one whose prompts differ (:func:`check_same_prompts`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from mmconnect.integrations.export.stock_llava import StockProjection
from mmconnect.integrations.export.stock_model import stock_family
from mmconnect.integrations.families.protocol import family_model

#: Image sizes ``(height, width)`` the prompts are compared on, as fractions of the tower's
#: image size: square, wide, tall and large (AnyRes picks other tilings for each).
_CHECK_SHAPES = ((1.0, 1.0), (0.5, 2.0), (2.5, 1.0), (2.0, 2.0))


def stock_processor(processor: Any, model: Any, projection: StockProjection) -> Any:
    """The stock processor of the export of ``model``, from its Dense ``processor``.

    Args:
        processor: the Dense model's processor (``DenseLlavaProcessor`` /
            ``DenseLlavaNextProcessor``, or the stock class of the family).
        model: the Dense model.
        projection: its stock image path (for ``vision_feature_select_strategy``).

    Raises:
        TypeError: ``processor`` is not a processor of ``model``'s family.
        ValueError: LLaVA-NeXT pinpoints of the image processor differ from the model's, or
            the stock prompts differ from the Dense ones (:func:`check_same_prompts`).
    """
    stock = stock_family(model)
    family = family_model(model)
    if not isinstance(processor, stock.processor_class):
        raise TypeError(
            f"processor must be the model's {stock.processor_class.__name__} (or its Dense "
            f"subclass), got {type(processor).__name__}"
        )
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    processor_pinpoints = getattr(processor.image_processor, "image_grid_pinpoints", None)
    if pinpoints is not None and _as_lists(processor_pinpoints) != _as_lists(pinpoints):
        raise ValueError(
            f"processor's image_grid_pinpoints {processor_pinpoints} differ from the model's "
            f"{pinpoints}; save the model's own processor with it"
        )
    geometry = family.tower_geometry()
    exported = stock.processor_class(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy=projection.select_strategy,
        num_additional_image_tokens=geometry.prefix_tokens,
        chat_template=getattr(processor, "chat_template", None),
        image_token=processor.image_token,
    )
    check_same_prompts(processor, exported, geometry.image_size)
    return exported


def _as_lists(pinpoints: Any) -> list[list[int]] | None:
    return None if pinpoints is None else [[int(v) for v in pair] for pair in pinpoints]


def check_same_prompts(dense: Any, stock: Any, image_size: tuple[int, int]) -> None:
    """Both processors must turn one ``<image>`` prompt into the same token ids.

    Compared on a few random images around ``image_size`` (square, wide, tall, large; the
    AnyRes tiling differs between them), each in a prompt of its own.

    Raises:
        ValueError: the ids differ; the message gives both image-token counts.
    """
    generator = np.random.default_rng(0)
    for scale_height, scale_width in _CHECK_SHAPES:
        height = max(1, round(image_size[0] * scale_height))
        width = max(1, round(image_size[1] * scale_width))
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        inputs = {"images": [Image.fromarray(pixels)], "text": [f"{dense.image_token}"]}
        expected = dense(**inputs, return_tensors="pt")["input_ids"]
        got = stock(**inputs, return_tensors="pt")["input_ids"]
        if not torch.equal(expected, got):
            image = stock.image_token_id
            raise ValueError(
                f"the stock processor puts {int((got == image).sum())} image tokens for a "
                f"{height}x{width} image, the Dense one {int((expected == image).sum())}; the "
                "export would not match its processor"
            )
