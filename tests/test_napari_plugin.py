"""napari plugin: manifest, reader, sample data, review session and export (no display needed),
and the dock widget under Xvfb (``gui`` marker; skipped without a display).

Run the GUI part with
``xvfb-run -a -s "-screen 0 1400x1000x24" python -m pytest -q tests/test_napari_plugin.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import tifffile

from biopsyquant.score import score_image
from biopsyquant.settings import load_settings

napari_biopsyquant = pytest.importorskip("napari_biopsyquant")
from napari_biopsyquant._reader import napari_get_reader  # noqa: E402
from napari_biopsyquant._session import ReviewSession  # noqa: E402

HAS_DISPLAY = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
gui = pytest.mark.skipif(not HAS_DISPLAY, reason="needs a display: run under xvfb-run -a")
MPP = 0.5
LEFT_HALF = "left half"


@pytest.fixture(scope="module")
def cd163_section():
    from biopsyquant.synthetic import generate_section

    return generate_section(marker="CD163", seed=3, shape=(768, 768), mpp=MPP,
                            cells_per_mm2=250.0)


@pytest.fixture(scope="module")
def cd163_ref(cd163_section):
    """The library's result for the section (compared with the session and the widget)."""
    return score_image(cd163_section.rgb, marker="CD163", mpp=MPP, name="P99_baseline_CD163")


@pytest.fixture(scope="module")
def cd163_left(cd163_section):
    """The library's result with the left half of the section excluded."""
    return score_image(cd163_section.rgb, marker="CD163", mpp=MPP,
                       exclusions=[_left_half(cd163_section.rgb.shape)])


@pytest.fixture(scope="module")
def cd163_file(cd163_section, tmp_path_factory):
    """The section as a TIFF with its pixel size, named like a batch input."""
    path = tmp_path_factory.mktemp("slides") / "P99_baseline_CD163.tif"
    tifffile.imwrite(path, cd163_section.rgb, photometric="rgb", compression="zlib",
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    return path


def _left_half(shape) -> np.ndarray:
    h, w = shape[:2]
    return np.array([[0, 0], [w / 2, 0], [w / 2, h], [0, h]], float)  # (x, y)


def _same_summary(a: dict, b: dict, keys=None) -> None:
    for k in keys or b:
        v, got = b[k], a[k]
        if isinstance(v, float) and np.isnan(v):
            assert np.isnan(got), k
        elif isinstance(v, float):
            assert got == pytest.approx(v, rel=1e-12, abs=1e-12), k
        else:
            assert got == v, k


# ----------------------------------------------------------------- manifest, reader, samples
def test_manifest_is_valid_and_named_like_the_distribution():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("biopsyquant")
    assert pm.name == "biopsyquant"
    ids = {c.id for c in pm.contributions.commands}
    assert {"biopsyquant.get_reader", "biopsyquant.scoring_widget", "biopsyquant.write_cells",
            "biopsyquant.write_exclusions"} <= ids
    keys = {s.key for s in pm.contributions.sample_data}
    assert keys == {"cd163", "mhc-i", "il-1a", "il-1b", "il-1ra"}
    assert pm.contributions.readers and pm.contributions.writers
    from napari_biopsyquant._reader import READABLE_SUFFIXES

    patterns = pm.contributions.readers[0].filename_patterns
    assert sorted(patterns) == sorted(f"*{s}" for s in READABLE_SUFFIXES)


def test_sample_data_are_slide_images_not_truth_files():
    from napari_biopsyquant._sample_data import SAMPLE_DIR, sample_cd163, sample_files

    files = sample_files()
    if not files:
        pytest.skip("sample_images/ not present")
    names = {p.name for p in files}
    assert all(n.count(".") == 1 for n in names), names  # no *.fibers.tif / *.compartments.tif
    assert any(p.name.endswith(".fibers.tif") for p in SAMPLE_DIR.iterdir())
    assert {p.name.split("_")[-1][:-4] for p in files} >= {"CD163", "MHC-I", "IL-1b"}
    (data, kwargs, kind), = sample_cd163()
    assert kind == "image" and kwargs["rgb"] and kwargs["name"].endswith("_CD163")
    assert kwargs["metadata"]["biopsyquant"]["mpp"] > 0
    assert kwargs["scale"][0] == pytest.approx(kwargs["metadata"]["biopsyquant"]["mpp"])


def test_reader_declines_unreadable(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert napari_get_reader(str(txt)) is None
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"this is not a tiff at all")
    reader = napari_get_reader(str(fake))
    assert reader is None or reader(str(fake)) is None


def test_reader_pyramid_is_multiscale_with_um_scale(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1024, 768, 3), dtype=np.uint8)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(256, 256), subifds=2, photometric="rgb", compression="zlib",
                 resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        for f in (2, 4):
            tw.write(base[::f, ::f], tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=1)
    reader = napari_get_reader(str(path))
    assert reader is not None
    (data, kwargs, kind), = reader(str(path))
    assert kind == "image" and kwargs["multiscale"] is True
    assert [tuple(d.shape) for d in data] == [(1024, 768, 3), (512, 384, 3), (256, 192, 3)]
    assert kwargs["scale"] == pytest.approx((0.25, 0.25))
    assert kwargs["metadata"]["biopsyquant"]["mpp_source"] == "tiff-resolution"
    np.testing.assert_array_equal(np.asarray(data[1][10:20, 30:40]), base[::2, ::2][10:20, 30:40])


