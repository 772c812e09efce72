"""Viewer-free review state of one slide: scoring, exclusions and manual corrections.

Kept free of Qt so that it is tested without a display; the dock widget only forwards user
actions here and draws what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from biopsyquant.score import COMPARTMENT_NAMES, ScoreResult, score_image, summarize
from biopsyquant.settings import Settings
from biopsyquant.stains import stain_od

#: value of the ``source`` column of cells
AUTO, MANUAL = "auto", "manual"


@dataclass
class ReviewSession:
    """One slide under review.

    Attributes
    ----------
    image : ndarray of uint8, (H, W, 3)
        Level-0 pixels of the slide (or of the field being reviewed).
    settings : Settings
    mpp : float or None
        µm per pixel (None = unknown).
    mpp_source : str
    name : str
    path : str or None
        File the image came from (recorded in exports).
    exclusions : list of ndarray (N, 2)
        Exclusion polygons in level-0 pixel (x, y).
    """

    image: np.ndarray
    settings: Settings
    mpp: float | None = None
    mpp_source: str = "unknown"
    name: str = "image"
    path: str | None = None
    exclusions: list[np.ndarray] = field(default_factory=list)
    result: ScoreResult | None = None
    deleted: set[int] = field(default_factory=set)
    added: list[tuple[float, float]] = field(default_factory=list)  # (x_px, y_px)

    # ------------------------------------------------------------------ scoring
    def score(self) -> ScoreResult:
        """Score the image with the current settings and exclusions (same call as batch)."""
        self.result = score_image(
            self.image, settings=self.settings, mpp=self.mpp, name=self.name,
            exclusions=[np.asarray(p, float) for p in self.exclusions] or None,
        )
        if self.mpp is not None:
            self.result.summary["mpp_source"] = self.mpp_source
            self.result.provenance["mpp_source"] = self.mpp_source
        self.deleted.clear()
        self.added.clear()
        return self.result

    def set_exclusions(self, polygons: list[np.ndarray]) -> ScoreResult:
        """Replace the exclusion polygons and re-score (manual cell edits are dropped)."""
        self.exclusions = [np.asarray(p, float).reshape(-1, 2) for p in polygons if len(p) >= 3]
        return self.score()

    # -------------------------------------------------------------- corrections
    def _require_result(self) -> ScoreResult:
        if self.result is None:
            raise RuntimeError("score the slide before correcting it")
        return self.result

    def delete_cells(self, cell_ids) -> None:
        """Mark automatic detections as false positives (kept in exports, flagged)."""
        res = self._require_result()
        known = set(res.cells["cell_id"].tolist()) if len(res.cells) else set()
        self.deleted |= {int(c) for c in cell_ids if int(c) in known}

    def add_cell(self, x_px: float, y_px: float) -> None:
        """Add a missed positive cell at level-0 pixel (x, y)."""
        self._require_result()
        h, w = self.image.shape[:2]
        if not (0 <= x_px < w and 0 <= y_px < h):
            raise ValueError(f"point ({x_px:.0f}, {y_px:.0f}) lies outside the image {w}x{h}")
        self.added.append((float(x_px), float(y_px)))

    def _manual_rows(self, res: ScoreResult) -> pd.DataFrame:
        if not self.added:
            return pd.DataFrame()
        xy = np.array(self.added)
        size_mpp = self.mpp or self.settings.tiling.assumed_mpp_unknown
        r = max(1, int(round(4.0 / size_mpp)))  # DAB measured in a disk of 4 µm radius
        dab = stain_od(self.image, res.stain_model, "dab") if "dab" in res.stain_model.names \
            else np.zeros(self.image.shape[:2], np.float32)
        comp = res.labels.get("compartments")
        t1, t2, t3 = _grade_thresholds(self.settings)
        rows = []
        start = int(res.cells["cell_id"].max()) + 1 if len(res.cells) else 1
        for k, (x, y) in enumerate(xy):
            xi, yi = int(round(x)), int(round(y))
            y0, y1 = max(0, yi - r), min(dab.shape[0], yi + r + 1)
            x0, x1 = max(0, xi - r), min(dab.shape[1], xi + r + 1)
            od = float(dab[y0:y1, x0:x1].mean())
            grade = 3 if od >= t3 else 2 if od >= t2 else 1  # a cell the user adds is positive
            code = int(comp[yi, xi]) if comp is not None else 2
            name = COMPARTMENT_NAMES.get(code, "outside")
            rows.append({
                "cell_id": start + k, "x_px": x, "y_px": y,
                "x_um": x * self.mpp if self.mpp else np.nan,
                "y_um": y * self.mpp if self.mpp else np.nan,
                "dab_mean_od": od, "grade": grade, "positive": True,
                "compartment": "perivascular" if name == "vessel" else name,
            })
        return pd.DataFrame(rows)

    def cells_table(self) -> pd.DataFrame:
        """Automatic detections (``source=auto``, ``deleted`` flag) plus manual additions."""
        res = self._require_result()
        auto = res.cells.copy()
        auto["source"] = AUTO
        auto["deleted"] = auto["cell_id"].isin(self.deleted) if len(auto) else []
        manual = self._manual_rows(res)
        if len(manual):
            manual["source"] = MANUAL
            manual["deleted"] = False
            auto = pd.concat([auto, manual], ignore_index=True)
        return auto

    def summary(self) -> dict:
        """Slide summary after corrections (same columns as the batch ``slides.csv``)."""
        res = self._require_result()
        if not self.deleted and not self.added:
            out = dict(res.summary)
        else:
            table = self.cells_table()
            kept = table[~table["deleted"].astype(bool)].drop(columns=["source", "deleted"])
            out = {k: res.summary[k] for k in ("slide", "marker", "mpp", "mpp_source")
                   if k in res.summary}
            out.update(summarize(cells=kept, fibers=res.fibers, counts=res.counts, mpp=res.mpp,
                                 settings=self.settings))
        n_pos_auto = int(res.cells["positive"].sum()) if len(res.cells) and \
            "positive" in res.cells else 0
        out["cells_positive_auto"] = n_pos_auto
        out["cells_deleted_manual"] = len(self.deleted)
        out["cells_added_manual"] = len(self.added)
        return out

    # ------------------------------------------------------------------- export
    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write slides.csv / cells.csv / fibers.csv (batch schema) + exclusions GeoJSON."""
        from ._export import export_session

        return export_session(self, Path(out_dir))


def _grade_thresholds(settings: Settings) -> tuple[float, float, float]:
    for section in ("cells", "pixels", "mhc"):
        params = settings.sections.get(section)
        if params is None:
            continue
        vals = [getattr(params, f"dab_threshold_{i}_od", None) for i in (1, 2, 3)]
        if all(v is not None for v in vals):
            return tuple(float(v) for v in vals)  # type: ignore[return-value]
    return 0.2, 0.4, 0.6
