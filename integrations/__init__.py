"""Adapters that need heavy packages (transformers, timm, open_clip, peft), installed as
``mmconnect.integrations``.

Importing :mod:`mmconnect` never imports this subpackage or those packages.
"""
