"""The exception root of crackscan and the exit status of every command.

Every error a user can cause (a bad flag, file, config value, model, dataset or database) is a
:class:`UserError`; each stage subclasses it with its own name (``ConfigError``, ``ModelError``,
``SourceError``, ...). The CLI maps them to exit statuses in one place (``crackscan.cli``): a
``UserError`` is one line on stderr and exit 2; any other exception is a bug, reported as an
internal error with exit 3. A :class:`RunIncomplete` (a stage of a run failed) is one line and
exit 1. Errors a stage counts and survives (a malformed message on a socket,
``crackscan.wire.WireError``) are ``CrackscanError`` too, but never reach the CLI.

Stage errors keep ``ValueError`` (or ``RuntimeError``) as a second base where callers have always
caught them that way; what makes them user-facing is ``UserError``, not the builtin base.
"""

from __future__ import annotations

# Exit status of every command (docs/cli.md).
EXIT_OK = 0
EXIT_INCOMPLETE = 1  # a run that did not store everything it read
EXIT_USER_ERROR = 2  # bad input, flag, config, missing file or database
EXIT_INTERNAL_ERROR = 3  # a bug: an exception that is not a UserError
EXIT_INTERRUPTED = 130  # Ctrl-C


class CrackscanError(Exception):
    """The root of every exception crackscan raises on purpose."""


class UserError(CrackscanError):
    """A failure the user can fix; the CLI shows its message as one line and exits 2."""


class RunIncomplete(CrackscanError):
    """A run that ended without storing everything it read (a stage failed); exit status 1."""