def test_writers_round_trip(tmp_path):
    from napari_biopsyquant._writer import write_cells, write_exclusions

    from biopsyquant.tissue import load_exclusions

    poly_rc = np.array([[10, 20], [10, 80], [60, 80], [60, 20]], float)
    out = write_exclusions(str(tmp_path / "ex.geojson"), [poly_rc], {})
    back = load_exclusions(out[0])
    assert len(back) == 1
    np.testing.assert_allclose(np.asarray(back[0])[:4], poly_rc[:, ::-1])
    feats = pd.DataFrame({"cell_id": [1, 2], "grade": [1, 3]})
    out = write_cells(str(tmp_path / "c.csv"), np.array([[5.0, 7.0], [9.0, 11.0]]),
                      {"features": feats, "metadata": {"biopsyquant": {"mpp": 0.5}}})
    cells = pd.read_csv(out[0])
    assert cells["x_px"].tolist() == [7.0, 11.0] and cells["y_um"].tolist() == [2.5, 4.5]


# ---------------------------------------------------------------------- review session
def _session(section, name="cd163", **kw):
    return ReviewSession(image=section.rgb, settings=load_settings("CD163"), mpp=section.mpp,
                         mpp_source="user", name=name, **kw)


def test_session_scores_exactly_like_the_library(cd163_section, cd163_ref):
    s = _session(cd163_section, name="P99_baseline_CD163")
    res = s.score()
    ref = cd163_ref
    assert res.summary["cells_positive"] == ref.summary["cells_positive"]
    _same_summary(res.summary, ref.summary)


def test_exclusion_lowers_count_and_area(cd163_section, cd163_ref, cd163_left):
    s = _session(cd163_section)
    full = cd163_ref.summary
    excl = s.set_exclusions([_left_half(cd163_section.rgb.shape)]).summary
    _same_summary(excl, cd163_left.summary, keys=[k for k in excl if k != "slide"])
    # the left half holds about half of the tissue: analysed area drops by 35-65 %
    assert 0.35 * full["analysed_area_mm2"] < excl["analysed_area_mm2"] \
        < 0.65 * full["analysed_area_mm2"]
    assert excl["excluded_area_mm2"] == pytest.approx(
        full["analysed_area_mm2"] - excl["analysed_area_mm2"], rel=1e-9)
    assert excl["cells_positive"] < full["cells_positive"]
    assert (s.result.cells["x_px"] >= cd163_section.rgb.shape[1] / 2 - 1).all()


