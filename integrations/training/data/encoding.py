"""Tokenizing a rendered conversation turn by turn, so labels never come from length arithmetic.

Supervised segments (answers and their end marker) keep their ids as labels, everything else is
``IGNORE_INDEX``; each ``<image>`` becomes ``image_tokens`` copies of ``image_token_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmconnect.integrations.training.data.records import IMAGE_PLACEHOLDER, Turn
from mmconnect.integrations.training.data.templates import ChatTemplate, get_template
from mmconnect.validation import check_int, check_optional_int, check_positive_int

#: Label of positions that carry no loss (PyTorch's ``cross_entropy`` default ``ignore_index``).
IGNORE_INDEX = -100


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
        image_tokens: positions one image fills (``model.model.image_token_count()``).
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
        self.image_tokens = check_positive_int(image_tokens, "image_tokens")
        self.image_token_id = check_int(
            image_token_id, "image_token_id", hint="model.config.image_token_id"
        )
        self.max_length = check_optional_int(max_length, "max_length", minimum=1)
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
