"""Tissue detection, tissue area, and user exclusion regions.

Tissue is found at low resolution (``TissueParams.work_mpp``, 8 µm/px by default) on the
optical density relative to the slide's own background:

1. the image is area-averaged down to ``work_mpp`` (no-op when it is already coarser);
2. a pixel is tissue when the sum of its R, G, B optical densities (log10, relative to the
   background) is at least ``od_threshold`` after a median filter of radius ``smoothing_um``
   (a median removes speckle without moving straight edges, unlike a Gaussian);
3. ink from marker pens (green / saturated blue, see :func:`pen_mask`) is removed;
4. a closing of radius ``closing_um`` joins fragments split by thin gaps, then an opening of
   radius ``opening_um`` drops thin isolated lines (air-bubble rims, coverslip edges, lint);
5. holes smaller than ``max_hole_area_um2`` are filled — capillaries, vessel lumens (mapped to
   the *vessel* compartment later), freezing gaps — while larger holes (tears, gaps between
   separate fascicles) stay outside the tissue and out of its area;
6. pieces smaller than ``min_tissue_area_um2`` (dust, debris, stray cells) are removed;
7. the mask is brought back to the image's resolution by linear interpolation of the low
   resolution mask thresholded at 0.5, so edges are placed to within about a quarter of a
   working pixel.

User exclusion regions are polygons in **slide level-0 pixel coordinates** (x = column,
y = row, origin top-left, pixel ``(r, c)`` covering ``[c, c+1) x [r, r+1)``, as QuPath writes
them) read from and written to GeoJSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import draw, morphology

from ._atomic import atomic_write_text
from .errors import InputError, MppUnknownError
from .stains import _check_rgb, _od_luts, estimate_background

__all__ = [
    "TissueParams",
    "detect_tissue",
    "pen_mask",
    "tissue_area_mm2",
    "load_exclusions",
    "save_exclusions",
    "rasterize_polygons",
    "polygon_area",
    "analysed_mask",
]


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue` (sizes in µm, OD in log10 units).

    Attributes
    ----------
    work_mpp : float
        Resolution (µm/px) at which tissue is detected; images at least this coarse are used as
        they are.
    od_threshold : float
        Minimum sum of the R, G, B optical densities (log10, relative to the background) of a
        tissue pixel.  0.1 keeps pale, lightly counterstained muscle (about 0.15-0.3) and drops
        glass, even with a few percent uneven illumination.
    smoothing_um : float
        Radius of the median filter applied to the OD before thresholding (0 = none).
    closing_um : float
        Radius of the morphological closing that joins tissue fragments across thin gaps
        (0 = none).
    opening_um : float
        Radius of the morphological opening applied after the closing: isolated lines thinner
        than about twice this (air-bubble rims, coverslip edges, lint) are dropped (0 = none).
    min_tissue_area_um2 : float
        Connected pieces smaller than this are debris and are removed (10,000 µm² is a disc of
        113 µm, two or three muscle fibers).
    max_hole_area_um2 : float
        Holes smaller than this are filled and count as tissue (capillaries, vessel lumens,
        freezing gaps; 50,000 µm² is a disc of 252 µm).  Larger holes — tears, gaps between
        separate fascicles — remain outside the tissue.
    remove_pen : bool
        Remove green and saturated blue marker-pen ink (see :func:`pen_mask`).
    texture_factor : float
        Pale tissue under uneven illumination can fall below ``od_threshold``; such pixels
        still count as tissue when their local texture (standard deviation of brightness in
        a ``texture_window_um`` window at ~2 µm/px) exceeds ``texture_factor`` times the
        texture of the image's glass (and at least 1.5 intensity levels) and their OD is at
        least ``od_threshold / 3``.  0 turns the texture cue off.
    texture_window_um : float
        Window of the texture measure (µm).
    """

    work_mpp: float = 8.0
    od_threshold: float = 0.1
    smoothing_um: float = 8.0
    closing_um: float = 16.0
    opening_um: float = 8.0
    min_tissue_area_um2: float = 10_000.0
    max_hole_area_um2: float = 50_000.0
    remove_pen: bool = True
    texture_factor: float = 3.0
    texture_window_um: float = 8.0

    def __post_init__(self) -> None:
        for name in ("work_mpp",):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise InputError(f"TissueParams.{name} must be a positive number, got {v!r}")
        for name in ("od_threshold", "smoothing_um", "closing_um", "opening_um",
                     "min_tissue_area_um2",
                     "max_hole_area_um2"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise InputError(f"TissueParams.{name} must be a number >= 0, got {v!r}")


def _check_mpp(mpp, what: str) -> float:
    if mpp is None:
        raise MppUnknownError(f"{what} needs the pixel size (mpp, µm/px), which is unknown")
    try:
        m = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"`mpp` must be a number (µm/px), got {mpp!r}") from None
    if not (math.isfinite(m) and m > 0):
        raise InputError(f"`mpp` must be a positive number (µm/px), got {mpp!r}")
    return m


