"""MHC class I scoring on muscle fibers: per-fiber rim / interior DAB, calls, grades, pattern.

Per fiber (labels from :func:`biopsyquant.fibers.segment_fibers`):

* **rim band** = pixels within ``rim_width_um`` (2 µm) inside and ``rim_outside_um`` (2 µm)
  outside the fiber's own outline. Inside distances come from a distance transform of the
  label image with every label border as zero (the image border is *not* an outline, so fibers
  cut by a tile edge keep their true rim); outside pixels (endomysium) belong to the *nearest*
  fiber only, so a stained neighbour never lends its rim. The band is cut into rings of
  ``rim_ring_um`` (1 µm) by signed distance to the outline, and
  ``rim_dab_od`` = the highest ``rim_quantile`` (0.6: the 60th percentile, so a patchy
  sarcolemma stained along ~40 % of its length counts) of DAB OD over the rings. The
  sarcolemmal ring is thus found wherever the segmentation put the outline (segmenters often
  stop at the inner edge of a stained membrane), and a median over a whole ring is not moved by
  a DAB-positive capillary touching a few % of the perimeter. **interior** = fiber pixels
  deeper than ``rim_width_um``; ``interior_dab_od`` = their ``interior_quantile`` (median).
  Only analysed pixels (tissue minus exclusions) are used; OD is log10, background-relative.
* **call**: positive when ``rim_dab_od ≥ positive_od`` or ``interior_dab_od ≥ positive_od``
  (default 0.2).
* **pattern** of a positive fiber: ``sarcoplasmic`` when the interior is positive and the rim
  is no more than ``rim_contrast_od`` (0.1) darker than the interior; ``both`` when the interior
  is positive and the rim is darker by at least ``rim_contrast_od``; ``sarcolemmal`` when only
  the rim is positive; negative fibers are ``none``.
* **grade 0–3**: 0 for a negative fiber; otherwise 1 + [s ≥ ``grade_2_od``] +
  [s ≥ ``grade_3_od``] with s = max(rim, interior) (defaults 0.4 and 0.6: 1+ weak, 2+
  moderate, 3+ strong like the QuPath intensity tiers).

**Capillaries and vessels are never fibers.** They are DAB-positive in every section (the
internal control). The fiber segmenter drops ring-shaped and small objects; this module adds
its own guard, so an object is *not scored* (``mhc_scored`` False, NA call) when its area is
below ``min_fiber_area_um2``, it is ring-shaped or thin (deepest interior point
< ``min_compactness`` × the radius of a disk of the same area), more than
``max_lumen_fraction`` of it is empty (total OD < ``lumen_max_total_od``: a vessel lumen), or
less than ``min_analysed_fraction`` of it lies in analysed tissue. The mean DAB OD of the
positive capillaries / small vessels outside the fibers (found as in
:func:`biopsyquant.pixels.positive_vessels`) is reported as ``capillary_dab_od``; a value
below ``control_min_od`` sets ``control_ok`` False (staining failed or vectors wrong).

Per slide (:func:`summarize`): fibers scored / positive / % positive, grade counts and %, the
published 0–5 grade by % positive fibers (0: none, 1: ≤ 10 %, 2: > 10–25 %, 3: > 25–50 %,
4: > 50 % and not all, 5: all), % positive among perifascicular fibers (a fiber within
``perifascicular_distance_um`` of perimysium or a vessel, compartment codes
``fascicle_edge_codes``) vs the rest, and the distribution ``mhc_pattern``:

* ``none`` — fewer than ``pattern_min_positive_pct`` % positive fibers;
* ``perifascicular`` — at least ``perifascicular_min_fibers`` perifascicular fibers, their
  % positive ≥ ``perifascicular_ratio`` × the rest's and ≥ the rest's +
  ``perifascicular_min_difference_pct`` points, and the excess significant (one-sided Fisher
  exact test p < ``perifascicular_max_p``);
* ``diffuse`` — otherwise, when at least ``diffuse_min_region_pct`` % of the square regions of
  ``pattern_region_um`` holding ≥ ``pattern_min_region_fibers`` scored fibers are involved (a
  region is involved when its % positive reaches ``region_involved_fraction`` × the slide's %
  positive, and at least ``pattern_min_positive_pct``);
* ``focal`` — otherwise (positive fibers concentrated in part of the section).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from numba import njit, parallel_chunksize, prange

from .errors import InputError
from .pixels import _od_lut, _run, _vessels

if TYPE_CHECKING:  # score imports the analysis modules lazily; avoid a cycle at import time
    from .score import ImageContext, Measurements

__all__ = [
    "MhcParams",
    "FIBER_COLUMNS",
    "score_fibers_mhc",
    "grade_0_5",
    "measure",
    "summarize",
]

#: per-fiber columns added by :func:`measure` (besides ``fiber_id``)
FIBER_COLUMNS: tuple[str, ...] = (
    "rim_dab_od", "interior_dab_od", "rim_positive_fraction", "mhc_scored", "mhc_positive",
    "mhc_grade", "mhc_pattern", "perimysium_distance_um", "perifascicular",
)

_JIT = {"fastmath": False, "cache": True, "nogil": True}

#: DAB OD histogram used for per-fiber quantiles: bins of 0.01 OD from -0.5 to 3.0
_H_LO, _H_W, _H_N = -0.5, 0.01, 350


@dataclass(frozen=True)
class MhcParams:
    """Settings of MHC class I fiber scoring (sizes in µm, OD in log10 DAB OD).

    Parameters
    ----------
    rim_width_um, rim_outside_um : float
        The sarcolemmal rim band reaches this far inside / outside the fiber outline (outside
        pixels belong to the nearest fiber, so two fibers never share them).
    rim_ring_um : float
        The band is cut into rings of this width (by distance to the outline).
    rim_quantile, interior_quantile : float
        Quantile (0–1) of the DAB OD of each rim ring / of the interior used as the value; the
        fiber's rim value is that of its most stained ring.
    positive_od : float
        A fiber is positive when its rim or interior value reaches this (grade 1 from here).
    grade_2_od, grade_3_od : float
        Grade 2 / 3 from these values of max(rim, interior).
    rim_contrast_od : float
        Rim darker than the interior by at least this counts as sarcolemmal accentuation
        (pattern ``both`` instead of ``sarcoplasmic``).
    min_fiber_area_um2 : float
        Smaller objects are not scored (capillaries, fragments).
    min_compactness : float
        Deepest interior distance / equivalent-disk radius below which an object is ring-shaped
        or thin and not scored (disk 1.0, square 0.89, 3:1 ellipse ≈ 0.58, vessel wall ≈ 0.1).
    max_lumen_fraction : float
        Objects more than this fraction empty (a lumen) are not scored.
    lumen_max_total_od : float
        Pixels whose R+G+B optical density is below this are empty.
    min_analysed_fraction : float
        Objects with less than this fraction of their pixels in analysed tissue (exclusions)
        are not scored.
    perifascicular_distance_um : float
        A fiber whose nearest pixel lies within this distance of a fascicle-edge compartment is
        perifascicular.
    fascicle_edge_codes : tuple of int
        Compartment codes that mark the fascicle edge (3 perimysium, 4 vessel, 5 perivascular).
    pattern_min_positive_pct : float
        Below this % positive fibers the slide pattern is ``none``.
    perifascicular_ratio, perifascicular_min_difference_pct : float
        Perifascicular pattern: perifascicular % positive ≥ ratio × the rest and ≥ rest +
        difference (percentage points).
    perifascicular_min_fibers : int
        ... with at least this many perifascicular fibers scored ...
    perifascicular_max_p : float
        ... and a one-sided Fisher exact test (perifascicular vs other fibers, positive vs
        negative) below this p-value, so chance clustering among few fibers is not a pattern.
    pattern_region_um : float
        Edge of the square regions used to tell diffuse from focal.
    pattern_min_region_fibers : int
        Regions with fewer scored fibers are ignored.
    region_involved_fraction : float
        A region is involved when its % positive ≥ this × the slide's % positive.
    diffuse_min_region_pct : float
        Diffuse when at least this % of regions are involved, else focal.
    capillary_od, capillary_min_area_um2, capillary_max_area_um2, capillary_max_lumen_um2,
    capillary_max_elongation, capillary_min_contrast_od, capillary_level_step_od,
    capillary_nucleus_od, capillary_max_nucleus_um2 : float
    capillary_codes : tuple of int
        Internal control: positive capillary / small vessel objects outside the fibers (see
        :class:`biopsyquant.pixels.PixelParams`).
    control_min_od : float
        ``control_ok`` is False when the capillaries' mean DAB OD is below this.
    """

    rim_width_um: float = 2.0
    rim_outside_um: float = 2.0
    rim_ring_um: float = 1.0
    rim_quantile: float = 0.6
    interior_quantile: float = 0.5
    positive_od: float = 0.2
    grade_2_od: float = 0.4
    grade_3_od: float = 0.6
    rim_contrast_od: float = 0.1
    min_fiber_area_um2: float = 80.0
    min_compactness: float = 0.3
    max_lumen_fraction: float = 0.3
    lumen_max_total_od: float = 0.03
    min_analysed_fraction: float = 0.5
    perifascicular_distance_um: float = 10.0
    fascicle_edge_codes: tuple = (3, 4, 5)
    pattern_min_positive_pct: float = 1.0
    perifascicular_ratio: float = 2.0
    perifascicular_min_difference_pct: float = 15.0
    perifascicular_min_fibers: int = 10
    perifascicular_max_p: float = 0.05
    pattern_region_um: float = 500.0
    pattern_min_region_fibers: int = 10
    region_involved_fraction: float = 0.5
    diffuse_min_region_pct: float = 50.0
    capillary_od: float = 0.3
    capillary_min_area_um2: float = 8.0
    capillary_max_area_um2: float = 80.0
    capillary_max_lumen_um2: float = 120.0
    capillary_max_elongation: float = 3.0
    capillary_min_contrast_od: float = 0.1
    capillary_level_step_od: float = 0.0
    capillary_codes: tuple = (2,)
    capillary_nucleus_od: float = 0.3
    capillary_max_nucleus_um2: float = 18.0
    control_min_od: float = 0.3

    def __post_init__(self) -> None:
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if f in ("fascicle_edge_codes", "capillary_codes"):
                if not all(isinstance(c, int) and 0 <= c <= 255 for c in v):
                    raise InputError(f"MhcParams.{f} must be compartment codes 0-255, got "
                                     f"{v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InputError(f"MhcParams.{f} must be a finite number, got {v!r}")
            if v < 0:
                raise InputError(f"MhcParams.{f} must be >= 0, got {v!r}")
        if not (0 < self.positive_od < self.grade_2_od < self.grade_3_od):
            raise InputError(
                "MhcParams thresholds must satisfy 0 < positive_od < grade_2_od < grade_3_od, "
                f"got {self.positive_od}, {self.grade_2_od}, {self.grade_3_od}")
        for f in ("rim_quantile", "interior_quantile", "max_lumen_fraction",
                  "min_analysed_fraction"):
            if not 0 <= getattr(self, f) <= 1:
                raise InputError(f"MhcParams.{f} must be between 0 and 1, got {getattr(self, f)}")
        for f in ("rim_width_um", "rim_ring_um"):
            if getattr(self, f) <= 0:
                raise InputError(f"MhcParams.{f} must be > 0, got {getattr(self, f)}")


# ------------------------------------------------------------------------------- kernels
# Chamfer distances exactly as OpenCV's 5x5 DIST_L2 mask computes them (fixed point with 16
# fractional bits, weights 1, 1.4, 2.1969; outside the image counts as far), in numba so that
# the per-fiber statistics are gathered in the same pass.
_HV = 65536
_DG = int(round(float(np.float32(1.4)) * 65536))
_LG = int(round(float(np.float32(2.1969)) * 65536))
_FAR = 2147483647
#: far value of the per-fiber buffers (int64: numba adds in 64 bits, no narrowing stores)
_FAR32 = 1 << 30
_SCALE = np.float32(1.0 / 65536)
#: neighbour offsets of the forward (causal) half of the 5x5 mask, in OpenCV's order; the
#: backward half is the mirror image
_FWD_DI = np.array([-2, -2, -1, -1, -1, -1, -1, 0], np.int64)
_FWD_DJ = np.array([-1, 1, -2, -1, 0, 1, 2, -1], np.int64)


@njit(**_JIT)
def _is_outline(labels, i, j, lab, h, w):
    return ((i > 0 and labels[i - 1, j] != lab) or (i < h - 1 and labels[i + 1, j] != lab)
            or (j > 0 and labels[i, j - 1] != lab) or (j < w - 1 and labels[i, j + 1] != lab))


@njit(**_JIT)
def _boxes_band(labels, r0, r1, x0, y0, x1, y1):
    for i in range(r0, r1):
        row = labels[i]
        for j in range(row.shape[0]):
            lab = row[j]
            if lab <= 0:
                continue
            if j < x0[lab]:
                x0[lab] = j
            if j > x1[lab]:
                x1[lab] = j
            if i < y0[lab]:
                y0[lab] = i
            if i > y1[lab]:
                y1[lab] = i


@njit(parallel=True, **_JIT)
def _fiber_boxes(labels, n):
    """Bounding box (x0, y0, x1, y1 inclusive) of every label 1..n (x1 < x0 when absent)."""
    h, w = labels.shape
    nb = 8 if h >= 64 else 1
    x0 = np.full((nb, n + 1), w, np.int64)
    y0 = np.full((nb, n + 1), h, np.int64)
    x1 = np.full((nb, n + 1), -1, np.int64)
    y1 = np.full((nb, n + 1), -1, np.int64)
    for k in prange(nb):
        _boxes_band(labels, k * h // nb, (k + 1) * h // nb, x0[k], y0[k], x1[k], y1[k])
    for k in range(1, nb):
        for f in range(n + 1):
            x0[0, f] = min(x0[0, f], x0[k, f])
            y0[0, f] = min(y0[0, f], y0[k, f])
            x1[0, f] = max(x1[0, f], x1[k, f])
            y1[0, f] = max(y1[0, f], y1[k, f])
    return x0[0], y0[0], x1[0], y1[0]


@njit(**_JIT)
def _fiber_pass(f, labels, x0, y0, x1, y1, margin, dab, mask, rgb, lut, limit, use_rgb, rim_in,
                rim_out, ring_w, n_ring, lo, inv_w, nb, ring_hist, int_hist, npx, nana, npale,
                maxdist):
    """Chamfer transform around fiber ``f`` (its box + ``margin``) and its statistics.

    Sources (distance 0) are the outline pixels of ``f`` (a pixel 4-adjacent to another label
    or to background; the image edge is not an outline) and every pixel of other fibers. A
    pixel of ``f`` then gets its distance to the outline (OpenCV's 5x5 DIST_L2 transform of the
    label image with outlines and background as zeros: other fibers and background are never
    closer, in the 5x5 mask an outline pixel of ``f`` is always a strictly closer neighbour),
    and a background pixel its distance to the nearest fiber pixel with that fiber's label
    carried along, ties broken in OpenCV's neighbour order, so the nearest-fiber labels are
    those of ``distanceTransformWithLabels``. Labels are only carried up to ``rim_out`` (a
    label chain only passes through smaller distances). Values up to ``rim_out`` are exact
    ``margin`` (>= rim_out + 8) from the box edge, where the background pixels within
    ``rim_out`` of ``f`` lie.

    Each row is done in two steps: the minimum over the five-pixel-wide rows above (below) is
    taken for the whole row at once (vectorised), then one scan adds the left (right)
    neighbour and finds the label where needed.
    """
    h, w = labels.shape
    by0 = max(y0[f] - margin, 0)
    by1 = min(y1[f] + margin + 1, h)
    bx0 = max(x0[f] - margin, 0)
    bx1 = min(x1[f] + margin + 1, w)
    bh = by1 - by0
    bw = bx1 - bx0
    far = np.int64(_FAR32)
    hv = np.int64(_HV)
    dg = np.int64(_DG)
    lg = np.int64(_LG)
    capu = np.int64(min(math.ceil(rim_out * 65536.0) + 1, _FAR32))
    T = np.full((bh + 4, bw + 4), far, np.int64)
    L = np.zeros((bh + 4, bw + 4), np.int32)
    row = np.empty(bw + 4, np.int64)
    # the fiber's statistics accumulate in locals (two interleaved interior histograms: the
    # DAB of neighbouring pixels often falls in the same bin)
    rh = np.zeros((n_ring, nb), np.int64)
    ih = np.zeros((2, nb), np.int64)
    n_px = 0
    n_ana = 0
    n_pale = 0
    dmax = np.float32(0.0)
    for i in range(by0, by1):
        ii = i - by0 + 2
        a = T[ii - 2]
        b = T[ii - 1]
        c = T[ii]
        for jj in range(2, bw + 2):
            t = min(a[jj - 1] + lg, a[jj + 1] + lg)
            t = min(t, b[jj - 2] + lg)
            t = min(t, b[jj - 1] + dg)
            t = min(t, b[jj] + hv)
            t = min(t, b[jj + 1] + dg)
            t = min(t, b[jj + 2] + lg)
            row[jj] = t
        prev = far
        lrow = labels[i]
        for j in range(bx0, bx1):
            jj = j - bx0 + 2
            lab = lrow[j]
            if lab > 0 and (lab != f or _is_outline(labels, i, j, lab, h, w)):
                c[jj] = 0
                L[ii, jj] = lab
                prev = 0
                continue
            t0 = min(row[jj], prev + hv)
            if t0 > far:
                t0 = far
            c[jj] = t0
            prev = t0
            if lab <= 0 and t0 <= capu:
                # label of the first neighbour (OpenCV's order) giving the minimum
                if a[jj - 1] + lg == t0:
                    L[ii, jj] = L[ii - 2, jj - 1]
                elif a[jj + 1] + lg == t0:
                    L[ii, jj] = L[ii - 2, jj + 1]
                elif b[jj - 2] + lg == t0:
                    L[ii, jj] = L[ii - 1, jj - 2]
                elif b[jj - 1] + dg == t0:
                    L[ii, jj] = L[ii - 1, jj - 1]
                elif b[jj] + hv == t0:
                    L[ii, jj] = L[ii - 1, jj]
                elif b[jj + 1] + dg == t0:
                    L[ii, jj] = L[ii - 1, jj + 1]
                elif b[jj + 2] + lg == t0:
                    L[ii, jj] = L[ii - 1, jj + 2]
                else:
                    L[ii, jj] = L[ii, jj - 1]
    for i in range(by1 - 1, by0 - 1, -1):
        ii = i - by0 + 2
        a = T[ii + 2]
        b = T[ii + 1]
        c = T[ii]
        for jj in range(2, bw + 2):
            t = min(a[jj + 1] + lg, a[jj - 1] + lg)
            t = min(t, b[jj + 2] + lg)
            t = min(t, b[jj + 1] + dg)
            t = min(t, b[jj] + hv)
            t = min(t, b[jj - 1] + dg)
            t = min(t, b[jj - 2] + lg)
            row[jj] = t
        prev = far
        lrow = labels[i]
        mrow = mask[i]
        drow = dab[i]
        for j in range(bx1 - 1, bx0 - 1, -1):
            jj = j - bx0 + 2
            t0 = c[jj]
            lab = lrow[j]
            if t0 > hv:
                t1 = min(row[jj], prev + hv)
                if t1 < t0:
                    t0 = t1
                    c[jj] = t0
                    if lab <= 0 and t0 <= capu:
                        if a[jj + 1] + lg == t0:
                            L[ii, jj] = L[ii + 2, jj + 1]
                        elif a[jj - 1] + lg == t0:
                            L[ii, jj] = L[ii + 2, jj - 1]
                        elif b[jj + 2] + lg == t0:
                            L[ii, jj] = L[ii + 1, jj + 2]
                        elif b[jj + 1] + dg == t0:
                            L[ii, jj] = L[ii + 1, jj + 1]
                        elif b[jj] + hv == t0:
                            L[ii, jj] = L[ii + 1, jj]
                        elif b[jj - 1] + dg == t0:
                            L[ii, jj] = L[ii + 1, jj - 1]
                        elif b[jj - 2] + lg == t0:
                            L[ii, jj] = L[ii + 1, jj - 2]
                        else:
                            L[ii, jj] = L[ii, jj + 1]
            prev = t0
            if lab > 0 and lab != f:
                continue
            d = np.float32(t0) * _SCALE
            if lab <= 0:
                # background: the outer part of the rim band of its nearest fiber, if f
                if d > rim_out or not mrow[j] or L[ii, jj] != f:
                    continue
                kk = int((d + rim_in) / ring_w)
                if kk >= n_ring:
                    kk = n_ring - 1
                bb = int((drow[j] - lo) * inv_w)
                if bb < 0:
                    bb = 0
                elif bb >= nb:
                    bb = nb - 1
                rh[kk, bb] += 1
                continue
            n_px += 1
            if d > dmax:
                dmax = d
            if not mrow[j]:
                continue
            n_ana += 1
            if use_rgb:
                tod = lut[0, rgb[i, j, 0]] + lut[1, rgb[i, j, 1]] + lut[2, rgb[i, j, 2]]
                if tod < limit:
                    n_pale += 1
            bb = int((drow[j] - lo) * inv_w)
            if bb < 0:
                bb = 0
            elif bb >= nb:
                bb = nb - 1
            if d < rim_in:
                # ring index grows outwards: 0 is the deepest ring of the band
                kk = int((rim_in - d) / ring_w)
                if kk >= n_ring:
                    kk = n_ring - 1
                rh[kk, bb] += 1
            else:
                ih[j & 1, bb] += 1
    npx[f] = n_px
    nana[f] = n_ana
    npale[f] = n_pale
    maxdist[f] = dmax
    for bb in range(nb):
        int_hist[f, bb] = ih[0, bb] + ih[1, bb]
        for kk in range(n_ring):
            ring_hist[f, kk, bb] = rh[kk, bb]


@njit(parallel=True, **_JIT)
def _fibers_par(labels, x0, y0, x1, y1, margin, dab, mask, rgb, lut, limit, use_rgb, rim_in,
                rim_out, ring_w, n_ring, lo, inv_w, nb, ring_hist, int_hist, npx, nana, npale,
                maxdist):
    for f in prange(1, x0.shape[0]):
        if x1[f] >= x0[f]:
            _fiber_pass(f, labels, x0, y0, x1, y1, margin, dab, mask, rgb, lut, limit, use_rgb,
                        rim_in, rim_out, ring_w, n_ring, lo, inv_w, nb, ring_hist, int_hist, npx,
                        nana, npale, maxdist)


@njit(**_JIT)
def _fibers_ser(labels, x0, y0, x1, y1, margin, dab, mask, rgb, lut, limit, use_rgb, rim_in,
                rim_out, ring_w, n_ring, lo, inv_w, nb, ring_hist, int_hist, npx, nana, npale,
                maxdist):
    for f in range(1, x0.shape[0]):
        if x1[f] >= x0[f]:
            _fiber_pass(f, labels, x0, y0, x1, y1, margin, dab, mask, rgb, lut, limit, use_rgb,
                        rim_in, rim_out, ring_w, n_ring, lo, inv_w, nb, ring_hist, int_hist, npx,
                        nana, npale, maxdist)


@njit(**_JIT)
def _edge_pass(labels, comp, lut, T, minedge):
    """Chamfer distance to the pixels whose code is in ``lut``; its minimum per fiber.

    Returns False (``minedge`` untouched) when no pixel has such a code.
    """
    h, w = labels.shape
    for i in range(h + 4):
        for j in range(w + 4):
            T[i, j] = _FAR
    found = False
    for i in range(h):
        ii = i + 2
        prev = np.int64(_FAR)
        for j in range(w):
            jj = j + 2
            if lut[comp[i, j]]:
                T[ii, jj] = 0
                prev = 0
                found = True
                continue
            t0 = np.int64(T[ii - 2, jj - 1]) + _LG
            t0 = min(t0, np.int64(T[ii - 2, jj + 1]) + _LG)
            t0 = min(t0, np.int64(T[ii - 1, jj - 2]) + _LG)
            t0 = min(t0, np.int64(T[ii - 1, jj - 1]) + _DG)
            t0 = min(t0, np.int64(T[ii - 1, jj]) + _HV)
            t0 = min(t0, np.int64(T[ii - 1, jj + 1]) + _DG)
            t0 = min(t0, np.int64(T[ii - 1, jj + 2]) + _LG)
            t0 = min(t0, prev + _HV)
            T[ii, jj] = t0
            prev = t0
    if not found:
        return False
    for i in range(h - 1, -1, -1):
        ii = i + 2
        prev = np.int64(_FAR)
        for j in range(w - 1, -1, -1):
            jj = j + 2
            t0 = np.int64(T[ii, jj])
            if t0 > _HV:
                t0 = min(t0, np.int64(T[ii + 2, jj + 1]) + _LG)
                t0 = min(t0, np.int64(T[ii + 2, jj - 1]) + _LG)
                t0 = min(t0, np.int64(T[ii + 1, jj + 2]) + _LG)
                t0 = min(t0, np.int64(T[ii + 1, jj + 1]) + _DG)
                t0 = min(t0, np.int64(T[ii + 1, jj]) + _HV)
                t0 = min(t0, np.int64(T[ii + 1, jj - 1]) + _DG)
                t0 = min(t0, np.int64(T[ii + 1, jj - 2]) + _LG)
                t0 = min(t0, prev + _HV)
                T[ii, jj] = t0
            prev = t0
            lab = labels[i, j]
            if lab > 0:
                d = np.float32(t0) * _SCALE
                if d < minedge[lab]:
                    minedge[lab] = d
    return True


def _edge_job(out: list, *args) -> None:
    out.append(_edge_pass(*args))


def _hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """Quantile per row of a (n, nb) histogram with bins of _H_W from _H_LO (interpolated)."""
    n = hist.sum(axis=1)
    cum = np.cumsum(hist, axis=1)
    target = q * n
    idx = np.minimum((cum < target[:, None]).sum(axis=1), hist.shape[1] - 1)
    rows = np.arange(len(hist))
    before = np.where(idx > 0, cum[rows, np.maximum(idx - 1, 0)], 0)
    inbin = hist[rows, idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(inbin > 0, (target - before) / inbin, 0.5)
    val = _H_LO + (idx + np.clip(frac, 0, 1)) * _H_W
    return np.where(n > 0, val, np.nan)


def _pattern_call(rim, interior, p: MhcParams):
    rim_pos = rim >= p.positive_od
    int_pos = interior >= p.positive_od
    positive = rim_pos | int_pos
    s = np.fmax(rim, interior)
    grade = np.where(positive, 1 + (s >= p.grade_2_od) + (s >= p.grade_3_od), 0)
    accent = (rim - interior) >= p.rim_contrast_od
    pattern = np.where(~positive, "none",
                       np.where(int_pos, np.where(accent, "both", "sarcoplasmic"), "sarcolemmal"))
    return positive, grade, pattern


def score_fibers_mhc(fiber_labels: np.ndarray, dab_od: np.ndarray, *, mpp: float,
                     params: MhcParams | None = None, analysed: np.ndarray | None = None,
                     rgb: np.ndarray | None = None, background=(255.0, 255.0, 255.0),
                     compartments: np.ndarray | None = None) -> pd.DataFrame:
    """Per-fiber MHC class I values, calls and grades (rule in the module docstring).

    Parameters
    ----------
    fiber_labels : ndarray of int, (H, W)
        Fiber labels (0 = none).
    dab_od : ndarray of float32, (H, W)
        DAB OD (log10, background-relative).
    mpp : float
        Pixel size (µm/px) for the µm settings.
    params : MhcParams, optional
    analysed : ndarray of bool, (H, W), optional
        Analysed tissue (tissue minus exclusions); default everything.
    rgb : ndarray of uint8, (H, W, 3), optional
        The image, for the lumen guard (total OD); without it the guard is off.
    background : sequence of 3 float
        Glass intensity (R, G, B) of the stain model.
    compartments : ndarray of uint8, (H, W), optional
        Compartment codes for the perifascicular flag (NaN distance without).

    Returns
    -------
    DataFrame
        ``fiber_id`` plus :data:`FIBER_COLUMNS`: ``rim_dab_od, interior_dab_od`` (float, OD),
        ``rim_positive_fraction`` (share of rim pixels ≥ ``positive_od``), ``mhc_scored``
        (bool), ``mhc_positive`` (nullable boolean), ``mhc_grade`` (nullable Int8, 0–3),
        ``mhc_pattern`` (``sarcolemmal``/``sarcoplasmic``/``both``/``none``/``not_scored``),
        ``perimysium_distance_um`` (nearest fiber pixel to a fascicle-edge compartment; NaN
        when none in the image), ``perifascicular`` (bool).
    """
    p = MhcParams() if params is None else params
    labels = np.asarray(fiber_labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"`fiber_labels` must be a 2-D integer label image, got "
                         f"{labels.dtype} {labels.shape}")
    if not (mpp and math.isfinite(mpp) and mpp > 0):
        raise InputError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    shape = labels.shape
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    dab = np.asarray(dab_od, np.float32)
    if dab.shape != shape:
        raise InputError(f"`dab_od` has shape {dab.shape}, fiber labels have {shape}")
    dab = np.ascontiguousarray(dab)
    mask = (np.ones(shape, bool) if analysed is None
            else np.ascontiguousarray(np.asarray(analysed, bool)))
    if mask.shape != shape:
        raise InputError(f"`analysed` has shape {mask.shape}, fiber labels have {shape}")
    n = int(labels.max(initial=0))
    if n <= 0:
        return pd.DataFrame({"fiber_id": pd.Series(dtype=np.int32),
                             **{c: pd.Series(dtype=float) for c in FIBER_COLUMNS}})
    rim_in = p.rim_width_um / mpp
    rim_out = p.rim_outside_um / mpp
    ring_w = max(1.0, p.rim_ring_um / mpp)
    n_ring = int((rim_in + rim_out) / ring_w) + 1
    use_rgb = rgb is not None
    if use_rgb:
        rgb = np.ascontiguousarray(rgb)
        if rgb.shape[:2] != shape or rgb.dtype != np.uint8 or rgb.ndim != 3:
            raise InputError(f"`rgb` must be uint8 {shape + (3,)}, got {rgb.dtype} {rgb.shape}")
        lut = _od_lut(background)
    else:
        rgb = np.zeros((1, 1, 3), np.uint8)
        lut = np.zeros((3, 256), np.float32)
    use_edge = compartments is not None
    if use_edge:
        comp = np.asarray(compartments)
        if comp.shape != shape:
            raise InputError(f"`compartments` has shape {comp.shape}, fiber labels have {shape}")
        comp = np.ascontiguousarray(comp, dtype=np.uint8)
        edge_lut = np.zeros(256, np.bool_)
        edge_lut[np.asarray(p.fascicle_edge_codes, np.int64)] = True
        t2 = np.empty((shape[0] + 4, shape[1] + 4), np.uint32)
    else:
        comp = np.zeros((1, 1), np.uint8)
        edge_lut = np.zeros(256, np.bool_)
        t2 = np.zeros((1, 1), np.uint32)
    ring_hist = np.zeros((n + 1, n_ring, _H_N), np.int32)
    int_hist = np.zeros((n + 1, _H_N), np.int32)
    npx = np.zeros(n + 1, np.int64)
    nana = np.zeros(n + 1, np.int64)
    npale = np.zeros(n + 1, np.int64)
    maxdist = np.zeros(n + 1, np.float32)
    minedge = np.full(n + 1, np.inf, np.float32)
    # the fascicle-edge transform (whole image, serial) runs on its own thread while the
    # per-fiber transforms run in parallel over fibers
    edge_box: list = []
    if use_edge:
        worker = threading.Thread(target=_edge_job,
                                  args=(edge_box, labels, comp, edge_lut, t2, minedge))
        worker.start()
    try:
        x0, y0, x1, y1 = _fiber_boxes(labels, n)
        # fibers differ in size and a core may be busy with the edge pass: hand them out to
        # the threads in small chunks
        with parallel_chunksize(8):
            _run(_fibers_par, _fibers_ser, labels.size, labels, x0, y0, x1, y1,
                 int(math.ceil(rim_out)) + 8, dab, mask, rgb, lut,
                 np.float32(p.lumen_max_total_od), use_rgb, np.float32(rim_in),
                 np.float32(rim_out), np.float32(ring_w), n_ring, np.float32(_H_LO),
                 np.float32(1 / _H_W), _H_N, ring_hist, int_hist, npx, nana, npale, maxdist)
    finally:
        if use_edge:
            worker.join()
    del t2, edge_box
    ids = np.flatnonzero(npx)
    ids = ids[ids > 0]
    rh, ih = ring_hist[ids], int_hist[ids]
    # rim = the most stained ring of the band (robust to where the outline sits relative to the
    # stained sarcolemma); rings with few pixels (a tiny fiber's outer rings) are ignored
    rn = rh.sum(axis=2)                                            # (m, n_ring)
    min_px = np.maximum(8, 0.25 * rn.max(axis=1, initial=0))[:, None]
    q = _hist_quantile(rh.reshape(-1, _H_N), p.rim_quantile).reshape(rn.shape)
    q = np.where(rn >= min_px, q, np.nan)
    has = np.isfinite(q).any(axis=1)
    best = np.where(has, np.nanargmax(np.where(np.isfinite(q), q, -np.inf), axis=1), 0)
    rows = np.arange(len(ids))
    rim = np.where(has, q[rows, best], np.nan)
    interior = _hist_quantile(ih, p.interior_quantile)
    # a fiber too small for an interior: its rim band is all there is
    allband = rh.sum(axis=1)
    interior = np.where(np.isnan(interior), _hist_quantile(allband, p.interior_quantile),
                        interior)
    first_pos = int(math.ceil((p.positive_od - _H_LO) / _H_W - 1e-9))
    bh = rh[rows, best]
    bn = bh.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rim_pos_frac = np.where(bn > 0, bh[:, first_pos:].sum(axis=1) / bn, np.nan)
    area_um2 = npx[ids] * mpp * mpp
    eq_radius = np.sqrt(npx[ids] / np.pi)
    # distance is 0 on the outline, so the deepest pixel of a disk of radius r is ~ r - 1
    compact = (maxdist[ids] + 1.0) / np.maximum(eq_radius, 1e-9)
    ana_frac = nana[ids] / npx[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        pale_frac = np.where(nana[ids] > 0, npale[ids] / nana[ids], 0.0)
    scored = ((area_um2 >= p.min_fiber_area_um2) & (compact >= p.min_compactness)
              & (pale_frac <= p.max_lumen_fraction) & (ana_frac >= p.min_analysed_fraction)
              & np.isfinite(rim))
    positive, grade, pattern = _pattern_call(np.nan_to_num(rim, nan=-1.0),
                                             np.nan_to_num(interior, nan=-1.0), p)
    pattern = np.where(scored, pattern, "not_scored")
    edge_um = np.where(np.isfinite(minedge[ids]), minedge[ids].astype(float) * mpp, np.nan)
    df = pd.DataFrame({
        "fiber_id": ids.astype(np.int32),
        "rim_dab_od": rim,
        "interior_dab_od": interior,
        "rim_positive_fraction": rim_pos_frac,
        "mhc_scored": scored,
        "mhc_positive": pd.array(np.where(scored, positive, False), dtype="boolean"),
        "mhc_grade": pd.array(grade, dtype="Int8"),
        "mhc_pattern": pattern.astype(object),
        "perimysium_distance_um": edge_um,
        "perifascicular": np.nan_to_num(edge_um, nan=np.inf) <= p.perifascicular_distance_um,
    })
    df.loc[~scored, "mhc_positive"] = pd.NA
    df.loc[~scored, "mhc_grade"] = pd.NA
    return df


def grade_0_5(positive_pct: float, n_scored: int) -> float:
    """Published MHC-I grade (0–5) from the % of positive fibers.

    0: none, 1: ≤ 10 %, 2: > 10–25 %, 3: > 25–50 %, 4: > 50 % but not all, 5: all fibers.
    NaN when no fiber was scored.
    """
    if n_scored <= 0 or not np.isfinite(positive_pct):
        return float("nan")
    if positive_pct <= 0:
        return 0
    if positive_pct >= 100:
        return 5
    for grade, upper in ((1, 10), (2, 25), (3, 50)):
        if positive_pct <= upper:
            return grade
    return 4


# ------------------------------------------------------------------------------- contract
def _params(settings) -> MhcParams:
    p = getattr(settings, "sections", {}).get("mhc") if settings is not None else None
    return p if isinstance(p, MhcParams) else MhcParams()


def measure(ctx: ImageContext) -> Measurements:
    """MHC-I half of the engine contract for one image or tile.

    Returns
    -------
    Measurements
        ``fibers``: :func:`score_fibers_mhc` rows (all fibers of the image; the caller keeps
        those whose centroid this tile owns); ``cells``: positive capillaries / small vessels
        (owned centroids) with ``kind="capillary"``; ``counts``: ``capillary_n``,
        ``capillary_stained_px``, ``capillary_od_sum`` (internal control, additive).
    """
    from .score import Measurements

    p = _params(ctx.settings)
    mpp = float(ctx.size_mpp)
    dab = np.ascontiguousarray(np.asarray(ctx.dab_od, np.float32))
    shape = dab.shape
    analysed = np.ascontiguousarray(np.asarray(ctx.analysed, bool))
    comp = np.ascontiguousarray(np.asarray(ctx.compartments, np.uint8))
    own = None if ctx.own is None else np.ascontiguousarray(np.asarray(ctx.own, bool))
    hema = (None if ctx.hema_od is None
            else np.ascontiguousarray(np.asarray(ctx.hema_od, np.float32)))
    for name, a in (("analysed", analysed), ("compartments", comp), ("own", own),
                    ("hema_od", hema)):
        if a is not None and a.shape != shape:
            raise InputError(f"`{name}` has shape {a.shape}, the DAB map has {shape}")
    cap_lut = np.zeros(256, np.bool_)
    cap_lut[np.asarray(p.capillary_codes, np.int64)] = True
    # capillaries (analysed pixels with a capillary code, the region built on the fly) on a
    # second thread while the fibers are measured: its compiled passes release the GIL and
    # run serially, leaving the parallel kernels (and their lock) to the fiber pass
    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(
            _vessels, dab, region=analysed, mpp=mpp, own=own, comp=comp, codes_lut=cap_lut,
            threshold_od=p.capillary_od, min_area_um2=p.capillary_min_area_um2,
            max_area_um2=p.capillary_max_area_um2, max_lumen_um2=p.capillary_max_lumen_um2,
            max_elongation=p.capillary_max_elongation,
            min_contrast_od=p.capillary_min_contrast_od,
            level_step_od=p.capillary_level_step_od, hema_od=hema,
            nucleus_od=p.capillary_nucleus_od, max_nucleus_um2=p.capillary_max_nucleus_um2,
            parallel=False)
        fib = score_fibers_mhc(ctx.fibers, dab, mpp=mpp, params=p, analysed=analysed,
                               rgb=ctx.rgb, background=ctx.stain_model.background,
                               compartments=comp)
        ves = job.result()
    if not ctx.mpp:  # sizes ran on the assumed pixel size; physical columns are unknown
        fib["perimysium_distance_um"] = np.nan
    counts = {
        "capillary_n": int(len(ves)),
        "capillary_stained_px": int(ves["stained_px"].sum()) if len(ves) else 0,
        "capillary_od_sum": float(ves["dab_od_sum"].sum()) if len(ves) else 0.0,
    }
    cells = pd.DataFrame({
        "x_px": ves["x_px"].to_numpy(float), "y_px": ves["y_px"].to_numpy(float),
        "area_um2": ves["area_px"].to_numpy(float) * (ctx.mpp ** 2 if ctx.mpp else np.nan),
        "dab_mean_od": (ves["dab_od_sum"] / ves["stained_px"].clip(lower=1)).to_numpy(float),
        "kind": np.full(len(ves), "capillary", dtype=object),
    })
    return Measurements(cells=cells, fibers=fib, counts=counts)


def _pct(k: int, n: int) -> float:
    return float(100.0 * k / n) if n > 0 else float("nan")


def summarize(*, cells: pd.DataFrame, fibers: pd.DataFrame, counts: dict, mpp: float | None,
              settings, areas_mm2: dict) -> dict:
    """Slide summary of MHC-I scoring from the whole-slide fiber table and counts.

    Returns
    -------
    dict
        ``fibers_scored, fibers_not_scored, fibers_positive, fibers_positive_pct,
        fibers_grade_0..3`` and ``fibers_grade_0..3_pct`` (of scored fibers), ``mhc_grade_0_5``,
        ``fibers_sarcolemmal / sarcoplasmic / both`` (counts), ``perifascicular_fibers``,
        ``perifascicular_positive_pct``, ``non_perifascicular_positive_pct``, ``mhc_pattern``,
        ``rim_dab_od_mean``, ``interior_dab_od_mean`` (over scored fibers),
        ``positive_capillaries``, ``capillary_dab_od`` and ``control_ok``.
    """
    p = _params(settings)
    out: dict = {}
    if len(fibers) and "mhc_scored" in fibers:
        f = fibers[fibers["mhc_scored"].fillna(False).astype(bool)]
    else:
        f = pd.DataFrame({c: pd.Series(dtype=float) for c in FIBER_COLUMNS})
    n_all = int(len(fibers))
    n = int(len(f))
    pos = f["mhc_positive"].fillna(False).astype(bool).to_numpy() if n else np.zeros(0, bool)
    grade = f["mhc_grade"].fillna(0).astype(int).to_numpy() if n else np.zeros(0, int)
    npos = int(pos.sum())
    pct = _pct(npos, n)
    out["fibers_scored"] = n
    out["fibers_not_scored"] = n_all - n
    out["fibers_positive"] = npos
    out["fibers_positive_pct"] = pct
    for g in range(4):
        k = int((grade == g).sum())
        out[f"fibers_grade_{g}"] = k
        out[f"fibers_grade_{g}_pct"] = _pct(k, n)
    out["mhc_grade_0_5"] = grade_0_5(pct, n)
    pat = f["mhc_pattern"].to_numpy() if n else np.zeros(0, object)
    for name in ("sarcolemmal", "sarcoplasmic", "both"):
        out[f"fibers_{name}"] = int((pat == name).sum())
    peri = f["perifascicular"].fillna(False).astype(bool).to_numpy() if n else np.zeros(0, bool)
    n_peri = int(peri.sum())
    pp, pn = _pct(int(pos[peri].sum()), n_peri), _pct(int(pos[~peri].sum()), n - n_peri)
    out["perifascicular_fibers"] = n_peri
    out["perifascicular_positive_pct"] = pp
    out["non_perifascicular_positive_pct"] = pn
    out["mhc_pattern"] = _slide_pattern(f, pos, peri, pct, pp, pn, mpp, settings, p)
    out["rim_dab_od_mean"] = float(f["rim_dab_od"].mean()) if n else float("nan")
    out["interior_dab_od_mean"] = float(f["interior_dab_od"].mean()) if n else float("nan")
    spx = counts.get("capillary_stained_px", 0)
    cap = float(counts.get("capillary_od_sum", 0.0)) / spx if spx else float("nan")
    out["positive_capillaries"] = int(counts.get("capillary_n", 0))
    out["capillary_dab_od"] = cap
    out["control_ok"] = bool(np.isfinite(cap) and cap >= p.control_min_od)
    return out


def _slide_pattern(f, pos, peri, pct, pp, pn, mpp, settings, p: MhcParams) -> str:
    n = len(f)
    if n == 0 or not np.isfinite(pct) or pct < p.pattern_min_positive_pct:
        return "none"
    n_peri = int(peri.sum())
    if (n_peri >= p.perifascicular_min_fibers and np.isfinite(pp) and np.isfinite(pn)
            and pp >= p.perifascicular_ratio * pn
            and pp >= pn + p.perifascicular_min_difference_pct):
        from scipy.stats import fisher_exact

        a, b = int(pos[peri].sum()), int((~pos[peri]).sum())
        c, d = int(pos[~peri].sum()), int((~pos[~peri]).sum())
        if fisher_exact([[a, b], [c, d]], alternative="greater")[1] < p.perifascicular_max_p:
            return "perifascicular"
    size_mpp = mpp if mpp else getattr(getattr(settings, "tiling", None), "assumed_mpp_unknown",
                                       0.5)
    cell = p.pattern_region_um / size_mpp
    if "x_px" not in f or "y_px" not in f:
        return "diffuse"
    gx = np.floor(f["x_px"].to_numpy(float) / cell).astype(np.int64)
    gy = np.floor(f["y_px"].to_numpy(float) / cell).astype(np.int64)
    key = (gy - gy.min()) * (int(gx.max() - gx.min()) + 1) + (gx - gx.min())
    _, inv = np.unique(key, return_inverse=True)
    tot = np.bincount(inv)
    npos = np.bincount(inv, weights=pos.astype(float))
    ok = tot >= p.pattern_min_region_fibers
    if not ok.any():
        return "diffuse"
    rpct = 100.0 * npos[ok] / tot[ok]
    involved = rpct >= max(p.region_involved_fraction * pct, p.pattern_min_positive_pct)
    return "diffuse" if 100.0 * involved.mean() >= p.diffuse_min_region_pct else "focal"
