"""transformers' own common tests, obtained from the installed version's source distribution.

The sdist of ``transformers==<installed version>`` on PyPI carries the top-level test modules
(``tests/test_modeling_common.py``, ``tests/test_configuration_common.py``,
``tests/test_processing_common.py``, ...), but not ``tests/generation/``, ``tests/exporters/``,
``tests/utils/`` or ``tests/models/``, and the test modules import ``parameterized``, which
mmconnect does not depend on. :func:`load_upstream_tests` therefore:

1. downloads the sdist once with ``pip download --no-deps --no-binary :all:`` into a cache
   (``$MMCONNECT_CACHE`` or ``~/.cache/mmconnect``, folder ``transformers-sdist``) and extracts
   only its ``tests/`` folder; ``parameterized`` comes as a wheel from the same registry into the
   same cache and is imported from the wheel file (pure Python, zip-importable), the virtual
   environment is never changed;
2. imports that folder as the package ``hf_upstream_tests`` (our own test folder is the
   namespace package ``tests``: the upstream one must not merge into it);
3. registers the three helper modules the sdist lacks, each holding only the names the common
   modules import from it: ``exporters.test_export.ExportTesterMixin`` (an empty base: the
   ``torch.export`` tests do not run), ``generation.test_utils.GenerationTesterMixin`` (an
   empty marker class: transformers' generation tests are not in the sdist and do not run) and
   ``utils.test_configuration_utils.config_common_kwargs`` (empty: transformers reads it only
   for configs without sub-configs, and every Dense config has two).

Nothing from transformers' test code is copied into this repository.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

#: Seconds one ``pip download`` may take before the tests are skipped.
DOWNLOAD_TIMEOUT = 300
PACKAGE = "hf_upstream_tests"


#: The pytest config, kept by :func:`register_markers` (called from ``tests/conftest.py``).
_PYTEST_CONFIG: Any = None
#: Markers transformers' common test modules use; more are registered when found in them.
KNOWN_MARKERS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
)


def register_markers(config: Any, names: tuple[str, ...] = KNOWN_MARKERS) -> None:
    """Register transformers' test markers (the suite runs with ``--strict-markers``)."""
    global _PYTEST_CONFIG
    _PYTEST_CONFIG = config
    known = {line.split(":")[0].strip() for line in config.getini("markers")}
    for name in names:
        if name not in known:
            config.addinivalue_line("markers", f"{name}: marker of transformers' own tests")


class UpstreamUnavailable(RuntimeError):
    """The sdist (or ``parameterized``) could not be obtained; the message says why."""


def cache_dir() -> Path:
    """Where the sdist and the ``parameterized`` wheel are kept between runs."""
    root = Path(os.environ.get("MMCONNECT_CACHE", Path.home() / ".cache" / "mmconnect"))
    return root / "transformers-sdist"


