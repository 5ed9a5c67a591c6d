"""A COCO annotation file's samples through a transform pipeline, as a torch ``Dataset``."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .coco import CocoAnnotations, load_sample
from .errors import DatasetError


class CocoDataset(Dataset):
    """Samples of a :class:`CocoAnnotations` through a transform pipeline.

    ``dataset[(i, stage)]`` (what ``TrainSampler`` yields) or ``dataset[i]``: stage 2 uses
    ``stage2_pipeline`` (when given), stage 1 and a plain index ``pipeline``. A pipeline may reject a sample (``None``); another random index
    is drawn then. Transforms draw from one ``numpy.random.Generator`` per process, seeded from the
    dataloader worker's seed (or ``seed``, else ``torch.initial_seed()``, in the main process), so
    the Mosaic/MixUp caches (one per worker) are deterministic under a seed.
    """

    def __init__(self, annotations: CocoAnnotations, pipeline: Callable, stage2_pipeline: Callable | None = None,
                 seed: int | None = None, max_retries: int = 100):
        self.annotations, self.pipeline, self.stage2_pipeline = annotations, pipeline, stage2_pipeline
        self.seed, self.max_retries = seed, max_retries
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple | None = None

    def __len__(self) -> int:
        return len(self.annotations.records)

    def load_sample(self, index: int) -> dict:
        """The untransformed sample of image ``index`` (original size)."""
        return load_sample(self.annotations.records[index])

    @property
    def rng(self) -> np.random.Generator:
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else (info.id, info.seed))
        if self._rng_owner != owner:  # a new worker (or process): fresh generator and empty caches
            seed = info.seed if info is not None else (self.seed if self.seed is not None else torch.initial_seed())
            self._rng, self._rng_owner = np.random.default_rng(seed), owner
            for pipeline in (self.pipeline, self.stage2_pipeline):
                for t in getattr(pipeline, "transforms", []):
                    if hasattr(t, "cache"):
                        t.cache.clear()
        return self._rng

    def __getitem__(self, item) -> dict:
        index, stage = item if isinstance(item, tuple) else (item, 1)
        pipeline = self.stage2_pipeline if stage == 2 and self.stage2_pipeline is not None else self.pipeline
        rng = self.rng
        for _ in range(self.max_retries):
            sample = pipeline(self.load_sample(int(index)), rng)
            if sample is not None:
                return sample
            index = int(rng.integers(len(self)))
        raise DatasetError(f"{self.annotations.ann_file}: {self.max_retries} samples in a row were rejected "
                           f"(no instance left after filtering)")
