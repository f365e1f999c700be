"""mmconnect.validation: the shared argument checks, and that the library uses them everywhere (the
same mistake raises the same exception type, naming the argument, whichever module it reaches)."""

from __future__ import annotations

import doctest
import math
import re

import numpy as np
import pytest
import torch

import mmconnect.validation
from mmconnect import ConnectorConfig, DenseConnector, ResampleSpec, STISpec
from mmconnect.checkpoint import read_state_dict
from mmconnect.features import LayerFeatures
from mmconnect.fusion import pool_tokens
from mmconnect.integrations.applications.lab import LabConfig
from mmconnect.integrations.applications.lab_encoder import EncoderPretraining
from mmconnect.integrations.applications.moving_shapes import MovingShape, moving_shape_scenes
from mmconnect.integrations.applications.output_folders import check_output_folder
from mmconnect.integrations.applications.synthetic import write_synthetic_vqa
from mmconnect.integrations.chat.answering import generate_answer
from mmconnect.integrations.chat.video_io import write_video
from mmconnect.integrations.families.mini_gemini_vision import check_views
from mmconnect.integrations.training.data import DataCollator
from mmconnect.integrations.training.stages import LoraSettings, StageConfig
from mmconnect.layers import normalize_layer, paper_layer
from mmconnect.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_pair,
    check_optional_float,
    check_optional_int,
    check_positive_float,
    check_positive_int,
    check_sequence,
    check_str,
    is_int,
    is_number,
)
from mmconnect.video import count_video_tokens, plan_video_tokens, sample_frame_indices

# ---------------------------------------------------------------------------- the helpers


def test_doctests_pass():
    failures, attempted = doctest.testmod(mmconnect.validation)
    assert failures == 0 and attempted >= 10


def test_ints():
    assert [is_int(v) for v in (3, -1, True, 3.0, "3", np.int64(3))] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert check_int(-4, "offset") == -4
    assert check_positive_int(1, "steps") == 1
    assert check_optional_int(None, "limit", minimum=1) is None
    assert check_optional_int(0, "workers", minimum=0) == 0
    with pytest.raises(ValueError, match=r"^steps must be a positive int, got 0$"):
        check_positive_int(0, "steps")
    with pytest.raises(TypeError, match=r"^steps must be a positive int, got 2\.0 \(float\)$"):
        check_positive_int(2.0, "steps")
    with pytest.raises(ValueError, match=r"^cell must be an int in \[0, 8\], got 9; 3 \* row$"):
        check_int(9, "cell", minimum=0, maximum=8, hint="3 * row")
    with pytest.raises(ValueError, match=r"^seed must be an int <= 5, got 6$"):
        check_int(6, "seed", maximum=5)
    with pytest.raises(ValueError, match=r"^frames must be an int >= 2, got 1$"):
        check_int(1, "frames", minimum=2)
    with pytest.raises(ValueError, match=r"^workers must be a non-negative int, got -1$"):
        check_optional_int(-1, "workers", minimum=0)


def test_numbers():
    assert [is_number(v) for v in (1, 0.5, np.float32(0.5), True, "1", None)] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert check_float(3, "weight_decay", minimum=0) == 3.0
    assert isinstance(check_float(3, "weight_decay"), float)
    assert check_positive_float(1e-3, "learning_rate") == 1e-3
    assert check_optional_float(None, "learning_rate") is None
    assert check_float(1.0, "ratio", minimum=0, maximum=1) == 1.0
    cases = [
        (dict(minimum=0, exclusive_minimum=True), 0.0, "a positive number"),
        (dict(minimum=0), -0.5, "a non-negative number"),
        (dict(minimum=0, maximum=1, exclusive_maximum=True), 1.0, r"a number in \[0, 1\)"),
        (dict(minimum=0, maximum=1, exclusive_minimum=True), 0, r"a number in \(0, 1\]"),
        (dict(minimum=2.5), 2, "a number >= 2.5"),
        (dict(maximum=1, exclusive_maximum=True), 1, "a number < 1"),
        ({}, math.inf, "a finite number"),
        ({}, math.nan, "a finite number"),
    ]
    for bounds, value, expected in cases:
        with pytest.raises(ValueError, match=rf"^ratio must be {expected}, got {value!r}$"):
            check_float(value, "ratio", **bounds)
    with pytest.raises(TypeError, match=r"^lr must be a positive number, got '1e-3' \(str\)$"):
        check_positive_float("1e-3", "lr")
    with pytest.raises(TypeError, match=r"^lr must be a positive number, got True \(bool\)$"):
        check_positive_float(True, "lr")


