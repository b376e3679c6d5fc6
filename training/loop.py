"""Training loop: plain functions that read top to bottom.

``main(cfg)`` loads the dataset folders, carves a validation split from their training ids, trains
with random crops (``training.loaders``), validates every epoch on whole validation images, and
keeps ``best.pt`` (best validation score, see ``select_by``) and ``last.pt``
(``training.checkpoint``, which ``--resume`` reads back to continue a run exactly). After every
epoch ``history.json`` and ``curves.png`` (loss and F1 per epoch) are rewritten.

Validation runs the model in memory through the PyTorch backend's segmenter, in the fitted tiles
the pipeline cuts (``val_tile``), exactly as ``crackscan eval`` would run the saved checkpoint, and
scores its maps with the evaluator ``crackscan eval`` uses (``training.metrics.SetEvaluator``).

Everything a recipe can ask for is switched on here by plain config values: layer groups with
their own learning rates and a frozen first group, progressive resizing (``crop_schedule``),
class weights, knowledge distillation from a teacher checkpoint, mixed precision, an
exponential moving average of the weights (``ema_decay``: then the averaged weights are what is
validated and kept as best). Launched by
``torchrun`` (``WORLD_SIZE`` > 1), each process trains on its shard of the images under
DistributedDataParallel and only rank 0 validates, logs, and writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from inference.segmenter import ModelInfo, Segmenter, split_map
from inference.tiling import DEFAULT_OVERLAP, TiledSegmenter
from training import data as ds
from training import semi
from training.checkpoint import read_checkpoint, rebuild, restore, save_checkpoint
from training.config import TrainConfig
from training.loaders import CrackCrops, load_folders, make_loader
from training.losses import distillation_loss, get_loss, median_frequency_weights
from training.metrics import SetEvaluator
from training.models import ModelSpec, build_model, get_spec, load_encoder_weights, param_groups
from training.onnx_weights import (
    count_convolutions,
    freeze_batch_norm,
    grow,
    load_onnx_weights,
    onnx_convolutions,
    widen_classes,
)
from training.torch_backend import TorchSegmenter, in_memory_info

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


# --- the run's setting: seed, device, processes ----------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device, CUDA included


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda, but this machine has no usable CUDA device "
                         "(use device: auto or cpu)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def start_processes(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL between GPUs, Gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if rank != 0:  # one voice: the other ranks only report problems
        logging.getLogger("training").setLevel(logging.WARNING)
    log.info("distributed training: %d processes (%s)", world, dist.get_backend())
    return rank, world, device


def from_rank0(*values: float) -> list[float]:
    """``values`` as rank 0 has them, on every rank (as given outside distributed runs)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def autocast(device: torch.device, amp: bool):
    """Mixed precision: bfloat16 on CPU (no scaler needed), float16 on CUDA (with GradScaler)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp)


# --- what the recipe asks for --------------------------------------------------------------

def crop_for_epoch(cfg: TrainConfig, epoch: int) -> int:
    """Progressive resizing: the crop of the last ``crop_schedule`` entry whose fraction of the
    training (epoch - 1) / epochs has reached; ``crop`` without a schedule."""
    if not cfg.crop_schedule:
        return cfg.crop
    progress = (epoch - 1) / cfg.epochs
    return [crop for start, crop in cfg.crop_schedule if start <= progress + 1e-9][-1]


def first_group_frozen(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the first layer group (early encoder) sits out ``epoch``: while (epoch - 1) /
    epochs < ``freeze_first_group_fraction``."""
    return (epoch - 1) / cfg.epochs < cfg.freeze_first_group_fraction - 1e-9


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """One parameter group at ``lr``, or the three layer groups at ``lr`` times ``lr_groups``."""
    if cfg.lr_groups is None and cfg.freeze_first_group_fraction == 0:
        groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    else:
        ratios = cfg.lr_groups or (1.0, 1.0, 1.0)
        # early encoder, late encoder, decoder + head (fastai-style discriminative learning
        # rates, Lau et al. 2020)
        groups = [{"params": params, "lr": cfg.lr * ratio}
                  for params, ratio in zip(param_groups(model), ratios, strict=True)]
        log.info("layer groups: %s parameters at lr %s",
                 [sum(p.numel() for p in g["params"]) for g in groups],
                 [f"{g['lr']:.3g}" for g in groups])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    """Stepped once per batch: one-cycle (warm-up over ``pct_start``, then cosine down), poly or
    constant."""
    if cfg.schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1 - min(step, steps - 1) / steps) ** 0.9)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if steps < 4:  # too short a run to warm up and anneal: the peak rate throughout
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # the warm-up takes at least two steps: one (pct_start x steps = 1) is a zero-length phase,
    # which OneCycleLR divides by
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=steps,
        pct_start=max(cfg.pct_start, 2 / steps))


