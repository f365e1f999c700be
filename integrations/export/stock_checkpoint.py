"""Export a Dense LLaVA / LLaVA-NeXT to a stock HF checkpoint that serving engines load.

:func:`export_to_stock` writes a ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration`` checkpoint (safetensors, ``config.json`` of
``model_type`` ``"llava"`` / ``"llava_next"``) with its stock processor into a directory, from a
Dense model in memory or a saved one. The directory loads with transformers alone, in a process
that never imports mmconnect (``AutoModelForImageTextToText`` / ``AutoProcessor``), and with any
engine that serves HF LLaVA with a list-valued ``vision_feature_layer``.

What is rewritten and what is refused: :mod:`~mmconnect.integrations.export.stock_llava`; the
model: :mod:`~mmconnect.integrations.export.stock_model`; the processor:
:mod:`~mmconnect.integrations.export.stock_processor`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmconnect.checkpoint import atomic_save_directory
from mmconnect.integrations.export.stock_model import model_projection, stock_model
from mmconnect.integrations.export.stock_processor import stock_processor
from mmconnect.integrations.families.anyres import tile_grid
from mmconnect.integrations.families.protocol import family_model

#: Largest ``max |stock - Dense| / max |Dense|`` over one random image's visual tokens that the
#: export's self-check accepts, by the tower's dtype. The DCI rewrite moves fp32 tokens by about
#: 1e-7 relative and bf16 ones by about 1e-2 (docs/export.md); a wrong layer, a kept CLS token
#: or an output norm on one side moves them by order 1.
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
#: The tolerance for half-precision towers (bf16, fp16).
VERIFY_TOLERANCE_HALF = 5e-2


@dataclass(frozen=True, kw_only=True)
class ExportReport:
    """What :func:`export_to_stock` wrote.

    Attributes:
        directory: the stock checkpoint's directory.
        stock_class: ``"LlavaForConditionalGeneration"`` or
            ``"LlavaNextForConditionalGeneration"``.
        vision_feature_layer: the stock config's layers (an int for one layer).
        vision_feature_select_strategy: ``"default"`` (CLS dropped) or ``"full"``.
        exact: the stock model runs the Dense model's operations (baseline, SCI); ``False`` for
            DCI, equal up to re-association.
        dense_projector_inputs: the Dense first projector Linear's input width.
        stock_projector_inputs: the stock ``linear_1``'s input width (tower width times the
            listed layers).
        image_tokens: visual tokens per image at the tower's native grid (per crop for
            LLaVA-NeXT).
        relative_difference: the self-check's ``max |stock - Dense| / max |Dense|`` over one
            random image's visual tokens, or ``None`` when it did not run.
    """

    directory: Path
    stock_class: str
    vision_feature_layer: int | list[int]
    vision_feature_select_strategy: str
    exact: bool
    dense_projector_inputs: int
    stock_projector_inputs: int
    image_tokens: int
    relative_difference: float | None


def export_to_stock(
    model_or_dir: Any,
    out_dir: str | os.PathLike,
    *,
    processor: Any = None,
    verify: bool = True,
) -> ExportReport:
    """Write the stock HF checkpoint of a Dense LLaVA / LLaVA-NeXT, with its processor.

    The export holds the Dense model's tower, LLM and head unchanged and a stock
    ``LlavaMultiModalProjector`` computing the connector: the baseline and SCI exactly, DCI up
    to floating-point re-association (its first Linear is widened to one block per listed
    layer; see :mod:`~mmconnect.integrations.export.stock_llava`). The checkpoint keeps the
    model's dtype and is written atomically (:func:`mmconnect.checkpoint.atomic_save_directory`:
    a failed export leaves ``out_dir`` as it was; files there that the export does not replace
    stay, old weights and configs do not).

    Args:
        model_or_dir: a ``DenseLlavaForConditionalGeneration`` /
            ``DenseLlavaNextForConditionalGeneration``, or the directory of a saved one with its
            processor (loaded in its saved dtype).
        out_dir: where the stock checkpoint goes; not the source directory.
        processor: the Dense model's processor; required with a model, read from the directory
            otherwise.
        verify: run one random image through the Dense and the stock image paths and refuse an
            export whose visual tokens differ by more than :data:`VERIFY_TOLERANCE` (relative).

    Returns:
        An :class:`ExportReport`.

    Raises:
        TypeError: not a Dense model of an exportable family, a PEFT-wrapped one, or a
            processor of another family.
        ValueError: the connector has no stock equivalent (STI, resampling, a zoo projector,
            DeepStack, ...; the message says why), ``processor`` missing, ``out_dir`` is the
            source directory or a file, the processors' prompts or the image paths differ.
        FileNotFoundError: the source directory does not exist.

    Examples:
        >>> report = export_to_stock("runs/dense-llava", "runs/dense-llava-stock")  # doctest: +SKIP
        >>> report.vision_feature_layer  # doctest: +SKIP
        [23, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    """
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {verify!r}")
    if isinstance(out_dir, str | os.PathLike):
        target = Path(out_dir)
    else:
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if isinstance(model_or_dir, str | os.PathLike):
        source = Path(model_or_dir)
        if target.resolve() == source.resolve():
            raise ValueError(
                f"out_dir {str(out_dir)!r} is the Dense model's own directory; export into "
                "another directory (the Dense checkpoint stays as it is)"
            )
        model, saved_processor = load_dense(source)
        processor = saved_processor if processor is None else processor
    else:
        model = model_or_dir
    if target.exists() and not target.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory")
    exported = stock_model(model)  # refuses other models and connectors first
    projection = model_projection(model)
    if processor is None:
        raise ValueError(
            "processor= is required with a model in memory: pass the Dense model's processor "
            "(DenseLlavaProcessor / DenseLlavaNextProcessor); the export writes the stock one "
            "beside the weights"
        )
    exported_processor = stock_processor(processor, model, projection)
    difference = image_path_difference(model, exported) if verify else None
    if difference is not None:
        dtype = family_model(model).tapped_tower().dtype
        tolerance = VERIFY_TOLERANCE.get(dtype, VERIFY_TOLERANCE_HALF)
        if not difference <= tolerance:  # also refuses NaN
            raise ValueError(
                f"the stock model's visual tokens differ from the Dense model's by {difference:.3g} "
                f"(relative; at most {tolerance:g} for {dtype}): the stock image path does not "
                "compute this model's connector; nothing was written"
            )
    with atomic_save_directory(target) as staging:
        exported.save_pretrained(staging)
        exported_processor.save_pretrained(staging)
    family = family_model(model)
    linear = exported.model.multi_modal_projector.linear_1
    return ExportReport(
        directory=target,
        stock_class=type(exported).__name__,
        vision_feature_layer=projection.vision_feature_layer,
        vision_feature_select_strategy=projection.select_strategy,
        exact=projection.exact,
        dense_projector_inputs=family.connector.fused_dim,
        stock_projector_inputs=linear.in_features,
        image_tokens=family.connector.num_tokens(family.tower_geometry().grid),
        relative_difference=difference,
    )


def load_dense(directory: Path) -> tuple[Any, Any]:
    """A saved Dense model (in its saved dtype, eval mode) and its processor.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: it holds no processor (``processor_config.json``).
    """
    # mmconnect.integrations (imported with this package) registered the Dense model types.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {str(directory)!r}")
    if not (directory / "processor_config.json").is_file():
        raise ValueError(
            f"{str(directory)!r} holds no processor (processor_config.json); the export writes "
            "the stock processor beside the weights, so save the Dense processor there first"
        )
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype="auto").eval()
    return model, AutoProcessor.from_pretrained(directory)


@torch.no_grad()
def image_path_difference(dense: Any, stock: Any, *, seed: int = 0) -> float:
    """``max |stock - Dense| / max |Dense|`` over the visual tokens of one random image.

    One image at the tower's size (LLaVA-NeXT: a square image of that size, i.e. its base crop
    and the tiles AnyRes picks for it) through both models' ``get_image_features``, with
    standard-normal pixels in the tower's dtype and device.
    """
    family = family_model(dense)
    tower = family.tapped_tower()
    size = family.tower_geometry().image_size
    generator = torch.Generator().manual_seed(seed)
    pinpoints = getattr(dense.config, "image_grid_pinpoints", None)
    if pinpoints is None:
        pixels = torch.randn(1, 3, *size, generator=generator)
        extra: dict[str, Tensor] = {}
    else:
        crops = 1 + math.prod(tile_grid(size, pinpoints, size[0]))
        pixels = torch.randn(1, crops, 3, *size, generator=generator)
        extra = {"image_sizes": torch.tensor([list(size)], device=tower.device)}
    pixels = pixels.to(device=tower.device, dtype=tower.dtype)
    expected = dense.model.get_image_features(pixels, **extra).pooler_output[0].float()
    got = stock.model.get_image_features(pixels, **extra).pooler_output[0].float()
    if got.shape != expected.shape:
        raise ValueError(
            f"the stock model gives {tuple(got.shape)} visual tokens for one image, the Dense "
            f"model {tuple(expected.shape)}"
        )
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((got - expected).abs().max() / scale)
