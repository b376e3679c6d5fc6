"""Training configuration: one flat, validated model of a recipe YAML (``configs/train/``).

Every field has a default equal to the behaviour of the first recipe (``mobilenet_aspp.yaml``), so
older recipes and the configs stored inside older checkpoints load unchanged. A recipe is one
file: there is no inheritance between recipes, and nothing here names code to be looked up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "mobilenet_aspp"
    model_params: dict = Field(default_factory=dict)
    encoder_weights: Path | None = None  # a local torchvision-style checkpoint; never downloaded
    # fine-tune from a whole model: a crackscan checkpoint (.pt) or an exported crackscan ONNX
    # model (.onnx, batch norm folded: needs freeze_bn) of the same architecture
    init_from: Path | None = None
    # batch norm in eval mode while training: statistics fixed, scale and shift still learn
    freeze_bn: bool = False
    # names of the output channels. One name: binary (one sigmoid channel, masks 0/255). More:
    # multi-class (one softmax channel per name, masks hold the class index, see training.data);
    # validation then scores the channel named "crack"
    classes: list[str] = Field(default_factory=lambda: ["crack"], min_length=1)
    data: list[Path] = Field(default_factory=list)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    crop: int = Field(256, ge=32)
    # progressive resizing: [[fraction of training, crop], ...], the first starting at 0; an epoch
    # uses the last entry whose fraction (epoch - 1) / epochs has reached. None: ``crop`` throughout
    crop_schedule: list[tuple[float, int]] | None = None
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(30, ge=1)
    # training crops per epoch: the training images cycled (each as often as the others, +-1) to
    # this many, so a run on few labelled images still takes as many steps as it is given, and
    # validates once per that many crops; None: each image once
    epoch_images: int | None = Field(None, ge=1)
    max_minutes: float | None = Field(None, gt=0)  # stop early after this wall-clock budget

    # optimisation
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD's momentum (the one-cycle peak with SGD)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    # per batch: one_cycle (warm-up, then cosine down), poly (lr * (1 - step / steps) ** 0.9)
    # or constant
    schedule: Literal["one_cycle", "poly", "constant"] = "one_cycle"
    pct_start: float = Field(0.1, gt=0, lt=1)  # one-cycle: fraction of the steps spent warming up
    # exponential moving average of the weights (Polyak averaging), updated after every optimizer
    # step: w_ema <- decay * w_ema + (1 - decay) * w. Validation scores the averaged weights and
    # best.pt holds them (last.pt keeps both, so --resume continues both). Its horizon is about
    # 1 / (1 - decay) steps: 0.998 averages the last ~500 batches. None: off
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # learning-rate ratios of the model's three layer groups (early encoder, late encoder,
    # decoder + head), times ``lr``; None: one group at ``lr``
    lr_groups: tuple[float, float, float] | None = None
    # the first layer group is not updated while (epoch - 1) / epochs < this fraction
    freeze_first_group_fraction: float = Field(0.0, ge=0, le=1)

    # loss
    loss: str = "bce_dice"
    # per-class weights of weighted_ce / ce_dice (background first; two for a binary model), or
    # "median_frequency": computed from the training masks (Eigen & Fergus 2015)
    class_weights: list[float] | Literal["median_frequency"] | None = None
    # knowledge distillation: a training checkpoint whose model (its own config says which) is the
    # frozen teacher; loss = (1 - alpha) * supervised + alpha * T^2 * distillation at temperature T.
    # A multi-class student may also have a binary crackscan ONNX model of its architecture as
    # teacher: it teaches the crack channel (learning without forgetting)
    teacher: Path | None = None
    distill_alpha: float = Field(0.5, ge=0, le=1)
    distill_temperature: float = Field(2.0, gt=0)

    # augmentation on top of the default crop, flips, 90-degree turns and lighting
    max_rotation: float = Field(0.0, ge=0, le=180)  # degrees, uniform in +-this; 180: any angle
    elastic_sigma: float = Field(0.0, ge=0)  # px, std of the coarse-grid displacements; 0: off
    elastic_grid: int = Field(3, ge=2)  # control points per side (Ronneberger et al.: 3x3)
    border: Literal["reflect", "constant"] = "reflect"  # how crops, turns and warps fill edges
    # zoom factor range, drawn log-uniformly per crop ([0.6, 1.5]: cracks 0.6-1.5x as wide in
    # pixels, as seen by cameras of other resolutions); None: no zoom
    scale_range: tuple[float, float] | None = None
    # photometric: contrast factor range, and a gamma range drawn log-uniformly for half the
    # crops ([0.5, 2.0]: exposures from washed-out to dark, as laser-lit line-scan images are);
    # None: no gamma
    contrast_range: tuple[float, float] = (0.7, 1.3)
    gamma_range: tuple[float, float] | None = None
    # hard negatives: the share of training crops that get 1-2 tunnel-lining features (joints,
    # stains, holes, spalling, cables, paint, scratches) drawn on them (training.lining
    # .paste_distractors); a binary model learns them as background; 0: off
    distractor_p: float = Field(0.0, ge=0, le=1)
    # how often each --data folder is drawn: "proportional" to its training images (plain
    # shuffling), "sqrt" (to the square root: small sets count more) or "balanced" (equally)
    sampling: Literal["proportional", "sqrt", "balanced"] = "proportional"

    # semi-supervised training (training.semi): "u2pl" learns from the unlabelled images of
    # ``unlabeled`` too (a student and its ema_decay moving average as teacher, reliable
    # pseudo-labels, unreliable pixels as negatives); "none": labelled images only
    semi: Literal["none", "u2pl"] = "none"
    unlabeled: list[Path] = Field(default_factory=list)  # folders of images (or their images/)
    unlabeled_weight: float = Field(1.0, ge=0)  # the unsupervised loss's weight (U2PL: 1)
    # the share of the training steps that learn from the labelled images only (U2PL: its first
    # epoch); where it ends the teacher starts again as a copy of the student, as U2PL's does, so
    # the pseudo-labels come from a model that has learned the labels, not from the start
    supervised_warmup: float = Field(0.0, ge=0, lt=1)
    # alpha_0: the share of the most uncertain pixels that are no pseudo-labels at the start,
    # falling linearly to 0 at the end (U2PL: 0.2)
    unreliable_start: float = Field(0.2, ge=0, lt=1)
    # unreliable pixels as negatives: "full" (U2PL's contrastive term with a memory bank),
    # "light" (negative learning on the teacher's mid-ranked classes), "none"
    contrast: Literal["full", "light", "none"] = "full"
    contrast_weight: float = Field(0.1, ge=0)  # U2PL: 0.1
    negative_ranks: tuple[int, int] = (2, 20)  # teacher ranks (1 = most likely) of negatives
    anchors: int = Field(50, ge=1)  # anchor pixels per class and step
    anchor_below: float = Field(0.3, gt=0, le=1)  # an anchor's class probability is below this
    negatives: int = Field(256, ge=1)  # negatives per class and step, from the memory bank
    memory: int = Field(2000, ge=1)  # negative embeddings kept per class
    temperature: float = Field(0.5, gt=0)  # of the contrastive loss

    tolerance: float = Field(2.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)
    # validation images larger than this (px, either side) are scored in fitted tiles of at most
    # this size, overlapping by 64 px, as the pipeline segments by default (inference.tile); 0:
    # whole images
    val_tile: int = Field(512, ge=0)
    # the validation score that picks best.pt, all at ``tolerance``: "f1", pooled over the
    # validation images at ``threshold``; "ods", pooled at the best swept threshold (a model whose
    # calibration drifts between epochs is not judged at a threshold it has left); "balanced_ods",
    # the mean of the validation folders' F1 at one swept threshold, the best one, each folder
    # counting once (pooled counts are ruled by the sets with the most crack pixels). With
    # "balanced_ods" the exported default threshold is that threshold too.
    select_by: Literal["f1", "ods", "balanced_ods"] = "f1"
    seed: int = 0
    num_threads: int = Field(0, ge=0)  # 0: torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when there is one
    amp: bool = False  # autocast: bfloat16 on CPU, float16 with a gradient scaler on CUDA
    out: Path = Path("runs/train")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if len(self.classes) > 1 and "crack" not in self.classes:
            raise ValueError(f"classes {self.classes} has no 'crack': validation scores the "
                             "channel named 'crack'")
        if not 1 <= self.negative_ranks[0] <= self.negative_ranks[1]:
            raise ValueError(f"negative_ranks must be [low, high] with 1 <= low <= high: "
                             f"{self.negative_ranks}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes {self.classes} names a class twice")
        if self.crop_schedule is not None:
            starts = [start for start, _ in self.crop_schedule]
            if not starts or starts[0] != 0 or starts != sorted(starts) or starts[-1] >= 1:
                raise ValueError("crop_schedule must start at fraction 0 and rise below 1, "
                                 f"e.g. [[0, 128], [0.33, 256], [0.66, 320]]; got "
                                 f"{self.crop_schedule}")
            if min(crop for _, crop in self.crop_schedule) < 32:
                raise ValueError(f"crop_schedule crops must be at least 32: {self.crop_schedule}")
        if isinstance(self.class_weights, list):
            if len(self.class_weights) != max(2, len(self.classes)):
                raise ValueError(f"class_weights needs {max(2, len(self.classes))} values "
                                 "(background first for a binary model), got "
                                 f"{len(self.class_weights)}")
            if min(self.class_weights) < 0:
                raise ValueError(f"class_weights must not be negative: {self.class_weights}")
        if self.scale_range is not None and not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high: "
                             f"{self.scale_range}")
        for name in ("contrast_range", "gamma_range"):
            low_high = getattr(self, name)
            if low_high is not None and not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high: {low_high}")
        if self.init_from is not None and self.init_from.suffix == ".onnx" and not self.freeze_bn:
            raise ValueError(f"init_from {self.init_from}: an ONNX model has its batch norms "
                             "folded into the convolutions, so fine-tuning it needs "
                             "freeze_bn: true")
        if self.distractor_p and len(self.classes) > 1:
            from training.lining import CLASSES as LINING_CLASSES

            if tuple(self.classes) != LINING_CLASSES:
                raise ValueError(f"distractor_p pastes lining features labelled with the lining "
                                 f"classes {list(LINING_CLASSES)}: a multi-class recipe that "
                                 f"uses it lists them, in that order (not {self.classes})")
        if any(r <= 0 for r in self.lr_groups or ()):
            raise ValueError(f"lr_groups ratios must be positive: {self.lr_groups}")
        return self

    @property
    def num_classes(self) -> int:
        """Output channels of the model: 1 for a binary model, else one per class."""
        return len(self.classes)

    @property
    def crack_label(self) -> int:
        """The crack label value in the masks: 1 in binary masks, its class index otherwise."""
        return 1 if self.num_classes == 1 else self.classes.index("crack")


def load_config(path: Path | None, **overrides) -> TrainConfig:
    raw = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a training config must be a mapping of keys to values")
    raw.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
    return TrainConfig(**raw)
