"""Dice + cross-entropy, the loss nnU-Net made the default for this kind of task.

Soft Dice is computed per sample and per foreground class, then averaged, so the loss of a batch is the
mean of its samples' losses. That makes data-parallel training (gradients averaged over ranks) equal to
one process on the combined batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """``logits`` (N, C, Z, Y, X), ``target`` (N, Z, Y, X) int64 class indices."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
    probs = logits.softmax(dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.ndim))
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    soft_dice = dice[:, 1:].mean(1)  # foreground classes only
    return (ce + (1 - soft_dice)).mean()
