"""``crackscan quantize``: an INT8 deploy model, explicitly quantized (QDQ), from an FP32 one.

ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``) on the bare
model (``image`` -> ``logits``; the pre- and post-processing that ``inference.fused`` wraps
around it at load time stay FP32, as they must):

- weights INT8, **per output channel**, symmetric; activations INT8: for the CPU (``target``
  "cpu") unsigned with a zero point and biases INT32, which ONNX Runtime runs as U8S8 integer
  kernels (VNNI on these CPUs); for TensorRT ("tensorrt") signed and symmetric (zero point 0)
  with FP32 biases, as its explicit quantization takes them. QuantizeLinear / DequantizeLinear
  pairs (QDQ) either way;
- activation ranges calibrated on real frames: tiles of up to ``tile`` px cut from a dataset
  folder's images, a video, an image folder or a recording (``calibration_tiles``), fed as the
  pipeline feeds the model (mirror-padded, normalised with the model's own constants);
- layers may stay FP32 (``keep``: ``first`` and ``last`` name the first and last convolution,
  or give node names); the final upsampling of the logits always does (``output_resizes``);
- after quantizing, Shape nodes read the quantized tensors (``shapes_read_quantized``), so that
  ONNX Runtime fuses every QDQ group into its integer operator;
- the FP32 model's metadata is carried over (name, classes, threshold, normalisation) plus
  ``crackscan.quantized`` and the FP32 file's hash.

The accuracy guard (:func:`judge`) scores both models on validation splits and refuses an INT8
model that loses more than ``max_loss`` F1 at 2 px on any of them, naming the split.
:func:`tensorrt_checks` lists what in a QDQ graph TensorRT's ONNX parser would refuse.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from crackscan.config import PipelineConfig
from crackscan.errors import UserError
from inference.segmenter import ModelInfo, preprocess
from training import data as ds

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")
MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (their ``axis``) came in 13


def _frames(source: str, config: PipelineConfig, limit: int):
    """Up to ``limit`` BGR frames of a dataset folder (its images/), or of any source."""
    folder = Path(source)
    if (folder / "images").is_dir():
        paths = sorted(p for p in (folder / "images").iterdir()
                       if p.suffix.lower() in ds.IMAGE_SUFFIXES)
        step = max(1, len(paths) // limit)
        for path in paths[::step][:limit]:
            yield ds.load_image(path)[:, :, ::-1]  # load_image gives RGB
        return
    from acquisition.sources import open_source

    count = 0
    with open_source(source, config) as frames:
        for item in frames:
            if item.image is not None:
                yield item.image
                count += 1
                if count >= limit:
                    return


def calibration_tiles(sources: list[str], info: ModelInfo, frames: int, tile: int = 512,
                      config: PipelineConfig | None = None, seed: int = 0) -> list[np.ndarray]:
    """One model input (1 x 3 x H x W float32) per frame, ``frames`` shared out between the
    sources: a random window of at most ``tile`` px, pre-processed as the pipeline does
    (:func:`inference.segmenter.preprocess`)."""
    rng = np.random.default_rng(seed)
    tiles = []
    for number, source in enumerate(sources):
        share = frames // len(sources) + (number < frames % len(sources))
        before = len(tiles)
        for image in tqdm(_frames(source, config or PipelineConfig(), share), total=share,
                          desc=f"calibration frames of {Path(source).name}", unit=" frames",
                          disable=None):
            h, w = image.shape[:2]
            y = int(rng.integers(0, max(1, h - tile + 1)))
            x = int(rng.integers(0, max(1, w - tile + 1)))
            window = np.ascontiguousarray(image[y:y + tile, x:x + tile])
            tiles.append(preprocess(window, info)[0])
        if len(tiles) == before and share:
            raise UserError(f"--calibration {source}: no frame to calibrate on")
    return tiles


def output_resizes(model: Any) -> list[str]:
    """The Resize nodes that produce a graph output (the final upsampling of the logits): left
    in FP32, as quantizing the model's output only to dequantize it again costs a full-resolution
    QuantizeLinear and DequantizeLinear and a step of precision, and saves nothing."""
    outputs = {value.name for value in model.graph.output}
    return [node.name for node in model.graph.node
            if node.op_type == "Resize" and outputs.intersection(node.output)]


def shapes_read_quantized(model: Any) -> int:
    """Point every Shape node that reads a DequantizeLinear's output at its quantized input (the
    same shape); returns how many. The exporter's dynamic resize sizes read the tensor being
    resized, and a DequantizeLinear with a second consumer keeps ONNX Runtime from fusing it into
    the integer operator after it (its QDQ node groups need a DequantizeLinear of one consumer),
    leaving float Transposes and conversions around each resize."""
    made = {output: node for node in model.graph.node for output in node.output}
    count = 0
    for node in model.graph.node:
        source = made.get(node.input[0]) if node.op_type == "Shape" else None
        if source is not None and source.op_type == "DequantizeLinear":
            node.input[0] = source.input[0]
            count += 1
    return count


def _keep_names(model: Any, keep: list[str]) -> list[str]:
    convolutions = [node.name for node in model.graph.node if node.op_type == "Conv"]
    names = {node.name for node in model.graph.node}
    out = []
    for item in keep:
        if item == "first":
            out.append(convolutions[0])
        elif item == "last":
            out.append(convolutions[-1])
        elif item in names:
            out.append(item)
        else:
            raise UserError(f"--keep-fp32 {item!r}: not 'first', 'last' or a node of the model "
                            f"(e.g. {convolutions[0]})")
    return out


TARGETS = ("cpu", "tensorrt")


def quantize_model(model: Path, out: Path, tiles: list[np.ndarray], keep: list[str] = (),
                   method: str = "minmax", calibration: str = "", target: str = "cpu"
                   ) -> dict[str, Any]:
    """Write the INT8 QDQ model of the FP32 ``model`` to ``out``; returns what was done.
    ``target`` "cpu": activations unsigned with a zero point and biases INT32, what ONNX
    Runtime's x86 integer kernels (U8S8) run fastest; "tensorrt": activations signed and
    symmetric, biases FP32, as TensorRT's explicit quantization takes them."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    tensorrt = target == "tensorrt"

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(tiles)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"image": item}

    fp32 = onnx.load(str(model))
    excluded = _keep_names(fp32, list(keep))
    unquantized = excluded + [name for name in output_resizes(fp32) if name not in excluded]
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        try:  # shape inference and graph clean-up, as ONNX Runtime advises before quantizing
            quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # the model as it is quantizes too, only less tidily
            log.warning("quantization pre-processing skipped: %s", exc)
            shutil.copy(model, prepared)
        written = Path(folder) / "int8.onnx"
        quantize_static(
            str(prepared), str(written), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax,
                              "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            nodes_to_exclude=unquantized,
            extra_options={"ActivationSymmetric": tensorrt, "WeightSymmetric": True,
                           "QuantizeBias": not tensorrt})
        int8 = onnx.load(str(written))
        rewired = shapes_read_quantized(int8)
    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()
    del int8.metadata_props[:]
    for prop in fp32.metadata_props:
        int8.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in (("crackscan.quantized", f"int8 qdq per-channel, for {target}"),
                       ("crackscan.fp32_sha256", digest),
                       ("crackscan.calibration", f"{method}, {len(tiles)} tiles of {calibration}"),
                       ("crackscan.fp32_layers", ",".join(excluded))):
        int8.metadata_props.add(key=key, value=value)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(int8, str(out))
    quantized = sum(1 for node in int8.graph.node if node.op_type == "QuantizeLinear")
    return {"model": str(model), "out": str(out), "method": method, "tiles": len(tiles),
            "fp32_layers": excluded, "fp32_output": output_resizes(fp32),
            "shapes_read_quantized": rewired, "quantize_nodes": quantized,
            "size_mb": round(out.stat().st_size / 1e6, 2),
            "fp32_size_mb": round(Path(model).stat().st_size / 1e6, 2),
            "target": target, "tensorrt_checks": tensorrt_checks(out) or "pass"}


