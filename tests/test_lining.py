"""Synthetic lining tiles (``crackscan synth --dataset``): the dataset layout training reads,
class masks that agree with the truth, determinism, and one-line errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from support import crackscan, crackscan_concurrently

from training import data as ds
from training.lining import CLASSES, render_tile, write_lining_dataset

SEED = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 tiles of 128 px, written by the command as a user runs it."""
    out = tmp_path_factory.mktemp("lining") / "set"
    done = crackscan("synth", "--dataset", out, "--images", 12, "--size", 128, "--seed", SEED)
    assert "12 lining tiles" in done.stdout
    return out


@pytest.fixture(scope="module")
def batch():
    """60 tiles of 96 px rendered in memory (no camera effects, so faster)."""
    return [render_tile(SEED, i, 96, photometric=False) for i in range(60)]


def _ids(path):
    return path.read_text().split()


def test_dataset_layout_split_and_truth(dataset):
    ids = [f"lining_{i:06d}" for i in range(12)]
    assert json.loads((dataset / "classes.json").read_text()) == list(CLASSES)
    assert CLASSES[:2] == ("background", "crack") and len(CLASSES) == 9
    train, val = _ids(dataset / "train.txt"), _ids(dataset / "val.txt")
    assert val == ["lining_000009"]
    assert sorted(train + val) == ids and not set(train) & set(val)
    truth = json.loads((dataset / "truth.json").read_text())
    assert [t["id"] for t in truth["tiles"]] == ids
    assert truth["classes"] == list(CLASSES) and truth["size"] == 128
    channels = set()
    for sample_id in ids:
        image = cv2.imread(str(dataset / "images" / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(dataset / "masks" / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape[:2] == (128, 128)
        assert mask.dtype == np.uint8 and mask.shape == (128, 128)
        channels.add(1 if image.ndim == 2 else image.shape[2])
    assert channels == {1, 3}  # some grey tiles, some colour


def test_masks_hold_class_indices_that_training_reads(dataset):
    truth = {t["id"]: t for t in json.loads((dataset / "truth.json").read_text())["tiles"]}
    samples = ds.samples(dataset, ds.read_split(dataset, None))
    assert ds.folder_classes(dataset) == CLASSES
    for sample in samples:
        image, mask = ds.load_pair(sample, num_classes=len(CLASSES))
        assert image.shape == (128, 128, 3)  # grey tiles too
        assert mask.max() < len(CLASSES)
        present = {CLASSES[c] for c in np.unique(mask)} - {"background"}
        drawn = {o["class"] for o in truth[sample.id]["objects"]}
        assert present <= drawn  # no class in the mask that was not drawn
        # a binary recipe or `eval` reads the crack class alone
        _, binary = ds.load_pair(sample)
        assert np.array_equal(binary, (mask == CLASSES.index("crack")).astype(np.uint8))
    with pytest.raises(ds.DatasetError, match="9 classes"):
        ds.load_pair(samples[0], num_classes=5)


def test_binary_datasets_still_read_as_0_255(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[2, :] = 255
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), mask)
    _, loaded = ds.load_pair(ds.samples(tmp_path, ["a"])[0])
    assert loaded.sum() == 8 and loaded.max() == 1


def test_same_seed_same_bytes_and_tiles_do_not_depend_on_the_count(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_lining_dataset(a, images=6, size=96, seed=SEED)
    write_lining_dataset(b, images=6, size=96, seed=SEED)
    write_lining_dataset(c, images=3, size=96, seed=SEED)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * 6 + 4
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for folder in ("images", "masks"):
        for path in (c / folder).iterdir():
            assert path.read_bytes() == (a / folder / path.name).read_bytes()
    truth_a = json.loads((a / "truth.json").read_text())["tiles"]
    assert json.loads((c / "truth.json").read_text())["tiles"] == truth_a[:3]
    other = render_tile(SEED + 1, 0, 96)
    assert not np.array_equal(other.mask, render_tile(SEED, 0, 96).mask)


def test_every_class_appears_in_a_modest_batch(batch):
    seen = set()
    for tile in batch:
        seen |= set(np.unique(tile.mask).tolist())
    assert seen == set(range(len(CLASSES)))
    objects = {o["class"] for tile in batch for o in tile.truth["objects"]}
    assert objects == set(CLASSES) - {"background"}


def test_crack_pixels_agree_with_the_truth(batch):
    """Crack pixels lie on the truth's polylines, and their area is length x width."""
    drawn_px, truth_px, checked = 0, 0.0, 0
    for tile in batch:
        cracks = [o for o in tile.truth["objects"] if o["class"] == "crack"]
        crack = tile.mask == CLASSES.index("crack")
        if not cracks:
            assert not crack.any()
            continue
        if any(o["class"] == "cable" for o in tile.truth["objects"]):
            continue  # a cable in front may hide part of a crack
        checked += 1
        lines = np.full(crack.shape, 255, np.uint8)
        for o in cracks:
            points = np.round(np.array(o["polyline"]) * 16).astype(np.int32)
            cv2.polylines(lines, [points], False, 0, 1, cv2.LINE_8, 4)
        distance = cv2.distanceTransform(lines, cv2.DIST_L2, 5)
        widest = max(max(o["widths_px"]) for o in cracks)
        assert distance[crack].max() <= widest / 2 + 1.5
        for o in cracks:
            points, widths = np.array(o["polyline"]), np.array(o["widths_px"])
            seg = np.hypot(*np.diff(points, axis=0).T)
            truth_px += float((seg * (widths[1:] + widths[:-1]) / 2).sum())
            assert o["length_px"] == pytest.approx(seg.sum(), abs=0.05)
            assert 1.0 <= min(widths) and max(widths) <= 6.0
        drawn_px += int(crack.sum())
    assert checked >= 15
    assert drawn_px == pytest.approx(truth_px, rel=0.1)


def test_camera_effects_never_move_the_mask(batch):
    for index in range(8):
        plain = batch[index]
        photo = render_tile(SEED, index, 96)
        assert np.array_equal(photo.mask, plain.mask)
        assert photo.truth["objects"] == plain.truth["objects"]
        image = photo.image if photo.image.ndim == 3 else photo.image[:, :, None]
        assert np.abs(image.astype(int) - plain.image.astype(int)).mean() > 3


def test_about_a_third_of_the_tiles_hold_no_crack_and_cracks_meet_joints(batch):
    no_crack = [not t.truth["has_crack"] for t in batch]
    assert 0.15 <= np.mean(no_crack) <= 0.45
    near = 0
    for tile in batch:
        crack = (tile.mask == CLASSES.index("crack")).astype(np.uint8)
        other = np.isin(tile.mask, [CLASSES.index("joint"), CLASSES.index("stain")])
        if crack.any() and other.any():
            near += bool((cv2.dilate(crack, np.ones((9, 9), np.uint8)) & other).any())
    assert near >= 8


def test_bad_requests_are_one_line_and_exit_2(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    cases = {
        "--images must be": ("--dataset", tmp_path / "a", "--images", 0),
        "--size must be": ("--dataset", tmp_path / "b", "--images", 2, "--size", 10),
        "not empty": ("--dataset", full, "--images", 2),
        "exactly one of --out and --dataset": ("--out", tmp_path / "v.mp4", "--dataset",
                                               tmp_path / "c", "--images", 2),
        "exactly one of": (),
        "needs --images": ("--dataset", tmp_path / "d"),
        "not for --out": ("--out", tmp_path / "v.mp4", "--images", 2),
    }
    results = crackscan_concurrently(*[("synth", *args) for args in cases.values()],
                                     check=False)
    for expected, result in zip(cases, results, strict=True):
        assert result.returncode == 2, (expected, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, result.stderr)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    assert [p.name for p in full.iterdir()] == ["x"]


# --- hard negatives: lining features pasted onto real crack images --------------------------------

def real_crack_pair() -> tuple[np.ndarray, np.ndarray]:
    """A crack image as the real sets give them: grainy grey surface, one dark wandering crack."""
    rng = np.random.default_rng(5)
    image = np.clip(rng.normal(120, 12, (96, 128, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    xs = np.arange(5, 123)
    ys = (48 + 10 * np.sin(xs / 15)).round().astype(np.int32)
    cv2.polylines(mask, [np.stack([xs, ys], 1).reshape(-1, 1, 2)], False, 1, 3)
    image[mask > 0] = 40
    return image, mask


def test_pasted_features_keep_the_real_crack_and_label_themselves():
    from training.lining import CLASS_INDEX, CLASSES, OPAQUE, paste_distractors

    image, mask = real_crack_pair()
    labelled = 0
    for seed in range(12):
        out, classes = paste_distractors(image, mask, np.random.default_rng(seed), len(CLASSES))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert not np.array_equal(out, image)
        features = (classes > 1)
        labelled += int(features.any())
        hidden = np.isin(classes, [CLASS_INDEX[name] for name in OPAQUE])
        # a crack stays a crack unless a cable or paint covers it
        assert np.all((classes == CLASS_INDEX["crack"]) == ((mask > 0) & ~hidden))
        assert np.all(classes[(mask == 0) & ~features] == 0)
        binary_out, binary = paste_distractors(image, mask, np.random.default_rng(seed))
        assert np.array_equal(binary_out, out)  # the same features for the same draws
        assert np.array_equal(binary, ((mask > 0) & ~hidden).astype(np.uint8))
    assert labelled >= 10  # nearly every paste leaves a labelled feature in the crop


def test_distractor_share_is_a_recipe_setting_used_by_the_loader(monkeypatch):
    import training.lining
    from training.config import TrainConfig
    from training.loaders import CrackCrops

    with pytest.raises(ValueError):
        TrainConfig(distractor_p=1.5)
    pasted = []
    real_paste = training.lining.paste_distractors

    def counting(image, mask, rng, num_classes=1, count=None):
        out, out_mask = real_paste(image, mask, rng, num_classes, count)
        pasted.append(not np.array_equal(out, image))
        return out, out_mask

    monkeypatch.setattr(training.lining, "paste_distractors", counting)
    image, mask = real_crack_pair()
    for share, expected in ((0.0, 0), (1.0, 6)):
        crops = CrackCrops([(image, mask)], 64, (0.5,) * 3, (0.25,) * 3, seed=3,
                           cfg=TrainConfig(distractor_p=share))
        pasted.clear()
        for _ in range(6):
            x, y = crops[0]
            assert tuple(x.shape) == (3, 64, 64) and set(np.unique(y.numpy())) <= {0.0, 1.0}
        assert len(pasted) == expected and all(pasted)
