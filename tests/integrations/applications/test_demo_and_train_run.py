"""``mmconnect demo`` (quick budget) and ``mmconnect train --config FILE.yaml`` end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from mmconnect.integrations.applications.demo import DemoConfig, run_demo
from mmconnect.integrations.cli import main
from mmconnect.integrations.training.run_file import DataSettings, RunFileError, load_train_run
from tests.support.saved_models import save_tiny_dense_llava


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output", str(output)]) == 0
    return output


@pytest.mark.slow
def test_quick_demo_trains_both_connectors_and_reports(demo_dir, capsys):
    results = json.loads((demo_dir / "results.json").read_text())
    assert list(results["connectors"]) == ["baseline", "dci"]
    for entry in results["connectors"].values():
        assert entry["visual_tokens"] == 64  # 64 px / patch 8
        assert set(entry["accuracy"]) == {"all", "colour", "count", "position", "shape"}
        assert all(0.0 <= value <= 1.0 for value in entry["accuracy"].values())
        assert len(entry["stage1_losses"]) > 0 and len(entry["stage2_losses"]) > 0
        assert (Path(entry["model_dir"]) / "model.safetensors").is_file()
    png = (demo_dir / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _write_run(tmp_path: Path, demo_dir: Path, **changes) -> Path:
    run = {
        "model": str(demo_dir / "dci" / "stage1"),
        "output_dir": str(tmp_path / "run"),
        "data": {
            "image_folder": str(demo_dir / "data"),
            "stage1": str(demo_dir / "data" / "stage1.json"),
            "stage2": str(demo_dir / "data" / "stage2.json"),
        },
        "stage1": {"max_steps": 2, "per_device_train_batch_size": 4, "disable_tqdm": True},
        "stage2": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "disable_tqdm": True,
            "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        **changes,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


@pytest.mark.slow
def test_train_from_a_yaml_file_runs_both_stages(demo_dir, tmp_path, capsys):
    # A stage folder the user made: refused, then trained into with --overwrite, and the user's
    # file in it survives byte for byte.
    (tmp_path / "run" / "stage1").mkdir(parents=True)
    (tmp_path / "run" / "stage1" / "notes.txt").write_bytes(b"mine\n")
    path = str(_write_run(tmp_path, demo_dir))
    assert main(["train", "--config", path]) == 2
    assert "stage folder" in capsys.readouterr().err
    assert main(["train", "--config", path, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "align: final loss" in out and "instruct: final loss" in out
    for stage in ("stage1", "stage2"):
        directory = tmp_path / "run" / stage
        assert (directory / "model.safetensors").is_file()
        assert (directory / "processor_config.json").is_file()
        assert (directory / ".mmconnect-train").is_file()
    assert (tmp_path / "run" / "stage1" / "notes.txt").read_bytes() == b"mine\n"


@pytest.mark.slow
def test_training_data_with_a_missing_image_is_reported_with_its_id_and_path(
    demo_dir, tmp_path, capsys
):
    records = json.loads((demo_dir / "data" / "stage1.json").read_text())
    records[1]["image"] = "images/no_such_file.png"
    broken = tmp_path / "stage1.json"
    broken.write_text(json.dumps(records))
    path = _write_run(
        tmp_path, demo_dir, data={"image_folder": str(demo_dir / "data"), "stage1": str(broken)}
    )
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert records[1]["id"] in err and "no_such_file.png" in err


def test_demo_refuses_an_unknown_connector(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path), "--connectors", "baseline,mlp"]) == 2
    assert (
        "connectors[1] must be one of ('baseline', 'sti', 'sci', 'dci', 'dci-efficient'), got 'mlp'"
        in (capsys.readouterr().err)
    )


@pytest.mark.slow
def test_demo_takes_the_tower_and_llm_from_local_checkpoints(tmp_path):
    """--vision / --llm: the trained model starts from those weights (tower frozen: unchanged)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from mmconnect.integrations.applications.synthetic import text_vocabulary
    from mmconnect.integrations.applications.tiny_models import (
        build_word_tokenizer,
        tiny_text_config,
        tiny_vision_tower,
    )

    vision = tiny_vision_tower(
        "clip", seed=5, blocks=6, width=48, heads=4, image_size=64, patch_size=16
    )
    vision.save_pretrained(tmp_path / "vision")
    texts = [" ".join(text_vocabulary()), "A chat between USER : ASSISTANT : \n , . ? -"]
    tokenizer = build_word_tokenizer([*texts, "assistant user"])
    llm = LlamaForCausalLM(tiny_text_config(width=64, blocks=2, heads=4, vocab_size=len(tokenizer)))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    output = tmp_path / "demo"
    arguments = ["demo", "--quick", "--output", str(output), "--connectors", "dci"]
    assert (
        main([*arguments, "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm")])
        == 0
    )
    results = json.loads((output / "results.json").read_text())
    assert results["connectors"]["dci"]["visual_tokens"] == 16  # 64 px / patch 16
    saved = load_file(str(output / "dci" / "stage2" / "model.safetensors"))
    tower = {
        key.removeprefix("model.vision_tower."): value
        for key, value in saved.items()
        if "vision_tower" in key
    }
    for key, value in vision.state_dict().items():
        assert torch.equal(tower[key], value), key


