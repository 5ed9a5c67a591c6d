"""Geometric steps on one sample: random resize and crop, flip, pad, and the test-time letterbox."""

from __future__ import annotations

import numpy as np

from rtmdet.preprocess import letterbox, letterbox_size

from .compose import Sample, SettingsRepr
from .geometry import (hflip, map_boxes, pad_to, place, recompute_boxes, resize_image, resize_sample, select,
                       shift_ignore)


class RandomResize(SettingsRepr):
    """Keep-ratio resize to fit (scale * r)^2, r ~ U(ratio_range) (mmcv ``rescale_size`` rounding)."""

    def __init__(self, scale: int, ratio_range: tuple[float, float] = (0.5, 2.0), nearest: bool = False):
        self.scale, self.ratio_range, self.nearest = scale, tuple(ratio_range), nearest

    def draw(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        """The new (h, w) of an h x w image."""
        target = int(self.scale * rng.uniform(*self.ratio_range))
        f = min(target / h, target / w)
        return max(int(h * f + 0.5), 1), max(int(w * f + 0.5), 1)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return resize_sample(sample, *self.draw(*sample["image"].shape[:2], rng), self.nearest)


class RandomCrop(SettingsRepr):
    """Random ``size`` x ``size`` window (smaller images: the whole extent, Pad fills later).

    Boxes are recomputed from the cropped masks (``recompute_bbox=True``) and instances with
    nothing left in the window dropped (mmdet keeps them with a zero box until FilterAnnotations
    removes them); a crop without instances is kept (``allow_negative_crop=True``).
    """

    def __init__(self, size: int):
        self.size = size

    def draw(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The window (x0, y0, w, h) in an h x w image."""
        oy = int(rng.integers(0, max(h - self.size, 0) + 1))
        ox = int(rng.integers(0, max(w - self.size, 0) + 1))
        return ox, oy, min(w, self.size), min(h, self.size)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        ox, oy, cw, ch = self.draw(*sample["image"].shape[:2], rng)
        return place(sample, sample["image"][oy:oy + ch, ox:ox + cw].copy(), -ox, -oy)


class RandomResizeCrop(SettingsRepr):
    """``RandomResize(scale, ratio_range)`` then ``RandomCrop(size)``, computed as one step.

    Same random draws in the same order and the same result as the two transforms in sequence
    (the image up to +-1 level of rounding), but only the kept window is resampled: the resized
    mosaic (up to (4S)^2 pixels at r = 2) is never materialised, nor are masks outside the window.
    """

    def __init__(self, scale: int, ratio_range: tuple[float, float], size: int, nearest: bool = False):
        self.resize, self.crop, self.nearest = RandomResize(scale, ratio_range, nearest), RandomCrop(size), nearest

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        nh, nw = self.resize.draw(h, w, rng)
        ox, oy, cw, ch = window = self.crop.draw(nh, nw, rng)
        sx, sy = nw / w, nh / h
        # instances whose resized mask extent (+1 px of nearest rounding) misses the window: dropped first
        ext = sample["masks"].boxes() * np.float32([sx, sy, sx, sy]) + np.float32([-1, -1, 1, 1])
        out = select(sample, (ext[:, 0] < ox + cw) & (ext[:, 2] > ox) & (ext[:, 1] < oy + ch) & (ext[:, 3] > oy))
        out["masks"] = out["masks"].resize(nh, nw, window)
        out["image"] = resize_image(sample["image"], nh, nw, self.nearest, window)
        out["scale_factor"] = (sample["scale_factor"][0] * sx, sample["scale_factor"][1] * sy)
        out["ignore_boxes"] = shift_ignore(sample["ignore_boxes"] * np.float32([sx, sy, sx, sy]), -ox, -oy, ch, cw)
        return recompute_boxes(out)


class RandomFlip(SettingsRepr):
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return hflip(sample) if rng.uniform() < self.prob else sample


class Pad(SettingsRepr):
    """Pad bottom/right to ``size`` x ``size`` with 114 (masks with False)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        return pad_to(sample, self.size, self.size)


class Letterbox(SettingsRepr):
    """Test-time resize to fit S (keep ratio, rounded) + pad 114 bottom/right; records scale_factor.

    The image goes through ``rtmdet.preprocess.letterbox``, the exact function used at inference.
    """

    def __init__(self, size: int = 640, nearest: bool = False):
        self.size, self.nearest = size, nearest

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        padded, meta = letterbox(sample["image"], self.size, self.nearest)  # (3, S, S) uint8, ImageMeta
        sx, sy = meta.scale_factor
        out = dict(sample, image=padded.permute(1, 2, 0).numpy(), scale_factor=(sample["scale_factor"][0] * sx,
                                                                                  sample["scale_factor"][1] * sy))
        new_h, new_w = letterbox_size(*sample["image"].shape[:2], self.size)
        out["masks"] = sample["masks"].resize(new_h, new_w).translate(0, 0, self.size, self.size)
        map_boxes(out, lambda b: b * np.float32([sx, sy, sx, sy]))
        return out
