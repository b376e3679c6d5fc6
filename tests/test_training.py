"""Training side: dataset folders, transforms, the model registry and encoder, losses, and a real
(tiny) training run with resume, in process and through ``crackscan train``.

Every dataset is written into tmp_path by ``write_crack_dataset``: grey noise with a dark line and
the matching 0/255 mask, in the documented layout. Inputs stay at 64 px so the file runs in
seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml
from support import BRIGHT, DARK, crackscan, tiny_config, write_crack_dataset

from training import data as ds
from training.config import TrainConfig
from training.encoders import MobileNetV2Encoder
from training.loop import main as train_main
from training.loop import predict as train_predict
from training.losses import dice_loss, get_loss
from training.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "cracks"
    write_crack_dataset(root)
    return root


IDS = [f"crack{i:02d}" for i in range(6)]
TRAIN_IDS, TEST_IDS = IDS[:4], IDS[4:]


# --- dataset folders ------------------------------------------------------------------------

def test_read_split_picks_the_split_file_ids(dataset):
    assert ds.read_split(dataset, "train") == TRAIN_IDS
    assert ds.read_split(dataset, "test") == TEST_IDS


def test_read_split_without_its_file_means_all_images(dataset):
    assert ds.read_split(dataset, "val") == IDS  # no val.txt
    assert ds.read_split(dataset, None) == IDS


def test_read_split_names_an_id_without_image(dataset):
    (dataset / "test.txt").write_text("crack04\nno_such_crack\n")
    with pytest.raises(ds.DatasetError, match="no_such_crack"):
        ds.read_split(dataset, "test")


def test_train_val_split_is_reproducible_disjoint_and_leaves_test_alone(dataset):
    train, val = ds.train_val_split(dataset, val_fraction=0.25, seed=3)
    assert (train, val) == ds.train_val_split(dataset, val_fraction=0.25, seed=3)
    assert len(val) == 1 and not set(train) & set(val)
    assert sorted(train + val) == TRAIN_IDS  # every training id used once, no test id
    seen_in_val = {ds.train_val_split(dataset, 0.25, seed)[1][0] for seed in range(20)}
    assert seen_in_val <= set(TRAIN_IDS) and len(seen_in_val) > 1  # the seed does matter


def test_train_val_split_uses_the_official_val_file(dataset):
    (dataset / "train.txt").write_text("crack00\ncrack01\ncrack02\n")
    (dataset / "val.txt").write_text("crack03\n")
    assert ds.train_val_split(dataset, val_fraction=0.5, seed=0) == (
        ["crack00", "crack01", "crack02"], ["crack03"])


def test_load_mask_refuses_a_mask_of_another_size(dataset):
    cv2.imwrite(str(dataset / "masks" / "crack00.png"), np.zeros((64, 60), np.uint8))
    with pytest.raises(ds.DatasetError, match="60x64"):
        ds.load_mask(dataset / "masks" / "crack00.png", (64, 64))
    with pytest.raises(ds.DatasetError, match="60x64"):  # and so does loading the pair
        ds.load_pair(ds.samples(dataset, ["crack00"])[0])


def test_load_pair_gives_rgb_image_and_binary_mask(dataset):
    image, mask = ds.load_pair(ds.samples(dataset, ["crack00"])[0])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    assert (image[mask == 1] == DARK).all() and (image[mask == 0] >= BRIGHT[0]).all()


@pytest.mark.parametrize("size,crop", [(64, 48), (40, 48)])  # crop inside, and a padded image
def test_augment_keeps_image_and_mask_aligned(size, crop):
    image = np.random.default_rng(1).integers(*BRIGHT, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    # a shallow line across the middle rows: every crop of this size contains part of it
    cv2.line(image, (0, size // 2 - 4), (size - 1, size // 2 + 4), (DARK, DARK, DARK), 2)
    cv2.line(mask, (0, size // 2 - 4), (size - 1, size // 2 + 4), 1, 2)
    for seed in range(12):  # enough draws to meet every flip, turn, grey and noise branch
        aug_image, aug_mask = ds.augment(image, mask, crop, np.random.default_rng(seed))
        assert aug_image.shape == (crop, crop, 3) and aug_image.dtype == np.uint8
        assert aug_mask.shape == (crop, crop)
        assert set(np.unique(aug_mask)) == {0, 1}
        # lighting moves the line to at most ~100 and the background to at least ~150
        dark = aug_image.mean(axis=2) < 128
        assert np.array_equal(dark, aug_mask.astype(bool)), f"misaligned with seed {seed}"


@pytest.mark.parametrize("gamma,expected_mean", [
    # half the crops keep 128; the other half get 255 * (128 / 255) ** gamma
    (2.0, (128 + 255 * (128 / 255) ** 2) / 2),   # ~96: darker on average
    (0.5, (128 + 255 * (128 / 255) ** 0.5) / 2),  # ~154: brighter
])
def test_gamma_re_exposes_half_the_crops(gamma, expected_mean):
    grey = np.full((16, 16, 3), 128, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[8] = 1
    rng = np.random.default_rng(0)
    means = []
    for _ in range(400):
        image, kept = ds.lighting(grey, mask, rng, contrast_range=(1.0, 1.0),
                                  gamma_range=(gamma, gamma))
        assert kept is mask
        means.append(image.mean())
    # brightness (+-30) and noise are zero-mean: the average exposure is the gamma's
    assert np.mean(means) == pytest.approx(expected_mean, abs=4)
    re_exposed = np.mean(np.abs(np.array(means) - 128) > 25)  # beyond +-30 * most draws
    assert 0.25 < re_exposed < 0.75


def test_without_a_gamma_range_lighting_draws_as_before():
    """Recipes without gamma_range reproduce their crops: the gamma draw is not even made."""
    image = np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    for seed in range(8):  # with and without the grey and noise branches
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        ds.lighting(image, mask, a)
        # grey, contrast, brightness, noise (and its level and values): the draws before gamma
        b.random(), b.uniform(0.7, 1.3), b.uniform(-30, 30)
        if b.random() < 0.3:
            b.normal(0, b.uniform(2, 8), image.shape)
        assert a.random() == b.random()


def write_class_dataset(root: Path, count: int = 6, size: int = 64) -> None:
    """Like ``write_crack_dataset`` with class masks: 0 background, 1 crack (a dark line),
    2 seam (a mid-grey straight band)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image = rng.integers(*BRIGHT, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        row = int(rng.integers(8, size - 12))
        image[row:row + 4], mask[row:row + 4] = 110, 2
        end = (size - 1, int(rng.integers(size // 2, 3 * size // 4)))
        cv2.line(image, (0, int(rng.integers(size // 4, size // 2))), end, DARK, 2)
        cv2.line(mask, (0, int(rng.integers(size // 4, size // 2))), end, 1, 2)
        cv2.imwrite(str(root / "images" / f"img{i:02d}.png"), image)
        cv2.imwrite(str(root / "masks" / f"img{i:02d}.png"), mask)


def test_class_masks_load_as_class_indices_and_crack_masks_as_the_crack_class(dataset,
                                                                              tmp_path):
    write_class_dataset(tmp_path / "classes")
    sample = ds.samples(tmp_path / "classes", ["img00"])[0]
    _, mask = ds.load_pair(sample, num_classes=3)
    assert set(np.unique(mask)) == {0, 1, 2}
    # a real crack set's 0/255 mask in a multi-class recipe: background and the crack class
    crack_sample = ds.samples(dataset, ["crack00"])[0]
    _, binary = ds.load_pair(crack_sample)
    _, as_classes = ds.load_pair(crack_sample, num_classes=3, crack_label=2)
    np.testing.assert_array_equal(as_classes, binary * 2)
    # any other labelling beyond the recipe's classes is refused, not trained on
    other = cv2.imread(str(crack_sample.mask_path), cv2.IMREAD_GRAYSCALE)
    other[0, 0] = 7
    cv2.imwrite(str(crack_sample.mask_path), other)
    with pytest.raises(ds.DatasetError, match="has value 255, but the recipe lists 3 classes"):
        ds.load_pair(crack_sample, num_classes=3)


def test_multiclass_training_run_scores_the_crack_class(tmp_path):
    write_class_dataset(tmp_path / "classes")
    cfg = TrainConfig(data=[tmp_path / "classes"], out=tmp_path / "run", epochs=1, crop=64,
                      batch_size=2, val_fraction=0.25, classes=["background", "crack", "seam"],
                      loss="ce_dice", class_weights="median_frequency", max_rotation=180)
    result = train_main(cfg)
    assert result["epochs"] == 1 and 0.0 <= result["best_val_f1"] <= 1.0
    checkpoint = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert checkpoint["model"]["head.weight"].shape[0] == 3
    model = build_model("mobilenet_aspp", num_classes=3)
    model.load_state_dict(checkpoint["model"])
    image, _ = ds.load_pair(ds.samples(tmp_path / "classes", ["img00"])[0], num_classes=3)
    prob = train_predict(model, image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32,
                         crack_channel=1)
    assert prob.shape == (64, 64) and 0.0 <= prob.min() and prob.max() <= 1.0


def test_binary_only_losses_are_refused_for_a_multiclass_run(tmp_path):
    write_class_dataset(tmp_path / "classes")
    cfg = TrainConfig(data=[tmp_path / "classes"], out=tmp_path / "run", epochs=1,
                      classes=["background", "crack", "seam"], loss="bce_dice")
    with pytest.raises(ValueError, match="use 'ce_dice'"):
        train_main(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(64, 96), (37, 53)])
def test_model_returns_logits_of_the_input_size(height, width):
    model = build_model("mobilenet_aspp").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width))
    assert logits.shape == (1, 1, height, width)


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ValueError, match="mobilenet_aspp"):
        build_model("resnet_unet")
    assert "resnet_unet" not in MODELS


# torchvision's mobilenet_v2 (features.0 .. features.17), shapes as published
TORCHVISION_SHAPES = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.weight": (32,),
    "features.1.conv.0.0.weight": (32, 1, 3, 3),  # t=1: depthwise first, no expansion
    "features.1.conv.1.weight": (16, 32, 1, 1),
    "features.1.conv.2.running_mean": (16,),
    "features.2.conv.0.0.weight": (96, 16, 1, 1),  # expansion 6 x 16
    "features.2.conv.1.0.weight": (96, 1, 3, 3),
    "features.2.conv.2.weight": (24, 96, 1, 1),
    "features.7.conv.0.0.weight": (192, 32, 1, 1),
    "features.14.conv.2.weight": (160, 576, 1, 1),
    "features.17.conv.0.0.weight": (960, 160, 1, 1),
    "features.17.conv.2.weight": (320, 960, 1, 1),
    "features.17.conv.3.running_var": (320,),
}


def test_encoder_parameters_are_named_and_shaped_as_torchvision():
    state = MobileNetV2Encoder().state_dict()
    for name, shape in TORCHVISION_SHAPES.items():
        assert name in state, name
        assert tuple(state[name].shape) == shape, name
    assert not any(name.startswith("features.18") for name in state)
    # torchvision's mobilenet_v2 has 3,504,872 parameters; without features.18 (320->1280 conv
    # + batch norm: 412,160) and the classifier (1,281,000) that leaves 1,811,712
    assert sum(p.numel() for p in MobileNetV2Encoder().parameters()) == 1_811_712


def test_encoder_maps_channels_and_output_stride():
    encoder = MobileNetV2Encoder(output_stride=16).eval()
    assert encoder.out_channels == [16, 24, 32, 96, 320]
    assert encoder.output_stride == 16
    with torch.no_grad():
        maps = encoder(torch.randn(1, 3, 64, 96))
    assert [m.shape[1] for m in maps] == encoder.out_channels
    assert [(m.shape[2], m.shape[3]) for m in maps] == [
        (32, 48), (16, 24), (8, 12), (4, 6), (4, 6)]  # strides 2, 4, 8, 16, 16 (dilated)


# --- losses ---------------------------------------------------------------------------------

def test_dice_loss_of_perfect_and_inverted_predictions():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:8, :] = 1.0
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    assert dice_loss(-perfect, target).item() == pytest.approx(1.0, abs=0.01)
    assert get_loss("dice") is dice_loss


def test_unknown_loss_lists_the_known_names():
    with pytest.raises(ValueError, match="bce_dice"):
        get_loss("focal")


# --- training runs --------------------------------------------------------------------------

def test_train_writes_checkpoints_and_resumes_with_more_epochs(dataset, tmp_path):
    out = tmp_path / "run"
    result = train_main(tiny_config(dataset, out, epochs=2))
    assert result["epochs"] == 2
    for name in ("best.pt", "last.pt", "history.json", "config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["crop"] == 64
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(checkpoint)
    assert checkpoint["epoch"] == 2
    assert TrainConfig(**checkpoint["config"]) == tiny_config(dataset, out, epochs=2)
    build_model("mobilenet_aspp").load_state_dict(checkpoint["model"])  # loads strictly
    first_two = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in first_two] == [1, 2]

    result = train_main(tiny_config(dataset, out, epochs=3), resume=out / "last.pt")
    history = json.loads((out / "history.json").read_text())
    assert result["epochs"] == 3 and len(history) == 3
    assert history[:2] == first_two and history[2]["epoch"] == 3
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 3


def test_moving_average_of_the_weights_is_validated_kept_as_best_and_resumed(tmp_path):
    """With ema_decay, best.pt holds the averaged weights (what was validated), last.pt the
    trained weights and the average, and --resume carries the average on step by step."""
    write_crack_dataset(tmp_path / "cracks", count=12)  # 7 training images: 3 steps an epoch
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cracks", out, epochs=1).model_copy(update={"ema_decay": 0.9})
    assert train_main(cfg)["ema"] is True
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    steps = int(last["ema"]["n_averaged"])
    assert steps >= 2  # one update per optimizer step
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    assert averaged.keys() == best["model"].keys() == last["model"].keys()
    for name, value in best["model"].items():
        assert torch.equal(value, averaged[name]), name  # best.pt (epoch 1) is the average
    weights = [k for k, v in averaged.items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.equal(averaged[k], last["model"][k]) for k in weights)
    build_model("mobilenet_aspp").load_state_dict(best["model"])  # exports like any checkpoint

    cfg2 = cfg.model_copy(update={"epochs": 2})
    train_main(cfg2, resume=out / "last.pt")
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert int(resumed["ema"]["n_averaged"]) == 2 * steps


def test_ema_decay_must_lie_between_0_and_1(dataset, tmp_path):
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            TrainConfig(data=[dataset], out=tmp_path, ema_decay=decay)


@pytest.mark.parametrize("select_by", ["ods", "balanced_ods"])
def test_best_checkpoint_is_the_epoch_with_the_best_swept_score(tmp_path, select_by):
    """Selected by ODS or balanced ODS, every epoch is scored over the threshold sweep, per
    validation folder too; best.pt is the first epoch with the highest score, and with
    balanced_ods the default threshold is the balanced one."""
    folders = [tmp_path / "lines", tmp_path / "other_lines"]
    for seed, folder in enumerate(folders):
        write_crack_dataset(folder, count=8, seed=seed)
    out = tmp_path / "run"
    cfg = TrainConfig(data=folders, out=out, epochs=3, crop=64, batch_size=2,
                      val_fraction=0.25, seed=0, select_by=select_by)
    result = train_main(cfg)
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and result["select_by"] == select_by
    key = {"ods": "val_ods", "balanced_ods": "val_balanced_ods"}[select_by]
    for h in history:
        assert h["val_score"] == h[key]
        assert set(h["val_sets_f1"]) == {"lines", "other_lines"}
        # at one threshold the mean of the folders' F1 is the balanced F1 there
        if select_by == "balanced_ods":
            assert np.mean(list(h["val_sets_f1"].values())) == pytest.approx(h["val_score"])
    scores = [h["val_score"] for h in history]
    best_epoch = history[scores.index(max(scores))]["epoch"]
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert best["epoch"] == result["best_epoch"] == best_epoch
    assert result["best_val_score"] == max(scores)
    report = json.loads((out / "val_report.json").read_text())
    assert report["epoch"] == best_epoch and set(report["sets"]) == {"lines", "other_lines"}
    assert report[select_by] == pytest.approx(max(scores))  # the same model scored again
    assert 0.05 <= report["default_threshold"] <= 0.95
    assert result["default_threshold"] == report["default_threshold"]


def test_the_default_threshold_is_chosen_on_validation_and_exported(tiny_model):
    out, result = tiny_model.checkpoint.parent, tiny_model.result
    report = json.loads((out / "val_report.json").read_text())
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    # the sweep's best threshold is stored with the checkpoint and reported
    assert best["metrics"]["val"]["ods_threshold"] == report["ods_threshold"]
    assert result["val_ods_threshold"] == report["ods_threshold"]
    assert report["ods"] >= report["f1"] - 1e-9  # the best of the sweep beats the fixed 0.5
    # the default is the best interior threshold: never 'everything' (0) or 'nothing' (1)
    assert 0.05 <= report["default_threshold"] <= 0.95
    metadata = {p.key: p.value for p in onnx.load(str(tiny_model.model)).metadata_props}
    assert float(metadata["crackscan.threshold"]) == report["default_threshold"]


@pytest.mark.slow
def test_crackscan_train_command(dataset, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mobilenet_aspp", "crop": 64, "batch_size": 2,
                                      "epochs": 5, "num_threads": 1}))
    out = tmp_path / "cli_run"
    done = crackscan("train", "--config", recipe, "--data", dataset, "--epochs", 1,
                     "--out", out, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["epochs"] == 1  # --epochs overrides the recipe's 5
    assert Path(result["out"]) == out and (out / "best.pt").is_file()
