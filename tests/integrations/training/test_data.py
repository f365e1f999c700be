"""LLaVA data: records, chat templates, turn-by-turn labels, validation, dataset and collator.

Tokenizers are built here (nothing downloaded): a byte-level tokenizer without merges (one token
per byte, so decoding gives back the exact text) with the templates' markers as special tokens,
and character-level SentencePiece-like ones for the word-boundary checks. Images are written to
``tmp_path``; the image processor is a 56-pixel CLIP processor.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("PIL")

from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from mmconnect.integrations.training.data import (
    IGNORE_INDEX,
    ChatTemplate,
    ConversationEncoder,
    DataCollator,
    LlavaDataset,
    LlavaRecord,
    Turn,
    ValidationReport,
    get_template,
    list_templates,
    load_image,
    load_llava_json,
    parse_llava_records,
    register_template,
    validate_records,
)

SIZE = 56
IMAGE_TOKENS = 5
MARKERS = [
    "<image>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|im_start|>",
    "<|im_end|>",
]
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


# ---------------------------------------------------------------------------- builders


def byte_tokenizer(eos: str = "</s>", bos: str | None = "<s>") -> PreTrainedTokenizerFast:
    """One token per byte (no merges) + special tokens: ``decode(encode(text)) == text``."""
    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>"
    )
    tokenizer.add_tokens(MARKERS, special_tokens=True)
    return tokenizer


def sentencepiece_like(*, legacy: bool) -> PreTrainedTokenizerFast:
    """Characters with SentencePiece's ``▁`` word marker: ``legacy`` prepends it to every piece it
    encodes (Llama-2 / Vicuna's legacy normalizer), otherwise ``Metaspace``."""
    chars = ["▁", "\n", *(chr(c) for c in range(33, 127))]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if legacy:
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )


