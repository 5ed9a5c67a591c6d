"""COCO instance segmentation as a LightningDataModule: the datasets, their loaders, the batch format.

Batches: see ``datamodules/collate.py`` (uint8 images and compact masks leave the workers;
:func:`finalize_batch` normalises and makes dense masks on the device).

Stage switch: the stage lives in :attr:`COCODataModule.train_stage` alone. The training sampler
reads it when an epoch starts and yields ``TrainIndex`` items (index, stage, random stream);
:class:`CocoDataset` picks the pipeline from the item, so the stage travels with the indices into
every worker process (persistent workers too). ``PipelineSwitch`` (``datamodules/pipeline_switch.py``)
sets the stage from the current epoch.

Exact resume: an epoch's samples are a function of (seed, rank, epoch) (``datamodules/sampler.py``),
and the seed and stage are saved in Lightning checkpoints (:meth:`COCODataModule.state_dict`), so a
run resumed from an epoch-boundary checkpoint (``last.ckpt``) trains on the same samples, step for
step, as the run that was interrupted.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from .coco import CocoAnnotations, check_image_files, image_file_problems
from .collate import collate, finalize_batch
from .dataset import CocoDataset
from .errors import DatasetError
from .sampler import TrainLoader, TrainSampler
from .transforms import Compose, train_pipeline, val_pipeline


class COCODataModule(L.LightningDataModule):
    """COCO-format instance segmentation data with the official RTMDet-Ins pipelines.

    The annotation files are parsed and checked here in ``__init__`` (no image decoding), so
    ``num_classes``, ``class_names``, ``cat_id_to_label`` and ``label_to_cat_id`` are available
    right away; :meth:`validate_images` checks the image files. Training samples go through stage 1
    (Mosaic, RandomResize, RandomCrop, HSV, Flip, Pad, MixUp, Filter) until :class:`PipelineSwitch`
    selects stage 2; validation letterboxes. Batches: see ``datamodules/collate.py`` (normalisation
    and dense masks happen in :meth:`on_after_batch_transfer`).

    Args:
        train_ann_file: COCO json of the training set. None (the default): the embedded procedural
            pixel-sprite dataset (``datamodules.sprites``), with its validation split.
        train_img_dir: folder that the training ``file_name`` entries are relative to.
        val_ann_file: COCO json of the validation set (None: no validation); same categories.
        val_img_dir: folder of the validation images.
        img_size: network input size S (square).
        batch_size: training images per batch.
        num_workers: dataloader worker processes (0: load in the main process).
        val_batch_size: validation images per batch (official 5).
        nearest_resize: nearest-neighbour image resizing (pixel art); masks are always nearest.
        train_empty_images: train on images without instances as negatives. False is the official
            ``filter_empty_gt``: such images are dropped and samples left empty are redrawn.
        train_min_size: drop training images whose width or height is below this (official 32).
        random_resize_ratio: RandomResize ratio range (tiny / s: (0.5, 2.0); m / l / x: (0.1, 2.0)).
        mosaic_cache: CachedMosaic cache size (tiny 20, others 40).
        mixup_cache: CachedMixUp cache size (tiny 10, others 20).
        mixup_prob: CachedMixUp probability (tiny 0.5, others 1.0).
        cache_random_pop: pop a random cache entry instead of the oldest (tiny False, others True).
        persistent_workers: keep worker processes alive across epochs (no start-up per epoch). The
            Mosaic/MixUp caches start empty at every epoch either way (see :class:`CocoDataset`).
        pin_memory: pin batches in page-locked memory (for GPU training).
        seed: seeds the shuffling and the transforms' generators; None derives it from torch's seed
            (``lightning.seed_everything``) when training starts. Checkpoints keep the seed in use,
            and resuming from one restores it (a different ``seed`` given then is overridden, with a
            warning).
        check_images: before training (``setup('fit')``) open every train/val image file and stop
            with one :class:`DatasetError` listing all that are missing, not images, truncated or of
            another size than the json says (:meth:`validate_images`, ~1 ms an image). Turn it off
            for huge datasets that were checked already.
        copy_paste_prob: probability of Simple Copy-Paste (``datamodules/transforms/copy_paste.py``) in
            the stage-1 pipeline; 0 (default, official): no copy-paste step at all.
        copy_paste_max_instances: at most this many instances pasted at a time.
    """

    def __init__(
        self,
        train_ann_file: str | None = None,
        train_img_dir: str | None = None,
        val_ann_file: str | None = None,
        val_img_dir: str | None = None,
        img_size: int = 640,
        batch_size: int = 8,
        num_workers: int = 2,
        val_batch_size: int = 5,
        nearest_resize: bool = False,
        train_empty_images: bool = True,
        train_min_size: int = 32,
        random_resize_ratio: tuple[float, float] = (0.5, 2.0),
        mosaic_cache: int = 20,
        mixup_cache: int = 10,
        mixup_prob: float = 0.5,
        cache_random_pop: bool = False,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        seed: int | None = None,
        check_images: bool = True,
        copy_paste_prob: float = 0.0,
        copy_paste_max_instances: int = 20,
    ):
        super().__init__()
        if train_ann_file is None:  # no data given: the embedded sprite dataset (generated once, cached)
            from .sprites import default_sprite_dataset

            paths = default_sprite_dataset()
            train_ann_file, train_img_dir = paths["train_ann_file"], paths["train_img_dir"]
            if val_ann_file is None:
                val_ann_file, val_img_dir = paths["val_ann_file"], paths["val_img_dir"]
        elif train_img_dir is None:
            raise ValueError("train_img_dir is required with train_ann_file")
        self.save_hyperparameters()
        self.hparams.update(train_ann_file=train_ann_file, train_img_dir=train_img_dir,
                            val_ann_file=val_ann_file, val_img_dir=val_img_dir)
        if val_ann_file is not None and val_img_dir is None:
            raise ValueError("val_img_dir is required with val_ann_file")
        # Both files are parsed before anything is raised: one run reports the problems of both.
        errors = []
        try:
            self.train_annotations = CocoAnnotations(train_ann_file, train_img_dir, min_size=train_min_size,
                                                     keep_empty=train_empty_images)
        except DatasetError as e:
            errors.append(str(e))
        self.val_annotations = None
        if val_ann_file is not None:
            try:
                self.val_annotations = CocoAnnotations(val_ann_file, val_img_dir)
            except DatasetError as e:
                errors.append(str(e))
        if errors:
            raise DatasetError("\n".join(errors))
        if self.val_annotations is not None and self.val_annotations.categories != self.train_annotations.categories:
            raise DatasetError(f"{val_ann_file}: categories differ from those of {train_ann_file}")
        self.batch_size = batch_size  # read by the LightningModule to scale the learning rate
        self.categories = self.train_annotations.categories
        self.num_classes: int = self.categories.num_classes
        self.class_names: tuple[str, ...] = self.categories.names
        self.cat_id_to_label: dict[int, int] = self.categories.cat_id_to_label
        self.label_to_cat_id: dict[int, int] = self.categories.label_to_cat_id
        self.train_dataset: CocoDataset | None = None
        self.val_dataset: CocoDataset | None = None
        self._train_stage = 1  # the one record of the stage: the sampler reads it at every epoch start
        self._seed: int | None = seed  # resolved when training starts (see seed), restored by load_state_dict

    def _train_pipeline(self, stage: int) -> Compose:
        h = self.hparams
        return train_pipeline(stage, h.img_size, tuple(h.random_resize_ratio), h.mosaic_cache, h.mixup_cache,
                              h.mixup_prob, h.cache_random_pop, h.nearest_resize, reject_empty=not h.train_empty_images,
                              copy_paste_prob=h.copy_paste_prob, copy_paste_max_instances=h.copy_paste_max_instances)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            if self.hparams.check_images:
                check_image_files(*self._annotations())
            self.train_dataset = CocoDataset(self.train_annotations, self._train_pipeline(1), self._train_pipeline(2),
                                             seed=self.hparams.seed)
        if self.val_annotations is not None and self.val_dataset is None:
            self.val_dataset = CocoDataset(self.val_annotations, val_pipeline(self.hparams.img_size,
                                                                              self.hparams.nearest_resize))

    @property
    def seed(self) -> int:
        """The seed of the training order and augmentations: ``seed``, else torch's initial seed when
        first asked (after ``seed_everything``), else the one a restored checkpoint was trained with."""
        if self._seed is None:
            self._seed = torch.initial_seed() % 2**31
        return self._seed

    def _loader(self, dataset: CocoDataset, batch_size: int, sampler: TrainSampler | None) -> DataLoader:
        h = self.hparams
        # The loader's generator draws its workers' seeds (used by items without a stream and by
        # Lightning's worker_init_fn, not by training items); a seeded one of its own spares torch's
        # global generator a draw per epoch.
        generator = torch.Generator().manual_seed(self.seed)
        loader = TrainLoader if sampler is not None else DataLoader
        return loader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=h.num_workers,
                      collate_fn=collate, pin_memory=h.pin_memory, generator=generator,
                      persistent_workers=h.persistent_workers and h.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        rank = 0
        if self.trainer is not None:  # under DDP every rank must shuffle alike: rank 0's seed for all
            self._seed, rank = self.trainer.strategy.broadcast(self.seed), self.trainer.global_rank
        sampler = TrainSampler(len(self.train_dataset), seed=self.seed, get_stage=lambda: self.train_stage, rank=rank)
        return self._loader(self.train_dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        if self.val_annotations is None:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, self.hparams.val_batch_size, None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the device: normalise the images and build the dense masks (:func:`finalize_batch`)."""
        return finalize_batch(batch)

    @property
    def train_stage(self) -> int:
        """The training pipeline (1 or 2) of the epochs that start from now on."""
        return self._train_stage

    def set_train_stage(self, stage: int) -> bool:
        """Select the training pipeline (1 or 2) for the epochs that start from now on; True if changed."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        changed, self._train_stage = stage != self._train_stage, stage
        return changed

    def state_dict(self) -> dict:
        """What Lightning saves in checkpoints: the seed and the training stage, which with the epoch
        determine every training sample (``TrainIndex``)."""
        return {"seed": self.seed, "train_stage": self.train_stage}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (Lightning calls it when resuming, before the dataloaders are made)."""
        if self.hparams.seed is not None and self.hparams.seed != state["seed"]:
            rank_zero_warn(f"COCODataModule: resuming with the checkpoint's data seed {state['seed']}, not "
                           f"seed={self.hparams.seed}: the resumed epochs continue the interrupted run")
        self._seed = int(state["seed"])
        self.set_train_stage(int(state["train_stage"]))

    def _annotations(self) -> list[CocoAnnotations]:
        return [self.train_annotations] + ([self.val_annotations] if self.val_annotations else [])

    def validate_images(self) -> list[str]:
        """Check every train/val image file (exists, decodes to the end, size vs json); all problems at once."""
        return image_file_problems(*self._annotations())
