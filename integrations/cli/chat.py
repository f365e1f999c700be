"""``mmconnect chat --model DIR --video FILE "question"`` (or ``--image FILE``): ask a saved Dense
model (LLaVA, LLaVA-NeXT, Mini-Gemini: any registered family) about a video without video training, or about an image
(:mod:`mmconnect.integrations.chat.answering`). Needs the ``hf`` extra; video files also the
``video`` extra (PyAV), which ``--image`` and frame folders do not need."""

from __future__ import annotations

import argparse
import sys

from mmconnect.integrations.cli.common import positive_int


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``chat`` command."""
    chat = subparsers.add_parser("chat", help="ask a saved Dense model about a video or an image")
    chat.add_argument("question", help="the question (an <image> placeholder is put first)")
    chat.add_argument("--model", required=True, help="a saved model directory with its processor")
    source = chat.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a video file (mp4, webm, avi...) or a frame folder")
    source.add_argument("--image", help="an image file")
    chat.add_argument("--frames", type=positive_int, default=None, help="most frames to sample (8)")
    chat.add_argument(
        "--pooling", default=None, help="concat, maxpool1d, mean, avgpool2d, bilinear"
    )
    chat.add_argument(
        "--max-visual-tokens", type=positive_int, default=None, help="visual-token budget"
    )
    chat.add_argument("--template", default="vicuna_v1", help="the model's chat template")
    chat.add_argument("--max-new-tokens", type=positive_int, default=32)


def run(arguments: argparse.Namespace) -> int:
    """Answer the question and print the answer; exit status 2 with the reason on bad input."""
    # video_io imports PyAV only when a video file is opened, so --image works without it.
    from mmconnect.integrations.chat.answering import answer_image, answer_video, load_chat_model
    from mmconnect.integrations.chat.video_io import open_video
    from mmconnect.integrations.training.data import get_template, load_image
    from mmconnect.validation import check_choice
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
            if arguments.pooling is not None:
                check_choice(arguments.pooling, "--pooling", POOLINGS)
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