def write_image(path, size=(40, 30), color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def human(value: str) -> dict:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


def raw(record_id, *turns, image: str | None = None) -> dict:
    data = {"id": record_id, "conversations": list(turns)}
    if image is not None:
        data["image"] = image
    return data


def record(record_id, *turns, image: str | None = None) -> LlavaRecord:
    return LlavaRecord.from_dict(raw(record_id, *turns, image=image))


#: Two exchanges about one image.
CHAT = record(
    "chat",
    human("<image>\nWhat is this?"),
    gpt("A cat."),
    human("What colour?"),
    gpt("Red."),
    image="cat.png",
)
CAPTION = record("cap", human("Describe the image.\n<image>"), gpt("A red cat."), image="cat.png")
TEXT_ONLY = record("text", human("Say hi."), gpt("Hi!"))


def supervised_spans(tokenizer, encoded) -> list[str]:
    """Decoded runs of supervised positions (labels != -100), in order."""
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def decode_without_images(tokenizer, encoded, image_id: int) -> str:
    """The encoded text with each image's token run shown as one ``<image>``."""
    ids = list(encoded.input_ids)
    for start, end in reversed(encoded.image_spans):
        assert ids[start:end] == [image_id] * (end - start)
        ids[start:end] = [image_id]
    return tokenizer.decode(ids)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def image_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


@pytest.fixture(scope="module")
def processor():
    return image_processor()


def encoder(tokenizer, template, image_id, max_length=None, image_tokens=IMAGE_TOKENS):
    return ConversationEncoder(
        template,
        tokenizer,
        image_tokens=image_tokens,
        image_token_id=image_id,
        max_length=max_length,
    )


def dataset(records, folder, tokenizer, image_id, template="vicuna_v1", **kwargs) -> LlavaDataset:
    options = {
        "image_folder": folder,
        "template": template,
        "tokenizer": tokenizer,
        "image_processor": image_processor(),
        "image_tokens": IMAGE_TOKENS,
        "image_token_id": image_id,
        **kwargs,
    }
    return LlavaDataset(records, **options)


# ---------------------------------------------------------------------------- templates


def test_registry_holds_exactly_the_four_templates():
    assert list_templates() == ["chatml", "llama_3", "plain", "vicuna_v1"]
    assert get_template(get_template("plain")) is get_template("plain")
    with pytest.raises(ValueError, match=r"unknown chat template 'vicuna'.*chatml, llama_3"):
        get_template("vicuna")
    with pytest.raises(ValueError, match="already registered"):
        register_template(get_template("plain"))
    assert list_templates() == ["chatml", "llama_3", "plain", "vicuna_v1"]


def test_template_fields_are_checked():
    with pytest.raises(ValueError, match=r"user_format must contain \{content\}"):
        ChatTemplate(name="bad", user_format="USER:", answer_end="</s>")
    with pytest.raises(ValueError, match="answer_end must be non-empty"):
        ChatTemplate(name="bad", user_format="{content}", answer_end="")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("plain").answer_end = "x"
    with pytest.raises(ValueError, match="name must be a non-empty str, got ''"):
        ChatTemplate(name="", user_format="{content}", answer_end="</s>")
    with pytest.raises(TypeError, match=r"answer_end must be a str, got None \(NoneType\)"):
        ChatTemplate(name="bad", user_format="{content}", answer_end=None)
    with pytest.raises(TypeError, match=r"add_bos must be a bool \(True or False\), got 'no'"):
        ChatTemplate(name="bad", user_format="{content}", answer_end="</s>", add_bos="no")


def test_turn_fields_are_checked():
    with pytest.raises(ValueError, match=r"role must be one of \('human', 'gpt'\), got 'user'"):
        Turn("user", "Q")
    with pytest.raises(TypeError, match=r"value must be a str, got 3 \(int\)"):
        Turn("human", 3)


#: template -> (rendered CHAT with the tokenizer's BOS, its supervised spans).
EXPECTED = {
    # the second human turn holds no image, so plain renders nothing for it
    "plain": ("<s><image>A cat.\nRed.\n", ["A cat.\nRed.\n"]),
    "vicuna_v1": (
        f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
        "USER: What colour? ASSISTANT: Red.</s>",
        [" A cat.</s>", " Red.</s>"],
    ),
    "llama_3": (
        "<s><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat colour?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>",
        ["A cat.<|eot_id|>", "Red.<|eot_id|>"],
    ),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
        "A cat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n",
        ["A cat.<|im_end|>", "Red.<|im_end|>"],
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multi_turn_rendering_and_exact_label_masks(tokenizer, image_id, name):
    text, spans = EXPECTED[name]
    encoded = encoder(tokenizer, name, image_id)(CHAT.conversations)
    assert decode_without_images(tokenizer, encoded, image_id) == text
    assert supervised_spans(tokenizer, encoded) == spans
    assert get_template(name).render(CHAT.conversations) == text.removeprefix("<s>")
    assert len(encoded.input_ids) == len(encoded.labels)
    assert encoded.num_supervised == sum(len(tokenizer.encode(s)) for s in spans)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_image_placeholder_becomes_image_tokens_never_supervised(tokenizer, image_id, name):
    encoded = encoder(tokenizer, name, image_id, image_tokens=7)(CAPTION.conversations)
    ids, labels = torch.tensor(encoded.input_ids), torch.tensor(encoded.labels)
    assert int((ids == image_id).sum()) == 7
    (start, end), *rest = encoded.image_spans
    assert not rest and end - start == 7
    assert ids[start:end].tolist() == [image_id] * 7
    assert (labels[start:end] == IGNORE_INDEX).all()


def test_plain_keeps_only_the_image_of_the_human_turn(tokenizer, image_id):
    encoded = encoder(tokenizer, "plain", image_id)(CAPTION.conversations)
    assert decode_without_images(tokenizer, encoded, image_id) == "<s><image>A red cat.\n"
    assert supervised_spans(tokenizer, encoded) == ["A red cat.\n"]
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.image_spans == ((1, 1 + IMAGE_TOKENS),)


TEXT_ONLY_ANSWER = {
    "plain": "Hi!\n",
    "vicuna_v1": " Hi!</s>",
    "llama_3": "Hi!<|eot_id|>",
    "chatml": "Hi!<|im_end|>",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_text_only_sample_has_no_image_tokens(tokenizer, image_id, name):
    encoded = encoder(tokenizer, name, image_id)(TEXT_ONLY.conversations)
    assert image_id not in encoded.input_ids and encoded.image_spans == ()
    assert supervised_spans(tokenizer, encoded) == [TEXT_ONLY_ANSWER[name]]


def test_bos_only_where_the_template_wants_it_and_the_tokenizer_has_one(image_id):
    with_bos, without_bos = byte_tokenizer(), byte_tokenizer(bos=None)
    for name in ("plain", "vicuna_v1", "llama_3"):
        assert encoder(with_bos, name, image_id).encode(TEXT_ONLY.conversations).input_ids[0] == 1
        assert (
            encoder(without_bos, name, image_id).encode(TEXT_ONLY.conversations).input_ids[0] != 1
        )
    assert encoder(with_bos, "chatml", image_id).encode(TEXT_ONLY.conversations).input_ids[0] != 1


def test_end_marker_comes_from_the_tokenizer(image_id):
    tokenizer = byte_tokenizer(eos="<|endoftext|>")
    encoded = encoder(tokenizer, "vicuna_v1", image_id)(CHAT.conversations)
    assert supervised_spans(tokenizer, encoded) == [" A cat.<|endoftext|>", " Red.<|endoftext|>"]
    custom = dataclasses.replace(get_template("llama_3"), answer_end="<|endoftext|>")
    encoded = encoder(tokenizer, custom, image_id)(CHAT.conversations)
    assert supervised_spans(tokenizer, encoded) == ["A cat.<|endoftext|>", "Red.<|endoftext|>"]


def test_end_marker_the_tokenizer_cannot_encode_is_refused(image_id):
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match=r"template 'plain': answer_end '\\n' encodes to no token"):
        encoder(words, "plain", image_id)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-prepend", "metaspace"])
def test_answers_tokenize_as_in_the_joint_text(legacy):
    """Segment-wise encoding of a text-only vicuna chat equals encoding the rendered text at once,
    also for tokenizers that mark a word start on every piece they encode."""
    tokenizer = sentencepiece_like(legacy=legacy)
    chat = record("t", human("Hi there"), gpt("Hello you"), human("Bye"), gpt("Bye now"))
    encoded = encoder(tokenizer, "vicuna_v1", image_id=99)(chat.conversations)
    joint = tokenizer.encode(get_template("vicuna_v1").render(chat.conversations))
    assert list(encoded.input_ids) == [tokenizer.bos_token_id, *joint]
    supervised = [
        t
        for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.convert_ids_to_tokens(supervised) == [
        *"▁Hello▁you",
        "</s>",
        *"▁Bye▁now",
        "</s>",
    ]


# ---------------------------------------------------------------------------- truncation


def test_truncation_keeps_max_length_tokens(tokenizer, image_id):
    full = encoder(tokenizer, "vicuna_v1", image_id).encode(CHAT.conversations)
    max_length = len(full) - 3
    encoded = encoder(tokenizer, "vicuna_v1", image_id, max_length=max_length)(CHAT.conversations)
    assert encoded.input_ids == full.input_ids[:max_length]
    assert encoded.labels == full.labels[:max_length]
    assert supervised_spans(tokenizer, encoded) == [" A cat.</s>", " Re"]


def test_truncation_that_removes_all_supervision_is_refused(tokenizer, image_id):
    full = encoder(tokenizer, "vicuna_v1", image_id).encode(CHAT.conversations)
    first = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    with pytest.raises(ValueError, match=rf"max_length={first} leaves no supervised token"):
        encoder(tokenizer, "vicuna_v1", image_id, max_length=first)(CHAT.conversations)
    # just enough for one answer token
    assert (
        encoder(tokenizer, "vicuna_v1", image_id, max_length=first + 1)(
            CHAT.conversations
        ).num_supervised
        == 1
    )


def test_truncation_through_image_tokens_is_refused(tokenizer, image_id):
    chat = record("late", human("Look: <image>"), gpt("Ok."), image="x.png")
    full = encoder(tokenizer, "llama_3", image_id).encode(chat.conversations)
    ((start, end),) = full.image_spans
    problem = full.truncation_problem(end - 1)
    assert problem is not None and "no supervised token" in problem  # the answer comes later
    # an answer before the image: the cut keeps supervision but not the image's tokens
    chat = record("late", human("Hi"), gpt("Hey."), human("<image>"), gpt("Ok."), image="x.png")
    full = encoder(tokenizer, "llama_3", image_id).encode(chat.conversations)
    ((start, end),) = full.image_spans
    with pytest.raises(
        ValueError, match=rf"cuts the image tokens at positions {start}\.\.{end - 1}"
    ):
        full.truncate(start + 2)
    assert full.truncation_problem(end) is None


# ---------------------------------------------------------------------------- records


def test_load_llava_json_round_trip(tmp_path):
    data = [
        raw(1, human("<image>\nQ"), gpt("A"), image="a/b.png"),
        {**raw("t", human("Q"), gpt("A")), "model": "extra keys are ignored"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    records = load_llava_json(path)
    assert records[0] == LlavaRecord(
        id="1", conversations=(Turn("human", "<image>\nQ"), Turn("gpt", "A")), image="a/b.png"
    )
    assert records[1].image is None and records[1].num_images == 0
    assert [r.to_dict() for r in records] == [
        {**data[0], "id": "1"},
        raw("t", human("Q"), gpt("A")),
    ]


def test_records_built_in_code_are_checked_too():
    assert LlavaRecord(id=7, conversations=[Turn("human", "Q"), Turn("gpt", "A")]).id == "7"
    with pytest.raises(ValueError, match=r"role must be one of \('human', 'gpt'\), got 'user'"):
        Turn("user", "Q")
    with pytest.raises(ValueError, match=r"record \(id 'x'\): .*no assistant \('gpt'\) turn"):
        LlavaRecord(id="x", conversations=(Turn("human", "Q"),))
    with pytest.raises(ValueError, match=r"'image' must be one image path"):
        LlavaRecord(id="x", conversations=(Turn("human", "Q"), Turn("gpt", "A")), image="")


NOT_LLAVA = {
    "top-level object": ('{"id": "x", "conversations": []}', r"expected a JSON list .* got dict"),
    "invalid JSON": ('[{"id": "x", ', r"not valid JSON"),
    "record not an object": ('["hello"]', r"record 0: expected a JSON object, got str"),
    "no id": (json.dumps([{"conversations": [human("Q"), gpt("A")]}]), r"record 0: has no 'id'"),
    "no conversations": (
        json.dumps([{"id": "r7"}]),
        r"record 0 \(id 'r7'\): has no 'conversations'",
    ),
    "conversations not a list": (
        json.dumps([{"id": "r7", "conversations": "Q A"}]),
        r"record 0 \(id 'r7'\): 'conversations' must be a non-empty list",
    ),
    "unknown role": (
        json.dumps([raw("r7", human("Q"), {"from": "user", "value": "A"})]),
        r"record 0 \(id 'r7'\): conversations\[1\]\['from'\] must be one of \('human', 'gpt'\), "
        r"got 'user'",
    ),
    "value not a string": (
        json.dumps([raw("ok", human("Q"), gpt("A")), raw("r7", human("Q"), gpt(3))]),
        r"1 of 2 records .*record 1 \(id 'r7'\): conversations\[1\]\['value'\] must be a string",
    ),
    "turn without value": (
        json.dumps([raw("r7", human("Q"), {"from": "gpt"})]),
        r"record 0 \(id 'r7'\): conversations\[1\] must be an object with 'from' and 'value'",
    ),
    "starts with gpt": (
        json.dumps([raw("r7", gpt("A"), human("Q"), gpt("A"))]),
        r"record 0 \(id 'r7'\): turns must alternate .* conversations\[0\] is 'gpt'",
    ),
    "two human turns in a row": (
        json.dumps([raw("r7", human("Q"), human("Q"), gpt("A"))]),
        r"conversations\[1\] is 'human'",
    ),
    "ends with a question": (
        json.dumps([raw("r7", human("Q"), gpt("A"), human("Q"))]),
        r"record 0 \(id 'r7'\): the conversation ends with an unanswered human turn",
    ),
    "image list": (
        json.dumps([raw("r7", human("<image>"), gpt("A"), image=["a.png", "b.png"])]),
        r"record 0 \(id 'r7'\): 'image' must be one image path .*multi-image",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_LLAVA))
def test_json_not_in_llava_format_is_refused(tmp_path, case):
    text, message = NOT_LLAVA[case]
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="(?s)" + re.escape(str(path)) + ".*" + message):
        load_llava_json(path)


def test_every_bad_record_is_named():
    data = [raw(f"r{i}", human("Q")) for i in range(12)]
    with pytest.raises(ValueError, match=r"12 of 12 records") as error:
        parse_llava_records(data, source="mix.json")
    message = str(error.value)
    assert "record 9 (id 'r9')" in message and "record 10 (id" not in message
    assert "... and 2 more" in message


def test_conversation_without_assistant_turn_is_refused(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([raw("q1", human("<image>\nWhat is this?"), image="a.png")]))
    with pytest.raises(ValueError, match=r"record 0 \(id 'q1'\): .*no assistant \('gpt'\) turn"):
        load_llava_json(path)
    with pytest.raises(ValueError, match=r"record 0 \(id 'q1'\): .*no assistant"):
        LlavaRecord.from_dict(raw("q1", human("Q"), human("Q")), index=0)


def test_data_file_that_is_not_utf8_json_is_named(tmp_path):
    data = json.dumps([raw("r1", human("Q"), gpt("café"))], ensure_ascii=False)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(data.encode("latin-1"))
    assert data.index("é") == 94  # the byte the message names
    with pytest.raises(ValueError) as error:
        load_llava_json(latin1)
    assert str(error.value) == (
        f"data file {str(latin1)!r} is not UTF-8 text (byte 94: invalid continuation byte); "
        "save it as UTF-8 JSON"
    )
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(data.encode("utf-16"))
    with pytest.raises(ValueError, match=re.escape(repr(str(utf16))) + " is not UTF-8 text"):
        load_llava_json(utf16)
    with_bom = tmp_path / "bom.json"  # what Windows editors write: still UTF-8, accepted
    with_bom.write_bytes(b"\xef\xbb\xbf" + data.encode("utf-8"))
    assert load_llava_json(with_bom)[0].conversations[1].value == "café"


def test_data_path_that_is_a_directory_or_missing(tmp_path):
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path))) + " is a directory"):
        load_llava_json(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(tmp_path / "no.json")))):
        load_llava_json(tmp_path / "no.json")
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path))) + " is a directory"):
        load_image(tmp_path)


