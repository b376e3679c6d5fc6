"""Synthetic tunnel-lining training tiles with a class index per pixel (``crackscan synth
--dataset``): the data a multi-class segmenter learns what a lining looks like from.

A tile is a square patch of lining seen at a scale drawn log-uniformly from 0.3-3 mm per pixel,
with the tunnel's axes at a random angle (mostly near the image axes). On procedural concrete
(value noise at several scales, aggregate, air voids, formwork board marks or shotcrete lumps,
a colour tint) a random subset of lining features is drawn, in this order, each writing its class
into the mask where it covers at least half a pixel, so a later object wins where two overlap:

    stains -> spalling -> joints -> holes -> markings -> scratches -> cracks -> cables

Cracks come after every surface feature (a crack drawn over a joint or a stain stays crack);
cables hang in front of the wall and hide what is behind them. The classes are ``CLASSES``
(index = mask value). About ``NO_CRACK_P`` of the tiles hold no crack (hard negatives); a crack
often starts at a joint (crossing it or running beside it) or inside a stain.

Geometry (scale, angle, placement) is the mask's truth; photometric effects (colour or grey,
white balance, brightness, contrast, gamma, a lighting gradient, vignetting, blur, line-scan
column / row gain bands, sensor noise, JPEG re-compression) come after and never touch the mask.
They are drawn from their own random stream, so ``render_tile(..., photometric=False)`` gives
the same mask and objects as the photometric tile.

Deterministic: tile ``i`` of seed ``s`` depends on (s, i) alone (its scene from
``default_rng([s, i, 0])``, its photometric effects from ``default_rng([s, i, 1])``), and so does
its split (``i % 10 == 9``: validation), so a larger ``--images`` grows a dataset without
changing the tiles it had. Texture and crack geometry reuse the synthetic drive's value noise,
capsule coverage and crack random walk (:mod:`acquisition.synth`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from acquisition.synth import (
    SyntheticDrive,
    _hash01,
    _key,
    _segment_coverage,
    _smooth,
    _value_noise,
)
from crackscan.errors import UserError

log = logging.getLogger(__name__)

CLASSES = ("background", "crack", "joint", "stain", "spalling", "hole", "cable", "marking",
           "scratch")
CLASS_INDEX = {name: index for index, name in enumerate(CLASSES)}
MM_PER_PX = (0.3, 3.0)
CRACK_WIDTH_PX = (1.0, 6.0)
NO_CRACK_P = 0.3  # share of tiles without a crack: hard negatives
VAL_EVERY = 10  # tile i is a validation tile when i % VAL_EVERY == VAL_EVERY - 1
SIZE_RANGE = (64, 4096)
MAX_IMAGES = 10_000_000
GREY_P = 0.35  # share of tiles written as single-channel grey images
# chance that a tile holds each feature (a crack-free tile gets a little more of them)
FEATURE_P = {"joint": 0.5, "stain": 0.4, "spalling": 0.22, "hole": 0.28, "marking": 0.25,
             "scratch": 0.35, "cable": 0.2}
PAINT_BGR = ((40, 40, 200), (235, 235, 235), (40, 210, 230), (30, 30, 30), (180, 90, 30),
             (30, 120, 240), (60, 160, 60))
CABLE_BGR = ((35, 35, 35), (110, 110, 110), (30, 110, 230), (30, 200, 230), (215, 215, 215),
             (165, 165, 160))
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
         cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)


class LiningDataError(UserError, ValueError):
    """A lining dataset that cannot be written as asked (bad count or size, folder not empty)."""


@dataclass(frozen=True)
class LiningTile:
    image: np.ndarray  # HxWx3 BGR uint8, or HxW uint8 for a grey tile
    mask: np.ndarray  # HxW uint8 class index (CLASSES)
    truth: dict  # mm_per_px, angle_deg, grey, has_crack, objects (see write_lining_dataset)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _pts(points: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y in points]


def _shifted(cover: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``cover`` sampled at (x + dx, y + dy): what lies ``(dx, dy)`` away from each pixel."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(cover, matrix, cover.shape[::-1], flags=cv2.INTER_LINEAR
                          | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)


class _Scene:
    """One tile being drawn: the float BGR image, the class mask and the truth objects."""

    def __init__(self, seed: int, index: int, size: int) -> None:
        self.rng = np.random.default_rng([seed, index, 0])
        self.size = size
        self.xs, self.ys = _grid(size)
        self.key_base = int(self.rng.integers(1 << 30))
        self.mm_per_px = math.exp(self.rng.uniform(*np.log(MM_PER_PX)))
        self.s = 1.0 / self.mm_per_px  # px per mm
        # direction of the tunnel axis in the image: mostly near an image axis
        if self.rng.random() < 0.7:
            angle = 90.0 * int(self.rng.integers(2)) + self.rng.normal(0.0, 2.0)
        else:
            angle = self.rng.uniform(0.0, 180.0)
        self.angle_deg = angle % 180.0
        rad = math.radians(self.angle_deg)
        self.along = np.array([math.cos(rad), math.sin(rad)])
        self.ring = np.array([-math.sin(rad), math.cos(rad)])
        light = self.rng.uniform(0, 2 * math.pi)
        self.light = np.array([math.cos(light), math.sin(light)])  # towards the light
        self.image = np.zeros((size, size, 3), np.float32)
        self.mask = np.zeros((size, size), np.uint8)
        self.objects: list[dict] = []
        self.joint_lines: list[tuple[np.ndarray, np.ndarray, float]] = []  # point, direction, reach
        self.stain_centres: list[np.ndarray] = []

    def key(self, layer: int) -> int:
        return _key(self.key_base, layer)

    def px(self, lo_mm: float, hi_mm: float, lo_px: float, hi_px: float) -> float:
        """A size drawn in ``lo_mm..hi_mm`` (log-uniform), in px, kept within lo_px..hi_px."""
        mm = math.exp(self.rng.uniform(math.log(lo_mm), math.log(hi_mm)))
        return float(np.clip(mm * self.s, lo_px, hi_px))

    def label(self, name: str, where: np.ndarray) -> None:
        self.mask[where] = CLASS_INDEX[name]

    def frame(self, origin: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel coordinates along ``direction`` (t) and across it (n) from ``origin``."""
        dx, dy = self.xs - np.float32(origin[0]), self.ys - np.float32(origin[1])
        t = dx * np.float32(direction[0]) + dy * np.float32(direction[1])
        n = -dx * np.float32(direction[1]) + dy * np.float32(direction[0])
        return t, n

    def inner_point(self, share: float = 0.8) -> np.ndarray:
        lo = (1 - share) / 2 * self.size
        return self.rng.uniform(lo, self.size - lo, 2)

    def line_ends(self, point: np.ndarray, direction: np.ndarray) -> list[np.ndarray]:
        """End points of the infinite line through ``point`` clipped to the tile."""
        far = 2.0 * self.size
        a, b = point - far * direction, point + far * direction
        inside, p0, p1 = cv2.clipLine((0, 0, self.size, self.size),
                                      (round(a[0]), round(a[1])), (round(b[0]), round(b[1])))
        return [np.array(p0, float), np.array(p1, float)] if inside else [a, b]

    # --- surface --------------------------------------------------------------------------------

    def texture(self) -> None:
        rng, size, s = self.rng, self.size, self.s
        us = np.arange(size) + int(rng.integers(1 << 20))
        vs = np.arange(size) + int(rng.integers(1 << 20))
        surface = str(rng.choice(["precast", "cast", "shotcrete"], p=[0.45, 0.3, 0.25]))
        rough = {"precast": 0.7, "cast": 1.0, "shotcrete": 1.6}[surface]
        grey = np.full((size, size), rng.uniform(125, 185), np.float32)
        for layer, (cell_mm, amplitude) in enumerate(((500, 12), (120, 8), (30, 6), (8, 5))):
            cell = max(cell_mm * s, 1.5)
            grey += amplitude * rough * rng.uniform(0.5, 1.3) * _value_noise(
                self.key(layer), us, vs, cell)
        grey += rng.uniform(4, 12) * (_hash01(vs[:, None], us[None, :], self.key(10)) - 0.5)
        cell = max(rng.uniform(5, 12) * s, 1.5)  # aggregate
        stones = np.clip((_value_noise(self.key(11), us, vs, cell) - 0.45) * 4.0, 0, 1)
        shade = _value_noise(self.key(12), us, vs, cell * 1.5)
        grey += stones * np.where(shade > 0, 12.0, -10.0) * rough
        if surface == "shotcrete":  # lumps lit from one side
            bumps = _value_noise(self.key(13), us, vs, max(rng.uniform(15, 40) * s, 2.0))
            gx = cv2.Sobel(bumps, cv2.CV_32F, 1, 0, ksize=3)
            gy = cv2.Sobel(bumps, cv2.CV_32F, 0, 1, ksize=3)
            grey += 30.0 * max(s * 10, 1.0) * (gx * self.light[0] + gy * self.light[1]) / 8
        elif surface == "cast":  # formwork boards: faint lines and board-to-board shading
            direction = self.along if rng.random() < 0.5 else self.ring
            spacing = max(rng.uniform(100, 300) * s, 12.0)
            _, n = self.frame(np.zeros(2), direction)
            board = np.floor(n / spacing)
            offsets = (_hash01(board.astype(np.int64), 0, self.key(14)) - 0.5) * 12.0
            edge = (n - board * spacing).astype(np.float32)  # px past the board's edge
            edge = np.minimum(edge, spacing - edge)
            grey += offsets - rng.uniform(5, 14) * np.exp(-((edge / 0.9) ** 2))
        self.surface = surface
        # air voids: small dark pits
        area_m2 = (size * self.mm_per_px / 1000.0) ** 2
        count = min(int(rng.poisson(rng.uniform(100, 1500) * area_m2)), 300)
        voids = np.zeros((size, size), np.uint8)
        for _ in range(count):  # mostly small, a few up to 3 mm across
            x, y = rng.uniform(0, size, 2)
            radius = max(0.3 * math.exp(min(rng.exponential(0.7), 1.6)) * s, 0.4)
            squash = rng.uniform(0.6, 1.0)
            axes = (round(radius * 16), round(radius * squash * 16))
            cv2.ellipse(voids, (round(x * 16), round(y * 16)), axes, rng.uniform(0, 180), 0, 360,
                        int(rng.integers(120, 256)), -1, cv2.LINE_AA, 4)
        voids = cv2.GaussianBlur(voids, (0, 0), 0.6).astype(np.float32) / 255.0
        grey *= 1.0 - rng.uniform(0.25, 0.5) * voids
        tint = np.float32([1.0 + rng.normal(0, 0.035), 1.0, 1.0 + rng.normal(0, 0.035)])
        self.image[:] = grey[:, :, None] * tint

    # --- lining features ------------------------------------------------------------------------

    def stain(self, centre: np.ndarray | None = None) -> None:
        rng = self.rng
        kind = str(rng.choice(["leak", "efflorescence", "rust"], p=[0.5, 0.3, 0.2]))
        centre = self.inner_point(0.9) if centre is None else centre
        rx = self.px(40, 500, 8, 0.7 * self.size)
        ry = rx * rng.uniform(0.35, 1.0)
        if kind == "leak" and rng.random() < 0.5:  # a run down the ring
            direction, rx, ry = self.ring, max(rx, ry * 2.5), ry * 0.6
        else:
            direction = np.array([math.cos(a := rng.uniform(0, math.pi)), math.sin(a)])
        t, n = self.frame(centre, direction)
        us = np.arange(self.size)
        wobble = _value_noise(self.key(20 + len(self.objects)), us, us, max(rx * 0.4, 3.0))
        edge = np.sqrt((t / rx) ** 2 + (n / ry) ** 2) + 0.3 * wobble
        sharp = rng.random() < 0.5
        soft = rng.uniform(0.05, 0.15) if sharp else rng.uniform(0.3, 0.6)
        strength = rng.uniform(0.2, 0.45) if kind != "efflorescence" else rng.uniform(0.3, 0.7)
        alpha = strength * (1.0 - _smooth(np.clip((edge - (1.0 - soft)) / soft, 0, 1)))
        if sharp:  # a tide mark at the rim
            alpha += strength * 0.6 * np.exp(-(((edge - 0.98) / 0.03) ** 2))
        a = alpha[:, :, None]
        if kind == "leak":
            self.image *= 1.0 - a * np.float32([1.05, 1.0, 0.92])
        elif kind == "efflorescence":
            self.image += a * (np.float32([232, 236, 238]) - self.image)
        else:
            self.image *= 1.0 - a * np.float32([0.75, 0.45, 0.15])
        where = edge <= (1.0 - soft / 2 if not sharp else 1.0)
        if not where.any():
            return
        self.label("stain", where)
        self.stain_centres.append(centre)
        contour = self._contour(where)
        self.objects.append({"class": "stain", "kind": kind, "polygon": contour})

    def _contour(self, where: np.ndarray) -> list[list[float]]:
        contours, _ = cv2.findContours(where.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        largest = max(contours, key=cv2.contourArea)
        return _pts(cv2.approxPolyDP(largest, 1.0, True)[:, 0, :])

    def spalling(self) -> None:
        rng, size = self.rng, self.size
        centre = self.inner_point(0.9)
        radius = self.px(25, 250, 6, 0.4 * size)
        angles = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        harmonics = np.arange(2, 7)
        shape = sum(rng.normal(0, 0.22 / k) * np.cos(k * angles + rng.uniform(0, 2 * math.pi))
                    for k in harmonics)
        radii = radius * np.clip(0.8 + shape + rng.normal(0, 0.04, len(angles)), 0.3, 1.2)
        polygon = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
        where = np.zeros((size, size), np.uint8)
        cv2.fillPoly(where, [np.round(polygon * 8).astype(np.int32)], 1, cv2.LINE_8, 3)
        cover = cv2.GaussianBlur(where.astype(np.float32), (0, 0), 0.7)
        depth = max(2.0, min(radius * 0.25, rng.uniform(3, 12) * self.s + 1))
        dx, dy = self.light * depth
        shadow = cover * (1.0 - _shifted(cover, dx, dy))  # the edge towards the light casts it
        lit = cover * (1.0 - _shifted(cover, -dx, -dy))
        us = np.arange(size)
        rough = _value_noise(self.key(40), us, us, max(rng.uniform(3, 8) * self.s, 1.5))
        inside = 1.0 - cover * rng.uniform(0.1, 0.3) + cover * 0.18 * rough
        inside *= 1.0 - 0.55 * cv2.GaussianBlur(shadow, (0, 0), 0.8)
        inside += 0.25 * cv2.GaussianBlur(lit, (0, 0), 0.8)
        self.image *= inside[:, :, None]
        self.label("spalling", where > 0)
        self.objects.append({"class": "spalling", "polygon": _pts(polygon)})

    def joints(self) -> None:
        rng = self.rng
        kinds = str(rng.choice(["ring", "longitudinal", "both"], p=[0.5, 0.25, 0.25]))
        ring_joint = None
        if kinds in ("ring", "both"):
            ring_joint = self._joint(self.inner_point(), self.ring, "ring")
        if kinds in ("longitudinal", "both"):
            side = None
            if ring_joint is not None:  # staggered segments: the joint stops at the ring joint
                side = (ring_joint, 1.0 if rng.random() < 0.5 else -1.0)
            self._joint(self.inner_point(), self.along, "longitudinal", side)

    def _joint(self, point: np.ndarray, direction: np.ndarray, kind: str,
               side: tuple[np.ndarray, float] | None = None) -> np.ndarray:
        """A straight groove through ``point`` along ``direction``; with ``side`` (a ring joint's
        point and a sign) only on that side of the ring joint."""
        rng = self.rng
        _, n = self.frame(point, direction)
        us = np.arange(self.size)
        n = n + 0.3 * _value_noise(self.key(50 + len(self.objects)), us, us, 40.0)
        width = self.px(3, 14, 1.2, 0.1 * self.size)
        chamfer = 0.0 if rng.random() < 0.3 else self.px(3, 12, 1.0, 0.08 * self.size)
        keep = np.ones_like(n, bool)
        if side is not None:
            t_ring, _ = self.frame(side[0], self.along)
            keep = t_ring * side[1] > -width
        dist = np.abs(n)
        groove = (1.0 - _smooth(np.clip(dist - width / 2 + 0.5, 0, 1))) * keep
        step = rng.uniform(-0.1, 0.1)  # the two segments' faces differ (misalignment)
        shade = np.where((n > 0) & keep, 1.0 + step, 1.0).astype(np.float32)
        if chamfer > 0:
            slope = (dist >= width / 2) & (dist < width / 2 + chamfer) & keep
            facing = np.sign(n) * float(-direction[1] * self.light[0] + direction[0]
                                        * self.light[1])
            shade *= np.where(slope, 1.0 + 0.2 * facing * rng.uniform(0.5, 1.0), 1.0)
        shade = cv2.GaussianBlur(shade, (0, 0), 0.6)
        filler = str(rng.choice(["open", "gasket", "sealant"], p=[0.55, 0.3, 0.15]))
        self.image *= shade[:, :, None]
        g = groove[:, :, None]
        if filler == "sealant":
            self.image += g * (np.float32([190, 192, 195]) * rng.uniform(0.6, 1.1) - self.image)
        else:
            self.image *= 1.0 - g * rng.uniform(0.45, 0.75)
            if filler == "gasket" and width > 3:
                core = (dist < width / 4)[:, :, None] & keep[:, :, None]
                self.image = np.where(core, np.float32(25.0), self.image)
        self.label("joint", (dist <= width / 2 + chamfer) & keep)
        ends = self.line_ends(point, direction)
        if side is not None:  # from the ring joint outwards
            t0 = float((side[0] - point) @ direction)
            sign = side[1] * float(self.along @ direction)
            far = ends[1] if float((ends[1] - point) @ direction) * sign > 0 else ends[0]
            cut = point + t0 * direction
            ends = [cut, far]
        self.objects.append({"class": "joint", "kind": kind, "filler": filler,
                             "polyline": _pts(ends), "width_px": round(width + 2 * chamfer, 2)})
        self.joint_lines.append((point, direction, width / 2 + chamfer))
        return point

    def hole(self) -> None:
        rng = self.rng
        kind = str(rng.choice(["bolt_pocket", "grout_hole"], p=[0.6, 0.4]))
        centre = self.inner_point(0.85)
        u = self.along if rng.random() < 0.5 else self.ring
        t, n = self.frame(centre, u)
        if kind == "bolt_pocket":
            half = np.array([self.px(30, 90, 3, 0.35 * self.size), 0.0])
            half[1] = half[0] * rng.uniform(0.4, 0.8)
            corner = min(half) * rng.uniform(0.1, 0.5)
            q = np.stack([np.abs(t), np.abs(n)]) - (half - corner)[:, None, None]
            sdf = (np.hypot(np.maximum(q[0], 0), np.maximum(q[1], 0))
                   + np.minimum(np.maximum(q[0], q[1]), 0) - corner)
            outline = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        else:
            radius = self.px(12, 45, 2, 0.2 * self.size)
            sdf = np.hypot(t, n) - radius
            phi = np.linspace(0, 2 * math.pi, 16, endpoint=False)
            outline = np.stack([np.cos(phi), np.sin(phi)], 1) * radius
        cover = np.clip(0.5 - sdf, 0, 1).astype(np.float32)
        depth = max(1.5, float(-sdf.min()) * rng.uniform(0.3, 0.7))
        dx, dy = self.light * depth
        shadow = cover * (1.0 - _shifted(cover, dx, dy))
        dark = cover * rng.uniform(0.35, 0.6) + 0.3 * cv2.GaussianBlur(shadow, (0, 0), 1.0)
        self.image *= 1.0 - np.clip(dark, 0, 0.9)[:, :, None]
        inner = -float(sdf.min())
        if inner > 4 and rng.random() < 0.6:  # a bolt head or a grout plug
            r = inner * rng.uniform(0.3, 0.6)
            plug = np.clip(r - np.hypot(t, n) + 0.5, 0, 1)[:, :, None]
            metal = np.float32([150, 150, 145]) * rng.uniform(0.6, 1.2)
            self.image += plug * (metal - self.image)
        self.label("hole", sdf <= 0)
        # the outline in the hole's own frame (t along u, n along v), back to the image
        v = np.array([-u[1], u[0]])
        polygon = centre + outline[:, :1] * u + outline[:, 1:] * v
        self.objects.append({"class": "hole", "kind": kind, "polygon": _pts(polygon)})

    def marking(self) -> None:
        rng, size = self.rng, self.size
        style = str(rng.choice(["text", "stamp", "sign"], p=[0.6, 0.2, 0.2]))
        if style == "sign":
            text = str(rng.choice(["X", "+", "O", "->", "|"]))
        else:
            choices = [f"K{rng.integers(0, 99)}+{rng.integers(0, 999):03d}",
                       f"R{rng.integers(1, 2000)}", f"{rng.integers(1, 999)}",
                       "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ0123456789"),
                                          int(rng.integers(1, 5))))]
            text = str(choices[int(rng.integers(len(choices)))])
        font = int(FONTS[int(rng.integers(len(FONTS)))]) | (
            cv2.FONT_ITALIC if rng.random() < 0.2 else 0)
        height = self.px(30, 250, 8, 0.45 * size)
        (w1, h1), _ = cv2.getTextSize(text, font, 1.0, 1)
        scale = height / max(h1, 1)
        if (w1 * scale) > 0.95 * size:
            scale = 0.95 * size / w1
        thickness = max(1, round(height * rng.uniform(0.06, 0.16)))
        (w, h), base = cv2.getTextSize(text, font, scale, thickness)
        pad = thickness + 2
        canvas = np.zeros((h + base + 2 * pad, w + 2 * pad), np.uint8)
        cv2.putText(canvas, text, (pad, pad + h), font, scale, 255, thickness, cv2.LINE_AA)
        direction = self.along if rng.random() < 0.5 else self.ring
        angle = math.degrees(math.atan2(direction[1], direction[0])) + rng.normal(0, 4)
        if rng.random() < 0.5:
            angle += 180.0
        centre = self.inner_point(0.8)
        ch, cw = canvas.shape
        matrix = cv2.getRotationMatrix2D((cw / 2, ch / 2), -angle, 1.0)
        matrix[:, 2] += centre - np.array([cw / 2, ch / 2])
        cover = cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR)
        cover = cover.astype(np.float32) / 255.0
        if style != "stamp" and rng.random() < 0.5:  # sprayed: soft edges
            cover = cv2.GaussianBlur(cover, (0, 0), rng.uniform(0.4, 1.2))
        if not (cover >= 0.5).any():
            return
        if style == "stamp":  # pressed into the concrete: darker with a lit and a shadowed edge
            dx, dy = self.light * 1.0
            relief = cover - _shifted(cover, dx, dy)
            self.image *= (1.0 - 0.15 * cover - 0.2 * relief)[:, :, None]
        else:
            colour = np.float32(PAINT_BGR[int(rng.integers(len(PAINT_BGR)))])
            opacity = rng.uniform(0.6, 0.95)
            us = np.arange(size)
            patchy = 1.0 - 0.25 * np.abs(_value_noise(self.key(60), us, us, 6.0))
            a = (cover * opacity * patchy)[:, :, None]
            self.image += a * (colour * (self.image / 160.0) ** 0.3 - self.image)
        self.label("marking", cover >= 0.5)
        corners = np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], float)
        polygon = corners @ matrix[:, :2].T + matrix[:, 2]
        self.objects.append({"class": "marking", "style": style, "text": text,
                             "polygon": _pts(polygon)})

    def scratches(self) -> None:
        rng = self.rng
        count = int(rng.integers(1, 6))
        start = self.inner_point(0.8)
        heading = rng.uniform(0, math.pi)
        bright = rng.random() < 0.7
        for _ in range(count):
            length = self.px(20, 250, 6, 0.6 * self.size)
            p0 = start + rng.normal(0, 0.15 * length, 2)
            h = heading + rng.normal(0, 0.05)
            bend = rng.normal(0, 0.15)
            mid = p0 + 0.5 * length * np.array([math.cos(h), math.sin(h)])
            p1 = mid + 0.5 * length * np.array([math.cos(h + bend), math.sin(h + bend)])
            points = np.array([p0, mid, p1])
            width = rng.uniform(1.0, 2.0)
            cover = self._polyline_cover(points, np.full(3, width))
            if not (cover >= 0.5).any():
                continue
            contrast = rng.uniform(15, 35) * (1 if bright else -0.8)
            self.image += (contrast * cover)[:, :, None]
            self.label("scratch", cover >= 0.5)
            self.objects.append({"class": "scratch", "polyline": _pts(points),
                                 "width_px": round(width, 2)})

    def _polyline_cover(self, points: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """Max capsule coverage of a polyline with per-vertex widths (px), as the drive's
        cracks: integrated across the line it is the width."""
        cover = np.zeros((self.size, self.size), np.float32)
        for p0, p1, w0, w1 in zip(points[:-1], points[1:], widths[:-1], widths[1:], strict=True):
            half = max(w0, w1) / 2 + 2
            c0 = max(int(min(p0[0], p1[0]) - half), 0)
            c1 = min(int(max(p0[0], p1[0]) + half) + 2, self.size)
            r0 = max(int(min(p0[1], p1[1]) - half), 0)
            r1 = min(int(max(p0[1], p1[1]) + half) + 2, self.size)
            if c0 >= c1 or r0 >= r1:
                continue
            local = _segment_coverage(self.xs[0, c0:c1][None, :], self.ys[r0:r1, 0][:, None],
                                      p0, p1, w0 / 2, w1 / 2, 1.0)
            np.maximum(cover[r0:r1, c0:c1], local, out=cover[r0:r1, c0:c1])
        return cover

    # --- cracks ---------------------------------------------------------------------------------

    def cracks(self) -> None:
        rng = self.rng
        count = int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.1]))
        dark = np.zeros((self.size, self.size), np.float32)
        cover = np.zeros_like(dark)
        drawn = 0
        for _ in range(count * 4):
            if drawn == count:
                break
            polylines = self._crack_polylines()
            if not polylines:
                continue
            depth = rng.uniform(0.45, 0.85)
            parent = len(self.objects)
            for number, (points, widths) in enumerate(polylines):
                local = self._polyline_cover(points, widths)
                np.maximum(cover, local, out=cover)
                np.maximum(dark, local * depth * (0.75 if number else 1.0), out=dark)
                seg = np.hypot(*np.diff(points, axis=0).T)
                seg_width = (widths[1:] + widths[:-1]) / 2
                self.objects.append({
                    "class": "crack", "polyline": _pts(points),
                    "widths_px": [round(float(w), 2) for w in widths],
                    "width_px": round(float((seg * seg_width).sum() / seg.sum()), 3),
                    "length_px": round(float(seg.sum()), 2),
                    "branch_of": parent if number else None})
            drawn += 1
        if not drawn:
            return
        us = np.arange(self.size)
        grain = 0.85 + 0.3 * _hash01(us[:, None], us[None, :], self.key(30))
        halo = cv2.GaussianBlur(dark, (0, 0), 1.8)
        self.image *= ((1.0 - np.clip(dark * grain, 0, 0.95)) * (1.0 - 0.2 * halo))[:, :, None]
        self.label("crack", cover >= 0.5)

    def _crack_polylines(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A crack (main polyline and its branches, px, with vertex widths) that lies in the
        tile, or none when the walk left the tile too soon."""
        rng, size = self.rng, self.size
        length = float(np.clip(math.exp(rng.uniform(math.log(40), math.log(1500))) * self.s,
                               25, 1.6 * size))
        start_from = rng.random()
        if self.joint_lines and start_from < 0.5:
            point, direction, reach = self.joint_lines[int(rng.integers(len(self.joint_lines)))]
            on_joint = point + direction * rng.uniform(-0.4, 0.4) * size
            normal = np.array([-direction[1], direction[0]])
            if rng.random() < 0.6:  # across the joint
                heading = math.atan2(normal[1], normal[0]) + rng.normal(0, 0.5)
                h = np.array([math.cos(heading), math.sin(heading)])
                start = on_joint - h * rng.uniform(0.2, 0.6) * length
            else:  # beside it, along its edge
                heading = math.atan2(direction[1], direction[0]) + rng.normal(0, 0.08)
                start = on_joint + normal * (reach + rng.uniform(2, 12)) * rng.choice([-1, 1])
        elif self.stain_centres and start_from < 0.8:
            centre = self.stain_centres[int(rng.integers(len(self.stain_centres)))]
            heading = rng.uniform(0, 2 * math.pi)
            start = centre - np.array([math.cos(heading), math.sin(heading)]) * (
                rng.uniform(0.1, 0.5) * length)
        else:
            axis = [self.along, self.ring][int(rng.integers(2))]
            heading = math.atan2(axis[1], axis[0]) + (
                rng.normal(0, 0.15) if rng.random() < 0.6 else rng.uniform(-1, 1))
            start = self.inner_point(0.9)
            if rng.random() < 0.5:  # centred on the point rather than starting there
                start = start - 0.5 * length * np.array([math.cos(heading), math.sin(heading)])
        points = self._walk_inside(start, heading, length)
        if points is None:
            return []
        widths = self._widths(points)
        polylines = [(points, widths)]
        if len(points) > 8 and rng.random() < 0.3:
            for _ in range(int(rng.integers(1, 3))):
                k = int(rng.integers(len(points) // 4, 3 * len(points) // 4))
                d = points[k + 1] - points[k]
                turn = rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
                branch = self._walk_inside(points[k], math.atan2(d[1], d[0]) + turn,
                                           length * rng.uniform(0.2, 0.5), clip_start=False)
                if branch is not None:
                    bw = np.minimum(self._widths(branch), widths[k] * 0.8)
                    polylines.append((branch, np.maximum(bw, CRACK_WIDTH_PX[0])))
        return polylines

    def _walk_inside(self, start: np.ndarray, heading: float, length: float,
                     clip_start: bool = True) -> np.ndarray | None:
        """The drive's crack random walk (a vertex every 3 px) from ``start``, keeping the part
        inside the tile (the first inside run); None when under 12 px of it is inside."""
        points = SyntheticDrive._random_walk(self.rng, heading, length) + start
        lo, hi = 1.0, self.size - 2.0
        inside = np.all((points >= lo) & (points <= hi), axis=1)
        if not inside.any():
            return None
        first = int(np.argmax(inside))
        if not clip_start and first:
            return None
        run_end = first + int(np.argmin(inside[first:])) if not inside[first:].all() else len(
            points)
        points = points[first:run_end]
        if len(points) < 2 or np.hypot(*np.diff(points, axis=0).T).sum() < 12:
            return None
        return points

    def _widths(self, points: np.ndarray) -> np.ndarray:
        """Vertex widths (px): a smooth random profile round a base width, tapered at the ends,
        within CRACK_WIDTH_PX."""
        rng = self.rng
        arclen = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))])
        base = math.exp(rng.uniform(math.log(1.0), math.log(5.0)))
        wobble = np.cumsum(rng.normal(0.0, 0.07, len(points))) * 0.8
        wobble += rng.normal(0.0, 0.08, len(points))
        from_end = np.minimum(arclen, arclen[-1] - arclen) / max(0.2 * arclen[-1], 1e-9)
        taper = np.clip(0.45 + 0.55 * np.sqrt(np.clip(from_end, 0, 1)), 0, 1)
        return np.clip(base * np.exp(wobble) * taper, *CRACK_WIDTH_PX)

    def cable(self) -> None:
        rng = self.rng
        direction = self.along if rng.random() < 0.75 else self.ring
        heading = math.atan2(direction[1], direction[0]) + rng.normal(0, 0.05)
        direction = np.array([math.cos(heading), math.sin(heading)])
        count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
        width = self.px(10, 70, 3, 0.2 * self.size)
        origin = self.inner_point(0.8)
        sag = rng.normal(0, 0.04) / self.size  # slight curve: n offset k * t^2
        colour = np.float32(CABLE_BGR[int(rng.integers(len(CABLE_BGR)))])
        normal = np.array([-direction[1], direction[0]])
        light_n = float(self.light @ normal)
        for number in range(count):
            point = origin + normal * number * width * rng.uniform(1.05, 1.4)
            t, n = self.frame(point, direction)
            n = n - sag * t * t
            u = n / (width / 2)
            band = np.clip(width / 2 - np.abs(n) + 0.5, 0, 1)
            # the wall behind gets the cable's soft shadow (still wall: not cable class)
            off = -light_n * width * 0.5
            shadow = np.clip(width / 2 - np.abs(n - off) + 0.5, 0, 1)
            shadow = cv2.GaussianBlur(shadow, (0, 0), max(width * 0.15, 0.8))
            self.image *= (1.0 - 0.35 * shadow * (1.0 - band))[:, :, None]
            z = np.sqrt(np.clip(1.0 - u * u, 0, 1))
            shade = 0.35 + 0.55 * z + 0.35 * light_n * u
            spec = np.exp(-(((u + 0.45 * light_n) / 0.14) ** 2)) * rng.uniform(20, 70)
            body = colour * shade[:, :, None] + spec[:, :, None]
            self.image += band[:, :, None] * (body - self.image)
            where = np.abs(n) <= width / 2
            spacing = self.px(200, 600, 3 * width, 4 * self.size)
            if rng.random() < 0.5:  # clamps
                phase = rng.uniform(0, spacing)
                clamp = (np.abs(((t - phase) % spacing) - spacing / 2) < width * 0.25) & (
                    np.abs(n) < width * 0.8)
                self.image = np.where(clamp[:, :, None], np.float32([150, 152, 155])
                                      * (0.7 + 0.3 * (1 - np.abs(u) / 1.6))[:, :, None],
                                      self.image)
                where |= clamp
            self.label("cable", where)
            ts = np.linspace(-1.5 * self.size, 1.5 * self.size, 61)
            centre = point + ts[:, None] * direction + (sag * ts * ts)[:, None] * normal
            keep = np.all((centre > -width) & (centre < self.size + width), axis=1)
            left = centre[keep] + normal * width / 2
            right = centre[keep] - normal * width / 2
            self.objects.append({"class": "cable", "polygon": _pts(np.vstack(
                [left, right[::-1]])), "width_px": round(width, 2)})


# --- photometric effects --------------------------------------------------------------------------

def _photometric(image: np.ndarray, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """Camera effects on the rendered float BGR image; the result is uint8 BGR, or HxW when
    ``grey``. Nothing here moves a pixel of the scene."""
    size = image.shape[0]
    xs, ys = _grid(size)
    image = image * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # white balance
    if grey:
        image = image.mean(axis=2, keepdims=True)
    cx, cy = (xs - size / 2) / size, (ys - size / 2) / size
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(-0.25, 0.25) * (cx * math.cos(angle) + cy * math.sin(angle)) * 2
    light *= 1.0 - rng.uniform(0.0, 0.4) * (cx * cx + cy * cy) * 2  # vignetting
    if rng.random() < 0.2:  # a hot spot of the vehicle's lamps
        hx, hy = rng.uniform(-0.5, 0.5, 2)
        light += rng.uniform(0.1, 0.4) * np.exp(-((cx - hx) ** 2 + (cy - hy) ** 2) / 0.08)
    image = image * light[:, :, None]
    mean = float(image.mean())
    image = (image - mean) * rng.uniform(0.6, 1.4) + mean * rng.uniform(0.55, 1.35)
    image = np.clip(image, 0, 255)
    if rng.random() < 0.5:
        gamma = math.exp(rng.uniform(math.log(0.6), math.log(1.8)))
        image = 255.0 * (image / 255.0) ** gamma
    blur = rng.random()
    if blur < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.3))
    elif blur < 0.4:  # motion blur
        n = int(rng.integers(3, 8))
        kernel = np.zeros((n, n), np.float32)
        a = rng.uniform(0, math.pi)
        c = (n - 1) / 2
        cv2.line(kernel, (round(c - c * math.cos(a)), round(c - c * math.sin(a))),
                 (round(c + c * math.cos(a)), round(c + c * math.sin(a))), 1.0, 1)
        image = cv2.filter2D(image, -1, kernel / kernel.sum())
    if image.ndim == 2:
        image = image[:, :, None]
    if rng.random() < 0.3:  # line-scan banding: per-column (or per-row) gains
        gains = 1.0 + rng.normal(0, rng.uniform(0.01, 0.05), size).astype(np.float32)
        if rng.random() < 0.5:
            gains = np.repeat(gains[::4], 4)[:size]  # stripes several px wide
        image = image * (gains[None, :, None] if rng.random() < 0.6 else gains[:, None, None])
    sigma = rng.uniform(0.5, 7.0)
    noise = rng.standard_normal(image.shape[:2] + (1 if grey else 3,), dtype=np.float32)
    image = image + noise * np.float32(sigma) * np.sqrt(np.clip(image, 1, 255) / 128.0)
    out = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if grey:
        out = np.ascontiguousarray(out[:, :, 0])
    if rng.random() < 0.4:
        quality = int(rng.integers(35, 96))
        ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return out


# --- public entry points --------------------------------------------------------------------------

def render_tile(seed: int, index: int, size: int = 256, photometric: bool = True) -> LiningTile:
    """Tile ``index`` of the lining dataset of ``seed``: image, class mask and truth.
    ``photometric=False`` leaves out the camera effects (the mask and truth are the same)."""
    scene = _Scene(seed, index, size)
    rng = scene.rng
    has_crack = rng.random() >= NO_CRACK_P
    boost = 1.0 if has_crack else 1.3
    present = {name: rng.random() < p * boost for name, p in FEATURE_P.items()}
    scene.texture()
    if present["stain"]:
        for _ in range(int(rng.choice([1, 2], p=[0.75, 0.25]))):
            scene.stain()
    if present["spalling"]:
        scene.spalling()
    if present["joint"]:
        scene.joints()
    if present["hole"]:
        scene.hole()
    if present["marking"]:
        scene.marking()
    if present["scratch"]:
        scene.scratches()
    if has_crack:
        scene.cracks()
    if present["cable"]:
        scene.cable()
    photo_rng = np.random.default_rng([seed, index, 1])
    grey = bool(photo_rng.random() < GREY_P)
    if photometric:
        image = _photometric(scene.image, photo_rng, grey)
    else:
        image = np.clip(scene.image + 0.5, 0, 255).astype(np.uint8)
    truth = {"mm_per_px": round(scene.mm_per_px, 4), "angle_deg": round(scene.angle_deg, 2),
             "surface": scene.surface, "grey": grey and photometric,
             "has_crack": any(o["class"] == "crack" for o in scene.objects),
             "objects": scene.objects}
    return LiningTile(image, scene.mask, truth)


# Distractors pasted onto real crack images (hard negatives): drawn over the real surface, opaque
# ones (cables, paint) hide what is under them, the others (joints, stains, holes, spalling,
# scratches) darken or lighten it and leave a crack under them a crack.
DISTRACTORS = ("joint", "stain", "spalling", "hole", "cable", "marking", "scratch")
OPAQUE = ("cable", "marking")


def paste_distractors(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                      num_classes: int = 1, count: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (HxWx3 uint8 BGR, a real crack image or crop) with 1-2 lining features drawn
    on it, and its mask updated: a binary mask (``num_classes`` 1, {0, 1}) keeps the features as
    background, a class mask (``num_classes`` = len(CLASSES)) gets their classes; crack pixels
    under an opaque feature become the feature. The feature is rendered on a procedural lining
    surface of the same size and carried over as its ratio to that surface, so the real image
    keeps its own texture, colour and lighting under it."""
    height, width = image.shape[:2]
    size = max(height, width)
    scene = _Scene(int(rng.integers(1 << 31)), int(rng.integers(1 << 31)), size)
    scene.texture()
    surface = scene.image.copy()
    kinds = rng.choice(DISTRACTORS, size=count or int(rng.integers(1, 3)), replace=False)
    for kind in kinds:
        getattr(scene, "joints" if kind == "joint" else
                "scratches" if kind == "scratch" else str(kind))()
    drawn = scene.mask[:height, :width]
    ratio = (scene.image / np.maximum(surface, 1.0))[:height, :width]
    out = image.astype(np.float32) * ratio
    opaque = np.isin(drawn, [CLASS_INDEX[name] for name in OPAQUE])
    out[opaque] = scene.image[:height, :width][opaque]  # cables and paint hide what is under
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    mask = mask.copy()
    crack = CLASS_INDEX["crack"] if num_classes > 1 else 1
    if num_classes > 1:
        mask[(drawn > 0) & ((mask != crack) | opaque)] = drawn[(drawn > 0) & ((mask != crack)
                                                                            | opaque)]
    else:
        mask[opaque] = 0
    return out, mask


def tile_id(index: int) -> str:
    return f"lining_{index:06d}"


def tile_split(index: int) -> str:
    return "val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"


def check_request(out: Path, images: int, size: int, seed: int) -> None:
    """Refuse a dataset request before anything is written (LiningDataError)."""
    if not 1 <= images <= MAX_IMAGES:
        raise LiningDataError(f"--images must be 1..{MAX_IMAGES}, got {images}")
    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise LiningDataError(f"--size must be {SIZE_RANGE[0]}..{SIZE_RANGE[1]} px, got {size}")
    if seed < 0:
        raise LiningDataError(f"--seed must be 0 or more, got {seed}")
    if out.exists() and not out.is_dir():
        raise LiningDataError(f"--dataset {out} is a file; name a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise LiningDataError(f"--dataset {out} is not empty; name a new or empty folder "
                              "(a dataset is written whole, never mixed into another)")


def write_lining_dataset(out: Path, images: int, size: int = 256, seed: int = 0,
                         progress: Callable[[int], None] | None = None) -> dict:
    """Write ``images`` tiles of ``size`` px into the new or empty folder ``out``:
    ``images/<id>.png`` (BGR, or grey), ``masks/<id>.png`` (class index per pixel),
    ``classes.json`` (the names in index order), ``train.txt`` / ``val.txt`` and ``truth.json``
    ({seed, size, classes, tiles: [{id, split, mm_per_px, angle_deg, surface, grey, has_crack,
    objects}]}; each object has ``class`` and a ``polygon`` or ``polyline`` in px; cracks also
    ``widths_px`` per vertex, ``width_px`` (length-weighted mean), ``length_px`` and
    ``branch_of`` (the index of the crack it branches from, or null)). Returns a summary."""
    out = Path(out)
    check_request(out, images, size, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    started = time.perf_counter()
    tiles, splits = [], {"train": [], "val": []}
    pixels = np.zeros(len(CLASSES), np.int64)
    for index in range(images):
        tile = render_tile(seed, index, size)
        name = tile_id(index)
        for path, array in ((out / "images" / f"{name}.png", tile.image),
                            (out / "masks" / f"{name}.png", tile.mask)):
            if not cv2.imwrite(str(path), array):
                raise LiningDataError(f"cannot write {path}; check free disk space")
        pixels += np.bincount(tile.mask.ravel(), minlength=len(CLASSES))
        splits[tile_split(index)].append(name)
        tiles.append({"id": name, "split": tile_split(index), **tile.truth})
        if progress is not None:
            progress(index + 1)
    (out / "classes.json").write_text(json.dumps(list(CLASSES)) + "\n")
    for split, ids in splits.items():
        (out / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "truth.json").write_text(json.dumps(
        {"seed": seed, "size": size, "classes": list(CLASSES), "tiles": tiles},
        separators=(",", ":")) + "\n")
    seconds = time.perf_counter() - started
    summary = {"dataset": str(out), "images": images, "size": size, "seed": seed,
               "train": len(splits["train"]), "val": len(splits["val"]),
               "no_crack": sum(not t["has_crack"] for t in tiles),
               "class_pixels": {name: int(n) for name, n in zip(CLASSES, pixels, strict=True)},
               "seconds": round(seconds, 2), "tiles_per_s": round(images / seconds, 2)}
    log.debug("wrote %d lining tiles of %d px to %s in %.1f s (%.1f tiles/s)", images, size, out,
             seconds, images / seconds)
    return summary
