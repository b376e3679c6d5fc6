"""Semi-supervised training with unlabelled frames: U2PL (Wang et al., CVPR 2022, "Using
Unreliable Pseudo-Labels"), the method of the semi-automatic crack annotation study.

Each step takes a labelled batch and an unlabelled one:

- the **teacher** is the exponential moving average of the student (``ema_decay``; the
  averaged weights are also what validation scores and ``best.pt`` keeps). It segments the
  unlabelled crops as they are (*weak* view: crop and flips only); its argmax is the pseudo-label;
- a pixel is **reliable** when the entropy of the teacher's class probabilities is below the
  batch's (1 - alpha_t) quantile, alpha_t = ``unreliable_start`` x (1 - progress): at first the
  20 % most uncertain pixels are left out of the pseudo-labels, at the end none;
- the **student** segments the *strong* view of the same crops (the weak view, then brightness,
  contrast, blur, noise and a cut-out box, whose pixels carry no pseudo-label), and learns from
  the reliable pseudo-labels with the recipe's loss (CE + Dice), weight ``unlabeled_weight``
  (1: supervised and unsupervised count the same);
- **unreliable pixels as negatives** (``contrast``):
  ``full``: U2PL's contrastive term. A projection head (two 1x1 convolutions to 64 dimensions,
  trained with the student, its teacher copy averaged like the teacher) embeds the features
  that enter the model's last classifier. For each class c: anchors are up to ``anchors``
  student embeddings of pixels labelled c (ground truth or reliable pseudo-label) that the
  student is not yet sure of (p_c < ``anchor_below``); the positive is the mean teacher
  embedding of the class's pixels; negatives come from a memory bank per class (``memory``
  teacher embeddings, first in first out) fed with pixels that are not c: labelled ones, and
  unreliable ones whose teacher ranks c between ``negative_ranks`` (likely enough to confuse,
  not the answer). InfoNCE at temperature ``temperature``, weight ``contrast_weight`` (0.1 in
  U2PL).
  ``light``: no embedding, no bank: the student's probability of each class the teacher ranks
  between ``negative_ranks`` at an unreliable pixel is pushed down (-log(1 - p)), weight
  ``contrast_weight``. Much cheaper on a 2-core CPU; docs/training.md says how the two compare.
  ``none``: unreliable pixels are only left out.

A binary model (one sigmoid channel) is treated as two classes, background and crack, here.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training import data as ds
from training.config import TrainConfig

EMBED_DIM = 64


# --- unlabelled crops: a weak and a strong view ------------------------------------------------

def unlabeled_images(folders: list[Path]) -> list[Path]:
    """Every image of the unlabelled folders: their ``images/`` when they have one (a dataset
    or a ``crackscan select`` folder), else the folder itself, else its sub-folders (the camera
    folders of a ``--record`` recording)."""
    found = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ds.DatasetError(f"--unlabeled {folder}: no such folder")
        where = folder / "images" if (folder / "images").is_dir() else folder
        images = _images_in(where) or [image for sub in sorted(where.iterdir()) if sub.is_dir()
                                        for image in _images_in(sub)]
        if not images:
            raise ds.DatasetError(f"--unlabeled {folder}: no images in it or its sub-folders")
        found += images
    return found


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in ds.IMAGE_SUFFIXES)


def strong_view(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The strong augmentation of a weak crop (HxWx3 uint8): photometric changes that move no
    pixel, and a cut-out box; returns the image and the mask of pixels still valid."""
    out = image.astype(np.float32)
    out = (out - out.mean()) * rng.uniform(0.6, 1.4) + out.mean() + rng.uniform(-30, 30)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 1.5))
    out += rng.normal(0, rng.uniform(0, 8), out.shape)
    valid = np.ones(image.shape[:2], bool)
    if rng.random() < 0.5:
        h, w = image.shape[:2]
        bh, bw = int(h * rng.uniform(0.2, 0.5)), int(w * rng.uniform(0.2, 0.5))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out[y:y + bh, x:x + bw] = image.reshape(-1, 3).mean(0)
        valid[y:y + bh, x:x + bw] = False
    return np.clip(out, 0, 255).astype(np.uint8), valid


