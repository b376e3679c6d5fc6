"""``crackscan quantize``: an INT8 QDQ model of the session's tiny model, calibrated on its
images: per-channel symmetric weights, the metadata carried over, layers kept in FP32 on
request, TensorRT's rules checked, maps close to the FP32 model's through the real backend, and
the accuracy guard refusing a model that loses F1 on a split (nothing written)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper
from support import crackscan

from inference.backends import open_segmenter
from training.quantize import judge, tensorrt_checks


def _nodes(path, op):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def test_an_int8_model_for_the_cpu_and_one_for_tensorrt(tiny_model, tmp_path):
    cpu = tmp_path / "int8.onnx"
    summary = json.loads(crackscan("quantize", "--model", tiny_model.model, "--calibration",
                                   tiny_model.data, "--frames", 4, "--tile", 64, "--out", cpu,
                                   "--keep-fp32", "first", "--format", "json").stdout)
    assert summary["quantize_nodes"] > 10 and summary["tiles"] == 4
    model = onnx.load(str(cpu))
    meta = {p.key: p.value for p in model.metadata_props}
    fp32_meta = {p.key: p.value for p in onnx.load(str(tiny_model.model)).metadata_props}
    assert all(meta[k] == v for k, v in fp32_meta.items())  # name, classes, threshold, mean...
    assert meta["crackscan.quantized"].startswith("int8 qdq per-channel")
    # weights per output channel, symmetric
    initial = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = [producers.get(c.input[1]) for c in convs]
    quantized = [w for w in weights if w is not None and w.op_type == "DequantizeLinear"]
    assert len(quantized) == len(convs) - 1  # all but the first, kept FP32
    assert weights[0] is None or weights[0].op_type != "DequantizeLinear"
    for dq in quantized:
        weight, scale, zero = (initial[name] for name in dq.input[:3])
        assert weight.dtype == np.int8 and scale.size == weight.shape[0] and not zero.any()
    assert any("uint8" in p for p in summary["tensorrt_checks"])  # the CPU's U8S8 form
    # the logits' final upsampling stays FP32 (no Q/DQ at full resolution), and no Shape node
    # holds a DequantizeLinear's output (ONNX Runtime fuses one-consumer QDQ groups only)
    assert producers[model.graph.output[0].name].op_type == "Resize"
    assert summary["fp32_output"] == [producers[model.graph.output[0].name].name]
    assert summary["shapes_read_quantized"] > 0
    for shape in _nodes(cpu, "Shape"):
        assert getattr(producers.get(shape.input[0]), "op_type", None) != "DequantizeLinear"
    trt = tmp_path / "int8_trt.onnx"
    crackscan("quantize", "--model", tiny_model.model, "--calibration", tiny_model.data,
              "--frames", 4, "--tile", 64, "--out", trt, "--target", "tensorrt")
    assert tensorrt_checks(trt) == []
    # both run in the real backend and draw close to the FP32 maps
    image = np.full((64, 96, 3), 150, np.uint8)
    image[30:33, :] = 60
    maps = [open_segmenter(m, "onnxruntime").segment([image])[0]
            for m in (tiny_model.model, cpu, trt)]
    assert maps[1].shape == maps[0].shape
    assert np.abs(maps[1] - maps[0]).mean() < 0.05 and np.abs(maps[2] - maps[0]).mean() < 0.05


def test_the_guard_refuses_a_model_that_loses_f1(tiny_model, tmp_path):
    assert judge({"CFD": 0.93, "DeepCrack": 0.95}, {"CFD": 0.925, "DeepCrack": 0.93}, 0.01) \
        == ["DeepCrack: F1 0.9500 -> 0.9300 (loses 0.0200 > 0.01)"]
    assert judge({"CFD": 0.93}, {"CFD": 0.94}, 0.01) == []
    out = tmp_path / "int8.onnx"
    done = crackscan("quantize", "--model", tiny_model.model, "--calibration", tiny_model.data,
                     "--frames", 4, "--tile", 64, "--out", out, "--guard", tiny_model.data,
                     "--split", "train", "--format", "json", check=False)
    if done.returncode == 0:  # within 0.01 on the split: written, with both scores
        guard = json.loads(done.stdout)["guard"]
        assert guard["f1_fp32"]["cracks"] - guard["f1_int8"]["cracks"] <= 0.01
        assert out.is_file()
    else:
        assert done.returncode == 2 and "cracks: F1" in done.stderr and not out.exists()
    # a loss no model can stay within: refused, named, nothing written
    again = tmp_path / "again.onnx"
    refused = crackscan("quantize", "--model", tiny_model.model, "--calibration",
                        tiny_model.data, "--frames", 4, "--tile", 64, "--out", again,
                        "--guard", tiny_model.data, "--split", "train", "--max-loss", "-1",
                        check=False)
    assert refused.returncode == 2 and not again.exists()


def test_bad_quantize_arguments(tiny_model, tmp_path):
    for args, match in ((["--keep-fp32", "nonsense"], "nonsense"),
                        (["--calibration", tmp_path / "none.mp4"], ""),
                        (["--frames", 0], "--frames")):
        base = {"--calibration": tiny_model.data}
        flags = ["quantize", "--model", tiny_model.model, "--out", tmp_path / "x.onnx"]
        if "--calibration" not in args:
            flags += ["--calibration", base["--calibration"]]
        done = crackscan(*flags, *args, check=False)
        assert done.returncode == 2 and match in done.stderr and not (tmp_path / "x.onnx").exists()
    (tmp_path / "exists.onnx").write_bytes(b"")
    done = crackscan("quantize", "--model", tiny_model.model, "--calibration", tiny_model.data,
                     "--out", tmp_path / "exists.onnx", check=False)
    assert done.returncode == 2 and "exists" in done.stderr


def test_the_bundled_int8_model_is_the_bundled_model_quantized():
    import hashlib

    import onnxruntime as ort

    from inference.backends import bundled_model_path

    fp32, int8 = bundled_model_path("fp32"), bundled_model_path("int8")
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert meta["crackscan.fp32_sha256"] == hashlib.sha256(fp32.read_bytes()).hexdigest()
    assert _nodes(int8, "QuantizeLinear") and not _nodes(fp32, "QuantizeLinear")
    on_cpu = "CUDAExecutionProvider" not in ort.get_available_providers()
    assert bundled_model_path("auto", "onnxruntime") == (int8 if on_cpu else fp32)
    assert bundled_model_path("auto", "tensorrt") == fp32


def test_the_config_chooses_the_bundled_precision(tmp_path):
    from inference.backends import bundled_model_path, open_segmenter

    labels = {p: open_segmenter(bundled_model_path(p), "onnxruntime").info.label
              for p in ("fp32", "int8")}
    import onnxruntime as ort

    on_cpu = "CUDAExecutionProvider" not in ort.get_available_providers()
    config = tmp_path / "fp32.yaml"
    config.write_text("inference: {precision: fp32}\n")
    for extra, precision in (([], "int8" if on_cpu else "fp32"), (["--config", config], "fp32")):
        summary = json.loads(crackscan("run", "--source", "synthetic:0.3", "--db",
                                       f"sqlite:///{tmp_path / (precision + '.db')}",
                                       "--format", "json", *extra).stdout)
        assert summary["model"] == labels[precision]
