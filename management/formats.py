"""Rendering of query answers (run summaries, crack or lining feature records, lists of plain
dicts) as text.

    table    aligned columns for a terminal, a readable subset of the fields
    csv      every scalar field (lists such as polylines are left out), one row per record
    json     one JSON document: the list of records, every field
    geojson  one GeoJSON FeatureCollection; each crack is a LineString of its ``polyline``, each
             lining feature a Polygon of its ``outline`` (the box of its extent)

GeoJSON coordinates here are tunnel coordinates, not geographic ones: x = chainage in metres
along the tunnel, y = ring arc in millimetres (the record's ``polyline``, [[chainage_m, arc_mm],
...]). The collection says so in its top-level ``properties`` and carries no ``crs``. A record
without a polyline of two or more points (a run summary, or a one-point crack) gets a Point or a
null geometry.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

FORMATS = ("table", "csv", "json", "geojson")

# The table shows the first of these lists whose key columns the records have, else all scalars.
TABLE_COLUMNS = (
    ["run", "kind", "number", "chainage_start_m", "chainage_end_m", "arc_start_mm", "arc_end_mm",
     "length_mm", "area_mm2", "orientation_deg", "detections", "frames", "cameras"],
    ["run", "camera", "seq", "index", "chainage_m", "arc_mm", "length_mm", "width_max_mm",
     "width_mean_mm", "orientation_deg", "type", "severity"],
    ["run", "number", "chainage_start_m", "chainage_end_m", "arc_mm", "length_mm", "width_max_mm",
     "width_mean_mm", "orientation_deg", "type", "severity", "detections", "frames"],
    ["id", "status", "mode", "source", "model", "frames", "frames_sent", "frames_dropped",
     "frames_bad", "cracks", "chainage_start_m", "chainage_end_m", "started_at"],
)
COORDINATES_NOTE = ("tunnel coordinates, not geographic: x = chainage_m (metres along the "
                    "tunnel), y = arc_mm (millimetres round the ring)")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _scalar_columns(records: list[dict[str, Any]]) -> list[str]:
    """Keys whose values are scalars in every record, in first-seen order."""
    order: dict[str, bool] = {}
    for record in records:
        for key, value in record.items():
            order[key] = order.get(key, True) and _is_scalar(value)
    return [key for key, scalar in order.items() if scalar]


def _table_columns(records: list[dict[str, Any]]) -> list[str]:
    present = set().union(*(record.keys() for record in records))
    for candidate in TABLE_COLUMNS:
        if candidate[0] in present and candidate[1] in present:
            return [column for column in candidate if column in present]
    return _scalar_columns(records)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _render_table(records: list[dict[str, Any]], columns: list[str]) -> str:
    if not records:
        return "(no records)\n"
    rows = [[_cell(record.get(column)) for column in columns] for record in records]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    numeric = [all(isinstance(record.get(column), (int, float)) or record.get(column) is None
                   for record in records) for column in columns]

    def line(cells: list[str]) -> str:
        padded = (cell.rjust(width) if right else cell.ljust(width)
                  for cell, width, right in zip(cells, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), *(line(row) for row in rows)]) + "\n"


def _render_csv(records: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({column: _csv_value(record.get(column)) for column in columns})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else value


def _geometry(polyline: Any) -> dict[str, Any] | None:
    if not isinstance(polyline, list) or not polyline:
        return None
    points = [[float(x), float(y)] for x, y in polyline]
    if len(points) == 1:
        return {"type": "Point", "coordinates": points[0]}
    return {"type": "LineString", "coordinates": points}


def _outline(outline: Any) -> dict[str, Any] | None:
    if not isinstance(outline, list) or len(outline) < 4:
        return None
    return {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in outline]]}


def _render_geojson(records: list[dict[str, Any]], columns: list[str]) -> str:
    features = [{"type": "Feature",
                 "geometry": (_outline(record["outline"]) if "outline" in record
                              else _geometry(record.get("polyline"))),
                 "properties": {column: record.get(column) for column in columns}}
                for record in records]
    collection = {"type": "FeatureCollection", "name": "crackscan",
                  "properties": {"coordinates": COORDINATES_NOTE},
                  "features": features}
    return json.dumps(collection, indent=2, allow_nan=False) + "\n"


def render(records: list[dict[str, Any]], fmt: str, columns: list[str] | None = None) -> str:
    """``records`` as text in ``fmt`` (one of :data:`FORMATS`), ending in a newline.

    ``columns`` picks and orders the fields shown (table, csv, json, GeoJSON properties);
    by default the table shows a readable subset, csv and GeoJSON every scalar field and json
    every field."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    records = list(records)
    if fmt == "json":
        if columns is not None:
            records = [{column: record.get(column) for column in columns} for record in records]
        return json.dumps(records, indent=2, allow_nan=False) + "\n"
    if fmt == "table":
        return _render_table(records, columns or _table_columns(records))
    chosen = columns if columns is not None else _scalar_columns(records)
    if fmt == "csv":
        return _render_csv(records, chosen)
    return _render_geojson(records, chosen)
