"""The connector lab: configs, presets, statistics, the encoder's data and probes, the quick run."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmconnect.projectors as projectors_module
import mmconnect.zoo
from mmconnect import (
    ConnectorConfig,
    DenseConnector,
    ProjectorSpec,
    ResampleSpec,
    list_projectors,
    register_projector,
)
from mmconnect.integrations.applications.lab import (
    LAB_FUSIONS,
    LAB_PRESETS,
    LAB_PROJECTOR_SPECS,
    LabConfig,
    above_prior,
    above_prior_table,
    accuracy_table,
    compare_connectors,
    comparison_table,
    lab_connector,
    lab_jobs,
    lab_projector_spec,
    parse_lab_connector,
    quick_config,
    reference_connector,
    run_lab,
    significance_summary,
    summarize,
    text_prior_accuracy,
)
from mmconnect.integrations.applications.lab_encoder import (
    MIN_PATCH_COVERAGE,
    EncoderPretraining,
    image_processor,
    linear_probe,
    object_masks,
    patch_labels,
    probe_layers,
    recoloured_batch,
    variance_share,
)
from mmconnect.integrations.applications.synthetic import SceneSpec, sample_scene
from mmconnect.integrations.cli import main

QUESTION_TYPES = {"colour", "count", "position", "shape", "all"}


@pytest.fixture(autouse=True)
def one_thread():
    """The lab's models are tiny: one torch thread, as ``run_lab`` uses, instead of threads that
    wait for each other when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            {"connectors": ("baseline", "mlp")},
            ValueError,
            r"connectors\[1\] must be one of \('baseline', 'sti', .*\), got 'mlp'",
        ),
        ({"connectors": "dci"}, TypeError, "connectors must be a sequence of lab connector names"),
        ({"connectors": ()}, ValueError, "connectors must name at least one connector"),
        ({"connectors": ("dci", "dci")}, ValueError, "connectors must be distinct"),
        ({"seeds": ()}, ValueError, "seeds must hold at least one seed"),
        ({"seeds": (0, 0)}, ValueError, r"seeds must be distinct, got \(0, 0\)"),
        ({"seeds": (0, "1")}, TypeError, r"seeds\[1\] must be an int, got '1' \(str\)"),
        ({"seeds": 3}, TypeError, r"seeds must be a sequence of ints, got 3 \(int\)"),
        ({"stage2_steps": 0}, ValueError, "stage2_steps must be a positive int, got 0"),
        ({"stage2_steps": 2.5}, TypeError, "stage2_steps must be a positive int, got 2.5"),
        (
            {"stage1_learning_rate": 0.0},
            ValueError,
            "stage1_learning_rate must be a positive number",
        ),
        ({"stage1_learning_rate": "1e-3"}, TypeError, "stage1_learning_rate must be a positive"),
        ({"overwrite": "yes"}, TypeError, "overwrite must be a bool"),
        (
            {"encoder": EncoderPretraining(blocks=12)},
            ValueError,
            "encoder.blocks=12: the CLIP-L/336 presets the lab runs read a 24-block tower",
        ),
    ],
)
def test_lab_config_refuses_bad_input(changes, error, message):
    with pytest.raises(error, match=message):
        LabConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 60}, "image_size=60 must be a multiple of patch_size=8"),
        ({"width": 30}, "width=30 must be a multiple of heads=4"),
        ({"steps": 0}, "steps must be a positive int, got 0"),
        ({"probe_images": 4}, "probe_images must be an int >= 8, got 4"),
        ({"invariance_layer": 25}, r"invariance_layer=25 must index hidden_states .*\(-25..24\)"),
        ({"invariance_weight": -1.0}, "invariance_weight must be a non-negative number, got -1.0"),
        ({"colour_layer": -26}, r"colour_layer=-26 must index hidden_states .*\(-25..24\)"),
        ({"colour_weight": -0.5}, "colour_weight must be a non-negative number, got -0.5"),
    ],
)
def test_encoder_pretraining_refuses_bad_input(changes, message):
    with pytest.raises(ValueError, match=message):
        EncoderPretraining(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 10.0}, r"steps must be a positive int, got 10.0 \(float\)"),
        ({"warmup_steps": "5"}, r"warmup_steps must be a non-negative int, got '5' \(str\)"),
        ({"learning_rate": None}, "learning_rate must be a positive number, got None"),
        ({"invariance_layer": 1.5}, "invariance_layer must be an int, got 1.5"),
        ({"colour_layer": "-2"}, "colour_layer must be an int, got '-2'"),
    ],
)
def test_encoder_pretraining_refuses_wrong_types(changes, message):
    with pytest.raises(TypeError, match=message):
        EncoderPretraining(**changes)


def test_demo_config_of_a_seed_is_the_same_for_every_connector(tmp_path):
    config = LabConfig(output_dir=str(tmp_path), seeds=(3, 4))
    demo = config.demo_config(4, tmp_path / "encoder")
    assert demo.seed == 4 and demo.vision_path == str(tmp_path / "encoder")
    assert (demo.stage1_steps, demo.stage2_steps, demo.batch_size) == (200, 600, 16)
    assert demo.output_dir == str(tmp_path / "runs" / "seed-4")
    assert demo.connectors == tuple(LAB_PRESETS)


