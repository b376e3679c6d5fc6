"""Aligning two inspections on their ring joints (``management.landmarks``): which joints are the
same, and where a chainage of the later run lies in the earlier run's frame, through odometer
scale, offset, drift, missed and spurious joints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crackscan.errors import UserError
from management.errors import AlignmentError
from management.landmarks import align_on_joints, match_landmarks, piecewise_map

START_M = 1200.0
LENGTH_M = 167.0


def true_joints(irregular: bool = True) -> np.ndarray:
    """Where the ring joints are: every 1.5 m over 167 m, three rings 1.2, 1.8 and 1.35 m wide
    unless ``irregular`` is False."""
    spacing = np.full(120, 1.5)
    if irregular:
        spacing[[17, 60, 95]] = [1.2, 1.8, 1.35]
    joints = START_M + np.concatenate([[0.0], np.cumsum(spacing)])
    return joints[joints <= START_M + LENGTH_M]


def odometer(scale: float, offset_m: float, bend: float = 0.0, wobble_m: float = 0.0):
    """A drive's chainage reading of a true chainage: a scale and an offset from the start of the
    section, plus ``bend`` * distance^2 (a scale that drifts along the drive) and a wobble of
    ``wobble_m`` every 63 m (one that drifts back and forth)."""
    def read(chainage_m):
        distance = np.asarray(chainage_m, np.float64) - START_M
        return (START_M + scale * distance + offset_m + bend * distance ** 2
                + wobble_m * np.sin(distance / 10.0))
    return read


class Drives:
    """Ring joints as two drives detect them: the earlier on a true odometer, the later on
    ``later``; each misses two joints and reads one that is not there (the earlier in the middle
    of a ring, the later 10 cm beside a joint it missed: within the tolerance of the earlier
    drive's joint, but off the line through its neighbours); 3 mm of noise."""

    def __init__(self, later, irregular: bool = True, missed_a=(25, 80), missed_b=(10, 50)):
        joints = true_joints(irregular)
        rng = np.random.default_rng(7)
        self.read_a = joints + rng.normal(0, 0.003, len(joints))
        self.read_b = later(joints) + rng.normal(0, 0.003, len(joints))
        self.a = sorted([*np.delete(self.read_a, missed_a), joints[40] + 0.6])
        self.b = sorted([*np.delete(self.read_b, missed_b), float(later(joints[50] + 0.1))])
        both = np.setdiff1d(np.arange(len(joints)), [*missed_a, *missed_b])
        self.same = {(float(self.read_a[j]), float(self.read_b[j])) for j in both}


@pytest.mark.parametrize("scale, offset_m", [(1.02, 0.7), (0.98, 0.7), (1.02, -0.7)])
def test_joints_through_odometer_scale_and_offset(scale, offset_m):
    """The later odometer reads 2 % long (or short) and starts 0.7 m off: 3.3 m apart at the far
    end. Every joint both drives saw is matched, no other, and a crack's chainage of the later
    drive maps to within 5 cm of the earlier drive's."""
    later = odometer(scale, offset_m)
    drives = Drives(later)
    pairs = match_landmarks(drives.a, drives.b)
    assert set(pairs) == drives.same and len(pairs) == len(true_joints()) - 4
    alignment = align_on_joints(drives.a, drives.b)
    cracks = START_M + np.linspace(0.2, LENGTH_M - 0.2, 400)
    assert np.abs(alignment(later(cracks)) - cracks).max() < 0.05
    assert alignment.scale == pytest.approx(1 / scale, abs=0.001)
    assert alignment.rms_m < 0.01
    described = alignment.describe()
    assert described["method"] == "joints" and described["joints_matched"] == len(pairs)
    assert (described["joints_a"], described["joints_b"]) == (len(drives.a), len(drives.b))
    json.dumps(described, allow_nan=False)


def test_regular_rings_and_a_scale_that_adds_up_to_several_rings():
    """Perfectly regular rings: 2 % over 167 m is more than two rings at the far end; the global
    scale fit still pairs every joint with itself."""
    later = odometer(1.02, 0.3)
    drives = Drives(later, irregular=False)
    assert set(match_landmarks(drives.a, drives.b)) == drives.same
    cracks = START_M + np.linspace(0.2, LENGTH_M - 0.2, 400)
    assert np.abs(align_on_joints(drives.a, drives.b)(later(cracks)) - cracks).max() < 0.05


def test_a_drifting_odometer_is_followed_joint_by_joint():
    """The later odometer's scale drifts from 1.00 to 1.067 along the drive: a straight line is
    up to 0.35 m off (which pairs some joints a ring wrong), the piecewise map is not."""
    later = odometer(1.0, 0.2, bend=2e-4)
    drives = Drives(later)
    alignment = align_on_joints(drives.a, drives.b)
    assert set(alignment.pairs) == drives.same
    assert alignment.rms_m > 0.05  # the straight line's residual: a drift, not noise
    cracks = START_M + np.linspace(0.2, LENGTH_M - 0.2, 400)
    assert np.abs(alignment(later(cracks)) - cracks).max() < 0.05


def test_regular_rings_and_an_odometer_that_wobbles():
    """Regular rings, 2 % and 0.7 m, and a wobble of 0.3 m: a straight line through the joints
    pairs stretches of them a ring wrong; the alignment a ring over pairs more."""
    later = odometer(1.02, 0.7, wobble_m=0.3)
    drives = Drives(later, irregular=False)
    alignment = align_on_joints(drives.a, drives.b)
    assert set(alignment.pairs) == drives.same
    cracks = START_M + np.linspace(0.2, LENGTH_M - 0.2, 400)
    assert np.abs(alignment(later(cracks)) - cracks).max() < 0.05


def test_regular_rings_a_whole_ring_apart_need_the_offset_hint():
    """The documented limit: regular rings and odometers 2 m apart (more than half a ring): the
    joints cannot tell, the alignment nearest the hint wins; the right hint resolves it."""
    later = odometer(1.0, 2.0)
    drives = Drives(later, irregular=False)
    cracks = START_M + np.linspace(5.0, LENGTH_M - 5.0, 100)
    unhinted = align_on_joints(drives.a, drives.b)(later(cracks)) - cracks
    assert np.abs(np.abs(unhinted) - 1.5).max() < 0.05  # one ring off
    hinted = align_on_joints(drives.a, drives.b, offset_hint_m=-2.0)
    assert set(hinted.pairs) == drives.same
    assert np.abs(hinted(later(cracks)) - cracks).max() < 0.05


def test_too_few_joints_is_a_clear_error():
    joints = list(true_joints())
    with pytest.raises(AlignmentError, match=rf"3 in earlier, {len(joints)} in later .*--offset-m"
                       ) as error:
        align_on_joints(joints[:3], joints, labels=("earlier", "later"))
    assert isinstance(error.value, UserError)
    with pytest.raises(AlignmentError, match="0 in run A"):
        match_landmarks([], joints)


def test_joints_that_do_not_line_up_are_an_error_not_a_guess():
    rng = np.random.default_rng(3)
    elsewhere = np.sort(START_M + rng.uniform(0, LENGTH_M, 110))  # another tunnel's "joints"
    with pytest.raises(AlignmentError, match="do not line up"):
        match_landmarks(list(true_joints()), list(elsewhere))


def test_bad_parameters_are_named():
    joints = list(true_joints())
    for kwargs in ({"tolerance_m": 0}, {"offset_hint_m": float("nan")},
                   {"scale_range": (1.05, 1.1)}, {"min_joints": 1}):
        with pytest.raises(AlignmentError, match=next(iter(kwargs))):
            match_landmarks(joints, joints, **kwargs)
    with pytest.raises(AlignmentError, match="finite"):
        match_landmarks([*joints[:-1], float("inf")], joints)


def test_piecewise_map_between_and_beyond_the_pairs():
    pairs = [(100.0, 200.0), (101.5, 201.6), (103.0, 203.0), (104.5, 204.5)]
    to_a = piecewise_map(pairs)
    assert float(to_a(200.8)) == pytest.approx(100.75)  # half way between the first two
    assert float(to_a(203.0)) == pytest.approx(103.0)  # through every pair
    assert to_a(np.array([[201.6, 204.5]])).shape == (1, 2)
    first_scale = np.polyfit([200.0, 201.6, 203.0, 204.5], [100.0, 101.5, 103.0, 104.5], 1)[0]
    assert float(to_a(190.0)) == pytest.approx(100.0 - 10.0 * first_scale)  # the end's scale
    fixed = piecewise_map(pairs, scale=1.0)
    assert (float(fixed(190.0)), float(fixed(214.5))) == pytest.approx((90.0, 114.5))
    assert float(piecewise_map([(100.0, 200.0)])(201.0)) == pytest.approx(101.0)
    with pytest.raises(AlignmentError, match="same order"):
        piecewise_map([(100.0, 200.0), (99.0, 201.0)])
    with pytest.raises(AlignmentError, match="no matched"):
        piecewise_map([])
