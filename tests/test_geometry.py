"""Crack geometry on shapes of known size: lengths, widths, angles, types and tunnel coordinates.

Shapes are exact rectangles (numpy) or capsules (all pixels within width / 2 of a segment, so
their true tip-to-tip length is the segment length plus the width). A pixel is a unit square, so a
run of n pixels is n px long.
"""

import json
import math
import time

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crackscan.config import CameraConfig, SeverityConfig
from crackscan.geometry import (
    CLOSING_KERNEL,
    SkeletonGraph,
    chord_deviation,
    classify_type,
    closed_components,
    cross_profiles,
    distance_to_background,
    line_share,
    local_median,
    longest_path,
    measure_component,
    measure_cracks,
    orientation_deg,
    skeleton_edges,
    skeleton_length,
    width_mm_factor,
    width_px_at,
)
from crackscan.wire import CrackRecord

FRAME = (360, 640)  # H, W
SQUARE = CameraConfig(mm_per_px_along=0.5, mm_per_px_across=0.5)
SEVERITY = SeverityConfig()


def bar(x: int, y: int, length: int, width: int, vertical: bool = False, shape=FRAME,
        value: float = 1.0) -> np.ndarray:
    """A rectangle ``length`` x ``width`` px from (x, y), along x (or y when ``vertical``)."""
    prob = np.zeros(shape, np.float32)
    if vertical:
        prob[y:y + length, x:x + width] = value
    else:
        prob[y:y + width, x:x + length] = value
    return prob