def test_torch_default_init_redraws_the_connector_layers_under_the_seed():
    """LLaVA's training code builds its projector with torch's default initialisation: every
    Linear weight uniform within 1/sqrt(fan_in); the same seed gives the same weights, and the
    caller's random stream is left where it was."""
    from mmconnect.integrations.applications.lab import torch_default_init

    config = lab_connector("dci+qformer", vision_dim=32, llm_dim=64, grid_side=8)

    def initialised(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)  # HF-style start, then redrawn
        connector = DenseConnector(config)
        queries = {"projector.query_tokens": connector.projector.query_tokens.detach().clone()}
        before = torch.random.get_rng_state()
        torch_default_init(connector, seed)
        assert torch.equal(torch.random.get_rng_state(), before)
        state = {name: value.clone() for name, value in connector.state_dict().items()}
        for name, value in queries.items():  # no reset_parameters for learned queries: kept
            assert torch.equal(state[name], value)
        return state

    first, again, other = initialised(0), initialised(0), initialised(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)
    linears = [m for m in DenseConnector(config).modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    connector = DenseConnector(config)
    torch_default_init(connector, 0)
    for module in connector.modules():
        if isinstance(module, torch.nn.Linear):
            bound = 1 / module.in_features**0.5
            assert module.weight.abs().max() <= bound + 1e-7
            assert module.weight.abs().max() > 0.8 * bound  # uniform over the whole range


def test_cached_samples_read_each_sample_once_and_give_it_back_unchanged():
    from mmconnect.integrations.applications.lab import CachedSamples

    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            reads.append(index)
            return {"input_ids": torch.tensor([index, index + 1])}

    cached = CachedSamples(Counting())
    first = [cached[index] for index in (2, 0, 2, 1, 0)]
    assert len(cached) == 3 and sorted(reads) == [0, 1, 2]
    assert first[0] is first[2] and torch.equal(first[1]["input_ids"], torch.tensor([0, 1]))


def test_lab_template_is_vicuna_v1_without_the_system_prompt():
    from mmconnect.integrations.applications.lab import LAB_TEMPLATE
    from mmconnect.integrations.training.data import get_template

    vicuna = get_template("vicuna_v1")
    assert LAB_TEMPLATE.system == "" and vicuna.system
    assert dataclasses.replace(LAB_TEMPLATE, name=vicuna.name, system=vicuna.system) == vicuna


def test_stage_configs_are_the_same_for_every_connector_and_follow_stage1_trains_llm(tmp_path):
    from mmconnect.integrations.applications.lab import _stage_configs

    config = LabConfig(output_dir=str(tmp_path), stage2_steps=700, batch_size=4)
    first, second = _stage_configs(config, 3, tmp_path / "dci")
    assert (first.stage, first.max_steps, first.learning_rate) == ("instruct", 200, 2e-3)
    assert (second.stage, second.max_steps, second.learning_rate) == ("instruct", 700, 2e-3)
    assert second.connector_learning_rate == 2e-3 and second.seed == 3
    assert first.per_device_train_batch_size == second.per_device_train_batch_size == 4
    assert second.output_dir == str(tmp_path / "dci" / "stage2")
    frozen_llm = dataclasses.replace(config, stage1_trains_llm=False)
    assert _stage_configs(frozen_llm, 3, tmp_path / "dci")[0].stage == "align"
    with pytest.raises(TypeError, match="stage1_trains_llm must be a bool"):
        LabConfig(stage1_trains_llm=1)


def test_quick_config_takes_overrides_and_checks_them():
    config = quick_config(seeds=(4,), connectors=("dci",))
    assert (config.seeds, config.connectors, config.encoder.blocks) == ((4,), ("dci",), 24)
    with pytest.raises(ValueError, match=r"connectors\[0\] must be one of .*, got 'mlp'"):
        quick_config(connectors=("mlp",))


def test_cli_lab_refuses_bad_input_before_any_work(tmp_path, capsys):
    run = ["lab", "--quick", "--output", str(tmp_path / "out")]
    assert main([*run, "--connectors", "baseline,mlp"]) == 2
    assert "mmconnect lab: connectors[1] must be one of" in capsys.readouterr().err
    assert main([*run, "--seeds", ""]) == 2
    assert "seeds must hold at least one seed" in capsys.readouterr().err
    assert main([*run, "--seeds", "0,x"]) == 2
    assert "--seeds must be comma-separated ints, got '0,x'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_lab_refuses_a_folder_no_lab_created_and_leaves_it_byte_identical(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "data" / "images").mkdir(parents=True)
    (mine / "data" / "stage1.json").write_bytes(b"[]\n")
    (mine / "data" / "images" / "train_00000.png").write_bytes(b"my picture")
    assert main(["lab", "--quick", "--output", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"output_dir (--output) {str(mine)!r} is not empty (data)" in err
    assert "no .mmconnect-lab file" in err and "--overwrite" in err
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "data",
        "data/images",
        "data/images/train_00000.png",
        "data/stage1.json",
    ]
    assert (mine / "data" / "stage1.json").read_bytes() == b"[]\n"
    assert (mine / "data" / "images" / "train_00000.png").read_bytes() == b"my picture"


# ---------------------------------------------------------------------------- connectors


@pytest.mark.parametrize(
    ("kind", "tokens", "fused"),
    [
        ("baseline", 64, 48),
        ("sti", 80, 48),
        ("sci", 64, 144),
        ("dci", 64, 144),
        ("dci-efficient", 16, 144),
    ],
)
def test_lab_connectors_are_the_clip_l_presets_at_the_lab_width(kind, tokens, fused):
    config = lab_connector(kind, vision_dim=48, llm_dim=96, grid_side=8)
    preset = ConnectorConfig.from_preset(LAB_PRESETS[kind], vision_dim=48, llm_dim=96)
    # Only the efficient grid changes: 24x24 -> 12x12 there, 8x8 -> 4x4 here.
    if kind == "dci-efficient":
        preset = preset.replace(resample=ResampleSpec(grid=(4, 4)))
    expected = preset.to_dict()
    assert config.to_dict() == expected
    with torch.device("meta"):
        connector = DenseConnector(config)
    assert connector.num_tokens((8, 8)) == tokens
    assert connector.fused_dim == fused


def test_lab_connector_refuses_an_unknown_name():
    with pytest.raises(
        ValueError, match=r"name must be one of \('baseline', 'sti', .*\), got 'mlp2x'"
    ):
        lab_connector("mlp2x", vision_dim=48, llm_dim=96, grid_side=8)


# ---------------------------------------------------------------------------- the zoo in the lab

#: The lab's default tower and LLM widths and grid (``LabConfig()``: 64 px, patch 8).
LAB_SIZE = {"vision_dim": 32, "llm_dim": 64, "grid_side": 8}
#: Zoo kinds that read tokens as a set (learned queries) and so also take STI's pooled tokens.
SET_READERS = ("perceiver", "qformer")


def _zoo_kinds() -> set[str]:
    """The registered kinds whose spec class a module of :mod:`mmconnect.zoo` defines."""
    kinds = set()
    for info in pkgutil.iter_modules(mmconnect.zoo.__path__):
        module = importlib.import_module(f"mmconnect.zoo.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, ProjectorSpec)
                and value.__module__ == module.__name__
            ):
                kind = next(f for f in dataclasses.fields(value) if f.name == "kind").default
                if kind in list_projectors():
                    kinds.add(kind)
    return kinds


def test_the_lab_size_table_covers_every_registered_zoo_kind():
    zoo = _zoo_kinds()
    assert "qformer" in zoo and "pixel_shuffle" in zoo and len(zoo) >= 10
    assert set(LAB_PROJECTOR_SPECS) == zoo
    for kind in zoo:
        spec = lab_projector_spec(kind, llm_dim=64, grid_side=8)
        assert spec.kind == kind


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("baseline", ("baseline", None)),
        ("dci-efficient", ("dci-efficient", None)),
        ("dci+pixel_shuffle", ("dci", "pixel_shuffle")),
        ("baseline+qformer", ("baseline", "qformer")),
        ("sti+perceiver", ("sti", "perceiver")),
        ("sci+linear", ("sci", "linear")),
    ],
)
def test_parse_lab_connector_splits_fusion_and_projector_kind(name, parts):
    assert parse_lab_connector(name) == parts


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        (
            "qformer",
            ValueError,
            r"name must be one of \(.*\) or '<fusion>\+<projector kind>' "
            r"\(fusion: baseline, sti, sci, dci; projector kind: .*qformer.*\), got 'qformer'",
        ),
        (
            "dci-efficient+qformer",
            ValueError,
            r"name='dci-efficient\+qformer': the fusion before '\+' must be one of "
            r"\('baseline', 'sti', 'sci', 'dci'\) .*got 'dci-efficient'",
        ),
        (
            "dci+nope",
            ValueError,
            r"name='dci\+nope': 'nope' after '\+' is no registered projector kind; known: .*ldpv2",
        ),
        ("dci+", ValueError, r"name='dci\+': '' after '\+' is no registered projector kind"),
        (3, TypeError, r"name must be a lab connector name \(a str\), got 3"),
    ],
)
def test_parse_lab_connector_refuses_bad_names(name, error, message):
    with pytest.raises(error, match=message):
        parse_lab_connector(name)


