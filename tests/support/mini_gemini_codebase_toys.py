"""A model object with the original Mini-Gemini codebase's structure and calling pattern, for the
codebase-swap tests and the bf16 suite.

``get_model()`` holds ``vision_tower`` (a wrapper around an HF CLIP that returns one layer),
``vision_tower_aux`` (a wrapper returning the concatenated ConvNeXt map), ``mm_projector`` and the
three ``vlm_uni_*`` mining projections; ``encode_images(images, images_aux)`` and
``unified_resampler`` compute as MGM does (HD: crops then global in the tower batch, global view
first in the output). The towers come from
:mod:`mmconnect.integrations.applications.tiny_models`: a CLIP of CLIP-L/336's depth and grid
(24 blocks, 336 px / patch 14) but 16 wide, a ConvNeXt of four one-block stages 8 / 16 / 32 / 64
wide; the projector maps to an LLM width of 24.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel

from mmconnect.integrations.applications.tiny_models import (
    PUBLISHED_GEOMETRY,
    tiny_timm_convnext,
    tiny_vision_tower,
)

WIDTH, LLM = 16, 24


class CLIPTower(nn.Module):
    """MGM's ``CLIPVisionTower``: the HF model in ``vision_tower``, layer -2 without CLS."""

    def __init__(self, model: CLIPVisionModel) -> None:
        super().__init__()
        self.vision_tower = model
        self.hidden_size = model.config.hidden_size

    def forward(self, images):
        states = self.vision_tower(images, output_hidden_states=True).hidden_states
        return states[-2][:, 1:]


class ConvNeXtAux(nn.Module):
    """MGM's aux tower: stem + stages, every stage upsampled to the first and concatenated."""

    def __init__(self, trunk) -> None:
        super().__init__()
        self.vision_stem, self.vision_stages = trunk.stem, trunk.stages
        self.hidden_size = sum(stage.blocks[-1].conv_dw.out_channels for stage in trunk.stages)

    def forward(self, images):
        x, outputs = self.vision_stem(images), []
        for stage in self.vision_stages:
            x = stage(x)
            outputs.append(x)
        size = outputs[0].shape[-2:]
        return torch.cat(
            [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outputs],
            dim=1,
        )


def _projection(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, width_out))


class Inner(nn.Module):
    def __init__(self, clip, convnext) -> None:
        super().__init__()
        self.vision_tower, self.vision_tower_aux = CLIPTower(clip), ConvNeXtAux(convnext)
        aux = self.vision_tower_aux.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(WIDTH, LLM), nn.GELU(), nn.Linear(LLM, LLM))
        self.vlm_uni_query_projector = _projection(WIDTH, WIDTH)
        self.vlm_uni_aux_projector = _projection(aux, WIDTH)
        self.vlm_uni_val_projector = _projection(aux, WIDTH)

    def get_vision_tower(self):
        return self.vision_tower

    def get_vision_tower_aux(self):
        return self.vision_tower_aux


class MGMStyleModel(nn.Module):
    """The causal-LM object's image path, following MGM's calling pattern."""

    def __init__(self, clip, convnext, image_grid: int = 1, image_global: bool = False) -> None:
        super().__init__()
        self.model = Inner(clip, convnext)
        self.config = types.SimpleNamespace(image_grid=image_grid, image_global=image_global)

    def get_model(self):
        return self.model

    def encode_images(self, images, images_aux=None):
        grid, with_global = self.config.image_grid, self.config.image_global
        if grid > 1:
            batch = images.shape[0]
            if with_global:
                global_images = images[:, -1:].flatten(0, 1)
                grid_images = images[:, :-1].flatten(0, 1)
                images = torch.cat([grid_images, global_images], dim=0)
            else:
                images = images.flatten(0, 1)
        features = self.get_model().get_vision_tower()(images)
        if with_global:
            global_features = features[-len(global_images) :]
            features = features[: len(grid_images)]
        if images_aux is not None:
            aux = self.get_model().get_vision_tower_aux()(images_aux)
            if with_global:
                aux_global = F.interpolate(
                    aux, scale_factor=1 / grid, mode="bilinear", align_corners=False
                )
                global_features, global_mined = self.unified_resampler(global_features, aux_global)
            if grid > 1:
                b, c, h, w = aux.shape
                aux = aux.reshape(b, c, grid, h // grid, grid, w // grid)
                aux = aux.permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
            features, mined = self.unified_resampler(features, aux)
            if grid > 1:
                features = features.reshape(batch, grid**2 * features.shape[1], -1)
                mined = mined.reshape(batch, grid**2 * mined.shape[1], -1)
            if with_global:
                features = torch.cat([global_features, features], dim=1)
                mined = torch.cat([global_mined, mined], dim=1)
            features = features + mined
        return self.get_model().mm_projector(features)

    def unified_resampler(self, images, images_aux):
        side = int(images.shape[1] ** 0.5)
        cell = images_aux.shape[-1] // side
        windows = images_aux.permute(0, 2, 3, 1).reshape(
            len(images_aux), side, cell, side, cell, -1
        )
        windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(len(images_aux), side**2, cell**2, -1)
        query = self.get_model().vlm_uni_query_projector(images)
        key = self.get_model().vlm_uni_aux_projector(windows)
        value = self.get_model().vlm_uni_val_projector(windows)
        attention = query[:, :, None] @ (key.transpose(-1, -2) / key.shape[-1] ** 0.5)
        return images, (attention.nan_to_num().softmax(-1) @ value).mean(2)


def towers() -> tuple[nn.Module, nn.Module]:
    """The frozen CLIP and ConvNeXt towers (each seeded with 0, eval mode)."""
    clip = tiny_vision_tower("clip", width=WIDTH, **PUBLISHED_GEOMETRY["clip"])
    convnext = tiny_timm_convnext(dims=(8, 16, 32, 64), num_classes=0)
    return clip.requires_grad_(False), convnext.requires_grad_(False)


def mgm_inputs(hr_size: int, grid: int, with_global: bool, seed: int = 1):
    """MGM's data pipeline: the LR images are bilinear downsamples of the normalised HR image."""
    hr = torch.randn(2, 3, hr_size, hr_size, generator=torch.Generator().manual_seed(seed))
    if grid == 1:
        return F.interpolate(hr, size=(336, 336), mode="bilinear", align_corners=False), hr
    large = F.interpolate(hr, size=(336 * grid,) * 2, mode="bilinear", align_corners=False)
    crops = large.reshape(2, 3, grid, 336, grid, 336).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
    views = [crops]
    if with_global:
        glance = F.interpolate(large, size=(336, 336), mode="bilinear", align_corners=False)
        views.append(glance[:, None])
    return torch.cat(views, dim=1), hr
