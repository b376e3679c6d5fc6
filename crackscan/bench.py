"""``crackscan bench``: how fast the model and the whole pipeline are on this machine.

Two measurements in one run, on the same frames:

- the bare model: the backend's ``segment`` on the source's frames one at a time (the batch and
  input size the pipeline uses), in this process, half the frames before the pipeline and half
  after it (``model_fps_before`` / ``model_fps_after``): ``model_fps`` over both and the
  per-frame latency percentiles;
- the pipeline: ``crackscan run`` on the same source in replay mode (acquisition, N inference
  workers with geometry, management into a throw-away SQLite database): ``pipeline_fps`` is its
  steady rate, frames stored over the time between the first and the last frame stored, so
  process start-up and model loading are not counted (they are reported as ``pipeline_wall_s``);
- with ``--live``, the pipeline again in live mode: the source at its own frame rate (the
  synthetic drive's 25 frames/s is above a 2-core CPU's rate), frames no worker can take
  dropped: ``live_fps`` (the stored frames' steady rate), frames dropped, and the
  capture-to-stored latency p50 / p99 with its ratio to the bare model's p50 time a frame
  (``live_latency_over_model``) and to the workers' own (``live_latency_over_inference``).

A synthetic source is first written to a video file in a temporary folder, and both
measurements read that file: rendering the drive costs about 11 ms of CPU per frame here, which a
camera or a recording does not, and on a small machine it would be counted against the pipeline.

``--batches`` measures something else: the bare backend on batches of full tiles
(:func:`bench_batches`), the throughput a GPU gains from batching, without the pipeline.

``pipeline_efficiency = pipeline_fps / model_fps`` is the share of the model's speed the
pipeline keeps. ``speed_kmh`` is the vehicle speed that rate covers: each frame advances
``frame_along_mm * (1 - overlap)`` along the tunnel for every camera of the rig, so
``speed = pipeline_fps / cameras * frame_along_mm * (1 - overlap) * 3.6 / 1000``.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from acquisition.sources import open_source
from crackscan.config import PipelineConfig
from crackscan.errors import UserError
from inference.backends import bundled_model_path, open_segmenter

log = logging.getLogger(__name__)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def read_frames(source: str, config: PipelineConfig, limit: int) -> list[np.ndarray]:
    """The first ``limit`` good frames of ``source`` (kept in memory for the bare model)."""
    frames = []
    with open_source(source, config) as frames_source:
        for item in frames_source:
            if item.image is not None:
                frames.append(item.image)
            if len(frames) >= limit:
                break
    if not frames:
        raise UserError(f"source {source} gave no frames to measure")
    return frames


def bench_model(model: Path | None, backend: str, frames: list[np.ndarray], threads: int = 0,
                warmup: int = 2, config: PipelineConfig | None = None) -> dict:
    """The bare backend on ``frames``, one per call, after ``warmup`` calls, tiled as the
    workers tile (``config.inference``)."""
    inference = (config or PipelineConfig()).inference
    segmenter = open_segmenter(model, backend, threads, tile=inference.tile,
                               tile_overlap=inference.tile_overlap, max_batch=inference.max_batch,
                               spin=inference.spin, tta=inference.tta)
    for frame in frames[:warmup]:
        segmenter.segment([frame])
    times = []
    for frame in frames:
        start = time.perf_counter()
        segmenter.segment([frame])
        times.append(time.perf_counter() - start)
    return {"backend": segmenter.backend, "model": segmenter.info.label, "times": times}


def model_stats(times: list[float]) -> dict:
    return {"model_fps": len(times) / sum(times),
            "latency_ms_p50": 1000 * statistics.median(times),
            "latency_ms_p99": 1000 * _percentile(times, 0.99),
            "model_frames": len(times)}


def bench_pipeline(source: str, model: Path | None, backend: str, workers: int,
                   config_path: str | None, mode: str = "replay") -> dict:
    """``crackscan run`` on ``source`` into a temporary SQLite database; the steady rate from
    the stored frames' times. ``mode="live"``: the source at its own frame rate, frames the
    workers cannot take dropped; the result's keys then start with ``live_`` and add the
    frames dropped and the capture-to-stored latency (p50, p99) beside the workers' own time
    per frame (``live_inference_ms_p50``, as each result reports it)."""
    from crackscan.pipeline import run_pipeline
    from management.db import make_engine, session_factory
    from management.models import Frame

    with tempfile.TemporaryDirectory(prefix="crackscan-bench-") as folder:
        db = f"sqlite:///{Path(folder) / 'bench.db'}"
        summary = run_pipeline(source=source, db_url=db, model=str(model) if model else None,
                               backend=backend, workers=workers, mode=mode,
                               config_path=config_path, record=None)
        engine = make_engine(db)
        with session_factory(engine)() as session:
            rows = session.query(Frame.stored_at, Frame.inference_ms).all()
        engine.dispose()
    stored = sorted(row.stored_at for row in rows)
    steady = (len(stored) - 1) / (stored[-1] - stored[0]).total_seconds() if len(stored) > 2 \
        and stored[-1] > stored[0] else math.nan
    if mode == "replay":
        return {"pipeline_fps": steady, "pipeline_frames": summary["frames"],
                "pipeline_wall_s": summary["wall_s"], "pipeline_status": summary["status"]}
    return {"live_fps": steady, "live_frames_read": summary.get("frames_read"),
            "live_frames_stored": len(rows), "live_frames_dropped": summary.get("frames_dropped"),
            # the run's own capture-to-stored latency (management.store.run_latency)
            "live_latency_ms_p50": summary.get("latency_ms_p50") or math.nan,
            "live_latency_ms_p99": summary.get("latency_ms_p99") or math.nan,
            "live_inference_ms_p50": (statistics.median(row.inference_ms for row in rows)
                                      if rows else math.nan),
            "live_status": summary["status"]}


def vehicle_speed_kmh(fps: float, frame_shape: tuple[int, int], config: PipelineConfig,
                      overlap: float) -> tuple[float, float, int]:
    """(speed km/h, frame length along the tunnel in mm, cameras) the rate keeps up with."""
    cameras = list(config.rig) or [config.camera]
    height, width = frame_shape
    along_mm = min((width if cam.along_axis == "x" else height) * cam.mm_per_px_along
                   for cam in cameras)
    speed = fps / len(cameras) * along_mm * (1 - overlap) / 1000 * 3.6
    return speed, along_mm, len(cameras)


def as_video(source: str, config: PipelineConfig, folder: Path) -> str:
    """``source``, or for a synthetic drive the path of the same frames written as a video."""
    from acquisition.files import SyntheticSource
    from acquisition.synth import synthesize_drive

    with open_source(source, config) as opened:
        drive = opened.drive if isinstance(opened, SyntheticSource) else None
    if drive is None:
        return source
    video = folder / "synthetic_drive.mp4"
    synthesize_drive(video, seconds=drive.seconds, seed=drive.seed, fps=drive.fps,
                     width=drive.width, height=drive.height, config=config)
    return str(video)


def run_bench(source: str, model: Path | None, backend: str, workers: int, frames: int,
              config: PipelineConfig, config_path: str | None, overlap: float = 0.1,
              threads: int = 0, repeat: int = 1, live: bool = False) -> dict:
    """Everything ``crackscan bench --format json`` prints. With ``repeat`` > 1 the whole
    measurement (model, pipeline, model) runs that many times: the result is the repeat of
    median efficiency (its numbers belong together), with every repeat's rates under
    ``repeats``, for hosts whose speed drifts within a run. ``live``: the pipeline also runs in
    live mode (:func:`bench_pipeline`), between the same halves of the bare model."""
    return run_bench_models(source, [model], backend, workers, frames, config, config_path,
                            overlap, threads, repeat, live)["models"][0]


def run_bench_models(source: str, models: list[Path | None], backend: str, workers: int,
                     frames: int, config: PipelineConfig, config_path: str | None,
                     overlap: float = 0.1, threads: int = 0, repeat: int = 1,
                     live: bool = False) -> dict:
    """:func:`run_bench` of several models in one run, taking turns within every repeat (A,
    B, A, B...), so that a host whose speed drifts is measured the same for each: ``models``
    (each as run_bench gives it) and ``relative`` (each model's bare-model and pipeline rates
    over the first model's)."""
    with tempfile.TemporaryDirectory(prefix="crackscan-bench-video-") as folder:
        video = as_video(source, config, Path(folder))
        runs: list[list[dict]] = [[] for _ in models]
        for _ in range(repeat):
            for index, model in enumerate(models):
                runs[index].append(_run_bench(source, video, model, backend, workers, frames,
                                              config, config_path, overlap, threads, live))
    chosen = [median_repeat(results) for results in runs]
    first = chosen[0]
    relative = [{"model": r["model"], "model_fps": r["model_fps"] / first["model_fps"],
                 "pipeline_fps": r["pipeline_fps"] / first["pipeline_fps"],
                 **({"live_fps": r["live_fps"] / first["live_fps"]} if live else {})}
                for r in chosen]
    return {"models": chosen, "relative": relative}


def median_repeat(results: list[dict]) -> dict:
    """The repeat of median efficiency (the lower middle of an even count), whole, with every
    repeat's rates under ``repeats`` and the spread of efficiency beside it."""
    repeat = len(results)
    if repeat == 1:
        return results[0]
    ordered = sorted(results, key=lambda r: r["pipeline_efficiency"])
    keys = ("model_fps_before", "pipeline_fps", "model_fps_after", "model_fps",
            "pipeline_efficiency", "live_fps", "live_latency_ms_p50")
    return {**ordered[(repeat - 1) // 2],
            "repeats": [{key: result[key] for key in keys if key in result}
                        for result in results],
            "pipeline_efficiency_min": ordered[0]["pipeline_efficiency"],
            "pipeline_efficiency_max": ordered[-1]["pipeline_efficiency"]}


def _run_bench(label: str, source: str, model: Path | None, backend: str, workers: int,
               frames: int, config: PipelineConfig, config_path: str | None, overlap: float,
               threads: int, live: bool = False) -> dict:
    images = read_frames(source, config, frames)
    height, width = images[0].shape[:2]
    result = {"source": label, "input": f"{width}x{height}", "batch": 1, "workers": workers}
    # The bare model before and after the pipeline, half the frames each: on a shared host whose
    # speed drifts over the minute a bench takes, both rates then see the same machine.
    half = max(1, len(images) // 2)
    model = model or bundled_model_path(config.inference.precision, backend)
    before = bench_model(model, backend, images[:half], threads, config=config)
    model_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(bench_pipeline(source, model, backend, workers, config_path))
    if live:
        result.update(bench_pipeline(source, model, backend, workers, config_path, "live"))
    after = bench_model(model, backend, images[half:] or images, threads, config=config)
    result.update(backend=before["backend"], model=before["model"],
                  **model_stats(before["times"] + after["times"]),
                  model_fps_before=len(before["times"]) / sum(before["times"]),
                  model_fps_after=len(after["times"]) / sum(after["times"]))
    children_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["pipeline_efficiency"] = result["pipeline_fps"] / result["model_fps"]
    if live:  # capture-to-stored latency over the bare model's and the workers' time a frame
        result["live_latency_over_model"] = (result["live_latency_ms_p50"]
                                             / result["latency_ms_p50"])
        result["live_latency_over_inference"] = (result["live_latency_ms_p50"]
                                                 / result["live_inference_ms_p50"])
    speed, along_mm, cameras = vehicle_speed_kmh(result["pipeline_fps"], (height, width), config,
                                                 overlap)
    result.update(speed_kmh=speed, frame_along_mm=along_mm, cameras=cameras, overlap=overlap,
                  memory_mb_model=model_rss, memory_mb_stage_max=children_rss)
    return result


def tile_images(frames: list[np.ndarray], tile: int, count: int) -> list[np.ndarray]:
    """``count`` full ``tile`` x ``tile`` images from ``frames`` (round robin): each frame's
    centre at its own resolution, scaled up only where a side is shorter than the tile (the
    crop INT8 calibration takes, ``inference.tensorrt_build.calibration_crop``)."""
    from inference.tensorrt_build import calibration_crop

    crops = [calibration_crop(frame, tile) for frame in frames[:count]]
    return [crops[i % len(crops)] for i in range(count)]


def bench_batches(model: Path | None, backend: str, frames: list[np.ndarray],
                  batches: list[int], tile: int, threads: int = 0, calls: int = 10,
                  warmup: int = 2) -> dict:
    """The bare backend on batches of full ``tile`` px tiles, one segmenter for all sizes (its
    largest batch the largest of ``batches``): for each batch size, ``calls`` timed calls of
    ``segment`` after ``warmup`` untimed ones, giving ``tiles_per_s`` (batch over the median
    call) and the call's latency percentiles. What ``crackscan bench --batches`` prints, for
    TensorRT's batch 1..32 table; on a CPU batching gains little."""
    largest = max(batches)
    segmenter = open_segmenter(model, backend, threads, tile=0, max_batch=largest,
                               batch_frames=largest)
    tiles = tile_images(frames, tile, largest)
    rows = []
    for batch in batches:
        for _ in range(warmup):
            segmenter.segment(tiles[:batch])
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            segmenter.segment(tiles[:batch])
            times.append(time.perf_counter() - start)
        rows.append({"batch": batch, "tiles_per_s": batch / statistics.median(times),
                     "latency_ms_p50": 1000 * _percentile(times, 0.5),
                     "latency_ms_p99": 1000 * _percentile(times, 0.99)})
        log.info("batch %d: %.1f tiles/s", batch, rows[-1]["tiles_per_s"])
    return {"backend": segmenter.backend, "model": segmenter.info.label,
            "input": f"{tile}x{tile} tiles", "batches": rows,
            "memory_mb_model": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
