"""Annotations out to the formats annotation tools read and back (``crackscan labels import``):
class masks written as COCO (checked with pycocotools, the format's reference reader) and as
LabelMe, read back to the same masks, imported into a dataset folder the trainer reads; every
malformed or mismatched file named, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from support import crackscan

from training.data import folder_classes, load_pair, read_split, samples
from training.labels import (
    LabelsError,
    coco_document,
    import_labels,
    labelme_document,
    read_coco,
    read_labelme,
)

CLASSES = ["background", "crack", "joint", "stain"]


def class_mask(seed: int, shape: tuple[int, int] = (60, 90)) -> np.ndarray:
    """Thin cracks (1-3 px, diagonal too), a straight joint and a stain ring with a hole."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    cv2.line(mask, (int(rng.integers(70, 88)), 0), (int(rng.integers(70, 88)), 59), 2, 2)
    cv2.circle(mask, (30, 40), 12, 3, 4)
    mask[2, 2] = mask[5, 5:7] = 1  # regions of one and two pixels
    for _ in range(3):
        points = np.cumsum(rng.integers(-4, 5, (12, 2)), axis=0) + [40, 20]
        cv2.polylines(mask, [points.astype(np.int32)], False, 1, int(rng.integers(1, 3)))
    return mask


def write_images(folder: Path, count: int) -> list[tuple[str, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        mask = class_mask(i)
        cv2.imwrite(str(folder / f"frame_{i:03d}.png"), np.full((*mask.shape, 3), 100 + i,
                                                                 np.uint8))
        items.append((f"frame_{i:03d}.png", mask))
    return items


def test_coco_round_trip_through_pycocotools_and_import(tmp_path):
    items = write_images(tmp_path / "select", 3)
    coco_path = tmp_path / "select" / "prelabels.json"
    coco_path.write_text(json.dumps(coco_document(items, CLASSES)))
    reference = COCO(str(coco_path))  # the format's reference reader
    assert [c["name"] for c in reference.loadCats(reference.getCatIds())] == CLASSES[1:]
    for image_id, (name, mask) in enumerate(items, start=1):
        assert reference.loadImgs(image_id)[0]["file_name"] == name
        rebuilt = np.zeros_like(mask)
        for annotation in reference.loadAnns(reference.getAnnIds(imgIds=image_id)):
            rebuilt[reference.annToMask(annotation) > 0] = annotation["category_id"]
        assert np.array_equal(rebuilt, mask)
    assert [np.array_equal(m, mask) for (_, m), (_, mask)
            in zip(read_coco(coco_path, CLASSES), items, strict=True)] == [True] * 3
    summary = import_labels(coco_path, tmp_path / "dataset", CLASSES, val_share=0.34)
    assert (summary["images"], summary["train"], summary["val"]) == (3, 2, 1)
    dataset = tmp_path / "dataset"
    assert json.loads((dataset / "classes.json").read_text()) == CLASSES
    assert sorted(read_split(dataset, "train") + read_split(dataset, "val")) == \
        ["frame_000", "frame_001", "frame_002"]
    assert folder_classes(dataset) == tuple(CLASSES)
    for sample, (_, mask) in zip(samples(dataset, ["frame_000", "frame_001", "frame_002"]),
                                 items, strict=True):
        image, loaded = load_pair(sample, num_classes=len(CLASSES))  # as training reads it
        assert image.shape[:2] == mask.shape and np.array_equal(loaded, mask)


def test_labelme_round_trip_keeps_every_pixel_and_holes(tmp_path):
    items = write_images(tmp_path / "select", 4)
    for name, mask in items:
        doc = labelme_document(name, mask, CLASSES)
        (tmp_path / "select" / f"{Path(name).stem}.json").write_text(json.dumps(doc))
        assert any(s["label"] == "stain:hole" for s in doc["shapes"])  # the ring's hole
        _, back = read_labelme(tmp_path / "select" / f"{Path(name).stem}.json", CLASSES)
        assert np.array_equal(back, mask), name
    summary = import_labels(tmp_path / "select", tmp_path / "dataset", CLASSES)
    assert summary["images"] == 4 and summary["labelled_pixels"]["stain"] > 0


def test_a_binary_import_writes_crack_masks_the_trainer_reads(tmp_path):
    items = [(name, (mask == 1).astype(np.uint8)) for name, mask
             in write_images(tmp_path / "select", 2)]
    coco_path = tmp_path / "select" / "prelabels.json"
    coco_path.write_text(json.dumps(coco_document(items, ["background", "crack"])))
    import_labels(coco_path, tmp_path / "dataset", ["background", "crack"])
    stored = cv2.imread(str(tmp_path / "dataset" / "masks" / "frame_000.png"),
                        cv2.IMREAD_UNCHANGED)
    assert set(np.unique(stored)) == {0, 255} and not (tmp_path / "dataset" /
                                                        "classes.json").exists()
    assert np.array_equal(stored > 0, items[0][1] > 0)


def test_polygons_drawn_in_a_tool_are_read(tmp_path):
    write_images(tmp_path, 1)
    doc = {"images": [{"id": 7, "file_name": "frame_000.png", "height": 60, "width": 90}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "iscrowd": 0,
                            "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]}],
           "categories": [{"id": 2, "name": "crack"}]}
    (tmp_path / "drawn.json").write_text(json.dumps(doc))
    [(_, mask)] = read_coco(tmp_path / "drawn.json", ["background", "crack"])
    assert mask[12:19, 11:29].all() and mask.sum() == pytest.approx(20 * 10, rel=0.15)


@pytest.mark.parametrize("fault, match", [
    (lambda d: d.update(images="x"), "lists"),
    (lambda d: d["categories"].append({"id": 9, "name": "graffiti"}), "graffiti"),
    (lambda d: d["images"][0].update(file_name="missing.png"), "not found"),
    (lambda d: d["images"][0].update(file_name="../../etc/passwd"), "not found"),
    (lambda d: d["images"][0].update(width=91), "90 x 60"),
    (lambda d: d["annotations"][0].update(image_id=99), "names no image"),
    (lambda d: d["annotations"][0].update(category_id=99), "no category"),
    (lambda d: d["annotations"][0].update(segmentation={"size": [5, 5], "counts": "0"}), "RLE"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2]]), "neither"),
    (lambda d: d["images"].append(dict(d["images"][0])), "twice"),
])
def test_a_bad_coco_file_is_named_and_nothing_is_written(tmp_path, fault, match):
    items = write_images(tmp_path / "select", 2)
    doc = coco_document(items, CLASSES)
    fault(doc)
    path = tmp_path / "select" / "corrected.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LabelsError, match=match) as error:
        import_labels(path, tmp_path / "dataset", CLASSES)
    assert str(path) in str(error.value)
    assert not (tmp_path / "dataset").exists()
    assert not list(tmp_path.glob(".dataset*"))


