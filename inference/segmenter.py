"""The segmenter interface: a crack probability map from an image. Backends import this base;
the factory (``inference.backends.open_segmenter``) imports the backends.

Every backend reads the pre-processing constants (mean, std, size multiple, colour order, classes,
default threshold) from the ONNX model's metadata (written by ``training.export``), so a model
file is self-describing. ONNX Runtime (``inference.onnxruntime_backend``) is the CPU path (and
uses CUDA when its CUDA provider is installed); TensorRT (``inference.tensorrt_runtime``) and
PyTorch (``training.torch_backend``) implement the same interface.

Pre-processing is split between host and device. The host only mirror-pads the uint8 image
(:func:`pad_pixels`); casting, colour order, normalisation and the read-out of crack
probability run inside the model's graph (``inference.fused``) on whatever device runs the
model. :class:`BatchedSegmenter` is that host half, shared by all backends. :func:`preprocess`
and :func:`crack_probability` are the same arithmetic in numpy, the reference the fused graph
is held to (``tests/test_fused.py``).

A multi-class model with lining classes (anything besides background and crack: joint, stain,
...) maps each image to two planes, 2 x H x W float32: the crack probability and the index of
each pixel's most likely class (:func:`split_map` separates them); a binary model (or a
background / crack one) to the crack probability alone, H x W.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from crackscan.errors import UserError

log = logging.getLogger(__name__)

class ModelError(UserError, ValueError):
    """A model file that cannot be used: missing, not ONNX, or without crackscan metadata."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size_multiple: int
    classes: tuple[str, ...]
    threshold: float
    input_color: str
    metadata: dict

    @property
    def label(self) -> str:
        """Name and short hash, e.g. ``mobilenet_aspp@3f2a9c01``: what a run stores as its model."""
        return f"{self.name}@{self.sha256[:8]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_info(path: Path, metadata: dict[str, str]) -> ModelInfo:
    try:
        return ModelInfo(
            path=path, name=metadata["crackscan.model"], sha256=file_sha256(path),
            mean=tuple(json.loads(metadata["crackscan.mean"])),
            std=tuple(json.loads(metadata["crackscan.std"])),
            size_multiple=int(metadata["crackscan.size_multiple"]),
            classes=tuple(json.loads(metadata["crackscan.classes"])),
            threshold=float(metadata["crackscan.threshold"]),
            input_color=metadata.get("crackscan.input_color", "RGB"), metadata=dict(metadata))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{path} lacks crackscan metadata ({exc}); export it with "
                         "'crackscan export'") from None


class Segmenter(Protocol):
    info: ModelInfo
    backend: str

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One map per BGR uint8 image, same sizes: crack probability (HxW float32, 0..1), or
        for a model with lining classes 2xHxW (:func:`split_map`)."""


# Every side is mirrored this far before segmentation and cropped off after: a network sees
# zero padding at an image's edges that it rarely saw in training and answers with a band of
# false cracks there (measured on real 1280x720 video: hundreds of pixels per edge row at 0 px,
# none at 32 px). Also the U-Net paper's mirror padding.
REFLECT_MARGIN_PX = 32


def pad_for_model(image: np.ndarray, multiple: int, margin: int = REFLECT_MARGIN_PX
                  ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Mirror ``margin`` pixels onto every side, then more at the bottom and right until height
    and width are multiples of ``multiple``. Returns the padded image and the window
    (top, left, height, width) of the original inside it."""
    h, w = image.shape[:2]
    m = max(0, min(margin, h - 1, w - 1))
    bottom = m + (-(h + 2 * m)) % multiple
    right = m + (-(w + 2 * m)) % multiple
    return cv2.copyMakeBorder(image, m, bottom, m, right, cv2.BORDER_REFLECT_101), (m, m, h, w)


