"""Peak memory of tensor work: exact on the CPU by watching storages, from the allocator on CUDA.

On a GPU ``torch.cuda.max_memory_allocated`` answers this (:func:`peak_bytes` uses it); on a CPU
nothing in torch does, and process RSS is blurred by the allocator. :class:`PeakTensorMemory`
intercepts every aten op with a ``TorchDispatchMode``, counts each new storage once, and
subtracts it when the storage is freed (a ``weakref.finalize`` on the storage), so its ``peak``
is the high-water mark of bytes held by tensors created inside the block. Tensors that existed
before (weights, inputs) are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Context manager; after it, ``peak`` holds the largest number of live tensor bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._storages.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        # An output sharing an input's storage is a view or an in-place result, not an allocation
        # (e.g. ``weight.t()`` inside a Linear must not count the weight).
        inputs = {
            tensor.untyped_storage().data_ptr()
            for tensor in tree_flatten((args, kwargs))[0]
            if isinstance(tensor, torch.Tensor)
        }
        for tensor in tree_flatten(output)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._storages or key in inputs:
                continue  # a view of a storage already counted, or of one made before
            self._storages[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return output


def peak_tensor_bytes(function: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive at once while ``function()`` runs (its result included)."""
    with PeakTensorMemory() as tracker:
        result = function()
    del result
    return tracker.peak


def peak_bytes(function: Callable[[], Any], device: str) -> int:
    """Peak bytes of tensors created while ``function()`` runs on ``device`` (``"cpu"``/``"cuda"``).

    On the CPU: :func:`peak_tensor_bytes`. On CUDA: the allocator's high-water mark above what
    was allocated before the call (each block rounded up to the allocator's 512-byte unit).

    Raises:
        ValueError: ``device`` is neither ``"cpu"`` nor ``"cuda"``.
    """
    if device == "cpu":
        return peak_tensor_bytes(function)
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = function()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak
