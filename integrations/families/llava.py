"""Hugging Face LLaVA with a Dense Connector in place of its projector.

``DenseLlavaForConditionalGeneration`` is an HF ``LlavaForConditionalGeneration`` whose
``multi_modal_projector`` is a :class:`mmconnect.DenseConnector` fed by a
:class:`mmconnect.MultiLayerFeatureTap` on its vision tower (CLIP or SigLIP; any LLM HF LLaVA
supports). Loss, ``generate()``, PEFT and the Trainer work as for HF LLaVA; the model has its own
``model_type`` (``"dense_llava"``), registered with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageTextToText`` when this module is imported, so::

    import mmconnect.integrations.families.llava  # registers "dense_llava"
    model = AutoModelForImageTextToText.from_pretrained(directory)

round-trips through ``save_pretrained``. :func:`from_llava` converts an existing HF LLaVA.

Examples:
    >>> from mmconnect import ConnectorConfig
    >>> dense = from_llava(llava, ConnectorConfig.from_preset("dc-dci-clip-l-336"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
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
from transformers.processing_utils import MultiModalData
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    FixedImageTokensMixin,
    attach_connector,
    check_connector_fits,
    checked_forward,
    checked_grid,
    convert_model,
    image_outputs,
    injecting_forward,
    native_grid,
    processor_connector,
    reject_feature_layer,
    reject_interpolation,
    tower_features,
)
from mmconnect.integrations.families.protocol import (
    DenseFamilyModel,
    Family,
    TowerGeometry,
    register_family,
    vision_config_geometry,
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


class DenseLlavaModel(
    DenseInitMixin, FixedImageTokensMixin, CheckedLoadingMixin, DenseFamilyModel, LlavaModel
):
    """HF ``LlavaModel`` whose ``multi_modal_projector`` is a :class:`mmconnect.DenseConnector`.

    ``forward`` has the stock signature and checks the prompt's image tokens before the tower
    runs. A connector with DeepStack (``injection=``) adds its per-level residuals to the LLM's
    hidden states at the image positions after LLM layers ``0, 1, ...``
    (:func:`~mmconnect.integrations.families.base.injecting_forward`).
    """

    config_class = DenseLlavaConfig
    processor_name = "DenseLlavaProcessor"
    model_type = MODEL_TYPE

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

    def vision_towers(self) -> dict[str, nn.Module]:
        """The one vision tower (family protocol)."""
        return {"vision_tower": self.vision_tower}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector alone trains with the connector (family protocol)."""
        return {"multi_modal_projector": self.multi_modal_projector}

    def tower_geometry(self) -> TowerGeometry:
        """The vision tower's width, depth and native grid (family protocol)."""
        return vision_config_geometry(self.config.vision_config, self.vision_tower)

    def image_token_count(self, image_size: Any = None) -> int:
        """How many ``<image>`` tokens one image fills: the connector's count at the tower's
        native grid (every image is resized to the tower's size, so ``image_size`` is unused)."""
        return self.connector.num_tokens(native_grid(self.config.vision_config))

    forward = checked_forward(injecting_forward(LlavaModel.forward))

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        image_sizes: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Tap the tower, run the connector; returns what HF LLaVA's ``get_image_features`` does.

        ``[images, 3, S, S]`` -> ``pooler_output``: a list of ``[tokens, llm_dim]`` per image;
        ``last_hidden_state``: the connector's final layer ``[images, h*w, vision_dim]`` (prefix
        tokens dropped); ``hidden_states`` / ``attentions`` when ``output_hidden_states`` /
        ``output_attentions`` ask for them (then the tower runs in full, otherwise it stops
        after the deepest layer the connector reads); a tuple when ``return_dict=False``.
        The layers come from the connector config; ``vision_feature_select_strategy`` is not
        used (the tap drops prefix tokens by structure). With a DeepStack connector
        (``injection=``) ``deepstack_features`` holds, per injected level, the residual of each
        image (``[tokens, llm_dim]``), which ``forward`` adds after LLM layer ``i``.

        Raises:
            ValueError: bad ``pixel_values`` (see :func:`~mmconnect.integrations.families.base.check_pixel_values`),
                another ``vision_feature_layer``, ``image_sizes`` or ``interpolate_pos_encoding``.
        """
        reject_feature_layer(self.config, vision_feature_layer)
        reject_interpolation(kwargs)
        if image_sizes is not None:
            raise ValueError(
                "image_sizes is for AnyRes models; use DenseLlavaNextForConditionalGeneration"
            )
        grid = checked_grid(pixel_values, self.config.vision_config)
        features, outputs = tower_features(
            self.connector,
            self.vision_tower,
            pixel_values.to(self.vision_tower.dtype),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        tokens, residuals = self.connector.forward_with_injections(features, grid)
        return image_outputs(outputs, tokens, residuals, pixel_values.shape[0])


class DenseLlavaForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, LlavaForConditionalGeneration
):
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
        chat_template: as for ``LlavaProcessor`` (saved and reloaded with the processor).
        image_token: as for ``LlavaProcessor``.
    """

    # Every argument that must survive save_pretrained -> from_pretrained is named here: HF
    # passes a saved processor only the arguments its __init__ names.
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int | None = None,
        connector: dict | ConnectorConfig | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        **kwargs: Any,
    ) -> None:
        self._connector_config = processor_connector(connector, patch_size, "DenseLlavaProcessor")
        self.connector = self._connector_config.to_dict()  # saved with the processor
        # The stock count adjustments (CLS, "default" strategy) never apply: both token counts
        # are overridden below with the connector's.
        kwargs.pop("vision_feature_select_strategy", None)
        kwargs.pop("num_additional_image_tokens", None)
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            chat_template=chat_template,
            image_token=image_token,
            **kwargs,
        )

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens for one preprocessed image of ``height x width`` pixels."""
        return self._connector_config.num_tokens(
            (height // self.patch_size, width // self.patch_size)
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        return self.image_token * self.num_image_tokens(height, width)

    def _get_num_multimodal_tokens(
        self, image_sizes: list[list[int]] | None = None, **kwargs: Any
    ) -> MultiModalData:
        """The placeholder tokens per image that the processor inserts (serving engines read
        this): every image is cropped to the image processor's ``crop_size``."""
        vision_data = {}
        if image_sizes is not None:
            height, width = _processed_size(
                self.image_processor, self._merge_kwargs(**kwargs)["images_kwargs"]
            )
            tokens = self.num_image_tokens(height, width)
            vision_data = {
                "num_image_tokens": [tokens] * len(image_sizes),
                "num_image_patches": [1] * len(image_sizes),
            }
        return MultiModalData(**vision_data)


def _processed_size(image_processor: Any, images_kwargs: dict) -> tuple[int, int]:
    """``(height, width)`` of every image the image processor makes: its crop when it centre
    crops (CLIP), else its resize target (SigLIP's ``{"height", "width"}``)."""
    crop = images_kwargs.get("crop_size") or getattr(image_processor, "crop_size", None)
    do_crop = images_kwargs.get("do_center_crop")
    if do_crop is None:
        do_crop = getattr(image_processor, "do_center_crop", crop is not None)
    size = (
        crop
        if do_crop and crop is not None
        else (images_kwargs.get("size") or image_processor.size)
    )
    if size.get("height") is not None:
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


#: The LLaVA family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseLlavaConfig,
    model_class=DenseLlavaModel,
    generation_class=DenseLlavaForConditionalGeneration,
    processor_class=DenseLlavaProcessor,
    source_class=LlavaForConditionalGeneration,
    convert=from_llava,
    description="LLaVA-1.5 (HF LlavaForConditionalGeneration) with a Dense Connector",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
