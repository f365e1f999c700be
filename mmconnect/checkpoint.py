"""Checkpoint I/O: safetensors weights and JSON configs on disk, no pickles, atomic saves.

A saved connector is a directory with ``config.json`` (a :class:`mmconnect.ConnectorConfig`) and
``model.safetensors``. Official PyTorch files (``mm_projector.bin``) are only ever read with
``torch.load(weights_only=True)``.

Atomic saves (:func:`atomic_save_directory`): every save of a model directory writes into a fresh
hidden sibling (``.{name}.tmp-<random>``) and only then puts it in place, so the directory holds
either the complete old save or the complete new one at every instant (a save that fails midway
-- disk full, a file-size limit, an exception -- leaves the old directory byte-identical). Files
of the directory that the save did not rewrite (trainer ``checkpoint-N/`` folders, a processor,
the user's notes) are kept, except the weights / config files of the save family
(:data:`MODEL_FILE_PATTERNS`) when the save wrote such files too: a stale shard of an earlier
sharded save must not sit next to a new single-file save.

Readers (:func:`read_state_dict`, :func:`read_json`) name the file and what is wrong with it
(missing, a directory, truncated or not a safetensors / PyTorch / JSON / UTF-8 file).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmconnect.validation import check_bool

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: Names (``fnmatch`` patterns) of the files a model save writes: weights in every layout HF and
#: PEFT use (single file, shards and their index, PyTorch pickles), the model config and the
#: generation config. When a save that wrote files matching these replaces a directory, the old
#: files matching them are superseded even when the new save did not write a file of the same
#: name (a new ``model.safetensors`` replaces an old ``model-00001-of-00002.safetensors`` + index):
#: a loader must never see both.
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


# ---------------------------------------------------------------------------- readers


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")


def read_state_dict(path: str | Path, *, mmap: bool = False) -> dict[str, Tensor]:
    """Read tensors from ``*.safetensors`` or a PyTorch file, never unpickling arbitrary objects.

    PyTorch files (``mm_projector.bin``) are read with ``torch.load(weights_only=True)``;
    ``mmap=True`` maps them instead of reading them whole (for a large LLM file of which only a
    few tensors are used).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, is truncated or not a safetensors / PyTorch file, or
            holds no state dict.
        TypeError: ``mmap`` is not a bool.
    """
    check_bool(mmap, "mmap")
    path = Path(path)
    _check_file(path, "weights file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"weights file {str(path)!r} ({path.stat().st_size} bytes) is not a readable "
                f"safetensors file: it is truncated or corrupt ({error}); save it again"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # RuntimeError (zip), EOFError, pickle.UnpicklingError, ...
        raise ValueError(
            f"weights file {str(path)!r} ({path.stat().st_size} bytes) cannot be read as "
            f"tensors: it is truncated, corrupt or not a PyTorch weights file "
            f"({type(error).__name__}: {error})"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def check_torch_archive(path: str | Path) -> None:
    """Cheaply check that ``path`` is a complete ``torch.save`` archive (a zip file whose central
    directory, at the end of the file, is intact): a truncated file fails without reading it all.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, truncated or not a ``torch.save`` file.
    """
    path = Path(path)
    _check_file(path, "file")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"{str(path)!r} ({path.stat().st_size} bytes) is not a complete torch.save file: it "
            f"is truncated or corrupt ({error})"
        ) from None


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safetensors.safe_open(path, framework="pt")`` (reads only the header until a tensor is
    asked for), with errors that name the file and what is wrong with it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, truncated or not a safetensors file.
    """
    path = Path(path)
    _check_file(path, "weights file")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"weights file {str(path)!r} ({path.stat().st_size} bytes) is not a readable "
            f"safetensors file: it is truncated or corrupt ({error}); save it again"
        ) from None
    with handle:
        yield handle


