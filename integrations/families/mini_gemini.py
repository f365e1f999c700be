"""A complete Mini-Gemini MLLM on Hugging Face LLaVA, with a (Dense) connector.

``DenseMGMForConditionalGeneration`` is the Dense LLaVA model (:mod:`mmconnect.integrations.families.llava`)
with Mini-Gemini's vision path (:mod:`mmconnect.integrations.families.mini_gemini_vision`): ``pixel_values`` is the
high-resolution image (``image_size_aux`` pixels, 768; 1536 in HD mode), the CLIP tower sees its
bilinear downsample, the ConvNeXt ``vision_tower_aux`` the image itself, ``mining`` (patch info
mining) refines the CLIP tokens with the HR map, and ``multi_modal_projector`` is the
:class:`mmconnect.DenseConnector` (``fusion="none"`` + ``mlp2x_gelu`` is MGM's own projector).
Loss, ``generate()`` and ``save_pretrained`` / ``from_pretrained`` work as for HF LLaVA;
``model_type="dense_mgm"`` is registered with the Auto classes on import.

The connector is chosen in the config (``connector=``, ``mining_placement=``) or swapped on a
built model with :func:`replace_connector`. Stage 1 of :func:`mmconnect.integrations.training.stages.train_stage`
trains the connector and the mining projections, stage 2 adds the LLM.

Examples:
    >>> config = DenseMGMConfig(vision_config=clip, text_config=llama,          # doctest: +SKIP
    ...                         connector=ConnectorConfig.from_preset("dc-dci-clip-l-336"),
    ...                         aux_encoder={"name": "convnext_large"}, image_size_aux=768)
    >>> model = DenseMGMForConditionalGeneration(config)                        # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.checkpoint import saved_shapes, shape_problems
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    FixedImageTokensMixin,
    attach_connector,
    check_connector_fits,
    check_pixel_values,
    checked_forward,
    image_outputs,
    injecting_forward,
    native_grid,
    reject_feature_layer,
    reject_interpolation,
    safetensors_files,
    tower_features,
)
from mmconnect.integrations.families.llava import DenseLlavaProcessor
from mmconnect.integrations.families.mini_gemini_vision import (
    PatchInfoMining,
    check_normalization,
    check_placement,
    check_views,
    convnext_hr_features,
    hr_map_width,
    hr_views,
    lr_views,
    mine_and_connect,
    mining_width,
)
from mmconnect.integrations.families.protocol import (
    DenseFamilyModel,
    Family,
    TowerGeometry,
    register_family,
    vision_config_geometry,
)
from mmconnect.validation import check_choice

MODEL_TYPE = "dense_mgm"
#: ConvNeXt stem stride: the HR map is ``image_size_aux / 4`` cells on a side.
HR_STRIDE = 4
#: MGM's HR encoder: the open_clip ``convnext_large_d_320`` trunk is timm's ``convnext_large``.
DEFAULT_AUX_ENCODER = {"name": "convnext_large"}

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- config


@strict
class DenseMGMConfig(ConnectorConfigMixin, LlavaConfig):
    """``LlavaConfig`` plus Mini-Gemini's HR encoder, mining and HD fields, and ``connector``.

    Attributes:
        connector: a :class:`mmconnect.ConnectorConfig` as a dict; ``None``: MGM's own connector
            (``vision_feature_layer``, ``mlp2x_gelu``).
        aux_encoder: the HR ConvNeXt as timm ``create_model`` arguments, ``{"name": ...,
            **kwargs}`` (default ``convnext_large``, 2880 HR channels; built without weights).
        image_size_aux: the HR image size in pixels (768; 1536 in HD mode).
        image_grid: LR crops per side (1; 2 in HD mode).
        image_global: add the global view in front of the crops (HD mode).
        mining_placement: Dense Connector fusion ``"after"`` mining (default) or ``"before"``.

    Raises:
        ValueError: the HR map of a view is not a whole number of windows per LR token, or the
            HD / placement fields are invalid.
    """

    model_type = MODEL_TYPE
    connector: dict | None = None
    aux_encoder: dict | None = None
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    mining_placement: str = "after"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        attach_connector(self)
        if self.aux_encoder is None:
            self.aux_encoder = dict(DEFAULT_AUX_ENCODER)
        check_aux_encoder(self.aux_encoder)
        views = check_views(self.image_grid, self.image_global)
        check_choice(self.mining_placement, "mining_placement", ("after", "before"))
        check_hr_size(self.image_size_aux, self.image_grid, native_grid(self.vision_config))
        self.image_seq_length *= views  # attach_connector counted one view

    @property
    def num_views(self) -> int:
        """Views per image: 1, or the HD crops plus the global view."""
        return check_views(self.image_grid, self.image_global)


def check_hr_size(image_size_aux: int, image_grid: int, lr_grid: tuple[int, int]) -> None:
    """Every LR token of every view needs a whole window of HR cells.

    Raises:
        ValueError: ``image_size_aux / 4 / image_grid`` is not a multiple of the LR grid.
    """
    cells = image_size_aux // HR_STRIDE
    per_view = cells // image_grid
    if image_size_aux % HR_STRIDE or cells % image_grid or per_view % lr_grid[0]:
        raise ValueError(
            f"image_size_aux={image_size_aux} gives a {cells}x{cells} HR map ({per_view} cells a "
            f"side per view with image_grid={image_grid}), not a multiple of the LR grid "
            f"{lr_grid[0]}x{lr_grid[1]}: use a multiple of {HR_STRIDE * image_grid * lr_grid[0]} "
            f"pixels (e.g. {HR_STRIDE * image_grid * lr_grid[0] * 8})"
        )


def check_aux_encoder(spec: Any) -> None:
    """``aux_encoder`` must name a timm model (``{"name": "convnext_large", **timm kwargs}``).

    Checked when the config is made, so an unknown name fails before any model is built (timm
    itself would fail only at ``create_model``, with a ``RuntimeError``).

    Raises:
        ValueError: ``spec`` is not a dict with a ``name`` string, or timm has no such model.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(
            f"aux_encoder must name a timm ConvNeXt, e.g. {{'name': 'convnext_large'}}, got {spec!r}"
        )
    import timm

    if not timm.is_model(spec["name"]):
        similar = timm.list_models("convnext*")[:6]
        raise ValueError(
            f"aux_encoder name {spec['name']!r} is not a timm model (timm "
            f"{timm.__version__}); expected a timm ConvNeXt name such as 'convnext_large' "
            f"(MGM's HR encoder), e.g. one of {similar}"
        )


