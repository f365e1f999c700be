"""Hugging Face SmolVLM with a Dense Connector in place of its pixel-shuffle connector.

Transformers ships SmolVLM as its own classes (``SmolVLMForConditionalGeneration``,
``SmolVLMProcessor`` with a video processor), generated from Idefics3's code: the same SigLIP
tower run tile by tile, the same connector (``post_layernorm`` output -> pixel shuffle by
``scale_factor`` (3 in SmolVLM-Instruct) -> bias-free Linear), the same prompt layout. Everything
Dense is therefore the Idefics3 family's (:mod:`mmconnect.integrations.families.idefics3`); this
module binds it to the SmolVLM classes and adds what differs:

* video: SmolVLM's processor writes each sampled frame as one unsplit tile (a timestamp line,
  ``<fake_token_around_image><global-img>``, the tile's ``<image>`` tokens,
  ``<fake_token_around_image>``), and the frames arrive as ``pixel_values`` like tiles; the Dense
  processor gives each frame the connector's count as it does each tile;
* when every tile of ``pixel_values`` is padding the stock model keeps the first one (its
  ``get_image_features`` does), and so does the Dense model.

``model_type="dense_smolvlm"`` is registered with the Auto classes on import;
:func:`from_smolvlm` converts an existing model.

Examples:
    >>> dense = from_smolvlm(smolvlm, "dc-dci+pixel-shuffle-smolvlm")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import (
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMModel,
    SmolVLMProcessor,
)
from transformers.generation import GenerationConfig
from transformers.image_utils import is_valid_image
from transformers.models.smolvlm.modeling_smolvlm import (
    SmolVLMPreTrainedModel,
    SmolVLMVisionTransformer,
)
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    DenseInitMixin,
    checked_forward,
)
from mmconnect.integrations.families.idefics3 import (
    TiledConfigMixin,
    TiledDenseModelMixin,
    TiledGenerationMixin,
    TiledProcessorMixin,
    convert_tiled,
)
from mmconnect.integrations.families.protocol import Family, register_family
from mmconnect.zoo.pixel_shuffle import smolvlm_state_from_hf

MODEL_TYPE = "dense_smolvlm"


@strict
class DenseSmolVLMConfig(TiledConfigMixin, SmolVLMConfig):
    """``SmolVLMConfig`` plus ``connector``; derived and added fields as
    :class:`~mmconnect.integrations.families.idefics3.DenseIdefics3Config`'s (``image_seq_len``,
    ``resize_longest_edge``, ``do_image_splitting``)."""

    model_type = MODEL_TYPE
    family_name = "Dense SmolVLM"
    connector: dict | None = None
    image_seq_len: int | None = None
    resize_longest_edge: int | None = None
    do_image_splitting: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.attach_tiled_connector()


class DenseSmolVLMModel(DenseInitMixin, CheckedLoadingMixin, TiledDenseModelMixin, SmolVLMModel):
    """HF ``SmolVLMModel`` whose ``connector`` is a :class:`mmconnect.DenseConnector` (images
    and video frames tile by tile); ``forward`` checks the prompt's image tokens first."""

    config_class = DenseSmolVLMConfig
    model_type = MODEL_TYPE
    processor_name = "DenseSmolVLMProcessor"
    keep_one_tile_when_empty = True
    connector_prefixes = ("model.connector.", "connector.")

    def __init__(self, config: DenseSmolVLMConfig) -> None:
        SmolVLMPreTrainedModel.__init__(self, config)  # the stock __init__ builds its connector
        self._build_parts(config, SmolVLMVisionTransformer)
        self.post_init()

    forward = checked_forward(SmolVLMModel.forward)
    get_image_features = can_return_tuple(TiledDenseModelMixin.get_image_features)


class DenseSmolVLMForConditionalGeneration(
    DenseInitMixin, TiledGenerationMixin, SmolVLMForConditionalGeneration
):
    """HF ``SmolVLMForConditionalGeneration`` with a Dense Connector (``"dense_smolvlm"``)."""

    config_class = DenseSmolVLMConfig
    base_model_class = DenseSmolVLMModel
    connector_prefixes = DenseSmolVLMModel.connector_prefixes

    def __init__(self, config: DenseSmolVLMConfig) -> None:
        super().__init__(config)
        # as the stock class: the LLM carries a generation config made from the model config
        self.model.text_model.generation_config = GenerationConfig.from_model_config(config)


def from_smolvlm(
    model: SmolVLMForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseSmolVLMForConditionalGeneration:
    """A Dense SmolVLM around an existing HF ``SmolVLMForConditionalGeneration`` (tower, LLM
    and head shared; the stock connector's Linear reused for the native connector, through
    :func:`mmconnect.zoo.pixel_shuffle.smolvlm_state_from_hf`), as
    :func:`~mmconnect.integrations.families.idefics3.from_idefics3`.

    Raises:
        ValueError: the connector is for another tower depth or does not fit the tile grid.
    """
    return convert_tiled(
        model,
        connector,
        DenseSmolVLMForConditionalGeneration,
        SmolVLMForConditionalGeneration,
        smolvlm_state_from_hf,
    )


class DenseSmolVLMProcessor(TiledProcessorMixin, SmolVLMProcessor):
    """``SmolVLMProcessor`` whose tiles and video frames each get the connector's count of
    ``<image>`` tokens (the stock prompt layouts otherwise).

    Args:
        connector: the connector config (dict or :class:`ConnectorConfig`); saved with the
            processor.
        patch_size: the vision tower's patch size.
        image_seq_len: optional; must equal the connector's count per tile.
        chat_template: as for ``SmolVLMProcessor``.
    """

    # Every argument that must survive save_pretrained -> from_pretrained is named here.
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        video_processor: Any = None,
        image_seq_len: int | None = None,
        chat_template: str | None = None,
        connector: dict | ConnectorConfig | None = None,
        patch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        per_tile = self._connector_tokens(connector, patch_size, image_processor, image_seq_len)
        super().__init__(
            image_processor,
            tokenizer,
            video_processor,
            image_seq_len=per_tile,
            chat_template=chat_template,
            **kwargs,
        )

    def prepare_inputs_layout(
        self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any
    ) -> Any:
        """As the stock processor's, and a flat list of images with several prompts is shared
        out among the prompts by their ``<image>`` counts, as Idefics3's processor does (the
        stock SmolVLM processor would give every image to the first prompt and refuse)."""
        if (
            isinstance(images, list | tuple)
            and images
            and is_valid_image(images[0])
            and isinstance(text, list | tuple)
            and len(text) > 1
        ):
            counts = [sample.count(self.image_token) for sample in text]
            if sum(counts) == len(images):
                starts = [sum(counts[:index]) for index in range(len(counts))]
                images = [
                    list(images[start : start + count])
                    for start, count in zip(starts, counts, strict=True)
                ]
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, **kwargs)


#: The SmolVLM family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseSmolVLMConfig,
    model_class=DenseSmolVLMModel,
    generation_class=DenseSmolVLMForConditionalGeneration,
    processor_class=DenseSmolVLMProcessor,
    source_class=SmolVLMForConditionalGeneration,
    convert=from_smolvlm,
    fixed_image_tokens=False,
    description="SmolVLM (HF SmolVLMForConditionalGeneration) with a Dense Connector per tile",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
