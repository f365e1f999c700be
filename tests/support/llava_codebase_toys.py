"""Stand-ins for the original LLaVA codebase's model classes, for the codebase-swap tests and the
checkpoint-safety tests.

The LLaVA classes here reproduce the behaviour of haotian-liu/LLaVA (commit c121f04,
transformers 4.37.2) on the paths the adapter touches; they are written from that
behaviour, nothing is imported from LLaVA (CI cannot install transformers 4.37.2 beside 5.x):

* ``CLIPVisionTower`` loads its HF CLIP from a name (here a local directory) in ``load_model``,
  built with ``delay_load`` inside ``from_pretrained``, and returns ``hidden_states[-2]``
  without CLS in the images' dtype, under ``no_grad``;
* ``build_vision_projector`` accepts ``linear``, ``mlpNx_gelu`` and ``identity`` and raises
  ``ValueError: Unknown projector type`` for anything else;
* ``initialize_vision_modules`` writes the model args into the config and loads
  ``pretrain_mm_mlp_adapter`` with a strict ``load_state_dict`` of the keys after
  ``mm_projector.``; stage 1 saves ``named_parameters()`` only (no buffers);
* the LLM consumes the projector's output in the model's dtype (LLaVA's builder loads fp16);
* ``merge_image_features`` is LLaVA-1.6's AnyRes packing: base view first, the crops reshaped by
  ``num_patches_per_side`` (with its ``assert``), unpadded and given a newline column.

The CLIP towers are tiny (width 16) but have CLIP-L's 24 blocks
(:func:`save_clip`, built with :mod:`mmconnect.integrations.applications.tiny_models`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, PreTrainedModel

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.integrations.applications.tiny_models import tiny_vision_tower

VISION, LLM, VOCAB = 16, 32, 40


class CLIPVisionTower(nn.Module):
    """LLaVA's tower wrapper: HF CLIP at ``.vision_tower``, loaded from a name in ``load_model``."""

    def __init__(self, name: str, select_layer: int = -2, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = name
        self.select_layer = select_layer
        self.select_feature = "patch"
        if delay_load:
            self.cfg_only = CLIPVisionConfig.from_pretrained(name)
        else:
            self.load_model()

    def load_model(self) -> None:
        if self.is_loaded:
            return
        self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @torch.no_grad()
    def forward(self, images):
        if isinstance(images, list):
            return [self._features(image.unsqueeze(0)) for image in images]
        return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(
            images.to(device=self.device, dtype=self.dtype), output_hidden_states=True
        )
        return out.hidden_states[self.select_layer][:, 1:].to(images.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


def build_vision_projector(config) -> nn.Module:
    """LLaVA's projector builder: the type names it knows, a ValueError for any other."""
    kind = getattr(config, "mm_projector_type", "linear")
    if kind == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match:
        modules: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(int(match.group(1)) - 1):
            modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
        return nn.Sequential(*modules)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"Unknown projector type: {kind}")


class LlavaConfig(PretrainedConfig):
    model_type = "llava_llama_standin"

    def __init__(self, hidden_size: int = LLM, vocab_size: int = VOCAB, **kwargs) -> None:
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class LlavaLlamaModel(nn.Module):
    """``LlavaMetaModel``'s part: tower, ``mm_projector``, ``image_newline`` for ``unpad``."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        if hasattr(config, "mm_vision_tower"):
            self.vision_tower = CLIPVisionTower(
                config.mm_vision_tower, config.mm_vision_select_layer, delay_load=True
            )
            self.mm_projector = build_vision_projector(config)
            if "unpad" in getattr(config, "mm_patch_merge_type", ""):
                self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        if type(vision_tower) is list:
            vision_tower = vision_tower[0]
        return vision_tower

    def initialize_vision_modules(self, model_args) -> None:
        """The part that matters here: config writes, then the strict adapter load."""
        self.get_vision_tower().load_model()
        self.config.mm_projector_type = model_args.mm_projector_type
        self.config.mm_hidden_size = self.get_vision_tower().hidden_size
        for p in self.mm_projector.parameters():
            p.requires_grad = True
        if model_args.pretrain_mm_mlp_adapter is not None:
            weights = torch.load(model_args.pretrain_mm_mlp_adapter, map_location="cpu")
            self.mm_projector.load_state_dict(
                {k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector" in k}
            )


def unpad(features: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """``[C, H, W]`` -> the rows or columns covering the original ``(width, height)`` image."""
    width, height = original_size
    rows, cols = features.shape[1:]
    if width / height > cols / rows:
        kept = int(height * cols / width)
        pad = (rows - kept) // 2
        return features[:, pad : rows - pad]
    kept = int(width * rows / height)
    pad = (cols - kept) // 2
    return features[:, :, pad : cols - pad]


class LlavaLlamaForCausalLM(PreTrainedModel):
    """The causal LM: ``encode_images`` exactly as LLaVA has it, AnyRes packing, an LLM stand-in
    (one Linear in the model's dtype) that consumes the visual tokens."""

    config_class = LlavaConfig
    base_model_prefix = "model"

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        self.model = LlavaLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # modules keep torch's own initialisation (seeded by the tests)

    def get_model(self) -> LlavaLlamaModel:
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images):
        image_features = self.get_model().get_vision_tower()(images)
        image_features = self.get_model().mm_projector(image_features)
        return image_features

    def merge_image_features(self, images: torch.Tensor, image_sizes) -> list[torch.Tensor]:
        """LLaVA-1.6 packing of ``[B, 1 + crops, 3, H, W]``: one ``[tokens, D]`` per image."""
        features = torch.split(self.encode_images(images.flatten(0, 1)), images.shape[1])
        merged = []
        for feature, size in zip(features, image_sizes, strict=True):
            base, crops = feature[0], feature[1:]
            height = width = self.get_vision_tower().num_patches_per_side
            assert height * width == base.shape[0]
            pin_w, pin_h = self.config.image_grid_pinpoints[0]  # one pinpoint: always the best
            side = self.get_vision_tower().config.image_size
            crops = crops.view(pin_h // side, pin_w // side, height, width, -1)
            grid = crops.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            grid = unpad(grid, size)
            newline = self.get_model().image_newline[:, None, None].expand(*grid.shape[:-1], 1)
            grid = torch.cat((grid, newline.to(grid.dtype)), dim=-1).flatten(1, 2).transpose(0, 1)
            merged.append(torch.cat((base, grid), dim=0))
        return merged

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The LLM stand-in: logits for the visual tokens, ``[B, tokens, vocab]``."""
        return self.lm_head(self.encode_images(images))


def save_clip(directory: Path, image_size: int) -> Path:
    """Save a random CLIP tower (24 blocks, width 16, ``image_size`` px / patch 14; seed 0) where
    LLaVA's tower loads it from."""
    tiny_vision_tower("clip", blocks=24, width=VISION, image_size=image_size).save_pretrained(
        directory
    )
    return directory


def llava_config(clip_dir: Path, **overrides) -> LlavaConfig:
    fields = {
        "mm_vision_tower": str(clip_dir),
        "mm_hidden_size": VISION,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
    }
    return LlavaConfig(**{**fields, **overrides})


def connector(preset: str, seed: int = 1, **overrides) -> DenseConnector:
    torch.manual_seed(seed)
    config = ConnectorConfig.from_preset(
        preset, **{"vision_dim": VISION, "llm_dim": LLM, **overrides}
    )
    return DenseConnector(config)
