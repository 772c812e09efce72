"""Tiling geometry, seam ownership and merging of tile results (no scoring engine needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biopsyquant.errors import InputError
from biopsyquant.wsi import (
    Tile,
    TileResult,
    _add_counts,
    _overview_index,
    _owned_mask,
    _renumber,
    _sample_index,
    plan_tiles,
)


@pytest.mark.parametrize(("shape", "size", "overlap"),
                         [((2048, 2048), 512, 100), ((1000, 1537), 256, 33), ((300, 200), 512, 40),
                          ((4099, 17), 1000, 0)])
def test_cores_partition_the_image(shape, size, overlap):
    tiles = plan_tiles(shape, tile_size=size, overlap=overlap)
    owner = np.zeros(shape, np.int32)
    for t in tiles:
        x0, y0, x1, y1 = t.core
        owner[y0:y1, x0:x1] += 1
        rx0, ry0, rx1, ry1 = t.read
        assert rx0 <= x0 and ry0 <= y0 and rx1 >= x1 and ry1 >= y1
        assert rx0 >= 0 and ry0 >= 0 and rx1 <= shape[1] and ry1 <= shape[0]
        # overlap is present wherever the slide allows it (rounded up to even)
        ov = overlap + overlap % 2
        assert rx0 == max(0, x0 - ov) and rx1 == min(shape[1], x1 + ov)
        assert rx0 % 2 == 0 and ry0 % 2 == 0  # even origins: same rounding in every tile
    assert (owner == 1).all()


def test_sixteen_tiles_for_2048_with_512():
    assert len(plan_tiles((2048, 2048), tile_size=512, overlap=400)) == 16


def test_plan_rejects_bad_input():
    with pytest.raises(InputError, match="empty"):
        plan_tiles((0, 10), tile_size=8, overlap=0)
    with pytest.raises(InputError, match="tile size"):
        plan_tiles((10, 10), tile_size=0, overlap=0)


def test_centroids_on_seams_owned_exactly_once():
    """Objects anywhere, including exactly on core boundaries and at .5 positions, are kept by
    one tile when each tile sees them in its own coordinates (as the engine reports them)."""
    rng = np.random.default_rng(0)
    shape = (1500, 1700)
    tiles = plan_tiles(shape, tile_size=250, overlap=61)
    xs = np.concatenate([rng.uniform(0, shape[1] - 1, 3000),
                         np.repeat(np.arange(0, shape[1], 250), 3) + np.tile([-0.5, 0, 0.5], 7),
                         rng.integers(0, shape[1] - 1, 500) + 0.5])
    ys = np.concatenate([rng.uniform(0, shape[0] - 1, 3000),
                         rng.uniform(0, shape[0] - 1, 21),
                         rng.integers(0, shape[0] - 1, 500) + 0.5])
    xs, ys = np.clip(xs, 0, shape[1] - 1), np.clip(ys, 0, shape[0] - 1)
    count = np.zeros(len(xs), int)
    for t in tiles:
        rx0, ry0, rx1, ry1 = t.read
        inside = (xs >= rx0) & (xs < rx1) & (ys >= ry0) & (ys < ry1)
        df = pd.DataFrame({"x_px": xs[inside] - rx0, "y_px": ys[inside] - ry0})
        own = _owned_mask(df, t.core, (rx0, ry0), "cell")
        count[np.flatnonzero(inside)[own]] += 1
    assert (count == 1).all()


def test_overview_grid_partitioned_by_cores():
    ds = 3.7
    w = 2000
    got = np.concatenate([_overview_index(x0, min(x0 + 300, w), ds) for x0 in range(0, w, 300)])
    full = _overview_index(0, w, ds)
    assert np.array_equal(np.sort(got), full)
    assert len(np.unique(got)) == len(got)


def test_lowres_sampling_independent_of_tiling():
    whole = _sample_index(0, 1000, 3.9, 257)
    pieces = np.concatenate([_sample_index(a, a + 100, 3.9, 257) for a in range(0, 1000, 100)])
    assert np.array_equal(whole, pieces)
    assert whole.min() == 0 and whole.max() == 256


def _tile_result(index, fibers, cells, counts):
    return TileResult(index=index, cells=cells, fibers=fibers, counts=counts, overview={},
                      warnings=[], seconds=0.0, pixels=0)


def test_merge_renumbers_fibers_and_links_cells_across_tiles():
    f0 = pd.DataFrame({"fiber_id": [3, 7], "x_px": [10.0, 40.0], "y_px": [10.0, 12.0]})
    f1 = pd.DataFrame({"fiber_id": [2], "x_px": [130.0], "y_px": [11.0]})
    # tile 0: a cell in its own fiber 7, a cell in no fiber, a cell whose fiber (seen at
    # x=130.4) belongs to tile 1
    c0 = pd.DataFrame({"cell_id": [5, 6, 9], "x_px": [41.0, 60.0, 99.0], "y_px": [12.0] * 3,
                       "fiber_id": [7, 0, 4], "_fiber_x": [np.nan, np.nan, 130.4],
                       "_fiber_y": [np.nan, np.nan, 11.2]})
    c1 = pd.DataFrame({"cell_id": [1], "x_px": [131.0], "y_px": [11.0], "fiber_id": [2]})
    cells, fibers = _renumber([_tile_result(0, f0, c0, {}), _tile_result(1, f1, c1, {})],
                              tolerance_px=3.0)
    assert fibers["fiber_id"].tolist() == [1, 2, 3]
    assert cells["fiber_id"].tolist() == [2, 0, 3, 3]
    assert cells["cell_id"].tolist() == [1, 2, 3, 4]
    assert "_fiber_x" not in cells.columns


def test_counts_add_scalars_and_arrays():
    total: dict = {}
    _add_counts(total, {"a": 1, "h": np.array([1, 2]), "s": 0.5})
    _add_counts(total, {"a": 2, "h": np.array([3, 4]), "s": 0.25, "b": 7})
    assert total["a"] == 3 and total["b"] == 7 and total["s"] == 0.75
    assert total["h"].tolist() == [4, 6]


def test_tile_read_shape():
    assert Tile(0, (0, 0, 10, 5), (0, 0, 12, 9)).read_shape == (9, 12)


def test_batch_tiles_images_larger_than_one_tile_read_region():
    from biopsyquant.settings import load_settings
    from biopsyquant.wsi import needs_tiling

    s = load_settings("CD163")  # 2048-px cores, 150 µm overlap, whole up to 16 Mpx
    # at 0.5 µm/px a tile reads (2048 + 2 * 300)² = 2648² px
    assert not needs_tiling((3000, 3000), s)
    assert needs_tiling((3000, 3000), s, bound_to_tile=True, mpp=0.5)
    assert not needs_tiling((2648, 2648), s, bound_to_tile=True, mpp=0.5)
    assert needs_tiling((2648, 2649), s, bound_to_tile=True, mpp=0.5)
    # at 0.25 µm/px the overlap is 600 px: a 2048 core would read 3248², over the read
    # budget (tiling.max_tile_read_px 8.4 Mpx), so the core is 1696 (even) and the region 2896²
    assert not needs_tiling((2896, 2896), s, bound_to_tile=True, mpp=0.25)
    assert needs_tiling((2898, 2898), s, bound_to_tile=True, mpp=0.25)
    assert needs_tiling((3600, 3600), s, bound_to_tile=True, mpp=0.25)
    assert needs_tiling((2896, 2896), s, bound_to_tile=True, mpp=0.25, tile_size=1024)
    assert needs_tiling((5000, 5000), s)  # over max_whole_image_px either way


def test_fiber_level_windows_depend_on_the_slide_only():
    """Large slides take their fiber statistics from a fixed sample of tissue windows
    (bounded pixels, anchored at the slide origin, never at the tiles); small ones whole."""
    from biopsyquant.wsi import LEVELS_SAMPLE_PX, _levels_windows

    assert _levels_windows((3000, 4000), 0.5, np.ones((30, 40), bool), (100.0, 100.0)) == [
        (0, 0, 4000, 3000)]
    lowres = np.zeros((200, 200), bool)
    lowres[40:160, 20:120] = True  # tissue in rows 4000-16000, columns 2000-12000 (level 0)
    boxes = _levels_windows((20000, 20000), 0.5, lowres, (100.0, 100.0))
    assert 1 < len(boxes) <= 8
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) <= LEVELS_SAMPLE_PX
    for x0, y0, x1, y1 in boxes:
        assert x0 % 1024 == 0 and y0 % 1024 == 0 and x1 - x0 == 1024 == y1 - y0
        assert lowres[y0 // 100:y1 // 100, x0 // 100:x1 // 100].mean() >= 0.5
    rows = {b[1] for b in boxes}
    assert len(rows) > 1  # spread over the tissue, not one strip
    assert _levels_windows((20000, 20000), 0.5, np.zeros((200, 200), bool),
                           (100.0, 100.0)) == []


def test_tile_core_is_capped_by_the_read_budget():
    """The region a tile reads (core + 2 × overlap) stays within tiling.max_tile_read_px, so a
    worker's memory is bounded whatever the pixel size (40× slides: overlap 600 px a side)."""
    from biopsyquant.settings import load_settings
    from biopsyquant.wsi import overlap_px, tile_core_px

    st = load_settings("CD163")
    assert tile_core_px(st, 0.5) == 2048  # 2048 + 2 × 300 = 2648 ≤ √8.4 Mpx
    core = tile_core_px(st, 0.25)
    edge = core + 2 * overlap_px(st, 0.25)
    assert core % 16 == 0 and 1024 < core < 2048
    assert edge * edge <= st.tiling.max_tile_read_px
    assert tile_core_px(st, 0.25, tile_size=512) == 512  # smaller explicit sizes are kept
    off = load_settings("CD163", overrides={"tiling.max_tile_read_px": 0})
    assert tile_core_px(off, 0.25) == 2048
