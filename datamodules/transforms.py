"""Training and validation transforms of RTMDet-Ins (spec section 4.5), one small class per step.

A sample is a dict (made by ``datamodules.coco.load_sample``):

* ``image``: uint8 (H, W, 3) RGB.
* ``boxes``: float32 (N, 4) xyxy in pixels of ``image``, x2 / y2 exclusive: a mask's box is
  (min col, min row, max col + 1, max row + 1). Every step that resizes, crops or places pixels
  recomputes the boxes from the masks (mmdet's ``recompute_bbox``), so in training box == mask
  extent exactly; only :class:`Letterbox` (validation) scales the annotation boxes.
* ``labels``: int64 (N,). ``masks``: :class:`InstanceMasks` (N, H, W), kept as tight crops.
* ``ignore_boxes``: float32 (M, 4) xyxy crowd regions, moved with the image, never targets.
* ``image_id`` (COCO id), ``orig_size`` (h, w), ``scale_factor`` (w_scale, h_scale): original =
  input / scale_factor after :class:`Letterbox`; in training it only tracks the resize factors.

Every transform is ``t(sample, rng) -> sample`` with a ``numpy.random.Generator``; it may return
``None`` to reject the sample (the dataset draws another). Transforms never write into their
input's arrays: the Mosaic/MixUp caches keep references to earlier samples.

Images are resized bilinearly without antialiasing (as OpenCV ``INTER_LINEAR`` in the official
pipeline) or, with ``nearest=True`` (pixel art), by nearest-neighbour index sampling; masks are
always resized by nearest-neighbour index sampling with pixel centres, like the nearest images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rtmdet.preprocess import PAD_VALUE, letterbox, letterbox_size

from .masks import InstanceMasks, nearest_index

Sample = dict
Transform = Callable[[Sample, np.random.Generator], "Sample | None"]


# ---------------------------------------------------------------------------------------------
# geometry helpers shared by the transforms


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


def _map_boxes(sample: Sample, fn: Callable[[np.ndarray], np.ndarray]) -> None:
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
    _map_boxes(out, lambda b: np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    return out


HUE_STEPS = 1024  # hue LUT resolution per 60-degree sector (error < 0.25 grey levels)


def hsv_shift(image: np.ndarray, dh: int, ds: int, dv: int, rows: int = 64) -> np.ndarray:
    """Shift hue, saturation and value of a uint8 RGB image; a new uint8 (H, W, 3) array.

    Gains follow OpenCV's 8-bit HSV (H in [0, 180) wrapping, S and V in [0, 255] clipped), computed
    in float on the continuous hexcone, so there is no 8-bit round-trip loss (OpenCV's own round
    trip changes pixels by up to ~4 levels even with zero gains). Grey pixels have hue 0, so a
    positive saturation gain tints them red, as in OpenCV. Vectorised over blocks of ``rows`` rows
    (cache-sized); the hue -> channel weight curve, shifted by ``dh``, is a lookup table.
    """
    # channel k = V - C * clip(min(t, 4 - t), 0, 1), t = (n_k + hue in sectors) mod 6, n = 5, 3, 1 for R, G, B
    t = (np.arange(6 * HUE_STEPS) + 0.5) / HUE_STEPS + dh / 30.0  # 180 OpenCV hue units = 6 sectors
    luts = [np.clip(np.minimum((t + n) % 6, 4 - (t + n) % 6), 0, 1).astype(np.float32) for n in (5, 3, 1)]
    out = np.empty(image.shape, np.uint8)
    for y in range(0, image.shape[0], rows):
        r, g, b = np.ascontiguousarray(image[y:y + rows].transpose(2, 0, 1)).astype(np.float32)  # (rows, W)
        v = np.maximum(np.maximum(r, g), b)
        c = v - np.minimum(np.minimum(r, g), b)  # chroma
        # hue in sectors: max r: (g - b) / c; max g: 2 + (b - r) / c; max b: 4 + (r - g) / c
        h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * c, r - g + 4 * c))
        np.divide(h, c, out=h, where=c > 0)
        h *= HUE_STEPS
        hue = h.astype(np.int32) % (6 * HUE_STEPS)
        s = np.divide(c, v, out=np.zeros_like(c), where=v > 0)
        if ds:
            s += ds / 255.0
            np.clip(s, 0, 1, out=s)
        if dv:
            v += dv
            np.clip(v, 0, 255, out=v)
        s *= v  # chroma after the shift
        v += 0.5  # round on the truncating cast below
        for ch in range(3):
            k = luts[ch].take(hue)
            k *= s
            np.subtract(v, k, out=k)
            out[y:y + rows, :, ch] = k
    return out


# ---------------------------------------------------------------------------------------------
# the transforms


class _Repr:
    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "cache")
        return f"{type(self).__name__}({args})"


class Compose:
    """Apply transforms in order; stops with ``None`` when one rejects the sample."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample | None:
        for t in self.transforms:
            sample = t(sample, rng)
            if sample is None:
                return None
        return sample

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {t!r},\n" for t in self.transforms) + ")"


