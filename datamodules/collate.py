"""Samples -> a batch (in the dataloader workers), and a batch -> the model's input (on the device).

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
moved the batch to the device, ``COCODataModule.on_after_batch_transfer`` calls
:func:`finalize_batch`: normalisation and dense masks, on the device. Iterating a dataloader by
hand therefore gives uint8 images and compact masks: call ``finalize_batch(batch)``. A
LightningModule that overrides ``on_after_batch_transfer`` takes precedence and must call it.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import get_worker_info

from rtmdet.preprocess import ImageMeta, normalize

from .masks import InstanceMasks


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
    through ``COCODataModule.on_after_batch_transfer``; call it yourself when iterating a
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
