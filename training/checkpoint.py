"""Training checkpoints: what a run saves, and the one place that reads them back.

A checkpoint (``best.pt``, ``last.pt``, a WiSE-FT blend) is a ``torch.save`` dict holding the
model's weights (``model``) and the resolved config that made them (``config``); a run's own
checkpoints also hold optimizer, scheduler, epoch and metrics (and the GradScaler and the moving
average of the weights when the run had them), so ``--resume`` continues a run exactly.

:func:`read_checkpoint` loads and checks one, and :func:`load_model` rebuilds its architecture
from the checkpoint's own config. Every reader goes through them: export, the PyTorch backend,
``--resume``, ``init_from``, distillation teachers, weight interpolation and threshold
calibration.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from inference.segmenter import ModelError
from training.config import TrainConfig
from training.models import build_model, get_spec

log = logging.getLogger(__name__)


class CheckpointError(ModelError):
    """A file that is not a crackscan training checkpoint: not a ``torch.save`` file, or one
    without model weights and config. A ``ModelError`` (so a ``UserError`` and a ValueError):
    a checkpoint is a model file like an ONNX model."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path where there is no file; also a FileNotFoundError."""


def read_checkpoint(path: Path, role: str = "", map_location: str | torch.device = "cpu"
                    ) -> dict:
    """The state dict of the crackscan training checkpoint at ``path`` (tensors on
    ``map_location``). ``role`` says what the file was given as ("teacher", "init_from", ...)
    in the error: CheckpointNotFound for a missing file, CheckpointError for any other file."""
    path = Path(path)
    named = f"{role} {path}" if role else str(path)
    if not path.is_file():
        raise CheckpointNotFound(f"{role + ' ' if role else ''}checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # not a torch.save file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{named} is not a crackscan training checkpoint ({reason})"
                              ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{named} is not a crackscan training checkpoint")
    return state


def rebuild(cfg: TrainConfig, state: dict) -> nn.Module:
    """The architecture ``cfg`` names holding the checkpoint's weights, in eval mode."""
    model = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params)
    model.load_state_dict(state["model"])
    return model.eval()


def load_model(path: Path, role: str = "") -> tuple[nn.Module, TrainConfig, dict]:
    """The model of a checkpoint (on the CPU, eval mode, rebuilt from the checkpoint's own
    config), that config, and the checkpoint's state (:func:`read_checkpoint`)."""
    state = read_checkpoint(path, role)
    cfg = TrainConfig(**state["config"])
    return rebuild(cfg, state), cfg, state


def checkpoint_metadata(state: dict, cfg: TrainConfig, threshold: float | None = None
                        ) -> dict[str, str]:
    """The crackscan metadata of a checkpoint (the keys ``training.export`` documents): what an
    exported ONNX model carries and what the PyTorch backend reports
    (``training.torch_backend``)."""
    spec = get_spec(cfg.model)
    val = state.get("metrics", {}).get("val", {})
    return {
        "crackscan.model": cfg.model,
        "crackscan.mean": json.dumps(list(spec.mean)),
        "crackscan.std": json.dumps(list(spec.std)),
        "crackscan.size_multiple": str(spec.size_multiple),
        # binary models have one output channel, the crack logit; multi-class models one
        # channel per class, in this order (softmax over channels)
        "crackscan.classes": json.dumps(list(cfg.classes)),
        # explicit, else the one chosen on validation (training's last step), else the recipe's
        "crackscan.threshold": str(threshold if threshold is not None
                                   else val.get("default_threshold", cfg.threshold)),
        "crackscan.input_color": "RGB",
        "crackscan.trained_on": json.dumps([Path(p).name for p in cfg.data]),
        "crackscan.metrics": json.dumps({k: v for k, v in val.items()
                                         if isinstance(v, (int, float))}),
        "crackscan.epoch": str(state.get("epoch")),
    }


# --- a run's own checkpoints -------------------------------------------------------------------

def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, cfg: TrainConfig,
                    metrics: dict, scaler: torch.amp.GradScaler | None = None,
                    ema: AveragedModel | None = None) -> None:
    """``model``'s weights (the ones export and ``init_from`` read) with the optimizer state;
    ``ema``, when given, is kept beside them for ``--resume``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch,
             "config": json.loads(cfg.model_dump_json()), "metrics": metrics}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    torch.save(state, path)


def restore(path: Path, model, optimizer, scheduler, scaler, device: torch.device,
            ema: AveragedModel | None = None) -> tuple[int, list[dict]]:
    """Load a checkpoint for ``--resume``; returns (the next epoch, the history so far). A
    checkpoint saved without a moving average starts one from the resumed weights."""
    checkpoint = read_checkpoint(path, "resume", map_location=device)
    model.load_state_dict(checkpoint["model"])
    if ema is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    # position, learning rates and momentum come from the checkpoint; the schedule length is
    # this run's, so a run resumed with more epochs than it was saved with can go on
    length = {k: v for k, v in scheduler.state_dict().items()
              if k in ("total_steps", "_schedule_phases")}
    scheduler.load_state_dict({**checkpoint["scheduler"], **length})
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    log.info("resumed from %s at epoch %d", path, checkpoint["epoch"] + 1)
    return checkpoint["epoch"] + 1, checkpoint["metrics"].get("history", [])
