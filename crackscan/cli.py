"""The ``crackscan`` command. Each subcommand parses its flags, calls into the stage packages and
prints results; errors become one line on stderr and a non-zero exit (a traceback only with
``--debug``). ``--format json`` prints one JSON document on stdout and logs go to stderr."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from crackscan.config import ConfigError, PipelineConfig, load_pipeline_config

log = logging.getLogger("crackscan")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A failure the user can fix; shown as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input, not our bug: shown as one line."""
    from acquisition.position import PositionError
    from acquisition.recording import RecordingError
    from acquisition.service import AcquisitionError
    from acquisition.sources import SourceError
    from acquisition.synth import SynthError
    from inference.segmenter import ModelError
    from management.db import DatabaseError
    from training.data import DatasetError

    return (UserError, ConfigError, SourceError, SynthError, AcquisitionError, ModelError,
            PositionError, RecordingError,
            DatabaseError, DatasetError, FileNotFoundError, PermissionError)


def setup_logging(verbose: bool, stage: str | None = None) -> None:
    prefix = f"{stage} " if stage else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, force=True,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def stop_on_signals(again: threading.Event | None = None) -> threading.Event:
    """SIGTERM and SIGINT set the returned event: every stage's loop ends cleanly on it. A
    second signal sets ``again`` (acquisition: stop draining, exit now)."""
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if stop.is_set() and again is not None:
            log.info("signal %d again: ending now", signum)
            again.set()
            return
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def print_json(document) -> None:
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- pipeline -------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from crackscan.pipeline import run_pipeline

    summary = run_pipeline(
        source=args.source, db_url=args.db, model=args.model, backend=args.backend,
        workers=args.workers, mode=args.mode, config_path=args.config, record=args.record,
        verbose=args.verbose, config=source_config(args), acquire_args=source_args(args))
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
    from management.formats import render
    from management.store import query_physical
    from management.truth import score_against_truth

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    video, truth_path = out / "tunnel_drive.mp4", out / "tunnel_drive_truth.json"
    db_url = args.db or f"sqlite:///{(out / 'crackscan.db').resolve()}"
    log.info("synthesizing a %.0f s tunnel drive -> %s", args.seconds, video)
    truth = synthesize_drive(video, seconds=args.seconds, seed=args.seed, truth=truth_path)
    summary = run_pipeline(source=str(video), db_url=db_url, model=args.model, backend="auto",
                           workers=args.workers, mode="replay", config_path=None, record=None,
                           verbose=args.verbose)
    print(format_summary(summary))
    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        physical = query_physical(session, run=summary["id"])
    score = score_against_truth(truth["cracks"], physical)
    print(f"true cracks in the synthetic drive: {score['true_cracks']}, found: {score['found']}, "
          f"physical cracks per found crack: {_maybe(score['physical_per_found_crack'], '.2f')}")
    print(f"median error against the truth: length {_maybe(score['median_length_error'], '+.1%')}"
          f", mean width {_maybe(score['median_width_error'], '+.1%')}; "
          f"{score['other_physical_cracks']} physical cracks on no true crack (joints, stains, "
          "false detections)")
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

    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be in 0..1 (a share of the frame), got {args.overlap}")
    if args.frames < 1 or args.workers < 1 or args.repeat < 1:
        raise UserError("--frames, --workers and --repeat must be at least 1")
    config = load_pipeline_config(args.config)
    model = Path(args.model) if args.model else None
    try:
        if args.batches:
            result = _bench_batches(args, model, config)
        else:
            result = run_bench(args.source, model, args.backend, args.workers, args.frames,
                               config, args.config, args.overlap, args.threads, args.repeat)
    except ValueError as exc:
        raise UserError(str(exc)) from None
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


def _bench_batches(args, model: Path | None, config) -> dict:
    """``bench --batches 1,2,4``: the bare backend on batches of full tiles."""
    from crackscan.bench import bench_batches, read_frames

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(f"--batches takes sizes like 1,2,4,8, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batches sizes must be at least 1, got {args.batches!r}")
    frames = read_frames(args.source, config, max(batches))
    return {"source": args.source, **bench_batches(model, args.backend, frames, batches,
                                                   args.tile, args.threads)}


