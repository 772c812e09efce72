"""Whole-slide scoring in tiles with bounded memory and seam-safe counting.

A slide larger than ``settings.tiling.max_whole_image_px`` is never read whole. Instead:

1. **One model per slide.** A low-resolution image (the pyramid level nearest to
   ``thumbnail_px`` on its longest side, see :meth:`Slide.thumbnail`) gives the background
   (glass) intensity, the stain vectors and the tissue mask. Every tile uses this one stain
   model, and the tissue mask of a tile is the thumbnail mask sampled at the tile's pixels, so
   neither depends on where the tiles fall.
2. **Tiles with overlap.** Level 0 is cut into cores of ``tiling.tile_size_px`` pixels; each
   tile is read with ``tiling.overlap_um`` of context on every side (clipped at the slide
   edge) through :meth:`Slide.read_region`, so memory is bounded by the tile size.
3. **Ownership.** Pixel counts are taken over the core only (``own``), and an object (cell,
   fiber) is kept by the tile whose core holds its centroid. The overlap exceeds the largest
   object, so each object is measured whole, once.
4. **One summary.** :func:`biopsyquant.score.summarize` runs once over the concatenated
   object tables and the summed counts, exactly as :func:`~biopsyquant.score.score_image`
   does for a whole image.

Tile work is described by small picklable :class:`TileTask` objects and done by
:func:`measure_tile`, which opens the slide file itself when run in another process (local
workers or dask.distributed), so workers must see the slide at the same path.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .errors import InputError, SlideError
from .illumination import FlatField
from .settings import Settings
from .stains import StainModel, stain_od

__all__ = [
    "Tile",
    "TileTask",
    "TileResult",
    "SlidePlan",
    "plan_tiles",
    "prepare_slide",
    "tile_tasks",
    "measure_tile",
    "merge_tiles",
    "score_slide",
    "needs_tiling",
    "THUMBNAIL_PX",
    "OVERVIEW_PX",
]

#: longest side (px) of the low-resolution image used for background, stains and tissue
THUMBNAIL_PX = 4096
#: longest side (px) of the overview rasters kept for QC pictures
OVERVIEW_PX = 2000


# --------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Tile:
    """One tile of a slide, in level-0 pixel coordinates (half-open boxes ``x0, y0, x1, y1``).

    Attributes
    ----------
    index : int
        Position in the tile list (row-major).
    core : tuple of int
        The pixels this tile owns.
    read : tuple of int
        The region read: the core plus the overlap, clipped to the slide.
    """

    index: int
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    @property
    def read_shape(self) -> tuple[int, int]:
        """(rows, columns) of the region read."""
        return (self.read[3] - self.read[1], self.read[2] - self.read[0])


def plan_tiles(shape: tuple[int, int], *, tile_size: int, overlap: int) -> list[Tile]:
    """Cut an image of ``shape`` (rows, columns) into tiles.

    Parameters
    ----------
    shape : tuple of int
        Level-0 (height, width) in pixels.
    tile_size : int
        Edge of a tile's core in pixels (the last row/column of tiles may be smaller).
    overlap : int
        Context in pixels added on every side of the core (clipped at the image edge).

    Returns
    -------
    list of Tile
        Cores partition the image exactly (every pixel is owned by one tile).

    Notes
    -----
    Odd ``tile_size`` and ``overlap`` are rounded up to even numbers, so every tile origin is
    even: the engine rounds centroids half-to-even (``np.round``) in tile coordinates, and an
    even origin makes that rounding the same in every tile, so an object sitting exactly on a
    core boundary is owned by exactly one tile.
    """
    h, w = int(shape[0]), int(shape[1])
    if h <= 0 or w <= 0:
        raise InputError(f"cannot tile an empty image of shape {shape}")
    if tile_size < 1:
        raise InputError(f"tile size must be at least 1 pixel, got {tile_size}")
    tile_size = int(tile_size) + int(tile_size) % 2
    overlap = max(0, int(overlap))
    overlap += overlap % 2
    tiles = []
    for y0 in range(0, h, tile_size):
        for x0 in range(0, w, tile_size):
            x1, y1 = min(x0 + tile_size, w), min(y0 + tile_size, h)
            read = (max(0, x0 - overlap), max(0, y0 - overlap),
                    min(w, x1 + overlap), min(h, y1 + overlap))
            tiles.append(Tile(len(tiles), (x0, y0, x1, y1), read))
    return tiles


def overlap_px(settings: Settings, mpp: float | None) -> int:
    """Tile overlap in level-0 pixels: ``tiling.overlap_um`` at the (sizing) pixel size."""
    size_mpp = float(mpp) if mpp else float(settings.tiling.assumed_mpp_unknown)
    px = int(math.ceil(settings.tiling.overlap_um / size_mpp))
    return px + (px % 2)  # even: see plan_tiles


def tile_core_px(settings: Settings, mpp: float | None, tile_size: int | None = None) -> int:
    """Core edge (level-0 px, even) of the tiles of a slide.

    ``tile_size`` (default ``tiling.tile_size_px``), made smaller when the core plus the
    overlap on both sides would read more than ``tiling.max_tile_read_px`` pixels (memory is
    set by the region read; at 0.25 µm/px the overlap alone is 1,600 px across).
    """
    size = int(tile_size or settings.tiling.tile_size_px)
    cap_px = int(settings.tiling.max_tile_read_px)
    if cap_px > 0:
        edge = math.isqrt(cap_px) - 2 * overlap_px(settings, mpp)
        size = min(size, max(256, edge - edge % 16))
    return size + size % 2


def needs_tiling(shape: tuple[int, int], settings: Settings, *, bound_to_tile: bool = False,
                 mpp: float | None = None, tile_size: int | None = None) -> bool:
    """True when an image of ``shape`` should be scored in tiles.

    Parameters
    ----------
    shape : tuple of int
        Level-0 (rows, columns).
    settings : Settings
    bound_to_tile : bool
        Also tile images larger than the region one tile reads, ``(tile_size + 2 * overlap)²``
        pixels (overlap at ``mpp``): then no task holds more pixels than a tile, and memory per
        worker is the same for any input (the batch runner uses this; with two workers, two
        16-Mpx images scored whole at once peaked at 2.3 GB).
    mpp : float, optional
        Pixel size for the overlap (default: ``tiling.assumed_mpp_unknown``).
    tile_size : int, optional
        Core edge in pixels (default ``tiling.tile_size_px``).

    Returns
    -------
    bool
        True when the image exceeds ``tiling.max_whole_image_px`` (or, with
        ``bound_to_tile``, one tile's read region).
    """
    n = int(shape[0]) * int(shape[1])
    if n > int(settings.tiling.max_whole_image_px):
        return True
    if bound_to_tile:
        size = tile_core_px(settings, mpp, tile_size)
        edge = size + 2 * overlap_px(settings, mpp)
        return n > edge * edge
    return False


def _sample_index(start: int, stop: int, scale: float, n: int) -> np.ndarray:
    """Low-resolution index of level-0 pixels ``start..stop-1`` (nearest, clipped)."""
    idx = (np.arange(start, stop, dtype=np.float64) + 0.5) / scale
    return np.clip(idx.astype(np.int64), 0, n - 1)


def _overview_index(start: int, stop: int, ds: float) -> np.ndarray:
    """Overview pixels whose sample point ``floor((j + 0.5) * ds)`` lies in ``[start, stop)``."""
    lo = max(0, int(math.floor(start / ds - 0.5)) - 1)
    hi = int(math.ceil(stop / ds)) + 1
    j = np.arange(lo, hi, dtype=np.int64)
    s = np.floor((j + 0.5) * ds).astype(np.int64)
    return j[(s >= start) & (s < stop)]


# --------------------------------------------------------------------------------------
# plan, tasks and results


@dataclass
class SlidePlan:
    """Everything fixed per slide before tiles are measured (small; lives in the driver).

    Attributes
    ----------
    name, path : str
    shape : tuple of int
        Level-0 (rows, columns).
    mpp : float or None
        Pixel size used (None = unknown); ``mpp_source`` says where it came from.
    settings : Settings
    stain_model : StainModel
        Estimated once per slide from ``thumbnail``.
    tissue_lowres : ndarray of bool
        Tissue mask of the thumbnail; ``lowres_scale`` = (row, column) level-0 px per thumbnail px.
    exclusions : list of (N, 2) arrays
        Exclusion polygons in level-0 x, y.
    tiles : list of Tile
    overview_ds : float
        Level-0 px per overview px; ``overview_rgb`` is the slide at that scale.
    """

    name: str
    path: str | None
    shape: tuple[int, int]
    mpp: float | None
    mpp_source: str
    settings: Settings
    stain_model: StainModel
    tissue_lowres: np.ndarray
    lowres_scale: tuple[float, float]
    exclusions: list
    tiles: list[Tile]
    tiled: bool
    overview_ds: float
    overview_rgb: np.ndarray
    warnings: list[str] = field(default_factory=list)
    seconds_prepare: float = 0.0
    fmt: str = ""
    levels: int = 1
    fiber_levels: dict | None = None
    fiber_levels_from: dict | None = None
    #: the slide's illumination field, fitted on the thumbnail and applied to every pixel read
    flat_field: FlatField | None = None

    @property
    def overview_shape(self) -> tuple[int, int]:
        return self.overview_rgb.shape[:2]


@dataclass
class TileTask:
    """Picklable description of one tile's work (sent to worker processes)."""

    path: str | None
    mpp_override: float | None
    mpp: float | None
    settings: Settings
    stain_model: dict
    tile: Tile
    #: the thumbnail tissue mask under the tile's read region, bit-packed (np.packbits): a
    #: slide's tasks all wait in the driver, unpacked they took ~0.5 MB each
    tissue_crop_bits: np.ndarray
    tissue_crop_shape: tuple[int, int]
    tissue_crop_origin: tuple[int, int]          # (row, col) of the crop in the thumbnail
    lowres_scale: tuple[float, float]
    lowres_shape: tuple[int, int]
    exclusions: list
    whole: bool
    overview_ds: float
    fiber_class_column: str | None = None
    fiber_levels: dict | None = None
    flat_field: FlatField | None = None
    wall_ref_od: float | None = None

    def correct(self, rgb: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
        """``rgb`` (level-0 region at ``origin`` x, y) with the slide's flat field applied."""
        return rgb if self.flat_field is None else self.flat_field.apply(rgb, origin=origin)

    @property
    def tissue_crop(self) -> np.ndarray:
        """The thumbnail tissue mask under the tile's read region (bool, unpacked)."""
        h, w = self.tissue_crop_shape
        return np.unpackbits(self.tissue_crop_bits, count=h * w).reshape(h, w).view(bool)


@dataclass
class TileResult:
    """Objects and counts owned by one tile, plus its piece of the overview rasters."""

    index: int
    cells: pd.DataFrame
    fibers: pd.DataFrame
    counts: dict
    overview: dict               # name -> (rows idx, cols idx, array)
    warnings: list[str]
    seconds: float
    pixels: int


def _polys_in_box(polys: list, box: tuple[int, int, int, int]) -> list:
    x0, y0, x1, y1 = box
    out = []
    for p in polys:
        p = np.asarray(p, float)
        if len(p) and p[:, 0].max() >= x0 and p[:, 0].min() < x1 and \
                p[:, 1].max() >= y0 and p[:, 1].min() < y1:
            out.append(p)
    return out


def _load_exclusions(exclusions) -> list:
    if exclusions is None:
        return []
    if isinstance(exclusions, str | Path):
        from .tissue import load_exclusions

        return [np.asarray(p, float) for p in load_exclusions(exclusions)]
    if isinstance(exclusions, np.ndarray) and exclusions.dtype == bool:
        raise InputError("whole-slide scoring takes exclusions as polygons or a GeoJSON path, "
                         "not a pixel mask")
    return [np.asarray(p, float) for p in exclusions]


#: level-0 pixels of the slide read to compute its fiber statistics (whole slide up to this
#: size, else a fixed sample of windows): bounded memory in the driver
LEVELS_SAMPLE_PX = 16_000_000
#: edge of one sample window (µm) and the most windows taken
LEVELS_WINDOW_UM = 512.0
LEVELS_MAX_WINDOWS = 8


def _read_rgb(slide, path: str | None, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Level-0 region as contiguous uint8 RGB; decoder errors become a :class:`SlideError`
    naming the file and the region."""
    try:
        rgb = slide.read_region(x0, y0, w, h, level=0)
    except SlideError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors of every kind
        raise SlideError(path or "slide", f"cannot read region x={x0} y={y0} {w}x{h}: "
                         f"{type(exc).__name__}: {exc}") from None
    return np.ascontiguousarray(np.asarray(rgb)[..., :3])


def _lowres_bounds(box: tuple[int, int, int, int], scale: tuple[float, float],
                   shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of a low-resolution mask of ``shape`` that the level-0
    pixels of ``box`` (x0, y0, x1, y1) sample."""
    x0, y0, x1, y1 = box
    r0 = int(_sample_index(y0, y0 + 1, scale[0], shape[0])[0])
    r1 = int(_sample_index(y1 - 1, y1, scale[0], shape[0])[0]) + 1
    c0 = int(_sample_index(x0, x0 + 1, scale[1], shape[1])[0])
    c1 = int(_sample_index(x1 - 1, x1, scale[1], shape[1])[0]) + 1
    return r0, r1, c0, c1


def _region_tissue(mask: np.ndarray, scale: tuple[float, float],
                   box: tuple[int, int, int, int], *, shape: tuple[int, int] | None = None,
                   origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Low-resolution tissue mask sampled (nearest) at the level-0 pixels of ``box``.

    ``mask`` is the whole low-resolution mask, or a crop of it at ``origin`` (row, col) of a
    mask of ``shape``. Columns of the small mask first, then whole rows (np.take; ~15x
    faster than fancy indexing with np.ix_ on 8 Mpx)."""
    x0, y0, x1, y1 = box
    lh, lw = mask.shape if shape is None else shape
    ri = _sample_index(y0, y1, scale[0], lh) - origin[0]
    ci = _sample_index(x0, x1, scale[1], lw) - origin[1]
    return np.take(np.take(mask, ci, axis=1), ri, axis=0)


def _levels_windows(shape: tuple[int, int], mpp: float, tissue_lowres: np.ndarray,
                    scale: tuple[float, float]) -> list[tuple[int, int, int, int]]:
    """Level-0 boxes whose pixels give the slide's fiber statistics.

    The whole slide when it has at most ``LEVELS_SAMPLE_PX`` pixels; otherwise up to
    ``LEVELS_MAX_WINDOWS`` windows of ``LEVELS_WINDOW_UM`` on a grid anchored at the slide
    origin, taken evenly (in raster order) among the grid cells with at least half the
    tissue fraction of the fullest cell. The choice depends on the slide only, never on the
    tiling.
    """
    h, w = shape
    if h * w <= LEVELS_SAMPLE_PX:
        return [(0, 0, w, h)]
    edge = max(64, int(round(LEVELS_WINDOW_UM / mpp)))
    n_max = max(1, min(LEVELS_MAX_WINDOWS, LEVELS_SAMPLE_PX // (edge * edge)))
    cells, fracs = [], []
    for y0 in range(0, h, edge):
        for x0 in range(0, w, edge):
            box = (x0, y0, min(w, x0 + edge), min(h, y0 + edge))
            r0, r1, c0, c1 = _lowres_bounds(box, scale, tissue_lowres.shape)
            cells.append(box)
            fracs.append(float(tissue_lowres[r0:r1, c0:c1].mean()))
    fracs_a = np.asarray(fracs)
    if fracs_a.max() <= 0:
        return []
    good = [c for c, f in zip(cells, fracs_a, strict=True) if f >= 0.5 * fracs_a.max()]
    pick = np.unique(np.linspace(0, len(good) - 1, min(n_max, len(good))).round().astype(int))
    return [good[i] for i in pick]


def _slide_fiber_levels(slide, *, shape, mpp: float, model: StainModel,
                        tissue_lowres: np.ndarray, scale, exclusions: list,
                        settings: Settings, flat=None) -> tuple[dict | None, dict]:
    """Fiber statistics of the slide (:func:`biopsyquant.fibers.fiber_levels`), given to
    every tile so that fiber segmentation does not depend on the tiling; and, from fibers
    segmented on the same windows with them, the slide's non-fiber tissue OD that vessel walls
    are compared with (``source["wall_ref_od"]``, :func:`compartments.nonfiber_od_values`)."""
    from .compartments import nonfiber_od_values
    from .fibers import fiber_levels, segment_fibers
    from .score import _exclusion_mask

    boxes = _levels_windows(shape, mpp, tissue_lowres, scale)
    images, tissues = [], []
    for box in boxes:
        x0, y0, x1, y1 = box
        path = str(slide.path) if getattr(slide, "path", None) else None
        im = _read_rgb(slide, path, x0, y0, x1 - x0, y1 - y0)
        images.append(im if flat is None else flat.apply(im, origin=(x0, y0)))
        t = _region_tissue(tissue_lowres, scale, box)
        polys = _polys_in_box(exclusions, box)
        if polys:
            t = t & ~_exclusion_mask(polys, t.shape, (x0, y0))
        tissues.append(t)
    source = {"windows": [list(map(int, b)) for b in boxes],
              "pixels": int(sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes))}
    if not images:
        return None, source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lv = fiber_levels(images, mpp=mpp, model=model, tissues=tissues,
                          params=settings.fibers)
        if lv is not None:
            dab_name = "dab" if "dab" in model.names else model.names[1]
            vals = []
            for k in range(len(images)):
                im, t = images[k], tissues[k]
                images[k] = None  # windows are released as they are used
                lab = segment_fibers(im, mpp=mpp, model=model, tissue=t,
                                     params=settings.fibers, levels=lv)
                vals.append(nonfiber_od_values(
                    lab, t, mpp=mpp, hema_od=stain_od(im, model, "hematoxylin"),
                    dab_od=stain_od(im, model, dab_name), params=settings.compartments))
                del im, lab
            allv = np.concatenate(vals) if vals else np.zeros(0, np.float32)
            source["wall_ref_od"] = float(np.median(allv)) if allv.size else None
    return (lv.to_dict() if lv is not None else None), source


def prepare_slide(
    slide,
    *,
    settings: Settings,
    stain_model: StainModel | None = None,
    exclusions=None,
    name: str | None = None,
    tile_size: int | None = None,
    tiled: bool | None = None,
    thumbnail_px: int = THUMBNAIL_PX,
    overview_px: int = OVERVIEW_PX,
) -> SlidePlan:
    """Stain model, background, tissue mask and tile plan of one slide (thumbnail only).

    Parameters
    ----------
    slide : Slide
        An open slide (:func:`biopsyquant.slide.open_slide`).
    settings : Settings
    stain_model : StainModel, optional
        Fixed model; default: estimated from the thumbnail as ``score_image`` would.
    exclusions : list of (N, 2) arrays or GeoJSON path, optional
        Regions to exclude, level-0 x, y.
    name : str, optional
        Slide name (default: file stem).
    tile_size : int, optional
        Core edge in pixels (default ``settings.tiling.tile_size_px``).
    tiled : bool, optional
        Force tiling on/off; default: tile when the slide exceeds
        ``settings.tiling.max_whole_image_px``.
    thumbnail_px, overview_px : int
        Longest side of the low-resolution analysis image and of the QC overview.

    Returns
    -------
    SlidePlan
    """
    from .score import prepare_flat_field, prepare_stain_model
    from .tissue import detect_tissue

    t0 = time.perf_counter()
    shape = tuple(int(s) for s in slide.shape[:2])
    path = str(slide.path) if getattr(slide, "path", None) else None
    name = name or (Path(path).stem if path else "slide")
    mpp = slide.mpp
    warn_list: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thumb, _ds = slide.thumbnail(max_size=thumbnail_px)
        thumb = np.ascontiguousarray(thumb[..., :3])
        scale = (shape[0] / thumb.shape[0], shape[1] / thumb.shape[1])
        size_mpp = float(mpp) if mpp else float(settings.tiling.assumed_mpp_unknown)
        # uneven illumination: fitted on the thumbnail's glass in level-0 coordinates, then
        # applied to the thumbnail and to every region read (the same factor per pixel
        # whatever the tiling)
        flat = prepare_flat_field(thumb, settings, mpp=size_mpp * float(np.sqrt(scale[0] * scale[1])),
                                  stain_model=stain_model, shape=shape)
        thumb = flat.apply(thumb, scale=scale)
        model = prepare_stain_model(thumb, settings, stain_model=stain_model)
        tissue = detect_tissue(thumb, mpp=size_mpp * float(np.sqrt(scale[0] * scale[1])),
                               background=model.background, params=settings.tissue)
    for w in caught:
        if str(w.message) not in warn_list:
            warn_list.append(str(w.message))
    if mpp is None:
        warn_list.append(
            f"{name}: pixel size unknown; object sizes assumed at "
            f"{settings.tiling.assumed_mpp_unknown} µm/px and every µm / mm² / per-mm² value is "
            "missing (give --mpp to fix)")
    if tiled is None:
        tiled = needs_tiling(shape, settings)
    size = tile_core_px(settings, mpp, tile_size)
    if tiled:
        tiles = plan_tiles(shape, tile_size=size, overlap=overlap_px(settings, mpp))
    else:
        full = (0, 0, shape[1], shape[0])
        tiles = [Tile(0, full, full)]
    polys = _load_exclusions(exclusions)
    levels, levels_from = None, None
    # one piece: the piece's own statistics are the slide's (computed by segment_fibers)
    if settings.scoring.segment_fibers and tiled:
        levels, levels_from = _slide_fiber_levels(
            slide, shape=shape, mpp=size_mpp, model=model, tissue_lowres=np.asarray(tissue, bool),
            scale=scale, exclusions=polys, settings=settings,
            flat=flat)
    ods = max(1.0, max(shape) / float(overview_px))
    oshape = (max(1, int(round(shape[0] / ods))), max(1, int(round(shape[1] / ods))))
    import cv2

    overview = cv2.resize(thumb, (oshape[1], oshape[0]),
                          interpolation=cv2.INTER_AREA if oshape[0] < thumb.shape[0]
                          else cv2.INTER_LINEAR)
    return SlidePlan(
        name=name, path=path, shape=shape,
        mpp=mpp, mpp_source=slide.mpp_source, settings=settings, stain_model=model,
        tissue_lowres=np.asarray(tissue, bool), lowres_scale=scale,
        exclusions=polys, tiles=tiles, tiled=bool(tiled),
        overview_ds=float(ods), overview_rgb=overview, warnings=warn_list,
        seconds_prepare=time.perf_counter() - t0, fmt=str(getattr(slide, "format", "")),
        levels=len(getattr(slide, "levels", [None])),
        fiber_levels=levels, fiber_levels_from=levels_from, flat_field=flat)


def tile_tasks(plan: SlidePlan, *, mpp_override: float | None = None) -> list[TileTask]:
    """One :class:`TileTask` per tile of ``plan`` (each carries only its crop of the tissue)."""
    lh, lw = plan.tissue_lowres.shape
    model = plan.stain_model.to_dict()
    model["vectors"] = [list(map(float, r)) for r in plan.stain_model.vectors]
    model["background"] = list(plan.stain_model.background)
    fiber_class = _fiber_class_column(plan.settings)
    tasks = []
    for t in plan.tiles:
        r0, r1, c0, c1 = _lowres_bounds(t.read, plan.lowres_scale, (lh, lw))
        tasks.append(TileTask(
            path=plan.path, mpp_override=mpp_override, mpp=plan.mpp, settings=plan.settings, stain_model=model,
            tile=t, tissue_crop_bits=np.packbits(plan.tissue_lowres[r0:r1, c0:c1], axis=None),
            tissue_crop_shape=(r1 - r0, c1 - c0),
            tissue_crop_origin=(r0, c0), lowres_scale=plan.lowres_scale,
            lowres_shape=(lh, lw), exclusions=_polys_in_box(plan.exclusions, t.read),
            whole=not plan.tiled, overview_ds=plan.overview_ds, fiber_class_column=fiber_class,
            fiber_levels=plan.fiber_levels, flat_field=plan.flat_field,
            wall_ref_od=(plan.fiber_levels_from or {}).get("wall_ref_od")))
    return tasks


def _fiber_class_column(settings: Settings) -> str | None:
    return "mhc_grade" if settings.analysis == "mhc" else None


# --------------------------------------------------------------------------------------
# tile measurement (runs in workers)

_SLIDES: OrderedDict[tuple, Any] = OrderedDict()


def _open_cached(path: str, mpp_override: float | None):
    """Open a slide once per process (small LRU), for worker processes."""
    from .slide import open_slide

    key = (path, mpp_override, os.getpid())
    slide = _SLIDES.get(key)
    if slide is None:
        slide = open_slide(path, mpp=mpp_override)
        _SLIDES[key] = slide
        while len(_SLIDES) > 4:
            _, old = _SLIDES.popitem(last=False)
            close = getattr(old, "close", None)
            if close:
                try:
                    close()
                except Exception:  # noqa: BLE001 - best effort
                    pass
    else:
        _SLIDES.move_to_end(key)
    return slide


def _shift_coordinates(df: pd.DataFrame, origin: tuple[int, int], mpp: float | None
                       ) -> pd.DataFrame:
    """Move image-coordinate columns (``*x_px``, ``*y_px``, ``*x_um``, ``*y_um``) to level 0."""
    if not len(df.columns):
        return df
    ox, oy = origin
    df = df.copy()
    for col in df.columns:
        c = str(col)
        if c.endswith("x_px") and not c.endswith("_dx_px"):
            df[col] = df[col] + ox
        elif c.endswith("y_px") and not c.endswith("_dy_px"):
            df[col] = df[col] + oy
        elif mpp and c.endswith("x_um") and c[:-2] + "px" not in df.columns:
            df[col] = df[col] + ox * mpp
        elif mpp and c.endswith("y_um") and c[:-2] + "px" not in df.columns:
            df[col] = df[col] + oy * mpp
    for axis in ("x", "y"):  # recompute µm positions from level-0 px
        for col in list(df.columns):
            c = str(col)
            if c.endswith(f"{axis}_px") and c[:-2] + "um" in df.columns:
                df[c[:-2] + "um"] = df[col] * mpp if mpp else np.nan
    return df


def _centroid_columns(df: pd.DataFrame) -> tuple[str, str] | None:
    for cx, cy in (("x_px", "y_px"), ("centroid_x_px", "centroid_y_px")):
        if cx in df.columns and cy in df.columns:
            return cx, cy
    return None


def _owned_mask(df: pd.DataFrame, core: tuple[int, int, int, int], origin: tuple[int, int],
                what: str) -> np.ndarray:
    """Rows whose centroid pixel (``np.round`` of the tile coordinates) lies in ``core``."""
    if not len(df):
        return np.zeros(0, bool)
    cols = _centroid_columns(df)
    if cols is None:
        raise InputError(f"{what} table has no centroid columns (x_px, y_px); cannot tile")
    x = np.round(df[cols[0]].to_numpy(float)) + origin[0]
    y = np.round(df[cols[1]].to_numpy(float)) + origin[1]
    x0, y0, x1, y1 = core
    return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def _overview_pieces(task: TileTask, labels: dict, fibers: pd.DataFrame) -> dict:
    """Sample the tile's label images at the overview grid over its core."""
    ds = task.overview_ds
    x0, y0, x1, y1 = task.tile.core
    rx0, ry0, rx1, ry1 = task.tile.read
    rows = _overview_index(y0, y1, ds)
    cols = _overview_index(x0, x1, ds)
    if not len(rows) or not len(cols):
        return {}
    # sample the read region at the overview grid (one extra pixel around for edges)
    rows_r = _overview_index(ry0, ry1, ds)
    cols_r = _overview_index(rx0, rx1, ds)
    sy = np.floor((rows_r + 0.5) * ds).astype(np.int64) - ry0
    sx = np.floor((cols_r + 0.5) * ds).astype(np.int64) - rx0
    ir = np.searchsorted(rows_r, rows)
    ic = np.searchsorted(cols_r, cols)
    out: dict[str, Any] = {}
    lab = labels.get("fibers")
    if lab is not None:
        samp = lab[sy][:, sx]
        edge = np.zeros(samp.shape, bool)
        dv = samp[:-1] != samp[1:]
        dh = samp[:, :-1] != samp[:, 1:]
        edge[:-1] |= dv
        edge[1:] |= dv
        edge[:, :-1] |= dh
        edge[:, 1:] |= dh
        edge &= samp > 0
        code = (samp > 0).astype(np.uint8)
        col = task.fiber_class_column
        if col and col in fibers.columns and "fiber_id" in fibers.columns and len(fibers):
            lut = np.zeros(int(max(lab.max(), fibers["fiber_id"].max())) + 1, np.uint8)
            vals = pd.to_numeric(fibers[col], errors="coerce").fillna(-1).to_numpy()
            ids = fibers["fiber_id"].to_numpy(np.int64)
            lut[ids] = np.clip(vals + 2, 1, 250).astype(np.uint8)  # 1 = fiber, no class
            lut[0] = 0
            code = lut[samp]
        out["fiber_code"] = (rows, cols, code[np.ix_(ir, ic)])
        out["fiber_edge"] = (rows, cols, edge[np.ix_(ir, ic)])
    for key in ("dab_class", "tissue", "excluded"):
        arr = labels.get(key)
        if arr is not None and arr.shape == task.tile.read_shape:
            out[key] = (rows, cols, np.asarray(arr)[np.ix_(sy[ir], sx[ic])])
    return out


#: edge (px) of the patch measured for a tile without tissue (see _empty_tile)
_EMPTY_PATCH_PX = 64


#: crop offsets inside a tile's read region are multiples of this (keeps the working grids of
#: fibers / compartments, which downsample by integer factors, aligned with the uncropped read)
_CROP_ALIGN = 16


def _tissue_box(tissue: np.ndarray, task: TileTask, margin: int
                ) -> tuple[int, int, int, int] | None:
    """Box (x0, y0, x1, y1, read-region coordinates) of the tissue and exclusions of a tile's
    read region grown by ``margin`` px, or None when it would keep most of the region."""
    h, w = tissue.shape
    rows = np.flatnonzero(tissue.any(axis=1))
    cols = np.flatnonzero(tissue.any(axis=0))
    if not len(rows):
        return None
    bx0, bx1 = int(cols[0]), int(cols[-1]) + 1
    by0, by1 = int(rows[0]), int(rows[-1]) + 1
    rx0, ry0 = task.tile.read[0], task.tile.read[1]
    for p in task.exclusions or []:  # exclusions are drawn where they are, tissue or not
        p = np.asarray(p, float)
        bx0 = min(bx0, int(np.floor(p[:, 0].min())) - rx0)
        bx1 = max(bx1, int(np.ceil(p[:, 0].max())) + 1 - rx0)
        by0 = min(by0, int(np.floor(p[:, 1].min())) - ry0)
        by1 = max(by1, int(np.ceil(p[:, 1].max())) + 1 - ry0)
    a = _CROP_ALIGN
    bx0 = max(0, (bx0 - margin) // a * a)
    by0 = max(0, (by0 - margin) // a * a)
    bx1 = min(w, bx1 + margin)
    by1 = min(h, by1 + margin)
    if bx1 <= bx0 or by1 <= by0 or (bx1 - bx0) * (by1 - by0) > 0.9 * h * w:
        return None
    return bx0, by0, bx1, by1


def _skip_empty(task: TileTask, tissue: np.ndarray) -> bool:
    """True for a tile of a tiled slide with no tissue and no exclusion in its read region."""
    return not task.whole and not task.exclusions and not tissue.any()


def _empty_tile(task: TileTask, slide, t0: float) -> TileResult:
    """Result of a tile with no tissue in its whole read region (and no exclusions).

    Every analysis works inside the analysed tissue only, so such a tile owns no object and
    adds zero to every count. A small patch of it is still measured (tissue mask all false)
    so that the counts carry the analysis' keys and the warnings are those of the full path,
    without reading, segmenting and scoring millions of glass pixels.
    """
    from .score import measure_image

    x0, y0, x1, y1 = task.tile.read
    ph, pw = min(_EMPTY_PATCH_PX, y1 - y0), min(_EMPTY_PATCH_PX, x1 - x0)
    rgb = task.correct(_read_rgb(slide, task.path, x0, y0, pw, ph), (x0, y0))
    warn_list: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ctx, meas, fibers, base = measure_image(
            rgb, settings=task.settings, stain_model=StainModel.from_dict(task.stain_model),
            mpp=task.mpp, tissue=np.zeros((ph, pw), bool), origin=(x0, y0), keep_labels=False)
    for wmsg in caught:
        if str(wmsg.message) not in warn_list:
            warn_list.append(str(wmsg.message))
    shape = task.tile.read_shape
    labels = {"fibers": np.zeros(shape, np.int32), "tissue": np.zeros(shape, bool),
              "excluded": np.zeros(shape, bool)}
    if "dab_class" in meas.labels:
        labels["dab_class"] = np.zeros(shape, np.uint8)
    overview = _overview_pieces(task, labels, fibers.iloc[:0])
    cells = meas.cells if meas.cells is not None else pd.DataFrame()
    cells = _shift_coordinates(cells.iloc[:0].reset_index(drop=True), (x0, y0), task.mpp)
    fibers = _shift_coordinates(fibers.iloc[:0].reset_index(drop=True), (x0, y0), task.mpp)
    counts = {**base, **meas.counts}
    return TileResult(index=task.tile.index, cells=cells, fibers=fibers, counts=counts,
                      overview=overview, warnings=warn_list,
                      seconds=time.perf_counter() - t0, pixels=0)


def measure_tile(task: TileTask, *, slide=None) -> TileResult:
    """Measure one tile: read, score with the slide's model, keep what the core owns.

    Parameters
    ----------
    task : TileTask
    slide : Slide, optional
        Open slide (default: opened from ``task.path`` once per process).

    Returns
    -------
    TileResult
        Cells and fibers whose centroid lies in the core (level-0 coordinates), additive
        counts over the core's pixels, and overview raster pieces.
    """
    from .score import measure_image

    t0 = time.perf_counter()
    if slide is None:
        if task.path is None:
            raise InputError("a tile task without a slide path needs an open slide")
        slide = _open_cached(task.path, task.mpp_override)
    x0, y0, x1, y1 = task.tile.read
    h, w = y1 - y0, x1 - x0
    tissue = _region_tissue(task.tissue_crop, task.lowres_scale, task.tile.read,
                            shape=task.lowres_shape, origin=task.tissue_crop_origin)
    if _skip_empty(task, tissue):
        return _empty_tile(task, slide, t0)
    # analyse only the part of the read region within the overlap distance of tissue or an
    # exclusion: farther glass holds no object, adds nothing to any count and is no context
    # for anything on tissue (every step's reach is below the overlap)
    rx0, ry0 = x0, y0
    cb = None if task.whole else _tissue_box(tissue, task, overlap_px(task.settings, task.mpp))
    if cb is not None:
        bx0, by0, bx1, by1 = cb
        tissue = tissue[by0:by1, bx0:bx1]
        x0, y0, w, h = rx0 + bx0, ry0 + by0, bx1 - bx0, by1 - by0
    rgb = task.correct(_read_rgb(slide, task.path, x0, y0, w, h), (x0, y0))
    model = StainModel.from_dict(task.stain_model)
    cx0, cy0, cx1, cy1 = task.tile.core
    if task.whole:
        own = None
    else:
        own = np.zeros((h, w), bool)
        own[max(cy0 - y0, 0):max(cy1 - y0, 0), max(cx0 - x0, 0):max(cx1 - x0, 0)] = True
    warn_list: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ctx, meas, fibers, base = measure_image(
            rgb, settings=task.settings, stain_model=model, mpp=task.mpp,
            exclusions=task.exclusions or None, tissue=tissue, own=own, origin=(x0, y0),
            keep_labels=True, fiber_levels=task.fiber_levels, wall_ref_od=task.wall_ref_od)
    for wmsg in caught:
        if str(wmsg.message) not in warn_list:
            warn_list.append(str(wmsg.message))
    labels = meas.labels
    if cb is not None:  # the overview samples the whole read region: pad the crop back
        labels = {}
        for key in ("fibers", "dab_class", "tissue", "excluded"):
            arr = meas.labels.get(key)
            if arr is not None:
                full = np.zeros(task.tile.read_shape, arr.dtype)
                full[by0:by1, bx0:bx1] = arr
                labels[key] = full
    overview = _overview_pieces(task, labels, fibers)
    cells = meas.cells if meas.cells is not None else pd.DataFrame()
    if not task.whole:
        cells = cells.loc[_owned_mask(cells, task.tile.core, (x0, y0), "cell")]
        keep = _owned_mask(fibers, task.tile.core, (x0, y0), "fiber")
        if len(cells) and "fiber_id" in cells.columns and "fiber_id" in fibers.columns:
            # a cell next to a fiber owned by a neighbouring tile: remember where that fiber
            # is (level-0 centroid) so the merge can find its slide-wide id
            foreign = fibers.loc[~keep, ["fiber_id", "x_px", "y_px"]].set_index("fiber_id")
            fid = pd.to_numeric(cells["fiber_id"], errors="coerce")
            cells = cells.copy()
            cells["_fiber_x"] = fid.map(foreign["x_px"]) + x0
            cells["_fiber_y"] = fid.map(foreign["y_px"]) + y0
        fibers = fibers.loc[keep]
    cells = _shift_coordinates(cells.reset_index(drop=True), (x0, y0), task.mpp)
    fibers = _shift_coordinates(fibers.reset_index(drop=True), (x0, y0), task.mpp)
    counts = {**base, **meas.counts}
    return TileResult(index=task.tile.index, cells=cells, fibers=fibers, counts=counts,
                      overview=overview, warnings=warn_list,
                      seconds=time.perf_counter() - t0, pixels=h * w)


# --------------------------------------------------------------------------------------
# merge


def _add_counts(total: dict, counts: dict) -> None:
    for k, v in counts.items():
        if k in total:
            total[k] = total[k] + (np.asarray(v) if isinstance(v, list | tuple) else v)
        else:
            total[k] = np.asarray(v).copy() if isinstance(v, list | tuple | np.ndarray) else v


def _renumber(results: list[TileResult], tolerance_px: float
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate tile tables with slide-wide ids.

    Fiber ids become 1..N in tile order and cells follow their fiber: to the fiber's new id
    when the same tile owns it, else to the owned fiber whose centroid lies within
    ``tolerance_px`` of where this tile saw it (0 = none found). ``cell_id`` becomes 1..M.
    """
    fib_parts, cell_parts = [], []
    offset = 0
    for r in results:
        f, c = r.fibers, r.cells
        if "fiber_id" in f.columns and len(f):
            old = f["fiber_id"].to_numpy(np.int64)
            mapping = pd.Series(np.arange(offset + 1, offset + 1 + len(f)), index=old)
            f = f.copy()
            f["fiber_id"] = mapping.to_numpy()
            offset += len(f)
        else:
            mapping = pd.Series(dtype=np.int64)
        if "fiber_id" in c.columns and len(c):
            c = c.copy()
            ids = pd.to_numeric(c["fiber_id"], errors="coerce").fillna(0).astype(np.int64)
            new = ids.map(mapping)
            new[ids <= 0] = 0
            c["fiber_id"] = new.fillna(-1).astype(np.int64)  # -1: resolved below
        if len(f):
            fib_parts.append(f)
        if len(c):
            cell_parts.append(c)
    fibers = pd.concat(fib_parts, ignore_index=True) if fib_parts else (
        results[0].fibers.iloc[:0] if results else pd.DataFrame())
    cells = pd.concat(cell_parts, ignore_index=True) if cell_parts else (
        results[0].cells.iloc[:0] if results else pd.DataFrame())
    if "fiber_id" in cells.columns and len(cells):
        todo = (cells["fiber_id"] < 0).to_numpy()
        if todo.any():
            ids = np.zeros(int(todo.sum()), np.int64)
            if len(fibers) and "_fiber_x" in cells.columns:
                from scipy.spatial import cKDTree

                tree = cKDTree(fibers[["x_px", "y_px"]].to_numpy(float))
                pts = cells.loc[todo, ["_fiber_x", "_fiber_y"]].to_numpy(float)
                ok = np.isfinite(pts).all(axis=1)
                if ok.any():
                    d, j = tree.query(pts[ok])
                    found = d <= tolerance_px
                    sub = np.zeros(int(ok.sum()), np.int64)
                    sub[found] = fibers["fiber_id"].to_numpy(np.int64)[j[found]]
                    ids[ok] = sub
            cells.loc[todo, "fiber_id"] = ids
    cells = cells.drop(columns=[c for c in ("_fiber_x", "_fiber_y") if c in cells.columns])
    if "cell_id" in cells.columns and len(cells):
        cells["cell_id"] = np.arange(1, len(cells) + 1, dtype=np.int64)
    return cells, fibers


def _assemble_overview(plan: SlidePlan, results: list[TileResult]) -> dict[str, np.ndarray]:
    oh, ow = plan.overview_shape
    out: dict[str, np.ndarray] = {}
    for r in results:
        for key, (rows, cols, arr) in r.overview.items():
            if key not in out:
                out[key] = np.zeros((oh, ow), arr.dtype)
            rr = rows[rows < oh]
            cc = cols[cols < ow]
            out[key][np.ix_(rr, cc)] = arr[:len(rr), :len(cc)]
    out["rgb"] = plan.overview_rgb
    if "tissue" not in out:
        import cv2

        out["tissue"] = cv2.resize(plan.tissue_lowres.astype(np.uint8), (ow, oh),
                                   interpolation=cv2.INTER_NEAREST).astype(bool)
    return out


def merge_tiles(plan: SlidePlan, results: Iterable[TileResult], *, seconds: float | None = None):
    """Combine tile results of one slide into a :class:`~biopsyquant.score.ScoreResult`.

    Counts are summed, object tables concatenated (fiber ids renumbered 1..N slide-wide) and
    :func:`biopsyquant.score.summarize` runs once over the totals.
    """
    from .score import ScoreResult, summarize

    t0 = time.perf_counter()
    results = sorted(results, key=lambda r: r.index)
    if len(results) != len(plan.tiles):
        raise InputError(f"{plan.name}: {len(results)} tile results for {len(plan.tiles)} tiles")
    counts: dict = {}
    warn_list = list(plan.warnings)
    for r in results:
        _add_counts(counts, r.counts)
        for w in r.warnings:
            if w not in warn_list:
                warn_list.append(w)
    size_mpp = float(plan.mpp) if plan.mpp else float(plan.settings.tiling.assumed_mpp_unknown)
    cells, fibers = _renumber(results, tolerance_px=3.0 / size_mpp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = summarize(cells=cells, fibers=fibers, counts=counts, mpp=plan.mpp,
                            settings=plan.settings)
    for w in caught:
        if str(w.message) not in warn_list:
            warn_list.append(str(w.message))
    summary = {"slide": plan.name, "marker": plan.settings.marker, "mpp": plan.mpp,
               "mpp_source": plan.mpp_source,
               "flat_field_max_pct": round(plan.flat_field.max_correction_pct(), 3)
               if plan.flat_field is not None else 0.0, **summary}
    tile_seconds = [r.seconds for r in results]
    provenance = {
        "biopsyquant_version": __version__,
        "settings_digest": plan.settings.digest(),
        "stain_model": plan.stain_model.to_dict(),
        "stain_model_from": {"image": "thumbnail", "shape": list(plan.tissue_lowres.shape),
                             "downsample": [round(s, 4) for s in plan.lowres_scale]},
        "illumination": plan.flat_field.to_dict() if plan.flat_field is not None else None,
        "fiber_levels": plan.fiber_levels,
        "fiber_levels_from": plan.fiber_levels_from,
        "mpp": plan.mpp,
        "mpp_source": plan.mpp_source,
        "path": plan.path,
        "shape": list(plan.shape),
        "format": plan.fmt,
        "levels": plan.levels,
        "tiling": {"tiled": plan.tiled, "n_tiles": len(plan.tiles),
                   "tile_size_px": (plan.tiles[0].core[2] - plan.tiles[0].core[0])
                   if plan.tiles else None,
                   "overlap_px": overlap_px(plan.settings, plan.mpp) if plan.tiled else 0,
                   "ownership": "objects by centroid in the tile core; pixels by core"},
        "seconds": {"prepare": round(plan.seconds_prepare, 4),
                    "tiles_sum": round(float(np.sum(tile_seconds)), 4),
                    "tile_max": round(float(np.max(tile_seconds)), 4) if tile_seconds else 0.0,
                    "merge": round(time.perf_counter() - t0, 4),
                    **({"total": round(seconds, 4)} if seconds is not None else {})},
        "od_units": "log10 optical density relative to the measured background",
        "overview_downsample": round(plan.overview_ds, 4),
        "counts": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                   for k, v in counts.items()},
    }
    labels = {f"overview_{k}": v for k, v in _assemble_overview(plan, results).items()}
    return ScoreResult(name=plan.name, marker=plan.settings.marker, summary=summary,
                       cells=cells, fibers=fibers, labels=labels, settings=plan.settings,
                       stain_model=plan.stain_model, mpp=plan.mpp, mpp_source=plan.mpp_source,
                       warnings=warn_list, provenance=provenance)


# --------------------------------------------------------------------------------------
# one-call API


def score_slide(
    slide,
    *,
    settings: Settings | None = None,
    marker: str | None = None,
    mpp: float | None = None,
    stain_model: StainModel | None = None,
    exclusions=None,
    name: str | None = None,
    tile_size: int | None = None,
    tiled: bool | None = None,
    map_tiles: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
):
    """Score a slide (any size) with bounded memory; tiles when it is large.

    Parameters
    ----------
    slide : Slide, str or Path
        An open slide or a file path (opened with :func:`~biopsyquant.slide.open_slide`).
    settings : Settings, optional
        Analysis settings; default: the preset of ``marker``.
    marker : str, optional
        Marker preset name, when ``settings`` is not given.
    mpp : float, optional
        Pixel size override in µm/px (source ``user``) when opening from a path.
    stain_model : StainModel, optional
        Fixed stain model; default: estimated once from the slide's thumbnail.
    exclusions : list of (N, 2) arrays or GeoJSON path, optional
        Exclusion polygons in level-0 pixel x, y.
    name : str, optional
        Slide name.
    tile_size : int, optional
        Core edge in pixels (default ``settings.tiling.tile_size_px``).
    tiled : bool, optional
        Force tiling (True) or one piece (False); default by ``tiling.max_whole_image_px``.
    map_tiles : callable, optional
        ``map_tiles(measure_tile, tasks)`` returning an iterable of TileResult (e.g. a process
        pool's ``map``); default: tiles one after the other in this process.
    progress : callable, optional
        Called as ``progress(done, total)`` after each tile.

    Returns
    -------
    ScoreResult
        As from :func:`~biopsyquant.score.score_image`; ``labels`` holds downsampled
        ``overview_*`` rasters instead of full-resolution label images.
    """
    from .settings import load_settings

    t0 = time.perf_counter()
    if settings is None:
        if marker is None:
            raise InputError("score_slide needs a marker (e.g. 'CD163') or settings")
        settings = load_settings(marker)
    if isinstance(slide, str | Path):
        from .slide import open_slide

        slide = open_slide(slide, mpp=mpp)
    plan = prepare_slide(slide, settings=settings, stain_model=stain_model,
                         exclusions=exclusions, name=name, tile_size=tile_size, tiled=tiled)
    tasks = tile_tasks(plan, mpp_override=mpp)
    results = []
    if map_tiles is None:
        it: Iterable[TileResult] = (measure_tile(t, slide=slide) for t in tasks)
    else:
        it = map_tiles(measure_tile, tasks)
    for i, r in enumerate(it, 1):
        results.append(r)
        if progress is not None:
            progress(i, len(tasks))
    return merge_tiles(plan, results, seconds=time.perf_counter() - t0)
