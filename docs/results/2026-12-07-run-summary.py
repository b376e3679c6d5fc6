"""One run's summary in a database of many: ``list_runs`` then picking the run (what the end of
``crackscan run``, a report and the web application's run page did) against ``run_summary``
(counted through that run's rows). 200 runs of 1,000 frames each, written with bulk inserts;
five calls each, the median.

    .venv/bin/python docs/results/2026-12-07-run-summary.py [DATABASE_URL]

Without a URL: a new SQLite file. A Postgres URL must name an empty database.
"""

import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import insert

from management import store
from management.db import make_engine, session_factory
from management.models import Frame, Run

RUNS, FRAMES = 200, 1000


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{tempfile.mkdtemp()}/many.db"
    engine = make_engine(url)
    sessions = session_factory(engine)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with sessions.begin() as session:
        session.execute(insert(Run), [
            dict(id=f"run{r:04d}", source="x", mode="replay", status="complete", config={},
                 started_at=start + timedelta(hours=r), cameras=["cam0"], cameras_ended={})
            for r in range(RUNS)])
        for r in range(RUNS):
            session.execute(insert(Frame), [
                dict(run_id=f"run{r:04d}", camera_id="cam0", seq=seq, capture_time=start,
                     chainage_m=0.1 * seq, width=640, height=360, inference_ms=1.0,
                     worker="w", crack_count=0, stored_at=start)
                for seq in range(FRAMES)])
    last = f"run{RUNS - 1:04d}"
    ways = {"list_runs, then the one run":
            lambda session: next(r for r in store.list_runs(session) if r["id"] == last),
            "run_summary": lambda session: store.run_summary(session, last)}
    for name, way in ways.items():
        times = []
        for _ in range(5):
            with sessions() as session:
                started = time.perf_counter()
                way(session)
                times.append(time.perf_counter() - started)
        print(f"{engine.dialect.name}, {RUNS} runs x {FRAMES} frames: {name}: "
              f"median {1000 * sorted(times)[2]:.1f} ms")
    engine.dispose()


if __name__ == "__main__":
    main()
