"""The connector lab's vision encoder: a CLIP-style ViT whose last layers forget colour.

The Dense Connector's claim is that an encoder's final layers keep high-level semantics but lose
low-level detail that its shallow layers still hold, and that a connector reading many layers
gives it back to the LLM. A tower with random weights loses nothing, so the lab
(:mod:`mmconnect.integrations.applications.lab`) first pretrains one, in the same run, on a task with that
property:

* images are synthetic scenes (:func:`mmconnect.integrations.applications.synthetic.sample_scene`) whose every
  object gets a random colour (random hue, saturation and value), drawn afresh for each view;
* every patch token of the last layer ``H[L]`` is classified as background or the shape of the
  object covering it (:func:`patch_labels`), so the last layers must keep shape and position;
* two views of each scene that differ only in their colours must give the same standardised
  patch tokens at ``hidden_states[invariance_layer]`` (default ``-2``, the layer LLaVA and the
  Dense Connector use as their final feature ``F``): the colour-jitter invariance of SimCLR / DINO
  pretraining, which removes colour from that layer while shallow layers keep it.

:func:`probe_layers` measures the result with linear probes per layer: colour (six named colours,
on the VQA images) and shape, per patch, on held-out scenes. The tower is then frozen and shared
by every connector of the lab.

Example:
    >>> config = EncoderPretraining(steps=2, batch_size=4, width=32, blocks=4)  # doctest: +SKIP
    >>> encoder = pretrain_encoder(config)                                      # doctest: +SKIP
    >>> probe_layers(encoder.model, config)["colour"][0]                        # doctest: +SKIP
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mmconnect.integrations.applications.synthetic import (
    BACKGROUND,
    COLOURS,
    Scene,
    SceneSpec,
    render_scene,
    sample_scene,
)
from mmconnect.integrations.applications.tiny_models import tiny_vision_config, tiny_vision_tower
from mmconnect.validation import check_float, check_int, check_positive_float, check_positive_int

#: A patch is labelled with the object covering most of its pixels if that object covers at least
#: this share of them; otherwise it is background.
MIN_PATCH_COVERAGE = 0.25


@dataclass(frozen=True, kw_only=True)
class EncoderPretraining:
    """The lab encoder and how it is pretrained and probed.

    Attributes:
        image_size, patch_size: pixels; the token grid is ``image_size // patch_size`` square.
        width, blocks, heads: the CLIP vision transformer (``blocks=24`` is CLIP-L's depth, which
            the ``*-clip-l-336`` presets need); the MLP is ``4 * width`` wide as in CLIP.
        steps, batch_size: optimiser steps and scenes per step (each scene is seen as two views).
        learning_rate, weight_decay, warmup_steps: AdamW with linear warm-up and cosine decay.
        invariance_weight: weight of the colour-invariance loss (0 disables it).
        invariance_layer: the ``hidden_states`` index made colour-invariant (HF convention,
            negative from the end; ``-2`` is the layer LLaVA reads).
        probe_images: held-out VQA-style scenes for the probes (three quarters train the probe,
            one quarter tests it).
        seed: seeds the tower's initialisation, the scenes, colours and probes.
    """

    image_size: int = 64
    patch_size: int = 8
    width: int = 32
    blocks: int = 24
    heads: int = 4
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    invariance_weight: float = 5.0
    invariance_layer: int = -2
    probe_images: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "blocks", "heads", "steps"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.batch_size, "batch_size")
        check_int(
            self.probe_images, "probe_images", minimum=8, hint="a quarter of them test the probe"
        )
        check_int(self.invariance_layer, "invariance_layer", hint="a hidden_states index")
        check_int(self.seed, "seed")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be a multiple of heads={self.heads}")
        if not -(self.blocks + 1) <= self.invariance_layer <= self.blocks:
            raise ValueError(
                f"invariance_layer={self.invariance_layer} must index hidden_states of a "
                f"{self.blocks}-block tower (-{self.blocks + 1}..{self.blocks})"
            )
        check_positive_float(self.learning_rate, "learning_rate")
        for name in ("weight_decay", "invariance_weight"):
            check_float(getattr(self, name), name, minimum=0)
        check_int(self.warmup_steps, "warmup_steps", minimum=0)

    @property
    def grid_side(self) -> int:
        """Patch tokens per side of the square grid."""
        return self.image_size // self.patch_size

    def vision_config(self) -> Any:
        """The HF ``CLIPVisionConfig`` of the tower (:func:`tiny_vision_config`, MLP ``4 * width``)."""
        return tiny_vision_config("clip", **self._tower_geometry())

    def _tower_geometry(self) -> dict[str, int]:
        return {
            "blocks": self.blocks,
            "width": self.width,
            "intermediate_size": 4 * self.width,
            "heads": self.heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def image_processor(image_size: int) -> Any:
    """The ``CLIPImageProcessor`` the lab uses everywhere: no resize beyond ``image_size``, CLIP
    normalisation."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


