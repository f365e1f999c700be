"""Hugging Face Gemma 3 with a Dense Connector in place of its pooled projector.

``DenseGemma3ForConditionalGeneration`` is an HF ``Gemma3ForConditionalGeneration`` whose
``multi_modal_projector`` is a :class:`mmconnect.DenseConnector` fed by a
:class:`mmconnect.MultiLayerFeatureTap` on its SigLIP tower. Everything else is Gemma 3's own:
the LLM, the head tied to the embeddings, and the attention mask in which the tokens of one
image attend to each other both ways (``token_type_ids``, which :class:`DenseGemma3Processor`
emits for the connector's token count, as the stock processor does for 256 tokens).

Gemma 3's native connector is :class:`mmconnect.zoo.pooled.Gemma3PoolSpec` behind the tower's
output: ``last_hidden_state`` (after SigLIP's ``post_layernorm``), average-pooled from the
tower's grid to ``sqrt(mm_tokens_per_image)`` per side, Gemma RMSNorm, a bias-free matmul. In a
Dense Gemma 3 the tower's layer ``L`` (its depth, 27 for SigLIP-SO400M) is that output: the tap
applies ``post_layernorm`` to the last block (``final_norm=``), so
``SingleLayerSpec(final_layer=L)`` + ``Gemma3PoolSpec`` is the native connector
(:func:`native_connector`) and its logits equal the stock model's. Layers below ``L`` are the
blocks' outputs as ``hidden_states`` holds them.

Every crop (the whole image, plus pan-and-scan crops when the processor makes them) is one
image for the tower and fills the connector's token count; ``mm_tokens_per_image`` in the config
is that count. ``model_type="dense_gemma3"`` is registered with the Auto classes on import;
:func:`from_gemma3` converts an existing model.

Examples:
    >>> dense = from_gemma3(gemma3, "dc-dci+gemma3-pool-siglip-so400m-896")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import (
    AutoModel,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Model,
    Gemma3Processor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.modeling_gemma3 import Gemma3PreTrainedModel
from transformers.utils.generic import can_return_tuple

from mmconnect import ConnectorConfig, DenseConnector, SingleLayerSpec
from mmconnect.integrations.families.base import (
    CheckedLoadingMixin,
    ConnectorConfigMixin,
    DenseGenerationMixin,
    DenseInitMixin,
    check_connector_fits,
    checked_forward,
    checked_grid,
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
from mmconnect.validation import check_int_pair, check_positive_int
from mmconnect.zoo.pooled import Gemma3PoolSpec, gemma3_pool_state_from_hf

logger = logging.getLogger(__name__)

MODEL_TYPE = "dense_gemma3"

#: Config keys that say what a config is rather than what it holds (dropped on conversion).
_IDENTITY_KEYS = ("model_type", "architectures", "transformers_version", "auto_map")


# ---------------------------------------------------------------------------- config


def native_connector(config: Any) -> ConnectorConfig:
    """Gemma 3's own connector for a ``Gemma3Config``: the tower's output (layer ``L``, after
    ``post_layernorm``) pooled to ``mm_tokens_per_image`` tokens, RMSNorm, projection.

    Raises:
        ValueError: ``mm_tokens_per_image`` is not a square number (Gemma 3 pools to a square
            grid of ``sqrt(mm_tokens_per_image)`` per side).
    """
    tokens = config.mm_tokens_per_image
    side = math.isqrt(tokens) if isinstance(tokens, int) and tokens > 0 else 0
    if side * side != tokens:
        raise ValueError(
            f"mm_tokens_per_image={tokens!r} must be a square number (Gemma 3 pools the tower's "
            "grid to sqrt(mm_tokens_per_image) tokens per side), e.g. 256 for 16x16"
        )
    vision = config.vision_config
    return ConnectorConfig(
        fusion=SingleLayerSpec(final_layer=vision.num_hidden_layers),
        projector=Gemma3PoolSpec(grid=(side, side), eps=vision.layer_norm_eps),
        vision_dim=vision.hidden_size,
        llm_dim=config.text_config.hidden_size,
        num_layers=vision.num_hidden_layers,
    )


@strict
class DenseGemma3Config(ConnectorConfigMixin, Gemma3Config):
    """``Gemma3Config`` plus ``connector`` (a :class:`mmconnect.ConnectorConfig` as a dict).

    Without ``connector`` Gemma 3's native one is used (:func:`native_connector`).
    ``mm_tokens_per_image`` is set to the connector's token count per crop at the tower's grid.

    Raises:
        ValueError: the connector cannot take the tower's grid (a ``Gemma3PoolSpec`` grid that
            does not divide it), or it has a DeepStack ``injection`` (not implemented for
            Gemma 3).
    """

    model_type = MODEL_TYPE
    connector: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.connector is None:
            self.connector = native_connector(self).to_dict()
        if not isinstance(self.connector, ConnectorConfig):
            self.connector = ConnectorConfig.from_dict(self.connector)
        self.connector = self.connector.to_dict()
        connector = self.connector_config
        refuse_injection(
            connector,
            "Dense Gemma 3",
            "adding per-level residuals inside Gemma 3's LLM (with its bidirectional image "
            "blocks and pan-and-scan crops) is not implemented",
        )
        self.mm_tokens_per_image = connector.num_tokens(native_grid(self.vision_config))


# ---------------------------------------------------------------------------- model


def _output_norm(tower: nn.Module) -> nn.Module:
    """The tower's output norm (SigLIP's ``post_layernorm``), which Gemma 3's connector reads
    after the last block.

    Raises:
        ValueError: the tower has none.
    """
    norm = getattr(tower, "post_layernorm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(
            f"Dense Gemma 3 reads the vision tower's output after its post_layernorm, but "
            f"{type(tower).__name__} has no post_layernorm module; use Gemma 3's SigLIP tower"
        )
    return norm


def _warning_without_token_types(stock_forward: Callable) -> Callable:
    """``stock_forward`` (HF ``Gemma3Model.forward``) warning when images come without
    ``token_type_ids``: the stock model then silently gives the image tokens a causal mask,
    not the both-ways attention within an image that Gemma 3 is trained with. The wrapper keeps
    the stock signature."""
    signature = inspect.signature(stock_forward)

    @functools.wraps(stock_forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        if arguments.get("pixel_values") is not None and arguments.get("token_type_ids") is None:
            warnings.warn(
                "pixel_values without token_type_ids: the image tokens attend causally, not both "
                "ways within each image as Gemma 3 does; pass the token_type_ids "
                "DenseGemma3Processor returns",
                UserWarning,
                stacklevel=2,
            )
        return stock_forward(self, *args, **kwargs)

    return forward


class DenseGemma3Model(DenseInitMixin, CheckedLoadingMixin, DenseFamilyModel, Gemma3Model):
    """HF ``Gemma3Model`` whose ``multi_modal_projector`` is a :class:`mmconnect.DenseConnector`.

    ``forward`` is the stock one (image tokens scattered into the embeddings, Gemma 3's
    bidirectional image blocks from ``token_type_ids``) after a check of the prompt's image
    tokens before the tower runs.
    """

    config_class = DenseGemma3Config
    model_type = MODEL_TYPE

    def __init__(self, config: DenseGemma3Config) -> None:
        # Gemma3Model.__init__ would build the stock projector.
        Gemma3PreTrainedModel.__init__(self, config)
        connector_config = config.connector_config
        check_connector_fits(connector_config, config.vision_config, config.text_config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = DenseConnector(connector_config)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def connector(self) -> DenseConnector:
        """The Dense Connector (stored as ``multi_modal_projector`` for HF compatibility)."""
        return self.multi_modal_projector

    def vision_towers(self) -> dict[str, nn.Module]:
        """The one vision tower, run on every crop (family protocol)."""
        return {"vision_tower": self.vision_tower}

    def connector_modules(self) -> dict[str, nn.Module]:
        """The connector alone trains with the connector (family protocol)."""
        return {"multi_modal_projector": self.multi_modal_projector}

    def tower_geometry(self) -> TowerGeometry:
        """The vision tower's width, depth and native grid (family protocol)."""
        return vision_config_geometry(self.config.vision_config, self.vision_tower)

    def image_token_count(self, image_size: Any = None) -> int:
        """Image tokens one crop fills: the connector's count at the tower's grid.

        An image is one crop unless the processor's pan-and-scan adds crops (then it fills
        this count per crop, see :meth:`DenseGemma3Processor.image_token_count`); every crop
        is resized to the tower's size, so ``image_size`` is not used here.
        """
        return self.connector.num_tokens(native_grid(self.config.vision_config))

    def check_pixel_values(self, pixel_values: Any) -> None:
        """``pixel_values`` must be ``[crops, 3, S, S]`` at the tower's ``image_size``."""
        checked_grid(pixel_values, self.config.vision_config, leading="crops")

    def check_image_tokens(
        self, input_ids: Tensor | None, pixel_values: Tensor | None, image_sizes: Any = None
    ) -> None:
        """Before any tensor work: the prompt's image tokens must equal what the crops fill
        (``image_sizes`` is for AnyRes models and not used).

        Raises:
            ValueError: bad ``pixel_values``, or the two counts differ (both named).
        """
        if input_ids is None or pixel_values is None:
            return
        self.check_pixel_values(pixel_values)
        found = int((input_ids == self.config.image_token_id).sum())
        crops = pixel_values.shape[0]
        per_crop = self.image_token_count()
        if found != crops * per_crop:
            raise ValueError(
                f"the prompt holds {found} image tokens but the {crops} crop(s) in pixel_values "
                f"fill {crops * per_crop} ({per_crop} per crop with this connector; an image "
                "with pan-and-scan crops fills this per crop); build the prompt with "
                "DenseGemma3Processor so the counts agree"
            )

    forward = checked_forward(_warning_without_token_types(Gemma3Model.forward))

    @can_return_tuple
    def get_image_features(
        self, pixel_values: Tensor, **kwargs: Any
    ) -> tuple | BaseModelOutputWithPooling:
        """Tap the tower, run the connector; returns what HF Gemma 3's ``get_image_features``
        does.

        ``[crops, 3, S, S]`` -> ``pooler_output``: ``[crops, tokens, llm_dim]`` (one tensor, as
        Gemma 3's: every crop fills the same count); ``last_hidden_state``: the connector's
        final layer ``[crops, h*w, vision_dim]`` (the tower's output for layer ``L``);
        ``hidden_states`` / ``attentions`` when ``output_hidden_states`` / ``output_attentions``
        ask for them (the tower then runs in full, otherwise it stops after the deepest layer
        the connector reads); a tuple when ``return_dict=False``.

        Raises:
            ValueError: bad ``pixel_values`` (see
                :func:`~mmconnect.integrations.families.base.check_pixel_values`) or
                ``interpolate_pos_encoding``.
        """
        reject_interpolation(kwargs)
        grid = checked_grid(pixel_values, self.config.vision_config, leading="crops")
        features, outputs = tower_features(
            self.connector,
            self.vision_tower,
            pixel_values.to(self.vision_tower.dtype),
            output_hidden_states=kwargs.get("output_hidden_states"),
            output_attentions=kwargs.get("output_attentions"),
            final_norm=_output_norm(self.vision_tower),
        )
        outputs.pooler_output = self.connector(features, grid)
        return outputs

    # ------------------------------------------------------------------ video frames / chat
    def frame_pixel_values(self, image_processor: Any, images: list) -> Tensor:
        """Each frame as one crop of the tower's size (no pan-and-scan): ``[T, 3, S, S]``."""
        pixels = image_processor(images=images, do_pan_and_scan=False, return_tensors="pt")
        return torch.as_tensor(pixels["pixel_values"])

    def image_features(self, image_processor: Any, image: Any) -> Tensor:
        """One image as one crop (no pan-and-scan, the count of
        :meth:`DenseGemma3Model.image_token_count`):
        ``[1, N, llm_dim]``."""
        pixels = self.frame_pixel_values(image_processor, [image]).to(self.vision_tower.device)
        return self.get_image_features(pixels).pooler_output[:1]


