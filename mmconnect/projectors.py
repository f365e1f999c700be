"""Projectors from fused vision features to the LLM's embedding width, described by specs.

A projector is described by a :class:`ProjectorSpec`: its registered ``kind`` and only its own
parameters. Registered: ``identity``, ``linear`` (both without parameters:
``ProjectorSpec(kind="linear")``) and ``mlp`` (:class:`MLPSpec`: ``depth`` Linears with an
activation between them, exact-erf GELU by default). LLaVA's names are accepted wherever a spec
is: ``"mlp2x_gelu"`` is ``MLPSpec(depth=2)``, ``"linear"`` and ``"identity"`` the parameterless
kinds, and :attr:`ProjectorSpec.name` gives the LLaVA name back (``MLPSpec(depth=3).name ==
"mlp3x_gelu"``). The module layouts equal LLaVA's ``mm_projector`` (``linear`` is one
``nn.Linear``, an MLP an ``nn.Sequential`` with Linears at indices 0, 2, 4, ...), so official
weights load by key. Register more with :func:`register_projector`.

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

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from mmconnect.checkpoint import read_state_dict, shape_problems
from mmconnect.registry import Registry, describe_callable
from mmconnect.specs import (
    construct_spec,
    fixed_kind,
    json_ready,
    parameter_names,
    spec_from_mapping,
)
from mmconnect.validation import check_choice, check_positive_int

#: ``builder(in_dim, out_dim, **parameters) -> nn.Module``; ``parameters`` are the spec's own.
ProjectorBuilder = Callable[..., nn.Module]


@dataclass(frozen=True, kw_only=True)
class ProjectorSpec:
    """What a projector is: its registered ``kind`` and only its own parameters.

    A projector kind without parameters (``identity``, ``linear``, many user projectors) is
    written with this class itself, ``ProjectorSpec(kind="linear")``; one with parameters has a
    subclass that fixes ``kind`` (``kind: str = field(default=name, init=False)``) and validates
    its parameters in ``__post_init__`` (:class:`MLPSpec`).

    Attributes:
        kind: the registered projector kind (see :func:`list_projectors`).
    """

    kind: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"projector kind must be a non-empty string, got {self.kind!r}")

    @property
    def name(self) -> str:
        """The name LLaVA-style configs use (``mm_projector_type``): the kind itself, except
        for :class:`MLPSpec` (``"mlp2x_gelu"``)."""
        return self.kind

    def parameters(self) -> dict[str, Any]:
        """The spec's own parameters (every field but ``kind``), as the builder receives them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kind"}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``kind`` and the parameters (tuples become lists, as JSON reads
        them back, so ``to_dict`` equals the dict a saved config loads)."""
        return {"kind": self.kind, **{k: json_ready(v) for k, v in self.parameters().items()}}

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The parameters a spec of this class takes (``kind`` excluded)."""
        return parameter_names(cls)


#: The activations an :class:`MLPSpec` may put between its Linears (``gelu`` is exact-erf, as
#: LLaVA's ``nn.GELU()``).
MLP_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
_LLAVA_MLP_NAME = re.compile(r"^mlp(\d+)x_([a-z]+)$")


@dataclass(frozen=True, kw_only=True)
class MLPSpec(ProjectorSpec):
    """``kind="mlp"``: ``depth`` Linears with ``activation`` between them (LLaVA's ``mlpNx_gelu``).

    ``nn.Sequential(Linear(in, out), GELU(), Linear(out, out), ...)``: Linears at indices
    0, 2, 4, ..., as LLaVA's ``mm_projector``.

    Attributes:
        depth: the number of Linears (LLaVA-1.5: 2).
        activation: one of :data:`MLP_ACTIVATIONS` (LLaVA: ``"gelu"``).

    Examples:
        >>> MLPSpec(depth=2).name
        'mlp2x_gelu'
        >>> parse_projector("mlp3x_gelu")
        MLPSpec(kind='mlp', depth=3, activation='gelu')
    """

    kind: str = field(default="mlp", init=False)
    depth: int = 2
    activation: str = "gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.depth, "depth")
        check_choice(self.activation, "activation", tuple(MLP_ACTIVATIONS))

    @property
    def name(self) -> str:
        return f"mlp{self.depth}x_{self.activation}"


