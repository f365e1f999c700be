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

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> dense = from_llava(llava, ConnectorConfig.from_preset("dc-dci-clip-l-336"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import (
    AutoModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
)
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.connector import count_output_tokens
from mmconnect.integrations.hf_dense import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    FixedImageTokensMixin,
    attach_connector,
    check_connector_fits,
    checked_grid,
    convert_model,
    native_grid,
    processor_connector,
    register_dense_model,
    reject_feature_layer,
)

MODEL_TYPE = "dense_llava"


# ---------------------------------------------------------------------------- config


@strict
class DenseLlavaConfig(ConnectorConfigMixin, LlavaConfig):
    """``LlavaConfig`` plus ``connector``, a :class:`mmconnect.ConnectorConfig` as a dict.

    Without ``connector`` the LLaVA-1.5 baseline connector (``vision_feature_layer`` only) is used.
    ``image_seq_length`` is set from the connector's token count at the tower's native grid.
    """

    model_type = MODEL_TYPE
    connector: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        attach_connector(self)


# ---------------------------------------------------------------------------- model


class DenseLlavaModel(FixedImageTokensMixin, CheckedLoadingMixin, LlavaModel):
    """HF ``LlavaModel`` whose ``multi_modal_projector`` is a :class:`mmconnect.DenseConnector`."""

    config_class = DenseLlavaConfig
    processor_name = "DenseLlavaProcessor"

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


class DenseLlavaForConditionalGeneration(DenseGenerationMixin, LlavaForConditionalGeneration):
    """HF ``LlavaForConditionalGeneration`` with a Dense Connector (``model_type="dense_llava"``)."""

    config_class = DenseLlavaConfig

    base_model_class = DenseLlavaModel


# ---------------------------------------------------------------------------- conversion


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
    return convert_model(
        model, connector, DenseLlavaForConditionalGeneration, LlavaForConditionalGeneration
    )


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
        self._connector_config = processor_connector(connector, patch_size, "DenseLlavaProcessor")
        self.connector = self._connector_config.to_dict()  # saved with the processor
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
    """Register ``dense_llava`` with the HF Auto classes, processor included (done on import)."""
    register_dense_model(
        MODEL_TYPE,
        DenseLlavaConfig,
        DenseLlavaModel,
        DenseLlavaForConditionalGeneration,
        DenseLlavaProcessor,
    )


register()
