"""The training sampler: one epoch's shuffled indices, each tagged with the pipeline stage."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """Shuffled indices of one epoch, each tagged with the pipeline stage: yields ``(index, stage)``.

    ``get_stage`` returns the stage (1 or 2) of the epoch about to start; it is called once when the
    epoch's iteration starts, in the main process (the sampler keeps no stage of its own: its owner,
    ``COCODataModule.train_stage``, does). The order depends on ``seed`` and the epoch given to
    ``set_epoch`` (which Lightning calls every epoch).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True,
                 get_stage: Callable[[], int] = lambda: 1):
        self.num_samples, self.seed, self.shuffle, self.get_stage = num_samples, seed, shuffle, get_stage
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        stage = self.get_stage()
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return iter([(i, stage) for i in order.tolist()])