def test_empty_data_set_is_refused(tmp_path, tokenizer, image_id):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": the data set is empty"):
        load_llava_json(path)
    with pytest.raises(ValueError, match=r"records is empty: the data set has no records"):
        dataset([], tmp_path, tokenizer, image_id)
    with pytest.raises(ValueError, match=r"records is empty"):
        validate_records(
            [], image_folder=tmp_path, template="plain", tokenizer=tokenizer, image_tokens=1
        )


# ---------------------------------------------------------------------------- bad samples


def test_missing_image_names_record_and_path(tmp_path, tokenizer, image_id):
    data = dataset(
        [record("m1", human("<image>\nQ"), gpt("A"), image="gone.png")],
        tmp_path,
        tokenizer,
        image_id,
    )
    path = str(tmp_path / "gone.png")
    with pytest.raises(
        ValueError, match=rf"record 0 \(id 'm1'\): image file not found: '{re.escape(path)}'"
    ):
        data[0]


def test_corrupt_image_names_record_and_path(tmp_path, tokenizer, image_id):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = dataset(
        [record("c1", human("<image>\nQ"), gpt("A"), image="bad.png")],
        tmp_path,
        tokenizer,
        image_id,
    )
    path = str(tmp_path / "bad.png")
    with pytest.raises(
        ValueError, match=rf"record 0 \(id 'c1'\): cannot read image '{re.escape(path)}'"
    ):
        data[0]


