"""Prometheus metrics of the stages (prometheus-client), all named and documented here.

A stage started with ``--metrics HOST:PORT`` (``crackscan acquire / infer / manage``; ``crackscan
run --metrics HOST:PORT`` gives acquisition PORT, management PORT+1 and worker N PORT+2+N)
serves them at ``http://HOST:PORT/metrics``. Each stage is its own process with its own
registry; a metric a stage never touches stays at zero there. docs/metrics.md lists the names
with a sample Grafana panel list.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from crackscan.errors import UserError

log = logging.getLogger(__name__)

# --- acquisition --------------------------------------------------------------------------------
ACQUISITION_FRAMES = Counter(
    "crackscan_acquisition_frames", "Frames by camera and outcome: read from the source, sent to "
    "the workers, dropped (live: no free worker, read late, stopped), bad (unreadable)",
    ["camera", "outcome"])
DISPATCH_EVENTS = Counter(
    "crackscan_acquisition_dispatch", "Dispatch events: resent (a frame sent again: its worker "
    "died or failed it, or its result was lost), given_up (after 3 sends), worker_lost",
    ["event"])
FRAMES_IN_FLIGHT = Gauge("crackscan_acquisition_frames_in_flight",
                         "Frames sent and not yet reported stored by management")
WORKERS = Gauge("crackscan_acquisition_workers", "Inference workers heard from, alive")

# --- inference ----------------------------------------------------------------------------------
INFERENCE_FRAMES = Counter(
    "crackscan_inference_frames", "Frame messages by outcome: done (result sent), failed, "
    "malformed", ["outcome"])
INFERENCE_CRACKS = Counter("crackscan_inference_cracks", "Crack detections in the results sent")
INFERENCE_SECONDS = Histogram(
    "crackscan_inference_seconds", "Per frame: segmentation (its share of a batch) and "
    "measurement", buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

# --- management ---------------------------------------------------------------------------------
MANAGEMENT_MESSAGES = Counter("crackscan_management_messages",
                              "Messages received, by type (malformed: failed the wire checks)",
                              ["type"])
MANAGEMENT_RESULTS = Counter(
    "crackscan_management_results", "Results by outcome: stored, duplicate (stored before), "
    "rejected (refused by the database for their data)", ["outcome"])
DATABASE_RETRIES = Counter("crackscan_management_database_retries",
                           "Batches the database could not take and that wait for a retry")
PENDING_MESSAGES = Gauge("crackscan_management_pending_messages",
                         "Messages received and not yet committed")
CAPTURE_TO_STORED = Histogram(
    "crackscan_management_capture_to_stored_seconds", "Capture time to commit, per result "
    "committed (live: the pipeline's latency; replay of a recording: includes its age)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
RUNS_FINISHED = Counter("crackscan_management_runs_finished", "Runs finished, by status",
                        ["status"])


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of ``--metrics``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    return host, int(port)


def serve(address: str) -> int:
    """Serve this process's metrics over HTTP on ``address`` (HOST:PORT) from a daemon thread;
    returns the port."""
    host, port = parse_address(address)
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise UserError(f"--metrics {address}: cannot serve metrics there: {exc.strerror or exc}"
                        ) from None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port


def offset(address: str, by: int) -> str:
    """``address`` with its port moved ``by`` (``crackscan run`` numbers its stages' ports)."""
    host, port = parse_address(address)
    return f"{'[' + host + ']' if ':' in host else host}:{port + by}"
