"""TensorRT backend: an ONNX model compiled into an engine ("plan") for one GPU, behind the
``Segmenter`` interface.

Two halves:

* :func:`build_engine` compiles an exported ONNX model (``training.export``), wrapped in its
  pre- and post-processing (``inference.fused``: uint8 pixels in, crack probability out), with
  TensorRT's ONNX parser into a serialized plan for images of up to ``tile`` px a side in
  batches of up to ``max_batch``, in FP32, FP16 or INT8 (entropy calibration on a folder of
  images, padded exactly as at inference). Beside ``X.plan`` it writes ``X.json`` with the ONNX
  model's crackscan metadata, so an engine describes itself as the ONNX model does.
* :class:`TensorRTSegmenter` runs such a plan: buffers allocated once for the largest batch,
  one CUDA stream, asynchronous copies, I/O bound by tensor name (TensorRT 10's
  ``execute_async_v3``). The host only mirror-pads uint8 images; the GPU casts, normalises and
  reads out the crack probability, so a tile crosses PCIe as a quarter of its float32 bytes and
  comes back as one channel.

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
:class:`CalibrationBatches`, :func:`engine_cache_key`, :func:`check_cuda`, run) without them.

Versions: written for TensorRT 10 (name-based I/O, ``execute_async_v3``,
``build_serialized_network``). TensorRT 11 removed the precision builder flags and implicit INT8
calibration (strong typing only): there FP16 is skipped with a warning (the engine keeps the ONNX
model's FP32; convert the ONNX model with ModelOpt AutoCast for FP16) and INT8 raises ModelError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from inference.fused import CRACK, PIXELS, fuse_io
from inference.segmenter import (
    BatchedSegmenter,
    ModelError,
    ModelInfo,
    file_sha256,
    load_onnx_model,
    model_info,
    pad_for_model,
    pad_pixels,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

NOT_INSTALLED = ("TensorRT is not installed: it comes from NVIDIA's package index (pip install "
                 "tensorrt --extra-index-url https://pypi.nvidia.com) on a machine with an NVIDIA "
                 "GPU; use --backend onnxruntime")
PYCUDA_MISSING = ("pycuda is not installed (pip install pycuda; it needs the CUDA toolkit), which "
                  "the TensorRT backend uses for GPU memory and streams; use --backend onnxruntime")

# Part of every engine cache key: raise it when the way engines are built changes (profile,
# flags, pre-processing), so that plans built the old way are rebuilt.
ENGINE_FORMAT = "crackscan-engine-2"  # 2: fused uint8 graph, inputs of any side up to the tile
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Errors TensorRT logged since the last check: check_cuda() adds them to its message, because
# TensorRT says *why* on its logger and only returns None / False to the caller.
_TRT_ERRORS: deque[str] = deque(maxlen=8)
_TRT_LOGGER: Any = None


# --- errors -----------------------------------------------------------------------------------

def check_cuda(result: T | Callable[[], T], what: str) -> T:
    """The one place where CUDA (pycuda) and TensorRT failures become :class:`ModelError`
    ("``what`` failed: reason"). Returns the checked result.

    ``result`` is either
      * a TensorRT return value: ``False`` (``parse``, ``set_input_shape``,
        ``set_tensor_address``, ``execute_async_v3``, ``set_timing_cache``) or ``None``
        (``build_serialized_network``, ``deserialize_cuda_engine``,
        ``create_execution_context``, ``create_timing_cache``) is a failure; or
      * a zero-argument callable, for calls that fail by raising (pycuda's driver calls raise
        ``pycuda.driver.Error``; TensorRT's bindings raise on bad arguments): it is called and
        any exception becomes ModelError. Its return value is passed through unchecked, since
        pycuda's void calls (copies, synchronize) return None.

    The errors TensorRT logged since the previous check are appended, then forgotten."""
    if callable(result):
        try:
            value = result()
        except ModelError:
            raise
        except Exception as exc:  # pycuda.driver.Error, RuntimeError / TypeError of bindings
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{what} failed: {reason}{_logged_errors()}") from exc
        _TRT_ERRORS.clear()
        return value
    if result is None or result is False:
        raise ModelError(f"{what} failed{_logged_errors()}")
    _TRT_ERRORS.clear()
    return result


def _logged_errors() -> str:
    said = "; ".join(_TRT_ERRORS)
    _TRT_ERRORS.clear()
    return f" (TensorRT: {said})" if said else ""


# --- lazy imports -----------------------------------------------------------------------------

def _gpu_stack() -> tuple[Any, Any]:
    """(tensorrt, pycuda.driver), initialised, or ModelError saying how to get them."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ModelError(NOT_INSTALLED) from None
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise ModelError(PYCUDA_MISSING) from None
    check_cuda(cuda.init, "initialising CUDA")
    return trt, cuda


def tensorrt_available() -> bool:
    """True when TensorRT and pycuda import and CUDA sees a GPU: what ``--backend auto`` asks
    before choosing TensorRT. Never raises."""
    try:
        _, cuda = _gpu_stack()
        return cuda.Device.count() > 0
    except Exception:  # ModelError, or a driver without a device, or a broken install
        return False


def trt_logger(trt: Any) -> Any:
    """The process's TensorRT logger (TensorRT wants one): forwards TensorRT's messages to
    Python logging (VERBOSE as DEBUG) and remembers errors for :func:`check_cuda`."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        severity = trt.ILogger.Severity
        levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
                  severity.WARNING: logging.WARNING, severity.INFO: logging.INFO,
                  severity.VERBOSE: logging.DEBUG}

        class ForwardingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, level: Any, message: str) -> None:
                python_level = levels.get(level, logging.INFO)
                if python_level >= logging.ERROR:
                    _TRT_ERRORS.append(message)
                if log.isEnabledFor(python_level):
                    log.log(python_level, "TensorRT: %s", message)

        _TRT_LOGGER = ForwardingLogger()
    return _TRT_LOGGER


@contextmanager
def _pushed(context: Any) -> Iterator[None]:
    """Make a pycuda context current on this thread for the body (segment() may be called from
    any worker thread; CUDA contexts are per thread)."""
    check_cuda(context.push, "activating the CUDA context")
    try:
        yield
    finally:
        context.pop()


@contextmanager
def _primary_context(cuda: Any, device: int) -> Iterator[Any]:
    """The device's primary context (the one the CUDA runtime, hence TensorRT, uses), retained
    and current for the body."""
    context = check_cuda(lambda: cuda.Device(device).retain_primary_context(),
                         f"opening CUDA device {device}")
    try:
        with _pushed(context):
            yield context
    finally:
        context.detach()


def gpu_name(device: int = 0) -> str:
    """Name and compute capability of CUDA device ``device``, e.g. ``NVIDIA H100 80GB HBM3
    sm_90``: the GPU part of an engine cache key."""
    _, cuda = _gpu_stack()
    gpu = check_cuda(lambda: cuda.Device(device), f"opening CUDA device {device}")
    major, minor = gpu.compute_capability()
    return f"{gpu.name()} sm_{major}{minor}"


# --- engine cache -----------------------------------------------------------------------------

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
    N x H x W x 3; output ``crack``, float32 N x H x W. The input gets one optimisation profile:
    min 1 x M x M x 3 (M: the model's size multiple), opt and max ``max_batch`` x S x S x 3 with
    S = :func:`network_side` (``tile`` + the 2 x 32 px mirror margin): full tiles, the shape
    TensorRT tunes its kernels for, and every smaller fitted tile or frame below it.
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

def engine_description(plan: Path) -> dict:
    """The JSON that :func:`build_engine` wrote beside ``plan``."""
    path = Path(plan).with_suffix(".json")
    if not path.is_file():
        raise ModelError(f"{path} is missing: a TensorRT plan needs the metadata that "
                         "build_engine writes beside it (crackscan build-engine)")
    try:
        description = json.loads(path.read_text())
        return {**description, "tile": int(description["tile"]),
                "input_side": int(description["input_side"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is not an engine description ({exc})") from None


class TensorRTSegmenter(BatchedSegmenter):
    """Segmenter on a TensorRT plan from :func:`build_engine`.

    Images of up to ``tile`` x ``tile`` px (the engine's tile). The host half is every
    backend's (``BatchedSegmenter``: mirror-pad the uint8 image, group same-shaped images into
    batches of up to ``max_batch``, crop each window out of its map); the engine does the rest
    on the GPU (the fused graph: cast, normalise, the network, crack probability). Larger
    frames raise ModelError: use this segmenter under
    ``inference.tiling.TiledSegmenter(segmenter, tile=segmenter.tile, fit=True,
    max_batch=segmenter.max_batch)``, which cuts frames into such tiles and stitches the maps.
    Every input shape is one the ONNX Runtime backend would run for the same image.

    Page-locked host and device buffers are allocated once for the largest batch of full
    tiles; each batch is one asynchronous host-to-device copy of its uint8 pixels, its input
    shape, ``execute_async_v3`` and one device-to-host copy of its probabilities on one CUDA
    stream, then a synchronize. The CUDA context is made current for each call, so any thread
    may call ``segment``, one at a time (not thread-safe: shared buffers). ``info`` comes from
    the JSON beside the plan; its sha256 is the ONNX model's, so runs label the model the same
    whichever backend ran it. ``close()`` frees the GPU memory.
    """

    def __init__(self, engine_path: Path, device: int = 0) -> None:
        trt, cuda = _gpu_stack()
        plan = Path(engine_path)
        if not plan.is_file():
            raise ModelError(f"TensorRT engine {plan} does not exist")
        self.description = engine_description(plan)
        self.info: ModelInfo = dataclasses.replace(
            model_info(plan, self.description["metadata"]),
            sha256=self.description.get("onnx_sha256") or file_sha256(plan))
        self.tile = self.description["tile"]
        self.backend = "tensorrt"
        self._cuda = cuda
        self._context = check_cuda(lambda: cuda.Device(device).retain_primary_context(),
                                   f"opening CUDA device {device}")
        try:
            with _pushed(self._context):
                self._load(trt, cuda, plan)
        except BaseException:
            self._context.detach()
            raise

    def _load(self, trt: Any, cuda: Any, plan: Path) -> None:
        runtime = check_cuda(trt.Runtime(trt_logger(trt)), "creating the TensorRT runtime")
        try:
            self._engine = check_cuda(runtime.deserialize_cuda_engine(plan.read_bytes()),
                                      f"loading TensorRT engine {plan}")
        except ModelError as exc:
            raise ModelError(f"{exc}; a plan runs only with the TensorRT version and on the GPU "
                             "model that built it: rebuild it (crackscan build-engine)") from None
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names
                  if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [PIXELS] or outputs != [CRACK]:
            raise ModelError(f"{plan} has inputs {inputs} and outputs {outputs}, not "
                             f"[{PIXELS!r}] and [{CRACK!r}]: it was built by another crackscan "
                             "version; rebuild it (crackscan build-engine)")
        largest = tuple(self._engine.get_tensor_profile_shape(PIXELS, 0)[2])
        self.max_batch, side = int(largest[0]), int(largest[1])
        if side != self.description["input_side"] or largest[2] != side:
            raise ModelError(f"{plan} takes inputs up to {largest[1]}x{largest[2]}, its "
                             f"description says {self.description['input_side']}: rebuild the "
                             "engine")
        self.side = side
        self._exec = check_cuda(self._engine.create_execution_context(),
                                "creating the execution context")
        pixels = self.max_batch * side * side * 3
        self._host_in = check_cuda(lambda: cuda.pagelocked_empty(pixels, np.uint8),
                                   "allocating page-locked input memory")
        self._host_out = check_cuda(lambda: cuda.pagelocked_empty(pixels // 3, np.float32),
                                    "allocating page-locked output memory")
        self._device_in = check_cuda(lambda: cuda.mem_alloc(self._host_in.nbytes),
                                     "allocating GPU input memory")
        self._device_out = check_cuda(lambda: cuda.mem_alloc(self._host_out.nbytes),
                                      "allocating GPU output memory")
        self._stream = check_cuda(cuda.Stream, "creating a CUDA stream")
        check_cuda(self._exec.set_tensor_address(PIXELS, int(self._device_in)),
                   "binding the input tensor")
        check_cuda(self._exec.set_tensor_address(CRACK, int(self._device_out)),
                   "binding the output tensor")
        log.info("TensorRT engine %s: %s, batch <= %d, tiles up to %d px (input %d), %s",
                 plan.name, self.description.get("precision"), self.max_batch, self.tile, side,
                 self.info.label)

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Crack probability maps (HxW float32), one per BGR uint8 image of at most ``tile`` px a
        side, in input order."""
        for image in images:
            if image.shape[0] > self.tile or image.shape[1] > self.tile:
                raise ModelError(f"a {image.shape[0]}x{image.shape[1]} image exceeds the engine's "
                                 f"{self.tile} px tile: wrap the segmenter in "
                                 f"inference.tiling.TiledSegmenter(..., tile={self.tile})")
        return super().segment(images)

    def run_batch(self, pixels: np.ndarray) -> np.ndarray:
        """Crack probability of a batch of padded images (N x H x W x 3 uint8, H and W at most
        the engine's input side), copied out of the reused host buffer."""
        cuda, stream = self._cuda, self._stream
        count, height, width = pixels.shape[:3]
        host_in = self._host_in[:pixels.size]
        host_out = self._host_out[:count * height * width]
        host_in[:] = pixels.ravel()
        with _pushed(self._context):
            check_cuda(lambda: cuda.memcpy_htod_async(self._device_in, host_in, stream),
                       "copying tiles to the GPU")
            check_cuda(self._exec.set_input_shape(PIXELS, pixels.shape),
                       f"setting the input shape to {'x'.join(map(str, pixels.shape))}")
            check_cuda(self._exec.execute_async_v3(stream.handle), "running the TensorRT engine")
            check_cuda(lambda: cuda.memcpy_dtoh_async(host_out, self._device_out, stream),
                       "copying crack probabilities from the GPU")
            check_cuda(stream.synchronize, "waiting for the CUDA stream")
        return host_out.reshape(count, height, width).copy()

    def close(self) -> None:
        """Free the engine and its GPU memory (the segmenter is unusable afterwards)."""
        if getattr(self, "_context", None) is None:
            return
        with _pushed(self._context):
            for name in ("_device_in", "_device_out"):
                if getattr(self, name, None) is not None:
                    getattr(self, name).free()
            for name in ("_host_in", "_host_out"):
                allocation = getattr(getattr(self, name, None), "base", None)
                if hasattr(allocation, "free"):  # pycuda's HostAllocation behind the array
                    allocation.free()
            self._exec = self._engine = self._stream = None
            self._device_in = self._device_out = self._host_in = self._host_out = None
        self._context.detach()
        self._context = None

    def __enter__(self) -> TensorRTSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
