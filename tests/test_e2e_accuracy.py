"""End-to-end accuracy of ``score_image`` on generated sections against exact truth.

Each section is rendered with stain-vector jitter, uneven illumination and JPEG and scored as
a user runs it: ``score_image(rgb, marker=..., mpp=...)`` (per-image background and stain
estimate, tissue, fibers, compartments, the marker analysis). Tolerances are the targets of
issues #3 (fibers), #4 (CD163) and #5 (MHC-I, IL-1). A target the pipeline does not meet yet is
``xfail(strict=True)`` with the module at fault, so fixing it turns the test red until the
marker is removed. The full grid is ``benchmarks/validate_synthetic.py``
(docs/_parts/e2e-validation.md).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from biopsyquant.evaluate import border_labels, match_labels, match_points
from biopsyquant.illumination import FlatField
from biopsyquant.score import score_image
from biopsyquant.settings import load_settings

synthetic = pytest.importorskip("biopsyquant.synthetic")

#: seven generated sections (768² / 512²) scored end to end: ~40-60 s on a loaded 2-core machine
pytestmark = pytest.mark.slow

MPP = 0.5
PERTURB = {"vector_jitter_deg": 3.0, "illumination": 0.10, "jpeg_quality": 85}
SHAPE = (768, 768)


def _section(marker, seed, shape=SHAPE, **kw):
    return synthetic.generate_section(marker=marker, seed=seed, shape=shape, mpp=MPP,
                                      **{**PERTURB, **kw})


def _score(sec, marker):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return score_image(sec.rgb, marker=marker, mpp=MPP)


def _truth_pixels(sec, mask):
    v = sec.dab_od[mask]
    w = np.mean((v >= 0.2) & (v < 0.4)) * 100
    m = np.mean((v >= 0.4) & (v < 0.6)) * 100
    s = np.mean(v >= 0.6) * 100
    return w + m + s, w + 2 * m + 3 * s


@pytest.fixture(scope="module")
def cd163():
    sec = _section("CD163", 12, cells_per_mm2=200)
    return sec, _score(sec, "CD163")


@pytest.fixture(scope="module")
def cd163_zero():
    sec = _section("CD163", 12, shape=(512, 512), cells_per_mm2=0)
    return sec, _score(sec, "CD163")


@pytest.fixture(scope="module")
def mhc():
    sec = _section("MHC-I", 12, positive_fiber_fraction=0.6)
    return sec, _score(sec, "MHC-I")


@pytest.fixture(scope="module")
def il1b_series():
    out = []
    for e in (0.2, 0.5, 0.8):
        sec = _section("IL-1b", 12, shape=(512, 512), expression=e)
        out.append((e, sec, _score(sec, "IL-1b")))
    return out


# ----------------------------------------------------------------------------- whole pipeline
def test_background_and_tissue_when_glass_peak_is_small():
    """~15 % glass under uneven illumination: the glass peak is smaller than the tissue one.

    Regression for stains.estimate_background taking pale tissue (~211) as the glass (~241)
    when the half-maximum walk ran into the tissue plateau (fixed in 29ccaa3); tissue detection
    then kept <15 % of the section and every downstream number collapsed.
    """
    sec = synthetic.generate_section(marker="CD163", seed=11, shape=(768, 768), mpp=MPP,
                                     **PERTURB)
    res = _score(sec, "CD163")
    # the background is read after the flat-field correction, which brings the field down to
    # its dimmest level: compare with the true background times that level's darkening
    flat = FlatField.from_dict(res.provenance["illumination"])
    assert flat.applied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = score_image(sec.rgb, mpp=MPP, settings=load_settings(
            "CD163", overrides={"illumination.flat_field": "off"}))
    for r in (res, raw):
        err = r.summary["tissue_area_mm2"] / sec.summary["tissue_area_mm2"] - 1
        assert abs(err) <= 0.10, f"tissue area off by {err:+.0%}"
    # without the correction: the glass peak itself (the regression this test guards)
    bg = np.asarray(raw.stain_model.background, float)
    assert np.max(np.abs(bg - np.asarray(sec.stain_model.background))) <= 6.0, bg
    # with it: the corrected glass is one level, darker than the brightest raw glass by the
    # largest correction (± 2 %)
    bgc = np.asarray(res.stain_model.background, float)
    assert bgc.max() < bg.min()
    ratio = bgc.mean() / np.percentile(sec.rgb[~sec.tissue].mean(axis=1), 99)
    assert abs(ratio - (1 - flat.max_correction_pct() / 100)) <= 0.02, ratio


def test_tissue_area_within_10pct(cd163):
    sec, res = cd163
    err = res.summary["tissue_area_mm2"] / sec.summary["tissue_area_mm2"] - 1
    assert abs(err) <= 0.10


# ----------------------------------------------------------------------------- fibers (#3)
def test_fiber_f1_on_complete_fibers(cd163):
    """Complete fibers (not cut by the image border): a whole section has no border slivers."""
    sec, res = cd163
    m = match_labels(res.labels["fibers"], sec.fibers, iou=0.5, ignore_border=True)
    assert m.f1 >= 0.90, f"fiber F1 {m.f1:.3f}"


_SMALL_FIBERS = (
    "fibers on this 768² CD163 section since the flat-field correction (illumination.py): 3 "
    "small atrophic fibers (150-235 µm², pale, inside broad connective tissue) stay "
    "unsegmented, 28 of 31 complete fibers (-9.7 %). On the 1024² grids (seeds 11-14, 20 "
    "sections) every CD163 and MHC-I section's count is within 5 % (worst -3.8 %) and median "
    "area within 10 % (worst +6.1 %), docs/validation.md e2e")


@pytest.mark.xfail(strict=True, reason=_SMALL_FIBERS)
def test_fiber_count_on_complete_fibers(cd163):
    sec, res = cd163
    n = res.summary["n_fibers"] - len(border_labels(res.labels["fibers"]))
    n_true = int(sec.fibers.max()) - len(border_labels(sec.fibers))
    assert abs(n / n_true - 1) <= 0.05, (n, n_true)


@pytest.mark.xfail(strict=True, reason=_SMALL_FIBERS + "; all objects: 37 vs 40")
def test_fiber_count_within_5pct_all_objects(cd163):
    """All objects, border slivers included (the count as a crop's summary reports it)."""
    sec, res = cd163
    n_true = int(sec.fibers.max())
    assert abs(res.summary["n_fibers"] / n_true - 1) <= 0.05, (res.summary["n_fibers"], n_true)


def test_fiber_median_area_within_10pct(cd163):
    sec, res = cd163
    ft = sec.fiber_truth
    t_med = np.median(ft.loc[~ft["touches_image_edge"].astype(bool), "area_um2"])
    fb = res.fibers  # the same population as the truth: not cut by the image border
    m_med = np.median(fb.loc[~fb["fiber_id"].isin(border_labels(res.labels["fibers"])),
                             "area_um2"])
    assert abs(m_med / t_med - 1) <= 0.10, (m_med, t_med)


# ----------------------------------------------------------------------------- CD163 (#4)
def test_cd163_detection_f1(cd163):
    sec, res = cd163
    pos = res.cells[res.cells["positive"].astype(bool)]
    tc = sec.cells
    tpos = tc[(tc["kind"] == "macrophage") & tc["positive"].astype(bool)]
    m = match_points(pos[["x_px", "y_px"]].to_numpy(float),
                     tpos[["x_px", "y_px"]].to_numpy(float), 6.0 / MPP)
    assert m.f1 >= 0.90, f"cell F1 {m.f1:.3f} (tp {m.tp}, fp {m.fp}, fn {m.fn})"


@pytest.mark.xfail(strict=True, reason=(
    "cells: 28 positive macrophages found vs 25 true on this section (+12 %; cell F1 >= 0.9 "
    "still passes). Before the flat-field correction the density read +9.3 % only because the "
    "tissue area was over-estimated by 2.5 %; it is now within 0.4 %. Grid: 15 of 16 "
    "sections within 10 % (docs/validation.md e2e)"))
def test_cd163_density_within_10pct(cd163):
    sec, res = cd163
    dens, t = res.summary["cells_per_mm2"], sec.summary["positive_cells_per_mm2"]
    assert abs(dens / t - 1) <= 0.10, (dens, t)


def test_cd163_no_macrophages_few_false_positives(cd163_zero):
    sec, res = cd163_zero
    fp = int(res.cells["positive"].astype(bool).sum()) if len(res.cells) else 0
    assert fp / sec.summary["tissue_area_mm2"] < 2.0, f"{fp} positive cells on a section without"


@pytest.mark.xfail(strict=True, reason=(
    "compartments.compartment_map vs synthetic truth: the generator labels wide in-fascicle "
    "gaps (>15 um, next to septa) endomysium while compartment_map calls any non-fiber tissue "
    "wider than perimysium_min_width_um perimysium; with the segmented fibers ~1/3 of true "
    "endomysial macrophages are counted perimysial"))
def test_cd163_endomysial_count_within_20pct(cd163):
    sec, res = cd163
    meas, t = res.summary["cells_endomysial"], sec.summary["n_positive_cells_endomysium"]
    assert abs(meas / t - 1) <= 0.20, (meas, t)


# ----------------------------------------------------------------------------- MHC-I (#5)
def test_mhc_percent_positive_within_5_points(mhc):
    sec, res = mhc
    d = res.summary["fibers_positive_pct"] - sec.summary["positive_fiber_pct"]
    assert abs(d) <= 5.0, f"% positive fibers off by {d:+.1f} points"


def test_mhc_no_capillary_counted_as_positive_fiber(mhc):
    sec, res = mhc
    lab = res.labels["fibers"]
    vessels = sec.compartments == 4
    yy, xx = np.mgrid[:lab.shape[0], :lab.shape[1]]
    for v in sec.vessels.itertuples():
        if v.kind == "capillary":
            vessels |= (yy - v.y_px) ** 2 + (xx - v.x_px) ** 2 <= (v.diameter_um / 2 / MPP) ** 2
    fb = res.fibers
    bad = []
    for fid in fb.loc[fb["mhc_positive"].fillna(False).astype(bool), "fiber_id"]:
        reg = lab == fid
        if np.mean(sec.fibers[reg] > 0) < 0.5 and np.any(reg & vessels):
            bad.append(int(fid))
    assert not bad, f"positive 'fibers' on capillaries/vessels: {bad}"


# ----------------------------------------------------------------------------- IL-1 (#5)
def test_il1_positive_area_within_3_points(il1b_series):
    for e, sec, res in il1b_series:
        area, _ = _truth_pixels(sec, sec.tissue)
        assert abs(res.summary["positive_area_pct"] - area) <= 3.0, (
            e, res.summary["positive_area_pct"], area)


def test_il1_h_score_within_10pct(il1b_series):
    for e, sec, res in il1b_series:
        _, h = _truth_pixels(sec, sec.tissue)
        assert abs(res.summary["h_score"] / h - 1) <= 0.10, (e, res.summary["h_score"], h)


def test_il1_spearman_with_expression(il1b_series):
    e = [x[0] for x in il1b_series]
    a = [x[2].summary["positive_area_pct"] for x in il1b_series]
    assert spearmanr(e, a).statistic >= 0.95


def test_il1_fiber_interstitium_split(il1b_series):
    e, sec, res = il1b_series[-1]
    fib = sec.compartments == 1
    t_fib, _ = _truth_pixels(sec, sec.tissue & fib)
    t_int, _ = _truth_pixels(sec, sec.tissue & ~fib)
    sm = res.summary
    assert abs(sm["positive_area_pct_fibers"] - t_fib) <= 3.0, (sm["positive_area_pct_fibers"],
                                                                t_fib)
    assert abs(sm["positive_area_pct_interstitium"] - t_int) <= 3.0, (
        sm["positive_area_pct_interstitium"], t_int)
