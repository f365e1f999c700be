"""Multi-level injection into the LLM (Qwen3-VL's DeepStack): the connector's second output.

A Dense Connector turns many vision layers into one token sequence. DeepStack, Qwen3-VL's
connector, keeps some layers apart instead: the tokens of each chosen vision layer go through
their own projector (Qwen3-VL: a patch merger with its norm after the 2x2 shuffle) and are *added*
to the LLM's hidden states at the image positions, level ``i`` after LLM layer ``i``::

    tokens      = projector(fuse(H))                      # [B, N, D], replaces <image> in the prompt
    residual_i  = projector_i(H[layers[i]])               # [B, N, D], i = 0 .. len(layers) - 1
    h_i         = LLMLayer_i(h_{i-1});  h_i[image] += residual_i

:class:`DeepStackSpec` describes it inside a :class:`mmconnect.ConnectorConfig` (``injection=``);
:meth:`mmconnect.connector.DenseConnector.forward_with_injections` returns the tokens and the residuals;
a model family adds the residuals to its LLM (see the families' docs). The token contract holds
for every level: each residual has exactly the connector's ``num_tokens(grid)`` tokens, checked
before anything runs, so the residuals line up with the image positions.

Layer indices follow the HF ``hidden_states`` convention like every index in mmconnect: Qwen3-VL's
``deepstack_visual_indexes = [8, 16, 24]`` count *blocks* from 0, so the same layers are
``layers=(9, 17, 25)`` here (``hidden_states[k]`` is the output of block ``k - 1``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmconnect.layers import normalize_layers
from mmconnect.projectors import MLPSpec, ProjectorSpec, parse_projector
from mmconnect.validation import check_sequence


@dataclass(frozen=True, kw_only=True)
class DeepStackSpec:
    """Which vision layers are injected into the LLM, and the projector each goes through.

    Attributes:
        layers: HF ``hidden_states`` indices of the vision tower (negatives count from the end);
            the residual of ``layers[i]`` is added after LLM layer ``i``.
        projector: the projector spec each level gets its own instance of (from the vision width
            to the LLM width); a name such as ``"mlp2x_gelu"`` is accepted.

    Examples:
        >>> DeepStackSpec(layers=[9, 17, 25]).to_dict()
        {'layers': [9, 17, 25], 'projector': {'kind': 'mlp', 'depth': 2, 'activation': 'gelu'}}
    """

    layers: tuple[int, ...]
    projector: ProjectorSpec = field(default_factory=MLPSpec)

    def __post_init__(self) -> None:
        layers = tuple(check_sequence(self.layers, "injection.layers", of="layer indices"))
        if not layers:
            raise ValueError("injection.layers must name at least one vision layer")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "projector", parse_projector(self.projector))

    def normalized(self, num_layers: int) -> DeepStackSpec:
        """The spec with non-negative, range-checked layer indices for a ``num_layers`` tower.

        Raises:
            ValueError: an index out of range, or a layer named twice.
        """
        layers = normalize_layers(self.layers, num_layers, argument="injection.layers")
        return dataclasses.replace(self, layers=tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {"layers": list(self.layers), "projector": self.projector.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeepStackSpec:
        """Read :meth:`to_dict` output.

        Raises:
            ValueError: unknown or missing keys.
            TypeError: ``data`` is not a mapping.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"an injection spec must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"layers", "projector"})
        if unknown:
            raise ValueError(
                f"unknown injection spec keys {unknown}; known keys: ['layers', 'projector']"
            )
        if "layers" not in data:
            raise ValueError("an injection spec needs 'layers'")
        layers = check_sequence(data["layers"], "injection.layers", of="layer indices")
        values: dict[str, Any] = {"layers": tuple(layers)}
        if "projector" in data:
            values["projector"] = parse_projector(data["projector"])
        return cls(**values)
