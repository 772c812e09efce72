"""Compiled marker-based watershed reproducing ``skimage.segmentation.watershed``.

Private module: the fiber segmentation calls :func:`watershed` in place of
``skimage.segmentation.watershed(image, markers, mask=mask, connectivity=connectivity)``
(``compactness=0``, ``watershed_line=False``).

How scikit-image floods (version 0.26, ``_watershed_cy.pyx``)
--------------------------------------------------------------
* Every marker pixel (``markers * mask != 0``) is pushed onto a binary min-heap, in raveled
  order, with key ``(image value, age 0)``.
* A popped pixel visits its neighbours in the order ``up, left, right, down`` (then, for
  ``connectivity=2``, ``up-left, up-right, down-left, down-right``).  Each neighbour that is
  inside the image and the mask and still unlabelled takes the popped pixel's label *at once*,
  the global age counter is incremented and the neighbour is pushed with key
  ``(max(image[neighbour], popped value), age)``.
* So every pixel is pushed at most once, pushed keys are never smaller than the popped key
  (a *monotone* priority queue), and all keys are distinct except the ``age 0`` keys of markers
  that share an image value.  Among those, the pop order is whatever the binary heap's layout
  gives.

Implementations
---------------
``_flood_packed`` (default for images that float32 holds exactly -- float32, 8/16-bit
integers, float64 / wider integers whose values fit): one int64 per padded pixel packs the
*order key* of the float32 value (its bits made sortable as a signed integer, -0.0 mapped to
+0.0; high 32 bits) and the label (low 32 bits), so the "labelled?" test and the value read
share one cache line.  Pushed pixels wait in a *bucket queue*: the key range is cut into at
most ``2**BUCKET_BITS`` buckets by ``(key - kmin) >> shift``.  A pixel waiting in a *later*
bucket was not clamped, so its bucket is that of its own key: a counting pass gives every
bucket a fixed slice of one pool array, filled in push (= age) order.  Only the current bucket
is ordered exactly: its slice is sorted stably by key (insertion sort, or an LSD radix sort
for long slices), pixels pushed into the current bucket above the current value go to a small
binary heap on ``key << 32 | age``, and pixels pushed at exactly the current value (equal or
clamped) to a FIFO -- they are younger than every other item of that value.  The next pixel is
the smallest of (slice head, heap top), unless that is above the current value and the FIFO
is not empty.  ``_flood_bucket`` is the same algorithm on separate float64 value / int32 label
arrays, for images float32 cannot hold exactly.

Because all keys are distinct except the ``age 0`` keys of markers, this reproduces
scikit-image's pop order exactly, with one exception: markers that share an image value are
taken in raveled order instead of heap order.  Their order cannot change the result when they
carry the *same* label (a run of pops of one label at one key value only permutes ages inside
a block that no other label shares), so the result is identical to scikit-image's unless two
*different* labels have *active* marker pixels (marker pixels with an unlabelled neighbour in
the mask) at exactly the same image value.  Then a few pixels on equal-value plateaus between
those markers may go to the other label (e.g. 14 of 4.2 million pixels on the benchmark's
distance-transform input; the labelled set and the label set are always the same).

``method="exact"`` checks for such ties first and, if there are any, runs
``_flood_heap_packed`` / ``_flood_heap``: a faithful port of scikit-image's binary heap (same
push and pop steps, same tie rules), which reproduces the heap-dependent order too.

Memory (fast path): the packed state (8 bytes per padded pixel), the pool (8 bytes per mask
pixel), the int32 result, and a sort buffer / heap / FIFO of which only the touched pages are
mapped -- about 20-28 bytes per pixel; see ``docs/_parts/watershed-performance.md``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .errors import InputError

__all__ = ["watershed"]

_JIT = {"fastmath": False, "cache": True, "nogil": True}

#: Largest number of buckets of the float64 bucket path (the table costs 8 bytes per bucket).
MAX_BUCKETS = 1 << 18

#: The packed float32 path cuts the key range into at most 2**BUCKET_BITS buckets.
BUCKET_BITS = 14


#: How many pixels ahead of the flood the fast path prefetches (cache lines of 3 rows each).
PREFETCH_AHEAD = 12


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to load ``arr[idx]`` into cache (LLVM ``llvm.prefetch``; no effect on results)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False, boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        # read access, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


#: Label of padding and of pixels outside the mask while flooding ("never flood").
_SENT = np.iinfo(np.int32).min


# --------------------------------------------------------------------------------------------
# preparation: pad by one pixel so that no neighbour test needs a bounds check
# --------------------------------------------------------------------------------------------
@njit(**_JIT)
def _prepare(img, mk, mask, use_mask, pim, pout):
    """Fill the padded image/labels; return (min, max, status) over the mask.

    status: 0 ok, 1 a non-finite value inside the mask, 2 a marker equal to the sentinel.
    """
    h, w = img.shape
    sent = np.int32(_SENT)
    for j in range(w + 2):
        pim[0, j] = 0
        pim[h + 1, j] = 0
        pout[0, j] = sent
        pout[h + 1, j] = sent
    lo = np.inf
    hi = -np.inf
    status = 0
    for i in range(h):
        pim[i + 1, 0] = 0
        pim[i + 1, w + 1] = 0
        pout[i + 1, 0] = sent
        pout[i + 1, w + 1] = sent
        for j in range(w):
            v = img[i, j]
            pim[i + 1, j + 1] = v
            if use_mask and not mask[i, j]:
                pout[i + 1, j + 1] = sent
                continue
            lab = mk[i, j]
            if lab == sent:
                status = 2
            pout[i + 1, j + 1] = lab
            fv = np.float64(v)
            if not np.isfinite(fv):
                status = 1
            if fv < lo:
                lo = fv
            if fv > hi:
                hi = fv
    return lo, hi, status


@njit(**_JIT)
def _finish(pout, res):
    h, w = res.shape
    sent = np.int32(_SENT)
    for i in range(h):
        for j in range(w):
            v = pout[i + 1, j + 1]
            res[i, j] = 0 if v == sent else v


@njit(**_JIT)
def _is_active(p, out, off):
    for k in range(off.shape[0]):
        if out[p + off[k]] == 0:
            return True
    return False


@njit(**_JIT)
def _cross_label_ties(img, out, off):
    """True if two different labels have active marker pixels of exactly equal value.

    Active: the marker pixel has an unlabelled neighbour, i.e. it will push something.
    """
    n = img.shape[0]
    sent = np.int32(_SENT)
    cnt = 0
    for p in range(n):
        if out[p] != 0 and out[p] != sent and _is_active(p, out, off):
            cnt += 1
    vals = np.empty(cnt, img.dtype)
    labs = np.empty(cnt, np.int32)
    j = 0
    for p in range(n):
        if out[p] != 0 and out[p] != sent and _is_active(p, out, off):
            vals[j] = img[p]
            labs[j] = out[p]
            j += 1
    order = np.argsort(vals)
    k0 = 0  # first index (in sorted order) of the current run of equal values
    for i in range(1, cnt):
        if vals[order[i]] != vals[order[k0]]:
            k0 = i
        elif labs[order[i]] != labs[order[k0]]:
            return True
    return False


# --------------------------------------------------------------------------------------------
# fast path: bucket queue with an exactly ordered current bucket
# --------------------------------------------------------------------------------------------
@njit(**_JIT)
def _bucket_of(v, half_lo, scale, nbm1):
    b = int((np.float64(v) * 0.5 - half_lo) * scale)
    return b if b < nbm1 else nbm1


@njit(**_JIT)
def _sort_run(pool, img, i0, i1):
    """Stable sort of ``pool[i0:i1]`` by image value (the run is in age order)."""
    if i1 - i0 <= 48:
        for i in range(i0 + 1, i1):
            x = pool[i]
            xv = img[x]
            j = i - 1
            while j >= i0 and img[pool[j]] > xv:
                pool[j + 1] = pool[j]
                j -= 1
            pool[j + 1] = x
        return
    # already sorted (e.g. one value per bucket for integer images)?
    srt = True
    for i in range(i0 + 1, i1):
        if img[pool[i]] < img[pool[i - 1]]:
            srt = False
            break
    if srt:
        return
    seg = pool[i0:i1].copy()
    vals = np.empty(i1 - i0, img.dtype)
    for i in range(i1 - i0):
        vals[i] = img[seg[i]]
    order = np.argsort(vals, kind="mergesort")
    for i in range(i1 - i0):
        pool[i0 + i] = seg[order[i]]


@njit(**_JIT)
def _flood_bucket(img, out, off, nb, lo, hi):
    n = img.shape[0]
    nn = off.shape[0]
    sent = np.int32(_SENT)
    # monotone bucket map b(v) = floor((v/2 - lo/2) * scale); halves keep huge ranges finite
    half_lo = lo * 0.5
    span = hi * 0.5 - half_lo
    scale = (nb - 1) / span if span > 0.0 else 0.0
    nbm1 = nb - 1

    # A pixel that waits in a *later* bucket was not clamped, so its bucket is that of its own
    # value: count pixels per bucket and give each bucket a fixed slice of one pool array.
    start = np.zeros(nb + 1, np.int32)
    for p in range(n):
        if out[p] != sent:
            start[_bucket_of(img[p], half_lo, scale, nbm1) + 1] += 1
    for b in range(nb):
        start[b + 1] += start[b]
    fill = start[:nb].copy()
    pool = np.empty(max(start[nb], 1), np.int32)

    # markers that have something to flood, in raveled order (age 0)
    for p in range(n):
        if out[p] != 0 and out[p] != sent and _is_active(p, out, off):
            b = _bucket_of(img[p], half_lo, scale, nbm1)
            pool[fill[b]] = p
            fill[b] += 1

    # heap of pixels pushed into the current bucket above the current value; every pixel
    # enters at most once and np.empty maps only the pages that are written
    hv = np.empty(n, img.dtype)
    ha = np.empty(n, np.int32)
    hp = np.empty(n, np.int32)
    hn = 0
    age = 0
    fq = np.empty(n, np.int32)  # FIFO of pixels pushed at exactly the current value
    fh = 0
    ft = 0
    li = 0  # sorted run of the current bucket: pool[li:le]
    le = 0
    cb = -1
    cur = img[0]

    while True:
        # ---- next pixel: smallest (value, age) ----
        src = 0  # 1: run, 2: heap, 3: FIFO
        cv = cur
        if li < le:
            src = 1
            cv = img[pool[li]]
            if hn > 0 and hv[0] < cv:  # equal values: the run's pixel is older
                src = 2
                cv = hv[0]
        elif hn > 0:
            src = 2
            cv = hv[0]
        if src != 0 and cv == cur:
            pass
        elif fh < ft:
            src = 3
        elif src != 0:
            cur = cv
        else:
            # current bucket exhausted: open the next non-empty one
            cb += 1
            while cb < nb and fill[cb] == start[cb]:
                cb += 1
            if cb >= nb:
                break
            li = start[cb]
            le = fill[cb]
            _sort_run(pool, img, li, le)
            continue

        if src == 1:
            p = pool[li]
            li += 1
        elif src == 2:
            p = hp[0]
            hn -= 1
            if hn > 0:
                # sift the last item down from the root
                v = hv[hn]
                a = ha[hn]
                pp = hp[hn]
                i = 0
                while True:
                    lc = 2 * i + 1
                    if lc >= hn:
                        break
                    rc = lc + 1
                    m = lc
                    if rc < hn and (hv[rc] < hv[lc] or (hv[rc] == hv[lc] and ha[rc] < ha[lc])):
                        m = rc
                    if hv[m] < v or (hv[m] == v and ha[m] < a):
                        hv[i] = hv[m]
                        ha[i] = ha[m]
                        hp[i] = hp[m]
                        i = m
                    else:
                        break
                hv[i] = v
                ha[i] = a
                hp[i] = pp
        else:
            p = fq[fh]
            fh += 1
            if fh == ft:
                fh = 0
                ft = 0

        # ---- flood the unlabelled neighbours of p ----
        lab = out[p]
        for k in range(nn):
            q = p + off[k]
            if out[q] != 0:  # labelled, padding or outside the mask
                continue
            out[q] = lab
            v = img[q]
            if v <= cur:  # clamped to (or equal to) the current value: youngest of that value
                fq[ft] = q
                ft += 1
                continue
            b = _bucket_of(v, half_lo, scale, nbm1)
            if b != cb:
                pool[fill[b]] = q
                fill[b] += 1
                continue
            # same bucket, larger value: heap (its age is the largest so far, so a push
            # only passes parents of strictly larger value)
            i = hn
            hn += 1
            while i > 0:
                par = (i - 1) >> 1
                if v < hv[par]:
                    hv[i] = hv[par]
                    ha[i] = ha[par]
                    hp[i] = hp[par]
                    i = par
                else:
                    break
            hv[i] = v
            ha[i] = age
            hp[i] = q
            age += 1


# --------------------------------------------------------------------------------------------
# fastest path for float32-exact images: value key and label packed in one int64 per pixel
# --------------------------------------------------------------------------------------------
_LOW = 0xFFFFFFFF


@njit(**_JIT)
def _prepare_packed(bits, mk, mask, use_mask, st):
    """Fill the padded packed state ``st``: high 32 bits = order key of the float32 value
    (``bits`` is the image viewed as int32), low 32 bits = label (the sentinel for padding
    and outside the mask).  Keys compare like the floats: -0.0 is mapped to +0.0.

    Returns (min key, max key, status) over the mask; status as in :func:`_prepare`.
    """
    h, w = bits.shape
    sent_low = np.int64(_SENT) & _LOW
    for j in range(w + 2):
        st[0, j] = sent_low
        st[h + 1, j] = sent_low
    kmin = np.int64(2**31)
    kmax = -np.int64(2**31) - 1
    status = 0
    for i in range(h):
        st[i + 1, 0] = sent_low
        st[i + 1, w + 1] = sent_low
        for j in range(w):
            if use_mask and not mask[i, j]:
                st[i + 1, j + 1] = sent_low
                continue
            b = np.int64(bits[i, j])
            if (b & 0x7F800000) == 0x7F800000:  # exponent all ones: inf or NaN
                status = 1
            if b == -(2**31):  # -0.0
                b = 0
            key = b if b >= 0 else b ^ 0x7FFFFFFF
            lab = mk[i, j]
            if lab == _SENT:
                status = 2
            st[i + 1, j + 1] = (key << 32) | (np.int64(lab) & _LOW)
            if key < kmin:
                kmin = key
            if key > kmax:
                kmax = key
    return kmin, kmax, status


@njit(**_JIT)
def _finish_packed(st, res):
    h, w = res.shape
    sent = np.int32(_SENT)
    for i in range(h):
        for j in range(w):
            lab = np.int32(np.uint32(st[i + 1, j + 1] & _LOW))
            res[i, j] = 0 if lab == sent else lab


@njit(**_JIT)
def _sort_run_packed(pool, i0, i1, base, shift, tmp):
    """Stable sort of ``pool[i0:i1]`` (key << 32 | pixel, in age order) by key.

    All keys lie in ``[base, base + 2**shift)``: long runs get a stable LSD radix sort on
    the 8-bit digits of ``key - base`` (passes whose digit is constant are skipped).
    """
    k = i1 - i0
    if k <= 48:
        for i in range(i0 + 1, i1):
            x = pool[i]
            xk = x >> 32
            j = i - 1
            while j >= i0 and (pool[j] >> 32) > xk:
                pool[j + 1] = pool[j]
                j -= 1
            pool[j + 1] = x
        return
    srt = True
    for i in range(i0 + 1, i1):
        if (pool[i] >> 32) < (pool[i - 1] >> 32):
            srt = False
            break
    if srt:
        return
    cnt = np.empty(256, np.int64)
    src_is_pool = True
    for dshift in range(0, shift, 8):
        cnt[:] = 0
        if src_is_pool:
            for i in range(i0, i1):
                cnt[(((pool[i] >> 32) - base) >> dshift) & 255] += 1
        else:
            for i in range(k):
                cnt[(((tmp[i] >> 32) - base) >> dshift) & 255] += 1
        if cnt.max() == k:  # one digit value: nothing to reorder in this pass
            continue
        tot = 0
        for d in range(256):
            c = cnt[d]
            cnt[d] = tot
            tot += c
        if src_is_pool:
            for i in range(i0, i1):
                x = pool[i]
                d = (((x >> 32) - base) >> dshift) & 255
                tmp[cnt[d]] = x
                cnt[d] += 1
        else:
            for i in range(k):
                x = tmp[i]
                d = (((x >> 32) - base) >> dshift) & 255
                pool[i0 + cnt[d]] = x
                cnt[d] += 1
        src_is_pool = not src_is_pool
    if not src_is_pool:
        pool[i0:i1] = tmp[:k]


@njit(**_JIT)
def _active_packed(p, st, off):
    for k in range(off.shape[0]):
        if (st[p + off[k]] & _LOW) == 0:
            return True
    return False


@njit(**_JIT)
def _flood_packed(st, off, kmin, shift, nb, ahead):
    n = st.shape[0]
    nn = off.shape[0]
    row = off[3]  # padded row length
    sent_low = np.int64(_SENT) & _LOW

    # a pixel waiting in a later bucket was not clamped: its bucket is that of its own key
    start = np.zeros(nb + 1, np.int32)
    for p in range(n):
        s = st[p]
        if (s & _LOW) != sent_low:
            start[(((s >> 32) - kmin) >> shift) + 1] += 1
    for b in range(nb):
        start[b + 1] += start[b]
    fill = start[:nb].copy()
    pool = np.empty(max(start[nb], 1), np.int64)  # key << 32 | pixel
    tmp = np.empty(max(start[nb], 1), np.int64)  # radix-sort buffer (pages mapped on use)

    for p in range(n):
        s = st[p]
        lab = s & _LOW
        if lab != 0 and lab != sent_low and _active_packed(p, st, off):
            key = s >> 32
            b = (key - kmin) >> shift
            pool[fill[b]] = (key << 32) | p
            fill[b] += 1

    hk = np.empty(n, np.int64)  # key << 32 | age (ages are unique)
    hp = np.empty(n, np.int32)
    hn = 0
    age = 0
    fq = np.empty(n, np.int32)
    fh = 0
    ft = 0
    li = 0
    le = 0
    cb = -1
    cur = kmin - 1

    while True:
        src = 0
        ck = cur
        if li < le:
            src = 1
            ck = pool[li] >> 32
            if hn > 0 and (hk[0] >> 32) < ck:
                src = 2
                ck = hk[0] >> 32
        elif hn > 0:
            src = 2
            ck = hk[0] >> 32
        if src != 0 and ck == cur:
            pass
        elif fh < ft:
            src = 3
        elif src != 0:
            cur = ck
        else:
            cb += 1
            while cb < nb and fill[cb] == start[cb]:
                cb += 1
            if cb >= nb:
                break
            li = start[cb]
            le = fill[cb]
            _sort_run_packed(pool, li, le, kmin + (np.int64(cb) << shift), shift, tmp)
            continue

        if src == 1:
            p = pool[li] & _LOW
            if li + ahead < le:
                # the run is known in advance: fetch the rows of a pixel popped soon
                pf = pool[li + ahead] & _LOW
                _prefetch(st, pf - row)
                _prefetch(st, pf)
                _prefetch(st, pf + row)
            li += 1
        elif src == 2:
            p = hp[0]
            hn -= 1
            if hn > 0:
                x = hk[hn]
                xp = hp[hn]
                i = 0
                while True:
                    lc = 2 * i + 1
                    if lc >= hn:
                        break
                    m = lc
                    if lc + 1 < hn and hk[lc + 1] < hk[lc]:
                        m = lc + 1
                    if hk[m] < x:
                        hk[i] = hk[m]
                        hp[i] = hp[m]
                        i = m
                    else:
                        break
                hk[i] = x
                hp[i] = xp
        else:
            p = fq[fh]
            fh += 1
            if fh == ft:
                fh = 0
                ft = 0

        lab = st[p] & _LOW
        for k in range(nn):
            q = p + off[k]
            s = st[q]
            if (s & _LOW) != 0:
                continue
            st[q] = s | lab
            key = s >> 32
            if key <= cur:
                fq[ft] = q
                ft += 1
                continue
            b = (key - kmin) >> shift
            if b != cb:
                pool[fill[b]] = (key << 32) | q
                fill[b] += 1
                continue
            x = (key << 32) | age
            age += 1
            i = hn
            hn += 1
            while i > 0:
                par = (i - 1) >> 1
                if x < hk[par]:
                    hk[i] = hk[par]
                    hp[i] = hp[par]
                    i = par
                else:
                    break
            hk[i] = x
            hp[i] = q


@njit(**_JIT)
def _cross_label_ties_packed(st, off):
    """:func:`_cross_label_ties` on the packed state."""
    n = st.shape[0]
    sent_low = np.int64(_SENT) & _LOW
    cnt = 0
    for p in range(n):
        lab = st[p] & _LOW
        if lab != 0 and lab != sent_low and _active_packed(p, st, off):
            cnt += 1
    keys = np.empty(cnt, np.int64)
    j = 0
    for p in range(n):
        lab = st[p] & _LOW
        if lab != 0 and lab != sent_low and _active_packed(p, st, off):
            keys[j] = st[p]  # key << 32 | label
            j += 1
    keys.sort()  # by key, then label
    for i in range(1, cnt):
        if (keys[i] >> 32) == (keys[i - 1] >> 32) and keys[i] != keys[i - 1]:
            return True
    return False


@njit(**_JIT)
def _flood_heap_packed(st, off):
    """Port of scikit-image's heap on the packed state (float32-exact images).

    Heap keys are ``key << 32 | age``: one int64 comparison is scikit-image's
    ``(value, age)`` comparison, markers (age 0) of equal value compare equal as there.
    """
    n = st.shape[0]
    nn = off.shape[0]
    sent_low = np.int64(_SENT) & _LOW
    hk = np.empty(n, np.int64)
    hp = np.empty(n, np.int32)
    hn = 0
    age = 1
    for p in range(n):
        lab = st[p] & _LOW
        if lab == 0 or lab == sent_low:
            continue
        x = (st[p] >> 32) << 32
        i = hn
        hn += 1
        while i > 0:
            par = (i + 1) // 2 - 1
            if x < hk[par]:
                hk[i] = hk[par]
                hp[i] = hp[par]
                i = par
            else:
                break
        hk[i] = x
        hp[i] = p

    while hn > 0:
        ek = hk[0] >> 32
        p = hp[0]
        hn -= 1
        if hn > 0:
            # scikit-image moves the last item to the root and sifts it down
            x = hk[hn]
            xp = hp[hn]
            i = 0
            while True:
                lc = 2 * i + 1
                if lc >= hn:
                    break
                m = i
                mk = x
                if hk[lc] < mk:
                    m = lc
                    mk = hk[lc]
                if lc + 1 < hn and hk[lc + 1] < mk:
                    m = lc + 1
                if m == i:
                    break
                hk[i] = hk[m]
                hp[i] = hp[m]
                i = m
            hk[i] = x
            hp[i] = xp

        lab = st[p] & _LOW
        for k in range(nn):
            q = p + off[k]
            s = st[q]
            if (s & _LOW) != 0:
                continue
            age += 1
            st[q] = s | lab
            key = s >> 32
            if key < ek:
                key = ek
            x = (key << 32) | age
            i = hn
            hn += 1
            while i > 0:
                par = (i + 1) // 2 - 1
                if x < hk[par]:
                    hk[i] = hk[par]
                    hp[i] = hp[par]
                    i = par
                else:
                    break
            hk[i] = x
            hp[i] = q


# --------------------------------------------------------------------------------------------
# exact port of scikit-image's heap (used when differently labelled markers tie in value)
# --------------------------------------------------------------------------------------------
@njit(**_JIT)
def _flood_heap(img, out, off):
    n = img.shape[0]
    nn = off.shape[0]
    sent = np.int32(_SENT)
    # markers plus pixels pushed later, each pixel at most once
    hv = np.empty(n, img.dtype)
    ha = np.empty(n, np.int32)
    hp = np.empty(n, np.int32)
    hn = 0
    age = 1
    # every marker pixel, raveled order, age 0 (the heap keeps equal keys in place)
    for p in range(n):
        if out[p] == 0 or out[p] == sent:
            continue
        v = img[p]
        i = hn
        hn += 1
        while i > 0:
            par = (i + 1) // 2 - 1
            if v < hv[par]:
                hv[i] = hv[par]
                ha[i] = ha[par]
                hp[i] = hp[par]
                i = par
            else:
                break
        hv[i] = v
        ha[i] = 0
        hp[i] = p

    while hn > 0:
        ev = hv[0]
        p = hp[0]
        hn -= 1
        if hn > 0:
            # scikit-image moves the last item to the root and sifts it down
            v = hv[hn]
            a = ha[hn]
            pp = hp[hn]
            i = 0
            while True:
                lc = 2 * i + 1
                if lc >= hn:
                    break
                rc = lc + 1
                m = i
                mv = v
                ma = a
                if hv[lc] < mv or (hv[lc] == mv and ha[lc] < ma):
                    m = lc
                    mv = hv[lc]
                    ma = ha[lc]
                if rc < hn and (hv[rc] < mv or (hv[rc] == mv and ha[rc] < ma)):
                    m = rc
                if m == i:
                    break
                hv[i] = hv[m]
                ha[i] = ha[m]
                hp[i] = hp[m]
                i = m
            hv[i] = v
            ha[i] = a
            hp[i] = pp

        lab = out[p]
        for k in range(nn):
            q = p + off[k]
            if out[q] != 0:
                continue
            age += 1
            out[q] = lab
            v = img[q]
            if v < ev:
                v = ev
            i = hn
            hn += 1
            while i > 0:
                par = (i + 1) // 2 - 1
                if v < hv[par] or (v == hv[par] and age < ha[par]):
                    hv[i] = hv[par]
                    ha[i] = ha[par]
                    hp[i] = hp[par]
                    i = par
                else:
                    break
            hv[i] = v
            ha[i] = age
            hp[i] = q


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _as_2d(name: str, arr: object) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2:
        raise InputError(f"`{name}` must be a 2-D array, got {a.ndim} dimension(s) (shape {a.shape})")
    return a


def _offsets(width: int, connectivity: int) -> np.ndarray:
    """Raveled neighbour offsets in scikit-image's order (by distance, then by offset)."""
    w = width
    if connectivity == 1:
        return np.array([-w, -1, 1, w], np.int64)
    return np.array([-w, -1, 1, w, -w - 1, -w + 1, w - 1, w + 1], np.int64)