def resolve_class_weights(cfg: TrainConfig, masks: list[np.ndarray]) -> list[float] | None:
    """The recipe's class weights; "median_frequency" computes them over the training masks."""
    if cfg.class_weights != "median_frequency":
        return cfg.class_weights
    names = ["background", "crack"] if cfg.num_classes == 1 else cfg.classes
    weights = median_frequency_weights(masks, len(names)).tolist()
    log.info("median-frequency class weights over %d training masks: %s", len(masks),
             ", ".join(f"{n} {w:.4g}" for n, w in zip(names, weights, strict=True)))
    return weights


class Teacher(nn.Module):
    """A frozen model in eval mode that takes the student's normalised input: the input is
    re-standardised to the teacher's own mean and std when they differ."""

    def __init__(self, model: nn.Module, student: ModelSpec, teacher: ModelSpec) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        s_mean, s_std, t_mean, t_std = (torch.tensor(v).view(1, 3, 1, 1) for v in
                                        (student.mean, student.std, teacher.mean, teacher.std))
        self.register_buffer("scale", s_std / t_std)
        self.register_buffer("shift", (s_mean - t_mean) / t_std)

    def train(self, mode: bool = True) -> Teacher:  # stays in eval mode, whatever asks
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def init_weights(model: nn.Module, cfg: TrainConfig, spec: ModelSpec) -> str:
    """Load ``cfg.init_from`` (a crackscan checkpoint, or an exported crackscan ONNX model) into
    ``model`` to fine-tune it; returns what was loaded, for the log."""
    path = Path(cfg.init_from)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"init_from model {path} does not exist")
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False
                                                      ).metadata_props}
        if metadata.get("crackscan.model") != cfg.model:
            raise ValueError(f"init_from {path} is a {metadata.get('crackscan.model')!r} "
                             f"model, the recipe trains {cfg.model!r}")
        refine = getattr(model, "refine", None)
        grown = ""
        if refine is not None and (len(onnx_convolutions(path))
                                   == count_convolutions(model) - count_convolutions(refine)):
            # a model without the stride-2 refinement: load it as it is, add the refinement
            base = build_model(cfg.model, num_classes=cfg.num_classes,
                               **{**cfg.model_params, "fine_skip": False})
            convolutions = load_onnx_weights(base, path, spec.size_multiple)
            grown = (f", and a new stride-2 refinement ({grow(model, base, 'refine.')} tensors) "
                     "that starts at zero")
        elif len(json.loads(metadata.get("crackscan.classes", '["crack"]'))) < cfg.num_classes:
            # a binary model: load it as it is, then widen its crack logit to the classes
            base = build_model(cfg.model, num_classes=1, **cfg.model_params)
            convolutions = load_onnx_weights(base, path, spec.size_multiple)
            grown = (f", widened to {cfg.num_classes} classes "
                     f"({widen_classes(model, base, cfg.crack_label)} convolutions)")
        else:
            convolutions = load_onnx_weights(model, path, spec.size_multiple)
        return (f"{convolutions} convolutions from {path} (epoch "
                f"{metadata.get('crackscan.epoch')}), batch norm frozen{grown}")
    state = read_checkpoint(path, "init_from")
    if state["config"].get("model") != cfg.model:
        raise ValueError(f"init_from {path} is a {state['config'].get('model')!r} checkpoint, "
                         f"the recipe trains {cfg.model!r}")
    model.load_state_dict(state["model"])
    return f"{path} (epoch {state.get('epoch')})"


