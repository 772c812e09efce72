"""Tests of biopsyquant.slide: formats, pyramids, pixel size, conversions and every bad input."""

from __future__ import annotations

import pickle
import struct
import warnings

import imagecodecs
import numpy as np
import pytest
import tifffile

from biopsyquant.errors import InputError, SlideError
from biopsyquant.slide import Level, PixelSizeWarning, open_slide

FIX = "wsi_format_fixtures"


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour image (JPEG-friendly) with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [128 + 100 * np.sin(xx / 17.0), 128 + 100 * np.cos(yy / 23.0), (xx + yy) % 256], axis=-1
    )
    img = img + rng.normal(0, 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _open_quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PixelSizeWarning)
        return open_slide(path, **kw)


# ------------------------------------------------------------------------------------------
# real fixtures


def test_svs_fixture_mpp_and_appmag(realdata):
    with open_slide(realdata / FIX / "openslide_python_small.svs") as s:
        assert s.format == "svs"
        assert s.mpp == pytest.approx(0.499, abs=1e-9)
        assert s.mpp_source == "svs"
        assert s.mpp_warning is None
        assert s.metadata["AppMag"] == 20
        assert s.objective_power == 20
        # the thumbnail page is not a level
        assert [lv.shape for lv in s.levels] == [(16, 16)]
        rgb = s.read_region(0, 0, 16, 16)
        assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
        # real H&E pixels: not blank, not a constant fill
        assert rgb.std() > 5 and 40 < rgb.mean() < 250
        d = s.info_dict()
        assert d["mpp"] == pytest.approx(0.499) and d["format"] == "svs"


def test_boxes_pyramid_levels_and_level0_equals_png(realdata):
    with pytest.warns(PixelSizeWarning, match="72 dpi"):
        s = open_slide(realdata / FIX / "openslide_python_boxes.tiff")
    with s:
        assert s.format == "tiff"
        assert [lv.shape for lv in s.levels] == [(250, 300), (125, 150), (62, 75), (31, 37)]
        assert s.shape == (250, 300)
        assert [round(lv.downsample, 3) for lv in s.levels] == pytest.approx(
            [1.0, 2.0, 0.5 * (250 / 62 + 300 / 75), 0.5 * (250 / 31 + 300 / 37)], abs=1e-3
        )
        assert all(lv.tile_shape == (64, 64) for lv in s.levels)
        # 28.35 px/cm = 72 dpi: a screen default, not believed
        assert s.mpp is None and s.mpp_source == "unknown"
        assert "72 dpi" in s.mpp_warning
        png = imagecodecs.png_decode((realdata / FIX / "openslide_python_boxes.png").read_bytes())
        lvl0 = s.read_level(0)
        np.testing.assert_array_equal(lvl0, png[..., :3])
        # a region through the zarr path equals the same crop of the whole level
        np.testing.assert_array_equal(s.read_region(70, 30, 50, 40), png[30:70, 70:120, :3])
        # each level is a downsampled rendering of the same boxes: colours agree coarsely
        small = s.read_level(3)
        ref = png[::8, ::8, :3][: small.shape[0], : small.shape[1]].astype(int)
        assert np.mean(np.abs(small.astype(int) - ref)) < 40
        # thumbnail uses the smallest adequate level, not level 0
        thumb, ds = s.thumbnail(max_size=70)
        assert max(thumb.shape[:2]) <= 70
        assert ds == pytest.approx(0.5 * (250 / thumb.shape[0] + 300 / thumb.shape[1]))
        assert s.best_level_for_downsample(1.0) == 0
        assert s.best_level_for_downsample(3.0) == 1
        assert s.best_level_for_downsample(100) == 3


def test_unopenable_fixture_is_a_slide_error(realdata):
    path = realdata / FIX / "openslide_python_unopenable.tiff"
    with pytest.raises(SlideError) as ei:
        open_slide(path)
    assert str(path) in str(ei.value)
    assert "compression" in ei.value.problem and "52479" in ei.value.problem


def test_png_fixture(realdata):
    s = _open_quiet(realdata / FIX / "openslide_python_boxes.png", mpp=0.5)
    with s:
        assert s.format == "png" and s.mpp == 0.5 and s.mpp_source == "user"
        assert len(s.levels) == 1 and s.shape == (250, 300)


# ------------------------------------------------------------------------------------------
# written TIFF variants


