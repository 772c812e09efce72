"""napari plugin: manifest, reader, review session (no display needed) and the dock widget
under Xvfb (``gui`` marker; skipped without a display)."""

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


@pytest.fixture(scope="module")
def cd163_section():
    from biopsyquant.synthetic import generate_section

    return generate_section(marker="CD163", seed=3, shape=(768, 768), mpp=0.5,
                            cells_per_mm2=250.0)


def test_manifest_is_valid_and_named_like_the_distribution():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("biopsyquant")
    assert pm.name == "biopsyquant"
    ids = {c.id for c in pm.contributions.commands}
    assert {"biopsyquant.get_reader", "biopsyquant.scoring_widget",
            "biopsyquant.sample_cd163"} <= ids
    assert pm.contributions.readers and pm.contributions.sample_data


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


def _session(section, **kw):
    return ReviewSession(image=section.rgb, settings=load_settings("CD163"), mpp=section.mpp,
                         mpp_source="user", name="cd163", **kw)


def test_session_scores_exactly_like_the_library(cd163_section):
    s = _session(cd163_section)
    res = s.score()
    ref = score_image(cd163_section.rgb, marker="CD163", mpp=cd163_section.mpp, name="cd163")
    assert res.summary["cells_positive"] == ref.summary["cells_positive"]
    for k, v in ref.summary.items():
        got = res.summary[k]
        if isinstance(v, float) and np.isnan(v):
            assert np.isnan(got), k
        else:
            assert got == v, k


def test_exclusion_lowers_count_and_area(cd163_section):
    s = _session(cd163_section)
    full = s.score().summary
    h, w = cd163_section.rgb.shape[:2]
    half = np.array([[0, 0], [w / 2, 0], [w / 2, h], [0, h]], float)  # left half, (x, y)
    excl = s.set_exclusions([half]).summary
    assert excl["analysed_area_mm2"] < 0.7 * full["analysed_area_mm2"]
    assert excl["excluded_area_mm2"] > 0
    assert excl["cells_positive"] < full["cells_positive"]
    assert (s.result.cells["x_px"] >= w / 2 - 1).all()


def test_deleting_and_adding_cells_updates_counts(cd163_section, tmp_path):
    s = _session(cd163_section)
    res = s.score()
    n = res.summary["cells_positive"]
    assert n > 5
    pos = res.cells[res.cells["positive"].astype(bool)]
    s.delete_cells([int(pos["cell_id"].iloc[0])])
    assert s.summary()["cells_positive"] == n - 1
    assert s.summary()["cells_deleted_manual"] == 1
    assert s.summary()["cells_per_mm2"] < res.summary["cells_per_mm2"]
    s.add_cell(100.0, 120.0)
    s.add_cell(300.0, 40.0)
    summ = s.summary()
    assert summ["cells_positive"] == n + 1
    assert summ["cells_added_manual"] == 2 and summ["cells_positive_auto"] == n
    written = s.export(tmp_path)
    slides = pd.read_csv(written["slides"])
    cells = pd.read_csv(written["cells"])
    assert slides.loc[0, "cells_positive"] == n + 1
    assert (cells["source"] == "manual").sum() == 2
    assert cells["deleted"].sum() == 1
    kept = cells[~cells["deleted"]]
    assert int(kept["positive"].sum()) == n + 1


# ------------------------------------------------------------------ GUI (Xvfb)
@gui
@pytest.mark.gui
def test_widget_scores_edits_and_exports(make_napari_viewer, qtbot, cd163_section, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_image(cd163_section.rgb, rgb=True, name="P99_baseline_CD163",
                             scale=(0.5, 0.5),
                             metadata={"biopsyquant": {"mpp": 0.5, "mpp_source": "user",
                                                       "path": None}})
    _, widget = viewer.window.add_plugin_dock_widget("biopsyquant", "Score IHC")
    assert widget.marker_combo.currentText() == "CD163"
    assert widget.mpp_spin.value() == pytest.approx(0.5)
    worker = widget.score_current()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    session = widget.sessions[id(layer)]
    ref = score_image(cd163_section.rgb, marker="CD163", mpp=0.5, name="P99_baseline_CD163")
    assert session.result.summary["cells_positive"] == ref.summary["cells_positive"]
    assert session.result.summary["cells_per_mm2"] == pytest.approx(ref.summary["cells_per_mm2"])
    pts = next(ly for ly in viewer.layers if ly.name == "P99_baseline_CD163 cells")
    n = session.summary()["cells_positive"]
    # delete one positive point through the layer, as a user would
    pos_idx = int(np.flatnonzero(pts.features["positive"].astype(bool).to_numpy())[0])
    pts.selected_data = {pos_idx}
    pts.remove_selected()
    assert session.summary()["cells_positive"] == n - 1
    assert layer.metadata["biopsyquant_summary"]["cells_positive"] == n - 1
    # an exclusion over the left half lowers counts and the analysed area
    excl = next(ly for ly in viewer.layers if ly.name == "P99_baseline_CD163 exclusions")
    h, w = cd163_section.rgb.shape[:2]
    excl.add_polygons([np.array([[0, 0], [0, w / 2], [h, w / 2], [h, 0]]) * 0.5])
    area_before = session.result.summary["analysed_area_mm2"]
    worker = widget.apply_exclusions()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert session.result.summary["analysed_area_mm2"] < 0.7 * area_before
    assert session.result.summary["cells_positive"] < n
    written = widget.export(tmp_path)
    back = pd.read_csv(written["slides"])
    assert back.loc[0, "cells_positive"] == session.summary()["cells_positive"]
    assert written["exclusions"].exists()


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
