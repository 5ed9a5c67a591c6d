"""Colour augmentation: the HSV shift of YOLOX, exact on the continuous hexcone."""

from __future__ import annotations

import numpy as np

from .compose import Sample, SettingsRepr

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


class YOLOXHSVRandomAug(SettingsRepr):
    """HSV gains U(-1, 1) x (5, 30, 30), each zeroed with p 0.5, truncated to integers (as mmdet)."""

    def __init__(self, hue_delta: int = 5, saturation_delta: int = 30, value_delta: int = 30):
        self.deltas = np.array([hue_delta, saturation_delta, value_delta], np.float64)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        gains = rng.uniform(-1, 1, 3) * self.deltas * rng.integers(0, 2, 3)
        dh, ds, dv = gains.astype(np.int16).tolist()
        if dh == ds == dv == 0:
            return sample
        return dict(sample, image=hsv_shift(sample["image"], dh, ds, dv))
