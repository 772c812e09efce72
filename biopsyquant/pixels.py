"""Pixel scoring of DAB expression (IL-1α, IL-1β, IL-1Ra): area, intensity tiers, H-score.

Every analysed pixel (tissue minus exclusions, minus empty lumina, see below) is put into one
of four DAB intensity classes by its DAB optical density (log10, relative to the slide's
measured background):

====== ===================================== =====================
class  rule (defaults)                        name
====== ===================================== =====================
0      OD < ``weak_od`` (0.2)                 negative
1      ``weak_od`` ≤ OD < ``moderate_od``     weak (1+)
2      ``moderate_od`` ≤ OD < ``strong_od``   moderate (2+)
3      OD ≥ ``strong_od`` (0.6)               strong (3+)
====== ===================================== =====================

and into a compartment group by the compartment code under it (``fibers`` = code 1,
``interstitium`` = codes 2–5; see docs/architecture.md). From the class counts:

* positive area % = (n1 + n2 + n3) / n · 100,
* weak / moderate / strong area % = n_k / n · 100,
* pixel H-score = 1·weak % + 2·moderate % + 3·strong % (0–300),
* mean DAB OD = Σ OD / n (all scored pixels, negative ones included),

over all scored pixels, over fiber pixels (suffix ``_fibers``) and over interstitial pixels
(suffix ``_interstitium``).

**Empty areas never count.** Glass is not tissue. Holes inside the tissue — vessel lumina,
freezing artefacts, tears — are removed as *lumina*: connected regions of at least
``lumen_min_area_um2`` whose total optical density (sum of the R, G, B OD) stays below
``lumen_max_total_od``. Their pixels are neither positive nor part of the denominator.

**Positive capillaries.** DAB-positive (OD ≥ ``capillary_od``) connected objects in the
endomysium (``capillary_codes``), with their enclosed lumen (≤ ``capillary_max_lumen_um2``)
filled, whose filled area lies between ``capillary_min_area_um2`` and
``capillary_max_area_um2`` (8–80 µm²: 3–10 µm across), whose moment-ellipse axis ratio is at
most ``capillary_max_elongation``, whose mean DAB exceeds that of the tissue around them by
``capillary_min_contrast_od`` and which hold at most ``capillary_max_nucleus_um2`` of
hematoxylin-dense nucleus. Blobs too large at ``capillary_od`` (a capillary merged with stained
endomysium) are re-thresholded ``capillary_level_step_od`` higher until they split. Objects are
counted by the tile that owns their centroid, so tile counts add up. Limitation: a small
DAB-positive inflammatory cell (< 10 µm) in the endomysium whose nucleus is masked by DAB looks
like a capillary and is counted too.

:func:`measure` returns only additive numbers (pixel counts per class and group, OD sums,
owned objects) so whole-slide scoring can sum tiles; :func:`summarize` turns the totals into
percentages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
from numba import njit, prange

from ._kernels import run as _run
from .errors import InputError
from .stains import _od_luts

if TYPE_CHECKING:  # score imports the analysis modules lazily; avoid a cycle at import time
    from .score import ImageContext, Measurements

__all__ = [
    "PixelParams",
    "GROUPS",
    "score_pixels",
    "pixel_summary",
    "lumen_mask",
    "total_od",
    "positive_vessels",
    "measure",
    "summarize",
]

#: compartment groups of the pixel counts (index = group id in the kernels)
GROUPS: tuple[str, ...] = ("fibers", "interstitium", "unassigned")
#: compartment code -> group id (0 outside -> unassigned, 1 fiber, 2-5 interstitium)
_CODE_GROUP = np.array([2, 0, 1, 1, 1, 1] + [2] * 250, dtype=np.uint8)

_JIT = {"fastmath": False, "cache": True, "nogil": True}


@dataclass(frozen=True)
class PixelParams:
    """Settings of DAB pixel scoring (OD thresholds in log10 DAB OD, sizes in µm).

    Parameters
    ----------
    weak_od, moderate_od, strong_od : float
        Lower bounds of the weak (1+), moderate (2+) and strong (3+) DAB classes; a pixel is
        positive from ``weak_od`` on. Must increase.
    drop_lumina : bool
        Remove empty lumina / holes inside the tissue from numerator and denominator.
    lumen_max_total_od : float
        A pixel is "empty" when the sum of its R, G, B optical densities is below this.
    lumen_min_area_um2 : float
        Empty pixels count as a lumen only in connected regions at least this large (µm²), so
        single pale pixels of a negative fiber stay in the denominator.
    lumen_fill_um2 : float
        Islands up to this area (µm²) enclosed by a lumen belong to it (dust, debris, a cell
        floating in a vessel lumen): an empty area never contributes positive pixels.
    capillary_od : float
        DAB OD from which a pixel belongs to a positive capillary / vessel object.
    capillary_min_area_um2, capillary_max_area_um2 : float
        Filled-area range (µm²) of a counted capillary / small vessel.
    capillary_max_lumen_um2 : float
        Enclosed holes up to this area (µm²) are filled (the lumen of a capillary).
    capillary_max_elongation : float
        Largest major/minor axis ratio of a counted object (cross-cut capillaries are round;
        elongated streaks of stained endomysium are not counted).
    capillary_min_contrast_od : float
        The object's mean DAB OD must exceed that of a ring of ~2 µm of non-fiber tissue around
        it by this much, so a diffusely stained patch of interstitium is not taken for a
        capillary.
    capillary_level_step_od : float
        Blobs too large at ``capillary_od`` (capillaries merged with stained interstitium) are
        re-thresholded in steps of this much (up to 1.0 OD); 0 = a single threshold.
    capillary_codes : tuple of int
        Compartment codes where capillaries are searched (default endomysium, 2).
    capillary_nucleus_od, capillary_max_nucleus_um2 : float
        Objects with more than ``capillary_max_nucleus_um2`` of hematoxylin ≥
        ``capillary_nucleus_od`` are positive cells, not capillaries.
    """

    weak_od: float = 0.2
    moderate_od: float = 0.4
    strong_od: float = 0.6
    drop_lumina: bool = True
    lumen_max_total_od: float = 0.03
    lumen_min_area_um2: float = 20.0
    lumen_fill_um2: float = 30.0
    capillary_od: float = 0.2
    capillary_min_area_um2: float = 8.0
    capillary_max_area_um2: float = 80.0
    capillary_max_lumen_um2: float = 120.0
    capillary_max_elongation: float = 3.0
    capillary_min_contrast_od: float = 0.1
    capillary_level_step_od: float = 0.0
    capillary_codes: tuple = (2,)
    capillary_nucleus_od: float = 0.3
    capillary_max_nucleus_um2: float = 18.0

    def __post_init__(self) -> None:
        for name in ("weak_od", "moderate_od", "strong_od", "lumen_max_total_od",
                     "lumen_min_area_um2", "lumen_fill_um2", "capillary_od",
                     "capillary_min_contrast_od", "capillary_level_step_od",
                     "capillary_min_area_um2", "capillary_max_area_um2",
                     "capillary_max_lumen_um2", "capillary_max_elongation",
                     "capillary_nucleus_od", "capillary_max_nucleus_um2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InputError(f"PixelParams.{name} must be a finite number, got {v!r}")
        if not (0 < self.weak_od < self.moderate_od < self.strong_od):
            raise InputError(
                "PixelParams thresholds must satisfy 0 < weak_od < moderate_od < strong_od, got "
                f"{self.weak_od}, {self.moderate_od}, {self.strong_od}")
        if self.capillary_max_area_um2 <= self.capillary_min_area_um2:
            raise InputError("PixelParams.capillary_max_area_um2 must exceed "
                             "capillary_min_area_um2")
        if not all(isinstance(c, int) and 0 <= c <= 255 for c in self.capillary_codes):
            raise InputError("PixelParams.capillary_codes must be compartment codes 0-255, got "
                             f"{self.capillary_codes!r}")
        if self.capillary_max_elongation < 1:
            raise InputError("PixelParams.capillary_max_elongation must be >= 1, got "
                             f"{self.capillary_max_elongation}")

    @property
    def thresholds(self) -> np.ndarray:
        """The three class thresholds as float32 (weak, moderate, strong)."""
        return np.array([self.weak_od, self.moderate_od, self.strong_od], np.float32)


# ------------------------------------------------------------------------------- kernels
#: edge (px) of the occupancy blocks: passes over the whole image note which blocks hold any
#: candidate pixel, and connected components are then traced only inside those blocks
_BLOCK = 16  # fixed: the label kernels address blocks by bit shifts


@njit(**_JIT)
def _count_block(dab, comp, mask, own, use_own, drop, use_drop, code_group, t0, t1, t2, counts,
                 sums, classes, write, cap_lut, cap_t, pos, bmap, nfg, want_pos, bi, bs):
    """One band of ``bs`` rows: class counts / OD sums per group, class image, capillary seeds.

    A pixel is counted when ``mask`` (and ``own``) holds and it is not in ``drop``; it is a
    capillary seed (``pos``) when ``mask`` holds, it is not in ``drop``, its compartment code
    is in ``cap_lut`` and its DAB OD reaches ``cap_t`` (``own`` is not applied: objects are
    kept by the owner of their centroid).
    """
    h, w = dab.shape
    i0 = bi * bs
    i1 = min(i0 + bs, h)
    # four interleaved copies of the 12 bins: consecutive pixels update different counters,
    # so the read-modify-write chains do not serialise (~2x faster)
    cn = np.zeros(64, np.int64)
    cs = np.zeros(64, np.float64)
    nf = 0
    nd = 0
    for i in range(i0, i1):
        for j in range(w):
            m = mask[i, j]
            d = use_drop and drop[i, j] != 0
            v = dab[i, j]
            if want_pos:
                p = 0
                if m and not d and v >= cap_t and cap_lut[comp[i, j]]:
                    p = 1
                    nf += 1
                    bmap[bi, j // bs] = 1
                pos[i, j] = p
            if m and use_own and not own[i, j]:
                m = False
            if not m or d:
                if m:
                    nd += 1
                if write:
                    classes[i, j] = 0
                continue
            c = np.int64(v >= t0) + np.int64(v >= t1) + np.int64(v >= t2)
            k = code_group[comp[i, j]] * 4 + c + (j & 3) * 16
            cn[k] += 1
            cs[k] += v
            if write:
                classes[i, j] = c
    for k in range(12):
        counts[bi, k] = cn[k] + cn[k + 16] + cn[k + 32] + cn[k + 48]
        sums[bi, k] = cs[k] + cs[k + 16] + cs[k + 32] + cs[k + 48]
    counts[bi, 12] = nd
    nfg[bi] = nf


@njit(parallel=True, **_JIT)
def _count_par(dab, comp, mask, own, use_own, drop, use_drop, code_group, t0, t1, t2, counts,
               sums, classes, write, cap_lut, cap_t, pos, bmap, nfg, want_pos, bs):
    for bi in prange(counts.shape[0]):
        _count_block(dab, comp, mask, own, use_own, drop, use_drop, code_group, t0, t1, t2,
                     counts, sums, classes, write, cap_lut, cap_t, pos, bmap, nfg, want_pos, bi,
                     bs)


@njit(**_JIT)
def _count_ser(dab, comp, mask, own, use_own, drop, use_drop, code_group, t0, t1, t2, counts,
               sums, classes, write, cap_lut, cap_t, pos, bmap, nfg, want_pos, bs):
    for bi in range(counts.shape[0]):
        _count_block(dab, comp, mask, own, use_own, drop, use_drop, code_group, t0, t1, t2,
                     counts, sums, classes, write, cap_lut, cap_t, pos, bmap, nfg, want_pos, bi,
                     bs)


@njit(**_JIT)
def _pale_row(rgb, lut, limit, mask, out, i):
    for j in range(rgb.shape[1]):
        if mask[i, j]:
            t = lut[0, rgb[i, j, 0]] + lut[1, rgb[i, j, 1]] + lut[2, rgb[i, j, 2]]
            out[i, j] = 1 if t < limit else 0
        else:
            out[i, j] = 0


@njit(parallel=True, **_JIT)
def _pale_par(rgb, lut, limit, mask, out):
    for i in prange(rgb.shape[0]):
        _pale_row(rgb, lut, limit, mask, out, i)


@njit(**_JIT)
def _pale_ser(rgb, lut, limit, mask, out):
    for i in range(rgb.shape[0]):
        _pale_row(rgb, lut, limit, mask, out, i)


@njit(**_JIT)
def _pale_block(rgb, lut, limit, mask, out, bmap, nfg, bi, bs):
    h, w = mask.shape
    nf = 0
    for i in range(bi * bs, min(bi * bs + bs, h)):
        for j in range(w):
            v = 0
            if mask[i, j]:
                t = lut[0, rgb[i, j, 0]] + lut[1, rgb[i, j, 1]] + lut[2, rgb[i, j, 2]]
                if t < limit:
                    v = 1
                    nf += 1
                    bmap[bi, j // bs] = 1
            out[i, j] = v
    nfg[bi] = nf


@njit(parallel=True, **_JIT)
def _pale_blocks_par(rgb, lut, limit, mask, out, bmap, nfg, bs):
    for bi in prange(bmap.shape[0]):
        _pale_block(rgb, lut, limit, mask, out, bmap, nfg, bi, bs)


@njit(**_JIT)
def _pale_blocks_ser(rgb, lut, limit, mask, out, bmap, nfg, bs):
    for bi in range(bmap.shape[0]):
        _pale_block(rgb, lut, limit, mask, out, bmap, nfg, bi, bs)


@njit(**_JIT)
def _seed_block(dab, t, region, comp, lut, use_comp, drop, use_drop, active, use_active, pos,
                bmap, nfg, bi, bs):
    h, w = dab.shape
    nf = 0
    for i in range(bi * bs, min(bi * bs + bs, h)):
        for j in range(w):
            p = 0
            if (region[i, j] and dab[i, j] >= t and (not use_comp or lut[comp[i, j]])
                    and (not use_drop or not drop[i, j])
                    and (not use_active or active[i, j])):
                p = 1
                nf += 1
                bmap[bi, j // bs] = 1
            pos[i, j] = p
    nfg[bi] = nf


@njit(parallel=True, **_JIT)
def _seed_par(dab, t, region, comp, lut, use_comp, drop, use_drop, active, use_active, pos,
              bmap, nfg, bs):
    for bi in prange(bmap.shape[0]):
        _seed_block(dab, t, region, comp, lut, use_comp, drop, use_drop, active, use_active, pos,
                    bmap, nfg, bi, bs)


@njit(**_JIT)
def _seed_ser(dab, t, region, comp, lut, use_comp, drop, use_drop, active, use_active, pos,
              bmap, nfg, bs):
    for bi in range(bmap.shape[0]):
        _seed_block(dab, t, region, comp, lut, use_comp, drop, use_drop, active, use_active, pos,
                    bmap, nfg, bi, bs)


@njit(**_JIT)
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(**_JIT)
def _lab(slot, blab, i, j):
    """Label at pixel (i, j) of a block-stored label image (0 in blocks without labels)."""
    s = slot[i >> 4, j >> 4]
    if s < 0:
        return 0
    return blab[s, i & 15, j & 15]


@njit(**_JIT)
def _label_sparse(fg, bmap, n_fg):
    """8-connected components of ``fg`` (uint8) visiting only the flagged 16-px blocks of ``bmap``.

    Labels are stored per flagged block (``slot[bi, bj]`` = index into ``blab`` or -1), so
    memory and time grow with the occupied blocks, not with the image; read them with
    :func:`_lab`. Labels 1..n are numbered in raster order of each component's first pixel.
    Returns slot, blab, n and per-label area, x0, y0, x1, y1 (inclusive bounding box).
    """
    h, w = fg.shape
    hb, wb = bmap.shape
    slot = np.full((hb, wb), -1, np.int32)
    nblk = 0
    for bi in range(hb):
        for bj in range(wb):
            if bmap[bi, bj]:
                slot[bi, bj] = nblk
                nblk += 1
    bis = np.empty(nblk, np.int64)
    bjs = np.empty(nblk, np.int64)
    for bi in range(hb):
        for bj in range(wb):
            s = slot[bi, bj]
            if s >= 0:
                bis[s] = bi
                bjs[s] = bj
    blab = np.zeros((nblk, 16, 16), np.int32)
    parent = np.empty(n_fg + 1, np.int32)
    parent[0] = 0
    nxt = 0
    for s in range(nblk):
        bi = bis[s]
        bj = bjs[s]
        for i in range(bi * 16, min(bi * 16 + 16, h)):
            for j in range(bj * 16, min(bj * 16 + 16, w)):
                if not fg[i, j]:
                    continue
                nxt += 1
                parent[nxt] = nxt
                blab[s, i & 15, j & 15] = nxt
                for ii in range(max(i - 1, 0), min(i + 2, h)):
                    for jj in range(max(j - 1, 0), min(j + 2, w)):
                        q = _lab(slot, blab, ii, jj)
                        if q <= 0 or q == nxt:
                            continue
                        ra = _find(parent, nxt)
                        rb = _find(parent, q)
                        if ra < rb:
                            parent[rb] = ra
                        elif rb < ra:
                            parent[ra] = rb
    big = np.int64(h) * np.int64(w)
    first = np.full(nxt + 1, big, np.int64)
    for s in range(nblk):
        bi = bis[s]
        bj = bjs[s]
        for a in range(16):
            for b in range(16):
                q = blab[s, a, b]
                if q > 0:
                    r = _find(parent, q)
                    k = np.int64(bi * 16 + a) * w + bj * 16 + b
                    if k < first[r]:
                        first[r] = k
    nroot = 0
    for r in range(1, nxt + 1):
        if parent[r] == r:
            nroot += 1
    roots = np.empty(nroot, np.int64)
    keys = np.empty(nroot, np.int64)
    k = 0
    for r in range(1, nxt + 1):
        if parent[r] == r:
            roots[k] = r
            keys[k] = first[r]
            k += 1
    order = np.argsort(keys)
    newid = np.zeros(nxt + 1, np.int32)
    for k in range(nroot):
        newid[roots[order[k]]] = k + 1
    area = np.zeros(nroot + 1, np.int64)
    x0 = np.full(nroot + 1, w, np.int64)
    y0 = np.full(nroot + 1, h, np.int64)
    x1 = np.full(nroot + 1, -1, np.int64)
    y1 = np.full(nroot + 1, -1, np.int64)
    for s in range(nblk):
        bi = bis[s]
        bj = bjs[s]
        for a in range(16):
            for b in range(16):
                q = blab[s, a, b]
                if q > 0:
                    t = newid[_find(parent, q)]
                    blab[s, a, b] = t
                    i = bi * 16 + a
                    j = bj * 16 + b
                    area[t] += 1
                    if j < x0[t]:
                        x0[t] = j
                    if j > x1[t]:
                        x1[t] = j
                    if i < y0[t]:
                        y0[t] = i
                    if i > y1[t]:
                        y1[t] = i
    return slot, blab, nroot, area, x0, y0, x1, y1


@njit(**_JIT)
def _outside_fill(wall, stack):
    """Mark (2) the non-wall cells of ``wall`` 4-connected to its border frame (cell 0, 0)."""
    hh, ww = wall.shape
    top = 0
    stack[0] = 0
    wall[0, 0] = 2
    top = 1
    while top > 0:
        top -= 1
        k = stack[top]
        y = k // ww
        x = k - y * ww
        if y > 0 and wall[y - 1, x] == 0:
            wall[y - 1, x] = 2
            stack[top] = k - ww
            top += 1
        if y < hh - 1 and wall[y + 1, x] == 0:
            wall[y + 1, x] = 2
            stack[top] = k + ww
            top += 1
        if x > 0 and wall[y, x - 1] == 0:
            wall[y, x - 1] = 2
            stack[top] = k - 1
            top += 1
        if x < ww - 1 and wall[y, x + 1] == 0:
            wall[y, x + 1] = 2
            stack[top] = k + 1
            top += 1


@njit(**_JIT)
def _lumen_fill(slot, blab, n, area, x0, y0, x1, y1, min_px, fill_px, do_fill, lumen):
    """Lumen = components with area >= min_px plus the enclosed islands of <= fill_px."""
    for c in range(1, n + 1):
        if area[c] < min_px:
            continue
        for i in range(y0[c], y1[c] + 1):
            for j in range(x0[c], x1[c] + 1):
                if _lab(slot, blab, i, j) == c:
                    lumen[i, j] = 1
        if not do_fill:
            continue
        hh = y1[c] - y0[c] + 3
        ww = x1[c] - x0[c] + 3
        wall = np.zeros((hh, ww), np.uint8)
        for i in range(y0[c], y1[c] + 1):
            for j in range(x0[c], x1[c] + 1):
                if _lab(slot, blab, i, j) == c:
                    wall[i - y0[c] + 1, j - x0[c] + 1] = 1
        stack = np.empty(hh * ww, np.int64)
        _outside_fill(wall, stack)
        # each enclosed island (4-connected): add it when small enough
        for yy in range(1, hh - 1):
            for xx in range(1, ww - 1):
                if wall[yy, xx] != 0:
                    continue
                wall[yy, xx] = 3
                stack[0] = yy * ww + xx
                top = 1
                m = 0
                while top > 0:  # collect the island's cells at the bottom of the stack
                    top -= 1
                    k = stack[top]
                    stack[hh * ww - 1 - m] = k
                    m += 1
                    y = k // ww
                    x = k - y * ww
                    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                        if wall[y + dy, x + dx] == 0:
                            wall[y + dy, x + dx] = 3
                            stack[top] = k + dy * ww + dx
                            top += 1
                if m <= fill_px:
                    for q in range(m):
                        k = stack[hh * ww - 1 - q]
                        y = k // ww
                        x = k - y * ww
                        lumen[y0[c] + y - 1, x0[c] + x - 1] = 1


@njit(**_JIT)
def _vessel_objects(slot, blab, n, area, x0, y0, x1, y1, dab, pos, region, comp, lut, use_comp,
                    drop, use_drop, hema, use_nuc, nucleus_od, max_nucleus_px, px_um2, min_px, max_px,
                    max_lumen_um2, max_elongation, min_contrast_od, ring_k, big):
    """Measure every small component in its padded bounding box; rows of valid objects.

    Per component (see :func:`positive_vessels`): enclosed holes (background not 4-connected
    to the box frame) filled when their area is at most ``max_lumen_um2``, filled-area range,
    moment-ellipse elongation, nucleus area, contrast against a ring of ``ring_k`` around the
    filled object (region pixels that are not seeds). Rows: x, y (centroid), filled area,
    stained px, DAB OD sum, elongation. ``big[c]`` is set for components too large at this
    level (before or after filling).
    """
    h, w = dab.shape
    pad = ring_k.shape[0] // 2
    out = np.empty((n, 6), np.float64)
    m_out = 0
    for c in range(1, n + 1):
        if area[c] > max_px:
            big[c] = 1
            continue
        bw = x1[c] - x0[c] + 1
        bh = y1[c] - y0[c] + 1
        if bw * bh < min_px:
            continue
        cx0 = max(x0[c] - pad, 0)
        cy0 = max(y0[c] - pad, 0)
        cx1 = min(x1[c] + 1 + pad, w)
        cy1 = min(y1[c] + 1 + pad, h)
        ch = cy1 - cy0
        cw = cx1 - cx0
        # canvas with a 1-px frame: 1 = object, 2 = outside (reached from the frame), 0 = hole
        wall = np.zeros((ch + 2, cw + 2), np.uint8)
        for i in range(y0[c], y1[c] + 1):
            for j in range(x0[c], x1[c] + 1):
                if _lab(slot, blab, i, j) == c:
                    wall[i - cy0 + 1, j - cx0 + 1] = 1
        stack = np.empty((ch + 2) * (cw + 2), np.int64)
        _outside_fill(wall, stack)
        nh = 0
        for i in range(1, ch + 1):
            for j in range(1, cw + 1):
                if wall[i, j] == 0:
                    nh += 1
        fill_holes = nh * px_um2 <= max_lumen_um2
        fa = area[c] + (nh if fill_holes else 0)
        if fa > max_px:
            big[c] = 1
            continue
        if fa < min_px:
            continue
        # moments of the filled object (crop coordinates, like cv2.moments)
        s0 = 0.0
        sx = 0.0
        sy = 0.0
        for i in range(1, ch + 1):
            for j in range(1, cw + 1):
                v = wall[i, j]
                if v == 1 or (v == 0 and fill_holes):
                    s0 += 1.0
                    sx += j - 1
                    sy += i - 1
        mx = sx / s0
        my = sy / s0
        vxx = 0.0
        vyy = 0.0
        vxy = 0.0
        for i in range(1, ch + 1):
            for j in range(1, cw + 1):
                v = wall[i, j]
                if v == 1 or (v == 0 and fill_holes):
                    dx = j - 1 - mx
                    dy = i - 1 - my
                    vxx += dx * dx
                    vyy += dy * dy
                    vxy += dx * dy
        vxx = vxx / s0 + 1.0 / 12.0
        vyy = vyy / s0 + 1.0 / 12.0
        vxy = vxy / s0
        tr = vxx + vyy
        det = vxx * vyy - vxy * vxy
        disc = math.sqrt(max(tr * tr / 4.0 - det, 0.0))
        elong = math.sqrt((tr / 2.0 + disc) / max(tr / 2.0 - disc, 1e-12))
        if elong > max_elongation:
            continue
        if use_nuc:
            nn = 0
            for i in range(1, ch + 1):
                for j in range(1, cw + 1):
                    v = wall[i, j]
                    if ((v == 1 or (v == 0 and fill_holes))
                            and hema[cy0 + i - 1, cx0 + j - 1] >= nucleus_od):
                        nn += 1
            if nn > max_nucleus_px:
                continue
        stained = 0
        odsum = 0.0
        for i in range(1, ch + 1):
            for j in range(1, cw + 1):
                if wall[i, j] == 1:
                    stained += 1
                    odsum += dab[cy0 + i - 1, cx0 + j - 1]
        if min_contrast_od > 0:
            # ring: the filled object dilated by ring_k, minus the object, seeds and
            # non-region pixels
            ring = np.zeros((ch, cw), np.uint8)
            kh = ring_k.shape[0]
            for i in range(ch):
                for j in range(cw):
                    v = wall[i + 1, j + 1]
                    if not (v == 1 or (v == 0 and fill_holes)):
                        continue
                    for a in range(kh):
                        ii = i + a - pad
                        if ii < 0 or ii >= ch:
                            continue
                        for b in range(ring_k.shape[1]):
                            jj = j + b - pad
                            if jj < 0 or jj >= cw or not ring_k[a, b]:
                                continue
                            ring[ii, jj] = 1
            rs = 0.0
            rn = 0
            for i in range(ch):
                for j in range(cw):
                    if not ring[i, j]:
                        continue
                    v = wall[i + 1, j + 1]
                    if v == 1 or (v == 0 and fill_holes):
                        continue
                    yy = cy0 + i
                    xx = cx0 + j
                    if pos[yy, xx] or not region[yy, xx]:
                        continue
                    if use_comp and not lut[comp[yy, xx]]:
                        continue
                    if use_drop and drop[yy, xx]:
                        continue
                    rs += dab[yy, xx]
                    rn += 1
            rmean = rs / rn if rn > 0 else 0.0
            if odsum / max(stained, 1) - rmean < min_contrast_od:
                continue
        out[m_out, 0] = cx0 + sx / s0
        out[m_out, 1] = cy0 + sy / s0
        out[m_out, 2] = fa
        out[m_out, 3] = stained
        out[m_out, 4] = odsum
        out[m_out, 5] = elong
        m_out += 1
    return out[:m_out]


@njit(**_JIT)
def _mark_big(slot, blab, n, x0, y0, x1, y1, big, active):
    for c in range(1, n + 1):
        if not big[c]:
            continue
        for i in range(y0[c], y1[c] + 1):
            for j in range(x0[c], x1[c] + 1):
                if _lab(slot, blab, i, j) == c:
                    active[i, j] = 1


# ------------------------------------------------------------------------------- helpers
def _check_2d(arr, shape, name: str, dtype=None) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != tuple(shape):
        raise InputError(f"`{name}` has shape {a.shape}, expected {tuple(shape)}")
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return np.ascontiguousarray(a)


def _od_lut(background) -> np.ndarray:
    """(3, 256) float32 per-channel OD lookup tables (the stain module's, as float32)."""
    return _od_luts(background).astype(np.float32)


def total_od(rgb: np.ndarray, background=(255.0, 255.0, 255.0)) -> np.ndarray:
    """Sum of the R, G, B optical densities (log10, relative to ``background``).

    Parameters
    ----------
    rgb : ndarray of uint8, (H, W, 3)
    background : sequence of 3 float
        Glass intensity per channel (0–255).

    Returns
    -------
    ndarray of float32, (H, W)
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"`rgb` must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    lut = _od_lut(background)
    out = np.take(lut[0], rgb[..., 0])
    out += np.take(lut[1], rgb[..., 1])
    out += np.take(lut[2], rgb[..., 2])
    return out


def lumen_mask(rgb: np.ndarray, *, background, mpp: float, within: np.ndarray,
               max_total_od: float = 0.03, min_area_um2: float = 20.0,
               fill_um2: float = 30.0) -> np.ndarray:
    """Empty lumina / holes inside the tissue.

    Parameters
    ----------
    rgb : ndarray of uint8, (H, W, 3)
    background : sequence of 3 float
        Glass intensity per channel (0–255), as in the stain model.
    mpp : float
        Pixel size (µm/px) used to convert ``min_area_um2``.
    within : ndarray of bool, (H, W)
        Where to look (the analysed tissue).
    max_total_od : float
        Pixels whose R+G+B optical density is below this are empty.
    min_area_um2 : float
        Smallest connected empty region (8-connected) that counts as a lumen (µm²).
    fill_um2 : float
        Islands up to this area (µm², 4-connected) enclosed by a lumen are added to it.

    Returns
    -------
    ndarray of bool, (H, W)
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"`rgb` must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    within = _check_2d(within, rgb.shape[:2], "within", np.bool_)
    return _lumen_u8(rgb, background=background, mpp=mpp, within=within,
                     max_total_od=max_total_od, min_area_um2=min_area_um2,
                     fill_um2=fill_um2).view(bool)


def _blocks(shape) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed block-occupancy map and per-band pixel counts for an image of ``shape``."""
    hb = (shape[0] + _BLOCK - 1) // _BLOCK
    wb = (shape[1] + _BLOCK - 1) // _BLOCK
    return np.zeros((hb, wb), np.uint8), np.zeros(hb, np.int64)


def _components(fg: np.ndarray, bmap: np.ndarray, nfg: np.ndarray):
    """8-connected components of the uint8 mask ``fg`` traced inside the flagged blocks only.

    Returns the block-stored labels (slot, blab) read with :func:`_lab` (labels in raster order
    of first pixels), n and (area, x0, y0, x1, y1) per label.
    """
    slot, blab, n, area, x0, y0, x1, y1 = _label_sparse(fg, bmap, int(nfg.sum()))
    return (slot, blab), int(n), (area, x0, y0, x1, y1)


def _lumen_u8(rgb, *, background, mpp, within, max_total_od, min_area_um2,
              fill_um2) -> np.ndarray:
    """:func:`lumen_mask` on validated inputs, as a uint8 image (1 = lumen)."""
    shape = rgb.shape[:2]
    pale = np.empty(shape, np.uint8)
    bmap, nfg = _blocks(shape)
    _run(_pale_blocks_par, _pale_blocks_ser, pale.size, rgb, _od_lut(background),
         np.float32(max_total_od), within, pale, bmap, nfg, _BLOCK)
    lumen = np.zeros(shape, np.uint8)
    if not nfg.any():
        return lumen
    lab, n, (area, x0, y0, x1, y1) = _components(pale, bmap, nfg)
    del pale
    _lumen_fill(*lab, n, area, x0, y0, x1, y1, float(min_area_um2 / (mpp * mpp)),
                float(fill_um2 / (mpp * mpp)), bool(fill_um2 > 0), lumen)
    return lumen


def code_mask(compartments: np.ndarray, codes) -> np.ndarray:
    """Bool image: compartment code in ``codes`` (a 256-entry lookup, faster than np.isin)."""
    lut = np.zeros(256, bool)
    lut[np.asarray(codes, np.int64)] = True
    return lut[np.asarray(compartments, np.uint8)]


def score_pixels(dab_od: np.ndarray, *, analysed: np.ndarray, compartments: np.ndarray | None,
                 params: PixelParams, drop: np.ndarray | None = None,
                 return_classes: bool = False) -> tuple[dict, np.ndarray | None]:
    """Additive DAB class counts and OD sums per compartment group.

    Parameters
    ----------
    dab_od : ndarray of float32, (H, W)
        DAB OD (log10, background-relative).
    analysed : ndarray of bool, (H, W)
        Pixels to score (tissue minus exclusions, restricted to the pixels a tile owns).
    compartments : ndarray of uint8, (H, W), or None
        Compartment codes; None puts every pixel in the interstitium group.
    params : PixelParams
    drop : ndarray of bool, (H, W), optional
        Pixels removed from numerator and denominator (lumina).
    return_classes : bool
        Also return the uint8 class image (0–3; 0 outside ``analysed`` and in ``drop``).

    Returns
    -------
    counts : dict
        ``pix_n_<group>_c<k>`` (int, pixels of class k in group) and ``pix_od_<group>_c<k>``
        (float, sum of DAB OD) for groups :data:`GROUPS` and classes 0–3.
    classes : ndarray of uint8 (H, W) or None
    """
    dab = _check_2d(dab_od, np.shape(dab_od), "dab_od", np.float32)
    if dab.ndim != 2:
        raise InputError(f"`dab_od` must be a 2-D image, got shape {dab.shape}")
    shape = dab.shape
    mask = _check_2d(analysed, shape, "analysed", np.bool_)
    if compartments is None:
        comp = np.full(shape, 2, np.uint8)
    else:
        comp = _check_2d(compartments, shape, "compartments", np.uint8)
    dr = None if drop is None else _check_2d(drop, shape, "drop", np.bool_)
    out, classes, _ = _count(dab, comp, mask, None, dr, params, return_classes)
    del out["_dropped_px"]
    return out, classes


_NO_U8 = np.zeros((1, 1), np.uint8)
_NO_BOOL = np.zeros((1, 1), np.bool_)
_NO_F32 = np.zeros((1, 1), np.float32)
_NO_LUT = np.zeros(256, np.bool_)


def _count(dab, comp, mask, own, drop, params: PixelParams, return_classes: bool,
           cap_lut=None, cap_t: float = np.inf):
    """Fused counting pass (validated, contiguous inputs; ``own``/``drop`` may be None).

    Returns the counts dict (plus ``_dropped_px``: pixels of ``mask & own`` in ``drop``), the
    class image or None, and, when ``cap_lut`` is given, (seeds, block map, band counts) of the
    capillary seeds ``mask & ~drop & cap_lut[comp] & dab >= cap_t``.
    """
    shape = dab.shape
    bmap, nfg = _blocks(shape)
    nb = bmap.shape[0]
    counts = np.zeros((nb, 13), np.int64)
    sums = np.zeros((nb, 12), np.float64)
    classes = np.empty(shape if return_classes else (1, 1), np.uint8)
    want_pos = cap_lut is not None
    pos = np.empty(shape, np.uint8) if want_pos else _NO_U8
    t0, t1, t2 = (np.float32(x) for x in params.thresholds)
    comp_ = comp if comp is not None else np.full(shape, 2, np.uint8)
    _run(_count_par, _count_ser, dab.size, dab, comp_, mask,
         own if own is not None else _NO_BOOL, own is not None,
         drop.view(np.uint8) if drop is not None else _NO_U8, drop is not None, _CODE_GROUP,
         t0, t1, t2, counts, sums, classes, bool(return_classes),
         cap_lut if want_pos else _NO_LUT, np.float32(cap_t), pos, bmap, nfg, want_pos, _BLOCK)
    n = counts.sum(axis=0)
    s = sums.sum(axis=0)
    out: dict = {}
    for g, gname in enumerate(GROUPS):
        for c in range(4):
            out[f"pix_n_{gname}_c{c}"] = int(n[g * 4 + c])
            out[f"pix_od_{gname}_c{c}"] = float(s[g * 4 + c])
    out["_dropped_px"] = int(n[12])
    return out, (classes if return_classes else None), ((pos, bmap, nfg) if want_pos else None)


def pixel_summary(counts: dict, *, groups=GROUPS) -> dict:
    """Percentages, H-score and mean OD from additive counts (see module docstring).

    Parameters
    ----------
    counts : dict
        Totals of :func:`score_pixels` (summed over tiles).
    groups : sequence of str
        Groups to pool for the unsuffixed numbers.

    Returns
    -------
    dict
        ``positive_area_pct, weak_area_pct, moderate_area_pct, strong_area_pct, h_score,
        dab_mean_od, scored_px`` and the same with ``_fibers`` / ``_interstitium``
        (NaN where no pixel was scored).
    """
    out: dict = {}

    def block(names, suffix):
        n = np.array([sum(int(counts.get(f"pix_n_{g}_c{c}", 0)) for g in names)
                      for c in range(4)], float)
        s = sum(float(counts.get(f"pix_od_{g}_c{c}", 0.0)) for g in names for c in range(4))
        tot = n.sum()
        pct = n / tot * 100.0 if tot > 0 else np.full(4, np.nan)
        out[f"positive_area_pct{suffix}"] = float(pct[1:].sum())
        out[f"weak_area_pct{suffix}"] = float(pct[1])
        out[f"moderate_area_pct{suffix}"] = float(pct[2])
        out[f"strong_area_pct{suffix}"] = float(pct[3])
        out[f"h_score{suffix}"] = float(pct[1] + 2 * pct[2] + 3 * pct[3])
        out[f"dab_mean_od{suffix}"] = float(s / tot) if tot > 0 else float("nan")
        out[f"scored_px{suffix}"] = int(tot)

    block(tuple(groups), "")
    block(("fibers",), "_fibers")
    block(("interstitium",), "_interstitium")
    return out


def positive_vessels(dab_od: np.ndarray, *, region: np.ndarray, mpp: float,
                     own: np.ndarray | None = None, threshold_od: float = 0.2,
                     min_area_um2: float = 8.0, max_area_um2: float = 120.0,
                     max_lumen_um2: float = 120.0, max_elongation: float = 3.0,
                     min_contrast_od: float = 0.1, level_step_od: float = 0.0,
                     max_level_od: float = 1.0, hema_od: np.ndarray | None = None,
                     nucleus_od: float = 0.3, max_nucleus_um2: float = 18.0) -> pd.DataFrame:
    """DAB-positive capillaries / small vessels: round positive objects in ``region``.

    Parameters
    ----------
    dab_od : ndarray of float32, (H, W)
        DAB OD (log10).
    region : ndarray of bool, (H, W)
        Where objects may lie (analysed non-fiber tissue).
    mpp : float
        Pixel size (µm/px) for the area limits.
    own : ndarray of bool, (H, W), optional
        Pixels this tile owns; objects whose centroid is not owned are dropped.
    threshold_od : float
        DAB OD of an object pixel.
    min_area_um2, max_area_um2 : float
        Filled-area range of a counted object (µm²).
    max_lumen_um2 : float
        Enclosed holes up to this area are filled before measuring.
    max_elongation : float
        Largest major/minor axis ratio of the moment ellipse.
    min_contrast_od : float
        Smallest difference between the object's mean DAB OD and that of a ~2 µm ring of
        ``region`` pixels around it (0 = no contrast test).
    level_step_od, max_level_od : float
        Blobs larger than ``max_area_um2`` at ``threshold_od`` (a capillary merged with stained
        interstitium) are thresholded again ``level_step_od`` higher, up to ``max_level_od``;
        an object is taken at the lowest level where it is valid (0 step = one level only).
    hema_od : ndarray of float32, (H, W), optional
        Hematoxylin OD. With it, objects holding more than ``max_nucleus_um2`` of nucleus
        (hematoxylin ≥ ``nucleus_od``) are DAB-positive cells (macrophages, inflammatory
        cells), not capillaries: a capillary cross-section shows at most one flat endothelial
        nucleus.
    nucleus_od, max_nucleus_um2 : float
        See ``hema_od``.

    Returns
    -------
    DataFrame
        One row per object: ``x_px, y_px`` (centroid), ``area_px`` (filled), ``stained_px``,
        ``dab_od_sum`` (over the stained pixels), ``elongation``.
    """
    dab = np.ascontiguousarray(np.asarray(dab_od, np.float32))
    if dab.ndim != 2:
        raise InputError(f"`dab_od` must be a 2-D image, got shape {dab.shape}")
    region = _check_2d(region, dab.shape, "region", np.bool_)
    if own is not None:
        own = _check_2d(own, dab.shape, "own", np.bool_)
    if hema_od is not None:
        hema_od = _check_2d(hema_od, dab.shape, "hema_od", np.float32)
    return _vessels(dab, region=region, mpp=mpp, own=own, threshold_od=threshold_od,
                    min_area_um2=min_area_um2, max_area_um2=max_area_um2,
                    max_lumen_um2=max_lumen_um2, max_elongation=max_elongation,
                    min_contrast_od=min_contrast_od, level_step_od=level_step_od,
                    max_level_od=max_level_od, hema_od=hema_od, nucleus_od=nucleus_od,
                    max_nucleus_um2=max_nucleus_um2)


_VESSEL_COLUMNS = ["x_px", "y_px", "area_px", "stained_px", "dab_od_sum", "elongation"]


def _vessels(dab, *, region, mpp, own=None, comp=None, codes_lut=None, drop=None, seeds=None,
             threshold_od, min_area_um2, max_area_um2, max_lumen_um2, max_elongation,
             min_contrast_od, level_step_od, max_level_od=1.0, hema_od=None, nucleus_od,
             max_nucleus_um2, parallel: bool | None = None) -> pd.DataFrame:
    """:func:`positive_vessels` on validated contiguous inputs.

    The search region is ``region & codes_lut[comp] & ~drop`` (``comp``/``drop`` optional), so
    callers need not build it as an image; ``seeds`` = (mask, block map, band counts) of the
    first level's object pixels when a fused pass already found them; ``parallel=False`` keeps
    the seed pass on the calling thread (see :func:`biopsyquant._kernels.run`).

    Objects are traced as connected components inside the blocks that hold object pixels only,
    and each small component is measured in its own padded bounding box (enclosed lumen filled,
    moments, nucleus area, contrast ring) by one compiled loop.
    """
    shape = dab.shape
    px_um2 = mpp * mpp
    ring_px = max(1, int(round(2.0 / mpp)))
    ring_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_px + 1, 2 * ring_px + 1))
    use_comp = comp is not None and codes_lut is not None
    comp_ = comp if use_comp else _NO_U8
    lut = codes_lut if use_comp else _NO_LUT
    use_drop = drop is not None
    drop_ = drop.view(np.uint8) if use_drop else _NO_U8
    use_nuc = hema_od is not None
    hema = hema_od if use_nuc else _NO_F32
    found = []
    t = float(threshold_od)
    active = None
    while t <= max_level_od + 1e-9:
        if seeds is not None and active is None:
            pos, bmap, nfg = seeds
        else:
            pos = np.empty(shape, np.uint8)
            bmap, nfg = _blocks(shape)
            _run(_seed_par, _seed_ser, dab.size, dab, np.float32(t), region, comp_, lut,
                 use_comp, drop_, use_drop, active if active is not None else _NO_U8,
                 active is not None, pos, bmap, nfg, _BLOCK, parallel=parallel)
        if not nfg.any():
            break
        lab, n, (area, x0, y0, x1, y1) = _components(pos, bmap, nfg)
        big = np.zeros(n + 1, np.uint8)
        rows = _vessel_objects(
            *lab, n, area, x0, y0, x1, y1, dab, pos, region, comp_, lut, use_comp, drop_,
            use_drop, hema, use_nuc, np.float32(nucleus_od), float(max_nucleus_um2 / px_um2),
            float(px_um2), float(min_area_um2 / px_um2), float(max_area_um2 / px_um2),
            float(max_lumen_um2), float(max_elongation), float(min_contrast_od), ring_k, big)
        if len(rows):
            found.append(rows)
        if level_step_od <= 0 or not big.any():
            break
        # only blobs too large at this level are split at the next
        active = np.zeros(shape, np.uint8)
        _mark_big(*lab, n, x0, y0, x1, y1, big, active)
        del lab, pos
        t += level_step_od
    if not found:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in _VESSEL_COLUMNS})
    out = pd.DataFrame(np.concatenate(found), columns=_VESSEL_COLUMNS)
    for c in ("area_px", "stained_px"):
        out[c] = out[c].astype(np.int64)
    if own is not None and len(out):
        xi = np.clip(np.round(out["x_px"].to_numpy()).astype(int), 0, shape[1] - 1)
        yi = np.clip(np.round(out["y_px"].to_numpy()).astype(int), 0, shape[0] - 1)
        out = out[own[yi, xi]].reset_index(drop=True)
    return out


# ------------------------------------------------------------------------------- contract
def _params(settings) -> PixelParams:
    p = getattr(settings, "sections", {}).get("pixels") if settings is not None else None
    return p if isinstance(p, PixelParams) else PixelParams()


def measure(ctx: ImageContext) -> Measurements:
    """Pixel-scoring half of the engine contract for one image or tile.

    Parameters
    ----------
    ctx : biopsyquant.score.ImageContext

    Returns
    -------
    Measurements
        ``counts``: :func:`score_pixels` counts over ``ctx.analysed_own`` (lumina removed),
        ``lumen_px``, ``positive_capillaries``, ``capillary_stained_px``,
        ``capillary_od_sum``; ``labels["dab_class"]``: uint8 class image (0–3);
        ``cells``: the positive capillaries (``x_px, y_px, area_um2, dab_mean_od,
        kind="capillary"``).
    """
    from .score import Measurements

    p = _params(ctx.settings)
    mpp = float(ctx.size_mpp)
    dab = _check_2d(ctx.dab_od, np.shape(ctx.dab_od), "dab_od", np.float32)
    shape = dab.shape
    analysed = _check_2d(ctx.analysed, shape, "analysed", np.bool_)
    own = None if ctx.own is None else _check_2d(ctx.own, shape, "own", np.bool_)
    comp = _check_2d(ctx.compartments, shape, "compartments", np.uint8)
    lumen = None
    if p.drop_lumina:
        rgb = np.ascontiguousarray(ctx.rgb)
        if rgb.shape != shape + (3,) or rgb.dtype != np.uint8:
            raise InputError(f"`rgb` must be uint8 {shape + (3,)}, got {rgb.dtype} {rgb.shape}")
        lumen = _lumen_u8(rgb, background=ctx.stain_model.background, mpp=mpp,
                          within=analysed, max_total_od=p.lumen_max_total_od,
                          min_area_um2=p.lumen_min_area_um2, fill_um2=p.lumen_fill_um2)
    cap_lut = np.zeros(256, np.bool_)
    cap_lut[np.asarray(p.capillary_codes, np.int64)] = True
    # one pass: class counts over analysed & own minus lumina, class image, capillary seeds
    counts, classes, seeds = _count(dab, comp, analysed, own,
                                    None if lumen is None else lumen.view(bool), p, True,
                                    cap_lut=cap_lut, cap_t=p.capillary_od)
    counts["lumen_px"] = counts.pop("_dropped_px")
    hema = (None if ctx.hema_od is None
            else _check_2d(ctx.hema_od, shape, "hema_od", np.float32))
    ves = _vessels(dab, region=analysed, mpp=mpp, own=own, comp=comp, codes_lut=cap_lut,
                   drop=lumen, seeds=seeds, threshold_od=p.capillary_od,
                   min_area_um2=p.capillary_min_area_um2,
                   max_area_um2=p.capillary_max_area_um2,
                   max_lumen_um2=p.capillary_max_lumen_um2,
                   max_elongation=p.capillary_max_elongation,
                   min_contrast_od=p.capillary_min_contrast_od,
                   level_step_od=p.capillary_level_step_od, hema_od=hema,
                   nucleus_od=p.capillary_nucleus_od,
                   max_nucleus_um2=p.capillary_max_nucleus_um2)
    counts["positive_capillaries"] = int(len(ves))
    counts["capillary_stained_px"] = int(ves["stained_px"].sum()) if len(ves) else 0
    counts["capillary_od_sum"] = float(ves["dab_od_sum"].sum()) if len(ves) else 0.0
    cells = pd.DataFrame({
        "x_px": ves["x_px"].to_numpy(float), "y_px": ves["y_px"].to_numpy(float),
        "area_um2": ves["area_px"].to_numpy(float) * (ctx.mpp ** 2 if ctx.mpp else np.nan),
        "dab_mean_od": (ves["dab_od_sum"] / ves["stained_px"].clip(lower=1)).to_numpy(float),
        "kind": np.full(len(ves), "capillary", dtype=object),
    })
    return Measurements(cells=cells, counts=counts, labels={"dab_class": classes})


def summarize(*, cells: pd.DataFrame, fibers: pd.DataFrame, counts: dict, mpp: float | None,
              settings, areas_mm2: dict) -> dict:
    """Slide summary of pixel scoring from whole-slide totals.

    Returns
    -------
    dict
        :func:`pixel_summary` columns, ``lumen_area_mm2``, ``positive_capillaries``,
        ``positive_capillaries_per_mm2`` (per mm² of analysed tissue; NaN when the pixel size
        is unknown) and ``capillary_dab_od`` (mean DAB OD of their stained pixels).
    """
    out = pixel_summary(counts)
    px_mm2 = (mpp * 1e-3) ** 2 if mpp else float("nan")
    n_cap = int(counts.get("positive_capillaries", 0))
    area = areas_mm2.get("analysed_area_mm2", float("nan"))
    lumen_mm2 = counts.get("lumen_px", 0) * px_mm2
    out["lumen_area_mm2"] = lumen_mm2
    out["positive_capillaries"] = n_cap
    with np.errstate(invalid="ignore", divide="ignore"):
        out["positive_capillaries_per_mm2"] = (
            float(n_cap / area) if area and np.isfinite(area) and area > 0 else float("nan"))
    spx = counts.get("capillary_stained_px", 0)
    out["capillary_dab_od"] = (float(counts.get("capillary_od_sum", 0.0)) / spx
                               if spx else float("nan"))
    return out