class DenseGemma3ForConditionalGeneration(
    DenseInitMixin, DenseGenerationMixin, Gemma3ForConditionalGeneration
):
    """HF ``Gemma3ForConditionalGeneration`` with a Dense Connector (``"dense_gemma3"``)."""

    config_class = DenseGemma3Config

    base_model_class = DenseGemma3Model

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        inputs_embeds: Tensor | None = None,
        use_cache: bool = True,
        is_first_iteration: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Gemma 3's own, with ``inputs_embeds`` named so that ``generate(inputs_embeds=...)``
        is accepted: the family protocol's chat path places the visual tokens in the
        embeddings itself. HF's Gemma 3 passes ``inputs_embeds`` on through ``**kwargs``
        already, but ``generate`` looks for the name in the signature and refuses without it.
        """
        return super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )


# ---------------------------------------------------------------------------- conversion


def _connector_for(model: Gemma3ForConditionalGeneration, connector: Any) -> ConnectorConfig:
    """``connector`` as a config; a preset name is resized to the model's widths."""
    config = model.config
    if isinstance(connector, str):
        return ConnectorConfig.from_preset(
            connector,
            vision_dim=config.vision_config.hidden_size,
            llm_dim=config.text_config.hidden_size,
        )
    if not isinstance(connector, ConnectorConfig):
        raise TypeError(
            f"connector must be a ConnectorConfig or a preset name, got {type(connector).__name__}"
        )
    return connector