@pytest.mark.slow
def test_demo_takes_tower_and_llm_from_a_saved_dense_llava(tmp_path):
    """--vision / --llm may name a saved Dense LLaVA folder: its tower and its LLM are used."""
    import torch
    from safetensors.torch import load_file

    dense = save_tiny_dense_llava(tmp_path / "dense")
    output = tmp_path / "demo"
    arguments = ["demo", "--quick", "--output", str(output), "--connectors", "dci"]
    assert main([*arguments, "--vision", str(dense), "--llm", str(dense)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["connectors"]["dci"]["visual_tokens"] == 16  # the dense tower: 48 px / 12
    source = load_file(str(dense / "model.safetensors"))
    trained = load_file(str(output / "dci" / "stage2" / "model.safetensors"))
    towers = [key for key in source if key.startswith("model.vision_tower.")]
    assert towers
    for key in towers:  # the tower is frozen in both stages: still the dense folder's
        assert torch.equal(trained[key], source[key]), key


# ---------------------------------------------------------------------------- demo arguments


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"connectors": ()}, ValueError, "connectors must name at least one of baseline"),
        ({"connectors": ("dci", "dci")}, ValueError, "connectors must be distinct, got dci, dci"),
        (
            {"connectors": "dci"},
            TypeError,
            "connectors must be a sequence of demo connector names, got 'dci' (str)",
        ),
        ({"connectors": ("mlp",)}, ValueError, "connectors[0] must be one of ('baseline', "),
        ({"num_threads": 0}, ValueError, "num_threads must be a positive int, got 0"),
        ({"num_threads": 2.0}, TypeError, "num_threads must be a positive int, got 2.0 (float)"),
        ({"stage1_steps": -1}, ValueError, "stage1_steps must be a positive int, got -1"),
        ({"stage2_learning_rate": 0}, ValueError, "stage2_learning_rate must be a positive number"),
        (
            {"stage2_learning_rate": "1e-3"},
            TypeError,
            "stage2_learning_rate must be a positive number, got '1e-3' (str)",
        ),
        ({"seed": "0"}, TypeError, "seed must be an int, got '0' (str)"),
        (
            {"image_size": 20},
            ValueError,
            "image_size must be >= 36 (the synthetic shapes need it), got 20",
        ),
        ({"image_size": 60}, ValueError, "image_size (60) must be a multiple of patch_size (8)"),
        ({"jobs": 0}, ValueError, "jobs must be a positive int, got 0; or None (automatic)"),
        ({"jobs": "2"}, TypeError, "jobs must be a positive int, got '2' (str); or None"),
    ],
)
def test_demo_config_refuses_bad_input(changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        DemoConfig(**changes)


def test_demo_refuses_a_bad_checkpoint_before_writing_anything(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"llm_path \(--llm\) '.*not-a-model' has no config.json"
    ):
        run_demo(
            DemoConfig(output_dir=str(tmp_path / "out"), llm_path=str(tmp_path / "not-a-model"))
        )
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_folder_it_did_not_create_unless_overwrite(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stage1.json").write_text("[]\n")
    with pytest.raises(FileExistsError, match=r"\(data\) and was not created by mmconnect demo"):
        run_demo(DemoConfig(output_dir=str(tmp_path), num_threads=1))
    assert (tmp_path / "data" / "stage1.json").read_text() == "[]\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "stage1.json"]


# ---------------------------------------------------------------------------- run files


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> Path:
    """A saved tiny Dense LLaVA and (empty) data files a run file can point at."""
    root = tmp_path_factory.mktemp("run-inputs")
    save_tiny_dense_llava(root / "model")
    (root / "images").mkdir()
    for name in ("stage1.json", "stage2.json"):
        (root / name).write_text("[]\n")
    return root


def _run_file(root: Path, tmp_path: Path, text: str | None = None, **changes) -> Path:
    run = {
        "model": str(root / "model"),
        "output_dir": str(tmp_path / "out"),
        "data": {
            "image_folder": str(root / "images"),
            "stage1": str(root / "stage1.json"),
            "stage2": str(root / "stage2.json"),
        },
        "stage1": {"max_steps": 2},
        "stage2": {"max_steps": 2, "lora": {"rank": 4, "alpha": 8}},
        **changes,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run) if text is None else text)
    return path


def _problems(path: Path, **options) -> list[str]:
    with pytest.raises(RunFileError) as error:
        load_train_run(path, **options)
    assert str(error.value) == "\n".join(error.value.problems)
    prefix = f"{path}:"
    assert all(line.startswith(prefix) for line in error.value.problems)
    return [line.removeprefix(prefix) for line in error.value.problems]


def test_a_good_run_file_loads_with_numbers_written_as_yaml_text(run_inputs, tmp_path):
    text = yaml.safe_dump(
        {
            "model": str(run_inputs / "model"),
            "output_dir": str(tmp_path / "out"),
            "data": {
                "image_folder": str(run_inputs / "images"),
                "stage1": str(run_inputs / "stage1.json"),
            },
            "stage1": {"max_steps": 3},
        }
    ).replace("max_steps: 3", "max_steps: 3\n  learning_rate: 1e-3\n  warmup_ratio: 0.1")
    path = _run_file(run_inputs, tmp_path, text=text)
    assert yaml.safe_load(path.read_text())["stage1"]["learning_rate"] == "1e-3"  # PyYAML: text
    run = load_train_run(path)
    stage = run.stage_config("align")
    assert (stage.learning_rate, stage.max_steps, stage.warmup_ratio) == (0.001, 3, 0.1)
    assert [name for name, _, _ in run.stages()] == ["align"]
    assert not (tmp_path / "out").exists()  # loading writes nothing


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"stage1": {"max_steps": "ten"}},
            ["stage1.max_steps: expected a whole number, got 'ten'"],
        ),
        (
            {"stage1": {"max_steps": 0}},
            ["stage1.max_steps: must be a positive int, got 0; or -1 to train num_train_epochs"],
        ),
        (
            {"stage1": {"learning_rate": "fast"}},
            ["stage1.learning_rate: expected a number, got 'fast'"],
        ),
        (
            {"stage1": {"learning_rate": 0}},
            ["stage1.learning_rate: must be a positive number, got 0.0; None: recipe default"],
        ),
        ({"stage1": {"bf16": "yes"}}, ["stage1.bf16: expected true or false, got 'yes'"]),
        (
            {"data": None},
            [
                "data.image_folder: missing (required)",
                "data: no stage has data: set stage1 and/or stage2 (LLaVA JSON files)",
            ],
        ),
        (
            {"data": ["images"]},
            [
                "data: expected a mapping of DataSettings fields (key: value lines), got list ['images']"
            ],
        ),
        (
            {"stage1": [{"max_steps": 2}]},
            [
                "stage1: expected a mapping of StageConfig fields (key: value lines), got list [{'max_steps': 2}]"
            ],
        ),
        (
            {"stage2": {"lora": {"rank": -4}}},
            ["stage2.lora.rank: must be a positive int, got -4"],
        ),
        (
            {"stage2": {"lora": {"rank": 4, "alpa": 8}}},
            ["stage2.lora.alpa: unknown key; known keys: alpha, dropout, rank, target_modules"],
        ),
        (
            {"stage2": {"lora": {"dropout": 1.5}}},
            ["stage2.lora.dropout: must be a number in [0, 1), got 1.5"],
        ),
        (
            {"stage1": {"lora": {"rank": 4}}},
            ["stage1: lora is for stage 'instruct'; stage 'align' trains only the connector"],
        ),
        (
            {"stage1": {"stage": "instruct"}},
            [
                "stage1.stage: is set by the run (the stage, and output_dir/<section>), not in the file"
            ],
        ),
        (
            {"extra": 1},
            ["extra: unknown key; known keys: data, model, output_dir, overwrite, stage1, stage2"],
        ),
        ({"overwrite": "please"}, ["overwrite: expected true or false, got 'please'"]),
        (
            {"data": {"stage1": "x.json"}},
            [
                "data.image_folder: missing (required)",
                "data.stage1: 'x.json' does not exist or is not a file",
            ],
        ),
        (
            {"data": {"image_folder": "no/such/folder"}},
            [
                "data.image_folder: 'no/such/folder' does not exist or is not a folder",
                "data: no stage has data: set stage1 and/or stage2 (LLaVA JSON files)",
            ],
        ),
        (
            {"model": "no/such/model"},
            [
                "model: 'no/such/model' does not exist or is not a folder; expected a saved Dense LLaVA folder (for example a demo's dci/stage1)"
            ],
        ),
    ],
)
def test_run_file_problems_are_reported_as_file_field_problem(
    run_inputs, tmp_path, changes, expected
):
    assert _problems(_run_file(run_inputs, tmp_path, **changes)) == expected


