"""``crackscan select``: the frames of a drive whose labels would teach the model most, written
with the model's masks as pre-labels for an annotation tool.

Two passes over the source (a video, an image folder, a recording, or a stored run's source):

1. **Score** every ``stride``-th frame with the model: its *uncertainty*, the binary entropy of
   the crack probability summed over the crack-probable pixels (p >= ``REGION_P``) per 1,000
   pixels of the frame (a frame the model is sure of -- clean lining, or a bold crack -- scores
   low; faint, ambiguous lines score high); a small *appearance* vector (the frame and its
   probability map shrunk to 8 x 8); its chainage.
2. **Choose** ``budget`` frames. ``active``: greedily the most uncertain frame left, skipping
   frames within ``min_gap_m`` of a chosen one along the tunnel (the chainage span over twice the
   budget) and frames whose appearance is within ``ALIKE`` of a chosen one's, relaxing both when
   too few frames remain; frames that saw cracks an inspector rejected (a stored run, `serve`'s
   review) come first. ``random``: a uniform draw (the baseline to compare against).
3. **Write** ``DIR/images/<id>.png``, the pre-labels as ``DIR/annotations.json`` (COCO, RLE:
   every pixel) and one LabelMe file per image beside it (``DIR/images/<id>.json``, polygons),
   and ``DIR/selection.json`` (each chosen frame's camera, sequence number, chainage, score).
   The pre-label of a pixel is crack where p >= the model's threshold, else the lining class the
   model gives it (background for a binary model).

``crackscan labels import DIR/annotations.json`` (or ``DIR/images``) brings the corrected
annotations back (:mod:`training.labels`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from acquisition.service import position_model
from acquisition.sources import open_source
from crackscan.config import PipelineConfig
from crackscan.errors import UserError
from inference.segmenter import Segmenter, split_map
from training.labels import BACKGROUND, coco_document, labelme_document

log = logging.getLogger(__name__)

STRATEGIES = ("active", "random")
REGION_P = 0.1  # pixels at least this likely crack are where the model's doubt is counted
ALIKE = 0.05  # appearance vectors closer than this (RMS, 0..1 scale) are the same view
THUMB = 8  # appearance: frame and probability map shrunk to THUMB x THUMB


@dataclass
class Candidate:
    camera: str
    seq: int
    chainage_m: float
    uncertainty: float
    rejected: bool = False  # an inspector rejected a crack this frame saw


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def score_frame(probability: np.ndarray) -> float:
    """Uncertainty of one frame: entropy (bits) over its crack-probable pixels per 1,000 px."""
    region = probability >= REGION_P
    return float(_entropy(probability[region]).sum() * 1000.0 / probability.size)


def appearance(image: np.ndarray, probability: np.ndarray) -> np.ndarray:
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA) / 255.0
    prob = cv2.resize(probability, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    return np.concatenate([small.ravel(), prob.ravel()]).astype(np.float32)


def prelabel(seg_map: np.ndarray, segmenter: Segmenter, threshold: float) -> tuple[
        np.ndarray, list[str]]:
    """The class-index mask a frame is pre-labelled with, and the class names (background
    first): crack where p >= threshold, else the lining class of the model's argmax."""
    probability, classes = split_map(seg_map)
    names = [BACKGROUND, "crack"] if len(segmenter.info.classes) == 1 else list(
        segmenter.info.classes)
    mask = np.zeros(probability.shape, np.uint8)
    if classes is not None:
        mask[:] = classes.astype(np.uint8)
        mask[mask == names.index("crack")] = 0  # crack is the threshold's call, not argmax's
    mask[probability >= threshold] = names.index("crack")
    return mask, names


