"""Training images: loading (RGB, the file named on failure) and LLaVA's pad-to-square."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# ---------------------------------------------------------------------------- images


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (truncated or corrupt files fail here, not later).

    Raises:
        ValueError: the file is missing or cannot be read; the message names the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {str(path)!r} is a directory; expected an image file")
    if not path.is_file():
        raise ValueError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a centred square filled with ``fill`` (RGB 0..255), as LLaVA-1.5's
    ``image_aspect_ratio="pad"`` does."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def image_path(image_folder: str | Path | None, image: str) -> Path:
    return Path(image) if image_folder is None else Path(image_folder) / image
