"""A synthetic VQA data set shipped as code, for CPU demos and smoke runs of the two-stage recipe.

Each image is a plain background with one to a few flat shapes (several colours, two sizes) placed
on a 3 x 3 grid, one object per cell, jittered inside its cell: objects never overlap and every
object's position is one unambiguous grid word. Stage 1 gets a templated caption per image
("two red circles and a blue square."), stage 2 gets one-word-answer questions of four types
(``colour``, ``shape``, ``position``, ``count``) that the scene answers unambiguously. Everything is
deterministic by seed; the held-out split is disjoint from training by construction: a scene goes
to eval or train by a hash of its layout (cells, colours, shapes, sizes; not the jitter), so no
evaluation image repeats a training layout, whatever the seed or the split sizes.

Layout written by :func:`write_synthetic_vqa` (LLaVA JSON, see docs/training.md, Data format; the ``image``
paths are relative to ``output_dir``, which is LLaVA's ``image_folder``)::

    output_dir/
        images/train_00000.png ...   training images (stage 1 and stage 2)
        images/eval_00000.png ...    held-out images (eval only)
        stage1.json    {"id", "image", "conversations": [human "<image>\\n<prompt>", gpt caption]}
        stage2.json    {"id", "image", "conversations": [human "<image>\\n<q> <instruction>", gpt a, ...]}
        eval.json      one question per record, plus "question_type", "question", "answer"
        scenes.json    {"format_version", "scenes": {image path: scene}} (the ground truth)
        metadata.json  settings, scene spec, counts and the vocabularies

Examples:
    >>> import random
    >>> scene = sample_scene(random.Random(0))
    >>> image = render_scene(scene, 64)  # PIL.Image, 64 x 64 RGB
    >>> caption(scene)
    'a yellow square, a purple circle and two blue triangles.'
    >>> qs = questions(scene, random.Random(1))  # [VQAQuestion("count", "How many ...?", "two"), ...]
    >>> files = write_synthetic_vqa("/tmp/vqa", num_train=100, num_eval=20)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

import numpy as np
from PIL import Image, ImageDraw

from mmconnect.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_positive_int,
    check_sequence,
)

#: RGB fill of each colour name; all far apart from each other and from the background.
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 160, 50),
        "blue": (30, 70, 220),
        "yellow": (240, 200, 20),
        "purple": (140, 50, 180),
        "orange": (245, 130, 20),
    }
)
#: Every shape :func:`render_scene` can draw; :class:`SceneSpec` uses the first three by default.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
#: Half-extent of each size as a fraction of a grid cell's side.
SIZES: Mapping[str, float] = MappingProxyType({"small": 0.25, "large": 0.40})
#: Position words of the 3 x 3 grid cells, row-major (cell ``3 * row + column``).
POSITIONS: tuple[str, ...] = (
    "top-left",
    "top",
    "top-right",
    "left",
    "center",
    "right",
    "bottom-left",
    "bottom",
    "bottom-right",
)
#: Count answers: ``COUNT_WORDS[n - 1]`` for ``n`` objects.
COUNT_WORDS: tuple[str, ...] = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "position", "count")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
#: Human turn of a stage-1 record after ``"<image>\n"``.
CAPTION_PROMPT = "Describe the image briefly."
#: Appended to every stage-2 / eval question.
ANSWER_INSTRUCTION = "Answer with one word."
#: Share of the scene layouts reserved for the held-out split (see :func:`is_held_out`).
HELD_OUT_FRACTION = 0.2
#: Smallest object half-extent, in pixels, that still shows its shape.
MIN_OBJECT_RADIUS_PX = 3.0
#: Tokens of every caption, question, prompt and answer: words (hyphenated ones whole) and single
#: punctuation marks, case kept. The ``<image>`` placeholder is not part of the vocabulary.
WORD_PATTERN = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*|[^\sA-Za-z]")
FORMAT_VERSION = 1

_GRID = 3
_GAP = 0.05  # free margin between an object's extent and its cell border, in cells
_MAX_ATTEMPTS = 10_000  # scene draws per image before a split is declared impossible
_PLURALS = MappingProxyType({shape: shape + "s" for shape in SHAPES})
_IMAGE = "<image>"

_COLOUR_OF_SHAPE = "What colour is the {shape}?"
_COLOUR_AT = "What colour is the {position} object?"
_SHAPE_OF_COLOUR = "What shape is the {colour} object?"
_SHAPE_AT = "What shape is the {position} object?"
_WHERE_COLOUR_SHAPE = "Where is the {colour} {shape}?"
_WHERE_SHAPE = "Where is the {shape}?"
_WHERE_COLOUR = "Where is the {colour} object?"
_COUNT_ALL = "How many objects are there?"
_COUNT_SHAPE = "How many {shapes} are there?"
_COUNT_COLOUR = "How many {colour} objects are there?"
_COUNT_COLOUR_SHAPE = "How many {colour} {shapes} are there?"
_TEMPLATES = (
    _COLOUR_OF_SHAPE,
    _COLOUR_AT,
    _SHAPE_OF_COLOUR,
    _SHAPE_AT,
    _WHERE_COLOUR_SHAPE,
    _WHERE_SHAPE,
    _WHERE_COLOUR,
    _COUNT_ALL,
    _COUNT_SHAPE,
    _COUNT_COLOUR,
    _COUNT_COLOUR_SHAPE,
)

RandomSource: TypeAlias = "random.Random | np.random.Generator | int"


# --------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    """One flat shape of a scene.

    Coordinates are fractions of the image side (``x`` to the right, ``y`` down), so a scene renders
    at any size. The whole object (``radius`` is its half-extent) lies inside grid cell ``cell``.

    Args:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        size: one of :data:`SIZES`.
        cell: grid cell ``3 * row + column`` in ``0..8``; :attr:`position` names it.
        x: centre, fraction of the image width.
        y: centre, fraction of the image height.
        radius: half-extent, fraction of the image side.
    """

    shape: str
    colour: str
    size: str
    cell: int
    x: float
    y: float
    radius: float

    def __post_init__(self) -> None:
        check_choice(self.shape, "shape", SHAPES)
        check_choice(self.colour, "colour", tuple(COLOURS))
        check_choice(self.size, "size", tuple(SIZES))
        check_int(self.cell, "cell", minimum=0, maximum=len(POSITIONS) - 1, hint="3 * row + column")
        for name in ("x", "y", "radius"):
            check_float(getattr(self, name), name)
        row, column = divmod(self.cell, _GRID)
        tolerance = 1e-6
        if not (
            self.radius > 0
            and column / _GRID - tolerance <= self.x - self.radius
            and self.x + self.radius <= (column + 1) / _GRID + tolerance
            and row / _GRID - tolerance <= self.y - self.radius
            and self.y + self.radius <= (row + 1) / _GRID + tolerance
        ):
            raise ValueError(
                f"object at x={self.x!r}, y={self.y!r} with radius={self.radius!r} does not lie "
                f"inside its grid cell {self.cell} ({POSITIONS[self.cell]})"
            )

    @property
    def position(self) -> str:
        """The position word of the object's cell (:data:`POSITIONS`)."""
        return POSITIONS[self.cell]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``position`` is included for readers and checked on load."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "cell": self.cell,
            "x": self.x,
            "y": self.y,
            "radius": self.radius,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneObject:
        """Inverse of :meth:`to_dict`; unknown keys or an inconsistent ``position`` raise."""
        data = dict(_check_keys("scene object", data, {"position"}, cls))
        position = data.pop("position", None)
        obj = cls(**data)
        if position is not None and position != obj.position:
            raise ValueError(
                f"scene object position={position!r} does not match its cell {obj.cell} "
                f"({obj.position!r})"
            )
        return obj


