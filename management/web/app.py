"""The crack records web application (``crackscan serve``): a JSON API over management's store and
the pages that use it -- tunnels and their inspections, the lining map of a run, a crack's
evidence and history, two inspections compared, an inspector's review, exports.

The web layer writes no SQL: every read and write is a function of :mod:`management.store`,
:mod:`management.inspections` or :mod:`management.report`. Bad input is a 4xx JSON error naming
the parameter; a database that fails is a 503 JSON error; nothing answers with a stack trace.

Access: with no tokens (the server binds to 127.0.0.1) everything is open. With tokens
(``--token-file``), every request but ``/healthz`` needs one, as ``Authorization: Bearer T``, as
the ``crackscan_token`` cookie, or once as ``?token=T`` on a page (which sets the cookie and
drops it from the address); a read token reads, a review token also stores verdicts.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from crackscan.errors import UserError
from crackscan.wire import CRACK_TYPES
from management.db import describe_error, session_factory
from management.errors import CrackNotFound, QueryError, RunNotFound
from management.formats import render
from management.inspections import compare_inspections, crack_history
from management.models import REJECT_REASONS, VERDICTS
from management.report import build_report, severity_classes
from management.store import (
    VERDICT_FILTERS,
    add_review,
    crack_detections,
    crack_reviews,
    detection_evidence,
    list_runs,
    parse_chainage,
    physical_crack,
    query_features,
    query_physical,
    run_config,
    run_extent,
    run_severity_counts,
    viewport_cracks,
    viewport_density,
    viewport_features,
)
from management.store import run_summary as stored_run  # the route below is run_summary

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
PAGES = HERE / "pages"
STATIC = HERE / "static"
TOKEN_COOKIE = "crackscan_token"
# run ids, camera ids: what acquisition writes (letters, digits, - _ . : @), never a path
IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$"
def _one_of(choices: tuple[str, ...]) -> str:
    return "^(" + "|".join(choices) + ")$"


# the map's filters, shared by the viewport and the exports
RunId = Annotated[str, Query(pattern=IDENTIFIER, description="a run id")]
MinWidth = Annotated[float | None, Query(ge=0, description="maximum width at least (mm)")]
MinLength = Annotated[float | None, Query(ge=0, description="length at least (mm)")]
CrackType = Annotated[str | None, Query(pattern=_one_of(CRACK_TYPES))]
Severity = Annotated[str | None, Query(max_length=40, description="a severity class name")]
Verdict = Annotated[str | None, Query(pattern=_one_of(VERDICT_FILTERS),
                                      description="default: all but rejected")]
MAP_LIMIT = 2000  # cracks a map viewport draws; more are shown as density cells
OVERLAY_BGR = (40, 40, 230)  # the detection's mask drawn over its photo


class Tokens:
    """The tokens a server accepts: ``read`` ones read, ``review`` ones also store verdicts."""

    def __init__(self, read: set[str] | None = None, review: set[str] | None = None) -> None:
        self.read = set(read or ())
        self.review = set(review or ())

    @property
    def required(self) -> bool:
        return bool(self.read or self.review)

    @staticmethod
    def _among(token: str, tokens: set[str]) -> bool:
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens)

    def role(self, token: str | None) -> str | None:
        """"review", "read" or None (no valid token)."""
        if not token:
            return None
        if self._among(token, self.review):
            return "review"
        if self._among(token, self.read):
            return "read"
        return None


def read_token_file(path: Path) -> Tokens:
    """Tokens from a file of ``read TOKEN`` / ``review TOKEN`` lines (``#`` comments); a bad
    file is a UserError naming the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the token file {path}: {exc}") from None
    tokens = Tokens()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("read", "review") or len(parts[1]) < 16:
            raise UserError(f"{path}:{number}: expected 'read TOKEN' or 'review TOKEN' with a "
                            "token of at least 16 characters")
        (tokens.review if parts[0] == "review" else tokens.read).add(parts[1])
    if not tokens.required:
        raise UserError(f"{path} holds no token: add a line 'read TOKEN' or 'review TOKEN'")
    return tokens


class ReviewIn(BaseModel):
    """An inspector's verdict on a physical crack, as the review form posts it."""

    model_config = ConfigDict(extra="forbid")
    verdict: str = Field(description=f"one of {', '.join(VERDICTS)}")
    reason: str | None = Field(None, description=f"for a rejection: {', '.join(REJECT_REASONS)}")
    note: str = Field("", max_length=2000)
    reviewer: str = Field(min_length=1, max_length=100)


class Metrics:
    """Request counters and latencies of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("crackscan_web_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.errors = Counter("crackscan_web_errors", "requests answered with a 5xx error",
                              ["route"], registry=self.registry)
        self.latency = Histogram("crackscan_web_request_seconds", "time to answer a request",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _range(text: str | None, name: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        return parse_chainage(text)
    except QueryError as exc:
        raise QueryError(str(exc).replace("chainage range", f"{name} range")) from None


def _finite(name: str, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise QueryError(f"{name} must be a finite number, got {value!r}")
    return value


def _evidence_png(evidence: dict[str, Any], overlay: bool) -> bytes | None:
    """The detection's photo with its mask drawn over it (PNG); None without a photo."""
    if evidence["photo_jpeg"] is None:
        return None
    photo = cv2.imdecode(np.frombuffer(evidence["photo_jpeg"], np.uint8), cv2.IMREAD_COLOR)
    if photo is None:
        return None
    mask = (None if not overlay or evidence["mask_png"] is None else
            cv2.imdecode(np.frombuffer(evidence["mask_png"], np.uint8), cv2.IMREAD_GRAYSCALE))
    if mask is not None:
        px, py, pw, ph = evidence["photo_box_px"]
        bx, by, bw, bh = evidence["bbox_px"]
        full = np.zeros((ph, pw), np.uint8)  # the mask in photo-box pixels, then scaled
        x0, y0 = bx - px, by - py
        crop = mask[:max(0, min(bh, ph - y0)), :max(0, min(bw, pw - x0))]
        if x0 >= 0 and y0 >= 0 and crop.size:
            full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        scaled = cv2.resize(full, (photo.shape[1], photo.shape[0]),
                            interpolation=cv2.INTER_NEAREST) > 127
        tint = photo.copy()
        tint[scaled] = OVERLAY_BGR
        photo = cv2.addWeighted(photo, 0.45, tint, 0.55, 0)
        contours, _ = cv2.findContours(scaled.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(photo, contours, -1, OVERLAY_BGR, 1)
    ok, png = cv2.imencode(".png", photo)
    return png.tobytes() if ok else None


def create_app(engine: Engine, tokens: Tokens | None = None) -> FastAPI:
    """The application on ``engine`` (migrated; :func:`management.db.make_engine`)."""
    tokens = tokens or Tokens()
    sessions = session_factory(engine)
    metrics = Metrics()
    app = FastAPI(title="crackscan", version="1",
                  description="Crack records of tunnel inspections: runs, physical cracks, "
                              "their evidence, comparisons and inspectors' reviews. Lengths and "
                              "widths in mm, chainage in m, arc (round the ring) in mm.")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- errors: one JSON line, never a trace -------------------------------------------------
    @app.exception_handler(RunNotFound)
    @app.exception_handler(CrackNotFound)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(UserError)
    async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}"
                             for e in exc.errors()[:5])
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("database error on %s: %s", request.url.path, describe_error(exc))
        return _error(503, f"the database failed: {describe_error(exc)}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal error (logged by the server)")

    # --- access and metrics --------------------------------------------------------------------
    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable) -> Response:
        started = time.perf_counter()
        route = "other"
        try:
            response = await _answer(request, call_next)
        except Exception:  # an error outside the handlers: still JSON, still counted
            log.exception("internal error on %s", request.url.path)
            response = _error(500, "internal error (logged by the server)")
        found = request.scope.get("route")
        if found is not None:
            route = getattr(found, "path", "other")
        elif request.url.path.startswith("/static/"):
            route = "/static"
        metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        if response.status_code >= 500:
            metrics.errors.labels(route).inc()
        return response

    async def _answer(request: Request, call_next: Callable) -> Response:
        if tokens.required and request.url.path != "/healthz":
            given = request.query_params.get("token")
            if given is not None and request.method == "GET":
                if tokens.role(given) is None:
                    return _error(401, "invalid token")
                # once in the address, then a cookie: the token does not linger in the URL
                url = request.url.remove_query_params("token")
                response = RedirectResponse(url.path + (f"?{url.query}" if url.query else ""),
                                            status_code=303)
                response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
                return response
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else \
                request.cookies.get(TOKEN_COOKIE)
            role = tokens.role(token)
            if role is None:
                return _error(401, "this server needs a token: Authorization: Bearer TOKEN, "
                                   "or open a page with ?token=TOKEN")
            if request.method not in ("GET", "HEAD") and role != "review":
                return _error(403, "this token reads only: reviewing needs a review token")
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """The server answers and its database too."""
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def prometheus() -> Response:
        """Requests, latencies and errors in the Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- pages ---------------------------------------------------------------------------------
    def page(name: str) -> FileResponse:
        return FileResponse(PAGES / name, media_type="text/html")

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return page("index.html")

    @app.get("/runs/{run_id}", include_in_schema=False)
    def map_page(run_id: str) -> FileResponse:
        return page("map.html")

    @app.get("/runs/{run_id}/cracks/{number}", include_in_schema=False)
    def crack_page(run_id: str, number: int) -> FileResponse:
        return page("crack.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/compare", include_in_schema=False)
    def compare_page() -> FileResponse:
        return page("compare.html")

    # --- API: runs and tunnels -----------------------------------------------------------------
    def _run(session: Any, run_id: str) -> dict[str, Any]:
        found = stored_run(session, run_id)
        if found is None:
            raise RunNotFound(f"no run {run_id!r} in the database")
        return found

    @app.get("/api/tunnels", tags=["runs"])
    def tunnels() -> list[dict[str, Any]]:
        """Each tunnel with its inspections (runs without a tunnel under ``null``), each run
        with its physical cracks per severity (rejected ones left out)."""
        with sessions() as session:
            runs = list_runs(session)
            counts = run_severity_counts(session, [run["id"] for run in runs])
            for run in runs:
                run["severity_classes"] = severity_classes(run_config(session, run["id"]))
        grouped: dict[str | None, list[dict[str, Any]]] = {}
        for run in runs:
            run["physical_by_severity"] = counts[run["id"]]
            grouped.setdefault(run["tunnel"], []).append(run)
        return [{"tunnel": name, "runs": items} for name, items in
                sorted(grouped.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]

    @app.get("/api/runs", tags=["runs"])
    def runs() -> list[dict[str, Any]]:
        """Every run, oldest first, with its counters (as ``crackscan runs --format json``)."""
        with sessions() as session:
            return list_runs(session)

    @app.get("/api/runs/{run_id}", tags=["runs"])
    def run_summary(run_id: str) -> dict[str, Any]:
        """One run's summary, its physical cracks per severity, the extent of its cracks and
        lining features (for the map) and the severity classes of its configuration."""
        _check_id(run_id, "run id")
        with sessions() as session:
            run = _run(session, run_id)
            run["physical_by_severity"] = run_severity_counts(session, [run_id])[run_id]
            run["extent"] = run_extent(session, run_id)
            run["severity_classes"] = severity_classes(run_config(session, run_id))
        run["crack_types"] = list(CRACK_TYPES)
        run["verdicts"] = list(VERDICTS)
        run["reject_reasons"] = list(REJECT_REASONS)
        return run

    # --- API: the map --------------------------------------------------------------------------
    @app.get("/api/runs/{run_id}/cracks", tags=["map"])
    def map_cracks(run_id: str,
                   chainage: Annotated[str, Query(description="START:END in metres")],
                   arc: Annotated[str, Query(description="START:END in mm round the ring")],
                   min_width_mm: MinWidth = None, min_length_mm: MinLength = None,
                   type: CrackType = None, severity: Severity = None, verdict: Verdict = None,
                   limit: Annotated[int, Query(ge=1, le=20000)] = MAP_LIMIT,
                   cells_along: Annotated[int, Query(ge=1, le=2000)] = 200,
                   cells_across: Annotated[int, Query(ge=1, le=500)] = 50) -> Response:
        """The physical cracks whose extent meets the viewport, with their polylines; where
        more than ``limit`` do, their density instead (``density``: cells of the viewport with
        the count and widest crack of each), as the map draws them zoomed out."""
        _check_id(run_id, "run id")
        span, ring = _range(chainage, "chainage"), _range(arc, "arc")
        filters = dict(min_width_mm=_finite("min_width_mm", min_width_mm),
                       min_length_mm=_finite("min_length_mm", min_length_mm), crack_type=type,
                       severity=severity)
        with sessions() as session:
            found = viewport_cracks(session, run_id, span, ring, verdict=verdict, limit=limit,
                                    **filters)
            if found["cracks"] is None:
                found["density"] = viewport_density(session, run_id, span, ring,
                                                    (cells_along, cells_across), **filters)
        # plain JSON values already: written at once (the map asks for thousands of polylines)
        return Response(json.dumps(found, allow_nan=False), media_type="application/json")

    @app.get("/api/runs/{run_id}/features", tags=["map"])
    def map_features(run_id: str,
                     chainage: Annotated[str | None, Query(description="START:END (m)")] = None,
                     kind: Annotated[str | None, Query(max_length=32)] = None,
                     limit: Annotated[int, Query(ge=1, le=20000)] = 5000) -> list[dict[str, Any]]:
        """Physical lining features (joints, stains...; never cracks) of a run, numbered as
        ``crackscan query --features`` does; with ``chainage``, those of that window merged
        from its own detections (the map's layer, cheap on a long run; ``number`` null)."""
        _check_id(run_id, "run id")
        with sessions() as session:
            _run(session, run_id)
            window = _range(chainage, "chainage")
            if window is not None and kind is None:
                return viewport_features(session, run_id, window, limit=limit)
            return query_features(session, run=run_id, kind=kind, chainage=window, limit=limit)

    # --- API: a crack --------------------------------------------------------------------------
    @app.get("/api/runs/{run_id}/cracks/{number}", tags=["cracks"])
    def crack(run_id: str, number: int) -> dict[str, Any]:
        """One physical crack: its measurements and verdict, every review of it, its
        detections (each with whether a photo is kept) and its history over the inspections
        of its tunnel (``new`` / ``grown`` / ``unchanged`` as ``crackscan compare`` matches)."""
        _check_id(run_id, "run id")
        with sessions() as session:
            found = physical_crack(session, run_id, number)
            found["reviews"] = crack_reviews(session, run_id, number)
            found["detection_records"] = crack_detections(session, run_id, number)
            found["history"] = crack_history(session, run_id, number)
        return found

    @app.get("/api/runs/{run_id}/detections/{camera}/{seq}/{index}/photo", tags=["cracks"],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def detection_photo(run_id: str, camera: str, seq: int, index: int,
                        overlay: bool = True) -> Response:
        """The photo kept of one detection (PNG), with its mask drawn over it unless
        ``overlay=false``; 404 when the detection has no photo (stored before photos)."""
        _check_id(run_id, "run id")
        _check_id(camera, "camera id")
        with sessions() as session:
            evidence = detection_evidence(session, run_id, camera, seq, index)
        png = _evidence_png(evidence, overlay)
        if png is None:
            return _error(404, "no photo of this detection")
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/runs/{run_id}/detections/{camera}/{seq}/{index}/mask", tags=["cracks"],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def detection_mask(run_id: str, camera: str, seq: int, index: int) -> Response:
        """The mask crop of one detection (PNG, its bounding box)."""
        _check_id(run_id, "run id")
        _check_id(camera, "camera id")
        with sessions() as session:
            evidence = detection_evidence(session, run_id, camera, seq, index)
        if evidence["mask_png"] is None:
            return _error(404, "no mask kept of this detection")
        return Response(evidence["mask_png"], media_type="image/png")

    @app.post("/api/runs/{run_id}/cracks/{number}/review", tags=["review"], status_code=201)
    def review(run_id: str, number: int, body: Annotated[ReviewIn, Body()]) -> dict[str, Any]:
        """Store an inspector's verdict (confirmed, rejected with a reason, site_visit) on a
        physical crack; the latest verdict counts, every one is kept."""
        _check_id(run_id, "run id")
        with sessions() as session:
            stored = add_review(session, run_id, number, body.verdict, body.reason, body.note,
                                body.reviewer)
            session.commit()
        return stored

    # --- API: compare and export ---------------------------------------------------------------
    @app.get("/api/compare", tags=["compare"])
    def compare(before: RunId, after: RunId,
                tolerance_mm: Annotated[float, Query(gt=0, le=10000)] = 50.0,
                align: Annotated[str | None, Query(pattern="^(joints|offset)$")] = None,
                offset_m: Annotated[float, Query(ge=-1e6, le=1e6)] = 0.0) -> dict[str, Any]:
        """Two inspections compared as ``crackscan compare --format json`` does."""
        with sessions() as session:
            return compare_inspections(session, before, after, tolerance_mm=tolerance_mm,
                                       align=align, offset_m=offset_m)

    @app.get("/api/runs/{run_id}/export", tags=["export"], response_class=Response)
    def export(run_id: str, format: Annotated[str, Query(pattern="^(csv|geojson|json)$")],
               chainage: str | None = None, min_width_mm: MinWidth = None,
               min_length_mm: MinLength = None, type: CrackType = None,
               severity: Severity = None, verdict: Verdict = None) -> Response:
        """The run's physical cracks under the map's filters as CSV, GeoJSON (tunnel
        coordinates) or JSON, as ``crackscan query`` writes them; rejected ones left out
        unless ``verdict`` asks for them."""
        _check_id(run_id, "run id")
        with sessions() as session:
            _run(session, run_id)
            records = query_physical(session, run=run_id,
                                     min_width_mm=_finite("min_width_mm", min_width_mm),
                                     min_length_mm=_finite("min_length_mm", min_length_mm),
                                     chainage=_range(chainage, "chainage"), crack_type=type,
                                     severity=severity, verdict=verdict)
        media = {"csv": "text/csv", "geojson": "application/geo+json",
                 "json": "application/json"}[format]
        name = f"{run_id}-cracks.{format}"
        return Response(render(records, format), media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/api/runs/{run_id}/report", tags=["export"], response_class=HTMLResponse)
    def report(run_id: str, section_m: Annotated[float, Query(gt=0, le=100000)] = 10.0,
               largest: Annotated[int, Query(ge=0, le=1000)] = 10) -> HTMLResponse:
        """The run's HTML report (as ``crackscan report``)."""
        _check_id(run_id, "run id")
        with tempfile.TemporaryDirectory() as folder, sessions() as session:
            out = Path(folder) / "report.html"
            build_report(session, run_id, out, section_m=section_m, largest=largest)
            return HTMLResponse(out.read_text(encoding="utf-8"))

    @app.get("/api/reviews", tags=["review"])
    def reviews(run: Annotated[str | None, Query(pattern=IDENTIFIER)] = None,
                verdict: Annotated[str, Query(pattern=_one_of(VERDICT_FILTERS))] = "any"
                ) -> list[dict[str, Any]]:
        """Reviewed physical cracks with their latest verdict (labels for training: each
        with its run, number, polyline and the frames that saw it)."""
        with sessions() as session:
            records = query_physical(session, run=run, verdict=verdict)
        return [r for r in records if r["verdict"] is not None]

    return app


def _check_id(value: str, name: str) -> None:
    if not re.match(IDENTIFIER, value):
        raise QueryError(f"bad {name} {value[:40]!r}: letters, digits and - _ . : @")
