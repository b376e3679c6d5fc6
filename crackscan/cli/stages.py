"""Commands that run the pipeline or one of its stages: demo, run, acquire, infer, manage, keys,
synth (a drive video, or lining training tiles), bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections import Counter
from pathlib import Path

from crackscan.cli.common import (
    UserError,
    add,
    backend_flag,
    db_flag,
    keys_flag,
    metrics_flag,
    print_json,
    print_summary,
    source_flags,
    stop_on_signals,
)
from crackscan.config import PipelineConfig, load_pipeline_config

log = logging.getLogger("crackscan")


def cmd_run(args) -> int:
    from crackscan.pipeline import run_pipeline

    summary = run_pipeline(
        source=args.source, db_url=args.db, model=args.model, backend=args.backend,
        workers=args.workers, mode=args.mode, config_path=args.config, record=args.record,
        verbose=args.verbose, config=source_config(args), acquire_args=source_args(args),
        resume=args.resume, metrics_address=args.metrics)
    if args.format == "json":
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0 if summary["status"] in ("complete", "stopped") else 1


def format_summary(summary: dict) -> str:
    lines = [
        f"run {summary['id']}  ({summary['status']})",
        f"  source          {summary['source']}  [{summary['mode']}]"
        + (f"  cameras {', '.join(summary['cameras'])}" if len(summary["cameras"]) > 1 else ""),
        f"  model           {summary['model']}  backend {summary['backend']}, "
        f"{summary['workers']} worker(s)",
        f"  frames read     {summary['frames_read']}",
        f"  frames stored   {summary['frames']}",
        f"  frames dropped  {summary['frames_dropped']}  (bad {summary['frames_bad']})",
    ]
    if summary.get("frames_recorded"):
        lines.append(f"  frames recorded {summary['frames_recorded']}")
    if summary.get("latency_ms_p50") is not None:
        lines.append(f"  latency         p50 {summary['latency_ms_p50']:.0f} ms, p99 "
                     f"{summary['latency_ms_p99']:.0f} ms, max {summary['latency_ms_max']:.0f} ms "
                     "(capture to stored)")
    lines += [
        f"  cracks          {summary.get('physical_cracks', 0)} physical, from "
        f"{summary['cracks']} detections",
        f"  chainage        {_metres(summary['chainage_start_m'])} .. "
        f"{_metres(summary['chainage_end_m'])} m",
        f"  wall time       {summary['wall_s']:.1f} s  ({summary['fps']:.1f} frames/s)",
        f"  database        {summary['db']}",
    ]
    return "\n".join(lines)


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _metres(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_demo(args) -> int:
    from acquisition.synth import synthesize_drive
    from crackscan.pipeline import run_pipeline
    from management.db import make_engine, session_factory
    from management.features import ring_joints
    from management.formats import render
    from management.store import query_features, query_physical
    from management.truth import score_against_truth, score_ring_joints

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    video, truth_path = out / "tunnel_drive.mp4", out / "tunnel_drive_truth.json"
    db_url = args.db or f"sqlite:///{(out / 'crackscan.db').resolve()}"
    log.info("synthesizing a %.0f s tunnel drive -> %s", args.seconds, video)
    config = load_pipeline_config(args.config)  # the drive is drawn with its camera and speed
    truth = synthesize_drive(video, seconds=args.seconds, seed=args.seed, config=config,
                             truth=truth_path)
    summary = run_pipeline(source=str(video), db_url=db_url, model=args.model, backend="auto",
                           workers=args.workers, mode="replay", config_path=args.config,
                           record=None, verbose=args.verbose)
    print(format_summary(summary))
    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        physical = query_physical(session, run=summary["id"])
        features = query_features(session, run=summary["id"])
    score = score_against_truth(truth["cracks"], physical)
    on_true = len(physical) - score["other_physical_cracks"]
    print(f"true cracks in the synthetic drive: {score['true_cracks']}, found: {score['found']}, "
          f"physical cracks per found crack: {_maybe(score['physical_per_found_crack'], '.2f')}")
    print(f"median error against the truth: length {_maybe(score['median_length_error'], '+.1%')}"
          f", mean width {_maybe(score['median_width_error'], '+.1%')}, maximum width "
          f"{_maybe(score['median_width_max_error'], '+.1%')}; "
          f"{on_true} of {len(physical)} physical cracks "
          f"({_maybe(on_true / len(physical) if physical else None, '.0%')}) on a true crack, "
          f"{score['other_physical_cracks']} on none (joints, stains, false detections)")
    if features:
        kinds = Counter(feature["kind"] for feature in features)
        joints = score_ring_joints(truth["ring_joints_m"], ring_joints(features))
        print(f"lining features (not cracks): {len(features)}: "
              + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
              + f"; ring joints found {joints['found']} of {joints['true_joints']} within "
              f"0.1 m, {joints['spurious']} spurious")
    longest = sorted(physical, key=lambda r: r["length_mm"], reverse=True)[:5]
    print("\nlongest physical cracks:")
    print(render(longest, "table"))
    command = sys.argv[0] if sys.argv[0].endswith("crackscan") else "crackscan"
    print(f"\ndatabase: {db_url}\nnext: {command} runs --db {db_url}\n"
          f"      {command} query --db {db_url} --min-length-mm 100 --format json\n"
          f"      {command} report --db {db_url} --run {summary['id']} --out "
          f"{out / 'report.html'}")
    return 0 if summary["frames"] > 0 else 1


def cmd_bench(args) -> int:
    from crackscan.bench import run_bench

    if args.web:
        return _bench_web(args)
    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be in 0..1 (a share of the frame), got {args.overlap}")
    if args.frames < 1 or args.workers < 1 or args.repeat < 1:
        raise UserError("--frames, --workers and --repeat must be at least 1")
    config = load_pipeline_config(args.config)
    models = [Path(m) for m in args.model] if args.model else [None]
    model = models[0]
    if len(models) > 1:
        if args.batches:
            raise UserError("--batches measures one --model")
        from crackscan.bench import run_bench_models

        result = run_bench_models(args.source, models, args.backend, args.workers, args.frames,
                                  config, args.config, args.overlap, args.threads, args.repeat,
                                  args.live)
        if args.format == "json":
            print_json(result)
        else:
            for row in result["relative"]:
                one = next(r for r in result["models"] if r["model"] == row["model"])
                print(f"{row['model']:32s} model {one['model_fps']:.2f} fps "
                      f"(x{row['model_fps']:.2f}), pipeline {one['pipeline_fps']:.2f} fps "
                      f"(x{row['pipeline_fps']:.2f}), efficiency "
                      f"{one['pipeline_efficiency']:.3f}"
                      + (f", live {one['live_fps']:.2f} fps (x{row['live_fps']:.2f}), latency "
                         f"p50 {one['live_latency_ms_p50']:.0f} ms = "
                         f"{one['live_latency_over_model']:.2f} x the model's"
                         if args.live else ""))
        return 0
    if args.batches:
        result = _bench_batches(args, model, config)
    else:
        result = run_bench(args.source, model, args.backend, args.workers, args.frames,
                           config, args.config, args.overlap, args.threads, args.repeat,
                           args.live)
    if args.format == "json":
        print_json(result)
    elif args.batches:
        print(f"{result['backend']} {result['model']}, {result['input']}")
        for row in result["batches"]:
            print(f"batch {row['batch']:3d}  {row['tiles_per_s']:9.1f} tiles/s  p50 "
                  f"{row['latency_ms_p50']:8.1f} ms  p99 {row['latency_ms_p99']:8.1f} ms")
    else:
        for key, value in result.items():
            if key == "repeats":
                for number, rates in enumerate(value, 1):
                    print(f"{'repeat ' + str(number):22s} model {rates['model_fps']:.2f} fps, "
                          f"pipeline {rates['pipeline_fps']:.2f} fps, efficiency "
                          f"{rates['pipeline_efficiency']:.3f}")
            else:
                print(f"{key:22s} {value:.3f}" if isinstance(value, float)
                      else f"{key:22s} {value}")
    return 0


def _bench_web(args) -> int:
    """``bench --web``: the web application's map requests on a long synthetic tunnel."""
    from crackscan.bench_web import run_web_bench

    if args.cracks < 1 or args.length_m <= 0 or args.queries < 1:
        raise UserError("--cracks and --queries must be at least 1, --length-m above 0")
    print_summary(run_web_bench(args.db, cracks=args.cracks, length_m=args.length_m,
                                queries=args.queries), args.format)
    return 0


