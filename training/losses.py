"""Losses for crack segmentation (logits in, scalar out), class balancing and distillation.

Two shapes of problem, told apart by the logits' channel count:
- binary: logits (N, 1, H, W), target float (N, 1, H, W) in {0, 1};
- multi-class: logits (N, C, H, W) with C > 1, target int64 (N, H, W) of class indices.

Class weights are indexed by label value: ``weights[0]`` is background. A binary model has two
label values and so two weights, even though it has one output channel; its weighted
cross-entropy is the two-class cross-entropy of one sigmoid channel.

Weighted means follow ``torch.nn.functional.cross_entropy``: sum(w[y] * loss) / sum(w[y]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image (binary) or per image and class (multi-class, softmax against
    one-hot targets), averaged; ``eps`` makes an absent class predicted absent score 0."""
    if logits.shape[1] == 1:
        prob = torch.sigmoid(logits)
        dims = tuple(range(1, prob.dim()))
    else:
        prob = torch.softmax(logits, dim=1)
        target = _one_hot(target, logits.shape[1])
        dims = (2, 3)
    intersection = (prob * target).sum(dims)
    return (1 - (2 * intersection + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target)


def weighted_ce_loss(logits: torch.Tensor, target: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with per-class ``weights`` (None: all 1)."""
    if logits.shape[1] > 1:
        weight = None if weights is None else weights.to(logits.device, logits.dtype)
        return F.cross_entropy(logits, target.long(), weight=weight)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weights is None:
        return per_pixel.mean()
    pixel_weight = weights.to(logits.device, logits.dtype)[target.long()]
    return (pixel_weight * per_pixel).sum() / pixel_weight.sum()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    return weighted_ce_loss(logits, target, weights) + dice_loss(logits, target)


def ce_crack_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                       weights: torch.Tensor | None = None, crack_index: int = 1) -> torch.Tensor:
    """``ce_dice`` plus the crack class's own Dice term (per image, softmax crack probability
    against the crack pixels), so the crack keeps the weight the binary model's Dice gave it
    rather than 1 / C of the class-averaged term."""
    crack = torch.softmax(logits, dim=1)[:, crack_index:crack_index + 1]
    crack_dice = dice_loss(torch.logit(crack.clamp(1e-6, 1 - 1e-6)),
                           (target == crack_index).unsqueeze(1).to(logits.dtype))
    return ce_dice_loss(logits, target, weights) + crack_dice


LOSSES = {
    "bce": F.binary_cross_entropy_with_logits,
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    "weighted_ce": weighted_ce_loss,
    "ce_dice": ce_dice_loss,
    "ce_crack_dice": ce_crack_dice_loss,
}
MULTI_CLASS_ONLY = {"ce_crack_dice"}  # they read the crack class out of C class logits
BINARY_ONLY = {"bce": "weighted_ce", "bce_dice": "ce_dice"}  # and what to use instead
WEIGHTED = {"weighted_ce", "ce_dice", "ce_crack_dice"}


def get_loss(name: str, num_classes: int = 1,
             class_weights: Iterable[float] | None = None, crack_index: int = 1) -> Loss:
    """The loss called ``name`` for a model of ``num_classes`` output channels; ``class_weights``
    (background first) only for the losses that take them; ``crack_index``: the crack class
    of a multi-class model."""
    if name not in LOSSES:
        known = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss {name!r}; known losses: {known}")
    if num_classes > 1 and name in BINARY_ONLY:
        raise ValueError(f"loss {name!r} is for a binary model (one class); with "
                         f"{num_classes} classes use {BINARY_ONLY[name]!r}")
    if num_classes == 1 and name in MULTI_CLASS_ONLY:
        raise ValueError(f"loss {name!r} is for a multi-class model; a binary one uses "
                         "'bce_dice'")
    loss = (partial(LOSSES[name], crack_index=crack_index) if name in MULTI_CLASS_ONLY
            else LOSSES[name])
    if class_weights is None:
        return loss
    if name not in WEIGHTED:
        raise ValueError(f"loss {name!r} takes no class weights; weighted losses: "
                         f"{', '.join(sorted(WEIGHTED))}")
    weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
    if len(weights) != max(2, num_classes):
        raise ValueError(f"{len(weights)} class weights for {max(2, num_classes)} label values")
    return partial(loss, weights=weights)


def class_frequencies(masks: Iterable[np.ndarray], num_labels: int) -> np.ndarray:
    """freq_c = pixels of class c / pixels of the images in which c appears (Eigen & Fergus
    2015); 0 for a class that appears nowhere."""
    pixels = np.zeros(num_labels, np.float64)
    pixels_where_present = np.zeros(num_labels, np.float64)
    for mask in masks:
        counts = np.bincount(mask.ravel(), minlength=num_labels)[:num_labels]
        pixels += counts
        pixels_where_present += np.where(counts > 0, mask.size, 0)
    return np.divide(pixels, pixels_where_present, out=np.zeros(num_labels),
                     where=pixels_where_present > 0)


def median_frequency_weights(masks: Iterable[np.ndarray], num_labels: int) -> np.ndarray:
    """weight_c = median(freq) / freq_c over the classes present; a class absent from every
    mask gets weight 0 (there is nothing to balance)."""
    freq = class_frequencies(masks, num_labels)
    present = freq > 0
    if not present.any():
        raise ValueError("no labelled pixels to compute median-frequency weights from")
    median = np.median(freq[present])
    return np.divide(median, freq, out=np.zeros(num_labels), where=present)


def crack_vs_rest_logit(logits: torch.Tensor, crack_index: int) -> torch.Tensor:
    """N x 1 x H x W: the logit of "crack" against every other class of C class logits,
    log p_crack - log(1 - p_crack) = l_crack - logsumexp of the others."""
    others = torch.cat([logits[:, :crack_index], logits[:, crack_index + 1:]], dim=1)
    return (logits[:, crack_index] - torch.logsumexp(others, dim=1)).unsqueeze(1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, crack_index: int = 1,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """KL divergence of the student's from the teacher's temperature-softened per-pixel class
    distribution, times T^2 (Hinton et al. 2015) so its gradients keep their size as T changes;
    0 when the student matches the teacher. Binary: the two-class (sigmoid) distribution.

    A binary teacher of a multi-class student (learning without forgetting: a crack model's
    crack probability kept while new classes are learnt) is compared with the student's crack
    against the rest (:func:`crack_vs_rest_logit`, ``crack_index``), over the pixels of
    ``keep`` (N x H x W bool; e.g. not labelled as a class the teacher never knew), or all."""
    t = temperature
    if teacher_logits.shape[1] == 1 and student_logits.shape[1] > 1:
        student = crack_vs_rest_logit(student_logits, crack_index) / t
        soft_target = torch.sigmoid(teacher_logits / t)
        per_pixel = (F.binary_cross_entropy_with_logits(student, soft_target, reduction="none")
                     - F.binary_cross_entropy_with_logits(teacher_logits / t, soft_target,
                                                          reduction="none"))
        if keep is None:
            return per_pixel.mean() * t * t
        weight = keep.unsqueeze(1).to(per_pixel.dtype)
        return (per_pixel * weight).sum() / weight.sum().clamp(min=1.0) * t * t
    if student_logits.shape[1] == 1:
        soft_target = torch.sigmoid(teacher_logits / t)
        # BCE against a soft target minus the target's own entropy = binary KL divergence
        kl = (F.binary_cross_entropy_with_logits(student_logits / t, soft_target)
              - F.binary_cross_entropy_with_logits(teacher_logits / t, soft_target))
    else:
        kl = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                      F.log_softmax(teacher_logits / t, dim=1),
                      log_target=True, reduction="none").sum(dim=1).mean()
    return kl * t * t
