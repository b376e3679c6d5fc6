"""One 384 x 352 tile (a 640 x 360 frame's fitted tile) through the fused graph of each model
(uint8 pixels in, crack probability out, as the pipeline runs it), the models taking turns:
8 rounds of 10 runs each, median ms per run, and how many times the last model's time each is.

    THREADS=2 .venv/bin/python docs/results/2026-12-06-int8-tile.py INT8_A.onnx INT8_B.onnx \
        FP32.onnx
"""

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference.fused import CRACK, PIXELS, fuse_io
from inference.onnxruntime_backend import load_onnx_model


def session(path: Path, threads: int) -> ort.InferenceSession:
    model, info = load_onnx_model(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(fuse_io(model, info).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    threads = int(os.environ.get("THREADS", "2"))
    sessions = [session(p, threads) for p in paths]
    pixels = np.random.default_rng(0).integers(0, 256, (1, 384, 352, 3), dtype=np.uint8)
    for s in sessions:
        for _ in range(5):
            s.run([CRACK], {PIXELS: pixels})
    times: dict[Path, list[float]] = {p: [] for p in paths}
    for _ in range(8):
        for path, s in zip(paths, sessions, strict=True):
            start = time.perf_counter()
            for _ in range(10):
                s.run([CRACK], {PIXELS: pixels})
            times[path].append((time.perf_counter() - start) / 10 * 1000)
    last = statistics.median(times[paths[-1]])
    for path in paths:
        median = statistics.median(times[path])
        print(f"{path}  {median:.2f} ms  x{last / median:.2f}")


if __name__ == "__main__":
    main()
