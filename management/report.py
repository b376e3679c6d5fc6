"""The inspection report of one run as one self-contained HTML file (``crackscan report``).

Contents, top to bottom:

- the run: id, source, mode, status, model, dates, frames, chainage range; the number of
  detections and of physical cracks, per severity and per type; the lining features per kind;
- the crack map: every physical crack's polyline in tunnel coordinates, x = chainage (m),
  y = ring arc (mm, growing upwards), in the colour of its width class (the severity classes of
  the config the run ran with; the default classes for a run that stored none), with a legend.
  A long run is drawn as several map strips, one under the other: windows of whole sections of
  at most PLOT_WIDTH / MIN_PX_PER_M = 160 m (at least one section), so a crack is drawn at
  10 px/m or more, unless that takes more than ``MAX_STRIPS`` strips (then the windows grow).
  No image is wider than ``MAP_WIDTH`` pixels;
- statistics per chainage section of ``section_m`` metres (sections start at multiples of
  ``section_m``; a crack counts in the section of its centroid's chainage): the number of
  physical cracks, their total length, the largest maximum width and the count per severity;
  every section the run covered is listed, with no cracks or not;
- the largest physical cracks (by length, ties by maximum width), each with the stored mask crop
  of its longest detection, scaled up (nearest neighbour) so it can be seen;
- the lining features (joints, stains, holes... of a multi-class model; :mod:`management.features`
  merges them): the count per kind, the ring joints, and every physical feature. They are drawn
  on the crack map as boxes of their extent in one colour of their own, beneath the cracks and
  with their own legend entry, and never count as cracks (not in the crack counts, the sections
  or the largest cracks). A run without features says that none were found (a binary model
  reports none).

Images are PNGs embedded as base64 data URIs and drawn with OpenCV and numpy (matplotlib is not a
runtime dependency); there are no scripts and no external assets. Every text value is escaped.

A run that is not merged yet (still running) is merged in memory, as ``crackscan query`` does.
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy.orm import Session

from crackscan.config import SeverityConfig
from crackscan.wire import CRACK_TYPES
from management.features import ring_joints
from management.merge import merge
from management.models import Run
from management.store import (
    QueryError,
    RunNotFound,
    crack_mask,
    latest_reviews,
    query_cracks,
    query_features,
    query_physical,
    run_summary,
)

MAP_WIDTH = 1720  # px, the whole map image: plot area plus margins
PLOT_WIDTH = 1600  # px
PLOT_HEIGHT = 300  # px
MARGIN_LEFT, MARGIN_TOP, MARGIN_BOTTOM = 90, 56, 44  # px; the right margin is what is left
MIN_PX_PER_M = 10.0  # a map strip spans at most PLOT_WIDTH / MIN_PX_PER_M metres ...
MAX_STRIPS = 12  # ... unless that needs more strips than this
MAX_SECTIONS = 10_000  # a longer table is refused: choose a larger section
CROP_MIN_PX = 96  # mask crops are scaled up until their longer side has at least this many px
CROP_MAX_PX = 480  # ... and never beyond this (larger crops are scaled down)

# Width classes from narrow to wide are coloured along this ramp (RGB): blue, teal, amber,
# orange, red; the five default classes get exactly these colours.
RAMP_RGB = ((44, 123, 182), (0, 166, 166), (240, 180, 0), (232, 89, 12), (192, 0, 26))
# Lining features (never cracks): boxes in a violet that no width class uses, filled pale.
FEATURE_RGB = (128, 80, 176)
FEATURE_FILL_RGB = (226, 214, 240)
BACKGROUND_BGR = (255, 255, 255)
GRID_BGR = (228, 228, 228)
AXIS_BGR = (60, 60, 60)
CROP_BACKGROUND_BGR = (245, 245, 245)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """RGB colours of ``n`` width classes, narrow to wide, sampled evenly along the ramp."""
    if n == 1:
        return [RAMP_RGB[-1]]
    out = []
    for i in range(n):
        t = i / (n - 1) * (len(RAMP_RGB) - 1)
        lo = min(int(t), len(RAMP_RGB) - 2)
        f = t - lo
        out.append(tuple(round(a + (b - a) * f)
                         for a, b in zip(RAMP_RGB[lo], RAMP_RGB[lo + 1], strict=True)))
    return out  # type: ignore[return-value]


def _bgr(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return rgb[2], rgb[1], rgb[0]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _severity(config: Any) -> SeverityConfig:
    """The run's severity classes, from the config it stored; the defaults when it has none."""
    try:
        return SeverityConfig.model_validate((config or {}).get("severity") or {})
    except (ValueError, AttributeError):
        return SeverityConfig()


