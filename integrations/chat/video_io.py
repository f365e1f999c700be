"""Read video frames for training-free video chat: video files through PyAV, or frame folders.

:func:`open_video` gives a :class:`VideoSource` for a path: a :class:`VideoFile` (mp4, webm, avi,
anything FFmpeg reads) or a :class:`FrameFolder` (a directory of frame images, in natural order:
``frame2.png`` before ``frame10.png``). Both know their ``total_frames`` and return the frames at
given indices as RGB ``uint8`` tensors; :meth:`VideoSource.sample` picks the indices with FreeVA's
rule (:func:`mmconnect.video.sample_frame_indices`). :func:`read_video` does both in one call.

Decoding reads only what it needs: opening a video demuxes its packets once (compressed data,
nothing decoded) to learn the exact frame count, each frame's timestamp and the keyframes; reading
then seeks to the last keyframe at or before each wanted frame, decodes forward to it and converts
only the wanted frames to RGB. Frames are numbered in presentation order (by timestamp), so
B-frames do not reorder them. Should a container's timestamps not allow seeking, frames are
decoded from the start instead (the result is the same).

Every failure is a :class:`VideoReadError` (a ``ValueError``) naming the path and the reason:
a file FFmpeg cannot open (corrupt, truncated, not a video), no video stream, no frames, a frame
that does not decode, a folder without frame images; a missing path is a ``FileNotFoundError``.

Example:
    >>> frames = read_video("clip.mp4", num_frames=8)  # doctest: +SKIP
    >>> frames.frames.shape, frames.indices  # doctest: +SKIP
    (torch.Size([8, 240, 320, 3]), (6, 18, 31, 43, 56, 68, 80, 93))
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmconnect.integrations.training.data import load_image
from mmconnect.validation import check_int, check_positive_int, check_sequence
from mmconnect.video import sample_frame_indices

if TYPE_CHECKING:
    import av

#: File suffixes (lower case) a :class:`FrameFolder` treats as frame images.
FRAME_IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)


class VideoReadError(ValueError):
    """A video file or frame folder that cannot be read; the message names the path and why."""


def natural_sort_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``frame2`` before ``frame10``.

    Case is ignored for the text parts; the name itself breaks ties, so the order is total.
    """
    parts = re.split(r"(\d+)", name)
    return (
        tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in parts),
        name,
    )


@dataclass(frozen=True)
class VideoFrames:
    """Frames read from a video.

    Attributes:
        frames: ``[T, H, W, 3]`` ``uint8`` RGB, in the order of ``indices``.
        indices: the frame index of each row (0-based, presentation order).
        total_frames: frames in the whole video.
        source: the path read.
    """

    frames: Tensor
    indices: tuple[int, ...]
    total_frames: int
    source: str

    def __len__(self) -> int:
        return len(self.indices)

    def to_pil(self) -> list[Image.Image]:
        """The frames as RGB PIL images."""
        return [Image.fromarray(frame.numpy()) for frame in self.frames]


class VideoSource:
    """A video's frames, addressable by index (see :class:`VideoFile`, :class:`FrameFolder`)."""

    path: Path
    total_frames: int

    def read(self, indices: Sequence[int]) -> Tensor:
        """The frames at ``indices`` (any order, repeats allowed): ``[len(indices), H, W, 3]``
        ``uint8`` RGB."""
        raise NotImplementedError

    def sample(self, num_frames: int) -> VideoFrames:
        """``num_frames`` frames picked by :func:`mmconnect.video.sample_frame_indices` (fewer when
        the video is shorter: the request is clamped to its length).

        Raises:
            ValueError: ``num_frames`` is below 1.
            VideoReadError: a frame cannot be read.
        """
        indices = sample_frame_indices(self.total_frames, num_frames)
        return VideoFrames(self.read(indices), tuple(indices), self.total_frames, str(self.path))

    def _check_indices(self, indices: Sequence[int]) -> list[int]:
        check_sequence(indices, "indices", of="ints")
        if not indices:
            raise ValueError("indices is empty: ask for at least one frame")
        checked = []
        for position, index in enumerate(indices):
            # numpy's integers (from an index array) are ints too
            index = check_int(
                int(index) if isinstance(index, np.integer) else index, f"indices[{position}]"
            )
            if not 0 <= index < self.total_frames:
                raise ValueError(
                    f"frame index {index} is out of range: {str(self.path)!r} has "
                    f"{self.total_frames} frames (0..{self.total_frames - 1})"
                )
            checked.append(index)
        return checked


