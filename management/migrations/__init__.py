"""Alembic migrations of the crackscan schema (run through :mod:`management.schema`).

``versions/`` holds one file per schema revision; every change to :mod:`management.models`
comes with one (``python -m management.migrations "what changed"`` writes its first draft).
"""
