"""Turn a ScoreResult into napari layer data (no Qt; used by the widget and tests)."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: RGBA per cell grade (0 negative .. 3 strong)
GRADE_COLORS = {
    0: (0.25, 0.45, 1.0, 1.0),
    1: (1.0, 0.9, 0.1, 1.0),
    2: (1.0, 0.55, 0.0, 1.0),
    3: (0.85, 0.0, 0.0, 1.0),
}
#: colours of the MHC-I grade of fibers (label value = grade + 1) and DAB classes
FIBER_GRADE_COLORS = {1: (0.3, 0.6, 1.0, 0.5), 2: (1.0, 0.9, 0.1, 0.6),
                      3: (1.0, 0.55, 0.0, 0.6), 4: (0.85, 0.0, 0.0, 0.6)}
DAB_CLASS_COLORS = {1: (1.0, 0.9, 0.1, 0.7), 2: (1.0, 0.55, 0.0, 0.7), 3: (0.8, 0.0, 0.0, 0.8)}


def cell_colors(cells: pd.DataFrame) -> np.ndarray:
    """(N, 4) RGBA per cell by grade; deleted cells are transparent."""
    if not len(cells):
        return np.zeros((0, 4))
    grade = cells.get("grade", pd.Series(np.zeros(len(cells)))).fillna(0).astype(int)
    cols = np.array([GRADE_COLORS.get(int(g), GRADE_COLORS[3]) for g in grade], float)
    if "deleted" in cells:
        cols[cells["deleted"].astype(bool).to_numpy(), 3] = 0.0
    return cols


def points_data(cells: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Point coordinates (row, col) in level-0 pixels and the features table."""
    if not len(cells):
        return np.zeros((0, 2)), pd.DataFrame({"cell_id": pd.Series([], dtype=int)})
    data = cells[["y_px", "x_px"]].to_numpy(float)
    keep = [c for c in ("cell_id", "grade", "positive", "dab_mean_od", "compartment",
                        "cluster_id", "source") if c in cells]
    return data, cells[keep].reset_index(drop=True)


def fiber_grade_labels(fibers_lab: np.ndarray, fibers: pd.DataFrame) -> np.ndarray | None:
    """Label image whose value is MHC-I grade + 1 per fiber (None without grades)."""
    if fibers_lab is None or not len(fibers) or "mhc_grade" not in fibers:
        return None
    lut = np.zeros(int(fibers_lab.max()) + 1, np.uint8)
    ids = fibers["fiber_id"].to_numpy(int)
    ok = ids < len(lut)
    lut[ids[ok]] = fibers["mhc_grade"].fillna(0).to_numpy(int)[ok] + 1
    return lut[fibers_lab]