@dataclass(frozen=True)
class Scene:
    """The objects of one image, at most one per grid cell (so they never overlap).

    Args:
        objects: one or more :class:`SceneObject` in distinct cells (a list is converted).
    """

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if isinstance(self.objects, str | bytes) or not isinstance(self.objects, Iterable):
            raise TypeError(f"objects must be a sequence of SceneObject, got {self.objects!r}")
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not objects:
            raise ValueError("objects must hold at least one SceneObject, got none")
        for index, obj in enumerate(objects):
            if not isinstance(obj, SceneObject):
                raise TypeError(f"objects[{index}] must be a SceneObject, got {obj!r}")
        cells = [obj.cell for obj in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must occupy distinct grid cells, got cells {cells}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict ``{"objects": [...]}``."""
        return {"objects": [obj.to_dict() for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        data = _check_keys("scene", data, set(), cls)
        objects = data.get("objects")
        if isinstance(objects, str | bytes) or not isinstance(objects, Sequence):
            raise ValueError(f"scene needs an 'objects' list, got {objects!r}")
        return cls(objects=tuple(SceneObject.from_dict(obj) for obj in objects))


@dataclass(frozen=True, kw_only=True)
class SceneSpec:
    """What :func:`sample_scene` draws from. Smaller sets make a smaller vocabulary.

    Args:
        min_objects: fewest objects per scene (at least 1).
        max_objects: most objects per scene (at most 9, one per grid cell).
        colours: colour names to use, from :data:`COLOURS`.
        shapes: shapes to use, from :data:`SHAPES` (default: circle, square, triangle).
        sizes: sizes to use, from :data:`SIZES`.
    """

    min_objects: int = 1
    max_objects: int = 4
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES[:3]
    sizes: tuple[str, ...] = tuple(SIZES)

    def __post_init__(self) -> None:
        for name in ("min_objects", "max_objects"):
            check_int(getattr(self, name), name, minimum=1, maximum=len(POSITIONS))
        if self.max_objects < self.min_objects:
            raise ValueError(
                f"max_objects={self.max_objects} must be >= min_objects={self.min_objects}"
            )
        for name, allowed in (
            ("colours", tuple(COLOURS)),
            ("shapes", SHAPES),
            ("sizes", tuple(SIZES)),
        ):
            value = getattr(self, name)
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise TypeError(f"{name} must be a sequence of names, got {value!r}")
            value = tuple(value)
            if not value or len(set(value)) != len(value):
                raise ValueError(f"{name} must be a non-empty list of distinct names, got {value}")
            for index, item in enumerate(value):
                check_choice(item, f"{name}[{index}]", allowed)
            object.__setattr__(self, name, value)

    @property
    def min_radius(self) -> float:
        """Smallest object half-extent this spec draws, as a fraction of the image side."""
        return min(SIZES[size] for size in self.sizes) / _GRID

    def min_image_size(self) -> int:
        """Smallest image side (pixels) at which every shape is at least
        :data:`MIN_OBJECT_RADIUS_PX` in half-extent."""
        return math.ceil(MIN_OBJECT_RADIUS_PX / self.min_radius - 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a ``format_version``."""
        return {
            "format_version": FORMAT_VERSION,
            "min_objects": self.min_objects,
            "max_objects": self.max_objects,
            "colours": list(self.colours),
            "shapes": list(self.shapes),
            "sizes": list(self.sizes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneSpec:
        """Inverse of :meth:`to_dict`; unknown keys or another ``format_version`` raise."""
        data = dict(_check_keys("scene spec", data, {"format_version"}, cls))
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"scene spec format_version={version!r} is not {FORMAT_VERSION}")
        return cls(**data)


def sample_scene(rng: RandomSource, spec: SceneSpec | None = None) -> Scene:
    """Draw a random scene: a number of objects, their cells, shapes, colours, sizes and jitter.

    Objects are placed one per grid cell (cells drawn without replacement) and jittered inside it,
    keeping a margin to the cell border: no two objects overlap and each position word is
    unambiguous. Objects come in reading order (by cell).

    Args:
        rng: a seeded ``random.Random`` or ``numpy.random.Generator`` (advanced in place), or an
            ``int`` seed. The same state gives the same scene.
        spec: what to draw from; default :class:`SceneSpec()`.
    """
    draw = _Draw(rng)
    spec = _check_spec(spec)
    count = draw.integer(spec.min_objects, spec.max_objects)
    objects = []
    for cell in sorted(draw.sample(range(len(POSITIONS)), count)):
        shape = draw.choice(spec.shapes)
        colour = draw.choice(spec.colours)
        size = draw.choice(spec.sizes)
        half = SIZES[size]
        row, column = divmod(cell, _GRID)
        x = draw.uniform(column + half + _GAP, column + 1 - half - _GAP) / _GRID
        y = draw.uniform(row + half + _GAP, row + 1 - half - _GAP) / _GRID
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour,
                size=size,
                cell=cell,
                x=round(x, 4),
                y=round(y, 4),
                radius=round(half / _GRID, 6),
            )
        )
    return Scene(objects=tuple(objects))


