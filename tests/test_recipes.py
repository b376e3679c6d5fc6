"""The research recipes of ``configs/train/`` and the training features they switch on: class
balancing, multi-class losses, arbitrary-angle rotation and elastic deformation, progressive
resizing, layer groups with a frozen first group, knowledge distillation, loss curves, mixed
precision and a real two-process ``torchrun`` run on CPU (Gloo).

Training runs use the 64-px synthetic datasets of ``test_training`` and one or a few epochs, so
the file runs in well under a minute on a small CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from skimage.morphology import skeletonize
from support import (
    DARK,
    crackscan,
    crackscan_concurrently,
    tiny_config,
    torch_threads,
    write_crack_dataset,
)

from training import data as ds
from training import loaders
from training import loop as train
from training.config import TrainConfig, load_config
from training.losses import (
    ce_dice_loss,
    class_frequencies,
    dice_loss,
    get_loss,
    median_frequency_weights,
    weighted_ce_loss,
)
from training.models import MODELS, build_model, param_groups

RECIPES = sorted((Path(__file__).parents[1] / "configs" / "train").glob("*.yaml"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes") / "cracks"
    write_crack_dataset(root)
    return root


def run_config(dataset: Path, out: Path, **fields) -> TrainConfig:
    """``tiny_config`` (one epoch unless told) with ``fields`` changed, validated again."""
    base = tiny_config(dataset, out, epochs=fields.pop("epochs", 1))
    return TrainConfig(**{**base.model_dump(), **fields})


def record_epochs(monkeypatch, record) -> None:
    """Wrap ``train.train_one_epoch``: ``record(epoch, phase, model, loader, optimizer)`` runs
    before ("start") and after ("end") each epoch of ``train.main``."""
    original = train.train_one_epoch

    def wrapped(model, loader, optimizer, *args, **kwargs):
        epoch = args[2]
        record(epoch, "start", model, loader, optimizer)
        result = original(model, loader, optimizer, *args, **kwargs)
        record(epoch, "end", model, loader, optimizer)
        return result

    monkeypatch.setattr(train, "train_one_epoch", wrapped)


# --- recipes ----------------------------------------------------------------------------------

def test_the_research_recipes_are_all_there():
    names = {path.stem for path in RECIPES}
    assert {"mobilenet_aspp", "lau2020_unet_resnet34_scse", "unet2015", "segnet",
            "song2019_resnet18_aspp", "song2019_mobilenet_aspp_kd"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_parses_and_names_a_registered_model(recipe):
    raw = yaml.safe_load(recipe.read_text())
    cfg = load_config(recipe)
    assert cfg.model == raw["model"] and cfg.loss == raw["loss"]
    get_loss(cfg.loss, cfg.num_classes,
             [1.0] * max(2, cfg.num_classes) if cfg.class_weights else None)  # a known loss
    if cfg.model not in MODELS:
        pytest.skip(f"model {cfg.model!r} is not in training.models.MODELS yet "
                    f"(registered: {', '.join(sorted(MODELS))})")
    assert train.get_spec(cfg.model) is MODELS[cfg.model]  # built in the tiny-epoch test below


def test_deploy_recipe_is_the_bundled_models():
    cfg = load_config(RECIPES[0].parent / "mobilenet_aspp.yaml")
    assert (cfg.classes, cfg.optimizer, cfg.schedule, cfg.pct_start) == (
        ["crack"], "adamw", "one_cycle", 0.1)
    assert cfg.lr_groups is None and cfg.crop_schedule is None and cfg.teacher is None
    assert (cfg.max_rotation, cfg.scale_range, cfg.sampling) == (180, (0.7, 1.4), "sqrt")
    assert cfg.elastic_sigma == cfg.freeze_first_group_fraction == 0
    assert not cfg.amp and cfg.class_weights is None


def test_lau_recipe_schedules_crops_and_freezing_by_thirds():
    cfg = load_config(RECIPES[0].parent / "lau2020_unet_resnet34_scse.yaml")
    assert cfg.epochs == 30
    crops = [train.crop_for_epoch(cfg, epoch) for epoch in range(1, 31)]
    assert crops == [128] * 10 + [256] * 10 + [320] * 10
    frozen = [train.first_group_frozen(cfg, epoch) for epoch in range(1, 31)]
    assert frozen == [True] * 10 + [False] * 20
    assert cfg.lr_groups[0] == pytest.approx(1 / 9, rel=1e-4)
    assert cfg.lr_groups[1] == pytest.approx(1 / 3, rel=1e-4)


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_trains_one_tiny_epoch(recipe, dataset, tmp_path, teacher_checkpoint):
    """Each recipe as ``crackscan train --config RECIPE --data DIR`` reads it, shrunk to 64-px
    crops (a crop schedule keeps its thirds) and one epoch."""
    cfg = load_config(recipe, data=[dataset], epochs=1, out=tmp_path / recipe.stem)
    if cfg.model not in MODELS:
        pytest.skip(f"model {cfg.model!r} is not in training.models.MODELS yet")
    shrink = {"crop": 64, "batch_size": 2, "val_fraction": 0.25, "num_threads": 1,
              "model_params": {"base_channels": 8} if cfg.model == "unet" else cfg.model_params}
    if cfg.crop_schedule:
        shrink["crop_schedule"] = [[start, 32 + 16 * i]
                                   for i, (start, _) in enumerate(cfg.crop_schedule)]
    if cfg.teacher and cfg.teacher.suffix != ".onnx":  # an ONNX teacher is the binary model
        shrink["teacher"] = teacher_checkpoint
    if cfg.semi != "none":  # a semi-supervised recipe learns from unlabelled images too
        shrink["unlabeled"] = [dataset]
    cfg = TrainConfig(**{**cfg.model_dump(), **shrink})
    assert train.main(cfg)["epochs"] == 1
    checkpoint = torch.load(cfg.out / "last.pt", map_location="cpu", weights_only=False)
    build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params).load_state_dict(
        checkpoint["model"])


@pytest.mark.parametrize("bad,match", [
    ({"crop_schedule": [[0.2, 128], [0.5, 256]]}, "start at fraction 0"),
    ({"classes": ["background", "seam"]}, "no 'crack'"),
    ({"class_weights": [1.0, 2.0, 3.0]}, "needs 2 values"),
    ({"optimizer": "lamb"}, "adamw"),
    ({"scale_range": [1.5, 0.7]}, "0 < low <= high"),
    ({"scale_range": [0, 1.0]}, "0 < low <= high"),
    ({"sampling": "uniform"}, "balanced"),
    ({"gamma_range": [2.0, 0.5]}, "gamma_range must be"),
    ({"contrast_range": [0.0, 1.5]}, "contrast_range must be"),
    ({"select_by": "iou"}, "balanced_ods"),
])
def test_bad_recipe_values_are_refused_with_a_reason(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


# --- losses and class balancing ------------------------------------------------------------

def test_median_frequency_weights_by_hand():
    # every image 90 % background, 10 % crack: freq 0.9 / 0.1, median 0.5
    mask = np.zeros((10, 10), np.uint8)
    mask[:1] = 1
    weights = median_frequency_weights([mask, mask.copy()], 2)
    assert weights == pytest.approx([0.5 / 0.9, 0.5 / 0.1])
    # a crack-free image counts for background only (Eigen & Fergus: pixels of the images in
    # which the class appears): background 190 / 200, crack 10 / 100
    empty = np.zeros((10, 10), np.uint8)
    assert class_frequencies([mask, empty], 2) == pytest.approx([0.95, 0.1])
    median = (0.95 + 0.1) / 2
    assert median_frequency_weights([mask, empty], 2) == pytest.approx([median / 0.95,
                                                                         median / 0.1])
    # three classes, class 2 nowhere: weight 0, the median taken over the present ones
    assert median_frequency_weights([mask], 3) == pytest.approx([0.5 / 0.9, 0.5 / 0.1, 0.0])


def test_median_frequency_run_logs_the_weights_of_its_training_masks(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="training")
    cfg = run_config(dataset, tmp_path / "segnet", loss="weighted_ce",
                     class_weights="median_frequency")
    train.main(cfg)
    train_ids, _ = ds.train_val_split(dataset, cfg.val_fraction, cfg.seed)
    masks = [ds.load_pair(s)[1] for s in ds.samples(dataset, train_ids)]
    background, crack = median_frequency_weights(masks, 2)
    assert crack > 10 * background  # thin lines: the crack class weighs far more
    logged = [r.getMessage() for r in caplog.records if "median-frequency" in r.getMessage()]
    assert logged == [f"median-frequency class weights over {len(masks)} training masks: "
                      f"background {background:.4g}, crack {crack:.4g}"]


def test_weighted_cross_entropy_by_hand_on_a_2x2_example():
    # two classes, logits per pixel (class 0, class 1); targets 0 1 / 1 0; weights 1 and 3
    logits = torch.tensor([[[[2.0, 0.0], [1.0, -1.0]],
                            [[0.0, 1.0], [3.0, 0.5]]]])
    target = torch.tensor([[[0, 1], [1, 0]]])
    weights = torch.tensor([1.0, 3.0])

    def nll(z_true: float, z_other: float) -> float:
        return -math.log(math.exp(z_true) / (math.exp(z_true) + math.exp(z_other)))

    by_hand = (1 * nll(2.0, 0.0) + 3 * nll(1.0, 0.0) + 3 * nll(3.0, 1.0) + 1 * nll(-1.0, 0.5)) / 8
    assert weighted_ce_loss(logits, target, weights).item() == pytest.approx(by_hand, rel=1e-6)
    # one sigmoid channel z is the two-class softmax of (0, z): the same number
    binary = (logits[:, 1:] - logits[:, :1])
    assert weighted_ce_loss(binary, target[:, None].float(), weights).item() == pytest.approx(
        by_hand, rel=1e-6)
    assert get_loss("weighted_ce", 2, [1.0, 3.0])(logits, target).item() == pytest.approx(
        by_hand, rel=1e-6)


def test_multiclass_dice_and_ce_dice_of_perfect_predictions_are_about_zero():
    target = torch.zeros(2, 16, 16, dtype=torch.int64)
    target[:, 4:8] = 1
    target[0, 10:] = 2  # class 2 absent from the second image: still a perfect score
    perfect = 30.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    assert ce_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    wrong = perfect.roll(1, dims=1)  # every pixel predicted as the next class
    assert dice_loss(wrong, target).item() > 0.5
    assert get_loss("ce_dice", 3)(wrong, target).item() > 1.0


def test_loss_names_are_checked_against_the_number_of_classes():
    with pytest.raises(ValueError, match="known losses: bce, bce_dice, ce_crack_dice, ce_dice"):
        get_loss("lovasz")
    with pytest.raises(ValueError, match="use 'ce_dice'"):
        get_loss("bce_dice", num_classes=4)
    with pytest.raises(ValueError, match="takes no class weights"):
        get_loss("dice", class_weights=[1.0, 5.0])


# --- augmentation ---------------------------------------------------------------------------

def line_pair(size: int = 96, thickness: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Grey image with a dark thick line and its 0/1 mask."""
    image = np.full((size, size, 3), 200, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    start, end = (10, size // 3), (size - 10, 2 * size // 3)
    cv2.line(image, start, end, (DARK, DARK, DARK), thickness)
    cv2.line(mask, start, end, 1, thickness)
    return image, mask


def assert_aligned(image: np.ndarray, mask: np.ndarray) -> None:
    """Dark pixels coincide with the mask, up to the line's one-pixel rim, where a bilinear
    image and a nearest-neighbour mask may round either way."""
    dark = image.mean(axis=2) < (DARK + 200) / 2
    on_mask = mask.astype(bool)
    disagree = dark ^ on_mask
    rim = (cv2.dilate(mask, np.ones((3, 3), np.uint8)) != cv2.erode(mask, np.ones((3, 3),
                                                                               np.uint8)))
    assert on_mask.sum() > 100, "the line left the picture"
    assert not (disagree & ~rim).any(), "image and mask disagree away from the line's rim"
    assert disagree.sum() <= 0.1 * on_mask.sum()


@pytest.mark.parametrize("angle", [17.0, 123.5, -71.25, 271.0])
def test_rotation_by_any_angle_keeps_image_and_mask_aligned(angle):
    image, mask = line_pair()
    turned_image, turned_mask = ds.rotate(image, mask, angle)
    assert turned_image.shape == image.shape and turned_mask.shape == mask.shape
    assert_aligned(turned_image, turned_mask)
    assert not np.array_equal(turned_mask, mask)  # it did turn
    # and the mask turned with the image, not by some other angle
    assert (ds.rotate(image, mask, angle + 20)[1] ^ turned_mask).sum() > 0.3 * mask.sum()


def test_rotation_samples_masks_by_nearest_neighbour():
    labels = np.random.default_rng(0).choice(np.array([0, 3, 7], np.uint8), (48, 48))
    labels = cv2.resize(labels, (96, 96), interpolation=cv2.INTER_NEAREST)  # 2x2 label blocks
    for angle in (33.0, 145.0):
        _, turned = ds.rotate(np.zeros((96, 96, 3), np.uint8), labels, angle)
        assert set(np.unique(turned)) == {0, 3, 7}  # bilinear would invent 1, 2, 5 ...


def test_augment_with_any_angle_rotation_keeps_pairs_aligned():
    image, mask = line_pair(size=128)
    for seed in range(6):
        aug_image, aug_mask = ds.augment(image, mask, 64, np.random.default_rng(seed),
                                         max_rotation=180)
        assert aug_image.shape == (64, 64, 3) and aug_mask.shape == (64, 64)
        assert set(np.unique(aug_mask)) <= {0, 1}
        dark = aug_image.mean(axis=2) < 110  # lighting keeps the line under ~100
        rim = cv2.dilate(aug_mask, np.ones((3, 3), np.uint8)) != cv2.erode(
            aug_mask, np.ones((3, 3), np.uint8))
        assert not ((dark ^ aug_mask.astype(bool)) & ~rim).any(), f"misaligned, seed {seed}"


def test_elastic_deformation_keeps_alignment():
    image, mask = line_pair()
    for seed in range(4):
        warped_image, warped_mask = ds.elastic(image, mask, sigma=10, grid=3,
                                               rng=np.random.default_rng(seed))
        assert_aligned(warped_image, warped_mask)
        assert not np.array_equal(warped_mask, mask)
        assert set(np.unique(warped_mask)) <= {0, 1}


def test_elastic_field_is_smooth_and_of_the_asked_size():
    for seed in range(5):
        for field in ds.elastic_field((128, 128), sigma=10, grid=3,
                                      rng=np.random.default_rng(seed)):
            assert field.shape == (128, 128)
            step = max(np.abs(np.diff(field, axis=0)).max(), np.abs(np.diff(field, axis=1)).max())
            assert np.ptp(field) > 5  # displacements of several pixels ...
            assert step < 0.05 * np.ptp(field) and step < 2.5  # ... that change slowly


@pytest.mark.parametrize("scale", [0.6, 0.8, 1.0, 1.5])
def test_zoom_keeps_pairs_aligned_and_scales_the_crack(scale):
    image, mask = line_pair(size=160, thickness=4)
    widths = []
    for seed in range(4):
        aug_image, aug_mask = ds.augment(image, mask, 64, np.random.default_rng(seed),
                                         scale_range=(scale, scale))
        assert aug_image.shape == (64, 64, 3) and aug_mask.shape == (64, 64)
        assert set(np.unique(aug_mask)) <= {0, 1}
        dark = aug_image.mean(axis=2) < 110
        rim = cv2.dilate(aug_mask, np.ones((3, 3), np.uint8)) != cv2.erode(
            aug_mask, np.ones((3, 3), np.uint8))
        assert not ((dark ^ aug_mask.astype(bool)) & ~rim).any(), f"misaligned, seed {seed}"
        # mean width of the line: its area over its length (skeleton pixels, along a line that
        # runs within 30 degrees of an axis, whichever way flips and turns left it)
        widths.append(aug_mask.sum() / max(skeletonize(aug_mask.astype(bool)).sum(), 1))
    # the 4 px line (~4.5 px wide per skeleton pixel at its slope) comes out ``scale`` x as wide
    assert np.median(widths) == pytest.approx(4 * 1.118 * scale, rel=0.25)


def test_shrinking_keeps_a_one_pixel_crack():
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 50] = 1
    for size in (50, 60, 80):
        _, small = ds.rescale(np.zeros((100, 100, 3), np.uint8), mask, size)
        assert small.shape == (size, size) and small.sum() == size  # still one pixel wide


def test_zoom_samples_class_masks_by_nearest_neighbour():
    labels = np.random.default_rng(0).choice(np.array([0, 2, 4], np.uint8), (24, 24))
    labels = cv2.resize(labels, (96, 96), interpolation=cv2.INTER_NEAREST)
    for size in (48, 150):
        _, scaled = ds.rescale(np.zeros((96, 96, 3), np.uint8), labels, size)
        assert set(np.unique(scaled)) == {0, 2, 4}


def test_sampling_weights_by_hand():
    names = ["big"] * 100 + ["small"] * 25
    for rule, share in (("proportional", 100 / 125), ("sqrt", 10 / 15), ("balanced", 0.5)):
        weights = loaders.sampling_weights(names, rule)
        assert sum(weights[:100]) / sum(weights) == pytest.approx(share)
        assert len(set(weights[:100])) == len(set(weights[100:])) == 1  # equal within a set


def test_weighted_sampler_draws_by_dataset_and_shards_one_draw_across_processes():
    names = ["big"] * 300 + ["small"] * 30
    weights = loaders.sampling_weights(names, "balanced")
    draws = []
    for epoch in range(5):
        sampler = loaders.WeightedShardSampler(weights, 0, 1, seed=3)
        sampler.set_epoch(epoch)
        draws += list(sampler)
    small = sum(index >= 300 for index in draws) / len(draws)
    assert 0.44 < small < 0.56  # balanced, where plain shuffling gives 30 / 330 = 0.09
    shards = [loaders.WeightedShardSampler(weights, rank, 2, seed=3) for rank in (0, 1)]
    whole = loaders.WeightedShardSampler(weights, 0, 1, seed=3)
    for sampler in (*shards, whole):
        sampler.set_epoch(7)
    first, second = list(shards[0]), list(shards[1])
    assert len(first) == len(shards[0]) == 165 and len(second) == len(shards[1]) == 165
    merged = [None] * 330
    merged[0::2], merged[1::2] = first, second
    assert merged == list(whole)  # one draw, split between the processes
    again = loaders.WeightedShardSampler(weights, 0, 1, seed=3)
    again.set_epoch(8)
    assert list(again) != list(whole)  # a new draw every epoch


def test_epoch_images_cycles_few_images_into_a_fixed_epoch():
    """``epoch_images``: an epoch of that many crops, however few the images, each image as
    often as the others (+-1); the loader's steps and a weighted draw follow it."""
    half = np.zeros((40, 40), np.uint8)
    half[:, :20] = 1
    pairs = [(np.full((40, 40, 3), 128, np.uint8), mask)  # told apart by their masks' crack share
             for mask in (np.zeros((40, 40), np.uint8), np.ones((40, 40), np.uint8), half)]
    cfg = TrainConfig(epoch_images=10, batch_size=2, crop=32)
    crops = loaders.CrackCrops(pairs, 32, (0.0,) * 3, (1.0,) * 3, seed=0, cfg=cfg)
    loader, _ = loaders.make_loader(cfg, crops, 0, 1, torch.device("cpu"))
    assert len(crops) == 10 and len(loader) == 5
    shares = [float(crops[i][1].mean()) for i in range(len(crops))]
    seen = [0 if share == 0 else 1 if share == 1 else 2 for share in shares]
    assert sorted(seen.count(v) for v in (0, 1, 2)) == [3, 3, 4]
    with pytest.raises(IndexError):
        crops[10]
    weighted = TrainConfig(epoch_images=10, batch_size=2, crop=32, sampling="balanced")
    crops = loaders.CrackCrops(pairs, 32, (0.0,) * 3, (1.0,) * 3, seed=0, cfg=weighted)
    loader, sampler = loaders.make_loader(weighted, crops, 0, 1, torch.device("cpu"),
                                          ["a", "a", "b"])
    assert len(sampler) == 10 and len(list(sampler)) == 10 and len(loader) == 5
    assert len(loaders.CrackCrops(pairs, 32, (0.0,) * 3, (1.0,) * 3, seed=0)) == 3  # default


def test_elastic_deformation_with_sigma_zero_is_the_identity():
    image, mask = line_pair()
    image = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    same_image, same_mask = ds.elastic(image, mask, sigma=0, grid=3, rng=np.random.default_rng(1))
    assert np.array_equal(same_image, image) and np.array_equal(same_mask, mask)


# --- training features ----------------------------------------------------------------------

def test_progressive_resizing_changes_the_batch_size_at_the_scheduled_epochs(
        dataset, tmp_path, monkeypatch):
    seen: dict[int, set] = {}

    def record(epoch, phase, model, loader, optimizer):
        if phase == "start":
            seen[epoch] = {tuple(images.shape[-2:]) for images, _ in loader}

    record_epochs(monkeypatch, record)
    cfg = run_config(dataset, tmp_path / "progressive", epochs=3,
                     crop_schedule=[[0, 32], [0.33, 48], [0.66, 64]])
    train.main(cfg)
    assert seen == {1: {(32, 32)}, 2: {(48, 48)}, 3: {(64, 64)}}
    history = json.loads((cfg.out / "history.json").read_text())
    assert [h["crop"] for h in history] == [32, 48, 64]


def test_first_layer_group_is_frozen_for_the_first_third_at_its_learning_rate_ratio(
        dataset, tmp_path, monkeypatch):
    snapshots: dict[tuple[int, str], list[torch.Tensor]] = {}
    lrs: list[list[float]] = []

    def record(epoch, phase, model, loader, optimizer):
        groups = param_groups(model)
        snapshots[epoch, phase] = [torch.cat([p.detach().flatten() for p in g]).clone()
                                   for g in groups]
        lrs.append([g["lr"] for g in optimizer.param_groups])

    record_epochs(monkeypatch, record)
    cfg = run_config(dataset, tmp_path / "groups", epochs=3, lr_groups=[1 / 9, 1 / 3, 1.0],
                     freeze_first_group_fraction=0.33)
    train.main(cfg)

    def changed(epoch: int, group: int) -> bool:
        return not torch.equal(snapshots[epoch, "start"][group], snapshots[epoch, "end"][group])

    assert not changed(1, 0), "first group moved while frozen"
    assert changed(1, 1) and changed(1, 2)
    assert changed(2, 0) and changed(3, 0), "first group never unfrozen"
    for early, late, head in lrs:
        assert early / head == pytest.approx(1 / 9) and late / head == pytest.approx(1 / 3)
    history = json.loads((cfg.out / "history.json").read_text())
    assert [h["first_group_frozen"] for h in history] == [True, False, False]


def test_encoder_weights_are_loaded_and_a_frozen_first_group_keeps_them(
        dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="training")
    torch.manual_seed(123)  # another initialisation than the run's own (seed 0)
    encoder_state = build_model("mobilenet_aspp").encoder.state_dict()
    torch.save(encoder_state, tmp_path / "imagenet_encoder.pt")
    cfg = run_config(dataset, tmp_path / "pretrained", encoder_weights=tmp_path /
                     "imagenet_encoder.pt", freeze_first_group_fraction=1.0)
    train.main(cfg)
    trained = build_model("mobilenet_aspp")
    trained.load_state_dict(torch.load(cfg.out / "last.pt", weights_only=False)["model"])
    early = {n: p for n, p in trained.encoder.named_parameters()
             if int(n.split(".")[1]) < 7}  # features.0-6: MobileNetV2's first group
    assert {id(p) for p in early.values()} == {id(p) for p in param_groups(trained)[0]}
    for name, param in early.items():
        assert torch.equal(param, encoder_state[name]), name
    total = len(encoder_state)
    assert any(f"encoder weights: {total} of {total} encoder tensors" in r.getMessage()
               for r in caplog.records)


@pytest.fixture(scope="module")
def teacher_checkpoint(dataset, tmp_path_factory) -> Path:
    """A trained teacher of another architecture than the student's: half-width MobileNet."""
    out = tmp_path_factory.mktemp("teacher")
    with torch_threads(1):
        train.main(run_config(dataset, out, model_params={"width_mult": 0.5}))
    return out / "last.pt"


def test_teacher_is_built_from_its_own_config_frozen_and_in_eval_mode(teacher_checkpoint):
    cfg = TrainConfig(teacher=teacher_checkpoint)
    teacher = train.load_teacher(teacher_checkpoint, cfg, torch.device("cpu"))
    teacher.train()  # a training loop's model.train() must not reach it
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    reference = build_model("mobilenet_aspp", width_mult=0.5).eval()
    reference.load_state_dict(torch.load(teacher_checkpoint, weights_only=False)["model"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher(x), reference(x), atol=1e-6)
    with pytest.raises(ValueError, match="same classes"):
        train.load_teacher(teacher_checkpoint,
                           TrainConfig(classes=["background", "crack"]), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.load_teacher(teacher_checkpoint.parent / "nope.pt", cfg, torch.device("cpu"))


def test_distillation_term_changes_the_loss(dataset, tmp_path, teacher_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="training")
    histories, weights = {}, {}
    for alpha in (0.0, 0.7):
        cfg = run_config(dataset, tmp_path / f"alpha{alpha}", epochs=2,
                         teacher=teacher_checkpoint, distill_alpha=alpha, distill_temperature=2.0)
        train.main(cfg)
        histories[alpha] = json.loads((cfg.out / "history.json").read_text())
        weights[alpha] = torch.load(cfg.out / "last.pt", weights_only=False)["model"]
    assert sum("teacher: mobilenet_aspp from" in r.getMessage() for r in caplog.records) == 2
    for without, with_kd in zip(histories[0.0], histories[0.7], strict=True):
        assert without["loss_distill"] == 0 and without["loss"] == without["loss_supervised"]
        assert with_kd["loss_distill"] > 0
        assert with_kd["loss"] == pytest.approx(0.3 * with_kd["loss_supervised"]
                                                + 0.7 * with_kd["loss_distill"], rel=1e-6)
    # the same seed: the same first batches and supervised loss; the teacher's term then steers
    # the updates elsewhere
    first = histories[0.0][0]["loss_supervised"], histories[0.7][0]["loss_supervised"]
    assert first[0] == pytest.approx(first[1], rel=1e-6)
    later = histories[0.0][1]["loss_supervised"], histories[0.7][1]["loss_supervised"]
    assert later[0] != pytest.approx(later[1], rel=1e-4)
    assert not torch.equal(weights[0.0]["head.weight"], weights[0.7]["head.weight"])


@pytest.mark.slow
def test_crackscan_train_takes_a_teacher_flag(dataset, tmp_path, teacher_checkpoint):
    from crackscan.cli import build_parser

    try:
        build_parser().parse_args(["train", "--config", "x.yaml", "--teacher", "t.pt"])
    except SystemExit:
        pytest.skip("crackscan/cli.py's train command has no --teacher flag yet")
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mobilenet_aspp", "crop": 64, "batch_size": 2,
                                      "epochs": 1, "num_threads": 1, "distill_alpha": 0.5}))
    out = tmp_path / "kd"
    done = crackscan("train", "--config", recipe, "--data", dataset, "--out", out,
                     "--teacher", teacher_checkpoint, check=False)
    assert done.returncode == 0, done.stderr
    config = torch.load(out / "last.pt", weights_only=False)["config"]
    assert Path(config["teacher"]) == teacher_checkpoint


