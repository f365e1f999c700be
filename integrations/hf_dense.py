"""What every Hugging Face model with a Dense Connector shares (LLaVA, LLaVA-NeXT, ...).

* the connector inside the HF config (:func:`attach_connector`, :class:`ConnectorConfigMixin`) and
  the checks that it fits the towers and the pixels;
* checkpoint checks before HF loads anything (:class:`CheckedLoadingMixin`): connector weights
  missing, unexpected, of another shape or saved under another connector config are named;
* ``generate()`` that checks the prompt's image tokens before the vision tower runs
  (:class:`DenseGenerationMixin`);
* conversion of an existing HF model around its own modules (:func:`convert_model`) and
  registration with the Auto classes (:func:`register_dense_model`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from mmconnect import ConnectorConfig, DenseConnector, find_encoder_blocks
from mmconnect.checkpoint import atomic_save_directory, open_safetensors, read_json
from mmconnect.connector import FINGERPRINT_KEY, config_fingerprint, count_output_tokens

logger = logging.getLogger(__name__)


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


class ConnectorConfigMixin:
    """For HF configs with a ``connector`` field (a :class:`ConnectorConfig` as a dict)."""

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


# ---------------------------------------------------------------------------- model mixins


class CheckedLoadingMixin:
    """``from_pretrained`` that checks a local checkpoint's connector before HF loads it, and an
    atomic ``save_pretrained``."""

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
    (``image_tokens_per_image()``): the prompt's count is checked before any tensor work.
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
        found = int((input_ids == self.config.image_token_id).sum())
        images = pixel_values.shape[0]
        per_image = self.image_tokens_per_image()
        if found != images * per_image:
            raise ValueError(
                f"the prompt holds {found} image tokens but {images} image(s) fill "
                f"{images * per_image} ({per_image} per image with this connector); build the "
                f"prompt with {self.processor_name} so the counts agree"
            )

    def forward(
        self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None, **kwargs: Any
    ):
        self.check_image_tokens(input_ids, pixel_values)
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)


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


def check_checkpoint_connector(directory: str | os.PathLike, connector: ConnectorConfig) -> None:
    """Check the connector weights saved in ``directory`` against ``connector`` before loading.

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
    saved: dict[str, tuple[int, ...]] = {}
    fingerprint: int | None = None
    for file in files:
        with open_safetensors(file) as handle:
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
    check_checkpoint_connector(directory, connector)


# ---------------------------------------------------------------------------- conversion


def _dense_config_from(config: Any, connector: ConnectorConfig, model_class: type) -> Any:
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


def convert_model(
    model: nn.Module, connector: ConnectorConfig | str, dense_class: type, source_class: type
) -> Any:
    """Build ``dense_class`` around ``model``'s own vision tower, LLM and head (shared, not
    copied) with a new Dense Connector; the source projector's weights are reused when they fit.

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


# ---------------------------------------------------------------------------- registration


def register_dense_model(
    model_type: str,
    config_class: type,
    model_class: type,
    generation_class: type,
    processor_class: type,
) -> None:
    """Register a Dense model family with the HF Auto classes (idempotent)."""
    try:
        AutoConfig.register(model_type, config_class)
    except ValueError:
        return  # already registered
    AutoModel.register(config_class, model_class)
    AutoModelForImageTextToText.register(config_class, generation_class)
    AutoProcessor.register(config_class, processor_class)