def weights_under_prefix(
    state: Mapping[str, Tensor], prefix: str, *, required: bool = True
) -> dict[str, Tensor]:
    """The tensors of ``state`` whose names start with ``prefix``, the prefix removed (what a
    converter reads from a whole model's state dict, e.g. ``prefix="model.connector."``).

    Args:
        required: refuse a prefix under which nothing is found (converters that list the
            missing keys themselves pass ``False``).

    Raises:
        TypeError: ``state`` is not a mapping or ``prefix`` not a str.
        ValueError: ``required`` and no name starts with ``prefix`` (the first names are shown).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r} ({type(prefix).__name__})")
    found = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if required and not found:
        sample = ", ".join(list(state)[:5]) or "an empty state dict"
        raise ValueError(
            f"no keys start with prefix {prefix!r}; the state dict starts with {sample}"
        )
    return found


def saved_shapes(
    files: Iterable[str | Path], prefixes: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor under one of ``prefixes`` in safetensors ``files``,
    the prefix removed; reads only the headers.

    Args:
        files: safetensors files (one checkpoint's shards).
        prefixes: key prefixes to look under, first match wins (e.g. ``("model.mining.",
            "mining.")``); ``("",)`` reads every tensor.

    Raises:
        FileNotFoundError, ValueError: a file is missing or not a readable safetensors file
            (named, see :func:`open_safetensors`).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with open_safetensors(file) as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                prefix = next((p for p in prefixes if key.startswith(p)), None)
                if prefix is not None:
                    shapes[key[len(prefix) :]] = tuple(handle.get_slice(key).get_shape())
    return shapes


def shape_problems(
    saved: Mapping[str, Sequence[int]],
    expected: Mapping[str, Sequence[int]],
    *,
    optional: Iterable[str] = (),
    where: str = "in the weights",
) -> list[str]:
    """Every difference between saved and expected tensor names and shapes, one line each.

    Args:
        saved: ``name -> shape`` found (a checkpoint's header, a state dict's tensors).
        expected: ``name -> shape`` the config builds.
        optional: expected names that may be absent (e.g. a buffer the loader fills in).
        where: how the saved side is named in the message (``"in the file"``).

    Returns:
        ``["missing k", "unexpected k", "k: (a, b) in the weights, (c, d) expected by the
        config", ...]``; empty when everything fits.
    """
    optional = set(optional)
    problems = [f"missing {key}" for key in expected if key not in saved and key not in optional]
    problems += [f"unexpected {key}" for key in saved if key not in expected]
    problems += [
        f"{key}: {tuple(saved[key])} {where}, {tuple(shape)} expected by the config"
        for key, shape in expected.items()
        if key in saved and tuple(saved[key]) != tuple(shape)
    ]
    return problems


def write_state_dict(state: Mapping[str, Tensor], path: str | Path) -> None:
    """Write tensors as safetensors (contiguous, detached copies; shared storage is fine).

    Raises:
        OSError: the file cannot be written (disk full, file-size limit, ...), naming the file.
    """
    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    try:
        save_file(tensors, str(path))
    except SafetensorError as error:  # safetensors reports I/O failures as its own error type
        code = re.search(r"os error (\d+)", str(error))
        raise OSError(
            int(code.group(1)) if code else errno.EIO,
            f"cannot write weights file {str(path)!r}: {error}",
        ) from None


def write_json(data: Mapping[str, Any], path: str | Path) -> None:
    """Write ``data`` as indented, key-sorted JSON with a trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """Read a JSON object from ``path`` with clear errors for missing or malformed files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, not UTF-8, not JSON or not a JSON object.
    """
    path = Path(path)
    _check_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); "
            "is it a JSON file?"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def prepare_directory(directory: str | Path) -> Path:
    """Create ``directory`` (and parents) for writing; clear error if that is impossible."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot write to directory {str(directory)!r}: {error}") from None
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} exists and is not a directory")
    return directory


# ---------------------------------------------------------------------------- atomic saves

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; ``False`` where the
    platform, libc or file system does not offer it (the caller then falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or file system without RENAME_EXCHANGE
    raise OSError(code, f"cannot swap {str(first)!r} and {str(second)!r}: {os.strerror(code)}")


def _fsync_path(path: Path, *, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if directory:
            return  # some platforms cannot open directories; file data is synced already
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (before it is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder, name)
            if not file.is_symlink():
                _fsync_path(file, directory=False)
        _fsync_path(Path(folder), directory=True)


def _sibling_name(directory: Path, kind: str) -> Path:
    # the name is cut so the sibling's name stays within the 255 bytes file systems allow
    return directory.parent / f".{directory.name[:200]}.{kind}-{secrets.token_hex(4)}"


def _sibling(directory: Path, kind: str) -> Path:
    """Create and return a fresh hidden sibling ``.{name}.{kind}-<random>`` (umask permissions)."""
    for _ in range(100):
        candidate = _sibling_name(directory, kind)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ValueError(f"cannot create a temporary directory next to {str(directory)!r}")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _move_back(old: Path, new: Path, patterns: tuple[str, ...]) -> None:
    """Move the entries of ``old`` that the save did not supersede into ``new``, delete ``old``."""
    written = set(os.listdir(new))
    # only a save that wrote model files supersedes the old ones (a processor save does not)
    model_save = any(_matches(name, patterns) for name in written)
    for name in sorted(os.listdir(old)):
        if name not in written and not (model_save and _matches(name, patterns)):
            os.rename(old / name, new / name)
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_save_directory(
    directory: str | os.PathLike, *, superseded: Iterable[str] = MODEL_FILE_PATTERNS
) -> Iterator[Path]:
    """Save into ``directory`` atomically: write into the yielded temporary directory.

    The yielded path is a fresh, empty, hidden sibling of ``directory`` (same parent, so the
    final rename never crosses file systems). On a normal exit its files are flushed to disk and
    it takes the place of ``directory``:

    * ``directory`` absent: the temporary directory is renamed to it;
    * ``directory`` present (Linux): ``renameat2(RENAME_EXCHANGE)`` swaps the two atomically, so
      readers see the complete old or the complete new save at every instant; then every entry
      of the old directory that the save did not supersede is moved into the new one, and the
      old directory (now only superseded files) is deleted. An old entry is superseded when the
      save wrote an entry of the same name, or when its name matches one of ``superseded``
      (default :data:`MODEL_FILE_PATTERNS`: weights and configs) and the save wrote a file
      matching them too: stale shards never survive next to a new model save, while a save of
      only a processor keeps the model. Everything else (``checkpoint-N/`` folders, processor
      files the save did not rewrite, the user's own files) is kept.
    * where the exchange is unavailable (another OS, an old kernel / libc, a file system without
      it) two renames are used instead (old -> hidden backup, new -> ``directory``), with the same
      moving back: ``directory`` is then absent for the instant between the two renames.

    If a process is killed between the swap and the end of the moving back, the entries not yet
    moved are in the hidden sibling ``.{name}.old-*`` / ``.{name}.tmp-*`` next to ``directory``.

    On an exception inside the ``with`` block the temporary directory is removed,
    ``directory`` is left untouched (byte-identical) and the exception gets a note naming it.

    Args:
        directory: the model directory to write (created with its parents when absent; a
            symlink is followed and the directory it points to is replaced).
        superseded: ``fnmatch`` patterns of old entries to drop, when the save wrote a file
            matching them, even if it did not write one of the same name; pass ``()`` to keep
            every old entry the save did not overwrite.

    Raises:
        ValueError: ``directory`` exists and is not a directory, or its parent cannot be written.

    Examples:
        >>> with atomic_save_directory("runs/connector") as tmp:   # doctest: +SKIP
        ...     connector_config.save(tmp / "config.json")
        ...     write_state_dict(state, tmp / "model.safetensors")
    """
    target = Path(os.path.abspath(directory))  # "." and "a/.." have no name to put a sibling by
    if target.is_symlink():
        target = target.resolve()
    if target.parent == target:
        raise ValueError(f"cannot save into the file system root {str(target)!r}")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{str(target)!r} exists and is not a directory")
    prepare_directory(target.parent)
    try:
        temporary = _sibling(target, "tmp")
    except OSError as error:
        raise ValueError(f"cannot write next to {str(target)!r}: {error}") from None
    patterns = tuple(superseded)
    try:
        yield temporary
        _fsync_tree(temporary)
        if target.is_dir():
            # the new directory keeps the permissions of the one it replaces
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, Exception) and hasattr(error, "add_note"):  # Python >= 3.11
            # third-party writers (safetensors) do not say where they were writing
            error.add_note(
                f"the save into {str(target)!r} failed and was discarded: "
                f"{'the directory is unchanged' if target.exists() else 'nothing was written'}"
            )
        raise
    try:
        # saving into the working directory: the swap moves the process's working directory
        # (an inode) to the old folder, which is then deleted; follow the new one
        in_target = target.is_dir() and os.path.samefile(target, os.getcwd())
    except OSError:
        in_target = False
    try:
        _install(temporary, target, patterns)
    finally:
        if in_target:
            os.chdir(target)


def _install(temporary: Path, target: Path, patterns: tuple[str, ...]) -> None:
    """Put the complete save ``temporary`` in place of ``target`` (see atomic_save_directory)."""
    if not target.exists():
        try:
            os.rename(temporary, target)
        except OSError:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        _fsync_path(target.parent, directory=True)
        return
    try:
        exchanged = _exchange(temporary, target)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if exchanged:
        old = temporary  # after the swap the temporary name holds the old directory
    else:
        old = _sibling_name(target, "old")
        try:
            os.rename(target, old)
        except OSError:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        try:
            os.rename(temporary, target)
        except OSError:
            os.rename(old, target)  # put the old save back before reporting
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    _fsync_path(target.parent, directory=True)
    try:
        _move_back(old, target, patterns)
    except OSError as error:
        raise OSError(
            error.errno,
            f"the new save is in {str(target)!r} but moving the earlier files that it did not "
            f"replace back from {str(old)!r} failed ({error}); move them by hand",
        ) from error
    _fsync_path(target, directory=True)


# ---------------------------------------------------------------------------- fingerprints

#: Elements of each tensor whose exact bit patterns enter :func:`fingerprint_tensors`.
_FINGERPRINT_SAMPLES = 1024
_INTEGER_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tensor_digest(tensor: Tensor) -> str:
    """``dtype|shape|bit sum|sample``: exact, so the same tensor gives the same digest on any
    device and in any reduction order (integer sums are associative)."""
    tensor = tensor.detach()
    header = f"{tensor.dtype}|{tuple(tensor.shape)}"
    if tensor.is_meta or tensor.numel() == 0:
        return header + "|no values"
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    size = flat.element_size()
    bits = flat.view(_INTEGER_VIEWS.get(size, torch.int64))
    # the sum of the raw bit patterns modulo 2**64 touches every value (one cheap reduction)
    total = int(bits.sum(dtype=torch.int64)) % 2**64
    count = min(bits.numel(), _FINGERPRINT_SAMPLES)
    index = torch.arange(count, dtype=torch.int64) * (bits.numel() - 1) // max(count - 1, 1)
    sample = bits[index.to(bits.device)].cpu().numpy().tobytes()
    return f"{header}|{total}|{hashlib.sha256(sample).hexdigest()}"


def fingerprint_tensors(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A sha256 hex digest of named tensors: their names, dtypes, shapes and values.

    Cheap enough for a 7B model at every checkpoint: the values enter through one exact integer
    reduction per tensor (the sum of the raw bit patterns modulo 2**64) and the bit patterns of
    1024 evenly spaced elements, not a hash of every byte. Any change of a name, shape or dtype
    changes the digest; a change of values almost always does (it would have to keep both the
    bit sum and the sampled elements). The same tensors give the same digest on CPU and GPU.
    The order of ``named_tensors`` does not matter (sorted by name).

    Args:
        named_tensors: ``(name, tensor)`` pairs, e.g. ``module.named_parameters()``.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda pair: pair[0]):
        digest.update(f"{name}={_tensor_digest(tensor)}\n".encode())
    return digest.hexdigest()