class UnlabeledCrops(torch.utils.data.Dataset):
    """Random crops of unlabelled images as (weak, strong, valid): the two normalised views
    (3xHxW float) of one crop and the strong view's valid pixels (HxW bool)."""

    def __init__(self, paths: list[Path], crop: int, mean, std, seed: int) -> None:
        self.paths, self.crop, self.mean, self.std = paths, crop, mean, std
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = ds.load_image(self.paths[index])
        blank = np.zeros(image.shape[:2], np.uint8)
        image, _ = ds.random_crop(image, blank, self.crop, self.rng)
        image, _ = ds.flip_and_turn(image, blank[:image.shape[0], :image.shape[1]], self.rng)
        strong, valid = strong_view(image, self.rng)
        return (torch.from_numpy(ds.normalize(image, self.mean, self.std)),
                torch.from_numpy(ds.normalize(strong, self.mean, self.std)),
                torch.from_numpy(valid))


def make_unlabeled_loader(cfg: TrainConfig, crops: UnlabeledCrops, rank: int, world: int):
    sampler = (torch.utils.data.DistributedSampler(crops, world, rank, shuffle=True,
                                                   seed=cfg.seed) if world > 1 else None)
    return torch.utils.data.DataLoader(crops, batch_size=cfg.batch_size, shuffle=sampler is None,
                                       sampler=sampler, drop_last=len(crops) > cfg.batch_size)


# --- pseudo-labels and their losses ------------------------------------------------------------

def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """N x C x H x W probabilities; a binary model's one logit as (background, crack)."""
    if logits.shape[1] == 1:
        crack = torch.sigmoid(logits)
        return torch.cat([1 - crack, crack], dim=1)
    return torch.softmax(logits, dim=1)


def unreliable_share(cfg: TrainConfig, progress: float) -> float:
    """alpha_t: the share of pixels too uncertain to be pseudo-labels at this point of training
    (``progress`` 0..1)."""
    return cfg.unreliable_start * (1.0 - min(max(progress, 0.0), 1.0))


def pseudo_labels(teacher_probs: torch.Tensor, valid: torch.Tensor, share: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pseudo-label N x H x W, reliable N x H x W, entropy): the teacher's argmax; reliable
    where valid and the entropy is below the valid pixels' (1 - share) quantile."""
    entropy = -(teacher_probs * torch.log(teacher_probs.clamp_min(1e-8))).sum(1)
    labels = teacher_probs.argmax(1)
    reliable = valid.clone()
    if share > 0 and valid.any():
        values = entropy[valid]
        if values.numel() > 1_000_000:  # torch.quantile's limit: a fair sample is enough
            values = values[torch.randperm(values.numel(), device=values.device)[:1_000_000]]
        cut = torch.quantile(values.float(), 1.0 - share)
        reliable &= entropy < cut
    return labels, reliable, entropy


def masked_ce_dice(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor
                   ) -> torch.Tensor:
    """Cross-entropy + soft Dice over the kept pixels only (0 when none is kept)."""
    if not keep.any():
        return logits.sum() * 0
    weight = keep.to(logits.dtype)
    if logits.shape[1] == 1:
        target = labels.unsqueeze(1).to(logits.dtype)
        ce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none")
              * weight.unsqueeze(1)).sum() / weight.sum()
        prob, onehot = torch.sigmoid(logits), target
    else:
        ce = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum()
        prob = torch.softmax(logits, dim=1)
        onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    w = weight.unsqueeze(1)
    intersection = (prob * onehot * w).sum((0, 2, 3))
    total = (prob * w).sum((0, 2, 3)) + (onehot * w).sum((0, 2, 3))
    dice = (1 - (2 * intersection + 1) / (total + 1)).mean()
    return ce + dice


