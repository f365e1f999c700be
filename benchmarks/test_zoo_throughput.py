"""Every zoo connector at its family's real size vs its bare weight GEMMs and vs LLaVA's MLP.

The presets measured are found from the registries, not listed: every registered preset whose
projector (or DeepStack injection projector) has a spec class defined in :mod:`mmconnect.zoo`
(the built-in ``identity`` / ``linear`` / ``mlp`` kinds are the Dense Connector paper's own and
measured by ``test_connector_throughput.py``). Each runs at the size of the encoder it is made for
(:func:`mmconnect.preset_geometry`: the tower's width and token grid), projecting to the preset's
LLM width, with the harness's batch (4 at real size), on random features shaped like the tap's
output (the final layer plus the extra layers or streamed group means its fusion reads). Three
implementations per preset:

* ``connector``: the :class:`mmconnect.DenseConnector` forward (fusion, then the zoo projector;
  with a DeepStack injection, :meth:`~mmconnect.DenseConnector.forward_with_injections`);
* ``bare-matmuls``: exactly the GEMMs against the connector's weights that one forward runs --
  every ``F.linear`` of its ``nn.Linear`` layers, every convolution, every matmul with a weight
  parameter (Gemma 3's ``tokens @ projection``) -- recorded once (function, operand shapes,
  weight) on a copy of the connector on the meta device, then replayed without biases on
  preallocated random inputs. That is the floor of the connector's arithmetic; what the
  connector adds beyond it is the fusion, attention score matmuls and softmax (Q-Former,
  Perceiver), norms, activations, pooling and the token regrouping (pixel shuffle, merges);
* ``llava-mlp``: LLaVA's ``mlp2x_gelu`` on the same fusion of the same features (the same fused
  width and input tokens), to the same LLM width: what the zoo connector replaces.

Recorded per implementation: visual tokens per image it produces (``bare-matmuls``: the
connector's), parameters (the weights its GEMMs read, for ``bare-matmuls``), GFLOP
(``torch.utils.flop_counter`` on the meta device: every matrix multiply and convolution of the
forward, attention included; for ``bare-matmuls`` those of the replayed GEMMs) and throughput in
visual tokens per second (``visual_tokens`` / median). No ratio target is asserted: the zoo's
connectors do different work by design.

At ``MMCONNECT_BENCH_SIZE=tiny`` everything shrinks but the token counts: vision width 32, LLM
width 64, batch 2, and the zoo spec's width parameters (:data:`TINY_WIDTHS`) replaced with small
values; the grid stays the geometry's, so every connector makes its real token count (checked).
At real size on the CPU a preset whose connector or MLP forward exceeds :data:`CPU_GFLOP_LIMIT`
is skipped with its GFLOP named (e.g. the Perceiver resamplers: one call takes tens of seconds on
two cores); a GPU run measures it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import (
    DEVICE,
    DTYPE,
    ROUNDS,
    SIZE,
    WARMUP_ROUNDS,
    record,
    synchronized,
    tower_size_for,
)
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

import mmconnect.zoo
from mmconnect import ConnectorConfig, DenseConnector, LayerFeatures
from mmconnect.presets import list_presets, preset_fields, preset_geometry
from mmconnect.projectors import MLPSpec, ProjectorSpec

GROUP = "zoo"
IMPLEMENTATIONS = ("connector", "bare-matmuls", "llava-mlp")
#: Width parameters of zoo projector specs and their values at tiny size. Token counts do not
#: depend on them (query / latent counts, merge factors and grids are kept).
TINY_WIDTHS = {
    "hidden_size": 32,
    "hidden_dim": 32,
    "intermediate_size": 64,
    "head_dim": 8,
    "num_heads": 2,
    "heads": 2,
    "kv_heads": 1,
}
#: At real size on the CPU, presets whose connector or LLaVA-MLP forward needs more GFLOP than
#: this are skipped (about 15 s per call on two shared cores; four calls per implementation);
#: ``MMCONNECT_BENCH_CPU_GFLOP_LIMIT`` raises it for a run that has the time.
CPU_GFLOP_LIMIT = float(os.environ.get("MMCONNECT_BENCH_CPU_GFLOP_LIMIT", "600"))
#: Functions that multiply by a weight; the bias argument (index, keyword) of those that add one.
_GEMMS: dict[Callable[..., Any], tuple[int, str] | None] = {
    F.linear: (2, "bias"),
    F.conv1d: (2, "bias"),
    F.conv2d: (2, "bias"),
    F.conv3d: (2, "bias"),
    torch.matmul: None,
    torch.Tensor.matmul: None,
    torch.Tensor.__matmul__: None,
    torch.mm: None,
    torch.Tensor.mm: None,
    torch.bmm: None,
    torch.Tensor.bmm: None,
    torch.einsum: None,
}


def _is_zoo_spec(spec: ProjectorSpec) -> bool:
    return type(spec).__module__.startswith(f"{mmconnect.zoo.__name__}.")


def _is_zoo_preset(name: str) -> bool:
    config = ConnectorConfig(**preset_fields(name))
    specs = [config.projector] + ([config.injection.projector] if config.injection else [])
    return any(_is_zoo_spec(spec) for spec in specs)


#: Every registered preset with a zoo projector, sorted.
ZOO_PRESETS = tuple(name for name in list_presets() if _is_zoo_preset(name))


def _tiny_spec(spec: ProjectorSpec) -> ProjectorSpec:
    """``spec`` with its :data:`TINY_WIDTHS` parameters (those it has, set to an int) shrunk."""
    fields = {field.name for field in dataclasses.fields(spec) if field.init}
    changes = {
        name: value
        for name, value in TINY_WIDTHS.items()
        if name in fields and type(getattr(spec, name)) is int
    }
    return dataclasses.replace(spec, **changes)


def zoo_config(preset: str) -> ConnectorConfig:
    """The benchmarked config of ``preset``: the preset itself at real size; at tiny size the
    tiny tower's width, LLM width 64 and the spec widths of :data:`TINY_WIDTHS`.

    Raises:
        AssertionError: the tiny config's token count differs from the preset's.
    """
    config = ConnectorConfig.from_preset(preset)
    if SIZE == "real":
        return config
    size = tower_size_for(preset)
    injection = config.injection
    if injection is not None:
        injection = dataclasses.replace(injection, projector=_tiny_spec(injection.projector))
    tiny = dataclasses.replace(
        config,
        vision_dim=size.width,
        llm_dim=size.llm_dim,
        projector=_tiny_spec(config.projector),
        injection=injection,
    )
    grid = preset_geometry(preset).grid
    assert tiny.num_tokens(grid) == config.num_tokens(grid), (preset, tiny.projector)
    return tiny


def _features(
    connector: DenseConnector, grid: tuple[int, int], batch: int, *, meta: bool = False
) -> LayerFeatures:
    """Features shaped like a streaming tap's output: ``[batch, h*w, vision_dim]`` per layer read
    one by one and per DCI group mean (random, seed 0, on the benchmark device and dtype; or
    shapes only on the meta device)."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, grid[0] * grid[1], connector.config.vision_dim)

    def one() -> torch.Tensor:
        if meta:
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator).to(DEVICE, DTYPE)

    layers = {layer: one() for layer in connector.individual_layers}
    means = {group: one() for group in connector.groups}
    return LayerFeatures(layers, grids=dict.fromkeys(layers, grid), group_means=means)


