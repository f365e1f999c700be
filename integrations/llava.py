"""Hugging Face LLaVA with a Dense Connector in place of its projector.

``DenseLlavaForConditionalGeneration`` is an HF ``LlavaForConditionalGeneration`` whose
``multi_modal_projector`` is a :class:`mmconnect.DenseConnector` fed by a
:class:`mmconnect.MultiLayerFeatureTap` on its vision tower (CLIP or SigLIP; any LLM HF LLaVA
supports). Loss, ``generate()``, PEFT and the Trainer work as for HF LLaVA; the model has its own
``model_type`` (``"dense_llava"``), registered with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageTextToText`` when this module is imported, so::

    import mmconnect.integrations.llava  # registers "dense_llava"
    model = AutoModelForImageTextToText.from_pretrained(directory)

round-trips through ``save_pretrained``. :func:`from_llava` converts an existing HF LLaVA.

Example:
    >>> from mmconnect import ConnectorConfig
    >>> dense = from_llava(llava, ConnectorConfig.from_preset("dc-dci-clip-l-336"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
)
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.connector import FINGERPRINT_KEY, config_fingerprint, count_output_tokens

logger = logging.getLogger(__name__)

MODEL_TYPE = "dense_llava"


# ---------------------------------------------------------------------------- config


def baseline_connector(
    vision_config: Any, text_config: Any, feature_layer: int = -2
) -> ConnectorConfig:
    """The LLaVA-1.5 connector for these towers: one layer, ``mlp2x_gelu``."""
    return ConnectorConfig(
        fusion="none",
        final_layer=feature_layer,
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


@strict
class DenseLlavaConfig(LlavaConfig):
    """``LlavaConfig`` plus ``connector``, a :class:`mmconnect.ConnectorConfig` as a dict.

    Without ``connector`` the LLaVA-1.5 baseline connector (``vision_feature_layer`` only) is used.
    ``image_seq_length`` is set from the connector's token count at the tower's native grid.
    """

    model_type = MODEL_TYPE
    connector: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        attach_connector(self)

    @property
    def connector_config(self) -> ConnectorConfig:
        """``connector`` as a validated :class:`mmconnect.ConnectorConfig`."""
        return ConnectorConfig.from_dict(self.connector)


def attach_connector(config: Any) -> None:
    """Fill a Dense config's ``connector`` (baseline when absent) and its ``image_seq_length``."""
    if config.connector is None:
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                f"{type(config).__name__} needs connector= when vision_feature_layer is a list; "
                "convert with from_llava(model, ConnectorConfig(fusion='sci', ...))"
            )
        baseline = baseline_connector(
            config.vision_config, config.text_config, config.vision_feature_layer
        )
        config.connector = baseline.to_dict()
    if isinstance(config.connector, ConnectorConfig):
        config.connector = config.connector.to_dict()
    config.image_seq_length = count_output_tokens(
        config.connector_config, native_grid(config.vision_config)
    )


def reject_feature_layer(config: Any, vision_feature_layer: Any) -> None:
    """Dense models read the layers of their connector config; a different request is an error."""
    if vision_feature_layer is not None and vision_feature_layer != config.vision_feature_layer:
        raise ValueError(
            "this model reads the layers named by its connector config; vision_feature_layer="
            f"{vision_feature_layer!r} cannot change them (build another connector instead)"
        )


def native_grid(vision_config: Any) -> tuple[int, int]:
    """The patch grid of the vision tower at its configured image size."""
    side = vision_config.image_size // vision_config.patch_size
    return side, side


def checked_grid(pixel_values: Tensor, vision_config: Any) -> tuple[int, int]:
    """The tower's patch grid for ``pixel_values`` (``[images, 3, S, S]``), checked against its size.

    Raises:
        ValueError: the pixel size differs from the tower's ``image_size``.
    """
    size = vision_config.image_size
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[-3:]) != (3, size, size):
        raise ValueError(
            f"pixel_values must be [images, 3, {size}, {size}] for this vision tower "
            f"(image_size={size}), got shape {tuple(pixel_values.shape)}"
        )
    return native_grid(vision_config)


# ---------------------------------------------------------------------------- model


