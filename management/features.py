"""Physical lining features: the per-frame detections of one joint, stain, hole... merged in
tunnel coordinates, and the ring joints among them.

A multi-class model reports per frame the regions of its classes other than background and crack
(:class:`crackscan.wire.FeatureRecord`, stored per frame in ``lining_features``). One feature of
the lining is seen by every frame that shows it: a ring joint crosses each frame of a camera that
looks at it, frames overlap, adjacent cameras see the same stain. Merging works on the
detections' boxes in (chainage mm, arc mm), plain dicts as
:func:`management.store.feature_detections` returns them, so it needs no camera model.

Linking. Two detections of the same ``kind`` are linked when their boxes overlap or the gap
between them is at most ``gap_mm`` along the tunnel and round the ring. A physical feature is a
connected component of the links (as for cracks), so a cable seen by 200 frames is one feature.
Unlike cracks (:mod:`management.merge`), two regions of one frame link too: a joint interrupted by a
cable that crosses it is two regions of one joint.

Measures of a group:
- extent: the union of the boxes (chainage start / end, arc start / end); its centre is the
  centre of that box;
- orientation: that of the longest detection; length: the merged box's extent along that axis,
  never less than the longest detection;
- area: a union estimate (:func:`union_area`), not the sum, which would count twice what
  overlapping frames both see.

Physical features are computed on query, not stored: they are cheap to merge (boxes, not
polylines), there is no per-detection link to keep, and a change of ``gap_mm`` needs no
migration or re-merge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from management.merge import components

GAP_MM = 50.0  # boxes of one kind this close (along the tunnel and round the ring) are one feature
AREA_GRID_MM = 10.0  # cell of the raster of the union-area estimate ...
AREA_MAX_CELLS = 4_000_000  # ... coarser for a group so large that it would need more cells
JOINT_KIND = "joint"  # the class name of joints between lining segments
RING_TOLERANCE_DEG = 30.0  # a joint within this of 90 degrees runs round the ring ...
RING_ASPECT = 3.0  # ... as does one whose arc extent is at least this times its chainage extent
SAME_JOINT_M = 0.2  # ring joints this close along the tunnel are one (rings are >= 0.5 m wide)


@dataclass(frozen=True)
class PhysicalFeature:
    """One lining feature merged from its detections: ``members`` are indices into the
    detections given to :func:`merge_features`. Chainage in m, arc, lengths and area in mm."""

    members: tuple[int, ...]
    kind: str
    chainage_m: float  # centre of the extent
    chainage_start_m: float
    chainage_end_m: float
    arc_mm: float  # centre of the extent
    arc_start_mm: float
    arc_end_mm: float
    length_mm: float
    area_mm2: float
    orientation_deg: float
    detections: int
    frames: int
    cameras: tuple[str, ...]
    seq_first: int
    seq_last: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``members`` left out), plus ``outline``: the extent as a closed
        ring of [chainage_m, arc_mm] points (a GeoJSON Polygon's ring)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        del out["members"]
        out["cameras"] = list(self.cameras)
        c0, c1, a0, a1 = (self.chainage_start_m, self.chainage_end_m, self.arc_start_mm,
                          self.arc_end_mm)
        out["outline"] = [[c0, a0], [c1, a0], [c1, a1], [c0, a1], [c0, a0]]
        return out


def _box_gap_mm(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """The larger of the two boxes' gaps along the tunnel and round the ring (<= 0: overlap)."""
    along = 1000.0 * (max(a["chainage_start_m"], b["chainage_start_m"])
                      - min(a["chainage_end_m"], b["chainage_end_m"]))
    round_ = max(a["arc_start_mm"], b["arc_start_mm"]) - min(a["arc_end_mm"], b["arc_end_mm"])
    return max(along, round_)


def link_groups(detections: Sequence[Mapping[str, Any]], gap_mm: float = GAP_MM
                ) -> list[list[int]]:
    """Indices of ``detections`` grouped into physical features (the connected components of
    their links), each group sorted, groups in order of their first member. A sweep along the
    chainage finds the candidate pairs, so only detections that reach each other along the
    tunnel are compared."""
    pairs: list[tuple[int, int]] = []
    order = sorted(range(len(detections)), key=lambda i: detections[i]["chainage_start_m"])
    reach_m = gap_mm / 1000.0
    active: dict[str, list[int]] = {}  # per kind: detections that may still reach the next one
    for j in order:
        current = detections[j]
        open_ = [i for i in active.get(current["kind"], [])
                 if detections[i]["chainage_end_m"] + reach_m >= current["chainage_start_m"]]
        for i in open_:
            if _box_gap_mm(detections[i], current) <= gap_mm:
                pairs.append((i, j))
        active[current["kind"]] = [*open_, j]
    return components(np.array(pairs, np.int64), len(detections))


