"""The ``mmconnect`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmconnect import list_presets
from mmconnect.integrations.cli import main


def test_presets_lists_every_preset_with_its_token_count(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == list_presets()
    expected_tokens = {
        "baseline-clip-l-336": "576",
        "dc-sti-clip-l-336": "720",
        "dc-sci-clip-l-336": "576",
        "dc-dci-clip-l-336": "576",
        "dc-dci-clip-l-336-efficient": "144",
        "dc-sti-siglip-so400m": "911",
        "dc-sci-siglip-so400m": "729",
        "dc-dci-siglip-so400m": "729",
    }
    # the built-in presets (the zoo registers more, each tested with its own module)
    assert {name: rows[name][-2] for name in expected_tokens} == expected_tokens
    assert rows["dc-dci-clip-l-336"][-1] == "3072"
    # the layers column: STI's spec pools its extra layers, SCI reads them whole
    assert rows["dc-sti-clip-l-336"][2:5] == ["F=H[23],", "pool8(H[7]),", "pool8(H[15])"]
    assert rows["dc-sci-clip-l-336"][2:5] == ["F=H[23],", "H[7],", "H[15]"]
    assert rows["dc-dci-clip-l-336"][2:7] == ["F=H[23],", "mean", "H[0..11],", "mean", "H[12..23]"]


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_is_installed():
    # The script is installed beside the interpreter of the environment running the tests.
    executable = Path(sys.executable).parent / "mmconnect"
    assert executable.is_file(), (
        f"{executable} is missing: is mmconnect installed in this environment?"
    )
    result = subprocess.run(
        [str(executable), "presets"], capture_output=True, text=True, check=True
    )
    assert "dc-dci-clip-l-336" in result.stdout


def test_inspect_a_tiny_test_encoder(capsys):
    assert main(["inspect", "tiny-clip-l-336"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layers (24 blocks; layer indices 0..24)" in out
    assert "prefix tokens  1" in out and "token grid     24x24 at 336 px" in out
    counts = {
        line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")
    }
    assert counts["dc-sti-clip-l-336"] == "720"
    assert counts["dc-dci-clip-l-336-efficient"] == "144"
    assert counts["dc-dci-siglip-so400m"] == "n/a"


def test_inspect_a_local_checkpoint(tmp_path, capsys):
    from mmconnect.integrations.applications.tiny_models import tiny_vision_tower

    tower = tiny_vision_tower("siglip", blocks=27, width=16, heads=2, image_size=56)
    tower.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SiglipVisionModel" in out and "prefix tokens  0" in out and "4x4 at 56 px" in out
    counts = {
        line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")
    }
    assert counts["dc-sti-siglip-so400m"] == str(16 + 2 * (16 // 8))


def test_inspect_an_unknown_encoder(capsys):
    assert main(["inspect", "no-such-encoder"]) == 2
    err = capsys.readouterr().err
    assert (
        "neither a local checkpoint directory nor a tiny test encoder" in err
        and "tiny-clip-l-336" in err
    )


def test_comma_list_strips_and_drops_empty_items():
    from mmconnect.integrations.cli.common import comma_list

    assert comma_list(" baseline, dci,, ") == ("baseline", "dci")
    assert comma_list("") == ()
