"""Speed and peak memory of ``biopsyquant.synthetic.generate_section``.

Usage: ``python benchmarks/bench_synthetic.py [side ...]`` (default sides 1024 2048 4096).
Each size runs in a fresh subprocess (so peak RSS is per size) after a 256-px warm-up that
compiles the numba kernels; prints seconds, Mpx/s and peak resident memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
from biopsyquant.synthetic import generate_section
side, marker = int(sys.argv[1]), sys.argv[2]
generate_section(marker=marker, seed=0, shape=(256, 256))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
s = generate_section(marker=marker, seed=0, shape=(side, side), jpeg_quality=85)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"side": side, "marker": marker, "seconds": dt,
                  "mpx_per_s": side * side / 1e6 / dt, "peak_rss_mb": peak / 1024,
                  "n_fibers": s.summary["n_fibers"], "n_cells": len(s.cells)}))
"""


def main(argv: list[str]) -> int:
    sides = [int(a) for a in argv[1:]] or [1024, 2048, 4096]
    print(f"{'side':>6} {'marker':>7} {'s':>7} {'Mpx/s':>7} {'peak MB':>8} {'fibers':>7} {'cells':>7}")
    for side in sides:
        for marker in ("CD163", "MHC-I"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(side), marker],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['side']:>6} {r['marker']:>7} {r['seconds']:7.2f} {r['mpx_per_s']:7.2f} "
                  f"{r['peak_rss_mb']:8.0f} {r['n_fibers']:7d} {r['n_cells']:7d}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
