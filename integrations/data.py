"""LLaVA-format training data: records, chat templates, turn-by-turn labels, validation, dataset.

The pieces, in the order data flows through them:

* :func:`load_llava_json` reads the LLaVA JSON format (docs/training.md, Data format) into
  :class:`LlavaRecord` objects and refuses anything that is not in that format, naming the record.
* :class:`ChatTemplate` renders a conversation as text segments, each marked supervised or not;
  four are registered (:func:`get_template`, :func:`list_templates`): ``plain`` (LLaVA stage 1),
  ``vicuna_v1`` (LLaVA-1.5 stage 2), ``llama_3`` and ``chatml``.
* :class:`ConversationEncoder` tokenizes those segments one by one, so labels are built turn by
  turn (never from length arithmetic, which silently zeroes whole samples on a tokenizer
  mismatch): supervised segments (answers and their end marker) keep their ids as labels,
  everything else is ``-100``. Each ``<image>`` becomes ``image_tokens`` copies of
  ``image_token_id``.
* :func:`validate_records` reports every record whose image is missing or unreadable, whose
  ``<image>`` count does not match its images or whose supervision truncation would remove; it
  never drops anything silently.
* :class:`LlavaDataset` yields ``{"input_ids", "labels", "pixel_values"}`` per record and
  :class:`DataCollator` pads them into a batch for HF LLaVA models.

Examples:
    >>> records = load_llava_json("llava_v1_5_mix665k.json")  # doctest: +SKIP
    >>> dataset = LlavaDataset(
    ...     records,
    ...     image_folder="data/",
    ...     template="vicuna_v1",
    ...     tokenizer=processor.tokenizer,
    ...     image_processor=processor.image_processor,
    ...     image_tokens=model.model.image_tokens_per_image(),
    ...     image_token_id=model.config.image_token_id,
    ...     max_length=2048,
    ... )  # doctest: +SKIP
    >>> dataset.validate().raise_if_any()  # doctest: +SKIP
    >>> collator = DataCollator.from_tokenizer(processor.tokenizer)  # doctest: +SKIP
    >>> batch = collator([dataset[0], dataset[1]])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mmconnect.registry import Registry

#: Label of positions that carry no loss (PyTorch's ``cross_entropy`` default ``ignore_index``).
IGNORE_INDEX = -100
#: The image placeholder in LLaVA JSON human turns.
IMAGE_PLACEHOLDER = "<image>"
#: The roles of LLaVA JSON turns: ``human`` (the user) and ``gpt`` (the assistant).
ROLES: tuple[str, ...] = ("human", "gpt")

#: How many format errors :func:`parse_llava_records` lists before summarising the rest.
_MAX_LISTED = 10

Role = Literal["human", "gpt"]
ProblemKind = Literal["missing_image", "unreadable_image", "image_count", "truncation"]


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")
    return value


def _optional_positive_int(value: Any, argument: str) -> int | None:
    return None if value is None else _positive_int(value, argument)


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: ``role`` is ``"human"`` or ``"gpt"``."""

    role: Role
    value: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {_short(self.role)}")
        if not isinstance(self.value, str):
            raise ValueError(f"value must be a string, got {type(self.value).__name__}")


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
        if isinstance(self.id, int) and not isinstance(self.id, bool):
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


def _describe(index: int, record: LlavaRecord) -> str:
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


def _as_records(records: Any, argument: str = "records") -> list[LlavaRecord]:
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


# ---------------------------------------------------------------------------- templates


class Segment(NamedTuple):
    """A piece of rendered text and whether its tokens are supervised (carry the loss)."""

    text: str
    supervised: bool


