"""Export, the ONNX Runtime segmenter and ``crackscan eval``, on a model really trained (one tiny
epoch) and exported with ``crackscan export``: the session's ``tiny_model``.

Images are colour noise, so a red/blue mix-up anywhere between the data loader, the segmenter and
the metrics changes the numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import BINARY_MODEL, cracked_wall_with_truth, crackscan

from crackscan.config import PipelineConfig
from inference.backends import bundled_model_path, open_segmenter
from inference.onnxruntime_backend import OnnxRuntimeSegmenter
from inference.segmenter import ModelError, pad_for_model, preprocess
from training.config import TrainConfig
from training.evaluate import evaluate_model, exposure
from training.export import ExportError, export_checkpoint
from training.models import IMAGENET_MEAN, IMAGENET_STD, build_model

EVAL_KEYS = {"precision", "recall", "f1", "iou", "tolerance_px", "threshold", "images", "ods",
             "ois"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def segmenter(tiny_model) -> OnnxRuntimeSegmenter:
    return OnnxRuntimeSegmenter(tiny_model.model, threads=1)


# --- export ---------------------------------------------------------------------------------

def test_export_writes_the_documented_metadata(tiny_model):
    graph = onnx.load(str(tiny_model.model))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["crackscan.model"] == "mobilenet_aspp"
    mean, std = json.loads(meta["crackscan.mean"]), json.loads(meta["crackscan.std"])
    assert len(mean) == len(std) == 3
    assert mean == pytest.approx(IMAGENET_MEAN) and std == pytest.approx(IMAGENET_STD)
    assert int(meta["crackscan.size_multiple"]) == 32
    assert json.loads(meta["crackscan.classes"]) == ["crack"]
    assert 0.0 < float(meta["crackscan.threshold"]) < 1.0
    assert meta["crackscan.input_color"] == "RGB"
    assert json.loads(meta["crackscan.trained_on"]) == ["cracks"]
    assert isinstance(json.loads(meta["crackscan.metrics"]), dict)
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["logits"]


def test_onnx_runtime_agrees_with_pytorch_on_another_input_size(tiny_model):
    model = build_model("mobilenet_aspp")
    model.load_state_dict(torch.load(tiny_model.checkpoint, map_location="cpu",
                                     weights_only=False)["model"])
    model.eval()
    image = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(image).numpy()
    session = ort.InferenceSession(str(tiny_model.model), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": image.numpy()})[0]
    assert got.shape == (1, 1, 96, 160)
    assert np.abs(got - expected).max() < 1e-3


def test_training_validation_tiles_large_images_as_the_pipeline_does(tiny_model):
    # Validation (training.loop.predict with the recipe's val_tile) and the pipeline's ONNX
    # Runtime segmenter with inference.tile cut a large image into the same fitted tiles, so
    # the default threshold is chosen on the maps the pipeline will produce.
    from inference.tiling import DEFAULT_OVERLAP
    from training.loop import predict

    model = build_model("mobilenet_aspp")
    model.load_state_dict(torch.load(tiny_model.checkpoint, map_location="cpu",
                                     weights_only=False)["model"])
    image = np.random.default_rng(0).integers(0, 256, (150, 230, 3), dtype=np.uint8)
    deployed = open_segmenter(tiny_model.model, "onnxruntime", threads=1, tile=160,
                              tile_overlap=64)
    assert deployed.backend.endswith("+tiles160")
    tiled = predict(model, image, IMAGENET_MEAN, IMAGENET_STD, 32, tile=160)
    whole = predict(model, image, IMAGENET_MEAN, IMAGENET_STD, 32)
    (expected,) = deployed.segment([np.ascontiguousarray(image[:, :, ::-1])])  # BGR in
    assert tiled.shape == whole.shape == (150, 230)
    # This barely trained model answers about 0.49 everywhere, so tiles move it little (3e-5
    # measured), but the tiled PyTorch map is the deployed one (6e-8) and the whole one is not.
    assert np.abs(tiled - expected).max() < 1e-3
    assert np.abs(tiled - expected).max() < 0.1 * np.abs(whole - expected).max()
    assert TrainConfig().val_tile == PipelineConfig().inference.tile == 512
    assert DEFAULT_OVERLAP == PipelineConfig().inference.tile_overlap


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    weights_only = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, weights_only)
    for path in (text, weights_only):
        with pytest.raises(ExportError, match="not a crackscan training checkpoint"):
            export_checkpoint(path, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()

    done = crackscan("export", "--checkpoint", text, "--out", tmp_path / "m.onnx", check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a crackscan training checkpoint" in lines[0], done.stderr


# --- segmenter ------------------------------------------------------------------------------

def test_segment_odd_sized_colour_and_grey_images(segmenter):
    bgr = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    colour_map, grey_map = segmenter.segment([bgr, grey])
    for prob in (colour_map, grey_map):
        assert prob.shape == (37, 53) and prob.dtype == np.float32
        assert 0.0 <= prob.min() and prob.max() <= 1.0


def test_preprocess_converts_bgr_to_rgb_pads_and_normalises(segmenter):
    info = segmenter.info
    blue = np.zeros((37, 53, 3), np.uint8)
    blue[..., 0] = 255  # pure blue in OpenCV's BGR order
    x, window = preprocess(blue, info)
    # 32 px mirrored on every side (37 + 64 = 101, 53 + 64 = 117), then up to multiples of 32
    assert x.shape == (1, 3, 128, 128) and x.dtype == np.float32 and window == (32, 32, 37, 53)
    pixels = x[0] * np.asarray(info.std, np.float32)[:, None, None] + np.asarray(
        info.mean, np.float32)[:, None, None]  # back to 0..1, channels in the model's RGB order
    assert pixels[2] == pytest.approx(1.0, abs=1e-6)
    assert pixels[:2] == pytest.approx(0.0, abs=1e-6)

    # mean, std and size multiple come from the model's metadata, not from constants
    other = dataclasses.replace(info, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                size_multiple=16)
    grey = np.full((37, 53), 102, np.uint8)
    x, window = preprocess(grey, other)
    assert x.shape == (1, 3, 112, 128) and window == (32, 32, 37, 53)
    assert x == pytest.approx((102 / 255 - 0.5) / 0.25)


def test_mirror_padding_surrounds_the_image_with_its_reflection():
    image = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50).astype(np.uint8)
    padded, (top, left, h, w) = pad_for_model(image, 32, margin=8)
    assert padded.shape == (64, 96)  # 40 + 16 -> 64, 50 + 16 -> 96
    np.testing.assert_array_equal(padded[top:top + h, left:left + w], image)
    # reflect-101: the row above the image is its second row (the edge row is not repeated)
    np.testing.assert_array_equal(padded[top - 1, left:left + w], image[1])
    np.testing.assert_array_equal(padded[:, left - 3], padded[:, left + 3])
    tiny, window = pad_for_model(np.zeros((5, 7), np.uint8), 32)
    assert tiny.shape == (32, 32) and window == (4, 4, 5, 7)  # margin shrinks to fit the image


def test_model_label_is_name_and_short_sha256(segmenter, tiny_model):
    digest = hashlib.sha256(tiny_model.model.read_bytes()).hexdigest()
    assert segmenter.info.label == f"mobilenet_aspp@{digest[:8]}"
    assert re.fullmatch(r"mobilenet_aspp@[0-9a-f]{8}", segmenter.info.label)


# dynamo=False is the point here (a plain legacy export); its deprecation notice is not
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_model_without_crackscan_metadata_is_refused(tmp_path):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 1, 1), (torch.zeros(1, 3, 32, 32),), str(plain),
                      dynamo=False, input_names=["image"], output_names=["logits"])
    with pytest.raises(ModelError, match="crackscan export"):
        OnnxRuntimeSegmenter(plain)


def test_missing_or_broken_model_file_is_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        OnnxRuntimeSegmenter(tmp_path / "absent.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00 not a protobuf " * 8)
    with pytest.raises(ModelError, match="not a usable ONNX model"):
        open_segmenter(broken)


def test_tensorrt_backend_says_it_is_not_installed(tiny_model):
    with pytest.raises(ModelError, match="TensorRT is not installed"):
        open_segmenter(tiny_model.model, backend="tensorrt")
    with pytest.raises(ModelError, match="TensorRT is not installed"):
        open_segmenter(tiny_model.model.with_suffix(".plan"))


def test_auto_without_a_gpu_is_onnx_runtime_and_tiles_when_asked(tiny_model):
    assert open_segmenter(tiny_model.model, threads=1).backend == "onnxruntime"
    tiled = open_segmenter(tiny_model.model, threads=1, tile=64, tile_overlap=16, max_batch=4)
    assert tiled.backend == "onnxruntime+batch4+tiles64"
    image = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    (prob,) = tiled.segment([image])
    assert prob.shape == (100, 150) and tiled.tiles_run == 6  # 2 rows x 3 columns of tiles
    with pytest.raises(ModelError, match="unknown backend"):
        open_segmenter(tiny_model.model, backend="cuda")


def test_sleeping_threads_give_the_same_probabilities(tiny_model):
    """``inference.spin: false`` only changes how ONNX Runtime's idle threads wait."""
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    (spinning,) = open_segmenter(tiny_model.model, threads=2).segment([image])
    (sleeping,) = open_segmenter(tiny_model.model, threads=2, spin=False).segment([image])
    np.testing.assert_array_equal(spinning, sleeping)


