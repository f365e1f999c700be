"""``MultiLayerFeatureTap``: capture several layers of any vision encoder in one forward pass.

The tap hooks the encoder's blocks (found by :func:`mmconnect.encoder_blocks.find_encoder_blocks`)
instead of asking for ``output_hidden_states=True``: it keeps only the layers it was asked for,
can average groups of layers while they stream by (one running sum per group, so DCI holds
``O(groups)`` tensors rather than ``O(layers)``), and stops the forward once the last needed block
has run.

Examples:
    >>> tap = MultiLayerFeatureTap(clip_vision_model, layers=[-2, 7, 15])  # doctest: +SKIP
    >>> features = tap(pixel_values)                                        # doctest: +SKIP
    >>> features[23].shape                                                  # doctest: +SKIP
    torch.Size([1, 576, 1024])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmconnect.encoder_blocks import EncoderBlocks, find_encoder_blocks
from mmconnect.features import LayerFeatures
from mmconnect.layers import normalize_groups, normalize_layers


class _StopEncoder(Exception):
    """Raised from a hook to end the encoder's forward once every needed layer is captured."""


def _first_tensor(value: Any) -> Tensor:
    """A block's output may be a tensor or a tuple whose first entry is the hidden states."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(
        f"expected a block to take or return a tensor (or a tuple starting with one), got {type(value).__name__}"
    )


def _in_backward() -> bool:
    # Activation checkpointing re-runs blocks during backward; those replays must not be captured.
    return torch._C._current_graph_task_id() != -1


class MultiLayerFeatureTap:
    """Capture the outputs of chosen encoder layers with forward hooks.

    Args:
        encoder: the vision encoder (HF CLIP / SigLIP, timm ViT / ConvNeXt, open_clip ViT /
            ConvNeXt, or any module whose block list ``blocks`` names).
        layers: layer indices to capture individually, in the HF ``hidden_states`` convention
            (0 = embedding output, k = output of block k, negatives from the end).
        groups: layer groups to average while streaming (each a collection of layer indices in
            the same convention); their means appear in ``LayerFeatures.group_means`` and the
            member layers are not kept one by one.
        blocks: dotted path of the block list, overriding discovery (e.g. ``"encoder.layers"``).
        keep_prefix: keep CLS / register tokens instead of dropping them.
        early_exit: when called as ``tap(pixel_values)``, stop the forward after the last block
            any requested layer needs. The context-manager form never stops the forward, since
            the caller wants the encoder's own output.
        accumulate_dtype: dtype of the running group sums; ``None`` sums in the features' own
            dtype (as the official Dense Connector code does), ``torch.float32`` upcasts half
            precision features for accuracy. Means are returned in the features' dtype.
        num_prefix_tokens: overrides the prefix-token count read from the encoder's structure.

    Captured tensors are ``[B, tokens, C]``; 4-D stage outputs (ConvNeXt) are flattened in
    raster order with their grid recorded in ``LayerFeatures.grids``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        layers: Iterable[int] = (),
        *,
        groups: Sequence[Iterable[int]] = (),
        blocks: str | None = None,
        keep_prefix: bool = False,
        early_exit: bool = True,
        accumulate_dtype: torch.dtype | None = None,
        num_prefix_tokens: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.structure: EncoderBlocks = find_encoder_blocks(
            encoder, blocks, num_prefix_tokens=num_prefix_tokens
        )
        self.layers = normalize_layers(layers, self.num_layers, argument="layers")
        self.groups = normalize_groups(groups, self.num_layers, argument="groups")
        if not self.layers and not self.groups:
            raise ValueError(
                "nothing to capture: pass at least one index in layers= or one group in groups="
            )
        if accumulate_dtype is not None and not (
            isinstance(accumulate_dtype, torch.dtype) and accumulate_dtype.is_floating_point
        ):
            raise ValueError(
                f"accumulate_dtype must be None or a floating torch.dtype, got {accumulate_dtype!r}"
            )
        self.keep_prefix = keep_prefix
        self.early_exit = early_exit
        self.accumulate_dtype = accumulate_dtype

        self._group_of = {
            layer: index for index, group in enumerate(self.groups) for layer in group
        }
        self._needed = sorted(set(self.layers) | set(self._group_of))
        self._handles: list[RemovableHandle] = []
        self._stop_after_last = False
        self._expects_grad = False  # set per attach, see _attach
        self._warned_no_grad = False
        self._reset_pass()
        self._result: LayerFeatures | None = None

    # ------------------------------------------------------------------ public API
    @property
    def num_layers(self) -> int:
        """The number of blocks of the encoder; valid indices are ``0 .. num_layers``."""
        return self.structure.num_layers

    @property
    def num_prefix_tokens(self) -> int | None:
        """CLS / register tokens per sequence, from the encoder's structure (``None``: unknown)."""
        return self.structure.num_prefix_tokens

    @property
    def last_needed_layer(self) -> int:
        """The deepest layer the tap needs; with early exit no block after it runs."""
        return self._needed[-1]

    def __call__(self, pixel_values: Tensor, *args: Any, **kwargs: Any) -> LayerFeatures:
        """Run the encoder on ``pixel_values`` (``[B, 3, H, W]``) and return the captured layers.

        Extra arguments go to the encoder. Hooks are removed before returning, also on error.
        """
        self._attach(stop_after_last=self.early_exit)
        try:
            self.encoder(pixel_values, *args, **kwargs)
        except _StopEncoder:
            pass
        finally:
            self._detach()
        return self.features

    def __enter__(self) -> MultiLayerFeatureTap:
        self._attach(stop_after_last=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._detach()

    @property
    def features(self) -> LayerFeatures:
        """The layers captured by the latest forward pass.

        Raises:
            RuntimeError: no forward ran, or it ended before reaching a needed layer.
        """
        if self._result is None:
            missing = [layer for layer in self._needed if layer not in self._seen]
            if not self._seen:
                raise RuntimeError(
                    "no features captured yet: call tap(pixel_values) or run the encoder inside `with tap:`"
                )
            if missing:
                raise RuntimeError(
                    f"the encoder's forward ended before reaching layers {missing}; captured only "
                    f"{sorted(self._seen)}"
                )
            self._result = self._finish_pass()
        return self._result

    def remove(self) -> None:
        """Remove every hook this tap installed (idempotent)."""
        self._detach()

    @property
    def attached(self) -> bool:
        """Whether hooks are currently installed."""
        return bool(self._handles)

    # ------------------------------------------------------------------ hooks
    def _attach(self, *, stop_after_last: bool) -> None:
        if self._handles:
            raise RuntimeError("this tap is already attached; a tap can be active once at a time")
        self._stop_after_last = stop_after_last
        # A block that runs without grad inside a grad-enabled call cuts the tapped layers off the
        # encoder's graph (reentrant activation checkpointing does that): warn, once per attach.
        self._expects_grad = torch.is_grad_enabled() and any(
            parameter.requires_grad for parameter in self.encoder.parameters()
        )
        self._warned_no_grad = False
        self._reset_pass()
        self._result = None
        blocks = self.structure.blocks
        handles = [
            blocks[0].register_forward_pre_hook(self._on_first_block_input, with_kwargs=True)
        ]
        for layer in self._needed:
            if layer >= 1:
                handles.append(
                    blocks[layer - 1].register_forward_hook(self._make_output_hook(layer))
                )
        if self.structure.patch_embedding is not None:
            handles.append(
                self.structure.patch_embedding.register_forward_hook(self._on_patch_grid)
            )
        self._handles = handles

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_patch_grid(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not _in_backward() and isinstance(output, Tensor) and output.dim() == 4:
            self._patch_grid = (int(output.shape[-2]), int(output.shape[-1]))

    def _on_first_block_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _in_backward():
            return
        # A new forward pass starts here: forget the previous one.
        patch_grid = self._patch_grid
        self._reset_pass()
        self._result = None
        self._patch_grid = patch_grid
        if 0 in self._group_of or 0 in self.layers:
            value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            self._receive(0, _first_tensor(value))

    def _make_output_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not _in_backward():
                self._receive(layer, _first_tensor(output))

        return hook

    # ------------------------------------------------------------------ capture
    def _reset_pass(self) -> None:
        self._captured: dict[int, Tensor] = {}
        self._grids: dict[int, tuple[int, int]] = {}
        self._sums: list[Tensor | None] = [None] * len(self.groups)
        self._sum_dtype: list[torch.dtype | None] = [None] * len(self.groups)
        self._seen: set[int] = set()
        self._patch_grid: tuple[int, int] | None = None

    def _as_tokens(self, layer: int, value: Tensor) -> Tensor:
        """``[B, N, C]`` (prefix dropped unless kept) from a block's raw output."""
        if value.dim() == 4:  # ConvNeXt stage: [B, C, H, W]
            self._grids[layer] = (int(value.shape[-2]), int(value.shape[-1]))
            return rearrange(value, "b c h w -> b (h w) c")
        if value.dim() != 3:
            raise ValueError(
                f"layer {layer}: expected a [batch, tokens, channels] or [batch, channels, height, "
                f"width] block output, got shape {tuple(value.shape)}"
            )
        if not self.structure.batch_first:
            value = value.transpose(0, 1)
        prefix = self._prefix_count(layer, value)
        if (
            self._patch_grid is not None
            and value.shape[1] - prefix == self._patch_grid[0] * self._patch_grid[1]
        ):
            self._grids[layer] = self._patch_grid
        return value if self.keep_prefix else value[:, prefix:]

    def _prefix_count(self, layer: int, value: Tensor) -> int:
        if self.structure.num_prefix_tokens is not None:
            return self.structure.num_prefix_tokens
        if self._patch_grid is None:
            raise ValueError(
                f"cannot tell how many prefix tokens lead layer {layer} of {type(self.encoder).__name__}: "
                f"its structure does not say and it has no patch convolution; pass num_prefix_tokens="
            )
        return value.shape[1] - self._patch_grid[0] * self._patch_grid[1]

    def _receive(self, layer: int, value: Tensor) -> None:
        if self._expects_grad and not torch.is_grad_enabled() and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"layer {layer} of {type(self.encoder).__name__} was computed without grad although "
                "the call runs with grad and the encoder has trainable parameters, so no gradient "
                "will flow back through the tapped layers; this happens with reentrant activation "
                "checkpointing (use use_reentrant=False) or a forward wrapped in torch.no_grad",
                RuntimeWarning,
                stacklevel=2,
            )
        tokens = self._as_tokens(layer, value)
        self._seen.add(layer)
        if layer in self.layers:
            self._captured[layer] = tokens
        group = self._group_of.get(layer)
        if group is not None:
            self._accumulate(group, tokens)
        if self._stop_after_last and layer == self.last_needed_layer:
            raise _StopEncoder

    def _accumulate(self, group: int, tokens: Tensor) -> None:
        dtype = self.accumulate_dtype or tokens.dtype
        running = self._sums[group]
        if running is not None and running.shape != tokens.shape:
            raise ValueError(
                f"groups[{group}] mixes layers of different shapes ({tuple(running.shape)} and "
                f"{tuple(tokens.shape)}); only layers of one shape can be averaged"
            )
        if running is None:
            self._sum_dtype[group] = tokens.dtype
            # Own the buffer (never alias a block's output) so later additions may be in place.
            self._sums[group] = tokens.to(dtype, copy=True)
        elif torch.is_grad_enabled() and (running.requires_grad or tokens.requires_grad):
            self._sums[group] = running + tokens.to(dtype)  # keep the autograd graph intact
        else:
            running.add_(tokens.to(dtype))

    def _finish_pass(self) -> LayerFeatures:
        group_means: dict[tuple[int, ...], Tensor] = {}
        for group, running, dtype in zip(self.groups, self._sums, self._sum_dtype, strict=True):
            if running is None or dtype is None:
                raise RuntimeError(f"group {group} received no layer during the forward pass")
            group_means[group] = (running / len(group)).to(dtype)
        grids = {layer: self._grids[layer] for layer in self.layers if layer in self._grids}
        for group in self.groups:
            if group[0] in self._grids:
                grids.setdefault(group[0], self._grids[group[0]])
        return LayerFeatures(
            self._captured,
            grids=grids,
            group_means=group_means,
            num_prefix_tokens=(self.structure.num_prefix_tokens or 0) if self.keep_prefix else 0,
        )
