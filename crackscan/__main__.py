"""``crackscan`` and ``python -m crackscan``: the command line (:mod:`crackscan.cli`).

Ctrl-C and SIGTERM raise ``Interrupted`` from the first moment, so a signal that arrives while
the command's modules load (a second or more) ends it as interrupted (130) too, not by the
signal's default action."""

import gc
import sys

from crackscan.errors import EXIT_INTERRUPTED, Interrupted, signals_interrupt


def run() -> int:
    status = _command()
    # What is left is freed by the process's exit, not by a last garbage collection of every
    # object the command's libraries made: 0.15-0.35 s of every command's end on a 2-core host
    # (a run's end waits for its stages' and its own). Files and sockets are closed by then, and
    # databases by management.db at exit.
    gc.freeze()
    return status


def _command() -> int:
    received: list[int] = []
    try:
        with signals_interrupt() as received:
            from crackscan.cli import main

            return main()
    except Exception:
        if not received:  # a failure of its own; else one the signal caused (an import cut short)
            raise
    except Interrupted:  # main handles its own: this one came while crackscan.cli loaded
        pass
    print("crackscan: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(run())
