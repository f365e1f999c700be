"""Hugging Face model families with a Dense Connector (needs the ``hf`` extra).

One module per family, all on the shared base (:mod:`~mmconnect.integrations.families.base`):

* :mod:`~mmconnect.integrations.families.llava` — LLaVA-1.5 (``dense_llava``);
* :mod:`~mmconnect.integrations.families.llava_next` with
  :mod:`~mmconnect.integrations.families.anyres` — LLaVA-NeXT / AnyRes (``dense_llava_next``);
* :mod:`~mmconnect.integrations.families.mini_gemini` — Mini-Gemini on HF LLaVA (``dense_mgm``),
  whose dual-encoder vision path is :mod:`~mmconnect.integrations.families.mini_gemini_vision`
  (core dependencies only: the MGM codebase swap uses it too);
* :mod:`~mmconnect.integrations.families.llava_onevision` — LLaVA-OneVision, AnyRes with the
  ``anyres_max`` cap and pooled video (``dense_llava_onevision``);
* :mod:`~mmconnect.integrations.families.qwen2_5_vl` and
  :mod:`~mmconnect.integrations.families.qwen3_vl` — Qwen2.5-VL (``dense_qwen2_5_vl``) and
  Qwen3-VL with DeepStack (``dense_qwen3_vl``): packed ``[seq, C]`` towers, dynamic resolution and
  M-RoPE, on :mod:`~mmconnect.integrations.families.packed_vision`;
* :mod:`~mmconnect.integrations.families.idefics3` and
  :mod:`~mmconnect.integrations.families.smolvlm` — Idefics3 (``dense_idefics3``) and SmolVLM
  (``dense_smolvlm``): tiles plus a global image, pixel shuffle;
* :mod:`~mmconnect.integrations.families.internvl` — InternVL 2.5 / 3, tiled
  (``dense_internvl``);
* :mod:`~mmconnect.integrations.families.gemma3` — Gemma 3, pooled projector and pan-and-scan
  crops (``dense_gemma3``).

Importing this package imports nothing heavy; ``import mmconnect.integrations`` registers the
families' ``model_type`` strings with the Auto classes.
"""