@pytest.mark.parametrize(
    ("turns", "image", "message"),
    [
        (
            [human("<image>\nQ <image>"), gpt("A")],
            "a.png",
            r"the human turns hold 2 <image> tag\(s\) but the record has 1 image\(s\) \('a.png'\)",
        ),
        (
            [human("<image>\nQ"), gpt("A")],
            None,
            r"the human turns hold 1 <image> tag\(s\) but the record has 0",
        ),
        (
            [human("Q"), gpt("A")],
            "a.png",
            r"the human turns hold 0 <image> tag\(s\) but the record has 1",
        ),
        ([human("<image>Q"), gpt("<image>")], "a.png", r"a gpt turn holds an <image> tag"),
    ],
    ids=["two-tags-one-image", "tag-without-image", "image-without-tag", "tag-in-answer"],
)
def test_image_tags_that_do_not_match_the_images_are_refused(
    tmp_path, tokenizer, image_id, turns, image, message
):
    write_image(tmp_path / "a.png")
    data = dataset([record("t1", *turns, image=image)], tmp_path, tokenizer, image_id)
    with pytest.raises(ValueError, match=r"record 0 \(id 't1'\): " + message):
        data[0]
    (problem,) = data.validate().problems
    assert (problem.record_id, problem.kind) == ("t1", "image_count")


