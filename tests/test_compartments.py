"""Tests of the compartment map (biopsyquant.compartments)."""

from __future__ import annotations

import numpy as np
import pytest

from biopsyquant.compartments import (
    CODES,
    CompartmentParams,
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


@pytest.mark.parametrize("marker,seed", [("CD163", 31), ("MHC-I", 32)])
def test_agreement_with_synthetic_truth(marker, seed):
    """With the true fibers, the map agrees with the generator's compartments."""
    synthetic = pytest.importorskip("biopsyquant.synthetic")
    s = synthetic.generate_section(marker=marker, seed=seed, shape=(768, 768), mpp=0.5)
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
