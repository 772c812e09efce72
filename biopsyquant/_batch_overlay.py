"""QC overlay pictures of a scored slide (``overlays/<slide>.png``).

Drawn on the downsampled overview that :func:`biopsyquant.wsi.score_slide` keeps (longest side
about 2,000 px): the tissue outline, excluded regions hatched, fiber outlines (coloured by
MHC-I grade for MHC-I), cells as dots coloured by their DAB grade, positive capillaries as
rings, and for pixel scoring the pixels tinted by DAB class. A side panel names the slide,
the marker, the key numbers, the colour legend and a scale bar.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ._atomic import atomic_write

#: colours (RGB 0-255) of DAB grades 0 (negative) .. 3 (3+)
GRADE_COLOURS = {0: (40, 90, 230), 1: (250, 220, 30), 2: (255, 140, 0), 3: (220, 20, 20)}
TINT = {1: (255, 235, 0), 2: (255, 140, 0), 3: (230, 0, 0)}
FIBER_PLAIN = (0, 200, 220)
FIBER_UNSCORED = (150, 150, 150)
CAPILLARY = (230, 0, 230)
TISSUE_LINE = (0, 120, 0)
KEY_NUMBERS = ("tissue_area_mm2", "analysed_area_mm2", "n_fibers", "cells_positive",
               "cells_per_mm2", "cells_per_100_fibers", "fibers_positive_pct", "mhc_grade_0_5",
               "mhc_pattern", "positive_area_pct", "h_score", "dab_mean_od",
               "positive_area_pct_fibers", "positive_area_pct_interstitium",
               "positive_capillaries")


def _edges(mask: np.ndarray) -> np.ndarray:
    e = np.zeros(mask.shape, bool)
    e[:-1] |= mask[:-1] != mask[1:]
    e[1:] |= mask[:-1] != mask[1:]
    e[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    e[:, 1:] |= mask[:, :-1] != mask[:, 1:]
    return e


def draw_overlay(result) -> np.ndarray:
    """Overview RGB (uint8, (h, w, 3)) with the detections of ``result`` drawn on it."""
    import cv2

    labels = result.labels
    rgb = labels.get("overview_rgb")
    if rgb is None:
        raise ValueError("result has no overview image (score it with biopsyquant.wsi)")
    img = np.array(rgb[..., :3], dtype=np.uint8, copy=True)
    h, w = img.shape[:2]
    ds = float(result.provenance.get("overview_downsample", 1.0))
    dab = labels.get("overview_dab_class")
    if dab is not None and result.settings.analysis == "pixels":
        for cls, col in TINT.items():  # tint only the pixels of each class (no float image)
            m = dab == cls
            mixed = 0.45 * img[m].astype(np.float32) + 0.55 * np.asarray(col, np.float32)
            img[m] = mixed.clip(0, 255).astype(np.uint8)
    tissue = labels.get("overview_tissue")
    if tissue is not None:
        img[_edges(tissue.astype(bool)) & ~tissue.astype(bool)] = TISSUE_LINE
    excl = labels.get("overview_excluded")
    if excl is not None and excl.any():
        yy, xx = np.mgrid[0:h, 0:w]
        hatch = excl & (((xx + yy) % 10) < 2)
        img[hatch] = (30, 30, 30)
        img[_edges(excl) & excl] = (0, 0, 0)
    code = labels.get("overview_fiber_code")
    edge = labels.get("overview_fiber_edge")
    if code is not None and edge is not None:
        if result.settings.analysis == "mhc":
            for c in np.unique(code[edge]):
                if c == 0:
                    continue
                col = FIBER_UNSCORED if c == 1 else GRADE_COLOURS.get(int(c) - 2, FIBER_PLAIN)
                img[edge & (code == c)] = col
        else:
            img[edge] = FIBER_PLAIN
    cells = result.cells
    if len(cells) and {"x_px", "y_px"} <= set(cells.columns):
        # a dot about one cell across (5 µm radius), at least 2 px
        r = max(2, int(round(5.0 / (result.mpp * ds)))) if result.mpp else 3
        show_negative = ds <= 2.0  # zoomed out, negative rings would hide the tissue
        xs = cells["x_px"].to_numpy(float) / ds
        ys = cells["y_px"].to_numpy(float) / ds
        kind = cells["kind"].astype(str).to_numpy() if "kind" in cells.columns else None
        grade = (pd.to_numeric(cells["grade"], errors="coerce").fillna(0).astype(int).to_numpy()
                 if "grade" in cells.columns else None)
        for i in range(len(cells)):
            if not (math.isfinite(xs[i]) and math.isfinite(ys[i])):
                continue
            c = (int(round(xs[i] - 0.5)), int(round(ys[i] - 0.5)))
            if kind is not None and kind[i] == "capillary":
                cv2.circle(img, c, r + 2, CAPILLARY, 1, lineType=cv2.LINE_AA)
            else:
                g = int(grade[i]) if grade is not None else 1
                col = GRADE_COLOURS.get(g, GRADE_COLOURS[3])
                if g == 0:  # negative: a ring, so the nucleus stays visible
                    if show_negative:
                        cv2.circle(img, c, r + 1, col, 1, lineType=cv2.LINE_AA)
                elif r >= 5:  # room for a thick ring: the stained cell stays visible
                    cv2.circle(img, c, r + 2, (0, 0, 0), 1, lineType=cv2.LINE_AA)
                    cv2.circle(img, c, r, col, max(2, r // 3), lineType=cv2.LINE_AA)
                else:  # zoomed out: a filled dot with a dark edge
                    cv2.circle(img, c, r + 1, (0, 0, 0), -1, lineType=cv2.LINE_AA)
                    cv2.circle(img, c, r, col, -1, lineType=cv2.LINE_AA)
    return img


def _legend(result, ds: float = 1.0) -> list[tuple[tuple[int, int, int], str, str]]:
    items = [(TISSUE_LINE, "line", "tissue outline"), ((30, 30, 30), "hatch", "excluded")]
    a = result.settings.analysis
    if a == "mhc":
        items += [(GRADE_COLOURS[0], "line", "fiber MHC-I negative"),
                  (GRADE_COLOURS[1], "line", "fiber MHC-I 1+"),
                  (GRADE_COLOURS[2], "line", "fiber MHC-I 2+"),
                  (GRADE_COLOURS[3], "line", "fiber MHC-I 3+"),
                  (FIBER_UNSCORED, "line", "fiber not scored"),
                  (CAPILLARY, "ring", "positive capillary")]
    else:
        if result.settings.scoring.segment_fibers:
            items.append((FIBER_PLAIN, "line", "fiber outline"))
        if a == "cells":
            items += [(GRADE_COLOURS[0], "ring", "cell negative" if ds <= 2.0
                       else "cell negative (not drawn at this zoom)"),
                      (GRADE_COLOURS[1], "thick", "cell 1+"),
                      (GRADE_COLOURS[2], "thick", "cell 2+"),
                      (GRADE_COLOURS[3], "thick", "cell 3+")]
        else:
            items += [(TINT[1], "patch", "DAB weak (1+)"), (TINT[2], "patch", "DAB moderate (2+)"),
                      (TINT[3], "patch", "DAB strong (3+)"),
                      (CAPILLARY, "ring", "positive capillary")]
    return items


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _text_rgba(text: str, fontsize: float, *, box: bool = True) -> np.ndarray:
    """``text`` rendered by matplotlib (font as in the panel) as a tight RGBA uint8 patch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    wpx = int(fontsize * 1.2 * (len(text) + 4)) + 20
    hpx = int(fontsize * 3) + 20
    fig = Figure(figsize=(wpx / dpi, hpx / dpi), dpi=dpi)
    fig.patch.set_alpha(0.0)
    canvas = FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=fontsize, color="black",
             bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"} if box else None)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba()).copy()
    alpha = rgba[..., 3] > 0
    if not alpha.any():
        return rgba[:0, :0]
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    return rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _paste_rgba(img: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Alpha-blend an RGBA ``patch`` onto ``img`` (RGB uint8) with its top-left at x, y."""
    h, w = img.shape[:2]
    ph, pw = patch.shape[:2]
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(w, x + pw), min(h, y + ph)
    if x1 <= x0 or y1 <= y0:
        return
    p = patch[y0 - y:y1 - y, x0 - x:x1 - x].astype(np.float32)
    a = p[..., 3:4] / 255.0
    dst = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = (p[..., :3] * a + dst * (1.0 - a) + 0.5).astype(np.uint8)


def _draw_scale_bar(img: np.ndarray, *, mpp: float, ds: float, scale: float, fs: float) -> None:
    """A round length near 1/5 of the width, bottom left, labelled (drawn into ``img``)."""
    import cv2

    h, w = img.shape[:2]
    target = w * ds * mpp / 5
    bar_um = 10 ** math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * bar_um <= target:
            bar_um *= m
            break
    bar_px = bar_um / (mpp * ds)
    x0, y0 = w * 0.03, h * 0.96
    half = max(1.0, 4 * scale * 100 / 72 / 2)  # 4-point line at 100 dpi, butt ends
    cv2.rectangle(img, (int(round(x0)), int(round(y0 - half))),
                  (int(round(x0 + bar_px)) - 1, int(round(y0 + half)) - 1), (0, 0, 0), -1)
    label = f"{bar_um / 1000:g} mm" if bar_um >= 1000 else f"{bar_um:g} µm"
    patch = _text_rgba(label, fs)
    _paste_rgba(img, patch, int(round(x0 + bar_px / 2 - patch.shape[1] / 2)),
                int(round(y0 - h * 0.015)) - patch.shape[0])


def _panel(result, *, fields: dict | None, width: int, height: int, fs: float,
           scale: float, ds: float) -> np.ndarray:
    """The side panel (name, key numbers, legend) as RGB uint8 (height, width, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.patch.set_facecolor("white")
    canvas = FigureCanvasAgg(fig)
    tx = fig.add_axes((0, 0, 1, 1))
    tx.set_axis_off()
    mpp = result.mpp
    lines = [f"{result.name}", f"marker: {result.marker}"]
    for k in ("patient", "timepoint"):
        if fields and fields.get(k):
            lines.append(f"{k}: {fields[k]}")
    lines.append(f"mpp: {_fmt(mpp) if mpp else 'unknown'} µm/px ({result.mpp_source})")
    for k in KEY_NUMBERS:
        if k in result.summary:
            lines.append(f"{k}: {_fmt(result.summary[k])}")
    lines.append(f"overview 1:{ds:.3g}")
    tx.text(0.04, 0.99, "\n".join(lines), va="top", ha="left", fontsize=fs, family="monospace",
            transform=tx.transAxes)
    handles = []
    for col, kind, text in _legend(result, ds):
        c = tuple(v / 255 for v in col)
        if kind == "line":
            handles.append(Line2D([], [], color=c, lw=2.5 * scale, label=text))
        elif kind == "dot":
            handles.append(Line2D([], [], color=c, marker="o", ls="", ms=7 * scale, label=text))
        elif kind in ("ring", "thick"):
            handles.append(Line2D([], [], color=c, marker="o", mfc="none", ls="",
                                  ms=8 * scale, mew=(2.5 if kind == "thick" else 1) * scale,
                                  label=text))
        elif kind == "hatch":
            handles.append(Patch(facecolor="white", edgecolor=c, hatch="///", label=text))
        else:
            handles.append(Patch(facecolor=c, edgecolor="none", label=text))
    tx.legend(handles=handles, loc="lower left", fontsize=fs, frameon=False,
              bbox_to_anchor=(0.0, 0.0))
    canvas.draw()
    return np.array(np.asarray(canvas.buffer_rgba())[..., :3])


def render_overlay(result, path: str | Path, *, fields: dict | None = None
                   ) -> Path:
    """Write the QC picture of ``result`` to ``path`` (PNG, atomically).

    The overview with its detections (:func:`draw_overlay`) is placed pixel for pixel at the
    top left, a panel with the slide's name, key numbers and legend on the right. Only the
    small panel and the scale-bar label go through matplotlib (drawing the whole overview
    through it costs ~0.5 GB and ~10 s for a 2,000-px overview); the PNG is encoded by OpenCV.
    """
    import cv2
    import matplotlib

    matplotlib.use("Agg", force=False)
    img = draw_overlay(result)
    h, w = img.shape[:2]
    scale = max(1.0, max(h, w) / 1000)  # text and panel grow with the picture
    panel = int(330 * scale)
    fs = 9 * scale
    H = max(h, int(520 * scale))
    ds = float(result.provenance.get("overview_downsample", 1.0))
    if result.mpp:
        _draw_scale_bar(img, mpp=float(result.mpp), ds=ds, scale=scale, fs=fs)
    out = np.full((H, w + panel, 3), 255, np.uint8)
    out[:h, :w] = img
    del img
    pan = _panel(result, fields=fields, width=panel, height=H, fs=fs, scale=scale, ds=ds)
    ph, pw = min(H, pan.shape[0]), min(panel, pan.shape[1])  # figure sizes round to whole px
    out[:ph, w:w + pw] = pan[:ph, :pw]
    ok, data = cv2.imencode(".png", out[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 RGB
        raise ValueError(f"cannot encode the overlay of {result.name} as PNG")
    path = Path(path)
    atomic_write(path, lambda p: p.write_bytes(data.tobytes()))
    return path
