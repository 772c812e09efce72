"""Agreement metrics: instance matching with and without border-cut objects."""

from __future__ import annotations

import numpy as np
import pytest

from biopsyquant.evaluate import border_labels, match_labels, match_points


def _scene():
    truth = np.zeros((100, 100), np.int32)
    truth[10:30, 10:30] = 1          # interior, found
    truth[50:70, 50:70] = 2          # interior, missed
    truth[0:6, 40:60] = 3            # sliver cut by the top border, missed
    truth[80:100, 0:20] = 4          # cut by two borders, found
    pred = np.zeros_like(truth)
    pred[11:30, 10:30] = 5           # matches 1
    pred[82:100, 0:20] = 6           # matches border object 4
    pred[40:48, 80:88] = 7           # interior false positive
    pred[0:10, 90:100] = 8           # border false positive
    return pred, truth


def test_border_labels():
    _, truth = _scene()
    assert border_labels(truth).tolist() == [3, 4]
    with pytest.raises(ValueError):
        border_labels(np.zeros(5))


def test_match_labels_all_objects():
    pred, truth = _scene()
    m = match_labels(pred, truth, iou=0.5)
    assert (m.tp, m.fp, m.fn) == (2, 2, 2)
    assert m.f1 == pytest.approx(0.5)


def test_match_labels_complete_objects_only():
    pred, truth = _scene()
    m = match_labels(pred, truth, iou=0.5, ignore_border=True)
    # 1 found (TP), 2 missed (FN); border truth 3/4 and the prediction matched to 4 and the
    # border false positive 8 are ignored; the interior false positive 7 counts
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
    assert m.precision == pytest.approx(0.5) and m.recall == pytest.approx(0.5)


def test_match_points_radius():
    m = match_points(np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([[0.5, 0.0], [30.0, 0.0]]),
                     2.0)
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