# --- the three services alone ---------------------------------------------------------------

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
    try:
        return KeyRing.load(Path(args.keys))
    except ValueError as exc:
        raise UserError(str(exc)) from None


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
    run_id = args.run_id or new_run_id()
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
                                  keys=keys, finish=finish)
        finally:
            if recorder is not None:
                recorder.close()
                log.info("recorded %d frames to %s", recorder.frames_written, args.record)
    log.info("end of stream: read %d, sent %d, dropped %d, bad %d (%s)", end.frames_read,
             end.frames_sent, end.frames_dropped, end.frames_bad, end.reason)
    return 0


def cmd_infer(args) -> int:
    from inference.segmenter import open_segmenter
    from inference.worker import run_worker

    config = load_pipeline_config(args.config)
    inference = config.inference
    segmenter = open_segmenter(args.model, args.backend, args.threads or inference.threads,
                               tile=inference.tile, tile_overlap=inference.tile_overlap,
                               max_batch=inference.max_batch,
                               batch_frames=inference.batch_frames, spin=inference.spin,
                               tta=inference.tta)
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
    stop = stop_on_signals()
    finished = run_management(args.results, engine, config.management, stop,
                              exit_after_runs=args.exit_after_runs, keys=load_keys(args))
    log.info("management done: %d run(s) finished", len(finished))
    return 0


# --- records --------------------------------------------------------------------------------

def cmd_runs(args) -> int:
    from management.db import make_engine, resolve_url, session_factory
    from management.formats import render
    from management.store import list_runs

    engine = make_engine(resolve_url(args.db))
    with session_factory(engine)() as session:
        runs = list_runs(session)
    print(render(runs, args.format))
    return 0


def cmd_query(args) -> int:
    from management.db import make_engine, resolve_url, session_factory
    from management.formats import render
    from management.store import parse_chainage, query_cracks, query_physical

    try:
        chainage = parse_chainage(args.chainage) if args.chainage else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    query = query_cracks if args.detections else query_physical
    engine = make_engine(resolve_url(args.db))
    with session_factory(engine)() as session:
        try:
            records = query(session, run=args.run, min_width_mm=args.min_width_mm,
                            min_length_mm=args.min_length_mm, chainage=chainage,
                            crack_type=args.type, severity=args.severity, sort=args.sort,
                            limit=args.limit, tunnel=args.tunnel)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    print(render(records, args.format))
    return 0


def cmd_compare(args) -> int:
    from management.compare import CHANGE_COLUMNS, change_rows, compare_runs
    from management.db import make_engine, resolve_url, session_factory
    from management.formats import render
    from management.store import list_runs, query_physical

    engine = make_engine(resolve_url(args.db))
    with session_factory(engine)() as session:
        known = {run["id"]: run for run in list_runs(session)}
        for run_id in (args.run_a, args.run_b):
            if run_id not in known:
                raise UserError(f"no run {run_id!r} in the database (`crackscan runs` lists "
                                "them)")
        tunnels = [known[args.run_a]["tunnel"], known[args.run_b]["tunnel"]]
        if None not in tunnels and tunnels[0] != tunnels[1]:
            log.warning("comparing runs of different tunnels: %s is of %s, %s of %s",
                        args.run_a, tunnels[0], args.run_b, tunnels[1])
        before = query_physical(session, run=args.run_a)
        after = query_physical(session, run=args.run_b)
    try:
        report = compare_runs(before, after, tolerance_mm=args.tolerance_mm,
                              offset_m=args.offset_m)
    except ValueError as exc:
        raise UserError(str(exc).replace("tolerance_mm", "--tolerance-mm")
                        .replace("offset_m", "--offset-m")) from None
    if args.format == "json":
        print_json({"before_run": args.run_a, "after_run": args.run_b, **report})
        return 0
    rows = change_rows(report)
    if args.format == "table":
        s = report["summary"]
        print(f"{args.run_a} -> {args.run_b}: {s['before']} cracks before, {s['after']} after; "
              f"{s['matched']} matched ({s['grown']} grown), {s['new']} new, {s['gone']} gone "
              f"(tolerance {args.tolerance_mm:g} mm, offset {args.offset_m:g} m)")
        if not rows:
            return 0
    print(render(rows, args.format, columns=CHANGE_COLUMNS), end="")
    return 0


