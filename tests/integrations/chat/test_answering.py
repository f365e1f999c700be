"""Video and image chat with Dense LLaVA / LLaVA-NeXT (:mod:`mmconnect.integrations.chat.answering`)
and ``mmconnect chat``.

Tiny models from configs (tests/support/chat_toys.py): a CLIP tower (width 16, 4 blocks, 56 px
images of 14 px patches, so a 4 x 4 grid of 16 tokens per frame), a 2-layer Llama (width 32) and
a word-level tokenizer over the vicuna_v1 prompt and a few question words. Weights are random:
answers are whatever greedy decoding gives, checked against a hand-written greedy loop over the
same embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from mmconnect.integrations.chat.answering import (
    answer_image,
    answer_video,
    encode_image,
    encode_video,
    frame_features,
    frame_layout,
    frame_pixel_values,
    load_chat_model,
    prompt_embeddings,
)
from mmconnect.integrations.chat.video_io import VideoReadError
from mmconnect.integrations.cli import main
from mmconnect.integrations.families.llava import (
    DenseLlavaForConditionalGeneration,
    DenseLlavaProcessor,
)
from mmconnect.integrations.families.llava_next import (
    DenseLlavaNextForConditionalGeneration,
    DenseLlavaNextProcessor,
)
from mmconnect.integrations.training.data import ConversationEncoder, Turn
from mmconnect.video import POOLINGS, count_video_tokens, sample_frame_indices
from tests.support import chat_toys
from tests.support.chat_toys import (
    DCI,
    LLM,
    QUESTION,
    SIZE,
    STI,
    TOKENS,
    frames,
    greedy,
    write_mp4,
)


@pytest.fixture(scope="module")
def tokenizer():
    return chat_toys.tokenizer()


@pytest.fixture(scope="module")
def llava(tokenizer):
    return chat_toys.llava(tokenizer, DCI), chat_toys.llava_processor(tokenizer, DCI)


@pytest.fixture(scope="module")
def llava_next(tokenizer):
    return chat_toys.llava_next(tokenizer, DCI), chat_toys.llava_next_processor(tokenizer, DCI)


@pytest.fixture(params=["llava", "llava_next"])
def chat_model(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------- the image path per frame


def test_frame_layout(llava, tokenizer):
    assert frame_layout(llava[0]) == (TOKENS, (4, 4))
    assert frame_layout(chat_toys.llava(tokenizer, STI)) == (TOKENS + 4, None)


def test_dense_llava_frames_go_through_the_image_path(llava):
    model, processor = llava
    pictures = frames(3)
    pixels = frame_pixel_values(model, processor.image_processor, pictures)
    assert pixels.shape == (3, 3, SIZE, SIZE)
    expected = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, expected)
    with torch.no_grad():
        one_by_one = [
            model.model.get_image_features(pixels[i : i + 1]).pooler_output[0] for i in range(3)
        ]
    assert_close(encode_video(model, pixels, "concat")[0], torch.cat(one_by_one))


def test_dense_llava_next_frames_use_their_base_crop(llava_next):
    model, processor = llava_next
    pictures = frames(2)
    pixels = frame_pixel_values(model, processor.image_processor, pictures)
    full = processor.image_processor(images=pictures, return_tensors="pt")  # all AnyRes crops
    assert torch.equal(pixels, full["pixel_values"][:, 0])  # the base crop, whatever the tiles
    features = frame_features(model, pixels)
    assert features.shape == (2, TOKENS, LLM)
    with torch.no_grad():
        anyres = model.model.get_image_features(full["pixel_values"], full["image_sizes"])
    for frame, packed in zip(features, anyres.pooler_output, strict=True):
        assert_close(frame, packed[:TOKENS])  # packed image = [base grid, tiles + newlines]


def test_one_frame_enters_the_llm_exactly_like_an_image(llava, tokenizer):
    """The placeholder splice equals the model's own image-token merge."""
    model, processor = llava
    pixels = frame_pixel_values(model, processor.image_processor, frames(1))
    visual = encode_video(model, pixels, "concat")
    embeds, mask = prompt_embeddings(model, tokenizer, QUESTION, visual)
    encoder = ConversationEncoder(
        "vicuna_v1", tokenizer, image_tokens=TOKENS, image_token_id=model.config.image_token_id
    )
    ids = torch.tensor([encoder.encode([Turn("human", f"<image>\n{QUESTION}")]).input_ids])
    assert embeds.shape == (1, ids.shape[1], LLM) and torch.equal(mask, torch.ones_like(ids))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        ours = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_prompt_is_the_training_format(llava, tokenizer):
    model, _ = llava
    visual = torch.zeros(1, 5, LLM)
    embeds, _ = prompt_embeddings(model, tokenizer, f"{QUESTION}\n<image>", visual)
    encoder = ConversationEncoder(
        "vicuna_v1", tokenizer, image_tokens=1, image_token_id=model.config.image_token_id
    )
    ids = encoder.encode([Turn("human", f"{QUESTION}\n<image>")]).input_ids
    assert tokenizer.decode(ids[:3]) == "<s> A chat"
    assert embeds.shape[1] == len(ids) - 1 + 5
    where = ids.index(model.config.image_token_id)  # the placeholder stays where the user put it
    assert torch.equal(embeds[0, where : where + 5], visual[0])


