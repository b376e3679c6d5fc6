"""The labelled-fraction experiment of the semi-automatic annotation study: what
``crackscan train-fractions`` runs.

How much does a label buy, and do U2PL and active selection make fewer labels go further? From
one labelled pool (a dataset folder's training ids, its carved validation ids set aside, and with
them every other view of their photographs: ``independent_pool``), for each
labelled fraction (1/16 ... all) and each way of choosing the labelled images (``random``, or
``active``: ``crackscan select``'s own ranking -- the starting model's uncertainty, spread by
appearance -- over the pool's images), one recipe is trained two ways on exactly the same labels,
from the same starting model, for the same number of steps:

- ``supervised``: the labelled images only (the recipe with ``semi: none``);
- ``u2pl``: the same, plus the rest of the pool as unlabelled images (the recipe's ``semi: u2pl``).

Every run is one epoch of ``steps`` batches (``epoch_images``: the labelled images cycled), so a
run on 1/16 of the labels trains as long as one on all of them, and best.pt is the run's end
(nothing is picked on the validation ids that are scored). Scores, on the pool's carved
validation ids and on every ``held_out`` folder (all its images): F1 at 2 px at the recipe's fixed
threshold, and the threshold-swept ODS at 2 px and strict (the benchmarks' convention).

Writes ``OUT/fractions.json`` and ``OUT/fractions.md`` after every run; started again with the
same pool, model and steps, it keeps the rows whose run it would train again unchanged (the
same run config), so the table can grow (another fraction, strategy or recipe) into the same
folder, and a row whose recipe changed is trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from inference.backends import open_segmenter
from inference.segmenter import split_map
from training import data as ds
from training import loop
from training.config import TrainConfig, load_config
from training.evaluate import evaluate_model
from training.export import export_checkpoint
from training.select import STRATEGIES, Candidate, appearance, choose, score_frame

log = logging.getLogger(__name__)

FRACTIONS = (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
METHODS = ("supervised", "u2pl")


def parse_fraction(text: str) -> Fraction:
    """``1/8``, ``0.125`` or ``1`` as a fraction in (0, 1]; ValueError otherwise."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"a labelled fraction is written 1/8 or 0.125, not {text!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"a labelled fraction lies in (0, 1], not {text}")
    return value


def photographs(ids: list[str]) -> dict[str, str]:
    """Each id's photograph: an id ``<stem>-<number>`` whose stem ends in a digit and is an id
    too, or is shared with another such id, is a view of the photograph ``<stem>`` (DeepCrack's
    ``train-11116``, ``train-11116-2``, ... are crops of one picture); any other id is its own
    (``train-1`` and ``train-2`` are two)."""
    stems = {sample_id: re.sub(r"-\d+$", "", sample_id) for sample_id in ids}
    shared = Counter(stems.values())
    return {i: stem if stem != i and stem[-1:].isdigit() and (stem in stems or shared[stem] > 1)
            else i for i, stem in stems.items()}


def independent_pool(pool_ids: list[str], val_ids: list[str]) -> list[str]:
    """The pool's ids less every view of a photograph that a validation id shows: a label or an
    unlabelled view of the same picture would score the runs on what they have seen."""
    photo = photographs(pool_ids + val_ids)
    held = {photo[i] for i in val_ids}
    return [i for i in pool_ids if photo[i] not in held]


def labelled_count(fraction: Fraction, pool_size: int) -> int:
    return max(1, round(fraction * pool_size))


def score_pool(model: Path, pool: Path, ids: list[str], tile: int, threads: int = 0
               ) -> tuple[list[Candidate], np.ndarray]:
    """``crackscan select``'s scores of the pool's images by ``model``: one candidate (its
    uncertainty) and one appearance vector per id. Dataset images have no chainage: every
    candidate sits at 0, so only appearance spreads the choice."""
    segmenter = open_segmenter(model, "onnxruntime", threads, tile=tile)
    candidates, features = [], []
    for seq, sample in enumerate(tqdm(ds.samples(pool, ids), desc="scoring the pool",
                                      disable=None)):
        bgr = np.ascontiguousarray(ds.load_image(sample.image_path)[:, :, ::-1])
        probability, _ = split_map(segmenter.segment([bgr])[0])
        candidates.append(Candidate(pool.name, seq, 0.0, round(score_frame(probability), 4)))
        features.append(appearance(bgr, probability))
    return candidates, np.asarray(features)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def labelled_folder(pool: Path, chosen: list[str], val_ids: list[str], out: Path) -> Path:
    """A dataset folder of the chosen ids (train.txt) and the pool's validation ids (val.txt),
    its files linked to the pool's."""
    for sample in ds.samples(pool, sorted(set(chosen) | set(val_ids))):
        _link(sample.image_path, out / "images" / sample.image_path.name)
        _link(sample.mask_path, out / "masks" / sample.mask_path.name)
    if (pool / ds.CLASSES_FILE).is_file():  # class masks: their names come along
        _link(pool / ds.CLASSES_FILE, out / ds.CLASSES_FILE)
    (out / "train.txt").write_text("".join(f"{i}\n" for i in sorted(chosen)))
    (out / "val.txt").write_text("".join(f"{i}\n" for i in sorted(val_ids)))
    return out


