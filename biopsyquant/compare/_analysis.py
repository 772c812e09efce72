"""Build the result tables (paired, stats, group tests, presence, correlations) from prepared data."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from ._pairing import Prepared
from ._problems import Problems
from ._stats import (
    fisher_presence,
    holm,
    mann_whitney,
    median_bootstrap_ci,
    spearman_with_ci,
    stable_rng,
    wilcoxon_signed_rank,
)


def contrast_name(followup: str, baseline: str) -> str:
    """Label of a timepoint contrast, e.g. ``"month6 vs baseline"``."""
    return f"{followup} vs {baseline}"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _pseudocount(values: np.ndarray, setting: float | str) -> float:
    """Pseudocount for log2 fold changes of one marker × metric.

    ``"auto"``: half of the smallest positive value of that metric over all biopsies of the
    cohort (1.0 when no value is positive); a number: used as given.
    """
    if setting != "auto":
        return float(setting)
    v = values[np.isfinite(values) & (values > 0)]
    return float(v.min() / 2.0) if v.size else 1.0


def build_paired(prep: Prepared, settings, problems: Problems) -> pd.DataFrame:
    """One row per patient × marker × metric with values per timepoint and changes.

    Columns: ``patient, group, marker, metric, value_<tp>, n_sections_<tp>, slides_<tp>`` for
    every timepoint, then for every later timepoint ``change_<tp>, pct_change_<tp>,
    log2fc_<tp>, direction_<tp>``, then ``log2fc_pseudocount`` and ``note``.
    """
    tps = prep.timepoints
    base = tps[0]
    follow = tps[1:]
    bio = {(r.patient, r.timepoint, r.marker, r.metric): r
           for r in prep.biopsies.itertuples(index=False)}
    group_of = dict(zip(prep.patients["patient"], prep.patients["group"], strict=True))
    gone_of: dict[tuple, list[tuple[str, str]]] = {}
    for e in prep.excluded.itertuples(index=False):
        gone_of.setdefault((e.patient, e.timepoint, e.marker), []).append((e.slide, e.kind))
    rows = []
    reported_unpaired: set = set()
    all_missing: dict[tuple[str, str, str], list[str]] = {}
    for marker in prep.markers:
        mb = prep.biopsies[prep.biopsies["marker"] == marker]
        pats = list(dict.fromkeys(mb["patient"]))
        for metric in prep.metrics[marker]:
            vals_all = mb.loc[mb["metric"] == metric, "value"].to_numpy(dtype=float)
            pc = _pseudocount(vals_all, settings.pseudocount)
            for pid in pats:
                rec: dict = {"patient": pid, "group": group_of.get(pid, ""), "marker": marker,
                             "metric": metric}
                notes: list[str] = []
                values: dict[str, float] = {}
                for tp in tps:
                    b = bio.get((pid, tp, marker, metric))
                    gone = gone_of.get((pid, tp, marker), [])
                    why = ", ".join(f"{s} {k}" for s, k in gone)
                    if b is not None:
                        values[tp] = float(b.value)
                        rec[f"value_{tp}"] = float(b.value)
                        rec[f"n_sections_{tp}"] = int(b.n_sections)
                        rec[f"slides_{tp}"] = b.slides
                        if gone:
                            notes.append(f"{tp}: {len(gone)} section(s) excluded ({why})")
                        if b.n_sections == 0:
                            notes.append(f"{metric} missing in all {b.n_rows} {tp} section(s)")
                            all_missing.setdefault((pid, tp, marker), []).append(metric)
                        elif b.n_sections < b.n_rows:
                            notes.append(f"{metric} missing in {b.n_rows - b.n_sections} "
                                         f"of {b.n_rows} {tp} sections")
                    else:
                        values[tp] = np.nan
                        rec[f"value_{tp}"] = np.nan
                        rec[f"n_sections_{tp}"] = 0
                        rec[f"slides_{tp}"] = ""
                        if gone:
                            notes.append(f"no usable {tp} slide (excluded: {why})")
                        else:
                            notes.append(f"no {tp} slide")
                        if (pid, marker, tp) not in reported_unpaired:
                            reported_unpaired.add((pid, marker, tp))
                            kind = "unpaired_patient" if tp != base else "missing_baseline"
                            problems.add(kind, f"patient {pid}, {marker}: no usable {tp} biopsy"
                                         + (f" ({why})" if gone else "")
                                         + "; this patient is left out of the paired "
                                         "statistics involving " + tp, patient=pid,
                                         timepoint=tp, marker=marker)
                b0 = values[base]
                for tp in follow:
                    v = values[tp]
                    ch = v - b0
                    rec[f"change_{tp}"] = ch
                    if np.isfinite(ch):
                        if b0 == 0:
                            rec[f"pct_change_{tp}"] = np.nan
                            notes.append(f"percent change to {tp} undefined: baseline is 0")
                        else:
                            rec[f"pct_change_{tp}"] = 100.0 * ch / abs(b0)
                        if b0 < 0 or v < 0:
                            rec[f"log2fc_{tp}"] = np.nan
                            notes.append(f"log2 fold change to {tp} undefined: negative value")
                        else:
                            rec[f"log2fc_{tp}"] = float(np.log2((v + pc) / (b0 + pc)))
                        rec[f"direction_{tp}"] = ("increase" if ch > 0 else
                                                  "decrease" if ch < 0 else "no change")
                    else:
                        rec[f"pct_change_{tp}"] = np.nan
                        rec[f"log2fc_{tp}"] = np.nan
                        rec[f"direction_{tp}"] = "NA"
                rec["log2fc_pseudocount"] = pc
                rec["note"] = _join(*dict.fromkeys(notes))
                rows.append(rec)
    for (pid, tp, marker), mets in all_missing.items():
        problems.add("metric_missing", f"patient {pid}, {marker}, {tp}: no section has a value "
                     f"for {', '.join(mets)} (e.g. unknown pixel size for densities); NA",
                     patient=pid, timepoint=tp, marker=marker, metric=",".join(mets))
    cols = ["patient", "group", "marker", "metric"]
    for tp in tps:
        cols += [f"value_{tp}", f"n_sections_{tp}"]
    for tp in follow:
        cols += [f"change_{tp}", f"pct_change_{tp}", f"log2fc_{tp}", f"direction_{tp}"]
    cols += ["log2fc_pseudocount", "note"] + [f"slides_{tp}" for tp in tps]
    return pd.DataFrame(rows, columns=cols)


def build_stats(paired: pd.DataFrame, prep: Prepared, settings) -> pd.DataFrame:
    """Within-patient change statistics per marker × metric × contrast × subset.

    Subsets: ``all`` patients and each group.  Holm family: all metrics of one marker within
    one contrast and subset.
    """
    base = prep.timepoints[0]
    rows = []
    subsets = ["all", *prep.groups]
    for marker in prep.markers:
        pm = paired[paired["marker"] == marker]
        for tp in prep.timepoints[1:]:
            for subset in subsets:
                fam_start = len(rows)
                for metric in prep.metrics[marker]:
                    sub = pm[pm["metric"] == metric]
                    if subset != "all":
                        sub = sub[sub["group"] == subset]
                    ok = sub[f"change_{tp}"].notna()
                    d = sub.loc[ok, f"change_{tp}"].to_numpy(dtype=float)
                    rng = stable_rng(settings.seed, marker, metric, tp, subset)
                    ci = median_bootstrap_ci(d, n_resamples=settings.n_bootstrap,
                                             confidence_level=settings.confidence_level,
                                             rng=rng, min_n=settings.min_pairs)
                    w = wilcoxon_signed_rank(d, zero_method=settings.zero_method,
                                             min_n=settings.min_pairs)
                    n_unpaired = int((~ok).sum())
                    rows.append({
                        "marker": marker, "metric": metric,
                        "contrast": contrast_name(tp, base), "baseline": base, "followup": tp,
                        "subset": subset, "n_pairs": int(d.size), "n_unpaired": n_unpaired,
                        "n_increase": int((d > 0).sum()), "n_decrease": int((d < 0).sum()),
                        "n_zero_change": int((d == 0).sum()),
                        "median_baseline": float(np.median(sub.loc[ok, f"value_{base}"]))
                        if d.size else np.nan,
                        "median_followup": float(np.median(sub.loc[ok, f"value_{tp}"]))
                        if d.size else np.nan,
                        "median_change": ci["median"],
                        "change_ci_low": ci["ci_low"], "change_ci_high": ci["ci_high"],
                        "median_log2fc": float(np.median(sub.loc[ok, f"log2fc_{tp}"].dropna()))
                        if sub.loc[ok, f"log2fc_{tp}"].notna().any() else np.nan,
                        "wilcoxon_statistic": w["statistic"], "wilcoxon_p": w["p"],
                        "wilcoxon_method": w["method"], "zero_method": settings.zero_method,
                        "p_holm": np.nan, "holm_family_size": 0,
                        "note": _join(
                            f"{n_unpaired} patient(s) without both timepoints left out"
                            if n_unpaired else "", ci["note"], w["note"]),
                    })
                fam = rows[fam_start:]
                adj = holm([r["wilcoxon_p"] for r in fam])
                m = int(np.isfinite(adj).sum())
                for r, a in zip(fam, adj, strict=True):
                    r["p_holm"] = a
                    r["holm_family_size"] = m if np.isfinite(a) else 0
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


STATS_COLUMNS = ["marker", "metric", "contrast", "baseline", "followup", "subset", "n_pairs",
                 "n_unpaired", "n_increase", "n_decrease", "n_zero_change", "median_baseline",
                 "median_followup", "median_change", "change_ci_low", "change_ci_high",
                 "median_log2fc", "wilcoxon_statistic", "wilcoxon_p", "wilcoxon_method",
                 "zero_method", "p_holm", "holm_family_size", "note"]

GROUP_COLUMNS = ["marker", "metric", "contrast", "group_a", "group_b", "n_a", "n_b",
                 "median_change_a", "median_change_b", "mannwhitney_u", "mannwhitney_p",
                 "rank_biserial", "method", "p_holm", "holm_family_size", "note"]


def build_group_tests(paired: pd.DataFrame, prep: Prepared, settings,
                      problems: Problems) -> pd.DataFrame:
    """Mann–Whitney U on changes between every pair of groups (per marker × metric × contrast).

    ``rank_biserial`` > 0 means group_a's changes tend to be larger than group_b's.
    """
    rows = []
    if len(prep.groups) < 2:
        return pd.DataFrame(rows, columns=GROUP_COLUMNS)
    base = prep.timepoints[0]
    small_reported: set = set()
    for marker in prep.markers:
        pm = paired[paired["marker"] == marker]
        for tp in prep.timepoints[1:]:
            for ga, gb in combinations(prep.groups, 2):
                start = len(rows)
                for metric in prep.metrics[marker]:
                    sub = pm[pm["metric"] == metric]
                    a = sub.loc[sub["group"] == ga, f"change_{tp}"].dropna().to_numpy(float)
                    b = sub.loc[sub["group"] == gb, f"change_{tp}"].dropna().to_numpy(float)
                    r = mann_whitney(a, b, min_n=settings.min_group_size)
                    if r["note"].startswith("group too small") and \
                            (marker, tp, ga, gb) not in small_reported:
                        small_reported.add((marker, tp, ga, gb))
                        problems.add("group_too_small",
                                     f"{marker}, {contrast_name(tp, base)}: {ga} has "
                                     f"{r['n_a']} and {gb} {r['n_b']} paired patients "
                                     f"(minimum {settings.min_group_size}); Mann-Whitney NA",
                                     marker=marker, timepoint=tp)
                    rows.append({"marker": marker, "metric": metric,
                                 "contrast": contrast_name(tp, base), "group_a": ga,
                                 "group_b": gb, "n_a": r["n_a"], "n_b": r["n_b"],
                                 "median_change_a": r["median_a"],
                                 "median_change_b": r["median_b"], "mannwhitney_u": r["u"],
                                 "mannwhitney_p": r["p"], "rank_biserial": r["rank_biserial"],
                                 "method": r["method"], "p_holm": np.nan,
                                 "holm_family_size": 0, "note": r["note"]})
                fam = rows[start:]
                adj = holm([r["mannwhitney_p"] for r in fam])
                m = int(np.isfinite(adj).sum())
                for r, a in zip(fam, adj, strict=True):
                    r["p_holm"] = a
                    r["holm_family_size"] = m if np.isfinite(a) else 0
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


PRESENCE_COLUMNS = ["marker", "metric", "threshold", "rule", "timepoint", "group_a", "group_b",
                    "present_a", "n_a", "present_b", "n_b", "counts", "odds_ratio", "fisher_p",
                    "n_missing", "note"]


def build_presence(paired: pd.DataFrame, prep: Prepared, settings,
                   problems: Problems) -> pd.DataFrame:
    """Presence (value > threshold) per group and timepoint, with Fisher's exact test.

    Every patient with a value at that timepoint counts (pairing is not required).  Without
    two groups the row gives the whole-cohort count and no test.
    """
    rows = []
    for t_marker, t_metric, thr in settings.presence_thresholds:
        targets = [t_marker] if t_marker else [m for m in prep.markers
                                               if t_metric in prep.metrics.get(m, [])]
        if not targets or (t_marker and t_metric not in prep.metrics.get(t_marker, [])):
            problems.add("presence_metric_absent",
                         f"presence threshold {(t_marker + ':') if t_marker else ''}{t_metric} > "
                         f"{thr:g}: no such analysed marker/metric", metric=t_metric,
                         marker=t_marker or "", severity="error")
            continue
        for marker in targets:
            sub = paired[(paired["marker"] == marker) & (paired["metric"] == t_metric)]
            for tp in prep.timepoints:
                v = sub[f"value_{tp}"]
                have = v.notna()
                pres = v > thr
                n_missing = int((~have).sum())
                base_rec = {"marker": marker, "metric": t_metric, "threshold": thr,
                            "rule": f"{t_metric} > {thr:g}", "timepoint": tp,
                            "n_missing": n_missing}
                miss_note = (f"{n_missing} patient(s) without a {tp} value left out"
                             if n_missing else "")
                if len(prep.groups) < 2:
                    rows.append({**base_rec, "group_a": "all", "group_b": "",
                                 "present_a": int((pres & have).sum()),
                                 "n_a": int(have.sum()), "present_b": np.nan, "n_b": np.nan,
                                 "counts": f"all {int((pres & have).sum())}/{int(have.sum())}",
                                 "odds_ratio": np.nan, "fisher_p": np.nan,
                                 "note": _join("fewer than two groups: no Fisher test",
                                               miss_note)})
                    continue
                for ga, gb in combinations(prep.groups, 2):
                    ina = (sub["group"] == ga) & have
                    inb = (sub["group"] == gb) & have
                    pa, na = int((pres & ina).sum()), int(ina.sum())
                    pb, nb = int((pres & inb).sum()), int(inb.sum())
                    f = fisher_presence(pa, na, pb, nb, min_n=settings.min_group_size)
                    rows.append({**base_rec, "group_a": ga, "group_b": gb, "present_a": pa,
                                 "n_a": na, "present_b": pb, "n_b": nb,
                                 "counts": f"{ga} {pa}/{na} vs {gb} {pb}/{nb}",
                                 "odds_ratio": f["odds_ratio"], "fisher_p": f["p"],
                                 "note": _join(f["note"], miss_note)})
    return pd.DataFrame(rows, columns=PRESENCE_COLUMNS)


CORR_COLUMNS = ["marker", "metric", "variable", "clinical", "subset", "n", "rho", "spearman_p",
                "ci_low", "ci_high", "ci_method", "note"]


def build_correlations(paired: pd.DataFrame, prep: Prepared, settings) -> pd.DataFrame:
    """Spearman correlation of the baseline value and of each change with each clinical column."""
    rows = []
    if not prep.clinical:
        return pd.DataFrame(rows, columns=CORR_COLUMNS)
    clin = prep.patients.set_index("patient")
    base = prep.timepoints[0]
    variables = [(f"value_{base}", f"value_{base}")] + \
        [(f"change_{tp}", f"change_{tp}") for tp in prep.timepoints[1:]]
    for marker in prep.markers:
        for metric in prep.metrics[marker]:
            sub = paired[(paired["marker"] == marker) & (paired["metric"] == metric)]
            for c in prep.clinical:
                y = sub["patient"].map(clin[c]).to_numpy(dtype=float)
                for label, col in variables:
                    r = spearman_with_ci(sub[col].to_numpy(dtype=float), y,
                                         confidence_level=settings.confidence_level,
                                         min_n=settings.min_correlation_n)
                    rows.append({"marker": marker, "metric": metric, "variable": label,
                                 "clinical": c, "subset": "all", "n": r["n"], "rho": r["rho"],
                                 "spearman_p": r["p"], "ci_low": r["ci_low"],
                                 "ci_high": r["ci_high"],
                                 "ci_method": "Fisher z, SE = sqrt(1.06/(n-3))",
                                 "note": r["note"]})
    return pd.DataFrame(rows, columns=CORR_COLUMNS)
