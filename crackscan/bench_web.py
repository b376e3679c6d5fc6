"""``crackscan bench --web``: how fast the crack records web application answers the lining map
of a long tunnel (a load check, not a test).

A run of ``cracks`` physical cracks spread over ``length_m`` of tunnel (random positions round a
ring of ``ring_mm``, lengths 50 mm to 2 m, widths log-normal) is written to the database through
the store (a throw-away SQLite file unless ``--db`` names one: then a run ``bench-web-...`` is
added to it), ``create_app`` is served by uvicorn in this process, and the map's own requests
are timed over HTTP: viewports of the whole tunnel, 1 km, 100 m, 10 m and 1 m at random places
(the larger ones answered as density cells, as the map asks), ``queries`` of each. Where
Playwright and Chromium are installed, the map page's first paint (navigation to the first view
drawn) is timed too.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from crackscan.config import SeverityConfig
from crackscan.wire import RunStartMessage

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
VIEWPORTS_M = (None, 1000.0, 100.0, 10.0, 1.0)  # None: the whole tunnel


def synthetic_cracks(count: int, length_m: float, ring_mm: float, seed: int = 0
                     ) -> list[dict[str, Any]]:
    """``count`` physical cracks of a tunnel, as :func:`management.store.import_physical_cracks`
    takes them: polylines of 6 points, random orientation, lengths 50-2000 mm."""
    rng = np.random.default_rng(seed)
    severity = SeverityConfig()
    cracks = []
    for _ in range(count):
        length = float(rng.uniform(50, 2000))
        angle = float(rng.uniform(0, math.pi))
        centre = (float(rng.uniform(0, length_m)), float(rng.uniform(0, ring_mm)))
        steps = np.linspace(-0.5, 0.5, 6) * length
        wobble = rng.normal(0, length * 0.03, 6)
        points = [[round(centre[0] + (t * math.cos(angle) - w * math.sin(angle)) / 1000, 4),
                   round(centre[1] + t * math.sin(angle) + w * math.cos(angle), 2)]
                  for t, w in zip(steps, wobble, strict=True)]
        chainages, arcs = [p[0] for p in points], [p[1] for p in points]
        width = float(min(8.0, rng.lognormal(-0.7, 0.9)))
        degrees = math.degrees(angle)
        cracks.append({
            "chainage_m": centre[0], "chainage_start_m": min(chainages),
            "chainage_end_m": max(chainages), "arc_mm": centre[1], "arc_start_mm": min(arcs),
            "arc_end_mm": max(arcs), "length_mm": round(length, 1),
            "width_mean_mm": round(width * 0.6, 3), "width_max_mm": round(width, 3),
            "width_p95_mm": round(width * 0.9, 3), "orientation_deg": round(degrees, 1),
            "type": ("longitudinal" if min(degrees, 180 - degrees) < 30 else
                     "circumferential" if abs(degrees - 90) < 30 else "diagonal"),
            "severity": severity.classify(width), "detections": 1, "frames": 1,
            "cameras": ["cam0"], "seq_first": 0, "seq_last": 0, "polyline": points})
    return cracks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    return {"p50_ms": round(statistics.median(ordered), 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
                            1),
            "max_ms": round(ordered[-1], 1)}


def _first_paint(url: str, repeats: int) -> dict[str, Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"first_paint": "not measured: the playwright package is not installed"}
    if not Path(CHROMIUM).exists():
        return {"first_paint": f"not measured: no Chromium at {CHROMIUM}"}
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            started = time.perf_counter()
            page.goto(url)
            page.wait_for_function("document.querySelector('#status').dataset.ready",
                                   timeout=60000)
            times.append((time.perf_counter() - started) * 1000)
            page.close()
        browser.close()
    return {"first_paint": _percentiles(times)}


def run_web_bench(db_url: str | None, cracks: int = 100_000, length_m: float = 10_000.0,
                  ring_mm: float = 30_000.0, queries: int = 50, seed: int = 0,
                  paint_repeats: int = 3) -> dict[str, Any]:
    """Store the tunnel, serve it, time the map's requests; returns the numbers."""
    import uvicorn

    from management import store
    from management.db import make_engine, session_factory
    from management.web.app import create_app

    with tempfile.TemporaryDirectory() as folder:
        url = db_url or f"sqlite:///{Path(folder) / 'bench.db'}"
        engine = make_engine(url)
        run_id = f"bench-web-{time.strftime('%Y%m%d-%H%M%S')}"
        started = time.perf_counter()
        with session_factory(engine)() as session:
            store.start_run(session, RunStartMessage(
                run_id=run_id, source="bench", mode="replay", started_at=time.time(),
                cameras=("cam0",), config={"acquisition": {"tunnel": run_id}}))
            store.import_physical_cracks(session, run_id,
                                         synthetic_cracks(cracks, length_m, ring_mm, seed))
            store.finish_run(session, run_id, "complete")
            session.commit()
        write_s = time.perf_counter() - started
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        rng = np.random.default_rng(seed + 1)
        results: dict[str, Any] = {"database": engine.dialect.name, "cracks": cracks,
                                   "length_m": length_m, "write_s": round(write_s, 1)}
        every: list[float] = []
        try:
            for span in VIEWPORTS_M:
                if span is not None and span >= length_m:
                    continue  # a viewport as long as the tunnel is the whole tunnel
                times, drawn = [], []
                for _ in range(queries):
                    if span is None:
                        lo, hi, arc = 0.0, length_m, (0.0, ring_mm)
                    else:
                        lo = float(rng.uniform(0, length_m - span))
                        hi = lo + span
                        # the map's aspect: a 1280 x 700 px view spans 0.55 x the width in arc
                        height = min(ring_mm, span * 1000 * 0.55)
                        a0 = float(rng.uniform(0, ring_mm - height))
                        arc = (a0, a0 + height)
                    query = (f"chainage={lo:.3f}:{hi:.3f}&arc={arc[0]:.1f}:{arc[1]:.1f}"
                             "&cells_along=107&cells_across=58")
                    t0 = time.perf_counter()
                    body = urllib.request.urlopen(f"{base}/api/runs/{run_id}/cracks?{query}",
                                                  timeout=60).read()
                    times.append((time.perf_counter() - t0) * 1000)
                    answer = json.loads(body)
                    drawn.append(len(answer["cracks"]) if answer["cracks"] is not None else -1)
                every += times
                results[f"viewport_{'tunnel' if span is None else f'{span:g}m'}"] = {
                    **_percentiles(times),
                    "drawn_median": statistics.median(drawn) if min(drawn) >= 0 else "density"}
            results["viewport_all"] = _percentiles(every)
            results.update(_first_paint(f"{base}/runs/{run_id}", paint_repeats))
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            engine.dispose()
    return results
