"""Projectors from fused vision features to the LLM's embedding width, by exact registry name.

Registered: ``identity``, ``linear`` and ``mlp2x_gelu`` .. ``mlp8x_gelu`` (``N`` Linears with an
exact-erf GELU between them, LLaVA's naming). The module layouts equal LLaVA's ``mm_projector``
(``linear`` is one ``nn.Linear``, ``mlpNx_gelu`` an ``nn.Sequential`` with Linears at indices
0, 2, 4, ...), so official weights load by key. Register more with :func:`register_projector`.

Token contract: a plain module is applied token by token (``[B, N, in_dim] -> [B, N, out_dim]``,
the grid unchanged, tokens after the grid passed through). A projector that changes the token
count or the grid (pixel shuffle, C-Abstractor) subclasses :class:`GridProjector`: it receives
the grid in ``forward(tokens, grid)`` and declares ``num_tokens(grid)`` / ``output_grid(grid)``,
which :class:`mmconnect.DenseConnector` composes into its own count.

Examples:
    >>> projector = build_projector("mlp2x_gelu", in_dim=3072, out_dim=4096)
    >>> [name for name, _ in projector.named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from torch import Tensor, nn

from mmconnect.checkpoint import read_state_dict
from mmconnect.registry import Registry, describe_callable

ProjectorBuilder = Callable[[int, int], nn.Module]
_PROJECTORS: Registry[ProjectorBuilder] = Registry(
    "projector", describe=lambda builder: f"builder {describe_callable(builder)}"
)


class GridProjector(nn.Module):
    """Base of the projectors that work on the token grid rather than token by token.

    ``forward(tokens, grid)``: ``[B, h*w, in_dim]`` in raster order on the ``(h, w)`` grid ->
    ``[B, num_tokens(grid), out_dim]``, whose tokens form ``output_grid(grid)`` in raster order.
    Subclasses implement ``output_grid`` and ``forward``; ``num_tokens`` defaults to
    the output grid's area. The input is always a whole grid: a fusion whose tokens do not all
    form one (STI) cannot feed a grid projector.
    """

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The ``(height, width)`` grid produced for an input grid."""
        raise NotImplementedError(f"{type(self).__name__} must implement output_grid(grid)")

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """The output token count for an input grid: the output grid's area."""
        height, width = self.output_grid(grid)
        return height * width

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward(tokens, grid)")


def register_projector(name: str, builder: ProjectorBuilder) -> None:
    """Register ``builder(in_dim, out_dim) -> nn.Module`` under the exact ``name``.

    The module is either applied token by token (``[B, N, in_dim] -> [B, N, out_dim]``) or is a
    :class:`GridProjector` that declares the token count and grid it produces.

    Raises:
        ValueError: ``name`` is already registered (registries never silently replace).
        TypeError: ``builder`` is not callable.
    """
    _PROJECTORS.check_available(name)
    if not callable(builder):
        raise TypeError(f"projector builder must be callable, got {type(builder).__name__}")
    _PROJECTORS.register(name, builder)


