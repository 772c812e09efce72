"""Tests of the compartment map (biopsyquant.compartments)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from biopsyquant.compartments import (
    CODES,
    CompartmentParams,
    _check_mpp,
    compartment_areas_mm2,
    compartment_map,
    fascicle_edge_distance_um,
    perifascicular_fibers,
)
from biopsyquant.errors import InputError
from biopsyquant.fibers import fiber_table

MPP = 0.5


def _grid_fibers(shape, x0, x1, y0, y1, size_px, gap_px, start_id=1):
    """Square 'fibers' of size_px separated by gap_px inside [y0:y1, x0:x1]."""
    lab = np.zeros(shape, np.int32)
    k = start_id
    for y in range(y0, y1 - size_px + 1, size_px + gap_px):
        for x in range(x0, x1 - size_px + 1, size_px + gap_px):
            lab[y:y + size_px, x:x + size_px] = k
            k += 1
    return lab


def _section():
    """Two fascicles of 40 µm fibers (4 µm endomysium) split by a 40 µm septum, and a vessel."""
    shape = (400, 600)
    lab = _grid_fibers(shape, 0, 260, 0, 400, 80, 8)
    lab += _grid_fibers(shape, 340, 600, 0, 400, 80, 8, start_id=100) * 1
    tissue = np.ones(shape, bool)
    hema = np.full(shape, 0.12, np.float32)
    # vessel in the septum: lumen (glass, 24 µm) + cellular wall (6 µm)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    r = np.hypot(yy - 200, xx - 300)
    lumen = r <= 24
    wall = (r > 24) & (r <= 36)
    tissue[lumen] = False
    hema[lumen] = 0.0
    hema[wall] = 0.5
    return lab, tissue, hema, lumen, wall


def test_codes_on_constructed_section():
    lab, tissue, hema, lumen, wall = _section()
    codes = compartment_map(lab, tissue, mpp=MPP, hema_od=hema)
    assert codes.dtype == np.uint8 and codes.shape == lab.shape
    assert (codes[lab > 0] == CODES["fiber"]).all()
    # 4 µm gaps between fibers inside a fascicle: endomysium (away from the septum/vessel)
    assert (codes[100:150, 82:86] == CODES["endomysium"]).all()
    # the 40 µm septum: perimysium away from the vessel
    assert (codes[10:60, 270:330] == CODES["perimysium"]).all()
    # lumen and wall are vessel; non-fiber tissue within 20 µm of the wall is perivascular
    assert (codes[lumen] == CODES["vessel"]).mean() > 0.97
    assert (codes[wall] == CODES["vessel"]).mean() > 0.9
    assert codes[200 - 36 - 10, 300] == CODES["perivascular"]  # 5 µm beyond the wall
    assert codes[200 - 36 - 30, 300] == CODES["perivascular"]  # 15 µm beyond the wall
    assert codes[200 - 36 - 50, 300] == CODES["perimysium"]  # 25 µm beyond the wall


def test_crack_between_fibers_is_not_a_vessel():
    lab, tissue, hema, _, _ = _section()
    lab2 = lab.copy()
    tissue2 = tissue.copy()
    # a round glass hole surrounded by fibers only (a crack), 20 µm across
    yy, xx = np.mgrid[0:400, 0:600]
    hole = np.hypot(yy - 130, xx - 130) <= 20
    tissue2[hole] = False
    lab2[hole] = 0
    codes = compartment_map(lab2, tissue2, mpp=MPP, hema_od=hema)
    assert (codes[hole] == CODES["outside"]).all()


def test_glass_reaching_the_image_border_is_not_a_vessel():
    """Glass around the section that reaches the image border (a bay of the outline in a
    field or tile) is outside, never a vessel lumen, even when it is rimmed by stained
    connective tissue (the whole bay is glass-bright, so only the section mask tells it from
    a lumen); a lumen inside the section cut by the border still is a vessel."""
    lab, tissue, hema, lumen, wall = _section()
    yy, xx = np.mgrid[0:400, 0:600]
    bay = np.hypot(yy - 400, xx - 300) <= 60  # half-disk of glass at the bottom border
    rim = (np.hypot(yy - 400, xx - 300) > 60) & (np.hypot(yy - 400, xx - 300) <= 75)
    lab[bay | rim] = 0
    tissue[bay] = False
    hema[bay] = 0.0
    # a rim a little darker than the septum (a "wall" for the OD rule) and pale enough that
    # the glass keeps its glass-bright look up to the tissue edge
    hema[rim] = 0.14
    codes = compartment_map(lab, tissue, mpp=MPP, hema_od=hema)
    assert (codes[bay] == CODES["outside"]).all()
    assert not (codes[rim] == CODES["vessel"]).any()
    assert (codes[lumen] == CODES["vessel"]).mean() > 0.97  # the real vessel is kept
    # a bright lumen inside the analysed section, cut by the border: still a vessel
    lab2, tissue2, hema2, _, _ = _section()
    r = np.hypot(yy - 0, xx - 300)
    lab2[r <= 40] = 0
    hema2[r <= 24] = 0.0  # glass-bright but inside the tissue mask
    hema2[(r > 24) & (r <= 36)] = 0.5
    codes2 = compartment_map(lab2, tissue2, mpp=MPP, hema_od=hema2)
    assert (codes2[r <= 20] == CODES["vessel"]).mean() > 0.9


def test_capillary_is_not_a_vessel():
    lab, tissue, hema, _, _ = _section()
    yy, xx = np.mgrid[0:400, 0:600]
    r = np.hypot(yy - 50, xx - 300)
    tissue[r <= 3] = False  # 3 µm lumen + 2 µm wall: a capillary, 10 µm across
    hema[(r > 3) & (r <= 10)] = 0.5
    codes = compartment_map(lab, tissue, mpp=MPP, hema_od=hema)
    assert not (codes[40:60, 290:310] == CODES["vessel"]).any()


def test_width_threshold_is_a_setting():
    lab, tissue, hema, _, _ = _section()
    wide = compartment_map(lab, tissue, mpp=MPP, hema_od=hema,
                           params=CompartmentParams(perimysium_min_width_um=50.0,
                                                    epimysium_um=0.0))
    assert (wide[10:60, 270:330] == CODES["endomysium"]).all()  # 40 µm < 50 µm


def test_areas_mm2():
    codes = np.zeros((100, 200), np.uint8)
    codes[:50] = 1
    codes[50:60] = 2
    codes[60:70, :100] = 3
    codes[70:72, :10] = 4
    codes[72:75, :10] = 5
    a = compartment_areas_mm2(codes, 0.5)
    px = 0.25e-6
    assert a["fiber_area_mm2"] == pytest.approx(10000 * px)
    assert a["endomysium_area_mm2"] == pytest.approx(2000 * px)
    assert a["perimysium_area_mm2"] == pytest.approx(1000 * px)
    assert a["vessel_area_mm2"] == pytest.approx(20 * px)
    assert a["perivascular_area_mm2"] == pytest.approx(30 * px)
    assert a["analysed_area_mm2"] == pytest.approx(13050 * px)
    assert all(np.isnan(v) for v in compartment_areas_mm2(codes, None).values())
    with pytest.raises(InputError):
        compartment_areas_mm2(np.full((3, 3), 9, np.uint8), 0.5)


def test_fascicle_edge_distance():
    lab = np.zeros((100, 300), np.int32)
    lab[10:90, 10:50] = 1  # 10 px from the septum
    lab[10:90, 100:140] = 2  # 0 px: touching it
    lab[10:90, 240:280] = 3  # far
    codes = np.full(lab.shape, CODES["endomysium"], np.uint8)
    codes[lab > 0] = CODES["fiber"]
    codes[:, 60:100] = CODES["perimysium"]
    d = fascicle_edge_distance_um(lab, codes, mpp=0.5)
    assert d.index.tolist() == [1, 2, 3]
    assert d.loc[1] == pytest.approx(10 * 0.5, abs=0.5)
    assert d.loc[2] == pytest.approx(0.0, abs=0.01)
    assert d.loc[3] == pytest.approx(140 * 0.5, abs=0.7)
    pf = perifascicular_fibers(d, CompartmentParams(perifascicular_distance_um=20))
    assert pf.tolist() == [True, True, False]
    assert fascicle_edge_distance_um(lab, codes, mpp=None).isna().all()
    # fiber_table fills the column from the compartment map
    t = fiber_table(lab, mpp=0.5, compartments=codes).set_index("fiber_id")
    np.testing.assert_allclose(t.fascicle_edge_distance_um, d.loc[t.index])


def test_bad_input():
    lab = np.zeros((10, 10), np.int32)
    with pytest.raises(InputError, match="tissue"):
        compartment_map(lab, np.ones((5, 5), bool), mpp=0.5)
    with pytest.raises(InputError, match="mpp"):
        compartment_map(lab, np.ones((10, 10), bool), mpp=0)
    with pytest.raises(InputError, match="perimysium_min_width_um"):
        CompartmentParams(perimysium_min_width_um=0)
    with pytest.raises(InputError, match="fascicle_edge_codes"):
        CompartmentParams(fascicle_edge_codes=(9,))


def test_agreement_with_synthetic_truth(synthetic_section):
    """With the true fibers, the map agrees with the generator's compartments."""
    s = synthetic_section
    codes = compartment_map(s.fibers, s.tissue, mpp=s.mpp, hema_od=s.hema_od, dab_od=s.dab_od)
    t = s.compartments
    m = (t > 0) | (codes > 0)
    assert (codes[m] == t[m]).mean() >= 0.8
    assert (codes[t == 1] == 1).all()
    if (t == 4).any():  # vessels are found where the generator drew them
        assert (codes[t == 4] == 4).mean() >= 0.7


