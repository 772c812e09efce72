"""Regenerate the example comparison report whose figures are committed in this folder.

A synthetic cohort modelled on the anakinra myositis trial (15 patients: 7 responders,
8 non-responders; biopsies at baseline and month 6; CD163+ macrophage density and IL-1Ra
positive area; MMT8 muscle score), written as a ``slides.csv`` + ``design.csv`` and compared with
the ``biopsyquant compare`` command.  One replicate section is marked as a failed slide to show
how the report lists it.

    python docs/example_report/make_example_report.py [WORKDIR]

writes ``WORKDIR/slides.csv``, ``WORKDIR/design.csv`` and the report in ``WORKDIR/report/``
(default WORKDIR: a temporary folder), then copies the PNG figures and the small CSV tables
next to this script.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from biopsyquant.cli import main
from biopsyquant.compare import cohort_slides, synthetic_cohort

HERE = Path(__file__).resolve().parent


def run(work: Path) -> Path:
    coh = synthetic_cohort(seed=0)
    slides = cohort_slides(coh, seed=1)
    # one replicate section of a two-section biopsy failed to scan properly
    two = slides[slides["slide"].str.endswith("_s2") & (slides["marker"] == "CD163")]
    failed = two["slide"].iloc[0]
    i = slides.index[slides["slide"] == failed][0]
    slides.loc[i, ["status", "error"]] = ["error", "TIFF truncated: tile 212 unreadable"]
    for c in ("cells_positive", "cells_per_mm2", "cells_per_100_fibers"):
        slides.loc[i, c] = float("nan")
    work.mkdir(parents=True, exist_ok=True)
    slides.to_csv(work / "slides.csv", index=False)
    coh.design[["patient", "group", "MMT8"]].to_csv(work / "design.csv", index=False)
    out = work / "report"
    rc = main(["compare", str(work / "slides.csv"), "--design", str(work / "design.csv"),
               "--out", str(out), "--timepoints", "baseline,month6",
               "--metrics", "CD163:cells_per_mm2,IL-1Ra:positive_area_pct",
               "--presence-threshold", "IL-1Ra:positive_area_pct=1",
               "--bootstrap", "2000", "--seed", "0"])
    if rc != 0:
        raise SystemExit(rc)
    return out


if __name__ == "__main__":
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    out = run(work)
    for old in HERE.glob("*.png"):
        old.unlink()
    for png in sorted((out / "figures").glob("*.png")):
        shutil.copy2(png, HERE / png.name)
    for name in ("paired.csv", "stats.csv", "group_tests.csv", "presence.csv",
                 "correlations.csv", "problems.csv"):
        shutil.copy2(out / name, HERE / name)
    print(f"report: {out / 'report.html'}; figures and tables copied to {HERE}")
