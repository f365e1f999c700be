"""Exporting a Dense LLaVA to a stock ``LlavaForConditionalGeneration`` checkpoint.

Tiny models: CLIP (1 CLS) and SigLIP (no prefix) towers of 4 blocks, 16 wide, 28 px images of
14 px patches (a 2x2 grid), and the 2-block Llama / Qwen2 LLMs of the LLaVA family tests. The
export's logits must equal the Dense model's: bit for bit for the baseline and SCI, within 1e-5
for DCI in fp32; greedy ``generate`` gives the same tokens; the stock processor builds the Dense
processor's prompts.

bf16 bound for DCI (measured on 24 tiny models: both towers, three group layouts including the
final layer inside a group and the last block as final layer, seeds 0-3, 2 images): the logits
moved by at most 0.0039 (2 bf16 ulps at their 0.25-0.5 magnitude, 1.0% of the largest logit),
the visual tokens by at most 2.4e-4 (0.73% of the largest); asserted here as 0.008 and 2%.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmconnect import ConnectorConfig, DCISpec, ResampleSpec, SCISpec, SingleLayerSpec, STISpec
from mmconnect.integrations.applications.tiny_models import (
    tiny_dense_llava,
    tiny_llava_processor,
    tiny_llava_tokenizer,
    tiny_vision_config,
)
from mmconnect.integrations.export import export_to_stock
from mmconnect.integrations.export.stock_checkpoint import image_path_difference
from mmconnect.integrations.export.stock_model import stock_model
from tests.support import llava_toys

SIZE = 28
FUSIONS = {
    "baseline": SingleLayerSpec(final_layer=-2),
    "sci": SCISpec(extra_layers=(1, 2)),
    # The final layer hidden_states[-2] = 3 is also in the second group: listed once, merged.
    "dci": DCISpec(groups=((0, 1), (2, 3))),
    # The last block as final layer, one group not containing it.
    "dci-last": DCISpec(groups=((0, 1, 2),), final_layer=-1),
}
EXACT = ("baseline", "sci")
TOWERS = ("clip", "siglip")


def connector(fusion, **changes) -> ConnectorConfig:
    return ConnectorConfig(vision_dim=16, llm_dim=32, num_layers=4, fusion=fusion, **changes)


def build(name: str, tower: str = "clip", seed: int = 0, **changes):
    """The tiny Dense LLaVA of fusion ``name`` on ``tower`` (eval mode, fp32)."""
    return tiny_dense_llava(
        seed=seed,
        connector=connector(FUSIONS[name], **changes),
        vision_config=tiny_vision_config(tower, width=16, image_size=SIZE),
        text_config=llava_toys.llm_config("llama" if tower == "clip" else "qwen2"),
        image_token_id=llava_toys.IMAGE,
    )


def processor_of(model, tower: str = "clip"):
    return tiny_llava_processor(
        tiny_llava_tokenizer(), model.connector.config, family=tower, image_size=SIZE
    )


def inputs(model, images: int = 2, seed: int = 0, dtype=torch.float32) -> dict:
    tokens = model.model.image_token_count()
    return {
        "input_ids": llava_toys.prompt_ids(tokens, images),
        "pixel_values": llava_toys.pixels(images, SIZE, seed).to(dtype),
    }


@pytest.fixture(scope="module")
def models() -> dict:
    return {(name, tower): build(name, tower) for name in FUSIONS for tower in TOWERS}


@pytest.fixture(scope="module")
def exported(models) -> dict:
    return {key: stock_model(model).eval() for key, model in models.items()}


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("name", list(FUSIONS))
def test_logits_equal_the_dense_model(models, exported, name, tower):
    dense, stock = models[name, tower], exported[name, tower]
    assert type(stock) is LlavaForConditionalGeneration
    batch = inputs(dense)
    with torch.no_grad():
        expected, got = dense(**batch).logits, stock(**batch).logits
    if name in EXACT:
        assert torch.equal(got, expected)
    else:
        assert (got - expected).abs().max() <= 1e-5
        assert not torch.equal(got, expected)  # re-associated: not the same operations


@pytest.mark.parametrize("tower", TOWERS)
def test_stock_config_reads_the_connector_layers(exported, tower):
    strategy = "default" if tower == "clip" else "full"
    expected = {"baseline": 3, "sci": [3, 1, 2], "dci": [3, 0, 1, 2], "dci-last": [4, 0, 1, 2]}
    for name, layers in expected.items():
        config = exported[name, tower].config
        assert config.model_type == "llava"
        assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (
            layers,
            strategy,
        )
        assert config.image_seq_length == 4


def test_dci_first_linear_is_widened_to_one_block_per_listed_layer(models, exported):
    """DCI over (0, 1) and (2, 3) with final layer 3: blocks [W_F + W_2/2, W_1/2, W_1/2, W_2/2]."""
    dense = models["dci", "clip"].connector.projector[0].weight.double()
    stock = exported["dci", "clip"].model.multi_modal_projector.linear_1.weight.double()
    w_final, w_1, w_2 = dense.split(16, dim=1)
    expected = torch.cat([w_final + w_2 / 2, w_1 / 2, w_1 / 2, w_2 / 2], dim=1)
    assert stock.shape == (32, 64)
    torch.testing.assert_close(stock, expected, rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sci", "dci"])
def test_greedy_generation_gives_the_same_tokens(models, exported, name):
    dense, stock = models[name, "clip"], exported[name, "clip"]
    batch = inputs(dense, images=2, seed=3)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": llava_toys.PAD}
    with torch.no_grad():
        expected = dense.generate(**batch, **options)
        got = stock.generate(**batch, **options)
    assert expected.shape[1] == batch["input_ids"].shape[1] + 6
    assert torch.equal(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("tower", TOWERS)
def test_bf16_sci_is_bit_identical_and_dci_within_the_measured_bound(tower):
    for name in ("sci", "dci", "dci-last"):
        dense = build(name, tower, seed=1).to(torch.bfloat16)
        stock = stock_model(dense)
        assert stock.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
        batch = inputs(dense, seed=1, dtype=torch.bfloat16)
        with torch.no_grad():
            expected, got = dense(**batch).logits.float(), stock(**batch).logits.float()
        if name in EXACT:
            assert torch.equal(got, expected)
        else:
            delta = (got - expected).abs().max()
            assert delta <= 0.008
            assert delta <= 0.02 * expected.abs().max()


# ---------------------------------------------------------------------------- the checkpoint


@pytest.fixture(scope="module")
def dci_export(models, tmp_path_factory):
    """The CLIP DCI model exported with its processor, and the Dense processor."""
    dense = models["dci", "clip"]
    processor = processor_of(dense)
    directory = tmp_path_factory.mktemp("export") / "stock"
    report = export_to_stock(dense, directory, processor=processor)
    return directory, report, processor


def test_report_describes_the_export(dci_export):
    directory, report, _ = dci_export
    assert report.directory == directory
    assert report.stock_class == "LlavaForConditionalGeneration"
    assert report.vision_feature_layer == [3, 0, 1, 2]
    assert report.vision_feature_select_strategy == "default"
    assert (report.exact, report.image_tokens) == (False, 4)
    assert (report.dense_projector_inputs, report.stock_projector_inputs) == (48, 64)
    assert 0 < report.relative_difference < 1e-5


def test_saved_checkpoint_is_stock_safetensors_with_its_processor(dci_export, models):
    directory, _, dense_processor = dci_export
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    loaded = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    assert type(processor) is LlavaProcessor
    batch = inputs(models["dci", "clip"])
    with torch.no_grad():
        expected = models["dci", "clip"](**batch).logits
        assert (loaded(**batch).logits - expected).abs().max() <= 1e-5
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 10, 10))
    prompt = "USER : <image> what is in the image ASSISTANT :"
    got = processor(images=[image], text=[prompt], return_tensors="pt")
    want = dense_processor(images=[image], text=[prompt], return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert int((got["input_ids"] == llava_toys.IMAGE).sum()) == 4
    assert torch.equal(got["pixel_values"], want["pixel_values"])


@pytest.mark.slow
def test_export_from_a_saved_directory_keeps_its_dtype(models, tmp_path):
    dense = build("sci", "siglip", seed=2).to(torch.bfloat16)
    source = tmp_path / "dense"
    dense.save_pretrained(source)
    processor_of(dense, "siglip").save_pretrained(source)
    report = export_to_stock(source, tmp_path / "stock")
    assert report.exact and report.relative_difference == 0.0
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "stock", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    # Compared with the Dense model as loaded (a model converted with .to(bf16) in memory holds
    # bf16 rotary frequencies, a loaded one recomputes them in fp32).
    reloaded = AutoModelForImageTextToText.from_pretrained(source, dtype="auto").eval()
    batch = inputs(dense, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, reloaded(**batch).logits)


def _digests(folder) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_export_over_an_earlier_one_replaces_the_model_and_keeps_other_files(models, tmp_path):
    target = tmp_path / "stock"
    sci = models["sci", "clip"]
    export_to_stock(sci, target, processor=processor_of(sci))
    (target / "notes.txt").write_text("mine\n")
    dci = models["dci", "clip"]
    export_to_stock(dci, target, processor=processor_of(dci))
    assert (target / "notes.txt").read_text() == "mine\n"
    config = LlavaForConditionalGeneration.from_pretrained(target).config
    assert config.vision_feature_layer == [3, 0, 1, 2]


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("connector_config", "message"),
    [
        (connector(STISpec(extra_layers=(1, 2), window=2)), "fusion 'sti'"),
        (
            connector(DCISpec(groups=((0, 1), (2, 3))), resample=ResampleSpec(grid=(1, 1))),
            "resizes the token grid",
        ),
        (connector(SingleLayerSpec(final_layer=-2), projector="linear"), "projector 'linear'"),
    ],
    ids=["sti", "efficient", "linear"],
)
def test_connectors_without_stock_equivalent_are_refused_before_writing(
    connector_config, message, tmp_path
):
    dense = tiny_dense_llava(
        connector=connector_config,
        vision_config=tiny_vision_config("clip", width=16, image_size=SIZE),
        text_config=llava_toys.llm_config(),
        image_token_id=llava_toys.IMAGE,
    )
    target = tmp_path / "stock"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    before = _digests(target)
    with pytest.raises(ValueError, match=message):
        export_to_stock(dense, target, processor=processor_of(dense))
    assert _digests(target) == before


def test_processor_is_required_with_a_model_in_memory(models, tmp_path):
    with pytest.raises(ValueError, match="processor= is required"):
        export_to_stock(models["sci", "clip"], tmp_path / "stock")


def test_processor_of_another_family_is_refused(models, tmp_path):
    from transformers import LlavaNextProcessor

    dense = models["sci", "clip"]
    wrong = LlavaNextProcessor(
        image_processor=processor_of(dense).image_processor,
        tokenizer=tiny_llava_tokenizer(),
        patch_size=14,
    )
    with pytest.raises(TypeError, match="processor must be the model's LlavaProcessor"):
        export_to_stock(dense, tmp_path / "stock", processor=wrong)


def test_out_dir_cannot_be_the_source_or_a_file(models, tmp_path):
    dense = models["sci", "clip"]
    source = tmp_path / "dense"
    dense.save_pretrained(source)
    processor_of(dense).save_pretrained(source)
    with pytest.raises(ValueError, match="is the Dense model's own directory"):
        export_to_stock(source, source / ".." / "dense")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export_to_stock(dense, tmp_path / "file", processor=processor_of(dense))


def test_source_directory_without_processor_or_missing(models, tmp_path):
    models["sci", "clip"].save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="holds no processor"):
        export_to_stock(tmp_path / "dense", tmp_path / "stock")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        export_to_stock(tmp_path / "absent", tmp_path / "stock")


def test_stock_and_peft_models_are_refused(models, tmp_path):
    from peft import LoraConfig, get_peft_model

    stock = llava_toys.build_llava(-2)
    with pytest.raises(TypeError, match="not a Dense model"):
        export_to_stock(stock, tmp_path / "stock", processor=None)
    wrapped = get_peft_model(
        build("sci"), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0)
    )
    with pytest.raises(TypeError, match="merge_and_unload"):
        export_to_stock(wrapped, tmp_path / "stock", processor=processor_of(build("sci")))


def test_mini_gemini_is_refused(tmp_path):
    from tests.support import mini_gemini_toys

    dense = mini_gemini_toys.build()
    with pytest.raises(TypeError, match="cannot export a 'dense_mgm' model"):
        export_to_stock(dense, tmp_path / "stock", processor=object())


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"out_dir": 3}, TypeError, "out_dir must be a path"),
        ({"verify": "yes"}, TypeError, "verify must be a bool"),
    ],
)
def test_bad_arguments(models, tmp_path, arguments, error, message):
    call = {"out_dir": tmp_path / "stock", "verify": True, **arguments}
    with pytest.raises(error, match=message):
        export_to_stock(models["sci", "clip"], **call)


def test_self_check_sees_a_stock_model_reading_other_layers(models):
    dense = models["sci", "clip"]
    wrong = stock_model(dense)
    wrong.config.vision_feature_layer = [3, 2, 1]  # the SCI layers in another order
    assert image_path_difference(dense, stock_model(dense)) == 0.0
    assert image_path_difference(dense, wrong) > 0.1
