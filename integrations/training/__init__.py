"""Training a Dense Connector MLLM (needs the ``hf`` extra).

* :mod:`~mmconnect.integrations.training.stages` — the two stages (align, instruct; full or LoRA)
  on the HF Trainer, checkpoints, resume checks;
* :mod:`~mmconnect.integrations.training.run_file` — one YAML file per run
  (``mmconnect train --config``), validated whole before anything runs;
* :mod:`~mmconnect.integrations.training.data` — LLaVA-format data by concern: records, chat
  templates, encoding, images, validation, dataset and collator.
"""