def test_bundled_model_ships_and_loads():
    path = bundled_model_path()
    assert path.is_file(), f"{path} is missing from the package"
    segmenter = open_segmenter(None, threads=1)  # no --model: the bundled one
    assert segmenter.info.path == path
    assert segmenter.info.name == "mobilenet_aspp"
    assert segmenter.info.classes == ("background", "crack", "joint", "stain", "spalling", "hole",
                                      "cable", "marking", "scratch")  # the lining model
    (seg_map,) = segmenter.segment([np.full((32, 40, 3), 128, np.uint8)])
    assert seg_map.shape == (2, 32, 40)  # crack probability, class
    binary = open_segmenter(BINARY_MODEL, threads=1)  # the binary model it started from
    assert binary.info.classes == ("crack",)
    (prob,) = binary.segment([np.full((32, 40, 3), 128, np.uint8)])
    assert prob.shape == (32, 40)


def crack_scene(height: int = 64, width: int = 96) -> np.ndarray:
    """Grey noise with a dark diagonal line: a frame the bundled model answers unevenly."""
    image = np.random.default_rng(3).integers(150, 220, (height, width, 3), dtype=np.uint8)
    cv2.line(image, (5, 3), (width - 20, height - 4), (40, 40, 40), 2)
    return image


def test_flip_averaging_is_the_mean_of_the_mirrored_runs():
    image = crack_scene()
    plain = open_segmenter(BINARY_MODEL, threads=1)
    averaged = open_segmenter(BINARY_MODEL, threads=1, tta="hflip")
    assert averaged.backend == "onnxruntime+hflip"
    (as_is,), (mirrored,) = plain.segment([image]), plain.segment([image[:, ::-1].copy()])
    (prob,) = averaged.segment([image])
    np.testing.assert_allclose(prob, (as_is + mirrored[:, ::-1]) / 2, atol=1e-6)


