"""Two inspections of one tunnel aligned on their ring joints: run B's chainage in run A's frame.

Two drives' odometers disagree by an offset (where each started counting) and by a scale (wheel
wear, tyre pressure, slip: 2 % is 3.3 m over 167 m), and the scale need not stay constant. The
ring joints of a segmental lining (every 1.2-2 m) do not move between inspections, and each run
has a sorted list of their chainages (its lining features of kind "joint", merged per joint). A
joint seen by both runs is a landmark: B's chainage is mapped to A's piecewise linearly between
matched joints (:func:`piecewise_map`), so the odometers' scale and drift no longer matter.

Matching (:func:`match_landmarks`). Joints are nearly periodic, so matching each joint of B to the
nearest joint of A goes a whole ring wrong as soon as the odometers disagree by more than half a
ring anywhere, which a 2 % scale does after 40 m. Instead:

1. Global fit. Over B's first ``VOTE_WINDOW_M`` (300 m), B is mapped by
   ``a = b + shift + (scale - 1) * (b - b0)`` (``b0``: B's first joint) for every scale of a grid
   over ``scale_range`` (0.9-1.1) fine enough to err by at most ``tolerance_m / 4`` there; for
   each scale every pair (joint of A, joint of B) within ``max_shift_m`` (10 m) of
   ``offset_hint_m`` votes for a shift, and each shift that many pairs lie within
   ``tolerance_m`` (0.15 m) of is a candidate. Of the candidates with (nearly) the most votes,
   the one nearest ``offset_hint_m`` is taken ("nearly": within ``RING_MARGIN``, 5 % or 2).
2. Monotone matching. Joints are matched one to one within ``tolerance_m`` of their mapped
   position, order preserved: the most pairs (ties: the smaller squared residuals) in a chain
   increasing in both runs, as an LCS on two sorted lists, in which two consecutive pairs are as
   far apart in A as in B at a scale in ``scale_range`` (give or take ``outlier_m``), so a chain
   cannot jump a ring between neighbours. A missed joint on either side, or a spurious one,
   leaves one joint unmatched and breaks nothing. Least squares on the pairs, repeated until they
   no longer change.
3. Growth. Where the odometers drift away from a straight line, that line matches pieces (some a
   ring off); the chain is cut where both runs have unmatched joints between two pairs, and each
   piece is grown joint by joint from both ends: the next joint of B, extrapolated at the scale of
   the last 12 pairs, must have a joint of A within ``tolerance_m``. The piece that grows most is
   kept.
4. Refinement. The pairs become a piecewise linear map and every joint is matched again through
   it (step 2's chain), which fills in what growth skipped. A pair that its two neighbours place
   more than ``outlier_m`` (0.075 m) away (interpolated between them; at an end, extrapolated at
   the end's scale) is dropped, worst first: a spurious joint of one run beside a missed one of the
   other. Repeated until nothing changes.
5. Whole rings. The same joints of B paired with the joints of A whole (median) ring spacings
   earlier or later, up to twice ``max_shift_m``, are scored by how many joints of B then land
   within ``tolerance_m`` of a joint of A; as in step 1, of those that land (nearly) the most,
   the one nearest ``offset_hint_m`` at B's first joint is refined as in step 4 and kept, until
   the current one is preferred.

Limits. The global scale fit resolves a scale error that has accumulated several rings along
the run, even where the rings are perfectly regular (what must be within half a ring is the
offset at B's first joint, not at its end); growth follows an odometer whose scale changes along
the run (tried: a local scale drifting by 7 % over 167 m, a wobble of 0.3 m, slips of 6 cm); a
spurious or missed joint costs only itself. What joints cannot tell apart is a shift by a whole
number of rings where the rings are regular: whether one alignment pairs a few more joints than
the one a ring away depends on where each run starts and which joints it missed, so only a clear
difference (``RING_MARGIN``: 5 %, at least 2 joints) decides, and otherwise ``offset_hint_m``
does. So the odometers (or the hint) must agree to within half a ring at B's first joint, even
in a tunnel with a few irregular rings, unless those make the right alignment pair clearly more
joints. A shift beyond ``max_shift_m`` of the hint is not searched, nor a scale outside
``scale_range``; runs that overlap only beyond B's first 300 m are not aligned. Fewer than
``min_joints`` (5) joints in either run, fewer than ``min_joints`` matched, or fewer than half of
the joints matched where the runs overlap is an :class:`~management.errors.AlignmentError`:
align by a constant offset instead. Between two matched joints a mapped chainage is as good as
the two joints' chainages (mm to cm), plus any slip of the odometer between them; beyond the
matched joints it is extrapolated at the scale of the nearest 20 m.

Pure: numpy only, no database. A run's ring joints come from its lining features
(:func:`management.features.ring_joints` of :func:`management.store.query_features`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from management.errors import AlignmentError

TOLERANCE_M = 0.15  # a joint of B this close to a joint of A (once aligned) is the same joint
OUTLIER_M = 0.075  # a matched pair this far off the line through its neighbours is dropped
SCALE_RANGE = (0.9, 1.1)  # the odometer scales searched (A's metres per metre of B)
MAX_SHIFT_M = 10.0  # shifts searched at B's first joint: offset_hint_m +- this
VOTE_WINDOW_M = 300.0  # the global fit votes on B's first 300 m (its cost grows as length^2)
MIN_JOINTS = 5  # fewer joints in a run, or fewer matched, and the runs are not aligned on them
MIN_MATCHED_SHARE = 0.5  # of the joints where the runs overlap, at least this share must match
MAX_ROUNDS = 50  # of refitting, refining and trying other rings (each must change)
LOOKBACK = 40  # joints of B searched back for a chain's previous pair (and the best before them)
RING_MARGIN = 0.05  # alignments a ring apart pairing within 5 % as many joints count as equal
RING_MARGIN_MIN = 2  # ... or within 2 joints
SEEDS = 5  # pieces of the global fit's matches that are grown
GROW_FIT_PAIRS = 12  # growth extrapolates at the scale of the last 12 pairs
END_FIT_M = 20.0  # beyond the matched joints, the map goes on at the scale of the last 20 m

Pairs = list[tuple[float, float]]


@dataclass(frozen=True)
class _Joints:
    """The two runs' joints (sorted, unique) and the matching settings."""

    a: np.ndarray
    b: np.ndarray
    tolerance_m: float
    outlier_m: float
    scale_range: tuple[float, float]

    def points(self, index: np.ndarray) -> np.ndarray:
        """Pairs (i, k) as rows (chainage in A, chainage in B)."""
        return np.stack([self.a[index[:, 0]], self.b[index[:, 1]]], axis=1)


