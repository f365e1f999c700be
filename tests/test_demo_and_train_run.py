"""``mmconnect demo`` (quick budget) and ``mmconnect train --config FILE.yaml`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmconnect.cli import main


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
    assert main(["train", "--config", str(_write_run(tmp_path, demo_dir))]) == 0
    out = capsys.readouterr().out
    assert "align: final loss" in out and "instruct: final loss" in out
    for stage in ("stage1", "stage2"):
        directory = tmp_path / "run" / stage
        assert (directory / "model.safetensors").is_file()
        assert (directory / "processor_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stage1": {"max_stepz": 2}}, r"unknown keys in stage1: \['max_stepz'\]"),
        ({"stage2": {"lora": {"rank": 4, "alpa": 8}}}, r"unknown keys in stage2.lora: \['alpa'\]"),
        ({"extra": 1}, r"unknown keys in .*run.yaml: \['extra'\]"),
        ({"stage1": {"stage": "instruct"}}, r"stage1 may not set \['stage'\]"),
    ],
)
def test_bad_run_files_are_refused_before_any_work(demo_dir, tmp_path, capsys, changes, message):
    path = _write_run(tmp_path, demo_dir, **changes)
    assert main(["train", "--config", str(path)]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


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
    assert "unknown demo connector 'mlp'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_takes_the_tower_and_llm_from_local_checkpoints(tmp_path):
    """--vision / --llm: the trained model starts from those weights (tower frozen: unchanged)."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmconnect.integrations.demo import build_word_tokenizer
    from mmconnect.integrations.synthetic import text_vocabulary

    torch.manual_seed(5)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        )
    )
    vision.save_pretrained(tmp_path / "vision")
    texts = [" ".join(text_vocabulary()), "A chat between USER : ASSISTANT : \n , . ? -"]
    tokenizer = build_word_tokenizer([*texts, "assistant user"])
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tokenizer),
        )
    )
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