def _disk(radius_px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like marker-pen ink rather than hematoxylin, eosin or DAB.

    Green ink (hue 70-190°, saturation > 0.3) and saturated blue ink (hue 190-235°,
    saturation > 0.55).  Hematoxylin (blue-violet, hue 240-290°, saturation mostly < 0.5),
    DAB (brown, hue 10-45°) and eosin (pink) are not matched.  Black ink is not detected
    (it cannot be told from folds and dark debris): exclude it with a region.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    rgb = _check_rgb(rgb)
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL)  # H 0-255 = 0-360°
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    sat = hsv[..., 1].astype(np.float32) / 255.0
    val = hsv[..., 2]
    green = (hue >= 70) & (hue < 190) & (sat > 0.3)
    blue = (hue >= 190) & (hue < 235) & (sat > 0.55)
    return (green | blue) & (val < 245)


def detect_tissue(
    rgb: np.ndarray,
    *,
    mpp: float,
    background=None,
    params: TissueParams | None = None,
) -> np.ndarray:
    """Tissue mask of an image or slide thumbnail.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        The image, or a low-resolution thumbnail of a slide.
    mpp : float
        Pixel size of ``rgb`` in µm/px (for a thumbnail: level-0 mpp × its downsample).
    background : sequence of 3 float, optional
        Glass intensity R, G, B (0-255); estimated from the image when None.
    params : TissueParams, optional

    Returns
    -------
    ndarray of bool, shape (H, W)
        True on tissue.  See the module docstring for the steps.
    """
    rgb = _check_rgb(rgb)
    params = TissueParams() if params is None else params
    mpp = _check_mpp(mpp, "tissue detection")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        raise InputError(f"`rgb` is empty (shape {rgb.shape})")
    scale = min(1.0, mpp / params.work_mpp)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    if (sh, sw) != (h, w):
        small = cv2.resize(np.ascontiguousarray(rgb), (sw, sh), interpolation=cv2.INTER_AREA)
    else:
        small = np.ascontiguousarray(rgb)
    wmpp = mpp * math.sqrt((h / sh) * (w / sw))  # µm per working pixel
    px_area = wmpp * wmpp

    if background is None:
        background = estimate_background(small)
    luts = _od_luts(background).astype(np.float32)
    score = luts[0][small[..., 0]] + luts[1][small[..., 1]] + luts[2][small[..., 2]]
    r = round(params.smoothing_um / wmpp)
    if r >= 1:
        score = ndi.median_filter(score, footprint=morphology.disk(r), mode="nearest")
    mask = score >= params.od_threshold
    if params.texture_factor > 0:
        tex = _texture(rgb, mpp=mpp, window_um=params.texture_window_um, out_shape=(sh, sw))
        glass = score < params.od_threshold / 3
        glass_tex = float(np.median(tex[glass])) if glass.sum() >= 16 else 1.0
        thr = max(1.5, params.texture_factor * glass_tex)
        mask |= (tex >= thr) & (score >= params.od_threshold / 3)

    if params.remove_pen:
        pen = pen_mask(small)
        if pen.any():
            pen = cv2.dilate(pen.view(np.uint8), _disk(1)).astype(bool)
            mask &= ~pen
    rc = round(params.closing_um / wmpp)
    if rc >= 1 and mask.any():
        # pad so that the closing does not glue tissue to the image border
        pad = rc + 1
        m = np.pad(mask.view(np.uint8), pad)
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(rc))
        mask = m[pad:-pad, pad:-pad].astype(bool)
    ro = round(params.opening_um / wmpp)
    if ro >= 1 and mask.any():
        # after the closing: drops thin isolated lines (air-bubble rims, coverslip edges,
        # lint, thin pen strokes) without eroding consolidated tissue
        mask = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_OPEN, _disk(ro)).astype(bool)
    hole_px = params.max_hole_area_um2 / px_area
    if hole_px >= 1:
        mask = _fill_small_holes(mask, hole_px)
    obj_px = params.min_tissue_area_um2 / px_area
    if obj_px >= 1:
        mask = _remove_small_objects(mask, obj_px)

    if (sh, sw) != (h, w):
        up = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        mask = up >= 0.5
    return mask


