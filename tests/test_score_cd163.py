"""CD163 macrophage counting on generated sections with exact truth (biopsyquant.cells).

Sections from :func:`biopsyquant.synthetic.generate_section` with a perturbed staining batch
(stain vectors rotated, uneven illumination, JPEG q80): the stain model is estimated from the
image as the engine does (``score.prepare_stain_model``); fibers and compartments are taken
from the truth so that these tests measure the cell detector alone (the end-to-end test at the
bottom uses the fiber/compartment modules).

Tolerances (issue #4): positive-cell F1 ≥ 0.90 at a 6 µm match radius and density error
≤ 10 % over 0–400 cells/mm²; < 2 false positives per mm² of tissue without macrophages; the same
cells whether an image is scored whole or in overlapping tiles.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from biopsyquant import cells as cellmod
from biopsyquant.evaluate import match_points
from biopsyquant.score import (
    COMPARTMENT_NAMES,
    ImageContext,
    measure_image,
    prepare_stain_model,
)
from biopsyquant.score import summarize as score_summarize
from biopsyquant.settings import load_settings
from biopsyquant.stains import deconvolve

synthetic = pytest.importorskip("biopsyquant.synthetic")

MPP = 0.5
SHAPE = (1280, 1280)
PERTURB = dict(vector_jitter_deg=5.0, illumination=0.12, jpeg_quality=80)
SETTINGS = load_settings("CD163")


def _section(seed, density, **kw):
    opts = dict(PERTURB, cells_per_mm2=float(density), n_clusters=1 if density >= 200 else 0)
    opts.update(kw)
    return synthetic.generate_section(marker="CD163", seed=seed, shape=SHAPE, mpp=MPP, **opts)


def _context(sec, settings=SETTINGS, model=None):
    model = model or prepare_stain_model(sec.rgb, settings, tissue=sec.tissue)
    od = deconvolve(sec.rgb, model)
    hema = np.ascontiguousarray(od[..., model.index("hematoxylin")])
    dab = np.ascontiguousarray(od[..., model.index("dab")])
    excluded = np.zeros(sec.tissue.shape, bool)
    return ImageContext(rgb=sec.rgb, mpp=sec.mpp, size_mpp=sec.mpp, stain_model=model,
                        hema_od=hema, dab_od=dab, tissue=sec.tissue, excluded=excluded,
                        analysed=sec.tissue, fibers=sec.fibers,
                        fiber_table=pd.DataFrame({"fiber_id": np.arange(1, sec.fibers.max() + 1)}),
                        compartments=sec.compartments, settings=settings)


def _counts(sec):
    codes = np.bincount(sec.compartments[sec.tissue].ravel(), minlength=6)
    out = {"tissue_px": int(sec.tissue.sum()), "analysed_px": int(sec.tissue.sum()),
           "excluded_px": 0}
    for code, name in COMPARTMENT_NAMES.items():
        if code:
            out[f"{name}_px"] = int(codes[code])
    return out


def _score(sec):
    ctx = _context(sec)
    meas = cellmod.measure(ctx)
    summary = score_summarize(cells=meas.cells, fibers=ctx.fiber_table,
                              counts={**_counts(sec), **meas.counts}, mpp=sec.mpp,
                              settings=SETTINGS)
    return meas.cells, summary


@pytest.fixture(scope="module")
def scored():
    out = []
    for seed, density in ((11, 60), (12, 150), (13, 250), (14, 400)):
        sec = _section(seed, density)
        cells, summary = _score(sec)
        out.append((density, sec, cells, summary))
    return out


@pytest.mark.slow
def test_detection_f1_and_density(scored):
    tp = fp = fn = 0
    for density, sec, cells, summary in scored:
        truth = sec.positive_cells[["x_px", "y_px"]].to_numpy()
        pred = cells.loc[cells["positive"], ["x_px", "y_px"]].to_numpy()
        r = match_points(pred, truth, 6.0 / sec.mpp)
        tp, fp, fn = tp + r.tp, fp + r.fp, fn + r.fn
        assert r.f1 >= 0.90, (density, r)
        true_density = len(truth) / (sec.tissue.sum() * (sec.mpp * 1e-3) ** 2)
        assert summary["cells_per_mm2"] == pytest.approx(true_density, rel=0.10), density
        assert summary["cells_positive"] == len(pred)
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 >= 0.91


@pytest.mark.slow
def test_compartments_grades_and_clusters(scored):
    for density, sec, cells, summary in scored:
        truth = sec.positive_cells
        # per-compartment counts follow the truth (matched cells carry the truth's compartment)
        for name, key in (("endomysium", "cells_endomysial"), ("perimysium", "cells_perimysial")):
            t = int((truth["compartment"] == name).sum())
            assert abs(summary[key] - t) <= max(3, 0.15 * t), (density, name, summary[key], t)
        t_pv = int(truth["compartment"].isin(["vessel", "perivascular"]).sum())
        # perivascular cells overlap each other and vessel walls more often; seed 12 misses 5
        # of 11 (known gap, docs/_parts/cells-validation.md)
        assert abs(summary["cells_perivascular"] - t_pv) <= max(5, 0.2 * t_pv)
        # grades: matched cells agree with the truth grade for most cells
        pred = cells[cells["positive"]]
        from scipy.spatial import cKDTree

        d, j = cKDTree(truth[["x_px", "y_px"]].to_numpy()).query(
            pred[["x_px", "y_px"]].to_numpy())
        ok = d <= 6.0 / sec.mpp
        agree = np.mean(pred["grade"].to_numpy()[ok] == truth["grade"].to_numpy()[j[ok]])
        assert agree >= 0.75, (density, agree)
        if density >= 200:  # a generated cluster of 10-25 cells is found
            assert summary["clusters_10plus"] >= 1
        assert 0 <= summary["h_score_cells"] <= 300
        assert summary["cells_per_100_fibers"] == pytest.approx(
            100 * summary["cells_positive"] / sec.fibers.max())


@pytest.mark.slow
def test_no_macrophages_few_false_positives():
    fp = 0
    area_mm2 = 0.0
    for seed in (21, 22, 23):
        sec = _section(seed, 0)
        assert len(sec.positive_cells) == 0
        cells, summary = _score(sec)
        fp += summary["cells_positive"]
        area_mm2 += summary["tissue_area_mm2"]
        # interstitial nuclei and myonuclei are found, as negative cells
        assert summary["cells_negative"] > 50
    assert fp / area_mm2 < 2.0, (fp, area_mm2)


def _settings_for_engine():
    if importlib.util.find_spec("biopsyquant.compartments") is None:
        return SETTINGS.replace({"scoring.segment_fibers": False})
    return SETTINGS


def test_whole_vs_tiles_same_cells():
    """Overlapping tiles, each keeping the cells whose centroid lies in its core."""
    sec = synthetic.generate_section(marker="CD163", seed=31, shape=(1024, 1024), mpp=MPP,
                                     cells_per_mm2=300.0, n_clusters=1, **PERTURB)
    settings = _settings_for_engine()
    model = prepare_stain_model(sec.rgb, settings, tissue=sec.tissue)
    _, whole, _, _ = measure_image(sec.rgb, settings=settings, stain_model=model, mpp=MPP,
                                   tissue=sec.tissue, keep_labels=False)
    core, overlap = 384, 100  # px; overlap 50 µm > largest cell + filter support
    h, w = sec.tissue.shape
    parts = []
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            ya, xa = max(0, y0 - overlap), max(0, x0 - overlap)
            yb, xb = min(h, y0 + core + overlap), min(w, x0 + core + overlap)
            own = np.zeros((yb - ya, xb - xa), bool)
            own[y0 - ya:min(y0 + core, h) - ya, x0 - xa:min(x0 + core, w) - xa] = True
            _, m, _, _ = measure_image(
                np.ascontiguousarray(sec.rgb[ya:yb, xa:xb]), settings=settings,
                stain_model=model, mpp=MPP, tissue=sec.tissue[ya:yb, xa:xb], own=own,
                origin=(xa, ya), keep_labels=False)
            c = m.cells
            cx, cy = np.round(c["x_px"]).astype(int), np.round(c["y_px"]).astype(int)
            keep = own[np.clip(cy, 0, own.shape[0] - 1), np.clip(cx, 0, own.shape[1] - 1)]
            c = c[keep].copy()
            c["x_px"] += xa
            c["y_px"] += ya
            parts.append(c)
    tiled = pd.concat(parts, ignore_index=True)
    assert len(whole.cells) > 200
    assert tiled["positive"].sum() == whole.cells["positive"].sum()
    assert abs(len(tiled) - len(whole.cells)) <= 1
    r = match_points(tiled.loc[tiled.positive, ["x_px", "y_px"]].to_numpy(),
                     whole.cells.loc[whole.cells.positive, ["x_px", "y_px"]].to_numpy(), 1.0)
    assert r.fp == 0 and r.fn == 0
    # slide-level numbers from the concatenated tables agree too
    s_whole = cellmod.summarize(cells=whole.cells.copy(), fibers=pd.DataFrame(), counts={},
                                mpp=MPP, settings=settings,
                                areas_mm2={"analysed_area_mm2": 1.0})
    s_tiled = cellmod.summarize(cells=tiled, fibers=pd.DataFrame(), counts={}, mpp=MPP,
                                settings=settings, areas_mm2={"analysed_area_mm2": 1.0})
    for k in ("cells_positive", "cells_grade_1", "cells_grade_2", "cells_grade_3",
              "clusters_10plus"):
        assert s_whole[k] == s_tiled[k], k


def test_pixel_size_unknown_blanks_physical_columns():
    sec = synthetic.generate_section(marker="CD163", seed=41, shape=(512, 512), mpp=MPP,
                                     cells_per_mm2=200.0)
    ctx = _context(sec)
    ctx.mpp = None
    meas = cellmod.measure(ctx)
    assert len(meas.cells) and meas.cells["area_um2"].isna().all()
    assert {"compartment", "fiber_id", "cell_id", "grade", "positive"} <= set(meas.cells)
    assert set(meas.cells["compartment"].astype(str)) <= {
        "outside", "fiber", "endomysium", "perimysium", "perivascular"}
    s = cellmod.summarize(cells=meas.cells, fibers=ctx.fiber_table, counts={}, mpp=None,
                          settings=SETTINGS, areas_mm2={"analysed_area_mm2": float("nan")})
    assert np.isnan(s["cells_per_mm2"]) and s["cells_positive"] > 0


def test_score_image_end_to_end():
    pytest.importorskip("biopsyquant.compartments")
    from biopsyquant.score import score_image

    sec = synthetic.generate_section(marker="CD163", seed=51, shape=(1024, 1024), mpp=MPP,
                                     cells_per_mm2=200.0, **PERTURB)
    res = score_image(sec.rgb, marker="CD163", mpp=MPP)
    n_true = len(sec.positive_cells)
    assert res.summary["cells_positive"] == pytest.approx(n_true, rel=0.15)
    assert {"cells_per_mm2", "cells_per_100_fibers", "clusters_10plus", "jdm_level"} <= set(
        res.summary)
    assert "cluster_id" in res.cells and "x_um" in res.cells
    assert res.labels["cells"].shape == sec.rgb.shape[:2]


def test_wsi_tiled_equals_whole(tmp_path):
    """Through the batch helper: a slide file scored in tiles and in one piece."""
    tifffile = pytest.importorskip("tifffile")
    wsi = pytest.importorskip("biopsyquant.wsi")
    # default staining batch: the tissue detector is the slide-level step here and it
    # under-detects tissue on the strongly perturbed batch (reported to the tissue owner)
    sec = synthetic.generate_section(marker="CD163", seed=32, shape=(1024, 1024), mpp=MPP,
                                     cells_per_mm2=300.0, n_clusters=1)
    path = tmp_path / "cd163.tif"
    tifffile.imwrite(path, sec.rgb, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    settings = _settings_for_engine().replace({"tiling.overlap_um": 60.0})
    whole = wsi.score_slide(path, settings=settings, tiled=False)
    tiled = wsi.score_slide(path, settings=settings, tiled=True, tile_size=384)
    assert whole.summary["cells_positive"] > 50
    for k in ("cells_detected", "cells_positive", "cells_grade_1", "cells_grade_2",
              "cells_grade_3", "clusters_10plus"):
        assert tiled.summary[k] == whole.summary[k], (k, tiled.summary[k], whole.summary[k])
    assert tiled.summary["cells_per_mm2"] == pytest.approx(whole.summary["cells_per_mm2"],
                                                           rel=1e-6)
