"""Same-budget comparison of the architectures: what ``crackscan train-compare`` runs.

Every recipe is trained on the same dataset folders for the same number of epochs (the same
number of training crops; with ``crop`` given, also the same crop and batch size for all), then
exported to ONNX and scored by the deploy path (ONNX Runtime, ``training.evaluate``) on the
validation ids the runs carved: F1 at the threshold the run calibrated and ODS, at a 2 px
tolerance and strict. With it: parameters, training minutes, and the bare model's time for one
512 x 512 tile on ONNX Runtime (this machine's CPU) and on PyTorch CUDA in fp16 when there is a
GPU. Writes ``OUT/compare.json`` and ``OUT/compare.md`` (the README's table) after every recipe,
so a long comparison can be read while it runs.

A distillation recipe whose teacher is another recipe of the same comparison gets that run's
``best.pt`` as its teacher (list the teacher first).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from inference.backends import open_segmenter
from training import loop
from training.checkpoint import read_checkpoint
from training.config import TrainConfig, load_config
from training.evaluate import evaluate_model
from training.export import export_checkpoint
from training.models import build_model

log = logging.getLogger(__name__)

TILE = 512


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def cpu_tile_ms(model_path: Path, threads: int = 0, repeats: int = 5) -> float:
    """Median ms of the bare ONNX Runtime session on one 1 x 3 x 512 x 512 tile on the CPU."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    tile = np.random.default_rng(0).standard_normal((1, 3, TILE, TILE)).astype(np.float32)
    name = session.get_inputs()[0].name
    return _median_ms(lambda: session.run(None, {name: tile}), repeats)


def gpu_tile_ms(cfg: TrainConfig, checkpoint: Path, repeats: int = 20) -> float | None:
    """Median ms of the PyTorch model in fp16 on CUDA for one 512 x 512 tile; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    model = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params)
    model.load_state_dict(read_checkpoint(checkpoint)["model"])
    model = model.cuda().half().eval()
    tile = torch.randn(1, 3, TILE, TILE, device="cuda", dtype=torch.half)

    def run() -> None:
        with torch.no_grad():
            model(tile)
        torch.cuda.synchronize()

    return _median_ms(run, repeats)


def recipe_config(recipe: Path, data: list[Path], epochs: int, out: Path, crop: int | None,
                  batch_size: int | None, done: dict[str, Path]) -> TrainConfig:
    """The recipe with the comparison's budget; a teacher that this comparison trained earlier
    (same ``out`` directory name as the recipe's teacher path) is replaced by that run."""
    cfg = load_config(recipe, data=data, epochs=epochs, out=out / recipe.stem)
    changes: dict = {"max_minutes": None}
    if crop:
        changes.update(crop=crop, crop_schedule=None)
    if batch_size:
        changes["batch_size"] = batch_size
    if cfg.teacher is not None:
        trained = done.get(cfg.teacher.parent.name)
        if trained is None and not cfg.teacher.is_file():
            raise FileNotFoundError(f"{recipe}: teacher {cfg.teacher} does not exist; list its "
                                    "recipe before this one")
        changes["teacher"] = trained or cfg.teacher
    return TrainConfig(**{**cfg.model_dump(), **changes})


def finished_training(cfg: TrainConfig) -> list[dict] | None:
    """The history of a training of exactly ``cfg`` that already ran to its last epoch in
    ``cfg.out`` (a comparison that stopped after it, at export or scoring), else None."""
    history, config = cfg.out / "history.json", cfg.out / "config.json"
    if not (history.is_file() and config.is_file() and (cfg.out / "best.pt").is_file()):
        return None
    if json.loads(config.read_text()) != json.loads(cfg.model_dump_json()):
        return None
    epochs = json.loads(history.read_text())
    return epochs if epochs and epochs[-1]["epoch"] == cfg.epochs else None


def score_recipe(recipe: Path, cfg: TrainConfig, threads: int) -> dict:
    """Train ``cfg`` (unless a finished training of it is there), export its best checkpoint
    and score it; one row of the table."""
    history = finished_training(cfg)
    if history is not None:
        log.info("train-compare: %s already trained to epoch %d in %s; scoring it", recipe.stem,
                 cfg.epochs, cfg.out)
        result, minutes = {"epochs": cfg.epochs}, history[-1]["minutes"]
    else:
        started = time.monotonic()
        result = loop.main(cfg)
        minutes = (time.monotonic() - started) / 60
    best = cfg.out / "best.pt"
    onnx_path = cfg.out / "model.onnx"
    export_checkpoint(best, onnx_path)  # the threshold the run calibrated on its validation ids
    # Scored as validation scored it, and as the pipeline segments: large images in tiles.
    segmenter = open_segmenter(onnx_path, "onnxruntime", threads, tile=cfg.val_tile)
    scores = {tolerance: evaluate_model(segmenter, cfg.data, "carved", tolerance, None,
                                        cfg.val_fraction, cfg.seed) for tolerance in (2, 0)}
    model = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params)
    return {
        "recipe": recipe.stem, "model": cfg.model,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "epochs": result["epochs"], "crop": cfg.crop if not cfg.crop_schedule else "schedule",
        "batch_size": cfg.batch_size, "train_minutes": round(minutes, 1),
        "threshold": scores[2]["threshold"], "images": scores[2]["images"],
        "f1_2px": scores[2]["f1"], "ods_2px": scores[2]["ods"], "ois_2px": scores[2]["ois"],
        "f1_strict": scores[0]["f1"], "ods_strict": scores[0]["ods"], "iou": scores[2]["iou"],
        "cpu_ms_512": cpu_tile_ms(onnx_path, threads),
        "gpu_ms_512_fp16": gpu_tile_ms(cfg, best),
        "onnx": str(onnx_path),
    }


