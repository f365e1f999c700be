"""Paired tests across seeds: is a connector's accuracy different from the baseline's?

In the lab (:mod:`mmconnect.integrations.applications.lab`) a seed fixes the LLM's initial weights
and the data order for every connector, so the runs of one seed are a pair: the per-seed
difference ``other - reference`` removes what the seed does to both. Two tests of "the mean
difference is zero", both two-sided:

* the **paired t-test**: ``t = mean(d) / (std(d) / sqrt(n))`` (sample std, ``n - 1``), with
  ``n - 1`` degrees of freedom; the p-value from Student's t distribution, computed here through
  the regularized incomplete beta function (no scipy needed);
* the **exact sign-flip permutation test**: under the null hypothesis each difference is as
  likely to have the opposite sign, so the p-value is the share of the ``2**n`` sign patterns
  whose ``|sum|`` is at least the observed ``|sum(d)|`` (the observed one included). It assumes
  no normality, but with ``n`` seeds it cannot go below ``2 / 2**n``: 0.0625 for 5 seeds, so on
  its own it can never reach 5 % there.

:func:`holm_adjust` corrects a family of p-values for multiple comparisons (Holm's step-down
method, which controls the family-wise error rate).

Example:
    >>> result = paired_comparison([0.40, 0.42, 0.39, 0.41, 0.40], [0.45, 0.47, 0.41, 0.46, 0.44])
    >>> round(result.mean_difference, 3), round(result.t_p_value, 4), result.sign_flip_p_value
    (0.042, 0.002, 0.0625)
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Largest number of pairs the exact sign-flip test enumerates (2**20 sign patterns).
MAX_SIGN_FLIP_PAIRS = 20
#: Relative tolerance when comparing a permuted ``|sum|`` with the observed one: sums of the same
#: floats in another order differ in the last bits, and such a tie must count as "as extreme".
_TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PairedComparison:
    """The paired comparison of one quantity (e.g. colour accuracy) of two connectors.

    Attributes:
        differences: ``other - reference`` per pair (seed), in the order given.
        mean_difference: their mean.
        std_difference: their sample standard deviation (``n - 1``; ``None`` for one pair).
        t_statistic: ``mean / (std / sqrt(n))``; ``0.0`` when every difference is zero,
            ``+-inf`` when they are all equal and non-zero; ``None`` for one pair.
        t_p_value: two-sided p-value of the paired t-test with ``n - 1`` degrees of freedom
            (``None`` for one pair).
        sign_flip_p_value: two-sided p-value of the exact sign-flip permutation test.
    """

    differences: tuple[float, ...]
    mean_difference: float
    std_difference: float | None
    t_statistic: float | None
    t_p_value: float | None
    sign_flip_p_value: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``inf`` stays a float: ``json`` writes ``Infinity``)."""
        values = asdict(self)
        values["differences"] = list(self.differences)
        return values


def _check_values(values: Any, argument: str) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{argument} must be a sequence of numbers, got {values!r}")
    checked = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{argument}[{index}] must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{argument}[{index}] must be finite, got {value!r}")
        checked.append(float(value))
    return checked


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function, for ``0 <= x <= 1``, ``a, b > 0``.

    Evaluated with its continued fraction (modified Lentz's method), on the side of ``x`` where
    it converges fast, ``I_x(a, b) = 1 - I_{1-x}(b, a)`` on the other; accurate to about 1e-14.

    Raises:
        ValueError: ``x`` outside ``[0, 1]`` or ``a``, ``b`` not positive.
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x!r}")
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got a={a!r}, b={b!r}")
    if x in (0.0, 1.0):
        return x
    # The continued fraction converges quickly for x < (a + 1) / (a + b + 2).
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        # Even step d_{2m}, then odd step d_{2m+1} of the continued fraction.
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_p_value(t: float, df: float) -> float:
    """Two-sided p-value ``P(|T| >= |t|)`` of Student's t distribution with ``df`` degrees of
    freedom: ``I_{df / (df + t^2)}(df / 2, 1 / 2)``.

    Raises:
        ValueError: ``df`` not positive or ``t`` NaN.
    """
    if not df > 0:
        raise ValueError(f"df must be positive, got {df!r}")
    if math.isnan(t):
        raise ValueError("t must be a number, got nan")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)


def sign_flip_p_value(differences: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of ``mean(differences) == 0``.

    The share of the ``2**n`` ways to flip signs whose ``|sum|`` reaches the observed
    ``|sum(differences)|`` (ties within a relative 1e-9 count). All-zero differences give 1.

    Raises:
        TypeError: not a sequence of numbers.
        ValueError: empty, non-finite, or more than :data:`MAX_SIGN_FLIP_PAIRS` values.
    """
    values = _check_values(differences, "differences")
    if not values:
        raise ValueError("differences must hold at least one value, got none")
    if len(values) > MAX_SIGN_FLIP_PAIRS:
        raise ValueError(
            f"differences: the exact test enumerates 2**n sign patterns, n must be <= "
            f"{MAX_SIGN_FLIP_PAIRS}, got {len(values)}"
        )
    observed = abs(math.fsum(values))
    threshold = observed - _TIE_TOLERANCE * max(observed, max(abs(v) for v in values), 1e-300)
    extreme = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(values)):
        if abs(math.fsum(s * v for s, v in zip(signs, values, strict=True))) >= threshold:
            extreme += 1
    return extreme / 2 ** len(values)


def paired_comparison(reference: Sequence[float], other: Sequence[float]) -> PairedComparison:
    """Paired t-test and exact sign-flip test of ``other - reference`` (one pair per seed).

    Args:
        reference: per-seed values of the reference (the baseline), in seed order.
        other: per-seed values of the connector compared, in the same seed order.

    Raises:
        TypeError: not sequences of numbers.
        ValueError: different lengths, no pairs, non-finite values, or more pairs than the exact
            test enumerates (:data:`MAX_SIGN_FLIP_PAIRS`).
    """
    first = _check_values(reference, "reference")
    second = _check_values(other, "other")
    if len(first) != len(second):
        raise ValueError(
            f"reference and other must pair up (one value per seed each), got {len(first)} and "
            f"{len(second)} values"
        )
    differences = tuple(b - a for a, b in zip(first, second, strict=True))
    flip = sign_flip_p_value(differences)
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedComparison(differences, mean, None, None, None, flip)
    std = statistics.stdev(differences)
    if std == 0.0:  # every pair differs by the same amount
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(len(differences)))
    return PairedComparison(
        differences, mean, std, t, student_t_p_value(t, len(differences) - 1), flip
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in the order given.

    Sorted ascending, the ``k``-th smallest (from 0) becomes ``max over j <= k of
    min(1, (m - j) * p_(j))``; a hypothesis is rejected at level ``alpha`` when its adjusted value
    is ``<= alpha``, which keeps the chance of any false rejection in the family below
    ``alpha``.

    Raises:
        TypeError: not a sequence of numbers.
        ValueError: a value outside ``[0, 1]``.
    """
    values = _check_values(p_values, "p_values")
    for index, value in enumerate(values):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"p_values[{index}] must lie in [0, 1], got {value!r}")
    count = len(values)
    adjusted = [0.0] * count
    running = 0.0
    for rank, index in enumerate(sorted(range(count), key=values.__getitem__)):
        running = max(running, min(1.0, (count - rank) * values[index]))
        adjusted[index] = running
    return adjusted
