"""Database engines and sessions: the one place that turns a URL into a checked, ready engine.

``make_engine`` validates the URL, prepares SQLite (parent directory, WAL, foreign keys), proves
the database answers and checks its schema (:func:`management.schema.ensure_schema`: an empty
database gets the tables), so a bad URL, an unreachable server or a database of another crackscan
version fails at start-up with one clear line (:class:`DatabaseError`) instead of a traceback
mid-run. Nothing here runs at import time but the registration of an exit hook that
disposes the engines made here; engines are made by the caller and passed in.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import sqlalchemy.exc as sa_exc
from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from management.errors import DatabaseError

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///crackscan.db"
ENV_URL = "CRACKSCAN_DB"
CONNECT_TIMEOUT_S = 10  # a server that does not answer is reported, not waited on forever


def resolve_url(url: str | None) -> str:
    """``url`` when given, else ``$CRACKSCAN_DB`` when set and non-empty, else the default."""
    return url or os.environ.get(ENV_URL) or DEFAULT_URL


def describe_error(exc: BaseException) -> str:
    """A database exception as one line: the driver's own message, not SQLAlchemy's wrapper
    with the SQL statement and a link."""
    original = getattr(exc, "orig", None) or exc
    words = " ".join(str(original).split())
    return words or type(original).__name__


def _is_memory_sqlite(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _enable_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets readers (queries, the web page) run while management writes. It is stored in
        # the file, so a reader (create=False) leaves it to the writer that made the database.
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _enable_sqlite_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys=ON")


# Every engine made here, disposed at the process's exit: their pooled connections are closed
# (SQLite removes its -wal and -shm files as the last one closes) even where a command left its
# engine to the garbage collector, which the command line skips at exit (crackscan.__main__).
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _dispose_engines() -> None:
    for engine in list(_ENGINES):
        engine.dispose()


def make_engine(url: str, *, check_schema: bool = True, create: bool = True) -> Engine:
    """A ready engine for ``url`` whose database is at this crackscan's schema (an empty one is
    created). ``check_schema=False`` skips that step: for ``crackscan db``, which inspects and
    migrates the schema itself. ``create=False`` (the read commands): the database must exist
    and hold crackscan's tables; no file, folder or table is created.

    Raises :class:`DatabaseError` (one line) for a malformed URL, an unknown dialect or missing
    driver, an SQLite file that cannot be created or opened, a server that cannot be reached, or
    a schema this crackscan cannot use (older: the message names ``crackscan db upgrade``).
    """
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError) as exc:
        raise DatabaseError(f"bad database URL {url!r}: {describe_error(exc)}; expected e.g. "
                            f"{DEFAULT_URL} or postgresql+psycopg://user@host:5432/dbname"
                            ) from None
    shown = parsed.render_as_string(hide_password=True)
    options: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if _is_memory_sqlite(parsed):
            # One shared connection, or every thread would see its own empty database.
            options.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            path = Path(parsed.database).expanduser()
            if not create and not path.is_file():
                raise DatabaseError(f"database {shown} does not exist (a read command never "
                                    "creates one; `crackscan run` or `crackscan db upgrade` "
                                    "does)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"cannot create the directory for database {shown}: "
                                    f"{exc.strerror or exc} ({path.parent})") from None
    else:
        options["pool_pre_ping"] = True  # a long-running service outlives server restarts
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        engine = create_engine(parsed, **options)
    except sa_exc.NoSuchModuleError:
        raise DatabaseError(f"unsupported database URL {shown}: no SQLAlchemy dialect "
                            f"{parsed.drivername!r}; use sqlite:///FILE or "
                            "postgresql+psycopg://...") from None
    except ImportError as exc:
        raise DatabaseError(f"database URL {shown} needs the Python driver {exc.name or exc}, "
                            "which is not installed: install it, or for Postgres use "
                            "postgresql+psycopg://... (pip install 'crackscan[postgres]')"
                            ) from None
    except (sa_exc.ArgumentError, TypeError, ValueError) as exc:
        raise DatabaseError(f"bad database URL {shown}: {describe_error(exc)}") from None
    _ENGINES.add(engine)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect",
                     _enable_sqlite_pragmas if create else _enable_sqlite_foreign_keys)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        engine.dispose()
        hint = ("is the file a crackscan database and its directory writable?"
                if engine.dialect.name == "sqlite" else
                "is the server running, and are host, port, user and database name right?")
        raise DatabaseError(f"cannot connect to database {shown}: {describe_error(exc)} "
                            f"({hint})") from None
    if not create and check_schema and not inspect(engine).get_table_names():
        engine.dispose()
        raise DatabaseError(f"database {shown} holds no crackscan tables (a read command never "
                            "creates them; `crackscan run` or `crackscan db upgrade` does)")
    if not check_schema:
        return engine
    from management.schema import ensure_schema  # alembic, imported when an engine is made

    try:
        ensure_schema(engine)
    except DatabaseError:
        engine.dispose()
        raise
    except sa_exc.SQLAlchemyError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot create the crackscan tables in {shown}: {describe_error(exc)} "
                            "(does the user have CREATE rights there?)") from None
    _close_stale_runs(engine)
    return engine


def _close_stale_runs(engine: Engine) -> None:
    """Close the runs whose pipeline died (:func:`management.store.close_stale_runs`) whenever
    a command opens the database. A database that refuses (busy, read-only) keeps them for the
    next opening."""
    from management.store import close_stale_runs

    try:
        with session_factory(engine).begin() as session:
            close_stale_runs(session)
    except sa_exc.SQLAlchemyError as exc:
        log.info("could not close the runs left running: %s", describe_error(exc))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``. Objects stay readable after commit (no expiry), so a caller
    can report what it stored without another round trip."""
    return sessionmaker(engine, expire_on_commit=False)
