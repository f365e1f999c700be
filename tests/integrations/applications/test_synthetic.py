"""Synthetic VQA data set: determinism, held-out split, LLaVA JSON, answers vs scenes and pixels."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmconnect.integrations.applications import synthetic
from mmconnect.integrations.applications.synthetic import (
    COLOURS,
    POSITIONS,
    QUESTION_TYPES,
    WORD_PATTERN,
    Scene,
    SceneObject,
    SceneSpec,
    VQAQuestion,
    all_questions,
    caption,
    is_held_out,
    load_scenes,
    questions,
    render_scene,
    sample_scene,
    text_vocabulary,
    vocabulary,
    write_synthetic_vqa,
)

SMALL = {"num_train": 24, "num_eval": 12, "questions_per_image": 4}


def _obj(shape: str, colour: str, cell: int, size: str = "small") -> SceneObject:
    row, column = divmod(cell, 3)
    radius = synthetic.SIZES[size] / 3
    return SceneObject(
        shape=shape,
        colour=colour,
        size=size,
        cell=cell,
        x=(column + 0.5) / 3,
        y=(row + 0.5) / 3,
        radius=radius,
    )


def _read(path: Path):
    return json.loads(path.read_text())


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_vqa(tmp_path_factory.mktemp("vqa"), seed=3, **SMALL)


def _answer(scene: Scene, question: str) -> str:
    """Independent oracle: parse the question, look at the scene, insist on a unique answer."""
    objects = scene.objects
    plural = {shape + "s": shape for shape in synthetic.SHAPES}

    def only(matches: list[SceneObject]) -> SceneObject:
        assert len(matches) == 1, f"{question!r} is ambiguous or unanswerable: {matches}"
        return matches[0]

    if m := re.fullmatch(r"What colour is the ([\w-]+) object\?", question):
        return only([o for o in objects if o.position == m[1]]).colour
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return only([o for o in objects if o.shape == m[1]]).colour
    if m := re.fullmatch(r"What shape is the ([\w-]+) object\?", question):
        key = "colour" if m[1] in COLOURS else "position"
        return only([o for o in objects if getattr(o, key) == m[1]]).shape
    if m := re.fullmatch(r"Where is the (\w+) object\?", question):
        return only([o for o in objects if o.colour == m[1]]).position
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        return only([o for o in objects if (o.colour, o.shape) == (m[1], m[2])]).position
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return only([o for o in objects if o.shape == m[1]]).position
    if m := re.fullmatch(r"How many (?:(\w+) )?(\w+) are there\?", question):
        colour, noun = m[1], m[2]
        count = sum(
            (colour is None or o.colour == colour)
            and (noun == "objects" or o.shape == plural[noun])
            for o in objects
        )
        assert count >= 1
        return synthetic.COUNT_WORDS[count - 1]
    raise AssertionError(f"unexpected question {question!r}")


def _qa_pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    pairs = []
    for human, gpt in zip(turns[::2], turns[1::2], strict=True):
        text = human["value"].removeprefix("<image>\n")
        pairs.append((text.removesuffix(" " + synthetic.ANSWER_INSTRUCTION), gpt["value"]))
    return pairs


# ------------------------------------------------------------------------------------------
# Determinism and the held-out split


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, dataset):
    again = write_synthetic_vqa(tmp_path / "again", seed=3, **SMALL)
    other = write_synthetic_vqa(tmp_path / "other", seed=4, **SMALL)
    for name in ("stage1", "stage2", "eval", "scenes", "metadata"):
        assert getattr(again, name).read_bytes() == getattr(dataset, name).read_bytes(), name
        assert getattr(other, name).read_bytes() != getattr(dataset, name).read_bytes(), name
    images = sorted(p.name for p in dataset.images_dir.iterdir())
    assert images == sorted(p.name for p in again.images_dir.iterdir())
    assert len(images) == SMALL["num_train"] + SMALL["num_eval"]
    differing = 0
    for name in images:
        first = _pixels(dataset.images_dir / name)
        np.testing.assert_array_equal(first, _pixels(again.images_dir / name))
        differing += not np.array_equal(first, _pixels(other.images_dir / name))
    assert differing >= len(images) - 1


def test_eval_split_does_not_depend_on_num_train(tmp_path, dataset):
    fewer = write_synthetic_vqa(
        tmp_path / "fewer", seed=3, num_train=5, num_eval=12, questions_per_image=4
    )
    assert fewer.eval.read_bytes() == dataset.eval.read_bytes()
    assert _read(fewer.stage1) == _read(dataset.stage1)[:5]  # train prefix unchanged too


def test_held_out_split_is_disjoint(dataset):
    scenes = load_scenes(dataset.scenes)
    eval_images = {record["image"] for record in _read(dataset.eval)}
    train_images = {record["image"] for record in _read(dataset.stage1)}
    assert train_images == {record["image"] for record in _read(dataset.stage2)}
    assert len(eval_images) == SMALL["num_eval"] and len(train_images) == SMALL["num_train"]
    assert not eval_images & train_images
    assert all(image.startswith("images/eval_") for image in eval_images)

    def layout(scene: Scene) -> frozenset:
        return frozenset((o.cell, o.colour, o.shape, o.size) for o in scene.objects)

    assert all(is_held_out(scenes[image]) for image in eval_images)
    assert not any(is_held_out(scenes[image]) for image in train_images)
    assert not {layout(scenes[i]) for i in eval_images} & {layout(scenes[i]) for i in train_images}


def test_sampling_is_deterministic_for_every_rng_kind():
    for make in (random.Random, np.random.default_rng):
        first = [sample_scene(make(7)) for _ in range(3)]
        assert first == [sample_scene(make(7)) for _ in range(3)]
        scene = first[0]
        assert questions(scene, make(1)) == questions(scene, make(1))
    assert sample_scene(11) == sample_scene(11) == sample_scene(random.Random(11))
    stream = random.Random(0)
    assert len({sample_scene(stream) for _ in range(20)}) == 20
    with pytest.raises(TypeError, match="rng"):
        sample_scene("seed")


# ------------------------------------------------------------------------------------------
# The files


def test_json_is_llava_format(dataset, tmp_path):
    single = write_synthetic_vqa(
        tmp_path / "single", seed=3, num_train=4, num_eval=0, multi_turn=False, caption_prompt=""
    )
    files = {
        "stage1": _read(dataset.stage1),
        "stage2": _read(dataset.stage2),
        "eval": _read(dataset.eval),
        "single_stage1": _read(single.stage1),
        "single_stage2": _read(single.stage2),
    }
    for name, records in files.items():
        assert isinstance(records, list) and records, name
        assert len({record["id"] for record in records}) == len(records), name
        for record in records:
            root = single.root if name.startswith("single") else dataset.root
            assert (root / record["image"]).is_file()
            turns = record["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert all(set(turn) == {"from", "value"} for turn in turns)
            assert turns[0]["value"].startswith("<image>")
            assert sum(turn["value"].count("<image>") for turn in turns) == 1
    for record in files["stage1"]:
        assert set(record) == {"id", "image", "conversations"}
        assert record["conversations"][0]["value"] == "<image>\n" + synthetic.CAPTION_PROMPT
    assert files["single_stage1"][0]["conversations"][0]["value"] == "<image>"
    assert all(len(r["conversations"]) == 8 for r in files["stage2"])  # 4 questions per image
    assert len(files["single_stage2"]) == 4 * 4
    assert all(len(r["conversations"]) == 2 for r in files["single_stage2"])
    for record in files["eval"]:
        assert set(record) == {
            "id",
            "image",
            "question_type",
            "question",
            "answer",
            "conversations",
        }
        assert record["question_type"] in QUESTION_TYPES
        human, gpt = record["conversations"]
        assert human["value"] == f"<image>\n{record['question']} {synthetic.ANSWER_INSTRUCTION}"
        assert gpt["value"] == record["answer"]
    metadata = _read(dataset.metadata)
    assert metadata["answer_vocabulary"] == list(vocabulary())
    assert SceneSpec.from_dict(metadata["spec"]) == SceneSpec()
    assert dataset.num_eval_questions == len(files["eval"]) == 4 * SMALL["num_eval"]


def test_answers_are_consistent_with_the_scenes(dataset):
    scenes = load_scenes(dataset.scenes)
    checked = 0
    for record in _read(dataset.eval):
        question, answer = _qa_pairs(record)[0]
        assert question == record["question"]
        assert _answer(scenes[record["image"]], question) == answer == record["answer"]
        checked += 1
    for record in _read(dataset.stage2):
        for question, answer in _qa_pairs(record):
            assert _answer(scenes[record["image"]], question) == answer
            checked += 1
    assert checked == 4 * (SMALL["num_train"] + SMALL["num_eval"])
    for record in _read(dataset.stage1):
        assert record["conversations"][1]["value"] == caption(scenes[record["image"]])


def test_every_generated_question_is_answerable_and_covers_every_type():
    rng = random.Random(5)
    spec = SceneSpec(max_objects=6, shapes=synthetic.SHAPES)  # include diamonds, more objects
    seen_types = Counter()
    for _ in range(300):
        scene = sample_scene(rng, spec)
        candidates = all_questions(scene)
        assert len({q.question for q in candidates}) == len(candidates)
        for kind, question, answer in candidates:
            assert _answer(scene, question) == answer
            seen_types[kind] += 1
        # the unambiguity rules themselves
        for obj in scene.objects:
            asked = {q.question for q in candidates}
            unique_shape = sum(o.shape == obj.shape for o in scene.objects) == 1
            assert (f"What colour is the {obj.shape}?" in asked) == unique_shape
    assert set(seen_types) == set(QUESTION_TYPES)


def test_rendered_pixels_match_the_scene(dataset, tmp_path):
    scenes = load_scenes(dataset.scenes)
    background = np.array(synthetic.BACKGROUND)
    for image, scene in scenes.items():
        pixels = _pixels(dataset.root / image)
        assert pixels.shape == (64, 64, 3)
        for obj in scene.objects:
            col, row = int(obj.x * 64), int(obj.y * 64)
            assert tuple(pixels[row, col]) == COLOURS[obj.colour], (image, obj)
        drawn = {tuple(p) for p in pixels.reshape(-1, 3) if not np.array_equal(p, background)}
        assert drawn == {COLOURS[o.colour] for o in scene.objects}  # flat fills, no other colour
    other = write_synthetic_vqa(tmp_path / "56", seed=0, num_train=3, num_eval=2, image_size=56)
    for path in other.images_dir.iterdir():
        with Image.open(path) as image:
            assert image.size == (56, 56) and image.mode == "RGB"


def test_shapes_are_drawn_distinctly():
    size = 300
    scene = Scene(
        objects=(
            _obj("circle", "red", 0, "large"),
            _obj("square", "blue", 1, "large"),
            _obj("triangle", "green", 2, "large"),
            _obj("diamond", "orange", 3, "large"),
        )
    )
    pixels = np.asarray(render_scene(scene, size))

    def filled(obj: SceneObject, dx: float, dy: float) -> bool:
        col = int((obj.x + dx * obj.radius) * size)
        row = int((obj.y + dy * obj.radius) * size)
        return tuple(pixels[row, col]) == COLOURS[obj.colour]

    circle, square, triangle, diamond = scene.objects
    assert filled(circle, 0.9, 0) and not filled(circle, 0.75, 0.75)
    assert filled(square, 0.75, 0.75) and filled(square, -0.75, -0.75)
    assert filled(triangle, 0, -0.8) and filled(triangle, 0.75, 0.45)
    assert not filled(triangle, 0.6, -0.6) and not filled(triangle, 0, 0.6)
    assert filled(diamond, 0.8, 0) and filled(diamond, 0, -0.8) and not filled(diamond, 0.6, 0.6)


def test_question_types_are_balanced(dataset):
    rng = random.Random(9)
    asked = Counter()
    for _ in range(400):
        for question in questions(sample_scene(rng), rng, num_questions=1):
            asked[question.question_type] += 1
    assert sum(asked.values()) == 400
    assert all(0.19 <= asked[kind] / 400 <= 0.31 for kind in QUESTION_TYPES), asked
    written = Counter(r["question_type"] for r in _read(dataset.eval))
    assert all(written[kind] >= 0.2 * sum(written.values()) for kind in QUESTION_TYPES), written
    counts = Counter(
        q.answer
        for _ in range(300)
        for q in questions(sample_scene(rng), rng, num_questions=8)
        if q.question_type == "count"
    )
    assert counts["one"] < 0.6 * sum(counts.values()), counts  # answers drawn answer-first


def test_answers_and_texts_use_the_vocabularies(dataset):
    answers = set(vocabulary())
    tokens = set(text_vocabulary())
    assert len(answers) == len(vocabulary()) == 6 + 3 + 9 + 4
    assert set(POSITIONS) <= answers and all(" " not in word for word in answers)
    texts = []
    for record in _read(dataset.eval):
        assert record["answer"] in answers
    for name in ("stage1", "stage2", "eval"):
        for record in _read(getattr(dataset, name)):
            texts += [turn["value"].replace("<image>", " ") for turn in record["conversations"]]
    for record in _read(dataset.stage2):
        assert all(answer in answers for _, answer in _qa_pairs(record))
    assert set(WORD_PATTERN.findall(" ".join(texts))) <= tokens
    assert set(_read(dataset.metadata)["text_vocabulary"]) == tokens

    spec = SceneSpec(max_objects=2, colours=("red", "blue"), shapes=("circle", "square"))
    small = set(vocabulary(spec))
    assert small == {"red", "blue", "circle", "square", "one", "two", *POSITIONS}
    rng = random.Random(2)
    for _ in range(100):
        scene = sample_scene(rng, spec)
        assert all(q.answer in small for q in all_questions(scene))
        assert set(WORD_PATTERN.findall(caption(scene))) <= set(text_vocabulary(spec))


# ------------------------------------------------------------------------------------------
# Scenes, captions, round trips


def test_captions_group_equal_objects_in_reading_order():
    scene = Scene(
        objects=[_obj("circle", "red", 0), _obj("square", "blue", 4), _obj("circle", "red", 8)]
    )
    assert caption(scene) == "two red circles and a blue square."
    assert caption(Scene(objects=[_obj("triangle", "orange", 4)])) == "an orange triangle."
    three = Scene(
        objects=[_obj("circle", "red", 0), _obj("square", "green", 1), _obj("circle", "blue", 2)]
    )
    assert caption(three) == "a red circle, a green square and a blue circle."
    assert VQAQuestion("count", "How many circles are there?", "two") in all_questions(scene)
    assert VQAQuestion("colour", "What colour is the square?", "blue") in all_questions(scene)
    assert VQAQuestion("position", "Where is the blue object?", "center") in all_questions(scene)
    assert not any(q.question == "What colour is the circle?" for q in all_questions(scene))


def test_scenes_never_overlap_and_round_trip():
    rng = np.random.default_rng(0)
    spec = SceneSpec(min_objects=9, max_objects=9, sizes=("large",))
    for _ in range(50):
        scene = sample_scene(rng, spec)
        assert sorted(o.cell for o in scene.objects) == list(range(9))
        for a in scene.objects:  # bounding boxes are disjoint
            for b in scene.objects:
                if a is not b:
                    gap = max(abs(a.x - b.x), abs(a.y - b.y))
                    assert gap > a.radius + b.radius
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert SceneSpec.from_dict(SceneSpec(max_objects=3).to_dict()) == SceneSpec(max_objects=3)


# ------------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments_give_clear_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="num_train must be a positive int, got 0"):
        write_synthetic_vqa(out, num_train=0)
    with pytest.raises(TypeError, match=r"num_train must be a positive int, got True \(bool\)"):
        write_synthetic_vqa(out, num_train=True)
    with pytest.raises(TypeError, match=r"num_train must be a positive int, got 2.0 \(float\)"):
        write_synthetic_vqa(out, num_train=2.0)
    with pytest.raises(ValueError, match="num_eval must be a non-negative int, got -1"):
        write_synthetic_vqa(out, num_eval=-1)
    with pytest.raises(TypeError, match=r"multi_turn must be a bool \(True or False\), got 1"):
        write_synthetic_vqa(out, num_train=2, multi_turn=1)
    with pytest.raises(ValueError, match=r"image_size=16 is too small.*image_size >= 36"):
        write_synthetic_vqa(out, num_train=2, image_size=16)
    with pytest.raises(ValueError, match="questions_per_image must be a positive int, got 0"):
        write_synthetic_vqa(out, num_train=2, questions_per_image=0)
    with pytest.raises(ValueError, match="caption_prompt"):
        write_synthetic_vqa(out, num_train=2, caption_prompt="<image> describe")
    assert not out.exists()  # nothing written before the arguments are checked

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"output_dir=.*a_file.*not a directory"):
        write_synthetic_vqa(blocker, num_train=2)
    with pytest.raises(ValueError, match=r"output_dir=.*cannot be created or written"):
        write_synthetic_vqa(blocker / "sub", num_train=2)

    first = write_synthetic_vqa(out, num_train=4, num_eval=2)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_synthetic_vqa(out, num_train=2, num_eval=1)
    write_synthetic_vqa(out, num_train=2, num_eval=1, overwrite=True)
    assert sorted(p.name for p in first.images_dir.iterdir()) == [
        "eval_00000.png",
        "train_00000.png",
        "train_00001.png",
    ]

    with pytest.raises(ValueError, match="max_objects=2 must be >= min_objects=3"):
        SceneSpec(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match=r"max_objects must be an int in \[1, 9\], got 10"):
        SceneSpec(max_objects=10)
    with pytest.raises(TypeError, match=r"max_objects must be an int in \[1, 9\], got '4' \(str\)"):
        SceneSpec(max_objects="4")
    with pytest.raises(ValueError, match=r"colours\[1\] must be one of .*, got 'pink'"):
        SceneSpec(colours=("red", "pink"))
    with pytest.raises(ValueError, match="unknown keys"):
        SceneSpec.from_dict({"max_objects": 2, "colors": ["red"]})
    with pytest.raises(ValueError, match="distinct grid cells"):
        Scene(objects=[_obj("circle", "red", 0), _obj("square", "blue", 0)])
    with pytest.raises(ValueError, match="does not lie inside its grid cell"):
        SceneObject(shape="circle", colour="red", size="large", cell=0, x=0.5, y=0.5, radius=0.1)
    with pytest.raises(ValueError, match=r"image_size=20 is too small"):
        render_scene(Scene(objects=[_obj("circle", "red", 0)]), 20)
    with pytest.raises(ValueError, match="num_questions must be a positive int, got 0"):
        questions(Scene(objects=[_obj("circle", "red", 0)]), 0, num_questions=0)
    with pytest.raises(ValueError, match="too few distinct scene layouts"):
        tiny = SceneSpec(max_objects=1, colours=("red",), shapes=("square",), sizes=("large",))
        write_synthetic_vqa(tmp_path / "tiny", num_train=2, num_eval=2, spec=tiny)