def test_bad_labelme_files_and_the_cli(tmp_path):
    items = write_images(tmp_path / "select", 2)
    for name, mask in items:
        (tmp_path / "select" / f"{Path(name).stem}.json").write_text(
            json.dumps(labelme_document(name, mask, CLASSES)))
    bad = tmp_path / "select" / "frame_001.json"
    good = bad.read_text()
    for change, match in ((lambda d: d["shapes"][0].update(shape_type="circle"), "circle"),
                          (lambda d: d["shapes"][0].update(points=[[1, 2]]), "3 or more"),
                          (lambda d: d["shapes"][0].update(label="tree"), "tree"),
                          (lambda d: d.update(imageHeight=10), "the file says")):
        doc = json.loads(good)
        change(doc)
        bad.write_text(json.dumps(doc))
        with pytest.raises(LabelsError, match=match):
            import_labels(tmp_path / "select", tmp_path / "dataset", CLASSES)
        assert not (tmp_path / "dataset").exists()
    bad.write_text("{not json")
    refused = crackscan("labels", "import", tmp_path / "select", "--out", tmp_path / "dataset",
                        "--classes", "crack,joint,stain", check=False)
    assert refused.returncode == 2 and "frame_001.json" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    bad.write_text(good)
    done = crackscan("labels", "import", tmp_path / "select", "--out", tmp_path / "dataset",
                     "--classes", "crack,joint,stain", "--format", "json")
    assert json.loads(done.stdout)["images"] == 2
    again = crackscan("labels", "import", tmp_path / "select", "--out", tmp_path / "dataset",
                      "--classes", "crack", check=False)
    assert again.returncode == 2 and "exists" in again.stderr