def _bench_batches(args, model: Path | None, config) -> dict:
    """``bench --batches 1,2,4``: the bare backend on batches of full tiles."""
    from crackscan.bench import bench_batches, read_frames

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(f"--batches takes sizes like 1,2,4,8, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batches sizes must be at least 1, got {args.batches!r}")
    if args.tile < 1:
        raise UserError(f"--tile must be at least 1 px, got {args.tile}")
    frames = read_frames(args.source, config, max(batches))
    return {"source": args.source, **bench_batches(model, args.backend, frames, batches,
                                                   args.tile, args.threads)}


def source_config(args) -> PipelineConfig:
    """The pipeline config of ``--config`` with the source flags of run / acquire applied."""
    config = load_pipeline_config(args.config)
    acquisition, camera = config.acquisition, config.camera
    if args.odometer and args.chainage_file:
        raise UserError("give --odometer or --chainage-file, not both")
    for flag, kind in ((args.odometer, "odometer"), (args.chainage_file, "chainage_file")):
        if flag:
            position = acquisition.position.model_copy(update={"source": kind, "file": Path(flag)})
            acquisition = acquisition.model_copy(update={"position": position})
    if args.encoding:
        acquisition = acquisition.model_copy(update={"encoding": args.encoding})
    for flag in ("tunnel", "vehicle"):
        if getattr(args, flag):
            acquisition = acquisition.model_copy(update={flag: getattr(args, flag)})
    if args.metadata:
        camera = camera.model_copy(update={"metadata": Path(args.metadata)})
    return config.model_copy(update={"acquisition": acquisition, "camera": camera})


