"""Benchmark of positive-cell detection (biopsyquant.cells) on a 4096 x 4096 CD163 section.

Run:  .venv/bin/python benchmarks/bench_cells.py [--size 4096] [--repeat 3] [--marker CD163]

The section is a generated CD163 section (2048 x 2048 at 0.5 µm/px, 300 cells/mm², one
cluster) mirrored 2 x 2 to the requested size. Prints, for ``detect_cells`` on precomputed OD
maps (the part this module owns) and for the whole ``cells.measure`` step with colour
deconvolution: median seconds, Mpx/s, cells/s, and the peak memory of the Python-side numpy
allocations (tracemalloc) per pixel, plus a GaussianBlur reference to judge machine load, and the cell -> nearest fiber lookup
(``fiber_id``) by the ring search against the whole-image labelled transform it replaced.

``detect_cells`` is timed twice, alternating: the default sparse evaluation and
``sparse=False`` (the detection chain over the whole image, the pre-2026-11-22 algorithm),
each as wall-clock seconds and as process CPU seconds; the CPU time is the better measure on
a shared machine and of batch throughput (one worker process per core). The two must give
the same cells (checked).
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np


def _mirror(a: np.ndarray) -> np.ndarray:
    return np.concatenate([np.concatenate([a, a[:, ::-1]], axis=1),
                           np.concatenate([a[::-1], a[::-1, ::-1]], axis=1)], axis=0)


def _section(size: int, marker: str
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from biopsyquant.synthetic import generate_section

    half = (size + 1) // 2
    sec = generate_section(marker=marker, seed=7, shape=(half, half), mpp=0.5,
                           cells_per_mm2=300.0 if marker == "CD163" else 0.0, n_clusters=1,
                           jpeg_quality=85)
    rgb = _mirror(sec.rgb)
    tissue = _mirror(sec.tissue)
    fibers = _mirror(np.asarray(sec.fibers, np.int32))
    return (np.ascontiguousarray(rgb[:size, :size]), np.ascontiguousarray(tissue[:size, :size]),
            np.ascontiguousarray(fibers[:size, :size]), sec.mpp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--marker", default="CD163")
    args = ap.parse_args()

    from biopsyquant import cells
    from biopsyquant.settings import load_settings
    from biopsyquant.stains import deconvolve, estimate_stains

    settings = load_settings(args.marker)
    t = time.perf_counter()
    rgb, tissue, fib, mpp = _section(args.size, args.marker)
    print(f"section {rgb.shape[1]}x{rgb.shape[0]} generated in {time.perf_counter() - t:.1f} s; "
          f"os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    model = estimate_stains(rgb, tissue_mask=tissue)
    od = deconvolve(rgb, model)
    hema = np.ascontiguousarray(od[..., model.index("hematoxylin")])
    dab = np.ascontiguousarray(od[..., model.index("dab")])
    del od
    mpx = rgb.shape[0] * rgb.shape[1] / 1e6

    # load reference: OpenCV GaussianBlur sigma 2 (../shared/perf-facts.md: ~159 Mpx/s, 1 thread,
    # ~266 Mpx/s 2 threads on a quiet machine of this kind)
    import cv2

    ref = []
    for _ in range(3):
        t = time.perf_counter()
        cv2.GaussianBlur(hema, (13, 13), 2.0)
        ref.append(time.perf_counter() - t)
    print(f"reference cv2.GaussianBlur sigma 2: {mpx / float(np.median(ref)):.0f} Mpx/s "
          f"(perf-facts: 159-266 on a quiet machine)")

    cells.detect_cells(hema[:512, :512], dab[:512, :512], mpp=mpp, params=settings.cells)  # warm
    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    tables = {}
    for _ in range(args.repeat):
        for sparse in (True, False):
            t, c = time.perf_counter(), time.process_time()
            table, _ = cells.detect_cells(hema, dab, mpp=mpp, params=settings.cells, mask=tissue,
                                          sparse=sparse)
            wall[sparse].append(time.perf_counter() - t)
            cpu[sparse].append(time.process_time() - c)
            tables[sparse] = table
    n = len(tables[True])
    npos = int(tables[True]["positive"].sum())
    a, b = (tables[k].sort_values(["y_px", "x_px"]).reset_index(drop=True) for k in (True, False))
    same = len(a) == len(b) and all(np.array_equal(a[c].to_numpy(), b[c].to_numpy())
                                    for c in a.columns if c != "cell_id")
    for sparse in (True, False):
        s, c = float(np.median(wall[sparse])), float(np.median(cpu[sparse]))
        print(f"detect_cells ({args.marker} preset, {'sparse' if sparse else 'whole image'}): "
              f"median {s:.2f} s wall ({mpx / s:.1f} Mpx/s, {n / s:,.0f} cells/s), "
              f"{c:.2f} s CPU ({mpx / c:.1f} Mpx/s per CPU-second) over {args.repeat} runs")
    print(f"  {n} cells, {npos} positive; sparse == whole image: {same}; speed-up "
          f"{np.median(wall[False]) / np.median(wall[True]):.2f}x wall, "
          f"{np.median(cpu[False]) / np.median(cpu[True]):.2f}x CPU")
    tracemalloc.start()
    cells.detect_cells(hema, dab, mpp=mpp, params=settings.cells, mask=tissue)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  numpy peak of the sparse detect_cells {peak / 1e6:.0f} MB = "
          f"{peak / (mpx * 1e6):.1f} bytes/px")

    # the measure step of the engine: deconvolution + detection + compartments per cell
    from biopsyquant.score import ImageContext

    ctimes = []
    ccpu = []
    for _ in range(max(1, args.repeat - 1)):
        t, c0 = time.perf_counter(), time.process_time()
        od = deconvolve(rgb, model)
        h = np.ascontiguousarray(od[..., 0])
        d = np.ascontiguousarray(od[..., 1])
        del od
        comp = np.where(tissue, np.uint8(2), np.uint8(0))
        ctx = ImageContext(rgb=rgb, mpp=mpp, size_mpp=mpp, stain_model=model, hema_od=h,
                           dab_od=d, tissue=tissue, excluded=np.zeros_like(tissue),
                           analysed=tissue, fibers=np.zeros(tissue.shape, np.int32),
                           fiber_table=None, compartments=comp, settings=settings)
        cells.measure(ctx)
        ctimes.append(time.perf_counter() - t)
        ccpu.append(time.process_time() - c0)
    s2 = float(np.median(ctimes))
    c2 = float(np.median(ccpu))
    print(f"deconvolve + cells.measure: median {s2:.2f} s wall -> {mpx / s2:.1f} Mpx/s, "
          f"{n / s2:,.0f} cells/s; {c2:.2f} s CPU -> {mpx / c2:.1f} Mpx/s per CPU-second")

    # the cell -> fiber link of cells.measure (fiber_id): ring search vs the whole-image
    # labelled distance transform it replaces (same answer required)
    from biopsyquant import _cells_detect as _d

    r = np.clip(np.rint(tables[True]["y_px"].to_numpy()).astype(np.intp), 0, fib.shape[0] - 1)
    c = np.clip(np.rint(tables[True]["x_px"].to_numpy()).astype(np.intp), 0, fib.shape[1] - 1)
    max_d = settings.cells.cell_max_diameter_um / mpp
    times = {"ring search": [], "whole-image transform": []}
    for _ in range(args.repeat):
        for name, fn in (("ring search", _d.nearest_label_at),
                         ("whole-image transform", _d._nearest_label_transform)):
            t = time.process_time()
            got = fn(fib, r, c, max_d)
            times[name].append(time.process_time() - t)
            if name == "ring search":
                ring = got
            else:
                ok = np.array_equal(ring, got)
    print("nearest fiber of each cell: " + ", ".join(
        f"{k} {1000 * float(np.median(v)):.1f} ms CPU" for k, v in times.items())
        + f" ({len(r)} cells; identical: {ok})")


if __name__ == "__main__":
    main()
