"""Greedy non-maximum suppression in pure torch (no torchvision), vectorised.

Greedy NMS keeps box j (in descending score order) iff no *kept* higher-scored box overlaps it by
more than the threshold. That recursion has one solution; we reach it by iterating
keep <- not any_i<j (keep_i and IoU_ij > thr) from keep = all. After t rounds the first t boxes are
final, and in practice the chains of suppression are short, so a few (M x M) tensor ops suffice.

The fate of a box depends only on higher-scored boxes, so when only the best ``max_keep`` are
wanted we run on a growing score-ordered prefix and stop once it holds ``max_keep`` survivors:
exact, and far cheaper than the full (M x M) problem for M = 3000 candidates.
"""

from __future__ import annotations

import torch

from .box_ops import box_iou


def _greedy_keep(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """boxes (N, 4) already in descending score order -> (N,) bool kept."""
    overlaps = (box_iou(boxes, boxes) > iou_threshold).triu_(diagonal=1)  # (N, N), pairs i < j
    keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    while True:
        new_keep = ~(overlaps & keep[:, None]).any(dim=0)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None) -> torch.Tensor:
    """boxes (N, 4) xyxy, scores (N,) -> int64 indices of kept boxes by descending score (at most max_keep)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    n = len(order)
    prefix = n if max_keep is None else min(n, 4 * max_keep)
    while True:
        keep = _greedy_keep(boxes[:prefix], iou_threshold)
        kept = order[:prefix][keep]
        if prefix == n or len(kept) >= max_keep:
            return kept if max_keep is None else kept[:max_keep]
        prefix = min(n, 2 * prefix)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float, max_keep: int | None = None
) -> torch.Tensor:
    """Class-aware NMS: boxes of different labels never suppress each other.

    As mmcv's ``batched_nms``, classes are separated by offsetting each box by
    label * (max coordinate + 1). Returns kept indices sorted by descending score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold, max_keep)
