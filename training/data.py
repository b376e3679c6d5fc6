"""Labelled crack datasets on disk and the training transforms.

A dataset folder holds ``images/<id>.*`` and ``masks/<id>.png``, and optionally ``train.txt`` /
``val.txt`` / ``test.txt`` with one id per line. ``--split NAME`` picks the ids of ``NAME.txt``;
a folder without that file uses all its images.

Masks, by the number of classes the recipe lists (``classes:`` in the training config):
- binary (one class, the default): 0 = background, 255 = crack; loaded as {0, 1};
- multi-class (C classes): each pixel holds its class index 0 .. C-1, the index of its name in
  ``classes`` (conventionally 0 = background). A mask of only 0 and 255 (a crack dataset's) is
  read as background and ``crack``, so real crack sets train a multi-class model beside class
  masks; any other value of C or more is refused, so a mask of another labelling fails loudly
  instead of training on garbage.

A folder with ``classes.json`` (a JSON list of class names in index order, as
``crackscan synth --dataset`` writes) holds class-index masks, whatever the recipe: a binary
recipe (or ``eval``) reads its ``crack`` class as the crack mask and every other class as
background; a multi-class recipe must list as many classes as the file (in the same order).

Transforms take and return the (image, mask) pair: images interpolate bilinearly, masks with
nearest neighbour only, so a mask never holds a value that is not a label.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from crackscan.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
CLASSES_FILE = "classes.json"  # beside masks/: the masks hold class indices into this list


class DatasetError(UserError, ValueError):
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


CARVED = "carved"  # the split name of the validation ids that training carves


def split_ids(folder: Path, split: str | None, val_fraction: float = 0.1, seed: int = 0
              ) -> list[str]:
    """Ids of ``split`` (``read_split``); ``"carved"``: the validation ids a training run with
    this ``val_fraction`` and ``seed`` carves from the folder (``train_val_split``)."""
    if split == CARVED:
        return train_val_split(folder, val_fraction, seed)[1]
    return read_split(folder, split)


def load_image(path: Path) -> np.ndarray:
    """An image as HxWx3 uint8 RGB (grey images are replicated to three channels)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@lru_cache(maxsize=64)
def folder_classes(folder: Path) -> tuple[str, ...] | None:
    """The class names of a dataset folder whose masks hold class indices (its
    ``classes.json``), or None for a folder of 0/255 crack masks."""
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DatasetError(f"{path} must be a JSON list of class names in index order")
    if "crack" not in names:
        raise DatasetError(f"{path} lists no 'crack' class: {names}")
    return tuple(names)


def load_mask(path: Path, shape: tuple[int, int], num_classes: int = 1,
              crack_label: int = 1) -> np.ndarray:
    """A mask as HxW uint8, checked against the image's height and width: {0, 1} for a binary
    model (``num_classes`` 1, file 0/255, or the ``crack`` class of a folder with
    ``classes.json``), class indices 0 .. num_classes-1 otherwise (a 0/255 crack mask as
    {0, ``crack_label``})."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"cannot read mask {path}")
    if mask.shape != shape:
        raise DatasetError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, "
                           f"its image is {shape[1]}x{shape[0]}")
    classes = folder_classes(Path(path).parent.parent)
    if classes is not None:
        if num_classes == 1:
            return (mask == classes.index("crack")).astype(np.uint8)
        if num_classes != len(classes):
            raise DatasetError(f"{Path(path).parent.parent} has class masks of {len(classes)} "
                               f"classes {list(classes)}, but the recipe lists {num_classes}: "
                               "list the folder's classes in the recipe, in the same order")
    elif num_classes == 1:
        return (mask > 127).astype(np.uint8)
    elif mask.max() == 255 and not np.any((mask > 0) & (mask < 255)):
        return np.where(mask == 255, crack_label, 0).astype(np.uint8)
    if mask.max() >= num_classes:
        raise DatasetError(f"mask {path} has value {mask.max()}, but the recipe lists "
                           f"{num_classes} classes: a class mask holds each pixel's class index "
                           "(or only 0 and 255 for a crack mask)")
    return mask


def load_pair(sample: Sample, num_classes: int = 1, crack_label: int = 1
              ) -> tuple[np.ndarray, np.ndarray]:
    image = load_image(sample.image_path)
    return image, load_mask(sample.mask_path, image.shape[:2], num_classes, crack_label)


BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


def random_crop(image: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator,
                border: str = "reflect", centre: int | None = None, crack_label: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop`` x ``crop`` window that holds a crack pixel (mask value ``crack_label``) 70 % of
    the time when the mask has one (cracks cover ~1-3 % of an image), inside its central
    ``centre`` x ``centre`` part when given; a smaller image is first padded bottom and right."""
    centre = centre or crop
    margin = (crop - centre) // 2
    h, w = mask.shape
    if h < crop or w < crop:
        pad_h, pad_w = max(0, crop - h), max(0, crop - w)
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, BORDERS[border])
        mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, BORDERS[border])
        h, w = mask.shape
    ys, xs = np.nonzero(mask == crack_label)
    if len(ys) and rng.random() < 0.7:
        k = rng.integers(len(ys))
        y0 = int(np.clip(ys[k] - margin - rng.integers(centre), 0, h - crop))
        x0 = int(np.clip(xs[k] - margin - rng.integers(centre), 0, w - crop))
    else:
        y0, x0 = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    return image[y0:y0 + crop, x0:x0 + crop], mask[y0:y0 + crop, x0:x0 + crop]