# ---------------------------------------------------------------------------- generate


def test_answer_video_generates_greedily(chat_model, tokenizer):
    model, processor = chat_model
    answer = answer_video(model, processor, frames(6), QUESTION, num_frames=4, max_new_tokens=4)
    assert answer.frame_indices == tuple(sample_frame_indices(6, 4)) == (0, 1, 3, 4)
    assert answer.total_frames == 6 and answer.pooling == "concat"
    assert answer.num_visual_tokens == 4 * TOKENS
    picked = [frames(6)[index] for index in answer.frame_indices]
    pixels = frame_pixel_values(model, processor.image_processor, picked)
    embeds, _ = prompt_embeddings(model, tokenizer, QUESTION, encode_video(model, pixels))
    expected = greedy(model, embeds, tokenizer.eos_token_id, steps=4)
    assert answer.text == tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_generates(llava, pooling):
    model, processor = llava
    answer = answer_video(model, processor, frames(8), QUESTION, pooling=pooling, max_new_tokens=2)
    assert answer.pooling == pooling and len(answer.frame_indices) == 8
    assert answer.num_visual_tokens == count_video_tokens(8, TOKENS, pooling, (4, 4))
    assert isinstance(answer.text, str)


def test_budget_picks_frames_and_pooling(llava):
    model, processor = llava
    # 8 frames: concat 128 > 100, maxpool1d 64 fits
    answer = answer_video(model, processor, frames(8), QUESTION, max_visual_tokens=100)
    assert (answer.pooling, answer.num_visual_tokens) == ("maxpool1d", 64)
    # only concat allowed: 6 frames of 16 tokens
    answer = answer_video(
        model, processor, frames(8), QUESTION, pooling="concat", max_visual_tokens=100
    )
    assert answer.num_visual_tokens == 96
    assert answer.frame_indices == tuple(sample_frame_indices(8, 6))


def test_answer_video_from_an_mp4_file(llava, tmp_path):
    model, processor = llava
    path = write_mp4(tmp_path / "clip.mp4")
    answer = answer_video(model, processor, path, QUESTION, num_frames=5, pooling="mean")
    assert answer.frame_indices == tuple(sample_frame_indices(12, 5))
    assert answer.total_frames == 12 and answer.num_visual_tokens == TOKENS


