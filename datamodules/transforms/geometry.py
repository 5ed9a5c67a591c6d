"""What the transforms do to a sample: resize, place on a canvas, pad, flip, keep some instances.

No randomness here: the transforms draw their parameters and call these. The functions that take a
sample return a new (shallow-copied) one and leave their input's arrays untouched (``map_boxes``
rewrites the boxes of a copy its caller has just made). Boxes follow the masks (see the package
docstring).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rtmdet.preprocess import PAD_VALUE

from ..masks import InstanceMasks, nearest_index
from .compose import Sample


def resize_image(image: np.ndarray, height: int, width: int, nearest: bool = False,
                 window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3), bilinear (no antialias) or nearest.

    ``window`` = (x0, y0, w, h): return only that part of the resized image, (h, w, 3). Upscaled
    windows are resampled alone (PIL with a fractional source box; same pixels as the full resize
    up to +-1 rounding), so a 2x resize followed by a crop costs no more than the crop.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width) and window is None:
        return image
    wx, wy, ww, wh = window if window is not None else (0, 0, width, height)
    if nearest:
        return image[nearest_index(h, height)[wy:wy + wh, None], nearest_index(w, width)[wx:wx + ww]]
    if (h, w) == (height, width):
        return image[wy:wy + wh, wx:wx + ww].copy()
    if window is not None and height > h and width > w:
        kx, ky = w / width, h / height
        box = (wx * kx, wy * ky, (wx + ww) * kx, (wy + wh) * ky)
        return np.array(Image.fromarray(image).resize((ww, wh), Image.BILINEAR, box=box))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) channels-last
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return np.ascontiguousarray(y[0, :, wy:wy + wh, wx:wx + ww].permute(1, 2, 0).numpy())  # (wh, ww, 3)


def map_boxes(sample: Sample, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Apply a box function to ``boxes`` and ``ignore_boxes`` of a (shallow-copied) sample."""
    for key in ("boxes", "ignore_boxes"):
        sample[key] = fn(sample[key]).astype(np.float32)


def select(sample: Sample, keep: np.ndarray) -> Sample:
    """Keep the instances ``keep`` (bool or int index) of boxes, labels and masks together."""
    out = dict(sample)
    out["boxes"], out["labels"], out["masks"] = sample["boxes"][keep], sample["labels"][keep], sample["masks"][keep]
    return out


def resize_sample(sample: Sample, height: int, width: int, nearest: bool = False) -> Sample:
    """Resize image and masks to (height, width); boxes become the resized masks' extents (a mask
    that vanished gets a zero box), ignore boxes scale."""
    h, w = sample["image"].shape[:2]
    sx, sy = width / w, height / h
    out = dict(sample, image=resize_image(sample["image"], height, width, nearest),
               masks=sample["masks"].resize(height, width),
               scale_factor=(sample["scale_factor"][0] * sx, sample["scale_factor"][1] * sy))
    out["boxes"] = out["masks"].boxes()
    out["ignore_boxes"] = (sample["ignore_boxes"] * np.float32([sx, sy, sx, sy])).astype(np.float32)
    return out


def fit_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after the keep-ratio resize to fit ``size`` of Mosaic/MixUp (mmdet truncates)."""
    ratio = min(size / h, size / w)
    return max(int(h * ratio), 1), max(int(w * ratio), 1)


def shift_ignore(boxes: np.ndarray, dx: float, dy: float, height: int, width: int) -> np.ndarray:
    """Ignore (crowd) boxes moved by (dx, dy), clipped to height x width; those outside dropped
    (mmdet ``is_inside``)."""
    b = np.clip(boxes + np.float32([dx, dy, dx, dy]), 0, [width, height, width, height]).astype(np.float32)
    return b[(b[:, 0] < width) & (b[:, 1] < height) & (b[:, 2] > 0) & (b[:, 3] > 0)]


def recompute_boxes(sample: Sample) -> Sample:
    """Boxes from the masks (mmdet ``recompute_bbox``); instances whose mask is empty dropped."""
    out = select(sample, sample["masks"].areas() > 0)
    out["boxes"] = out["masks"].boxes()
    return out


def place(sample: Sample, canvas: np.ndarray, dx: int, dy: int) -> Sample:
    """Sample moved by (dx, dy) into ``canvas`` (which already holds its pixels), cut to it.

    Masks are cut at the canvas border and boxes recomputed from them, so instances with nothing
    left are dropped (mmdet clips the boxes and drops those outside: the same for a box equal to
    its mask's extent, which our boxes are after the first geometric step).
    """
    height, width = canvas.shape[:2]
    out = dict(sample, image=canvas, masks=sample["masks"].translate(dx, dy, height, width))
    out["ignore_boxes"] = shift_ignore(sample["ignore_boxes"], dx, dy, height, width)
    return recompute_boxes(out)


def concat(samples: Sequence[Sample], image: np.ndarray) -> Sample:
    """Instances of several samples (already in the frame of ``image``) gathered in order."""
    out = dict(samples[0], image=image)
    for key in ("boxes", "ignore_boxes"):
        out[key] = np.concatenate([s[key] for s in samples]).astype(np.float32)
    out["labels"] = np.concatenate([s["labels"] for s in samples]).astype(np.int64)
    out["masks"] = InstanceMasks.concat([s["masks"] for s in samples])
    return out


def pad_to(sample: Sample, height: int, width: int) -> Sample:
    """Pad bottom/right to height x width with 114 (masks with False)."""
    h, w = sample["image"].shape[:2]
    if (h, w) == (height, width):
        return sample
    if h > height or w > width:
        raise ValueError(f"cannot pad a {h}x{w} image to {height}x{width}")
    canvas = np.full((height, width, 3), PAD_VALUE, np.uint8)
    canvas[:h, :w] = sample["image"]
    return dict(sample, image=canvas, masks=sample["masks"].translate(0, 0, height, width))


def hflip(sample: Sample) -> Sample:
    """Mirror left-right: image, masks, and boxes x -> W - x."""
    w = sample["image"].shape[1]
    out = dict(sample, image=np.ascontiguousarray(sample["image"][:, ::-1]), masks=sample["masks"].flip())
    map_boxes(out, lambda b: np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    return out