def test_bools_strings_choices_pairs_and_sequences():
    assert check_bool(False, "overwrite") is False
    for value in (0, 1, "True", None):
        with pytest.raises(TypeError, match=r"^overwrite must be a bool \(True or False\)"):
            check_bool(value, "overwrite")
    assert check_str("", "system", empty=True) == ""
    with pytest.raises(TypeError, match=r"^name must be a non-empty str, got b'x' \(bytes\)$"):
        check_str(b"x", "name")
    with pytest.raises(ValueError, match=r"^name must be a non-empty str, got ''$"):
        check_str("", "name")
    assert check_choice(None, "pooling", ("mean", None)) is None
    # a value of another type is still a wrong value of a choice, also when unhashable
    for value in (["mean"], 3, "max"):
        with pytest.raises(ValueError, match=r"^pooling must be one of \('mean', 'concat'\)"):
            check_choice(value, "pooling", ("mean", "concat"))
    with pytest.raises(ValueError, match=r"^pooling must be one of \('mean',\), got \['mean'\]"):
        check_choice(["mean"], "pooling", {"mean"})
    assert check_int_pair([24, 12], "grid") == (24, 12)
    assert check_int_pair((0, 3), "offset", minimum=0) == (0, 3)
    with pytest.raises(
        TypeError, match=r"^grid must be a \(height, width\) pair of positive ints, got 24 \(int\)$"
    ):
        check_int_pair(24, "grid")
    with pytest.raises(TypeError, match=r"got \(24, '24'\) \(tuple\)$"):
        check_int_pair((24, "24"), "grid")
    with pytest.raises(ValueError, match=r"^grid must be .*, got \(24, 24, 1\)$"):
        check_int_pair((24, 24, 1), "grid")
    with pytest.raises(ValueError, match=r"^tiles must be a \(rows, columns\) pair of ints >= 2"):
        check_int_pair((1, 3), "tiles", minimum=2, what="(rows, columns) pair")
    assert check_sequence(range(3), "seeds", of="ints") == range(3)
    for value in ("012", 3, {1, 2}):
        with pytest.raises(TypeError, match=r"^seeds must be a sequence of ints, got "):
            check_sequence(value, "seeds", of="ints")


# ---------------------------------------------------------------------------- across the library

#: A count mistaken as a float, a string, a bool (wrong types), zero, a negative (wrong values).
COUNT_MISTAKES = [
    (2.5, TypeError),
    ("8", TypeError),
    (True, TypeError),
    (0, ValueError),
    (-3, ValueError),
]
#: A positive number mistaken as text or a bool (wrong types), zero, a negative, NaN (wrong values).
RATE_MISTAKES = [
    ("1e-3", TypeError),
    (True, TypeError),
    (0, ValueError),
    (-1.0, ValueError),
    (math.nan, ValueError),
]
#: A flag mistaken as an int, text or None: always a wrong type.
FLAG_MISTAKES = [(1, TypeError), ("yes", TypeError), (None, TypeError)]

_CLIP = MovingShape(shape="circle", colour="red", size="small", start_cell=0, end_cell=1)


