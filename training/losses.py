"""Losses for binary crack segmentation (logits in, scalar out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, prob.dim()))
    intersection = (prob * target).sum(dims)
    return (1 - (2 * intersection + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target)


LOSSES = {
    "bce": F.binary_cross_entropy_with_logits,
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
}


def get_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss {name!r}; known losses: {known}") from None