def test_data_max_length_is_checked_by_data_settings(run_inputs, tmp_path):
    data = {"image_folder": str(run_inputs / "images"), "stage1": str(run_inputs / "stage1.json")}
    path = _run_file(run_inputs, tmp_path, data={**data, "max_length": 0})
    assert _problems(path) == [
        "data.max_length: must be a positive int, got 0; None: no limit (tokens per sample)"
    ]
    with pytest.raises(TypeError, match=r"^max_length must be a positive int, got 2.5 \(float\)"):
        DataSettings(image_folder="images", max_length=2.5)


def test_an_unknown_learning_rate_schedule_is_named_with_the_known_ones(run_inputs, tmp_path):
    from transformers import SchedulerType

    path = _run_file(run_inputs, tmp_path, stage1={"lr_scheduler_type": "cosine_annealing"})
    known = [schedule.value for schedule in SchedulerType]
    assert _problems(path) == [
        f"stage1.lr_scheduler_type: expected one of {known}, got 'cosine_annealing'"
    ]


def test_a_run_file_without_data_says_what_data_needs(run_inputs, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {run_inputs / 'model'}\noutput_dir: out\n")
    assert _problems(path) == ["data: missing (required): image_folder and stage1 / stage2 files"]


def test_every_problem_of_a_run_file_is_reported_at_once(run_inputs, tmp_path):
    path = _run_file(
        run_inputs,
        tmp_path,
        stage1={"max_steps": "ten", "max_stepz": 2},
        stage2={"lora": {"rank": -4}},
    )
    problems = _problems(path)
    assert problems[0].startswith("stage1.max_stepz: unknown key; known keys: ")
    assert problems[1:] == [
        "stage1.max_steps: expected a whole number, got 'ten'",
        "stage2.lora.rank: must be a positive int, got -4",
    ]


def test_a_model_folder_without_a_processor_is_refused(run_inputs, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((run_inputs / "model" / "config.json").read_text())
    assert _problems(_run_file(run_inputs, tmp_path, model=str(model))) == [
        f"model: {str(model)!r} holds no processor (processor_config.json); save the model's "
        "processor there with processor.save_pretrained"
    ]


def test_a_model_of_a_family_with_per_size_token_counts_is_refused(run_inputs, tmp_path):
    """Run files encode one image-token count per image; the family registry says which
    families have one (LLaVA-NeXT's AnyRes count depends on the image size)."""
    from mmconnect.integrations.families.llava_next import DenseLlavaNextConfig
    from tests.support.llava_next_toys import CONNECTORS, llava_next_config

    model = tmp_path / "model"
    stock = llava_next_config().to_dict() | {"connector": CONNECTORS["dci"].to_dict()}
    DenseLlavaNextConfig(**stock).save_pretrained(model)
    for name in ("processor_config.json",):
        (model / name).write_text((run_inputs / "model" / name).read_text())
    assert _problems(_run_file(run_inputs, tmp_path, model=str(model))) == [
        f"model: {str(model)!r} holds a 'dense_llava_next' model (its images fill a number of "
        "tokens that depends on their size, and run files encode one count per image); expected "
        "one of ['dense_llava', 'dense_mgm']"
    ]


def test_run_file_refuses_stage_folders_training_did_not_create(run_inputs, tmp_path):
    stage1 = tmp_path / "out" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / "weights.bin").write_bytes(b"precious")
    path = _run_file(run_inputs, tmp_path)
    (problem,) = _problems(path)
    assert problem.startswith(
        f"output_dir: stage folder {str(stage1)!r} is not empty (weights.bin) and was not "
        "created by mmconnect train (no .mmconnect-train file)"
    )
    assert load_train_run(path, overwrite=True).overwrite  # --overwrite
    assert load_train_run(_run_file(run_inputs, tmp_path, overwrite=True)).overwrite
    (stage1 / ".mmconnect-train").write_text("{}")  # a folder an earlier training made
    assert not load_train_run(_run_file(run_inputs, tmp_path)).overwrite
    assert (stage1 / "weights.bin").read_bytes() == b"precious"


def test_train_cli_names_a_missing_run_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"mmconnect train: run file {str(tmp_path / 'missing.yaml')!r} does not exist\n"
    )


