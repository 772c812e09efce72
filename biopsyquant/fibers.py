"""Muscle fiber segmentation and per-fiber morphometry on brightfield cross-sections.

Fibers are the large, smooth, evenly stained regions of a transverse muscle section; they are
separated by thin endomysium (1-5 µm), nuclei, capillaries, DAB-stained sarcolemmal rims
(MHC class I) or white cracks, and grouped into fascicles by wider perimysium. The same
classical pipeline works for H-DAB immunohistochemistry and for H&E:

1. work at a reduced resolution (``FiberParams.working_mpp_um``, default 1 µm/px);
2. total optical density (log10, relative to the slide background) and its thin structures:
   lines narrower than ``endomysium_um`` that are darker *or* paler than their surroundings
   (endomysium, nuclei, DAB rims, cracks) form the boundary map;
3. fiber cores = tissue that is neither boundary nor much paler than the typical fiber; holes
   up to nucleus size (internal nuclei) are filled;
4. touching cores are split by a marker watershed on the distance transform (h-maxima
   markers), over-split blobs are merged back when their shared border is as wide as the
   smaller part;
5. cores grow to the fiber edge by a watershed on edge strength (at most ``grow_um``), competing
   with a background seed on glass, pale tissue and the centre lines of the boundaries (so the
   endomysium stays non-fiber); objects implausible as fibers (too small, too large, too thin,
   ring-shaped vessel walls, ragged, mostly grown rather than core) are dropped and the labels
   are scaled up to the input resolution.

All sizes are in µm and converted with the image's microns-per-pixel ``mpp``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold

from ._fiber_props import FIBER_COLUMNS
from ._watershed import watershed
from .errors import InputError, MppUnknownError
from .stains import PRESETS, StainModel, estimate_background
from .stains import _check_rgb as _check_rgb_stains

__all__ = [
    "FiberParams",
    "FiberLevels",
    "fiber_levels",
    "segment_fibers",
    "fiber_table",
    "FIBER_COLUMNS",
    "fiber_od_images",
]



@dataclass(frozen=True)
class FiberParams:
    """Settings of fiber segmentation and the fiber table (all sizes in µm).

    Parameters
    ----------
    min_diameter_um : float
        Smallest fiber kept (equivalent diameter, µm). Atrophic fibers are 10-30 µm.
    max_diameter_um : float
        Largest fiber kept (equivalent diameter, µm).
    working_mpp_um : float
        Internal working resolution (µm/px). Images finer than this are reduced to it with area
        averaging; the labels are scaled back to the input grid.
    smoothing_um : float
        Gaussian σ (µm) applied to the optical density before analysis.
    endomysium_um : float
        Widest line (µm) still detected as a thin boundary (endomysium, rims, cracks).
    boundary_contrast : float
        A thin line is a boundary only where its optical density differs from the surroundings
        by more than this fraction of the fiber-to-glass OD difference ...
    boundary_min_od : float
        ... and by at least this many OD units (log10). 0.02 (0.03 before): the faint
        endomysium between pale, tightly packed fibers stays a boundary (it merged fibers).
    boundary_noise : float
        ... and where its relative contrast exceeds this many times the image's median line
        response (the fiber grain): the strong threshold of a hysteresis.
    boundary_weak : float
        Weak hysteresis threshold as a fraction of ``boundary_noise``: faint stretches of a line
        count when connected to a clear part.
    pale_line_weight : float
        Weight of lines paler than their surroundings (cracks, H&E endomysium) relative to
        darker lines (hematoxylin endomysium, nuclei, DAB rims).
    pale_line_free_fraction : float
        A crack is pale on every stain; the gap between two DAB granules of a fiber is pale
        only on the total OD. With DAB (outside counterstain mode) a pale line whose contrast
        on the DAB-free OD is below this fraction of its total-OD contrast is DAB texture and
        not a boundary (0 disables the test). Default 0 (off): 0.3 lifts the IL-1 grid (e.g.
        IL-1Ra seed 12 at expression 0.5, F1 0.931 -> 0.974) but its outlines expose a
        tile-dependent vessel decision in ``compartments`` (wall OD against the median of
        the piece being mapped), so whole-slide and tiled results differed; see
        docs/_parts/fibers-validation.md, "granular DAB".
    pale_line_patch_gap_um : float
        ... except within this distance (µm) of a DAB patch: beside a DAB-filled fiber or a
        sarcolemmal DAB rim the endomysium is pale on the total OD only (4 µm; at 0-3 µm the
        MHC-I outlines moved into the rim and % positive fell by up to 3 points).
    line_smoothing_um : float
        Gaussian σ (µm) applied to the line responses.
    min_core_fraction : float
        A fiber must consist of at least this fraction of core (boundary-free) pixels; pieces
        of connective tissue are mostly grown pixels.
    min_inscribed_fraction : float
        A fiber's largest inscribed disk must be at least this fraction of
        ``min_diameter_um`` (drops thin slivers).
    pale_fraction : float
        Pixels closer than this fraction of the way from the brightest pixels (glass, or pale
        interstitium in a field without glass) to the typical fiber are not fiber.
    texture_max : float
        Pixels whose local OD standard deviation (over ``texture_um``) is below half this
        fraction of the tissue OD estimate the typical fiber OD.
    texture_um : float
        Gaussian σ (µm) of that local texture window.
    hole_max_area_um2 : float
        Holes inside a fiber up to this area (µm²) are filled (internal nuclei, vacuoles).
    split_depth_um : float
        Touching blobs are split when each part is at least this much "deeper" (distance to the
        border, µm) than the neck between them (h of the h-maxima markers).
    merge_neck_ratio : float
        Two adjacent parts are merged back when their shared border is at least this fraction
        of the smaller part's inscribed diameter (0.9; 0.75 before merged real neighbours whose
        endomysium is only partly detected).
    min_solidity : float
        Fibers are convex-ish: objects with area / convex-hull area below this are dropped.
    max_hole_fraction : float
        Objects whose filled area exceeds their area by more than this fraction enclose a lumen
        (vessel walls, rings) and are dropped.
    grow_um : float
        Cores grow towards the fiber edge by at most this distance (µm); growth also stops at
        the strongest edge and at the centre line of a boundary.
    interstitium_ratio : float
        Connective tissue carries more counterstain than sarcoplasm: pixels whose DAB-free OD,
        smoothed over ``interstitium_smoothing_um``, exceeds this multiple of the typical fiber
        level are interstitium and never fiber core (0 disables the rule).
    interstitium_smoothing_um : float
        Gaussian σ (µm) of that smoothing.
    interstitium_local_um : float
        Uneven illumination or a darker region of the section lifts the fibers' OD there; when
        this is > 0 the interstitium rule compares with a local fiber level, the mean DAB-free
        OD of the fiber-core pixels (those that pass the rule with the global level) under a
        Gaussian window of this σ (µm), wherever that exceeds the global level by more than
        ``interstitium_local_margin`` (never lower than the global level); 0 disables it.
        Default 50 µm (since the pipeline-level round 2, together with ``boundary_min_od``
        0.02 and ``merge_neck_ratio`` 0.9; see docs/_parts/fibers-validation.md).
    interstitium_local_margin : float
        Factor by which the local fiber level must exceed the global one to be used (the
        level used is local level / margin).
    dab_patch_od : float
        DAB OD (log10, smoothed over ``dab_patch_smoothing_um``) above which an area is a DAB
        patch (granular sarcoplasmic DAB, a DAB-filled fiber): inside it, lines of the total and
        the DAB-free OD are ignored and only hematoxylin lines separate fibers, so DAB granules
        neither cut a fiber nor count as interstitium (0 disables the rule).
    dab_patch_smoothing_um : float
        Gaussian σ (µm) of the DAB map for ``dab_patch_od``.
    dab_granule_um : float
        Inside DAB patches the hematoxylin lines still separate fibers, but granular
        sarcoplasmic DAB leaks into the unmixed hematoxylin (stain-vector error, JPEG chroma)
        and draws false lines through the fiber along its granules. A hematoxylin line is
        ignored where the DAB (smoothed over ``smoothing_um``) is darker than its mean under a
        Gaussian window of this σ (µm), i.e. on a granule; the endomysium between two stained
        fibers lies in a DAB valley and is kept (0 disables the rule). Default 2 µm (see
        docs/_parts/fibers-validation.md, "granular DAB").
    dab_granule_inset_um : float
        The granule test applies only this far (µm) inside a DAB patch, so that the
        sarcolemmal DAB rim at a patch edge (MHC-I) keeps the endomysium line beside it.
    dab_counterstain_fraction : float
        When DAB patches cover more than this fraction of the tissue, the "DAB" acts as a
        counterstain (nearly every fiber stained, or an H&E image read with an H-DAB model):
        the DAB-specific rules are switched off and the total OD is used throughout, except
        that a pixel carrying most of the typical fiber's DAB-free OD is never "pale" (an
        unstained fiber among DAB-filled ones).
    counterstain_free_lines : bool
        In counterstain mode, look for dark boundary lines (endomysium) on the DAB-free OD
        instead of the total OD: the DAB-dark rim of a DAB-filled fiber (sarcolemmal MHC-I)
        is then not taken for the endomysium, so the fiber is no longer outlined inside its
        rim. Default True (see docs/_parts/fibers-validation.md, "counterstain mode: boundary
        lines on the DAB-free OD").
    counterstain_interstitium_ratio : float
        In counterstain mode, pixels whose DAB-free OD (``interstitium_smoothing_um`` blur)
        exceeds this multiple of the local typical fiber level on that OD, and whose DAB is
        below half a stained fiber's, are connective tissue, not fiber core: a DAB-filled fiber
        alone in loose perimysium no longer grows into it (0 = off; the rule of
        ``interstitium_ratio`` for counterstain mode). H&E read with the H-DAB model is not
        affected (its "DAB" is eosin, high on connective tissue too).
    isolated_max_area_um2 : float
        Loose connective tissue (retracted perimysium) can pass every pixel rule and come out
        as small "fibers": an object smaller than this (µm²) whose mean DAB-free OD is below
        ``isolated_pale_ratio`` × the typical fiber level AND that touches other fibers along
        less than ``isolated_max_contact`` of a ring ``endomysium_um`` wide around it is
        dropped as connective tissue (0 disables the rule). Fibers are packed in fascicles; a
        small, pale object with (almost) no fiber neighbour is perimysium. A small fiber with
        neighbours, or one as dark as the fibers, is kept. Off in counterstain mode (the
        DAB-free OD of an unstained fiber among DAB-filled ones is not comparable there).
        Default 600 µm² (see docs/_parts/fibers-validation.md, "isolated pale objects").
    isolated_pale_ratio : float
        See ``isolated_max_area_um2`` (fraction of the image's or slide's fiber level).
    isolated_max_contact : float
        See ``isolated_max_area_um2`` (fraction of the ring's pixels that belong to other
        fibers).
    small_fiber_max_um : float
        Small-fiber pass (atrophic fibers, 10-30 µm): a fiber about as wide as the line
        detector's reach that lies in widened endomysium is covered by the endomysium lines
        around it and never gets a core. Islands of the DAB-free OD at most
        ``small_fiber_contrast`` x the connective tissue around them (a grey closing over this
        width, µm) that no fiber covers are added as fibers when they pass the tests below
        (0 disables the pass; off in counterstain mode and without DAB, where connective
        tissue is not darker than fibers on the map used). Default 30 µm (see
        docs/_parts/fibers-validation.md, "small fibers").
    small_fiber_contrast : float
        See ``small_fiber_max_um`` (fraction of the surrounding OD).
    small_fiber_min_solidity : float
        Solidity an island needs (stricter than ``min_solidity``: pieces of loose perimysium
        are ragged).
    small_fiber_open_um : float
        Radius (µm) of the opening that detaches islands from the thin pale margins of
        neighbouring fibers.
    small_fiber_ring_um : float
        Width (µm) of the ring around an island that must be connective tissue ...
    small_fiber_ring_fraction : float
        ... on at least this fraction of its pixels: OD at least ``small_fiber_ring_contrast``
        x the island's and at least interstitium (``interstitium_ratio`` x the fiber level).
    small_fiber_ring_contrast : float
        See ``small_fiber_ring_fraction``.
    small_fiber_ring_min_contrast : float
        ... and three quarters of the ring at least this multiple of the island's OD.
    small_fiber_min_level, small_fiber_max_level : float
        An island's mean DAB-free OD must lie between these multiples of the typical fiber's
        (lumina, tears and glass are paler, connective tissue darker).
    small_fiber_max_texture : float
        Largest standard deviation of the island's DAB-free OD as a fraction of its mean
        (sarcoplasm is smooth, loose perimysium fibrous).
    small_fiber_neighbour_um, small_fiber_min_neighbour_fraction : float
        An island must lie among fibers: at least this fraction of a ring this wide (µm)
        around it is fiber (smooth patches of the perimysium lie away from fibers).
    small_fiber_min_inscribed_fraction : float
        The island's largest inscribed disk must be at least this fraction of
        ``min_diameter_um`` (0.5: atrophic fibers are often flattened).
    nucleus_min_od : float
        Hematoxylin OD (log10) above which a pixel belongs to a nucleus (fiber table).
    nucleus_min_area_um2, nucleus_max_area_um2 : float
        Area range (µm²) of one nucleus; larger blobs count as several nuclei of
        ``nucleus_typical_area_um2`` each.
    nucleus_typical_area_um2 : float
        Typical myonucleus area (µm²).
    internal_nucleus_depth_um : float
        A nucleus is internal when its centre lies deeper than this (µm) inside the fiber.
    edge_distance_um : float
        A fiber "touches the edge" when it comes this close (µm) to non-tissue or the image
        border, and "touches an exclusion" when this close to an excluded region.
    """

    min_diameter_um: float = 10.0
    max_diameter_um: float = 150.0
    working_mpp_um: float = 1.0
    smoothing_um: float = 0.8
    endomysium_um: float = 6.0
    boundary_contrast: float = 0.1
    boundary_min_od: float = 0.02
    boundary_noise: float = 4.0
    boundary_weak: float = 0.6
    pale_line_weight: float = 1.0
    min_core_fraction: float = 0.5
    min_inscribed_fraction: float = 0.8
    line_smoothing_um: float = 1.0
    pale_fraction: float = 0.45
    texture_max: float = 0.35
    texture_um: float = 2.0
    hole_max_area_um2: float = 150.0
    split_depth_um: float = 3.5
    merge_neck_ratio: float = 0.9
    small_fiber_max_um: float = 30.0
    small_fiber_contrast: float = 0.5
    small_fiber_min_solidity: float = 0.9
    small_fiber_open_um: float = 2.0
    small_fiber_ring_um: float = 3.0
    small_fiber_ring_fraction: float = 0.6
    small_fiber_ring_contrast: float = 1.25
    small_fiber_ring_min_contrast: float = 1.2
    small_fiber_min_level: float = 0.8
    small_fiber_max_level: float = 2.0
    small_fiber_max_texture: float = 0.3
    small_fiber_neighbour_um: float = 10.0
    small_fiber_min_neighbour_fraction: float = 0.05
    small_fiber_min_inscribed_fraction: float = 0.5
    min_solidity: float = 0.75
    max_hole_fraction: float = 0.15
    grow_um: float = 4.0
    interstitium_ratio: float = 1.55
    interstitium_smoothing_um: float = 1.5
    interstitium_local_um: float = 50.0
    interstitium_local_margin: float = 1.1
    dab_patch_od: float = 0.25
    dab_patch_smoothing_um: float = 2.0
    dab_counterstain_fraction: float = 0.5
    dab_granule_um: float = 2.0
    dab_granule_inset_um: float = 2.0
    counterstain_free_lines: bool = True
    counterstain_interstitium_ratio: float = 1.55
    pale_line_free_fraction: float = 0.0
    pale_line_patch_gap_um: float = 4.0
    isolated_max_area_um2: float = 600.0
    isolated_pale_ratio: float = 0.9
    isolated_max_contact: float = 0.15
    nucleus_min_od: float = 0.25
    nucleus_min_area_um2: float = 8.0
    nucleus_max_area_um2: float = 120.0
    nucleus_typical_area_um2: float = 40.0
    internal_nucleus_depth_um: float = 4.0
    edge_distance_um: float = 2.0

    def __post_init__(self) -> None:
        for name in ("min_diameter_um", "max_diameter_um", "working_mpp_um", "endomysium_um",
                     "hole_max_area_um2", "nucleus_typical_area_um2",
                     "interstitium_local_margin"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise InputError(f"FiberParams.{name} must be a positive number, got {v!r}")
        if self.max_diameter_um <= self.min_diameter_um:
            raise InputError(
                f"FiberParams.max_diameter_um ({self.max_diameter_um}) must exceed "
                f"min_diameter_um ({self.min_diameter_um})"
            )
        for name in ("pale_fraction", "min_solidity", "merge_neck_ratio"):
            v = getattr(self, name)
            if not (0 <= v <= 1.5):
                raise InputError(f"FiberParams.{name} must be between 0 and 1, got {v!r}")
        for name in ("smoothing_um", "boundary_contrast", "boundary_min_od", "texture_max",
                     "texture_um", "split_depth_um", "max_hole_fraction", "grow_um",
                     "nucleus_min_od", "nucleus_min_area_um2", "nucleus_max_area_um2",
                     "internal_nucleus_depth_um", "edge_distance_um", "interstitium_ratio",
                     "interstitium_smoothing_um", "interstitium_local_um", "dab_patch_od",
                     "dab_patch_smoothing_um", "dab_granule_um", "dab_granule_inset_um",
                     "pale_line_free_fraction", "pale_line_patch_gap_um",
                     "dab_counterstain_fraction", "isolated_max_area_um2",
                     "isolated_pale_ratio", "isolated_max_contact",
                     "counterstain_interstitium_ratio", "small_fiber_max_um",
                     "small_fiber_contrast", "small_fiber_min_solidity", "small_fiber_open_um",
                     "small_fiber_ring_um", "small_fiber_ring_fraction",
                     "small_fiber_ring_contrast", "small_fiber_ring_min_contrast",
                     "small_fiber_min_level", "small_fiber_max_level",
                     "small_fiber_max_texture", "small_fiber_min_inscribed_fraction",
                     "small_fiber_neighbour_um", "small_fiber_min_neighbour_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise InputError(f"FiberParams.{name} must be a number >= 0, got {v!r}")


# --------------------------------------------------------------------------- helpers


def _check_rgb(rgb) -> np.ndarray:
    rgb = _check_rgb_stains(rgb)
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise InputError(f"`rgb` is too small to segment fibers: shape {rgb.shape}")
    return rgb


def _check_mpp(mpp, shape, params: FiberParams) -> float:
    if mpp is None:
        raise MppUnknownError(
            "segment_fibers needs the pixel size: pass mpp= (µm per pixel); fiber sizes are "
            "set in µm. If it is unknown, give an assumed value and treat areas as relative."
        )
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"mpp must be a number of µm per pixel, got {mpp!r}") from None
    if not math.isfinite(mpp) or mpp <= 0:
        raise InputError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    min_px = params.min_diameter_um / mpp
    if min_px < 4:
        raise InputError(
            f"mpp={mpp:g} µm/px makes the smallest fiber (min_diameter_um="
            f"{params.min_diameter_um:g} µm) only {min_px:.1f} px across; fibers cannot be "
            "segmented below ~4 px. Check the pixel size (0.1-2 µm/px for 10x-40x scans) "
            "or use a finer pyramid level."
        )
    if min_px > max(shape):
        raise InputError(
            f"mpp={mpp:g} µm/px makes the smallest fiber (min_diameter_um="
            f"{params.min_diameter_um:g} µm) {min_px:.0f} px across, larger than the whole "
            f"image ({shape[1]}x{shape[0]} px). Check the pixel size."
        )
    return mpp


_MIN_DEFAULT_BACKGROUND = 235.0


def _estimate_background(rgb: np.ndarray) -> tuple[float, float, float]:
    """Glass intensity per channel (``stains.estimate_background``); scanner white when the
    field shows no glass (a field inside the tissue)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bg = estimate_background(rgb)
    if any(issubclass(w.category, UserWarning) for w in caught):
        return (255.0, 255.0, 255.0)
    return bg


def _downsample(img: np.ndarray, factor: float) -> np.ndarray:
    if factor <= 1.0:
        return img
    h, w = img.shape[:2]
    nh, nw = max(1, int(round(h / factor))), max(1, int(round(w / factor)))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)


