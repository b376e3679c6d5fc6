"""TensorRT engine builder: an ONNX model compiled into an engine ("plan") for one GPU, offline.

:func:`build_engine` compiles an exported ONNX model (``training.export``), wrapped in its pre-
and post-processing (``inference.fused``: uint8 pixels in, crack probability out), with
TensorRT's ONNX parser (every parser error logged, a timing cache kept) into a serialized plan
for images of up to ``tile`` px a side in batches of up to ``max_batch``, in FP32, FP16 or INT8
(entropy calibration on a folder of images, padded exactly as at inference). Beside ``X.plan``
it writes ``X.json`` with the ONNX model's crackscan metadata, so an engine describes itself as
the ONNX model does. ``inference.tensorrt_runtime`` runs the plans.

An engine is specific to the GPU model, the TensorRT version, the precision and the tile and
batch sizes it was built for; :func:`engine_cache_key` names those, so :func:`cached_engine` builds
a new plan whenever one of them (or the model file) changes.

Tiles. The segmenter mirror-pads every image by ``REFLECT_MARGIN_PX`` on each side before the
network sees it (``inference.segmenter.pad_pixels``), so a ``tile`` x ``tile`` image becomes a
network input of ``tile + 2 * 32`` px a side (rounded up to the model's size multiple):
:func:`network_side`. ``tile`` here means the same as in ``inference.tiling.TiledSegmenter``:
the largest image tile handed to the segmenter. The engine's optimisation profile admits every
input from ``size_multiple`` px up to that side (tuned for full tiles), so it takes the fitted
tiles that ONNX Runtime and PyTorch get: an engine built with ``tile=512`` serves
``TiledSegmenter(TensorRTSegmenter(plan), tile=512, fit=True)``, and every backend cuts a frame
the same way.

TensorRT and pycuda come from NVIDIA's package index and need an NVIDIA GPU. They are imported
inside the functions that need them, so this module imports (and its pure parts,
:class:`CalibrationBatches`, :func:`engine_cache_key`, run) without them.

Versions: written for TensorRT 10 (name-based I/O, ``execute_async_v3``,
``build_serialized_network``). TensorRT 11 removed the precision builder flags and implicit INT8
calibration (strong typing only): there FP16 is skipped with a warning (the engine keeps the ONNX
model's FP32; convert the ONNX model with ModelOpt AutoCast for FP16) and INT8 raises ModelError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from inference.fused import fuse_io
from inference.onnxruntime_backend import load_onnx_model
from inference.segmenter import (
    ModelError,
    ModelInfo,
    file_sha256,
    pad_for_model,
    pad_pixels,
)
from inference.tensorrt_runtime import (
    _gpu_stack,
    _primary_context,
    check_cuda,
    gpu_name,
    trt_logger,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


# Part of every engine cache key: raise it when the way engines are built changes (profile,
# flags, pre-processing), so that plans built the old way are rebuilt.
ENGINE_FORMAT = "crackscan-engine-2"  # 2: fused uint8 graph, inputs of any side up to the tile
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Errors TensorRT logged since the last check: check_cuda() adds them to its message, because
# TensorRT says *why* on its logger and only returns None / False to the caller.
_TRT_ERRORS: deque[str] = deque(maxlen=8)


def precision_name(fp16: bool, int8: bool) -> str:
    """"int8" (with FP16 or FP32 fallback), "fp16" or "fp32"."""
    return "int8" if int8 else "fp16" if fp16 else "fp32"


def engine_cache_key(onnx_path: Path, gpu_name: str, trt_version: str, precision: str,
                     max_batch: int, tile: int) -> str:
    """sha256 (hex) of the model file's bytes and everything else an engine depends on: the GPU,
    the TensorRT version, the precision, the batch and tile sizes (and :data:`ENGINE_FORMAT`).
    A plan is only valid for the GPU model and TensorRT version that built it, so any change
    gives another key and therefore a rebuild."""
    digest = hashlib.sha256()
    digest.update(file_sha256(Path(onnx_path)).encode())
    for part in (ENGINE_FORMAT, gpu_name, trt_version, precision, str(max_batch), str(tile)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def engine_path(cache_dir: Path, key: str) -> Path:
    """Where the plan of ``key`` lives in ``cache_dir`` (its metadata beside it as .json)."""
    return Path(cache_dir) / f"{key}.plan"


def cached_engine(onnx_path: Path, cache_dir: Path, *, fp16: bool = True, max_batch: int = 8,
                  tile: int = 512, device: int = 0, **build_options: Any) -> Path:
    """The plan for ``onnx_path`` on this GPU and TensorRT from ``cache_dir``, built first (which
    takes minutes) when the cache has none. ``build_options`` go to :func:`build_engine`."""
    trt, _ = _gpu_stack()
    key = engine_cache_key(onnx_path, gpu_name(device), trt.__version__,
                           precision_name(fp16, build_options.get("int8", False)), max_batch,
                           tile)
    plan = engine_path(cache_dir, key)
    if plan.is_file() and plan.with_suffix(".json").is_file():
        log.info("TensorRT engine from cache: %s", plan)
        return plan
    log.info("building a TensorRT engine for %s (minutes; cached as %s)", onnx_path, plan)
    return build_engine(onnx_path, plan, fp16=fp16, max_batch=max_batch, tile=tile,
                        **build_options)


# --- pre-processing shared by calibration and inference ---------------------------------------

def network_side(tile: int, size_multiple: int) -> int:
    """Side of the network input for a ``tile`` x ``tile`` image: the tile plus the mirror
    margin on both sides, rounded up to the model's size multiple (what ``pad_pixels`` does)."""
    return pad_for_model(np.zeros((tile, tile), np.uint8), size_multiple)[0].shape[0]


