"""``MultiLayerFeatureTap``: capture several layers of any vision encoder in one forward pass.

The tap hooks the encoder's blocks (found by :func:`mmconnect.encoder_blocks.find_encoder_blocks`)
instead of asking for ``output_hidden_states=True``: it keeps only the layers it was asked for,
can average groups of layers while they stream by (one running sum per group, so DCI holds
``O(groups)`` tensors rather than ``O(layers)``), and stops the forward once the last needed block
has run.

One tap, or one encoder, may be shared by threads: every call (and every ``with tap:``) registers
its own hooks, which act only in the thread that registered them, and keeps its capture state to
itself. An encoder wrapped by ``torch.compile`` is tapped through the module it wraps and runs
compiled.

Examples:
    >>> tap = MultiLayerFeatureTap(clip_vision_model, layers=[-2, 7, 15])  # doctest: +SKIP
    >>> features = tap(pixel_values)                                        # doctest: +SKIP
    >>> features[23].shape                                                  # doctest: +SKIP
    torch.Size([1, 576, 1024])
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmconnect.encoder_blocks import EncoderBlocks, find_encoder_blocks, unwrap_compiled
from mmconnect.features import LayerFeatures
from mmconnect.layers import normalize_groups, normalize_layers
from mmconnect.validation import check_bool


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


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's CPU kernels compute a reduction of ``dtype`` in (fp32 for half types)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _untraced(hook: Callable) -> Callable:
    """Keep ``torch.compile`` from tracing a hook: hooks mutate Python state and raise to stop.

    Only when dynamo is already imported (anyone compiling has imported it): importing it just
    for this would cost every process a second.
    """
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo.disable(hook) if dynamo is not None else hook


class _GroupSum:
    """The running sum of one layer group, added up as ``torch.stack(members).sum(0)`` does.

    torch's CPU sum over the stacked dimension accumulates in ``_opmath(dtype)`` (fp32 for half
    types, rounded once at the end) in blocks of 16 members: members ``0..15`` are summed one by
    one, the block total is moved to a second accumulator, the next block starts from zero, and
    so on for 4 levels (level ``j`` is flushed every ``16 ** j`` members); the levels are added
    at the end. Below 16 members that is a plain running sum. Mirroring it makes the streamed
    sum equal the stacked one bit for bit while holding at most 4 accumulators, never the
    members (verified for 1..300 members in ``tests/core/test_fusion.py``).
    """

    _LEVELS = 4

    def __init__(self, size: int, dtype: torch.dtype, output_dtype: torch.dtype) -> None:
        self.size = size
        self.dtype = dtype  # the dtype the sum is rounded to and divided in (the stack's dtype)
        self.output_dtype = output_dtype  # the dtype of the mean (the features' dtype)
        power = max(4, (size - 1).bit_length() // self._LEVELS)  # torch's level_power
        self._step = 1 << power
        self._mask = self._step - 1
        self._power = power
        self._levels: list[Tensor | None] = [None] * self._LEVELS
        self.count = 0

    @staticmethod
    def _add(total: Tensor | None, value: Tensor) -> Tensor:
        if total is None:
            return value  # always a buffer this sum owns (see add)
        if torch.is_grad_enabled() and (total.requires_grad or value.requires_grad):
            return total + value  # keep the autograd graph intact
        return total.add_(value)

    def add(self, tokens: Tensor) -> None:
        """Add the next member, ``[B, N, C]``, in the features' dtype."""
        levels = self._levels
        # Round to the stacked dtype first (as ``tensor.to(dtype)`` before stacking does), then
        # widen. The buffer must be our own, never an alias of a block's output, so that later
        # additions may be in place: copy unless a conversion already made a new tensor.
        value = tokens.to(self.dtype)
        value = value.to(_opmath(self.dtype), copy=value is tokens)
        levels[0] = self._add(levels[0], value)
        self.count += 1
        if self.count % self._step:
            return
        for level in range(1, self._LEVELS):  # a block of 16 is complete: carry it up
            if levels[level - 1] is not None:
                levels[level] = self._add(levels[level], levels[level - 1])
                levels[level - 1] = None
            if self.count & (self._mask << (level * self._power)):
                break

    def total(self) -> Tensor:
        """The sum of the members, rounded once to ``dtype``."""
        levels = [level for level in self._levels if level is not None]
        total = levels[0]
        for level in levels[1:]:
            total = total + level
        return total.to(self.dtype)


