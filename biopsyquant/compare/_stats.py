"""Statistical tests used by the pre/post comparison, as small pure functions on 1-D arrays.

Every function returns a plain ``dict`` whose keys become columns of the result tables.  A test
that cannot run never raises: it returns ``NaN`` values and a human-readable ``note`` saying why
(too few pairs, all changes zero, constant input, ...).  All p-values are two-sided.

The heavy lifting is done by :mod:`scipy.stats` (``wilcoxon``, ``bootstrap``, ``mannwhitneyu``,
``fisher_exact``, ``spearmanr``); this module only validates inputs, chooses documented
options and records which method was used.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
from scipy import stats

__all__ = [
    "stable_rng",
    "median_bootstrap_ci",
    "wilcoxon_signed_rank",
    "wilcoxon_method_used",
    "holm",
    "mann_whitney",
    "fisher_presence",
    "spearman_with_ci",
]

NAN = float("nan")


def stable_rng(seed: int, *key: object) -> np.random.Generator:
    """Random generator seeded by ``seed`` and a key, independent of call order.

    The same (seed, key) always gives the same stream, so a bootstrap CI for one
    marker/metric does not change when other metrics are added to or removed from the run.

    Parameters
    ----------
    seed : int
        The user's seed (``--seed``).
    *key : object
        Anything identifying the analysis (marker, metric, contrast, subset); converted with
        ``str`` and hashed with CRC-32.
    """
    text = "\x1f".join(str(k) for k in key)
    return np.random.default_rng([int(seed), zlib.crc32(text.encode("utf-8"))])


def _clean(x: np.ndarray | list[float]) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    return a[np.isfinite(a)]


def median_bootstrap_ci(
    x: np.ndarray | list[float],
    *,
    n_resamples: int = 2000,
    confidence_level: float = 0.95,
    rng: np.random.Generator | None = None,
    min_n: int = 2,
) -> dict:
    """Percentile bootstrap confidence interval of the median.

    Parameters
    ----------
    x : array_like, shape (n,)
        Values (e.g. paired changes); non-finite values are ignored.
    n_resamples : int
        Bootstrap resamples (``scipy.stats.bootstrap``); 0 disables the interval.
    confidence_level : float
        Two-sided level, e.g. 0.95.
    rng : numpy.random.Generator, optional
        Seeded generator (see :func:`stable_rng`); ``None`` uses a fresh unseeded one.
    min_n : int
        Fewer finite values than this give NaN bounds and a note.

    Returns
    -------
    dict
        ``median``, ``ci_low``, ``ci_high``, ``note`` (empty string when fine).
    """
    a = _clean(x)
    out = {"median": float(np.median(a)) if a.size else NAN, "ci_low": NAN, "ci_high": NAN,
           "note": ""}
    if a.size < max(min_n, 2):
        out["note"] = f"bootstrap CI needs at least {max(min_n, 2)} values, got {a.size}"
        return out
    if n_resamples <= 0:
        out["note"] = "bootstrap disabled (n_resamples=0)"
        return out
    if np.all(a == a[0]):
        # every resample has the same median; scipy warns about a degenerate distribution
        out["ci_low"] = out["ci_high"] = float(a[0])
        out["note"] = "all values identical: CI is a single point"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            (a,), np.median, n_resamples=int(n_resamples), confidence_level=confidence_level,
            method="percentile", vectorized=True, rng=rng,
        )
    out["ci_low"] = float(res.confidence_interval.low)
    out["ci_high"] = float(res.confidence_interval.high)
    return out


def wilcoxon_method_used(d: np.ndarray, zero_method: str) -> str:
    """Describe the p-value method ``scipy.stats.wilcoxon(method="auto")`` picks for ``d``.

    SciPy (>= 1.15) uses the exact null distribution when n <= 50 and there are neither ties nor
    zero differences; with ties or zeros and n <= 13 an exhaustive (hence exact, conditional)
    permutation test; otherwise the normal approximation with tie (and, for ``pratt``, zero)
    correction and no continuity correction.
    """
    a = _clean(d)
    n = a.size
    nz = a[a != 0]
    has_ties = np.unique(np.abs(nz)).size < nz.size
    has_zero = nz.size < n
    if n > 50:
        return "asymptotic"
    if not (has_ties or has_zero):
        return "exact"
    if n <= 13:
        return "exact permutation (ties/zeros present)"
    return "asymptotic (ties/zeros present)"


def _signed_rank_exact_conditional(d: np.ndarray, zero_method: str) -> tuple[float, float]:
    """Two-sided p of the signed-rank sum under all 2^n equally likely sign flips.

    Ranks are mid-ranks of ``|d|`` (zeros removed first for ``"wilcox"``, ranked and then
    ignored for ``"pratt"``, half-counted on each side for ``"zsplit"`` — a constant that does
    not change the p-value).  ``p = min(1, 2·min(P(R+ <= r+), P(R+ >= r+)))`` as in
    ``scipy.stats.permutation_test``; returns ``(min(r+, r-), p)`` like ``scipy.stats.wilcoxon``.
    """
    a = d[d != 0] if zero_method == "wilcox" else d
    ranks = stats.rankdata(np.abs(a))
    nz = a != 0
    r_plus = float(ranks[a > 0].sum())
    r_minus = float(ranks[a < 0].sum())
    if zero_method == "zsplit":
        half = float(ranks[~nz].sum()) / 2.0
        r_plus += half
        r_minus += half
    # variable part: sum of the non-zero ranks whose sign is '+'; mid-ranks are multiples of 1/2
    w = np.rint(2.0 * ranks[nz]).astype(np.int64)
    counts = np.zeros(int(w.sum()) + 1, dtype=np.float64)
    counts[0] = 1.0
    for wi in w:
        counts[wi:] = counts[wi:] + counts[: counts.size - wi].copy()
    prob = counts / counts.sum()
    obs = int(np.rint(2.0 * float(ranks[a > 0].sum())))
    p_le = float(prob[: obs + 1].sum())
    p_ge = float(prob[obs:].sum())
    return min(r_plus, r_minus), min(1.0, 2.0 * min(p_le, p_ge))


def wilcoxon_signed_rank(
    d: np.ndarray | list[float], *, zero_method: str = "wilcox", min_n: int = 3
) -> dict:
    """Wilcoxon signed-rank test that the paired changes ``d`` are symmetric about zero.

    Parameters
    ----------
    d : array_like, shape (n,)
        Paired differences (follow-up - baseline); non-finite values are ignored.
    zero_method : {"wilcox", "pratt", "zsplit"}
        Passed to :func:`scipy.stats.wilcoxon`.  ``"wilcox"`` (default) discards zero changes
        before ranking, as R's ``wilcox.test`` and SPSS do; ``"pratt"`` ranks them and then
        drops their ranks.
    min_n : int
        Minimum number of usable differences (non-zero ones for ``"wilcox"``); fewer gives NaN
        and a note.

    Returns
    -------
    dict
        ``n``, ``n_zero``, ``statistic`` (smaller of the signed-rank sums), ``p``,
        ``method`` (see :func:`wilcoxon_method_used`), ``note``.
    """
    if zero_method not in ("wilcox", "pratt", "zsplit"):
        raise ValueError(f"zero_method must be 'wilcox', 'pratt' or 'zsplit', got {zero_method!r}")
    a = _clean(d)
    n_zero = int(np.sum(a == 0))
    out = {"n": int(a.size), "n_zero": n_zero, "statistic": NAN, "p": NAN, "method": "",
           "note": ""}
    usable = a.size - n_zero if zero_method == "wilcox" else a.size
    if a.size and n_zero == a.size:
        out["note"] = f"all {a.size} changes are zero: no signed-rank test"
        return out
    if usable < min_n:
        what = "non-zero changes" if zero_method == "wilcox" else "pairs"
        out["note"] = f"too few {what} for a signed-rank test: {usable} < {min_n}"
        return out
    method = wilcoxon_method_used(a, zero_method)
    if method.startswith("exact permutation"):
        # scipy would run permutation_test over all 2^n sign flips (slow: seconds per call);
        # the same exact conditional distribution by dynamic programming, in microseconds
        out["statistic"], out["p"] = _signed_rank_exact_conditional(a, zero_method)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.wilcoxon(a, zero_method=zero_method, alternative="two-sided",
                                 method="auto")
        out["statistic"] = float(res.statistic)
        out["p"] = float(res.pvalue)
    out["method"] = method
    if n_zero and zero_method == "wilcox":
        out["note"] = f"{n_zero} zero change(s) discarded before ranking (zero_method='wilcox')"
    return out


def holm(pvalues: np.ndarray | list[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries are not part of the family.

    ``p_adj[(i)] = max_{j <= i} min(1, (m - j + 1) * p[(j)])`` over the m finite p-values
    sorted ascending.

    Parameters
    ----------
    pvalues : array_like, shape (k,)

    Returns
    -------
    numpy.ndarray, shape (k,)
        Adjusted p-values, NaN where the input was NaN.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def mann_whitney(
    a: np.ndarray | list[float], b: np.ndarray | list[float], *, min_n: int = 3
) -> dict:
    """Two-sided Mann–Whitney U test between two independent samples.

    Parameters
    ----------
    a, b : array_like
        The two groups' values (e.g. changes of responders and non-responders).
    min_n : int
        Minimum size of each group.

    Returns
    -------
    dict
        ``n_a``, ``n_b``, ``median_a``, ``median_b``, ``u`` (U statistic of ``a``), ``p``,
        ``rank_biserial`` (= 2U/(n_a n_b) - 1 in [-1, 1]; positive when ``a`` tends to be larger),
        ``method``, ``note``.
    """
    x, y = _clean(a), _clean(b)
    out = {"n_a": int(x.size), "n_b": int(y.size),
           "median_a": float(np.median(x)) if x.size else NAN,
           "median_b": float(np.median(y)) if y.size else NAN,
           "u": NAN, "p": NAN, "rank_biserial": NAN, "method": "", "note": ""}
    if x.size < min_n or y.size < min_n:
        out["note"] = f"group too small for Mann-Whitney U: n = {x.size} and {y.size}, need >= {min_n} each"
        return out
    if np.unique(np.concatenate([x, y])).size == 1:
        out["note"] = "all values identical in both groups: no rank test"
        return out
    res = stats.mannwhitneyu(x, y, alternative="two-sided", method="auto")
    out["u"] = float(res.statistic)
    out["p"] = float(res.pvalue)
    out["rank_biserial"] = float(2.0 * res.statistic / (x.size * y.size) - 1.0)
    ties = np.unique(np.concatenate([x, y])).size < x.size + y.size
    exact = (x.size <= 8 or y.size <= 8) and not ties
    out["method"] = "exact" if exact else "asymptotic (continuity-corrected)"
    return out


def fisher_presence(present_a: int, n_a: int, present_b: int, n_b: int, *, min_n: int = 1) -> dict:
    """Two-sided Fisher exact test on a 2×2 presence/absence table.

    The table is ``[[present_a, n_a - present_a], [present_b, n_b - present_b]]``.

    Returns
    -------
    dict
        ``odds_ratio`` (conditional-free sample odds ratio from SciPy, may be 0 or inf), ``p``,
        ``note``.
    """
    out = {"odds_ratio": NAN, "p": NAN, "note": ""}
    if n_a < min_n or n_b < min_n:
        out["note"] = f"group too small for Fisher's exact test: n = {n_a} and {n_b}, need >= {min_n} each"
        return out
    table = [[present_a, n_a - present_a], [present_b, n_b - present_b]]
    res = stats.fisher_exact(table, alternative="two-sided")
    out["odds_ratio"] = float(res.statistic)
    out["p"] = float(res.pvalue)
    return out


def spearman_with_ci(
    x: np.ndarray | list[float],
    y: np.ndarray | list[float],
    *,
    confidence_level: float = 0.95,
    min_n: int = 5,
) -> dict:
    """Spearman rank correlation with a Fisher-z confidence interval.

    The interval is ``tanh(atanh(rho) ± z * sqrt(1.06 / (n - 3)))`` (Fieller, Hartley & Pearson
    1957 standard error for Spearman's rho), which needs n >= 4.  Pairs with a non-finite value
    in either array are dropped (their number is returned as ``n``).

    Returns
    -------
    dict
        ``n``, ``rho``, ``p`` (SciPy's t-distribution p-value), ``ci_low``, ``ci_high``, ``note``.
    """
    xa = np.asarray(x, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(xa.size)
    out = {"n": n, "rho": NAN, "p": NAN, "ci_low": NAN, "ci_high": NAN, "note": ""}
    if n < max(min_n, 4):
        out["note"] = f"too few patients with both values for a correlation: {n} < {max(min_n, 4)}"
        return out
    if np.unique(xa).size == 1 or np.unique(ya).size == 1:
        out["note"] = "one variable is constant: correlation undefined"
        return out
    res = stats.spearmanr(xa, ya)
    rho = float(res.statistic)
    out["rho"] = rho
    out["p"] = float(res.pvalue)
    if abs(rho) >= 1.0:
        out["ci_low"] = out["ci_high"] = rho
        out["note"] = "perfect rank correlation: Fisher-z interval degenerate"
        return out
    z = math.atanh(rho)
    se = math.sqrt(1.06 / (n - 3))
    q = float(stats.norm.ppf(0.5 + confidence_level / 2.0))
    out["ci_low"] = math.tanh(z - q * se)
    out["ci_high"] = math.tanh(z + q * se)
    return out
