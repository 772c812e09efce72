"""Compartment map of a muscle section: fibers, endomysium, perimysium, vessels, perivascular.

Codes (shared with :mod:`biopsyquant.synthetic`, see ``docs/architecture.md``):

====  ==============  ==========================================================
code  name            meaning
====  ==============  ==========================================================
0     outside         glass, excluded region, not analysed
1     fiber           inside a muscle fiber
2     endomysium      thin connective tissue between fibers
3     perimysium      connective tissue wider than ``perimysium_min_width_um``
4     vessel          vessel lumen and wall (larger than a capillary)
5     perivascular    non-fiber tissue within ``perivascular_width_um`` of a vessel
====  ==============  ==========================================================

Non-fiber tissue is perimysium where a disk of diameter ``perimysium_min_width_um`` fits in it
(morphological opening, computed with distance transforms) and endomysium elsewhere. Vessels
are lumens -- glass-bright or non-tissue holes enclosed by tissue -- whose surrounding ring is
mostly non-fiber tissue (a wall) and whose outer diameter exceeds ``vessel_min_diameter_um``
(capillaries are smaller; cracks between fibers are rimmed by fibers, not by a wall).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
from numba import njit

from .errors import InputError

__all__ = [
    "CODES",
    "COMPARTMENT_NAMES",
    "CompartmentParams",
    "compartment_map",
    "compartment_areas_mm2",
    "fascicle_edge_distance_um",
    "perifascicular_fibers",
]

#: name -> code
CODES: dict[str, int] = {"outside": 0, "fiber": 1, "endomysium": 2, "perimysium": 3,
                         "vessel": 4, "perivascular": 5}
#: code -> name
COMPARTMENT_NAMES: dict[int, str] = {v: k for k, v in CODES.items()}


@dataclass(frozen=True)
class CompartmentParams:
    """Settings of the compartment map (sizes in µm).

    Parameters
    ----------
    perimysium_min_width_um : float
        Non-fiber tissue at least this wide is perimysium; narrower is endomysium.
    perivascular_width_um : float
        Width of the perivascular zone around each vessel's outer wall.
    vessel_min_diameter_um : float
        Smallest outer diameter (lumen + wall) of a vessel; capillaries (5-10 µm) are smaller.
    vessel_max_diameter_um : float
        Largest lumen-equivalent diameter considered a vessel.
    lumen_min_diameter_um : float
        Smallest lumen (equivalent diameter) considered.
    lumen_max_od : float
        A pixel is lumen-like (glass bright) when hematoxylin + DAB OD is below this (log10).
    wall_um : float
        Width of the ring right around a lumen that must be a wall (non-fiber, stained).
    wall_fraction : float
        Largest wall thickness relative to the lumen radius: beyond ``wall_um`` the wall
        extends over stained non-fiber tissue up to ``max(wall_um, wall_fraction * radius)``.
    wall_min_tissue_fraction : float
        At least this fraction of the ring around a lumen must be non-fiber tissue (a wall);
        cracks and gaps between fibers are rimmed by fibers and rejected.
    min_lumen_solidity : float
        Lumens are round-ish: area / convex hull area at least this.
    wall_min_od_ratio : float
        The wall's mean hematoxylin + DAB OD must be at least this multiple of the median of
        non-fiber tissue (a cellular wall, not a loose space in connective tissue).
    epimysium_um : float
        Non-fiber tissue within this distance of the section's outer edge is perimysium
        (epimysium / fascicle edge) whatever its width.
    perifascicular_distance_um : float
        Fibers whose outline lies within this distance of the fascicle edge (perimysium,
        vessel or perivascular tissue) are perifascicular (about 2-3 fiber layers: 100 µm).
    fascicle_edge_codes : tuple of int
        Compartment codes that form the fascicle edge for ``fascicle_edge_distance_um``.
    working_mpp_um : float
        Resolution (µm/px) at which perimysium and vessels are mapped (then scaled up; the
        fiber outlines always stay at full resolution).
    endomysium_pocket_max_um2 : float
        Anatomical rule on top of the width rule: a wide non-fiber pocket *enclosed by fibers
        of one fascicle* (a hole of the fiber mask closed by ``fiber_gap_close_um``, not
        connected to the septa network or the section edge) smaller than this is endomysium
        — e.g. endomysial inflammation widening the space between fibers — not perimysium.
        0 turns the rule off (pure width rule). Keep pockets smaller than the tile overlap
        (5,000 µm² ≈ 80 µm across vs the 100–200 µm overlap) so tiled and whole-slide maps agree.
    fiber_gap_close_um : float
        Radius of the closing of the fiber mask that bridges ordinary endomysium when the
        fascicle pockets are found.
    """

    perimysium_min_width_um: float = 15.0
    perivascular_width_um: float = 20.0
    vessel_min_diameter_um: float = 15.0
    vessel_max_diameter_um: float = 300.0
    lumen_min_diameter_um: float = 4.0
    lumen_max_od: float = 0.1
    wall_um: float = 3.0
    wall_fraction: float = 1.0
    wall_min_tissue_fraction: float = 0.6
    min_lumen_solidity: float = 0.8
    wall_min_od_ratio: float = 1.05
    epimysium_um: float = 15.0
    perifascicular_distance_um: float = 100.0
    fascicle_edge_codes: tuple = (3, 4, 5)
    working_mpp_um: float = 1.0
    endomysium_pocket_max_um2: float = 5_000.0
    fiber_gap_close_um: float = 6.0

    def __post_init__(self) -> None:
        for name in ("perimysium_min_width_um", "vessel_min_diameter_um",
                     "vessel_max_diameter_um", "lumen_min_diameter_um", "working_mpp_um"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise InputError(f"CompartmentParams.{name} must be a positive number, got {v!r}")
        for name in ("perivascular_width_um", "lumen_max_od", "wall_um", "wall_fraction",
                     "perifascicular_distance_um"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise InputError(f"CompartmentParams.{name} must be a number >= 0, got {v!r}")
        for name in ("wall_min_tissue_fraction", "min_lumen_solidity"):
            v = getattr(self, name)
            if not (0 <= v <= 1):
                raise InputError(f"CompartmentParams.{name} must be between 0 and 1, got {v!r}")
        codes = tuple(int(c) for c in self.fascicle_edge_codes)
        if not codes or any(c not in COMPARTMENT_NAMES for c in codes):
            raise InputError("CompartmentParams.fascicle_edge_codes must be compartment codes "
                             f"0-5, got {self.fascicle_edge_codes!r}")
        object.__setattr__(self, "fascicle_edge_codes", codes)


def _check_mpp(mpp) -> float:
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"mpp must be a number of µm per pixel, got {mpp!r}") from None
    if not math.isfinite(mpp) or mpp <= 0:
        raise InputError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    return mpp


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-averaged (down) or linear (up) resize of a bool mask, threshold 0.5."""
    if mask.shape == tuple(shape):
        return mask
    h, w = shape
    src = mask.astype(np.uint8) * 255
    interp = cv2.INTER_AREA if h < mask.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(src, (w, h), interpolation=interp) >= 128