def test_curves_png_is_written_after_every_epoch(dataset, tmp_path, monkeypatch):
    sizes = []

    def record(epoch, phase, model, loader, optimizer):
        if phase == "start" and epoch > 1:  # the previous epoch's curves are on disk by now
            sizes.append(image_size(tmp_path / "curves" / "curves.png"))

    def image_size(path: Path) -> tuple[int, int]:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None
        return image.shape[:2]

    record_epochs(monkeypatch, record)
    train.main(run_config(dataset, tmp_path / "curves", epochs=2))
    sizes.append(image_size(tmp_path / "curves" / "curves.png"))
    assert len(sizes) == 2 and all(h > 100 and w > 200 for h, w in sizes)


def test_amp_bfloat16_run_on_cpu_finishes_and_its_checkpoint_loads(dataset, tmp_path):
    model = build_model("mobilenet_aspp").eval()
    with torch.no_grad(), train.autocast(torch.device("cpu"), amp=True):
        assert model(torch.randn(1, 3, 64, 64)).dtype == torch.bfloat16
    cfg = run_config(dataset, tmp_path / "amp", amp=True, device="cpu")
    result = train.main(cfg)
    assert result["epochs"] == 1
    checkpoint = torch.load(cfg.out / "last.pt", map_location="cpu", weights_only=False)
    assert TrainConfig(**checkpoint["config"]).amp
    loaded = build_model("mobilenet_aspp")
    loaded.load_state_dict(checkpoint["model"])  # strictly, float32 weights
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in loaded.parameters())
    assert math.isfinite(checkpoint["metrics"]["history"][0]["loss"])


