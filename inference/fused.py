"""The model with its pre- and post-processing inside: uint8 pixels in, crack probability out.

An exported model (``training.export``) takes ``image``, N x 3 x H x W float32 normalised with
the model's own mean and std (in its colour order), and gives ``logits``, N x C x H x W.
:func:`fuse_io` wraps it into the graph every backend runs:

    pixels   N x H x W x 3 uint8, BGR as cameras and OpenCV give it, already mirror-padded by
             the host (:func:`inference.segmenter.pad_pixels`)
      -> Cast to float32 -> Transpose to N x 3 x H x W -> (RGB models: planes reversed)
      -> / 255 -> - mean -> / std                         (the model's metadata)
      -> the model
      -> sigmoid (one channel) or softmax over the channels, read at the ``crack`` channel
         (as 1 / sum_k exp(logit_k - logit_crack), see ``fuse_io``)
    crack    N x H x W float32, 0..1
             (a model with lining classes: N x 2 x H x W, the crack probability and the argmax
             class index as float, ``inference.segmenter.split_map``)

Why in the graph. On the host this work is single-threaded numpy: 4.1-4.4 ms per 416 x 448
tile for normalisation and 0.5 ms for the sigmoid on this project's 2-core CPU machine. At the
GPU target of 1,000 tiles a second that is four or more host cores doing arithmetic the GPU does
in microseconds. In the graph it runs on the device under TensorRT (whose builder may fuse it
with the first and last layers; not yet seen on a GPU) and on ONNX Runtime's thread pool on a
CPU, and the host copies uint8 to the GPU, a quarter of the float32 bytes, and gets back one
channel, not C.

The arithmetic is the numpy reference's (:func:`inference.segmenter.preprocess` and
``crack_probability``) op for op, so the maps agree with it to float rounding.

The graph is edited with ONNX's generated protobuf classes alone (:func:`onnx_protos`), not the
``onnx`` package, whose import costs every worker 1.3-1.5 s of start-up (below).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from inference.segmenter import ModelError, ModelInfo, crack_channel, map_planes

PIXELS = "pixels"  # the fused graph's input: N x H x W x 3 uint8 BGR
CRACK = "crack"  # its output: N x H x W float32 crack probability
MODEL_INPUT = "image"  # what training.export names the model's input and output
MODEL_OUTPUT = "logits"

_PROTOS: ModuleType | None = None


def onnx_protos() -> ModuleType:
    """ONNX's protobuf message classes (``onnx.onnx_ml_pb2``: ModelProto, NodeProto, ...).

    ``import onnx`` imports ml_dtypes, whose extension module alone took 1.3 s to import on
    this project's 2-core machine (``python -X importtime``); every inference worker, ``eval``
    and ``bench`` would pay that at start, and a live run drops the frames that arrive
    meanwhile. The generated protobuf module needs only protobuf and loads in 0.05 s, so it is
    loaded from the installed package's folder without running the package's ``__init__``.
    Where ``onnx`` is imported already, or its layout differs, the package's own module is
    used. Registering the same .proto file twice in protobuf's pool is allowed (the package
    imported afterwards works; ``tests/test_fused.py`` does both)."""
    global _PROTOS
    if "onnx" in sys.modules:
        return importlib.import_module("onnx.onnx_ml_pb2")
    if _PROTOS is None:
        spec = importlib.util.find_spec("onnx")
        path = Path(spec.origin).parent / "onnx_ml_pb2.py" if spec and spec.origin else None
        if path is None or not path.is_file():
            return importlib.import_module("onnx.onnx_ml_pb2")
        module_spec = importlib.util.spec_from_file_location("crackscan_onnx_ml_pb2", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _PROTOS = module
    return _PROTOS


def parse_model(data: bytes):
    """An ``onnx.ModelProto`` from serialized bytes (DecodeError for anything else)."""
    model = onnx_protos().ModelProto()
    model.ParseFromString(data)
    return model


def _tensor(name: str, values: np.ndarray):
    pb = onnx_protos()
    array = np.asarray(values)  # not ascontiguousarray: it makes a 0-d array 1-d
    data_type = {np.dtype(np.float32): pb.TensorProto.FLOAT,
                 np.dtype(np.int64): pb.TensorProto.INT64}[array.dtype]
    return pb.TensorProto(name=name, dims=array.shape, data_type=data_type,
                          raw_data=array.tobytes())


def _node(op_type: str, inputs: list[str], outputs: list[str], **attributes: int | list[int]):
    pb = onnx_protos()
    node = pb.NodeProto(op_type=op_type, input=inputs, output=outputs,
                        name=f"crackscan_io/{outputs[0].rsplit('/', 1)[-1]}")
    for key, value in attributes.items():
        if isinstance(value, list):
            node.attribute.append(pb.AttributeProto(name=key, type=pb.AttributeProto.INTS,
                                                    ints=value))
        else:
            node.attribute.append(pb.AttributeProto(name=key, type=pb.AttributeProto.INT,
                                                    i=value))
    return node


def _value_info(name: str, elem_type: int, dims: list[str | int]):
    pb = onnx_protos()
    shape = pb.TensorShapeProto(dim=[
        pb.TensorShapeProto.Dimension(dim_value=d) if isinstance(d, int)
        else pb.TensorShapeProto.Dimension(dim_param=d) for d in dims])
    return pb.ValueInfoProto(name=name, type=pb.TypeProto(
        tensor_type=pb.TypeProto.Tensor(elem_type=elem_type, shape=shape)))


def fuse_io(model, info: ModelInfo):
    """``model`` (an exported crackscan model, ``onnx.ModelProto``) with pre- and
    post-processing in the graph; see the module docstring for the contract. ``info`` is the
    model's metadata (mean, std, colour order, classes). The result keeps the model's metadata
    and opset; ``model`` is not changed. Raises ModelError for a graph that is not shaped like
    an export (one input ``image``, one output ``logits``) or classes without ``crack``."""
    pb = onnx_protos()
    graph = model.graph
    initialized = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initialized]
    outputs = [o.name for o in graph.output]
    if inputs != [MODEL_INPUT] or outputs != [MODEL_OUTPUT]:
        raise ModelError(f"model inputs {inputs} and outputs {outputs}: a crackscan export has "
                         f"one input {MODEL_INPUT!r} and one output {MODEL_OUTPUT!r}")
    channel = crack_channel(info.classes)

    def name(part: str) -> str:
        return "crackscan_io/" + part

    shape = (1, 3, 1, 1)
    initializers = [
        _tensor(name("255"), np.asarray(255.0, np.float32)),
        _tensor(name("mean"), np.asarray(info.mean, np.float32).reshape(shape)),
        _tensor(name("std"), np.asarray(info.std, np.float32).reshape(shape)),
        _tensor(name("channel"), np.asarray(channel, np.int64)),
    ]
    # Cast first: TensorRT takes uint8 only as a network input to be cast to float
    pre = [_node("Cast", [PIXELS], [name("float")], to=pb.TensorProto.FLOAT),
           _node("Transpose", [name("float")], [name("nchw")], perm=[0, 3, 1, 2])]
    planes = name("nchw")
    if info.input_color == "RGB":  # cameras give BGR: reverse the three planes
        initializers.append(_tensor(name("bgr_to_rgb"), np.asarray([2, 1, 0], np.int64)))
        pre.append(_node("Gather", [planes, name("bgr_to_rgb")], [name("rgb")], axis=1))
        planes = name("rgb")
    pre += [_node("Div", [planes, name("255")], [name("unit")]),
            _node("Sub", [name("unit"), name("mean")], [name("centred")]),
            _node("Div", [name("centred"), name("std")], [MODEL_INPUT])]
    planes = map_planes(info.classes)
    if len(info.classes) == 1:
        post = [_node("Sigmoid", [MODEL_OUTPUT], [name("probability")]),
                _node("Gather", [name("probability"), name("channel")], [CRACK], axis=1)]
    else:
        # softmax read at the crack channel, as 1 / sum_k exp(l_k - l_crack): the same value
        # (an overflowing exp gives 1 / inf = 0, the limit) at a fraction of the cost of a
        # Softmax over axis 1, which ONNX Runtime's CPU provider runs by transposing (53 ms
        # against 4 ms for 9 x 448 x 672 logits, 2026-12-06)
        crack = name("crack1") if planes == 2 else name("crack_nchw")
        post = [_node("Gather", [MODEL_OUTPUT, name("channels")], [name("crack_logit")], axis=1),
                _node("Sub", [MODEL_OUTPUT, name("crack_logit")], [name("relative")]),
                _node("Exp", [name("relative")], [name("odds")]),
                _node("ReduceSum", [name("odds"), name("channels_axis")], [name("total")],
                      keepdims=1),
                _node("Reciprocal", [name("total")], [crack])]
        initializers += [_tensor(name("channels"), np.asarray([channel], np.int64)),
                         _tensor(name("channels_axis"), np.asarray([1], np.int64))]
        if planes == 1:
            post.append(_node("Squeeze", [crack, name("channels_axis")], [CRACK]))
        else:  # crack probability and the argmax class, N x 2 x H x W
            post += [_node("ArgMax", [MODEL_OUTPUT], [name("class")], axis=1, keepdims=1),
                     _node("Cast", [name("class")], [name("class_float")],
                           to=pb.TensorProto.FLOAT),
                     _node("Concat", [crack, name("class_float")], [CRACK], axis=1)]

    fused = pb.ModelProto()
    fused.CopyFrom(model)
    g = fused.graph
    nodes = pre + list(g.node) + post
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(initializers)
    del g.input[:]
    g.input.append(_value_info(PIXELS, pb.TensorProto.UINT8, ["batch", "height", "width", 3]))
    del g.output[:]
    g.output.append(_value_info(CRACK, pb.TensorProto.FLOAT,
                                ["batch", "height", "width"] if planes == 1
                                else ["batch", planes, "height", "width"]))
    return fused
