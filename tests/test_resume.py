"""Exact resume: a run stopped inside epoch 1 and resumed from its epoch-boundary ``last.ckpt`` trains
on the same samples and gives the same losses, step for step, as the run never interrupted.

What makes it exact: every training sample is a function of (seed, rank, epoch) (``TrainIndex``:
the sampler's order and the transforms' generator, Mosaic/MixUp caches emptied at every epoch
start), the data seed and stage are saved in the checkpoint (``COCODataModule.state_dict``), and
the workers start at the epoch's first batch, after Lightning has set the epoch (``TrainLoader``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import COCODataModule
from datamodules.sprites import generate_sprite_dataset
from rtmdet.lightning_module import RTMDetInsModule

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The number of training batches"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`")]

EPOCHS, STEPS, KILL_EPOCH = 2, 3, 1


@pytest.fixture(scope="module")
def sprites(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sprites")
    return generate_sprite_dataset(root, num_images=12, image_size=64, seed=0), root / "train"


class StepLog(L.Callback):
    """(epoch, global step, image ids, loss) of every training step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = tuple(t["image_id"] for t in batch[1])
        self.rows.append((trainer.current_epoch, trainer.global_step, ids, float(outputs["loss"])))


class Killed(Exception):
    pass


class Kill(L.Callback):
    """Stops the run one step into ``KILL_EPOCH``, as kill -9 would: nothing saved after last.ckpt."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == KILL_EPOCH and batch_idx == 1:
            raise Killed


def train(sprites, root: Path, num_workers: int, global_seed: int = 0, kill: bool = False,
          ckpt_path: str | None = None) -> list[tuple]:
    """A tiny run as ``experiments.train`` makes it (``seed_everything``, data seed from it); its step log."""
    L.seed_everything(global_seed, verbose=False)
    ann_file, img_dir = sprites
    dm = COCODataModule(str(ann_file), str(img_dir), img_size=64, batch_size=4, num_workers=num_workers,
                        mosaic_cache=6, mixup_cache=4, mixup_prob=1.0, check_images=False)
    module = RTMDetInsModule("tiny", num_classes=dm.num_classes, lr=0.004, scale_lr=False, warmup_iters=2)
    log = StepLog()
    callbacks = [log, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)] + ([Kill()] if kill else [])
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, limit_train_batches=STEPS, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=root, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        except Killed:
            assert kill
    return log.rows


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_last_repeats_the_uninterrupted_losses_exactly(sprites, tmp_path, num_workers):
    reference = train(sprites, tmp_path / "a", num_workers)
    killed = train(sprites, tmp_path / "b", num_workers, kill=True)
    boundary = KILL_EPOCH * STEPS
    assert len(reference) == EPOCHS * STEPS and killed[:boundary] == reference[:boundary]
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (KILL_EPOCH - 1, boundary)
    assert state["COCODataModule"] == {"seed": 0, "train_stage": 1}  # torch's seed after seed_everything(0)

    # The resumed process is seeded otherwise: what the data needs comes from the checkpoint.
    resumed = train(sprites, tmp_path / "b", num_workers, global_seed=1, ckpt_path=str(last))
    assert resumed == reference[boundary:]  # same steps, same images, bit-identical losses
    # The epochs differ from each other (a resume that replayed epoch 0 would fail above).
    assert [r[2] for r in reference[:STEPS]] != [r[2] for r in reference[STEPS:]]


def test_checkpoint_without_data_state_still_resumes(sprites, tmp_path):
    """Checkpoints written before the data state was saved resume (with the seed of this run)."""
    train(sprites, tmp_path, 0, kill=True)
    old = tmp_path / "old.ckpt"
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del state["COCODataModule"]
    torch.save(state, old)
    resumed = train(sprites, tmp_path / "resumed", 0, ckpt_path=str(old))
    assert [r[:2] for r in resumed] == [(KILL_EPOCH + i // STEPS, KILL_EPOCH * STEPS + i + 1)
                                         for i in range((EPOCHS - KILL_EPOCH) * STEPS)]