def _opening_by_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Union of all disks of ``radius_px`` that fit in ``mask`` (distance-transform opening)."""
    if radius_px <= 0.5 or not mask.any():
        return mask.copy()
    m = np.pad(mask.astype(np.uint8), 1)  # the image border is not a boundary
    m[0, :] = m[1, :]
    m[-1, :] = m[-2, :]
    m[:, 0] = m[:, 1]
    m[:, -1] = m[:, -2]
    inner = cv2.distanceTransform(m, cv2.DIST_L2, 5)[1:-1, 1:-1] > radius_px
    if not inner.any():
        return np.zeros_like(mask)
    d = cv2.distanceTransform((~inner).view(np.uint8), cv2.DIST_L2, 5)
    return (d <= radius_px + 0.5) & mask


def _outside(tissue: np.ndarray, wm: float, params: CompartmentParams) -> np.ndarray:
    """Non-tissue regions that are the slide around the section (touch the border or huge)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats((~np.asarray(tissue, bool)).view(np.uint8),
                                                        connectivity=8)
    if n <= 1:
        return np.zeros(tissue.shape, bool)
    H, W = tissue.shape
    x, y, w, h, area = (stats[:, i] for i in range(5))
    big = area > math.pi * (params.vessel_max_diameter_um / wm / 2) ** 2
    keep = big | (x == 0) | (y == 0) | (x + w == W) | (y + h == H)
    keep[0] = False
    return keep[lab]


