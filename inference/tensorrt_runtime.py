"""TensorRT runtime: runs a compiled engine ("plan", from ``inference.tensorrt_build``) behind
the ``Segmenter`` interface, plus the GPU helpers the builder shares (``check_cuda``, the lazy
import of TensorRT and pycuda, the CUDA context).

:class:`TensorRTSegmenter` runs a plan: buffers allocated once for the largest batch, one CUDA
stream, asynchronous copies, I/O bound by tensor name (TensorRT 10's ``execute_async_v3``). The
host only mirror-pads uint8 images; the GPU casts, normalises and reads out the crack
probability, so a tile crosses PCIe as a quarter of its float32 bytes and comes back as one
channel. Beside ``X.plan`` the builder writes ``X.json`` with the ONNX model's crackscan
metadata (:func:`engine_description`), so an engine describes itself as the ONNX model does.

TensorRT and pycuda come from NVIDIA's package index and need an NVIDIA GPU. They are imported
inside the functions that need them, so this module imports (and :func:`check_cuda` runs)
without them.

Versions: written for TensorRT 10 (name-based I/O, ``execute_async_v3``). TensorRT 11 removed the
precision builder flags and implicit INT8 calibration (strong typing only); see
``inference.tensorrt_build``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from inference.fused import CRACK, PIXELS
from inference.segmenter import (
    BatchedSegmenter,
    ModelError,
    ModelInfo,
    file_sha256,
    map_planes,
    model_info,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

NOT_INSTALLED = ("TensorRT is not installed: it comes from NVIDIA's package index (pip install "
                 "tensorrt --extra-index-url https://pypi.nvidia.com) on a machine with an NVIDIA "
                 "GPU; use --backend onnxruntime")
PYCUDA_MISSING = ("pycuda is not installed (pip install pycuda; it needs the CUDA toolkit), which "
                  "the TensorRT backend uses for GPU memory and streams; use --backend onnxruntime")


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
        self._planes = map_planes(self.info.classes)  # 2: crack probability and class index
        self._host_in = check_cuda(lambda: cuda.pagelocked_empty(pixels, np.uint8),
                                   "allocating page-locked input memory")
        self._host_out = check_cuda(lambda: cuda.pagelocked_empty(pixels // 3 * self._planes,
                                                                  np.float32),
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
        """Maps (see ``Segmenter.segment``), one per BGR uint8 image of at most ``tile`` px a
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
        host_out = self._host_out[:count * self._planes * height * width]
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
        shape = (count, height, width) if self._planes == 1 else (count, self._planes, height,
                                                                  width)
        return host_out.reshape(shape).copy()

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