def is_held_out(scene: Scene) -> bool:
    """Whether ``scene``'s layout belongs to the held-out split.

    A fixed hash of the layout (each object's cell, colour, shape and size; not the jitter) puts
    :data:`HELD_OUT_FRACTION` of all layouts in the held-out split, independent of any seed, so
    training and evaluation images never share a layout.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {scene!r}")
    key = ";".join(
        f"{obj.cell}:{obj.colour}:{obj.shape}:{obj.size}"
        for obj in sorted(scene.objects, key=lambda obj: obj.cell)
    )
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


# --------------------------------------------------------------------------------------------
# Rendering and text


def render_scene(
    scene: Scene, image_size: int = 64, *, background: tuple[int, int, int] = BACKGROUND
) -> Image.Image:
    """Draw ``scene`` as an ``image_size x image_size`` RGB image (flat fills, no antialiasing).

    The pixel at ``(int(x * image_size), int(y * image_size))`` of every object has exactly the
    object's :data:`COLOURS` value. Circles have radius ``r``, squares half-side ``0.85 r``,
    triangles (pointing up) and diamonds circumradius ``r``, centred on the object's centre.

    Raises:
        ValueError: ``image_size`` is so small that some object would be under
            :data:`MIN_OBJECT_RADIUS_PX` pixels in half-extent.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {scene!r}")
    check_positive_int(image_size, "image_size")
    check_sequence(background, "background", of="three 0..255 ints (r, g, b)")
    if len(background) != 3:
        raise ValueError(
            f"background must be an (r, g, b) triple of 0..255 ints, got {background!r}"
        )
    for index, value in enumerate(background):
        check_int(value, f"background[{index}]", minimum=0, maximum=255)
    smallest = min(obj.radius for obj in scene.objects)
    if smallest * image_size < MIN_OBJECT_RADIUS_PX - 1e-9:
        needed = math.ceil(MIN_OBJECT_RADIUS_PX / smallest - 1e-9)
        raise ValueError(
            f"image_size={image_size} is too small for this scene: its smallest object would be "
            f"{smallest * image_size:.1f} px in half-extent (at least {MIN_OBJECT_RADIUS_PX:g} "
            f"needed); use image_size >= {needed}"
        )
    image = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in background))
    pen = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * image_size, obj.y * image_size, obj.radius * image_size
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            half = 0.85 * r
            pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif obj.shape == "triangle":
            dx = r * math.sqrt(3) / 2
            pen.polygon([(cx, cy - r), (cx + dx, cy + r / 2), (cx - dx, cy + r / 2)], fill=fill)
        else:  # diamond
            pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


