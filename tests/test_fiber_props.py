"""Tests of the whole-image fiber table (biopsyquant._fiber_props.fiber_properties).

The reference is a frozen copy of the per-fiber loop that ``fibers.fiber_table`` used before it
switched to :func:`fiber_properties` (and of the ``ndi.minimum`` fascicle edge distance): every
column must agree -- integers and flags exactly, floats to 1e-9 relative (centroids, moments,
perimeter, hull and calipers are the same definitions computed in another order).
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.measure import perimeter as _sk_perimeter

from biopsyquant._fiber_props import FIBER_COLUMNS, _nucleus_depth_px, fiber_properties
from biopsyquant.compartments import CompartmentParams, _check_mpp
from biopsyquant.errors import InputError
from biopsyquant.fibers import FiberParams

# ================================================================ frozen reference (old loop)


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _gauss(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.1:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px,
                            borderType=cv2.BORDER_REFLECT)




def _ref_fascicle_edge_distance_um(
    fiber_labels: np.ndarray,
    codes: np.ndarray,
    *,
    mpp: float | None,
    params: CompartmentParams | None = None,
) -> pd.Series:
    """Distance from each fiber's outline to the nearest fascicle edge.

    The fascicle edge is every pixel whose code is in ``params.fascicle_edge_codes``
    (default perimysium, vessel, perivascular). The distance is measured from the fiber pixel
    nearest to the edge (0 for a fiber touching it).

    Parameters
    ----------
    fiber_labels : ndarray of int, shape (H, W)
    codes : ndarray of uint8, shape (H, W)
    mpp : float or None
        µm per pixel; None gives NaN distances.
    params : CompartmentParams, optional

    Returns
    -------
    Series of float, indexed by ``fiber_id``, name ``fascicle_edge_distance_um``
        NaN where the section has no fascicle edge at all.
    """
    params = CompartmentParams() if params is None else params
    fiber_labels = np.asarray(fiber_labels)
    codes = np.asarray(codes)
    if fiber_labels.shape != codes.shape or fiber_labels.ndim != 2:
        raise InputError(f"`fiber_labels` {fiber_labels.shape} and `codes` {codes.shape} must be "
                         "2-D images of the same shape")
    ids = np.flatnonzero(np.bincount(fiber_labels.ravel().astype(np.intp)))
    ids = ids[ids > 0]
    name = "fascicle_edge_distance_um"
    if len(ids) == 0:
        return pd.Series([], index=pd.Index([], name="fiber_id", dtype=np.int32), name=name,
                         dtype=float)
    edge = np.isin(codes, np.asarray(params.fascicle_edge_codes, np.uint8))
    if mpp is None or not edge.any():
        return pd.Series(np.nan, index=pd.Index(ids.astype(np.int32), name="fiber_id"),
                         name=name)
    mpp = _check_mpp(mpp)
    d = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 5)
    dmin = ndi.minimum(d, labels=fiber_labels, index=ids)
    dist_um = np.maximum(np.asarray(dmin, float) - 1.0, 0.0) * mpp
    return pd.Series(dist_um, index=pd.Index(ids.astype(np.int32), name="fiber_id"), name=name)


def _feret(hull: np.ndarray) -> tuple[float, float]:
    """(min, max) Feret diameter of a convex polygon (N, 2) by rotating calipers."""
    p = hull.reshape(-1, 2).astype(np.float64)
    if len(p) < 3:
        d = float(np.hypot(*(p.max(0) - p.min(0)))) if len(p) else 0.0
        return d, d
    e = np.roll(p, -1, axis=0) - p
    norm = np.hypot(e[:, 0], e[:, 1])
    ok = norm > 0
    e, base = e[ok] / norm[ok, None], p[ok]
    # distance of every vertex to every edge line
    rel = p[None, :, :] - base[:, None, :]
    dist = np.abs(rel[..., 0] * e[:, None, 1] - rel[..., 1] * e[:, None, 0])
    min_f = float(dist.max(axis=1).min())
    diff = p[:, None, :] - p[None, :, :]
    max_f = float(np.sqrt((diff**2).sum(-1)).max())
    return min_f, max_f


def _empty_table() -> pd.DataFrame:
    cols = {
        "fiber_id": pd.Series(dtype=np.int32),
        "x_px": pd.Series(dtype=float), "y_px": pd.Series(dtype=float),
        "x_um": pd.Series(dtype=float), "y_um": pd.Series(dtype=float),
        "area_px": pd.Series(dtype=np.int64),
        "area_um2": pd.Series(dtype=float), "min_feret_um": pd.Series(dtype=float),
        "max_feret_um": pd.Series(dtype=float), "perimeter_um": pd.Series(dtype=float),
        "eccentricity": pd.Series(dtype=float), "solidity": pd.Series(dtype=float),
        "touches_edge": pd.Series(dtype=bool), "touches_exclusion": pd.Series(dtype=bool),
        "n_internal_nuclei": pd.Series(dtype=np.int64),
        "fascicle_edge_distance_um": pd.Series(dtype=float),
    }
    return pd.DataFrame(cols)[list(FIBER_COLUMNS)]


def _detect_nuclei(hema_od: np.ndarray, mpp: float, params: FiberParams
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hematoxylin blobs: centroids x, y (px) and estimated nucleus count per blob."""
    sigma = 0.7 / mpp
    h = _gauss(np.ascontiguousarray(hema_od, dtype=np.float32), sigma)
    m = (h > params.nucleus_min_od).astype(np.uint8)
    n, _, stats, cents = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        e = np.zeros(0)
        return e, e, e
    area_um2 = stats[1:, cv2.CC_STAT_AREA] * mpp * mpp
    cents = cents[1:]
    ok = area_um2 >= params.nucleus_min_area_um2
    count = np.where(area_um2 > params.nucleus_max_area_um2,
                     np.maximum(1, np.round(area_um2 / params.nucleus_typical_area_um2)), 1)
    return cents[ok, 0], cents[ok, 1], count[ok]


