"""Colour-deconvolution throughput and accuracy, all methods on the same image in one run.

Usage::

    python benchmarks/bench_deconvolution.py [--size 4096] [--repeat 3] [--json out.json]

The image is scikit-image's bundled IHC field (512 x 512, H-DAB) tiled to ``size x size``.
Prints, per method, the best and the median wall time of ``--repeat`` rounds (each round runs
every method once, so that changing machine load hits all alike), throughput in Mpx/s, the speed-up
over ``skimage.color.rgb2hed``, the peak memory the call allocates (tracemalloc, bytes per
pixel) and the largest absolute difference from an exact float64 reference (log10 OD).
Numba kernels are compiled (or loaded from cache) before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numba
import numpy as np
from skimage.color import rgb2hed
from skimage.data import immunohistochemistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biopsyquant.stains import (  # noqa: E402
    _deconvolve_numpy,
    _stain_od_numpy,
    dab_classes,
    dab_threshold_counts,
    deconvolve,
    estimate_background,
    preset,
    stain_od,
)

THRESHOLDS = (0.2, 0.4, 0.6)


def reference(tile: np.ndarray, model) -> np.ndarray:
    """Exact float64 concentrations (log10 OD) of one tile."""
    i = np.maximum(tile.astype(np.float64), 1.0)
    od = np.maximum(-np.log10(i / np.asarray(model.background)), 0.0)
    return od @ np.linalg.inv(model.vectors)


def max_err_tiled(out: np.ndarray, ref_tile: np.ndarray) -> float:
    """max |out - ref| where ``out`` is ``ref_tile`` tiled (checked tile row by tile row)."""
    th, tw = ref_tile.shape[:2]
    err = 0.0
    for r0 in range(0, out.shape[0], th):
        band = out[r0 : r0 + th]
        reps = band.shape[1] // tw
        b = band[:, : reps * tw].reshape(band.shape[0], reps, tw, *band.shape[2:])
        ref = ref_tile[: band.shape[0], None]
        err = max(err, float(np.abs(b - ref).max()))
    return err


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="image edge in pixels")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds (best and median)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)

    tile = immunohistochemistry()
    reps = -(-args.size // tile.shape[0])
    rgb = np.ascontiguousarray(np.tile(tile, (reps, reps, 1))[: args.size, : args.size])
    npx = rgb.shape[0] * rgb.shape[1]
    model = preset("H-DAB").with_background(estimate_background(tile))
    ref = reference(tile, model)
    dab_i = model.index("dab")
    mask = np.ones(rgb.shape[:2], bool)
    mask[:, : args.size // 4] = False  # 75 % of the image analysed

    max_threads = numba.config.NUMBA_NUM_THREADS
    # warm up (compile or load the numba cache)
    small = rgb[:300, :300]
    deconvolve(small, model), stain_od(small, model), dab_threshold_counts(small, model)
    dab_classes(small, model), deconvolve(rgb, model), stain_od(rgb, model)
    dab_threshold_counts(rgb, model, THRESHOLDS, mask), dab_classes(rgb, model)

    methods = []  # (name, fn, threads, err, note)

    def add(name, fn, threads=None, err=None, note=""):
        methods.append((name, fn, threads, err, note))

    # rgb2hed: natural-log OD / ln(1e-6) with a white background, different third stain;
    # its error vs our reference is not meaningful, so it is not reported.
    add("skimage.color.rgb2hed (float64)", lambda: rgb2hed(rgb), note="not comparable units")
    e = max_err_tiled(_deconvolve_numpy(rgb, model), ref)
    add("numpy premultiplied LUT, deconvolve (3 stains)", lambda: _deconvolve_numpy(rgb, model),
        err=e)
    e = max_err_tiled(_stain_od_numpy(rgb, model, "dab"), ref[..., dab_i])
    add("numpy premultiplied LUT, DAB only", lambda: _stain_od_numpy(rgb, model, "dab"), err=e)
    out1 = np.empty(rgb.shape[:2], np.float32)
    e = max_err_tiled(stain_od(rgb, model, "dab"), ref[..., dab_i])
    for th in (1, 2):
        add("numba stain_od (DAB)", lambda: stain_od(rgb, model, "dab"), threads=th, err=e)
    add("numba stain_od (DAB), reused out buffer",
        lambda: stain_od(rgb, model, "dab", out=out1), threads=2, err=e)
    e = max_err_tiled(deconvolve(rgb, model), ref)
    for th in (1, 2):
        add("numba deconvolve (3 stains)", lambda: deconvolve(rgb, model), threads=th, err=e)
    # fused counts: compare with the float64 reference's class counts
    tc = dab_threshold_counts(rgb, model, THRESHOLDS, mask)
    ref_cls = np.searchsorted(THRESHOLDS, ref[..., dab_i], side="right")
    ref_counts = np.zeros(4, np.int64)
    for r0 in range(0, args.size, tile.shape[0]):  # the mask differs per tile
        for c0 in range(0, args.size, tile.shape[1]):
            m = mask[r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]]
            ref_counts += np.bincount(ref_cls[: m.shape[0], : m.shape[1]][m], minlength=4)
    count_diff = int(np.abs(tc.counts - ref_counts).max())
    for th in (1, 2):
        add("numba fused DAB + 3-threshold counts (mask)",
            lambda: dab_threshold_counts(rgb, model, THRESHOLDS, mask), threads=th,
            note=f"max class-count difference vs float64: {count_diff} px")
    cls_buf = np.empty(rgb.shape[:2], np.uint8)
    for th in (1, 2):
        add("numba fused DAB class image (uint8)",
            lambda: dab_classes(rgb, model, THRESHOLDS, out=cls_buf), threads=th)

    # rounds: every method once per round, so that load changes hit all methods alike
    times = [[] for _ in methods]
    for k in range(args.repeat):
        for i, (_name, fn, threads, _e, _n) in enumerate(methods):
            numba.set_num_threads(min(threads or max_threads, max_threads))
            try:
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
            finally:
                numba.set_num_threads(max_threads)
        print(f"  round {k + 1}/{args.repeat} done", flush=True)
    rows = []
    for (name, fn, threads, err, note), ts in zip(methods, times, strict=True):
        numba.set_num_threads(min(threads or max_threads, max_threads))
        mem = peak_bytes(fn)
        numba.set_num_threads(max_threads)
        best, med = min(ts), statistics.median(ts)
        rows.append({"method": name, "threads": threads or 1, "best_s": best, "median_s": med,
                     "mpx_per_s": npx / best / 1e6, "median_mpx_per_s": npx / med / 1e6,
                     "peak_bytes_per_px": mem / npx, "max_abs_err_od": err, "note": note})

    base = rows[0]["mpx_per_s"]
    print()
    mbase = rows[0]["median_mpx_per_s"]
    print("| method | threads | Mpx/s best | × rgb2hed | Mpx/s median | × rgb2hed | "
          "peak alloc (B/px) | max abs err vs float64 (OD) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = "—" if r["max_abs_err_od"] is None else f"{r['max_abs_err_od']:.1e}"
        print(f"| {r['method']} | {r['threads']} | {r['mpx_per_s']:.1f} | "
              f"{r['mpx_per_s'] / base:.1f} | {r['median_mpx_per_s']:.1f} | "
              f"{r['median_mpx_per_s'] / mbase:.1f} | {r['peak_bytes_per_px']:.1f} | {err} |")
    print(f"\nfused counts vs float64 reference: max class-count difference {count_diff} px "
          f"of {int(mask.sum())}; counts {tc.counts.tolist()}")
    if args.json:
        args.json.write_text(json.dumps({
            "size": args.size, "repeat": args.repeat, "machine": platform.platform(),
            "cpus": os.cpu_count(), "numba": numba.__version__, "results": rows,
            "count_diff_px": count_diff}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
