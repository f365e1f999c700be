"""The connector lab's vision encoder: a CLIP-style ViT whose last layers hold less colour.

The Dense Connector's claim is that an encoder's final layers keep high-level semantics but give
up low-level detail that its shallow layers still hold, and that a connector reading many layers
gives it back to the LLM. A tower with random weights keeps everything everywhere, so the lab
(:mod:`mmconnect.integrations.applications.lab`) first pretrains one, in the same run, on a task
with that property:

* images are synthetic scenes (:func:`mmconnect.integrations.applications.synthetic.sample_scene`) whose every
  object gets a random colour (random hue, saturation and value), drawn afresh for each view;
* every patch token of ``hidden_states[shape_layer]`` (default ``-2``, the layer LLaVA and the
  Dense Connector use as their final feature ``F``) is classified, after the tower's
  post-LayerNorm, as background or the shape of the object covering it (:func:`patch_labels`),
  so the layers up to ``F`` must build shape and keep position;
* a linear head reads every patch's colour (the colour of the object covering it, or the white
  background) from the standardised patch tokens of ``hidden_states[colour_layer]`` (default
  ``-2``, ``F`` again), a per-patch colour reconstruction as pixel-level objectives (MAE) ask
  for. Without it the growing shape directions of the residual stream leave colour a few per
  cent of what ``F`` holds, too little for the lab's LLM to learn to read (docs/lab.md, the
  diagnosis); with it colour stays a large direction in every layer, largest in the shallow
  ones and smaller towards ``F``, where the shape task takes over;
* optionally (``invariance_weight > 0``, off by default), two views of each scene that differ
  only in their colours must give the same standardised patch tokens at
  ``hidden_states[invariance_layer]``: the colour-jitter invariance of SimCLR / DINO pretraining,
  which removes colour from that layer while shallow layers keep it.

:func:`probe_layers` measures the result with linear probes per layer: colour (six named colours,
on the VQA images) and shape, per patch, on held-out scenes; :func:`variance_share` says how
large a share of each layer's variance colour is. The tower is then frozen and shared by every
connector of the lab.

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
from typing import Any, NamedTuple

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
        steps, batch_size: optimiser steps and scenes per step (each scene is seen in two
            colourings: the colour objective sees both, the invariance compares them).
        learning_rate, weight_decay, warmup_steps: AdamW with linear warm-up and cosine decay.
        shape_layer: the ``hidden_states`` index the per-patch shape head reads (HF
            convention, negative from the end).
        colour_weight: weight of the per-patch colour reconstruction (0 disables it; at 6, the
            default, colour is about 40 % of ``hidden_states[-2]``'s object-patch variance).
        colour_layer: the ``hidden_states`` index whose standardised patch tokens must give each
            patch's colour (HF convention, negative from the end; ``-2`` is the layer LLaVA
            reads).
        invariance_weight: weight of the colour-invariance loss (0, the default, disables it).
        invariance_layer: the ``hidden_states`` index made colour-invariant.
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
    shape_layer: int = -2
    colour_weight: float = 6.0
    colour_layer: int = -2
    invariance_weight: float = 0.0
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
        for name in ("shape_layer", "colour_layer", "invariance_layer"):
            check_int(getattr(self, name), name, hint="a hidden_states index")
        check_int(self.seed, "seed")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be a multiple of heads={self.heads}")
        for name in ("shape_layer", "colour_layer", "invariance_layer"):
            if not -(self.blocks + 1) <= getattr(self, name) <= self.blocks:
                raise ValueError(
                    f"{name}={getattr(self, name)} must index hidden_states of a "
                    f"{self.blocks}-block tower (-{self.blocks + 1}..{self.blocks})"
                )
        check_positive_float(self.learning_rate, "learning_rate")
        for name in ("weight_decay", "colour_weight", "invariance_weight"):
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


class RecolouredBatch(NamedTuple):
    """What :func:`recoloured_batch` returns; rows ``i``, ``B + i``, ... of the per-view tensors
    are the views of scene ``i`` (same layout, other colours).

    Attributes:
        pixel_values: ``[views * B, 3, S, S]``, processed for the tower.
        shape_labels: ``[B, grid * grid]``: :func:`patch_labels`' shape per patch, raster order.
        patch_colours: ``[views * B, grid * grid, 3]``: RGB in ``[-1, 1]`` of the object
            covering each patch, white (``1, 1, 1``) for background patches.
    """

    pixel_values: Tensor
    shape_labels: Tensor
    patch_colours: Tensor


def recoloured_batch(
    rng: random.Random,
    config: EncoderPretraining,
    processor: Any,
    spec: SceneSpec,
    *,
    views: int = 2,
) -> RecolouredBatch:
    """``batch_size`` scenes, each in ``views`` random colourings."""
    check_positive_int(views, "views")
    images: list[list[Image.Image]] = [[] for _ in range(views)]
    colours: list[list[Tensor]] = [[] for _ in range(views)]
    labels = []
    for _ in range(config.batch_size):
        scene = sample_scene(rng, spec)
        masks = object_masks(scene, config.image_size)
        shape, owner = patch_labels(scene, masks, config.patch_size, spec.shapes)
        for view_images, view_colours in zip(images, colours, strict=True):
            drawn = [random_colour(rng) for _ in scene.objects]
            view_images.append(recolour(masks, drawn))
            # owner -1 (background) picks the last row: the background's white
            palette = torch.tensor([*drawn, BACKGROUND], dtype=torch.float32) / 127.5 - 1
            view_colours.append(palette[owner])
        labels.append(shape)
    flat = [image for view in images for image in view]
    pixels = processor(images=flat, return_tensors="pt")["pixel_values"]
    patch_colours = torch.stack([colour for view in colours for colour in view])
    return RecolouredBatch(pixels, torch.stack(labels), patch_colours)


# ---------------------------------------------------------------------------- pretraining


@dataclass(frozen=True)
class PretrainedEncoder:
    """What :func:`pretrain_encoder` returns.

    Attributes:
        model: the trained ``CLIPVisionModel`` (eval mode, frozen).
        losses: ``(step, shape loss, colour loss, invariance loss)`` every tenth of the run.
        shape_accuracy: per-patch shape accuracy (background or which shape) on held-out
            randomly coloured scenes; ``object_shape_accuracy``: the same on object patches only.
    """

    model: nn.Module
    losses: list[tuple[int, float, float, float]]
    shape_accuracy: float
    object_shape_accuracy: float


def _hidden_states(model: nn.Module, pixel_values: Tensor) -> tuple[Tensor, ...]:
    return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def _shape_logits(model: nn.Module, head: nn.Linear, hidden: Tensor) -> Tensor:
    """``[B, 1 + N, W] -> [B, N, classes]``: the head on the post-LayerNormed patch tokens."""
    core = getattr(model, "vision_model", model)  # transformers < 5.6 nests the modules
    return head(core.post_layernorm(hidden[:, 1:]))


def pretrain_encoder(
    config: EncoderPretraining, *, show_progress: bool = False
) -> PretrainedEncoder:
    """Train a CLIP-style tower on randomly coloured scenes; deterministic by seed.

    The objectives: per-patch shape classification at ``hidden_states[config.shape_layer]``,
    per-patch colour reconstruction at ``hidden_states[config.colour_layer]`` (weight
    ``config.colour_weight``) and, when ``config.invariance_weight`` is not 0, colour invariance
    at ``hidden_states[config.invariance_layer]``.
    """
    spec = SceneSpec()
    processor = image_processor(config.image_size)
    # seeded with config.seed right before the tower is built, then the heads
    model = tiny_vision_tower("clip", seed=config.seed, **config._tower_geometry())
    head = nn.Linear(config.width, 1 + len(spec.shapes))
    colour_head = nn.Linear(config.width, 3)
    parameters = [*model.parameters(), *head.parameters(), *colour_head.parameters()]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, config.warmup_steps, config.steps)
    )
    rng = random.Random(f"mmconnect.lab.encoder/{config.seed}/train")
    log_every = max(1, config.steps // 10)
    losses: list[tuple[int, float, float, float]] = []
    steps = range(1, config.steps + 1)
    if show_progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="pretraining the lab encoder")
    model.train()
    for step in steps:
        batch = recoloured_batch(rng, config, processor, spec)
        hidden = _hidden_states(model, batch.pixel_values)
        logits = _shape_logits(model, head, hidden[config.shape_layer])
        shape_loss = _balanced_shape_loss(logits, batch.shape_labels.repeat(2, 1))
        colour_loss = (
            _colour_loss(hidden[config.colour_layer], colour_head, batch.patch_colours)
            if config.colour_weight > 0
            else torch.zeros(())
        )
        invariance_loss = (
            _invariance_loss(hidden[config.invariance_layer], batch.shape_labels, config.width)
            if config.invariance_weight > 0
            else torch.zeros(())
        )
        # Shape first: the invariance weight ramps up over the first half of the run, so the
        # invariance cannot be met by a representation that holds nothing.
        ramp = min(1.0, 2 * step / config.steps)
        loss = (
            shape_loss
            + config.colour_weight * colour_loss
            + ramp * config.invariance_weight * invariance_loss
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == config.steps:
            losses.append(
                (
                    step,
                    round(shape_loss.item(), 5),
                    round(colour_loss.item(), 5),
                    round(invariance_loss.item(), 5),
                )
            )
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


def _colour_loss(hidden: Tensor, colour_head: nn.Linear, patch_colours: Tensor) -> Tensor:
    """Mean squared error of every patch's colour read linearly from its standardised token,
    ``[V * B, 1 + N, W], [V * B, N, 3] -> []``.

    Standardised as the next block's LayerNorm sees the token, so colour must be a large part of
    every token, not a small direction that a large head weight could still read.
    """
    tokens = F.layer_norm(hidden[:, 1:], hidden.shape[-1:])
    return F.mse_loss(colour_head(tokens), patch_colours)


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
    batch = recoloured_batch(rng, evaluation, processor, spec)
    hidden = _hidden_states(model, batch.pixel_values)
    predictions = _shape_logits(model, head, hidden[config.shape_layer]).argmax(-1)
    labels = batch.shape_labels.repeat(2, 1)
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


def variance_share(features: Tensor, labels: Tensor) -> list[float]:
    """Share of the variance of ``features`` that ``labels`` explain, per row, rounded to 4 digits.

    Between-class variance over total variance (summed over the feature dimensions): 1 when the
    features are one point per class, 0 when the class means coincide. A linear probe can read a
    class from a direction that carries almost none of the variance; this says how large that
    direction is, which is what an LLM trained through a projector has to find.

    Args:
        features: ``[rows, samples, D]`` (e.g. one row per layer) or ``[samples, D]``.
        labels: ``[samples]`` class indices.

    Returns:
        One share per row (a one-element list for ``[samples, D]``).
    """
    single = features.dim() == 2
    features = features[None] if single else features
    features = features.double()
    centred = features - features.mean(1, keepdim=True)
    total = centred.pow(2).sum((1, 2))
    between = torch.zeros_like(total)
    for label in labels.unique():
        members = labels == label
        between += members.sum() * centred[:, members].mean(1).pow(2).sum(-1)
    shares = [round(float(value), 4) for value in between / total.clamp_min(1e-12)]
    return shares[:1] if single else shares


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