def unlabelled_folder(pool: Path, ids: list[str], out: Path) -> Path:
    """A folder of the pool's images ``ids`` only (no masks): what U2PL learns from unlabelled."""
    for sample in ds.samples(pool, ids):
        _link(sample.image_path, out / "images" / sample.image_path.name)
    return out


def run_config(recipe: Path, method: str, data: Path, unlabeled: Path | None, init: Path,
               steps: int, out: Path, crop: int | None, batch_size: int | None) -> TrainConfig:
    """The recipe as one run of the experiment: ``steps`` batches in one epoch, from ``init``,
    semi-supervised only for ``u2pl``."""
    cfg = load_config(recipe)
    changes: dict = {"data": [data], "init_from": init, "epochs": 1, "max_minutes": None,
                     "crop_schedule": None, "out": out,
                     "semi": "u2pl" if method == "u2pl" else "none",
                     "unlabeled": [unlabeled] if method == "u2pl" and unlabeled else []}
    if crop:
        changes["crop"] = crop
    if batch_size:
        changes["batch_size"] = batch_size
    changes["epoch_images"] = steps * (batch_size or cfg.batch_size)
    if method == "u2pl" and cfg.ema_decay is None:
        changes["ema_decay"] = 0.99  # U2PL's teacher is the moving average
    return TrainConfig(**{**cfg.model_dump(), **changes})


def score_model(model: Path, pool: Path, held_out: list[Path], cfg: TrainConfig,
                threads: int = 0) -> dict:
    """The row's scores: the pool's carved validation ids and each held-out folder's images, at
    the recipe's threshold (F1) and swept (ODS)."""
    segmenter = open_segmenter(model, "onnxruntime", threads, tile=cfg.val_tile)
    scores = {}
    for name, folders, split in [("val", [pool], ds.CARVED)] + [
            (folder.name, [folder], None) for folder in held_out]:
        at = {tol: evaluate_model(segmenter, folders, split, tol, cfg.threshold,
                                  cfg.val_fraction, cfg.seed) for tol in (2, 0)}
        scores[name] = {"images": at[2]["images"], "f1_2px": at[2]["f1"],
                        "ods_2px": at[2]["ods"], "ods_strict": at[0]["ods"]}
    return scores


def markdown(rows: list[dict], held_out: list[str]) -> str:
    head = ("| fraction | labelled | strategy | method | recipe | crack px % | train min | "
            "val F1 @ 2 px | val ODS @ 2 px | val ODS strict |"
            + "".join(f" {name} F1 @ 2 px | {name} ODS @ 2 px |" for name in held_out) + "\n"
            + "|---" * (10 + 2 * len(held_out)) + "|\n")
    lines = []
    for r in rows:
        s = r["scores"]
        lines.append(f"| {r['fraction']} | {r['labelled']} | {r['strategy']} | {r['method']} | "
                     f"`{r['recipe']}` | {r['crack_px_pct']:.2f} | {r['train_minutes']} | "
                     f"{s['val']['f1_2px']:.3f} | {s['val']['ods_2px']:.3f} | "
                     f"{s['val']['ods_strict']:.3f} |"
                     + "".join(f" {s[n]['f1_2px']:.3f} | {s[n]['ods_2px']:.3f} |"
                               for n in held_out))
    return head + "\n".join(lines) + "\n"


def _crack_share(pool: Path, ids: list[str]) -> float:
    """Crack pixels of the labelled images, in % of their pixels."""
    crack = total = 0
    for sample in ds.samples(pool, ids):
        mask = ds.load_pair(sample)[1]
        crack, total = crack + int(mask.sum()), total + mask.size
    return 100.0 * crack / max(total, 1)


