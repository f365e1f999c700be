"""Reading video frames (:mod:`mmconnect.integrations.chat.video_io`): PyAV files and frame folders.

Every video is written here with PyAV: frames of distinct solid colours, so each decoded frame
can be told apart despite codec loss and the frame order is checked exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mmconnect.integrations.chat.video_io import (
    FrameFolder,
    VideoFile,
    VideoFrames,
    VideoReadError,
    natural_sort_key,
    open_video,
    read_video,
    write_video,
)
from mmconnect.video import sample_frame_indices

#: Twelve RGB colours at least ~90 apart from each other.
PALETTE = np.array(
    [
        (220, 30, 30),
        (30, 160, 50),
        (30, 70, 220),
        (240, 200, 20),
        (140, 50, 180),
        (245, 130, 20),
        (0, 0, 0),
        (255, 255, 255),
        (128, 128, 128),
        (0, 200, 200),
        (200, 0, 200),
        (90, 60, 20),
    ],
    dtype=np.uint8,
)
WIDTH, HEIGHT = 64, 48
#: Worst mean error per channel of a solid-colour frame after lossy coding.
CODEC_TOLERANCE = 10

#: (file name, PyAV format, codec, options): B-frames for H.264, two WebM codecs, MPEG-4 in AVI.
CONTAINERS = [
    ("clip.mp4", "mp4", "libx264", {"bf": "2"}),
    ("clip.webm", "webm", "libvpx-vp9", {}),
    ("clip_vp8.webm", "webm", "libvpx", {}),
    ("clip.avi", "avi", "mpeg4", {}),
]


def encode_with_pyav(
    path: Path,
    frames: np.ndarray,
    *,
    format: str,
    codec: str,
    options: dict | None = None,
    gop: int = 4,
    rate: int = 10,
) -> Path:
    """Encode ``frames`` (``[T, H, W, 3]`` uint8) with PyAV."""
    with av.open(str(path), mode="w", format=format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop  # keyframes every few frames: reads must seek
        if options:
            stream.codec_context.options = options
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def solid_frames(count: int = len(PALETTE)) -> np.ndarray:
    """``[count, H, W, 3]``: frame ``i`` is filled with ``PALETTE[i % 12]``."""
    colours = PALETTE[np.arange(count) % len(PALETTE)]
    return np.broadcast_to(colours[:, None, None, :], (count, HEIGHT, WIDTH, 3)).copy()


def nearest_colours(frames: torch.Tensor) -> list[int]:
    """Palette index of each frame's mean colour."""
    means = frames.double().mean(dim=(1, 2)).numpy()
    distances = ((means[:, None, :] - PALETTE[None].astype(float)) ** 2).sum(-1)
    return distances.argmin(axis=1).tolist()


def assert_frames_show(frames: torch.Tensor, indices: list[int]) -> None:
    assert frames.dtype == torch.uint8 and frames.shape == (len(indices), HEIGHT, WIDTH, 3)
    assert nearest_colours(frames) == [index % len(PALETTE) for index in indices]
    means = frames.double().mean(dim=(1, 2))
    expected = torch.tensor(PALETTE[[index % len(PALETTE) for index in indices]]).double()
    assert (means - expected).abs().max() <= CODEC_TOLERANCE


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {
        name: encode_with_pyav(
            folder / name, solid_frames(), format=fmt, codec=codec, options=options
        )
        for name, fmt, codec, options in CONTAINERS
    }


# ---------------------------------------------------------------------------- video files


@pytest.mark.parametrize("name", [entry[0] for entry in CONTAINERS])
def test_every_frame_decodes_in_order(videos, name):
    video = open_video(videos[name])
    assert isinstance(video, VideoFile)
    assert video.total_frames == len(PALETTE)  # WebM states no count: counted from its packets
    assert video.fps == pytest.approx(10.0)
    assert_frames_show(video.read(list(range(len(PALETTE)))), list(range(len(PALETTE))))


