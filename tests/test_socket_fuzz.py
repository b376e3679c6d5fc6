"""Fuzzed messages over real sockets against running ``crackscan manage`` and ``crackscan infer``
processes (this test is their acquisition): every message is counted or stored and survived,
and afterwards a valid run still goes through both."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support import flip_bytes, frame_image, replace_a_field

from crackscan.sockets import SocketSpec
from crackscan.wire import (
    CreditMessage,
    EndOfStreamMessage,
    FrameMessage,
    HeartbeatMessage,
    RunStartMessage,
    StoredMessage,
    decode,
)

pytestmark = pytest.mark.slow

SEEDS = [RunStartMessage("fuzz", "s", "replay", 1.0, ("cam0",), {}).to_frames(),
         FrameMessage("fuzz", "cam0", 3, 1.0, 2.0, np.full((12, 16, 3), 90, np.uint8),
                      "png").to_frames(),
         EndOfStreamMessage("fuzz", "cam0", 1.0, 5, 5, 0, 0).to_frames(),
         CreditMessage("w", 2, 1, (("cam0", 3),)).to_frames(),
         HeartbeatMessage("acquisition", "fuzz").to_frames(),
         StoredMessage("fuzz", (("cam0", 3),)).to_frames()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("fuzz")
    frames, results = f"ipc://{folder}/frames", f"ipc://{folder}/results"
    db_file = folder / "x.db"
    ports = SimpleNamespace(manage=free_port(), infer=free_port())
    command = [sys.executable, "-m", "crackscan"]
    with (folder / "manage.txt").open("w") as log_m, (folder / "infer.txt").open("w") as log_i:
        manage = subprocess.Popen(command + ["manage", "--results", f"pull+bind:{results}",
                                             "--db", f"sqlite:///{db_file}", "--metrics",
                                             f"127.0.0.1:{ports.manage}"], stderr=log_m)
        infer = subprocess.Popen(command + ["infer", "--frames", f"pull+connect:{frames}",
                                            "--results", f"push+connect:{results}",
                                            "--threads", "1", "--metrics",
                                            f"127.0.0.1:{ports.infer}"], stderr=log_i)
    context = zmq.Context()
    acquisition = context.socket(zmq.ROUTER)  # the frame link's binding side
    acquisition.bind(frames)
    control = SocketSpec.parse(f"push+connect:{results}").open(context)
    found = SimpleNamespace(manage=manage, infer=infer, acquisition=acquisition,
                            control=control, ports=ports, db_file=db_file, folder=folder,
                            worker=None)
    found.worker = take_credit(found, timeout_s=120).worker.encode()  # its introduction
    yield found
    for process in (manage, infer):
        process.terminate()
        process.wait(10)
    acquisition.close(linger=0)
    control.close(linger=0)
    context.term()


def take_credit(stages: SimpleNamespace, timeout_s: float = 30) -> CreditMessage:
    """The worker's next credit (heartbeats skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name in ("manage", "infer"):  # a stage that died fails the test at once
            assert getattr(stages, name).poll() is None, \
                (stages.folder / f"{name}.txt").read_text()[-2000:]
        if stages.acquisition.poll(100):
            _, *frames = stages.acquisition.recv_multipart()
            message = decode(frames)
            if isinstance(message, CreditMessage):
                return message
    errors = (stages.folder / "infer.txt").read_text()[-2000:]
    raise AssertionError(f"no credit from the worker within {timeout_s}s:\n{errors}")


# no shrinking: each example costs real sockets and processes, and a failure says what it sent
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_fuzzed_messages_are_counted_and_both_stages_keep_serving(stages, data):
    for _ in range(12):
        # every message type, to both: a valid credit, heartbeat or stored report arriving at
        # management once made it exit
        seed = data.draw(st.sampled_from(SEEDS))
        how = data.draw(st.sampled_from(["bytes", "field", "flip"]))
        frames = (data.draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
                  if how == "bytes" else replace_a_field(seed, data) if how == "field"
                  else flip_bytes(seed, data))
        stages.control.send_multipart(frames)
        stages.acquisition.send_multipart([stages.worker, *frames])
        assert take_credit(stages).consumed == 1  # it took the message and is ready again
    assert stages.manage.poll() is None and stages.infer.poll() is None


def test_after_the_fuzz_both_stages_count_it_and_a_valid_run_goes_through(stages):
    manage, infer = scrape(stages.ports.manage), scrape(stages.ports.infer)
    assert manage[("crackscan_management_messages_total", (("type", "malformed"),))] > 0
    assert infer[("crackscan_inference_frames_total", (("outcome", "malformed"),))] > 0
    stages.control.send_multipart(RunStartMessage("valid", "test", "replay", time.time(),
                                                  ("cam0",), {}).to_frames())
    for seq in range(3):
        stages.acquisition.send_multipart([stages.worker, *FrameMessage(
            "valid", "cam0", seq, time.time(), seq * 0.1, frame_image(seq, (64, 48)),
            "raw").to_frames()])
        assert take_credit(stages).done == (("cam0", seq),)
    stages.control.send_multipart(EndOfStreamMessage("valid", "cam0", time.time(), 3, 3, 0,
                                                     0).to_frames())
    deadline = time.monotonic() + 30
    status = None
    while status != "complete" and time.monotonic() < deadline:
        time.sleep(0.2)
        with sqlite3.connect(stages.db_file, timeout=5) as connection:
            row = connection.execute("select status from runs where id = 'valid'").fetchone()
        status = row[0] if row else None
    assert status == "complete", Path(stages.folder / "manage.txt").read_text()[-2000:]