def _write_pyramid(path, img, *, compression="jpeg", subifds=True, bigtiff=False, **kw):
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        n = 2
        opts = dict(tile=(64, 64), compression=compression, photometric="rgb")
        if subifds:
            tw.write(img, subifds=n, **opts, **kw)
        else:
            tw.write(img, **opts, **kw)
        for k in range(1, n + 1):
            tw.write(img[:: 2**k, :: 2**k], subfiletype=1, **opts)


@pytest.mark.parametrize("subifds", [True, False])
def test_tiled_jpeg_pyramid(tmp_path, subifds):
    img = _rgb(300, 260)
    p = tmp_path / "pyr.tif"
    _write_pyramid(p, img, subifds=subifds, resolution=(1e4 / 0.25, 1e4 / 0.25),
                   resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.format == "tiff"
        assert [lv.shape for lv in s.levels] == [(300, 260), (150, 130), (75, 65)]
        assert [lv.downsample for lv in s.levels] == pytest.approx([1, 2, 4])
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "tiff-resolution"
        assert s.mpp_at(2) == pytest.approx(1.0)
        region = s.read_region(10, 20, 100, 90)
        # JPEG is lossy: mean absolute error of a smooth image stays small
        assert np.abs(region.astype(int) - img[20:110, 10:110]).mean() < 3
        lvl1 = s.read_region(0, 0, 130, 150, level=1)
        assert np.abs(lvl1.astype(int) - img[::2, ::2]).mean() < 3
        # fast whole-page path and tile path agree exactly
        np.testing.assert_array_equal(s.read_level(1)[5:50, 7:60], s.read_region(7, 5, 53, 45, level=1))
        # the lazy level is the same pixels
        la = s.level_array(1)
        assert la.shape == (150, 130, 3) and la.dtype == np.uint8
        np.testing.assert_array_equal(la[5:50, 7:60], s.read_region(7, 5, 53, 45, level=1))
        np.testing.assert_array_equal(la[::-3, 4], s.read_level(1)[::-3, 4])
        assert la.native is not None and la.native.shape[-1] == 3
        thumb, ds = s.thumbnail(max_size=80)
        assert max(thumb.shape[:2]) <= 80 and ds == pytest.approx(300 / thumb.shape[0], rel=0.02)


def test_region_edges_are_white(tmp_path):
    img = _rgb(100, 120)
    p = tmp_path / "a.tif"
    tifffile.imwrite(p, img, tile=(32, 32), compression="zlib", photometric="rgb")
    with _open_quiet(p) as s:
        r = s.read_region(-10, 90, 40, 30)
        assert r.shape == (30, 40, 3)
        np.testing.assert_array_equal(r[:10, 10:], img[90:100, 0:30])
        assert (r[:, :10] == 255).all() and (r[10:] == 255).all()
        outside = s.read_region(500, 500, 8, 8)
        assert (outside == 255).all()
        with pytest.raises(InputError, match="positive"):
            s.read_region(0, 0, 0, 5)
        with pytest.raises(InputError, match="integer"):
            s.read_region(0.5, 0, 5, 5)
        with pytest.raises(InputError, match="level 3 does not exist"):
            s.read_region(0, 0, 5, 5, level=3)


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd", "jpeg2000", None])
def test_lossless_compressions_roundtrip(tmp_path, compression):
    img = _rgb(70, 90, seed=3)
    p = tmp_path / "c.tif"
    kw = {"compressionargs": {"level": 0}} if compression == "jpeg2000" else {}
    tifffile.imwrite(p, img, tile=(32, 32), compression=compression, photometric="rgb", **kw)
    with _open_quiet(p) as s:
        out = s.read_level(0)
    if compression == "jpeg2000":
        assert np.abs(out.astype(int) - img).mean() < 2
    else:
        np.testing.assert_array_equal(out, img)


def test_bigtiff(tmp_path):
    img = _rgb(80, 64)
    p = tmp_path / "big.tif"
    _write_pyramid(p, img, compression="zlib", bigtiff=True)
    with _open_quiet(p) as s:
        assert s.format == "bigtiff" and s.metadata["bigtiff"] is True
        np.testing.assert_array_equal(s.read_level(0), img)
        np.testing.assert_array_equal(s.read_level(2), img[::4, ::4])


def test_ome_tiff_physical_size_units(tmp_path):
    img = _rgb(128, 96)
    p = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        tw.write(img, tile=(64, 64), compression="zlib", subifds=1, photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": 455.0, "PhysicalSizeXUnit": "nm",
                           "PhysicalSizeY": 455.0, "PhysicalSizeYUnit": "nm"})
        tw.write(img[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1,
                 photometric="rgb")
    with open_slide(p) as s:
        assert s.format == "ome-tiff"
        assert s.mpp == pytest.approx(0.455) and s.mpp_source == "ome"
        assert [lv.shape for lv in s.levels] == [(128, 96), (64, 48)]
        np.testing.assert_array_equal(s.read_level(1), img[::2, ::2])


def test_ome_channel_planar_rgb(tmp_path):
    img = _rgb(40, 50)
    p = tmp_path / "cyx.ome.tif"
    tifffile.imwrite(p, np.moveaxis(img, -1, 0),
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_level(0), img)


@pytest.mark.parametrize(
    ("res", "unit", "expected_mpp"),
    [
        ((1e4 / 0.5, 1e4 / 0.5), "CENTIMETER", 0.5),  # 20000 px/cm -> 0.5 µm
        ((25400 / 0.25, 25400 / 0.25), "INCH", 0.25),  # 101600 dpi -> 0.25 µm
        ((72, 72), "INCH", None),  # screen default
        ((96, 96), "INCH", None),
        ((300, 300), "INCH", None),
        ((1e4 / 20, 1e4 / 20), "CENTIMETER", None),  # 20 µm/px: implausible
        ((1e4 / 0.01, 1e4 / 0.01), "CENTIMETER", None),  # 0.01 µm/px: implausible
        ((5, 5), "NONE", None),  # no unit
    ],
)
def test_resolution_units(tmp_path, res, unit, expected_mpp):
    p = tmp_path / "r.tif"
    tifffile.imwrite(p, _rgb(16, 16), photometric="rgb", resolution=res, resolutionunit=unit)
    if expected_mpp is None:
        with pytest.warns(PixelSizeWarning) as rec:
            s = open_slide(p)
        assert "unknown" in str(rec[0].message)
        assert s.mpp is None and s.mpp_source == "unknown" and s.mpp_warning
        assert str(p) in str(rec[0].message)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PixelSizeWarning)
            s = open_slide(p)
        assert s.mpp == pytest.approx(expected_mpp) and s.mpp_source == "tiff-resolution"
        assert s.mpp_warning is None
    s.close()


