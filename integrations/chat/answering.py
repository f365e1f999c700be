"""Ask a Dense model of any family about a video (training-free, FreeVA) or an image.

A video is answered by the image model as it is, without video training:

1. sample frames (:func:`mmconnect.video.sample_frame_indices`; a token budget may pick fewer
   frames and a pooling, :func:`mmconnect.video.plan_video_tokens`);
2. send every frame through the model's normal image path, tower -> tap -> Dense Connector
   (:func:`frame_features`); Dense LLaVA-NeXT uses each frame's base crop only (the whole frame
   resized to the tower's size, no AnyRes tiles and no newline tokens, as LLaVA-NeXT-Video);
3. pool the frames' tokens over time (:func:`mmconnect.video.pool_frames`);
4. render the question with the chat template the model was trained with (the data pipeline's
   :class:`~mmconnect.integrations.training.data.ConversationEncoder`, segment by segment, exactly as in
   training) around ONE ``<image>`` placeholder, and put all video tokens where it stands in
   ``inputs_embeds`` (:func:`prompt_embeddings`); the model's forward is unchanged;
5. greedy ``generate()`` (:func:`generate_answer`).

:func:`answer_video` and :func:`answer_image` do all of it; ``mmconnect chat`` is the command
line. The default template is ``vicuna_v1``, the stage-2 format of ``mmconnect demo`` and
``mmconnect train``; pass the one your model was instruction-tuned with.

Example:
    >>> model, processor = load_chat_model("mmconnect-demo/dci/stage2")  # doctest: +SKIP
    >>> answer_video(model, processor, "clip.mp4", "What colour is the circle?").text  # doctest: +SKIP
    'red'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmconnect.integrations.chat.video_io import VideoFrames, VideoSource, open_video
from mmconnect.integrations.families.protocol import (
    family_model,
    generation_model,
    list_families,
)
from mmconnect.integrations.training.data import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    ConversationEncoder,
    Turn,
    get_template,
    load_image,
)
from mmconnect.validation import check_choice, check_optional_int, check_positive_int, check_str
from mmconnect.video import (
    PLAN_POOLINGS,
    POOLINGS,
    VideoPlan,
    count_video_tokens,
    plan_video_tokens,
    pool_frames,
    sample_frame_indices,
)

#: The chat template used when none is given: LLaVA-1.5's stage-2 format (``mmconnect demo``).
DEFAULT_TEMPLATE = "vicuna_v1"
#: The temporal pooling used when neither a pooling nor a token budget is given (FreeVA).
DEFAULT_POOLING = "concat"

Frames = VideoFrames | Sequence[Image.Image] | Tensor | np.ndarray


@dataclass(frozen=True)
class ChatAnswer:
    """A generated answer and what the model saw.

    Attributes:
        text: the answer, special tokens removed, stripped.
        num_visual_tokens: visual tokens in the prompt.
        frame_indices: the video frames used (indices into the video); empty for an image.
        total_frames: frames in the video (``None`` for an image).
        pooling: the temporal pooling (``None`` for an image).
    """

    text: str
    num_visual_tokens: int
    frame_indices: tuple[int, ...] = ()
    total_frames: int | None = None
    pooling: str | None = None


# ---------------------------------------------------------------------------- the model


def frame_layout(model: Any) -> tuple[int, tuple[int, int] | None]:
    """``(tokens per frame, their grid)`` of ``model``'s connector at the tower's native size.

    The grid is ``None`` when the tokens form no grid (STI appends pooled tokens after it), so
    the grid poolings do not apply. Any Dense family model (family protocol).
    """
    family = family_model(model)
    return family.connector.num_tokens(family.connector_input_grid()), family.frame_grid()


def _as_images(frames: Frames, argument: str = "frames") -> list[Image.Image]:
    """PIL RGB images from a :class:`VideoFrames`, PIL images or ``[T, H, W, 3]`` uint8 pixels."""
    if isinstance(frames, VideoFrames):
        return frames.to_pil()
    if isinstance(frames, Tensor | np.ndarray):
        array = frames.cpu().numpy() if isinstance(frames, Tensor) else frames
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(
                f"{argument} as an array must be [frames, height, width, 3] uint8 RGB, got "
                f"shape {tuple(array.shape)} {array.dtype}"
            )
        return [Image.fromarray(frame) for frame in array]
    if isinstance(frames, Image.Image) or not isinstance(frames, Sequence):
        raise TypeError(
            f"{argument} must be VideoFrames, a list of PIL images or a [T, H, W, 3] uint8 "
            f"tensor, got {type(frames).__name__}"
        )
    images = list(frames)
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{argument}[{index}] must be a PIL image, got {type(image).__name__}")
    return [image.convert("RGB") for image in images]


def frame_pixel_values(model: Any, image_processor: Any, frames: Frames) -> Tensor:
    """Each frame preprocessed as one image of the model's input size: ``[T, 3, H, W]``.

    The family decides what a frame is (family protocol): Dense LLaVA and Mini-Gemini use the
    image processor's output; Dense LLaVA-NeXT uses each frame's base crop (the whole frame
    resized to the tile size), not its AnyRes tiles.

    Raises:
        ValueError: no frames, or the processor gives another number of frames.
    """
    family = family_model(model)
    images = _as_images(frames)
    if not images:
        raise ValueError("frames is empty: a video needs at least one frame")
    pixels = family.frame_pixel_values(image_processor, images)
    if pixels.dim() != 4 or pixels.shape[0] != len(images):
        raise ValueError(
            f"the image processor gave pixel_values of shape {tuple(pixels.shape)}; expected "
            f"[{len(images)}, 3, height, width], one image per frame"
        )
    return pixels


@torch.no_grad()
def frame_features(model: Any, pixel_values: Tensor) -> Tensor:
    """Every frame through tower -> tap -> Dense Connector: ``[T, 3, H, W] -> [T, N, llm_dim]``
    (the family's per-frame path; no AnyRes packing)."""
    return family_model(model).frame_features(pixel_values)


def encode_video(model: Any, pixel_values: Tensor, pooling: str = DEFAULT_POOLING) -> Tensor:
    """A video's visual tokens: ``[T, 3, S, S] -> [1, count_video_tokens(...), llm_dim]``.

    Args:
        model: a Dense model of any registered family.
        pixel_values: the frames in time order (:func:`frame_pixel_values`).
        pooling: one of :data:`mmconnect.video.POOLINGS`.
    """
    tokens_per_frame, grid = frame_layout(model)
    features = frame_features(model, pixel_values)
    if features.shape[1] != tokens_per_frame:  # the pooling grid relies on this count
        raise RuntimeError(
            f"the connector gave {features.shape[1]} tokens per frame, {tokens_per_frame} expected"
        )
    return pool_frames(features, pooling, grid)


@torch.no_grad()
def encode_image(model: Any, image_processor: Any, image: Image.Image) -> Tensor:
    """One image's visual tokens through the model's full image path: ``[1, N, llm_dim]``
    (Dense LLaVA-NeXT: AnyRes crops, packing and newline tokens included)."""
    return family_model(model).image_features(image_processor, image)


# ---------------------------------------------------------------------------- the prompt


def _question_turn(question: str) -> Turn:
    check_str(question, "question")
    tags = question.count(IMAGE_PLACEHOLDER)
    if tags > 1:
        raise ValueError(
            f"question holds {tags} {IMAGE_PLACEHOLDER} placeholders; the whole video or image "
            "replaces one (leave it out to put it first)"
        )
    return Turn("human", question if tags else f"{IMAGE_PLACEHOLDER}\n{question}")


def prompt_embeddings(
    model: Any,
    tokenizer: Any,
    question: str,
    visual_tokens: Tensor,
    template: str | ChatTemplate = DEFAULT_TEMPLATE,
) -> tuple[Tensor, Tensor]:
    """The prompt as ``inputs_embeds`` with all visual tokens where its ``<image>`` stands.

    The question becomes one human turn of ``template`` (``"<image>\\n"`` is put first unless it
    holds the placeholder), rendered up to the assistant's answer and tokenized segment by segment
    as in training; the placeholder's single position is replaced by ``visual_tokens``.

    Args:
        visual_tokens: ``[1, M, llm_dim]`` (:func:`encode_video` / :func:`encode_image`).

    Returns:
        ``inputs_embeds`` ``[1, L, llm_dim]`` and ``attention_mask`` ``[1, L]`` (all ones).

    Raises:
        ValueError: a bad question, ``visual_tokens`` of another width, or a prompt longer than
            the LLM's ``max_position_embeddings`` (the message suggests pooling or a budget).
    """
    base = family_model(model)
    llm_dim = base.config.text_config.hidden_size
    if visual_tokens.dim() != 3 or visual_tokens.shape[0] != 1 or visual_tokens.shape[2] != llm_dim:
        raise ValueError(
            f"visual_tokens must be [1, tokens, {llm_dim}], got {tuple(visual_tokens.shape)}"
        )
    image_token_id = model.config.image_token_id
    encoder = ConversationEncoder(
        get_template(template), tokenizer, image_tokens=1, image_token_id=image_token_id
    )
    ids = list(encoder.encode([_question_turn(question)]).input_ids)
    position = ids.index(image_token_id)
    length = len(ids) - 1 + visual_tokens.shape[1]
    limit = getattr(base.config.text_config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(
            f"the prompt would be {length} tokens ({visual_tokens.shape[1]} visual), more than the "
            f"LLM's max_position_embeddings={limit}; use fewer frames, a pooling that keeps fewer "
            "tokens (maxpool1d, avgpool2d, bilinear, mean) or a visual-token budget"
        )
    embeddings = model.get_input_embeddings()
    text = embeddings(torch.tensor([ids], device=embeddings.weight.device))
    visual = visual_tokens.to(device=text.device, dtype=text.dtype)
    inputs_embeds = torch.cat([text[:, :position], visual, text[:, position + 1 :]], dim=1)
    attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=text.device)
    return inputs_embeds, attention_mask


def _stop_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """The tokenizer's EOS and the template's end marker when it is one token."""
    stops = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.append(tokenizer.eos_token_id)
    end = tokenizer.encode(template.for_tokenizer(tokenizer).answer_end, add_special_tokens=False)
    if len(end) == 1 and end[0] not in stops:
        stops.append(end[0])
    return stops


@torch.no_grad()
def generate_answer(
    model: Any,
    tokenizer: Any,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    template: str | ChatTemplate = DEFAULT_TEMPLATE,
    max_new_tokens: int = 32,
) -> str:
    """Greedy ``generate()`` from ``inputs_embeds`` until EOS (or the template's end marker).

    Returns:
        The generated text without special tokens, stripped.
    """
    check_positive_int(max_new_tokens, "max_new_tokens")
    stops = _stop_ids(tokenizer, get_template(template))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    output = model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    return tokenizer.decode(output[0], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------- answers


def plan_for_model(
    model: Any,
    *,
    num_frames: int = 8,
    total_frames: int | None = None,
    pooling: str | None = None,
    max_visual_tokens: int | None = None,
) -> VideoPlan:
    """How many frames and which pooling a video gets with ``model``.

    Without ``max_visual_tokens``: ``min(num_frames, total_frames)`` frames and ``pooling``
    (default ``concat``). With it: :func:`mmconnect.video.plan_video_tokens` with at most
    ``num_frames`` frames, the given ``pooling`` only, or the default preference order.

    Raises:
        ValueError: the budget is too small for even one frame, or a bad argument.
    """
    tokens_per_frame, grid = frame_layout(model)
    if max_visual_tokens is None:
        chosen = DEFAULT_POOLING if pooling is None else pooling
        # The sampling rule's own clamp (and its errors for zero frames or an empty video).
        total = num_frames if total_frames is None else total_frames
        frames = len(sample_frame_indices(total, num_frames))
        return VideoPlan(
            num_frames=frames,
            pooling=chosen,
            num_tokens=count_video_tokens(frames, tokens_per_frame, chosen, grid),
        )
    return plan_video_tokens(
        max_visual_tokens,
        tokens_per_frame=tokens_per_frame,
        grid=grid,
        max_frames=num_frames,
        total_frames=total_frames,
        poolings=PLAN_POOLINGS if pooling is None else (pooling,),
    )


def answer_video(
    model: Any,
    processor: Any,
    video: str | Path | VideoSource | Frames,
    question: str,
    *,
    num_frames: int = 8,
    pooling: str | None = None,
    max_visual_tokens: int | None = None,
    template: str | ChatTemplate = DEFAULT_TEMPLATE,
    max_new_tokens: int = 32,
) -> ChatAnswer:
    """Answer ``question`` about ``video`` with an image model, without video training.

    Args:
        model: a Dense model of any registered family (``...ForConditionalGeneration``).
        processor: its processor (``image_processor`` and ``tokenizer`` are used).
        video: a video file or frame folder, or one opened with
            :func:`~mmconnect.integrations.chat.video_io.open_video` (frames sampled here), or decoded frames
            (:class:`VideoFrames`, PIL images, ``[T, H, W, 3]`` uint8), used as they are unless
            there are more than the plan's frame count, then sampled by the same rule.
        question: the user's question; ``"<image>\\n"`` is put first unless it holds the
            placeholder once.
        num_frames: the most frames to use (clamped to the video's length).
        pooling: one of :data:`mmconnect.video.POOLINGS`; ``None``: ``concat``, or with a budget
            the first of ``concat``, ``maxpool1d``, ``bilinear``, ``avgpool2d`` that fits.
        max_visual_tokens: the most visual tokens the video may take (see
            :func:`mmconnect.video.plan_video_tokens`).
        template: the chat template the model was trained with.
        max_new_tokens: the longest answer.

    Raises:
        FileNotFoundError: a video path that does not exist.
        ValueError: an unreadable video (:class:`~mmconnect.integrations.chat.video_io.VideoReadError`),
            zero frames requested, a budget too small for one frame, a bad argument.
        TypeError: a model of no Dense family, or an argument of the wrong type (a float or
            str count, a question that is not a str).
    """
    generation_model(model)  # a Dense family's generation model, or a TypeError naming it
    # Bad arguments fail before a frame is decoded.
    _question_turn(question)
    check_positive_int(num_frames, "num_frames")
    if pooling is not None:
        check_choice(pooling, "pooling", POOLINGS, hint="or None to choose by the budget")
    check_optional_int(max_visual_tokens, "max_visual_tokens", minimum=1)
    check_positive_int(max_new_tokens, "max_new_tokens")
    opened = isinstance(video, str | Path | VideoSource)
    if opened:
        source = video if isinstance(video, VideoSource) else open_video(video)
        total = source.total_frames
    else:
        images = _as_images(video, "video")
        if not images:
            raise ValueError("video is empty: it holds no frames")
        total = len(images)
    plan = plan_for_model(
        model,
        num_frames=num_frames,
        total_frames=total,
        pooling=pooling,
        max_visual_tokens=max_visual_tokens,
    )
    if opened:
        frames = source.sample(plan.num_frames)
        indices, images = frames.indices, frames.to_pil()
    else:
        given = video.indices if isinstance(video, VideoFrames) else tuple(range(total))
        if plan.num_frames < total:
            picked = sample_frame_indices(total, plan.num_frames)
            images = [images[index] for index in picked]
            given = tuple(given[index] for index in picked)
        indices = given
        if isinstance(video, VideoFrames):
            total = video.total_frames
    pixels = frame_pixel_values(model, processor.image_processor, images)
    visual = encode_video(model, pixels, plan.pooling)
    embeds, mask = prompt_embeddings(model, processor.tokenizer, question, visual, template)
    text = generate_answer(
        model, processor.tokenizer, embeds, mask, template=template, max_new_tokens=max_new_tokens
    )
    return ChatAnswer(
        text=text,
        num_visual_tokens=visual.shape[1],
        frame_indices=tuple(indices),
        total_frames=total,
        pooling=plan.pooling,
    )


def answer_image(
    model: Any,
    processor: Any,
    image: str | Path | Image.Image,
    question: str,
    *,
    template: str | ChatTemplate = DEFAULT_TEMPLATE,
    max_new_tokens: int = 32,
) -> ChatAnswer:
    """Answer ``question`` about one image through the model's full image path.

    Raises:
        ValueError: the image file is missing or unreadable, or a bad question.
    """
    generation_model(model)  # a Dense family's generation model, or a TypeError naming it
    check_positive_int(max_new_tokens, "max_new_tokens")
    if isinstance(image, str | Path):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a path or a PIL image, got {type(image).__name__}")
    visual = encode_image(model, processor.image_processor, image.convert("RGB"))
    embeds, mask = prompt_embeddings(model, processor.tokenizer, question, visual, template)
    text = generate_answer(
        model, processor.tokenizer, embeds, mask, template=template, max_new_tokens=max_new_tokens
    )
    return ChatAnswer(text=text, num_visual_tokens=visual.shape[1])


def load_chat_model(directory: str | Path) -> tuple[Any, Any]:
    """A saved Dense model of any registered family and its processor from ``directory``, in
    eval mode.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: it holds no Dense model (its ``model_type`` is no registered family's) or no
            processor.
    """
    # Importing this module imported mmconnect.integrations, which registered every family.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {str(directory)!r}")
    config_file = directory / "config.json"
    model_type = (
        json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    )
    if model_type not in list_families():
        raise ValueError(
            f"{str(directory)!r} holds no Dense model (config.json model_type is "
            f"{model_type!r}; expected one of the registered families: "
            f"{', '.join(list_families())})"
        )
    if not (directory / "processor_config.json").is_file():
        raise ValueError(
            f"{str(directory)!r} holds no processor (processor_config.json); save the model's "
            "processor there with processor.save_pretrained(directory)"
        )
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    return model, processor
