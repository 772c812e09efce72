"""Image operations behind :func:`biopsyquant.cells.detect_cells` (private).

Everything here works in pixels on float32 OD maps and uses OpenCV primitives (Gaussian blur,
rectangular erosion/dilation, distance transforms, connected components) and ``np.bincount``
per-object statistics, which are one to two orders of magnitude faster than the equivalent
scikit-image chain (``peak_local_max`` + ``watershed`` + ``regionprops``, see
``../shared/perf-facts.md``).

The splitting of touching cells is a *distance-transform marker + nearest-marker* partition:
markers are local maxima of the smoothed distance transform of the foreground (one per cell
body), markers whose straight connection never dips below ``merge_ratio`` of the smaller
inscribed radius are merged (no neck = one cell), and every foreground pixel goes to the
nearest marker of its own connected component (``cv2.distanceTransformWithLabels``). For
round-ish cells of similar size this equals a watershed on the distance transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numba import njit
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = ["gaussian", "background_subtract", "foreground", "split_objects", "refine_large", "fill_holes",
           "trim_to_half_max",
           "expand_labels",
           "object_stats", "nearest_label_at", "candidate_blocks", "Regions", "plan_regions",
           "group_mask", "other_groups_near", "pack_boxes", "fill_atlas", "piece_sums", "object_pixels"]


def gaussian(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (float32), a no-op for ``sigma_px <= 0``."""
    if sigma_px <= 0:
        return img
    k = int(2 * np.ceil(3 * sigma_px) + 1)
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma_px, sigmaY=sigma_px,
                            borderType=cv2.BORDER_REFLECT)


