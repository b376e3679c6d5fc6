"""The version of the crackscan schema in a database, kept with the Alembic migrations that ship in
``management/migrations``.

crackscan only works on a database at the revision it was written for (:data:`HEAD`).
:func:`ensure_schema`, run by :func:`management.db.make_engine` on every engine it makes, brings
an empty database to HEAD (that is how a database is "created on first use"), adopts a database
made by a crackscan from before migrations (tables from ``create_all``, no ``alembic_version``)
as :data:`BASELINE`, and refuses any other one with a :class:`DatabaseError` that says what to do.
It never migrates a database that already holds data: that is :func:`upgrade`, run by
``crackscan db upgrade`` when the user asks, after backing the database up.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Before Alembic is imported: it logs a line per built-in plugin on import and two about itself
# for each database it looks at, noise on every crackscan command. What it runs ("Running
# upgrade ...") is still logged.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
logging.getLogger("alembic.runtime.migration").addFilter(
    lambda record: not str(record.msg).startswith(("Context impl", "Will assume")))

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from alembic.util import CommandError  # noqa: E402
from sqlalchemy import Connection, Engine, create_engine, inspect, text  # noqa: E402

from management.errors import DatabaseError  # noqa: E402

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD = "0005"  # the newest revision in MIGRATIONS/versions (a test keeps the two equal)
BASELINE = "0001"  # the schema that crackscan builds from before migrations created
VERSION_TABLE = "alembic_version"

# The columns each table had in those builds: a database without a revision is adopted as
# BASELINE only when its tables have exactly these (frozen; later revisions do not change them).
BASELINE_COLUMNS: dict[str, frozenset[str]] = {
    "runs": frozenset({
        "id", "source", "mode", "started_at", "ended_at", "status", "model", "config", "cameras",
        "cameras_ended", "frames_read", "frames_sent", "frames_dropped", "frames_bad",
        "frames_duplicate", "frames_malformed"}),
    "frames": frozenset({
        "id", "run_id", "camera_id", "seq", "capture_time", "chainage_m", "width", "height",
        "inference_ms", "worker", "crack_count", "stored_at"}),
    "cracks": frozenset({
        "id", "frame_id", "run_id", "camera_id", "seq", "index", "length_px", "length_mm",
        "width_mean_mm", "width_max_mm", "width_p95_mm", "width_max_px", "orientation_deg", "type",
        "severity", "area_px", "area_mm2", "bbox_px", "chainage_m", "chainage_start_m",
        "chainage_end_m", "arc_mm", "score_mean", "polyline_px", "polyline"}),
}


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the shipped migrations, built in code (there is no alembic.ini);
    ``connection`` is the one ``env.py`` migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    revisions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
    found = sorted(revisions)
    if len(found) > 1:
        raise DatabaseError(f"database has several schema revisions ({', '.join(found)}); "
                            "crackscan keeps one: it was not migrated by crackscan")
    return found[0] if found else None


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision; None for an empty database or one from before
    migrations."""
    with engine.connect() as connection:
        return _revision(connection)


def _known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}


def _adopt_legacy(connection: Connection, shown: str) -> str | None:
    """For a database without a revision: BASELINE after stamping it when its crackscan tables
    are those of BASELINE, None when it has none of them (empty), else DatabaseError."""
    inspector = inspect(connection)
    present = sorted(set(BASELINE_COLUMNS) & set(inspector.get_table_names()))
    if not present:
        return None
    problems = [f"no table {name}" for name in BASELINE_COLUMNS if name not in present]
    for name in present:
        columns = {column["name"] for column in inspector.get_columns(name)}
        missing, extra = BASELINE_COLUMNS[name] - columns, columns - BASELINE_COLUMNS[name]
        if missing:
            problems.append(f"{name} lacks {', '.join(sorted(missing))}")
        if extra:
            problems.append(f"{name} has unknown {', '.join(sorted(extra))}")
    if problems:
        raise DatabaseError(f"database {shown} has crackscan tables but no schema revision, and "
                            f"they are not those of schema {BASELINE} ({'; '.join(problems)}): "
                            "is it a crackscan database? use another database, or restore one")
    command.stamp(alembic_config(connection), BASELINE)
    log.info("database %s predates schema migrations; its tables are those of schema %s: "
             "stamped it so", shown, BASELINE)
    return BASELINE


