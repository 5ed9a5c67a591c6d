"""The stage-2 pipeline switch of RTMDet training, as a Lightning callback."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class PipelineSwitch(L.Callback):
    """Switch training to the stage-2 pipeline (no Mosaic / MixUp) for the last epochs.

    mmdet's ``PipelineSwitchHook``: stage 2 from the 0-based epoch ``switch_epoch`` on; by default
    ``max_epochs - num_last_epochs`` (280 of 300 in the official recipe). The stage is set on the
    :class:`COCODataModule` at train start (after a checkpoint is restored, so resuming inside
    stage 2, even mid-epoch, is right) and at every epoch start, before the epoch's dataloader
    iteration begins; the sampler carries it to the workers.
    """

    def __init__(self, switch_epoch: int | None = None, num_last_epochs: int = 20):
        self.switch_epoch, self.num_last_epochs = switch_epoch, num_last_epochs

    def resolve_switch_epoch(self, trainer: L.Trainer) -> int:
        if self.switch_epoch is not None:
            return self.switch_epoch
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise ValueError("PipelineSwitch needs switch_epoch when max_epochs is not set")
        return max(trainer.max_epochs - self.num_last_epochs, 0)

    def _apply(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        if not hasattr(dm, "set_train_stage"):
            raise TypeError("PipelineSwitch needs a datamodule with set_train_stage (COCODataModule)")
        switch = self.resolve_switch_epoch(trainer)
        if dm.set_train_stage(2 if trainer.current_epoch >= switch else 1):
            rank_zero_info(f"PipelineSwitch: epoch {trainer.current_epoch}: training pipeline stage "
                           f"{dm.train_stage} (switch epoch {switch})")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer)
