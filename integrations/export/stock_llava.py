"""A Dense connector rewritten as stock HF LLaVA's ``vision_feature_layer`` list and projector.

Stock LLaVA (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``) reads the
vision tower's ``hidden_states`` at the indices of ``vision_feature_layer`` (an int or a list),
drops the CLS token when ``vision_feature_select_strategy="default"``, concatenates the list's
layers along channels in list order and applies ``LlavaMultiModalProjector``:
``Linear(C * len(list), D) -> act -> Linear(D, D)``. Three Dense fusions are exactly that shape:

* the LLaVA baseline (``SingleLayerSpec``): ``vision_feature_layer = F``, the same projector;
* SCI (``SCISpec``): ``[F, l1, l2, ...]`` in the Dense order, the same projector, so the stock
  model computes the same operations on the same values (bit-identical);
* DCI (``DCISpec``): ``[F, mean(G1), mean(G2), ...]`` feeds a Linear, and a Linear of a mean is
  the mean of Linears::

      W [F, mean(G1), ...] = W_F F + sum_{l in G1} (W_1 / |G1|) H_l + ...

  so the stock list holds the final layer and every group member, and the first projector
  weight gets one ``C``-wide column block per listed layer: ``W_F`` for ``F``, ``W_k / |G_k|``
  for each member of ``G_k``. A layer met in several places (the usual DCI preset's final layer
  ``hidden_states[-2]`` is also the last member of the second group) is listed once and its
  blocks are summed (:func:`expand_first_linear`), which keeps the Linear as narrow as it can be.
  The result equals the Dense model up to floating-point re-association: the Dense mean is
  rounded in the features' dtype before the Linear, the export folds it into the weights.

Everything else has no stock equivalent and is refused with the reason
(:func:`stock_projection`): STI (pooled tokens appended along the sequence), resampling (the
efficient Dense Connector resizes the token grid), projectors other than a two-Linear MLP (the
connector zoo, ``linear``, ``mlp3x_gelu``), DeepStack injection, user fusions, and towers with
more than one prefix token (``"default"`` drops exactly one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmconnect import ConnectorConfig, DenseConnector
from mmconnect.projectors import MLPSpec

#: The Dense fusions a stock LLaVA can express, by kind.
EXPORTABLE_FUSIONS = ("none", "sci", "dci")

#: ``MLPSpec.activation`` -> HF ``projector_hidden_act`` computing the same function
#: (``ACT2FN["gelu"]`` is the exact-erf GELU, as ``nn.GELU()``).
STOCK_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu"}

_REASONS = {
    "sti": (
        "STI appends each extra layer's pooled tokens after the final layer's tokens (along the "
        "sequence), while stock LLaVA's vision_feature_layer list only concatenates along channels"
    ),
}


@dataclass(frozen=True, kw_only=True)
class StockProjection:
    """How a Dense connector reads as a stock LLaVA's image path.

    Attributes:
        feature_layers: the stock ``vision_feature_layer`` list: non-negative HF
            ``hidden_states`` indices in concatenation order, each once.
        chunks: the Dense projector input's ``C``-wide chunks in order, each the layers it
            averages (``(F,)`` for the final layer, ``(l,)`` per SCI layer, a DCI group's
            members); the stock first Linear is built from these (:func:`expand_first_linear`).
        select_strategy: the stock ``vision_feature_select_strategy``: ``"default"`` for a tower
            with one prefix (CLS) token, ``"full"`` for one without (SigLIP).
        activation: the stock ``projector_hidden_act``.
        exact: ``True`` when the stock model runs the same operations on the same values as the
            Dense one (baseline, SCI: bit-identical); ``False`` for DCI (re-associated).
    """

    feature_layers: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    select_strategy: str
    activation: str
    exact: bool

    @property
    def vision_feature_layer(self) -> int | list[int]:
        """The value for the stock config: an int for one layer (as LLaVA-1.5's ``-2``), else
        the list."""
        layers = self.feature_layers
        return layers[0] if len(layers) == 1 else list(layers)


def stock_projection(config: ConnectorConfig, prefix_tokens: int) -> StockProjection:
    """The stock LLaVA image path that computes what a connector of ``config`` computes.

    Args:
        config: the Dense connector's config.
        prefix_tokens: tokens the tower puts before its patch tokens (1 for CLIP's CLS, 0 for
            SigLIP), as the tap drops them.

    Raises:
        ValueError: the connector has no stock equivalent; the message names what (the fusion,
            resampling, the projector, the injection, the prefix tokens) and why.
    """
    kind = config.fusion.kind
    if kind not in EXPORTABLE_FUSIONS:
        reason = _REASONS.get(
            kind, f"fusion {kind!r} is not one of the fusions stock LLaVA expresses"
        )
        raise ValueError(
            f"cannot export a connector with fusion {kind!r} to stock LLaVA: {reason}; "
            f"exportable fusions: {', '.join(EXPORTABLE_FUSIONS)}"
        )
    if config.resample is not None:
        raise ValueError(
            f"cannot export a connector with resample={config.resample} to stock LLaVA: the "
            "efficient Dense Connector resizes the token grid "
            f"({config.resample.mode!r} to {config.resample.grid}), a step stock LLaVA does not "
            "have; export a connector without resampling"
        )
    projector = config.projector
    if not (isinstance(projector, MLPSpec) and projector.depth == 2):
        raise ValueError(
            f"cannot export projector {projector.name!r} to stock LLaVA: its projector "
            "(LlavaMultiModalProjector) is exactly Linear -> activation -> Linear, an MLPSpec "
            "of depth 2 such as 'mlp2x_gelu'; zoo projectors, 'linear' and other depths have "
            "no stock equivalent"
        )
    if config.injection is not None:
        raise ValueError(
            "cannot export a connector with injection= (DeepStack, vision layers "
            f"{list(config.injection.layers)}) to stock LLaVA: stock LLaVA adds nothing to the "
            "LLM's hidden states besides the image tokens"
        )
    if prefix_tokens not in (0, 1):
        raise ValueError(
            f"cannot export a tower with {prefix_tokens} prefix tokens to stock LLaVA: its "
            "vision_feature_select_strategy 'default' drops exactly one (CLS), 'full' none"
        )
    fusion = config.fusion.normalized(config.num_layers)
    final = (fusion.final_layer,)
    if kind == "dci":
        chunks = (final, *fusion.groups)
    else:
        chunks = (final, *((layer,) for layer in getattr(fusion, "extra_layers", ())))
    return StockProjection(
        feature_layers=_unique_in_order(layer for chunk in chunks for layer in chunk),
        chunks=chunks,
        select_strategy="default" if prefix_tokens == 1 else "full",
        activation=STOCK_ACTIVATIONS[projector.activation],
        exact=kind != "dci",
    )


def _unique_in_order(layers: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(layers))


def expand_first_linear(
    weight: Tensor, chunks: Sequence[Sequence[int]]
) -> tuple[tuple[int, ...], Tensor]:
    """The first projector weight over the distinct layers of ``chunks``, each read once.

    The Dense first Linear reads ``len(chunks)`` column blocks of width
    ``C = weight.shape[1] / len(chunks)``; block ``k`` multiplies the mean of the layers in
    ``chunks[k]``. By linearity that is block ``k / len(chunks[k])`` applied to each member, so
    the weight over the distinct layers (first-appearance order) gives each layer the sum of the
    scaled blocks of every chunk it belongs to. The sums are taken in float64 and rounded once
    to ``weight.dtype``: a block read by one chunk of one layer is copied bit for bit.

    Args:
        weight: ``[D, C * len(chunks)]``, the Dense first Linear's weight.
        chunks: per column block, the layers it averages (``(F,)``, ``(l,)`` or a group).

    Returns:
        The distinct layers in first-appearance order and the weight over them,
        ``[D, C * len(layers)]``.

    Raises:
        ValueError: ``weight`` is not 2-D, its width is not a multiple of ``len(chunks)``, or a
            chunk is empty.

    Examples:
        >>> w = torch.arange(6.0).reshape(1, 6)         # three chunks of C = 2 columns
        >>> expand_first_linear(w, [(5,), (3, 5), (7,)])
        ((5, 3, 7), tensor([[1.0000, 2.5000, 1.0000, 1.5000, 4.0000, 5.0000]]))
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    if not chunks or weight.shape[1] % len(chunks):
        raise ValueError(
            f"weight has {weight.shape[1]} input columns, not a multiple of the {len(chunks)} "
            "chunks the connector's fusion makes"
        )
    for position, chunk in enumerate(chunks):
        if not chunk:
            raise ValueError(f"chunks[{position}] is empty: every chunk reads at least one layer")
    width = weight.shape[1] // len(chunks)
    layers = _unique_in_order(layer for chunk in chunks for layer in chunk)
    slot = {layer: position for position, layer in enumerate(layers)}
    exact = weight.detach().to(torch.float64)
    expanded = torch.zeros(weight.shape[0], width * len(layers), dtype=torch.float64)
    for position, chunk in enumerate(chunks):
        block = exact[:, position * width : (position + 1) * width] / len(chunk)
        for layer in chunk:
            start = slot[layer] * width
            expanded[:, start : start + width] += block
    return layers, expanded.to(weight.dtype)


def stock_projector_state(
    connector: DenseConnector, projection: StockProjection
) -> dict[str, Tensor]:
    """The ``LlavaMultiModalProjector`` state dict computing ``connector``'s projection.

    ``linear_1.weight`` is the Dense first weight expanded over ``projection.feature_layers``
    (:func:`expand_first_linear`), ``[D, C * len(feature_layers)]``; ``linear_1.bias``,
    ``linear_2.*`` are the Dense ones. Tensors keep the connector's device and dtype.

    Raises:
        ValueError: the connector's projector is not the two-Linear MLP ``projection`` was made
            for.
    """
    projector = connector.projector
    linears = [module for module in projector.children() if isinstance(module, nn.Linear)]
    if len(linears) != 2 or linears[0].bias is None or linears[1].bias is None:
        raise ValueError(
            f"the connector's projector {type(projector).__name__} is not two Linears with "
            "biases (mlp2x_*), which the stock projector needs"
        )
    first, second = linears
    layers, weight = expand_first_linear(first.weight, projection.chunks)
    if layers != projection.feature_layers:
        raise ValueError(
            f"the projection lists layers {projection.feature_layers} but its chunks read {layers}"
        )
    return {
        "linear_1.weight": weight.to(first.weight.device),
        "linear_1.bias": first.bias.detach().clone(),
        "linear_2.weight": second.weight.detach().clone(),
        "linear_2.bias": second.bias.detach().clone(),
    }
