"""Scoring dock widget: choose layer and marker, tune settings with a live preview, score,
review and correct the result, export in the batch schema.

All analysis is done by :mod:`biopsyquant` (``score_image`` for images that fit in memory, the
tiled whole-slide engine of :mod:`biopsyquant.wsi` for larger slides, ``score_folder`` for
folders); this module gathers settings, runs the engine in worker threads
(``napari.qt.threading.thread_worker``) and draws the results as layers. The review state lives
in :class:`~napari_biopsyquant._session.ReviewSession` (no Qt).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
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
    QScrollArea,
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
    COMPARTMENT_COLORS,
    DAB_CLASS_COLORS,
    FIBER_GRADE_COLORS,
    FIBER_NOT_SCORED,
    GRADE_COLORS,
    cell_colors,
    feature_defaults,
    fiber_grade_labels,
    overview_fiber_grade,
    points_data,
)
from ._session import ReviewSession

if TYPE_CHECKING:
    import napari

#: the analysis section shown in the settings form per analysis kind
FORM_SECTION = {"cells": "cells", "mhc": "mhc", "pixels": "pixels"}
#: longest side (level-0 px) of the field scored by the live preview
PREVIEW_MAX_PX = 512
#: debounce of the live preview and of re-scoring after an exclusion is drawn (ms)
PREVIEW_DELAY_MS = 300
EXCLUSION_DELAY_MS = 600
#: rows shown in the objects table (all rows are exported)
MAX_TABLE_ROWS = 5000
_TRANSPARENT = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}


def _suffix(name: str) -> str:
    for end, suf in (("_um2", " µm²"), ("_um", " µm"), ("_od", " OD"), ("_pct", " %"),
                     ("_px", " px"), ("_mm2", " mm²")):
        if name.endswith(end):
            return suf
    return ""


def _camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _units(layer) -> dict:
    """``units`` of the image layer, for result layers drawn over it (napari wants one unit)."""
    units = getattr(layer, "units", None)
    return {"units": tuple(str(u) for u in units[-2:])} if units is not None else {}


def _face_colors(cells, by: str):
    """Per-point RGBA, or one colour when there are no points (napari rejects an empty
    colour array); the single colour is the 1+ grade, given to cells the user adds."""
    cols = cell_colors(cells, by)
    return cols if len(cols) else np.asarray(GRADE_COLORS[1], float)


def _direct_cmap(colors: dict) -> DirectLabelColormap:
    return DirectLabelColormap(color_dict={**_TRANSPARENT, **colors})


class ScoringWidget(QWidget):
    """Dock widget of biopsyquant (see module docstring).

    Public methods return the worker they start (``score_current``, ``apply_exclusions``,
    ``run_preview``, ``score_folder``) so that scripts and tests can wait on its signals.
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.sessions: dict[int, ReviewSession] = {}  # id(image layer) -> session
        self.result_layers: dict[int, dict[str, Any]] = {}
        self._worker = None
        self._folder_worker = None
        self._preview_worker = None
        self._preview_gen = 0
        self._syncing = False
        self._table_layer = None
        self._objects = None
        self.settings = load_settings("CD163")
        self._fields: dict[str, QWidget] = {}

        outer = QVBoxLayout(self)
        top = QFormLayout()
        self.layer_combo = QComboBox()
        self.marker_combo = QComboBox()
        self.marker_combo.addItems(list(MARKERS))
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(3)
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
        outer.addLayout(top)

        self.settings_box = QGroupBox("Settings (preset defaults; sizes in µm, DAB in OD)")
        self.settings_form = QFormLayout(self.settings_box)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.settings_box)
        scroll.setMinimumHeight(150)
        outer.addWidget(scroll, stretch=1)

        self.estimate_btn = QPushButton("Estimate stains here")
        self.estimate_btn.setToolTip("Estimate stain vectors and background on the visible "
                                     "field and use them for this analysis")
        self.stain_label = QLabel("stains: per-image estimate (preset fallback)")
        self.stain_label.setWordWrap(True)
        outer.addWidget(self.estimate_btn)
        outer.addWidget(self.stain_label)

        prev_row = QHBoxLayout()
        self.preview_check = QCheckBox("Live preview of the visible field")
        self.color_combo = QComboBox()
        self.color_combo.addItems(["grade", "compartment"])
        self.color_combo.setToolTip("Colour cells by DAB grade or by compartment")
        prev_row.addWidget(self.preview_check)
        self._color_label = QLabel("cells by")
        prev_row.addWidget(self._color_label)
        prev_row.addWidget(self.color_combo)
        outer.addLayout(prev_row)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        outer.addWidget(self.legend)

        btns = QHBoxLayout()
        self.score_btn = QPushButton("Score whole image")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        btns.addWidget(self.score_btn)
        btns.addWidget(self.cancel_btn)
        outer.addLayout(btns)
        excl = QHBoxLayout()
        self.draw_excl_btn = QPushButton("Draw exclusion")
        self.draw_excl_btn.setToolTip("Draw polygons over folds, tears or artefacts; scores "
                                      "update when a polygon is finished")
        self.apply_excl_btn = QPushButton("Re-score with exclusions")
        excl.addWidget(self.draw_excl_btn)
        excl.addWidget(self.apply_excl_btn)
        outer.addLayout(excl)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        outer.addWidget(self.progress)
        outer.addWidget(self.status)

        exp = QHBoxLayout()
        self.export_btn = QPushButton("Export results…")
        self.folder_btn = QPushButton("Score a folder…")
        exp.addWidget(self.export_btn)
        exp.addWidget(self.folder_btn)
        outer.addLayout(exp)

        self.tabs = QTabWidget()
        self.summary_table = QTableWidget(0, 2)
        self.summary_table.setHorizontalHeaderLabels(["measure", "value"])
        self.summary_table.horizontalHeader().setStretchLastSection(True)
        self.objects_table = QTableWidget(0, 0)
        self.objects_table.setSelectionBehavior(QTableWidget.SelectRows)
        self.objects_table.setSelectionMode(QTableWidget.SingleSelection)
        self.tabs.addTab(self.summary_table, "Summary")
        self.tabs.addTab(self.objects_table, "Objects")
        outer.addWidget(self.tabs, stretch=2)

        from qtpy.QtCore import QTimer

        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(PREVIEW_DELAY_MS)
        self._preview_timer.timeout.connect(self.run_preview)
        self._excl_timer = QTimer(self)
        self._excl_timer.setSingleShot(True)
        self._excl_timer.setInterval(EXCLUSION_DELAY_MS)
        self._excl_timer.timeout.connect(self._auto_exclusions)
        self._excl_pending = None

        self.marker_combo.currentTextChanged.connect(self._on_marker)
        self.layer_combo.currentIndexChanged.connect(self._on_layer)
        self.mpp_spin.valueChanged.connect(self._schedule_preview)
        self.estimate_btn.clicked.connect(self.estimate_stains_here)
        self.preview_check.toggled.connect(self._schedule_preview)
        self.color_combo.currentTextChanged.connect(self._recolor_all)
        self.color_combo.currentTextChanged.connect(self._update_legend)
        self.score_btn.clicked.connect(self.score_current)
        self.cancel_btn.clicked.connect(self.cancel)
        self.draw_excl_btn.clicked.connect(self.draw_exclusion)
        self.apply_excl_btn.clicked.connect(self.apply_exclusions)
        self.export_btn.clicked.connect(self._export_dialog)
        self.folder_btn.clicked.connect(self._folder_dialog)
        self.objects_table.itemSelectionChanged.connect(self._center_on_selection)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        cam = _camera(self.viewer)
        cam.events.center.connect(self._schedule_preview)
        cam.events.zoom.connect(self._schedule_preview)
        self._on_marker(self.marker_combo.currentText())
        self._refresh_layers()

    # ------------------------------------------------------------ layer choice
    def _image_layers(self) -> list:
        from napari.layers import Image

        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and ly.rgb]

    def _refresh_layers(self, *_: Any) -> None:
        alive = {id(ly) for ly in self.viewer.layers}
        for lid in [lid for lid in self.sessions if lid not in alive]:  # layer deleted
            self.sessions.pop(lid, None)
            self.result_layers.pop(lid, None)
        current = self.layer_combo.currentText()
        names = [ly.name for ly in self._image_layers()]
        if names == [self.layer_combo.itemText(i) for i in range(self.layer_combo.count())]:
            return
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        if self.layer_combo.currentText() != current:
            self._on_layer()

    def current_layer(self):
        """The image layer chosen in the combo box (None when there is none)."""
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
        if not mpp and tuple(layer.scale[-2:])[0] != 1.0:
            mpp = float(layer.scale[-1])  # a layer added with scale = µm/px
        self.mpp_spin.blockSignals(True)
        self.mpp_spin.setValue(float(mpp) if mpp else 0.0)
        self.mpp_spin.blockSignals(False)
        self.mpp_source.setText(f"source: {bq.get('mpp_source', 'user' if mpp else 'unknown')}")
        marker = _marker_from_name(layer.name)
        if marker and marker != self.settings.marker:
            self.marker_combo.setCurrentText(marker)
        session = self.sessions.get(id(layer))
        if session is not None and session.result is not None:
            self._fill_tables(layer, session)

    # ----------------------------------------------------------------- settings
    def _on_marker(self, marker: str) -> None:
        try:
            self.settings = load_settings(marker)
        except BiopsyQuantError as exc:
            show_error(str(exc))
            return
        self.stain_label.setText("stains: per-image estimate (preset fallback)"
                                 if self.settings.stains.estimate else
                                 f"stains: preset {self.settings.stains.preset}")
        self._build_form()
        self._update_legend()
        self._schedule_preview()

    def _update_legend(self, *_: Any) -> None:
        """Colour key of the result layers of the current analysis."""
        def dot(rgba, text):
            r, g, b = (int(255 * c) for c in rgba[:3])
            return f'<span style="color:rgb({r},{g},{b})">&#9679;</span>&nbsp;{text}'

        kind = self.settings.analysis
        self.color_combo.setVisible(kind == "cells")
        self._color_label.setVisible(kind == "cells")
        if kind == "cells" and self.color_combo.currentText() == "compartment":
            items = [dot(c, n) for n, c in COMPARTMENT_COLORS.items() if n != "vessel"]
            title = "cells by compartment"
        elif kind == "cells":
            items = [dot(GRADE_COLORS[g], t) for g, t in
                     ((0, "negative"), (1, "1+"), (2, "2+"), (3, "3+"))]
            title = "cells by DAB grade"
        elif kind == "mhc":
            items = [dot(FIBER_GRADE_COLORS[g + 1], t) for g, t in
                     ((0, "0"), (1, "1+"), (2, "2+"), (3, "3+"))] + \
                [dot(FIBER_GRADE_COLORS[FIBER_NOT_SCORED], "not scored")]
            title = "fibers by MHC-I grade"
        else:
            items = [dot(DAB_CLASS_COLORS[k], t) for k, t in
                     ((1, "weak"), (2, "moderate"), (3, "strong"))]
            title = "DAB pixel classes"
        self.legend.setText(f"{title}: " + " &nbsp; ".join(items))

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
            w.setToolTip(f"{key} (preset default {value!r})")
            self._fields[key] = w
            self.settings_form.addRow(f.name, w)

    def set_setting(self, key: str, value: Any) -> None:
        """Change one setting (dotted key, e.g. ``cells.dab_threshold_1_od``); validated by the
        library, shown in the form, and the preview refreshed."""
        try:
            self.settings = self.settings.replace({key: value}, origin="napari")
        except BiopsyQuantError as exc:
            show_error(str(exc))
            return
        w = self._fields.get(key)
        if w is not None:
            w.blockSignals(True)
            if isinstance(w, QCheckBox):
                w.setChecked(bool(value))
            elif isinstance(w, QSpinBox | QDoubleSpinBox):
                w.setValue(value)
            w.blockSignals(False)
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

    def _is_tiled(self, layer, settings) -> bool:
        """Score through the tiled engine: level 0 over ``tiling.max_whole_image_px`` and the
        layer has a file to read tiles from."""
        from biopsyquant.wsi import needs_tiling

        path = layer.metadata.get("biopsyquant", {}).get("path")
        return bool(path) and needs_tiling(self._level0(layer).shape[:2], settings)

    def session_for(self, layer) -> ReviewSession:
        """The review session of ``layer``, updated to the current settings and pixel size."""
        s = self.sessions.get(id(layer))
        bq = layer.metadata.get("biopsyquant", {})
        tiled = self._is_tiled(layer, self.settings)
        if s is None:
            image = None if tiled else np.asarray(self._level0(layer))[..., :3]
            s = ReviewSession(image=image, settings=self.settings, mpp=self._mpp(),
                              mpp_source=self._mpp_source(layer), name=layer.name,
                              path=bq.get("path"), tiled=tiled)
            self.sessions[id(layer)] = s
        else:
            s.settings = self.settings
            s.mpp = self._mpp()
            s.mpp_source = self._mpp_source(layer)
            s.tiled = tiled
            if not tiled and s.image is None:
                s.image = np.asarray(self._level0(layer))[..., :3]
        return s

    def _visible_box(self, layer) -> tuple[int, int, int, int]:
        """Level-0 pixel box (y0, y1, x0, x1) of the visible field, at most PREVIEW_MAX_PX."""
        level0 = self._level0(layer)
        h, w = level0.shape[:2]
        cam = _camera(self.viewer)
        scale = np.asarray(layer.scale[-2:], float)
        center = (np.asarray(cam.center[-2:], float) - np.asarray(layer.translate[-2:])) / scale
        size = getattr(getattr(self.viewer, "canvas", None), "size", None) or (600, 800)
        half = np.asarray(size[-2:], float) / 2 / max(float(cam.zoom), 1e-9) / scale
        half = np.minimum(half, PREVIEW_MAX_PX / 2)
        y0 = int(np.clip(center[0] - half[0], 0, max(h - 1, 0)))
        x0 = int(np.clip(center[1] - half[1], 0, max(w - 1, 0)))
        y1 = int(np.clip(center[0] + half[0], y0 + 1, h))
        x1 = int(np.clip(center[1] + half[1], x0 + 1, w))
        return y0, y1, x0, x1

    def _visible_rgb(self, layer) -> tuple[np.ndarray, tuple[int, int]]:
        y0, y1, x0, x1 = self._visible_box(layer)
        rgb = np.ascontiguousarray(np.asarray(self._level0(layer)[y0:y1, x0:x1])[..., :3])
        return rgb, (y0, x0)

    # ------------------------------------------------------------------ actions
    def estimate_stains_here(self) -> None:
        """Estimate stain vectors and background on the visible field; use them from now on."""
        from biopsyquant.stains import estimate_background, estimate_stains

        layer = self.current_layer()
        if layer is None:
            show_info("Open or select an RGB image layer first")
            return
        rgb, _ = self._visible_rgb(layer)
        try:
            background = tuple(float(b) for b in estimate_background(rgb))
            model = estimate_stains(rgb, base=self.settings.stains.preset)
            self.settings = self.settings.replace(
                {"stains.vectors": [list(map(float, v)) for v in model.vectors],
                 "stains.estimate": False, "stains.background": list(background)},
                origin="napari: estimated on the visible field")
        except BiopsyQuantError as exc:
            show_error(str(exc))
            return
        w = self._fields.get("stains.estimate")
        if isinstance(w, QCheckBox):
            w.blockSignals(True)
            w.setChecked(False)
            w.blockSignals(False)
        text = "; ".join(f"{n} ({', '.join(f'{x:.2f}' for x in v)})"
                         for n, v in zip(model.names, model.vectors, strict=True))
        self.stain_label.setText(f"stains fixed from the visible field ({model.source}): {text}; "
                                 f"background {tuple(round(b) for b in background)}")
        self._schedule_preview()

    def _schedule_preview(self, *_: Any) -> None:
        if self.preview_check.isChecked():
            self._preview_timer.start()

    def run_preview(self):
        """Score the visible field (same engine, current settings) and show it as 'preview'.

        Results of a preview superseded by a newer one are dropped.
        """
        from biopsyquant.score import score_image

        layer = self.current_layer()
        if layer is None:
            return None
        rgb, offset = self._visible_rgb(layer)
        settings, mpp = self.settings, self._mpp()
        self._preview_gen += 1
        gen = self._preview_gen

        @thread_worker
        def work():
            return score_image(rgb, settings=settings, mpp=mpp, name="preview")

        def done(res):
            if gen == self._preview_gen:
                self._show_preview(layer, res, offset)

        worker = work()
        worker.returned.connect(done)
        worker.errored.connect(lambda e: self.status.setText(f"preview failed: {e}"))
        self._preview_worker = worker
        worker.start()
        return worker

    def _remove_named(self, name: str) -> None:
        for ly in [ly for ly in self.viewer.layers if ly.name == name]:
            self.viewer.layers.remove(ly)

    def _show_preview(self, layer, res, offset) -> None:
        if layer not in self.viewer.layers:
            return
        scale = tuple(layer.scale[-2:])
        translate = tuple(np.asarray(layer.translate[-2:]) +
                          np.asarray(offset) * np.asarray(scale))
        name = f"{layer.name} preview"
        active = self.viewer.layers.selection.active
        self._remove_named(name)
        if res.settings.analysis == "cells":
            data, feats = points_data(res.cells)
            self.viewer.add_points(data, features=feats, name=name, scale=scale,
                                   translate=translate, **_units(layer), size=8, border_width=0,
                                   face_color=_face_colors(res.cells,
                                                           self.color_combo.currentText()))
        elif "dab_class" in res.labels:
            self.viewer.add_labels(res.labels["dab_class"].astype(np.uint8), name=name,
                                   scale=scale, translate=translate, **_units(layer), opacity=0.7,
                                   colormap=_direct_cmap(DAB_CLASS_COLORS))
        else:
            lab = fiber_grade_labels(res.labels.get("fibers"), res.fibers)
            if lab is not None:
                self.viewer.add_labels(lab, name=name, scale=scale, translate=translate, **_units(layer),
                                       opacity=0.6, colormap=_direct_cmap(FIBER_GRADE_COLORS))
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        self.status.setText(_short_summary(res.summary, prefix="preview of the visible field"))

    def score_current(self):
        """Score the selected image layer in a worker thread; returns the worker.

        The layer and its session are captured now: the result is drawn on that layer even if
        the user selects another one while it runs.
        """
        layer = self.current_layer()
        if layer is None:
            show_info("Open or select an RGB image layer first")
            return None
        if self._worker is not None:
            show_info("Scoring is already running; cancel it first")
            return None
        session = self.session_for(layer)
        session.exclusions = self._exclusion_polygons(layer)
        return self._run(layer, session, "scoring")

    def apply_exclusions(self, layer=None):
        """Re-score ``layer`` (default: the current one) with the polygons of its exclusion
        Shapes layer; returns the worker."""
        layer = layer if layer is not None else self.current_layer()
        if layer is None:
            return None
        if self._worker is not None:
            self._excl_pending = layer
            self._excl_timer.start()
            return None
        session = self.session_for(layer) if id(layer) not in self.sessions else \
            self.sessions[id(layer)]
        session.exclusions = self._exclusion_polygons(layer)
        return self._run(layer, session, "re-scoring with exclusions")

    def _run(self, layer, session: ReviewSession, what: str):
        @thread_worker
        def work():
            return (yield from session.score_steps())

        worker = work()
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda res: self._show_result(layer, session))
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self.status.setText(f"{what} {layer.name}: cancelled"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.score_btn.setEnabled(False)
        self.apply_excl_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText(f"{what} {layer.name}…")
        worker.start()
        return worker

    def _on_progress(self, value) -> None:
        done, total, msg = value
        self.progress.setValue(int(round(100 * done / max(total, 1))))
        self.status.setText(msg)

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(f"failed: {exc}")
        show_error(str(exc))

    def _on_finished(self) -> None:
        self.score_btn.setEnabled(True)
        self.apply_excl_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self._worker = None

    def cancel(self) -> None:
        """Cancel the running scoring: stops between tiles; a cancelled run changes nothing."""
        if self._worker is not None:
            self._worker.quit()
            self.status.setText("cancelling…")

    # ------------------------------------------------------------- exclusions
    def _exclusion_layer(self, layer, create: bool = True):
        name = f"{layer.name} exclusions"
        for ly in self.viewer.layers:
            if ly.name == name:
                return ly
        if not create:
            return None
        active = self.viewer.layers.selection.active
        ly = self.viewer.add_shapes(name=name, scale=tuple(layer.scale[-2:]),
                                    translate=tuple(layer.translate[-2:]), **_units(layer), edge_color="cyan",
                                    face_color=np.array([0.0, 1.0, 1.0, 0.15]), edge_width=4, ndim=2)
        ly.metadata["biopsyquant_exclusions_of"] = layer.name
        ly.events.data.connect(lambda e, im=layer: self._on_exclusions_edited(im, e))
        if active is not None:
            self.viewer.layers.selection.active = active
        return ly

    def draw_exclusion(self) -> None:
        """Select the current layer's exclusion Shapes layer in polygon-drawing mode."""
        layer = self.current_layer()
        if layer is None:
            return
        ly = self._exclusion_layer(layer)
        self.viewer.layers.selection.active = ly
        ly.mode = "add_polygon"

    def _on_exclusions_edited(self, layer, event) -> None:
        action = str(getattr(event, "action", "added"))
        if action not in ("added", "removed", "changed"):
            return
        session = self.sessions.get(id(layer))
        if session is None or session.result is None:
            return  # nothing scored yet: exclusions are used by the next scoring
        self._excl_pending = layer
        self._excl_timer.start()

    def _auto_exclusions(self) -> None:
        layer, self._excl_pending = self._excl_pending, None
        if layer is not None and layer in self.viewer.layers:
            self.apply_exclusions(layer)

    def _exclusion_polygons(self, layer) -> list[np.ndarray]:
        """Polygons of the layer's exclusion Shapes layer in level-0 pixel (x, y)."""
        ly = self._exclusion_layer(layer, create=False)
        if ly is None:
            return []
        out = []
        for s, kind in zip(ly.data, ly.shape_type, strict=True):
            a = np.asarray(s, float)[:, -2:]
            if kind in ("line", "path") or len(a) < 3:
                continue
            out.append(a[:, ::-1])  # (row, col) -> (x, y)
        return out

    # ----------------------------------------------------------------- results
    def _show_result(self, layer, session: ReviewSession) -> None:
        res = session.result
        if res is None or layer not in self.viewer.layers:
            return
        active = self.viewer.layers.selection.active
        scale = np.asarray(layer.scale[-2:], float)
        translate = tuple(layer.translate[-2:])
        layers = self.result_layers.setdefault(id(layer), {})
        for key in list(layers):
            if layers[key] in self.viewer.layers:
                self.viewer.layers.remove(layers[key])
            layers.pop(key)
        self._remove_named(f"{layer.name} preview")
        lab_scale = tuple(scale)
        fibers_lab = res.labels.get("fibers")
        graded = None
        if fibers_lab is None and "overview_fiber_code" in res.labels:  # tiled result
            ds = float(res.provenance.get("overview_downsample", 1.0))
            lab_scale = tuple(scale * ds)
            graded = overview_fiber_grade(res.labels["overview_fiber_code"])
            if not graded.any():
                graded, fibers_lab = None, (res.labels["overview_fiber_code"] > 0)
        elif fibers_lab is not None:
            graded = fiber_grade_labels(fibers_lab, res.fibers)
        if graded is not None:
            layers["fibers"] = self.viewer.add_labels(
                graded, name=f"{layer.name} fibers (MHC-I grade)", scale=lab_scale,
                translate=translate, **_units(layer), opacity=0.6, colormap=_direct_cmap(FIBER_GRADE_COLORS))
        elif fibers_lab is not None and np.any(fibers_lab):
            layers["fibers"] = self.viewer.add_labels(
                np.asarray(fibers_lab).astype(np.int32), name=f"{layer.name} fibers",
                scale=lab_scale, translate=translate, **_units(layer), opacity=0.25, visible=False)
        dab = res.labels.get("dab_class", res.labels.get("overview_dab_class"))
        if dab is not None and res.settings.analysis == "pixels":
            layers["dab"] = self.viewer.add_labels(
                np.asarray(dab).astype(np.uint8), name=f"{layer.name} DAB classes",
                scale=lab_scale, translate=translate, **_units(layer), opacity=0.7,
                colormap=_direct_cmap(DAB_CLASS_COLORS))
        if res.settings.analysis == "cells":
            layers["cells"] = self._add_cells_layer(layer, session)
        excl = self._exclusion_layer(layer)
        self.viewer.layers.move(self.viewer.layers.index(excl), len(self.viewer.layers) - 1)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        summ = session.summary()
        layer.metadata["biopsyquant_summary"] = summ
        self._fill_tables(layer, session)
        self.status.setText(_short_summary(summ))
        self.progress.setValue(100)

    def _add_cells_layer(self, layer, session: ReviewSession):
        table = session.cells_table(include_deleted=False)
        data, feats = points_data(table)
        size = 7.0 / session.size_mpp  # a 7 µm disk
        pts = self.viewer.add_points(
            data, features=feats, feature_defaults=feature_defaults(feats),
            name=f"{layer.name} cells", scale=tuple(layer.scale[-2:]),
            translate=tuple(layer.translate[-2:]), **_units(layer), size=size, border_width=0.15,
            border_width_is_relative=True, border_color="white",
            face_color=_face_colors(table, self.color_combo.currentText()))
        pts.metadata["biopsyquant_cells_of"] = layer.name
        pts.events.data.connect(lambda e, ly=layer, p=pts: self._on_points_edited(ly, p, e))
        return pts

    def _on_points_edited(self, layer, pts, event=None) -> None:
        """Sync deletions / additions in the cells Points layer into the session."""
        action = str(getattr(event, "action", "changed"))
        if self._syncing or action in ("adding", "removing", "changing"):
            return
        session = self.sessions.get(id(layer))
        if session is None or session.result is None:
            return
        res = session.result
        ids = pts.features["cell_id"].to_numpy(np.int64) if len(pts.features) else \
            np.zeros(0, np.int64)
        auto_ids = set(res.cells["cell_id"].astype(int)) if len(res.cells) else set()
        # a point is automatic when it carries an automatic id seen for the first time;
        # anything else (id -1, a manual id, a copied id) is a manual cell
        seen: set[int] = set()
        is_auto = np.zeros(len(ids), bool)
        for k, i in enumerate(ids):
            if int(i) in auto_ids and int(i) not in seen:
                is_auto[k] = True
                seen.add(int(i))
        session.deleted = auto_ids - seen
        manual = np.flatnonzero(~is_auto)
        data = np.asarray(pts.data, float)
        session.added = [(float(data[i][-1]), float(data[i][-2])) for i in manual]
        self._syncing = True
        try:  # give added points their measured grade / DAB and colour
            table = session.cells_table(include_deleted=False)
            _, feats = points_data(table)
            if len(feats) == len(pts.data) and len(feats):
                pts.features = feats
                pts.feature_defaults = feature_defaults(feats)
                pts.face_color = cell_colors(table, self.color_combo.currentText())
        finally:
            self._syncing = False
        summ = session.summary()
        layer.metadata["biopsyquant_summary"] = summ
        self._fill_tables(layer, session)
        self.status.setText(_short_summary(summ))

    def _recolor_all(self, *_: Any) -> None:
        by = self.color_combo.currentText()
        for lid, layers in self.result_layers.items():
            pts = layers.get("cells")
            session = self.sessions.get(lid)
            if pts is None or session is None or pts not in self.viewer.layers:
                continue
            table = session.cells_table(include_deleted=False)
            if len(table) == len(pts.data) and len(table):
                pts.face_color = cell_colors(table, by)

    def _fill_tables(self, layer, session: ReviewSession) -> None:
        summ = session.summary()
        self.summary_table.setRowCount(len(summ))
        for i, (k, v) in enumerate(summ.items()):
            self.summary_table.setItem(i, 0, QTableWidgetItem(str(k)))
            txt = f"{v:.4g}" if isinstance(v, float) else str(v)
            self.summary_table.setItem(i, 1, QTableWidgetItem(txt))
        res = session.result
        table = session.cells_table() if res.settings.analysis == "cells" else res.fibers
        table = table.reset_index(drop=True)
        first = [c for c in ("cell_id", "fiber_id", "source", "deleted", "grade", "mhc_grade",
                             "positive", "compartment", "dab_mean_od", "area_um2", "x_px",
                             "y_px") if c in table.columns]
        cols = (first + [c for c in table.columns if c not in first and c not in
                         ("x_um", "y_um")])[:16]
        self._table_layer = layer
        self._objects = table
        self.objects_table.blockSignals(True)
        self.objects_table.clear()
        self.objects_table.setColumnCount(len(cols))
        self.objects_table.setHorizontalHeaderLabels(cols)
        n = min(len(table), MAX_TABLE_ROWS)
        self.objects_table.setRowCount(n)
        values = table[cols].to_numpy(object)[:n]
        for i in range(n):
            for j in range(len(cols)):
                v = values[i, j]
                txt = f"{v:.4g}" if isinstance(v, float | np.floating) else str(v)
                self.objects_table.setItem(i, j, QTableWidgetItem(txt))
        self.objects_table.blockSignals(False)
        self.tabs.setTabText(1, f"Objects ({len(table)})")

    def select_object(self, row: int) -> None:
        """Select row ``row`` of the objects table (centres the view on the object)."""
        self.objects_table.selectRow(int(row))

    def _center_on_selection(self) -> None:
        rows = sorted({i.row() for i in self.objects_table.selectedIndexes()})
        layer = self._table_layer
        if not rows or layer is None or self._objects is None or layer not in self.viewer.layers:
            return
        row = self._objects.iloc[rows[0]]
        if "x_px" not in row or "y_px" not in row:
            return
        scale = np.asarray(layer.scale[-2:], float)
        tr = np.asarray(layer.translate[-2:], float)
        cam = _camera(self.viewer)
        cam.center = (float(row["y_px"]) * scale[0] + tr[0],
                      float(row["x_px"]) * scale[1] + tr[1])
        cam.zoom = max(float(cam.zoom), 1.5 / float(scale[0]))  # about 1.5 screen px / image px

    # ------------------------------------------------------------------- export
    def export(self, out_dir: str | Path, layer=None) -> dict:
        """Export a layer's reviewed results (default: current layer) in the batch schema."""
        layer = layer if layer is not None else self.current_layer()
        session = self.sessions.get(id(layer)) if layer is not None else None
        if session is None or session.result is None:
            raise BiopsyQuantError("score an image before exporting")
        return session.export(out_dir)

    def _export_dialog(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Export results to folder")
        if d:
            try:
                written = self.export(d)
                show_info(f"exported {', '.join(p.name for p in written.values())} to {d}")
            except (BiopsyQuantError, OSError) as exc:
                show_error(str(exc))

    def score_folder(self, folder: str | Path, out_dir: str | Path):
        """Run the batch engine on ``folder`` into ``out_dir`` (worker thread; returns it).

        Files named ``{patient}_{timepoint}_{marker}`` get their marker from the name (the
        current marker otherwise); files of the current marker use the widget's settings,
        others their preset — exactly ``biopsyquant score FOLDER --pattern ...``.
        """
        from biopsyquant._batch_inputs import DEFAULT_PATTERN
        from biopsyquant.batch import score_folder

        settings = self.settings

        @thread_worker
        def work():
            return score_folder([str(folder)], out=str(out_dir), marker=settings.marker,
                                pattern=DEFAULT_PATTERN, settings={settings.marker: settings},
                                progress=False, command=["napari", "score a folder"])

        def done(result):
            self.status.setText(result.summary_text())
            show_info(f"folder scored: {result.n_ok} ok, {result.n_error} error(s) -> {out_dir}")

        worker = work()
        worker.returned.connect(done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(lambda: self.folder_btn.setEnabled(True))
        self.folder_btn.setEnabled(False)
        self.status.setText(f"scoring folder {folder}…")
        self._folder_worker = worker
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
    """Marker from a name such as ``P01_baseline_CD163`` (None when there is none)."""
    from biopsyquant.settings import canonical_marker

    for part in reversed(Path(name).stem.split("_")):
        try:
            return canonical_marker(part)
        except BiopsyQuantError:
            continue
    return None


def _short_summary(summary: dict, prefix: str = "") -> str:
    keys = ("cells_positive", "cells_per_mm2", "cells_per_100_fibers", "n_fibers",
            "fibers_positive_pct", "positive_area_pct", "h_score", "tissue_area_mm2",
            "analysed_area_mm2")
    parts = [f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
             for k in keys if k in summary]
    return (prefix + ": " if prefix else "") + ", ".join(parts)


__all__ = ["ScoringWidget"]