# ---------------------------------------------------------------------------- scenes and labels


def object_masks(scene: Scene, image_size: int) -> np.ndarray:
    """``[objects, S, S]`` bool: the pixels of each object as :func:`render_scene` draws it."""
    masks = []
    for obj in scene.objects:
        pixels = np.asarray(render_scene(Scene(objects=(obj,)), image_size))
        masks.append((pixels != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1))
    return np.stack(masks)


def patch_labels(
    scene: Scene, masks: np.ndarray, patch_size: int, shapes: tuple[str, ...]
) -> tuple[Tensor, Tensor]:
    """Per-patch labels in raster order (the order of the tower's patch tokens).

    Returns:
        ``(shape, owner)``, both ``LongTensor [grid * grid]``: ``shape`` is 0 for background and
        ``1 + shapes.index(...)`` for a patch covered (at least :data:`MIN_PATCH_COVERAGE`) by an
        object; ``owner`` is that object's index in ``scene.objects``, or -1.
    """
    count, size, _ = masks.shape
    grid = size // patch_size
    coverage = masks.reshape(count, grid, patch_size, grid, patch_size).mean(axis=(2, 4))
    coverage = coverage.reshape(count, grid * grid)  # [objects, patches], raster order
    best = coverage.argmax(axis=0)
    covered = coverage.max(axis=0) >= MIN_PATCH_COVERAGE
    owner = np.where(covered, best, -1)
    shape_ids = np.array([1 + shapes.index(obj.shape) for obj in scene.objects])
    shape = np.where(covered, shape_ids[best], 0)
    return torch.from_numpy(shape).long(), torch.from_numpy(owner).long()


def random_colour(rng: random.Random) -> tuple[int, int, int]:
    """A random saturated, not too dark RGB colour (hue uniform; saturation, value in [0.45, 1]):
    the range of the named colours, never close to the white background."""
    red, green, blue = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.45, 1), rng.uniform(0.45, 1))
    return round(255 * red), round(255 * green), round(255 * blue)


