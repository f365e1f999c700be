"""What every Hugging Face model with a Dense Connector shares (LLaVA, LLaVA-NeXT, ...).

* the connector inside the HF config (:func:`attach_connector`, :class:`ConnectorConfigMixin`) and
  the checks that it fits the towers and the pixels;
* checkpoint checks before HF loads anything (:class:`CheckedLoadingMixin`): connector weights
  missing, unexpected, of another shape or saved under another connector config are named;
* ``generate()`` that checks the prompt's image tokens before the vision tower runs
  (:class:`DenseGenerationMixin`), and ``forward`` with the stock signature doing the same
  (:func:`checked_forward`); ``pixel_values`` checked before any tensor work
  (:func:`check_pixel_values`);
* the stock HF contract: initialisation as for HF's own classes (:class:`DenseInitMixin`) and
  ``get_image_features`` outputs (:func:`tower_features`);
* conversion of an existing HF model around its own modules (:func:`convert_model`);
* DeepStack (a connector with ``injection=``): ``get_image_features`` returns the residuals
  with the tokens (:class:`DenseImageOutput`, :func:`image_outputs`) and ``forward`` adds them
  to the LLM's hidden states at the image positions (:func:`injecting_forward`,
  :func:`deepstack_injection`); families that cannot line them up refuse such a connector
  (:func:`refuse_injection`).

What the rest of the library may ask a Dense model is the family protocol
(:mod:`mmconnect.integrations.families.protocol`); registration goes through it too.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from mmconnect import ConnectorConfig, DenseConnector, SingleLayerSpec, find_encoder_blocks
from mmconnect.checkpoint import (
    atomic_save_directory,
    open_safetensors,
    read_json,
    saved_shapes,
    shape_problems,
)
from mmconnect.connector import FINGERPRINT_KEY, config_fingerprint
from mmconnect.encoder_blocks import unwrap_compiled
from mmconnect.layers import check_layer_index
from mmconnect.validation import check_size_pair

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- config


def baseline_connector(
    vision_config: Any, text_config: Any, feature_layer: int = -2
) -> ConnectorConfig:
    """The LLaVA-1.5 connector for these towers: one layer, ``mlp2x_gelu``."""
    return ConnectorConfig(
        fusion=SingleLayerSpec(final_layer=feature_layer),
        vision_dim=vision_config.hidden_size,
        llm_dim=text_config.hidden_size,
        num_layers=vision_config.num_hidden_layers,
    )


def check_connector_fits(connector: ConnectorConfig, vision_config: Any, text_config: Any) -> None:
    """Raise a clear ``ValueError`` when ``connector`` cannot sit between these two towers."""
    pairs = (
        (
            "vision_dim",
            connector.vision_dim,
            "the vision tower's hidden_size",
            vision_config.hidden_size,
        ),
        ("llm_dim", connector.llm_dim, "the LLM's hidden_size", text_config.hidden_size),
        (
            "num_layers",
            connector.num_layers,
            "the vision tower's num_hidden_layers",
            vision_config.num_hidden_layers,
        ),
    )
    for field, value, what, expected in pairs:
        if value != expected:
            raise ValueError(f"connector {field}={value} does not match {what} ({expected})")
    check_injection_depth(connector, text_config)


def check_injection_depth(connector: ConnectorConfig, text_config: Any) -> None:
    """A DeepStack connector needs an LLM layer per injected level (level ``i`` is added after
    LLM layer ``i``).

    Raises:
        ValueError: ``text_config.num_hidden_layers`` is smaller than the number of levels.
    """
    injection = connector.injection
    depth = getattr(text_config, "num_hidden_layers", None)
    if injection is not None and depth is not None and len(injection.layers) > depth:
        raise ValueError(
            f"connector injection.layers={list(injection.layers)} injects {len(injection.layers)} "
            f"levels, one after each of the first {len(injection.layers)} LLM layers, but the LLM "
            f"has num_hidden_layers={depth}; inject at most {depth} vision layers"
        )


def refuse_injection(connector: ConnectorConfig, family: str, reason: str) -> None:
    """For families that cannot add DeepStack residuals at their image positions.

    Raises:
        ValueError: ``connector`` has an ``injection`` spec; the message names the family and
            ``reason``.
    """
    if connector.injection is not None:
        raise ValueError(
            f"{family} does not support a connector with injection= (DeepStack, layers "
            f"{list(connector.injection.layers)}): {reason}; use Dense LLaVA or Mini-Gemini, or "
            "a connector without injection"
        )


class ConnectorConfigMixin:
    """For HF configs with a ``connector`` field (a :class:`ConnectorConfig` as a dict)."""

    @property
    def connector_config(self) -> ConnectorConfig:
        """``connector`` as a validated :class:`mmconnect.ConnectorConfig`."""
        return ConnectorConfig.from_dict(self.connector)


def attach_connector(config: Any) -> None:
    """Fill a Dense config's ``connector`` (baseline when absent) and its ``image_seq_length``."""
    if config.connector is None:
        if isinstance(config.vision_feature_layer, list | tuple):
            raise ValueError(
                f"{type(config).__name__} needs connector= when vision_feature_layer is a list; "
                "convert with from_llava(model, ConnectorConfig(fusion=SCISpec(...), ...))"
            )
        check_layer_index(config.vision_feature_layer, "vision_feature_layer")
        baseline = baseline_connector(
            config.vision_config, config.text_config, config.vision_feature_layer
        )
        config.connector = baseline.to_dict()
    if not isinstance(config.connector, ConnectorConfig):  # a dict, maybe of format 1: upgraded
        config.connector = ConnectorConfig.from_dict(config.connector)
    config.connector = config.connector.to_dict()
    config.image_seq_length = config.connector_config.num_tokens(native_grid(config.vision_config))


