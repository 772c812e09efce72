"""Fiber segmentation on real H&E muscle sections vs independent Cellpose masks.

Data: ../shared/realdata/he_muscle_centralnuclei (4 images, 1002x1002, 0.2765 µm/px, Cellpose
cyto3 fiber masks -- automatic, not expert truth). One parameter set for all images; the
floors sit slightly below what the pipeline achieves (numbers in
docs/_parts/fibers-validation.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from biopsyquant.evaluate import match_labels
from biopsyquant.fibers import fiber_table, segment_fibers
from biopsyquant.stains import preset

pytestmark = pytest.mark.realdata

MPP = 0.2765


def _load(realdata, i):
    from skimage.io import imread

    d = realdata / "he_muscle_centralnuclei"
    rgb = imread(d / "images" / f"sample_img_0{i}.png")[..., :3]
    masks = imread(d / "cellpose_masks" / f"sample_img_0{i}_cp_masks.png").astype(np.int32)
    return np.ascontiguousarray(rgb), masks


@pytest.fixture(scope="module")
def results(realdata):
    out = {}
    for i in (1, 2, 3, 4):
        rgb, masks = _load(realdata, i)
        he = segment_fibers(rgb, mpp=MPP, model=preset("H-E"))
        default = segment_fibers(rgb, mpp=MPP)
        out[i] = (rgb, masks, he, default)
    return out


def _median_area_ratio(pred, truth):
    pa = np.bincount(pred.ravel())[1:]
    ta = np.bincount(truth.ravel())[1:]
    return float(np.median(pa[pa > 0]) / np.median(ta[ta > 0]))


def test_agreement_with_cellpose_he_model(results):
    f1 = []
    for _i, (_rgb, masks, he, _) in results.items():
        r = match_labels(he, masks, iou=0.5)
        f1.append(r.f1)
        assert r.f1 >= 0.68, (_i, r)
        assert 0.65 <= _median_area_ratio(he, masks) <= 1.25
    assert np.mean(f1) >= 0.80


def test_agreement_with_cellpose_default_model(results):
    f1 = [match_labels(d, m, iou=0.5).f1 for (_, m, _, d) in results.values()]
    assert min(f1) >= 0.65 and np.mean(f1) >= 0.76, f1


def test_fiber_table_on_real_fibers(results):
    rgb, masks, he, _ = results[1]
    od = None
    from biopsyquant.fibers import fiber_od_images

    _, _, od = fiber_od_images(rgb, preset("H-E"))
    t = fiber_table(he, mpp=MPP, hema_od=od)
    assert len(t) == len(np.unique(he)) - 1
    # rodent fibers here are ~20-80 µm across
    assert 15 <= t.min_feret_um.median() <= 80
    assert (t.min_feret_um <= t.max_feret_um + 1e-9).all()
    assert t.solidity.between(0.5, 1.0).all()
    # centrally nucleated (regenerating) fibers are common in these samples
    assert (t.n_internal_nuclei > 0).mean() > 0.2
