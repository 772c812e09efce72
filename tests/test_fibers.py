"""Tests of fiber segmentation and the fiber table (biopsyquant.fibers)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

from biopsyquant.errors import InputError, MppUnknownError
from biopsyquant.evaluate import match_labels
from biopsyquant.fibers import FIBER_COLUMNS, FiberParams, fiber_table, segment_fibers

HEMA = np.array([0.651, 0.701, 0.290])
DAB = np.array([0.269, 0.568, 0.778])
BG = np.array([242.0, 240.0, 238.0])


def _render(hema: np.ndarray, dab: np.ndarray, rng: np.random.Generator, noise=1.5):
    """Beer-Lambert RGB from hematoxylin and DAB concentration maps (log10 OD)."""
    od = hema[..., None] * HEMA / np.linalg.norm(HEMA) + dab[..., None] * DAB / np.linalg.norm(DAB)
    rgb = BG * 10.0 ** (-od) + rng.normal(0, noise, od.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def phantom(seed=0, shape=(400, 400), mpp=0.5, gap_um=2.0, n=36, dab_fill=(), dab_rim=()):
    """Voronoi 'fibers' separated by hematoxylin-stained endomysium, with peripheral nuclei.

    Returns rgb, truth labels (fibers without the endomysium) and the hematoxylin map.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    pts = rng.uniform([0, 0], [h, w], (n, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    _, owner = cKDTree(pts).query(np.column_stack([yy.ravel(), xx.ravel()]))
    vor = owner.reshape(shape).astype(np.int32) + 1
    bnd = find_boundaries(vor, mode="thick")
    gap_px = max(1, int(round(gap_um / mpp / 2)))
    from scipy import ndimage as ndi

    endo = ndi.binary_dilation(bnd, iterations=gap_px)
    truth = np.where(endo, 0, vor).astype(np.int32)
    hema = np.where(truth > 0, 0.06, 0.16).astype(np.float64)
    hema *= 1 + 0.08 * rng.standard_normal(shape)
    dab = np.full(shape, 0.02)
    for k in dab_fill:
        dab[truth == k] = 0.6
    for k in dab_rim:
        m = truth == k
        inner = ndi.binary_erosion(m, iterations=int(round(2.5 / mpp)))
        dab[m & ~inner] = 0.8
    # peripheral nuclei on the endomysium
    ys, xs = np.nonzero(bnd)
    pick = rng.choice(len(ys), size=min(60, len(ys)), replace=False)
    for y, x in zip(ys[pick], xs[pick], strict=True):
        rr = (yy - y) ** 2 / 16.0 + (xx - x) ** 2 / 64.0
        hema[rr < 1] = 0.7
    rgb = _render(hema, dab, rng)
    return rgb, truth, hema


def _clean_truth(truth, mpp, min_um=10.0):
    """Drop truth fragments smaller than the smallest fiber segment_fibers keeps."""
    areas = np.bincount(truth.ravel())
    small = np.flatnonzero(areas < 0.6 * math.pi * (min_um / 2 / mpp) ** 2)
    return np.where(np.isin(truth, small), 0, truth)


# ----------------------------------------------------------------------------- params / input


def test_params_validation():
    with pytest.raises(InputError, match="min_diameter_um"):
        FiberParams(min_diameter_um=-1)
    with pytest.raises(InputError, match="max_diameter_um"):
        FiberParams(min_diameter_um=50, max_diameter_um=40)
    with pytest.raises(InputError, match="pale_fraction"):
        FiberParams(pale_fraction=3)


def test_absurd_mpp_refused():
    rgb = np.full((200, 200, 3), 200, np.uint8)
    with pytest.raises(InputError, match=r"mpp=5.*2\.0 px"):
        segment_fibers(rgb, mpp=5.0)  # 10 µm fibers would be 2 px across
    with pytest.raises(InputError, match="larger than the whole image"):
        segment_fibers(rgb, mpp=0.01)  # smallest fiber 1000 px > 200 px image
    with pytest.raises(InputError, match="positive"):
        segment_fibers(rgb, mpp=-0.5)
    with pytest.raises(MppUnknownError):
        segment_fibers(rgb, mpp=None)


def test_bad_arrays_refused():
    with pytest.raises(InputError, match="3 channels"):
        segment_fibers(np.zeros((50, 50, 4), np.uint8), mpp=0.5)
    with pytest.raises(InputError, match="uint8"):
        segment_fibers(np.zeros((50, 50, 3), np.float32), mpp=0.5)
    with pytest.raises(InputError, match="tissue"):
        segment_fibers(np.zeros((50, 50, 3), np.uint8), mpp=0.5, tissue=np.ones((10, 10), bool))


def test_no_tissue_and_no_fibers_warn_and_return_empty():
    glass = np.full((300, 300, 3), 240, np.uint8)
    with pytest.warns(UserWarning, match="no muscle fibers"):
        lab = segment_fibers(glass, mpp=0.5)
    assert lab.shape == (300, 300) and lab.dtype == np.int32 and lab.max() == 0
    with pytest.warns(UserWarning, match="tissue mask is empty"):
        lab = segment_fibers(glass, mpp=0.5, tissue=np.zeros((300, 300), bool))
    assert lab.max() == 0
    with pytest.warns(UserWarning, match="no fibers"):
        tab = fiber_table(lab, mpp=0.5)
    assert list(tab.columns) == list(FIBER_COLUMNS) and len(tab) == 0


# ----------------------------------------------------------------------------- segmentation


def test_phantom_fibers_found():
    rgb, truth, _ = phantom(seed=1)
    lab = segment_fibers(rgb, mpp=0.5)
    assert lab.dtype == np.int32 and lab.shape == truth.shape
    truth = _clean_truth(truth, 0.5)
    r = match_labels(lab, truth)
    assert r.f1 >= 0.9, r
    n_pred, n_true = len(np.unique(lab)) - 1, len(np.unique(truth)) - 1
    assert abs(n_pred - n_true) <= max(2, 0.1 * n_true)


def test_dab_filled_and_rimmed_fibers_stay_single_fibers():
    rgb, truth, _ = phantom(seed=2, dab_fill=(3, 8), dab_rim=(5, 12, 20))
    lab = segment_fibers(rgb, mpp=0.5)
    for k in (3, 8, 5, 12, 20):
        t = truth == k
        if t.sum() < 400:  # fragment cut by the image border
            continue
        ids, counts = np.unique(lab[t], return_counts=True)
        best = ids[np.argmax(np.where(ids > 0, counts, 0))]
        assert best > 0, f"fiber {k} not found"
        inter = np.count_nonzero(t & (lab == best))
        iou = inter / np.count_nonzero(t | (lab == best))
        assert iou >= 0.5, f"fiber {k} (DAB) IoU {iou:.2f}"


def test_resolution_independence():
    """The same phantom at 0.25 and 0.5 µm/px gives about the same fibers."""
    rgb, truth, _ = phantom(seed=3, shape=(300, 300), mpp=0.5)
    import cv2

    big = cv2.resize(rgb, (600, 600), interpolation=cv2.INTER_LINEAR)
    lab_half = segment_fibers(rgb, mpp=0.5)
    lab_quarter = segment_fibers(big, mpp=0.25)
    a1 = np.bincount(lab_half.ravel())[1:] * 0.25
    a2 = np.bincount(lab_quarter.ravel())[1:] * 0.0625
    a1, a2 = a1[a1 > 0], a2[a2 > 0]
    assert abs(len(a1) - len(a2)) <= 2
    assert np.median(a2) == pytest.approx(np.median(a1), rel=0.1)


@pytest.mark.parametrize("marker,seed,opts", [
    ("MHC-I", 21, {}),
    ("CD163", 22, {"vector_jitter_deg": 8.0, "jpeg_quality": 80}),
])
def test_synthetic_sections(marker, seed, opts):
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    s = synthetic.generate_section(marker=marker, seed=seed, shape=(768, 768), mpp=0.5, **opts)
    lab = segment_fibers(s.rgb, mpp=s.mpp)
    r = match_labels(lab, s.fibers)
    # floors set below what the current pipeline achieves (see docs/_parts/fibers-validation.md)
    assert r.f1 >= 0.78, r
    n_true = int(len(np.unique(s.fibers)) - 1)
    n_pred = int(len(np.unique(lab)) - 1)
    assert abs(n_pred - n_true) <= 0.2 * n_true


def test_pale_fibers_below_the_glass_threshold_are_kept():
    """CD163 seed 2: with the stain model score_image estimates (background read from the
    vignetted glass), several pale fibers dip below the default tissue threshold (0.06 OD) in
    patches. Those enclosed holes of the tissue mask are filled, so the fibers stay solid and
    pass the hole / solidity tests (recall 0.866 before the fill, 0.955 with it)."""
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    from biopsyquant.score import prepare_stain_model
    from biopsyquant.settings import load_settings

    s = synthetic.generate_section(marker="CD163", seed=2, shape=(1024, 1024), mpp=0.5)
    model = prepare_stain_model(s.rgb, load_settings("CD163"))
    lab = segment_fibers(s.rgb, mpp=s.mpp, model=model)
    r = match_labels(lab, s.fibers)
    assert r.recall >= 0.93, r
    assert r.f1 >= 0.92, r


def test_isolated_pale_connective_tissue_objects_are_dropped():
    """IL-1b seed 4 (JPEG 75): loose perimysium of a pale section passes the pixel rules and
    came out as small "fibers" (9 false objects, 6 of them < 10 % on a true fiber). Small objects
    paler than the fibers with almost no fiber neighbour are now dropped as connective tissue:
    5 false objects, 2 off the fibers, and no true fiber lost (recall 1.0, F1 0.926 -> 0.957)."""
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    from biopsyquant.score import prepare_stain_model
    from biopsyquant.settings import load_settings

    s = synthetic.generate_section(marker="IL-1b", seed=4, shape=(1024, 1024), mpp=0.5,
                                   jpeg_quality=75)
    model = prepare_stain_model(s.rgb, load_settings("IL-1b"))
    lab = segment_fibers(s.rgb, mpp=s.mpp, model=model)
    r = match_labels(lab, s.fibers)
    n = int(lab.max())
    on_fiber = np.bincount(lab.ravel(), weights=(s.fibers > 0).ravel(), minlength=n + 1)[1:] \
        / np.bincount(lab.ravel(), minlength=n + 1)[1:]
    assert np.count_nonzero(on_fiber < 0.1) <= 3, on_fiber
    assert r.fp <= 6, r
    assert r.recall >= 0.98, r
    assert r.f1 >= 0.945, r


def test_counterstain_mode_does_not_cut_dab_filled_fibers_at_their_rim():
    """MHC-I seed 11, 90 % positive fibers (DAB patches > 50 % of the tissue: counterstain
    mode): the DAB-dark sarcolemmal rim of a DAB-filled fiber was taken for the endomysium on
    the total OD, so fibers were outlined inside their rim (median area -19 %, F1 0.919).
    Dark boundary lines are now looked for on the DAB-free OD: median area within 5 %,
    F1 >= 0.95; the old behaviour (``counterstain_free_lines=False``) stays reproducible."""
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    from skimage.segmentation import clear_border

    from biopsyquant.score import prepare_stain_model
    from biopsyquant.settings import load_settings

    s = synthetic.generate_section(marker="MHC-I", seed=11, shape=(1024, 1024), mpp=0.5,
                                   vector_jitter_deg=3.0, illumination=0.1, jpeg_quality=85,
                                   positive_fiber_fraction=0.9)
    model = prepare_stain_model(s.rgb, load_settings("MHC-I"))

    def median_area(lab):
        a = np.bincount(clear_border(lab).ravel())[1:]
        return float(np.median(a[a > 0]))

    true_med = median_area(s.fibers)
    lab = segment_fibers(s.rgb, mpp=s.mpp, model=model)
    r = match_labels(lab, s.fibers, ignore_border=True)
    assert r.f1 >= 0.95, r
    assert abs(median_area(lab) / true_med - 1) <= 0.05
    old = segment_fibers(s.rgb, mpp=s.mpp, model=model,
                         params=FiberParams(counterstain_free_lines=False))
    assert median_area(old) / true_med - 1 < -0.15


def test_isolated_pale_rule_keeps_small_fibers_with_neighbours_and_dark_ones():
    """The rule drops only objects that are small AND paler than the fiber level AND (almost)
    without fiber neighbours: a small pale fiber inside a fascicle and a small isolated fiber
    as dark as the others are kept (atrophic fibers)."""
    from biopsyquant.fibers import _drop_isolated_pale

    p = FiberParams()
    lab = np.zeros((120, 200), np.int32)
    od = np.full(lab.shape, 0.02, np.float32)
    yy, xx = np.mgrid[0:120, 0:200]
    disc = lambda cy, cx, r: (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # noqa: E731
    lab[disc(30, 30, 10)] = 1   # small (314 µm² at 1 µm/px), pale, isolated: dropped
    od[disc(30, 30, 10)] = 0.04
    lab[disc(30, 120, 10)] = 2  # small, as dark as the fibers, isolated: kept
    od[disc(30, 120, 10)] = 0.1
    # small pale fiber packed among large ones (2 µm endomysium): kept
    lab[60:120, 0:60] = 3
    lab[60:120, 62:200] = 4
    lab[62:78, 62:80] = 5
    lab[62:78, 80:82] = 0
    lab[78:80, 62:82] = 0
    od[lab >= 3] = 0.1
    od[lab == 5] = 0.04
    out = _drop_isolated_pale(lab, od, 0.1, 1.0, p)
    kept = {int(v) for v in np.unique(lab[out > 0])}
    assert kept == {2, 3, 4, 5}, kept
    # a smaller size limit leaves the pale isolated object alone
    out = _drop_isolated_pale(lab, od, 0.1, 1.0, FiberParams(isolated_max_area_um2=300))
    assert int(out.max()) == 5


def test_local_interstitium_level_under_uneven_illumination():
    """CD163 seed 12 with 10 % illumination: fibers darkened by the vignetting exceed
    1.55 x the global fiber level and are cut away as interstitium (F1 0.857); the local
    fiber level (interstitium_local_um=50, the default since the pipeline round 2) keeps
    them (F1 0.911 with the other settings of that time)."""
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    from biopsyquant.score import prepare_stain_model
    from biopsyquant.settings import load_settings

    s = synthetic.generate_section(marker="CD163", seed=12, shape=(768, 768), mpp=0.5,
                                   vector_jitter_deg=3.0, illumination=0.1, jpeg_quality=85,
                                   cells_per_mm2=200)
    model = prepare_stain_model(s.rgb, load_settings("CD163"))
    lab = segment_fibers(s.rgb, mpp=s.mpp, model=model,
                         params=FiberParams(interstitium_local_um=50.0))
    r = match_labels(lab, s.fibers)
    assert r.f1 >= 0.90, r
    with pytest.raises(InputError, match="interstitium_local_margin"):
        FiberParams(interstitium_local_margin=0)


def _pipeline_inputs(marker, seed, **opts):
    """A 1024² generated section with the stain model and tissue mask that score_image gives
    segment_fibers (per-image estimate, tissue.detect_tissue)."""
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    from biopsyquant.score import prepare_stain_model
    from biopsyquant.settings import load_settings
    from biopsyquant.tissue import detect_tissue

    s = synthetic.generate_section(marker=marker, seed=seed, shape=(1024, 1024), mpp=0.5,
                                   vector_jitter_deg=3.0, illumination=0.1, jpeg_quality=85,
                                   **opts)
    st = load_settings(marker)
    model = prepare_stain_model(s.rgb, st)
    tissue = detect_tissue(s.rgb, mpp=s.mpp, background=model.background, params=st.tissue)
    return s, model, tissue


def _complete(lab, truth):
    from biopsyquant.evaluate import border_labels

    m = match_labels(lab, truth, iou=0.5, ignore_border=True)
    n = int(lab.max()) - len(border_labels(lab))
    n_true = int(truth.max()) - len(border_labels(truth))
    return m, n / n_true - 1


def test_faint_endomysium_between_dab_filled_fibers_pipeline():
    """IL-1Ra seed 12, expression 0.9, 10 % illumination left uncorrected (the flat field
    off): tightly packed fibers (DAB-filled or pale) separated by faint endomysium were merged
    (F1 on complete fibers 0.860, count -17 %); boundary_min_od 0.02, merge_neck_ratio 0.9
    and the local interstitium level keep them apart (0.895, -5 %). On this uncorrected
    image the opt-in pale-line rule (``pale_line_free_fraction`` 0.3, 2026-12-04) would merge
    more of them again (F1 0.860, count -17 %); with its default (off) the bounds hold."""
    s, model, tissue = _pipeline_inputs("IL-1Ra", 12, expression=0.9)
    lab = segment_fibers(s.rgb, mpp=s.mpp, model=model, tissue=tissue)
    m, count_err = _complete(lab, s.fibers)
    assert m.f1 >= 0.88, m
    assert abs(count_err) <= 0.08, count_err


def test_unstained_fibers_among_dab_filled_ones_counterstain_mode():
    """MHC-I seed 11, 90 % positive fibers: DAB patches cover > half the tissue, so the DAB
    acts as a counterstain; the unstained fibers were then "pale" on the total OD and never
    cored (F1 on complete fibers 0.857, 7 of 10 misses). The DAB-free OD keeps them
    (0.919); the levels carry that map's statistics and survive a dict round trip."""
    from biopsyquant.fibers import FiberLevels, fiber_levels

    s, model, tissue = _pipeline_inputs("MHC-I", 11, positive_fiber_fraction=0.9)
    lv = fiber_levels([s.rgb], mpp=s.mpp, model=model, tissues=[tissue])
    assert lv.counterstain and lv.level_free is not None and lv.ref_free is not None
    assert FiberLevels.from_dict(lv.to_dict()) == lv
    old = {k: v for k, v in lv.to_dict().items() if k not in ("level_free", "ref_free")}
    assert FiberLevels.from_dict(old).level_free is None  # levels saved before the field
    lab = segment_fibers(s.rgb, mpp=s.mpp, model=model, tissue=tissue, levels=lv)
    np.testing.assert_array_equal(
        lab, segment_fibers(s.rgb, mpp=s.mpp, model=model, tissue=tissue))
    m, count_err = _complete(lab, s.fibers)
    assert m.f1 >= 0.90, m
    assert abs(count_err) <= 0.06, count_err


# ----------------------------------------------------------------------------- fiber table


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_fiber_table_geometry():
    lab = np.zeros((300, 400), np.int32)
    lab[_disk(lab.shape, 100, 100, 40)] = 1
    lab[150:190, 200:300] = 2  # 100 x 40 px rectangle
    lab[0:30, 350:380] = 3  # touches the image border
    mpp = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = fiber_table(lab, mpp=mpp).set_index("fiber_id")
    assert list(t.reset_index().columns) == list(FIBER_COLUMNS)
    d = t.loc[1]
    assert d.area_um2 == pytest.approx(math.pi * 40**2 * mpp**2, rel=0.02)
    assert d.min_feret_um == pytest.approx(81 * mpp, rel=0.03)
    assert d.max_feret_um == pytest.approx(81 * mpp, rel=0.03)
    assert d.perimeter_um == pytest.approx(2 * math.pi * 40 * mpp, rel=0.05)
    assert d.eccentricity < 0.1 and d.solidity > 0.95
    assert (d.x_px, d.y_px) == pytest.approx((100, 100), abs=0.01)
    assert (d.x_um, d.y_um) == pytest.approx((50, 50), abs=0.01)
    r = t.loc[2]
    assert r.min_feret_um == pytest.approx(40 * mpp, abs=0.01)
    assert r.max_feret_um == pytest.approx(math.hypot(100, 40) * mpp, abs=0.01)
    assert r.area_px == 4000 and r.solidity == pytest.approx(1.0, abs=1e-6)
    assert r.eccentricity == pytest.approx(math.sqrt(1 - (40 / 100) ** 2), abs=0.02)
    assert not d.touches_edge and not r.touches_edge and t.loc[3].touches_edge
    assert (t.n_internal_nuclei == -1).all()  # no hematoxylin image given
    assert t.fascicle_edge_distance_um.isna().all()


def test_fiber_table_edges_exclusion_and_nuclei():
    shape = (300, 300)
    lab = np.zeros(shape, np.int32)
    lab[_disk(shape, 80, 80, 50)] = 1
    lab[_disk(shape, 200, 200, 50)] = 2
    tissue = np.ones(shape, bool)
    tissue[:, 270:] = False  # fiber 2 reaches x=250: 20 px = 10 µm from the edge -> no touch
    tissue[:, 252:] = False  # now 2 px away -> touches
    exclusion = np.zeros(shape, bool)
    exclusion[0:20, 60:100] = True  # 10 px above fiber 1's top (y=30) at 0.5 µm/px -> 5 µm
    hema = np.zeros(shape, np.float32)
    hema[_disk(shape, 80, 80, 5)] = 0.6  # central nucleus of fiber 1
    hema[_disk(shape, 200, 153, 5)] = 0.6  # peripheral nucleus of fiber 2 (centre 3 px inside)
    hema[_disk(shape, 215, 200, 5)] = 0.6  # internal nucleus of fiber 2
    t = fiber_table(lab, mpp=0.5, hema_od=hema, tissue=tissue, exclusion=exclusion,
                    params=FiberParams(edge_distance_um=2.0)).set_index("fiber_id")
    assert not t.loc[1].touches_edge and t.loc[2].touches_edge
    assert not t.loc[1].touches_exclusion  # 5 µm away > 2 µm
    t2 = fiber_table(lab, mpp=0.5, exclusion=exclusion,
                     params=FiberParams(edge_distance_um=6.0)).set_index("fiber_id")
    assert t2.loc[1].touches_exclusion and not t2.loc[2].touches_exclusion
    assert t.loc[1].n_internal_nuclei == 1
    assert t.loc[2].n_internal_nuclei == 1


def test_fiber_table_without_mpp():
    lab = np.zeros((100, 100), np.int32)
    lab[20:60, 20:60] = 7
    t = fiber_table(lab, mpp=None)
    assert t.fiber_id.tolist() == [7] and t.area_px.tolist() == [1600]
    for c in ("x_um", "y_um", "area_um2", "min_feret_um", "max_feret_um", "perimeter_um"):
        assert t[c].isna().all()
    assert t.x_px.iloc[0] == pytest.approx(39.5)


def test_fiber_table_matches_synthetic_truth():
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    s = synthetic.generate_section(marker="CD163", seed=5, shape=(512, 512), mpp=0.5)
    t = fiber_table(s.fibers, mpp=s.mpp, hema_od=s.hema_od, tissue=s.tissue)
    ft = s.fiber_truth.set_index("id")
    t = t.set_index("fiber_id").loc[ft.index]
    np.testing.assert_allclose(t.area_um2, ft.area_um2, rtol=0.01)
    np.testing.assert_allclose(t.x_um, ft.x_um, atol=0.5)
    # Feret by rotating calipers on the pixel-corner hull vs the generator's 36-angle estimate
    big = ft.area_um2 > 200
    np.testing.assert_allclose(t.min_feret_um[big], ft.min_feret_um[big], rtol=0.08, atol=1.0)


def test_fiber_table_bad_input():
    with pytest.raises(InputError, match="labels"):
        fiber_table(np.zeros((5, 5), float), mpp=0.5)
    with pytest.raises(InputError, match="hema_od"):
        fiber_table(np.ones((5, 5), np.int32), mpp=0.5, hema_od=np.zeros((4, 4)))


def test_saddle_merge_equals_h_maxima():
    """Markers = local maxima merged across shallow saddles give the h-maxima's basins."""
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    from biopsyquant.fibers import _merge_shallow

    yy, xx = np.mgrid[0:80, 0:160].astype(np.float32)

    def bump(cx, cy, a):
        return a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 12.0**2))

    # two peaks of heights 10 and 8 with a saddle ~ 4.3 below the lower peak
    relief = bump(50, 40, 10.0) + bump(100, 40, 8.0)
    core = relief > 0.5

    def basins(h):
        peaks = core & (relief >= ndi.maximum_filter(relief, size=3)) & (relief > 0.5)
        markers, _ = ndi.label(peaks, structure=np.ones((3, 3)))
        lab = watershed(-relief, markers, mask=core).astype(np.int32)
        return _merge_shallow(lab, relief, h)

    assert basins(3.0).max() == 2
    assert basins(6.0).max() == 1
    # a random smooth relief: same number of basins as skimage's h-maxima
    rng = np.random.default_rng(3)
    relief = ndi.gaussian_filter(rng.normal(size=(120, 120)), 4).astype(np.float32)
    relief = (relief - relief.min()) * np.float32(200.0)
    core = np.ones(relief.shape, bool)
    for h in (2.0, 5.0, 10.0):
        q = np.round(relief * 4).astype(np.uint16)
        n_ref = ndi.label(h_maxima(q, int(h * 4)), structure=np.ones((3, 3)))[1]
        n_new = int(basins(h).max())
        assert abs(n_new - n_ref) <= max(1, 0.1 * n_ref), (h, n_new, n_ref)


def test_slide_levels_reproduce_own_levels():
    """``fiber_levels`` of the image itself gives the default result, pooled regions give
    the statistics of their union (whole vs tiled slides: tests/test_wsi_tiling.py)."""
    from biopsyquant.fibers import FiberLevels, fiber_levels
    from biopsyquant.synthetic import generate_section

    sec = generate_section(marker="CD163", seed=4, shape=(1024, 1024), mpp=0.5)
    rgb = sec.rgb
    own = segment_fibers(rgb, mpp=0.5)
    lv = fiber_levels([rgb], mpp=0.5)
    assert isinstance(lv, FiberLevels) and 0.02 <= lv.level_c <= lv.level_t
    assert FiberLevels.from_dict(lv.to_dict()) == lv
    assert np.array_equal(segment_fibers(rgb, mpp=0.5, levels=lv), own)
    # pooled over the four quadrants = statistics of the same pixels (up to the borders
    # of the quadrants' smoothing)
    quads = [rgb[:512, :512], rgb[:512, 512:], rgb[512:, :512], rgb[512:, 512:]]
    lq = fiber_levels(quads, mpp=0.5)
    assert lq.level_c == pytest.approx(lv.level_c, rel=0.05)
    assert lq.level_t == pytest.approx(lv.level_t, rel=0.05)
    with pytest.raises(InputError, match="tissue mask has shape"):
        fiber_levels([rgb], mpp=0.5, tissues=[np.ones((5, 5), bool)])
    assert fiber_levels([], mpp=0.5) is None


def _score_inputs(marker, seed, **opts):
    """A 1024² generated section as score_image hands it to segment_fibers: flat-field
    corrected, with the per-image stain model and tissue mask."""
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    from biopsyquant.score import prepare_flat_field, prepare_stain_model
    from biopsyquant.settings import load_settings
    from biopsyquant.tissue import detect_tissue

    s = synthetic.generate_section(marker=marker, seed=seed, shape=(1024, 1024), mpp=0.5,
                                   vector_jitter_deg=3.0, illumination=0.1, jpeg_quality=85,
                                   **opts)
    st = load_settings(marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rgb = prepare_flat_field(s.rgb, st, mpp=s.mpp).apply(s.rgb)
        model = prepare_stain_model(rgb, st)
    tissue = detect_tissue(rgb, mpp=s.mpp, background=model.background, params=st.tissue)
    return s, rgb, model, tissue


#: the granular-DAB rules off (the defaults before them)
_NO_GRANULE_RULES = {"dab_granule_um": 0.0, "pale_line_free_fraction": 0.0}


@pytest.mark.slow
def test_granular_dab_does_not_break_fibers_pipeline():
    """IL-1a seed 14 at expression 0.9 (granular sarcoplasmic DAB), as score_image segments
    it: granules leak into the unmixed hematoxylin and drew false lines inside the DAB
    patches, so fibers were cut into ragged pieces that failed the solidity test (46 of 53
    complete fibers matched, 2 false objects, F1 0.911). Hematoxylin lines on DAB granules are
    now ignored: 50 matched, none false, F1 0.971 (the complete-fiber count is 48 of 53
    because two matched fibers reach the image border)."""
    s, rgb, model, tissue = _score_inputs("IL-1a", 14, expression=0.9)
    lab = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue)
    m, count_err = _complete(lab, s.fibers)
    assert m.f1 >= 0.96 and m.fn <= 4 and m.fp <= 1, m
    assert abs(count_err) <= 0.10, count_err
    old = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue,
                         params=FiberParams(**_NO_GRANULE_RULES))
    m_old = _complete(old, s.fibers)[0]
    assert m_old.f1 <= 0.93 and m_old.fn >= 6, m_old
    no_granule = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue,
                                params=FiberParams(dab_granule_um=0.0))
    assert _complete(no_granule, s.fibers)[0].f1 <= m.f1 - 0.04