def _sorted_joints(name: str, chainages: Iterable[float]) -> np.ndarray:
    values = np.unique(np.asarray(list(chainages), np.float64).ravel())
    if not np.isfinite(values).all():
        raise AlignmentError(f"the ring joints of {name} include a chainage that is not a finite "
                             "number")
    return values


def _linear_fit(points: np.ndarray) -> tuple[float, float]:
    """(scale, intercept) of the least-squares line a = intercept + scale * b through rows
    (a, b)."""
    a, b = points[:, 0], points[:, 1]
    if len(points) < 2 or np.ptp(b) == 0:
        return 1.0, float(np.mean(a - b))
    scale, intercept = np.polyfit(b, a, 1)
    return float(scale), float(intercept)


def _end_scales(points: np.ndarray) -> tuple[float, float]:
    """The least-squares scales of the rows (a, b) within END_FIT_M of the first and of the last
    row (at least the two nearest): how a map through ``points`` goes on beyond its ends."""
    b = points[:, 1]
    first = max(2, int(np.searchsorted(b, b[0] + END_FIT_M, side="right")))
    last = min(len(b) - 2, int(np.searchsorted(b, b[-1] - END_FIT_M, side="left")))
    return _linear_fit(points[:first])[0], _linear_fit(points[last:])[0]


