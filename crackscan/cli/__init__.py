"""crackscan: real-time crack inspection for vehicle cameras: segment, measure and store cracks.

The ``crackscan`` command. Each command group has its module (``stages``: the pipeline and its
services; ``records``: the crack records; ``models``: training, scoring and building models);
this module assembles the parser and maps errors to exit statuses, in this one place:

- 0: success; 1: a run that did not store everything it read (``RunIncomplete``, or the
  command's own status);
- 2: a user error (``crackscan.errors.UserError``, a missing or unreadable file): one line on
  stderr, what failed and what to do;
- 3: an internal error (any other exception: a bug), one line unless ``--debug``;
- 130: interrupted (Ctrl-C or SIGTERM).

``--format json`` prints one JSON document on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from crackscan.cli import models, records, stages
from crackscan.cli.common import setup_logging, torch_module
from crackscan.errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    Interrupted,
    RunIncomplete,
    UserError,
    signals_interrupt,
)

log = logging.getLogger("crackscan")

# A file the user named that is not there or not readable is the user's to fix, like UserError.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crackscan", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (stages, records, models):
        group.add_commands(sub)
    return parser


def register_backends() -> None:
    """``--backend torch`` runs training checkpoints with training's PyTorch segmenter, imported
    only when a checkpoint is opened (the runtime path does not need torch)."""
    from inference.backends import register_backend

    def open_checkpoint(path, **options):
        return torch_module("training.torch_backend").TorchSegmenter(path, **options)

    register_backend("torch", open_checkpoint)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, stage=args.command if args.command in
                  ("acquire", "infer", "manage") else None)
    register_backends()
    received: list[int] = []
    try:
        with signals_interrupt() as received:
            if received:  # while crackscan.cli loaded, lost where it landed: run nothing
                raise Interrupted
            return args.func(args)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        if args.debug:
            raise
        if not received:  # after a stop signal, what failed is what the signal cut short
            return _report(exc)
    print("crackscan: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _report(exc: Exception) -> int:
    """One line for the error that ended a command; its exit status."""
    if isinstance(exc, RunIncomplete):
        print(f"crackscan: error: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if isinstance(exc, (UserError, *USER_OS_ERRORS)):
        print(f"crackscan: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    log.error("internal error, a bug in crackscan (run with --debug for the traceback): %s: %s",
              type(exc).__name__, exc)
    return EXIT_INTERNAL_ERROR