def reject_feature_layer(config: Any, vision_feature_layer: Any) -> None:
    """Dense models read the layers of their connector config; a different request is an error."""
    if vision_feature_layer is not None and vision_feature_layer != config.vision_feature_layer:
        raise ValueError(
            "this model reads the layers named by its connector config; vision_feature_layer="
            f"{vision_feature_layer!r} cannot change them (build another connector instead)"
        )


def native_grid(vision_config: Any) -> tuple[int, int]:
    """The ``(rows, columns)`` patch grid of the vision tower at its configured image size.

    ``image_size`` and ``patch_size`` may be ints or ``(height, width)`` pairs (each side is
    divided by its own patch side, so a non-square tower gets its real grid).
    """
    height, width = check_size_pair(vision_config.image_size, "vision_config.image_size")
    patch_height, patch_width = check_size_pair(
        vision_config.patch_size, "vision_config.patch_size"
    )
    return height // patch_height, width // patch_width


def check_pixel_values(
    pixel_values: Any,
    size: int,
    *,
    channels: int = 3,
    what: str = "this vision tower",
    size_name: str = "image_size",
    leading: str = "images",
) -> None:
    """Check ``pixel_values`` (``[images, channels, size, size]``) before any tensor work.

    Args:
        pixel_values: the images.
        size: the square side the model takes.
        channels: the colour channels it takes (3: RGB).
        what: names the model part in the message; ``size_name`` the config field of ``size``.
        leading: what the first dimension counts (``"images"``, ``"crops"``).

    Raises:
        TypeError: ``pixel_values`` is not a tensor.
        ValueError: unbatched (``[3, S, S]``), an empty batch, another channel count or another
            size; each message names the expected shape and what to do.
    """
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    expected = f"[{leading}, {channels}, {size}, {size}]"
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() == 3 and shape[0] == channels:
        raise ValueError(
            f"pixel_values of shape {shape} is one unbatched image; {what} takes a batch "
            f"{expected}: add the batch dimension (pixel_values.unsqueeze(0))"
        )
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must be {expected} for {what}, got shape {shape} ({pixel_values.dim()} "
            "dimensions)"
        )
    if shape[0] == 0:
        raise ValueError(
            f"pixel_values holds 0 {leading} (shape {shape}); pass at least one image "
            f"{expected}, or pixel_values=None for a prompt without images"
        )
    if shape[1] != channels:
        raise ValueError(
            f"pixel_values have {shape[1]} channel(s) but {what} takes {channels} (RGB), "
            f"{expected}, got shape {shape}: convert the images to RGB before the processor "
            "(e.g. PIL's image.convert('RGB'))"
        )
    if shape[2:] != (size, size):
        # Why refuse larger images: the connector's token count (and the prompt's) is fixed by
        # the tower's native grid, and its position embeddings are not interpolated.
        raise ValueError(
            f"pixel_values must be {expected} ({size_name}={size}) for {what}, got shape "
            f"{shape}: resize the images with the model's processor (Dense models do not "
            "interpolate position embeddings, interpolate_pos_encoding is not supported)"
        )


