"""Agreement metrics against ground truth: point matching and instance-mask matching."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

__all__ = ["MatchResult", "match_points", "match_labels", "match_label_pairs",
           "border_labels"]


@dataclass(frozen=True)
class MatchResult:
    """Counts of a one-to-one matching between detections and truth."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else float("nan")


def match_points(pred: np.ndarray, truth: np.ndarray, radius: float) -> MatchResult:
    """One-to-one (Hungarian) matching of points within ``radius`` (same units as the points).

    Parameters
    ----------
    pred, truth : ndarray, shape (N, 2) and (M, 2)
        Point coordinates (e.g. x, y in pixels or µm).
    radius : float
        Largest distance at which two points may match.
    """
    pred = np.asarray(pred, float).reshape(-1, 2)
    truth = np.asarray(truth, float).reshape(-1, 2)
    if len(pred) == 0 or len(truth) == 0:
        return MatchResult(0, len(pred), len(truth))
    tree = cKDTree(truth)
    pairs = tree.query_ball_point(pred, r=radius)
    rows, cols, costs = [], [], []
    for i, js in enumerate(pairs):
        for j in js:
            rows.append(i)
            cols.append(j)
            costs.append(np.hypot(*(pred[i] - truth[j])))
    if not rows:
        return MatchResult(0, len(pred), len(truth))
    # Hungarian on the connected sub-problem; unmatched pairs cost more than any match.
    ui, ri = np.unique(rows, return_inverse=True)
    uj, rj = np.unique(cols, return_inverse=True)
    big = radius * 10 + 1
    cost = np.full((len(ui), len(uj)), big)
    cost[ri, rj] = costs
    r, c = linear_sum_assignment(cost)
    tp = int(np.sum(cost[r, c] <= radius))
    return MatchResult(tp, len(pred) - tp, len(truth) - tp)


def border_labels(labels: np.ndarray) -> np.ndarray:
    """Sorted ids (> 0) of the objects of ``labels`` that touch the image border."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {lab.shape}")
    edge = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    u = np.unique(edge)
    return u[u > 0]


def _assign(pred: np.ndarray, truth: np.ndarray, iou: float):
    """One-to-one IoU assignment of two label images: (pred ids, truth ids) of all nonzero
    objects, and the index pairs (into those) matched at IoU ≥ ``iou``."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"label images differ in shape: {pred.shape} vs {truth.shape}")
    p = pred.ravel().astype(np.int64)
    t = truth.ravel().astype(np.int64)
    pu, p_inv = np.unique(p, return_inverse=True)
    tu, t_inv = np.unique(t, return_inverse=True)
    inter = np.zeros((len(pu), len(tu)), np.int64)
    np.add.at(inter, (p_inv, t_inv), 1)
    parea = inter.sum(1)
    tarea = inter.sum(0)
    pi = np.flatnonzero(pu != 0)
    ti = np.flatnonzero(tu != 0)
    if len(pi) == 0 or len(ti) == 0:
        empty = np.zeros(0, np.int64)
        return pu[pi], tu[ti], empty, empty
    it = inter[np.ix_(pi, ti)].astype(float)
    union = parea[pi][:, None] + tarea[ti][None, :] - it
    ious = np.where(union > 0, it / union, 0.0)
    # IoU > 0.5 matches are unique; for lower thresholds use the assignment.
    r, c = linear_sum_assignment(-ious)
    ok = ious[r, c] >= iou
    return pu[pi], tu[ti], r[ok], c[ok]


def match_label_pairs(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """The matched objects of :func:`match_labels` (all objects, border or not).

    Returns
    -------
    ndarray of int64, shape (K, 2)
        One row per match: (pred label, truth label).
    """
    p_ids, t_ids, r, c = _assign(pred, truth, iou)
    return np.column_stack([p_ids[r], t_ids[c]]).astype(np.int64)


def match_labels(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5, *,
                 ignore_border: bool = False) -> MatchResult:
    """Match instance label images by intersection-over-union ≥ ``iou`` (0 = background).

    Parameters
    ----------
    pred, truth : ndarray of int, shape (H, W)
        Instance labels (0 = background).
    iou : float
        Smallest IoU of a match (one-to-one, by assignment).
    ignore_border : bool
        Evaluate complete objects only: truth objects cut by the image border are ignore
        regions -- a prediction matched to one, or an unmatched prediction that itself
        touches the border, counts neither as TP nor FP, and an unmatched border truth
        object is not a FN. For crops of a larger section, whose border-cut slivers (a few
        pixels of a fiber) no whole-section analysis would ever see.

    Returns
    -------
    MatchResult
    """
    p_ids, t_ids, r, c = _assign(pred, truth, iou)
    if len(p_ids) == 0 or len(t_ids) == 0:
        return MatchResult(0, len(p_ids), len(t_ids))
    if not ignore_border:
        tp = len(r)
        return MatchResult(tp, len(p_ids) - tp, len(t_ids) - tp)
    t_border = np.isin(t_ids, border_labels(truth))
    p_border = np.isin(p_ids, border_labels(pred))
    tp = int(np.sum(~t_border[c]))
    p_matched = np.zeros(len(p_ids), bool)
    p_matched[r] = True
    t_matched = np.zeros(len(t_ids), bool)
    t_matched[c] = True
    fp = int(np.sum(~p_matched & ~p_border))
    fn = int(np.sum(~t_matched & ~t_border))
    return MatchResult(tp, fp, fn)
