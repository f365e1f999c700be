"""LLaVA JSON records: the format (docs/training.md, Data format), parsed and refused by record.

:func:`load_llava_json` reads a file, :func:`parse_llava_records` checks already-loaded data; both
name every record that is not in the format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmconnect.validation import check_choice, check_str, is_int

#: The image placeholder in LLaVA JSON human turns.
IMAGE_PLACEHOLDER = "<image>"
#: The roles of LLaVA JSON turns: ``human`` (the user) and ``gpt`` (the assistant).
ROLES: tuple[str, ...] = ("human", "gpt")

#: How many format errors :func:`parse_llava_records` lists before summarising the rest.
_MAX_LISTED = 10
Role = Literal["human", "gpt"]


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: ``role`` is ``"human"`` or ``"gpt"``."""

    role: Role
    value: str

    def __post_init__(self) -> None:
        check_choice(self.role, "role", ROLES)
        check_str(self.value, "value", empty=True)


@dataclass(frozen=True, kw_only=True)
class LlavaRecord:
    """One LLaVA JSON record.

    Attributes:
        id: the record's ``id`` (ints in the file become strings).
        conversations: alternating ``human`` / ``gpt`` turns, starting with ``human``, ending with
            ``gpt``.
        image: the image path relative to the image folder, or ``None`` for a text-only record.
    """

    id: str
    conversations: tuple[Turn, ...]
    image: str | None = None

    def __post_init__(self) -> None:
        if is_int(self.id):
            object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "conversations", tuple(self.conversations))
        for i, turn in enumerate(self.conversations):
            if not isinstance(turn, Turn):
                raise TypeError(f"conversations[{i}] must be a Turn, got {type(turn).__name__}")
        problems = _record_format_problems(self.to_dict())
        if problems:
            raise ValueError(f"record (id {_short(self.id)}): {'; '.join(problems)}")

    @property
    def num_images(self) -> int:
        """0 (text-only) or 1."""
        return 0 if self.image is None else 1

    def count_image_tags(self) -> int:
        """How many ``<image>`` placeholders the human turns hold."""
        return sum(
            t.value.count(IMAGE_PLACEHOLDER) for t in self.conversations if t.role == "human"
        )

    def image_tag_problem(self) -> str | None:
        """Why this record's ``<image>`` tags do not fit its images, or ``None`` when they do.

        Every image needs exactly one ``<image>`` tag in a human turn; answers hold none.
        """
        if any(IMAGE_PLACEHOLDER in t.value for t in self.conversations if t.role == "gpt"):
            return f"a gpt turn holds an {IMAGE_PLACEHOLDER} tag (only human turns may)"
        tags = self.count_image_tags()
        if tags != self.num_images:
            return (
                f"the human turns hold {tags} {IMAGE_PLACEHOLDER} tag(s) but the record has "
                f"{self.num_images} image(s)" + ("" if self.image is None else f" ({self.image!r})")
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        """The record as LLaVA JSON (``image`` only when there is one)."""
        data: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            data["image"] = self.image
        data["conversations"] = [{"from": t.role, "value": t.value} for t in self.conversations]
        return data

    @classmethod
    def from_dict(cls, data: Any, *, index: int | None = None) -> LlavaRecord:
        """Parse one LLaVA JSON object (extra keys such as ``"model"`` are ignored).

        Raises:
            ValueError: the object is not a LLaVA record; the message names the record (its
                ``index`` when given, and its id) and what is wrong.
        """
        problems = _record_format_problems(data)
        if problems:
            raise ValueError(f"{_describe_raw(data, index)}: {'; '.join(problems)}")
        image = data.get("image")
        return cls(
            id=str(data["id"]),
            conversations=tuple(Turn(t["from"], t["value"]) for t in data["conversations"]),
            image=image,
        )


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _describe_raw(data: Any, index: int | None) -> str:
    where = "record" if index is None else f"record {index}"
    if isinstance(data, Mapping) and "id" in data:
        return f"{where} (id {str(data['id'])!r})"
    return where


def describe_record(index: int, record: LlavaRecord) -> str:
    return f"record {index} (id {record.id!r})"


def _record_format_problems(data: Any) -> list[str]:
    """What keeps ``data`` from being a LLaVA record (empty when it is one)."""
    if not isinstance(data, Mapping):
        return [f"expected a JSON object, got {type(data).__name__}"]
    problems = []
    record_id = data.get("id")
    if "id" not in data:
        problems.append("has no 'id'")
    elif isinstance(record_id, bool) or not isinstance(record_id, str | int) or record_id == "":
        problems.append(f"'id' must be a non-empty string or an int, got {_short(record_id)}")
    image = data.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        problems.append(
            f"'image' must be one image path (a non-empty string), got {_short(image)}"
            + (" (multi-image records are not supported)" if isinstance(image, list) else "")
        )
    if "conversations" not in data:
        return [*problems, "has no 'conversations'"]
    turns = data["conversations"]
    if not isinstance(turns, list) or not turns:
        return [*problems, f"'conversations' must be a non-empty list, got {_short(turns)}"]
    roles = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not {"from", "value"} <= set(turn):
            problems.append(
                f"conversations[{i}] must be an object with 'from' and 'value', got {_short(turn)}"
            )
            continue
        if turn["from"] not in ROLES:
            problems.append(
                f"conversations[{i}]['from'] must be one of {ROLES}, got {_short(turn['from'])}"
            )
        if not isinstance(turn["value"], str):
            problems.append(
                f"conversations[{i}]['value'] must be a string, got {type(turn['value']).__name__}"
            )
        roles.append(turn["from"])
    if problems:
        return problems
    if "gpt" not in roles:
        return ["the conversation has no assistant ('gpt') turn, so nothing would be supervised"]
    expected = [ROLES[i % 2] for i in range(len(roles))]
    if roles != expected:
        first = next(i for i, (a, b) in enumerate(zip(roles, expected, strict=True)) if a != b)
        return [
            f"turns must alternate human, gpt, ... starting with human; conversations[{first}] "
            f"is {roles[first]!r} (roles: {roles})"
        ]
    if roles[-1] != "gpt":
        return [f"the conversation ends with an unanswered human turn (roles: {roles})"]
    return []


def parse_llava_records(data: Any, *, source: str = "data") -> list[LlavaRecord]:
    """Parse already-loaded LLaVA JSON (a list of record objects).

    Args:
        data: the decoded JSON.
        source: what to call ``data`` in error messages (e.g. the file path).

    Raises:
        ValueError: ``data`` is not a non-empty list of LLaVA records; every bad record is named
            by index and id (the first 10, then a count).
    """
    if not isinstance(data, list):
        raise ValueError(
            f"{source}: expected a JSON list of LLaVA records, got {type(data).__name__}"
            + (f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else "")
        )
    if not data:
        raise ValueError(f"{source}: the data set is empty (no records)")
    errors = []
    for index, item in enumerate(data):
        problems = _record_format_problems(item)
        if problems:
            errors.append(f"{_describe_raw(item, index)}: {'; '.join(problems)}")
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED])
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        raise ValueError(
            f"{source}: {len(errors)} of {len(data)} records are not in LLaVA format:\n  "
            f"{listed}{more}"
        )
    return [LlavaRecord.from_dict(item, index=index) for index, item in enumerate(data)]


def load_llava_json(path: str | Path) -> list[LlavaRecord]:
    """Read a LLaVA JSON file: a list of ``{"id", "image"?, "conversations"}`` objects.

    The file must be UTF-8 text (a leading byte-order mark is accepted).

    Raises:
        ValueError: ``path`` is a directory, not UTF-8 text, not valid JSON, not in LLaVA format
            (each bad record named by index and id) or holds no records.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory; expected a LLaVA JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); save "
            "it as UTF-8 JSON"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return parse_llava_records(data, source=str(path))


def as_records(records: Any, argument: str = "records") -> list[LlavaRecord]:
    if isinstance(records, str | Path | Mapping) or not isinstance(records, Iterable):
        raise TypeError(
            f"{argument} must be a sequence of LlavaRecord (see load_llava_json), got "
            f"{type(records).__name__}"
        )
    items = list(records)
    if not items:
        raise ValueError(f"{argument} is empty: the data set has no records")
    if all(isinstance(item, LlavaRecord) for item in items):
        return items
    return [
        item if isinstance(item, LlavaRecord) else LlavaRecord.from_dict(item, index=index)
        for index, item in enumerate(items)
    ]
