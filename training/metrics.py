"""Segmentation metrics, shared by training (validation) and ``crackscan eval``.

Tolerance matching (CFD / Lau et al. convention): a predicted crack pixel is a true positive when a
ground-truth crack pixel lies within ``tolerance`` pixels (Euclidean) of it; a ground-truth pixel is
recalled when a predicted pixel lies within ``tolerance`` of it. ``tolerance=0`` is strict pixel
matching. Precision and recall therefore count different pixel sets, as the papers do.

ODS / OIS (Arbelaez et al.): the threshold is swept over 0..1; ODS is the F1 of the counts pooled
over the dataset at the single best threshold, OIS the mean over images of each image's best F1.
IoU and Dice are strict (no tolerance), of the crack class, pooled over the dataset.
"""

from __future__ import annotations

import cv2
import numpy as np

SWEEP = np.round(np.linspace(0.0, 1.0, 101), 2)


def _within(points: np.ndarray, reference: np.ndarray, tolerance: float) -> np.ndarray:
    """Boolean map of ``points`` pixels that lie within ``tolerance`` of a ``reference`` pixel."""
    if tolerance <= 0:
        return points & reference
    if not reference.any():
        return np.zeros_like(points)
    distance = cv2.distanceTransform((~reference).astype(np.uint8), cv2.DIST_L2,
                                     cv2.DIST_MASK_PRECISE)
    return points & (distance <= tolerance)


def match_counts(pred: np.ndarray, truth: np.ndarray, tolerance: float) -> np.ndarray:
    """[matched predicted, predicted, matched truth, truth] pixel counts of one binary pair."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    return np.array([
        _within(pred, truth, tolerance).sum(), pred.sum(),
        _within(truth, pred, tolerance).sum(), truth.sum(),
    ], dtype=np.int64)


def disk(tolerance: float) -> np.ndarray:
    """The pixel offsets within ``tolerance`` (Euclidean) of the centre, as a uint8 kernel."""
    radius = int(np.floor(tolerance))
    dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (dx * dx + dy * dy <= tolerance * tolerance).astype(np.uint8)


def _at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many ``values`` are >= each threshold (compared in float64, as ``prob >= t``)."""
    ordered = np.sort(values.astype(np.float64), axis=None)
    return ordered.size - np.searchsorted(ordered, thresholds, side="left")


def sweep_match_counts(prob: np.ndarray, truth: np.ndarray, tolerance: float,
                       thresholds: np.ndarray) -> np.ndarray:
    """``match_counts(prob >= t, truth, tolerance)`` for every t of ``thresholds``, as a
    (len(thresholds), 4) array, in one pass instead of one distance transform per threshold.

    A predicted pixel is matched when it lies within ``tolerance`` of the truth, a fixed set of
    pixels whatever t is. A truth pixel is recalled at t when some pixel within ``tolerance`` of
    it has a probability >= t, i.e. when the highest probability in that disk (a grey dilation)
    is >= t. Both become counts of values above each threshold.
    """
    truth = truth.astype(bool)
    thresholds = np.asarray(thresholds, np.float64)
    prob = np.ascontiguousarray(prob, np.float32)
    if tolerance > 0:
        near_truth = (cv2.distanceTransform((~truth).astype(np.uint8), cv2.DIST_L2,
                                            cv2.DIST_MASK_PRECISE) <= tolerance
                      if truth.any() else np.zeros_like(truth))
        reach = cv2.dilate(prob, disk(tolerance))
    else:
        near_truth, reach = truth, prob
    return np.stack([
        _at_least(prob[near_truth], thresholds), _at_least(prob, thresholds),
        _at_least(reach[truth], thresholds), np.full(len(thresholds), truth.sum()),
    ], axis=1).astype(np.int64)


