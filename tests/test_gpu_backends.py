"""The GPU backends: PyTorch (``training.torch_backend``) and TensorRT
(``inference.tensorrt_runtime``, ``inference.tensorrt_build``) against ONNX Runtime, on a tiny
random-init model exported once per module (nothing is trained: parity does not need good weights).

The ``gpu`` marker is registered in pyproject.toml ([tool.pytest.ini_options] markers). Tests
marked with it skip, with the reason, where there is no CUDA device (torch) or no TensorRT with
a GPU; everything else runs on the CPU, with one torch thread and inputs of a few dozen pixels.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.onnxruntime_backend import OnnxRuntimeSegmenter
from inference.segmenter import ModelError, ModelInfo, pad_pixels
from inference.tensorrt_build import (
    CalibrationBatches,
    build_engine,
    engine_cache_key,
    engine_path,
    network_side,
    profile_shapes,
)
from inference.tensorrt_runtime import TensorRTSegmenter, check_cuda, tensorrt_available
from inference.tiling import TiledSegmenter, TileGrid, split
from training.config import TrainConfig
from training.export import export_checkpoint
from training.models import build_model
from training.torch_backend import TorchSegmenter

THRESHOLD = 0.37  # a "validated" threshold stored in the checkpoint, unlike the recipe's 0.5
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not tensorrt_available(),
                                    reason="needs TensorRT, pycuda and an NVIDIA GPU")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclasses.dataclass(frozen=True)
class Tiny:
    checkpoint: Path
    onnx: Path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    """A random-init MobileNet-ASPP (width 0.5), saved as training's save_checkpoint does (with
    a validation threshold) and exported with training.export.

    Random-init maps are constant to ~1e-5 (0.4859 everywhere), which would let any comparison
    pass; so the 1x1 head is rescaled to give logits of mean 0 and std 2 on noise, and the maps
    span 0..1 (std ~0.25)."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = TrainConfig(model="mobilenet_aspp", model_params={"width_mult": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params).eval()
    with torch.no_grad():
        features = model.decoder(model.encoder(torch.randn(2, 3, 96, 128)))
        spread = torch.nn.functional.conv2d(features, model.head.weight)
        scale = 2.0 / float(spread.std())
        model.head.weight.mul_(scale)
        model.head.bias.fill_(-scale * float(spread.mean()))
    checkpoint = root / "best.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 3,
                "config": json.loads(cfg.model_dump_json()),
                "metrics": {"val": {"default_threshold": THRESHOLD, "ods": 0.25}}}, checkpoint)
    onnx = root / "tiny.onnx"
    export_checkpoint(checkpoint, onnx)
    return Tiny(checkpoint, onnx)