def test_all_flips_make_the_answer_mirror_equivariant():
    """Averaged over the four mirror images, a mirrored frame gets the mirrored answer; the
    plain model's answers differ under mirroring (so the check can fail)."""
    image = crack_scene()
    frames = [image, image[:, ::-1].copy(), image[::-1].copy()]
    plain = open_segmenter(BINARY_MODEL, threads=1).segment(frames)
    assert np.abs(plain[0] - plain[1][:, ::-1]).max() > 1e-3
    flips = open_segmenter(BINARY_MODEL, threads=1, tta="flips").segment(frames)  # three at once
    np.testing.assert_allclose(flips[0], flips[1][:, ::-1], atol=1e-5)
    np.testing.assert_allclose(flips[0], flips[2][::-1], atol=1e-5)
    assert [p.shape for p in flips] == [image.shape[:2]] * 3
    with pytest.raises(ModelError, match="unknown test-time augmentation"):
        open_segmenter(None, tta="rotate")


# --- eval -----------------------------------------------------------------------------------

def test_crackscan_eval_json_matches_evaluate_model(tiny_model, segmenter):
    for tolerance in (2, 0):
        done = crackscan("eval", "--model", tiny_model.model, "--data", tiny_model.data,
                         "--split", "test", "--tolerance", tolerance, "--format", "json",
                         check=False)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)  # one JSON document and nothing else on stdout
        assert EVAL_KEYS <= set(summary)
        assert summary["images"] == 2  # the ids of test.txt
        assert summary["tolerance_px"] == tolerance
        direct = evaluate_model(segmenter, [tiny_model.data], split="test", tolerance=tolerance)
        assert summary["model"] == direct["model"] == segmenter.info.label
        for key in EVAL_KEYS:
            assert summary[key] == pytest.approx(direct[key]), key