Shape = tuple[int, int, int, int]


def profile_shapes(info: ModelInfo, tile: int, max_batch: int) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) of the engine input ``pixels`` (N x H x W x 3): from one image of the
    model's size multiple a side (the smallest that ``pad_pixels`` makes) to ``max_batch`` full
    tiles (:func:`network_side`), tuned for the full tiles. Every fitted tile of at most ``tile``
    px and every smaller frame, padded, lies in between."""
    side = network_side(tile, info.size_multiple)
    low = info.size_multiple
    return (1, low, low, 3), (max_batch, side, side, 3), (max_batch, side, side, 3)


def calibration_crop(image: np.ndarray, tile: int) -> np.ndarray:
    """The ``tile`` x ``tile`` view of a calibration image: the image at its own resolution (the
    engine sees tiles of frames at theirs), scaled up with bilinear interpolation only where a
    side is shorter than the tile (shorter side to exactly ``tile``, the other to
    ``max(tile, round(side * scale))``), then the centre crop (offset ``(side - tile) // 2``)."""
    h, w = image.shape[:2]
    if min(h, w) < tile:
        scale = tile / min(h, w)
        size = (max(tile, round(w * scale)), max(tile, round(h * scale)))  # cv2: (width, height)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        h, w = image.shape[:2]
    top, left = (h - tile) // 2, (w - tile) // 2
    return np.ascontiguousarray(image[top:top + tile, left:left + tile])


class CalibrationBatches:
    """INT8 calibration data: batches of ``batch_size`` padded tiles (the engine's input: uint8,
    N x S x S x 3 BGR with S = :func:`network_side`) from the images directly in ``folder`` (not
    its subfolders: a dataset's masks must not be calibrated on), in name order.

    Each image gives one tile (:func:`calibration_crop`), mirror-padded by
    ``inference.segmenter.pad_pixels`` as at inference; the engine's own graph normalises it,
    so the activation ranges TensorRT measures are those the engine will meet. The last batch
    is filled up with the first images again (TensorRT wants full batches).
    Iterating reads the images afresh; the pure-numpy half of :func:`build_engine`'s calibrator.
    """

    def __init__(self, folder: Path, info: ModelInfo, tile: int, batch_size: int,
                 max_images: int | None = None) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"calibration folder {folder} does not exist")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        self.paths = sorted(p for p in folder.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
        if not self.paths:
            raise ModelError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in calibration folder "
                             f"{folder}")
        self.info = info
        self.tile = tile
        self.batch_size = batch_size
        self.side = network_side(tile, info.size_multiple)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, self.side, self.side, 3)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def tensor(self, path: Path) -> np.ndarray:
        """S x S x 3 uint8: one image's calibration tile, padded as the engine's input."""
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ModelError(f"calibration image {path} cannot be read")
        return pad_pixels(calibration_crop(image, self.tile), self.info)[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        count = len(self) * self.batch_size
        order = [self.paths[i % len(self.paths)] for i in range(count)]
        for start in range(0, count, self.batch_size):
            yield np.ascontiguousarray(
                np.stack([self.tensor(p) for p in order[start:start + self.batch_size]]))


def entropy_calibrator(batches: CalibrationBatches | None, cache: Path | None,
                       batch_size: int) -> Any:
    """A TensorRT ``IInt8EntropyCalibrator2`` fed from ``batches`` (one device buffer for a
    batch, reused), reading the calibration cache ``cache`` when it exists (then TensorRT asks
    for no batches, and ``batches`` may be None) and writing it after calibrating. Needs a
    current CUDA context.

    Exceptions cannot cross back into TensorRT: a failing batch ends calibration and is kept in
    ``error``, which :func:`build_engine` raises after the build."""
    trt, cuda = _gpu_stack()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache = Path(cache) if cache else None
            self.error: Exception | None = None
            self.done = 0
            self._iterator = iter(batches) if batches is not None else iter(())
            self._device = None
            if batches is not None:
                self._device = check_cuda(lambda: cuda.mem_alloc(batches.nbytes),
                                          "allocating the calibration batch")

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(self._iterator)
                check_cuda(lambda: cuda.memcpy_htod(self._device, batch),
                           "copying a calibration batch to the GPU")
            except StopIteration:
                return None
            except Exception as exc:  # kept for build_engine; TensorRT only sees "no more"
                self.error = exc
                return None
            self.done += 1
            log.info("calibration batch %d / %d", self.done, len(batches or ()))
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            if self.cache is not None and self.cache.is_file():
                log.info("INT8 calibration from cache %s", self.cache)
                return self.cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            if self.cache is not None:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache, "wb") as handle:
                    handle.write(data)
                log.info("wrote INT8 calibration cache %s", self.cache)

    return EntropyCalibrator()


