"""Helpers that several test modules share: running ``crackscan`` as a user does, the hand-made
wire messages of stored runs, the HTML report parsed back, synthetic crack datasets, test videos
and the acquisition test consumer. Fixtures live in ``conftest.py``; test modules import these
with ``from support import ...`` (``tests/`` is on ``sys.path`` through pytest's ``pythonpath``
setting), never from one another.

torch is imported only inside the helpers that need it, so the runtime tests never load it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import zmq
from hypothesis import strategies as st

from acquisition.service import run_acquisition
from crackscan.config import PipelineConfig, SeverityConfig
from crackscan.wire import (
    HEARTBEAT_S,
    CrackRecord,
    CreditMessage,
    EndOfStreamMessage,
    FrameMessage,
    HeartbeatMessage,
    ResultMessage,
    RunStartMessage,
    StoredMessage,
    decode,
)
from management.report import MARGIN_LEFT, MARGIN_TOP, PLOT_HEIGHT, PLOT_WIDTH

if TYPE_CHECKING:
    from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# the binary crack model that ships beside the bundled lining model: tests of what a binary
# model's single crack map does (tiles, flips, the fused graph's one output plane) use it
BINARY_MODEL = ROOT / "inference" / "models" / "crackscan_mobilenet_aspp_binary.onnx"

# --- the command line ---------------------------------------------------------------------------


def crackscan(*args: object, check: bool = True, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    """``python -m crackscan ARGS`` as a user runs it, from the repository root, without the
    caller's ``CRACKSCAN_DB`` and with one OpenMP thread (several processes share a small CPU;
    the stages set their own thread counts). With ``check``, a nonzero exit fails the test with
    the end of the command's stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CRACKSCAN_DB", None)
    command = [str(arg) for arg in args]
    result = subprocess.run([sys.executable, "-m", "crackscan", *command], capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"crackscan {' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stderr[-3000:]}")
    return result


