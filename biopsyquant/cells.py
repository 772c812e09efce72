"""Positive-cell detection and counting (CD163 macrophages, nuclear markers such as Ki-67).

The engine follows QuPath's *positive cell detection*, with every size in µm and every
threshold in log10 OD relative to the slide background:

1. **detection image** (``detection_channel``): hematoxylin, DAB, their sum (``"od_sum"``), or
   two passes (``"dab+hematoxylin"``: DAB-stained cell bodies, then hematoxylin nuclei outside
   them as negative cells); smoothed with a Gaussian of ``smoothing_sigma_um`` minus a grey
   opening of ``background_radius_um``, so that slowly varying non-specific stain and
   illumination residue are not cells;
2. **foreground**: detection image > threshold inside the analysed mask, small holes filled;
3. **splitting touching cells**: markers at the local maxima of the smoothed distance transform,
   optionally weighted by the stain or by hematoxylin (one marker per nucleus), at least
   ``cell_min_diameter_um`` apart, merged when joined without a neck; every foreground pixel
   goes to the nearest marker of its blob; oversized blobs are re-thresholded at their own Otsu
   level; stained cells get a half-maximum edge (``boundary_fraction``);
4. objects outside ``min_area_um2`` – ``max_area_um2`` are dropped; the **cell** is the object
   grown by ``cell_expansion_um`` (nearest object wins); the **cytoplasm** is cell − object;
5. **DAB is measured** in ``compartment`` (``"nucleus"`` = the detected object, ``"cytoplasm"``,
   ``"cell"``) and each cell is graded 0 (negative) / 1+ / 2+ / 3+ at
   ``dab_threshold_1_od`` / ``_2_od`` / ``_3_od`` (QuPath defaults 0.2 / 0.4 / 0.6); optional
   guards: local DAB contrast and a nucleus inside every positive cell.

The CD163 preset uses the two-pass mode (membranous/cytoplasmic macrophages 8–20 µm); DAB-negative
interstitial nuclei and myonuclei are kept as negative cells. The Ki-67 preset detects nuclei on
the OD sum and measures nuclear DAB. Details and validation: ``docs/_parts/cells-method.md``,
``docs/_parts/cells-validation.md``.

:func:`measure` runs on an image or a tile (objects in tile pixel coordinates; the caller keeps
the cells whose centroid lies in the tile's owned core) and :func:`summarize` computes every
slide-level number from the concatenated cell table (clusters, densities, H-score, Allred,
JDM-style level), so whole and tiled scoring agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from . import _cells_detect as _d
from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .score import ImageContext, Measurements

__all__ = ["CellParams", "detect_cells", "grade_cells", "find_clusters", "measure", "summarize",
           "CELL_COLUMNS", "COMPARTMENT_NAMES"]

DETECTION_CHANNELS = ("hematoxylin", "dab", "od_sum", "dab+hematoxylin")
COMPARTMENTS = ("nucleus", "cytoplasm", "cell")
SPLIT_MODES = ("shape", "shape+intensity", "shape+hematoxylin")
POSITIVITY_RULES = ("mean", "fraction", "mean_and_fraction")

#: compartment code -> name reported for a cell (vessel counts as perivascular)
COMPARTMENT_NAMES = {0: "outside", 1: "fiber", 2: "endomysium", 3: "perimysium",
                     4: "perivascular", 5: "perivascular"}

#: columns of the table returned by :func:`detect_cells`
CELL_COLUMNS = ("cell_id", "x_px", "y_px", "area_px", "area_um2", "diameter_um",
                "object_area_um2", "dab_mean_od", "dab_max_od", "dab_positive_fraction",
                "dab_contrast_od", "hema_mean_od", "hema_max_od", "nucleus_dab_mean_od", "cell_dab_mean_od", "grade", "positive")


@dataclass(frozen=True)
class CellParams:
    """Parameters of positive-cell detection (sizes in µm, OD in log10 units).

    Attributes
    ----------
    detection_channel : str
        Image the cells are found on: ``"hematoxylin"`` (nuclei, QuPath's default), ``"dab"``,
        ``"od_sum"`` (hematoxylin + DAB OD: nuclei of a nuclear marker whether stained or
        not) or ``"dab+hematoxylin"`` (two passes for cytoplasmic/membranous markers such as
        CD163: DAB-stained cell bodies on the DAB OD, then hematoxylin nuclei outside them,
        which become negative cells).
    background_radius_um : float
        Radius of the grey opening subtracted from the detection image (QuPath: 8 µm);
        0 disables background subtraction.
    smoothing_sigma_um : float
        Gaussian smoothing of the detection image (QuPath: 1.5 µm).
    detection_threshold_od : float
        Foreground threshold on the smoothed, background-subtracted detection image (OD);
        for ``"dab+hematoxylin"`` the threshold of the hematoxylin (nucleus) pass.
    dab_detection_threshold_od : float
        ``"dab+hematoxylin"`` only: foreground threshold of the DAB (stained cell) pass, below
        the 1+ grade so that weakly stained cells are found and then graded.
    nucleus_exclusion_um : float
        ``"dab+hematoxylin"`` only: nuclei are searched this far outside stained cells.
    fill_holes_um2 : float
        Holes up to this area in the foreground are filled (an unstained nucleus inside a
        membranous/cytoplasmic DAB cell); 0 = keep holes.
    split_touching : bool
        Split touching cells at distance-transform necks.
    split_sigma_um : float
        Smoothing of the distance transform used to place one marker per cell.
    split_merge_ratio : float
        Two markers stay one cell when the distance transform between them never drops below
        this fraction of the smaller marker's value (no neck); 0 = never merge.
    split_by : str
        Marker function for splitting: ``"shape"`` (distance transform; QuPath's "split by
        shape") or ``"shape+intensity"`` (distance × smoothed stain, separates dark nuclei
        that touch without a neck) or ``"shape+hematoxylin"`` (distance × smoothed
        hematoxylin: one marker per nucleus, for cytoplasmic/membranous markers whose stained
        cell bodies overlap).
    split_hematoxylin_floor_od : float
        Added to the hematoxylin weight so that cells without a visible nucleus still get a
        marker from their shape.
    refine_levels : int
        Objects larger than ``max_area_um2`` (cells merged in densely stained tissue) are
        re-thresholded at their own Otsu level and split again, up to this many times
        (0 = drop them).
    refine_keep_low_um : float
        When > 0, the paler remainder of a re-thresholded blob is kept and split as well
        (weaker cells inside a cluster of strong ones), after an opening of this radius (µm)
        that removes the rims of the strong cells; 0 = the remainder is background.
    cell_min_diameter_um, cell_max_diameter_um : float
        Expected cell diameter range (CD163 macrophages 8–20 µm). Markers closer than the
        minimum are one cell; only markers closer than the maximum are tested for merging.
    min_area_um2, max_area_um2 : float
        Area limits of a detected object (QuPath nucleus defaults 10–400 µm²).
    cell_expansion_um : float
        Growth of each object into a cell (QuPath: 5 µm); defines the cytoplasm ring.
    compartment : str
        Where DAB is measured for grading: ``"nucleus"`` (the detected object), ``"cytoplasm"``
        (the ring around it) or ``"cell"`` (both).
    dab_threshold_1_od, dab_threshold_2_od, dab_threshold_3_od : float
        Grade thresholds on the compartment's mean DAB OD (1+, 2+, 3+).
    positivity : str
        ``"mean"``: positive when the mean DAB ≥ threshold 1; ``"fraction"``: when at least
        ``min_dab_fraction`` of the compartment's pixels have DAB ≥ threshold 1;
        ``"mean_and_fraction"``: both.
    boundary_fraction : float
        Each object's edge is moved to this fraction of its peak detection value (0.5 =
        half maximum, the true edge of a blurred cell) so that strongly stained cells are not
        diluted by their smoothed rim; 0 keeps the threshold edge (QuPath's behaviour). In
        ``"dab+hematoxylin"`` mode only the stained cells are trimmed (their DAB is graded).
    boundary_max_od : float
        Upper limit of that edge level (detection-image OD; 0 = none), so that a weaker cell
        merged with a strong one keeps its pixels.
    min_nucleus_od : float
        A positive cell must contain a nucleus: its maximum hematoxylin OD (smoothed over
        1 µm) must reach this (rejects nucleus-free DAB blotches, fibrillar non-specific
        staining; QuPath's detection is nucleus-based too); 0 = off.
    min_dab_contrast_od : float
        A positive cell's mean DAB above its local background (the grey opening of
        ``background_radius_um``) must reach this; rejects broad faint non-specific DAB
        (0 = off).
    min_dab_fraction : float
        Fraction (0–1) used by the ``fraction`` rules.
    cluster_min_cells : int
        Positive cells in a cluster (JDM score tool: ≥ 10).
    cluster_distance_um : float
        Positive cells closer than this (centre to centre) are linked into one cluster.
    hpf_area_mm2 : float
        Area of one high-power field (40× objective, field number 22: 0.237 mm²).
    jdm_cells_per_hpf : float
        JDM-style level 1 threshold (mean positive cells per HPF).
    jdm_diffuse_cells_per_hpf : float
        Mean positive cells per HPF from which the infiltrate is called diffuse (level 4).
    """

    detection_channel: str = "hematoxylin"
    background_radius_um: float = 8.0
    smoothing_sigma_um: float = 1.5
    detection_threshold_od: float = 0.1
    dab_detection_threshold_od: float = 0.12
    nucleus_exclusion_um: float = 1.0
    fill_holes_um2: float = 0.0
    min_dab_contrast_od: float = 0.0
    boundary_fraction: float = 0.0
    boundary_max_od: float = 0.0
    min_nucleus_od: float = 0.0
    split_touching: bool = True
    split_sigma_um: float = 1.0
    split_merge_ratio: float = 0.75
    refine_levels: int = 2
    split_by: str = "shape"
    refine_keep_low_um: float = 0.0
    split_hematoxylin_floor_od: float = 0.1
    cell_min_diameter_um: float = 5.0
    cell_max_diameter_um: float = 25.0
    min_area_um2: float = 10.0
    max_area_um2: float = 400.0
    cell_expansion_um: float = 5.0
    compartment: str = "nucleus"
    dab_threshold_1_od: float = 0.2
    dab_threshold_2_od: float = 0.4
    dab_threshold_3_od: float = 0.6
    positivity: str = "mean"
    min_dab_fraction: float = 0.0
    cluster_min_cells: int = 10
    cluster_distance_um: float = 25.0
    hpf_area_mm2: float = 0.237
    jdm_cells_per_hpf: float = 4.0
    jdm_diffuse_cells_per_hpf: float = 25.0

    def __post_init__(self) -> None:
        if self.detection_channel not in DETECTION_CHANNELS:
            raise ValueError(f"detection_channel must be one of {DETECTION_CHANNELS}, "
                             f"got {self.detection_channel!r}")
        if self.compartment not in COMPARTMENTS:
            raise ValueError(f"compartment must be one of {COMPARTMENTS}, got {self.compartment!r}")
        if self.split_by not in SPLIT_MODES:
            raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {self.split_by!r}")
        if self.positivity not in POSITIVITY_RULES:
            raise ValueError(f"positivity must be one of {POSITIVITY_RULES}, "
                             f"got {self.positivity!r}")
        if not (self.dab_threshold_1_od <= self.dab_threshold_2_od <= self.dab_threshold_3_od):
            raise ValueError("DAB thresholds must satisfy dab_threshold_1_od <= _2_od <= _3_od, got "
                             f"{self.dab_threshold_1_od}, {self.dab_threshold_2_od}, "
                             f"{self.dab_threshold_3_od}")
        for name in ("background_radius_um", "smoothing_sigma_um", "split_sigma_um",
                     "cell_expansion_um", "min_area_um2", "split_merge_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("cell_min_diameter_um", "cell_max_diameter_um", "max_area_um2",
                     "cluster_distance_um", "hpf_area_mm2"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cell_min_diameter_um > self.cell_max_diameter_um:
            raise ValueError("cell_min_diameter_um must not exceed cell_max_diameter_um")
        if self.min_area_um2 > self.max_area_um2:
            raise ValueError("min_area_um2 must not exceed max_area_um2")
        if not 0 <= self.boundary_fraction < 1:
            raise ValueError(f"boundary_fraction must be in [0, 1), got {self.boundary_fraction}")
        if not 0 <= self.min_dab_fraction <= 1:
            raise ValueError(f"min_dab_fraction must be in [0, 1], got {self.min_dab_fraction}")
        if self.cluster_min_cells < 2:
            raise ValueError(f"cluster_min_cells must be ≥ 2, got {self.cluster_min_cells}")

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """(1+, 2+, 3+) DAB thresholds in OD."""
        return (self.dab_threshold_1_od, self.dab_threshold_2_od, self.dab_threshold_3_od)


def _check_od(name: str, a: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise InputError(f"`{name}` must be a 2-D OD map (H, W), got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise InputError(f"`{name}` has shape {a.shape}, `hema_od` has {shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"`{name}` must be a float OD map, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def grade_cells(mean_od: np.ndarray, positive_fraction: np.ndarray, params: CellParams, *,
                contrast: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grade (0–3) and positivity of cells from their compartment's DAB.

    Parameters
    ----------
    mean_od : ndarray of float
        Mean DAB OD of the measured compartment per cell.
    positive_fraction : ndarray of float
        Fraction of the compartment's pixels with DAB ≥ ``dab_threshold_1_od``.
    params : CellParams
    contrast : ndarray of float, optional
        Mean background-subtracted DAB of the cell; cells below ``min_dab_contrast_od`` are
        negative (faint non-specific DAB blotches are not cells).

    Returns
    -------
    grade : ndarray of int8
        0 negative, 1 (1+), 2 (2+), 3 (3+) from the mean OD; a cell positive only by the
        fraction rule is graded 1+.
    positive : ndarray of bool
    """
    mean_od = np.asarray(mean_od, float)
    t1, t2, t3 = params.thresholds
    by_mean = mean_od >= t1
    by_frac = (np.asarray(positive_fraction, float) >= params.min_dab_fraction) & \
        (np.asarray(positive_fraction, float) > 0)
    if params.positivity == "mean":
        positive = by_mean
    elif params.positivity == "fraction":
        positive = by_frac
    else:
        positive = by_mean & by_frac
    if contrast is not None and params.min_dab_contrast_od > 0:
        positive = positive & (np.nan_to_num(np.asarray(contrast, float), nan=0.0)
                               >= params.min_dab_contrast_od)
    grade = (mean_od >= t1).astype(np.int8) + (mean_od >= t2) + (mean_od >= t3)
    grade = np.where(positive, np.maximum(grade, 1), 0).astype(np.int8)
    return grade, positive


def _split_intensity(params: CellParams, det: np.ndarray, hema: np.ndarray, um: float,
                     hema_clipped: np.ndarray | None = None) -> np.ndarray | None:
    """Weight of the distance transform for marker finding (None = shape only)."""
    sigma = 0.25 * params.cell_min_diameter_um * um
    if params.split_by == "shape+intensity":
        return _d.gaussian(det, sigma)
    if params.split_by == "shape+hematoxylin":
        w = _d.gaussian(_clip0(hema) if hema_clipped is None else hema_clipped, sigma)
        w += np.float32(params.split_hematoxylin_floor_od)
        return w
    return None


def _clip0(a: np.ndarray) -> np.ndarray:
    """``np.maximum(a, 0)`` for float32 maps (one OpenCV pass)."""
    return cv2.threshold(a, 0.0, 0.0, cv2.THRESH_TOZERO)[1]


def _det_map(channel: np.ndarray, *, params: CellParams, um: float,
             origin: tuple[int, int], clipped: np.ndarray | None = None,
             cand: np.ndarray | None = None, threshold: float = 0.0,
             mask: np.ndarray | None = None) -> np.ndarray:
    """Detection image: the channel clipped at 0, smoothed and background-subtracted
    (``clipped``: the channel already clipped at 0; ``cand``: candidate blocks of
    ``_BLOCK`` px to flag where the result exceeds ``threshold`` inside ``mask``)."""
    det = _clip0(channel) if clipped is None else clipped
    det = _d.gaussian(det, params.smoothing_sigma_um * um)
    return _d.background_subtract(det, params.background_radius_um * um, origin, cand=cand,
                                  cand_threshold=threshold, cand_mask=mask,
                                  cand_block=_BLOCK)


def _cand_grid(shape: tuple[int, int]) -> np.ndarray:
    return np.zeros((-(-shape[0] // _BLOCK), -(-shape[1] // _BLOCK)), np.uint8)


def _chain(fg: np.ndarray, det: np.ndarray, weight: np.ndarray | None, *, params: CellParams,
           px_area_um2: float, um: float, split_kwargs: dict, trim: bool) -> np.ndarray:
    """Fill holes, split touching cells, refine oversized blobs and trim edges -> labels."""
    if params.fill_holes_um2 > 0:
        fg = _d.fill_holes(fg, params.fill_holes_um2 / px_area_um2)
    kw = dict(split_kwargs, intensity=weight)
    labels = _d.split_objects(fg, **kw)
    del fg
    keep_low = int(round(params.refine_keep_low_um * um)) + 1 if params.refine_keep_low_um \
        else 0
    labels = _d.refine_large(labels, det, max_area_px=params.max_area_um2 / px_area_um2,
                             levels=params.refine_levels, split_kwargs=kw, keep_low=keep_low)
    if trim:
        labels = _d.trim_to_half_max(labels, det, params.boundary_fraction,
                                     params.fill_holes_um2 / px_area_um2,
                                     cap=params.boundary_max_od or np.inf)
    return labels


def _segment(channel: np.ndarray, mask: np.ndarray | None, threshold: float, *,
             params: CellParams, um: float, px_area_um2: float, hema: np.ndarray,
             split_kwargs: dict, origin: tuple[int, int], hema_weight: np.ndarray | None,
             trim: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Smooth, background-subtract, threshold and split one detection channel -> labels."""
    det = _det_map(channel, params=params, um=um, origin=origin)
    fg = _d.foreground(det, threshold, mask)
    if params.split_by == "shape+hematoxylin":
        weight = hema_weight  # shared by both passes
    else:
        weight = _split_intensity(params, det, hema, um)
    labels = _chain(fg, det, weight, params=params, px_area_um2=px_area_um2, um=um,
                    split_kwargs=split_kwargs, trim=trim)
    return labels, det


def _empty_table() -> pd.DataFrame:
    dtypes = {"cell_id": np.int64, "grade": np.int8, "positive": bool, "area_px": np.int64}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, np.float64)) for c in CELL_COLUMNS})


# ----------------------------------------------------------------------------------------------
# sparse evaluation
#
# Cells cover a few % of a section. The detection images (smoothing + background, both anchored
# to slide coordinates) are computed over the whole image with fast OpenCV filters; everything
# after the threshold (hole filling, distance transforms, markers, splitting, refinement,
# trimming, per-object statistics) runs only on rectangles around the foreground. Foreground
# pixels closer than the chain's reach (distance-transform smoothing + marker window) share a
# rectangle, every rectangle keeps a margin of more than half that reach, and the rectangles
# are packed side by side into one small "atlas" image, so that the chain sees exactly what it
# sees on the whole image. Rectangles clipped by the image border run on their own (the image
# border then plays its usual part).

_BLOCK = 2  # px, resolution of the candidate grid
_ALIGN = 64  # px, column alignment of rectangles at the image border (see _pass_sparse)


def _reach(params: CellParams, um: float) -> tuple[float, int]:
    """(reach, margin) in px: the largest distance over which the chain couples foreground
    pixels, and the context kept around each rectangle."""
    sigma = params.split_sigma_um * um
    r_dist = int(np.ceil(3 * sigma)) if sigma > 0 else 0  # Gaussian half-width (_d.gaussian)
    w_half = max(3, int(round(params.cell_min_diameter_um * um)) | 1) // 2  # marker window
    # a foreground pixel's markers depend on the smoothed distance transform within
    # r_dist + w_half of it: foreground farther away than that never changes them
    reach = r_dist + w_half + 1
    # an island inside a fillable hole lies within the hole's inscribed radius of its rim
    max_hole_px = params.fill_holes_um2 * um * um
    if max_hole_px > 0:
        reach = max(reach, int(np.ceil(np.sqrt(max_hole_px / np.pi))) + 2)
    # (distances in the chessboard metric: the Gaussian and the marker window are squares)
    margin = max(int(np.ceil(reach / 2)), r_dist + 1, 2)
    return float(reach), margin


@dataclass
class _Piece:
    """Objects found on one atlas (or one border rectangle) of a sparse pass."""

    lab: np.ndarray   # int32 label of every object pixel (labels unique within the piece)
    pix: np.ndarray   # int64 flat image index of that pixel


def _objects_of(labels: np.ndarray, boxes: np.ndarray, at: np.ndarray,
                crop: np.ndarray | None, width: int) -> _Piece:
    """Object pixels of an atlas label image, mapped back to flat image indices."""
    if crop is None:
        dy, dx = boxes[:1, 0], boxes[:1, 2]
    else:
        dy, dx = boxes[:, 0] - at[:, 0], boxes[:, 2] - at[:, 1]
    lab, pix = _d.object_pixels(labels, crop, dy, dx, width)
    return _Piece(lab, pix)


def _pass_sparse(det: np.ndarray, mask: np.ndarray | None, threshold: float,
                 weight: np.ndarray | None, *, params: CellParams, um: float,
                 px_area_um2: float, split_kwargs: dict, trim: bool,
                 cand: np.ndarray | None = None) -> list[_Piece]:
    """One detection pass evaluated on the candidate rectangles only (see above); ``cand``:
    the candidate blocks if already known (:func:`_d.candidate_blocks`)."""
    h, w = det.shape
    if cand is None:
        cand = _d.candidate_blocks(det, threshold, mask, _BLOCK)
    if not cand.any():
        return []
    reach, margin = _reach(params, um)
    reg = _d.plan_regions(cand, _BLOCK, (h, w), reach_px=reach, margin_px=margin)
    chain = dict(params=params, px_area_um2=px_area_um2, um=um, split_kwargs=split_kwargs,
                 trim=trim)
    t = np.float32(threshold)
    pieces = []
    # rectangles clipped by the image border: on their own, as views of the image
    for box in reg.boxes[reg.border]:
        y0, y1, x0, x1 = (int(v) for v in box[:4])
        # OpenCV's row filters compute the last (width mod vector) columns of a row with other
        # (scalar) code, which may differ in the last bit: start the rectangle at a multiple
        # of _ALIGN columns so that these columns are the image's own last columns, or end it
        # _ALIGN columns after its foreground
        x0 -= x0 % _ALIGN
        x1 = w if x1 + _ALIGN >= w else x1 + _ALIGN
        box = np.array([y0, y1, x0, x1, box[4]], np.int64)
        sl = (slice(y0, y1), slice(x0, x1))
        fg = (det[sl] > t) & _d.group_mask(reg, box)
        if mask is not None:
            fg &= mask[sl]
        lab = _chain(fg.view(np.uint8), det[sl], None if weight is None else weight[sl],
                     **chain)
        pieces.append(_objects_of(lab, box[None, :4], np.zeros((1, 2), np.int64), None, w))
    inner = reg.boxes[~reg.border]
    if len(inner) == 0:
        return pieces
    hh = inner[:, 1] - inner[:, 0]
    ww = inner[:, 3] - inner[:, 2]
    ay, ax, ashape = _d.pack_boxes(hh, ww)
    ashape = (ashape[0], ashape[1] + _ALIGN)  # zero columns at the right end (see above)
    at = np.stack([ay, ax], axis=1)
    a_fg, a_det, a_w, a_crop = _d.fill_atlas(det, weight, mask, reg, inner, at, threshold,
                                             ashape)
    lab = _chain(a_fg, a_det, a_w, **chain)
    del a_fg, a_w, a_det
    pieces.append(_objects_of(lab, inner[:, :4], at, a_crop, w))
    return pieces


def _piece_stats(piece: _Piece, values: dict[str, np.ndarray], t1: np.float32
                 ) -> dict[str, np.ndarray]:
    """Per-object statistics of one piece (objects in label order, image coordinates)."""
    n = int(piece.lab.max())
    sums, mx = _d.piece_sums(piece.lab, piece.pix, values["dab"], values["hema"],
                             values["hmax"], values.get("dabc"), t1, n)
    ids = np.flatnonzero(sums[:, 0])
    ids = ids[ids > 0]
    out = {"label": ids}
    for j, k in enumerate(("count", "sum_x", "sum_y", "sum_dab", "sum_hema", "sum_dabpos",
                           "sum_dabc")):
        out[k] = sums[ids, j]
    out["dmax"] = mx[ids, 0]
    out["hmax"] = mx[ids, 1]
    return out


def _objects_sparse(hema, dab, mask, *, params, um, px_area_um2, split_kwargs, origin):
    """Objects of both passes with their statistics, evaluated sparsely.

    Returns the statistics (arrays of length n + 1, index 0 unused, as ``_d.object_stats``),
    object maxima of DAB and of the smoothed hematoxylin, whether DAB contrast was measured,
    and a function writing the relabelled objects into a full-size label image.
    """
    # hematoxylin clipped at 0, shared by the hematoxylin weight and the nucleus pass
    hema_c = _clip0(hema) if params.split_by == "shape+hematoxylin" or \
        params.detection_channel in ("hematoxylin", "dab+hematoxylin") else None
    hema_weight = None
    if params.split_by == "shape+hematoxylin":
        hema_weight = _split_intensity(params, hema, hema, um, hema_clipped=hema_c)
    kw = dict(params=params, um=um, px_area_um2=px_area_um2, split_kwargs=split_kwargs)

    def weight_for(det):
        if params.split_by == "shape+hematoxylin":
            return hema_weight
        return _split_intensity(params, det, hema, um)

    channel = params.detection_channel
    passes = []
    if channel == "dab+hematoxylin":
        cand = _cand_grid(hema.shape)
        dab_det = _det_map(dab, params=params, um=um, origin=origin, cand=cand,
                           threshold=params.dab_detection_threshold_od, mask=mask)
        src = {"dab": dab, "hema": hema, "dabc": dab_det}
        p1 = _pass_sparse(dab_det, mask, params.dab_detection_threshold_od, weight_for(dab_det),
                          trim=True, cand=cand, **kw)
        occ = np.zeros(hema.shape, np.uint8)
        for p in p1:
            occ.ravel()[p.pix] = 1
        gap = int(round(params.nucleus_exclusion_um * um))
        if gap > 0:
            occ = cv2.dilate(occ, cv2.getStructuringElement(
                cv2.MORPH_ELLIPSE, (2 * gap + 1, 2 * gap + 1)))
        free = occ == 0
        if mask is not None:
            free &= mask
        del occ
        cand = _cand_grid(hema.shape)
        hdet = _det_map(hema, params=params, um=um, origin=origin, clipped=hema_c, cand=cand,
                        threshold=params.detection_threshold_od, mask=free)
        p2 = _pass_sparse(hdet, free, params.detection_threshold_od, weight_for(hdet),
                          trim=False, cand=cand, **kw)
        # hole filling in the nucleus pass may cover a stained object lying in a hole of a
        # nucleus ring: as on the whole image, the nucleus pass wins those pixels
        p2 = [q for q in p2 if len(q.lab)]
        if p2 and p1:
            occ = np.zeros(hema.shape, np.uint8)
            for q in p2:
                occ.ravel()[q.pix] = 1
            for q in p1:
                keep = occ.ravel()[q.pix] == 0
                if not keep.all():
                    q.lab, q.pix = q.lab[keep], q.pix[keep]
            del occ
        passes = p1 + p2
    else:
        det = {"hematoxylin": hema, "dab": dab}.get(channel)
        if det is None:
            det = hema + dab
        cand = _cand_grid(hema.shape)
        det = _det_map(det, params=params, um=um, origin=origin,
                       clipped=hema_c if channel == "hematoxylin" else None, cand=cand,
                       threshold=params.detection_threshold_od, mask=mask)
        src = {"dab": dab, "hema": hema}
        if channel == "dab":
            src["dabc"] = det
        elif params.min_dab_contrast_od > 0:
            src["dabc"] = _det_map(dab, params=params, um=um, origin=origin)
        passes = _pass_sparse(det, mask, params.detection_threshold_od, weight_for(det),
                              trim=True, cand=cand, **kw)
    passes = [p for p in passes if len(p.lab)]
    # the detection maps are done with: release them before the statistics' smoothed
    # hematoxylin is made (a tile's peak memory)
    hema_c = hema_weight = cand = None
    if channel == "dab+hematoxylin":
        del hdet, free
    else:
        del det
    src["hmax"] = _d.gaussian(hema, 1.0 * um)
    has_c = "dabc" in src
    stats = [_piece_stats(p, src, np.float32(params.dab_threshold_1_od)) for p in passes]
    keys = ["count", "sum_x", "sum_y", "sum_dab", "sum_hema", "sum_dabpos", "dmax", "hmax"] + (
        ["sum_dabc"] if has_c else [])
    st = {k: np.concatenate([np.zeros(1)] + [s[k] for s in stats]) for k in keys}
    sizes = [len(s["label"]) for s in stats]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def paste(relabel: np.ndarray) -> np.ndarray:
        """relabel: new id per object (index = 1 + object index) -> full label image."""
        out = np.zeros(hema.shape, np.int32)
        flat = out.ravel()
        for p, s, k0 in zip(passes, stats, starts[:-1], strict=True):
            tab = np.zeros(int(p.lab.max()) + 1, np.int32)
            tab[s["label"]] = relabel[1 + k0:1 + k0 + len(s["label"])]
            flat[p.pix] = tab[p.lab]
        return out

    dmax = st.pop("dmax").astype(np.float32)
    hmax = st.pop("hmax").astype(np.float32)
    return st, dmax, hmax, has_c, paste


def _objects_dense(hema, dab, mask, *, params, um, px_area_um2, split_kwargs, origin):
    """Objects of both passes and their statistics, the chain run over the whole image."""
    hema_weight = None
    if params.split_by == "shape+hematoxylin":  # one smoothed weight shared by both passes
        hema_weight = _split_intensity(params, hema, hema, um)
    seg = dict(params=params, um=um, px_area_um2=px_area_um2, hema=hema,
               split_kwargs=split_kwargs, origin=origin, hema_weight=hema_weight)
    channel = params.detection_channel
    if channel == "dab+hematoxylin":
        # pass 1: DAB-stained cell bodies (markers weighted by hematoxylin: one per nucleus)
        labels, dab_det = _segment(dab, mask, params.dab_detection_threshold_od, **seg)
        # pass 2: hematoxylin nuclei outside the stained cells -> (negative) cells
        free = (labels == 0).view(np.uint8)
        gap = int(round(params.nucleus_exclusion_um * um))
        if gap > 0:
            free = cv2.erode(free, cv2.getStructuringElement(
                cv2.MORPH_ELLIPSE, (2 * gap + 1, 2 * gap + 1)))
        free = free.view(bool) if mask is None else (free.view(bool) & mask)
        nuclei, _ = _segment(hema, free, params.detection_threshold_od, trim=False, **seg)
        na = int(labels.max())
        labels = np.where(nuclei > 0, nuclei + na, labels).astype(np.int32)
        del nuclei, free
    else:
        det = {"hematoxylin": hema, "dab": dab}.get(channel)
        if det is None:  # optical density sum
            det = hema + dab
        labels, det = _segment(det, mask, params.detection_threshold_od, **seg)
        dab_det = det if channel == "dab" else None
        del det
    if dab_det is None and params.min_dab_contrast_od > 0:
        dab_det = _d.background_subtract(
            _d.gaussian(np.maximum(dab, 0), params.smoothing_sigma_um * um),
            params.background_radius_um * um, origin)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return labels, {"count": np.zeros(1)}, None, None, False
    t1 = np.float32(params.dab_threshold_1_od)
    idx = np.flatnonzero(labels.ravel())
    values = {"dab": dab, "hema": hema, "dabpos": (dab >= t1).view(np.uint8)}
    if dab_det is not None:
        values["dabc"] = dab_det
    st = _d.object_stats(labels, n, values, idx)
    lab_o = labels.ravel()[idx]
    dmax = np.zeros(n + 1, np.float32)
    np.maximum.at(dmax, lab_o, dab.ravel()[idx])
    hmax = np.zeros(n + 1, np.float32)
    # nucleus evidence: maximum of the hematoxylin smoothed over 1 µm
    np.maximum.at(hmax, lab_o, _d.gaussian(hema, 1.0 * um).ravel()[idx])
    return labels, st, dmax, hmax, dab_det is not None


def detect_cells(
    hema_od: np.ndarray,
    dab_od: np.ndarray,
    *,
    mpp: float,
    params: CellParams | None = None,
    mask: np.ndarray | None = None,
    origin: tuple[int, int] = (0, 0),
    sparse: bool = True,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Detect cells, split touching ones, measure DAB and grade each cell.

    Parameters
    ----------
    hema_od, dab_od : ndarray of float, (H, W)
        Hematoxylin and DAB concentration, log10 OD relative to the background.
    mpp : float
        Pixel size (µm/px) used to convert the µm parameters (use the assumed size when the
        true one is unknown; physical columns are then the caller's to blank).
    params : CellParams, optional
        Detection parameters (default ``CellParams()``).
    mask : ndarray of bool, (H, W), optional
        Where cells may be (analysed tissue); None = everywhere.
    origin : (int, int)
        (x, y) of the image's top-left pixel in slide coordinates; anchors the coarse
        background grid so that a tile and the whole slide give the same cells.
    sparse : bool
        Run the detection chain only on rectangles around the foreground (default; several
        times faster on sections where cells cover a small part of the tissue). False runs it
        over the whole image; both give the same cells (the sparse evaluation keeps enough
        context around every rectangle, see the module source).

    Returns
    -------
    cells : DataFrame
        One row per cell, columns :data:`CELL_COLUMNS`: ``cell_id`` (= its label), centroid
        ``x_px``/``y_px`` (column/row, image pixels), ``area_px``/``area_um2`` of the detected
        object, ``diameter_um`` (equivalent circle), ``dab_mean_od`` (mean DAB of the graded
        compartment), ``dab_max_od`` (object maximum of the DAB), ``hema_max_od`` (object maximum of the
        hematoxylin smoothed over 1 µm),
        ``dab_positive_fraction``, ``hema_mean_od`` (object), ``nucleus_dab_mean_od`` and
        ``cell_dab_mean_od``, ``grade`` (0–3) and ``positive``.
    labels : ndarray of int32, (H, W)
        Object labels (value = ``cell_id``; 0 = no cell).

    Raises
    ------
    InputError
        Arrays of the wrong shape or type, or an invalid pixel size.
    """
    params = params or CellParams()
    hema = _check_od("hema_od", hema_od)
    dab = _check_od("dab_od", dab_od, hema.shape)
    if mpp is None or not (np.isfinite(mpp) and mpp > 0):
        raise InputError(f"detect_cells needs a positive pixel size `mpp` (µm/px), got {mpp!r}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != hema.shape:
            raise InputError(f"`mask` has shape {mask.shape}, `hema_od` has {hema.shape}")
        mask = np.ascontiguousarray(mask, dtype=bool)
    um = 1.0 / float(mpp)  # px per µm
    px_area_um2 = float(mpp) ** 2

    split_kwargs = dict(min_diameter_px=params.cell_min_diameter_um * um,
                        max_diameter_px=params.cell_max_diameter_um * um,
                        sigma_px=params.split_sigma_um * um,
                        merge_ratio=params.split_merge_ratio, split=params.split_touching)
    t1 = np.float32(params.dab_threshold_1_od)
    need_cell = params.cell_expansion_um > 0 and params.compartment in ("cytoplasm", "cell")
    if sparse and not need_cell:
        st, dmax, hmax, has_c, paste = _objects_sparse(
            hema, dab, mask, params=params, um=um, px_area_um2=px_area_um2,
            split_kwargs=split_kwargs, origin=origin)
        n = len(st["count"]) - 1
        labels = None
    else:
        labels, st, dmax, hmax, has_c = _objects_dense(
            hema, dab, mask, params=params, um=um, px_area_um2=px_area_um2,
            split_kwargs=split_kwargs, origin=origin)
        n = len(st["count"]) - 1
    if n == 0:
        return _empty_table(), np.zeros(hema.shape, np.int32)

    # area filter on the detected objects
    area_px = st["count"]
    keep = (area_px * px_area_um2 >= params.min_area_um2) & \
        (area_px * px_area_um2 <= params.max_area_um2)
    keep[0] = False
    relabel = np.zeros(n + 1, np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = paste(relabel) if labels is None else relabel[labels]
    kept = np.flatnonzero(keep)
    m = len(kept)
    if m == 0:
        return _empty_table(), np.zeros(hema.shape, np.int32)

    cnt = area_px[kept]
    nuc_dab = st["sum_dab"][kept] / cnt
    nuc_pos = st["sum_dabpos"][kept] / cnt
    if need_cell:
        cells_lab = _d.expand_labels(labels, params.cell_expansion_um * um, mask)
        cst = _d.object_stats(cells_lab, m, {"dab": dab, "dabpos": (dab >= t1).view(np.uint8)})
        ccount = cst["count"][1:]
        cell_dab = cst["sum_dab"][1:] / np.maximum(ccount, 1)
        cell_pos = cst["sum_dabpos"][1:] / np.maximum(ccount, 1)
        ring = np.maximum(ccount - cnt, 0)
        cyto_dab = np.where(ring > 0, (cst["sum_dab"][1:] - st["sum_dab"][kept]) /
                            np.maximum(ring, 1), np.nan)
        cyto_pos = np.where(ring > 0, (cst["sum_dabpos"][1:] - st["sum_dabpos"][kept]) /
                            np.maximum(ring, 1), 0.0)
    else:
        cell_dab, cell_pos = nuc_dab, nuc_pos
        cyto_dab, cyto_pos = np.full(m, np.nan), np.zeros(m)
    if params.compartment == "nucleus":
        meas, frac = nuc_dab, nuc_pos
    elif params.compartment == "cell":
        meas, frac = cell_dab, cell_pos
    else:
        meas, frac = np.nan_to_num(cyto_dab, nan=0.0), cyto_pos
    contrast = st["sum_dabc"][kept] / cnt if has_c else np.full(m, np.nan)
    grade, positive = grade_cells(meas, frac, params, contrast=contrast)
    if params.min_nucleus_od > 0:  # a positive cell has a nucleus (as in QuPath)
        has_nucleus = hmax[kept] >= params.min_nucleus_od
        positive &= has_nucleus
        grade = np.where(positive, grade, 0).astype(np.int8)
    area_um2 = cnt * px_area_um2
    table = pd.DataFrame({
        "cell_id": np.arange(1, m + 1, dtype=np.int64),
        "x_px": st["sum_x"][kept] / cnt,
        "y_px": st["sum_y"][kept] / cnt,
        "area_px": cnt.astype(np.int64),
        "area_um2": area_um2,
        "diameter_um": 2.0 * np.sqrt(area_um2 / np.pi),
        "object_area_um2": area_um2,
        "dab_mean_od": meas.astype(np.float64),
        "dab_max_od": dmax[kept].astype(np.float64),
        "dab_positive_fraction": frac.astype(np.float64),
        "dab_contrast_od": contrast,
        "hema_mean_od": st["sum_hema"][kept] / cnt,
        "hema_max_od": hmax[kept].astype(np.float64),
        "nucleus_dab_mean_od": nuc_dab,
        "cell_dab_mean_od": cell_dab,
        "grade": grade,
        "positive": positive,
    })
    return table, labels


# ----------------------------------------------------------------------------------------------
# engine halves


def measure(ctx: ImageContext) -> Measurements:
    """Detect and measure cells on one image or tile (the ``measure`` half of the engine).

    Cells are searched in ``ctx.analysed``; each cell gets its ``compartment`` (code under the
    centroid; vessel counts as perivascular) and the ``fiber_id`` of the enclosing fiber or the
    nearest one within ``cell_max_diameter_um`` (0 = none). Positions are in the image's pixel
    coordinates; the caller keeps the cells whose centroid is in the owned core.
    """
    from .score import Measurements

    params: CellParams = ctx.settings.cells
    cells, labels = detect_cells(ctx.hema_od, ctx.dab_od, mpp=ctx.size_mpp, params=params,
                                 mask=ctx.analysed, origin=tuple(ctx.origin))
    h, w = labels.shape
    if len(cells):
        r = np.clip(np.rint(cells["y_px"].to_numpy()).astype(np.intp), 0, h - 1)
        c = np.clip(np.rint(cells["x_px"].to_numpy()).astype(np.intp), 0, w - 1)
        codes = np.asarray(ctx.compartments)[r, c]
        cells["compartment_code"] = codes.astype(np.int8)
        cells["compartment"] = pd.Categorical(
            [COMPARTMENT_NAMES.get(int(k), "outside") for k in codes],
            categories=["outside", "fiber", "endomysium", "perimysium", "perivascular"])
        fibers = np.asarray(ctx.fibers)
        if fibers.any():
            cells["fiber_id"] = _d.nearest_label_at(
                fibers, r, c, params.cell_max_diameter_um / ctx.size_mpp).astype(np.int64)
        else:
            cells["fiber_id"] = np.zeros(len(cells), np.int64)
    else:
        cells["compartment_code"] = pd.Series(dtype=np.int8)
        cells["compartment"] = pd.Series(dtype=object)
        cells["fiber_id"] = pd.Series(dtype=np.int64)
    if ctx.mpp is None:  # physical columns are unknown
        for col in ("area_um2", "diameter_um", "object_area_um2"):
            cells[col] = np.nan
    # no additive counts: every cell number is derived in `summarize` from the owned cells
    return Measurements(cells=cells, counts={}, labels={"cells": labels})


def find_clusters(xy_um: np.ndarray, *, distance_um: float, min_cells: int) -> np.ndarray:
    """Cluster id per point (1, 2, ...; 0 = not in a cluster of ≥ ``min_cells``).

    Points closer than ``distance_um`` are linked (single linkage); a connected group of at
    least ``min_cells`` points is a cluster. Ids are ordered by decreasing size.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, float).reshape(-1, 2)
    n = len(xy)
    out = np.zeros(n, np.int64)
    if n < min_cells:
        return out
    pairs = cKDTree(xy).query_pairs(distance_um, output_type="ndarray")
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    sizes = np.bincount(comp)
    big = np.flatnonzero(sizes >= min_cells)
    big = big[np.argsort(-sizes[big], kind="stable")]
    ids = np.zeros(len(sizes), np.int64)
    ids[big] = np.arange(1, len(big) + 1)
    return ids[comp]


def allred_proportion_score(positive_pct: float) -> int:
    """Allred proportion score 0–5 from the percentage of positive cells."""
    if not np.isfinite(positive_pct) or positive_pct <= 0:
        return 0
    for score, upper in ((1, 1.0), (2, 10.0), (3, 100 / 3), (4, 200 / 3)):
        if positive_pct < upper:
            return score
    return 5


def jdm_level(*, per_hpf: float, n_clusters: int, diffuse_per_hpf: float,
              level1_per_hpf: float) -> float:
    """JDM-biopsy-score-tool style infiltrate level (0–4) over a whole section.

    The JDM tool grades CD3/CD68 per high-power field as < 4 cells, ≥ 4 cells, one cluster,
    > 2 clusters, diffuse. Adapted to a whole-section count:

    * 0: mean positive cells per HPF < ``level1_per_hpf`` and no cluster;
    * 1: mean ≥ ``level1_per_hpf`` per HPF, no cluster;
    * 2: one or two clusters (≥ ``cluster_min_cells`` positive cells);
    * 3: more than two clusters;
    * 4: diffuse — mean ≥ ``diffuse_per_hpf`` positive cells per HPF over the whole section.
    """
    if not np.isfinite(per_hpf):
        return float("nan")
    if per_hpf >= diffuse_per_hpf:
        return 4.0
    if n_clusters > 2:
        return 3.0
    if n_clusters >= 1:
        return 2.0
    return 1.0 if per_hpf >= level1_per_hpf else 0.0


def summarize(*, cells: pd.DataFrame, fibers: pd.DataFrame, counts: dict, mpp: float | None,
              settings: Any, areas_mm2: dict) -> dict:
    """Slide-level cell numbers from the whole-slide cell table (the ``summarize`` half).

    Adds ``cluster_id`` (0 = none), ``x_um``/``y_um`` (NaN when the pixel size is unknown)
    to ``cells`` in place. Densities are positive cells per mm² (of analysed tissue, or of a
    compartment: perivascular area = vessel + perivascular); every µm/mm² number is NaN when
    ``mpp`` is None. Clusters use the assumed pixel size when the true one is unknown.
    """
    params: CellParams = settings.cells
    n = int(len(cells))
    if n:
        pos = cells["positive"].to_numpy(bool)
        grade = cells["grade"].to_numpy(int)
    else:
        pos = np.zeros(0, bool)
        grade = np.zeros(0, int)
    npos = int(pos.sum())
    g = [int(np.sum(grade == k)) for k in (1, 2, 3)]
    scale = mpp if mpp else float(settings.tiling.assumed_mpp_unknown)
    if n:
        xy_um = cells[["x_px", "y_px"]].to_numpy(float) * scale
        cid = np.zeros(n, np.int64)
        if npos:
            cid[pos] = find_clusters(xy_um[pos], distance_um=params.cluster_distance_um,
                                     min_cells=params.cluster_min_cells)
        cells["cluster_id"] = cid
        cells["x_um"] = xy_um[:, 0] if mpp else np.nan
        cells["y_um"] = xy_um[:, 1] if mpp else np.nan
        n_clusters = int(cid.max()) if len(cid) else 0
    else:
        for col in ("cluster_id", "x_um", "y_um"):
            cells[col] = pd.Series(dtype=np.int64 if col == "cluster_id" else float)
        n_clusters = 0
    nan = float("nan")

    def per(count: int, area: float) -> float:
        return count / area if mpp and area and np.isfinite(area) and area > 0 else nan

    comp_col = cells["compartment"].astype(str).to_numpy() if n and "compartment" in cells \
        else np.array([""] * n)
    n_endo = int(np.sum(pos & (comp_col == "endomysium")))
    n_peri = int(np.sum(pos & (comp_col == "perimysium")))
    n_pv = int(np.sum(pos & (comp_col == "perivascular")))
    analysed = areas_mm2.get("analysed_area_mm2", nan)
    pv_area = areas_mm2.get("area_mm2_vessel", 0.0) + areas_mm2.get("area_mm2_perivascular", 0.0)
    positive_pct = 100.0 * npos / n if n else nan
    h_score = 100.0 * (g[0] + 2 * g[1] + 3 * g[2]) / n if n else nan
    prop = allred_proportion_score(positive_pct)
    intensity = int(round(float(grade[pos].mean()))) if npos else 0
    allred = prop + intensity if prop > 0 else 0
    per_mm2 = per(npos, analysed)
    n_fib = int(len(fibers))
    per_hpf = per_mm2 * params.hpf_area_mm2
    return {
        "cells_detected": n,
        "cells_positive": npos,
        "cells_negative": n - npos,
        "positive_pct": positive_pct,
        "cells_grade_1": g[0],
        "cells_grade_2": g[1],
        "cells_grade_3": g[2],
        "cells_per_mm2": per_mm2,
        "cells_per_100_fibers": 100.0 * npos / n_fib if n_fib else nan,
        "cells_endomysial": n_endo,
        "cells_perimysial": n_peri,
        "cells_perivascular": n_pv,
        "cells_per_mm2_endomysial": per(n_endo, areas_mm2.get("area_mm2_endomysium", nan)),
        "cells_per_mm2_perimysial": per(n_peri, areas_mm2.get("area_mm2_perimysium", nan)),
        "cells_per_mm2_perivascular": per(n_pv, pv_area),
        "clusters_10plus": n_clusters,
        "cells_in_clusters": int(np.count_nonzero(cells["cluster_id"].to_numpy())) if n else 0,
        "h_score_cells": h_score,
        "allred_proportion": prop,
        "allred_intensity": intensity,
        "allred_score": allred,
        "cells_per_hpf": per_hpf,
        "jdm_level": jdm_level(per_hpf=per_hpf, n_clusters=n_clusters,
                               diffuse_per_hpf=params.jdm_diffuse_cells_per_hpf,
                               level1_per_hpf=params.jdm_cells_per_hpf),
    }

