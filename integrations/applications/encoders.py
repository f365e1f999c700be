"""Vision encoders by name or local path, and what a Dense Connector sees of them.

:func:`load_encoder` takes a local checkpoint directory (an HF vision model, or an HF LLaVA whose
``vision_tower`` is used) or the name of a tiny random test encoder (no download: built from
configs by :mod:`mmconnect.integrations.applications.tiny_models`). :func:`describe_encoder`
runs the tap on one blank image and reports the layer count, width, prefix tokens, token grid
and the token count of every preset; ``mmconnect inspect`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmconnect import ConnectorConfig, DenseConnector, MultiLayerFeatureTap, list_presets
from mmconnect.integrations.applications.tiny_models import TINY_ENCODERS, tiny_encoder
from mmconnect.validation import check_positive_int


def load_encoder(spec: str) -> tuple[nn.Module, int | None]:
    """The encoder named by ``spec`` and its native image size (``None`` when unknown).

    Args:
        spec: a local directory (HF vision model, or HF LLaVA: its ``vision_tower``) or one of
            :data:`~mmconnect.integrations.applications.tiny_models.TINY_ENCODERS` (seed 0,
            eval mode).

    Raises:
        ValueError: ``spec`` is neither (the message lists the tiny names), or the folder holds
            no loadable model.
    """
    if spec in TINY_ENCODERS:
        return tiny_encoder(spec)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"encoder {spec!r} is neither a local checkpoint directory nor a tiny test encoder "
            f"({', '.join(TINY_ENCODERS)})"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"encoder {spec!r} is a folder without config.json; expected a checkpoint folder "
            "saved with save_pretrained (an HF vision model or a (Dense) LLaVA)"
        )
    # Importing mmconnect.integrations (this package) registered the Dense model types, so a
    # saved Dense LLaVA / LLaVA-NeXT / MGM folder loads here in a fresh process.
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(
            f"encoder {spec!r} cannot be loaded as a Hugging Face model: {error}"
        ) from None
    tower = getattr(model, "vision_tower", None)
    encoder = tower if isinstance(tower, nn.Module) else model
    vision_config = getattr(config, "vision_config", config)
    return encoder, getattr(vision_config, "image_size", None)


def _patch_geometry(encoder: nn.Module) -> tuple[int | None, bool]:
    """``(patch size or None, whether other image sizes than the native one are accepted)``.

    HF CLIP / SigLIP towers (called without ``interpolate_pos_encoding``, as the tap calls them)
    and timm ViTs without ``dynamic_img_size`` take only their native size; convolutional and
    unknown encoders are not constrained here (their forward decides).
    """
    config = getattr(encoder, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int) and getattr(config, "image_size", None) is not None:
        return patch, False
    embed = getattr(encoder, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is not None:
        side = patch[0] if isinstance(patch, tuple | list) else patch
        return int(side), bool(getattr(encoder, "dynamic_img_size", False))
    return None, True


def check_image_size(
    encoder: nn.Module, image_size: int, native_size: int | None, *, option: str = "image_size"
) -> None:
    """Check that ``encoder`` accepts square ``image_size`` images.

    Args:
        encoder: the vision encoder.
        image_size: the side in pixels to check.
        native_size: the encoder's own image size (``None`` when unknown).
        option: how the caller names the size in messages (``"--image-size"``).

    Raises:
        TypeError: ``image_size`` is not an int.
        ValueError: ``image_size`` is below 1, not a multiple of the patch size, or not the
            native size of an encoder that cannot interpolate its position embeddings; the
            message says which value is expected.
    """
    check_positive_int(image_size, option)
    patch, flexible = _patch_geometry(encoder)
    kind = type(encoder).__name__
    if not flexible and native_size is not None and image_size != native_size:
        raise ValueError(
            f"{option} {image_size} is not a size {kind} accepts: it takes {native_size} px "
            f"images only (its position embeddings are not interpolated); pass {option} "
            f"{native_size} or leave it out"
        )
    if patch is not None and image_size % patch:
        raise ValueError(
            f"{option} {image_size} is not a multiple of {kind}'s patch size {patch}; expected "
            f"a multiple of {patch}"
            + (f" (its native size is {native_size})" if native_size is not None else "")
        )


@dataclass(frozen=True)
class EncoderDescription:
    """What :func:`describe_encoder` found."""

    kind: str
    blocks_path: str
    num_layers: int
    width: int
    num_prefix_tokens: int | None
    image_size: int
    grid: tuple[int, int]
    preset_tokens: dict[str, int | str]

    def render(self) -> str:
        """Human-readable lines for the command line."""
        lines = [
            f"encoder        {self.kind}",
            f"blocks         {self.blocks_path} ({self.num_layers} blocks; layer indices 0..{self.num_layers})",
            f"width          {self.width} (layer 0)",
            f"prefix tokens  {self.num_prefix_tokens if self.num_prefix_tokens is not None else 'none found in its structure'}",
            f"token grid     {self.grid[0]}x{self.grid[1]} at {self.image_size} px",
            "preset tokens:",
        ]
        width = max(len(name) for name in self.preset_tokens)
        lines += [f"  {name.ljust(width)}  {tokens}" for name, tokens in self.preset_tokens.items()]
        return "\n".join(lines)


def describe_encoder(encoder: nn.Module, image_size: int) -> EncoderDescription:
    """Tap layer 0 of ``encoder`` on one blank ``image_size`` image and describe it.

    A preset applies when its depth equals the encoder's; otherwise its row says which depth it
    needs. Token counts use the encoder's grid with the preset's fusion.
    """
    tap = MultiLayerFeatureTap(encoder, layers=[0])
    try:
        with torch.no_grad():
            features = tap(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as error:  # e.g. a convolutional encoder given too small an image
        raise ValueError(
            f"image_size {image_size}: {type(encoder).__name__} cannot run on a "
            f"{image_size}x{image_size} image ({error}); use its native size"
        ) from None
    grid = features.grid(0)
    width = features[0].shape[-1]
    counts: dict[str, int | str] = {}
    for name in list_presets():
        preset = ConnectorConfig.from_preset(name)
        if preset.num_layers != tap.num_layers:
            counts[name] = f"n/a (needs {preset.num_layers} blocks)"
            continue
        with torch.device("meta"):  # token bookkeeping only
            connector = DenseConnector(preset.replace(vision_dim=width))
        try:
            counts[name] = connector.num_tokens(grid)
        except ValueError as error:
            counts[name] = f"n/a ({error})"
    return EncoderDescription(
        kind=type(encoder).__name__,
        blocks_path=tap.structure.path,
        num_layers=tap.num_layers,
        width=width,
        num_prefix_tokens=tap.num_prefix_tokens,
        image_size=image_size,
        grid=grid,
        preset_tokens=counts,
    )
