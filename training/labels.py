"""Annotations in the formats annotation tools exchange, and back into a dataset folder.

Masks leave crackscan as pre-labels (``crackscan select``) and come back corrected
(``crackscan labels import``) in two formats:

- **COCO**: one JSON file with ``images``, ``annotations`` and ``categories``; each annotation is
  one class of one image as run-length encoding (``iscrowd: 1``, the counts compressed as
  pycocotools writes them), which keeps every pixel, and CVAT, Label Studio and pycocotools read.
  Annotations drawn as polygons (``iscrowd: 0``, as tools export what a person drew) are read
  too; they are filled the way pycocotools rasterises them.
- **LabelMe**: one JSON per image (``imagePath``, ``imageHeight``, ``imageWidth``, ``shapes``);
  a class is written as polygons (the outer contours of its regions; a hole in a region is
  written as a polygon of its own labelled ``<class>:hole``), read back filled, holes cut out.

Category / label names are the model's classes other than background (a binary model: ``crack``).
Imported masks follow the dataset-folder rules of :mod:`training.data`: binary (0 / 255) when the
only class is ``crack``, otherwise class indices with ``classes.json`` beside them.

:func:`import_labels` checks every file before it writes anything, names each malformed or
mismatched one in one :class:`LabelsError` line, and writes into a temporary folder that it moves
into place at the end, so nothing is ever half-written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.data import CLASSES_FILE, IMAGE_SUFFIXES, DatasetError

HOLE = ":hole"  # a LabelMe polygon label suffix: a hole cut out of that class's region
BACKGROUND = "background"


class LabelsError(DatasetError):
    """An annotation file that cannot be imported; the message names the file and the fault."""


# --- masks to and from shapes -----------------------------------------------------------------

def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """A boolean HxW mask as COCO compressed RLE (``{"size": [H, W], "counts": str}``)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    from pycocotools import mask as coco_mask

    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as some tools write it
        rle = coco_mask.frPyObjects(rle, height, width)
    else:
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return coco_mask.decode(rle).astype(bool)


