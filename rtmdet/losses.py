"""The three RTMDet-Ins loss terms as plain, unreduced functions (docs/architecture.md#losses).

Each returns one value per prediction; weighting and normalisation live in ``rtmdet.criterion``.
They match mmdet 3.3.0's ``QualityFocalLoss``, ``GIoULoss`` and ``DiceLoss`` before reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .box_ops import aligned_giou


def quality_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """Quality Focal Loss (GFL, Li et al. 2020, eq. 5), sigmoid form, summed over classes.

    logits: (..., C) raw class logits. labels: (...,) int64 in [0, C]; C means background.
    scores: (...,) quality target (the IoU) of each positive; ignored for background.
    Every (prediction, class) pair is a binary problem with soft target y: y = score at the
    positive's class, 0 elsewhere, and loss BCE(z, y) * |y - sigmoid(z)|^beta. Returns (...,).
    """
    C = logits.shape[-1]
    soft = logits.new_zeros((*logits.shape[:-1], C + 1))  # extra column catches the background label
    soft.scatter_(-1, labels[..., None], scores[..., None].to(logits.dtype))
    soft = soft[..., :C]  # (..., C)
    loss = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    return (loss * (soft - logits.sigmoid()).abs().pow(beta)).sum(-1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - GIoU of aligned (..., 4) xyxy boxes -> (...,) (Rezatofighi et al. 2019)."""
    return 1.0 - aligned_giou(pred, target, eps)


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 5e-6) -> torch.Tensor:
    """V-Net dice loss per instance (Milletari et al. 2016, eq. 1).

    probs: (N, ...) probabilities (after the sigmoid); target: (N, ...) binary (any dtype).
    Returns (N,): 1 - 2 sum(p q) / ((sum(p^2) + eps) + (sum(q^2) + eps)).
    """
    p = probs.flatten(1)
    q = target.flatten(1).to(p.dtype)
    inter = (p * q).sum(1)
    return 1.0 - 2.0 * inter / ((p * p).sum(1) + eps + ((q * q).sum(1) + eps))