def _class_ranges(severity: SeverityConfig) -> list[str]:
    """Each class's width range as text, e.g. '< 0.2 mm', '0.2-0.3 mm', '>= 5 mm'."""
    limits = list(severity.width_mm)
    if not limits:
        return ["any width"]
    out = [f"< {limits[0]:g} mm"]
    out += [f"{a:g}-{b:g} mm" for a, b in zip(limits[:-1], limits[1:], strict=True)]
    return out + [f">= {limits[-1]:g} mm"]


def severity_classes(config: Any) -> list[dict[str, str]]:
    """The run's severity classes, narrow to wide, with the colour the report and the map draw
    each in and its width range: ``[{"name", "colour" (#rrggbb), "range"}, ...]``."""
    severity = _severity(config)
    return [{"name": name, "colour": _hex(rgb), "range": text} for name, rgb, text in zip(
        severity.names, class_colours(len(severity.names)), _class_ranges(severity), strict=True)]


# --- data --------------------------------------------------------------------------------------

def _cracks_of_run(session: Session, run: Run) -> tuple[list[dict], dict[int, list[dict]]]:
    """(physical cracks, their detections by physical crack number) of the run."""
    detections = query_cracks(session, run=run.id)
    members: dict[int, list[dict]] = {}
    if run.merged_at is not None:
        physical = query_physical(session, run=run.id)
        for detection in detections:
            if detection["physical"] is not None:
                members.setdefault(detection["physical"], []).append(detection)
    else:  # not merged yet: merged in memory, as query_physical does, keeping the members
        physical = []
        for number, crack in enumerate(merge(detections), start=1):
            physical.append({"run": run.id, "number": number, **crack.to_dict(),
                             "merged": False})
            members[number] = [detections[i] for i in crack.members]
        rejected = {number for (_, number), review in latest_reviews(session, [run.id]).items()
                    if review["verdict"] == "rejected"}  # as query_physical leaves them out
        physical = [crack for crack in physical if crack["number"] not in rejected]
        physical.sort(key=lambda r: (r["chainage_m"], r["number"]))
    return physical, members


def _section_index(chainage_m: float, section_m: float) -> int:
    return math.floor(round(chainage_m / section_m, 9))  # 0.3 / 0.1 is section 3, not 2


def section_stats(cracks: list[dict], section_m: float, chainage: tuple[float, float] | None,
                  names: list[str]) -> list[dict[str, Any]]:
    """Statistics per section of ``section_m`` metres, in order of chainage: every section from
    the one holding the lower end of ``chainage`` (the run's frames) or of the first crack to the
    one holding the upper end or the last crack. Each: start_m, end_m, cracks, length_m,
    width_max_mm (None without cracks), severity {name: count} (every name of ``names``, plus
    any other severity found)."""
    points = [c["chainage_m"] for c in cracks] + (list(chainage) if chainage else [])
    points = [p for p in points if p is not None]
    if not points:
        return []
    first = _section_index(min(points), section_m)
    last = _section_index(max(points), section_m)
    if last - first + 1 > MAX_SECTIONS:
        raise QueryError(f"{last - first + 1} sections of {section_m:g} m: more than "
                         f"{MAX_SECTIONS}; choose a larger section length")
    sections = [{"start_m": k * section_m, "end_m": (k + 1) * section_m, "cracks": 0,
                 "length_m": 0.0, "width_max_mm": None, "severity": dict.fromkeys(names, 0)}
                for k in range(first, last + 1)]
    for crack in cracks:
        section = sections[_section_index(crack["chainage_m"], section_m) - first]
        section["cracks"] += 1
        section["length_m"] += crack["length_mm"] / 1000.0
        widest = section["width_max_mm"]
        section["width_max_mm"] = (crack["width_max_mm"] if widest is None
                                   else max(widest, crack["width_max_mm"]))
        counts = section["severity"]
        counts[crack["severity"]] = counts.get(crack["severity"], 0) + 1
    return sections


