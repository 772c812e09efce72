"""Tests of the synthetic muscle-section generator: determinism and truth consistency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from biopsyquant.errors import InputError
from biopsyquant.stains import deconvolve
from biopsyquant.synthetic import (
    COMPARTMENTS,
    generate_section,
    write_sample,
)

SMALL = (512, 512)


@pytest.fixture(scope="module")
def cd163():
    return generate_section(marker="CD163", seed=3, shape=(768, 768), cells_per_mm2=300,
                            n_clusters=1)


@pytest.fixture(scope="module")
def mhc():
    return generate_section(marker="MHC-I", seed=5, shape=(768, 768),
                            positive_fiber_fraction=0.5)


def test_same_seed_same_bytes():
    a = generate_section(marker="CD163", seed=11, shape=SMALL, jpeg_quality=80)
    b = generate_section(marker="CD163", seed=11, shape=SMALL, jpeg_quality=80)
    assert a.rgb.tobytes() == b.rgb.tobytes()
    assert np.array_equal(a.fibers, b.fibers)
    assert a.cells.equals(b.cells)
    c = generate_section(marker="CD163", seed=12, shape=SMALL, jpeg_quality=80)
    assert not np.array_equal(a.fibers, c.fibers)


def test_batch_seed_changes_staining_not_tissue():
    a = generate_section(marker="MHC-I", seed=2, shape=SMALL)
    b = generate_section(marker="MHC-I", seed=2, shape=SMALL, batch_seed=99,
                         vector_jitter_deg=4.0, illumination=0.15)
    assert np.array_equal(a.fibers, b.fibers)
    assert np.array_equal(a.dab_od, b.dab_od)
    assert a.fiber_truth.equals(b.fiber_truth)
    assert np.abs(a.rgb.astype(int) - b.rgb.astype(int)).mean() > 1.0
    # the stain vectors really are rotated by the requested angle
    va, vb = a.stain_model.vectors[1], b.stain_model.vectors[1]
    ang = np.degrees(np.arccos(np.clip(np.dot(va, vb), -1, 1)))
    assert 3.0 < ang < 5.0


def test_compartments_agree_with_fibers_and_tissue(cd163):
    s = cd163
    assert s.fibers.dtype == np.int32 and s.compartments.dtype == np.uint8
    assert np.array_equal(s.fibers > 0, s.compartments == 1)
    assert np.array_equal(s.compartments == 0, ~s.tissue)
    n = int(s.fibers.max())
    assert n == len(s.fiber_truth) == s.summary["n_fibers"] > 20
    assert set(np.unique(s.fibers)) == set(range(n + 1))  # consecutive labels
    area = np.bincount(s.fibers.ravel(), minlength=n + 1)[1:] * s.mpp ** 2
    assert np.allclose(area, s.fiber_truth["area_um2"].to_numpy())
    assert set(np.unique(s.compartments)) <= set(COMPARTMENTS)
    # fibers never touch: no two different labels are 8-neighbours
    f = s.fibers
    for a, b in ((f[:-1], f[1:]), (f[:, :-1], f[:, 1:]), (f[:-1, :-1], f[1:, 1:]),
                 (f[:-1, 1:], f[1:, :-1])):
        assert not ((a > 0) & (b > 0) & (a != b)).any()
    assert s.summary["tissue_area_mm2"] == pytest.approx(s.tissue.sum() * 0.25 / 1e6)
    # there is glass around the tissue by default, and perimysium + vessels inside it
    assert 0.6 < s.tissue.mean() < 0.97
    assert (s.compartments == 3).any()


def test_fiber_sizes_realistic(cd163):
    ft = cd163.fiber_truth
    inner = ft[~ft["touches_image_edge"]]
    # adult fibers 35-75 µm nominal: median min Feret between 30 and 70 µm
    assert 30 < inner["min_feret_um"].median() < 70
    # min Feret of a convex fiber is below the diameter of a disk of the same area (a few
    # fibers are bitten by cells and capillaries, so not all are convex)
    eq = 2 * np.sqrt(inner["area_um2"] / np.pi)
    assert (inner["min_feret_um"] <= eq * 1.05 + 1).mean() > 0.9


def test_cells_inside_tissue_and_compartments(cd163):
    s = cd163
    c = s.cells
    ix = c["x_px"].astype(int).to_numpy()
    iy = c["y_px"].astype(int).to_numpy()
    assert s.tissue[iy, ix].all()
    codes = s.compartments[iy, ix]
    assert list(c["compartment"]) == [COMPARTMENTS[int(k)] for k in codes]
    mac = s.macrophages
    assert (mac["compartment"] != "fiber").all()
    assert np.allclose(c["x_um"], c["x_px"] * s.mpp)
    # myonuclei lie in fibers, interstitial nuclei outside them
    assert (c.loc[c["kind"] == "myonucleus", "compartment"] == "fiber").all()
    assert (c.loc[c["kind"] == "interstitial_nucleus", "compartment"] != "fiber").all()


def test_cell_density_matches_request(cd163):
    s = cd163
    expected = 300 * s.summary["tissue_area_mm2"]
    n = s.summary["n_positive_cells"]
    assert abs(n - expected) <= max(3, 0.1 * expected)
    assert s.summary["cells_per_mm2"] == pytest.approx(n / s.summary["tissue_area_mm2"])
    # grades follow the 0.2 / 0.4 / 0.6 OD rule on the true map
    pos = s.positive_cells
    assert (pos["dab_od_mean"] >= 0.2).all()
    g = (pos["dab_od_mean"] >= 0.2).astype(int) + (pos["dab_od_mean"] >= 0.4) + (
        pos["dab_od_mean"] >= 0.6)
    assert (g == pos["grade"]).all()
    # non-macrophage nuclei are never positive for CD163
    assert not s.cells.loc[~s.cells["kind"].isin(["macrophage"]), "positive"].any()
    # one cluster of >= 10 cells was requested
    assert s.summary["n_clusters"] == 1


def test_no_macrophages_when_density_zero():
    s = generate_section(marker="CD163", seed=4, shape=SMALL, cells_per_mm2=0)
    assert s.summary["n_positive_cells"] == 0
    # the non-specific background stays below the 1+ threshold on fibers
    assert s.summary["fiber_positive_area_pct"] < 0.5


def test_mhc_positive_fraction_and_capillaries(mhc):
    s = mhc
    assert s.summary["positive_fiber_pct"] == pytest.approx(50, abs=3)
    ft = s.fiber_truth
    assert (ft.loc[ft["positive"], "grade"] >= 1).all()
    assert ((ft["rim_od"] >= 0.2) | (ft["interior_od"] >= 0.2)).eq(ft["positive"]).all()
    caps = s.vessels[s.vessels["kind"] == "capillary"]
    assert len(caps) > 10 and caps["positive"].mean() > 0.9  # internal control, always positive
    ix, iy = caps["x_px"].astype(int), caps["y_px"].astype(int)
    assert (s.fibers[iy, ix] == 0).all()  # capillaries are never part of a fiber


def test_perifascicular_pattern():
    s = generate_section(marker="MHC-I", seed=8, shape=(1024, 1024), mpp=0.75,
                         positive_fiber_fraction=0.3, perifascicular_pattern=True)
    assert s.summary["positive_fiber_pct_perifascicular"] > 1.5 * s.summary[
        "positive_fiber_pct_other"]


def test_il1_expression_monotone_and_pixel_truth():
    vals = []
    for e in (0.1, 0.5, 0.9):
        s = generate_section(marker="IL-1a", seed=6, shape=SMALL, expression=e)
        vals.append(s.summary["positive_area_pct"])
        d = s.dab_od[s.tissue]
        assert s.summary["positive_area_pct"] == pytest.approx(100 * (d >= 0.2).mean())
        hs = 100 * (((d >= 0.2) & (d < 0.4)).mean() + 2 * ((d >= 0.4) & (d < 0.6)).mean()
                    + 3 * (d >= 0.6).mean())
        assert s.summary["h_score"] == pytest.approx(hs)
    assert vals[0] < vals[1] < vals[2]


def test_clean_render_deconvolves_to_truth():
    s = generate_section(marker="MHC-I", seed=1, shape=SMALL, noise=0, blur_um=0,
                         illumination=0, jpeg_quality=None, vector_jitter_deg=3)
    conc = deconvolve(s.rgb, s.stain_model)
    m = s.tissue & (s.hema_od < 1) & (s.dab_od < 1)
    err_h = np.abs(conc[..., 0] - s.hema_od)[m]
    err_d = np.abs(conc[..., 1] - s.dab_od)[m]
    assert np.median(err_d) < 0.01 and np.percentile(err_d, 99) < 0.05
    assert np.median(err_h) < 0.01 and np.percentile(err_h, 99) < 0.05


def test_jpeg_changes_pixels_slightly():
    a = generate_section(marker="CD163", seed=9, shape=SMALL)
    b = generate_section(marker="CD163", seed=9, shape=SMALL, jpeg_quality=80)
    diff = np.abs(a.rgb.astype(int) - b.rgb.astype(int))
    assert 0.2 < diff.mean() < 4.0
    assert np.array_equal(a.fibers, b.fibers)


def test_he_and_ki67():
    he = generate_section(marker="HE", seed=2, shape=SMALL)
    assert he.eosin_od is not None and he.eosin_od[he.fibers > 0].mean() > 0.25
    assert not he.dab_od.any()
    assert he.stain_model.names[1] == "eosin"
    ki = generate_section(marker="Ki67", seed=2, shape=SMALL, positive_nucleus_fraction=0.3)
    nuc = ki.cells[ki.cells["kind"].isin(["interstitial_nucleus", "myonucleus"])]
    assert 0.2 < nuc["positive"].mean() < 0.4


def test_full_tissue_and_holes():
    s = generate_section(marker="none", seed=3, shape=SMALL, tissue_coverage=1.0)
    assert s.tissue.all()
    h = generate_section(marker="none", seed=3, shape=(1024, 1024), tissue_coverage=1.0,
                         n_holes=1, fascicle_diameter_um=300)
    assert h.summary["n_holes"] == 1 and not h.tissue.all()


def test_tiny_tissue_without_fibers():
    s = generate_section(marker="Ki67", seed=3, shape=(300, 300), tissue_coverage=0.3)
    assert s.summary["n_fibers"] == 0 and len(s.fiber_truth) == 0
    assert not s.fibers.any() and s.tissue.any()
    assert np.isfinite(s.hema_od).all() and np.isfinite(s.dab_od).all()


def test_invalid_options_raise():
    with pytest.raises(InputError, match="unknown option"):
        generate_section(shape=SMALL, cells_per_mm3=3)
    with pytest.raises(InputError, match="marker"):
        generate_section(marker="CD68x", shape=SMALL)
    with pytest.raises(InputError, match="positive_fiber_fraction"):
        generate_section(marker="MHC-I", shape=SMALL, positive_fiber_fraction=1.5)
    with pytest.raises(InputError, match="mpp"):
        generate_section(shape=SMALL, mpp=0)
    with pytest.raises(InputError, match="4 px"):
        generate_section(shape=SMALL, mpp=3.5, fiber_diameter_um=(10, 20))


def test_write_sample_roundtrip(tmp_path):
    s = generate_section(marker="IL-1b", seed=1, shape=SMALL, mpp=0.4)
    files = write_sample(s, tmp_path, "x")
    with tifffile.TiffFile(files["image"]) as tf:
        page = tf.pages[0]
        xres = page.tags["XResolution"].value
        unit = page.tags["ResolutionUnit"].value
        img = page.asarray()
    assert int(unit) == 3  # centimetre
    assert 10000.0 / (xres[0] / xres[1]) == pytest.approx(0.4, rel=1e-6)
    assert img.shape == s.rgb.shape
    assert np.abs(img.astype(int) - s.rgb.astype(int)).mean() < 3
    lab = tifffile.imread(files["fibers"])
    assert np.array_equal(lab, s.fibers)
    assert np.array_equal(tifffile.imread(files["compartments"]), s.compartments)
    truth = json.loads(files["truth"].read_text())
    assert truth["summary"]["n_fibers"] == s.summary["n_fibers"]
    again = generate_section(**{k: v for k, v in truth["params"].items()})
    assert again.rgb.tobytes() == s.rgb.tobytes()


def test_shipped_sample_images_match_generator(repo_root):
    folder = repo_root / "sample_images"
    truth_file = folder / "P01_baseline_CD163.truth.json"
    if not truth_file.exists():
        pytest.skip("sample_images not generated yet")
    truth = json.loads(truth_file.read_text())
    s = generate_section(**truth["params"])
    assert s.summary["n_fibers"] == truth["summary"]["n_fibers"]
    assert s.summary["n_positive_cells"] == truth["summary"]["n_positive_cells"]
    lab = tifffile.imread(folder / "P01_baseline_CD163.fibers.tif")
    assert np.array_equal(lab, s.fibers)
    names = sorted(p.name for p in folder.glob("*.tif") if p.name.count(".") == 1)
    assert len(names) == 20 and "P02_month6_IL-1Ra.tif" in names
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 8e6


def test_write_sample_images_deterministic(tmp_path):
    from biopsyquant.synthetic import write_sample_images

    a = write_sample_images(tmp_path / "a", shape=(256, 256), markers=("CD163", "IL-1Ra"))
    b = write_sample_images(tmp_path / "b", shape=(256, 256), markers=("CD163", "IL-1Ra"))
    assert [p.name for p in a] == [p.name for p in b]
    assert {p.name for p in a} == {f"{pt}_{tp}_{m}.tif" for pt in ("P01", "P02")
                                   for tp in ("baseline", "month6") for m in ("CD163", "IL-1Ra")}
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    assert (tmp_path / "a" / "README.md").read_text().startswith("# Sample images (synthetic)")
    # the design has a known direction: P01's IL-1Ra rises from baseline to month 6
    t0 = json.loads((tmp_path / "a" / "P01_baseline_IL-1Ra.truth.json").read_text())
    t1 = json.loads((tmp_path / "a" / "P01_month6_IL-1Ra.truth.json").read_text())
    assert t1["summary"]["positive_area_pct"] > t0["summary"]["positive_area_pct"]