def _texture(rgb: np.ndarray, *, mpp: float, window_um: float,
             out_shape: tuple[int, int]) -> np.ndarray:
    """Local standard deviation of brightness (0-255 levels) at ~2 µm/px, at ``out_shape``."""
    h, w = rgb.shape[:2]
    f = min(1.0, mpp / 2.0)
    mh, mw = max(1, round(h * f)), max(1, round(w * f))
    mid = rgb if (mh, mw) == (h, w) else cv2.resize(np.ascontiguousarray(rgb), (mw, mh),
                                                   interpolation=cv2.INTER_AREA)
    gray = mid.astype(np.float32).mean(axis=2)
    k = max(3, int(round(window_um / (mpp / f))) | 1)
    mean = cv2.blur(gray, (k, k))
    sq = cv2.blur(gray * gray, (k, k))
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    return cv2.resize(std, (out_shape[1], out_shape[0]), interpolation=cv2.INTER_AREA)


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background components not touching the border with area < ``max_area_px``."""
    holes = ~mask
    lab, n = ndi.label(holes)  # 4-connected background
    if n == 0:
        return mask
    areas = np.bincount(lab.ravel())
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = areas < max_area_px
    fill[0] = False
    fill[border] = False
    return mask | fill[lab]


def _remove_small_objects(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop 8-connected components with area < ``min_area_px``."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    if n <= 1:
        return mask
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[lab]


def tissue_area_mm2(mask: np.ndarray, mpp: float | None, *, downsample: float = 1.0) -> float:
    """Area of a mask in mm².

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
    mpp : float
        Level-0 pixel size, µm/px.
    downsample : float
        Level-0 pixels per mask pixel (e.g. for a mask computed on a thumbnail).

    Returns
    -------
    float
        ``mask.sum() * (mpp * downsample)² / 1e6``.

    Raises
    ------
    MppUnknownError
        When ``mpp`` is None: an area in mm² cannot be given without the pixel size.
    """
    mpp = _check_mpp(mpp, "tissue area (mm²)")
    if not (math.isfinite(downsample) and downsample > 0):
        raise InputError(f"`downsample` must be a positive number, got {downsample!r}")
    return float(np.count_nonzero(mask)) * (mpp * downsample) ** 2 / 1e6


def analysed_mask(tissue: np.ndarray, exclusion: np.ndarray | None) -> np.ndarray:
    """Tissue minus excluded regions: ``tissue & ~exclusion``.

    Parameters
    ----------
    tissue, exclusion : ndarray of bool, shape (H, W)
        ``exclusion`` may be None (nothing excluded).
    """
    tissue = np.asarray(tissue, dtype=bool)
    if exclusion is None:
        return tissue.copy()
    exclusion = np.asarray(exclusion, dtype=bool)
    if exclusion.shape != tissue.shape:
        raise InputError(
            f"exclusion mask has shape {exclusion.shape}, tissue mask has {tissue.shape}"
        )
    return tissue & ~exclusion


# ------------------------------------------------------------------------------------------
# polygons
# ------------------------------------------------------------------------------------------
def polygon_area(poly: np.ndarray) -> float:
    """Area of a polygon (shoelace formula), in squared coordinate units (always >= 0)."""
    p = np.asarray(poly, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float((np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _bridge_holes(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """One ring equal to ``outer`` minus ``holes`` (keyhole / bridge construction).

    Each hole is joined to the ring by a zero-width bridge along a horizontal ray from its
    leftmost vertex to the nearest edge on its left (holes processed left to right, as in
    earcut), so the result is a single weakly-simple ring whose even-odd fill and shoelace
    area equal those of the polygon with holes.
    """
    ring = outer if _signed_area(outer) > 0 else outer[::-1]
    for hole in sorted(holes, key=lambda hh: float(hh[:, 0].min())):
        hole = hole if _signed_area(hole) < 0 else hole[::-1]
        k = int(np.argmin(hole[:, 0] + 1e-12 * hole[:, 1]))
        px, py = hole[k]
        a, b = ring, np.roll(ring, -1, axis=0)
        ay, by = a[:, 1], b[:, 1]
        cross = (np.minimum(ay, by) <= py) & (np.maximum(ay, by) >= py) & (ay != by)
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = a[:, 0] + (py - ay) * (b[:, 0] - a[:, 0]) / (by - ay)
        ok = cross & (xs <= px)
        if not ok.any():
            raise ValueError("a hole is not inside its polygon")
        e = int(np.flatnonzero(ok)[np.argmax(xs[ok])])
        ip = np.array([[xs[e], py]])
        hole_loop = np.vstack([np.roll(hole, -k, axis=0), hole[k : k + 1]])
        ring = np.vstack([ring[: e + 1], ip, hole_loop, ip, ring[e + 1 :]])
    return ring


def _ring(coords, where: str) -> np.ndarray:
    try:
        p = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: coordinates are not numbers") from None
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{where}: a ring must be a list of [x, y] positions")
    p = p[:, :2]
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{where}: non-finite coordinates")
    if len(p) > 1 and np.array_equal(p[0], p[-1]):
        p = p[:-1]
    if len(np.unique(p, axis=0)) < 3:
        raise ValueError(f"{where}: a ring needs at least 3 distinct positions")
    return p


def _polygon(rings, where: str) -> np.ndarray:
    if not isinstance(rings, list) or not rings:
        raise ValueError(f"{where}: Polygon coordinates must be a non-empty list of rings")
    outer = _ring(rings[0], f"{where}, exterior ring")
    holes = [_ring(r, f"{where}, hole {i + 1}") for i, r in enumerate(rings[1:])]
    return _bridge_holes(outer, holes) if holes else outer


def _geometry(geom, where: str) -> list[np.ndarray]:
    if not isinstance(geom, dict) or "type" not in geom:
        raise ValueError(f"{where}: not a GeoJSON geometry")
    t = geom["type"]
    if t == "Polygon":
        return [_polygon(geom.get("coordinates"), where)]
    if t == "MultiPolygon":
        coords = geom.get("coordinates")
        if not isinstance(coords, list):
            raise ValueError(f"{where}: MultiPolygon coordinates must be a list")
        return [_polygon(c, f"{where}, part {i + 1}") for i, c in enumerate(coords)]
    if t == "GeometryCollection":
        out = []
        for i, g in enumerate(geom.get("geometries") or []):
            out += _geometry(g, f"{where}, geometry {i + 1}")
        return out
    raise ValueError(
        f"{where}: is a {t}; exclusion regions must be Polygon or MultiPolygon (areas)"
    )


def _features(doc, where: str) -> list[np.ndarray]:
    if isinstance(doc, list):  # QuPath <0.3 wrote a bare list of features
        out = []
        for i, f in enumerate(doc):
            out += _features(f, f"feature {i + 1}")
        return out
    if not isinstance(doc, dict):
        raise ValueError("the file is not a GeoJSON object")
    t = doc.get("type")
    if t == "FeatureCollection":
        out = []
        for i, f in enumerate(doc.get("features") or []):
            out += _features(f, f"feature {i + 1}")
        return out
    if t == "Feature":
        if doc.get("geometry") is None:
            return []
        return _geometry(doc["geometry"], where)
    return _geometry(doc, where)


def load_exclusions(path: str | os.PathLike) -> list[np.ndarray]:
    """Read exclusion regions from a GeoJSON file.

    Accepts a FeatureCollection, a Feature, a bare Polygon / MultiPolygon /
    GeometryCollection, or a JSON list of Features (older QuPath exports).  Coordinates are
    slide level-0 pixels (x = column, y = row).  A polygon with holes becomes one ring that
    runs round each hole through a zero-width bridge, so that it still rasterises (and has the
    shoelace area of) the polygon minus its holes.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of ndarray of float64, shape (N, 2)
        One (x, y) ring per polygon, not closed (first vertex not repeated).

    Raises
    ------
    InputError
        Naming the file and the problem: missing, not JSON, not GeoJSON, a non-area
        geometry (Point, LineString), a ring with fewer than 3 positions, a hole outside its
        polygon.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: exclusion file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable GeoJSON file ({exc})") from None
    try:
        return _features(doc, "geometry")
    except (ValueError, TypeError, IndexError) as exc:
        raise InputError(f"{path}: invalid exclusion regions: {exc}") from None


