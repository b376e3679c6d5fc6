"""Training loop: plain functions that read top to bottom.

``main(cfg)`` loads the dataset folders, carves a validation split from their training ids, trains
with random crops, validates every epoch on whole validation images, and keeps ``best.pt`` (best
validation F1 at the configured pixel tolerance) and ``last.pt``. A checkpoint holds model,
optimizer, scheduler, epoch and the resolved config, so ``--resume`` continues a run exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training import data as ds
from training.config import TrainConfig
from training.losses import get_loss
from training.metrics import Evaluator
from training.models import build_model, get_spec

log = logging.getLogger(__name__)


class CrackCrops(torch.utils.data.Dataset):
    """In-memory (image, mask) pairs, served as augmented random crops."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], crop: int, mean, std,
                 seed: int) -> None:
        self.pairs, self.crop, self.mean, self.std = pairs, crop, mean, std
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = ds.augment(*self.pairs[index], self.crop, self.rng)
        return (torch.from_numpy(ds.normalize(image, self.mean, self.std)),
                torch.from_numpy(mask[None].astype(np.float32)))


def load_folders(cfg: TrainConfig) -> tuple[list[ds.Sample], list[ds.Sample]]:
    if not cfg.data:
        raise ds.DatasetError("no dataset folders: give --data DIR (or 'data:' in the config)")
    train, val = [], []
    for folder in cfg.data:
        train_ids, val_ids = ds.train_val_split(folder, cfg.val_fraction, cfg.seed)
        train += ds.samples(folder, train_ids)
        val += ds.samples(folder, val_ids)
        log.info("%s: %d train, %d validation images", folder, len(train_ids), len(val_ids))
    return train, val


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, epoch: int) -> float:
    model.train()
    total, count = 0.0, 0
    for images, masks in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None):
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(images)
        count += len(images)
    return total / max(count, 1)


@torch.no_grad()
def predict(model, image: np.ndarray, mean, std, multiple: int) -> np.ndarray:
    """Crack probability (HxW float32) of one RGB image with the PyTorch model."""
    model.eval()
    padded, (h, w) = ds.pad_to_multiple(image, multiple)
    logits = model(torch.from_numpy(ds.normalize(padded, mean, std))[None])
    return torch.sigmoid(logits)[0, 0, :h, :w].numpy()


def evaluate(model, pairs, mean, std, multiple: int, tolerance: float, threshold: float,
             sweep: bool = False) -> dict:
    evaluator = Evaluator(tolerance=tolerance, threshold=threshold, sweep=sweep)
    for image, mask in pairs:
        evaluator.add(predict(model, image, mean, std, multiple), mask)
    return evaluator.summary()


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, cfg: TrainConfig,
                    metrics: dict) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "config": json.loads(cfg.model_dump_json()), "metrics": metrics}, path)


def main(cfg: TrainConfig, resume: Path | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    spec = get_spec(cfg.model)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))

    train_samples, val_samples = load_folders(cfg)
    train_pairs = [ds.load_pair(s) for s in train_samples]
    val_pairs = [ds.load_pair(s) for s in val_samples]
    loader = torch.utils.data.DataLoader(
        CrackCrops(train_pairs, cfg.crop, spec.mean, spec.std, cfg.seed),
        batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_pairs) > cfg.batch_size)

    model = build_model(cfg.model, **cfg.model_params)
    if cfg.encoder_weights:
        state = torch.load(cfg.encoder_weights, map_location="cpu", weights_only=True)
        missing, _ = model.encoder.load_state_dict(state, strict=False)
        log.info("encoder weights from %s (%d encoder tensors not in the file)",
                 cfg.encoder_weights, len(missing))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * max(len(loader), 1), pct_start=0.1)
    loss_fn = get_loss(cfg.loss)

    start_epoch, best_f1, history = 1, -1.0, []
    if resume:
        checkpoint = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        # position, learning rates and momentum come from the checkpoint; the schedule length is
        # this run's, so a run resumed with more epochs than it was saved with can go on
        length = {k: scheduler.state_dict()[k] for k in ("total_steps", "_schedule_phases")}
        scheduler.load_state_dict({**checkpoint["scheduler"], **length})
        start_epoch = checkpoint["epoch"] + 1
        history = checkpoint["metrics"].get("history", [])
        best_f1 = max((h["val_f1"] for h in history), default=-1.0)
        log.info("resumed from %s at epoch %d", resume, start_epoch)

    started = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs + 1):
        loss = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, epoch)
        val = evaluate(model, val_pairs, spec.mean, spec.std, spec.size_multiple, cfg.tolerance,
                       cfg.threshold) if val_pairs else {"f1": math.nan, "iou": math.nan}
        history.append({"epoch": epoch, "loss": loss, "val_f1": val["f1"], "val_iou": val["iou"],
                        "minutes": (time.monotonic() - started) / 60})
        log.info("epoch %d/%d  loss %.4f  val F1@%gpx %.4f  IoU %.4f  (%.1f min)", epoch,
                 cfg.epochs, loss, cfg.tolerance, val["f1"], val["iou"], history[-1]["minutes"])
        metrics = {"history": history, "val": val}
        save_checkpoint(cfg.out / "last.pt", model, optimizer, scheduler, epoch, cfg, metrics)
        if val["f1"] > best_f1:
            best_f1 = val["f1"]
            save_checkpoint(cfg.out / "best.pt", model, optimizer, scheduler, epoch, cfg, metrics)
        (cfg.out / "history.json").write_text(json.dumps(history, indent=2))
        if cfg.max_minutes and (time.monotonic() - started) / 60 >= cfg.max_minutes:
            log.info("stopping after %.1f minutes (max_minutes)", cfg.max_minutes)
            break
    return {"best_val_f1": best_f1, "epochs": len(history), "out": str(cfg.out)}