@pytest.mark.parametrize("name", [entry[0] for entry in CONTAINERS])
def test_sampled_frames_are_the_freeva_indices(videos, name):
    frames = read_video(videos[name], num_frames=5)
    assert isinstance(frames, VideoFrames)
    assert frames.indices == tuple(sample_frame_indices(12, 5)) == (1, 3, 5, 8, 10)
    assert frames.total_frames == 12 and len(frames) == 5 and frames.source == str(videos[name])
    assert_frames_show(frames.frames, list(frames.indices))
    images = frames.to_pil()
    assert [image.size for image in images] == [(WIDTH, HEIGHT)] * 5
    assert np.array_equal(np.asarray(images[2]), frames.frames[2].numpy())


@pytest.mark.parametrize("name", [entry[0] for entry in CONTAINERS])
def test_seeking_gives_the_frames_of_a_full_decode(videos, name):
    video = VideoFile(videos[name])
    indices = [11, 0, 6, 6, 3, 9]  # any order, repeats allowed
    seeking = video.read(indices)
    assert torch.equal(seeking, video.read(indices, seek=False))
    assert_frames_show(seeking, indices)


def test_seeking_decodes_only_what_it_needs(tmp_path):
    # 60 frames of rising grey, a keyframe at least every 10 frames, B-frames.
    greys = np.arange(60, dtype=np.uint8)[:, None, None, None] * 4
    frames = np.broadcast_to(greys, (60, 32, 32, 3)).copy()
    path = encode_with_pyav(
        tmp_path / "long.mp4", frames, format="mp4", codec="libx264", options={"bf": "2"}, gop=10
    )
    video = VideoFile(path)
    last = video.read([55])
    assert video.frames_decoded <= 10  # from the keyframe before frame 55
    assert torch.equal(last, video.read([55], seek=False))
    assert video.frames_decoded == 56  # every frame up to 55
    sampled = [3, 17, 31, 45, 59]
    assert torch.equal(video.read(sampled), video.read(sampled, seek=False))
    grey = video.read(sampled).double().mean(dim=(1, 2, 3))
    assert (grey - torch.tensor(sampled).double() * 4).abs().max() <= CODEC_TOLERANCE


def test_more_frames_than_the_video_has_are_clamped(videos):
    frames = read_video(videos["clip.mp4"], num_frames=50)
    assert frames.indices == tuple(sample_frame_indices(12, 12))
    assert len(frames) == 12 and frames.total_frames == 12
    assert_frames_show(frames.frames, list(frames.indices))


def test_zero_frames_requested(videos):
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 0"):
        read_video(videos["clip.mp4"], num_frames=0)
    with pytest.raises(TypeError, match=r"num_frames must be a positive int, got 2.5 \(float\)"):
        read_video(videos["clip.mp4"], num_frames=2.5)


def test_out_of_range_and_empty_indices(videos):
    video = VideoFile(videos["clip.webm"])
    with pytest.raises(ValueError, match=r"frame index 12 is out of range: .* has 12 frames"):
        video.read([0, 12])
    with pytest.raises(ValueError, match="indices is empty"):
        video.read([])
    with pytest.raises(TypeError, match=r"indices\[1\] must be an int, got 1.0 \(float\)"):
        video.read([0, 1.0])
    with pytest.raises(TypeError, match=r"indices must be a sequence of ints, got 3 \(int\)"):
        video.read(3)
    assert len(video.read([np.int64(0), np.int64(11)])) == 2  # numpy's integers are ints


# ---------------------------------------------------------------------------- bad video files


def test_missing_video(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video not found: .*no_such\.mp4"):
        read_video(tmp_path / "no_such.mp4")


def test_zero_byte_video(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(VideoReadError, match=r"'.*empty.mp4' is empty \(0 bytes\)"):
        read_video(path)


def test_corrupt_video(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError, match=r"cannot open video '.*noise.mp4'.*uncorrupted"):
        read_video(path)


def test_truncated_video(videos, tmp_path):
    data = videos["clip.mp4"].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])  # the index (moov) at the end is lost
    with pytest.raises(VideoReadError, match=r"cannot open video '.*cut.mp4'"):
        read_video(path)


