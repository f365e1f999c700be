"""Chat templates: a conversation rendered as text segments, each marked supervised or not.

Four are registered (:func:`get_template`, :func:`list_templates`): ``plain`` (LLaVA stage 1),
``vicuna_v1`` (LLaVA-1.5 stage 2), ``llama_3`` and ``chatml``; :func:`register_template` adds more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mmconnect.integrations.training.data.records import IMAGE_PLACEHOLDER, Turn
from mmconnect.registry import Registry
from mmconnect.validation import check_bool, check_str

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
        check_str(self.name, "name")
        for field in dataclasses.fields(self):
            if field.name != "name" and field.type in ("str", str):
                check_str(getattr(self, field.name), field.name, empty=True)
        for flag in ("end_is_eos", "add_bos", "image_only_user"):
            check_bool(getattr(self, flag), flag)
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