def load_teacher(path: Path, cfg: TrainConfig, device: torch.device) -> Teacher:
    """The teacher of a distillation run, built from its checkpoint's own config; or a binary
    crackscan ONNX model of the student's architecture, teaching a multi-class student's crack
    channel (learning without forgetting, :func:`training.losses.distillation_loss`)."""
    if Path(path).suffix == ".onnx":
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False
                                                      ).metadata_props}
        if metadata.get("crackscan.model") != cfg.model or cfg.num_classes == 1 or len(
                json.loads(metadata.get("crackscan.classes", '["crack"]'))) != 1:
            raise ValueError(f"teacher {path}: an ONNX teacher is a binary model of the "
                             f"student's architecture ({cfg.model}) teaching a multi-class "
                             "student; give a training checkpoint otherwise")
        spec = get_spec(cfg.model)
        model = build_model(cfg.model, num_classes=1, **cfg.model_params)
        load_onnx_weights(model, Path(path), spec.size_multiple)
        log.info("teacher: binary %s from %s for the crack channel, alpha %g, temperature %g",
                 cfg.model, path, cfg.distill_alpha, cfg.distill_temperature)
        return Teacher(model, spec, spec).to(device)
    state = read_checkpoint(path, "teacher")
    teacher_cfg = TrainConfig(**state["config"])
    if teacher_cfg.num_classes != cfg.num_classes:
        raise ValueError(f"teacher {path} has {teacher_cfg.num_classes} output classes, the "
                         f"student {cfg.num_classes}: distillation needs the same classes")
    model = rebuild(teacher_cfg, state)
    log.info("teacher: %s from %s (epoch %s), alpha %g, temperature %g", teacher_cfg.model, path,
             state.get("epoch"), cfg.distill_alpha, cfg.distill_temperature)
    return Teacher(model, get_spec(cfg.model), get_spec(teacher_cfg.model)).to(device)


# --- one epoch, validation, files ----------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, epoch: int, *,
                    device: torch.device = CPU, amp: bool = False,
                    scaler: torch.amp.GradScaler | None = None, teacher: Teacher | None = None,
                    alpha: float = 0.0, temperature: float = 1.0,
                    frozen: list[nn.Parameter] = (), freeze_bn: bool = False,
                    ema: AveragedModel | None = None, progress: bool = True,
                    crack_index: int = 1) -> dict[str, float]:
    """Mean losses of the epoch (over every process): ``loss`` (what was optimised) and, with a
    teacher, ``loss_supervised`` and ``loss_distill``. ``frozen`` parameters are left untouched:
    their gradients are dropped before the optimizer step (the backward pass still runs through
    them, so a DDP run keeps the same gradient buckets throughout). ``freeze_bn`` keeps batch
    norm statistics fixed. ``ema``, when given, is updated from the model after every step."""
    model.train()
    if freeze_bn:
        freeze_batch_norm(model)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, supervised, distill, images
    for images, masks in tqdm(loader, desc=f"epoch {epoch}", leave=False,
                              disable=None if progress else True):
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            teacher_logits = teacher(images) if teacher is not None and alpha > 0 else None
        supervised = loss_fn(logits.float(), masks)
        # a binary teacher knows only crack and background: its lesson holds where the label
        # is one of the two (never on a joint or a stain it would call crack)
        keep = ((masks == 0) | (masks == crack_index)) if masks.dim() == 3 else None
        distill = (distillation_loss(logits.float(), teacher_logits.float(), temperature,
                                     crack_index, keep)
                   if teacher_logits is not None else torch.zeros((), device=device))
        loss = (1 - alpha) * supervised + alpha * distill if teacher is not None else supervised
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for param in frozen:
            param.grad = None  # optimizers skip a parameter without a gradient
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model.module if isinstance(model, DistributedDataParallel)
                                  else model)
        n = len(images)
        sums += torch.tensor([loss.item() * n, supervised.item() * n, distill.item() * n, n],
                             dtype=torch.float64)
    if dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    loss_sum, supervised_sum, distill_sum, count = sums.tolist()
    means = {"loss": loss_sum / max(count, 1)}
    if teacher is not None:
        means |= {"loss_supervised": supervised_sum / max(count, 1),
                  "loss_distill": distill_sum / max(count, 1)}
    return means


def build_ema(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    """The moving average of ``model``'s weights that ``cfg.ema_decay`` asks for, or None. Its
    first update copies the model, so it starts from whatever the model holds then (initial,
    fine-tuned or resumed weights). Batch-norm statistics are not averaged but copied from the
    model at each update (with ``freeze_bn`` they are fixed, so the average is exact)."""
    if cfg.ema_decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))


# --- validation: the model in memory, segmented as the pipeline segments -----------------------

def model_segmenter(model: nn.Module, info: ModelInfo, tile: int = 0) -> Segmenter:
    """``model`` (in memory, on its own device) behind the Segmenter interface, as
    ``inference.backends.open_segmenter`` opens a checkpoint: the PyTorch backend, in fitted
    tiles of at most ``tile`` px with the pipeline's overlap where an image is larger (0: never).
    Tiles run one at a time, so validation needs no more memory than one tile's pass."""
    segmenter = TorchSegmenter.from_model(model, info, max_batch=1)
    if not tile:
        return segmenter
    return TiledSegmenter(segmenter, tile=tile, overlap=DEFAULT_OVERLAP, max_batch=1, fit=True)


