"""MHC-I and IL-1 scores on generated sections: truth, perturbations and staining batches.

Every section comes from :func:`biopsyquant.synthetic.generate_section` with stain-vector
jitter, uneven illumination and JPEG (q85), and is scored with a per-slide stain estimate
(``prepare_stain_model``), as ``score_image`` does.

* measure level: the analysis runs on the truth fiber labels and compartments, so the numbers
  isolate this module (rim / interior scoring, pixel classes) from fiber segmentation;
* end to end: ``score_image`` with the project's own tissue, fiber and compartment steps;
* batches: the same tissue (``seed``) re-rendered as another staining batch (``batch_seed``,
  vectors rotated 4°, other illumination, background and DAB strength) must give the same
  scores within the tolerances.

Run with ``-s`` to print the tables recorded in docs/_parts/mhc-validation.md and
pixels-validation.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from biopsyquant import mhc, pixels
from biopsyquant.score import ImageContext, prepare_stain_model, score_image
from biopsyquant.settings import load_settings
from biopsyquant.stains import deconvolve

synthetic = pytest.importorskip("biopsyquant.synthetic")

#: generating ~14 sections takes about a minute on a loaded 2-core machine
pytestmark = pytest.mark.slow

MPP = 0.5
SHAPE = (768, 768)
PERTURB = {"vector_jitter_deg": 3.0, "illumination": 0.1, "jpeg_quality": 85}
#: a second staining batch of the same tissue
BATCH2 = {"batch_seed": 1001, "vector_jitter_deg": 4.0, "illumination": 0.1,
          "jpeg_quality": 85, "dab_strength": 1.0}


def section(marker, seed, **kw):
    opts = dict(PERTURB)
    opts.update(kw)
    return synthetic.generate_section(marker=marker, seed=seed, shape=SHAPE, mpp=MPP, **opts)


def truth_context(sec, marker) -> ImageContext:
    """ImageContext on the truth fibers/compartments with a per-slide stain estimate."""
    settings = load_settings(marker)
    model = prepare_stain_model(sec.rgb, settings, tissue=sec.tissue)
    od = deconvolve(sec.rgb, model)
    ft = sec.fiber_truth
    ftab = pd.DataFrame({"fiber_id": ft["id"].astype(np.int32), "x_px": ft["x_px"],
                         "y_px": ft["y_px"]})
    shape = sec.rgb.shape[:2]
    return ImageContext(rgb=sec.rgb, mpp=MPP, size_mpp=MPP, stain_model=model,
                        hema_od=od[..., 0], dab_od=od[..., 1], tissue=sec.tissue,
                        excluded=np.zeros(shape, bool), analysed=sec.tissue,
                        fibers=sec.fibers, fiber_table=ftab, compartments=sec.compartments,
                        settings=settings)


def mhc_measure(sec):
    ctx = truth_context(sec, "MHC-I")
    meas = mhc.measure(ctx)
    fib = ctx.fiber_table.merge(meas.fibers, on="fiber_id", how="left")
    sm = mhc.summarize(cells=meas.cells, fibers=fib, counts=meas.counts, mpp=MPP,
                       settings=ctx.settings, areas_mm2={})
    return fib, sm


def pixel_measure(sec, marker):
    ctx = truth_context(sec, marker)
    meas = pixels.measure(ctx)
    area = float(sec.tissue.sum()) * (MPP * 1e-3) ** 2
    return pixels.summarize(cells=meas.cells, fibers=pd.DataFrame(), counts=meas.counts,
                            mpp=MPP, settings=ctx.settings,
                            areas_mm2={"analysed_area_mm2": area})


def vessel_mask(sec) -> np.ndarray:
    """Truth capillaries and vessels (discs at their centres) plus the vessel compartment."""
    import cv2

    m = (sec.compartments == 4).astype(np.uint8)
    for _, v in sec.vessels.iterrows():
        r = max(1, int(round(v["diameter_um"] / 2 / MPP)))
        cv2.circle(m, (int(round(v["x_px"])), int(round(v["y_px"]))), r, 1, -1)
    return m.astype(bool)


# ----------------------------------------------------------------------------- MHC-I
FRACTIONS = (0.0, 0.1, 0.3, 0.6, 0.9)


@pytest.fixture(scope="module")
def mhc_series():
    return {f: section("MHC-I", seed=20 + i, positive_fiber_fraction=f)
            for i, f in enumerate(FRACTIONS)}


def test_mhc_percent_positive_within_5_points(mhc_series):
    rows = []
    for f, sec in mhc_series.items():
        fib, sm = mhc_measure(sec)
        truth = sec.summary["positive_fiber_pct"]
        ft = sec.fiber_truth.set_index("id")
        scored = fib[fib["mhc_scored"].astype(bool)]
        agree = (scored["mhc_positive"].astype(bool).to_numpy()
                 == ft.loc[scored["fiber_id"], "positive"].to_numpy()).mean()
        grade_agree = (scored["mhc_grade"].astype(int).to_numpy()
                       == ft.loc[scored["fiber_id"], "grade"].to_numpy()).mean()
        rows.append((f, truth, sm["fibers_positive_pct"], agree, grade_agree,
                     sm["mhc_grade_0_5"], sm["capillary_dab_od"]))
        assert abs(sm["fibers_positive_pct"] - truth) <= 5.0, (f, truth, sm)
        assert sm["fibers_scored"] >= 0.95 * len(ft)
        assert agree >= 0.95
        assert sm["control_ok"]
    print("\nMHC-I measure level (truth fibers), jitter 3°, illumination 0.1, JPEG 85")
    print(pd.DataFrame(rows, columns=["fraction", "truth_pct", "measured_pct", "call_agreement",
                                      "grade_agreement", "grade_0_5", "capillary_od"]))


def test_mhc_spearman_with_true_expression(mhc_series):
    meas = [mhc_measure(sec)[1]["fibers_positive_pct"] for sec in mhc_series.values()]
    truth = [sec.summary["positive_fiber_pct"] for sec in mhc_series.values()]
    rho = spearmanr(meas, truth).statistic
    assert rho >= 0.95


def test_mhc_capillaries_never_positive_fibers_end_to_end(mhc_series):
    """score_image end to end: no positive fiber lies on a truth capillary or vessel, and
    fibers that match a truth fiber get the truth call."""
    sec = mhc_series[0.3]
    res = score_image(sec.rgb, marker="MHC-I", mpp=MPP)
    seg = res.labels["fibers"]
    ves = vessel_mask(sec)
    fib = res.fibers
    pos_ids = fib.loc[fib["mhc_positive"].fillna(False).astype(bool), "fiber_id"].to_numpy()
    for fid in pos_ids:
        m = seg == fid
        assert (m & ves).sum() <= 0.1 * m.sum(), f"positive fiber {fid} lies on a vessel"
    # the largest truth-fiber overlap of each segmented fiber
    ft = sec.fiber_truth.set_index("id")
    agree, n = 0, 0
    for _, row in fib[fib["mhc_scored"].astype(bool)].iterrows():
        m = seg == row["fiber_id"]
        t = np.bincount(sec.fibers[m], minlength=2)
        tid = int(t[1:].argmax()) + 1
        if t[tid] < 0.7 * m.sum() or t[tid] < 0.5 * (sec.fibers == tid).sum():
            continue
        n += 1
        agree += bool(row["mhc_positive"]) == bool(ft.loc[tid, "positive"])
    print(f"\nMHC-I end to end: {len(fib)} fibers segmented, {n} match a truth fiber, call "
          f"agreement {agree / max(n, 1):.3f}; slide % positive "
          f"{res.summary['fibers_positive_pct']:.1f} vs truth "
          f"{sec.summary['positive_fiber_pct']:.1f}")
    assert n >= 0.5 * len(ft)
    assert agree >= 0.95 * n


def test_mhc_staining_batch_robustness(mhc_series):
    rows = []
    for f in (0.1, 0.6):
        a = mhc_series[f]
        b = section("MHC-I", seed=a.params["seed"], positive_fiber_fraction=f, **BATCH2)
        (_, sa), (_, sb) = mhc_measure(a), mhc_measure(b)
        truth = a.summary["positive_fiber_pct"]
        rows.append((f, truth, sa["fibers_positive_pct"], sb["fibers_positive_pct"]))
        assert abs(sb["fibers_positive_pct"] - truth) <= 5.0
        assert abs(sb["fibers_positive_pct"] - sa["fibers_positive_pct"]) <= 5.0
    print("\nMHC-I staining batches (same tissue):")
    print(pd.DataFrame(rows, columns=["fraction", "truth_pct", "batch_A_pct", "batch_B_pct"]))


# ----------------------------------------------------------------------------- IL-1
EXPRESSIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
MARKERS = ("IL-1a", "IL-1b", "IL-1Ra", "IL-1Ra", "IL-1b")


@pytest.fixture(scope="module")
def il1_series():
    return [(m, e, section(m, seed=40 + i, expression=e))
            for i, (m, e) in enumerate(zip(MARKERS, EXPRESSIONS, strict=True))]


def _check_pixels(sm, truth, h_tol=0.10):
    tp, th = truth["positive_area_pct"], truth["h_score"]
    assert abs(sm["positive_area_pct"] - tp) <= 3.0
    assert abs(sm["h_score"] - th) <= max(h_tol * th, 1.0)


#: JPEG q85 (4:2:0) smooths the fine (~1 µm) granular IL-1 texture of the generator: the true
#: map's pixel-level spread is partly lost, which moves pixels from the moderate/strong tiers
#: down and lowers the H-score by 5-11 % (positive area is not affected). H-score is held to
#: 10 % without JPEG and to 15 % with it.
H_TOL_JPEG = 0.15


def test_il1_area_and_hscore_against_true_map(il1_series):
    rows = []
    for m, e, sec in il1_series:
        sm = pixel_measure(sec, m)
        t = sec.summary
        rows.append((m, e, t["positive_area_pct"], sm["positive_area_pct"], t["h_score"],
                     sm["h_score"], t["fiber_positive_area_pct"], sm["positive_area_pct_fibers"],
                     t["interstitium_positive_area_pct"], sm["positive_area_pct_interstitium"],
                     t["n_positive_capillaries"], sm["positive_capillaries"]))
    tab = pd.DataFrame(rows, columns=["marker", "expression", "truth_pos", "pos", "truth_H",
                                      "H", "truth_pos_fib", "pos_fib", "truth_pos_int",
                                      "pos_int", "truth_caps", "caps"])
    tab["H_err_pct"] = 100 * (tab["H"] / tab["truth_H"] - 1)
    print("\nIL-1 measure level (truth compartments), jitter 3°, illumination 0.1, JPEG 85")
    print(tab.round(2).to_string())
    for (_m, _e, sec), (_, r) in zip(il1_series, tab.iterrows(), strict=True):
        _check_pixels({"positive_area_pct": r["pos"], "h_score": r["H"]}, sec.summary,
                      h_tol=H_TOL_JPEG)
        assert abs(r["pos_fib"] - r["truth_pos_fib"]) <= 3.0
        assert abs(r["pos_int"] - r["truth_pos_int"]) <= 3.0


def test_il1_hscore_within_10pct_without_jpeg(il1_series):
    rows = []
    for m, e, sec in il1_series[1:4]:
        sec2 = section(m, seed=sec.params["seed"], expression=e, jpeg_quality=None)
        sm, t = pixel_measure(sec2, m), sec2.summary
        rows.append((m, e, t["positive_area_pct"], sm["positive_area_pct"], t["h_score"],
                     sm["h_score"]))
        _check_pixels(sm, t, h_tol=0.10)
    print("\nIL-1 measure level, jitter 3°, illumination 0.1, no JPEG")
    print(pd.DataFrame(rows, columns=["marker", "expression", "truth_pos", "pos", "truth_H",
                                      "H"]).round(2).to_string())


def test_il1_spearman_with_true_expression(il1_series):
    h = [pixel_measure(sec, m)["h_score"] for m, _, sec in il1_series]
    true_h = [sec.summary["h_score"] for _, _, sec in il1_series]
    assert spearmanr(h, true_h).statistic >= 0.95
    assert spearmanr(h, [e for _, e, _ in il1_series]).statistic >= 0.95


def test_il1_end_to_end_score_image(il1_series):
    m, e, sec = il1_series[2]
    res = score_image(sec.rgb, marker=m, mpp=MPP)
    sm, t = res.summary, sec.summary
    print(f"\nIL-1 end to end ({m}, expression {e}): positive area {sm['positive_area_pct']:.2f} "
          f"vs truth {t['positive_area_pct']:.2f}; H-score {sm['h_score']:.2f} vs "
          f"{t['h_score']:.2f}; fibers {sm['positive_area_pct_fibers']:.2f} vs "
          f"{t['fiber_positive_area_pct']:.2f}; interstitium "
          f"{sm['positive_area_pct_interstitium']:.2f} vs "
          f"{t['interstitium_positive_area_pct']:.2f}")
    _check_pixels(sm, t, h_tol=H_TOL_JPEG)
    assert res.labels["dab_class"].shape == sec.rgb.shape[:2]


def test_il1_staining_batch_robustness(il1_series):
    rows = []
    for m, e, a in (il1_series[1], il1_series[3]):
        b = section(m, seed=a.params["seed"], expression=e, **BATCH2)
        sa, sb = pixel_measure(a, m), pixel_measure(b, m)
        t = a.summary
        rows.append((m, e, t["positive_area_pct"], sa["positive_area_pct"],
                     sb["positive_area_pct"], t["h_score"], sa["h_score"], sb["h_score"]))
    print("\nIL-1 staining batches (same tissue):")
    print(pd.DataFrame(rows, columns=["marker", "expression", "truth_pos", "A_pos", "B_pos",
                                      "truth_H", "A_H", "B_H"]).round(2).to_string())
    for _, _, tpos, apos, bpos, th, ah, bh in rows:
        _check_pixels({"positive_area_pct": bpos, "h_score": bh},
                      {"positive_area_pct": tpos, "h_score": th}, h_tol=H_TOL_JPEG)
        # batch to batch: the drift between the two renderings stays within 10 %
        assert abs(bpos - apos) <= 3.0
        assert abs(bh - ah) <= max(0.10 * ah, 1.0)
