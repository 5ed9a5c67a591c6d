"""The multi-image steps of stage 1: :class:`CachedMosaic` and :class:`CachedMixUp`.

Each keeps a cache of recent samples (one per process: every dataloader worker has its own) and
mixes the incoming sample with random cached ones, as mmdet's ``CachedMosaic`` / ``CachedMixUp``.
"""

from __future__ import annotations

import numpy as np

from rtmdet.preprocess import PAD_VALUE

from .compose import Sample, SettingsRepr
from .geometry import concat, fit_size, hflip, pad_to, place, resize_sample


class CachedMosaic(SettingsRepr):
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


class CachedMixUp(SettingsRepr):
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