def test_images_need_an_image_processor(tmp_path, tokenizer, image_id):
    with pytest.raises(ValueError, match=r"image_processor is None but 1 of 2 records"):
        dataset([CAPTION, TEXT_ONLY], tmp_path, tokenizer, image_id, image_processor=None)
    assert (
        dataset([TEXT_ONLY], tmp_path, tokenizer, image_id, image_processor=None)[0]["pixel_values"]
        is None
    )


def test_bad_arguments_are_named(tmp_path, tokenizer, image_id):
    with pytest.raises(ValueError, match=r"image_tokens must be a positive int, got 0"):
        dataset([TEXT_ONLY], tmp_path, tokenizer, image_id, image_tokens=0)
    with pytest.raises(ValueError, match=r"max_length must be a positive int, got -1"):
        dataset([TEXT_ONLY], tmp_path, tokenizer, image_id, max_length=-1)
    with pytest.raises(TypeError, match=r"image_token_id must be an int, got '<image>' \(str\)"):
        dataset([TEXT_ONLY], tmp_path, tokenizer, "<image>")
    with pytest.raises(TypeError, match=r"image_tokens must be a positive int, got 2.5 \(float\)"):
        dataset([TEXT_ONLY], tmp_path, tokenizer, image_id, image_tokens=2.5)
    with pytest.raises(TypeError, match=r"pad_to_square must be a bool \(True or False\), got 1"):
        dataset([TEXT_ONLY], tmp_path, tokenizer, image_id, pad_to_square=1)
    with pytest.raises(TypeError, match=r"records must be a sequence of LlavaRecord"):
        dataset(str(tmp_path / "data.json"), tmp_path, tokenizer, image_id)


