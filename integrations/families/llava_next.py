"""Hugging Face LLaVA-NeXT (AnyRes) with a Dense Connector applied to every crop.

``DenseLlavaNextForConditionalGeneration`` is an HF ``LlavaNextForConditionalGeneration`` whose
projector is a :class:`mmconnect.DenseConnector`: base image and tiles each go through tower ->
connector, then :func:`mmconnect.integrations.families.anyres.pack_anyres` stitches the tiles, crops the
padding and appends the learned ``image_newline`` per row. SCI / DCI give exactly HF's token
counts; STI's pooled tokens are appended per crop after packing, and the efficient Dense
Connector packs its resampled 12x12 grids (see :mod:`mmconnect.integrations.families.anyres`).
``model_type="dense_llava_next"`` is registered with the Auto classes on import;
:func:`from_llava_next` converts an existing model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import (
    AutoModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.integrations.families.anyres import (
    anyres_token_count,
    check_image_sizes,
    check_pinpoints,
    crop_layout,
    pack_anyres,
    tile_grid,
)
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    attach_connector,
    check_connector_fits,
    check_pixel_values,
    checked_forward,
    checked_grid,
    convert_model,
    native_grid,
    processor_connector,
    refuse_injection,
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

MODEL_TYPE = "dense_llava_next"


@strict
class DenseLlavaNextConfig(ConnectorConfigMixin, LlavaNextConfig):
    """``LlavaNextConfig`` plus ``connector`` (a :class:`mmconnect.ConnectorConfig` as a dict).

    Raises:
        ValueError: a pinpoint is not a multiple of the tile (vision tower image) size, or the
            connector has a DeepStack ``injection`` (AnyRes packing puts newline tokens between
            the rows of merged tokens, which the residuals would have to follow; not
            implemented).
    """

    model_type = MODEL_TYPE
    connector: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        attach_connector(self)
        refuse_injection(
            self.connector_config,
            "Dense LLaVA-NeXT",
            "AnyRes packing adds newline tokens between the rows of each image's tokens and "
            "unpads the crops, so per-level residuals would have to be packed the same way "
            "(not implemented)",
        )
        check_pinpoints(self.image_grid_pinpoints, self.vision_config.image_size)


class DenseLlavaNextModel(DenseInitMixin, CheckedLoadingMixin, DenseFamilyModel, LlavaNextModel):
    """HF ``LlavaNextModel`` with a Dense Connector per AnyRes crop.

    ``forward`` has the stock signature and checks the prompt's image tokens before the tower
    runs.
    """

    config_class = DenseLlavaNextConfig
    model_type = MODEL_TYPE

    def __init__(self, config: DenseLlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(
            self, config
        )  # LlavaNextModel.__init__ builds the stock projector
        connector_config = config.connector_config
        check_connector_fits(connector_config, config.vision_config, config.text_config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = DenseConnector(connector_config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(
            torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std
        )
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (stored as ``multi_modal_projector`` for HF compatibility)."""
        return self.multi_modal_projector

    def vision_towers(self) -> dict[str, nn.Module]:
        """The one vision tower, run on every AnyRes crop (family protocol)."""
        return {"vision_tower": self.vision_tower}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector alone trains with the connector (family protocol); the learned
        ``image_newline`` belongs to the LLM side, as in HF LLaVA-NeXT."""
        return {"multi_modal_projector": self.multi_modal_projector}

    def tower_geometry(self) -> TowerGeometry:
        """The vision tower's width, depth and native grid per crop (family protocol)."""
        return vision_config_geometry(self.config.vision_config, self.vision_tower)

    def image_token_count(self, image_size: Any = None) -> int:
        """Visual tokens of one image of original ``(height, width)`` pixels (AnyRes: the count
        depends on the size, so ``image_size`` is required).

        Raises:
            ValueError: ``image_size`` is missing.
        """
        if image_size is None:
            raise ValueError(
                "image_size is required: a LLaVA-NeXT image's token count depends on its "
                "(height, width) through the AnyRes tiling"
            )
        vision = self.config.vision_config
        return anyres_token_count(
            self.connector,
            _pair(image_size),
            self.config.image_grid_pinpoints,
            vision.image_size,
            native_grid(vision),
        )

    def _crops(self, pixel_values: Tensor, image_sizes: Tensor | None) -> tuple[Tensor, list[int]]:
        """All crops as ``[crops, 3, S, S]`` and how many belong to each image.

        ``pixel_values`` is the processor's ``[images, max crops, 3, S, S]`` (padded) or the
        crops of all images concatenated, ``[crops, 3, S, S]``.

        Raises:
            ValueError: ``image_sizes`` missing or not positive ``(height, width)`` pairs, or
                ``pixel_values`` of another layout, channel count or size, or empty.
        """
        if image_sizes is None:
            raise ValueError(
                "image_sizes is required for AnyRes: pass the processor's image_sizes ([images, 2], "
                "original (height, width) of each image)"
            )
        vision = self.config.vision_config
        tile = vision.image_size
        if isinstance(pixel_values, Tensor) and pixel_values.dim() == 5:
            if pixel_values.shape[0] == 0:
                raise ValueError(
                    f"pixel_values holds 0 images (shape {tuple(pixel_values.shape)}); pass at "
                    f"least one image [images, crops, 3, {tile}, {tile}], or pixel_values=None "
                    "for a prompt without images"
                )
            check_pixel_values(
                pixel_values.flatten(0, 1),
                tile,
                channels=getattr(vision, "num_channels", 3),
                leading="crops",
            )
        else:
            check_pixel_values(
                pixel_values, tile, channels=getattr(vision, "num_channels", 3), leading="crops"
            )
        sizes = check_image_sizes(image_sizes)
        counts = [
            1 + math.prod(tile_grid(size, self.config.image_grid_pinpoints, tile)) for size in sizes
        ]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(counts):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(counts)}"
                )
            pixel_values = torch.cat(
                [crops[:count] for crops, count in zip(pixel_values, counts, strict=True)]
            )
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} crops but image_sizes need {sum(counts)} ({counts})"
            )
        return pixel_values, counts

    forward = checked_forward(LlavaNextModel.forward)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Tensor,
        image_sizes: Tensor | None = None,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Every crop through tap -> connector, then AnyRes packing; returns what HF
        LLaVA-NeXT's ``get_image_features`` does.

        ``pooler_output``: a list with one ``[tokens, llm_dim]`` tensor per image;
        ``last_hidden_state``: the connector's final layer for every crop, ``[crops, h*w,
        vision_dim]``; ``hidden_states`` / ``attentions`` when asked for (the tower then runs in
        full); a tuple when ``return_dict=False``.

        Raises:
            ValueError: bad ``pixel_values`` or ``image_sizes`` (as in ``forward``), another
                ``vision_feature_layer`` or ``interpolate_pos_encoding``.
        """
        reject_feature_layer(self.config, vision_feature_layer)
        reject_interpolation(kwargs)
        crops, counts = self._crops(pixel_values, image_sizes)
        grid = checked_grid(crops, self.config.vision_config, leading="crops")
        features, outputs = tower_features(
            self.connector,
            self.vision_tower,
            crops.to(self.vision_tower.dtype),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        tokens = self.connector(features, grid)
        crop_grid, _ = crop_layout(self.connector, grid)
        packed = [
            pack_anyres(
                image_crops,
                _pair(size),
                self.config.image_grid_pinpoints,
                self.config.vision_config.image_size,
                crop_grid,
                self.image_newline,
            )
            for image_crops, size in zip(torch.split(tokens, counts), image_sizes, strict=True)
        ]
        outputs.pooler_output = packed
        return outputs

    # ------------------------------------------------------------------ video frames
    def frame_pixel_values(self, image_processor: Any, images: list) -> Tensor:
        """Each frame's base crop (the whole frame resized to the tile size): ``[T, 3, S, S]``;
        AnyRes tiles are not used for video frames."""
        size = self.config.vision_config.image_size
        # One pinpoint of the tile size: the processor builds the base crop and a single tile.
        pixels = image_processor(
            images=images, image_grid_pinpoints=[[size, size]], return_tensors="pt"
        )["pixel_values"]
        return torch.as_tensor(pixels)[:, 0]

    def frame_features(self, pixel_values: Tensor) -> Tensor:
        """Every frame's base crop through tower -> tap -> connector, without AnyRes packing:
        ``[T, 3, S, S] -> [T, N, llm_dim]``."""
        grid = checked_grid(pixel_values, self.config.vision_config)
        tap = self.connector.make_tap(self.vision_tower)
        pixels = pixel_values.to(device=self.vision_tower.device, dtype=self.vision_tower.dtype)
        return self.connector(tap(pixels), grid)

    def image_features(self, image_processor: Any, image: Any) -> Tensor:
        """One image through AnyRes crops, packing and newline tokens: ``[1, N, llm_dim]``."""
        inputs = image_processor(images=[image], return_tensors="pt")
        pixels = torch.as_tensor(inputs["pixel_values"]).to(self.vision_tower.device)
        sizes = torch.as_tensor(inputs["image_sizes"])
        return self.get_image_features(pixels, image_sizes=sizes).pooler_output[0][None]

    def check_image_tokens(
        self, input_ids: Tensor | None, pixel_values: Tensor | None, image_sizes: Any
    ) -> None:
        """Before any tensor work: the prompt's image tokens must equal what the images fill."""
        if input_ids is None or pixel_values is None:
            return
        self._crops(pixel_values, image_sizes)  # layout, sizes and crop counts
        found = int((input_ids == self.config.image_token_id).sum())
        per_image = [self.image_token_count(size) for size in image_sizes]
        if found != sum(per_image):
            raise ValueError(
                f"the prompt holds {found} image tokens but the {len(per_image)} image(s) fill "
                f"{sum(per_image)} ({per_image} with this connector); build the prompt with "
                "DenseLlavaNextProcessor so the counts agree"
            )


class DenseLlavaNextForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, LlavaNextForConditionalGeneration
):
    """HF ``LlavaNextForConditionalGeneration`` with a Dense Connector (``"dense_llava_next"``)."""

    config_class = DenseLlavaNextConfig

    base_model_class = DenseLlavaNextModel


def from_llava_next(
    model: LlavaNextForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseLlavaNextForConditionalGeneration:
    """A Dense LLaVA-NeXT around an existing HF LLaVA-NeXT (tower, LLM, head and
    ``image_newline`` shared; projector weights reused when their shapes fit), as
    :func:`mmconnect.integrations.families.llava.from_llava`."""
    return convert_model(
        model, connector, DenseLlavaNextForConditionalGeneration, LlavaNextForConditionalGeneration
    )


class DenseLlavaNextProcessor(LlavaNextProcessor):
    """``LlavaNextProcessor`` whose ``<image>`` expansion follows the connector's AnyRes count.

    Args:
        connector: the connector config (dict or :class:`ConnectorConfig`); saved with the processor.
        patch_size: the vision tower's patch size.
        chat_template: as for ``LlavaNextProcessor`` (saved and reloaded with the processor).
        image_token: as for ``LlavaNextProcessor``.
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
        self._connector_config = processor_connector(
            connector, patch_size, "DenseLlavaNextProcessor"
        )
        self.connector = self._connector_config.to_dict()  # saved with the processor
        kwargs.pop("vision_feature_select_strategy", None)
        kwargs.pop("num_additional_image_tokens", None)
        # "full" and no additional tokens: HF's count adjustments for CLS must not apply here.
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="full",
            num_additional_image_tokens=0,
            chat_template=chat_template,
            image_token=image_token,
            **kwargs,
        )

    def _get_number_of_features(
        self, orig_height: int, orig_width: int, height: int, width: int
    ) -> int:
        grid = (height // self.patch_size, width // self.patch_size)
        return anyres_token_count(
            self._connector_config,
            (orig_height, orig_width),
            self.image_processor.image_grid_pinpoints,
            height,
            grid,
        )


def _pair(size: Any) -> tuple[int, int]:
    values = size.tolist() if hasattr(size, "tolist") else list(size)
    return int(values[0]), int(values[1])


#: The LLaVA-NeXT family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseLlavaNextConfig,
    model_class=DenseLlavaNextModel,
    generation_class=DenseLlavaNextForConditionalGeneration,
    processor_class=DenseLlavaNextProcessor,
    source_class=LlavaNextForConditionalGeneration,
    convert=from_llava_next,
    fixed_image_tokens=False,
    description="LLaVA-NeXT / AnyRes (HF LlavaNextForConditionalGeneration) with a Dense Connector",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