@dataclass(frozen=True, kw_only=True)
class ChatTemplate:
    """How a conversation becomes text, and which parts of it are supervised.

    One exchange renders as ``user_format`` (the human turn; ``{content}`` is its value),
    ``assistant_prefix``, then the supervised ``answer_format`` + ``answer_end`` and the
    unsupervised ``after_answer``. A non-empty ``system`` is rendered once, before the first turn,
    through ``system_format``. Only the answers and their end marker are supervised.

    Attributes:
        name: the registry name.
        system: the system prompt (``""``: none).
        system_format: wraps a non-empty ``system`` (``{system}`` is replaced).
        user_format: wraps a human turn (``{content}`` is replaced).
        assistant_prefix: unsupervised text before each answer (the assistant's role marker).
        answer_format: wraps an answer (``{content}``); supervised.
        answer_end: the end marker after each answer (e.g. ``"</s>"``); supervised.
        after_answer: unsupervised text after ``answer_end`` (e.g. ChatML's ``"\\n"``).
        end_is_eos: use the tokenizer's ``eos_token`` as ``answer_end`` when it has one
            (see :meth:`for_tokenizer`).
        add_bos: start with the tokenizer's BOS token when it has one.
        image_only_user: keep only the ``<image>`` tags of human turns (``plain``).
    """

    name: str
    system: str = ""
    system_format: str = "{system}"
    user_format: str
    assistant_prefix: str = ""
    answer_format: str = "{content}"
    answer_end: str
    after_answer: str = ""
    end_is_eos: bool = False
    add_bos: bool = True
    image_only_user: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for argument, marker in (
            ("system_format", "{system}"),
            ("user_format", "{content}"),
            ("answer_format", "{content}"),
        ):
            if marker not in getattr(self, argument):
                raise ValueError(
                    f"template {self.name!r}: {argument} must contain {marker}, "
                    f"got {getattr(self, argument)!r}"
                )
        if not self.answer_end:
            raise ValueError(
                f"template {self.name!r}: answer_end must be non-empty (the model has to learn "
                "where an answer stops)"
            )

    def for_tokenizer(self, tokenizer: Any) -> ChatTemplate:
        """This template with ``answer_end`` taken from ``tokenizer`` where it says so.

        With ``end_is_eos`` the tokenizer's ``eos_token`` (when set) replaces ``answer_end``, e.g.
        ``"</s>"`` for Vicuna. Other markers are changed with ``dataclasses.replace``.

        Raises:
            ValueError: ``answer_end`` encodes to no token with this tokenizer.
        """
        template = self
        eos = getattr(tokenizer, "eos_token", None)
        if self.end_is_eos and isinstance(eos, str) and eos:
            template = dataclasses.replace(self, answer_end=eos)
        if not tokenizer.encode(template.answer_end, add_special_tokens=False):
            raise ValueError(
                f"template {self.name!r}: answer_end {template.answer_end!r} encodes to no token "
                "with this tokenizer; set one it knows with dataclasses.replace(template, "
                "answer_end=...)"
            )
        return template

    def segments(self, turns: Sequence[Turn]) -> list[Segment]:
        """The conversation as text segments, adjacent ones of the same kind merged.

        ``<image>`` tags stay in the (unsupervised) text; :class:`ConversationEncoder` expands
        them. ``turns`` alternate human, gpt (as :class:`LlavaRecord` guarantees).
        """
        pieces: list[Segment] = []
        if self.system:
            pieces.append(Segment(self.system_format.replace("{system}", self.system), False))
        for turn in turns:
            if turn.role == "human":
                content = turn.value
                if self.image_only_user:
                    content = IMAGE_PLACEHOLDER * content.count(IMAGE_PLACEHOLDER)
                pieces.append(Segment(self.user_format.replace("{content}", content), False))
                pieces.append(Segment(self.assistant_prefix, False))
            else:
                answer = self.answer_format.replace("{content}", turn.value)
                pieces.append(Segment(answer + self.answer_end, True))
                pieces.append(Segment(self.after_answer, False))
        merged: list[Segment] = []
        for piece in pieces:
            if not piece.text:
                continue
            if merged and merged[-1].supervised == piece.supervised:
                merged[-1] = Segment(merged[-1].text + piece.text, piece.supervised)
            else:
                merged.append(piece)
        return merged

    def render(self, turns: Sequence[Turn]) -> str:
        """The conversation as one string (without BOS; ``<image>`` tags not expanded)."""
        return "".join(segment.text for segment in self.segments(turns))