def choose(candidates: list[Candidate], features: np.ndarray, budget: int, strategy: str,
           seed: int = 0) -> list[int]:
    """Indices of the chosen candidates (see the module doc), in the order chosen."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    n = len(candidates)
    if budget >= n:
        return list(range(n))
    if strategy == "random":
        return sorted(np.random.default_rng(seed).choice(n, budget, replace=False).tolist())
    chainage = np.array([c.chainage_m for c in candidates])
    span = float(chainage.max() - chainage.min()) if n else 0.0
    order = sorted(range(n), key=lambda i: (not candidates[i].rejected,
                                            -candidates[i].uncertainty, i))
    chosen: list[int] = []
    gap, alike = span / (2 * budget), ALIKE
    while len(chosen) < budget:
        for i in order:
            if len(chosen) == budget:
                break
            if i in chosen:
                continue
            if chosen and (np.min(np.abs(chainage[chosen] - chainage[i])) < gap
                           or np.min(np.sqrt(np.mean((features[chosen] - features[i]) ** 2,
                                                     axis=1))) < alike):
                continue
            chosen.append(i)
        gap, alike = gap / 2, alike / 2  # too few far and unlike enough: relax, go again
        if gap < 1e-9 and alike < 1e-9:
            chosen += [i for i in order if i not in chosen][:budget - len(chosen)]
    return chosen


def _frames(source: str, config: PipelineConfig, stride: int):
    """(camera, seq, chainage, image) of every stride-th good frame of the source."""
    position = position_model(config)
    with open_source(source, config) as frames:
        for item in frames:
            if item.image is None or item.index % stride:
                continue
            chainage = (item.chainage_m if item.chainage_m is not None
                        else position.chainage_at(item.offset_s))
            yield item.camera_id or config.camera.id, item.index, float(chainage), item.image


def select_frames(source: str, out: Path, budget: int, segmenter: Segmenter,
                  config: PipelineConfig, strategy: str = "active", stride: int = 1,
                  seed: int = 0, rejected: set[tuple[str, int]] | None = None
                  ) -> dict[str, Any]:
    """Score, choose and write (the module doc); returns a summary. ``rejected``: (camera,
    seq) of frames that saw a crack an inspector rejected. ``out`` must not exist."""
    if budget < 1 or stride < 1:
        raise UserError("--budget and --stride must be at least 1")
    if out.exists():
        raise UserError(f"{out} exists: select writes into a new folder")
    threshold = config.inference.threshold or segmenter.info.threshold
    rejected = rejected or set()
    candidates: list[Candidate] = []
    features = []
    for camera, seq, chainage, image in tqdm(_frames(source, config, stride), desc="scoring",
                                             unit=" frames", disable=None):
        probability, _ = split_map(segmenter.segment([image])[0])
        candidates.append(Candidate(camera, seq, chainage, round(score_frame(probability), 4),
                                    (camera, seq) in rejected))
        features.append(appearance(image, probability))
    if not candidates:
        raise UserError(f"{source}: no readable frame to select from")
    picked = choose(candidates, np.asarray(features), budget, strategy, seed)
    wanted = {(candidates[i].camera, candidates[i].seq): i for i in picked}
    staging = out.with_name(f".{out.name}.selecting")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    items, names = [], [BACKGROUND, "crack"]
    try:
        for camera, seq, _, image in _frames(source, config, stride):
            if (camera, seq) not in wanted:
                continue
            mask, names = prelabel(segmenter.segment([image])[0], segmenter, threshold)
            frame_id = f"{camera}_{seq:06d}"
            cv2.imwrite(str(staging / "images" / f"{frame_id}.png"), image)
            (staging / "images" / f"{frame_id}.json").write_text(json.dumps(
                labelme_document(f"{frame_id}.png", mask, names)))
            items.append((f"{frame_id}.png", mask))
        (staging / "annotations.json").write_text(json.dumps(coco_document(items, names)))
        chosen = [{**asdict(candidates[i]), "id": f"{candidates[i].camera}_"
                   f"{candidates[i].seq:06d}"} for i in picked]
        chosen.sort(key=lambda c: (c["chainage_m"], c["camera"], c["seq"]))
        summary = {"source": source, "strategy": strategy, "budget": budget,
                   "frames_scored": len(candidates), "selected": len(items),
                   "model": segmenter.info.label, "threshold": threshold, "classes": names,
                   "stride": stride, "seed": seed, "frames": chosen}
        (staging / "selection.json").write_text(json.dumps(summary, indent=2) + "\n")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    spread = [c["chainage_m"] for c in chosen]
    log.info("selected %d of %d frames (%s), chainage %.1f..%.1f m", len(items),
             len(candidates), strategy, min(spread), max(spread))
    return {**summary, "out": str(out)} | {"frames": chosen if len(chosen) <= 50 else
                                           f"{len(chosen)} (see selection.json)"}

