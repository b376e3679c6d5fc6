"""A synthetic tunnel drive: the demo input and the ground truth that geometry is checked against.

Model. The tunnel lining is unrolled into a long grey image strip: strip column ``u`` runs along
the tunnel at ``config.camera.mm_per_px_along`` (column ``u`` lies at chainage
``start_chainage_m + u * mm_per_px_along / 1000``), strip row ``v`` runs round the ring at
``mm_per_px_across`` (row ``v`` lies at arc ``camera.arc_offset_mm + v * mm_per_px_across``). The
vehicle moves at ``acquisition.speed_kmh`` from ``acquisition.start_chainage_m``; frame ``i``
(capture offset ``t = i / fps``) is the strip window whose centre, ``(N_along - 1) / 2`` in pixel
coordinates as :mod:`crackscan.geometry` has it, lies at chainage ``start + speed * t``. That is
how acquisition stamps chainage, so a truth point maps to frame pixels by the same rule inference
uses. Windows start on whole strip pixels: a frame's content sits within half a pixel (0.25 mm at
0.5 mm/px) of its stamped chainage. The camera's ``along_axis`` and ``direction`` are honoured
(a frame is flipped / transposed), so the frames match any camera config.

Content: concrete texture (value noise at several scales, aggregate and air voids), one brightness
per lining ring, ring joints (dark straight grooves round the ring with lighter chamfers: a known
false-positive source), water stains, bolt pockets and light scratch marks, and cracks.

Cracks are random walks in mm, one every 1.5-3 m of drive, typed longitudinal / circumferential /
diagonal by their main direction, 100-600 mm long (shorter where the frame's arc span cannot hold
them), kept whole inside the drive's strip and clear of ring joints. Width varies smoothly along a
crack between 1 and 4 mm and tapers towards the ends. A crack is drawn as the union of capsules
round its segments, the half-width interpolated along each segment; a pixel's coverage is
``clip((half_width_mm - distance_mm) / mm_per_px + 0.5, 0, 1)``, a one-pixel linear edge whose
integral across the crack is exactly the width, so the drawn width is the truth width. Covered
pixels are darkened by a crack-specific depth (0.5-0.7) with a faint halo.

Rendering is lazy and deterministic: every texture value is a hash of (seed, layer, global pixel)
and every object is placed up front from ``numpy.random.default_rng(seed)``, so a strip tile looks
the same whichever frame asks for it; tiles are rendered with a margin and a few are cached.
Per frame, a slight vignette and sensor noise (seeded by seed and frame index) are added.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from crackscan.config import PipelineConfig
from crackscan.errors import UserError

log = logging.getLogger(__name__)

TILE_PX = 512  # strip columns per rendered tile
MARGIN_PX = 24  # rendered around a tile so local filters agree across tile edges
CACHED_TILES = 6
CRACK_TYPES = ("longitudinal", "circumferential", "diagonal")
CRACK_TYPE_P = (0.4, 0.25, 0.35)
CRACK_GAP_M = (1.5, 3.0)  # chainage between one crack and the next
CRACK_LENGTH_MM = (100.0, 600.0)
CRACK_WIDTH_MM = (1.0, 4.0)
CRACK_STEP_MM = 3.0  # random-walk step: truth polylines have a vertex every 3 mm
CRACK_EDGE_MM = 8.0  # cracks keep this far from the strip's top and bottom rows
JOINT_CLEARANCE_MM = 30.0  # cracks keep this far (in chainage) from ring joints
TYPE_TOLERANCE_DEG = 30.0  # as inference classifies: within 30 degrees of an axis
RING_WIDTH_M = (1.2, 1.5)
CHAMFER_MM = 4.0  # bevelled edges of the lining segments either side of a ring joint


class SynthError(UserError, ValueError):
    """The synthetic drive could not be written or read back."""


@dataclass(frozen=True)
class _Crack:
    id: int
    kind: str
    points_mm: np.ndarray  # Nx2 (along mm from start chainage, arc mm)
    widths_mm: np.ndarray  # N, at the vertices
    depth: float  # fraction of the background taken away at full coverage


@dataclass(frozen=True)
class _Stain:
    centre_mm: tuple[float, float]
    radii_mm: tuple[float, float]
    angle: float
    strength: float
    key: int


@dataclass(frozen=True)
class _BoltHole:
    centre_mm: tuple[float, float]
    radius_mm: float


@dataclass(frozen=True)
class _Scratch:
    start_mm: tuple[float, float]
    end_mm: tuple[float, float]


# --- deterministic noise ------------------------------------------------------------------------

def _key(seed: int, layer: int) -> int:
    return (seed * 0x9E3779B1 + layer * 0x632BE5AB + 0x5BD1E995) & 0xFFFFFFFF


def _hash01(a: np.ndarray, b: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) float32 from integer coordinates (broadcast) and a 32-bit key."""
    a = (np.asarray(a, np.int64) & 0xFFFFFFFF).astype(np.uint32)
    b = (np.asarray(b, np.int64) & 0xFFFFFFFF).astype(np.uint32)
    h = (a * np.uint32(0x9E3779B1)) ^ (b * np.uint32(0x85EBCA77)) ^ np.uint32(key)
    h ^= h >> 15
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> 12
    h *= np.uint32(0x297A2D39)
    h ^= h >> 15
    return (h >> 8).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise(key: int, us: np.ndarray, vs: np.ndarray, cell: float) -> np.ndarray:
    """Smooth value noise in [-1, 1] on global pixel columns ``us`` and rows ``vs`` (len(vs) x
    len(us)); lattice spacing ``cell`` px. Separable: interpolate along x, then along y."""
    fx, fy = us / cell, vs / cell
    ix0, iy0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = _smooth((fx - ix0).astype(np.float32)), _smooth((fy - iy0).astype(np.float32))
    ix = np.arange(ix0.min(), ix0.max() + 2)
    iy = np.arange(iy0.min(), iy0.max() + 2)
    lattice = _hash01(iy[:, None], ix[None, :], key) * 2.0 - 1.0
    cx, cy = ix0 - ix[0], iy0 - iy[0]
    along = lattice[:, cx] * (1.0 - tx) + lattice[:, cx + 1] * tx
    return along[cy] * (1.0 - ty)[:, None] + along[cy + 1] * ty[:, None]