def test_anisotropic_pixels_use_geometric_mean(tmp_path):
    p = tmp_path / "aniso.tif"
    tifffile.imwrite(p, _rgb(8, 8), photometric="rgb", resolution=(1e4 / 0.4, 1e4 / 0.9),
                     resolutionunit="CENTIMETER")
    with pytest.warns(PixelSizeWarning, match="not square"):
        s = open_slide(p)
    assert s.mpp == pytest.approx(0.6) and s.mpp_source == "tiff-resolution"
    s.close()


def test_user_mpp_overrides_and_is_validated(tmp_path, realdata):
    svs = realdata / FIX / "openslide_python_small.svs"
    with open_slide(svs, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "user" and s.mpp_warning is None
    for bad in (0, -1, float("nan"), float("inf"), "abc", True):
        with pytest.raises(InputError, match="mpp"):
            open_slide(svs, mpp=bad)
    # an implausible user value is used, with a warning
    with pytest.warns(PixelSizeWarning, match="outside"):
        s = open_slide(svs, mpp=12.0)
    assert s.mpp == 12.0 and s.mpp_source == "user"
    s.close()


# ------------------------------------------------------------------------------------------
# conversions


def test_uint16_shift_by_8_and_maxsamplevalue(tmp_path):
    g = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    p = tmp_path / "g16.tif"
    tifffile.imwrite(p, g, tile=(32, 32))
    with _open_quiet(p) as s:
        assert s.dtype == "uint16" and ">> 8" in s.conversion
        out = s.read_level(0)
    np.testing.assert_array_equal(out[..., 0], (g >> 8).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # a 12-bit image that declares MaxSampleValue=4095 is shifted by 4
    g12 = (np.arange(40 * 40).reshape(40, 40) % 4096).astype(np.uint16)
    p12 = tmp_path / "g12.tif"
    tifffile.imwrite(p12, g12, extratags=[(281, "H", 1, 4095, True)])
    with _open_quiet(p12) as s:
        assert ">> 4" in s.conversion
        np.testing.assert_array_equal(s.read_level(0)[..., 1], (g12 >> 4).astype(np.uint8))


def test_rgb16(tmp_path):
    img = _rgb(30, 20).astype(np.uint16) * 257
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(p, img, photometric="rgb")
    with _open_quiet(p) as s:
        np.testing.assert_array_equal(s.read_level(0), (img >> 8).astype(np.uint8))


def test_float_in_unit_range_and_refused_outside(tmp_path):
    f = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, f)
    with _open_quiet(p) as s:
        out = s.read_level(0)
        assert "x255" in s.conversion
    np.testing.assert_array_equal(out[..., 0], np.rint(f * 255).astype(np.uint8))
    bad = tmp_path / "fbad.tif"
    tifffile.imwrite(bad, f * 1000)
    with pytest.raises(SlideError, match=r"outside \[0, 1\]") as ei:
        _open_quiet(bad)
    assert str(bad) in str(ei.value)
    nan = tmp_path / "fnan.tif"
    f2 = f.copy()
    f2[0, 0] = np.nan
    tifffile.imwrite(nan, f2)
    with pytest.raises(SlideError, match=r"outside \[0, 1\]"):
        _open_quiet(nan)


def test_grayscale_replicated_and_miniswhite_inverted(tmp_path):
    g = _rgb(20, 24)[..., 0]
    p = tmp_path / "g.tif"
    tifffile.imwrite(p, g, compression="lzw")
    with _open_quiet(p) as s:
        out = s.read_level(0)
        assert "grayscale replicated" in s.conversion
    assert out.shape == (20, 24, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    pw = tmp_path / "w.tif"
    tifffile.imwrite(pw, g, photometric="miniswhite")
    with _open_quiet(pw) as s:
        np.testing.assert_array_equal(s.read_level(0)[..., 1], 255 - g)


def test_rgba_alpha_dropped_and_palette_expanded(tmp_path):
    img = _rgb(16, 18)
    rgba = np.concatenate([img, np.full((16, 18, 1), 7, np.uint8)], axis=-1)
    p = tmp_path / "rgba.tif"
    tifffile.imwrite(p, rgba, photometric="rgb", extrasamples=["unassalpha"])
    with _open_quiet(p) as s:
        assert s.samples_per_pixel == 4
        np.testing.assert_array_equal(s.read_level(0), img)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[0] = np.arange(256) * 257
    cmap[2] = (255 - np.arange(256)) * 257
    idx = img[..., 0]
    pp = tmp_path / "pal.tif"
    tifffile.imwrite(pp, idx, photometric="palette", colormap=cmap)
    with _open_quiet(pp) as s:
        out = s.read_level(0)
    np.testing.assert_array_equal(out[..., 0], idx)
    np.testing.assert_array_equal(out[..., 1], 0)
    np.testing.assert_array_equal(out[..., 2], 255 - idx)


def test_planar_separate(tmp_path):
    img = _rgb(33, 41)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate",
                     tile=(16, 16), compression="zlib")
    with _open_quiet(p) as s:
        np.testing.assert_array_equal(s.read_level(0), img)
        np.testing.assert_array_equal(s.read_region(5, 6, 20, 10), img[6:16, 5:25])


def test_multi_plane_stack_reads_first_plane_with_note(tmp_path):
    img = _rgb(20, 20)
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, np.stack([img, 255 - img]), photometric="rgb")
    with _open_quiet(p) as s:
        assert any("2 planes" in n for n in s.notes)
        np.testing.assert_array_equal(s.read_level(0), img)


