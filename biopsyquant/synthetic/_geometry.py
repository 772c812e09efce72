"""Tissue geometry of a synthetic muscle cross-section.

Everything here works in full-resolution pixel units unless a name says ``_um``.  Smooth,
large-scale fields (fascicles, tissue outline, the room left for fibers) are computed on a coarse
grid of ``step`` pixels that extends ``margin`` pixels beyond the image on every side, and sampled
bilinearly where needed.  Fibers are the cells of a power diagram (Laguerre tessellation) of
relaxed seed disks, shrunk by half the endomysium width, with corners rounded by a soft minimum
of the distances to the cell's bisectors.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numba
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

# --------------------------------------------------------------------------------------------
# random streams and noise


def rng_for(seed: int, name: str) -> np.random.Generator:
    """Independent, named random stream: changing one option never reshuffles the others."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf8"))])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with correlation length ~``scale_px``.

    Returns float32 of ``shape``.  Generated on a grid of spacing ``scale_px`` and upsampled with
    bicubic interpolation, so the cost is one resize of the output size.
    """
    h, w = int(shape[0]), int(shape[1])
    scale_px = max(float(scale_px), 1.0)
    gh = int(np.ceil(h / scale_px)) + 4
    gw = int(np.ceil(w / scale_px)) + 4
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    g = cv2.GaussianBlur(g, (0, 0), 0.7, borderType=cv2.BORDER_REFLECT)
    tw, th = int(round(gw * scale_px)), int(round(gh * scale_px))
    big = cv2.resize(g, (max(tw, w), max(th, h)), interpolation=cv2.INTER_CUBIC)
    off_y = int(round(2 * scale_px)) if big.shape[0] - h >= int(round(2 * scale_px)) else 0
    off_x = int(round(2 * scale_px)) if big.shape[1] - w >= int(round(2 * scale_px)) else 0
    out = np.ascontiguousarray(big[off_y:off_y + h, off_x:off_x + w])
    sd = float(out.std())
    if sd > 0:
        out -= float(out.mean())
        out /= sd
    return out


def fine_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-std Gaussian-blurred white noise (float32), grain size ~``sigma_px``."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px > 0.3:
        n = cv2.GaussianBlur(n, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
        n *= 1.0 / max(float(n.std()), 1e-6)
    return n


# --------------------------------------------------------------------------------------------
# coarse grid


@dataclass(frozen=True)
class Grid:
    """A coarse grid of ``step`` px covering the image plus ``margin`` px on every side."""

    shape: tuple[int, int]  # full-resolution image (H, W)
    step: int
    margin: int  # in full px, a multiple of step

    @property
    def cshape(self) -> tuple[int, int]:
        h, w = self.shape
        return (int(np.ceil((h + 2 * self.margin) / self.step)),
                int(np.ceil((w + 2 * self.margin) / self.step)))

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Full-res (x, y) coordinates of the coarse cell centres, float32 2-D arrays."""
        hc, wc = self.cshape
        xs = (np.arange(wc, dtype=np.float32) * self.step + (self.step - 1) / 2.0 - self.margin)
        ys = (np.arange(hc, dtype=np.float32) * self.step + (self.step - 1) / 2.0 - self.margin)
        return np.meshgrid(xs, ys)

    def upsample(self, a: np.ndarray, interpolation=cv2.INTER_LINEAR) -> np.ndarray:
        """Coarse array -> full-resolution image (cropped to the image)."""
        hc, wc = a.shape
        big = cv2.resize(a, (wc * self.step, hc * self.step), interpolation=interpolation)
        m = self.margin
        return np.ascontiguousarray(big[m:m + self.shape[0], m:m + self.shape[1]])

    def sample(self, a: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bilinear sample of coarse array ``a`` at full-res positions."""
        u = (np.asarray(x, np.float64) + self.margin - (self.step - 1) / 2.0) / self.step
        v = (np.asarray(y, np.float64) + self.margin - (self.step - 1) / 2.0) / self.step
        return ndimage.map_coordinates(a, [v, u], order=1, mode="nearest")

    def sample_nearest(self, a: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        hc, wc = a.shape
        j = np.clip(np.floor((np.asarray(x) + self.margin) / self.step).astype(np.int64), 0, wc - 1)
        i = np.clip(np.floor((np.asarray(y) + self.margin) / self.step).astype(np.int64), 0, hc - 1)
        return a[i, j]


# --------------------------------------------------------------------------------------------
# relaxation of disks (seed placement)


def relax_disks(pts: np.ndarray, r: np.ndarray, *, iterations: int, room=None,
                room_grad=None, grid: Grid | None = None) -> np.ndarray:
    """Push overlapping disks apart and away from walls; returns new (N, 2) positions (x, y).

    ``room`` is a coarse map of the signed distance (px) to the nearest wall (positive inside),
    ``room_grad`` its gradient (2, hc, wc) per full px.  A disk whose centre is closer than its
    radius to a wall moves along the gradient.
    """
    pts = pts.astype(np.float64).copy()
    n = len(pts)
    if n < 2:
        return pts
    rmax = float(r.max())
    for _ in range(iterations):
        tree = cKDTree(pts)
        pairs = tree.query_pairs(2 * rmax, output_type="ndarray")
        disp = np.zeros_like(pts)
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            d = pts[j] - pts[i]
            dist = np.sqrt((d ** 2).sum(1))
            ov = r[i] + r[j] - dist
            k = ov > 0
            i, j, d, dist, ov = i[k], j[k], d[k], dist[k], ov[k]
            dist = np.maximum(dist, 1e-3)
            u = d / dist[:, None]
            wi = r[j] / (r[i] + r[j])  # small disks move more
            np.add.at(disp, i, -(0.5 * ov * wi)[:, None] * u)
            np.add.at(disp, j, (0.5 * ov * (1 - wi))[:, None] * u)
        if room is not None:
            a = grid.sample(room, pts[:, 0], pts[:, 1])
            deficit = r - a
            k = deficit > 0
            if k.any():
                gx = grid.sample(room_grad[0], pts[k, 0], pts[k, 1])
                gy = grid.sample(room_grad[1], pts[k, 0], pts[k, 1])
                gn = np.maximum(np.sqrt(gx ** 2 + gy ** 2), 1e-6)
                disp[k, 0] += 0.5 * deficit[k] * gx / gn
                disp[k, 1] += 0.5 * deficit[k] * gy / gn
        step_cap = 0.5 * r[:, None]
        disp = np.clip(disp, -step_cap, step_cap)
        pts += disp
    return pts


# --------------------------------------------------------------------------------------------
# fascicles


@numba.njit(cache=True)
def _fascicle_kernel(xw, yw, sx, sy, sw, out_b, out_id):  # pragma: no cover - compiled
    hc, wc = xw.shape
    nf = sx.shape[0]
    for i in range(hc):
        for j in range(wc):
            x = xw[i, j]
            y = yw[i, j]
            b1 = 1e30
            b2 = 1e30
            k1 = -1
            k2 = -1
            for k in range(nf):
                p = (x - sx[k]) ** 2 + (y - sy[k]) ** 2 - sw[k]
                if p < b1:
                    b2 = b1
                    k2 = k1
                    b1 = p
                    k1 = k
                elif p < b2:
                    b2 = p
                    k2 = k
            out_id[i, j] = k1
            if k2 < 0:
                out_b[i, j] = 1e6
            else:
                sep = np.sqrt((sx[k1] - sx[k2]) ** 2 + (sy[k1] - sy[k2]) ** 2)
                out_b[i, j] = (b2 - b1) / (2.0 * max(sep, 1e-6))


def fascicle_field(grid: Grid, rng: np.random.Generator, *, diameter_px: float,
                   warp_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fascicles as a warped power diagram.

    Returns ``(b, fid, seeds)``: coarse float32 distance (px) to the nearest fascicle border,
    coarse int16 fascicle id (0..F-1), seed positions (F, 2).
    """
    h, w = grid.shape
    ext = diameter_px
    area = (h + 2 * ext) * (w + 2 * ext)
    nf = max(2, int(round(area / (np.pi * (diameter_px / 2) ** 2) * 0.9)))
    pts = np.column_stack([rng.uniform(-ext, w + ext, nf), rng.uniform(-ext, h + ext, nf)])
    rad = diameter_px / 2 * rng.uniform(0.75, 1.25, nf)
    pts = relax_disks(pts, rad, iterations=30)
    xs, ys = grid.coords()
    hc, wc = xs.shape
    wscale = max(diameter_px / 3.0 / grid.step, 2.0)
    wx = smooth_noise(rng, (hc, wc), wscale) * warp_px
    wy = smooth_noise(rng, (hc, wc), wscale) * warp_px
    xw = (xs + wx).astype(np.float64)
    yw = (ys + wy).astype(np.float64)
    b = np.empty((hc, wc), np.float32)
    fid = np.empty((hc, wc), np.int16)
    _fascicle_kernel(xw, yw, pts[:, 0].copy(), pts[:, 1].copy(), (0.3 * rad) ** 2, b, fid)
    return b, fid, pts


# --------------------------------------------------------------------------------------------
# fibers: power diagram with rounded corners


@numba.njit(cache=True, fastmath=True)
def _fiber_kernel(cx, cy, A, B, C, bound, fasc, nbr, room, fid, step, margin,
                  tau, wob, wob_step, labels, dist):  # pragma: no cover - compiled
    H, W = labels.shape
    hc, wc = room.shape
    hw, ww = wob.shape
    n = cx.shape[0]
    kmax = nbr.shape[1]
    off = (step - 1) / 2.0
    cut = 7.0 * tau
    for i in range(n):
        R = bound[i]
        x0 = max(int(np.floor(cx[i] - R)), 0)
        x1 = min(int(np.ceil(cx[i] + R)) + 1, W)
        y0 = max(int(np.floor(cy[i] - R)), 0)
        y1 = min(int(np.ceil(cy[i] + R)) + 1, H)
        for y in range(y0, y1):
            for x in range(x0, x1):
                dx = x - cx[i]
                dy = y - cy[i]
                rr = np.sqrt(dx * dx + dy * dy)
                dc = R - rr
                if dc <= 0:
                    continue
                # fascicle membership (nearest coarse cell)
                jj = int((x + margin) // step)
                ii = int((y + margin) // step)
                if jj > wc - 1:
                    jj = wc - 1
                if ii > hc - 1:
                    ii = hc - 1
                if fid[ii, jj] != fasc[i]:
                    continue
                # room: bilinear
                u = (x + margin - off) / step
                v = (y + margin - off) / step
                j0 = int(np.floor(u))
                i0 = int(np.floor(v))
                fu = u - j0
                fv = v - i0
                if j0 < 0:
                    j0 = 0
                    fu = 0.0
                if i0 < 0:
                    i0 = 0
                    fv = 0.0
                if j0 >= wc - 1:
                    j0 = wc - 2
                    fu = 1.0
                if i0 >= hc - 1:
                    i0 = hc - 2
                    fv = 1.0
                a = ((1 - fv) * ((1 - fu) * room[i0, j0] + fu * room[i0, j0 + 1])
                     + fv * ((1 - fu) * room[i0 + 1, j0] + fu * room[i0 + 1, j0 + 1]))
                if a <= 0:
                    continue
                # soft minimum of the constraint distances; terms beyond 7 tau add < 0.1 %
                s = 0.0
                if dc < cut:
                    s += np.exp(-dc / tau)
                if a < cut:
                    s += np.exp(-a / tau)
                ok = True
                for k in range(kmax):
                    if nbr[i, k] < 0:
                        break
                    # signed distance to the power bisector with neighbour k, minus half gap
                    bb = A[i, k] * x + B[i, k] * y + C[i, k]
                    if bb <= 0:
                        ok = False
                        break
                    if bb < cut:
                        s += np.exp(-bb / tau)
                if not ok:
                    continue
                d = -tau * np.log(s) if s > 0 else cut
                # boundary wobble (nearest sample of a coarse field)
                wj = min(int(x // wob_step), ww - 1)
                wi = min(int(y // wob_step), hw - 1)
                d += wob[wi, wj]
                if d > 0:
                    labels[y, x] = i + 1
                    dist[y, x] = d


def rasterize_fibers(shape, seeds, radius, half_gap, fasc, room, fid, grid: Grid, *,
                     tau_px: float, wobble: np.ndarray, wobble_step: int,
                     n_neighbours: int = 12) -> np.ndarray:
    """Label image (int32, 0 = not fiber, i+1 = seed i) of the rounded power cells."""
    n = len(seeds)
    labels = np.zeros(shape, np.int32)
    if n == 0:
        return labels
    dist = np.zeros(shape, np.float32)
    k = min(n_neighbours + 1, n)
    tree = cKDTree(seeds)
    dd, nn = tree.query(seeds, k=k)
    dd = np.atleast_2d(dd)[:, 1:] if k > 1 else np.zeros((n, 0))
    nn = np.atleast_2d(nn)[:, 1:] if k > 1 else np.zeros((n, 0), int)
    nbr = np.ascontiguousarray(nn.astype(np.int64))
    sep = np.ascontiguousarray(np.maximum(dd, 1e-3))
    bound = 1.3 * radius + 2.0
    # power bisector of seeds i and j as a linear function of (x, y):
    # ((x-cj)^2 - wj - (x-ci)^2 + wi) / (2 |ci - cj|) - half_gap_i
    cx, cy = seeds[:, 0].astype(np.float64), seeds[:, 1].astype(np.float64)
    w = radius.astype(np.float64) ** 2
    jx, jy, jw = cx[nn], cy[nn], w[nn]
    den = 2.0 * sep
    A = np.ascontiguousarray(2 * (cx[:, None] - jx) / den)
    B = np.ascontiguousarray(2 * (cy[:, None] - jy) / den)
    C = np.ascontiguousarray((jx ** 2 + jy ** 2 - jw - cx[:, None] ** 2 - cy[:, None] ** 2
                              + w[:, None]) / den - half_gap.astype(np.float64)[:, None])
    _fiber_kernel(cx.copy(), cy.copy(), A, B, C,
                  bound.astype(np.float64), fasc.astype(np.int64), nbr,
                  room.astype(np.float32), fid, int(grid.step), float(grid.margin),
                  float(tau_px), wobble.astype(np.float32), int(wobble_step), labels, dist)
    return labels


def clean_labels(labels: np.ndarray, *, min_area_px: float) -> np.ndarray:
    """Keep the largest 4-connected piece of every label, drop pieces below ``min_area_px``,
    renumber 1..N in order of the first pixel (raster order)."""
    mask = (labels > 0).astype(np.uint8)
    ncomp, comp = cv2.connectedComponents(mask, connectivity=4, ltype=cv2.CV_32S)
    if ncomp <= 1:
        return np.zeros_like(labels)
    flat_c = comp.ravel()
    flat_l = labels.ravel()
    lab_of = np.zeros(ncomp, np.int64)
    lab_of[flat_c] = flat_l
    area = np.bincount(flat_c, minlength=ncomp)
    cid = np.arange(1, ncomp)
    order = np.lexsort((-area[cid], lab_of[cid]))
    cid = cid[order]
    first = np.ones(len(cid), bool)
    first[1:] = lab_of[cid[1:]] != lab_of[cid[:-1]]
    keep = cid[first & (area[cid] >= min_area_px)]
    keep = np.sort(keep)  # components are numbered in raster order of their first pixel
    lut = np.zeros(ncomp, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[comp]


# --------------------------------------------------------------------------------------------
# helpers on label images


def pick_pixels_per_label(lab: np.ndarray, idx: np.ndarray, counts: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """Randomly pick ``counts[l]`` of the candidate pixels ``idx`` whose label is ``l``."""
    if len(idx) == 0:
        return idx
    key = rng.random(len(idx))
    order = np.lexsort((key, lab))
    ls = lab[order]
    start = np.r_[0, np.flatnonzero(ls[1:] != ls[:-1]) + 1]
    rank = np.arange(len(ls)) - np.repeat(start, np.diff(np.r_[start, len(ls)]))
    return idx[order[rank < counts[ls]]]


def min_feret_px(labels: np.ndarray, n: int, n_angles: int = 36) -> np.ndarray:
    """Approximate minimum Feret diameter (px) of labels 1..n from their boundary pixels."""
    out = np.zeros(n + 1, np.float64)
    if n == 0:
        return out[1:]
    # a boundary pixel has a 4-neighbour with another label (or lies on the image border)
    b = np.zeros(labels.shape, bool)
    b[:-1] |= labels[:-1] != labels[1:]
    b[1:] |= labels[1:] != labels[:-1]
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    b[[0, -1], :] = True
    b[:, [0, -1]] = True
    b &= labels > 0
    ys, xs = np.nonzero(b)
    lab = labels[ys, xs]
    order = np.argsort(lab, kind="stable")
    lab, xs, ys = lab[order], xs[order].astype(np.float64), ys[order].astype(np.float64)
    starts = np.r_[0, np.flatnonzero(lab[1:] != lab[:-1]) + 1]
    ids = lab[starts]
    best = np.full(len(ids), np.inf)
    for t in np.linspace(0, np.pi, n_angles, endpoint=False):
        p = xs * np.cos(t) + ys * np.sin(t)
        width = np.maximum.reduceat(p, starts) - np.minimum.reduceat(p, starts)
        best = np.minimum(best, width)
    out[ids] = best + 1.0
    return out[1:]
