"""Everything that builds on the core with other packages, installed as ``mmconnect.integrations``.

Sub-packages by role, each saying in its docstring which extra it needs:

* :mod:`~mmconnect.integrations.families` — Hugging Face model families with a Dense Connector
  (``hf``): LLaVA, LLaVA-NeXT + AnyRes, LLaVA-OneVision, Mini-Gemini, Qwen2.5-VL, Qwen3-VL,
  Idefics3, SmolVLM, InternVL and Gemma 3, on one family protocol and shared base;
* :mod:`~mmconnect.integrations.codebases` — swaps for code derived from original research
  repositories (core dependencies only);
* :mod:`~mmconnect.integrations.training` — the two training stages, YAML run files and the data
  pipeline (``hf``);
* :mod:`~mmconnect.integrations.chat` — image and video answering (``hf``; video files ``video``);
* :mod:`~mmconnect.integrations.export` — stock LLaVA / LLaVA-NeXT checkpoints for serving
  engines (``hf``);
* :mod:`~mmconnect.integrations.applications` — the demo, the lab, synthetic data, tiny test
  models, output folders (``hf``), and :mod:`~mmconnect.integrations.cli`, the command line.

Importing ``mmconnect`` never imports this subpackage or those packages. Importing this
subpackage registers the Dense model types (``dense_llava``, ``dense_llava_next``,
``dense_mgm``, ``dense_qwen2_5_vl``, ...: every module of the families package) with the
Hugging Face Auto classes, so that a saved Dense model loads in a fresh
process with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` /
``AutoProcessor`` after nothing more than ``import mmconnect.integrations``.

Without transformers (a core-only install: ``pip install mmconnect``) the subpackage still
imports and the modules that need only the core (the LLaVA and Mini-Gemini codebase swaps) work;
nothing is registered and :data:`REGISTRATION_ERROR` says why. ``pip install "mmconnect[hf]"``
adds what the Dense models need.
"""

from __future__ import annotations

import warnings

#: Why the Dense model types are not registered (``None`` when they are).
REGISTRATION_ERROR: str | None = None


def register_dense_models() -> None:
    """Register every Dense model family with the HF Auto classes.

    Imports each module of :mod:`mmconnect.integrations.families`; a family module registers
    itself (:func:`~mmconnect.integrations.families.protocol.register_family`) when imported, so
    a new family needs no edit here. Done once on import; calling it again is harmless
    (registration is idempotent).

    Raises:
        ImportError: transformers (or another package a Dense model needs) is not installed;
            the message names the extra to install.
    """
    import importlib
    import pkgutil

    from mmconnect.integrations import families

    try:
        for module in pkgutil.iter_modules(families.__path__):
            importlib.import_module(f"{families.__name__}.{module.name}")
    except ImportError as error:
        raise ImportError(
            f"the Dense model types cannot be registered: {error}. Install the Hugging Face "
            'extra: pip install "mmconnect[hf]"'
        ) from error


def _register_on_import() -> None:
    global REGISTRATION_ERROR
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        # A core-only install: nothing to register with, and nothing to warn about (the codebase
        # swaps need only the core). Importing a Dense model module says what to install.
        REGISTRATION_ERROR = 'transformers is not installed; install the Hugging Face extra: pip install "mmconnect[hf]"'
        return
    try:
        register_dense_models()
    except ImportError as error:
        # transformers is there but something the Dense models need is not (or is too old):
        # the subpackage still imports; loading a saved Dense model would fail later with an
        # unknown model type, so say it now.
        REGISTRATION_ERROR = str(error)
        warnings.warn(REGISTRATION_ERROR, UserWarning, stacklevel=3)


_register_on_import()