def test_unsupported_sample_types_refused(tmp_path):
    p = tmp_path / "i32.tif"
    tifffile.imwrite(p, np.zeros((8, 8), np.int32))
    with pytest.raises(SlideError, match="unsupported sample type int32"):
        _open_quiet(p)
    p2 = tmp_path / "cmyk.tif"
    tifffile.imwrite(p2, np.zeros((8, 8, 4), np.uint8), photometric="separated")
    with pytest.raises(SlideError, match="colour space"):
        _open_quiet(p2)


# ------------------------------------------------------------------------------------------
# PNG / JPEG


def test_png_gray16_rgba_and_jpeg(tmp_path):
    img = _rgb(40, 60)
    p = tmp_path / "a.png"
    p.write_bytes(imagecodecs.png_encode(img))
    with _open_quiet(p) as s:
        assert s.format == "png" and s.mpp is None and s.mpp_source == "unknown"
        np.testing.assert_array_equal(s.read_level(0), img)
        np.testing.assert_array_equal(s.level_array(0)[3:9, 4:20], img[3:9, 4:20])
    rgba = np.concatenate([img, np.zeros((40, 60, 1), np.uint8)], axis=-1)
    p.write_bytes(imagecodecs.png_encode(rgba))
    with _open_quiet(p) as s:
        np.testing.assert_array_equal(s.read_level(0), img)
    g16 = (img[..., 0].astype(np.uint16) << 8) | 0x55
    p.write_bytes(imagecodecs.png_encode(g16))
    with _open_quiet(p) as s:
        out = s.read_level(0)
        assert s.dtype == "uint16"
    np.testing.assert_array_equal(out[..., 2], img[..., 0])
    j = tmp_path / "a.jpg"
    j.write_bytes(imagecodecs.jpeg8_encode(img, level=95))
    with _open_quiet(j, mpp=0.3) as s:
        assert s.format == "jpeg" and s.shape == (40, 60) and s.mpp == 0.3
        assert np.abs(s.read_level(0).astype(int) - img).mean() < 4
        thumb, ds = s.thumbnail(20)
        assert thumb.shape == (14, 20, 3) and ds == pytest.approx(0.5 * (40 / 14 + 3))