def test_a_zoo_connector_is_its_fusion_preset_with_the_lab_size_projector():
    config = lab_connector("dci+qformer", **LAB_SIZE)
    dci = lab_connector("dci", **LAB_SIZE)
    assert config.fusion == dci.fusion and config.resample is None
    assert config.projector == lab_projector_spec("qformer", llm_dim=64, grid_side=8)
    assert (config.projector.num_queries, config.projector.depth) == (16, 2)
    assert config.projector.hidden_size == 64  # the LLM width
    assert (
        lab_connector("sti+perceiver", **LAB_SIZE).fusion == lab_connector("sti", **LAB_SIZE).fusion
    )


def _zoo_connectors() -> list[str]:
    return [
        f"{fusion}+{kind}"
        for kind in sorted(LAB_PROJECTOR_SPECS)
        for fusion in LAB_FUSIONS
        if fusion != "sti" or kind in SET_READERS
    ]


@pytest.mark.parametrize("name", _zoo_connectors())
def test_every_lab_size_zoo_connector_runs_at_the_lab_widths_and_grid(name):
    """A quarter of the 8x8 grid's tokens (the efficient DCI's budget), at the LLM width."""
    config = lab_connector(name, **LAB_SIZE)
    torch.manual_seed(0)
    connector = DenseConnector(config)
    features = {layer: torch.randn(2, 64, 32) for layer in range(25)}  # H[0..24], 8x8 patches
    output = connector(features, (8, 8))
    assert output.shape == (2, 16, 64)
    assert connector.num_tokens((8, 8)) == 16
    # The quick budget's 4x4 grid (48 px, patch 12; widths 16 and 32): 2x2 tokens.
    quick = lab_connector(name, vision_dim=16, llm_dim=32, grid_side=4)
    with torch.device("meta"):
        assert DenseConnector(quick).num_tokens((4, 4)) == 4


@pytest.mark.parametrize("kind", sorted(set(LAB_PROJECTOR_SPECS) - set(SET_READERS)))
def test_sti_into_a_grid_projector_is_refused_with_the_contract_error(kind):
    with pytest.raises(
        ValueError,
        match=rf"lab connector 'sti\+{kind}' cannot run at the lab's 8x8 grid \(vision width 32, "
        rf"LLM width 64\): the fusion 'sti' gives 16 tokens after its 8x8 grid that form no "
        rf"grid, but the projector '{kind}' works on a whole token grid",
    ):
        lab_connector(f"sti+{kind}", **LAB_SIZE)


