"""Drop-in Dense Connector for code derived from the original LLaVA repository.

LLaVA and its forks encode images as::

    def encode_images(self, images):
        image_features = self.get_model().get_vision_tower()(images)    # [B, 576, C], one layer
        image_features = self.get_model().mm_projector(image_features)  # [B, 576, D]
        return image_features

Replace that pair and leave ``encode_images`` untouched::

    from mmconnect.integrations.codebases.llava import swap_connector
    swap_connector(model.get_model(), connector)

After the swap ``vision_tower(images)`` returns the tapped layers (:class:`mmconnect.LayerFeatures`)
and ``mm_projector`` is the :class:`mmconnect.DenseConnector` that turns them into LLM tokens.
Everything else the codebase reads from the tower (``config``, ``hidden_size``, ``dtype``,
``device``, ``image_processor``, ``is_loaded``...) still answers from the original tower;
``num_patches`` answers the connector's token count and ``num_patches_per_side`` the side of the
connector's token grid (what LLaVA-1.6's spatial merge of AnyRes crops reshapes by).

A swapped model is saved with :func:`save_pretrained` and loaded back with :func:`load_pretrained`
(or :func:`restore_connector` on a model loaded by other means). The swap records the connector
config in the model config (``mm_dense_connector``) and sets ``mm_projector_type`` to
``"dense_connector"``, which LLaVA's own projector builder refuses: LLaVA's plain
``from_pretrained`` of a swapped checkpoint fails loudly instead of silently building a fresh
random ``mm_projector``.

Known to work with haotian-liu/LLaVA at commit c121f0432da27facab705978f83c4ada465e46fd
(its pin transformers 4.37.2); see docs/llava-codebase.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures
from mmconnect.checkpoint import atomic_save_directory, open_safetensors, read_state_dict
from mmconnect.connector import FINGERPRINT_KEY
from mmconnect.validation import check_size_pair

#: Model-config attribute holding the swapped connector's config (``ConnectorConfig.to_dict()``).
CONFIG_KEY = "mm_dense_connector"
#: Model-config attribute keeping the ``mm_projector_type`` the model had before the swap.
ORIGINAL_PROJECTOR_KEY = "mm_dense_original_projector_type"
#: ``mm_projector_type`` written by the swap: LLaVA's ``build_vision_projector`` raises
#: ``ValueError: Unknown projector type`` for it, so a plain LLaVA reload cannot go silently wrong.
DENSE_PROJECTOR_TYPE = "dense_connector"
#: Where LLaVA's causal LM keeps the projector in its state dict.
_PROJECTOR_PREFIX = "model.mm_projector."


class DenseVisionTower(nn.Module):
    """Wraps a LLaVA-style vision tower so that calling it returns the layers a connector needs.

    Args:
        tower: the codebase's tower object (LLaVA's ``CLIPVisionTower``, whose HF model sits at
            ``tower.vision_tower``) or a bare HF / timm / open_clip encoder.
        connector: the Dense Connector that will consume the features.
    """

    def __init__(self, tower: nn.Module, connector: DenseConnector) -> None:
        super().__init__()
        self.tower = tower
        inner = getattr(tower, "vision_tower", None)
        # Tap the HF model inside LLaVA's wrapper: the wrapper's own forward asks for all hidden states.
        # Not registered as a submodule: it already lives in ``tower``, and a second registration
        # would put every tower weight twice into state_dict() (and break safetensors saving).
        object.__setattr__(self, "encoder", inner if isinstance(inner, nn.Module) else tower)
        # Bound methods, not the module: the connector is registered as mm_projector already.
        self._connector_tokens = connector.num_tokens
        self._connector_grid = connector.token_grid
        self._fusion = connector.config.fusion.kind
        self._tap = connector.make_tap(self.encoder)

    def forward(self, images: Tensor | list[Tensor]) -> LayerFeatures | list[LayerFeatures]:
        """``[B, 3, H, W]`` -> :class:`LayerFeatures`; a list of ``[3, H, W]`` / ``[1, 3, H, W]``
        images (LLaVA's variable-size path) -> one :class:`LayerFeatures` per image."""
        if isinstance(images, list | tuple):
            return [
                self.forward(image if image.dim() == 4 else image.unsqueeze(0)) for image in images
            ]
        reference = next(self.encoder.parameters())
        return self._tap(images.to(device=reference.device, dtype=reference.dtype))

    def _encoder_grid(self, attribute: str) -> tuple[int, int]:
        size = getattr(getattr(self.encoder, "config", None), "image_size", None)
        patch = getattr(getattr(self.encoder, "config", None), "patch_size", None)
        try:
            height, width = check_size_pair(size, "config.image_size")
            patch_height, patch_width = check_size_pair(patch, "config.patch_size")
        except (TypeError, ValueError) as error:
            # Not AttributeError: __getattr__ would answer with the wrapped tower's one-layer value.
            raise ValueError(
                f"{attribute} needs the tower's config.image_size and config.patch_size (ints or "
                f"(height, width) pairs), got image_size={size!r}, patch_size={patch!r}: {error}"
            ) from None
        return height // patch_height, width // patch_width

    @property
    def num_patches(self) -> int:
        """Visual tokens per image after the connector (LLaVA code reads it to size prompts)."""
        return self._connector_tokens(self._encoder_grid("num_patches"))

    @property
    def num_patches_per_side(self) -> int:
        """Side of the connector's square token grid (12 for the efficient DCI at 336 px).

        LLaVA-1.6's spatial merge (``mm_patch_merge_type="spatial..."``) reshapes every AnyRes
        crop's tokens into ``num_patches_per_side`` x ``num_patches_per_side``.

        Raises:
            ValueError: the connector's tokens form no square grid (STI appends pooled tokens).
        """
        grid = self._encoder_grid("num_patches_per_side")
        height, width = self._connector_grid(grid)
        tokens = self._connector_tokens(grid)
        if tokens != height * width or height != width:
            raise ValueError(
                f"the {self._fusion!r} connector gives {tokens} tokens per image on a "
                f"{height}x{width} grid: they form no square grid, so LLaVA's spatial patch merge "
                "cannot reshape them; use mm_patch_merge_type='flat' (STI appends pooled tokens "
                "after the grid) or a square resample grid"
            )
        return height

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("tower"), name)