class CachedMosaic(_Repr):
    """4-tile mosaic on a (2S, 2S) canvas of 114 around a random centre, from a cache of samples.

    The incoming sample is fitted to S x S (keep ratio) and pushed into the cache (popping the oldest
    or a random entry beyond ``max_cached``); while the cache holds <= 4 entries the sample passes
    through unchanged. Otherwise the current sample is the top-left tile and 3 random cached ones
    fill the other quadrants; masks are cut at the canvas border, instances outside it dropped.
    """

    def __init__(self, img_size: int = 640, max_cached: int = 20, random_pop: bool = False, prob: float = 1.0,
                 center_ratio: tuple[float, float] = (0.5, 1.5), nearest: bool = False):
        self.img_size, self.max_cached, self.random_pop, self.prob = img_size, max_cached, random_pop, prob
        self.center_ratio, self.nearest = center_ratio, nearest
        self.cache: list[Sample] = []

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        S = self.img_size
        fitted = resize_sample(sample, *fit_size(*sample["image"].shape[:2], S), nearest=self.nearest)
        self.cache.append(fitted)
        if len(self.cache) > self.max_cached:
            self.cache.pop(int(rng.integers(len(self.cache))) if self.random_pop else 0)
        if len(self.cache) <= 4 or rng.uniform() > self.prob:
            return sample
        tiles = [fitted] + [self.cache[i] for i in rng.integers(0, len(self.cache), 3)]
        cx, cy = (int(rng.uniform(*self.center_ratio) * S) for _ in range(2))
        canvas = np.full((2 * S, 2 * S, 3), PAD_VALUE, np.uint8)
        placed = []
        for loc, tile in enumerate(tiles):  # top-left, top-right, bottom-left, bottom-right
            h, w = tile["image"].shape[:2]
            x1 = max(cx - w, 0) if loc in (0, 2) else cx  # paste region on the canvas
            x2 = cx if loc in (0, 2) else min(cx + w, 2 * S)
            y1 = max(cy - h, 0) if loc in (0, 1) else cy
            y2 = cy if loc in (0, 1) else min(cy + h, 2 * S)
            tx = w - (x2 - x1) if loc in (0, 2) else 0  # top-left of the visible part of the tile
            ty = h - (y2 - y1) if loc in (0, 1) else 0
            canvas[y1:y2, x1:x2] = tile["image"][ty:ty + y2 - y1, tx:tx + x2 - x1]
            placed.append(place(tile, canvas, x1 - tx, y1 - ty))
        return concat(placed, canvas)


class RandomResize(_Repr):
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


class RandomCrop(_Repr):
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


class RandomResizeCrop(_Repr):
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


class YOLOXHSVRandomAug(_Repr):
    """HSV gains U(-1, 1) x (5, 30, 30), each zeroed with p 0.5, truncated to integers (as mmdet)."""

    def __init__(self, hue_delta: int = 5, saturation_delta: int = 30, value_delta: int = 30):
        self.deltas = np.array([hue_delta, saturation_delta, value_delta], np.float64)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        gains = rng.uniform(-1, 1, 3) * self.deltas * rng.integers(0, 2, 3)
        dh, ds, dv = gains.astype(np.int16).tolist()
        if dh == ds == dv == 0:
            return sample
        return dict(sample, image=hsv_shift(sample["image"], dh, ds, dv))


class RandomFlip(_Repr):
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return hflip(sample) if rng.uniform() < self.prob else sample


