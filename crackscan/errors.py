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

import contextlib
import signal
import threading
from collections.abc import Iterator

# Exit status of every command (docs/cli.md).
EXIT_OK = 0
EXIT_INCOMPLETE = 1  # a run that did not store everything it read
EXIT_USER_ERROR = 2  # bad input, flag, config, missing file or database
EXIT_INTERNAL_ERROR = 3  # a bug: an exception that is not a UserError
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, as crackscan's own handler raises it (:func:`signals_interrupt`):
    every ``except KeyboardInterrupt`` catches it, and the CLI exits 130.

    Why not the builtin KeyboardInterrupt: CPython before gh-128130 (3.11 here) marks a
    KeyboardInterrupt of that exact type that passes through ``exec``/``eval`` of a string (how
    dataclasses, namedtuple and SQLAlchemy build functions while modules load) as unhandled,
    even once it is caught, and the interpreter then ends by SIGINT instead of with the
    command's status. A subclass is never marked."""


class _Interrupter:
    """The handler :func:`signals_interrupt` installs: notes the signal, raises Interrupted."""

    def __init__(self, received: list[int]) -> None:
        self.received = received

    def __call__(self, signum, frame):  # noqa: ARG001 - signal handler signature
        self.received.append(signum)
        raise Interrupted


@contextlib.contextmanager
def signals_interrupt() -> Iterator[list[int]]:
    """Inside: Ctrl-C and SIGTERM (what a service manager sends) raise :class:`Interrupted`,
    until a command installs its own handlers (the stages and ``run`` do); the previous handlers
    come back after. Yields the signal numbers received, in order, those of an enclosing
    ``signals_interrupt`` first: after one, whatever fails is what the signal cut short (a C
    extension's import fails with its own ImportError, the interrupt printed and lost), so the
    caller reports the command as interrupted.

    Signals are handled in the main thread only: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    interrupter = _Interrupter(signals_received())
    previous = {signum: signal.signal(signum, interrupter)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupter.received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signals_received() -> list[int]:
    """The stop signals received so far under the :func:`signals_interrupt` in force (none
    outside one). Not every one ended what it interrupted: an exception raised in Python code
    that C code called back (an ``isinstance`` against an ABC inside numpy, Cython's set-up of
    a module being imported) can be cleared there and lost. So a handler that takes over (the
    stages', ``run``'s) starts from these."""
    handler = signal.getsignal(signal.SIGTERM)
    return list(handler.received) if isinstance(handler, _Interrupter) else []


class CrackscanError(Exception):
    """The root of every exception crackscan raises on purpose."""


class UserError(CrackscanError):
    """A failure the user can fix; the CLI shows its message as one line and exits 2."""


class RunIncomplete(CrackscanError):
    """A run that ended without storing everything it read (a stage failed); exit status 1."""
