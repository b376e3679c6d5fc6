"""Export a training checkpoint to ONNX, with everything a backend needs in the model metadata.

Metadata keys (all strings; lists and dicts as JSON), read by ``inference.segmenter``:
    crackscan.model          architecture name, e.g. "mobilenet_aspp"
    crackscan.mean / .std    per-channel RGB normalisation after scaling pixels to 0..1
    crackscan.size_multiple  input height and width must be multiples of this
    crackscan.classes        class names of the output channels, e.g. ["crack"]
    crackscan.threshold      default probability threshold (chosen on the validation split)
    crackscan.input_color    "RGB": backends convert from OpenCV's BGR before normalising
    crackscan.trained_on     dataset folders (names) the weights were trained on
    crackscan.metrics        validation metrics of the exported checkpoint
The graph has input "image" (N, 3, H, W) float32 and output "logits" (N, C, H, W), with N, H, W
dynamic. The export is verified against PyTorch on the same input before it is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from crackscan.errors import UserError
from training.checkpoint import (
    CheckpointError,
    CheckpointNotFound,
    checkpoint_metadata,
    load_model,
)
from training.models import get_spec

log = logging.getLogger(__name__)

OPSET = 17


class ExportError(UserError, RuntimeError):
    """A checkpoint that cannot be exported (not a checkpoint, or an ONNX graph that does not
    reproduce PyTorch)."""


def export_checkpoint(checkpoint: Path, out: Path, threshold: float | None = None,
                      extra_metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``out`` (ONNX) from a ``best.pt`` / ``last.pt`` checkpoint; returns the metadata."""
    try:
        model, cfg, state = load_model(checkpoint)
    except CheckpointNotFound:
        raise  # a FileNotFoundError, as export has always raised for a missing file
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    spec = get_spec(cfg.model)

    metadata = {**checkpoint_metadata(state, cfg, threshold), **(extra_metadata or {})}

    out.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.randn(1, 3, 2 * spec.size_multiple * 4, 3 * spec.size_multiple * 4)
    torch.onnx.export(model, (sample,), str(out), dynamo=False, opset_version=OPSET,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                    "logits": {0: "batch", 2: "height", 3: "width"}})
    graph = onnx.load(str(out))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(out))
    verify(model, out, spec.size_multiple)
    return metadata


def verify(model: torch.nn.Module, onnx_path: Path, multiple: int, atol: float = 1e-3,
           rtol: float = 1e-2) -> float:
    """Max absolute logit difference of ONNX Runtime vs PyTorch on an input of another size than
    the export sample (so the dynamic axes are exercised); raises ExportError above ``atol`` +
    ``rtol`` x the largest logit. An export bug (a wrong op, a shape that does not follow the
    input) is off by whole units; deep plain-convolution models such as SegNet's VGG16 drift by
    about 1 % of their logit range on random inputs from float rounding alone (ONNX Runtime
    folds batch norm into the convolutions), which is no error."""
    x = torch.randn(2, 3, multiple * 5, multiple * 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    diff = float(np.abs(expected - got).max())
    limit = atol + rtol * float(np.abs(expected).max())
    if diff > limit:
        raise ExportError(f"ONNX output differs from PyTorch by {diff:.2e} (> {limit:.2e})")
    log.info("verified %s against PyTorch: max |diff| %.2e", onnx_path, diff)
    return diff
