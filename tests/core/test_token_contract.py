"""The token contract (issue 13): the count a connector declares is the count ``forward`` returns.

Every fusion, resampler and projector declares ``num_tokens(grid)`` / ``output_grid(grid)`` for
the grid it receives; ``DenseConnector.num_tokens`` / ``token_grid`` compose them in forward
order. The property test runs over *everything registered* (the built-ins plus a token-reducing
projector and a grid-changing fusion registered here), on square and non-square grids.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
import torch
from einops import rearrange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

import mmconnect
from mmconnect import (
    ConnectorConfig,
    DCISpec,
    DenseConnector,
    Fusion,
    FusionSpec,
    ResampleSpec,
    SCISpec,
    SingleLayerSpec,
    STISpec,
    list_fusions,
    list_projectors,
    list_resamplers,
    pool_tokens,
    register_fusion,
    register_projector,
)
from mmconnect import fusion as fusion_module
from mmconnect import projectors as projectors_module
from mmconnect.fusion import require_layer
from mmconnect.projectors import GridProjector
from tests.support.zoo_specs import PROJECTOR_SPECS

EXACT = {"atol": 0.0, "rtol": 0.0}
NUM_LAYERS = 4


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- toy components


class SpaceToDepth(GridProjector):
    """2x2 space-to-depth then a Linear: ``[B, h*w, C] -> [B, (h/2)*(w/2), D]`` (grid / 4)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4 * in_dim, out_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        if grid[0] % 2 or grid[1] % 2:
            raise ValueError(f"space_to_depth needs an even grid, got {grid[0]}x{grid[1]}")
        return grid[0] // 2, grid[1] // 2

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        height, width = self.output_grid(grid)
        folded = rearrange(tokens, "b (h p w q) c -> b (h w) (p q c)", h=height, p=2, w=width, q=2)
        return self.linear(folded)


class TransposedFinal(Fusion):
    """The final layer's ``(h, w)`` grid transposed to ``(w, h)``: changes a non-square grid."""

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[1], grid[0]

    def forward(self, features: Mapping[int, Tensor], grid: tuple[int, int]) -> Tensor:
        final = require_layer(features, self.final_layer)
        return rearrange(final, "b (h w) c -> b (w h) c", h=grid[0], w=grid[1])


def _build_transposed(spec: FusionSpec) -> Fusion:
    return TransposedFinal(spec.final_layer)  # no parameters: FusionSpec(kind="transposed")


def _register_toys() -> None:
    register_projector("space_to_depth", SpaceToDepth)
    register_fusion("transposed", _build_transposed)