def build_aux_encoder(spec: dict) -> nn.Module:
    """The HR ConvNeXt from ``{"name": timm model name, **timm kwargs}``, without weights.

    Raises:
        ValueError: see :func:`check_aux_encoder`.
    """
    import timm

    check_aux_encoder(spec)
    options = {key: value for key, value in spec.items() if key != "name"}
    for key, value in options.items():  # JSON turns timm's tuples into lists
        if isinstance(value, list):
            options[key] = tuple(value)
    return timm.create_model(spec["name"], pretrained=False, num_classes=0, **options)


# ---------------------------------------------------------------------------- model


class DenseMGMModel(
    DenseInitMixin, FixedImageTokensMixin, CheckedLoadingMixin, DenseFamilyModel, LlavaModel
):
    """HF ``LlavaModel`` with Mini-Gemini's dual-encoder vision path and a Dense Connector.

    Modules: ``vision_tower`` (CLIP, LR), ``vision_tower_aux`` (ConvNeXt, HR), ``mining``
    (:class:`~mmconnect.integrations.families.mini_gemini_vision.PatchInfoMining`), ``multi_modal_projector`` (the
    :class:`mmconnect.DenseConnector`), ``language_model``.
    """

    config_class = DenseMGMConfig
    processor_name = "DenseMGMProcessor"
    model_type = MODEL_TYPE

    def __init__(self, config: DenseMGMConfig) -> None:
        LlavaPreTrainedModel.__init__(
            self, config
        )  # LlavaModel.__init__ builds the stock projector
        connector_config = config.connector_config
        check_connector_fits(connector_config, config.vision_config, config.text_config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower_aux = build_aux_encoder(config.aux_encoder)
        self.multi_modal_projector = DenseConnector(connector_config)
        check_placement(config.mining_placement, self.multi_modal_projector)
        self.mining = PatchInfoMining(
            mining_width(self.multi_modal_projector, config.mining_placement),
            hr_map_width(self.vision_tower_aux),
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (stored as ``multi_modal_projector`` for HF compatibility)."""
        return self.multi_modal_projector

    def vision_towers(self) -> dict[str, nn.Module]:
        """CLIP (LR, tapped) and the ConvNeXt (HR) tower (family protocol)."""
        return {"vision_tower": self.vision_tower, "vision_tower_aux": self.vision_tower_aux}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector and patch info mining, which stage 1 trains with it (family protocol)."""
        return {"multi_modal_projector": self.multi_modal_projector, "mining": self.mining}

    def tower_geometry(self) -> TowerGeometry:
        """The CLIP tower's width, depth and native grid (family protocol); the HR image is
        ``config.image_size_aux`` pixels."""
        return vision_config_geometry(self.config.vision_config, self.vision_tower)

    def image_token_count(self, image_size: Any = None) -> int:
        """How many ``<image>`` tokens one image fills (all its views; every image is resized to
        ``image_size_aux``, so ``image_size`` is unused)."""
        return self.config.num_views * self.connector.num_tokens(
            native_grid(self.config.vision_config)
        )

    forward = checked_forward(injecting_forward(LlavaModel.forward))

    def check_pixel_values(self, pixel_values: Any) -> None:
        """``pixel_values`` must be the HR image ``[images, 3, image_size_aux, image_size_aux]``."""
        check_pixel_values(
            pixel_values,
            self.config.image_size_aux,
            what="Mini-Gemini's HR image",
            size_name="image_size_aux",
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Tensor,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: Any = None,
        image_sizes: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """HR ``[images, 3, S, S]`` -> ``pooler_output``: a list of ``[views * tokens, llm_dim]``.

        ``last_hidden_state`` is the CLIP tower's tapped final layer for every LR view,
        ``[images * views, h*w, vision_dim]``; ``hidden_states`` / ``attentions`` of the CLIP
        tower when asked for; a tuple when ``return_dict=False`` (as HF LLaVA). With a
        DeepStack connector (``injection=``), ``deepstack_features`` holds per level each
        image's residuals ``[views * tokens, llm_dim]``, computed from the LR tower's layers
        as tapped (patch info mining refines only the connector's tokens; the connector's
        token path runs a second time, unmined, to give them).

        Raises:
            ValueError: the pixels are not ``image_size_aux`` square RGB images (or unbatched,
                or none), or ``image_sizes`` / ``interpolate_pos_encoding`` is given.
        """
        reject_feature_layer(self.config, vision_feature_layer)
        reject_interpolation(kwargs)
        if image_sizes is not None:
            raise ValueError("image_sizes is for AnyRes models; Mini-Gemini takes one HR image")
        self.check_pixel_values(pixel_values)
        config = self.config
        pixels = pixel_values.to(self.vision_tower.dtype)
        views = lr_views(
            pixels, config.vision_config.image_size, config.image_grid, config.image_global
        )
        features, outputs = tower_features(
            self.connector,
            self.vision_tower,
            views.flatten(0, 1),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
        )
        hr_map = hr_views(
            convnext_hr_features(self.vision_tower_aux, pixels.to(self.vision_tower_aux_dtype)),
            config.image_grid,
            config.image_global,
        ).to(features[self.connector.individual_layers[0]].dtype)
        tokens = mine_and_connect(
            features, hr_map.flatten(0, 1), self.connector, self.mining, config.mining_placement
        )
        # DeepStack levels read the LR layers as tapped: mining refines the connector's tokens.
        residuals = (
            self.connector.forward_with_injections(features)[1]
            if self.connector.injection is not None
            else ()
        )
        return image_outputs(outputs, tokens, residuals, pixel_values.shape[0])

    @property
    def vision_tower_aux_dtype(self) -> torch.dtype:
        """The HR encoder's parameter dtype."""
        return next(self.vision_tower_aux.parameters()).dtype


class DenseMGMForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, LlavaForConditionalGeneration
):
    """Mini-Gemini with a Dense Connector (``model_type="dense_mgm"``): loss, ``generate()``,
    ``save_pretrained`` / ``from_pretrained``."""

    config_class = DenseMGMConfig

    base_model_class = DenseMGMModel

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """HF ``from_pretrained``; a local checkpoint's connector and mining weights are checked
        against its config first (HF would re-initialise missing ones silently)."""
        path = Path(str(pretrained_model_name_or_path)) / kwargs.get("subfolder", "")
        if path.is_dir():
            config = kwargs.get("config")
            if not isinstance(config, DenseMGMConfig):
                config = DenseMGMConfig.from_pretrained(path)
            check_checkpoint_mining(path, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def check_checkpoint_mining(directory: Path, config: DenseMGMConfig) -> None:
    """Check the saved mining weights of ``directory`` against ``config`` (safetensors headers).

    Raises:
        ValueError: mining weights are missing or have other shapes (e.g. a checkpoint saved with
            the other ``mining_placement``, or a LLaVA checkpoint without mining).
    """
    files = safetensors_files(directory)
    if not files:
        return
    saved = saved_shapes(files, ("model.mining.", "mining."))  # a corrupt file is named
    with torch.device("meta"):
        connector = DenseConnector(config.connector_config)
        aux = build_aux_encoder(config.aux_encoder)
        expected = {
            key: tuple(tensor.shape)
            for key, tensor in PatchInfoMining(
                mining_width(connector, config.mining_placement), hr_map_width(aux)
            )
            .state_dict()
            .items()
        }
    problems = shape_problems(saved, expected)
    if problems:
        raise ValueError(
            f"the patch info mining weights in {str(directory)!r} do not match its config "
            f"(mining_placement={config.mining_placement!r}, aux_encoder={config.aux_encoder!r}): "
            + "; ".join(problems)
        )


# ---------------------------------------------------------------------------- swapping


def replace_connector(
    model: DenseMGMForConditionalGeneration | DenseMGMModel,
    connector: DenseConnector | ConnectorConfig | str,
    *,
    placement: str | None = None,
) -> DenseMGMForConditionalGeneration | DenseMGMModel:
    """Put another connector into a built Mini-Gemini model, in place, config included.

    The mining module is kept when its query width still fits (``placement="after"`` always
    keeps CLIP's width) and rebuilt otherwise (``"before"`` mines at the fused width); a rebuilt
    one starts untrained, as a new connector does: run stage 1 again.

    Args:
        model: a :class:`DenseMGMForConditionalGeneration` or its base :class:`DenseMGMModel`.
        connector: a :class:`mmconnect.DenseConnector`, a :class:`ConnectorConfig` or a preset
            name (resized to the model's widths).
        placement: ``"after"`` / ``"before"`` mining; ``None`` keeps the model's.

    Returns:
        ``model``, whose ``config.connector``, ``mining_placement`` and ``image_seq_length`` now
        describe the new connector, so ``save_pretrained`` / ``from_pretrained`` round-trip it.

    Raises:
        TypeError: ``model`` is not a Dense MGM model.
        ValueError: the connector does not fit the towers or the placement.
    """
    inner = getattr(model, "model", model)
    if not isinstance(inner, DenseMGMModel):
        raise TypeError(
            f"model must be a DenseMGMForConditionalGeneration or DenseMGMModel, got "
            f"{type(model).__name__}; for the original MGM codebase use "
            "mmconnect.integrations.codebases.mini_gemini.swap_connector"
        )
    config: DenseMGMConfig = inner.config
    if isinstance(connector, str):
        connector = ConnectorConfig.from_preset(
            connector,
            vision_dim=config.vision_config.hidden_size,
            llm_dim=config.text_config.hidden_size,
        )
    if isinstance(connector, ConnectorConfig):
        connector = DenseConnector(connector)
    if not isinstance(connector, DenseConnector):
        raise TypeError(
            f"connector must be a DenseConnector, ConnectorConfig or preset name, got "
            f"{type(connector).__name__}"
        )
    check_connector_fits(connector.config, config.vision_config, config.text_config)
    placement = config.mining_placement if placement is None else placement
    check_placement(placement, connector)
    reference = next(inner.multi_modal_projector.parameters())
    inner.multi_modal_projector = connector.to(device=reference.device, dtype=reference.dtype)
    width = mining_width(connector, placement)
    if inner.mining.lr_dim != width:
        logger.warning(
            "mining queries change width %d -> %d: new, untrained mining projections",
            inner.mining.lr_dim,
            width,
        )
        inner.mining = PatchInfoMining(width, inner.mining.hr_dim).to(
            device=reference.device, dtype=reference.dtype
        )
    config.connector = connector.config.to_dict()
    config.mining_placement = placement
    config.image_seq_length = config.num_views * connector.config.num_tokens(
        native_grid(config.vision_config)
    )
    return model


# ---------------------------------------------------------------------------- processor


class DenseMGMProcessor(DenseLlavaProcessor):
    """``LlavaProcessor`` for Mini-Gemini: the image processor makes the HR image
    (``image_size_aux`` pixels) and each ``<image>`` expands to all views' connector tokens.

    Args:
        connector: the connector config (dict or :class:`ConnectorConfig`); saved with it.
        patch_size: the CLIP tower's patch size.
        image_size: the CLIP tower's image size (336).
        image_size_aux: the HR size the image processor must produce (768; 1536 in HD mode).
        image_grid: LR crops per side (2 in HD mode).
        image_global: the global view beside the crops (True in HD mode).
        aux_normalization: ``(mean, std)`` the HR encoder was trained with; checked against the
            image processor's, since both towers read its one normalised tensor.
        chat_template: as for ``LlavaProcessor`` (saved and reloaded with the processor).
        image_token: as for ``LlavaProcessor``.
    """

    # Arguments not named here are dropped by from_pretrained (see DenseLlavaProcessor).
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int | None = None,
        connector: dict | ConnectorConfig | None = None,
        image_size: int | None = None,
        image_size_aux: int | None = None,
        image_grid: int = 1,
        image_global: bool = False,
        aux_normalization: Any = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        **kwargs: Any,
    ) -> None:
        if image_size is None or image_size_aux is None:
            raise ValueError("DenseMGMProcessor needs image_size= (CLIP) and image_size_aux= (HR)")
        self.num_views = check_views(image_grid, image_global)
        self.image_size, self.image_size_aux = image_size, image_size_aux
        self.image_grid, self.image_global = image_grid, image_global
        if aux_normalization is not None and image_processor is not None:
            check_normalization(
                (image_processor.image_mean, image_processor.image_std), aux_normalization
            )
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            connector=connector,
            chat_template=chat_template,
            image_token=image_token,
            **kwargs,
        )

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens for one HR image of ``height x width`` pixels (all its views).

        Raises:
            ValueError: the image processor did not make ``image_size_aux`` square pixels.
        """
        if (height, width) != (self.image_size_aux, self.image_size_aux):
            raise ValueError(
                f"the image processor made {height}x{width} pixels but Mini-Gemini takes the HR "
                f"image at image_size_aux={self.image_size_aux}; set its size and crop_size to "
                f"{self.image_size_aux}"
            )
        side = self.image_size // self.patch_size
        return self.num_views * self._connector_config.num_tokens((side, side))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        return self.image_token * self.num_image_tokens(height, width)


#: The Mini-Gemini family (family protocol); no stock HF class to convert from.
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseMGMConfig,
    model_class=DenseMGMModel,
    generation_class=DenseMGMForConditionalGeneration,
    processor_class=DenseMGMProcessor,
    description="Mini-Gemini (dual encoder, patch info mining) on HF LLaVA with a Dense Connector",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
