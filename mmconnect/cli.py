"""The ``mmconnect`` command line.

* ``mmconnect presets`` lists the built-in connector presets with the layers they read and the
  token count and projector width they produce at their native encoder grid;
* ``mmconnect demo`` trains the baseline and a Dense Connector LLaVA on synthetic VQA in minutes on
  a CPU and compares their held-out accuracy (:mod:`mmconnect.integrations.demo`);
* ``mmconnect lab`` trains the baseline, STI, SCI, DCI and efficient-DCI connectors over seeds on
  a pretrained tower whose last layers lose colour and reports accuracy per question type as mean
  +- std (:mod:`mmconnect.integrations.lab`);
* ``mmconnect train --config FILE.yaml`` runs both training stages from one file
  (:mod:`mmconnect.integrations.train_run`);
* ``mmconnect chat --model DIR --video FILE "question"`` (or ``--image FILE``) asks a saved Dense
  LLaVA / LLaVA-NeXT about a video without video training, or about an image
  (:mod:`mmconnect.integrations.video_chat`);
* ``mmconnect inspect ENCODER`` describes a local checkpoint or a tiny test encoder: blocks, width,
  prefix tokens, token grid and the token count of every preset.

Commands that need transformers / timm import them when they run, never at ``import mmconnect``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from mmconnect.config import ConnectorConfig
from mmconnect.connector import DenseConnector
from mmconnect.presets import list_presets, preset_geometry


def _describe_layers(connector: DenseConnector) -> str:
    parts = [f"F=H[{connector.individual_layers[0]}]"]
    window = getattr(connector.fusion, "window", None)  # STI pools its extra layers
    for layer in connector.individual_layers[1:]:
        parts.append(f"pool{window}(H[{layer}])" if window else f"H[{layer}]")
    parts += [f"mean H[{group[0]}..{group[-1]}]" for group in connector.groups]
    return ", ".join(parts)


def presets_table() -> str:
    """A plain-text table of every preset: fusion, layers, tokens, projector input width."""
    rows = [("preset", "fusion", "layers (HF hidden_states)", "tokens", "projector in")]
    for name in list_presets():
        config = ConnectorConfig.from_preset(name)
        with torch.device("meta"):  # bookkeeping only: no weights are allocated
            connector = DenseConnector(config)
        grid = preset_geometry(name).grid  # the preset's own encoder, not a guess from its depth
        rows.append(
            (
                name,
                config.fusion,
                _describe_layers(connector),
                str(connector.num_tokens(grid)),
                str(connector.fused_dim),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _positive_int(text: str) -> int:
    """An argparse ``type`` accepting whole numbers >= 1; argparse prefixes the option's name
    to the message and exits with status 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmconnect", description="Dense Connector for multimodal LLMs"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="list the built-in connector presets")
    inspect = commands.add_parser("inspect", help="describe a vision encoder as the tap sees it")
    inspect.add_argument("encoder", help="a local checkpoint directory or a tiny test encoder name")
    inspect.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="input size in pixels (default: the encoder's own)",
    )
    demo = commands.add_parser(
        "demo", help="train baseline and Dense Connector LLaVAs on synthetic VQA and compare"
    )
    demo.add_argument("--output", default="mmconnect-demo", help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--connectors",
        default="baseline,dci",
        help="comma-separated: baseline, sti, sci, dci, dci-efficient",
    )
    demo.add_argument(
        "--vision",
        default=None,
        help="local vision tower checkpoint (default: random, from a config)",
    )
    demo.add_argument(
        "--llm", default=None, help="local LLM checkpoint with its tokenizer (default: random)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a one-minute smoke run with tiny budgets"
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output folder that no demo created (only the demo's own "
        "files are replaced; nothing else is deleted)",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads per training process (default 1: the tiny models gain little "
        "from more, and lose much when other jobs share the cores)",
    )
    demo.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="connectors trained at once, each in its own process (default: one per "
        "connector, at most one per available core)",
    )
    lab = commands.add_parser(
        "lab", help="compare the five connectors over seeds on a detail-losing pretrained tower"
    )
    lab.add_argument("--output", default="mmconnect-lab", help="output directory")
    lab.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2)")
    lab.add_argument(
        "--connectors",
        default=None,
        help="comma-separated, from: baseline, sti, sci, dci, dci-efficient (default: all)",
    )
    lab.add_argument("--quick", action="store_true", help="a one-minute smoke run, two seeds")
    lab.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output folder that no lab created (only the lab's own "
        "files are replaced; nothing else is deleted)",
    )
    train = commands.add_parser("train", help="run both training stages from one YAML file")
    train.add_argument(
        "--config", required=True, help="the run's YAML file (see mmconnect.integrations.train_run)"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="train into non-empty stage folders that mmconnect training did not create (as "
        "overwrite: true in the run file; only the files training writes are replaced)",
    )
    chat = commands.add_parser(
        "chat", help="ask a saved Dense LLaVA / LLaVA-NeXT about a video or an image"
    )
    chat.add_argument("question", help="the question (an <image> placeholder is put first)")
    chat.add_argument("--model", required=True, help="a saved model directory with its processor")
    source = chat.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a video file (mp4, webm, avi...) or a frame folder")
    source.add_argument("--image", help="an image file")
    chat.add_argument("--frames", type=int, default=None, help="most frames to sample (8)")
    chat.add_argument(
        "--pooling", default=None, help="concat, maxpool1d, mean, avgpool2d, bilinear"
    )
    chat.add_argument("--max-visual-tokens", type=int, default=None, help="visual-token budget")
    chat.add_argument("--template", default="vicuna_v1", help="the model's chat template")
    chat.add_argument("--max-new-tokens", type=int, default=32)
    arguments = parser.parse_args(argv)
    if arguments.command in ("demo", "train"):
        # Show the per-stage parameter-group lines (which groups train, how many parameters).
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("mmconnect").setLevel(logging.INFO)
    if arguments.command == "presets":
        print(presets_table())
    elif arguments.command == "inspect":
        return _inspect(arguments.encoder, arguments.image_size)
    elif arguments.command == "demo":
        return _demo(arguments)
    elif arguments.command == "train":
        return _train(arguments.config, overwrite=arguments.overwrite)
    elif arguments.command == "lab":
        return _lab(arguments)
    elif arguments.command == "chat":
        return _chat(arguments)
    return 0