@pytest.fixture(scope="module")
def toys():
    """The registries with the toys added, restored afterwards (no test leaks them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(projectors_module, "_PROJECTORS", projectors_module._PROJECTORS.copy())
        patch.setattr(fusion_module, "_FUSIONS", fusion_module._FUSIONS.copy())
        _register_toys()
        yield


# The spec of each registered fusion on a 4-block encoder, final layer -1, given the STI window
# and pooling. A fusion registered without an entry here fails
# test_every_registered_fusion_is_covered, so the property covers it.
FUSION_SPECS = {
    "none": lambda window, pool: SingleLayerSpec(final_layer=-1),
    "sti": lambda window, pool: STISpec(
        final_layer=-1, extra_layers=(1, 2), window=window, pool=pool
    ),
    "sci": lambda window, pool: SCISpec(final_layer=-1, extra_layers=(1, 2)),
    "dci": lambda window, pool: DCISpec(final_layer=-1, groups=((0, 1), (2, 3))),
    "transposed": lambda window, pool: FusionSpec(kind="transposed", final_layer=-1),
}


def test_every_registered_fusion_is_covered(toys):
    assert set(list_fusions()) == set(FUSION_SPECS)


def test_every_registered_projector_is_covered(toys):
    # the toy space_to_depth is registered by this module's fixture
    assert sorted({**PROJECTOR_SPECS, "space_to_depth": None}) == sorted(list_projectors())


def _config(
    fusion: str,
    projector: str,
    vision_dim: int,
    resample: tuple[tuple[int, int], str, str] | None,
    sti: tuple[int, str],
) -> ConnectorConfig:
    spec = FUSION_SPECS[fusion](*sti)
    if resample is not None:
        target, mode, placement = resample
        resample = ResampleSpec(grid=target, mode=mode, placement=placement)
    probe = ConnectorConfig(
        vision_dim=vision_dim, llm_dim=3, num_layers=NUM_LAYERS, fusion=spec, resample=resample
    )
    # The identity projector keeps the fused width: give it an LLM of that width.
    fused = fusion_module.build_fusion(spec, NUM_LAYERS).output_channels(vision_dim)
    llm_dim = fused if projector == "identity" else 3
    spec = projector if projector == "space_to_depth" else PROJECTOR_SPECS[projector]
    return probe.replace(projector=spec, llm_dim=llm_dim)


@st.composite
def _settings(draw):
    fusion = draw(st.sampled_from(list_fusions()))
    projector = draw(st.sampled_from(list_projectors()))
    resample = None
    resamplable = type(FUSION_SPECS[fusion](1, "raster")).resamplable
    if resamplable and draw(st.booleans()):  # the config refuses to resample STI
        target = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        mode = draw(st.sampled_from(list_resamplers()))
        placement = draw(st.sampled_from(["before_projector", "after_projector"]))
        resample = (target, mode, placement)
    sti = (draw(st.integers(1, 3)), draw(st.sampled_from(["raster", "grid"])))
    grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return fusion, projector, draw(st.integers(1, 3)), resample, sti, grid


def _check_contract(config: ConnectorConfig, grid: tuple[int, int], seed: int) -> None:
    """``forward`` returns what ``num_tokens`` / ``token_grid`` declare, or both refuse alike."""
    torch.manual_seed(seed)
    connector = DenseConnector(config)
    features = {
        layer: _randn(seed + layer, 2, grid[0] * grid[1], config.vision_dim)
        for layer in range(NUM_LAYERS + 1)
    }
    try:
        declared = connector.num_tokens(grid)
    except ValueError as refusal:
        # A grid some component cannot take (an odd grid into space-to-depth, an STI window
        # larger than the grid, STI's extra tokens into a grid projector) is refused by forward
        # with the same error before anything runs.
        with pytest.raises(ValueError, match=re.escape(str(refusal))):
            connector(features, grid)
        return
    output = connector(features, grid)
    assert output.shape == (2, declared, config.llm_dim)
    lead = connector.token_grid(grid)
    extra = connector.extra_tokens(grid)
    assert lead[0] * lead[1] + extra == declared
    projector = connector.projector
    if isinstance(projector, GridProjector) and projector.accepts_extra_tokens:
        assert lead == (0, 0) and extra == declared  # learned queries form no grid
    else:
        assert extra == (declared - grid[0] * grid[1] if config.fusion.kind == "sti" else 0)
    # The config-only helpers processors use answer the same.
    assert config.num_tokens(grid) == declared
    assert config.token_grid(grid) == lead


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(drawn=_settings(), seed=st.integers(0, 2**16))
def test_forward_returns_the_declared_count_and_grid(toys, drawn, seed):
    fusion, projector, vision_dim, resample, sti, grid = drawn
    _check_contract(_config(fusion, projector, vision_dim, resample, sti), grid, seed)


def test_every_registered_combination_keeps_the_contract(toys):
    """Exhaustively, beside the sampled property: every fusion x projector x resample setting
    (none, or each mode before / after the projector) on one square and one non-square grid."""
    resamples = [None] + [
        ((2, 3), mode, placement)
        for mode in list_resamplers()
        for placement in ("before_projector", "after_projector")
    ]
    checked = 0
    for fusion in list_fusions():
        for projector in list_projectors():
            for resample in resamples if fusion != "sti" else [None]:
                config = _config(fusion, projector, 2, resample, (2, "raster"))
                for grid in ((4, 4), (4, 6)):
                    _check_contract(config, grid, seed=checked)
                    checked += 1
    assert checked == 2 * len(list_projectors()) * (4 * len(resamples) + 1)


@settings(max_examples=40, deadline=None)
@given(grid=st.tuples(st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**16))
def test_leading_tokens_form_the_declared_grid(grid, seed):
    """With identity components the output is the final layer's tokens: the declared grid is the
    one they really form (a transposed grid would put other tokens first)."""
    config = ConnectorConfig(
        fusion="none", vision_dim=2, llm_dim=2, num_layers=NUM_LAYERS, projector="identity"
    )
    connector = DenseConnector(config)
    final = _randn(seed, 1, grid[0] * grid[1], 2)
    output = connector({NUM_LAYERS - 1: final}, grid)
    assert connector.token_grid(grid) == grid
    assert_close(output, final, **EXACT)


# ---------------------------------------------------------------------------- toys, exact


def test_toy_fusion_and_token_reducing_projector_exact(toys):
    config = ConnectorConfig(
        fusion=FusionSpec(kind="transposed", final_layer=-1),
        projector="space_to_depth",
        vision_dim=2,
        llm_dim=3,
        num_layers=NUM_LAYERS,
    )
    torch.manual_seed(0)
    connector = DenseConnector(config)
    # (4, 6) -> transposed (6, 4) -> space to depth (3, 2): 6 tokens, not the 24 it receives.
    assert connector.num_tokens((4, 6)) == 6
    assert connector.token_grid((4, 6)) == (3, 2)
    assert connector.extra_tokens((4, 6)) == 0
    final = torch.arange(48.0).reshape(1, 24, 2)
    output = connector({NUM_LAYERS: final}, (4, 6))
    assert output.shape == (1, 6, 3)
    # By hand: transposed token (r, c) is encoder token (c, r); output token (i, j) folds the
    # transposed 2x2 block at rows 2i..2i+1, columns 2j..2j+1 (row-major inside the block).
    encoder = final[0].reshape(4, 6, 2)
    transposed = encoder.transpose(0, 1)  # [6, 4, 2]
    folded = torch.stack(
        [
            torch.cat([transposed[2 * i + p, 2 * j + q] for p in (0, 1) for q in (0, 1)])
            for i in range(3)
            for j in range(2)
        ]
    )
    assert folded[0, :4].tolist() == [0.0, 1.0, 12.0, 13.0]  # encoder tokens 0 and 6 lead
    assert_close(output, connector.projector.linear(folded[None]), **EXACT)
    # Processors counting from the config see the same.
    assert config.num_tokens((4, 6)) == 6
    assert config.token_grid((4, 6)) == (3, 2)


def test_token_reducing_projector_with_resampling_composes_in_forward_order(toys):
    def connector(placement: str) -> DenseConnector:
        return DenseConnector(
            ConnectorConfig(
                fusion="none",
                projector="space_to_depth",
                vision_dim=2,
                llm_dim=3,
                num_layers=NUM_LAYERS,
                resample=ResampleSpec(grid=(4, 4), placement=placement),
            )
        )

    before, after = connector("before_projector"), connector("after_projector")
    # Resample 6x8 -> 4x4, then fold to 2x2; or fold 6x8 -> 3x4, then resample to 4x4.
    assert (before.num_tokens((6, 8)), before.token_grid((6, 8))) == (4, (2, 2))
    assert (after.num_tokens((6, 8)), after.token_grid((6, 8))) == (16, (4, 4))
    features = {NUM_LAYERS - 1: _randn(0, 1, 48, 2)}
    assert before(features, (6, 8)).shape == (1, 4, 3)
    assert after(features, (6, 8)).shape == (1, 16, 3)
    # An odd grid cannot be folded: refused, naming the projector's reason.
    with pytest.raises(ValueError, match="space_to_depth needs an even grid, got 5x8"):
        after.num_tokens((5, 8))


def test_sti_extra_tokens_into_a_grid_projector_are_refused(toys):
    config = ConnectorConfig(
        fusion=STISpec(extra_layers=(1,), window=2),
        projector="space_to_depth",
        vision_dim=2,
        llm_dim=3,
        num_layers=NUM_LAYERS,
    )
    connector = DenseConnector(config)
    message = (
        r"fusion 'sti' gives 8 tokens after its 4x4 grid that form no grid, but the projector "
        r"'space_to_depth' works on a whole token grid"
    )
    with pytest.raises(ValueError, match=message):
        connector.num_tokens((4, 4))
    features = {layer: _randn(layer, 1, 16, 2) for layer in (1, NUM_LAYERS - 1)}
    with pytest.raises(ValueError, match=message):
        connector(features, (4, 4))


class QueryMean(GridProjector):
    """A token-set toy: two learned queries plus the mean of every input token, projected;
    ``[B, n, C] -> [B, 2, D]`` whatever ``n`` is, so it also takes STI's pooled tokens."""

    accepts_extra_tokens = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.arange(2 * in_dim, dtype=torch.float32).view(2, in_dim))
        self.linear = nn.Linear(in_dim, out_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return 0, 0  # queries form no spatial grid

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return 2

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.linear(self.queries + tokens.mean(dim=1, keepdim=True))


def test_a_token_set_projector_takes_sti_extra_tokens(toys, monkeypatch):
    """Learned-query connectors read a set of tokens: STI's pooled tokens go in with the grid's,
    and the output forms no grid (token_grid (0, 0), every token an extra one)."""
    monkeypatch.setattr(projectors_module, "_PROJECTORS", projectors_module._PROJECTORS.copy())
    register_projector("query_mean", QueryMean)
    config = ConnectorConfig(
        fusion=STISpec(extra_layers=(1,), window=2),
        projector="query_mean",
        vision_dim=2,
        llm_dim=3,
        num_layers=NUM_LAYERS,
    )
    connector = DenseConnector(config)
    assert connector.num_tokens((4, 4)) == 2
    assert connector.token_grid((4, 4)) == (0, 0) and connector.extra_tokens((4, 4)) == 2
    assert config.num_tokens((4, 4)) == 2
    features = {layer: _randn(layer, 1, 16, 2) for layer in (1, NUM_LAYERS - 1)}
    output = connector(features, (4, 4))
    stacked = torch.cat([features[NUM_LAYERS - 1], pool_tokens(features[1], 2)], dim=1)
    assert stacked.shape[1] == 16 + 8
    expected = connector.projector.linear(
        connector.projector.queries + stacked.mean(1, keepdim=True)
    )
    assert torch.equal(output, expected)


class LyingProjector(GridProjector):
    """Declares a 1x1 grid but returns every token: the connector must notice."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return 1, 1

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.linear(tokens)


def test_a_component_that_breaks_its_declaration_is_named(toys, monkeypatch):
    monkeypatch.setattr(projectors_module, "_PROJECTORS", projectors_module._PROJECTORS.copy())
    register_projector("lying", LyingProjector)
    config = ConnectorConfig(
        fusion="none", projector="lying", vision_dim=2, llm_dim=3, num_layers=NUM_LAYERS
    )
    connector = DenseConnector(config)
    with pytest.raises(
        RuntimeError, match=r"the projector 'lying' returned 4 tokens but declares 1"
    ):
        connector({NUM_LAYERS - 1: _randn(0, 1, 4, 2)}, (2, 2))


@pytest.mark.parametrize(
    ("grid", "error"),
    [((0, 4), ValueError), ((4,), ValueError), ("24x24", TypeError), ((2.0, 2), TypeError)],
)
def test_num_tokens_refuses_a_bad_grid(grid, error):
    config = ConnectorConfig(fusion="none", vision_dim=2, llm_dim=3, num_layers=NUM_LAYERS)
    with pytest.raises(error, match=r"grid must be a \(height, width\) pair of positive ints"):
        DenseConnector(config).num_tokens(grid)


def test_builtin_components_declare_the_contract():
    """Fusions, the resampler and token-wise projectors: count and grid for a non-square grid."""
    fusion = fusion_module.TokenStack(3, (1, 2), window=2, mode="grid")
    assert (fusion.num_tokens((4, 6)), fusion.output_grid((4, 6))) == (24 + 2 * 6, (4, 6))
    resampler = mmconnect.TokenResampler((2, 3), "avg")
    assert (resampler.num_tokens((4, 6)), resampler.output_grid((4, 6))) == (6, (2, 3))
    # Token-wise projectors are no GridProjector: the connector passes every token through.
    assert not isinstance(projectors_module.build_projector("mlp2x_gelu", 2, 3), GridProjector)
