"""Statistics of biopsyquant.compare cross-checked against scipy and hand computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from biopsyquant.compare import (
    fisher_presence,
    holm,
    mann_whitney,
    median_bootstrap_ci,
    spearman_with_ci,
    wilcoxon_signed_rank,
)
from biopsyquant.compare._stats import stable_rng, wilcoxon_method_used


def _exact_signed_rank_p(d: np.ndarray) -> float:
    """Two-sided exact p by enumerating all 2^n sign flips (no ties, no zeros)."""
    r = stats.rankdata(np.abs(d))
    obs = min(r[d > 0].sum(), r[d < 0].sum())
    hits = 0
    total = 0
    for signs in itertools.product([1, -1], repeat=len(d)):
        s = np.array(signs)
        t = min(r[s > 0].sum(), r[s < 0].sum())
        hits += t <= obs
        total += 1
    return hits / total


def test_wilcoxon_exact_no_ties_matches_enumeration_and_scipy():
    d = np.array([1.0, 2.0, 3.0, -4.0, 5.0, 6.5, -0.5])
    res = wilcoxon_signed_rank(d)
    # ranks of |d|: 0.5->1, 1->2, 2->3, 3->4, 4->5, 5->6, 6.5->7; r- = 1 + 5 = 6
    assert res["statistic"] == 6.0
    assert res["p"] == pytest.approx(_exact_signed_rank_p(d), abs=1e-12)
    assert res["p"] == pytest.approx(stats.wilcoxon(d).pvalue, abs=1e-12)
    assert res["method"] == "exact"
    assert res["n"] == 7 and res["n_zero"] == 0 and res["note"] == ""


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt", "zsplit"])
def test_wilcoxon_ties_and_zeros_match_scipy(zero_method):
    d = np.array([0.0, 0.0, 1.5, 1.5, -2.0, 3.0, 3.0, 4.0, -1.5, 6.0, 2.0])
    res = wilcoxon_signed_rank(d, zero_method=zero_method)
    ref = stats.wilcoxon(d, zero_method=zero_method)
    assert res["statistic"] == pytest.approx(float(ref.statistic), abs=1e-12)
    assert res["p"] == pytest.approx(float(ref.pvalue), abs=1e-12)
    assert res["n_zero"] == 2
    assert res["method"] == "exact permutation (ties/zeros present)"
    if zero_method == "wilcox":
        assert "2 zero change(s) discarded" in res["note"]


def test_wilcoxon_thirteen_pairs_with_ties_and_zeros_matches_scipy_permutation():
    d = np.array([0, 1, -1, 2, 2, -2, 0, 5, 5, 5, -5, 6, 7.0])
    res = wilcoxon_signed_rank(d)
    ref = stats.wilcoxon(d)  # n = 13 with ties: scipy enumerates all 2^13 sign flips
    assert res["statistic"] == float(ref.statistic) == 13.0
    assert res["p"] == pytest.approx(float(ref.pvalue), abs=1e-12)
    assert res["p"] == pytest.approx(0.0859375, abs=1e-12)


def test_wilcoxon_large_n_with_ties_uses_asymptotic_and_matches_scipy():
    rng = np.random.default_rng(3)
    d = np.round(rng.normal(0.4, 1.0, 30), 1)  # rounded: ties
    d[:3] = 0.0
    res = wilcoxon_signed_rank(d)
    assert res["p"] == pytest.approx(float(stats.wilcoxon(d).pvalue), abs=1e-12)
    assert res["method"].startswith("asymptotic")
    assert wilcoxon_method_used(d, "wilcox") == res["method"]


def test_wilcoxon_all_zero_and_too_few_give_na_with_reason():
    res = wilcoxon_signed_rank([0.0, 0.0, 0.0, 0.0])
    assert math.isnan(res["p"]) and "all 4 changes are zero" in res["note"]
    res = wilcoxon_signed_rank([1.0, -2.0], min_n=3)
    assert math.isnan(res["p"]) and "too few non-zero changes" in res["note"]
    # zeros do not count as usable pairs with zero_method='wilcox'
    res = wilcoxon_signed_rank([1.0, 2.0, 0.0, 0.0], min_n=3)
    assert math.isnan(res["p"]) and "2 < 3" in res["note"]
    res = wilcoxon_signed_rank([1.0, 2.0, 0.0, 0.0], min_n=3, zero_method="pratt")
    assert res["p"] == pytest.approx(
        float(stats.wilcoxon([1.0, 2.0, 0.0, 0.0], zero_method="pratt").pvalue))
    # NaN changes (unpaired patients) are ignored, not propagated
    res = wilcoxon_signed_rank([1.0, np.nan, 2.0, 3.5, -0.5, 4.0])
    assert res["n"] == 5
    assert res["p"] == pytest.approx(float(stats.wilcoxon([1.0, 2.0, 3.5, -0.5, 4.0]).pvalue))


def test_holm_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005=0.02, 3*0.01=0.03, 2*0.03=0.06, 1*0.04=0.04
    # running maximum -> 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02], atol=1e-15)
    out = holm([0.2, np.nan, 0.5, 0.01])
    np.testing.assert_allclose(out, [0.4, np.nan, 0.5, 0.03], atol=1e-15)  # m = 3
    np.testing.assert_allclose(holm([0.6, 0.9]), [1.0, 1.0])  # capped at 1
    assert np.isnan(holm([np.nan])).all() and holm([]).size == 0


def test_fisher_7_of_7_vs_3_of_8():
    res = fisher_presence(7, 7, 3, 8)
    # hypergeometric: 15 patients, 10 present, 7 responders.  P(X=7) = C(10,7)/C(15,7)
    # = 120/6435, P(X=2) = C(10,2)/6435 = 45/6435 are the tables as or less likely.
    assert res["p"] == pytest.approx(165 / 6435, abs=1e-12)
    assert res["p"] == pytest.approx(0.025641, abs=1e-6)
    assert res["p"] == pytest.approx(stats.fisher_exact([[7, 0], [3, 5]]).pvalue, abs=1e-15)
    assert res["odds_ratio"] == math.inf
    small = fisher_presence(1, 1, 1, 2, min_n=3)
    assert math.isnan(small["p"]) and "group too small" in small["note"]


def test_mann_whitney_matches_scipy_and_rank_biserial():
    a = np.array([-40.0, -35.5, -20.0, -12.0, -60.0, -33.0, -25.0])
    b = np.array([10.0, 22.0, -5.0, 30.5, 15.0, 8.0, 12.0, 40.0])
    res = mann_whitney(a, b)
    ref = stats.mannwhitneyu(a, b, alternative="two-sided")
    assert res["u"] == ref.statistic == 0.0
    assert res["p"] == pytest.approx(ref.pvalue, abs=1e-15)
    assert res["rank_biserial"] == -1.0
    assert res["method"] == "exact"
    # with ties: asymptotic, still equal to scipy; r = 2U/(n_a n_b) - 1
    a2, b2 = [1, 2, 2, 3, 5], [2, 3, 3, 4, 6, 7]
    res2 = mann_whitney(a2, b2)
    ref2 = stats.mannwhitneyu(a2, b2, alternative="two-sided")
    assert res2["p"] == pytest.approx(ref2.pvalue, abs=1e-15)
    assert res2["rank_biserial"] == pytest.approx(2 * ref2.statistic / 30 - 1)
    assert res2["method"].startswith("asymptotic")
    small = mann_whitney([1.0, 2.0], [3.0, 4.0, 5.0], min_n=3)
    assert math.isnan(small["p"]) and "group too small" in small["note"]


def test_spearman_matches_scipy_and_fisher_z_interval():
    x = np.array([50.0, 80, 65, 120, 95, 40, 150, 70, 110, 60])
    y = np.array([70.0, 60, 66, 50, 58, 75, 45, 61, 52, 62])
    y[3] = np.nan  # dropped pairwise
    res = spearman_with_ci(x, y)
    ok = np.isfinite(y)
    ref = stats.spearmanr(x[ok], y[ok])
    assert res["n"] == 9
    assert res["rho"] == pytest.approx(ref.statistic, abs=1e-12)
    assert res["p"] == pytest.approx(ref.pvalue, abs=1e-12)
    z, se = math.atanh(ref.statistic), math.sqrt(1.06 / (9 - 3))
    assert res["ci_low"] == pytest.approx(math.tanh(z - 1.959963984540054 * se), abs=1e-9)
    assert res["ci_high"] == pytest.approx(math.tanh(z + 1.959963984540054 * se), abs=1e-9)
    assert res["ci_low"] < res["rho"] < res["ci_high"]
    few = spearman_with_ci([1, 2, 3], [3, 1, 2])
    assert math.isnan(few["rho"]) and "too few" in few["note"]
    const = spearman_with_ci([1, 2, 3, 4, 5], [2, 2, 2, 2, 2])
    assert math.isnan(const["rho"]) and "constant" in const["note"]


def test_bootstrap_ci_equals_scipy_percentile_and_is_seeded():
    d = np.array([-12.0, -30.5, 4.0, -8.0, -15.0, 0.0, -22.0, -3.5, 6.0])
    a = median_bootstrap_ci(d, n_resamples=2000, rng=stable_rng(0, "CD163", "m"))
    ref = stats.bootstrap((d,), np.median, n_resamples=2000, method="percentile",
                          vectorized=True, rng=stable_rng(0, "CD163", "m"))
    assert a["median"] == -8.0
    assert a["ci_low"] == pytest.approx(ref.confidence_interval.low)
    assert a["ci_high"] == pytest.approx(ref.confidence_interval.high)
    assert a["ci_low"] <= a["median"] <= a["ci_high"]
    b = median_bootstrap_ci(d, n_resamples=2000, rng=stable_rng(0, "CD163", "m"))
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    # another seed or another key gives another stream (continuous data: bounds differ)
    x = np.random.default_rng(5).normal(0.0, 1.0, 25)
    k0 = median_bootstrap_ci(x, rng=stable_rng(0, "CD163", "m"))
    k1 = median_bootstrap_ci(x, rng=stable_rng(1, "CD163", "m"))
    k2 = median_bootstrap_ci(x, rng=stable_rng(0, "CD163", "other"))
    assert (k0["ci_low"], k0["ci_high"]) != (k1["ci_low"], k1["ci_high"])
    assert (k0["ci_low"], k0["ci_high"]) != (k2["ci_low"], k2["ci_high"])
    same = median_bootstrap_ci([2.0, 2.0, 2.0])
    assert same["ci_low"] == same["ci_high"] == 2.0 and "identical" in same["note"]
    one = median_bootstrap_ci([2.0], min_n=3)
    assert math.isnan(one["ci_low"]) and "at least 3" in one["note"]