def test_deleting_and_adding_cells_updates_counts(cd163_section, tmp_path):
    s = _session(cd163_section)
    res = s.score()
    n = res.summary["cells_positive"]
    assert n > 5
    pos = res.cells[res.cells["positive"].astype(bool)]
    s.delete_cells([int(pos["cell_id"].iloc[0])])
    assert s.summary()["cells_positive"] == n - 1
    assert s.summary()["cells_deleted_manual"] == 1
    area = res.summary["analysed_area_mm2"]
    assert s.summary()["cells_per_mm2"] == pytest.approx((n - 1) / area, rel=1e-9)
    s.add_cell(100.0, 120.0)
    s.add_cell(300.0, 40.0)
    summ = s.summary()
    assert summ["cells_positive"] == n + 1
    assert summ["cells_added_manual"] == 2 and summ["cells_positive_auto"] == n
    assert summ["cells_per_mm2"] == pytest.approx((n + 1) / area, rel=1e-9)
    written = s.export(tmp_path)
    slides = pd.read_csv(written["slides"])
    cells = pd.read_csv(written["cells"])
    assert slides.loc[0, "cells_positive"] == n + 1
    assert slides.loc[0, "cells_positive_auto"] == n
    assert (cells["source"] == "manual").sum() == 2
    assert cells["deleted"].sum() == 1
    kept = cells[~cells["deleted"]]
    assert int(kept["positive"].sum()) == n + 1
    # corrections survive re-scoring (the deleted detection is found again by position)
    s.score()
    assert s.summary()["cells_positive"] == n + 1 and len(s.deleted) == 1


def test_tiled_session_equals_batch_score_one(cd163_file):
    """Slides over tiling.max_whole_image_px go through the batch's tiled engine."""
    from biopsyquant.batch import score_one

    settings = load_settings("CD163", overrides={"tiling.max_whole_image_px": 200_000,
                                                 "tiling.tile_size_px": 384,
                                                 "tiling.overlap_um": 80.0})
    s = ReviewSession(image=None, settings=settings, mpp=MPP, mpp_source="tiff-resolution",
                      name="P99_baseline_CD163", path=str(cd163_file), tiled=True)
    steps = []
    gen = s.score_steps()
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            res = stop.value
            break
    assert res.provenance["tiling"]["tiled"] and res.provenance["tiling"]["n_tiles"] == 4
    assert [d for d, _, _ in steps[1:5]] == [0, 1, 2, 3] and steps[-1][:2] == (4, 4)
    ref = score_one(cd163_file, settings=settings)
    _same_summary(res.summary, ref.summary)
    assert len(res.cells) == len(ref.cells)
    s.delete_cells([int(res.cells["cell_id"].iloc[0])])
    s.add_cell(50.0, 60.0)
    assert s.summary()["cells_detected"] == ref.summary["cells_detected"]


def test_export_matches_batch_schema_and_exclusions_feed_the_batch(cd163_file, tmp_path):
    """The widget's export has the batch CLI's columns, and its exclusion GeoJSON given to the
    batch (manifest ``exclusions`` column) gives the same numbers as the review session."""
    from biopsyquant.batch import SLIDE_LEAD_COLUMNS, score_folder
    from biopsyquant.slide import open_slide

    with open_slide(cd163_file) as slide:
        rgb = slide.read_level(0)
        mpp, source = slide.mpp, slide.mpp_source
    s = ReviewSession(image=rgb, settings=load_settings("CD163"), mpp=mpp, mpp_source=source,
                      name="P99_baseline_CD163", path=str(cd163_file))
    s.set_exclusions([_left_half(rgb.shape)])
    written = s.export(tmp_path / "napari")
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [str(cd163_file)], "marker": ["CD163"], "patient": ["P99"],
                  "timepoint": ["baseline"],
                  "exclusions": [str(written["exclusions"])]}).to_csv(manifest, index=False)
    batch = score_folder(manifest=manifest, out=tmp_path / "batch", progress=False,
                         overlays=False)
    assert batch.ok
    b_slides = pd.read_csv(tmp_path / "batch" / "slides.csv")
    n_slides = pd.read_csv(written["slides"])
    # same leading columns, in order; every batch column present in the export
    assert list(n_slides.columns[:len(SLIDE_LEAD_COLUMNS)]) == SLIDE_LEAD_COLUMNS
    assert list(b_slides.columns[:len(SLIDE_LEAD_COLUMNS)]) == SLIDE_LEAD_COLUMNS
    assert set(b_slides.columns) - {"overlay"} <= set(n_slides.columns)
    summary_cols = [c for c in b_slides.columns if c not in SLIDE_LEAD_COLUMNS and c not in
                    ("overlay", "warnings")]
    n_rest = [c for c in n_slides.columns if c in summary_cols]
    assert n_rest == summary_cols  # same summary columns in the same order
    for kind in ("cells", "fibers"):
        b = pd.read_csv(tmp_path / "batch" / f"{kind}.csv")
        n = pd.read_csv(written[kind])
        assert list(n.columns[:len(b.columns)]) == list(b.columns), kind
        assert len(n) == len(b), kind
    for c in ("cells_positive", "cells_per_mm2", "analysed_area_mm2", "excluded_area_mm2",
              "n_fibers", "tissue_area_mm2"):
        assert n_slides.loc[0, c] == pytest.approx(b_slides.loc[0, c], rel=1e-9), c
    assert b_slides.loc[0, "excluded_area_mm2"] > 0
    # the exported settings file reproduces the settings
    again = load_settings("CD163", path=written["settings"])
    assert again.digest() == s.settings.digest()