def test_a_grid_a_zoo_connector_cannot_take_is_refused_naming_it():
    odd = EncoderPretraining(image_size=56, patch_size=8)  # a 7x7 grid
    with pytest.raises(
        ValueError,
        match=r"lab connector 'dci\+pixel_shuffle' cannot run at the lab's 7x7 grid .*: a pixel "
        r"shuffle by factor 2 needs both grid sides divisible by 2, got grid 7x7",
    ):
        LabConfig(encoder=odd, connectors=("dci", "dci+pixel_shuffle"))
    assert LabConfig(encoder=odd, connectors=("dci", "dci+qformer")).connectors[1] == "dci+qformer"


def test_cli_lab_refuses_a_zoo_connector_that_cannot_run_before_any_work(tmp_path, capsys):
    output = tmp_path / "out"
    command = ["lab", "--quick", "--output", str(output), "--connectors"]
    assert main([*command, "baseline,sti+c_abstractor"]) == 2
    err = capsys.readouterr().err
    assert "mmconnect lab: lab connector 'sti+c_abstractor' cannot run at the lab's 4x4 grid" in err
    assert "the projector 'c_abstractor' works on a whole token grid" in err
    assert main([*command, "dci+mlp9"]) == 2
    assert "'mlp9' after '+' is no registered projector kind" in capsys.readouterr().err
    assert not output.exists()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScaledLinearSpec(ProjectorSpec):
    kind: str = dataclasses.field(default="lab_scaled_linear", init=False)
    scale: float = 2.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NeedsWidthSpec(ProjectorSpec):
    kind: str = dataclasses.field(default="lab_needs_width", init=False)
    width: int


@pytest.fixture
def user_projectors(monkeypatch):
    """Two user kinds without a lab-size entry, registered into a copy of the registry."""
    monkeypatch.setattr(projectors_module, "_PROJECTORS", projectors_module._PROJECTORS.copy())

    def build(in_dim: int, out_dim: int, **_: object) -> torch.nn.Module:
        return torch.nn.Linear(in_dim, out_dim)

    register_projector("lab_scaled_linear", build, spec=_ScaledLinearSpec)
    register_projector("lab_needs_width", build, spec=_NeedsWidthSpec)


def test_a_user_kind_without_a_lab_size_runs_its_spec_defaults(user_projectors):
    config = lab_connector("sci+lab_scaled_linear", **LAB_SIZE)
    assert config.projector == _ScaledLinearSpec()
    assert config.fusion == lab_connector("sci", **LAB_SIZE).fusion
    with pytest.raises(
        ValueError,
        match=r"lab connector 'dci\+lab_needs_width' cannot run .*: projector kind "
        r"'lab_needs_width' needs the parameters \['width'\]",
    ):
        LabConfig(connectors=("dci+lab_needs_width",))


def test_every_connector_of_a_seed_starts_from_the_same_llm(tmp_path):
    from mmconnect.integrations.applications.demo import DemoConfig, build_demo_model
    from mmconnect.integrations.applications.tiny_models import build_word_tokenizer

    tokenizer = build_word_tokenizer(["What colour is the circle ? red blue"])
    demo = DemoConfig(
        output_dir=str(tmp_path), seed=7, vision_width=16, vision_blocks=24, llm_width=32
    )
    states = []
    for kind in LAB_PRESETS:
        connector = lab_connector(kind, vision_dim=16, llm_dim=32, grid_side=8)
        model = build_demo_model(kind, demo, tokenizer, connector=connector)
        assert model.connector.config == connector
        states.append({**model.model.language_model.state_dict(), **model.lm_head.state_dict()})
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        for key, value in state.items():
            assert torch.equal(value, states[0][key]), key


# ---------------------------------------------------------------------------- statistics


def test_summarize_gives_the_mean_and_sample_std_over_seeds():
    runs = {
        "dci": {
            "0": {"accuracy": {"all": 0.5, "colour": 0.25}},
            "1": {"accuracy": {"all": 0.75, "colour": 0.5}},
            "2": {"accuracy": {"all": 1.0, "colour": 0.0}},
        },
        "baseline": {"5": {"accuracy": {"all": 0.125}}},
    }
    summary = summarize(runs)
    assert summary["dci"]["all"] == {"values": [0.5, 0.75, 1.0], "mean": 0.75, "std": 0.25}
    assert summary["dci"]["colour"] == {"values": [0.25, 0.5, 0.0], "mean": 0.25, "std": 0.25}
    assert summary["baseline"] == {"all": {"values": [0.125], "mean": 0.125, "std": None}}


def test_above_prior_counts_the_seeds_that_beat_the_text_only_prior():
    runs = {
        "baseline": {
            "0": {"accuracy": {"colour": 0.30, "count": 0.70, "all": 0.50}},
            "1": {"accuracy": {"colour": 0.20, "count": 0.60, "all": 0.40}},
            "2": {"accuracy": {"colour": 0.25, "count": 0.80, "all": 0.45}},
        }
    }
    prior = {"colour": 0.25, "count": 0.60, "all": 0.42, "shape": 0.33}
    comparison = above_prior(summarize(runs), prior)
    # A seed equal to the prior (colour 0.25, count 0.60) is not above it; "shape" has no runs.
    assert comparison["baseline"]["colour"]["seeds_above"] == 1
    assert comparison["baseline"]["count"]["seeds_above"] == 2
    assert comparison["baseline"]["all"]["seeds_above"] == 2
    assert comparison["baseline"]["colour"]["mean_difference"] == pytest.approx(0.0)
    assert comparison["baseline"]["count"]["mean_difference"] == pytest.approx(0.1)
    assert set(comparison["baseline"]) == {"colour", "count", "all"}
    assert comparison["baseline"]["colour"]["seeds"] == 3
    table = above_prior_table({"above_prior": comparison, "summary": summarize(runs)})
    assert table.splitlines()[0] == "| connector | colour | count | all |"
    assert table.splitlines()[2] == "| baseline | 1/3, +0.0 | 2/3, +10.0 | 2/3, +3.0 |"