def polygons_decode(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (flat x, y lists) filled as pycocotools fills them."""
    from pycocotools import mask as coco_mask

    rles = coco_mask.frPyObjects(polygons, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def mask_polygons(mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The outer contours and the holes of a boolean mask, as Nx2 arrays of pixel centres."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_NONE)
    outer, holes = [], []
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0] if contours else [],
                                          strict=True):
        (holes if parent >= 0 else outer).append(contour.reshape(-1, 2))
    return outer, holes


def fill_polygons(shape: tuple[int, int], outer: Iterable[np.ndarray],
                  holes: Iterable[np.ndarray] = ()) -> np.ndarray:
    """Polygons of pixel centres filled (their boundary pixels included), holes cut out with
    their boundary kept: the inverse of :func:`mask_polygons`."""
    filled = np.zeros(shape, np.uint8)
    for polygon in outer:
        points = np.round(np.asarray(polygon, np.float64)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(filled, [points], 1)
        cv2.polylines(filled, [points], True, 1)
    for polygon in holes:
        points = np.round(np.asarray(polygon, np.float64)).astype(np.int32).reshape(-1, 1, 2)
        inside = np.zeros(shape, np.uint8)
        cv2.fillPoly(inside, [points], 1)
        cv2.polylines(inside, [points], True, 0)  # the hole's boundary is the region's
        filled[inside > 0] = 0
    return filled.astype(bool)


# --- writing ----------------------------------------------------------------------------------

def coco_document(items: list[tuple[str, np.ndarray]], classes: list[str]) -> dict[str, Any]:
    """A COCO document of class-index masks: ``items`` are (image file name, HxW mask of class
    indices into ``classes``, 0 = background); one RLE annotation per class present."""
    categories = [{"id": i, "name": name} for i, name in enumerate(classes) if i > 0]
    images, annotations = [], []
    for image_id, (file_name, mask) in enumerate(items, start=1):
        height, width = mask.shape
        images.append({"id": image_id, "file_name": file_name, "height": height,
                       "width": width})
        for category in categories:
            region = mask == category["id"]
            if not region.any():
                continue
            ys, xs = np.nonzero(region)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": category["id"], "iscrowd": 1,
                "segmentation": rle_encode(region), "area": int(region.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                         int(ys.max() - ys.min() + 1)]})
    return {"info": {"description": "crackscan pre-labels"}, "images": images,
            "annotations": annotations, "categories": categories}


def labelme_document(image_name: str, mask: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """A LabelMe document of one class-index mask: each class's regions as polygons, holes as
    ``<class>:hole`` polygons."""
    height, width = mask.shape
    shapes = []
    for index, name in enumerate(classes):
        if index == 0 or not (mask == index).any():
            continue
        outer, holes = mask_polygons(mask == index)
        for label, polygons in ((name, outer), (name + HOLE, holes)):
            # a region of one or two pixels is a contour of as many points: repeated to the
            # three a polygon needs (it fills back to the same pixels)
            shapes += [{"label": label, "points": np.resize(polygon, (max(3, len(polygon)), 2))
                        .astype(float).tolist(), "group_id": None, "shape_type": "polygon",
                        "flags": {}} for polygon in polygons]
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_name,
            "imageData": None, "imageHeight": height, "imageWidth": width}


# --- reading ----------------------------------------------------------------------------------

def _fail(path: Path, message: str) -> LabelsError:
    return LabelsError(f"{path}: {message}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not a readable JSON file ({exc})") from None


def _image_size(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise _fail(path, "not a readable image")
    return image.shape[:2]


def _class_index(path: Path, name: Any, classes: list[str]) -> int:
    if not isinstance(name, str) or name not in classes[1:]:
        raise _fail(path, f"label {str(name)[:40]!r} is not one of the classes "
                          f"{', '.join(classes[1:])}")
    return classes.index(name)


def read_coco(path: Path, classes: list[str]) -> list[tuple[Path, np.ndarray]]:
    """(image path, class-index mask) of every image of a COCO file; images are found by
    ``file_name`` relative to the file's folder (or its ``images/`` folder)."""
    doc = _read_json(path)
    if not (isinstance(doc, dict) and all(isinstance(doc.get(k), list)
                                          for k in ("images", "annotations", "categories"))):
        raise _fail(path, "a COCO file has lists 'images', 'annotations' and 'categories'")
    categories = {}
    for category in doc["categories"]:
        if not (isinstance(category, dict) and isinstance(category.get("id"), int)):
            raise _fail(path, f"bad category {str(category)[:60]}")
        categories[category["id"]] = _class_index(path, category.get("name"), classes)
    images: dict[int, tuple[Path, np.ndarray]] = {}
    for image in doc["images"]:
        if not (isinstance(image, dict) and isinstance(image.get("id"), int)
                and isinstance(image.get("file_name"), str)):
            raise _fail(path, f"bad image entry {str(image)[:60]}")
        found = _find_image(path.parent, image["file_name"])
        if found is None:
            raise _fail(path, f"image {image['file_name']!r} not found beside it")
        height, width = _image_size(found)
        if (image.get("height"), image.get("width")) not in ((height, width), (None, None)):
            raise _fail(path, f"image {image['file_name']!r} is {width} x {height}, the file "
                              f"says {image.get('width')} x {image.get('height')}")
        if image["id"] in images:
            raise _fail(path, f"image id {image['id']} appears twice")
        images[image["id"]] = (found, np.zeros((height, width), np.uint8))
    for annotation in doc["annotations"]:
        if not isinstance(annotation, dict) or annotation.get("image_id") not in images:
            raise _fail(path, f"annotation {str(annotation)[:60]} names no image of the file")
        if annotation.get("category_id") not in categories:
            raise _fail(path, f"annotation {annotation.get('id')} names no category of the file")
        found, mask = images[annotation["image_id"]]
        height, width = mask.shape
        segmentation = annotation.get("segmentation")
        try:
            if isinstance(segmentation, dict):
                if list(segmentation.get("size", [])) != [height, width]:
                    raise ValueError(f"its RLE is {segmentation.get('size')}, the image "
                                     f"{[height, width]}")
                region = rle_decode(segmentation, height, width)
            elif isinstance(segmentation, list) and segmentation and all(
                    isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
                region = polygons_decode(segmentation, height, width)
            else:
                raise ValueError("its segmentation is neither RLE nor polygons of 3+ points")
        except (ValueError, TypeError, KeyError) as exc:
            raise _fail(path, f"annotation {annotation.get('id')}: {exc}") from None
        mask[region] = categories[annotation["category_id"]]
    return list(images.values())


def read_labelme(path: Path, classes: list[str]) -> tuple[Path, np.ndarray]:
    """(image path, class-index mask) of one LabelMe file; its image is ``imagePath`` relative to
    the file's folder."""
    doc = _read_json(path)
    if not (isinstance(doc, dict) and isinstance(doc.get("shapes"), list)
            and isinstance(doc.get("imagePath"), str)):
        raise _fail(path, "a LabelMe file has 'imagePath' and a list 'shapes'")
    found = _find_image(path.parent, doc["imagePath"])
    if found is None:
        raise _fail(path, f"image {doc['imagePath']!r} not found beside it")
    height, width = _image_size(found)
    if (doc.get("imageHeight"), doc.get("imageWidth")) not in ((height, width), (None, None)):
        raise _fail(path, f"image {doc['imagePath']!r} is {width} x {height}, the file says "
                          f"{doc.get('imageWidth')} x {doc.get('imageHeight')}")
    outer: dict[int, list[np.ndarray]] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for number, shape in enumerate(doc["shapes"], start=1):
        if not isinstance(shape, dict):
            raise _fail(path, f"shape {number} is not an object")
        if shape.get("shape_type", "polygon") != "polygon":
            raise _fail(path, f"shape {number} is a {shape.get('shape_type')!r}; only polygons "
                              "are imported")
        points = shape.get("points")
        if not (isinstance(points, list) and len(points) >= 3 and all(
                isinstance(p, list) and len(p) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
                for p in points)):
            raise _fail(path, f"shape {number} needs 3 or more [x, y] points")
        label = shape.get("label")
        hole = isinstance(label, str) and label.endswith(HOLE)
        index = _class_index(path, label[:-len(HOLE)] if hole else label, classes)
        (holes if hole else outer).setdefault(index, []).append(np.asarray(points, np.float64))
    mask = np.zeros((height, width), np.uint8)
    for index in sorted(outer):
        mask[fill_polygons((height, width), outer[index], holes.get(index, []))] = index
    return found, mask


def _find_image(folder: Path, name: str) -> Path | None:
    """``name`` (no absolute paths, no way out of ``folder``) in ``folder`` or its images/."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    for candidate in (folder / relative, folder / "images" / relative.name):
        if candidate.is_file() and candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    return None


# --- import into a dataset folder -------------------------------------------------------------

def read_annotations(source: Path, classes: list[str]) -> list[tuple[Path, np.ndarray]]:
    """Every (image, class-index mask) of a COCO file, or of a folder of LabelMe files."""
    source = Path(source)
    if source.is_file():
        return read_coco(source, classes)
    if not source.is_dir():
        raise LabelsError(f"{source}: no such COCO file or LabelMe folder")
    files = sorted(p for p in source.glob("*.json"))
    if not files:
        raise LabelsError(f"{source}: no LabelMe .json files in it")
    return [read_labelme(path, classes) for path in files]


def import_labels(source: Path, out: Path, classes: list[str] | None = None,
                  val_share: float = 0.0) -> dict[str, Any]:
    """Write the annotations of ``source`` into a new dataset folder ``out``: ``images/`` (the
    annotated images, copied), ``masks/<id>.png`` (binary 0 / 255 when the only class is
    ``crack``, else class indices with ``classes.json``), ``train.txt`` (and ``val.txt`` with
    ``val_share`` of the ids). ``classes`` defaults to [background, crack]. Every file is read
    and checked first; a bad one raises LabelsError naming it and nothing is written."""
    classes = list(classes or [BACKGROUND, "crack"])
    if classes[0] != BACKGROUND or len(set(classes)) != len(classes):
        raise LabelsError(f"classes must start with {BACKGROUND!r} and be distinct, got {classes}")
    out = Path(out)
    if out.exists():
        raise LabelsError(f"{out} exists: labels are imported into a new dataset folder")
    items = read_annotations(source, classes)
    ids = [path.stem for path, _ in items]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise LabelsError(f"{source}: image name {twice[0]!r} appears twice")
    binary = classes == [BACKGROUND, "crack"]
    staging = out.with_name(f".{out.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "images").mkdir(parents=True)
        (staging / "masks").mkdir()
        for path, mask in items:
            shutil.copy(path, staging / "images" / path.name)
            written = (mask > 0).astype(np.uint8) * 255 if binary else mask
            if not cv2.imwrite(str(staging / "masks" / f"{path.stem}.png"), written):
                raise LabelsError(f"cannot write the mask of {path.name} under {staging}")
        if not binary:
            (staging / CLASSES_FILE).write_text(json.dumps(classes) + "\n")
        rng = np.random.default_rng(0)
        order = list(rng.permutation(len(ids)))
        val = sorted(ids[i] for i in order[:round(val_share * len(ids))])
        train = sorted(set(ids) - set(val))
        (staging / "train.txt").write_text("".join(f"{i}\n" for i in train))
        if val:
            (staging / "val.txt").write_text("".join(f"{i}\n" for i in val))
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    pixels = {name: int(sum((mask == i).sum() for _, mask in items))
              for i, name in enumerate(classes) if i > 0}
    return {"out": str(out), "images": len(items), "train": len(train), "val": len(val),
            "classes": classes, "labelled_pixels": pixels}