def tensorrt_checks(path: Path) -> list[str]:
    """What TensorRT's explicit quantization would not take in a QDQ model, as its
    documentation states it (never checked against a TensorRT build here), one line per kind
    with a count and an example: an opset below 13; a zero point that is not 0 (it quantizes
    symmetrically) or not INT8 (unsigned activations, INT32 biases: TensorRT wants signed ones
    and FP32 biases, ``--target tensorrt``); a per-channel weight scale whose axis is not the
    output channel (0 for Conv weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    found: dict[str, list[str]] = {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        found[f"opset {opset} < {MIN_OPSET}"] = [model.graph.name]
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv_weights = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2:
            zero = initializers.get(node.input[2])
            if zero is None:
                problem = "zero point not a constant"
            elif zero.dtype != np.int8:
                problem = f"{zero.dtype} zero point, not int8 (quantize with --target tensorrt)"
            elif np.any(zero != 0):
                problem = "zero point not 0 (asymmetric)"
            else:
                problem = None
            if problem:
                found.setdefault(problem, []).append(node.name)
        scale = initializers.get(node.input[1])
        if node.op_type == "DequantizeLinear" and scale is not None and scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if any(out in conv_weights for out in node.output) and axis != 0:
                found.setdefault("per-channel axis of a Conv weight not 0", []).append(node.name)
    return [f"{len(nodes)} x {problem} (e.g. {nodes[0]})" for problem, nodes in found.items()]


def judge(fp32: dict[str, float], int8: dict[str, float], max_loss: float) -> list[str]:
    """The splits on which the INT8 model loses more than ``max_loss`` F1 (``fp32``, ``int8``:
    F1 by split), as lines naming them; empty when it may be used."""
    return [f"{name}: F1 {fp32[name]:.4f} -> {int8.get(name, float('nan')):.4f} (loses "
            f"{fp32[name] - int8.get(name, -1.0):.4f} > {max_loss:g})"
            for name in fp32 if fp32[name] - int8.get(name, -1.0) > max_loss]


def guard_scores(model: Path, folders: list[Path], split: str, tolerance: float = 2.0
                 ) -> dict[str, float]:
    """F1 at ``tolerance`` px of one model, by validation folder, at its own threshold, as
    ``crackscan eval`` scores it (the pipeline's tiles)."""
    from inference.backends import open_segmenter
    from training.evaluate import evaluate_model

    defaults = PipelineConfig().inference
    segmenter = open_segmenter(model, "onnxruntime", tile=defaults.tile,
                               tile_overlap=defaults.tile_overlap, max_batch=defaults.max_batch)
    summary = evaluate_model(segmenter, folders, split, tolerance)
    return {name: s["f1"] for name, s in summary["sets"].items()}
