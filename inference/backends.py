"""The segmenter factory: which backend runs a model file, and the bundled default model.

Backends implement ``inference.segmenter.Segmenter`` and import only that base; this module is the
one place that imports them all. The PyTorch backend belongs to ``training`` (it needs the
architectures) and is registered by the application (``register_backend("torch", ...)``), so
``inference`` never imports ``training``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from inference.onnxruntime_backend import OnnxRuntimeSegmenter
from inference.segmenter import ModelError, Segmenter

log = logging.getLogger(__name__)

BUNDLED_MODEL = "crackscan_mobilenet_aspp.onnx"

# Backends registered from above this layer: name -> opener(path, max_batch=...) -> Segmenter.
_REGISTERED: dict[str, Callable[..., Segmenter]] = {}


def register_backend(name: str, opener: Callable[..., Segmenter]) -> None:
    """Make ``--backend NAME`` available; the application registers ``torch`` at start-up."""
    _REGISTERED[name] = opener


BUNDLED_INT8 = "crackscan_mobilenet_aspp_int8.onnx"  # its INT8 quantization (crackscan quantize)
PRECISIONS = ("auto", "fp32", "int8")


def bundled_model_path(precision: str = "fp32", backend: str = "auto") -> Path:
    """The default model shipped inside the ``inference`` package: FP32, or its INT8 (QDQ)
    quantization for ONNX Runtime's CPU kernels (``inference.precision``). ``auto``: INT8 where
    ``backend`` runs on the CPU (ONNX Runtime without a GPU: measured 1.7x the frames at the
    same F1, docs/results/2026-12-06-int8.md), FP32 where a GPU runs it (TensorRT chooses its
    own precision)."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; expected one of "
                         f"{', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "int8" if _runs_on_cpu(backend) else "fp32"
    name = BUNDLED_MODEL if precision == "fp32" else BUNDLED_INT8
    return Path(str(resources.files("inference") / "models" / name))


def _runs_on_cpu(backend: str) -> bool:
    """Whether ``backend`` would run an ONNX model on the CPU here."""
    if backend in ("tensorrt", "torch"):
        return False
    import onnxruntime as ort

    from inference.tensorrt_runtime import tensorrt_available

    if backend == "auto" and tensorrt_available():
        return False
    return "CUDAExecutionProvider" not in ort.get_available_providers()


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
    from inference.tensorrt_build import cached_engine
    from inference.tensorrt_runtime import TensorRTSegmenter, tensorrt_available
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
        if "torch" not in _REGISTERED:
            raise ModelError(f"{path} is a training checkpoint; the PyTorch backend needs the "
                             "train extra (pip install 'crackscan[train]')")
        segmenter: Segmenter = _REGISTERED["torch"](path, max_batch=max_batch)
        if tile:
            segmenter = TiledSegmenter(segmenter, tile=tile, overlap=tile_overlap,
                                       max_batch=max_batch, fit=True)
    elif kind == "tensorrt" or backend == "tensorrt" or (
            backend == "auto" and tensorrt_available()):
        if backend == "onnxruntime":
            raise ModelError(f"{path} is a TensorRT plan; ONNX Runtime runs the .onnx model")
        plan = path if kind == "tensorrt" else cached_engine(
            path, engine_cache or ENGINE_CACHE, max_batch=max_batch, tile=tile or 512)
        engine = TensorRTSegmenter(plan)
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
