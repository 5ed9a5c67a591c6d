"""Overlays and the validation image panel (experiments/visualize.py)."""

import lightning as L
import numpy as np
import torch
from PIL import Image

from datamodules import COCODataModule
from datamodules.sprites import generate_sprite_dataset
from experiments.visualize import ValidationImagePanel, class_colour, denormalize, draw_overlay, render_panel
from experiments.wandb_logger import AutoWandbLogger
from rtmdet.lightning_module import RTMDetInsModule
from rtmdet.preprocess import normalize


def test_denormalize_inverts_normalize():
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(denormalize(normalize(rgb)), rgb.permute(0, 2, 3, 1).numpy())


def test_overlay_tints_mask_pixels_with_the_class_colour():
    image = np.full((40, 60, 3), 100, np.uint8)
    masks = np.zeros((1, 40, 60), bool)
    masks[0, 20:30, 30:50] = True
    pred = {"boxes": np.array([[30.0, 20.0, 50.0, 30.0]]), "labels": np.array([3]), "masks": masks,
            "scores": np.array([0.9])}
    out = np.asarray(draw_overlay(image, pred, ["a", "b", "c", "d"]))
    tint = np.round(0.5 * 100 + 0.5 * np.array(class_colour(3), np.float32))
    assert np.array_equal(out[25, 40], tint)  # inside the mask, away from the outline
    assert np.array_equal(out[5, 5], [100, 100, 100])  # outside box and label: untouched
    assert np.array_equal(out[30, 40], class_colour(3))  # the box outline (bottom edge)


def test_panel_is_ground_truth_then_prediction_side_by_side():
    image = np.zeros((32, 32, 3), np.uint8)
    gt_mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    gt_mask[0, 4:12, 4:12] = True
    target = {"boxes": torch.tensor([[4.0, 4.0, 12.0, 12.0]]), "labels": torch.tensor([0]), "masks": gt_mask,
              "image_id": 7}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 32, 32, dtype=torch.bool), "scores": torch.zeros(0)}
    panel = np.asarray(render_panel(image, target, empty, ["sprite"]))
    assert panel.shape == (32, 32 + 4 + 32, 3)
    assert panel[8, 8].any() and not panel[:, 36:].any()  # GT drawn on the left, nothing predicted


class RecordingLogger(AutoWandbLogger):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.images = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, kwargs.get("caption"), step))


def test_callback_logs_panels_each_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "data"
    val = generate_sprite_dataset(root, num_images=3, image_size=64, seed=1, split_name="val")
    dm = COCODataModule(train_ann_file=val, train_img_dir=root / "val", val_ann_file=val, val_img_dir=root / "val",
                        img_size=64, batch_size=2, val_batch_size=2, num_workers=0)
    dm.setup("validate")
    module = RTMDetInsModule(size="tiny", num_classes=dm.num_classes)
    logger = RecordingLogger(save_dir=str(tmp_path))
    panel = ValidationImagePanel(num_images=3, score_thr=0.0, save_dir="panels")
    trainer = L.Trainer(accelerator="cpu", logger=logger, callbacks=[panel], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert len(logger.images) == 1
    key, images, captions, _ = logger.images[0]
    assert key == "val/examples" and len(images) == 3 and len(captions) == 3  # spans two val batches
    assert all(isinstance(im, Image.Image) and im.size == (64 + 4 + 64, 64) for im in images)
    assert captions[0].startswith("image ")
    assert len(list((tmp_path / "panels").glob("epoch000_img*.png"))) == 3
