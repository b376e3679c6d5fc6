"""What every command group shares: logging, signals, JSON output, common flags, and the one
rule for opening a database that a command only reads."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable

from crackscan.errors import UserError, signals_received

log = logging.getLogger("crackscan")

__all__ = ["BACKENDS", "UserError", "add", "backend_flag", "db_flag", "keys_flag", "print_json",
           "print_summary", "read_database", "setup_logging", "source_flags", "stop_on_signals",
           "torch_module"]

# inference.backends.BACKENDS, written out so that parsing flags does not import the inference
# stage (OpenCV) for every command; tests/test_cli.py keeps the two equal.
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


def add(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
        help_text: str) -> argparse.ArgumentParser:
    """A subcommand ``name`` that runs ``func(args)``; ``func`` returns the exit status."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    return p


def db_flag(p):
    p.add_argument("--db", help="SQLAlchemy URL (default: $CRACKSCAN_DB or "
                                "sqlite:///crackscan.db)")


def source_flags(p):
    p.add_argument("--source", required=True,
                   help="video file, image folder, recording folder, camera:N, /dev/videoN, "
                        "rtsp://..., gst:PIPELINE, 'synthetic[:SECONDS]', or 'rig' (the "
                        "cameras of the --config file's rig)")
    p.add_argument("--record", metavar="DIR",
                   help="write every captured frame with its metadata to this new folder "
                        "(replay it later with --source DIR)")
    p.add_argument("--realtime", action="store_true",
                   help="replay at the recorded frame rate (default: as fast as possible)")
    p.add_argument("--metadata", metavar="CSV",
                   help="per-frame capture time / chainage of a video or image folder")
    p.add_argument("--odometer", metavar="CSV",
                   help="odometer log (time_s and distance_m or ticks): chainage from it")
    p.add_argument("--chainage-file", metavar="CSV",
                   help="chainage log (time_s, chainage_m): chainage from it")
    p.add_argument("--encoding", choices=["raw", "jpeg", "png"],
                   help="frames on the wire (default: config, raw)")
    p.add_argument("--tunnel", help="the tunnel or route inspected (default: config "
                   "acquisition.tunnel); query and compare runs by it")
    p.add_argument("--vehicle", help="the inspection vehicle (default: config "
                   "acquisition.vehicle)")


def backend_flag(p):
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: TensorRT when it and a GPU are there, else ONNX Runtime; torch: a "
                   "training checkpoint (.pt)")


def metrics_flag(p, what: str = "this stage's"):
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help=f"serve {what} Prometheus metrics at http://HOST:PORT/metrics "
                        "(docs/metrics.md)")


def keys_flag(p):
    p.add_argument("--keys", metavar="DIR", help="CURVE keys from `crackscan keys`: "
                   "authenticate and encrypt every link (needed to bind a non-loopback "
                   "interface)")


def read_database(url: str | None):
    """The engine of a database that a read command (runs, query, compare, report, db current)
    reads: it must exist already. A read command never creates a database or a folder; a missing
    SQLite file is a UserError."""
    from management.db import make_engine, resolve_url

    return make_engine(resolve_url(url), create=False)


def setup_logging(verbose: bool, stage: str | None = None) -> None:
    prefix = f"{stage} " if stage else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, force=True,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def stop_on_signals(again: threading.Event | None = None) -> threading.Event:
    """SIGTERM and SIGINT set the returned event: every stage's loop ends cleanly on it. A
    second signal sets ``again`` (acquisition: stop draining, exit now). Signals received while
    the stage started and lost there (``crackscan.errors.signals_received``) count as sent now.

    The handler runs in the main thread between two bytecodes, possibly while that thread is
    inside ``stop.wait()`` holding the event's lock; ``Event.set`` takes that lock, so the handler
    leaves the setting to a short-lived thread instead of deadlocking on it."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signum)
        if len(received) > 1 and again is not None:
            log.info("signal %d again: ending now", signum)
            target = again
        else:
            log.info("signal %d: stopping", signum)
            target = stop
        threading.Thread(target=target.set, name="stop-signal", daemon=True).start()

    earlier = signals_received()  # while the stage started, swallowed where they landed
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    for signum in earlier:
        handler(signum, None)
    return stop


def torch_module(name: str):
    """A training module that needs torch (the 'train' extra), imported on demand so the runtime
    path never needs torch installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"this command needs the 'train' extra ({exc.name} is missing): "
                        "pip install -e '.[train]'") from None


def print_json(document) -> None:
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_summary(summary: dict, fmt: str, width: int = 22) -> None:
    """A command's result: one JSON document (``--format json``), or one line per key."""
    if fmt == "json":
        print_json(summary)
        return
    for key, value in summary.items():
        print(f"{key:{width}s} {value}")