def background_subtract(img: np.ndarray, radius_px: float, origin: tuple[int, int] = (0, 0),
                        *, cand: np.ndarray | None = None, cand_threshold: float = 0.0,
                        cand_mask: np.ndarray | None = None, cand_block: int = 1
                        ) -> np.ndarray:
    """``img`` minus its grey opening with a square of side ``2*radius_px+1`` (clipped at 0).

    Structures narrower than the square (cells) stay; slowly varying stain (non-specific
    background, uneven illumination residue) is removed. The opening is computed on
    ``f × f`` block means (``f = radius/4``, edges reflected) and upsampled bilinearly
    (numba kernels, one pass each), which is several times faster and smoother. The blocks are anchored at multiples of ``f`` in the coordinates
    given by ``origin`` (x, y of the image's top-left pixel), so that tiles of one slide and
    the whole slide get identical backgrounds away from their borders.

    When ``cand`` (uint8, ceil(H/cand_block) x ceil(W/cand_block), zeros) is given, the blocks
    holding a result pixel > ``cand_threshold`` inside ``cand_mask`` are set to 1 on the way
    (see :func:`candidate_blocks`).
    """
    if radius_px <= 0 or int(radius_px // 4) <= 1:
        out = _background_subtract_plain(img, radius_px, origin)
        if cand is not None:
            cand[:] = candidate_blocks(out, cand_threshold, cand_mask, cand_block)
        return out
    return _background_subtract_blocks(img, radius_px, origin, cand, cand_threshold, cand_mask,
                                       cand_block)


def _background_subtract_plain(img, radius_px, origin):
    """Radius below 8 px: the opening on the full-resolution image (no block grid)."""
    if radius_px <= 0:
        return img
    r = max(1, int(round(radius_px)))
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    bg = cv2.morphologyEx(img, cv2.MORPH_OPEN, k, borderType=cv2.BORDER_REFLECT)
    out = img - bg
    np.maximum(out, 0, out=out)
    return out


def _background_subtract_blocks(img, radius_px, origin, cand, cand_threshold, cand_mask,
                                cand_block):
    h, w = img.shape
    f = int(radius_px // 4)
    img = np.ascontiguousarray(img, dtype=np.float32)
    px0, py0 = int(origin[0]) % f, int(origin[1]) % f
    small = np.empty((-(-(h + py0) // f), -(-(w + px0) // f)), np.float32)
    _block_means(img, f, py0, px0, small)
    r = max(1, int(round(radius_px / f)))
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    bg = cv2.morphologyEx(small, cv2.MORPH_OPEN, k, borderType=cv2.BORDER_REFLECT)
    out = np.empty_like(img)
    use_mask = cand_mask is not None
    _subtract_upsampled(img, np.ascontiguousarray(bg, np.float32), f, py0, px0, out,
                        np.float32(cand_threshold),
                        cand_mask.view(np.uint8) if use_mask else out.view(np.uint8), use_mask,
                        int(cand_block), cand if cand is not None else np.zeros((1, 1), np.uint8),
                        cand is not None)
    return out


@njit(cache=True, nogil=True)
def _block_means(img, f, py0, px0, out):  # pragma: no cover - numba
    """Means of f x f blocks of ``img`` shifted by (py0, px0), edges reflected (OpenCV's
    BORDER_REFLECT: the block grid covers the image padded by py0/px0 rows/cols before)."""
    h, w = img.shape
    nby, nbx = out.shape
    pw = nbx * f
    xmap = np.empty(pw, np.int64)
    for xx in range(pw):
        x = xx - px0
        if x < 0:
            x = -x - 1
        elif x >= w:
            x = 2 * w - x - 1
        xmap[xx] = x
    acc = np.zeros(nbx, np.float64)
    rowsum = np.zeros(pw, np.float64)
    inv = 1.0 / (f * f)
    for by in range(nby):
        rowsum[:] = 0.0
        for k in range(f):
            y = by * f + k - py0
            if y < 0:
                y = -y - 1
            elif y >= h:
                y = 2 * h - y - 1
            if px0 == 0 and pw <= w:
                for xx in range(pw):
                    rowsum[xx] += img[y, xx]
            else:
                for xx in range(pw):
                    rowsum[xx] += img[y, xmap[xx]]
        for bx in range(nbx):
            s = 0.0
            for j in range(bx * f, bx * f + f):
                s += rowsum[j]
            acc[bx] = s
        for bx in range(nbx):
            out[by, bx] = acc[bx] * inv


@njit(cache=True, nogil=True)
def _subtract_upsampled(img, bg, f, py0, px0, out, threshold, mask, use_mask, block, cand,
                        do_cand):  # pragma: no cover - numba
    """``max(img - bilinear(bg), 0)`` with ``bg`` on the f x f block grid of
    :func:`_block_means` (pixel centres as in OpenCV's INTER_LINEAR resize); optionally flags
    the ``block`` x ``block`` blocks holding a result > ``threshold`` (inside ``mask``)."""
    h, w = img.shape
    nby, nbx = bg.shape
    x0 = np.empty(w, np.int64)
    x1 = np.empty(w, np.int64)
    wx = np.empty(w, np.float32)
    for x in range(w):
        fx = (x + px0 + 0.5) / f - 0.5
        sx = int(np.floor(fx))
        a = fx - sx
        if sx < 0:
            sx, a = 0, 0.0
        if sx >= nbx - 1:
            sx, a = nbx - 1, 0.0
        x0[x] = sx
        x1[x] = min(sx + 1, nbx - 1)
        wx[x] = a
    row0 = np.empty(w, np.float32)
    row1 = np.empty(w, np.float32)
    one = np.float32(1.0)
    last = -1
    for y in range(h):
        fy = (y + py0 + 0.5) / f - 0.5
        sy = int(np.floor(fy))
        b = fy - sy
        if sy < 0:
            sy, b = 0, 0.0
        if sy >= nby - 1:
            sy, b = nby - 1, 0.0
        if sy != last:  # horizontal interpolation of the two grid rows, once per grid row
            sy1 = min(sy + 1, nby - 1)
            for x in range(w):
                a = wx[x]
                row0[x] = (one - a) * bg[sy, x0[x]] + a * bg[sy, x1[x]]
                row1[x] = (one - a) * bg[sy1, x0[x]] + a * bg[sy1, x1[x]]
            last = sy
        wy = np.float32(b)
        for x in range(w):
            v = img[y, x] - ((one - wy) * row0[x] + wy * row1[x])
            out[y, x] = v if v > 0 else np.float32(0.0)
        if do_cand:
            crow = cand[y // block]
            for x in range(w):
                if out[y, x] > threshold and (not use_mask or mask[y, x] != 0):
                    crow[x // block] = 1


def foreground(det: np.ndarray, threshold: float, mask: np.ndarray | None) -> np.ndarray:
    """uint8 0/1 foreground ``det > threshold`` inside ``mask``."""
    fg = (det > threshold).view(np.uint8)
    if mask is not None:
        fg &= mask.view(np.uint8)
    return fg


def fill_holes(fg: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background holes of at most ``max_hole_px`` pixels in a 0/1 uint8 mask.

    A cell whose nucleus is unstained (cytoplasmic/membranous DAB) is a ring on the DAB
    channel; filling the hole gives its distance transform a single peak.
    """
    if max_hole_px <= 0:
        return fg
    contours, hier = cv2.findContours(fg, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hier is None:
        return fg
    holes = [c for c, h in zip(contours, hier[0], strict=True)
             if h[3] != -1 and cv2.contourArea(c) <= max_hole_px]
    if holes:
        fg = fg.copy()
        cv2.drawContours(fg, holes, -1, 1, thickness=-1)
    return fg


def _local_maxima(dist: np.ndarray, window_px: int, min_value: float) -> np.ndarray:
    """(N, 2) int rows, cols of one pixel per plateau of local maxima ≥ ``min_value``."""
    window_px = max(3, int(window_px) | 1)
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (window_px, window_px))
    dil = cv2.dilate(dist, k)
    # np.flatnonzero((dist >= dil) & (dist >= min_value)) in one pass (float32 comparisons,
    # as numpy compares a float32 array with a Python float)
    idx = _maxima_index(dist, dil, np.float32(min_value))
    if len(idx) == 0:
        return np.zeros((0, 2), np.int64)
    ys, xs = np.divmod(idx, dist.shape[1])
    pts = np.stack([ys, xs], axis=1)
    if len(pts) == 1:
        return pts
    # one pixel per plateau (8-connected equal maxima): the pixel nearest its centroid
    pairs = cKDTree(pts).query_pairs(1.5, output_type="ndarray")
    if len(pairs) == 0:
        return pts
    n = len(pts)
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, lv = connected_components(g, directed=False)
    cnt = np.bincount(lv)
    cy = np.bincount(lv, weights=ys) / cnt
    cx = np.bincount(lv, weights=xs) / cnt
    d2 = (xs - cx[lv]) ** 2 + (ys - cy[lv]) ** 2
    order = np.lexsort((d2, lv))
    lv_sorted = lv[order]
    first = order[np.r_[True, lv_sorted[1:] != lv_sorted[:-1]]]
    return pts[first]


@njit(cache=True, nogil=True)
def _maxima_index(dist, dil, min_value):  # pragma: no cover - numba
    """Flat indices (raster order) of pixels with ``dist >= dil`` and ``dist >= min_value``."""
    h, w = dist.shape
    n = 0
    for y in range(h):
        for x in range(w):
            v = dist[y, x]
            if v >= dil[y, x] and v >= min_value:
                n += 1
    out = np.empty(n, np.int64)
    k = 0
    for y in range(h):
        for x in range(w):
            v = dist[y, x]
            if v >= dil[y, x] and v >= min_value:
                out[k] = y * w + x
                k += 1
    return out


@njit(cache=True, nogil=True)
def _capped_product(dist, cap, intensity):  # pragma: no cover - numba
    """``np.minimum(dist, cap) * np.maximum(intensity, 0)`` (float32) in one pass, with
    numpy's results: NaN propagates, ``maximum(-0.0, 0)`` is +0.0."""
    h, w = dist.shape
    out = np.empty((h, w), np.float32)
    zero = np.float32(0.0)
    for y in range(h):
        for x in range(w):
            a = dist[y, x]
            m = a if (a <= cap or a != a) else cap
            b = intensity[y, x]
            q = b if (b > zero or b != b) else zero
            out[y, x] = m * q
    return out


def _merge_groups(seeds: np.ndarray, dist: np.ndarray, comp: np.ndarray, max_sep_px: float,
                  merge_ratio: float) -> np.ndarray:
    """Group index per seed: seeds joined without a neck in ``dist`` belong to one cell."""
    n = len(seeds)
    if n < 2 or merge_ratio <= 0:
        return np.arange(n)
    tree = cKDTree(seeds.astype(float))
    pairs = tree.query_pairs(max_sep_px, output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(n)
    a, b = pairs[:, 0], pairs[:, 1]
    same = comp[seeds[a, 0], seeds[a, 1]] == comp[seeds[b, 0], seeds[b, 1]]
    a, b = a[same], b[same]
    if len(a) == 0:
        return np.arange(n)
    t = np.linspace(0.0, 1.0, 9)[1:-1]
    # points along the connection, relative to the first seed (translation-invariant rounding)
    ys = seeds[a, 0][:, None] + np.rint((seeds[b, 0] - seeds[a, 0])[:, None] * t).astype(np.intp)
    xs = seeds[a, 1][:, None] + np.rint((seeds[b, 1] - seeds[a, 1])[:, None] * t).astype(np.intp)
    valley = dist[ys, xs].min(axis=1)
    peak = np.minimum(dist[seeds[a, 0], seeds[a, 1]], dist[seeds[b, 0], seeds[b, 1]])
    join = valley >= merge_ratio * peak
    a, b = a[join], b[join]
    if len(a) == 0:
        return np.arange(n)
    g = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, groups = connected_components(g, directed=False)
    return groups


def split_objects(fg: np.ndarray, *, min_diameter_px: float, max_diameter_px: float,
                  sigma_px: float, merge_ratio: float, split: bool = True,
                  intensity: np.ndarray | None = None) -> np.ndarray:
    """Label the foreground, splitting touching cells; returns int32 labels (0 = none).

    Parameters
    ----------
    fg : ndarray of uint8 (H, W), values 0/1
    min_diameter_px : float
        Smallest cell diameter: markers closer than this are one marker.
    max_diameter_px : float
        Largest cell diameter: only markers closer than this are tested for merging.
    sigma_px : float
        Smoothing of the distance transform before finding markers.
    merge_ratio : float
        Two markers merge when the distance transform along their connection never drops
        below ``merge_ratio`` × the smaller marker value (0 disables merging).
    split : bool
        False: plain connected components.
    intensity : ndarray of float32 (H, W), optional
        Smoothed stain image; when given, markers are the maxima of distance × intensity, so
        that dark cores of cells merged without a shape neck also separate.
    """
    ncomp, comp = cv2.connectedComponents(fg, connectivity=8, ltype=cv2.CV_32S)
    if ncomp <= 1 or not split:
        return comp
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, cv2.DIST_MASK_5)
    dist_s = gaussian(dist, sigma_px)
    if intensity is not None:
        # inside a large blob the distance transform alone would put one marker at its
        # centre: clip it at the smallest cell radius so that the stain (nuclei) decides
        dist_s = _capped_product(dist_s, np.float32(0.5 * min_diameter_px),
                                 np.asarray(intensity, np.float32))
    seeds = _local_maxima(dist_s, int(round(min_diameter_px)),
                          min_value=1e-6 if intensity is not None else 1.0)
    if len(seeds) == 0:
        return comp
    groups = _merge_groups(seeds, dist_s, comp, max_diameter_px, merge_ratio)
    return _assign(comp, ncomp, seeds, groups)


def _assign(comp: np.ndarray, ncomp: int, seeds: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Label every foreground pixel with the group of the nearest seed of its component.

    Components with one group (most cells) are labelled directly; only pixels of components
    holding several groups query a k-d tree of the seeds.
    """
    h, w = comp.shape
    seed_comp = comp[seeds[:, 0], seeds[:, 1]].astype(np.int64)
    ngroups = int(groups.max()) + 1
    cg = np.unique(np.stack([seed_comp, groups], axis=1), axis=0)
    n_in_comp = np.bincount(cg[:, 0], minlength=ncomp)
    any_group = np.full(ncomp, -1, np.int64)
    any_group[cg[:, 0]] = cg[:, 1]
    comp_label = np.zeros(ncomp, np.int64)
    single = n_in_comp == 1
    comp_label[single] = any_group[single] + 1
    noseed = n_in_comp == 0
    noseed[0] = False
    comp_label[noseed] = ngroups + 1 + np.arange(int(noseed.sum()))
    order = np.argsort(seed_comp, kind="stable")
    sc_sorted = seed_comp[order]
    comps = np.arange(ncomp)
    cstart = np.searchsorted(sc_sorted, comps, side="left").astype(np.int64)
    ccnt = np.searchsorted(sc_sorted, comps, side="right").astype(np.int64) - cstart
    out = np.zeros((h, w), np.int32)
    deferred = _assign_pixels(comp, comp_label.astype(np.int32), n_in_comp.astype(np.int64),
                              cstart, ccnt, order.astype(np.int64),
                              np.ascontiguousarray(seeds[:, 0], np.int64),
                              np.ascontiguousarray(seeds[:, 1], np.int64),
                              groups.astype(np.int64), 16, out)
    if deferred:  # components with many seeds: k-d tree of their own seeds
        mi = np.flatnonzero(out.ravel() == -1)
        mc = comp.ravel()[mi].astype(np.int64)
        ys, xs = np.divmod(mi, w)
        out.ravel()[mi] = _nearest_seed_group(ys, xs, mc, seeds, seed_comp, groups,
                                              any_group, max_direct=0)
    return out


@njit(cache=True, nogil=True)
def _assign_pixels(comp, comp_label, n_in_comp, cstart, ccnt, order, sy, sx, groups,
                   max_direct, out):  # pragma: no cover - numba
    """Label of each foreground pixel: its component's label, or for components holding
    several groups the group of the nearest seed (first in ``order`` on ties) when the
    component has at most ``max_direct`` seeds; -1 (deferred) otherwise."""
    h, w = comp.shape
    deferred = 0
    big = np.iinfo(np.int64).max
    for y in range(h):
        for x in range(w):
            c = comp[y, x]
            if c == 0:
                continue
            if n_in_comp[c] > 1:
                k = ccnt[c]
                if k <= max_direct:
                    best = big
                    pick = 0
                    for j in range(cstart[c], cstart[c] + k):
                        q = order[j]
                        dy = y - sy[q]
                        dx = x - sx[q]
                        d = dy * dy + dx * dx
                        if d < best:
                            best = d
                            pick = q
                    out[y, x] = groups[pick] + 1
                else:
                    out[y, x] = -1
                    deferred += 1
            else:
                out[y, x] = comp_label[c]
    return deferred


def _nearest_seed_group(ys, xs, pc, seeds, seed_comp, groups, any_group, max_direct=16):
    """Group label (+1) of the nearest seed of the same component for each pixel.

    Pixels of components with at most ``max_direct`` seeds compare against those seeds
    directly (segmented argmin); larger components use a k-d tree of their own seeds. The
    result depends only on the component's own seeds and pixels (translation-invariant), so
    that a component gives the same cells wherever it lies in the image.
    """
    order = np.argsort(seed_comp, kind="stable")
    sc_sorted = seed_comp[order]
    start = np.searchsorted(sc_sorted, pc, side="left")
    cnt = np.searchsorted(sc_sorted, pc, side="right") - start
    out = np.empty(len(pc), np.int64)
    direct = cnt <= max_direct
    if direct.any():
        _nearest_direct(np.ascontiguousarray(ys, np.int64), np.ascontiguousarray(xs, np.int64),
                        start.astype(np.int64), cnt.astype(np.int64), order.astype(np.int64),
                        np.ascontiguousarray(seeds[:, 0], np.int64),
                        np.ascontiguousarray(seeds[:, 1], np.int64),
                        groups.astype(np.int64), np.flatnonzero(direct), out)
    if (~direct).any():
        # larger components: a k-d tree of the component's own seeds, in coordinates relative
        # to the seeds' corner so that the answer (ties included) depends on nothing else
        sel = np.flatnonzero(~direct)
        sel = sel[np.argsort(pc[sel], kind="stable")]
        bounds = np.flatnonzero(np.diff(pc[sel])) + 1
        for part in np.split(sel, bounds):
            s0 = int(start[part[0]])
            sidx = order[s0:s0 + int(cnt[part[0]])]
            pts = seeds[sidx]
            corner = pts.min(axis=0)
            q = np.stack([ys[part] - corner[0], xs[part] - corner[1]], axis=1)
            _, nn = cKDTree((pts - corner).astype(np.float64)).query(q.astype(np.float64))
            out[part] = groups[sidx[nn]] + 1
    return out


@njit(cache=True, nogil=True)
def _nearest_direct(ys, xs, start, cnt, order, sy, sx, groups, sel, out):  # pragma: no cover
    """out[i] = group + 1 of the nearest seed (first in ``order`` on ties) for pixels ``sel``."""
    for k in range(len(sel)):
        i = sel[k]
        best = np.iinfo(np.int64).max
        pick = 0
        for j in range(start[i], start[i] + cnt[i]):
            q = order[j]
            dy = ys[i] - sy[q]
            dx = xs[i] - sx[q]
            d = dy * dy + dx * dx
            if d < best:
                best = d
                pick = q
        out[i] = groups[pick] + 1


def refine_large(labels: np.ndarray, det: np.ndarray, *, max_area_px: float, levels: int,
                 split_kwargs: dict, keep_low: int = 0) -> np.ndarray:
    """Re-threshold objects larger than ``max_area_px`` at their own Otsu level.

    Dense stained tissue (darkly stained nuclei in brown cytoplasm, macrophage clusters)
    merges into one foreground blob at a global threshold. Each oversized blob is thresholded
    again at the Otsu level of its detection values, the parts are split as usual, and this
    repeats up to ``levels`` times. Parts that fall below the threshold become background,
    unless ``keep_low`` > 0: then the paler remainder, opened with a disk of radius
    ``keep_low - 1`` px (which removes the thin rims of the bright parts), is split into
    objects too (weaker cells touching strong ones in a cluster). Works on the blobs'
    bounding boxes only and modifies ``labels`` in place (the result may have unused labels).
    """
    from skimage.filters import threshold_otsu

    if levels <= 0:
        return labels
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    if len(idx) == 0:
        return labels
    lab = flat[idx]
    n = int(lab.max())
    areas = np.bincount(lab, minlength=n + 1)
    big = np.flatnonzero(areas > max_area_px)
    big = big[big > 0]
    if len(big) == 0:
        return labels
    # bounding boxes of the big objects from their own pixels only
    isbig = np.zeros(n + 1, bool)
    isbig[big] = True
    sel = isbig[lab]
    bl = lab[sel]
    by, bx = np.divmod(idx[sel], labels.shape[1])
    ymin = np.full(n + 1, labels.shape[0], np.int64)
    xmin = np.full(n + 1, labels.shape[1], np.int64)
    ymax = np.zeros(n + 1, np.int64)
    xmax = np.zeros(n + 1, np.int64)
    np.minimum.at(ymin, bl, by)
    np.minimum.at(xmin, bl, bx)
    np.maximum.at(ymax, bl, by)
    np.maximum.at(xmax, bl, bx)
    slices = {int(k): (slice(int(ymin[k]), int(ymax[k]) + 1), slice(int(xmin[k]), int(xmax[k]) + 1))
              for k in big}
    next_label = n + 1
    for k in big:
        sl = slices[int(k)]
        sub = labels[sl]
        inside = sub == k
        vals = det[sl][inside]
        if vals.size < 4 or vals.max() <= vals.min():
            continue
        t = threshold_otsu(vals)
        fg = (inside & (det[sl] > t)).view(np.uint8)
        kw = dict(split_kwargs)
        if kw.get("intensity") is not None:
            kw["intensity"] = kw["intensity"][sl]
        part = split_objects(fg, **kw)
        part = refine_large(part, det[sl], max_area_px=max_area_px, levels=levels - 1,
                            split_kwargs=kw, keep_low=keep_low)
        sub[inside] = 0
        m = part > 0
        sub[m] = part[m] + (next_label - 1)
        next_label += int(part.max())
        if keep_low:
            # the paler remainder may hold weaker cells of the same cluster: split it too
            low = (inside & ~m).view(np.uint8)
            if keep_low > 1:
                low = cv2.erode(low, cv2.getStructuringElement(
                    cv2.MORPH_ELLIPSE, (2 * keep_low - 1, 2 * keep_low - 1)))
                low = cv2.dilate(low, cv2.getStructuringElement(
                    cv2.MORPH_ELLIPSE, (2 * keep_low - 1, 2 * keep_low - 1))) & inside.view(
                    np.uint8) & ~m.view(np.uint8)
            rest = split_objects(low, **kw)
            r = rest > 0
            sub[r] = rest[r] + (next_label - 1)
            next_label += int(rest.max())
    return labels  # labels may have gaps; the caller relabels after its area filter


def trim_to_half_max(labels: np.ndarray, det: np.ndarray, fraction: float,
                     max_hole_px: float = 0.0, cap: float = np.inf) -> np.ndarray:
    """Move each object's boundary to ``fraction`` × its peak of ``det`` (0.5 = half maximum).

    A global threshold on a smoothed image places the edge of a strongly stained cell outside
    the cell (the blurred rim is above the threshold), diluting its mean OD in proportion to
    its stain; the half-maximum of a blurred step edge is the edge itself. Holes opened by the
    trimming (a paler nucleus inside a stained cell body) up to ``max_hole_px`` are filled back
    with the object's label. The edge level is at most ``cap`` so that a weaker cell merged
    with a strong one is not cut away.
    """
    if fraction <= 0:
        return labels
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return labels
    peak = np.zeros(n + 1, np.float32)
    _label_max(labels, det, peak)
    level = np.minimum(np.float32(fraction) * peak, np.float32(cap))
    out = np.empty_like(labels)
    dropped = _drop_below(labels, det, level, out)
    if max_hole_px > 0 and dropped:
        fg = (out > 0).view(np.uint8)
        filled = fill_holes(fg, max_hole_px)
        back = filled.view(bool) & ~fg.view(bool) & (labels > 0)
        out[back] = labels[back]
    return out


@njit(cache=True, nogil=True)
def _label_max(labels, values, out):  # pragma: no cover - numba
    h, w = labels.shape
    for y in range(h):
        for x in range(w):
            k = labels[y, x]
            if k > 0 and values[y, x] > out[k]:
                out[k] = values[y, x]


@njit(cache=True, nogil=True)
def _drop_below(labels, values, level, out):  # pragma: no cover - numba
    h, w = labels.shape
    dropped = False
    for y in range(h):
        for x in range(w):
            k = labels[y, x]
            if k > 0 and values[y, x] < level[k]:
                out[y, x] = 0
                dropped = True
            else:
                out[y, x] = k
    return dropped


@njit(cache=True, nogil=True)
def _object_pixels(labels, crop, use_crop, dy, dx, width, lab, pix):  # pragma: no cover
    h, w = labels.shape
    k = 0
    for y in range(h):
        for x in range(w):
            v = labels[y, x]
            if v != 0:
                if use_crop:
                    c = crop[y, x] - 1
                    pix[k] = (y + dy[c]) * width + x + dx[c]
                else:
                    pix[k] = (y + dy[0]) * width + x + dx[0]
                lab[k] = v
                k += 1


def object_pixels(labels: np.ndarray, crop: np.ndarray | None, dy: np.ndarray,
                  dx: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(label, flat image index) of every labelled pixel of an atlas (raster order); the
    pixel of box ``crop - 1`` (box 0 when ``crop`` is None) moves by (``dy``, ``dx``)."""
    n = int(np.count_nonzero(labels))
    lab = np.empty(n, np.int32)
    pix = np.empty(n, np.int64)
    _object_pixels(labels, crop if crop is not None else labels, crop is not None,
                   np.asarray(dy, np.int64), np.asarray(dx, np.int64), int(width), lab, pix)
    return lab, pix


def expand_labels(labels: np.ndarray, distance_px: float, mask: np.ndarray | None = None
                  ) -> np.ndarray:
    """Grow labels by up to ``distance_px`` into unlabelled pixels (nearest label wins)."""
    if distance_px <= 0:
        return labels
    src = (labels == 0).view(np.uint8)
    dist, near = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, cv2.DIST_MASK_5,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    obj_labels = np.concatenate([[0], labels[labels != 0]]).astype(np.int32)
    grown = obj_labels[near]
    grown[dist > distance_px] = 0
    if mask is not None:
        grown[~mask & (labels == 0)] = 0
    return np.where(labels != 0, labels, grown)


def object_stats(labels: np.ndarray, n: int, values: dict[str, np.ndarray],
                 idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-label pixel count, centroid and sums of ``values`` via ``np.bincount``.

    Returns arrays of length ``n + 1`` (index = label); keys ``count``, ``sum_x``, ``sum_y``
    and ``sum_<name>`` for every entry of ``values``.
    """
    flat = labels.ravel()
    if idx is None:
        idx = np.flatnonzero(flat)
    lab = flat[idx]
    w = labels.shape[1]
    out = {"count": np.bincount(lab, minlength=n + 1).astype(np.float64)}
    ys, xs = np.divmod(idx, w)
    out["sum_x"] = np.bincount(lab, weights=xs, minlength=n + 1)
    out["sum_y"] = np.bincount(lab, weights=ys, minlength=n + 1)
    for name, v in values.items():
        out[f"sum_{name}"] = np.bincount(lab, weights=v.ravel()[idx], minlength=n + 1)
    return out


def nearest_label_at(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                     max_distance_px: float) -> np.ndarray:
    """Label under or nearest (≤ ``max_distance_px``) to each point; 0 when none.

    The result is that of ``cv2.distanceTransformWithLabels`` (L2, 5x5 chamfer mask, one
    label per labelled pixel) read at the points, without the whole-image transform: each
    point searches the labelled pixels around it ring by ring (a chamfer distance is never
    below the chessboard distance), with the chamfer distance of every offset taken from the
    transform of a single pixel. The transform sums its float32 steps in an order of its own,
    so distances of two pixels may differ in the last bits from these; a point whose nearest
    pixels of two labels (or whose distance and ``max_distance_px``) lie within that rounding
    gets the answer of the labelled transform of a window around it, which is the
    whole-image one there (the window reaches beyond every path shorter than the point's
    distance).
    """
    rows = np.asarray(rows, np.intp)
    cols = np.asarray(cols, np.intp)
    if len(rows) == 0 or not labels.any():
        return np.zeros(len(rows), np.int64)
    k = max(labels.shape)
    if np.isfinite(max_distance_px):
        k = max(1, min(k, int(np.floor(max_distance_px)) + 2))
    if k > _MAX_SEARCH_PX:  # far searches: one whole-image transform is cheaper
        return _nearest_label_transform(labels, rows, cols, max_distance_px)
    lab = np.ascontiguousarray(labels)
    out, dist, amb = _nearest_label_search(lab, rows, cols, _chamfer_table(k), k)
    far = dist > max_distance_px
    amb |= np.abs(dist.astype(np.float64) - float(max_distance_px)) <= _tolerance(dist)
    if np.count_nonzero(amb) > _MAX_WINDOWS:  # many ties: one whole-image transform
        return _nearest_label_transform(labels, rows, cols, max_distance_px)
    for i in np.flatnonzero(amb):
        out[i], d = _window_label(lab, int(rows[i]), int(cols[i]), float(dist[i]))
        far[i] = np.float32(d) > max_distance_px
    out[far] = 0
    return out


def _nearest_label_transform(labels, rows, cols, max_distance_px):
    """:func:`nearest_label_at` by the whole-image labelled transform (the reference)."""
    src = (labels == 0).view(np.uint8)
    dist, near = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, cv2.DIST_MASK_5,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    obj = np.concatenate([[0], labels[labels != 0]]).astype(np.int64)
    out = obj[near[rows, cols]]
    out[dist[rows, cols] > max_distance_px] = 0
    return out


#: largest search radius (px) of the ring search; the chamfer table is (2k+1)² float32
_MAX_SEARCH_PX = 256
#: most points resolved by a window transform before one whole-image transform is cheaper
_MAX_WINDOWS = 400
_CHAMFER: dict[int, np.ndarray] = {}


def _chamfer_table(k: int) -> np.ndarray:
    """float32 (2k+1, 2k+1): the 5x5-mask chamfer distance of every offset (OpenCV's)."""
    t = _CHAMFER.get(k)
    if t is None:
        src = np.ones((2 * k + 1, 2 * k + 1), np.uint8)
        src[k, k] = 0
        t = cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_5)
        _CHAMFER[k] = t
    return t


def _tolerance(d):
    """Bound on the float32 rounding of a chamfer distance ``d`` (px) summed in any order
    (at most ``d`` steps, each rounding by at most 2^-24 of the running sum), times 4."""
    d = np.minimum(np.asarray(d, np.float64), 1e9)
    return 1e-6 + 5e-7 * d * d


def _window_label(labels: np.ndarray, r: int, c: int, dist: float) -> tuple[int, float]:
    """(label, distance) of point (r, c) by the labelled transform of a window reaching past
    ``dist``: a value there comes from paths no longer than itself, inside the window."""
    w = int(np.ceil(dist + float(_tolerance(dist)))) + 4 if np.isfinite(dist) else \
        max(labels.shape)
    y0, x0 = max(0, r - w), max(0, c - w)
    win = labels[y0:r + w + 1, x0:c + w + 1]
    src = (win == 0).view(np.uint8)
    dmap, near = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, cv2.DIST_MASK_5,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    obj = np.concatenate([[0], win[win != 0]]).astype(np.int64)
    return int(obj[near[r - y0, c - x0]]), float(dmap[r - y0, c - x0])


@njit(cache=True, nogil=True)
def _nearest_label_search(labels, rows, cols, table, k):  # pragma: no cover - numba
    """Per point: label of the nearest labelled pixel within chessboard radius ``k`` by the
    chamfer distances of ``table`` (0 / inf when none), and whether a pixel of another label
    lies within the rounding tolerance of that distance (ambiguous)."""
    h, w = labels.shape
    n = len(rows)
    out = np.zeros(n, np.int64)
    dist = np.full(n, np.inf, np.float32)
    amb = np.zeros(n, np.bool_)
    for i in range(n):
        r = rows[i]
        c = cols[i]
        if labels[r, c] != 0:
            out[i] = labels[r, c]
            dist[i] = 0.0
            continue
        d1 = np.inf  # nearest distance and its label
        lab = 0
        d2 = np.inf  # nearest distance of a pixel of another label (upper bound)
        for ring in range(1, k + 1):
            if ring > d1 + 1e-6 + 5e-7 * d1 * d1:
                break
            for y in range(r - ring, r + ring + 1):
                if y < 0 or y >= h:
                    continue
                step = 1 if (y == r - ring or y == r + ring) else 2 * ring
                for x in range(c - ring, c + ring + 1, step):
                    if x < 0 or x >= w:
                        continue
                    v = labels[y, x]
                    if v == 0:
                        continue
                    d = np.float64(table[y - r + k, x - c + k])
                    if v == lab:
                        if d < d1:
                            d1 = d
                    elif d < d1:
                        d2 = min(d2, d1)
                        d1 = d
                        lab = v
                    elif d < d2:
                        d2 = d
        out[i] = lab
        dist[i] = d1
        amb[i] = d2 < np.inf and d2 - d1 <= 1e-6 + 5e-7 * d2 * d2
    return out, dist, amb


# ----------------------------------------------------------------------------------------------
# sparse evaluation: the detection chain runs only on padded regions around candidate pixels,
# packed side by side into one small "atlas" image


@njit(cache=True, nogil=True)
def _block_any_above(det, threshold, mask, use_mask, block, out):  # pragma: no cover - numba
    h, w = det.shape
    nbx = out.shape[1]
    acc = np.zeros(w, np.uint8)
    for y in range(h):
        if use_mask:
            for x in range(w):
                acc[x] |= (det[y, x] > threshold) & (mask[y, x] != 0)
        else:
            for x in range(w):
                acc[x] |= det[y, x] > threshold
        if (y + 1) % block == 0 or y == h - 1:
            row = out[y // block]
            for bx in range(nbx):
                v = 0
                for x in range(bx * block, min((bx + 1) * block, w)):
                    v |= acc[x]
                row[bx] = v
            acc[:] = 0


def candidate_blocks(det: np.ndarray, threshold: float, mask: np.ndarray | None,
                     block: int) -> np.ndarray:
    """uint8 (ceil(H/block), ceil(W/block)): 1 where a block holds a pixel ``det > threshold``
    inside ``mask`` (the foreground of :func:`foreground`, at block resolution)."""
    h, w = det.shape
    out = np.zeros((-(-h // block), -(-w // block)), np.uint8)
    m = mask.view(np.uint8) if mask is not None else np.zeros((1, 1), np.uint8)
    _block_any_above(det, np.float32(threshold), m, mask is not None, int(block), out)
    return out


@dataclass(frozen=True)
class Regions:
    """Rectangles of an image that hold every candidate pixel, grouped so that no operation of
    the detection chain links pixels of two different groups.

    Attributes
    ----------
    block : int
        Block size (px) of ``group``.
    group : ndarray of int32 (nby, nbx)
        Group id per block (0 = no group); a group's pixels are its blocks.
    boxes : ndarray of int64 (n, 5)
        Per group: y0, y1, x0, x1 (pixel rectangle, end exclusive) and group id.
    border : ndarray of bool (n,)
        The rectangle was clipped by the image border (it lacks the full margin on that side).
    """

    block: int
    group: np.ndarray
    boxes: np.ndarray
    border: np.ndarray


def plan_regions(cand: np.ndarray, block: int, shape: tuple[int, int], *, reach_px: float,
                 margin_px: int) -> Regions:
    """Group candidate blocks and give each group a rectangle with ``margin_px`` of context.

    Blocks closer than ``reach_px`` (the largest distance over which the detection chain lets
    two foreground pixels influence each other) end up in the same group; each rectangle is
    the bounding box of its group's candidate blocks grown by ``margin_px``.
    """
    h, w = shape
    # blocks with at most g empty blocks between them can hold pixels closer than reach_px:
    # a (g+1) x (g+1) dilation joins them
    g = int(np.ceil(reach_px / block))
    dil = cand if g == 0 else cv2.dilate(cand, np.ones((g + 1, g + 1), np.uint8))
    n, group, st, _ = cv2.connectedComponentsWithStats(dil, connectivity=8, ltype=cv2.CV_32S)
    if n <= 1:
        return Regions(block, group, np.zeros((0, 5), np.int64), np.zeros(0, bool))
    # bounding box of each group's candidate blocks: the dilated box shrunk by the dilation's
    # reach on every side not clipped by the grid (a clipped side keeps the larger box)
    st = st[1:].astype(np.int64)
    ids = np.arange(1, n, dtype=np.int64)
    nby, nbx = cand.shape
    e = g // 2  # the (g+1)-square dilation grew every side by at least this
    bx0, by0 = st[:, 0], st[:, 1]
    bx1, by1 = st[:, 0] + st[:, 2], st[:, 1] + st[:, 3]
    if e:
        bx0 = np.where(bx0 > 0, bx0 + e, 0)
        by0 = np.where(by0 > 0, by0 + e, 0)
        bx1 = np.where(bx1 < nbx, bx1 - e, nbx)
        by1 = np.where(by1 < nby, by1 - e, nby)
    y0 = by0 * block - margin_px
    x0 = bx0 * block - margin_px
    y1 = by1 * block + margin_px
    x1 = bx1 * block + margin_px
    border = (y0 < 0) | (x0 < 0) | (y1 > h) | (x1 > w)
    boxes = np.stack([np.maximum(y0, 0), np.minimum(y1, h), np.maximum(x0, 0),
                      np.minimum(x1, w), ids], axis=1).astype(np.int64)
    return Regions(block, group, boxes, border)


def group_mask(regions: Regions, box: np.ndarray) -> np.ndarray:
    """bool mask of the pixels of ``box`` (a row of ``regions.boxes``) in its group's blocks."""
    y0, y1, x0, x1, gid = (int(v) for v in box)
    b = regions.block
    by0, bx0 = y0 // b, x0 // b
    sub = (regions.group[by0:-(-y1 // b), bx0:-(-x1 // b)] == gid)
    up = np.repeat(np.repeat(sub, b, axis=0), b, axis=1)
    return up[y0 - by0 * b:y1 - by0 * b, x0 - bx0 * b:x1 - bx0 * b]


def other_groups_near(regions: Regions) -> np.ndarray:
    """bool per box: blocks of another group lie in it (then :func:`group_mask` is needed)."""
    out = np.zeros(len(regions.boxes), np.bool_)
    _other_groups(regions.group, regions.boxes, regions.block, out)
    return out


@njit(cache=True, nogil=True)
def _other_groups(group, boxes, b, out):  # pragma: no cover - numba
    for i in range(boxes.shape[0]):
        gid = boxes[i, 4]
        for by in range(boxes[i, 0] // b, -(-boxes[i, 1] // b)):
            for bx in range(boxes[i, 2] // b, -(-boxes[i, 3] // b)):
                v = group[by, bx]
                if v != 0 and v != gid:
                    out[i] = True
                    break
            if out[i]:
                break


@njit(cache=True, nogil=True)
def _fill_atlas(det, weight, use_weight, mask, use_mask, group, block, boxes, at, threshold,
                a_fg, a_det, a_w, a_crop):  # pragma: no cover - numba
    for i in range(boxes.shape[0]):
        y0, y1, x0, x1, gid = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3], boxes[i, 4]
        ay0, ax0 = at[i, 0], at[i, 1]
        n = x1 - x0
        bx0 = x0 // block
        bx1 = (x1 - 1) // block + 1
        for y in range(y0, y1):
            ay = ay0 + y - y0
            # whole-row slice copies (vectorised), then the foreground on the runs of blocks
            # of this group only
            a_det[ay, ax0:ax0 + n] = det[y, x0:x1]
            a_crop[ay, ax0:ax0 + n] = i + 1
            if use_weight:
                a_w[ay, ax0:ax0 + n] = weight[y, x0:x1]
            grow = group[y // block]
            drow = det[y]
            frow = a_fg[ay]
            mrow = mask[y]
            bx = bx0
            while bx < bx1:
                if grow[bx] != gid:
                    bx += 1
                    continue
                be = bx
                while be < bx1 and grow[be] == gid:
                    be += 1
                xs = max(bx * block, x0)
                xe = min(be * block, x1)
                if use_mask:
                    for x in range(xs, xe):
                        frow[ax0 + x - x0] = (drow[x] > threshold) & (mrow[x] != 0)
                else:
                    for x in range(xs, xe):
                        frow[ax0 + x - x0] = drow[x] > threshold
                bx = be


def fill_atlas(det: np.ndarray, weight: np.ndarray | None, mask: np.ndarray | None,
               regions: Regions, boxes: np.ndarray, at: np.ndarray, threshold: float,
               shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                np.ndarray]:
    """Copy the rectangles ``boxes`` (rows of ``regions.boxes``) of ``det`` (and ``weight``)
    to their atlas positions ``at``; foreground = ``det > threshold`` in the mask and in the
    rectangle's own group. Returns foreground (uint8), det, weight and the box index + 1 of
    every atlas pixel (0 = gap)."""
    a_fg = np.zeros(shape, np.uint8)
    a_det = np.zeros(shape, np.float32)
    a_w = np.zeros(shape if weight is not None else (1, 1), np.float32)
    a_crop = np.zeros(shape, np.int32)
    _fill_atlas(det, weight if weight is not None else a_w, weight is not None,
                mask.view(np.uint8) if mask is not None else a_fg, mask is not None,
                regions.group, int(regions.block), np.ascontiguousarray(boxes, np.int64),
                np.ascontiguousarray(at, np.int64), np.float32(threshold), a_fg, a_det, a_w,
                a_crop)
    return a_fg, a_det, (a_w if weight is not None else None), a_crop


@njit(cache=True, nogil=True)
def _piece_sums(lab, pix, dab, hema, hmax, dabc, use_c, t1, width, n, out, mx):
    # pragma: no cover - numba
    for k in range(len(lab)):
        i = lab[k]
        p = pix[k]
        y = p // width
        x = p - y * width
        d = dab.flat[p]
        out[i, 0] += 1.0
        out[i, 1] += x
        out[i, 2] += y
        out[i, 3] += d
        out[i, 4] += hema.flat[p]
        if d >= t1:
            out[i, 5] += 1.0
        if use_c:
            out[i, 6] += dabc.flat[p]
        if d > mx[i, 0]:
            mx[i, 0] = d
        h = hmax.flat[p]
        if h > mx[i, 1]:
            mx[i, 1] = h


def piece_sums(lab: np.ndarray, pix: np.ndarray, dab: np.ndarray, hema: np.ndarray,
               hmax: np.ndarray, dabc: np.ndarray | None, t1: float, n: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per-label (0..n) count, sum x, sum y, sum DAB, sum hematoxylin, count DAB ≥ t1, sum
    ``dabc`` (columns of a float64 (n+1, 7) array) and maxima of DAB and ``hmax`` (float32
    (n+1, 2), starting at 0) over the object pixels ``pix`` (flat image indices)."""
    out = np.zeros((n + 1, 7), np.float64)
    mx = np.zeros((n + 1, 2), np.float32)
    _piece_sums(lab, pix, dab, hema, hmax, dabc if dabc is not None else dab, dabc is not None,
                np.float32(t1), dab.shape[1], n, out, mx)
    return out, mx


def pack_boxes(heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                 tuple[int, int]]:
    """Shelf packing of rectangles: (row, col) offset of each and the atlas shape."""
    n = len(heights)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), (0, 0)
    area = float(np.sum(heights.astype(np.float64) * widths))
    aw = int(max(widths.max(), np.ceil(np.sqrt(area) * 1.15)))
    order = np.argsort(-heights, kind="stable")
    ay = np.zeros(n, np.int64)
    ax = np.zeros(n, np.int64)
    shelf_y = shelf_h = cur_x = 0
    for i in order:
        hh, ww = int(heights[i]), int(widths[i])
        if cur_x + ww > aw:
            shelf_y += shelf_h
            shelf_h = cur_x = 0
        ay[i], ax[i] = shelf_y, cur_x
        cur_x += ww
        shelf_h = max(shelf_h, hh)
    return ay, ax, (shelf_y + shelf_h, aw)