# --- building ---------------------------------------------------------------------------------

def _write_atomically(path: Path, data: Any) -> None:
    """Write then rename, so a crashed build never leaves a truncated plan in the cache."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


def _parse_onnx(trt: Any, network: Any, graph: bytes, onnx_path: Path) -> None:
    """Parse the serialized ONNX ``graph`` (the fused graph of ``onnx_path``) into ``network``;
    every parser error is logged and the first ones raised."""
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse(graph, str(onnx_path)):
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            node = error.node()
            log.error("ONNX parser error %d/%d (%s) at node %s: %s", index + 1,
                      parser.num_errors, error.code(), node if node >= 0 else "-", error.desc())
            _TRT_ERRORS.append(error.desc())
    check_cuda(parser.num_errors == 0, f"parsing {onnx_path} with TensorRT's ONNX parser")


def _timing_cache(config: Any, path: Path | None) -> Any:
    """Attach the timing cache at ``path`` (or a new one) to ``config``; returns it. A cache
    from another TensorRT version or GPU is not used (a fresh one replaces it)."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        cache = check_cuda(config.create_timing_cache(blob), "loading the timing cache")
        check_cuda(config.set_timing_cache(cache, False), "attaching the timing cache")
        return cache
    except ModelError as exc:
        if not blob:
            raise
        log.warning("timing cache %s not usable (%s); starting a new one", path, exc)
    cache = check_cuda(config.create_timing_cache(b""), "creating a timing cache")
    check_cuda(config.set_timing_cache(cache, False), "attaching the timing cache")
    return cache