@dataclass(frozen=True)
class _ProjectorEntry:
    spec: type[ProjectorSpec]
    builder: ProjectorBuilder


_PROJECTORS: Registry[_ProjectorEntry] = Registry(
    "projector",
    describe=lambda entry: (
        f"spec {entry.spec.__name__}, builder {describe_callable(entry.builder)}"
    ),
)


class GridProjector(nn.Module):
    """Base of the projectors that work on the token grid rather than token by token.

    ``forward(tokens, grid)``: ``[B, h*w, in_dim]`` in raster order on the ``(h, w)`` grid ->
    ``[B, num_tokens(grid), out_dim]``, whose tokens form ``output_grid(grid)`` in raster order.
    Subclasses implement ``output_grid`` and ``forward``; ``num_tokens`` defaults to
    the output grid's area. The input is always a whole grid: a fusion whose tokens do not all
    form one (STI) cannot feed a grid projector.
    """

    #: ``True`` for projectors that read their input as a set of tokens (learned queries
    #: attending to them: Perceiver, Q-Former) rather than as a grid: they also take tokens that
    #: follow the grid and form none (STI's pooled tokens), receiving ``[B, h*w + extra, in_dim]``.
    accepts_extra_tokens: ClassVar[bool] = False

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The ``(height, width)`` grid produced for an input grid."""
        raise NotImplementedError(f"{type(self).__name__} must implement output_grid(grid)")

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """The output token count for an input grid: the output grid's area."""
        height, width = self.output_grid(grid)
        return height * width

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward(tokens, grid)")


def register_projector(
    name: str, builder: ProjectorBuilder, *, spec: type[ProjectorSpec] = ProjectorSpec
) -> None:
    """Register a projector kind: ``builder(in_dim, out_dim, **parameters) -> nn.Module``.

    The module is either applied token by token (``[B, N, in_dim] -> [B, N, out_dim]``) or is a
    :class:`GridProjector` that declares the token count and grid it produces.

    Args:
        name: the kind, as specs and config files spell it.
        builder: called with the widths and the spec's :meth:`ProjectorSpec.parameters`.
        spec: the spec class holding the projector's parameters, a :class:`ProjectorSpec`
            subclass fixing ``kind`` to ``name``; the default, :class:`ProjectorSpec` itself, is
            for projectors without parameters (``ProjectorSpec(kind=name)``, or just ``name``).

    Raises:
        ValueError: ``name`` is already registered (registries never silently replace), spells
            a LLaVA MLP name (``mlp2x_gelu`` means ``MLPSpec(depth=2)``), or ``spec`` fixes
            another kind.
        TypeError: ``builder`` is not callable or ``spec`` no :class:`ProjectorSpec` subclass.
    """
    _PROJECTORS.check_available(name)
    if _LLAVA_MLP_NAME.match(name):
        raise ValueError(
            f"projector name {name!r} spells an MLP (it parses as MLPSpec); pick another name"
        )
    if not callable(builder):
        raise TypeError(f"projector builder must be callable, got {type(builder).__name__}")
    if not (isinstance(spec, type) and issubclass(spec, ProjectorSpec)):
        raise TypeError(f"spec must be a ProjectorSpec subclass, got {spec!r}")
    fixed = fixed_kind(spec)
    if fixed is not None and fixed != name:
        raise ValueError(
            f"spec {spec.__name__} fixes kind={fixed!r}, so it cannot be registered as {name!r}"
        )
    _PROJECTORS.register(name, _ProjectorEntry(spec, builder))


def list_projectors() -> list[str]:
    """The registered projector kinds, sorted (LLaVA's ``mlpNx_gelu`` names are the ``mlp``
    kind)."""
    return sorted(_PROJECTORS)


