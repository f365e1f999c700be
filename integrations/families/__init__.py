"""Hugging Face model families with a Dense Connector (needs the ``hf`` extra).

One module per family, all on the shared base (:mod:`~mmconnect.integrations.families.base`):

* :mod:`~mmconnect.integrations.families.llava` — LLaVA-1.5 (``dense_llava``);
* :mod:`~mmconnect.integrations.families.llava_next` with
  :mod:`~mmconnect.integrations.families.anyres` — LLaVA-NeXT / AnyRes (``dense_llava_next``);
* :mod:`~mmconnect.integrations.families.mini_gemini` — Mini-Gemini on HF LLaVA (``dense_mgm``),
  whose dual-encoder vision path is :mod:`~mmconnect.integrations.families.mini_gemini_vision`
  (core dependencies only: the MGM codebase swap uses it too).

Importing this package imports nothing heavy; ``import mmconnect.integrations`` registers the
families' ``model_type`` strings with the Auto classes.
"""