def caption(scene: Scene) -> str:
    """A short templated caption: groups of equal (colour, shape) in reading order.

    Example: ``"a red circle."``, ``"two red circles and a blue square."``,
    ``"a red circle, an orange square and two green triangles."``
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {scene!r}")
    groups = Counter((obj.colour, obj.shape) for obj in scene.objects)  # keeps first-seen order
    phrases = []
    for (colour, shape), count in groups.items():
        if count == 1:
            article = "an" if colour[0] in "aeiou" else "a"
            phrases.append(f"{article} {colour} {shape}")
        else:
            phrases.append(f"{COUNT_WORDS[count - 1]} {colour} {_PLURALS[shape]}")
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


class VQAQuestion(NamedTuple):
    """One question about a scene; unpacks as ``(question_type, question, answer)``."""

    question_type: str
    question: str
    answer: str


def all_questions(scene: Scene) -> list[VQAQuestion]:
    """Every question of every type that ``scene`` answers unambiguously, in a fixed order.

    - ``colour``: "What colour is the {shape}?" (that shape occurs once), "What colour is the
      {position} object?"
    - ``shape``: "What shape is the {colour} object?" (that colour occurs once), "What shape is
      the {position} object?"
    - ``position``: "Where is the {colour} {shape}?" / "Where is the {shape}?" / "Where is the
      {colour} object?" (each when exactly one object matches)
    - ``count``: "How many objects / {shape}s / {colour} objects / {colour} {shape}s are there?"
      for what the scene contains (answers one..nine)
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {scene!r}")
    objects = scene.objects
    shapes = Counter(obj.shape for obj in objects)
    colours = Counter(obj.colour for obj in objects)
    pairs = Counter((obj.colour, obj.shape) for obj in objects)
    found: list[VQAQuestion] = []

    def add(kind: str, question: str, answer: str) -> None:
        found.append(VQAQuestion(kind, question, answer))

    for obj in objects:
        if shapes[obj.shape] == 1:
            add("colour", _COLOUR_OF_SHAPE.format(shape=obj.shape), obj.colour)
    for obj in objects:
        add("colour", _COLOUR_AT.format(position=obj.position), obj.colour)
    for obj in objects:
        if colours[obj.colour] == 1:
            add("shape", _SHAPE_OF_COLOUR.format(colour=obj.colour), obj.shape)
    for obj in objects:
        add("shape", _SHAPE_AT.format(position=obj.position), obj.shape)
    for obj in objects:
        if pairs[obj.colour, obj.shape] == 1:
            add(
                "position",
                _WHERE_COLOUR_SHAPE.format(colour=obj.colour, shape=obj.shape),
                obj.position,
            )
        if shapes[obj.shape] == 1:
            add("position", _WHERE_SHAPE.format(shape=obj.shape), obj.position)
        if colours[obj.colour] == 1:
            add("position", _WHERE_COLOUR.format(colour=obj.colour), obj.position)
    add("count", _COUNT_ALL, COUNT_WORDS[len(objects) - 1])
    for shape, count in shapes.items():
        add("count", _COUNT_SHAPE.format(shapes=_PLURALS[shape]), COUNT_WORDS[count - 1])
    for colour, count in colours.items():
        add("count", _COUNT_COLOUR.format(colour=colour), COUNT_WORDS[count - 1])
    for (colour, shape), count in pairs.items():
        question = _COUNT_COLOUR_SHAPE.format(colour=colour, shapes=_PLURALS[shape])
        add("count", question, COUNT_WORDS[count - 1])
    return found


