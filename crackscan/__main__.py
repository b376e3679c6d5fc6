"""``crackscan`` and ``python -m crackscan``: the command line (:mod:`crackscan.cli`).

Ctrl-C and SIGTERM raise ``Interrupted`` from the first moment, so a signal that arrives while
the command's modules load (a second or more) ends it as interrupted (130) too, not by the
signal's default action."""

import sys

from crackscan.errors import EXIT_INTERRUPTED, Interrupted, signals_interrupt


def run() -> int:
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