def predict(model, image: np.ndarray, mean, std, multiple: int, crack_channel: int = 0,
            tile: int = 0) -> np.ndarray:
    """Crack probability (HxW float32) of one RGB image with the PyTorch model: the sigmoid of a
    binary model's one channel, the softmax probability of ``crack_channel`` of a multi-class
    model (``crack_channel`` is not used for a binary model). An image larger than ``tile`` px
    (either side; 0: never) is segmented in fitted tiles and stitched (``model_segmenter``)."""
    # the segmenter finds the crack channel by name: "crack" at ``crack_channel``
    classes = tuple("crack" if i == crack_channel else "background" if i == 0 else f"class {i}"
                    for i in range(crack_channel + 1))
    info = in_memory_info("model", mean, std, multiple, classes)
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # segmenters take OpenCV's colour order
    return split_map(model_segmenter(model, info, tile).segment([bgr])[0])[0]


def validate(model, val_pairs, val_sets: list[str], spec: ModelSpec, cfg: TrainConfig,
             crack_class: int, sweep: bool = False) -> dict:
    """Scores of the model on the validation pairs (``val_sets``: each pair's folder name): the
    pooled summary, per-folder summaries under ``sets``, the balanced ODS, and ``score``, the
    value ``cfg.select_by`` names. The threshold is swept when ``sweep`` is set or the score
    needs it. ``crack_class``: the crack label in the masks (``crack_label``)."""
    info = in_memory_info(cfg.model, spec.mean, spec.std, spec.size_multiple,
                          tuple(cfg.classes), cfg.threshold)
    segmenter = model_segmenter(model, info, cfg.val_tile)
    evaluator = SetEvaluator(cfg.tolerance, cfg.threshold, sweep=sweep or cfg.select_by != "f1")
    for (image, mask), name in zip(val_pairs, val_sets, strict=True):
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        evaluator.add(name, split_map(segmenter.segment([bgr])[0])[0], mask == crack_class)
    val = evaluator.summary()
    val["score"] = val[cfg.select_by]
    val["default_threshold"] = (evaluator.best_balanced_threshold()
                                if cfg.select_by == "balanced_ods"
                                else evaluator.pooled().best_threshold())
    return val


def swept_scores(val: dict, cfg: TrainConfig) -> dict:
    """What an epoch's history keeps of a swept validation: ODS, balanced ODS, and each
    folder's F1 at the balanced threshold. Nothing when ``select_by`` needs no sweep."""
    if cfg.select_by == "f1" or "sets" not in val:
        return {}
    return {"val_ods": val["ods"], "val_balanced_ods": val["balanced_ods"],
            "val_balanced_threshold": val["balanced_ods_threshold"],
            "val_sets_f1": {name: scores["f1_at_balanced"] for name, scores in val["sets"].items()}}


