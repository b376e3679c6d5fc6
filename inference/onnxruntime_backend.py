"""ONNX Runtime backend: the CPU path (and CUDA where onnxruntime's CUDA provider is installed).

It runs the model's fused graph (``inference.fused``): uint8 pixels in, crack probability out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from inference.segmenter import BatchedSegmenter, ModelError, ModelInfo, check_batch, model_info


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