def run_experiment(recipe: Path, pool: Path, init: Path, steps: int, out: Path, *,
                   fractions: tuple[Fraction, ...] = FRACTIONS,
                   strategies: tuple[str, ...] = STRATEGIES,
                   methods: tuple[str, ...] = METHODS, held_out: list[Path] | None = None,
                   crop: int | None = None, batch_size: int | None = None, seed: int = 0,
                   threads: int = 0) -> list[dict]:
    """Run (or continue) the experiment; returns the table's rows."""
    held_out = list(held_out or [])
    if init.suffix != ".onnx":
        raise ValueError(f"--init {init}: the starting model must be an exported ONNX model "
                         "(active selection scores the pool with it)")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method {method!r}: one of {', '.join(METHODS)}")
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    base = load_config(recipe)
    all_ids, val_ids = ds.train_val_split(pool, base.val_fraction, base.seed)
    if not val_ids:
        raise ValueError(f"{pool}: no validation ids (val_fraction 0): nothing to score on")
    pool_ids = independent_pool(all_ids, val_ids)
    if len(pool_ids) < len(all_ids):
        log.info("train-fractions: %d of %d training ids left out of the pool: views of the "
                 "photographs of validation ids", len(all_ids) - len(pool_ids), len(all_ids))
    if not pool_ids:
        raise ValueError(f"{pool}: every training id shows a validation photograph")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"pool": str(pool), "init": str(init), "steps": steps, "crop": crop,
            "batch_size": batch_size, "seed": seed, "pool_images": len(pool_ids),
            "pool_left_out": len(all_ids) - len(pool_ids),
            "val_images": len(val_ids), "held_out": [str(h) for h in held_out]}
    rows: list[dict] = []
    path = out / "fractions.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if {key: saved.get(key) for key in meta} == meta:
            rows = saved["rows"]
        else:
            log.info("train-fractions: %s was another experiment; starting a new table", path)

    def key(row: dict) -> tuple:
        return row["recipe"], row["fraction"], row["strategy"], row["method"]

    def write() -> None:
        path.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        (out / "fractions.md").write_text(markdown(rows, [h.name for h in held_out]))

    scored: tuple[list[Candidate], np.ndarray] | None = None
    for fraction in fractions:
        count = labelled_count(fraction, len(pool_ids))
        for strategy in (strategies if count < len(pool_ids) else ("all",)):
            if strategy == "active" and scored is None:
                scored = score_pool(init, pool, pool_ids, base.val_tile, threads)
            if strategy == "all":
                picked = list(range(len(pool_ids)))
            else:
                candidates, features = scored if strategy == "active" else (
                    [Candidate(pool.name, i, 0.0, 0.0) for i in range(len(pool_ids))],
                    np.zeros((len(pool_ids), 1), np.float32))
                picked = choose(candidates, features, count, strategy, seed)
            chosen = sorted(pool_ids[i] for i in picked)
            rest = sorted(set(pool_ids) - set(chosen))
            name = f"{strategy}-{count}"
            data = labelled_folder(pool, chosen, val_ids, out / "data" / name)
            unlabeled = unlabelled_folder(pool, rest, out / "data" / f"{name}-unlabelled"
                                          ) if rest else None
            for method in methods:
                if method == "u2pl" and unlabeled is None:
                    continue  # every image of the pool is labelled: nothing unlabelled to learn
                run_out = out / "runs" / recipe.stem / f"{name}-{method}"
                cfg = run_config(recipe, method, data, unlabeled, init, steps, run_out, crop,
                                 batch_size)
                row_key = (recipe.stem, str(fraction), strategy, method)
                digest = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
                if any(key(r) == row_key and r.get("config") == digest for r in rows):
                    log.info("train-fractions: %s is in %s already", "/".join(row_key), path)
                    continue
                rows = [r for r in rows if key(r) != row_key]  # run with another config
                log.info("train-fractions: %s, %d of %d labelled (%s), %s, %d steps",
                         fraction, count, len(pool_ids), strategy, method, steps)
                started = time.monotonic()
                loop.main(cfg)
                minutes = (time.monotonic() - started) / 60
                model = run_out / "model.onnx"
                export_checkpoint(run_out / "best.pt", model)
                rows.append({"recipe": recipe.stem, "fraction": str(fraction),
                             "labelled": count, "strategy": strategy, "method": method,
                             "crack_px_pct": _crack_share(pool, chosen),
                             "train_minutes": round(minutes, 1), "steps": steps,
                             "config": digest,
                             "chosen": chosen, "onnx": str(model),
                             "scores": score_model(model, pool, held_out, cfg, threads)})
                write()
    write()
    return rows