# ---------------------------------------------------------------------------- validation


def test_validation_reports_every_problem_and_drops_nothing(tmp_path, tokenizer, image_id):
    write_image(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"garbage")
    long_question = "why " * 100
    records = [
        record("good", human("<image>\nQ"), gpt("A"), image="ok.png"),
        record("missing", human("<image>\nQ"), gpt("A"), image="nope.png"),
        record("broken", human("<image>\nQ"), gpt("A"), image="broken.jpg"),
        record("count", human("<image><image>"), gpt("A"), image="ok.png"),
        record("long", human(long_question), gpt("A")),
        TEXT_ONLY,
    ]
    folder = tmp_path / "img"
    report = validate_records(
        records,
        image_folder=folder,
        template="vicuna_v1",
        tokenizer=tokenizer,
        image_tokens=IMAGE_TOKENS,
        max_length=300,
    )
    assert isinstance(report, ValidationReport) and not report.ok
    assert report.num_records == 6
    assert [(p.index, p.record_id, p.kind, p.path) for p in report.problems] == [
        (1, "missing", "missing_image", str(folder / "nope.png")),
        (2, "broken", "unreadable_image", str(folder / "broken.jpg")),
        (3, "count", "image_count", str(folder / "ok.png")),
        (4, "long", "truncation", None),
    ]
    assert "cannot read image" in report.problems[1].reason
    assert "max_length=300 leaves no supervised token" in report.problems[3].reason
    assert report.counts() == {
        "missing_image": 1,
        "unreadable_image": 1,
        "image_count": 1,
        "truncation": 1,
    }
    assert report.bad_indices == {1, 2, 3, 4}
    assert [r.id for r in report.without_problems(records)] == ["good", "text"]
    summary = report.summary()
    assert summary.startswith("4 of 6 records have problems")
    for problem in report.problems:
        assert str(problem) in summary
    with pytest.raises(ValueError, match=r"(?s)4 of 6 records.*id 'missing'.*nope\.png"):
        report.raise_if_any()
    with pytest.raises(ValueError, match=r"id 'broken'"):
        validate_records(
            records,
            image_folder=folder,
            template="vicuna_v1",
            tokenizer=tokenizer,
            image_tokens=IMAGE_TOKENS,
            max_length=300,
            strict=True,
        )
    # without opening images only the counts and lengths are checked
    quick = validate_records(
        records,
        image_folder=folder,
        template="vicuna_v1",
        tokenizer=tokenizer,
        image_tokens=IMAGE_TOKENS,
        max_length=300,
        check_images=False,
    )
    assert [p.record_id for p in quick.problems] == ["count", "long"]
    # the data set validates with its own settings and agrees
    assert dataset(records, folder, tokenizer, image_id, max_length=300).validate() == report
    with pytest.raises(ValueError, match="records has 2 items but the report covers 6"):
        report.without_problems(records[:2])