def centre_crop(image: np.ndarray, mask: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    return image[y0:y0 + crop, x0:x0 + crop], mask[y0:y0 + crop, x0:x0 + crop]


def rotate(image: np.ndarray, mask: np.ndarray, angle: float, border: str = "reflect"
           ) -> tuple[np.ndarray, np.ndarray]:
    """Turn the pair by ``angle`` degrees (counter-clockwise) about the centre, keeping its size:
    the image bilinearly, the mask with nearest neighbour; corners filled by ``border``."""
    h, w = mask.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    return (cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=BORDERS[border]),
            cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_NEAREST,
                           borderMode=BORDERS[border]))


def elastic_field(shape: tuple[int, int], sigma: float, grid: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Smooth per-pixel displacements (dx, dy), each HxW float32: random vectors on a coarse
    ``grid`` x ``grid`` lattice, drawn from a Gaussian of ``sigma`` px standard deviation and
    interpolated bicubically to every pixel (Ronneberger et al. 2015: 3x3, sigma 10 px)."""
    h, w = shape
    coarse = rng.normal(0.0, sigma, (2, grid, grid)).astype(np.float32)
    dx, dy = (cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse)
    return dx, dy


def elastic(image: np.ndarray, mask: np.ndarray, sigma: float, grid: int,
            rng: np.random.Generator, border: str = "reflect") -> tuple[np.ndarray, np.ndarray]:
    """Warp the pair by one smooth random field (``elastic_field``): output pixel (y, x) samples
    the input at (y + dy, x + dx), the image bilinearly, the mask with nearest neighbour.
    ``sigma`` 0 returns the pair unchanged."""
    h, w = mask.shape
    dx, dy = elastic_field((h, w), sigma, grid, rng)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x, map_y = xs + dx, ys + dy
    return (cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=BORDERS[border]),
            cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=BORDERS[border]))


def flip_and_turn(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal and vertical flips and a random multiple of 90 degrees."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    turns = int(rng.integers(4))
    return np.rot90(image, turns), np.rot90(mask, turns)


def lighting(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
             contrast_range: tuple[float, float] = (0.7, 1.3),
             gamma_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grey (30 %), then, when ``gamma_range`` is given, a gamma drawn log-uniformly from it
    (half the time), then contrast from ``contrast_range``, brightness +-30 and sensor noise
    (30 %); the mask is kept. A gamma above 1 darkens the mid-tones as a laser-lit line-scan or
    an under-exposed camera does (and bright spots keep their contrast), below 1 it lightens
    them: a model trained without it reads much of a dark image as crack (README, "Exposure")."""
    image = image.astype(np.float32)
    if rng.random() < 0.3:  # tunnel linings are grey: don't let colour carry the decision
        image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    if gamma_range is not None and rng.random() < 0.5:
        gamma = math.exp(rng.uniform(math.log(gamma_range[0]), math.log(gamma_range[1])))
        image = 255.0 * (image / 255.0) ** gamma
    contrast = rng.uniform(*contrast_range)
    brightness = rng.uniform(-30, 30)
    image = (image - image.mean()) * contrast + image.mean() + brightness
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def rescale(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a square pair to ``size`` x ``size``. A binary mask (0/1) is resized by area and
    thresholded at half, so a 1 px crack shrunk by up to a half survives as 1 px; a class mask
    with more classes by nearest neighbour."""
    if mask.shape[0] == size:
        return image, mask
    shrink = size < mask.shape[0]
    image = cv2.resize(image, (size, size),
                       interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if mask.max() <= 1:
        soft = cv2.resize(mask.astype(np.float32), (size, size),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        mask = (soft >= 0.5).astype(mask.dtype)
    else:
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return image, mask


def augment(image: np.ndarray, mask: np.ndarray, crop: int, rng: np.random.Generator,
            max_rotation: float = 0.0, elastic_sigma: float = 0.0, elastic_grid: int = 3,
            border: str = "reflect", scale_range: tuple[float, float] | None = None,
            contrast_range: tuple[float, float] = (0.7, 1.3),
            gamma_range: tuple[float, float] | None = None, crack_label: int = 1
            ) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (crack-biased: mask value ``crack_label``), then, when asked, a zoom by a
    factor drawn log-uniformly from ``scale_range`` (below 1 the scene shrinks, so cracks get
    thinner, as from a camera with more mm per pixel), a turn by any angle in
    +-``max_rotation`` degrees and an elastic warp, then flips, 90-degree turns, grey and
    lighting (``contrast_range``, ``gamma_range``: see ``lighting``). Takes and returns the
    (image, mask) pair.

    Zooms, turns and warps work on a larger window that is centre-cropped afterwards, so the
    corners they uncover come from the image itself rather than from the border fill.
    """
    geometric = max_rotation > 0 or elastic_sigma > 0
    window = crop + 2 * math.ceil(0.21 * crop + 2 * elastic_sigma) if geometric else crop
    if scale_range is not None and scale_range != (1.0, 1.0):
        scale = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
        source = max(8, round(window / scale))
        image, mask = random_crop(image, mask, source, rng, border,
                                  centre=max(1, min(source, round(crop / scale))),
                                  crack_label=crack_label)
        image, mask = rescale(image, mask, window)
    else:
        image, mask = random_crop(image, mask, window, rng, border, centre=crop,
                                  crack_label=crack_label)
    if max_rotation > 0:
        image, mask = rotate(image, mask, rng.uniform(-max_rotation, max_rotation), border)
    if elastic_sigma > 0:
        image, mask = elastic(image, mask, elastic_sigma, elastic_grid, rng, border)
    if geometric:
        image, mask = centre_crop(image, mask, crop)
    image, mask = flip_and_turn(image, mask, rng)
    image, mask = lighting(image, mask, rng, contrast_range, gamma_range)
    return image, np.ascontiguousarray(mask)


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32, scaled to 0..1 then standardised. The same constants are
    written into the ONNX metadata and applied by every inference backend."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