# ---------------------------------------------------------------------------- video files


def _import_av() -> ModuleType:
    """PyAV, imported when a video file is opened or written: frame folders and the image path of
    chat work without the ``video`` extra (``import av`` here raises ``ModuleNotFoundError``)."""
    import av

    return av


def _open_container(path: Path) -> av.container.InputContainer:
    av = _import_av()
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise VideoReadError(
            f"cannot open video {str(path)!r}: {error} (is it a complete, uncorrupted video file?)"
        ) from error


class VideoFile(VideoSource):
    """A video file read with PyAV (any container and codec FFmpeg decodes: mp4, webm, avi...).

    Opening demuxes the first video stream once without decoding: the exact frame count, every
    frame's timestamp and the keyframes are known before any frame is decoded.

    Args:
        path: the video file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoReadError: FFmpeg cannot open or demux it, it has no video stream or no frames.
    """

    def __init__(self, path: str | Path) -> None:
        av = _import_av()
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"video not found: {str(self.path)!r}")
        if not self.path.is_file():
            raise VideoReadError(f"{str(self.path)!r} is not a file")
        if self.path.stat().st_size == 0:
            raise VideoReadError(f"video {str(self.path)!r} is empty (0 bytes)")
        with _open_container(self.path) as container:
            if not container.streams.video:
                kinds = [stream.type for stream in container.streams]
                raise VideoReadError(
                    f"{str(self.path)!r} has no video stream (streams: {kinds or 'none'}; an "
                    "audio-only file, or a video container without any frame)"
                )
            stream = container.streams.video[0]
            self.stream_index = stream.index
            rate = stream.average_rate or stream.guessed_rate
            #: Frames per second as the container states it (``None`` when it does not).
            self.fps: float | None = float(rate) if rate else None
            self.time_base: Fraction | None = stream.time_base
            timestamps: list[int | None] = []
            keyframes: list[int] = []
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:  # the demuxer's final flush packet
                        continue
                    timestamps.append(packet.pts)
                    if packet.is_keyframe and packet.pts is not None:
                        keyframes.append(packet.pts)
            except av.FFmpegError as error:
                raise VideoReadError(
                    f"cannot read video {str(self.path)!r}: {error} (the file is corrupt or "
                    "truncated)"
                ) from error
        if not timestamps:
            raise VideoReadError(
                f"video {str(self.path)!r} has no frames (its video stream is empty)"
            )
        self.total_frames = len(timestamps)
        seekable = None not in timestamps and len(set(timestamps)) == len(timestamps)
        #: Each frame's timestamp in presentation order (``None``: decode from the start).
        self._timestamps: list[int] | None = sorted(timestamps) if seekable else None
        self._keyframes = sorted(keyframes)
        #: Frames the last :meth:`read` decoded (shows how much seeking saved).
        self.frames_decoded = 0

    def read(self, indices: Sequence[int], *, seek: bool = True) -> Tensor:
        """The frames at ``indices`` as ``[len(indices), H, W, 3]`` ``uint8`` RGB.

        Args:
            indices: frame indices in ``0 .. total_frames - 1`` (any order, repeats allowed).
            seek: jump to the keyframe before each wanted frame (``False``: decode every frame
                from the start; slower on long videos, same frames).

        Raises:
            VideoReadError: a frame does not decode or the stream ends early.
            ValueError: an index is out of range.
        """
        wanted = self._check_indices(indices)
        self.frames_decoded = 0
        frames = None
        if seek and self._timestamps is not None:
            frames = self._read_seeking(sorted(set(wanted)))
        if frames is None:
            frames = self._read_sequential(sorted(set(wanted)))
        return torch.from_numpy(np.stack([frames[index] for index in wanted]))

    def _decode(self, container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
        """Decoded frames of the video stream from the container's current position."""
        av = _import_av()
        stream = container.streams[self.stream_index]
        try:
            for frame in container.decode(stream):
                self.frames_decoded += 1
                yield frame
        except av.FFmpegError as error:
            raise VideoReadError(
                f"cannot decode video {str(self.path)!r}: {error} (the file is corrupt)"
            ) from error

    def _read_seeking(self, targets: list[int]) -> dict[int, np.ndarray] | None:
        """Seek-and-decode; ``None`` when the timestamps do not lead to every target."""
        av = _import_av()
        timestamps = self._timestamps
        wanted = {timestamps[index]: index for index in targets}
        found: dict[int, np.ndarray] = {}
        with _open_container(self.path) as container:
            stream = container.streams[self.stream_index]
            stream.thread_type = "AUTO"
            frames: Iterator[av.VideoFrame] | None = None
            position: int | None = None  # timestamp of the last decoded frame
            start = timestamps[0]  # timestamp decoding last (re)started from
            for index in targets:
                if index in found:
                    continue
                target = timestamps[index]
                slot = bisect.bisect_right(self._keyframes, target) - 1
                keyframe = self._keyframes[slot] if slot >= 0 else timestamps[0]
                # Keep decoding forward unless a keyframe lies between here and the target.
                if frames is None or position is None or position >= target or keyframe > position:
                    try:
                        container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                    except av.FFmpegError:
                        return None  # not seekable after all: decode from the start instead
                    frames, position, start = self._decode(container), None, keyframe
                for frame in frames:
                    if frame.pts is None:
                        return None
                    position = frame.pts
                    # Frames shown before the keyframe decoding restarted from lack their
                    # references after a seek (open GOPs): never keep those.
                    if position in wanted and position >= start and wanted[position] not in found:
                        found[wanted[position]] = frame.to_ndarray(format="rgb24")
                    if position >= target:
                        break
                if index not in found:
                    return None
        return found

    def _read_sequential(self, targets: list[int]) -> dict[int, np.ndarray]:
        """Decode from the start, counting frames, until the last target."""
        wanted = set(targets)
        found: dict[int, np.ndarray] = {}
        decoded = 0
        with _open_container(self.path) as container:
            container.streams[self.stream_index].thread_type = "AUTO"
            for number, frame in enumerate(self._decode(container)):
                decoded = number + 1
                if number in wanted:
                    found[number] = frame.to_ndarray(format="rgb24")
                if number >= targets[-1]:
                    break
        missing = [index for index in targets if index not in found]
        if missing:
            raise VideoReadError(
                f"video {str(self.path)!r} lists {self.total_frames} frames but only {decoded} "
                f"decode; frame {missing[0]} cannot be read (the file is corrupt or truncated)"
            )
        return found


# ---------------------------------------------------------------------------- frame folders


class FrameFolder(VideoSource):
    """A directory of frame images (:data:`FRAME_IMAGE_SUFFIXES`), in natural order.

    Hidden files and other files are ignored; subdirectories are not searched. Only the frames
    read are opened; all must have one size.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        VideoReadError: it holds no frame images.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        if not self.path.exists():
            raise FileNotFoundError(f"frame folder not found: {str(self.path)!r}")
        if not self.path.is_dir():
            raise VideoReadError(f"{str(self.path)!r} is not a directory")
        files = [
            entry
            for entry in self.path.iterdir()
            if entry.is_file()
            and not entry.name.startswith(".")
            and entry.suffix.lower() in FRAME_IMAGE_SUFFIXES
        ]
        if not files:
            raise VideoReadError(
                f"frame folder {str(self.path)!r} holds no frame images (looked for "
                f"{', '.join(FRAME_IMAGE_SUFFIXES)})"
            )
        #: The frame image files in natural order.
        self.files: list[Path] = sorted(files, key=lambda entry: natural_sort_key(entry.name))
        self.total_frames = len(self.files)

    def read(self, indices: Sequence[int]) -> Tensor:
        """The frames at ``indices`` as ``[len(indices), H, W, 3]`` ``uint8`` RGB.

        Raises:
            VideoReadError: a frame image cannot be read, or two frames differ in size.
        """
        wanted = self._check_indices(indices)
        images: dict[int, np.ndarray] = {}
        for index in sorted(set(wanted)):
            try:
                images[index] = np.asarray(load_image(self.files[index]))
            except ValueError as error:
                raise VideoReadError(f"frame {index} of {str(self.path)!r}: {error}") from error
        first = min(images)
        for index, image in images.items():
            if image.shape != images[first].shape:
                raise VideoReadError(
                    f"frames of {str(self.path)!r} differ in size: {self.files[first].name} is "
                    f"{images[first].shape[1]}x{images[first].shape[0]}, {self.files[index].name} "
                    f"is {image.shape[1]}x{image.shape[0]} (width x height)"
                )
        return torch.from_numpy(np.stack([images[index] for index in wanted]))


# ---------------------------------------------------------------------------- writing

#: The codec :func:`write_video` uses for each file suffix.
VIDEO_CODECS: dict[str, tuple[str, str]] = {
    ".mp4": ("mp4", "libx264"),
    ".webm": ("webm", "libvpx-vp9"),
    ".avi": ("avi", "mpeg4"),
}


def write_video(
    path: str | Path, frames: Tensor | np.ndarray | Sequence[Image.Image], *, fps: int = 8
) -> Path:
    """Encode frames as a video file (to make test clips): H.264 for ``.mp4``, VP9 for
    ``.webm``, MPEG-4 Part 2 for ``.avi``, all ``yuv420p`` (lossy: colours shift by a few levels).

    Args:
        path: the file to write; its suffix picks the codec (:data:`VIDEO_CODECS`).
        frames: ``[T, H, W, 3]`` uint8 RGB or RGB PIL images of one size; ``H`` and ``W`` even.
        fps: frames per second.

    Raises:
        ValueError: no frames, an unknown suffix, odd or differing frame sizes.
        TypeError: ``fps`` is not an int.
    """
    check_positive_int(fps, "fps")
    av = _import_av()
    path = Path(path)
    if path.suffix.lower() not in VIDEO_CODECS:
        raise ValueError(
            f"cannot write {str(path)!r}: the suffix must be one of {', '.join(VIDEO_CODECS)}"
        )
    if isinstance(frames, Tensor | np.ndarray):
        pixels = frames.cpu().numpy() if isinstance(frames, Tensor) else frames
    else:
        images = [np.asarray(image.convert("RGB")) for image in frames]
        if len({image.shape for image in images}) > 1:
            raise ValueError("frames differ in size; a video needs frames of one size")
        pixels = np.stack(images) if images else np.zeros((0, 2, 2, 3), np.uint8)
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8 or not len(pixels):
        raise ValueError(
            f"frames must be at least one [H, W, 3] uint8 RGB frame, got shape "
            f"{tuple(pixels.shape)} {pixels.dtype}"
        )
    height, width = pixels.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame size {width}x{height} must be even for yuv420p video")
    container_format, codec = VIDEO_CODECS[path.suffix.lower()]
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------------------- entry points


def open_video(path: str | Path) -> VideoSource:
    """A :class:`FrameFolder` for a directory, else a :class:`VideoFile`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoReadError: it cannot be read as a video or a frame folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {str(path)!r} does not exist")
    return FrameFolder(path) if path.is_dir() else VideoFile(path)


def read_video(path: str | Path, num_frames: int = 8) -> VideoFrames:
    """``num_frames`` frames of a video file or frame folder, sampled as FreeVA does.

    A video shorter than ``num_frames`` gives all its frames' worth of indices (the request is
    clamped, see :func:`mmconnect.video.sample_frame_indices`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoReadError: the video cannot be read (corrupt, empty, no frame images...).
        ValueError: ``num_frames`` is below 1.
    """
    return open_video(path).sample(num_frames)