def test_png_declaring_huge_size_refused_before_decoding(tmp_path):
    # a 50-byte PNG whose IHDR declares 100000 x 100000 pixels (30 GB of RGB)
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"
    p = tmp_path / "bomb.png"
    p.write_bytes(data + b"\0" * 8)
    with pytest.raises(SlideError, match="more than max_pixels") as ei:
        open_slide(p)
    assert str(p) in str(ei.value)


def test_jpeg_declaring_huge_size_refused(tmp_path):
    data = imagecodecs.jpeg8_encode(_rgb(16, 16))
    i = data.index(b"\xff\xc0")
    patched = data[: i + 5] + struct.pack(">HH", 60000, 60000) + data[i + 9 :]
    p = tmp_path / "bomb.jpg"
    p.write_bytes(patched)
    with pytest.raises(SlideError, match="more than max_pixels"):
        open_slide(p, max_pixels=1_000_000_000)


def test_tiny_max_pixels_limits(tmp_path):
    img = _rgb(64, 64)
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, img, tile=(32, 32), photometric="rgb")
    # tiles of 1024 px fit, the whole 4096-px level does not
    with _open_quiet(p, max_pixels=2000) as s:
        with pytest.raises(InputError, match="max_pixels"):
            s.read_level(0)
        with pytest.raises(InputError, match="max_pixels"):
            s.read_region(0, 0, 50, 50)
        assert s.read_region(0, 0, 40, 40).shape == (40, 40, 3)
    # strips larger than the limit are refused at open, from the header
    ps = tmp_path / "strip.tif"
    tifffile.imwrite(ps, img, photometric="rgb", rowsperstrip=64)
    with pytest.raises(SlideError, match="max_pixels"):
        _open_quiet(ps, max_pixels=1000)
    pn = tmp_path / "t.png"
    pn.write_bytes(imagecodecs.png_encode(img))
    with pytest.raises(SlideError, match="max_pixels"):
        _open_quiet(pn, max_pixels=4095)
    with pytest.raises(InputError, match="max_pixels"):
        open_slide(pn, max_pixels=0)


@pytest.mark.parametrize("big", [65535, 2**31])
def test_tiff_header_declaring_huge_tiled_image(tmp_path, big):
    """A 16x16 one-tile TIFF whose header is patched to declare big x big pixels."""
    p = tmp_path / "huge.tif"
    tifffile.imwrite(p, np.zeros((16, 16, 3), np.uint8), tile=(16, 16), photometric="rgb")
    data = bytearray(p.read_bytes())
    with tifffile.TiffFile(p) as t:
        tags = t.pages[0].tags
        off_w, off_h = tags["ImageWidth"].valueoffset, tags["ImageLength"].valueoffset
        fmt = "<I" if tags["ImageWidth"].dtype == 4 else "<H"
    if fmt == "<H":
        big = min(big, 65535)
    struct.pack_into(fmt, data, off_w, big)
    struct.pack_into(fmt, data, off_h, big)
    p.write_bytes(bytes(data))
    with pytest.raises(SlideError) as ei:
        _open_quiet(p)
    assert str(p) in str(ei.value)
    assert "corrupt" in ei.value.problem


