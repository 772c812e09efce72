"""Read throughput of biopsyquant.slide on a JPEG-tiled pyramid (prints its numbers).

Usage::

    python benchmarks/bench_read.py [--size 8192] [--repeat 3]

Writes a synthetic ``size x size`` RGB pyramid (256x256 JPEG tiles, quality 90, levels /1 /4
/16, in SubIFDs) to a temporary folder, then measures, as medians of ``--repeat`` runs:

* ``open_slide`` (header parse + one-tile probe);
* ``read_level(0)`` - the whole-page fast path, decoder threads 1 and 2;
* ``read_region`` 512x512 tiles over all of level 0 (the zarr path, only touched tiles);
* ``thumbnail(1024)`` (smallest adequate level);

and the peak Python-heap memory (tracemalloc) of the tile loop and of the thumbnail.
Numbers vary with machine load; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import tifffile

from biopsyquant.slide import PixelSizeWarning, open_slide


def _write(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / 40.0
    img = np.empty((size, size, 3), np.uint8)
    img[..., 0] = 180 + 60 * np.sin(xx) * np.cos(yy)
    img[..., 1] = 150 + 80 * np.sin(yy * 0.7)
    img[..., 2] = 200 + 40 * np.cos(xx * 1.3)
    img += rng.integers(0, 8, img.shape, dtype=np.uint8)
    del xx, yy
    opts = dict(tile=(256, 256), compression="jpeg", compressionargs={"level": 90},
                photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25),
                resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, subifds=2, **opts)
        tw.write(img[::4, ::4], subfiletype=1, **opts)
        tw.write(img[::16, ::16], subfiletype=1, **opts)


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore", PixelSizeWarning)
    size = args.size
    mpx = size * size / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tif"
        t = time.perf_counter()
        _write(path, size)
        print(f"wrote {size}x{size} JPEG-tiled pyramid ({path.stat().st_size / 1e6:.1f} MB) "
              f"in {time.perf_counter() - t:.1f} s")

        t_open = _median_time(lambda: open_slide(path).close(), args.repeat)
        print(f"open_slide                      {1e3 * t_open:8.1f} ms")

        for workers in (1, 2):
            with open_slide(path, maxworkers=workers) as s:
                t_lvl = _median_time(lambda s=s: s.read_level(0), args.repeat)
            print(f"read_level(0), {workers} thread(s)       {t_lvl:8.2f} s  "
                  f"{mpx / t_lvl:7.1f} Mpx/s")

        def tiles(s) -> None:
            for y in range(0, size, 512):
                for x in range(0, size, 512):
                    s.read_region(x, y, 512, 512)

        for workers in (1, 2):
            with open_slide(path, maxworkers=workers) as s:
                t_tiles = _median_time(lambda s=s: tiles(s), args.repeat)
            print(f"read_region 512x512 tiles, {workers} thr {t_tiles:8.2f} s  "
                  f"{mpx / t_tiles:7.1f} Mpx/s")

        with open_slide(path) as s:
            t_thumb = _median_time(lambda s=s: s.thumbnail(1024), args.repeat)
            thumb, ds = s.thumbnail(1024)
        print(f"thumbnail(1024) -> {thumb.shape[1]}x{thumb.shape[0]} (downsample {ds:g})"
              f"  {1e3 * t_thumb:8.1f} ms")

        with open_slide(path) as s:
            tracemalloc.start()
            tiles(s)
            _, peak_tiles = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            tracemalloc.start()
            s.thumbnail(1024)
            _, peak_thumb = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        print(f"peak traced memory: tile loop {peak_tiles / 1e6:.1f} MB, "
              f"thumbnail {peak_thumb / 1e6:.1f} MB (level 0 as RGB would be "
              f"{3 * mpx:.0f} MB)")


if __name__ == "__main__":
    main()
