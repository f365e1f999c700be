"""Checking records against their images, template and length budget before training.

:func:`validate_records` reports every record whose image is missing or unreadable, whose
``<image>`` count does not match its images or whose supervision truncation would remove; it
never drops anything silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmconnect.integrations.training.data.encoding import ConversationEncoder
from mmconnect.integrations.training.data.images import image_path, load_image
from mmconnect.integrations.training.data.records import LlavaRecord, as_records
from mmconnect.integrations.training.data.templates import ChatTemplate
from mmconnect.validation import check_bool, check_int

ProblemKind = Literal["missing_image", "unreadable_image", "image_count", "truncation"]


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
        check_int(max_listed, "max_listed", minimum=0)
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
        TypeError: ``check_images``, ``strict`` or ``progress`` is not a bool.
    """
    for name, flag in (("check_images", check_images), ("strict", strict), ("progress", progress)):
        check_bool(flag, name)
    records = as_records(records)
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
        path = None if record.image is None else str(image_path(image_folder, record.image))
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
