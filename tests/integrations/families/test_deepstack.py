"""DeepStack in the HF families: residuals of ``forward_with_injections`` added after LLM layer i.

The tiny Dense LLaVA: a 4-block CLIP at 28 px (a 2x2 grid, 4 image tokens), DCI over
``((0, 1), (2, 3))`` through ``mlp2x_gelu``, a 2-layer Llama 32 wide; DeepStack injects the tower's
``hidden_states[1]`` and ``[3]`` after LLM layers 0 and 1. Every expectation is computed
independently: the LLM run layer by layer with the residuals added at the image positions, HF's
own ``Qwen3VLTextModel._deepstack_process`` and ``Qwen3VLVisionModel.deepstack_merger_list``.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from einops import rearrange
from transformers.masking_utils import create_causal_mask

from mmconnect import ConnectorConfig, DeepStackSpec, DenseConnector, SingleLayerSpec
from mmconnect.integrations.applications.tiny_models import tiny_connector
from mmconnect.integrations.families.base import (
    DenseImageOutput,
    decoder_layers,
    deepstack_injection,
)
from mmconnect.integrations.families.llava import DenseLlavaForConditionalGeneration
from mmconnect.integrations.families.llava_next import DenseLlavaNextConfig
from mmconnect.integrations.training.stages import LoraSettings, StageConfig, prepare_stage
from tests.support import llava_toys, mini_gemini_toys
from tests.support.llava_next_toys import CONNECTORS, llava_next_config

LEVELS = (1, 3)
LLM = llava_toys.LLM
INJECTION = dataclasses.replace(
    tiny_connector(vision_dim=16, llm_dim=LLM), injection=DeepStackSpec(layers=LEVELS)
)
TOKENS = 4  # the 2x2 grid of the 28 px tower, one token per patch


@pytest.fixture(scope="module")
def model() -> DenseLlavaForConditionalGeneration:
    return llava_toys.tiny_dense(seed=0, connector=INJECTION)


def inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "input_ids": llava_toys.prompt_ids(TOKENS, batch),
        "pixel_values": llava_toys.pixels(batch, size=llava_toys.TINY_SIZE, seed=seed),
    }


def connector_outputs(model, pixel_values):
    """The connector's tokens and residuals on the tower's tapped layers, run here."""
    inner = model.model
    features = inner.connector.make_tap(inner.vision_tower, keep_prefix=False)(pixel_values)
    return inner.connector.forward_with_injections(features, (2, 2))


def layer_by_layer(
    model, input_ids, tokens, residuals, image_id: int = llava_toys.IMAGE
) -> torch.Tensor:
    """The logits of the LLM run block by block, residual i added after block i at the image
    positions (as a masked scatter into zeros, not the hooks' indexing)."""
    llm = model.model.language_model
    width = llm.config.hidden_size
    mask = (input_ids == image_id)[..., None]
    embeds = llm.embed_tokens(input_ids).masked_scatter(mask, tokens.reshape(-1, width))
    positions = torch.arange(input_ids.shape[1])[None]
    causal = create_causal_mask(
        config=llm.config,
        inputs_embeds=embeds,
        attention_mask=None,
        cache=None,
        position_ids=positions,
    )
    rotary = llm.rotary_emb(embeds, position_ids=positions)
    hidden = embeds
    for index, layer in enumerate(llm.layers):
        hidden = layer(
            hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions
        )
        if index < len(residuals):
            hidden = hidden + torch.zeros_like(hidden).masked_scatter(
                mask, residuals[index].reshape(-1, width)
            )
    return model.lm_head(llm.norm(hidden))


def forward_hooks(model) -> list[int]:
    return [len(layer._forward_hooks) for layer in model.model.language_model.layers]


# ---------------------------------------------------------------------------- arithmetic


@torch.no_grad()
def test_logits_equal_the_llm_run_layer_by_layer_with_the_residuals(model):
    batch = inputs()
    tokens, residuals = connector_outputs(model, batch["pixel_values"])
    assert len(residuals) == 2 and all(r.shape == (2, TOKENS, LLM) for r in residuals)
    expected = layer_by_layer(model, batch["input_ids"], tokens, residuals)
    logits = model(**batch, use_cache=False).logits
    assert torch.equal(logits, expected)
    # the residuals matter: without them the logits differ
    plain = layer_by_layer(model, batch["input_ids"], tokens, ())
    assert (logits - plain).abs().max() > 1e-3


@torch.no_grad()
def test_image_features_carry_exactly_the_connectors_residuals(model):
    batch = inputs()
    tokens, residuals = connector_outputs(model, batch["pixel_values"])
    output = model.model.get_image_features(pixel_values=batch["pixel_values"])
    assert isinstance(output, DenseImageOutput)
    assert torch.equal(torch.stack(output.pooler_output), tokens)
    assert len(output.deepstack_features) == len(LEVELS)
    for level, residual in zip(output.deepstack_features, residuals, strict=True):
        assert len(level) == 2  # one [tokens, llm_dim] tensor per image
        assert torch.equal(torch.stack(level), residual)
    assert model.connector.injection_layers == LEVELS


@torch.no_grad()
def test_inputs_embeds_and_pre_encoded_images_inject_the_same(model):
    batch = inputs()
    reference = model(**batch, use_cache=False).logits
    embeds = model.get_input_embeddings()(batch["input_ids"])
    by_embeds = model(
        inputs_embeds=embeds, pixel_values=batch["pixel_values"], use_cache=False
    ).logits
    encoded = model.model.get_image_features(pixel_values=batch["pixel_values"])
    pre_encoded = model(
        input_ids=batch["input_ids"], mm_encoder_outputs={"image": encoded}, use_cache=False
    ).logits
    assert torch.equal(by_embeds, reference)
    assert torch.equal(pre_encoded, reference)


@torch.no_grad()
def test_text_only_prompts_run_the_stock_llm(model):
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    tokens = torch.zeros(0, LLM)
    assert torch.equal(
        model(input_ids=ids, use_cache=False).logits, layer_by_layer(model, ids, tokens, ())
    )


def test_pre_encoded_images_without_residuals_are_refused(model):
    batch = inputs(batch=1)
    encoded = model.model.get_image_features(pixel_values=batch["pixel_values"])
    stripped = DenseImageOutput(pooler_output=encoded.pooler_output)
    with pytest.raises(ValueError, match=r"no deepstack_features.*vision layers \[1, 3\]"):
        model(input_ids=batch["input_ids"], mm_encoder_outputs={"image": stripped})


def test_connector_without_injection_returns_no_residuals():
    plain = llava_toys.tiny_dense(seed=0)
    output = plain.model.get_image_features(pixel_values=inputs(batch=1)["pixel_values"])
    assert output.deepstack_features is None
    assert len(output.to_tuple()) == 2  # last_hidden_state, pooler_output: as before


# ---------------------------------------------------------------------------- hooks


def test_no_hook_remains_after_forward_or_an_exception(model):
    assert forward_hooks(model) == [0, 0]
    with torch.no_grad():
        model(**inputs())
    assert forward_hooks(model) == [0, 0]

    def fail(module, args):
        assert forward_hooks(model) == [1, 1]  # both levels hooked while the LLM runs
        raise RuntimeError("layer 1 failed")

    handle = model.model.language_model.layers[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="layer 1 failed"), torch.no_grad():
            model(**inputs())
    finally:
        handle.remove()
    assert forward_hooks(model) == [0, 0]


def test_residual_rows_must_match_the_image_positions(model):
    layers = decoder_layers(model.model.language_model)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    with (
        pytest.raises(ValueError, match=r"level 0 has shape \(4, 32\).*3 image positions"),
        deepstack_injection(layers, [torch.zeros(4, LLM)], mask),
    ):
        pass
    with (
        pytest.raises(ValueError, match="3 DeepStack levels but the LLM has 2 decoder layers"),
        deepstack_injection(layers, [torch.zeros(3, LLM)] * 3, mask),
    ):
        pass
    assert forward_hooks(model) == [0, 0]


def test_decoder_layers_are_found_by_structure(model):
    llm = model.model.language_model
    assert decoder_layers(llm) is llm.layers
    assert decoder_layers(torch.compile(llm)) is llm.layers
    with pytest.raises(ValueError, match=r"decoder layers of the LLM \(Linear\)"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_two_threads_sharing_the_model_get_the_single_threaded_results(model):
    image_batches = [inputs(batch=1, seed=seed) for seed in (3, 4)]
    text = {"input_ids": torch.tensor([[1, 7, 8, 9, 10, 11, 12]])}
    jobs = [*image_batches, text]
    with torch.no_grad():
        expected = [model(**job, use_cache=False).logits for job in jobs]
    results: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(jobs))}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(6):
                with torch.no_grad():
                    results[index].append(model(**jobs[index], use_cache=False).logits)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, outputs in results.items():
        assert len(outputs) == 6
        assert all(torch.equal(output, expected[index]) for output in outputs)
    assert forward_hooks(model) == [0, 0]


