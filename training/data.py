"""Labelled crack datasets on disk and the training transforms.

A dataset folder holds ``images/<id>.*`` and ``masks/<id>.png`` (0 = background, 255 = crack),
and optionally ``train.txt`` / ``val.txt`` / ``test.txt`` with one id per line. ``--split NAME``
picks the ids of ``NAME.txt``; a folder without that file uses all its images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset folder that cannot be used as given (missing folder, image without mask...)."""


@dataclass(frozen=True)
class Sample:
    dataset: str
    id: str
    image_path: Path
    mask_path: Path


def _image_index(folder: Path) -> dict[str, Path]:
    images = folder / "images"
    if not images.is_dir():
        raise DatasetError(f"{folder}: no images/ folder "
                           "(expected images/<id>.jpg and masks/<id>.png)")
    return {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def read_split(folder: Path, split: str | None) -> list[str]:
    """Ids of ``split`` in ``folder``; all images when the split file is absent or split is None."""
    index = _image_index(folder)
    if split is None or not (folder / f"{split}.txt").is_file():
        return sorted(index)
    lines = (folder / f"{split}.txt").read_text().splitlines()
    ids = [line.strip() for line in lines if line.strip()]
    missing = [i for i in ids if i not in index]
    if missing:
        raise DatasetError(f"{folder}/{split}.txt names {len(missing)} ids without an image, "
                           f"e.g. {missing[0]}")
    return ids


def samples(folder: Path, ids: list[str]) -> list[Sample]:
    folder = Path(folder)
    index = _image_index(folder)
    out = []
    for sample_id in ids:
        mask = folder / "masks" / f"{sample_id}.png"
        if not mask.is_file():
            raise DatasetError(f"{folder}: image {sample_id} has no mask {mask}")
        out.append(Sample(folder.name, sample_id, index[sample_id], mask))
    return out


def train_val_split(folder: Path, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Training and validation ids of one folder.

    The official ``val.txt`` is used when the folder has one; otherwise a validation split is
    carved from the training ids, reproducibly for a given seed. Test ids are never touched.
    """
    folder = Path(folder)
    train_ids = read_split(folder, "train")
    if (folder / "val.txt").is_file():
        return train_ids, read_split(folder, "val")
    shuffled = sorted(train_ids)
    random.Random(f"{seed}:{folder.name}").shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction)) if val_fraction > 0 else 0
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def load_image(path: Path) -> np.ndarray:
    """An image as HxWx3 uint8 RGB (grey images are replicated to three channels)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask as HxW uint8 in {0, 1}, checked against the image's height and width."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"cannot read mask {path}")
    if mask.shape != shape:
        raise DatasetError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, "
                           f"its image is {shape[1]}x{shape[0]}")
    return (mask > 127).astype(np.uint8)


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    image = load_image(sample.image_path)
    return image, load_mask(sample.mask_path, image.shape[:2])


def augment(image: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (crack-biased), flips, 90-degree turns, grey, lighting. Takes and returns the
    (image, mask) pair; the mask is never interpolated."""
    h, w = mask.shape
    if h < crop or w < crop:
        pad_h, pad_w = max(0, crop - h), max(0, crop - w)
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
        mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
        h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) and rng.random() < 0.7:  # centre most crops on a crack pixel: cracks are ~1-3 %
        k = rng.integers(len(ys))
        y0 = int(np.clip(ys[k] - rng.integers(crop), 0, h - crop))
        x0 = int(np.clip(xs[k] - rng.integers(crop), 0, w - crop))
    else:
        y0, x0 = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    image = image[y0:y0 + crop, x0:x0 + crop]
    mask = mask[y0:y0 + crop, x0:x0 + crop]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    turns = int(rng.integers(4))
    image, mask = np.rot90(image, turns), np.rot90(mask, turns)
    image = image.astype(np.float32)
    if rng.random() < 0.3:  # tunnel linings are grey: don't let colour carry the decision
        image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    contrast = rng.uniform(0.7, 1.3)
    brightness = rng.uniform(-30, 30)
    image = (image - image.mean()) * contrast + image.mean() + brightness
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), np.ascontiguousarray(mask)


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32, scaled to 0..1 then standardised. The same constants are
    written into the ONNX metadata and applied by every inference backend."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pad_to_multiple(image: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad the bottom and right so height and width are multiples of ``multiple``;
    returns the padded image and the original (height, width) to crop back to."""
    h, w = image.shape[:2]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
    return image, (h, w)
