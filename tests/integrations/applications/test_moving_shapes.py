"""Moving-shape videos (:mod:`mmconnect.integrations.applications.moving_shapes`) and the issue's end-to-end
check: a model trained by ``mmconnect demo`` on still images answers colour questions about a
video of one moving shape, with no video training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mmconnect.integrations.applications.demo import DemoConfig, run_demo
from mmconnect.integrations.applications.moving_shapes import (
    MovingShape,
    accuracy_table,
    evaluate_moving_shapes,
    main,
    moving_shape_scenes,
    render_moving_shape,
    sample_moving_shape,
)
from mmconnect.integrations.applications.synthetic import COLOURS
from mmconnect.integrations.chat.answering import load_chat_model
from mmconnect.integrations.chat.video_io import read_video


def test_the_shape_moves_from_cell_centre_to_cell_centre():
    clip = MovingShape(shape="circle", colour="red", size="small", start_cell=6, end_cell=2)
    scenes = moving_shape_scenes(clip, 9)
    first, last = scenes[0].objects[0], scenes[-1].objects[0]
    assert (first.cell, first.x, first.y) == (6, pytest.approx(0.5 / 3), pytest.approx(2.5 / 3))
    assert (last.cell, last.x, last.y) == (2, pytest.approx(2.5 / 3), pytest.approx(0.5 / 3))
    cells = [scene.objects[0].cell for scene in scenes]
    assert cells[0] == 6 and cells[-1] == 2 and 4 in cells  # the diagonal crosses the centre
    assert all(len(scene.objects) == 1 for scene in scenes)
    assert {(o.shape, o.colour, o.size) for s in scenes for o in s.objects} == {
        ("circle", "red", "small")
    }
    xs = [scene.objects[0].x for scene in scenes]
    assert xs == sorted(xs) and len(set(xs)) > 3  # it really moves, left to right


def test_frames_show_the_shape_in_its_colour():
    clip = MovingShape(shape="square", colour="green", size="large", start_cell=3, end_cell=5)
    frames = render_moving_shape(clip, num_frames=6, image_size=64)
    assert len(frames) == 6 and all(frame.size == (64, 64) for frame in frames)
    for frame, scene in zip(frames, moving_shape_scenes(clip, 6), strict=True):
        shape = scene.objects[0]
        centre = frame.getpixel((int(shape.x * 64), int(shape.y * 64)))
        assert centre == COLOURS["green"]
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[-1]))


def test_random_clips_are_valid_and_seeded():
    first = [sample_moving_shape(random.Random(7)) for _ in range(2)]
    assert first[0] == first[1]
    rng = random.Random(0)
    for _ in range(200):
        clip = sample_moving_shape(rng)
        assert clip.shape in ("circle", "square", "triangle") and clip.start_cell != clip.end_cell
        moving_shape_scenes(clip, 16)  # every frame is a valid scene
    assert clip.question == f"What colour is the {clip.shape}? Answer with one word."


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"shape": "star"}, ValueError, r"shape must be one of \('circle', .*\), got 'star'"),
        ({"colour": "pink"}, ValueError, "colour must be one of .*, got 'pink'"),
        ({"end_cell": 9}, ValueError, r"end_cell must be an int in \[0, 8\], got 9; a grid cell"),
        ({"end_cell": 1.0}, TypeError, r"end_cell must be an int in \[0, 8\], got 1.0 \(float\)"),
        ({"end_cell": 0}, ValueError, "start_cell and end_cell must differ"),
    ],
)
def test_bad_clips(fields, error, message):
    clip = {"shape": "circle", "colour": "red", "size": "small", "start_cell": 0, "end_cell": 1}
    with pytest.raises(error, match=message):
        MovingShape(**(clip | fields))


def test_one_frame_is_not_a_moving_clip():
    clip = MovingShape(shape="circle", colour="red", size="small", start_cell=0, end_cell=1)
    with pytest.raises(ValueError, match="num_frames must be an int >= 2, got 1"):
        moving_shape_scenes(clip, 1)
    with pytest.raises(TypeError, match=r"num_frames must be an int >= 2, got '8' \(str\)"):
        moving_shape_scenes(clip, "8")


@pytest.mark.slow
def test_demo_model_answers_about_moving_shapes_without_video_training(tmp_path, capsys):
    """The demo (a small budget here; docs/video.md reports the full one) trains on still images
    only; the saved model then answers about mp4 clips through every pooling."""
    results = run_demo(
        DemoConfig(
            output_dir=str(tmp_path / "demo"),
            connectors=("dci",),
            num_train_images=64,
            num_eval_images=8,
            stage1_steps=4,
            stage2_steps=8,
            batch_size=8,
            show_progress=False,
        )
    )
    model, processor = load_chat_model(results["connectors"]["dci"]["model_dir"])
    videos = tmp_path / "videos"
    measured = evaluate_moving_shapes(
        model,
        processor,
        num_videos=4,
        frames_per_video=12,
        poolings=("concat", "maxpool1d", "mean"),
        video_dir=videos,
    )
    assert measured["num_videos"] == 4 and measured["chance"] == pytest.approx(1 / 6)
    # 64 px images of 8 px patches: 64 tokens per frame, 8 frames sampled
    assert measured["visual_tokens"] == {"concat": 512, "maxpool1d": 256, "mean": 64, "image": 64}
    for value in measured["accuracy"].values():
        assert value in (0.0, 0.25, 0.5, 0.75, 1.0)  # a count of exact answers out of 4
    assert len(measured["answers"]) == 4
    assert all(
        set(entry["answers"]) == {"concat", "maxpool1d", "mean", "image"}
        for entry in measured["answers"]
    )
    clip = measured["answers"][0]
    decoded = read_video(videos / "moving_0000.mp4", num_frames=12)
    assert decoded.total_frames == 12 and decoded.frames.shape == (12, 64, 64, 3)
    # the decoded frames still show the clip's colour (the codec keeps the flat fill)
    colour = torch.tensor(COLOURS[clip["colour"]])
    distance = (decoded.frames.reshape(-1, 3).int() - colour).abs().sum(dim=1)
    assert int((distance < 40).sum()) > 50  # a shape of at least 3 px radius in every frame
    print(accuracy_table(measured))  # shown with pytest -s: the accuracy this budget reaches
    assert "| chance | | 16.7 |" in accuracy_table(measured)

    output = tmp_path / "results.json"
    arguments = [
        results["connectors"]["dci"]["model_dir"],
        "--videos",
        "2",
        "--output",
        str(output),
    ]
    assert main(arguments) == 0
    assert "| video, bilinear | 128 |" in capsys.readouterr().out  # 8 x ceil(8/2)^2
    assert json.loads(output.read_text())["num_videos"] == 2
