"""Physical cracks: the per-frame detections of one crack merged in tunnel coordinates.

A crack longer than a frame, or crossed by a frame edge, or seen by two adjacent cameras, is
detected once per frame that shows it. Merging works on the detections' tunnel polylines
(``polyline``: [[chainage_m, arc_mm], ...], plain dicts as :func:`management.store.query_cracks`
returns them), so it needs no camera model and is the same for every rig.

Linking. Each polyline is resampled every ``LINK_STEP_MM``; two detections of *different* frames
are linked when a point of one lies within ``link_mm`` of a point of the other. A physical crack is
a connected group of links (a crack seen by frames 1, 2 and 3 is one even when frames 1 and 3 do
not overlap). Two detections of one frame are never linked directly: inference split them on
purpose; they join only through a detection of another frame that touches both.

Measures of a group of several detections:
- length: the union of the polylines, longest first, each adding only its stretches farther than
  ``stroke_mm / 2`` from what is already counted, so overlapping views of one stretch count once
  and a branch seen by one frame only still counts; plus what the longest detection measured
  beyond its own polyline (its tips, which thinning stops short of, and the corners that
  simplifying the polyline cut); never less than the longest detection alone. (Measured on the
  polylines, not on a raster, so it has no staircase bias: a digital skeleton's steps overstate a
  line at 20 degrees by about 7 %.)
- the polylines drawn ``stroke_mm`` thick on a ``grid_mm`` raster in (chainage, arc) mm and
  thinned give the merged skeleton, for the junction count, centre and polyline;
- widths: the maximum width and its severity are those of the median detection by
  ``width_max_mm`` among the *full views*, the detections at least ``FULL_VIEW_SHARE`` as long as
  the merged crack (each of them saw the widest part, so each measured the same maximum, and
  the largest of several noisy measures of one value is biased upwards: +20 % against +12.5 %
  for the median on a synthetic drive, docs/geometry.md); a crack that no detection saw
  (nearly) whole, such as one longer than a frame, takes the largest over its detections, each
  of which saw a part. ``width_p95_mm`` follows the same rule; the mean width is weighted by
  detection length;
- orientation, type (with junctions of the merged skeleton) and the simplified polyline (the
  skeleton's longest path) come from the merged skeleton, by the functions inference uses.
A group of one detection keeps that detection's measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from crackscan.geometry import (
    SkeletonGraph,
    classify_type,
    count_junctions,
    longest_path,
    principal_axis,
    prune_spurs,
)

LINK_CHUNK_POINTS = 20_000  # points whose neighbours are found at once (bounds the memory)
LINK_MM = 10.0  # two detections closer than this (in different frames) are one crack
LINK_STEP_MM = 2.0  # polylines resampled this finely for linking
GRID_MM = 1.0  # raster of the union
STROKE_MM = 5.0  # polylines drawn this thick: views of one crack a few mm apart fuse
MAX_CELLS = 40_000_000  # a larger union is rasterized on a coarser grid
POLYLINE_EPSILON_MM = 1.0
FULL_VIEW_SHARE = 0.8  # a detection this share of the merged length saw (nearly) all of it


@dataclass
class PhysicalCrack:
    """One physical crack: ``members`` are indices into the detections given to :func:`merge`."""

    members: list[int]
    chainage_m: float
    chainage_start_m: float
    chainage_end_m: float
    arc_mm: float
    arc_start_mm: float
    arc_end_mm: float
    length_mm: float
    width_mean_mm: float
    width_max_mm: float
    width_p95_mm: float
    orientation_deg: float
    type: str
    severity: str
    detections: int
    frames: int
    cameras: list[str]
    seq_first: int
    seq_last: int
    polyline: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        del out["members"]
        return out


def points_mm(detection: dict[str, Any]) -> np.ndarray:
    """The detection's polyline as Nx2 (chainage mm, arc mm); its centre when it has none."""
    line = detection.get("polyline") or [[detection["chainage_m"], detection["arc_mm"]]]
    points = np.asarray(line, np.float64).reshape(-1, 2)
    return np.stack([points[:, 0] * 1000.0, points[:, 1]], axis=1)


def resample(points: np.ndarray, step: float) -> np.ndarray:
    """Points along the polyline at most ``step`` apart, vertices included."""
    out = [points[:1]]
    for a, b in zip(points[:-1], points[1:], strict=True):
        n = max(1, math.ceil(float(np.hypot(*(b - a))) / step))
        t = np.arange(1, n + 1)[:, None] / n
        out.append(a + (b - a) * t)
    return np.concatenate(out)


