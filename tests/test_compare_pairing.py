"""Pairing, replicate averaging, group/correlation tables and every bad-input case of compare."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from biopsyquant.compare import (
    CompareSettings,
    cohort_slides,
    compare_slides,
    parse_presence_thresholds,
    synthetic_cohort,
)
from biopsyquant.errors import InputError, SettingsError

FAST = {"n_bootstrap": 200}


def _row(slide, patient, tp, value, *, marker="CD163", status="ok", **extra):
    r = {"slide": slide, "path": f"/data/{slide}.tif", "patient": patient, "timepoint": tp,
         "marker": marker, "status": status, "error": "" if status == "ok" else "unreadable",
         "mpp": 0.5, "mpp_source": "svs", "tissue_area_mm2": 5.0, "n_fibers": 1000,
         "cells_per_mm2": value}
    r.update(extra)
    return r


def _simple(values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    rows = []
    for pid, (b, f) in values.items():
        rows.append(_row(f"{pid}_b", pid, "baseline", b))
        rows.append(_row(f"{pid}_f", pid, "month6", f))
    return pd.DataFrame(rows)


def _kinds(res) -> list[str]:
    return res.problems["kind"].tolist()


def test_replicate_sections_averaged_and_counted():
    df = pd.DataFrame([
        _row("A_b1", "A", "baseline", 10.0), _row("A_b2", "A", "baseline", 14.0),
        _row("A_f", "A", "month6", 6.0),
        _row("B_b", "B", "baseline", 20.0), _row("B_f1", "B", "month6", 30.0),
        _row("B_f2", "B", "month6", 34.0), _row("B_f3", "B", "month6", np.nan),
    ])
    res = compare_slides(df, timepoints=("baseline", "month6"), metrics=("cells_per_mm2",),
                         **FAST)
    p = res.paired.set_index("patient")
    assert p.loc["A", "value_baseline"] == 12.0 and p.loc["A", "n_sections_baseline"] == 2
    assert p.loc["A", "change_month6"] == -6.0
    assert p.loc["A", "pct_change_month6"] == pytest.approx(-50.0)
    assert p.loc["A", "direction_month6"] == "decrease"
    # the section without a value does not count and is noted
    assert p.loc["B", "value_month6"] == 32.0 and p.loc["B", "n_sections_month6"] == 2
    assert "missing in 1 of 3 month6 sections" in p.loc["B", "note"]
    assert p.loc["B", "slides_month6"] == "B_f1;B_f2;B_f3"
    # log2 fold change with the documented auto pseudocount: half the smallest positive value
    pc = 6.0 / 2
    assert p.loc["A", "log2fc_pseudocount"] == pc
    assert p.loc["A", "log2fc_month6"] == pytest.approx(math.log2((6 + pc) / (12 + pc)))


def test_paired_stats_match_scipy_and_holm_family_is_per_marker():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        b1, b2 = rng.uniform(20, 80), rng.uniform(0, 5)
        rows.append(_row(f"P{i}_b", f"P{i}", "baseline", b1, cells_per_100_fibers=b2))
        rows.append(_row(f"P{i}_f", f"P{i}", "month6", b1 * rng.uniform(0.3, 1.2),
                         cells_per_100_fibers=b2 + rng.normal(0, 1)))
    df = pd.DataFrame(rows)
    res = compare_slides(df, timepoints=("baseline", "month6"), **FAST)
    assert res.metrics["CD163"] == ["cells_per_mm2", "cells_per_100_fibers"]
    st = res.stats.set_index("metric")
    p = res.paired
    for m in ("cells_per_mm2", "cells_per_100_fibers"):
        d = p.loc[p["metric"] == m, "change_month6"].to_numpy()
        assert st.loc[m, "n_pairs"] == 9
        assert st.loc[m, "median_change"] == pytest.approx(np.median(d))
        assert st.loc[m, "wilcoxon_p"] == pytest.approx(stats.wilcoxon(d).pvalue, abs=1e-12)
        assert st.loc[m, "holm_family_size"] == 2
        assert st.loc[m, "change_ci_low"] <= st.loc[m, "median_change"] <= \
            st.loc[m, "change_ci_high"]
    ps = st["wilcoxon_p"].to_numpy()
    np.testing.assert_allclose(sorted(st["p_holm"]),
                               sorted([min(1, 2 * ps.min()), max(min(1, 2 * ps.min()),
                                                                 ps.max())]))
    # tissue_area_mm2 / n_fibers / mpp are provenance, never metrics
    assert "tissue_area_mm2" not in res.metrics["CD163"]
    # bootstrap is reproducible with the seed
    again = compare_slides(df, timepoints=("baseline", "month6"), **FAST)
    pd.testing.assert_frame_equal(res.stats, again.stats)


def test_cohort_groups_presence_fisher_and_correlation():
    coh = synthetic_cohort(seed=0)
    slides = cohort_slides(coh)
    res = compare_slides(slides, design=coh.design, timepoints=("baseline", "month6"),
                         metrics=("CD163:cells_per_mm2", "IL-1Ra:positive_area_pct"),
                         presence_thresholds=["IL-1Ra:positive_area_pct=1"], **FAST)
    assert res.groups == ["responder", "non-responder"]
    # biopsy means recover the truth (replicates scatter symmetrically)
    truth = coh.truth.set_index(["patient", "marker"])
    for _, r in res.paired.iterrows():
        t = truth.loc[(r["patient"], r["marker"])]
        assert r["value_baseline"] == pytest.approx(t["value_baseline"], abs=1e-5)
        assert r["value_month6"] == pytest.approx(t["value_month6"], abs=1e-5)
        assert r["n_sections_month6"] == t["n_sections_month6"]
        assert r["direction_month6"] == t["direction_month6"]
    pres = res.presence.set_index("timepoint")
    assert pres.loc["month6", "counts"] == "responder 7/7 vs non-responder 3/8"
    assert pres.loc["month6", "fisher_p"] == pytest.approx(
        stats.fisher_exact([[7, 0], [3, 5]]).pvalue)
    # Mann-Whitney on CD163 changes against scipy directly
    g = res.group_tests.set_index("metric").loc["cells_per_mm2"]
    p = res.paired[res.paired["metric"] == "cells_per_mm2"]
    a = p.loc[p["group"] == "responder", "change_month6"]
    b = p.loc[p["group"] == "non-responder", "change_month6"]
    ref = stats.mannwhitneyu(a, b)
    assert g["mannwhitney_p"] == pytest.approx(ref.pvalue) and g["rank_biserial"] < 0
    # per-group paired stats
    sr = res.stats[(res.stats["metric"] == "cells_per_mm2") & (res.stats["subset"] == "responder")]
    assert sr["n_pairs"].item() == 7 and sr["n_decrease"].item() == 7
    assert sr["wilcoxon_p"].item() == pytest.approx(stats.wilcoxon(a).pvalue)
    # Spearman of baseline CD163 against MMT8 (built inversely related)
    c = res.correlations
    c = c[(c["metric"] == "cells_per_mm2") & (c["clinical"] == "MMT8")
          & (c["variable"] == "value_baseline")].iloc[0]
    mmt8 = p["patient"].map(coh.design.set_index("patient")["MMT8"])
    ref = stats.spearmanr(p["value_baseline"], mmt8)
    assert c["rho"] == pytest.approx(ref.statistic) and c["rho"] < -0.5
    assert c["n"] == 15 and c["ci_low"] < c["rho"] < c["ci_high"]


def test_unpaired_patient_missing_and_unknown_timepoints():
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6), "D": (9, 3)})
    df = df[df["slide"] != "D_f"]  # D has no follow-up
    df = pd.concat([df, pd.DataFrame([_row("E_x", "E", "month3", 5.0)])], ignore_index=True)
    res = compare_slides(df, timepoints=("baseline", "month6", "month12"), **FAST)
    p = res.paired.set_index("patient")
    assert np.isnan(p.loc["D", "change_month6"]) and "no month6 slide" in p.loc["D", "note"]
    assert p.loc["D", "direction_month6"] == "NA"
    kinds = _kinds(res)
    assert "unpaired_patient" in kinds
    assert "unknown_timepoint" in kinds  # month3 not in --timepoints
    assert "timepoint_absent" in kinds  # month12 has no slide
    assert "multiple_timepoints" in kinds
    assert "E" not in set(p.index)
    assert set(res.excluded["slide"]) == {"E_x"}
    st = res.stats.set_index("contrast")
    assert st.loc["month6 vs baseline", "n_pairs"] == 3
    assert st.loc["month6 vs baseline", "n_unpaired"] == 1
    assert st.loc["month12 vs baseline", "n_pairs"] == 0
    assert np.isnan(st.loc["month12 vs baseline", "wilcoxon_p"])
    assert "too few" in st.loc["month12 vs baseline", "note"]


def test_failed_slides_excluded_and_listed():
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)})
    df.loc[df["slide"] == "B_f", ["status", "error"]] = ["error", "TIFF truncated"]
    df.loc[df["slide"] == "B_f", "cells_per_mm2"] = np.nan
    res = compare_slides(df, timepoints=("baseline", "month6"), **FAST)
    pr = res.problems[res.problems["kind"] == "failed_slide"]
    assert pr["slide"].tolist() == ["B_f"] and "TIFF truncated" in pr["message"].item()
    assert pr["severity"].item() == "error"
    note = res.paired.set_index("patient").loc["B", "note"]
    assert "excluded: B_f failed_slide" in note
    assert res.excluded["slide"].tolist() == ["B_f"]


def test_duplicate_rows_identical_and_conflicting():
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)})
    df = pd.concat([df, df[df["slide"] == "A_b"]], ignore_index=True)  # same slide twice
    conflict = df[df["slide"] == "C_f"].copy()
    conflict["cells_per_mm2"] = 99.0
    df = pd.concat([df, conflict], ignore_index=True)
    res = compare_slides(df, timepoints=("baseline", "month6"), **FAST)
    p = res.paired.set_index("patient")
    assert p.loc["A", "n_sections_baseline"] == 1 and p.loc["A", "value_baseline"] == 10
    assert np.isnan(p.loc["C", "value_month6"])  # conflicting copies both excluded
    kinds = _kinds(res)
    assert "duplicate_row" in kinds and "conflicting_duplicate" in kinds
    # the same file under two slide names is also a duplicate
    df2 = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)})
    extra = df2[df2["slide"] == "B_b"].copy()
    extra["slide"] = "B_b_copy"
    res2 = compare_slides(pd.concat([df2, extra]), timepoints=("baseline", "month6"), **FAST)
    msg = res2.problems.loc[res2.problems["kind"] == "duplicate_row", "message"].item()
    assert "file /data/B_b.tif" in msg
    assert res2.paired.set_index("patient").loc["B", "n_sections_baseline"] == 1


def test_non_numeric_clinical_and_groups_too_small(tmp_path):
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6), "D": (9, 11), "E": (7, 8)})
    design = pd.DataFrame({"patient": ["A", "B", "C", "D", "E"],
                           "group": ["R", "R", "R", "NR", "NR"],
                           "MMT8": ["70", "65", "n.d.", "60", "55"],
                           "sex": ["F", "M", "F", "F", "M"]})
    path = tmp_path / "design.csv"
    design.to_csv(path, index=False)
    res = compare_slides(df, design=path, timepoints=("baseline", "month6"), **FAST)
    pr = res.problems
    bad = pr[pr["kind"] == "non_numeric_clinical"]
    assert bad["patient"].tolist() == ["C"] and "'n.d.'" in bad["message"].item()
    assert str(path) in bad["message"].item()
    assert "non_numeric_column" in pr["kind"].tolist()  # 'sex' is not a clinical number
    assert res.clinical == ["MMT8"]
    assert np.isnan(res.patients.set_index("patient").loc["C", "MMT8"])
    corr = res.correlations
    assert (corr["n"] == 4).all() and corr["rho"].isna().all()
    assert corr["note"].str.contains("too few patients").all()
    g = res.group_tests.iloc[0]
    assert np.isnan(g["mannwhitney_p"]) and "group too small" in g["note"]
    assert "group_too_small" in pr["kind"].tolist()
    # with a lower minimum, the test runs and equals scipy
    res2 = compare_slides(df, design=path, timepoints=("baseline", "month6"),
                          min_group_size=2, **FAST)
    g2 = res2.group_tests.iloc[0]
    assert g2["mannwhitney_p"] == pytest.approx(
        stats.mannwhitneyu([-5, -4, -6], [2, 1]).pvalue)


def test_missing_columns_raise_input_error_naming_file_and_column(tmp_path):
    df = _simple({"A": (10, 5), "B": (8, 4)}).drop(columns=["timepoint"])
    path = tmp_path / "slides.csv"
    df.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"slides\.csv: missing required column 'timepoint'"):
        compare_slides(path)
    ok = tmp_path / "ok.csv"
    _simple({"A": (10, 5), "B": (8, 4)}).to_csv(ok, index=False)
    with pytest.raises(InputError, match="missing metric column 'cells_per_100_fibers'"):
        compare_slides(ok, metrics=("cells_per_100_fibers",))
    design = tmp_path / "design.csv"
    pd.DataFrame({"subject": ["A"], "group": ["R"]}).to_csv(design, index=False)
    with pytest.raises(InputError, match=r"design\.csv: missing required column 'patient'"):
        compare_slides(ok, design=design)
    with pytest.raises(InputError, match="does not exist"):
        compare_slides(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="at least two timepoints"):
        compare_slides(_simple({"A": (10, 5)}).query("timepoint == 'baseline'"))
    with pytest.raises(SettingsError):
        compare_slides(ok, timepoints=("baseline",))
    with pytest.raises(SettingsError):
        compare_slides(ok, zero_method="median")


def test_percent_change_na_when_baseline_zero_and_zero_changes():
    df = _simple({"A": (0.0, 2.0), "B": (0.0, 0.0), "C": (4.0, 4.0), "D": (3.0, 1.0)})
    res = compare_slides(df, timepoints=("baseline", "month6"), **FAST)
    p = res.paired.set_index("patient")
    assert np.isnan(p.loc["A", "pct_change_month6"])
    assert "baseline is 0" in p.loc["A", "note"]
    assert p.loc["B", "direction_month6"] == "no change"
    assert p.loc["A", "log2fc_pseudocount"] == 0.5  # half of the smallest positive (1.0)
    assert p.loc["A", "log2fc_month6"] == pytest.approx(math.log2(2.5 / 0.5))
    st = res.stats.iloc[0]
    assert st["n_pairs"] == 4 and st["n_zero_change"] == 2
    assert np.isnan(st["wilcoxon_p"]) and "too few non-zero changes" in st["note"]
    res2 = compare_slides(df, timepoints=("baseline", "month6"), zero_method="pratt",
                          min_pairs=3, **FAST)
    d = p["change_month6"].to_numpy()
    assert res2.stats.iloc[0]["wilcoxon_p"] == pytest.approx(
        stats.wilcoxon(d, zero_method="pratt").pvalue)


def test_timepoint_order_inferred_and_case_matching():
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)})
    df.loc[df["slide"] == "A_f", "timepoint"] = "Month6"
    res = compare_slides(df, timepoints=("baseline", "month6"), **FAST)
    assert res.stats.iloc[0]["n_pairs"] == 3
    assert "timepoint_case" in _kinds(res)
    df2 = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)}).replace(
        {"timepoint": {"baseline": "week0", "month6": "week24"}})
    df2.loc[0, "timepoint"] = "week0"
    extra = pd.DataFrame([_row("A_12", "A", "week12", 7.0)])
    res2 = compare_slides(pd.concat([extra, df2], ignore_index=True), **FAST)
    assert res2.timepoints == ["week0", "week12", "week24"]
    assert "timepoint_order_inferred" in _kinds(res2)


def test_slide_level_design_supplies_patient_and_timepoint():
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)}).drop(columns=["patient",
                                                                          "timepoint"])
    design = pd.DataFrame({
        "slide": ["A_b", "A_f", "B_b", "B_f", "C_b", "C_f"],
        "patient": ["A", "A", "B", "B", "C", "C"],
        "timepoint": ["pre", "post", "pre", "post", "pre", "post"],
        "group": ["R", "R", "NR", "NR", "R", "R"], "MMT8": [70, 70, 60, 60, 65, 65]})
    res = compare_slides(df, design=design, timepoints=("pre", "post"), **FAST)
    p = res.paired.set_index("patient")
    assert p.loc["B", "change_post"] == -4 and p.loc["B", "group"] == "NR"
    assert res.patients.set_index("patient").loc["C", "MMT8"] == 65


def test_patient_not_in_design_and_non_numeric_metric_value():
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)})
    df["cells_per_mm2"] = df["cells_per_mm2"].astype(object)
    df.loc[df["slide"] == "C_f", "cells_per_mm2"] = "twelve"
    design = pd.DataFrame({"patient": ["A", "B", "Z"], "group": ["R", "NR", "R"]})
    res = compare_slides(df, design=design, timepoints=("baseline", "month6"), **FAST)
    kinds = _kinds(res)
    assert "patient_not_in_design" in kinds and "patient_without_slides" in kinds
    assert "non_numeric_value" in kinds
    p = res.paired.set_index("patient")
    assert p.loc["C", "group"] == "" and np.isnan(p.loc["C", "value_month6"])
    assert "missing in all 1 month6 section" in p.loc["C", "note"]
    mm = res.problems[res.problems["kind"] == "metric_missing"]
    assert mm["patient"].tolist() == ["C"] and mm["metric"].item() == "cells_per_mm2"


def test_parse_presence_thresholds():
    assert parse_presence_thresholds(["IL-1Ra:positive_area_pct=1", "h_score > 10"]) == (
        ("IL-1Ra", "positive_area_pct", 1.0), ("", "h_score", 10.0))
    assert parse_presence_thresholds({"positive_area_pct": 0.5}) == (
        ("", "positive_area_pct", 0.5),)
    with pytest.raises(SettingsError):
        parse_presence_thresholds(["positive_area_pct=high"])
    with pytest.raises(SettingsError):
        CompareSettings(confidence_level=1.5)


def test_all_rows_failed_raises_clear_error(tmp_path):
    df = _simple({"A": (10, 5), "B": (8, 4)})
    df["status"] = "error"
    df["error"] = "cannot open"
    path = tmp_path / "slides.csv"
    df.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"slides\.csv: no usable rows after removing failed "
                                         r"slides: all 4 row\(s\) excluded \(4 failed_slide\)"):
        compare_slides(path)


def test_empty_status_column_and_flag_columns():
    df = _simple({"A": (10, 5), "B": (8, 4), "C": (12, 6)})
    df["status"] = ""
    df["is_pyramid"] = True
    res = compare_slides(df, timepoints=("baseline", "month6"), **FAST)
    assert res.stats.iloc[0]["n_pairs"] == 3
    assert "no_status_column" in _kinds(res)
    assert res.metrics["CD163"] == ["cells_per_mm2"]