def build_engine(onnx_path: Path, out_path: Path, *, fp16: bool = True, int8: bool = False,
                 calib_dir: Path | None = None, calib_cache: Path | None = None,
                 timing_cache: Path | None = None, max_batch: int = 8, tile: int = 512,
                 workspace_gb: float = 4, device: int = 0) -> Path:
    """Compile the exported ONNX model ``onnx_path`` into a TensorRT plan at ``out_path`` and its
    metadata at ``out_path.with_suffix('.json')``; returns ``out_path``.

    The network is the model's fused graph (``inference.fused``): input ``pixels``, uint8
    N x H x W x 3; output ``crack``, float32 N x H x W (N x 2 x H x W for a model with lining
    classes). The input gets one optimisation profile: min 1 x M x M x 3 (M: the model's size
    multiple), opt and max ``max_batch`` x S x S x 3 with S = :func:`network_side` (``tile`` +
    the 2 x 32 px mirror margin): full tiles, the shape TensorRT tunes its kernels for, and
    every smaller fitted tile or frame below it.
    ``fp16`` lets TensorRT pick FP16 kernels; ``int8`` INT8 ones, calibrated with entropy
    calibration (IInt8EntropyCalibrator2) on the images in ``calib_dir``
    (:class:`CalibrationBatches`, batches of ``max_batch``) or from ``calib_cache`` when that
    file exists (else it is written). ``timing_cache`` (read if present, written after) makes
    rebuilds much faster. ``workspace_gb`` caps TensorRT's scratch memory for tactics.

    Raises ModelError: TensorRT / pycuda missing, no usable ONNX model, every parser error
    (each also logged with its description), a failed build, INT8 without images or cache."""
    trt, cuda = _gpu_stack()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ModelError(f"model file {onnx_path} does not exist")
    if max_batch < 1 or tile < 32:
        raise ValueError(f"max_batch {max_batch} must be >= 1 and tile {tile} >= 32")
    model, info = load_onnx_model(onnx_path)
    metadata = info.metadata
    graph = fuse_io(model, info).SerializeToString()
    side = network_side(tile, info.size_multiple)
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11 has strong typing only
    if int8 and not weakly_typed:
        raise ModelError(f"TensorRT {trt.__version__} has no INT8 calibration (implicit "
                         "quantization was removed in TensorRT 11); build FP16/FP32, or quantize "
                         "the ONNX model with Q/DQ nodes (NVIDIA ModelOpt)")
    if int8 and calib_dir is None and not (calib_cache and Path(calib_cache).is_file()):
        raise ModelError("INT8 needs calibration images (--calib DIR) or an existing "
                         "calibration cache")
    if fp16 and not weakly_typed:
        log.warning("TensorRT %s has no FP16 builder flag (strongly typed networks): the engine "
                    "keeps the ONNX model's precision; convert the model with ModelOpt AutoCast "
                    "for FP16", trt.__version__)
        fp16 = False

    with _primary_context(cuda, device):
        builder = check_cuda(trt.Builder(trt_logger(trt)), "creating the TensorRT builder")
        network = check_cuda(builder.create_network(0), "creating the network definition")
        _parse_onnx(trt, network, graph, onnx_path)
        if network.num_inputs != 1 or network.num_outputs != 1:
            raise ModelError(f"{onnx_path} has {network.num_inputs} inputs and "
                             f"{network.num_outputs} outputs; a crackscan model has one each")
        image = network.get_input(0)

        config = check_cuda(builder.create_builder_config(), "creating the builder config")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        profile = check_cuda(builder.create_optimization_profile(),
                             "creating the optimisation profile")
        profile.set_shape(image.name, *profile_shapes(info, tile, max_batch))
        check_cuda(config.add_optimization_profile(profile) >= 0,
                   "adding the optimisation profile")
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        calibrator = None
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)
            batches = (CalibrationBatches(calib_dir, info, tile, max_batch) if calib_dir
                       else None)
            calibrator = entropy_calibrator(batches, calib_cache, max_batch)
            config.int8_calibrator = calibrator
            # dynamic input: calibration runs at the profile's opt shape, max_batch tiles
            check_cuda(config.set_calibration_profile(profile), "setting the calibration profile")
        cache = _timing_cache(config, Path(timing_cache) if timing_cache else None)

        log.info("building %s engine: %s, batch <= %d, input %dx%d (tile %d), TensorRT %s",
                 precision_name(fp16, int8), onnx_path.name, max_batch, side, side, tile,
                 trt.__version__)
        plan = builder.build_serialized_network(network, config)
        if calibrator is not None and calibrator.error is not None:
            raise ModelError(f"INT8 calibration failed: {calibrator.error}")
        plan = check_cuda(plan, f"building the TensorRT engine for {onnx_path}")

        out_path.parent.mkdir(parents=True, exist_ok=True)
        if timing_cache:
            Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(Path(timing_cache), cache.serialize())
        description = {
            "onnx": str(onnx_path), "onnx_sha256": info.sha256, "metadata": metadata,
            "tile": tile, "input_side": side, "max_batch": max_batch,
            "precision": precision_name(fp16, int8), "tensorrt": trt.__version__,
            "gpu": gpu_name(device),
        }
        _write_atomically(out_path.with_suffix(".json"),
                          json.dumps(description, indent=2).encode())
        _write_atomically(out_path, plan)
    log.info("wrote %s (%.1f MB)", out_path, out_path.stat().st_size / 1e6)
    return out_path


# --- inference --------------------------------------------------------------------------------

