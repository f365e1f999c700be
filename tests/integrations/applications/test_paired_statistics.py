"""Paired tests across seeds: exact values on hand-made inputs."""

from __future__ import annotations

import math

import pytest

from mmconnect.integrations.applications.paired_statistics import (
    MAX_SIGN_FLIP_PAIRS,
    holm_adjust,
    paired_comparison,
    regularized_incomplete_beta,
    sign_flip_p_value,
    student_t_p_value,
)


def _t_p_closed_form(t: float, df: int) -> float:
    """Two-sided p-values of Student's t from the closed-form CDFs of 1, 2 and 4 degrees of
    freedom (Cauchy; ``t / sqrt(2 + t^2)``; the quartic form)."""
    t = abs(t)
    if df == 1:
        return 1 - 2 / math.pi * math.atan(t)
    if df == 2:
        return 1 - t / math.sqrt(2 + t * t)
    if df == 4:
        u = 1 + t * t / 4
        cdf = 0.5 + 3 / 8 * (t / math.sqrt(u)) * (1 - t * t / (12 * u))
        return 2 * (1 - cdf)
    raise AssertionError(df)


@pytest.mark.parametrize("df", [1, 2, 4])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.0, 4.242640687119285, -3.0, 25.0])
def test_student_t_p_value_matches_the_closed_forms(t, df):
    assert student_t_p_value(t, df) == pytest.approx(_t_p_closed_form(t, df), abs=1e-13)


def test_student_t_p_value_known_quantiles():
    # Two-sided 5 % critical values of Student's t (standard tables, to 4 decimals).
    assert student_t_p_value(2.7764, 4) == pytest.approx(0.05, abs=2e-5)
    assert student_t_p_value(2.5706, 5) == pytest.approx(0.05, abs=2e-5)
    assert student_t_p_value(2.2281, 10) == pytest.approx(0.05, abs=2e-5)
    assert student_t_p_value(math.inf, 4) == 0.0


def test_regularized_incomplete_beta_exact_values():
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1, b) = 1 - (1 - x)^b; I_{1/2}(a, a) = 1/2.
    assert regularized_incomplete_beta(0.3, 1, 1) == pytest.approx(0.3, abs=1e-14)
    assert regularized_incomplete_beta(0.7, 3, 1) == pytest.approx(0.343, abs=1e-14)
    assert regularized_incomplete_beta(0.2, 1, 4) == pytest.approx(1 - 0.8**4, abs=1e-14)
    assert regularized_incomplete_beta(0.5, 2.5, 2.5) == pytest.approx(0.5, abs=1e-14)
    assert regularized_incomplete_beta(0.0, 2, 3) == 0.0
    assert regularized_incomplete_beta(1.0, 2, 3) == 1.0
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\], got 1.5"):
        regularized_incomplete_beta(1.5, 1, 1)
    with pytest.raises(ValueError, match="a and b must be positive, got a=0, b=1"):
        regularized_incomplete_beta(0.5, 0, 1)


def test_sign_flip_p_value_counts_the_extreme_sign_patterns():
    # All positive: only the observed pattern and its mirror reach |sum| = 15 of 32 patterns.
    assert sign_flip_p_value([1, 2, 3, 4, 5]) == 2 / 32
    # 1, 2, 3, 4, -5: observed |sum| = 5. A pattern's sum is 15 - 2 * (the magnitudes it makes
    # negative), so |sum| >= 5 when those sum to <= 5 ({}, {1}..{5}, {1,2}, {1,3}, {1,4},
    # {2,3}: 10 subsets) or, by complement, >= 10 (10 more): 20 of 32.
    assert sign_flip_p_value([1, 2, 3, 4, -5]) == 20 / 32
    assert sign_flip_p_value([1, -1]) == 1.0
    assert sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p_value([0.5]) == 1.0
    # Float sums in another order tie with the observed one and count.
    assert sign_flip_p_value([0.1, 0.2, 0.3]) == 2 / 8


def test_paired_comparison_exact_values():
    result = paired_comparison([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0])
    # differences 1..5: mean 3, sample std sqrt(2.5), t = 3 / (sqrt(2.5) / sqrt(5)) = sqrt(18)
    assert result.differences == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert result.mean_difference == 3.0
    assert result.std_difference == pytest.approx(math.sqrt(2.5), abs=1e-15)
    assert result.t_statistic == pytest.approx(math.sqrt(18), abs=1e-14)
    assert result.t_p_value == pytest.approx(_t_p_closed_form(math.sqrt(18), 4), abs=1e-13)
    assert result.sign_flip_p_value == 2 / 32
    assert result.to_dict()["differences"] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_paired_comparison_degenerate_differences():
    same = paired_comparison([0.2, 0.3, 0.4], [0.2, 0.3, 0.4])
    assert (same.t_statistic, same.t_p_value, same.sign_flip_p_value) == (0.0, 1.0, 1.0)
    shifted = paired_comparison([0.0, 1.0, 2.0], [0.5, 1.5, 2.5])
    assert shifted.t_statistic == math.inf and shifted.t_p_value == 0.0
    assert shifted.sign_flip_p_value == 2 / 8
    single = paired_comparison([0.1], [0.3])
    assert single.std_difference is None and single.t_p_value is None
    assert single.sign_flip_p_value == 1.0


def test_paired_comparison_refuses_bad_input():
    with pytest.raises(ValueError, match=r"must pair up .* got 2 and 3 values"):
        paired_comparison([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match=r"other\[1\] must be a number, got '0.2'"):
        paired_comparison([0.1, 0.2], [0.1, "0.2"])
    with pytest.raises(TypeError, match=r"reference must be a sequence of numbers, got 0\.1"):
        paired_comparison(0.1, [0.1])
    with pytest.raises(ValueError, match=r"reference\[0\] must be finite, got nan"):
        paired_comparison([math.nan], [0.1])
    with pytest.raises(ValueError, match="differences must hold at least one value"):
        paired_comparison([], [])
    too_many = [0.1] * (MAX_SIGN_FLIP_PAIRS + 1)
    with pytest.raises(ValueError, match=f"n must be <= {MAX_SIGN_FLIP_PAIRS}, got 21"):
        sign_flip_p_value(too_many)


def test_holm_adjust_exact_values_in_the_given_order():
    # Sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08 -> 0.09 (monotone); 0.5 x 1.
    assert holm_adjust([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([]) == []
    with pytest.raises(ValueError, match=r"p_values\[1\] must lie in \[0, 1\], got 1.5"):
        holm_adjust([0.1, 1.5])