def swap_connector(llava_model: nn.Module, connector: DenseConnector) -> nn.Module:
    """Put a Dense Connector into a LLaVA-codebase model in place of its tower + projector pair.

    The connector is moved to the device and dtype of the ``mm_projector`` it replaces (the
    tower's when that projector has no parameters): LLaVA's builder loads models in fp16 and
    its training casts the tower to bf16 / fp16, and a fresh fp32 connector would feed fp32
    tokens to a half-precision LLM.

    Args:
        llava_model: the object holding ``vision_tower`` and ``mm_projector`` (LLaVA's
            ``LlavaLlamaModel``, i.e. ``model.get_model()``).
        connector: the Dense Connector (its ``vision_dim`` must match the tower).

    Returns:
        ``llava_model``, changed in place: ``vision_tower`` wraps the old tower in a
        :class:`DenseVisionTower`, ``mm_projector`` is ``connector``. When ``llava_model`` has a
        ``config`` (the real classes do), ``config.mm_dense_connector`` records the connector
        config and ``config.mm_projector_type`` becomes ``"dense_connector"`` (the previous type
        is kept in ``config.mm_dense_original_projector_type``).

    Raises:
        ValueError: ``llava_model`` lacks ``vision_tower`` / ``mm_projector``, the tower is not
            loaded yet, the widths differ, the config asks for a spatial patch merge the
            connector's tokens cannot form, or the connector injects DeepStack residuals (which
            the codebase's LLM cannot take).
    """
    for attribute in ("vision_tower", "mm_projector"):
        if not hasattr(llava_model, attribute):
            raise ValueError(
                f"{type(llava_model).__name__} has no {attribute!r}: pass the module that holds the "
                "vision tower and mm_projector (model.get_model() in the LLaVA codebase)"
            )
    if connector.config.injection is not None:
        raise ValueError(
            "the LLaVA codebase feeds the connector's tokens to its LLM and cannot add DeepStack "
            f"residuals (injection={list(connector.config.injection.layers)}); use a connector "
            "without injection, or Dense LLaVA (mmconnect.integrations.families.llava)"
        )
    tower = llava_model.vision_tower
    if isinstance(tower, list | tuple):  # LLaVA keeps an unloaded tower in a list for FSDP
        tower = tower[0]
    if isinstance(tower, DenseVisionTower):
        tower = tower.tower
    if getattr(tower, "is_loaded", True) is False:  # LLaVA builds towers with delay_load
        raise ValueError(
            f"the vision tower {getattr(tower, 'vision_tower_name', type(tower).__name__)!r} is not "
            "loaded yet: swap after LLaVA loads it (initialize_vision_modules, or "
            "get_vision_tower().load_model() after from_pretrained)"
        )
    width = getattr(tower, "hidden_size", None)
    if isinstance(width, int) and width != connector.config.vision_dim:
        raise ValueError(
            f"connector vision_dim={connector.config.vision_dim} does not match the tower's hidden_size ({width})"
        )
    config = getattr(llava_model, "config", None)
    wrapped = DenseVisionTower(tower, connector)
    merge = getattr(config, "mm_patch_merge_type", "flat") or "flat"
    if merge.startswith("spatial"):
        try:
            _ = wrapped.num_patches_per_side
        except ValueError as error:
            raise ValueError(
                f"mm_patch_merge_type={merge!r} reshapes each image's tokens into a square grid, "
                f"which this connector cannot give: {error}"
            ) from None
    reference = _reference_parameter(llava_model.mm_projector, wrapped.encoder)
    if reference is not None:
        connector = connector.to(device=reference.device, dtype=reference.dtype)
    _accept_parameter_only_states(connector)
    llava_model.vision_tower = wrapped
    llava_model.mm_projector = connector
    if config is not None:
        _mark_config(config, connector)
    return llava_model


