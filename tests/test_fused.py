"""The fused graph (``inference.fused``): the model with its pre- and post-processing inside,
which ONNX Runtime runs here and TensorRT builds its engines from. Held to the numpy reference
(``preprocess`` + the plain exported model + ``segmentation_map``) on the bundled model and on
small hand-built ONNX models whose colour order and classes the test chooses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import BINARY_MODEL

from inference.backends import bundled_model_path
from inference.fused import CRACK, PIXELS, fuse_io
from inference.onnxruntime_backend import OnnxRuntimeSegmenter, load_onnx_model
from inference.segmenter import ModelError, preprocess, segmentation_map, split_map


def plain_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference_maps(path: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """The numpy reference: pre-processing and read-out on the host around the plain model."""
    session = plain_session(path)
    info = load_onnx_model(path)[1]
    maps = []
    for image in images:
        x, (top, left, h, w) = preprocess(image, info)
        logits = session.run(None, {"image": x})[0][0, :, top:top + h, left:left + w]
        maps.append(segmentation_map(logits, info.classes))
    return maps


def pointwise_model(path: Path, classes: list[str], input_color: str) -> Path:
    """A real ONNX model shaped like an export (``image`` -> ``logits``): a 1x1 convolution
    whose weights differ per input channel, so colour order and normalisation show in its
    output, with the crackscan metadata of ``classes`` and ``input_color``."""
    rng = np.random.default_rng(len(classes))
    weight = rng.normal(0, 1.5, (len(classes), 3, 1, 1)).astype(np.float32)
    bias = rng.normal(0, 0.5, len(classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight", "bias"], ["logits"])], "pointwise",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", len(classes), "h", "w"])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = {"crackscan.model": "pointwise", "crackscan.mean": "[0.3, 0.5, 0.7]",
                "crackscan.std": "[0.2, 0.3, 0.4]", "crackscan.size_multiple": "32",
                "crackscan.classes": json.dumps(classes), "crackscan.threshold": "0.5",
                "crackscan.input_color": input_color}
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def images_of_three_kinds() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    colour = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (64, 40), dtype=np.uint8)  # a mono camera's frame
    return [colour, grey, colour[:, ::-1].copy()]


def test_bundled_model_fused_matches_the_numpy_reference() -> None:
    path = bundled_model_path()
    rng = np.random.default_rng(5)
    images = []
    for shape in ((96, 160, 3), (70, 50, 3)):
        wall = cv2.GaussianBlur(rng.integers(60, 200, shape, dtype=np.uint8), (5, 5), 0)
        cv2.line(wall, (5, 10), (shape[1] - 5, shape[0] - 12), (25, 25, 25), 2)  # a crack
        images.append(wall)
    got = OnnxRuntimeSegmenter(path, threads=1).segment(images)
    expected = reference_maps(path, images)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == np.float32
        assert float(e.max()) > 0.5 > float(e.min())  # the maps span the threshold
        np.testing.assert_allclose(g, e, atol=1e-5)  # measured 1.8e-7 on a 352x360 tile


@pytest.mark.parametrize("classes, input_color", [
    (["crack"], "RGB"), (["crack"], "BGR"),
    (["background", "crack", "seam", "water_stain", "scratch"], "RGB")])
def test_fused_graph_matches_the_reference_for_each_colour_order_and_class_list(
        tmp_path: Path, classes: list[str], input_color: str) -> None:
    path = pointwise_model(tmp_path / "m.onnx", classes, input_color)
    images = images_of_three_kinds()
    got = OnnxRuntimeSegmenter(path, threads=1, max_batch=2).segment(images)
    for g, e in zip(got, reference_maps(path, images), strict=True):
        np.testing.assert_allclose(g, e, atol=1e-6)
    # the colour order is really applied: the other order gives other maps
    other = pointwise_model(tmp_path / "other.onnx", classes,
                            "BGR" if input_color == "RGB" else "RGB")
    swapped = reference_maps(other, images)
    assert np.abs(got[0] - swapped[0]).max() > 0.05


def test_a_model_with_lining_classes_maps_crack_probability_and_class(tmp_path: Path) -> None:
    """A model with classes besides background and crack gives two planes: the crack
    probability and each pixel's argmax class, which is what the lining features come from."""
    classes = ["background", "crack", "joint", "stain"]
    path = pointwise_model(tmp_path / "m.onnx", classes, "RGB")
    model, info = load_onnx_model(path)
    (crack,) = fuse_io(model, info).graph.output
    assert [d.dim_param or d.dim_value for d in crack.type.tensor_type.shape.dim] == \
        ["batch", 2, "height", "width"]
    images = images_of_three_kinds()
    got = OnnxRuntimeSegmenter(path, threads=1).segment(images)
    for image, g in zip(images, got, strict=True):
        prob, class_map = split_map(g)
        assert g.shape == (2,) + image.shape[:2] and class_map.dtype == np.uint8
        assert set(np.unique(class_map)) <= set(range(len(classes)))
        assert len(np.unique(class_map)) > 1  # the hand-built model's classes all compete
        x, (top, left, h, w) = preprocess(image, info)
        logits = plain_session(path).run(None, {"image": x})[0][0, :, top:top + h, left:left + w]
        np.testing.assert_array_equal(class_map, logits.argmax(axis=0))
        np.testing.assert_allclose(prob, segmentation_map(logits, info.classes)[0], atol=1e-6)
    background_crack = pointwise_model(tmp_path / "b.onnx", ["background", "crack"], "RGB")
    assert OnnxRuntimeSegmenter(background_crack, threads=1).segment(images)[0].ndim == 2


