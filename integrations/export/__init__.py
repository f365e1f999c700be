"""Export Dense models to stock checkpoints that serving engines load (needs the ``hf`` extra).

A Dense LLaVA / LLaVA-NeXT whose connector is the LLaVA baseline, SCI or DCI with a two-Linear
MLP projector becomes a stock HF ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration`` checkpoint with its stock processor
(:func:`export_to_stock`, ``mmconnect export MODEL_DIR OUT_DIR``), which transformers loads
without mmconnect and serving engines that take HF LLaVA serve:

* :mod:`~mmconnect.integrations.export.stock_llava` — the connector as stock LLaVA's
  ``vision_feature_layer`` list and projector weights (SCI exactly, DCI by expanding the first
  Linear over every group member), and the refusals (STI, resampling, zoo projectors, DeepStack);
* :mod:`~mmconnect.integrations.export.stock_model` — the stock model around the Dense model's
  own tower, LLM and head;
* :mod:`~mmconnect.integrations.export.stock_processor` — the stock processor, checked to build
  the Dense processor's prompts;
* :mod:`~mmconnect.integrations.export.stock_checkpoint` — the export itself: checks, self-check
  on one image, atomic save.
"""

from mmconnect.integrations.export.stock_checkpoint import ExportReport, export_to_stock

__all__ = ["ExportReport", "export_to_stock"]