# ---------------------------------------------------------------------------- generate, save, train


@torch.no_grad()
def test_generate_adds_the_residuals_at_prefill_only(model):
    batch = inputs()
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # the same greedy tokens, each step recomputed from scratch (residuals at the image
    # positions of the whole sequence, nothing added elsewhere)
    sequence = batch["input_ids"]
    for _ in range(4):
        logits = model(input_ids=sequence, pixel_values=batch["pixel_values"], use_cache=False)
        sequence = torch.cat([sequence, logits.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)
    assert forward_hooks(model) == [0, 0]


@torch.no_grad()
def test_generate_first_step_equals_forward(model):
    batch = inputs()
    output = model.generate(
        **batch,
        max_new_tokens=1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    # generate() computes the head on the last position only (logits_to_keep=1), as here
    assert torch.equal(output.logits[0], model(**batch, logits_to_keep=1).logits[:, -1])


@torch.no_grad()
def test_beam_search_and_chunked_prefill_carry_the_residuals(model):
    batch = inputs()
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    # beams: generate() expands each image's residuals with its row (HF's deepstack layout)
    beams = model.generate(**batch, num_beams=2, **options)
    for row in range(2):
        alone = {key: value[row : row + 1] for key, value in batch.items()}
        assert torch.equal(beams[row : row + 1], model.generate(**alone, num_beams=2, **options))
    # chunked prefill (chunks of 4 split the image positions 2..5): each chunk gets the residual
    # rows of its image positions. The residuals move the last logits by 0.02; chunking changes
    # them by float rounding only (6e-8 measured).
    scores = {"output_logits": True, "return_dict_in_generate": True}
    whole = model.generate(**batch, **options, **scores)
    chunked = model.generate(**batch, prefill_chunk_size=4, **options, **scores)
    assert torch.equal(chunked.sequences, whole.sequences)
    for ours, reference in zip(chunked.logits, whole.logits, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert forward_hooks(model) == [0, 0]


def test_save_and_from_pretrained_keep_the_injection(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = DenseLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.connector_config.injection == DeepStackSpec(layers=LEVELS)
    assert loaded.connector.injection_layers == LEVELS
    saved = model.connector.state_dict()
    assert any(key.startswith("injection.1.") for key in saved)
    for key, tensor in loaded.connector.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_stage_one_trains_the_injection_projectors(tmp_path):
    model = llava_toys.tiny_dense(seed=0, connector=INJECTION)
    trainable = prepare_stage(
        model, StageConfig(stage="align", output_dir=str(tmp_path), disable_tqdm=True)
    )
    names = {name for name, p in trainable.named_parameters() if p.requires_grad}
    injection = {name for name in names if ".multi_modal_projector.injection." in name}
    assert len(injection) == 8  # 2 levels x (2 Linears x weight, bias)
    assert all(".multi_modal_projector." in name for name in names)
    batch = inputs()
    loss = trainable(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    for name, parameter in trainable.named_parameters():
        if name in injection:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_lora_instruct_stage_keeps_the_injection(tmp_path):
    model = llava_toys.tiny_dense(seed=0, connector=INJECTION)
    batch = inputs()
    with torch.no_grad():
        before = model(**batch, use_cache=False).logits
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0)
    peft_model = prepare_stage(
        model,
        StageConfig(stage="instruct", output_dir=str(tmp_path), disable_tqdm=True, lora=lora),
    ).eval()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".injection.1.0.weight" in name for name in trainable)  # modules_to_save copy
    with torch.no_grad():  # LoRA starts as the identity: the same logits, residuals included
        assert torch.equal(peft_model(**batch, use_cache=False).logits, before)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = llava_toys.tiny_dense(seed=0, connector=INJECTION).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.model.language_model.layers[0].gradient_checkpointing
        batch = inputs()
        model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "injection" in n})
        assert forward_hooks(model) == [0, 0]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grads[1][name], grad), name