_TEMPLATES: Registry[ChatTemplate] = Registry(
    "chat template", describe=lambda template: f"{type(template).__name__} {template.name!r}"
)


def register_template(template: ChatTemplate) -> None:
    """Register ``template`` under ``template.name``.

    Raises:
        ValueError: the name is taken (registries never silently replace).
    """
    if not isinstance(template, ChatTemplate):
        raise TypeError(f"template must be a ChatTemplate, got {type(template).__name__}")
    _TEMPLATES.register(template.name, template)


def list_templates() -> list[str]:
    """The registered template names, sorted."""
    return sorted(_TEMPLATES)


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The template registered as ``name`` (a :class:`ChatTemplate` is returned as is).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if isinstance(name, ChatTemplate):
        return name
    if name not in _TEMPLATES:
        raise ValueError(
            f"unknown chat template {name!r}; known templates: {', '.join(list_templates())}"
        )
    return _TEMPLATES[name]


#: LLaVA stage 1 (align): ``<image>`` + caption + ``"\n"``, loss on the caption and the newline.
register_template(
    ChatTemplate(name="plain", user_format="{content}", answer_end="\n", image_only_user=True)
)
#: LLaVA-1.5 stage 2: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...`` (separators ``" "``, ``"</s>"``).
register_template(
    ChatTemplate(
        name="vicuna_v1",
        system=(
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        system_format="{system} ",
        user_format="USER: {content} ",
        assistant_prefix="ASSISTANT:",
        answer_format=" {content}",
        answer_end="</s>",
        end_is_eos=True,
    )
)
#: Llama 3 instruct: header markers around each role, ``<|eot_id|>`` ends every message.
register_template(
    ChatTemplate(
        name="llama_3",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_end="<|eot_id|>",
    )
)
#: ChatML (Qwen): ``<|im_start|>role\n...<|im_end|>\n``; no BOS.
register_template(
    ChatTemplate(
        name="chatml",
        system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_end="<|im_end|>",
        after_answer="\n",
        add_bos=False,
    )
)


# ---------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids and labels of one conversation.

    Attributes:
        input_ids: ``[L]`` token ids.
        labels: ``[L]``: the id where supervised, ``IGNORE_INDEX`` elsewhere.
        image_spans: ``(start, end)`` of each image's token run, in order.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    image_spans: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        """How many positions carry a label."""
        return sum(label != IGNORE_INDEX for label in self.labels)

    def truncation_problem(self, max_length: int | None) -> str | None:
        """Why truncating to ``max_length`` would break this sample, or ``None``.

        It breaks when no supervised token is left or an image's token run would be cut (the
        model needs every image's tokens complete).
        """
        if max_length is None or len(self) <= max_length:
            return None
        first = next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX), None)
        if first is None or first >= max_length:
            return (
                f"truncation to max_length={max_length} leaves no supervised token (the sample "
                f"has {len(self)} tokens, its first answer token is at position {first})"
            )
        cut = [span for span in self.image_spans if span[1] > max_length]
        if cut:
            return (
                f"truncation to max_length={max_length} cuts the image tokens at positions "
                f"{cut[0][0]}..{cut[0][1] - 1} (the sample has {len(self)} tokens)"
            )
        return None

    def truncate(self, max_length: int | None) -> EncodedConversation:
        """The first ``max_length`` tokens (``None``: unchanged).

        Raises:
            ValueError: see :meth:`truncation_problem`.
        """
        problem = self.truncation_problem(max_length)
        if problem is not None:
            raise ValueError(problem)
        if max_length is None or len(self) <= max_length:
            return self
        return EncodedConversation(
            self.input_ids[:max_length], self.labels[:max_length], self.image_spans
        )


