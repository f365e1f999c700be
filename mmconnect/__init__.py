"""mmconnect: Dense Connector for multimodal LLMs.

Take features from many layers of a vision encoder, fuse them (STI / SCI / DCI) and project them
to the LLM. Importing this package needs only torch, einops and safetensors; the adapters for
transformers, timm, open_clip and peft live in :mod:`mmconnect.integrations`.

Layer indices everywhere follow the HF ``hidden_states`` convention: 0 is the embedding output,
``k`` the output of block ``k``, negatives count from the end (see :mod:`mmconnect.layers`).
"""

from mmconnect.config import ConnectorConfig
from mmconnect.connector import DenseConnector
from mmconnect.encoder_blocks import EncoderBlocks, find_encoder_blocks
from mmconnect.features import LayerFeatures
from mmconnect.fusion import (
    DCISpec,
    Fusion,
    FusionSpec,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    concat,
    grouped_average,
    list_fusions,
    pool_tokens,
    register_fusion,
    stack,
)
from mmconnect.injection import DeepStackSpec
from mmconnect.layers import normalize_layer, paper_layer
from mmconnect.presets import EncoderGeometry, list_presets, preset_geometry, register_preset
from mmconnect.projectors import (
    GridProjector,
    MLPSpec,
    ProjectorSpec,
    build_projector,
    list_projectors,
    load_projector_weights,
    register_projector,
)
from mmconnect.resample import (
    ResampleSpec,
    TokenResampler,
    list_resamplers,
    register_resampler,
    resample_tokens,
)
from mmconnect.tap import MultiLayerFeatureTap

__version__ = "0.1.0"

__all__ = [
    "ConnectorConfig",
    "DCISpec",
    "DeepStackSpec",
    "DenseConnector",
    "EncoderBlocks",
    "EncoderGeometry",
    "Fusion",
    "FusionSpec",
    "GridProjector",
    "LayerFeatures",
    "MLPSpec",
    "MultiLayerFeatureTap",
    "ProjectorSpec",
    "ResampleSpec",
    "SCISpec",
    "STISpec",
    "SingleLayerSpec",
    "TokenResampler",
    "build_projector",
    "concat",
    "find_encoder_blocks",
    "grouped_average",
    "list_fusions",
    "list_presets",
    "list_projectors",
    "list_resamplers",
    "load_projector_weights",
    "normalize_layer",
    "paper_layer",
    "pool_tokens",
    "preset_geometry",
    "register_fusion",
    "register_preset",
    "register_projector",
    "register_resampler",
    "resample_tokens",
    "stack",
]

# Last, once every name above exists: the zoo's modules register projectors and presets, then
# the family towers' presets (which build on the zoo's connectors) are registered.
from mmconnect import zoo  # noqa: F401, I001  (this order: the tower presets use the zoo)
from mmconnect import tower_presets  # noqa: F401
