"""``biopsyquant info``: text and JSON output, per-file errors, --mpp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from biopsyquant.cli import main

FIX = "wsi_format_fixtures"


def _section_image(h: int = 400, w: int = 400) -> np.ndarray:
    """Glass with a pink/blue 'tissue' disc and brown dots: something to estimate on."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float64)
    img[:] = (242, 240, 244)  # glass
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.35 * min(h, w)) ** 2
    rng = np.random.default_rng(0)
    # hematoxylin-ish tissue with varying density, plus DAB-ish spots
    od_h = np.where(disc, 0.25 + 0.15 * rng.random((h, w)), 0.0)
    od_d = np.where(disc & (rng.random((h, w)) < 0.2), 0.3 + 0.3 * rng.random((h, w)), 0.0)
    hv, dv = np.array([0.651, 0.701, 0.290]), np.array([0.269, 0.568, 0.778])
    od = od_h[..., None] * hv + od_d[..., None] * dv
    img = img * 10 ** (-od)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), disc


def test_info_text_on_fixtures_and_error_line(realdata, capsys):
    d = realdata / FIX
    rc = main(["info", str(d / "openslide_python_small.svs"),
               str(d / "openslide_python_unopenable.tiff"),
               str(d / "openslide_python_boxes.tiff")])
    out, err = capsys.readouterr()
    assert rc == 1  # one bad file
    # the bad file is named on stderr, the others are still reported
    assert "openslide_python_unopenable.tiff" in err and "compression" in err
    assert "Traceback" not in err
    assert "openslide_python_small.svs" in out and "format        svs" in out
    assert "0.499 µm/px (source: svs)" in out
    assert "objective     20x" in out
    assert "openslide_python_boxes.tiff" in out
    assert "3: 37 x 31 px" in out and "1: 150 x 125 px" in out
    assert "unknown (source: unknown)" in out and "72 dpi" in out
    # with unknown pixel size no tissue area is claimed
    boxes_part = out.split("openslide_python_boxes.tiff", 1)[1]
    assert "tissue        n/a" in boxes_part


def test_info_json_with_mpp_override(tmp_path, capsys):
    img, disc = _section_image()
    p = tmp_path / "section.tif"
    tifffile.imwrite(p, img, tile=(128, 128), compression="zlib", photometric="rgb",
                     resolution=(72, 72), resolutionunit="INCH")
    rc = main(["info", "--json", str(p)])
    out, _ = capsys.readouterr()
    assert rc == 0
    (d,) = json.loads(out)
    assert d["format"] == "tiff" and d["mpp"] is None and d["mpp_source"] == "unknown"
    assert "72 dpi" in d["mpp_warning"]
    assert d["tissue_area_mm2"] is None
    assert d["background"] == pytest.approx([242, 240, 244], abs=2)

    rc = main(["info", "--json", "--mpp", "2.0", str(p)])
    out, _ = capsys.readouterr()
    (d,) = json.loads(out)
    assert rc == 0 and d["mpp"] == 2.0 and d["mpp_source"] == "user"
    assert d["levels"] == [{"index": 0, "shape": [400, 400], "downsample": 1.0,
                            "tile_shape": [128, 128]}]
    assert d["dtype"] == "uint8" and d["samples_per_pixel"] == 3
    # the disc is 0.35*400 px in radius at 2 µm/px: pi*(280 µm)^2 = 0.2463 mm²
    true_area = disc.sum() * 2.0**2 / 1e6
    assert d["tissue_area_mm2"] == pytest.approx(true_area, rel=0.10)
    st = d["stains"]
    assert st["names"] == ["hematoxylin", "dab"]
    vec = np.asarray(st["vectors"])
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-3)
    # the image was made with the textbook vectors: estimates (or the preset) lie near them
    truth = np.array([[0.651, 0.701, 0.290], [0.269, 0.568, 0.778]])
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    angles = np.degrees(np.arccos(np.clip((vec * truth).sum(1), -1, 1)))
    assert (angles < 20).all(), angles


def test_info_json_reports_errors_per_file(tmp_path, capsys):
    import imagecodecs

    bad = tmp_path / "empty.svs"
    bad.write_bytes(b"")
    good = tmp_path / "ok.png"
    good.write_bytes(imagecodecs.png_encode(np.full((20, 30, 3), 200, np.uint8)))
    rc = main(["info", "--json", "--no-analysis", str(bad), str(good)])
    out, _ = capsys.readouterr()
    assert rc == 1
    res = json.loads(out)
    assert res[0]["path"] == str(bad) and "empty" in res[0]["error"]
    assert res[1]["format"] == "png" and res[1]["shape"] == [20, 30]
    assert "background" not in res[1]


def test_info_rejects_bad_mpp(tmp_path, capsys):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n")
    rc = main(["info", "--mpp", "-1", str(p)])
    _, err = capsys.readouterr()
    assert rc == 2 and "--mpp must be a positive" in err


def test_info_not_an_image(tmp_path, capsys):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    rc = main(["info", str(p)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert "notes.txt" in err and "not a TIFF, PNG or JPEG" in err


def test_info_reports_the_illumination_correction(tmp_path, capsys):
    """An unevenly lit field with glass around the tissue: info says it is corrected (as
    scoring will) and by how much; an even field is left alone."""
    from biopsyquant.synthetic import generate_section

    for ill, corrected in ((0.1, True), (0.0, False)):
        s = generate_section(marker="IL-1b", seed=11, shape=(768, 768), mpp=0.5,
                             illumination=ill)
        p = tmp_path / f"lit{ill}.tif"
        tifffile.imwrite(p, s.rgb, resolution=(20000, 20000), resolutionunit="CENTIMETER")
        assert main(["info", "--json", str(p)]) == 0
        (d,) = json.loads(capsys.readouterr()[0])
        assert d["illumination"]["corrected"] is corrected, d["illumination"]
        if corrected:
            assert 5 < d["illumination"]["max_correction_pct"] < 15
        else:
            assert d["illumination"]["reason"].startswith("flat")
