"""Raw outputs -> instances (boxes, scores, labels, masks), in the exact order of spec section 5."""

from __future__ import annotations

import torch
import torch.nn as nn

from .dynamic_mask import dynamic_mask_logits
from .mask_paste import _scale_factor, paste_masks, resize_matrices
from .nms import batched_nms
from .priors import distance2bbox, grid_priors


class InstancePostProcess(nn.Module):
    """Score threshold and per-level top-k, box decoding, class-aware NMS, dynamic masks.

    Defaults are the official RTMDet-Ins test settings. Detection is multi-label: one prior can
    yield several (class, score) instances.
    """

    def __init__(
        self,
        score_thr: float = 0.05,
        nms_pre: int = 1000,
        iou_thr: float = 0.6,
        max_per_img: int = 100,
        mask_thr: float = 0.5,
    ):
        super().__init__()
        self.score_thr = score_thr
        self.nms_pre = nms_pre
        self.iou_thr = iou_thr
        self.max_per_img = max_per_img
        self.mask_thr = mask_thr

    def forward(self, outputs, input_size, strides, metas=None) -> list[dict[str, torch.Tensor]]:
        """outputs: ``RawOutputs``; input_size: (H, W) of the padded input; metas: see ``RTMDetIns.predict``."""
        cls_logits, box_dists, kernels, protos = outputs
        sizes = [tuple(x.shape[-2:]) for x in cls_logits]
        points, point_strides = grid_priors(sizes, strides, protos.device)  # (P, 2), (P,)
        level_starts = [0] + torch.tensor([h * w for h, w in sizes]).cumsum(0).tolist()
        results = []
        for b in range(protos.shape[0]):
            meta = None if metas is None else metas[b]
            results.append(
                self.single(
                    [x[b] for x in cls_logits], [x[b] for x in box_dists], [x[b] for x in kernels],
                    protos[b], points, point_strides, level_starts, input_size, strides[0], meta,
                )
            )
        return results

    def single(self, cls_logits, box_dists, kernels, protos, points, point_strides, level_starts,
               input_size, proto_stride, meta) -> dict[str, torch.Tensor]:
        # 1-2. Per level: sigmoid scores, keep (prior, class) pairs above score_thr, top nms_pre;
        # gather the candidates' box distances and dynamic kernels.
        scores, labels, prior_idx, dists, params = [], [], [], [], []
        for lvl, logits in enumerate(cls_logits):
            s = logits.flatten(1).t().sigmoid().flatten()  # (H*W*C,) prior-major, class-minor
            # The best nms_pre of those above score_thr = the best nms_pre overall, then thresholded.
            kept, flat = s.topk(min(self.nms_pre, len(s)))  # sorted, descending
            above = kept > self.score_thr
            kept, flat = kept[above], flat[above]
            num_classes = logits.shape[0]
            local = flat // num_classes
            scores.append(kept)
            labels.append(flat % num_classes)
            prior_idx.append(local + level_starts[lvl])
            dists.append(box_dists[lvl].flatten(1)[:, local].t())  # (M_l, 4)
            params.append(kernels[lvl].flatten(1)[:, local].t())  # (M_l, 169)
        scores, labels, prior_idx = torch.cat(scores), torch.cat(labels), torch.cat(prior_idx)
        dists, params = torch.cat(dists), torch.cat(params)
        # 3. Decode, clip to the padded input frame.
        H, W = input_size
        boxes = distance2bbox(points[prior_idx], dists.float())
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        # 4. Rescale to the original image (not clipped to it afterwards).
        if meta is not None:
            w_scale, h_scale = _scale_factor(meta)
            boxes = boxes / boxes.new_tensor([w_scale, h_scale, w_scale, h_scale])
        # 5. Drop empty boxes; 6. class-aware NMS, keep the best max_per_img.
        valid = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        keep = valid.nonzero().squeeze(1)
        keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], self.iou_thr, self.max_per_img)]
        boxes, scores, labels, prior_idx, params = boxes[keep], scores[keep], labels[keep], prior_idx[keep], params[keep]
        # 7-10. Dynamic convs on the prototypes, then threshold at the output resolution.
        img_idx = torch.zeros_like(prior_idx)
        logits = dynamic_mask_logits(protos[None], params, points[prior_idx], point_strides[prior_idx], img_idx,
                                     proto_stride)  # (N, h, w)
        ry, rx = resize_matrices(tuple(protos.shape[-2:]), proto_stride, (H, W), meta, protos.device)
        threshold = torch.logit(torch.tensor(self.mask_thr, dtype=torch.float64)).item()  # sigmoid > t <=> x > logit(t)
        masks = paste_masks(logits.float(), ry, rx, threshold)
        return {"boxes": boxes, "scores": scores.float(), "labels": labels, "masks": masks}
