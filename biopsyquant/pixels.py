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
@njit(**_JIT)
def _count_row(dab, comp, mask, drop, code_group, thr, counts, sums, classes, write, i):
    for j in range(dab.shape[1]):
        if not mask[i, j] or drop[i, j]:
            if write:
                classes[i, j] = 0
            continue
        v = dab[i, j]
        c = 0
        for k in range(3):
            if v >= thr[k]:
                c += 1
        g = code_group[comp[i, j]]
        counts[i, g * 4 + c] += 1
        sums[i, g * 4 + c] += v
        if write:
            classes[i, j] = c


@njit(parallel=True, **_JIT)
def _count_par(dab, comp, mask, drop, code_group, thr, counts, sums, classes, write):
    for i in prange(dab.shape[0]):
        _count_row(dab, comp, mask, drop, code_group, thr, counts, sums, classes, write, i)


@njit(**_JIT)
def _count_ser(dab, comp, mask, drop, code_group, thr, counts, sums, classes, write):
    for i in range(dab.shape[0]):
        _count_row(dab, comp, mask, drop, code_group, thr, counts, sums, classes, write, i)


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
    within = _check_2d(within, rgb.shape[:2], "within", np.bool_)
    pale = np.empty(rgb.shape[:2], np.uint8)
    _run(_pale_par, _pale_ser, pale.size, rgb, _od_lut(background), np.float32(max_total_od),
         within, pale)
    if not pale.any():
        return np.zeros(pale.shape, bool)
    min_px = min_area_um2 / (mpp * mpp)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(pale, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    lumen = keep[lab]
    if fill_um2 > 0 and keep.any():
        fill_px = fill_um2 / (mpp * mpp)
        for i in np.flatnonzero(keep):  # islands inside each lumen, in its bounding box
            x0, y0 = stats[i, cv2.CC_STAT_LEFT], stats[i, cv2.CC_STAT_TOP]
            sl = (slice(y0, y0 + stats[i, cv2.CC_STAT_HEIGHT]),
                  slice(x0, x0 + stats[i, cv2.CC_STAT_WIDTH]))
            holes = _holes(lab[sl] == i)
            if holes.any():
                nh, hl, hs, _ = cv2.connectedComponentsWithStats(holes.view(np.uint8),
                                                                 connectivity=4)
                small = hs[:, cv2.CC_STAT_AREA] <= fill_px
                small[0] = False
                lumen[sl] |= small[hl]
    return lumen


def code_mask(compartments: np.ndarray, codes) -> np.ndarray:
    """Bool image: compartment code in ``codes`` (a 256-entry lookup, faster than np.isin)."""
    lut = np.zeros(256, bool)
    lut[np.asarray(codes, np.int64)] = True
    return lut[np.asarray(compartments, np.uint8)]


def _holes(obj: np.ndarray) -> np.ndarray:
    """Pixels enclosed by ``obj`` (bool crop): background not 4-connected to the crop border."""
    h, w = obj.shape
    canvas = np.zeros((h + 2, w + 2), np.uint8)
    canvas[1:-1, 1:-1] = obj
    cv2.floodFill(canvas, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1, flags=4)
    return canvas[1:-1, 1:-1] == 0


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
    dr = np.zeros(shape, np.bool_) if drop is None else _check_2d(drop, shape, "drop", np.bool_)
    h = shape[0]
    counts = np.zeros((h, 12), np.int64)
    sums = np.zeros((h, 12), np.float64)
    classes = np.empty(shape if return_classes else (1, 1), np.uint8)
    _run(_count_par, _count_ser, dab.size, dab, comp, mask, dr, _CODE_GROUP, params.thresholds,
         counts, sums, classes, bool(return_classes))
    n = counts.sum(axis=0)
    s = sums.sum(axis=0)
    out: dict = {}
    for g, gname in enumerate(GROUPS):
        for c in range(4):
            out[f"pix_n_{gname}_c{c}"] = int(n[g * 4 + c])
            out[f"pix_od_{gname}_c{c}"] = float(s[g * 4 + c])
    return out, (classes if return_classes else None)


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
    dab = np.asarray(dab_od, np.float32)
    shape = dab.shape
    region = _check_2d(region, shape, "region", np.bool_)
    cols = ["x_px", "y_px", "area_px", "stained_px", "dab_od_sum", "elongation"]
    empty = pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    if own is not None:
        own = _check_2d(own, shape, "own", np.bool_)
    nuc = None
    if hema_od is not None:
        nuc = _check_2d(hema_od, shape, "hema_od") >= nucleus_od
    px_um2 = mpp * mpp
    ring_px = max(1, int(round(2.0 / mpp)))
    ring_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_px + 1, 2 * ring_px + 1))
    active = region
    found = []
    t = float(threshold_od)
    while t <= max_level_od + 1e-9:
        pos = (dab >= t) & active
        if not pos.any():
            break
        res, too_big = _objects_at_level(
            dab, pos, region, px_um2=px_um2, min_area_um2=min_area_um2,
            max_area_um2=max_area_um2, max_lumen_um2=max_lumen_um2,
            max_elongation=max_elongation, min_contrast_od=min_contrast_od, ring_k=ring_k,
            nuc=nuc, max_nucleus_px=max_nucleus_um2 / px_um2, want_big=level_step_od > 0)
        if len(res):
            found.append(res)
        if level_step_od <= 0 or too_big is None:
            break
        active = too_big  # only blobs too large at this level are split at the next
        t += level_step_od
    if not found:
        return empty
    out = pd.concat(found, ignore_index=True)
    if own is not None and len(out):
        xi = np.clip(np.round(out["x_px"].to_numpy()).astype(int), 0, shape[1] - 1)
        yi = np.clip(np.round(out["y_px"].to_numpy()).astype(int), 0, shape[0] - 1)
        out = out[own[yi, xi]].reset_index(drop=True)
    return out[cols]


