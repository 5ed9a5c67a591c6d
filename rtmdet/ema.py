"""EMA of the weights with the official ramped momentum, as a Lightning ``WeightAveraging`` callback.

The reference's ExpMomentumEMA (docs/architecture.md#ema): after t previous updates,
m_t = (1 - m) exp(-(1 + t) / gamma) + m
and ema <- (1 - m_t) ema + m_t theta; the first update is a plain copy, BN statistics are averaged
too and integer buffers are only copied at the first update. The reference iterates over
``state_dict()`` entries, so a tensor with k aliases is updated k times per step: the shared
classification-tower convs 6 times, the tower's BNs twice. We reproduce that with an exponent.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_momentum(num_updates: int, momentum: float = 0.0002, gamma: float = 2000.0) -> float:
    """m_t for the (t + 1)-th averaging step (t = number of previous updates)."""
    return (1 - momentum) * math.exp(-(1 + num_updates) / gamma) + momentum


class ExpMomentumEMA(WeightAveraging):
    """``WeightAveraging`` with the official ramped EMA; validation and checkpoints use the average."""

    def __init__(self, momentum: float = 0.0002, gamma: float = 2000.0, reference_aliasing: bool = True):
        self.momentum = momentum
        self.gamma = gamma
        self.reference_aliasing = reference_aliasing
        self._repeats: dict[int, int] = {}
        super().__init__(use_buffers=True, avg_fn=self._average)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.reference_aliasing and self._average_model is not None:
            head = getattr(getattr(self._average_model.module, "model", None), "head", None)
            if head is not None and hasattr(head, "cls_norms"):
                levels = len(head.cls_norms)
                for conv in head.cls_convs:  # cls_convs.{0,1,2}.i + reg_convs.{0,1,2}.i
                    self._repeats[conv.weight.data_ptr()] = 2 * levels
                for t in (t for norms in head.cls_norms for bn in norms for t in (*bn.parameters(), *bn.buffers())):
                    self._repeats[t.data_ptr()] = 2  # cls_convs.n.i.bn + reg_convs.n.i.bn

    @torch.no_grad()
    def _average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return averaged  # integer buffers (num_batches_tracked) keep their first copy
        m = ema_momentum(int(num_averaged), self.momentum, self.gamma)
        keep = (1 - m) ** self._repeats.get(averaged.data_ptr(), 1)
        return averaged * keep + current * (1 - keep)