def test_summarize_refuses_runs_with_different_question_types():
    runs = {"sci": {"0": {"accuracy": {"all": 0.5, "count": 1.0}}, "1": {"accuracy": {"all": 0.5}}}}
    with pytest.raises(
        ValueError, match=r"connector 'sci': the runs of seeds \['1'\] have no 'count'"
    ):
        summarize(runs)


def _summary(values: dict[str, dict[str, list[float]]]) -> dict:
    runs = {
        kind: {
            str(seed): {"accuracy": {t: per_seed[seed] for t, per_seed in by_type.items()}}
            for seed in range(len(next(iter(by_type.values()))))
        }
        for kind, by_type in values.items()
    }
    return summarize(runs)


def test_compare_connectors_pairs_by_seed_and_holm_adjusts_the_family():
    summary = _summary(
        {
            "baseline": {"colour": [0.2, 0.2, 0.2, 0.2, 0.2], "all": [0.4, 0.5, 0.4, 0.5, 0.4]},
            # colour: differences 0.1, 0.2, 0.3, 0.4, 0.5 -> mean 0.3, t = sqrt(18)
            "dci": {"colour": [0.3, 0.4, 0.5, 0.6, 0.7], "all": [0.4, 0.5, 0.4, 0.5, 0.4]},
            # all: one seed better, one worse -> mean 0
            "sci": {"colour": [0.2, 0.2, 0.2, 0.2, 0.2], "all": [0.5, 0.4, 0.4, 0.5, 0.4]},
        }
    )
    tests = compare_connectors(summary, "baseline")
    assert tests["reference"] == "baseline" and tests["family_size"] == 4
    assert list(tests["comparisons"]) == ["dci", "sci"]
    colour = tests["comparisons"]["dci"]["colour"]
    assert colour["mean_difference"] == pytest.approx(0.3, abs=1e-12)
    assert colour["t_statistic"] == pytest.approx(18**0.5, abs=1e-9)
    # t = sqrt(18) with 4 degrees of freedom: closed form 2 * (1 - F(t)) = 0.013236...
    u = 1 + 18 / 4
    p_value = 2 * (1 - (0.5 + 3 / 8 * (18**0.5 / u**0.5) * (1 - 18 / (12 * u))))
    assert colour["t_p_value"] == pytest.approx(p_value, abs=1e-12)
    assert colour["sign_flip_p_value"] == 2 / 32
    # Holm over 4: the smallest p (this one; the others are 1) times 4 = 0.0529: above 0.05.
    assert colour["holm_p_value"] == pytest.approx(4 * p_value, abs=1e-12)
    assert 0.05 < colour["holm_p_value"] < 0.06 and colour["significant"] is False
    assert tests["comparisons"]["dci"]["all"]["t_p_value"] == 1.0  # identical accuracies
    overall = tests["comparisons"]["sci"]["all"]
    assert overall["differences"] == pytest.approx([0.1, -0.1, 0.0, 0.0, 0.0])
    assert overall["t_statistic"] == pytest.approx(0.0, abs=1e-12)
    assert overall["sign_flip_p_value"] == 1.0 and overall["significant"] is False
    assert significance_summary(tests).endswith(
        "no connector differs significantly from baseline on any question type."
    )
    table = comparison_table(tests)
    assert "| dci | colour | +30.0 ± 15.8 | 4.24 | 0.0132 | 0.0529 | 0.0625 |" in table
    assert "| sci | all | +0.0 ± 7.1 | 0.00 | 1.0000 | 1.0000 | 1.0000 |" in table

    # Without sci the family has two members: Holm doubles p to 0.0265, significant.
    pair = compare_connectors({k: summary[k] for k in ("baseline", "dci")}, "baseline")
    assert pair["family_size"] == 2
    assert pair["comparisons"]["dci"]["colour"]["holm_p_value"] == pytest.approx(2 * p_value)
    assert pair["comparisons"]["dci"]["colour"]["significant"] is True
    words = significance_summary(pair)
    assert words == (
        "Paired over 5 seeds, 2 comparisons with baseline, Holm-corrected at 0.05: dci is above "
        "baseline on colour (+30.0 points, Holm-adjusted p = 0.0265). No other difference is "
        "significant."
    )
    assert "| **dci** | **colour** | **+30.0 ± 15.8** | **4.24** |" in comparison_table(pair)


def test_compare_connectors_needs_two_seeds_and_another_connector():
    one_seed = _summary({"baseline": {"all": [0.4]}, "dci": {"all": [0.5]}})
    assert compare_connectors(one_seed, "baseline") is None
    alone = _summary({"baseline": {"all": [0.4, 0.5]}})
    assert compare_connectors(alone, "baseline") is None
    with pytest.raises(ValueError, match="reference 'sci' is not one of the connectors"):
        compare_connectors(alone, "sci")
    assert reference_connector(("dci", "baseline")) == "baseline"
    assert reference_connector(("dci", "sci")) == "dci"


