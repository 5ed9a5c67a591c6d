"""Raw outputs -> instances (boxes, scores, labels, masks), in the reference's exact order.

The numbered steps are those of docs/architecture.md#test-time-postprocess.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .crop_masks import CropMasks
from .dynamic_mask import dynamic_mask_logits
from .mask_paste import paste_mask_crops, paste_masks, resize_matrices
from .nms import batched_nms
from .outputs import RawOutputs
from .preprocess import ImageMeta
from .priors import distance2bbox, grid_priors

MASK_FORMATS = ("dense", "crops")
TEST_SETTINGS = ("score_thr", "nms_pre", "iou_thr", "max_per_img", "mask_thr")  # what settings() returns


class InstancePostProcess(nn.Module):
    """Score threshold and per-level top-k, box decoding, class-aware NMS, dynamic masks.

    The test-time settings are constructor arguments and never change afterwards: a caller that
    wants another threshold builds its own postprocess. Defaults are the official RTMDet-Ins test
    settings. Detection is multi-label: one prior can yield several (class, score) instances.

    ``mask_format``: ``"dense"`` gives ``masks`` as one (N, h, w) bool tensor of the output frame
    (the ``model.predict`` contract); ``"crops"`` gives a :class:`rtmdet.crop_masks.CropMasks`,
    each instance's mask inside its own box, so that memory grows with the instances' areas and
    not with N x the image size (what the entry points use).
    """

    def __init__(
        self,
        score_thr: float = 0.05,
        nms_pre: int = 1000,
        iou_thr: float = 0.6,
        max_per_img: int = 100,
        mask_thr: float = 0.5,
        strides: tuple[int, ...] = (8, 16, 32),
        mask_format: str = "dense",
    ):
        super().__init__()
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        self.score_thr = score_thr
        self.nms_pre = nms_pre
        self.iou_thr = iou_thr
        self.max_per_img = max_per_img
        self.mask_thr = mask_thr
        self.strides = tuple(strides)
        self.mask_format = mask_format

    def settings(self) -> dict:
        """The five test-time settings, as keyword arguments that rebuild them."""
        return {k: getattr(self, k) for k in TEST_SETTINGS}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items()) + f", mask_format={self.mask_format!r}"

    def forward(self, outputs: RawOutputs, metas: list[ImageMeta] | None = None) -> list[dict]:
        """outputs: ``RawOutputs`` of a padded (B, 3, H, W) input; metas: optional per-image ``ImageMeta``.

        With metas, results are in original-image pixels; without, in input pixels. Returns per image
        ``boxes`` (N, 4) xyxy float, ``scores`` (N,) float, ``labels`` (N,) int64 and ``masks`` (see
        ``mask_format``), sorted by score.
        """
        cls_logits, box_dists, kernels, protos = outputs
        strides = self.strides
        proto_stride = outputs.proto_stride(strides[0])  # 8, or 4 (opt-in)
        input_size = (protos.shape[-2] * proto_stride, protos.shape[-1] * proto_stride)  # (H, W): inputs are x32
        sizes = [tuple(x.shape[-2:]) for x in cls_logits]
        points, point_strides = _cached_priors(tuple(sizes), strides, protos.device)  # (P, 2), (P,)
        level_starts = [0] + torch.tensor([h * w for h, w in sizes]).cumsum(0).tolist()
        results = []
        for b in range(protos.shape[0]):
            meta = None if metas is None else metas[b]
            results.append(
                self.single(
                    [x[b] for x in cls_logits], [x[b] for x in box_dists], [x[b] for x in kernels],
                    protos[b], points, point_strides, level_starts, input_size, meta,
                )
            )
        return results

    def single(self, cls_logits, box_dists, kernels, protos, points, point_strides, level_starts,
               input_size, meta: ImageMeta | None) -> dict:
        # 1-2. Per level: keep (prior, class) pairs scoring above score_thr, the top nms_pre of
        # them, and gather the candidates' box distances. Ranking raw logits is ranking sigmoid
        # scores; a class-major flat index avoids transposing the (C, H*W) map.
        scores, labels, prior_idx, dists = [], [], [], []
        logit_thr = _logit(self.score_thr)
        for lvl, logits in enumerate(cls_logits):
            flat_logits = logits.flatten()  # (C*H*W,) class-major
            # The best nms_pre of those above score_thr = the best nms_pre overall, then thresholded.
            kept, flat = flat_logits.topk(min(self.nms_pre, len(flat_logits)))  # sorted, descending
            above = kept > logit_thr
            kept, flat = kept[above], flat[above]
            num_priors = logits.shape[1] * logits.shape[2]
            local = flat % num_priors
            scores.append(kept.sigmoid())
            labels.append(flat // num_priors)
            prior_idx.append(local + level_starts[lvl])
            dists.append(box_dists[lvl].flatten(1)[:, local].t())  # (M_l, 4)
        scores, labels, prior_idx, dists = torch.cat(scores), torch.cat(labels), torch.cat(prior_idx), torch.cat(dists)
        # 3. Decode, clip to the padded input frame.
        H, W = input_size
        boxes = distance2bbox(points[prior_idx], dists.float())
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        # 4. Rescale to the original image (not clipped to it afterwards).
        if meta is not None:
            w_scale, h_scale = meta.scale_factor
            boxes = boxes / boxes.new_tensor([w_scale, h_scale, w_scale, h_scale])
        # 5. Drop empty boxes; 6. class-aware NMS, keep the best max_per_img.
        valid = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        keep = valid.nonzero().squeeze(1)
        keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], self.iou_thr, self.max_per_img)]
        boxes, scores, labels, prior_idx = boxes[keep], scores[keep], labels[keep], prior_idx[keep]
        params = _gather_priors(kernels, prior_idx, level_starts)  # (N, 169): only the kept instances
        # 7-10. Dynamic convs on the prototypes, then threshold at the output resolution.
        img_idx = torch.zeros_like(prior_idx)
        proto_stride = int(H) // protos.shape[-2]
        logits = dynamic_mask_logits(protos[None], params, points[prior_idx], point_strides[prior_idx], img_idx,
                                     proto_stride)  # (N, h, w)
        frame = None if meta is None else ImageMeta(meta.orig_size, meta.scale_factor, meta.input_size)  # cache key
        ry, rx = _cached_resize(tuple(protos.shape[-2:]), proto_stride, (int(H), int(W)), frame, protos.device)
        if self.mask_format == "crops":
            crops, regions = paste_mask_crops(logits.float(), ry, rx, _logit(self.mask_thr))
            masks = CropMasks(crops, regions, (ry.shape[0], rx.shape[0]))
        else:
            masks = paste_masks(logits.float(), ry, rx, _logit(self.mask_thr))
        return {"boxes": boxes, "scores": scores.float(), "labels": labels, "masks": masks}


def _logit(p: float) -> float:
    """sigmoid(x) > p <=> x > logit(p) (float64, so the comparison is as exact as the sigmoid's)."""
    return torch.logit(torch.tensor(p, dtype=torch.float64)).item()


def _gather_priors(maps: list[torch.Tensor], prior_idx: torch.Tensor, level_starts: list[int]) -> torch.Tensor:
    """maps: per level (K, H_l, W_l); prior_idx (N,) indices into the concatenated levels -> (N, K)."""
    out = maps[0].new_empty((len(prior_idx), maps[0].shape[0]))
    for lvl, m in enumerate(maps):
        sel = ((prior_idx >= level_starts[lvl]) & (prior_idx < level_starts[lvl + 1])).nonzero().squeeze(1)
        out[sel] = m.flatten(1)[:, prior_idx[sel] - level_starts[lvl]].t()
    return out


# Priors and interpolation matrices depend only on sizes: computed once per input/original size.
# Callers only read (index) the cached tensors.
@functools.lru_cache(maxsize=8)
def _cached_priors(sizes: tuple, strides: tuple, device: torch.device):
    return grid_priors(list(sizes), strides, device)


@functools.lru_cache(maxsize=64)
def _cached_resize(feat_size: tuple, stride: int, input_size: tuple, frame: ImageMeta | None, device: torch.device):
    """frame: None (input pixels) or the image's ``ImageMeta`` (image_id left out)."""
    return resize_matrices(feat_size, stride, input_size, frame, device)
