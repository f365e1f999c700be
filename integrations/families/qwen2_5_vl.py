"""Hugging Face Qwen2.5-VL with a Dense Connector in place of its patch merger.

``DenseQwen2_5_VLForConditionalGeneration`` is an HF ``Qwen2_5_VLForConditionalGeneration``
whose vision tower (``visual``: patch embedding, rotary embedding, blocks with window attention)
feeds a :class:`mmconnect.DenseConnector` (``multi_modal_projector``) instead of the tower's own
``merger`` (an ``nn.Identity`` in the Dense model). The tower takes every image and video of a
call as one packed sequence; :mod:`mmconnect.integrations.families.packed_vision` puts each
temporal slice's tokens back on its ``(h, w)`` patch grid in raster order, runs the connector
once per distinct grid and puts its tokens where the stock model puts its merger's.

* The native connector is the zoo's Qwen2.5-VL merger on the last block
  (:func:`native_connector`: single layer ``-1`` + :data:`mmconnect.zoo.patch_merger.QWEN2_5_VL_MERGER`);
  with it, logits equal the stock model's on the same weights.
* Every connector whose tokens form a grid works: M-RoPE positions follow the connector's token
  grid (:func:`mmconnect.integrations.families.packed_vision.rope_grid_thw`). Connectors whose
  tokens form no grid (STI, learned queries) and DeepStack injection are refused at
  construction.
* Images and video: a video's temporal slices (``temporal_patch_size`` frames each) are images
  to the connector; its tokens follow slice by slice.

``model_type="dense_qwen2_5_vl"`` is registered with the Auto classes on import;
:func:`from_qwen2_5_vl` converts an existing model.

Examples:
    >>> qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)  # doctest: +SKIP
    >>> dense = from_qwen2_5_vl(qwen, "dc-dci+qwen2.5-merger-qwen2.5-vl-448")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange, repeat
from huggingface_hub.dataclasses import strict
from PIL import Image
from torch import Tensor, nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.processing_utils import MultiModalData
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector, SingleLayerSpec
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    check_connector_fits,
    refuse_injection,
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
    window_index,
)
from mmconnect.integrations.families.protocol import (
    DenseFamilyModel,
    Family,
    TowerGeometry,
    register_family,
)
from mmconnect.validation import check_size_pair
from mmconnect.zoo.patch_merger import PatchMergerSpec, qwen2_5_vl_merger_state_from_hf

logger = logging.getLogger(__name__)

MODEL_TYPE = "dense_qwen2_5_vl"
_FAMILY_NAME = "Dense Qwen2.5-VL"
#: The patch grid side of the reference image the tower geometry and the video-frame path use:
#: 32 x 32 patches, 448 x 448 pixels with Qwen2.5-VL's 14-px patches.
REFERENCE_PATCHES = 32


# ---------------------------------------------------------------------------- config


def native_connector(config: Any) -> ConnectorConfig:
    """Qwen2.5-VL's own connector as a Dense Connector config, for a ``Qwen2_5_VLConfig`` (stock
    or Dense): the last block's output through the zoo's Qwen2.5-VL merger (RMSNorm, ``m x m``
    concat, Linear-GELU-Linear) into the LLM width."""
    return _native_connector(config.vision_config, config.text_config)


def _native_connector(vision_config: Any, text_config: Any) -> ConnectorConfig:
    return ConnectorConfig(
        fusion=SingleLayerSpec(final_layer=-1),
        projector=PatchMergerSpec(norm="rmsnorm", merge_size=vision_config.spatial_merge_size),
        vision_dim=vision_config.hidden_size,
        llm_dim=text_config.hidden_size,
        num_layers=vision_config.depth,
    )


def _probe_grids(vision_config: Any) -> list[tuple[int, int]]:
    """Patch grids the processor makes, to probe a connector with: the reference image, then a
    2:3 one (multiples of the merge size)."""
    unit = vision_config.spatial_merge_size
    return [(REFERENCE_PATCHES, REFERENCE_PATCHES), (8 * unit, 12 * unit)]


@strict
class DenseQwen2_5_VLConfig(ConnectorConfigMixin, Qwen2_5_VLConfig):
    """``Qwen2_5_VLConfig`` plus ``connector`` (a :class:`mmconnect.ConnectorConfig` as a dict).

    Without ``connector``, the native one (:func:`native_connector`).

    Raises:
        ValueError: the connector does not fit the towers, has a DeepStack ``injection``, or
            its tokens form no grid (STI, learned queries): M-RoPE positions every image token
            on the image's token grid.
    """

    model_type = MODEL_TYPE
    connector: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.connector is None:
            self.connector = _native_connector(self.vision_config, self.text_config).to_dict()
        if not isinstance(self.connector, ConnectorConfig):
            self.connector = ConnectorConfig.from_dict(self.connector)
        connector = self.connector
        self.connector = connector.to_dict()
        check_connector_fits(connector, self.vision_config, self.text_config)
        refuse_injection(
            connector,
            _FAMILY_NAME,
            "Qwen2.5-VL's LLM has no DeepStack levels in the stock model (not implemented)",
        )
        check_positional_connector(
            connector, family=_FAMILY_NAME, probe_grids=_probe_grids(self.vision_config)
        )


# ---------------------------------------------------------------------------- model


def _checked_qwen_forward(stock_forward: Callable) -> Callable:
    """``stock_forward`` with the prompt's image and video tokens checked first; the stock
    signature is kept."""
    signature = inspect.signature(stock_forward)

    @functools.wraps(stock_forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        self.check_visual_tokens(arguments)
        return stock_forward(self, *args, **kwargs)

    return forward


class DenseQwen2_5_VLModel(DenseInitMixin, CheckedLoadingMixin, DenseFamilyModel, Qwen2_5_VLModel):
    """HF ``Qwen2_5_VLModel`` whose images and videos go tower -> tap -> Dense Connector.

    ``forward`` has the stock signature and checks the prompt's image and video tokens, the
    ``*_grid_thw`` and the packed pixels before the tower runs; ``get_rope_index`` positions the
    connector's tokens on its own token grid.
    """

    config_class = DenseQwen2_5_VLConfig
    model_type = MODEL_TYPE

    def __init__(self, config: DenseQwen2_5_VLConfig) -> None:
        # Qwen2_5_VLModel.__init__ would build the stock tower with its merger: build ours.
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        connector = config.connector_config
        check_connector_fits(connector, config.vision_config, config.text_config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.visual.merger = nn.Identity()  # the connector merges; the early exit skips this
        self.multi_modal_projector = DenseConnector(connector)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
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
        """The connector (family protocol)."""
        return {"multi_modal_projector": self.multi_modal_projector}

    def tower_geometry(self) -> TowerGeometry:
        """Width, depth and patch size of the tower; ``image_size`` / ``grid`` are those of the
        reference image (:data:`REFERENCE_PATCHES` patches a side: the resolution is dynamic)."""
        vision = self.config.vision_config
        side = REFERENCE_PATCHES * vision.patch_size
        return TowerGeometry(
            width=vision.hidden_size,
            depth=vision.depth,
            image_size=(side, side),
            patch_size=vision.patch_size,
            grid=(REFERENCE_PATCHES, REFERENCE_PATCHES),
            prefix_tokens=0,
        )

    def image_token_count(self, image_size: Any = None) -> int:
        """Image tokens of one image of ``(height, width)`` pixels AS THE PROCESSOR RESIZED IT
        (multiples of ``patch_size * spatial_merge_size``; ``image_grid_thw`` times the patch
        size): ``connector.num_tokens((height / patch, width / patch))``.

        Raises:
            ValueError: ``image_size`` is missing or not a multiple of ``patch * merge`` a side.
        """
        if image_size is None:
            raise ValueError(
                "image_size is required: a Qwen2.5-VL image's token count depends on its "
                "(height, width) after the processor's resize"
            )
        height, width = check_size_pair(image_size, "image_size")
        vision = self.config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        if height % factor or width % factor:
            raise ValueError(
                f"image_size=({height}, {width}) is not a size the processor makes: both sides "
                f"must be multiples of patch_size * spatial_merge_size = {factor} pixels (pass "
                "the processed size, image_grid_thw[1:] * patch_size)"
            )
        patch = vision.patch_size
        return self.connector.num_tokens((height // patch, width // patch))

    # ------------------------------------------------------------------ input checks
    def _check_packed(self, pixel_values: Any, grid_thw: Any, kind: str) -> None:
        """``pixel_values`` / ``grid_thw`` as the processor makes them (``kind``: ``"image"``
        or ``"video"``, naming the arguments)."""
        vision = self.config.vision_config
        pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
        grid_name = f"{kind}_grid_thw"
        if grid_thw is None:
            raise ValueError(
                f"{grid_name} is required with {pixels_name}: pass the processor's {grid_name} "
                "([images, 3], t, h, w in patches)"
            )
        grids = check_grid_thw(grid_thw, merge_size=vision.spatial_merge_size, argument=grid_name)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        check_packed_pixels(
            pixel_values, grids, patch_width=width, argument=pixels_name, grid_argument=grid_name
        )

    def _packed(self, pixel_values: Any, grid_thw: Any, kind: str) -> PackedImages:
        """The checked packed layout of ``pixel_values`` / ``grid_thw``, with the tower's
        window permutation."""
        self._check_packed(pixel_values, grid_thw, kind)
        vision = self.config.vision_config
        return PackedImages(
            grid_thw,
            merge_size=vision.spatial_merge_size,
            window_index=window_index(grid_thw.cpu(), vision),
            argument=f"{kind}_grid_thw",
        )

    def visual_token_counts(self, grid_thw: Tensor, kind: str = "image") -> list[int]:
        """Tokens the connector makes for each image (or video) of ``grid_thw``."""
        vision = self.config.vision_config
        grids = check_grid_thw(
            grid_thw, merge_size=vision.spatial_merge_size, argument=f"{kind}_grid_thw"
        )
        return [connector_token_count(self.connector, grid) for grid in grids]

    def check_visual_tokens(self, arguments: dict[str, Any]) -> None:
        """Before any tensor work: pixels and grids agree, and the prompt's image / video tokens
        equal what the images / videos fill.

        Raises:
            ValueError: naming both counts (or the bad pixels / grid).
        """
        input_ids = arguments.get("input_ids")
        for kind, pixels_name, token_id in (
            ("image", "pixel_values", self.config.image_token_id),
            ("video", "pixel_values_videos", self.config.video_token_id),
        ):
            pixels = arguments.get(pixels_name)
            if pixels is None:
                continue
            grid_thw = arguments.get(f"{kind}_grid_thw")
            self._check_packed(pixels, grid_thw, kind)
            if input_ids is None:
                continue
            per_item = self.visual_token_counts(grid_thw, kind)
            found = int((input_ids == token_id).sum())
            if found != sum(per_item):
                raise ValueError(
                    f"the prompt holds {found} {kind} tokens but the {len(per_item)} {kind}(s) "
                    f"fill {sum(per_item)} ({per_item} with this connector); build the prompt "
                    "with DenseQwen2_5_VLProcessor so the counts agree"
                )

    def check_image_tokens(
        self, input_ids: Tensor | None, pixel_values: Tensor | None, image_grid_thw: Any = None
    ) -> None:
        """The prompt's image tokens must equal what the images fill (:meth:`check_visual_tokens`
        for images only)."""
        self.check_visual_tokens(
            {"input_ids": input_ids, "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        )

    forward = _checked_qwen_forward(Qwen2_5_VLModel.forward)

    # ------------------------------------------------------------------ images and videos
    def _connect(
        self, pixel_values: Tensor, grid_thw: Tensor, kind: str, kwargs: dict[str, Any]
    ) -> BaseModelOutputWithPooling:
        packed = self._packed(pixel_values, grid_thw, kind)
        features, outputs = packed_tower_features(
            self.connector,
            self.visual,
            pixel_values.to(self.visual.dtype),
            grid_thw,
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        (tokens,) = packed.run(features, lambda cut, grid: (self.connector(cut, grid),))
        outputs.pooler_output = tuple(tokens)
        return outputs

    @can_return_tuple
    def get_image_features(
        self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs: Any
    ) -> tuple | BaseModelOutputWithPooling:
        """Images through tower -> tap -> Dense Connector, as the stock ``get_image_features``.

        ``pooler_output``: one ``[tokens, llm_dim]`` tensor per image, in the stock order
        (slice by slice, each slice's tokens in raster order on the connector's token grid);
        ``last_hidden_state``: the connector's final layer, ``[seq, vision_dim]`` in the tower's
        block (window) order; ``hidden_states`` / ``attentions`` when asked for.

        Raises:
            ValueError: ``image_grid_thw`` missing or bad, or ``pixel_values`` not the packed
                patches it describes.
        """
        return self._connect(pixel_values, image_grid_thw, "image", kwargs)

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None, **kwargs: Any
    ) -> tuple | BaseModelOutputWithPooling:
        """Videos as :meth:`get_image_features` does images: each temporal slice is one image
        to the connector; a video's tokens follow slice by slice."""
        return self._connect(pixel_values_videos, video_grid_thw, "video", kwargs)

    def get_rope_index(
        self,
        input_ids: Tensor,
        mm_token_type_ids: Tensor,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """The stock M-RoPE index with each image's and video's token grid the connector's
        (:func:`~mmconnect.integrations.families.packed_vision.rope_grid_thw`)."""
        merge = self.config.vision_config.spatial_merge_size
        if image_grid_thw is not None:
            image_grid_thw = rope_grid_thw(image_grid_thw, self.connector, merge_size=merge)
        if video_grid_thw is not None:
            video_grid_thw = rope_grid_thw(video_grid_thw, self.connector, merge_size=merge)
        return super().get_rope_index(
            input_ids,
            mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            attention_mask=attention_mask,
            **kwargs,
        )

    # ------------------------------------------------------------------ video frames
    def frame_pixel_values(self, image_processor: Any, images: list[Image.Image]) -> Tensor:
        """Each frame resized to the reference image (:meth:`tower_geometry`) and normalised by
        the image processor: ``[T, 3, S, S]`` (the processor's patches laid back out as
        pixels)."""
        geometry = self.tower_geometry()
        side = geometry.image_size[0]
        resized = [image.convert("RGB").resize((side, side), Image.BICUBIC) for image in images]
        area = side * side
        inputs = image_processor(
            images=resized, size={"shortest_edge": area, "longest_edge": area}, return_tensors="pt"
        )
        grid = torch.as_tensor(inputs["image_grid_thw"])
        if not bool((grid == torch.tensor([1, REFERENCE_PATCHES, REFERENCE_PATCHES])).all()):
            raise ValueError(
                f"the image processor made grids {grid.tolist()} instead of 1 x "
                f"{REFERENCE_PATCHES} x {REFERENCE_PATCHES} patches per frame"
            )
        vision = self.config.vision_config
        return rearrange(
            torch.as_tensor(inputs["pixel_values"]),
            "(n hb wb p q) (c t ph pw) -> n t c (hb p ph) (wb q pw)",
            n=len(images),
            hb=REFERENCE_PATCHES // vision.spatial_merge_size,
            wb=REFERENCE_PATCHES // vision.spatial_merge_size,
            p=vision.spatial_merge_size,
            q=vision.spatial_merge_size,
            c=vision.in_channels,
            t=vision.temporal_patch_size,
            ph=vision.patch_size,
            pw=vision.patch_size,
        )[:, 0]

    def frame_features(self, pixel_values: Tensor) -> Tensor:
        """Every frame as one still image (repeated over the temporal patch, as the processor
        does for images) through tower -> tap -> connector: ``[T, 3, S, S] -> [T, N, llm_dim]``.

        Raises:
            ValueError: frames that are not ``[T, 3, S, S]`` with ``S`` a multiple of
                ``patch_size * spatial_merge_size``.
        """
        vision = self.config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        if (
            not isinstance(pixel_values, Tensor)
            or pixel_values.dim() != 4
            or pixel_values.shape[1] != vision.in_channels
            or pixel_values.shape[2] % factor
            or pixel_values.shape[3] % factor
        ):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else None
            raise ValueError(
                f"frames must be [T, {vision.in_channels}, H, W] with H and W multiples of "
                f"{factor} (frame_pixel_values), got {shape}"
            )
        frames, _, height, width = pixel_values.shape
        merge, patch = vision.spatial_merge_size, vision.patch_size
        patches = repeat(
            pixel_values,
            "n c (hb p ph) (wb q pw) -> (n hb wb p q) (c t ph pw)",
            t=vision.temporal_patch_size,
            p=merge,
            q=merge,
            ph=patch,
            pw=patch,
        )
        grid_thw = torch.tensor([[1, height // patch, width // patch]] * frames)
        device = self.visual.device
        tokens = self.get_image_features(patches.to(device), grid_thw.to(device)).pooler_output
        return torch.stack(list(tokens))

    def connector_input_grid(self) -> tuple[int, int]:
        """The reference image's patch grid (frames are resized to it)."""
        return self.tower_geometry().grid

    def image_features(self, image_processor: Any, image: Image.Image) -> Tensor:
        """One image at the processor's own size through the image path: ``[1, N, llm_dim]``."""
        inputs = image_processor(images=[image], return_tensors="pt")
        device = self.visual.device
        pixels = torch.as_tensor(inputs["pixel_values"]).to(device)
        grid = torch.as_tensor(inputs["image_grid_thw"]).to(device)
        return self.get_image_features(pixels, grid).pooler_output[0][None]


class DenseQwen2_5_VLForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, Qwen2_5_VLForConditionalGeneration
):
    """HF ``Qwen2_5_VLForConditionalGeneration`` with a Dense Connector
    (``"dense_qwen2_5_vl"``)."""

    config_class = DenseQwen2_5_VLConfig
    base_model_class = DenseQwen2_5_VLModel

    def generate(self, inputs: Tensor | None = None, *args: Any, **kwargs: Any):
        """HF ``generate``; the prompt's image and video tokens are checked before the tower
        runs (HF encodes the images before the first forward)."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        self.model.check_visual_tokens({**kwargs, "input_ids": input_ids})
        return super(DenseGenerationMixin, self).generate(inputs, *args, **kwargs)


# ---------------------------------------------------------------------------- conversion


def from_qwen2_5_vl(
    model: Qwen2_5_VLForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseQwen2_5_VLForConditionalGeneration:
    """A Dense Qwen2.5-VL around an existing HF Qwen2.5-VL.

    The tower's patch embedding, rotary embedding and blocks, the LLM and the head are
    ``model``'s own modules (shared, not copied; ``model`` keeps working). When the connector's
    projector is Qwen2.5-VL's merger (:func:`native_connector`'s) and its widths fit, the stock
    merger's weights are loaded into it through
    :func:`mmconnect.zoo.patch_merger.qwen2_5_vl_merger_state_from_hf`; otherwise the connector
    starts from its initialisation.

    Args:
        model: a stock ``Qwen2_5_VLForConditionalGeneration``.
        connector: a :class:`mmconnect.ConnectorConfig` or a preset name
            (``"qwen2.5-vl-7b-merger-448"``, ``"dc-dci+qwen2.5-merger-qwen2.5-vl-448"``, ...
            of :mod:`mmconnect.tower_presets.qwen2_5_vl`; widths taken from ``model``).

    Raises:
        TypeError: ``model`` is not a stock Qwen2.5-VL, or ``connector`` neither a config nor a
            name.
        ValueError: the connector does not fit the tower (another depth: a preset for another
            tower) or its tokens form no grid.
    """
    if not isinstance(model, Qwen2_5_VLForConditionalGeneration) or isinstance(
        model, DenseQwen2_5_VLForConditionalGeneration
    ):
        raise TypeError(
            f"model must be an HF Qwen2_5_VLForConditionalGeneration, got {type(model).__name__}"
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
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    dense_config = DenseQwen2_5_VLConfig(**data, connector=connector.to_dict())
    with torch.device("meta"):  # the skeleton without a second LLM in memory
        dense = DenseQwen2_5_VLForConditionalGeneration(dense_config)
    stock_tower = model.model.visual
    for name, module in stock_tower.named_children():
        if name != "merger":
            setattr(dense.model.visual, name, module)
    dense.model.language_model = model.model.language_model
    dense.lm_head = model.lm_head
    reference = next(stock_tower.parameters())
    new_connector = DenseConnector(connector).to(device=reference.device, dtype=reference.dtype)
    _reuse_merger(model, new_connector)
    dense.model.multi_modal_projector = new_connector
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


def _reuse_merger(model: Qwen2_5_VLForConditionalGeneration, connector: DenseConnector) -> bool:
    """Load the stock merger into the connector's projector when it is the same merger."""
    native = native_connector(model.config)
    if connector.config.projector != native.projector or connector.fused_dim != native.vision_dim:
        logger.info(
            "not reusing Qwen2.5-VL's merger weights: the connector's projector is %r on %d "
            "fused channels",
            connector.config.projector.name,
            connector.fused_dim,
        )
        return False
    state = qwen2_5_vl_merger_state_from_hf(
        model.model.visual.merger.state_dict(prefix="merger."), "merger."
    )
    connector.projector.load_state_dict(state)
    return True


# ---------------------------------------------------------------------------- processor


class DenseQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` that expands each ``<|image_pad|>`` / ``<|video_pad|>`` into the
    connector's token count for that image or video (``t`` slices of
    ``connector.num_tokens((h, w))``).

    Args:
        connector: the connector config (dict or :class:`ConnectorConfig`); saved with the
            processor.
        image_processor: as for ``Qwen2_5_VLProcessor``.
        tokenizer: as for ``Qwen2_5_VLProcessor``.
        video_processor: as for ``Qwen2_5_VLProcessor``.
        chat_template: as for ``Qwen2_5_VLProcessor``.

    Raises:
        ValueError: ``connector`` is missing.
    """

    # Every argument that must survive save_pretrained -> from_pretrained is named here: HF
    # passes a saved processor only the arguments its __init__ names.
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
            raise ValueError("DenseQwen2_5_VLProcessor needs connector= (a connector config)")
        self._connector_config = (
            connector
            if isinstance(connector, ConnectorConfig)
            else ConnectorConfig.from_dict(connector)
        )
        self.connector = self._connector_config.to_dict()  # saved with the processor
        super().__init__(
            image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs
        )

    def _tokens(self, grid: Any) -> int:
        t, h, w = (int(value) for value in grid)
        return connector_token_count(self._connector_config, (t, h, w))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self._tokens(image_inputs["image_grid_thw"][image_idx])

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        return self.video_token * self._tokens(video_inputs["video_grid_thw"][video_idx])

    def _get_num_multimodal_tokens(
        self, image_sizes: Any = None, video_sizes: Any = None, **kwargs: Any
    ) -> MultiModalData:
        """The placeholder tokens per image / video the processor inserts (serving engines read
        this), from the image and video processors' patch counts and grids."""
        merged = self._merge_kwargs(**kwargs)
        data: dict[str, Any] = {}
        if image_sizes is not None:
            images_kwargs = merged.get("images_kwargs", {})
            tokens, patches = [], []
            for height, width in image_sizes:
                grid = self._processed_grid(self.image_processor, height, width, images_kwargs)
                patches.append(grid[1] * grid[2])
                tokens.append(self._tokens(grid))
            data |= {"num_image_tokens": tokens, "num_image_patches": patches}
        if video_sizes is not None:
            videos_kwargs = merged.get("videos_kwargs", {})
            tokens = []
            for frames, height, width in video_sizes:
                patches = self.video_processor.get_num_of_video_patches(
                    frames, height, width, videos_kwargs
                )
                grid = self._processed_grid(self.video_processor, height, width, videos_kwargs)
                tokens.append(self._tokens((patches // (grid[1] * grid[2]), grid[1], grid[2])))
            data["num_video_tokens"] = tokens
        return MultiModalData(**data)

    @staticmethod
    def _processed_grid(
        processor: Any, height: int, width: int, options: dict
    ) -> tuple[int, int, int]:
        """``(1, h, w)`` patches of one image (or frame) of ``height x width`` pixels after the
        processor's resize."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        patch = options.get("patch_size") or processor.patch_size
        merge = options.get("merge_size") or processor.merge_size
        size = options.get("size") or processor.size
        resized_height, resized_width = smart_resize(
            height,
            width,
            factor=patch * merge,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )
        return 1, resized_height // patch, resized_width // patch


#: The Qwen2.5-VL family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseQwen2_5_VLConfig,
    model_class=DenseQwen2_5_VLModel,
    generation_class=DenseQwen2_5_VLForConditionalGeneration,
    processor_class=DenseQwen2_5_VLProcessor,
    source_class=Qwen2_5_VLForConditionalGeneration,
    convert=from_qwen2_5_vl,
    fixed_image_tokens=False,
    description="Qwen2.5-VL (HF Qwen2_5_VLForConditionalGeneration) with a Dense Connector",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