def test_text_prior_answers_each_question_with_its_most_frequent_training_answer(tmp_path):
    def turn(human, gpt):
        return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]

    colour, count = "What colour is the circle? Answer.", "How many objects are there? Answer."
    stage2 = [
        {"id": "a", "conversations": turn(f"<image>\n{colour}", "red") + turn(count, "two")},
        {"id": "b", "conversations": turn(f"<image>\n{colour}", "blue")},
        {"id": "c", "conversations": turn(f"<image>\n{count}", "one") + turn(colour, "blue")},
    ]
    evaluation = [
        {
            "question_type": "colour",
            "answer": "blue",
            "conversations": turn(f"<image>\n{colour}", "blue"),
        },
        {
            "question_type": "count",
            "answer": "one",
            "conversations": turn(f"<image>\n{count}", "one"),
        },
        {
            "question_type": "position",
            "answer": "top",
            "conversations": turn("<image>\nWhere?", "top"),
        },
    ]
    (tmp_path / "stage2.json").write_text(json.dumps(stage2))
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    accuracy = text_prior_accuracy(tmp_path / "stage2.json", tmp_path / "eval.json")
    # colour: blue 2 of 3; count: a 1-1 tie, the first seen ("two") wins; "Where?" never seen.
    assert accuracy == {"all": 1 / 3, "colour": 1.0, "count": 0.0, "position": 0.0}


# ---------------------------------------------------------------------------- encoder data


def test_patch_labels_mark_covered_patches_with_their_shape_and_owner():
    spec = SceneSpec()
    for seed in range(20):
        scene = sample_scene(random.Random(seed), spec)
        masks = object_masks(scene, 64)
        shape, owner = patch_labels(scene, masks, 8, spec.shapes)
        assert shape.shape == owner.shape == (64,)
        for index, obj in enumerate(scene.objects):
            blocks = masks[index].reshape(8, 8, 8, 8).mean(axis=(1, 3)).reshape(64)
            full = np.flatnonzero(blocks == 1.0)  # patches inside the object: always its own
            assert (owner[full] == index).all() and (
                shape[full] == 1 + spec.shapes.index(obj.shape)
            ).all()
        coverage = masks.reshape(len(masks), 8, 8, 8, 8).mean(axis=(2, 4)).reshape(len(masks), 64)
        background = coverage.max(axis=0) < MIN_PATCH_COVERAGE
        assert (shape[background] == 0).all() and (owner[background] == -1).all()
        assert (shape[~background] > 0).all()


def test_recoloured_views_share_the_layout_and_differ_in_colour():
    config = EncoderPretraining(batch_size=3)
    pixels, labels, colours = recoloured_batch(
        random.Random(0), config, image_processor(64), SceneSpec()
    )
    assert pixels.shape == (6, 3, 64, 64) and labels.shape == (3, 64)
    white = pixels[:1].amax(dim=(0, 2, 3))  # the background is the brightest pixel of every image
    objects = (pixels < white[None, :, None, None] - 1e-4).any(dim=1)  # [6, 64, 64]
    assert torch.equal(objects[:3], objects[3:])
    assert not torch.allclose(pixels[:3], pixels[3:])
    # Every patch's colour target: white on background patches, the covering object's colour
    # (the pixels' own, undone from CLIP's normalisation) on object patches.
    assert colours.shape == (6, 64, 3)
    background = labels.repeat(2, 1) == 0
    assert torch.equal(colours[background], torch.ones(int(background.sum()), 3))
    mean = torch.tensor(image_processor(64).image_mean)[:, None, None]
    std = torch.tensor(image_processor(64).image_std)[:, None, None]
    rgb = (pixels * std + mean) * 2 - 1  # [6, 3, 64, 64] in [-1, 1]
    patches = rgb.reshape(6, 3, 8, 8, 8, 8).permute(0, 2, 4, 3, 5, 1).reshape(6, 64, 64, 3)
    for image, patch in torch.nonzero(~background).tolist():
        distances = (patches[image, patch] - colours[image, patch]).abs().amax(-1)
        assert (distances < 0.01).any()  # the object's colour is among the patch's pixels


def test_variance_share_is_the_between_class_share_of_the_variance():
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    mixed = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    # Class means +-(1, 0) against within-class spread (0, +-3): between 1 of a total 1 + 9.
    half = torch.tensor([[1.0, 3.0], [1.0, -3.0], [-1.0, 3.0], [-1.0, -3.0]])
    assert variance_share(separated, labels) == [1.0]
    assert variance_share(mixed, labels) == [0.0]
    assert variance_share(torch.stack([separated, mixed, half]), labels) == [1.0, 0.0, 0.1]


def test_linear_probe_separates_separable_classes_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    centres = torch.randn(3, 8, generator=generator) * 4
    features = centres[labels] + torch.randn(600, 8, generator=generator)
    assert linear_probe(features[:450], labels[:450], features[450:], labels[450:]) == 1.0
    noise = torch.randn(600, 8, generator=generator)
    assert linear_probe(noise[:450], labels[:450], noise[450:], labels[450:]) < 0.5
    # Several probes fitted together give each one's own result.
    both = linear_probe(
        torch.stack([features[:450], noise[:450]]),
        labels[:450],
        torch.stack([features[450:], noise[450:]]),
        labels[450:],
    )
    alone = linear_probe(noise[:450], labels[:450], noise[450:], labels[450:])
    assert both[0] == 1.0 and abs(float(both[1]) - float(alone)) <= 0.02


def test_probe_layers_reports_every_hidden_state():
    from transformers import CLIPVisionModel

    config = EncoderPretraining(width=16, heads=2, blocks=3, probe_images=16)
    torch.manual_seed(0)
    model = CLIPVisionModel(config.vision_config()).eval()
    probe = probe_layers(model, config)
    assert set(probe) == {"colour", "shape"}
    assert len(probe["colour"]) == len(probe["shape"]) == 4  # H[0..3]
    assert all(0.0 <= value <= 1.0 for values in probe.values() for value in values)
    assert probe["colour"][0] > 0.5  # flat colours are linear in the patch embedding; chance 1/6