def questions(scene: Scene, rng: RandomSource, *, num_questions: int = 4) -> list[VQAQuestion]:
    """Up to ``num_questions`` distinct questions about ``scene``, spread evenly over the types.

    Types are taken round-robin starting at a random type (so over many scenes each type is asked
    about equally often). Within a type the answer is drawn first, uniformly among the answers its
    remaining questions have, then a question with that answer (so "one" does not swamp the count
    answers just because most counted groups are single). A type without (further) answerable
    questions is skipped; fewer questions come back only when the scene has fewer.

    Args:
        rng: a seeded ``random.Random`` / ``numpy.random.Generator`` (advanced) or an ``int`` seed.
        num_questions: how many to ask, at least 1.
    """
    draw = _Draw(rng)
    check_positive_int(num_questions, "num_questions")
    pools: dict[str, list[VQAQuestion]] = {kind: [] for kind in QUESTION_TYPES}
    for question in all_questions(scene):
        pools[question.question_type].append(question)
    start = draw.integer(0, len(QUESTION_TYPES) - 1)
    order = QUESTION_TYPES[start:] + QUESTION_TYPES[:start]
    picked: list[VQAQuestion] = []
    while len(picked) < num_questions and any(pools.values()):
        for kind in order:
            pool = pools[kind]
            if pool and len(picked) < num_questions:
                answer = draw.choice(list(dict.fromkeys(q.answer for q in pool)))
                question = draw.choice([q for q in pool if q.answer == answer])
                pool.remove(question)
                picked.append(question)
    return picked


def vocabulary(spec: SceneSpec | None = None) -> tuple[str, ...]:
    """Every answer word a data set of ``spec`` (default :class:`SceneSpec()`) can contain.

    Colours, shapes, the nine position words and the count words up to ``spec.max_objects``, in
    that order. Use :func:`text_vocabulary` for the words of questions, captions and prompts too.
    """
    spec = _check_spec(spec)
    return (*spec.colours, *spec.shapes, *POSITIONS, *COUNT_WORDS[: spec.max_objects])