def largest_cracks(cracks: list[dict], n: int) -> list[dict]:
    """The ``n`` longest cracks, ties by maximum width (then by number)."""
    return sorted(cracks, key=lambda c: (-c["length_mm"], -c["width_max_mm"], c["number"]))[:n]


# --- images ------------------------------------------------------------------------------------

def _png_uri(image: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError("could not encode a PNG")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


def _ticks(lo: float, hi: float, target: int) -> tuple[list[float], int]:
    """About ``target`` round tick values in [lo, hi] (steps 1, 2, 5 x 10^k) and the decimals to
    label them with."""
    raw = max(hi - lo, 1e-9) / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def _text(image: np.ndarray, text: str, x: int, y: int, align: str = "left",
          scale: float = 0.45, colour: tuple[int, int, int] = AXIS_BGR) -> None:
    (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
    x = {"left": x, "centre": x - w // 2, "right": x - w}[align]
    cv2.putText(image, text, (x, y), FONT, scale, colour, 1, cv2.LINE_AA)


def _strips(lo: float, hi: float, section_m: float) -> list[tuple[float, float]]:
    """Chainage windows of the map strips covering [lo, hi]: whole sections, at most
    PLOT_WIDTH / MIN_PX_PER_M metres each (at least one section), unless that needs more than
    MAX_STRIPS strips."""
    start = _section_index(lo, section_m) * section_m
    end = max((_section_index(hi, section_m) + 1) * section_m, start + section_m)
    total = end - start
    window = max(1, math.floor(PLOT_WIDTH / MIN_PX_PER_M / section_m + 1e-9)) * section_m
    if math.ceil(total / window - 1e-9) > MAX_STRIPS:
        window = math.ceil(total / MAX_STRIPS / section_m - 1e-9) * section_m
    count = math.ceil(total / window - 1e-9)
    return [(start + i * window, min(start + (i + 1) * window, end)) for i in range(count)]


def draw_map_strip(cracks: list[dict], chainage: tuple[float, float], arc: tuple[float, float],
                   severity: SeverityConfig, features: list[dict] | None = None) -> np.ndarray:
    """One map strip (BGR): the cracks between chainage[0] and chainage[1] m, arc[0] .. arc[1]
    mm upwards, each polyline in its width class's colour, with axes, grid and legend; the
    lining ``features`` (physical features' dicts) as boxes of their extent in FEATURE_RGB,
    beneath the cracks, with a legend entry of their own when there are any."""
    x0, x1 = chainage
    y0, y1 = arc
    height = MARGIN_TOP + PLOT_HEIGHT + MARGIN_BOTTOM
    image = np.full((height, MAP_WIDTH, 3), BACKGROUND_BGR, np.uint8)
    plot = np.full((PLOT_HEIGHT, PLOT_WIDTH, 3), BACKGROUND_BGR, np.uint8)

    def to_px(points: np.ndarray) -> np.ndarray:
        px = (points[:, 0] - x0) / (x1 - x0) * (PLOT_WIDTH - 1)
        py = (PLOT_HEIGHT - 1) - (points[:, 1] - y0) / (y1 - y0) * (PLOT_HEIGHT - 1)
        return np.clip(np.stack([px, py], axis=1), -1e5, 1e5).round().astype(np.int32)

    xticks, xdecimals = _ticks(x0, x1, 10)
    yticks, ydecimals = _ticks(y0, y1, 5)
    for x in xticks:
        px = int(to_px(np.array([[x, y0]]))[0, 0])
        cv2.line(plot, (px, 0), (px, PLOT_HEIGHT - 1), GRID_BGR, 1)
    for y in yticks:
        py = int(to_px(np.array([[x0, y]]))[0, 1])
        cv2.line(plot, (0, py), (PLOT_WIDTH - 1, py), GRID_BGR, 1)

    features = features or []
    for feature in features:
        if feature["chainage_end_m"] < x0 or feature["chainage_start_m"] > x1:
            continue
        corners = to_px(np.array([[feature["chainage_start_m"], feature["arc_start_mm"]],
                                  [feature["chainage_end_m"], feature["arc_end_mm"]]]))
        (left, bottom), (right, top) = (tuple(int(v) for v in corner) for corner in corners)
        cv2.rectangle(plot, (left, top), (right, bottom), _bgr(FEATURE_FILL_RGB), -1)
        cv2.rectangle(plot, (left, top), (right, bottom), _bgr(FEATURE_RGB), 1)

    colours = [_bgr(c) for c in class_colours(len(severity.names))]
    rank = {name: i for i, name in enumerate(severity.names)}
    shown = [c for c in cracks if c["chainage_end_m"] >= x0 and c["chainage_start_m"] <= x1]
    # narrow first, so the wider (more urgent) classes are drawn on top
    for crack in sorted(shown, key=lambda c: (c["width_max_mm"], c["number"])):
        klass = rank[severity.classify(crack["width_max_mm"])]
        line = crack.get("polyline") or [[crack["chainage_m"], crack["arc_mm"]]]
        points = to_px(np.asarray(line, np.float64).reshape(-1, 2))
        thickness = 2 + klass // 2
        if len(points) == 1:
            cv2.circle(plot, tuple(int(v) for v in points[0]), thickness, colours[klass], -1,
                       cv2.LINE_8)
        else:
            cv2.polylines(plot, [points], False, colours[klass], thickness, cv2.LINE_8)

    image[MARGIN_TOP:MARGIN_TOP + PLOT_HEIGHT, MARGIN_LEFT:MARGIN_LEFT + PLOT_WIDTH] = plot
    cv2.rectangle(image, (MARGIN_LEFT - 1, MARGIN_TOP - 1),
                  (MARGIN_LEFT + PLOT_WIDTH, MARGIN_TOP + PLOT_HEIGHT), AXIS_BGR, 1)
    bottom = MARGIN_TOP + PLOT_HEIGHT
    for x in xticks:
        px = MARGIN_LEFT + int(to_px(np.array([[x, y0]]))[0, 0])
        cv2.line(image, (px, bottom), (px, bottom + 5), AXIS_BGR, 1)
        _text(image, f"{x:.{xdecimals}f}", px, bottom + 20, "centre")
    for y in yticks:
        py = MARGIN_TOP + int(to_px(np.array([[x0, y]]))[0, 1])
        cv2.line(image, (MARGIN_LEFT - 6, py), (MARGIN_LEFT - 1, py), AXIS_BGR, 1)
        _text(image, f"{y:.{ydecimals}f}", MARGIN_LEFT - 9, py + 5, "right")
    _text(image, "chainage (m)", MARGIN_LEFT + PLOT_WIDTH, bottom + 38, "right")
    _text(image, "arc (mm)", 8, MARGIN_TOP - 10)

    # title and legend above the plot
    _text(image, f"chainage {x0:.{xdecimals}f} .. {x1:.{xdecimals}f} m", MARGIN_LEFT, 24,
          scale=0.55)
    x = MARGIN_LEFT + 330
    for name, rng, colour in zip(severity.names, _class_ranges(severity), colours, strict=True):
        cv2.rectangle(image, (x, 12), (x + 14, 26), colour, -1)
        label = f"{name} {rng}"
        _text(image, label, x + 20, 24)
        x += 20 + cv2.getTextSize(label, FONT, 0.45, 1)[0][0] + 24
    if features:
        cv2.rectangle(image, (x, 12), (x + 14, 26), _bgr(FEATURE_FILL_RGB), -1)
        cv2.rectangle(image, (x, 12), (x + 14, 26), _bgr(FEATURE_RGB), 1)
        _text(image, "lining feature (not a crack)", x + 20, 24)
    return image


def _arc_range(cracks: list[dict], features: list[dict]) -> tuple[float, float]:
    arcs = [p[1] for c in cracks for p in (c.get("polyline") or [[c["chainage_m"], c["arc_mm"]]])]
    arcs += [a for f in features for a in (f["arc_start_mm"], f["arc_end_mm"])]
    lo, hi = min(arcs), max(arcs)
    pad = max(0.05 * (hi - lo), 50.0)
    return lo - pad, hi + pad


def crop_image(mask: np.ndarray, colour_bgr: tuple[int, int, int]) -> np.ndarray:
    """A mask crop (0 / 255) as a BGR image, crack pixels in ``colour_bgr``, scaled by a whole
    factor (nearest neighbour) until its longer side has CROP_MIN_PX pixels, within
    CROP_MAX_PX (a larger crop is scaled down to CROP_MAX_PX)."""
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    h, w = mask.shape[:2]
    image = np.full((h, w, 3), CROP_BACKGROUND_BGR, np.uint8)
    image[mask > 0] = colour_bgr
    longer, shorter = max(h, w), min(h, w)
    if longer > CROP_MAX_PX:
        factor = CROP_MAX_PX / longer
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    scale = max(math.ceil(CROP_MIN_PX / longer), min(math.ceil(CROP_MIN_PX / shorter),
                                                     CROP_MAX_PX // longer))
    if scale > 1:
        image = cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    return image


# --- HTML --------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: middle; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
table.facts th { text-align: left; }
tfoot td { font-weight: bold; }
img.map { display: block; max-width: 100%; margin: 8px 0; }
img.crop { border: 1px solid #ccc; image-rendering: pixelated; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; }
.note { color: #666; }
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _num(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _date(iso: str | None) -> str:
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _swatch(rgb: tuple[int, int, int]) -> str:
    return f'<span class="swatch" style="background:{_hex(rgb)}"></span>'


def _row(cells: list[str], tag: str = "td", text_columns: tuple[int, ...] = ()) -> str:
    return "<tr>" + "".join(
        f'<{tag} class="text">{cell}</{tag}>' if i in text_columns else f"<{tag}>{cell}</{tag}>"
        for i, cell in enumerate(cells)) + "</tr>"


def _counts(counts: dict[str, int], colours: dict[str, tuple[int, int, int]]) -> str:
    return ", ".join(f"{_swatch(colours[name]) if name in colours else ''}{_e(name)} {n}"
                     for name, n in counts.items())


def _header(summary: dict, physical: list[dict], names: list[str],
            colours: dict[str, tuple[int, int, int]], features: list[dict]) -> list[str]:
    severities = dict.fromkeys(names, 0)
    types = dict.fromkeys(CRACK_TYPES, 0)
    for crack in physical:
        severities[crack["severity"]] = severities.get(crack["severity"], 0) + 1
        types[crack["type"]] = types.get(crack["type"], 0) + 1
    chainage = (f"{_num(summary['chainage_start_m'], 3)} .. "
                f"{_num(summary['chainage_end_m'], 3)} m")
    facts = [
        ("run", _e(summary["id"])), ("source", _e(summary["source"])),
        ("mode", _e(summary["mode"])), ("status", _e(summary["status"])),
        ("model", _e(summary["model"])),
        ("started", _e(_date(summary["started_at"]))), ("ended", _e(_date(summary["ended_at"]))),
        ("frames", _e(summary["frames"])), ("chainage", _e(chainage)),
        ("detections", _e(summary["cracks"])), ("physical cracks", _e(len(physical))),
        ("per severity", _counts(severities, colours)), ("per type", _counts(types, {})),
        ("lining features", _counts(_kinds(features), {}) if features else "none"),
    ]
    return ['<table class="facts"><tbody>']\
        + [f'<tr><th>{name}</th><td class="text">{value}</td></tr>' for name, value in facts]\
        + ["</tbody></table>"]


def _sections_table(sections: list[dict], names: list[str]) -> list[str]:
    extra = sorted({n for s in sections for n in s["severity"]} - set(names))
    columns = names + extra
    head = ["chainage (m)", "cracks", "total length (m)", "max width (mm)"] + \
        [_e(n) for n in columns]
    out = ['<table class="sections"><thead>', _row(head, "th", (0,)), "</thead><tbody>"]
    for s in sections:
        out.append(_row([f"{s['start_m']:g} .. {s['end_m']:g}", str(s["cracks"]),
                         f"{s['length_m']:.2f}", _num(s["width_max_mm"], 2)]
                        + [str(s["severity"].get(n, 0)) for n in columns], text_columns=(0,)))
    widths = [s["width_max_mm"] for s in sections if s["width_max_mm"] is not None]
    out += ["</tbody><tfoot>",
            _row(["all", str(sum(s["cracks"] for s in sections)),
                  f"{sum(s['length_m'] for s in sections):.2f}",
                  _num(max(widths) if widths else None, 2)]
                 + [str(sum(s["severity"].get(n, 0) for s in sections)) for n in columns],
                 text_columns=(0,)),
            "</tfoot></table>"]
    return out


def _kinds(features: list[dict]) -> dict[str, int]:
    """Physical features per kind, kinds in alphabetical order."""
    return dict(sorted(Counter(feature["kind"] for feature in features).items()))


def _features_section(features: list[dict]) -> list[str]:
    """The "Lining features" section: counts per kind, ring joints, then every feature."""
    out = ["<h2>Lining features</h2>"]
    if not features:
        return out + ['<p class="empty-features">No lining features were found in this run '
                      "(only a multi-class model reports them).</p>"]
    out.append('<p class="note">Regions of the model\'s classes other than crack, merged across '
               "frames and cameras; not cracks, and never counted as cracks.</p>")
    out += ['<table class="feature-kinds"><thead>',
            _row(["kind", "features", "detections", "total length (m)", "total area (m²)"],
                 "th", (0,)), "</thead><tbody>"]
    for kind in _kinds(features):
        of_kind = [f for f in features if f["kind"] == kind]
        out.append(_row([_e(kind), str(len(of_kind)), str(sum(f["detections"] for f in of_kind)),
                         f"{sum(f['length_mm'] for f in of_kind) / 1000:.2f}",
                         f"{sum(f['area_mm2'] for f in of_kind) / 1e6:.3f}"], text_columns=(0,)))
    out.append("</tbody></table>")
    joints = ring_joints(features)
    if joints:
        spacing = ""
        if len(joints) > 1:
            gaps = np.diff(joints)
            spacing = f", median spacing {float(np.median(gaps)):.2f} m"
        out.append(f'<p class="ring-joints">{len(joints)} ring joint(s){spacing}.</p>')
    head = ["feature", "kind", "chainage (m)", "arc (mm)", "length (mm)", "area (mm²)",
            "detections", "cameras"]
    out += ['<table class="features"><thead>', _row(head, "th", (1, 7)), "</thead><tbody>"]
    for feature in features:
        out.append(_row([
            _e(feature["number"]), _e(feature["kind"]),
            f"{feature['chainage_start_m']:.3f} .. {feature['chainage_end_m']:.3f}",
            f"{feature['arc_start_mm']:.0f} .. {feature['arc_end_mm']:.0f}",
            f"{feature['length_mm']:.0f}", f"{feature['area_mm2']:.0f}",
            f"{_e(feature['detections'])} in {_e(feature['frames'])} frame(s)",
            _e(", ".join(feature["cameras"]))], text_columns=(1, 7)))
    return out + ["</tbody></table>"]


def _largest_table(session: Session, run_id: str, cracks: list[dict],
                   members: dict[int, list[dict]], severity: SeverityConfig) -> list[str]:
    colours = dict(zip(severity.names, class_colours(len(severity.names)), strict=True))
    head = ["rank", "crack", "chainage (m)", "arc (mm)", "length (mm)", "max width (mm)",
            "mean width (mm)", "type", "severity", "detections", "crop of its longest detection"]
    out = ['<table class="largest"><thead>', _row(head, "th", (7, 8, 10)), "</thead><tbody>"]
    for rank, crack in enumerate(cracks, start=1):
        colour = colours[severity.classify(crack["width_max_mm"])]
        crop = '<span class="note">no crop stored</span>'
        detections = members.get(crack["number"], [])
        if detections:
            longest = min(detections, key=lambda d: (-d["length_mm"], d["camera"], d["seq"],
                                                     d["index"]))
            mask = crack_mask(session, run_id, longest["camera"], longest["seq"],
                              longest["index"])
            if mask is not None and mask.size:
                image = crop_image(mask, _bgr(colour))
                where = (f"camera {longest['camera']}, frame {longest['seq']}, "
                         f"detection {longest['index']}")
                crop = (f'<img class="crop" src="{_png_uri(image)}" width="{image.shape[1]}" '
                        f'height="{image.shape[0]}" alt="{_e("mask crop: " + where)}">'
                        f'<br><span class="note">{_e(where)}</span>')
        out.append(_row([
            str(rank), _e(crack["number"]),
            f"{crack['chainage_m']:.3f} ({crack['chainage_start_m']:.3f} .. "
            f"{crack['chainage_end_m']:.3f})",
            f"{crack['arc_mm']:.0f}", f"{crack['length_mm']:.0f}",
            f"{crack['width_max_mm']:.2f}", f"{crack['width_mean_mm']:.2f}", _e(crack["type"]),
            _swatch(colour) + _e(crack["severity"]),
            f"{_e(crack['detections'])} in {_e(crack['frames'])} frame(s)", crop],
            text_columns=(7, 8, 10)))
    return out + ["</tbody></table>"]


def build_report(session: Session, run_id: str, out: Path, section_m: float = 10.0,
                 largest: int = 10) -> dict[str, Any]:
    """Write the HTML report of run ``run_id`` to ``out``; returns {run, path, cracks (physical),
    detections, sections, strips (map images), largest (cracks listed)}.

    A LookupError when there is no such run; a ValueError for a bad ``section_m`` or
    ``largest``."""
    if not (isinstance(section_m, (int, float)) and math.isfinite(section_m) and section_m > 0):
        raise QueryError(f"section length must be a number of metres > 0, got {section_m!r}")
    if isinstance(largest, bool) or not isinstance(largest, int) or largest < 0:
        raise QueryError(f"the number of largest cracks must be an integer >= 0, got {largest!r}")
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    summary = run_summary(session, run_id)
    severity = _severity(run.config)
    names = list(severity.names)
    colours = dict(zip(names, class_colours(len(names)), strict=True))
    physical, members = _cracks_of_run(session, run)
    features = query_features(session, run=run_id)  # never mixed into the crack figures
    frames_range = None
    if summary["chainage_start_m"] is not None:
        frames_range = (summary["chainage_start_m"], summary["chainage_end_m"])
    sections = section_stats(physical, section_m, frames_range, names)
    top = largest_cracks(physical, largest)

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>crackscan report: run {_e(run_id)}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Crack inspection report: run {_e(run_id)}</h1>"]
    parts += _header(summary, physical, names, colours, features)
    strips = 0
    if not physical:
        parts.append('<p class="empty">No cracks were found in this run.</p>')
    if physical or features:
        lo = min([c["chainage_start_m"] for c in physical + features]
                 + ([frames_range[0]] if frames_range else []))
        hi = max([c["chainage_end_m"] for c in physical + features]
                 + ([frames_range[1]] if frames_range else []))
        windows = _strips(lo, hi, section_m)
        arc = _arc_range(physical, features)
        note = ("x: chainage (m) along the tunnel; y: ring arc (mm), growing upwards; each "
                "physical crack drawn along its polyline in the colour of its width class "
                "(maximum width)")
        if features:
            note += "; lining features (not cracks) as violet boxes of their extent, beneath"
        parts += ["<h2>Crack map</h2>", f'<p class="note">{_e(note)}.</p>']
        for window in windows:
            image = draw_map_strip(physical, window, arc, severity, features)
            parts.append(f'<img class="map" src="{_png_uri(image)}" width="{image.shape[1]}" '
                         f'height="{image.shape[0]}" '
                         f'alt="crack map, chainage {window[0]:g} to {window[1]:g} m">')
        strips = len(windows)
    if sections:
        parts += [f"<h2>Per section of {section_m:g} m</h2>",
                  '<p class="note">A crack counts in the section of its centroid.</p>']
        parts += _sections_table(sections, names)
    if top:
        parts += [f"<h2>The {len(top)} largest cracks</h2>",
                  '<p class="note">By length, ties by maximum width.</p>']
        parts += _largest_table(session, run_id, top, members, severity)
    parts += _features_section(features)
    parts += [f'<p class="note">Written by crackscan on {_e(_date(_now_iso()))}.</p>',
              "</body></html>", ""]
    out = Path(out)
    out.write_text("\n".join(parts), encoding="utf-8")
    return {"run": run_id, "path": str(out), "cracks": len(physical),
            "detections": summary["cracks"], "sections": len(sections), "strips": strips,
            "largest": len(top)}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()