def test_video_without_frames(tmp_path):
    path = tmp_path / "nothing.avi"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoReadError, match=r"'.*nothing.avi' has no frames"):
        read_video(path)


def test_audio_only_file(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoReadError, match=r"has no video stream \(streams: \['audio'\]"):
        read_video(path)


def test_video_errors_are_value_errors():
    assert issubclass(VideoReadError, ValueError)


# ---------------------------------------------------------------------------- frame folders


def test_natural_sort_key():
    names = ["frame10.png", "Frame2.png", "frame1.png", "frame_b.png", "frame02.png", "a.png"]
    assert sorted(names, key=natural_sort_key) == [
        "a.png",
        "frame1.png",
        "Frame2.png",
        "frame02.png",
        "frame10.png",
        "frame_b.png",
    ]


def test_frame_folder_reads_in_natural_order(tmp_path):
    frames = solid_frames()
    for number, pixels in enumerate(frames, start=1):  # frame1 .. frame12: frame10 sorts last
        Image.fromarray(pixels).save(tmp_path / f"frame{number}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"not an image either")
    (tmp_path / "sub").mkdir()
    video = open_video(tmp_path)
    assert isinstance(video, FrameFolder) and video.total_frames == 12
    assert [path.name for path in video.files][8:11] == ["frame9.png", "frame10.png", "frame11.png"]
    sampled = read_video(tmp_path, num_frames=4)
    assert sampled.indices == tuple(sample_frame_indices(12, 4)) == (1, 4, 7, 9)
    assert torch.equal(sampled.frames, torch.from_numpy(frames[list(sampled.indices)]))  # lossless


def test_folder_without_frames(tmp_path):
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(VideoReadError, match=r"frame folder '.*' holds no frame images"):
        read_video(tmp_path)


def test_folder_with_an_unreadable_frame(tmp_path):
    Image.fromarray(solid_frames(1)[0]).save(tmp_path / "0001.png")
    (tmp_path / "0002.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(VideoReadError, match=r"frame 1 of '.*': cannot read image '.*0002.png'"):
        FrameFolder(tmp_path).read([0, 1])


def test_folder_with_frames_of_different_sizes(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "1.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "2.jpg")
    with pytest.raises(VideoReadError, match=r"differ in size: 1.png is 64x48, 2.jpg is 32x32"):
        FrameFolder(tmp_path).read([0, 1])


def test_missing_folder_or_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="frame folder not found"):
        FrameFolder(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_video(os.fspath(tmp_path / "gone"))


# ---------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_write_video_round_trip(tmp_path, suffix):
    path = write_video(tmp_path / f"made{suffix}", solid_frames(6))
    video = open_video(path)
    assert video.total_frames == 6
    assert_frames_show(video.read(list(range(6))), list(range(6)))


def test_write_video_takes_pil_images(tmp_path):
    images = [Image.fromarray(frame) for frame in solid_frames(3)]
    path = write_video(tmp_path / "made.mp4", images, fps=5)
    assert VideoFile(path).fps == pytest.approx(5.0)
    assert_frames_show(read_video(path, num_frames=3).frames, [0, 1, 1])  # sample(3, 3)


@pytest.mark.parametrize(
    ("name", "frames", "message"),
    [
        ("clip.mov", solid_frames(2), r"the suffix must be one of \.mp4, \.webm, \.avi"),
        ("clip.mp4", solid_frames(2)[:, :47], "frame size 64x47 must be even"),
        ("clip.mp4", solid_frames(2)[:0], r"at least one \[H, W, 3\] uint8 RGB frame"),
        ("clip.mp4", solid_frames(2).astype(np.float32), "uint8"),
        ("clip.mp4", [Image.new("RGB", (8, 8)), Image.new("RGB", (4, 4))], "frames differ in size"),
    ],
)
def test_write_video_refuses_bad_frames(tmp_path, name, frames, message):
    with pytest.raises(ValueError, match=message):
        write_video(tmp_path / name, frames)