def save_exclusions(polys, path: str | os.PathLike) -> Path:
    """Write polygons as a GeoJSON FeatureCollection (atomically).

    Parameters
    ----------
    polys : list of array-like, shape (N, 2)
        Rings in slide level-0 pixels (x, y).
    path : str or Path

    Returns
    -------
    Path
        The written file; each polygon is a Feature with a closed Polygon ring, classified
        ``"Exclusion"`` (QuPath reads it as annotations).
    """
    path = Path(path)
    feats = []
    for i, p in enumerate(polys):
        try:
            ring = _ring(p, f"polygon {i + 1}")
        except ValueError as exc:
            raise InputError(f"{path}: cannot save exclusion regions: {exc}") from None
        closed = np.vstack([ring, ring[:1]])
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [closed.tolist()]},
            "properties": {"objectType": "annotation", "classification": {"name": "Exclusion"},
                           "source": "biopsyquant"},
        })
    text = json.dumps({"type": "FeatureCollection", "features": feats}) + "\n"
    try:
        return atomic_write_text(path, text)
    except OSError as exc:
        raise InputError(f"{path}: cannot write exclusion regions ({exc})") from None


def rasterize_polygons(polys, shape, *, downsample: float = 1.0, offset=(0, 0)) -> np.ndarray:
    """Union of polygons as a boolean mask.

    A mask pixel is inside when its centre is inside a polygon (even-odd rule per polygon), so
    the mask area matches the polygon area without a boundary bias.

    Parameters
    ----------
    polys : list of array-like, shape (N, 2)
        Rings in slide level-0 pixels (x, y).
    shape : tuple of int
        ``(H, W)`` of the mask (extra trailing dimensions are ignored).
    downsample : float
        Level-0 pixels per mask pixel.
    offset : tuple of float
        Level-0 ``(x, y)`` of the mask's top-left corner (e.g. a tile's origin).

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    h, w = int(shape[0]), int(shape[1])
    if not (math.isfinite(downsample) and downsample > 0):
        raise InputError(f"`downsample` must be a positive number, got {downsample!r}")
    mask = np.zeros((h, w), bool)
    ox, oy = float(offset[0]), float(offset[1])
    for i, p in enumerate(polys):
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] < 3 or p.shape[1] < 2:
            raise InputError(f"polygon {i + 1}: expected an (N >= 3, 2) array of x, y, got "
                             f"shape {p.shape}")
        cols = (p[:, 0] - ox) / downsample - 0.5
        rows = (p[:, 1] - oy) / downsample - 0.5
        if cols.max() < -1 or rows.max() < -1 or cols.min() > w or rows.min() > h:
            continue
        rr, cc = draw.polygon(rows, cols, shape=(h, w))
        mask[rr, cc] = True
    return mask

