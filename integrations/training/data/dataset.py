"""The training dataset and its collator: ``{"input_ids", "labels", "pixel_values"}`` per record,
padded into batches for HF LLaVA models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mmconnect.integrations.training.data.encoding import IGNORE_INDEX, ConversationEncoder
from mmconnect.integrations.training.data.images import image_path, load_image, pad_to_square
from mmconnect.integrations.training.data.records import (
    LlavaRecord,
    as_records,
    describe_record,
    load_llava_json,
)
from mmconnect.integrations.training.data.templates import ChatTemplate
from mmconnect.integrations.training.data.validation import ValidationReport, validate_records
from mmconnect.validation import check_bool, check_choice, check_int, check_optional_int

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
        image_tokens: positions one image fills (``model.model.image_token_count()``).
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
        self.records = as_records(records)
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
        self.pad_to_square = check_bool(pad_to_square, "pad_to_square")

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
        where = describe_record(index, record)
        problem = record.image_tag_problem()
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        try:
            encoded = self.encoder(record.conversations)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        pixel_values = None
        if record.image is not None:
            path = image_path(self.image_folder, record.image)
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
        check_int(self.pad_token_id, "pad_token_id", hint="the tokenizer's pad token id")
        check_choice(self.padding_side, "padding_side", ("right", "left"))
        check_optional_int(self.pad_to_multiple_of, "pad_to_multiple_of", minimum=1)

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
