"""Hugging Face Idefics3 with a Dense Connector in place of its pixel-shuffle connector.

Idefics3 (and SmolVLM, :mod:`mmconnect.integrations.families.smolvlm`, which shares this
module's code) tiles every image: its processor resizes the image so its longest edge is
``size["longest_edge"]``, rounds both sides up to multiples of the tile side
(``max_image_size``, the tower's ``image_size``), cuts ``rows x cols`` tiles in row-major order
and appends the whole image resized to one tile (the global tile); an image no larger than one
tile, or any image with ``do_image_splitting=False``, is that one tile. Every tile goes through
the SigLIP tower on its own, and the native connector (``Idefics3Connector``) maps the tower's
``last_hidden_state`` (after ``post_layernorm``) through a pixel shuffle by ``scale_factor`` and a
bias-free Linear: ``[tiles, h*w, C] -> [tiles, h*w / f**2, D]``.

``DenseIdefics3ForConditionalGeneration`` keeps all of that and puts a
:class:`mmconnect.DenseConnector` under the stock child name ``connector`` (checkpoints keep HF's
``model.connector.`` prefix): the tap reads the tower's blocks, with layer ``L`` (the last) taken
after ``post_layernorm`` (the tap's ``final_norm``), so the native connector is
``SingleLayerSpec(final_layer=L)`` + ``PixelShuffleSpec(factor=scale_factor)``
(:func:`native_connector`) and reproduces the stock logits; Dense fusions (SCI, DCI) feed the
same shuffle (presets in :mod:`mmconnect.tower_presets.idefics3`).

Token bookkeeping: each tile fills the connector's ``num_tokens(tile grid)`` ``<image>`` tokens
(``image_seq_len``, derived from the connector), so an image fills ``tiles * image_seq_len``
(:func:`split_layout` gives ``rows x cols`` for an image size). :class:`DenseIdefics3Processor`
writes the stock prompt layout (``<fake_token_around_image><row_i_col_j>`` + the tile's
``<image>`` tokens, the global tile after ``<global-img>``) with that count and is saved and
reloaded with the model.

``model_type="dense_idefics3"`` is registered with the Auto classes on import;
:func:`from_idefics3` converts an existing model.

Examples:
    >>> dense = from_idefics3(idefics3, "dc-dci+pixel-shuffle-idefics3-364")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import (
    AutoModel,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Model,
    Idefics3Processor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.models.idefics3.modeling_idefics3 import (
    Idefics3PreTrainedModel,
    Idefics3VisionTransformer,
)
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector, SingleLayerSpec
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    check_connector_fits,
    checked_forward,
    native_grid,
    processor_connector,
    refuse_injection,
    reject_interpolation,
    share_sub_configs,
    tower_features,
)
from mmconnect.integrations.families.protocol import (
    DenseFamilyModel,
    Family,
    TowerGeometry,
    register_family,
    vision_config_geometry,
)
from mmconnect.layers import normalize_layers
from mmconnect.validation import check_int_pair, check_positive_int, check_size_pair
from mmconnect.zoo.pixel_shuffle import PixelShuffleSpec, idefics3_state_from_hf

MODEL_TYPE = "dense_idefics3"

#: The processors' cap on an image side before tiling (HF's ``MAX_IMAGE_SIZE``, 4k).
MAX_IMAGE_SIDE = 4096


# ---------------------------------------------------------------------------- connector


def native_connector(config: Any) -> ConnectorConfig:
    """The family's own connector for ``config``'s towers, as a Dense Connector config.

    The tower's output (layer ``L`` = ``num_hidden_layers``, which the tap takes after
    ``post_layernorm``), a pixel shuffle by ``config.scale_factor`` and a bias-free Linear to
    the LLM width: the stock ``Idefics3Connector`` / ``SmolVLMConnector``.
    """
    vision = config.vision_config
    return ConnectorConfig(
        fusion=SingleLayerSpec(final_layer=vision.num_hidden_layers),
        projector=PixelShuffleSpec(factor=config.scale_factor),
        vision_dim=vision.hidden_size,
        llm_dim=config.text_config.hidden_size,
        num_layers=vision.num_hidden_layers,
    )


def is_native_connector(connector: ConnectorConfig, config: Any) -> bool:
    """Whether ``connector`` computes what the stock connector of ``config`` computes (same
    layer, shuffle factor and widths, no resampling or injection)."""
    native = native_connector(config)
    fusion = connector.fusion
    return (
        isinstance(fusion, SingleLayerSpec)
        and tuple(normalize_layers([fusion.final_layer], connector.num_layers, argument="layer"))
        == (connector.num_layers,)
        and connector.projector == native.projector
        and connector.resample is None
        and connector.injection is None
        and (connector.vision_dim, connector.llm_dim, connector.num_layers)
        == (native.vision_dim, native.llm_dim, native.num_layers)
    )


# ---------------------------------------------------------------------------- tiling


def split_layout(
    image_size: Sequence[int], longest_edge: int, tile: int, *, do_image_splitting: bool = True
) -> tuple[int, int]:
    """``(rows, cols)`` of tiles the Idefics3 / SmolVLM image processor cuts an image into;
    ``(0, 0)`` when it keeps the image as one tile.

    The processor's steps, on sizes only: (1) resize so the longest side is ``longest_edge``
    (the other side truncated, then rounded up to even), capped at 4096 px a side; (2) round
    the longer side up to a multiple of ``tile``, set the other from the aspect ratio
    (truncated) and round it up to a multiple of ``tile``; (3) cut ``tile x tile`` tiles when a
    side exceeds ``tile``. Without splitting every image is squared to one tile.

    Args:
        image_size: the original ``(height, width)`` in pixels.
        longest_edge: the image processor's ``size["longest_edge"]``.
        tile: its ``max_image_size["longest_edge"]`` (the tower's ``image_size``).
        do_image_splitting: the image processor's ``do_image_splitting``.

    Raises:
        ValueError, TypeError: ``image_size`` is not two positive ints, or a size is not a
            positive int.
    """
    values = image_size.tolist() if hasattr(image_size, "tolist") else image_size
    height, width = check_int_pair(
        values,
        "image_size",
        hint="the original (height, width) in pixels",
    )
    check_positive_int(longest_edge, "longest_edge")
    check_positive_int(tile, "tile")
    if not do_image_splitting:
        return 0, 0
    height, width = _resize_longest_edge(height, width, longest_edge)
    height, width = _cap_longest_edge(height, width, MAX_IMAGE_SIDE)
    height, width = _round_to_tiles(height, width, tile)
    if height > tile or width > tile:
        return height // tile, width // tile
    return 0, 0


def _resize_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2  # HF rounds the short side up to even
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _cap_longest_edge(height: int, width: int, cap: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > cap:
        width, height = cap, int(cap / aspect)
    elif height > width and height > cap:
        height, width = cap, int(cap * aspect)
    return max(height, 1), max(width, 1)


def _round_to_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def tile_side(vision_config: Any) -> int:
    """The side of the square tiles the tower takes: its ``image_size`` (an int or a square
    ``(height, width)`` pair).

    Raises:
        ValueError: a non-square ``image_size`` (the processors cut square tiles).
    """
    height, width = check_size_pair(vision_config.image_size, "vision_config.image_size")
    if height != width:
        raise ValueError(
            f"vision_config.image_size={[height, width]} is not square; Idefics3 and SmolVLM "
            "tiles are square (max_image_size x max_image_size)"
        )
    return height


def tiles_per_image(layout: tuple[int, int]) -> int:
    """Tiles one image becomes: ``rows * cols`` plus the global tile when split, else 1."""
    rows, cols = layout
    return rows * cols + 1 if rows or cols else 1


# ---------------------------------------------------------------------------- config


class TiledConfigMixin(ConnectorConfigMixin):
    """For the Dense Idefics3 / SmolVLM configs: the connector (native by default), the derived
    ``image_seq_len`` and the tiling the processor applies (``resize_longest_edge``,
    ``do_image_splitting``, which :meth:`DenseIdefics3Model.image_token_count` follows)."""

    family_name: str

    def attach_tiled_connector(self) -> None:
        """Fill ``connector`` (the native one when absent), ``image_seq_len`` and
        ``resize_longest_edge`` (4 tiles, the stock processors' default).

        Raises:
            ValueError: the connector's projector does not fit the tile grid (a shuffle factor
                that does not divide it), it has a DeepStack ``injection``, or a tiling field is
                not a positive int / bool.
        """
        if self.connector is None:
            self.connector = native_connector(self).to_dict()
        if not isinstance(self.connector, ConnectorConfig):
            self.connector = ConnectorConfig.from_dict(self.connector)
        self.connector = self.connector.to_dict()
        connector = self.connector_config
        refuse_injection(
            connector,
            self.family_name,
            "its language model takes the visual tokens in inputs_embeds only (no per-layer "
            "residual path)",
        )
        self.image_seq_len = connector.num_tokens(native_grid(self.vision_config))
        tile = tile_side(self.vision_config)
        if self.resize_longest_edge is None:
            self.resize_longest_edge = 4 * tile
        check_positive_int(
            self.resize_longest_edge,
            "resize_longest_edge",
            hint="the image processor's size['longest_edge']",
        )
        if not isinstance(self.do_image_splitting, bool):
            raise TypeError(
                f"do_image_splitting must be a bool, got {type(self.do_image_splitting).__name__}"
            )


@strict
class DenseIdefics3Config(TiledConfigMixin, Idefics3Config):
    """``Idefics3Config`` plus ``connector`` (a :class:`mmconnect.ConnectorConfig` as a dict).

    Without ``connector`` the native one is used (:func:`native_connector`). Derived and
    added fields:

    * ``image_seq_len``: ``<image>`` tokens per tile, the connector's count on the tile grid;
    * ``resize_longest_edge`` / ``do_image_splitting``: the processor's tiling
      (``size["longest_edge"]``, default 4 tiles, and ``do_image_splitting``), which
      ``image_token_count(image_size)`` follows.
    """

    model_type = MODEL_TYPE
    family_name = "Dense Idefics3"
    connector: dict | None = None
    image_seq_len: int | None = None
    resize_longest_edge: int | None = None
    do_image_splitting: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.attach_tiled_connector()


# ---------------------------------------------------------------------------- model


def check_tiled_pixel_values(pixel_values: Any, tile: int, channels: int = 3) -> None:
    """``pixel_values`` must be ``[batch, tiles, channels, tile, tile]``, checked before any
    tensor work.

    Raises:
        TypeError: not a tensor.
        ValueError: another rank, no batch row or tile, another channel count or tile size.
    """
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    shape = tuple(pixel_values.shape)
    expected = f"[tiles, {channels}, {tile}, {tile}] for each batch row"
    layout = f"[batch, tiles, {channels}, {tile}, {tile}]"
    if pixel_values.dim() != 5:
        hint = (
            ": add the tiles dimension (pixel_values.unsqueeze(1)) or use the model's processor"
            if pixel_values.dim() == 4
            else ""
        )
        raise ValueError(
            f"pixel_values must be {expected}, i.e. {layout} as the processor makes them, got "
            f"shape {shape} ({pixel_values.dim()} dimensions){hint}"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(
            f"pixel_values holds no tile (shape {shape}); pass at least one image {layout}, or "
            "pixel_values=None for a prompt without images"
        )
    if shape[2] != channels:
        raise ValueError(
            f"pixel_values have {shape[2]} channel(s) but the vision tower takes {channels} "
            f"(RGB), {layout}, got shape {shape}: convert the images to RGB before the processor"
        )
    if shape[3:] != (tile, tile):
        raise ValueError(
            f"pixel_values must be {expected} (the vision tower's image_size={tile}, the image "
            f"processor's max_image_size), got shape {shape}: tile the images with the model's "
            "processor at that size (Dense models do not resize or interpolate tiles)"
        )


class TiledDenseModelMixin(DenseFamilyModel):
    """The Dense Idefics3 / SmolVLM inner model: vision tower, Dense Connector and LLM under the
    stock names (``vision_model``, ``connector``, ``text_model``), tile by tile.

    Subclasses set ``processor_name`` (named in prompt-count errors) and
    ``keep_one_tile_when_empty`` (SmolVLM keeps the first tile when every tile is padding, as
    its stock model does).
    """

    processor_name: str
    keep_one_tile_when_empty: bool = False

    def _build_parts(self, config: Any, vision_class: type) -> None:
        """The stock children and attributes, the connector a :class:`DenseConnector`."""
        connector_config = config.connector_config
        check_connector_fits(connector_config, config.vision_config, config.text_config)
        self.padding_idx = config.text_config.pad_token_id
        self.vocab_size = config.text_config.vocab_size
        self.vision_model = vision_class._from_config(config.vision_config)
        self.connector = DenseConnector(connector_config)
        self.text_model = AutoModel.from_config(config.text_config)
        self.image_seq_len = config.image_seq_len
        self.image_token_id = config.image_token_id

    # ------------------------------------------------------------------ family protocol
    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (the stock child name ``connector``)."""
        return self._modules["connector"]

    @property
    def language_model(self) -> nn.Module:
        """The LLM (family protocol; the stock attribute, and checkpoint prefix, is
        ``text_model``)."""
        return self.text_model

    def vision_towers(self) -> dict[str, nn.Module]:
        """The one SigLIP tower, run on every tile (family protocol)."""
        return {"vision_model": self.vision_model}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector alone trains with the connector (family protocol)."""
        return {"connector": self.connector}

    def tower_geometry(self) -> TowerGeometry:
        """The tower's width, depth and grid per tile (family protocol)."""
        return vision_config_geometry(self.config.vision_config, self.vision_model)

    def image_token_count(self, image_size: Sequence[int] | None = None) -> int:
        """``<image>`` tokens one image of original ``(height, width)`` fills: its tiles
        (:func:`split_layout` with the config's ``resize_longest_edge`` and
        ``do_image_splitting``, plus the global tile) times ``image_seq_len``. ``None``: one tile
        (an image without splitting, a video frame).

        Raises:
            ValueError: ``image_size`` is not two positive ints.
        """
        per_tile = self.connector.num_tokens(native_grid(self.config.vision_config))
        if image_size is None:
            return per_tile
        layout = split_layout(
            image_size,
            self.config.resize_longest_edge,
            tile_side(self.config.vision_config),
            do_image_splitting=self.config.do_image_splitting,
        )
        return tiles_per_image(layout) * per_tile

    # ------------------------------------------------------------------ tiles
    def real_tiles(self, pixel_values: Tensor) -> Tensor:
        """``[batch, tiles]``: which tiles hold an image (the processor pads with all-zero
        tiles, which the stock model drops)."""
        self.check_pixel_values(pixel_values)
        real = pixel_values.flatten(2).ne(0).any(-1)
        if self.keep_one_tile_when_empty and not bool(real.any()):
            real = real.clone()
            real.view(-1)[0] = True
        return real

    def check_pixel_values(self, pixel_values: Any) -> None:
        """``pixel_values`` must be ``[batch, tiles, 3, S, S]`` at the tower's ``image_size``."""
        vision = self.config.vision_config
        check_tiled_pixel_values(
            pixel_values, tile_side(vision), getattr(vision, "num_channels", 3)
        )

    def check_image_tokens(
        self, input_ids: Tensor | None, pixel_values: Tensor | None, image_sizes: Any = None
    ) -> None:
        """Before the tower runs: the prompt's ``<image>`` tokens must equal what the real
        tiles of ``pixel_values`` fill (``image_sizes`` is not used by this family).

        Raises:
            ValueError: bad ``pixel_values``, or the counts differ (both named).
        """
        if input_ids is None or pixel_values is None:
            return
        tiles = int(self.real_tiles(pixel_values).sum())
        found = int((input_ids == self.config.image_token_id).sum())
        per_tile = self.image_token_count()
        if found != tiles * per_tile:
            raise ValueError(
                f"the prompt holds {found} image tokens but the {tiles} tile(s) of pixel_values "
                f"fill {tiles * per_tile} ({per_tile} per tile with this connector); build the "
                f"prompt with {self.processor_name} so the counts agree"
            )

    def _checked_tiles(
        self, pixel_values: Tensor, pixel_attention_mask: Tensor | None
    ) -> tuple[Tensor, list[int]]:
        """The real tiles ``[tiles, 3, S, S]`` and how many each batch row holds.

        Raises:
            ValueError: bad ``pixel_values``; no real tile; a ``pixel_attention_mask`` of
                another shape or marking padding inside a real tile (the Dense models take
                whole tiles, as the processor makes them).
        """
        real = self.real_tiles(pixel_values)
        if not bool(real.any()):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} holds only padding tiles "
                "(all zeros); pass the processor's pixel_values, or pixel_values=None for a "
                "prompt without images"
            )
        if pixel_attention_mask is not None:
            expected = (*pixel_values.shape[:2], *pixel_values.shape[3:])
            if tuple(pixel_attention_mask.shape) != expected:
                raise ValueError(
                    f"pixel_attention_mask must be [batch, tiles, height, width] = {list(expected)} "
                    f"like pixel_values, got shape {tuple(pixel_attention_mask.shape)}"
                )
            partial = real & ~pixel_attention_mask.flatten(2).bool().all(-1)
            if bool(partial.any()):
                row, tile = (int(index) for index in partial.nonzero()[0])
                raise ValueError(
                    f"pixel_attention_mask marks padding inside tile {tile} of batch row {row}; "
                    "Dense models take whole tiles of the tower's image_size, as the processor "
                    "makes them (resize the image with the processor instead of padding it)"
                )
        return pixel_values[real], real.sum(dim=1).tolist()

    # ------------------------------------------------------------------ image path
    def get_image_features(
        self,
        pixel_values: Tensor,
        pixel_attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Every real tile through tap -> Dense Connector; returns what the stock
        ``get_image_features`` does.

        ``[batch, tiles, 3, S, S]`` (all-zero tiles are padding and dropped) ->
        ``pooler_output``: one ``[tiles_b * image_seq_len, llm_dim]`` tensor per batch row
        (its tiles' tokens in order); ``last_hidden_state``: the connector's final layer for
        every real tile, ``[tiles, h*w, vision_dim]`` (for the native connector, the tower's
        post-LayerNorm output); ``hidden_states`` / ``attentions`` when asked for (the tower
        then runs in full; otherwise it stops after the deepest layer the connector reads).

        Raises:
            ValueError: bad ``pixel_values`` (as in ``forward``), only padding tiles, a
                ``pixel_attention_mask`` of another shape or marking padding inside a real tile,
                or ``interpolate_pos_encoding``.
        """
        reject_interpolation(kwargs)
        tiles, per_row = self._checked_tiles(pixel_values, pixel_attention_mask)
        grid = native_grid(self.config.vision_config)
        features, outputs = tower_features(
            self.connector,
            self.vision_model,
            tiles.to(self.vision_model.dtype),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
            final_norm=self.vision_model.post_layernorm,
        )
        tokens = self.connector(features, grid)
        outputs.pooler_output = [
            row.reshape(-1, row.shape[-1]) for row in torch.split(tokens, per_row)
        ]
        return outputs

    # ------------------------------------------------------------------ video frames
    def frame_pixel_values(self, image_processor: Any, images: list) -> Tensor:
        """Each frame as one unsplit tile (the whole frame squared to the tile size, as
        SmolVLM's video processor does): ``[T, 3, S, S]``."""
        pixels = image_processor(images=images, do_image_splitting=False, return_tensors="pt")[
            "pixel_values"
        ]
        return torch.as_tensor(pixels).flatten(0, 1)

    def frame_features(self, pixel_values: Tensor) -> Tensor:
        """Every frame (one tile each) through tower -> tap -> connector:
        ``[T, 3, S, S] -> [T, image_seq_len, llm_dim]``."""
        self.check_pixel_values(
            pixel_values[None] if isinstance(pixel_values, Tensor) else pixel_values
        )
        tap = self.connector.make_tap(
            self.vision_model, final_norm=self.vision_model.post_layernorm
        )
        pixels = pixel_values.to(device=self.vision_model.device, dtype=self.vision_model.dtype)
        return self.connector(tap(pixels), native_grid(self.config.vision_config))


class DenseIdefics3Model(DenseInitMixin, CheckedLoadingMixin, TiledDenseModelMixin, Idefics3Model):
    """HF ``Idefics3Model`` whose ``connector`` is a :class:`mmconnect.DenseConnector`.

    ``forward`` has the stock signature and checks the prompt's image tokens against the real
    tiles before the tower runs.
    """

    config_class = DenseIdefics3Config
    model_type = MODEL_TYPE
    processor_name = "DenseIdefics3Processor"
    connector_prefixes = ("model.connector.", "connector.")

    def __init__(self, config: DenseIdefics3Config) -> None:
        Idefics3PreTrainedModel.__init__(self, config)  # the stock __init__ builds its connector
        self._build_parts(config, Idefics3VisionTransformer)
        self.post_init()

    forward = checked_forward(Idefics3Model.forward)
    get_image_features = can_return_tuple(TiledDenseModelMixin.get_image_features)


class TiledGenerationMixin(DenseGenerationMixin):
    """The ``*ForConditionalGeneration`` of the tiled families: the stock attributes
    (``image_token_id``, ``vocab_size``) around the Dense base model."""

    def __init__(self, config: Any) -> None:
        PreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.image_token_id = config.image_token_id
        self.lm_head = nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.vocab_size = config.text_config.vocab_size
        self.post_init()


class DenseIdefics3ForConditionalGeneration(
    DenseInitMixin, TiledGenerationMixin, Idefics3ForConditionalGeneration
):
    """HF ``Idefics3ForConditionalGeneration`` with a Dense Connector (``"dense_idefics3"``)."""

    config_class = DenseIdefics3Config
    base_model_class = DenseIdefics3Model
    connector_prefixes = DenseIdefics3Model.connector_prefixes


# ---------------------------------------------------------------------------- conversion


def convert_tiled(
    model: nn.Module,
    connector: ConnectorConfig | str,
    dense_class: type,
    source_class: type,
    state_from_hf: Callable[[Mapping[str, Tensor], str], dict[str, Tensor]],
) -> Any:
    """Build ``dense_class`` around ``model``'s own tower, LLM and head (shared, not copied)
    with a new Dense Connector; the stock connector's weights are reused when ``connector`` is
    the native one (:func:`is_native_connector`), through ``state_from_hf``.

    Raises:
        TypeError: ``model`` is not a stock ``source_class``, or ``connector`` is neither a
            config nor a preset name.
        ValueError: the connector does not fit the towers (another depth or width), or its
            projector does not fit the tile grid.
    """
    if not isinstance(model, source_class) or isinstance(model, dense_class):
        raise TypeError(f"model must be an HF {source_class.__name__}, got {type(model).__name__}")
    config = model.config
    if isinstance(connector, str):
        connector = ConnectorConfig.from_preset(
            connector,
            vision_dim=config.vision_config.hidden_size,
            llm_dim=config.text_config.hidden_size,
        )
    if not isinstance(connector, ConnectorConfig):
        raise TypeError(
            f"connector must be a ConnectorConfig or a preset name, got {type(connector).__name__}"
        )
    check_connector_fits(connector, config.vision_config, config.text_config)
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    data["connector"] = connector.to_dict()
    dense_config = dense_class.config_class(**data)
    with torch.device("meta"):  # the skeleton, without allocating a second LLM
        dense = dense_class(dense_config)
    reference = next(model.model.vision_model.parameters())
    new_connector = DenseConnector(connector).to(device=reference.device, dtype=reference.dtype)
    if is_native_connector(connector, config):
        weights = state_from_hf(model.model.connector.state_dict(), "")
        new_connector.projector.load_state_dict(weights)
    for name, module in model.model.named_children():
        if name != "connector":
            setattr(dense.model, name, module)
    dense.model.connector = new_connector
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


def from_idefics3(
    model: Idefics3ForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseIdefics3ForConditionalGeneration:
    """A Dense Idefics3 around an existing HF ``Idefics3ForConditionalGeneration``.

    The vision tower, LLM and LM head are the source model's own modules (shared, not copied).
    With the native connector (:func:`native_connector`, or the preset
    ``idefics3-pixel-shuffle-siglip-so400m-364`` at the model's widths) the stock connector's
    Linear is reused (:func:`mmconnect.zoo.pixel_shuffle.idefics3_state_from_hf`) and the
    logits equal the stock model's; any other connector starts from its initialisation.

    Args:
        model: an HF ``Idefics3ForConditionalGeneration``.
        connector: a :class:`ConnectorConfig` or a preset name (resized to the model's widths;
            its depth must be the tower's).

    Raises:
        ValueError: the connector is for another tower depth or does not fit the tile grid.
    """
    return convert_tiled(
        model,
        connector,
        DenseIdefics3ForConditionalGeneration,
        Idefics3ForConditionalGeneration,
        idefics3_state_from_hf,
    )


# ---------------------------------------------------------------------------- processor


def tile_token_count(
    connector: ConnectorConfig, image_processor: Any, patch_size: int, processor: str
) -> int:
    """``<image>`` tokens per tile: the connector's count on the image processor's tile grid
    (``max_image_size["longest_edge"] // patch_size`` per side).

    Raises:
        ValueError: no image processor, or a tile side that is not a multiple of ``patch_size``.
    """
    if image_processor is None:
        raise ValueError(f"{processor} needs image_processor= (it sets the tile size)")
    check_positive_int(patch_size, "patch_size")
    tile = int(image_processor.max_image_size["longest_edge"])
    if tile % patch_size:
        raise ValueError(
            f"the image processor's max_image_size={tile} is not a multiple of "
            f"patch_size={patch_size}; the tiles must cover whole patches"
        )
    return connector.num_tokens((tile // patch_size, tile // patch_size))


class TiledProcessorMixin:
    """What the Dense Idefics3 / SmolVLM processors share: ``image_seq_len`` is the connector's
    count per tile, never an argument that could disagree with it."""

    image_seq_len: int

    def _connector_tokens(
        self,
        connector: dict | ConnectorConfig | None,
        patch_size: int | None,
        image_processor: Any,
        image_seq_len: int | None,
    ) -> int:
        name = type(self).__name__
        self._connector_config = processor_connector(connector, patch_size, name)
        self.connector = self._connector_config.to_dict()  # saved with the processor
        self.patch_size = patch_size
        per_tile = tile_token_count(self._connector_config, image_processor, patch_size, name)
        _check_seq_len(image_seq_len, per_tile)
        return per_tile

    def __call__(self, *args: Any, image_seq_len: int | None = None, **kwargs: Any) -> Any:
        """The stock processor's call; ``image_seq_len``, when given, must be the connector's."""
        _check_seq_len(image_seq_len, self.image_seq_len)
        return super().__call__(*args, **kwargs)


def _check_seq_len(image_seq_len: int | None, per_tile: int) -> None:
    if image_seq_len is not None and image_seq_len != per_tile:
        raise ValueError(
            f"image_seq_len={image_seq_len} differs from the connector's {per_tile} tokens per "
            "tile; a Dense processor takes the count from its connector (leave image_seq_len "
            "out)"
        )


class DenseIdefics3Processor(TiledProcessorMixin, Idefics3Processor):
    """``Idefics3Processor`` whose tiles each get the connector's count of ``<image>`` tokens.

    The prompt layout is the stock one (``<fake_token_around_image><row_i_col_j>`` before each
    tile's tokens, a newline after each row, the global tile after ``<global-img>``); only
    ``image_seq_len`` comes from the connector.

    Args:
        connector: the connector config (dict or :class:`ConnectorConfig`); saved with the
            processor.
        patch_size: the vision tower's patch size (the tile grid is ``max_image_size //
            patch_size``).
        image_seq_len: optional; must equal the connector's count per tile (saved processors
            carry it).
        chat_template: as for ``Idefics3Processor``.
    """

    # Every argument that must survive save_pretrained -> from_pretrained is named here: HF
    # passes a saved processor only the arguments its __init__ names.
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
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
            image_seq_len=per_tile,
            chat_template=chat_template,
            **kwargs,
        )


#: The Idefics3 family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseIdefics3Config,
    model_class=DenseIdefics3Model,
    generation_class=DenseIdefics3ForConditionalGeneration,
    processor_class=DenseIdefics3Processor,
    source_class=Idefics3ForConditionalGeneration,
    convert=from_idefics3,
    fixed_image_tokens=False,
    description="Idefics3 (HF Idefics3ForConditionalGeneration) with a Dense Connector per tile",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
