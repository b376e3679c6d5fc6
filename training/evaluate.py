"""Score an exported model on dataset folders: what ``crackscan eval`` runs.

It uses the same metrics code as training and the same ONNX Runtime segmenter as the pipeline,
so an eval number describes exactly the model that inference runs. No torch needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from inference.segmenter import Segmenter, map_planes, split_map
from training import data as ds
from training.metrics import SetEvaluator

log = logging.getLogger(__name__)


def exposure(image: np.ndarray, gamma: float) -> np.ndarray:
    """A uint8 image with each value v mapped to 255 * (v / 255) ** gamma (rounded); gamma 1
    returns the image itself."""
    if gamma == 1.0:
        return image
    table = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(image), table)


def split_samples(folders: list[Path], split: str | None, val_fraction: float, seed: int
                  ) -> Iterator[tuple[Path, ds.Sample]]:
    """(folder, sample) for the ``split`` ids of each folder (``"carved"``: the validation ids
    training carves with ``val_fraction`` and ``seed``), with a progress bar per folder.
    DatasetError for a missing folder or an empty split."""
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ds.DatasetError(f"dataset folder {folder} does not exist")
        samples = ds.samples(folder, ds.split_ids(folder, split, val_fraction, seed))
        if not samples:
            raise ds.DatasetError(f"{folder}: no images in split {split or '(all)'}")
        for sample in tqdm(samples, desc=folder.name, leave=False, disable=None):
            yield folder, sample


def evaluate_model(segmenter: Segmenter, folders: list[Path], split: str | None = None,
                   tolerance: float = 2.0, threshold: float | None = None,
                   val_fraction: float = 0.1, seed: int = 0, gamma: float = 1.0) -> dict:
    """Score ``segmenter`` on the ``split`` ids of ``folders`` (``"carved"``: the validation ids
    training carves with ``val_fraction`` and ``seed``) at its default or the given threshold:
    pooled over every image, and under ``sets`` each folder on its own (keyed by folder name),
    with the balanced ODS of the folders (``training.metrics.SetEvaluator``). ``gamma`` other
    than 1 re-exposes every image first (``exposure``), to measure how the model holds up under
    a darker or brighter camera than its data came from.

    A model with lining classes scored on folders whose ``classes.json`` lists its classes
    also gets ``class_iou``: each class's IoU of its argmax class map against the class masks,
    pooled over those folders' pixels."""
    threshold = segmenter.info.threshold if threshold is None else threshold
    evaluator = SetEvaluator(tolerance=tolerance, threshold=threshold)
    classes = segmenter.info.classes
    crack = classes.index("crack") if len(classes) > 1 else 1
    both = np.zeros(len(classes), np.int64)
    either = np.zeros(len(classes), np.int64)
    for folder, sample in split_samples(folders, split, val_fraction, seed):
        labelled = map_planes(classes) == 2 and ds.folder_classes(folder) == classes
        image_rgb, mask = (ds.load_pair(sample, len(classes), crack) if labelled
                           else ds.load_pair(sample))
        bgr = exposure(image_rgb[:, :, ::-1], gamma)
        prob, class_map = split_map(segmenter.segment([bgr])[0])
        evaluator.add(folder.name, prob, mask == crack if labelled else mask)
        if labelled:
            for index in range(len(classes)):
                truth, found = mask == index, class_map == index
                both[index] += int((truth & found).sum())
                either[index] += int((truth | found).sum())
    summary = evaluator.summary()
    if either.any():
        summary["class_iou"] = {name: round(float(both[i] / either[i]), 4) if either[i]
                                else None for i, name in enumerate(classes)}
    summary.update(model=segmenter.info.label, backend=segmenter.backend, split=split or "all",
                   data=[str(f) for f in folders], gamma=gamma)
    return summary


def backend_parity(reference: Segmenter, other: Segmenter, folders: list[Path],
                   split: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                   threshold: float | None = None) -> dict:
    """How closely ``other`` reproduces ``reference`` on real images (the ``split`` ids of
    ``folders``, as ``evaluate_model`` picks them): the largest and the mean absolute difference
    of their crack probabilities, and the IoU of their crack masks at the reference's threshold,
    pooled over every pixel (``mask_iou``) and for the worst image (``mask_iou_min``; an image
    where neither finds a crack counts 1), with the share of pixels on which the masks disagree.
    What ``crackscan parity`` prints, e.g. a TensorRT engine against ONNX Runtime."""
    threshold = reference.info.threshold if threshold is None else threshold
    images = pixels = 0
    max_abs = sum_abs = 0.0
    both = either = disagree = 0
    worst = 1.0
    for _, sample in split_samples(folders, split, val_fraction, seed):
        bgr = np.ascontiguousarray(ds.load_image(sample.image_path)[:, :, ::-1])
        a, b = split_map(reference.segment([bgr])[0])[0], split_map(other.segment([bgr])[0])[0]
        diff = np.abs(a.astype(np.float64) - b)
        max_abs = max(max_abs, float(diff.max()))
        sum_abs += float(diff.sum())
        mask_a, mask_b = a >= threshold, b >= threshold
        inter, union = int((mask_a & mask_b).sum()), int((mask_a | mask_b).sum())
        both, either = both + inter, either + union
        disagree += union - inter
        worst = min(worst, inter / union if union else 1.0)
        images, pixels = images + 1, pixels + a.size
    return {"images": images, "threshold": threshold, "max_abs_diff": max_abs,
            "mean_abs_diff": sum_abs / pixels, "mask_iou": both / either if either else 1.0,
            "mask_iou_min": worst, "mask_disagreement": disagree / pixels,
            "reference": f"{reference.backend} {reference.info.label}",
            "other": f"{other.backend} {other.info.label}", "split": split or "all",
            "data": [str(f) for f in folders]}
