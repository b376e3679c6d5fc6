"""Fine-tuning a deployed model: an exported ONNX model's folded weights back in PyTorch, batch
norm frozen while training, and ``init_from`` in recipes and on the command line.

Every model here is trained for one epoch on 64-px synthetic images and exported for real, so
the ONNX files are what ``crackscan export`` writes; the model they start from is the session's
``tiny_model``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from support import crackscan_concurrently, tiny_config

from training.config import TrainConfig
from training.export import export_checkpoint
from training.loop import init_weights
from training.loop import main as train_main
from training.models import build_model, get_spec
from training.onnx_weights import freeze_batch_norm, grow, load_onnx_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def onnx_logits(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x})[0]


def test_onnx_weights_reproduce_the_exported_model(tiny_model):
    state = torch.load(tiny_model.checkpoint, map_location="cpu", weights_only=False)
    norm = state["model"]["encoder.features.0.1.running_var"]
    assert not torch.allclose(norm, torch.ones_like(norm))  # real statistics were folded

    model = build_model("mobilenet_aspp")  # fresh: random weights, default statistics
    assert load_onnx_weights(model, tiny_model.model, 32) == 66
    x = np.random.default_rng(3).normal(size=(1, 3, 96, 64)).astype(np.float32)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    expected = onnx_logits(tiny_model.model, x)
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    # the batch norms are the identity plus the folded shift
    first_norm = model.encoder.features[0][1]
    assert torch.all(first_norm.running_mean == 0) and torch.all(first_norm.weight == 1)


def test_onnx_weights_of_another_architecture_are_refused(tiny_model):
    with pytest.raises(ValueError, match="convolutions"):
        load_onnx_weights(build_model("resnet18_aspp"), tiny_model.model, 32)
    with pytest.raises(ValueError, match="shape"):  # same layers, other width
        load_onnx_weights(build_model("mobilenet_aspp", width_mult=0.5), tiny_model.model, 32)


def test_frozen_batch_norm_keeps_its_statistics_while_the_rest_learns(tiny_model, tmp_path):
    out = tmp_path / "ft"
    cfg = tiny_config(tiny_model.data, out, epochs=1).model_copy(
        update={"init_from": tiny_model.model, "freeze_bn": True})
    train_main(cfg)
    tuned = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    start = build_model("mobilenet_aspp")
    load_onnx_weights(start, tiny_model.model, 32)
    before = start.state_dict()
    for name, value in tuned.items():
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, before[name]), name  # frozen: never updated
    assert not torch.equal(tuned["head.weight"], before["head.weight"])  # but it trained
    assert not torch.equal(tuned["encoder.features.0.0.weight"],
                           before["encoder.features.0.0.weight"])


def test_freeze_batch_norm_leaves_the_other_layers_in_training_mode():
    model = build_model("mobilenet_aspp").train()
    freeze_batch_norm(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.training and model.decoder.aspp.project[3].training  # dropout still active


def test_an_onnx_init_needs_frozen_batch_norm():
    with pytest.raises(ValidationError, match="freeze_bn"):
        TrainConfig(init_from="model.onnx")
    TrainConfig(init_from="best.pt")  # a checkpoint has its statistics: no need


def test_init_from_a_checkpoint_starts_where_it_ended(tiny_model, tmp_path):
    out = tmp_path / "from_pt"
    cfg = tiny_config(tiny_model.data, out, epochs=1).model_copy(
        update={"init_from": tiny_model.checkpoint, "lr": 1e-9})  # a step too small to move
    train_main(cfg)
    start = torch.load(tiny_model.checkpoint, map_location="cpu", weights_only=False)["model"]
    tuned = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    weight = "decoder.fuse.1.3.weight"
    assert torch.allclose(tuned[weight], start[weight], atol=1e-6)


@pytest.mark.slow
def test_crackscan_train_init_from_the_command_line(tiny_model, tmp_path):
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mobilenet_aspp", "crop": 64, "batch_size": 2,
                                      "epochs": 1, "num_threads": 1, "freeze_bn": True}))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": "resnet18_aspp", "freeze_bn": True, "epochs": 1}))
    done, refused = crackscan_concurrently(
        ("train", "--config", recipe, "--data", tiny_model.data, "--init-from", tiny_model.model,
         "--out", tmp_path / "run"),
        ("train", "--config", other, "--data", tiny_model.data, "--init-from", tiny_model.model,
         "--out", tmp_path / "bad"), check=False)
    assert done.returncode == 0, done.stderr
    assert "66 convolutions from" in done.stderr and "batch norm frozen" in done.stderr
    assert json.loads(done.stdout)["epochs"] == 1

    assert refused.returncode != 0
    assert "is a 'mobilenet_aspp' model, the recipe trains 'resnet18_aspp'" in refused.stderr


def test_a_stride_2_refinement_grown_on_an_onnx_model_starts_as_that_model(tiny_model):
    cfg = TrainConfig(model="mobilenet_aspp", model_params={"fine_skip": True},
                      init_from=tiny_model.model, freeze_bn=True)
    model = build_model("mobilenet_aspp", fine_skip=True)
    assert "new stride-2 refinement (12 tensors)" in init_weights(model, cfg,
                                                                   get_spec("mobilenet_aspp"))
    x = np.random.default_rng(5).normal(size=(1, 3, 64, 96)).astype(np.float32)
    image = torch.from_numpy(x)
    with torch.no_grad():
        got = model.eval()(image)
        # the refinement adds nothing yet: the stride-4 logits, upsampled x2 and then x2 again
        stride4 = model.head(model.decoder(model.encoder(image)))
        twice = F.interpolate(F.interpolate(stride4, scale_factor=2.0, mode="bilinear"),
                              scale_factor=2.0, mode="bilinear")
        once = F.interpolate(stride4, size=image.shape[-2:], mode="bilinear")
    assert torch.allclose(got, twice, atol=1e-6)
    # and those stride-4 logits are the ONNX model's (which upsamples x4 in one step)
    expected = onnx_logits(tiny_model.model, x)
    assert np.abs(once.numpy() - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_a_refined_model_trains_its_refinement_and_round_trips_through_onnx(tiny_model, tmp_path):
    out = tmp_path / "fine"
    cfg = tiny_config(tiny_model.data, out, epochs=1).model_copy(
        update={"model_params": {"fine_skip": True}, "init_from": tiny_model.model,
                "freeze_bn": True})
    train_main(cfg)
    tuned = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert tuned["refine.correct.weight"].abs().max() > 0  # it left zero: it learns

    export_checkpoint(out / "last.pt", tmp_path / "fine.onnx")  # verified against PyTorch
    model = build_model("mobilenet_aspp", fine_skip=True)  # loads directly: same convolutions
    assert load_onnx_weights(model, tmp_path / "fine.onnx", 32) == 66 + 6
    with pytest.raises(ValueError, match="fine_skip"):  # a model without it: the hint says so
        load_onnx_weights(build_model("mobilenet_aspp"), tmp_path / "fine.onnx", 32)


def test_grow_refuses_a_model_that_differs_beyond_its_new_part():
    with pytest.raises(ValueError, match="refine"):
        grow(build_model("mobilenet_aspp", fine_skip=True, aspp_channels=64),
             build_model("mobilenet_aspp"), "refine.")
    with pytest.raises(ValueError, match="lacks"):  # the other way round: refine.* is extra
        grow(build_model("mobilenet_aspp"), build_model("mobilenet_aspp", fine_skip=True),
             "refine.")


def test_interpolation_runs_the_straight_line_from_start_to_fine_tune(tiny_model, tmp_path):
    """WiSE-FT: alpha 0 is the start model (ONNX Runtime gives its logits), 1 the fine-tune,
    0.5 the mean of every weight; the blend's threshold is chosen on the run's validation split."""
    from training.interpolate import interpolate_checkpoint

    cfg = tiny_config(tiny_model.data, tmp_path / "ft", epochs=1).model_copy(
        update={"init_from": tiny_model.model, "freeze_bn": True, "lr": 0.01})
    train_main(cfg)
    tuned = torch.load(tmp_path / "ft" / "best.pt", map_location="cpu", weights_only=False)
    start = build_model("mobilenet_aspp")
    load_onnx_weights(start, tiny_model.model, 32)
    x = np.random.default_rng(5).normal(size=(1, 3, 64, 96)).astype(np.float32)

    zero = interpolate_checkpoint(tmp_path / "ft" / "best.pt", 0.0, tmp_path / "a0.pt",
                                  calibrate=False)
    model = build_model("mobilenet_aspp")
    model.load_state_dict(zero["model"])
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    expected = onnx_logits(tiny_model.model, x)
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())

    one = interpolate_checkpoint(tmp_path / "ft" / "best.pt", 1.0, tmp_path / "a1.pt",
                                 calibrate=False)
    half = interpolate_checkpoint(tmp_path / "ft" / "best.pt", 0.5, tmp_path / "a5.pt")
    moved = 0
    for name, value in tuned["model"].items():
        assert torch.equal(one["model"][name], value), name
        if value.is_floating_point():
            begin = start.state_dict()[name]
            torch.testing.assert_close(half["model"][name], (begin + value) / 2)
            moved += not torch.equal(begin, value)
    assert moved > 10  # the fine-tune really moved the weights it blends
    report = json.loads((tmp_path / "a5.val_report.json").read_text())
    assert half["metrics"]["val"]["default_threshold"] == report["default_threshold"]
    assert half["interpolated"]["alpha"] == 0.5


@pytest.mark.slow
def test_crackscan_export_interpolate(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model.data, tmp_path / "ft", epochs=1).model_copy(
        update={"init_from": tiny_model.model, "freeze_bn": True})
    train_main(cfg)
    out = tmp_path / "blend.onnx"
    done, scratch = crackscan_concurrently(
        ("export", "--checkpoint", tmp_path / "ft" / "best.pt", "--interpolate", 0.25, "--out",
         out),
        ("export", "--checkpoint", tiny_model.checkpoint, "--interpolate", 0.5, "--out",
         tmp_path / "never.onnx"), check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ft" / "best.wise0.25.pt").is_file()
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    blend = json.loads(metadata["crackscan.interpolated"])
    assert blend["alpha"] == 0.25 and blend["origin"] == tiny_model.model.name
    report = json.loads((tmp_path / "ft" / "best.wise0.25.val_report.json").read_text())
    assert float(metadata["crackscan.threshold"]) == report["default_threshold"]

    assert scratch.returncode != 0 and "trained from scratch" in scratch.stderr
    assert "Traceback" not in scratch.stderr


def test_a_binary_model_widened_to_lining_classes_starts_as_that_model(tiny_model):
    from training.lining import CLASSES

    cfg = TrainConfig(model="mobilenet_aspp", classes=list(CLASSES), init_from=tiny_model.model,
                      freeze_bn=True)
    model = build_model("mobilenet_aspp", num_classes=len(CLASSES))
    assert "widened to 9 classes (1 convolutions)" in init_weights(model, cfg,
                                                                   get_spec("mobilenet_aspp"))
    x = np.random.default_rng(6).normal(size=(1, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        crack = torch.softmax(model.eval()(torch.from_numpy(x)), dim=1)[0, 1].numpy()
    binary = 1 / (1 + np.exp(-onnx_logits(tiny_model.model, x)[0, 0]))
    assert np.abs(crack - binary).max() < 0.02  # the new classes start far below background


def test_a_lining_model_trains_on_crack_sets_and_lining_tiles_and_exports_its_classes(
        tiny_model, tmp_path):
    """Real 0/255 crack sets and class-labelled lining tiles in one multi-class run, with lining
    features pasted on the crack images; the export names its classes and maps two planes."""
    from inference.onnxruntime_backend import OnnxRuntimeSegmenter
    from inference.segmenter import split_map
    from training.lining import CLASSES, write_lining_dataset

    write_lining_dataset(tmp_path / "lining", 8, size=64)
    cfg = tiny_config(tiny_model.data, tmp_path / "run", epochs=1).model_copy(update={
        "data": [tiny_model.data, tmp_path / "lining"], "classes": list(CLASSES),
        "loss": "ce_crack_dice", "init_from": tiny_model.model, "freeze_bn": True,
        "distractor_p": 1.0})
    train_main(cfg)
    export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "lining.onnx")
    segmenter = OnnxRuntimeSegmenter(tmp_path / "lining.onnx", threads=1)
    assert segmenter.info.classes == CLASSES
    image = np.full((64, 80, 3), 128, np.uint8)
    prob, class_map = split_map(segmenter.segment([image])[0])
    assert prob.shape == class_map.shape == (64, 80) and class_map.max() < len(CLASSES)


def test_lining_distractors_need_the_lining_classes():
    with pytest.raises(ValidationError, match="lists them, in that order"):
        TrainConfig(classes=["background", "crack", "joint"], distractor_p=0.5)
    TrainConfig(classes=["crack"], distractor_p=0.5)  # a binary model keeps them background


def test_the_crack_dice_term_is_multi_class_only_and_weighs_the_crack():
    from training.losses import get_loss

    with pytest.raises(ValueError, match="multi-class"):
        get_loss("ce_crack_dice", 1)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 3, :] = 2  # a crack row at class index 2
    logits = torch.zeros(1, 3, 8, 8)
    base = get_loss("ce_dice", 3)(logits, target)
    with_crack = get_loss("ce_crack_dice", 3, crack_index=2)(logits, target)
    assert with_crack > base  # the crack's own Dice term is added
    logits[0, 2, 3, :] = 20.0
    logits[0, 0] = torch.where(target[0] == 0, 20.0, 0.0)
    assert get_loss("ce_crack_dice", 3, crack_index=2)(logits, target) < 0.05


def test_a_binary_teacher_keeps_a_lining_student_s_crack_channel(tiny_model, tmp_path):
    """Learning without forgetting: the binary model's crack probability taught to the crack
    channel of a multi-class student (crack against the rest), never on pixels of a class the
    teacher did not know."""
    from training.lining import CLASSES, write_lining_dataset
    from training.losses import crack_vs_rest_logit, distillation_loss

    logits = torch.randn(2, 4, 8, 8)
    p = torch.softmax(logits, dim=1)[:, 1:2]
    assert torch.allclose(torch.sigmoid(crack_vs_rest_logit(logits, 1)), p, atol=1e-6)
    teacher = crack_vs_rest_logit(logits, 1)  # a teacher that agrees: nothing to learn
    assert distillation_loss(logits, teacher, 2.0, 1).abs() < 1e-5
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    assert distillation_loss(logits, teacher + 5.0, 2.0, 1, keep) == 0  # no pixel kept
    assert distillation_loss(logits, teacher + 5.0, 2.0, 1) > 0.1

    write_lining_dataset(tmp_path / "lining", 4, size=64)
    cfg = tiny_config(tiny_model.data, tmp_path / "run", epochs=1).model_copy(update={
        "data": [tiny_model.data, tmp_path / "lining"], "classes": list(CLASSES),
        "loss": "ce_crack_dice", "init_from": tiny_model.model, "freeze_bn": True,
        "teacher": tiny_model.model, "distill_alpha": 0.5})
    result = train_main(cfg)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert result["epochs"] == 1 and history[0]["loss_distill"] >= 0
    with pytest.raises(ValueError, match="ONNX teacher is a binary model"):
        train_main(cfg.model_copy(update={"classes": ["crack"], "loss": "bce_dice",
                                          "out": tmp_path / "binary"}))
