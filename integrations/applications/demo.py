"""``mmconnect demo``: the whole pipeline on one CPU in minutes.

1. write the synthetic VQA data set (:mod:`mmconnect.integrations.applications.synthetic`);
2. build a small LLaVA from configs (a CLIP-style tower, a Llama-style LLM, a word-level
   tokenizer over the data's vocabulary: the builders of
   :mod:`mmconnect.integrations.applications.tiny_models`) or take the tower / LLM from local
   checkpoints;
3. for each connector (the LLaVA-1.5 baseline and the Dense Connector's DCI), train stage 1
   (align: connector only, captions, ``plain`` template) and stage 2 (instruct: connector + LLM,
   questions, ``vicuna_v1`` template) with identical budgets and seeds;
4. score held-out questions by exact greedy answers (teacher-forced argmax over the answer tokens,
   which is what greedy decoding produces when every token matches), per question type;
5. print a table and write ``results.json`` and ``loss_curves.png``.

The tower and LLM start from random weights unless paths are given, so the absolute accuracies
are those of a toy; the comparison between connectors is what the demo shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from mmconnect import ConnectorConfig, DCISpec, ResampleSpec, SCISpec, SingleLayerSpec, STISpec
from mmconnect.integrations.applications.output_folders import OutputFolder, claim_output_folder
from mmconnect.integrations.applications.synthetic import (
    SceneSpec,
    SyntheticVQAFiles,
    write_synthetic_vqa,
)
from mmconnect.integrations.applications.tiny_models import (
    build_word_tokenizer,
    tiny_text_config,
    tiny_vision_config,
)
from mmconnect.integrations.families.llava import (
    DenseLlavaConfig,
    DenseLlavaForConditionalGeneration,
    DenseLlavaProcessor,
)
from mmconnect.integrations.families.protocol import family_model
from mmconnect.integrations.training.data import (
    IGNORE_INDEX,
    DataCollator,
    LlavaDataset,
    load_llava_json,
)
from mmconnect.integrations.training.stages import StageConfig, train_stage
from mmconnect.validation import (
    check_choice,
    check_int,
    check_optional_int,
    check_positive_float,
    check_positive_int,
    check_sequence,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything the demo does.

    Measured with the defaults (two connectors, one process and one thread each) on two
    cores: 2 min 33 s of wall time when nothing else ran; 5 min 13 s while other jobs kept the
    1-minute load average at 3.2-5.2 (median 4.0), 13 min 23 s at 4.3-11.6 (median 9.2);
    identical results in every run.

    Attributes:
        output_dir: data, checkpoints, ``results.json`` and ``loss_curves.png`` go here.
        connectors: which connectors to train and compare (``"baseline"``, ``"sti"``,
            ``"sci"``, ``"dci"``, ``"dci-efficient"``).
        vision_path / llm_path: local checkpoints replacing the random tower / LLM (the LLM
            directory must hold its tokenizer too). A saved Dense model directory (for example
            an earlier demo's ``dci/stage2``) serves as either: its tower / its LLM is taken.
        overwrite: write into a non-empty ``output_dir`` that no demo created (only the files
            the demo writes are replaced; nothing else is deleted). Without it such a folder is
            refused (:mod:`mmconnect.integrations.applications.output_folders`).
        num_threads: torch intra-op threads of each training process (restored after). The
            models are tiny: a second thread gains little on idle cores and, when other
            processes share the cores, makes every small operation wait for a descheduled
            thread.
        jobs: connectors trained at the same time, each in its own process with
            ``num_threads`` threads; ``None``: one per connector, at most one per available
            core. Independent single-threaded processes use every core without waiting for one
            another, so the demo slows down in proportion when other jobs share the cores
            instead of stalling. Results are the same for any ``jobs``.
    """

    output_dir: str = "mmconnect-demo"
    seed: int = 0
    num_train_images: int = 1200
    num_eval_images: int = 120
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_blocks: int = 8
    llm_width: int = 128
    llm_blocks: int = 2
    connectors: tuple[str, ...] = ("baseline", "dci")
    stage1_steps: int = 150
    stage2_steps: int = 450
    batch_size: int = 16
    stage1_learning_rate: float = 1e-3
    stage2_learning_rate: float = (
        1e-3  # a random toy LLM needs more than the 2e-5 of a pretrained one
    )
    vision_path: str | None = None
    llm_path: str | None = None
    show_progress: bool = True
    overwrite: bool = False
    num_threads: int = 1
    jobs: int | None = None

    def __post_init__(self) -> None:
        connectors = check_sequence(self.connectors, "connectors", of="demo connector names")
        object.__setattr__(self, "connectors", tuple(connectors))
        if not self.connectors:
            raise ValueError(f"connectors must name at least one of {', '.join(CONNECTORS)}")
        for index, kind in enumerate(self.connectors):
            check_choice(kind, f"connectors[{index}]", CONNECTORS, hint="a demo connector")
        if len(set(self.connectors)) != len(self.connectors):
            raise ValueError(f"connectors must be distinct, got {', '.join(self.connectors)}")
        check_int(self.seed, "seed")
        for name in (
            "num_train_images",
            "num_eval_images",
            "image_size",
            "patch_size",
            "vision_width",
            "vision_blocks",
            "llm_width",
            "llm_blocks",
            "stage1_steps",
            "stage2_steps",
            "batch_size",
            "num_threads",
        ):
            check_positive_int(getattr(self, name), name)
        for name in ("stage1_learning_rate", "stage2_learning_rate"):
            check_positive_float(getattr(self, name), name)
        check_optional_int(self.jobs, "jobs", minimum=1, hint="or None (automatic)")
        for name in ("vision_path", "llm_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | Path):
                raise TypeError(f"{name} must be a path or None, got {value!r}")
        smallest = SceneSpec().min_image_size()
        if self.image_size < smallest:
            raise ValueError(
                f"image_size must be >= {smallest} (the synthetic shapes need it), got "
                f"{self.image_size}"
            )
        if self.vision_path is None:
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size ({self.image_size}) must be a multiple of patch_size "
                    f"({self.patch_size})"
                )
            for kind in self.connectors:  # each connector's own checks, before any work
                demo_connector(
                    kind,
                    vision_dim=self.vision_width,
                    llm_dim=self.llm_width,
                    num_layers=self.vision_blocks,
                    grid_side=self.image_size // self.patch_size,
                )


