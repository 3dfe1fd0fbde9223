"""Intervals and paired tests on cases worked out by hand (pipelines/stats.py)."""
from __future__ import annotations

import math

import pytest

from pipelines.errors import PipelineError
from pipelines.stats import bootstrap_ci, fmt_ci, mcnemar_p, mean_ci, paired_bootstrap_p, ranks, spearman, wilson


def test_wilson_matches_the_formula_worked_by_hand():
    # k=7, n=14, z=1.96: p=0.5, denom=1+3.8416/14=1.27440, centre=(0.5+0.13720)/1.27440=0.5,
    # half=1.96*sqrt(0.25/14+3.8416/784)/1.27440 = 1.96*sqrt(0.017857+0.0049)/1.2744 = 0.23207
    lo, hi = wilson(7, 14)
    assert lo == pytest.approx(0.2679, abs=1e-3) and hi == pytest.approx(0.7321, abs=1e-3)


def test_wilson_at_the_edges_stays_inside_0_1_and_is_not_degenerate():
    lo, hi = wilson(0, 14)
    assert lo == 0.0 and hi == pytest.approx(0.2153, abs=1e-3)  # z^2/(n+z^2) = 3.8416/17.8416
    lo, hi = wilson(14, 14)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2153, abs=1e-3)
    # half-width at p=0.5 shrinks like 1/sqrt(n): n=43 is the smallest n with half-width <= 0.15
    assert (wilson(22, 43)[1] - wilson(22, 43)[0]) / 2 <= 0.15


def test_wilson_rejects_nonsense():
    with pytest.raises(PipelineError):
        wilson(0, 0)
    with pytest.raises(PipelineError):
        wilson(5, 4)


def test_mcnemar_exact_on_hand_cases():
    # 6 discordant pairs, all in one direction: p = 2 * (1/2)^6 = 0.03125
    a = [False] * 6 + [True] * 10
    b = [True] * 6 + [True] * 10
    assert mcnemar_p(a, b) == pytest.approx(0.0312, abs=1e-4)
    # 5 vs 1 discordant: p = 2 * (C(6,0)+C(6,1)) / 64 = 14/64 = 0.21875
    a = [False] * 5 + [True] + [True] * 4
    b = [True] * 5 + [False] + [True] * 4
    assert mcnemar_p(a, b) == pytest.approx(0.2188, abs=1e-4)
    assert mcnemar_p([True, False], [True, False]) == 1.0  # no discordant pair
    with pytest.raises(PipelineError):
        mcnemar_p([True], [True, False])


def test_bootstrap_is_deterministic_and_covers_the_mean():
    values = [0.0] * 10 + [1.0] * 10
    lo, hi = mean_ci(values)
    assert lo < 0.5 < hi and (lo, hi) == mean_ci(values)
    assert mean_ci([0.3] * 8) == (0.3, 0.3)  # no spread, no interval


def test_bootstrap_resamples_whole_groups():
    # two prompts, each with many identical variants: resampling prompts gives only 0, 0.5 or 1 as the mean, so the
    # interval spans [0, 1]; resampling rows would make it look narrow
    rows = [0.0] * 20 + [1.0] * 20
    groups = ["a"] * 20 + ["b"] * 20
    assert bootstrap_ci(rows, lambda v: sum(v) / len(v), groups) == (0.0, 1.0)
    lo, hi = bootstrap_ci(rows, lambda v: sum(v) / len(v))
    assert hi - lo < 0.5


def test_paired_bootstrap_sees_a_consistent_shift_and_not_noise():
    a = [0.2, 0.4, 0.1, 0.5, 0.3, 0.2, 0.4, 0.3, 0.2, 0.1]
    assert paired_bootstrap_p(a, [x + 0.3 for x in a]) < 0.01
    assert paired_bootstrap_p(a, list(a)) == 1.0


def test_spearman_and_ranks_by_hand():
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0  # a constant side has no order
    # d = (0, 1, -1, 0): rho = 1 - 6*2 / (4*15) = 0.8
    assert math.isclose(spearman([1, 2, 3, 4], [1, 3, 2, 4]), 0.8)


def test_fmt_ci():
    assert fmt_ci(0.5, [0.25, 0.75]) == "0.500 [0.250, 0.750]"
    assert fmt_ci(None, None) == "–"