def test_pocket_enclosed_by_one_fascicle_is_endomysium():
    """A 30 µm non-fiber pocket surrounded by fibers is endomysium (fascicle rule); with the
    rule off the width rule alone calls it perimysium; a wide band reaching the image edge
    (a septum) stays perimysium either way."""
    mpp = 1.0
    lab = np.zeros((300, 300), np.int32)
    k = 1
    for y0 in range(0, 300, 50):
        for x0 in range(0, 300, 50):
            lab[y0 + 2:y0 + 48, x0 + 2:x0 + 48] = k  # 46 µm fibers, 4 µm endomysium
            k += 1
    lab[110:140, 110:140] = 0  # a 30 x 30 µm pocket in the middle of the fascicle
    lab[:, 245:275] = 0  # a 30 µm septum from top to bottom
    tissue = np.ones_like(lab, bool)
    on = compartment_map(lab, tissue, mpp=mpp, params=CompartmentParams(epimysium_um=0))
    off = compartment_map(lab, tissue, mpp=mpp,
                          params=CompartmentParams(epimysium_um=0, endomysium_pocket_max_um2=0))
    assert (on[118:132, 118:132] == 2).all()
    assert (off[118:132, 118:132] == 3).all()
    assert (on[100:200, 252:268] == 3).all() and (off[100:200, 252:268] == 3).all()