# ---------------------------------------------------------------------------- refusals


def test_an_llm_shallower_than_the_levels_is_refused():
    three = dataclasses.replace(INJECTION, injection=DeepStackSpec(layers=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"injects 3 levels.*num_hidden_layers=2"):
        llava_toys.tiny_dense(connector=three)


def test_llava_next_refuses_an_injection_connector():
    data = llava_next_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    connector = dataclasses.replace(
        CONNECTORS["dci"], injection=DeepStackSpec(layers=(2, 4), projector="mlp2x_gelu")
    )
    with pytest.raises(ValueError, match=r"Dense LLaVA-NeXT does not support.*newline tokens"):
        DenseLlavaNextConfig(**(data | {"connector": connector.to_dict()}))


def test_paths_that_place_tokens_themselves_refuse_an_injection_connector(model):
    from mmconnect.integrations.codebases import llava as llava_codebase
    from mmconnect.integrations.codebases import mini_gemini as mgm_codebase
    from tests.support.mini_gemini_codebase_toys import MGMStyleModel, towers

    # chat's image / video answering puts frame tokens into inputs_embeds
    with pytest.raises(
        ValueError, match=r"DeepStack residuals inside the LLM \(injection=\[1, 3\]"
    ):
        model.model.frame_features(inputs(batch=1)["pixel_values"])
    holder = torch.nn.Module()
    holder.vision_tower, holder.mm_projector = torch.nn.Identity(), torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"LLaVA codebase .* cannot add DeepStack residuals"):
        llava_codebase.swap_connector(holder, DenseConnector(INJECTION))
    with pytest.raises(ValueError, match=r"MGM codebase .* cannot add DeepStack residuals"):
        mgm_codebase.swap_connector(MGMStyleModel(*towers()), DenseConnector(INJECTION))