def _find_vessels(fiber: np.ndarray, tissue: np.ndarray, bright: np.ndarray | None,
                  od: np.ndarray | None, wm: float, params: CompartmentParams,
                  section: np.ndarray | None = None, od_ref: float | None = None) -> np.ndarray:
    """Vessel mask (lumen + wall) on the working grid.

    ``tissue`` is the stained tissue (bright pixels removed), ``section`` the analysed
    tissue mask before that (default ``tissue``): a lumen cut by the image border must lie
    inside it, so glass around the section that reaches the border is never a lumen."""
    section = tissue if section is None else section
    cand = ~tissue if bright is None else (~tissue | bright)
    cand &= ~fiber
    n, lab, stats, _ = cv2.connectedComponentsWithStats(np.asarray(cand, bool).view(np.uint8),
                                                        connectivity=8)
    vessel = np.zeros(fiber.shape, bool)
    if n <= 1:
        return vessel
    H, W = fiber.shape
    nonfiber_tissue = tissue & ~fiber
    # median OD of non-fiber tissue: given (the slide's), else computed when a lumen needs it
    a_min = math.pi * (params.lumen_min_diameter_um / wm / 2) ** 2
    a_max = math.pi * (params.vessel_max_diameter_um / wm / 2) ** 2
    # the size tests of every component at once (the same float64 arithmetic as per lumen)
    area_all = stats[:, cv2.CC_STAT_AREA]
    r_all = np.sqrt(area_all / math.pi)
    wall_all = np.maximum(np.maximum(params.wall_um / wm, params.wall_fraction * r_all), 1.0)
    sized = (area_all >= a_min) & (area_all <= a_max) & \
        ~(2 * (r_all + wall_all) * wm < params.vessel_min_diameter_um)
    sized[0] = False
    for i in np.flatnonzero(sized).tolist():
        x, y, w, h, area = (int(v) for v in stats[i])
        at_border = x == 0 or y == 0 or x + w == W or y + h == H
        if at_border and not section[y:y + h, x:x + w][lab[y:y + h, x:x + w] == i].all():
            continue  # glass around the section, or a hole cut by the image border
        r_lumen = math.sqrt(area / math.pi)
        wall_px = max(params.wall_um / wm, params.wall_fraction * r_lumen, 1.0)
        pad = int(math.ceil(wall_px)) + 1
        y0, y1 = max(0, y - pad), min(H, y + h + pad)
        x0, x1 = max(0, x - pad), min(W, x + w + pad)
        lum = lab[y0:y1, x0:x1] == i
        cnts, _ = cv2.findContours(lum.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.convexHull(np.concatenate(cnts))
        harea = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True) + 1.0
        if area / harea < params.min_lumen_solidity:
            continue
        d = cv2.distanceTransform((~lum).astype(np.uint8), cv2.DIST_L2, 5)
        ring = (d > 0) & (d <= max(params.wall_um / wm, 1.0))
        n_ring = int(ring.sum())
        if n_ring == 0:
            continue
        nft = nonfiber_tissue[y0:y1, x0:x1]
        inner_wall = ring & nft
        if inner_wall.sum() < params.wall_min_tissue_fraction * n_ring:
            continue
        if od is not None:
            if od_ref is None:
                od_ref = _median_of(od, nonfiber_tissue)
            odc = od[y0:y1, x0:x1]
            if float(odc[inner_wall].mean()) < params.wall_min_od_ratio * od_ref:
                continue  # a loose space in connective tissue, not a cellular wall
            # the wall extends outwards as long as it is stained non-fiber tissue
            wall = inner_wall | ((d > 0) & (d <= wall_px) & nft
                                 & (odc >= params.wall_min_od_ratio * od_ref))
        else:
            wall = (d > 0) & (d <= wall_px) & nft
        if 2 * (r_lumen + min(wall_px, float(d[wall].max()) if wall.any() else 0.0)) * wm \
                < params.vessel_min_diameter_um:
            continue
        vessel[y0:y1, x0:x1] |= lum | wall
    return vessel


