"""RTMDet-Ins: CSPNeXt -> CSPNeXtPAFPN -> RTMDetInsSepBNHead, and the five official sizes as data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .backbone import CSPNeXt
from .criterion import RTMDetInsCriterion
from .fuse import fuse_conv_bn
from .head import RTMDetInsSepBNHead
from .neck import CSPNeXtPAFPN
from .outputs import RawOutputs
from .postprocess import InstancePostProcess
from .preprocess import ImageMeta


@dataclass(frozen=True)
class SizeConfig:
    deepen_factor: float
    widen_factor: float
    neck_channels: int  # = head width
    neck_csp_blocks: int


# The official rtmdet-ins_{size} configs (docs/architecture.md#model-sizes).
SIZES: dict[str, SizeConfig] = {
    "tiny": SizeConfig(0.167, 0.375, 96, 1),
    "s": SizeConfig(0.33, 0.5, 128, 1),
    "m": SizeConfig(0.67, 0.75, 192, 2),
    "l": SizeConfig(1.0, 1.0, 256, 3),
    "x": SizeConfig(1.33, 1.25, 320, 4),
}


class RTMDetIns(nn.Module):
    """RTMDet-Ins instance segmenter.

    ``forward(images)`` maps normalised BGR images (B, 3, H, W) (see ``rtmdet.preprocess``) to
    :class:`RawOutputs` and does nothing else; H and W must be multiples of 32. The training
    objective (``RTMDetInsCriterion``) and the test-time decoding (``InstancePostProcess``) are
    separate modules, built beside the model by ``rtmdet.build``. ``predict`` and ``loss`` are
    conveniences that run them (the official settings unless one is passed); the model holds
    neither.
    """

    def __init__(self, num_classes: int = 80, size: str = "tiny", proto_stride: int = 8):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown RTMDet-Ins size {size!r}; choose one of {sorted(SIZES)}")
        cfg = SIZES[size]
        self.size = size
        self.num_classes = num_classes
        self.backbone = CSPNeXt(cfg.deepen_factor, cfg.widen_factor)
        self.neck = CSPNeXtPAFPN(self.backbone.out_channels, cfg.neck_channels, cfg.neck_csp_blocks)
        self.head = RTMDetInsSepBNHead(num_classes, cfg.neck_channels, proto_stride=proto_stride)

    @property
    def proto_stride(self) -> int:
        """Stride of the mask prototypes: 8 (the reference) or 4 (opt-in, ``MaskFeatModule``)."""
        return self.head.mask_head.proto_stride

    @property
    def strides(self) -> tuple[int, ...]:
        return self.head.strides

    def forward(self, images: torch.Tensor) -> RawOutputs:
        return RawOutputs(*self.head(self.neck(self.backbone(images))))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, metas: list[ImageMeta] | None = None,
                postprocess: InstancePostProcess | None = None) -> list[dict[str, torch.Tensor]]:
        """Detect instances: ``postprocess(self(images), metas)``. images: (B, 3, H, W) normalised input.

        metas: optional per-image :class:`rtmdet.preprocess.ImageMeta`; with them results are in
        original-image pixels, without them in input pixels. postprocess: the test-time settings
        (default: a fresh ``InstancePostProcess()``, the official ones). Returns per image a dict with
        ``boxes`` (N, 4) xyxy float, ``scores`` (N,), ``labels`` (N,) int64, ``masks`` (N, h, w) bool,
        sorted by score.
        """
        postprocess = postprocess if postprocess is not None else InstancePostProcess(strides=self.strides)
        return postprocess(self(images), metas)

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

    def loss(self, outputs: RawOutputs, targets: list[dict[str, torch.Tensor]],
             criterion: RTMDetInsCriterion | None = None) -> dict[str, torch.Tensor]:
        """Training objective: ``criterion(outputs, targets)`` (default: the official
        ``RTMDetInsCriterion``, which holds no state); see ``rtmdet/criterion.py``."""
        criterion = criterion if criterion is not None else RTMDetInsCriterion(self.num_classes, self.strides)
        return criterion(outputs, targets)


def build_model(size: str = "tiny", num_classes: int = 80, proto_stride: int = 8) -> RTMDetIns:
    """Build RTMDet-Ins of one of the official sizes (tiny, s, m, l, x), freshly initialised;
    ``proto_stride=4``: prototypes at stride 4 (ours, see ``rtmdet/mask_feat.py``)."""
    return RTMDetIns(num_classes=num_classes, size=size, proto_stride=proto_stride)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
