"""Score one image: the engine behind the CLI, the batch runner and the napari plugin.

The pipeline of :func:`score_image` is

1. pixel size (user > file > unknown) and stain model (given > user vectors > per-image
   estimate > preset), background from the image's glass;
2. hematoxylin and DAB OD maps (log10, background-relative);
3. tissue mask minus exclusions = analysed area;
4. fibers and the compartment map (every marker: they give "per 100 fibers",
   compartments, fibers vs interstitium);
5. the marker's analysis (``cells``, ``mhc`` or ``pixels``) in two halves:
   ``measure(ctx) -> Measurements`` (objects and *additive* pixel counts of the pixels this
   image or tile owns) and ``summarize(...) -> dict`` (densities, percentages, grades from
   totals). Whole-slide scoring (:mod:`biopsyquant.wsi`) calls ``measure`` per tile and
   ``summarize`` once, so tiled and whole results agree.
"""

from __future__ import annotations

import importlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .errors import InputError
from .settings import Settings, load_settings
from .stains import StainModel, preset, stain_od

__all__ = [
    "ImageContext",
    "Measurements",
    "ScoreResult",
    "prepare_stain_model",
    "measure_image",
    "summarize",
    "score_image",
    "ANALYSES",
]

#: analysis kind -> module providing ``measure(ctx)`` and ``summarize(...)``
ANALYSES = {"cells": "biopsyquant.cells", "mhc": "biopsyquant.mhc", "pixels": "biopsyquant.pixels"}

COMPARTMENT_NAMES = {0: "outside", 1: "fiber", 2: "endomysium", 3: "perimysium", 4: "vessel",
                     5: "perivascular"}


@dataclass
class ImageContext:
    """Everything an analysis needs about one image or tile (arrays share one shape).

    Attributes
    ----------
    rgb : ndarray of uint8, (H, W, 3)
    mpp : float or None
        True pixel size in µm/px (None = unknown).
    size_mpp : float
        Pixel size used to convert µm sizes of parameters to pixels (``mpp`` or the assumed
        value when unknown).
    stain_model : StainModel
    hema_od, dab_od : ndarray of float32, (H, W)
        Stain concentrations, log10 OD relative to the background.
    tissue : ndarray of bool
        Tissue (before exclusions).
    excluded : ndarray of bool
        User exclusion regions.
    analysed : ndarray of bool
        ``tissue & ~excluded``.
    own : ndarray of bool or None
        Pixels this tile owns (None = the whole image). Pixel counts must be restricted to
        ``own``; objects are kept by the owner of their centroid (done by the caller).
    fibers : ndarray of int32
        Fiber labels (0 = none).
    fiber_table : DataFrame
        One row per fiber (``fibers.fiber_table``).
    compartments : ndarray of uint8
        Compartment codes (see docs/architecture.md).
    settings : Settings
    origin : tuple of int
        (x, y) of this image's top-left pixel in level-0 slide coordinates.
    """

    rgb: np.ndarray
    mpp: float | None
    size_mpp: float
    stain_model: StainModel
    hema_od: np.ndarray
    dab_od: np.ndarray
    tissue: np.ndarray
    excluded: np.ndarray
    analysed: np.ndarray
    fibers: np.ndarray
    fiber_table: pd.DataFrame
    compartments: np.ndarray
    settings: Settings
    own: np.ndarray | None = None
    origin: tuple[int, int] = (0, 0)

    @property
    def analysed_own(self) -> np.ndarray:
        """Analysed pixels that this image/tile owns (use for additive pixel counts)."""
        return self.analysed if self.own is None else (self.analysed & self.own)


@dataclass
class Measurements:
    """Output of ``measure``: objects in image pixel coordinates plus additive counts.

    Attributes
    ----------
    cells : DataFrame
        One row per detected cell; must have ``x_px``, ``y_px`` (image coordinates).
    fibers : DataFrame
        Per-fiber columns keyed by ``fiber_id`` (merged into the fiber table).
    counts : dict
        Additive numbers (pixel counts, OD sums ...) over owned pixels only.
    labels : dict
        Label / class images for display (whole-image scoring only).
    """

    cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    fibers: pd.DataFrame = field(default_factory=pd.DataFrame)
    counts: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)


