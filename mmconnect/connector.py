"""``DenseConnector``: fuse tapped encoder layers, resample, project to the LLM width.

Examples:
    >>> config = ConnectorConfig.from_preset("dc-dci-clip-l-336", vision_dim=32, llm_dim=64)
    >>> connector = DenseConnector(config)
    >>> connector.num_tokens((24, 24))
    576
    >>> tap = connector.make_tap(clip_vision_model)          # doctest: +SKIP
    >>> tokens = connector(tap(pixel_values))                 # [B, 576, 64]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmconnect.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_save_directory,
    read_json,
    read_state_dict,
    shape_problems,
    write_state_dict,
)
from mmconnect.config import ConnectorConfig, format1_fields
from mmconnect.encoder_blocks import find_encoder_blocks
from mmconnect.features import LayerFeatures, check_grid, infer_square_grid
from mmconnect.fusion import build_fusion, require_layer
from mmconnect.projectors import GridProjector, build_projector, load_projector_weights
from mmconnect.resample import TokenResampler
from mmconnect.tap import MultiLayerFeatureTap
from mmconnect.validation import check_int_pair

#: State-dict key of the buffer that records which config a connector's weights were made with.
FINGERPRINT_KEY = "config_fingerprint"


def config_fingerprint(config: ConnectorConfig) -> int:
    """A 64-bit digest of everything in ``config`` that changes what the weights mean.

    Saved with the weights, it lets a load notice a config edited after saving even when every
    shape still fits (e.g. SCI <-> DCI with two groups, or other layers). It hashes the config in
    the flat layout of config format 1 (:func:`mmconnect.config.format1_fields`), so weights
    saved under a format-1 config match the same config read today; layer indices are
    normalised (-2 and 23 in a 24-block encoder give one fingerprint) and the DCI
    ``accumulate_dtype`` (numerics only) is left out.
    """
    fields = format1_fields(config)
    fields.pop("accumulate_dtype")
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _check_count(tokens: Tensor, expected: int, component: str) -> None:
    # A component whose output differs from its declaration would make every processor count
    # wrong: fail here, naming it, rather than deep inside an LLM's embedding merge.
    if tokens.shape[1] != expected:
        raise RuntimeError(
            f"the {component} returned {tokens.shape[1]} tokens but declares {expected} "
            "(num_tokens(grid)); fix its num_tokens / output_grid"
        )


class DenseConnector(nn.Module):
    """A Dense Connector: multi-layer fusion -> optional resampling -> projector.

    Input: a mapping ``layer -> [B, N, C]`` (a :class:`LayerFeatures` from a tap, or any dict
    with non-negative HF ``hidden_states`` indices; prefix tokens already dropped).
    Output: ``[B, num_tokens(grid), llm_dim]``.

    Token contract: the fusion, the resampler and a :class:`~mmconnect.projectors.GridProjector`
    each declare ``num_tokens(grid)`` / ``output_grid(grid)`` for the grid they receive;
    :meth:`num_tokens` and :meth:`token_grid` compose them in the order ``forward`` runs them
    (fusion -> resampler -> projector, or fusion -> projector -> resampler with
    ``ResampleSpec(placement="after_projector")``). Token-wise projectors keep the count.

    Attributes:
        config: the :class:`ConnectorConfig`.
        fusion: the fusion module (STI / SCI / DCI / single layer).
        resampler: the token resampler, or ``None``.
        projector: the projector (``mlp2x_gelu`` keys ``0.*``, ``2.*`` as in LLaVA).
    """

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        if not isinstance(config, ConnectorConfig):
            raise TypeError(f"config must be a ConnectorConfig, got {type(config).__name__}")
        self.config = config
        self.fusion = build_fusion(config.fusion, config.num_layers)
        resample = config.resample
        self.resampler = None if resample is None else TokenResampler(resample.grid, resample.mode)
        # Saved with the weights: a load under another config fails clearly (see _load_from_state_dict).
        self.register_buffer(
            FINGERPRINT_KEY, torch.tensor(config_fingerprint(config), dtype=torch.int64)
        )
        self.projector = build_projector(
            config.projector, self.fusion.output_channels(config.vision_dim), config.llm_dim
        )
        # DeepStack: one projector per injected vision layer, from the tower's width.
        injection = config.injection
        self.injection_layers: tuple[int, ...] = (
            () if injection is None else injection.normalized(config.num_layers).layers
        )
        self.injection = (
            None
            if injection is None
            else nn.ModuleList(
                build_projector(injection.projector, config.vision_dim, config.llm_dim)
                for _ in self.injection_layers
            )
        )

    # ------------------------------------------------------------------ what it reads
    @property
    def captured_layers(self) -> tuple[int, ...]:
        """Every hidden-state index a tap must capture for this connector when it keeps each
        layer (``streaming=False``): non-negative, sorted, DCI group members included."""
        members = {layer for group in self.fusion.groups for layer in group}
        return tuple(sorted(set(self.individual_layers) | members))

    @property
    def individual_layers(self) -> tuple[int, ...]:
        """The layers read one by one: the fusion's, final layer first, then the injected
        (DeepStack) layers it does not read already (a streaming tap captures only these, plus
        the :attr:`groups` means)."""
        fused = self.fusion.individual_layers
        return fused + tuple(layer for layer in self.injection_layers if layer not in fused)

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """The DCI layer groups (non-negative indices); empty for other fusions."""
        return self.fusion.groups

    def make_tap(
        self, encoder: nn.Module, *, streaming: bool = True, **tap_options: Any
    ) -> MultiLayerFeatureTap:
        """A :class:`MultiLayerFeatureTap` on ``encoder`` that captures what this connector needs.

        Both forms give the same fused features, bit for bit: the streaming tap's group means
        round as the official ``torch.sum(torch.stack(group), 0) / n`` does (or, with
        the DCI spec's ``accumulate_dtype``, sum and divide in that dtype), as :meth:`fuse` does on the
        member layers. The tap may be called from several threads at once.

        Args:
            encoder: the vision encoder, or one wrapped by ``torch.compile`` (its depth is read
                from the wrapped module).
            streaming: average DCI groups inside the tap (one running sum per group) instead of
                holding every member layer.
            tap_options: further :class:`MultiLayerFeatureTap` options (``blocks``, ``early_exit``...).

        Raises:
            ValueError: the encoder's depth differs from ``config.num_layers``.
        """
        # Check the depth first: on a shallower encoder the layer indices would otherwise fail
        # with a less helpful out-of-range error.
        depth = find_encoder_blocks(encoder, tap_options.get("blocks")).num_layers
        if depth != self.config.num_layers:
            raise ValueError(
                f"the encoder has {depth} blocks but the connector config says "
                f"num_layers={self.config.num_layers}; build the config for this encoder"
            )
        if streaming:
            tap_options.setdefault("accumulate_dtype", self.fusion.accumulate_dtype)
            return MultiLayerFeatureTap(
                encoder, self.individual_layers, groups=self.groups, **tap_options
            )
        return MultiLayerFeatureTap(encoder, self.captured_layers, **tap_options)

    # ------------------------------------------------------------------ token bookkeeping
    def num_tokens(self, grid: tuple[int, int]) -> int:
        """The output token count for an encoder token grid ``(height, width)``; runs nothing.

        Raises:
            ValueError: ``grid`` is not a pair of positive ints, or no component can take it
                (an STI window larger than the grid; STI's extra tokens into a grid component).
        """
        return self._token_layout(grid)[1]

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The ``(height, width)`` grid formed by the leading output tokens for an encoder grid.

        The last grid-changing component's output grid (the resample target, a grid projector's
        grid), else the encoder grid itself; tokens beyond its area (STI's pooled tokens) follow
        it and form no grid.
        """
        return self._token_layout(grid)[0]

    def extra_tokens(self, grid: tuple[int, int]) -> int:
        """How many output tokens follow the :meth:`token_grid` tokens and form no grid (STI's
        pooled tokens); 0 when the whole output forms ``token_grid(grid)``."""
        (height, width), count = self._token_layout(grid)
        return count - height * width

    def _grid_stages(self) -> list[tuple[str, nn.Module]]:
        """The components after the fusion that work on the token grid, in forward order."""
        stages: list[tuple[str, nn.Module]] = []
        if isinstance(self.projector, GridProjector):
            stages.append((f"projector {self.config.projector.name!r}", self.projector))
        if self.resampler is not None:
            resampler = (f"resampler ({self.config.resample.mode!r})", self.resampler)
            after = self.config.resample.placement == "after_projector"
            stages.insert(len(stages) if after else 0, resampler)
        return stages

    def _token_layout(self, grid: tuple[int, int]) -> tuple[tuple[int, int], int]:
        """``(leading grid, token count)`` after every component, for an encoder grid."""
        grid = check_int_pair(grid, "grid")
        count, lead = self.fusion.num_tokens(grid), tuple(self.fusion.output_grid(grid))
        source = f"fusion {self.config.fusion.kind!r}"  # what made the tokens so far
        for name, stage in self._grid_stages():
            extra = count - lead[0] * lead[1]
            if extra and not (isinstance(stage, GridProjector) and stage.accepts_extra_tokens):
                raise ValueError(
                    f"the {source} gives {extra} tokens after its {lead[0]}x{lead[1]} grid that "
                    f"form no grid, but the {name} works on a whole token grid; use a token-wise "
                    "projector, another fusion, or no resampling after a learned-query projector"
                )
            count, lead = stage.num_tokens(lead), tuple(stage.output_grid(lead))
            source = name
        for level, projector in enumerate(self.injection or ()):
            injected = (
                projector.num_tokens(grid)
                if isinstance(projector, GridProjector)
                else grid[0] * grid[1]
            )
            if injected != count:
                raise ValueError(
                    f"the injection projector of layer {self.injection_layers[level]} gives "
                    f"{injected} tokens for the {grid[0]}x{grid[1]} grid but the connector gives "
                    f"{count}: DeepStack adds each level to the image tokens one to one, so both "
                    "paths must make the same count (the same merge, no resampling or STI)"
                )
        return lead, count

    @property
    def fused_dim(self) -> int:
        """Channel width of :meth:`fuse`'s output (the projector's input)."""
        return self.fusion.output_channels(self.config.vision_dim)

    # ------------------------------------------------------------------ forward
    def _resolve_grid(
        self, features: Mapping[int, Tensor], grid: tuple[int, int] | None
    ) -> tuple[int, int]:
        final = require_layer(features, self.fusion.final_layer)
        if grid is None:
            if isinstance(features, LayerFeatures) and self.fusion.final_layer in features.grids:
                grid = features.grids[self.fusion.final_layer]
            else:
                grid = infer_square_grid(final.shape[1])
        check_grid(final, grid, argument=f"features[{self.fusion.final_layer}]")
        return grid

    def _check_widths(self, features: Mapping[int, Tensor]) -> None:
        expected = self.config.vision_dim
        tensors = [
            (f"layer {layer}", require_layer(features, layer))
            for layer in self.fusion.individual_layers
        ]
        streamed = features.group_means if isinstance(features, LayerFeatures) else {}
        tensors += [(f"group {group[0]}..{group[-1]}", mean) for group, mean in streamed.items()]
        for group in self.fusion.groups:  # groups averaged here: check their member layers
            if group not in streamed:
                tensors += [(f"layer {layer}", require_layer(features, layer)) for layer in group]
        for name, tensor in tensors:
            if tensor.dim() != 3:
                raise ValueError(
                    f"features {name} must be [batch, tokens, channels], got {tuple(tensor.shape)}"
                )
            if tensor.shape[-1] != expected:
                raise ValueError(
                    f"features {name} has {tensor.shape[-1]} channels but config.vision_dim is "
                    f"{expected}: channel widths differ across fused layers or from the config"
                )

    def fuse(self, features: Mapping[int, Tensor], grid: tuple[int, int] | None = None) -> Tensor:
        """The fused features before the projector: ``[B, N, C_fused]``.

        Args:
            features: layer index -> ``[B, h*w, C]``.
            grid: ``(h, w)``; defaults to the grid the tap recorded, else a square grid.

        With ``ResampleSpec(placement="before_projector")`` the result is already resampled.
        """
        return self._fuse(features, grid)[0]

    def forward(
        self, features: Mapping[int, Tensor], grid: tuple[int, int] | None = None
    ) -> Tensor:
        """Fuse, project and (if so configured) resample: ``-> [B, num_tokens(grid), llm_dim]``."""
        fused, lead = self._fuse(features, grid)
        weight = next(self.projector.parameters(), None)
        if weight is not None and fused.dtype != weight.dtype:
            fused = fused.to(weight.dtype)  # e.g. a bf16 tower feeding an fp32 connector
        if isinstance(self.projector, GridProjector):
            projected = self.projector(fused, lead)
            expected = self.projector.num_tokens(lead)
            lead = tuple(self.projector.output_grid(lead))
            _check_count(projected, expected, f"projector {self.config.projector.name!r}")
        else:
            projected = self.projector(fused)
        if self.resampler is not None and self.config.resample.placement == "after_projector":
            projected = self.resampler(projected, lead)
        return projected

    def forward_with_injections(
        self, features: Mapping[int, Tensor], grid: tuple[int, int] | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The tokens and the DeepStack residuals: ``([B, N, D], ([B, N, D], ...))``.

        Residual ``i`` is ``injection projector i`` applied to ``features[injection_layers[i]]``,
        to be added to the LLM's hidden states at the image positions after LLM layer ``i``
        (:mod:`~mmconnect.injection`). Without an injection spec the residuals are ``()``.

        Raises:
            ValueError: a layer is missing from ``features``, or the paths' counts differ.
        """
        tokens = self(features, grid)
        if self.injection is None:
            return tokens, ()
        grid = self._resolve_grid(features, grid)
        self._token_layout(grid)  # the count check of every level, before any work
        residuals = []
        for layer, projector in zip(self.injection_layers, self.injection, strict=True):
            hidden = require_layer(features, layer)
            weight = next(projector.parameters(), None)
            if weight is not None and hidden.dtype != weight.dtype:
                hidden = hidden.to(weight.dtype)
            if isinstance(projector, GridProjector):
                residual = projector(hidden, grid)
            else:
                residual = projector(hidden)
            _check_count(residual, tokens.shape[1], f"injection projector of layer {layer}")
            residuals.append(residual)
        return tokens, tuple(residuals)

    def _fuse(
        self, features: Mapping[int, Tensor], grid: tuple[int, int] | None
    ) -> tuple[Tensor, tuple[int, int]]:
        """The fused (and, before the projector, resampled) tokens and their leading grid."""
        if not isinstance(features, Mapping):
            raise TypeError(
                "features must be a mapping from layer index to [B, tokens, C] (e.g. a tap's "
                f"LayerFeatures or LayerFeatures.from_hidden_states(...)), got {type(features).__name__}"
            )
        grid = self._resolve_grid(features, grid)
        self._check_widths(features)
        self._token_layout(grid)  # refuse a composition the grid cannot take before running it
        fused = self.fusion(features, grid)
        _check_count(fused, self.fusion.num_tokens(grid), f"fusion {self.config.fusion.kind!r}")
        lead = tuple(self.fusion.output_grid(grid))
        if self.resampler is not None and self.config.resample.placement == "before_projector":
            fused = self.resampler(fused, lead)
            lead = self.resampler.output_grid(lead)
        return fused, lead

    # ------------------------------------------------------------------ weights
    def load_projector_weights(self, source: str | Path | Mapping[str, Tensor]) -> None:
        """Load official LLaVA / Dense Connector ``mm_projector.bin`` or HF LLaVA projector weights.

        See :func:`mmconnect.projectors.load_projector_weights`.
        """
        load_projector_weights(self.projector, source)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``, atomically.

        Both files are written into a temporary sibling that then replaces ``directory``
        (:func:`mmconnect.checkpoint.atomic_save_directory`): a save that fails midway leaves
        the earlier checkpoint intact, and other files in ``directory`` are kept.

        Raises:
            ValueError: ``directory`` is a file or cannot be created.
            OSError: writing failed (disk full, ...); ``directory`` is then unchanged.
        """
        with atomic_save_directory(directory) as staging:
            self.config.save(staging / CONFIG_NAME)
            write_state_dict(self.state_dict(), staging / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, map_location: str | torch.device = "cpu"
    ) -> DenseConnector:
        """Load a connector written by :meth:`save_pretrained`.

        A ``config.json`` of config format 1 is upgraded (:func:`mmconnect.config.upgrade_format1`);
        its weights load, fingerprint included.

        Raises:
            FileNotFoundError: ``directory``, its ``config.json`` or its ``model.safetensors`` is
                missing.
            ValueError: ``directory`` is a file; ``config.json`` is not a JSON connector config;
                ``model.safetensors`` is truncated or corrupt; the weights do not match the
                config (missing / unexpected keys or shapes). Each message names the file.
        """
        directory = Path(directory)
        if directory.is_file():
            raise ValueError(
                f"{str(directory)!r} is a file; DenseConnector.from_pretrained expects the "
                f"directory written by save_pretrained (with {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"connector directory {str(directory)!r} does not exist")
        config_path = directory / CONFIG_NAME
        data = read_json(config_path, what="connector config")
        try:
            config = ConnectorConfig.from_dict(data)
        except (TypeError, ValueError) as error:
            raise type(error)(f"connector config {str(config_path)!r}: {error}") from None
        connector = cls(config)
        state = read_state_dict(directory / WEIGHTS_NAME)
        dtypes = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
        if len(dtypes) == 1:  # keep the saved precision (e.g. a bf16 connector stays bf16)
            connector.to(dtypes.pop())
        connector.load_checked_state_dict(state, source=str(directory / WEIGHTS_NAME))
        return connector.to(map_location)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Every load path (load_state_dict, from_pretrained, resuming training) passes here.
        saved = state_dict.get(prefix + FINGERPRINT_KEY)
        if saved is not None and not saved.is_meta and int(saved) != int(self.config_fingerprint):
            raise ValueError(
                "these connector weights were saved with a different connector config than this "
                f"one (fusion {self.config.fusion}, projector={self.config.projector.name!r}, "
                f"resample={self.config.resample}); load them with the config they were saved with"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def load_checked_state_dict(
        self, state: Mapping[str, Tensor], *, source: str = "state dict"
    ) -> None:
        """``load_state_dict`` with one clear error listing every key or shape that does not fit."""
        problems = shape_problems(
            {key: value.shape for key, value in state.items()},
            {key: value.shape for key, value in self.state_dict().items()},
            where="in the file",
        )
        if problems:
            raise ValueError(
                f"{source} does not match the connector config: " + "; ".join(problems)
            )
        self.load_state_dict(state)