def crackscan_concurrently(*commands: Sequence[object], check: bool = True,
                           timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Several independent ``crackscan`` commands at once (each as :func:`crackscan` runs it);
    their results in the order given. Most of a short command is its start-up on one core, so
    on a machine with two cores two commands take about the time of one."""
    with ThreadPoolExecutor(len(commands)) as pool:
        running = [pool.submit(crackscan, *command, check=check, timeout=timeout)
                   for command in commands]
        return [future.result() for future in running]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` intra-op threads, then restore the previous setting. 64-px
    inputs gain nothing from more threads, and on a small shared CPU they lose a lot to them."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- training data ------------------------------------------------------------------------------

DARK, BRIGHT = 20, (180, 230)  # line and background grey levels of the synthetic images


def write_crack_dataset(root: Path, count: int = 6, size: int = 64, colour: bool = False,
                        seed: int = 0, test_count: int = 2) -> list[str]:
    """``root/images/<id>.png`` (noise with a dark 2-px line), ``root/masks/<id>.png`` (the line,
    255 on 0), ``train.txt`` (all but the last ``test_count`` ids) and ``test.txt``; returns the
    ids. ``colour`` draws independent noise per channel instead of grey."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    ids = [f"crack{i:02d}" for i in range(count)]
    for sample_id in ids:
        shape = (size, size, 3) if colour else (size, size)
        image = rng.integers(*BRIGHT, shape, dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        start = (0, int(rng.integers(size // 4, size // 2)))
        end = (size - 1, int(rng.integers(size // 2, 3 * size // 4)))
        cv2.line(image, start, end, (DARK, DARK, DARK), 2)
        cv2.line(mask, start, end, 255, 2)
        cv2.imwrite(str(root / "images" / f"{sample_id}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{sample_id}.png"), mask)
    (root / "train.txt").write_text("\n".join(ids[:-test_count]) + "\n")
    (root / "test.txt").write_text("\n".join(ids[-test_count:]) + "\n")
    return ids


def tiny_config(data: Path, out: Path, epochs: int) -> TrainConfig:
    """The smallest real training: 64-px crops, batches of two, a quarter held out."""
    from training.config import TrainConfig

    return TrainConfig(data=[data], out=out, epochs=epochs, crop=64, batch_size=2,
                       val_fraction=0.25, seed=0)


def cracked_wall_with_truth(height: int, width: int, seed: int = 0, lines: int = 14
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Noisy grey concrete with dark straight 'cracks' 2-3 px wide at random, so that many cross
    tile seams; and the cracks' mask (the same lines drawn without anti-aliasing)."""
    rng = np.random.default_rng(seed)
    grey = np.clip(rng.normal(140, 12, (height, width)), 0, 255).astype(np.uint8)
    image = cv2.cvtColor(cv2.GaussianBlur(grey, (3, 3), 0), cv2.COLOR_GRAY2BGR)
    truth = np.zeros((height, width), np.uint8)
    for _ in range(lines):
        start = tuple(int(v) for v in rng.integers((0, 0), (width, height)))
        end = tuple(int(v) for v in rng.integers((0, 0), (width, height)))
        shade = int(rng.integers(40, 70))
        thickness = int(rng.integers(2, 4))
        cv2.line(image, start, end, (shade, shade, shade), thickness, cv2.LINE_AA)
        cv2.line(truth, start, end, 1, thickness)
    return image, truth > 0


# --- stored runs: the wire messages of hand-made inspections -------------------------------------

T0 = 1_795_000_000.0  # unix seconds, 2026-11-18: the capture clock of the hand-made runs
MODEL = "mobilenet_aspp@3f2a9c01"
SEVERITY = SeverityConfig()


def crack_record(index: int, chainage_m: float, width_max_mm: float, length_mm: float,
                 crack_type: str = "longitudinal", span_m: tuple[float, float] | None = None,
                 arc_mm: float = 1500.0, *, bbox_px: tuple[int, int, int, int] | None = None,
                 polyline_px: tuple[tuple[float, float], ...] = (
                     (10.0, 25.0), (110.0, 27.5), (210.0, 26.0))) -> CrackRecord:
    """A detection at ``chainage_m`` (over ``span_m``, by default 10 cm around it) at 0.5 mm per
    pixel, its widths in the proportions the geometry measures and its severity classified."""
    start, end = span_m or (chainage_m - 0.05, chainage_m + 0.05)
    return CrackRecord(
        index=index, length_px=length_mm / 0.5, length_mm=length_mm,
        width_mean_mm=round(width_max_mm * 0.5, 4), width_max_mm=width_max_mm,
        width_p95_mm=round(width_max_mm * 0.875, 4), width_max_px=width_max_mm / 0.5,
        orientation_deg=7.5, type=crack_type, severity=SEVERITY.classify(width_max_mm),
        area_px=int(length_mm * 4), area_mm2=length_mm * width_max_mm * 0.5,
        bbox_px=bbox_px or (10 + index, 20, 200, 12), chainage_m=chainage_m,
        chainage_start_m=start, chainage_end_m=end, arc_mm=arc_mm, score_mean=0.8125,
        polyline_px=polyline_px,
        polyline=((start, arc_mm - 2.0), (chainage_m, arc_mm), (end, arc_mm + 1.5)))


def result_message(run_id: str, seq: int, cracks: tuple[CrackRecord, ...] = (),
                   camera: str = "cam0", chainage_m: float | None = None,
                   worker: str = "worker-0", *, model: str = MODEL, inference_ms: float = 12.5,
                   mask: np.ndarray | None = None) -> ResultMessage:
    """Frame ``seq`` of a run: captured at T0 + seq / 10 s, by default at chainage 100 + seq m,
    with an empty 48x32 mask unless given one."""
    return ResultMessage(
        run_id=run_id, camera_id=camera, seq=seq, capture_time=T0 + seq * 0.1,
        chainage_m=100.0 + seq if chainage_m is None else chainage_m, inference_ms=inference_ms,
        model=model, worker=worker, cracks=cracks,
        mask=np.zeros((32, 48), np.uint8) if mask is None else mask)


def run_start_message(run_id: str, started_at: float = T0, cameras: tuple[str, ...] = ("cam0",),
                      source: str = "drive.mp4", *, config: dict | None = None,
                      mode: str = "replay") -> RunStartMessage:
    """A run's start (a replay's by default); its config by default says only the camera's
    0.5 mm per pixel."""
    return RunStartMessage(run_id=run_id, source=source, mode=mode, started_at=started_at,
                           cameras=cameras,
                           config={"camera": {"mm_per_px_along": 0.5}} if config is None
                           else config)


def end_message(run_id: str, camera: str = "cam0", frames_sent: int = 3,
                reason: str = "end_of_source", *, frames_bad: int = 1) -> EndOfStreamMessage:
    """A camera's end of stream a minute after T0: every frame read was sent or bad."""
    return EndOfStreamMessage(run_id=run_id, camera_id=camera, ended_at=T0 + 60.0,
                              frames_read=frames_sent + frames_bad, frames_sent=frames_sent,
                              frames_dropped=0, frames_bad=frames_bad, reason=reason)


# --- the HTML report: parsed back, its images decoded ------------------------------------------

class Page(HTMLParser):
    """The report parsed: tags checked to nest and close; tables by class (rows of cell texts),
    images (attributes) and the text."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = attrs.get("class", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def facts(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self.tables["facts"]}


def decode_png(uri: str) -> np.ndarray:
    """An image embedded as a PNG data URI, decoded (BGR)."""
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    image = cv2.imdecode(np.frombuffer(base64.b64decode(uri[len(prefix):]), np.uint8),
                         cv2.IMREAD_COLOR)
    assert image is not None and image.size
    return image


def colours_in(image: np.ndarray) -> set[tuple[int, int, int]]:
    """The BGR colours of the image's pixels."""
    return {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}


def plot_area(strip: np.ndarray) -> np.ndarray:
    """A map strip's plot, without axes and legend."""
    return strip[MARGIN_TOP:MARGIN_TOP + PLOT_HEIGHT, MARGIN_LEFT:MARGIN_LEFT + PLOT_WIDTH]


# --- acquisition: test videos and a consumer in place of workers and management -----------------

def frame_image(index: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """A test frame (BGR, size = (width, height)) that shows its index as six bright/dark
    stripes, a code that survives lossy video codecs."""
    width, height = size
    image = np.full((height, width, 3), 40, np.uint8)
    for bit in range(6):
        if index >> bit & 1:
            image[:, bit * width // 6:(bit + 1) * width // 6] = 200
    return image


def index_of(image: np.ndarray) -> int:
    """The index a :func:`frame_image` shows (grey or BGR)."""
    width = image.shape[1]
    return sum(1 << bit for bit in range(6)
               if image[:, bit * width // 6 + 2:(bit + 1) * width // 6 - 2].mean() > 120)


def write_video(path: Path, count: int, size: tuple[int, int] = (64, 48), fps: float = 12.5,
                fourcc: str = "mp4v") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened()
    for index in range(count):
        writer.write(frame_image(index, size))
    writer.release()
    return path


# --- fuzzing the wire (hypothesis) ---------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


def replace_a_field(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    """A valid message's ``frames`` with one header field (or one field of its first crack
    record) replaced by any JSON value, or a field added."""
    header = json.loads(frames[0])
    name = data.draw(st.sampled_from(sorted(header) + ["extra"]))
    header[name] = data.draw(JSON_VALUES)
    if "cracks" in header and isinstance(header["cracks"], list) and header["cracks"]:
        if data.draw(st.booleans()):  # or one field of a crack record
            record = header["cracks"][0]
            if isinstance(record, dict):
                record[data.draw(st.sampled_from(sorted(record) + ["extra"]))] = data.draw(
                    JSON_VALUES)  # the cracks drawn above may hold an empty record
    return [json.dumps(header).encode(), *frames[1:]]


def flip_bytes(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    """A valid message's ``frames`` with a few bytes changed and one frame cut short."""
    parts = [bytearray(f) for f in frames]
    for _ in range(data.draw(st.integers(1, 8))):
        part = data.draw(st.integers(0, len(parts) - 1))
        if parts[part]:
            at = data.draw(st.integers(0, len(parts[part]) - 1))
            parts[part][at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(parts) - 1))
    parts[cut] = parts[cut][:data.draw(st.integers(0, len(parts[cut])))]
    return [bytes(f) for f in parts]


class Consumer:
    """A test's inference worker and management around one acquisition, on real sockets.

    The worker connects to the frame link as a worker does: it gives credit for ``capacity``
    frames, beats every HEARTBEAT_S, takes each frame (waiting ``delay_s``) and reports it done;
    with ``read_frames=False`` it gives credit and beats but takes nothing (a busy worker).
    Management binds the control link, keeps the run_start and end, and reports every frame the
    worker finished as stored. ``fail``: seq -> how many times the worker reports that frame
    failed before it does it; ``lose``: seq -> how many of its results management loses (no
    stored report: acquisition sends it again after ``acquisition.ack_timeout_s``)."""

    def __init__(self, tmp_path: Path, read_frames: bool = True, delay_s: float = 0.0,
                 capacity: int = 2, fail: dict[int, int] | None = None,
                 lose: dict[int, int] | None = None) -> None:
        self.frames_spec = f"push+bind:ipc://{tmp_path}/f"
        self.control_spec = f"push+connect:ipc://{tmp_path}/c"
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.bind(f"ipc://{tmp_path}/c")
        self.frames = self.context.socket(zmq.DEALER)
        self.frames.setsockopt(zmq.ROUTING_ID, b"test-worker")
        self.frames.setsockopt(zmq.RECONNECT_IVL, 10)
        self.frames.connect(f"ipc://{tmp_path}/f")
        self.read_frames, self.delay_s, self.capacity = read_frames, delay_s, capacity
        self.fail, self.lose = dict(fail or {}), dict(lose or {})
        self.start: RunStartMessage | None = None
        self.end: EndOfStreamMessage | None = None
        self.acquisition: bytes | None = None  # its peer on the control link
        self.received: list[FrameMessage] = []  # every frame message, re-sends included
        self.received_at: list[float] = []  # when each arrived, and when it was done (monotonic)
        self.done_at: list[float] = []
        self.stored: set[int] = set()  # seqs reported stored
        self.owed: list[StoredMessage] = []  # until the acquisition's peer is known
        self.received_before_end = -1
        self._send(CreditMessage("test-worker", capacity).to_frames())
        self.beat_at = 0.0

    def _send(self, frames: list[bytes]) -> None:
        self.frames.send_multipart(frames)

    def _take(self) -> None:
        message = FrameMessage.from_frames(self.frames.recv_multipart())
        self.received.append(message)
        self.received_at.append(time.monotonic())
        time.sleep(self.delay_s)
        self.done_at.append(time.monotonic())
        key = (message.camera_id, message.seq)
        if self.fail.get(message.seq, 0) > 0:
            self.fail[message.seq] -= 1
            self._send(CreditMessage("test-worker", self.capacity, 1, failed=(key,)).to_frames())
            return
        self._send(CreditMessage("test-worker", self.capacity, 1, done=(key,)).to_frames())
        if self.lose.get(message.seq, 0) > 0:
            self.lose[message.seq] -= 1
            return
        self.stored.add(message.seq)
        self.owed.append(StoredMessage(message.run_id, (key,)))
        self._report()

    def _report(self) -> None:
        while self.owed and self.acquisition is not None:
            self.control.send_multipart([self.acquisition, *self.owed.pop(0).to_frames()])

    def collect(self, timeout_s: float = 20.0) -> None:
        """Serve until the run's end arrives."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        if self.read_frames:
            poller.register(self.frames, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.end is not None:
                return
            if time.monotonic() - self.beat_at >= HEARTBEAT_S:
                self.beat_at = time.monotonic()
                self._send(HeartbeatMessage("test-worker", capacity=self.capacity).to_frames())
            events = dict(poller.poll(20))
            if self.control in events:
                peer, *frames = self.control.recv_multipart()
                message = decode(frames)
                self.acquisition = peer
                self._report()
                if isinstance(message, RunStartMessage):
                    # no order between the two sockets: a frame may overtake the run_start
                    assert self.start is None
                    self.start = message
                elif isinstance(message, EndOfStreamMessage):
                    self.end = message
                    self.received_before_end = len(self.received)
            if self.frames in events:
                self._take()
        raise AssertionError(f"the run did not finish in time: start {self.start}, end {self.end}, "
                             f"frames {[m.seq for m in self.received]}")

    def close(self) -> None:
        self.frames.close(linger=0)
        self.control.close(linger=0)
        self.context.term()


def run_in_thread(consumer: Consumer, source, mode: str, config: PipelineConfig,
                  stop: threading.Event | None = None, **kwargs) -> EndOfStreamMessage:
    stop = stop or threading.Event()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_acquisition, source, consumer.frames_spec,
                             consumer.control_spec, "run-1", mode, config, stop, **kwargs)
        try:
            consumer.collect()
        finally:
            stop.set()  # the consumer has all it waits for: end the drain (or a failed run)
        return future.result(timeout=10)


def lining_rule_model(path: Path) -> Path:
    """A real ONNX model shaped like an export with the classes background, crack and joint: a
    1x1 convolution over RGB in 0..1 (mean 0, std 1) that calls dark pixels crack and red ones
    joint, so a test draws exactly what the model will find."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.array([[0, 0, 0], [-10 / 3, -10 / 3, -10 / 3], [10, -10, 0]],
                      np.float32).reshape(3, 3, 1, 1)
    bias = np.array([0, 3, -3], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight", "bias"], ["logits"])], "lining_rule",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {
        "crackscan.model": "lining_rule", "crackscan.mean": "[0, 0, 0]",
        "crackscan.std": "[1, 1, 1]", "crackscan.size_multiple": "32",
        "crackscan.classes": json.dumps(["background", "crack", "joint"]),
        "crackscan.threshold": "0.5", "crackscan.input_color": "RGB"})
    onnx.save(model, str(path))
    return path