def checked_grid(
    pixel_values: Tensor, vision_config: Any, leading: str = "images"
) -> tuple[int, int]:
    """The tower's patch grid for ``pixel_values`` (``[images, 3, S, S]``), checked with
    :func:`check_pixel_values` against its ``image_size`` and ``num_channels``."""
    check_pixel_values(
        pixel_values,
        vision_config.image_size,
        channels=getattr(vision_config, "num_channels", 3),
        leading=leading,
    )
    return native_grid(vision_config)


def reject_interpolation(kwargs: dict[str, Any]) -> None:
    """``interpolate_pos_encoding=True`` cannot be honoured: the connector's token count (and the
    prompt's) follows the tower's native grid."""
    if kwargs.get("interpolate_pos_encoding"):
        raise ValueError(
            "interpolate_pos_encoding=True is not supported by Dense models: the image-token "
            "count follows the vision tower's image_size; resize the images to it instead"
        )


def tower_features(
    connector: DenseConnector,
    tower: nn.Module,
    pixel_values: Tensor,
    *,
    output_hidden_states: Any = None,
    output_attentions: Any = None,
    final_norm: nn.Module | None = None,
) -> tuple[Any, BaseModelOutputWithPooling]:
    """Tap ``tower`` for ``connector``; the tower's own outputs when they are asked for.

    Without ``output_hidden_states`` / ``output_attentions`` (arguments, else the tower config's
    fields, as HF reads them) the tower stops after the deepest layer the connector reads
    (early exit). With either it runs in full under the same tap and its ``hidden_states`` /
    ``attentions`` are returned as HF's ``get_image_features`` returns them.

    ``final_norm`` (the tower's output norm, e.g. SigLIP's ``post_layernorm``) is applied to the
    last block's output, so layer ``L`` is the tower's ``last_hidden_state``: for families whose
    native connector reads the tower's output (Gemma 3); see
    :class:`mmconnect.MultiLayerFeatureTap`.

    Returns:
        The tapped :class:`mmconnect.LayerFeatures` (prefix tokens dropped) and a
        ``BaseModelOutputWithPooling`` whose ``last_hidden_state`` is the tapped final layer,
        ``[images, tokens, vision_dim]`` (the same with or without the full run; the tower's
        last block may never run), with ``hidden_states`` / ``attentions`` when asked for.
    """
    config = tower.config
    hidden = (
        output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    )
    attentions = output_attentions if output_attentions is not None else config.output_attentions
    tap = connector.make_tap(tower, keep_prefix=False, final_norm=final_norm)
    if hidden or attentions:
        with tap:
            outputs = tower(
                pixel_values,
                output_hidden_states=bool(hidden),
                output_attentions=bool(attentions),
                return_dict=True,
            )
        features = tap.features
    else:
        outputs = None
        features = tap(pixel_values)
    final = features[connector.individual_layers[0]]
    return features, BaseModelOutputWithPooling(
        last_hidden_state=final,
        hidden_states=outputs.hidden_states if outputs is not None and hidden else None,
        attentions=outputs.attentions if outputs is not None and attentions else None,
    )


def processor_connector(
    connector: dict | ConnectorConfig | None, patch_size: int | None, processor: str
) -> ConnectorConfig:
    """The validated connector config of a Dense processor, with a clear error when missing."""
    if connector is None or patch_size is None:
        raise ValueError(f"{processor} needs connector= (a connector config) and patch_size=")
    return (
        connector
        if isinstance(connector, ConnectorConfig)
        else ConnectorConfig.from_dict(connector)
    )


# ---------------------------------------------------------------------------- DeepStack injection


@dataclass
class DenseImageOutput(BaseModelOutputWithPooling):
    """``get_image_features`` output of the Dense models: HF's ``BaseModelOutputWithPooling``
    plus the DeepStack residuals in the layout HF's Qwen3-VL uses (so ``generate()``'s
    pre-encoding, beam expansion and chunked prefill carry them with the image tokens).

    Attributes:
        deepstack_features: one entry per injected level ``i`` (added after LLM layer ``i``):
            a list with one ``[tokens, llm_dim]`` tensor per image, aligned with
            ``pooler_output``; ``None`` for a connector without injection.
    """

    deepstack_features: list[list[Tensor]] | None = None


