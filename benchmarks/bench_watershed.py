"""Benchmark: compiled watershed (biopsyquant._watershed) vs skimage.segmentation.watershed.

Two realistic 2048 x 2048 inputs shaped like the two watersheds of the fiber segmentation:

* ``distance``: a Voronoi-like image of ~2,000 touching blobs (fibers) separated by 3-px
  gaps; relief = minus the smoothed distance transform, markers = its plateau maxima
  (connected components), mask = the blobs (``fibers.py`` step 2).
* ``gradient``: gradient magnitude of a smoothed, noisy version of the same blobs; markers =
  the eroded blobs (~2,000 labels, ~55 % of the pixels) plus a background seed, mask = pixels
  within 12 px of a blob (``fibers.py`` step 3).

Prints Mpx/s (image pixels / wall time, single thread; best of ``--repeat`` runs for the
compiled version, one run for scikit-image), whether the labels are identical, and the peak
extra resident memory of each implementation (measured in a child process from VmHWM after
resetting it via /proc/self/clear_refs after malloc_trim).

Usage: ``python benchmarks/bench_watershed.py [--size 2048] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import cv2
import numpy as np
from scipy import ndimage as ndi


def make_inputs(size: int, n_blobs: int = 2000, seed: int = 0) -> dict[str, tuple]:
    """The two benchmark cases as ``{name: (image, markers, mask)}``."""
    rng = np.random.default_rng(seed)
    pts = np.zeros((size, size), bool)
    pts[rng.integers(0, size, n_blobs), rng.integers(0, size, n_blobs)] = True
    _, (iy, ix) = ndi.distance_transform_edt(~pts, return_indices=True)
    vor = (iy * size + ix).astype(np.int64)
    # gaps between cells: pixels whose 3x3 neighbourhood has another cell
    edge = (ndi.maximum_filter(vor, 3) != ndi.minimum_filter(vor, 3))
    core = ~ndi.binary_dilation(edge, iterations=1)
    dist = cv2.distanceTransform(core.astype(np.uint8), cv2.DIST_L2, 5)
    dsm = cv2.GaussianBlur(dist, (0, 0), 1.0)
    peaks = core & (dsm >= cv2.dilate(dsm, np.ones((3, 3), np.uint8))) & (dsm > 0.5)
    _, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
    cases = {"distance": (-dsm, markers.astype(np.int32), core)}

    img = core.astype(np.float32) * 0.6 + rng.normal(0, 0.05, core.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    grad = np.sqrt(gx * gx + gy * gy)
    _, cell_lab = cv2.connectedComponents(core.astype(np.uint8), connectivity=4)
    seeds = np.where(ndi.binary_erosion(core, iterations=4), cell_lab, 0).astype(np.int32)
    near = cv2.distanceTransform((seeds == 0).astype(np.uint8), cv2.DIST_L2, 5)
    region = near <= 12
    seeds[(near > 10) & region] = seeds.max() + 1
    cases["gradient"] = (grad, seeds, region)
    return cases


def _child(case: str, impl: str, size: int) -> None:
    """Run one implementation once in this process and print its peak extra RSS (bytes)."""
    inputs = make_inputs(size)[case]
    if impl == "biopsyquant":
        from biopsyquant._watershed import watershed
        watershed(inputs[0][:64, :64], inputs[1][:64, :64], mask=inputs[2][:64, :64])  # compile
    else:
        from skimage.segmentation import watershed
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so new allocations show in RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    watershed(inputs[0], inputs[1], mask=inputs[2])
    print(json.dumps({"peak": _status("VmHWM") - base}))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _peak(case: str, impl: str, size: int) -> float:
    try:
        res = subprocess.run([sys.executable, __file__, "--child", case, impl, "--size", str(size)],
                             capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak"] / 2**20
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError):
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"))
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.size)
        return

    from skimage.segmentation import watershed as sk_watershed

    from biopsyquant import _watershed as ws

    cases = make_inputs(args.size)
    for method in ("auto", "exact"):  # compile / load the cache
        ws.watershed(np.zeros((8, 8), np.float32), np.eye(8, dtype=np.int32), method=method)
    mpx = args.size * args.size / 1e6
    print(f"{args.size}x{args.size} = {mpx:.2f} Mpx; Mpx/s = image pixels / time, wall clock and "
          "process CPU time (CPU time is less distorted by other processes)")

    def timed(fn, args, kwargs, repeat):
        best_w = best_c = float("inf")
        out = None
        for _ in range(repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn(*args, **kwargs)
            best_w = min(best_w, time.perf_counter() - t0)
            best_c = min(best_c, time.process_time() - c0)
        return out, best_w, best_c

    for name, (img, mk, mask) in cases.items():
        print(f"\n[{name}] markers: {int((mk > 0).sum())} px, {len(np.unique(mk)) - 1} labels; "
              f"mask {100 * mask.mean():.1f} %")
        ref, w_sk, c_sk = timed(sk_watershed, (img, mk), {"mask": mask}, 1)
        fast, w_f, c_f = timed(ws.watershed, (img, mk), {"mask": mask}, args.repeat)
        exact, w_e, c_e = timed(ws.watershed, (img, mk), {"mask": mask, "method": "exact"}, 1)
        print(f"  skimage            {mpx / w_sk:6.1f} Mpx/s wall {mpx / c_sk:6.1f} Mpx/s cpu")
        print(f"  biopsyquant fast   {mpx / w_f:6.1f} Mpx/s wall {mpx / c_f:6.1f} Mpx/s cpu "
              f"({c_sk / c_f:.1f}x cpu)  equal: {np.array_equal(ref, fast)}, "
              f"{int((ref != fast).sum())} px differ, agreement {100 * (ref == fast).mean():.4f} %, "
              f"same label set: {np.array_equal(np.unique(ref), np.unique(fast))}")
        print(f"  biopsyquant exact  {mpx / w_e:6.1f} Mpx/s wall {mpx / c_e:6.1f} Mpx/s cpu "
              f"({c_sk / c_e:.1f}x cpu)  equal: {np.array_equal(ref, exact)}")
        if not args.no_memory:
            print(f"  peak extra RSS: skimage {_peak(name, 'skimage', args.size):.0f} MiB, "
                  f"biopsyquant fast {_peak(name, 'biopsyquant', args.size):.0f} MiB")


if __name__ == "__main__":
    main()
