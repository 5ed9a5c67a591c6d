"""RTMDet-Ins as one graph from a letterboxed uint8 batch to a padded set of instances, for deployment.

:class:`EndToEnd` runs normalisation, the network and the test-time postprocess of
:class:`rtmdet.InstancePostProcess` with fixed shapes, so that it exports to ONNX (legacy
TorchScript exporter) and to a ``torch.export`` program:

1. per level, the top ``nms_pre`` (prior, class) logits, class-major, multi-label (ranking raw
   logits ranks sigmoid scores); those at or below logit(score_thr) are kept in the tensor but
   marked invalid instead of dropped, so every image keeps the same candidate count;
2. distance decoding from the prior points, clipping to the input frame, invalid when empty;
3. class-aware greedy NMS on the valid candidates (boxes offset by label * (S + 1) so that classes
   never overlap; ``rtmdet.nms.batched_nms`` offsets by the largest coordinate + 1, which changes
   the IoUs by float rounding only), at most ``max_det`` kept, by descending score.
   It is the custom op ``rtmdet_e2e::nms`` (eager: ``rtmdet.nms.nms``), which exports to ONNX's
   ``NonMaxSuppression`` (one class, the offsets carry the classes);
4. the dynamic mask convs of the kept instances at stride 8.

Outputs (K = ``max_det``; rows past ``num_dets`` are padding: boxes 0, scores 0, labels -1, mask
logits ``PAD_LOGIT``):

* ``num_dets``    (B,) int64;
* ``boxes``       (B, K, 4) float32 xyxy in input pixels (the letterboxed frame);
* ``scores``      (B, K) float32, descending;
* ``labels``      (B, K) int64, 0..C-1;
* ``mask_logits`` (B, K, S/8, S/8) float32 at stride 8 (``mask_output="logits"``), to be pasted
  with the bilinear maps of ``rtmdet.mask_paste`` and thresholded at logit(mask_thr); or
  ``masks`` (B, K, S, S) bool at input resolution (``mask_output="input"``: the paste inside the
  graph, ``Ry L Rx^T > logit(mask_thr)``).

Boxes are in input pixels: divide by the letterbox scale (``ImageMeta.scale_factor``) for the
original image, as ``InstancePostProcess`` does (the NMS is unchanged by that scaling: IoU is
invariant under a per-axis scale).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.onnx import symbolic_helper

from .dynamic_mask import COORD_NORM, split_dynamic_params
from .mask_paste import resize_matrices
from .model import RTMDetIns
from .nms import nms
from .preprocess import normalize
from .priors import distance2bbox, flatten_levels, grid_priors

OUTPUT_NAMES = {"logits": ("num_dets", "boxes", "scores", "labels", "mask_logits"),
                "input": ("num_dets", "boxes", "scores", "labels", "masks")}
PAD_LOGIT = -1e4  # mask logit of the padding rows (probability 0, finite so that a paste stays finite)


# ------------------------------------------------------------------------------- NMS custom op

@torch.library.custom_op("rtmdet_e2e::nms", mutates_args=())
def nms_op(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int) -> torch.Tensor:
    """Greedy NMS per image with ONNX ``NonMaxSuppression``'s contract (one class).

    boxes (B, N, 4) xyxy; scores (B, N), candidates with score <= 0 take no part. Returns the
    selected (M, 3) int64 rows (image, 0, candidate), image-major, by descending score, at most
    ``max_keep`` per image.
    """
    rows = []
    for b in range(boxes.shape[0]):
        cand = (scores[b] > 0).nonzero().squeeze(1)
        keep = cand[nms(boxes[b, cand], scores[b, cand], iou_threshold, max_keep)]  # (m_b,)
        rows.append(torch.stack([torch.full_like(keep, b), torch.zeros_like(keep), keep], dim=1))
    return torch.cat(rows) if rows else boxes.new_zeros((0, 3), dtype=torch.int64)


@nms_op.register_fake
def _nms_fake(boxes, scores, iou_threshold, max_keep):
    num_selected = torch.library.get_ctx().new_dynamic_size()  # data-dependent, <= B * max_keep
    return boxes.new_empty((num_selected, 3), dtype=torch.int64)


@symbolic_helper.parse_args("v", "v", "f", "i")
def _nms_symbolic(g, boxes, scores, iou_threshold, max_keep):
    # NonMaxSuppression wants scores (B, classes, N); it selects score > score_threshold, here 0.
    # Its box layout [y1, x1, y2, x2] is xyxy transposed, which leaves every IoU unchanged.
    scores = g.op("Unsqueeze", scores, g.op("Constant", value_t=torch.tensor([1])))
    return g.op("NonMaxSuppression", boxes, scores, g.op("Constant", value_t=torch.tensor([max_keep])),
                g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                g.op("Constant", value_t=torch.tensor([0.0])))


def register_onnx_symbolic(opset: int) -> None:
    """Let the TorchScript ONNX exporter write ``rtmdet_e2e::nms`` as ``NonMaxSuppression``."""
    torch.onnx.register_custom_op_symbolic("rtmdet_e2e::nms", _nms_symbolic, opset)


def padded_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int) -> torch.Tensor:
    """boxes (B, N, 4), scores (B, N) (<= 0: not a candidate) -> kept indices (B, max_keep), -1 padded."""
    selected = torch.ops.rtmdet_e2e.nms(boxes, scores, iou_threshold, max_keep)  # (M, 3) image-major
    img, idx = selected[:, 0], selected[:, 2]
    # Rank of each selection within its image: its position minus the selections of earlier images.
    rank = torch.ones_like(img).cumsum(0) - 1 - (img[None, :] < img[:, None]).sum(1)  # (M,)
    keep = torch.full_like(scores[:, :1], -1, dtype=torch.int64).expand(-1, max_keep).contiguous()  # (B, K)
    return keep.index_put((img, rank), idx)


# -------------------------------------------------------------------------------- the module

class EndToEnd(nn.Module):
    """Letterboxed RGB uint8 (B, 3, S, S) -> padded instances; see the module docstring.

    The test-time settings are constructor arguments, baked into the exported graph. ``model``
    should be in eval mode (BatchNorm running statistics).
    """

    def __init__(self, model: RTMDetIns, img_size: int, score_thr: float = 0.05, nms_pre: int = 1000,
                 iou_thr: float = 0.6, max_det: int = 100, mask_thr: float = 0.5, mask_output: str = "logits"):
        super().__init__()
        if img_size <= 0 or img_size % max(model.strides):
            raise ValueError(f"img_size must be a positive multiple of {max(model.strides)}, got {img_size}")
        if mask_output not in OUTPUT_NAMES:
            raise ValueError(f"mask_output must be one of {list(OUTPUT_NAMES)}, got {mask_output!r}")
        self.model = model
        self.img_size = img_size
        self.score_thr, self.nms_pre, self.iou_thr, self.max_det = score_thr, nms_pre, iou_thr, max_det
        self.mask_thr, self.mask_output = mask_thr, mask_output
        self.logit_thr = _logit(score_thr)
        self.mask_logit_thr = _logit(mask_thr)
        sizes = [(img_size // s, img_size // s) for s in model.strides]
        self.level_sizes = [h * w for h, w in sizes]
        points, point_strides = grid_priors(sizes, model.strides)  # (P, 2) xy input pixels, (P,)
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("point_strides", point_strides, persistent=False)
        s = model.proto_stride  # prototypes: stride 8, or 4 (opt-in)
        h, w = img_size // s, img_size // s
        gy, gx = torch.meshgrid(torch.arange(h) * s, torch.arange(w) * s, indexing="ij")
        self.register_buffer("proto_grid", torch.stack([gx, gy]).reshape(2, h * w).float(), persistent=False)
        if mask_output == "input":
            ry, rx = resize_matrices((h, w), s, (img_size, img_size))  # (S, h), (S, w)
            self.register_buffer("ry", ry, persistent=False)
            self.register_buffer("rx_t", rx.t().contiguous(), persistent=False)

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES[self.mask_output]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images: (B, 3, S, S) uint8 RGB, letterboxed (``rtmdet.preprocess.letterbox``)."""
        cls_logits, box_dists, kernels, protos = self.model(normalize(images))
        logits, labels, prior_idx, dists = self._candidates(cls_logits, box_dists)  # (B, N) x3, (B, N, 4)
        S = self.img_size
        boxes = distance2bbox(self.points[prior_idx], dists).clamp(0, S)  # (B, N, 4) xyxy, input pixels
        valid = (logits > self.logit_thr) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        scores = logits.sigmoid()
        offsets = labels.to(boxes.dtype) * (S + 1)  # (B, N): classes never overlap
        keep = padded_nms(boxes + offsets[..., None], torch.where(valid, scores, -1.0), self.iou_thr,
                          self.max_det)  # (B, K) candidate indices, -1 padded
        kept = keep >= 0
        idx = keep.clamp(min=0)
        num_dets = kept.sum(1)  # (B,)
        boxes = boxes.gather(1, idx[..., None].expand(-1, -1, 4)) * kept[..., None]  # (B, K, 4)
        scores = scores.gather(1, idx) * kept  # (B, K)
        labels = torch.where(kept, labels.gather(1, idx), -1)  # (B, K)
        prior_idx = prior_idx.gather(1, idx)  # (B, K)
        params = flatten_levels(kernels).gather(1, prior_idx[..., None].expand(-1, -1, kernels[0].shape[1]))
        mask_logits = self._mask_logits(protos, params, prior_idx)  # (B, K, h, w)
        if self.mask_output == "input":
            masks = (self.ry @ mask_logits @ self.rx_t > self.mask_logit_thr) & kept[..., None, None]  # (B, K, S, S)
            return num_dets, boxes, scores, labels, masks
        return num_dets, boxes, scores, labels, torch.where(kept[..., None, None], mask_logits, PAD_LOGIT)

    def _candidates(self, cls_logits, box_dists):
        """Per level the top ``nms_pre`` (prior, class) logits -> logits, labels, prior indices (B, N)
        and box distances (B, N, 4), levels concatenated, each level's candidates by descending logit."""
        logits, labels, prior_idx, dists = [], [], [], []
        start = 0
        for lvl_logits, lvl_dists, hw in zip(cls_logits, box_dists, self.level_sizes):
            flat = lvl_logits.flatten(1)  # (B, C*H*W) class-major
            top, flat_idx = flat.topk(min(self.nms_pre, flat.shape[1]), dim=1)  # (B, k) sorted, descending
            local = flat_idx % hw  # (B, k) prior within the level
            logits.append(top)
            labels.append(flat_idx // hw)
            prior_idx.append(local + start)
            dists.append(lvl_dists.flatten(2).gather(2, local[:, None, :].expand(-1, 4, -1)).transpose(1, 2))
            start += hw
        return torch.cat(logits, 1), torch.cat(labels, 1), torch.cat(prior_idx, 1), torch.cat(dists, 1)

    def _mask_logits(self, protos: torch.Tensor, params: torch.Tensor, prior_idx: torch.Tensor) -> torch.Tensor:
        """Dynamic mask convs, per image: protos (B, P, h, w), params (B, K, 169) -> logits (B, K, h, w).

        The maths of ``rtmdet.dynamic_mask.dynamic_mask_logits`` (same parameter layout, same fold of
        the relative coordinates into the first conv), batched over images instead of gathered.
        """
        B, P, h, w = protos.shape
        K = params.shape[1]
        (w1, w2, w3), (b1, b2, b3) = split_dynamic_params(params.flatten(0, 1), P)  # (B*K, D, in), (B*K, D, 1)
        D = w1.shape[1]
        points = self.points[prior_idx].flatten(0, 1)  # (B*K, 2) xy input pixels
        inv_norm = 1.0 / (self.point_strides[prior_idx].flatten() * COORD_NORM)  # (B*K,)
        w_xy = w1[:, :, :2] * inv_norm[:, None, None]  # (B*K, D, 2)
        b1 = b1 + (w_xy * points[:, None, :]).sum(-1, keepdim=True)  # (B*K, D, 1)
        w1 = torch.cat([-w_xy, w1[:, :, 2:]], dim=2)  # (B*K, D, 2 + P)
        feats = torch.cat([self.proto_grid.expand(B, 2, h * w), protos.flatten(2)], dim=1)  # (B, 2 + P, h*w)
        x = torch.bmm(w1.reshape(-1, K * D, 2 + P), feats).reshape(-1, D, h * w)  # (B*K, D, h*w)
        x = (x + b1).relu()
        x = (torch.bmm(w2, x) + b2).relu()  # (B*K, D, h*w)
        x = torch.bmm(w3, x) + b3  # (B*K, 1, h*w)
        return x.reshape(-1, K, h, w)


def _logit(p: float) -> float:
    """sigmoid(x) > p <=> x > logit(p), as ``InstancePostProcess`` thresholds."""
    return torch.logit(torch.tensor(p, dtype=torch.float64)).item()
