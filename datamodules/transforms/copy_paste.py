"""Simple Copy-Paste (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for
Instance Segmentation", CVPR 2021) with exact masks, from a cache of recent samples.

The paper pastes a random subset of one image's instances onto another, both already scale-jittered,
at the same positions; instances of the target that the pasted pixels cover lose those pixels,
and those covered entirely are dropped. Here the partner comes from a cache of recent samples (as
:class:`~datamodules.transforms.mixing.CachedMixUp` keeps one), after the pipeline's own random
resize-crop, so both are jittered independently. Pixels are pasted hard (no blending): a pasted
instance's mask is exactly its partner mask, which pixel art needs.
"""

from __future__ import annotations

import numpy as np

from .compose import Sample, SettingsRepr
from .geometry import concat, recompute_boxes


class CopyPaste(SettingsRepr):
    """Paste 1..``max_instances`` instances of a cached partner onto the sample with probability ``prob``.

    The sample enters the cache first (oldest or, with ``random_pop``, a random entry popped beyond
    ``max_cached``); the partner is drawn among the *other* cached samples that have instances (up to
    ``max_iters`` draws), so nothing is pasted onto itself. A partner of another size sits at a random
    offset (the same position when the sizes agree, as in the paper); instances cut off by the frame
    keep their inside part and vanish when nothing is inside. The pasted instances come last (on top):
    the sample's masks lose the pasted pixels and their boxes shrink to what is left; instances with
    no pixel left are dropped. Ignore boxes stay the sample's.
    """

    def __init__(self, prob: float = 0.5, max_instances: int = 20, max_cached: int = 10, random_pop: bool = False,
                 max_iters: int = 15):
        if not 0 <= prob <= 1 or max_instances < 1 or max_cached < 2:
            raise ValueError(f"CopyPaste needs 0 <= prob <= 1, max_instances >= 1 and max_cached >= 2, got "
                             f"prob={prob}, max_instances={max_instances}, max_cached={max_cached}")
        self.prob, self.max_instances, self.max_cached = prob, max_instances, max_cached
        self.random_pop, self.max_iters = random_pop, max_iters
        self.cache: list[Sample] = []

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        self.cache.append(sample)
        if len(self.cache) > self.max_cached:
            self.cache.pop(int(rng.integers(len(self.cache))) if self.random_pop else 0)
        if len(self.cache) <= 1 or rng.uniform() > self.prob:
            return sample
        for _ in range(self.max_iters):
            partner = self.cache[int(rng.integers(len(self.cache) - 1))]  # the last entry is the sample
            if len(partner["labels"]):
                break
        if not len(partner["labels"]):
            return sample
        h, w = sample["image"].shape[:2]
        ph, pw = partner["image"].shape[:2]
        dx = int(rng.integers(min(0, w - pw), max(0, w - pw) + 1))  # partner offset in the sample's frame
        dy = int(rng.integers(min(0, h - ph), max(0, h - ph) + 1))
        n = len(partner["labels"])
        chosen = np.sort(rng.choice(n, int(rng.integers(1, min(self.max_instances, n) + 1)), replace=False))
        masks = partner["masks"][chosen].translate(dx, dy, h, w)
        keep = masks.areas() > 0
        if not keep.any():
            return sample
        masks, labels = masks[keep], partner["labels"][chosen][keep]
        image = sample["image"].copy()
        covered = np.zeros((h, w), bool)
        for c, (x, y) in zip(masks.crops, masks.offsets):  # (ch, cw) crop at (x, y) of the sample's frame
            ch, cw = c.shape
            image[y:y + ch, x:x + cw][c] = partner["image"][y - dy:y - dy + ch, x - dx:x - dx + cw][c]
            covered[y:y + ch, x:x + cw] |= c
        below = recompute_boxes(dict(sample, image=image, masks=sample["masks"].erase(covered)))
        pasted = {"boxes": masks.boxes(), "labels": labels.astype(np.int64), "masks": masks,
                  "ignore_boxes": np.zeros((0, 4), np.float32)}
        return concat([below, pasted], image)