def cmd_report(args) -> int:
    from management.db import make_engine, resolve_url, session_factory
    from management.report import build_report

    engine = make_engine(resolve_url(args.db))
    with session_factory(engine)() as session:
        try:
            report = build_report(session, args.run, Path(args.out), section_m=args.section_m,
                                  largest=args.largest)
        except LookupError:
            raise UserError(f"no run {args.run!r} in the database; list the runs with "
                            "`crackscan runs`") from None
        except ValueError as exc:
            raise UserError(str(exc)) from None
    print(f"report of run {report['run']}: {report['cracks']} physical cracks (from "
          f"{report['detections']} detections) -> {report['path']}")
    return 0


def cmd_db(args) -> int:
    from management import schema
    from management.db import make_engine, resolve_url

    # Not the schema check of every other command: this is the command that fixes the schema.
    if args.action == "merge":
        return _merge_runs(args)
    engine = make_engine(resolve_url(args.db), check_schema=False)
    try:
        before = schema.current_revision(engine)
        if args.action == "current":
            print(before or "none")
            return 0
        after = schema.upgrade(engine)
    finally:
        engine.dispose()
    shown = engine.url.render_as_string(hide_password=True)
    print(f"database {shown}: schema {after} "
          + ("(already)" if after == before else f"(was {before or 'none'})"))
    return 0


def _merge_runs(args) -> int:
    """``crackscan db merge``: (re)build physical cracks of one run or of every run."""
    from management.db import make_engine, resolve_url, session_factory
    from management.store import list_runs, merge_run

    if not args.link_mm > 0:
        raise UserError(f"--link-mm must be > 0, got {args.link_mm}")
    engine = make_engine(resolve_url(args.db))
    sessions = session_factory(engine)
    with sessions() as session:
        runs = [args.run] if args.run else [run["id"] for run in list_runs(session)]
    for run_id in runs:
        with sessions.begin() as session:
            try:
                count = merge_run(session, run_id, args.link_mm)
            except LookupError as exc:
                raise UserError(str(exc)) from None
        print(f"run {run_id}: {count} physical cracks")
    return 0


# --- data and models ------------------------------------------------------------------------

def cmd_synth(args) -> int:
    from acquisition.synth import synthesize_drive

    config = load_pipeline_config(args.config)
    truth = synthesize_drive(Path(args.out), seconds=args.seconds, seed=args.seed, fps=args.fps,
                             width=args.width, height=args.height, config=config,
                             truth=Path(args.truth) if args.truth else None)
    log.info("wrote %s: %d frames, %d cracks", args.out, truth["frames"], len(truth["cracks"]))
    return 0


