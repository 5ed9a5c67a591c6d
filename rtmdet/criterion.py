"""RTMDet-Ins training objective: assign, then QFL + GIoU + dice.

The reference's definitions: docs/architecture.md#label-assignment and docs/architecture.md#losses.

Reproduces mmdet 3.3.0's ``RTMDetInsHead.loss_by_feat``; differences are only in how it is
computed: batched over images, an assigner whose memory does not depend on the number of ground
truths, the mask loss in checkpointed chunks of positives so that its memory does not grow with
the number of instances either, and no host synchronisation except one (the number of positives
per image decides the mask-loss work).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .assigner import Assignment, DynamicSoftLabelAssigner, mask_centers
from .dynamic_mask import dynamic_mask_logits
from .losses import dice_loss, giou_loss, quality_focal_loss
from .outputs import RawOutputs
from .priors import distance2bbox, flatten_levels, grid_priors

FLOAT_EPS = torch.finfo(torch.float32).eps  # mmdet adds it to every avg_factor


class Targets(NamedTuple):
    """Ground truth of a batch, padded to G = max(1, most instances in an image)."""

    boxes: torch.Tensor  # (B, G, 4) xyxy, input pixels
    labels: torch.Tensor  # (B, G) int64
    centers: torch.Tensor  # (B, G, 2) xy mask centres of mass
    valid: torch.Tensor  # (B, G) bool, False for padding
    masks: torch.Tensor  # (sum N_b, H / s, W / s) bool, all images' masks subsampled at the mask-loss stride
    mask_offsets: torch.Tensor  # (B,) int64 index of each image's first mask in ``masks``


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes (mmdet's reduce_mean): all-reduce sum / world size; identity without DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


class RTMDetInsCriterion(nn.Module):
    """Losses of RTMDet-Ins from its raw outputs and per-image targets.

    ``forward(outputs, targets)`` takes ``RawOutputs`` (``rtmdet.outputs``) and, per image, a dict
    with ``boxes`` (N, 4) float xyxy input pixels, ``labels`` (N,) int64 in [0, C) and ``masks``
    (N, H, W) bool at the padded input size. Crowd instances must already be removed (other keys,
    e.g. ``ignore_boxes``, are ignored, as mmdet's assigner ignores them). Returns fp32 scalars
    ``loss_cls``, ``loss_bbox``, ``loss_mask``, already multiplied by ``weight_dict``; their sum is
    the training loss.

    mask_chunk_size: positives per checkpointed chunk of the mask loss (None: one un-checkpointed pass).
    """

    def __init__(
        self,
        num_classes: int,
        strides: tuple[int, ...] = (8, 16, 32),
        assigner: DynamicSoftLabelAssigner | None = None,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 2.0,
        loss_mask_weight: float = 2.0,
        mask_loss_stride: int = 4,
        mask_chunk_size: int | None = 64,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.assigner = assigner if assigner is not None else DynamicSoftLabelAssigner()
        self.weight_dict = {"loss_cls": loss_cls_weight, "loss_bbox": loss_bbox_weight, "loss_mask": loss_mask_weight}
        self.mask_loss_stride = mask_loss_stride
        self.mask_chunk_size = mask_chunk_size

    def forward(self, outputs: RawOutputs, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        protos = outputs.mask_protos
        with torch.autocast(protos.device.type, enabled=False):  # losses in fp32 even under autocast
            cls_logits = flatten_levels([x.float() for x in outputs.cls_logits])  # (B, P, C)
            box_dists = flatten_levels([x.float() for x in outputs.box_dists])  # (B, P, 4) l, t, r, b
            kernels = flatten_levels([x.float() for x in outputs.kernels])  # (B, P, 169)
            protos = protos.float()  # (B, 8, h, w) at the prototype stride (8; 4 opt-in)
            sizes = [tuple(x.shape[-2:]) for x in outputs.cls_logits]
            points, point_strides = grid_priors(sizes, self.strides, protos.device)  # (P, 2), (P,)
            pred_boxes = distance2bbox(points, box_dists)  # (B, P, 4) xyxy, input pixels, not clipped
            proto_stride = outputs.proto_stride(self.strides[0])
            if self.mask_loss_stride > proto_stride or proto_stride % self.mask_loss_stride:
                raise ValueError(f"mask_loss_stride {self.mask_loss_stride} must divide the prototype stride "
                                 f"{proto_stride}")
            gt = self.prepare_targets(targets, protos, proto_stride)
            assignment = self.assigner(
                pred_boxes.detach(), cls_logits.detach(), points, point_strides,
                gt.boxes, gt.labels, gt.centers, gt.valid,
            )
            # QFL and GIoU share the normaliser: sum of the positives' IoU targets, averaged over processes.
            quality_norm = reduce_mean(assignment.ious.sum()).clamp(min=1)
            losses = {
                "loss_cls": self.loss_labels(cls_logits, assignment, quality_norm),
                "loss_bbox": self.loss_boxes(pred_boxes, gt, assignment, quality_norm),
                "loss_mask": self.loss_masks(kernels, protos, points, point_strides, gt, assignment, proto_stride),
            }
        return {k: v * self.weight_dict[k] for k, v in losses.items()}

    def prepare_targets(self, targets: list[dict[str, torch.Tensor]], protos: torch.Tensor,
                        proto_stride: int = 8) -> Targets:
        """Pad boxes/labels/centres to the batch maximum; subsample masks at the mask-loss stride."""
        device = protos.device
        B = len(targets)
        G = max([1] + [len(t["labels"]) for t in targets])
        H, W = protos.shape[-2] * proto_stride, protos.shape[-1] * proto_stride
        s = self.mask_loss_stride
        boxes = torch.zeros(B, G, 4, device=device)
        centers = torch.zeros(B, G, 2, device=device)
        labels = torch.zeros(B, G, dtype=torch.int64, device=device)
        valid = torch.zeros(B, G, dtype=torch.bool, device=device)
        masks, counts = [], []
        for b, t in enumerate(targets):  # per image: the inputs are per-image lists
            n = len(t["labels"])
            counts.append(n)
            if n == 0:
                continue
            m = t["masks"].to(device=device, dtype=torch.bool)  # (n, H, W)
            if m.shape != (n, H, W):
                raise ValueError(f"image {b}: masks must be (N, H, W) = {(n, H, W)} (padded input size), "
                                 f"got {tuple(m.shape)}")
            box = t["boxes"].to(device=device, dtype=torch.float32)
            boxes[b, :n] = box
            labels[b, :n] = t["labels"].to(device)
            valid[b, :n] = True
            centers[b, :n] = mask_centers(m, box)
            masks.append(m[:, s // 2::s, s // 2::s])  # (n, H / s, W / s): sampled, not averaged
        masks = torch.cat(masks) if masks else torch.zeros(0, H // s, W // s, dtype=torch.bool, device=device)
        offsets = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
        return Targets(boxes, labels, centers, valid, masks, offsets)

    def loss_labels(self, cls_logits: torch.Tensor, assignment: Assignment, norm: torch.Tensor) -> torch.Tensor:
        """Quality focal loss over all priors and classes, target = IoU at the positive's class."""
        return quality_focal_loss(cls_logits, assignment.labels, assignment.ious).sum() / norm

    def loss_boxes(
        self, pred_boxes: torch.Tensor, gt: Targets, assignment: Assignment, norm: torch.Tensor
    ) -> torch.Tensor:
        """GIoU loss of each positive's decoded box, weighted by its IoU target.

        Computed densely over all priors with weight 0 for negatives: no gather of positives (no
        host sync), and a zero loss with a graph when there are none.
        """
        index = assignment.gt_index.clamp(min=0)[..., None].expand(-1, -1, 4)  # (B, P, 4)
        target_boxes = gt.boxes.gather(1, index)  # (B, P, 4); padding box for negatives
        return (giou_loss(pred_boxes, target_boxes) * assignment.ious).sum() / norm

    def loss_masks(
        self,
        kernels: torch.Tensor,
        protos: torch.Tensor,
        points: torch.Tensor,
        point_strides: torch.Tensor,
        gt: Targets,
        assignment: Assignment,
        proto_stride: int = 8,
    ) -> torch.Tensor:
        """Dice loss of every positive's dynamic mask at the mask-loss stride (docs/architecture.md#mask-loss-stride).

        With ``mask_chunk_size``, positives go through in checkpointed chunks that never straddle two
        images: each chunk keeps only its inputs for backward (memory flat in the number of
        positives), and runs on one image's prototypes (a plain GEMM, no per-instance gather).
        """
        B, P = assignment.pos_mask.shape
        counts = assignment.pos_mask.sum(1).tolist()  # the one host sync: the work depends on it
        num_pos = sum(counts)
        norm = reduce_mean(protos.new_tensor(float(num_pos))).clamp(min=1) + FLOAT_EPS
        if num_pos == 0:  # zero with a graph and zero gradients; kernels too, so DDP sees every parameter used
            return (protos.sum() + kernels.sum()) * 0
        flat = torch.nonzero_static(assignment.pos_mask.flatten(), size=num_pos)[:, 0]  # (K,) sorted by image
        img_idx, prior_idx = flat // P, flat % P
        params = kernels[img_idx, prior_idx]  # (K, 169)
        mask_idx = gt.mask_offsets[img_idx] + assignment.gt_index[img_idx, prior_idx]  # (K,) rows of gt.masks
        points, point_strides = points[prior_idx], point_strides[prior_idx]  # (K, 2), (K,)
        chunk = self.mask_chunk_size
        if chunk is None:
            total = self._dice_sum(protos, params, points, point_strides, img_idx, mask_idx, gt.masks, proto_stride)
            return total / norm
        total, start, zeros = 0.0, 0, torch.zeros_like(img_idx)
        for b, n in enumerate(counts):
            for i in range(start, start + n, chunk):
                j = min(i + chunk, start + n)
                total = total + checkpoint(
                    self._dice_sum, protos[b:b + 1], params[i:j], points[i:j], point_strides[i:j], zeros[i:j],
                    mask_idx[i:j], gt.masks, proto_stride, use_reentrant=False,
                )
            start += n
        return total / norm

    def _dice_sum(self, protos, params, points, point_strides, img_idx, mask_idx, gt_masks,
                  proto_stride: int = 8) -> torch.Tensor:
        """Summed dice loss of K positives: (K, 169) params, (K, 2) points, (K,) strides/images/mask rows."""
        logits = dynamic_mask_logits(protos, params, points, point_strides, img_idx, proto_stride)  # (K, h, w)
        scale = proto_stride // self.mask_loss_stride
        if scale > 1:  # logits up to the mask-loss stride (as the reference: x2 from stride 8 to 4)
            logits = F.interpolate(logits[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
        return dice_loss(logits.sigmoid(), gt_masks[mask_idx]).sum()  # (K, H / s, W / s) vs sampled GT