def source_args(args) -> list[str]:
    """The source flags of ``args`` as ``acquire`` takes them (for the pipeline's stage)."""
    out = []
    for flag in ("record", "metadata", "odometer", "chainage_file", "encoding", "tunnel",
                 "vehicle"):
        value = getattr(args, flag)
        if value:
            out += ["--" + flag.replace("_", "-"), str(value)]
    return out + (["--realtime"] if args.realtime else [])


def load_keys(args):
    from crackscan.sockets import KeyRing

    if not getattr(args, "keys", None):
        return None
    return KeyRing.load(Path(args.keys))


def cmd_keys(args) -> int:
    from crackscan.sockets import create_keys

    try:
        written = create_keys(Path(args.out), tuple(args.client or ("client",)))
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    for path in written:
        log.info("wrote %s", path)
    print(f"keys in {args.out}: give workers client.key, client.key_secret and server.key; "
          "keep server.key_secret on the hosts that bind (acquisition, management)")
    return 0


def cmd_acquire(args) -> int:
    from acquisition.recording import Recorder, RecordingError
    from acquisition.service import new_run_id, run_acquisition
    from acquisition.sources import open_source

    config = source_config(args)
    keys = load_keys(args)
    finish = threading.Event()
    stop = stop_on_signals(again=finish)
    serve_metrics(args)
    run_id = args.run_id or new_run_id()
    skip = read_skip_file(Path(args.skip_stored)) if args.skip_stored else frozenset()
    with open_source(args.source, config) as source:
        recorder = None
        if args.record:
            try:
                recorder = Recorder(
                    Path(args.record), source=args.source, run_id=run_id, fps=source.fps,
                    cameras=tuple(getattr(source, "cameras", None) or (config.camera.id,)),
                    encoding=config.acquisition.record_encoding,
                    jpeg_quality=config.acquisition.record_jpeg_quality)
            except RecordingError as exc:
                raise UserError(str(exc)) from None
        try:
            end = run_acquisition(source, args.frames, args.control, run_id, args.mode, config,
                                  stop, source_label=args.source,
                                  pace=True if args.realtime else None, recorder=recorder,
                                  keys=keys, finish=finish, skip=skip)
        finally:
            if recorder is not None:
                recorder.close()
                log.info("recorded %d frames to %s", recorder.frames_written, args.record)
    log.info("end of stream: read %d, sent %d, dropped %d, bad %d (%s)", end.frames_read,
             end.frames_sent, end.frames_dropped, end.frames_bad, end.reason)
    return 0


def serve_metrics(args) -> None:
    if args.metrics:
        from crackscan.metrics import serve

        serve(args.metrics)