class Pad(_Repr):
    """Pad bottom/right to ``size`` x ``size`` with 114 (masks with False)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        return pad_to(sample, self.size, self.size)


class CachedMixUp(_Repr):
    """Blend 0.5/0.5 with a cached partner (>= 1 box, up to ``max_iters`` draws) and add its GTs.

    The current sample enters the cache first (so it may be its own partner, as in mmdet). The
    partner is resized to fit S x S, put top-left on a 114 canvas, flipped with p 0.5, padded to
    the current size if smaller and randomly cropped to it; instances that leave are dropped.
    """

    def __init__(self, img_size: int = 640, max_cached: int = 10, random_pop: bool = False, prob: float = 0.5,
                 max_iters: int = 15, flip_ratio: float = 0.5, nearest: bool = False):
        self.img_size, self.max_cached, self.random_pop, self.prob = img_size, max_cached, random_pop, prob
        self.max_iters, self.flip_ratio, self.nearest = max_iters, flip_ratio, nearest
        self.cache: list[Sample] = []

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        self.cache.append(sample)
        if len(self.cache) > self.max_cached:
            self.cache.pop(int(rng.integers(len(self.cache))) if self.random_pop else 0)
        if len(self.cache) <= 1 or rng.uniform() > self.prob:
            return sample
        for _ in range(self.max_iters):
            partner = self.cache[int(rng.integers(len(self.cache)))]
            if len(partner["boxes"]):
                break
        if not len(partner["boxes"]):
            return sample
        flip = rng.uniform() > self.flip_ratio
        S = self.img_size
        partner = resize_sample(partner, *fit_size(*partner["image"].shape[:2], S), nearest=self.nearest)
        partner = pad_to(partner, S, S)  # top-left on the S x S canvas of 114
        if flip:
            partner = hflip(partner)
        th, tw = sample["image"].shape[:2]
        partner = pad_to(partner, max(S, th), max(S, tw))
        ph, pw = partner["image"].shape[:2]
        oy = int(rng.integers(0, ph - th + 1)) if ph > th else 0
        ox = int(rng.integers(0, pw - tw + 1)) if pw > tw else 0
        window = partner["image"][oy:oy + th, ox:ox + tw]
        # 0.5 a + 0.5 b truncated to uint8 == (a + b) >> 1
        image = ((sample["image"].astype(np.uint16) + window) >> 1).astype(np.uint8)
        partner = place(partner, image, -ox, -oy)
        return concat([sample, partner], image)


class FilterAnnotations(_Repr):
    """Keep instances with box width and height > ``min_wh`` and a non-empty mask.

    ``reject_empty``: return None when nothing remains (official; the dataset draws another).
    With False, samples without instances go on as negatives.
    """

    def __init__(self, min_wh: tuple[float, float] = (1.0, 1.0), reject_empty: bool = False):
        self.min_wh, self.reject_empty = tuple(min_wh), reject_empty

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample | None:
        def big(b: np.ndarray) -> np.ndarray:
            return ((b[:, 2] - b[:, 0]) > self.min_wh[0]) & ((b[:, 3] - b[:, 1]) > self.min_wh[1])

        out = select(sample, big(sample["boxes"]) & (sample["masks"].areas() > 0))
        out["ignore_boxes"] = sample["ignore_boxes"][big(sample["ignore_boxes"])]
        if self.reject_empty and not len(out["boxes"]):
            return None
        return out


class Letterbox(_Repr):
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
        _map_boxes(out, lambda b: b * np.float32([sx, sy, sx, sy]))
        return out


# ---------------------------------------------------------------------------------------------
# the official pipelines


def train_pipeline(stage: int = 1, img_size: int = 640, resize_ratio: tuple[float, float] = (0.5, 2.0),
                   mosaic_cache: int = 20, mixup_cache: int = 10, mixup_prob: float = 0.5,
                   random_pop: bool = False, nearest: bool = False, reject_empty: bool = False) -> Compose:
    """Stage 1 (Mosaic ... MixUp, Filter) or stage 2 (no Mosaic/MixUp) of spec 4.5, tiny defaults."""
    S = img_size
    if stage == 1:
        return Compose([
            CachedMosaic(S, mosaic_cache, random_pop, nearest=nearest),
            RandomResizeCrop(2 * S, resize_ratio, S, nearest),  # RandomResize(2S * r) -> RandomCrop(S)
            YOLOXHSVRandomAug(),
            RandomFlip(0.5),
            Pad(S),
            CachedMixUp(S, mixup_cache, random_pop, mixup_prob, nearest=nearest),
            FilterAnnotations((1, 1), reject_empty),
        ])
    if stage == 2:
        return Compose([
            RandomResizeCrop(S, resize_ratio, S, nearest),  # RandomResize(S * r) -> RandomCrop(S)
            FilterAnnotations((1, 1), reject_empty),
            YOLOXHSVRandomAug(),
            RandomFlip(0.5),
            Pad(S),
        ])
    raise ValueError(f"stage must be 1 or 2, got {stage}")


def val_pipeline(img_size: int = 640, nearest: bool = False) -> Compose:
    """Letterbox to fit + pad 114 (the test pipeline; normalisation happens on the batch)."""
    return Compose([Letterbox(img_size, nearest)])
