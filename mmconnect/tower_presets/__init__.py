"""Connector presets for the vision towers of today's MLLM families, one module per family.

Each module names one family's tower geometry (:class:`~mmconnect.presets.EncoderGeometry`:
depth, width, patch size, prefix tokens, the image size its presets count tokens at) and
registers, with :func:`~mmconnect.presets.register_preset`, the Dense Connector configurations
for that tower (DCI groups over its depth, SCI layers, the family's native connector from the zoo
behind the fusion), so ``ConnectorConfig.from_preset(name)`` builds them and
:func:`~mmconnect.presets.preset_geometry` tells their native token grid. The families that load
these towers live in :mod:`mmconnect.integrations.families`; nothing here imports transformers.

Importing ``mmconnect`` imports every module of this package (found by package membership, not
by name), so a family's presets are one new module plus its tests and docs.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
