"""Greedy non-maximum suppression in pure torch (no torchvision), vectorised.

Greedy NMS keeps box j (in descending score order) iff no *kept* higher-scored box overlaps it by
more than the threshold. That recursion has one solution; we reach it by iterating
keep <- not any_i<j (keep_i and IoU_ij > thr) from keep = all. After t rounds the first t boxes are
final, and in practice the chains of suppression are short, so a few (M x M) tensor ops suffice.
"""

from __future__ import annotations

import torch

from .box_ops import box_iou


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """boxes (N, 4) xyxy, scores (N,) -> int64 indices of kept boxes, by descending score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    overlaps = (box_iou(boxes, boxes, eps=0.0 + 1e-12) > iou_threshold).triu_(diagonal=1)  # (N, N) i < j
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    while True:
        new_keep = ~(overlaps & keep[:, None]).any(dim=0)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-aware NMS: boxes of different labels never suppress each other.

    As mmcv's ``batched_nms``, classes are separated by offsetting each box by
    label * (max coordinate + 1). Returns kept indices sorted by descending score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