# ------------------------------------------------------------------ GUI (Xvfb)
def _add_section(viewer, section, name):
    return viewer.add_image(section.rgb, rgb=True, name=name, scale=(MPP, MPP),
                            metadata={"biopsyquant": {"mpp": MPP, "mpp_source": "user",
                                                      "path": None}})


def _wait(qtbot, worker, timeout=120_000):
    with qtbot.waitSignal(worker.finished, timeout=timeout):
        pass


@gui
@pytest.mark.gui
def test_widget_scores_edits_excludes_and_exports(make_napari_viewer, qtbot, cd163_section,
                                                  cd163_ref, cd163_left, cd163_file, tmp_path):
    viewer = make_napari_viewer()
    layer = _add_section(viewer, cd163_section, "P99_baseline_CD163")
    _, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
    assert widget.marker_combo.currentText() == "CD163"
    assert widget.mpp_spin.value() == pytest.approx(MPP)
    thr = widget._fields["cells.dab_threshold_1_od"]
    assert thr.value() == pytest.approx(load_settings("CD163").cells.dab_threshold_1_od)
    assert thr.suffix() == " OD"
    worker = widget.score_current()
    _wait(qtbot, worker)
    session = widget.sessions[id(layer)]
    ref = cd163_ref
    _same_summary(session.result.summary, ref.summary,
                  keys=[k for k in ref.summary if k != "mpp_source"])
    pts = next(ly for ly in viewer.layers if ly.name == "P99_baseline_CD163 cells")
    assert len(pts.data) == len(ref.cells)
    assert set(pts.features.columns) >= {"cell_id", "grade", "compartment", "dab_mean_od"}
    n = session.summary()["cells_positive"]
    # delete one positive point through the layer, as a user would
    pos_idx = int(np.flatnonzero(pts.features["positive"].astype(bool).to_numpy())[0])
    pts.selected_data = {pos_idx}
    pts.remove_selected()
    assert session.summary()["cells_positive"] == n - 1
    assert layer.metadata["biopsyquant_summary"]["cells_positive"] == n - 1
    # add a point: it is a manual cell, graded, counted
    pts.add(np.array([[200.0, 300.0]]))
    assert session.summary()["cells_positive"] == n
    assert session.added == [(300.0, 200.0)]
    assert pts.features["source"].iloc[-1] == "manual"
    # drawing an exclusion over the left half re-scores automatically
    excl = next(ly for ly in viewer.layers if ly.name == "P99_baseline_CD163 exclusions")
    area_before = session.result.summary["analysed_area_mm2"]
    h, w = cd163_section.rgb.shape[:2]
    excl.add_polygons([np.array([[0, 0], [0, w / 2], [h, w / 2], [h, 0]], float)])
    qtbot.waitUntil(lambda: session.result.summary["analysed_area_mm2"] < 0.7 * area_before,
                    timeout=120_000)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    ref_ex = cd163_left
    assert session.result.summary["cells_positive"] == ref_ex.summary["cells_positive"]
    assert session.result.summary["analysed_area_mm2"] == pytest.approx(
        ref_ex.summary["analysed_area_mm2"])
    # the deleted cell was in the left half (or not): corrections carried over or dropped
    written = widget.export(tmp_path)
    back = pd.read_csv(written["slides"])
    assert back.loc[0, "cells_positive"] == session.summary()["cells_positive"]
    assert back.loc[0, "excluded_area_mm2"] > 0
    from biopsyquant.tissue import load_exclusions

    (poly,) = load_exclusions(written["exclusions"])
    assert np.asarray(poly)[:, 0].max() == pytest.approx(w / 2)
    # the drawn exclusion, as exported, gives the batch engine the widget's automatic numbers
    from biopsyquant.batch import score_one

    batch = score_one(cd163_file, settings=load_settings("CD163"),
                      exclusions=written["exclusions"])
    for k in ("cells_detected", "cells_positive", "cells_per_mm2", "analysed_area_mm2",
              "excluded_area_mm2", "n_fibers"):
        assert batch.summary[k] == pytest.approx(session.result.summary[k], rel=1e-12), k