def _drops_leading_space(tokenizer: Any) -> bool:
    """Whether text pieces must lose one leading space to tokenize as they would in context.

    Tokenizers that put their own space marker before every piece they encode (SentencePiece with
    a prepending normalizer, e.g. Llama-2 / Vicuna in legacy mode) would otherwise encode
    ``" a"`` as ``"▁▁a"``; byte-level BPE needs the space kept (``"Ġa"``).
    """

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    joint = encode("a b")
    if encode("a") + encode(" b") == joint:
        return False
    return encode("a") + encode("b") == joint


class ConversationEncoder:
    """Tokenize conversations segment by segment into ``input_ids`` and ``labels``.

    Each text segment is tokenized on its own (``add_special_tokens=False``) and the pieces are
    concatenated, a BOS first when the template wants one and the tokenizer has one. Supervised
    segments (answers + end marker) get their ids as labels, everything else ``IGNORE_INDEX``.
    Each ``<image>`` becomes ``image_tokens`` copies of ``image_token_id``, never supervised.

    Args:
        template: a :class:`ChatTemplate` or a registered name; its end marker is resolved with
            :meth:`ChatTemplate.for_tokenizer`.
        tokenizer: an HF tokenizer.
        image_tokens: positions one image fills (``model.model.image_tokens_per_image()``).
        image_token_id: the id of those positions (``model.config.image_token_id``).
        max_length: truncate to this many tokens (``None``: never).
    """

    def __init__(
        self,
        template: ChatTemplate | str,
        tokenizer: Any,
        *,
        image_tokens: int,
        image_token_id: int,
        max_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = get_template(template).for_tokenizer(tokenizer)
        self.image_tokens = _positive_int(image_tokens, "image_tokens")
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
            raise ValueError(f"image_token_id must be an int, got {image_token_id!r}")
        self.image_token_id = image_token_id
        self.max_length = _optional_positive_int(max_length, "max_length")
        bos = getattr(tokenizer, "bos_token_id", None)
        self._bos = [bos] if self.template.add_bos and bos is not None else []
        self._drop_space = _drops_leading_space(tokenizer)

    def _encode_text(self, text: str) -> list[int]:
        if self._drop_space and text.startswith(" "):
            text = text[1:]
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def encode(self, turns: Sequence[Turn]) -> EncodedConversation:
        """The whole conversation, not truncated.

        Raises:
            ValueError: an answer holds an ``<image>`` tag.
        """
        ids: list[int] = list(self._bos)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        spans: list[tuple[int, int]] = []
        for segment in self.template.segments(turns):
            if segment.supervised:
                if IMAGE_PLACEHOLDER in segment.text:
                    raise ValueError(
                        f"an answer holds an {IMAGE_PLACEHOLDER} tag: {segment.text!r}"
                    )
                piece = self._encode_text(segment.text)
                ids += piece
                labels += piece
                continue
            for i, text in enumerate(segment.text.split(IMAGE_PLACEHOLDER)):
                if i:
                    spans.append((len(ids), len(ids) + self.image_tokens))
                    ids += [self.image_token_id] * self.image_tokens
                    labels += [IGNORE_INDEX] * self.image_tokens
                piece = self._encode_text(text)
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
        return EncodedConversation(tuple(ids), tuple(labels), tuple(spans))

    def __call__(self, turns: Sequence[Turn]) -> EncodedConversation:
        """:meth:`encode`, then truncated to ``max_length``.

        Raises:
            ValueError: truncation would leave no supervised token or cut an image's tokens.
        """
        return self.encode(turns).truncate(self.max_length)


# ---------------------------------------------------------------------------- images


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (truncated or corrupt files fail here, not later).

    Raises:
        ValueError: the file is missing or cannot be read; the message names the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {str(path)!r} is a directory; expected an image file")
    if not path.is_file():
        raise ValueError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a centred square filled with ``fill`` (RGB 0..255), as LLaVA-1.5's
    ``image_aspect_ratio="pad"`` does."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _image_path(image_folder: str | Path | None, image: str) -> Path:
    return Path(image) if image_folder is None else Path(image_folder) / image


# ---------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class DataProblem:
    """One record that cannot be trained on as it is.

    Attributes:
        index: the record's position in the data set.
        record_id: its ``id``.
        kind: ``"missing_image"``, ``"unreadable_image"``, ``"image_count"`` or ``"truncation"``.
        reason: what is wrong, in words.
        path: the image path involved, if any.
    """

    index: int
    record_id: str
    kind: ProblemKind
    reason: str
    path: str | None = None

    def __str__(self) -> str:
        image = "" if self.path is None else f" [image {self.path!r}]"
        return f"record {self.index} (id {self.record_id!r}){image}: {self.kind}: {self.reason}"


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of :func:`validate_records`: every problem found, nothing dropped."""

    num_records: int
    problems: tuple[DataProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether no record has a problem."""
        return not self.problems

    @property
    def bad_indices(self) -> frozenset[int]:
        """Positions of the records with a problem."""
        return frozenset(problem.index for problem in self.problems)

    def counts(self) -> dict[str, int]:
        """Problems per kind."""
        return dict(Counter(problem.kind for problem in self.problems))

    def summary(self, max_listed: int = 20) -> str:
        """A readable summary: counts per kind and the first ``max_listed`` problems."""
        if self.ok:
            return f"all {self.num_records} records are valid"
        counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts().items()))
        lines = [
            f"{len(self.bad_indices)} of {self.num_records} records have problems ({counts})",
            *(f"  {problem}" for problem in self.problems[:max_listed]),
        ]
        if len(self.problems) > max_listed:
            lines.append(f"  ... and {len(self.problems) - max_listed} more")
        return "\n".join(lines)

    def raise_if_any(self) -> None:
        """Raise a ``ValueError`` with :meth:`summary` when there is any problem."""
        if not self.ok:
            raise ValueError(self.summary())

    def without_problems(self, records: Sequence[LlavaRecord]) -> list[LlavaRecord]:
        """The records this report found nothing wrong with (an explicit, visible filter).

        Raises:
            ValueError: ``records`` is not the sequence that was validated (other length).
        """
        if len(records) != self.num_records:
            raise ValueError(
                f"records has {len(records)} items but the report covers {self.num_records}"
            )
        bad = self.bad_indices
        return [record for index, record in enumerate(records) if index not in bad]


