"""The errors of the management stage; all are ``crackscan.errors.UserError``: one line that says
what failed and what to do."""

from __future__ import annotations

from crackscan.errors import UserError


class DatabaseError(UserError, ValueError):
    """The database cannot be used; the message is one line: what failed and what to do."""


class QueryError(UserError, ValueError):
    """A query parameter that cannot be used; the message names it and what would work."""


class RunNotFound(UserError, LookupError):
    """No run of that id in the database."""


class ResumeRefused(UserError, ValueError):
    """A run that ``--resume`` cannot complete (another source, a live run, already complete);
    the message says why."""


class AlignmentError(UserError, ValueError):
    """Two runs cannot be aligned on their ring joints (too few, or they do not line up); the
    message says how many each run has and that a constant offset is the fallback."""


class CrackNotFound(UserError, LookupError):
    """No physical crack of that number in that run (or no detection of that key)."""
