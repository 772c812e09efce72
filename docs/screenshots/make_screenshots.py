"""Screenshots of the napari plugin with results, for docs/napari.md and the README.

Run under Xvfb (napari's canvas needs OpenGL; Qt's offscreen platform has none)::

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python docs/screenshots/make_screenshots.py

For each of CD163 (cells coloured by grade), MHC-I (fibers coloured by grade) and IL-1β (DAB
pixel classes) it opens the sample slide from ``sample_images/`` through the plugin's reader,
docks the "Score IHC" widget, scores the whole image in the widget's worker thread, zooms to a
field with detections and saves the whole window (canvas, layer list and dock widget) as a
palette PNG under 300 kB in this folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SAMPLES = ROOT / "sample_images"
WINDOW = (1400, 860)  # width, height of the main window (px)
MAX_BYTES = 300_000

#: (output file, sample slide, colour cells by, field width shown in µm)
SHOTS = [
    ("napari_cd163.png", "P01_baseline_CD163.tif", "grade", 260.0),
    ("napari_mhc1.png", "P01_baseline_MHC-I.tif", "grade", 420.0),
    ("napari_il1b.png", "P01_baseline_IL-1b.tif", "grade", 300.0),
]


def _wait(app, predicate, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("scoring did not finish in time")
    for _ in range(20):  # let the canvas draw the new layers
        app.processEvents()
        time.sleep(0.02)


def _focus(result) -> tuple[float, float]:
    """Level-0 (row, col) of a field rich in detections."""
    if result.settings.analysis == "cells" and len(result.cells):
        pos = result.cells[result.cells["positive"].astype(bool)]
        xy = pos[["x_px", "y_px"]].to_numpy(float)
        if len(xy):
            from scipy.spatial import cKDTree

            n = np.array([len(v) for v in cKDTree(xy).query_ball_point(xy, r=120.0)])
            x, y = xy[int(np.argmax(n))]
            return float(y), float(x)
    if result.settings.analysis == "mhc" and len(result.fibers):
        f = result.fibers
        g = f["mhc_grade"].astype("Float64").fillna(0).to_numpy(float)
        xy = f[["x_px", "y_px"]].to_numpy(float)
        from scipy.spatial import cKDTree

        score = np.array([g[idx].sum() for idx in cKDTree(xy).query_ball_point(xy, r=200.0)])
        x, y = xy[int(np.argmax(score))]
        return float(y), float(x)
    dab = result.labels.get("dab_class")
    if dab is not None and dab.any():
        from scipy.ndimage import uniform_filter

        dens = uniform_filter((dab > 0).astype(np.float32), size=301)
        r, c = np.unravel_index(int(np.argmax(dens)), dens.shape)
        return float(r), float(c)
    h, w = result.provenance["shape"][:2]
    return h / 2, w / 2


def _save_small(arr: np.ndarray, path: Path) -> int:
    """Save an RGB(A) array as a palette PNG (adaptive 256 colours) and return its size."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    img.save(path, optimize=True)
    for colors in (256, 128):  # too big as RGB: adaptive palette (FASTOCTREE keeps hues)
        if path.stat().st_size <= MAX_BYTES:
            break
        img.quantize(colors=colors, method=Image.Quantize.FASTOCTREE,
                     dither=Image.Dither.NONE).save(path, optimize=True)
    return path.stat().st_size


def take(out_dir: Path = HERE, shots=SHOTS) -> list[Path]:
    """Take the screenshots; returns the written files."""
    import napari
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from napari.qt import get_qapp
    from napari_biopsyquant._widget import _camera
    from qtpy.QtCore import Qt

    written = []
    for fname, sample, color_by, field_um in shots:
        viewer = napari.Viewer(show=True, title="biopsyquant")
        try:
            app = get_qapp()
            qwin = viewer.window._qt_window
            qwin.resize(*WINDOW)
            layer = viewer.open(str(SAMPLES / sample), plugin="biopsyquant")[0]
            dock, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
            qv = viewer.window._qt_viewer
            qv.dockLayerControls.setVisible(False)  # more room for the canvas
            qwin.resizeDocks([qv.dockLayerList, dock], [250, 430], Qt.Horizontal)
            widget.color_combo.setCurrentText(color_by)
            worker = widget.score_current()
            _wait(app, lambda w=widget, wk=worker: w._worker is None)
            session = widget.sessions[id(layer)]
            if session.result is None:
                raise RuntimeError(f"{sample}: scoring failed: {widget.status.text()}")
            row, col = _focus(session.result)
            mpp = float(layer.scale[-1])
            canvas = viewer.window._qt_viewer.canvas.size  # (height, width) px
            zoom = float(canvas[1]) / field_um
            h, w = np.asarray(layer.level_shapes[0][:2] if layer.multiscale
                              else layer.data.shape[:2], float) * mpp
            half = np.array([canvas[0], canvas[1]], float) / zoom / 2
            cy = float(np.clip(row * mpp, min(half[0], h / 2), max(h - half[0], h / 2)))
            cx = float(np.clip(col * mpp, min(half[1], w / 2), max(w - half[1], w / 2)))
            cam = _camera(viewer)
            cam.center = (cy, cx)
            cam.zoom = zoom
            viewer.layers.selection.active = layer
            widget.tabs.setCurrentIndex(0)
            _wait(app, lambda: True)
            for toast in qwin.findChildren(NapariQtNotification):
                toast.close()  # e.g. napari's PyQt5 deprecation notice
            _wait(app, lambda: True)
            arr = viewer.screenshot(canvas_only=False)
            path = out_dir / fname
            size = _save_small(arr, path)
            print(f"{path.relative_to(ROOT)}: {arr.shape[1]}x{arr.shape[0]} px, "
                  f"{size / 1000:.0f} kB; {widget.status.text()}")
            written.append(path)
        finally:
            viewer.close()
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    take(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
