"""``mmconnect export MODEL_DIR OUT_DIR``: write the stock HF checkpoint of a saved Dense LLaVA /
LLaVA-NeXT (baseline, SCI or DCI connector) with its stock processor, which transformers loads
without mmconnect and serving engines that take HF LLaVA serve
(:func:`mmconnect.integrations.export.export_to_stock`). Needs the ``hf`` extra."""

from __future__ import annotations

import argparse
import sys


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` command."""
    export = subparsers.add_parser(
        "export",
        help="export a saved Dense LLaVA / LLaVA-NeXT to a stock HF checkpoint",
        description=(
            "Write a stock LlavaForConditionalGeneration / LlavaNextForConditionalGeneration "
            "checkpoint with its processor. Baseline and SCI connectors export exactly, DCI up "
            "to floating-point re-association (a wider first projector Linear); STI, resampling, "
            "zoo projectors and DeepStack have no stock equivalent and are refused."
        ),
    )
    export.add_argument("model_dir", help="a saved Dense model directory with its processor")
    export.add_argument("out_dir", help="where the stock checkpoint goes (not MODEL_DIR)")
    export.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the self-check (one random image through both image paths)",
    )


def run(arguments: argparse.Namespace) -> int:
    """Export and print what was written; exit status 2 with the reason on bad input."""
    from mmconnect.integrations.export import export_to_stock

    try:
        report = export_to_stock(arguments.model_dir, arguments.out_dir, verify=arguments.verify)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"mmconnect export: {error}", file=sys.stderr)
        return 2
    layers = report.vision_feature_layer
    count = 1 if isinstance(layers, int) else len(layers)
    print(f"{report.stock_class} written to {report.directory}")
    print(
        f"vision_feature_layer={layers} ({count} layer{'s' * (count > 1)}), "
        f"vision_feature_select_strategy={report.vision_feature_select_strategy!r}"
    )
    exactness = (
        "exact (same operations as the Dense model)"
        if report.exact
        else "equal up to floating-point re-association"
    )
    print(
        f"projector input {report.dense_projector_inputs} -> {report.stock_projector_inputs} "
        f"channels, {report.image_tokens} image tokens per image (per crop), {exactness}"
    )
    if report.relative_difference is not None:
        print(f"self-check: visual tokens differ by {report.relative_difference:.3g} (relative)")
    return 0
