"""Commands that make and score models: select, labels, train, train-compare, train-fractions,
eval, parity, export, build-engine."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from crackscan.cli.common import (
    BACKENDS,
    UserError,
    add,
    db_flag,
    print_json,
    print_summary,
    read_database,
    torch_module,
)
from crackscan.config import PipelineConfig, load_pipeline_config

log = logging.getLogger("crackscan")


def cmd_train(args) -> int:
    from pydantic import ValidationError

    from training.config import load_config

    train = torch_module("training.loop")
    try:
        cfg = load_config(Path(args.config), data=args.data, epochs=args.epochs, out=args.out,
                          teacher=args.teacher, max_minutes=args.max_minutes,
                          init_from=args.init_from, unlabeled=args.unlabeled)
    except (ValidationError, ValueError, OSError) as exc:
        first = str(exc).splitlines()
        raise UserError(f"training config {args.config}: {' '.join(first[:3])}") from None
    result = train.main(cfg, resume=Path(args.resume) if args.resume else None)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one result document, not N
        print_json(result)
    return 0


def cmd_train_compare(args) -> int:
    from pydantic import ValidationError

    compare = torch_module("training.compare")
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


def cmd_train_fractions(args) -> int:
    from pydantic import ValidationError

    fractions = torch_module("training.fractions")
    for path, what in ((args.config, "recipe"), (args.init, "--init model")):
        if not Path(path).is_file():
            raise UserError(f"{what} {path} does not exist")
    for folder in [args.data] + (args.held_out or []):
        if not Path(folder).is_dir():
            raise UserError(f"dataset folder {folder} does not exist")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    try:
        chosen = tuple(fractions.parse_fraction(f) for f in args.fractions.split(","))
        rows = fractions.run_experiment(
            Path(args.config), Path(args.data), Path(args.init), args.steps, Path(args.out),
            fractions=chosen, strategies=tuple(args.strategies.split(",")),
            methods=tuple(args.methods.split(",")),
            held_out=[Path(h) for h in args.held_out or []], crop=args.crop,
            batch_size=args.batch_size, seed=args.seed, threads=args.threads)
    except (ValidationError, ValueError) as exc:
        raise UserError(f"train-fractions: {str(exc).splitlines()[0]}") from None
    print_json({"out": args.out, "rows": [{k: v for k, v in r.items() if k != "chosen"}
                                          for r in rows]})
    return 0


def _tile_option(tile: int | None, defaults) -> int:
    """``--tile`` of eval and parity: the pipeline's ``inference.tile`` when not given, 0 for
    whole images, else a valid tile (UserError otherwise)."""
    tile = defaults.tile if tile is None else tile
    if tile:
        from crackscan.config import TilingError, check_tiling

        try:
            check_tiling(tile, defaults.tile_overlap)
        except TilingError as exc:
            raise UserError(f"--tile: {exc}") from None
    return tile


def cmd_eval(args) -> int:
    from inference.backends import open_segmenter
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
    class_iou = summary.pop("class_iou", None)
    for key, value in summary.items():
        print(f"{key:22s} {value:.4f}" if isinstance(value, float) else f"{key:22s} {value}")
    if class_iou:
        print("\nclass IoU (argmax map, class-labelled folders)")
        for name, iou in class_iou.items():
            print(f"  {name:20s} {'-' if iou is None else f'{iou:.4f}'}")
    if len(sets) > 1:
        print(f"\n{'set':16s} {'images':>6s} {'P':>6s} {'R':>6s} {'F1':>6s} {'ODS':>6s} "
              f"{'OIS':>6s} {'IoU':>6s}  (each at the threshold above; ODS, OIS swept)")
        for name, s in sets.items():
            print(f"{name:16s} {s['images']:6d} {s['precision']:6.3f} {s['recall']:6.3f} "
                  f"{s['f1']:6.3f} {s['ods']:6.3f} {s['ois']:6.3f} {s['iou']:6.3f}")
    return 0


def cmd_parity(args) -> int:
    from inference.backends import open_segmenter
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
    from inference.backends import bundled_model_path
    from inference.tensorrt_build import build_engine

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
    export = torch_module("training.export")
    if not Path(args.checkpoint).is_file():
        raise UserError(f"checkpoint {args.checkpoint} does not exist")
    checkpoint, extra = Path(args.checkpoint), {}
    try:
        if args.interpolate is not None:
            checkpoint, extra = interpolated(args, checkpoint)
        metadata = export.export_checkpoint(checkpoint, Path(args.out), threshold=args.threshold,
                                            extra_metadata=extra)
    except UserError as exc:  # ExportError, CheckpointError, InterpolationError: their first line
        raise UserError(str(exc).splitlines()[0]) from None
    log.info("wrote %s (threshold %s)", args.out, metadata["crackscan.threshold"])
    return 0


def interpolated(args, checkpoint: Path) -> tuple[Path, dict[str, str]]:
    """``--interpolate``: the blended checkpoint written beside ``checkpoint`` (its threshold
    calibrated on the run's validation split unless ``--threshold`` is given), and the metadata
    that says what was blended."""
    from inference.segmenter import file_sha256

    wise = torch_module("training.interpolate")
    blended = checkpoint.with_name(f"{checkpoint.stem}.wise{args.interpolate:.2f}.pt")
    state = wise.interpolate_checkpoint(checkpoint, args.interpolate, blended,
                                        args.interpolate_from, calibrate=args.threshold is None)
    origin = Path(state["interpolated"]["origin"])
    log.info("blended %s with %s at alpha %.2f: %s", checkpoint, origin, args.interpolate, blended)
    return blended, {"crackscan.interpolated": json.dumps(
        {"alpha": args.interpolate, "origin": origin.name,
         "origin_sha256": file_sha256(origin)[:8]})}


def _model_classes(model: str | None) -> list[str]:
    """The class names of an ONNX model (default: the bundled one), background first."""
    import onnx

    from inference.backends import bundled_model_path

    path = Path(model) if model else bundled_model_path()
    if not path.is_file():
        raise UserError(f"--model {path}: no such file")
    try:
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                    .metadata_props}
        classes = json.loads(metadata["crackscan.classes"])
    except Exception as exc:  # not an ONNX file, or not a crackscan model
        raise UserError(f"--model {path}: not a crackscan ONNX model ({exc})") from None
    return ["background", "crack"] if len(classes) == 1 else list(classes)


def cmd_select(args) -> int:
    from inference.backends import open_segmenter
    from training.select import select_frames

    config = load_pipeline_config(args.config)
    source, rejected = args.source, set()
    if source.startswith("run:"):  # a stored run: its source, and what its inspectors rejected
        source, rejected = _run_source(source[4:], args.db)
    defaults = config.inference
    segmenter = open_segmenter(args.model, "auto", tile=defaults.tile,
                               tile_overlap=defaults.tile_overlap, max_batch=defaults.max_batch)
    summary = select_frames(source, Path(args.out), args.budget, segmenter, config,
                            args.strategy, args.stride, args.seed, rejected)
    if args.format == "json":
        print_json(summary)
    else:
        print(f"selected {summary['selected']} of {summary['frames_scored']} frames "
              f"({summary['strategy']}) into {summary['out']}: images/, annotations.json "
              "(COCO), images/*.json (LabelMe), selection.json")
    return 0


def _run_source(run_id: str, db: str | None) -> tuple[str, set[tuple[str, int]]]:
    """A stored run's source and the (camera, seq) of every frame that saw a crack an
    inspector rejected."""
    from management.db import session_factory
    from management.store import crack_detections, query_physical, run_summary

    engine = read_database(db)
    with session_factory(engine)() as session:
        run = run_summary(session, run_id)
        if run is None:
            raise UserError(f"no run {run_id!r} in the database (`crackscan runs` lists them)")
        rejected = {(d["camera"], d["seq"])
                    for crack in query_physical(session, run=run_id, verdict="rejected")
                    for d in crack_detections(session, run_id, crack["number"])}
    if not Path(run["source"]).exists():
        raise UserError(f"run {run_id}'s source {run['source']} is not here: give --source "
                        "the video or recording it read")
    return run["source"], rejected


def cmd_quantize(args) -> int:
    import shutil
    import tempfile

    from inference.backends import bundled_model_path
    from inference.onnxruntime_backend import load_onnx_model
    from training.quantize import calibration_tiles, guard_scores, judge, quantize_model

    model = Path(args.model) if args.model else bundled_model_path()
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} exists: quantize writes a new file")
    if args.frames < 1 or args.tile < 32:
        raise UserError("--frames must be at least 1 and --tile at least 32")
    info = load_onnx_model(model)[1]
    keep = [k.strip() for k in args.keep_fp32.split(",") if k.strip()] if args.keep_fp32 else []
    tiles = calibration_tiles(args.calibration, info, args.frames, args.tile,
                              load_pipeline_config(args.config))
    with tempfile.TemporaryDirectory() as folder:
        trial = Path(folder) / out.name
        summary = quantize_model(model, trial, tiles, keep, args.method,
                                 ", ".join(args.calibration), args.target)
        summary["out"] = str(out)
        if args.guard:
            folders = [Path(g) for g in args.guard]
            fp32 = guard_scores(model, folders, args.split)
            int8 = guard_scores(trial, folders, args.split)
            summary["guard"] = {"split": args.split, "max_loss": args.max_loss,
                                "f1_fp32": fp32, "f1_int8": int8}
            refused = judge(fp32, int8, args.max_loss)
            if refused:
                raise UserError(f"INT8 model refused, nothing written: {'; '.join(refused)}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(trial), out)
    print_summary(summary, args.format, 18)
    return 0


def cmd_labels(args) -> int:
    from training.labels import import_labels

    if args.classes and args.model:
        raise UserError("give --classes or --model, not both")
    if not 0 <= args.val_share < 1:
        raise UserError(f"--val-share must be in 0..1, got {args.val_share}")
    classes = (["background", *[c.strip() for c in args.classes.split(",") if c.strip()]]
               if args.classes else _model_classes(args.model))
    summary = import_labels(Path(args.annotations), Path(args.out), classes, args.val_share)
    if args.format == "json":
        print_json(summary)
    else:
        print(f"imported {summary['images']} annotated images into {summary['out']} "
              f"({summary['train']} train, {summary['val']} val; classes "
              f"{', '.join(summary['classes'][1:])})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add(sub, "select", cmd_select, "choose the frames worth labelling (active learning) "
            "and write them with the model's masks as pre-labels (COCO, LabelMe)")
    p.add_argument("--source", required=True,
                   help="a video, image folder or recording, or run:RUN_ID (a stored run's "
                        "source; frames with cracks an inspector rejected come first)")
    p.add_argument("--budget", type=int, required=True, metavar="N", help="frames to select")
    p.add_argument("--out", required=True, metavar="DIR", help="a new folder")
    p.add_argument("--strategy", choices=["active", "random"], default="active")
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    p.add_argument("--stride", type=int, default=1, help="score every N-th frame (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random strategy's seed")
    p.add_argument("--config", help="pipeline YAML: camera scale, speed (chainage of a video)")
    db_flag(p)
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add(sub, "quantize", cmd_quantize, "write an INT8 (QDQ) model calibrated on real frames, "
            "refused when it loses accuracy on a validation split")
    p.add_argument("--model", help="FP32 ONNX model (default: the bundled model)")
    p.add_argument("--calibration", required=True, metavar="SRC", action="append",
                   help="frames to calibrate on (repeatable, --frames shared out): a dataset "
                        "folder, a video, an image folder or a recording")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the INT8 model (new)")
    p.add_argument("--frames", type=int, default=64, help="calibration frames (one tile each)")
    p.add_argument("--tile", type=int, default=512, help="calibration tile side (px)")
    p.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="how activation ranges are calibrated")
    p.add_argument("--target", choices=["cpu", "tensorrt"], default="cpu",
                   help="cpu: unsigned activations, INT32 biases (ONNX Runtime's fast kernels); "
                        "tensorrt: symmetric activations, FP32 biases (build-engine)")
    p.add_argument("--keep-fp32", metavar="LAYERS",
                   help="layers left in FP32: first, last, or node names, comma-separated")
    p.add_argument("--guard", action="append", metavar="DIR",
                   help="labelled dataset folder (repeatable): refuse the INT8 model if it loses "
                        "more than --max-loss F1 at 2 px on any")
    p.add_argument("--split", default="carved", help="the guard's split (default: carved)")
    p.add_argument("--max-loss", type=float, default=0.01)
    p.add_argument("--config", help="pipeline YAML (a video's camera and speed)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add(sub, "labels", cmd_labels, "annotations from annotation tools into a dataset folder")
    p.add_argument("action", choices=["import"],
                   help="import: a COCO file or a folder of LabelMe files into a new dataset "
                        "folder (images/, masks/, train.txt)")
    p.add_argument("annotations", metavar="ANNOTATIONS",
                   help="a COCO .json (images found beside it or in its images/), or a folder "
                        "of LabelMe .json files")
    p.add_argument("--out", required=True, metavar="DATASET_DIR", help="the new dataset folder")
    p.add_argument("--model", help="take the class names from this ONNX model (default: the "
                   "bundled model's)")
    p.add_argument("--classes", metavar="A,B,...",
                   help="the class names instead (background first implied), e.g. crack")
    p.add_argument("--val-share", type=float, default=0.0,
                   help="share of the images listed in val.txt (default 0: all in train.txt)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add(sub, "train", cmd_train, "train a segmentation model")
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
    p.add_argument("--unlabeled", action="append", metavar="DIR",
                   help="folder of unlabelled images (repeatable), for a semi-supervised recipe "
                        "(semi: u2pl)")

    p = add(sub, "train-compare", cmd_train_compare,
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

    p = add(sub, "train-fractions", cmd_train_fractions,
            "the labelled-fraction experiment: supervised against U2PL, random against active "
            "selection, on fractions of one labelled pool")
    p.add_argument("--config", required=True,
                   help="recipe YAML (a U2PL recipe; its supervised runs set semi: none)")
    p.add_argument("--data", required=True,
                   help="the labelled pool: a dataset folder (its carved validation ids scored)")
    p.add_argument("--init", required=True,
                   help="the starting ONNX model of every run, which also scores the pool for "
                        "active selection (one that never saw the pool's labels)")
    p.add_argument("--steps", type=int, required=True, help="batches per run")
    p.add_argument("--fractions", default="1/16,1/8,1/4,1/2,1",
                   help="labelled fractions of the pool (default 1/16,1/8,1/4,1/2,1)")
    p.add_argument("--strategies", default="random,active", help="default random,active")
    p.add_argument("--methods", default="supervised,u2pl", help="default supervised,u2pl")
    p.add_argument("--held-out", action="append", metavar="DIR",
                   help="also score on all images of this labelled folder (repeatable)")
    p.add_argument("--crop", type=int, help="crop size (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="of the random selection")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for scoring")
    p.add_argument("--out", default="runs/fractions")

    p = add(sub, "eval", cmd_eval, "score a model on a labelled dataset")
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

    p = add(sub, "parity", cmd_parity, "compare one backend's crack maps with another's on real "
            "images (a TensorRT engine against ONNX Runtime)")
    p.add_argument("--model", help="model for --backend: ONNX, TensorRT plan or checkpoint "
                   "(default: the bundled model)")
    p.add_argument("--backend", choices=BACKENDS,
                   default="auto", help="the backend to check (default: auto)")
    p.add_argument("--against", choices=BACKENDS,
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

    p = add(sub, "build-engine", cmd_build_engine,
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

    p = add(sub, "export", cmd_export, "export a training checkpoint to ONNX")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, help="default threshold stored in the model")
    p.add_argument("--interpolate", type=float, metavar="ALPHA",
                   help="export (1 - ALPHA) x the model the checkpoint was fine-tuned from + "
                        "ALPHA x the checkpoint (WiSE-FT); its default threshold is chosen "
                        "again on the run's validation split unless --threshold is given")
    p.add_argument("--interpolate-from", type=Path, metavar="MODEL",
                   help="with --interpolate: the start model (default: the recipe's init_from)")
