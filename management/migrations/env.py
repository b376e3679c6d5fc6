"""Alembic's environment for crackscan: migrates the connection that :mod:`management.schema`
passes in ``config.attributes["connection"]``, inside the caller's transaction, so crackscan
migrates an engine it already has (URL checks, SQLite pragmas) and no alembic.ini is needed.

``render_as_batch`` makes autogenerate write ``batch_alter_table`` blocks, which SQLite needs for
most ALTERs (it copies the table) and other databases run as plain ALTER TABLE.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlalchemy import TypeDecorator

from management.models import Base

target_metadata = Base.metadata


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """A model's own column type (``UTCDateTime``) is written into a migration as the type it
    stores: a migration must not import the models, which keep changing after it was written."""
    if kind == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl_instance!r}"
    return False


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("crackscan migrations run through management.schema (crackscan db "
                           "upgrade), which passes the connection; there is no alembic.ini")
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True, render_item=render_item)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