def test_sti_frames_use_the_1d_poolings(tokenizer, llava):
    model = chat_toys.llava(tokenizer, STI)
    processor = llava[1]
    answer = answer_video(model, processor, frames(4), QUESTION, pooling="maxpool1d")
    assert answer.num_visual_tokens == 4 * (20 // 2)
    with pytest.raises(ValueError, match="avgpool2d pools each frame's 2-D token grid"):
        answer_video(model, processor, frames(4), QUESTION, pooling="avgpool2d")


def test_answer_image_uses_the_full_image_path(chat_model, tokenizer):
    model, processor = chat_model
    picture = frames(1, seed=5)[0]
    answer = answer_image(model, processor, picture, QUESTION, max_new_tokens=3)
    visual = encode_image(model, processor.image_processor, picture)
    if isinstance(model, DenseLlavaNextForConditionalGeneration):
        assert visual.shape[1] == model.model.image_token_count((60, 80))  # AnyRes: tiles too
    else:
        assert visual.shape[1] == TOKENS
    assert answer.num_visual_tokens == visual.shape[1] and answer.pooling is None
    embeds, _ = prompt_embeddings(model, tokenizer, QUESTION, visual)
    expected = greedy(model, embeds, tokenizer.eos_token_id, steps=3)
    assert answer.text == tokenizer.decode(expected, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------- bad input


def test_bad_chat_input(llava, tokenizer, tmp_path):
    model, processor = llava
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 0"):
        answer_video(model, processor, frames(4), QUESTION, num_frames=0)
    with pytest.raises(TypeError, match=r"num_frames must be a positive int, got '8' \(str\)"):
        answer_video(model, processor, frames(4), QUESTION, num_frames="8")
    with pytest.raises(TypeError, match=r"max_new_tokens must be a positive int, got 2.5"):
        answer_video(model, processor, frames(4), QUESTION, max_new_tokens=2.5)
    with pytest.raises(ValueError, match="max_tokens=3 is too small for even one frame"):
        answer_video(model, processor, frames(4), QUESTION, max_visual_tokens=3)
    with pytest.raises(ValueError, match="pooling must be one of"):
        answer_video(model, processor, frames(4), QUESTION, pooling="max")
    with pytest.raises(ValueError, match="question holds 2 <image> placeholders"):
        answer_video(model, processor, frames(2), "<image> <image> what?")
    with pytest.raises(ValueError, match="question must be a non-empty str, got '  '"):
        answer_video(model, processor, frames(2), "  ")
    with pytest.raises(TypeError, match=r"question must be a non-empty str, got None \(NoneType\)"):
        answer_video(model, processor, frames(2), None)
    with pytest.raises(ValueError, match="video is empty"):
        answer_video(model, processor, [], QUESTION)
    with pytest.raises(TypeError, match="video must be VideoFrames, a list of PIL images"):
        answer_video(model, processor, 42, QUESTION)
    with pytest.raises(FileNotFoundError, match="video not found"):
        answer_video(model, processor, tmp_path / "missing.mp4", QUESTION)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    with pytest.raises(VideoReadError, match="cannot open video"):
        answer_video(model, processor, broken, QUESTION)
    with pytest.raises(TypeError, match="model must be a DenseLlavaForConditionalGeneration"):
        answer_video(model.model, processor, frames(2), QUESTION)
    # 40 frames of 16 tokens do not fit the LLM's 512 positions
    with pytest.raises(ValueError, match="more than the LLM's max_position_embeddings=512"):
        answer_video(model, processor, frames(40), QUESTION, num_frames=40)
    with pytest.raises(ValueError, match="image file not found"):
        answer_image(model, processor, tmp_path / "missing.png", QUESTION)


# ---------------------------------------------------------------------------- saved models and the CLI


@pytest.fixture(scope="module")
def saved(llava, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("chat_model")
    model, processor = llava
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_load_chat_model(saved, llava, tmp_path):
    model, processor = load_chat_model(saved)
    assert isinstance(model, DenseLlavaForConditionalGeneration) and not model.training
    assert isinstance(processor, DenseLlavaProcessor)
    assert torch.equal(model.connector.projector[0].weight, llava[0].connector.projector[0].weight)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_chat_model(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(
        ValueError,
        match=r"holds no Dense model .*'llama'.*dense_llava, dense_llava_next, .*dense_mgm",
    ):
        load_chat_model(tmp_path)


def test_cli_chat_with_a_saved_llava_next(llava_next, tmp_path, capsys):
    model, processor = llava_next
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    loaded, loaded_processor = load_chat_model(tmp_path / "model")
    assert isinstance(loaded, DenseLlavaNextForConditionalGeneration)
    assert isinstance(loaded_processor, DenseLlavaNextProcessor)
    path = write_mp4(tmp_path / "clip.mp4", count=5)
    command = ["chat", "--model", str(tmp_path / "model"), "--video", str(path), "--frames", "3"]
    assert main([*command, QUESTION]) == 0
    expected = answer_video(loaded, loaded_processor, path, QUESTION, num_frames=3)
    captured = capsys.readouterr()
    assert captured.out == expected.text + "\n"
    assert captured.err.strip().endswith("3 of 5 frames [0, 2, 3], concat, 48 visual tokens")


def test_load_chat_model_needs_the_processor(llava, tmp_path):
    llava[0].save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no processor"):
        load_chat_model(tmp_path)


def test_cli_chat_about_a_video(saved, tmp_path, capsys):
    path = write_mp4(tmp_path / "clip.mp4")
    assert (
        main(["chat", "--model", str(saved), "--video", str(path), "--frames", "4", QUESTION]) == 0
    )
    captured = capsys.readouterr()
    model, processor = load_chat_model(saved)
    expected = answer_video(model, processor, path, QUESTION, num_frames=4)
    assert captured.out == expected.text + "\n"
    assert captured.err.strip().endswith("4 of 12 frames [1, 4, 7, 9], concat, 64 visual tokens")


def test_cli_chat_with_a_budget(saved, tmp_path, capsys):
    path = write_mp4(tmp_path / "clip.mp4")
    command = ["chat", "--model", str(saved), "--video", str(path), "--max-visual-tokens", "40"]
    assert main([*command, "--pooling", "avgpool2d", QUESTION]) == 0
    assert "8 of 12 frames" in capsys.readouterr().err  # 8 x 4 = 32 tokens fit 40


def test_cli_chat_about_an_image(saved, tmp_path, capsys):
    path = tmp_path / "picture.png"
    frames(1)[0].save(path)
    assert main(["chat", "--model", str(saved), "--image", str(path), QUESTION]) == 0
    model, processor = load_chat_model(saved)
    expected = answer_image(model, processor, path, QUESTION)
    assert capsys.readouterr().out == expected.text + "\n"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--video", "{tmp}/missing.mp4"], "video not found"),
        (["--video", "{tmp}/broken.mp4"], "cannot open video"),
        (
            ["--video", "{tmp}/clip.mp4", "--max-visual-tokens", "3"],
            "max_tokens=3 is too small for even one frame",
        ),
        (["--video", "{tmp}/clip.mp4", "--pooling", "max"], "--pooling must be one of"),
        (["--video", "{tmp}", "--frames", "2"], "holds no frame images"),
        (["--image", "{tmp}/clip.mp4", "--frames", "2"], "--frames apply to --video only"),
        (["--image", "{tmp}/missing.png"], "image file not found"),
        (["--video", "{tmp}/clip.mp4", "--template", "alpaca"], "unknown chat template 'alpaca'"),
    ],
)
def test_cli_chat_errors(saved, tmp_path, capsys, options, message):
    write_mp4(tmp_path / "clip.mp4", count=3)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    arguments = [option.replace("{tmp}", str(tmp_path)) for option in options]
    assert main(["chat", "--model", str(saved), *arguments, QUESTION]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mmconnect chat: ") and message in last


@pytest.mark.parametrize("option", ["--frames", "--max-visual-tokens", "--max-new-tokens"])
def test_cli_chat_counts_below_one_are_refused_by_the_parser(tmp_path, capsys, option):
    command = ["chat", "--model", str(tmp_path), "--video", str(tmp_path), option, "0", QUESTION]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    assert f"argument {option}: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_cli_chat_needs_a_model_directory(tmp_path, capsys):
    path = write_mp4(tmp_path / "clip.mp4", count=2)
    assert main(["chat", "--model", str(tmp_path / "none"), "--video", str(path), "hi"]) == 2
    assert "mmconnect chat: model directory not found" in capsys.readouterr().err


def test_cli_chat_needs_exactly_one_of_video_and_image(saved, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(saved), "--video", "a.mp4", "--image", "b.png", "hi"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------- any family


def test_mini_gemini_answers_through_the_family_protocol():
    """Chat reaches a family only through the protocol: a Dense Mini-Gemini (HR image in, CLIP
    view + patch info mining inside) answers about images and videos with no chat code of its
    own; each frame goes through its full image path."""
    from transformers import CLIPImageProcessor

    from mmconnect.integrations.applications.tiny_models import tiny_llava_tokenizer
    from mmconnect.integrations.families.mini_gemini import DenseMGMProcessor
    from tests.support.mini_gemini_toys import build

    model = build("dc-dci-clip-l-336-efficient")  # 144 tokens per image: two frames fit 512
    processor = DenseMGMProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 768}, crop_size={"height": 768, "width": 768}
        ),
        tokenizer=tiny_llava_tokenizer(),
        patch_size=14,
        connector=model.connector.config,
        image_size=336,
        image_size_aux=768,
    )
    assert frame_layout(model) == (144, (12, 12))
    pixels = frame_pixel_values(model, processor.image_processor, frames(2))
    assert pixels.shape == (2, 3, 768, 768)
    features = frame_features(model, pixels)
    with torch.no_grad():
        one_by_one = [model.model.get_image_features(p[None]).pooler_output[0] for p in pixels]
    assert torch.equal(features, torch.stack(one_by_one))
    video = answer_video(model, processor, frames(2), QUESTION, max_new_tokens=2)
    assert video.num_visual_tokens == 2 * 144 and isinstance(video.text, str)
    image = answer_image(model, processor, frames(1)[0], QUESTION, max_new_tokens=2)
    assert image.num_visual_tokens == model.model.image_token_count() == 144
