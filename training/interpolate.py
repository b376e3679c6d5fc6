"""Weight-space ensembling of a fine-tuned model with the model it started from (WiSE-FT,
Wortsman et al. 2022, "Robust fine-tuning of zero-shot models").

A fine-tune that teaches a deployed model something new (other exposures, another camera) also
moves it away from what it did well. Both models lie in one basin of the loss, so the straight
line between their weights, ``(1 - alpha) * start + alpha * fine_tuned``, keeps much of each:
one model of the same size and speed, nothing added at inference. ``alpha`` is chosen on
validation images like any other setting, and the blend gets its own default threshold there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from crackscan.errors import UserError
from training import data as ds
from training.checkpoint import read_checkpoint
from training.config import TrainConfig
from training.loaders import load_folders
from training.loop import calibrate_threshold, init_weights
from training.models import build_model, get_spec

log = logging.getLogger(__name__)


class InterpolationError(UserError, ValueError):
    """Two models that cannot be blended, or a blend factor out of range."""


def blend_state(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * tuned`` for every floating-point tensor; counters and
    other integer tensors are the fine-tuned model's."""
    if start.keys() != tuned.keys():
        missing = sorted(start.keys() ^ tuned.keys())[:3]
        raise InterpolationError(f"the two models' tensors differ (e.g. {missing}): only a "
                                 "model and its own fine-tune can be blended")
    blended = {}
    for name, value in tuned.items():
        if start[name].shape != value.shape:
            raise InterpolationError(f"{name}: shape {tuple(start[name].shape)} in the start "
                                     f"model, {tuple(value.shape)} in the fine-tuned one")
        blended[name] = (torch.lerp(start[name].to(value.dtype), value, alpha)
                         if value.is_floating_point() else value.clone())
    return blended


def interpolate_checkpoint(checkpoint: Path, alpha: float, out: Path,
                           origin: Path | None = None, calibrate: bool = True) -> dict:
    """Write ``out``: a checkpoint of ``checkpoint``'s weights blended with ``origin``'s (default:
    the model its recipe fine-tuned, ``init_from``) at ``alpha`` (1: the fine-tune, 0: the start).
    With ``calibrate`` the blend is scored on the run's own validation split (its recipe's data
    folders, seed and fraction) over the threshold sweep, and that choice becomes its default
    threshold (``calibrate_threshold``, report beside ``out``). Returns the checkpoint's state."""
    if not 0.0 <= alpha <= 1.0:
        raise InterpolationError(f"alpha must lie in 0..1 (0: the start model, 1: the "
                                 f"fine-tune): {alpha}")
    state = read_checkpoint(checkpoint, "interpolate")
    cfg = TrainConfig(**state["config"])
    origin = Path(origin) if origin is not None else cfg.init_from
    if origin is None:
        raise InterpolationError(f"{checkpoint} was trained from scratch (no init_from): name "
                                 "the model it started from")
    spec = get_spec(cfg.model)
    start = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params)
    loaded = init_weights(start, cfg.model_copy(update={"init_from": origin}), spec)
    log.info("start model: %s", loaded)
    model = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params)
    model.load_state_dict(blend_state(start.state_dict(), state["model"], alpha))
    blended = {"model": model.state_dict(), "config": state["config"], "epoch": state["epoch"],
               "metrics": {"history": state.get("metrics", {}).get("history", [])},
               "interpolated": {"checkpoint": str(checkpoint), "origin": str(origin),
                                "alpha": alpha}}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blended, out)
    if calibrate:
        _, val_samples = load_folders(cfg)
        if not val_samples:
            raise ds.DatasetError(f"{checkpoint}'s recipe carves no validation images from "
                                  f"{[str(d) for d in cfg.data]}: give a threshold instead")
        pairs = [ds.load_pair(s, cfg.num_classes, cfg.crack_label) for s in val_samples]
        calibrate_threshold(model, out, pairs, [s.dataset for s in val_samples], spec, cfg,
                            cfg.crack_label, report=out.with_suffix(".val_report.json"))
    return read_checkpoint(out)
