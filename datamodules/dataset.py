"""A COCO annotation file's samples through a transform pipeline, as a torch ``Dataset``."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .coco import CocoAnnotations, load_sample
from .errors import DatasetError
from .sampler import TrainIndex


class CocoDataset(Dataset):
    """Samples of a :class:`CocoAnnotations` through a transform pipeline.

    Items: a :class:`TrainIndex` (what ``TrainSampler`` yields), ``dataset[(i, stage)]`` or
    ``dataset[i]``. Stage 2 uses ``stage2_pipeline`` (when given), stage 1 and a plain index
    ``pipeline``. A pipeline may reject a sample (``None``); another random index is drawn then.

    Transforms draw from one ``numpy.random.Generator`` per process (every dataloader worker has its
    own, and its own Mosaic/MixUp caches):

    * for a :class:`TrainIndex`, seeded from its stream and the worker id,
      ``default_rng([seed, rank, epoch, worker])`` (worker 0 in the main process). A new stream (the
      next epoch) starts a fresh generator and empty caches, so an epoch's samples depend on
      (seed, rank, epoch) alone and a run resumed at an epoch boundary makes exactly the samples
      that the interrupted run would have made. The caches therefore refill for a few samples at
      every epoch start, as mmdet's do with non-persistent workers (its persistent workers keep
      them, which no checkpoint could restore): the first 4 samples of a worker's epoch skip Mosaic
      and its first skips MixUp, 0.3% of an official COCO epoch (1480 samples per worker).
    * otherwise, seeded once per process from the dataloader worker's seed (or ``seed``, else
      ``torch.initial_seed()``, in the main process).
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
        """The generator of this process for items without a stream."""
        return self._generator(None)

    def _generator(self, stream: tuple[int, ...] | None) -> np.random.Generator:
        """This process's generator for ``stream``; a fresh one, and empty caches, whenever the
        process, the dataloader worker or the stream changes."""
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else (info.id, info.seed), stream)
        if self._rng_owner != owner:
            if stream is not None:
                seed = [*stream, 0 if info is None else info.id]
            else:
                seed = info.seed if info is not None else (self.seed if self.seed is not None else torch.initial_seed())
            self._rng, self._rng_owner = np.random.default_rng(seed), owner
            for pipeline in (self.pipeline, self.stage2_pipeline):
                for t in getattr(pipeline, "transforms", []):
                    if hasattr(t, "cache"):
                        t.cache.clear()
        return self._rng

    def __getitem__(self, item) -> dict:
        if isinstance(item, TrainIndex):
            index, stage, rng = item.index, item.stage, self._generator(item.stream)
        else:
            index, stage = item if isinstance(item, tuple) else (item, 1)
            rng = self.rng
        pipeline = self.stage2_pipeline if stage == 2 and self.stage2_pipeline is not None else self.pipeline
        for _ in range(self.max_retries):
            sample = pipeline(self.load_sample(int(index)), rng)
            if sample is not None:
                return sample
            index = int(rng.integers(len(self)))
        raise DatasetError(f"{self.annotations.ann_file}: {self.max_retries} samples in a row were rejected "
                           f"(no instance left after filtering)")
