"""COCO instance segmentation as a LightningDataModule, its collate function and the stage switch.

Batch format: ``(images, targets)`` as ``training_step`` / ``validation_step`` receive it:

* ``images``: (B, 3, S, S) float32, BGR, normalised with ``rtmdet.preprocess.normalize`` (the
  model input).
* ``targets``: one dict per image: ``boxes`` (N, 4) float32 xyxy input pixels, ``labels`` (N,)
  int64 in [0, C), ``masks`` (N, S, S) bool, ``ignore_boxes`` (M, 4) float32 xyxy crowd regions
  (never targets), ``image_id`` int (COCO id), ``orig_size`` (h, w) and ``scale_factor``
  (w_scale, h_scale) with original = input / scale_factor (exact for validation's letterbox), and
  the same as one ``meta``: :class:`rtmdet.preprocess.ImageMeta`, what the postprocess takes.

Where the work happens: the dataloader workers run the transforms and :func:`collate`, which
yields uint8 RGB images and the masks still as compact crops (:class:`InstanceMasks`), so that
little travels between processes (dense masks are 0.4 MB per instance at 640^2). After Lightning
moved the batch to the device, :meth:`COCODataModule.on_after_batch_transfer` calls
:func:`finalize_batch`: normalisation and dense masks, on the device. Iterating a dataloader by
hand therefore gives uint8 images and compact masks: call ``finalize_batch(batch)``. A
LightningModule that overrides ``on_after_batch_transfer`` takes precedence and must call it.

Stage switch: the training sampler yields ``(index, stage)`` pairs and :class:`CocoDataset` picks
the pipeline from the pair, so the stage travels with the indices into every worker process
(persistent workers too). :class:`PipelineSwitch` sets the stage from the current epoch.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from rtmdet.preprocess import ImageMeta, normalize

from .coco import CocoAnnotations, load_sample, problems_message
from .errors import DatasetError
from .masks import InstanceMasks
from .transforms import Compose, train_pipeline, val_pipeline


class CocoDataset(Dataset):
    """Samples of a :class:`CocoAnnotations` through a transform pipeline.

    ``dataset[i]`` or ``dataset[(i, stage)]``: stage 2 uses ``stage2_pipeline`` (when given), a
    plain index uses :attr:`stage`. A pipeline may reject a sample (``None``); another random index
    is drawn then. Transforms draw from one ``numpy.random.Generator`` per process, seeded from the
    dataloader worker's seed (or ``seed``, else ``torch.initial_seed()``, in the main process), so
    the Mosaic/MixUp caches (one per worker) are deterministic under a seed.
    """

    def __init__(self, annotations: CocoAnnotations, pipeline: Callable, stage2_pipeline: Callable | None = None,
                 seed: int | None = None, max_retries: int = 100):
        self.annotations, self.pipeline, self.stage2_pipeline = annotations, pipeline, stage2_pipeline
        self.seed, self.max_retries = seed, max_retries
        self.stage = 1
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
        index, stage = item if isinstance(item, tuple) else (item, self.stage)
        pipeline = self.stage2_pipeline if stage == 2 and self.stage2_pipeline is not None else self.pipeline
        rng = self.rng
        for _ in range(self.max_retries):
            sample = pipeline(self.load_sample(int(index)), rng)
            if sample is not None:
                return sample
            index = int(rng.integers(len(self)))
        raise DatasetError(f"{self.annotations.ann_file}: {self.max_retries} samples in a row were rejected "
                           f"(no instance left after filtering)")


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


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised uint8 tensor; inside a dataloader worker it is allocated in shared memory (as
    PyTorch's ``default_collate`` does), so handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    proto = torch.empty(0, dtype=torch.uint8)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


def collate(samples: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """Samples (all S x S) -> (uint8 (B, 3, S, S) RGB images, list of target dicts); see module doc.

    ``masks`` stay compact (:class:`InstanceMasks`, the tight crops) until :func:`finalize_batch`:
    dense masks are ~0.4 MB per instance at 640^2, and shared memory for them costs more than the
    whole augmentation pipeline when there are dozens of instances.
    """
    shapes = {s["image"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate needs images of one size, got {sorted(shapes)}")
    h, w, _ = shapes.pop()
    images = _shared_uint8((len(samples), 3, h, w))
    images_np = images.numpy()  # numpy's transposing copy is ~20x faster than torch's permute copy here
    targets = []
    for i, s in enumerate(samples):
        images_np[i] = s["image"].transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        targets.append({
            "boxes": torch.tensor(s["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(s["labels"], dtype=torch.int64).reshape(-1),
            "masks": s["masks"],  # InstanceMasks (N, S, S) until finalize_batch
            "ignore_boxes": torch.tensor(s["ignore_boxes"], dtype=torch.float32).reshape(-1, 4),
            "image_id": int(s["image_id"]),
            "orig_size": tuple(int(v) for v in s["orig_size"]),
            "scale_factor": tuple(float(v) for v in s["scale_factor"]),
            "meta": ImageMeta(tuple(int(v) for v in s["orig_size"]), tuple(float(v) for v in s["scale_factor"]),
                              (h, w), int(s["image_id"])),  # what the postprocess maps back with
        })
    return images, targets


def finalize_batch(batch: tuple[torch.Tensor, list[dict]], device: torch.device | str | None = None):
    """A collated batch -> the model's input format, on ``device`` (default: the images' device).

    uint8 RGB images -> float32 BGR normalised (``rtmdet.preprocess.normalize``); compact masks ->
    (N, S, S) bool tensors, built on the device from the crops. Idempotent. Lightning calls it
    through :meth:`COCODataModule.on_after_batch_transfer`; call it yourself when iterating a
    dataloader by hand.
    """
    images, targets = batch
    device = torch.device(device) if device is not None else images.device
    images = images.to(device)
    if images.dtype == torch.uint8:
        images = normalize(images)
    out = []
    for t in targets:
        t = dict(t)
        if isinstance(t["masks"], InstanceMasks):
            t["masks"] = t["masks"].to_tensor(device)
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()})
    return images, out


class COCODataModule(L.LightningDataModule):
    """COCO-format instance segmentation data with the official RTMDet-Ins pipelines (spec 4.5).

    The annotation files are parsed and checked here in ``__init__`` (no image decoding), so
    ``num_classes``, ``class_names``, ``cat_id_to_label`` and ``label_to_cat_id`` are available
    right away; :meth:`validate_images` checks the image files. Training samples go through stage 1
    (Mosaic, RandomResize, RandomCrop, HSV, Flip, Pad, MixUp, Filter) until :class:`PipelineSwitch`
    selects stage 2; validation letterboxes. Batches: see the module docstring (normalisation and
    dense masks happen in :meth:`on_after_batch_transfer`).

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
        persistent_workers: keep worker processes (and their caches) alive across epochs.
        pin_memory: pin batches in page-locked memory (for GPU training).
        seed: seeds the shuffling and the worker generators; None derives them from torch's seed
            (``lightning.seed_everything``).
        check_images: before training (``setup('fit')``) open every train/val image file and stop
            with one :class:`DatasetError` listing all that are missing, not images, truncated or of
            another size than the json says (:meth:`validate_images`, ~1 ms an image). Turn it off
            for huge datasets that were checked already.
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
        self._train_stage = 1
        self._train_sampler: TrainSampler | None = None

    def _train_pipeline(self, stage: int) -> Compose:
        h = self.hparams
        return train_pipeline(stage, h.img_size, tuple(h.random_resize_ratio), h.mosaic_cache, h.mixup_cache,
                              h.mixup_prob, h.cache_random_pop, h.nearest_resize, reject_empty=not h.train_empty_images)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            problems = self.validate_images() if self.hparams.check_images else []
            if problems:  # now, not hours into the run when the loader reaches the file
                raise DatasetError(problems_message(f"{len(problems)} image file problem(s); fix or remove "
                                                    "these images:", problems))
            self.train_dataset = CocoDataset(self.train_annotations, self._train_pipeline(1), self._train_pipeline(2),
                                             seed=self.hparams.seed)
            self.train_dataset.stage = self._train_stage
        if self.val_annotations is not None and self.val_dataset is None:
            self.val_dataset = CocoDataset(self.val_annotations, val_pipeline(self.hparams.img_size,
                                                                              self.hparams.nearest_resize))

    def _loader(self, dataset: CocoDataset, batch_size: int, sampler: Sampler | None) -> DataLoader:
        h = self.hparams
        generator = torch.Generator().manual_seed(h.seed) if h.seed is not None else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=h.num_workers,
                          collate_fn=collate, pin_memory=h.pin_memory, generator=generator,
                          persistent_workers=h.persistent_workers and h.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        seed = self.hparams.seed if self.hparams.seed is not None else torch.initial_seed() % 2**31
        self._train_sampler = TrainSampler(len(self.train_dataset), seed=seed, stage=self._train_stage)
        return self._loader(self.train_dataset, self.batch_size, self._train_sampler)

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
        return self._train_stage

    def set_train_stage(self, stage: int) -> bool:
        """Select the training pipeline (1 or 2) for the epochs that start from now on; True if changed."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        changed, self._train_stage = stage != self._train_stage, stage
        if self._train_sampler is not None:
            self._train_sampler.stage = stage
        if self.train_dataset is not None:
            self.train_dataset.stage = stage
        return changed

    def validate_images(self) -> list[str]:
        """Check every train/val image file (exists, decodes to the end, size vs json); all problems at once."""
        anns = [self.train_annotations] + ([self.val_annotations] if self.val_annotations else [])
        return list(dict.fromkeys(p for a in anns for p in a.validate_images()))  # once if train and val share images


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