def _nearest_the_hint(options: list[tuple[int, float, Any]]) -> Any:
    """Of ``options`` (pairs or votes, distance from the hint, alignment), the one nearest the hint
    among those that pair as many joints as the best, give or take RING_MARGIN (joints cannot tell
    a ring from the next in a regular tunnel: a few joints more is no evidence)."""
    most = max(count for count, _, _ in options)
    equal = [option for option in options if option[0] >= most - _margin(most)]
    return min(equal, key=lambda option: (option[1], -option[0]))[2]


def _margin(count: int) -> int:
    return max(RING_MARGIN_MIN, math.ceil(RING_MARGIN * count))


def _global_fit(joints: _Joints, offset_hint_m: float, max_shift_m: float
                ) -> tuple[float, float] | None:
    """(scale, intercept) of the line a = intercept + scale * b that most joint pairs agree on
    (step 1 of the module doc), or None when no pair is within the shifts searched."""
    a, tolerance_m = joints.a, joints.tolerance_m
    b = joints.b[joints.b <= joints.b[0] + VOTE_WINDOW_M]
    b0 = b[0]
    low, high = joints.scale_range
    # The grid errs by at most tolerance_m / 4 at the window's end; a shift wins the votes of the
    # pairs within tolerance_m of it.
    count = max(2, math.ceil((high - low) * max(float(b[-1] - b0), tolerance_m) * 2
                             / tolerance_m) + 1)
    peaks: list[tuple[int, float, tuple[float, float]]] = []  # (votes, |shift - hint|, line)
    for scale in np.linspace(low, high, count):
        predicted = b + (scale - 1.0) * (b - b0)  # without the shift
        lo = np.searchsorted(a, predicted + offset_hint_m - max_shift_m, side="left")
        hi = np.searchsorted(a, predicted + offset_hint_m + max_shift_m, side="right")
        if not (hi > lo).any():
            continue
        owner = np.repeat(np.arange(len(b)), hi - lo)
        index = np.concatenate([np.arange(x, y) for x, y in zip(lo, hi, strict=True)])
        shifts = np.sort(a[index] - predicted[owner])
        votes = np.searchsorted(shifts, shifts + 2 * tolerance_m, side="right") - np.arange(
            len(shifts))
        strong = np.flatnonzero(votes >= votes.max() - _margin(int(votes.max())))
        centres = (shifts[strong] + shifts[strong + votes[strong] - 1]) / 2
        # One peak per shift (windows a ring apart are different shifts): its most votes.
        for group in np.split(np.arange(len(strong)), np.flatnonzero(np.diff(centres) > tolerance_m)
                              + 1):
            best = group[np.argmax(votes[strong[group]])]
            centre = float(centres[best])
            peaks.append((int(votes[strong[best]]), abs(centre - offset_hint_m),
                          (float(scale), centre + b0 - float(scale) * b0)))
    return _nearest_the_hint(peaks) if peaks else None


