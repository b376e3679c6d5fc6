"""Physical cracks scored against a synthetic drive's truth (``crackscan synth --truth``).

A physical crack belongs to the true crack that lies within ``near_mm`` of most of its polyline
(resampled every 2 mm), when that is at least half of it; otherwise it is "other" (a ring joint,
a stain, a false detection). Per true crack: found (one or more physical cracks belong to it), the
number of them (1 is the goal: a crack merged whole), and for the longest of them the relative
error of its length against the truth polyline's, of its mean width against the truth's
length-weighted mean width, and of its maximum width (what severity is graded by) against the
truth's maximum width.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from management.merge import LINK_STEP_MM, points_mm, resample

NEAR_MM = 10.0


def score_against_truth(truth_cracks: list[dict[str, Any]], physical: list[dict[str, Any]],
                        near_mm: float = NEAR_MM) -> dict[str, Any]:
    """Summary (found, duplicates per found crack, median length and width errors, other) and
    one row per true crack."""
    trees = [cKDTree(points_mm(crack)) for crack in truth_cracks]
    owners: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(truth_cracks))}
    other = 0
    for crack in physical:
        points = resample(points_mm(crack), LINK_STEP_MM)
        near = [float((tree.query(points)[0] <= near_mm).mean()) for tree in trees]
        best = int(np.argmax(near)) if near else -1
        if best >= 0 and near[best] >= 0.5:
            owners[best].append(crack)
        else:
            other += 1
    rows = []
    for i, true in enumerate(truth_cracks):
        matches = owners[i]
        row: dict[str, Any] = {"id": true.get("id", i), "type": true.get("type"),
                               "length_mm": true["length_mm"], "width_mm": true["width_mm"],
                               "physical_cracks": len(matches)}
        if matches:
            main = max(matches, key=lambda c: c["length_mm"])
            row.update(found_length_mm=main["length_mm"], found_width_mm=main["width_mean_mm"],
                       length_error=main["length_mm"] / true["length_mm"] - 1,
                       width_error=main["width_mean_mm"] / true["width_mm"] - 1)
            if true.get("width_max_mm"):
                row.update(found_width_max_mm=main["width_max_mm"],
                           width_max_error=main["width_max_mm"] / true["width_max_mm"] - 1)
        rows.append(row)
    found = [row for row in rows if row["physical_cracks"]]

    def median(key: str) -> float | None:
        values = [row[key] for row in found if key in row]
        return statistics.median(values) if values else None

    return {
        "true_cracks": len(rows), "found": len(found),
        "physical_per_found_crack": (sum(row["physical_cracks"] for row in found) / len(found)
                                     if found else None),
        "median_length_error": median("length_error"),
        "median_abs_length_error": (statistics.median(abs(row["length_error"]) for row in found)
                                    if found else None),
        "median_width_error": median("width_error"),
        "median_abs_width_error": (statistics.median(abs(row["width_error"]) for row in found)
                                   if found else None),
        "median_width_max_error": median("width_max_error"),
        "other_physical_cracks": other, "cracks": rows,
    }


RING_JOINT_TOLERANCE_M = 0.1


def score_ring_joints(truth_m: list[float], found_m: list[float],
                      tolerance_m: float = RING_JOINT_TOLERANCE_M) -> dict[str, Any]:
    """How the ring joints a run found (chainages, m) agree with the drive's truth: each true
    joint within the drive's span is found when a found joint lies within ``tolerance_m``
    (each found joint pairs with one true joint at most, nearest first); the others are
    ``spurious``. ``median_error_m`` is over the found pairs."""
    pairs = sorted((abs(f - t), i, j) for i, t in enumerate(truth_m) for j, f in enumerate(found_m)
                   if abs(f - t) <= tolerance_m)
    true_used: set[int] = set()
    found_used: set[int] = set()
    errors = []
    for error, i, j in pairs:
        if i not in true_used and j not in found_used:
            true_used.add(i)
            found_used.add(j)
            errors.append(error)
    return {"true_joints": len(truth_m), "found": len(true_used),
            "spurious": len(found_m) - len(found_used),
            "median_error_m": statistics.median(errors) if errors else None}