#: Validation does not depend on the id image positions get; any will do.
_ANY_IMAGE_TOKEN_ID = 0


def validate_records(
    records: Sequence[LlavaRecord],
    *,
    image_folder: str | Path | None,
    template: ChatTemplate | str,
    tokenizer: Any,
    image_tokens: int,
    max_length: int | None = None,
    check_images: bool = True,
    strict: bool = False,
    progress: bool = False,
) -> ValidationReport:
    """Check every record and report all problems (never drops a record).

    A record has a problem when its image is missing or unreadable (opened and decoded with
    PIL), its ``<image>`` tags do not match its images, or truncation to ``max_length`` would
    leave no supervised token or cut an image's tokens.

    Args:
        records: the records (see :func:`load_llava_json`).
        image_folder: the folder image paths are relative to (``None``: paths as given).
        template: as for :class:`LlavaDataset`.
        tokenizer: as for :class:`LlavaDataset`.
        image_tokens: as for :class:`LlavaDataset`.
        max_length: as for :class:`LlavaDataset`.
        check_images: open every image (slow on big data sets; off: only the counts and lengths).
        strict: raise instead of returning a report with problems.
        progress: show a tqdm progress bar.

    Raises:
        ValueError: ``records`` is empty, or ``strict`` and a problem was found.
    """
    records = _as_records(records)
    encoder = ConversationEncoder(
        template,
        tokenizer,
        image_tokens=image_tokens,
        image_token_id=_ANY_IMAGE_TOKEN_ID,
        max_length=max_length,
    )
    items: Iterable[tuple[int, LlavaRecord]] = enumerate(records)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, total=len(records), desc="validating records")
    problems: list[DataProblem] = []
    for index, record in items:
        path = None if record.image is None else str(_image_path(image_folder, record.image))
        if path is not None and check_images:
            if not Path(path).is_file():
                problems.append(
                    DataProblem(index, record.id, "missing_image", "image file not found", path)
                )
            else:
                try:
                    load_image(path)
                except ValueError as exc:
                    problems.append(
                        DataProblem(index, record.id, "unreadable_image", str(exc), path)
                    )
        tag_problem = record.image_tag_problem()
        if tag_problem is not None:
            problems.append(DataProblem(index, record.id, "image_count", tag_problem, path))
            continue
        cut = encoder.encode(record.conversations).truncation_problem(encoder.max_length)
        if cut is not None:
            problems.append(DataProblem(index, record.id, "truncation", cut, path))
    report = ValidationReport(len(records), tuple(problems))
    if strict:
        report.raise_if_any()
    return report