def calibrate_threshold(model, best: Path, val_pairs, val_sets: list[str], spec,
                        cfg: TrainConfig, crack_class: int, report: Path | None = None) -> dict:
    """Score the best checkpoint on the validation split over the threshold sweep and keep the
    result (with its default threshold: the best pooled one, or the best balanced one when
    ``select_by`` is "balanced_ods") in the checkpoint: export makes that threshold the model's
    default. The threshold is chosen on validation images only, never on test images. The
    report goes to ``report`` (default: ``val_report.json`` beside the checkpoint)."""
    state = read_checkpoint(best)
    model.load_state_dict(state["model"])
    val = validate(model, val_pairs, val_sets, spec, cfg, crack_class, sweep=True)
    state["metrics"]["val"] = val
    torch.save(state, best)
    (report or best.parent / "val_report.json").write_text(json.dumps(
        {"checkpoint": best.name, "epoch": state["epoch"], **val}, indent=2))
    log.info("%s (epoch %d) on validation: ODS F1@%gpx %.4f at threshold %.2f, "
             "OIS %.4f, balanced ODS %.4f at %.2f; default threshold %.2f", best, state["epoch"],
             cfg.tolerance, val["ods"], val["ods_threshold"], val["ois"], val["balanced_ods"],
             val["balanced_ods_threshold"], val["default_threshold"])
    for name, scores in val["sets"].items():
        log.info("  %s: %d images, F1@%gpx %.4f at the balanced threshold, ODS %.4f", name,
                 scores["images"], cfg.tolerance, scores["f1_at_balanced"], scores["ods"])
    return val


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation F1 / IoU (and ODS, balanced ODS when swept) per epoch, as
    a PNG."""
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, score_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [h["loss"] for h in history], "o-", label="loss")
    if "loss_distill" in history[-1]:
        for key in ("loss_supervised", "loss_distill"):
            loss_axes.plot(epochs, [h.get(key, math.nan) for h in history], ".--", label=key)
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="loss")
    loss_axes.legend()
    score_axes.plot(epochs, [h["val_f1"] for h in history], "o-", label="validation F1")
    score_axes.plot(epochs, [h["val_iou"] for h in history], "s--", label="validation IoU")
    for key, label in (("val_ods", "validation ODS"), ("val_balanced_ods", "balanced ODS")):
        if key in history[-1]:
            score_axes.plot(epochs, [h.get(key, math.nan) for h in history], ".-", label=label)
    score_axes.set(xlabel="epoch", ylim=(0, 1), title="validation")
    score_axes.legend()
    for axes in (loss_axes, score_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path, dpi=80)


# --- the run ---------------------------------------------------------------------------------

def main(cfg: TrainConfig, resume: Path | None = None) -> dict:
    rank, world, device = start_processes(cfg)
    try:
        return run(cfg, resume, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: TrainConfig, resume: Path | None, rank: int, world: int,
        device: torch.device) -> dict:
    """The training run of one process (of ``world``); rank 0 validates and writes the files."""
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    spec = get_spec(cfg.model)
    get_loss(cfg.loss, cfg.num_classes,  # a bad loss name fails before anything is loaded
             [1.0] * max(2, cfg.num_classes) if cfg.class_weights else None)
    writer = rank == 0
    if writer:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))

    train_samples, val_samples = load_folders(cfg)
    train_pairs = [ds.load_pair(s, cfg.num_classes, cfg.crack_label) for s in train_samples]
    val_pairs = [ds.load_pair(s, cfg.num_classes, cfg.crack_label) for s in val_samples]
    loss_fn = get_loss(cfg.loss, cfg.num_classes,
                       resolve_class_weights(cfg, [m for _, m in train_pairs]), cfg.crack_label)
    crops = CrackCrops(train_pairs, crop_for_epoch(cfg, 1), spec.mean, spec.std, cfg.seed + rank,
                       cfg)
    loader, sampler = make_loader(cfg, crops, rank, world, device,
                                  [sample.dataset for sample in train_samples])

    model = build_model(cfg.model, num_classes=cfg.num_classes, **cfg.model_params)
    if cfg.encoder_weights:
        loaded = load_encoder_weights(model, cfg.encoder_weights)
        log.info("encoder weights: %d of %d encoder tensors from %s", loaded,
                 len(model.encoder.state_dict()), cfg.encoder_weights)
    if cfg.init_from:
        log.info("initial weights: %s", init_weights(model, cfg, spec))
    model.to(device)
    ema = build_ema(cfg, model)
    u2pl = unlabeled = None
    if cfg.semi == "u2pl":  # the student's moving average teaches it on unlabelled images
        semi.check(cfg)
        unlabeled_crops = semi.UnlabeledCrops(semi.unlabeled_images(cfg.unlabeled), crops.crop,
                                              spec.mean, spec.std, cfg.seed + 7919 + rank)
        unlabeled = semi.make_unlabeled_loader(cfg, unlabeled_crops, rank, world)
        ema.update_parameters(model)  # the teacher starts as the student
        u2pl = semi.U2PL(cfg, model, ema.module, device)
        log.info("U2PL: %d unlabelled images, contrast %s", len(unlabeled_crops), cfg.contrast)
    optimizer = build_optimizer(cfg, model)
    if u2pl is not None and u2pl.parameters():  # the projection head learns with the student
        optimizer.add_param_group({"params": u2pl.parameters(), "lr": cfg.lr})
    scheduler = build_scheduler(cfg, optimizer, cfg.epochs * max(len(loader), 1))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    teacher = load_teacher(cfg.teacher, cfg, device) if cfg.teacher else None
    first_group = param_groups(model)[0] if cfg.freeze_first_group_fraction > 0 else []
    validated = ema.module if ema is not None else model  # the weights best.pt keeps
    start_epoch, history = 1, []
    if resume:
        start_epoch, history = restore(resume, model, optimizer, scheduler, scaler, device, ema)
    # older histories have no val_score: they were selected by val_f1
    best_score = max((h.get("val_score", h["val_f1"]) for h in history), default=-1.0)
    val_sets = [sample.dataset for sample in val_samples]
    trained = (DistributedDataParallel(model, device_ids=None if device.index is None
                                       else [device.index]) if world > 1 else model)

    started, epochs_done = time.monotonic(), len(history)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if crop_for_epoch(cfg, epoch) != crops.crop or epoch == start_epoch:
            crops.crop = crop_for_epoch(cfg, epoch)
            log.info("epoch %d: %d px crops", epoch, crops.crop)
        frozen = first_group if first_group_frozen(cfg, epoch) else []
        if first_group and (epoch == start_epoch
                            or first_group_frozen(cfg, epoch - 1) != bool(frozen)):
            log.info("epoch %d: first layer group %s", epoch, "frozen" if frozen else "trained")
        if sampler is not None:
            sampler.set_epoch(epoch)
        if u2pl is not None:
            unlabeled.dataset.crop = crops.crop
            losses = semi.train_one_epoch_u2pl(
                trained, loader, unlabeled, optimizer, scheduler, loss_fn, epoch,
                (epoch - 1) * len(loader), cfg.epochs * len(loader), u2pl, ema, device=device,
                freeze_bn=cfg.freeze_bn, progress=writer)
        else:
            losses = train_one_epoch(trained, loader, optimizer, scheduler, loss_fn, epoch,
                                     device=device, amp=cfg.amp, scaler=scaler, teacher=teacher,
                                     alpha=cfg.distill_alpha,
                                     temperature=cfg.distill_temperature, frozen=frozen,
                                     freeze_bn=cfg.freeze_bn, ema=ema, progress=writer,
                                     crack_index=cfg.crack_label)
        stop = bool(cfg.max_minutes and (time.monotonic() - started) / 60 >= cfg.max_minutes)
        if writer:
            val = (validate(validated, val_pairs, val_sets, spec, cfg, cfg.crack_label)
                   if val_pairs else {"f1": math.nan, "iou": math.nan, "score": math.nan})
            history.append({"epoch": epoch, **losses, "val_f1": val["f1"], "val_iou": val["iou"],
                            "val_score": val["score"], **swept_scores(val, cfg),
                            "crop": crops.crop, "first_group_frozen": bool(frozen),
                            "minutes": (time.monotonic() - started) / 60})
            log.info("epoch %d/%d  loss %.4f  val F1@%gpx %.4f  IoU %.4f%s  (%.1f min)", epoch,
                     cfg.epochs, losses["loss"], cfg.tolerance, val["f1"], val["iou"],
                     "".join(f"  {k.removeprefix('val_')} {v:.4f}" for k, v in history[-1].items()
                             if k in ("val_ods", "val_balanced_ods")), history[-1]["minutes"])
            metrics = {"history": history, "val": val}
            save_checkpoint(cfg.out / "last.pt", model, optimizer, scheduler, epoch, cfg, metrics,
                            scaler, ema)
            if val["score"] > best_score:
                best_score = val["score"]
                save_checkpoint(cfg.out / "best.pt", validated, optimizer, scheduler, epoch, cfg,
                                metrics, scaler)
            (cfg.out / "history.json").write_text(json.dumps(history, indent=2))
            plot_curves(history, cfg.out / "curves.png")
        # every process stops together, and returns rank 0's numbers
        stop_flag, best_score, epochs_done = from_rank0(float(stop), best_score, len(history))
        if stop_flag:
            log.info("stopping after %.1f minutes (max_minutes)", cfg.max_minutes)
            break
    result = {"select_by": cfg.select_by, "ema": ema is not None, "best_val_score": best_score,
              "epochs": int(epochs_done), "out": str(cfg.out)}
    if writer:
        chosen = [h for h in history if h.get("val_score", h["val_f1"]) == best_score]
        result.update(best_epoch=chosen[0]["epoch"] if chosen else None,
                      best_val_f1=chosen[0]["val_f1"] if chosen else math.nan)
    if writer and val_pairs and (cfg.out / "best.pt").is_file():
        val = calibrate_threshold(model, cfg.out / "best.pt", val_pairs, val_sets, spec, cfg,
                                  cfg.crack_label)
        result.update(val_ods=val["ods"], val_ods_threshold=val["ods_threshold"],
                      val_balanced_ods=val["balanced_ods"],
                      default_threshold=val["default_threshold"])
    return result