def _chain(joints: _Joints, mapped_b: np.ndarray) -> np.ndarray:
    """Pairs (i, k), as an Nx2 int array, of the most joints a[i] ~ mapped_b[k] within the
    tolerance (ties: the smaller sum of squared residuals) in a chain increasing in both i and k
    whose consecutive pairs are as far apart in A as in B at a scale of the scale range, give or
    take ``outlier_m`` (step 2 of the module doc)."""
    a, b, slack = joints.a, joints.b, joints.outlier_m
    low, high = joints.scale_range
    lo = np.searchsorted(a, mapped_b - joints.tolerance_m, side="left")
    hi = np.searchsorted(a, mapped_b + joints.tolerance_m, side="right")
    candidates = [(int(i), k) for k in range(len(b)) for i in range(lo[k], hi[k])]
    if not candidates:
        return np.zeros((0, 2), int)
    of_joint: dict[int, list[int]] = {}  # candidates of each joint k of B
    for n, (_, k) in enumerate(candidates):
        of_joint.setdefault(k, []).append(n)
    # score[n]: (pairs, -sum of squared residuals) of the best chain ending at candidate n. Its
    # predecessor is a candidate of the last LOOKBACK joints of B, or the best chain ending
    # before those (across a longer stretch of unmatched joints the scale band is wide anyway).
    score: list[tuple[int, float]] = []
    back: list[int] = []
    best_upto: list[int] = []  # per joint k of B: the best candidate with k' <= k, or -1
    for n, (i, k) in enumerate(candidates):
        while len(best_upto) < k:
            best_upto.append(best_upto[-1] if best_upto else -1)
        residual = float(a[i] - mapped_b[k])
        own = -residual * residual
        options = [p for q in range(max(0, k - LOOKBACK), k) for p in of_joint.get(q, ())]
        if k > LOOKBACK and best_upto[k - LOOKBACK - 1] >= 0:
            options.append(best_upto[k - LOOKBACK - 1])
        chosen, best = -1, (1, own)
        for p in options:
            i_p, k_p = candidates[p]
            step_a, step_b = a[i] - a[i_p], b[k] - b[k_p]
            if (i_p < i and low * step_b - slack <= step_a <= high * step_b + slack
                    and (score[p][0] + 1, score[p][1] + own) > best):
                chosen, best = p, (score[p][0] + 1, score[p][1] + own)
        score.append(best)
        back.append(chosen)
        if len(best_upto) == k:
            best_upto.append(best_upto[-1] if best_upto else -1)
        if best_upto[k] < 0 or best > score[best_upto[k]]:
            best_upto[k] = n
    n = max(range(len(score)), key=lambda m: score[m])
    chain = []
    while n >= 0:
        chain.append(candidates[n])
        n = back[n]
    return np.array(chain[::-1], int)


def _pieces(index: np.ndarray) -> list[np.ndarray]:
    """``index`` (pairs (i, k) in order) cut where both runs have a joint between two neighbouring
    pairs that matched nothing (where a line through drifting odometers jumped a ring, or two
    spurious joints): the pieces of at least two pairs, largest first."""
    step = np.diff(index, axis=0)
    cuts = np.flatnonzero((step[:, 0] >= 2) & (step[:, 1] >= 2)) + 1
    pieces = [piece for piece in np.split(index, cuts) if len(piece) >= 2]
    return sorted(pieces, key=len, reverse=True)


def _grown(joints: _Joints, seed: np.ndarray) -> np.ndarray:
    """``seed`` (pairs (i, k) in order) grown joint by joint at both ends (step 3 of the module
    doc): the nearest joint of B beyond the end whose position, extrapolated at the scale of the
    last GROW_FIT_PAIRS pairs, has a joint of A beyond the end within the tolerance."""
    a, b, tolerance_m = joints.a, joints.b, joints.tolerance_m
    pairs = [(int(i), int(k)) for i, k in seed]
    for forward in (True, False):
        while True:
            i_end, k_end = pairs[-1] if forward else pairs[0]
            near = pairs[-GROW_FIT_PAIRS:] if forward else pairs[:GROW_FIT_PAIRS]
            scale = _linear_fit(joints.points(np.array(near)))[0]
            found = None
            for k in range(k_end + 1, len(b)) if forward else range(k_end - 1, -1, -1):
                expected = a[i_end] + scale * (b[k] - b[k_end])
                if (expected > a[-1] + tolerance_m) if forward else (
                        expected < a[0] - tolerance_m):
                    break
                i = int(np.searchsorted(a, expected))
                options = [j for j in (i - 1, i) if 0 <= j < len(a)
                           and (j > i_end if forward else j < i_end)]
                if options:
                    j = min(options, key=lambda m: abs(a[m] - expected))
                    if abs(a[j] - expected) <= tolerance_m:
                        found = (j, k)
                        break
            if found is None:
                break
            if forward:
                pairs.append(found)
            else:
                pairs.insert(0, found)
    return np.array(pairs, int)