def _count_arguments(tmp_path):
    """``argument name -> call with the value``: positive counts of public functions across the
    core and the integrations."""
    return {
        "num_frames": lambda v: sample_frame_indices(100, v),
        "total_frames": lambda v: sample_frame_indices(v, 8),
        "tokens_per_frame": lambda v: count_video_tokens(8, v, "concat"),
        "max_tokens": lambda v: plan_video_tokens(v, tokens_per_frame=576),
        "num_layers": lambda v: normalize_layer(0, v),
        "layer": lambda v: paper_layer(v),
        "window": lambda v: STISpec(extra_layers=(7, 15), window=v),
        "window ": lambda v: pool_tokens(torch.zeros(1, 16, 2), v),
        "image_grid": lambda v: check_views(v, False),
        "num_train": lambda v: write_synthetic_vqa(tmp_path / "data", num_train=v),
        "stage1_steps": lambda v: LabConfig(stage1_steps=v),
        "steps": lambda v: EncoderPretraining(steps=v),
        "per_device_train_batch_size": lambda v: StageConfig(
            stage="align", output_dir="unused", per_device_train_batch_size=v
        ),
        "rank": lambda v: LoraSettings(rank=v),
        "pad_to_multiple_of": lambda v: DataCollator(pad_token_id=0, pad_to_multiple_of=v),
        "max_new_tokens": lambda v: generate_answer(None, None, None, None, max_new_tokens=v),
        "fps": lambda v: write_video(tmp_path / "clip.mp4", torch.zeros(1, 2, 2, 3), fps=v),
        # at least two frames: zero and negatives are still wrong values
        "num_frames ": lambda v: moving_shape_scenes(_CLIP, v),
    }


@pytest.mark.parametrize(("value", "error"), COUNT_MISTAKES)
def test_the_same_count_mistake_raises_the_same_error_everywhere(tmp_path, value, error):
    for argument, call in _count_arguments(tmp_path).items():
        with pytest.raises(error) as info:
            call(value)
        message = str(info.value)
        assert message.startswith(f"{argument.strip()} must be "), (argument, message)
        assert f"got {value!r}" in message, (argument, message)
    assert not (tmp_path / "data").exists()  # refused before anything was written


@pytest.mark.parametrize(("value", "error"), RATE_MISTAKES)
def test_the_same_rate_mistake_raises_the_same_error_everywhere(value, error):
    calls = {
        "learning_rate": lambda v: StageConfig(stage="align", output_dir="unused", learning_rate=v),
        "stage1_learning_rate": lambda v: LabConfig(stage1_learning_rate=v),
        "num_train_epochs": lambda v: StageConfig(
            stage="align", output_dir="u", num_train_epochs=v
        ),
        "learning_rate ": lambda v: EncoderPretraining(learning_rate=v),
    }
    for argument, call in calls.items():
        with pytest.raises(error, match=rf"^{argument.strip()} must be a positive number, got "):
            call(value)


@pytest.mark.parametrize(("value", "error"), FLAG_MISTAKES)
def test_the_same_flag_mistake_raises_the_same_error_everywhere(tmp_path, value, error):
    weights = tmp_path / "weights.bin"
    torch.save({"w": torch.zeros(1)}, weights)
    calls = {
        "mmap": lambda v: read_state_dict(weights, mmap=v),
        "image_global": lambda v: check_views(2, v),
        "overwrite": lambda v: check_output_folder(tmp_path, tool="demo", overwrite=v, option="x"),
        "bf16": lambda v: StageConfig(stage="align", output_dir="unused", bf16=v),
        "multi_turn": lambda v: write_synthetic_vqa(tmp_path / "data", num_train=1, multi_turn=v),
        "show_progress": lambda v: LabConfig(show_progress=v),
    }
    for argument, call in calls.items():
        expected = f"{argument} must be a bool (True or False), got {value!r}"
        with pytest.raises(error, match=f"^{re.escape(expected)}"):
            call(value)


@pytest.mark.parametrize(
    ("grid", "error"),
    [((24.0, 24), TypeError), (576, TypeError), ((24, 0), ValueError), ((24, 24, 1), ValueError)],
)
def test_the_same_grid_mistake_raises_the_same_error_everywhere(grid, error):
    states = (torch.zeros(1, 577, 4),)
    calls = [
        lambda: LayerFeatures.from_hidden_states(states, num_prefix_tokens=1, grid=grid),
        lambda: count_video_tokens(2, 576, "concat", grid),
        lambda: plan_video_tokens(2000, tokens_per_frame=576, grid=grid),
        lambda: ResampleSpec(grid=grid),
        lambda: DenseConnector(
            ConnectorConfig(fusion="none", vision_dim=2, llm_dim=3, num_layers=2)
        ).num_tokens(grid),
    ]
    for call in calls:
        with pytest.raises(error, match=r"^grid must be a \(height, width\) pair of positive ints"):
            call()