def random_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def median_masks(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """Worst IoU of masks thresholded at each reference map's median: on a random-init model
    the probabilities cluster, so a fixed threshold would compare noise; the median gives
    half-full masks whose overlap tells whether the two backends rank pixels alike."""
    ious = []
    for ref, got in zip(reference, other, strict=True):
        t = float(np.median(ref))
        ious.append(mask_iou(ref > t, got > t))
    return min(ious)


# --- PyTorch on the CPU: the parity reference -------------------------------------------------

def test_torch_cpu_matches_onnxruntime(tiny):
    images = random_images(3, 96, 128)
    torch_seg = TorchSegmenter(tiny.checkpoint, device="cpu")
    ort_seg = OnnxRuntimeSegmenter(tiny.onnx, threads=1)
    assert torch_seg.backend == "torch-cpu" and not torch_seg.fp16
    got, expected = torch_seg.segment(images), ort_seg.segment(images)
    for g, e, image in zip(got, expected, images, strict=True):
        assert g.shape == e.shape == image.shape[:2] and g.dtype == np.float32
    assert min(float(m.std()) for m in expected) > 0.1  # maps that vary: a real comparison
    diff = max_diff(got, expected)
    assert diff < 1e-4, diff  # measured 2e-6 here
    # the same model description as the export writes, with the checkpoint's own hash
    assert torch_seg.info.threshold == ort_seg.info.threshold == THRESHOLD
    assert torch_seg.info.classes == ort_seg.info.classes == ("crack",)
    assert torch_seg.info.metadata == ort_seg.info.metadata
    assert torch_seg.info.path == tiny.checkpoint
    assert torch_seg.info.sha256 != ort_seg.info.sha256


def test_torch_batches_mixed_sizes_in_input_order(tiny):
    seg = TorchSegmenter(tiny.checkpoint, device="cpu", max_batch=2)
    images = random_images(3, 64, 64, seed=1) + random_images(1, 40, 72, seed=2)
    together = seg.segment(images)
    one_by_one = [seg.segment([image])[0] for image in images]
    assert [m.shape for m in together] == [(64, 64)] * 3 + [(40, 72)]
    for a, b in zip(together, one_by_one, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_torch_rejects_bad_inputs(tiny, tmp_path):
    with pytest.raises(ModelError, match="fp16 needs a CUDA"):
        TorchSegmenter(tiny.checkpoint, device="cpu", fp16=True)
    with pytest.raises(ModelError, match="does not exist"):
        TorchSegmenter(tmp_path / "missing.pt", device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a crackscan training checkpoint"):
        TorchSegmenter(junk, device="cpu")
    # CUDA graphs are a CUDA feature: on the CPU the flag is ignored
    assert not TorchSegmenter(tiny.checkpoint, device="cpu", cuda_graphs=True).cuda_graphs


# --- engine cache keys --------------------------------------------------------------------------

def test_engine_cache_key_changes_with_what_an_engine_depends_on(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model one")
    base = dict(gpu_name="NVIDIA H100 sm_90", trt_version="10.9.0", precision="fp16",
                max_batch=8, tile=512)
    key = engine_cache_key(model, **base)
    assert key == engine_cache_key(model, **base)  # stable
    assert len(key) == 64 and int(key, 16) >= 0
    for change in (dict(gpu_name="NVIDIA L4 sm_89"), dict(trt_version="10.10.0"),
                   dict(precision="int8"), dict(precision="fp32"), dict(max_batch=4),
                   dict(tile=256)):
        assert engine_cache_key(model, **{**base, **change}) != key, change
    same_bytes = tmp_path / "copy.onnx"
    same_bytes.write_bytes(b"model one")
    assert engine_cache_key(same_bytes, **base) == key  # the bytes count, not the name
    model.write_bytes(b"model two")
    assert engine_cache_key(model, **base) != key
    assert engine_path(tmp_path / "cache", key) == tmp_path / "cache" / f"{key}.plan"


# --- INT8 calibration data ----------------------------------------------------------------------

def tiny_info() -> ModelInfo:
    return ModelInfo(path=Path("x.onnx"), name="m", sha256="0" * 64, mean=(0.4, 0.5, 0.6),
                     std=(0.2, 0.25, 0.3), size_multiple=32, classes=("crack",), threshold=0.5,
                     input_color="RGB", metadata={})


def test_calibration_batches_pad_centre_crops_like_inference(tmp_path):
    tile, info = 64, tiny_info()
    rng = np.random.default_rng(3)
    large = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    exact = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, image in (("a_large.png", large), ("b_small.png", small), ("c_exact.png", exact)):
        cv2.imwrite(str(tmp_path / name), image)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "masks").mkdir()  # subfolders (a dataset's masks) are not calibrated on
    cv2.imwrite(str(tmp_path / "masks" / "m.png"), large)

    batches = CalibrationBatches(tmp_path, info, tile=tile, batch_size=2)
    side = network_side(tile, info.size_multiple)
    assert side == 128 and batches.shape == (2, 128, 128, 3)
    assert [p.name for p in batches.paths] == ["a_large.png", "b_small.png", "c_exact.png"]
    produced = list(batches)
    assert len(produced) == len(batches) == 2
    assert all(b.shape == (2, side, side, 3) and b.dtype == np.uint8 for b in produced)
    assert all(b.flags["C_CONTIGUOUS"] for b in produced)

    top, left = (150 - tile) // 2, (200 - tile) // 2
    large_crop = large[top:top + tile, left:left + tile]
    # 40x50 -> shorter side to 64: 64x80 (bilinear), then the centre 64 columns
    small_crop = cv2.resize(small, (80, 64), interpolation=cv2.INTER_LINEAR)[:, 8:72]
    expected = [pad_pixels(crop, info)[0] for crop in (large_crop, small_crop, exact)]
    np.testing.assert_array_equal(produced[0][0], expected[0])
    np.testing.assert_array_equal(produced[0][1], expected[1])
    np.testing.assert_array_equal(produced[1][0], expected[2])
    np.testing.assert_array_equal(produced[1][1], expected[0])  # last batch filled from the start


def test_calibration_batches_need_images(tmp_path):
    with pytest.raises(ModelError, match="no images"):
        CalibrationBatches(tmp_path, tiny_info(), tile=64, batch_size=2)
    with pytest.raises(ModelError, match="does not exist"):
        CalibrationBatches(tmp_path / "missing", tiny_info(), tile=64, batch_size=2)


def test_network_side_is_the_padded_tile():
    info = tiny_info()
    for tile in (64, 100, 512):
        image = np.zeros((tile, tile, 3), np.uint8)
        assert pad_pixels(image, info)[0].shape[:2] == (network_side(tile, 32),) * 2
    assert network_side(512, 32) == 576


@pytest.mark.parametrize("height, width", [
    (360, 640), (720, 960), (1080, 1920), (2048, 4096), (512, 8192), (300, 200), (33, 47),
    (1, 1), (512, 512), (513, 100)])
def test_every_padded_tile_fits_the_engine_profile(height, width):
    """What a TensorRT engine must accept: every tile the host sends, for frames from a 1 px
    image to a line-scan strip, cut into fitted tiles (or whole when small) and padded."""
    info, tile = tiny_info(), 512
    low, opt, high = profile_shapes(info, tile, max_batch=8)
    assert low == (1, 32, 32, 3) and opt == high == (8, 576, 576, 3)
    frame = np.zeros((height, width, 3), np.uint8)
    if height <= tile and width <= tile:
        pieces = [frame]
    else:
        pieces = split(frame, TileGrid(height, width, tile, 64, fit=True))
    for piece in pieces:
        padded = pad_pixels(piece, info)[0]
        assert low[1] <= padded.shape[0] <= high[1] and low[2] <= padded.shape[1] <= high[2]
        assert padded.shape[0] % 32 == 0 and padded.shape[1] % 32 == 0 and padded.shape[2] == 3


# --- errors without TensorRT --------------------------------------------------------------------

def test_check_cuda_turns_failures_into_model_errors():
    assert check_cuda(7, "counting") == 7
    assert check_cuda(lambda: None, "a void call") is None  # pycuda's copies return None
    with pytest.raises(ModelError, match="building the engine failed"):
        check_cuda(None, "building the engine")
    with pytest.raises(ModelError, match="running failed"):
        check_cuda(False, "running")

    def broken() -> None:
        raise RuntimeError("cuMemAlloc failed: out of memory\nmore lines")

    with pytest.raises(ModelError, match="allocating failed: cuMemAlloc failed: out of memory$"):
        check_cuda(broken, "allocating")


@pytest.mark.skipif(TRT_INSTALLED, reason="TensorRT is installed here")
def test_tensorrt_backend_says_how_to_get_tensorrt(tiny, tmp_path):
    assert not tensorrt_available()
    with pytest.raises(ModelError, match="TensorRT is not installed.*--backend onnxruntime"):
        TensorRTSegmenter(tmp_path / "model.plan")
    with pytest.raises(ModelError, match="TensorRT is not installed.*pypi.nvidia.com"):
        build_engine(tiny.onnx, tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists()


# --- on a GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_fp16_matches_cpu(tiny):
    images = random_images(4, 96, 128)
    reference = TorchSegmenter(tiny.checkpoint, device="cpu").segment(images)
    eager = TorchSegmenter(tiny.checkpoint, device="cuda")
    assert eager.backend == "torch-cuda" and eager.fp16
    got = eager.segment(images)
    assert max_diff(got, reference) < 2e-2
    assert median_masks(reference, got) > 0.9
    graphed = TorchSegmenter(tiny.checkpoint, device="cuda", cuda_graphs=True)
    for _ in range(2):  # capture, then replay
        replayed = graphed.segment(images)
        assert max_diff(replayed, got) < 1e-3


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("fp16, tolerance, min_iou", [(False, 1e-3, 0.99), (True, 2e-2, 0.9)])
def test_tensorrt_matches_onnxruntime(tiny, tmp_path, fp16, tolerance, min_iou):
    tile = 128
    plan = build_engine(tiny.onnx, tmp_path / "tiny.plan", fp16=fp16, max_batch=4, tile=tile,
                        timing_cache=tmp_path / "timing.cache", workspace_gb=1)
    assert plan.is_file() and (tmp_path / "timing.cache").is_file()
    description = json.loads(plan.with_suffix(".json").read_text())
    assert description["input_side"] == network_side(tile, 32) == 192
    ort_seg = OnnxRuntimeSegmenter(tiny.onnx, threads=1, providers=["CPUExecutionProvider"])
    with TensorRTSegmenter(plan) as trt_seg:
        assert trt_seg.backend == "tensorrt" and trt_seg.max_batch == 4 and trt_seg.tile == tile
        assert trt_seg.info.threshold == THRESHOLD
        assert trt_seg.info.sha256 == ort_seg.info.sha256  # labelled as the ONNX model
        # full tiles (the profile's opt shape), 6 = two batches; and smaller images of two
        # shapes in one call, each run at its own size as ONNX Runtime runs it
        images = random_images(6, tile, tile) + random_images(3, 96, 80, seed=5) + \
            random_images(2, 40, 128, seed=6)
        got, expected = trt_seg.segment(images), ort_seg.segment(images)
        assert [m.shape for m in got] == [image.shape[:2] for image in images]
        assert max_diff(got, expected) < tolerance
        assert median_masks(expected, got) > min_iou
        with pytest.raises(ModelError, match="TiledSegmenter"):
            trt_seg.segment(random_images(1, tile + 1, tile))
        # a larger frame in fitted tiles, cut the same way for both backends
        frame = random_images(1, 300, 200, seed=8)
        tiled_trt = TiledSegmenter(trt_seg, tile=tile, overlap=32, max_batch=4, fit=True)
        tiled_ort = TiledSegmenter(ort_seg, tile=tile, overlap=32, max_batch=4, fit=True)
        assert max_diff(tiled_trt.segment(frame), tiled_ort.segment(frame)) < tolerance


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_int8_calibrates_and_writes_the_cache(tiny, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, image in enumerate(random_images(4, 160, 160, seed=7)):
        cv2.imwrite(str(calib / f"{i}.png"), image)
    cache = tmp_path / "int8.cache"
    plan = build_engine(tiny.onnx, tmp_path / "int8.plan", int8=True, calib_dir=calib,
                        calib_cache=cache, max_batch=2, tile=128, workspace_gb=1)
    assert cache.is_file()
    # the cache alone is enough for a rebuild
    again = build_engine(tiny.onnx, tmp_path / "again.plan", int8=True, calib_cache=cache,
                         max_batch=2, tile=128, workspace_gb=1)
    with TensorRTSegmenter(plan) as a, TensorRTSegmenter(again) as b:
        images = random_images(2, 128, 128)
        maps = a.segment(images)
        assert all(m.shape == (128, 128) and np.isfinite(m).all() for m in maps)
        assert b.segment(images)[0].shape == (128, 128)