def _ref_fiber_table(
    labels: np.ndarray,
    *,
    mpp: float | None,
    hema_od: np.ndarray | None = None,
    tissue: np.ndarray | None = None,
    exclusion: np.ndarray | None = None,
    compartments: np.ndarray | None = None,
    params: FiberParams | None = None,
) -> pd.DataFrame:
    """One row per fiber: position, size, shape, edge contacts and internal nuclei.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Fiber labels (0 = none), e.g. from :func:`segment_fibers`.
    mpp : float or None
        Pixel size (µm/px). When None every µm column is NaN (pixel columns remain).
    hema_od : ndarray of float, shape (H, W), optional
        Hematoxylin OD (log10); needed for ``n_internal_nuclei`` (else 0... see Notes).
    tissue : ndarray of bool, shape (H, W), optional
        Tissue mask: fibers within ``params.edge_distance_um`` of non-tissue touch the edge.
    exclusion : ndarray of bool, shape (H, W), optional
        Excluded regions: fibers within ``params.edge_distance_um`` touch an exclusion.
    compartments : ndarray of uint8, shape (H, W), optional
        Compartment codes; fills ``fascicle_edge_distance_um`` (see
        :func:`biopsyquant.compartments.fascicle_edge_distance_um`).
    params : FiberParams, optional
        Nucleus and edge settings.

    Returns
    -------
    DataFrame
        Columns :data:`FIBER_COLUMNS`: ``fiber_id`` (label value), ``x_px``, ``y_px`` (centroid,
        column/row), ``x_um``, ``y_um``, ``area_px``, ``area_um2``, ``min_feret_um``,
        ``max_feret_um`` (calipers of the pixel-corner convex hull), ``perimeter_um``,
        ``eccentricity`` (of the moment ellipse), ``solidity`` (area / hull area),
        ``touches_edge`` (image border or tissue edge), ``touches_exclusion``,
        ``n_internal_nuclei`` (hematoxylin blobs centred deeper than
        ``internal_nucleus_depth_um``; -1 when ``hema_od`` is None), and
        ``fascicle_edge_distance_um`` (NaN without ``compartments``).

    Notes
    -----
    With no fibers a :class:`UserWarning` is issued and an empty table with these columns
    is returned.
    """
    params = FiberParams() if params is None else params
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"`labels` must be a 2-D integer label image, got {labels.dtype} "
                         f"{labels.shape}")
    shape = labels.shape
    for name, arr in (("hema_od", hema_od), ("tissue", tissue), ("exclusion", exclusion),
                      ("compartments", compartments)):
        if arr is not None and np.shape(arr) != shape:
            raise InputError(f"`{name}` has shape {np.shape(arr)}, labels have {shape}")
    if mpp is not None:
        mpp = float(mpp)
        if not math.isfinite(mpp) or mpp <= 0:
            raise InputError(f"mpp must be a positive number of µm per pixel or None, got {mpp}")
    if labels.max(initial=0) <= 0:
        warnings.warn("fiber_table: no fibers in the label image; returning an empty table",
                      UserWarning, stacklevel=2)
        return _empty_table()
    labels = labels.astype(np.int32, copy=False)
    px_um = mpp if mpp is not None else 1.0
    edge_px = params.edge_distance_um / px_um + 1.0

    near_out = None
    if tissue is not None:
        nt = (~np.asarray(tissue, bool)).astype(np.uint8)
        near_out = cv2.dilate(nt, _disk(edge_px)).astype(bool) if nt.any() else None
    near_ex = None
    if exclusion is not None and np.any(exclusion):
        near_ex = cv2.dilate(np.asarray(exclusion, bool).astype(np.uint8),
                             _disk(edge_px)).astype(bool)

    # nuclei: centroid -> fiber, depth checked per fiber below
    nuc_by_fiber: dict[int, list[tuple[float, float, float]]] = {}
    if hema_od is not None:
        nx, ny, ncount = _detect_nuclei(hema_od, px_um, params)
        if len(nx):
            xi = np.clip(np.round(nx).astype(int), 0, shape[1] - 1)
            yi = np.clip(np.round(ny).astype(int), 0, shape[0] - 1)
            owner = labels[yi, xi]
            for k in np.flatnonzero(owner > 0):
                nuc_by_fiber.setdefault(int(owner[k]), []).append((nx[k], ny[k], ncount[k]))
    depth_px = params.internal_nucleus_depth_um / px_um

    rows = []
    slices = ndi.find_objects(labels)
    H, W = shape
    for i, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        y0, x0 = sl[0].start, sl[1].start
        m = (labels[sl] == i)
        mu8 = m.astype(np.uint8)
        mom = cv2.moments(mu8, binaryImage=True)
        area = mom["m00"]
        if area <= 0:
            continue
        cx, cy = mom["m10"] / area, mom["m01"] / area
        mu20, mu02, mu11 = mom["mu20"] / area, mom["mu02"] / area, mom["mu11"] / area
        common = math.sqrt(max((mu20 - mu02) ** 2 + 4 * mu11 * mu11, 0.0))
        l1, l2 = (mu20 + mu02 + common) / 2, (mu20 + mu02 - common) / 2
        ecc = math.sqrt(max(1 - l2 / l1, 0.0)) if l1 > 0 else 0.0
        cnts, _ = cv2.findContours(mu8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        pts = np.concatenate(cnts).reshape(-1, 2).astype(np.float32)
        corners = (pts[:, None, :] + np.array([[-.5, -.5], [.5, -.5], [.5, .5], [-.5, .5]],
                                              np.float32)[None]).reshape(-1, 2)
        hull = cv2.convexHull(corners)
        harea = cv2.contourArea(hull)
        min_f, max_f = _feret(hull)
        per = float(_sk_perimeter(m, neighborhood=4)) if min(m.shape) > 1 else 2.0 * (
            m.shape[0] + m.shape[1])
        touches = (sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == H or sl[1].stop == W)
        if not touches and near_out is not None:
            touches = bool(near_out[sl][m].any())
        t_ex = bool(near_ex[sl][m].any()) if near_ex is not None else False
        n_int = -1 if hema_od is None else 0
        if i in nuc_by_fiber:
            pad = np.pad(mu8, 1)
            dt = cv2.distanceTransform(pad, cv2.DIST_L2, 5)
            for nxk, nyk, ck in nuc_by_fiber[i]:
                xx = int(round(nxk)) - x0 + 1
                yy = int(round(nyk)) - y0 + 1
                if dt[yy, xx] > depth_px:
                    n_int += int(ck)
        rows.append((i, x0 + cx, y0 + cy, int(area), min_f, max_f, per, ecc,
                     float(area / harea) if harea > 0 else 1.0, touches, t_ex, n_int))
    df = pd.DataFrame(rows, columns=["fiber_id", "x_px", "y_px", "area_px", "min_feret_px",
                                     "max_feret_px", "perimeter_px", "eccentricity",
                                     "solidity", "touches_edge", "touches_exclusion",
                                     "n_internal_nuclei"])
    f = mpp if mpp is not None else float("nan")
    df["x_um"] = df["x_px"] * f
    df["y_um"] = df["y_px"] * f
    df["area_um2"] = df["area_px"] * f * f
    df["min_feret_um"] = df.pop("min_feret_px") * f
    df["max_feret_um"] = df.pop("max_feret_px") * f
    df["perimeter_um"] = df.pop("perimeter_px") * f
    df["fascicle_edge_distance_um"] = np.nan
    df["fiber_id"] = df["fiber_id"].astype(np.int32)
    df["solidity"] = df["solidity"].clip(upper=1.0)
    if compartments is not None and mpp is not None:
        d = _ref_fascicle_edge_distance_um(labels, compartments, mpp=mpp)
        df["fascicle_edge_distance_um"] = d.reindex(df["fiber_id"]).to_numpy()
    return df[list(FIBER_COLUMNS)]


# ================================================================ tests

RTOL = 1e-9
INT_COLS = ("fiber_id", "area_px", "n_internal_nuclei")
BOOL_COLS = ("touches_edge", "touches_exclusion")


def _assert_same(new: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert list(new.columns) == list(FIBER_COLUMNS) == list(ref.columns)
    assert len(new) == len(ref)
    for c in FIBER_COLUMNS:
        a, b = new[c].to_numpy(), ref[c].to_numpy()
        assert new[c].dtype == ref[c].dtype, (c, new[c].dtype, ref[c].dtype)
        if c in INT_COLS or c in BOOL_COLS:
            np.testing.assert_array_equal(a, b, err_msg=c)
        else:
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-9, err_msg=c)


@pytest.fixture(scope="module")
def section():
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    return synthetic.generate_section(marker="MHC-I", seed=3, shape=(768, 768), mpp=0.5)


def test_synthetic_section_matches_reference(section):
    s = section
    kw = dict(mpp=s.mpp, hema_od=s.hema_od, tissue=s.tissue, compartments=s.compartments)
    ref = _ref_fiber_table(s.fibers, **kw)
    new = fiber_properties(s.fibers, **kw)
    assert len(new) >= 20
    _assert_same(new, ref)
    # the section exercises every column
    assert new.touches_edge.any() and not new.touches_edge.all()
    assert (new.n_internal_nuclei >= 0).all()  # seed 3 draws no central nuclei: see below
    assert np.isfinite(new.fascicle_edge_distance_um).all()


def test_synthetic_exclusion_and_mpp_none(section):
    s = section
    ex = np.zeros(s.fibers.shape, bool)
    ex[300:420, 200:330] = True
    kw = dict(hema_od=s.hema_od, tissue=s.tissue, exclusion=ex)
    for mpp in (s.mpp, None):
        ref = _ref_fiber_table(s.fibers, mpp=mpp, **kw)
        new = fiber_properties(s.fibers, mpp=mpp, **kw)
        _assert_same(new, ref)
        assert new.touches_exclusion.any()
    assert new.x_um.isna().all() and new.area_um2.isna().all()
    # different settings: shallower internal-nucleus rule, wider edge band
    p = FiberParams(internal_nucleus_depth_um=1.5, edge_distance_um=6.0, nucleus_min_od=0.15)
    new = fiber_properties(s.fibers, mpp=s.mpp, params=p, **kw)
    _assert_same(new, _ref_fiber_table(s.fibers, mpp=s.mpp, params=p, **kw))
    assert new.n_internal_nuclei.sum() > 10


def _shapes() -> np.ndarray:
    """Constructed fibers: disk, rectangle, border contacts, a ring with a hole and an island,
    an L shape, a 1-px line, a single pixel, two touching fibers, label ids with gaps."""
    lab = np.zeros((160, 220), np.int32)
    yy, xx = np.mgrid[0:160, 0:220]
    lab[np.hypot(yy - 40, xx - 40) <= 25] = 3                      # disk
    lab[10:30, 90:150] = 7                                           # rectangle
    lab[0:20, 170:220] = 8                                           # corner of the image
    ring = (np.hypot(yy - 110, xx - 60) <= 30) & (np.hypot(yy - 110, xx - 60) > 12)
    lab[ring] = 20                                                   # fiber with a hole ...
    lab[108:113, 58:63] = 20                                         # ... and an island in it
    lab[60:130, 120:130] = 21                                        # L shape
    lab[120:130, 120:170] = 21
    lab[50:51, 150:190] = 22                                         # 1-px thick line
    lab[70, 200] = 23                                                # single pixel
    lab[140:160, 180:200] = 40                                       # touching fibers at the
    lab[140:160, 200:220] = 41                                       # bottom-right corner
    lab[60:100, 150:190][np.hypot(yy[60:100, 150:190] - 80, xx[60:100, 150:190] - 170)
                         <= 15] = 1000                               # big id gap
    return lab


def test_constructed_shapes_match_reference():
    lab = _shapes()
    tissue = np.ones(lab.shape, bool)
    tissue[:, :8] = False
    hema = np.zeros(lab.shape, np.float32)
    for y, x in ((40, 40), (110, 60), (110, 45), (20, 120), (150, 210), (80, 170), (128, 125)):
        hema[y - 3:y + 4, x - 3:x + 4] = 0.6                         # nuclei, deep and shallow
    ex = np.zeros(lab.shape, bool)
    ex[75:90, 100:112] = True
    for mpp in (0.5, 1.0, None):
        kw = dict(mpp=mpp, hema_od=hema, tissue=tissue, exclusion=ex)
        new = fiber_properties(lab, **kw)
        _assert_same(new, _ref_fiber_table(lab, **kw))
    t = fiber_properties(lab, mpp=1.0).set_index("fiber_id")
    assert t.index.tolist() == [3, 7, 8, 20, 21, 22, 23, 40, 41, 1000]
    # ground truth for simple shapes
    assert t.loc[7, "area_px"] == 20 * 60
    assert t.loc[7, "perimeter_um"] == pytest.approx(2 * (19 + 59))   # skimage: centre lines
    assert (t.loc[7, "min_feret_um"], t.loc[7, "max_feret_um"]) == pytest.approx(
        (20, math.hypot(20, 60)))
    assert t.loc[7, "solidity"] == 1.0 and t.loc[7, "x_px"] == pytest.approx(119.5)
    assert t.loc[22, "perimeter_um"] == 2 * (1 + 40)
    assert t.loc[23, "area_px"] == 1 and t.loc[23, "max_feret_um"] == pytest.approx(math.sqrt(2))
    assert t.loc[3, "eccentricity"] < 0.05 and t.loc[3, "solidity"] > 0.95
    assert t.touches_edge.loc[[8, 40, 41]].all() and not t.touches_edge.loc[[3, 7]].any()


def test_labels_dtypes_and_non_contiguous():
    lab = _shapes()
    ref = _ref_fiber_table(lab, mpp=0.5)
    for arr in (lab.astype(np.uint16), lab.astype(np.int64), np.asfortranarray(lab)):
        _assert_same(fiber_properties(arr, mpp=0.5), ref)
    sub = np.pad(lab, 3)[3:-3, 3:-3]
    _assert_same(fiber_properties(sub[::1, ::1], mpp=0.5), ref)


def test_random_blobs_match_reference():
    rng = np.random.default_rng(7)
    noise = ndi.gaussian_filter(rng.normal(size=(300, 300)), 6)
    lab, _ = ndi.label(noise > 0.02)
    lab = lab.astype(np.int32)
    lab[lab % 3 == 0] = 0                                              # gaps in the ids
    hema = np.where(ndi.gaussian_filter(rng.normal(size=lab.shape), 2) > 0.12, 0.8, 0.0)
    tissue = ndi.gaussian_filter(rng.normal(size=lab.shape), 10) > -0.03
    kw = dict(mpp=0.5, hema_od=hema.astype(np.float32), tissue=tissue)
    new = fiber_properties(lab, **kw)
    assert len(new) > 10
    _assert_same(new, _ref_fiber_table(lab, **kw))


def test_nucleus_depth_windows_equal_full_transform():
    """The stacked-window depth equals the per-fiber transform wherever it is <= the limit."""
    rng = np.random.default_rng(1)
    noise = ndi.gaussian_filter(rng.normal(size=(200, 200)), 5)
    lab, n = ndi.label(noise > 0)
    lab = lab.astype(np.int32)
    ys, xs = np.nonzero(lab)
    pick = rng.choice(len(ys), 400, replace=False)
    yi, xi = ys[pick], xs[pick]
    owner = lab[yi, xi]
    for depth in (0.0, 2.5, 4.0, 7.9):
        got = _nucleus_depth_px(lab, yi, xi, owner, depth)
        for k in range(len(yi)):
            sl = ndi.find_objects((lab == owner[k]).astype(np.int32))[0]
            pad = np.pad((lab[sl] == owner[k]).astype(np.uint8), 1)
            dt = cv2.distanceTransform(pad, cv2.DIST_L2, 5)
            full = dt[yi[k] - sl[0].start + 1, xi[k] - sl[1].start + 1]
            if full <= depth:
                assert got[k] == full
            else:
                assert got[k] > depth


def test_empty_labels_warn_and_return_columns():
    with pytest.warns(UserWarning, match="no fibers"):
        t = fiber_properties(np.zeros((50, 60), np.int32), mpp=0.5)
    assert list(t.columns) == list(FIBER_COLUMNS) and len(t) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _ref_fiber_table(np.zeros((50, 60), np.int32), mpp=0.5)
    pd.testing.assert_frame_equal(t, ref)


def test_bad_input():
    lab = np.zeros((10, 10), np.int32)
    lab[2:5, 2:5] = 1
    with pytest.raises(InputError, match="2-D integer"):
        fiber_properties(lab.astype(float), mpp=0.5)
    with pytest.raises(InputError, match="hema_od"):
        fiber_properties(lab, mpp=0.5, hema_od=np.zeros((5, 5)))
    with pytest.raises(InputError, match="mpp"):
        fiber_properties(lab, mpp=-1)


def test_fiber_table_delegates_with_the_same_columns(section):
    """fibers.fiber_table is the public entry point: same column list, same table."""
    from biopsyquant import fibers

    assert tuple(fibers.FIBER_COLUMNS) == FIBER_COLUMNS
    s = section
    kw = dict(mpp=s.mpp, hema_od=s.hema_od, tissue=s.tissue, compartments=s.compartments)
    pd.testing.assert_frame_equal(fibers.fiber_table(s.fibers, **kw),
                                  fiber_properties(s.fibers, **kw))