def capsule(p0, p1, width: float, shape=FRAME) -> np.ndarray:
    """Pixels within width / 2 of the segment p0-p1 (points (x, y)): a stroke with round tips."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    distance = np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy))
    return (distance <= width / 2).astype(np.float32)


def at_angle(start, length: float, degrees: float):
    """End point of a segment of ``length`` px from ``start`` at ``degrees`` (image x towards
    image y, i.e. clockwise on screen)."""
    a = math.radians(degrees)
    return start[0] + length * math.cos(a), start[1] + length * math.sin(a)


def one_crack(prob, camera=SQUARE, chainage_m: float = 0.0, **kwargs) -> CrackRecord:
    _, records = measure_cracks(prob, 0.5, camera, chainage_m, SEVERITY, **kwargs)
    assert len(records) == 1, [r.bbox_px for r in records]
    return records[0]


# --- length and width ---------------------------------------------------------------------------

@pytest.mark.parametrize("vertical", [False, True], ids=["horizontal", "vertical"])
@pytest.mark.parametrize("width", [1, 3, 5, 7])
def test_straight_bar_length_and_width(width, vertical):
    crack = one_crack(bar(100, 80, 200, width, vertical))
    # 200 px at 0.5 mm/px = 100 mm; width w px = w / 2 mm, exact on the centre line (odd w)
    assert crack.length_px == pytest.approx(200, rel=0.02)
    assert crack.length_mm == pytest.approx(100, rel=0.02)
    assert crack.width_max_px == width
    assert crack.width_max_mm == pytest.approx(width * 0.5)
    assert crack.width_p95_mm == pytest.approx(width * 0.5)
    assert width * 0.5 - 0.5 <= crack.width_mean_mm <= width * 0.5  # within 1 px, ends thinner
    assert crack.area_px == 200 * width
    assert crack.area_mm2 == pytest.approx(200 * width * 0.25)


@pytest.mark.parametrize("width", [1, 3, 5])
def test_diagonal_capsule_length_and_width(width):
    p0 = (150.0, 60.0)
    p1 = at_angle(p0, 200, 45)
    crack = one_crack(capsule(p0, p1, width))
    # tip to tip: 200 + width px
    assert crack.length_px == pytest.approx(200 + width, rel=0.03)
    assert crack.length_mm == pytest.approx((200 + width) * 0.5, rel=0.03)
    assert crack.width_mean_mm / 0.5 == pytest.approx(width, abs=1.0)
    assert crack.width_max_px == pytest.approx(width, abs=1.0)


@pytest.mark.parametrize("degrees", [0, 15, 30, 45, 60, 75, 90])
def test_length_at_any_angle_stays_within_the_chain_code_bias(degrees):
    # Steps count 1 or sqrt(2): exact along the axes and the diagonals, up to ~8 % long between
    # them (a digital line at 22.5 degrees). Never short by more than rasterisation.
    p0 = (200.0, 60.0)
    p1 = at_angle(p0, 220, degrees)
    true_length = 220 + 3
    crack = one_crack(capsule(p0, p1, 3))
    assert 0.98 * true_length <= crack.length_px <= 1.09 * true_length


def test_opencv_line_is_measured_as_drawn():
    prob = np.zeros(FRAME, np.float32)
    cv2.line(prob, (50, 100), (550, 100), 1.0, thickness=3)
    drawn = prob > 0
    drawn_width = int(drawn[:, 300].sum())  # OpenCV decides how wide "thickness 3" is
    cols = np.flatnonzero(drawn.any(axis=0))
    drawn_length = cols[-1] - cols[0] + 1
    crack = one_crack(prob)
    assert crack.width_max_px == drawn_width
    assert crack.length_px == pytest.approx(drawn_length, rel=0.01)


def test_anisotropic_pixels():
    camera = CameraConfig(mm_per_px_along=0.5, mm_per_px_across=2.0)  # along = image x
    horizontal = one_crack(bar(100, 100, 200, 3), camera)
    assert horizontal.length_mm == pytest.approx(200 * 0.5, rel=0.02)
    assert horizontal.width_max_mm == pytest.approx(3 * 2.0)  # across the tunnel: rows
    assert horizontal.area_mm2 == pytest.approx(600 * 0.5 * 2.0)
    vertical = one_crack(bar(100, 50, 100, 5, vertical=True), camera)
    assert vertical.length_mm == pytest.approx(100 * 2.0, rel=0.02)
    # along the tunnel: columns. Within 2 %, not exact: where thinning bends the skeleton into a
    # corner of the flat tip, the local direction tilts, and with 4:1 pixels a tilt matters
    assert vertical.width_max_mm == pytest.approx(5 * 0.5, rel=0.02)
    # a 45-degree line in pixels runs 100 px * 0.5 mm along and 100 px * 2 mm round the ring:
    # hypot(50, 200) = 206.2 mm long, at atan2(200, 50) = 76.0 degrees: circumferential
    prob = np.zeros(FRAME, np.float32)
    cv2.line(prob, (100, 100), (200, 200), 1.0, thickness=1)
    diagonal = one_crack(prob, camera)
    assert diagonal.length_mm == pytest.approx(math.hypot(50, 200), rel=0.02)
    assert diagonal.orientation_deg == pytest.approx(75.96, abs=0.5)
    assert diagonal.type == "circumferential"


# --- orientation and type -----------------------------------------------------------------------

@pytest.mark.parametrize("degrees, expected_type", [
    (10, "longitudinal"), (80, "circumferential"), (45, "diagonal"), (135, "diagonal"),
    (170, "longitudinal"), (100, "circumferential"),
])
def test_orientation_and_type(degrees, expected_type):
    centre = (320.0, 180.0)
    p0, p1 = at_angle(centre, 120, degrees), at_angle(centre, 120, degrees + 180)
    crack = one_crack(capsule(p0, p1, 3))
    assert crack.orientation_deg == pytest.approx(degrees, abs=1.5)
    assert crack.type == expected_type


def test_falling_chainage_mirrors_the_orientation():
    prob = capsule((200.0, 100.0), at_angle((200.0, 100.0), 150, 30), 3)
    rising = one_crack(prob, SQUARE)
    falling = one_crack(prob, CameraConfig(mm_per_px_along=0.5, mm_per_px_across=0.5,
                                           direction=-1))
    assert rising.orientation_deg == pytest.approx(30, abs=1.0)
    assert falling.orientation_deg == pytest.approx(150, abs=1.0)


def test_grid_is_a_network():
    prob = np.zeros((240, 240), np.float32)
    for k in range(4):
        cv2.line(prob, (30 + 55 * k, 20), (30 + 55 * k, 220), 1.0, thickness=1)
        cv2.line(prob, (20, 30 + 55 * k), (220, 30 + 55 * k), 1.0, thickness=1)
    crack = one_crack(prob)
    assert crack.type == "network"
    # eight lines of 201 px each, crossings counted once per line
    assert crack.length_px == pytest.approx(8 * 201, rel=0.01)


def test_long_crack_with_side_branches_is_not_a_network():
    prob = np.zeros((240, 400), np.float32)
    cv2.line(prob, (20, 120), (380, 130), 1.0, thickness=1)
    for x in (80, 180, 280):
        cv2.line(prob, (x, 122), (x + 20, 150), 1.0, thickness=1)
    assert measure_component(prob > 0.5).junctions == 3
    crack = one_crack(prob)
    assert crack.type == "longitudinal"  # three junctions, but far too elongated for a network


@pytest.mark.parametrize("orientation, junctions, ratio, expected", [
    (0.0, 0, 0.0, "longitudinal"), (30.0, 0, 0.0, "longitudinal"),
    (150.0, 0, 0.0, "longitudinal"), (30.1, 0, 0.0, "diagonal"), (60.0, 0, 0.0, "circumferential"),
    (120.0, 0, 0.0, "circumferential"), (120.1, 0, 0.0, "diagonal"), (59.9, 0, 0.0, "diagonal"),
    (45.0, 3, 0.5, "network"), (45.0, 2, 0.9, "diagonal"), (10.0, 5, 0.05, "longitudinal"),
])
def test_classify_type(orientation, junctions, ratio, expected):
    assert classify_type(orientation, junctions, ratio) == expected


# --- components and filters ---------------------------------------------------------------------

def test_two_separate_lines_give_two_records_in_bbox_order():
    prob = bar(300, 50, 200, 3) + bar(20, 300, 150, 3)
    mask, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY)
    assert [r.index for r in records] == [0, 1]
    assert [r.bbox_px for r in records] == [(20, 300, 150, 3), (300, 50, 200, 3)]
    assert records[0].length_px == pytest.approx(150, rel=0.02)
    assert records[1].length_px == pytest.approx(200, rel=0.02)
    assert mask.dtype == np.uint8 and mask.shape == FRAME
    assert set(np.unique(mask)) == {0, 255}
    assert (mask > 0).sum() == 150 * 3 + 200 * 3


@pytest.mark.parametrize("gap, expected", [(1, 1), (2, 1), (4, 2)])
def test_small_gaps_are_closed(gap, expected):
    prob = bar(20, 100, 100, 3) + bar(120 + gap, 100, 100, 3)
    mask, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY)
    assert len(records) == expected
    if expected == 1:
        assert records[0].length_px == pytest.approx(200 + gap, rel=0.02)
        assert mask[100:103, 120:120 + gap].all()  # the gap is part of the crack's mask


def test_min_area_drops_small_blobs():
    prob = bar(100, 100, 200, 3)
    prob[300:305, 500:505] = 1.0  # 25 px
    mask, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY, min_area_px=40)
    assert len(records) == 1 and records[0].bbox_px == (100, 100, 200, 3)
    assert not mask[300:305, 500:505].any()
    _, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY, min_area_px=20)
    assert len(records) == 2


def test_min_length_drops_short_cracks():
    prob = bar(100, 100, 200, 3) + bar(100, 200, 20, 3)  # 100 mm and 10 mm
    mask, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY, min_length_mm=20.0)
    assert len(records) == 1 and records[0].bbox_px == (100, 100, 200, 3)
    assert not mask[200:203].any()


def test_min_elongation_drops_blobs_but_keeps_thin_cracks():
    prob = bar(100, 100, 200, 3)  # a crack: 100 mm long, 1.5 mm wide, elongation ~67
    cv2.circle(prob, (400, 250), 20, 1.0, -1)  # a bolt pocket: 41 px across, elongation ~1
    prob[300:306, 500:530] = 1.0  # a short stub: 30 x 6 px, elongation ~5
    mask, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY, min_elongation=4.0)
    assert sorted(r.bbox_px for r in records) == [(100, 100, 200, 3), (500, 300, 30, 6)]
    assert not mask[230:270, 380:420].any()
    _, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY, min_elongation=0.0)
    assert len(records) == 3


def test_threshold_applies_to_the_probability():
    prob = bar(100, 100, 200, 3, value=0.4)
    assert measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY)[1] == []
    assert len(measure_cracks(prob, 0.3, SQUARE, 0.0, SEVERITY)[1]) == 1


def test_all_zero_probability_gives_no_cracks():
    mask, records = measure_cracks(np.zeros(FRAME, np.float32), 0.5, SQUARE, 12.0, SEVERITY)
    assert records == []
    assert mask.shape == FRAME and mask.dtype == np.uint8 and not mask.any()


@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_components_of_the_foreground_window_are_those_of_the_whole_frame(seed, blobs, edge):
    """Labelling only the window round the foreground gives what closing and labelling the
    whole frame gives: the same labels, stats and centroids, blobs at the frame's edges too."""
    rng = np.random.default_rng(seed)
    binary = np.zeros((60, 90), bool)
    for _ in range(blobs):
        y, x = rng.integers(0, 60), rng.integers(0, 90)
        binary[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
    if edge:  # a line along one edge of the frame
        binary[[0, -1, 5, 30][edge], :] = True
    closed = cv2.morphologyEx(binary.astype(np.uint8), cv2.MORPH_CLOSE, CLOSING_KERNEL)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(closed, connectivity=8,
                                                                       ltype=cv2.CV_32S)
    found = closed_components(binary)
    assert found is not None
    w_count, w_labels, w_stats, w_centroids, (x0, y0) = found
    assert w_count == count
    pasted = np.zeros_like(labels)
    pasted[y0:y0 + w_labels.shape[0], x0:x0 + w_labels.shape[1]] = w_labels
    assert np.array_equal(pasted, labels)
    assert np.array_equal(w_stats[1:], stats[1:])
    assert np.allclose(w_centroids[1:], centroids[1:])


@pytest.mark.parametrize("seed", range(5))
def test_local_median_is_the_median_of_the_nodes_in_each_window(seed):
    """The sort-based median equals numpy's nanmedian over each node's window, node by node."""
    rng = np.random.default_rng(seed)
    skeleton = rng.random((40, 60)) < 0.3
    graph = SkeletonGraph.from_skeleton(skeleton)
    values = rng.random(len(graph)).round(1)  # ties, as pixel widths have
    radius = 3
    expected = []
    for x, y in zip(graph.x, graph.y, strict=True):
        near = (np.abs(graph.x - x) <= radius) & (np.abs(graph.y - y) <= radius)
        expected.append(np.median(values[near]))
    assert np.array_equal(local_median(graph, values, radius), np.array(expected))


def test_no_foreground_has_no_components():
    assert closed_components(np.zeros(FRAME, bool)) is None


# --- tunnel coordinates -------------------------------------------------------------------------

@pytest.mark.parametrize("direction", [1, -1])
def test_chainage_and_arc_of_a_crack_on_the_right_half(direction):
    camera = CameraConfig(mm_per_px_along=1.0, mm_per_px_across=2.0, direction=direction,
                          arc_offset_mm=1000.0)
    crack = one_crack(bar(401, 100, 200, 3), camera, chainage_m=100.0)
    # columns 401..600 of 640, centre column 319.5, 1 mm/px:
    # offsets (401 - 319.5) mm = 81.5 mm .. (600 - 319.5) mm = 280.5 mm; centroid x 500.5
    if direction == 1:
        assert crack.chainage_m > 100.0
        assert (crack.chainage_start_m, crack.chainage_end_m) == (100.0815, 100.2805)
        assert crack.chainage_m == pytest.approx(100.181)
    else:
        assert crack.chainage_m < 100.0
        assert (crack.chainage_start_m, crack.chainage_end_m) == (99.7195, 99.9185)
        assert crack.chainage_m == pytest.approx(99.819)
    # rows 100..102, centroid row 101: arc 1000 + 101 * 2 mm
    assert crack.arc_mm == pytest.approx(1202.0)
    assert crack.orientation_deg == pytest.approx(0.0, abs=0.5) or crack.orientation_deg > 179.5
    for chainage, _ in crack.polyline:
        assert crack.chainage_start_m - 1e-9 <= chainage <= crack.chainage_end_m + 1e-9


def test_along_axis_y_swaps_the_image_axes():
    camera = CameraConfig(mm_per_px_along=1.0, mm_per_px_across=2.0, along_axis="y")
    vertical = one_crack(bar(50, 201, 100, 3, vertical=True), camera, chainage_m=10.0)
    # rows run along the tunnel now: 100 px * 1 mm long, 3 columns * 2 mm wide, longitudinal
    assert vertical.type == "longitudinal"
    assert vertical.length_mm == pytest.approx(100, rel=0.02)
    assert vertical.width_max_mm == pytest.approx(6.0)
    # rows 201..300 of 360, centre row 179.5: (201 - 179.5) mm .. (300 - 179.5) mm
    assert (vertical.chainage_start_m, vertical.chainage_end_m) == (10.0215, 10.1205)
    assert vertical.arc_mm == pytest.approx(51 * 2.0)  # centroid column 51
    horizontal = one_crack(bar(100, 50, 100, 3), camera, chainage_m=10.0)
    assert horizontal.type == "circumferential"
    assert horizontal.length_mm == pytest.approx(200, rel=0.02)
    assert horizontal.width_max_mm == pytest.approx(3.0, rel=0.02)  # see test_anisotropic_pixels
    # its three rows 50..52: (50 - 179.5) mm .. (52 - 179.5) mm
    assert (horizontal.chainage_start_m, horizontal.chainage_end_m) == (9.8705, 9.8725)


def test_polyline_runs_end_to_end_in_pixels_and_tunnel_units():
    p0, p1 = (100.0, 80.0), (300.0, 180.0)
    crack = one_crack(capsule(p0, p1, 3), chainage_m=50.0)
    ends = sorted([crack.polyline_px[0], crack.polyline_px[-1]])
    assert math.dist(ends[0], p0) <= 3.0 and math.dist(ends[1], p1) <= 3.0
    assert 2 <= len(crack.polyline_px) <= 4  # a straight crack simplifies to a few points
    for (x, y), (chainage, arc) in zip(crack.polyline_px, crack.polyline, strict=True):
        assert chainage == pytest.approx(50.0 + (x - 319.5) * 0.5 / 1000, abs=1e-4)
        assert arc == pytest.approx(y * 0.5, abs=0.01)


# --- the record ---------------------------------------------------------------------------------

def test_record_is_plain_json_and_round_trips():
    crack = one_crack(bar(100, 100, 200, 7, value=0.8))
    raw = json.loads(json.dumps(crack.to_dict()))
    assert CrackRecord.from_dict(raw) == crack
    assert crack.score_mean == pytest.approx(0.8)
    assert crack.bbox_px == (100, 100, 200, 7)
    assert all(type(v) is float for v in (crack.length_mm, crack.width_max_mm, crack.chainage_m,
                                          crack.orientation_deg, crack.score_mean))
    assert type(crack.area_px) is int and all(type(v) is int for v in crack.bbox_px)
    # width 7 px * 0.5 mm = 3.5 mm: between 3 and 5 mm
    assert crack.severity == "wide" == SEVERITY.classify(crack.width_max_mm)


def test_a_few_cracks_take_milliseconds():
    prob = np.zeros(FRAME, np.float32)
    cv2.line(prob, (20, 30), (300, 60), 1.0, thickness=3)
    cv2.line(prob, (400, 20), (420, 340), 0.8, thickness=2)
    cv2.line(prob, (100, 300), (350, 250), 0.9, thickness=1)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        _, records = measure_cracks(prob, 0.5, SQUARE, 0.0, SEVERITY)
        timings.append(time.perf_counter() - started)
    assert len(records) == 3
    assert min(timings) < 0.05, f"{min(timings) * 1000:.1f} ms"  # a per-pixel loop takes seconds


# --- helpers ------------------------------------------------------------------------------------

def skeleton_of(points, shape=(12, 12)) -> np.ndarray:
    image = np.zeros(shape, bool)
    for x, y in points:
        image[y, x] = True
    return image


def test_skeleton_length_counts_steps_once():
    straight = skeleton_of([(x, 0) for x in range(10)])
    assert skeleton_length(straight) == pytest.approx(9)
    assert skeleton_length(straight, sx=0.5, sy=2.0) == pytest.approx(4.5)
    staircase = skeleton_of([(i, i) for i in range(10)])
    assert skeleton_length(staircase) == pytest.approx(9 * math.sqrt(2))
    assert skeleton_length(staircase, sx=0.5, sy=2.0) == pytest.approx(9 * math.hypot(0.5, 2.0))
    # an L: 9 steps right, 9 steps down; the corner's diagonal is not a tenth edge
    ell = skeleton_of([(x, 0) for x in range(10)] + [(9, y) for y in range(1, 10)])
    assert skeleton_length(ell) == pytest.approx(18)
    corner = skeleton_of([(0, 0), (1, 0), (1, 1)])
    assert skeleton_edges(corner).shape == (2, 4)
    assert skeleton_length(corner) == pytest.approx(2)


def test_longest_path_skips_the_short_branch():
    tee = skeleton_of([(x, 2) for x in range(11)] + [(5, y) for y in range(3, 7)], (12, 12))
    path = longest_path(SkeletonGraph.from_skeleton(tee))
    assert sorted([tuple(path[0]), tuple(path[-1])]) == [(0, 2), (10, 2)]
    assert len(path) == 11


def test_width_at_the_centre_line_of_a_bar():
    component = bar(2, 2, 20, 5, shape=(9, 24)) > 0
    distance = distance_to_background(component)
    assert width_px_at(distance, np.array([10]), np.array([4])).tolist() == [5.0]
    assert width_px_at(distance, np.array([10]), np.array([2])).tolist() == [1.0]  # clipped


def test_width_mm_factor_uses_the_scale_across_the_skeleton():
    assert width_mm_factor(np.array(0.0), 0.5, 2.0) == pytest.approx(2.0)  # runs along x
    assert width_mm_factor(np.array(math.pi / 2), 0.5, 2.0) == pytest.approx(0.5)
    assert width_mm_factor(np.array(0.7), 0.8, 0.8) == pytest.approx(0.8)


def test_orientation_is_measured_in_millimetres():
    points = np.array([[0, 0], [10, 10], [20, 20]])  # 45 degrees in pixels
    square, _ = orientation_deg(points, SQUARE)
    assert square == pytest.approx(45)
    stretched, ratio = orientation_deg(points, CameraConfig(mm_per_px_along=1.0,
                                                            mm_per_px_across=3.0))
    assert stretched == pytest.approx(math.degrees(math.atan2(3, 1)))
    assert ratio == pytest.approx(0.0, abs=1e-12)


# --- the maximum width a crack is graded by -----------------------------------------------

def test_a_branch_point_does_not_set_the_maximum_width():
    stroke = np.maximum(bar(100, 80, 200, 5), bar(198, 40, 90, 5, vertical=True))  # a cross
    crack = one_crack(stroke)
    raw = measure_component(stroke > 0.5)
    assert raw.width_px.max() >= 6.5  # the inscribed circle at the crossing is wider
    assert crack.width_max_px == 5 and crack.width_max_mm == pytest.approx(2.5)


def test_a_wide_stretch_sets_the_maximum_width():
    stroke = bar(100, 80, 200, 5)
    stroke[78:87, 180:220] = 1.0  # 40 px of the stroke are 9 px wide
    crack = one_crack(stroke)
    assert crack.width_max_px == 9 and crack.width_max_mm == pytest.approx(4.5)
    assert crack.width_p95_mm == pytest.approx(4.5)


# --- straight lines are joints and cable edges, not cracks -------------------------------------

def wavy_crack(amplitude_px: float, length_px: int = 240, width: int = 3) -> np.ndarray:
    """A crack that wanders ``amplitude_px`` either side of a horizontal line."""
    prob = np.zeros(FRAME, np.float32)
    xs = np.arange(100, 100 + length_px)
    ys = 150 + amplitude_px * np.sin(np.linspace(0, 3 * np.pi, len(xs)))
    points = np.stack([xs, ys], axis=1).round().astype(np.int32)
    cv2.polylines(prob, [points.reshape(-1, 1, 2)], False, 1.0, width)
    return prob


def test_chord_deviation_of_straight_and_bent_paths():
    straight = np.stack([np.arange(0, 100), np.full(100, 7)], axis=1)
    assert chord_deviation(straight) == 0.0
    bent = np.array([[0, 0], [50, 10], [100, 0]])
    assert chord_deviation(bent) == pytest.approx(10.0)


@pytest.mark.parametrize("vertical", [False, True], ids=["horizontal", "vertical"])
def test_a_long_straight_line_is_not_a_crack(vertical):
    joint = bar(100, 40, 300, 5, vertical=vertical)
    _, records = measure_cracks(joint, 0.5, SQUARE, 0.0, SEVERITY, straight_max_deviation=0.01)
    assert records == []
    assert len(one_crack(joint, straight_max_deviation=0.0).bbox_px) == 4  # the filter off


def test_a_wandering_crack_and_a_short_straight_one_stay_cracks():
    for amplitude in (8.0, 15.0):  # 3-6 % of its length off the chord, as labelled cracks are
        one_crack(wavy_crack(amplitude), straight_max_deviation=0.01)
    one_crack(bar(100, 80, 80, 3), straight_max_deviation=0.01, straight_min_length_px=100)
    _, records = measure_cracks(wavy_crack(1.0), 0.5, SQUARE, 0.0, SEVERITY,
                                straight_max_deviation=0.01)
    assert records == []  # 1 px of wander over 240 px is a line


def lit(prob: np.ndarray, inside: float, outside: float = 150.0, seed: int = 0) -> np.ndarray:
    """A grey frame: ``inside`` where ``prob`` is set, ``outside`` elsewhere, a little noise."""
    noise = np.random.default_rng(seed).normal(0, 3, prob.shape)
    return np.clip(np.where(prob > 0.5, inside, outside) + noise, 0, 255).astype(np.uint8)


def test_cross_profiles_read_the_centre_and_both_sides():
    stroke = wavy_crack(8.0, width=5)
    grey = lit(stroke, inside=60.0)
    crack = measure_component(stroke > 0.5)
    profiles = cross_profiles(grey, crack)
    assert 0 < len(profiles) <= 200
    centre, one, other = np.median(profiles, axis=0)
    assert centre == pytest.approx(60, abs=6)
    assert one == pytest.approx(150, abs=6) and other == pytest.approx(150, abs=6)
    assert line_share(profiles) > 0.9
    assert line_share(np.zeros((0, 3))) == 1.0


def test_a_dark_or_a_light_crack_stays_a_crack_and_an_edge_does_not():
    stroke = wavy_crack(8.0)
    for inside in (70.0, 230.0):  # darker than its sides, or lighter (filled with efflorescence)
        _, records = measure_cracks(stroke, 0.5, SQUARE, 0.0, SEVERITY,
                                    grey=lit(stroke, inside=inside), line_min_share=0.2)
        assert len(records) == 1
    # a stain's rim: the model marks the edge of a dark region; across it, one side dark, one light
    rows = np.arange(FRAME[0])[:, None] + 8 * np.sin(np.arange(FRAME[1]) / 40.0)[None, :]
    rim = np.where(rows < 150, 80.0, 170.0).astype(np.uint8)
    edge = ((rows >= 148) & (rows < 152)).astype(np.float32)
    edge[:, :100] = 0
    edge[:, 400:] = 0
    _, records = measure_cracks(edge, 0.5, SQUARE, 0.0, SEVERITY, grey=rim, line_min_share=0.2)
    assert records == []
    _, records = measure_cracks(edge, 0.5, SQUARE, 0.0, SEVERITY, grey=rim, line_min_share=0.0)
    assert len(records) == 1  # the rule off
    _, records = measure_cracks(edge, 0.5, SQUARE, 0.0, SEVERITY, line_min_share=0.2)
    assert len(records) == 1  # no image, no profile