@gui
@pytest.mark.gui
def test_results_stay_on_their_layer_and_table_centres_view(make_napari_viewer, qtbot,
                                                            cd163_section):
    viewer = make_napari_viewer()
    a = _add_section(viewer, cd163_section, "A_baseline_CD163")
    b = viewer.add_image(cd163_section.rgb[:256, :256], rgb=True, name="B_baseline_CD163",
                         scale=(MPP, MPP))
    _, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
    widget.layer_combo.setCurrentText(a.name)
    worker = widget.score_current()
    widget.layer_combo.setCurrentText(b.name)  # the user switches layers meanwhile
    assert widget.current_layer() is b
    _wait(qtbot, worker)
    assert widget.sessions[id(a)].result is not None and id(b) not in widget.sessions
    assert any(ly.name == "A_baseline_CD163 cells" for ly in viewer.layers)
    assert not any(ly.name == "B_baseline_CD163 cells" for ly in viewer.layers)
    assert "cells_positive" in a.metadata["biopsyquant_summary"]
    assert "biopsyquant_summary" not in b.metadata
    # an image without detections (blank glass) gives an empty cells layer, not an error
    blank = viewer.add_image(np.full((256, 256, 3), 235, np.uint8), rgb=True,
                             name="blank_glass_CD163", scale=(MPP, MPP))
    widget.layer_combo.setCurrentText(blank.name)
    worker = widget.score_current()
    _wait(qtbot, worker)
    empty = next(ly for ly in viewer.layers if ly.name == "blank_glass_CD163 cells")
    assert len(empty.data) == 0 and blank.metadata["biopsyquant_summary"]["cells_positive"] == 0
    empty.add(np.array([[100.0, 100.0]]))  # a manual cell on an empty layer counts
    assert widget.sessions[id(blank)].summary()["cells_added_manual"] == 1
    widget.layer_combo.setCurrentText(a.name)
    # selecting a row centres the view on that object
    from napari_biopsyquant._widget import _camera

    cam = _camera(viewer)
    cam.center = (0.0, 0.0)
    objects = widget._objects
    row = int(np.argmax(objects["x_px"].to_numpy() + objects["y_px"].to_numpy()))
    widget.select_object(row)
    assert tuple(cam.center[-2:]) == pytest.approx(
        (objects.loc[row, "y_px"] * MPP, objects.loc[row, "x_px"] * MPP))