# ---------------------------------------------------------------------------- dataset


class LlavaDataset(Dataset):
    """LLaVA JSON records as training samples for an HF LLaVA-style model.

    ``dataset[i]`` is ``{"input_ids": LongTensor [L], "labels": LongTensor [L],
    "pixel_values": FloatTensor [3, S, S] or None}`` (``None`` for a text-only record); ``L`` is
    at most ``max_length``. Records are encoded when read (nothing is dropped or cached);
    :meth:`validate` checks them all up front.

    Args:
        records: :class:`LlavaRecord` objects (or LLaVA JSON objects, parsed here).
        image_folder: the folder the records' image paths are relative to (``None``: as given).
        template: a :class:`ChatTemplate` or a registered name (:func:`list_templates`).
        tokenizer: an HF tokenizer.
        image_processor: an HF image processor giving one ``[3, S, S]`` image per input; may be
            ``None`` when no record has an image.
        image_tokens: positions one image fills (``model.model.image_tokens_per_image()``).
        image_token_id: the id of those positions (``model.config.image_token_id``).
        max_length: truncate samples to this many tokens (``None``: never).
        pad_to_square: pad images to a square with the processor's mean colour first
            (LLaVA-1.5's ``image_aspect_ratio="pad"``).

    Raises:
        ValueError: ``records`` is empty, or bad arguments (each named).
    """

    def __init__(
        self,
        records: Sequence[LlavaRecord],
        *,
        image_folder: str | Path | None,
        template: ChatTemplate | str,
        tokenizer: Any,
        image_processor: Any,
        image_tokens: int,
        image_token_id: int,
        max_length: int | None = None,
        pad_to_square: bool = False,
    ) -> None:
        self.records = _as_records(records)
        self.image_folder = None if image_folder is None else Path(image_folder)
        self.encoder = ConversationEncoder(
            template,
            tokenizer,
            image_tokens=image_tokens,
            image_token_id=image_token_id,
            max_length=max_length,
        )
        with_images = sum(record.image is not None for record in self.records)
        if image_processor is None and with_images:
            raise ValueError(
                f"image_processor is None but {with_images} of {len(self.records)} records have "
                "an image"
            )
        self.image_processor = image_processor
        self.pad_to_square = bool(pad_to_square)

    @classmethod
    def from_json(cls, path: str | Path, **kwargs: Any) -> LlavaDataset:
        """:func:`load_llava_json` then ``LlavaDataset(records, **kwargs)``."""
        return cls(load_llava_json(path), **kwargs)

    @property
    def template(self) -> ChatTemplate:
        """The template in use (end marker resolved for the tokenizer)."""
        return self.encoder.template

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Tensor | None]:
        """The sample of record ``index``.

        Raises:
            ValueError: the record's image is missing or unreadable, its ``<image>`` tags do not
                match its images, or truncation would leave nothing to learn; the message names
                the record's index and id (and the image path).
        """
        record = self.records[index]
        where = _describe(index, record)
        problem = record.image_tag_problem()
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        try:
            encoded = self.encoder(record.conversations)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        pixel_values = None
        if record.image is not None:
            path = _image_path(self.image_folder, record.image)
            try:
                image = load_image(path)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
            pixel_values = self._pixels(image, where)
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }

    def _pixels(self, image: Image.Image, where: str) -> Tensor:
        """``image`` through the processor: ``[3, S, S]`` float."""
        if self.pad_to_square:
            mean = getattr(self.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
            image = pad_to_square(image, tuple(int(255 * m) for m in mean))
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = torch.as_tensor(pixels)
        if pixels.ndim != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
            raise ValueError(
                f"{where}: image_processor returned pixel_values of shape {tuple(pixels.shape)}, "
                "expected [1, 3, S, S] (one crop per image; AnyRes processors are not supported)"
            )
        return pixels[0].float()

    def validate(
        self, *, check_images: bool = True, strict: bool = False, progress: bool = False
    ) -> ValidationReport:
        """:func:`validate_records` with this data set's settings."""
        return validate_records(
            self.records,
            image_folder=self.image_folder,
            template=self.encoder.template,
            tokenizer=self.encoder.tokenizer,
            image_tokens=self.encoder.image_tokens,
            max_length=self.encoder.max_length,
            check_images=check_images,
            strict=strict,
            progress=progress,
        )


# ---------------------------------------------------------------------------- collator


@dataclass(frozen=True, kw_only=True)
class DataCollator:
    """Pad :class:`LlavaDataset` samples into a batch.

    Returns ``input_ids`` ``[B, L]`` (padded with ``pad_token_id``), ``labels`` ``[B, L]``
    (padded with ``IGNORE_INDEX``), ``attention_mask`` ``[B, L]`` (1 on real tokens) and, when any
    sample has an image, ``pixel_values`` ``[n_images, 3, S, S]`` of those samples in batch order
    (the key is absent otherwise). ``L`` is the longest sample, rounded up to
    ``pad_to_multiple_of``.

    Attributes:
        pad_token_id: the id padded positions get.
        padding_side: ``"right"`` (training) or ``"left"``.
        pad_to_multiple_of: round ``L`` up to a multiple of this (``None``: no rounding).
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {self.pad_token_id!r}")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        _optional_positive_int(self.pad_to_multiple_of, "pad_to_multiple_of")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> DataCollator:
        """A collator padding with ``tokenizer.pad_token_id``.

        Raises:
            ValueError: the tokenizer has no pad token.
        """
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise ValueError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its unk or eos "
                "token) or pass pad_token_id= to DataCollator"
            )
        return cls(pad_token_id=pad, **kwargs)

    def __call__(self, samples: Sequence[Mapping[str, Tensor | None]]) -> dict[str, Tensor]:
        if not samples:
            raise ValueError("samples is empty: cannot collate an empty batch")
        for i, sample in enumerate(samples):
            ids, labels = sample["input_ids"], sample["labels"]
            if ids.ndim != 1 or ids.shape != labels.shape:
                raise ValueError(
                    f"sample {i}: input_ids and labels must be 1-D of the same length, got "
                    f"{tuple(ids.shape)} and {tuple(labels.shape)}"
                )
        length = max(len(sample["input_ids"]) for sample in samples)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(samples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            where = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, where] = sample["input_ids"]
            labels[row, where] = sample["labels"]
            attention_mask[row, where] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if images:
            shapes = {tuple(image.shape) for image in images}
            if len(shapes) != 1:
                raise ValueError(
                    f"pixel_values of the samples differ in shape: {sorted(shapes)}; use one "
                    "image processor size for the whole data set"
                )
            out["pixel_values"] = torch.stack(images)
        return out
