"""Per-fiber morphometry of a fiber label image in a few whole-image passes.

Private module behind :func:`biopsyquant.fibers.fiber_table`. :func:`fiber_properties` returns
the same table as the historical per-fiber loop (``cv2.moments``, ``cv2.findContours`` +
``cv2.convexHull`` + rotating calipers, ``skimage.measure.perimeter`` and one distance transform
per fiber) but measures every fiber at once:

* two compiled raster passes over the label image (:func:`_scan`, :func:`_outline`) give, per
  label, the pixel count, first and second moments (exact integer sums), the bounding box,
  contact with the dilated non-tissue / exclusion masks, the leftmost and rightmost pixel of
  every row, and the perimeter with the 4-neighbourhood weights of
  :func:`skimage.measure.perimeter`;
* the convex hull of the pixel corners follows from the row extremes (a monotone chain over
  at most two points per row boundary), and with it the hull area (solidity) and the minimum
  and maximum Feret diameters by rotating calipers (:func:`_hulls`);
* internal nuclei: the depth of each nucleus centre inside its fiber is the same 5x5 chamfer
  distance transform as before, computed on small windows around the nucleus centres stacked
  into one image (exact for the depth test, see :func:`_nucleus_depth_px`);
* the fascicle edge distance comes from
  :func:`biopsyquant.compartments.fascicle_edge_distance_um`.

All sizes are in µm and converted with the image's microns-per-pixel ``mpp``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
from numba import njit

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .fibers import FiberParams

__all__ = ["FIBER_COLUMNS", "fiber_properties"]

#: Columns of :func:`fiber_properties` (and :func:`biopsyquant.fibers.fiber_table`), in order.
FIBER_COLUMNS: tuple[str, ...] = (
    "fiber_id",
    "x_px",
    "y_px",
    "x_um",
    "y_um",
    "area_px",
    "area_um2",
    "min_feret_um",
    "max_feret_um",
    "perimeter_um",
    "eccentricity",
    "solidity",
    "touches_edge",
    "touches_exclusion",
    "n_internal_nuclei",
    "fascicle_edge_distance_um",
)

_JIT = {"cache": True, "nogil": True}

#: Windows of the nucleus-depth stack are processed in chunks of at most this many pixels.
_DEPTH_STACK_MAX_PIXELS = 4_000_000

_DUMMY_F32 = np.zeros((1, 1), np.float32)


# --------------------------------------------------------------------------- compiled passes


@njit(**_JIT)
def _is_border(lab, y, x, lv, h, w):
    """True when pixel (y, x) of label ``lv`` has a 4-neighbour of another label or the image
    edge (``lab - binary_erosion(lab == lv, cross, border_value=0)``)."""
    if y == 0 or x == 0 or y == h - 1 or x == w - 1:
        return True
    return (lab[y - 1, x] != lv or lab[y + 1, x] != lv or lab[y, x - 1] != lv
            or lab[y, x + 1] != lv)


@njit(**_JIT)
def _perimeter_code(lab, y, x, lv, h, w):
    """Code of border pixel (y, x) in ``skimage.measure.perimeter(neighborhood=4)``: the
    border image convolved with [[10, 2, 10], [2, 1, 2], [10, 2, 10]]."""
    code = 1
    for dy in range(-1, 2):
        yy = y + dy
        if yy < 0 or yy >= h:
            continue
        for dx in range(-1, 2):
            if dy == 0 and dx == 0:
                continue
            xx = x + dx
            if xx < 0 or xx >= w or lab[yy, xx] != lv:
                continue
            if _is_border(lab, yy, xx, lv, h, w):
                code += 10 if (dy != 0 and dx != 0) else 2
    return code


@njit(**_JIT)
def _count_runs(lab):
    """Number of runs of labels > 0 (exact sizes avoid growing arrays inside the kernels,
    which numba compiles into much slower loops)."""
    h, w = lab.shape
    nr = 0
    for y in range(h):
        prev = 0
        for x in range(w):
            lv = lab[y, x]
            if lv > 0 and (x == 0 or lv != prev):
                nr += 1
            prev = lv
    return nr


@njit(**_JIT)
def _count_blob_runs(img, thr):
    """Number of runs of ``img > thr``."""
    h, w = img.shape
    nr = 0
    for y in range(h):
        inside = False
        for x in range(w):
            v = img[y, x] > thr
            if v and not inside:
                nr += 1
            inside = v
    return nr


@njit(**_JIT)
def _measure(lab, near_out, use_out, near_ex, use_ex, dist, use_dist, n, n_runs):
    """One raster pass over the label image, run by run (a run = pixels of one label in a row).

    Per label (index = label value): pixel count; first and second moment sums relative to
    the first pixel met (exact integers); bounding box; contact with ``near_out`` /
    ``near_ex``; minimum of ``dist``; the counts of border pixels whose skimage perimeter code
    weighs 1, sqrt(2) and (1 + sqrt(2)) / 2. Also every run (label, row, first, last column)
    in raster order, for the convex hulls (``n_runs`` from :func:`_count_runs`).
    """
    h, w = lab.shape
    count = np.zeros(n + 1, np.int64)
    ref = np.zeros((n + 1, 2), np.int64)        # (y, x) of the first pixel met
    sums = np.zeros((n + 1, 5), np.int64)       # sx, sy, sxx, syy, sxy (relative to ref)
    box = np.zeros((n + 1, 4), np.int64)        # ymin, ymax, xmin, xmax (inclusive)
    touch = np.zeros((n + 1, 2), np.uint8)      # near non-tissue, near an exclusion
    dmin = np.full(n + 1, np.inf, np.float32)
    pcount = np.zeros((n + 1, 3), np.int64)
    runs = np.empty((n_runs, 4), np.int64)      # label, y, x first, x last
    nr = 0
    for y in range(h):
        x = 0
        while x < w:
            lv = lab[y, x]
            xs = x
            x += 1
            while x < w and lab[y, x] == lv:
                x += 1
            if lv <= 0:
                continue
            xe = x - 1
            ln = xe - xs + 1
            runs[nr, 0] = lv
            runs[nr, 1] = y
            runs[nr, 2] = xs
            runs[nr, 3] = xe
            nr += 1
            if count[lv] == 0:
                ref[lv, 0] = y
                ref[lv, 1] = xs
                box[lv, 0] = y
                box[lv, 2] = xs
                box[lv, 3] = xe
            count[lv] += ln
            # moment sums over the run, in closed form relative to the reference pixel
            a = xs - ref[lv, 1]
            b = xe - ref[lv, 1]
            s1 = (a + b) * ln // 2
            s2 = (b * (b + 1) * (2 * b + 1) - (a - 1) * a * (2 * a - 1)) // 6
            dy = y - ref[lv, 0]
            sums[lv, 0] += s1
            sums[lv, 1] += dy * ln
            sums[lv, 2] += s2
            sums[lv, 3] += dy * dy * ln
            sums[lv, 4] += dy * s1
            box[lv, 1] = y
            if xs < box[lv, 2]:
                box[lv, 2] = xs
            if xe > box[lv, 3]:
                box[lv, 3] = xe
            if use_out and touch[lv, 0] == 0:
                for xx in range(xs, x):
                    if near_out[y, xx]:
                        touch[lv, 0] = 1
                        break
            if use_ex and touch[lv, 1] == 0:
                for xx in range(xs, x):
                    if near_ex[y, xx]:
                        touch[lv, 1] = 1
                        break
            if use_dist:
                m = dmin[lv]
                for xx in range(xs, x):
                    if dist[y, xx] < m:
                        m = dist[y, xx]
                dmin[lv] = m
            # perimeter: border pixels are the run's ends and pixels with another label (or
            # the image edge) above or below
            edge_row = y == 0 or y == h - 1
            for xx in range(xs, x):
                if not (xx == xs or xx == xe or edge_row or lab[y - 1, xx] != lv
                        or lab[y + 1, xx] != lv):
                    continue
                code = _perimeter_code(lab, y, xx, lv, h, w)
                if (code == 5 or code == 7 or code == 15 or code == 17 or code == 25
                        or code == 27):
                    pcount[lv, 0] += 1
                elif code == 21 or code == 33:
                    pcount[lv, 1] += 1
                elif code == 13 or code == 23:
                    pcount[lv, 2] += 1
    return count, ref, sums, box, touch, dmin, pcount, runs


@njit(**_JIT)
def _blob_stats(img, thr):
    """8-connected blobs of ``img > thr``: area, mean column, mean row (float64).

    Same components and statistics as ``cv2.connectedComponentsWithStats(img > thr,
    connectivity=8)`` (in another order), found by union-find over row runs without a label
    image.
    """
    h, w = img.shape
    cap = _count_blob_runs(img, thr)
    rs = np.empty(cap, np.int64)
    re = np.empty(cap, np.int64)
    ry = np.empty(cap, np.int64)
    parent = np.empty(cap, np.int64)
    nr = 0
    prev_lo = 0
    prev_hi = 0
    for y in range(h):
        cur_lo = nr
        j = prev_lo
        x = 0
        while x < w:
            if not img[y, x] > thr:
                x += 1
                continue
            xs = x
            while x < w and img[y, x] > thr:
                x += 1
            xe = x - 1
            rs[nr] = xs
            re[nr] = xe
            ry[nr] = y
            parent[nr] = nr
            # runs of the previous row touching [xs - 1, xe + 1] (8-connectivity)
            while j < prev_hi and re[j] < xs - 1:
                j += 1
            k = j
            while k < prev_hi and rs[k] <= xe + 1:
                a = nr
                while parent[a] != a:
                    parent[a] = parent[parent[a]]
                    a = parent[a]
                b = k
                while parent[b] != b:
                    parent[b] = parent[parent[b]]
                    b = parent[b]
                if a != b:
                    if a < b:
                        parent[b] = a
                    else:
                        parent[a] = b
                k += 1
            nr += 1
        prev_lo = cur_lo
        prev_hi = nr
    # links always go from the larger to the smaller index, so parent[i] <= i and one
    # ascending sweep labels every run with its component
    comp = np.empty(nr, np.int64)
    nc = 0
    for i in range(nr):
        if parent[i] == i:
            comp[i] = nc
            nc += 1
        else:
            comp[i] = comp[parent[i]]
    area = np.zeros(nc, np.int64)
    sx = np.zeros(nc, np.int64)
    sy = np.zeros(nc, np.int64)
    for i in range(nr):
        c = comp[i]
        ln = re[i] - rs[i] + 1
        area[c] += ln
        sx[c] += (rs[i] + re[i]) * ln // 2
        sy[c] += ry[i] * ln
    out = np.empty((nc, 3))
    for c in range(nc):
        out[c, 0] = area[c]
        out[c, 1] = sx[c] / area[c]
        out[c, 2] = sy[c] / area[c]
    return out


@njit(**_JIT)
def _row_extremes(runs, box, row_off):
    """Leftmost and rightmost column of every label in every row of its bounding box
    (slot ``row_off[l] + y - ymin``; -1 for rows without the label)."""
    total = row_off[-1]
    left = np.full(total, -1, np.int64)
    right = np.full(total, -1, np.int64)
    for i in range(runs.shape[0]):
        lv = runs[i, 0]
        r = row_off[lv] + runs[i, 1] - box[lv, 0]
        if left[r] < 0:
            left[r] = runs[i, 2]
        right[r] = runs[i, 3]  # runs come in raster order: the last one is the rightmost
    return left, right


@njit(**_JIT)
def _cross(oy, ox, ay, ax, by, bx):
    return (ay - oy) * (bx - ox) - (ax - ox) * (by - oy)


@njit(**_JIT)
def _hulls(ids, box, row_off, left, right):
    """Convex hull of every label's pixel corners: hull area, min and max Feret (px).

    The hull of a pixel set is the hull of the outer corners of each row's extreme pixels; at
    every row boundary only the leftmost and rightmost corner matter, so the candidate points
    come sorted by (y, x) and Andrew's monotone chain needs no sort.
    """
    m = ids.shape[0]
    area = np.zeros(m)
    min_f = np.zeros(m)
    max_f = np.zeros(m)
    for k in range(m):
        lv = ids[k]
        y0 = box[lv, 0]
        nrow = box[lv, 1] - y0 + 1
        o = row_off[lv]
        # candidate points at the row boundaries y - 0.5, y = y0 .. y0 + nrow
        npts = 0
        py = np.empty(2 * (nrow + 1))
        px = np.empty(2 * (nrow + 1))
        for b in range(nrow + 1):
            lo = 1 << 62
            hi = -1
            if b > 0 and right[o + b - 1] >= 0:
                lo = min(lo, left[o + b - 1])
                hi = max(hi, right[o + b - 1])
            if b < nrow and right[o + b] >= 0:
                lo = min(lo, left[o + b])
                hi = max(hi, right[o + b])
            if hi < 0:
                continue
            yb = y0 + b - 0.5
            py[npts] = yb
            px[npts] = lo - 0.5
            py[npts + 1] = yb
            px[npts + 1] = hi + 0.5
            npts += 2
        # Andrew's monotone chain on (y, x)-sorted points, collinear points dropped
        hy = np.empty(2 * npts + 1)
        hx = np.empty(2 * npts + 1)
        nh = 0
        for i in range(npts):
            while nh >= 2 and _cross(hy[nh - 2], hx[nh - 2], hy[nh - 1], hx[nh - 1],
                                     py[i], px[i]) <= 0:
                nh -= 1
            hy[nh] = py[i]
            hx[nh] = px[i]
            nh += 1
        lower = nh + 1
        for i in range(npts - 2, -1, -1):
            while nh >= lower and _cross(hy[nh - 2], hx[nh - 2], hy[nh - 1], hx[nh - 1],
                                         py[i], px[i]) <= 0:
                nh -= 1
            hy[nh] = py[i]
            hx[nh] = px[i]
            nh += 1
        nh -= 1  # the last point repeats the first
        s = 0.0
        for i in range(nh):
            j = i + 1 if i + 1 < nh else 0
            s += hx[i] * hy[j] - hx[j] * hy[i]
        area[k] = abs(s) / 2.0
        # rotating calipers as in fibers._feret: min over edges of the farthest vertex
        best = np.inf
        for i in range(nh):
            j = i + 1 if i + 1 < nh else 0
            ex = hx[j] - hx[i]
            ey = hy[j] - hy[i]
            norm = math.hypot(ex, ey)
            if norm <= 0:
                continue
            ex /= norm
            ey /= norm
            far = 0.0
            for v in range(nh):
                d = abs((hx[v] - hx[i]) * ey - (hy[v] - hy[i]) * ex)
                if d > far:
                    far = d
            if far < best:
                best = far
        min_f[k] = best
        big = 0.0
        for i in range(nh):
            for j in range(i + 1, nh):
                d2 = (hx[i] - hx[j]) ** 2 + (hy[i] - hy[j]) ** 2
                if d2 > big:
                    big = d2
        max_f[k] = math.sqrt(big)
    return area, min_f, max_f


# --------------------------------------------------------------------------- helpers


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


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
    """Hematoxylin blobs: centroids x, y (px) and estimated nucleus count per blob.

    Blobs of the hematoxylin OD smoothed with σ = 0.7 µm above ``params.nucleus_min_od``
    (8-connected), at least ``nucleus_min_area_um2``; blobs above ``nucleus_max_area_um2``
    count as ``round(area / nucleus_typical_area_um2)`` nuclei.
    """
    sigma = 0.7 / mpp
    h = np.ascontiguousarray(hema_od, dtype=np.float32)
    if sigma > 0.1:
        h = cv2.GaussianBlur(h, (0, 0), sigmaX=sigma, sigmaY=sigma,
                             borderType=cv2.BORDER_REFLECT)
    # numpy compares float32 with a Python float in float32 (NEP 50): so does the kernel
    blobs = _blob_stats(h, np.float32(params.nucleus_min_od))
    if len(blobs) == 0:
        e = np.zeros(0)
        return e, e, e
    area_um2 = blobs[:, 0] * mpp * mpp
    cents = blobs[:, 1:]
    ok = area_um2 >= params.nucleus_min_area_um2
    count = np.where(area_um2 > params.nucleus_max_area_um2,
                     np.maximum(1, np.round(area_um2 / params.nucleus_typical_area_um2)), 1)
    return cents[ok, 0], cents[ok, 1], count[ok]


def _nucleus_depth_px(labels: np.ndarray, yi: np.ndarray, xi: np.ndarray, owner: np.ndarray,
                      depth_px: float) -> np.ndarray:
    """5x5 chamfer distance (``cv2.DIST_L2``, mask 5) from each point to the nearest pixel
    outside its own label, exact up to ``depth_px``.

    The historical fiber table ran one distance transform per fiber on the fiber's bounding
    box padded by one zero pixel. Only the test ``depth > depth_px`` is used, and the chamfer
    distance is at least the chessboard distance, so a window of radius ``R = floor(depth_px)
    + 1`` around each point, framed by zeros (at chessboard distance R + 1 > depth_px),
    decides it exactly: values up to ``depth_px`` are the full-image values, larger ones stay
    larger than ``depth_px``. All windows go into one stacked image and one transform.

    Parameters
    ----------
    labels : ndarray of int32, shape (H, W)
    yi, xi : ndarray of int, shape (K,)
        Pixel row and column of each point (inside the image).
    owner : ndarray of int, shape (K,)
        Label at each point (> 0).
    depth_px : float

    Returns
    -------
    ndarray of float32, shape (K,)
        Distance, exact where ``<= depth_px``; otherwise some value ``> depth_px``.
    """
    h, w = labels.shape
    r = int(math.floor(depth_px)) + 1
    side = 2 * r + 3
    off = np.arange(-r, r + 1)
    out = np.empty(len(yi), np.float32)
    chunk = max(1, _DEPTH_STACK_MAX_PIXELS // (side * side))
    for s in range(0, len(yi), chunk):
        yy = yi[s:s + chunk, None, None] + off[None, :, None]
        xx = xi[s:s + chunk, None, None] + off[None, None, :]
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        vals = labels[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        k = len(vals)
        stack = np.zeros((k, side, side), np.uint8)
        stack[:, 1:-1, 1:-1] = (vals == owner[s:s + chunk, None, None]) & inside
        dt = cv2.distanceTransform(stack.reshape(k * side, side), cv2.DIST_L2, 5)
        out[s:s + k] = dt.reshape(k, side, side)[:, r + 1, r + 1]
    return out


# --------------------------------------------------------------------------- public


def fiber_properties(
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

    Same arguments, columns and values as :func:`biopsyquant.fibers.fiber_table` (which calls
    this function), measured with whole-image passes instead of a loop over fibers.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Fiber labels (0 = none; negative values count as none), e.g. from
        :func:`biopsyquant.fibers.segment_fibers`. Label ids may have gaps.
    mpp : float or None
        Pixel size (µm/px). When None every µm column is NaN (pixel columns remain) and
        pixel sizes stand in for µm in ``params``.
    hema_od : ndarray of float, shape (H, W), optional
        Hematoxylin OD (log10); needed for ``n_internal_nuclei`` (-1 without it).
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
        Columns :data:`FIBER_COLUMNS`, one row per label present, in increasing ``fiber_id``:
        ``fiber_id`` (int32 label value), ``x_px``, ``y_px`` (centroid: column, row),
        ``x_um``, ``y_um``, ``area_px`` (int64), ``area_um2``, ``min_feret_um`` and
        ``max_feret_um`` (rotating calipers of the convex hull of the pixel corners),
        ``perimeter_um`` (:func:`skimage.measure.perimeter` with ``neighborhood=4``; objects
        one pixel thick: ``2 * (height + width)``), ``eccentricity`` (of the moment ellipse),
        ``solidity`` (area / hull area, at most 1), ``touches_edge`` (bounding box on the image
        border, or a pixel within ``edge_distance_um`` of non-tissue), ``touches_exclusion``,
        ``n_internal_nuclei`` (hematoxylin blobs whose centre pixel lies in the fiber deeper
        than ``internal_nucleus_depth_um``, 5x5 chamfer distance; blobs larger than
        ``nucleus_max_area_um2`` count as several; -1 when ``hema_od`` is None) and
        ``fascicle_edge_distance_um`` (NaN without ``compartments`` or ``mpp``).

    Raises
    ------
    InputError
        ``labels`` is not a 2-D integer image, another image has a different shape, or
        ``mpp`` is not a positive number.

    Warns
    -----
    UserWarning
        No fibers in the label image: an empty table with these columns is returned.
    """
    from .fibers import FiberParams

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
    n = int(labels.max(initial=0))
    if n <= 0:
        warnings.warn("fiber_table: no fibers in the label image; returning an empty table",
                      UserWarning, stacklevel=2)
        return _empty_table()
    labels = np.ascontiguousarray(labels.astype(np.int32, copy=False))
    px_um = mpp if mpp is not None else 1.0
    edge_px = params.edge_distance_um / px_um + 1.0
    H, W = shape

    dummy = np.zeros((1, 1), np.uint8)
    near_out = None
    if tissue is not None:
        nt = cv2.compare(np.ascontiguousarray(tissue, dtype=bool).view(np.uint8), 0,
                         cv2.CMP_EQ)
        if cv2.countNonZero(nt):
            near_out = cv2.dilate(nt, _disk(edge_px))
    near_ex = None
    if exclusion is not None and np.any(exclusion):
        ex = np.ascontiguousarray(exclusion, dtype=bool).view(np.uint8)
        near_ex = cv2.dilate(ex, _disk(edge_px))

    dist = None
    if compartments is not None and mpp is not None:
        from .compartments import CompartmentParams, _edge_distance_image

        dist = _edge_distance_image(compartments, CompartmentParams())
    count, ref, sums, box, touch, dmin, pcount, runs = _measure(
        labels, near_out if near_out is not None else dummy, near_out is not None,
        near_ex if near_ex is not None else dummy, near_ex is not None,
        dist if dist is not None else _DUMMY_F32,
        dist is not None, n, _count_runs(labels))
    ids = np.flatnonzero(count[1:]) + 1
    heights = np.zeros(n + 2, np.int64)
    heights[ids + 1] = box[ids, 1] - box[ids, 0] + 1
    row_off = np.cumsum(heights)  # row_off[l] = first row slot of label l; [-1] = total
    left, right = _row_extremes(runs, box, row_off)
    hull_area, min_f, max_f = _hulls(ids.astype(np.int64), box, row_off, left, right)

    # moments -> centroid and eccentricity (as cv2.moments on the fiber's bounding box)
    area = count[ids].astype(np.float64)
    s = sums[ids].astype(np.float64)
    cx_rel, cy_rel = s[:, 0] / area, s[:, 1] / area
    mu20 = (s[:, 2] - s[:, 0] * cx_rel) / area
    mu02 = (s[:, 3] - s[:, 1] * cy_rel) / area
    mu11 = (s[:, 4] - s[:, 0] * cy_rel) / area
    common = np.sqrt(np.maximum((mu20 - mu02) ** 2 + 4 * mu11 * mu11, 0.0))
    l1, l2 = (mu20 + mu02 + common) / 2, (mu20 + mu02 - common) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.maximum(1 - l2 / l1, 0.0)), 0.0)

    # perimeter: skimage weights; objects one pixel thick use 2 * (height + width)
    pc = pcount[ids].astype(np.float64)
    per = pc[:, 0] + pc[:, 1] * math.sqrt(2) + pc[:, 2] * ((1 + math.sqrt(2)) / 2)
    bh = box[ids, 1] - box[ids, 0] + 1
    bw = box[ids, 3] - box[ids, 2] + 1
    thin = np.minimum(bh, bw) <= 1
    per[thin] = 2.0 * (bh[thin] + bw[thin])

    touches = ((box[ids, 0] == 0) | (box[ids, 2] == 0) | (box[ids, 1] == H - 1)
               | (box[ids, 3] == W - 1) | (touch[ids, 0] > 0))
    t_ex = touch[ids, 1] > 0

    n_int = np.full(len(ids), -1 if hema_od is None else 0, np.int64)
    if hema_od is not None:
        nx, ny, ncount = _detect_nuclei(hema_od, px_um, params)
        if len(nx):
            xi = np.clip(np.round(nx).astype(np.intp), 0, W - 1)
            yi = np.clip(np.round(ny).astype(np.intp), 0, H - 1)
            owner = labels[yi, xi]
            k = owner > 0
            if k.any():
                depth_px = params.internal_nucleus_depth_um / px_um
                d = _nucleus_depth_px(labels, yi[k], xi[k], owner[k], depth_px)
                deep = d > depth_px
                per_label = np.bincount(owner[k][deep],
                                        weights=ncount[k][deep].astype(np.int64),
                                        minlength=n + 1)
                n_int += per_label[ids].astype(np.int64)

    solidity = np.where(hull_area > 0, area / np.where(hull_area > 0, hull_area, 1.0), 1.0)
    df = pd.DataFrame({
        "fiber_id": ids.astype(np.int32),
        "x_px": ref[ids, 1] + cx_rel,
        "y_px": ref[ids, 0] + cy_rel,
        "area_px": count[ids].astype(np.int64),
        "eccentricity": ecc,
        "solidity": np.minimum(solidity, 1.0),
        "touches_edge": touches.astype(bool),
        "touches_exclusion": t_ex.astype(bool),
        "n_internal_nuclei": n_int,
    })
    f = mpp if mpp is not None else float("nan")
    df["x_um"] = df["x_px"] * f
    df["y_um"] = df["y_px"] * f
    df["area_um2"] = df["area_px"] * f * f
    df["min_feret_um"] = min_f * f
    df["max_feret_um"] = max_f * f
    df["perimeter_um"] = per * f
    df["fascicle_edge_distance_um"] = np.nan
    if dist is not None:  # as compartments.fascicle_edge_distance_um
        df["fascicle_edge_distance_um"] = np.maximum(dmin[ids].astype(np.float64) - 1.0,
                                                     0.0) * mpp
    return df[list(FIBER_COLUMNS)]