# ====================================================================================
# Frozen copy of compartment_map (and of the ndi.minimum fascicle edge distance) as they
# were before the speed-up: the current implementation must give identical arrays.


def _ref_resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-averaged (down) or linear (up) resize of a bool mask, threshold 0.5."""
    if mask.shape == tuple(shape):
        return mask
    h, w = shape
    src = mask.astype(np.uint8) * 255
    interp = cv2.INTER_AREA if h < mask.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(src, (w, h), interpolation=interp) >= 128


def _ref_opening_by_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Union of all disks of ``radius_px`` that fit in ``mask`` (distance-transform opening)."""
    if radius_px <= 0.5 or not mask.any():
        return mask.copy()
    m = np.pad(mask.astype(np.uint8), 1)  # the image border is not a boundary
    m[0, :] = m[1, :]
    m[-1, :] = m[-2, :]
    m[:, 0] = m[:, 1]
    m[:, -1] = m[:, -2]
    inner = cv2.distanceTransform(m, cv2.DIST_L2, 5)[1:-1, 1:-1] > radius_px
    if not inner.any():
        return np.zeros_like(mask)
    d = cv2.distanceTransform((~inner).astype(np.uint8), cv2.DIST_L2, 5)
    return (d <= radius_px + 0.5) & mask


def _ref_outside(tissue: np.ndarray, wm: float, params: CompartmentParams) -> np.ndarray:
    """Non-tissue regions that are the slide around the section (touch the border or huge)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats((~tissue).astype(np.uint8),
                                                        connectivity=8)
    if n <= 1:
        return np.zeros(tissue.shape, bool)
    H, W = tissue.shape
    x, y, w, h, area = (stats[:, i] for i in range(5))
    big = area > math.pi * (params.vessel_max_diameter_um / wm / 2) ** 2
    keep = big | (x == 0) | (y == 0) | (x + w == W) | (y + h == H)
    keep[0] = False
    return keep[lab]


def _ref_find_vessels(fiber: np.ndarray, tissue: np.ndarray, bright: np.ndarray | None,
                  od: np.ndarray | None, wm: float, params: CompartmentParams,
                  section: np.ndarray) -> np.ndarray:
    """Vessel mask (lumen + wall) on the working grid."""
    cand = ~tissue if bright is None else (~tissue | bright)
    cand &= ~fiber
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cand.astype(np.uint8), connectivity=8)
    vessel = np.zeros(fiber.shape, bool)
    if n <= 1:
        return vessel
    H, W = fiber.shape
    nonfiber_tissue = tissue & ~fiber
    od_ref = float(np.median(od[nonfiber_tissue])) if od is not None and nonfiber_tissue.any() \
        else 0.0
    a_min = math.pi * (params.lumen_min_diameter_um / wm / 2) ** 2
    a_max = math.pi * (params.vessel_max_diameter_um / wm / 2) ** 2
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area < a_min or area > a_max:
            continue
        at_border = x == 0 or y == 0 or x + w == W or y + h == H
        if at_border and not section[y:y + h, x:x + w][lab[y:y + h, x:x + w] == i].all():
            continue  # glass around the section, or a hole cut by the image border
        r_lumen = math.sqrt(area / math.pi)
        wall_px = max(params.wall_um / wm, params.wall_fraction * r_lumen, 1.0)
        if 2 * (r_lumen + wall_px) * wm < params.vessel_min_diameter_um:
            continue  # even the thickest wall would leave it capillary-sized
        pad = int(math.ceil(wall_px)) + 1
        y0, y1 = max(0, y - pad), min(H, y + h + pad)
        x0, x1 = max(0, x - pad), min(W, x + w + pad)
        lum = lab[y0:y1, x0:x1] == i
        cnts, _ = cv2.findContours(lum.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.convexHull(np.concatenate(cnts))
        harea = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True) + 1.0
        if area / harea < params.min_lumen_solidity:
            continue
        d = cv2.distanceTransform((~lum).astype(np.uint8), cv2.DIST_L2, 5)
        ring = (d > 0) & (d <= max(params.wall_um / wm, 1.0))
        n_ring = int(ring.sum())
        if n_ring == 0:
            continue
        nft = nonfiber_tissue[y0:y1, x0:x1]
        inner_wall = ring & nft
        if inner_wall.sum() < params.wall_min_tissue_fraction * n_ring:
            continue
        if od is not None:
            odc = od[y0:y1, x0:x1]
            if float(odc[inner_wall].mean()) < params.wall_min_od_ratio * od_ref:
                continue  # a loose space in connective tissue, not a cellular wall
            # the wall extends outwards as long as it is stained non-fiber tissue
            wall = inner_wall | ((d > 0) & (d <= wall_px) & nft
                                 & (odc >= params.wall_min_od_ratio * od_ref))
        else:
            wall = (d > 0) & (d <= wall_px) & nft
        if 2 * (r_lumen + min(wall_px, float(d[wall].max()) if wall.any() else 0.0)) * wm \
                < params.vessel_min_diameter_um:
            continue
        vessel[y0:y1, x0:x1] |= lum | wall
    return vessel


def _ref_fascicle_pockets(fiber: np.ndarray, wm: float, params: CompartmentParams) -> np.ndarray:
    """Non-fiber pockets enclosed by the fibers of one fascicle (see CompartmentParams)."""
    r = max(1, int(round(params.fiber_gap_close_um / wm)))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    pad = r + 1
    closed = cv2.morphologyEx(np.pad(fiber.astype(np.uint8), pad), cv2.MORPH_CLOSE, k)
    closed = closed[pad:-pad, pad:-pad].astype(bool)
    n, lab, stats, _ = cv2.connectedComponentsWithStats((~closed).astype(np.uint8),
                                                        connectivity=4)
    if n <= 1:
        return np.zeros(fiber.shape, bool)
    x, y, w, h = (stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                         cv2.CC_STAT_HEIGHT))
    touches = (x == 0) | (y == 0) | (x + w >= fiber.shape[1]) | (y + h >= fiber.shape[0])
    small = stats[:, cv2.CC_STAT_AREA] * wm * wm <= params.endomysium_pocket_max_um2
    keep = small & ~touches
    keep[0] = False
    return keep[lab]


def _ref_compartment_map(
    fiber_labels: np.ndarray,
    tissue: np.ndarray,
    *,
    mpp: float,
    hema_od: np.ndarray | None = None,
    dab_od: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    params: CompartmentParams | None = None,
) -> np.ndarray:
    """Compartment code of every pixel (uint8, codes in the module docstring).

    Parameters
    ----------
    fiber_labels : ndarray of int, shape (H, W)
        Fiber labels (0 = not a fiber), e.g. from :func:`biopsyquant.fibers.segment_fibers`.
    tissue : ndarray of bool, shape (H, W)
        Analysed tissue (exclusions removed). Pixels outside are code 0 unless they are a
        vessel lumen.
    mpp : float
        Pixel size, µm per pixel.
    hema_od, dab_od : ndarray of float, shape (H, W), optional
        Hematoxylin and DAB OD (log10); where their sum is below ``lumen_max_od`` a pixel is
        glass-bright (vessel lumens inside the tissue mask).
    rgb : ndarray of uint8, shape (H, W, 3), optional
        Used for the brightness test when ``hema_od`` is not given (OD against white).
    params : CompartmentParams, optional

    Returns
    -------
    ndarray of uint8, shape (H, W)
    """
    params = CompartmentParams() if params is None else params
    fiber_labels = np.asarray(fiber_labels)
    tissue = np.asarray(tissue)
    if fiber_labels.ndim != 2:
        raise InputError(f"`fiber_labels` must be a 2-D label image, got shape "
                         f"{fiber_labels.shape}")
    shape = fiber_labels.shape
    if tissue.shape != shape:
        raise InputError(f"`tissue` has shape {tissue.shape}, fiber labels have {shape}")
    for name, arr in (("hema_od", hema_od), ("dab_od", dab_od)):
        if arr is not None and np.shape(arr) != shape:
            raise InputError(f"`{name}` has shape {np.shape(arr)}, fiber labels have {shape}")
    if rgb is not None and np.shape(rgb)[:2] != shape:
        raise InputError(f"`rgb` has shape {np.shape(rgb)}, fiber labels have {shape}")
    mpp = _check_mpp(mpp)
    tissue = tissue.astype(bool, copy=False)
    fiber_full = fiber_labels > 0

    # brightness (lumen-like) image
    od = None
    if hema_od is not None:
        od = np.asarray(hema_od, np.float32)
        if dab_od is not None:
            od = od + np.maximum(np.asarray(dab_od, np.float32), 0)
    elif rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.dtype == np.uint8 and rgb.ndim == 3:
            lut = np.maximum(-np.log10(np.maximum(np.arange(256), 1) / 255.0), 0)
            od = (lut[rgb].sum(-1) / 3.0).astype(np.float32)

    # working grid
    factor = max(1.0, params.working_mpp_um / mpp)
    if factor > 1.0:
        ws = (max(1, int(round(shape[0] / factor))), max(1, int(round(shape[1] / factor))))
    else:
        ws = shape
    wm = mpp * shape[0] / ws[0]
    fiber = _ref_resize_mask(fiber_full, ws)
    tis = _ref_resize_mask(tissue | fiber_full, ws)
    od_w = None
    bright = None
    if od is not None:
        od_w = od if ws == shape else cv2.resize(od, (ws[1], ws[0]), interpolation=cv2.INTER_AREA)
        sig = 1.0 / wm
        od_w = cv2.GaussianBlur(od_w, (0, 0), sig, sig, borderType=cv2.BORDER_REFLECT)
        bright = od_w < params.lumen_max_od
        # cut thin bridges between a lumen and pale spaces of loose connective tissue
        r = max(1, int(round(2.0 / wm)))
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        bright = cv2.morphologyEx(bright.astype(np.uint8), cv2.MORPH_OPEN, k).astype(bool)

    nonfiber = tis & ~fiber
    peri = _ref_opening_by_disk(nonfiber, params.perimysium_min_width_um / wm / 2.0)
    if params.epimysium_um > 0:
        outside = _ref_outside(tis, wm, params)
        if outside.any():
            d_out = cv2.distanceTransform((~outside).astype(np.uint8), cv2.DIST_L2, 5)
            peri |= nonfiber & (d_out <= params.epimysium_um / wm)
    if params.endomysium_pocket_max_um2 > 0 and fiber.any():
        peri &= ~_ref_fascicle_pockets(fiber, wm, params)
    vessel = _ref_find_vessels(fiber, tis & ~(bright if bright is not None else False), bright,
                           od_w, wm, params, tis)
    perivasc = np.zeros(ws, bool)
    if vessel.any() and params.perivascular_width_um > 0:
        d = cv2.distanceTransform((~vessel).astype(np.uint8), cv2.DIST_L2, 5)
        perivasc = (d <= params.perivascular_width_um / wm) & nonfiber & ~vessel

    if ws != shape:
        peri = _ref_resize_mask(peri, shape)
        vessel = _ref_resize_mask(vessel, shape)
        perivasc = _ref_resize_mask(perivasc, shape)

    codes = np.zeros(shape, np.uint8)
    codes[tissue] = CODES["endomysium"]
    codes[peri & tissue] = CODES["perimysium"]
    codes[perivasc & tissue] = CODES["perivascular"]
    codes[vessel & ~fiber_full] = CODES["vessel"]
    codes[fiber_full] = CODES["fiber"]
    return codes


def _ref_fascicle_edge_distance_um(fiber_labels, codes, *, mpp, params=None):
    params = CompartmentParams() if params is None else params
    ids = np.flatnonzero(np.bincount(fiber_labels.ravel().astype(np.intp)))
    ids = ids[ids > 0]
    name = "fascicle_edge_distance_um"
    if len(ids) == 0:
        return pd.Series([], index=pd.Index([], name="fiber_id", dtype=np.int32), name=name,
                         dtype=float)
    edge = np.isin(codes, np.asarray(params.fascicle_edge_codes, np.uint8))
    if mpp is None or not edge.any():
        return pd.Series(np.nan, index=pd.Index(ids.astype(np.int32), name="fiber_id"),
                         name=name)
    mpp = _check_mpp(mpp)
    d = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 5)
    dmin = ndi.minimum(d, labels=fiber_labels, index=ids)
    dist_um = np.maximum(np.asarray(dmin, float) - 1.0, 0.0) * mpp
    return pd.Series(dist_um, index=pd.Index(ids.astype(np.int32), name="fiber_id"), name=name)


@pytest.fixture(scope="module", params=[("CD163", 31), ("MHC-I", 32)])
def synthetic_section(request):
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    marker, seed = request.param
    return synthetic.generate_section(marker=marker, seed=seed, shape=(768, 768), mpp=0.5)


@pytest.mark.parametrize("mpp", [0.5, 0.4, 1.0])
def test_map_identical_to_reference_on_synthetic(synthetic_section, mpp):
    """Same codes as the frozen implementation, with OD, with RGB only, without either, on
    working grids reached by factor 2, 2.5 and 1."""
    s = synthetic_section
    for kw in (dict(hema_od=s.hema_od, dab_od=s.dab_od), dict(rgb=s.rgb), {}):
        new = compartment_map(s.fibers, s.tissue, mpp=mpp, **kw)
        ref = _ref_compartment_map(s.fibers, s.tissue, mpp=mpp, **kw)
        assert new.dtype == np.uint8
        assert np.array_equal(new, ref), (mpp, list(kw))
    assert (new == CODES["perimysium"]).any() and (new == CODES["endomysium"]).any()


def test_map_identical_to_reference_with_settings(synthetic_section):
    s = synthetic_section
    for p in (CompartmentParams(epimysium_um=0.0, endomysium_pocket_max_um2=0.0),
              CompartmentParams(perimysium_min_width_um=8.0, perivascular_width_um=0.0,
                                working_mpp_um=0.5),
              CompartmentParams(working_mpp_um=2.0, wall_fraction=0.5)):
        new = compartment_map(s.fibers, s.tissue, mpp=s.mpp, hema_od=s.hema_od, params=p)
        ref = _ref_compartment_map(s.fibers, s.tissue, mpp=s.mpp, hema_od=s.hema_od, params=p)
        assert np.array_equal(new, ref), p


def test_map_identical_to_reference_on_constructed_sections():
    lab, tissue, hema, _, _ = _section()
    for mpp in (MPP, 0.3, 1.0):
        assert np.array_equal(compartment_map(lab, tissue, mpp=mpp, hema_od=hema),
                              _ref_compartment_map(lab, tissue, mpp=mpp, hema_od=hema))
    # odd sizes, no fibers, no tissue, label dtypes
    lab2 = lab[:201, :333].astype(np.uint16)
    t2 = tissue[:201, :333]
    for fl, ti in ((lab2, t2), (np.zeros_like(lab2), t2), (lab2, np.zeros_like(t2))):
        assert np.array_equal(compartment_map(fl, ti, mpp=MPP),
                              _ref_compartment_map(fl, ti, mpp=MPP))


def test_fascicle_edge_distance_identical_to_reference(synthetic_section):
    s = synthetic_section
    lab = s.fibers.copy()
    lab[lab % 4 == 0] = 0  # gaps in the ids
    for codes in (s.compartments, compartment_map(s.fibers, s.tissue, mpp=s.mpp)):
        for mpp in (0.5, None):
            pd.testing.assert_series_equal(fascicle_edge_distance_um(lab, codes, mpp=mpp),
                                           _ref_fascicle_edge_distance_um(lab, codes, mpp=mpp))
    no_edge = np.where(s.compartments >= 3, 2, s.compartments).astype(np.uint8)
    pd.testing.assert_series_equal(fascicle_edge_distance_um(lab, no_edge, mpp=0.5),
                                   _ref_fascicle_edge_distance_um(lab, no_edge, mpp=0.5))
    empty = np.zeros_like(lab)
    pd.testing.assert_series_equal(fascicle_edge_distance_um(empty, s.compartments, mpp=0.5),
                                   _ref_fascicle_edge_distance_um(empty, s.compartments,
                                                                  mpp=0.5))
