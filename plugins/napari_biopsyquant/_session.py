"""Viewer-free review state of one slide: scoring, exclusions and manual corrections.

Kept free of Qt so that it is tested without a display; the dock widget only forwards user
actions here and draws what comes back.

Two ways to score, one result type (:class:`~biopsyquant.score.ScoreResult`):

* **whole image** (level 0 at most ``settings.tiling.max_whole_image_px`` pixels, or an
  in-memory array): :func:`biopsyquant.score.score_image` on the pixels, with full-resolution
  label images for display. For a file this gives exactly the numbers of the batch engine
  (``biopsyquant.batch.score_one``), which scores such files in one piece too.
* **tiled** (a file whose level 0 is larger): the batch's whole-slide engine
  (:mod:`biopsyquant.wsi`: one stain model and tissue mask from the thumbnail, tiles with
  overlap, objects owned by the tile holding their centroid), tile by tile so that the widget
  can show progress and cancel between tiles; labels are the engine's downsampled
  ``overview_*`` rasters.

Long steps are generators (:meth:`ReviewSession.score_steps`) that yield progress and return the
result; :meth:`ReviewSession.score` drains them synchronously (tests, scripts).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from biopsyquant.errors import InputError
from biopsyquant.illumination import FlatField
from biopsyquant.score import COMPARTMENT_NAMES, ScoreResult, score_image, summarize
from biopsyquant.settings import Settings
from biopsyquant.stains import stain_od

__all__ = ["AUTO", "MANUAL", "ReviewSession", "Progress"]

#: value of the ``source`` column of cells
AUTO, MANUAL = "auto", "manual"
#: a deleted detection is matched again after re-scoring when a new one lies this close (µm)
REMATCH_UM = 3.0
#: radius (µm) of the disk in which the DAB of a manually added cell is measured
MANUAL_CELL_RADIUS_UM = 4.0

#: progress message: (steps done, steps total, text)
Progress = tuple[int, int, str]


@dataclass
class ReviewSession:
    """One slide under review.

    Attributes
    ----------
    image : ndarray of uint8, (H, W, 3) or None
        Level-0 pixels of the slide, for whole-image scoring; None for tiled scoring.
    settings : Settings
    mpp : float or None
        µm per pixel (None = unknown).
    mpp_source : str
        ``svs``/``ome``/``tiff-resolution`` (from the file) or ``user`` (typed in the widget;
        passed to the engine as an override).
    name : str
    path : str or None
        File the image came from (recorded in exports; read tile by tile when ``tiled``).
    tiled : bool
        Score through the whole-slide tiled engine from ``path`` instead of ``image``.
    exclusions : list of ndarray (N, 2)
        Exclusion polygons in level-0 pixel (x, y).
    result : ScoreResult or None
        The automatic result of the last scoring.
    deleted : set of int
        ``cell_id`` of automatic detections the user marked as false.
    added : list of (float, float)
        Level-0 pixel (x, y) of cells the user added.
    """

    image: np.ndarray | None
    settings: Settings
    mpp: float | None = None
    mpp_source: str = "unknown"
    name: str = "image"
    path: str | None = None
    tiled: bool = False
    exclusions: list[np.ndarray] = field(default_factory=list)
    result: ScoreResult | None = None
    deleted: set[int] = field(default_factory=set)
    added: list[tuple[float, float]] = field(default_factory=list)  # (x_px, y_px)

    def __post_init__(self) -> None:
        if self.image is None and not (self.tiled and self.path):
            raise InputError(f"{self.name}: a review session needs the image pixels or, for "
                             "tiled scoring, the slide's file path")

    # ------------------------------------------------------------------ scoring
    @property
    def size_mpp(self) -> float:
        """Pixel size used to convert µm sizes (the assumed one when unknown)."""
        return float(self.mpp or self.settings.tiling.assumed_mpp_unknown)

    def _mpp_override(self) -> float | None:
        return self.mpp if self.mpp_source == "user" else None

    def score_steps(self) -> Generator[Progress, None, ScoreResult]:
        """Score with the current settings and exclusions, yielding ``(done, total, text)``.

        Corrections survive re-scoring: a deleted detection stays deleted when the new result
        has a detection within ``REMATCH_UM`` of it, and added cells are kept unless they now
        lie in an exclusion.

        Returns
        -------
        ScoreResult
            Also stored in ``self.result``.
        """
        old_deleted = self._deleted_xy()
        polys = [np.asarray(p, float) for p in self.exclusions] or None
        if self.tiled:
            result = yield from self._score_tiled(polys)
        else:
            yield 0, 1, f"scoring {self.name}"
            result = score_image(self.image, settings=self.settings, mpp=self.mpp,
                                 name=self.name, exclusions=polys)
            if self.mpp is not None:
                result.summary["mpp_source"] = self.mpp_source
                result.provenance["mpp_source"] = self.mpp_source
                result.mpp_source = self.mpp_source
            if self.path:
                result.provenance["path"] = str(self.path)
            yield 1, 1, "done"
        self.result = result
        self._carry_corrections(old_deleted)
        return result

    def _score_tiled(self, polys) -> Generator[Progress, None, ScoreResult]:
        from biopsyquant.slide import open_slide
        from biopsyquant.wsi import measure_tile, merge_tiles, prepare_slide, tile_tasks

        t0 = time.perf_counter()
        override = self._mpp_override()
        with open_slide(self.path, mpp=override) as slide:
            yield 0, 1, f"{self.name}: stain model and tissue from the thumbnail"
            plan = prepare_slide(slide, settings=self.settings, exclusions=polys,
                                 name=self.name, tiled=True)
            tasks = tile_tasks(plan, mpp_override=override)
            results = []
            for i, task in enumerate(tasks):
                yield i, len(tasks), f"{self.name}: tile {i + 1}/{len(tasks)}"
                results.append(measure_tile(task, slide=slide))
            yield len(tasks), len(tasks), f"{self.name}: merging {len(tasks)} tiles"
            return merge_tiles(plan, results, seconds=time.perf_counter() - t0)

    def score(self) -> ScoreResult:
        """Score synchronously (drains :meth:`score_steps`)."""
        gen = self.score_steps()
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def set_exclusions(self, polygons: list[np.ndarray]) -> ScoreResult:
        """Replace the exclusion polygons (level-0 x, y) and re-score synchronously."""
        self.exclusions = _clean_polygons(polygons)
        return self.score()

    # -------------------------------------------------------------- corrections
    def _require_result(self) -> ScoreResult:
        if self.result is None:
            raise InputError(f"{self.name}: score the slide before correcting or exporting it")
        return self.result

    def _deleted_xy(self) -> np.ndarray:
        res = self.result
        if res is None or not self.deleted or not len(res.cells):
            return np.zeros((0, 2))
        rows = res.cells[res.cells["cell_id"].isin(self.deleted)]
        return rows[["x_px", "y_px"]].to_numpy(float)

    def _carry_corrections(self, old_deleted_xy: np.ndarray) -> None:
        res = self.result
        self.deleted = set()
        if len(old_deleted_xy) and len(res.cells):
            from scipy.spatial import cKDTree

            tree = cKDTree(res.cells[["x_px", "y_px"]].to_numpy(float))
            d, j = tree.query(old_deleted_xy)
            ids = res.cells["cell_id"].to_numpy(np.int64)
            self.deleted = {int(ids[k]) for k, dd in zip(j, d, strict=True)
                            if dd <= REMATCH_UM / self.size_mpp}
        if self.added and self.exclusions:
            from skimage.measure import points_in_poly

            xy = np.asarray(self.added, float)
            inside = np.zeros(len(xy), bool)
            for p in self.exclusions:
                inside |= points_in_poly(xy, np.asarray(p, float))
            self.added = [a for a, out in zip(self.added, inside, strict=True) if not out]

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (rows, columns)."""
        if self.image is not None:
            return tuple(self.image.shape[:2])
        return tuple(int(s) for s in self._require_result().provenance["shape"][:2])

    def delete_cells(self, cell_ids) -> None:
        """Mark automatic detections as false positives (kept in exports, flagged)."""
        res = self._require_result()
        known = set(res.cells["cell_id"].astype(int).tolist()) if len(res.cells) else set()
        self.deleted |= {int(c) for c in cell_ids if int(c) in known}

    def add_cell(self, x_px: float, y_px: float) -> None:
        """Add a missed positive cell at level-0 pixel (x, y)."""
        self._require_result()
        h, w = self.shape
        if not (0 <= x_px < w and 0 <= y_px < h):
            raise InputError(f"{self.name}: added cell ({x_px:.0f}, {y_px:.0f}) lies outside "
                             f"the image ({w} x {h} px)")
        self.added.append((float(x_px), float(y_px)))

    def _patch(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self.image is not None:
            return np.ascontiguousarray(np.asarray(self.image[y0:y1, x0:x1])[..., :3])
        from biopsyquant.slide import open_slide

        with open_slide(self.path, mpp=self._mpp_override()) as slide:
            return np.ascontiguousarray(slide.read_region(x0, y0, x1 - x0, y1 - y0)[..., :3])

    def _manual_rows(self, res: ScoreResult) -> pd.DataFrame:
        """Rows of the added cells: DAB mean OD in a 4 µm disk, grade by the preset's cuts."""
        if not self.added:
            return pd.DataFrame()
        h, w = self.shape
        r = max(1, int(round(MANUAL_CELL_RADIUS_UM / self.size_mpp)))
        comp = res.labels.get("compartments")
        t1, t2, t3 = _grade_thresholds(self.settings)
        has_dab = "dab" in res.stain_model.names
        # the stain model's background is that of the flat-field corrected slide: read the
        # patch through the same correction
        flat = FlatField.from_dict(res.provenance.get("illumination"), shape=self.shape)
        rows = []
        start = int(res.cells["cell_id"].max()) + 1 if len(res.cells) else 1
        for k, (x, y) in enumerate(self.added):
            xi, yi = int(round(x)), int(round(y))
            y0, y1 = max(0, yi - r), min(h, yi + r + 1)
            x0, x1 = max(0, xi - r), min(w, xi + r + 1)
            patch = flat.apply(self._patch(x0, y0, x1, y1), origin=(x0, y0))
            yy, xx = np.mgrid[y0:y1, x0:x1]
            disk = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
            od = float(stain_od(patch, res.stain_model, "dab")[disk].mean()) if has_dab \
                else float("nan")
            grade = 3 if od >= t3 else 2 if od >= t2 else 1  # a cell the user adds is positive
            if comp is not None and comp.shape == (h, w):
                code = int(comp[min(yi, h - 1), min(xi, w - 1)])
                cname = COMPARTMENT_NAMES.get(code, "outside")
                cname = "perivascular" if cname == "vessel" else cname
            else:  # tiled result: no full-resolution compartment map
                code, cname = -1, "unknown"
            rows.append({
                "cell_id": start + k, "x_px": x, "y_px": y,
                "x_um": x * self.mpp if self.mpp else np.nan,
                "y_um": y * self.mpp if self.mpp else np.nan,
                "dab_mean_od": od, "grade": grade, "positive": True,
                "compartment_code": code, "compartment": cname,
            })
        return pd.DataFrame(rows)

    def cells_table(self, *, include_deleted: bool = True) -> pd.DataFrame:
        """Automatic detections (``source=auto``, ``deleted`` flag) plus manual additions."""
        res = self._require_result()
        auto = res.cells.copy()
        auto["source"] = AUTO
        auto["deleted"] = auto["cell_id"].isin(self.deleted) if len(auto) else \
            pd.Series([], dtype=bool)
        manual = self._manual_rows(res)
        if len(manual):
            manual["source"] = MANUAL
            manual["deleted"] = False
            auto = pd.concat([auto, manual], ignore_index=True)
        if not include_deleted and len(auto):
            auto = auto[~auto["deleted"].astype(bool)].reset_index(drop=True)
        return auto

    def summary(self) -> dict:
        """Slide summary after corrections (same columns as the batch ``slides.csv``).

        Without corrections this is the engine's summary; with them the engine's
        ``summarize`` runs again over the kept + added cells and the same pixel counts, so
        counts, densities, percentages and grades all follow the edit. Three columns record the
        edits: ``cells_positive_auto``, ``cells_deleted_manual``, ``cells_added_manual``.
        """
        res = self._require_result()
        if not self.deleted and not self.added:
            out = dict(res.summary)
        else:
            kept = self.cells_table(include_deleted=False).drop(columns=["source", "deleted"])
            out = {k: res.summary[k] for k in ("slide", "marker", "mpp", "mpp_source")
                   if k in res.summary}
            counts = res.counts or res.provenance.get("counts", {})
            counts = {k: np.asarray(v) if isinstance(v, list) else v for k, v in counts.items()}
            out.update(summarize(cells=kept, fibers=res.fibers, counts=counts, mpp=res.mpp,
                                 settings=res.settings))
        if res.settings.analysis == "cells":
            n_pos_auto = int(res.cells["positive"].astype(bool).sum()) \
                if len(res.cells) and "positive" in res.cells else 0
            out["cells_positive_auto"] = n_pos_auto
            out["cells_deleted_manual"] = len(self.deleted)
            out["cells_added_manual"] = len(self.added)
        return out

    # ------------------------------------------------------------------- export
    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write slides.csv / cells.csv / fibers.csv (batch schema) + exclusions GeoJSON."""
        from ._export import export_session

        return export_session(self, Path(out_dir))


def _clean_polygons(polygons) -> list[np.ndarray]:
    out = []
    for p in polygons:
        a = np.asarray(p, float).reshape(-1, 2)
        if len(a) >= 3:
            out.append(a)
    return out


def _grade_thresholds(settings: Settings) -> tuple[float, float, float]:
    for section in ("cells", "pixels", "mhc"):
        params = settings.sections.get(section)
        if params is None:
            continue
        vals = [getattr(params, f"dab_threshold_{i}_od", None) for i in (1, 2, 3)]
        if all(v is not None for v in vals):
            return tuple(float(v) for v in vals)  # type: ignore[return-value]
    return 0.2, 0.4, 0.6
