"""Schema migrations: an empty database is created at HEAD on first use, a database from before
migrations is adopted, an older or newer schema is refused with one clear line, ``crackscan db``
upgrades and reports, and the migrated schema equals the models (the test that fails when a model
changes without a migration). Database tests run on SQLite and Postgres through ``db_url``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Engine, Float, MetaData, Table, inspect, text
from support import crackscan

from crackscan import cli
from crackscan.wire import RunStartMessage
from management import schema, store
from management.db import DatabaseError, make_engine, session_factory
from management.models import Base

LEGACY_RUN = "20250101-120000-0ld0"
NEW_RUN = "20261121-100000-new0"

NEXT_MIGRATION = '''"""A table of the test's own: a crackscan one migration ahead of this one."""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("next_build_marker", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("next_build_marker")
'''


@pytest.fixture
def raw_engine(db_url: str) -> Iterator[Engine]:
    """An engine on the empty database with no schema step, to build the database a test needs."""
    engine = make_engine(db_url, check_schema=False)
    yield engine
    engine.dispose()


def make_legacy_database(engine: Engine) -> None:
    """The database a crackscan from before migrations made: the BASELINE tables (its
    ``create_all``, which revision BASELINE reproduces exactly), no alembic_version, one run."""
    with engine.begin() as connection:
        command.upgrade(schema.alembic_config(connection), schema.BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))
        runs = Table("runs", MetaData(), autoload_with=connection)
        connection.execute(runs.insert(), {
            "id": LEGACY_RUN, "source": "old.mp4", "mode": "replay", "status": "complete",
            "started_at": datetime(2025, 1, 1, 12), "config": {}, "cameras": ["cam0"],
            "cameras_ended": {}, "frames_read": 3, "frames_sent": 3, "frames_dropped": 0,
            "frames_bad": 0, "frames_duplicate": 0, "frames_malformed": 0})


# --- the migrations themselves -----------------------------------------------------------------

def test_head_is_the_newest_migration():
    assert ScriptDirectory(str(schema.MIGRATIONS)).get_heads() == [schema.HEAD]


def test_migrated_schema_equals_the_models(db_url):
    """The guard of the rule "every model change comes with a migration"."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            # The comparison does see a model changed without a migration.
            changed = MetaData()
            for table in Base.metadata.tables.values():
                table.to_metadata(changed)
            changed.tables["cracks"].append_column(Column("depth_mm", Float))
            assert [diff[0] for diff in compare_metadata(context, changed)] == ["add_column"]
    finally:
        engine.dispose()


def test_baseline_columns_are_those_the_first_migration_creates(raw_engine):
    make_legacy_database(raw_engine)
    inspector = inspect(raw_engine)
    assert {name: {column["name"] for column in inspector.get_columns(name)}
            for name in schema.BASELINE_COLUMNS} == schema.BASELINE_COLUMNS


# --- first use ---------------------------------------------------------------------------------

def test_empty_database_is_created_at_head_on_first_use(db_url):
    engine = make_engine(db_url)
    try:
        assert schema.current_revision(engine) == schema.HEAD
        assert {"runs", "frames", "cracks", "alembic_version"} <= set(
            inspect(engine).get_table_names())
    finally:
        engine.dispose()
    make_engine(db_url).dispose()  # a second open finds it at HEAD and changes nothing


def test_other_tables_alone_do_not_stop_first_use(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = make_engine(url, check_schema=False)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
    engine.dispose()
    engine = make_engine(url)
    try:
        assert schema.current_revision(engine) == schema.HEAD
        assert "notes" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_database_from_before_migrations_is_adopted_and_works(db_url, raw_engine):
    make_legacy_database(raw_engine)
    assert schema.current_revision(raw_engine) is None
    if schema.HEAD == schema.BASELINE:
        schema.ensure_schema(raw_engine)
    else:  # adopted as BASELINE, which is older than this crackscan
        with pytest.raises(DatabaseError, match="crackscan db upgrade"):
            schema.ensure_schema(raw_engine)
        assert schema.current_revision(raw_engine) == schema.BASELINE
        schema.upgrade(raw_engine)
    assert schema.current_revision(raw_engine) == schema.HEAD
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            assert [run["id"] for run in store.list_runs(session)] == [LEGACY_RUN]
            store.start_run(session, RunStartMessage(
                run_id=NEW_RUN, source="new.mp4", mode="replay",
                started_at=datetime.now(timezone.utc).timestamp(), cameras=("cam0",), config={}))
            session.commit()
            assert {run["id"] for run in store.list_runs(session)} == {LEGACY_RUN, NEW_RUN}
    finally:
        engine.dispose()


def test_tables_of_something_else_without_revision_are_refused(db_url, raw_engine):
    with raw_engine.begin() as connection:
        connection.execute(text("CREATE TABLE runs (id VARCHAR PRIMARY KEY, colour VARCHAR)"))
    with pytest.raises(DatabaseError, match="not those of schema 0001") as caught:
        make_engine(db_url)
    message = str(caught.value)
    assert "runs has unknown colour" in message and "no table frames" in message
    assert "\n" not in message
    assert schema.current_revision(raw_engine) is None  # nothing stamped, nothing created
    assert set(inspect(raw_engine).get_table_names()) == {"runs"}


def test_schema_newer_than_this_crackscan_is_refused(db_url, raw_engine):
    schema.upgrade(raw_engine)
    with raw_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    for attempt in (lambda: make_engine(db_url), lambda: schema.upgrade(raw_engine)):
        with pytest.raises(DatabaseError, match="older than the database") as caught:
            attempt()
        assert "schema f00d" in str(caught.value) and "\n" not in str(caught.value)


# --- an older schema and crackscan db ----------------------------------------------------------

@pytest.fixture
def next_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """This crackscan as a build one migration ahead (the shipped migrations plus one more), so
    a database at the shipped HEAD is older than it. Returns (shipped HEAD, new HEAD)."""
    shipped = schema.HEAD
    ahead = f"{int(shipped) + 1:04d}"
    migrations = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / f"{ahead}_next.py").write_text(
        NEXT_MIGRATION.format(revision=ahead, down=shipped))
    monkeypatch.setattr(schema, "MIGRATIONS", migrations)
    monkeypatch.setattr(schema, "HEAD", ahead)
    return shipped, ahead


def db_command(*args: str) -> int:
    """``crackscan db ...`` in this process, so it sees the monkeypatched build."""
    parsed = cli.build_parser().parse_args(["db", *args])
    return parsed.func(parsed)


def test_older_schema_is_refused_until_crackscan_db_upgrade(db_url, raw_engine, next_build,
                                                            capsys):
    shipped, ahead = next_build
    schema.upgrade(raw_engine, shipped)
    with pytest.raises(DatabaseError) as caught:
        make_engine(db_url)
    assert str(caught.value) == (
        f"database {raw_engine.url.render_as_string(hide_password=True)} has schema {shipped}, "
        f"this crackscan needs {ahead}: run `crackscan db upgrade --db URL` (back it up first)")
    assert db_command("current", "--db", db_url) == 0
    assert capsys.readouterr().out == f"{shipped}\n"
    assert db_command("upgrade", "--db", db_url) == 0
    assert capsys.readouterr().out.endswith(f": schema {ahead} (was {shipped})\n")
    make_engine(db_url).dispose()  # at HEAD now
    assert "next_build_marker" in inspect(raw_engine).get_table_names()


def test_crackscan_db_command_upgrades_and_reports(db_url, raw_engine):
    make_legacy_database(raw_engine)
    upgraded = crackscan("db", "upgrade", "--db", db_url, check=False)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.endswith(f": schema {schema.HEAD} (was none)\n")
    current = crackscan("db", "current", "--db", db_url, check=False)
    assert (current.returncode, current.stdout) == (0, f"{schema.HEAD}\n")


def test_detections_stored_at_0001_survive_the_upgrade_and_merge(db_url, raw_engine):
    """A 0001 database with frames and per-frame cracks (written as crackscan 0001 wrote them),
    upgraded to HEAD: every record is kept, new columns take their defaults, and the run's
    detections merge into physical cracks."""
    with raw_engine.begin() as connection:
        command.upgrade(schema.alembic_config(connection), "0001")
        tables = MetaData()
        tables.reflect(connection)
        connection.execute(tables.tables["runs"].insert(), {
            "id": LEGACY_RUN, "source": "old.mp4", "mode": "replay", "status": "complete",
            "started_at": datetime(2025, 1, 1, 12), "config": {}, "cameras": ["cam0"],
            "cameras_ended": {}, "frames_read": 2, "frames_sent": 2, "frames_dropped": 0,
            "frames_bad": 0, "frames_duplicate": 0, "frames_malformed": 0})
        for seq in (0, 1):  # one crack seen by two overlapping frames
            frame_id = connection.execute(tables.tables["frames"].insert().values(
                run_id=LEGACY_RUN, camera_id="cam0", seq=seq, capture_time=datetime(2025, 1, 1),
                chainage_m=10.0 + 0.1 * seq, width=640, height=360, inference_ms=50.0,
                worker="w", crack_count=1, stored_at=datetime(2025, 1, 1))).inserted_primary_key[0]
            start = 10.0 + 0.1 * seq
            connection.execute(tables.tables["cracks"].insert(), {
                "frame_id": frame_id, "run_id": LEGACY_RUN, "camera_id": "cam0", "seq": seq,
                "index": 0, "length_px": 300.0, "length_mm": 150.0, "width_mean_mm": 1.0,
                "width_max_mm": 1.5 + seq, "width_p95_mm": 1.4, "width_max_px": 3.0,
                "orientation_deg": 0.0, "type": "longitudinal", "severity": "medium",
                "area_px": 600, "area_mm2": 150.0, "bbox_px": [0, 0, 300, 4],
                "chainage_m": start + 0.075, "chainage_start_m": start,
                "chainage_end_m": start + 0.15, "arc_mm": 500.0, "score_mean": 0.9,
                "polyline_px": [[0, 2], [300, 2]],
                "polyline": [[start, 500.0], [start + 0.15, 500.0]]})
    schema.upgrade(raw_engine)
    assert schema.current_revision(raw_engine) == schema.HEAD
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            (run,) = store.list_runs(session)
            assert (run["cracks"], run["physical_cracks"], run["database_retries"],
                    run["tunnel"]) == (2, 0, 0, None)
            detections = store.query_cracks(session, run=LEGACY_RUN)
            assert [d["physical"] for d in detections] == [None, None]
            assert store.crack_mask(session, LEGACY_RUN, "cam0", 0, 0) is None  # no crop then
            assert store.merge_run(session, LEGACY_RUN) == 1
            session.commit()
            (crack,) = store.query_physical(session, run=LEGACY_RUN)
            assert crack["merged"] and crack["detections"] == 2 and crack["width_max_mm"] == 2.5
            assert crack["length_mm"] == pytest.approx(250.0, abs=1.0)
    finally:
        engine.dispose()


OPEN_AT = """
import sys, time
from management.db import make_engine
from management.schema import upgrade
start_at, url, how = float(sys.argv[1]), sys.argv[2], sys.argv[3]
time.sleep(max(0.0, start_at - time.time()))  # every process past its imports, then at once
engine = make_engine(url) if how == "first-use" else make_engine(url, check_schema=False)
if how == "upgrade":
    upgrade(engine)
engine.dispose()
"""


def open_at_once(url: str, hows: list[str]) -> list[subprocess.CompletedProcess]:
    """Processes that open one database at the same instant: on first use (make_engine) or with
    ``crackscan db upgrade``'s migration."""
    start_at = time.time() + 4.0
    with ThreadPoolExecutor(len(hows)) as pool:
        return list(pool.map(lambda how: subprocess.run(
            [sys.executable, "-c", OPEN_AT, str(start_at), url, how], capture_output=True,
            text=True, timeout=120, cwd=Path(__file__).parents[1]), hows))


def test_processes_creating_one_new_database_at_once_create_it_once(db_url, tmp_path):
    """Two first runs at once on a new database (and an upgrade beside them): one migrates, the
    others wait for its lock and find the schema there. SQLite three times in a row."""
    urls = ([db_url] if db_url.startswith("postgresql") else
            [f"sqlite:///{tmp_path / f'new{i}.db'}" for i in range(3)])
    for url in urls:
        done = open_at_once(url, ["first-use", "first-use", "upgrade"])
        assert [d.returncode for d in done] == [0, 0, 0], [d.stderr[-500:] for d in done]
        engine = make_engine(url)
        try:
            assert schema.current_revision(engine) == schema.HEAD
            with engine.connect() as connection:
                assert connection.execute(text("SELECT count(*) FROM alembic_version")
                                          ).scalar() == 1
        finally:
            engine.dispose()