def image_outputs(
    outputs: BaseModelOutputWithPooling,
    tokens: Tensor,
    residuals: Sequence[Tensor],
    images: int,
) -> DenseImageOutput:
    """``outputs`` with the connector's tokens and residuals split per image.

    Args:
        outputs: the tower's outputs (:func:`tower_features`).
        tokens: ``[rows, N, llm_dim]`` with ``rows`` a multiple of ``images`` (views of one image
            follow each other).
        residuals: each ``[rows, N, llm_dim]``
            (:meth:`mmconnect.connector.DenseConnector.forward_with_injections`); empty
            without injection.
        images: the number of images.

    Returns:
        ``pooler_output``: ``images`` tensors ``[rows / images * N, llm_dim]``;
        ``deepstack_features``: per level, the same split of its residual (``None`` when
        ``residuals`` is empty).
    """

    def per_image(tensor: Tensor) -> list[Tensor]:
        return list(tensor.reshape(images, -1, tensor.shape[-1]))

    return DenseImageOutput(
        last_hidden_state=outputs.last_hidden_state,
        pooler_output=per_image(tokens),
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        deepstack_features=[per_image(residual) for residual in residuals] or None,
    )


#: Where HF decoder-only base models keep their decoder layers (Llama, Qwen2, Mistral, Gemma:
#: ``layers``; a causal-LM wrapper: ``model.layers``; OPT: ``decoder.layers``).
_DECODER_LAYOUTS = ("layers", "model.layers", "decoder.layers")


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The LLM's decoder layers in order (``language_model.layers`` for HF base models).

    Found by structure: the first of ``layers``, ``model.layers``, ``decoder.layers`` that is an
    ``nn.ModuleList`` (an LLM wrapped by ``torch.compile`` is read through the module it wraps).
    :func:`mmconnect.find_encoder_blocks` knows vision towers only, not decoder stacks.

    Raises:
        ValueError: none of those paths holds a module list.
    """
    module = unwrap_compiled(language_model)
    for path in _DECODER_LAYOUTS:
        found: Any = module
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(
        f"cannot find the decoder layers of the LLM ({type(module).__name__}): expected an "
        f"nn.ModuleList at one of {list(_DECODER_LAYOUTS)}, as HF decoder-only models have"
    )


@contextlib.contextmanager
def deepstack_injection(
    layers: Sequence[nn.Module], residuals: Sequence[Tensor], mask: Tensor
) -> Iterator[None]:
    """Within the block, add ``residuals[i]`` at ``mask`` to the output of ``layers[i]``.

    What HF's ``Qwen3VLTextModel._deepstack_process`` does after decoder layer ``i``::

        h = h.clone();  h[mask] = h[mask] + residual_i     # h: [B, S, D]

    with one forward hook per level, registered on entry and removed on exit (also when the
    forward raises). The hooks act only in the thread that entered the block, so a model shared
    by threads injects each call's residuals into that call's forward only; nothing on the
    modules is changed between calls.

    Args:
        layers: the LLM's decoder layers (:func:`decoder_layers`).
        residuals: per level, ``[mask.sum(), D]`` in the order of ``mask``'s ``True`` positions
            (row-major over ``[B, S]``, as HF fills image tokens).
        mask: ``[B, S]`` bool, the image positions.

    Raises:
        ValueError: more levels than layers, a residual whose rows differ from the mask's
            positions, or (during the forward) a layer output whose ``[B, S]`` is not the mask's.
    """
    if len(residuals) > len(layers):
        raise ValueError(
            f"{len(residuals)} DeepStack levels but the LLM has {len(layers)} decoder layers; "
            "level i is added after layer i"
        )
    positions = int(mask.sum())
    for level, residual in enumerate(residuals):
        if residual.dim() != 2 or residual.shape[0] != positions:
            raise ValueError(
                f"DeepStack level {level} has shape {tuple(residual.shape)} but the prompt holds "
                f"{positions} image positions: expected [{positions}, hidden_size]"
            )
    thread = threading.get_ident()

    def make_hook(level: int, residual: Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if threading.get_ident() != thread:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if tuple(hidden.shape[:2]) != tuple(mask.shape):
                raise ValueError(
                    f"LLM layer {level} returned hidden states {tuple(hidden.shape)} but the image "
                    f"mask is {tuple(mask.shape)}: the DeepStack residuals belong to another "
                    "sequence"
                )
            where = mask.to(hidden.device)
            hidden = hidden.clone()
            hidden[where] = hidden[where] + residual.to(hidden.device, hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = []
    try:
        for level, residual in enumerate(residuals):
            handles.append(layers[level].register_forward_hook(make_hook(level, residual)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _image_mask(model: Any, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
    """``[B, S]``: where the prompt holds image tokens, found as HF LLaVA finds them."""
    if input_ids is not None:
        return input_ids == model.config.image_token_id
    image = model.get_input_embeddings()(
        torch.full((), model.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
    )
    return (inputs_embeds == image).all(-1)


def injecting_forward(stock_forward: Callable) -> Callable:
    """``stock_forward`` (HF LLaVA's base-model ``forward``) adding the connector's DeepStack
    residuals to the LLM when the connector has an ``injection``.

    When the call has images (``pixel_values``, or pre-encoded ``mm_encoder_outputs["image"]``
    as ``generate()`` passes at prefill), their ``deepstack_features`` level ``i`` is added to
    the LLM's hidden states at the image-token positions after decoder layer ``i``
    (:func:`deepstack_injection`, hooks for this call only). Calls without image tokens (the
    decode steps of ``generate()``) run unchanged, as Qwen3-VL's. The wrapper keeps the stock
    signature.

    Raises:
        ValueError: pre-encoded image outputs without ``deepstack_features`` (computed by
            another model or with another connector).
    """
    signature = inspect.signature(stock_forward)

    @functools.wraps(stock_forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(self, *args, **kwargs).arguments
        input_ids, inputs_embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        pixel_values = arguments.get("pixel_values")
        encoded = arguments.get("mm_encoder_outputs")
        if (
            self.connector.injection is None
            or (input_ids is None) == (inputs_embeds is None)
            or (pixel_values is not None and encoded is not None)
        ):
            return stock_forward(self, *args, **kwargs)  # nothing to inject, or HF's own errors
        call = {name: value for name, value in arguments.items() if name not in ("self", "kwargs")}
        extra = dict(arguments.get("kwargs", {}))
        encoded = dict(encoded or {})
        if pixel_values is not None:  # encode here (as the stock forward would) to read levels
            encoded["image"] = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=call.get("vision_feature_layer"),
                vision_feature_select_strategy=call.get("vision_feature_select_strategy"),
                image_sizes=call.get("image_sizes"),
                **{**extra, "return_dict": True},
            )
            call["pixel_values"], call["mm_encoder_outputs"] = None, encoded
        image = encoded.get("image")
        if image is None:
            return stock_forward(self, *args, **kwargs)
        levels = getattr(image, "deepstack_features", None)
        if levels is None:
            raise ValueError(
                "mm_encoder_outputs['image'] has no deepstack_features, but this model's "
                f"connector injects vision layers {list(self.connector.injection_layers)} into the "
                "LLM; encode the images with this model's get_image_features"
            )
        mask = _image_mask(self, input_ids, inputs_embeds)
        residuals = [torch.cat(list(level), dim=0) for level in levels]
        with deepstack_injection(decoder_layers(self.language_model), residuals, mask):
            return stock_forward(self, **call, **extra)

    return forward


# ---------------------------------------------------------------------------- model mixins


class DenseInitMixin:
    """Weight initialisation of the Dense models as for HF's own classes.

    * ``is_custom_code`` is ``False`` (unless registered for the Hub's remote code): HF treats
      classes defined outside ``transformers`` as custom code and then skips the per-module
      initialisation of sub-models' container modules, so vision-tower weights missing from a
      checkpoint would get the generic ``normal(0, 0.02)`` instead of the tower's own scheme
      (CLIP's attention projections). The Dense classes initialise only through HF's
      ``transformers.initialization`` functions, which is what that shortcut guards against.
    * ``_init_weights`` sets each connector's ``config_fingerprint`` buffer from its config, so a
      model built on the meta device (``init_weights()``) or loaded from a checkpoint without
      the buffer holds the right value (HF's generic init leaves buffers uninitialised).
    """

    @classmethod
    def is_custom_code(cls) -> bool:
        """``False`` unless the class is registered as Hub remote code (see the class doc)."""
        return cls.is_remote_code()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DenseConnector):
            fingerprint = torch.tensor(config_fingerprint(module.config), dtype=torch.int64)
            init.copy_(module.get_buffer(FINGERPRINT_KEY), fingerprint)


class CheckedLoadingMixin:
    """``from_pretrained`` that checks a local checkpoint's connector before HF loads it, and an
    atomic ``save_pretrained``.

    ``connector_prefixes`` names where a saved checkpoint keeps the connector's weights (the
    generation class's prefix first, then the bare model's); families that keep the connector
    under another stock child name than ``multi_modal_projector`` (Idefics3's ``connector``)
    set their own.
    """

    connector_prefixes: tuple[str, ...] = ("model.multi_modal_projector.", "multi_modal_projector.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """HF ``from_pretrained``; a local checkpoint's connector weights are checked first."""
        check_saved_connector(cls, pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs: Any
    ) -> None:
        """HF ``save_pretrained``, atomic: HF writes into a temporary sibling that then replaces
        ``save_directory`` (:func:`mmconnect.checkpoint.atomic_save_directory`), so a save that
        fails midway leaves the earlier checkpoint loadable and byte-identical, and files of
        ``save_directory`` that the save does not rewrite (a processor, ``checkpoint-N/``) stay.

        Saves that every rank takes part in (``distributed_checkpoint=True``), saves of other
        ranks and ``push_to_hub`` (which names the Hub repository after the directory) are HF's
        own, non-atomic path.
        """
        if not is_main_process or kwargs.get("push_to_hub") or kwargs.get("distributed_checkpoint"):
            return super().save_pretrained(save_directory, is_main_process, **kwargs)
        with atomic_save_directory(save_directory) as staging:
            super().save_pretrained(staging, is_main_process, **kwargs)


class FixedImageTokensMixin:
    """For Dense base models whose every image fills the same number of ``<image>`` tokens
    (``image_token_count()``): the prompt's count is checked before any tensor work.
    ``processor_name`` names the processor that builds matching prompts."""

    processor_name: str

    def check_image_tokens(
        self, input_ids: Tensor | None, pixel_values: Tensor | None, image_sizes: Any = None
    ) -> None:
        """The prompt's image tokens must equal what the images fill (``image_sizes`` is for
        AnyRes models and not used here).

        Raises:
            ValueError: naming both counts.
        """
        if input_ids is None or pixel_values is None:
            return
        self.check_pixel_values(pixel_values)
        found = int((input_ids == self.config.image_token_id).sum())
        images = pixel_values.shape[0]
        per_image = self.image_token_count()
        if found != images * per_image:
            raise ValueError(
                f"the prompt holds {found} image tokens but {images} image(s) fill "
                f"{images * per_image} ({per_image} per image with this connector); build the "
                f"prompt with {self.processor_name} so the counts agree"
            )

    def check_pixel_values(self, pixel_values: Any) -> None:
        """``pixel_values`` must be ``[images, 3, S, S]`` at the tower's ``image_size``."""
        checked_grid(pixel_values, self.config.vision_config)


def checked_forward(stock_forward: Callable) -> Callable:
    """``stock_forward`` (an HF base model's ``forward``) with ``check_image_tokens`` first.

    The wrapper keeps the stock signature (``inspect.signature`` and positional arguments after
    ``pixel_values`` work as for the stock class): it only binds the arguments to find
    ``input_ids``, ``pixel_values`` and ``image_sizes``.
    """
    signature = inspect.signature(stock_forward)

    @functools.wraps(stock_forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        self.check_image_tokens(
            arguments.get("input_ids"), arguments.get("pixel_values"), arguments.get("image_sizes")
        )
        return stock_forward(self, *args, **kwargs)

    return forward


class DenseGenerationMixin(CheckedLoadingMixin):
    """For the ``...ForConditionalGeneration`` classes: the Dense base model, ``connector`` and a
    checked ``generate``. Subclasses name their base model class in ``base_model_class``."""

    base_model_class: type

    def __init__(self, config: Any) -> None:
        # The HF parent's __init__ would build the stock base model first: build the Dense one only.
        PreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.post_init()

    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector."""
        return self.model.connector

    def generate(self, inputs: Tensor | None = None, *args: Any, **kwargs: Any):
        """HF ``generate``; the prompt's image-token count is checked before the tower runs
        (HF encodes the images before the first forward, which would check it too late)."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        self.model.check_image_tokens(
            input_ids, kwargs.get("pixel_values"), kwargs.get("image_sizes")
        )
        return super().generate(inputs, *args, **kwargs)


# ---------------------------------------------------------------------------- checkpoints

#: Where a saved Dense model keeps its connector (ForConditionalGeneration / bare model).
_CONNECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF checkpoint directory (``model.safetensors`` or the shards
    of its index); empty when it holds none."""
    directory = Path(directory)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, what="weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"weights index {str(index)!r} has no weight_map object")
        return sorted({directory / name for name in weight_map.values()})
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return [directory / SAFE_WEIGHTS_NAME]
    return []


def _saved_fingerprint(
    files: list[Path], prefixes: Sequence[str] = _CONNECTOR_PREFIXES
) -> int | None:
    """The connector's config fingerprint saved in a checkpoint's safetensors files."""
    for file in files:
        with open_safetensors(file) as handle:
            keys = set(handle.keys())
            for prefix in prefixes:
                if prefix + FINGERPRINT_KEY in keys:
                    return int(handle.get_tensor(prefix + FINGERPRINT_KEY))
    return None


def check_checkpoint_connector(
    directory: str | os.PathLike,
    connector: ConnectorConfig,
    prefixes: Sequence[str] = _CONNECTOR_PREFIXES,
) -> None:
    """Check the connector weights saved in ``directory`` (under the first of ``prefixes`` that
    a key starts with) against ``connector`` before loading.

    HF's loader re-initialises missing connector weights silently and reports shape mismatches
    with an error that does not say why; this reads only the safetensors headers
    (``model.safetensors`` or a sharded index). Other directories are left to HF.

    Raises:
        ValueError: a connector weight is missing, unexpected or has another shape (all listed,
            with the connector config's fusion and widths).
    """
    files = safetensors_files(directory)
    if not files:
        return
    saved = saved_shapes(files, prefixes)
    fingerprint = _saved_fingerprint(files, prefixes) if FINGERPRINT_KEY in saved else None
    with torch.device("meta"):
        expected = {
            key: tuple(tensor.shape)
            for key, tensor in DenseConnector(connector).state_dict().items()
        }
    # A checkpoint without the fingerprint (parameters only, or saved before it existed) loads:
    # DenseInitMixin sets the buffer from the config.
    problems = shape_problems(saved, expected, optional=(FINGERPRINT_KEY,))
    if fingerprint is not None and not problems and fingerprint != config_fingerprint(connector):
        problems.append(
            "the weights were saved with a different connector config (fusion, layers, groups, "
            "resampling or projector changed although every shape still fits)"
        )
    if problems:
        raise ValueError(
            f"the connector weights in {str(directory)!r} do not match the connector config in its "
            f"config.json (fusion={connector.fusion.kind!r}, vision_dim={connector.vision_dim}, "
            f"llm_dim={connector.llm_dim}, projector={connector.projector.name!r}): "
            + "; ".join(problems)
        )


def check_saved_connector(model_class: type, path: Any, kwargs: dict[str, Any]) -> None:
    """``from_pretrained`` helper: run :func:`check_checkpoint_connector` on a local directory."""
    if not isinstance(path, str | os.PathLike):
        return
    directory = Path(path) / kwargs.get("subfolder", "")
    if directory.is_file():  # HF would look it up on the Hub, then call it a broken config
        raise ValueError(
            f"{str(directory)!r} is a file; {model_class.__name__}.from_pretrained expects the "
            "directory written by save_pretrained (with config.json and the weights)"
        )
    if not directory.is_dir():
        return
    config = kwargs.get("config")
    if not isinstance(config, model_class.config_class):
        if (directory / "config.json").is_file():  # not JSON / not UTF-8: say so, with the file
            read_json(directory / "config.json", what="model config")
        config = model_class.config_class.from_pretrained(directory)
    connector = config.connector_config
    check_connector_fits(connector, config.vision_config, config.text_config)
    prefixes = getattr(model_class, "connector_prefixes", _CONNECTOR_PREFIXES)
    check_checkpoint_connector(directory, connector, prefixes)


# ---------------------------------------------------------------------------- conversion


def _dense_config_from(config: Any, connector: ConnectorConfig, model_class: type) -> Any:
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    data["connector"] = connector.to_dict()
    return model_class.config_class(**data)


def reuse_mlp_projector(source: nn.Module, connector: DenseConnector, act: str) -> bool:
    """Copy LLaVA's two-Linear projector (``source``, activation ``act``) into the connector's
    ``mlp2x_gelu`` when names, shapes and activation fit; warn and say ``False`` otherwise."""
    if act != "gelu" or connector.config.projector.name != "mlp2x_gelu":
        logger.warning(
            "not reusing the projector weights: the source uses %r activation, the connector %r",
            act,
            connector.config.projector.name,
        )
        return False
    try:
        connector.load_projector_weights(source.state_dict())
    except ValueError as error:
        logger.warning(
            "not reusing the projector weights (%s); the connector starts from its initialisation",
            error,
        )
        return False
    return True


def convert_model(
    model: nn.Module,
    connector: ConnectorConfig | str,
    dense_class: type,
    source_class: type,
    *,
    reuse_projector: Callable[[nn.Module, DenseConnector], bool] | None = None,
) -> Any:
    """Build ``dense_class`` around ``model``'s own vision tower, LLM and head (shared, not
    copied) with a new Dense Connector; the source projector's weights are reused when they fit.

    ``reuse_projector(source_projector, connector)`` copies the source projector's weights into
    the new connector when they fit and says whether it did; families whose projector is not
    LLaVA's two-Linear MLP pass their own (InternVL's pixel-shuffle MLP). By default LLaVA's
    projector is reused when the connector's is ``mlp2x_gelu`` of the same shapes.

    Raises:
        ValueError: the connector does not fit the towers, or ``model`` keeps the CLS token
            (``vision_feature_select_strategy="full"`` on a tower with prefix tokens).
    """
    if not isinstance(model, source_class) or isinstance(model, dense_class):
        raise TypeError(f"model must be an HF {source_class.__name__}, got {type(model).__name__}")
    if isinstance(connector, str):
        connector = ConnectorConfig.from_preset(
            connector,
            vision_dim=model.config.vision_config.hidden_size,
            llm_dim=model.config.text_config.hidden_size,
        )
    if not isinstance(connector, ConnectorConfig):
        raise TypeError(
            f"connector must be a ConnectorConfig or a preset name, got {type(connector).__name__}"
        )
    config = model.config
    if (
        config.vision_feature_select_strategy == "full"
        and find_encoder_blocks(model.model.vision_tower).num_prefix_tokens
    ):
        raise ValueError(
            "vision_feature_select_strategy='full' keeps the CLS token, which a Dense Connector "
            "drops; only towers without prefix tokens (SigLIP) can be converted with 'full'"
        )
    check_connector_fits(connector, config.vision_config, config.text_config)
    dense_config = _dense_config_from(config, connector, dense_class)
    with torch.device("meta"):  # build the skeleton without allocating a second LLM
        dense = dense_class(dense_config)
    reference = next(model.model.vision_tower.parameters())
    new_connector = DenseConnector(connector).to(device=reference.device, dtype=reference.dtype)
    if reuse_projector is None:
        reuse_mlp_projector(
            model.model.multi_modal_projector, new_connector, config.projector_hidden_act
        )
    else:
        reuse_projector(model.model.multi_modal_projector, new_connector)
    for name, module in model.model.named_children():
        if name != "multi_modal_projector":
            setattr(dense.model, name, module)
    for name, parameter in model.model.named_parameters(
        recurse=False
    ):  # e.g. LLaVA-NeXT image_newline
        setattr(dense.model, name, parameter)
    dense.model.multi_modal_projector = new_connector
    dense.lm_head = model.lm_head
    meta = [
        name
        for name, tensor in [*dense.named_parameters(), *dense.named_buffers()]
        if tensor.is_meta
    ]
    if meta:
        raise RuntimeError(f"conversion left tensors unset: {meta[:5]}")
    share_sub_configs(dense, model)
    dense.generation_config = model.generation_config
    return dense.train(model.training)


def share_sub_configs(dense: nn.Module, source: nn.Module) -> None:
    """Make converted ``dense`` hold the sub-configs that its reused modules read.

    The tower and the LLM of a converted model are ``source``'s own modules, and they read
    ``source``'s sub-config objects (``text_config``, ``vision_config``). A Dense config rebuilt
    from ``to_dict()`` would be a copy that disagrees on what ``to_dict()`` leaves out: a source
    loaded with ``attn_implementation="eager"`` would report ``"sdpa"``, save it, and
    ``set_attn_implementation`` would change the copy, not what runs. As in HF's own models,
    the top-level config then holds the very objects its modules read; Dense modules built
    with the copies (a Dense vision model around stock blocks) are pointed at them too.
    """
    replaced = []  # (the Dense copy, the source's object)
    for key in dense.config.sub_configs:
        shared = getattr(source.config, key, None)
        if shared is not None:
            replaced.append((getattr(dense.config, key), shared))
            setattr(dense.config, key, shared)
    for module in dense.modules():
        config = getattr(module, "config", None)
        for duplicate, shared in replaced:
            if config is duplicate:
                module.config = shared
    # The dict form sets the top level alone: a plain string would overwrite the sub-configs,
    # which are the source's, with the top level's choice.
    dense.config._attn_implementation = {"": source.config._attn_implementation}
    dense.config._experts_implementation = {"": source.config._experts_implementation}
