"""The applications built on the library (need the ``hf`` extra; some also ``timm`` / ``openclip``).

* :mod:`~mmconnect.integrations.applications.demo` — ``mmconnect demo``, the whole pipeline on a
  CPU; :mod:`~mmconnect.integrations.applications.lab` with
  :mod:`~mmconnect.integrations.applications.lab_encoder` — ``mmconnect lab``;
* :mod:`~mmconnect.integrations.applications.synthetic` and
  :mod:`~mmconnect.integrations.applications.moving_shapes` — the synthetic image and video data;
* :mod:`~mmconnect.integrations.applications.encoders` — encoders by name or path for
  ``mmconnect inspect``; ``tiny_models`` — the one home
  of tiny random models built from configs (CLI, demo, tests, docs);
* :mod:`~mmconnect.integrations.applications.output_folders` — the rule every command that
  writes a folder follows.

The command line itself is :mod:`mmconnect.integrations.cli`.
"""
