"""Fiber recall by size, with and without the small-fiber pass (issue #3, atrophic fibers).

Scores the sections of ``validate_synthetic.py``'s grids (default seeds 11-16, 1024², the same
perturbations) and perifascicular-atrophy sections (30 % atrophic fibers, seeds 31-33) with
``score_image`` as a user runs it, once with the default settings and once with
``fibers.small_fiber_max_um=0`` (the pass off). Every complete truth fiber (not cut by the image
border) is matched at IoU >= 0.5; recall is reported per equivalent-diameter bin, together with
the unmatched truth fibers, the false complete objects and the complete-fiber count error.

Run: ``python benchmarks/validate_small_fibers.py [--seeds 11 12 13 14 15 16] [--atrophy 31 32 33]``
(about 4 min on 2 cores). Results: docs/_parts/fibers-validation.md, "Small (atrophic) fibers".
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validate_synthetic as vs  # noqa: E402

from biopsyquant import score_image  # noqa: E402
from biopsyquant.evaluate import border_labels, match_label_pairs  # noqa: E402
from biopsyquant.settings import load_settings  # noqa: E402
from biopsyquant.synthetic import generate_section  # noqa: E402

BINS = [0, 15, 20, 30, 45, 1000]
ATROPHY = {"atrophic_fraction": 0.3, "perifascicular_atrophy": True}
ATROPHY_LEVELS = (("CD163", {"cells_per_mm2": 100}), ("MHC-I", {"positive_fiber_fraction": 0.3}),
                  ("IL-1b", {"expression": 0.5}))


def section_stats(lab: np.ndarray, truth: np.ndarray, mpp: float) -> tuple[pd.DataFrame, dict]:
    """Per complete truth fiber: diameter (µm) and matched (IoU >= 0.5); section totals."""
    pairs = match_label_pairs(lab, truth)
    matched_t, matched_p = set(pairs[:, 1].tolist()), set(pairs[:, 0].tolist())
    ta = np.bincount(truth.ravel())
    ids = np.flatnonzero(ta)
    ids = ids[(ids > 0) & ~np.isin(ids, border_labels(truth))]
    preds = np.flatnonzero(np.bincount(lab.ravel()))
    preds = preds[(preds > 0) & ~np.isin(preds, border_labels(lab))]
    fibers = pd.DataFrame({"d_um": 2 * np.sqrt(ta[ids] / np.pi) * mpp,
                           "matched": [int(i) in matched_t for i in ids]})
    false = sum(int(p) not in matched_p for p in preds)
    tot = {"n_true": len(ids), "n_pred": len(preds), "missed": int((~fibers["matched"]).sum()),
           "false": false, "count_err_pct": (len(preds) - len(ids)) / max(len(ids), 1) * 100}
    return fibers, tot


def run(cases, variants) -> tuple[pd.DataFrame, pd.DataFrame]:
    fib_rows, sec_rows = [], []
    for group, marker, seed, opts in cases:
        sec = generate_section(marker=marker, seed=seed, shape=(1024, 1024), mpp=vs.MPP,
                               **{**vs.PERTURB, **opts})
        for vname, overrides in variants.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = score_image(sec.rgb, marker=marker, mpp=vs.MPP,
                                  settings=load_settings(marker, overrides=overrides))
            fibers, tot = section_stats(res.labels["fibers"], sec.fibers, vs.MPP)
            fib_rows.append(fibers.assign(group=group, variant=vname))
            sec_rows.append({"group": group, "variant": vname, "marker": marker, "seed": seed,
                             **tot})
        print(f"  {group} {marker} {seed} {opts}", flush=True)
    return pd.concat(fib_rows, ignore_index=True), pd.DataFrame(sec_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14, 15, 16])
    ap.add_argument("--atrophy", type=int, nargs="*", default=[31, 32, 33])
    args = ap.parse_args()
    cases = []
    seeds = args.seeds
    for pair in [seeds[i:i + 2] for i in range(0, len(seeds), 2)]:
        for marker, items in vs.grid(False, pair).items():
            cases += [("grids", marker, seed, lvl) for seed, lvl in items]
    for seed in args.atrophy:
        cases += [("atrophy", m, seed, {**ATROPHY, **lvl}) for m, lvl in ATROPHY_LEVELS]
    variants = {"pass on (default)": [], "pass off": ["fibers.small_fiber_max_um=0"]}
    fibers, sections = run(cases, variants)
    fibers["d_bin_um"] = pd.cut(fibers["d_um"], BINS)
    print("\nRecall of complete truth fibers by equivalent diameter (µm), IoU >= 0.5\n")
    rec = fibers.groupby(["group", "variant", "d_bin_um"], observed=True)["matched"]
    table = rec.agg(["mean", "size"]).unstack("d_bin_um")
    print(table.round(3).to_string())
    print("\nPer group: sections, count within 5 %, missed, false, mean count error\n")
    g = sections.groupby(["group", "variant"])
    summary = pd.DataFrame({
        "sections": g.size(),
        "count_within_5pct": g["count_err_pct"].apply(lambda v: int((v.abs() <= 5).sum())),
        "missed": g["missed"].sum(), "false": g["false"].sum(),
        "mean_count_err_pct": g["count_err_pct"].mean().round(2)})
    print(summary.to_string())


if __name__ == "__main__":
    main()