def _reference_parameter(projector: nn.Module, encoder: nn.Module) -> Tensor | None:
    """The tensor whose device / dtype the new connector takes: the replaced projector's first
    floating parameter (what the codebase chose for the trainable part), else the tower's."""
    for module in (projector, encoder):
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter
    return None


def _fill_fingerprint(
    module: nn.Module,
    state_dict: dict[str, Tensor],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: a parameter-only state (LLaVA saves ``named_parameters()``, never buffers)
    gets this connector's own fingerprint, so LLaVA's strict reload accepts it. A state that
    lacks a parameter too is left alone and fails with every missing key listed."""
    key = prefix + FINGERPRINT_KEY
    if key in state_dict:
        return  # a saved fingerprint is checked by DenseConnector as usual
    if all(prefix + name in state_dict for name, _ in module.named_parameters()):
        state_dict[key] = getattr(module, FINGERPRINT_KEY).detach().clone()


def _accept_parameter_only_states(connector: DenseConnector) -> None:
    if not getattr(connector, "_accepts_parameter_only_states", False):
        connector.register_load_state_dict_pre_hook(_fill_fingerprint)
        connector._accepts_parameter_only_states = True


def _mark_config(config: Any, connector: DenseConnector) -> None:
    """Record the connector in the model config (saved in config.json with the model)."""
    current = getattr(config, "mm_projector_type", None)
    if current != DENSE_PROJECTOR_TYPE:
        setattr(config, ORIGINAL_PROJECTOR_KEY, current)
    setattr(config, CONFIG_KEY, connector.config.to_dict())
    config.mm_projector_type = DENSE_PROJECTOR_TYPE


# ---------------------------------------------------------------------------- save / reload


def save_pretrained(model: nn.Module, directory: str | Path, **save_kwargs: Any) -> None:
    """Save a swapped LLaVA causal LM with ``model.save_pretrained`` and the connector marker.

    LLaVA's ``initialize_vision_modules`` rewrites ``config.mm_projector_type`` from its
    arguments; this re-records the marker from the live connector first, so the saved
    ``config.json`` always says what :func:`load_pretrained` needs (and what makes LLaVA's plain
    reload refuse the checkpoint instead of building a random projector).

    Args:
        model: the causal LM (``LlavaLlamaForCausalLM``) after :func:`swap_connector`.
        directory: where to save.
        save_kwargs: passed to ``model.save_pretrained`` (e.g. ``safe_serialization``).

    The save is atomic (:func:`mmconnect.checkpoint.atomic_save_directory`): if it fails
    midway, an earlier checkpoint in ``directory`` stays intact.

    Raises:
        ValueError: ``model.get_model().mm_projector`` is not a :class:`DenseConnector`.
    """
    connector = _swapped_connector(model)
    _mark_config(model.config, connector)
    # atomic: a save that fails midway leaves an earlier checkpoint in ``directory`` intact
    with atomic_save_directory(directory) as staging:
        model.save_pretrained(str(staging), **save_kwargs)


def load_pretrained(
    model_class: Any,
    directory: str | Path,
    *,
    load_tower: bool = True,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint written from a swapped model: LLaVA's model, then the Dense Connector.

    Builds the model with ``model_class.from_pretrained`` (its stock projector type restored in
    the config so LLaVA's builder accepts it), loads the vision tower as LLaVA's builder does
    (cast to the model's dtype), then :func:`restore_connector`.

    Args:
        model_class: LLaVA's causal-LM class (``LlavaLlamaForCausalLM`` or a sibling) with
            ``config_class`` and ``from_pretrained``.
        directory: the checkpoint directory (``config.json`` + weights).
        load_tower: load the vision tower's weights (``tower.load_model()``) if not loaded.
        from_pretrained_kwargs: passed to ``from_pretrained`` (``torch_dtype``, ...).

    Returns:
        The model with the saved connector swapped in and its weights loaded.

    Raises:
        ValueError: the checkpoint was not saved from a swapped model, or its connector weights
            do not match its recorded connector config.
    """
    config = model_class.config_class.from_pretrained(str(directory))
    if getattr(config, CONFIG_KEY, None) is None:
        raise ValueError(
            f"{str(directory)!r} has no {CONFIG_KEY!r} in its config.json: it was not saved from a "
            "model with a swapped Dense Connector; load it with the model class's from_pretrained"
        )
    config.mm_projector_type = getattr(config, ORIGINAL_PROJECTOR_KEY, None) or "linear"
    model = model_class.from_pretrained(str(directory), config=config, **from_pretrained_kwargs)
    # Read before the tower loads: afterwards model.dtype answers the tower's first weight (fp32).
    device, dtype = model.device, model.dtype
    tower = model.get_vision_tower()
    if load_tower and not getattr(tower, "is_loaded", True):
        tower.load_model()
    tower.to(device=device, dtype=dtype)  # as LLaVA's builder does after loading
    return restore_connector(model, directory)


def restore_connector(model: nn.Module, directory: str | Path) -> nn.Module:
    """Swap the connector recorded in ``model.config`` into ``model`` and load its saved weights.

    For a model loaded by other means (e.g. your own copy of LLaVA's builder): the model's config
    must carry ``mm_dense_connector`` (written by :func:`swap_connector`), and ``directory`` holds
    the checkpoint's weights (``*.safetensors`` or ``pytorch_model*.bin``, sharded or not) with
    the connector under ``model.mm_projector.``.

    Raises:
        ValueError: the config has no connector record, or the weights do not fit it.
        FileNotFoundError: ``directory`` holds no weights file.
    """
    record = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(record, Mapping):
        raise ValueError(
            f"model.config has no {CONFIG_KEY!r} connector record (got {record!r}): the checkpoint "
            "was not saved from a model with a swapped Dense Connector"
        )
    connector = DenseConnector(ConnectorConfig.from_dict(record))
    state = _read_prefixed(Path(directory), _PROJECTOR_PREFIX)
    connector.load_checked_state_dict(state, source=f"{str(directory)!r} ({_PROJECTOR_PREFIX}*)")
    swap_connector(model.get_model(), connector)
    return model


def _swapped_connector(model: nn.Module) -> DenseConnector:
    connector = getattr(model.get_model(), "mm_projector", None)
    if not isinstance(connector, DenseConnector):
        raise ValueError(
            f"model.get_model().mm_projector is a {type(connector).__name__}, not a DenseConnector: "
            "call swap_connector(model.get_model(), connector) first"
        )
    return connector


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred (as transformers does)."""
    for pattern, index in (
        ("*.safetensors", "model.safetensors.index.json"),
        ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
    ):
        if (directory / index).is_file():
            shards = json.loads((directory / index).read_text())["weight_map"].values()
            return [directory / name for name in sorted(set(shards))]
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"{str(directory)!r} holds no weights: expected model.safetensors, sharded *.safetensors "
        "with an index, or pytorch_model*.bin"
    )


def _read_prefixed(directory: Path, prefix: str) -> dict[str, Tensor]:
    """Tensors under ``prefix`` from a checkpoint directory, prefix removed; reads only those."""
    found: dict[str, Tensor] = {}
    for path in _weight_files(directory):
        if path.suffix == ".safetensors":
            with open_safetensors(path) as file:  # a truncated / corrupt file is named
                for key in file.keys():  # noqa: SIM118 (safe_open is no dict)
                    if key.startswith(prefix):
                        found[key[len(prefix) :]] = file.get_tensor(key)
        else:  # never unpickle objects: weights_only; mmap avoids reading the whole LLM
            state = read_state_dict(path, mmap=True)
            found.update({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    if not found:
        raise ValueError(f"no {prefix}* weights in {str(directory)!r}")
    return found
