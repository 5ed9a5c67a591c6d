"""The sample and transform types, and :class:`Compose` (see the package docstring for the sample)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Sample = dict
Transform = Callable[[Sample, np.random.Generator], "Sample | None"]


class SettingsRepr:
    """``repr`` that lists a transform's settings (its attributes, except a cache of samples)."""

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
