"""The last step of both training stages: drop instances too small to learn from."""

from __future__ import annotations

import numpy as np

from .compose import Sample, SettingsRepr
from .geometry import select


class FilterAnnotations(SettingsRepr):
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
