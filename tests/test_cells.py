"""Unit tests of positive-cell detection, grading and the slide summary (biopsyquant.cells)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from biopsyquant.cells import (
    CELL_COLUMNS,
    CellParams,
    allred_proportion_score,
    detect_cells,
    find_clusters,
    grade_cells,
    jdm_level,
    summarize,
)
from biopsyquant.errors import InputError, SettingsError
from biopsyquant.settings import load_settings

CD163 = load_settings("CD163").cells
KI67 = load_settings("Ki67").cells


def _disk(shape, cy, cx, r, value):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, np.float32(value), np.float32(0))


def _scene(mpp=0.5, size_um=200.0):
    """OD maps with known cells (positions in µm).

    Returns hema, dab, positives [(x_um, y_um, grade)], negatives [(x_um, y_um)].
    """
    n = int(round(size_um / mpp))
    shape = (n, n)
    hema = np.full(shape, 0.03, np.float32)
    dab = np.full(shape, 0.02, np.float32)
    rng = np.random.default_rng(0)
    positives = []
    levels = {1: 0.32, 2: 0.6, 3: 0.95}
    spots = [(30, 30, 1), (90, 30, 2), (150, 30, 3), (30, 90, 3), (150, 150, 2), (90, 150, 1)]
    for x, y, g in spots:
        body = _disk(shape, y / mpp, x / mpp, 6.5 / mpp, levels[g])
        nuc = _disk(shape, y / mpp, (x + 1.5) / mpp, 2.8 / mpp, 0.45)
        dab = np.maximum(dab, body * np.where(nuc > 0, 0.6, 1.0))
        hema = np.maximum(hema, np.where(body > 0, 0.07, 0) + nuc)
        positives.append((x, y, g))
    negatives = [(60, 60), (120, 90), (40, 170), (175, 100)]
    for x, y in negatives:
        hema = np.maximum(hema, _disk(shape, y / mpp, x / mpp, 3.2 / mpp, 0.5))
    hema += rng.normal(0, 0.01, shape).astype(np.float32)
    dab += rng.normal(0, 0.01, shape).astype(np.float32)
    return hema, dab, positives, negatives


def _nearest(cells, x_um, y_um, mpp):
    d = np.hypot(cells["x_px"] * mpp - x_um, cells["y_px"] * mpp - y_um)
    i = int(np.argmin(d))
    return cells.iloc[i], float(d.iloc[i])


def test_cd163_scene_counts_and_grades():
    mpp = 0.5
    hema, dab, positives, negatives = _scene(mpp)
    cells, labels = detect_cells(hema, dab, mpp=mpp, params=CD163)
    assert list(cells.columns) == list(CELL_COLUMNS)
    assert labels.dtype == np.int32 and labels.shape == hema.shape
    assert set(np.unique(labels)) - {0} == set(cells["cell_id"])
    assert int(cells["positive"].sum()) == len(positives)
    for x, y, g in positives:
        row, d = _nearest(cells, x, y, mpp)
        assert d < 2.0, (x, y, d)
        assert row["positive"] and row["grade"] == g, (x, y, row["grade"], row["dab_mean_od"])
        assert 90 < row["area_um2"] < 180  # a 13 µm cell is ~133 µm²
    for x, y in negatives:  # DAB-negative nuclei: detected, negative
        row, d = _nearest(cells, x, y, mpp)
        assert d < 2.0 and not row["positive"] and row["grade"] == 0


def test_touching_cells_are_split():
    mpp = 0.5
    shape = (120, 160)
    hema = np.zeros(shape, np.float32)
    dab = np.zeros(shape, np.float32)
    centres = [(30.0, 30.0), (41.0, 30.0), (35.5, 40.0)]  # µm; 11-µm spacing, 13-µm cells
    for x, y in centres:
        dab = np.maximum(dab, _disk(shape, y / mpp, x / mpp, 6.5 / mpp, 0.6))
        hema = np.maximum(hema, _disk(shape, y / mpp, x / mpp, 2.5 / mpp, 0.45))
    cells, labels = detect_cells(hema, dab, mpp=mpp, params=CD163)
    pos = cells[cells["positive"]]
    assert len(pos) == 3
    got = np.sort(pos[["x_px", "y_px"]].to_numpy() * mpp, axis=0)
    want = np.sort(np.array(centres), axis=0)
    assert np.abs(got - want).max() < 2.5


def test_unstained_nucleus_hole_does_not_split_a_cell():
    """A ring of membranous DAB around a DAB-free nucleus is one cell."""
    mpp = 0.5
    shape = (80, 80)
    ring = _disk(shape, 40, 40, 16, 0.7) - _disk(shape, 40, 40, 7, 0.7)
    hema = _disk(shape, 40, 40, 7, 0.5)
    cells, _ = detect_cells(hema, ring, mpp=mpp, params=CD163)
    assert int(cells["positive"].sum()) == 1


def test_faint_nonspecific_dab_is_not_a_cell():
    mpp = 0.5
    shape = (300, 300)
    yy, xx = np.mgrid[:300, :300]
    # broad faint blotch (mean DAB ~0.22 at the centre, 60 µm wide) + one real 1+ cell
    dab = (0.24 * np.exp(-((yy - 150) ** 2 + (xx - 100) ** 2) / (2 * 30.0 ** 2))).astype(
        np.float32)
    dab += _disk(shape, 150, 230, 13, 0.32)
    hema = np.full(shape, 0.05, np.float32) + _disk(shape, 150, 230, 5, 0.4)
    cells, _ = detect_cells(hema, dab, mpp=mpp, params=CD163)
    pos = cells[cells["positive"]]
    assert len(pos) == 1
    assert abs(pos["x_px"].iloc[0] - 230) < 3
    # without the contrast rule the blotch centre would pass the 1+ threshold
    loose = dataclasses.replace(CD163, min_dab_contrast_od=0.0)
    cells2, _ = detect_cells(hema, dab, mpp=mpp, params=loose)
    assert cells2["positive"].sum() >= len(pos)


def test_pixel_size_invariance():
    """The same scene at two resolutions gives the same cells (sizes are in µm)."""
    out = []
    for mpp in (0.5, 0.25):
        hema, dab, positives, _ = _scene(mpp)
        cells, _ = detect_cells(hema, dab, mpp=mpp, params=CD163)
        out.append(cells)
    a, b = out
    assert a["positive"].sum() == b["positive"].sum() == 6
    assert sorted(a.loc[a.positive, "grade"]) == sorted(b.loc[b.positive, "grade"])
    assert a.loc[a.positive, "area_um2"].sum() == pytest.approx(
        b.loc[b.positive, "area_um2"].sum(), rel=0.1)


def test_mask_limits_detection():
    mpp = 0.5
    hema, dab, positives, _ = _scene(mpp)
    mask = np.zeros(hema.shape, bool)
    mask[:, : hema.shape[1] // 2] = True  # left half: cells at x = 30, 90 (2 + 1 spots)
    cells, labels = detect_cells(hema, dab, mpp=mpp, params=CD163, mask=mask)
    assert not labels[~mask].any()
    want = sum(1 for x, _, _ in positives if x < 100)
    assert int(cells["positive"].sum()) == want


def test_nuclear_preset_grades_nuclear_dab():
    mpp = 0.3
    shape = (300, 300)
    hema = np.full(shape, 0.02, np.float32)
    dab = np.full(shape, 0.02, np.float32)
    spec = [(50, 50, 0.0), (150, 50, 0.3), (250, 50, 0.5), (50, 200, 0.9), (200, 200, 0.0)]
    for x, y, d in spec:
        nuc = _disk(shape, y, x, 14, 1.0)
        hema = np.maximum(hema, nuc * (0.5 if d == 0 else 0.15))
        dab = np.maximum(dab, nuc * d)
    cells, _ = detect_cells(hema, dab, mpp=mpp, params=KI67)
    assert len(cells) == len(spec)
    got = []
    for x, y, d in spec:
        row, dist = _nearest(cells, x * mpp, y * mpp, mpp)
        assert dist < 1.5
        assert bool(row["positive"]) == (d > 0)
        # the object includes the smoothed rim, so its mean is below the nucleus' own OD
        assert 0.5 * d <= row["nucleus_dab_mean_od"] <= d + 0.03
        m = row["dab_mean_od"]
        assert row["grade"] == (0 if m < 0.2 else 1 if m < 0.4 else 2 if m < 0.6 else 3)
        got.append((d, row["grade"]))
    assert [g for _, g in sorted(got)] == sorted(g for _, g in got)  # monotone in DAB


def test_empty_and_blank_images():
    z = np.zeros((64, 64), np.float32)
    cells, labels = detect_cells(z, z, mpp=0.5, params=CD163)
    assert len(cells) == 0 and list(cells.columns) == list(CELL_COLUMNS)
    assert not labels.any()


def test_input_errors():
    z = np.zeros((32, 32), np.float32)
    with pytest.raises(InputError, match="hema_od"):
        detect_cells(z, np.zeros((32, 31), np.float32), mpp=0.5)
    with pytest.raises(InputError, match="mpp"):
        detect_cells(z, z, mpp=None)
    with pytest.raises(InputError, match="2-D"):
        detect_cells(np.zeros((4, 4, 3), np.float32), z, mpp=0.5)
    with pytest.raises(InputError, match="mask"):
        detect_cells(z, z, mpp=0.5, mask=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="compartment"):
        CellParams(compartment="membrane")
    with pytest.raises(ValueError, match="thresholds"):
        CellParams(dab_threshold_1_od=0.5, dab_threshold_2_od=0.4)
    with pytest.raises(SettingsError, match="cells"):
        load_settings("CD163", overrides={"cells.detection_channel": "eosin"})
    s = load_settings("CD163", overrides=["cells.dab_threshold_1_od=0.25"])
    assert s.cells.dab_threshold_1_od == 0.25


def test_grade_rules():
    p = CellParams(dab_threshold_1_od=0.2, dab_threshold_2_od=0.4, dab_threshold_3_od=0.6)
    g, pos = grade_cells(np.array([0.1, 0.2, 0.39, 0.4, 0.6, 2.0]), np.zeros(6), p)
    assert g.tolist() == [0, 1, 1, 2, 3, 3] and pos.tolist() == [False] + [True] * 5
    pf = dataclasses.replace(p, positivity="fraction", min_dab_fraction=0.3)
    g, pos = grade_cells(np.array([0.1, 0.1, 0.5]), np.array([0.35, 0.1, 0.2]), pf)
    assert pos.tolist() == [True, False, False] and g.tolist() == [1, 0, 0]
    g, pos = grade_cells(np.array([0.3, 0.3]), np.zeros(2), p, contrast=np.array([0.3, 0.01]))
    assert pos.tolist() == [True, True]  # contrast rule off by default
    pc = dataclasses.replace(p, min_dab_contrast_od=0.1)
    g, pos = grade_cells(np.array([0.3, 0.3]), np.zeros(2), pc, contrast=np.array([0.3, 0.01]))
    assert pos.tolist() == [True, False]


def test_find_clusters():
    rng = np.random.default_rng(1)
    clump = rng.normal(0, 8, (12, 2)) + (100, 100)       # 12 cells within ~25 µm
    small = rng.normal(0, 5, (5, 2)) + (400, 400)        # 5 cells: not a cluster
    scattered = np.array([[700.0, 100.0], [100.0, 700.0], [700.0, 700.0]])
    xy = np.vstack([clump, small, scattered])
    ids = find_clusters(xy, distance_um=25, min_cells=10)
    assert (ids[:12] == 1).all() and (ids[12:] == 0).all()
    assert find_clusters(np.zeros((0, 2)), distance_um=25, min_cells=10).shape == (0,)


def test_allred_and_jdm():
    assert [allred_proportion_score(p) for p in (0, 0.5, 5, 20, 50, 90)] == [0, 1, 2, 3, 4, 5]
    assert jdm_level(per_hpf=1, n_clusters=0, diffuse_per_hpf=25, level1_per_hpf=4) == 0
    assert jdm_level(per_hpf=5, n_clusters=0, diffuse_per_hpf=25, level1_per_hpf=4) == 1
    assert jdm_level(per_hpf=5, n_clusters=1, diffuse_per_hpf=25, level1_per_hpf=4) == 2
    assert jdm_level(per_hpf=5, n_clusters=3, diffuse_per_hpf=25, level1_per_hpf=4) == 3
    assert jdm_level(per_hpf=30, n_clusters=0, diffuse_per_hpf=25, level1_per_hpf=4) == 4
    assert np.isnan(jdm_level(per_hpf=float("nan"), n_clusters=0, diffuse_per_hpf=25,
                              level1_per_hpf=4))


def _table(mpp):
    """20 cells: 12 clustered positives (endomysium), 2 perimysial, 1 perivascular, 5 negative."""
    rng = np.random.default_rng(3)
    xy = np.vstack([rng.normal(0, 6, (12, 2)) / mpp + 200,
                    [[1000, 200], [1200, 200], [200, 1000]],
                    [[600, 600], [700, 600], [800, 600], [900, 600], [1000, 600]]])
    grade = np.array([1] * 6 + [2] * 4 + [3] * 2 + [1, 2, 3] + [0] * 5)
    comp = ["endomysium"] * 12 + ["perimysium", "perimysium", "perivascular"] + ["fiber"] * 5
    return pd.DataFrame({"x_px": xy[:, 0], "y_px": xy[:, 1], "grade": grade,
                         "positive": grade > 0, "compartment": comp})


def test_summarize_numbers():
    settings = load_settings("CD163")
    mpp = 0.5
    cells = _table(mpp)
    fibers = pd.DataFrame({"fiber_id": np.arange(1, 51)})
    areas = {"analysed_area_mm2": 2.0, "area_mm2_endomysium": 0.4, "area_mm2_perimysium": 0.2,
             "area_mm2_vessel": 0.05, "area_mm2_perivascular": 0.05}
    s = summarize(cells=cells, fibers=fibers, counts={}, mpp=mpp, settings=settings,
                  areas_mm2=areas)
    assert s["cells_detected"] == 20 and s["cells_positive"] == 15 and s["cells_negative"] == 5
    assert s["positive_pct"] == pytest.approx(75.0)
    assert (s["cells_grade_1"], s["cells_grade_2"], s["cells_grade_3"]) == (7, 5, 3)
    assert s["h_score_cells"] == pytest.approx(100 * (7 + 10 + 9) / 20)
    assert s["cells_per_mm2"] == pytest.approx(7.5)
    assert s["cells_per_100_fibers"] == pytest.approx(30.0)
    assert (s["cells_endomysial"], s["cells_perimysial"], s["cells_perivascular"]) == (12, 2, 1)
    assert s["cells_per_mm2_endomysial"] == pytest.approx(30.0)
    assert s["cells_per_mm2_perimysial"] == pytest.approx(10.0)
    assert s["cells_per_mm2_perivascular"] == pytest.approx(10.0)
    assert s["clusters_10plus"] == 1 and s["cells_in_clusters"] == 12
    assert (cells["cluster_id"].to_numpy()[:12] == 1).all()
    assert s["allred_proportion"] == 5 and s["allred_intensity"] == 2 and s["allred_score"] == 7
    assert s["cells_per_hpf"] == pytest.approx(7.5 * 0.237)
    assert s["jdm_level"] == 2
    assert cells["x_um"].to_numpy() == pytest.approx(cells["x_px"].to_numpy() * mpp)


def test_summarize_without_pixel_size_and_empty():
    settings = load_settings("CD163")
    cells = _table(0.5)
    s = summarize(cells=cells, fibers=pd.DataFrame(), counts={}, mpp=None, settings=settings,
                  areas_mm2={"analysed_area_mm2": float("nan")})
    for k in ("cells_per_mm2", "cells_per_mm2_endomysial", "cells_per_mm2_perimysial",
              "cells_per_mm2_perivascular", "cells_per_hpf", "jdm_level",
              "cells_per_100_fibers"):
        assert np.isnan(s[k]), k
    assert s["cells_positive"] == 15 and s["clusters_10plus"] == 1  # assumed 0.5 µm/px
    assert cells["x_um"].isna().all()
    empty = pd.DataFrame(columns=["x_px", "y_px", "grade", "positive", "compartment"])
    s = summarize(cells=empty, fibers=pd.DataFrame(), counts={}, mpp=0.5, settings=settings,
                  areas_mm2={"analysed_area_mm2": 1.0})
    assert s["cells_detected"] == 0 and s["cells_per_mm2"] == 0.0
    assert np.isnan(s["positive_pct"]) and np.isnan(s["h_score_cells"])
    assert s["allred_score"] == 0 and s["jdm_level"] == 0 and s["clusters_10plus"] == 0
    assert "cluster_id" in empty.columns


# ----------------------------------------------------------------------------------------------
# sparse evaluation (the detection chain only on rectangles around the foreground) must give
# exactly the cells of the chain run over the whole image


def _generated_od(marker, seed, shape, **opts):
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    from biopsyquant.score import prepare_stain_model
    from biopsyquant.stains import deconvolve

    sec = synthetic.generate_section(marker=marker, seed=seed, shape=shape, mpp=0.5,
                                     vector_jitter_deg=5.0, jpeg_quality=85, **opts)
    model = prepare_stain_model(sec.rgb, load_settings(marker), tissue=sec.tissue)
    od = deconvolve(sec.rgb, model)
    return (np.ascontiguousarray(od[..., model.index("hematoxylin")]),
            np.ascontiguousarray(od[..., model.index("dab")]), sec.tissue)


def _same_cells(a, b, la, lb):
    assert len(a) == len(b) and len(a) > 0
    ka = a.sort_values(["y_px", "x_px"]).reset_index(drop=True)
    kb = b.sort_values(["y_px", "x_px"]).reset_index(drop=True)
    for col in CELL_COLUMNS:
        if col == "cell_id":
            continue
        np.testing.assert_array_equal(ka[col].to_numpy(), kb[col].to_numpy(), err_msg=col)
    # the same pixels carry the same objects (labels may be numbered differently)
    np.testing.assert_array_equal(la > 0, lb > 0)
    pairs = np.unique(np.stack([la[la > 0], lb[lb > 0]]), axis=1)
    assert pairs.shape[1] == len(a) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))


@pytest.mark.parametrize(("marker", "opts", "origin", "mpp"), [
    ("CD163", dict(cells_per_mm2=400.0, n_clusters=1), (0, 0), 0.5),
    ("CD163", dict(cells_per_mm2=150.0), (37, 1029), 0.5),  # background grid elsewhere
    # read as 2 µm/px: 1-px smoothing, stained cells inside filled nucleus holes
    ("CD163", dict(cells_per_mm2=300.0), (11, 7), 2.0),
    ("Ki67", {}, (5, 3), 0.5),
])
def test_sparse_detection_equals_whole_image(marker, opts, origin, mpp):
    hema, dab, tissue = _generated_od(marker, 21, (640, 704), **opts)
    params = load_settings(marker).cells
    a, la = detect_cells(hema, dab, mpp=mpp, params=params, mask=tissue, origin=origin)
    b, lb = detect_cells(hema, dab, mpp=mpp, params=params, mask=tissue, origin=origin,
                         sparse=False)
    _same_cells(a, b, la, lb)
    if marker == "CD163" and mpp == 0.5:
        assert a["positive"].sum() > 5 and (~a["positive"]).sum() > 20
    # cells touching the image border are found as on the whole image
    h, w = hema.shape
    near = (a["x_px"] < 15) | (a["y_px"] < 15) | (a["x_px"] > w - 16) | (a["y_px"] > h - 16)
    assert near.any()


def test_sparse_detection_without_mask_and_without_cells():
    hema, dab, _ = _generated_od("CD163", 22, (384, 384), cells_per_mm2=300.0)
    a, la = detect_cells(hema, dab, mpp=0.5, params=CD163)
    b, lb = detect_cells(hema, dab, mpp=0.5, params=CD163, sparse=False)
    _same_cells(a, b, la, lb)
    z = np.zeros((200, 300), np.float32)
    cells, labels = detect_cells(z, z, mpp=0.5, params=CD163)
    assert len(cells) == 0 and labels.shape == (200, 300) and not labels.any()


def test_background_subtract_matches_opencv_reference():
    """The numba block-mean / bilinear background equals the OpenCV resize formulation."""
    import cv2

    from biopsyquant import _cells_detect as _d

    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng.random((301, 457), dtype=np.float32), (0, 0), 3.0)
    img += np.linspace(0, 0.5, 457, dtype=np.float32)[None, :]
    for origin in ((0, 0), (3, 5), (1000, 13)):
        got = _d.background_subtract(img, 30.0, origin)
        h, w = img.shape
        f = 7
        px0, py0 = origin[0] % f, origin[1] % f
        pad = cv2.copyMakeBorder(img, py0, (-(h + py0)) % f, px0, (-(w + px0)) % f,
                                 cv2.BORDER_REFLECT)
        ph, pw = pad.shape
        small = cv2.resize(pad, (pw // f, ph // f), interpolation=cv2.INTER_AREA)
        bg = cv2.morphologyEx(small, cv2.MORPH_OPEN, np.ones((9, 9), np.uint8),
                              borderType=cv2.BORDER_REFLECT)
        bg = cv2.resize(bg, (pw, ph), interpolation=cv2.INTER_LINEAR)[py0:py0 + h, px0:px0 + w]
        ref = np.maximum(img - bg, 0)
        np.testing.assert_allclose(got, ref, atol=2e-6)
        assert (got > 0.01).mean() > 0.05  # not trivially zero


def test_nearest_label_matches_the_whole_image_labelled_transform():
    """The ring search gives the label and the distance cut-off of OpenCV's whole-image
    labelled chamfer transform at every pixel, including exact ties between labels (resolved
    by the transform's scan order) and pixels at the cut-off distance."""
    from biopsyquant import _cells_detect as _d

    rng = np.random.default_rng(7)
    ties = 0
    for trial in range(120):
        h, w = (int(v) for v in rng.integers(5, 70, 2))
        lab = np.zeros((h, w), np.int32)
        if trial % 2:  # symmetric single pixels: many exact ties
            y = int(rng.integers(0, h))
            lab[y, 0], lab[y, w - 1], lab[0, w // 2], lab[h - 1, w // 2] = 1, 2, 3, 4
        else:
            for _ in range(int(rng.integers(1, 12))):
                y, x = (int(v) for v in rng.integers(0, (h, w)))
                lab[y:y + int(rng.integers(1, 6)), x:x + int(rng.integers(1, 6))] = \
                    int(rng.integers(1, 9))
        rr, cc = (a.ravel() for a in np.mgrid[0:h, 0:w])
        for max_d in (2.0, 3.0, 10.5, 1e9):
            ref = _d._nearest_label_transform(lab, rr, cc, max_d)
            got = _d.nearest_label_at(lab, rr, cc, max_d)
            np.testing.assert_array_equal(got, ref)
        if trial % 2:
            k = max(h, w)
            _, _, amb = _d._nearest_label_search(lab, rr, cc, _d._chamfer_table(k), k)
            ties += int(amb.sum())
    assert ties > 100  # the window fallback was exercised
    # fiber-like labels at a cell-detection distance, and a far search (whole-image path)
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    sec = synthetic.generate_section(marker="CD163", seed=4, shape=(384, 384), mpp=0.5)
    fib = np.ascontiguousarray(sec.fibers, np.int32)
    assert fib.max() > 5
    rr, cc = (a.ravel() for a in np.mgrid[0:384:3, 0:384:3])
    for max_d in (40.0, 66.67, 400.0):
        np.testing.assert_array_equal(_d.nearest_label_at(fib, rr, cc, max_d),
                                      _d._nearest_label_transform(fib, rr, cc, max_d))


def test_nearest_label_with_many_ties_uses_the_whole_image_transform(monkeypatch):
    from biopsyquant import _cells_detect as _d

    lab = np.zeros((60, 61), np.int32)
    lab[:, 0], lab[:, -1] = 1, 2  # every pixel of the middle column is a tie
    rr, cc = (a.ravel() for a in np.mgrid[0:60, 0:61])
    ref = _d._nearest_label_transform(lab, rr, cc, 40.0)
    np.testing.assert_array_equal(_d.nearest_label_at(lab, rr, cc, 40.0), ref)
    monkeypatch.setattr(_d, "_MAX_WINDOWS", 10)
    np.testing.assert_array_equal(_d.nearest_label_at(lab, rr, cc, 40.0), ref)
