"""What the command modules share: argument types, comma lists and the package -> extra table.

Only the standard library is imported here, so that every command's arguments parse (and
``mmconnect --help`` works) on a core-only install.
"""

from __future__ import annotations

import argparse

#: The pyproject extra that installs each heavy package, by top-level import name: a command whose
#: import of one of these fails tells the user which extra to install.
EXTRAS: dict[str, str] = {
    "transformers": "hf",
    "peft": "hf",
    "accelerate": "hf",
    "PIL": "hf",
    "yaml": "hf",
    "matplotlib": "hf",
    "numpy": "hf",
    "tqdm": "hf",
    "timm": "timm",
    "open_clip": "openclip",
    "av": "video",
}


def missing_extra(error: ImportError) -> tuple[str, str] | None:
    """``(package, extra)`` when ``error`` is the import of a heavy package from :data:`EXTRAS`
    failing, else ``None`` (an unrelated import error is a bug to show, not an extra to install).
    """
    package = (error.name or "").split(".")[0]
    return (package, EXTRAS[package]) if package in EXTRAS else None


def positive_int(text: str) -> int:
    """An argparse ``type`` accepting whole numbers >= 1; argparse prefixes the option's name
    to the message and exits with status 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated option (``"baseline, dci,"`` ->
    ``("baseline", "dci")``)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())