# ------------------------------------------------------------------------------------------
# bad files


def test_missing_empty_directory_and_not_an_image(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    e = tmp_path / "empty.tif"
    e.write_bytes(b"")
    with pytest.raises(SlideError, match="empty") as ei:
        open_slide(e)
    assert ei.value.path == str(e)
    with pytest.raises(SlideError, match="directory"):
        open_slide(tmp_path)
    t = tmp_path / "notes.tif"
    t.write_text("this is a text file, not an image\n")
    with pytest.raises(SlideError, match="not a TIFF, PNG or JPEG") as ei:
        open_slide(t)
    assert "openslide" in ei.value.problem.lower()


def test_truncated_and_corrupt_tiff(tmp_path):
    img = _rgb(128, 128)
    good = tmp_path / "good.tif"
    _write_pyramid(good, img, compression="jpeg")
    data = good.read_bytes()
    # header only
    p = tmp_path / "trunc8.tif"
    p.write_bytes(data[:8])
    with pytest.raises(SlideError) as ei:
        open_slide(p)
    assert str(p) in str(ei.value)
    # pixel data cut in half: tiles beyond the end cannot decode
    p2 = tmp_path / "trunc_half.tif"
    p2.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError):
        with open_slide(p2) as s:
            for lv in s.levels:
                s.read_level(lv.index)
    # garbage in the tile data: decoder error becomes a SlideError
    corrupt = bytearray(data)
    with tifffile.TiffFile(good) as t:
        off = t.pages[0].dataoffsets[0]
        n = t.pages[0].databytecounts[0]
    corrupt[off : off + n] = b"\x00" * n
    p3 = tmp_path / "corrupt.tif"
    p3.write_bytes(bytes(corrupt))
    with pytest.raises(SlideError, match="cannot decode level 0") as ei:
        with open_slide(p3) as s:
            s.read_region(0, 0, 10, 10)
    assert str(p3) in str(ei.value)


def test_truncated_png(tmp_path):
    data = imagecodecs.png_encode(_rgb(50, 50, seed=5))
    p = tmp_path / "t.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="cannot decode the PNG") as ei:
        with open_slide(p, mpp=1.0) as s:
            s.read_level(0)
    assert str(p) in str(ei.value)


def test_openslide_missing_message(tmp_path, monkeypatch):
    import biopsyquant.slide as slide_mod

    monkeypatch.setattr(slide_mod, "_import_openslide", lambda: None)
    p = tmp_path / "slide.mrxs"
    p.write_bytes(b"[GENERAL]\nSLIDE_VERSION = 01.02\n")
    with pytest.raises(SlideError, match=r"biopsyquant\[openslide\]"):
        open_slide(p)


def test_openslide_backend_through_a_fake_module(tmp_path, monkeypatch):
    """The OpenSlide adapter: level-0 coordinates, transparent -> white, mpp property."""
    import types

    import biopsyquant.slide as slide_mod

    full = np.zeros((200, 300, 4), np.uint8)
    full[..., :3] = _rgb(200, 300)
    full[..., 3] = 255
    full[:, :20, 3] = 0  # transparent strip (no scan data)

    class FakeOS:
        def __init__(self, path):
            self.properties = {"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527",
                               "openslide.vendor": "mirax", "openslide.objective-power": "20"}
            self.level_dimensions = [(300, 200), (150, 100)]
            self.level_downsamples = [1.0, 2.0]
            self.calls = []

        @staticmethod
        def detect_format(path):
            return "mirax"

        def read_region(self, loc, level, size):
            (x0, y0), (w, h) = loc, size
            ds = int(self.level_downsamples[level])
            return full[y0 : y0 + h * ds : ds, x0 : x0 + w * ds : ds]

        def close(self):
            pass

    fake = types.SimpleNamespace(OpenSlide=FakeOS)
    monkeypatch.setattr(slide_mod, "_import_openslide", lambda: fake)
    p = tmp_path / "x.mrxs"
    p.write_bytes(b"[GENERAL]\n")
    with open_slide(p) as s:
        assert s.format == "openslide" and s.mpp == pytest.approx(0.2527)
        assert s.mpp_source == "openslide" and s.objective_power == 20
        assert [lv.shape for lv in s.levels] == [(200, 300), (100, 150)]
        r = s.read_region(10, 30, 20, 10, level=1)  # level-1 coords
        np.testing.assert_array_equal(r, full[60:80:2, 20:60:2, :3])
        left = s.read_region(0, 0, 30, 5)
        assert (left[:, :20] == 255).all()
        np.testing.assert_array_equal(left[:, 20:], full[:5, 20:30, :3])


