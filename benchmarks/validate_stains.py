"""Stain-vector estimation on generated sections: angle errors and IL-1 H-score, before/after.

Every section is rendered by :func:`biopsyquant.synthetic.generate_section` with
``shape=(768, 768), mpp=0.5, illumination=0.1, jpeg_quality=85`` and stain-vector jitter
``vector_jitter_deg`` in {0, 3, 8} (each vector rotated by that angle about a random axis), for
the markers IL-1a / IL-1b / IL-1Ra (expression 0.2 / 0.5 / 0.8), CD163, MHC-I and an H&E
section (estimated with ``base="H-E"``; the "DAB" columns are then eosin) and several tissue
seeds. For each section and each estimator *variant* (keyword arguments of
:func:`biopsyquant.stains.estimate_stains`) it reports

* the angle (degrees) between the estimated and the true (``sec.stain_model``) hematoxylin and
  DAB vectors, next to the angle of the H-DAB preset;
* for IL-1 sections, the end-to-end pixel H-score of ``score_image(rgb, marker, mpp=0.5,
  stain_model=<estimate>)`` against the truth computed on the true DAB map over the true tissue
  (thresholds 0.2 / 0.4 / 0.6 OD, as ``tests/test_e2e_accuracy.py::_truth_pixels``).

The estimate is made as ``score_image`` makes it (``estimate_background(rgb)`` then
``estimate_stains(rgb, base="H-DAB", background=...)`` on the whole image) and passed in, so
only the stain step differs between variants.

Variants: ``before`` = the previous estimator (extremes over every pixel with total OD >=
``od_min``: ``confident_od=0``, no minimum of confident pixels); ``after`` = the defaults;
``true`` = reference, the true vectors with the estimated background (what a perfect vector
estimate would give downstream).
Extra variants for exploration: ``--variant name:key=value,key=value``.

Usage::

    python benchmarks/validate_stains.py [--seeds 11 12] [--cache DIR] [--no-score]

The full grid (72 sections, 3 variants, 162 ``score_image`` calls) took 400 s on a loaded
2-core machine with the sections cached; rendering them adds ~3 min. ``--cache`` keeps the
rendered sections (~1.7 MB each) for re-runs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from biopsyquant.score import score_image
from biopsyquant.stains import PRESETS, StainModel, estimate_background, estimate_stains
from biopsyquant.synthetic import generate_section

MPP = 0.5
SHAPE = (768, 768)
PERTURB = {"illumination": 0.10, "jpeg_quality": 85}
JITTERS = (0.0, 3.0, 8.0)
IL1 = ("IL-1a", "IL-1b", "IL-1Ra")
HIGH_DAB = ("CD163", "MHC-I")
HE = ("HE",)  # H&E section: hematoxylin + eosin, estimated with base="H-E"
EXPRESSIONS = (0.2, 0.5, 0.8)
THRESH = (0.2, 0.4, 0.6)
VARIANTS = {
    "before": {"confident_od": 0.0, "min_confident_pixels": 0},
    "after": {},
    "true": {},
}


def angle_deg(a, b) -> float:
    """Angle in degrees between two vectors."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def truth_h_score(dab_od: np.ndarray, tissue: np.ndarray) -> tuple[float, float]:
    """Positive area % and pixel H-score of the true DAB map over the true tissue."""
    v = dab_od[tissue]
    w = np.mean((v >= THRESH[0]) & (v < THRESH[1])) * 100
    m = np.mean((v >= THRESH[1]) & (v < THRESH[2])) * 100
    s = np.mean(v >= THRESH[2]) * 100
    return float(w + m + s), float(w + 2 * m + 3 * s)


def grid(seeds) -> list[tuple[str, int, float, float | None]]:
    """(marker, seed, jitter, expression) of every section."""
    out = []
    for marker in IL1 + HIGH_DAB + HE:
        for seed in seeds:
            for j in JITTERS:
                for e in (EXPRESSIONS if marker in IL1 else (None,)):
                    out.append((marker, seed, j, e))
    return out