def markdown(rows: list[dict]) -> str:
    head = ("| recipe | model | params | train min | F1 @ 2 px | ODS @ 2 px | F1 strict | "
            "ODS strict | IoU | CPU ms / 512 tile | GPU ms / 512 tile (fp16) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        gpu = "-" if r["gpu_ms_512_fp16"] is None else f"{r['gpu_ms_512_fp16']:.2f}"
        lines.append(f"| `{r['recipe']}` | `{r['model']}` | {r['params_m']:.1f} M | "
                     f"{r['train_minutes']} | {r['f1_2px']:.3f} | {r['ods_2px']:.3f} | "
                     f"{r['f1_strict']:.3f} | {r['ods_strict']:.3f} | {r['iou']:.3f} | "
                     f"{r['cpu_ms_512']:.0f} | {gpu} |")
    return head + "\n".join(lines) + "\n"


def _write(out: Path, meta: dict, rows: list[dict]) -> None:
    (out / "compare.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "compare.md").write_text(markdown(rows))


def retime(out: Path, threads: int = 0, repeats: int = 9) -> list[dict]:
    """Measure the CPU (and GPU) tile time of every model of a finished comparison again and
    rewrite its tables: timings taken while the machine trained and tested are not the model's.
    Run it on an idle machine."""
    path = out / "compare.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the comparison first")
    meta = json.loads(path.read_text())
    rows = meta.pop("rows")
    for row in rows:
        row["cpu_ms_512"] = cpu_tile_ms(Path(row["onnx"]), threads, repeats)
        log.info("retime: %s %.0f ms per 512 tile on the CPU", row["recipe"], row["cpu_ms_512"])
    _write(out, meta, rows)
    return rows


def compare(recipes: list[Path], data: list[Path], epochs: int, out: Path, *,
            crop: int | None = None, batch_size: int | None = None, threads: int = 0
            ) -> list[dict]:
    """Run the comparison. Started again with the same arguments after a failure, it keeps the
    rows already in ``OUT/compare.json`` and the trainings already finished."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"epochs": epochs, "crop": crop, "batch_size": batch_size,
            "data": [str(d) for d in data]}
    previous: dict[str, dict] = {}
    if (out / "compare.json").is_file():
        saved = json.loads((out / "compare.json").read_text())
        if {key: saved.get(key) for key in meta} == meta:
            previous = {row["recipe"]: row for row in saved["rows"]}
    rows: list[dict] = []
    done: dict[str, Path] = {}
    for recipe in recipes:
        cfg = recipe_config(recipe, data, epochs, out, crop, batch_size, done)
        if recipe.stem in previous and Path(previous[recipe.stem]["onnx"]).is_file():
            log.info("train-compare: %s is in %s already", recipe.stem, out / "compare.json")
            rows.append(previous[recipe.stem])
        else:
            log.info("train-compare: %s (%s), %d epochs", recipe.stem, cfg.model, epochs)
            rows.append(score_recipe(recipe, cfg, threads))
        done[recipe.stem] = cfg.out / "best.pt"
        _write(out, meta, rows)
    return rows
