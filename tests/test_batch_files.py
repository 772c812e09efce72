"""Slide files for the batch tests: plain TIFF, pyramidal tiled JPEG TIFF, SVS-like, broken.

The writers are used by test_batch_e2e.py, test_wsi_tiling.py and test_cluster.py; the tests
here check that each written file opens as the intended format with the intended pixel size.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import tifffile

SVS_HEAD = "Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"


@lru_cache(maxsize=8)
def section_rgb(marker: str, seed: int, size: int, mpp: float = 0.5) -> np.ndarray:
    """Synthetic section image (cached per test session)."""
    from biopsyquant.synthetic import generate_section

    rgb = generate_section(marker=marker, seed=seed, shape=(size, size), mpp=mpp).rgb
    rgb.setflags(write=False)
    return rgb


def _res(mpp: float) -> dict:
    r = 1e4 / mpp
    return {"resolution": (r, r), "resolutionunit": "CENTIMETER"}


def write_plain_tiff(path: Path, rgb: np.ndarray, mpp: float | None) -> Path:
    """Uncompressed strip TIFF; ``mpp=None`` writes no resolution (pixel size unknown)."""
    kw = _res(mpp) if mpp else {}
    tifffile.imwrite(path, rgb, photometric="rgb", metadata=None, **kw)
    return Path(path)


def write_pyramid_jpeg(path: Path, rgb: np.ndarray, mpp: float, *, tile: int = 256,
                       levels: int = 3) -> Path:
    """Tiled JPEG TIFF with reduced-resolution SubIFDs (downsample 2 per level)."""
    import cv2

    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, photometric="rgb", tile=(tile, tile), compression="jpeg",
                 compressionargs={"level": 90}, subifds=levels - 1, metadata=None, **_res(mpp))
        lvl = rgb
        for _ in range(levels - 1):
            lvl = cv2.resize(lvl, (lvl.shape[1] // 2, lvl.shape[0] // 2),
                             interpolation=cv2.INTER_AREA)
            tw.write(lvl, photometric="rgb", tile=(tile, tile), compression="jpeg",
                     compressionargs={"level": 90}, subfiletype=1, metadata=None)
    return Path(path)


def write_svs_like(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    """Aperio-style file: tiled JPEG level 0, stripped thumbnail, 4x level, label."""
    import cv2

    h, w = rgb.shape[:2]
    tail = f"|AppMag = 20|MPP = {mpp:.4f}|ScanScope ID = TEST"
    kw = {"photometric": "rgb", "metadata": None}
    small = cv2.resize(rgb, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), compression="jpeg", compressionargs={"level": 90},
                 description=SVS_HEAD.format(w=w, h=h) + tail, **kw)
        tw.write(rgb[::16, ::16], compression="jpeg",
                 description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {w // 16}x{h // 16}"
                 + tail, **kw)
        tw.write(small, tile=(256, 256), compression="jpeg",
                 description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {w // 4}x{h // 4}"
                 + tail, **kw)
        tw.write(rgb[:40, :50], compression="lzw", subfiletype=1,
                 description="Aperio Image Library v12.0.15\r\nlabel 50x40", **kw)
    return Path(path)


def write_truncated(path: Path, rgb: np.ndarray) -> Path:
    """A TIFF cut off in the middle of its image data (a broken download)."""
    tmp = Path(path).with_suffix(".full.tmp")
    tifffile.imwrite(tmp, rgb, photometric="rgb", tile=(256, 256), compression="jpeg",
                     metadata=None)
    data = tmp.read_bytes()
    tmp.unlink()
    Path(path).write_bytes(data[: len(data) // 3])
    return Path(path)


@pytest.fixture(scope="module")
def small_rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)


def test_writers_give_the_intended_formats(tmp_path, small_rgb):
    from biopsyquant.errors import SlideError
    from biopsyquant.slide import open_slide

    with open_slide(write_plain_tiff(tmp_path / "a.tif", small_rgb, 0.5)) as s:
        assert s.format == "tiff" and len(s.levels) == 1
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "tiff-resolution"
        assert np.array_equal(s.read_level(0), small_rgb)
    with open_slide(write_plain_tiff(tmp_path / "u.tif", small_rgb, None)) as s:
        assert s.mpp is None and s.mpp_source == "unknown"
    with open_slide(write_pyramid_jpeg(tmp_path / "p.tif", small_rgb, 0.25)) as s:
        assert [lv.shape for lv in s.levels] == [(512, 512), (256, 256), (128, 128)]
        assert s.mpp == pytest.approx(0.25)
        assert s.levels[0].tile_shape == (256, 256)
    with open_slide(write_svs_like(tmp_path / "s.svs", small_rgb, 0.4991)) as s:
        assert s.format == "svs" and s.mpp_source == "svs"
        assert s.mpp == pytest.approx(0.4991)
        assert [lv.shape for lv in s.levels] == [(512, 512), (128, 128)]
    with pytest.raises(SlideError):
        with open_slide(write_truncated(tmp_path / "t.tif", small_rgb)) as s:
            s.read_level(0)
