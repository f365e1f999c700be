"""Hugging Face Qwen3-VL (dense LLM) with a Dense Connector in place of its mergers.

``DenseQwen3VLForConditionalGeneration`` is an HF ``Qwen3VLForConditionalGeneration`` whose
vision tower keeps its patch embedding, learned position embeddings and blocks, while the final
patch merger and the DeepStack mergers are replaced by one :class:`mmconnect.DenseConnector`
(stored as ``model.multi_modal_projector``) fed by a :class:`mmconnect.MultiLayerFeatureTap` on
the tower's packed ``[seq, C]`` blocks. Qwen3-VL's own connector is the zoo's native preset
(:func:`native_connector`): the merger on ``hidden_states[depth]`` plus one DeepStack merger per
``deepstack_visual_indexes`` entry ``k`` on ``hidden_states[k + 1]``; with it, and the weights
converted by :func:`from_qwen3_vl`, the logits equal the stock model's.

What each part follows:

* **Tokens.** The tap captures the packed sequence of every image and video slice of a call;
  :class:`~mmconnect.integrations.families.packed_vision.PackedImages` cuts it per temporal
  slice, puts each slice's tokens in raster order on its ``(h, w)`` patch grid (the processor
  writes them merge-unit-major), runs the connector once per distinct grid and returns each
  image's tokens in the stock order (slice by slice, raster on the token grid).
* **DeepStack.** The connector's residuals (``forward_with_injections``) come back as
  ``deepstack_features``, in the layout of the stock ``get_image_features``, so the stock
  ``Qwen3VLModel.forward`` hands them to the stock text model (``visual_pos_masks``,
  ``deepstack_visual_embeds``): level ``i`` is added after decoder layer ``i`` exactly as for
  Qwen3-VL's own mergers, for images, videos and both in one prompt.
* **M-RoPE.** ``get_rope_index`` positions the connector's tokens on the connector's token grid
  (:func:`~mmconnect.integrations.families.packed_vision.rope_grid_thw`; unchanged for the
  native merger). A connector whose tokens form no grid (STI, learned queries) is refused when
  the model is built.
* **Counts.** :class:`DenseQwen3VLProcessor` inserts the connector's token count per image and
  per video temporal slice; ``forward`` and ``generate`` check the prompt's image and video
  tokens against the grids before the tower runs.

``model_type`` is ``"dense_qwen3_vl"`` (registered with the Auto classes on import).

Examples:
    >>> dense = from_qwen3_vl(stock, "dc-dci+qwen3-merger+deepstack-qwen3-vl-768")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from PIL import Image
from torch import Tensor, nn
from transformers import (
    AutoModel,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    Qwen3VLPreTrainedModel,
    Qwen3VLVisionBlock,
    Qwen3VLVisionModel,
    Qwen3VLVisionPatchEmbed,
    Qwen3VLVisionRotaryEmbedding,
)
from transformers.processing_utils import MultiModalData
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector, SingleLayerSpec
from mmconnect.injection import DeepStackSpec
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    check_connector_fits,
    share_sub_configs,
)
from mmconnect.integrations.families.packed_vision import (
    PackedImages,
    check_grid_thw,
    check_packed_pixels,
    check_positional_connector,
    connector_token_count,
    packed_tower_features,
    rope_grid_thw,
)
from mmconnect.integrations.families.protocol import (
    DenseFamilyModel,
    Family,
    TowerGeometry,
    register_family,
)
from mmconnect.zoo.patch_merger import PatchMergerSpec, qwen3_vl_merger_state_from_hf

logger = logging.getLogger(__name__)

MODEL_TYPE = "dense_qwen3_vl"


# ---------------------------------------------------------------------------- config


def native_connector(config: Qwen3VLConfig) -> ConnectorConfig:
    """Qwen3-VL's own connector for ``config``'s towers, as a Dense Connector config.

    The final merger (LayerNorm before the ``m x m`` shuffle) on ``hidden_states[depth]`` (the
    last block's output; the tower has no final norm) and, when the tower has DeepStack, one
    merger with its norm after the shuffle per ``deepstack_visual_indexes`` entry ``k`` on
    ``hidden_states[k + 1]`` (block ``k``'s output). At Qwen3-VL-8B's sizes this is the zoo's
    ``qwen3-vl-8b+deepstack-768`` preset.
    """
    vision = config.vision_config
    merge = vision.spatial_merge_size
    levels = tuple(index + 1 for index in vision.deepstack_visual_indexes)
    return ConnectorConfig(
        vision_dim=vision.hidden_size,
        llm_dim=config.text_config.hidden_size,
        num_layers=vision.depth,
        fusion=SingleLayerSpec(final_layer=vision.depth),
        projector=PatchMergerSpec(merge_size=merge),
        injection=(
            DeepStackSpec(
                layers=levels, projector=PatchMergerSpec(merge_size=merge, postshuffle_norm=True)
            )
            if levels
            else None
        ),
    )


@strict
class DenseQwen3VLConfig(ConnectorConfigMixin, Qwen3VLConfig):
    """``Qwen3VLConfig`` plus ``connector``, a :class:`mmconnect.ConnectorConfig` as a dict.

    Without ``connector`` the model gets Qwen3-VL's own (:func:`native_connector`). The vision
    config keeps every stock field; ``deepstack_visual_indexes`` and ``out_hidden_size`` describe
    the stock mergers and are not read by the Dense model (its connector says which layers are
    injected and its ``llm_dim`` is the LLM's width).
    """

    model_type = MODEL_TYPE
    connector: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.connector is None:
            self.connector = native_connector(self).to_dict()
        elif isinstance(self.connector, ConnectorConfig):
            self.connector = self.connector.to_dict()
        else:  # validated (and a dict of an older format upgraded) now rather than at build time
            self.connector = ConnectorConfig.from_dict(self.connector).to_dict()


# ---------------------------------------------------------------------------- vision tower


class DenseQwen3VLVisionModel(Qwen3VLVisionModel):
    """Qwen3-VL's vision tower without its mergers: patch embedding, interpolated learned
    position embeddings, rotary embedding and blocks, as the stock tower builds them.

    The final merger and the DeepStack mergers are the Dense Connector's business, so ``merger``
    is an identity and there are no DeepStack levels: the stock ``forward`` (used when the tower
    runs in full, e.g. for ``output_hidden_states``) returns the last block's packed tokens
    ``[seq, C]`` as ``pooler_output``. The parameter names of what is kept are the stock ones.
    """

    def __init__(self, config: Any, *inputs: Any, **kwargs: Any) -> None:
        # Qwen3VLVisionModel.__init__ would build the stock mergers: build the rest only.
        Qwen3VLPreTrainedModel.__init__(self, config, *inputs, **kwargs)
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.spatial_merge_unit = self.spatial_merge_size * self.spatial_merge_size
        self.patch_embed = Qwen3VLVisionPatchEmbed(config=config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.num_grid_per_side = int(config.num_position_embeddings**0.5)
        self.interpolation_align_corners = True
        self.interpolation_mode = "bilinear"
        self.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList([Qwen3VLVisionBlock(config) for _ in range(config.depth)])
        self.merger = nn.Identity()
        self.deepstack_visual_indexes: list[int] = []
        self.deepstack_merger_list = nn.ModuleList()
        self.gradient_checkpointing = False
        self.post_init()

    #: The stock tower's submodules this tower shares with it after :func:`from_qwen3_vl`.
    shared_modules = ("patch_embed", "pos_embed", "rotary_pos_emb", "blocks")


# ---------------------------------------------------------------------------- model


def _checked_visual_call(stock_forward: Callable) -> Callable:
    """``stock_forward`` (``Qwen3VLModel.forward``) with the prompt's image and video tokens
    checked against the grids first; the stock signature is kept."""
    signature = inspect.signature(stock_forward)

    @functools.wraps(stock_forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        self.check_visual_tokens(
            arguments.get("input_ids"),
            pixel_values=arguments.get("pixel_values"),
            image_grid_thw=arguments.get("image_grid_thw"),
            pixel_values_videos=arguments.get("pixel_values_videos"),
            video_grid_thw=arguments.get("video_grid_thw"),
        )
        return stock_forward(self, *args, **kwargs)

    return forward


class DenseQwen3VLModel(DenseInitMixin, CheckedLoadingMixin, DenseFamilyModel, Qwen3VLModel):
    """HF ``Qwen3VLModel`` whose mergers are one :class:`mmconnect.DenseConnector`.

    Children: ``visual`` (:class:`DenseQwen3VLVisionModel`), ``multi_modal_projector`` (the
    connector) and ``language_model`` (the stock ``Qwen3VLTextModel``). ``forward`` has the
    stock signature; it checks the prompt's image / video tokens before the tower runs, and the
    stock forward then places the connector's tokens, adds its DeepStack residuals in the text
    model and positions the tokens with M-RoPE (:meth:`get_rope_index`).

    Raises:
        ValueError: (construction) the connector does not fit the towers or its tokens form no
            grid (M-RoPE needs one).
    """

    config_class = DenseQwen3VLConfig
    model_type = MODEL_TYPE
    processor_name = "DenseQwen3VLProcessor"

    def __init__(self, config: DenseQwen3VLConfig) -> None:
        Qwen3VLPreTrainedModel.__init__(self, config)  # Qwen3VLModel.__init__ builds the mergers
        connector = config.connector_config
        check_connector_fits(connector, config.vision_config, config.text_config)
        merge = config.vision_config.spatial_merge_size
        side = int(config.vision_config.num_position_embeddings**0.5)
        check_positional_connector(
            connector,
            family="Dense Qwen3-VL",
            probe_grids=[(side, side), (2 * merge, 2 * merge), (merge, merge)],
        )
        self.visual = DenseQwen3VLVisionModel._from_config(config.vision_config)
        self.multi_modal_projector = DenseConnector(connector)
        self.language_model = AutoModel.from_config(config.text_config)
        self.rope_deltas = None  # the stock model caches M-RoPE offsets here during generation
        self.post_init()

    # ------------------------------------------------------------------ family protocol
    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (stored as ``multi_modal_projector``)."""
        return self.multi_modal_projector

    def vision_towers(self) -> dict[str, nn.Module]:
        """The one vision tower (family protocol)."""
        return {"visual": self.visual}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector alone trains with the connector (family protocol)."""
        return {"multi_modal_projector": self.multi_modal_projector}

    def tower_geometry(self) -> TowerGeometry:
        """Width, depth, and the tower at its learned position grid's size (family protocol).

        Qwen3-VL takes any image whose sides are multiples of ``patch_size * spatial_merge_size``
        and interpolates its ``sqrt(num_position_embeddings)``-square position grid to the
        image's grid; the geometry reports that square grid (48x48 patches, 768 px, at real
        size), where the position embeddings are used as learned.
        """
        vision = self.config.vision_config
        side = int(vision.num_position_embeddings**0.5)
        return TowerGeometry(
            width=vision.hidden_size,
            depth=vision.depth,
            image_size=(side * vision.patch_size, side * vision.patch_size),
            patch_size=vision.patch_size,
            grid=(side, side),
            prefix_tokens=0,
        )

    def image_token_count(self, image_size: Any = None) -> int:
        """Image tokens one image fills, for the ``(height, width)`` in pixels at which the
        tower takes it (the processor's resized size: multiples of ``patch_size *
        spatial_merge_size``).

        Raises:
            ValueError: no size, or a side that is no such multiple (the processor never makes
                one; ask the processor's ``num_image_tokens`` for an original image's size).
        """
        vision = self.config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        if (
            not isinstance(image_size, tuple | list)
            or len(image_size) != 2
            or not all(isinstance(side, int) and side > 0 for side in image_size)
        ):
            raise ValueError(
                "image_size must be the (height, width) in pixels of the image as the processor "
                f"resized it (multiples of {factor}), got {image_size!r}"
            )
        height, width = image_size
        if height % factor or width % factor:
            raise ValueError(
                f"image_size={tuple(image_size)}: Qwen3-VL's processor resizes images to multiples "
                f"of patch_size * spatial_merge_size = {factor} px; count an original image with "
                "DenseQwen3VLProcessor.num_image_tokens"
            )
        patch = vision.patch_size
        return self.connector.num_tokens((height // patch, width // patch))

    def connector_input_grid(self) -> tuple[int, int]:
        """The patch grid of one frame at the tower's learned position grid (family protocol)."""
        return self.tower_geometry().grid

    def frame_pixel_values(self, image_processor: Any, images: list[Image.Image]) -> Tensor:
        """Not available: Qwen3-VL packs frames as patches with their grids; answer videos with
        the model's own video input (the processor's ``pixel_values_videos`` and
        ``video_grid_thw``) through ``forward`` / ``generate``.

        Raises:
            ValueError: always.
        """
        raise ValueError(
            "Dense Qwen3-VL takes video through its own video input (DenseQwen3VLProcessor's "
            "pixel_values_videos and video_grid_thw with forward / generate), not as separate "
            "frames: its frames are packed patches that need their grids"
        )

    def frame_features(self, pixel_values: Tensor) -> Tensor:
        """Not available (see :meth:`frame_pixel_values`).

        Raises:
            ValueError: always.
        """
        return self.frame_pixel_values(None, [])

    def image_features(self, image_processor: Any, image: Image.Image) -> Tensor:
        """One image's visual tokens through the full image path: ``[1, N, llm_dim]``, with
        ``N`` the connector's count at the processor's size for ``image``."""
        inputs = image_processor(images=[image], return_tensors="pt")
        device = self.visual.device
        pixels = torch.as_tensor(inputs["pixel_values"]).to(device)
        grid = torch.as_tensor(inputs["image_grid_thw"]).to(device)
        return self.get_image_features(pixels, grid).pooler_output[0][None]

    # ------------------------------------------------------------------ checks
    def _grids(self, grid_thw: Any, argument: str) -> tuple[tuple[int, int, int], ...]:
        return check_grid_thw(
            grid_thw, merge_size=self.config.vision_config.spatial_merge_size, argument=argument
        )

    def _patch_width(self) -> int:
        vision = self.config.vision_config
        return vision.in_channels * vision.temporal_patch_size * vision.patch_size**2

    def check_visual_inputs(
        self, pixel_values: Any, grid_thw: Any, *, modality: str = "image"
    ) -> tuple[tuple[int, int, int], ...]:
        """The checked ``(t, h, w)`` of each image (or video) of ``pixel_values``.

        Raises:
            ValueError: no grid, a grid the processor would not make (sides not multiples of
                the merge size, an image with ``t != 1``), pixels that are not the grids' packed
                patches, or a grid the connector cannot take.
        """
        pixels_name = "pixel_values" if modality == "image" else "pixel_values_videos"
        grid_name = f"{modality}_grid_thw"
        if grid_thw is None:
            raise ValueError(
                f"{pixels_name} needs {grid_name} (the processor returns both): the patches are "
                "packed and only the grids say where each image lies"
            )
        grids = self._grids(grid_thw, grid_name)
        if modality == "image":
            for index, (t, h, w) in enumerate(grids):
                if t != 1:
                    raise ValueError(
                        f"{grid_name}[{index}] = {[t, h, w]}: an image has t=1 (the image "
                        "processor repeats each image over the temporal patch); pass videos as "
                        "pixel_values_videos with video_grid_thw"
                    )
        check_packed_pixels(
            pixel_values,
            grids,
            patch_width=self._patch_width(),
            argument=pixels_name,
            grid_argument=grid_name,
        )
        for index, (_, h, w) in enumerate(grids):
            try:
                self.connector.num_tokens((h, w))
            except ValueError as error:
                raise ValueError(f"{grid_name}[{index}]: {error}") from None
        return grids

    def visual_token_counts(self, grid_thw: Any, argument: str = "image_grid_thw") -> list[int]:
        """Tokens the connector makes for each image (or video) of ``grid_thw``."""
        return [
            connector_token_count(self.connector, grid) for grid in self._grids(grid_thw, argument)
        ]

    def check_visual_tokens(
        self,
        input_ids: Tensor | None,
        *,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
    ) -> None:
        """The prompt's image and video tokens must be what the images and videos fill.

        Raises:
            ValueError: bad pixels or grids (:meth:`check_visual_inputs`), or a count that
                differs (the message names both counts and the per-image ones).
        """
        checks = (
            ("image", pixel_values, image_grid_thw, self.config.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id),
        )
        for modality, pixels, grid_thw, token_id in checks:
            if pixels is None:
                continue
            grids = self.check_visual_inputs(pixels, grid_thw, modality=modality)
            if input_ids is None:
                continue
            per_item = [connector_token_count(self.connector, grid) for grid in grids]
            found = int((input_ids == token_id).sum())
            if found != sum(per_item):
                raise ValueError(
                    f"the prompt holds {found} {modality} tokens but {len(grids)} {modality}(s) "
                    f"fill {sum(per_item)} ({per_item} with this connector for the grids "
                    f"{[list(grid) for grid in grids]}); build the prompt with "
                    f"{self.processor_name} so the counts agree"
                )

    # ------------------------------------------------------------------ visual features
    def _visual_features(
        self, pixel_values: Tensor, grid_thw: Tensor, modality: str, kwargs: dict[str, Any]
    ) -> BaseModelOutputWithDeepstackFeatures:
        self.check_visual_inputs(pixel_values, grid_thw, modality=modality)
        features, outputs = packed_tower_features(
            self.connector,
            self.visual,
            pixel_values.type(self.visual.dtype),
            grid_thw,
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        packed = PackedImages(
            grid_thw,
            merge_size=self.config.vision_config.spatial_merge_size,
            argument=f"{modality}_grid_thw",
        )

        def connect(part: Any, grid: tuple[int, int]) -> tuple[Tensor, ...]:
            tokens, residuals = self.connector.forward_with_injections(part, grid)
            return (tokens, *residuals)

        tokens, *levels = packed.run(features, connect)
        return BaseModelOutputWithDeepstackFeatures(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=tuple(tokens),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            deepstack_features=[tuple(level) for level in levels],
        )

    @can_return_tuple
    def get_image_features(
        self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs: Any
    ) -> tuple | BaseModelOutputWithDeepstackFeatures:
        """Tap the tower, run the connector per image: what the stock ``get_image_features``
        returns.

        ``pixel_values`` ``[sum(t*h*w), 3*T*P*P]`` (packed patches) and ``image_grid_thw``
        ``[images, 3]`` -> ``pooler_output``: a tuple with one ``[N_i, llm_dim]`` per image
        (``N_i`` the connector's count for its grid); ``deepstack_features``: one tuple per
        injected level, aligned with ``pooler_output`` (empty without injection);
        ``last_hidden_state``: the connector's final layer, packed ``[seq, vision_dim]`` in the
        processor's order; ``hidden_states`` / ``attentions`` of the tower when asked for (the
        tower then runs in full; otherwise it stops after the deepest layer the connector
        reads).

        Raises:
            ValueError: see :meth:`check_visual_inputs`.
        """
        return self._visual_features(pixel_values, image_grid_thw, "image", kwargs)

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None, **kwargs: Any
    ) -> tuple | BaseModelOutputWithDeepstackFeatures:
        """:meth:`get_image_features` for videos: every temporal slice of ``(t, h, w)`` goes
        through the connector as one image, ``pooler_output`` holds ``[t * N, llm_dim]`` per
        video, slice by slice."""
        return self._visual_features(pixel_values_videos, video_grid_thw, "video", kwargs)

    def get_rope_index(
        self,
        input_ids: Tensor,
        mm_token_type_ids: Tensor,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """The stock M-RoPE index with each image on the connector's token grid.

        The stock index places an image of ``(t, h, w)`` patches on the ``(h/m, w/m)`` grid of
        its merger's tokens; here each grid is replaced by one whose ``/ m`` is the connector's
        token grid (:func:`~mmconnect.integrations.families.packed_vision.rope_grid_thw`), so
        the positions are the stock ones for the native merger and follow the connector's
        tokens otherwise.
        """
        merge = self.config.vision_config.spatial_merge_size
        return super().get_rope_index(
            input_ids,
            mm_token_type_ids,
            image_grid_thw=(
                None
                if image_grid_thw is None
                else rope_grid_thw(image_grid_thw, self.connector, merge_size=merge)
            ),
            video_grid_thw=(
                None
                if video_grid_thw is None
                else rope_grid_thw(video_grid_thw, self.connector, merge_size=merge)
            ),
            attention_mask=attention_mask,
            **kwargs,
        )

    forward = _checked_visual_call(Qwen3VLModel.forward)


class DenseQwen3VLForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, Qwen3VLForConditionalGeneration
):
    """HF ``Qwen3VLForConditionalGeneration`` with a Dense Connector
    (``model_type="dense_qwen3_vl"``)."""

    config_class = DenseQwen3VLConfig
    base_model_class = DenseQwen3VLModel

    def generate(self, inputs: Tensor | None = None, *args: Any, **kwargs: Any):
        """HF ``generate``; the prompt's image and video tokens are checked before the tower
        runs (HF encodes the images before the first forward)."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        self.model.check_visual_tokens(
            input_ids,
            pixel_values=kwargs.get("pixel_values"),
            image_grid_thw=kwargs.get("image_grid_thw"),
            pixel_values_videos=kwargs.get("pixel_values_videos"),
            video_grid_thw=kwargs.get("video_grid_thw"),
        )
        return Qwen3VLForConditionalGeneration.generate(self, inputs, *args, **kwargs)


# ---------------------------------------------------------------------------- conversion


def _reuse_native_weights(
    stock: Qwen3VLForConditionalGeneration, connector: DenseConnector
) -> list[str]:
    """Load the stock mergers into the connector's parts that are Qwen3-VL's own; returns what
    was reused (``"merger"``, ``"deepstack"``)."""
    native = native_connector(stock.config)
    config = connector.config
    state = stock.model.visual.state_dict()
    reused = []
    if config.fusion == native.fusion and config.projector == native.projector:
        connector.projector.load_state_dict(qwen3_vl_merger_state_from_hf(state, "merger."))
        reused.append("merger")
    if config.injection is not None and config.injection == native.injection:
        for level, projector in enumerate(connector.injection):
            prefix = f"deepstack_merger_list.{level}."
            projector.load_state_dict(qwen3_vl_merger_state_from_hf(state, prefix))
        reused.append("deepstack")
    return reused


def from_qwen3_vl(
    model: Qwen3VLForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseQwen3VLForConditionalGeneration:
    """A Dense Qwen3-VL built around an existing HF Qwen3-VL.

    The tower's patch embedding, position embeddings, rotary embedding and blocks, the LLM and
    the LM head are the source model's own modules (shared, not copied). The connector reuses
    the stock weights where it is Qwen3-VL's own: the final merger when it reads the last block
    alone through Qwen3-VL's merger, the DeepStack mergers when it injects the stock levels
    through Qwen3-VL's DeepStack mergers (:func:`native_connector` is both; then the logits are
    the stock model's). Other parts start from their initialisation.

    Args:
        model: an HF ``Qwen3VLForConditionalGeneration``.
        connector: a :class:`ConnectorConfig` or a preset name (resized to the model's widths;
            its depth must be the tower's).

    Raises:
        TypeError: ``model`` is not a stock Qwen3-VL, or ``connector`` neither a config nor a
            name.
        ValueError: the connector does not fit the towers (another depth: a preset for
            another tower) or its tokens form no grid.
    """
    if not isinstance(model, Qwen3VLForConditionalGeneration) or isinstance(
        model, DenseQwen3VLForConditionalGeneration
    ):
        raise TypeError(
            f"model must be an HF Qwen3VLForConditionalGeneration, got {type(model).__name__}"
        )
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
    dense_config = DenseQwen3VLConfig(**data, connector=connector.to_dict())
    with torch.device("meta"):  # the skeleton, without allocating a second LLM
        dense = DenseQwen3VLForConditionalGeneration(dense_config)
    for name in DenseQwen3VLVisionModel.shared_modules:
        setattr(dense.model.visual, name, getattr(model.model.visual, name))
    reference = next(model.model.visual.parameters())
    new_connector = DenseConnector(connector).to(device=reference.device, dtype=reference.dtype)
    reused = _reuse_native_weights(model, new_connector)
    logger.info("from_qwen3_vl: reused the stock %s weights", ", ".join(reused) or "no connector")
    dense.model.multi_modal_projector = new_connector
    dense.model.language_model = model.model.language_model
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


# ---------------------------------------------------------------------------- processor


class DenseQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` that puts the connector's token count in place of each image and of
    each video temporal slice (between its ``<|vision_start|>`` / ``<|vision_end|>``, after its
    timestamp, as the stock processor does).

    Args:
        image_processor: Qwen3-VL's image processor (``Qwen2VLImageProcessor``).
        tokenizer: the tokenizer, with Qwen's vision tokens.
        video_processor: ``Qwen3VLVideoProcessor``.
        chat_template: as for ``Qwen3VLProcessor`` (saved and reloaded with the processor).
        connector: the connector config as a dict (``ConnectorConfig.to_dict()``) or a
            :class:`ConnectorConfig`; saved with the processor.
    """

    # Every argument that must survive save_pretrained -> from_pretrained is named here.
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        video_processor: Any = None,
        chat_template: str | None = None,
        connector: dict | ConnectorConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if connector is None:
            raise ValueError(
                "DenseQwen3VLProcessor needs connector= (the model's connector config, e.g. "
                "model.connector.config): it inserts that connector's token count per image"
            )
        self._connector_config = (
            connector
            if isinstance(connector, ConnectorConfig)
            else ConnectorConfig.from_dict(connector)
        )
        self.connector = self._connector_config.to_dict()
        super().__init__(
            image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs
        )

    def grid_tokens(self, grid: tuple[int, int]) -> int:
        """Tokens the connector makes for one image / temporal slice of ``(h, w)`` patches."""
        return self._connector_config.num_tokens(grid)

    def num_image_tokens(self, height: int, width: int, **images_kwargs: Any) -> int:
        """Placeholder tokens for an original image of ``height x width`` pixels: the connector's
        count at the size the image processor resizes it to."""
        processor = self.image_processor
        patch = images_kwargs.get("patch_size", processor.patch_size)
        merge = images_kwargs.get("merge_size", processor.merge_size)
        size = images_kwargs.get("size") or processor.size
        resized = smart_resize(
            height,
            width,
            factor=patch * merge,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )
        return self.grid_tokens((resized[0] // patch, resized[1] // patch))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        t, h, w = (int(value) for value in image_inputs["image_grid_thw"][image_idx])
        return self.image_token * (t * self.grid_tokens((h, w)))

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        # The stock text (timestamps, one <|vision_start|> ... <|vision_end|> per slice) with
        # each slice's run of placeholders resized to the connector's count.
        stock = super().replace_video_token(video_inputs, video_idx, **kwargs)
        t, h, w = (int(value) for value in video_inputs["video_grid_thw"][video_idx])
        merge = self.video_processor.merge_size
        start, end = self.vision_start_token, self.vision_end_token
        old = start + self.video_token * (h * w // merge**2) + end
        new = start + self.video_token * self.grid_tokens((h, w)) + end
        if stock.count(old) != t:
            raise RuntimeError(
                f"the stock video placeholder has {stock.count(old)} slices of {h * w // merge**2} "
                f"tokens, expected {t}: Qwen3VLProcessor's video text changed"
            )
        return stock.replace(old, new)

    def _get_num_multimodal_tokens(
        self,
        image_sizes: list[list[int]] | None = None,
        video_sizes: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> MultiModalData:
        """Placeholder tokens per image that the processor inserts, for original sizes
        (serving engines read this).

        Raises:
            ValueError: ``video_sizes`` is given (see the comment in the body).
        """
        merged = self._merge_kwargs(**kwargs)
        data: dict[str, Any] = {}
        if image_sizes is not None:
            images_kwargs = merged.get("images_kwargs", {})
            data["num_image_tokens"] = [
                self.num_image_tokens(*size, **images_kwargs) for size in image_sizes
            ]
            data["num_image_patches"] = [
                self.image_processor.get_number_of_image_patches(*size, images_kwargs)
                for size in image_sizes
            ]
        if video_sizes is not None:
            # The video processor's per-frame pixel cap decides each slice's grid; only the
            # patch total is public, and the connector's count needs the grid itself.
            raise ValueError(
                "DenseQwen3VLProcessor counts video tokens from the processed video_grid_thw "
                "(call the processor on the video); video_sizes= is not supported"
            )
        return MultiModalData(**data)


#: The dense Qwen3-VL family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseQwen3VLConfig,
    model_class=DenseQwen3VLModel,
    generation_class=DenseQwen3VLForConditionalGeneration,
    processor_class=DenseQwen3VLProcessor,
    source_class=Qwen3VLForConditionalGeneration,
    convert=from_qwen3_vl,
    fixed_image_tokens=False,
    description="Qwen3-VL, dense LLM (HF Qwen3VLForConditionalGeneration) with a Dense Connector",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