def text_vocabulary(
    spec: SceneSpec | None = None,
    *,
    caption_prompt: str = CAPTION_PROMPT,
    answer_instruction: str = ANSWER_INSTRUCTION,
) -> tuple[str, ...]:
    """Sorted tokens (:data:`WORD_PATTERN`) of every caption, question, prompt and answer.

    A superset of what a data set of ``spec`` written with these prompts contains, to build a small
    word-level tokenizer; ``<image>`` is not included (tokenizers keep it as a special token).
    """
    spec = _check_spec(spec)
    texts = [re.sub(r"\{\w+\}", " ", template) for template in _TEMPLATES]
    texts += [caption_prompt, answer_instruction, "a an and , ."]
    texts += [_PLURALS[shape] for shape in spec.shapes]
    texts += vocabulary(spec)
    tokens = set()
    for text in texts:
        tokens.update(WORD_PATTERN.findall(text.replace(_IMAGE, " ")))
    return tuple(sorted(tokens))


# --------------------------------------------------------------------------------------------
# Writing a data set


@dataclass(frozen=True)
class SyntheticVQAFiles:
    """Where :func:`write_synthetic_vqa` put a data set, and how much it holds.

    Attributes:
        root: the output directory; LLaVA's ``image_folder`` (record ``image`` paths are relative).
        images_dir: ``root / "images"``: ``train_*.png`` and ``eval_*.png``.
        stage1, stage2, eval: the LLaVA JSON files (captions, training questions, held-out
            questions).
        scenes: ``scenes.json``, the ground truth of every image (:func:`load_scenes`).
        metadata: ``metadata.json``: the arguments, the spec, counts and both vocabularies.
        num_train_images, num_eval_images: images per split.
        num_stage2_questions, num_eval_questions: questions per split.
        question_type_counts: ``{"train" | "eval": {question type: count}}``.
    """

    root: Path
    images_dir: Path
    stage1: Path
    stage2: Path
    eval: Path
    scenes: Path
    metadata: Path
    num_train_images: int
    num_eval_images: int
    num_stage2_questions: int
    num_eval_questions: int
    question_type_counts: Mapping[str, Mapping[str, int]]