def test_eval_on_the_carved_validation_split_scores_the_ids_training_held_out(tiny_model,
                                                                              segmenter):
    from training.data import train_val_split

    held_out = train_val_split(tiny_model.data, 0.5, 3)[1]
    assert len(held_out) == 2 and not set(held_out) & set(
        (tiny_model.data / "test.txt").read_text().split())
    done = crackscan("eval", "--model", tiny_model.model, "--data", tiny_model.data, "--split",
                     "carved", "--val-fraction", 0.5, "--seed", 3, "--format", "json", check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["images"] == 2 and summary["split"] == "carved"
    only_those = tiny_model.data.parent / "held_out"
    (only_those / "images").mkdir(parents=True, exist_ok=True)
    (only_those / "masks").mkdir(exist_ok=True)
    for sample_id in held_out:
        for kind, suffix in (("images", ".png"), ("masks", ".png")):
            target = only_those / kind / f"{sample_id}{suffix}"
            if not target.exists():
                target.symlink_to(tiny_model.data / kind / f"{sample_id}{suffix}")
    direct = evaluate_model(segmenter, [only_those])  # all images of a folder of just those
    for key in EVAL_KEYS - {"images"}:
        assert summary[key] == pytest.approx(direct[key]), key


def own_and_inverse_masks(tiny_model, segmenter, root: Path) -> tuple[Path, Path, float]:
    """Two folders of the exported model's images: one whose masks are the model's own output
    thresholded at the median probability, one whose masks are their inverse; and that
    threshold."""
    images = sorted((tiny_model.data / "images").iterdir())
    probs = [segmenter.segment([cv2.imread(str(p), cv2.IMREAD_COLOR)])[0] for p in images]
    threshold = float(np.median(np.concatenate([p.ravel() for p in probs])))
    own, inverse = root / "own", root / "inverse"
    for folder in (own, inverse):
        (folder / "masks").mkdir(parents=True)
        (folder / "images").symlink_to(tiny_model.data / "images")
    for path, prob in zip(images, probs, strict=True):
        predicted = (prob >= threshold).astype(np.uint8) * 255
        cv2.imwrite(str(own / "masks" / f"{path.stem}.png"), predicted)
        cv2.imwrite(str(inverse / "masks" / f"{path.stem}.png"), 255 - predicted)
    crack_fraction = np.mean([(p >= threshold).mean() for p in probs])
    assert 0.2 < crack_fraction < 0.8  # a real mix of crack and background pixels
    return own, inverse, threshold


def test_eval_against_the_models_own_predictions(tiny_model, segmenter, tmp_path):
    """Masks made from the model's own thresholded output must score F1 = IoU = 1 at strict
    matching, and their inverse 0: any mismatch of colour order, padding, cropping or mask
    orientation between segmenter, data loader and metrics breaks the first equality."""
    own, inverse, threshold = own_and_inverse_masks(tiny_model, segmenter, tmp_path)
    summary = evaluate_model(segmenter, [own], tolerance=0, threshold=threshold)
    assert summary["images"] == len(list((own / "masks").iterdir()))
    assert (summary["precision"], summary["recall"], summary["f1"]) == (1.0, 1.0, 1.0)
    assert summary["iou"] == 1.0
    inverted = evaluate_model(segmenter, [inverse], tolerance=0, threshold=threshold)
    assert inverted["f1"] == 0.0 and inverted["iou"] == 0.0  # no pixel in common


def test_eval_of_several_folders_scores_each_pools_them_and_balances_them(tiny_model, segmenter,
                                                                         tmp_path):
    own, inverse, threshold = own_and_inverse_masks(tiny_model, segmenter, tmp_path)
    done = crackscan("eval", "--model", tiny_model.model, "--data", own, "--data", inverse,
                     "--tolerance", 0, "--threshold", threshold, "--format", "json", check=False)
    assert done.returncode == 0, done.stderr
    both = json.loads(done.stdout)
    assert set(both["sets"]) == {"own", "inverse"}
    assert both["sets"]["own"]["f1"] == 1.0 and both["sets"]["inverse"]["f1"] == 0.0
    for name, folder in (("own", own), ("inverse", inverse)):
        alone = evaluate_model(segmenter, [folder], tolerance=0, threshold=threshold)
        for key in EVAL_KEYS - {"model"}:
            assert both["sets"][name][key] == pytest.approx(alone[key]), (name, key)
    # pooled: every predicted pixel is a crack of "own" and background of "inverse", and the
    # two truths split the pixels, so precision is 1/2 and recall is own's share of the truth
    assert both["images"] == 2 * both["sets"]["own"]["images"]
    assert both["precision"] == pytest.approx(0.5)
    assert 0 < both["f1"] < 1
    # balanced: the best mean of the two folders' F1 at one threshold; never above the better
    # folder's own best, and no lower than predicting every pixel (threshold 0) scores, where
    # a folder whose truth covers a share c of the pixels has F1 = 2c / (1 + c)
    masks = [cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 127 for m in (own / "masks").iterdir()]
    c = sum(m.sum() for m in masks) / sum(m.size for m in masks)
    everything = (2 * c / (1 + c) + 2 * (1 - c) / (2 - c)) / 2
    assert everything - 1e-9 <= both["balanced_ods"] <= max(both["sets"]["own"]["ods"],
                                                             both["sets"]["inverse"]["ods"])
    table = crackscan("eval", "--model", tiny_model.model, "--data", own, "--data", inverse,
                      "--tolerance", 0, "--threshold", threshold, check=False)
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert lines["own"][1:5] == [str(both["sets"]["own"]["images"]), "1.000", "1.000", "1.000"]
    assert lines["inverse"][4] == "0.000"


def test_exposure_maps_values_by_the_gamma_curve():
    values = np.array([[0, 64, 128, 255]], np.uint8)
    assert exposure(values, 1.0) is values
    assert exposure(values, 2.0).tolist() == [[0, 16, 64, 255]]  # 255 * (v / 255) ** 2
    assert exposure(values, 0.5).tolist() == [[0, 128, 181, 255]]


def test_eval_with_a_gamma_scores_the_re_exposed_images(tiny_model, tmp_path):
    from inference.backends import open_segmenter

    bundled = open_segmenter(None, "onnxruntime")  # a trained model: it reacts to exposure
    dark = tmp_path / "dark"
    (dark / "images").mkdir(parents=True)
    (dark / "masks").symlink_to(tiny_model.data / "masks")
    for path in (tiny_model.data / "images").iterdir():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        cv2.imwrite(str(dark / "images" / f"{path.stem}.png"), exposure(image, 2.0))
    done = crackscan("eval", "--data", tiny_model.data, "--gamma", 2, "--tolerance", 0,
                     "--format", "json", check=False)
    assert done.returncode == 0, done.stderr
    via_flag = json.loads(done.stdout)
    assert via_flag["gamma"] == 2.0 and via_flag["model"] == bundled.info.label
    darkened = evaluate_model(bundled, [dark], tolerance=0)
    for key in EVAL_KEYS - {"model"}:
        assert via_flag[key] == pytest.approx(darkened[key]), key
    as_they_are = evaluate_model(bundled, [tiny_model.data], tolerance=0)
    assert via_flag["ods"] != pytest.approx(as_they_are["ods"])  # the gamma changed the input
    mirrored = crackscan("eval", "--data", tiny_model.data, "--gamma", 2, "--tolerance", 0,
                         "--tta", "hflip", "--format", "json", check=False)
    assert mirrored.returncode == 0, mirrored.stderr
    with_tta = json.loads(mirrored.stdout)
    assert with_tta["backend"] == "onnxruntime+batch8+tiles512+hflip"
    assert via_flag["backend"] == "onnxruntime+batch8+tiles512" and via_flag["tile"] == 512
    assert with_tta["ods"] != pytest.approx(via_flag["ods"])
    refused = crackscan("eval", "--data", tiny_model.data, "--gamma", 0, check=False)
    assert refused.returncode != 0 and "--gamma must be positive" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_parity_of_a_checkpoint_on_torch_against_its_export_on_onnxruntime(tiny_model):
    """``crackscan parity`` on the dataset's images: the training checkpoint run by the PyTorch
    backend reproduces its ONNX export run by ONNX Runtime (what a TensorRT engine is held to
    on a GPU), and a different model is told apart."""
    done = crackscan("parity", "--model", tiny_model.checkpoint, "--backend", "torch",
                     "--against-model", tiny_model.model, "--data", tiny_model.data, "--tile",
                     0, "--format", "json", check=False)
    assert done.returncode == 0, done.stderr
    same = json.loads(done.stdout)
    images = len(list((tiny_model.data / "images").iterdir()))
    assert same["images"] == images and same["tile"] == 0
    assert same["other"].startswith("torch-cpu ") and same["reference"].startswith("onnxruntime ")
    assert same["max_abs_diff"] < 1e-4 and same["mean_abs_diff"] < 1e-5
    assert same["mask_iou_min"] > 0.99 and same["mask_disagreement"] < 1e-3
    done = crackscan("parity", "--against-model", tiny_model.model, "--data", tiny_model.data,
                     "--format", "json", check=False)  # the bundled model against this one
    assert done.returncode == 0, done.stderr
    other = json.loads(done.stdout)
    assert other["max_abs_diff"] > 0.1 and other["mean_abs_diff"] > 1e-3
    assert other["mask_disagreement"] > 1e-3


def test_eval_scores_large_images_in_the_pipelines_tiles_unless_told(tmp_path):
    from inference.backends import open_segmenter

    data = tmp_path / "wall"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    image, truth = cracked_wall_with_truth(600, 800, seed=3)
    cv2.imwrite(str(data / "images" / "w.png"), image)
    cv2.imwrite(str(data / "masks" / "w.png"), truth.astype(np.uint8) * 255)
    scores = {}
    for tile in (None, 0, 384):
        flags = () if tile is None else ("--tile", tile)
        done = crackscan("eval", "--data", data, *flags, "--format", "json", check=False)
        assert done.returncode == 0, done.stderr
        scores[tile] = json.loads(done.stdout)
    # The default is the pipeline's: fitted tiles of at most 512 px (2 x 2 for 800x600).
    assert scores[None]["tile"] == 512 and scores[0]["tile"] == 0
    assert scores[None]["backend"] == "onnxruntime+batch8+tiles512"
    assert scores[0]["backend"] == "onnxruntime"
    for tile, expected in ((512, scores[None]), (0, scores[0]), (384, scores[384])):
        direct = evaluate_model(open_segmenter(None, "onnxruntime", tile=tile), [data])
        for key in EVAL_KEYS - {"model"}:
            assert expected[key] == pytest.approx(direct[key]), (tile, key)
    assert scores[None]["ods"] != pytest.approx(scores[0]["ods"])
    refused = crackscan("eval", "--data", data, "--tile", 100, check=False)
    assert refused.returncode != 0 and "--tile" in refused.stderr and "multiple of 32" in (
        refused.stderr)
    assert "Traceback" not in refused.stderr


def test_crack_probability_of_binary_and_multi_class_logits():
    from inference.segmenter import ModelError, crack_probability

    binary = np.zeros((1, 2, 2), np.float32)
    binary[0, 0, 0] = 2.0
    prob = crack_probability(binary, ("crack",))
    assert prob[0, 0] == pytest.approx(1 / (1 + np.exp(-2.0))) and prob[1, 1] == 0.5
    logits = np.zeros((3, 1, 2), np.float32)
    logits[1, 0, 0] = np.log(2.0)  # crack channel twice as likely as each other class
    prob = crack_probability(logits, ("background", "crack", "seam"))
    assert prob[0, 0] == pytest.approx(0.5) and prob[0, 1] == pytest.approx(1 / 3)
    with pytest.raises(ModelError):
        crack_probability(logits, ("background", "seam", "stain"))


def test_eval_reports_each_lining_class_iou_on_class_labelled_folders(tmp_path):
    """``crackscan eval`` of a model with lining classes on a folder whose classes.json lists
    them: crack scores as ever, plus each class's IoU of the argmax map."""
    from support import lining_rule_model

    folder = tmp_path / "tiles"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "classes.json").write_text(json.dumps(["background", "crack", "joint"]))
    for i in range(2):
        image = np.full((64, 96, 3), 150, np.uint8)
        mask = np.zeros((64, 96), np.uint8)
        image[:, 40 + i:46 + i], mask[:, 40 + i:46 + i] = (40, 40, 200), 2  # a red joint
        image[20:23, 60:90], mask[20:23, 60:90] = 30, 1  # a dark crack
        mask[:, 40 + i] = 0  # one column of the joint is mislabelled: IoU 5 / 6
        cv2.imwrite(str(folder / "images" / f"t{i}.png"), image)
        cv2.imwrite(str(folder / "masks" / f"t{i}.png"), mask)
    model = lining_rule_model(tmp_path / "rule.onnx")
    summary = evaluate_model(OnnxRuntimeSegmenter(model, threads=1), [folder], tolerance=0)
    assert summary["class_iou"]["joint"] == pytest.approx(5 / 6, abs=1e-4)
    assert summary["class_iou"]["crack"] == 1.0 and summary["f1"] == 1.0
    done = crackscan("eval", "--model", model, "--data", folder, "--format", "json")
    assert json.loads(done.stdout)["class_iou"]["joint"] == pytest.approx(5 / 6, abs=1e-4)
