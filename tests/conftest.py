"""Shared fixtures. ``db_url`` runs a test once on SQLite and once on Postgres."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_ENV = "CRACKSCAN_TEST_PG"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty database's SQLAlchemy URL: an SQLite file in tmp_path, or a freshly created
    Postgres database (dropped afterwards) on the server at $CRACKSCAN_TEST_PG (an SQLAlchemy
    URL of a database to connect to for CREATE DATABASE), by default 127.0.0.1:5432."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'crackscan.db'}"
        return
    from sqlalchemy import create_engine, make_url, text

    server = make_url(os.environ.get(PG_ENV) or PG_DEFAULT)
    where = f"{server.host}:{server.port or 5432}"
    try:
        admin = create_engine(server, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 5})
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # no driver, no server, bad credentials: all mean "skip"
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        pytest.skip(f"no Postgres at {where}: {reason}")
    name = f"crackscan_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