# ---------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory) -> Path:
    """``mmconnect lab --quick`` in a fresh process, as a user runs it (two worker processes,
    the lab's default on two cores); its stdout and stderr are kept beside the results."""
    output = tmp_path_factory.mktemp("lab")
    command = [sys.executable, "-m", "mmconnect.integrations.cli", "lab", "--quick"]
    finished = subprocess.run(
        [*command, "--jobs", "2", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    (output / "stdout.txt").write_text(finished.stdout)
    (output / "stderr.txt").write_text(finished.stderr)
    return output


@pytest.mark.slow
def test_quick_lab_reports_every_connector_seed_and_question_type(quick_lab):
    results = json.loads((quick_lab / "results.json").read_text())
    assert results["config"]["seeds"] == [0, 1]
    assert list(results["runs"]) == list(LAB_PRESETS) == list(results["summary"])
    assert results["visual_tokens"] == {
        "baseline": 16,
        "sti": 20,
        "sci": 16,
        "dci": 16,
        "dci-efficient": 4,
    }  # 48 px / patch 12 in the quick budget
    for kind, by_seed in results["runs"].items():
        assert list(by_seed) == ["0", "1"]
        for run in by_seed.values():
            assert set(run["accuracy"]) == QUESTION_TYPES
            assert all(0.0 <= value <= 1.0 for value in run["accuracy"].values())
        for question_type in QUESTION_TYPES:
            values = [by_seed[seed]["accuracy"][question_type] for seed in ("0", "1")]
            entry = results["summary"][kind][question_type]
            assert entry["values"] == values
            assert entry["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert entry["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert set(results["text_prior"]) == QUESTION_TYPES
    encoder = results["encoder"]
    assert set(encoder["connector_input_probe"]) == set(LAB_PRESETS)
    assert encoder["connector_input_probe"]["sti"] is None
    assert encoder["connector_input_probe"]["dci-efficient"] is None
    assert len(encoder["probe"]["colour"]) == len(encoder["probe"]["shape"]) == 25
    assert 0.0 <= encoder["shape_accuracy"] <= 1.0


@pytest.mark.slow
def test_quick_lab_gives_every_connector_the_same_budget(quick_lab):
    results = json.loads((quick_lab / "results.json").read_text())
    for seed in ("0", "1"):
        budgets = []
        for kind, by_seed in results["runs"].items():
            run = by_seed[seed]
            stages = [
                {key: value for key, value in stage.items() if key != "output_dir"}
                for stage in run["stage_configs"]
            ]
            budgets.append(stages)
            # stage 1 trains the LLM with the connector (stage1_trains_llm), so both stages
            # run as "instruct"; stage 1 differs by its data (the captions) and its budget
            assert [stage["stage"] for stage in stages] == ["instruct", "instruct"]
            assert stages[0]["seed"] == int(seed)
            assert (
                run["connector"]
                == lab_connector(kind, vision_dim=16, llm_dim=32, grid_side=4).to_dict()
            )
        assert all(budget == budgets[0] for budget in budgets)
        assert budgets[0][0]["max_steps"] == 2 and budgets[0][1]["max_steps"] == 3


@pytest.mark.slow
def test_quick_lab_writes_the_markdown_table_and_charts(quick_lab):
    markdown = (quick_lab / "results.md").read_text()
    results = json.loads((quick_lab / "results.json").read_text())
    for kind in LAB_PRESETS:
        entry = results["summary"][kind]["all"]
        cell = f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {kind} |"))
        assert row.endswith(f"| {cell} |"), row
    assert re.search(r"\| colour \| [\d.]+ \|", markdown)  # the probe table
    assert "stage 1 (captions, connector and LLM): 2 steps" in markdown  # quick: the LLM too
    for name in ("accuracy.png", "encoder_probe.png"):
        assert (quick_lab / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_lab_tests_every_connector_against_the_baseline(quick_lab):
    results = json.loads((quick_lab / "results.json").read_text())
    tests = results["statistics"]
    assert tests["reference"] == "baseline" and tests["level"] == 0.05
    assert list(tests["comparisons"]) == ["sti", "sci", "dci", "dci-efficient"]
    assert tests["family_size"] == 4 * len(QUESTION_TYPES)
    # What results.json holds is what the paired tests give on the per-seed accuracies.
    expected = compare_connectors(results["summary"], "baseline")
    assert json.loads(json.dumps(expected)) == tests
    markdown = (quick_lab / "results.md").read_text()
    assert "## Paired tests against baseline" in markdown
    assert significance_summary(tests) in markdown
    assert comparison_table(tests) in markdown
    assert significance_summary(tests) in (quick_lab / "stdout.txt").read_text()
    # Every connector against the text-only prior, from the same per-seed accuracies.
    assert results["above_prior"] == json.loads(
        json.dumps(above_prior(results["summary"], results["text_prior"]))
    )
    assert above_prior_table(results) in markdown


@pytest.mark.slow
def test_quick_lab_trains_in_worker_processes_and_shows_progress(quick_lab):
    results = json.loads((quick_lab / "results.json").read_text())
    assert results["jobs"] == 2
    stderr = (quick_lab / "stderr.txt").read_text()
    assert "lab: 10 runs, 2 at a time in separate processes (1 thread(s) each)" in stderr
    finished = re.findall(r"lab: run (\d+)/10 done \(([\w-]+), seed (\d)", stderr)
    assert [int(count) for count, _, _ in finished] == list(range(1, 11))
    assert {(kind, int(seed)) for _, kind, seed in finished} == {
        (kind, seed) for kind in LAB_PRESETS for seed in (0, 1)
    }
    assert results["seconds"]["total_cpu"] > 0


def test_lab_jobs_is_one_per_core_at_most_one_per_run(monkeypatch):
    from mmconnect.integrations.applications import demo

    monkeypatch.setattr(demo, "available_cores", lambda: 2)
    assert lab_jobs(quick_config()) == 2
    assert lab_jobs(quick_config(jobs=5)) == 5
    assert lab_jobs(quick_config(jobs=5, seeds=(0,), connectors=("dci",))) == 1
    with pytest.raises(
        ValueError, match=r"jobs must be a positive int, got 0; or None \(one per core\)"
    ):
        quick_config(jobs=0)


@pytest.mark.slow
def test_pretraining_objectives_set_how_much_colour_the_read_layer_keeps():
    """What the lab's encoder objectives do, at small size (6 blocks, 100 steps; at the lab's
    size the shape task also makes colour a smaller share of hidden_states[-2] than of the
    shallow layers, which the lab measures and reports). Shape alone lets colour shrink with
    depth; the colour objective keeps it a large share of hidden_states[-2]; the colour-jitter
    invariance instead removes it there, so that a linear probe loses it."""
    from mmconnect.integrations.applications.lab_encoder import (
        pretrain_encoder,
        probe_accuracy,
        probe_data,
    )

    config = EncoderPretraining(
        width=16, heads=2, blocks=6, steps=100, batch_size=16, probe_images=100
    )

    def measured(objectives: EncoderPretraining) -> tuple[list[float], list[float]]:
        data = probe_data(pretrain_encoder(objectives).model, objectives)
        share = variance_share(data.features, data.colour)
        return share, probe_accuracy(data.features, data.colour, data.train)

    shape_only, _ = measured(dataclasses.replace(config, colour_weight=0.0))
    assert shape_only[0] - shape_only[-2] > 0.05  # measured: 0.30 -> 0.19
    with_colour, probe = measured(config)
    assert with_colour[-2] - shape_only[-2] > 0.15  # measured (weight 6): 0.46 against 0.19
    assert min(probe) > 0.95  # measured: 0.992
    invariant = dataclasses.replace(
        config, shape_layer=-1, colour_weight=0.0, invariance_weight=5.0
    )
    _, dropped = measured(invariant)
    assert dropped[0] - dropped[-2] > 0.2  # measured: 0.98 -> 0.59
    assert dropped[0] > 0.9


def test_a_tiny_lab_run_with_two_zoo_connectors_reports_them(tmp_path):
    """The quick budget cut to one seed and a step per stage: the zoo connectors go through the
    whole lab (same budget, rows in results.md / results.json, the charts)."""
    output = tmp_path / "lab"
    encoder = EncoderPretraining(
        image_size=48, patch_size=12, width=16, heads=2, steps=2, batch_size=4, probe_images=16
    )
    names = ("dci+pixel_shuffle", "sti+qformer")
    config = quick_config(
        output_dir=str(output),
        seeds=(0,),
        connectors=names,
        encoder=encoder,
        num_train_images=8,
        num_eval_images=4,
        stage1_steps=1,
        stage2_steps=1,
        jobs=1,  # in this process (the quick run above covers the worker processes)
        show_progress=False,
    )
    returned = run_lab(config)
    results = json.loads((output / "results.json").read_text())
    assert returned["summary"] == results["summary"]
    assert list(results["runs"]) == list(results["summary"]) == list(names)
    assert results["visual_tokens"] == {"dci+pixel_shuffle": 4, "sti+qformer": 4}  # 2x2 of 4x4
    assert results["presets"] == {
        "dci+pixel_shuffle": "dc-dci-clip-l-336",
        "sti+qformer": "dc-sti-clip-l-336",
    }
    assert results["projectors"]["dci+pixel_shuffle"] == {"kind": "pixel_shuffle", "factor": 2}
    assert results["projectors"]["sti+qformer"]["num_queries"] == 4
    budgets = []
    for name in names:
        run = results["runs"][name]["0"]
        assert (
            run["connector"]
            == lab_connector(name, vision_dim=16, llm_dim=32, grid_side=4).to_dict()
        )
        assert set(run["accuracy"]) >= {"all"}
        budgets.append(
            [
                {k: v for k, v in stage.items() if k != "output_dir"}
                for stage in run["stage_configs"]
            ]
        )
    assert budgets[0] == budgets[1]
    assert [stage["max_steps"] for stage in budgets[0]] == [1, 1]
    probes = results["encoder"]["connector_input_probe"]
    assert probes["sti+qformer"] is None and set(probes["dci+pixel_shuffle"]) == {
        "colour",
        "shape",
        "colour_share",
    }
    markdown = (output / "results.md").read_text()
    assert accuracy_table(results) in markdown
    rows = {
        name: next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        for name in names
    }
    assert rows["sti+qformer"].startswith("| sti+qformer | `dc-sti-clip-l-336` | `qformer` | 4 |")
    assert rows["sti+qformer"].endswith(
        f"| {100 * results['summary']['sti+qformer']['all']['mean']:.1f} |"  # one seed: no std
    )
    assert rows["dci+pixel_shuffle"].startswith(
        "| dci+pixel_shuffle | `dc-dci-clip-l-336` | `pixel_shuffle` | 4 |"
    )
    for chart in ("accuracy.png", "overall.png", "encoder_probe.png"):
        assert (output / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
