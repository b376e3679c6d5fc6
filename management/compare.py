"""Two inspections of one tunnel compared: which physical cracks are new, which grew, which are
no longer seen.

Input: the physical cracks of the earlier run (``before``) and of the later run (``after``), plain
dicts as :func:`management.store.query_physical` returns them. Everything is done in tunnel
coordinates, those of the earlier run: every chainage of the later run (its cracks' chainages and
every point of their polylines) is first brought into them (the two drives' odometers rarely agree
to the centimetre), either by adding a constant ``offset_m`` or by a ``chainage_map``: a function
of the later run's chainage, such as :class:`management.landmarks.JointAlignment`, which maps it
piecewise linearly between ring joints both runs saw, so that an odometer's scale error (2 % is
3.3 m over 167 m) does not separate a crack from itself. The report's ``alignment`` says which.

Matching. Each polyline is resampled (every ``STEP_MM``, finer for a small tolerance). For two
cracks, the *coverage* of one by the other is the share of its points that lie within
``tolerance_mm`` of the other's points; their *overlap* is the larger of the two coverages (the
shorter crack's, when one lies along the other). Two cracks are candidates when their overlap is
at least ``min_share`` (a crack that grew at its tips still matches: the earlier, shorter one lies
along the later one). Then, deterministically:

1. one to one: candidate pairs in order of overlap (largest first; ties: smaller mean distance,
   then crack numbers) are accepted when neither crack is taken yet;
2. joins and splits: a crack still unmatched joins the match of its best candidate that covers
   at least ``min_share`` of it (two earlier cracks that grew together into one later crack are
   both matched to it; a crack the later run saw as two pieces is matched to both). A crack that
   only a small neighbour lies along stays unmatched: a repaired crack next to a hairline one is
   gone, not joined to it.

Each connected group of accepted pairs is one ``matched`` item; its lengths are the sums over
each side's cracks, its widths the largest maximum widths. The group has ``grown`` when the
length grew by more than ``max(grow_length_mm, grow_length_share * length before)`` or the
maximum width by more than ``grow_width_mm``. The defaults (10 mm and 10 %, 0.1 mm) sit above
the run-to-run scatter of the measurement on a steady crack; tune them to the rig. Later cracks
in no group are ``new``, earlier ones ``gone``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from management.errors import QueryError
from management.merge import points_mm, resample

TOLERANCE_MM = 50.0
MIN_SHARE = 0.5
GROW_LENGTH_MM = 10.0
GROW_LENGTH_SHARE = 0.10
GROW_WIDTH_MM = 0.1
STEP_MM = 5.0

# The columns of one change row (:func:`change_rows`), for tables and CSV.
CHANGE_COLUMNS = ["change", "before", "after", "chainage_m", "arc_mm", "length_before_mm",
                  "length_after_mm", "length_growth_mm", "width_before_mm", "width_after_mm",
                  "width_growth_mm", "severity"]


# A chainage of the later run (m; a number or an array) in the earlier run's frame. One with a
# ``describe()`` method (JointAlignment) describes itself in the report.
ChainageMap = Callable[[Any], Any]


def _identity(chainage_m: Any) -> Any:
    return chainage_m


def _check(name: str, value: float, positive: bool = False) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value)
            and (value > 0 if positive else value >= 0)):
        raise QueryError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")


def _points(crack: dict[str, Any], to_earlier: ChainageMap | None, step: float) -> np.ndarray:
    points = points_mm(crack)
    if to_earlier is not None:
        points[:, 0] = np.asarray(to_earlier(points[:, 0] / 1000.0), np.float64) * 1000.0
    return resample(points, step)


def _chainage(to_earlier: ChainageMap, chainage_m: float) -> float:
    return round(float(to_earlier(chainage_m)), 4)


Pair = tuple[float, float, int, int, float, float]


def _candidates(before: list[np.ndarray], after: list[np.ndarray], tolerance_mm: float,
                min_share: float) -> list[Pair]:
    """(overlap, mean distance, i, j, coverage of before[i], coverage of after[j]) of every
    candidate pair before[i] / after[j], best first."""
    if not before or not after:
        return []
    owner = np.concatenate([np.full(len(p), j) for j, p in enumerate(after)])
    everything = cKDTree(np.concatenate(after))
    trees_before = [cKDTree(p) for p in before]
    trees_after: dict[int, cKDTree] = {}
    found = []
    for i, points in enumerate(before):
        near = everything.query_ball_point(points, tolerance_mm)
        nearby = sorted({int(owner[k]) for ks in near for k in ks})
        for j in nearby:
            tree_after = trees_after.setdefault(j, cKDTree(after[j]))
            to_after, _ = tree_after.query(points)
            to_before, _ = trees_before[i].query(after[j])
            cover_before = float((to_after <= tolerance_mm).mean())
            cover_after = float((to_before <= tolerance_mm).mean())
            distances = to_after if cover_before >= cover_after else to_before
            overlap = max(cover_before, cover_after)
            if overlap >= min_share:
                mean = float(distances[distances <= tolerance_mm].mean())
                found.append((overlap, mean, i, j, cover_before, cover_after))
    return sorted(found, key=lambda c: (-c[0], c[1], c[2], c[3]))


def _groups(pairs: list[Pair], n_before: int, n_after: int, min_share: float
            ) -> list[tuple[list[int], list[int]]]:
    """Matched groups (before indices, after indices) by the two rules of the module doc."""
    accepted: list[tuple[int, int]] = []
    taken_before: set[int] = set()
    taken_after: set[int] = set()
    for _, _, i, j, _, _ in pairs:  # 1. one to one, best overlap first
        if i not in taken_before and j not in taken_after:
            accepted.append((i, j))
            taken_before.add(i)
            taken_after.add(j)
    for _, _, i, j, cover_i, cover_j in pairs:  # 2. joins and splits (pairs are best first)
        if ((i not in taken_before and cover_i >= min_share)
                or (j not in taken_after and cover_j >= min_share)):
            accepted.append((i, j))
            taken_before.add(i)
            taken_after.add(j)
    # Connected components of the accepted pairs; before i is node i, after j is n_before + j.
    parent = list(range(n_before + n_after))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, j in accepted:
        parent[root(n_before + j)] = root(i)
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for i in sorted(taken_before):
        groups.setdefault(root(i), ([], []))[0].append(i)
    for j in sorted(taken_after):
        groups[root(n_before + j)][1].append(j)
    return list(groups.values())


def _crack_item(crack: dict[str, Any], to_earlier: ChainageMap) -> dict[str, Any]:
    """A new or gone crack, chainages in tunnel coordinates."""
    return {
        "number": crack["number"],
        "chainage_m": _chainage(to_earlier, crack["chainage_m"]),
        "chainage_start_m": _chainage(to_earlier, crack["chainage_start_m"]),
        "chainage_end_m": _chainage(to_earlier, crack["chainage_end_m"]),
        "arc_mm": crack["arc_mm"], "length_mm": round(crack["length_mm"], 3),
        "width_max_mm": crack["width_max_mm"], "type": crack["type"],
        "severity": crack["severity"],
    }


def _matched_item(olds: list[dict[str, Any]], news: list[dict[str, Any]], to_earlier: ChainageMap,
                  grow_length_mm: float, grow_length_share: float, grow_width_mm: float
                  ) -> dict[str, Any]:
    length_before = sum(c["length_mm"] for c in olds)
    length_after = sum(c["length_mm"] for c in news)
    widest_before = max(olds, key=lambda c: c["width_max_mm"])
    widest_after = max(news, key=lambda c: c["width_max_mm"])
    length_growth = length_after - length_before
    width_growth = widest_after["width_max_mm"] - widest_before["width_max_mm"]
    weights = [c["length_mm"] for c in news] if length_after > 0 else None

    def centre(key: str) -> float:  # of the later cracks, weighted by length
        return float(np.average([c[key] for c in news], weights=weights))

    grown = (length_growth > max(grow_length_mm, grow_length_share * length_before)
             or width_growth > grow_width_mm)
    return {
        "before": [c["number"] for c in olds], "after": [c["number"] for c in news],
        "chainage_m": _chainage(to_earlier, centre("chainage_m")),
        "arc_mm": round(centre("arc_mm"), 2),
        "length_before_mm": round(length_before, 3), "length_after_mm": round(length_after, 3),
        "length_growth_mm": round(length_growth, 3),
        "width_before_mm": widest_before["width_max_mm"],
        "width_after_mm": widest_after["width_max_mm"],
        "width_growth_mm": round(width_growth, 4),
        "severity_before": widest_before["severity"], "severity_after": widest_after["severity"],
        "grown": bool(grown),
    }


def compare_runs(before: list[dict[str, Any]], after: list[dict[str, Any]],
                 tolerance_mm: float = TOLERANCE_MM, offset_m: float = 0.0,
                 grow_length_mm: float = GROW_LENGTH_MM,
                 grow_length_share: float = GROW_LENGTH_SHARE,
                 grow_width_mm: float = GROW_WIDTH_MM,
                 min_share: float = MIN_SHARE,
                 chainage_map: ChainageMap | None = None) -> dict[str, Any]:
    """The physical cracks of an earlier run (``before``) and a later one (``after``) compared
    (see the module doc). Returns a JSON-ready dict:

    - ``matched``: one item per matched group: ``before`` / ``after`` (lists of crack numbers),
      ``chainage_m`` / ``arc_mm`` (the later crack's centre, tunnel coordinates),
      ``length_before_mm``, ``length_after_mm``, ``length_growth_mm``, ``width_before_mm``,
      ``width_after_mm``, ``width_growth_mm`` (maximum widths), ``severity_before``,
      ``severity_after`` and ``grown``;
    - ``new`` (later cracks) and ``gone`` (earlier cracks): ``number``, chainage (tunnel
      coordinates), ``arc_mm``, ``length_mm``, ``width_max_mm``, ``type``, ``severity``;
    - ``summary``: counts (``before``, ``after``, ``matched``, ``grown``, ``unchanged``, ``new``,
      ``gone``);
    - ``alignment``: how the later run's chainages were brought into the earlier run's:
      ``{"method": "offset", "offset_m": ...}``, or ``chainage_map.describe()`` (for a
      JointAlignment: ``method`` "joints", ``joints_matched``, ``scale``, ``rms_m``, ...);
    - ``parameters``: the tolerances used (``offset_m`` None when a ``chainage_map`` was).

    ``chainage_map`` replaces ``offset_m`` (give one of them). Items are in order of chainage.
    Raises ValueError on a bad parameter."""
    _check("tolerance_mm", tolerance_mm, positive=True)
    _check("grow_length_mm", grow_length_mm)
    _check("grow_length_share", grow_length_share)
    _check("grow_width_mm", grow_width_mm)
    if not (isinstance(offset_m, (int, float)) and math.isfinite(offset_m)):
        raise QueryError(f"offset_m must be a finite number, got {offset_m!r}")
    if not 0 < min_share <= 1:
        raise QueryError(f"min_share must be in (0, 1], got {min_share!r}")
    if chainage_map is not None and offset_m != 0:
        raise QueryError(f"give offset_m or chainage_map, not both (offset_m={offset_m!r})")
    if chainage_map is None:
        def to_earlier(chainage_m: Any) -> Any:
            return np.asarray(chainage_m, np.float64) + offset_m

        alignment = {"method": "offset", "offset_m": offset_m}
    else:
        to_earlier = chainage_map
        describe = getattr(chainage_map, "describe", None)
        alignment = describe() if callable(describe) else {"method": "map"}
    before = sorted(before, key=lambda c: c["number"])
    after = sorted(after, key=lambda c: c["number"])
    step = min(STEP_MM, tolerance_mm / 2)
    pairs = _candidates([_points(c, None, step) for c in before],
                        [_points(c, to_earlier, step) for c in after],
                        tolerance_mm, min_share)
    groups = _groups(pairs, len(before), len(after), min_share)
    matched = [_matched_item([before[i] for i in olds], [after[j] for j in news], to_earlier,
                             grow_length_mm, grow_length_share, grow_width_mm)
               for olds, news in groups]
    seen_before = {i for olds, _ in groups for i in olds}
    seen_after = {j for _, news in groups for j in news}
    new = [_crack_item(c, to_earlier) for j, c in enumerate(after) if j not in seen_after]
    gone = [_crack_item(c, _identity) for i, c in enumerate(before) if i not in seen_before]
    matched.sort(key=lambda m: (m["chainage_m"], m["before"]))
    new.sort(key=lambda c: (c["chainage_m"], c["number"]))
    gone.sort(key=lambda c: (c["chainage_m"], c["number"]))
    grown = sum(m["grown"] for m in matched)
    return {
        "summary": {"before": len(before), "after": len(after), "matched": len(matched),
                    "grown": grown, "unchanged": len(matched) - grown, "new": len(new),
                    "gone": len(gone)},
        "alignment": alignment,
        "parameters": {"tolerance_mm": tolerance_mm,
                       "offset_m": offset_m if chainage_map is None else None,
                       "min_share": min_share, "grow_length_mm": grow_length_mm,
                       "grow_length_share": grow_length_share, "grow_width_mm": grow_width_mm},
        "matched": matched, "new": new, "gone": gone,
    }


def _numbers(numbers: list[int]) -> str:
    return "+".join(str(n) for n in numbers)


def change_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes of a :func:`compare_runs` report as flat rows (:data:`CHANGE_COLUMNS`), in
    order of chainage: ``change`` is "new", "grown" or "gone"; ``before`` / ``after`` the crack
    numbers ("3+4" for a join); the other run's measures are None."""
    rows = [{"change": "grown", "before": _numbers(m["before"]), "after": _numbers(m["after"]),
             "chainage_m": m["chainage_m"], "arc_mm": m["arc_mm"],
             "length_before_mm": m["length_before_mm"], "length_after_mm": m["length_after_mm"],
             "length_growth_mm": m["length_growth_mm"], "width_before_mm": m["width_before_mm"],
             "width_after_mm": m["width_after_mm"], "width_growth_mm": m["width_growth_mm"],
             "severity": m["severity_after"]}
            for m in report["matched"] if m["grown"]]
    for change, side in (("new", "after"), ("gone", "before")):
        for crack in report[change]:
            row = dict.fromkeys(CHANGE_COLUMNS)
            row.update(change=change, chainage_m=crack["chainage_m"], arc_mm=crack["arc_mm"],
                       severity=crack["severity"])
            row.update({side: str(crack["number"]), f"length_{side}_mm": crack["length_mm"],
                        f"width_{side}_mm": crack["width_max_mm"]})
            rows.append(row)
    order = {"new": 0, "grown": 1, "gone": 2}
    return sorted(rows, key=lambda r: (r["chainage_m"], order[r["change"]]))
