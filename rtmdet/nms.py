"""Greedy non-maximum suppression in pure torch (no torchvision), vectorised by blocks.

Greedy NMS keeps box j (in descending score order) iff no *kept* higher-scored box overlaps it by
more than the threshold. The boxes are taken in score-ordered blocks of ``block``:

* a block's boxes overlapped by a box kept in an earlier block are out: one (K, B) IoU test
  against the K boxes kept so far (not the N x N matrix of all candidates);
* inside the block the recursion keep_j = alive_j and not any_{i<j}(keep_i and IoU_ij > thr) has
  one solution, reached by iterating it on the (B, B) matrix from keep = alive: after t rounds the
  first t boxes are final, and suppression chains are short, so a few rounds suffice.

The fate of a box depends only on higher-scored boxes, so with ``max_keep`` the blocks stop once
that many are kept: exact, and the rest of the candidates are never looked at.
"""

from __future__ import annotations

import torch

from .box_ops import box_iou

BLOCK = 128  # boxes decided together; large enough for few Python steps, small for (B, B) rounds


def _greedy_keep(boxes: torch.Tensor, iou_threshold: float, max_keep: int | None = None,
                 block: int = BLOCK) -> torch.Tensor:
    """boxes (N, 4) already in descending score order -> (N,) bool kept (the first max_keep kept)."""
    n = len(boxes)
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    kept_boxes = boxes[:0]
    for start in range(0, n, block):
        b = boxes[start:start + block]  # (B, 4)
        alive = ~(box_iou(kept_boxes, b) > iou_threshold).any(0)  # (B,) not overlapped by an earlier keep
        overlaps = (box_iou(b, b) > iou_threshold).triu_(diagonal=1)  # (B, B), pairs i < j
        k = alive
        while True:
            new_k = alive & ~(overlaps & k[:, None]).any(0)
            if torch.equal(new_k, k):
                break
            k = new_k
        keep[start:start + block] = k
        kept_boxes = torch.cat([kept_boxes, b[k]])
        if max_keep is not None and len(kept_boxes) >= max_keep:
            break
    if max_keep is not None:
        keep &= keep.cumsum(0) <= max_keep
    return keep


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None,
        block: int = BLOCK) -> torch.Tensor:
    """boxes (N, 4) xyxy, scores (N,) -> int64 indices of kept boxes by descending score (at most max_keep)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    return order[_greedy_keep(boxes[order], iou_threshold, max_keep, block)]


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