def watershed(
    image: np.ndarray,
    markers: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    connectivity: int = 1,
    method: str = "auto",
) -> np.ndarray:
    """Flood ``image`` from labelled ``markers`` (marker-controlled watershed).

    Returns what ``skimage.segmentation.watershed(image, markers, mask=mask,
    connectivity=connectivity)`` returns (``compactness=0``, no watershed line), as int32.
    Pixels are flooded lowest value first; ties in value go to the pixel reached first
    (scikit-image's age rule), so plateaus are split between markers by flood distance.

    Parameters
    ----------
    image : (M, N) ndarray of float or int
        Relief to flood (e.g. the negated distance transform, or an edge-strength image).
        Values must be finite where ``mask`` is True; values outside the mask are ignored.
    markers : (M, N) ndarray of int or bool
        Labels of the seeds; 0 means unlabelled.  Must fit int32 (and not be -2**31).
        Seeds outside ``mask`` are dropped.
    mask : (M, N) ndarray of bool, optional
        Pixels that may be flooded; pixels outside get label 0.  Default: the whole image.
    connectivity : {1, 2}, optional
        1: 4-neighbours (edge-connected), 2: 8-neighbours.
    method : {"auto", "fast", "exact"}, optional
        ``"auto"`` (default): the bucket queue (fast), identical to scikit-image except that
        where marker pixels of *different* labels have exactly the same image value, those
        markers are taken in raveled order instead of scikit-image's heap order, which can
        move a few tie pixels between the two labels (see the module notes).
        ``"exact"``: identical to scikit-image in every case -- the bucket queue when no such
        tie exists, otherwise a port of scikit-image's heap (several times slower).
        ``"fast"`` is the same as ``"auto"``.

    Returns
    -------
    labels : (M, N) ndarray of int32
        Label of the marker each pixel was flooded from; 0 outside the mask and in parts
        of the mask that no marker reaches.

    Raises
    ------
    InputError
        If an array is not 2-D, the shapes differ, ``image`` is not numeric or has a
        non-finite value inside the mask, ``markers`` is not integer / does not fit int32,
        or ``connectivity`` / ``method`` is not one of the allowed values.
    """
    img = _as_2d("image", image)
    mk = _as_2d("markers", markers)
    if isinstance(connectivity, bool) or connectivity not in (1, 2):
        raise InputError(f"`connectivity` must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity!r}")
    if not isinstance(method, str) or method not in ("auto", "fast", "exact"):
        raise InputError(f"`method` must be 'auto', 'fast' or 'exact', got {method!r}")
    if mk.shape != img.shape:
        raise InputError(f"`markers` (shape {mk.shape}) must have the shape of `image` (shape {img.shape})")
    if img.dtype.kind == "f" and img.dtype.itemsize <= 8:
        work = np.float64 if img.dtype.itemsize == 8 else np.float32
    elif img.dtype.kind in "biu":
        # exact in float32 up to 16-bit integers; wider integers go to float64 like scikit-image
        work = np.float32 if img.dtype.itemsize <= 2 else np.float64
    else:
        raise InputError(f"`image` must be a real numeric array (float32/64 or integer), got dtype {img.dtype}")
    if mk.dtype.kind not in "biu":
        raise InputError(f"`markers` must be an integer label image, got dtype {mk.dtype}")
    if mk.dtype.kind != "b" and mk.dtype.itemsize >= 4 and mk.size and mk.dtype != np.int32:
        info = np.iinfo(np.int32)
        lo_m, hi_m = int(mk.min()), int(mk.max())
        if lo_m < info.min or hi_m > info.max:
            raise InputError(f"`markers` values must fit int32, got range [{lo_m}, {hi_m}]")
    if mask is not None:
        m = _as_2d("mask", mask)
        if m.shape != img.shape:
            raise InputError(f"`mask` (shape {m.shape}) must have the shape of `image` (shape {img.shape})")
        if m.dtype.kind not in "biuf":
            raise InputError(f"`mask` must be a boolean array, got dtype {m.dtype}")
        m = np.ascontiguousarray(m, dtype=bool)
    h, w = img.shape
    res = np.zeros((h, w), np.int32)
    if img.size == 0:
        return res
    if (h + 2) * (w + 2) >= np.iinfo(np.int32).max:
        raise InputError(f"`image` of shape {img.shape} is too large (at most 2**31 pixels)")

    use_mask = mask is not None
    mask_arg = m if use_mask else np.ones((1, 1), bool)
    mk32 = np.ascontiguousarray(mk, dtype=np.int32)
    off = _offsets(w + 2, connectivity)
    img32 = None
    if work == np.float32:
        img32 = np.ascontiguousarray(img, dtype=np.float32)
    else:
        # float64 / wide integers that float32 holds exactly take the fast packed path too
        with np.errstate(over="ignore", invalid="ignore"):
            cand = img.astype(np.float32)
        if np.array_equal(cand, img):
            img32 = cand
    if img32 is not None:
        st = np.empty((h + 2, w + 2), np.int64)
        kmin, kmax, status = _prepare_packed(img32.view(np.int32), mk32, mask_arg, use_mask, st)
        _check_status(status)
        if kmax < kmin:  # empty mask
            return res
        fst = st.reshape(-1)
        if method != "exact" or not _cross_label_ties_packed(fst, off):
            krange = int(kmax - kmin)
            shift = max(0, krange.bit_length() - BUCKET_BITS)
            _flood_packed(fst, off, kmin, shift, (krange >> shift) + 1, PREFETCH_AHEAD)
        else:
            _flood_heap_packed(fst, off)
        _finish_packed(st, res)
        return res

    pim = np.empty((h + 2, w + 2), work)
    pout = np.empty((h + 2, w + 2), np.int32)
    lo, hi, status = _prepare(np.ascontiguousarray(img, dtype=work), mk32, mask_arg, use_mask, pim, pout)
    _check_status(status)
    if hi >= lo:  # something to flood
        fim = pim.reshape(-1)
        fout = pout.reshape(-1)
        if method == "exact" and _cross_label_ties(fim, fout, off):
            _flood_heap(fim, fout, off)
        else:
            nb = int(min(MAX_BUCKETS, max(16, img.size // 4)))
            _flood_bucket(fim, fout, off, nb, lo, hi)
    _finish(pout, res)
    return res


def _check_status(status: int) -> None:
    if status == 1:
        raise InputError("`image` has NaN or infinite values inside the mask; replace them first "
                         "(e.g. np.nan_to_num) or exclude them with `mask`")
    if status == 2:
        raise InputError(f"`markers` must not contain the value {_SENT} (reserved)")
