"""The training sampler: one epoch's shuffled indices, each with the pipeline stage and random stream;
and the loader that iterates it once the epoch is known.

Everything random in a training epoch is a function of (seed, rank, epoch): the order here, and the
transforms' draws, which come from a generator that ``CocoDataset`` seeds from the stream the item
carries and its worker id. So a run resumed from an epoch-boundary checkpoint makes the same
samples as the run that was interrupted, step for step.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Sampler


class TrainIndex(NamedTuple):
    """One training sample to make: image ``index`` through the pipeline of ``stage`` (1 or 2),
    its random draws from the stream ``(seed, rank, epoch)``."""

    index: int
    stage: int
    stream: tuple[int, int, int]


class TrainSampler(Sampler):
    """Shuffled indices of one epoch as :class:`TrainIndex` items, which carry the pipeline stage and
    the epoch's random stream into every dataloader worker (persistent workers too).

    ``get_stage`` returns the stage (1 or 2) of the epoch about to start; it is called once when the
    epoch's iteration starts, in the main process (the sampler keeps no stage of its own: its owner,
    ``COCODataModule.train_stage``, does). The order depends on ``seed`` and the epoch given to
    ``set_epoch`` (which Lightning calls every epoch), not on ``rank``: under DDP Lightning's
    distributed wrapper deals the same order out to the ranks. ``rank`` only separates the ranks'
    augmentation streams.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True,
                 get_stage: Callable[[], int] = lambda: 1, rank: int = 0):
        self.num_samples, self.seed, self.shuffle, self.get_stage = num_samples, seed, shuffle, get_stage
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[TrainIndex]:
        stage, stream = self.get_stage(), (self.seed, self.rank, self.epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return iter([TrainIndex(i, stage, stream) for i in order.tolist()])


class TrainLoader(DataLoader):
    """A ``DataLoader`` whose iteration (worker start, prefetching, the sampler's ``__iter__``) begins
    at the first batch rather than at ``iter()``.

    Lightning calls ``iter()`` on the training loader when it sets up the data, before it calls
    ``set_epoch`` and the epoch-start callbacks; worker processes would then prefetch the first
    batches with the sampler's previous epoch and stage. After a resume that previous epoch is 0, so
    the first resumed epoch would repeat epoch 0's order and random stream (and its stage).
    """

    def __iter__(self):
        return _StartsAtFirstBatch(super().__iter__)


class _StartsAtFirstBatch:
    """An iterator that makes the real one (``start()``) when its first item is asked for."""

    def __init__(self, start: Callable[[], Iterator]):
        self._start, self._iterator = start, None

    def __iter__(self) -> "_StartsAtFirstBatch":
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)