def _torch_module(name: str):
    """A training module that needs torch (the 'train' extra), imported on demand so the runtime
    path never needs torch installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"this command needs the 'train' extra ({exc.name} is missing): "
                        "pip install -e '.[train]'") from None


def cmd_train(args) -> int:
    from pydantic import ValidationError

    from training.config import load_config

    train = _torch_module("training.train")
    try:
        cfg = load_config(Path(args.config), data=args.data, epochs=args.epochs, out=args.out,
                          teacher=args.teacher, max_minutes=args.max_minutes,
                          init_from=args.init_from)
    except (ValidationError, ValueError, OSError) as exc:
        first = str(exc).splitlines()
        raise UserError(f"training config {args.config}: {' '.join(first[:3])}") from None
    result = train.main(cfg, resume=Path(args.resume) if args.resume else None)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one result document, not N
        print_json(result)
    return 0


def cmd_train_compare(args) -> int:
    from pydantic import ValidationError

    compare = _torch_module("training.compare")
    if args.retime:
        try:
            rows = compare.retime(Path(args.out), threads=args.threads)
        except FileNotFoundError as exc:
            raise UserError(f"train-compare --retime: {exc}") from None
        print_json({"out": args.out, "rows": rows})
        return 0
    if not (args.config and args.data and args.epochs):
        raise UserError("train-compare needs --config (one or more), --data and --epochs")
    for path in args.config:
        if not Path(path).is_file():
            raise UserError(f"recipe {path} does not exist")
    try:
        rows = compare.compare([Path(c) for c in args.config], [Path(d) for d in args.data],
                               args.epochs, Path(args.out), crop=args.crop,
                               batch_size=args.batch_size, threads=args.threads)
    except (ValidationError, FileNotFoundError) as exc:
        raise UserError(f"train-compare: {str(exc).splitlines()[0]}") from None
    print_json({"out": args.out, "rows": rows})
    return 0


def _tile_option(tile: int | None, defaults) -> int:
    """``--tile`` of eval and parity: the pipeline's ``inference.tile`` when not given, 0 for
    whole images, else a valid tile (UserError otherwise)."""
    tile = defaults.tile if tile is None else tile
    if tile:
        from inference.tiling import check_tiling

        try:
            check_tiling(tile, defaults.tile_overlap)
        except ValueError as exc:
            raise UserError(f"--tile: {exc}") from None
    return tile


def cmd_eval(args) -> int:
    from inference.segmenter import open_segmenter
    from training.evaluate import evaluate_model

    if args.gamma <= 0:
        raise UserError(f"--gamma must be positive, got {args.gamma}")
    # Scored as the pipeline segments by default: the same tiles (configs/pipeline.yaml).
    defaults = PipelineConfig().inference
    tile = _tile_option(args.tile, defaults)
    segmenter = open_segmenter(args.model, "auto", tta=args.tta, tile=tile,
                               tile_overlap=defaults.tile_overlap, max_batch=defaults.max_batch)
    summary = evaluate_model(segmenter, [Path(d) for d in args.data], args.split, args.tolerance,
                             args.threshold, args.val_fraction, args.seed, args.gamma)
    summary["tile"] = tile
    if args.format == "json":
        print_json(summary)
        return 0
    sets = summary.pop("sets")
    for key, value in summary.items():
        print(f"{key:22s} {value:.4f}" if isinstance(value, float) else f"{key:22s} {value}")
    if len(sets) > 1:
        print(f"\n{'set':16s} {'images':>6s} {'P':>6s} {'R':>6s} {'F1':>6s} {'ODS':>6s} "
              f"{'OIS':>6s} {'IoU':>6s}  (each at the threshold above; ODS, OIS swept)")
        for name, s in sets.items():
            print(f"{name:16s} {s['images']:6d} {s['precision']:6.3f} {s['recall']:6.3f} "
                  f"{s['f1']:6.3f} {s['ods']:6.3f} {s['ois']:6.3f} {s['iou']:6.3f}")
    return 0


def cmd_parity(args) -> int:
    from inference.segmenter import open_segmenter
    from training.evaluate import backend_parity

    defaults = PipelineConfig().inference
    tile = _tile_option(args.tile, defaults)
    options = dict(tile=tile, tile_overlap=defaults.tile_overlap, max_batch=defaults.max_batch)
    other = open_segmenter(args.model, args.backend, **options)
    reference = open_segmenter(args.against_model or args.model, args.against, **options)
    summary = backend_parity(reference, other, [Path(d) for d in args.data], args.split,
                             args.val_fraction, args.seed)
    summary["tile"] = tile
    if args.format == "json":
        print_json(summary)
        return 0
    for key, value in summary.items():
        print(f"{key:20s} {value:.6g}" if isinstance(value, float) else f"{key:20s} {value}")
    return 0


def cmd_build_engine(args) -> int:
    from inference.segmenter import bundled_model_path
    from inference.tensorrt_backend import build_engine

    if args.int8 and not (args.calib or (args.calib_cache and Path(args.calib_cache).is_file())):
        raise UserError("--int8 needs --calib DIR (images to calibrate on) or an existing "
                        "--calib-cache FILE")
    onnx_path = Path(args.onnx) if args.onnx else bundled_model_path()
    if not onnx_path.is_file():
        raise UserError(f"ONNX model {onnx_path} does not exist")
    plan = build_engine(onnx_path, Path(args.out), fp16=args.fp16, int8=args.int8,
                        calib_dir=Path(args.calib) if args.calib else None,
                        calib_cache=Path(args.calib_cache) if args.calib_cache else None,
                        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                        max_batch=args.max_batch, tile=args.tile)
    log.info("wrote %s", plan)
    return 0


def cmd_export(args) -> int:
    export = _torch_module("training.export")
    if not Path(args.checkpoint).is_file():
        raise UserError(f"checkpoint {args.checkpoint} does not exist")
    checkpoint, extra = Path(args.checkpoint), {}
    try:
        if args.interpolate is not None:
            checkpoint, extra = interpolated(args, checkpoint)
        metadata = export.export_checkpoint(checkpoint, Path(args.out), threshold=args.threshold,
                                            extra_metadata=extra)
    except (export.ExportError, ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    log.info("wrote %s (threshold %s)", args.out, metadata["crackscan.threshold"])
    return 0


def interpolated(args, checkpoint: Path) -> tuple[Path, dict[str, str]]:
    """``--interpolate``: the blended checkpoint written beside ``checkpoint`` (its threshold
    calibrated on the run's validation split unless ``--threshold`` is given), and the metadata
    that says what was blended."""
    from inference.segmenter import file_sha256

    wise = _torch_module("training.interpolate")
    blended = checkpoint.with_name(f"{checkpoint.stem}.wise{args.interpolate:.2f}.pt")
    state = wise.interpolate_checkpoint(checkpoint, args.interpolate, blended,
                                        args.interpolate_from, calibrate=args.threshold is None)
    origin = Path(state["interpolated"]["origin"])
    log.info("blended %s with %s at alpha %.2f: %s", checkpoint, origin, args.interpolate, blended)
    return blended, {"crackscan.interpolated": json.dumps(
        {"alpha": args.interpolate, "origin": origin.name,
         "origin_sha256": file_sha256(origin)[:8]})}


# --- argument parsing -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crackscan", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def db_flag(p):
        p.add_argument("--db", help="SQLAlchemy URL (default: $CRACKSCAN_DB or "
                                    "sqlite:///crackscan.db)")

    p = add("demo", cmd_demo, "synthesize a short tunnel drive and run the whole pipeline on it")
    p.add_argument("--out", default="crackscan-demo", help="folder for the video, truth and DB")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    db_flag(p)

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

    def keys_flag(p):
        p.add_argument("--keys", metavar="DIR", help="CURVE keys from `crackscan keys`: "
                       "authenticate and encrypt every link (needed to bind a non-loopback "
                       "interface)")

    p = add("run", cmd_run, "run acquisition, inference and management on one source")
    source_flags(p)
    db_flag(p)
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   default="auto", help="auto: TensorRT when it and a GPU are there, else "
                   "ONNX Runtime; torch: a training checkpoint (.pt)")
    p.add_argument("--workers", type=int, default=1, help="inference worker processes")
    p.add_argument("--mode", choices=["replay", "live"], default="replay",
                   help="replay: back-pressure, no frame dropped; live: bounded queues, drops "
                        "counted")
    p.add_argument("--config", help="pipeline YAML (see configs/pipeline.yaml)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("acquire", cmd_acquire, "the acquisition service alone")
    source_flags(p)
    keys_flag(p)
    p.add_argument("--frames", default="push+bind:tcp://127.0.0.1:5555",
                   help="socket for frames to inference workers")
    p.add_argument("--control", default="push+connect:tcp://127.0.0.1:5556",
                   help="socket for run start / end messages to management")
    p.add_argument("--run-id")
    p.add_argument("--mode", choices=["replay", "live"], default="replay")
    p.add_argument("--config")

    p = add("infer", cmd_infer, "one inference worker alone")
    p.add_argument("--frames", default="pull+connect:tcp://127.0.0.1:5555")
    p.add_argument("--results", default="push+connect:tcp://127.0.0.1:5556")
    p.add_argument("--model")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   default="auto", help="auto: TensorRT when it and a GPU are there, else "
                   "ONNX Runtime; torch: a training checkpoint (.pt)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: config)")
    p.add_argument("--config")
    keys_flag(p)

    p = add("manage", cmd_manage, "the management service alone (stores results)")
    p.add_argument("--results", default="pull+bind:tcp://127.0.0.1:5556")
    db_flag(p)
    p.add_argument("--config")
    p.add_argument("--exit-after-runs", type=int, help="exit after this many runs finished")
    keys_flag(p)

    p = add("keys", cmd_keys, "create CURVE keys for links between hosts")
    p.add_argument("--out", required=True, metavar="DIR", help="key folder (created)")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="a client key pair to add and authorize (repeatable; default: 'client')")

    p = add("bench", cmd_bench, "measure the bare model and the whole pipeline on this machine")
    p.add_argument("--source", default="synthetic:8",
                   help="frames to measure on (default: an 8 s synthetic drive, 640x360)")
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   default="auto", help="auto: TensorRT when it and a GPU are there, else "
                   "ONNX Runtime; torch: a training checkpoint (.pt)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--frames", type=int, default=100,
                   help="frames for the bare model (the pipeline reads the whole source)")
    p.add_argument("--threads", type=int, default=0, help="bare model's CPU threads")
    p.add_argument("--overlap", type=float, default=0.1,
                   help="share of a frame that must overlap the next one, for the speed")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure N times and report the repeat of median efficiency")
    p.add_argument("--config", help="pipeline YAML: camera scale (or rig) for the speed")
    p.add_argument("--batches", metavar="N,N,...",
                   help="instead: the bare backend on batches of these sizes of full --tile px "
                        "tiles cut from the source (tiles/s and latency per batch size)")
    p.add_argument("--tile", type=int, default=512, help="tile side for --batches (px)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("runs", cmd_runs, "list inspection runs")
    db_flag(p)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")

    p = add("query", cmd_query, "query physical cracks (or, with --detections, the per-frame "
                                "records)")
    db_flag(p)
    p.add_argument("--run")
    p.add_argument("--detections", action="store_true",
                   help="the per-frame detections instead of the physical cracks merged from them")
    p.add_argument("--min-width-mm", type=float, help="maximum width at least this")
    p.add_argument("--min-length-mm", type=float)
    p.add_argument("--chainage", metavar="A:B", help="chainage range in metres")
    p.add_argument("--type", choices=["longitudinal", "circumferential", "diagonal", "network"])
    p.add_argument("--severity", help="a severity class name (config severity.names)")
    p.add_argument("--tunnel", help="the runs of this tunnel (run --tunnel)")
    p.add_argument("--sort", default="chainage_m",
                   help="chainage_m (default), length_mm, width_max_mm, width_mean_mm or arc_mm; "
                        "a leading '-' sorts largest first, e.g. --sort=-width_max_mm")
    p.add_argument("--limit", type=int)
    p.add_argument("--format", choices=["table", "csv", "json", "geojson"], default="table")

    p = add("compare", cmd_compare, "compare two inspections of one tunnel: new cracks, growth "
                                    "in length and width, cracks no longer seen")
    p.add_argument("run_a", metavar="RUN_A", help="the earlier inspection's run id")
    p.add_argument("run_b", metavar="RUN_B", help="the later inspection's run id")
    db_flag(p)
    p.add_argument("--tolerance-mm", type=float, default=50.0,
                   help="cracks of the two runs this close (over at least half of the shorter "
                        "one) are one crack")
    p.add_argument("--offset-m", type=float, default=0.0,
                   help="added to RUN_B's chainages first (odometer offset between the drives)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table: a summary line and the changes; csv: one row per change; json: "
                        "the whole report")

    p = add("report", cmd_report, "write one run's inspection report as one HTML file: crack "
                                  "map, statistics per chainage section, the largest cracks")
    p.add_argument("--run", required=True, help="the run's id (see `crackscan runs`)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the HTML file to write")
    db_flag(p)
    p.add_argument("--section-m", type=float, default=10.0,
                   help="length of the chainage sections of the statistics table (m)")
    p.add_argument("--largest", type=int, default=10,
                   help="how many of the largest cracks to list with their mask crops")

    p = add("db", cmd_db, "show or upgrade the database schema (back the database up before "
                          "an upgrade)")
    p.add_argument("action", choices=["upgrade", "current", "merge"],
                   help="upgrade: migrate the database to this crackscan's schema; merge: "
                        "rebuild physical cracks from the detections (--run, --link-mm); "
                        "current: print the database's schema revision ('none': empty, or from "
                        "before migrations)")
    db_flag(p)
    p.add_argument("--run", help="merge: this run only (default: every run)")
    p.add_argument("--link-mm", type=float, default=10.0,
                   help="merge: detections of different frames this close are one crack")

    p = add("synth", cmd_synth, "write a synthetic tunnel drive (mp4) and its ground truth")
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", help="write the ground-truth JSON here")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--config", help="pipeline YAML: camera scale, speed, start chainage")

    p = add("train", cmd_train, "train a segmentation model")
    p.add_argument("--config", required=True, help="recipe YAML (configs/train/)")
    p.add_argument("--data", action="append", help="dataset folder (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--out")
    p.add_argument("--resume", help="checkpoint to resume from (last.pt)")
    p.add_argument("--teacher", help="knowledge distillation: the teacher's checkpoint (best.pt)")
    p.add_argument("--init-from", help="fine-tune from this model: a checkpoint (.pt) or an "
                   "exported crackscan ONNX model (.onnx, with freeze_bn: true)")
    p.add_argument("--max-minutes", type=float,
                   help="stop after the epoch that passes this wall-clock budget")

    p = add("train-compare", cmd_train_compare,
            "train several recipes with the same budget and tabulate their scores and speed")
    p.add_argument("--config", action="append",
                   help="recipe YAML (repeatable; a distillation recipe after its teacher's)")
    p.add_argument("--data", action="append", help="dataset folder (repeatable)")
    p.add_argument("--epochs", type=int, help="the budget: epochs for every recipe")
    p.add_argument("--retime", action="store_true",
                   help="only measure the speed of the models in --out again (on an idle "
                        "machine) and rewrite its tables")
    p.add_argument("--crop", type=int, help="one crop size for every recipe (default: each "
                   "recipe's own, progressive resizing included)")
    p.add_argument("--batch-size", type=int, help="one batch size for every recipe")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    p.add_argument("--out", default="runs/compare")

    p = add("eval", cmd_eval, "score a model on a labelled dataset")
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    p.add_argument("--data", action="append", required=True, help="dataset folder (repeatable)")
    p.add_argument("--split", help="ids of SPLIT.txt (default: all images); 'carved': the "
                   "validation ids that training carves from train.txt")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="with --split carved: the training run's val_fraction (default 0.1)")
    p.add_argument("--seed", type=int, default=0,
                   help="with --split carved: the training run's seed (default 0)")
    p.add_argument("--tolerance", type=float, default=2.0, help="pixels; 0 = strict")
    p.add_argument("--threshold", type=float, help="default: the model's own")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="score the images as another exposure gives them: each pixel value "
                        "v becomes 255 * (v / 255) ** GAMMA (above 1 darker, as laser-lit "
                        "line-scan images; below 1 brighter; default 1: as they are)")
    p.add_argument("--tta", choices=["none", "hflip", "flips"], default="none",
                   help="test-time augmentation: average each image's probabilities with its "
                        "left-right mirror (hflip) or all three mirror images (flips)")
    p.add_argument("--tile", type=int,
                   help="images larger than this (px, either side) are segmented in overlapping "
                        "tiles of at most this size, as the pipeline does; 0: whole images "
                        "(default: the pipeline's inference.tile, 512)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("parity", cmd_parity, "compare one backend's crack maps with another's on real "
            "images (a TensorRT engine against ONNX Runtime)")
    p.add_argument("--model", help="model for --backend: ONNX, TensorRT plan or checkpoint "
                   "(default: the bundled model)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   default="auto", help="the backend to check (default: auto)")
    p.add_argument("--against", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   default="onnxruntime", help="the reference backend (default: onnxruntime)")
    p.add_argument("--against-model", help="model for --against (default: --model)")
    p.add_argument("--data", action="append", required=True, help="dataset folder (repeatable)")
    p.add_argument("--split", help="ids of SPLIT.txt (default: all images); 'carved': the "
                   "validation ids that training carves from train.txt")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, help="tile side as in eval (default: the pipeline's "
                   "inference.tile; 0: whole images)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("build-engine", cmd_build_engine,
            "compile an ONNX model into a TensorRT plan (NVIDIA GPU with TensorRT)")
    p.add_argument("--onnx", help="ONNX model (default: the bundled model)")
    p.add_argument("--out", required=True, help="the plan to write (FILE.plan; FILE.json beside)")
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    p.add_argument("--int8", action="store_true", help="INT8, calibrated on --calib images")
    p.add_argument("--calib", metavar="DIR", help="folder of images for INT8 calibration")
    p.add_argument("--calib-cache", metavar="FILE", help="INT8 calibration cache (read/written)")
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache (read/written)")
    p.add_argument("--tile", type=int, default=512, help="tile side the engine serves (px)")
    p.add_argument("--max-batch", type=int, default=8)

    p = add("export", cmd_export, "export a training checkpoint to ONNX")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, help="default threshold stored in the model")
    p.add_argument("--interpolate", type=float, metavar="ALPHA",
                   help="export (1 - ALPHA) x the model the checkpoint was fine-tuned from + "
                        "ALPHA x the checkpoint (WiSE-FT); its default threshold is chosen "
                        "again on the run's validation split unless --threshold is given")
    p.add_argument("--interpolate-from", type=Path, metavar="MODEL",
                   help="with --interpolate: the start model (default: the recipe's init_from)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, stage=args.command if args.command in
                  ("acquire", "infer", "manage") else None)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("crackscan: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug or not isinstance(exc, _user_errors()):
            if args.debug:
                raise
            log.error("unexpected error (run with --debug for the traceback): %s: %s",
                      type(exc).__name__, exc)
            return 1
        print(f"crackscan: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
