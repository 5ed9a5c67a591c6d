"""RTMDetInsSepBNHead (docs/architecture.md#sepbn-head): per-level towers with shared convs and separate BN.

Reference behaviour reproduced here (docs/architecture.md#box-branch-on-the-classification-tower
and docs/architecture.md#double-bn-update):
* the box branch runs on the classification tower (mmdet's ``reg_convs`` *is* ``cls_convs``), so we
  run the tower once and feed ``rtm_reg`` from the classification features;
* in training the reference runs that tower twice per step, updating its BN running statistics
  twice with identical batch statistics: r <- 0.9 (0.9 r + 0.1 s) + 0.1 s = 0.81 r + 0.19 s. We run
  it once with BN momentum 1 - 0.9^2 = 0.19, which gives the same running statistics;
* box distances are ReLU(raw) x stride (no exp, no learnable scale).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .dynamic_mask import num_dynamic_params
from .layers import BN_EPS, BN_MOMENTUM, ConvModule
from .mask_feat import MaskFeatModule

CLS_TOWER_BN_MOMENTUM = 1.0 - (1.0 - BN_MOMENTUM) ** 2  # two updates per step: docs/architecture.md#double-bn-update


class RTMDetInsSepBNHead(nn.Module):
    """Per level: cls tower -> (cls logits, box distances); kernel tower -> 169 dynamic params."""

    def __init__(
        self,
        num_classes: int,
        channels: int,
        strides: tuple[int, ...] = (8, 16, 32),
        stacked_convs: int = 2,
        num_prototypes: int = 8,
        dyconv_channels: int = 8,
        num_dyconvs: int = 3,
        proto_stride: int = 8,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.strides = strides
        levels = range(len(strides))
        # Classification tower: conv weights shared across levels, BN separate per level.
        self.cls_convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(stacked_convs)
        )
        self.cls_norms = nn.ModuleList(
            nn.ModuleList(
                nn.BatchNorm2d(channels, eps=BN_EPS, momentum=CLS_TOWER_BN_MOMENTUM) for _ in range(stacked_convs)
            )
            for _ in levels
        )
        self.cls_act = nn.SiLU(inplace=True)
        # Kernel tower: nothing shared.
        self.kernel_convs = nn.ModuleList(
            nn.Sequential(*(ConvModule(channels, channels, 3) for _ in range(stacked_convs))) for _ in levels
        )
        num_params = num_dynamic_params(num_prototypes, dyconv_channels, num_dyconvs)  # 169
        self.rtm_cls = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in levels)
        self.rtm_reg = nn.ModuleList(nn.Conv2d(channels, 4, 1) for _ in levels)
        self.rtm_kernel = nn.ModuleList(nn.Conv2d(channels, num_params, 1) for _ in levels)
        self.mask_head = MaskFeatModule(channels, len(strides), 4, num_prototypes, proto_stride)
        self.init_weights()

    def init_weights(self, prior_prob: float = 0.01) -> None:
        """Every head conv N(0, 0.01) with bias 0; cls bias from the prior; reg bias 1.

        As the reference's ``init_weights`` (docs/architecture.md#head-initialisation).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in self.rtm_cls:
            nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))
        for conv in self.rtm_reg:
            nn.init.constant_(conv.bias, 1.0)

    def forward(self, feats: list[torch.Tensor]):
        """feats: neck outputs (B, Co, H_l, W_l). Returns per-level lists and the prototypes.

        cls_logits (B, C, H_l, W_l); box_dists (B, 4, H_l, W_l) (l, t, r, b) in input pixels;
        kernels (B, 169, H_l, W_l); mask_protos (B, 8, H_0, W_0) at stride 8.
        """
        cls_logits, box_dists, kernels = [], [], []
        for lvl, (x, stride) in enumerate(zip(feats, self.strides)):
            cls_feat = x
            for conv, bn in zip(self.cls_convs, self.cls_norms[lvl]):  # fused: identity, level's conv (fuse.py)
                cls_feat = self.cls_act(bn(conv(cls_feat)))
            cls_logits.append(self.rtm_cls[lvl](cls_feat))
            box_dists.append(self.rtm_reg[lvl](cls_feat).relu() * stride)  # reg tower == cls tower
            kernels.append(self.rtm_kernel[lvl](self.kernel_convs[lvl](x)))
        return cls_logits, box_dists, kernels, self.mask_head(feats)
