"""CPU time a frame of the pipeline's work around the model, in one process on the real
functions: the worker's measuring (``inference.worker.process_frames`` with the model's maps
computed beforehand and replayed, so only geometry, class regions and crack photos count) and
management's decoding and storing (``crackscan.wire.decode`` and
``management.store.store_results`` into SQLite, 8 results a transaction). CPU time
(``time.process_time``), not wall time: a host whose speed drifts moves it less.

    .venv/bin/python docs/results/2026-12-07-stage-cpu.py [MODEL.onnx] [--frames N]

Run it from two checkouts taking turns (``PYTHONPATH=CHECKOUT``) to compare them.
"""

import argparse
import tempfile
import time
from pathlib import Path

from crackscan.bench import as_video, read_frames
from crackscan.config import PipelineConfig
from crackscan.wire import FrameMessage, decode
from inference.backends import open_segmenter
from inference.worker import process_frames
from management import store
from management.db import make_engine, session_factory


class Replayed:
    """A segmenter that hands out maps computed beforehand, in turn."""

    def __init__(self, info, maps) -> None:
        self.info, self.maps, self.calls = info, maps, 0

    def segment(self, images):
        self.calls += 1
        return [self.maps[(self.calls - 1) % len(self.maps)] for _ in images]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = PipelineConfig()
    folder = Path(tempfile.mkdtemp(prefix="stage-cpu-"))
    frames = read_frames(as_video("synthetic:8", config, folder), config, args.frames)
    inference = config.inference
    segmenter = open_segmenter(args.model, "auto", 0, tile=inference.tile,
                               tile_overlap=inference.tile_overlap, spin=inference.spin)
    maps = [segmenter.segment([frame])[0] for frame in frames]
    messages = [FrameMessage(run_id="r1", camera_id="cam0", seq=seq, capture_time=time.time(),
                             chainage_m=0.1 * seq, image=frame)
                for seq, frame in enumerate(frames)]
    print(f"model {segmenter.info.label}, {len(frames)} frames of the 8 s synthetic drive")
    for round_ in range(args.rounds):
        replayed = Replayed(segmenter.info, maps)
        started = time.process_time()
        results = [process_frames([message], replayed, config, "w")[0] for message in messages]
        measuring = (time.process_time() - started) / len(messages)
        wire = [result.to_frames() for result in results]
        engine = make_engine(f"sqlite:///{folder / f'round{round_}.db'}")
        sessions = session_factory(engine)
        started = time.process_time()
        for start in range(0, len(wire), 8):
            batch = [decode(frames_, 10**8) for frames_ in wire[start:start + 8]]
            with sessions.begin() as session:
                store.store_results(session, batch)
        storing = (time.process_time() - started) / len(messages)
        engine.dispose()
        cracks = sum(len(result.cracks) for result in results) / len(results)
        features = sum(len(result.features) for result in results) / len(results)
        print(f"round {round_}: {cracks:.2f} cracks and {features:.2f} features a frame; "
              f"measuring {1000 * measuring:.2f} ms CPU a frame, decoding and storing "
              f"{1000 * storing:.2f} ms")


if __name__ == "__main__":
    main()