def _segment_coverage(x_mm: np.ndarray, y_mm: np.ndarray, p0: np.ndarray, p1: np.ndarray,
                      hw0: float, hw1: float, px_mm: float) -> np.ndarray:
    """Coverage in [0, 1] of a capsule round segment p0-p1 (mm) whose half-width goes from hw0 to
    hw1 (mm), at points (x_mm, y_mm): a linear edge one pixel wide centred on the true boundary."""
    d = p1 - p0
    length2 = float(d @ d) or 1e-12
    t = np.clip(((x_mm - p0[0]) * d[0] + (y_mm - p0[1]) * d[1]) / length2, 0.0, 1.0)
    dist = np.hypot(x_mm - (p0[0] + t * d[0]), y_mm - (p0[1] + t * d[1]))
    return np.clip((hw0 + t * (hw1 - hw0) - dist) / px_mm + 0.5, 0.0, 1.0)


# --- the drive ----------------------------------------------------------------------------------

class SyntheticDrive:
    """A deterministic synthetic drive: ``frame(i)`` renders frame ``i``; ``truth()`` describes it.

    ``width`` x ``height`` is the frame size in pixels. Everything derives from ``seed``.
    """

    def __init__(self, seconds: float = 10.0, seed: int = 0, fps: float = 25.0, width: int = 640,
                 height: int = 360, config: PipelineConfig | None = None) -> None:
        config = config or PipelineConfig()
        if not (math.isfinite(seconds) and seconds > 0):
            raise SynthError(f"seconds must be a positive number, got {seconds}")
        if not (math.isfinite(fps) and fps > 0):
            raise SynthError(f"fps must be a positive number, got {fps}")
        if int(seed) < 0:
            raise SynthError(f"seed must be 0 or more, got {seed}")
        if width < 16 or height < 16:
            raise SynthError(f"frame size {width}x{height} is too small; use at least 16x16")
        self.seconds, self.seed, self.fps = float(seconds), int(seed), float(fps)
        self.width, self.height, self.config = int(width), int(height), config
        camera, acquisition = config.camera, config.acquisition
        self.mm_along, self.mm_across = camera.mm_per_px_along, camera.mm_per_px_across
        self.px_mm = math.sqrt(self.mm_along * self.mm_across)
        self.n_along, self.n_across = ((self.width, self.height) if camera.along_axis == "x"
                                       else (self.height, self.width))
        self.frames = max(1, round(self.seconds * self.fps))
        self.start_m = acquisition.start_chainage_m
        self.speed_mps = acquisition.speed_kmh / 3.6
        self.arc_offset_mm = camera.arc_offset_mm
        # strip columns shown by the first and the last frame: the extent of the drive
        self._lefts_mm = self.mm_along * np.array([self._left_column(i)
                                                   for i in range(self.frames)])
        self.first_col = self._left_column(0)
        self.last_col = self._left_column(self.frames - 1) + self.n_along - 1
        self._tiles: OrderedDict[int, np.ndarray] = OrderedDict()
        self._build_scene(np.random.default_rng(self.seed))
        self._vignette = self._make_vignette()
        tint = np.arange(256, dtype=np.float32)
        self._tint = np.clip(tint[None, :, None] * np.array([0.95, 0.99, 1.03], np.float32),
                             0, 255).astype(np.uint8)  # a warm grey, as BGR lookup

    # geometry -----------------------------------------------------------------------------------

    def chainage_m(self, index: int) -> float:
        """Chainage of frame ``index``'s centre: start + speed x time, as acquisition stamps it."""
        return self.start_m + self.speed_mps * index / self.fps

    def _left_column(self, index: int) -> int:
        centre = (self.chainage_m(index) - self.start_m) * 1000.0 / self.mm_along
        return round(centre - (self.n_along - 1) / 2)

    # scene --------------------------------------------------------------------------------------

    def _build_scene(self, rng: np.random.Generator) -> None:
        lo_mm = self.first_col * self.mm_along  # along mm from the start chainage
        hi_mm = self.last_col * self.mm_along
        arc_span_mm = (self.n_across - 1) * self.mm_across
        ring_mm = rng.uniform(*RING_WIDTH_M) * 1000.0
        first = lo_mm - rng.uniform(0.0, ring_mm) - ring_mm
        count = int((hi_mm - first) / ring_mm) + 3
        self.joints_mm = np.array([first + k * ring_mm + rng.normal(0.0, 3.0)
                                   for k in range(count)])
        self.ring_offsets = rng.normal(0.0, 6.0, count + 1)
        self.joint_widths_mm = rng.uniform(3.0, 5.0, count)

        length_m = (hi_mm - lo_mm) / 1000.0 + 0.4
        self.stains = []
        for n in range(rng.poisson(0.8 * length_m)):
            self.stains.append(_Stain(
                centre_mm=(rng.uniform(lo_mm - 200, hi_mm + 200),
                           self.arc_offset_mm + rng.uniform(-0.2, 1.2) * arc_span_mm),
                radii_mm=(rng.uniform(30, 180), rng.uniform(25, 110)),
                angle=rng.uniform(0, math.pi), strength=rng.uniform(0.08, 0.22),
                key=_key(self.seed, 100 + n)))
        self.bolt_holes = []
        for joint in self.joints_mm:
            if rng.random() < 0.35:
                side = 1 if rng.random() < 0.5 else -1
                self.bolt_holes.append(_BoltHole(
                    centre_mm=(joint + side * rng.uniform(60, 120),
                               self.arc_offset_mm + rng.uniform(0.1, 0.9) * arc_span_mm),
                    radius_mm=rng.uniform(9, 16)))
        self.scratches = []
        for _ in range(rng.poisson(0.4 * length_m)):
            start = np.array([rng.uniform(lo_mm, hi_mm),
                              self.arc_offset_mm + rng.uniform(0, 1) * arc_span_mm])
            angle, length = rng.uniform(0, math.pi), rng.uniform(30, 150)
            end = start + length * np.array([math.cos(angle), math.sin(angle)])
            self.scratches.append(_Scratch((start[0], start[1]), (end[0], end[1])))

        self.cracks: list[_Crack] = []
        position = lo_mm + rng.uniform(150.0, 600.0)
        while position < hi_mm:
            crack = self._place_crack(rng, len(self.cracks), position, lo_mm, hi_mm, arc_span_mm)
            if crack is not None:
                self.cracks.append(crack)
            position += rng.uniform(*CRACK_GAP_M) * 1000.0

    def _place_crack(self, rng: np.random.Generator, crack_id: int, position_mm: float,
                     lo_mm: float, hi_mm: float, arc_span_mm: float) -> _Crack | None:
        """A crack near ``position_mm`` (along mm), whole inside the drive and off the joints, or
        None where none fits after a bounded number of tries."""
        usable_arc = arc_span_mm - 2 * CRACK_EDGE_MM
        if usable_arc < 10.0:
            return None
        for attempt in range(40):
            kind = str(rng.choice(CRACK_TYPES, p=CRACK_TYPE_P))
            if kind == "longitudinal":
                angle = rng.uniform(-10, 10)
            elif kind == "circumferential":
                angle = 90 + rng.uniform(-10, 10)
            else:
                angle = rng.choice([1, -1]) * rng.uniform(40, 50)
            sin = abs(math.sin(math.radians(angle)))
            max_length = min(CRACK_LENGTH_MM[1], 0.8 * usable_arc / max(sin, 0.17))
            length = min(rng.uniform(*CRACK_LENGTH_MM), max_length)
            if length < 20.0:
                continue
            points = self._random_walk(rng, math.radians(angle), length)
            arc_lo, arc_hi = points[:, 1].min(), points[:, 1].max()
            if arc_hi - arc_lo > usable_arc:
                continue
            arc_base = (self.arc_offset_mm + CRACK_EDGE_MM - arc_lo
                        + rng.uniform(0, usable_arc - (arc_hi - arc_lo)))
            along = position_mm + rng.uniform(-400.0, 400.0) if attempt else position_mm
            points = points + np.array([along, arc_base])
            if not self._fits(points, lo_mm, hi_mm):
                continue
            orientation = _orientation_deg(points)
            if _type_of(orientation, margin=5.0) != kind:
                continue
            return _Crack(id=crack_id, kind=kind, points_mm=points,
                          widths_mm=self._widths(rng, points), depth=rng.uniform(0.5, 0.7))
        return None

    def _fits(self, points: np.ndarray, lo_mm: float, hi_mm: float) -> bool:
        reach = CRACK_WIDTH_MM[1]  # keep the drawn crack inside, not only its centreline
        along_lo, along_hi = points[:, 0].min(), points[:, 0].max()
        if along_lo - reach < lo_mm or along_hi + reach > hi_mm:
            return False
        near = self.joints_mm[(self.joints_mm > along_lo - JOINT_CLEARANCE_MM)
                              & (self.joints_mm < along_hi + JOINT_CLEARANCE_MM)]
        return near.size == 0

    @staticmethod
    def _random_walk(rng: np.random.Generator, heading: float, length_mm: float) -> np.ndarray:
        """Vertices (mm, relative) of a meandering, jagged walk of ``length_mm`` along ``heading``
        (radians, 0 along the tunnel, pi/2 round the ring)."""
        steps = max(2, math.ceil(length_mm / CRACK_STEP_MM))
        step = length_mm / steps
        drift, jag = 0.0, 0.0
        points = [np.zeros(2)]
        for _ in range(steps):
            drift = 0.95 * drift + rng.normal(0.0, math.radians(3.0))  # slow meander
            jag = 0.3 * jag + rng.normal(0.0, math.radians(28.0))  # zig-zag round the aggregate
            direction = heading + max(-0.6, min(0.6, drift)) + jag
            points.append(points[-1] + step * np.array([math.cos(direction), math.sin(direction)]))
        return np.array(points)

    @staticmethod
    def _widths(rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
        """Vertex widths (mm): a smooth random profile, tapered towards both ends, in 1..4 mm."""
        arclen = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))])
        total = arclen[-1]
        base = rng.uniform(1.2, 3.6)
        wobble, profile = 0.0, []
        for _ in range(len(points)):
            wobble = 0.92 * wobble + rng.normal(0.0, 0.07)
            profile.append(wobble + rng.normal(0.0, 0.1))
        from_end = np.minimum(arclen, total - arclen) / max(0.2 * total, 1e-9)
        taper = np.clip(0.45 + 0.55 * np.sqrt(np.clip(from_end, 0, 1)), 0, 1)
        return np.clip(base * np.exp(np.array(profile)) * taper, *CRACK_WIDTH_MM)

    # truth --------------------------------------------------------------------------------------

    def _frames_showing(self, along_lo_mm: float, along_hi_mm: float) -> tuple[int, int] | None:
        """First and last frame whose window shows any of along_lo..along_hi (mm)."""
        first = int(np.searchsorted(self._lefts_mm + (self.n_along - 1) * self.mm_along,
                                    along_lo_mm))
        last = int(np.searchsorted(self._lefts_mm, along_hi_mm, side="right")) - 1
        return (first, last) if first <= last else None

    def truth(self, video: str | None = None) -> dict:
        """The drive's ground truth (see :func:`synthesize_drive`)."""
        cracks = []
        for crack in self.cracks:
            points, widths = crack.points_mm, crack.widths_mm
            seg = np.hypot(*np.diff(points, axis=0).T)
            seg_width = (widths[1:] + widths[:-1]) / 2
            mids = (points[1:] + points[:-1]) / 2
            centroid = (mids * seg[:, None]).sum(axis=0) / seg.sum()
            chainage = self.start_m + points[:, 0] / 1000.0
            shown = self._frames_showing(points[:, 0].min(), points[:, 0].max())
            orientation = _orientation_deg(points)
            cracks.append({
                "id": crack.id,
                "chainage_start_m": round(float(chainage.min()), 6),
                "chainage_end_m": round(float(chainage.max()), 6),
                "chainage_m": round(self.start_m + float(centroid[0]) / 1000.0, 6),
                "arc_mm": round(float(centroid[1]), 3),
                "arc_start_mm": round(float(points[:, 1].min()), 3),
                "arc_end_mm": round(float(points[:, 1].max()), 3),
                "length_mm": round(float(seg.sum()), 3),
                "width_mm": round(float((seg_width * seg).sum() / seg.sum()), 4),
                "width_max_mm": round(float(widths.max()), 4),
                "orientation_deg": round(orientation, 2),
                "type": crack.kind,
                "frame_range": list(shown) if shown else None,
                "polyline": [[round(float(c), 6), round(float(a), 3)]
                             for c, a in zip(chainage, points[:, 1], strict=True)],
            })
        lo_mm, hi_mm = self.first_col * self.mm_along, self.last_col * self.mm_along
        joints = [round(self.start_m + float(j) / 1000.0, 6) for j in self.joints_mm
                  if lo_mm <= j <= hi_mm]
        return {
            "video": video,
            "fps": self.fps,
            "seconds": self.seconds,
            "frames": self.frames,
            "width": self.width,
            "height": self.height,
            "speed_kmh": self.config.acquisition.speed_kmh,
            "start_chainage_m": self.start_m,
            "chainage_range_m": [round(self.start_m + lo_mm / 1000.0, 6),
                                 round(self.start_m + hi_mm / 1000.0, 6)],
            "mm_per_px_along": self.mm_along,
            "mm_per_px_across": self.mm_across,
            "arc_offset_mm": self.arc_offset_mm,
            "seed": self.seed,
            "cracks": cracks,
            "ring_joints_m": joints,
            "water_stains": [{"chainage_m": round(self.start_m + s.centre_mm[0] / 1000.0, 6),
                              "arc_mm": round(s.centre_mm[1], 3),
                              "radii_mm": [round(r, 3) for r in s.radii_mm]}
                             for s in self.stains],
            "bolt_holes": [{"chainage_m": round(self.start_m + b.centre_mm[0] / 1000.0, 6),
                            "arc_mm": round(b.centre_mm[1], 3), "radius_mm": round(b.radius_mm, 3)}
                           for b in self.bolt_holes],
        }

    # rendering ----------------------------------------------------------------------------------

    def _make_vignette(self) -> np.ndarray:
        ys = np.linspace(-1, 1, self.n_across, dtype=np.float32)[:, None]
        xs = np.linspace(-1, 1, self.n_along, dtype=np.float32)[None, :]
        return 1.0 - 0.09 * (xs * xs + ys * ys) - 0.04 * ys  # light from slightly above

    def _tile(self, k: int) -> np.ndarray:
        if k in self._tiles:
            self._tiles.move_to_end(k)
            return self._tiles[k]
        tile = self._render_tile(k)
        self._tiles[k] = tile
        if len(self._tiles) > CACHED_TILES:
            self._tiles.popitem(last=False)
        return tile

    def _render_tile(self, k: int) -> np.ndarray:
        """Strip columns k*TILE_PX .. (k+1)*TILE_PX - 1, all rows, as float32 grey."""
        m = MARGIN_PX
        us = np.arange(k * TILE_PX - m, (k + 1) * TILE_PX + m)
        vs = np.arange(-m, self.n_across + m)
        key = lambda layer: _key(self.seed, layer)  # noqa: E731
        img = np.full((len(vs), len(us)), 150.0, np.float32)
        for layer, (cell, amplitude) in enumerate(((220, 12), (60, 8), (14, 6), (3.5, 5))):
            img += amplitude * _value_noise(key(layer), us, vs, cell)
        img += 8.0 * (_hash01(vs[:, None], us[None, :], key(10)) - 0.5)
        aggregate = _value_noise(key(11), us, vs, 6.0)
        shade = _value_noise(key(12), us, vs, 9.0)
        stones = np.clip((aggregate - 0.45) * 4.0, 0, 1)
        img += stones * np.where(shade > 0, 12.0, -10.0)
        pores = _hash01(vs[:, None], us[None, :], key(13))
        voids = cv2.dilate((pores < 0.00008).astype(np.uint8) * 255,
                           cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
        voids = np.maximum(voids, (pores > 0.9996).astype(np.uint8) * 255)
        voids = cv2.GaussianBlur(voids, (3, 3), 0.8)
        img *= 1.0 - 0.45 * voids.astype(np.float32) / 255.0

        along_mm = us * self.mm_along  # along mm from the start chainage, per column
        arc_mm = self.arc_offset_mm + vs * self.mm_across  # per row
        ring = np.searchsorted(self.joints_mm, along_mm)
        img += self.ring_offsets[ring][None, :].astype(np.float32)
        lo, hi = along_mm[0], along_mm[-1]

        for stain in self.stains:
            (cx, cy), (rx, ry) = stain.centre_mm, stain.radii_mm
            reach = max(rx, ry) * 1.4
            if cx + reach < lo or cx - reach > hi:
                continue
            cols = (along_mm > cx - reach) & (along_mm < cx + reach)
            rows = (arc_mm > cy - reach) & (arc_mm < cy + reach)
            if not cols.any() or not rows.any():
                continue
            dx = along_mm[cols][None, :] - cx
            dy = arc_mm[rows][:, None] - cy
            c, s = math.cos(stain.angle), math.sin(stain.angle)
            r = np.hypot((dx * c + dy * s) / rx, (-dx * s + dy * c) / ry)
            edge = r + 0.35 * _value_noise(stain.key, us[cols], vs[rows], 20.0)
            alpha = stain.strength * (1.0 - _smooth(np.clip((edge - 0.55) / 0.45, 0, 1)))
            alpha += 0.04 * np.exp(-(((edge - 0.97) / 0.05) ** 2))  # tide mark at the rim
            img[np.ix_(rows, cols)] *= 1.0 - alpha

        for j, (joint, width) in enumerate(zip(self.joints_mm, self.joint_widths_mm, strict=True)):
            if joint + 20 < lo or joint - 20 > hi:
                continue
            cols = np.abs(along_mm - joint) < 4.0 + CHAMFER_MM + 3.0
            wobble = 0.4 * _value_noise(key(200 + j), np.array([0]), vs, 40.0)  # mm, per row
            offset = along_mm[cols][None, :] - (joint + wobble)
            dist = np.abs(offset)
            groove = 1.0 - _smooth(np.clip((dist - width / 2) / self.px_mm + 0.5, 0, 1))
            chamfer = (1.0 - groove) * (dist < width / 2 + CHAMFER_MM)
            img[:, cols] *= 1.0 - 0.55 * groove
            # the chamfer facing the light is bright, the other one in shadow
            img[:, cols] *= 1.0 + chamfer * np.where(offset < 0, 0.12, -0.12)

        for hole in self.bolt_holes:
            (cx, cy), radius = hole.centre_mm, hole.radius_mm
            if cx + radius + 4 < lo or cx - radius - 4 > hi:
                continue
            cols = np.abs(along_mm - cx) < radius + 4
            rows = np.abs(arc_mm - cy) < radius + 4
            if not rows.any():
                continue
            dx = along_mm[cols][None, :] - cx
            dy = arc_mm[rows][:, None] - cy
            r = np.hypot(dx, dy)
            inside = 1.0 - _smooth(np.clip((r - radius) / self.px_mm + 0.5, 0, 1))
            shadow = 0.55 - 0.2 * dy / radius  # the upper rim casts a shadow into the pocket
            rim = np.exp(-(((r - radius - 1.2) / 0.8) ** 2))
            img[np.ix_(rows, cols)] *= 1.0 - inside * shadow
            img[np.ix_(rows, cols)] += 18.0 * rim

        xs_mm = along_mm[None, :].astype(np.float64)
        ys_mm = arc_mm[:, None].astype(np.float64)
        for scratch in self.scratches:
            p0, p1 = np.array(scratch.start_mm), np.array(scratch.end_mm)
            if max(p0[0], p1[0]) + 2 < lo or min(p0[0], p1[0]) - 2 > hi:
                continue
            cover = _segment_coverage(xs_mm, ys_mm, p0, p1, 0.3, 0.3, self.px_mm)
            img += 22.0 * cover

        dark = np.zeros_like(img)
        for crack in self.cracks:
            self._draw_crack(dark, crack, us, vs, along_mm, arc_mm)
        if dark.any():
            grain = 0.85 + 0.3 * _hash01(vs[:, None], us[None, :], key(30))
            halo = cv2.GaussianBlur(dark, (0, 0), 2.0)
            img *= (1.0 - np.clip(dark * grain, 0, 0.95)) * (1.0 - 0.2 * halo)
        return img[m:-m, m:-m]

    def _draw_crack(self, dark: np.ndarray, crack: _Crack, us: np.ndarray, vs: np.ndarray,
                    along_mm: np.ndarray, arc_mm: np.ndarray) -> None:
        """Raise ``dark`` to this crack's depth x coverage where its capsules cover pixels."""
        points, widths = crack.points_mm, crack.widths_mm
        reach = CRACK_WIDTH_MM[1]
        if points[:, 0].max() + reach < along_mm[0] or points[:, 0].min() - reach > along_mm[-1]:
            return
        for p0, p1, w0, w1 in zip(points[:-1], points[1:], widths[:-1], widths[1:], strict=True):
            half = max(w0, w1) / 2 + 2 * self.px_mm
            x_lo, x_hi = min(p0[0], p1[0]) - half, max(p0[0], p1[0]) + half
            y_lo, y_hi = min(p0[1], p1[1]) - half, max(p0[1], p1[1]) + half
            c0, c1 = np.searchsorted(along_mm, [x_lo, x_hi])
            r0, r1 = np.searchsorted(arc_mm, [y_lo, y_hi])
            if c0 >= c1 or r0 >= r1:
                continue
            cover = _segment_coverage(along_mm[None, c0:c1], arc_mm[r0:r1, None], p0, p1,
                                      w0 / 2, w1 / 2, self.px_mm)
            region = dark[r0:r1, c0:c1]
            np.maximum(region, (crack.depth * cover).astype(np.float32), out=region)

    def strip(self, first_col: int, count: int) -> np.ndarray:
        """Strip columns first_col .. first_col + count - 1 (all rows) as float32 grey."""
        k0, k1 = first_col // TILE_PX, (first_col + count - 1) // TILE_PX
        tiles = [self._tile(k) for k in range(k0, k1 + 1)]
        joined = tiles[0] if len(tiles) == 1 else np.concatenate(tiles, axis=1)
        start = first_col - k0 * TILE_PX
        return joined[:, start:start + count]

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as BGR uint8, height x width."""
        if not 0 <= index < self.frames:
            raise IndexError(f"frame {index} is outside 0..{self.frames - 1}")
        grey = self.strip(self._left_column(index), self.n_along) * self._vignette
        noise_rng = np.random.default_rng([self.seed, 7, index])
        grey += noise_rng.standard_normal(grey.shape, dtype=np.float32) * np.float32(1.5)
        grey = np.clip(grey + 0.5, 0, 255).astype(np.uint8)
        if self.config.camera.direction == -1:
            grey = grey[:, ::-1]
        if self.config.camera.along_axis == "y":
            grey = grey.T
        grey = np.ascontiguousarray(grey)
        return cv2.LUT(cv2.merge([grey, grey, grey]), self._tint)

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.frames):
            yield self.frame(index)


def _orientation_deg(points: np.ndarray) -> float:
    """Principal axis of a polyline (mm, length-weighted), degrees from +chainage towards +arc,
    in [0, 180)."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    mids = (points[1:] + points[:-1]) / 2
    centre = (mids * seg[:, None]).sum(axis=0) / seg.sum()
    d = mids - centre
    cov = (d.T * seg) @ d / seg.sum()
    angle = 0.5 * math.degrees(math.atan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))
    return angle % 180.0