def union_area(detections: Sequence[Mapping[str, Any]], grid_mm: float = AREA_GRID_MM) -> float:
    """Area (mm2) of a group of detections, each counted once where their boxes overlap.

    Each detection spreads its ``area_mm2`` evenly over its box on a ``grid_mm`` raster in
    (chainage, arc); a cell holds the largest density of the boxes that cover it, and the area is
    the sum over the cells. So two frames that see the same stain give its area once, disjoint
    views add up, and a lone detection keeps its own area exactly. It is an estimate: a box is
    not the region, and where one view sees more of a region than another, the denser view wins.
    """
    if len(detections) == 1:
        return float(detections[0]["area_mm2"])
    c0 = min(d["chainage_start_m"] for d in detections) * 1000.0
    a0 = min(d["arc_start_mm"] for d in detections)
    extent_c = max(d["chainage_end_m"] for d in detections) * 1000.0 - c0
    extent_a = max(d["arc_end_mm"] for d in detections) - a0
    cell = max(grid_mm, math.sqrt(extent_c * extent_a / AREA_MAX_CELLS))
    density = np.zeros((math.ceil(extent_a / cell) + 1, math.ceil(extent_c / cell) + 1))
    for d in detections:
        i0 = math.floor((d["chainage_start_m"] * 1000.0 - c0) / cell)
        i1 = max(i0 + 1, math.ceil((d["chainage_end_m"] * 1000.0 - c0) / cell))
        j0 = math.floor((d["arc_start_mm"] - a0) / cell)
        j1 = max(j0 + 1, math.ceil((d["arc_end_mm"] - a0) / cell))
        box = density[j0:j1, i0:i1]
        np.maximum(box, d["area_mm2"] / (box.size * cell * cell), out=box)
    return round(float(density.sum() * cell * cell), 2)  # the raster sum carries float noise


def measure_group(detections: Sequence[Mapping[str, Any]], members: list[int]
                  ) -> PhysicalFeature:
    group = [detections[i] for i in members]
    longest = max(group, key=lambda d: d["length_mm"])  # the first of equals
    c0 = min(d["chainage_start_m"] for d in group)
    c1 = max(d["chainage_end_m"] for d in group)
    a0 = min(d["arc_start_mm"] for d in group)
    a1 = max(d["arc_end_mm"] for d in group)
    # a segment at angle t fills a box of (L cos t, L sin t): its projection on the axis is L
    angle = math.radians(longest["orientation_deg"])
    along_axis = abs((c1 - c0) * 1000.0 * math.cos(angle)) + abs((a1 - a0) * math.sin(angle))
    seqs = [d["seq"] for d in group]
    return PhysicalFeature(
        members=tuple(members), kind=longest["kind"],
        chainage_m=(c0 + c1) / 2, chainage_start_m=c0, chainage_end_m=c1,
        arc_mm=(a0 + a1) / 2, arc_start_mm=a0, arc_end_mm=a1,
        length_mm=max(longest["length_mm"], along_axis), area_mm2=union_area(group),
        orientation_deg=longest["orientation_deg"], detections=len(group),
        frames=len({(d["camera"], d["seq"]) for d in group}),
        cameras=tuple(sorted({d["camera"] for d in group})),
        seq_first=min(seqs), seq_last=max(seqs))


def merge_features(detections: Sequence[Mapping[str, Any]], gap_mm: float = GAP_MM
                   ) -> list[PhysicalFeature]:
    """One run's feature detections merged into physical features, in order of chainage (centre),
    then kind and arc."""
    if not (math.isfinite(gap_mm) and gap_mm >= 0):
        raise ValueError(f"gap_mm must be a number >= 0, got {gap_mm!r}")
    features = [measure_group(detections, members)
                for members in link_groups(detections, gap_mm)]
    return sorted(features, key=lambda f: (f.chainage_m, f.kind, f.arc_mm))


def runs_round_the_ring(feature: Mapping[str, Any]) -> bool:
    """Whether a feature's axis is within RING_TOLERANCE_DEG of 90 degrees, or its arc extent is
    RING_ASPECT times its chainage extent or more (a joint seen as a short, wide blob has an
    unreliable axis, its extent does not lie)."""
    extent_c = (feature["chainage_end_m"] - feature["chainage_start_m"]) * 1000.0
    extent_a = feature["arc_end_mm"] - feature["arc_start_mm"]
    return (abs(feature["orientation_deg"] - 90.0) <= RING_TOLERANCE_DEG
            or extent_a >= RING_ASPECT * extent_c)


def ring_joints(features: Iterable[PhysicalFeature | Mapping[str, Any]],
                same_joint_m: float = SAME_JOINT_M) -> list[float]:
    """Chainages (m, sorted) of the ring joints among physical features (objects or their
    dicts): features of kind ``joint`` that run round the ring. Pieces of one joint that did not
    merge (two cameras with a gap between their views, a tilted joint) lie within
    ``same_joint_m`` of each other along the tunnel and give one chainage: the centre of their
    joint extent."""
    records = [f.to_dict() if isinstance(f, PhysicalFeature) else f for f in features]
    pieces = sorted((r["chainage_start_m"], r["chainage_end_m"]) for r in records
                    if r["kind"] == JOINT_KIND and runs_round_the_ring(r))
    joints: list[list[float]] = []
    for start, end in pieces:
        if joints and start - joints[-1][1] <= same_joint_m:
            joints[-1][1] = max(joints[-1][1], end)
        else:
            joints.append([start, end])
    return [(start + end) / 2 for start, end in joints]
