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

from datamodules.datamodule import COCODataModule, PipelineSwitch
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