def list_projectors() -> list[str]:
    """The registered projector names, sorted."""
    return sorted(_PROJECTORS)


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build the projector registered as ``name``: ``[B, N, in_dim] -> [B, N', out_dim]``.

    ``N' = N`` for token-wise projectors; a :class:`GridProjector` declares ``N'``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad widths.
    """
    if name not in _PROJECTORS:
        raise ValueError(
            f"unknown projector {name!r}; known projectors: {', '.join(list_projectors())}"
        )
    for argument, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument} must be a positive int, got {value!r}")
    return _PROJECTORS[name](in_dim, out_dim)


def _identity(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ValueError(
            f"the identity projector needs in_dim == out_dim, got in_dim={in_dim}, out_dim={out_dim}"
        )
    return nn.Identity()


def _mlp_gelu(in_dim: int, out_dim: int, *, depth: int) -> nn.Sequential:
    modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*modules)


register_projector("identity", _identity)
register_projector("linear", nn.Linear)
for _depth in range(2, 9):
    register_projector(f"mlp{_depth}x_gelu", partial(_mlp_gelu, depth=_depth))


# ---------------------------------------------------------------------------- official weights

#: Prefixes under which projector weights appear in LLaVA-family checkpoints.
_PROJECTOR_PREFIXES = (
    "model.mm_projector.",  # original LLaVA / Dense Connector mm_projector.bin
    "mm_projector.",
    "model.multi_modal_projector.",  # HF transformers >= 4.52 LlavaForConditionalGeneration
    "multi_modal_projector.",
)
#: Where a :class:`mmconnect.DenseConnector` keeps its projector in its own state dict.
_CONNECTOR_PROJECTOR = "projector."
# HF LlavaMultiModalProjector names its two Linears linear_1 / linear_2 (at 0 and 2 in LLaVA's MLP).
_HF_LINEAR_NAME = re.compile(r"^linear_(\d+)\.")


_PEFT_PREFIX = "base_model."  # PEFT wraps the model: base_model.model.<the model's own keys>
_MODEL_PREFIX = "model."


def strip_lora_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Name the keys of an official LoRA run's ``non_lora_trainables.bin`` as the model does.

    A LLaVA / Dense Connector LoRA run saves the trainable non-LoRA weights through PEFT's
    wrapper (``base_model.model.model.mm_projector.0.weight``). As LLaVA's model builder does,
    ``base_model.`` is removed, then ``model.`` too when keys start with ``model.model.``, giving
    ``model.mm_projector.0.weight``. Other state dicts pass through unchanged.

    Examples:
        >>> sorted(strip_lora_prefixes({"base_model.model.model.mm_projector.0.bias": 0}))
        ['model.mm_projector.0.bias']
    """
    state = {
        (key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key): value
        for key, value in state.items()
    }
    if any(key.startswith(_MODEL_PREFIX * 2) for key in state):
        state = {
            (key[len(_MODEL_PREFIX) :] if key.startswith(_MODEL_PREFIX) else key): value
            for key, value in state.items()
        }
    return state


def projector_state_from_checkpoint(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Extract projector weights from a LLaVA-family state dict and name them as mmconnect does.

    Accepts official ``mm_projector.bin`` keys (``model.mm_projector.0.weight`` ...), an official
    LoRA run's ``non_lora_trainables.bin`` (``base_model.model.model.mm_projector.0.weight``,
    see :func:`strip_lora_prefixes`), HF ``LlavaMultiModalProjector`` keys (``linear_1.weight``
    ..., with or without the ``model.multi_modal_projector.`` prefix), a DenseConnector's own keys
    (``projector.0.weight``, also under those prefixes) and bare keys (``0.weight``). Returns keys
    of an mmconnect projector (``0.weight``, ``2.weight``; ``weight`` for ``linear``).

    Raises:
        ValueError: no projector weights are found.
    """
    stripped: dict[str, Tensor] = {}
    for key, value in strip_lora_prefixes(state).items():
        for prefix in _PROJECTOR_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key.startswith(_CONNECTOR_PROJECTOR):  # a DenseConnector's own keys (LLaVA code saves
            key = key[len(_CONNECTOR_PROJECTOR) :]  # them as mm_projector.projector.* after a swap)
        match = _HF_LINEAR_NAME.match(key)
        if match:  # linear_1 -> 0, linear_2 -> 2, linear_3 -> 4 ...
            key = f"{2 * (int(match.group(1)) - 1)}.{key[match.end() :]}"
        stripped[key] = value
    projector_keys = {
        key: value for key, value in stripped.items() if re.fullmatch(r"(\d+\.)?(weight|bias)", key)
    }
    if not projector_keys:
        sample = ", ".join(list(state)[:5])
        raise ValueError(
            "found no projector weights: expected keys like 'model.mm_projector.0.weight' or "
            f"'linear_1.weight', got {sample or 'an empty state dict'}"
        )
    return projector_keys


def load_projector_weights(projector: nn.Module, source: str | Path | Mapping[str, Tensor]) -> None:
    """Load official LLaVA / Dense Connector / HF LLaVA projector weights into ``projector``.

    Args:
        projector: a projector built by :func:`build_projector`.
        source: a path to ``mm_projector.bin``, ``non_lora_trainables.bin`` or ``*.safetensors``,
            or an in-memory state dict.

    Raises:
        ValueError: keys or shapes do not match the projector (the message lists them).
    """
    state = read_state_dict(source) if isinstance(source, str | Path) else source
    weights = projector_state_from_checkpoint(state)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"projector weights do not fit {type(projector).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    mismatched = [
        f"{key}: file {tuple(weights[key].shape)} vs projector {tuple(expected[key].shape)}"
        for key in expected
        if weights[key].shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError("projector weight shapes do not match: " + "; ".join(mismatched))
    projector.load_state_dict(weights)