def f1_from_counts(counts: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F1); an empty prediction of an empty truth scores 1."""
    tp_pred, n_pred, tp_truth, n_truth = (float(c) for c in counts)
    if n_pred == 0 and n_truth == 0:
        return 1.0, 1.0, 1.0
    precision = tp_pred / n_pred if n_pred else 0.0
    recall = tp_truth / n_truth if n_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


class Evaluator:
    """Accumulates crack probability maps against ground truth, one image at a time."""

    def __init__(self, tolerance: float = 2.0, threshold: float = 0.5, sweep: bool = True) -> None:
        self.tolerance = tolerance
        self.threshold = threshold
        self.thresholds = SWEEP if sweep else np.array([threshold])
        self.counts = np.zeros(4, np.int64)  # at ``threshold``
        self.sweep_counts = np.zeros((len(self.thresholds), 4), np.int64)
        self.best_image_f1: list[float] = []
        self.intersection = 0
        self.union = 0
        self.pred_plus_truth = 0
        self.images = 0

    def add(self, prob: np.ndarray, truth: np.ndarray) -> None:
        if prob.shape != truth.shape:
            raise ValueError(f"probability map {prob.shape} and mask {truth.shape} differ in shape")
        truth = truth.astype(bool)
        pred = prob >= np.float64(self.threshold)  # compared in float64, as the sweep is
        counts = sweep_match_counts(prob, truth, self.tolerance,
                                    np.append(self.thresholds, self.threshold))
        self.counts += counts[-1]
        self.sweep_counts += counts[:-1]
        self.intersection += int((pred & truth).sum())
        self.union += int((pred | truth).sum())
        self.pred_plus_truth += int(pred.sum() + truth.sum())
        self.best_image_f1.append(max(f1_from_counts(c)[2] for c in counts[:-1]))
        self.images += 1

    def sweep_f1(self) -> np.ndarray:
        """F1 of the pooled counts at each swept threshold."""
        return np.array([f1_from_counts(c)[2] for c in self.sweep_counts])

    def best_threshold(self, low: float = 0.05, high: float = 0.95) -> float:
        """The swept threshold in [low, high] with the best pooled F1: a usable default
        threshold (the sweep's ends, 'everything' and 'nothing', are never chosen)."""
        return _best_inside(self.thresholds, self.sweep_f1(), low, high, self.threshold)

    def summary(self) -> dict[str, float | int]:
        precision, recall, f1 = f1_from_counts(self.counts)
        sweep_f1 = self.sweep_f1()
        best = int(np.argmax(sweep_f1))
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "iou": self.intersection / self.union if self.union else 1.0,
            "dice": 2 * self.intersection / self.pred_plus_truth if self.pred_plus_truth else 1.0,
            "tolerance_px": self.tolerance,
            "threshold": self.threshold,
            "images": self.images,
            "ods": float(sweep_f1[best]),
            "ods_threshold": float(self.thresholds[best]),
            "ois": float(np.mean(self.best_image_f1)) if self.best_image_f1 else 0.0,
            "pixel_error": 1.0 - float(sweep_f1[best]),
        }


def _best_inside(thresholds: np.ndarray, f1: np.ndarray, low: float, high: float,
                 default: float) -> float:
    """The first threshold in [low, high] with the highest ``f1``; ``default`` if none is."""
    inside = [i for i, t in enumerate(thresholds) if low <= t <= high]
    if not inside:
        return default
    return float(thresholds[max(inside, key=lambda i: f1[i])])


class SetEvaluator:
    """One ``Evaluator`` per data set (a validation folder), and what they give together.

    Pooled counts weigh each set by its crack pixels, so a set of large images with wide cracks
    outvotes a small set of hairline cracks from another camera. The balanced F1 at a threshold
    is the mean of the sets' F1 at that threshold, each set counting once; ``balanced_ods`` is
    its best over the sweep: one threshold for every set, as a deployed model has.
    """

    def __init__(self, tolerance: float = 2.0, threshold: float = 0.5, sweep: bool = True) -> None:
        self.tolerance, self.threshold, self.sweep = tolerance, threshold, sweep
        self.sets: dict[str, Evaluator] = {}

    def add(self, name: str, prob: np.ndarray, truth: np.ndarray) -> None:
        if name not in self.sets:
            self.sets[name] = Evaluator(self.tolerance, self.threshold, self.sweep)
        self.sets[name].add(prob, truth)

    def pooled(self) -> Evaluator:
        """One ``Evaluator`` holding every set's images."""
        total = Evaluator(self.tolerance, self.threshold, self.sweep)
        for part in self.sets.values():
            total.counts += part.counts
            total.sweep_counts += part.sweep_counts
            total.best_image_f1 += part.best_image_f1
            total.intersection += part.intersection
            total.union += part.union
            total.pred_plus_truth += part.pred_plus_truth
            total.images += part.images
        return total

    def balanced_f1(self) -> np.ndarray:
        """The mean of the sets' F1 at each swept threshold."""
        return np.mean([part.sweep_f1() for part in self.sets.values()], axis=0)

    def best_balanced_threshold(self, low: float = 0.05, high: float = 0.95) -> float:
        """The swept threshold in [low, high] with the best balanced F1 (never the sweep's
        ends)."""
        return _best_inside(self.pooled().thresholds, self.balanced_f1(), low, high,
                            self.threshold)

    def summary(self) -> dict:
        """The pooled summary, plus ``balanced_ods`` and its threshold, and under ``sets`` each
        set's summary with its F1 at that balanced threshold (``f1_at_balanced``)."""
        if not self.sets:
            raise ValueError("no images were scored")
        pooled = self.pooled()
        balanced = self.balanced_f1()
        best = int(np.argmax(balanced))
        sets = {name: {**part.summary(), "f1_at_balanced": float(part.sweep_f1()[best])}
                for name, part in self.sets.items()}
        return {**pooled.summary(), "balanced_ods": float(balanced[best]),
                "balanced_ods_threshold": float(pooled.thresholds[best]), "sets": sets}
