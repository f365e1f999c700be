"""``mmconnect lab``: the connectors side by side on a CPU, over seeds.

The CPU-scale analogue of the Dense Connector paper's Tables 1 and 3 (the presets and the
efficient Dense Connector of docs/concepts.md; the paper's figures in docs/lab.md). One run:

1. writes the synthetic VQA data set (:mod:`mmconnect.integrations.applications.synthetic`) and its word
   tokenizer, once;
2. pretrains a CLIP-style tower of CLIP-L's depth (24 blocks, small width) whose last layers
   hold colour as a smaller share of their features than its shallow layers, measures that with
   linear probes and colour shares per layer and freezes it
   (:mod:`mmconnect.integrations.applications.lab_encoder`);
3. for every seed and every connector (``baseline``, ``sti``, ``sci``, ``dci``,
   ``dci-efficient``: the ``*-clip-l-336`` presets at the tower's width, the efficient grid
   halved per side as 24x24 -> 12x12 is; or ``<fusion>+<projector kind>``, one of those
   fusions feeding any registered projector, a zoo connector at its lab size from
   :data:`LAB_PROJECTOR_SPECS`) trains both LLaVA stages with the demo's code
   (:func:`mmconnect.integrations.applications.demo.train_connector`) and identical budgets: the same data,
   steps, batch, learning-rate schedule, data order and initial LLM for a seed;
4. scores exact answers on held-out scenes per question type and reports the mean and the
   sample standard deviation over seeds: ``results.json``, ``results.md``, ``accuracy.png``,
   ``overall.png`` and ``encoder_probe.png`` in the output directory.

Example:
    >>> results = run_lab(LabConfig(output_dir="lab", seeds=(0, 1, 2)))  # doctest: +SKIP
    >>> results["summary"]["dci"]["colour"]["mean"]                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmconnect import ConnectorConfig, DenseConnector, ResampleSpec, list_projectors
from mmconnect.integrations.applications.lab_encoder import (
    EncoderPretraining,
    ProbeData,
    pretrain_encoder,
    probe_accuracy,
    probe_data,
    variance_share,
)
from mmconnect.integrations.applications.paired_statistics import holm_adjust, paired_comparison
from mmconnect.integrations.training.data import get_template
from mmconnect.projectors import ProjectorSpec, parse_projector
from mmconnect.validation import (
    check_bool,
    check_int,
    check_optional_int,
    check_positive_float,
    check_positive_int,
    check_sequence,
)
from mmconnect.zoo.abstractors import CAbstractorSpec, LDPv2Spec
from mmconnect.zoo.patch_merger import Mistral3MergerSpec, PatchMergerSpec
from mmconnect.zoo.perceiver import PerceiverSpec
from mmconnect.zoo.pixel_shuffle import PixelShuffleMLPSpec, PixelShuffleSpec
from mmconnect.zoo.pooled import Gemma3PoolSpec, OnevisionPoolSpec
from mmconnect.zoo.qformer import QFormerSpec

FORMAT_VERSION = 1
#: The lab's connector names (those of ``mmconnect demo``) and the preset each one runs.
LAB_PRESETS: dict[str, str] = {
    "baseline": "baseline-clip-l-336",
    "sti": "dc-sti-clip-l-336",
    "sci": "dc-sci-clip-l-336",
    "dci": "dc-dci-clip-l-336",
    "dci-efficient": "dc-dci-clip-l-336-efficient",
}
#: Stage 2 and the held-out questions: LLaVA-1.5's ``vicuna_v1`` turns without its system prompt.
#: The prompt's 29 tokens, a quarter of a conversation's text tokens, are the same in every
#: conversation and tell the random LLM nothing; leaving them out makes a run about 10 % cheaper
#: (docs/lab.md, the diagnosis).
LAB_TEMPLATE = dataclasses.replace(get_template("vicuna_v1"), name="vicuna_v1_no_system", system="")
#: Tower depth of the CLIP-L/336 presets.
PRESET_BLOCKS = 24
#: The fusions a ``<fusion>+<projector kind>`` lab connector may name: those of the presets
#: above (the same layers), without the efficient DCI's resampling.
LAB_FUSIONS: tuple[str, ...] = ("baseline", "sti", "sci", "dci")


def _pooled_side(grid_side: int) -> int:
    """The efficient DCI's output side for the lab grid (24 -> 12 in the preset, 8 -> 4 here)."""
    return max(grid_side // 2, 1)


#: The lab size of every zoo projector kind: ``{kind: spec(llm_dim=, grid_side=)}``. Every one
#: keeps the reference's structure (its norms, activations, merge and attention pattern) at the
#: lab's widths, and makes the efficient DCI's token budget, a quarter of the ``grid_side x
#: grid_side`` tokens (16 of 64 on the default 8x8 grid): merges and shuffles of 2x2, pooled
#: grids and learned queries of ``(grid_side // 2)**2``. Attention and hidden widths follow the
#: LLM width (Q-Former: 2 layers, 4 heads, hidden = LLM width, as small as the LLM; Perceiver: 2
#: blocks, 4 query heads sharing one key / value head as Idefics2's 16 share 4). A registered
#: kind without an entry (a user's) runs its spec's defaults, ``parse_projector(kind)``.
LAB_PROJECTOR_SPECS: dict[str, Callable[..., ProjectorSpec]] = {
    "pixel_shuffle": lambda *, llm_dim, grid_side: PixelShuffleSpec(factor=2),
    "pixel_shuffle_mlp": lambda *, llm_dim, grid_side: PixelShuffleMLPSpec(factor=2),
    "patch_merger": lambda *, llm_dim, grid_side: PatchMergerSpec(merge_size=2),
    "mistral3_merger": lambda *, llm_dim, grid_side: Mistral3MergerSpec(merge_size=2),
    "gemma3_pool": lambda *, llm_dim, grid_side: Gemma3PoolSpec(grid=_pooled_side(grid_side)),
    "onevision_pool": lambda *, llm_dim, grid_side: OnevisionPoolSpec(stride=2),
    "perceiver": lambda *, llm_dim, grid_side: PerceiverSpec(
        n_latents=_pooled_side(grid_side) ** 2,
        depth=2,
        heads=4,
        head_dim=max(llm_dim // 4, 1),
        kv_heads=1,
        intermediate_size=4 * llm_dim,
    ),
    "qformer": lambda *, llm_dim, grid_side: QFormerSpec(
        num_queries=_pooled_side(grid_side) ** 2,
        depth=2,
        num_heads=4,
        hidden_size=llm_dim,
        intermediate_size=4 * llm_dim,
    ),
    "c_abstractor": lambda *, llm_dim, grid_side: CAbstractorSpec(
        depth=1, hidden_dim=llm_dim, pooled_grid=(_pooled_side(grid_side),) * 2
    ),
    "ldpv2": lambda *, llm_dim, grid_side: LDPv2Spec(pooled_grid=(_pooled_side(grid_side),) * 2),
}


def _name_error(argument: str, name: Any) -> ValueError:
    kinds = ", ".join(list_projectors())
    return ValueError(
        f"{argument} must be one of {tuple(LAB_PRESETS)} or '<fusion>+<projector kind>' "
        f"(fusion: {', '.join(LAB_FUSIONS)}; projector kind: {kinds}), got {name!r}"
    )


def parse_lab_connector(name: Any, argument: str = "name") -> tuple[str, str | None]:
    """The parts of a lab connector name: ``(lab preset name, projector kind or None)``.

    ``"dci"`` -> ``("dci", None)``: the preset as it is; ``"dci+qformer"`` -> ``("dci",
    "qformer")``: the DCI preset's fusion feeding the lab-size Q-Former.

    Examples:
        >>> parse_lab_connector("sti+perceiver")
        ('sti', 'perceiver')

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: neither a name of :data:`LAB_PRESETS` nor ``<fusion>+<kind>`` with a fusion
            of :data:`LAB_FUSIONS` and a registered projector kind (the message lists both).
    """
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a lab connector name (a str), got {name!r}")
    if name in LAB_PRESETS:
        return name, None
    fusion, plus, kind = name.partition("+")
    if not plus:
        raise _name_error(argument, name)
    if fusion not in LAB_FUSIONS:
        raise ValueError(
            f"{argument}={name!r}: the fusion before '+' must be one of {LAB_FUSIONS} (the "
            f"presets' layers; the efficient DCI's resampling is its own connector), got {fusion!r}"
        )
    if kind not in list_projectors():
        raise ValueError(
            f"{argument}={name!r}: {kind!r} after '+' is no registered projector kind; known: "
            f"{', '.join(list_projectors())}"
        )
    return fusion, kind


def lab_projector_spec(kind: str, *, llm_dim: int, grid_side: int) -> ProjectorSpec:
    """The projector ``kind`` at the lab's size (:data:`LAB_PROJECTOR_SPECS`), or its spec's
    defaults for a registered kind without an entry.

    Raises:
        ValueError: unknown kind, or a kind without an entry whose spec has required parameters.
    """
    if kind in LAB_PROJECTOR_SPECS:
        return LAB_PROJECTOR_SPECS[kind](llm_dim=llm_dim, grid_side=grid_side)
    return parse_projector(kind)


def lab_preset(name: str) -> str:
    """The preset a lab connector takes its fusion (and, without a ``+kind``, everything) from."""
    return LAB_PRESETS[parse_lab_connector(name)[0]]


@dataclass(frozen=True, kw_only=True)
class LabConfig:
    """Everything the lab does; the defaults (five seeds, the five presets, two runs at a time)
    are sized to stay under 30 minutes on two cores (docs/lab.md gives the measured time).

    Attributes:
        output_dir: data, encoder, per-run checkpoints and the reports go here.
        seeds: one training run per seed and connector; each seed sets the connector's and the
            LLM's initialisation and the data order (the data set and the encoder are shared).
        connectors: names from :data:`LAB_PRESETS` or ``<fusion>+<projector kind>``
            (:func:`parse_lab_connector`), in report order; each is checked at the lab's widths
            and grid (:func:`lab_connector`) before anything runs.
        data_seed: seed of the synthetic data set.
        num_train_images, num_eval_images: training images (stage 1 and 2) and held-out images
            (four questions each).
        encoder: the tower and its pretraining (:class:`EncoderPretraining`; ``blocks`` must be
            24, the presets' depth).
        llm_width, llm_blocks: the random Llama-style LLM.
        stage1_steps, stage2_steps, batch_size, stage1_learning_rate, stage2_learning_rate: the
            training budget of every run (cosine schedule with 3 % warm-up, as the demo): 200
            caption steps and 600 question steps of 16 conversations fit five seeds of the five
            presets in 30 minutes on two cores. Colour is learned late in a run and at a step
            that varies from run to run (docs/lab.md, the diagnosis): more steps separate more.
        stage1_trains_llm: stage 1 (captions) trains the LLM with the connector (on by
            default). LLaVA's stage 1 trains only the connector in front of a pretrained LLM
            that can already name colours; the lab's LLM is random, and the captions, which
            name every object's colour, are where it learns to (docs/lab.md: with it, the
            baseline learned colour in every seed tried; without it, not in all).
        num_threads: torch intra-op threads while the lab runs (restored after). The models are
            tiny: a second thread gains little on idle cores and, when other processes share
            the cores, makes every small operation wait for a descheduled thread (measured: 20x
            slower on a loaded 2-core machine).
        jobs: training runs (one seed, one connector) at the same time, each in its own
            process with ``num_threads`` threads; ``None``: one per available core, at most one
            per run. Single-threaded processes use every core without waiting for one another;
            a run's result does not depend on ``jobs`` (each run seeds itself).
        show_progress: progress bars (one process) or one line per finished run (several).
        overwrite: write into a non-empty ``output_dir`` that no lab created (only the files
            the lab writes are replaced; nothing else is deleted). Without it such a folder is
            refused (:mod:`mmconnect.integrations.applications.output_folders`).
    """

    output_dir: str = "mmconnect-lab"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    connectors: tuple[str, ...] = tuple(LAB_PRESETS)
    data_seed: int = 0
    num_train_images: int = 4000
    num_eval_images: int = 120
    encoder: EncoderPretraining = field(default_factory=EncoderPretraining)
    llm_width: int = 64
    llm_blocks: int = 2
    stage1_steps: int = 200
    stage2_steps: int = 600
    batch_size: int = 16
    stage1_learning_rate: float = 2e-3
    stage2_learning_rate: float = 2e-3
    stage1_trains_llm: bool = True
    num_threads: int = 1
    jobs: int | None = None
    show_progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, items in (("seeds", "ints"), ("connectors", "lab connector names")):
            value = check_sequence(getattr(self, name), name, of=items)
            object.__setattr__(self, name, tuple(value))
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed, got none")
        for index, seed in enumerate(self.seeds):
            check_int(seed, f"seeds[{index}]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if not self.connectors:
            raise ValueError(
                f"connectors must name at least one connector; choose from "
                f"{', '.join(LAB_PRESETS)} or <fusion>+<projector kind>"
            )
        for index, name in enumerate(self.connectors):
            parse_lab_connector(name, f"connectors[{index}]")
        if len(set(self.connectors)) != len(self.connectors):
            raise ValueError(f"connectors must be distinct, got {self.connectors}")
        if not isinstance(self.encoder, EncoderPretraining):
            raise TypeError(f"encoder must be an EncoderPretraining, got {self.encoder!r}")
        if self.encoder.blocks != PRESET_BLOCKS:
            raise ValueError(
                f"encoder.blocks={self.encoder.blocks}: the CLIP-L/336 presets the lab runs read "
                f"a {PRESET_BLOCKS}-block tower"
            )
        for name in (
            "num_train_images",
            "num_eval_images",
            "llm_width",
            "llm_blocks",
            "stage1_steps",
            "stage2_steps",
            "batch_size",
            "num_threads",
        ):
            check_positive_int(getattr(self, name), name)
        check_int(self.data_seed, "data_seed")
        check_optional_int(self.jobs, "jobs", minimum=1, hint="or None (one per core)")
        for name in ("stage1_learning_rate", "stage2_learning_rate"):
            check_positive_float(getattr(self, name), name)
        for name in ("stage1_trains_llm", "show_progress", "overwrite"):
            check_bool(getattr(self, name), name)
        for name in self.connectors:  # each connector at the lab's widths and grid, before any work
            lab_connector(
                name,
                vision_dim=self.encoder.width,
                llm_dim=self.llm_width,
                grid_side=self.encoder.grid_side,
            )

    def demo_config(self, seed: int, encoder_dir: str | Path) -> Any:
        """The :class:`~mmconnect.integrations.applications.demo.DemoConfig` of every run of ``seed``: the
        same for all connectors (they differ only in the connector itself, passed to
        :func:`~mmconnect.integrations.applications.demo.train_connector`). Its ``connectors`` are
        the demo connectors the lab's build on (``dci`` for ``dci+qformer``), each once."""
        from mmconnect.integrations.applications.demo import DemoConfig

        return DemoConfig(
            output_dir=str(Path(self.output_dir) / "runs" / f"seed-{seed}"),
            seed=seed,
            num_train_images=self.num_train_images,
            num_eval_images=self.num_eval_images,
            image_size=self.encoder.image_size,
            patch_size=self.encoder.patch_size,
            vision_width=self.encoder.width,
            vision_blocks=self.encoder.blocks,
            llm_width=self.llm_width,
            llm_blocks=self.llm_blocks,
            connectors=tuple(dict.fromkeys(parse_lab_connector(n)[0] for n in self.connectors)),
            stage1_steps=self.stage1_steps,
            stage2_steps=self.stage2_steps,
            batch_size=self.batch_size,
            stage1_learning_rate=self.stage1_learning_rate,
            stage2_learning_rate=self.stage2_learning_rate,
            vision_path=str(encoder_dir),
            show_progress=self.show_progress,
            num_threads=self.num_threads,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def quick_config(**overrides: Any) -> LabConfig:
    """A smoke budget of about a minute on two cores: the five preset connectors (or
    ``connectors=``, zoo ones too), two seeds, tiny encoder pretraining and a few training steps
    (the numbers mean nothing: 32 held-out questions)."""
    encoder = EncoderPretraining(
        image_size=48, patch_size=12, width=16, heads=2, steps=8, batch_size=8, probe_images=24
    )
    settings: dict[str, Any] = {
        "seeds": (0, 1),
        "num_train_images": 32,
        "num_eval_images": 8,
        "encoder": encoder,
        "llm_width": 32,
        "stage1_steps": 2,
        "stage2_steps": 3,
        "batch_size": 4,
    }
    return LabConfig(**{**settings, **overrides})


def lab_connector(name: str, *, vision_dim: int, llm_dim: int, grid_side: int) -> ConnectorConfig:
    """The lab connector ``name`` at the lab tower's width, the LLM's and the lab grid.

    A name of :data:`LAB_PRESETS` is its preset with the lab's widths; the efficient DCI keeps
    the preset's halving of each grid side (24x24 -> 12x12 there, ``grid_side`` ->
    ``grid_side // 2`` here). ``<fusion>+<kind>`` is the preset of ``fusion`` (the same layers)
    with the projector ``kind`` at its lab size (:func:`lab_projector_spec`).

    Every connector is built on the meta device and asked for its token count on the
    ``grid_side x grid_side`` grid, so one that cannot take the lab's grid, widths or fusion
    (STI's pooled tokens into a grid projector, an odd grid side into a 2x2 merge) is refused
    here, before anything trains.

    Raises:
        ValueError: an unknown name (:func:`parse_lab_connector`), or a connector that cannot run
            at these widths and grid: the connector's own error, prefixed with ``name``.
    """
    fusion, kind = parse_lab_connector(name, "name")
    overrides: dict[str, Any] = {"vision_dim": vision_dim, "llm_dim": llm_dim}
    if fusion == "dci-efficient":
        overrides["resample"] = ResampleSpec(grid=(grid_side // 2, grid_side // 2))
    try:
        if kind is not None:
            overrides["projector"] = lab_projector_spec(kind, llm_dim=llm_dim, grid_side=grid_side)
        config = ConnectorConfig.from_preset(LAB_PRESETS[fusion], **overrides)
        with torch.device("meta"):
            DenseConnector(config).num_tokens((grid_side, grid_side))
    except ValueError as error:
        raise ValueError(
            f"lab connector {name!r} cannot run at the lab's {grid_side}x{grid_side} grid "
            f"(vision width {vision_dim}, LLM width {llm_dim}): {error}"
        ) from error
    return config


def connector_input_probes(
    data: ProbeData, connectors: dict[str, ConnectorConfig]
) -> dict[str, dict[str, float] | None]:
    """Linear probes of colour and shape on what each connector feeds its projector, per patch.

    The per-patch input of the baseline is ``H[final]``; of SCI ``[H[final], H[l1], H[l2]]``; of
    DCI ``[H[final], mean(group 1), mean(group 2)]`` (channels concatenated), whatever projector
    follows (``dci+qformer`` reads what ``dci`` reads: probed once per fusion). STI's extra
    tokens and the efficient DCI's resampled grid are not per patch: ``None``.

    Args:
        data: :func:`~mmconnect.integrations.applications.lab_encoder.probe_data` of the lab's tower.
        connectors: ``{name: config}``.

    Returns:
        ``{name: {"colour": accuracy, "shape": accuracy, "colour_share": share} or None}``:
        the probes' held-out accuracy and the share of the input's variance that the six
        colours explain (:func:`~mmconnect.integrations.applications.lab_encoder.variance_share`).
    """
    depth = data.features.shape[0]  # L + 1 hidden states

    def layer(index: int) -> torch.Tensor:
        return data.features[index % depth]

    results: dict[str, dict[str, float] | None] = {}
    probed: dict[str, dict[str, float]] = {}  # by fusion: zoo connectors share their fusion's
    for name, config in connectors.items():
        fusion = config.fusion
        if fusion.kind == "sti" or config.resample is not None:
            results[name] = None
            continue
        key = json.dumps(config.to_dict()["fusion"], sort_keys=True)
        if key in probed:
            results[name] = dict(probed[key])
            continue
        parts = [layer(fusion.final_layer)]
        parts += [layer(index) for index in getattr(fusion, "extra_layers", ())]
        groups = getattr(fusion, "groups", ())
        parts += [torch.stack([layer(index) for index in group]).mean(0) for group in groups]
        features = torch.cat(parts, dim=-1)[None]  # [1, samples, channels]
        probed[key] = {
            "colour": probe_accuracy(features, data.colour, data.train)[0],
            "shape": probe_accuracy(features, data.shape, data.train)[0],
            "colour_share": variance_share(features, data.colour)[0],
        }
        results[name] = dict(probed[key])
    return results


def text_prior_accuracy(stage2: str | Path, evaluation: str | Path) -> dict[str, float]:
    """Accuracy of answering without looking: per held-out question, the most frequent answer to
    the same question text in the stage-2 training conversations (first seen wins a tie; a text
    never asked in training counts as wrong). What an LLM that ignores the image can learn.

    Returns:
        ``{question type | "all": fraction}``, as
        :func:`~mmconnect.integrations.applications.demo.exact_answer_accuracy`.
    """
    answers: dict[str, dict[str, int]] = {}
    for record in json.loads(Path(stage2).read_text()):
        turns = record["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2], strict=True):
            counts = answers.setdefault(human["value"].removeprefix("<image>\n"), {})
            counts[gpt["value"]] = counts.get(gpt["value"], 0) + 1
    right: dict[str, list[bool]] = {}
    for record in json.loads(Path(evaluation).read_text()):
        counts = answers.get(record["conversations"][0]["value"].removeprefix("<image>\n"), {})
        guess = max(counts, key=counts.get) if counts else None  # max keeps the first of ties
        for key in (record["question_type"], "all"):
            right.setdefault(key, []).append(guess == record["answer"])
    return {key: sum(values) / len(values) for key, values in sorted(right.items())}


# ---------------------------------------------------------------------------- statistics


def summarize(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and sample standard deviation over seeds of every accuracy.

    Args:
        runs: ``{connector: {seed (str): {"accuracy": {question type | "all": fraction}}}}``;
            every run of a connector must report the same question types.

    Returns:
        ``{connector: {question type: {"values": [per seed, in seed order], "mean", "std"}}}``;
        ``std`` is ``None`` for a single seed.

    Raises:
        ValueError: a run lacks a question type another run of the connector has.
    """
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, by_seed in runs.items():
        types = sorted({t for run in by_seed.values() for t in run["accuracy"]})
        summary[kind] = {}
        for question_type in types:
            missing = [
                seed for seed, run in by_seed.items() if question_type not in run["accuracy"]
            ]
            if missing:
                raise ValueError(
                    f"connector {kind!r}: the runs of seeds {missing} have no {question_type!r} "
                    "questions; every seed must score the same question types"
                )
            values = [run["accuracy"][question_type] for run in by_seed.values()]
            summary[kind][question_type] = {
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
            }
    return summary


def above_prior(
    summary: dict[str, dict[str, dict[str, Any]]], text_prior: dict[str, float]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per connector and question type: in how many seeds the accuracy beat the text-only prior
    (:func:`text_prior_accuracy`, the best an LLM that ignores the image can do), and by how much
    on average. A type is learned from the image when every seed beats the prior: a mean alone
    can hide seeds that learned nothing.

    Args:
        summary: :func:`summarize`'s output.
        text_prior: ``{question type | "all": fraction}``; types it lacks are left out.

    Returns:
        ``{connector: {question type: {"seeds_above", "seeds", "mean_difference"}}}``; a seed
        equal to the prior is not above it; ``mean_difference`` is a fraction (mean - prior).
    """
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, by_type in summary.items():
        result[kind] = {}
        for question_type, entry in by_type.items():
            if question_type not in text_prior:
                continue
            prior = text_prior[question_type]
            result[kind][question_type] = {
                "seeds_above": sum(value > prior for value in entry["values"]),
                "seeds": len(entry["values"]),
                "mean_difference": entry["mean"] - prior,
            }
    return result


def above_prior_table(results: dict[str, Any]) -> str:
    """Per connector and question type: seeds above the text-only prior and the mean
    difference in points (:func:`above_prior`)."""
    comparison = results["above_prior"]
    types = _question_types(results["summary"])
    lines = [
        "| connector | " + " | ".join(types) + " |",
        "| --- | " + " | ".join(["---:"] * len(types)) + " |",
    ]
    for kind, by_type in comparison.items():
        cells = [
            f"{by_type[t]['seeds_above']}/{by_type[t]['seeds']}, "
            f"{100 * by_type[t]['mean_difference']:+.1f}"
            if t in by_type
            else "–"
            for t in types
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Significance level of the lab's paired tests, after Holm's correction over the family of
#: every (connector, question type) comparison with the reference.
SIGNIFICANCE_LEVEL = 0.05


def reference_connector(connectors: tuple[str, ...] | list[str]) -> str:
    """The connector every other one is compared with: ``"baseline"`` when it runs, else the
    first one named."""
    return "baseline" if "baseline" in connectors else connectors[0]


def compare_connectors(
    summary: dict[str, dict[str, dict[str, Any]]], reference: str
) -> dict[str, Any] | None:
    """Paired tests of every connector against ``reference``, per question type and overall.

    The per-seed accuracies of :func:`summarize` are paired by seed (a seed fixes the initial LLM
    and the data order for every connector): for each connector and question type a paired
    t-test and the exact sign-flip test of the per-seed differences
    (:func:`~mmconnect.integrations.applications.paired_statistics.paired_comparison`); the
    t-test p-values of the whole family (every connector but the reference, every question
    type and ``"all"``) are Holm-adjusted (:func:`~mmconnect.integrations.applications.
    paired_statistics.holm_adjust`), and ``significant`` says whether the adjusted value is at
    most :data:`SIGNIFICANCE_LEVEL`.

    Returns:
        ``None`` with fewer than two seeds (nothing to test) or no other connector; else
        ``{"reference", "level", "family_size", "comparisons": {connector: {question type:
        {differences, mean_difference, std_difference, t_statistic, t_p_value,
        sign_flip_p_value, holm_p_value, significant}}}}`` (differences in accuracy fractions,
        ``other - reference``).
    """
    if reference not in summary:
        raise ValueError(f"reference {reference!r} is not one of the connectors {list(summary)}")
    others = [kind for kind in summary if kind != reference]
    seeds = len(next(iter(summary[reference].values()))["values"])
    if seeds < 2 or not others:
        return None
    comparisons: dict[str, dict[str, dict[str, Any]]] = {}
    family: list[tuple[str, str]] = []
    for kind in others:
        comparisons[kind] = {}
        for question_type, entry in summary[kind].items():
            base = summary[reference][question_type]["values"]
            comparisons[kind][question_type] = paired_comparison(base, entry["values"]).to_dict()
            family.append((kind, question_type))
    adjusted = holm_adjust([comparisons[k][t]["t_p_value"] for k, t in family])
    for (kind, question_type), p_value in zip(family, adjusted, strict=True):
        comparisons[kind][question_type]["holm_p_value"] = p_value
        comparisons[kind][question_type]["significant"] = p_value <= SIGNIFICANCE_LEVEL
    return {
        "reference": reference,
        "level": SIGNIFICANCE_LEVEL,
        "family_size": len(family),
        "comparisons": comparisons,
    }


def _p(value: float) -> str:
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def comparison_table(statistics_: dict[str, Any]) -> str:
    """Markdown: per connector and question type, the mean per-seed difference to the reference
    (points, ± sample std), the t statistic, its p-value, Holm's adjusted p-value and the exact
    sign-flip p-value; a bold row is significant."""
    lines = [
        f"| connector | question type | difference to {statistics_['reference']} (points) | t | "
        "p (t-test) | p (Holm) | p (sign-flip) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, by_type in statistics_["comparisons"].items():
        for question_type in _question_types({kind: by_type}):
            entry = by_type[question_type]
            difference = (
                f"{100 * entry['mean_difference']:+.1f} ± {100 * entry['std_difference']:.1f}"
            )
            cells = [
                kind,
                question_type,
                difference,
                f"{entry['t_statistic']:.2f}",
                _p(entry["t_p_value"]),
                _p(entry["holm_p_value"]),
                _p(entry["sign_flip_p_value"]),
            ]
            if entry["significant"]:
                cells = [f"**{cell}**" for cell in cells]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def significance_summary(statistics_: dict[str, Any]) -> str:
    """The paired tests in words: which differences to the reference are significant after
    Holm's correction, and that the others are not."""
    reference = statistics_["reference"]
    found = []
    for kind, by_type in statistics_["comparisons"].items():
        for question_type in _question_types({kind: by_type}):
            entry = by_type[question_type]
            if entry["significant"]:
                direction = "above" if entry["mean_difference"] > 0 else "below"
                found.append(
                    f"{kind} is {direction} {reference} on {question_type} "
                    f"({100 * entry['mean_difference']:+.1f} points, Holm-adjusted p = "
                    f"{_p(entry['holm_p_value'])})"
                )
    seeds = len(next(iter(next(iter(statistics_["comparisons"].values())).values()))["differences"])
    head = (
        f"Paired over {seeds} seeds, {statistics_['family_size']} comparisons with {reference}, "
        f"Holm-corrected at {statistics_['level']:g}: "
    )
    if not found:
        return head + f"no connector differs significantly from {reference} on any question type."
    return head + "; ".join(found) + ". No other difference is significant."


def _cell(entry: dict[str, Any]) -> str:
    if entry["std"] is None:
        return f"{100 * entry['mean']:.1f}"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def _question_types(summary: dict[str, dict[str, Any]]) -> list[str]:
    types = sorted({t for entry in summary.values() for t in entry} - {"all"})
    return [*types, "all"]


def _projector_name(results: dict[str, Any], kind: str) -> str:
    first_seed = str(results["config"]["seeds"][0])
    return parse_projector(results["runs"][kind][first_seed]["connector"]["projector"]).name


def accuracy_table(results: dict[str, Any]) -> str:
    """Held-out accuracy (%), mean ± sample std over seeds, per connector and question type,
    with the preset each connector's fusion comes from and its projector."""
    summary = results["summary"]
    types = _question_types(summary)
    header = ["connector", "preset", "projector", "visual tokens", *types]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + " |",
    ]
    for kind, entry in summary.items():
        cells = [_cell(entry[t]) if t in entry else "–" for t in types]
        tokens = results["visual_tokens"][kind]
        lines.append(
            f"| {kind} | `{lab_preset(kind)}` | `{_projector_name(results, kind)}` | {tokens} | "
            + " | ".join(cells)
            + " |"
        )
    if "text_prior" in results:
        cells = [f"{100 * results['text_prior'][t]:.1f}" for t in types]
        lines.append("| text-only prior | no image | – | 0 | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_table(probe: dict[str, list[float]], layers: list[int] | None = None) -> str:
    """Linear-probe accuracy (%) per ``hidden_states`` index (default: every fourth and the last
    two), and the share of the variance the colours explain where ``probe`` has it."""
    count = len(probe["colour"])
    if layers is None:
        layers = sorted({*range(0, count, 4), count - 2, count - 1})
    header = ["probe", *(f"H[{layer}]" for layer in layers)]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * len(layers)) + " |",
    ]
    rows = {"colour": "colour", "shape": "shape", "colour_share": "colour share of the variance"}
    for key, label in rows.items():
        if key in probe:  # results written before the share was measured lack it
            cells = [f"{100 * probe[key][layer]:.1f}" for layer in layers]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def input_probe_table(results: dict[str, Any]) -> str:
    """Linear-probe accuracy (%) of colour and shape on each connector's per-patch input, and
    the share of its variance the colours explain (%)."""
    lines = [
        "| connector | per-patch projector input | colour probe | shape probe | colour share |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for kind, entry in results["encoder"]["connector_input_probe"].items():
        config = ConnectorConfig.from_dict(
            results["runs"][kind][str(results["config"]["seeds"][0])]["connector"]
        )
        if entry is None:
            lines.append(f"| {kind} | not per patch | – | – | – |")
            continue
        fusion = config.fusion
        extra = getattr(fusion, "extra_layers", ())
        parts = [f"H[{fusion.final_layer}]", *(f"H[{index}]" for index in extra)]
        parts += [f"mean H[{group[0]}..{group[-1]}]" for group in getattr(fusion, "groups", ())]
        share = entry.get("colour_share")
        lines.append(
            f"| {kind} | {', '.join(parts)} | {100 * entry['colour']:.1f} | "
            f"{100 * entry['shape']:.1f} | {'–' if share is None else f'{100 * share:.1f}'} |"
        )
    return "\n".join(lines)


def _cpu_clause(results: dict[str, Any]) -> str:
    if "total_cpu" not in results["seconds"]:  # written before the lab recorded it
        return ""
    return (
        f"; CPU time {results['seconds']['total_cpu']:.0f} s, the worker processes included "
        f"({results.get('jobs', 1)} run(s) at a time, "
        f"{results['config']['num_threads']} thread(s) each)"
    )


def _statistics_section(results: dict[str, Any]) -> list[str]:
    tests = results.get("statistics")
    if tests is None:
        return []
    seeds = len(results["config"]["seeds"])
    return [
        f"## Paired tests against {tests['reference']}",
        "",
        significance_summary(tests),
        "",
        f"Per-seed differences (other - {tests['reference']}, the same seed's LLM and data order): "
        f"paired t-test with {seeds - 1} degrees of freedom, its p-value Holm-adjusted over all "
        f"{tests['family_size']} comparisons, and the exact sign-flip test (with {seeds} seeds it "
        f"cannot go below {2 / 2**seeds:.4f}). Bold: significant at {tests['level']:g} after "
        "Holm's correction.",
        "",
        comparison_table(tests),
        "",
    ]


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the accuracy table, the encoder's probes, the budget and the time."""
    config = results["config"]
    encoder = results["encoder"]
    seeds = ", ".join(str(seed) for seed in config["seeds"])
    per_type = results["eval_question_counts"]
    counts = ", ".join(f"{kind} {count}" for kind, count in sorted(per_type.items()))
    return "\n".join(
        [
            "# Connector lab results",
            "",
            f"Held-out exact-answer accuracy (%), mean ± sample standard deviation over seeds "
            f"{seeds}; {results['num_eval_questions']} questions ({counts}).",
            "",
            accuracy_table(results),
            "",
            "Against the text-only prior (seeds above it, of all; mean difference in points): "
            "a question type is learned from the image when every seed beats the prior.",
            "",
            above_prior_table(results),
            "",
            *_statistics_section(results),
            "## Encoder",
            "",
            f"CLIP-style tower, {config['encoder']['blocks']} blocks, width "
            f"{config['encoder']['width']}, {config['encoder']['image_size']} px, patch "
            f"{config['encoder']['patch_size']}, pretrained for {config['encoder']['steps']} "
            f"steps: per-patch shape accuracy {100 * encoder['shape_accuracy']:.1f} % "
            f"(object patches {100 * encoder['object_shape_accuracy']:.1f} %) on held-out "
            "randomly coloured scenes. Linear probes on held-out VQA scenes, per object patch "
            "(chance: colour 16.7 %, shape 33.3 %):",
            "",
            probe_table(encoder["probe"]),
            "",
            "The same probes on what each connector feeds its projector, per patch:",
            "",
            input_probe_table(results),
            "",
            "## Budget (every connector, every seed)",
            "",
            f"{config['num_train_images']} training images, stage 1 (captions, "
            f"{'connector and LLM' if config['stage1_trains_llm'] else 'connector only'}): "
            f"{config['stage1_steps']} steps at lr {config['stage1_learning_rate']:g}, stage 2 "
            f"(questions, connector and LLM): {config['stage2_steps']} steps at lr "
            f"{config['stage2_learning_rate']:g}, batch {config['batch_size']}, "
            f"cosine schedule; LLM: Llama-style, {config['llm_blocks']} blocks, width "
            f"{config['llm_width']}, random, the same initial weights for every connector of a "
            "seed.",
            "",
            f"Wall time: {results['seconds']['total']:.0f} s (encoder "
            f"{results['seconds']['encoder']:.0f} s, connector runs "
            f"{results['seconds']['runs']:.0f} s){_cpu_clause(results)}.",
            "",
        ]
    )


def _colours(count: int) -> list[Any]:
    """One distinct colour per connector: matplotlib's ten-colour cycle, or ``tab20`` beyond it
    (the zoo), so no two connectors of a chart share a colour."""
    import matplotlib

    if count <= 10:
        return [f"C{index}" for index in range(count)]
    palette = matplotlib.colormaps["tab20"]
    return [palette(index % 20) for index in range(count)]


def plot_accuracy(results: dict[str, Any], path: str | Path) -> None:
    """Grouped bars (mean over seeds, error bar: sample std, dots: the seeds) per question type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    types = _question_types(summary)
    kinds = list(summary)
    colours = _colours(len(kinds))
    width = 0.8 / len(kinds)
    # About a quarter inch per bar once many connectors share a question type.
    figure, axis = plt.subplots(
        figsize=(max(6, 1.6 * len(types), 0.25 * len(types) * len(kinds)), 4)
    )
    for index, kind in enumerate(kinds):
        offsets = [
            position + (index - (len(kinds) - 1) / 2) * width for position in range(len(types))
        ]
        entries = [summary[kind][t] for t in types]
        means = [100 * entry["mean"] for entry in entries]
        errors = [100 * (entry["std"] or 0.0) for entry in entries]
        axis.bar(offsets, means, width, yerr=errors, capsize=2, label=kind, color=colours[index])
        for offset, entry in zip(offsets, entries, strict=True):
            values = [100 * value for value in entry["values"]]
            axis.plot([offset] * len(values), values, "k.", markersize=3)
    if "text_prior" in results:  # what answering without the image reaches
        for position, question_type in enumerate(types):
            level = 100 * results["text_prior"][question_type]
            label = "text-only prior" if position == 0 else None
            axis.hlines(level, position - 0.45, position + 0.45, "k", "dashed", label=label)
    axis.set_xticks(range(len(types)), types)
    axis.set_ylabel("held-out exact-answer accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"Connector lab: mean ± std over {len(results['config']['seeds'])} seeds")
    axis.legend(fontsize="small", ncols=min(len(kinds), 5), loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_overall(results: dict[str, Any], path: str | Path) -> None:
    """One horizontal bar per connector: accuracy over all question types (mean over seeds,
    error bar: sample std, dots: the seeds), labelled with its visual tokens; the dashed line is
    the text-only prior. Readable for any number of connectors (the zoo)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    kinds = list(summary)
    colours = _colours(len(kinds))
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.38 * len(kinds)))
    for row, kind in enumerate(kinds):
        entry = summary[kind]["all"]
        axis.barh(
            row,
            100 * entry["mean"],
            xerr=100 * (entry["std"] or 0.0),
            capsize=3,
            color=colours[row],
        )
        values = [100 * value for value in entry["values"]]
        axis.plot(values, [row] * len(values), "k.", markersize=4)
    if "text_prior" in results:
        axis.axvline(100 * results["text_prior"]["all"], color="k", linestyle="--", linewidth=1)
        axis.text(100 * results["text_prior"]["all"], -0.7, " text-only prior", fontsize="small")
    labels = [f"{kind} ({results['visual_tokens'][kind]} tok.)" for kind in kinds]
    axis.set_yticks(range(len(kinds)), labels)
    axis.set_ylim(len(kinds) - 0.5, -0.9)  # the first connector on top
    axis.set_xlim(0, 100)
    axis.set_xlabel("held-out exact-answer accuracy, all questions (%)")
    axis.set_title(f"Connector lab: mean ± std over {len(results['config']['seeds'])} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_probe(probe: dict[str, list[float]], path: str | Path) -> None:
    """Linear-probe accuracy of colour and shape per ``hidden_states`` index, with chance, and
    the share of the variance the colours explain (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    layers = range(len(probe["colour"]))
    for name, chance in (("colour", 1 / 6), ("shape", 1 / 3)):
        (line,) = axis.plot(layers, [100 * value for value in probe[name]], marker=".", label=name)
        axis.axhline(100 * chance, color=line.get_color(), linestyle=":", linewidth=1)
    if "colour_share" in probe:
        share = [100 * value for value in probe["colour_share"]]
        axis.plot(layers, share, marker=".", linestyle="--", label="colour share of the variance")
    axis.set_xlabel("hidden_states index (H[k])")
    axis.set_ylabel("probe accuracy / colour share (%)")
    axis.set_ylim(0, 100)
    axis.set_title("Lab encoder: what each layer holds (dotted: chance)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def lab_jobs(config: LabConfig) -> int:
    """How many runs :func:`run_lab` trains at once (``config.jobs``, or one per available core),
    never more than there are runs."""
    from mmconnect.integrations.applications.demo import available_cores

    wanted = config.jobs if config.jobs is not None else available_cores()
    return max(1, min(wanted, len(config.seeds) * len(config.connectors)))


def _stage_configs(config: LabConfig, seed: int, run_dir: Path) -> tuple[Any, Any]:
    """Stage 1 and stage 2 of every run of ``seed`` (the same for every connector).

    Stage 1 trains on the captions with the ``plain`` template, stage 2 on the questions with
    ``vicuna_v1``; both use a cosine schedule with 3 % warm-up and the batch of ``config``. With
    ``config.stage1_trains_llm`` stage 1 trains the LLM with the connector (the Trainer's
    ``"instruct"`` parameter groups), else only the connector (``"align"``, LLaVA's recipe).
    """
    from mmconnect.integrations.training.stages import StageConfig

    def stage(name: str, kind: str, steps: int, learning_rate: float) -> StageConfig:
        return StageConfig(
            stage=kind,
            output_dir=str(run_dir / name),
            max_steps=steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=learning_rate,
            connector_learning_rate=learning_rate,
            seed=seed,
            logging_steps=max(1, steps // 30),
            disable_tqdm=not config.show_progress,
        )

    first = "instruct" if config.stage1_trains_llm else "align"
    return (
        stage("stage1", first, config.stage1_steps, config.stage1_learning_rate),
        stage("stage2", "instruct", config.stage2_steps, config.stage2_learning_rate),
    )


class CachedSamples(torch.utils.data.Dataset):
    """``dataset[i]`` read once per run and kept: stage 2 passes over its conversations about
    three times, and decoding the image and tokenizing the turns again each time costs about a
    tenth of a step. The samples are the same tensors, so nothing a run computes changes.

    Args:
        dataset: any map-style dataset (a :class:`~mmconnect.integrations.training.data.LlavaDataset`).
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._samples: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index not in self._samples:
            self._samples[index] = self.dataset[index]
        return self._samples[index]


def torch_default_init(connector: torch.nn.Module, seed: int) -> None:
    """Give every layer of ``connector`` that has a ``reset_parameters`` (its Linear, Conv and
    norm layers) torch's default initialisation, drawn under ``seed``.

    HF initialises the connector as the rest of the model, Linear weights from ``normal(0,
    0.02)``; LLaVA's own training code builds its projector after loading the LLM, so there it
    starts from torch's defaults (Kaiming-uniform weights), about three times larger on the
    lab's widths. The lab follows LLaVA's training code.
    Parameters without such a layer (learned queries, latents) keep their initialisation.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in connector.modules():
            if module is not connector and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)


def train_lab_run(
    kind: str,
    config: LabConfig,
    seed: int,
    encoder_dir: Path,
    tokenizer: Any,
    files: Any,
    connector: ConnectorConfig,
) -> dict[str, Any]:
    """One run: the small Dense LLaVA of ``connector`` on the lab's tower
    (:func:`~mmconnect.integrations.applications.demo.build_demo_model`: the seed's LLM, the same
    for every connector), both stages (built by the private ``_stage_configs``) and the held-out score
    (:func:`~mmconnect.integrations.applications.demo.exact_answer_accuracy`: every answer token
    and the end marker).

    Returns:
        ``{"visual_tokens", "accuracy": {question type | "all": fraction}, "stage1_losses",
        "stage2_losses": [(step, loss), ...], "model_dir", "stage_configs", "connector",
        "seconds"}``.
    """
    from mmconnect.integrations.applications.demo import (
        build_demo_model,
        dataset_arguments,
        exact_answer_accuracy,
    )
    from mmconnect.integrations.families.llava import DenseLlavaProcessor
    from mmconnect.integrations.training.data import DataCollator, LlavaDataset
    from mmconnect.integrations.training.stages import train_stage

    started = time.monotonic()
    demo = config.demo_config(seed, encoder_dir)
    model = build_demo_model(kind, demo, tokenizer, connector=connector)
    torch_default_init(model.connector, seed)
    data = dataset_arguments(model, tokenizer, files)
    tokens = data["image_tokens"]
    collator = DataCollator.from_tokenizer(tokenizer)
    first, second = _stage_configs(config, seed, Path(demo.output_dir) / kind)
    # Saved with each stage's model in one atomic step: each stage folder loads alone.
    processor = DenseLlavaProcessor(
        data["image_processor"],
        tokenizer,
        patch_size=config.encoder.patch_size,
        connector=model.connector.config,
    )
    stage1 = train_stage(
        model,
        LlavaDataset.from_json(files.stage1, template="plain", **data),
        collator,
        first,
        processor=processor,
    )
    stage2 = train_stage(
        stage1.model,
        CachedSamples(LlavaDataset.from_json(files.stage2, template=LAB_TEMPLATE, **data)),
        collator,
        second,
        processor=processor,
    )
    eval_records = json.loads(Path(files.eval).read_text())
    accuracy = exact_answer_accuracy(
        stage2.model,
        LlavaDataset.from_json(files.eval, template=LAB_TEMPLATE, **data),
        [record["question_type"] for record in eval_records],
    )
    return {
        "visual_tokens": tokens,
        "accuracy": accuracy,
        "stage1_losses": stage1.losses,
        "stage2_losses": stage2.losses,
        "model_dir": str(stage2.output_dir),
        "stage_configs": [first.to_dict(), second.to_dict()],
        "connector": connector.to_dict(),
        "seconds": round(time.monotonic() - started, 1),
    }


def _train_run(
    kind: str,
    config: LabConfig,
    seed: int,
    encoder_dir: Path,
    tokenizer: Any,
    files: Any,
    connector: ConnectorConfig,
) -> dict[str, Any]:
    """:func:`train_lab_run` in a worker process: threads are per process, and the Trainer's
    stdout log lines, which would interleave unlabelled with other workers', are dropped (the
    parent prints one labelled line per finished run instead)."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(config.num_threads)
    hf_logging.disable_progress_bar()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return train_lab_run(kind, config, seed, encoder_dir, tokenizer, files, connector)


def train_all(
    config: LabConfig,
    connectors: dict[str, ConnectorConfig],
    encoder_dir: Path,
    tokenizer: Any,
    files: Any,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every (seed, connector) run of ``config``, :func:`lab_jobs` at a time.

    Returns:
        ``{connector: {seed (str): run}}`` in ``config``'s connector and seed order, whatever
        order the runs finished in.
    """
    tasks = [(seed, kind) for seed in config.seeds for kind in config.connectors]
    jobs = lab_jobs(config)
    done: dict[tuple[int, str], dict[str, Any]] = {}

    def report(seed: int, kind: str, entry: dict[str, Any]) -> None:
        done[seed, kind] = entry
        if config.show_progress:
            elapsed = time.monotonic() - started
            print(
                f"lab: run {len(done)}/{len(tasks)} done ({kind}, seed {seed}: "
                f"{entry['seconds']:.0f} s, all questions {100 * entry['accuracy']['all']:.1f} %); "
                f"{elapsed:.0f} s of runs so far",
                file=sys.stderr,
                flush=True,
            )

    started = time.monotonic()
    if jobs == 1:
        for seed, kind in tasks:
            entry = train_lab_run(
                kind, config, seed, encoder_dir, tokenizer, files, connectors[kind]
            )
            report(seed, kind, entry)
    else:
        if config.show_progress:
            print(
                f"lab: {len(tasks)} runs, {jobs} at a time in separate processes "
                f"({config.num_threads} thread(s) each)",
                file=sys.stderr,
                flush=True,
            )
        # Plain dicts instead of read-only mapping proxies: the files go to other processes.
        counts = {split: dict(values) for split, values in files.question_type_counts.items()}
        files = dataclasses.replace(files, question_type_counts=counts)
        quiet = dataclasses.replace(config, show_progress=False)  # no bars: a line per run
        # "spawn": a fresh interpreter per worker (forking a process that holds torch threads
        # can deadlock).
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = {
                pool.submit(
                    _train_run, kind, quiet, seed, encoder_dir, tokenizer, files, connectors[kind]
                ): (seed, kind)
                for seed, kind in tasks
            }
            for future in as_completed(futures):
                report(*futures[future], future.result())
    return {
        kind: {str(seed): done[seed, kind] for seed in config.seeds} for kind in config.connectors
    }


# ---------------------------------------------------------------------------- the run


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the worker processes,
    once their pool has shut down)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run_lab(config: LabConfig) -> dict[str, Any]:
    """Run the lab; returns what it measured and writes ``results.json``, ``results.md``,
    ``accuracy.png`` (per question type), ``overall.png`` (all questions, one bar per connector)
    and ``encoder_probe.png`` into ``config.output_dir``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _run_lab(config)
    finally:
        torch.set_num_threads(threads)


def _run_lab(config: LabConfig) -> dict[str, Any]:
    from mmconnect.integrations.applications.demo import (
        _all_texts,
        write_demo_data,
    )
    from mmconnect.integrations.applications.output_folders import claim_output_folder
    from mmconnect.integrations.applications.tiny_models import build_word_tokenizer

    started = time.monotonic()
    started_cpu = _cpu_seconds()
    # A non-empty folder no lab created is refused before anything is written; the data set
    # replaces only the files a lab wrote.
    folder = claim_output_folder(
        config.output_dir, tool="lab", overwrite=config.overwrite, option="output_dir (--output)"
    )
    output = folder.path
    files = write_demo_data(
        folder,
        num_train=config.num_train_images,
        num_eval=config.num_eval_images,
        image_size=config.encoder.image_size,
        seed=config.data_seed,
    )
    tokenizer = build_word_tokenizer(
        _all_texts([files.stage1, files.stage2, files.eval], ["plain", LAB_TEMPLATE])
    )

    encoder_started = time.monotonic()
    encoder = pretrain_encoder(config.encoder, show_progress=config.show_progress)
    encoder_dir = output / "encoder"
    encoder.model.save_pretrained(encoder_dir)
    data = probe_data(encoder.model, config.encoder)
    probe = {
        "colour": probe_accuracy(data.features, data.colour, data.train),
        "shape": probe_accuracy(data.features, data.shape, data.train),
        "colour_share": variance_share(data.features, data.colour),
    }
    grid_side = config.encoder.grid_side
    connectors = {
        kind: lab_connector(
            kind, vision_dim=config.encoder.width, llm_dim=config.llm_width, grid_side=grid_side
        )
        for kind in config.connectors
    }
    input_probe = connector_input_probes(data, connectors)
    encoder_seconds = time.monotonic() - encoder_started

    runs_started = time.monotonic()
    runs = train_all(config, connectors, encoder_dir, tokenizer, files)
    visual_tokens = {kind: runs[kind][str(config.seeds[0])]["visual_tokens"] for kind in runs}
    eval_records = json.loads(Path(files.eval).read_text())
    question_counts: dict[str, int] = {}
    for record in eval_records:
        question_counts[record["question_type"]] = (
            question_counts.get(record["question_type"], 0) + 1
        )
    summary = summarize(runs)
    text_prior = text_prior_accuracy(files.stage2, files.eval)
    results: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "presets": {kind: lab_preset(kind) for kind in config.connectors},
        "projectors": {kind: connectors[kind].projector.to_dict() for kind in config.connectors},
        "visual_tokens": visual_tokens,
        "num_eval_questions": len(eval_records),
        "text_prior": text_prior,
        "eval_question_counts": question_counts,
        "encoder": {
            "shape_accuracy": encoder.shape_accuracy,
            "object_shape_accuracy": encoder.object_shape_accuracy,
            "losses": encoder.losses,
            "probe": probe,
            "connector_input_probe": input_probe,
            "checkpoint": str(encoder_dir),
        },
        "runs": runs,
        "jobs": lab_jobs(config),
        "summary": summary,
        "above_prior": above_prior(summary, text_prior),
        "statistics": compare_connectors(summary, reference_connector(config.connectors)),
        "seconds": {
            "encoder": round(encoder_seconds, 1),
            "runs": round(time.monotonic() - runs_started, 1),
            "total": round(time.monotonic() - started, 1),
            # CPU time of this process and its finished workers: what the wall time would be on
            # one idle core with one thread; far below jobs x wall time when other processes
            # share the cores.
            "total_cpu": round(_cpu_seconds() - started_cpu, 1),
        },
    }
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "results.md").write_text(results_markdown(results))
    plot_accuracy(results, output / "accuracy.png")
    plot_overall(results, output / "overall.png")
    plot_probe(probe, output / "encoder_probe.png")
    return results
