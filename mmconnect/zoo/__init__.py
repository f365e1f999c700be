"""The connector zoo: the field's connectors as registered projectors behind the Dense tap.

Each module holds one connector family, written from its definition (the module docstring names
the source and the equations), registered with :func:`~mmconnect.projectors.register_projector` under its
own spec class, and declaring its exact token count and grid (:class:`~mmconnect.projectors.GridProjector`),
so any fusion (``none``, STI, SCI, DCI, user-registered) can feed it and every count downstream
(processors, AnyRes packing, video budgets) is right before anything runs. Where Hugging Face
transformers ships the same module, the connector module also has a converter from that
module's state-dict keys, and the tests copy HF's weights into ours and compare outputs.

Conventions every zoo connector follows:

* input: the fused tokens ``[B, h*w, C]`` in raster order on the ``(h, w)`` grid; the module
  regroups them itself (Qwen2-VL's 2x2 merge does not rely on a processor's token order);
* output: ``[B, num_tokens(grid), llm_dim]``; tokens that form a spatial grid declare it in
  ``output_grid(grid)``; tokens that form none (learned queries) declare ``(0, 0)`` and count
  only in ``num_tokens(grid)``, so grid poolings and AnyRes packing never treat them as a grid;
* the spec holds only the connector's own parameters (factor, depth, query count, ...); the
  widths come from the connector config (``vision_dim`` after fusion, ``llm_dim``);
* ``<name>_state_from_hf(state, prefix="")``: our state dict from the HF module's keys;
* presets for meaningful combinations are registered in the module with their encoder geometry.

Importing ``mmconnect`` imports every module of this package (found by package membership,
not by name), so a new connector is one new module plus its tests and docs.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