def _entry(kind: Any) -> _ProjectorEntry:
    if kind not in _PROJECTORS:
        raise ValueError(
            f"unknown projector {kind!r}; known projectors: {', '.join(list_projectors())} or a "
            "LLaVA MLP name such as 'mlp2x_gelu' (register one with mmconnect.register_projector)"
        )
    return _PROJECTORS[kind]


def check_projector_spec(spec: Any) -> ProjectorSpec:
    """``spec`` if it is a spec of a registered projector, of the class registered for its kind.

    Raises:
        TypeError: ``spec`` is no :class:`ProjectorSpec` or of another class than its kind's.
        ValueError: unknown kind.
    """
    if not isinstance(spec, ProjectorSpec):
        raise TypeError(
            "projector must be a ProjectorSpec or a projector name such as 'mlp2x_gelu', got "
            f"{spec!r} ({type(spec).__name__})"
        )
    expected = _entry(spec.kind).spec
    if not isinstance(spec, expected):
        raise TypeError(
            f"projector kind {spec.kind!r} takes a {expected.__name__}, got a {type(spec).__name__}"
        )
    return spec


def parse_projector(value: ProjectorSpec | str | Mapping[str, Any]) -> ProjectorSpec:
    """A projector spec from a spec, a name or a :meth:`ProjectorSpec.to_dict` mapping.

    Names: LLaVA's ``"mlpNx_<activation>"`` (``"mlp2x_gelu"`` -> ``MLPSpec(depth=2)``) or a
    registered kind whose parameters all have defaults (``"linear"``, ``"identity"``, ``"mlp"``).

    Raises:
        ValueError: unknown kind or keys (the message lists the kind's parameters), a name whose
            kind has required parameters, or a bad parameter value.
        TypeError: a parameter of the wrong type, or a value of none of these types.
    """
    if isinstance(value, ProjectorSpec):
        return check_projector_spec(value)
    if isinstance(value, str):
        match = _LLAVA_MLP_NAME.match(value)
        if match and "mlp" in _PROJECTORS:
            return MLPSpec(depth=int(match.group(1)), activation=match.group(2))
        return construct_spec(_entry(value).spec, value, {}, what="projector")
    if isinstance(value, Mapping):
        return spec_from_mapping(value, lambda kind: _entry(kind).spec, what="projector")
    return check_projector_spec(value)


def build_projector(
    spec: ProjectorSpec | str | Mapping[str, Any], in_dim: int, out_dim: int
) -> nn.Module:
    """Build the projector ``spec`` describes: ``[B, N, in_dim] -> [B, N', out_dim]``.

    ``N' = N`` for token-wise projectors; a :class:`GridProjector` declares ``N'``.

    Raises:
        ValueError: unknown kind (the message lists the known ones) or bad widths.
    """
    spec = parse_projector(spec)
    for argument, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        check_positive_int(value, argument)
    return _entry(spec.kind).builder(in_dim, out_dim, **spec.parameters())


def _identity(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ValueError(
            f"the identity projector needs in_dim == out_dim, got in_dim={in_dim}, out_dim={out_dim}"
        )
    return nn.Identity()


def _mlp(in_dim: int, out_dim: int, *, depth: int, activation: str) -> nn.Sequential:
    modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        modules += [MLP_ACTIVATIONS[activation](), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*modules)


register_projector("identity", _identity)
register_projector("linear", nn.Linear)
register_projector("mlp", _mlp, spec=MLPSpec)


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
        ValueError: keys or shapes do not match the projector (the message lists every missing
            and unexpected key and every shape that differs, as
            :func:`mmconnect.checkpoint.shape_problems` writes them).
    """
    state = read_state_dict(source) if isinstance(source, str | Path) else source
    weights = projector_state_from_checkpoint(state)
    problems = shape_problems(
        {key: value.shape for key, value in weights.items()},
        {key: value.shape for key, value in projector.state_dict().items()},
        where="in the file",
    )
    if problems:
        raise ValueError(
            f"projector weights do not fit {type(projector).__name__}: " + "; ".join(problems)
        )
    projector.load_state_dict(weights)