def write_synthetic_vqa(
    output_dir: str | Path,
    *,
    num_train: int = 2000,
    num_eval: int = 200,
    image_size: int = 64,
    seed: int = 0,
    questions_per_image: int = 4,
    spec: SceneSpec | None = None,
    multi_turn: bool = True,
    caption_prompt: str = CAPTION_PROMPT,
    answer_instruction: str = ANSWER_INSTRUCTION,
    overwrite: bool = False,
) -> SyntheticVQAFiles:
    """Write a synthetic two-stage VQA data set (PNG images + LLaVA JSON) to ``output_dir``.

    Training images feed both ``stage1.json`` (one caption each) and ``stage2.json`` (their
    questions as one multi-turn conversation, or one record per question with
    ``multi_turn=False``; ids ``train_00000`` / ``train_00000_q0``). Held-out images only appear
    in ``eval.json``: one record per question with ``question_type``, ``question`` and ``answer``.
    Train and eval draw from separate random streams of ``seed`` and never share a layout
    (:func:`is_held_out`), so the eval set does not change with ``num_train`` and vice versa. The
    same arguments give byte-identical JSON and identical pixels; another seed gives another set.

    Args:
        output_dir: directory to create or fill; must be writable.
        num_train: training images, at least 1.
        num_eval: held-out images, at least 0.
        image_size: image side in pixels, at least ``spec.min_image_size()`` (36 by default).
        seed: any int.
        questions_per_image: questions asked per image (train and eval), spread over the types.
        spec: what scenes contain; default :class:`SceneSpec()`.
        multi_turn: one stage-2 record per image (all its questions) instead of one per question.
        caption_prompt: stage-1 human text after ``"<image>\\n"``; ``""`` gives the bare
            ``"<image>"`` turn of the ``plain`` template.
        answer_instruction: appended to each question (``""`` for none).
        overwrite: replace the files of an earlier data set in ``output_dir`` (stale
            ``images/train_*.png`` / ``images/eval_*.png`` are removed) instead of refusing.

    Raises:
        ValueError: a bad argument, or ``output_dir`` cannot be created or written.
        FileExistsError: ``output_dir`` already holds a data set and ``overwrite`` is false.
    """
    check_positive_int(num_train, "num_train")
    check_int(num_eval, "num_eval", minimum=0)
    check_positive_int(questions_per_image, "questions_per_image")
    check_int(seed, "seed")
    spec = _check_spec(spec)
    check_positive_int(image_size, "image_size")
    if image_size < spec.min_image_size():
        raise ValueError(
            f"image_size={image_size} is too small for the shapes: the small ones would be "
            f"{spec.min_radius * image_size:.1f} px in half-extent (at least "
            f"{MIN_OBJECT_RADIUS_PX:g} needed); use image_size >= {spec.min_image_size()}"
        )
    check_bool(multi_turn, "multi_turn")
    check_bool(overwrite, "overwrite")
    for name, value in (
        ("caption_prompt", caption_prompt),
        ("answer_instruction", answer_instruction),
    ):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {value!r}")
        if _IMAGE in value:
            raise ValueError(f"{name} must not contain {_IMAGE!r} (it is added), got {value!r}")

    root = _prepare_output_dir(output_dir, overwrite)
    images_dir = root / "images"
    names = {
        "stage1": root / "stage1.json",
        "stage2": root / "stage2.json",
        "eval": root / "eval.json",
        "scenes": root / "scenes.json",
        "metadata": root / "metadata.json",
    }

    def prompt(question: str, first: bool) -> str:
        text = f"{question} {answer_instruction}".strip()
        return f"{_IMAGE}\n{text}" if first else text

    scenes: dict[str, dict[str, Any]] = {}
    stage1: list[dict[str, Any]] = []
    stage2: list[dict[str, Any]] = []
    eval_records: list[dict[str, Any]] = []
    type_counts = {split: dict.fromkeys(QUESTION_TYPES, 0) for split in ("train", "eval")}
    for split, count in (("train", num_train), ("eval", num_eval)):
        draw = _Draw(random.Random(f"mmconnect.synthetic/{seed}/{split}"))
        digits = max(5, len(str(count - 1)))
        for index in range(count):
            scene = _sample_split_scene(draw, spec, held_out=split == "eval")
            asked = questions(scene, draw, num_questions=questions_per_image)
            image_id = f"{split}_{index:0{digits}d}"
            image_path = f"images/{image_id}.png"
            render_scene(scene, image_size).save(images_dir / f"{image_id}.png", format="PNG")
            scenes[image_path] = scene.to_dict()
            for question in asked:
                type_counts[split][question.question_type] += 1
            if split == "eval":
                for number, (kind, question, answer) in enumerate(asked):
                    eval_records.append(
                        {
                            "id": f"{image_id}_q{number}",
                            "image": image_path,
                            "question_type": kind,
                            "question": question,
                            "answer": answer,
                            "conversations": _turns([(prompt(question, True), answer)]),
                        }
                    )
                continue
            human = f"{_IMAGE}\n{caption_prompt}" if caption_prompt else _IMAGE
            stage1.append(
                {
                    "id": image_id,
                    "image": image_path,
                    "conversations": _turns([(human, caption(scene))]),
                }
            )
            if multi_turn:
                turns = [(prompt(q, n == 0), a) for n, (_, q, a) in enumerate(asked)]
                stage2.append({"id": image_id, "image": image_path, "conversations": _turns(turns)})
            else:
                for number, (_, question, answer) in enumerate(asked):
                    stage2.append(
                        {
                            "id": f"{image_id}_q{number}",
                            "image": image_path,
                            "conversations": _turns([(prompt(question, True), answer)]),
                        }
                    )

    metadata = {
        "format_version": FORMAT_VERSION,
        "generator": __name__,
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_eval": num_eval,
        "questions_per_image": questions_per_image,
        "multi_turn": multi_turn,
        "caption_prompt": caption_prompt,
        "answer_instruction": answer_instruction,
        "held_out_fraction": HELD_OUT_FRACTION,
        "spec": spec.to_dict(),
        "colours_rgb": {name: list(COLOURS[name]) for name in spec.colours},
        "question_type_counts": type_counts,
        "answer_vocabulary": list(vocabulary(spec)),
        "text_vocabulary": list(
            text_vocabulary(
                spec, caption_prompt=caption_prompt, answer_instruction=answer_instruction
            )
        ),
    }
    _write_json(names["stage1"], stage1)
    _write_json(names["stage2"], stage2)
    _write_json(names["eval"], eval_records)
    _write_json(names["scenes"], {"format_version": FORMAT_VERSION, "scenes": scenes})
    _write_json(names["metadata"], metadata)
    return SyntheticVQAFiles(
        root=root,
        images_dir=images_dir,
        **names,
        num_train_images=num_train,
        num_eval_images=num_eval,
        num_stage2_questions=sum(type_counts["train"].values()),
        num_eval_questions=len(eval_records),
        question_type_counts=MappingProxyType(
            {split: MappingProxyType(counts) for split, counts in type_counts.items()}
        ),
    )