def pad_pixels(image: np.ndarray, info: ModelInfo
               ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The host half of pre-processing: a BGR (or grey) uint8 image -> HxWx3 uint8 BGR,
    mirror-padded for the model (:func:`pad_for_model`), and the window (top, left, height,
    width) of the image in it. The fused graph (``inference.fused``) does the rest."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return pad_for_model(image, info.size_multiple)


def preprocess(image: np.ndarray, info: ModelInfo
               ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Reference pre-processing in numpy: BGR uint8 image -> 1x3xHxW float32 (mirror-padded,
    in the model's colour order, normalised with the model's own constants) and the window
    (top, left, height, width) of the image in it. The fused graph computes the same, op for
    op."""
    padded, window = pad_pixels(image, info)
    if info.input_color == "RGB":
        padded = cv2.cvtColor(padded, cv2.COLOR_BGR2RGB)
    x = (padded.astype(np.float32) / 255.0 - np.asarray(info.mean, np.float32)) / np.asarray(
        info.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), window


def crack_channel(classes: tuple[str, ...]) -> int:
    """The channel of a model's output that holds cracks: 0 for a binary model (one channel),
    else the index of ``crack`` among ``classes`` (ModelError without one)."""
    if len(classes) == 1:
        return 0
    if "crack" not in classes:
        raise ModelError(f"model classes {list(classes)} have no 'crack' channel")
    return classes.index("crack")


BASE_CLASSES = ("background", "crack")


def feature_classes(classes: tuple[str, ...]) -> tuple[str, ...]:
    """A model's lining-feature classes: all but background and crack (none for a binary
    model)."""
    return tuple(c for c in classes if c not in BASE_CLASSES) if len(classes) > 1 else ()


def map_planes(classes: tuple[str, ...]) -> int:
    """Planes of a model's map: 2 (crack probability, class index) with lining classes, else 1."""
    return 2 if feature_classes(classes) else 1


def split_map(seg_map: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(HxW crack probability, HxW uint8 class index or None) of a segmenter's map."""
    if seg_map.ndim == 2:
        return seg_map, None
    return seg_map[0], seg_map[1].astype(np.uint8)


def segmentation_map(logits: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """CxHxW logits -> the map a segmenter returns: :func:`crack_probability`, with the argmax
    class index as a second plane for a model with lining classes."""
    prob = crack_probability(logits, classes)
    if map_planes(classes) == 1:
        return prob
    return np.stack([prob, logits.argmax(axis=0).astype(np.float32)])


def crack_probability(logits: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """CxHxW logits -> HxW crack probability: sigmoid of the one channel of a binary model,
    softmax over the channels of a multi-class model, read at the 'crack' channel."""
    channel = crack_channel(classes)
    if len(classes) == 1:
        return (1.0 / (1.0 + np.exp(-logits[0]))).astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (shifted[channel] / shifted.sum(axis=0)).astype(np.float32)


class BatchedSegmenter:
    """The host half of a backend that runs a fused graph (``inference.fused``): pad each image
    (:func:`pad_pixels`), group the images of one ``segment`` call by padded shape, run each
    group in batches of up to ``max_batch`` through :meth:`run_batch`, and crop every image's
    window out of its map. Output order = input order. Tiles of one frame share a shape, and so
    do the frames of one camera, so a call's tiles or micro-batch of frames become a few batches.

    Subclasses set ``info``, ``max_batch`` and ``backend`` and implement :meth:`run_batch`.
    ``batches_run`` counts the batches run so far."""

    info: ModelInfo
    max_batch: int
    backend: str
    batches_run: int = 0

    def run_batch(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 BGR padded images -> N x H x W float32 crack probability (N x 2 x
        H x W with the class index plane, for a model with lining classes), an array the caller
        may keep."""
        raise NotImplementedError

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One map per BGR uint8 image, same sizes (see :meth:`Segmenter.segment`)."""
        padded = [pad_pixels(image, self.info) for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (pixels, _) in enumerate(padded):
            groups.setdefault(pixels.shape, []).append(i)
        maps: list[np.ndarray | None] = [None] * len(images)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start:start + self.max_batch]
                probs = self.run_batch(np.stack([padded[i][0] for i in chunk]))
                self.batches_run += 1
                for i, prob in zip(chunk, probs, strict=True):
                    top, left, h, w = padded[i][1]
                    maps[i] = prob[..., top:top + h, left:left + w]
        return maps  # type: ignore[return-value]  # every slot filled above


def check_batch(max_batch: int) -> None:
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch} must be >= 1")