# ---------------------------------------------------------------------------- tokenizer


def _all_texts(paths: list[Path], templates: list[str]) -> list[str]:
    from mmconnect.integrations.training.data import get_template

    texts = []
    for path in paths:
        for record in load_llava_json(path):
            for name in templates:
                texts.append(get_template(name).render(record.conversations))
    return texts


# ---------------------------------------------------------------------------- model


CONNECTORS = ("baseline", "sti", "sci", "dci", "dci-efficient")


def demo_connector(
    kind: str, *, vision_dim: int, llm_dim: int, num_layers: int, grid_side: int
) -> ConnectorConfig:
    """The connector ``kind`` for a tower of ``num_layers`` blocks and a square token grid.

    The final layer is ``hidden_states[-2]``; DCI averages the two halves of the blocks, SCI / STI
    add the layers at a quarter and half of the depth, the efficient DCI halves the grid.
    """
    half = num_layers // 2
    groups = (tuple(range(0, half)), tuple(range(half, num_layers)))
    extra = (max(half // 2, 1), half)
    kinds = {
        "baseline": {"fusion": SingleLayerSpec()},
        "sti": {"fusion": STISpec(extra_layers=extra, window=4)},
        "sci": {"fusion": SCISpec(extra_layers=extra)},
        "dci": {"fusion": DCISpec(groups=groups)},
        "dci-efficient": {
            "fusion": DCISpec(groups=groups),
            "resample": ResampleSpec(grid=(grid_side // 2, grid_side // 2)),
        },
    }
    check_choice(kind, "kind", CONNECTORS, hint="a demo connector")
    return ConnectorConfig(
        vision_dim=vision_dim, llm_dim=llm_dim, num_layers=num_layers, **kinds[kind]
    )


def _checkpoint_config(path: str | Path, option: str) -> Any:
    """The HF config of the local checkpoint folder ``path`` (``option`` names it in errors).

    Raises:
        FileNotFoundError: ``path`` is not a folder or has no ``config.json``.
        ValueError: ``config.json`` cannot be read as a Hugging Face config.
    """
    from transformers import AutoConfig

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{option} {str(path)!r} is not a folder; expected a local checkpoint folder "
            "(saved with save_pretrained: config.json and the weights)"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{option} {str(path)!r} has no config.json; expected a local checkpoint folder "
            "saved with save_pretrained"
        )
    try:
        # Dense model types (dense_llava, ...) are registered by importing mmconnect.integrations.
        return AutoConfig.from_pretrained(directory)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise ValueError(f"{option} {str(path)!r}: config.json cannot be read: {error}") from None


def _vision_part(config: Any, path: str | Path) -> Any:
    """The vision config of a vision-tower checkpoint or of a multimodal (LLaVA-style) one."""
    vision = getattr(config, "vision_config", None) or config
    for attribute in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        if getattr(vision, attribute, None) is None:
            raise ValueError(
                f"vision_path (--vision) {str(path)!r} holds a {config.model_type!r} model, not "
                f"a ViT-style vision tower (its config has no {attribute}); expected e.g. a "
                "CLIP / SigLIP vision model or a (Dense) LLaVA folder"
            )
    return vision


def _text_part(config: Any, path: str | Path) -> Any:
    """The text config of an LLM checkpoint or of a multimodal (LLaVA-style) one."""
    text = getattr(config, "text_config", None) or config
    for attribute in ("hidden_size", "vocab_size"):
        if getattr(text, attribute, None) is None:
            raise ValueError(
                f"llm_path (--llm) {str(path)!r} holds a {config.model_type!r} model, not a "
                f"causal LLM (its config has no {attribute}); expected e.g. a Llama folder with "
                "its tokenizer or a (Dense) LLaVA folder"
            )
    return text


def load_demo_tokenizer(llm_path: str | Path) -> Any:
    """The tokenizer saved with the LLM at ``llm_path``, with the ``<image>`` token and a pad token.

    Raises:
        ValueError: no tokenizer can be loaded from ``llm_path``.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_path)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise ValueError(
            f"llm_path (--llm) {str(llm_path)!r} holds no loadable tokenizer (save it there "
            f"with tokenizer.save_pretrained): {error}"
        ) from None
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_demo_checkpoints(config: DemoConfig) -> None:
    """Check ``config.vision_path`` / ``config.llm_path`` (reading only, before any writing).

    Raises:
        FileNotFoundError, ValueError: a path that is not a usable checkpoint (named).
    """
    if config.vision_path:
        _vision_part(
            _checkpoint_config(config.vision_path, "vision_path (--vision)"), config.vision_path
        )
    if config.llm_path:
        _text_part(_checkpoint_config(config.llm_path, "llm_path (--llm)"), config.llm_path)


def _pretrained_llm(path: str | Path, checkpoint_config: Any, text_config: Any) -> nn.Module:
    """A causal LM from ``path``: the model itself, or the LLM inside a multimodal checkpoint."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if getattr(checkpoint_config, "text_config", None) is None:
        return AutoModelForCausalLM.from_pretrained(path)
    full = AutoModelForImageTextToText.from_pretrained(path)
    llm = AutoModelForCausalLM.from_config(text_config)
    llm.model.load_state_dict(full.model.language_model.state_dict())
    llm.lm_head.load_state_dict(full.lm_head.state_dict())
    return llm


def build_demo_model(
    kind: str,
    config: DemoConfig,
    tokenizer: Any,
    *,
    connector: ConnectorConfig | None = None,
) -> DenseLlavaForConditionalGeneration:
    """A small Dense LLaVA from configs (or the local tower / LLM checkpoints of ``config``).

    ``connector`` replaces the :func:`demo_connector` of ``kind`` (its ``vision_dim``,
    ``num_layers`` and ``llm_dim`` must fit the tower and the LLM). A random LLM is built on its
    own under ``config.seed``, so its initial weights are the same whatever the connector.
    A checkpoint path may also be a multimodal (Dense) LLaVA folder: its tower or its LLM is used.
    """
    from transformers import AutoModel, LlamaForCausalLM

    torch.manual_seed(config.seed)
    if config.vision_path:
        vision_config = _vision_part(
            _checkpoint_config(config.vision_path, "vision_path (--vision)"), config.vision_path
        )
    else:
        vision_config = tiny_vision_config(
            "clip",
            blocks=config.vision_blocks,
            width=config.vision_width,
            heads=4,
            image_size=config.image_size,
            patch_size=config.patch_size,
        )
    if config.llm_path:
        llm_checkpoint = _checkpoint_config(config.llm_path, "llm_path (--llm)")
        text_config = _text_part(llm_checkpoint, config.llm_path)
    else:
        text_config = tiny_text_config(
            "llama",
            tokenizer=tokenizer,  # its vocabulary size and pad / bos / eos ids
            width=config.llm_width,
            blocks=config.llm_blocks,
            heads=4,
        )
    if connector is None:
        connector = demo_connector(
            kind,
            vision_dim=vision_config.hidden_size,
            llm_dim=text_config.hidden_size,
            num_layers=vision_config.num_hidden_layers,
            grid_side=vision_config.image_size // vision_config.patch_size,
        )
    model_config = DenseLlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        connector=connector.to_dict(),
    )
    model = DenseLlavaForConditionalGeneration(model_config)
    if config.vision_path:
        loaded = AutoModel.from_pretrained(config.vision_path)
        tower = getattr(loaded, "vision_tower", None)  # a (Dense) LLaVA: its tower
        tower = tower if isinstance(tower, nn.Module) else loaded
        model.model.vision_tower.load_state_dict(tower.state_dict())
    if config.llm_path:
        llm = _pretrained_llm(config.llm_path, llm_checkpoint, text_config)
        llm.resize_token_embeddings(len(tokenizer))
    else:
        # Inside the full model the LLM is initialised after the connector, from a random state
        # that depends on the connector's size; alone, every connector gets the same LLM.
        torch.manual_seed(config.seed)
        llm = LlamaForCausalLM(text_config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    return model


# ---------------------------------------------------------------------------- evaluation


def exact_answers(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int) -> list[bool]:
    """Per row: does the argmax of ``logits`` give every supervised token of ``labels``?

    ``logits [B, L, V]`` at position ``t`` predict the token at ``t + 1``; ``labels [B, L]``
    hold the supervised tokens (answer tokens and the end marker) and ``ignore_index``
    elsewhere. A row without supervised tokens counts as wrong.
    """
    predictions = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    supervised = targets != ignore_index
    return [
        bool(mask.any()) and bool((prediction[mask] == target[mask]).all())
        for prediction, target, mask in zip(predictions, targets, supervised, strict=True)
    ]


@torch.no_grad()
def exact_answer_accuracy(
    model: nn.Module, dataset: LlavaDataset, question_types: list[str], batch_size: int = 32
) -> dict[str, float]:
    """Exact-answer accuracy per question type (and ``"all"``) of single-turn ``dataset``.

    An answer counts when the model's argmax at every supervised position equals the
    reference: every answer token *and the end marker* after it, which is what greedy decoding
    must produce to give exactly the answer and stop. The end marker matters because the word
    tokenizer splits hyphenated answers (``bottom-right`` is ``bottom``, ``-``, ``right``):
    without it, a model that always starts a position answer with ``bottom`` would score on
    every question whose answer starts with ``bottom`` (in the lab, a scorer without the end
    marker gave such a model 28.3 % on position questions where the text-only prior is 11.7 %).

    Args:
        model: the Dense LLaVA, ``[B, L]`` token ids and ``[B, 3, S, S]`` pixels in.
        dataset: a :class:`~mmconnect.integrations.training.data.LlavaDataset` of one question
            per record.
        question_types: the type of each record, in order.
    """
    model.eval()
    collator = DataCollator.from_tokenizer(dataset.encoder.tokenizer)
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        batch = collator([dataset[index] for index in indices])
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
        rights = exact_answers(logits, batch["labels"], ignore_index=IGNORE_INDEX)
        for right, index in zip(rights, indices, strict=True):
            for key in (question_types[index], "all"):
                correct.setdefault(key, []).append(right)
    return {kind: sum(values) / len(values) for kind, values in sorted(correct.items())}


# ---------------------------------------------------------------------------- the run


def _stage(
    name: str, output_dir: Path, steps: int, config: DemoConfig, learning_rate: float
) -> StageConfig:
    return StageConfig(
        stage=name,
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=learning_rate,
        connector_learning_rate=learning_rate,
        seed=config.seed,
        logging_steps=max(1, steps // 30),
        disable_tqdm=not config.show_progress,
    )


def write_demo_data(folder: OutputFolder, **options: Any) -> SyntheticVQAFiles:
    """Write the synthetic data set (:func:`write_synthetic_vqa` ``options``) into
    ``folder.path / "data"`` without touching files the command did not write
    (:meth:`OutputFolder.write_subfolder`)."""
    files, fresh = folder.write_subfolder(
        "data", lambda scratch: write_synthetic_vqa(scratch, **options)
    )
    paths = ("root", "images_dir", "stage1", "stage2", "eval", "scenes", "metadata")
    return dataclasses.replace(
        files, **{name: folder.moved(getattr(files, name), fresh, "data") for name in paths}
    )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``results.json``) what it measured.

    Every argument is checked before anything is written: the checkpoints, and the output
    folder (a non-empty folder that no demo created is refused unless ``config.overwrite``).

    Raises:
        FileNotFoundError: a checkpoint path does not exist (named).
        FileExistsError: ``output_dir`` is a non-empty folder that no demo created.
        ValueError: any other bad argument (named).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig) -> dict[str, Any]:
    started = time.monotonic()
    # Everything that can be wrong is found before the first byte is written.
    check_demo_checkpoints(config)
    tokenizer = load_demo_tokenizer(config.llm_path) if config.llm_path else None
    folder = claim_output_folder(
        config.output_dir, tool="demo", overwrite=config.overwrite, option="output_dir (--output)"
    )
    output = folder.path
    files = write_demo_data(
        folder,
        num_train=config.num_train_images,
        num_eval=config.num_eval_images,
        image_size=config.image_size,
        seed=config.seed,
    )
    if tokenizer is None:
        tokenizer = build_word_tokenizer(
            _all_texts([files.stage1, files.stage2, files.eval], ["plain", "vicuna_v1"])
        )
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "connectors": {}}
    jobs = demo_jobs(config)
    if jobs == 1:
        for kind in config.connectors:
            results["connectors"][kind] = train_connector(kind, config, tokenizer, files)
    else:
        results["connectors"] = _train_in_processes(config, tokenizer, files, jobs)
    results["jobs"] = jobs
    results["seconds"] = round(time.monotonic() - started, 1)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(results, output / "loss_curves.png")
    return results


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def demo_jobs(config: DemoConfig) -> int:
    """How many connectors :func:`run_demo` trains at once (``config.jobs``, or automatic)."""
    wanted = config.jobs if config.jobs is not None else available_cores()
    return max(1, min(wanted, len(config.connectors)))


class _ProgressLines(TrainerCallback):
    """One line per logging step (``dci stage 1: step 30/150, loss 2.134``) on stderr: what
    parallel training processes show instead of progress bars that would overwrite each other."""

    def __init__(self, label: str) -> None:
        self.label = label

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(
                f"{self.label}: step {state.global_step}/{state.max_steps}, loss "
                f"{float(logs['loss']):.3f}",
                file=sys.stderr,
                flush=True,
            )


def _train_connector_process(
    kind: str, config: DemoConfig, tokenizer: Any, files: SyntheticVQAFiles, progress: bool
) -> dict[str, Any]:
    """:func:`train_connector` in a worker process (threads set there: they are per process).

    The Trainer prints its log dicts to stdout when its bars are off, and saves draw bars; with
    several processes those interleave unlabelled, so they are dropped here: the labelled
    progress lines on stderr say the same.
    """
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(config.num_threads)
    hf_logging.disable_progress_bar()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return train_connector(kind, config, tokenizer, files, progress_lines=progress)


def _train_in_processes(
    config: DemoConfig, tokenizer: Any, files: SyntheticVQAFiles, jobs: int
) -> dict[str, dict[str, Any]]:
    """Every connector of ``config`` trained in its own process, ``jobs`` at a time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Plain dicts instead of read-only mapping proxies: the files go to other processes.
    counts = {split: dict(values) for split, values in files.question_type_counts.items()}
    files = dataclasses.replace(files, question_type_counts=counts)
    quiet = dataclasses.replace(config, show_progress=False)  # no bars: progress lines instead
    print(
        f"training {len(config.connectors)} connectors, {jobs} at a time in separate processes "
        f"({config.num_threads} thread(s) each)",
        file=sys.stderr,
        flush=True,
    )
    # "spawn": a fresh interpreter per worker (forking a process that holds torch threads can
    # deadlock).
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        futures = {
            kind: pool.submit(
                _train_connector_process, kind, quiet, tokenizer, files, config.show_progress
            )
            for kind in config.connectors
        }
        return {kind: future.result() for kind, future in futures.items()}


def dataset_arguments(model: nn.Module, tokenizer: Any, files: Any) -> dict[str, Any]:
    """The :class:`LlavaDataset` keyword arguments of a demo model on the synthetic data set
    ``files``: its image folder, ``tokenizer``, a ``CLIPImageProcessor`` at the model's tower
    size (a local tower may expect another size than the data's) and the model's image tokens.
    """
    from transformers import CLIPImageProcessor

    side = model.config.vision_config.image_size
    return {
        "image_folder": files.root,
        "tokenizer": tokenizer,
        "image_processor": CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        "image_tokens": family_model(model).image_token_count(),
        "image_token_id": model.config.image_token_id,
    }


def train_connector(
    kind: str,
    config: DemoConfig,
    tokenizer: Any,
    files: SyntheticVQAFiles,
    *,
    connector: ConnectorConfig | None = None,
    progress_lines: bool = False,
) -> dict[str, Any]:
    """Build the model of ``kind`` (:func:`build_demo_model`), train both stages into
    ``config.output_dir / kind`` and score the held-out questions of ``files``.

    ``progress_lines`` prints one line per logged step (for parallel runs without bars).

    Returns:
        ``{"visual_tokens", "accuracy": {question type | "all": fraction}, "stage1_losses",
        "stage2_losses": [(step, loss), ...], "model_dir", "stage_configs": [stage 1's and
        stage 2's StageConfig as dicts]}``.
    """
    output = Path(config.output_dir)
    eval_records = json.loads(Path(files.eval).read_text())
    model = build_demo_model(kind, config, tokenizer, connector=connector)
    data = dataset_arguments(model, tokenizer, files)
    tokens, image_processor = data["image_tokens"], data["image_processor"]
    collator = DataCollator.from_tokenizer(tokenizer)
    align = _stage(
        "align", output / kind / "stage1", config.stage1_steps, config, config.stage1_learning_rate
    )
    instruct = _stage(
        "instruct",
        output / kind / "stage2",
        config.stage2_steps,
        config,
        config.stage2_learning_rate,
    )

    def lines(label: str) -> list[TrainerCallback]:
        return [_ProgressLines(f"{kind} {label}")] if progress_lines else []

    # Saved with each stage's model in one atomic step: each stage folder loads alone with
    # AutoProcessor.
    processor = DenseLlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=model.config.vision_config.patch_size,
        connector=model.connector.config,
    )
    stage1 = train_stage(
        model,
        LlavaDataset.from_json(files.stage1, template="plain", **data),
        collator,
        align,
        callbacks=lines("stage 1"),
        processor=processor,
    )
    stage2 = train_stage(
        stage1.model,
        LlavaDataset.from_json(files.stage2, template="vicuna_v1", **data),
        collator,
        instruct,
        callbacks=lines("stage 2"),
        processor=processor,
    )
    evaluation = LlavaDataset.from_json(files.eval, template="vicuna_v1", **data)
    accuracy = exact_answer_accuracy(
        stage2.model, evaluation, [record["question_type"] for record in eval_records]
    )
    return {
        "visual_tokens": tokens,
        "accuracy": accuracy,
        "stage1_losses": stage1.losses,
        "stage2_losses": stage2.losses,
        "model_dir": str(stage2.output_dir),
        "stage_configs": [align.to_dict(), instruct.to_dict()],
    }


def results_table(results: dict[str, Any]) -> str:
    """The accuracy table (per question type) as Markdown."""
    kinds = list(results["connectors"])
    types = sorted(
        {t for entry in results["connectors"].values() for t in entry["accuracy"]} - {"all"}
    )
    header = ["connector", "visual tokens", *types, "all"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    for kind in kinds:
        entry = results["connectors"][kind]
        cells = [f"{100 * entry['accuracy'].get(t, float('nan')):.1f}" for t in [*types, "all"]]
        lines.append(f"| {kind} | {entry['visual_tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_losses(results: dict[str, Any], path: Path) -> None:
    """Training-loss curves of both stages for every connector, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, entry in results["connectors"].items():
        for axis, key in zip(axes, ("stage1_losses", "stage2_losses"), strict=True):
            if entry[key]:
                steps, losses = zip(*entry[key], strict=True)
                axis.plot(steps, losses, label=kind)
    for axis, title in zip(
        axes, ("stage 1: align (captions)", "stage 2: instruct (questions)"), strict=True
    ):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
