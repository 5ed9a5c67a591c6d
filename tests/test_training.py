"""Training mechanics on CPU: DDP equals one process, overfitting, bf16 autocast, non-finite losses."""

from __future__ import annotations

import os
import socket
import warnings

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules import COCODataModule, PipelineSwitch
from datamodules.sprites import generate_sprite_dataset
from rtmdet import build_model
from rtmdet.lightning_module import RTMDetInsModule

SIZE = 64
C = 3
WORLD = 2
COUNTS = (3, 0, 2, 1)  # instances per image of the global batch; image 1 is a pure negative


def make_batch(counts=COUNTS, size=SIZE, seed=0) -> tuple[torch.Tensor, list[dict]]:
    """Random images and, per image, ellipse masks in random boxes: (B, 3, S, S), targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(counts), 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    targets = []
    for i, n in enumerate(counts):
        wh = torch.rand(n, 2, generator=g) * size * 0.5 + 8
        xy = torch.rand(n, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1)  # (n, 4) xyxy, input pixels
        c, r = (boxes[:, :2] + boxes[:, 2:]) / 2, wh / 2
        masks = ((xx - c[:, :1, None]) / r[:, :1, None]) ** 2 + ((yy - c[:, 1:, None]) / r[:, 1:, None]) ** 2 <= 1
        labels = torch.randint(0, C, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks, "image_id": i + 1})
    return images, targets


def tiny_model() -> torch.nn.Module:
    """Seeded tiny model with BN in eval mode: batch statistics would differ between 4 and 2 x 2 images.

    The running statistics are first set to those of the global batch (one cumulative-average pass):
    with the initial ones (0, 1) the activations vanish through the depth (mask prototypes ~1e-13,
    prototype gradients denormal), and a comparison of gradients would test nothing.
    """
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=C)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
    with torch.no_grad():
        model.train()(make_batch()[0])
    return model.eval()


# ------------------------------------------------------------------------------------------- DDP
GRAD_PARAMS = ("backbone.stem.0.conv.weight", "neck.out_convs.0.conv.weight", "head.cls_convs.0.weight",
               "head.rtm_cls.0.weight", "head.rtm_reg.0.weight", "head.rtm_kernel.0.weight",
               "head.mask_head.projection.weight")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank of a 2-process gloo DDP step on its half of the global batch; saves losses and grads."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, targets = make_batch()
        per_rank = len(COUNTS) // WORLD
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        losses = model.loss(ddp(images[sl]), targets[sl])
        sum(losses.values()).backward()  # DDP all-reduces (averages) the gradients here
        torch.save({"losses": {k: v.detach() for k, v in losses.items()},
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_step() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses and gradients of one process on the whole batch, on one thread like each DDP rank.

    Thread count changes the fp32 summation order, and this network amplifies such rounding: 1 vs 2
    threads alone moves the gradient by ~6e-5 relative (an input scaled by 1 + 1e-6: ~5e-4).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model()
        images, targets = make_batch()
        losses = model.loss(model(images), targets)
        sum(losses.values()).backward()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()}


def test_ddp_gradients_and_losses_equal_one_process_on_the_global_batch(tmp_path):
    # Per rank: loss = local_sum / mean_r(local_count) (mmdet's reduce_mean normalisers); DDP averages
    # gradients, so grad = (1/2) sum_r grad(local_sum_r / mean_count) = grad(global_sum / global_count).
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    losses, grads = _single_process_step()

    for k, v in losses.items():
        assert v > 0, k
        ddp_value = sum(r["losses"][k] for r in ranks) / WORLD
        torch.testing.assert_close(ddp_value, v, rtol=1e-5, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.isclose(ranks[0]["losses"]["loss_cls"], ranks[1]["losses"]["loss_cls"])  # halves differ
    for n, g in ranks[1]["grads"].items():  # DDP leaves every rank with the same averaged gradient
        torch.testing.assert_close(g, ranks[0]["grads"][n], rtol=0, atol=0)
    for n in GRAD_PARAMS:
        single, ddp_grad = grads[n], ranks[0]["grads"][n]
        assert single.abs().max() > 1e-4, n  # a real gradient, not vanishing activations
        torch.testing.assert_close(ddp_grad, single, rtol=1e-4, atol=1e-4 * single.abs().max().item(),
                                   msg=lambda m, n=n: f"{n}: {m}")
    # All parameters at once: relative error of the whole gradient vector.
    single = torch.cat([g.flatten() for g in grads.values()])
    ddp_grad = torch.cat([ranks[0]["grads"][n].flatten() for n in grads])
    assert (ddp_grad - single).norm() <= 1e-5 * single.norm()


# ------------------------------------------------------------------------------------ overfitting
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(scope="module")
def sprites(tmp_path_factory) -> tuple[str, str]:
    """Two 64 x 64 sprite images, 2 + 6 instances of 132-432 pixels: (annotation file, image folder).

    Smaller sprites (seeds with 80-pixel instances) need several hundred steps more for their masks.
    """
    root = tmp_path_factory.mktemp("sprites")
    return str(generate_sprite_dataset(root, num_images=2, image_size=64, seed=3)), str(root / "train")


def sprite_data(sprites: tuple[str, str], batch_size: int, img_size: int = 96) -> COCODataModule:
    """The two images as training and validation set; no scale jitter (ratio 1) and no MixUp."""
    ann_file, img_dir = sprites
    return COCODataModule(ann_file, img_dir, ann_file, img_dir, img_size=img_size, batch_size=batch_size,
                          num_workers=0, val_batch_size=2, nearest_resize=True, random_resize_ratio=(1.0, 1.0),
                          mixup_prob=0.0, seed=0)


def test_overfits_two_images_to_segm_ap50_above_0_9(sprites):
    # The 64-pixel images go in at 96 (nearest): at 64 the stride-32 maps are 2 x 2, so BN normalises
    # over 8 values and eval mode's unbiased running variance (x 8/7) alone costs the overfitted model
    # most of its mask AP (train-mode loss 0.04, eval-mode 0.7 on the same batch).
    L.seed_everything(0, verbose=False)
    dm = sprite_data(sprites, batch_size=2)
    module = RTMDetInsModule("tiny", num_classes=dm.num_classes, lr=0.002, scale_lr=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=200, limit_val_batches=0,
                        callbacks=[PipelineSwitch(switch_epoch=0)], **QUIET)
    trainer.fit(module, datamodule=dm)
    assert dm.train_stage == 2 and trainer.global_step == 200
    assert trainer.callback_metrics["train/loss"] < 0.2
    L.Trainer(accelerator="cpu", **QUIET).validate(module, datamodule=dm, verbose=False)
    assert module.last_metrics["bbox_mAP_50"] >= 0.9, module.last_metrics
    assert module.last_metrics["segm_mAP_50"] >= 0.9, module.last_metrics


# ------------------------------------------------------------------------------ mixed precision
def autocast_losses(dtype: torch.dtype):
    """A tiny model's losses on one batch with the network under CPU autocast in ``dtype``; checks
    that it really ran in ``dtype`` and that the losses are fp32, finite and within 5% of fp32."""
    model = tiny_model().train()
    images, targets = make_batch()
    with torch.no_grad():
        reference = model.loss(model(images), targets)
    with torch.autocast("cpu", dtype=dtype):
        out = model(images)
        assert out.kernels[0].dtype == dtype  # the network really ran in low precision
        losses = model.loss(out, targets)
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        torch.testing.assert_close(v.detach(), reference[k], rtol=0.05, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    return model, images, losses


def assert_finite_fp32_grads(model: torch.nn.Module) -> None:
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
    assert model.head.mask_head.projection.weight.grad.abs().sum() > 0


def test_bf16_autocast_training_step_is_finite_and_close_to_fp32():
    model, _, losses = autocast_losses(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(losses.values()).backward()
    assert_finite_fp32_grads(model)
    optimizer.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_fp16_autocast_with_grad_scaler_step_on_cpu():
    """What Lightning's 16-mixed does on a GPU (fp16 autocast + GradScaler), run on the CPU: the
    network in fp16, the losses in fp32, scaled gradients unscaled before the step, predict in fp16."""
    model, images, losses = autocast_losses(torch.float16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(sum(losses.values())).backward()
    scaler.unscale_(optimizer)
    assert_finite_fp32_grads(model)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**12  # no inf/nan found: the step was taken, the scale kept
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        preds = model.eval().predict(images)
    assert all(p["scores"].dtype == torch.float32 and p["masks"].dtype == torch.bool for p in preds)


def test_bf16_mixed_trainer_fits_two_steps_on_cpu(sprites):
    dm = sprite_data(sprites, batch_size=1, img_size=64)  # 2 images, batch 1: two training steps
    module = RTMDetInsModule("tiny", num_classes=dm.num_classes, scale_lr=False)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", fast_dev_run=2, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert "segm_mAP" in module.last_metrics  # validation (predict + COCO eval) ran under bf16 too


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="16-mixed needs CUDA: on CPU Lightning replaces it with bf16-mixed (tested above)")
def test_16_mixed_trainer_fits_two_steps_on_gpu(sprites):
    dm = sprite_data(sprites, batch_size=1, img_size=64)
    module = RTMDetInsModule("tiny", num_classes=dm.num_classes, scale_lr=False)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="16-mixed", fast_dev_run=2,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


# ------------------------------------------------------------------------------ non-finite loss
class _Batches(torch.utils.data.Dataset):
    """Ready-made (images, targets) batches, one per index."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class _ParameterLog(L.Callback):
    """A copy of one weight after every training batch."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.model.head.rtm_cls[0].weight.detach().clone())


def test_nonfinite_losses_are_skipped_then_stop_training():
    images, targets = make_batch()
    good = (images[:2], targets[:2])  # image ids 1, 2
    nan_images = images[2:].clone()
    nan_images[1, :, 10, 10] = float("nan")  # one pixel of one image poisons the whole batch's loss
    bad = (nan_images, targets[2:])  # image ids 3, 4
    loader = torch.utils.data.DataLoader(_Batches([bad, good, bad, bad]), batch_size=None)
    torch.manual_seed(0)
    module = RTMDetInsModule("tiny", num_classes=C, lr=1e-3, scale_lr=False, max_nonfinite_steps=1)
    initial = module.model.head.rtm_cls[0].weight.detach().clone()
    log = _ParameterLog()
    trainer = L.Trainer(accelerator="cpu", max_steps=10, callbacks=[log], **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError, match=r"2 consecutive steps \(last images \[3, 4\]\)"):
            trainer.fit(module, train_dataloaders=loader)
    skipped = [str(w.message) for w in caught if "non-finite loss" in str(w.message)]
    assert len(skipped) == 3 and all("images [3, 4]" in m for m in skipped), skipped
    assert "1 in a row, limit 1" in skipped[0] and "2 in a row, limit 1" in skipped[2]
    # Batch 0 skipped: no gradients, weights untouched; batch 1 trained; batch 2 skipped again. (Lightning
    # still calls optimizer.step, a no-op without gradients, so global_step and the lr schedule advance.)
    assert torch.equal(log.weights[0], initial) and not torch.equal(log.weights[1], initial)
    assert torch.equal(log.weights[2], log.weights[1])


def test_skipped_nonfinite_batch_leaves_bn_statistics_finite():
    images, targets = make_batch()
    nan_images = images[2:].clone()
    nan_images[1, :, 10, 10] = float("nan")
    loader = torch.utils.data.DataLoader(_Batches([(nan_images, targets[2:]), (images[:2], targets[:2])]),
                                         batch_size=None)
    torch.manual_seed(0)
    module = RTMDetInsModule("tiny", num_classes=C, lr=1e-3, scale_lr=False, max_nonfinite_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(accelerator="cpu", max_steps=2, **QUIET).fit(module, train_dataloaders=loader)
    poisoned = [n for n, b in module.model.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
    assert not poisoned, f"{len(poisoned)} non-finite buffers, e.g. {poisoned[:3]}"
    with torch.no_grad():
        assert torch.isfinite(module.model.eval()(images[:2]).mask_protos).all()