def _refuse_unknown(revision: str, shown: str) -> None:
    if revision not in _known_revisions():
        raise DatabaseError(f"database {shown} has schema {revision}, which this crackscan "
                            f"(schema {HEAD}) does not know: this crackscan is older than the "
                            "database, which a newer crackscan migrated; use that one")


def ensure_schema(engine: Engine) -> None:
    """Make sure the database is at :data:`HEAD`: create the schema in an empty database, adopt a
    matching database from before migrations, else raise :class:`DatabaseError` (one line) for a
    database at an older revision (run ``crackscan db upgrade``) or an unknown, newer one.
    Processes that open one new database at once create its schema once: the first takes the
    migration lock (:func:`_lock_for_migration`), the others wait for it and find HEAD."""
    shown = _shown(engine)
    revision = current_revision(engine)  # no lock where there is nothing to create
    if revision is None:
        with engine.begin() as connection:
            _lock_for_migration(connection)
            revision = _revision(connection)
            if revision is None:
                revision = _adopt_legacy(connection, shown)
            if revision is None:
                command.upgrade(alembic_config(connection), HEAD)
                revision = HEAD
    if revision == HEAD:
        return
    _refuse_unknown(revision, shown)
    raise DatabaseError(f"database {shown} has schema {revision}, this crackscan needs {HEAD}: "
                        "run `crackscan db upgrade --db URL` (back it up first)")


MIGRATION_LOCK_KEY = 0x63726B73  # "crks": the Postgres advisory lock of crackscan's migrations


def _lock_for_migration(connection: Connection) -> None:
    """Hold the database's migration lock until the connection's transaction ends, so one
    process at a time reads the revision and migrates: SQLite's write lock (``BEGIN
    IMMEDIATE``; Python's sqlite3 would otherwise run the CREATE statements outside any
    transaction), Postgres's transaction-level advisory lock. Called first in a transaction."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                           {"key": MIGRATION_LOCK_KEY})


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the database to ``revision`` (default: the newest) in one transaction where the
    database has transactional DDL (Postgres); a database from before migrations is adopted
    first. Returns the revision it is at afterwards. Back the database up before calling this."""
    shown = _shown(engine)
    with engine.connect() as connection, _foreign_keys_off_on_sqlite(connection, shown):
        with connection.begin():
            _lock_for_migration(connection)
            current = _revision(connection)
            if current is None:
                _adopt_legacy(connection, shown)
            else:
                _refuse_unknown(current, shown)
            try:
                command.upgrade(alembic_config(connection), revision)
            except CommandError as exc:
                raise DatabaseError(f"cannot upgrade database {shown} to {revision}: {exc}"
                                    ) from None
    return current_revision(engine)


@contextmanager
def _foreign_keys_off_on_sqlite(connection: Connection, shown: str) -> Iterator[None]:
    """SQLite alters a table by copying it, dropping the old one and renaming the copy; with
    foreign keys on, dropping ``runs`` would cascade into every frame and crack. So they are off
    while migrating (SQLite ignores the pragma inside a transaction: set before it begins),
    checked afterwards, and on again."""
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()
    try:
        yield
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        connection.commit()
        if broken:
            raise DatabaseError(f"database {shown}: the upgrade left {len(broken)} rows whose "
                                "foreign keys point nowhere; restore the backup")
    finally:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()


def new_revision(message: str) -> Path:
    """Write the draft of the next migration: Alembic's autogenerate compares the models with a
    scratch SQLite database at the newest revision. Review the draft before committing it; a
    rename, for one, is drafted as a drop and an add."""
    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    rev_id = f"{int(head) + 1:04d}" if head else "0001"
    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{Path(scratch) / 'head.db'}")
        try:
            with engine.begin() as connection:
                config = alembic_config(connection)
                command.upgrade(config, "head")
                written = command.revision(config, message=message, autogenerate=True,
                                           rev_id=rev_id)
        finally:
            engine.dispose()
    scripts = written if isinstance(written, list) else [written]
    return Path(scripts[0].path)
