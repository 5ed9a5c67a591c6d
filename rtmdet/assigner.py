"""DynamicSoftLabelAssigner (docs/architecture.md#label-assignment), batched over images.

Ground truths are padded to the batch maximum with a validity mask; everything is dense tensor
maths on (B, g, P) cost rows (P priors, g ground truths of one chunk), with no loop over images,
priors or single ground truths (only over chunks of ground truths) and no host synchronisation.

Compared with mmdet 3.3.0 (whose assignments it reproduces, see tests/test_parity_loss.py):
* The soft classification cost sum_c BCE(z_c, y_c) |y_c - sigmoid(z_c)|^2, with y nonzero only at the
  ground truth's class, is a per-prior term sum_c BCE(z_c, 0) sigmoid(z_c)^2 that does not depend on
  the ground truth, corrected at the ground truth's class: O(P G) work and memory instead of mmdet's
  O(P G C) (mmdetection issue #11468). It agrees with mmdet to float rounding.
* Each GT's picks need only its own cost row, and conflicts need only a running arg-min over GTs,
  so ground truths are processed in chunks and no (B, P, G) matrix is held: memory does not grow
  with the number of instances.
* The one behavioural difference: an empty mask's "centre of mass" falls back to the box centre
  (mmdet divides 0 by eps and puts it at the image corner (0, 0)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .box_ops import aligned_iou, box_iou

EPS = 1e-7  # mmdet's assigner EPS, in the IoU cost -ln(IoU + EPS)


class Assignment(NamedTuple):
    """Per prior, (B, P) each. Negatives have gt_index -1, label C (background) and iou 0."""

    pos_mask: torch.Tensor  # bool
    gt_index: torch.Tensor  # int64 index into the image's (padded) ground truths
    labels: torch.Tensor  # int64 in [0, C]
    ious: torch.Tensor  # float IoU(predicted box, assigned GT box): the soft target of positives


def mask_centers(masks: torch.Tensor, boxes: torch.Tensor, chunk_elements: int = 1 << 23) -> torch.Tensor:
    """Centre of mass of binary masks, in pixel-index coordinates (x = column, y = row).

    masks: (N, H, W) bool; boxes: (N, 4) xyxy, whose centre is used for empty masks. Returns (N, 2) xy.
    From row and column sums, converted to float a chunk of instances at a time: summing a bool
    tensor directly would materialise an int64 copy (8 bytes per pixel per instance).
    """
    N, H, W = masks.shape
    rows, cols = [], []
    for chunk in masks.split(max(1, chunk_elements // max(1, H * W))):
        chunk = chunk.to(torch.float32)  # 0/1 sums of <= 2^24 terms are exact in fp32
        rows.append(chunk.sum(2))  # (n, H) pixels per row
        cols.append(chunk.sum(1))  # (n, W) pixels per column
    rows = torch.cat(rows).to(torch.int64) if N else masks.new_zeros((0, H), dtype=torch.int64)
    cols = torch.cat(cols).to(torch.int64) if N else masks.new_zeros((0, W), dtype=torch.int64)
    area = rows.sum(1)  # (N,)
    # Integer moments, then one float division, as mmdet's center_of_mass does.
    cy = (rows * torch.arange(H, device=masks.device)).sum(1) / area.float().clamp(min=EPS)
    cx = (cols * torch.arange(W, device=masks.device)).sum(1) / area.float().clamp(min=EPS)
    com = torch.stack([cx, cy], dim=1).to(boxes.dtype)
    box_center = (boxes[:, :2] + boxes[:, 2:]) / 2
    return torch.where((area > 0)[:, None], com, box_center)


class DynamicSoftLabelAssigner(nn.Module):
    """SimOTA-style dynamic-k matching on a soft-label cost (RTMDet, Lyu et al. 2022, section 3.2).

    gt_chunk: ground truths whose (chunk, P) cost rows are built at a time. Each GT's k picks only
    need its own row and conflicts need a running arg-min over GTs, so no (B, G, P) matrix is ever
    held: memory is O(B P gt_chunk) however many instances an image has.
    """

    def __init__(self, topk: int = 13, iou_weight: float = 3.0, soft_center_radius: float = 3.0, gt_chunk: int = 64):
        super().__init__()
        self.topk = topk
        self.iou_weight = iou_weight
        self.soft_center_radius = soft_center_radius
        self.gt_chunk = gt_chunk

    @torch.no_grad()
    def forward(
        self,
        pred_boxes: torch.Tensor,
        cls_logits: torch.Tensor,
        priors: torch.Tensor,
        prior_strides: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_centers: torch.Tensor,
        gt_valid: torch.Tensor,
    ) -> Assignment:
        """Assign each prior to at most one ground truth.

        pred_boxes: (B, P, 4) decoded xyxy boxes, input pixels (detached). cls_logits: (B, P, C) raw.
        priors: (P, 2) xy points; prior_strides: (P,). gt_boxes: (B, G, 4) xyxy; gt_labels: (B, G)
        int64; gt_centers: (B, G, 2) xy (mask centres of mass); gt_valid: (B, G) bool, False for
        padding. Returns an :class:`Assignment`.
        """
        B, P, C = cls_logits.shape
        G = gt_boxes.shape[1]
        pred_boxes, cls_logits = pred_boxes.float(), cls_logits.float()
        gt_boxes, gt_centers, priors = gt_boxes.float(), gt_centers.float(), priors.float()
        chunks = [slice(g, min(g + self.gt_chunk, G)) for g in range(0, G, self.gt_chunk)]

        # 1. Candidates: priors strictly inside at least one valid ground-truth box.
        candidate = torch.zeros(B, P, dtype=torch.bool, device=pred_boxes.device)
        for sl in chunks:
            candidate |= self._inside(priors, gt_boxes[:, sl], gt_valid[:, sl]).any(1)

        # 2-3. Per chunk of GTs: cost rows, dynamic k, the k cheapest candidates; running arg-min.
        background = self._background_cls_cost(cls_logits)  # (B, P, C)
        cls_costs = (background.sum(2), background.transpose(1, 2), cls_logits.transpose(1, 2))  # (B, P), (B, C, P) x 2
        num_matches = torch.zeros(B, P, dtype=torch.int64, device=pred_boxes.device)
        matched_gt = torch.zeros_like(num_matches)  # the GT of priors matched exactly once
        best_cost = torch.full((B, P), float("inf"), device=pred_boxes.device)
        best_gt = torch.zeros_like(num_matches)  # lowest-cost GT over all GTs (first on ties)
        k_max = min(self.topk, P)
        for sl in chunks:
            valid = gt_valid[:, sl]  # (B, g)
            pair = valid[:, :, None] & candidate[:, None, :]  # (B, g, P): every valid GT of a candidate
            ious = box_iou(gt_boxes[:, sl], pred_boxes).masked_fill_(~pair, 0.0)  # (B, g, P)
            cost = self._pair_cost(*cls_costs, priors, prior_strides, gt_labels[:, sl], gt_centers[:, sl], ious, pair)
            # Dynamic k from the GT's top IoUs over candidates (non-candidates add zeros); k <= #candidates.
            dynamic_k = ious.topk(k_max, dim=2).values.sum(2).int().clamp(min=1)  # (B, g)
            pick = cost.topk(k_max, dim=2, largest=False).indices  # (B, g, k_max), cheapest first
            keep = (torch.arange(k_max, device=cost.device) < dynamic_k[..., None]) & valid[..., None]
            gt_ids = torch.arange(sl.start, sl.stop, device=cost.device)[None, :, None]  # (1, g, 1)
            num_matches.scatter_add_(1, pick.flatten(1), keep.flatten(1).long())
            matched_gt.scatter_add_(1, pick.flatten(1), (keep * gt_ids).flatten(1))
            chunk_min, chunk_arg = cost.min(1)  # (B, P)
            better = chunk_min < best_cost  # strict: earlier GTs win ties, as a global arg-min
            best_cost = torch.where(better, chunk_min, best_cost)
            best_gt = torch.where(better, chunk_arg + sl.start, best_gt)

        # A prior picked by several GTs goes to the GT of lowest cost (over all GTs, as mmdet).
        pos_mask = num_matches > 0
        gt_index = torch.where(num_matches > 1, best_gt, matched_gt)
        gt_index = torch.where(pos_mask, gt_index, -1)  # (B, P)
        safe = gt_index.clamp(min=0)
        labels = torch.where(pos_mask, gt_labels.gather(1, safe), C)
        assigned_boxes = gt_boxes.gather(1, safe[..., None].expand(-1, -1, 4))  # (B, P, 4)
        pos_ious = torch.where(pos_mask, aligned_iou(pred_boxes, assigned_boxes), 0.0)  # = the IoU entry used above
        return Assignment(pos_mask, gt_index, labels, pos_ious)

    @staticmethod
    def _inside(priors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
        """(P, 2) points strictly inside (B, g, 4) boxes -> (B, g, P) bool (all four distances > 0)."""
        x1, y1, x2, y2 = gt_boxes[..., None].unbind(2)  # (B, g, 1) each
        px, py = priors[:, 0], priors[:, 1]  # (P,)
        return (px - x1 > 0) & (py - y1 > 0) & (x2 - px > 0) & (y2 - py > 0) & gt_valid[..., None]

    @staticmethod
    def _background_cls_cost(cls_logits: torch.Tensor) -> torch.Tensor:
        """BCE(z, 0) sigmoid(z)^2 per prior and class: the soft-label cost where y = 0. (B, P, C)."""
        cost = F.binary_cross_entropy_with_logits(cls_logits, torch.zeros_like(cls_logits), reduction="none")
        return cost.mul_(cls_logits.sigmoid().square())

    def _pair_cost(self, background_sum, background_t, logits_t, priors, prior_strides, gt_labels, gt_centers,
                   ious, pair):
        """Cost of (GT, prior) pairs (B, g, P): soft cls + 3 (-ln(IoU + eps)) + 10^(d / stride - 3).

        The soft cls cost sum_c BCE(z_c, y_c) |y_c - sigmoid(z_c)|^2, with y = IoU at the GT's class
        and 0 elsewhere, is the prior's all-background cost ``background_sum`` (B, P), minus its
        background term at the GT's class (from ``background_t`` (B, C, P)), plus the soft-label term
        there (logits ``logits_t`` (B, C, P)). Pairs outside ``pair`` cost +inf.
        """
        B, g, P = ious.shape
        index = gt_labels[:, :, None].expand(B, g, P)  # (B, g, P) class of each GT
        cost = background_sum[:, None, :] - background_t.gather(1, index)  # (B, g, P)
        z = logits_t.gather(1, index)  # (B, g, P) logit of the GT's class
        soft = F.binary_cross_entropy_with_logits(z, ious, reduction="none")
        cost += soft.mul_((ious - z.sigmoid_()).square_())
        cost += -torch.log(ious + EPS) * self.iou_weight
        dx = priors[:, 0] - gt_centers[..., 0, None]  # (B, g, P)
        dy = priors[:, 1] - gt_centers[..., 1, None]
        dist = (dx.square_() + dy.square_()).sqrt_().div_(prior_strides.float())
        cost += torch.pow(10, dist.sub_(self.soft_center_radius))
        # Candidates stay finite so that they always rank before the excluded pairs.
        return cost.clamp_(max=torch.finfo(cost.dtype).max).masked_fill_(~pair, float("inf"))