def _forward(connector: DenseConnector, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The connector's work on ``features``: its tokens (and DeepStack residuals, if any)."""
    if connector.injection is not None:
        return connector.forward_with_injections(features)[0]
    return connector(features)


@dataclasses.dataclass(frozen=True)
class _Weight:
    """A recorded GEMM operand that is the connector's parameter ``name``."""

    name: str


@dataclasses.dataclass(frozen=True)
class _Input:
    """A recorded GEMM operand computed in the forward: only its shape is kept."""

    shape: tuple[int, ...]


class _WeightGemms(TorchFunctionMode):
    """Records every GEMM call (see ``_GEMMS``) with an operand among ``parameters``: the function,
    its arguments with each tensor replaced by a :class:`_Weight` or an :class:`_Input`."""

    def __init__(self, parameters: dict[int, str]) -> None:
        super().__init__()
        self.parameters = parameters
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def _describe(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) in self.parameters:
                return _Weight(self.parameters[id(value)])
            return _Input(tuple(value.shape))
        if isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self._describe(v) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = [*args, *kwargs.values()]
        if func in _GEMMS and any(
            isinstance(value, torch.Tensor) and id(value) in self.parameters for value in operands
        ):
            described = tuple(self._describe(value) for value in args)
            self.calls.append(
                (func, described, {key: self._describe(v) for key, v in kwargs.items()})
            )
        return func(*args, **kwargs)


def _gflop_of(function: Callable[[], Any]) -> float:
    """GFLOP of ``function``'s matrix multiplies and convolutions (attention included)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        function()
    return counter.get_total_flops() / 1e9


def _gflop(connector: DenseConnector, features: Mapping[int, torch.Tensor]) -> float:
    return _gflop_of(lambda: _forward(connector, features))


def _on_meta(config: ConnectorConfig, grid: tuple[int, int], batch: int):
    """One forward of ``config``'s connector on the meta device (no arithmetic): the weight GEMMs
    it runs (see :class:`_WeightGemms`), the GFLOP of the whole forward and of those GEMMs."""
    with torch.device("meta"):
        connector = DenseConnector(config).eval().requires_grad_(False)
    features = _features(connector, grid, batch, meta=True)
    names = {id(parameter): name for name, parameter in connector.named_parameters()}
    recorder = _WeightGemms(names)
    with recorder, torch.no_grad():
        _forward(connector, features)
    gemms = _replay(recorder.calls, connector, lambda shape: torch.empty(shape, device="meta"))[0]
    return recorder.calls, _gflop(connector, features), _gflop_of(gemms)


def _replay(
    calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]],
    connector: DenseConnector,
    make_input: Callable[[tuple[int, ...]], torch.Tensor],
) -> tuple[Callable[[], None], int]:
    """A function running exactly ``calls``'s GEMMs with ``connector``'s weights on inputs made
    now by ``make_input(shape)`` and no bias, and the parameter count of the weights they read."""
    weights = dict(connector.named_parameters())
    used: dict[str, int] = {}

    def build(value: Any) -> Any:
        if isinstance(value, _Weight):
            used[value.name] = weights[value.name].numel()
            return weights[value.name]
        if isinstance(value, _Input):
            return make_input(value.shape)
        if isinstance(value, list | tuple):
            return type(value)(build(v) for v in value)
        return value

    prepared = []
    for func, args, kwargs in calls:
        args, kwargs = list(args), dict(kwargs)
        bias = _GEMMS[func]
        if bias is not None:  # the floor is the multiply: no bias
            index, keyword = bias
            if len(args) > index:
                args[index] = None
            if keyword in kwargs:
                kwargs[keyword] = None
        args, kwargs = [build(value) for value in args], {k: build(v) for k, v in kwargs.items()}
        prepared.append((func, tuple(args), kwargs))

    def run() -> None:
        for func, args, kwargs in prepared:
            func(*args, **kwargs)

    return run, sum(used.values())


def _parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("preset", ZOO_PRESETS)
def test_zoo_connector(benchmark, preset, implementation, measurements):
    geometry = preset_geometry(preset)
    grid, batch = geometry.grid, tower_size_for(preset).batch
    config = zoo_config(preset)
    mlp_config = dataclasses.replace(config, projector=MLPSpec(depth=2), injection=None)
    calls, connector_gflop, gemm_gflop = _on_meta(config, grid, batch)
    mlp_gflop = _on_meta(mlp_config, grid, batch)[1]
    if SIZE == "real" and DEVICE == "cpu" and max(connector_gflop, mlp_gflop) > CPU_GFLOP_LIMIT:
        pytest.skip(
            f"{preset}: {connector_gflop:,.0f} GFLOP per connector call, {mlp_gflop:,.0f} per "
            f"LLaVA-MLP call, above the CPU limit of {CPU_GFLOP_LIMIT:,.0f} (run it on a GPU)"
        )
    assert calls, f"{preset}: its forward runs no GEMM with a weight, nothing to compare with"
    torch.manual_seed(0)
    is_mlp = implementation == "llava-mlp"
    connector = DenseConnector(mlp_config if is_mlp else config).eval().to(DEVICE, DTYPE)
    tokens = connector.num_tokens(grid)
    gflop = {"connector": connector_gflop, "bare-matmuls": gemm_gflop, "llava-mlp": mlp_gflop}
    with torch.no_grad():
        if implementation == "bare-matmuls":
            generator = torch.Generator().manual_seed(1)
            run, parameters = _replay(
                calls,
                connector,
                lambda shape: torch.randn(shape, generator=generator).to(DEVICE, DTYPE),
            )
        else:
            features = _features(connector, grid, batch)
            parameters = _parameters(connector)

            def run() -> torch.Tensor:
                return _forward(connector, features)

        result = benchmark.pedantic(
            synchronized(run), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS
        )
    if implementation != "bare-matmuls":
        assert tuple(result.shape) == (batch, tokens, config.llm_dim), (preset, result.shape)
    record(
        benchmark,
        measurements,
        f"{GROUP}:{preset}",
        implementation,
        visual_tokens=tokens * batch,
        tokens_per_image=tokens,
        batch=batch,
        parameters=parameters,
        gflop=gflop[implementation],
        **({} if is_mlp else {"gemm_calls": len(calls)}),
        projector=config.projector.kind,
        fusion=config.fusion.kind,
        encoder=f"{grid[0]}x{grid[1]} patches, width {config.vision_dim}",
        llm_dim=config.llm_dim,
    )