def _objects_at_level(dab, pos, region, *, px_um2, min_area_um2, max_area_um2, max_lumen_um2,
                      max_elongation, min_contrast_od, ring_k, nuc=None, max_nucleus_px=np.inf,
                      want_big=True):
    """Valid capillary objects among the components of ``pos`` and the too-large blobs.

    One connected-component pass over the image; every small component is then measured in
    its own bounding box (lumen filled, moments, contrast ring, nucleus), so the cost grows
    with the number of candidates, not with the image.
    """
    cols = ["x_px", "y_px", "area_px", "stained_px", "dab_od_sum", "elongation"]
    h, w = pos.shape
    n, lab, stats, _ = cv2.connectedComponentsWithStats(pos.view(np.uint8), connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    bx, by = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    max_px = max_area_um2 / px_um2
    min_px = min_area_um2 / px_um2
    big = area > max_px
    big[0] = False
    cand = ~big & (bw * bh >= min_px)
    cand[0] = False
    pad = ring_k.shape[0] // 2
    rows = []
    grown_big = []
    for i in np.flatnonzero(cand):
        x0, y0 = max(int(bx[i]) - pad, 0), max(int(by[i]) - pad, 0)
        x1, y1 = min(int(bx[i] + bw[i]) + pad, w), min(int(by[i] + bh[i]) + pad, h)
        sl = (slice(y0, y1), slice(x0, x1))
        obj = lab[sl] == i
        holes = _holes(obj)
        filled = obj | holes if np.count_nonzero(holes) * px_um2 <= max_lumen_um2 else obj
        fa = int(filled.sum())
        if fa > max_px:
            grown_big.append(i)
            continue
        if fa < min_px:
            continue
        mom = cv2.moments(filled.view(np.uint8), binaryImage=True)
        m00 = mom["m00"]
        vxx, vyy = mom["mu20"] / m00 + 1 / 12, mom["mu02"] / m00 + 1 / 12
        vxy = mom["mu11"] / m00
        tr, det = vxx + vyy, vxx * vyy - vxy ** 2
        disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
        elong = math.sqrt((tr / 2 + disc) / max(tr / 2 - disc, 1e-12))
        if elong > max_elongation:
            continue
        if nuc is not None and np.count_nonzero(nuc[sl] & filled) > max_nucleus_px:
            continue
        d = dab[sl]
        stained = int(np.count_nonzero(obj))
        odsum = float(d[obj].sum(dtype=np.float64))
        if min_contrast_od > 0:
            ring = (cv2.dilate(filled.view(np.uint8), ring_k).view(bool) & ~filled
                    & ~pos[sl] & region[sl])
            rmean = float(d[ring].mean()) if ring.any() else 0.0
            if odsum / max(stained, 1) - rmean < min_contrast_od:
                continue
        rows.append((x0 + mom["m10"] / m00, y0 + mom["m01"] / m00, fa, stained, odsum, elong))
    too_big = None
    if want_big and (big.any() or grown_big):
        big[np.asarray(grown_big, np.int64)] = True
        too_big = big[lab]
    return pd.DataFrame(rows, columns=cols), too_big


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
    analysed = np.asarray(ctx.analysed, bool)
    own_mask = ctx.analysed_own
    lumen = None
    if p.drop_lumina:
        lumen = lumen_mask(ctx.rgb, background=ctx.stain_model.background, mpp=mpp,
                           within=analysed, max_total_od=p.lumen_max_total_od,
                           min_area_um2=p.lumen_min_area_um2, fill_um2=p.lumen_fill_um2)
    counts, classes = score_pixels(ctx.dab_od, analysed=own_mask, compartments=ctx.compartments,
                                   params=p, drop=lumen, return_classes=True)
    counts["lumen_px"] = int(np.count_nonzero(lumen & own_mask)) if lumen is not None else 0
    comp = np.asarray(ctx.compartments)
    region = analysed & code_mask(comp, p.capillary_codes)
    if lumen is not None:
        region &= ~lumen
    ves = positive_vessels(ctx.dab_od, region=region, mpp=mpp, own=ctx.own,
                           threshold_od=p.capillary_od, min_area_um2=p.capillary_min_area_um2,
                           max_area_um2=p.capillary_max_area_um2,
                           max_lumen_um2=p.capillary_max_lumen_um2,
                           max_elongation=p.capillary_max_elongation,
                           min_contrast_od=p.capillary_min_contrast_od,
                           level_step_od=p.capillary_level_step_od, hema_od=ctx.hema_od,
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
