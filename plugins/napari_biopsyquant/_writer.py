"""napari writers: Points -> biopsyquant ``cells.csv`` rows; Shapes -> exclusion GeoJSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _scale(attributes: dict) -> float:
    meta = attributes.get("metadata") or {}
    bq = meta.get("biopsyquant") or {}
    mpp = bq.get("mpp")
    return float(mpp) if mpp else float("nan")


def write_cells(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a Points layer (data in level-0 pixel row, col) as a cells table (CSV)."""
    pts = np.asarray(data, float).reshape(-1, 2)
    features = attributes.get("features")
    df = pd.DataFrame(features).reset_index(drop=True) if features is not None else \
        pd.DataFrame(index=range(len(pts)))
    df["y_px"] = pts[:, 0]
    df["x_px"] = pts[:, 1]
    mpp = _scale(attributes)
    df["x_um"] = df["x_px"] * mpp
    df["y_um"] = df["y_px"] * mpp
    from biopsyquant._atomic import atomic_write_text

    atomic_write_text(Path(path), df.to_csv(index=False))
    return [str(path)]


def write_exclusions(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a Shapes layer's polygons (row, col) as GeoJSON in level-0 pixel (x, y)."""
    from biopsyquant.tissue import save_exclusions

    polys = [np.asarray(s, float)[:, ::-1] for s in data if len(s) >= 3]
    save_exclusions(polys, path)
    return [str(path)]
