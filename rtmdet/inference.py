"""Predictions -> COCO results entries and sprite cut-outs.

Masks may be dense (N, H, W) (``model.predict``) or :class:`rtmdet.crop_masks.CropMasks` (the entry
points, tiled prediction); both give the same entries and cut-outs.
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch

from .crop_masks import CropMasks, tight_box


def mask_rles(masks: torch.Tensor | np.ndarray | CropMasks) -> list[dict]:
    """COCO compressed RLE per mask (``size`` [H, W], ``counts`` bytes): the one encoder of the repo.

    masks: dense (N, H, W) bool (tensor or array) or CropMasks (encoded from the crops, no dense stack).
    """
    if isinstance(masks, CropMasks):
        return masks.to_rle()
    m = torch.as_tensor(masks).detach()
    if not len(m):
        return []
    # (N, W, H) C-contiguous viewed as (H, W, N) is the Fortran order that encode() wants: one copy.
    return mask_util.encode(m.transpose(1, 2).contiguous().to(torch.uint8).cpu().numpy().transpose(2, 1, 0))


def coco_results(pred: dict, image_id: int, label_to_cat_id=None) -> list[dict]:
    """One image's prediction (original pixels) -> COCO results entries.

    Each: ``image_id``, ``category_id`` (``label_to_cat_id[label]``, or the contiguous label 0..C-1
    when None), ``bbox`` [x, y, w, h] (rounded to 0.01 px), ``score`` (to 1e-5), ``segmentation``
    (compressed RLE, ``counts`` str) and ``area`` (mask pixels) when the prediction has masks.
    """
    boxes = pred["boxes"].detach().float().cpu().reshape(-1, 4)  # (N, 4) xyxy
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores = pred["scores"].detach().float().cpu().tolist()
    labels = pred["labels"].detach().cpu().tolist()
    rles = mask_rles(pred["masks"]) if pred.get("masks") is not None and len(labels) else []
    out = []
    for i, (label, box, score) in enumerate(zip(labels, xywh, scores)):
        cat_id = label if label_to_cat_id is None else label_to_cat_id[label]
        r = {"image_id": int(image_id), "category_id": int(cat_id), "bbox": [round(v, 2) for v in box],
             "score": round(score, 5)}
        if rles:
            r["segmentation"] = {"size": [int(s) for s in rles[i]["size"]], "counts": rles[i]["counts"].decode("ascii")}
            r["area"] = int(mask_util.area(rles[i]))
        out.append(r)
    return out


def cutout(image: np.ndarray, mask: np.ndarray,
           offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Cut one instance out of an image: RGBA (h, w, 4) uint8 cropped to the mask's tight box.

    image: (H, W, 3) RGB or (H, W, 4) RGBA uint8, original pixels; mask: (h, w) bool, placed at
    ``offset`` (x0, y0) of the image (a whole-image mask: (0, 0)). The colour is the image's own;
    alpha is 255 inside the mask and 0 outside (times the image's alpha, if any). Returns
    (rgba, (x0, y0, x1, y1)) in image pixels, or None for an empty mask.
    """
    box = tight_box(mask)
    if box is None:
        return None
    bx0, by0, bx1, by1 = box
    alpha = mask[by0:by1, bx0:bx1].astype(np.uint8) * 255  # (h, w)
    x0, y0 = offset[0] + bx0, offset[1] + by0
    x1, y1 = offset[0] + bx1, offset[1] + by1
    crop = image[y0:y1, x0:x1]
    if crop.shape[2] == 4:
        alpha = np.minimum(alpha, crop[..., 3])
    return np.dstack([crop[..., :3], alpha]), (x0, y0, x1, y1)


def cutouts(image: np.ndarray, masks: torch.Tensor | CropMasks) -> list[tuple[np.ndarray, tuple] | None]:
    """:func:`cutout` of every mask, dense (N, H, W) or CropMasks, in order."""
    if isinstance(masks, CropMasks):
        return [cutout(image, *_crop_and_offset(masks, k)) for k in range(len(masks))]
    m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else masks
    return [cutout(image, m[k]) for k in range(len(m))]


def _crop_and_offset(masks: CropMasks, k: int) -> tuple[np.ndarray, tuple[int, int]]:
    crop, (x0, y0, _, _) = masks.mask(k)
    return crop, (x0, y0)
