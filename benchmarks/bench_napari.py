"""napari plugin latency and GUI responsiveness (run under Xvfb).

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python benchmarks/bench_napari.py

Measures, on the CD163 sample slide (1024 x 1024 px at 0.5 µm/px):

* live preview: time from a settings change to the refreshed preview layer (includes the
  300 ms debounce), for the visible field at the default view and zoomed in;
* whole-image scoring in the widget's worker thread;
* GUI responsiveness while scoring: the longest gap between ticks of a 20 ms QTimer on the
  GUI thread (a frozen GUI would show a gap as long as the scoring).
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_images" / "P01_baseline_CD163.tif"


def main() -> None:
    import napari
    from napari.qt import get_qapp
    from napari_biopsyquant._widget import _camera
    from qtpy.QtCore import QTimer

    app = get_qapp()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    layer = viewer.open(str(SAMPLE), plugin="biopsyquant")[0]
    _, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
    name = f"{layer.name} preview"

    def pump(pred, timeout=300.0):
        t0 = time.perf_counter()
        while not pred():
            app.processEvents()
            time.sleep(0.002)
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError

    def preview_layer():
        return next((ly for ly in viewer.layers if ly.name == name), None)

    widget.preview_check.setChecked(True)
    pump(lambda: preview_layer() is not None)  # warm-up (imports, JIT)
    for label, zoom in (("default view", None), ("zoomed in x4", 4.0)):
        if zoom:
            _camera(viewer).zoom = _camera(viewer).zoom * zoom
            t_end = time.perf_counter() + 4.0  # let the preview the zoom triggers finish
            pump(lambda t=t_end: time.perf_counter() > t)
        times = []
        for k in range(3):
            old = preview_layer()
            t0 = time.perf_counter()
            widget.set_setting("cells.dab_threshold_1_od", 0.2 + 0.01 * (k % 2 + 1))
            pump(lambda o=old: preview_layer() is not None and preview_layer() is not o)
            times.append(time.perf_counter() - t0)
        box = widget._visible_box(layer)
        print(f"preview ({label}, field {box[1] - box[0]}x{box[3] - box[2]} px): "
              f"{', '.join(f'{t:.2f}' for t in times)} s after the change")
    widget.preview_check.setChecked(False)

    gaps = []
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(tick)
    timer.start()
    t0 = time.perf_counter()
    widget.score_current()
    pump(lambda: widget._worker is None)
    total = time.perf_counter() - t0
    timer.stop()
    print(f"whole image (1024x1024) scored in the worker: {total:.2f} s; longest GUI-thread "
          f"gap while scoring {max(gaps) * 1000:.0f} ms (timer 20 ms, {len(gaps)} ticks)")
    viewer.close()


if __name__ == "__main__":
    main()