def recolour(masks: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    """A white image with object ``i`` (``masks[i]``) filled with ``colours[i]``."""
    size = masks.shape[-1]
    pixels = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    for mask, colour in zip(masks, colours, strict=True):
        pixels[mask] = colour
    return Image.fromarray(pixels)


def recoloured_batch(
    rng: random.Random,
    config: EncoderPretraining,
    processor: Any,
    spec: SceneSpec,
    *,
    views: int = 2,
) -> tuple[Tensor, Tensor]:
    """``batch_size`` scenes, each in ``views`` random colourings.

    Returns:
        ``(pixel_values [views * B, 3, S, S], shape_labels [B, grid * grid])``: rows ``i``,
        ``B + i``, ... are the views of scene ``i`` (same layout, other colours).
    """
    images: list[list[Image.Image]] = [[] for _ in range(views)]
    labels = []
    for _ in range(config.batch_size):
        scene = sample_scene(rng, spec)
        masks = object_masks(scene, config.image_size)
        for view in images:
            view.append(recolour(masks, [random_colour(rng) for _ in scene.objects]))
        labels.append(patch_labels(scene, masks, config.patch_size, spec.shapes)[0])
    flat = [image for view in images for image in view]
    pixels = processor(images=flat, return_tensors="pt")["pixel_values"]
    return pixels, torch.stack(labels)


# ---------------------------------------------------------------------------- pretraining


@dataclass(frozen=True)
class PretrainedEncoder:
    """What :func:`pretrain_encoder` returns.

    Attributes:
        model: the trained ``CLIPVisionModel`` (eval mode, frozen).
        losses: ``(step, shape loss, invariance loss)`` every tenth of the run.
        shape_accuracy: per-patch shape accuracy (background or which shape) on held-out
            randomly coloured scenes; ``object_shape_accuracy``: the same on object patches only.
    """

    model: nn.Module
    losses: list[tuple[int, float, float]]
    shape_accuracy: float
    object_shape_accuracy: float


def _hidden_states(model: nn.Module, pixel_values: Tensor) -> tuple[Tensor, ...]:
    return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def _shape_logits(model: nn.Module, head: nn.Linear, last: Tensor) -> Tensor:
    """``[B, 1 + N, W] -> [B, N, classes]``: the head on the post-LayerNormed patch tokens."""
    core = getattr(model, "vision_model", model)  # transformers < 5.6 nests the modules
    return head(core.post_layernorm(last[:, 1:]))


def pretrain_encoder(
    config: EncoderPretraining, *, show_progress: bool = False
) -> PretrainedEncoder:
    """Train a CLIP-style tower on per-patch shape classification of randomly coloured scenes,
    with colour invariance at ``hidden_states[config.invariance_layer]``; deterministic by seed."""
    spec = SceneSpec()
    processor = image_processor(config.image_size)
    # seeded with config.seed right before the tower is built, then the head
    model = tiny_vision_tower("clip", seed=config.seed, **config._tower_geometry())
    head = nn.Linear(config.width, 1 + len(spec.shapes))
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, config.warmup_steps, config.steps)
    )
    rng = random.Random(f"mmconnect.lab.encoder/{config.seed}/train")
    log_every = max(1, config.steps // 10)
    losses: list[tuple[int, float, float]] = []
    steps = range(1, config.steps + 1)
    if show_progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="pretraining the lab encoder")
    views = 2 if config.invariance_weight > 0 else 1  # the invariance compares two colourings
    model.train()
    for step in steps:
        pixel_values, labels = recoloured_batch(rng, config, processor, spec, views=views)
        hidden = _hidden_states(model, pixel_values)
        logits = _shape_logits(model, head, hidden[-1])
        shape_loss = _balanced_shape_loss(logits, labels.repeat(views, 1))
        invariance_loss = (
            _invariance_loss(hidden[config.invariance_layer], labels, config.width)
            if views == 2
            else torch.zeros(())
        )
        # Shape first: the invariance weight ramps up over the first half of the run, so the
        # invariance cannot be met by a representation that holds nothing.
        ramp = min(1.0, 2 * step / config.steps)
        loss = shape_loss + ramp * config.invariance_weight * invariance_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == config.steps:
            losses.append((step, round(shape_loss.item(), 5), round(invariance_loss.item(), 5)))
    model.eval().requires_grad_(False)
    accuracy, object_accuracy = _shape_accuracy(model, head, config, processor, spec)
    return PretrainedEncoder(
        model=model,
        losses=losses,
        shape_accuracy=accuracy,
        object_shape_accuracy=object_accuracy,
    )


