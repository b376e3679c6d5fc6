"""Segmenters: a crack probability map from an image, behind one small interface.

Every backend reads the pre-processing constants (mean, std, size multiple, colour order, classes,
default threshold) from the ONNX model's metadata (written by ``training.export``), so a model
file is self-describing. ONNX Runtime is the CPU path (and uses CUDA when its CUDA provider is
installed); TensorRT (``inference.tensorrt_backend``) and PyTorch (``inference.torch_backend``)
implement the same interface.

Pre-processing is split between host and device. The host only mirror-pads the uint8 image
(:func:`pad_pixels`); casting, colour order, normalisation and the read-out of crack
probability run inside the model's graph (``inference.fused``) on whatever device runs the
model. :class:`BatchedSegmenter` is that host half, shared by all backends. :func:`preprocess`
and :func:`crack_probability` are the same arithmetic in numpy, the reference the fused graph
is held to (``tests/test_fused.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

log = logging.getLogger(__name__)

BUNDLED_MODEL = "crackscan_mobilenet_aspp.onnx"


class ModelError(ValueError):
    """A model file that cannot be used: missing, not ONNX, or without crackscan metadata."""


def bundled_model_path() -> Path:
    """The default model shipped inside the ``inference`` package."""
    return Path(str(resources.files("inference") / "models" / BUNDLED_MODEL))


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
        """Crack probability maps (HxW float32, 0..1), one per BGR uint8 image, same sizes."""


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
        """N x H x W x 3 uint8 BGR padded images -> N x H x W float32 crack probability, an array
        the caller may keep."""
        raise NotImplementedError

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Crack probability maps (HxW float32, 0..1), one per BGR uint8 image, same sizes."""
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
                    maps[i] = prob[top:top + h, left:left + w]
        return maps  # type: ignore[return-value]  # every slot filled above


def check_batch(max_batch: int) -> None:
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch} must be >= 1")


def load_onnx_model(path: Path) -> tuple[object, ModelInfo]:
    """The ONNX model at ``path`` (``onnx.ModelProto``) and its crackscan metadata."""
    from inference.fused import parse_model

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        model = parse_model(path.read_bytes())
    except Exception as exc:  # protobuf DecodeError and friends
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path} is not a usable ONNX model: {reason}") from None
    return model, model_info(path, {p.key: p.value for p in model.metadata_props})


class OnnxRuntimeSegmenter(BatchedSegmenter):
    """ONNX Runtime backend, running the model's fused graph (``inference.fused``: uint8 in,
    crack probability out). Same-shaped images of one call run as one batch of up to
    ``max_batch`` (exported models have a dynamic batch axis); 1 runs them one by one, which is
    all a CPU needs for whole frames.

    ``spin``: the pool's threads busy-wait between the operators of a run (ONNX Runtime's
    default, fastest for a model of many small layers) and stop when the run returns
    (``session.force_spinning_stop``), so between frames the cores go to the stages beside
    inference; False: they never spin."""

    def __init__(self, path: Path, threads: int = 0, providers: list[str] | None = None,
                 spin: bool = True, max_batch: int = 1) -> None:
        import onnxruntime as ort

        from inference.fused import fuse_io

        check_batch(max_batch)
        path = Path(path)
        model, self.info = load_onnx_model(path)
        fused = fuse_io(model, self.info).SerializeToString()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.log_severity_level = 3
        if spin:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        else:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"])
                  if p in available]
        try:
            self.session = ort.InferenceSession(fused, options, providers=chosen)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{path} is not a usable ONNX model: {reason}") from None
        self.providers = self.session.get_providers()
        self.max_batch = max_batch
        self.backend = "onnxruntime" if max_batch == 1 else f"onnxruntime+batch{max_batch}"

    def run_batch(self, pixels: np.ndarray) -> np.ndarray:
        from inference.fused import CRACK, PIXELS

        return self.session.run([CRACK], {PIXELS: pixels})[0]


BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
ENGINE_CACHE = Path.home() / ".cache" / "crackscan" / "engines"


def open_segmenter(model: Path | None = None, backend: str = "auto", threads: int = 0, *,
                   tile: int = 0, tile_overlap: int = 64, max_batch: int = 8,
                   batch_frames: int = 1, engine_cache: Path | None = None,
                   spin: bool = True, tta: str = "none") -> Segmenter:
    """The segmenter for ``model`` on ``backend``; logs which one was picked.

    ``model``: an ONNX file (default: the bundled model), a TensorRT plan (``.plan``, from
    ``crackscan build-engine``) or a training checkpoint (``.pt``: the PyTorch backend).
    ``backend``: ``auto`` takes TensorRT for an ONNX model when TensorRT, pycuda and a GPU are
    there (building the engine into ``engine_cache`` the first time, which takes minutes), else
    ONNX Runtime (with its CUDA provider when installed); ``torch`` runs a checkpoint.
    ``tile``: frames larger than this are cut into overlapping fitted tiles of at most
    ``tile`` px (``inference.tiling``; a TensorRT plan uses its own tile). ``batch_frames`` > 1:
    the worker hands over several frames per call, which ONNX Runtime then runs as one batch per
    frame size. ``spin``: ONNX Runtime's threads busy-wait within a run and stop when it
    returns; False: they never spin (``OnnxRuntimeSegmenter``). ``tta``: ``hflip`` or ``flips``
    average each frame's probabilities with its mirror images (``inference.tta``: 2 or 4 model
    runs a frame).
    """
    from inference import tensorrt_backend as trt_backend
    from inference.tiling import TiledSegmenter
    from inference.tta import TTA_MODES, FlipAveragedSegmenter

    path = Path(model) if model else bundled_model_path()
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if tta not in TTA_MODES:
        raise ModelError(f"unknown test-time augmentation {tta!r}; expected one of "
                         f"{', '.join(TTA_MODES)}")
    providers: list[str] = []  # ONNX Runtime's execution providers, for the log line
    kind = {".plan": "tensorrt", ".engine": "tensorrt", ".pt": "torch"}.get(path.suffix.lower(),
                                                                          "onnx")
    if kind == "torch" or backend == "torch":
        if kind != "torch":
            raise ModelError(f"--backend torch runs a training checkpoint (.pt), not {path}")
        from inference.torch_backend import TorchSegmenter

        segmenter: Segmenter = TorchSegmenter(path, max_batch=max_batch)
        if tile:
            segmenter = TiledSegmenter(segmenter, tile=tile, overlap=tile_overlap,
                                       max_batch=max_batch, fit=True)
    elif kind == "tensorrt" or backend == "tensorrt" or (
            backend == "auto" and trt_backend.tensorrt_available()):
        if backend == "onnxruntime":
            raise ModelError(f"{path} is a TensorRT plan; ONNX Runtime runs the .onnx model")
        plan = path if kind == "tensorrt" else trt_backend.cached_engine(
            path, engine_cache or ENGINE_CACHE, max_batch=max_batch, tile=tile or 512)
        engine = trt_backend.TensorRTSegmenter(plan)
        segmenter = TiledSegmenter(engine, tile=engine.tile, overlap=tile_overlap,
                                   max_batch=engine.max_batch, fit=True)
    else:
        onnx_runtime = OnnxRuntimeSegmenter(path, threads=threads, spin=spin,
                                            max_batch=max_batch if tile else batch_frames)
        segmenter = onnx_runtime
        providers = onnx_runtime.providers
        if tile:
            segmenter = TiledSegmenter(onnx_runtime, tile=tile, overlap=tile_overlap,
                                       max_batch=max_batch, fit=True)
    if tta != "none":
        segmenter = FlipAveragedSegmenter(segmenter, tta)
    log.info("backend %s%s, model %s", segmenter.backend,
             f" ({', '.join(providers)})" if providers else "", segmenter.info.label)
    return segmenter
