"""The training sampler: one epoch's shuffled indices, each tagged with the pipeline stage."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """Shuffled indices of one epoch, each tagged with the pipeline stage: yields ``(index, stage)``.

    ``stage`` is read once when the epoch's iteration starts, in the main process; the order depends
    on ``seed`` and the epoch given to ``set_epoch`` (which Lightning calls every epoch).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, stage: int = 1):
        self.num_samples, self.seed, self.shuffle, self.stage = num_samples, seed, shuffle, stage
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        stage = self.stage
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return iter([(i, stage) for i in order.tolist()])