class _Capture:
    """The hooks and capture state of one ``tap(...)`` call or one ``with tap:`` block.

    Its hooks act only in ``thread`` (the one that attached them), so forwards of the shared
    encoder in other threads, which fire the same hooks, leave this capture alone.
    """

    def __init__(self, tap: MultiLayerFeatureTap, *, stop_after_last: bool) -> None:
        self.tap = tap
        self.thread = threading.get_ident()
        self.stop_after_last = stop_after_last
        # A block that runs without grad inside a grad-enabled call cuts the tapped layers off the
        # encoder's graph (reentrant activation checkpointing does that): warn, once per capture.
        self.expects_grad = torch.is_grad_enabled() and any(
            parameter.requires_grad for parameter in tap.encoder.parameters()
        )
        self.warned_no_grad = False
        self.handles: list[RemovableHandle] = []
        self.result: LayerFeatures | None = None
        self.input_dtype: torch.dtype | None = None
        self.reset()

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        structure = self.tap.structure
        blocks = structure.blocks
        try:
            self.handles.append(
                unwrap_compiled(self.tap.encoder).register_forward_pre_hook(
                    _untraced(self._on_encoder_input), with_kwargs=True
                )
            )
            self.handles.append(
                blocks[0].register_forward_pre_hook(
                    _untraced(self._on_first_block_input), with_kwargs=True
                )
            )
            for layer in self.tap._needed:
                if layer >= 1:
                    self.handles.append(
                        blocks[layer - 1].register_forward_hook(
                            _untraced(self._make_output_hook(layer))
                        )
                    )
            if structure.patch_embedding is not None:
                self.handles.append(
                    structure.patch_embedding.register_forward_hook(_untraced(self._on_patch_grid))
                )
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _active(self) -> bool:
        return threading.get_ident() == self.thread and not _in_backward()

    # ``kwargs`` has a default: torch registers a with_kwargs hook in two steps, and a forward in
    # another thread may call it in between without kwargs (it then only checks the thread).
    def _on_encoder_input(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        if not self._active():
            return
        value = (kwargs or {}).get("pixel_values", args[0] if args else None)
        if isinstance(value, Tensor) and value.is_floating_point():
            self.input_dtype = value.dtype

    def _on_patch_grid(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._active() and isinstance(output, Tensor) and output.dim() == 4:
            self.patch_grid = (int(output.shape[-2]), int(output.shape[-1]))

    def _on_first_block_input(
        self, module: nn.Module, args: tuple, kwargs: dict | None = None
    ) -> None:
        if not self._active():
            return
        kwargs = kwargs or {}
        # A new forward pass starts here: forget the previous one (but not its patch grid).
        patch_grid = self.patch_grid
        self.reset()
        self.patch_grid = patch_grid
        if 0 in self.tap._needed:
            value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            self.receive(0, _first_tensor(value))

    def _make_output_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._active():
                self.receive(layer, _first_tensor(output))

        return hook

    # ------------------------------------------------------------------ capture
    def reset(self) -> None:
        self.captured: dict[int, Tensor] = {}
        self.grids: dict[int, tuple[int, int]] = {}
        self.sums: list[_GroupSum | None] = [None] * len(self.tap.groups)
        self.shapes: list[tuple[int, ...] | None] = [None] * len(self.tap.groups)
        self.seen: set[int] = set()
        self.patch_grid: tuple[int, int] | None = None
        self.result = None

    def _as_tokens(self, layer: int, value: Tensor) -> Tensor:
        """``[B, N, C]`` (prefix dropped unless kept) from a block's raw output."""
        if value.dim() == 2:  # packed sequences (Qwen2-VL family): [seq, C], no prefix tokens
            if self.tap.structure.num_prefix_tokens:
                raise ValueError(
                    f"layer {layer}: a packed [tokens, channels] block output cannot drop "
                    f"num_prefix_tokens={self.tap.structure.num_prefix_tokens} per image (the "
                    "images' boundaries are not in it); pass num_prefix_tokens=0"
                )
            return value[None]
        if value.dim() == 4:  # ConvNeXt stage: [B, C, H, W]
            self.grids[layer] = (int(value.shape[-2]), int(value.shape[-1]))
            return rearrange(value, "b c h w -> b (h w) c")
        if value.dim() != 3:
            raise ValueError(
                f"layer {layer}: expected a [batch, tokens, channels], packed [tokens, channels] "
                f"or [batch, channels, height, width] block output, got shape {tuple(value.shape)}"
            )
        if not self.tap.structure.batch_first:
            value = value.transpose(0, 1)
        prefix = self._prefix_count(layer, value)
        if (
            self.patch_grid is not None
            and value.shape[1] - prefix == self.patch_grid[0] * self.patch_grid[1]
        ):
            self.grids[layer] = self.patch_grid
        return value if self.tap.keep_prefix else value[:, prefix:]

    def _prefix_count(self, layer: int, value: Tensor) -> int:
        if self.tap.structure.num_prefix_tokens is not None:
            return self.tap.structure.num_prefix_tokens
        if self.patch_grid is None:
            raise ValueError(
                f"cannot tell how many prefix tokens lead layer {layer} of "
                f"{type(self.tap.encoder).__name__}: its structure does not say and it has no "
                "patch convolution; pass num_prefix_tokens="
            )
        return value.shape[1] - self.patch_grid[0] * self.patch_grid[1]

    def receive(self, layer: int, value: Tensor) -> None:
        tap = self.tap
        if self.expects_grad and not torch.is_grad_enabled() and not self.warned_no_grad:
            self.warned_no_grad = True
            warnings.warn(
                f"layer {layer} of {type(tap.encoder).__name__} was computed without grad although "
                "the call runs with grad and the encoder has trainable parameters, so no gradient "
                "will flow back through the tapped layers; this happens with reentrant activation "
                "checkpointing (use use_reentrant=False) or a forward wrapped in torch.no_grad",
                RuntimeWarning,
                stacklevel=2,
            )
        if layer == tap.num_layers and tap.final_norm is not None:
            # The tower's output norm belongs to its last layer where the family's connector
            # reads the tower's output (last_hidden_state), e.g. SigLIP's post_layernorm.
            value = tap.final_norm(value)
        tokens = self._as_tokens(layer, value)
        # Fuse in the images' dtype, as the official code casts each hidden state to it.
        if self.input_dtype is not None and tokens.dtype != self.input_dtype:
            tokens = tokens.to(self.input_dtype)
        self.seen.add(layer)
        if layer in tap.individual_layers:
            self.captured[layer] = tokens
        group = tap._group_of.get(layer)
        if group is not None:
            self._accumulate(group, tokens)
        if self.stop_after_last and layer == tap.last_needed_layer:
            raise _StopEncoder

    def _accumulate(self, group: int, tokens: Tensor) -> None:
        shape = self.shapes[group]
        if shape is not None and shape != tuple(tokens.shape):
            raise ValueError(
                f"groups[{group}] mixes layers of different shapes ({shape} and "
                f"{tuple(tokens.shape)}); only layers of one shape can be averaged"
            )
        running = self.sums[group]
        if running is None:
            self.shapes[group] = tuple(tokens.shape)
            running = self.sums[group] = _GroupSum(
                len(self.tap.groups[group]), self.tap.accumulate_dtype or tokens.dtype, tokens.dtype
            )
        running.add(tokens)

    def features(self) -> LayerFeatures:
        if self.result is None:
            missing = [layer for layer in self.tap._needed if layer not in self.seen]
            if not self.seen:
                raise RuntimeError(
                    "no features captured yet: call tap(pixel_values) or run the encoder inside `with tap:`"
                )
            if missing:
                raise RuntimeError(
                    f"the encoder's forward ended before reaching layers {missing}; captured only "
                    f"{sorted(self.seen)}"
                )
            self.result = self._finish()
        return self.result

    def _finish(self) -> LayerFeatures:
        tap = self.tap
        group_means: dict[tuple[int, ...], Tensor] = {}
        for group, running in zip(tap.groups, self.sums, strict=True):
            if running is None:
                raise RuntimeError(f"group {group} received no layer during the forward pass")
            # Rounded once to the accumulation dtype, divided in it, as `stack(...).sum(0) / n`.
            mean = running.total() / len(group)
            group_means[group] = mean.to(running.output_dtype)
        grids = {layer: self.grids[layer] for layer in tap.individual_layers if layer in self.grids}
        for group in tap.groups:
            if group[0] in self.grids:
                grids.setdefault(group[0], self.grids[group[0]])
        return LayerFeatures(
            self.captured,
            grids=grids,
            group_means=group_means,
            num_prefix_tokens=(tap.structure.num_prefix_tokens or 0) if tap.keep_prefix else 0,
        )


class MultiLayerFeatureTap:
    """Capture the outputs of chosen encoder layers with forward hooks.

    Args:
        encoder: the vision encoder (HF CLIP / SigLIP, timm ViT / ConvNeXt, open_clip ViT /
            ConvNeXt, or any module whose block list ``blocks`` names), or such an encoder
            wrapped by ``torch.compile`` (its blocks are found in the wrapped module, and the
            forward runs compiled; the hooks run outside the compiled graphs).
        layers: layer indices captured individually (the connector's ``individual_layers``), in
            the HF ``hidden_states`` convention (0 = embedding output, k = output of block k,
            negatives from the end). Kept, normalised to non-negative indices, as
            ``individual_layers``.
        groups: layer groups to average while streaming (each a collection of layer indices in
            the same convention); their means appear in ``LayerFeatures.group_means`` and the
            member layers are not kept one by one.
        blocks: dotted path of the block list, overriding discovery (e.g. ``"encoder.layers"``).
        keep_prefix: keep CLS / register tokens instead of dropping them.
        early_exit: when called as ``tap(pixel_values)``, stop the forward after the last block
            any requested layer needs. The context-manager form never stops the forward, since
            the caller wants the encoder's own output.
        accumulate_dtype: how group means are computed.

            * ``None`` (default, the official rounding): each mean equals
              ``torch.sum(torch.stack(members), 0) / len(members)`` in the features' dtype, bit
              for bit on the CPU: the members are summed in fp32 (for bf16 / fp16 features; in
              their own dtype otherwise) in the order torch's CPU sum uses, the sum is rounded
              once to the features' dtype and divided in that dtype. One fp32 sum per group is
              held, never the members. In fp16 the rounded sum overflows to ``inf`` once it
              passes 65504, as the official code's does.
            * a floating dtype such as ``torch.float32`` (overflow-safe upcast): the sum *and*
              the division happen in that dtype and the mean is rounded once to the features'
              dtype; an fp16 mean is then finite whenever its members are, and is one rounding
              closer to the exact mean. It equals
              ``(torch.stack([m.to(dtype) for m in members]).sum(0) / n).to(features_dtype)``.

        num_prefix_tokens: overrides the prefix-token count read from the encoder's structure.
        final_norm: a module of the encoder applied to the last block's output before it is
            captured, so that layer ``L`` is the tower's output (``last_hidden_state``) rather
            than its last block's: SigLIP's ``post_layernorm`` in the families whose connector
            reads ``last_hidden_state`` (Idefics3, SmolVLM, Gemma 3). Other layers are untouched.

    Attributes:
        individual_layers: the layers captured individually (``layers=``, non-negative, in the
            given order), the same meaning as :attr:`DenseConnector.individual_layers`.
        groups: the layer groups averaged while streaming (``groups=``, non-negative).

    Captured tensors are ``[B, tokens, C]``; 4-D stage outputs (ConvNeXt) are flattened in
    raster order with their grid recorded in ``LayerFeatures.grids``. Encoders that pack the
    tokens of every image into one sequence (the Qwen2-VL family's ``[seq, C]`` blocks, with
    ``cu_seqlens`` and window attention) give ``[1, seq, C]`` in the blocks' own token order;
    the caller cuts the images apart and undoes any reordering (``LayerFeatures.map``).

    Dtype: the features come out in the dtype of the images given to the encoder (its first
    floating tensor argument, or ``pixel_values=``), as the official Dense Connector casts
    every hidden state to the images' dtype before fusing: a bf16 tower fed fp32 images gives
    fp32 features and fp32 group means. When the tap does not see the images (the encoder is
    called through another method inside ``with tap:``) the tower's dtype is kept.

    Threads: any number of threads may call one tap, or taps sharing one encoder, at once.
    Each call (and each ``with tap:`` block) registers its own hooks, which act only in the
    thread that registered them, and :attr:`features`, :attr:`attached` and :meth:`remove`
    concern the calling thread's captures only.
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
        final_norm: nn.Module | None = None,
    ) -> None:
        self.encoder = encoder
        self.structure: EncoderBlocks = find_encoder_blocks(
            encoder, blocks, num_prefix_tokens=num_prefix_tokens
        )
        self.individual_layers = normalize_layers(layers, self.num_layers, argument="layers")
        self.groups = normalize_groups(groups, self.num_layers, argument="groups")
        if not self.individual_layers and not self.groups:
            raise ValueError(
                "nothing to capture: pass at least one index in layers= or one group in groups="
            )
        if accumulate_dtype is not None and not (
            isinstance(accumulate_dtype, torch.dtype) and accumulate_dtype.is_floating_point
        ):
            wrong_type = not isinstance(accumulate_dtype, torch.dtype)
            raise (TypeError if wrong_type else ValueError)(
                f"accumulate_dtype must be None or a floating torch.dtype, got {accumulate_dtype!r}"
            )
        self.keep_prefix = check_bool(keep_prefix, "keep_prefix")
        self.early_exit = check_bool(early_exit, "early_exit")
        self.accumulate_dtype = accumulate_dtype
        if final_norm is not None and not isinstance(final_norm, nn.Module):
            raise TypeError(
                "final_norm must be None or the encoder's output norm module (e.g. "
                f"post_layernorm), got {type(final_norm).__name__}"
            )
        self.final_norm = final_norm

        self._group_of = {
            layer: index for index, group in enumerate(self.groups) for layer in group
        }
        self._needed = sorted(set(self.individual_layers) | set(self._group_of))
        # Per thread: the active ``with tap:`` capture and the latest capture.
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        # Per-thread captures are not part of a copy (and thread-local storage cannot be copied):
        # a deep-copied or pickled model that holds a tap gets a fresh, unattached one.
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

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
        Safe to call from several threads at once (see the class docstring).
        """
        self._refuse_if_attached()
        capture = _Capture(self, stop_after_last=self.early_exit)
        self._local.latest = capture
        capture.attach()
        try:
            self.encoder(pixel_values, *args, **kwargs)
        except _StopEncoder:
            pass
        finally:
            capture.detach()
        return capture.features()

    def __enter__(self) -> MultiLayerFeatureTap:
        self._refuse_if_attached()
        capture = _Capture(self, stop_after_last=False)
        capture.attach()
        self._local.active = self._local.latest = capture
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    @property
    def features(self) -> LayerFeatures:
        """The layers captured by the calling thread's latest forward pass.

        Raises:
            RuntimeError: no forward ran in this thread, or it ended before reaching a needed
                layer.
        """
        capture = getattr(self._local, "latest", None)
        if capture is None:
            raise RuntimeError(
                "no features captured yet: call tap(pixel_values) or run the encoder inside `with tap:`"
            )
        return capture.features()

    def remove(self) -> None:
        """Remove the hooks of the calling thread's ``with tap:`` block (idempotent)."""
        capture = getattr(self._local, "active", None)
        if capture is not None:
            capture.detach()
            self._local.active = None

    @property
    def attached(self) -> bool:
        """Whether the calling thread has hooks installed by this tap (a ``with tap:`` block)."""
        return getattr(self._local, "active", None) is not None

    def _refuse_if_attached(self) -> None:
        if self.attached:
            raise RuntimeError(
                "this tap is already attached in this thread (inside `with tap:`); a tap can be "
                "active once at a time per thread"
            )