def _chat(arguments: argparse.Namespace) -> int:
    from mmconnect.integrations.data import get_template, load_image
    from mmconnect.integrations.video_chat import answer_image, answer_video, load_chat_model
    from mmconnect.integrations.video_io import open_video
    from mmconnect.video import POOLINGS, sample_frame_indices

    video_options = {
        "--frames": arguments.frames,
        "--pooling": arguments.pooling,
        "--max-visual-tokens": arguments.max_visual_tokens,
    }
    num_frames = 8 if arguments.frames is None else arguments.frames
    try:
        if arguments.image is not None and any(v is not None for v in video_options.values()):
            given = [name for name, value in video_options.items() if value is not None]
            raise ValueError(f"{', '.join(given)} apply to --video only, not to --image")
        # Bad input fails before the model loads.
        get_template(arguments.template)
        if arguments.image is not None:
            visual = load_image(arguments.image)
        else:
            visual = open_video(arguments.video)
            sample_frame_indices(visual.total_frames, num_frames)
            if arguments.pooling is not None and arguments.pooling not in POOLINGS:
                raise ValueError(f"--pooling must be one of {POOLINGS}, got {arguments.pooling!r}")
        model, processor = load_chat_model(arguments.model)
        options = {"template": arguments.template, "max_new_tokens": arguments.max_new_tokens}
        if arguments.image is not None:
            answer = answer_image(model, processor, visual, arguments.question, **options)
        else:
            answer = answer_video(
                model,
                processor,
                visual,
                arguments.question,
                num_frames=num_frames,
                pooling=arguments.pooling,
                max_visual_tokens=arguments.max_visual_tokens,
                **options,
            )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"mmconnect chat: {error}", file=sys.stderr)
        return 2
    if answer.pooling is not None:
        print(
            f"{len(answer.frame_indices)} of {answer.total_frames} frames "
            f"{list(answer.frame_indices)}, {answer.pooling}, {answer.num_visual_tokens} visual "
            "tokens",
            file=sys.stderr,
        )
    print(answer.text)
    return 0


