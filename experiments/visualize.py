"""The validation panel: ground truth and predictions drawn side by side (``experiments.overlay``).

:class:`ValidationImagePanel` is the callback that
logs, at every validation, a few validation images with ground truth and predictions side by side
(to W&B when the run has a ``WandbLogger``; optionally as PNGs in the run folder).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from experiments.overlay import class_colour, draw_overlay  # noqa: F401  (their home before)
from rtmdet.postprocess import InstancePostProcess
from rtmdet.preprocess import MEAN_BGR, STD_BGR


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Model input (B, 3, H, W) float BGR normalised -> (B, H, W, 3) uint8 RGB (inverse of ``normalize``)."""
    mean = images.new_tensor(MEAN_BGR).view(1, 3, 1, 1)
    std = images.new_tensor(STD_BGR).view(1, 3, 1, 1)
    bgr = (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)
    return bgr.flip(1).permute(0, 2, 3, 1).cpu().numpy()


def render_panel(image: np.ndarray, target: dict, pred: dict, names: list[str]) -> Image.Image:
    """Ground truth (left) and prediction (right) on one letterboxed input image (H, W, 3) uint8.

    ``target``/``pred`` in input pixels: boxes (N, 4), labels (N,), masks (N, H, W) bool; ``pred``
    also has scores. Tensors or arrays.
    """
    gt = {k: _numpy(target[k]) for k in ("boxes", "labels", "masks")}
    left = draw_overlay(image, gt, names)
    right = draw_overlay(image, {k: _numpy(v) for k, v in pred.items()}, names)
    gap = 4
    panel = Image.new("RGB", (left.width + gap + right.width, left.height), (255, 255, 255))
    panel.paste(left, (0, 0))
    panel.paste(right, (left.width + gap, 0))
    return panel


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


class ValidationImagePanel(L.Callback):
    """Every validation: the first ``num_images`` validation images, ground truth | prediction.

    Predictions are made again on those few images in input pixels (the validation step itself
    predicts in original-image pixels for COCO evaluation), with the weights being validated (the
    EMA weights when ``ExpMomentumEMA`` is on) and instances scoring at least ``score_thr``.
    Logged to W&B as ``val/examples`` when the trainer has a ``WandbLogger``; with ``save_dir``
    (relative paths are under the run folder) also written as ``epochXXX_imgID.png``.
    """

    def __init__(self, num_images: int = 4, score_thr: float = 0.3, save_dir: str | None = None):
        self.num_images = num_images
        self.score_thr = score_thr
        self.save_dir = save_dir
        self._panels: list[tuple[Image.Image, str, int]] = []  # (panel, caption, image id)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panels = []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if trainer.sanity_checking or not trainer.is_global_zero or len(self._panels) >= self.num_images:
            return
        images, targets = batch
        k = min(self.num_images - len(self._panels), len(targets))
        model, settings = pl_module.model, pl_module.postprocess.settings()
        post = InstancePostProcess(**{**settings, "score_thr": max(settings["score_thr"], self.score_thr)},
                                   strides=model.strides)
        preds = post(pl_module(images[:k]))  # input pixels
        names = list(getattr(trainer.datamodule, "class_names", None) or []) if trainer.datamodule else []
        names = names or [str(i) for i in range(model.num_classes)]
        for img, t, p in zip(denormalize(images[:k]), targets[:k], preds):
            caption = f"image {t.get('image_id')}: ground truth | {len(p['scores'])} predicted (score >= {self.score_thr})"
            self._panels.append((render_panel(img, t, p, names), caption, int(t.get("image_id", -1))))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._panels:
            return
        images, captions = [p for p, _, _ in self._panels], [c for _, c, _ in self._panels]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/examples", images=images, caption=captions, step=trainer.global_step)
        if self.save_dir:
            folder = Path(self.save_dir)
            if not folder.is_absolute():
                folder = Path(trainer.default_root_dir) / folder
            folder.mkdir(parents=True, exist_ok=True)
            for panel, _, image_id in self._panels:
                panel.save(folder / f"epoch{trainer.current_epoch:03d}_img{image_id}.png")
        self._panels = []