# ------------------------------------------------------------------------------------------
# API details


def test_level_dataclass_frozen_and_pickle(tmp_path):
    lv = Level(0, (10, 20), 1.0)
    with pytest.raises(AttributeError):
        lv.index = 3  # type: ignore[misc]
    p = tmp_path / "p.tif"
    img = _rgb(20, 20)
    tifffile.imwrite(p, img, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_slide(p, mpp=0.3) as s:
        s2 = pickle.loads(pickle.dumps(s))
    with s2:
        assert s2.mpp == 0.3 and s2.mpp_source == "user"
        np.testing.assert_array_equal(s2.read_level(0), img)


def test_closed_slide_and_info_dict(tmp_path):
    import json

    p = tmp_path / "p.tif"
    tifffile.imwrite(p, _rgb(20, 20), photometric="rgb")
    s = _open_quiet(p)
    d = s.info_dict()
    json.dumps(d)
    assert d["levels"][0]["shape"] == [20, 20] and d["mpp"] is None
    assert d["mpp_source"] == "unknown" and "pixel size unknown" in d["mpp_warning"]
    s.close()
    s.close()
    with pytest.raises(SlideError, match="closed"):
        s.read_region(0, 0, 2, 2)


def test_thumbnail_without_pyramid_is_block_mean(tmp_path):
    img = _rgb(100, 70)
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, img, tile=(32, 32), photometric="rgb")
    with _open_quiet(p) as s:
        thumb, ds = s.thumbnail(max_size=25)
    # factor 4: 25 x 18 output, last column block has 2 pixels
    assert thumb.shape == (25, 18, 3)
    ref = img[:4, :4].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(thumb[0, 0], ref, atol=0.51)
    np.testing.assert_allclose(thumb[-1, -1], img[96:100, 68:70].reshape(-1, 3).mean(0), atol=0.51)
    assert ds == pytest.approx(0.5 * (100 / 25 + 70 / 18))


def test_synthetic_aperio_layout_excludes_thumbnail_label_macro(tmp_path):
    """Aperio page order: level 0, thumbnail (stripped), level 1, label, macro."""
    img = _rgb(512, 384, seed=4)
    head = "Aperio Image Library v12.0.15 \r\n384x512 [0,0 384x512] (128x128) JPEG/RGB Q=70"
    tail = "|AppMag = 40|MPP = 0.2520|ScanScope ID = SS1234"
    kw = {"photometric": "rgb", "metadata": None}
    p = tmp_path / "fake.svs"
    with tifffile.TiffWriter(p) as tw:
        tw.write(img, tile=(128, 128), compression="jpeg", description=head + tail, **kw)
        tw.write(img[::8, ::8], compression="jpeg",
                 description="Aperio Image Library v12.0.15 \r\n384x512 -> 48x64 - " + tail, **kw)
        tw.write(img[::4, ::4], tile=(128, 128), compression="jpeg",
                 description="Aperio Image Library v12.0.15 \r\n384x512 -> 96x128 - " + tail, **kw)
        tw.write(img[:40, :50], compression="lzw", subfiletype=1,
                 description="Aperio Image Library v12.0.15\r\nlabel 50x40", **kw)
        tw.write(img[:60, :90], compression="jpeg", subfiletype=9,
                 description="Aperio Image Library v12.0.15\r\nmacro 90x60", **kw)
    with open_slide(p) as s:
        assert s.format == "svs"
        assert [lv.shape for lv in s.levels] == [(512, 384), (128, 96)]
        assert [lv.downsample for lv in s.levels] == pytest.approx([1.0, 4.0])
        assert s.mpp == pytest.approx(0.252) and s.mpp_source == "svs"
        assert s.objective_power == 40 and s.metadata["ScanScope ID"] == "SS1234"
        assert s.metadata["associated_images"] == ["Thumbnail", "Label", "Macro"]
        assert np.abs(s.read_level(1).astype(int) - img[::4, ::4]).mean() < 4
        # the thumbnail comes from level 1, never level 0
        thumb, ds = s.thumbnail(max_size=128)
        assert thumb.shape == (128, 96, 3) and ds == pytest.approx(4.0)