def _median_of(values: np.ndarray, where: np.ndarray) -> float:
    """``float(np.median(values[where]))`` (0.0 when ``where`` is empty)."""
    if not where.any():
        return 0.0
    return float(np.median(values[where]))


def _fascicle_pockets(fiber: np.ndarray, wm: float, params: CompartmentParams) -> np.ndarray:
    """Non-fiber pockets enclosed by the fibers of one fascicle (see CompartmentParams)."""
    r = max(1, int(round(params.fiber_gap_close_um / wm)))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    pad = r + 1
    closed = cv2.morphologyEx(np.pad(np.asarray(fiber, bool).view(np.uint8), pad), cv2.MORPH_CLOSE,
                              k)
    # outside the closed fibers: 255, else 0 (the same components as a 0/1 image)
    gaps = cv2.compare(closed[pad:-pad, pad:-pad], 0, cv2.CMP_EQ)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(gaps,
                                                        connectivity=4)
    if n <= 1:
        return np.zeros(fiber.shape, bool)
    x, y, w, h = (stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                         cv2.CC_STAT_HEIGHT))
    touches = (x == 0) | (y == 0) | (x + w >= fiber.shape[1]) | (y + h >= fiber.shape[0])
    small = stats[:, cv2.CC_STAT_AREA] * wm * wm <= params.endomysium_pocket_max_um2
    keep = small & ~touches
    keep[0] = False
    return keep[lab]


class _Working(NamedTuple):
    """Checked inputs and their working-grid maps (see :func:`_working_maps`)."""

    ws: tuple[int, int]          # working grid shape
    wm: float                    # working µm/px
    half: bool                   # working grid is exactly half the input
    fiber: np.ndarray            # fiber mask (working grid)
    tis: np.ndarray              # tissue mask (working grid)
    od_w: np.ndarray | None      # blurred OD (working grid)
    bright: np.ndarray | None    # glass-bright mask (working grid)
    fiber_labels: np.ndarray     # checked input labels
    tissue: np.ndarray           # checked input tissue (bool)


