"""Shared fixtures: ``db_url`` runs a test once on SQLite and once on Postgres; ``tiny_model`` is
the one small trained and exported model of the session; ``one_torch_thread`` keeps a module's
torch work on one thread. Plain helpers are in ``support.py``.

``make test`` runs the suite on two pytest-xdist workers (``--dist loadfile``): each worker
builds the session fixtures it needs once, and runs a test file whole, so a module fixture (a
trained model, a drive run through the pipeline, a browser) is built once. Tests share no
port, folder or database: free ports, ``tmp_path`` and a Postgres database each."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import crackscan, tiny_config, torch_threads, write_crack_dataset

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


@pytest.fixture
def engine(db_url: str):
    """An engine on ``db_url``'s database at the current schema, disposed afterwards."""
    from management.db import make_engine

    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine):
    """A session on ``engine``."""
    from management.db import session_factory

    with session_factory(engine)() as session:
        yield session


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``): see ``support.torch_threads``."""
    with torch_threads(1):
        yield


@dataclasses.dataclass(frozen=True)
class TinyModel:
    checkpoint: Path  # best.pt of the run
    model: Path  # its ONNX export
    data: Path  # the dataset it was trained on
    result: dict  # what training.loop.main returned


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    """One epoch of ``mobilenet_aspp`` on six 64-px colour crack images (``tiny_config``),
    exported with ``crackscan export``: for every test that needs *a* trained model and its ONNX
    file. Colour noise, so a red/blue mix-up anywhere between the data loader, the segmenter and
    the metrics changes the numbers. Tests of training itself train their own."""
    from training.loop import main as train_main

    root = tmp_path_factory.mktemp("tiny_model")
    data = root / "cracks"
    write_crack_dataset(data, colour=True)
    with torch_threads(1):  # set up before any module's one_torch_thread
        result = train_main(tiny_config(data, root / "run", epochs=1))
    model = root / "m.onnx"
    done = crackscan("export", "--checkpoint", root / "run" / "best.pt", "--out", model,
                     check=False)
    assert done.returncode == 0, done.stderr
    return TinyModel(root / "run" / "best.pt", model, data, result)
