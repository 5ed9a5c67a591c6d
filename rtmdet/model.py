"""RTMDet-Ins: CSPNeXt -> CSPNeXtPAFPN -> RTMDetInsSepBNHead, and the five official sizes as data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from .backbone import CSPNeXt
from .criterion import RTMDetInsCriterion
from .fuse import fuse_conv_bn
from .head import RTMDetInsSepBNHead
from .neck import CSPNeXtPAFPN
from .postprocess import InstancePostProcess


@dataclass(frozen=True)
class SizeConfig:
    deepen_factor: float
    widen_factor: float
    neck_channels: int  # = head width
    neck_csp_blocks: int


# Spec sections 1.3-1.4 (the official rtmdet-ins_{size} configs).
SIZES: dict[str, SizeConfig] = {
    "tiny": SizeConfig(0.167, 0.375, 96, 1),
    "s": SizeConfig(0.33, 0.5, 128, 1),
    "m": SizeConfig(0.67, 0.75, 192, 2),
    "l": SizeConfig(1.0, 1.0, 256, 3),
    "x": SizeConfig(1.33, 1.25, 320, 4),
}


class RawOutputs(NamedTuple):
    """What ``RTMDetIns.forward`` returns: per-level lists plus the stride-8 prototypes."""

    cls_logits: list[torch.Tensor]  # (B, C, H_l, W_l) raw logits
    box_dists: list[torch.Tensor]  # (B, 4, H_l, W_l) (l, t, r, b) in input pixels, ReLU(raw) * stride
    kernels: list[torch.Tensor]  # (B, 169, H_l, W_l) dynamic conv parameters
    mask_protos: torch.Tensor  # (B, 8, H/8, W/8)


class RTMDetIns(nn.Module):
    """RTMDet-Ins instance segmenter.

    ``forward(images)`` maps normalised BGR images (B, 3, H, W) (see ``rtmdet.preprocess``) to
    :class:`RawOutputs`; ``predict`` adds the NMS-and-mask postprocessing; ``loss`` the training
    objective. H and W must be multiples of 32.
    """

    def __init__(self, num_classes: int = 80, size: str = "tiny"):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown RTMDet-Ins size {size!r}; choose one of {sorted(SIZES)}")
        cfg = SIZES[size]
        self.size = size
        self.num_classes = num_classes
        self.backbone = CSPNeXt(cfg.deepen_factor, cfg.widen_factor)
        self.neck = CSPNeXtPAFPN(self.backbone.out_channels, cfg.neck_channels, cfg.neck_csp_blocks)
        self.head = RTMDetInsSepBNHead(num_classes, cfg.neck_channels)
        self.postprocess = InstancePostProcess()
        self.criterion = RTMDetInsCriterion(num_classes, self.head.strides)  # no parameters or buffers

    @property
    def strides(self) -> tuple[int, ...]:
        return self.head.strides

    def forward(self, images: torch.Tensor) -> RawOutputs:
        return RawOutputs(*self.head(self.neck(self.backbone(images))))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, metas: list | None = None) -> list[dict[str, torch.Tensor]]:
        """Detect instances. images: (B, 3, H, W) normalised input.

        metas: optional per-image ``rtmdet.preprocess.ImageMeta`` (or dicts with ``orig_size`` (h, w)
        and ``scale_factor`` (w_scale, h_scale)); with them results are in original-image pixels,
        without them in input pixels. Returns per image a dict with ``boxes`` (N, 4) xyxy float,
        ``scores`` (N,), ``labels`` (N,) int64, ``masks`` (N, h, w) bool, sorted by score.
        """
        return self.postprocess(self(images), images.shape[-2:], self.strides, metas)

    def fuse(self) -> RTMDetIns:
        """Fold every BatchNorm into the conv before it, in place, for inference; returns self.

        Outputs are unchanged up to float rounding, the forward is faster. Eval mode only (it
        folds the running statistics); load checkpoints before fusing, and fuse a copy
        (``copy.deepcopy(model).fuse()``) to keep a trainable model. See ``rtmdet/fuse.py``.
        """
        if self.training:
            raise RuntimeError("fuse() folds the BatchNorm running statistics and is for inference only: "
                               "call model.eval() first (and load checkpoints before fusing)")
        return fuse_conv_bn(self)

    def loss(self, outputs: RawOutputs, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Training objective (spec 4.2-4.3); see ``rtmdet.criterion.RTMDetInsCriterion``."""
        return self.criterion(outputs, targets)


def build_model(size: str = "tiny", num_classes: int = 80) -> RTMDetIns:
    """Build RTMDet-Ins of one of the official sizes (tiny, s, m, l, x), freshly initialised."""
    return RTMDetIns(num_classes=num_classes, size=size)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