def _outliers_dropped(joints: _Joints, index: np.ndarray) -> np.ndarray:
    """``index`` (pairs (i, k) in order) without the pairs that their neighbours place more than
    ``outlier_m`` away, worst first (step 4 of the module doc)."""
    while len(index) >= 4:
        points = joints.points(index)
        a, b = points[:, 0], points[:, 1]
        predicted = np.empty(len(points))
        weight = (b[1:-1] - b[:-2]) / (b[2:] - b[:-2])
        predicted[1:-1] = a[:-2] + weight * (a[2:] - a[:-2])
        predicted[0] = a[1] + _end_scales(points[1:])[0] * (b[0] - b[1])
        predicted[-1] = a[-2] + _end_scales(points[:-1])[1] * (b[-1] - b[-2])
        residual = np.abs(a - predicted)
        worst = int(np.argmax(residual))
        if residual[worst] <= joints.outlier_m:
            break
        index = np.delete(index, worst, axis=0)
    return index


def _refined(joints: _Joints, index: np.ndarray) -> np.ndarray:
    """``index`` matched again through its own piecewise map, outliers dropped, until that no
    longer changes it (step 4 of the module doc)."""
    for _ in range(MAX_ROUNDS):
        found = _outliers_dropped(joints, _chain(joints, piecewise_map(joints.points(index))(
            joints.b)))
        if len(found) < 2 or np.array_equal(found, index):
            break
        index = found
    return index


def _other_rings(joints: _Joints, index: np.ndarray, offset_hint_m: float, max_shift_m: float
                 ) -> np.ndarray:
    """``index`` or the same joints of B paired whole rings earlier or later in A (the joints of A
    nearest that many median spacings away, outliers dropped), whichever :func:`_nearest_the_hint`
    prefers by how many joints of B then have a joint of A within the tolerance; refined, until
    it prefers ``index`` (step 5 of the module doc)."""
    a, b = joints.a, joints.b
    spacing = float(np.median(np.diff(a)))
    reach = math.ceil(2 * max_shift_m / spacing)

    def merit(pairs: np.ndarray) -> tuple[int, float, np.ndarray]:
        mapped = piecewise_map(joints.points(pairs))(b)
        nearest = np.clip(np.searchsorted(a, mapped), 1, len(a) - 1)
        distance = np.minimum(np.abs(a[nearest - 1] - mapped), np.abs(a[nearest] - mapped))
        return (int((distance <= joints.tolerance_m).sum()), abs(mapped[0] - b[0] - offset_hint_m),
                pairs)

    best = index
    for _ in range(MAX_ROUNDS):
        options = [merit(best)]
        for ring in (r for r in range(-reach, reach + 1) if r != 0):
            wanted = a[best[:, 0]] + ring * spacing
            nearest = np.clip(np.searchsorted(a, wanted), 1, len(a) - 1)
            nearest = np.where(np.abs(a[nearest - 1] - wanted) < np.abs(a[nearest] - wanted),
                               nearest - 1, nearest)
            found = np.abs(a[nearest] - wanted) <= spacing / 4
            moved = _outliers_dropped(joints, np.stack([nearest, best[:, 1]], axis=1)[found])
            if len(moved) >= 2 and (np.diff(moved, axis=0) > 0).all():
                options.append(merit(moved))
        chosen = _nearest_the_hint(options)
        if chosen is best:
            break
        best = _refined(joints, chosen)
    return best


def _check_parameters(tolerance_m: float, outlier_m: float, offset_hint_m: float,
                      max_shift_m: float, scale_range: tuple[float, float], min_joints: int
                      ) -> None:
    for name, value in (("tolerance_m", tolerance_m), ("outlier_m", outlier_m),
                        ("max_shift_m", max_shift_m)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise AlignmentError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(offset_hint_m, (int, float)) and math.isfinite(offset_hint_m)):
        raise AlignmentError(f"offset_hint_m must be a finite number, got {offset_hint_m!r}")
    low, high = scale_range
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= 1 <= high):
        raise AlignmentError(f"scale_range must be (low, high) with 0 < low <= 1 <= high, got "
                             f"{scale_range!r}")
    if not (isinstance(min_joints, int) and min_joints >= 2):
        raise AlignmentError(f"min_joints must be an integer >= 2, got {min_joints!r}")


