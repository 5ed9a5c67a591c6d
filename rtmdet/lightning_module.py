"""LightningModule: glue between ``RTMDetIns``, its criterion and postprocess, the official
optimiser/schedule and COCO mAP.

The three parts come from ``rtmdet.build`` side by side. training_step = forward -> criterion
(assign + losses) -> log; validation_step = forward -> postprocess -> COCOMetric.
Mixed precision, devices, DDP and SyncBN come from the Trainer; the EMA is the ``ExpMomentumEMA``
callback (rtmdet/ema.py), so validation and checkpoints use the averaged weights.
"""

from __future__ import annotations

import contextlib
import warnings

import lightning as L
import torch
import torch.distributed as dist

from .build import build
from .checkpoint import load_mmdet_checkpoint
from .coco_eval import COCOMetric
from .optim import build_optimizer
from .schedule import lr_factor, scaled_lr, warmup_steps_for


class RTMDetInsModule(L.LightningModule):
    """Train and evaluate RTMDet-Ins.

    Args:
        size: tiny, s, m, l or x.
        num_classes: linked from the datamodule by the CLI.
        lr: base lr for a total batch of ``base_batch_size`` (official: 0.004, x: 0.002).
        scale_lr: scale lr linearly with the actual total batch (batch x devices x accumulation).
        weight_decay: AdamW weight decay (0 on norm layers and biases, as the reference).
        warmup_iters: linear warm-up iterations (official 1000), capped to ``warmup_max_fraction`` of the run.
        cosine_start: fraction of training after which the lr decays (cosine) to ``min_lr_ratio`` x lr.
        pretrained: optional official mmdetection checkpoint (full model or ImageNet CSPNeXt backbone),
            or one of our Lightning checkpoints (e.g. pretrained on the procedural sprites).
        allow_num_classes_mismatch: load ``pretrained`` even if its classifier has another class count.
        max_nonfinite_steps: consecutive non-finite losses tolerated (each skipped) before stopping.
        score_thr, nms_pre, iou_thr, max_per_img, mask_thr: test-time postprocessing (validation,
            test, predict): the ``InstancePostProcess`` built beside the model.
        mask_loss_stride: the mask loss compares masks at 1/``mask_loss_stride`` of the input
            (official: 4; a smaller stride keeps small objects' shapes; see ``RTMDetInsCriterion``).
        proto_stride: stride of the mask prototypes (official: 8; 4 adds an upsampling stage to the
            mask branch for 8-16 px objects, ``rtmdet/mask_feat.py``); ``mask_loss_stride`` must divide it.
        compile: ``torch.compile`` the network's forward (training and inference; the backward follows).
            The first steps pay the compilation (about a minute on a CPU, once per mode); on a CPU
            the training step gains little (see ``python -m benchmarks.train_step --compile``).
        channels_last: keep weights and images in the channels-last (NHWC) memory format, which the
            oneDNN (CPU) and cuDNN (GPU, mixed precision) convolutions run faster: about 20% off the
            CPU training step (``python -m benchmarks.train_step --channels-last``). Numerics are the same.
    """

    def __init__(
        self,
        size: str = "tiny",
        num_classes: int = 80,
        lr: float = 0.004,
        base_batch_size: int = 256,
        scale_lr: bool = True,
        weight_decay: float = 0.05,
        warmup_iters: int = 1000,
        warmup_max_fraction: float = 0.1,
        cosine_start: float = 0.5,
        min_lr_ratio: float = 0.05,
        pretrained: str | None = None,
        allow_num_classes_mismatch: bool = False,
        max_nonfinite_steps: int = 20,
        score_thr: float = 0.05,
        nms_pre: int = 1000,
        iou_thr: float = 0.6,
        max_per_img: int = 100,
        mask_thr: float = 0.5,
        mask_loss_stride: int = 4,
        proto_stride: int = 8,
        compile: bool = False,
        channels_last: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model, self.criterion, self.postprocess = build(
            size, num_classes, score_thr=score_thr, nms_pre=nms_pre, iou_thr=iou_thr, max_per_img=max_per_img,
            mask_thr=mask_thr, mask_loss_stride=mask_loss_stride, proto_stride=proto_stride,
        )
        if pretrained:
            report = load_mmdet_checkpoint(self.model, pretrained, allow_num_classes_mismatch)
            print(f"pretrained: {report}")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        if compile:
            self.model.compile()  # in place (nn.Module.compile): state_dict keys and checkpoints unchanged
        self.val_metric: COCOMetric | None = None
        self._nonfinite_streak = 0

    # ----------------------------------------------------------------------------------- steps
    def forward(self, images: torch.Tensor):
        return self.model(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        images = images.contiguous(memory_format=self.memory_format)
        self._batch = (images.shape, targets)  # named by an out-of-memory error, here or in backward
        bn_stats = self._bn_running_stats()
        bn_backup = torch._foreach_mul(bn_stats, 1.0)  # one fused copy; restored if the step is skipped
        with self._name_batch_on_oom():
            losses = self.criterion(self.model(images), targets)
        loss = sum(losses.values())
        if not self._all_ranks_finite(loss):
            torch._foreach_copy_(bn_stats, bn_backup)  # a NaN batch must not poison the BN statistics
            return self._skip_nonfinite(loss, targets)
        self._nonfinite_streak = 0
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=len(targets))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(targets))
        return loss

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        with self._name_batch_on_oom():
            super().backward(loss, *args, **kwargs)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch)

    @torch.no_grad()
    def predict_step(self, batch, batch_idx: int) -> list[dict]:
        images, targets = batch
        preds = self.postprocess(self(images), [t["meta"] for t in targets])  # original-image pixels
        for p, t in zip(preds, targets):
            p["image_id"] = t["image_id"]
        return preds

    @torch.no_grad()
    def _evaluate_batch(self, batch) -> None:
        images, targets = batch
        preds = self.postprocess(self(images), [t["meta"] for t in targets])  # original-image pixels
        if self.val_metric is not None:
            self.val_metric.update(preds, [int(t["image_id"]) for t in targets])

    # ------------------------------------------------------------------------------ evaluation
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        ann_file = dm.hparams.get("val_ann_file") if dm is not None else None
        if ann_file and self.val_metric is None:
            # Evaluate against the original annotation file, with the original category ids.
            label_to_cat_id = [dm.label_to_cat_id[label] for label in range(dm.num_classes)]
            self.val_metric = COCOMetric(ann_file, label_to_cat_id)

    def on_validation_epoch_start(self) -> None:
        if self.val_metric is not None:
            self.val_metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, prefix: str) -> None:
        if self.val_metric is None or self.trainer.sanity_checking:
            return
        stats = self.val_metric.compute()
        self.last_metrics = {k: float(v) for k, v in stats.items()}
        self.log_dict({f"{prefix}/{k}": float(v) for k, v in stats.items()}, rank_zero_only=True)
        if self.trainer.is_global_zero:
            summary = "  ".join(f"{k} {self.last_metrics[k]:.3f}" for k in ("bbox_mAP", "segm_mAP", "segm_mAP_50"))
            print(f"[{prefix}] epoch {self.current_epoch} step {self.global_step}: {summary}", flush=True)

    # ------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr
        if hp.scale_lr:
            lr = scaled_lr(hp.lr, self._total_batch_size(), hp.base_batch_size)
        optimizer = build_optimizer(self.model, lr, hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = warmup_steps_for(total, hp.warmup_iters, hp.warmup_max_fraction)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, hp.cosine_start, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_batch_size(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None) or self.hparams.base_batch_size
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    # ------------------------------------------------------------------------- non-finite loss
    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _bn_running_stats(self) -> list[torch.Tensor]:
        return [b for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                for b in (m.running_mean, m.running_var) if b is not None]

    def _skip_nonfinite(self, loss: torch.Tensor, targets: list[dict]):
        self._nonfinite_streak += 1
        ids = [int(t["image_id"]) for t in targets if "image_id" in t]
        warnings.warn(
            f"non-finite loss ({loss.item()}) at step {self.global_step}, images {ids}: step skipped "
            f"({self._nonfinite_streak} in a row, limit {self.hparams.max_nonfinite_steps})",
            stacklevel=2,
        )
        if self._nonfinite_streak > self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"loss was non-finite for {self._nonfinite_streak} consecutive steps (last images {ids}); "
                "lower the learning rate, check the annotations of those images, or raise max_nonfinite_steps"
            )
        if self.trainer.world_size == 1:
            # Lightning skips backward; optimizer.step runs without gradients (weights unchanged),
            # while global_step and the lr schedule advance.
            return None
        # Under DDP every rank must run backward: a zero loss on the parameters gives zero gradients.
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    # ---------------------------------------------------------------------------- out of memory
    @contextlib.contextmanager
    def _name_batch_on_oom(self):
        """Re-raise an out-of-memory error naming the step and the batch (image ids, instance counts):
        memory grows with the instances of an image, so one crowded image can be the cause. The
        original message is kept, so that Lightning's OOM checks (batch-size finder) still apply."""
        try:
            yield
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            msg = str(e)
            if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg
                    or "DefaultCPUAllocator: can't allocate" in msg):
                raise
            original = (msg.strip().splitlines() or [type(e).__name__])[0]
            error = torch.OutOfMemoryError if isinstance(e, torch.OutOfMemoryError) else RuntimeError
            raise error(f"out of memory at training step {self.global_step} on {_describe_batch(*self._batch)}; lower "
                        f"--data.batch_size or --data.img_size, or check those images' annotations. "
                        f"{original}") from e


def _describe_batch(shape: torch.Size, targets: list[dict]) -> str:
    """'batch (B, 3, H, W), image ids [...], instances [...]' (ids and counts in batch order)."""
    ids = [t.get("image_id") for t in targets]
    counts = [len(t["labels"]) if "labels" in t else None for t in targets]
    return f"batch {tuple(shape)}, image ids {ids}, instances {counts}"
