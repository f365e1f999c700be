"""A Dense LLaVA / LLaVA-NeXT rebuilt as the stock HF class around the same modules.

:func:`stock_model` turns a ``DenseLlavaForConditionalGeneration`` into an HF
``LlavaForConditionalGeneration`` (a ``DenseLlavaNextForConditionalGeneration`` into a
``LlavaNextForConditionalGeneration``) whose config lists the layers the connector reads
(``vision_feature_layer``, :mod:`~mmconnect.integrations.export.stock_llava`) and whose
``multi_modal_projector`` is a stock ``LlavaMultiModalProjector`` holding the rewritten weights.
The vision tower, the LLM, the LM head and LLaVA-NeXT's ``image_newline`` are the Dense model's
own modules (shared, not copied), so the rewrite allocates only the new projector.

The model is read through the family protocol (:func:`~mmconnect.integrations.families.protocol.family_model`):
its connector, tower geometry and the modules trained with the connector, which the stock
projector replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmconnect.integrations.export.stock_llava import (
    StockProjection,
    stock_projection,
    stock_projector_state,
)
from mmconnect.integrations.families.protocol import family_model


@dataclass(frozen=True)
class StockFamily:
    """The stock HF classes a Dense family exports to.

    Attributes:
        config_class: the stock config (``LlavaConfig``).
        model_class: the stock ``*ForConditionalGeneration``.
        processor_class: the stock processor (``LlavaProcessor``).
    """

    config_class: type
    model_class: type
    processor_class: type


#: Dense ``model_type`` -> the stock classes it exports to.
STOCK_FAMILIES: dict[str, StockFamily] = {
    "dense_llava": StockFamily(LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor),
    "dense_llava_next": StockFamily(
        LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    ),
}

#: Keys of a Dense config's dict that the stock config does not take or sets itself.
_DENSE_ONLY_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "connector")


def stock_family(model: Any) -> StockFamily:
    """The stock classes for ``model``'s family.

    Raises:
        TypeError: ``model`` is no Dense model, or one of a family without a stock export
            (Mini-Gemini, whose second tower and patch info mining stock LLaVA lacks); the
            message lists the exportable families.
    """
    family = family_model(model)
    stock = STOCK_FAMILIES.get(family.model_type)
    if stock is None:
        raise TypeError(
            f"cannot export a {family.model_type!r} model to a stock checkpoint: only "
            f"{', '.join(STOCK_FAMILIES)} have a stock HF class that computes the same "
            "(LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)"
        )
    return stock


def model_projection(model: Any) -> StockProjection:
    """The stock image path of a Dense model (:func:`~mmconnect.integrations.export.stock_llava.stock_projection`
    with its tower's prefix tokens).

    Raises:
        TypeError: see :func:`stock_family`.
        ValueError: the connector has no stock equivalent (the message says why).
    """
    stock_family(model)
    family = family_model(model)
    return stock_projection(family.connector.config, family.tower_geometry().prefix_tokens)


def stock_config(model: Any, projection: StockProjection) -> Any:
    """The stock config of ``model`` reading ``projection``'s layers.

    Everything but the connector is the Dense config's (towers, image token, LLaVA-NeXT's
    pinpoints, dtype); ``vision_feature_layer``, ``vision_feature_select_strategy``,
    ``projector_hidden_act`` and ``multimodal_projector_bias`` describe the stock projector and
    ``image_seq_length`` is the Dense model's token count at the tower's grid.
    """
    stock = stock_family(model)
    family = family_model(model)
    data = {
        key: value for key, value in model.config.to_dict().items() if key not in _DENSE_ONLY_KEYS
    }
    data.update(
        vision_feature_layer=projection.vision_feature_layer,
        vision_feature_select_strategy=projection.select_strategy,
        projector_hidden_act=projection.activation,
        multimodal_projector_bias=True,
        image_seq_length=family.connector.num_tokens(family.tower_geometry().grid),
    )
    config = stock.config_class(**data)
    config.architectures = [stock.model_class.__name__]
    return config


def stock_model(model: Any) -> Any:
    """The stock HF model computing what the Dense ``model`` computes.

    ``DenseLlavaForConditionalGeneration`` -> ``LlavaForConditionalGeneration``,
    ``DenseLlavaNextForConditionalGeneration`` -> ``LlavaNextForConditionalGeneration``; the
    tower, LLM, head and ``image_newline`` are ``model``'s own (shared), the projector is new
    (:func:`~mmconnect.integrations.export.stock_llava.stock_projector_state`) on the
    connector's device and dtype. The result is in ``model``'s train / eval mode and carries its
    generation config.

    Raises:
        TypeError: ``model`` is no exportable Dense model (a PEFT-wrapped model is refused: merge
            its adapters first with ``merge_and_unload()``).
        ValueError: the connector has no stock equivalent (the message says why).
    """
    if hasattr(model, "get_base_model"):
        raise TypeError(
            f"model is wrapped by PEFT ({type(model).__name__}); merge the adapters into the "
            "model first (model = model.merge_and_unload()) and export that"
        )
    stock = stock_family(model)
    if not isinstance(model, nn.Module) or getattr(model, "model", None) is not family_model(model):
        raise TypeError(
            f"model must be a Dense *ForConditionalGeneration (it has the LM head), got "
            f"{type(model).__name__}"
        )
    projection = model_projection(model)
    config = stock_config(model, projection)
    family = family_model(model)
    connector = family.connector
    with torch.device("meta"):  # the skeleton only: its parts are the Dense model's own
        exported = stock.model_class(config)
    replaced = set(family.connector_modules())
    for name, module in model.model.named_children():
        if name not in replaced:
            setattr(exported.model, name, module)
    for name, parameter in model.model.named_parameters(recurse=False):  # LLaVA-NeXT's newline
        setattr(exported.model, name, parameter)
    state = stock_projector_state(connector, projection)
    with torch.device("meta"):
        projector = LlavaMultiModalProjector(config)
    projector.load_state_dict(state, assign=True)  # takes the Dense weights' device and dtype
    exported.model.multi_modal_projector = projector
    exported.lm_head = model.lm_head
    left = [
        name
        for name, tensor in [*exported.named_parameters(), *exported.named_buffers()]
        if tensor.is_meta
    ]
    if left:
        raise RuntimeError(f"the stock model has tensors the Dense model did not fill: {left[:5]}")
    exported.generation_config = model.generation_config
    return exported.train(model.training)