@pytest.mark.parametrize("path, planes", [(BINARY_MODEL, []), (bundled_model_path(), [2])],
                         ids=["binary", "bundled lining model"])
def test_fused_graph_io_and_metadata(path, planes) -> None:
    model, info = load_onnx_model(path)
    fused = fuse_io(model, info)
    (pixels,), (crack,) = fused.graph.input, fused.graph.output
    assert pixels.name == PIXELS and pixels.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim] == \
        ["batch", "height", "width", 3]
    assert crack.name == CRACK and crack.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in crack.type.tensor_type.shape.dim] == \
        ["batch", *planes, "height", "width"]  # a lining model's map: crack probability, class
    assert {p.key: p.value for p in fused.metadata_props} == info.metadata
    assert model.graph.input[0].name == "image"  # the loaded model is not changed
    onnx.checker.check_model(fused)


def test_a_worker_loads_the_model_without_importing_the_onnx_package() -> None:
    """The onnx package costs a worker 1.3-1.5 s of start-up (inference.fused.onnx_protos); the
    fused graph is built with its protobuf classes alone, and the package imported afterwards
    still works on that graph."""
    script = textwrap.dedent("""
        import sys
        from inference.backends import bundled_model_path
        from inference.onnxruntime_backend import OnnxRuntimeSegmenter, load_onnx_model
        from inference.fused import fuse_io
        segmenter = OnnxRuntimeSegmenter(bundled_model_path(), threads=1)
        assert "onnx" not in sys.modules and "ml_dtypes" not in sys.modules, "onnx imported"
        model, info = load_onnx_model(bundled_model_path())
        fused = fuse_io(model, info).SerializeToString()
        import onnx
        onnx.checker.check_model(onnx.load_from_string(fused))
        assert onnx.load(str(bundled_model_path())).graph.input[0].name == "image"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_fuse_io_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    path = pointwise_model(tmp_path / "m.onnx", ["background", "seam"], "RGB")
    model, info = load_onnx_model(path)
    with pytest.raises(ModelError, match="no 'crack' channel"):
        fuse_io(model, info)
    model.graph.output[0].name = "scores"
    with pytest.raises(ModelError, match="one output 'logits'"):
        fuse_io(model, info)