def test_concurrent_reads_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    img = _rgb(256, 256, seed=2)
    p = tmp_path / "c.tif"
    tifffile.imwrite(p, img, tile=(64, 64), compression="zlib", photometric="rgb")
    boxes = [(x, y) for x in range(0, 224, 37) for y in range(0, 224, 41)]
    with _open_quiet(p) as s, ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda b: s.read_region(b[0], b[1], 32, 32), boxes))
    for (x, y), r in zip(boxes, results, strict=True):
        np.testing.assert_array_equal(r, img[y : y + 32, x : x + 32])


@pytest.mark.parametrize("compression", ["jpeg", "zlib", "lzw", "jpeg2000"])
def test_direct_tile_decoder_equals_zarr_store(tmp_path, compression):
    """The thread-pool tile decoder and tifffile's zarr store give identical samples."""
    img = _rgb(300, 260, seed=7)
    p = tmp_path / "t.tif"
    tile = (64, 64) if compression == "jpeg" else (64, 48)
    tifffile.imwrite(p, img, tile=tile, compression=compression, photometric="rgb")
    with _open_quiet(p) as s:
        b = s._backend
        page = b._tile_page(0)
        assert page is not None
        for y0, y1, x0, x1 in [(0, 300, 0, 260), (5, 77, 3, 150), (250, 300, 200, 260),
                               (63, 65, 47, 49)]:
            np.testing.assert_array_equal(b.read_tiles(page, y0, y1, x0, x1),
                                          b.read_zarr(0, y0, y1, x0, x1))


def test_block_mean_matches_loop():
    from biopsyquant.slide import _block_mean

    rng = np.random.default_rng(0)
    for h, w, f in [(100, 70, 4), (7, 9, 3), (64, 64, 2), (5, 5, 7)]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = _block_mean(a, f)
        assert out.shape == (-(-h // f), -(-w // f), 3)
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                ref = a[i * f : (i + 1) * f, j * f : (j + 1) * f].reshape(-1, 3).mean(0)
                np.testing.assert_allclose(out[i, j], ref, atol=0.5 + 1e-9)


def test_uncompressed_ycbcr_converted_to_rgb(tmp_path):
    img = _rgb(24, 40, seed=9).astype(np.float64)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    ycc = np.stack([y, 128 + (b - y) / 1.772, 128 + (r - y) / 1.402], axis=-1)
    p = tmp_path / "ycc.tif"
    tifffile.imwrite(p, np.clip(np.rint(ycc), 0, 255).astype(np.uint8), photometric="ycbcr",
                     subsampling=(1, 1), compression="zlib")
    with _open_quiet(p) as s:
        assert "YCbCr" in s.conversion
        out = s.read_level(0).astype(int)
    assert np.abs(out - img).max() <= 2


def test_openslide_fallback_for_tiff_tifffile_cannot_decode(tmp_path, realdata, monkeypatch):
    """A TIFF tifffile refuses is handed to OpenSlide when OpenSlide recognises it."""
    import shutil
    import types

    import biopsyquant.slide as slide_mod

    class FakeOS:
        def __init__(self, path):
            self.properties = {}
            self.level_dimensions = [(1, 1)]
            self.level_downsamples = [1.0]

        @staticmethod
        def detect_format(path):
            return "generic-tiff"

        def read_region(self, loc, level, size):
            return np.full((size[1], size[0], 4), (10, 20, 30, 255), np.uint8)

        def close(self):
            pass

    p = tmp_path / "u.tiff"
    shutil.copy(realdata / FIX / "openslide_python_unopenable.tiff", p)
    monkeypatch.setattr(slide_mod, "_import_openslide", lambda: types.SimpleNamespace(OpenSlide=FakeOS))
    with _open_quiet(p) as s:
        assert s.format == "openslide" and s.mpp is None
        np.testing.assert_array_equal(s.read_region(0, 0, 1, 1)[0, 0], (10, 20, 30))
    FakeOS.detect_format = staticmethod(lambda path: None)
    with pytest.raises(SlideError, match="compression scheme 52479"):
        open_slide(p)