def read_skip_file(path: Path) -> frozenset[tuple[str, int]]:
    """``acquire --skip-stored FILE``: a JSON list of [camera_id, seq] pairs."""
    try:
        pairs = json.loads(path.read_text())
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                and isinstance(p[1], int) and not isinstance(p[1], bool) for p in pairs):
            raise ValueError("expected a JSON list of [camera_id, seq] pairs")
    except (OSError, ValueError) as exc:
        raise UserError(f"--skip-stored {path}: {exc}") from None
    return frozenset((camera, seq) for camera, seq in pairs)


def cmd_infer(args) -> int:
    from inference.backends import bundled_model_path, open_segmenter
    from inference.worker import run_worker

    config = load_pipeline_config(args.config)
    inference = config.inference
    segmenter = open_segmenter(args.model or bundled_model_path(inference.precision,
                                                                args.backend),
                               args.backend, args.threads or inference.threads,
                               tile=inference.tile, tile_overlap=inference.tile_overlap,
                               max_batch=inference.max_batch,
                               batch_frames=inference.batch_frames, spin=inference.spin,
                               tta=inference.tta)
    serve_metrics(args)
    stop = stop_on_signals()
    stats = run_worker(args.frames, args.results, segmenter, config, stop,
                       keys=load_keys(args))
    log.info("worker done: %d frames, %d cracks, %d malformed, %d failed", stats.frames,
             stats.cracks, stats.malformed, stats.failed)
    return 0


def cmd_manage(args) -> int:
    from management.db import make_engine, resolve_url
    from management.service import run_management

    config = load_pipeline_config(args.config)
    engine = make_engine(resolve_url(args.db))
    serve_metrics(args)
    stop = stop_on_signals()
    finished = run_management(args.results, engine, config.management, stop,
                              exit_after_runs=args.exit_after_runs, keys=load_keys(args),
                              max_pixels=config.acquisition.max_frame_pixels)
    log.info("management done: %d run(s) finished", len(finished))
    return 0


def cmd_synth(args) -> int:
    if (args.out is None) == (args.dataset is None):
        raise UserError("synth writes either a drive video (--out FILE.mp4) or a lining training "
                        "dataset (--dataset DIR --images N): give exactly one of --out and "
                        "--dataset")
    if args.dataset is not None:
        return synth_dataset(args)
    if args.images is not None or args.size is not None:
        raise UserError("--images and --size are for --dataset DIR (training tiles), not for "
                        "--out (a drive video)")
    from acquisition.synth import synthesize_drive

    config = load_pipeline_config(args.config)
    truth = synthesize_drive(Path(args.out), seconds=args.seconds, seed=args.seed, fps=args.fps,
                             width=args.width, height=args.height, config=config,
                             truth=Path(args.truth) if args.truth else None)
    log.info("wrote %s: %d frames, %d cracks", args.out, truth["frames"], len(truth["cracks"]))
    return 0