def test_train_cli_reports_run_file_problems_with_exit_2(run_inputs, tmp_path, capsys):
    path = _run_file(run_inputs, tmp_path, stage2={"lora": {"rank": -4}})
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"mmconnect train: {path}:stage2.lora.rank: must be a positive int, got -4\n"
    )


@pytest.mark.slow
def test_connectors_trained_in_parallel_processes_match_one_process(tmp_path):
    """jobs=2 (a process per connector, one thread each) gives exactly the results of jobs=1."""
    tiny = {
        "num_train_images": 8,
        "num_eval_images": 2,
        "image_size": 40,
        "vision_width": 16,
        "vision_blocks": 4,
        "llm_width": 16,
        "llm_blocks": 1,
        "stage1_steps": 2,
        "stage2_steps": 2,
        "batch_size": 4,
        "show_progress": False,
    }
    runs = {
        jobs: run_demo(DemoConfig(output_dir=str(tmp_path / f"jobs-{jobs}"), jobs=jobs, **tiny))
        for jobs in (1, 2)
    }
    assert (runs[1]["jobs"], runs[2]["jobs"]) == (1, 2)
    for kind in ("baseline", "dci"):
        one, two = runs[1]["connectors"][kind], runs[2]["connectors"][kind]
        assert one["stage1_losses"] == two["stage1_losses"]
        assert one["stage2_losses"] == two["stage2_losses"]
        assert one["accuracy"] == two["accuracy"]
        assert len(one["stage2_losses"]) == 2


