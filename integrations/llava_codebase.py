"""Drop-in Dense Connector for code derived from the original LLaVA repository.

LLaVA and its forks encode images as::

    def encode_images(self, images):
        image_features = self.get_model().get_vision_tower()(images)    # [B, 576, C], one layer
        image_features = self.get_model().mm_projector(image_features)  # [B, 576, D]
        return image_features

Replace that pair and leave ``encode_images`` untouched::

    from mmconnect.integrations.llava_codebase import swap_connector
    swap_connector(model.get_model(), connector)

After the swap ``vision_tower(images)`` returns the tapped layers (:class:`mmconnect.LayerFeatures`)
and ``mm_projector`` is the :class:`mmconnect.DenseConnector` that turns them into LLM tokens.
Everything else the codebase reads from the tower (``config``, ``hidden_size``, ``dtype``,
``device``, ``image_processor``, ``is_loaded``...) still answers from the original tower;
``num_patches`` answers the connector's token count.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mmconnect import DenseConnector, LayerFeatures


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
        self._connector_tokens = connector.num_tokens
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

    @property
    def num_patches(self) -> int:
        """Visual tokens per image after the connector (LLaVA code reads it to size prompts)."""
        size = getattr(getattr(self.encoder, "config", None), "image_size", None)
        patch = getattr(getattr(self.encoder, "config", None), "patch_size", None)
        if size is None or patch is None:
            # Not AttributeError: __getattr__ would answer with the wrapped tower's one-layer count.
            raise ValueError(
                "num_patches needs the tower's config.image_size and config.patch_size"
            )
        return self._connector_tokens((size // patch, size // patch))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("tower"), name)


def swap_connector(llava_model: nn.Module, connector: DenseConnector) -> nn.Module:
    """Put a Dense Connector into a LLaVA-codebase model in place of its tower + projector pair.

    Args:
        llava_model: the object holding ``vision_tower`` and ``mm_projector`` (LLaVA's
            ``LlavaLlamaModel``, i.e. ``model.get_model()``).
        connector: the Dense Connector (its ``vision_dim`` must match the tower).

    Returns:
        ``llava_model``, changed in place: ``vision_tower`` wraps the old tower in a
        :class:`DenseVisionTower`, ``mm_projector`` is ``connector``.

    Raises:
        ValueError: ``llava_model`` lacks ``vision_tower`` / ``mm_projector``, or the widths differ.
    """
    for attribute in ("vision_tower", "mm_projector"):
        if not hasattr(llava_model, attribute):
            raise ValueError(
                f"{type(llava_model).__name__} has no {attribute!r}: pass the module that holds the "
                "vision tower and mm_projector (model.get_model() in the LLaVA codebase)"
            )
    tower = llava_model.vision_tower
    if isinstance(tower, list | tuple):  # LLaVA keeps an unloaded tower in a list for FSDP
        tower = tower[0]
    if isinstance(tower, DenseVisionTower):
        tower = tower.tower
    width = getattr(tower, "hidden_size", None)
    if isinstance(width, int) and width != connector.config.vision_dim:
        raise ValueError(
            f"connector vision_dim={connector.config.vision_dim} does not match the tower's hidden_size ({width})"
        )
    llava_model.vision_tower = DenseVisionTower(tower, connector)
    llava_model.mm_projector = connector
    return llava_model
