"""Moving-shape videos: does an image model trained by ``mmconnect demo`` answer about video?

Each clip shows one shape of the synthetic VQA world (:mod:`mmconnect.integrations.applications.synthetic`)
moving in a straight line from one cell of the 3 x 3 grid to another, its shape, colour and size
fixed; every frame is drawn with :func:`~mmconnect.integrations.applications.synthetic.render_scene`. The
question is the demo's colour question, "What colour is the {shape}? Answer with one word.",
which the model saw only about still images. :func:`evaluate_moving_shapes` encodes every clip as
an mp4, reads it back (:mod:`mmconnect.integrations.chat.video_io`), asks the model through
:func:`~mmconnect.integrations.chat.answering.answer_video` with each temporal pooling, and scores the
exact one-word answers; the first frame asked as a still image gives the image model's own
accuracy on the same content for comparison. Chance is one in the number of colours.

Example:
    >>> import random
    >>> clip = sample_moving_shape(random.Random(0))
    >>> frames = render_moving_shape(clip, num_frames=16, image_size=64)  # 16 PIL images
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmconnect.integrations.applications.synthetic import (
    ANSWER_INSTRUCTION,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    render_scene,
)
from mmconnect.integrations.chat.answering import DEFAULT_TEMPLATE, answer_image, answer_video
from mmconnect.integrations.chat.video_io import write_video
from mmconnect.validation import check_choice, check_int, check_positive_int
from mmconnect.video import POOLINGS

_GRID = 3
_MARGIN = 0.05  # free space kept between the shape and its cell border, in cells


@dataclass(frozen=True)
class MovingShape:
    """One clip: a shape moving from the centre of ``start_cell`` to that of ``end_cell``.

    Cells are numbered ``3 * row + column`` (:data:`~mmconnect.integrations.applications.synthetic.POSITIONS`).
    """

    shape: str
    colour: str
    size: str
    start_cell: int
    end_cell: int

    def __post_init__(self) -> None:
        check_choice(self.shape, "shape", SHAPES)
        check_choice(self.colour, "colour", tuple(COLOURS))
        check_choice(self.size, "size", tuple(SIZES))
        for name in ("start_cell", "end_cell"):
            check_int(
                getattr(self, name),
                name,
                minimum=0,
                maximum=len(POSITIONS) - 1,
                hint="a grid cell, 3 * row + column",
            )
        if self.start_cell == self.end_cell:
            raise ValueError(f"start_cell and end_cell must differ (got {self.start_cell} twice)")

    @property
    def question(self) -> str:
        """The demo's colour question about this shape."""
        return f"What colour is the {self.shape}? {ANSWER_INSTRUCTION}"


def sample_moving_shape(
    rng: random.Random, shapes: tuple[str, ...] = SHAPES[:3], colours: tuple[str, ...] = ()
) -> MovingShape:
    """A random clip: shape (default the demo's circle / square / triangle), colour, size and two
    distinct cells."""
    start, end = rng.sample(range(len(POSITIONS)), 2)
    return MovingShape(
        shape=rng.choice(shapes),
        colour=rng.choice(colours or tuple(COLOURS)),
        size=rng.choice(tuple(SIZES)),
        start_cell=start,
        end_cell=end,
    )


def moving_shape_scenes(clip: MovingShape, num_frames: int) -> list[Scene]:
    """The clip's scene at each of ``num_frames`` evenly spaced times (first and last at the two
    cell centres).

    The centre moves on the straight line between the cell centres; in each frame it is clamped
    into the cell it is in, keeping the whole shape inside that cell (as every synthetic scene),
    so the motion pauses briefly at cell borders.
    """
    check_int(num_frames, "num_frames", minimum=2, hint="a moving clip needs two frames")
    half = SIZES[clip.size]
    (row0, column0), (row1, column1) = divmod(clip.start_cell, 3), divmod(clip.end_cell, 3)
    scenes = []
    for frame in range(num_frames):
        t = frame / (num_frames - 1)
        x = column0 + 0.5 + t * (column1 - column0)  # in cell units
        y = row0 + 0.5 + t * (row1 - row0)
        column, row = min(math.floor(x), _GRID - 1), min(math.floor(y), _GRID - 1)
        low, high = half + _MARGIN, 1 - half - _MARGIN
        x = column + min(max(x - column, low), high)
        y = row + min(max(y - row, low), high)
        shape = SceneObject(
            shape=clip.shape,
            colour=clip.colour,
            size=clip.size,
            cell=3 * row + column,
            x=x / _GRID,
            y=y / _GRID,
            radius=half / _GRID,
        )
        scenes.append(Scene(objects=(shape,)))
    return scenes