def rank_window(probs: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
    """N x C x H x W: whether each class's rank (1 = most likely) lies in ``ranks`` (clamped to
    the classes there are, so a two-class model's window is its second class)."""
    classes = probs.shape[1]
    low, high = min(ranks[0], classes), min(ranks[1], classes)
    order = probs.argsort(dim=1, descending=True).argsort(dim=1) + 1  # rank of each class
    return (order >= low) & (order <= high)


def negative_learning(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                      unreliable: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
    """The light form: at unreliable pixels, -log(1 - p_student(c)) for the classes c the
    teacher ranks within ``ranks``."""
    negatives = rank_window(teacher_probs, ranks) & unreliable.unsqueeze(1)
    if not negatives.any():
        return student_probs.sum() * 0
    return -torch.log((1 - student_probs).clamp_min(1e-6))[negatives].mean()


class ProjectionHead(nn.Module):
    """Two 1x1 convolutions from the classifier's input features to unit EMBED_DIM vectors."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, EMBED_DIM, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(EMBED_DIM, EMBED_DIM, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)


def classifier_of(model: nn.Module, num_outputs: int) -> nn.Conv2d:
    """The model's last convolution with the output channels: its input is what is embedded."""
    found = [m for m in model.modules() if isinstance(m, nn.Conv2d)
             and m.out_channels == num_outputs]
    if not found:
        raise ValueError(f"no classifier convolution with {num_outputs} outputs in the model")
    return found[-1]


class FeatureTap:
    """Keeps the input of a module on every forward call (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.features: torch.Tensor | None = None
        module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = inputs[0]


class MemoryBank:
    """Per class, the last ``size`` negative embeddings (first in, first out)."""

    def __init__(self, classes: int, size: int) -> None:
        self.size = size
        self.banks = [torch.zeros(0, EMBED_DIM) for _ in range(classes)]

    def add(self, c: int, embeddings: torch.Tensor) -> None:
        self.banks[c] = torch.cat([embeddings.detach().float().cpu(), self.banks[c]])[:self.size]

    def sample(self, c: int, count: int, generator: torch.Generator) -> torch.Tensor:
        bank = self.banks[c]
        if len(bank) <= count:
            return bank
        return bank[torch.randperm(len(bank), generator=generator)[:count]]


def u2pl_contrast(student_embed: torch.Tensor, teacher_embed: torch.Tensor,
                  labels: torch.Tensor, known: torch.Tensor, student_probs: torch.Tensor,
                  negatives_of: torch.Tensor, bank: MemoryBank, cfg: TrainConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """U2PL's contrastive term at embedding resolution: ``labels`` (N x h x w) where ``known``
    (ground truth or reliable), ``negatives_of`` (N x C x h x w: pixels that are negatives for
    each class), the student's probabilities for the anchors' doubt."""
    classes = student_probs.shape[1]
    s = student_embed.permute(0, 2, 3, 1)  # N h w D
    t = teacher_embed.permute(0, 2, 3, 1)
    losses = []
    for c in range(classes):
        members = known & (labels == c)
        bank.add(c, t[negatives_of[:, c]][:cfg.memory])
        if not members.any():
            continue
        positive = F.normalize(t[members].mean(0), dim=0)
        doubtful = members & (student_probs[:, c] < cfg.anchor_below)
        pool = s[doubtful] if doubtful.any() else s[members]
        anchors = pool[torch.randperm(len(pool), generator=generator)[:cfg.anchors]
                       .to(pool.device)]
        negatives = bank.sample(c, cfg.negatives, generator).to(anchors.device)
        if len(negatives) == 0:
            continue
        logits = torch.cat([(anchors @ positive).unsqueeze(1), anchors @ negatives.T], dim=1)
        target = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
        losses.append(F.cross_entropy(logits / cfg.temperature, target))
    return torch.stack(losses).mean() if losses else student_embed.sum() * 0


def _resized(tensor: torch.Tensor, size: tuple[int, int], labels: bool = False) -> torch.Tensor:
    if tensor.shape[-2:] == size:
        return tensor
    if labels:  # N x h x w integer or bool: nearest
        return F.interpolate(tensor[:, None].float(), size=size, mode="nearest")[:, 0].to(
            tensor.dtype)
    return F.interpolate(tensor.float(), size=size, mode="bilinear", align_corners=False)


# --- one epoch ---------------------------------------------------------------------------------

class U2PL:
    """What the U2PL steps share across the run: the student's feature tap and projection head,
    their teacher copies, the memory bank."""

    def __init__(self, cfg: TrainConfig, student: nn.Module, teacher: nn.Module,
                 device: torch.device) -> None:
        self.cfg = cfg
        outputs = max(1, cfg.num_classes)
        self.classes = max(2, cfg.num_classes)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.head = self.teacher_head = None
        if cfg.contrast == "full":
            classifier = classifier_of(student, outputs)
            self.student_tap = FeatureTap(classifier)
            self.teacher_tap = FeatureTap(classifier_of(teacher, outputs))
            self.head = ProjectionHead(classifier.in_channels).to(device)
            self.teacher_head = ProjectionHead(classifier.in_channels).to(device)
            self.teacher_head.load_state_dict(self.head.state_dict())
            self.teacher_head.requires_grad_(False)
            self.bank = MemoryBank(self.classes, cfg.memory)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.head is None else list(self.head.parameters())

    @torch.no_grad()
    def update_teacher_head(self) -> None:
        if self.head is not None:
            decay = self.cfg.ema_decay
            for t, s in zip(self.teacher_head.parameters(), self.head.parameters(), strict=True):
                t.mul_(decay).add_(s.detach(), alpha=1 - decay)

    @torch.no_grad()
    def restart_teacher(self, student: nn.Module, teacher: nn.Module) -> None:
        """The teacher (and its projection head) becomes a copy of the student: U2PL's start of
        semi-supervised learning after its supervised warm-up."""
        for t, s in zip(teacher.state_dict().values(), student.state_dict().values(),
                        strict=True):
            t.copy_(s)
        if self.head is not None:
            self.teacher_head.load_state_dict(self.head.state_dict())

    def supervised(self, student: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                   loss_fn) -> dict[str, torch.Tensor]:
        """A warm-up step's losses: the labelled batch only."""
        supervised = loss_fn(student(images), masks)
        zero = supervised.detach() * 0
        return {"loss": supervised, "supervised": supervised, "unsupervised": zero,
                "contrast": zero}

    def losses(self, student: nn.Module, teacher: nn.Module, images: torch.Tensor,
               masks: torch.Tensor, weak: torch.Tensor, strong: torch.Tensor,
               valid: torch.Tensor, loss_fn, share: float) -> dict[str, torch.Tensor]:
        """The step's losses: ``supervised``, ``unsupervised``, ``contrast`` and their sum
        ``loss``; the unlabelled crops enter through ``weak`` (teacher) and ``strong``
        (student)."""
        cfg = self.cfg
        with torch.no_grad():
            teacher.eval()
            teacher_logits = teacher(weak)
            teacher_probs = class_probabilities(teacher_logits)
            teacher_features = (self.teacher_tap.features if self.head is not None else None)
        labels_u, reliable, _ = pseudo_labels(teacher_probs, valid, share)
        both = torch.cat([images, strong])
        logits = student(both)
        logits_l, logits_u = logits[:len(images)], logits[len(images):]
        supervised = loss_fn(logits_l, masks)
        unsupervised = masked_ce_dice(logits_u, labels_u, reliable)
        contrast = logits.sum() * 0
        if cfg.contrast != "none":
            student_probs = class_probabilities(logits)
            unreliable = valid & ~reliable
            if cfg.contrast == "light":
                contrast = negative_learning(student_probs[len(images):], teacher_probs,
                                             unreliable, tuple(cfg.negative_ranks))
            else:
                contrast = self._contrast(student_probs, teacher_probs, teacher_features,
                                          masks, labels_u, reliable, unreliable, weak,
                                          teacher, images)
        total = supervised + cfg.unlabeled_weight * unsupervised + cfg.contrast_weight * contrast
        return {"loss": total, "supervised": supervised, "unsupervised": unsupervised,
                "contrast": contrast}

    def _contrast(self, student_probs, teacher_probs_u, teacher_features_u, masks, labels_u,
                  reliable, unreliable, weak, teacher, images) -> torch.Tensor:
        cfg = self.cfg
        student_embed = self.head(self.student_tap.features)
        size = tuple(student_embed.shape[-2:])
        with torch.no_grad():  # the teacher's view of the labelled crops, for their embeddings
            teacher_logits_l = teacher(images)
            teacher_probs_l = class_probabilities(teacher_logits_l)
            features_l = self.teacher_tap.features
            teacher_embed = self.teacher_head(torch.cat([features_l, teacher_features_u]))
        labels_l = masks[:, 0].long() if masks.dim() == 4 else masks.long()
        labels = _resized(torch.cat([labels_l, labels_u]), size, labels=True)
        known = _resized(torch.cat([torch.ones_like(labels_l, dtype=torch.bool), reliable]),
                         size, labels=True)
        unreliable_all = _resized(torch.cat([torch.zeros_like(labels_l, dtype=torch.bool),
                                             unreliable]), size, labels=True)
        teacher_probs = _resized(torch.cat([teacher_probs_l, teacher_probs_u]), size)
        in_window = rank_window(teacher_probs, tuple(cfg.negative_ranks))
        classes = teacher_probs.shape[1]
        one_hot = F.one_hot(labels.clamp(0, classes - 1), classes).permute(0, 3, 1, 2).bool()
        # negatives of c: known pixels of another class, and unreliable ones whose teacher
        # ranks c within the window (likely enough to confuse, not the answer)
        negatives_of = (known.unsqueeze(1) & ~one_hot & in_window) | (
            unreliable_all.unsqueeze(1) & in_window)
        return u2pl_contrast(student_embed, teacher_embed, labels, known,
                             _resized(student_probs, size), negatives_of, self.bank, cfg,
                             self.generator)


def train_one_epoch_u2pl(model, loader, unlabeled, optimizer, scheduler, loss_fn, epoch: int,
                         steps_done: int, total_steps: int, u2pl: U2PL, ema, *,
                         device: torch.device, freeze_bn: bool = False,
                         progress: bool = True) -> dict[str, float]:
    """One epoch of U2PL: as many steps as the labelled loader has, each with the next
    unlabelled batch (cycled); steps within the supervised warm-up (``supervised_warmup`` of
    ``total_steps``) take the labelled batch only, and the teacher restarts as the student at
    the first step after it. Returns the mean losses (``loss``, ``loss_supervised``,
    ``loss_unsupervised``, ``loss_contrast``) and ``unreliable_share``."""
    from training.onnx_weights import freeze_batch_norm

    model.train()
    if freeze_bn:
        freeze_batch_norm(model)
    teacher = ema.module
    student = model.module if isinstance(model, DistributedDataParallel) else model
    sums = torch.zeros(5, dtype=torch.float64)
    batches = iter(unlabeled)
    share = 0.0
    warmup_steps = math.ceil(u2pl.cfg.supervised_warmup * total_steps)
    for step, (images, masks) in enumerate(tqdm(loader, desc=f"epoch {epoch} (U2PL)",
                                                leave=False,
                                                disable=None if progress else True)):
        images, masks = images.to(device), masks.to(device)
        if steps_done + step < warmup_steps:
            parts = u2pl.supervised(model, images, masks, loss_fn)
        else:
            if steps_done + step == warmup_steps > 0:
                u2pl.restart_teacher(student, teacher)
            try:
                weak, strong, valid = next(batches)
            except StopIteration:
                batches = iter(unlabeled)
                weak, strong, valid = next(batches)
            weak, strong, valid = weak.to(device), strong.to(device), valid.to(device)
            share = unreliable_share(u2pl.cfg, (steps_done + step) / max(total_steps, 1))
            parts = u2pl.losses(model, teacher, images, masks, weak, strong, valid, loss_fn,
                                share)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(student)
        u2pl.update_teacher_head()
        n = len(images)
        sums += torch.tensor([parts[k].item() * n for k in ("loss", "supervised",
                                                            "unsupervised", "contrast")] + [n],
                             dtype=torch.float64)
    if dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    count = max(sums[4].item(), 1)
    return {"loss": sums[0].item() / count, "loss_supervised": sums[1].item() / count,
            "loss_unsupervised": sums[2].item() / count, "loss_contrast": sums[3].item() / count,
            "unreliable_share": round(share, 4)}


def check(cfg: TrainConfig) -> None:
    """A U2PL run needs a teacher (``ema_decay``) and unlabelled folders."""
    if cfg.ema_decay is None:
        raise ValueError("semi: u2pl needs ema_decay (the teacher is the student's moving "
                         "average; U2PL uses 0.99)")
    if not cfg.unlabeled:
        raise ds.DatasetError("semi: u2pl needs unlabelled images: --unlabeled DIR")
    if math.isclose(cfg.unlabeled_weight, 0.0):
        raise ValueError("semi: u2pl with unlabeled_weight 0 learns nothing from them")
