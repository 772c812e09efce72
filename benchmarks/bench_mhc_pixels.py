"""Throughput of MHC-I fiber scoring and IL-1 pixel scoring on a 4096 x 4096 section.

Usage::

    python benchmarks/bench_mhc_pixels.py [--size 4096] [--tile 1024] [--repeat 3]
                                          [--measure-only] [--json out.json]

A ``tile x tile`` synthetic section (:func:`biopsyquant.synthetic.generate_section`, 0.5 µm/px,
stain jitter, uneven illumination, JPEG 85) is tiled to ``size x size`` (fiber labels renumbered
so every fiber is unique), once for MHC-I and once for IL-1b. Timed, each the best and median of
``--repeat`` rounds:

* ``measure`` only — :func:`biopsyquant.mhc.measure` / :func:`biopsyquant.pixels.measure` on an
  :class:`~biopsyquant.score.ImageContext` built from the truth fibers and compartments (the
  DAB / hematoxylin maps are computed before timing): the cost of *this* module;
* the steps before it, once: deconvolution, tissue detection, fiber segmentation, compartments;
* end to end: :func:`biopsyquant.score.score_image` (stain estimate, tissue, fibers,
  compartments, fiber table, measure, summary), once.

Peak memory of ``measure`` is measured with tracemalloc (bytes per pixel). Numba kernels are
compiled (or loaded from cache) before timing. Besides wall time, the CPU time of ``measure``
(all threads of the process) is printed: on a machine shared with other jobs the wall time
mostly measures the load, the CPU time the work. ``--measure-only`` skips the end-to-end and
per-step timings.
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

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biopsyquant import mhc, pixels  # noqa: E402
from biopsyquant.score import ImageContext, prepare_stain_model, score_image  # noqa: E402
from biopsyquant.settings import load_settings  # noqa: E402
from biopsyquant.stains import deconvolve  # noqa: E402
from biopsyquant.synthetic import generate_section  # noqa: E402

MPP = 0.5


def tiled_section(marker: str, size: int, tile: int, **kw):
    sec = generate_section(marker=marker, seed=7, shape=(tile, tile), mpp=MPP,
                           vector_jitter_deg=3.0, illumination=0.1, jpeg_quality=85, **kw)
    reps = int(np.ceil(size / tile))
    rgb = np.tile(sec.rgb, (reps, reps, 1))[:size, :size].copy()
    comp = np.tile(sec.compartments, (reps, reps))[:size, :size].copy()
    tissue = np.tile(sec.tissue, (reps, reps))[:size, :size].copy()
    nf = int(sec.fibers.max())
    fib = np.zeros((size, size), np.int32)
    k = 0
    for i in range(reps):
        for j in range(reps):
            y0, x0 = i * tile, j * tile
            block = sec.fibers[: min(tile, size - y0), : min(tile, size - x0)]
            fib[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = np.where(block > 0,
                                                                          block + k * nf, 0)
            k += 1
    return rgb, fib, comp, tissue


def context(rgb, fib, comp, tissue, marker) -> ImageContext:
    settings = load_settings(marker)
    model = prepare_stain_model(rgb, settings, tissue=tissue)
    od = deconvolve(rgb, model)
    ids = np.unique(fib[fib > 0])
    return ImageContext(rgb=rgb, mpp=MPP, size_mpp=MPP, stain_model=model,
                        hema_od=np.ascontiguousarray(od[..., 0]),
                        dab_od=np.ascontiguousarray(od[..., 1]), tissue=tissue,
                        excluded=np.zeros(tissue.shape, bool), analysed=tissue, fibers=fib,
                        fiber_table=pd.DataFrame({"fiber_id": ids.astype(np.int32)}),
                        compartments=comp, settings=settings)


def timed(fn, repeat: int) -> tuple[float, float, float]:
    """Best and median wall time and best CPU time (s) of ``repeat`` calls."""
    times, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(times), statistics.median(times), min(cpu)


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--measure-only", action="store_true",
                    help="time only the measure step (no segmentation, no score_image)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    size = args.size
    mpx = size * size / 1e6
    out: dict = {"size": size, "mpx": mpx, "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "load_average": os.getloadavg(),
                 "results": {}}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    # warm-up: compile / load the numba kernels
    small = context(*tiled_section("MHC-I", 256, 256), "MHC-I")
    mhc.measure(small)
    pixels.measure(context(small.rgb, small.fibers, small.compartments, small.tissue, "IL-1b"))

    for marker, mod, kw in (("MHC-I", mhc, {"positive_fiber_fraction": 0.3}),
                            ("IL-1b", pixels, {"expression": 0.5})):
        rgb, fib, comp, tissue = tiled_section(marker, size, args.tile, **kw)
        ctx = context(rgb, fib, comp, tissue, marker)
        best, med, cpu = timed(lambda ctx=ctx, mod=mod: mod.measure(ctx), args.repeat)
        peak = peak_bytes(lambda ctx=ctx, mod=mod: mod.measure(ctx))
        res = {"fibers": int(len(np.unique(fib)) - 1),
               "measure_s_best": best, "measure_s_median": med, "measure_cpu_s": cpu,
               "measure_mpx_s": mpx / best, "measure_peak_bytes_per_px": peak / (size * size)}
        print(f"{marker:6s} {size}x{size} ({res['fibers']} fibers): measure best {best:.3f} s "
              f"({mpx / best:.1f} Mpx/s), median {med:.3f} s, CPU {cpu:.3f} s, peak "
              f"{peak / (size * size):.1f} B/px", flush=True)
        if args.measure_only:
            out["results"][marker] = res
            continue
        # the steps before measure, once each
        from biopsyquant.compartments import compartment_map
        from biopsyquant.fibers import segment_fibers
        from biopsyquant.tissue import detect_tissue

        settings = ctx.settings
        t = time.perf_counter()
        deconvolve(rgb, ctx.stain_model)
        res["deconvolve_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tis = detect_tissue(rgb, mpp=MPP, background=ctx.stain_model.background,
                            params=settings.tissue)
        res["tissue_s"] = time.perf_counter() - t
        t = time.perf_counter()
        seg = segment_fibers(rgb, mpp=MPP, model=ctx.stain_model, tissue=tis,
                             params=settings.fibers)
        res["segment_fibers_s"] = time.perf_counter() - t
        t = time.perf_counter()
        compartment_map(seg, tis, mpp=MPP, hema_od=ctx.hema_od, dab_od=ctx.dab_od, rgb=rgb,
                        params=settings.compartments)
        res["compartments_s"] = time.perf_counter() - t
        del seg, tis
        t = time.perf_counter()
        r = score_image(rgb, marker=marker, mpp=MPP)
        res["score_image_s"] = time.perf_counter() - t
        res["score_image_mpx_s"] = mpx / res["score_image_s"]
        res["score_image_steps_s"] = r.provenance.get("seconds")
        out["results"][marker] = res
        print(f"{marker:6s} {size}x{size} ({res['fibers']} fibers): measure best "
              f"{best:.2f} s ({mpx / best:.1f} Mpx/s), median {med:.2f} s, peak "
              f"{peak / (size * size):.1f} B/px | deconvolve {res['deconvolve_s']:.2f} s, "
              f"tissue {res['tissue_s']:.2f} s, fibers {res['segment_fibers_s']:.2f} s, "
              f"compartments {res['compartments_s']:.2f} s | score_image "
              f"{res['score_image_s']:.2f} s ({res['score_image_mpx_s']:.2f} Mpx/s)",
              flush=True)
        del rgb, fib, comp, tissue, ctx, r
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