def load_scenes(path: str | Path) -> dict[str, Scene]:
    """Read a ``scenes.json`` back: ``{image path relative to the data set root: Scene}``."""
    data = json.loads(Path(path).read_text())
    if (
        not isinstance(data, dict)
        or data.get("format_version") != FORMAT_VERSION
        or not isinstance(data.get("scenes"), dict)
    ):
        raise ValueError(
            f"path={str(path)!r} is not a scenes.json of format_version {FORMAT_VERSION}"
        )
    return {image: Scene.from_dict(scene) for image, scene in data["scenes"].items()}


# --------------------------------------------------------------------------------------------
# Helpers


class _Draw:
    """The few random draws this module needs, from ``random.Random``, numpy or an int seed."""

    def __init__(self, rng: RandomSource) -> None:
        if isinstance(rng, _Draw):
            self._python, self._numpy = rng._python, rng._numpy
        elif isinstance(rng, random.Random):
            self._python, self._numpy = rng, None
        elif isinstance(rng, np.random.Generator):
            self._python, self._numpy = None, rng
        elif isinstance(rng, Integral) and not isinstance(rng, bool):
            self._python, self._numpy = random.Random(int(rng)), None
        else:
            raise TypeError(
                f"rng must be a random.Random, a numpy.random.Generator or an int seed, got {rng!r}"
            )

    def integer(self, low: int, high: int) -> int:
        """Uniform int in ``[low, high]``."""
        if self._python is not None:
            return self._python.randint(low, high)
        return int(self._numpy.integers(low, high + 1))

    def uniform(self, low: float, high: float) -> float:
        if self._python is not None:
            return self._python.uniform(low, high)
        return float(self._numpy.uniform(low, high))

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.integer(0, len(items) - 1)]

    def sample(self, items: Iterable[Any], k: int) -> list[Any]:
        items = list(items)
        if self._python is not None:
            return self._python.sample(items, k)
        return [items[int(i)] for i in self._numpy.choice(len(items), size=k, replace=False)]


def _sample_split_scene(draw: _Draw, spec: SceneSpec, *, held_out: bool) -> Scene:
    for _ in range(_MAX_ATTEMPTS):
        scene = sample_scene(draw, spec)
        if is_held_out(scene) == held_out:
            return scene
    raise ValueError(
        f"spec={spec!r} admits too few distinct scene layouts for a {'held-out' if held_out else 'training'} "
        f"split (no suitable layout in {_MAX_ATTEMPTS} draws); allow more objects, colours, shapes "
        f"or sizes"
    )


def _turns(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for human, gpt in pairs:
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return turns


def _prepare_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    if not isinstance(output_dir, str | Path):
        raise TypeError(f"output_dir must be a str or Path, got {output_dir!r}")
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"output_dir={str(root)!r} exists and is not a directory")
    try:
        (root / "images").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise ValueError(
            f"output_dir={str(root)!r} cannot be created or written: {error}"
        ) from error
    products = ["stage1.json", "stage2.json", "eval.json", "scenes.json", "metadata.json"]
    stale = [root / name for name in products if (root / name).exists()]
    stale += sorted((root / "images").glob("train_*.png")) + sorted(
        (root / "images").glob("eval_*.png")
    )
    if stale and not overwrite:
        raise FileExistsError(
            f"output_dir={str(root)!r} already holds a data set ({stale[0].name} and "
            f"{len(stale) - 1} more files); pass overwrite=True to replace it"
        )
    for path in stale:
        path.unlink()
    return root


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_spec(spec: SceneSpec | None) -> SceneSpec:
    if spec is None:
        return SceneSpec()
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"spec must be a SceneSpec or None, got {spec!r}")
    return spec


def _check_keys(what: str, data: Any, extra: set[str], cls: type) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a mapping, got {data!r}")
    known = {name for name in cls.__dataclass_fields__} | extra
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; expected some of {sorted(known)}")
    return data
