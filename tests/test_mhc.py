"""MHC class I fiber scoring: calls, grades, capillary guard, slide summary, tiling.

Measure-level tests build an :class:`~biopsyquant.score.ImageContext` by hand from a small
rendered scene with exact truth (fiber labels, which fibers are positive, capillaries), so
they do not depend on the fiber segmenter.  End-to-end checks through ``score_image`` on
generated sections live in ``tests/test_robustness_batches.py``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from biopsyquant import mhc
from biopsyquant.errors import InputError
from biopsyquant.score import ImageContext
from biopsyquant.settings import load_settings
from biopsyquant.stains import deconvolve, preset

MPP = 0.5


def make_scene(seed=0, n=8, fiber_um=50.0, gap_um=4.0, pos_frac=0.3, sarcoplasmic=0.5,
               rim_um=2.5, rim_od=0.5, int_od=0.35, cap_od=0.8, noise=2.0, perimysium_cols=0,
               positive=None):
    """Grid of rounded-square fibers, capillaries at the corners, rendered H-DAB RGB.

    Returns a dict with ``rgb``, ``labels`` (truth fibers), ``comp`` (compartment codes),
    ``dab`` (true DAB OD), ``positive`` (bool per fiber id - 1), ``caps`` (capillary centres
    x, y) and ``model``.
    """
    rng = np.random.default_rng(seed)
    cell = int(round((fiber_um + gap_um) / MPP))
    g = int(round(gap_um / MPP))
    size = n * cell + g
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[0:cell - g, 0:cell - g]
    c, r = (cell - g - 1) / 2, (cell - g) / 2
    blob = (np.abs((xx - c) / r) ** 4 + np.abs((yy - c) / r) ** 4) ** 0.25 <= 1.0
    k = 0
    for i in range(n):
        for j in range(n):
            k += 1
            y0, x0 = g + i * cell, g + j * cell
            labels[y0:y0 + cell - g, x0:x0 + cell - g][blob] = k
    if positive is None:
        positive = rng.random(k) < pos_frac
    positive = np.asarray(positive, bool)
    sarco = rng.random(k) < sarcoplasmic
    dab = np.full(labels.shape, 0.03, np.float32)
    dist = cv2.distanceTransform((labels > 0).astype(np.uint8), cv2.DIST_L2, 5)
    for f in np.flatnonzero(positive) + 1:
        m = labels == f
        dab[m & (dist < rim_um / MPP)] = rim_od
        if sarco[f - 1]:
            dab[m & (dist >= rim_um / MPP)] = int_od
    comp = np.where(labels > 0, 1, 2).astype(np.uint8)
    if perimysium_cols:
        comp[:, : perimysium_cols * g][labels[:, : perimysium_cols * g] == 0] = 3
    caps = []
    for i in range(n + 1):
        for j in range(n + 1):
            cy, cx = i * cell + g // 2, j * cell + g // 2
            cv2.circle(dab, (cx, cy), int(round(3.0 / MPP)), float(cap_od), -1)
            cv2.circle(dab, (cx, cy), int(round(1.0 / MPP)), 0.0, -1)
            caps.append((cx, cy))
    hema = np.where(labels > 0, 0.08, 0.15).astype(np.float32)
    model = preset("H-DAB")
    od = hema[..., None] * model.vectors[0] + dab[..., None] * model.vectors[1]
    rgb = 255 * 10 ** (-od) + rng.normal(0, noise, od.shape)
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return {"rgb": rgb, "labels": labels, "comp": comp, "dab": dab, "positive": positive,
            "sarco": sarco, "caps": np.array(caps), "model": model}


def make_ctx(s, *, fibers=None, comp=None, excluded=None, own=None, overrides=None,
             marker="MHC-I", mpp=MPP):
    settings = load_settings(marker, overrides=overrides)
    od = deconvolve(s["rgb"], s["model"])
    shape = s["rgb"].shape[:2]
    tissue = np.ones(shape, bool)
    excluded = np.zeros(shape, bool) if excluded is None else excluded
    fib = s["labels"] if fibers is None else fibers
    ys, xs = np.nonzero(fib)
    ids = np.unique(fib[fib > 0])
    cnt = np.bincount(fib[ys, xs])
    ftab = pd.DataFrame({
        "fiber_id": ids.astype(np.int32),
        "x_px": np.bincount(fib[ys, xs], xs)[ids] / cnt[ids],
        "y_px": np.bincount(fib[ys, xs], ys)[ids] / cnt[ids],
    })
    return ImageContext(rgb=s["rgb"], mpp=mpp, size_mpp=mpp or 0.5, stain_model=s["model"],
                        hema_od=od[..., 0], dab_od=od[..., 1], tissue=tissue,
                        excluded=excluded, analysed=tissue & ~excluded, fibers=fib,
                        fiber_table=ftab, compartments=s["comp"] if comp is None else comp,
                        settings=settings, own=own)


def summary_of(ctx, meas):
    fib = ctx.fiber_table.merge(meas.fibers, on="fiber_id", how="left")
    return mhc.summarize(cells=meas.cells, fibers=fib, counts=meas.counts, mpp=ctx.mpp,
                         settings=ctx.settings, areas_mm2={})


@pytest.mark.parametrize("pos_frac", [0.0, 0.3, 0.9])
def test_calls_match_truth(pos_frac):
    s = make_scene(seed=int(pos_frac * 10), pos_frac=pos_frac)
    ctx = make_ctx(s)
    meas = mhc.measure(ctx)
    f = meas.fibers.set_index("fiber_id").sort_index()
    assert f["mhc_scored"].all()
    called = f["mhc_positive"].to_numpy(bool)
    np.testing.assert_array_equal(called, s["positive"])
    sm = summary_of(ctx, meas)
    assert sm["fibers_scored"] == 64
    assert sm["fibers_positive_pct"] == pytest.approx(100 * s["positive"].mean(), abs=1e-9)
    # rim 0.5 -> grade 2 for every positive fiber; no positive fiber without rim staining
    assert set(f.loc[called, "mhc_grade"].astype(int)) <= {2}
    assert (f.loc[~called, "mhc_grade"] == 0).all()
    # pattern: sarcoplasmic-stained fibers have rim 0.5 vs interior 0.35 -> "both"
    sar = s["sarco"] & s["positive"]
    assert (f.loc[sar, "mhc_pattern"] == "both").all()
    assert (f.loc[s["positive"] & ~s["sarco"], "mhc_pattern"] == "sarcolemmal").all()
    assert (f.loc[~s["positive"], "mhc_pattern"] == "none").all()
    # internal control: every capillary found, its OD near the true 0.8
    assert sm["positive_capillaries"] == len(s["caps"])
    assert sm["capillary_dab_od"] == pytest.approx(0.8, abs=0.05)
    assert sm["control_ok"] is True


def test_rim_and_interior_values_follow_the_true_od():
    s = make_scene(seed=3, pos_frac=0.5, sarcoplasmic=1.0, rim_od=0.7, int_od=0.45)
    f = mhc.measure(make_ctx(s)).fibers.set_index("fiber_id").sort_index()
    pos = s["positive"]
    np.testing.assert_allclose(f.loc[pos, "rim_dab_od"], 0.7, atol=0.04)
    np.testing.assert_allclose(f.loc[pos, "interior_dab_od"], 0.45, atol=0.04)
    np.testing.assert_allclose(f.loc[~pos, "interior_dab_od"], 0.03, atol=0.04)
    assert (f.loc[pos, "mhc_grade"] == 3).all()  # max(0.7, 0.45) >= 0.6
    assert (f.loc[pos, "mhc_pattern"] == "both").all()


def test_grade_thresholds_are_settings():
    s = make_scene(seed=4, pos_frac=0.5, rim_od=0.5)
    ctx = make_ctx(s, overrides={"mhc.positive_od": 0.6, "mhc.grade_2_od": 0.7,
                                 "mhc.grade_3_od": 0.8})
    f = mhc.measure(ctx).fibers
    assert not f["mhc_positive"].to_numpy(bool).any()  # 0.5 rims are below 0.6 now


def test_capillaries_and_vessels_are_never_positive_fibers():
    """Capillaries / vessel walls / lumina given to the scorer as 'fibers' are not scored."""
    s = make_scene(seed=5, pos_frac=0.0)
    lab = s["labels"].copy()
    nxt = lab.max() + 1
    # 1. every capillary labelled as a fiber (small, DAB-positive)
    for cx, cy in s["caps"]:
        cv2.circle(lab, (int(cx), int(cy)), int(round(3.0 / MPP)), int(nxt), -1)
        nxt += 1
    # 2. a vessel: DAB-positive wall ring (25 µm) around an empty lumen, in the image centre of
    #    a blank area; labelled once as the ring and once as its lumen
    rgb = s["rgb"].copy()
    dab = s["dab"].copy()
    big = np.zeros(lab.shape, np.uint8)
    cx = cy = lab.shape[0] // 2
    lab[cy - 60:cy + 60, cx - 60:cx + 60] = 0
    cv2.circle(big, (cx, cy), 50, 1, -1)
    cv2.circle(big, (cx, cy), 38, 2, -1)
    model = s["model"]
    od_wall = 0.15 * model.vectors[0] + 0.9 * model.vectors[1]
    rgb[big == 1] = np.clip(255 * 10 ** (-od_wall), 0, 255).astype(np.uint8)
    rgb[big == 2] = 252  # empty lumen (glass-like)
    dab[big == 1] = 0.9
    ring_id, lumen_id = nxt, nxt + 1
    lab_ring = lab.copy()
    lab_ring[big == 1] = ring_id
    lab_lumen = lab.copy()
    lab_lumen[big == 2] = lumen_id
    s2 = dict(s, rgb=rgb, dab=dab)
    comp = s["comp"].copy()
    comp[big > 0] = 4
    for labels_, odd in ((lab_ring, [ring_id]), (lab_lumen, [lumen_id])):
        f = mhc.measure(make_ctx(s2, fibers=labels_, comp=comp)).fibers.set_index("fiber_id")
        caps_left = [i for i in range(s["labels"].max() + 1, ring_id) if i in f.index]
        assert len(caps_left) > 50
        not_fibers = caps_left + odd
        assert not f.loc[not_fibers, "mhc_scored"].any()
        assert f.loc[not_fibers, "mhc_positive"].isna().all()
        assert (f.loc[not_fibers, "mhc_pattern"] == "not_scored").all()
        real = f.drop(index=not_fibers)
        assert real["mhc_scored"].all()
        assert not real["mhc_positive"].to_numpy(bool).any()
        sm = summary_of(make_ctx(s2, fibers=labels_, comp=comp),
                        mhc.measure(make_ctx(s2, fibers=labels_, comp=comp)))
        assert sm["fibers_positive"] == 0
        assert sm["mhc_grade_0_5"] == 0


def test_capillary_touching_a_negative_fiber_does_not_make_it_positive():
    s = make_scene(seed=6, pos_frac=0.0)
    lab = s["labels"]
    # place a strongly stained capillary half inside fiber 10's outline (as if the segmenter
    # had grown the fiber over it)
    ys, xs = np.nonzero(lab == 10)
    cx, cy = int(xs.max()), int(ys.mean())
    dab = s["dab"].copy()
    rgb = s["rgb"].copy()
    disk = np.zeros(lab.shape, np.uint8)
    cv2.circle(disk, (cx, cy), int(round(3.5 / MPP)), 1, -1)
    od = 0.15 * s["model"].vectors[0] + 1.0 * s["model"].vectors[1]
    rgb[disk > 0] = np.clip(255 * 10 ** (-od), 0, 255).astype(np.uint8)
    dab[disk > 0] = 1.0
    f = mhc.measure(make_ctx(dict(s, rgb=rgb, dab=dab))).fibers.set_index("fiber_id")
    assert f.loc[10, "rim_positive_fraction"] > 0  # the capillary is in its rim...
    assert not bool(f.loc[10, "mhc_positive"])      # ...but the fiber stays negative


def test_excluded_fibers_are_not_scored():
    s = make_scene(seed=7, pos_frac=1.0)
    excl = np.zeros(s["labels"].shape, bool)
    excl[:, : s["labels"].shape[1] // 2] = True
    ctx = make_ctx(s, excluded=excl)
    f = mhc.measure(ctx).fibers.set_index("fiber_id")
    xs = ctx.fiber_table.set_index("fiber_id")["x_px"]
    left = xs[xs < s["labels"].shape[1] / 2].index
    right = xs[xs >= s["labels"].shape[1] / 2].index
    assert not f.loc[left, "mhc_scored"].any()
    assert f.loc[right, "mhc_scored"].all() and f.loc[right, "mhc_positive"].all()


@pytest.mark.parametrize(("pct", "n", "grade"), [
    (0.0, 100, 0), (0.5, 200, 1), (10.0, 100, 1), (10.01, 100, 2), (25.0, 100, 2),
    (25.5, 100, 3), (50.0, 100, 3), (50.1, 100, 4), (99.9, 1000, 4), (100.0, 100, 5),
])
def test_published_grade_0_5(pct, n, grade):
    assert mhc.grade_0_5(pct, n) == grade


def test_published_grade_without_fibers_is_missing():
    assert np.isnan(mhc.grade_0_5(float("nan"), 0))


def test_perifascicular_pattern():
    # perimysium along the left edge; only the first column of fibers is positive
    n = 8
    pos = np.zeros(n * n, bool)
    for i in range(n):
        pos[i * n] = True
    s = make_scene(seed=8, n=n, positive=pos, perimysium_cols=1)
    ctx = make_ctx(s, overrides={"mhc.perifascicular_min_fibers": 8})
    meas = mhc.measure(ctx)
    f = meas.fibers.set_index("fiber_id").sort_index()
    first_col = np.zeros(n * n, bool)
    first_col[::n] = True
    np.testing.assert_array_equal(f["perifascicular"].to_numpy(bool), first_col)
    sm = summary_of(ctx, meas)
    assert sm["perifascicular_positive_pct"] == pytest.approx(100.0)
    assert sm["non_perifascicular_positive_pct"] == pytest.approx(0.0)
    assert sm["mhc_pattern"] == "perifascicular"


def test_diffuse_focal_and_none_patterns():
    n = 8
    rng = np.random.default_rng(9)
    over = {"mhc.pattern_region_um": 110.0, "mhc.pattern_min_region_fibers": 4}
    diffuse = rng.random(n * n) < 0.5
    s = make_scene(seed=9, n=n, positive=diffuse)
    ctx = make_ctx(s, overrides=over)
    assert summary_of(ctx, mhc.measure(ctx))["mhc_pattern"] == "diffuse"
    focal = np.zeros((n, n), bool)
    focal[:3, :3] = True  # one corner cluster
    s = make_scene(seed=9, n=n, positive=focal.ravel())
    ctx = make_ctx(s, overrides=over)
    assert summary_of(ctx, mhc.measure(ctx))["mhc_pattern"] == "focal"
    s = make_scene(seed=9, n=n, pos_frac=0.0)
    ctx = make_ctx(s, overrides=over)
    sm = summary_of(ctx, mhc.measure(ctx))
    assert sm["mhc_pattern"] == "none" and sm["fibers_positive"] == 0


def test_tiles_add_up():
    """Two tiles with ownership masks give the same fibers and capillary counts as one image."""
    s = make_scene(seed=10, pos_frac=0.4)
    whole = mhc.measure(make_ctx(s))
    h, w = s["labels"].shape
    own_left = np.zeros((h, w), bool)
    own_left[:, : w // 2] = True
    parts = []
    counts = {}
    for own in (own_left, ~own_left):
        ctx = make_ctx(s, own=own)
        m = mhc.measure(ctx)
        tab = ctx.fiber_table
        xi = np.clip(np.round(tab["x_px"]).astype(int), 0, w - 1)
        yi = np.clip(np.round(tab["y_px"]).astype(int), 0, h - 1)
        kept = tab.loc[own[yi, xi], "fiber_id"]
        parts.append(m.fibers[m.fibers["fiber_id"].isin(kept)])
        for k, v in m.counts.items():
            counts[k] = counts.get(k, 0) + v
    tiled = pd.concat(parts).sort_values("fiber_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(tiled, whole.fibers.sort_values("fiber_id")
                                  .reset_index(drop=True))
    assert counts["capillary_n"] == whole.counts["capillary_n"]
    assert counts["capillary_stained_px"] == whole.counts["capillary_stained_px"]


def test_empty_fibers_and_unknown_mpp():
    s = make_scene(seed=11, pos_frac=0.3)
    ctx = make_ctx(s, fibers=np.zeros_like(s["labels"]), mpp=None)
    meas = mhc.measure(ctx)
    assert len(meas.fibers) == 0
    sm = mhc.summarize(cells=meas.cells, fibers=pd.DataFrame(), counts=meas.counts, mpp=None,
                       settings=ctx.settings, areas_mm2={})
    assert sm["fibers_scored"] == 0 and np.isnan(sm["fibers_positive_pct"])
    assert np.isnan(sm["mhc_grade_0_5"]) and sm["mhc_pattern"] == "none"


def test_invalid_inputs_raise_project_errors():
    with pytest.raises(InputError, match="positive_od"):
        mhc.MhcParams(positive_od=0.5, grade_2_od=0.4)
    with pytest.raises(InputError, match="rim_quantile"):
        mhc.MhcParams(rim_quantile=1.5)
    with pytest.raises(InputError, match="fiber_labels"):
        mhc.score_fibers_mhc(np.zeros((4, 4), float), np.zeros((4, 4), np.float32), mpp=0.5)
    with pytest.raises(InputError, match="dab_od"):
        mhc.score_fibers_mhc(np.ones((4, 4), np.int32), np.zeros((5, 4), np.float32), mpp=0.5)
    with pytest.raises(InputError, match="mpp"):
        mhc.score_fibers_mhc(np.ones((4, 4), np.int32), np.zeros((4, 4), np.float32), mpp=0)


@pytest.mark.parametrize("gap_um", [4.0, 1.5])
def test_outline_inside_the_stained_membrane(gap_um):
    """Segmenters often stop at the inner edge of a stained sarcolemma: with every outline
    pulled 1.5 µm inwards, calls still match the truth and a stained neighbour across thin
    endomysium never makes a negative fiber positive."""
    s = make_scene(seed=12, gap_um=gap_um, pos_frac=0.5, sarcoplasmic=0.0)
    lab = s["labels"]
    inner = cv2.distanceTransform((lab > 0).astype(np.uint8), cv2.DIST_L2, 5) > 1.5 / MPP
    shrunk = np.where(inner, lab, 0).astype(np.int32)
    comp = np.where(shrunk > 0, 1, 2).astype(np.uint8)
    f = mhc.measure(make_ctx(s, fibers=shrunk, comp=comp)).fibers.set_index("fiber_id")
    f = f.sort_index()
    np.testing.assert_array_equal(f["mhc_positive"].to_numpy(bool), s["positive"])
    # the rim value is the stained membrane's OD, found outside the outline
    np.testing.assert_allclose(f.loc[s["positive"], "rim_dab_od"], 0.5, atol=0.05)
    assert (f.loc[~s["positive"], "rim_dab_od"] < 0.1).all()


def test_unknown_mpp_keeps_calls_but_no_physical_columns():
    s = make_scene(seed=13, pos_frac=0.4, perimysium_cols=1)
    f = mhc.measure(make_ctx(s, mpp=None)).fibers.sort_values("fiber_id")
    np.testing.assert_array_equal(f["mhc_positive"].to_numpy(bool), s["positive"])
    assert f["perimysium_distance_um"].isna().all()
    assert f["perifascicular"].any()  # the flag still uses the assumed pixel size


# --------------------------------------------------------------------------- regression
# Golden values of the implementation before the speed-up (OpenCV distance transforms and
# connected components over the whole image, numba per-fiber pass), on a generated section fed
# with its TRUE fibers, compartments and stain maps (no segmenter, no deconvolution in the
# loop). The compiled per-fiber chamfer pass reproduces them exactly; the tolerances are the
# agreed ones (per-fiber OD 0.005, % positive 0.5 points, capillary count 1).
_GOLD_RIM = [
    0.2975, 0.3071, 0.0282, 0.0325, 0.2817, 0.3439, 0.0517, 0.5223, 0.0477, 0.0467, 0.2912,
    0.071, 0.0604, 0.0449, 0.0721, 0.068, 0.5537, 0.0452, 0.08, 0.0777, 0.0613, 0.058, 0.0375,
    0.753, 0.0937, 0.3537, 0.0553, 0.0777, 0.0585, 0.3524, 0.0372, 0.0788, 0.0838, 0.0664,
    0.0664, 0.0567, 0.3193, 0.0535, 0.0662, 0.0471, 0.3302, 0.8982, 0.0628, 0.3408, 0.0665,
    0.0569, 0.5161, 0.0688, 0.0457, 0.0735, 0.0572, 0.5539, 0.3048, 0.0652, 0.0892, 0.0896,
    0.085, 0.5446, 0.0835, 0.5377, 0.0694, 0.0578]
_GOLD_INTERIOR = [
    0.0549, 0.0554, 0.0076, 0.022, 0.2298, 0.0557, 0.0436, 0.3409, 0.0465, 0.0317, 0.2141,
    0.0556, 0.0447, 0.0451, 0.0459, 0.0282, 0.1417, 0.0421, 0.0646, 0.0642, 0.0581, 0.0393,
    0.0192, 0.1273, 0.0781, 0.2264, 0.0478, 0.0496, 0.059, 0.0926, 0.0121, 0.0529, 0.0567,
    0.0056, 0.065, 0.0517, 0.0706, 0.006, 0.0143, 0.0462, 0.2622, 0.1477, 0.0385, 0.1022,
    0.0175, 0.0472, 0.1439, 0.0482, 0.0435, 0.0464, 0.0517, 0.4255, 0.2079, 0.0698, 0.0387,
    0.0464, 0.0689, 0.0793, 0.0629, 0.3396, 0.047, 0.0267]
_GOLD_GRADE = [
    1, 1, 0, 0, 1, 1, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 3, 0, 1, 0, 0, 0, 1, 0,
    0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 3, 0, 1, 0, 0, 2, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 2, 0, 2, 0, 0]


def true_section_ctx(marker, seed, own=None, overrides=None):
    """ImageContext of a generated 1024² section from its truth (fibers, compartments, maps)."""
    from biopsyquant.synthetic import generate_section

    sec = generate_section(marker=marker, seed=seed, shape=(1024, 1024), mpp=0.5,
                           vector_jitter_deg=3, jpeg_quality=85)
    fib = sec.fibers.astype(np.int32)
    ids = np.unique(fib[fib > 0])
    return ImageContext(rgb=sec.rgb, mpp=0.5, size_mpp=0.5, stain_model=sec.stain_model,
                        hema_od=sec.hema_od.astype(np.float32),
                        dab_od=sec.dab_od.astype(np.float32), tissue=sec.tissue,
                        excluded=np.zeros(fib.shape, bool), analysed=sec.tissue, fibers=fib,
                        fiber_table=pd.DataFrame({"fiber_id": ids.astype(np.int32)}),
                        compartments=sec.compartments,
                        settings=load_settings(marker, overrides=overrides), own=own)


#: the golden values below were taken with the ring median (the default before the third
#: session; now 0.6, see test_rim_quantile_default_calls_patchy_rims)
_GOLD_SETTINGS = {"mhc.rim_quantile": 0.5}


def test_regression_against_the_previous_implementation():
    ctx = true_section_ctx("MHC-I", 3, overrides=_GOLD_SETTINGS)
    meas = mhc.measure(ctx)
    f = meas.fibers
    assert len(f) == len(_GOLD_RIM) == 62
    np.testing.assert_allclose(f["rim_dab_od"], _GOLD_RIM, atol=0.005)
    np.testing.assert_allclose(f["interior_dab_od"], _GOLD_INTERIOR, atol=0.005)
    assert f["mhc_grade"].fillna(-1).astype(int).tolist() == _GOLD_GRADE
    assert int(f["mhc_scored"].sum()) == 62
    pct = 100 * f["mhc_positive"].fillna(False).astype(bool).mean()
    assert abs(pct - 100 * 19 / 62) <= 0.5
    assert abs(meas.counts["capillary_n"] - 68) <= 1
    assert abs(meas.counts["capillary_od_sum"] / meas.counts["capillary_stained_px"]
               - 3972.839 / 5857) < 0.005
    # tiles: the capillaries of two halves add up to the whole (owned centroids)
    halves = []
    for side in (0, 1):
        own = np.zeros(ctx.fibers.shape, bool)
        own[:, side * 512:(side + 1) * 512] = True
        ctx_h = true_section_ctx("MHC-I", 3, own=own, overrides=_GOLD_SETTINGS)
        halves.append(mhc.measure(ctx_h).counts)
    for k in ("capillary_n", "capillary_stained_px"):
        assert halves[0][k] + halves[1][k] == meas.counts[k]


def test_rim_quantile_default_calls_patchy_rims():
    """End to end on a section whose positive fibers are mostly sarcolemmal and patchy: with
    the ring 60th percentile (default) % positive is within 5 points of truth; the ring median
    (the default before) left 4 fibers with truth rims of 0.25-0.41 OD negative (-7.7 points)."""
    from biopsyquant.score import score_image
    from biopsyquant.synthetic import generate_section

    sec = generate_section(marker="MHC-I", seed=14, shape=(1024, 1024), mpp=0.5,
                           vector_jitter_deg=3.0, illumination=0.1, jpeg_quality=85,
                           positive_fiber_fraction=0.9)
    truth = sec.summary["positive_fiber_pct"]
    new = score_image(sec.rgb, marker="MHC-I", mpp=0.5).summary["fibers_positive_pct"]
    old = score_image(sec.rgb, settings=load_settings("MHC-I", overrides=_GOLD_SETTINGS),
                      mpp=0.5).summary["fibers_positive_pct"]
    assert abs(new - truth) <= 5.0, (new, truth)
    assert new > old