def match_landmarks(a: Sequence[float], b: Sequence[float], *,
                    tolerance_m: float = TOLERANCE_M, outlier_m: float = OUTLIER_M,
                    offset_hint_m: float = 0.0, max_shift_m: float = MAX_SHIFT_M,
                    scale_range: tuple[float, float] = SCALE_RANGE,
                    min_joints: int = MIN_JOINTS, labels: tuple[str, str] = ("run A", "run B"),
                    ) -> Pairs:
    """Pairs (chainage in A, chainage in B) of the ring joints that are the same physical joint,
    in order of chainage, by the method of the module doc. ``a`` and ``b`` are the two runs' ring
    joint chainages (m, any order; repeats count once); ``offset_hint_m`` is roughly what to add
    to B's chainages to get A's at B's first joint (it centres the shifts searched and decides
    between alignments a whole ring apart that pair nearly as many joints: ``RING_MARGIN``);
    ``labels`` name the runs in errors.
    Raises :class:`AlignmentError` when there are too few joints to align, too few of them
    match, or a parameter is out of range."""
    _check_parameters(tolerance_m, outlier_m, offset_hint_m, max_shift_m, scale_range,
                      min_joints)
    joints = _Joints(_sorted_joints(labels[0], a), _sorted_joints(labels[1], b), tolerance_m,
                     outlier_m, scale_range)
    count_a, count_b = len(joints.a), len(joints.b)
    fallback = "align them by a constant chainage offset instead (--align offset --offset-m M)"
    apart = (f"(odometers more than {max_shift_m:g} m apart at the first joint? say roughly how "
             "far with --offset-m)")
    if count_a < min_joints or count_b < min_joints:
        raise AlignmentError(f"too few ring joints to align the runs on: {count_a} in "
                             f"{labels[0]}, {count_b} in {labels[1]} (at least {min_joints} "
                             f"each); {fallback}")
    index = np.zeros((0, 2), int)
    fit = _global_fit(joints, offset_hint_m, max_shift_m)
    if fit is not None:
        scale, intercept = fit
        for _ in range(MAX_ROUNDS):  # steps 1 and 2: the line, least squares on its matches
            found = _chain(joints, intercept + scale * joints.b)
            if len(found) < 2 or np.array_equal(found, index):
                break
            index = found
            scale, intercept = _linear_fit(joints.points(index))
    if len(index) >= 2:
        index = max((_grown(joints, piece) for piece in _pieces(index)[:SEEDS]), key=len,
                    default=index)  # step 3
        index = _refined(joints, index)  # step 4
        index = _other_rings(joints, index, offset_hint_m, max_shift_m)  # step 5
    if len(index) < min_joints:
        raise AlignmentError(f"the ring joints of {labels[0]} ({count_a}) and {labels[1]} "
                             f"({count_b}) do not line up: {len(index)} matched, at least "
                             f"{min_joints} needed {apart}; else {fallback}")
    matched = joints.points(index)
    mapped_b = piecewise_map(matched)(joints.b)
    low, high = max(joints.a[0], mapped_b[0]), min(joints.a[-1], mapped_b[-1])
    overlap = min(
        int(((joints.a >= low - tolerance_m) & (joints.a <= high + tolerance_m)).sum()),
        int(((mapped_b >= low - tolerance_m) & (mapped_b <= high + tolerance_m)).sum()))
    if len(matched) < MIN_MATCHED_SHARE * overlap:
        raise AlignmentError(f"the ring joints of {labels[0]} and {labels[1]} do not line up: "
                             f"{len(matched)} matched of {overlap} where the runs overlap, at "
                             f"least {MIN_MATCHED_SHARE:.0%} needed {apart}; else {fallback}")
    return [(float(x), float(y)) for x, y in matched]


