"""Cross profiles of a model's crack detections on labelled images, for
2026-12-06-line-profiles.md: per detection (8-connected component of the thresholded crack
map, at least 40 px, after the pipeline's 3x3 closing) the share of its cross profiles that are
lines (crackscan.geometry.line_share) and what it lies on (a true crack when at least half
of its skeleton is within 2 px of the crack mask; else, on class masks, the majority class
under it).

Run from the repository root:
  .venv/bin/python docs/results/2026-12-06-line-profiles.py [MODEL.onnx] > valley.json
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np

from crackscan.geometry import CLOSING_KERNEL, cross_profiles, line_share, measure_component
from inference.backends import open_segmenter
from training.data import folder_classes, load_image, load_mask, samples, split_ids

DATA = Path("../shared/data")
# runs/lining384: crackscan synth --dataset runs/lining384 --images 900 --size 384
SETS = [("runs/lining384", "val"),
        *[(DATA / name, "carved") for name in ("CFD", "DeepCrack", "CrackTree260", "CrackSC",
                                                "UAV75")],
        (DATA / "TunnelCECI_demo6", None)]
PER_SET = 90  # images per set (the first of the split, by id)
NEAR = np.ones((5, 5), np.uint8)


def detections(segmenter, folder: Path, split: str | None):
    classes = folder_classes(folder)
    for sample in samples(folder, split_ids(folder, split)[:PER_SET]):
        image = load_image(sample.image_path)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if classes:
            truth = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
        else:
            truth = (load_mask(sample.mask_path, image.shape[:2]) > 0).astype(np.uint8)
        near_crack = cv2.dilate((truth == 1).astype(np.uint8), NEAR)
        seg_map = segmenter.segment([cv2.cvtColor(image, cv2.COLOR_RGB2BGR)])[0]
        prob = seg_map[0] if seg_map.ndim == 3 else seg_map
        binary = cv2.morphologyEx((prob >= segmenter.info.threshold).astype(np.uint8),
                                  cv2.MORPH_CLOSE, CLOSING_KERNEL)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        for label in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[label])
            if area < 40:
                continue
            crack = measure_component(labels[y:y + h, x:x + w] == label, (x, y))
            xs, ys = crack.skeleton_xy.astype(int).T
            kind = "crack" if near_crack[ys, xs].mean() >= 0.5 else "other"
            if classes and kind == "other":
                under = cv2.dilate(truth, NEAR)[ys, xs]
                kind = classes[int(np.bincount(under, minlength=len(classes)).argmax())]
            yield {"set": folder.name, "id": sample.id, "kind": kind,
                   "length_px": round(crack.length_px, 1),
                   "share": round(line_share(cross_profiles(grey, crack)), 4)}


def main() -> None:
    segmenter = open_segmenter(Path(sys.argv[1]) if len(sys.argv) > 1 else None, tile=512)
    rows = [row for folder, split in SETS for row in detections(segmenter, Path(folder), split)]
    json.dump(rows, sys.stdout, indent=0)


if __name__ == "__main__":
    main()
