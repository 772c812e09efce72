"""Turn a ScoreResult into napari layer data (no Qt; used by the widget and tests).

Colours are fixed per class so that pictures of different slides compare: cell grade
0 (negative, blue) / 1+ yellow / 2+ orange / 3+ red; the same ramp for MHC-I fiber grades and
DAB pixel classes.
"""

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
#: RGBA per cell compartment
COMPARTMENT_COLORS = {
    "fiber": (0.6, 0.6, 0.6, 1.0),
    "endomysium": (0.1, 0.8, 0.2, 1.0),
    "perimysium": (0.75, 0.2, 0.9, 1.0),
    "perivascular": (0.0, 0.85, 0.95, 1.0),
    "vessel": (0.0, 0.85, 0.95, 1.0),
}
UNKNOWN_COLOR = (1.0, 1.0, 1.0, 1.0)
#: colours of the MHC-I grade of fibers: label value = grade + 1 (1 = negative)
FIBER_GRADE_COLORS = {1: (0.3, 0.6, 1.0, 0.45), 2: (1.0, 0.9, 0.1, 0.55),
                      3: (1.0, 0.55, 0.0, 0.6), 4: (0.85, 0.0, 0.0, 0.6),
                      5: (0.6, 0.6, 0.6, 0.35)}
#: label value of a fiber that was not scored (too small, cut by an exclusion ...)
FIBER_NOT_SCORED = 5
#: colours of DAB pixel classes 1+ .. 3+
DAB_CLASS_COLORS = {1: (1.0, 0.9, 0.1, 0.7), 2: (1.0, 0.55, 0.0, 0.75), 3: (0.8, 0.0, 0.0, 0.85)}
#: features shown per point (when present in the cells table)
POINT_FEATURES = ("cell_id", "grade", "positive", "dab_mean_od", "compartment", "fiber_id",
                  "cluster_id", "source")


def cell_colors(cells: pd.DataFrame, by: str = "grade") -> np.ndarray:
    """(N, 4) RGBA per cell, by ``"grade"`` or ``"compartment"``; deleted cells transparent."""
    if not len(cells):
        return np.zeros((0, 4))
    if by == "compartment" and "compartment" in cells:
        cols = np.array([COMPARTMENT_COLORS.get(str(c), UNKNOWN_COLOR)
                         for c in cells["compartment"]], float)
    else:
        grade = pd.to_numeric(cells.get("grade", pd.Series(np.zeros(len(cells)))),
                              errors="coerce").fillna(0).astype(int)
        cols = np.array([GRADE_COLORS.get(int(g), GRADE_COLORS[3]) for g in grade], float)
    if "deleted" in cells:
        cols[cells["deleted"].astype(bool).to_numpy(), 3] = 0.0
    return cols


def points_data(cells: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Point coordinates (row, col) in level-0 pixels and the features table."""
    if not len(cells):
        return np.zeros((0, 2)), pd.DataFrame({"cell_id": pd.Series([], dtype=int)})
    data = cells[["y_px", "x_px"]].to_numpy(float)
    keep = [c for c in POINT_FEATURES if c in cells]
    return data, cells[keep].reset_index(drop=True)


def feature_defaults(features: pd.DataFrame) -> dict:
    """Values napari gives a point the user adds (``cell_id`` -1 marks a manual cell)."""
    out = {}
    for c in features.columns:
        if c == "cell_id":
            out[c] = -1
        elif c == "source":
            out[c] = "manual"
        elif c == "positive":
            out[c] = True
        elif c == "grade":
            out[c] = 1
        elif features[c].dtype.kind in "iu":
            out[c] = 0
        elif features[c].dtype.kind == "f":
            out[c] = np.nan
        elif features[c].dtype.kind == "b":
            out[c] = False
        else:
            out[c] = ""
    return out


def fiber_grade_labels(fibers_lab: np.ndarray | None, fibers: pd.DataFrame) -> np.ndarray | None:
    """Label image whose value is MHC-I grade + 1 per fiber, ``FIBER_NOT_SCORED`` for fibers
    without a grade (None when the table has no grades)."""
    if fibers_lab is None or not len(fibers) or "mhc_grade" not in fibers:
        return None
    n = int(max(fibers_lab.max(), fibers["fiber_id"].max())) + 1
    lut = np.zeros(n, np.uint8)
    ids = fibers["fiber_id"].to_numpy(int)
    grade = pd.to_numeric(fibers["mhc_grade"], errors="coerce").fillna(-1).to_numpy(int)
    lut[ids] = np.where(grade >= 0, grade + 1, FIBER_NOT_SCORED)
    lut[0] = 0
    return lut[fibers_lab]


def overview_fiber_grade(code: np.ndarray) -> np.ndarray:
    """Tiled results' ``overview_fiber_code`` (1 = fiber without class, grade + 2) -> grade + 1."""
    code = np.asarray(code, np.int16)
    return np.where(code >= 2, code - 1, 0).astype(np.uint8)
