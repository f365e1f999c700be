"""The command line on an install without some extras: each heavy package is blocked in a fresh
process (``sys.modules[name] = None`` makes ``import name`` raise ``ModuleNotFoundError``, as on
an install without it), then ``mmconnect.integrations.cli.main`` runs one command.

A command whose packages are missing exits with status 2 and one line naming the extra to
install, never a traceback; ``presets`` needs only the core and ``chat --image`` no PyAV.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmconnect.integrations.cli.common import EXTRAS, missing_extra
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT


def run_blocked(blocked: list[str], argv: list[str], *, cwd: Path) -> subprocess.CompletedProcess:
    """``mmconnect ARGV`` in a fresh interpreter where the ``blocked`` packages cannot import."""
    script = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "from mmconnect.integrations.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def extra_line(command: str, package: str, extra: str) -> str:
    return (
        f"mmconnect {command}: needs the '{extra}' extra ({package} is not installed): "
        f'pip install "mmconnect[{extra}]"'
    )


def test_presets_needs_only_the_core(tmp_path):
    result = run_blocked(["transformers", "timm", "open_clip", "av"], ["presets"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = ["preset", "fusion", "layers", "(HF", "hidden_states)", "tokens", "projector", "in"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["baseline-clip-l-336"][1] == "none"
    assert rows["baseline-clip-l-336"][-2:] == ["576", "1024"]
    assert "dc-dci+pixel-shuffle-siglip-so400m" in rows  # the zoo needs only the core too


def test_the_core_never_imports_the_cli(tmp_path):
    code = "import sys, mmconnect; print([m for m in sys.modules if m.startswith('mmconnect.')])"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    assert "mmconnect.integrations" not in result.stdout
    assert "'mmconnect.config'" in result.stdout  # the probe sees the core's own modules


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("demo", ["demo", "--quick", "--output", "out"]),
        ("inspect", ["inspect", "tiny-clip-l-336"]),
        ("train", ["train", "--config", "run.yaml"]),
        ("lab", ["lab", "--quick", "--output", "out"]),
    ],
)
def test_command_without_transformers_names_the_hf_extra(command, argv, tmp_path):
    (tmp_path / "run.yaml").write_text("seed: 0\n")
    result = run_blocked(["transformers"], argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert extra_line(command, "transformers", "hf") in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the import fails


def test_chat_image_does_not_need_pyav(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    argv = ["chat", "--model", "no-such-model", "--image", "red.png", "what colour?"]
    result = run_blocked(["av"], argv, cwd=tmp_path)
    # It gets past PyAV to loading the model, which fails for its own reason.
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "mmconnect chat: model directory not found: 'no-such-model'"
    )
    assert "av" not in result.stderr.split()


def test_chat_video_without_pyav_names_the_video_extra(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"not decoded: PyAV is missing")
    argv = ["chat", "--model", "no-such-model", "--video", "clip.mp4", "what moves?"]
    result = run_blocked(["av"], argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert extra_line("chat", "av", "video") in result.stderr.splitlines()
    assert "Traceback" not in result.stderr


def test_missing_extra_maps_top_level_packages_only():
    assert missing_extra(ModuleNotFoundError("x", name="transformers.models.llava")) == (
        "transformers",
        "hf",
    )
    assert missing_extra(ModuleNotFoundError("x", name="open_clip")) == ("open_clip", "openclip")
    assert missing_extra(ModuleNotFoundError("x", name="av")) == ("av", "video")
    # Not a heavy package (a bug, not an extra): main re-raises it with its traceback.
    assert missing_extra(ModuleNotFoundError("x", name="mmconnect.nope")) is None
    assert missing_extra(ImportError("cannot import name 'x'")) is None
    # Every extra named is one pyproject.toml defines.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(f"\n{extra} = [" in pyproject for extra in set(EXTRAS.values()))
