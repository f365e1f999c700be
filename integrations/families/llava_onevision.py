"""Hugging Face LLaVA-OneVision with a Dense Connector on every crop and every video frame.

``DenseLlavaOnevisionForConditionalGeneration`` is an HF
``LlavaOnevisionForConditionalGeneration`` whose projector is a :class:`mmconnect.DenseConnector`.
OneVision's three visual paths keep their stock layout around the connector:

* **one image in a sample** (AnyRes): base crop and tiles each go through tower -> connector,
  then :func:`~mmconnect.integrations.families.anyres.pack_anyres` stitches the tiles, crops the
  padding, caps the map at ``anyres_max_N`` (OneVision: 9 crops' worth of tokens, resized
  bilinearly beyond that) and appends the learned ``image_newline`` per row;
* **several images in a sample** (``batch_num_images`` > 1): each image is one crop, its tokens
  followed by one ``image_newline``;
* **video**: every frame through tower -> connector (the DC fusion runs first), then the frame's
  token grid is resized bilinearly to ``ceil(h/2) x ceil(w/2)`` (OneVision's ``apply_pooling``,
  the pooling of the zoo's ``onevision_pool`` projector) and one ``image_newline`` closes each
  video.

With the native connector (HF ``hidden_states[-1]`` of the 26-block SigLIP tower, LLaVA's
``mlp2x_gelu``) the logits equal the stock model's. STI's pooled tokens form no grid that the
video pooling and the ``anyres_max`` resize could work on, and DeepStack residuals would have to
follow both, so such connectors are refused when the config is built. ``model_type =
"dense_llava_onevision"`` is registered with the Auto classes on import;
:func:`from_llava_onevision` converts an existing model.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import (
    AutoModel,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector, find_encoder_blocks
from mmconnect.integrations.families.anyres import (
    anyres_token_count,
    check_anyres_max,
    check_image_sizes,
    check_pinpoints,
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
    checked_grid,
    convert_model,
    native_grid,
    processor_connector,
    refuse_injection,
    reject_feature_layer,
    reject_interpolation,
    reuse_mlp_projector,
    tower_features,
)
from mmconnect.integrations.families.protocol import (
    DenseFamilyModel,
    Family,
    TowerGeometry,
    register_family,
    vision_config_geometry,
)
from mmconnect.validation import check_sequence
from mmconnect.zoo.pooled import onevision_pool_state_from_hf

logger = logging.getLogger(__name__)

MODEL_TYPE = "dense_llava_onevision"

#: OneVision pools each video frame's token grid by 2 per side (``ceil(h/2) x ceil(w/2)``).
VIDEO_POOL_STRIDE = 2


# ---------------------------------------------------------------------------- video pooling


def video_frame_grid(
    connector: DenseConnector | ConnectorConfig, encoder_grid: tuple[int, int]
) -> tuple[int, int]:
    """The ``(rows, columns)`` of one video frame's tokens: the connector's token grid for
    ``encoder_grid``, pooled to ``ceil(h / 2) x ceil(w / 2)`` (27x27 -> 14x14)."""
    config = connector.config if isinstance(connector, DenseConnector) else connector
    height, width = config.token_grid(encoder_grid)
    return math.ceil(height / VIDEO_POOL_STRIDE), math.ceil(width / VIDEO_POOL_STRIDE)


def pool_frames(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """OneVision's per-frame pooling: ``[frames, h*w, D] -> [frames, ceil(h/2)*ceil(w/2), D]``.

    The ``(h, w)`` token map is resized bilinearly (``align_corners=False``, no antialiasing),
    as HF's ``apply_pooling`` and the zoo's ``onevision_pool`` projector do.
    """
    height, width = grid
    target = math.ceil(height / VIDEO_POOL_STRIDE), math.ceil(width / VIDEO_POOL_STRIDE)
    maps = rearrange(tokens, "f (h w) d -> f d h w", h=height, w=width)
    pooled = F.interpolate(maps, size=target, mode="bilinear")
    return rearrange(pooled, "f d h w -> f (h w) d")


# ---------------------------------------------------------------------------- config


@strict
class DenseLlavaOnevisionConfig(ConnectorConfigMixin, LlavaOnevisionConfig):
    """``LlavaOnevisionConfig`` plus ``connector`` (a :class:`mmconnect.ConnectorConfig` as a
    dict) and ``image_seq_length`` (the connector's tokens per crop, derived from it).

    Without ``connector`` the model gets OneVision's own: ``vision_feature_layer`` (-1: the
    last of the tower's 26 blocks, before ``post_layernorm``) through LLaVA's ``mlp2x_gelu``.

    Raises:
        ValueError: a pinpoint that is not a multiple of the tile size, a ``vision_aspect_ratio``
            other than ``"anyres_max_N"``, a connector whose tokens do not all form a grid
            (STI) or one with a DeepStack ``injection``.
    """

    model_type = MODEL_TYPE
    connector: dict | None = None
    image_seq_length: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        attach_connector(self)
        connector = self.connector_config
        refuse_injection(
            connector,
            "Dense LLaVA-OneVision",
            "AnyRes packing, the anyres_max resize and the video pooling rearrange each image's "
            "tokens, so per-level residuals would have to follow them (not implemented)",
        )
        extra = connector.extra_tokens(native_grid(self.vision_config))
        if extra:
            raise ValueError(
                f"Dense LLaVA-OneVision needs every connector token on a grid, but fusion "
                f"{connector.fusion.kind!r} adds {extra} pooled tokens per crop after the grid: "
                "OneVision resizes each image's token map (anyres_max) and pools each video "
                "frame's, which tokens outside the grid cannot follow; use SCI, DCI or a "
                "one-layer fusion"
            )
        check_pinpoints(self.image_grid_pinpoints, self.vision_config.image_size)
        check_anyres_max(self.vision_aspect_ratio)


# ---------------------------------------------------------------------------- input checks

#: The arguments of the stock ``forward`` that the token check reads, in its order.
_CHECKED_ARGUMENTS = (
    "input_ids",
    "pixel_values",
    "image_sizes",
    "batch_num_images",
    "pixel_values_videos",
)


def _checked_forward(stock_forward: Callable) -> Callable:
    """``stock_forward`` with ``check_image_tokens`` (images and videos) first; the stock
    signature is kept (as :func:`mmconnect.integrations.families.base.checked_forward`, which
    passes images only)."""
    signature = inspect.signature(stock_forward)

    @functools.wraps(stock_forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        self.check_image_tokens(*(arguments.get(name) for name in _CHECKED_ARGUMENTS))
        return stock_forward(self, *args, **kwargs)

    return forward


def _check_batch_num_images(batch_num_images: Any, images: int) -> list[int]:
    """Images per sample, as positive ints adding up to ``images``."""
    values = batch_num_images.tolist() if hasattr(batch_num_images, "tolist") else batch_num_images
    check_sequence(values, "batch_num_images", of="the number of images of each sample")
    if not all(isinstance(value, int) and value >= 1 for value in values):
        raise ValueError(
            f"batch_num_images must hold a positive int per sample with images, got {values!r}"
        )
    if sum(values) != images:
        raise ValueError(
            f"batch_num_images={values} counts {sum(values)} images but image_sizes holds "
            f"{images}; pass the processor's batch_num_images and image_sizes together"
        )
    return values


def _pair(size: Any) -> tuple[int, int]:
    values = size.tolist() if hasattr(size, "tolist") else list(size)
    return int(values[0]), int(values[1])


# ---------------------------------------------------------------------------- model


class DenseLlavaOnevisionModel(
    DenseInitMixin, CheckedLoadingMixin, DenseFamilyModel, LlavaOnevisionModel
):
    """HF ``LlavaOnevisionModel`` with a Dense Connector per AnyRes crop and per video frame.

    ``forward`` has the stock signature and checks the prompt's image and video tokens before
    the tower runs.
    """

    config_class = DenseLlavaOnevisionConfig
    model_type = MODEL_TYPE

    def __init__(self, config: DenseLlavaOnevisionConfig) -> None:
        # LlavaOnevisionModel.__init__ would build the stock projector first.
        LlavaOnevisionPreTrainedModel.__init__(self, config)
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

    # ------------------------------------------------------------------ family protocol
    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (stored as ``multi_modal_projector`` for HF compatibility)."""
        return self.multi_modal_projector

    def vision_towers(self) -> dict[str, nn.Module]:
        """The one vision tower, run on every crop and frame (family protocol)."""
        return {"vision_tower": self.vision_tower}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector alone trains with the connector (family protocol); the learned
        ``image_newline`` belongs to the LLM side, as in HF LLaVA-OneVision."""
        return {"multi_modal_projector": self.multi_modal_projector}

    def tower_geometry(self) -> TowerGeometry:
        """The vision tower's width, depth and native grid per crop (family protocol)."""
        return vision_config_geometry(self.config.vision_config, self.vision_tower)

    @property
    def max_crops(self) -> int:
        """``N`` of the config's ``vision_aspect_ratio = "anyres_max_N"``."""
        return check_anyres_max(self.config.vision_aspect_ratio)

    def image_token_count(self, image_size: Any = None) -> int:
        """Visual tokens of an image of original ``(height, width)`` pixels that is alone in its
        sample (AnyRes with the ``anyres_max`` cap; the size is required). An image in a sample
        with several images fills :meth:`multi_image_token_count` instead.

        Raises:
            ValueError: ``image_size`` is missing or not two positive ints.
        """
        if image_size is None:
            raise ValueError(
                "image_size is required: a LLaVA-OneVision image's token count depends on its "
                "(height, width) through the AnyRes tiling and the anyres_max cap"
            )
        vision = self.config.vision_config
        return anyres_token_count(
            self.connector,
            _pair(image_size),
            self.config.image_grid_pinpoints,
            vision.image_size,
            native_grid(vision),
            max_crops=self.max_crops,
        )

    def multi_image_token_count(self) -> int:
        """Visual tokens of an image in a sample with several images: one crop, then one
        ``image_newline``."""
        return self.connector.num_tokens(native_grid(self.config.vision_config)) + 1

    def video_token_count(self, frames: int) -> int:
        """Visual tokens of a video of ``frames`` frames: the pooled grid per frame, then one
        ``image_newline``."""
        grid = video_frame_grid(self.connector, native_grid(self.config.vision_config))
        return frames * math.prod(grid) + 1

    # ------------------------------------------------------------------ images
    def _crops(
        self, pixel_values: Tensor, image_sizes: Any, batch_num_images: Any
    ) -> tuple[Tensor, list[int], list[bool]]:
        """All crops as ``[crops, 3, S, S]``, how many belong to each image and whether each
        image is AnyRes-tiled (alone in its sample).

        ``pixel_values`` is the processor's ``[images, max crops, 3, S, S]`` (padded) or the crops
        of all images concatenated, ``[crops, 3, S, S]``.

        Raises:
            ValueError: ``image_sizes`` missing or not positive ``(height, width)`` pairs,
                ``batch_num_images`` that does not add up to the images, or ``pixel_values`` of
                another layout, channel count, size or crop count.
        """
        if image_sizes is None:
            raise ValueError(
                "image_sizes is required for AnyRes: pass the processor's image_sizes ([images, "
                "2], original (height, width) of each image)"
            )
        vision = self.config.vision_config
        tile, channels = vision.image_size, getattr(vision, "num_channels", 3)
        if isinstance(pixel_values, Tensor) and pixel_values.dim() == 5:
            if pixel_values.shape[0] == 0:
                raise ValueError(
                    f"pixel_values holds 0 images (shape {tuple(pixel_values.shape)}); pass at "
                    f"least one image [images, crops, 3, {tile}, {tile}], or pixel_values=None "
                    "for a prompt without images"
                )
            check_pixel_values(pixel_values.flatten(0, 1), tile, channels=channels, leading="crops")
        else:
            check_pixel_values(pixel_values, tile, channels=channels, leading="crops")
        sizes = check_image_sizes(image_sizes)
        tiled = [True] * len(sizes)
        if batch_num_images is not None:
            per_sample = _check_batch_num_images(batch_num_images, len(sizes))
            tiled = [count == 1 for count in per_sample for _ in range(count)]
        pinpoints = self.config.image_grid_pinpoints
        counts = [
            1 + math.prod(tile_grid(size, pinpoints, tile)) if alone else 1
            for size, alone in zip(sizes, tiled, strict=True)
        ]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(counts):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes "
                    f"{len(counts)}"
                )
            if pixel_values.shape[1] < max(counts):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[1]} crops per image but image_sizes "
                    f"need up to {max(counts)} ({counts}); preprocess the images with the "
                    "model's processor"
                )
            pixel_values = torch.cat(
                [crops[:count] for crops, count in zip(pixel_values, counts, strict=True)]
            )
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} crops but image_sizes need "
                f"{sum(counts)} ({counts})"
            )
        return pixel_values, counts, tiled

    forward = _checked_forward(LlavaOnevisionModel.forward)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Tensor,
        image_sizes: Tensor | None = None,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Every crop through tap -> connector, then AnyRes packing with the ``anyres_max``
        cap (or one crop and a newline per image of a multi-image sample); returns what HF
        LLaVA-OneVision's ``get_image_features`` does.

        ``pooler_output``: a list with one ``[tokens, llm_dim]`` tensor per image;
        ``last_hidden_state``: the connector's final layer for every crop, ``[crops, h*w,
        vision_dim]``; ``hidden_states`` / ``attentions`` when asked for (the tower then runs in
        full); a tuple when ``return_dict=False``.

        Raises:
            ValueError: bad ``pixel_values``, ``image_sizes`` or ``batch_num_images`` (as in
                ``forward``), another ``vision_feature_layer``, ``vision_aspect_ratio`` or
                ``interpolate_pos_encoding``.
        """
        reject_feature_layer(self.config, vision_feature_layer)
        reject_interpolation(kwargs)
        if (
            vision_aspect_ratio is not None
            and vision_aspect_ratio != self.config.vision_aspect_ratio
        ):
            raise ValueError(
                f"vision_aspect_ratio={vision_aspect_ratio!r} differs from the config's "
                f"{self.config.vision_aspect_ratio!r}, which the prompt's image-token count "
                "follows; set it in the config instead"
            )
        crops, counts, tiled = self._crops(pixel_values, image_sizes, batch_num_images)
        grid = checked_grid(crops, self.config.vision_config, leading="crops")
        features, outputs = tower_features(
            self.connector,
            self.vision_tower,
            crops.to(self.vision_tower.dtype),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        tokens = self.connector(features, grid)
        crop_grid = self.connector.token_grid(grid)
        packed = []
        for image_crops, size, alone in zip(
            torch.split(tokens, counts), image_sizes, tiled, strict=True
        ):
            if alone:
                packed.append(
                    pack_anyres(
                        image_crops,
                        _pair(size),
                        self.config.image_grid_pinpoints,
                        self.config.vision_config.image_size,
                        crop_grid,
                        self.image_newline,
                        max_crops=self.max_crops,
                    )
                )
            else:
                newline = self.image_newline[None].to(image_crops)
                packed.append(torch.cat([image_crops[0], newline]))
        outputs.pooler_output = packed
        return outputs

    # ------------------------------------------------------------------ videos
    def _video_frames(self, pixel_values_videos: Any) -> tuple[Tensor, int]:
        """``[videos, frames, 3, S, S]`` checked, as ``[videos * frames, 3, S, S]`` and the
        number of videos.

        Raises:
            TypeError: not a tensor.
            ValueError: another layout, channel count or size, or no video or frame.
        """
        vision = self.config.vision_config
        side = vision.image_size
        if not isinstance(pixel_values_videos, Tensor):
            raise TypeError(
                "pixel_values_videos must be a torch.Tensor, got "
                f"{type(pixel_values_videos).__name__}"
            )
        shape = tuple(pixel_values_videos.shape)
        if pixel_values_videos.dim() != 5 or 0 in shape[:2]:
            raise ValueError(
                f"pixel_values_videos must be [videos, frames, 3, {side}, {side}] with at least "
                f"one video and frame, got shape {shape}; preprocess the videos with the "
                "model's processor"
            )
        frames = pixel_values_videos.flatten(0, 1)
        try:
            check_pixel_values(
                frames, side, channels=getattr(vision, "num_channels", 3), leading="frames"
            )
        except ValueError as error:  # the shared check names pixel_values: name this argument
            message = str(error).replace("pixel_values", "pixel_values_videos", 1)
            raise ValueError(message) from None
        return frames, shape[0]

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Every frame through tap -> connector, its token grid pooled 2x bilinearly, one
        ``image_newline`` per video: ``[B, T, 3, S, S] -> pooler_output [B, T*h'*w' + 1, D]``
        (``h' = ceil(h/2)``), as HF's ``get_video_features``; ``last_hidden_state`` is the
        connector's final layer of every frame, ``[B*T, h*w, vision_dim]``.

        Raises:
            TypeError, ValueError: bad ``pixel_values_videos``; another ``vision_feature_layer``
                or ``interpolate_pos_encoding``.
        """
        reject_feature_layer(self.config, vision_feature_layer)
        reject_interpolation(kwargs)
        frames, videos = self._video_frames(pixel_values_videos)
        grid = native_grid(self.config.vision_config)
        features, outputs = tower_features(
            self.connector,
            self.vision_tower,
            frames.to(self.vision_tower.dtype),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        pooled = pool_frames(self.connector(features, grid), self.connector.token_grid(grid))
        pooled = rearrange(pooled, "(b t) n d -> b (t n) d", b=videos)
        newline = self.image_newline.to(pooled)[None, None].expand(videos, 1, -1)
        outputs.pooler_output = torch.cat([pooled, newline], dim=1)
        return outputs

    # ------------------------------------------------------------------ video frames (protocol)
    def frame_pixel_values(self, image_processor: Any, images: list) -> Tensor:
        """Each frame's base crop (the whole frame resized to the tile size): ``[T, 3, S, S]``;
        AnyRes tiles are not used for frames."""
        size = self.config.vision_config.image_size
        # One pinpoint of the tile size: the processor builds the base crop and a single tile.
        pixels = image_processor(
            images=images, image_grid_pinpoints=[[size, size]], return_tensors="pt"
        )["pixel_values"]
        return torch.as_tensor(pixels)[:, 0]

    def frame_features(self, pixel_values: Tensor) -> Tensor:
        """Every frame through tower -> tap -> connector, unpooled (the protocol's training-free
        video answering pools frames itself): ``[T, 3, S, S] -> [T, h*w, llm_dim]``."""
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

    # ------------------------------------------------------------------ token checks
    def check_image_tokens(
        self,
        input_ids: Tensor | None,
        pixel_values: Tensor | None,
        image_sizes: Any,
        batch_num_images: Any = None,
        pixel_values_videos: Tensor | None = None,
    ) -> None:
        """Before any tensor work: the prompt's image and video tokens must equal what the
        images and videos fill.

        Raises:
            ValueError: naming both counts (and the inputs' problems, see ``_crops``).
        """
        if input_ids is None:
            return
        if pixel_values is not None:
            _, _, tiled = self._crops(pixel_values, image_sizes, batch_num_images)
            found = int((input_ids == self.config.image_token_id).sum())
            per_image = [
                self.image_token_count(size) if alone else self.multi_image_token_count()
                for size, alone in zip(image_sizes, tiled, strict=True)
            ]
            if found != sum(per_image):
                raise ValueError(
                    f"the prompt holds {found} image tokens but the {len(per_image)} image(s) "
                    f"fill {sum(per_image)} ({per_image} with this connector); build the prompt "
                    "with DenseLlavaOnevisionProcessor so the counts agree"
                )
        if pixel_values_videos is not None:
            _, videos = self._video_frames(pixel_values_videos)
            found = int((input_ids == self.config.video_token_id).sum())
            expected = videos * self.video_token_count(pixel_values_videos.shape[1])
            if found != expected:
                raise ValueError(
                    f"the prompt holds {found} video tokens but the {videos} video(s) of "
                    f"{pixel_values_videos.shape[1]} frames fill {expected} with this connector; "
                    "build the prompt with DenseLlavaOnevisionProcessor so the counts agree"
                )


class DenseLlavaOnevisionForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, LlavaOnevisionForConditionalGeneration
):
    """HF ``LlavaOnevisionForConditionalGeneration`` with a Dense Connector
    (``"dense_llava_onevision"``)."""

    config_class = DenseLlavaOnevisionConfig

    base_model_class = DenseLlavaOnevisionModel

    def generate(self, inputs: Tensor | None = None, *args: Any, **kwargs: Any):
        """HF ``generate``; the prompt's image and video tokens are checked before the tower
        runs (HF encodes images and videos before the first forward)."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        self.model.check_image_tokens(
            input_ids, *(kwargs.get(name) for name in _CHECKED_ARGUMENTS[1:])
        )
        # Past DenseGenerationMixin.generate, whose check knows neither batch_num_images nor videos.
        return LlavaOnevisionForConditionalGeneration.generate(self, inputs, *args, **kwargs)


# ---------------------------------------------------------------------------- conversion


def from_llava_onevision(
    model: LlavaOnevisionForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseLlavaOnevisionForConditionalGeneration:
    """A Dense LLaVA-OneVision around an existing HF LLaVA-OneVision: tower, LLM, head and
    ``image_newline`` shared; the stock projector's weights are reused when the connector's
    projector is LLaVA's ``mlp2x_gelu`` (as :func:`~mmconnect.integrations.families.llava.from_llava`)
    or the zoo's ``onevision_pool`` of the same depth (through
    :func:`mmconnect.zoo.pooled.onevision_pool_state_from_hf`) and the shapes fit.

    Raises:
        TypeError: ``model`` is no stock ``LlavaOnevisionForConditionalGeneration``.
        ValueError: the connector does not fit the towers (e.g. a preset for SigLIP's 27 blocks
            on OneVision's 26), or ``vision_feature_select_strategy="default"`` on a tower
            without a CLS token (HF would drop a patch token; the connector keeps every patch).
    """
    if isinstance(model, LlavaOnevisionForConditionalGeneration) and not isinstance(
        model, DenseLlavaOnevisionForConditionalGeneration
    ):
        prefix = find_encoder_blocks(model.model.vision_tower).num_prefix_tokens
        if model.config.vision_feature_select_strategy == "default" and not prefix:
            raise ValueError(
                "vision_feature_select_strategy='default' drops the first token, but this tower "
                "has no CLS token, so HF drops a patch token that a Dense Connector keeps; "
                "LLaVA-OneVision uses 'full'"
            )
    return convert_model(
        model,
        connector,
        DenseLlavaOnevisionForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        reuse_projector=functools.partial(
            _reuse_projector, activation=model.config.projector_hidden_act
        ),
    )


def _reuse_projector(source: nn.Module, connector: DenseConnector, *, activation: str) -> bool:
    """Load the stock projector into the new connector: LLaVA's ``mlp2x_gelu`` as for every
    LLaVA family, or the zoo's ``onevision_pool`` (the same two Linears, then the video pooling);
    warn and keep the initialisation when they do not fit."""
    spec = connector.config.projector
    if spec.kind != "onevision_pool":
        return reuse_mlp_projector(source, connector, activation)
    if spec.activation != activation:
        logger.warning(
            "not reusing the projector weights: the source uses %r activation, the connector %r",
            activation,
            spec.activation,
        )
        return False
    try:
        connector.projector.load_state_dict(onevision_pool_state_from_hf(source.state_dict()))
    except (ValueError, RuntimeError) as error:
        logger.warning(
            "not reusing the projector weights (%s); the connector starts from its initialisation",
            error,
        )
        return False
    return True


# ---------------------------------------------------------------------------- processor


class DenseLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` whose ``<image>`` and ``<video>`` expansion follows the
    connector: AnyRes with the ``anyres_max`` cap for an image alone in its sample, one crop and
    a newline per image of a multi-image sample, the pooled grid per frame and a newline per
    video.

    Args:
        image_processor: as for ``LlavaOnevisionProcessor`` (its ``size`` is the crop side).
        tokenizer: as for ``LlavaOnevisionProcessor``.
        video_processor: as for ``LlavaOnevisionProcessor``.
        patch_size: the vision tower's patch size.
        connector: the connector config (dict or :class:`ConnectorConfig`); saved with the
            processor.
        chat_template: as for ``LlavaOnevisionProcessor`` (saved and reloaded with it).
        image_token: the image placeholder (``"<image>"``).
        video_token: the video placeholder (``"<video>"``).
        vision_aspect_ratio: ``"anyres_max_N"``, the cap the model's config uses.

    Raises:
        ValueError: ``connector`` or ``patch_size`` missing, or ``vision_aspect_ratio`` not
            ``"anyres_max_N"``.
    """

    # Every argument that must survive save_pretrained -> from_pretrained is named here: HF
    # passes a saved processor only the arguments its __init__ names.
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        video_processor: Any = None,
        patch_size: int | None = None,
        connector: dict | ConnectorConfig | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        self._connector_config = processor_connector(
            connector, patch_size, "DenseLlavaOnevisionProcessor"
        )
        self.connector = self._connector_config.to_dict()  # saved with the processor
        self.patch_size = patch_size
        self._max_crops = check_anyres_max(vision_aspect_ratio)
        kwargs.pop("vision_feature_select_strategy", None)
        kwargs.pop("num_image_tokens", None)  # derived from the connector below
        size = getattr(image_processor, "size", None) or {}
        tile = size.get("height") or size.get("shortest_edge")
        # "full": HF's count adjustment for a CLS token must not apply here.
        super().__init__(
            image_processor,
            tokenizer,
            video_processor,
            num_image_tokens=None if tile is None else self._crop_tokens(tile, tile),
            vision_feature_select_strategy="full",
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    def _encoder_grid(self, height: int, width: int) -> tuple[int, int]:
        return int(height) // self.patch_size, int(width) // self.patch_size

    def _crop_tokens(self, height: int, width: int) -> int:
        return self._connector_config.num_tokens(self._encoder_grid(height, width))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """``<image>`` repeated as often as the model fills for image ``image_idx``."""
        height, width = image_inputs["pixel_values"][0][0].shape[-2:]
        cumulative, alone = 0, True
        for count in image_inputs["batch_num_images"]:
            if image_idx < cumulative + count:
                alone = count == 1
                break
            cumulative += count
        if not alone:
            return self.image_token * (self._crop_tokens(height, width) + 1)
        size = image_inputs["image_sizes"][image_idx]
        size = size.tolist() if hasattr(size, "tolist") else size
        return self.image_token * self._get_number_of_features(*size, height, width)

    def _get_number_of_features(
        self, orig_height: int, orig_width: int, height: int, width: int
    ) -> int:
        return anyres_token_count(
            self._connector_config,
            (orig_height, orig_width),
            self.image_processor.image_grid_pinpoints,
            height,
            self._encoder_grid(height, width),
            max_crops=self._max_crops,
        )

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        """``<video>`` repeated ``frames * h' * w' + 1`` times (pooled grid, one newline)."""
        video = video_inputs["pixel_values_videos"][video_idx]
        frames = len(video) if isinstance(video, Sequence) else video.shape[0]
        height, width = video[0].shape[-2:]
        grid = video_frame_grid(self._connector_config, self._encoder_grid(height, width))
        return self.video_token * (frames * math.prod(grid) + 1)


#: The LLaVA-OneVision family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseLlavaOnevisionConfig,
    model_class=DenseLlavaOnevisionModel,
    generation_class=DenseLlavaOnevisionForConditionalGeneration,
    processor_class=DenseLlavaOnevisionProcessor,
    source_class=LlavaOnevisionForConditionalGeneration,
    convert=from_llava_onevision,
    fixed_image_tokens=False,
    description=(
        "LLaVA-OneVision (HF LlavaOnevisionForConditionalGeneration) with a Dense Connector on "
        "every AnyRes crop and video frame"
    ),
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