def load_section(marker, seed, jitter, expression, cache: Path | None) -> dict:
    """Rendered RGB, true stain model and truth H-score (from ``cache`` when present)."""
    f = None
    if cache is not None:
        f = cache / f"{marker}_{seed}_{jitter:g}_{expression}.npz"
        if f.exists():
            d = np.load(f)
            return {"rgb": d["rgb"], "vec": d["vec"], "area": float(d["area"]),
                    "h": float(d["h"])}
    kw = {} if expression is None else {"expression": expression}
    sec = generate_section(marker=marker, seed=seed, shape=SHAPE, mpp=MPP,
                           vector_jitter_deg=jitter, **PERTURB, **kw)
    area, h = truth_h_score(sec.dab_od, sec.tissue)
    d = {"rgb": sec.rgb, "vec": np.asarray(sec.stain_model.vectors), "area": area, "h": h}
    if f is not None:
        np.savez(f, **d)
    return d


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, kwargs)."""
    name, _, rest = text.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        kw[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
    return name, kw


def run(seeds, variants: dict, cache: Path | None, score: bool) -> pd.DataFrame:
    rows = []
    for marker, seed, j, e in grid(seeds):
        d = load_section(marker, seed, j, e, cache)
        rgb, true = d["rgb"], d["vec"]
        base = "H-E" if marker in HE else "H-DAB"
        ref = PRESETS[base].vectors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bg = estimate_background(rgb)
        for name, kw in variants.items():
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "true":  # reference: the true vectors with the estimated background
                    model = StainModel(PRESETS[base].names, true[:2], bg, "true")
                else:
                    model = estimate_stains(rgb, base=base, background=bg, **kw)
            t_est = time.perf_counter() - t0
            row = {"marker": marker, "seed": seed, "jitter": j, "expression": e,
                   "variant": name, "err_h_deg": angle_deg(model.vectors[0], true[0]),
                   "err_dab_deg": angle_deg(model.vectors[1], true[1]),
                   "preset_err_h_deg": angle_deg(ref[0], true[0]),
                   "preset_err_dab_deg": angle_deg(ref[1], true[1]),
                   "estimate_s": t_est, "source": model.source}
            if score and marker in IL1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = score_image(rgb, marker=marker, mpp=MPP, stain_model=model)
                row.update(h_true=d["h"], h=res.summary["h_score"],
                           h_err_pct=(res.summary["h_score"] / d["h"] - 1) * 100,
                           area_true=d["area"], area=res.summary["positive_area_pct"],
                           area_err_pts=res.summary["positive_area_pct"] - d["area"])
            rows.append(row)
        print(f"{marker} seed {seed} jitter {j:g} expr {e}: " + "; ".join(
            f"{r['variant']} H {r['err_h_deg']:.1f} D {r['err_dab_deg']:.1f}"
            + (f" h {r['h_err_pct']:+.1f}%" if "h_err_pct" in r else "")
            for r in rows[-len(variants):]), file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> str:
    """Markdown tables: angle errors by marker group and jitter; IL-1 H-score errors."""
    lines = []
    df = df.copy()
    df["group"] = np.where(df["marker"].isin(IL1), "IL-1 (" + df["expression"].astype(str)
                           + ")", df["marker"])
    agg = (df[df["variant"] != "true"].groupby(["group", "jitter", "variant"])
             .agg(n=("err_dab_deg", "size"), h_mean=("err_h_deg", "mean"),
                  h_max=("err_h_deg", "max"), dab_mean=("err_dab_deg", "mean"),
                  dab_max=("err_dab_deg", "max"), preset_dab=("preset_err_dab_deg", "mean"))
             .reset_index())
    lines += ["### Angle to the true vectors (degrees; for HE the DAB columns are eosin)", "",
              "| sections | jitter ° | variant | n | H mean | H max | DAB mean | DAB max "
              "| preset DAB mean |", "|---|---|---|---|---|---|---|---|---|"]
    for r in agg.itertuples():
        lines.append(f"| {r.group} | {r.jitter:g} | {r.variant} | {r.n} | {r.h_mean:.2f} | "
                     f"{r.h_max:.2f} | {r.dab_mean:.2f} | {r.dab_max:.2f} | {r.preset_dab:.2f} |")
    if "h_err_pct" in df:
        il = df[df["marker"].isin(IL1)].copy()
        il["abs_h"] = il["h_err_pct"].abs()
        il["abs_a"] = il["area_err_pts"].abs()
        g = (il.groupby(["expression", "variant"])
               .agg(n=("abs_h", "size"), h_true=("h_true", "mean"), mean=("h_err_pct", "mean"),
                    mean_abs=("abs_h", "mean"), worst=("abs_h", "max"),
                    area_worst=("abs_a", "max"))
               .reset_index())
        lines += ["", "### IL-1 pixel H-score vs truth on the true DAB map", "",
                  "| expression | variant | n | mean true H | mean err % | mean abs err % "
                  "| worst abs err % | worst abs area err (pts) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in g.itertuples():
            lines.append(f"| {r.expression:g} | {r.variant} | {r.n} | {r.h_true:.2f} | "
                         f"{r.mean:+.1f} | {r.mean_abs:.1f} | {r.worst:.1f} | "
                         f"{r.area_worst:.2f} |")
        tot = il.groupby("variant").agg(worst=("abs_h", "max"), mean_abs=("abs_h", "mean"),
                                        n_over_10=("abs_h", lambda v: int((v > 10).sum())))
        lines += ["", "| variant | all IL-1: mean abs err % | worst abs err % | sections > 10 % |",
                  "|---|---|---|---|"]
        for name, r in tot.iterrows():
            lines.append(f"| {name} | {r.mean_abs:.1f} | {r.worst:.1f} | {int(r.n_over_10)} |")
    src = df.groupby(["variant"])["source"].agg(lambda s: s.str.split(" ").str[0]
                                                .value_counts().to_dict())
    lines += ["", "Sources: " + "; ".join(f"{k}: {v}" for k, v in src.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder keeping rendered sections between runs")
    ap.add_argument("--no-score", action="store_true", help="angles only (no score_image)")
    ap.add_argument("--variant", action="append", default=[],
                    help="extra variant name:key=value,... (estimate_stains keywords)")
    ap.add_argument("--only", nargs="+", default=None, help="variants to run (default all)")
    ap.add_argument("--csv", type=Path, default=None, help="write the per-section table")
    args = ap.parse_args(argv)
    variants = dict(VARIANTS)
    variants.update(parse_variant(v) for v in args.variant)
    if args.only:
        variants = {k: variants[k] for k in args.only}
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    df = run(args.seeds, variants, args.cache, not args.no_score)
    if args.csv is not None:
        df.to_csv(args.csv, index=False)
    print(summarize(df))
    print(f"\n{len(df)} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