#: counterstain mode: pixels whose DAB-free OD reaches this fraction of the way from the palest
#: pixels to the typical fiber's are never "pale" (unstained fibers among DAB-filled ones)
_UNSTAINED_FRACTION = 0.7

#: statistics of the working image use at most this many pixels (a regular raster sample)
_STAT_SAMPLE = 1 << 18


def _sample(img: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Values of ``img`` (where ``mask``) on a regular sub-grid of at most ~_STAT_SAMPLE px."""
    step = max(1, int(math.sqrt(img.size / _STAT_SAMPLE)))
    sub = img[::step, ::step]
    return sub[mask[::step, ::step]] if mask is not None else sub.ravel()


def _upsample_labels(lab: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour scaling of a label image to ``shape`` (pixel-centre aligned)."""
    if lab.shape == tuple(shape):
        return lab
    h, w = shape
    sh, sw = lab.shape
    if h % sh == 0 and w % sw == 0 and h // sh == w // sw:  # integer factor: exact and fast
        return cv2.resize(lab.astype(np.int32, copy=False), (w, h),
                          interpolation=cv2.INTER_NEAREST_EXACT)
    ri = np.minimum(((np.arange(h) + 0.5) * (sh / h)).astype(np.intp), sh - 1)
    ci = np.minimum(((np.arange(w) + 0.5) * (sw / w)).astype(np.intp), sw - 1)
    return lab[ri[:, None], ci[None, :]]


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _gauss(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.1:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px,
                            borderType=cv2.BORDER_REFLECT)


def fiber_od_images(rgb: np.ndarray, model: StainModel
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optical density images used for fiber segmentation (log10, relative to background).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    model : StainModel
        Background and stain vectors (the first stain is the counterstain; a ``"dab"`` stain,
        if present, is removed from ``counter``).

    Returns
    -------
    total : ndarray of float32, shape (H, W)
        Sum of the three channel ODs.
    counter : ndarray of float32, shape (H, W)
        ``total`` without the DAB contribution (equals ``total`` for models without DAB).
    hema : ndarray of float32, shape (H, W)
        Counterstain (first stain) concentration, by least-squares unmixing of the first two
        stains only (stable even when the model's third vector is nearly parallel to them).
    """
    v = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    bg = np.asarray(model.background, dtype=np.float64)[:, None]
    luts = np.maximum(-np.log10(v[None, :] / bg), 0.0)  # (3, 256)

    def mix(weights) -> np.ndarray:
        out = np.take((luts[0] * weights[0]).astype(np.float32), rgb[..., 0])
        out += np.take((luts[1] * weights[1]).astype(np.float32), rgb[..., 1])
        out += np.take((luts[2] * weights[2]).astype(np.float32), rgb[..., 2])
        return out

    total = mix((1.0, 1.0, 1.0))
    d = model.index("dab") if "dab" in model.names else 1
    other = 0 if d != 0 else 1
    pinv = np.linalg.pinv(np.vstack([model.vectors[other], model.vectors[d]]))  # (3, 2)
    hema = mix(pinv[:, 0])
    np.maximum(hema, 0, out=hema)
    if "dab" not in model.names:
        return total, total, hema
    dab = mix(pinv[:, 1])
    np.maximum(dab, 0, out=dab)
    counter = total - dab * np.float32(model.vectors[d].sum())
    np.maximum(counter, 0, out=counter)
    return total, counter, hema


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    inv = (~mask).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (area <= max_area_px) & ~border
    fill[0] = False
    return mask | fill[lab]


def _blur_large(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with a large σ (px), computed on a grid ~σ/8 coarser and interpolated."""
    f = max(1, int(sigma_px // 8))
    if f == 1:
        return _gauss(img, sigma_px)
    h, w = img.shape
    small = cv2.resize(img, (max(1, -(-w // f)), max(1, -(-h // f))),
                       interpolation=cv2.INTER_AREA)
    small = _gauss(small, sigma_px * small.shape[0] / h)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _local_fiber_level(od: np.ndarray, fiber: np.ndarray, level: float, sigma_px: float,
                       margin: float) -> float | np.ndarray:
    """Fiber level for the interstitium rule: the global ``level``, raised to the local mean of
    ``od`` over ``fiber`` pixels (Gaussian window σ ``sigma_px``) divided by ``margin`` where
    that is higher (uneven illumination, darker regions). Bounded by construction: ``fiber``
    holds only pixels below the rule's threshold."""
    if sigma_px <= 0 or not fiber.any():
        return level
    m = fiber.astype(np.float32)
    num = _blur_large(od * m, sigma_px)
    den = _blur_large(m, sigma_px)
    local = np.where(den > 0.05, num / np.maximum(den, np.float32(1e-6)), np.float32(level))
    return np.maximum(np.float32(level), local / np.float32(margin))


def _merge_oversplit(lab: np.ndarray, dist: np.ndarray, ratio: float) -> np.ndarray:
    """Merge adjacent labels whose shared border is wide relative to the smaller one."""
    n = int(lab.max())
    if n < 2 or ratio <= 0:
        return lab
    pairs = []
    for a, b in ((lab[:, :-1], lab[:, 1:]), (lab[:-1, :], lab[1:, :])):
        m = (a != b) & (a > 0) & (b > 0)
        if m.any():
            pa, pb = a[m].astype(np.int64), b[m].astype(np.int64)
            pairs.append(np.minimum(pa, pb) * (n + 1) + np.maximum(pa, pb))
    if not pairs:
        return lab
    keys, counts = np.unique(np.concatenate(pairs), return_counts=True)
    rmax = np.zeros(n + 1, np.float64)
    np.maximum.at(rmax, lab.ravel(), dist.ravel().astype(np.float64))
    a = keys // (n + 1)
    b = keys % (n + 1)
    small = np.minimum(rmax[a], rmax[b])
    merge = counts >= ratio * 2.0 * small
    if not merge.any():
        return lab
    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a[merge], b[merge], strict=True):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n + 1)])
    return roots[lab].astype(np.int32)


def _object_filter(lab: np.ndarray, dist: np.ndarray, *, min_area: float, max_area: float,
                   min_inscribed: float, min_solidity: float, max_hole_fraction: float,
                   core: np.ndarray | None = None,
                   min_core_fraction: float = 0.0) -> np.ndarray:
    """Keep labels that are plausible fiber cross-sections; returns sequential int32 labels."""
    n = int(lab.max())
    if n == 0:
        return lab.astype(np.int32)
    area = np.bincount(lab.ravel(), minlength=n + 1)
    rmax = np.zeros(n + 1, np.float64)
    np.maximum.at(rmax, lab.ravel(), dist.ravel().astype(np.float64))
    keep = (area >= min_area) & (area <= max_area) & (2 * rmax >= min_inscribed)
    keep[0] = False
    if core is not None and min_core_fraction > 0:
        n_core = np.bincount(lab[core], minlength=n + 1)
        keep &= n_core >= min_core_fraction * np.maximum(area, 1)
    slices = ndi.find_objects(lab)
    for i, sl in enumerate(slices, start=1):
        if sl is None or not keep[i]:
            continue
        cnts, filled = _filled_outline((lab[sl] == i).astype(np.uint8))
        if not cnts:
            keep[i] = False
            continue
        farea = float(filled.sum())
        if farea > area[i] * (1.0 + max_hole_fraction):
            keep[i] = False
            continue
        if _solidity(cnts, area[i]) < min_solidity:
            keep[i] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[lab]


def _filled_outline(m: np.ndarray):
    """External contours of a uint8 mask and the mask with its holes filled."""
    cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(m)
    cv2.drawContours(filled, cnts, -1, 1, thickness=-1)
    return cnts, filled


def _solidity(cnts, area: float) -> float:
    """Area / convex-hull area of an object given by its external contours."""
    pts = np.concatenate(cnts).reshape(-1, 2).astype(np.float32)
    hull = cv2.convexHull(pts)
    # contour area of pixel centres underestimates by ~ half the perimeter
    harea = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True) + 1.0
    return float(area) / harea


def _merge_shallow(lab: np.ndarray, height: np.ndarray, h: float) -> np.ndarray:
    """Merge adjacent watershed basins of a relief whose lower peak is < ``h`` above the saddle.

    Equivalent to seeding with the h-maxima of ``height``: basins are merged in order of
    decreasing saddle height, each merged basin keeping the higher peak.
    """
    n = int(lab.max())
    if n < 2:
        return lab
    hf = height.astype(np.float32, copy=False)
    keys_l, sad_l = [], []
    for a, b, ha, hb in ((lab[:, :-1], lab[:, 1:], hf[:, :-1], hf[:, 1:]),
                         (lab[:-1, :], lab[1:, :], hf[:-1, :], hf[1:, :])):
        m = (a != b) & (a > 0) & (b > 0)
        if m.any():
            pa, pb = a[m].astype(np.int64), b[m].astype(np.int64)
            keys_l.append(np.minimum(pa, pb) * (n + 1) + np.maximum(pa, pb))
            sad_l.append(np.minimum(ha[m], hb[m]))
    if not keys_l:
        return lab
    keys = np.concatenate(keys_l)
    sad = np.concatenate(sad_l)
    uk, inv = np.unique(keys, return_inverse=True)
    saddle = np.full(len(uk), -np.inf, np.float32)
    np.maximum.at(saddle, inv, sad)
    peak = np.zeros(n + 1, np.float32)
    np.maximum.at(peak, lab.ravel(), hf.ravel())
    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = np.argsort(-saddle, kind="stable")
    for k in order:
        ra, rb = find(int(uk[k] // (n + 1))), find(int(uk[k] % (n + 1)))
        if ra == rb:
            continue
        if min(peak[ra], peak[rb]) - saddle[k] < h:
            keep, drop = (ra, rb) if peak[ra] >= peak[rb] else (rb, ra)
            parent[drop] = keep
    roots = np.array([find(i) for i in range(n + 1)])
    roots[peak[roots] < h] = 0  # a basin as a whole lower than h is no h-maximum
    roots[0] = 0
    _, seq = np.unique(roots, return_inverse=True)
    return seq.astype(np.int32)[lab]


def _grow(lab: np.ndarray, allowed: np.ndarray, radius_px: float) -> np.ndarray:
    """Grow labels into ``allowed`` pixels within ``radius_px`` (nearest label wins)."""
    if radius_px <= 0 or lab.max() == 0:
        return lab
    fg = lab > 0
    src = (~fg).astype(np.uint8)
    dist, idx = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    # map the index of each zero pixel (a label pixel) to its label value
    ys, xs = np.nonzero(fg)
    lut = np.zeros(int(idx.max()) + 1, np.int32)
    lut[idx[ys, xs]] = lab[ys, xs]
    grown = lut[idx]
    add = (~fg) & allowed & (dist <= radius_px)
    out = lab.copy()
    out[add] = grown[add]
    return out


# --------------------------------------------------------------------------- segmentation


def segment_fibers(
    rgb: np.ndarray,
    *,
    mpp: float,
    model: StainModel | None = None,
    tissue: np.ndarray | None = None,
    params: FiberParams | None = None,
    levels: FiberLevels | None = None,
) -> np.ndarray:
    """Segment muscle fibers in a brightfield transverse section (H-DAB IHC or H&E).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        Brightfield RGB image.
    mpp : float
        Pixel size in µm per pixel (all sizes in ``params`` are in µm).
    model : StainModel, optional
        Stain vectors and background. Default: the H-DAB preset with the background estimated
        from the image (not darker than 235 per channel: a field without glass would otherwise
        take pale fibers as the background). Only the background and the DAB vector are used (DAB-filled fibers are
        recognised on the DAB-free optical density).
    tissue : ndarray of bool, shape (H, W), optional
        Analysed tissue; fibers are only found inside it. Default: all non-glass pixels
        (total OD > 0.06 after a 2 µm blur), enclosed holes up to the largest fiber filled.
    params : FiberParams, optional
    levels : FiberLevels, optional
        Statistics to compare with (see :func:`fiber_levels`); default: those of this image.
        A tile of a slide gets the slide's, so that the result does not depend on the tiling.

    Returns
    -------
    ndarray of int32, shape (H, W)
        Fiber labels 1..N (0 = not a fiber), numbered in raster order of the working grid.

    Raises
    ------
    InputError
        Image not uint8 RGB, ``tissue`` of another shape, or ``mpp`` making fibers implausibly
        small (< 4 px across) or larger than the image.
    MppUnknownError
        ``mpp`` is None.

    Warns
    -----
    UserWarning
        When there is no tissue or no fiber was found (an empty label image is returned).
    """
    params = FiberParams() if params is None else params
    rgb = _check_rgb(rgb)
    shape = rgb.shape[:2]
    mpp = _check_mpp(mpp, shape, params)
    if tissue is not None:
        tissue = np.asarray(tissue)
        if tissue.shape != shape:
            raise InputError(f"`tissue` mask has shape {tissue.shape}, image has {shape}")
        tissue = tissue.astype(bool, copy=False)
        if not tissue.any():
            warnings.warn("segment_fibers: the tissue mask is empty; no fibers segmented",
                          UserWarning, stacklevel=2)
            return np.zeros(shape, np.int32)
    if model is None:
        model = _default_model(rgb)
    total, counter, hema, t_small, wm = _working_images(rgb, mpp, model, tissue, params)
    work = _Work(total, counter, hema, t_small, wm, params)
    del total, counter, hema  # the working object owns them (and releases them early)
    lab = _segment_work(work, levels)
    del work
    if lab.max() == 0:
        warnings.warn("segment_fibers: no muscle fibers found in the image "
                      f"(min_diameter_um={params.min_diameter_um:g}, mpp={mpp:g})",
                      UserWarning, stacklevel=2)
        return np.zeros(shape, np.int32)
    out = _upsample_labels(lab, shape)
    if tissue is not None:
        out = np.where(tissue, out, 0).astype(np.int32, copy=False)
    return out


def _inner_distance(lab: np.ndarray) -> np.ndarray:
    """Distance (px) of every labelled pixel to the nearest pixel of another label or 0."""
    inside = lab > 0
    edge = np.zeros_like(inside)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    return cv2.distanceTransform((inside & ~edge).astype(np.uint8), cv2.DIST_L2, 5)


@dataclass(frozen=True)
class FiberLevels:
    """Image statistics that fiber segmentation compares with (OD in log10 units).

    Computed from the image being segmented unless given. A tiled whole slide computes them
    once for the slide (:func:`fiber_levels` on the whole slide or a fixed sample of it) and
    gives every tile the same values, so that tiles do not differ by their own statistics.

    Attributes
    ----------
    counterstain : bool
        DAB patches cover more than ``dab_counterstain_fraction`` of the tissue: the DAB is
        treated as a counterstain (total OD used throughout, no interstitium rule).
    level_c, level_t : float
        Typical fiber OD on the DAB-free and on the total OD (median over smooth tissue).
    ref_t, ref_c : float
        Reference OD of the palest parts (glass or pale interstitium) on the total and on
        the DAB-free OD.
    line_noise : tuple of 3 floats
        Median relative line response over tissue of the DAB-free, hematoxylin and pale-line
        maps (the grain that a boundary must stand out of).
    level_free, ref_free : float or None
        Counterstain mode only: typical fiber OD and palest OD of the DAB-free map (None
        otherwise, and in levels saved before this field existed: the test is then skipped).
    """

    counterstain: bool
    level_c: float
    level_t: float
    ref_t: float
    ref_c: float
    line_noise: tuple[float, float, float]
    level_free: float | None = None
    ref_free: float | None = None

    def to_dict(self) -> dict:
        return {"counterstain": bool(self.counterstain), "level_c": float(self.level_c),
                "level_t": float(self.level_t), "ref_t": float(self.ref_t),
                "ref_c": float(self.ref_c),
                "line_noise": [float(v) for v in self.line_noise],
                "level_free": None if self.level_free is None else float(self.level_free),
                "ref_free": None if self.ref_free is None else float(self.ref_free)}

    @classmethod
    def from_dict(cls, d: dict) -> FiberLevels:
        return cls(counterstain=bool(d["counterstain"]), level_c=float(d["level_c"]),
                   level_t=float(d["level_t"]), ref_t=float(d["ref_t"]),
                   ref_c=float(d["ref_c"]),
                   line_noise=tuple(float(v) for v in d["line_noise"]),
                   level_free=None if d.get("level_free") is None else float(d["level_free"]),
                   ref_free=None if d.get("ref_free") is None else float(d["ref_free"]))


class _Work:
    """Working-grid maps of one image (stage 1 of the segmentation, before any statistic)."""

    def __init__(self, total: np.ndarray, counter: np.ndarray, hema: np.ndarray,
                 tissue: np.ndarray, wm: float, params: FiberParams) -> None:
        self.total, self.counter, self.hema, self.tissue = total, counter, hema, tissue
        self.wm, self.params = wm, params
        self.has_dab = counter is not total
        # DAB patches (granular sarcoplasmic DAB, DAB-filled fibers)
        self.patch = None
        if self.has_dab and params.dab_patch_od > 0:
            self.patch = _gauss(total - counter, params.dab_patch_smoothing_um / wm) \
                > params.dab_patch_od
        n_t = int(np.count_nonzero(tissue))
        self.patch_px = int(np.count_nonzero(self.patch & tissue)) if self.patch is not None \
            else 0
        self.tissue_px = n_t

    def set_mode(self, counterstain: bool) -> None:
        """Stage 2: the DAB mode, then the smoothed maps and the tissue candidates."""
        params, wm = self.params, self.wm
        self.inter_ratio = params.interstitium_ratio
        self.cs_free = None
        if self.has_dab and counterstain and self.patch is not None:
            # the DAB-free OD still tells unstained fibers (pale on the total OD when nearly
            # every other fiber is DAB-filled) from glass and pale interstitium
            self.cs_free = _gauss(self.counter, params.smoothing_um / wm)
            # DAB-filled fibers are darker than connective tissue: no interstitium rule either
            self.counter, self.patch, self.inter_ratio = self.total, None, 0.0
        elif self.patch is not None and not self.patch.any():
            self.patch = None
        total, counter = self.total, self.counter
        self.ts = _gauss(total, params.smoothing_um / wm)
        self.cs = _gauss(counter, params.smoothing_um / wm) if counter is not total else self.ts
        mu = _gauss(counter, params.texture_um / wm)
        var = _gauss(counter * counter, params.texture_um / wm) - mu * mu
        self.std = np.sqrt(np.maximum(var, 0))
        self.cand = self.tissue & (self.cs > 0.02)

    def line_map(self, j: int, level_t: float) -> tuple[np.ndarray, np.ndarray]:
        """Stage 3: line map ``j`` (0 dark on the DAB-free OD, 1 dark on the hematoxylin OD,
        2 pale on the total OD): absolute contrast and contrast relative to the local level
        (one map at a time, so that only one pair is alive)."""
        params, wm = self.params, self.wm
        k = _disk(params.endomysium_um / wm / 2.0 + 0.5)
        sl = params.line_smoothing_um / wm
        if j == 0:
            # counterstain mode: the endomysium is dark on the DAB-free OD, the stained rim of
            # a DAB-filled fiber only on the total OD
            img = self.cs_free if (self.cs_free is not None
                                   and self.params.counterstain_free_lines) else self.cs
            polarity = 1
        elif j == 1:
            img, polarity = _gauss(self.hema, params.smoothing_um / wm), 1
        else:
            img, polarity = self.ts, -1
        return _line_response(img, polarity, k, sl, level_t)

    def pale_crosstalk(self, t: np.ndarray, level_t: float) -> np.ndarray | None:
        """Pixels of the pale-line map ``t`` (total OD) that are DAB texture, not boundaries:
        a crack is pale on every stain, a gap between DAB granules only on the total OD, so
        a pale line whose DAB-free contrast is below ``pale_line_free_fraction`` of its
        total-OD contrast is ignored. None when the rule does not apply (off, no DAB,
        counterstain mode)."""
        params, wm = self.params, self.wm
        if params.pale_line_free_fraction <= 0 or self.cs is self.ts:
            return None
        k = _disk(params.endomysium_um / wm / 2.0 + 0.5)
        t_free = _line_response(self.cs, -1, k, params.line_smoothing_um / wm, level_t)[0]
        out = t_free < np.float32(params.pale_line_free_fraction) * t
        if self.patch is not None and params.pale_line_patch_gap_um > 0:
            # beside a DAB-filled fiber or a DAB rim the endomysium is pale on the total OD
            # only: those lines are kept
            out &= ~cv2.dilate(self.patch.astype(np.uint8),
                               _disk(params.pale_line_patch_gap_um / wm)).astype(bool)
        return out


def _line_response(img: np.ndarray, polarity: int, k: np.ndarray, sl: float,
                   level_t: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-hat line response of ``img`` (dark lines: polarity 1, pale: -1), absolute and
    relative to the local level."""
    if polarity > 0:
        ref = cv2.morphologyEx(img, cv2.MORPH_OPEN, k)
        t = _gauss(img - ref, sl)
    else:
        ref = cv2.morphologyEx(img, cv2.MORPH_CLOSE, k)
        t = _gauss(ref - img, sl)
    # grain scales with the stain (DAB-filled fibers are grainier): relative contrast
    rel = t / np.maximum(_gauss(ref, 2 * sl), np.float32(0.5 * level_t))
    return t, rel


def _line_noise(rels_cands) -> float:
    """Median relative line response over tissue candidates, pooled over images.

    ``rels_cands`` yields (relative line map, candidate mask) pairs; each is sampled
    (:func:`_sample`) and dropped before the next, so a generator keeps one map alive."""
    parts, fallback = [], []
    for rel, cand in rels_cands:
        parts.append(_sample(rel, cand))
        if parts[-1].size == 0:  # used only when every image's sample is empty
            fallback.append(rel[cand])
    v = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if v.size == 0:
        v = np.concatenate(fallback)
    return max(float(np.median(v)), 1e-4)


def _pooled(works: list[_Work], attr: str, mask_attr: str | None) -> np.ndarray:
    """Raster samples of one map over several images, concatenated (one image: _sample)."""
    masks = [getattr(w, mask_attr) if mask_attr else None for w in works]
    v = np.concatenate([_sample(getattr(w, attr), m) for w, m in zip(works, masks, strict=True)])
    if v.size == 0 and mask_attr is not None:  # sub-grid missed a tiny mask: all pixels
        v = np.concatenate([getattr(w, attr)[m] for w, m in zip(works, masks, strict=True)])
    return v


def _levels(works: list[_Work], params: FiberParams, *, line_noise: bool = True
            ) -> FiberLevels | None:
    """Slide/image statistics from the working maps of one or more images (None: no tissue).

    ``line_noise=False`` leaves the three line-noise levels NaN (the segmentation of a single
    image computes each from its line map as it uses it)."""
    n_t = sum(w.tissue_px for w in works)
    counterstain = sum(w.patch_px for w in works) > params.dab_counterstain_fraction * n_t
    for w in works:
        w.set_mode(counterstain)
    if sum(int(np.count_nonzero(w.cand)) for w in works) < 16:
        return None
    level0 = float(np.median(_pooled(works, "cs", "cand")))
    thr = 0.5 * params.texture_max * max(level0, 1e-3)
    for w in works:
        w.smooth = w.cand & (w.std < thr)
    if sum(int(np.count_nonzero(w.smooth)) for w in works) < 64:
        for w in works:
            w.smooth = w.cand
    level_c = max(float(np.median(_pooled(works, "cs", "smooth"))), 0.02)
    level_t = max(float(np.median(_pooled(works, "ts", "smooth"))), 0.02)
    ref_t = min(float(np.percentile(_pooled(works, "ts", None), 1.0)), 0.5 * level_t)
    ref_c = min(float(np.percentile(_pooled(works, "cs", None), 1.0)), 0.5 * level_c)
    level_free = ref_free = None
    if all(w.cs_free is not None for w in works):
        level_free = max(float(np.median(_pooled(works, "cs_free", "smooth"))), 0.02)
        ref_free = min(float(np.percentile(_pooled(works, "cs_free", None), 1.0)),
                       0.5 * level_free)
    for w in works:  # statistics done: the texture map is no longer needed
        w.std = w.smooth = None
    noise = (math.nan,) * 3
    if line_noise:  # pooled over the images, one line map of one image alive at a time
        noise = tuple(_line_noise((w.line_map(j, level_t)[1], w.cand) for w in works)
                      for j in range(3))
    return FiberLevels(counterstain=bool(counterstain), level_c=level_c, level_t=level_t,
                       ref_t=ref_t, ref_c=ref_c, line_noise=noise,
                       level_free=level_free, ref_free=ref_free)


def _working_images(rgb: np.ndarray, mpp: float, model: StainModel, tissue: np.ndarray | None,
                    params: FiberParams):
    factor = max(1.0, params.working_mpp_um / mpp)
    small = _downsample(rgb, factor)
    wm = mpp * rgb.shape[0] / small.shape[0]  # actual working µm/px
    total, counter, hema = fiber_od_images(small, model)
    if tissue is not None:
        t_small = _downsample(tissue.astype(np.uint8) * 255, factor) >= 128
    else:
        t_small = _gauss(total, 2.0 / wm) > 0.06
        # pale fibers (little counterstain, little background DAB) dip below the glass
        # threshold in patches: enclosed holes up to the largest fiber are tissue (lumens and
        # tears stay out of the fiber cores by the pale rule)
        t_small = _fill_small_holes(t_small, math.pi * (params.max_diameter_um / wm / 2) ** 2)
    return total, counter, hema, t_small, wm


def _default_model(rgb: np.ndarray) -> StainModel:
    # a field inside the tissue has no glass and its brightest pixels are pale fibers:
    # never take a background darker than _MIN_DEFAULT_BACKGROUND for the default model
    bg = tuple(max(b, _MIN_DEFAULT_BACKGROUND) for b in _estimate_background(rgb))
    return PRESETS["H-DAB"].with_background(bg)


def fiber_levels(
    images,
    *,
    mpp: float,
    model: StainModel | None = None,
    tissues=None,
    params: FiberParams | None = None,
) -> FiberLevels | None:
    """Fiber segmentation statistics of a slide, pooled over one or more of its regions.

    ``segment_fibers(rgb, levels=fiber_levels([rgb], ...))`` equals ``segment_fibers(rgb)``;
    a tiled slide gives every tile the levels of the whole slide (or of a fixed sample of
    regions of it), so the result does not depend on the tiling.

    Parameters
    ----------
    images : sequence of ndarray of uint8, shape (H, W, 3)
        Regions of the slide at the same pixel size.
    mpp : float
        Pixel size in µm per pixel.
    model : StainModel, optional
        As for :func:`segment_fibers` (default estimated from the first image).
    tissues : sequence of ndarray of bool, optional
        Analysed tissue of each image (default: as for :func:`segment_fibers`).
    params : FiberParams, optional

    Returns
    -------
    FiberLevels or None
        None when the regions hold (almost) no tissue.
    """
    params = FiberParams() if params is None else params
    images = [_check_rgb(im) for im in images]
    if not images:
        return None
    mpp = _check_mpp(mpp, images[0].shape[:2], params)
    model = _default_model(images[0]) if model is None else model
    tissues = [None] * len(images) if tissues is None else list(tissues)
    works = []
    for im, t in zip(images, tissues, strict=True):
        if t is not None:
            t = np.asarray(t, bool)
            if t.shape != im.shape[:2]:
                raise InputError(f"tissue mask has shape {t.shape}, image has {im.shape[:2]}")
        total, counter, hema, t_small, wm = _working_images(im, mpp, model, t, params)
        works.append(_Work(total, counter, hema, t_small, wm, params))
    return _levels(works, params)


def _not_interstitium(core: np.ndarray, od: np.ndarray, level_map: np.ndarray, level: float,
                      ratio: float, params: FiberParams, wm: float) -> np.ndarray:
    """Pixels that are not interstitium: ``od`` (blurred by ``interstitium_smoothing_um``) at
    most ``ratio`` x the local typical fiber level of ``level_map`` (slide level ``level``)."""
    c_int = _gauss(od, params.interstitium_smoothing_um / wm)
    local = _local_fiber_level(level_map, core & (c_int <= ratio * level), level,
                               params.interstitium_local_um / wm,
                               params.interstitium_local_margin)
    return c_int <= ratio * local


def _segment_work(w: _Work, levels: FiberLevels | None = None) -> np.ndarray:
    """Fiber labels on the working grid of ``w``; releases ``w``'s maps as they are used."""
    tissue, wm, params = w.tissue, w.wm, w.params
    if tissue.sum() < math.pi * (params.min_diameter_um / wm / 2) ** 2:
        return np.zeros(tissue.shape, np.int32)
    own = levels is None
    if own:
        levels = _levels([w], params, line_noise=False)
        if levels is None:
            return np.zeros(tissue.shape, np.int32)
    else:
        w.set_mode(levels.counterstain)
        if np.count_nonzero(w.cand) < 16:
            return np.zeros(tissue.shape, np.int32)
        w.std = None
    counter, patch, inter_ratio = w.counter, w.patch, w.inter_ratio
    ts, cs = w.ts, w.cs
    level_c, level_t = levels.level_c, levels.level_t
    ref_t, ref_c = levels.ref_t, levels.ref_c
    # 1. thin structures darker or paler than their surroundings, in units of each map's
    #    own noise (fiber grain): dark lines on the DAB-free OD and on the hematoxylin OD
    #    (endomysium, nuclei), pale lines on the total OD (cracks, H&E endomysium); inside
    #    DAB patches only the hematoxylin lines count. One map at a time (memory).
    raw = np.zeros_like(ts)
    line = np.zeros_like(ts)
    weights = (1.0, 1.0, params.pale_line_weight)
    granule = _dab_granules(w, patch) if patch is not None else None
    for j in range(3):
        t, rel = w.line_map(j, level_t)
        noise_j = _line_noise([(rel, w.cand)]) if own else levels.line_noise[j]
        if patch is not None and j != 1:
            t[patch] = 0
            rel[patch] = 0
        elif patch is not None and granule is not None:
            t[granule] = 0
            rel[granule] = 0
        if j == 2:
            crosstalk = w.pale_crosstalk(t, level_t)
            if crosstalk is not None:
                t[crosstalk] = 0
                rel[crosstalk] = 0
                del crosstalk
        np.maximum(raw, t, out=raw)
        np.maximum(line, rel * np.float32(weights[j] / noise_j), out=line)
        del t, rel
    w.hema = w.cand = None
    # a boundary must stand out of the grain AND have a visible contrast
    line[raw < params.boundary_contrast * (level_t - ref_t)] = 0
    line[raw < params.boundary_min_od] = 0
    thr = params.boundary_noise
    boundary = apply_hysteresis_threshold(line, params.boundary_weak * thr, thr)
    pale = ts < ref_t + params.pale_fraction * (level_t - ref_t)
    if cs is not ts:  # DAB-stained fibers: pale only if also pale in the DAB-free OD
        pale &= cs < ref_c + params.pale_fraction * (level_c - ref_c)
    elif w.cs_free is not None and levels.level_free is not None:
        # counterstain mode: an unstained fiber among DAB-filled ones is pale on the total OD
        # but carries at least most of the typical fiber's DAB-free OD
        pale &= w.cs_free < levels.ref_free + _UNSTAINED_FRACTION * (
            levels.level_free - levels.ref_free)
    core = tissue & ~boundary & ~pale
    if inter_ratio > 0:
        core &= _not_interstitium(core, counter, cs, level_c, inter_ratio, params, wm)
    elif (w.cs_free is not None and levels.level_free is not None
          and params.counterstain_interstitium_ratio > 0):
        # counterstain mode: DAB-filled fibers carry little counterstain, DAB-free connective
        # tissue a lot; there the interstitium rule of the DAB-free OD still holds. Only where
        # the DAB is well below a stained fiber's: an H&E section read with the H-DAB model
        # (eosin as "DAB" on fibers and connective tissue alike) is left as it was.
        dab_fiber = max(levels.level_t - levels.level_free, 0.02)
        core &= _not_interstitium(core, w.cs_free, w.cs_free, levels.level_free,
                                  params.counterstain_interstitium_ratio, params, wm) \
            | (ts - w.cs_free >= 0.5 * dab_fiber)
    # the isolated-object rule needs the DAB-free OD (not in counterstain mode)
    iso_od = cs if (params.isolated_max_area_um2 > 0 and w.cs_free is None) else None
    # the small-fiber pass needs it too (not in counterstain mode, not without DAB)
    small_od = cs if (params.small_fiber_max_um > 0 and inter_ratio > 0 and cs is not ts) \
        else None
    # what the steps below do not use is released (a tile's peak memory)
    del counter, cs, patch
    w.total = w.counter = w.cs = w.cs_free = w.patch = None
    core = _fill_small_holes(core, params.hole_max_area_um2 / wm**2) & tissue
    core = cv2.morphologyEx(core.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)).astype(bool)

    # 2. split touching cores: h-maxima of the distance transform + watershed
    dist = cv2.distanceTransform(core.astype(np.uint8), cv2.DIST_L2, 5)
    dsm = _gauss(dist, 1.0)
    # markers: maxima of the smoothed distance whose dynamic (depth below the saddle to a
    # higher maximum) is at least split_depth -- the h-maxima, computed as a watershed from
    # every local maximum followed by merging across shallow saddles
    h = max(params.split_depth_um / wm, 0.5)
    peaks = core & (dsm >= cv2.dilate(dsm, np.ones((3, 3), np.uint8))) & (dsm > 0.5)
    nm, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
    if nm <= 1:
        return np.zeros(tissue.shape, np.int32)
    cores = watershed(-dsm, markers, mask=core)
    del markers, peaks
    cores = _merge_shallow(cores, dsm, h)
    del dsm
    if cores.max() == 0:
        return np.zeros(tissue.shape, np.int32)
    cores = _merge_oversplit(cores, dist, params.merge_neck_ratio)

    # 3. grow cores to the fiber edge: watershed on edge strength, competing with a
    #    background seed (pale / non-tissue / far from every core)
    gx = cv2.Sobel(ts, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(ts, cv2.CV_32F, 0, 1, ksize=3)
    edge = np.sqrt(gx * gx + gy * gy) * np.float32(0.25) + raw
    del gx, gy, raw
    far = cv2.distanceTransform((cores == 0).astype(np.uint8), cv2.DIST_L2, 5)
    grow_px = params.grow_um / wm
    bg_id = int(cores.max()) + 1
    seeds = cores.copy()
    # centre lines of the boundaries (ridge of the line map across x or y) stop the growth,
    # so the endomysium between two fibers stays non-fiber
    lp = np.pad(line, 1, mode="edge")
    ridge = boundary & (((line >= lp[1:-1, :-2]) & (line >= lp[1:-1, 2:]))
                        | ((line >= lp[:-2, 1:-1]) & (line >= lp[2:, 1:-1])))
    del lp, line
    region = far <= grow_px + 1.5  # only pixels near a core are flooded
    bg = (~tissue | pale | ridge | (far > grow_px)) & (cores == 0) & region
    del far, ridge, boundary
    seeds[bg] = bg_id
    del bg
    lab = watershed(edge, seeds, mask=region)
    del edge, seeds, region
    lab[(lab == bg_id) | ~tissue] = 0

    r_min = params.min_diameter_um / wm / 2.0
    r_max = params.max_diameter_um / wm / 2.0
    lab = _object_filter(
        lab, _inner_distance(lab),
        min_area=0.6 * math.pi * r_min**2,
        max_area=math.pi * r_max**2,
        min_inscribed=params.min_inscribed_fraction * 2 * r_min,
        min_solidity=params.min_solidity,
        max_hole_fraction=params.max_hole_fraction,
        core=cores > 0, min_core_fraction=params.min_core_fraction,
    )
    if iso_od is not None:
        lab = _drop_isolated_pale(lab, iso_od, level_c, wm, params)
    if small_od is not None:
        small = _small_fiber_candidates(small_od, tissue & ~pale, level_c, inter_ratio, params,
                                        wm)
        lab = _add_small_fibers(lab, small, small_od, level_c, inter_ratio, params, wm)
    return lab


def _close_octagon(img: np.ndarray, radius_px: float) -> np.ndarray:
    """Grey closing by an octagon of about ``radius_px`` (a square ⊕ a diamond, the sides in the
    ratio that makes it regular): a disk closing to within a pixel, at a third of its cost."""
    a = max(0, int(round(radius_px / (1.0 + math.sqrt(2.0)))))
    b = max(1, int(round(radius_px - a)))
    sq = np.ones((2 * a + 1, 2 * a + 1), np.uint8)
    yy, xx = np.mgrid[-b:b + 1, -b:b + 1]
    dia = (np.abs(yy) + np.abs(xx) <= b).astype(np.uint8)
    out = cv2.dilate(cv2.dilate(img, sq, borderType=cv2.BORDER_REPLICATE), dia,
                     borderType=cv2.BORDER_REPLICATE)
    return cv2.erode(cv2.erode(out, sq, borderType=cv2.BORDER_REPLICATE), dia,
                     borderType=cv2.BORDER_REPLICATE)


def _small_fiber_candidates(cs: np.ndarray, allowed: np.ndarray, level_c: float, ratio: float,
                            params: FiberParams, wm: float) -> np.ndarray:
    """Pixels of small islands in connective tissue (atrophic fibers, 10-30 µm).

    An atrophic fiber lying in widened endomysium is about as wide as the line detector's
    reach: the endomysium lines around it cover it and it never gets a core. On the DAB-free
    OD (``cs``) it is an island at most ``small_fiber_contrast`` times the OD of the
    connective tissue around it (a grey closing over ``small_fiber_max_um``), where that
    tissue is interstitium (at least ``ratio`` x the fiber level ``level_c``).
    """
    clo = _close_octagon(cs, params.small_fiber_max_um / wm / 2.0)
    return allowed & (clo >= np.float32(ratio * level_c)) \
        & (cs <= np.float32(params.small_fiber_contrast) * clo)


def _add_small_fibers(lab: np.ndarray, cand: np.ndarray, od: np.ndarray, level: float,
                      ratio: float, params: FiberParams, wm: float) -> np.ndarray:
    """Add the islands of ``cand`` (:func:`_small_fiber_candidates`) that no fiber covers and
    that look like a small fiber, numbered after the fibers of ``lab``.

    An island (holes such as a central nucleus filled) is kept when it is
    - fiber-sized: area from 0.6 π (``min_diameter_um`` / 2)² to a disk
      ``small_fiber_max_um`` across, inscribed disk at least
      ``small_fiber_min_inscribed_fraction`` x ``min_diameter_um``;
    - compact: solidity at least ``small_fiber_min_solidity``, holes at most
      ``max_hole_fraction`` (a lumen is not a fiber);
    - as dark as a fiber: mean ``od`` between ``small_fiber_min_level`` and
      ``small_fiber_max_level`` x ``level`` (lumina and tears are paler);
    - smooth: standard deviation of ``od`` at most ``small_fiber_max_texture`` x its mean
      (loose perimysium is fibrous);
    - surrounded by connective tissue: at least ``small_fiber_ring_fraction`` of a ring
      ``small_fiber_ring_um`` wide at ``small_fiber_ring_contrast`` x the island's OD and at
      least interstitium (``ratio`` x ``level``), and three quarters of it at
      ``small_fiber_ring_min_contrast`` x;
    - among fibers: at least ``small_fiber_min_neighbour_fraction`` of a ring
      ``small_fiber_neighbour_um`` wide belongs to fibers of ``lab`` (smooth patches of the
      perimysium lie away from fibers).

    The thresholds were chosen on development sections (seeds 11-14 and two atrophy sections)
    and checked on held-out ones (docs/_parts/fibers-validation.md, "Small (atrophic)
    fibers"). Everything is local (at most ``small_fiber_max_um`` / 2 plus
    ``small_fiber_neighbour_um`` around an island), so tiles with the preset overlap agree
    with the whole image.
    """
    free = cand & ~cv2.dilate((lab > 0).astype(np.uint8), _disk(1)).astype(bool)
    free = cv2.morphologyEx(free.astype(np.uint8), cv2.MORPH_OPEN,
                            _disk(params.small_fiber_open_um / wm))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(free, connectivity=4)
    if n <= 1:
        return lab
    r_min = params.min_diameter_um / wm / 2.0
    r_max = params.small_fiber_max_um / wm / 2.0
    min_area, max_area = 0.6 * math.pi * r_min**2, math.pi * r_max**2
    # cheap tests on every island first (its own pixels; holes such as a nucleus are filled
    # below): mean OD and texture, and an area that filled holes cannot bring into range
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
    sel = np.flatnonzero(free.ravel())
    ids = comp.ravel()[sel]
    v = od.ravel()[sel].astype(np.float64)
    mean = np.bincount(ids, weights=v, minlength=n) / np.maximum(area, 1)
    sd = np.sqrt(np.maximum(np.bincount(ids, weights=v * v, minlength=n) / np.maximum(area, 1)
                            - mean * mean, 0))
    del sel, ids, v
    ok = (area <= max_area) & (area * (1.0 + params.max_hole_fraction) >= min_area) \
        & (mean >= params.small_fiber_min_level * level) \
        & (mean <= params.small_fiber_max_level * level) \
        & (sd <= params.small_fiber_max_texture * np.maximum(mean, 1e-6))
    ok[0] = False
    r_ring = max(1, int(round(params.small_fiber_ring_um / wm)))
    ring_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_ring + 1, 2 * r_ring + 1))
    r_nb = max(1, int(round(params.small_fiber_neighbour_um / wm)))
    nb_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_nb + 1, 2 * r_nb + 1))
    r = max(r_ring, r_nb)
    min_inscribed = params.small_fiber_min_inscribed_fraction * 2 * r_min
    h, w = comp.shape
    out = None
    next_id = int(lab.max()) + 1
    for i in np.flatnonzero(ok):
        x, y, bw, bh = (int(c) for c in stats[i, :4])
        y0, x0 = max(y - r - 1, 0), max(x - r - 1, 0)
        ys, xs = slice(y0, min(y + bh + r + 1, h)), slice(x0, min(x + bw + r + 1, w))
        cnts, filled = _filled_outline((comp[ys, xs] == i).astype(np.uint8))
        f_area = float(np.count_nonzero(filled))
        # holes: a nucleus, not a lumen (at most max_hole_fraction of the island)
        if not (min_area <= f_area <= max_area) \
                or f_area > area[i] * (1.0 + params.max_hole_fraction) \
                or _solidity(cnts, f_area) < params.small_fiber_min_solidity \
                or 2 * cv2.distanceTransform(np.pad(filled, 1), cv2.DIST_L2, 5).max() \
                < min_inscribed:
            continue
        ring = cv2.dilate(filled, ring_k).astype(bool) & (filled == 0)
        n_ring = int(np.count_nonzero(ring))
        if n_ring == 0:
            continue
        ring_od = od[ys, xs][ring]
        dark = ring_od >= max(params.small_fiber_ring_contrast * mean[i], ratio * level)
        if np.count_nonzero(dark) < params.small_fiber_ring_fraction * n_ring \
                or np.percentile(ring_od, 25) < params.small_fiber_ring_min_contrast * mean[i]:
            continue
        # among fibers (a fascicle), not a smooth patch of the perimysium
        near = cv2.dilate(filled, nb_k).astype(bool) & (filled == 0)
        if np.count_nonzero(lab[ys, xs][near] > 0) \
                < params.small_fiber_min_neighbour_fraction * np.count_nonzero(near):
            continue
        if out is None:
            out = lab.astype(np.int32, copy=True)
        sub = out[ys, xs]
        sub[filled.astype(bool) & (sub == 0)] = next_id
        next_id += 1
    return lab if out is None else out


def _dab_granules(w: _Work, patch: np.ndarray) -> np.ndarray | None:
    """Pixels of DAB patches where the DAB is darker than its surroundings (granules): a
    hematoxylin line there is unmixing crosstalk of the granule, not endomysium (which lies in
    a DAB valley between stained fibers). None when the rule is off."""
    params, wm = w.params, w.wm
    if params.dab_granule_um <= 0:
        return None
    dab = _gauss(w.total - w.counter, params.smoothing_um / wm)
    inner = patch
    if params.dab_granule_inset_um > 0:
        inner = cv2.erode(patch.astype(np.uint8), _disk(params.dab_granule_inset_um / wm)
                          ).astype(bool)
    return inner & (dab > _gauss(dab, params.dab_granule_um / wm))


def _drop_isolated_pale(lab: np.ndarray, od: np.ndarray, level: float, wm: float,
                        params: FiberParams) -> np.ndarray:
    """Drop small objects paler than the fibers (mean ``od`` < ``isolated_pale_ratio`` ×
    ``level``) that touch other objects along < ``isolated_max_contact`` of a ring
    ``endomysium_um`` wide around them (loose connective tissue); sequential int32 labels."""
    n = int(lab.max())
    if n == 0:
        return lab
    idx = np.arange(1, n + 1)
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:] * wm**2
    mean_od = np.asarray(ndi.mean(od, lab, idx), np.float64)
    cand = (area < params.isolated_max_area_um2) & (mean_od < params.isolated_pale_ratio * level)
    if not cand.any():
        return lab
    r = max(1, int(round(params.endomysium_um / wm)))
    ring_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    keep = np.ones(n + 1, bool)
    keep[0] = False
    slices = ndi.find_objects(lab)
    h, w = lab.shape
    for i in np.nonzero(cand)[0] + 1:
        sl = slices[i - 1]
        if sl is None:
            continue
        y0, x0 = max(sl[0].start - r - 1, 0), max(sl[1].start - r - 1, 0)
        sub = lab[y0:min(sl[0].stop + r + 1, h), x0:min(sl[1].stop + r + 1, w)]
        m = (sub == i).astype(np.uint8)
        ring = cv2.dilate(m, ring_k).astype(bool) & (m == 0)
        if not ring.any():
            continue
        contact = float(np.count_nonzero(sub[ring] > 0)) / float(np.count_nonzero(ring))
        if contact < params.isolated_max_contact:
            keep[i] = False
    if keep[1:].all():
        return lab
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[lab]


# --------------------------------------------------------------------------- fiber table


def fiber_table(
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
    from ._fiber_props import fiber_properties

    return fiber_properties(labels, mpp=mpp, hema_od=hema_od, tissue=tissue, exclusion=exclusion,
                            compartments=compartments, params=params)