# ---------------------------------------------------------------------------- Mini-Gemini


@torch.no_grad()
def test_mini_gemini_adds_the_residuals_of_its_lr_tower():
    from mmconnect.integrations.families.mini_gemini import (
        DenseMGMConfig,
        DenseMGMForConditionalGeneration,
    )
    from mmconnect.integrations.families.mini_gemini_vision import lr_views

    connector = dataclasses.replace(
        mini_gemini_toys.connector("dc-dci-clip-l-336"), injection=DeepStackSpec(layers=(9, 17))
    )
    stock = mini_gemini_toys.build("dc-dci-clip-l-336").config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        stock.pop(key, None)
    torch.manual_seed(0)
    model = DenseMGMForConditionalGeneration(
        DenseMGMConfig(**(stock | {"connector": connector.to_dict()}))
    ).eval()
    ids = mini_gemini_toys.prompt(model.model.image_token_count())
    pixels = mini_gemini_toys.hr_pixels()
    inner = model.model
    lr = lr_views(pixels, 336, 1, False)[:, 0]
    features = inner.connector.make_tap(inner.vision_tower, keep_prefix=False)(lr)
    _, residuals = inner.connector.forward_with_injections(features)
    output = inner.get_image_features(pixel_values=pixels)
    for level, residual in zip(output.deepstack_features, residuals, strict=True):
        assert torch.equal(level[0], residual[0])
    expected = layer_by_layer(
        model, ids, output.pooler_output[0], residuals, mini_gemini_toys.IMAGE
    )
    logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
    assert torch.equal(logits, expected)