def test_validation_of_clean_data(tmp_path, tokenizer, image_id):
    write_image(tmp_path / "cat.png")
    data = dataset([CHAT, CAPTION, TEXT_ONLY], tmp_path, tokenizer, image_id)
    report = data.validate(strict=True, progress=True)
    assert report.ok and report.problems == () and report.summary() == "all 3 records are valid"
    report.raise_if_any()


# ---------------------------------------------------------------------------- dataset + collator


def test_dataset_samples(tmp_path, tokenizer, image_id):
    write_image(tmp_path / "cat.png", size=(80, 60))
    data = dataset([CHAT, TEXT_ONLY], tmp_path, tokenizer, image_id)
    assert len(data) == 2 and data.template.answer_end == "</s>"
    sample = data[0]
    assert sample["input_ids"].dtype == torch.long and sample["labels"].dtype == torch.long
    assert sample["input_ids"].shape == sample["labels"].shape
    assert sample["input_ids"].ndim == 1
    assert int((sample["input_ids"] == image_id).sum()) == IMAGE_TOKENS
    assert sample["pixel_values"].shape == (3, SIZE, SIZE)
    assert sample["pixel_values"].dtype == torch.float32
    assert data[1]["pixel_values"] is None


def test_dataset_from_json(tmp_path, tokenizer, image_id):
    write_image(tmp_path / "cat.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([CHAT.to_dict(), TEXT_ONLY.to_dict()]))
    data = LlavaDataset.from_json(
        path,
        image_folder=tmp_path,
        template="chatml",
        tokenizer=tokenizer,
        image_processor=image_processor(),
        image_tokens=IMAGE_TOKENS,
        image_token_id=image_id,
    )
    assert data.records == [CHAT, TEXT_ONLY]
    assert torch.equal(
        data[1]["input_ids"],
        dataset([TEXT_ONLY], tmp_path, tokenizer, image_id, template="chatml")[0]["input_ids"],
    )


def test_pad_to_square_uses_the_mean_colour(tmp_path, tokenizer, image_id):
    write_image(tmp_path / "cat.png", size=(SIZE, SIZE // 2), color=(255, 0, 0))
    padded = dataset([CAPTION], tmp_path, tokenizer, image_id, pad_to_square=True)[0]
    cropped = dataset([CAPTION], tmp_path, tokenizer, image_id)[0]
    # the top rows are padding of the mean colour, which normalises to about 0
    assert padded["pixel_values"][:, :4].abs().max() < 0.05
    assert (cropped["pixel_values"][0, :4] > 1.5).all()  # red everywhere
    assert padded["pixel_values"][0, SIZE // 2].min() > 1.5


def test_collator_pads_and_stacks(tmp_path, tokenizer, image_id):
    write_image(tmp_path / "cat.png")
    write_image(tmp_path / "dog.png", size=(30, 50), color=(10, 200, 10))
    dog = record("dog", human("<image>\nAnd this?"), gpt("A dog."), image="dog.png")
    data = dataset([CHAT, TEXT_ONLY, dog], tmp_path, tokenizer, image_id)
    samples = [data[i] for i in range(3)]
    lengths = [len(s["input_ids"]) for s in samples]
    batch = DataCollator.from_tokenizer(tokenizer)(samples)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    longest = max(lengths)
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].shape == (3, longest) and batch[key].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, :n], sample["input_ids"])
        assert torch.equal(batch["labels"][row, :n], sample["labels"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    # the images of samples 0 and 2, in batch order
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch["pixel_values"][0], samples[0]["pixel_values"])
    assert torch.equal(batch["pixel_values"][1], samples[2]["pixel_values"])
    # image tokens in the batch == images x tokens per image
    assert int((batch["input_ids"] == image_id).sum()) == 2 * IMAGE_TOKENS


def test_collator_options(tmp_path, tokenizer, image_id):
    samples = [
        dataset(
            [TEXT_ONLY, record("b", human("Q?"), gpt("Longer answer."))],
            tmp_path,
            tokenizer,
            image_id,
        )[i]
        for i in range(2)
    ]
    text_only = DataCollator(pad_token_id=0)(samples)
    assert "pixel_values" not in text_only
    left = DataCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=64)(samples)
    length = left["input_ids"].shape[1]
    assert length % 64 == 0 and length >= max(len(s["input_ids"]) for s in samples)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert torch.equal(left["input_ids"][row, length - n :], sample["input_ids"])
        assert left["attention_mask"][row, : length - n].sum() == 0
    with pytest.raises(ValueError, match="samples is empty"):
        DataCollator(pad_token_id=0)([])
    with pytest.raises(
        ValueError, match=r"padding_side must be one of \('right', 'left'\), got 'top'"
    ):
        DataCollator(pad_token_id=0, padding_side="top")
    with pytest.raises(TypeError, match=r"pad_token_id must be an int, got None \(NoneType\)"):
        DataCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="tokenizer has no pad token"):
        DataCollator.from_tokenizer(sentencepiece_like(legacy=True))
    odd = {
        "input_ids": torch.zeros(3, dtype=torch.long),
        "labels": torch.zeros(3, dtype=torch.long),
    }
    mixed = [
        {**odd, "pixel_values": torch.zeros(3, 8, 8)},
        {**odd, "pixel_values": torch.zeros(3, 4, 4)},
    ]
    with pytest.raises(ValueError, match=r"pixel_values of the samples differ in shape"):
        DataCollator(pad_token_id=0)(mixed)