def _working_maps(fiber_labels, tissue, *, mpp, hema_od=None, dab_od=None, rgb=None,
                  params: CompartmentParams | None = None) -> _Working:
    """Check the inputs and bring them to the working grid."""
    params = CompartmentParams() if params is None else params
    fiber_labels = np.asarray(fiber_labels)
    tissue = np.asarray(tissue)
    if fiber_labels.ndim != 2:
        raise InputError(f"`fiber_labels` must be a 2-D label image, got shape "
                         f"{fiber_labels.shape}")
    shape = fiber_labels.shape
    if tissue.shape != shape:
        raise InputError(f"`tissue` has shape {tissue.shape}, fiber labels have {shape}")
    for name, arr in (("hema_od", hema_od), ("dab_od", dab_od)):
        if arr is not None and np.shape(arr) != shape:
            raise InputError(f"`{name}` has shape {np.shape(arr)}, fiber labels have {shape}")
    if rgb is not None and np.shape(rgb)[:2] != shape:
        raise InputError(f"`rgb` has shape {np.shape(rgb)}, fiber labels have {shape}")
    mpp = _check_mpp(mpp)
    tissue = tissue.astype(bool, copy=False)
    if not np.issubdtype(fiber_labels.dtype, np.integer):
        fiber_labels = (fiber_labels > 0).view(np.uint8)

    # brightness (lumen-like) image
    od = None
    if hema_od is not None:
        od = np.asarray(hema_od, np.float32)
        if dab_od is not None:
            dab_pos = np.maximum(np.asarray(dab_od, np.float32), np.float32(0))
            dab_pos += od  # == od + max(dab, 0) (float32 addition commutes exactly)
            od = dab_pos
    elif rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.dtype == np.uint8 and rgb.ndim == 3:
            lut = np.maximum(-np.log10(np.maximum(np.arange(256), 1) / 255.0), 0)
            od = _mean_lut_od(rgb, lut) if rgb.shape[2] == 3 else \
                (lut[rgb].sum(-1) / 3.0).astype(np.float32)

    # working grid
    factor = max(1.0, params.working_mpp_um / mpp)
    if factor > 1.0:
        ws = (max(1, int(round(shape[0] / factor))), max(1, int(round(shape[1] / factor))))
    else:
        ws = shape
    wm = mpp * shape[0] / ws[0]
    # fiber and tissue-or-fiber masks on the working grid: one 2-channel resize
    half = ws[0] * 2 == shape[0] and ws[1] * 2 == shape[1]
    if half:  # INTER_AREA by exactly 2 of 0/255 masks: >= 128 iff >= 2 of the 4 pixels
        fiber, tis = _halve_fiber_tissue(fiber_labels, tissue)
    else:
        both = _fiber_tissue_u8(fiber_labels, tissue)
        if ws != shape:
            interp = cv2.INTER_AREA if ws[0] < shape[0] else cv2.INTER_LINEAR
            both = cv2.resize(both, (ws[1], ws[0]), interpolation=interp)
        fiber = both[..., 0] >= 128
        tis = both[..., 1] >= 128
        del both
    od_w = None
    bright = None
    if od is not None:
        od_w = od if ws == shape else cv2.resize(od, (ws[1], ws[0]), interpolation=cv2.INTER_AREA)
        sig = 1.0 / wm
        od_w = cv2.GaussianBlur(od_w, (0, 0), sig, sig, borderType=cv2.BORDER_REFLECT)
        bright = od_w < params.lumen_max_od
        # cut thin bridges between a lumen and pale spaces of loose connective tissue
        r = max(1, int(round(2.0 / wm)))
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        bright = cv2.morphologyEx(bright.view(np.uint8), cv2.MORPH_OPEN, k).view(bool)

    return _Working(ws, wm, half, fiber, tis, od_w, bright, fiber_labels, tissue)


def nonfiber_od_values(
    fiber_labels: np.ndarray,
    tissue: np.ndarray,
    *,
    mpp: float,
    hema_od: np.ndarray,
    dab_od: np.ndarray | None = None,
    params: CompartmentParams | None = None,
) -> np.ndarray:
    """OD values (working grid, float32) of the non-fiber tissue whose median vessel walls are
    compared with — the same pixels and values :func:`compartment_map` uses for its own
    reference. Pool them over a slide's windows and pass ``np.median`` as ``wall_ref_od``."""
    w = _working_maps(fiber_labels, tissue, mpp=mpp, hema_od=hema_od, dab_od=dab_od,
                      params=params)
    stained = w.tis & ~w.bright if w.bright is not None else w.tis
    return np.asarray(w.od_w[stained & ~w.fiber], np.float32)