# ---------------------------------------------------------------------------- HF Qwen3-VL parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_hooks_equal_qwen3_vl_deepstack_process(dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3VLTextConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    torch.manual_seed(0)
    text = transformers.Qwen3VLTextModel(config).eval().to(dtype)
    embeds = torch.randn(2, 9, 32, dtype=dtype)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 4:8] = True
    residuals = [torch.randn(8, 32), torch.randn(8, 32)]  # fp32: cast by both, as HF does
    hf = text(
        inputs_embeds=embeds, visual_pos_masks=mask, deepstack_visual_embeds=residuals
    ).last_hidden_state
    with deepstack_injection(decoder_layers(text), residuals, mask):
        ours = text(inputs_embeds=embeds).last_hidden_state
    assert torch.equal(ours, hf)
    assert not torch.equal(text(inputs_embeds=embeds).last_hidden_state, hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_injection_projectors_equal_qwen3_vl_deepstack_mergers(dtype):
    transformers = pytest.importorskip("transformers")
    from mmconnect.zoo.patch_merger import (
        QWEN3_VL_DEEPSTACK_MERGER,
        QWEN3_VL_MERGER,
        qwen3_vl_merger_state_from_hf,
    )

    config = transformers.Qwen3VLVisionConfig(
        depth=4,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=24,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 2],
    )
    torch.manual_seed(0)
    vision = transformers.Qwen3VLVisionModel(config).eval()
    for parameter in vision.parameters():  # LayerNorms start at 1 / 0: randomise them too
        parameter.add_(0.1 * torch.randn_like(parameter))
    vision.to(dtype)
    rows, columns = 4, 6
    patches = torch.randn(rows * columns, 3 * 2 * 4 * 4, dtype=dtype)
    grid_thw = torch.tensor([[1, rows, columns]])
    blocks: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(lambda m, a, out, b=b: blocks.__setitem__(b, out))
        for b, block in enumerate(vision.blocks)
    ]
    try:
        hf = vision(patches, grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()

    # HF's tokens come in 2x2-block order; ours in raster order. Block b -> hidden_states b + 1.
    def raster(tokens):
        return rearrange(
            tokens, "(h w p q) c -> 1 (h p w q) c", h=rows // 2, w=columns // 2, p=2, q=2
        )

    connector = DenseConnector(
        ConnectorConfig(
            vision_dim=16,
            llm_dim=24,
            num_layers=4,
            fusion=SingleLayerSpec(final_layer=4),
            projector=QWEN3_VL_MERGER,
            injection=DeepStackSpec(layers=(1, 3), projector=QWEN3_VL_DEEPSTACK_MERGER),
        )
    )
    connector.to(dtype)
    state = vision.state_dict()
    connector.projector.load_state_dict(qwen3_vl_merger_state_from_hf(state, "merger."))
    for level in range(2):
        connector.injection[level].load_state_dict(
            qwen3_vl_merger_state_from_hf(state, f"deepstack_merger_list.{level}.")
        )
    features = {layer: raster(blocks[layer - 1]) for layer in (1, 3, 4)}
    tokens, residuals = connector.forward_with_injections(features, (rows, columns))
    assert torch.equal(tokens[0], hf.pooler_output)
    assert len(residuals) == len(hf.deepstack_features) == 2
    for ours, theirs in zip(residuals, hf.deepstack_features, strict=True):
        assert torch.equal(ours[0], theirs)