def _type_of(orientation: float, margin: float = 0.0) -> str | None:
    """The crack type of an orientation; None within ``margin`` degrees of a type boundary."""
    off_axis = min(orientation % 180.0, 180.0 - orientation % 180.0)
    if off_axis <= TYPE_TOLERANCE_DEG - margin:
        return "longitudinal"
    if off_axis >= 90.0 - TYPE_TOLERANCE_DEG + margin:
        return "circumferential"
    if TYPE_TOLERANCE_DEG + margin <= off_axis <= 90.0 - TYPE_TOLERANCE_DEG - margin:
        return "diagonal"
    return None


# --- public entry points ------------------------------------------------------------------------

def synthetic_frames(seconds: float = 10.0, seed: int = 0, fps: float = 25.0, width: int = 640,
                     height: int = 360, config: PipelineConfig | None = None
                     ) -> Iterator[np.ndarray]:
    """The frames :func:`synthesize_drive` writes (BGR uint8), rendered on demand, no file."""
    return iter(SyntheticDrive(seconds, seed, fps, width, height, config))


def synthesize_drive(out: Path, seconds: float = 10.0, seed: int = 0, fps: float = 25.0,
                     width: int = 640, height: int = 360, config: PipelineConfig | None = None,
                     truth: Path | None = None) -> dict:
    """Write a synthetic drive to ``out`` (mp4, 'mp4v', BGR at ``fps``) and return its truth; also
    write the truth as JSON to ``truth`` when given.

    Truth keys: video, fps, seconds, frames, width, height, speed_kmh, start_chainage_m,
    chainage_range_m (what the frames show), mm_per_px_along, mm_per_px_across, arc_offset_mm,
    seed, cracks, ring_joints_m, water_stains, bolt_holes. Each crack: id, chainage_start_m /
    chainage_end_m and arc_start_mm / arc_end_mm (extents), chainage_m / arc_mm (length-weighted
    centroid), length_mm (polyline length), width_mm (length-weighted mean), width_max_mm,
    orientation_deg (principal axis, from +chainage towards +arc, 0..180), type, frame_range
    (first and last frame showing any of it) and polyline ([[chainage_m, arc_mm], ...], a vertex
    every 3 mm).
    """
    out = Path(out)
    drive = SyntheticDrive(seconds, seed, fps, width, height, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), drive.fps,
                             (drive.width, drive.height))
    if not writer.isOpened():
        raise SynthError(f"cannot write video {out}: OpenCV has no 'mp4v' writer for this path; "
                         "use a .mp4 file name in a writable folder")
    try:
        for image in drive:
            writer.write(image)
    finally:
        writer.release()
    _check_video(out, drive)
    result = drive.truth(video=str(out))
    if truth is not None:
        truth = Path(truth)
        truth.parent.mkdir(parents=True, exist_ok=True)
        truth.write_text(json.dumps(result, indent=1))
    log.info("synthesized %s: %d frames, %d cracks, chainage %.2f..%.2f m", out, drive.frames,
             len(result["cracks"]), *result["chainage_range_m"])
    return result


def _check_video(path: Path, drive: SyntheticDrive) -> None:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise SynthError(f"the video just written to {path} does not open; "
                             "check free disk space and that OpenCV has FFmpeg support")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if count != drive.frames or size != (drive.width, drive.height):
            raise SynthError(f"the video written to {path} holds {count} frames of {size[0]}x"
                             f"{size[1]}, expected {drive.frames} of {drive.width}x{drive.height};"
                             " check free disk space")
    finally:
        capture.release()