@dataclass
class ScoreResult:
    """Result of scoring one image or slide with one marker preset (see docs/outputs.md)."""

    name: str
    marker: str
    summary: dict
    cells: pd.DataFrame
    fibers: pd.DataFrame
    labels: dict[str, np.ndarray]
    settings: Settings
    stain_model: StainModel
    mpp: float | None
    mpp_source: str
    warnings: list[str]
    provenance: dict
    counts: dict = field(default_factory=dict)
    """Additive totals (pixel counts, OD sums) behind the summary; lets callers re-summarize
    after corrections (napari) or after summing tiles (whole slides)."""

    def __repr__(self) -> str:  # keep reprs short: labels are large
        return (f"ScoreResult(name={self.name!r}, marker={self.marker!r}, "
                f"cells={len(self.cells)}, fibers={len(self.fibers)}, summary={self.summary!r})")


def _analysis_module(kind: str):
    try:
        return importlib.import_module(ANALYSES[kind])
    except KeyError:
        raise InputError(f"unknown analysis {kind!r}; expected one of {sorted(ANALYSES)}") from None


def prepare_stain_model(rgb: np.ndarray, settings: Settings, *, stain_model: StainModel | None = None,
                        tissue: np.ndarray | None = None) -> StainModel:
    """Stain model for an image: given > user vectors > per-image estimate > preset.

    The background (glass intensity) is estimated from ``rgb`` unless the settings or the
    given model fix it.
    """
    from . import stains

    if stain_model is not None:
        return stain_model
    sp = settings.stains
    base = preset(sp.preset)
    background = tuple(sp.background) if sp.background else None
    if background is None and hasattr(stains, "estimate_background"):
        background = tuple(stains.estimate_background(rgb, tissue_mask=tissue))
    if sp.vectors:
        model = StainModel(base.names, np.asarray(sp.vectors, float),
                           background or base.background, "user")
    elif sp.estimate and hasattr(stains, "estimate_stains"):
        model = stains.estimate_stains(rgb, base=sp.preset, tissue_mask=tissue,
                                       background=background,
                                       confident_od=sp.confident_od,
                                       min_confident_pixels=sp.min_confident_pixels)
    else:
        model = base if background is None else base.with_background(background)
    return model


def prepare_flat_field(rgb: np.ndarray, settings: Settings, *, mpp: float | None,
                       stain_model: StainModel | None = None,
                       shape: tuple[int, int] | None = None):
    """Illumination field of an image or slide thumbnail (:mod:`biopsyquant.illumination`).

    Not fitted (an identity field, reason recorded) when the background is fixed by a given
    stain model or ``stains.background``: a fixed background was measured on the uncorrected
    slide. ``mpp`` is the pixel size of ``rgb``; ``shape`` the level-0 shape it covers.
    """
    from .illumination import fit_flat_field, identity

    full = shape or rgb.shape[:2]
    if stain_model is not None or settings.stains.background:
        return identity(full, "not fitted: the background is fixed (stain model or "
                              "stains.background)")
    size_mpp = float(mpp) if mpp else float(settings.tiling.assumed_mpp_unknown)
    return fit_flat_field(rgb, mpp=size_mpp, params=settings.illumination, shape=full,
                          tissue_params=settings.tissue)


def _exclusion_mask(exclusions, shape: tuple[int, int], origin: tuple[int, int]) -> np.ndarray:
    if exclusions is None:
        return np.zeros(shape, bool)
    if isinstance(exclusions, np.ndarray) and exclusions.dtype == bool:
        if exclusions.shape != shape:
            raise InputError(f"exclusion mask has shape {exclusions.shape}, image has {shape}")
        return exclusions
    from .tissue import load_exclusions, rasterize_polygons

    if isinstance(exclusions, str | Path):
        exclusions = load_exclusions(exclusions)
    return rasterize_polygons(list(exclusions), shape, offset=origin)