def _demo(arguments: argparse.Namespace) -> int:
    from mmconnect.integrations.demo import DemoConfig, results_table, run_demo

    options: dict = {
        "output_dir": arguments.output,
        "seed": arguments.seed,
        "connectors": tuple(
            name.strip() for name in arguments.connectors.split(",") if name.strip()
        ),
        "vision_path": arguments.vision,
        "llm_path": arguments.llm,
        "overwrite": arguments.overwrite,
        "num_threads": arguments.threads,
        "jobs": arguments.jobs,
    }
    if arguments.quick:
        options |= {
            "num_train_images": 64,
            "num_eval_images": 16,
            "stage1_steps": 4,
            "stage2_steps": 8,
            "batch_size": 8,
        }
    try:
        # DemoConfig and run_demo check every argument before anything is written.
        results = run_demo(DemoConfig(**options))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"mmconnect demo: {error}", file=sys.stderr)
        return 2
    print("\nHeld-out answer accuracy (%), exact greedy answers:\n")
    print(results_table(results))
    print(
        f"\n{results['seconds']:.0f} s; results.json and loss_curves.png are in {arguments.output}"
    )
    return 0


def _lab(arguments: argparse.Namespace) -> int:
    from mmconnect.integrations.lab import LabConfig, accuracy_table, quick_config, run_lab

    options: dict = {"output_dir": arguments.output, "overwrite": arguments.overwrite}
    try:
        if arguments.seeds is not None:
            try:
                options["seeds"] = tuple(
                    int(seed) for seed in arguments.seeds.split(",") if seed.strip()
                )
            except ValueError:
                raise ValueError(
                    f"--seeds must be comma-separated ints, got {arguments.seeds!r}"
                ) from None
        if arguments.connectors is not None:
            options["connectors"] = tuple(
                name.strip() for name in arguments.connectors.split(",") if name.strip()
            )
        config = quick_config(**options) if arguments.quick else LabConfig(**options)
        results = run_lab(config)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"mmconnect lab: {error}", file=sys.stderr)
        return 2
    print("\nHeld-out answer accuracy (%), mean +- std over seeds:\n")
    print(accuracy_table(results))
    print(
        f"\n{results['seconds']['total']:.0f} s; results.md, results.json, accuracy.png and "
        f"encoder_probe.png are in {arguments.output}"
    )
    return 0


def _train(config_path: str, *, overwrite: bool = False) -> int:
    from mmconnect.integrations.train_run import load_train_run, run_training

    try:
        # The whole run file (types, paths, output folders) is checked before any work.
        run = load_train_run(config_path, overwrite=overwrite)
        results = run_training(run)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"mmconnect train: {error}", file=sys.stderr)
        return 2
    for stage, entry in results.items():
        final = entry["losses"][-1][1] if entry["losses"] else float("nan")
        print(f"{stage}: final loss {final:.4f}, model in {entry['output_dir']}")
    return 0


def _inspect(spec: str, image_size: int | None) -> int:
    from mmconnect.integrations.encoders import check_image_size, describe_encoder, load_encoder

    try:
        encoder, native_size = load_encoder(spec)
        if image_size is None and native_size is None:
            raise ValueError("the encoder does not state its image size; pass --image-size")
        size = native_size if image_size is None else image_size
        check_image_size(encoder, size, native_size, option="--image-size")
    except (ValueError, FileNotFoundError) as error:
        print(f"mmconnect inspect: {error}", file=sys.stderr)
        return 2
    print(describe_encoder(encoder, size).render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