def test_a_demo_rerun_replaces_its_own_files_and_keeps_the_users(tmp_path):
    """A folder an earlier demo made is reused without --overwrite; images of the earlier, larger
    data set go (the marker lists them), a file the user added stays byte for byte."""
    tiny = {
        "output_dir": str(tmp_path),
        "connectors": ("baseline",),
        "num_eval_images": 1,
        "image_size": 40,
        "vision_width": 16,
        "vision_blocks": 4,
        "llm_width": 16,
        "llm_blocks": 1,
        "stage1_steps": 1,
        "stage2_steps": 1,
        "batch_size": 2,
        "show_progress": False,
        "jobs": 1,
    }
    run_demo(DemoConfig(num_train_images=6, **tiny))
    images = tmp_path / "data" / "images"
    assert sorted(path.name for path in images.glob("train_*.png"))[-1] == "train_00005.png"
    (images / "mine.png").write_bytes(b"my picture")
    (tmp_path / "notes.txt").write_bytes(b"my notes")
    run_demo(DemoConfig(num_train_images=3, **tiny))
    assert sorted(path.name for path in images.iterdir()) == [
        "eval_00000.png",
        "mine.png",
        "train_00000.png",
        "train_00001.png",
        "train_00002.png",
    ]
    assert (images / "mine.png").read_bytes() == b"my picture"
    assert (tmp_path / "notes.txt").read_bytes() == b"my notes"
    marker = json.loads((tmp_path / ".mmconnect-demo").read_text())
    assert "data/images/train_00005.png" not in marker["files"]
    assert "data/images/mine.png" not in marker["files"]
    assert len(json.loads((tmp_path / "data" / "stage1.json").read_text())) == 3


def test_exact_answers_need_every_answer_token_and_the_end_marker():
    from mmconnect.integrations.applications.demo import exact_answers

    # Vocabulary: 0 pad, 1 "bottom", 2 "-", 3 "right", 4 end marker. Labels: -100 outside the
    # answer; position t of the logits predicts token t + 1.
    def logits_for(tokens: list[int]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(tokens), 5).float()

    ignore = -100
    labels = torch.tensor(
        [
            [0, 1, 4, ignore, ignore],  # gold "bottom" + end
            [0, 1, 4, ignore, ignore],  # gold "bottom" + end
            [0, 1, 2, 3, 4],  # gold "bottom-right" + end
            [0, ignore, ignore, ignore, ignore],  # nothing supervised
        ]
    )
    logits = torch.stack(
        [
            logits_for([1, 4, 0, 0, 0]),  # "bottom", end: right
            logits_for([1, 2, 0, 0, 0]),  # "bottom" then "-" (would say bottom-...): wrong
            logits_for([1, 2, 3, 4, 0]),  # "bottom-right", end: right
            logits_for([1, 4, 0, 0, 0]),
        ]
    )
    assert exact_answers(logits, labels, ignore_index=ignore) == [True, False, True, False]