def synth_dataset(args) -> int:
    from training.lining import write_lining_dataset

    if args.images is None:
        raise UserError("--dataset DIR needs --images N (how many tiles to write)")
    summary = write_lining_dataset(Path(args.dataset), images=args.images,
                                   size=256 if args.size is None else args.size, seed=args.seed)
    print(f"wrote {summary['images']} lining tiles of {summary['size']} px to "
          f"{summary['dataset']} ({summary['train']} train, {summary['val']} val, "
          f"{summary['no_crack']} without a crack) in {summary['seconds']:.1f} s, "
          f"{summary['tiles_per_s']:.1f} tiles/s")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add(sub, "demo", cmd_demo,
            "synthesize a short tunnel drive and run the whole pipeline on it")
    p.add_argument("--out", default="crackscan-demo", help="folder for the video, truth and DB")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    p.add_argument("--config", help="pipeline YAML (see configs/pipeline.yaml): the drive is "
                                    "drawn with its camera and speed, and run with it")
    db_flag(p)

    p = add(sub, "run", cmd_run, "run acquisition, inference and management on one source")
    source_flags(p)
    db_flag(p)
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    backend_flag(p)
    p.add_argument("--workers", type=int, default=1, help="inference worker processes")
    p.add_argument("--mode", choices=["replay", "live"], default="replay",
                   help="replay: back-pressure, no frame dropped; live: bounded queues, drops "
                        "counted")
    p.add_argument("--config", help="pipeline YAML (see configs/pipeline.yaml)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    metrics_flag(p, "each stage's (acquisition on PORT, management PORT+1, worker N "
                    "PORT+2+N)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="complete that interrupted replay (same --source): store only the "
                        "frames it is missing")

    p = add(sub, "acquire", cmd_acquire, "the acquisition service alone")
    source_flags(p)
    keys_flag(p)
    p.add_argument("--frames", default="push+bind:tcp://127.0.0.1:5555",
                   help="socket for frames to inference workers")
    p.add_argument("--control", default="push+connect:tcp://127.0.0.1:5556",
                   help="socket for run start / end messages to management")
    p.add_argument("--run-id")
    p.add_argument("--mode", choices=["replay", "live"], default="replay")
    p.add_argument("--config")
    metrics_flag(p)
    p.add_argument("--skip-stored", metavar="FILE",
                   help="JSON list of [camera_id, seq] the run has already stored: counted as "
                        "sent, not sent again (what run --resume passes)")

    p = add(sub, "infer", cmd_infer, "one inference worker alone")
    p.add_argument("--frames", default="pull+connect:tcp://127.0.0.1:5555")
    p.add_argument("--results", default="push+connect:tcp://127.0.0.1:5556")
    p.add_argument("--model")
    backend_flag(p)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: config)")
    p.add_argument("--config")
    keys_flag(p)
    metrics_flag(p)

    p = add(sub, "manage", cmd_manage, "the management service alone (stores results)")
    p.add_argument("--results", default="pull+bind:tcp://127.0.0.1:5556")
    db_flag(p)
    p.add_argument("--config")
    p.add_argument("--exit-after-runs", type=int, help="exit after this many runs finished")
    keys_flag(p)
    metrics_flag(p)

    p = add(sub, "keys", cmd_keys, "create CURVE keys for links between hosts")
    p.add_argument("--out", required=True, metavar="DIR", help="key folder (created)")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="a client key pair to add and authorize (repeatable; default: 'client')")

    p = add(sub, "bench", cmd_bench,
            "measure the bare model and the whole pipeline on this machine")
    p.add_argument("--source", default="synthetic:8",
                   help="frames to measure on (default: an 8 s synthetic drive, 640x360)")
    p.add_argument("--model", action="append",
                   help="ONNX model (default: the bundled model); give it twice or more to "
                        "measure the models in one run, taking turns (e.g. FP32 and INT8)")
    backend_flag(p)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--frames", type=int, default=100,
                   help="frames for the bare model (the pipeline reads the whole source)")
    p.add_argument("--threads", type=int, default=0, help="bare model's CPU threads")
    p.add_argument("--overlap", type=float, default=0.1,
                   help="share of a frame that must overlap the next one, for the speed")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure N times and report the repeat of median efficiency")
    p.add_argument("--config", help="pipeline YAML: camera scale (or rig) for the speed")
    p.add_argument("--live", action="store_true",
                   help="also run the pipeline in live mode (the source at its frame rate): "
                        "frames/s stored, frames dropped, capture-to-stored latency")
    p.add_argument("--batches", metavar="N,N,...",
                   help="instead: the bare backend on batches of these sizes of full --tile px "
                        "tiles cut from the source (tiles/s and latency per batch size)")
    p.add_argument("--tile", type=int, default=512, help="tile side for --batches (px)")
    p.add_argument("--web", action="store_true",
                   help="instead: the web application's lining-map requests (p50 / p95) and "
                        "first paint on a synthetic tunnel of --cracks over --length-m")
    p.add_argument("--db", help="--web: the database to add the tunnel to (default: a "
                   "throw-away SQLite file)")
    p.add_argument("--cracks", type=int, default=100_000, help="--web: physical cracks")
    p.add_argument("--length-m", type=float, default=10_000.0, help="--web: tunnel length")
    p.add_argument("--queries", type=int, default=50, help="--web: requests per viewport size")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add(sub, "synth", cmd_synth, "write a synthetic tunnel drive (mp4) and its ground "
            "truth, or (--dataset) labelled lining tiles for training")
    p.add_argument("--out", metavar="FILE.mp4", help="the drive video (video mode)")
    p.add_argument("--dataset", metavar="DIR", help="instead: a new folder of lining tiles with "
                   "class masks (images/, masks/, classes.json, train.txt, val.txt, truth.json)")
    p.add_argument("--images", type=int, metavar="N", help="tiles to write (with --dataset)")
    p.add_argument("--size", type=int, metavar="PX", help="tile side (with --dataset; "
                   "default 256)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", help="write the ground-truth JSON here")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--config", help="pipeline YAML: camera scale, speed, start chainage")
