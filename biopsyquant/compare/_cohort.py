"""A synthetic pre/post trial cohort with known truth, for tests, docs and demos.

Modelled on the anakinra myositis study (Zong et al., Ann Rheum Dis 2014): responders and
non-responders biopsied at baseline and month 6, CD163+ macrophage density that falls in
responders, IL-1Ra present after treatment in all responders but only some non-responders, and
a muscle-performance score (MMT8) that is inversely related to baseline CD163 density.

The cohort is built in two stages so the second can be replaced by real scoring of generated
slides once batch scoring exists:

1. :func:`synthetic_cohort` draws the *true* biopsy-level values (``truth``) and the design.
2. :func:`cohort_slides` turns the truth into a ``slides.csv``-shaped table (replicate sections
   scatter symmetrically around the truth so that their mean equals the truth to rounding, 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SyntheticCohort:
    """Truth and design of a synthetic cohort.

    Attributes
    ----------
    truth : DataFrame
        patient, group, marker, metric, ``value_<tp>`` per timepoint, ``n_sections_<tp>``,
        ``direction_<tp>`` (``increase``/``decrease``) for every later timepoint.
    design : DataFrame
        patient, group, MMT8 (manual muscle test, 0–80, month 6), age_years.
    timepoints : tuple of str
    """

    truth: pd.DataFrame
    design: pd.DataFrame
    timepoints: tuple[str, ...]


def synthetic_cohort(*, n_responders: int = 7, n_nonresponders: int = 8,
                     timepoints: tuple[str, ...] = ("baseline", "month6"), seed: int = 0,
                     replicate_fraction: float = 0.3,
                     nonresponders_il1ra_present: int = 3) -> SyntheticCohort:
    """Draw a cohort whose true direction of change is known per patient and metric.

    Responders: CD163 density falls by 30–70 % at every later timepoint; IL-1Ra positive area
    rises above 1.5 % (present).  Non-responders: CD163 rises by 10–60 %, except one patient
    whose density falls slightly (10 %); IL-1Ra rises above 1.5 % in
    ``nonresponders_il1ra_present`` of them and stays below 0.9 % in the others (one of which
    falls).  MMT8 (0–80, higher = stronger) = 110 - 10·ln(baseline CD163 /mm²) + N(0, 2.5²), rounded.
    """
    rng = np.random.default_rng(seed)
    n = n_responders + n_nonresponders
    pats = [f"P{i + 1:02d}" for i in range(n)]
    groups = ["responder"] * n_responders + ["non-responder"] * n_nonresponders
    follow = list(timepoints[1:])
    rows = []
    design = []
    nr_present = set(range(n_responders, n_responders + nonresponders_il1ra_present))
    for i, (pid, grp) in enumerate(zip(pats, groups, strict=True)):
        resp = grp == "responder"
        cd0 = float(np.round(rng.lognormal(np.log(90.0), 0.45), 2))
        il0 = float(np.round(rng.uniform(0.15, 0.8), 3))
        cd_vals = [cd0]
        il_vals = [il0]
        for k, _ in enumerate(follow, start=1):
            if resp:
                f_cd = rng.uniform(0.3, 0.7) ** (1.0 / k) if k > 1 else rng.uniform(0.3, 0.7)
                il = rng.uniform(1.5, 6.0)
            else:
                f_cd = 0.9 if i == n - 1 else rng.uniform(1.1, 1.6)
                if i in nr_present:
                    il = rng.uniform(1.5, 3.0)
                elif i == n - 2:
                    il = il0 * 0.5
                else:
                    il = rng.uniform(il0 + 0.02, 0.9)
            cd_vals.append(float(np.round(cd0 * f_cd, 2)))
            il_vals.append(float(np.round(il, 3)))
        n_sec = [2 if rng.random() < replicate_fraction else 1 for _ in timepoints]
        for marker, metric, vals in (("CD163", "cells_per_mm2", cd_vals),
                                     ("IL-1Ra", "positive_area_pct", il_vals)):
            rec = {"patient": pid, "group": grp, "marker": marker, "metric": metric}
            for tp, v, ns in zip(timepoints, vals, n_sec, strict=True):
                rec[f"value_{tp}"] = v
                rec[f"n_sections_{tp}"] = ns
            for tp, v in zip(follow, vals[1:], strict=True):
                rec[f"direction_{tp}"] = "increase" if v > vals[0] else "decrease"
            rows.append(rec)
        mmt8 = float(np.clip(np.round(110.0 - 10.0 * np.log(cd0) + rng.normal(0, 2.5)), 0, 80))
        design.append({"patient": pid, "group": grp, "MMT8": mmt8,
                       "age_years": int(rng.integers(35, 75))})
    return SyntheticCohort(truth=pd.DataFrame(rows), design=pd.DataFrame(design),
                           timepoints=tuple(timepoints))


def cohort_slides(cohort: SyntheticCohort, *, seed: int = 1) -> pd.DataFrame:
    """A ``slides.csv``-shaped table whose biopsy means equal ``cohort.truth`` (to 1e-6).

    One row per section: ``slide, path, patient, timepoint, marker, status, error, mpp,
    mpp_source, tissue_area_mm2, n_fibers`` and the marker's summary columns.  With two sections
    the values are ``v·(1 ± e)`` (e up to 15 %), so the mean is ``v``.  CD163 secondary columns
    (counts, per 100 fibers, compartments) and IL-1Ra secondary columns (H-score, mean OD) are
    derived consistently from the truth.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _, t in cohort.truth.iterrows():
        for tp in cohort.timepoints:
            v = float(t[f"value_{tp}"])
            ns = int(t[f"n_sections_{tp}"])
            e = rng.uniform(0.03, 0.15)
            vals = [v] if ns == 1 else [v * (1 + e), v * (1 - e)]
            for s, val in enumerate(vals, start=1):
                slide = f"{t['patient']}_{tp}_{t['marker']}" + (f"_s{s}" if ns > 1 else "")
                area = float(np.round(rng.uniform(3.0, 9.0), 3))
                fibers = int(area * rng.uniform(250, 400))
                rec = {"slide": slide, "path": f"slides/{slide}.tif", "patient": t["patient"],
                       "timepoint": tp, "marker": t["marker"], "status": "ok", "error": "",
                       "mpp": 0.5, "mpp_source": "svs", "tissue_area_mm2": area,
                       "n_fibers": fibers}
                if t["marker"] == "CD163":
                    cells = int(round(val * area))
                    dens = float(val)
                    rec.update({"cells_positive": cells, "cells_per_mm2": round(dens, 6),
                                "cells_per_100_fibers": round(100.0 * cells / fibers, 3),
                                "cells_per_mm2_endomysial": round(dens * 0.55, 4),
                                "cells_per_mm2_perimysial": round(dens * 0.25, 4),
                                "cells_per_mm2_perivascular": round(dens * 0.20, 4),
                                "h_score_cells": round(min(300.0, 150 + dens / 4), 2)})
                else:
                    pa = float(val)
                    rec.update({"positive_area_pct": round(pa, 6),
                                "weak_area_pct": round(pa * 0.6, 6),
                                "moderate_area_pct": round(pa * 0.3, 6),
                                "strong_area_pct": round(pa * 0.1, 6),
                                "h_score": round(pa * 0.6 + 2 * pa * 0.3 + 3 * pa * 0.1, 6),
                                "dab_mean_od": round(0.05 + 0.01 * pa, 5),
                                "positive_area_pct_fibers": round(pa * 0.7, 6),
                                "positive_area_pct_interstitium": round(pa * 1.8, 6)})
                out.append(rec)
    return pd.DataFrame(out)
