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
        pred = prob >= self.threshold
        self.counts += match_counts(pred, truth, self.tolerance)
        self.intersection += int((pred & truth).sum())
        self.union += int((pred | truth).sum())
        self.pred_plus_truth += int(pred.sum() + truth.sum())
        image_best = 0.0
        for i, t in enumerate(self.thresholds):
            counts = match_counts(prob >= t, truth, self.tolerance)
            self.sweep_counts[i] += counts
            image_best = max(image_best, f1_from_counts(counts)[2])
        self.best_image_f1.append(image_best)
        self.images += 1

    def best_threshold(self, low: float = 0.05, high: float = 0.95) -> float:
        """The swept threshold in [low, high] with the best pooled F1: a usable default
        threshold (the sweep's ends, 'everything' and 'nothing', are never chosen)."""
        inside = [i for i, t in enumerate(self.thresholds) if low <= t <= high]
        if not inside:
            return self.threshold
        best = max(inside, key=lambda i: f1_from_counts(self.sweep_counts[i])[2])
        return float(self.thresholds[best])

    def summary(self) -> dict[str, float | int]:
        precision, recall, f1 = f1_from_counts(self.counts)
        sweep_f1 = [f1_from_counts(c)[2] for c in self.sweep_counts]
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
            "ods": sweep_f1[best],
            "ods_threshold": float(self.thresholds[best]),
            "ois": float(np.mean(self.best_image_f1)) if self.best_image_f1 else 0.0,
            "pixel_error": 1.0 - sweep_f1[best],
        }
