"""End to end: ``biopsyquant compare`` on a synthetic cohort slides.csv with known truth.

The cohort comes from :func:`biopsyquant.compare.cohort_slides` (values written straight into a
slides.csv).  Once batch scoring of generated slides is available, ``_cohort_slides_csv`` is the
one place to swap in real scoring.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biopsyquant.cli import main
from biopsyquant.compare import cohort_slides, synthetic_cohort


def _cohort_slides_csv(folder: Path, *, seed: int = 0, overlays: bool = True):
    """Write slides.csv, design.csv (and overlays/) for a 15-patient cohort; return truth."""
    coh = synthetic_cohort(seed=seed)
    slides = cohort_slides(coh)
    # one broken slide, as every real batch has
    bad = slides.index[slides["slide"] == "P04_month6_IL-1Ra"]
    slides.loc[bad, ["status", "error"]] = ["error", "not a TIFF file"]
    slides.loc[bad, "positive_area_pct"] = np.nan
    folder.mkdir(parents=True, exist_ok=True)
    slides.to_csv(folder / "slides.csv", index=False)
    coh.design.to_csv(folder / "design.csv", index=False)
    if overlays:
        import matplotlib.image

        (folder / "overlays").mkdir(exist_ok=True)
        rgb = np.zeros((8, 8, 3), dtype=np.uint8)
        for i, s in enumerate(slides["slide"]):
            rgb[:] = (i * 7) % 255
            matplotlib.image.imsave(folder / "overlays" / f"{s}.png", rgb)
    return coh, slides


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.ids: list[str] = []
        self.stack: list[str] = []
        self.errors = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if "id" in a:
            self.ids.append(a["id"])
        if tag not in ("img", "meta", "br", "link", "hr", "input"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors += 1


def test_cli_end_to_end_directions_tables_figures_report(tmp_path, capsys):
    coh, slides = _cohort_slides_csv(tmp_path / "run")
    out = tmp_path / "cmp"
    rc = main(["compare", str(tmp_path / "run" / "slides.csv"), "--out", str(out),
               "--design", str(tmp_path / "run" / "design.csv"),
               "--timepoints", "baseline,month6",
               "--metrics", "CD163:cells_per_mm2,IL-1Ra:positive_area_pct",
               "--presence-threshold", "IL-1Ra:positive_area_pct=1",
               "--clinical", "MMT8", "--bootstrap", "500", "--seed", "3"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "report:" in cap.out and "P04_month6_IL-1Ra" in cap.err

    paired = pd.read_csv(out / "paired.csv", dtype={"patient": str})
    assert len(paired) == 30  # 15 patients x 2 markers
    truth = coh.truth.set_index(["patient", "marker"])
    for _, r in paired.iterrows():
        t = truth.loc[(r["patient"], r["marker"])]
        if r["patient"] == "P04" and r["marker"] == "IL-1Ra":
            assert pd.isna(r["direction_month6"]) and "failed_slide" in r["note"]  # "NA"
            continue
        assert r["direction_month6"] == t["direction_month6"], r["patient"]
        assert np.sign(r["change_month6"]) == (1 if t["direction_month6"] == "increase" else -1)
        assert r["value_month6"] == pytest.approx(t["value_month6"], abs=1e-5)

    stats_t = pd.read_csv(out / "stats.csv")
    cd = stats_t[(stats_t["metric"] == "cells_per_mm2") & (stats_t["subset"] == "responder")]
    assert cd["n_decrease"].item() == 7 and cd["median_change"].item() < 0
    il = stats_t[(stats_t["marker"] == "IL-1Ra") & (stats_t["subset"] == "all")]
    assert il["n_pairs"].item() == 14 and il["n_unpaired"].item() == 1
    presence = pd.read_csv(out / "presence.csv").set_index("timepoint")
    # P04 (a responder) lost its follow-up slide: 6/6 responders remain
    assert presence.loc["month6", "counts"] == "responder 6/6 vs non-responder 3/8"
    problems = pd.read_csv(out / "problems.csv", keep_default_na=False)
    assert {"failed_slide", "unpaired_patient"} <= set(problems["kind"])
    assert (out / "group_tests.csv").is_file() and (out / "correlations.csv").is_file()
    assert (out / "excluded.csv").is_file() and (out / "provenance.json").is_file()

    figs = out / "figures"
    for stem in ("slope_CD163_cells_per_mm2", "change_CD163_cells_per_mm2",
                 "slope_IL-1Ra_positive_area_pct", "change_IL-1Ra_positive_area_pct",
                 "corr_CD163_cells_per_mm2_MMT8", "corr_IL-1Ra_positive_area_pct_MMT8"):
        for ext in ("png", "svg"):
            f = figs / f"{stem}.{ext}"
            assert f.is_file() and f.stat().st_size > 5000, f
        assert (figs / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html = (out / "report.html").read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(html)
    assert parser.errors == 0 and not parser.stack
    # self-contained: every image is a data URI (6 figures + one overlay per used slide)
    assert all(s.startswith("data:image/") for s in parser.imgs)
    n_used = int((slides["status"] == "ok").sum())
    assert len(parser.imgs) == 6 + n_used
    assert "problems" in parser.ids
    assert "P04_month6_IL-1Ra" in html and "not a TIFF file" in html
    assert "responder 6/6 vs non-responder 3/8" in html
    prov = re.search(r"SHA-256 <code>([0-9a-f]{64})</code>", html)
    import hashlib

    assert prov and prov.group(1) == hashlib.sha256(
        (tmp_path / "run" / "slides.csv").read_bytes()).hexdigest()
    assert "zero_method=&#x27;wilcox&#x27;" in html or "zero_method='wilcox'" in html


def test_cli_strict_links_overlays_and_errors(tmp_path, capsys):
    _cohort_slides_csv(tmp_path / "run")
    out = tmp_path / "cmp"
    rc = main(["compare", str(tmp_path / "run" / "slides.csv"), "--out", str(out),
               "--design", str(tmp_path / "run" / "design.csv"), "--no-figures",
               "--overlays", "link", "--strict", "--bootstrap", "0",
               "--metrics", "cells_per_mm2"])
    assert rc == 1  # a failed slide is an error-level data problem
    html = (out / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert srcs and all(not s.startswith("data:") for s in srcs)
    for s in srcs:
        assert (out / s).resolve().is_file()
    assert "order inferred" in html  # --timepoints not given
    capsys.readouterr()
    # a missing column: one-line error naming file and column, exit status 2, no traceback
    bad = tmp_path / "bad.csv"
    pd.read_csv(tmp_path / "run" / "slides.csv").drop(columns=["marker"]).to_csv(bad,
                                                                                 index=False)
    rc = main(["compare", str(bad), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.csv: missing required column 'marker'" in err
    assert "Traceback" not in err


def test_three_timepoints_batch_style_overlay_column_report(tmp_path):
    from biopsyquant.compare import compare_slides, write_report

    coh = synthetic_cohort(n_responders=4, n_nonresponders=4, seed=2,
                           timepoints=("baseline", "month6", "month12"))
    slides = cohort_slides(coh)
    run = tmp_path / "run"
    (run / "overlays").mkdir(parents=True)
    import matplotlib.image

    # batch writes an `overlay` column relative to slides.csv; one file is missing
    slides["overlay"] = [f"overlays/{s}.png" for s in slides["slide"]]
    for s in slides["slide"].iloc[1:]:
        matplotlib.image.imsave(run / "overlays" / f"{s}.png", np.zeros((4, 4, 3), np.uint8))
    slides.to_csv(run / "slides.csv", index=False)
    res = compare_slides(run / "slides.csv", design=coh.design, n_bootstrap=100,
                         metrics=("cells_per_mm2", "positive_area_pct"),
                         clinical_columns=("MMT8",))
    assert res.timepoints == ["baseline", "month6", "month12"]  # inferred
    assert len(res.overlays) == len(slides) - 1
    kinds = set(res.problems["kind"])
    assert {"multiple_timepoints", "overlay_missing", "timepoint_order_inferred"} <= kinds
    assert set(res.stats["contrast"]) == {"month6 vs baseline", "month12 vs baseline"}
    truth = coh.truth.set_index(["patient", "marker"])
    for _, r in res.paired.iterrows():
        for tp in ("month6", "month12"):
            assert r[f"direction_{tp}"] == truth.loc[(r["patient"], r["marker"]),
                                                     f"direction_{tp}"]
    m12 = res.stats[(res.stats["contrast"] == "month12 vs baseline")
                    & (res.stats["metric"] == "cells_per_mm2") & (res.stats["subset"] == "all")]
    d = res.paired.loc[res.paired["metric"] == "cells_per_mm2", "change_month12"]
    from scipy import stats as sps

    assert m12["wilcoxon_p"].item() == pytest.approx(sps.wilcoxon(d).pvalue)
    out = tmp_path / "cmp"
    report = write_report(res, out, figure_metrics=["CD163:cells_per_mm2"],
                          figure_formats=("png",))
    html = report.read_text(encoding="utf-8")
    assert "every later timepoint is compared with the baseline" in html
    assert "no overlay" in html  # the missing one is shown as such
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["change_CD163_cells_per_mm2.png", "corr_CD163_cells_per_mm2_MMT8.png",
                    "slope_CD163_cells_per_mm2.png"]
    # the change figure has one panel per contrast, the correlation one baseline + 2 changes
    import matplotlib.image as mi

    w_change = mi.imread(out / "figures" / "change_CD163_cells_per_mm2.png").shape[1]
    w_corr = mi.imread(out / "figures" / "corr_CD163_cells_per_mm2_MMT8.png").shape[1]
    assert w_change > 900 and w_corr > 1500