def _pip_download(requirement: str, destination: Path, *flags: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        # An unreachable registry should skip the tests within seconds, not minutes.
        "--timeout",
        "20",
        "--retries",
        "1",
        *flags,
        requirement,
        "-d",
        str(destination),
        "--quiet",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise UpstreamUnavailable(
            f"`pip download {requirement}` took more than {DOWNLOAD_TIMEOUT} s"
        ) from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UpstreamUnavailable(
            f"`pip download {requirement}` failed (is the package registry reachable?): "
            + " | ".join(tail)
        )


def sdist_tests_dir(version: str | None = None) -> Path:
    """The extracted ``tests/`` folder of the transformers sdist (downloaded once).

    Raises:
        UpstreamUnavailable: the download failed or the sdist holds no ``tests/`` folder.
    """
    import transformers

    version = version or transformers.__version__
    cache = cache_dir()
    root = cache / f"transformers-{version}"
    tests = root / "tests"
    if (tests / "test_modeling_common.py").is_file():
        _mark_package(tests)
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"transformers-{version}.tar.gz"
    if not archive.is_file():
        _pip_download(f"transformers=={version}", cache, "--no-binary", ":all:")
    if not archive.is_file():
        raise UpstreamUnavailable(f"pip did not write {archive.name} into {cache}")
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive) as handle:
        members = [m for m in handle.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise UpstreamUnavailable(f"{archive.name} holds no tests/ folder")
        if any(m.name.startswith("/") or ".." in m.name.split("/") for m in members):
            raise UpstreamUnavailable(f"{archive.name} holds paths outside its folder")
        try:
            handle.extractall(cache, members=members, filter="data")
        except TypeError:  # Python before 3.10.12 / 3.11.4 has no extraction filters
            handle.extractall(cache, members=members)
    _mark_package(tests)
    return tests


def _mark_package(tests: Path) -> None:
    """Add the empty ``__init__.py`` the sdist leaves out: ``test_configuration_common`` runs
    ``direct_transformers_import`` on its own folder, which executes that file."""
    marker = tests / "__init__.py"
    if not marker.is_file():
        marker.write_text("")


def _parameterized_wheel() -> Path:
    cache = cache_dir()
    wheels = sorted(cache.glob("parameterized-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        _pip_download("parameterized", cache, "--only-binary", ":all:")
        wheels = sorted(cache.glob("parameterized-*.whl"))
    if not wheels:
        raise UpstreamUnavailable(f"pip did not write a parameterized wheel into {cache}")
    return wheels[-1]


def _module(name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _register_missing_helpers(tests: Path) -> None:
    """The helper modules the sdist lacks (see the module docstring), only where it lacks them."""
    missing = {
        ("exporters", "test_export"): {
            "ExportTesterMixin": type(
                "ExportTesterMixin",
                (),
                {"__doc__": "Not in the sdist: torch.export tests do not run."},
            )
        },
        ("generation", "test_utils"): {
            "GenerationTesterMixin": type(
                "GenerationTesterMixin",
                (),
                {"__doc__": "Not in the sdist: transformers' generation tests do not run."},
            )
        },
        ("utils", "test_configuration_utils"): {"config_common_kwargs": {}},
    }
    for (folder, name), attributes in missing.items():
        if (tests / folder / f"{name}.py").is_file():
            continue
        parent = sys.modules.get(f"{PACKAGE}.{folder}") or _module(
            f"{PACKAGE}.{folder}", __path__=[]
        )
        child = _module(f"{PACKAGE}.{folder}.{name}", **attributes)
        setattr(parent, name, child)


def _register_hub_fixture_shim(cache: Path) -> None:
    """``test_processing_common`` imports ``url_to_local_path`` from transformers' ``utils/``
    folder (not in the sdist), which maps the Hub URLs of its sample files to files downloaded
    for CI. Tests have no network: an image URL maps to a synthetic RGB image written once into
    the cache (seeded from the URL, 64 x 48 pixels), other URLs stay URLs (the video and audio
    tests do not apply to image processors)."""
    if "fetch_hub_objects_for_ci" in sys.modules:
        return

    def url_to_local_path(url: str) -> str:
        name = url.rsplit("/", 1)[-1]
        if not name.lower().endswith((".png", ".jpg", ".jpeg")):
            return url
        import numpy as np
        from PIL import Image

        path = cache / "synthetic-images" / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = sum(url.encode())
            pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        return str(path)

    _module("fetch_hub_objects_for_ci", url_to_local_path=url_to_local_path)


def load_upstream_tests() -> types.ModuleType:
    """Import the sdist's ``tests/`` folder as the package ``hf_upstream_tests``.

    Returns:
        The package; its modules import as ``hf_upstream_tests.test_modeling_common`` etc.

    Raises:
        UpstreamUnavailable: the sdist or ``parameterized`` could not be downloaded.
    """
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    tests = sdist_tests_dir()
    try:
        importlib.import_module("parameterized")
    except ImportError:
        sys.path.append(str(_parameterized_wheel()))
    if _PYTEST_CONFIG is not None:  # markers the known list misses (a newer transformers)
        used = {
            name
            for path in tests.glob("*.py")
            for name in re.findall(r"mark\.([A-Za-z_][A-Za-z0-9_]*)", path.read_text())
        }
        register_markers(_PYTEST_CONFIG, tuple(sorted(used)))
    package = _module(PACKAGE, __path__=[str(tests)])
    _register_missing_helpers(tests)
    _register_hub_fixture_shim(cache_dir())
    return package