def measure_image(
    rgb: np.ndarray,
    *,
    settings: Settings,
    stain_model: StainModel,
    mpp: float | None,
    exclusions=None,
    tissue: np.ndarray | None = None,
    own: np.ndarray | None = None,
    origin: tuple[int, int] = (0, 0),
    keep_labels: bool = True,
    fiber_levels=None,
    wall_ref_od: float | None = None,
) -> tuple[ImageContext, Measurements, pd.DataFrame, dict]:
    """Run steps 2–5 (``measure`` half) on one image or tile.

    ``fiber_levels`` (a :class:`~biopsyquant.fibers.FiberLevels` or its dict) are the slide's
    fiber statistics given to every tile of a tiled slide, and ``wall_ref_od`` its non-fiber
    tissue OD that vessel walls are compared with; default: this image's own.

    Returns
    -------
    ctx : ImageContext
    measurements : Measurements
    fibers : DataFrame
        Fiber table merged with the analysis' per-fiber columns (image coordinates).
    base_counts : dict
        Additive pixel counts over owned pixels: tissue, analysed, excluded, per compartment.
    """
    from .compartments import compartment_map
    from .fibers import FiberLevels, fiber_table, segment_fibers
    from .tissue import detect_tissue

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"image must be uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    size_mpp = float(mpp) if mpp else float(settings.tiling.assumed_mpp_unknown)
    shape = rgb.shape[:2]
    # the two stains used, each by the fused one-stain kernel (bit-identical to the channels
    # of deconvolve, without its (H, W, 3) float32 image and the two copies)
    hema = stain_od(rgb, stain_model, "hematoxylin")
    dab_name = "dab" if "dab" in stain_model.names else stain_model.names[1]
    dab = stain_od(rgb, stain_model, dab_name)
    if tissue is None:
        tissue = detect_tissue(rgb, mpp=size_mpp, background=stain_model.background,
                               params=settings.tissue)
    excluded = _exclusion_mask(exclusions, shape, origin)
    analysed = tissue & ~excluded
    if settings.scoring.segment_fibers:
        if isinstance(fiber_levels, dict):
            fiber_levels = FiberLevels.from_dict(fiber_levels)
        fibers = segment_fibers(rgb, mpp=size_mpp, model=stain_model, tissue=analysed,
                                params=settings.fibers, levels=fiber_levels)
        compartments = compartment_map(fibers, analysed, mpp=size_mpp, hema_od=hema,
                                       dab_od=dab, rgb=rgb, params=settings.compartments,
                                       wall_ref_od=wall_ref_od)
    else:  # non-muscle tissue: everything analysed is one "interstitial" compartment
        fibers = np.zeros(shape, np.int32)
        compartments = np.where(analysed, np.uint8(2), np.uint8(0))
    ftab = fiber_table(fibers, mpp=mpp, hema_od=hema, tissue=tissue, exclusion=excluded,
                       compartments=compartments if settings.scoring.segment_fibers else None,
                       params=settings.fibers)
    ctx = ImageContext(rgb=rgb, mpp=mpp, size_mpp=size_mpp, stain_model=stain_model,
                       hema_od=hema, dab_od=dab, tissue=tissue, excluded=excluded,
                       analysed=analysed, fibers=fibers, fiber_table=ftab,
                       compartments=compartments, settings=settings, own=own, origin=origin)
    module = _analysis_module(settings.analysis)
    meas: Measurements = module.measure(ctx)
    fib = ftab
    if len(meas.fibers) and "fiber_id" in meas.fibers:
        fib = ftab.merge(meas.fibers, on="fiber_id", how="left")
    o = np.ones(shape, bool) if own is None else own
    base = {
        "tissue_px": int(np.count_nonzero(tissue & o)),
        "analysed_px": int(np.count_nonzero(analysed & o)),
        "excluded_px": int(np.count_nonzero(tissue & excluded & o)),
    }
    codes = np.bincount(compartments[o].ravel(), minlength=6)
    for code, cname in COMPARTMENT_NAMES.items():
        if code:
            base[f"{cname}_px"] = int(codes[code])
    if keep_labels:
        meas.labels = {"tissue": tissue, "excluded": excluded, "fibers": fibers,
                       "compartments": compartments, **meas.labels}
    return ctx, meas, fib, base


def summarize(
    *,
    cells: pd.DataFrame,
    fibers: pd.DataFrame,
    counts: dict,
    mpp: float | None,
    settings: Settings,
) -> dict:
    """Slide summary from whole-slide totals (common columns + the analysis' columns)."""
    px_mm2 = (mpp * 1e-3) ** 2 if mpp else float("nan")
    n_fibers = int(len(fibers))
    if n_fibers and "touches_edge" in fibers:
        n_complete = int((~fibers["touches_edge"].astype(bool)).sum())
    else:
        n_complete = n_fibers
    summary: dict[str, Any] = {
        "tissue_area_mm2": counts.get("tissue_px", 0) * px_mm2,
        "analysed_area_mm2": counts.get("analysed_px", 0) * px_mm2,
        "excluded_area_mm2": counts.get("excluded_px", 0) * px_mm2,
        "n_fibers": n_fibers,
        "n_fibers_complete": n_complete,
    }
    for code, cname in COMPARTMENT_NAMES.items():
        if code:
            summary[f"area_mm2_{cname}"] = counts.get(f"{cname}_px", 0) * px_mm2
    module = _analysis_module(settings.analysis)
    summary.update(module.summarize(cells=cells, fibers=fibers, counts=counts, mpp=mpp,
                                    settings=settings, areas_mm2=dict(summary)))
    return summary