@pytest.mark.slow
def test_faint_granules_make_no_pale_boundaries_pipeline():
    """IL-1Ra seed 12 at expression 0.5: faint granules (mostly below the DAB-patch level)
    drew pale lines on the total OD through the fibers (F1 0.931 on complete fibers, 4 false
    pieces); with ``pale_line_free_fraction`` = 0.3 a pale line must also be pale on the
    DAB-free OD (F1 0.974, count -1.7 %). The rule is opt-in (default 0): see FiberParams."""
    s, rgb, model, tissue = _score_inputs("IL-1Ra", 12, expression=0.5)
    lab = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue,
                         params=FiberParams(pale_line_free_fraction=0.3))
    m, count_err = _complete(lab, s.fibers)
    assert m.f1 >= 0.965 and m.fp <= 2, m
    assert abs(count_err) <= 0.04, count_err
    no_pale_test = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue,
                                  params=FiberParams(pale_line_free_fraction=0.0))
    assert _complete(no_pale_test, s.fibers)[0].f1 <= m.f1 - 0.03


@pytest.mark.slow
def test_counterstain_mode_keeps_isolated_dab_fibers_out_of_connective_tissue():
    """MHC-I seed 11 at 90 % positive (counterstain mode: DAB on nearly every fiber): three
    DAB-filled fibers lying alone in loose perimysium grew into it, failed the solidity test
    and were lost (true fibers 9, 26, 67), taking % positive 5 points low. On the DAB-free OD
    the connective tissue is still darker than the DAB-filled fibers, and the counterstain-mode
    interstitium rule removes it from the cores where the DAB is low: all three are found."""
    s, rgb, model, tissue = _score_inputs("MHC-I", 11, positive_fiber_fraction=0.9)

    def iou_of(lab, t):
        m = s.fibers == t
        ids, cnt = np.unique(lab[m], return_counts=True)
        b = ids[np.argmax(cnt)]
        return 0.0 if b == 0 else cnt.max() / (m.sum() + (lab == b).sum() - cnt.max())

    lab = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue)
    old = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue,
                         params=FiberParams(counterstain_interstitium_ratio=0.0))
    for t in (9, 26, 67):
        assert iou_of(lab, t) >= 0.6, t
    assert sum(iou_of(old, t) >= 0.5 for t in (9, 26, 67)) == 0
    m, count_err = _complete(lab, s.fibers)
    assert m.f1 >= 0.97 and abs(count_err) <= 0.05, (m, count_err)