@gui
@pytest.mark.gui
def test_large_slide_scores_in_tiles_with_progress_and_cancel(make_napari_viewer, qtbot,
                                                              cd163_file):
    """Level 0 over tiling.max_whole_image_px: the widget uses the batch's tiled engine."""
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(cd163_file), plugin="biopsyquant")
    _, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
    for key, value in (("tiling.max_whole_image_px", 200_000), ("tiling.tile_size_px", 384),
                       ("tiling.overlap_um", 80.0)):
        widget.set_setting(key, value)
    progress = []
    worker = widget.score_current()
    session = widget.sessions[id(layer)]
    assert session.tiled and session.image is None  # level 0 is not read whole
    worker.yielded.connect(lambda v: (progress.append(v), widget.cancel()))
    _wait(qtbot, worker)
    assert progress and session.result is None  # cancelled: nothing changed
    assert "cancelled" in widget.status.text()
    assert not any(ly.name.endswith(" cells") for ly in viewer.layers)
    progress.clear()
    worker = widget.score_current()
    worker.yielded.connect(progress.append)
    _wait(qtbot, worker)
    res = session.result
    assert res.provenance["tiling"]["n_tiles"] == 4
    assert [p[:2] for p in progress][-1] == (4, 4) and widget.progress.value() == 100
    pts = next(ly for ly in viewer.layers if ly.name == f"{layer.name} cells")
    assert len(pts.data) == len(res.cells)
    fib = next(ly for ly in viewer.layers if ly.name.startswith(f"{layer.name} fibers"))
    ds = res.provenance["overview_downsample"]
    assert tuple(fib.scale) == pytest.approx((MPP * ds, MPP * ds))


@gui
@pytest.mark.gui
def test_live_preview_of_visible_field(make_napari_viewer, qtbot, cd163_section):
    viewer = make_napari_viewer()
    _add_section(viewer, cd163_section, "P99_baseline_CD163")
    _, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
    from napari_biopsyquant._widget import _camera

    _camera(viewer).center = (200 * MPP, 200 * MPP)
    _camera(viewer).zoom = 3.0
    widget.preview_check.setChecked(True)  # schedules a debounced preview
    name = "P99_baseline_CD163 preview"
    qtbot.waitUntil(lambda: any(ly.name == name for ly in viewer.layers), timeout=60_000)
    prev = next(ly for ly in viewer.layers if ly.name == name)
    y0, y1, x0, x1 = widget._visible_box(widget.current_layer())
    assert (y1 - y0) <= 512 and (x1 - x0) <= 512  # only (part of) the visible field is scored
    assert tuple(prev.translate[-2:]) == pytest.approx((y0 * MPP, x0 * MPP))
    # "estimate stains here" fixes vectors + background from the visible field
    widget.estimate_stains_here()
    st = widget.settings.stains
    assert st.estimate is False and len(st.vectors) >= 2 and len(st.background) == 3
    assert all(abs(np.linalg.norm(v) - 1) < 1e-6 for v in st.vectors[:2])
    assert "visible field" in widget.stain_label.text()
    # a settings change refreshes it (debounced): a high DAB cut leaves fewer positive points
    n_before = int(prev.features["positive"].astype(bool).sum()) if len(prev.data) else 0
    widget.set_setting("cells.dab_threshold_1_od", 0.39)
    qtbot.waitUntil(lambda: next(ly for ly in viewer.layers if ly.name == name) is not prev,
                    timeout=60_000)
    prev2 = next(ly for ly in viewer.layers if ly.name == name)
    n_after = int(prev2.features["positive"].astype(bool).sum()) if len(prev2.data) else 0
    assert n_after <= n_before


@gui
@pytest.mark.gui
def test_score_a_folder_runs_the_batch_engine(make_napari_viewer, qtbot, cd163_file, tmp_path):
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cd163_file, folder / cd163_file.name)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
    widget.set_setting("cells.dab_threshold_1_od", 0.3)
    worker = widget.score_folder(folder, tmp_path / "out")
    _wait(qtbot, worker)
    slides = pd.read_csv(tmp_path / "out" / "slides.csv")
    assert slides.loc[0, "status"] == "ok" and slides.loc[0, "patient"] == "P99"
    ref = score_image(tifffile.imread(cd163_file), settings=widget.settings, mpp=MPP)
    assert slides.loc[0, "cells_positive"] == ref.summary["cells_positive"]
    assert (tmp_path / "out" / "cells.csv").exists()


@gui
@pytest.mark.gui
def test_reader_through_viewer_opens_pyramid(make_napari_viewer, tmp_path):
    base = np.full((512, 512, 3), 200, np.uint8)
    path = tmp_path / "p.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(256, 256), subifds=1, photometric="rgb",
                 resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
        tw.write(base[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="biopsyquant")
    assert layers[0].multiscale and tuple(layers[0].scale) == pytest.approx((0.5, 0.5))
    assert layers[0].metadata["biopsyquant"]["path"] == str(path)