def compartment_map(
    fiber_labels: np.ndarray,
    tissue: np.ndarray,
    *,
    mpp: float,
    hema_od: np.ndarray | None = None,
    dab_od: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    params: CompartmentParams | None = None,
    wall_ref_od: float | None = None,
) -> np.ndarray:
    """Compartment code of every pixel (uint8, codes in the module docstring).

    Parameters
    ----------
    fiber_labels : ndarray of int, shape (H, W)
        Fiber labels (0 = not a fiber), e.g. from :func:`biopsyquant.fibers.segment_fibers`.
    tissue : ndarray of bool, shape (H, W)
        Analysed tissue (exclusions removed). Pixels outside are code 0 unless they are a
        vessel lumen.
    mpp : float
        Pixel size, µm per pixel.
    hema_od, dab_od : ndarray of float, shape (H, W), optional
        Hematoxylin and DAB OD (log10); where their sum is below ``lumen_max_od`` a pixel is
        glass-bright (vessel lumens inside the tissue mask).
    rgb : ndarray of uint8, shape (H, W, 3), optional
        Used for the brightness test when ``hema_od`` is not given (OD against white).
    params : CompartmentParams, optional
    wall_ref_od : float, optional
        The median OD of non-fiber tissue that vessel walls are compared with
        (``wall_min_od_ratio``); default: this image's own. A tiled slide passes the slide's
        value (:func:`nonfiber_od_values` on the slide-level windows) to every tile, so vessels
        do not depend on the tiling.

    Returns
    -------
    ndarray of uint8, shape (H, W)
    """
    ws, wm, half, fiber, tis, od_w, bright, fiber_labels, tissue = _working_maps(
        fiber_labels, tissue, mpp=mpp, hema_od=hema_od, dab_od=dab_od, rgb=rgb, params=params)
    params = CompartmentParams() if params is None else params
    shape = fiber_labels.shape

    nonfiber = tis & ~fiber
    peri = _opening_by_disk(nonfiber, params.perimysium_min_width_um / wm / 2.0)
    if params.epimysium_um > 0:
        outside = _outside(tis, wm, params)
        if outside.any():
            d_out = cv2.distanceTransform((~outside).view(np.uint8), cv2.DIST_L2, 5)
            peri |= nonfiber & (d_out <= params.epimysium_um / wm)
    if params.endomysium_pocket_max_um2 > 0 and fiber.any():
        peri &= ~_fascicle_pockets(fiber, wm, params)
    vessel = _find_vessels(fiber, tis & ~(bright if bright is not None else False), bright,
                           od_w, wm, params, section=tis, od_ref=wall_ref_od)
    perivasc = np.zeros(ws, bool)
    if vessel.any() and params.perivascular_width_um > 0:
        d = cv2.distanceTransform((~vessel).view(np.uint8), cv2.DIST_L2, 5)
        perivasc = (d <= params.perivascular_width_um / wm) & nonfiber & ~vessel

    # the three zones back to the input grid in one 3-channel resize (as _resize_mask per
    # zone: channels are interpolated independently), then one pass writes the codes
    zones = _zones_u8(np.ascontiguousarray(peri), np.ascontiguousarray(vessel),
                      np.ascontiguousarray(perivasc))
    if half:
        # INTER_LINEAR up by exactly 2 samples at (Y + 0.5) / 2 - 0.5: weights 9/16, 3/16,
        # 3/16, 1/16, so a 0/255 mask reaches 128 iff the nearest pixel (Y // 2) is set
        return _compose_codes_half(fiber_labels, tissue, zones)
    if ws != shape:
        interp = cv2.INTER_AREA if shape[0] < ws[0] else cv2.INTER_LINEAR
        zones = cv2.resize(zones, (shape[1], shape[0]), interpolation=interp)
    return _compose_codes(fiber_labels, tissue, zones)


@njit(cache=True, nogil=True)
def _zones_u8(peri, vessel, perivasc):
    """(H, W, 3) uint8: 255 where perimysium / vessel / perivascular (one pass)."""
    h, w = peri.shape
    out = np.empty((h, w, 3), np.uint8)
    for y in range(h):
        for x in range(w):
            out[y, x, 0] = 255 if peri[y, x] else 0
            out[y, x, 1] = 255 if vessel[y, x] else 0
            out[y, x, 2] = 255 if perivasc[y, x] else 0
    return out


@njit(cache=True, nogil=True)
def _fiber_tissue_u8(labels, tissue):
    """(H, W, 2) uint8: 255 where ``labels > 0``; 255 where tissue or fiber."""
    h, w = labels.shape
    out = np.empty((h, w, 2), np.uint8)
    for y in range(h):
        for x in range(w):
            f = labels[y, x] > 0
            out[y, x, 0] = 255 if f else 0
            out[y, x, 1] = 255 if (f or tissue[y, x]) else 0
    return out


