"""Synthetic brightfield H-DAB / H&E skeletal-muscle cross-sections with exact ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd

from ..stains import PRESETS, StainModel
from . import _geometry as G
from ._params import resolve

COMPARTMENTS = {0: "outside", 1: "fiber", 2: "endomysium", 3: "perimysium", 4: "vessel",
                5: "perivascular"}
CODE = {v: k for k, v in COMPARTMENTS.items()}
GRADE_OD = (0.2, 0.4, 0.6)
# normalised OD of eosin-stained fibers measured on real muscle H&E (../shared/realdata)
EOSIN_MUSCLE = (0.08, 0.93, 0.36)

class _Nuc(NamedTuple):
    """A nucleus (or red cell) to draw: centre px, semi-axes px, angle rad, OD values."""

    x: float
    y: float
    a: float
    b: float
    theta: float
    hema: float
    dab: float
    kind: str
    diameter_um: float
    positive: bool


CELL_COLUMNS = ["id", "x_px", "y_px", "x_um", "y_um", "diameter_um", "positive", "grade",
                "dab_od_mean", "compartment", "cluster_id", "kind"]


@dataclass(frozen=True, eq=False)
class SyntheticSection:
    """A rendered section and its exact ground truth.

    Attributes
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        The brightfield image.
    mpp : float
        Microns per pixel.
    marker : str
    fibers : ndarray of int32, shape (H, W)
        Fiber labels 1..N (0 = not a fiber).
    compartments : ndarray of uint8, shape (H, W)
        Codes of ``docs/architecture.md``: 0 outside, 1 fiber, 2 endomysium, 3 perimysium,
        4 vessel, 5 perivascular.
    tissue : ndarray of bool, shape (H, W)
    hema_od, dab_od : ndarray of float32, shape (H, W)
        True stain concentrations in log10 OD units (what ideal colour deconvolution with
        :attr:`stain_model` returns before blur, noise and JPEG).
    eosin_od : ndarray of float32 or None
        Eosin concentration for ``marker="HE"``.
    cells : DataFrame
        One row per cell/nucleus: ``id, x_px, y_px, x_um, y_um, diameter_um, positive, grade,
        dab_od_mean, compartment, cluster_id, kind`` (kind ``macrophage``,
        ``inflammatory_cell``, ``interstitial_nucleus``, ``myonucleus``, ``internal_nucleus``,
        ``endothelial_nucleus``).  ``dab_od_mean`` is over the whole cell (true map).
    fiber_truth : DataFrame
        One row per fiber label.
    vessels : DataFrame
        Capillaries, arterioles and venules: ``id, x_px, y_px, diameter_um, kind, dab_od_mean,
        positive``.
    stain_model : StainModel
        Vectors and glass background actually used for rendering.
    params : dict
        Every option (``generate_section(**params)`` reproduces the section).
    summary : dict
        Slide-level truth numbers.
    """

    rgb: np.ndarray
    mpp: float
    marker: str
    fibers: np.ndarray
    compartments: np.ndarray
    tissue: np.ndarray
    hema_od: np.ndarray
    dab_od: np.ndarray
    eosin_od: np.ndarray | None
    cells: pd.DataFrame
    fiber_truth: pd.DataFrame
    vessels: pd.DataFrame
    stain_model: StainModel
    params: dict
    summary: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]

    @property
    def macrophages(self) -> pd.DataFrame:
        """Rows of :attr:`cells` that are macrophages / inflammatory cells."""
        return self.cells[self.cells["kind"].isin(["macrophage", "inflammatory_cell"])]

    @property
    def positive_cells(self) -> pd.DataFrame:
        """Rows of :attr:`cells` with ``positive`` true."""
        return self.cells[self.cells["positive"]]


# ============================================================================================
# geometry


@dataclass
class _Geo:
    fibers: np.ndarray
    compartments: np.ndarray
    tissue: np.ndarray
    fdist: np.ndarray            # distance (px) to the fiber border, inside fibers
    edge_um: np.ndarray          # per fiber (index 0 = label 1): fascicle-edge distance
    fascicle: np.ndarray         # per fiber
    vessels: list                # dicts
    capillaries: list            # dicts
    cellshapes: list             # dicts (macrophages), with patch arrays
    holes: int


def _grade(od):
    od = np.asarray(od, float)
    return (od >= GRADE_OD[0]).astype(int) + (od >= GRADE_OD[1]) + (od >= GRADE_OD[2])


def _ellipse_patch(a, b, theta, sub=(0.0, 0.0)):
    """Local coordinates of a rotated ellipse: returns (yy, xx, rho) for a tight patch."""
    R = int(math.ceil(max(a, b))) + 2
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1].astype(np.float32)
    xx -= sub[0]
    yy -= sub[1]
    c, s = math.cos(theta), math.sin(theta)
    u = xx * c + yy * s
    v = -xx * s + yy * c
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return R, rho, u, v


def _paste_max(dst, y, x, R, patch):
    """np.maximum a (2R+1)^2 patch centred at integer (y, x) into dst, clipped to the image."""
    H, W = dst.shape
    y0, x0 = y - R, x - R
    py0, px0 = max(0, -y0), max(0, -x0)
    y1, x1 = min(H, y + R + 1), min(W, x + R + 1)
    if y1 <= max(y0, 0) or x1 <= max(x0, 0):
        return
    sl = (slice(max(y0, 0), y1), slice(max(x0, 0), x1))
    pp = patch[py0:py0 + (sl[0].stop - sl[0].start), px0:px0 + (sl[1].stop - sl[1].start)]
    np.maximum(dst[sl], pp, out=dst[sl])


def _patch_slices(shape, y, x, R):
    H, W = shape
    y0, x0 = y - R, x - R
    py0, px0 = max(0, -y0), max(0, -x0)
    y1, x1 = min(H, y + R + 1), min(W, x + R + 1)
    if y1 <= max(y0, 0) or x1 <= max(x0, 0):
        return None
    sl = (slice(max(y0, 0), y1), slice(max(x0, 0), x1))
    ps = (slice(py0, py0 + (y1 - max(y0, 0))), slice(px0, px0 + (x1 - max(x0, 0))))
    return sl, ps


def _spaced(points, min_dist, rng, limit=None, existing=None):
    """Greedy random subset of points (N,2) with pairwise spacing >= min_dist."""
    if len(points) == 0:
        return np.zeros((0, 2)), np.zeros(0, int)
    order = rng.permutation(len(points))
    cell = max(min_dist, 1e-6)
    buckets: dict = {}
    if existing is not None:
        for p in existing:
            buckets.setdefault((int(p[0] // cell), int(p[1] // cell)), []).append(p)
    keep = []
    md2 = min_dist ** 2
    for k in order:
        x, y = points[k]
        gx, gy = int(x // cell), int(y // cell)
        ok = True
        for ix in (gx - 1, gx, gx + 1):
            for iy in (gy - 1, gy, gy + 1):
                for q in buckets.get((ix, iy), ()):
                    if (q[0] - x) ** 2 + (q[1] - y) ** 2 < md2:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            buckets.setdefault((gx, gy), []).append((x, y))
            keep.append(k)
            if limit is not None and len(keep) >= limit:
                break
    keep = np.asarray(keep, int)
    return points[keep], keep


def _build_geometry(p: dict) -> tuple[_Geo, dict]:
    H, W = p["shape"]
    mpp = p["mpp"]
    um = 1.0 / mpp  # px per µm
    seed = p["seed"]
    step = max(1, int(round(2.0 / mpp)))
    margin = step * int(math.ceil(0.75 * p["fiber_diameter_um"][1] * um / step))
    grid = G.Grid((H, W), step, margin)
    xs, ys = grid.coords()
    hc, wc = xs.shape
    inimg = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)

    # ---- tissue outline
    rng = G.rng_for(seed, "outline")
    if p["tissue_coverage"] >= 1.0:
        tissue_c = np.ones((hc, wc), bool)
        outline_term = np.full((hc, wc), 1e6, np.float32)
    else:
        cxn, cyn = rng.uniform(-0.1, 0.1, 2)
        ax, ay = rng.uniform(0.8, 1.1, 2)
        rr = np.sqrt(((xs / W - 0.5 - cxn) / ax) ** 2 + ((ys / H - 0.5 - cyn) / ay) ** 2)
        f = -rr + 0.10 * G.smooth_noise(rng, (hc, wc), max(min(H, W) / 5 / step, 2))
        f += 0.03 * G.smooth_noise(rng, (hc, wc), max(min(H, W) / 20 / step, 2))
        thr = np.quantile(f[inimg], 1 - p["tissue_coverage"])
        tissue_c = (f > thr).astype(np.uint8)
        # keep the largest piece only
        n, lab = cv2.connectedComponents(tissue_c, connectivity=8)
        if n > 2:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            tissue_c = (lab == sizes.argmax()).astype(np.uint8)
        tissue_c = tissue_c.astype(bool)
        f_tissue = np.where(tissue_c, f - thr, np.minimum(f - thr, -1e-3)).astype(np.float32)
        outline_term = cv2.distanceTransform(tissue_c.astype(np.uint8), cv2.DIST_L2, 5) * step
        outline_term = outline_term.astype(np.float32) - p["epimysium_width_um"] * um
    tissue_mm2_est = float((tissue_c & inimg).sum()) * (step * mpp) ** 2 / 1e6

    # ---- fascicles and septa
    rng = G.rng_for(seed, "fascicles")
    fdiam = p["fascicle_diameter_um"] * um
    b, fid, fseeds = G.fascicle_field(grid, rng, diameter_px=fdiam, warp_px=0.12 * fdiam)
    half_sept = 0.5 * p["perimysium_width_um"] * um * np.clip(
        1 + 0.35 * G.smooth_noise(rng, (hc, wc), max(fdiam / 4 / step, 2)), 0.4, 2.0)
    fterm = (b - half_sept).astype(np.float32)

    # ---- vessels (in septa) and holes
    rng = G.rng_for(seed, "vessels")
    septum = (b < 0.6 * half_sept) & tissue_c & inimg & (outline_term > 10 * um)
    cand = np.column_stack([xs[septum], ys[septum]])
    n_ves = int(rng.poisson(p["vessels_per_mm2"] * tissue_mm2_est)) if p["vessels_per_mm2"] else 0
    vpts, _ = _spaced(cand, 120 * um, rng, limit=n_ves)
    vessels = []
    lo, hi = p["vessel_diameter_um"]
    for (x, y) in vpts:
        kind = "arteriole" if rng.random() < 0.5 else "venule"
        d = rng.uniform(lo, hi) * um
        aspect = rng.uniform(0.8, 1.0) if kind == "arteriole" else rng.uniform(0.45, 0.8)
        wall = (rng.uniform(0.25, 0.35) if kind == "arteriole" else rng.uniform(0.1, 0.16))
        vessels.append(dict(x=float(x), y=float(y), a=d / 2, b=d / 2 * aspect,
                            theta=float(rng.uniform(0, np.pi)), wall=wall, kind=kind))
    room = np.minimum(fterm, outline_term)
    for v in vessels:
        dv = np.sqrt((xs - v["x"]) ** 2 + (ys - v["y"]) ** 2) - (v["a"] + 6 * um + 0.25 * v["a"])
        room = np.minimum(room, dv)
    holes = []
    rng = G.rng_for(seed, "holes")
    if p["n_holes"]:
        hcand = cand
        if len(vessels):
            dmin = np.min(np.hypot(hcand[:, :1] - vpts[None, :, 0], hcand[:, 1:] - vpts[None, :, 1]), 1)
            hcand = hcand[dmin > 100 * um]
        hpts, _ = _spaced(hcand, 200 * um, rng, limit=int(p["n_holes"]))
        hole_c = np.zeros((hc, wc), bool)
        for (x, y) in hpts:
            r = rng.uniform(25, 70) * um
            ang = rng.uniform(0, np.pi)
            c, s = math.cos(ang), math.sin(ang)
            u = (xs - x) * c + (ys - y) * s
            v = -(xs - x) * s + (ys - y) * c
            rho = np.sqrt((u / r) ** 2 + (v / (0.45 * r)) ** 2)
            rho = rho + 0.15 * G.smooth_noise(rng, (hc, wc), max(r / 3 / step, 2))
            hole_c |= rho < 1
            room = np.minimum(room, np.sqrt((xs - x) ** 2 + (ys - y) ** 2) - 1.3 * r - 8 * um)
            holes.append((x, y, r))
    else:
        hole_c = np.zeros((hc, wc), bool)
    room = room.astype(np.float32)

    # ---- fiber seeds
    rng = G.rng_for(seed, "fibers")
    pool = np.flatnonzero((room > 0).ravel())
    dlo, dhi = p["fiber_diameter_um"]
    alo, ahi = p["atrophic_diameter_um"]
    elo, ehi = p["endomysium_width_um"]
    nom_r = 0.5 * (0.5 * (dlo + dhi)) * um + 0.5 * 0.5 * (elo + ehi) * um
    mean_r2 = (1 - p["atrophic_fraction"]) * nom_r ** 2 + p["atrophic_fraction"] * (
        (0.25 * (alo + ahi) + 0.25 * (elo + ehi)) * um) ** 2
    area_px = len(pool) * step * step
    n0 = int(round(area_px * 0.86 / (np.pi * mean_r2))) if len(pool) else 0
    if n0 > 0:
        pick = rng.choice(pool, n0, replace=n0 > len(pool))
        pts = np.column_stack([xs.ravel()[pick], ys.ravel()[pick]]).astype(np.float64)
        pts += rng.uniform(-step / 2, step / 2, pts.shape)
        edge = G.Grid.sample(grid, np.minimum(fterm, outline_term), pts[:, 0], pts[:, 1]) * mpp
        if p["perifascicular_atrophy"]:
            wgt = np.exp(-np.maximum(edge, 0) / (0.8 * dhi))
            prob = np.clip(p["atrophic_fraction"] * wgt / max(wgt.mean(), 1e-9), 0, 1)
        else:
            prob = np.full(n0, p["atrophic_fraction"])
        atro = rng.random(n0) < prob
        mu, sd = 0.5 * (dlo + dhi), (dhi - dlo) / 4.5
        diam = np.clip(rng.normal(mu, sd, n0), dlo, dhi)
        diam[atro] = rng.uniform(alo, ahi, int(atro.sum()))
        hg = 0.5 * rng.uniform(elo, ehi, n0) * um
        hg = np.maximum(hg, 0.75)  # at least a 1.5 px gap so fibers never touch
        r_body = 0.5 * diam * um
        rc = r_body + hg
        gy, gx = np.gradient(room.astype(np.float64))
        grad = np.stack([gx / step, gy / step])
        pts = G.relax_disks(pts, rc, iterations=40, room=room, room_grad=grad, grid=grid)
        a = grid.sample(room, pts[:, 0], pts[:, 1])
        ok = (a > 0.3 * r_body) & (pts[:, 0] > -rc) & (pts[:, 0] < W + rc) \
            & (pts[:, 1] > -rc) & (pts[:, 1] < H + rc)
        pts, rc, hg, r_body, atro = pts[ok], rc[ok], hg[ok], r_body[ok], atro[ok]
        fasc = grid.sample_nearest(fid, pts[:, 0], pts[:, 1]).astype(np.int64)
        wstep = max(1, int(round(1.5 * um)))
        rngw = G.rng_for(seed, "wobble")
        wob = G.smooth_noise(rngw, (H // wstep + 2, W // wstep + 2),
                             max(6 * um / wstep, 1.5)) * p["boundary_wobble_um"] * um
        raw = G.rasterize_fibers((H, W), pts, rc, hg, fasc, room, fid, grid,
                                 tau_px=p["corner_rounding_um"] * um, wobble=wob,
                                 wobble_step=wstep)
    else:
        pts = np.zeros((0, 2))
        fasc = np.zeros(0, np.int64)
        atro = np.zeros(0, bool)
        raw = np.zeros((H, W), np.int32)

    # ---- full-res tissue and room
    tissue = grid.upsample(f_tissue) > 0 if p["tissue_coverage"] < 1 \
        else np.ones((H, W), bool)
    if hole_c.any():
        tissue &= ~(grid.upsample(hole_c.astype(np.float32)) > 0.5)
    room_full = grid.upsample(room)
    edge_full_c = np.minimum(fterm, outline_term)

    # ---- vessel masks (full res)
    vessel = np.zeros((H, W), bool)
    for i, v in enumerate(vessels):
        R, rho, u, vv = _ellipse_patch(v["a"], v["b"], v["theta"])
        ang = np.arctan2(vv, u)
        wav = 1 + 0.05 * np.sin(3 * ang + i) + 0.03 * np.sin(5 * ang + 2 * i)
        rho = rho / wav
        v["R"], v["rho"] = R, rho.astype(np.float32)
        cy, cx = int(round(v["y"])), int(round(v["x"]))
        v["cy"], v["cx"] = cy, cx
        s = _patch_slices((H, W), cy, cx, R)
        if s is None:
            continue
        sl, ps = s
        vessel[sl] |= rho[ps] <= 1.0
    vessel &= tissue
    raw[vessel] = 0

    # ---- compartments before carving cells (for cell placement)
    def compartments_of(lab):
        comp = np.zeros((H, W), np.uint8)
        comp[tissue] = 2
        comp[tissue & (room_full <= 0)] = 3
        comp[lab > 0] = 1
        comp[vessel] = 4
        if vessel.any() and p["perivascular_width_um"] > 0:
            dv = cv2.distanceTransform((~vessel).astype(np.uint8), cv2.DIST_L2, 5)
            pv = (dv <= p["perivascular_width_um"] * um) & tissue & (comp >= 2) & (comp != 4)
            comp[pv] = 5
        return comp

    # ---- capillaries at fiber corners (endomysium)
    rng = G.rng_for(seed, "capillaries")
    capillaries = []
    n_fib_est = len(np.unique(raw)) - 1
    if p["capillaries_per_fiber"] > 0 and n_fib_est > 0:
        nf = ((raw == 0) & tissue & (room_full > 0) & ~vessel).astype(np.uint8)
        dt = cv2.distanceTransform(nf, cv2.DIST_L2, 5)
        k = 2 * int(round(2.5 * um)) + 1
        mx = cv2.dilate(dt, np.ones((k, k), np.uint8))
        cmask = (dt >= mx) & (dt >= max(0.6 * um, 1.0)) & (nf > 0)
        cy, cx = np.nonzero(cmask)
        del nf, dt, mx, cmask
        cc = np.column_stack([cx, cy]).astype(np.float64)
        n_cap = int(round(p["capillaries_per_fiber"] * n_fib_est))
        cpts, _ = _spaced(cc, 14 * um, rng, limit=n_cap)
        clo, chi = p["capillary_diameter_um"]
        carve = np.zeros((H, W), np.uint8)
        for (x, y) in cpts:
            d = rng.uniform(clo, chi) * um
            capillaries.append(dict(x=float(x), y=float(y), a=d / 2, kind="capillary"))
            cv2.circle(carve, (int(round(x)), int(round(y))), int(round(d / 2 + 0.5 * um)), 1, -1)
        raw[carve > 0] = 0

    # ---- macrophages / inflammatory cells
    comp_pre = compartments_of(raw)
    cellshapes = _place_cells(p, comp_pre, tissue, raw, rng=G.rng_for(seed, "cells"))

    # ---- final fibers
    min_px = p["min_fiber_area_um2"] * um * um
    fibers = G.clean_labels(raw, min_area_px=max(min_px, 4))
    nfib = int(fibers.max())
    raw_of = np.zeros(nfib + 1, np.int64)
    raw_of[fibers.ravel()] = raw.ravel()
    del raw
    comp = compartments_of(fibers)
    fdist = cv2.distanceTransform((fibers > 0).astype(np.uint8), cv2.DIST_L2, 5)
    # per-fiber centroid -> edge distance / fascicle / atrophy
    cnt = np.bincount(fibers.ravel(), minlength=nfib + 1).astype(np.float64)
    sx = np.zeros(nfib + 1)
    sy = np.zeros(nfib + 1)
    xrow = np.arange(W, dtype=np.float64)
    for y0 in range(0, H, 512):  # centroids in row chunks (no full-size coordinate arrays)
        blk = fibers[y0:y0 + 512]
        sx += np.bincount(blk.ravel(), weights=np.broadcast_to(xrow, blk.shape).ravel(),
                          minlength=nfib + 1)
        sy += np.bincount(blk.ravel(), weights=np.repeat(np.arange(y0, y0 + blk.shape[0],
                                                                   dtype=np.float64), W),
                          minlength=nfib + 1)
    cxf = sx[1:] / np.maximum(cnt[1:], 1)
    cyf = sy[1:] / np.maximum(cnt[1:], 1)
    edge_um = grid.sample(edge_full_c, cxf, cyf) * mpp
    seed_idx = raw_of[1:] - 1
    fascicle = fasc[seed_idx] if nfib else np.zeros(0, int)
    geo = _Geo(fibers=fibers, compartments=comp, tissue=tissue, fdist=fdist,
               edge_um=edge_um, fascicle=fascicle, vessels=vessels, capillaries=capillaries,
               cellshapes=cellshapes, holes=len(holes))
    room_full = None  # free it (the closure above is done with it)
    extra = dict(cx=cxf, cy=cyf, area_px=cnt[1:], atrophic=atro[seed_idx] if nfib else atro,
                 grid=grid)
    return geo, extra


def _cell_shape(rng, d_px, x, y, *, theta=None, elong=None):
    """Irregular macrophage outline + nucleus: returns a dict with patch arrays.

    ``d_px`` is the equivalent diameter; the outline is an ellipse of axis ratio ``elong``
    along ``theta`` (radians; random when None) with random low-order harmonics and one or two
    short processes.
    """
    if elong is None:
        elong = rng.uniform(0.6, 0.95)
    if theta is None:
        theta = rng.uniform(0, np.pi)
    a = 0.5 * d_px / math.sqrt(elong)  # keep the area of a disk of diameter d_px
    R = int(math.ceil(a * 1.45)) + 2
    yy, xx = np.mgrid[-R:R + 1, -R:R + 1].astype(np.float32)
    xx -= x - round(x)
    yy -= y - round(y)
    c, s = math.cos(theta), math.sin(theta)
    u = xx * c + yy * s
    v = (-xx * s + yy * c) / elong
    r = np.sqrt(u * u + v * v)
    ang = np.arctan2(v, u)
    rad = np.full_like(ang, a)
    for k in (2, 3, 4, 5, 7):
        rad = rad * (1 + rng.uniform(0, 0.2 / (k - 1) ** 0.8) * np.cos(k * ang + rng.uniform(0, 6.3)))
    for _ in range(int(rng.integers(0, 3))):  # short processes
        a0 = rng.uniform(-np.pi, np.pi)
        dang = np.angle(np.exp(1j * (ang - a0)))
        rad = rad * (1 + rng.uniform(0.15, 0.35) * np.exp(-0.5 * (dang / 0.25) ** 2))
    rho = r / rad
    mask = rho <= 1.0
    # nucleus: oval / kidney-shaped, off-centre, 35-50 % of the cell diameter
    na = 0.5 * d_px * rng.uniform(0.35, 0.5)
    nb = na * rng.uniform(0.55, 0.85)
    off = rng.uniform(0, 0.25) * 0.5 * d_px
    oa = rng.uniform(0, 2 * np.pi)
    nth = theta + rng.uniform(-0.4, 0.4)
    cn, sn = math.cos(nth), math.sin(nth)
    ux = xx - off * math.cos(oa)
    uy = yy - off * math.sin(oa)
    nu = (ux * cn + uy * sn) / na
    nv = (-ux * sn + uy * cn) / nb
    nv = nv + 0.25 * (nu ** 2) * (rng.random() < 0.5)  # bean shape
    nrho = np.sqrt(nu ** 2 + nv ** 2)
    nuc = (nrho <= 1.0) & (rho <= 0.85)
    return dict(x=float(x), y=float(y), d_px=float(d_px), R=R, rho=rho.astype(np.float32),
                mask=mask, nuc=nuc, cyr=int(round(y)), cxr=int(round(x)))


def _place_cells(p, comp, tissue, raw, *, rng) -> list:
    H, W = comp.shape
    mpp = p["mpp"]
    um = 1 / mpp
    tissue_mm2 = float(tissue.sum()) * mpp * mpp / 1e6
    n_total = int(round(p["cells_per_mm2"] * tissue_mm2))
    lo, hi = p["cell_diameter_um"]
    out = []
    nontiss = (comp >= 2) & (comp != 4)
    # clusters first
    clusters = []
    if p["n_clusters"] and n_total > 0:
        inner = np.zeros_like(tissue)
        bm = int(min(60 * um, 0.2 * min(H, W)))
        inner[bm:H - bm, bm:W - bm] = True  # keep clusters whole inside the image
        cidx = np.flatnonzero((((comp == 2) | (comp == 3) | (comp == 5)) & inner).ravel())
        if len(cidx):
            cents = rng.choice(cidx, int(p["n_clusters"]), replace=False) \
                if len(cidx) >= p["n_clusters"] else cidx
            for ci, c in enumerate(cents):
                size = int(rng.integers(p["cluster_size"][0], p["cluster_size"][1] + 1))
                clusters.append((ci, c % W, c // W, size))
    positions = []  # (x, y, cluster)
    placed = []
    for ci, x0, y0, size in clusters:
        spread = (4.0 + 2.2 * math.sqrt(size)) * um
        cand = rng.normal(0, spread, (size * 12, 2)) + (x0, y0)
        ok = (cand[:, 0] >= 0) & (cand[:, 0] < W) & (cand[:, 1] >= 0) & (cand[:, 1] < H)
        cand = cand[ok]
        iy, ix = cand[:, 1].astype(int), cand[:, 0].astype(int)
        cand = cand[tissue[iy, ix] & (comp[iy, ix] != 4)]
        got, _ = _spaced(cand, 0.75 * lo * um + 0.25 * hi * um * 0.5, rng, limit=size,
                         existing=placed)
        for q in got:
            positions.append((q[0], q[1], ci))
            placed.append((q[0], q[1]))
    n_scatter = max(0, n_total - len(positions))
    if n_scatter:
        wts = p["compartment_weights"]
        codes = {"endomysium": 2, "perimysium": 3, "perivascular": 5}
        pools = {k: np.flatnonzero((comp == codes[k]).ravel()) for k in wts}
        names = [k for k in wts if len(pools[k]) and wts[k] > 0]
        if not names:  # no connective tissue at all: any non-fiber tissue
            pools = {"any": np.flatnonzero(nontiss.ravel())}
            names = ["any"] if len(pools["any"]) else []
            wts = {"any": 1.0}
        if names:
            pr = np.array([wts[k] for k in names], float)
            counts = rng.multinomial(n_scatter, pr / pr.sum())
            for k, nk in zip(names, counts, strict=True):
                if nk == 0:
                    continue
                pick = rng.choice(pools[k], min(len(pools[k]), nk * 6), replace=False)
                cand = np.column_stack([pick % W, pick // W]).astype(float)
                cand += rng.uniform(-0.5, 0.5, cand.shape)
                got, _ = _spaced(cand, 0.6 * lo * um + 0.4 * 0.5 * (lo + hi) * um * 0.6, rng,
                                 limit=int(nk), existing=placed)
                for q in got:
                    positions.append((q[0], q[1], -1))
                    placed.append((q[0], q[1]))
    # orientation: along the nearest fiber border (cells squeezed between fibers are elongated)
    dfib = cv2.distanceTransform((raw == 0).astype(np.uint8), cv2.DIST_L2, 3)
    np.minimum(dfib, np.float32(H + W), out=dfib)
    # diameters: mostly 10-16 µm
    for x, y, ci in positions:
        d = float(np.clip(rng.normal(0.5 * (lo + hi) - 1, (hi - lo) / 5), lo, hi))
        iy, ix = min(max(int(y), 1), H - 2), min(max(int(x), 1), W - 2)
        gx = float(dfib[iy, ix + 1]) - float(dfib[iy, ix - 1])
        gy = float(dfib[iy + 1, ix]) - float(dfib[iy - 1, ix])
        near = dfib[iy, ix] < 0.5 * d * um
        theta = math.atan2(gy, gx) + np.pi / 2 if (gx or gy) else None
        elong = rng.uniform(0.4, 0.75) if near and ci < 0 else rng.uniform(0.65, 0.95)
        c = _cell_shape(rng, d * um, x, y, theta=theta, elong=elong)
        c["cluster"] = int(ci)
        out.append(c)
        # carve fibers under the cell (+1 µm) so cells sit between displaced fibers
        s = _patch_slices((H, W), c["cyr"], c["cxr"], c["R"])
        if s is None:
            continue
        sl, ps = s
        grow = c["rho"][ps] <= 1.0 + 1.5 * um / max(0.5 * c["d_px"], 1)
        raw[sl][grow] = 0
    return out


# ============================================================================================
# staining


def _fibrillar(rng, c2, s2, um, *, stripe: int = 256, length_um: float = 3.5):
    """Collagen-like fibrillar texture (float32, ~0..1) running along an orientation field.

    ``c2``, ``s2`` (float32, full resolution) are cos/sin of twice the fibril angle (doubled
    angles interpolate without wrap-around).  Thin-blurred white noise (0.5 µm) is averaged along
    the local direction with Gaussian weights over ±2 ``length_um`` (a line-integral
    convolution with bilinear ``cv2.remap`` steps of 1.5 µm), processed in stripes of ``stripe``
    rows so the temporaries stay small.
    """
    H, W = c2.shape
    noise = G.fine_noise(rng, (H, W), max(0.5 * um, 0.6))
    step = max(1.0, 1.5 * um)
    K = int(math.ceil(2 * length_um * um / step))
    wts = np.exp(-0.5 * ((np.arange(-K, K + 1) * step) / (length_um * um)) ** 2)
    wts = (wts / np.sqrt((wts ** 2).sum())).astype(np.float32)
    halo = int(math.ceil(K * step)) + 2
    out = np.empty((H, W), np.float32)
    xs = np.arange(W, dtype=np.float32)[None, :]
    for y0 in range(0, H, stripe):
        y1 = min(H, y0 + stripe)
        a, b = max(0, y0 - halo), min(H, y1 + halo)
        src = noise[a:b]
        theta = 0.5 * np.arctan2(s2[y0:y1], c2[y0:y1])
        dx = (np.cos(theta) * step).astype(np.float32)
        dy = (np.sin(theta) * step).astype(np.float32)
        ys = np.arange(y0 - a, y1 - a, dtype=np.float32)[:, None]
        acc = np.zeros((y1 - y0, W), np.float32)
        for k, wk in zip(range(-K, K + 1), wts, strict=True):
            mx = xs + k * dx
            my = ys + k * dy
            acc += wk * cv2.remap(src, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        out[y0:y1] = 0.5 + 0.5 * np.tanh(0.9 * acc)
    return out


def _stain(p, geo: _Geo, extra) -> dict:
    H, W = p["shape"]
    mpp = p["mpp"]
    um = 1 / mpp
    seed = p["seed"]
    marker = p["marker"]
    fibers, comp, tissue = geo.fibers, geo.compartments, geo.tissue
    nfib = int(fibers.max())
    is_he = marker == "HE"
    rng = G.rng_for(seed, "stain-texture")

    hema = np.zeros((H, W), np.float32)
    dab = np.zeros((H, W), np.float32)
    eos = np.zeros((H, W), np.float32) if is_he else None

    fmask = fibers > 0
    # orientation of connective tissue: parallel to the nearest fiber border
    dfib = cv2.distanceTransform((~fmask).astype(np.uint8), cv2.DIST_L2, 3)
    np.minimum(dfib, np.float32(H + W), out=dfib)  # no fibers at all: finite, flat field
    # fibril angle = border tangent, smoothed as a doubled angle (opposite gradients do not
    # cancel) on a 4x coarser grid, plus a wavy random perturbation
    q = 4
    hq, wq = -(-H // q), -(-W // q)
    dq = cv2.resize(dfib, (wq, hq), interpolation=cv2.INTER_AREA)
    gy, gx = np.gradient(dq)
    c2 = cv2.GaussianBlur(gx * gx - gy * gy, (0, 0), 6.0 * um / q)
    s2 = cv2.GaussianBlur(2 * gx * gy, (0, 0), 6.0 * um / q)
    ang = 0.5 * np.arctan2(s2, c2) + np.pi / 2 + 0.45 * G.smooth_noise(rng, (hq, wq), 12 * um / q)
    c2 = cv2.resize(np.cos(2 * ang).astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    s2 = cv2.resize(np.sin(2 * ang).astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    del gy, gx, dq, ang
    # fiber baseline: faint stippled counterstain, slow mottling, per-fiber tint
    ftint = np.r_[0, rng.uniform(0.75, 1.25, nfib)].astype(np.float32)
    grain = G.fine_noise(rng, (H, W), 0.5 * um)
    mottle = G.smooth_noise(rng, (H, W), 4 * um)
    ftex = 1 + 0.10 * grain + 0.08 * mottle
    base_f = (0.045 if not is_he else 0.025) * ftint[fibers]
    hema[fmask] = (base_f * ftex)[fmask]
    del base_f
    # connective tissue: fibrillar collagen, loose perimysium with empty spaces
    coll = _fibrillar(rng, c2, s2, um)
    del c2, s2
    endo = comp == 2
    peri = (comp == 3) | (comp == 5)
    loose = G.smooth_noise(rng, (H, W), 6 * um)
    retraction = np.clip((loose - 0.5) / 0.5, 0, 1).astype(np.float32)
    hema[endo] = (0.10 * (0.55 + 0.7 * coll))[endo]
    hema[peri] = (0.08 * (0.15 + 1.1 * coll) * (1 - 0.85 * retraction))[peri]
    if is_he:
        tint_e = np.r_[0, rng.uniform(0.85, 1.15, nfib)].astype(np.float32)
        eos[fmask] = (0.30 * tint_e[fibers] * (1 + 0.05 * grain + 0.05 * mottle))[fmask]
        eos[endo] = (0.16 * (0.55 + 0.7 * coll))[endo]
        eos[peri] = (0.14 * (0.25 + 1.1 * coll) * (1 - 0.8 * retraction))[peri]
    # non-specific DAB background (not cells)
    if not is_he:
        bgf = np.clip(1 + 0.5 * G.smooth_noise(rng, (H, W), 80 * um), 0.2, 2.0)
        bg = p["background_dab"] * bgf
        conn = tissue & ~fmask
        dab[fmask] = (bg * ftex)[fmask]
        dab[conn] = (1.25 * bg * (0.4 + 0.9 * coll) * (1 - 0.6 * retraction))[conn]
        # a few faint blotches in connective tissue, clearly below 1+
        blot = G.smooth_noise(rng, (H, W), 12 * um)
        bl = np.clip(blot - 1.8, 0, None) * 0.12
        np.minimum(bl, 0.12, out=bl)
        dab[conn] += bl[conn]
        del bgf, bg, blot, bl, conn
    del endo, peri, grain, coll, loose, retraction, mottle, ftex

    # ---- vessels
    vtab = []
    rngv = G.rng_for(seed, "vessel-stain")
    nuclei = []  # (x, y, a, b, theta, hema, dab, kind, diameter_um, positive)
    endo_pos_frac = {"MHC-I": 1.0, "IL-1a": 0.25 + 0.65 * p["expression"],
                     "IL-1b": 0.1 + 0.3 * p["expression"],
                     "IL-1Ra": 0.15 + 0.4 * p["expression"]}.get(marker, 0.0)
    endo_od = {"MHC-I": (0.5, 0.9)}.get(marker, (0.3, 0.3 + 0.5 * p["expression"]))
    for v in geo.vessels:
        s = _patch_slices((H, W), v["cy"], v["cx"], v["R"])
        if s is None:
            continue
        sl, ps = s
        rho = v["rho"][ps]
        inner = 1 - v["wall"]
        wall = (rho <= 1) & (rho > inner)
        lumen = rho <= inner
        endol = (rho > inner) & (rho <= inner + 0.25 * v["wall"] + 1.2 * um / v["a"])
        vt = tissue[sl]
        h = hema[sl]
        # concentric lamellae of the media (smooth muscle / elastic layers)
        lam = 0.8 + 0.25 * np.sin(2 * np.pi * (rho - inner) / max(v["wall"], 1e-3)
                                  * rngv.uniform(2.5, 4.0) + rngv.uniform(0, 6.3))
        h[wall & vt] = ((0.14 + 0.05 * rngv.random()) * lam)[wall & vt]
        h[lumen & vt] = 0.0
        if is_he:
            e = eos[sl]
            e[wall & vt] = 0.38
            e[lumen & vt] = 0.0
        pos = rngv.random() < endo_pos_frac
        d = dab[sl]
        d[lumen & vt] = 0.0
        if not is_he:
            d[wall & vt] = p["background_dab"] * 1.2
            if pos:
                lvl = rngv.uniform(*endo_od) * p["dab_strength"]
                d[endol & vt] = lvl
                if marker == "MHC-I":
                    d[wall & ~endol & vt] = 0.35 * lvl
        # red blood cells in the lumen (eosinophilic in H&E, faint in IHC)
        nrbc = int(rngv.integers(0, 6))
        for _ in range(nrbc):
            rr = rngv.uniform(0, inner * 0.8)
            aa = rngv.uniform(0, 2 * np.pi)
            x = v["x"] + rr * v["a"] * math.cos(aa)
            y = v["y"] + rr * v["b"] * math.sin(aa)
            nuclei.append(_Nuc(x, y, 3.5 * um, 3.5 * um, 0.0, 0.02, 0.0, "rbc", 7.0, False))
        # wall nuclei: circumferential elongated
        nwn = int(max(3, 2 * np.pi * v["a"] * mpp / 14))
        for _ in range(nwn):
            aa = rngv.uniform(0, 2 * np.pi)
            rr = rngv.uniform(inner + 0.15 * v["wall"], 1 - 0.15 * v["wall"])
            c, sn = math.cos(v["theta"]), math.sin(v["theta"])
            lx, ly = rr * v["a"] * math.cos(aa), rr * v["b"] * math.sin(aa)
            x = v["x"] + lx * c - ly * sn
            y = v["y"] + lx * sn + ly * c
            nuclei.append(_Nuc(x, y, 4.5 * um, 1.4 * um, math.atan2(y - v["y"], x - v["x"]) + np.pi / 2,
                           rngv.uniform(0.45, 0.7), 0.0, "endothelial_nucleus", 5.0, False))
        m = wall & vt  # positivity of a vessel: mean DAB of its wall (lumen excluded)
        dmean = float(d[m].mean()) if m.any() else 0.0
        vtab.append(dict(x_px=v["x"], y_px=v["y"], diameter_um=2 * v["a"] * mpp,
                         kind=v["kind"], dab_od_mean=dmean))
    # ---- capillaries
    cap_od = np.zeros(len(geo.capillaries))
    for i, c in enumerate(geo.capillaries):
        pos = rngv.random() < endo_pos_frac
        R, rho, _, _ = _ellipse_patch(c["a"], c["a"] * rngv.uniform(0.75, 1.0),
                                      rngv.uniform(0, np.pi),
                                      sub=(c["x"] - round(c["x"]), c["y"] - round(c["y"])))
        cy, cx = int(round(c["y"])), int(round(c["x"]))
        s = _patch_slices((H, W), cy, cx, R)
        if s is None:
            continue
        sl, ps = s
        rho = rho[ps]
        ring = (rho <= 1) & (rho > 0.45)
        lum = rho <= 0.45
        t = tissue[sl] & (fibers[sl] == 0)
        hema[sl][ring & t] = 0.17
        hema[sl][lum & t] = 0.08
        if is_he:
            eos[sl][ring & t] = 0.35
            eos[sl][lum & t] = 0.55  # a red cell in the lumen
        elif pos:
            lvl = rngv.uniform(*endo_od) * p["dab_strength"]
            dab[sl][ring & t] = lvl
            dab[sl][lum & t] = 0.3 * lvl
        if rngv.random() < 0.3:
            ang = rngv.uniform(0, 2 * np.pi)
            nuclei.append(_Nuc(c["x"] + 0.7 * c["a"] * math.cos(ang), c["y"] + 0.7 * c["a"] * math.sin(ang),
                           3.0 * um, 1.3 * um, ang + np.pi / 2, rngv.uniform(0.45, 0.65), 0.0,
                           "endothelial_nucleus", 4.0, False))
        m = ring & t  # endothelial ring, lumen excluded
        cap_od[i] = float(dab[sl][m].mean()) if m.any() else 0.0
        vtab.append(dict(x_px=c["x"], y_px=c["y"], diameter_um=2 * c["a"] * mpp,
                         kind="capillary", dab_od_mean=cap_od[i]))

    # ---- fiber marker content
    fdist = geo.fdist
    fiber_pos = np.zeros(nfib + 1, bool)
    fiber_grade_int = np.zeros(nfib + 1, int)
    rngf = G.rng_for(seed, "fiber-marker")
    if marker == "MHC-I" and nfib:
        npos = int(round(p["positive_fiber_fraction"] * nfib))
        if p["perifascicular_pattern"]:
            # distance from the fiber's border (not centre) to the perimysium
            gap = geo.edge_um - np.sqrt(extra["area_px"] / np.pi) * mpp
            wgt = np.exp(-np.maximum(gap, 0) / 25.0) + 0.03
        else:
            wgt = np.ones(nfib)
        chosen = rngf.choice(nfib, npos, replace=False, p=wgt / wgt.sum()) + 1 if npos else []
        fiber_pos[chosen] = True
        g = rngf.choice([1, 2, 3], nfib + 1, p=p["fiber_grade_weights"])
        fiber_grade_int[fiber_pos] = g[fiber_pos]
        target = {1: (0.27, 0.36), 2: (0.47, 0.56), 3: (0.7, 0.95)}
        rim_lvl = np.zeros(nfib + 1, np.float32)
        int_lvl = np.zeros(nfib + 1, np.float32)
        for f in np.flatnonzero(fiber_pos):
            rim_lvl[f] = rngf.uniform(*target[fiber_grade_int[f]])
            if rngf.random() < p["sarcoplasmic_fraction"]:
                int_lvl[f] = rim_lvl[f] * rngf.uniform(0.6, 0.9)
            else:
                int_lvl[f] = rim_lvl[f] * rngf.uniform(0.1, 0.3)
        neg = ~fiber_pos
        neg[0] = False
        rim_lvl[neg] = rngf.uniform(0.02, 0.09, int(neg.sum()))
        rim_lvl *= p["dab_strength"]
        int_lvl *= p["dab_strength"]
        rw = 2.2 * um
        prof = np.clip((rw + 0.8 * um - fdist) / (0.8 * um), 0, 1)  # 1 in the band, falls off
        tex = 1 + 0.12 * G.fine_noise(rngf, (H, W), 0.7 * um)
        val = (rim_lvl[fibers] * prof + int_lvl[fibers] * (1 - prof)) * tex
        np.maximum(dab, np.where(fmask, val, 0), out=dab)
        del prof, tex, val
    elif marker in ("IL-1a", "IL-1b", "IL-1Ra") and nfib:
        e = p["expression"]
        frac = min(0.95, e * {"IL-1a": 0.7, "IL-1b": 0.45, "IL-1Ra": 0.95}[marker])
        npos = int(round(frac * nfib))
        chosen = rngf.choice(nfib, npos, replace=False) + 1 if npos else []
        fiber_pos[chosen] = True
        lvl = np.zeros(nfib + 1, np.float32)
        lvl[fiber_pos] = (0.12 + 0.6 * e) * rngf.uniform(0.55, 1.35, int(fiber_pos.sum()))
        lvl *= p["dab_strength"]
        patch = G.smooth_noise(rngf, (H, W), 12 * um)
        gran = G.fine_noise(rngf, (H, W), 0.9 * um)
        patchw = np.clip((patch + 0.3) / 1.0, 0, 1)  # ~60 % of a positive fiber
        val = lvl[fibers] * patchw * np.clip(0.7 + 0.35 * gran, 0.1, 1.8)
        np.maximum(dab, np.where(fmask, val, 0), out=dab)
        inter = tissue & ~fmask & (comp != 4)
        dab[inter] += (0.06 * e * p["dab_strength"])
        del patch, gran, patchw, val

    # ---- nuclei: myonuclei, internal nuclei, interstitial nuclei
    rngn = G.rng_for(seed, "nuclei")
    n_internal = np.zeros(nfib + 1, int)
    if nfib:
        # perimeter ~ 2 sqrt(pi A)
        per_um = 2 * np.sqrt(np.pi * extra["area_px"]) * mpp
        nmyo = rngn.poisson(p["myonuclei_per_100um"] * per_um / 100)
        ring = (fdist >= 1.2 * um) & (fdist <= 2.6 * um)
        idx = np.flatnonzero(ring.ravel())
        lab = fibers.ravel()[idx]
        sel = G.pick_pixels_per_label(lab, idx, np.r_[0, nmyo], rngn)
        gy, gx = np.gradient(fdist)
        for k in sel:
            y, x = divmod(int(k), W)
            th = math.atan2(gy[y, x], gx[y, x]) + np.pi / 2
            a = rngn.uniform(2.6, 4.2) * um
            b = rngn.uniform(1.3, 1.9) * um
            nuclei.append(_Nuc(x + rngn.uniform(-.5, .5), y + rngn.uniform(-.5, .5), a, b, th,
                           rngn.uniform(0.4, 0.7), 0.0, "myonucleus", 2 * math.sqrt(a * b) * mpp,
                           False))
        del gy, gx
        has = rngn.random(nfib) < p["central_nuclei_fraction"]
        n_internal[1:][has] = 1 + (rngn.random(int(has.sum())) < 0.3)
        if has.any():
            mxd = np.zeros(nfib + 1, np.float32)
            np.maximum.at(mxd, fibers[fmask], fdist[fmask])
            central = fdist >= 0.65 * mxd[fibers]
            central &= fmask & (n_internal[fibers] > 0)
            idx = np.flatnonzero(central.ravel())
            lab = fibers.ravel()[idx]
            sel = G.pick_pixels_per_label(lab, idx, n_internal, rngn)
            for k in sel:
                y, x = divmod(int(k), W)
                a = rngn.uniform(2.2, 3.2) * um
                b = a * rngn.uniform(0.7, 1.0)
                nuclei.append(_Nuc(x + .5, y + .5, a, b, rngn.uniform(0, np.pi),
                               rngn.uniform(0.4, 0.65), 0.0, "internal_nucleus",
                               2 * math.sqrt(a * b) * mpp, False))
            # recount: a fiber's internal nuclei are those actually drawn
            n_internal[:] = 0
            np.add.at(n_internal, fibers.ravel()[sel], 1)
    # interstitial nuclei
    tissue_mm2 = float(tissue.sum()) * mpp * mpp / 1e6
    n_int = int(rngn.poisson(p["interstitial_nuclei_per_mm2"] * tissue_mm2))
    if n_int:
        idx_e = np.flatnonzero((comp == 2).ravel())
        idx_p = np.flatnonzero(((comp == 3) | (comp == 5)).ravel())
        ne = n_int // 2 if len(idx_p) else n_int
        picks = []
        if len(idx_e):
            picks.append(rngn.choice(idx_e, min(ne, len(idx_e)), replace=False))
        if len(idx_p):
            picks.append(rngn.choice(idx_p, min(n_int - ne, len(idx_p)), replace=False))
        picks = np.concatenate(picks) if picks else np.zeros(0, int)
        gy, gx = np.gradient(cv2.GaussianBlur(dfib, (0, 0), 1.5 * um))
        for k in picks:
            y, x = divmod(int(k), W)
            th = math.atan2(gy[y, x], gx[y, x]) + np.pi / 2
            a = rngn.uniform(2.6, 4.6) * um
            b = rngn.uniform(1.2, 2.0) * um
            nuclei.append(_Nuc(x + .5, y + .5, a, b, th, rngn.uniform(0.45, 0.8), 0.0,
                           "interstitial_nucleus", 2 * math.sqrt(a * b) * mpp, False))
        del gy, gx

    # ---- Ki67-like nuclear marker
    if marker == "Ki67":
        rk = G.rng_for(seed, "ki67")
        for i, n in enumerate(nuclei):
            if n.kind in ("interstitial_nucleus", "myonucleus", "internal_nucleus",
                        "endothelial_nucleus") and rk.random() < p["positive_nucleus_fraction"]:
                lvl = rk.choice([rk.uniform(0.27, 0.36), rk.uniform(0.47, 0.56),
                                 rk.uniform(0.7, 0.95)]) * p["dab_strength"]
                nuclei[i] = n._replace(hema=0.35 * n.hema, dab=lvl, positive=True)

    # ---- draw nuclei (ellipses) with chromatin texture
    nuc_h = np.zeros((H, W), np.float32)
    nuc_d = np.zeros((H, W), np.float32)
    nuc_e = np.zeros((H, W), np.float32) if is_he else None
    SH = 4
    for (x, y, a, b, th, h, d, k, _dia, _pos) in nuclei:
        c = (int(round(x * (1 << SH))), int(round(y * (1 << SH))))
        ax = (max(1, int(round(a * (1 << SH)))), max(1, int(round(b * (1 << SH)))))
        ang = math.degrees(th)
        if k == "rbc":
            if is_he:
                cv2.ellipse(nuc_e, c, ax, ang, 0, 360, 0.7, -1, cv2.LINE_8, SH)
            else:
                cv2.ellipse(nuc_d, c, ax, ang, 0, 360, 0.06, -1, cv2.LINE_8, SH)
            continue
        cv2.ellipse(nuc_h, c, ax, ang, 0, 360, float(h), -1, cv2.LINE_8, SH)
        if d > 0:
            cv2.ellipse(nuc_d, c, ax, ang, 0, 360, float(d), -1, cv2.LINE_8, SH)
    chrom = np.clip(1 + 0.25 * G.fine_noise(rngn, (H, W), 0.45 * um), 0.4, 1.6)
    nuc_h *= chrom
    del chrom
    nm = nuc_h > 0
    nuc_h *= p["counterstain"]
    hema *= p["counterstain"]
    hema[nm] = np.maximum(hema[nm], nuc_h[nm])
    if is_he:
        eos[nm] = 0.25 * eos[nm] + 0.1
        em = nuc_e > 0
        eos[em] = nuc_e[em]
    else:
        dm = nuc_d > 0
        dab[dm] = np.maximum(dab[dm], nuc_d[dm])
    del nuc_h, nuc_d

    # ---- macrophages / inflammatory cells
    rngc = G.rng_for(seed, "cell-stain")
    cells = geo.cellshapes
    cell_kind = "macrophage" if marker in ("CD163", "none", "HE", "Ki67") else "inflammatory_cell"
    wts = p["cell_grade_weights"]
    target = {1: (0.27, 0.36), 2: (0.47, 0.56), 3: (0.7, 1.0)}
    cell_rows = []
    stained = marker in ("CD163", "MHC-I", "IL-1a", "IL-1b", "IL-1Ra")
    for c in cells:
        s = _patch_slices((H, W), c["cyr"], c["cxr"], c["R"])
        if s is None:
            c["skip"] = True
            continue
        sl, ps = s
        rho, mask, nuc = c["rho"][ps], c["mask"][ps], c["nuc"][ps]
        mask = mask & tissue[sl]
        if not mask.any():
            c["skip"] = True
            continue
        nucm = nuc & mask
        if stained and rngc.random() >= p["negative_cell_fraction"]:
            g = int(rngc.choice([1, 2, 3], p=wts))
            tgt = rngc.uniform(*target[g]) * p["dab_strength"]
            ringw = np.clip((rho - 0.7) / 0.3, 0, 1)
            prof = (0.75 + 0.6 * ringw) * (1 + 0.15 * rngc.standard_normal(rho.shape))
            prof[nucm] *= 0.35
            prof = np.clip(prof, 0.05, None)
            prof *= tgt / max(float(prof[mask].mean()), 1e-6)
            dpatch = np.where(mask, prof, 0).astype(np.float32)
        else:
            lvl = rngc.uniform(0.03, 0.12) if stained else 0.0
            dpatch = np.where(mask, lvl, 0).astype(np.float32)
        if not is_he:
            np.maximum(dab[sl], dpatch, out=dab[sl])
        hp = np.where(mask, 0.07, 0).astype(np.float32)
        hp[nucm] = rngc.uniform(0.22, 0.4) * p["counterstain"] * (
            1 + 0.12 * rngc.standard_normal(int(nucm.sum())))
        np.maximum(hema[sl], hp, out=hema[sl])
        if is_he:
            ep = np.where(mask, 0.22, 0).astype(np.float32)
            ep[nucm] = 0.08
            eos[sl][mask] = ep[mask]
        c["sl"], c["ps"] = sl, ps
    # measure every cell on the final DAB map over its own mask
    for c in cells:
        if c.get("skip"):
            continue
        sl, ps = c["sl"], c["ps"]
        mask = c["mask"][ps] & tissue[sl]
        ys, xs = np.nonzero(mask)
        od = float(dab[sl][mask].mean())
        cx = sl[1].start + xs.mean()
        cy = sl[0].start + ys.mean()
        cell_rows.append(dict(x_px=cx, y_px=cy, diameter_um=c["d_px"] * mpp, dab_od_mean=od,
                              cluster_id=c["cluster"], kind=cell_kind))
    # nuclei rows
    nuc_rows = []
    for n in nuclei:
        if n.kind == "rbc" or not (0 <= n.x < W and 0 <= n.y < H):
            continue
        nuc_rows.append(dict(x_px=float(n.x), y_px=float(n.y), diameter_um=float(n.diameter_um),
                             dab_od_mean=float(n.dab) if n.dab > 0 else np.nan,
                             cluster_id=-1, kind=n.kind))
    rows = cell_rows + nuc_rows
    cdf = pd.DataFrame(rows, columns=["x_px", "y_px", "diameter_um", "dab_od_mean",
                                      "cluster_id", "kind"])
    if len(cdf):
        ix = np.clip(cdf["x_px"].to_numpy().astype(int), 0, W - 1)
        iy = np.clip(cdf["y_px"].to_numpy().astype(int), 0, H - 1)
        nanm = cdf["dab_od_mean"].isna().to_numpy()
        cdf.loc[nanm, "dab_od_mean"] = dab[iy[nanm], ix[nanm]]
        cdf["compartment"] = [COMPARTMENTS[int(c)] for c in comp[iy, ix]]
        grade = _grade(cdf["dab_od_mean"].to_numpy())
        if marker == "Ki67":
            posm = cdf["kind"].isin(["interstitial_nucleus", "myonucleus", "internal_nucleus",
                                     "endothelial_nucleus", "macrophage"])
        else:
            posm = cdf["kind"].isin(["macrophage", "inflammatory_cell"])
        grade = np.where(posm.to_numpy(), grade, 0)
        cdf["grade"] = grade.astype(int)
        cdf["positive"] = grade > 0
        cdf = cdf[tissue[iy, ix]].reset_index(drop=True)
    else:
        cdf["compartment"] = []
        cdf["grade"] = []
        cdf["positive"] = []
    cdf.insert(0, "id", np.arange(1, len(cdf) + 1))
    cdf["x_um"] = cdf["x_px"] * mpp
    cdf["y_um"] = cdf["y_px"] * mpp
    cdf = cdf[CELL_COLUMNS]
    cdf = cdf.astype({"id": int, "positive": bool, "grade": int, "cluster_id": int})

    # ---- clean up maps
    np.clip(hema, 0, None, out=hema)
    np.clip(dab, 0, None, out=dab)
    outside = ~tissue
    hema[outside] = 0
    dab[outside] = 0
    if is_he:
        eos[outside] = 0
        dab[:] = 0

    # ---- fiber truth
    rim_px = p["truth_rim_width_um"] * um
    labs = fibers.ravel()
    rim = (fdist.ravel() <= rim_px)
    nb = nfib + 1
    rim_n = np.bincount(labs[rim], minlength=nb)
    rim_s = np.bincount(labs[rim], weights=dab.ravel()[rim], minlength=nb)
    in_n = np.bincount(labs[~rim], minlength=nb)
    in_s = np.bincount(labs[~rim], weights=dab.ravel()[~rim], minlength=nb)
    rim_od = rim_s / np.maximum(rim_n, 1)
    int_od = np.where(in_n > 0, in_s / np.maximum(in_n, 1), rim_od)
    mean_od = (rim_s + in_s) / np.maximum(rim_n + in_n, 1)
    ids = np.arange(1, nb)
    area_um2 = extra["area_px"] * mpp * mpp
    feret = G.min_feret_px(fibers, nfib) * mpp
    score = np.maximum(rim_od, int_od)[1:]
    fgrade = _grade(score)
    ftab = pd.DataFrame({
        "id": ids, "area_um2": area_um2, "x_px": extra["cx"], "y_px": extra["cy"],
        "x_um": extra["cx"] * mpp, "y_um": extra["cy"] * mpp, "min_feret_um": feret,
        "n_internal_nuclei": n_internal[1:], "rim_od": rim_od[1:], "interior_od": int_od[1:],
        "dab_od_mean": mean_od[1:], "grade": fgrade, "positive": fgrade > 0,
        "edge_distance_um": geo.edge_um,
        "perifascicular": (geo.edge_um - np.sqrt(area_um2 / np.pi)) <= 15.0,
        "fascicle": geo.fascicle.astype(int), "atrophic": np.asarray(extra["atrophic"], bool),
        "touches_image_edge": _touches_edge(fibers, nfib),
    })
    if marker != "MHC-I":
        # IL-1 family: per-fiber positivity is the mean OD; keep the rim/interior numbers
        ftab["positive"] = ftab["grade"] > 0
    vdf = pd.DataFrame(vtab, columns=["x_px", "y_px", "diameter_um", "kind", "dab_od_mean"])
    vdf.insert(0, "id", np.arange(1, len(vdf) + 1))
    vdf["positive"] = vdf["dab_od_mean"] >= GRADE_OD[0]
    return dict(hema=hema, dab=dab, eos=eos, cells=cdf, fibers=ftab, vessels=vdf)


def _touches_edge(fibers, n):
    t = np.zeros(n + 1, bool)
    for e in (fibers[0], fibers[-1], fibers[:, 0], fibers[:, -1]):
        t[e] = True
    return t[1:]


# ============================================================================================
# optics


def _rotate(v, deg, rng):
    v = np.asarray(v, float)
    v = v / np.linalg.norm(v)
    if deg == 0:
        return v
    r = rng.standard_normal(3)
    axis = np.cross(v, r)
    axis /= np.linalg.norm(axis)
    t = math.radians(deg)
    out = v * math.cos(t) + np.cross(axis, v) * math.sin(t) + axis * np.dot(axis, v) * (1 - math.cos(t))
    out = np.clip(out, 1e-3, None)
    return out / np.linalg.norm(out)


def _stain_model(p) -> StainModel:
    rng = G.rng_for(p["batch_seed"], "batch-stains")
    he = p["marker"] == "HE"
    base = PRESETS["H-E" if he else "H-DAB"]
    names = base.names
    if p["stain_vectors"] is not None:
        vec = np.asarray(p["stain_vectors"], float)[:2]
    elif he:
        # eosin as measured on real muscle H&E (absorbs green and some blue: pink, not magenta)
        vec = np.vstack([base.vectors[0], EOSIN_MUSCLE])
    else:
        vec = np.asarray(base.vectors[:2])
    vec = np.vstack([_rotate(v, p["vector_jitter_deg"], rng) for v in vec])
    if p["background"] is not None:
        bg = p["background"]
    else:
        base_i = rng.uniform(232, 246)
        bg = tuple(float(np.clip(base_i + rng.uniform(-4, 4), 200, 254)) for _ in range(3))
    return StainModel(names, vec, bg, source="synthetic")


def _render(p, hema, second, model: StainModel) -> np.ndarray:
    H, W = p["shape"]
    mpp = p["mpp"]
    um = 1 / mpp
    rng = G.rng_for(p["batch_seed"], "illumination")
    V = np.asarray(model.vectors, np.float32)  # rows: stain 0, 1, residual
    I0 = np.asarray(model.background, np.float32)
    s = p["illumination"]
    gdir = rng.uniform(0, 2 * np.pi)
    vc = rng.uniform(0.3, 0.7, 2) * (W, H)
    diag = math.hypot(H, W)
    sigma = p["blur_um"] * um
    halo = int(math.ceil(4 * sigma)) + 2 if sigma > 0.3 else 0
    CH = int(np.clip((1 << 21) // W, 64, 1024))  # ~2 Mpx per chunk
    out = np.empty((H, W, 3), np.uint8)
    xs = np.arange(W, dtype=np.float32)
    ln10 = np.float32(math.log(10.0))
    for y0 in range(0, H, CH):
        y1 = min(H, y0 + CH)
        a, b = max(0, y0 - halo), min(H, y1 + halo)
        hy = hema[a:b]
        sy = second[a:b]
        ys = np.arange(a, b, dtype=np.float32)[:, None]
        lin = ((xs[None, :] - W / 2) * math.cos(gdir) + (ys - H / 2) * math.sin(gdir)) / diag
        r2 = ((xs[None, :] - vc[0]) ** 2 + (ys - vc[1]) ** 2) / (0.5 * diag) ** 2
        illum = 1 + s * (0.6 * lin - 0.5 * r2)
        img = np.empty((b - a, W, 3), np.float32)
        for c in range(3):
            od = hy * V[0, c] + sy * V[1, c]
            img[..., c] = I0[c] * illum * np.exp(-ln10 * od)
        if halo:
            img = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        img = img[y0 - a:y0 - a + (y1 - y0)]
        if p["noise"] > 0:
            rn = G.rng_for(p["batch_seed"], f"noise-{y0}")
            # shot noise ~ sqrt(I) scaled so std = `noise` at the background level
            std = p["noise"] * np.sqrt(np.maximum(img, 1.0) / float(I0.mean()))
            img += std * rn.standard_normal(img.shape, dtype=np.float32)
        np.clip(np.rint(img), 0, 255, out=img)
        out[y0:y1] = img.astype(np.uint8)
    if p["jpeg_quality"] is not None:
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY,
                                                         int(p["jpeg_quality"])])
        out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return out


# ============================================================================================
# summary


def _pixel_scores(dab, mask):
    n = int(mask.sum())
    if n == 0:
        return dict(positive_area_pct=0.0, weak_area_pct=0.0, moderate_area_pct=0.0,
                    strong_area_pct=0.0, h_score=0.0, dab_mean_od=0.0)
    v = dab[mask]
    w = float(((v >= 0.2) & (v < 0.4)).sum()) / n * 100
    m = float(((v >= 0.4) & (v < 0.6)).sum()) / n * 100
    s = float((v >= 0.6).sum()) / n * 100
    return dict(positive_area_pct=w + m + s, weak_area_pct=w, moderate_area_pct=m,
                strong_area_pct=s, h_score=w + 2 * m + 3 * s, dab_mean_od=float(v.mean()))


def _summary(p, geo: _Geo, st: dict) -> dict:
    mpp = p["mpp"]
    comp, tissue = geo.compartments, geo.tissue
    px_mm2 = mpp * mpp / 1e6
    tissue_mm2 = float(tissue.sum()) * px_mm2
    cells, ft, vt = st["cells"], st["fibers"], st["vessels"]
    nfib = len(ft)
    mac = cells[cells["kind"].isin(["macrophage", "inflammatory_cell"])]
    pos = cells[cells["positive"]]
    s = {
        "marker": p["marker"], "mpp": mpp, "shape": list(p["shape"]),
        "tissue_area_mm2": tissue_mm2,
        "n_fibers": nfib,
        "n_fibers_complete": int((~ft["touches_image_edge"]).sum()) if nfib else 0,
        "median_fiber_area_um2": float(ft["area_um2"].median()) if nfib else float("nan"),
        "mean_min_feret_um": float(ft["min_feret_um"].mean()) if nfib else float("nan"),
        "n_atrophic_fibers": int(ft["atrophic"].sum()) if nfib else 0,
        "n_fibers_with_internal_nuclei": int((ft["n_internal_nuclei"] > 0).sum()) if nfib else 0,
        "n_vessels": int((vt["kind"] != "capillary").sum()),
        "n_capillaries": int((vt["kind"] == "capillary").sum()),
        "n_positive_capillaries": int(((vt["kind"] == "capillary") & vt["positive"]).sum()),
        "n_positive_vessels": int(((vt["kind"] != "capillary") & vt["positive"]).sum()),
        "n_holes": geo.holes,
    }
    for code, name in COMPARTMENTS.items():
        if code:
            s[f"{name}_area_mm2"] = float((comp == code).sum()) * px_mm2
    s["n_cells"] = int(len(mac))
    s["n_positive_cells"] = int(len(pos))
    s["positive_cells_per_mm2"] = len(pos) / tissue_mm2 if tissue_mm2 else float("nan")
    s["cells_per_mm2"] = s["positive_cells_per_mm2"]
    s["positive_cells_per_100_fibers"] = 100 * len(pos) / nfib if nfib else float("nan")
    for name in ("endomysium", "perimysium", "perivascular"):
        n = int(((pos["compartment"] == name) | ((name == "perivascular")
                                                 & (pos["compartment"] == "vessel"))).sum())
        s[f"n_positive_cells_{name}"] = n
        area = s[f"{name}_area_mm2"] + (s["vessel_area_mm2"] if name == "perivascular" else 0)
        s[f"positive_cells_per_mm2_{name}"] = n / area if area > 0 else float("nan")
    cl = pos[pos["cluster_id"] >= 0].groupby("cluster_id").size()
    s["n_clusters"] = int((cl >= 10).sum())
    g = pos["grade"].value_counts()
    npos = max(len(pos), 1)
    for k in (1, 2, 3):
        s[f"n_cells_grade{k}"] = int(g.get(k, 0))
    ncell_all = len(mac) if p["marker"] != "Ki67" else int(
        cells["kind"].isin(["interstitial_nucleus", "myonucleus", "internal_nucleus",
                            "endothelial_nucleus", "macrophage"]).sum())
    s["cell_h_score"] = (100.0 * sum(k * g.get(k, 0) for k in (1, 2, 3)) / ncell_all
                         if ncell_all else 0.0)
    s["positive_cell_pct"] = 100.0 * len(pos) / ncell_all if ncell_all else 0.0
    del npos
    # fibers (MHC-I)
    s["n_positive_fibers"] = int(ft["positive"].sum()) if nfib else 0
    s["positive_fiber_pct"] = 100.0 * s["n_positive_fibers"] / nfib if nfib else float("nan")
    for k in (0, 1, 2, 3):
        s[f"n_fibers_grade{k}"] = int((ft["grade"] == k).sum()) if nfib else 0
    if nfib:
        pf = ft["perifascicular"]
        s["positive_fiber_pct_perifascicular"] = float(100 * ft.loc[pf, "positive"].mean()) \
            if pf.any() else float("nan")
        s["positive_fiber_pct_other"] = float(100 * ft.loc[~pf, "positive"].mean()) \
            if (~pf).any() else float("nan")
    # pixels over tissue, fibers, interstitium (true DAB map)
    dab = st["dab"]
    for key, m in (("", tissue), ("fiber_", comp == 1), ("interstitium_", tissue & (comp != 1))):
        for k, v in _pixel_scores(dab, m).items():
            s[f"{key}{k}"] = v
    return s


# ============================================================================================


def generate_section(*, marker: str = "CD163", seed: int = 0, shape=(1024, 1024),
                     mpp: float = 0.5, **options) -> SyntheticSection:
    """Render a synthetic brightfield skeletal-muscle cross-section with exact ground truth.

    Parameters
    ----------
    marker : {"CD163", "MHC-I", "IL-1a", "IL-1b", "IL-1Ra", "Ki67", "none", "HE"}
        What the DAB shows (``"HE"``: an H&E section, no DAB; ``"none"``: counterstain only).
    seed : int
        Seed of the tissue (geometry, cells, expression).  The staining batch (vectors,
        background, illumination, noise) uses ``batch_seed`` (defaults to ``seed``), so the same
        tissue can be re-rendered as another batch.
    shape : (int, int)
        Image height and width in pixels.
    mpp : float
        Microns per pixel; every size option is in µm.
    **options
        See :data:`biopsyquant.synthetic.DEFAULTS` for every option and its default, e.g.
        ``cells_per_mm2``, ``n_clusters``, ``positive_fiber_fraction``, ``expression``,
        ``vector_jitter_deg``, ``illumination``, ``blur_um``, ``noise``, ``jpeg_quality``,
        ``tissue_coverage``, ``atrophic_fraction``, ``perifascicular_atrophy``.

    Returns
    -------
    SyntheticSection
        Image plus truth; identical for identical arguments.

    Raises
    ------
    InputError
        An option is unknown or out of range.
    """
    p = resolve(marker, seed, shape, mpp, options)
    geo, extra = _build_geometry(p)
    st = _stain(p, geo, extra)
    model = _stain_model(p)
    second = st["eos"] if p["marker"] == "HE" else st["dab"]
    rgb = _render(p, st["hema"], second, model)
    summary = _summary(p, geo, st)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}
    summary["stain_model"] = model.to_dict()
    return SyntheticSection(
        rgb=rgb, mpp=p["mpp"], marker=p["marker"], fibers=geo.fibers,
        compartments=geo.compartments, tissue=geo.tissue, hema_od=st["hema"], dab_od=st["dab"],
        eosin_od=st["eos"], cells=st["cells"], fiber_truth=st["fibers"], vessels=st["vessels"],
        stain_model=model, params=params, summary=summary)
