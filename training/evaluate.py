"""Score an exported model on dataset folders: what ``crackscan eval`` runs.

It uses the same metrics code as training and the same ONNX Runtime segmenter as the pipeline,
so an eval number describes exactly the model that inference runs. No torch needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from inference.segmenter import Segmenter
from training import data as ds
from training.metrics import Evaluator

log = logging.getLogger(__name__)


def evaluate_model(segmenter: Segmenter, folders: list[Path], split: str | None = None,
                   tolerance: float = 2.0, threshold: float | None = None,
                   val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Score ``segmenter`` on the ``split`` ids of ``folders`` (``"carved"``: the validation ids
    training carves with ``val_fraction`` and ``seed``) at its default or the given threshold."""
    threshold = segmenter.info.threshold if threshold is None else threshold
    evaluator = Evaluator(tolerance=tolerance, threshold=threshold)
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ds.DatasetError(f"dataset folder {folder} does not exist")
        samples = ds.samples(folder, ds.split_ids(folder, split, val_fraction, seed))
        if not samples:
            raise ds.DatasetError(f"{folder}: no images in split {split or '(all)'}")
        for sample in tqdm(samples, desc=folder.name, leave=False, disable=None):
            image_rgb, mask = ds.load_pair(sample)
            bgr = image_rgb[:, :, ::-1]
            evaluator.add(segmenter.segment([bgr])[0], mask)
    summary = evaluator.summary()
    summary.update(model=segmenter.info.label, split=split or "all",
                   data=[str(f) for f in folders])
    return summary