@njit(cache=True, nogil=True)
def _halve_fiber_tissue(labels, tissue):
    """Fiber and tissue-or-fiber masks on a grid half the size (2 x 2 blocks with at least
    2 pixels set), = ``cv2.resize(mask * 255, INTER_AREA) >= 128`` for a factor of exactly 2."""
    h, w = labels.shape[0] // 2, labels.shape[1] // 2
    fiber = np.empty((h, w), np.bool_)
    tis = np.empty((h, w), np.bool_)
    for y in range(h):
        l0 = labels[2 * y]
        l1 = labels[2 * y + 1]
        t0 = tissue[2 * y]
        t1 = tissue[2 * y + 1]
        for x in range(w):  # branch-free: ~5x faster than short-circuit tests
            a = l0[2 * x] > 0
            b = l0[2 * x + 1] > 0
            c = l1[2 * x] > 0
            d = l1[2 * x + 1] > 0
            nf = np.int32(a) + np.int32(b) + np.int32(c) + np.int32(d)
            nt = (np.int32(a | t0[2 * x]) + np.int32(b | t0[2 * x + 1])
                  + np.int32(c | t1[2 * x]) + np.int32(d | t1[2 * x + 1]))
            fiber[y, x] = nf >= 2
            tis[y, x] = nt >= 2
    return fiber, tis


@njit(cache=True, nogil=True, inline="always")
def _code(t, f, peri, vessel, perivasc):
    c = 0
    if t:
        c = 2
        if peri >= 128:
            c = 3
        if perivasc >= 128:
            c = 5
    if f:
        c = 1
    elif vessel >= 128:
        c = 4
    return c