def _small_fibers_matched(lab, truth, *, max_um=20.0, mpp=0.5):
    """(matched, total) complete truth fibers under ``max_um`` equivalent diameter, IoU ≥ 0.5."""
    from biopsyquant.evaluate import border_labels, match_label_pairs

    matched = set(match_label_pairs(lab, truth)[:, 1].tolist())
    area = np.bincount(truth.ravel())
    ids = np.flatnonzero(area)
    ids = ids[(ids > 0) & ~np.isin(ids, border_labels(truth))
              & (2 * np.sqrt(area[ids] / np.pi) * mpp < max_um)]
    return sum(int(i) in matched for i in ids), len(ids)


@pytest.mark.slow
@pytest.mark.parametrize("marker,seed,opts", [
    ("CD163", 16, {"cells_per_mm2": 0}),
    ("MHC-I", 33, {"positive_fiber_fraction": 0.3, "atrophic_fraction": 0.3,
                   "perifascicular_atrophy": True}),
])
def test_small_fiber_pass_finds_atrophic_fibers_in_connective_tissue(marker, seed, opts):
    """Atrophic fibers (< 20 µm) lying in widened endomysium are covered by the endomysium
    lines around them and never got a core: CD163 seed 16 matched 0 of its 3, MHC-I seed 33
    with perifascicular atrophy 1 of 7. The small-fiber pass adds pale, smooth, compact
    islands that connective tissue surrounds: one more each, and no false object."""
    s, rgb, model, tissue = _score_inputs(marker, seed, **opts)
    on = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue)
    off = segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue,
                         params=FiberParams(small_fiber_max_um=0.0))
    m_on, m_off = _complete(on, s.fibers)[0], _complete(off, s.fibers)[0]
    small_on, n_small = _small_fibers_matched(on, s.fibers)
    small_off, _ = _small_fibers_matched(off, s.fibers)
    assert n_small >= 3
    assert small_on >= small_off + 1, (small_on, small_off, n_small)
    assert m_on.fp == m_off.fp == 0 and m_on.tp == m_off.tp + 1, (m_on, m_off)
    # the pass only adds objects: every fiber found without it is unchanged
    assert np.array_equal(np.where(np.isin(on, np.unique(off[off > 0])), on, 0) > 0, off > 0)


@pytest.mark.slow
def test_small_fiber_pass_is_off_in_counterstain_mode():
    """The pass relies on connective tissue being darker than fibers on the DAB-free OD; in
    counterstain mode (DAB on nearly every fiber) it must not run, with DAB it must."""
    from biopsyquant import fibers as F

    calls = []
    orig = F._small_fiber_candidates

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    try:
        F._small_fiber_candidates = spy
        for fraction, expect in ((0.9, []), (0.0, [1])):
            calls.clear()
            s, rgb, model, tissue = _score_inputs("MHC-I", 11, positive_fiber_fraction=fraction)
            levels = F.fiber_levels([rgb], mpp=s.mpp, model=model, tissues=[tissue])
            F.segment_fibers(rgb, mpp=s.mpp, model=model, tissue=tissue)
            assert levels.counterstain == (fraction > 0.5)
            assert calls == expect, fraction
    finally:
        F._small_fiber_candidates = orig