def _balanced_shape_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with background and object patches weighted equally, ``[B, N, C], [B, N]``.

    Most patches are background; unweighted, the tower first learns to call everything
    background and only slowly the shapes.
    """
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    objects = labels.flatten() > 0
    parts = [losses[mask].mean() for mask in (objects, ~objects) if mask.any()]
    return sum(parts) / len(parts)


def _invariance_loss(hidden: Tensor, labels: Tensor, width: int) -> Tensor:
    """Squared difference of the two views' object-patch tokens, ``[2B, 1 + N, W] -> []``.

    Tokens are standardised per token, as the next block's LayerNorm sees them. Background
    patches are white in both views and carry no colour, so only object patches count.
    """
    tokens = F.layer_norm(hidden[:, 1:], (width,))
    first, second = tokens.chunk(2)
    objects = labels > 0  # [B, N]
    if not objects.any():
        return tokens.new_zeros(())
    return (first[objects] - second[objects]).pow(2).mean()


@torch.no_grad()
def _shape_accuracy(
    model: nn.Module, head: nn.Linear, config: EncoderPretraining, processor: Any, spec: SceneSpec
) -> tuple[float, float]:
    rng = random.Random(f"mmconnect.lab.encoder/{config.seed}/heldout")
    evaluation = dataclasses.replace(config, batch_size=64)
    pixel_values, labels = recoloured_batch(rng, evaluation, processor, spec)
    predictions = _shape_logits(model, head, _hidden_states(model, pixel_values)[-1]).argmax(-1)
    labels = labels.repeat(2, 1)
    right = predictions == labels
    return float(right.float().mean()), float(right[labels > 0].float().mean())


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class ProbeData:
    """Object-patch features of held-out VQA scenes, for linear probes.

    Attributes:
        features: ``[L + 1, samples, W]``: ``hidden_states[k]`` of each sample's patch token.
        colour, shape: ``[samples]``: index in :data:`COLOURS` (six-way) and in the spec's shapes
            (three-way) of the object covering the patch.
        train: ``[samples]`` bool: the probe-training samples (the first three quarters of the
            scenes; the rest test).
    """

    features: Tensor
    colour: Tensor
    shape: Tensor
    train: Tensor


@torch.no_grad()
def probe_data(model: nn.Module, config: EncoderPretraining) -> ProbeData:
    """Run ``model`` on ``config.probe_images`` VQA-style scenes in the six named colours (what
    the connectors see), drawn from a seed of their own; every object patch
    (:func:`patch_labels`) is a sample."""
    spec = SceneSpec()
    processor = image_processor(config.image_size)
    rng = random.Random(f"mmconnect.lab.encoder/{config.seed}/probe")
    colour_names = list(COLOURS)
    images, colours, shapes, scene_ids = [], [], [], []
    for index in range(config.probe_images):
        scene = sample_scene(rng, spec)
        masks = object_masks(scene, config.image_size)
        shape, owner = patch_labels(scene, masks, config.patch_size, spec.shapes)
        images.append(render_scene(scene, config.image_size))
        patches = torch.nonzero(owner >= 0).flatten()
        for patch in patches.tolist():
            obj = scene.objects[int(owner[patch])]
            colours.append(colour_names.index(obj.colour))
            shapes.append(int(shape[patch]) - 1)
            scene_ids.append((index, patch))
    hidden = []
    for start in range(0, len(images), 64):
        pixel_values = processor(images=images[start : start + 64], return_tensors="pt")
        hidden.append(torch.stack(_hidden_states(model, pixel_values["pixel_values"]))[:, :, 1:])
    states = torch.cat(hidden, dim=1)  # [L + 1, images, patches, W]
    rows = torch.tensor([image for image, _ in scene_ids])
    columns = torch.tensor([patch for _, patch in scene_ids])
    return ProbeData(
        features=states[:, rows, columns],
        colour=torch.tensor(colours),
        shape=torch.tensor(shapes),
        train=rows < (3 * config.probe_images) // 4,
    )


def probe_accuracy(features: Tensor, labels: Tensor, train: Tensor) -> list[float]:
    """Held-out accuracy of one linear probe per row of ``features`` (``[probes, samples, D]``),
    rounded to 4 digits."""
    accuracy = linear_probe(features[:, train], labels[train], features[:, ~train], labels[~train])
    return [round(float(value), 4) for value in accuracy]


def probe_layers(model: nn.Module, config: EncoderPretraining) -> dict[str, list[float]]:
    """Held-out accuracy of linear probes on every layer's patch tokens (:func:`probe_data`).

    Returns:
        ``{"colour": [accuracy of H[0], ..., H[L]], "shape": [...]}``: six-way colour and
        three-way shape classification of object patches (chance: about 1/6 and 1/3).
    """
    data = probe_data(model, config)
    return {
        "colour": probe_accuracy(data.features, data.colour, data.train),
        "shape": probe_accuracy(data.features, data.shape, data.train),
    }


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, l2: float = 1e-3
) -> Tensor:
    """Test accuracy of multinomial logistic regression on standardised features.

    Args:
        train_x: ``[samples, features]``, or ``[probes, samples, features]`` for several
            independent probes (e.g. one per layer) with the same labels, fitted together.
        train_y: ``[samples]`` class indices.
        test_x: held-out features, shaped as ``train_x``.
        test_y: ``[samples]`` held-out class indices.
        l2: weight of the squared-norm penalty on the weights (per sample).

    Returns:
        Accuracy: a 0-d tensor, or ``[probes]``.
    """
    single = train_x.dim() == 2
    if single:
        train_x, test_x = train_x[None], test_x[None]
    mean, std = train_x.mean(1, keepdim=True), train_x.std(1, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probes, _, features = train_x.shape
    classes = int(max(train_y.max(), test_y.max())) + 1
    with torch.enable_grad():
        weight = torch.zeros(probes, features, classes, requires_grad=True)
        bias = torch.zeros(probes, 1, classes, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1, max_iter=300, line_search_fn="strong_wolfe"
        )
        targets = train_y.repeat(probes)

        def closure() -> Tensor:
            # The probes are independent: the minimum of the sum is each one's minimum.
            optimizer.zero_grad()
            logits = torch.bmm(train_x, weight) + bias
            loss = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")
            loss = loss / train_y.numel() + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        accuracy = ((torch.bmm(test_x, weight) + bias).argmax(-1) == test_y).float().mean(1)
    return accuracy[0] if single else accuracy
