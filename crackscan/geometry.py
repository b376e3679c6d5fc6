"""Crack geometry: one frame's crack probability map in, measured cracks (:class:`CrackRecord`) out.

Owns the measurement conventions that the database and the reports rely on:

- Pixels and tunnel coordinates. The camera's ``along_axis`` image axis runs along the tunnel at
  ``mm_per_px_along``; the other axis runs round the ring at ``mm_per_px_across``. The frame's
  ``chainage_m`` is that of the image centre, so a pixel at along-coordinate ``u`` lies at
  ``chainage_m + direction * (u - (N_along - 1) / 2) * mm_per_px_along / 1000``, and a pixel at
  across-coordinate ``v`` at ring arc ``arc_offset_mm + v * mm_per_px_across``.
- Length is the sum of the skeleton's 8-neighbour steps (side steps count 1 px, diagonal ones
  sqrt(2), each converted with the per-axis scale) plus half the local width at each endpoint.
  Like any such chain code it is exact along the axes and the diagonals and up to ~8 % long in
  between (a digital line at 22.5 degrees).
- Width is 2 d - 1 px (d: distance transform) on the skeleton, converted to mm with the scale
  across the local skeleton direction (the principal axis of the skeleton pixels within
  DIRECTION_RADIUS_PX), so non-square pixels give the right width for any crack direction.
- Orientation is the skeleton's principal axis in mm (not pixel) space, in the (chainage, arc)
  plane.
- Every float in a record is a plain, rounded Python float, ready for JSON.

Image points are (x, y) = (column, row), as OpenCV has them. Functions that take a ``component``
or a ``skeleton`` take a boolean image of one connected crack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from skimage.morphology import skeletonize

from crackscan.config import CameraConfig, SeverityConfig
from crackscan.wire import CrackRecord, FeatureRecord

CLOSING_KERNEL = np.ones((3, 3), np.uint8)  # rejoins a crack broken by one or two pixels
DIRECTION_RADIUS_PX = 5  # local skeleton direction from the skeleton pixels within this window
# The maximum width is the largest width sustained over a stretch of the skeleton: the median over
# the skeleton pixels within this window round each one (an 11 px stretch), so a one-pixel spike
# (a branch point's blob, a ragged edge) does not set the crack's severity (docs/geometry.md).
SUSTAINED_RADIUS_PX = 5
POLYLINE_EPSILON_PX = 1.5  # cv2.approxPolyDP tolerance of the reported polyline
JUNCTION_MERGE_PX = 2.9  # branch points up to 2 px apart (2.83 diagonally) are one junction

# Crack type. Angles are to the tunnel axis; "within 30 degrees" is inclusive.
TYPE_TOLERANCE_DEG = 30.0
# "network": at least this many junctions, and a skeleton that is not elongated: the ratio of the
# minor to the major PCA eigenvalue (variances, in mm^2) is at least NETWORK_MIN_EIGEN_RATIO. 0.1
# is a spread across of about a third of the spread along (sqrt(0.1) = 0.32): a grid or a mesh
# passes; a long crack with a few side branches does not, and is typed by its orientation.
NETWORK_MIN_JUNCTIONS = 3
NETWORK_MIN_EIGEN_RATIO = 0.1


# --- camera mapping -----------------------------------------------------------------------------

def image_scales(camera: CameraConfig) -> tuple[float, float]:
    """(mm per pixel along image x, mm per pixel along image y) of this camera."""
    if camera.along_axis == "x":
        return camera.mm_per_px_along, camera.mm_per_px_across
    return camera.mm_per_px_across, camera.mm_per_px_along


def to_tunnel(x: np.ndarray | float, y: np.ndarray | float, shape: tuple[int, int],
              camera: CameraConfig, chainage_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(chainage m, ring arc mm) of image points (x, y) in a frame of ``shape`` (H, W) whose
    centre lies at ``chainage_m``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    u, v = (x, y) if camera.along_axis == "x" else (y, x)
    n_along = shape[1] if camera.along_axis == "x" else shape[0]
    offset_mm = (u - (n_along - 1) / 2) * camera.mm_per_px_along
    return (chainage_m + camera.direction * offset_mm / 1000,
            camera.arc_offset_mm + v * camera.mm_per_px_across)


def to_tunnel_mm(x: np.ndarray, y: np.ndarray, camera: CameraConfig) -> np.ndarray:
    """Nx2 (mm along the tunnel towards growing chainage, mm round the ring towards growing arc)
    of image points, relative to the image origin: the frame in which angles are measured."""
    u, v = (x, y) if camera.along_axis == "x" else (y, x)
    return np.stack([camera.direction * np.asarray(u, np.float64) * camera.mm_per_px_along,
                     np.asarray(v, np.float64) * camera.mm_per_px_across], axis=1)


# --- skeleton graph -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SkeletonGraph:
    """A skeleton's pixel graph. Nodes are the skeleton pixels (row-major order, as
    ``np.nonzero`` gives them); edges join 8-neighbours, except that a diagonal pair is no edge
    when a pixel touching both by a side is also in the skeleton: at an L-shaped corner the two
    side steps already join the pair, and the diagonal would count that stretch twice."""

    x: np.ndarray  # node columns
    y: np.ndarray  # node rows
    start: np.ndarray  # edge -> node
    end: np.ndarray  # edge -> node

    @classmethod
    def from_skeleton(cls, skeleton: np.ndarray) -> SkeletonGraph:
        y, x = np.nonzero(skeleton)
        width = skeleton.shape[1] + 2  # a 1-px frame of -1 round the id image: no bounds checks
        ids = np.full((skeleton.shape[0] + 2) * width, -1, np.int32)
        flat = (y + 1) * width + (x + 1)
        ids[flat] = np.arange(len(x))
        right, down, left = ids[flat + 1], ids[flat + width], ids[flat - 1]
        down_right = np.where((right < 0) & (down < 0), ids[flat + width + 1], -1)
        down_left = np.where((left < 0) & (down < 0), ids[flat + width - 1], -1)
        ends = np.concatenate([right, down, down_right, down_left])
        starts = np.tile(np.arange(len(x)), 4)
        return cls(x=x, y=y, start=starts[ends >= 0], end=ends[ends >= 0])

    def __len__(self) -> int:
        return len(self.x)

    def edge_lengths(self, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
        """Length of every edge with ``sx`` / ``sy`` units per pixel step along x / y."""
        return np.hypot((self.x[self.end] - self.x[self.start]) * sx,
                        (self.y[self.end] - self.y[self.start]) * sy)

    def degrees(self) -> np.ndarray:
        """Per node: 0 isolated, 1 endpoint, 2 on a line, 3 or more a branch point."""
        return np.bincount(np.concatenate([self.start, self.end]), minlength=len(self))

    def adjacency(self) -> csr_matrix:
        """Symmetric sparse adjacency (both directions stored) weighted by each step's pixel
        length; built straight in CSR form, as scipy's conversions cost more than the search."""
        n = len(self)
        rows = np.concatenate([self.start, self.end])
        order = np.argsort(rows, kind="stable")
        weights = self.edge_lengths()
        indptr = np.zeros(n + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return csr_matrix((np.concatenate([weights, weights])[order],
                           np.concatenate([self.end, self.start])[order].astype(np.int32), indptr),
                          shape=(n, n))

    def subgraph(self, keep: np.ndarray) -> SkeletonGraph:
        """The graph on the nodes where ``keep`` is true (edges between kept nodes)."""
        new_id = np.cumsum(keep) - 1
        edge_kept = keep[self.start] & keep[self.end]
        return SkeletonGraph(x=self.x[keep], y=self.y[keep], start=new_id[self.start[edge_kept]],
                             end=new_id[self.end[edge_kept]])


def skeleton_edges(skeleton: np.ndarray) -> np.ndarray:
    """Edges of the skeleton's pixel graph (see :class:`SkeletonGraph`) as rows (x0, y0, x1, y1)."""
    graph = SkeletonGraph.from_skeleton(np.asarray(skeleton, bool))
    return np.stack([graph.x[graph.start], graph.y[graph.start],
                     graph.x[graph.end], graph.y[graph.end]], axis=1)


def skeleton_length(skeleton: np.ndarray, sx: float = 1.0, sy: float = 1.0) -> float:
    """Sum of the skeleton's edge lengths (a side step counts sx or sy, a diagonal one
    hypot(sx, sy)), without the endpoint correction that :func:`measure_cracks` adds."""
    return float(SkeletonGraph.from_skeleton(np.asarray(skeleton, bool)).edge_lengths(sx, sy).sum())


def prune_spurs(graph: SkeletonGraph, width_px: np.ndarray) -> SkeletonGraph:
    """``graph`` without its spurs: terminal branches (endpoint up to, not including, the first
    branch point) shorter, endpoint to branch point in pixels, than the crack width there. Such
    branches are thinning artefacts (the forks at a blunt tip, bumps of the outline), not cracks;
    the endpoint correction of :func:`measure_component` then accounts for the tip. One pass."""
    degree = graph.degrees()
    if not (degree >= 3).any():
        return graph
    adjacency = graph.adjacency()
    indptr, indices, weights = adjacency.indptr, adjacency.indices, adjacency.data
    keep = np.ones(len(graph), bool)
    longest_spur = width_px.max()
    for node in np.flatnonzero(degree == 1):
        branch, length, previous = [node], 0.0, -1
        while True:
            current = branch[-1]
            row = slice(indptr[current], indptr[current + 1])
            step = [(n, w) for n, w in zip(indices[row], weights[row], strict=True)
                    if n != previous]
            if len(step) != 1:
                break
            following, weight = step[0]
            length += weight
            if degree[following] >= 3:
                if length < width_px[following]:
                    keep[branch] = False
                break
            if length >= longest_spur:
                break
            previous = current
            branch.append(following)
    return graph.subgraph(keep)


def count_junctions(graph: SkeletonGraph, merge_px: float = JUNCTION_MERGE_PX) -> int:
    """Number of junctions: branch points (degree >= 3) within ``merge_px`` of each other count
    once, since thinning splits a thick crossing into two nearby branch points."""
    branch = np.flatnonzero(graph.degrees() >= 3)
    if len(branch) < 2:
        return len(branch)
    points = np.stack([graph.x[branch], graph.y[branch]], axis=1).astype(np.float64)
    close = np.linalg.norm(points[:, None] - points[None], axis=2) <= merge_px
    return int(connected_components(csr_matrix(close), directed=False)[0])


def longest_path(graph: SkeletonGraph) -> np.ndarray:
    """Nx2 (x, y) pixels of the longest path through the skeleton, end to end.

    Two shortest-path sweeps (a breadth-first search weighted by the step length, 1 or sqrt(2)):
    the node farthest from any start is one end of the longest path, the node farthest from that
    one the other end. Exact on a tree, which a skeleton nearly always is. A skeleton in several
    pieces is searched in its largest piece.
    """
    if len(graph) == 0:
        return np.zeros((0, 2), np.int64)
    adjacency = graph.adjacency()  # symmetric, so searched as directed: no transposed copy
    _, piece = connected_components(adjacency, directed=True, connection="strong")
    start = int(np.argmax(piece == np.bincount(piece).argmax()))
    distance = dijkstra(adjacency, directed=True, indices=start)
    end_a = int(np.argmax(np.where(np.isfinite(distance), distance, -1.0)))
    distance, previous = dijkstra(adjacency, directed=True, indices=end_a,
                                  return_predecessors=True)
    node = int(np.argmax(np.where(np.isfinite(distance), distance, -1.0)))
    path = [node]
    while node != end_a:
        node = int(previous[node])
        path.append(node)
    path = np.asarray(path[::-1])
    return np.stack([graph.x[path], graph.y[path]], axis=1)


def _windows(graph: SkeletonGraph, radius: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """For every node, the (2 radius + 1)^2 window round it on a padded grid: (N x W flat grid
    indices, the flat index of every node, offsets dx and dy of the W window cells, grid size)."""
    offsets = np.arange(-radius, radius + 1)
    dx, dy = (a.ravel() for a in np.meshgrid(offsets, offsets))
    width = graph.x.max() + 2 * radius + 1
    flat = (graph.y + radius) * width + graph.x + radius
    cells = (graph.y.max() + 2 * radius + 1) * width
    return flat[:, None] + (dy * width + dx)[None, :], flat, np.stack([dx, dy]), cells


def skeleton_directions(graph: SkeletonGraph, radius: int = DIRECTION_RADIUS_PX) -> np.ndarray:
    """Local direction of the skeleton at every node, radians in pixel space (0 along +x, pi/2
    along +y, range [-pi/2, pi/2]): the principal axis of the skeleton pixels within the
    (2 radius + 1)^2 window round the node, from window moments (one gather, one matmul)."""
    if len(graph) == 0:
        return np.zeros(0)
    cells, flat, (dx, dy), size = _windows(graph, radius)
    present = np.zeros(size, np.float32)
    present[flat] = 1.0
    window = present[cells]  # N x (2 radius + 1)^2
    moments = window @ np.stack([np.ones_like(dx), dx, dy, dx * dx, dy * dy, dx * dy],
                                axis=1).astype(np.float32)
    moments = moments.astype(np.float64)
    count, mean_x, mean_y = moments[:, 0], moments[:, 1], moments[:, 2]
    mean_x, mean_y = mean_x / count, mean_y / count
    cov_xx = moments[:, 3] / count - mean_x**2
    cov_yy = moments[:, 4] / count - mean_y**2
    cov_xy = moments[:, 5] / count - mean_x * mean_y
    return 0.5 * np.arctan2(2 * cov_xy, cov_xx - cov_yy)


def local_median(graph: SkeletonGraph, values: np.ndarray,
                 radius: int = SUSTAINED_RADIUS_PX) -> np.ndarray:
    """Per node, the median of ``values`` over the skeleton nodes within the (2 radius + 1)^2
    window round it: a width profile along the crack without its one-pixel spikes."""
    if len(graph) == 0:
        return np.zeros(0)
    cells, flat, _, size = _windows(graph, radius)
    grid = np.full(size, np.nan)
    grid[flat] = values
    # np.nanmedian's result, without its masked-array path (most of a crack's measuring time):
    # sorted, NaN comes last, and the middle of each row's n values is at (n - 1) // 2, n // 2
    window = np.sort(grid[cells], axis=1)
    count = np.count_nonzero(~np.isnan(window), axis=1)
    rows = np.arange(len(window))
    return (window[rows, (count - 1) // 2] + window[rows, count // 2]) / 2


def distance_to_background(component: np.ndarray) -> np.ndarray:
    """Euclidean distance (cv2, precise mask) of every pixel to the nearest background pixel,
    0 on the background; the image edge counts as background."""
    padded = np.pad(np.asarray(component, np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def width_px_at(distance: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Crack width in pixels at (skeleton) pixels (x, y): ``2 d - 1``, clipped to >= 1, where
    ``d`` is :func:`distance_to_background`. A stroke of odd width w has d = (w + 1) / 2 on its
    centre line. The width is across the skeleton in pixel space; :func:`width_mm_factor` turns
    it into mm."""
    return np.maximum(2.0 * distance[y, x] - 1.0, 1.0)


def step_mm_factor(theta: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """mm per pixel of a step in pixel-space direction ``theta``."""
    return np.hypot(sx * np.cos(theta), sy * np.sin(theta))


def width_mm_factor(theta: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """mm per pixel of a width measured across a skeleton running in pixel direction ``theta``.

    With non-square pixels the pixel-space perpendicular is not the mm-space one. A strip between
    two parallel crack edges ``w`` px apart scales its area by sx * sy and its length by
    :func:`step_mm_factor`, so its width in mm is w * sx * sy / step_mm_factor: sy for a crack
    along x, sx for one along y, s for square pixels, and exact for any straight stretch.
    """
    return sx * sy / step_mm_factor(theta, sx, sy)


# --- shape descriptors --------------------------------------------------------------------------

def principal_axis(points: np.ndarray) -> tuple[float, float]:
    """(angle of the major axis, degrees in [0, 180) from the first coordinate axis towards the
    second; minor / major eigenvalue ratio in [0, 1]) of Nx2 points. One point: (0, 0)."""
    if len(points) < 2:
        return 0.0, 0.0
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(np.asarray(points, np.float64),
                                                      rowvar=False))
    major = eigenvectors[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0])) % 180.0
    ratio = float(eigenvalues[0] / eigenvalues[1]) if eigenvalues[1] > 0 else 0.0
    return angle, max(ratio, 0.0)


def orientation_deg(points_xy: np.ndarray, camera: CameraConfig) -> tuple[float, float]:
    """(orientation to the tunnel axis in [0, 180), minor / major eigenvalue ratio) of Nx2 image
    points (x, y), usually a crack's skeleton. Measured in mm in the (chainage, arc) plane, from
    the direction of growing chainage towards growing arc: 0 along the tunnel, 90 round the ring."""
    points_xy = np.asarray(points_xy)
    return principal_axis(to_tunnel_mm(points_xy[:, 0], points_xy[:, 1], camera))


def classify_type(orientation: float, junctions: int, eigen_ratio: float) -> str:
    """longitudinal | circumferential | diagonal | network (thresholds: module constants)."""
    if junctions >= NETWORK_MIN_JUNCTIONS and eigen_ratio >= NETWORK_MIN_EIGEN_RATIO:
        return "network"
    off_axis = min(orientation % 180.0, 180.0 - orientation % 180.0)  # 0..90 from the tunnel axis
    if off_axis <= TYPE_TOLERANCE_DEG:
        return "longitudinal"
    if off_axis >= 90.0 - TYPE_TOLERANCE_DEG:
        return "circumferential"
    return "diagonal"


# --- measurement --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComponentGeometry:
    """Skeleton measurements of one component, points in frame pixels."""

    length_px: float
    length_mm: float
    width_px: np.ndarray  # per skeleton pixel
    width_mm: np.ndarray  # per skeleton pixel
    sustained_px: np.ndarray  # per skeleton pixel: local_median of width_px
    sustained_mm: np.ndarray  # per skeleton pixel: local_median of width_mm
    skeleton_xy: np.ndarray  # Nx2
    theta: np.ndarray  # per skeleton pixel: local direction, radians in pixel space
    junctions: int
    path_xy: np.ndarray  # the longest path, Nx2, unsimplified


def measure_component(component: np.ndarray, origin: tuple[int, int] = (0, 0), sx: float = 1.0,
                      sy: float = 1.0) -> ComponentGeometry:
    """Length, widths, skeleton, junctions and longest path of one component: a boolean image
    (usually a crop) whose top-left pixel is ``origin`` = (x, y) in the frame; ``sx`` / ``sy``
    mm per pixel along x / y."""
    component = np.asarray(component, bool)
    skeleton = skeletonize(component)
    distance = distance_to_background(component)
    if not skeleton.any():  # thinning keeps a pixel of any non-empty shape; be safe anyway
        skeleton[np.unravel_index(np.argmax(distance), distance.shape)] = True
    graph = SkeletonGraph.from_skeleton(skeleton)
    graph = prune_spurs(graph, width_px_at(distance, graph.x, graph.y))
    width_px = width_px_at(distance, graph.x, graph.y)
    theta = skeleton_directions(graph)
    degree = graph.degrees()

    # Thinning stops about half the local width short of each end of a stroke (the skeleton ends
    # where the tip is as far away as the sides), so each endpoint gets half its local width back,
    # along the local direction. An isolated pixel is both ends of a crack.
    width_mm = width_px * width_mm_factor(theta, sx, sy)
    ends = np.where(degree == 0, 2, np.where(degree == 1, 1, 0))
    tip_px = ends * width_px / 2
    shift = np.asarray(origin)
    return ComponentGeometry(
        length_px=float(graph.edge_lengths().sum() + tip_px.sum()),
        length_mm=float(graph.edge_lengths(sx, sy).sum()
                        + (tip_px * step_mm_factor(theta, sx, sy)).sum()),
        width_px=width_px,
        width_mm=width_mm,
        sustained_px=local_median(graph, width_px),
        sustained_mm=local_median(graph, width_mm),
        skeleton_xy=np.stack([graph.x, graph.y], axis=1) + shift,
        theta=theta,
        junctions=count_junctions(graph),
        path_xy=longest_path(graph) + shift,
    )


def chord_deviation(path_xy: np.ndarray) -> float:
    """The largest distance (px) of a path's points from the straight line through its two ends:
    about a pixel for a joint or a cable edge hundreds of pixels long, a few percent of the length
    for a crack (its median over the labelled crack sets is 4-5 %, docs/geometry.md)."""
    path = np.asarray(path_xy, np.float64)
    if len(path) < 3:
        return 0.0
    chord = path[-1] - path[0]
    norm = float(np.hypot(*chord))
    if norm == 0.0:
        return float(np.hypot(*(path - path[0]).T).max())
    offsets = path - path[0]
    return float(np.abs(offsets[:, 0] * chord[1] - offsets[:, 1] * chord[0]).max() / norm)


PROFILE_GAP_PX = 2.0  # the sides of a cross profile are read this far beyond the local edge ...
PROFILE_SPAN_PX = 3  # ... averaged over this many pixels outward
PROFILE_POINTS = 200  # at most this many skeleton pixels of a component, evenly spread


def cross_profiles(grey: np.ndarray, crack: ComponentGeometry) -> np.ndarray:
    """Grey levels across a component at (up to ``PROFILE_POINTS`` of) its skeleton pixels: Nx3
    (centre on the skeleton, one side, the other side), each side the mean of ``PROFILE_SPAN_PX``
    pixels along the local normal, starting ``PROFILE_GAP_PX`` beyond half the local width.
    ``grey`` is the frame's HxW grey image; bilinear, mirrored at the frame's border."""
    count = len(crack.skeleton_xy)
    if count == 0:
        return np.zeros((0, 3), np.float32)
    pick = np.unique(np.linspace(0, count - 1, min(count, PROFILE_POINTS)).round().astype(int))
    xy = crack.skeleton_xy[pick].astype(np.float32)
    theta = crack.theta[pick]
    normal = np.stack([-np.sin(theta), np.cos(theta)], axis=1).astype(np.float32)
    reach = (crack.width_px[pick, None] / 2 + PROFILE_GAP_PX
             + np.arange(PROFILE_SPAN_PX)[None, :]).astype(np.float32)  # N x span
    points = np.concatenate([xy[:, None, :],
                             xy[:, None, :] + normal[:, None, :] * reach[..., None],
                             xy[:, None, :] - normal[:, None, :] * reach[..., None]], axis=1)
    values = cv2.remap(np.asarray(grey, np.float32), np.ascontiguousarray(points[..., 0]),
                       np.ascontiguousarray(points[..., 1]), cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT_101)
    span = PROFILE_SPAN_PX
    return np.stack([values[:, 0], values[:, 1:1 + span].mean(axis=1),
                     values[:, 1 + span:].mean(axis=1)], axis=1)


def line_share(profiles: np.ndarray) -> float:
    """The share of cross profiles (rows of centre, side, side: :func:`cross_profiles`) that are
    lines: the centre darker than the darker side (a valley) or lighter than the lighter side (a
    ridge: a crack filled with efflorescence, grout or dust) by more than half the step between
    the sides. A crack is a line along nearly all of its length (the 10th percentile of the
    bundled model's crack detections on the labelled crack sets is 0.54-0.83); the rim of a stain,
    the edge of a hole, a spall or a painted marking is a step (docs/geometry.md).
    No profiles: 1."""
    if len(profiles) == 0:
        return 1.0
    centre, one, other = np.asarray(profiles, np.float64).T
    half_step = 0.5 * np.abs(one - other)
    valley = np.minimum(one, other) - centre > half_step
    ridge = centre - np.maximum(one, other) > half_step
    return float((valley | ridge).mean())


def _round(value: float, digits: int) -> float:
    return float(round(float(value), digits))


Components = tuple[int, np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]


def closed_components(binary: np.ndarray) -> Components | None:
    """The 8-connected components of ``binary`` (HxW bool) after a closing with
    ``CLOSING_KERNEL``, found in the window around its foreground only: (count, labels of the
    window, stats, centroids, (x0, y0) the window's corner in the frame); stats and centroids
    are in frame pixels. None when nothing is foreground.

    The same components, labels and stats as closing and labelling the whole frame: the window
    keeps twice the kernel's reach of background round the foreground (a closing reaches no
    further), or the frame's own edge. A frame is mostly background, so this costs a fraction
    of labelling all of it."""
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return None
    margin = 2 * (max(CLOSING_KERNEL.shape) // 2)
    # an even corner: OpenCV labels 2x2 blocks in raster order, and the window's blocks must be
    # the frame's for the labels to come in the same order
    y0, y1 = max(0, int(rows[0]) - margin) & ~1, min(binary.shape[0], int(rows[-1]) + 1 + margin)
    cols = np.flatnonzero(binary[y0:y1].any(axis=0))
    x0, x1 = max(0, int(cols[0]) - margin) & ~1, min(binary.shape[1], int(cols[-1]) + 1 + margin)
    window = cv2.morphologyEx(binary[y0:y1, x0:x1].astype(np.uint8), cv2.MORPH_CLOSE,
                              CLOSING_KERNEL)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(
        window, connectivity=8, ltype=cv2.CV_32S)
    stats[:, cv2.CC_STAT_LEFT] += x0
    stats[:, cv2.CC_STAT_TOP] += y0
    centroids += (x0, y0)
    return count, labels, stats, centroids, (x0, y0)


def measure_cracks(prob: np.ndarray, threshold: float, camera: CameraConfig, chainage_m: float,
                   severity: SeverityConfig, min_area_px: int = 40, min_length_mm: float = 0.0,
                   min_elongation: float = 0.0, straight_max_deviation: float = 0.0,
                   straight_min_length_px: int = 100, *, grey: np.ndarray | None = None,
                   line_min_share: float = 0.0) -> tuple[np.ndarray, list[CrackRecord]]:
    """Measured cracks of one frame.

    ``prob`` is HxW float in 0..1; a pixel is crack where ``prob >= threshold``. The binary map is
    closed with a 3x3 square (a crack broken by one or two pixels stays one crack), split into
    8-connected components, and components smaller than ``min_area_px``, shorter than
    ``min_length_mm`` or less elongated than ``min_elongation`` (length / mean width: a crack is
    a line, a blob such as a bolt pocket or a spall is not) are dropped, and so are straight lines:
    components at least ``straight_min_length_px`` long whose longest path keeps within
    ``straight_max_deviation`` x its length of the chord between its ends (ring and segment
    joints, cable and pipe edges, formwork lines; a crack wanders: :func:`chord_deviation`).
    With the frame's ``grey`` image and ``line_min_share`` > 0, a component is also dropped
    when fewer than that share of its cross profiles are lines (:func:`line_share`: a crack is
    darker, or lighter, than both its sides; a stain's rim or the edge of a hole, a spall or a
    marking is a step). ``chainage_m`` is the chainage of the image centre.

    Returns (HxW uint8 mask, 0 / 255, of the kept cracks; their records, indexed 0..n-1 in order
    of bounding box x, then y).
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"a probability map is HxW, got shape {prob.shape}")
    shape = (prob.shape[0], prob.shape[1])
    regions = closed_components(prob >= threshold)
    if regions is None:
        return np.zeros(shape, np.uint8), []
    count, labels, stats, centroids, (x0, y0) = regions
    areas = stats[:, cv2.CC_STAT_AREA]
    candidates = sorted((label for label in range(1, count) if areas[label] >= min_area_px),
                        key=lambda label: (stats[label, cv2.CC_STAT_LEFT],
                                           stats[label, cv2.CC_STAT_TOP], label))
    sx, sy = image_scales(camera)

    keep = np.zeros(count, np.uint8)
    records: list[CrackRecord] = []
    for label in candidates:
        x, y, w, h = (int(v) for v in stats[label, :4])
        component = labels[y - y0:y - y0 + h, x - x0:x - x0 + w] == label
        crack = measure_component(component, (x, y), sx, sy)
        if crack.length_mm < min_length_mm:
            continue
        if crack.length_mm < min_elongation * float(crack.width_mm.mean()):
            continue
        if (straight_max_deviation > 0 and crack.length_px >= straight_min_length_px
                and chord_deviation(crack.path_xy) <= straight_max_deviation * crack.length_px):
            continue
        if (line_min_share > 0 and grey is not None
                and line_share(cross_profiles(grey, crack)) < line_min_share):
            continue
        keep[label] = 255

        orientation, eigen_ratio = orientation_deg(crack.skeleton_xy, camera)
        # type and severity from the rounded values, so the record agrees with itself
        orientation = _round(orientation, 2) % 180.0
        width_max_mm = _round(crack.sustained_mm.max(), 4)
        polyline_px = cv2.approxPolyDP(crack.path_xy.reshape(-1, 1, 2).astype(np.int32),
                                       POLYLINE_EPSILON_PX, False).reshape(-1, 2).astype(float)
        line_chainage, line_arc = to_tunnel(polyline_px[:, 0], polyline_px[:, 1], shape, camera,
                                            chainage_m)
        box_chainage, _ = to_tunnel(np.array([x, x + w - 1]), np.array([y, y + h - 1]), shape,
                                    camera, chainage_m)
        centre_chainage, centre_arc = to_tunnel(centroids[label, 0], centroids[label, 1], shape,
                                                camera, chainage_m)
        records.append(CrackRecord(
            index=len(records),
            length_px=_round(crack.length_px, 2),
            length_mm=_round(crack.length_mm, 3),
            width_mean_mm=_round(crack.width_mm.mean(), 4),
            width_max_mm=width_max_mm,
            width_p95_mm=_round(np.percentile(crack.width_mm, 95), 4),
            width_max_px=_round(crack.sustained_px.max(), 3),
            orientation_deg=orientation,
            type=classify_type(orientation, crack.junctions, eigen_ratio),
            severity=severity.classify(width_max_mm),
            area_px=int(areas[label]),
            area_mm2=_round(areas[label] * sx * sy, 3),
            bbox_px=(x, y, w, h),
            chainage_m=_round(centre_chainage, 4),
            chainage_start_m=_round(box_chainage.min(), 4),
            chainage_end_m=_round(box_chainage.max(), 4),
            arc_mm=_round(centre_arc, 2),
            score_mean=_round(prob[y:y + h, x:x + w][component].mean(), 4),
            polyline_px=tuple((_round(px, 2), _round(py, 2)) for px, py in polyline_px),
            polyline=tuple((_round(c, 4), _round(a, 2))
                           for c, a in zip(line_chainage, line_arc, strict=True)),
        ))
    mask = np.zeros(shape, np.uint8)
    mask[y0:y0 + labels.shape[0], x0:x0 + labels.shape[1]] = keep[labels]
    return mask, records


FEATURE_AXIS_POINTS = 4000  # a large region's principal axis from a sample of its pixels


def measure_features(classes: np.ndarray, names: tuple[str, ...], camera: CameraConfig,
                     chainage_m: float, min_area_px: int = 200,
                     skip: tuple[str, ...] = ("background", "crack")) -> list[FeatureRecord]:
    """Lining features of one frame from its class map (HxW, each pixel the index into
    ``names`` of the class the model found there): every 8-connected region of one class not in
    ``skip``, of at least ``min_area_px`` pixels after a 3x3 closing (a joint broken by a pixel
    or two stays one region), located and measured as :class:`FeatureRecord`, indexed 0..n-1 in
    order of class, then bounding box x, then y. ``chainage_m`` is that of the image centre."""
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ValueError(f"a class map is HxW, got shape {classes.shape}")
    shape = (classes.shape[0], classes.shape[1])
    sx, sy = image_scales(camera)
    records: list[FeatureRecord] = []
    present = np.bincount(classes.ravel().astype(np.intp, copy=False), minlength=len(names))
    for index, kind in enumerate(names):
        found = (None if kind in skip or not present[index]
                 else closed_components(classes == index))
        if found is None:
            continue
        count, labels, stats, centroids, (x0, y0) = found
        regions = sorted((label for label in range(1, count)
                          if stats[label, cv2.CC_STAT_AREA] >= min_area_px),
                         key=lambda label: (stats[label, cv2.CC_STAT_LEFT],
                                            stats[label, cv2.CC_STAT_TOP]))
        for label in regions:
            x, y, w, h, area = (int(v) for v in stats[label])
            ys, xs = np.nonzero(labels[y - y0:y - y0 + h, x - x0:x - x0 + w] == label)
            step = max(1, len(xs) // FEATURE_AXIS_POINTS)
            points = to_tunnel_mm(xs[::step] + x, ys[::step] + y, camera)
            orientation, _ = principal_axis(points)
            axis = np.array([math.cos(math.radians(orientation)),
                             math.sin(math.radians(orientation))])
            along = points @ axis
            length_mm = float(along.max() - along.min()) + max(sx, sy)
            box_chainage, box_arc = to_tunnel(np.array([x, x + w - 1]), np.array([y, y + h - 1]),
                                              shape, camera, chainage_m)
            centre_chainage, centre_arc = to_tunnel(centroids[label, 0], centroids[label, 1],
                                                    shape, camera, chainage_m)
            records.append(FeatureRecord(
                index=len(records), kind=kind, area_px=area,
                area_mm2=_round(area * sx * sy, 3), bbox_px=(x, y, w, h),
                chainage_m=_round(centre_chainage, 4),
                chainage_start_m=_round(box_chainage.min(), 4),
                chainage_end_m=_round(box_chainage.max(), 4),
                arc_mm=_round(centre_arc, 2), arc_start_mm=_round(box_arc.min(), 2),
                arc_end_mm=_round(box_arc.max(), 2), length_mm=_round(length_mm, 2),
                orientation_deg=_round(orientation, 2) % 180.0))
    return records