class DenseLlavaModel(LlavaModel):
    """HF ``LlavaModel`` whose ``multi_modal_projector`` is a :class:`mmconnect.DenseConnector`."""

    config_class = DenseLlavaConfig

    def __init__(self, config: DenseLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(
            self, config
        )  # LlavaModel.__init__ would build the stock projector
        connector_config = config.connector_config
        check_connector_fits(connector_config, config.vision_config, config.text_config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = DenseConnector(connector_config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (stored as ``multi_modal_projector`` for HF compatibility)."""
        return self.multi_modal_projector

    def image_tokens_per_image(self) -> int:
        """How many ``<image>`` placeholder tokens one image fills."""
        return self.connector.num_tokens(native_grid(self.config.vision_config))

    def get_image_features(
        self,
        pixel_values: Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        image_sizes: Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Tap the tower, run the connector: ``pooler_output`` is a list of ``[tokens, llm_dim]``.

        The tower runs only up to the deepest layer the connector reads (early exit). The layers
        come from the connector config; ``vision_feature_select_strategy`` is not used (the tap
        drops prefix tokens by structure).
        """
        reject_feature_layer(self.config, vision_feature_layer)
        if image_sizes is not None:
            raise ValueError(
                "image_sizes is for AnyRes models; use DenseLlavaNextForConditionalGeneration"
            )
        grid = checked_grid(pixel_values, self.config.vision_config)
        tap = self.connector.make_tap(self.vision_tower, keep_prefix=False)
        features = tap(pixel_values.to(self.vision_tower.dtype))
        image_features = self.connector(features, grid)
        return BaseModelOutputWithPooling(pooler_output=list(image_features))

    def check_image_tokens(self, input_ids: Tensor | None, pixel_values: Tensor | None) -> None:
        """Before any tensor work: the prompt's image tokens must equal what the images fill.

        Raises:
            ValueError: naming both counts.
        """
        if input_ids is None or pixel_values is None:
            return
        found = int((input_ids == self.config.image_token_id).sum())
        images = pixel_values.shape[0]
        expected = images * self.image_tokens_per_image()
        if found != expected:
            raise ValueError(
                f"the prompt holds {found} image tokens but {images} image(s) fill {expected} "
                f"({self.image_tokens_per_image()} per image with this connector); build the prompt "
                "with DenseLlavaProcessor so the counts agree"
            )

    def forward(
        self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None, **kwargs: Any
    ):
        self.check_image_tokens(input_ids, pixel_values)
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """HF ``from_pretrained``; a local checkpoint's connector weights are checked first."""
        check_saved_connector(cls, pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class DenseLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """HF ``LlavaForConditionalGeneration`` with a Dense Connector (``model_type="dense_llava"``)."""

    config_class = DenseLlavaConfig

    def __init__(self, config: DenseLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(
            self, config
        )  # the parent __init__ would build a stock LlavaModel
        self.model = DenseLlavaModel(config)
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
        self.model.check_image_tokens(input_ids, kwargs.get("pixel_values"))
        return super().generate(inputs, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """HF ``from_pretrained``; a local checkpoint's connector weights are checked first."""
        check_saved_connector(cls, pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


# ---------------------------------------------------------------------------- checkpoints

#: Where a saved Dense model keeps its connector (ForConditionalGeneration / bare model).
_CONNECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def check_checkpoint_connector(directory: str | os.PathLike, connector: ConnectorConfig) -> None:
    """Check the connector weights saved in ``directory`` against ``connector`` before loading.

    HF's loader re-initialises missing connector weights silently and reports shape mismatches
    with an error that does not say why; this reads only the safetensors headers
    (``model.safetensors`` or a sharded index). Other directories are left to HF.

    Raises:
        ValueError: a connector weight is missing, unexpected or has another shape (all listed,
            with the connector config's fusion and widths).
    """
    directory = Path(directory)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"].values()
        files = sorted({directory / name for name in names})
    elif (directory / SAFE_WEIGHTS_NAME).is_file():
        files = [directory / SAFE_WEIGHTS_NAME]
    else:
        return
    saved: dict[str, tuple[int, ...]] = {}
    fingerprint: int | None = None
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                prefix = next((p for p in _CONNECTOR_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    name = key[len(prefix) :]
                    saved[name] = tuple(handle.get_slice(key).get_shape())
                    if name == FINGERPRINT_KEY:
                        fingerprint = int(handle.get_tensor(key))
    with torch.device("meta"):
        expected = {
            key: tuple(tensor.shape)
            for key, tensor in DenseConnector(connector).state_dict().items()
        }
    problems = [f"missing {key}" for key in expected if key not in saved]
    problems += [f"unexpected {key}" for key in saved if key not in expected]
    problems += [
        f"{key}: {saved[key]} in the weights, {shape} expected by the config"
        for key, shape in expected.items()
        if key in saved and saved[key] != shape
    ]
    if fingerprint is not None and not problems and fingerprint != config_fingerprint(connector):
        problems.append(
            "the weights were saved with a different connector config (fusion, layers, groups, "
            "resampling or projector changed although every shape still fits)"
        )
    if problems:
        raise ValueError(
            f"the connector weights in {str(directory)!r} do not match the connector config in its "
            f"config.json (fusion={connector.fusion!r}, vision_dim={connector.vision_dim}, "
            f"llm_dim={connector.llm_dim}, projector={connector.projector!r}): "
            + "; ".join(problems)
        )


def check_saved_connector(model_class: type, path: Any, kwargs: dict[str, Any]) -> None:
    """``from_pretrained`` helper: run :func:`check_checkpoint_connector` on a local directory."""
    if not isinstance(path, str | os.PathLike):
        return
    directory = Path(path) / kwargs.get("subfolder", "")
    if not directory.is_dir():
        return
    config = kwargs.get("config")
    if not isinstance(config, model_class.config_class):
        config = model_class.config_class.from_pretrained(directory)
    connector = config.connector_config
    check_connector_fits(connector, config.vision_config, config.text_config)
    check_checkpoint_connector(directory, connector)


# ---------------------------------------------------------------------------- conversion


def _dense_config_from(config: LlavaConfig, connector: ConnectorConfig, model_class: type) -> Any:
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    data["connector"] = connector.to_dict()
    return model_class.config_class(**data)


def _reuse_projector_weights(source: nn.Module, connector: DenseConnector, act: str) -> bool:
    """Copy the source projector into the connector's when names, shapes and activation fit."""
    if act != "gelu" or connector.config.projector != "mlp2x_gelu":
        logger.warning(
            "not reusing the projector weights: the source uses %r activation, the connector %r",
            act,
            connector.config.projector,
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


def convert_model(model: nn.Module, connector: ConnectorConfig | str, dense_class: type) -> Any:
    """Shared by :func:`from_llava` and the LLaVA-NeXT conversion: build ``dense_class`` around
    ``model``'s own vision tower, LLM and head (shared, not copied) with a new Dense Connector."""
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
        and DenseConnector(connector).make_tap(model.model.vision_tower).num_prefix_tokens
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
    _reuse_projector_weights(
        model.model.multi_modal_projector, new_connector, config.projector_hidden_act
    )
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
    dense.generation_config = model.generation_config
    return dense.train(model.training)


def from_llava(
    model: LlavaForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseLlavaForConditionalGeneration:
    """A Dense LLaVA built around an existing HF LLaVA.

    The vision tower, LLM and LM head are the source model's own modules (shared, not copied).
    The source projector's weights are reused when the connector's projector has the same
    shapes (``mlp2x_gelu`` with the same input width, e.g. an SCI connector on the layers of a
    list-valued ``vision_feature_layer``, which then reproduces the source's logits exactly).

    Args:
        model: an HF ``LlavaForConditionalGeneration``.
        connector: a :class:`ConnectorConfig` or a preset name (resized to the model's widths).
    """
    if not isinstance(model, LlavaForConditionalGeneration) or isinstance(
        model, DenseLlavaForConditionalGeneration
    ):
        raise TypeError(
            f"model must be an HF LlavaForConditionalGeneration, got {type(model).__name__}"
        )
    return convert_model(model, connector, DenseLlavaForConditionalGeneration)


# ---------------------------------------------------------------------------- processor


class DenseLlavaProcessor(LlavaProcessor):
    """``LlavaProcessor`` that expands each ``<image>`` into the connector's token count.

    Args:
        connector: the connector config as a dict (``ConnectorConfig.to_dict()``) or a
            :class:`ConnectorConfig`; saved with the processor.
        patch_size: the vision tower's patch size.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int | None = None,
        connector: dict | ConnectorConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if connector is None or patch_size is None:
            raise ValueError(
                "DenseLlavaProcessor needs connector= (a connector config) and patch_size="
            )
        self.connector = (
            connector.to_dict() if isinstance(connector, ConnectorConfig) else dict(connector)
        )
        self._connector_config = ConnectorConfig.from_dict(self.connector)
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            **kwargs,
        )

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens for one preprocessed image of ``height x width`` pixels."""
        return count_output_tokens(
            self._connector_config, (height // self.patch_size, width // self.patch_size)
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        return self.image_token * self.num_image_tokens(height, width)


def register() -> None:
    """Register ``dense_llava`` with the HF Auto classes (idempotent; done on import)."""
    try:
        AutoConfig.register(MODEL_TYPE, DenseLlavaConfig)
    except ValueError:
        return  # already registered
    AutoModel.register(DenseLlavaConfig, DenseLlavaModel)
    AutoModelForImageTextToText.register(DenseLlavaConfig, DenseLlavaForConditionalGeneration)
    AutoProcessor.register(DenseLlavaConfig, DenseLlavaProcessor)


register()
