"""Scoring dock widget: choose layer and marker, tune settings with a live preview, score,
review and correct the result, export in the batch schema.

All analysis is done by :mod:`biopsyquant` (``score_image``); this module gathers settings,
runs the engine in worker threads and draws the results as layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from biopsyquant.errors import BiopsyQuantError
from biopsyquant.settings import MARKERS, load_settings

from ._layers import (
    DAB_CLASS_COLORS,
    FIBER_GRADE_COLORS,
    cell_colors,
    fiber_grade_labels,
    points_data,
)
from ._session import MANUAL, ReviewSession

if TYPE_CHECKING:
    import napari

#: the analysis section shown in the settings form per analysis kind
FORM_SECTION = {"cells": "cells", "mhc": "mhc", "pixels": "pixels"}
PREVIEW_MAX_PX = 768
PREVIEW_DELAY_MS = 300


def _suffix(name: str) -> str:
    for end, suf in (("_um2", " µm²"), ("_um", " µm"), ("_od", " OD"), ("_pct", " %"),
                     ("_px", " px")):
        if name.endswith(end):
            return suf
    return ""


class ScoringWidget(QWidget):
    """Dock widget of biopsyquant (see module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.sessions: dict[int, ReviewSession] = {}  # id(image layer) -> session
        self.result_layers: dict[int, dict[str, Any]] = {}
        self._worker = None
        self._preview_worker = None
        self._syncing = False
        self.settings = load_settings("CD163")
        self._fields: dict[str, QWidget] = {}

        layout = QVBoxLayout(self)
        top = QFormLayout()
        self.layer_combo = QComboBox()
        self.marker_combo = QComboBox()
        self.marker_combo.addItems(list(MARKERS))
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 10.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setSpecialValueText("unknown")
        self.mpp_source = QLabel("")
        top.addRow("Image layer", self.layer_combo)
        top.addRow("Marker preset", self.marker_combo)
        mpp_row = QHBoxLayout()
        mpp_row.addWidget(self.mpp_spin)
        mpp_row.addWidget(self.mpp_source)
        top.addRow("Pixel size", mpp_row)
        layout.addLayout(top)

        self.settings_box = QGroupBox("Settings")
        self.settings_form = QFormLayout(self.settings_box)
        layout.addWidget(self.settings_box)

        stain_row = QHBoxLayout()
        self.estimate_btn = QPushButton("Estimate stains here")
        self.stain_label = QLabel("stains: preset / per-slide estimate")
        self.stain_label.setWordWrap(True)
        stain_row.addWidget(self.estimate_btn)
        layout.addLayout(stain_row)
        layout.addWidget(self.stain_label)

        self.preview_check = QCheckBox("Live preview of the visible field")
        layout.addWidget(self.preview_check)

        btns = QHBoxLayout()
        self.score_btn = QPushButton("Score whole image")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        btns.addWidget(self.score_btn)
        btns.addWidget(self.cancel_btn)
        layout.addLayout(btns)
        self.apply_excl_btn = QPushButton("Apply exclusions (re-score)")
        layout.addWidget(self.apply_excl_btn)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

        exp = QHBoxLayout()
        self.export_btn = QPushButton("Export results…")
        self.folder_btn = QPushButton("Score a folder…")
        exp.addWidget(self.export_btn)
        exp.addWidget(self.folder_btn)
        layout.addLayout(exp)

        self.tabs = QTabWidget()
        self.summary_table = QTableWidget(0, 2)
        self.summary_table.setHorizontalHeaderLabels(["measure", "value"])
        self.objects_table = QTableWidget(0, 0)
        self.objects_table.setSelectionBehavior(QTableWidget.SelectRows)
        self.tabs.addTab(self.summary_table, "Summary")
        self.tabs.addTab(self.objects_table, "Objects")
        layout.addWidget(self.tabs, stretch=1)

        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(PREVIEW_DELAY_MS)
        self._preview_timer.timeout.connect(self.run_preview)

        self.marker_combo.currentTextChanged.connect(self._on_marker)
        self.layer_combo.currentIndexChanged.connect(self._on_layer)
        self.mpp_spin.valueChanged.connect(self._schedule_preview)
        self.estimate_btn.clicked.connect(self.estimate_stains_here)
        self.preview_check.toggled.connect(self._schedule_preview)
        self.score_btn.clicked.connect(self.score_current)
        self.cancel_btn.clicked.connect(self.cancel)
        self.apply_excl_btn.clicked.connect(self.apply_exclusions)
        self.export_btn.clicked.connect(self._export_dialog)
        self.folder_btn.clicked.connect(self._folder_dialog)
        self.objects_table.itemSelectionChanged.connect(self._center_on_selection)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.viewer.camera.events.center.connect(self._schedule_preview)
        self.viewer.camera.events.zoom.connect(self._schedule_preview)
        self._refresh_layers()
        self._on_marker(self.marker_combo.currentText())

    # ------------------------------------------------------------ layer choice
    def _image_layers(self) -> list:
        from napari.layers import Image

        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and ly.rgb]

    def _refresh_layers(self, *_: Any) -> None:
        current = self.layer_combo.currentText()
        names = [ly.name for ly in self._image_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._on_layer()

    def current_layer(self):
        name = self.layer_combo.currentText()
        for ly in self._image_layers():
            if ly.name == name:
                return ly
        return None

    def _on_layer(self, *_: Any) -> None:
        layer = self.current_layer()
        if layer is None:
            return
        bq = layer.metadata.get("biopsyquant", {})
        mpp = bq.get("mpp")
        self.mpp_spin.blockSignals(True)
        self.mpp_spin.setValue(float(mpp) if mpp else 0.0)
        self.mpp_spin.blockSignals(False)
        self.mpp_source.setText(f"source: {bq.get('mpp_source', 'unknown')}")
        marker = _marker_from_name(layer.name)
        if marker:
            self.marker_combo.setCurrentText(marker)

    # ----------------------------------------------------------------- settings
    def _on_marker(self, marker: str) -> None:
        try:
            self.settings = load_settings(marker)
        except BiopsyQuantError as exc:
            show_error(str(exc))
            return
        self._build_form()
        self._schedule_preview()

    def _build_form(self) -> None:
        while self.settings_form.rowCount():
            self.settings_form.removeRow(0)
        self._fields.clear()
        section = FORM_SECTION[self.settings.analysis]
        params = self.settings.sections.get(section)
        rows = [("stains", f) for f in dataclasses.fields(self.settings.stains)
                if f.name == "estimate"]
        if params is not None:
            rows += [(section, f) for f in dataclasses.fields(params)]
        for sec, f in rows:
            value = getattr(self.settings.sections[sec], f.name)
            key = f"{sec}.{f.name}"
            w: QWidget
            if isinstance(value, bool):
                w = QCheckBox()
                w.setChecked(value)
                w.toggled.connect(lambda v, k=key: self.set_setting(k, bool(v)))
            elif isinstance(value, int):
                w = QSpinBox()
                w.setRange(-10**9, 10**9)
                w.setValue(value)
                w.setSuffix(_suffix(f.name))
                w.valueChanged.connect(lambda v, k=key: self.set_setting(k, int(v)))
            elif isinstance(value, float):
                w = QDoubleSpinBox()
                w.setDecimals(3)
                w.setRange(-1e9, 1e9)
                w.setSingleStep(0.05 if f.name.endswith("_od") else 1.0)
                w.setValue(value)
                w.setSuffix(_suffix(f.name))
                w.valueChanged.connect(lambda v, k=key: self.set_setting(k, float(v)))
            elif isinstance(value, str):
                w = QComboBox()
                w.setEditable(True)
                w.addItem(value)
                w.currentTextChanged.connect(lambda v, k=key: self.set_setting(k, str(v)))
            else:
                continue
            w.setToolTip(key)
            self._fields[key] = w
            self.settings_form.addRow(f.name, w)

    def set_setting(self, key: str, value: Any) -> None:
        """Change one setting (dotted key); re-validated by the library."""
        try:
            self.settings = self.settings.replace({key: value}, origin="napari")
        except BiopsyQuantError as exc:
            show_error(str(exc))
            return
        self._schedule_preview()

    # ------------------------------------------------------------------ helpers
    def _mpp(self) -> float | None:
        v = float(self.mpp_spin.value())
        return v if v > 0 else None

    def _mpp_source(self, layer) -> str:
        bq = layer.metadata.get("biopsyquant", {})
        if self._mpp() is None:
            return "unknown"
        if bq.get("mpp") and abs(float(bq["mpp"]) - self._mpp()) < 1e-9:
            return bq.get("mpp_source", "user")
        return "user"

    @staticmethod
    def _level0(layer):
        return layer.data[0] if layer.multiscale else layer.data

    def session_for(self, layer) -> ReviewSession:
        """The review session of ``layer`` (created with the current settings)."""
        s = self.sessions.get(id(layer))
        level0 = self._level0(layer)
        if s is None:
            bq = layer.metadata.get("biopsyquant", {})
            s = ReviewSession(image=np.asarray(level0), settings=self.settings, mpp=self._mpp(),
                              mpp_source=self._mpp_source(layer), name=layer.name,
                              path=bq.get("path"))
            self.sessions[id(layer)] = s
        else:
            s.settings = self.settings
            s.mpp = self._mpp()
            s.mpp_source = self._mpp_source(layer)
        return s

    def _visible_box(self, layer) -> tuple[int, int, int, int]:
        """Level-0 pixel box (y0, y1, x0, x1) of the visible field, at most PREVIEW_MAX_PX."""
        level0 = self._level0(layer)
        h, w = level0.shape[:2]
        scale = np.asarray(layer.scale[-2:], float)
        center = np.asarray(self.viewer.camera.center[-2:], float) / scale
        canvas = getattr(self.viewer, "_canvas_size", (600, 800))
        half = np.asarray(canvas[-2:], float) / 2 / max(self.viewer.camera.zoom, 1e-9) / scale
        half = np.minimum(half, PREVIEW_MAX_PX / 2)
        y0 = int(np.clip(center[0] - half[0], 0, max(h - 1, 0)))
        x0 = int(np.clip(center[1] - half[1], 0, max(w - 1, 0)))
        y1 = int(np.clip(center[0] + half[0], y0 + 1, h))
        x1 = int(np.clip(center[1] + half[1], x0 + 1, w))
        return y0, y1, x0, x1

    # ------------------------------------------------------------------ actions
    def estimate_stains_here(self) -> None:
        """Estimate stain vectors on the visible field and fix them in the settings."""
        from biopsyquant.stains import estimate_stains

        layer = self.current_layer()
        if layer is None:
            return
        y0, y1, x0, x1 = self._visible_box(layer)
        rgb = np.asarray(self._level0(layer)[y0:y1, x0:x1])[..., :3]
        try:
            model = estimate_stains(rgb, base=self.settings.stains.preset)
        except BiopsyQuantError as exc:
            show_error(str(exc))
            return
        vec = [list(map(float, v)) for v in model.vectors[:2]]
        self.settings = self.settings.replace(
            {"stains.vectors": vec, "stains.estimate": False,
             "stains.background": list(model.background)}, origin="napari: estimated here")
        text = "; ".join(f"{n}: ({', '.join(f'{x:.3f}' for x in v)})"
                         for n, v in zip(model.names[:2], model.vectors[:2], strict=True))
        self.stain_label.setText(f"stains estimated on view ({model.source}): {text}; "
                                 f"background {tuple(round(b, 1) for b in model.background)}")
        self._schedule_preview()

    def _schedule_preview(self, *_: Any) -> None:
        if self.preview_check.isChecked():
            self._preview_timer.start()

    def run_preview(self):
        """Score the visible field (same engine) and show the detections as 'preview'."""
        from biopsyquant.score import score_image

        layer = self.current_layer()
        if layer is None:
            return None
        y0, y1, x0, x1 = self._visible_box(layer)
        crop = np.ascontiguousarray(np.asarray(self._level0(layer)[y0:y1, x0:x1])[..., :3])
        settings, mpp = self.settings, self._mpp()

        @thread_worker
        def work():
            return score_image(crop, settings=settings, mpp=mpp, name="preview")

        def done(res):
            self._show_preview(layer, res, (y0, x0))

        if self._preview_worker is not None:
            self._preview_worker.quit()
        worker = work()
        worker.returned.connect(done)
        worker.errored.connect(lambda e: self.status.setText(f"preview failed: {e}"))
        self._preview_worker = worker
        worker.start()
        return worker

    def _show_preview(self, layer, res, offset) -> None:
        scale = tuple(layer.scale[-2:])
        translate = (offset[0] * scale[0], offset[1] * scale[1])
        name = f"{layer.name} preview"
        for ly in [ly for ly in self.viewer.layers if ly.name == name]:
            self.viewer.layers.remove(ly)
        if res.settings.analysis == "cells":
            data, feats = points_data(res.cells)
            self.viewer.add_points(data, features=feats, name=name, scale=scale,
                                   translate=translate, face_color=cell_colors(res.cells),
                                   size=10, border_width=0)
        elif res.settings.analysis == "pixels" and "dab_class" in res.labels:
            self.viewer.add_labels(res.labels["dab_class"].astype(np.uint8), name=name,
                                   scale=scale, translate=translate, opacity=0.6,
                                   colormap=DirectLabelColormap(color_dict={
                                       None: (0, 0, 0, 0), 0: (0, 0, 0, 0),
                                       **DAB_CLASS_COLORS}))
        else:
            lab = fiber_grade_labels(res.labels.get("fibers"), res.fibers)
            if lab is not None:
                self.viewer.add_labels(lab, name=name, scale=scale, translate=translate,
                                       opacity=0.5, colormap=DirectLabelColormap(color_dict={
                                           None: (0, 0, 0, 0), 0: (0, 0, 0, 0),
                                           **FIBER_GRADE_COLORS}))
        self.viewer.layers.selection.active = layer
        self.status.setText(_short_summary(res.summary, prefix="preview"))

    def score_current(self):
        """Score the selected image layer in a worker thread; returns the worker."""
        layer = self.current_layer()
        if layer is None:
            show_info("Open or select an RGB image layer first")
            return None
        session = self.session_for(layer)
        session.exclusions = self._exclusion_polygons(layer)
        return self._run(layer, session, session.score, "scoring")

    def apply_exclusions(self):
        """Re-score the current layer with the polygons of its exclusion Shapes layer."""
        layer = self.current_layer()
        if layer is None:
            return None
        session = self.session_for(layer)
        polys = self._exclusion_polygons(layer)
        return self._run(layer, session, lambda: session.set_exclusions(polys), "re-scoring")

    def _run(self, layer, session: ReviewSession, fn, what: str):
        @thread_worker
        def work():
            yield 5, f"{what} {layer.name}…"
            res = fn()
            yield 100, "done"
            return res

        worker = work()
        worker.yielded.connect(self._on_progress)
        # results are bound to the layer and session captured here, whatever is selected now
        worker.returned.connect(lambda res: self._show_result(layer, session))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.score_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        worker.start()
        return worker

    def _on_progress(self, value) -> None:
        pct, msg = value
        self.progress.setValue(int(pct))
        self.status.setText(msg)

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(f"failed: {exc}")
        show_error(str(exc))

    def _on_finished(self) -> None:
        self.score_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self._worker = None

    def cancel(self) -> None:
        """Cancel the running whole-image scoring (results of a cancelled run are dropped)."""
        if self._worker is not None:
            self._worker.quit()
            self.status.setText("cancelled")

    # ----------------------------------------------------------------- results
    def _exclusion_layer(self, layer, create: bool = True):
        name = f"{layer.name} exclusions"
        for ly in self.viewer.layers:
            if ly.name == name:
                return ly
        if not create:
            return None
        ly = self.viewer.add_shapes(name=name, scale=tuple(layer.scale[-2:]), edge_color="cyan",
                                    face_color=(0, 1, 1, 0.15), edge_width=3)
        ly.metadata["biopsyquant_exclusions_of"] = layer.name
        self.viewer.layers.selection.active = layer
        return ly

    def _exclusion_polygons(self, layer) -> list[np.ndarray]:
        ly = self._exclusion_layer(layer, create=False)
        if ly is None:
            return []
        return [np.asarray(s, float)[:, -2:][:, ::-1] for s in ly.data if len(s) >= 3]

    def _show_result(self, layer, session: ReviewSession) -> None:
        res = session.result
        if res is None:
            return
        scale = tuple(layer.scale[-2:])
        layers = self.result_layers.setdefault(id(layer), {})
        for key in list(layers):
            if layers[key] in self.viewer.layers:
                self.viewer.layers.remove(layers[key])
            layers.pop(key)
        preview = f"{layer.name} preview"
        for ly in [ly for ly in self.viewer.layers if ly.name == preview]:
            self.viewer.layers.remove(ly)
        fibers_lab = res.labels.get("fibers")
        if fibers_lab is not None and fibers_lab.any():
            graded = fiber_grade_labels(fibers_lab, res.fibers)
            if graded is not None:
                layers["fibers"] = self.viewer.add_labels(
                    graded, name=f"{layer.name} fibers (MHC-I grade)", scale=scale, opacity=0.45,
                    colormap=DirectLabelColormap(color_dict={None: (0, 0, 0, 0),
                                                             0: (0, 0, 0, 0),
                                                             **FIBER_GRADE_COLORS}))
            else:
                layers["fibers"] = self.viewer.add_labels(
                    fibers_lab, name=f"{layer.name} fibers", scale=scale, opacity=0.3)
        if "dab_class" in res.labels:
            layers["dab"] = self.viewer.add_labels(
                res.labels["dab_class"].astype(np.uint8), name=f"{layer.name} DAB classes",
                scale=scale, opacity=0.6, colormap=DirectLabelColormap(
                    color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), **DAB_CLASS_COLORS}))
        if res.settings.analysis == "cells":
            data, feats = points_data(session.cells_table())
            pts = self.viewer.add_points(
                data, features=feats, name=f"{layer.name} cells", scale=scale,
                face_color=cell_colors(res.cells), size=12, border_width=0.1,
                border_color="white",
                feature_defaults={"cell_id": -1, "grade": 1, "positive": True,
                                  "dab_mean_od": np.nan, "compartment": "", "source": MANUAL},
            )
            pts.metadata["biopsyquant_cells_of"] = layer.name
            pts.events.data.connect(lambda e, ly=layer, p=pts: self._on_points_edited(ly, p))
            layers["cells"] = pts
        self._exclusion_layer(layer)
        self.viewer.layers.selection.active = layer
        layer.metadata["biopsyquant_summary"] = session.summary()
        self._fill_tables(session)
        self.status.setText(_short_summary(session.summary()))

    def _on_points_edited(self, layer, pts) -> None:
        """Sync deletions / additions in the cells Points layer into the session."""
        if self._syncing:
            return
        session = self.sessions.get(id(layer))
        if session is None or session.result is None:
            return
        ids = pts.features["cell_id"].to_numpy() if len(pts.features) else np.zeros(0)
        auto_ids = set(session.result.cells["cell_id"].astype(int)) if len(
            session.result.cells) else set()
        present = {int(i) for i in ids if int(i) in auto_ids}
        session.deleted = auto_ids - present
        manual = np.flatnonzero(ids == -1)
        session.added = [(float(pts.data[i][-1]), float(pts.data[i][-2])) for i in manual]
        summ = session.summary()
        layer.metadata["biopsyquant_summary"] = summ
        self._fill_tables(session)
        self.status.setText(_short_summary(summ))

    def _fill_tables(self, session: ReviewSession) -> None:
        summ = session.summary()
        self.summary_table.setRowCount(len(summ))
        for i, (k, v) in enumerate(summ.items()):
            self.summary_table.setItem(i, 0, QTableWidgetItem(str(k)))
            txt = f"{v:.4g}" if isinstance(v, float) else str(v)
            self.summary_table.setItem(i, 1, QTableWidgetItem(txt))
        res = session.result
        table = session.cells_table() if res.settings.analysis == "cells" else res.fibers
        cols = [c for c in table.columns if c not in ("x_um", "y_um")][:14]
        self._objects = table.reset_index(drop=True)
        self.objects_table.clear()
        self.objects_table.setColumnCount(len(cols))
        self.objects_table.setHorizontalHeaderLabels(cols)
        n = min(len(table), 5000)
        self.objects_table.setRowCount(n)
        values = table[cols].to_numpy()
        for i in range(n):
            for j in range(len(cols)):
                v = values[i, j]
                txt = f"{v:.4g}" if isinstance(v, float) else str(v)
                self.objects_table.setItem(i, j, QTableWidgetItem(txt))

    def _center_on_selection(self) -> None:
        rows = sorted({i.row() for i in self.objects_table.selectedIndexes()})
        layer = self.current_layer()
        if not rows or layer is None or not hasattr(self, "_objects"):
            return
        row = self._objects.iloc[rows[0]]
        if "x_px" not in row or "y_px" not in row:
            return
        scale = layer.scale[-2:]
        self.viewer.camera.center = (float(row["y_px"]) * scale[0],
                                     float(row["x_px"]) * scale[1])
        self.viewer.camera.zoom = max(self.viewer.camera.zoom, 2.0 / float(scale[0]))

    # ------------------------------------------------------------------- export
    def export(self, out_dir: str | Path) -> dict:
        """Export the current layer's reviewed results in the batch schema."""
        layer = self.current_layer()
        session = self.sessions.get(id(layer)) if layer is not None else None
        if session is None or session.result is None:
            raise RuntimeError("score an image before exporting")
        session.exclusions = self._exclusion_polygons(layer) or session.exclusions
        return session.export(out_dir)

    def _export_dialog(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Export results to folder")
        if d:
            try:
                written = self.export(d)
                show_info(f"exported {', '.join(p.name for p in written.values())} to {d}")
            except (BiopsyQuantError, RuntimeError, OSError) as exc:
                show_error(str(exc))

    def score_folder(self, folder: str | Path, out_dir: str | Path):
        """Run the batch engine on ``folder`` with the current settings (worker thread)."""
        from biopsyquant.batch import score_folder

        settings = self.settings

        @thread_worker
        def work():
            return score_folder([str(folder)], out=str(out_dir), settings=settings)

        worker = work()
        worker.returned.connect(lambda r: self.status.setText(f"folder scored into {out_dir}"))
        worker.errored.connect(self._on_error)
        worker.start()
        return worker

    def _folder_dialog(self) -> None:
        src = QFileDialog.getExistingDirectory(self, "Folder of slides to score")
        if not src:
            return
        out = QFileDialog.getExistingDirectory(self, "Output folder")
        if out:
            self.score_folder(src, out)


def _marker_from_name(name: str) -> str | None:
    from biopsyquant.settings import canonical_marker

    for part in reversed(Path(name).stem.replace("-", "_").split("_")):
        for cand in (part, name.rsplit("_", 1)[-1]):
            try:
                return canonical_marker(cand)
            except BiopsyQuantError:
                continue
    return None


def _short_summary(summary: dict, prefix: str = "") -> str:
    keys = ("cells_positive", "cells_per_mm2", "cells_per_100_fibers", "n_fibers",
            "fibers_positive_pct", "positive_area_pct", "h_score", "tissue_area_mm2")
    parts = [f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
             for k in keys if k in summary]
    return (prefix + ": " if prefix else "") + ", ".join(parts)


__all__ = ["ScoringWidget"]
_ = Qt  # keep the import for type checkers of signal enums