def _load_image(image, mpp: float | None, name: str | None):
    """Return (rgb, mpp, mpp_source, name, path) for an array, a Slide or a path."""
    if isinstance(image, np.ndarray):
        if mpp is not None:
            return image, float(mpp), "user", name or "image", None
        return image, None, "unknown", name or "image", None
    from .slide import Slide, open_slide

    if isinstance(image, Slide):
        slide = image
        rgb = slide.read_level(0)
    else:
        with open_slide(image, mpp=mpp) as slide:
            rgb = slide.read_level(0)
    return rgb, slide.mpp, slide.mpp_source, name or Path(str(slide.path)).stem, slide.path


def score_image(
    image,
    *,
    marker: str | None = None,
    settings: Settings | None = None,
    mpp: float | None = None,
    stain_model: StainModel | None = None,
    exclusions=None,
    tissue: np.ndarray | None = None,
    name: str | None = None,
) -> ScoreResult:
    """Score one image with a marker preset.

    Parameters
    ----------
    image : ndarray of uint8 (H, W, 3), Slide, str or Path
        The image, an open slide (level 0 is read whole) or a file path.
    marker : str, optional
        Marker preset (``"CD163"``, ``"Ki67"``, ``"MHC-I"``, ``"IL-1a"``, ``"IL-1b"``,
        ``"IL-1Ra"``). Required unless ``settings`` is given.
    settings : Settings, optional
        Full settings (from :func:`~biopsyquant.settings.load_settings`); default: the
        marker's preset.
    mpp : float, optional
        Pixel size in µm/px; overrides the file's (source ``user``). Without it, an array's
        pixel size is unknown and physical outputs are missing (NaN) with a warning.
    stain_model : StainModel, optional
        Fixed stain vectors and background (e.g. estimated once per slide or batch).
    exclusions : list of (N, 2) arrays, GeoJSON path, or bool mask, optional
        Regions to exclude (polygons in level-0 pixel x, y).
    tissue : ndarray of bool, optional
        Tissue mask; detected when omitted.
    name : str, optional
        Name recorded in the result.

    Returns
    -------
    ScoreResult
    """
    t0 = time.perf_counter()
    if settings is None:
        if marker is None:
            raise InputError("score_image needs a marker (e.g. 'CD163') or settings")
        settings = load_settings(marker)
    elif marker is not None and load_settings(marker).marker != settings.marker:
        raise InputError(f"marker {marker!r} differs from the settings' marker {settings.marker!r}")
    rgb, mpp_val, mpp_source, name, path = _load_image(image, mpp, name)
    warn_list: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flat = prepare_flat_field(rgb, settings, mpp=mpp_val, stain_model=stain_model)
        rgb = flat.apply(rgb)
        model = prepare_stain_model(rgb, settings, stain_model=stain_model, tissue=tissue)
        t1 = time.perf_counter()
        ctx, meas, fibers, base = measure_image(
            rgb, settings=settings, stain_model=model, mpp=mpp_val, exclusions=exclusions,
            tissue=tissue)
        counts = {**base, **meas.counts}
        summary = summarize(cells=meas.cells, fibers=fibers, counts=counts, mpp=mpp_val,
                            settings=settings)
    for w in caught:
        if not issubclass(w.category, UserWarning):
            continue  # resource / deprecation noise is not a finding about the slide
        msg = str(w.message)
        if msg not in warn_list:
            warn_list.append(msg)
    if mpp_val is None:
        warn_list.append(
            f"{name}: pixel size unknown; object sizes assumed at "
            f"{settings.tiling.assumed_mpp_unknown} µm/px and every µm / mm² / per-mm² value is "
            "missing (give --mpp to fix)")
    t2 = time.perf_counter()
    summary = {"slide": name, "marker": settings.marker, "mpp": mpp_val, "mpp_source": mpp_source,
               "flat_field_max_pct": round(flat.max_correction_pct(), 3), **summary}
    provenance = {
        "biopsyquant_version": __version__,
        "settings_digest": settings.digest(),
        "stain_model": model.to_dict(),
        "illumination": flat.to_dict(),
        "mpp": mpp_val,
        "mpp_source": mpp_source,
        "path": str(path) if path else None,
        "shape": list(rgb.shape[:2]),
        "seconds": {"stains": round(t1 - t0, 4), "measure": round(t2 - t1, 4),
                    "total": round(t2 - t0, 4)},
        "od_units": "log10 optical density relative to the measured background",
    }
    return ScoreResult(name=name, marker=settings.marker, summary=summary, cells=meas.cells,
                       fibers=fibers, labels=meas.labels, settings=settings, stain_model=model,
                       mpp=mpp_val, mpp_source=mpp_source, warnings=warn_list,
                       provenance=provenance, counts=counts)