def _polyline_length(points: np.ndarray) -> float:
    return float(np.hypot(*np.diff(points, axis=0).T).sum()) if len(points) > 1 else 0.0


def link_groups(detections: list[dict[str, Any]], link_mm: float = LINK_MM) -> list[list[int]]:
    """Indices of ``detections`` grouped into physical cracks, each group sorted, groups in order
    of their first member."""
    if not detections:
        return []
    frame_of = {}
    owners, points = [], []
    for i, detection in enumerate(detections):
        frame_of[i] = frame_of.setdefault((detection["camera"], detection["seq"]), len(frame_of))
        sampled = resample(points_mm(detection), LINK_STEP_MM)
        points.append(sampled)
        owners.append(np.full(len(sampled), i))
    owner = np.concatenate(owners)
    frame = np.array([frame_of[i] for i in range(len(detections))])[owner]
    everything = np.concatenate(points)
    tree = cKDTree(everything)
    n = len(detections)
    linked = []
    # the points' neighbours a chunk at a time, reduced at once to pairs of detections: a point
    # has tens of neighbours on its own line, so all point pairs of a long run at once would
    # take gigabytes (300 MB for 4,800 detections)
    for start in range(0, len(everything), LINK_CHUNK_POINTS):
        chunk = cKDTree(everything[start:start + LINK_CHUNK_POINTS])
        near = chunk.sparse_distance_matrix(tree, link_mm, output_type="ndarray")
        i, j = near["i"].astype(np.int64) + start, near["j"].astype(np.int64)
        other_frame = frame[i] != frame[j]
        linked.append(np.unique(owner[i[other_frame]] * n + owner[j[other_frame]]))
    codes = np.unique(np.concatenate(linked))
    return components(np.stack([codes // n, codes % n], axis=1), n)


def components(pairs: np.ndarray, n: int) -> list[list[int]]:
    """The connected components of ``n`` nodes joined by ``pairs`` (K x 2 node indices): each
    component's nodes sorted, components in order of their first node."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return sorted(groups.values(), key=lambda members: members[0])


def union_length(lines: list[np.ndarray], cover_mm: float) -> float:
    """Length (mm) of the union of polylines (mm): longest first, each segment counted unless
    its midpoint lies within ``cover_mm`` of a polyline counted before. Where a line leaves (or
    enters) what was counted, the ``cover_mm`` it ran inside that band is counted back: the
    stretch beyond a counted line's end, or a branch's root, is crack length too."""
    order = sorted(lines, key=_polyline_length, reverse=True)
    counted: list[np.ndarray] = []
    total = 0.0
    for line in order:
        points = resample(line, GRID_MM)
        if len(points) < 2:
            continue
        segment = np.hypot(*np.diff(points, axis=0).T)
        if counted:
            mids = (points[1:] + points[:-1]) / 2
            new = cKDTree(np.concatenate(counted)).query(mids)[0] > cover_mm
            if new.any():
                total += float(segment[new].sum()) + cover_mm * int(np.count_nonzero(
                    new[1:] != new[:-1]))
        else:
            total += float(segment.sum())
        counted.append(points)
    return total


def _union_skeleton(lines: list[np.ndarray], grid_mm: float, stroke_mm: float
                    ) -> tuple[SkeletonGraph, np.ndarray, float]:
    """The thinned union of the polylines (mm) drawn ``stroke_mm`` thick: (graph, origin mm,
    grid mm actually used)."""
    allpts = np.concatenate(lines)
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    grid = grid_mm
    while np.prod((hi - lo) / grid + 1) > MAX_CELLS:
        grid *= 2
    thickness = max(1, round(stroke_mm / grid)) | 1  # odd: centred on the line
    pad = thickness + 2
    origin = lo - pad * grid
    size = np.ceil((hi - origin) / grid).astype(int) + pad + 1
    canvas = np.zeros((int(size[1]), int(size[0])), np.uint8)
    shift = 4  # sub-cell vertex positions
    for line in lines:
        pts = np.round((line - origin) / grid * (1 << shift)).astype(np.int32)
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, 1, thickness, cv2.LINE_8, shift)
        if len(line) == 1:
            cv2.circle(canvas, tuple(int(v) for v in pts[0]), (thickness // 2) << shift, 1, -1,
                       cv2.LINE_8, shift)
    skeleton = skeletonize(canvas.astype(bool))
    graph = SkeletonGraph.from_skeleton(skeleton)
    graph = prune_spurs(graph, np.full(len(graph), float(thickness)))
    return graph, origin, grid


def measure_group(detections: list[dict[str, Any]], members: list[int],
                  grid_mm: float = GRID_MM, stroke_mm: float = STROKE_MM) -> PhysicalCrack:
    group = [detections[i] for i in members]
    frames = {(d["camera"], d["seq"]) for d in group}
    longest = max(group, key=lambda d: d["length_mm"])
    total_length = sum(d["length_mm"] for d in group)
    common = dict(
        members=list(members),
        chainage_start_m=min(d["chainage_start_m"] for d in group),
        chainage_end_m=max(d["chainage_end_m"] for d in group),
        width_mean_mm=round(sum(d["width_mean_mm"] * d["length_mm"] for d in group)
                            / total_length if total_length > 0 else
                            float(np.mean([d["width_mean_mm"] for d in group])), 4),
        detections=len(group), frames=len(frames),
        cameras=sorted({d["camera"] for d in group}),
        seq_first=min(d["seq"] for d in group), seq_last=max(d["seq"] for d in group),
    )
    lines = [points_mm(d) for d in group]
    if len(group) == 1:
        only, line = group[0], lines[0]
        common.update(width_max_mm=only["width_max_mm"], width_p95_mm=only["width_p95_mm"],
                      severity=only["severity"])
        return PhysicalCrack(
            chainage_m=only["chainage_m"], arc_mm=only["arc_mm"],
            arc_start_mm=round(float(line[:, 1].min()), 2),
            arc_end_mm=round(float(line[:, 1].max()), 2),
            length_mm=only["length_mm"], orientation_deg=only["orientation_deg"],
            type=only["type"], polyline=[list(p) for p in only.get("polyline") or []],
            **common)

    graph, origin, grid = _union_skeleton(lines, grid_mm, stroke_mm)
    skeleton_mm = np.stack([graph.x, graph.y], axis=1) * grid + origin
    beyond = max(0.0, longest["length_mm"] - _polyline_length(points_mm(longest)))
    length = max(union_length(lines, stroke_mm / 2) + beyond, longest["length_mm"])
    common.update(_widths(group, length))
    orientation, eigen_ratio = principal_axis(skeleton_mm)
    orientation = round(orientation, 2) % 180.0
    path = longest_path(graph).astype(np.int32).reshape(-1, 1, 2)
    path = cv2.approxPolyDP(path, POLYLINE_EPSILON_MM / grid, False).reshape(-1, 2)
    path_mm = path * grid + origin
    centre = skeleton_mm.mean(axis=0)
    return PhysicalCrack(
        chainage_m=round(float(centre[0]) / 1000.0, 4), arc_mm=round(float(centre[1]), 2),
        arc_start_mm=round(float(min(line[:, 1].min() for line in lines)), 2),
        arc_end_mm=round(float(max(line[:, 1].max() for line in lines)), 2),
        length_mm=round(length, 3), orientation_deg=orientation,
        type=classify_type(orientation, count_junctions(graph), eigen_ratio),
        polyline=[[round(float(c) / 1000.0, 4), round(float(a), 2)] for c, a in path_mm],
        **common)


def _widths(group: list[dict[str, Any]], length_mm: float) -> dict[str, Any]:
    """width_max_mm, width_p95_mm and severity of a merged crack ``length_mm`` long from its
    detections (the rule: module docstring)."""
    full = [d for d in group if d["length_mm"] >= FULL_VIEW_SHARE * length_mm]
    if full:
        by_width = sorted(full, key=lambda d: d["width_max_mm"])
        median = by_width[(len(by_width) - 1) // 2]  # an actual detection: the lower median
        p95 = sorted(d["width_p95_mm"] for d in full)[(len(full) - 1) // 2]
        return dict(width_max_mm=median["width_max_mm"], width_p95_mm=p95,
                    severity=median["severity"])
    widest = max(group, key=lambda d: d["width_max_mm"])
    return dict(width_max_mm=widest["width_max_mm"],
                width_p95_mm=max(d["width_p95_mm"] for d in group), severity=widest["severity"])


def merge(detections: list[dict[str, Any]], link_mm: float = LINK_MM, grid_mm: float = GRID_MM,
          stroke_mm: float = STROKE_MM) -> list[PhysicalCrack]:
    """The physical cracks of one run's detections, ordered by chainage, then arc."""
    if link_mm <= 0 or grid_mm <= 0 or stroke_mm <= 0:
        raise ValueError("link_mm, grid_mm and stroke_mm must be > 0")
    cracks = [measure_group(detections, members, grid_mm, stroke_mm)
              for members in link_groups(detections, link_mm)]
    return sorted(cracks, key=lambda c: (c.chainage_start_m, c.arc_start_mm, c.members[0]))
