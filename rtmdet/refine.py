"""Pixel-exact masks for pixel art: snap each predicted mask to the image's own pixels.

Predicted masks come from stride-8 prototypes upsampled bilinearly, so an 8-16 px sprite's mask
is a soft blob: it spills onto the background around the sprite, rounds its corners and fills
its holes. Pixel art is drawn with a few flat colours and hard edges, so the image itself says
which pixels are the sprite's: around each instance the colours that occur mostly inside the
predicted mask are the sprite's, those that occur mostly outside it are the background's.

For each instance, inside its box grown by a ring of ``ring`` pixels (``ring_fraction`` of the box
side, at least ``min_ring``):

* each exact RGB colour c is counted inside the predicted mask (n_in) and outside it (n_out);
  with f_in = n_in / |mask| and f_out = n_out / |outside|, c is the instance's when
  f_in > ``ratio`` x f_out, the background's when f_out > ``bg_ratio`` x f_in, undecided otherwise.
  A flat background has f_out = 1 and, inside the mask, only the spill: f_in = 1 - sprite / |mask|,
  which is close to 1 for a blob around an 8-px sprite, hence ``bg_ratio`` just above 1; a sprite
  drawn in its background's colour has f_in = f_out = 1, undecided;
* the refined mask = the instance's colours within ``reach`` px of the predicted mask (a blob
  that missed a 1-px antenna or a corner gets it back; another sprite of the same colours farther
  away stays out), plus the predicted pixels of undecided colours (a sprite drawn in the colour of
  its background keeps its prediction). Background colours are dropped, so holes open and the
  spill is cut off exactly at the sprite's edge.

When the colours give no evidence the prediction is kept unchanged: every colour undecided (a
sprite on its own colour), or the refined mask empty or keeping less than ``min_overlap`` of the
predicted pixels (a blob around an 8-px sprite keeps about 15% of its pixels, a detection on plain
background far less). On photographs or JPEG noise nearly every colour is unique, so each pixel
keeps its side of the prediction and the mask comes back as predicted.
"""

from __future__ import annotations

import numpy as np
import torch

from .crop_masks import CropMasks


def _colour_keys(image: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) -> int32 (h, w) exact RGB key."""
    rgb = image[..., :3].astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a (h, w) bool mask by r px (separable running max)."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in (0, 1)])
        n = out.shape[axis]
        out = np.zeros_like(out)
        for d in range(2 * r + 1):
            out |= padded[d:d + n] if axis == 0 else padded[:, d:d + n]
    return out


def refine_instance(image: np.ndarray, mask: np.ndarray, ratio: float = 2.0, bg_ratio: float = 1.05, reach: int = 1,
                    min_overlap: float = 0.1) -> np.ndarray:
    """Refine one mask inside a window of the image (the box plus its ring).

    image: uint8 (h, w, 3) window; mask: (h, w) bool prediction in the same window.
    Returns the refined (h, w) bool mask (the prediction itself when the colours say nothing).
    """
    n_mask = int(mask.sum())
    if n_mask == 0 or n_mask == mask.size:
        return mask
    keys = _colour_keys(image)
    colours, index = np.unique(keys, return_inverse=True)
    index = index.reshape(keys.shape)
    n_in = np.bincount(index[mask], minlength=len(colours))  # (K,) pixels of each colour inside
    n_out = np.bincount(index[~mask], minlength=len(colours))
    f_in, f_out = n_in / n_mask, n_out / (mask.size - n_mask)
    mine, theirs = f_in > ratio * f_out, f_out > bg_ratio * f_in  # (K,) bool
    refined = (mine[index] & dilate(mask, reach)) | (mask & ~mine[index] & ~theirs[index])
    kept = int((refined & mask).sum())
    if kept == 0 or kept < min_overlap * n_mask:
        return mask
    return refined


def refine_masks(image: np.ndarray | torch.Tensor, masks: CropMasks, boxes: torch.Tensor | None = None,
                 ratio: float = 2.0, bg_ratio: float = 1.05, reach: int = 1, ring_fraction: float = 0.25,
                 min_ring: int = 2, min_overlap: float = 0.1) -> CropMasks:
    """Snap predicted masks to the pixel-art colours of the image they were predicted on.

    Args:
        image: uint8 (H, W, 3) RGB (or (H, W, 4), alpha ignored), the original image of ``masks``.
        masks: N predictions in the (H, W) frame of ``image``.
        boxes: optional (N, 4) xyxy detector boxes, original pixels; the window of instance k is
            the union of its mask's extent and its box, grown by the ring.
        ratio, bg_ratio, reach, ring_fraction, min_ring, min_overlap: see the module docstring.

    Returns CropMasks of the same N instances and frame, each crop its mask's tight box.
    """
    image = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    H, W = masks.size
    if image.shape[:2] != (H, W):
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}, masks are of a {H}x{W} frame")
    tight = masks.boxes()  # (N, 4) int64 xyxy
    crops, regions = [], torch.zeros(len(masks), 4, dtype=torch.int64)
    for k in range(len(masks)):
        crop, (rx0, ry0, rx1, ry1) = masks.mask(k)
        x0, y0, x1, y1 = tight[k].tolist()
        if x1 <= x0:  # empty prediction: nothing to refine
            crops.append(masks.crops[k].cpu())
            regions[k] = masks.regions[k]
            continue
        if boxes is not None:
            bx0, by0, bx1, by1 = boxes[k].tolist()
            x0, y0 = min(x0, int(bx0)), min(y0, int(by0))
            x1, y1 = max(x1, int(np.ceil(bx1))), max(y1, int(np.ceil(by1)))
        ring = max(min_ring, int(round(ring_fraction * max(x1 - x0, y1 - y0))))
        wx0, wy0, wx1, wy1 = max(x0 - ring, 0), max(y0 - ring, 0), min(x1 + ring, W), min(y1 + ring, H)
        window = np.zeros((wy1 - wy0, wx1 - wx0), bool)  # the prediction inside the window
        sx0, sy0, sx1, sy1 = max(rx0, wx0), max(ry0, wy0), min(rx1, wx1), min(ry1, wy1)
        window[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0] = crop[sy0 - ry0:sy1 - ry0, sx0 - rx0:sx1 - rx0]
        refined = refine_instance(image[wy0:wy1, wx0:wx1], window, ratio, bg_ratio, reach, min_overlap)
        crops.append(torch.from_numpy(refined))
        regions[k] = torch.tensor([wx0, wy0, wx1, wy1])
    return CropMasks(crops, regions, (H, W)).tight()