def _reuse_projector_weights(source: nn.Module, connector: DenseConnector) -> bool:
    """Load Gemma 3's projector weights into a ``gemma3_pool`` connector whose shapes fit
    (through :func:`mmconnect.zoo.pooled.gemma3_pool_state_from_hf`)."""
    if not isinstance(connector.config.projector, Gemma3PoolSpec):
        logger.info(
            "not reusing Gemma 3's projector weights: the connector's projector is %r",
            connector.config.projector.name,
        )
        return False
    state = gemma3_pool_state_from_hf(source.state_dict())
    expected = {key: tuple(value.shape) for key, value in connector.projector.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    if found != expected:
        logger.info(
            "not reusing Gemma 3's projector weights: shapes %s, the connector's %s",
            found,
            expected,
        )
        return False
    connector.projector.load_state_dict(state)
    return True


def from_gemma3(
    model: Gemma3ForConditionalGeneration, connector: ConnectorConfig | str
) -> DenseGemma3ForConditionalGeneration:
    """A Dense Gemma 3 built around an existing HF Gemma 3.

    The vision tower, LLM and LM head are the source model's own modules (shared, not copied).
    Gemma 3's projector weights (RMSNorm offset and projection) are loaded into a
    ``gemma3_pool`` connector whose shapes fit; with :func:`native_connector` the Dense model
    gives the stock model's logits. Other connectors start from their initialisation.

    Args:
        model: an HF ``Gemma3ForConditionalGeneration``.
        connector: a :class:`ConnectorConfig` or a preset name (resized to the model's widths;
            its depth must be the tower's).

    Raises:
        TypeError: ``model`` is not a stock HF Gemma 3, or ``connector`` is neither a config
            nor a name.
        ValueError: the connector does not fit the towers (width, depth, a pool grid that does
            not divide the tower's grid), naming the field and the expected value.
    """
    if not isinstance(model, Gemma3ForConditionalGeneration) or isinstance(
        model, DenseGemma3ForConditionalGeneration
    ):
        raise TypeError(
            f"model must be an HF Gemma3ForConditionalGeneration, got {type(model).__name__}"
        )
    connector = _connector_for(model, connector)
    config = model.config
    check_connector_fits(connector, config.vision_config, config.text_config)
    data = config.to_dict()
    for key in _IDENTITY_KEYS:
        data.pop(key, None)
    data["connector"] = connector.to_dict()
    dense_config = DenseGemma3Config(**data)
    with torch.device("meta"):  # the skeleton, without allocating a second LLM
        dense = DenseGemma3ForConditionalGeneration(dense_config)
    tower = model.model.vision_tower
    _output_norm(tower)
    reference = next(tower.parameters())
    new_connector = DenseConnector(connector).to(device=reference.device, dtype=reference.dtype)
    _reuse_projector_weights(model.model.multi_modal_projector, new_connector)
    dense.model.vision_tower = tower
    dense.model.language_model = model.model.language_model
    dense.model.multi_modal_projector = new_connector
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


def pan_and_scan_crops(image_processor: Any, image_size: Sequence[int], **options: Any) -> int:
    """Pan-and-scan crops Gemma 3's image processor adds to an image of ``(height, width)``
    pixels (0: the image alone), by its own rule (``pan_and_scan_batched`` on an empty batch).

    Args:
        image_processor: a ``Gemma3ImageProcessor``.
        image_size: the original ``(height, width)``.
        options: ``do_pan_and_scan``, ``pan_and_scan_min_crop_size``,
            ``pan_and_scan_max_num_crops``, ``pan_and_scan_min_ratio_to_activate`` as the
            processor merges them.

    Raises:
        TypeError: ``image_size`` is not a pair of ints.
        ValueError: ``image_size`` has a side below 1 or not two sides.
    """
    values = image_size.tolist() if hasattr(image_size, "tolist") else image_size
    height, width = check_int_pair(
        list(values) if isinstance(values, Sequence) else values,
        "image_size",
        hint="the original image size in pixels",
    )
    if not options.get("do_pan_and_scan"):
        return 0
    crops = image_processor.pan_and_scan_batched(
        torch.empty(0, 3, height, width),
        options["pan_and_scan_min_crop_size"],
        options["pan_and_scan_max_num_crops"],
        options["pan_and_scan_min_ratio_to_activate"],
    )
    return len(crops)


#: The tokenizer attributes Gemma 3's processor reads: the placeholder the connector's tokens
#: replace, and the markers around each crop.
_IMAGE_TOKENS = ("image_token", "boi_token", "eoi_token")


class DenseGemma3Processor(Gemma3Processor):
    """``Gemma3Processor`` whose image sequence holds the connector's token count per crop.

    Each crop is ``<start_of_image>`` + ``<image_soft_token>`` x N + ``<end_of_image>`` with
    N the connector's count at the tower's grid (``image_size // patch_size`` per side of the
    image processor's ``size``); pan-and-scan crops get one such sequence each, as in the stock
    processor, and ``token_type_ids`` mark the N tokens of every crop.

    Args:
        image_processor: a ``Gemma3ImageProcessor`` (its ``size`` is the crop size).
        tokenizer: Gemma 3's tokenizer (``image_token``, ``boi_token``, ``eoi_token``).
        chat_template: as for ``Gemma3Processor`` (saved and reloaded with the processor).
        patch_size: the vision tower's patch size.
        connector: the connector config (dict or :class:`ConnectorConfig`); saved with the
            processor.
        image_seq_length: Gemma 3's tokens per crop; derived from the connector, so it may be
            left out (a saved processor passes it back: it must agree).

    Raises:
        ValueError: ``connector`` or ``patch_size`` missing or not positive, a tokenizer
            without Gemma 3's image tokens, or an ``image_seq_length`` other than the
            connector's count.
    """

    # Every argument that must survive save_pretrained -> from_pretrained is named here: HF
    # passes a saved processor only the arguments its __init__ names.
    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_seq_length: int | None = None,
        patch_size: int | None = None,
        connector: dict | ConnectorConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self._connector_config = processor_connector(connector, patch_size, "DenseGemma3Processor")
        self.connector = self._connector_config.to_dict()  # saved with the processor
        self.patch_size = check_positive_int(patch_size, "patch_size")
        missing = [name for name in _IMAGE_TOKENS if getattr(tokenizer, name, None) is None]
        if missing:
            raise ValueError(
                f"tokenizer ({type(tokenizer).__name__}) lacks Gemma 3's {', '.join(missing)}; "
                f"DenseGemma3Processor needs {', '.join(_IMAGE_TOKENS)} (Gemma 3's tokenizer "
                "names <image_soft_token>, <start_of_image> and <end_of_image> so)"
            )
        size = image_processor.size
        tokens = self._connector_config.num_tokens(
            (size["height"] // patch_size, size["width"] // patch_size)
        )
        if image_seq_length is not None and image_seq_length != tokens:
            raise ValueError(
                f"image_seq_length={image_seq_length} but the connector fills {tokens} tokens per "
                f"{size['height']}x{size['width']} crop (patch_size={patch_size}); leave "
                "image_seq_length out, it follows the connector"
            )
        super().__init__(
            image_processor,
            tokenizer,
            chat_template=chat_template,
            image_seq_length=tokens,
            **kwargs,
        )

    def image_token_count(self, image_size: Sequence[int], **images_kwargs: Any) -> int:
        """``<image_soft_token>`` tokens one image of ``(height, width)`` pixels fills with this
        processor's settings (``images_kwargs`` as for a call, e.g. ``do_pan_and_scan=True``):
        the per-crop count times ``1 +`` its pan-and-scan crops."""
        options = self._merge_kwargs(**images_kwargs)["images_kwargs"]
        crops = pan_and_scan_crops(self.image_processor, image_size, **options)
        return self.image_seq_length * (1 + crops)


#: The Gemma 3 family (family protocol).
FAMILY = Family(
    model_type=MODEL_TYPE,
    config_class=DenseGemma3Config,
    model_class=DenseGemma3Model,
    generation_class=DenseGemma3ForConditionalGeneration,
    processor_class=DenseGemma3Processor,
    source_class=Gemma3ForConditionalGeneration,
    convert=from_gemma3,
    # Pan-and-scan gives an image 1 + k crops, and the run files' data path emits no
    # token_type_ids (Gemma 3's bidirectional image blocks): train through the processor.
    fixed_image_tokens=False,
    description="Gemma 3 (HF Gemma3ForConditionalGeneration) with a Dense Connector",
)


register_family(FAMILY)  # on import: the family and its HF Auto classes