@pytest.mark.slow
def test_torchrun_ddp_on_cpu_writes_one_checkpoint_that_loads(dataset, tmp_path):
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mobilenet_aspp", "crop": 64, "batch_size": 2,
                                      "epochs": 1, "num_threads": 1, "val_fraction": 0.25,
                                      "device": "cpu"}))
    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         "--nproc_per_node=2", "-m", "crackscan", "train", "--config", str(recipe),
         "--data", str(dataset), "--out", str(out)],
        capture_output=True, text=True, timeout=40,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    # only rank 0 logs (and so saves): one line per epoch, one group announcement
    assert done.stderr.count("distributed training: 2 processes (gloo)") == 1, done.stderr
    assert done.stderr.count("epoch 1/1") == 1, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "config.json", "curves.png", "history.json", "last.pt", "val_report.json"]
    assert done.stdout.count('"best_val_f1"') == 1, done.stdout  # one result, from rank 0
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1
    build_model("mobilenet_aspp").load_state_dict(checkpoint["model"])  # no "module." prefix
    assert json.loads(done.stdout)["epochs"] == 1


# --- same-budget comparison -----------------------------------------------------------------

@pytest.mark.slow
def test_train_compare_trains_scores_and_tabulates_teacher_then_student(dataset, tmp_path):
    """``crackscan train-compare`` with the Song et al. pair: the distilled student gets the
    teacher this comparison trained, and every row is scored on the carved validation ids by
    the exported ONNX model."""
    out = tmp_path / "compare"
    teacher, student = (RECIPES[0].parent / f"{name}.yaml"
                        for name in ("song2019_resnet18_aspp", "song2019_mobilenet_aspp_kd"))
    done = crackscan("train-compare", "--config", teacher, "--config", student,
                     "--data", dataset, "--epochs", 1, "--crop", 64, "--batch-size", 2,
                     "--threads", 1, "--out", out, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert [r["recipe"] for r in rows] == ["song2019_resnet18_aspp", "song2019_mobilenet_aspp_kd"]
    assert [r["model"] for r in rows] == ["resnet18_aspp", "mobilenet_aspp"]
    held_out = ds.train_val_split(dataset, 0.1, 0)[1]
    for row in rows:
        assert row["epochs"] == 1 and row["crop"] == 64 and row["images"] == len(held_out)
        assert 0 <= row["f1_2px"] <= 1 and 0 <= row["ods_strict"] <= row["ods_2px"] <= 1
        assert row["cpu_ms_512"] > 0 and row["gpu_ms_512_fp16"] is None  # no CUDA here
        assert Path(row["onnx"]).is_file()
    assert rows[0]["params_m"] == pytest.approx(
        sum(p.numel() for p in build_model("resnet18_aspp").parameters()) / 1e6)
    student_cfg = json.loads((out / "song2019_mobilenet_aspp_kd" / "config.json").read_text())
    assert Path(student_cfg["teacher"]) == out / "song2019_resnet18_aspp" / "best.pt"
    table = (out / "compare.md").read_text().splitlines()
    assert len(table) == 4 and "`resnet18_aspp`" in table[2]
    assert json.loads((out / "compare.json").read_text())["rows"] == rows

    # Started again with the same arguments: the rows are kept, nothing is trained again; with
    # the table lost, the finished trainings are scored again without training.
    again = crackscan("train-compare", "--config", teacher, "--config", student,
                      "--data", dataset, "--epochs", 1, "--crop", 64, "--batch-size", 2,
                      "--threads", 1, "--out", out, timeout=300, check=False)
    assert again.returncode == 0 and json.loads(again.stdout)["rows"] == rows
    assert again.stderr.count("compare.json already") == 2
    (out / "compare.json").unlink()
    rescored = crackscan("train-compare", "--config", teacher, "--config", student,
                         "--data", dataset, "--epochs", 1, "--crop", 64, "--batch-size", 2,
                         "--threads", 1, "--out", out, timeout=300, check=False)
    assert rescored.returncode == 0 and rescored.stderr.count("already trained to epoch 1") == 2
    rows = json.loads(rescored.stdout)["rows"]  # the same scores (minutes from the history)
    assert [r["f1_2px"] for r in rows] == [r["f1_2px"] for r in json.loads(again.stdout)["rows"]]

    retimed = crackscan("train-compare", "--retime", "--threads", 1, "--out", out, check=False)
    assert retimed.returncode == 0, retimed.stderr
    again = json.loads(retimed.stdout)["rows"]
    assert [r["cpu_ms_512"] > 0 for r in again] == [True, True]
    assert [{k: v for k, v in r.items() if k != "cpu_ms_512"} for r in again] == [
        {k: v for k, v in r.items() if k != "cpu_ms_512"} for r in rows]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == again and saved["epochs"] == 1


@pytest.mark.slow
def test_train_compare_refuses_a_student_without_its_teacher(dataset, tmp_path):
    recipe = yaml.safe_load((RECIPES[0].parent / "song2019_mobilenet_aspp_kd.yaml").read_text())
    recipe["teacher"] = str(tmp_path / "nowhere" / "best.pt")
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump(recipe))
    done, nothing, missing = crackscan_concurrently(
        ("train-compare", "--config", student, "--data", dataset, "--epochs", 1, "--out",
         tmp_path / "c"),
        ("train-compare", "--retime", "--out", tmp_path / "none"),
        ("train-compare", "--data", dataset, "--out", tmp_path / "c"), check=False)
    assert done.returncode == 2 and "list its recipe before this one" in done.stderr
    assert "Traceback" not in done.stderr
    assert nothing.returncode == 2 and "run the comparison first" in nothing.stderr
    assert missing.returncode == 2 and "needs --config" in missing.stderr


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 20, 1000])
def test_one_cycle_takes_any_number_of_steps(steps):
    """A short run (one epoch of 81 images in batches of 8: 10 steps, a 0.1 warm-up of one
    step) once divided by zero inside OneCycleLR."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = train.build_scheduler(TrainConfig(pct_start=0.1), optimizer, steps)
    rates = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(0 < rate <= 0.01 + 1e-12 for rate in rates)
