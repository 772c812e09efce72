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
resetting it via /proc/self/clear_refs).

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
    ws.watershed(np.zeros((8, 8), np.float32), np.eye(8, dtype=np.int32))  # compile / load cache
    mpx = args.size * args.size / 1e6
    print(f"{args.size}x{args.size} = {mpx:.2f} Mpx, numba threads irrelevant (serial kernels)")
    print(f"{'case':10s} {'markers':>8s} {'labels':>7s} {'mask%':>6s} {'skimage':>14s} "
          f"{'biopsyquant':>16s} {'speed-up':>8s} {'equal':>6s} {'path':>7s} {'peak MiB sk/bq':>15s}")
    for name, (img, mk, mask) in cases.items():
        t0 = time.perf_counter()
        ref = sk_watershed(img, mk, mask=mask)
        t_sk = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            got = ws.watershed(img, mk, mask=mask)
            times.append(time.perf_counter() - t0)
        t_bq = min(times)
        flat_img = np.ascontiguousarray(img, np.float32).ravel()
        out = (mk * mask).astype(np.int32).ravel()
        tie = ws._cross_label_ties(flat_img, out, mask.ravel(), True, *img.shape, ws._DR4, ws._DC4)
        if args.no_memory:
            mem = "-"
        else:
            mem = f"{_peak(name, 'skimage', args.size):.0f}/{_peak(name, 'biopsyquant', args.size):.0f}"
        print(f"{name:10s} {int((mk > 0).sum()):8d} {len(np.unique(mk)) - 1:7d} {100 * mask.mean():6.1f} "
              f"{mpx / t_sk:7.1f} Mpx/s  {mpx / t_bq:8.1f} Mpx/s  {t_sk / t_bq:7.1f}x "
              f"{str(np.array_equal(ref, got)):>6s} {'heap' if tie else 'bucket':>7s} {mem:>15s}")
        t0 = time.perf_counter()
        ws.watershed(img, mk, mask=mask, method="heap")
        t_h = time.perf_counter() - t0
        print(f"{'':10s} (exact-heap fallback on the same input: {mpx / t_h:.1f} Mpx/s)")


if __name__ == "__main__":
    main()