def piecewise_map(pairs: Sequence[tuple[float, float]] | np.ndarray, scale: float | None = None
                  ) -> Callable[[ArrayLike], np.ndarray]:
    """The map of a chainage of run B to run A's frame through ``pairs`` ((chainage in A,
    chainage in B), as :func:`match_landmarks` returns them): linear between neighbouring pairs;
    before the first and after the last pair, linear at ``scale`` (default: the least-squares
    scale of the pairs within 20 m of that end, at least the two nearest; 1 for a single
    pair). The map takes a number or an array and returns an array of the same shape. Raises
    :class:`AlignmentError` when there is no pair or the pairs are not in the same order in both
    runs."""
    points = np.asarray(pairs, np.float64).reshape(-1, 2)
    if len(points) == 0:
        raise AlignmentError("no matched ring joints to map chainages through")
    if not np.isfinite(points).all():
        raise AlignmentError("a matched ring joint's chainage is not a finite number")
    points = points[np.argsort(points[:, 1], kind="stable")]
    if (np.diff(points[:, 0]) <= 0).any() or (np.diff(points[:, 1]) <= 0).any():
        raise AlignmentError("matched ring joints must be in the same order in both runs, with "
                             "no joint matched twice")
    if scale is not None:
        first = last = float(scale)
    else:
        first, last = _end_scales(points) if len(points) > 1 else (1.0, 1.0)
    if not all(math.isfinite(s) and s > 0 for s in (first, last)):
        raise AlignmentError(f"the scale beyond the matched joints must be > 0, got "
                             f"{scale if scale is not None else (first, last)!r}")
    a, b = points[:, 0].copy(), points[:, 1].copy()

    def to_a(chainage_m: ArrayLike) -> np.ndarray:
        x = np.asarray(chainage_m, np.float64)
        inside = np.interp(x, b, a)
        before = a[0] + first * (x - b[0])
        after = a[-1] + last * (x - b[-1])
        return np.where(x < b[0], before, np.where(x > b[-1], after, inside))

    return to_a


@dataclass(frozen=True)
class JointAlignment:
    """Run B's chainages in run A's frame through matched ring joints: call it with a chainage
    (or an array of them) of B. ``scale`` is the least-squares odometer scale (A's metres per
    metre of B), ``rms_m`` the residual of the matched joints about that straight line (how far
    the odometers are from a pure scale and offset; the map itself passes through every pair)."""

    pairs: tuple[tuple[float, float], ...]
    scale: float
    rms_m: float
    joints_a: int
    joints_b: int
    _map: Callable[[ArrayLike], np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_map", piecewise_map(self.pairs))

    def __call__(self, chainage_m: ArrayLike) -> np.ndarray:
        return self._map(chainage_m)

    def describe(self) -> dict[str, Any]:
        """The alignment as a JSON-ready dict, for a comparison's report."""
        return {"method": "joints", "joints_matched": len(self.pairs),
                "joints_a": self.joints_a, "joints_b": self.joints_b,
                "scale": round(self.scale, 6), "rms_m": round(self.rms_m, 4)}


def align_on_joints(a: Sequence[float], b: Sequence[float], **options: Any) -> JointAlignment:
    """The :class:`JointAlignment` of run B onto run A by their ring joints ``a`` and ``b``;
    ``options`` are those of :func:`match_landmarks`."""
    pairs = match_landmarks(a, b, **options)
    points = np.asarray(pairs)
    scale, intercept = _linear_fit(points)
    residual = points[:, 0] - (intercept + scale * points[:, 1])
    return JointAlignment(pairs=tuple(pairs), scale=scale,
                          rms_m=float(np.sqrt(np.mean(residual ** 2))),
                          joints_a=len(np.unique(a)), joints_b=len(np.unique(b)))