def render_moving_shape(clip: MovingShape, num_frames: int, image_size: int) -> list[Image.Image]:
    """The clip's frames drawn with :func:`~mmconnect.integrations.applications.synthetic.render_scene`."""
    return [render_scene(scene, image_size) for scene in moving_shape_scenes(clip, num_frames)]


def _correct(text: str, colour: str) -> bool:
    return text.strip().rstrip(".").strip().lower() == colour


def evaluate_moving_shapes(
    model: Any,
    processor: Any,
    *,
    num_videos: int = 60,
    frames_per_video: int = 16,
    num_frames: int = 8,
    poolings: tuple[str, ...] = POOLINGS,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    video_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Colour accuracy of ``model`` on moving-shape videos it was never trained on.

    Every clip is written as an mp4 (``video_dir``, or a temporary directory) and read back, so
    the model sees decoded video frames; ``num_frames`` of its ``frames_per_video`` frames are
    sampled (FreeVA's rule) and pooled with each of ``poolings``. ``"image"`` is the first frame
    asked as a still image.

    Returns:
        ``{"num_videos", "chance", "accuracy": {pooling or "image": fraction correct},
        "visual_tokens": {pooling or "image": tokens}, "answers": [per clip: clip fields,
        answer per pooling]}``.
    """
    check_positive_int(num_videos, "num_videos")
    check_int(frames_per_video, "frames_per_video", minimum=2)
    check_positive_int(num_frames, "num_frames")
    for index, pooling in enumerate(poolings):
        check_choice(pooling, f"poolings[{index}]", POOLINGS)
    check_int(seed, "seed")
    rng = random.Random(f"mmconnect.moving_shapes/{seed}")
    size = model.config.vision_config.image_size
    size += size % 2  # yuv420p video needs even sides; the processor resizes anyway
    correct = dict.fromkeys([*poolings, "image"], 0)
    tokens: dict[str, int] = {}
    answers = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(video_dir) if video_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(num_videos):
            clip = sample_moving_shape(rng)
            frames = render_moving_shape(clip, frames_per_video, size)
            path = write_video(folder / f"moving_{number:04d}.mp4", frames)
            entry = {**clip.__dict__, "answers": {}}
            for pooling in poolings:
                answer = answer_video(
                    model,
                    processor,
                    path,
                    clip.question,
                    num_frames=num_frames,
                    pooling=pooling,
                    template=template,
                    max_new_tokens=4,
                )
                correct[pooling] += _correct(answer.text, clip.colour)
                tokens[pooling] = answer.num_visual_tokens
                entry["answers"][pooling] = answer.text
            still = answer_image(
                model, processor, frames[0], clip.question, template=template, max_new_tokens=4
            )
            correct["image"] += _correct(still.text, clip.colour)
            tokens["image"] = still.num_visual_tokens
            entry["answers"]["image"] = still.text
            answers.append(entry)
    return {
        "num_videos": num_videos,
        "chance": 1 / len(COLOURS),
        "accuracy": {name: count / num_videos for name, count in correct.items()},
        "visual_tokens": tokens,
        "answers": answers,
    }


def accuracy_table(results: dict[str, Any]) -> str:
    """The accuracies of :func:`evaluate_moving_shapes` as a Markdown table."""
    lines = ["| input | visual tokens | colour accuracy (%) |", "| --- | ---: | ---: |"]
    for name, value in results["accuracy"].items():
        label = "first frame as an image" if name == "image" else f"video, {name}"
        lines.append(f"| {label} | {results['visual_tokens'][name]} | {100 * value:.1f} |")
    lines.append(f"| chance | | {100 * results['chance']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m mmconnect.integrations.applications.moving_shapes MODEL_DIR``: print the accuracy table."""
    import argparse
    import json

    from mmconnect.integrations.chat.answering import load_chat_model

    parser = argparse.ArgumentParser(
        prog="python -m mmconnect.integrations.applications.moving_shapes",
        description="colour accuracy of a saved Dense LLaVA on moving-shape videos",
    )
    parser.add_argument("model", help="a saved model directory with its processor")
    parser.add_argument("--videos", type=int, default=60)
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    arguments = parser.parse_args(argv)
    model, processor = load_chat_model(arguments.model)
    results = evaluate_moving_shapes(
        model,
        processor,
        num_videos=arguments.videos,
        num_frames=arguments.frames,
        seed=arguments.seed,
    )
    print(accuracy_table(results))
    if arguments.output:
        Path(arguments.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