def test_deterministic(tmp_path, tokenizer, image_id):
    write_image(tmp_path / "cat.png")
    first = dataset([CHAT, CAPTION, TEXT_ONLY], tmp_path, tokenizer, image_id)
    second = dataset([CHAT, CAPTION, TEXT_ONLY], tmp_path, tokenizer, image_id)
    collate = DataCollator.from_tokenizer(tokenizer)
    a = collate([first[i] for i in range(3)])
    b = collate([second[i] for i in range(3)])
    c = collate([first[i] for i in range(3)])
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])


def test_batch_trains_a_dense_llava(tmp_path, tokenizer, image_id):
    """The collated batch fits DenseLlavaForConditionalGeneration: image tokens per image from
    the model, loss only on the answers."""
    from mmconnect.integrations.applications.tiny_models import (
        tiny_text_config,
        tiny_vision_config,
    )
    from mmconnect.integrations.families.llava import (
        DenseLlavaConfig,
        DenseLlavaForConditionalGeneration,
    )

    vision = tiny_vision_config("clip", blocks=3, width=16, heads=2, image_size=SIZE)
    text = tiny_text_config(
        width=32, blocks=1, heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = DenseLlavaForConditionalGeneration(
        DenseLlavaConfig(
            vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_id
        )
    )
    write_image(tmp_path / "cat.png")
    data = dataset(
        [CHAT, TEXT_ONLY, CAPTION],
        tmp_path,
        tokenizer,
        image_id,
        image_tokens=model.model.image_token_count(),
        image_token_id=model.config.image_token_id,
    )
    batch = DataCollator.from_tokenizer(tokenizer)([data[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 2
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
