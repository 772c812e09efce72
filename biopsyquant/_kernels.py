"""Compiled (numba) pixel kernels for colour deconvolution.

Private module: the public entry points are :func:`biopsyquant.stains.deconvolve`,
:func:`~biopsyquant.stains.stain_od`, :func:`~biopsyquant.stains.dab_threshold_counts` and
:func:`~biopsyquant.stains.dab_classes`, which validate their inputs and build the lookup tables.

Every kernel works on a uint8 RGB image with *premultiplied lookup tables*: for stain ``s`` the
concentration of a pixel ``(R, G, B)`` is ``lut[0, R, s] + lut[1, G, s] + lut[2, B, s]`` where
``lut[c, v, s] = OD_c(v) * inverse[c, s]`` (float32) — three table look-ups and two additions per
stain and pixel, no logarithm and no float image in between.

Each kernel exists twice: a ``*_par`` version that spreads rows over numba's threads and a
``*_ser`` version for small images and for calls made while another thread is already inside a
parallel kernel (see :func:`run`).  They are separate Python functions (not one function jitted
twice) so that numba's on-disk cache (``cache=True``) keeps them apart.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

__all__ = [
    "deconvolve_into",
    "stain_into",
    "threshold_counts",
    "threshold_classes",
]

#: Images smaller than this (pixels) run on one thread: thread start-up costs more than it saves.
PARALLEL_MIN_PIXELS = 65_536

_PARALLEL_LOCK = threading.Lock()

_JIT = {"fastmath": False, "cache": True, "nogil": True}


# --------------------------------------------------------------------------------------------
# row functions (inlined into the drivers below)
# --------------------------------------------------------------------------------------------
@njit(**_JIT)
def _deconvolve_row(rgb, lut, out, i):
    for j in range(rgb.shape[1]):
        r = rgb[i, j, 0]
        g = rgb[i, j, 1]
        b = rgb[i, j, 2]
        # unrolled over the 3 stains: ~1.35x faster than an inner loop (numba vectorises it)
        out[i, j, 0] = lut[0, r, 0] + lut[1, g, 0] + lut[2, b, 0]
        out[i, j, 1] = lut[0, r, 1] + lut[1, g, 1] + lut[2, b, 1]
        out[i, j, 2] = lut[0, r, 2] + lut[1, g, 2] + lut[2, b, 2]


@njit(**_JIT)
def _stain_row(rgb, lut1, out, i):
    for j in range(rgb.shape[1]):
        out[i, j] = lut1[0, rgb[i, j, 0]] + lut1[1, rgb[i, j, 1]] + lut1[2, rgb[i, j, 2]]


@njit(**_JIT)
def _counts_row(rgb, lut1, thresholds, mask, use_mask, counts, sums, i):
    # general number of thresholds (> 3): one loop, fixed-point sums like _counts3_row
    nt = thresholds.shape[0]
    sc = np.float32(OD_SUM_SCALE)
    for j in range(rgb.shape[1]):
        if use_mask and not mask[i, j]:
            continue
        v = lut1[0, rgb[i, j, 0]] + lut1[1, rgb[i, j, 1]] + lut1[2, rgb[i, j, 2]]
        c = 0
        for k in range(nt):
            if v >= thresholds[k]:
                c += 1
        counts[i, c] += 1
        sums[i, c] += np.int64(np.rint(v * sc))


@njit(**_JIT)
def _classes_row(rgb, lut1, thresholds, mask, use_mask, outside, out, i):
    nt = thresholds.shape[0]
    for j in range(rgb.shape[1]):
        if use_mask and not mask[i, j]:
            out[i, j] = outside
            continue
        v = lut1[0, rgb[i, j, 0]] + lut1[1, rgb[i, j, 1]] + lut1[2, rgb[i, j, 2]]
        c = 0
        for k in range(nt):
            if v >= thresholds[k]:
                c += 1
        out[i, j] = c


#: OD sums of the counting kernels are accumulated as integers in units of 2**-20 OD
#: (each pixel's OD rounded to ~1e-6): exact, order-independent and exactly additive over tiles.
OD_SUM_SCALE = 2.0**20


@njit(**_JIT)
def _counts3_row(rgb, lut1, t0, t1, t2, mask, use_mask, counts, sums, i):
    # pass 1: stain OD of the row's (masked) pixels into a small buffer (scalar look-ups);
    # pass 2: branch-free class counts and fixed-point sums over the contiguous buffer, which
    # LLVM vectorises (no gathers).  Up to ~2x faster than one fused loop with a
    # read-modify-write of per-class counters.
    w = rgb.shape[1]
    buf = np.empty(w, np.float32)
    m = 0
    for j in range(w):
        if use_mask and not mask[i, j]:
            continue
        buf[m] = lut1[0, rgb[i, j, 0]] + lut1[1, rgb[i, j, 1]] + lut1[2, rgb[i, j, 2]]
        m += 1
    sc = np.float32(OD_SUM_SCALE)
    n0 = 0
    n1 = 0
    n2 = 0
    s = 0
    s0 = 0
    s1 = 0
    s2 = 0
    for j in range(m):
        v = buf[j]
        q = np.int64(np.rint(v * sc))
        b0 = np.int64(v >= t0)
        b1 = np.int64(v >= t1)
        b2 = np.int64(v >= t2)
        n0 += b0
        n1 += b1
        n2 += b2
        s += q
        s0 += q * b0
        s1 += q * b1
        s2 += q * b2
    counts[i, 0] = m - n0
    counts[i, 1] = n0 - n1
    counts[i, 2] = n1 - n2
    counts[i, 3] = n2
    sums[i, 0] = s - s0
    sums[i, 1] = s0 - s1
    sums[i, 2] = s1 - s2
    sums[i, 3] = s2


@njit(**_JIT)
def _classes3_row(rgb, lut1, t0, t1, t2, mask, use_mask, outside, out, i):
    for j in range(rgb.shape[1]):
        if use_mask and not mask[i, j]:
            out[i, j] = outside
            continue
        v = lut1[0, rgb[i, j, 0]] + lut1[1, rgb[i, j, 1]] + lut1[2, rgb[i, j, 2]]
        out[i, j] = np.uint8(v >= t0) + np.uint8(v >= t1) + np.uint8(v >= t2)


# --------------------------------------------------------------------------------------------
# drivers: parallel over rows / serial
# --------------------------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def _deconvolve_par(rgb, lut, out):
    for i in prange(rgb.shape[0]):
        _deconvolve_row(rgb, lut, out, i)


@njit(**_JIT)
def _deconvolve_ser(rgb, lut, out):
    for i in range(rgb.shape[0]):
        _deconvolve_row(rgb, lut, out, i)


@njit(parallel=True, **_JIT)
def _stain_par(rgb, lut1, out):
    for i in prange(rgb.shape[0]):
        _stain_row(rgb, lut1, out, i)


@njit(**_JIT)
def _stain_ser(rgb, lut1, out):
    for i in range(rgb.shape[0]):
        _stain_row(rgb, lut1, out, i)


@njit(parallel=True, **_JIT)
def _counts_par(rgb, lut1, thresholds, mask, use_mask, counts, sums):
    for i in prange(rgb.shape[0]):
        _counts_row(rgb, lut1, thresholds, mask, use_mask, counts, sums, i)


@njit(**_JIT)
def _counts_ser(rgb, lut1, thresholds, mask, use_mask, counts, sums):
    for i in range(rgb.shape[0]):
        _counts_row(rgb, lut1, thresholds, mask, use_mask, counts, sums, i)


@njit(parallel=True, **_JIT)
def _classes_par(rgb, lut1, thresholds, mask, use_mask, outside, out):
    for i in prange(rgb.shape[0]):
        _classes_row(rgb, lut1, thresholds, mask, use_mask, outside, out, i)


@njit(**_JIT)
def _classes_ser(rgb, lut1, thresholds, mask, use_mask, outside, out):
    for i in range(rgb.shape[0]):
        _classes_row(rgb, lut1, thresholds, mask, use_mask, outside, out, i)


@njit(parallel=True, **_JIT)
def _counts3_par(rgb, lut1, t0, t1, t2, mask, use_mask, counts, sums):
    for i in prange(rgb.shape[0]):
        _counts3_row(rgb, lut1, t0, t1, t2, mask, use_mask, counts, sums, i)


@njit(**_JIT)
def _counts3_ser(rgb, lut1, t0, t1, t2, mask, use_mask, counts, sums):
    for i in range(rgb.shape[0]):
        _counts3_row(rgb, lut1, t0, t1, t2, mask, use_mask, counts, sums, i)


@njit(parallel=True, **_JIT)
def _classes3_par(rgb, lut1, t0, t1, t2, mask, use_mask, outside, out):
    for i in prange(rgb.shape[0]):
        _classes3_row(rgb, lut1, t0, t1, t2, mask, use_mask, outside, out, i)


@njit(**_JIT)
def _classes3_ser(rgb, lut1, t0, t1, t2, mask, use_mask, outside, out):
    for i in range(rgb.shape[0]):
        _classes3_row(rgb, lut1, t0, t1, t2, mask, use_mask, outside, out, i)


def run(par, ser, n_pixels: int, *args, parallel: bool | None = None) -> None:
    """Call the parallel kernel ``par`` or the serial kernel ``ser`` with ``args``.

    The parallel kernel is used for images of at least :data:`PARALLEL_MIN_PIXELS` pixels when
    no other Python thread is inside a parallel kernel at the moment; otherwise the serial one
    runs.  This keeps concurrent callers (thread pools, dask threaded workers) from launching
    nested or concurrent parallel regions — which oversubscribe the cores with OpenMP and abort
    the process with numba's ``workqueue`` threading layer — while a single caller still uses
    every core.  ``parallel=True``/``False`` forces the choice (``True`` still waits for the
    lock rather than running two parallel kernels at once).
    """
    if parallel is False or (parallel is None and n_pixels < PARALLEL_MIN_PIXELS):
        ser(*args)
        return
    if _PARALLEL_LOCK.acquire(blocking=parallel is True):
        try:
            par(*args)
        finally:
            _PARALLEL_LOCK.release()
    else:
        ser(*args)


# --------------------------------------------------------------------------------------------
# thin typed wrappers used by stains.py (inputs already validated there)
# --------------------------------------------------------------------------------------------
_NO_MASK = np.ones((1, 1), dtype=np.bool_)


def deconvolve_into(rgb: np.ndarray, lut: np.ndarray, out: np.ndarray, *, parallel=None) -> None:
    """``out[..., s] = sum_c lut[c, rgb[..., c], s]``; lut float32 (3, 256, 3), out float32 (H, W, 3)."""
    run(_deconvolve_par, _deconvolve_ser, rgb.shape[0] * rgb.shape[1], rgb, lut, out,
        parallel=parallel)


def stain_into(rgb: np.ndarray, lut1: np.ndarray, out: np.ndarray, *, parallel=None) -> None:
    """``out = sum_c lut1[c, rgb[..., c]]``; lut1 float32 (3, 256), out float32 (H, W)."""
    run(_stain_par, _stain_ser, rgb.shape[0] * rgb.shape[1], rgb, lut1, out, parallel=parallel)


def _three(thresholds: np.ndarray) -> tuple:
    """Up to three float32 thresholds as scalars, padded with +inf (never reached)."""
    t = [np.float32(x) for x in thresholds] + [np.float32(np.inf)] * (3 - thresholds.shape[0])
    return tuple(t)


def threshold_counts(rgb: np.ndarray, lut1: np.ndarray, thresholds: np.ndarray,
                     mask: np.ndarray | None, *, parallel=None) -> tuple[np.ndarray, np.ndarray]:
    """Class counts (int64, k+1) and OD sums per class (float64, k+1) for k thresholds.

    ``thresholds`` is a float32 array (compared with the float32 OD); up to three thresholds
    use a kernel with scalar thresholds, more use a loop over the array.  Sums are exact
    integer sums of each pixel's OD rounded to 2**-20 OD, returned in OD units.
    """
    h = rgb.shape[0]
    nt = thresholds.shape[0]
    use_mask = mask is not None
    m = mask if use_mask else _NO_MASK
    nc = 4 if nt <= 3 else nt + 1
    counts = np.zeros((h, nc), np.int64)
    sums = np.zeros((h, nc), np.int64)
    if nt <= 3:
        run(_counts3_par, _counts3_ser, h * rgb.shape[1], rgb, lut1, *_three(thresholds), m,
            use_mask, counts, sums, parallel=parallel)
    else:
        run(_counts_par, _counts_ser, h * rgb.shape[1], rgb, lut1, thresholds, m, use_mask,
            counts, sums, parallel=parallel)
    total = sums.sum(axis=0)[: nt + 1]
    return counts.sum(axis=0)[: nt + 1], total.astype(np.float64) / OD_SUM_SCALE


def threshold_classes(rgb: np.ndarray, lut1: np.ndarray, thresholds: np.ndarray,
                      mask: np.ndarray | None, outside: int, out: np.ndarray, *,
                      parallel=None) -> None:
    """uint8 class image: number of thresholds ``<=`` the stain OD; ``outside`` where mask False."""
    use_mask = mask is not None
    m = mask if use_mask else _NO_MASK
    n = rgb.shape[0] * rgb.shape[1]
    if thresholds.shape[0] <= 3:
        run(_classes3_par, _classes3_ser, n, rgb, lut1, *_three(thresholds), m, use_mask,
            np.uint8(outside), out, parallel=parallel)
    else:
        run(_classes_par, _classes_ser, n, rgb, lut1, thresholds, m, use_mask,
            np.uint8(outside), out, parallel=parallel)