@njit(cache=True, nogil=True)
def _compose_codes(labels, tissue, zones):
    """Compartment codes from the fiber labels, the tissue mask and the (H, W, 3) zones
    (perimysium, vessel, perivascular; in where >= 128). Later rules win: tissue ->
    endomysium, perimysium, perivascular (inside tissue); vessel (outside fibers); fiber."""
    h, w = labels.shape
    out = np.empty((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            out[y, x] = _code(tissue[y, x], labels[y, x] > 0, zones[y, x, 0], zones[y, x, 1],
                              zones[y, x, 2])
    return out


@njit(cache=True, nogil=True)
def _compose_codes_half(labels, tissue, zones):
    """:func:`_compose_codes` with zones on a grid half the size (pixel ``(y // 2, x // 2)``)."""
    h, w = labels.shape
    out = np.empty((h, w), np.uint8)
    for y in range(h):
        zy = zones[y >> 1]
        for xs in range(w >> 1):
            p, v, pv = zy[xs, 0], zy[xs, 1], zy[xs, 2]
            x = 2 * xs
            out[y, x] = _code(tissue[y, x], labels[y, x] > 0, p, v, pv)
            out[y, x + 1] = _code(tissue[y, x + 1], labels[y, x + 1] > 0, p, v, pv)
    return out


@njit(cache=True, nogil=True)
def _mean_lut_od(rgb, lut):
    """``(lut[rgb].sum(-1) / 3).astype(float32)`` without the (H, W, 3) float64 image."""
    h, w = rgb.shape[0], rgb.shape[1]
    out = np.empty((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            out[y, x] = np.float32((lut[rgb[y, x, 0]] + lut[rgb[y, x, 1]]
                                    + lut[rgb[y, x, 2]]) / 3.0)
    return out


def compartment_areas_mm2(codes: np.ndarray, mpp: float | None) -> dict[str, float]:
    """Area of each compartment in mm².

    Parameters
    ----------
    codes : ndarray of uint8, shape (H, W)
        Output of :func:`compartment_map`.
    mpp : float or None
        Pixel size (µm/px); None gives NaN areas.

    Returns
    -------
    dict
        ``{"fiber_area_mm2": ..., "endomysium_area_mm2": ..., "perimysium_area_mm2": ...,
        "vessel_area_mm2": ..., "perivascular_area_mm2": ..., "analysed_area_mm2": ...}``
        (``analysed`` = codes 1-5).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise InputError(f"`codes` must be a 2-D compartment image, got shape {codes.shape}")
    counts = np.bincount(codes.ravel().astype(np.intp), minlength=6)
    if counts.size > 6:
        raise InputError(f"`codes` holds values above 5 (max {codes.max()}); not a compartment map")
    px_mm2 = float("nan") if mpp is None else (_check_mpp(mpp) / 1000.0) ** 2
    out = {f"{COMPARTMENT_NAMES[c]}_area_mm2": float(counts[c] * px_mm2) for c in range(1, 6)}
    out["analysed_area_mm2"] = float(counts[1:6].sum() * px_mm2)
    return out


def fascicle_edge_distance_um(
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
    if not np.issubdtype(fiber_labels.dtype, np.integer):
        fiber_labels = fiber_labels.astype(np.intp)
    n = int(fiber_labels.max(initial=0))
    if fiber_labels.size and int(fiber_labels.min()) < 0:
        raise InputError("`fiber_labels` must be >= 0 (0 = no fiber), got negative values")
    name = "fascicle_edge_distance_um"
    d = None
    if n > 0 and mpp is not None:
        d = _edge_distance_image(codes, params)
    count, dmin = _label_count_min(fiber_labels, d if d is not None else _NO_VALUES,
                                   d is not None, n)
    ids = np.flatnonzero(count[1:]) + 1
    if len(ids) == 0:
        return pd.Series([], index=pd.Index([], name="fiber_id", dtype=np.int32), name=name,
                         dtype=float)
    index = pd.Index(ids.astype(np.int32), name="fiber_id")
    if d is None:  # no pixel size, or no fascicle edge in the section
        return pd.Series(np.nan, index=index, name=name)
    mpp = _check_mpp(mpp)
    dist_um = np.maximum(dmin[ids].astype(float) - 1.0, 0.0) * mpp
    return pd.Series(dist_um, index=index, name=name)


_NO_VALUES = np.zeros((1, 1), np.float32)


def _edge_distance_image(codes: np.ndarray, params: CompartmentParams) -> np.ndarray | None:
    """5x5 chamfer distance (px, float32) of every pixel to the nearest fascicle-edge pixel
    (codes in ``params.fascicle_edge_codes``); None when there is no such pixel."""
    codes = np.asarray(codes)
    edge_codes = np.asarray(params.fascicle_edge_codes)
    if codes.dtype == np.uint8:
        lut = np.ones(256, np.uint8)
        lut[edge_codes[(edge_codes >= 0) & (edge_codes < 256)]] = 0
        not_edge = cv2.LUT(np.ascontiguousarray(codes), lut)
    else:
        not_edge = (~np.isin(codes, edge_codes.astype(np.uint8))).view(np.uint8)
    if cv2.countNonZero(not_edge) == not_edge.size:
        return None
    return cv2.distanceTransform(not_edge, cv2.DIST_L2, 5)


@njit(cache=True, nogil=True)
def _label_count_min(labels, values, use_values, n):
    """Pixel count and minimum of ``values`` (when ``use_values``) per label 1..n (labels
    <= 0 ignored): ``scipy.ndimage.minimum`` without its sort."""
    count = np.zeros(n + 1, np.int64)
    vmin = np.full(n + 1, np.inf, np.float32)
    h, w = labels.shape
    for y in range(h):
        for x in range(w):
            lv = labels[y, x]
            if lv <= 0:
                continue
            count[lv] += 1
            if use_values and values[y, x] < vmin[lv]:
                vmin[lv] = values[y, x]
    return count, vmin


def perifascicular_fibers(distance_um: pd.Series, params: CompartmentParams | None = None
                          ) -> pd.Series:
    """True for fibers within ``params.perifascicular_distance_um`` of the fascicle edge.

    Parameters
    ----------
    distance_um : Series
        Output of :func:`fascicle_edge_distance_um` (NaN distances give False).
    params : CompartmentParams, optional

    Returns
    -------
    Series of bool, same index, name ``perifascicular``
    """
    params = CompartmentParams() if params is None else params
    out = (distance_um <= params.perifascicular_distance_um).fillna(False).astype(bool)
    out.name = "perifascicular"
    return out
