"""The MLLM-family protocol: what every Dense model offers the rest of the library.

Training stages, chat, the CLI, run files and processors talk to a Dense model only through this
interface; none of them reads a family's attribute names or keeps a list of model classes. A
family is one module of :mod:`mmconnect.integrations.families` that

1. implements :class:`DenseFamilyModel` on its inner HF model (the ``*Model`` that holds the
   vision tower, the connector and the LLM);
2. registers a :class:`Family` (its ``model_type``, HF classes and converter) with
   :func:`register_family` when the module is imported.

``import mmconnect.integrations`` imports every module of the families package, so a new family
is found without editing any shared module. Which attribute holds what is the family's business:

========================  ===============================================================
protocol                  meaning
========================  ===============================================================
``connector``             the :class:`mmconnect.DenseConnector`
``vision_towers()``       ``name -> module`` of every vision tower (the tapped one first)
``connector_modules()``   ``name -> module`` of the connector and every module trained with
                          it (Mini-Gemini's patch info mining)
``language_model``        the LLM (HF's own attribute name on every family)
``tower_geometry()``      width, depth, image size, patch size, native grid, prefix tokens
``image_token_count()``   image tokens one image fills, for an image size
``frame_*`` methods       the per-frame path of training-free video answering
========================  ===============================================================

Examples:
    >>> family = family_model(model)  # a Dense model, PEFT-wrapped or not  # doctest: +SKIP
    >>> family.tower_geometry().grid  # doctest: +SKIP
    (24, 24)
    >>> family.image_token_count((336, 336))  # doctest: +SKIP
    576
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from mmconnect import DenseConnector, find_encoder_blocks
from mmconnect.registry import Registry
from mmconnect.validation import check_size_pair


@dataclass(frozen=True, kw_only=True)
class TowerGeometry:
    """What a connector sees of the tapped vision tower at its configured size.

    Attributes:
        width: channels ``C`` of its hidden states (the connector's ``vision_dim``).
        depth: its block count (the connector's ``num_layers``).
        image_size: ``(height, width)`` in pixels the tower is configured for.
        patch_size: pixels per patch side.
        grid: ``(rows, columns)`` of patch tokens at ``image_size``.
        prefix_tokens: tokens before the patches (CLS, registers) the tap drops.
    """

    width: int
    depth: int
    image_size: tuple[int, int]
    patch_size: int
    grid: tuple[int, int]
    prefix_tokens: int


def vision_config_geometry(vision_config: Any, tower: nn.Module) -> TowerGeometry:
    """:class:`TowerGeometry` of an HF ViT-style tower from its config (CLIP, SigLIP, ...).

    ``image_size`` and ``patch_size`` may be ints or ``(height, width)`` pairs; the grid is
    computed per side, so non-square towers get their real grid. The prefix-token count comes
    from the tower's structure (:func:`mmconnect.find_encoder_blocks`), not from its name.
    """
    image_size = check_size_pair(vision_config.image_size, "vision_config.image_size")
    patch = check_size_pair(vision_config.patch_size, "vision_config.patch_size")
    if patch[0] != patch[1]:
        raise ValueError(f"non-square patches {patch} are not supported")
    return TowerGeometry(
        width=vision_config.hidden_size,
        depth=vision_config.num_hidden_layers,
        image_size=image_size,
        patch_size=patch[0],
        grid=(image_size[0] // patch[0], image_size[1] // patch[1]),
        prefix_tokens=find_encoder_blocks(tower).num_prefix_tokens,
    )


class DenseFamilyModel(abc.ABC):
    """The interface of every Dense model, implemented by each family's inner HF model.

    Families with a fixed image size and one connector pass per image (LLaVA, Mini-Gemini) need
    only the abstract members; families with another image path (LLaVA-NeXT's AnyRes crops)
    override the ``frame_*`` and ``image_features`` methods.
    """

    #: The family's ``model_type`` (set by each family's model class).
    model_type: str

    @property
    @abc.abstractmethod
    def connector(self) -> DenseConnector:
        """The Dense Connector (tap -> fusion -> resampler -> projector)."""

    @abc.abstractmethod
    def vision_towers(self) -> dict[str, nn.Module]:
        """``attribute name -> module`` of every vision tower, the tapped one first."""

    def tapped_tower(self) -> nn.Module:
        """The vision tower the connector's tap reads (the first of :meth:`vision_towers`)."""
        return next(iter(self.vision_towers().values()))

    @abc.abstractmethod
    def connector_modules(self) -> dict[str, nn.Module]:
        """``attribute name -> module`` of the connector and the modules trained with it."""

    @abc.abstractmethod
    def tower_geometry(self) -> TowerGeometry:
        """The tapped tower's width, depth, image size, patch size, native grid, prefix tokens."""

    @abc.abstractmethod
    def image_token_count(self, image_size: Sequence[int] | None = None) -> int:
        """Image tokens one image of ``image_size`` (``(height, width)``) fills in the prompt.

        Families that resize every image to one size ignore ``image_size`` (``None`` allowed);
        AnyRes families need it.
        """

    # ------------------------------------------------------------------ video frames
    def frame_pixel_values(self, image_processor: Any, images: list[Image.Image]) -> Tensor:
        """Each frame preprocessed as one image of the model's input size: ``[T, 3, H, W]``."""
        pixels = torch.as_tensor(
            image_processor(images=images, return_tensors="pt")["pixel_values"]
        )
        return pixels

    def frame_features(self, pixel_values: Tensor) -> Tensor:
        """Every frame through the model's image path: ``[T, 3, H, W] -> [T, N, llm_dim]``.

        Raises:
            ValueError: the connector injects DeepStack residuals into the LLM, which tokens
                alone (placed in ``inputs_embeds`` by the caller) would leave out.
        """
        if self.connector.config.injection is not None:
            raise ValueError(
                "this model's connector adds DeepStack residuals inside the LLM (injection="
                f"{list(self.connector.config.injection.layers)}), which visual tokens alone leave "
                "out; call the model's forward / generate with input_ids and pixel_values instead"
            )
        return torch.stack(list(self.get_image_features(pixel_values).pooler_output))

    def frame_grid(self) -> tuple[int, int] | None:
        """The ``(rows, columns)`` grid the per-frame tokens form, or ``None`` when they form
        none (STI's pooled tokens follow the grid): the grid poolings need it."""
        grid = self.connector_input_grid()
        connector = self.connector
        return None if connector.extra_tokens(grid) else connector.token_grid(grid)

    def connector_input_grid(self) -> tuple[int, int]:
        """The token grid the connector receives for one image or frame (the tower's grid)."""
        return self.tower_geometry().grid

    def image_features(self, image_processor: Any, image: Image.Image) -> Tensor:
        """One image's visual tokens through the full image path: ``[1, N, llm_dim]``."""
        inputs = image_processor(images=[image], return_tensors="pt")
        device = self.tapped_tower().device
        pixels = torch.as_tensor(inputs["pixel_values"]).to(device)
        return self.get_image_features(pixels).pooler_output[0][None]


@dataclass(frozen=True, kw_only=True)
class Family:
    """A registered MLLM family: its ``model_type`` and the classes that make it up.

    Attributes:
        model_type: the HF ``model_type`` of its saved configs (``"dense_llava"``).
        config_class, model_class, generation_class, processor_class: the Dense HF classes,
            registered with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` /
            ``AutoProcessor``.
        source_class: the stock HF class the family converts from
            (``LlavaForConditionalGeneration``), or ``None`` when it has no stock counterpart.
        convert: ``convert(stock_model, connector) -> Dense model`` (``from_llava`` ...), given
            with ``source_class``.
        fixed_image_tokens: every image fills the same number of tokens (``False`` for AnyRes,
            whose count depends on the image size); the YAML training path needs ``True``.
        description: one line for listings and error messages.
    """

    model_type: str
    config_class: type
    model_class: type
    generation_class: type
    processor_class: type
    source_class: type | None = None
    convert: Callable[..., nn.Module] | None = None
    fixed_image_tokens: bool = True
    description: str = ""


_FAMILIES: Registry[Family] = Registry("family", describe=lambda family: family.description)


def register_family(family: Family) -> None:
    """Register ``family`` here and with the HF Auto classes.

    Idempotent for the same :class:`Family` (a module imported twice); another family under a
    registered ``model_type`` is refused.

    Raises:
        ValueError: ``model_type`` is taken by another family, or ``model_class`` does not
            implement :class:`DenseFamilyModel`.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    if (family.source_class is None) != (family.convert is None):
        raise ValueError(
            f"family {family.model_type!r}: source_class and convert go together (the stock class "
            "and the function converting it), got only one"
        )
    if not issubclass(family.model_class, DenseFamilyModel):
        raise ValueError(
            f"{family.model_class.__name__} must implement DenseFamilyModel to be registered as "
            f"the {family.model_type!r} family"
        )
    if family.model_type in _FAMILIES:
        if _FAMILIES[family.model_type] == family:
            return
        _FAMILIES.check_available(family.model_type)  # raises, naming the registered entry
    _FAMILIES.register(family.model_type, family)
    try:
        AutoConfig.register(family.model_type, family.config_class)
    except ValueError:
        return  # registered with the Auto classes by an earlier import of the same module
    AutoModel.register(family.config_class, family.model_class)
    AutoModelForImageTextToText.register(family.config_class, family.generation_class)
    AutoProcessor.register(family.config_class, family.processor_class)


def list_families() -> list[str]:
    """The registered families' ``model_type`` strings, in registration order."""
    return _FAMILIES.names()


def get_family(model_type: str) -> Family:
    """The registered family of ``model_type``.

    Raises:
        ValueError: no family has that ``model_type`` (the message lists the known ones).
    """
    if model_type not in _FAMILIES:
        raise ValueError(
            f"no Dense model family has model_type {model_type!r}; known: "
            f"{', '.join(list_families())}"
        )
    return _FAMILIES[model_type]


def convert_to_dense(model: nn.Module, connector: Any) -> nn.Module:
    """A Dense model around a stock HF model, by the family whose ``source_class`` it is.

    The tower, LLM and head are ``model``'s own modules (shared, not copied), and the Dense
    config holds ``model``'s own sub-configs, which those modules read (its attention
    implementation included); see each family's converter (``from_llava``,
    ``from_llava_next``) for what else is reused.

    Args:
        model: a stock HF model of a registered family's ``source_class`` (the most specific
            class wins when several match).
        connector: a :class:`mmconnect.ConnectorConfig` or a preset name.

    Raises:
        TypeError: no registered family converts ``type(model)``.
    """
    lineage = type(model).__mro__
    candidates = [
        family
        for family in map(get_family, list_families())
        if family.source_class is not None and family.source_class in lineage
    ]
    if not candidates:
        convertible = [
            get_family(name).source_class.__name__
            for name in list_families()
            if get_family(name).source_class is not None
        ]
        raise TypeError(
            f"no registered family converts a {type(model).__name__}; convertible: "
            f"{', '.join(convertible)}"
        )
    family = min(candidates, key=lambda family: lineage.index(family.source_class))
    return family.convert(model, connector)


def family_model(model: Any) -> DenseFamilyModel:
    """The :class:`DenseFamilyModel` inside ``model``: the inner model itself, its
    ``*ForConditionalGeneration`` wrapper, or either wrapped by PEFT.

    Raises:
        TypeError: ``model`` holds no Dense family model (the message lists the families).
    """
    candidate = model.get_base_model() if hasattr(model, "get_base_model") else model
    for inner in (candidate, getattr(candidate, "model", None)):
        if isinstance(inner, DenseFamilyModel):
            return inner
    raise TypeError(
        f"{type(model).__name__} is not a Dense model of a registered family "
        f"({', '.join(list_families()) or 'none registered'}); build one with the family's "
        "from_<family>() converter or load a saved one with the Auto classes"
    )


def generation_model(model: Any) -> Any:
    """``model`` itself when it is a registered family's ``*ForConditionalGeneration`` (or one
    wrapped by PEFT): what ``generate()`` needs.

    Raises:
        TypeError: ``model`` is an inner Dense model or no Dense model (the message names the
            class to pass).
    """
    family = get_family(family_model(model).model_type)
    candidate = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(candidate, family.generation_class):
        raise TypeError(
            f"model must be a {family.generation_class.__name__} (it generates text), got "
            f"{type(model).__name__}"
        )
    return model
