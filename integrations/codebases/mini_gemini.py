"""Drop-in Dense Connector for code derived from the original Mini-Gemini (MGM) repository.

MGM models encode images in ``encode_images(images, images_aux)`` on the causal-LM object:

* ``images`` are the LR CLIP inputs, ``[B, 3, 336, 336]``, or in HD mode ``[B, 5, 3, 336, 336]``
  (the 2x2 crops row-major, then the global view); ``images_aux`` the HR image ``[B, 3, S, S]``;
* ``get_model().get_vision_tower()(images)`` gives one CLIP layer, ``[N, 576, 1024]``;
* ``get_vision_tower_aux()(images_aux)`` gives the concatenated ConvNeXt map ``[B, 2880, S/4, S/4]``;
* ``unified_resampler(tokens, hr_map)`` runs patch info mining (``vlm_uni_query_projector``,
  ``vlm_uni_aux_projector``, ``vlm_uni_val_projector``) and returns ``(tokens, mined)``; the sum
  goes through ``get_model().mm_projector``; HD views end up ordered ``[global, 00, 01, 10, 11]``.

:func:`swap_connector` keeps all of that — the towers, the image pre-processing, the mining
modules and ``unified_resampler`` itself — and replaces the connector: ``mm_projector`` becomes a
:class:`mmconnect.DenseConnector` and ``encode_images`` a version that taps the CLIP tower's
layers, mines the final one (``placement="after"``, default) or the fused features
(``"before"``, with mining projections rebuilt at the fused width) and fuses per view::

    from mmconnect.integrations.codebases.mini_gemini import swap_connector
    swap_connector(model, connector)             # model: MGM's MGMLlamaForCausalLM (or alike)
    features = model.encode_images(images, images_aux)   # as before, now Dense
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmconnect import DenseConnector, LayerFeatures
from mmconnect.integrations.families.mini_gemini_vision import (
    check_placement,
    mine_and_connect,
    mining_width,
)

logger = logging.getLogger(__name__)

_MINING = ("vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")


def swap_connector(
    mgm_model: nn.Module, connector: DenseConnector, *, placement: str = "after"
) -> nn.Module:
    """Put a Dense Connector into an MGM-codebase model, in place.

    Args:
        mgm_model: the causal-LM object with ``get_model()``, ``encode_images`` and
            ``unified_resampler`` (MGM's ``MGMLlamaForCausalLM`` and its siblings).
        connector: the Dense Connector; its ``vision_dim`` must match the CLIP tower.
        placement: fuse ``"after"`` mining (mining unchanged) or ``"before"`` it (the query,
            key and value projections are rebuilt at the fused width and start untrained).

    Returns:
        ``mgm_model``: ``get_model().mm_projector`` is ``connector``; ``encode_images`` is
        replaced on this instance; ``config.mm_dense_connector`` records the connector config and
        ``config.mm_dense_placement`` the placement.

    Raises:
        ValueError: a piece of the MGM structure is missing, the widths do not fit, or the
            connector injects DeepStack residuals (which the codebase's LLM cannot take).
    """
    for attribute in ("get_model", "encode_images", "unified_resampler", "config"):
        if not hasattr(mgm_model, attribute):
            raise ValueError(
                f"{type(mgm_model).__name__} has no {attribute!r}: pass MGM's causal-LM object "
                "(the one whose encode_images(images, images_aux) builds the visual tokens)"
            )
    inner = mgm_model.get_model()
    for attribute in ("vision_tower", "mm_projector", *_MINING):
        if getattr(inner, attribute, None) is None:
            raise ValueError(
                f"{type(inner).__name__} has no {attribute!r}: not an MGM model with patch info "
                "mining (build it with its vision tower, aux tower and mining modules first)"
            )
    check_placement(placement, connector)
    if connector.config.injection is not None:
        raise ValueError(
            "the MGM codebase feeds the connector's tokens to its LLM and cannot add DeepStack "
            f"residuals (injection={list(connector.config.injection.layers)}); use a connector "
            "without injection, or Dense Mini-Gemini (mmconnect.integrations.families.mini_gemini)"
        )
    tower = _clip_tower(mgm_model)
    width = getattr(tower, "hidden_size", None)
    if isinstance(width, int) and width != connector.config.vision_dim:
        raise ValueError(
            f"connector vision_dim={connector.config.vision_dim} does not match the CLIP tower's "
            f"hidden_size ({width})"
        )
    reference = next(inner.mm_projector.parameters())
    connector = connector.to(device=reference.device, dtype=reference.dtype)
    queries = mining_width(connector, placement)
    if inner.vlm_uni_query_projector[-1].out_features != queries:
        _rebuild_mining(inner, queries, reference)
    inner.mm_projector = connector
    mgm_model.config.mm_dense_connector = connector.config.to_dict()
    mgm_model.config.mm_dense_placement = placement
    mgm_model._dense_tap = connector.make_tap(_hf_encoder(tower), keep_prefix=False)
    mgm_model._dense_placement = placement
    mgm_model.encode_images = types.MethodType(dense_encode_images, mgm_model)
    return mgm_model


def _clip_tower(mgm_model: nn.Module) -> nn.Module:
    tower = mgm_model.get_model().vision_tower
    return tower[0] if isinstance(tower, list | tuple) else tower  # MGM keeps it in a list for FSDP


def _hf_encoder(tower: nn.Module) -> nn.Module:
    """The HF CLIP model inside MGM's ``CLIPVisionTower`` wrapper (its own forward selects one
    layer; the tap needs the blocks)."""
    inner = getattr(tower, "vision_tower", None)
    return inner if isinstance(inner, nn.Module) else tower


def _rebuild_mining(inner: nn.Module, width: int, reference: Tensor) -> None:
    """New LN + Linear query / key / value projections producing ``width`` channels."""
    hr_width = inner.vlm_uni_aux_projector[-1].in_features
    logger.warning(
        "placement='before': mining queries are %d wide, new untrained vlm_uni projections",
        width,
    )

    def projection(in_width: int) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(in_width), nn.Linear(in_width, width)).to(
            device=reference.device, dtype=reference.dtype
        )

    inner.vlm_uni_query_projector = projection(width)
    inner.vlm_uni_aux_projector = projection(hr_width)
    inner.vlm_uni_val_projector = projection(hr_width)


def dense_encode_images(self: Any, images: Tensor, images_aux: Tensor | None = None) -> Tensor:
    """MGM's ``encode_images`` with a Dense Connector (installed by :func:`swap_connector`).

    Args:
        images: ``[B, 3, s, s]``, or ``[B, views, 3, s, s]`` in HD mode (crops, then global).
        images_aux: the HR image ``[B, 3, S, S]``, or ``None`` (no mining, as in MGM).

    Returns:
        ``[B, views * connector tokens, llm_dim]``, views ordered ``[global, 00, 01, 10, 11]``.
    """
    grid_side = int(getattr(self.config, "image_grid", 1))
    with_global = bool(getattr(self.config, "image_global", False)) and grid_side > 1
    batch = images.shape[0]
    if grid_side > 1:  # MGM's tower order: every image's crops, then every global view
        crops = images[:, : grid_side**2] if with_global else images
        flat = [crops.flatten(0, 1)] + ([images[:, -1]] if with_global else [])
        images = torch.cat(flat, dim=0)
    reference = next(_hf_encoder(_clip_tower(self)).parameters())
    features: LayerFeatures = self._dense_tap(
        images.to(device=reference.device, dtype=reference.dtype)
    )
    connector: DenseConnector = self.get_model().mm_projector
    if images_aux is None:
        tokens = connector(features, features.grid(connector.individual_layers[0]))
    else:
        hr_map = self.get_model().get_vision_tower_aux()(images_aux)
        hr_map = _hr_maps_in_tower_order(hr_map, grid_side, with_global).to(reference.dtype)

        def mining(queries: Tensor, windows: Tensor, grid: tuple[int, int]) -> Tensor:
            kept, mined = self.unified_resampler(queries, windows)  # MGM's own mining
            return kept + mined

        tokens = mine_and_connect(features, hr_map, connector, mining, self._dense_placement)
    if grid_side == 1:
        return tokens
    views = grid_side**2
    local = rearrange(tokens[: batch * views], "(b v) t d -> b (v t) d", b=batch)
    if not with_global:
        return local
    return torch.cat([tokens[batch * views :], local], dim=1)


def _hr_maps_in_tower_order(hr_map: Tensor, grid_side: int, with_global: bool) -> Tensor:
    """``[B, C, H, W]`` -> one map per CLIP input, in the order the tower saw them."""
    if grid_side == 1:
        return hr_map
    crops = rearrange(hr_map, "b c (gh h) (gw w) -> (b gh gw) c h w", gh=grid_side, gw=grid_side)
    if not with_global:
        return crops
    size = (hr_map.shape[-2] // grid_side, hr_map.shape[-1] // grid_side)
    glance = F.interpolate(hr_map, size=size, mode="bilinear", align_corners=False)
    return torch.cat([crops, glance], dim=0)
