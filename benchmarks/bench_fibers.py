"""Benchmark of fiber segmentation, the fiber table and the compartment map (4096 x 4096).

Run:  .venv/bin/python benchmarks/bench_fibers.py [--size 4096] [--repeat 3] [--mpp 0.5]

The section is a generated MHC-I section (size/2 squared at ``--mpp`` µm/px, JPEG q85) mirrored
2 x 2 to the requested size. Prints, for ``segment_fibers``, ``fiber_table`` (with internal
nuclei) and ``compartment_map``: median seconds and Mpx/s (input pixels), the number of fibers,
and the peak of the Python-side numpy allocations (tracemalloc) in bytes per input pixel. Also
prints the whole-process peak RSS (``ru_maxrss``, includes the generator).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import tracemalloc

import numpy as np


def _section(size: int, mpp: float):
    from biopsyquant.synthetic import generate_section

    half = (size + 1) // 2
    sec = generate_section(marker="MHC-I", seed=7, shape=(half, half), mpp=mpp, jpeg_quality=85)

    def mirror(a):
        top = np.concatenate([a, a[:, ::-1]], axis=1)
        return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0)[:size, :size])

    return mirror(sec.rgb), mirror(sec.tissue), mirror(sec.hema_od), mirror(sec.dab_od)


def _timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(times), peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mpp", type=float, default=0.5)
    args = ap.parse_args()

    from biopsyquant.compartments import compartment_map
    from biopsyquant.fibers import fiber_table, segment_fibers

    t = time.perf_counter()
    rgb, tissue, hema, dab = _section(args.size, args.mpp)
    mpx = rgb.shape[0] * rgb.shape[1] / 1e6
    print(f"section {rgb.shape[1]}x{rgb.shape[0]} at {args.mpp} µm/px generated in "
          f"{time.perf_counter() - t:.1f} s; os.cpu_count()={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")

    s_seg, m_seg, lab = _timed(lambda: segment_fibers(rgb, mpp=args.mpp, tissue=tissue),
                               args.repeat)
    n = int(lab.max())
    s_tab, m_tab, tab = _timed(lambda: fiber_table(lab, mpp=args.mpp, hema_od=hema,
                                                   tissue=tissue), args.repeat)
    s_cmp, m_cmp, _ = _timed(lambda: compartment_map(lab, tissue, mpp=args.mpp, hema_od=hema,
                                                     dab_od=dab), args.repeat)
    px = rgb.shape[0] * rgb.shape[1]
    print(f"{'step':<24}{'s (median)':>12}{'Mpx/s':>10}{'peak B/px':>12}")
    for name, s, m in (("segment_fibers", s_seg, m_seg), ("fiber_table", s_tab, m_tab),
                       ("compartment_map", s_cmp, m_cmp)):
        print(f"{name:<24}{s:>12.2f}{mpx / s:>10.1f}{m / px:>12.1f}")
    tot = s_seg + s_tab + s_cmp
    print(f"{'all three':<24}{tot:>12.2f}{mpx / tot:>10.1f}")
    print(f"fibers: {n} ({n / tot:.0f} fibers/s end to end), table rows {len(tab)}")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
