"""Hugging Face InternVL (InternVL 2.5 / 3) with a Dense Connector in place of its projector.

``DenseInternVLForConditionalGeneration`` is an HF ``InternVLForConditionalGeneration`` whose
``multi_modal_projector`` is a :class:`mmconnect.DenseConnector` fed by a
:class:`mmconnect.MultiLayerFeatureTap` on its InternViT tower. InternVL tiles every image
(dynamic resolution): its processor cuts an image into ``cols x rows`` tiles of the tower's size
(the grid whose aspect ratio is closest to the image's, ``min_tiles <= cols * rows <=
max_tiles``) plus a thumbnail of the whole image when there is more than one tile, and the model
sees every tile as one image of the batch, ``pixel_values`` ``[tiles, 3, S, S]``. Each tile goes
through tower -> tap -> connector alone and fills ``connector.num_tokens(grid)`` tokens
(InternVL's native pixel shuffle + MLP: 256 on a 448 px tile of 14 px patches), so an image
fills ``tiles x`` that many ``<IMG_CONTEXT>`` tokens between its ``<img>`` and ``</img>``. Video
frames are single tiles.

The native connector is the zoo's ``pixel_shuffle_mlp``
(:class:`mmconnect.zoo.pixel_shuffle.PixelShuffleMLP`) behind a single-layer fusion; with
InternVL's weights (:func:`from_internvl` copies them through
:func:`mmconnect.zoo.pixel_shuffle.internvl_state_from_hf`) the Dense model gives the stock
model's logits. ``model_type="dense_internvl"`` is registered with the Auto classes on import.

Examples:
    >>> dense = from_internvl(internvl, "dc-dci+pixel-shuffle-mlp-internvit-300m")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from PIL import Image
from torch import Tensor, nn
from transformers import (
    AutoModel,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLModel,
    InternVLProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.internvl.modeling_internvl import InternVLPreTrainedModel
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector, SingleLayerSpec
from mmconnect.checkpoint import shape_problems
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    attach_connector,
    check_connector_fits,
    check_pixel_values,
    checked_forward,
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
from mmconnect.validation import check_int, check_size_pair
from mmconnect.zoo.pixel_shuffle import PixelShuffleMLPSpec, internvl_state_from_hf

logger = logging.getLogger(__name__)

MODEL_TYPE = "dense_internvl"

#: InternVL's processors tile an image into at least 1 and at most 12 tiles (GotOcr2's
#: ``min_patches`` / ``max_patches``), the defaults of :class:`DenseInternVLConfig`.
DEFAULT_MIN_TILES, DEFAULT_MAX_TILES = 1, 12


# ---------------------------------------------------------------------------- tiling


def tile_count(image_size: Sequence[int], tile_side: int, min_tiles: int, max_tiles: int) -> int:
    """Tiles InternVL's processor makes of an image of ``(height, width)`` pixels.

    The image is resized to the ``cols x rows`` canvas of ``tile_side`` tiles whose aspect ratio
    ``cols / rows`` is closest to the image's among ``min_tiles <= cols * rows <= max_tiles``
    (ties go to more tiles while the image covers more than half of the canvas), as HF's
    ``GotOcr2ImageProcessor`` with ``crop_to_patches=True`` does; more than one tile adds the
    thumbnail (the whole image at ``tile_side``). ``max_tiles=1`` is one tile, the whole image.

    Raises:
        ValueError: ``image_size`` is no pair of positive ints, or the tile bounds are not
            ``1 <= min_tiles <= max_tiles``.
    """
    height, width = check_size_pair(image_size, "image_size")
    _check_tile_bounds(min_tiles, max_tiles)
    if max_tiles == 1:
        return 1
    columns, rows = get_optimal_tiled_canvas(
        (height, width), (tile_side, tile_side), min_tiles, max_tiles
    )
    return columns * rows + 1 if columns * rows > 1 else 1


def _check_tile_bounds(min_tiles: Any, max_tiles: Any) -> None:
    check_int(min_tiles, "min_tiles", minimum=1)
    check_int(max_tiles, "max_tiles", minimum=1)
    if min_tiles > max_tiles:
        raise ValueError(
            f"min_tiles={min_tiles} is larger than max_tiles={max_tiles}; InternVL tiles an "
            "image into min_tiles..max_tiles tiles"
        )


def _tile_side(vision_config: Any) -> int:
    """The tower's square tile side; InternVL's tiles (and HF's shuffle) are square.

    Raises:
        ValueError: ``vision_config.image_size`` is not square.
    """
    height, width = check_size_pair(vision_config.image_size, "vision_config.image_size")
    if height != width:
        raise ValueError(
            f"vision_config.image_size={[height, width]} is not square; InternVL's processor "
            "cuts square tiles (GotOcr2ImageProcessor size height == width)"
        )
    return height


# ---------------------------------------------------------------------------- config


def native_connector(config: InternVLConfig) -> ConnectorConfig:
    """InternVL's own connector for ``config``'s towers, through the zoo.

    ``hidden_states[vision_feature_layer]`` (layer ``L`` is the tower's ``last_hidden_state``,
    as HF's ``vision_feature_layer=-1`` reads it), pixel shuffle by ``1 / downsample_ratio``,
    LayerNorm, Linear, ``projector_hidden_act``, Linear (``pixel_shuffle_mlp``).

    Raises:
        ValueError: ``vision_feature_layer`` is a list (HF's InternVL reads one layer), or
            ``1 / downsample_ratio`` is not a whole number, or ``vision_feature_layer`` is the
            positive index ``L`` of a tower with a final LayerNorm (HF then reads the last
            block's raw output, which a Dense model's layer ``L``, the normed output, is not).
    """
    layer = config.vision_feature_layer
    if isinstance(layer, list | tuple):
        raise ValueError(
            f"vision_feature_layer={layer!r}: HF's InternVL reads one layer; pass connector= "
            "for a multi-layer connector (e.g. the preset dc-dci+pixel-shuffle-mlp-internvit-300m)"
        )
    depth = config.vision_config.num_hidden_layers
    if layer == depth and not config.vision_config.use_mean_pooling:
        raise ValueError(
            f"vision_feature_layer={layer} reads the last block's output before the tower's final "
            f"LayerNorm (use_mean_pooling=False), but a Dense model's layer {depth} is the tower's "
            "output after it (as vision_feature_layer=-1 reads it); no Dense layer index gives "
            "the un-normed last block"
        )
    factor = round(1 / config.downsample_ratio)
    if abs(factor * config.downsample_ratio - 1) > 1e-9:
        raise ValueError(
            f"downsample_ratio={config.downsample_ratio} is not 1 / a whole number; the pixel "
            "shuffle folds factor x factor tokens into one (InternVL: 0.5)"
        )
    return ConnectorConfig(
        fusion=SingleLayerSpec(final_layer=layer),
        projector=PixelShuffleMLPSpec(factor=factor, activation=config.projector_hidden_act),
        vision_dim=config.vision_config.hidden_size,
        llm_dim=config.text_config.hidden_size,
        num_layers=config.vision_config.num_hidden_layers,
    )


@strict
class DenseInternVLConfig(ConnectorConfigMixin, InternVLConfig):
    """``InternVLConfig`` plus ``connector`` (a :class:`mmconnect.ConnectorConfig` as a dict) and
    the tiling its image-token counts assume.

    Without ``connector`` InternVL's native connector is used (:func:`native_connector`).
    ``image_seq_length`` is set to the connector's tokens per tile.

    Attributes:
        connector: the connector config as a dict.
        min_tiles, max_tiles: the tiles per image the processor makes
            (``GotOcr2ImageProcessor``'s ``min_patches`` / ``max_patches``; InternVL's defaults
            1 and 12), which :meth:`DenseInternVLModel.image_token_count` counts with.

    Raises:
        ValueError: the connector does not fit the towers, injects DeepStack residuals, the
            tower's ``image_size`` is not square, or the tile bounds are wrong.
    """

    model_type = MODEL_TYPE
    connector: dict | None = None
    min_tiles: int = DEFAULT_MIN_TILES
    max_tiles: int = DEFAULT_MAX_TILES

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        _tile_side(self.vision_config)
        _check_tile_bounds(self.min_tiles, self.max_tiles)
        if self.connector is None:
            self.connector = native_connector(self).to_dict()
        attach_connector(self)
        refuse_injection(
            self.connector_config,
            "Dense InternVL",
            "its forward does not add per-level residuals at the image positions (not implemented)",
        )


# ---------------------------------------------------------------------------- model


class DenseInternVLModel(DenseInitMixin, CheckedLoadingMixin, DenseFamilyModel, InternVLModel):
    """HF ``InternVLModel`` whose ``multi_modal_projector`` is a :class:`mmconnect.DenseConnector`
    run on every tile.

    ``forward`` has the stock signature and checks the prompt's image tokens (tiles times the
    connector's tokens per tile) before the tower runs.
    """

    config_class = DenseInternVLConfig
    model_type = MODEL_TYPE

    def __init__(self, config: DenseInternVLConfig) -> None:
        # InternVLModel.__init__ would build the stock projector.
        InternVLPreTrainedModel.__init__(self, config)
        connector_config = config.connector_config
        check_connector_fits(connector_config, config.vision_config, config.text_config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = DenseConnector(connector_config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    # ------------------------------------------------------------------ family protocol
    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (stored as ``multi_modal_projector`` for HF compatibility)."""
        return self.multi_modal_projector

    def vision_towers(self) -> dict[str, nn.Module]:
        """The one InternViT tower, run on every tile (family protocol)."""
        return {"vision_tower": self.vision_tower}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector alone trains with the connector (family protocol)."""
        return {"multi_modal_projector": self.multi_modal_projector}

    def tower_geometry(self) -> TowerGeometry:
        """The tower's width, depth and grid per tile (family protocol)."""
        return vision_config_geometry(self.config.vision_config, self.vision_tower)

    def tokens_per_tile(self) -> int:
        """Tokens one tile fills: the connector's count on the tower's grid."""
        return self.connector.num_tokens(native_grid(self.config.vision_config))

    def image_token_count(self, image_size: Sequence[int] | None = None) -> int:
        """``<IMG_CONTEXT>`` tokens one image of ``(height, width)`` pixels fills: its tiles
        (:func:`tile_count` with the config's ``min_tiles`` / ``max_tiles``) times
        :meth:`tokens_per_tile` (the ``<img>`` / ``</img>`` around them are not counted).

        Raises:
            ValueError: ``image_size`` is missing (the tiling depends on it).
        """
        if image_size is None:
            raise ValueError(
                "image_size is required: an InternVL image's token count depends on its "
                "(height, width) through the dynamic tiling"
            )
        tiles = tile_count(
            image_size,
            _tile_side(self.config.vision_config),
            self.config.min_tiles,
            self.config.max_tiles,
        )
        return tiles * self.tokens_per_tile()

    # ------------------------------------------------------------------ checks
    def check_pixel_values(self, pixel_values: Any) -> tuple[int, int]:
        """``pixel_values`` must be ``[tiles, 3, S, S]`` at the tower's tile side; returns the
        tower's grid per tile."""
        vision = self.config.vision_config
        check_pixel_values(
            pixel_values,
            _tile_side(vision),
            channels=vision.num_channels,
            what="InternVL's tower (one row per tile)",
            leading="tiles",
        )
        return native_grid(vision)

    def check_image_tokens(
        self, input_ids: Tensor | None, pixel_values: Tensor | None, image_sizes: Any = None
    ) -> None:
        """Before any tensor work: the prompt's ``<IMG_CONTEXT>`` tokens must equal what the
        tiles fill (``image_sizes`` is not used: InternVL's tiles carry no image boundaries).

        Raises:
            ValueError: bad ``pixel_values``, or the counts differ (both named).
        """
        if input_ids is None or pixel_values is None:
            return
        self.check_pixel_values(pixel_values)
        found = int((input_ids == self.config.image_token_id).sum())
        tiles, per_tile = pixel_values.shape[0], self.tokens_per_tile()
        if found != tiles * per_tile:
            raise ValueError(
                f"the prompt holds {found} image tokens but the {tiles} tile(s) in pixel_values "
                f"fill {tiles * per_tile} ({per_tile} per tile with this connector); build the "
                "prompt with DenseInternVLProcessor so the counts agree"
            )

    forward = checked_forward(InternVLModel.forward)

    # ------------------------------------------------------------------ image path
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Every tile through tap -> connector; returns what HF InternVL's
        ``get_image_features`` does.

        ``[tiles, 3, S, S]`` -> ``pooler_output``: ``[tiles, tokens, llm_dim]``;
        ``last_hidden_state``: the connector's final layer ``[tiles, h*w, vision_dim]`` (CLS
        dropped); ``hidden_states`` / ``attentions`` when ``output_hidden_states`` /
        ``output_attentions`` ask for them (the tower then runs in full, otherwise it stops
        after the deepest layer the connector reads); a tuple when ``return_dict=False``. The
        layers come from the connector config; layer ``L`` is the tower's output after its
        ``layernorm`` (an identity in InternViT-300M, which mean-pools), as HF reads
        ``vision_feature_layer=-1``. ``vision_feature_select_strategy`` is not used (the tap
        drops the CLS token by structure).

        Raises:
            ValueError: bad ``pixel_values``, another ``vision_feature_layer`` or
                ``interpolate_pos_encoding``.
        """
        reject_feature_layer(self.config, vision_feature_layer)
        reject_interpolation(kwargs)
        grid = self.check_pixel_values(pixel_values)
        output_norm = self.vision_tower.layernorm
        features, outputs = tower_features(
            self.connector,
            self.vision_tower,
            pixel_values.to(self.vision_tower.dtype),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
            final_norm=None if isinstance(output_norm, nn.Identity) else output_norm,
        )
        outputs.pooler_output = self.connector(features, grid)
        return outputs

    # ------------------------------------------------------------------ video frames
    def frame_pixel_values(self, image_processor: Any, images: list[Image.Image]) -> Tensor:
        """Each frame as one tile (the whole frame at the tile size, no tiling), as InternVL's
        video path: ``[T, 3, S, S]``."""
        pixels = image_processor(images=images, crop_to_patches=False, return_tensors="pt")
        return torch.as_tensor(pixels["pixel_values"])

    def image_features(self, image_processor: Any, image: Image.Image) -> Tensor:
        """One image's tokens, every tile's in order (thumbnail last), as the processor's
        prompt places them: ``[1, tiles * N, llm_dim]``."""
        inputs = image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
        pixels = torch.as_tensor(inputs["pixel_values"]).to(self.vision_tower.device)
        tokens = self.get_image_features(pixels).pooler_output
        return tokens.reshape(1, -1, tokens.shape[-1])


class DenseInternVLForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, InternVLForConditionalGeneration
):
    """HF ``InternVLForConditionalGeneration`` with a Dense Connector (``"dense_internvl"``)."""

    config_class = DenseInternVLConfig

    base_model_class = DenseInternVLModel


# ---------------------------------------------------------------------------- conversion


def _reuse_internvl_projector(source: nn.Module, connector: DenseConnector) -> bool:
    """Copy InternVL's projector into a ``pixel_shuffle_mlp`` connector of the same shapes."""
    if not isinstance(connector.config.projector, PixelShuffleMLPSpec):
        logger.info(
            "not reusing InternVL's projector weights: the connector's projector is %r",
            connector.config.projector.name,
        )
        return False
    state = internvl_state_from_hf(source.state_dict())
    problems = shape_problems(
        {key: tuple(value.shape) for key, value in state.items()},
        {key: tuple(value.shape) for key, value in connector.projector.state_dict().items()},
        where="in InternVL's projector",
    )
    if problems:
        logger.warning(
            "not reusing InternVL's projector weights (%s); the connector starts from its "
            "initialisation",
            "; ".join(problems),
        )
        return False
    with torch.no_grad():
        connector.projector.load_state_dict(state)
    return True


def from_internvl(
    model: InternVLForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseInternVLForConditionalGeneration:
    """A Dense InternVL built around an existing HF InternVL.

    The InternViT tower, LLM and LM head are the source model's own modules (shared, not
    copied). When the connector's projector is InternVL's (``pixel_shuffle_mlp`` of the same
    shapes: the native connector, or another single-layer fusion into it) InternVL's projector
    weights are copied into it, so :func:`native_connector` reproduces the source's logits.

    Args:
        model: an HF ``InternVLForConditionalGeneration``.
        connector: a :class:`ConnectorConfig` or a preset name (resized to the model's widths).

    Raises:
        TypeError: ``model`` is not an HF InternVL, or ``connector`` no config or name.
        ValueError: the connector does not fit the towers (a preset for another tower depth
            names both depths).
    """
    return convert_model(
        model,
        connector,
        DenseInternVLForConditionalGeneration,
        InternVLForConditionalGeneration,
        reuse_projector=_reuse_internvl_projector,
    )


# ---------------------------------------------------------------------------- processor


class DenseInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` whose ``<IMG_CONTEXT>`` run per tile is the connector's token count.

    Every tile (and every video frame) fills ``connector.num_tokens(grid)`` tokens, with
    ``grid`` the image processor's tile side over ``patch_size``; the stock processor's
    ``image_seq_length`` is set from it.

    Args:
        image_processor: InternVL's ``GotOcr2ImageProcessor`` (square ``size``).
        tokenizer: a tokenizer with InternVL's ``start_image_token``, ``end_image_token``,
            ``context_image_token`` and ``video_token``.
        video_processor: ``InternVLVideoProcessor`` (``None`` for images only); it must resize
            frames to the image processor's tile size.
        patch_size: the vision tower's patch size.
        connector: the connector config as a dict or :class:`ConnectorConfig`; saved with the
            processor.
        chat_template: as for ``InternVLProcessor``.

    Raises:
        ValueError: ``connector`` or ``patch_size`` missing, a non-square tile size or one the
            patch size does not divide, or a video processor resizing frames to another size.
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
        **kwargs: Any,
    ) -> None:
        self._connector_config = processor_connector(
            connector, patch_size, "DenseInternVLProcessor"
        )
        self.connector = self._connector_config.to_dict()  # saved with the processor
        self.patch_size = check_int(patch_size, "patch_size", minimum=1)
        side = _processor_side(image_processor, "image_processor")
        if side % patch_size:
            raise ValueError(
                f"the image processor's tile side {side} is not a multiple of patch_size="
                f"{patch_size}; InternVL's tower needs whole patches"
            )
        if (
            video_processor is not None
            and _processor_side(video_processor, "video_processor") != side
        ):
            raise ValueError(
                f"video_processor resizes frames to {dict(video_processor.size)} but the image "
                f"processor's tiles are {side}x{side}; every frame is one tile, so set the video "
                f"processor's size to {{'height': {side}, 'width': {side}}}"
            )
        kwargs.pop("image_seq_length", None)  # a saved processor's: derived from the connector
        super().__init__(
            image_processor,
            tokenizer,
            video_processor,
            image_seq_length=self._connector_config.num_tokens(
                (side // patch_size, side // patch_size)
            ),
            chat_template=chat_template,
            **kwargs,
        )


def _processor_side(processor: Any, argument: str) -> int:
    size = getattr(processor, "size", None)
    height, width = (getattr(size, "height", None), getattr(size, "width", None))
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
    if height is None or height != width:
        raise ValueError(
            f"{argument}.size must be a square {{'height': S, 'width': S}} (InternVL's tiles), "
            f"got {size!r}"
        )
    return int(height)


#: The InternVL family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseInternVLConfig,
    model_class=DenseInternVLModel,
    generation_class=DenseInternVLForConditionalGeneration,
    processor_class=DenseInternVLProcessor,
    source_class=InternVLForConditionalGeneration,
    convert=from_internvl,
    fixed_image_tokens=False,
    description="InternVL 2.5 / 3 (HF InternVLForConditionalGeneration) with a Dense Connector",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
