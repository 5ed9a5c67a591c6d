"""Mask feature module: fuses P3-P5 into the mask prototypes (docs/architecture.md#mask-feature-module).

The reference's prototypes are at stride 8. ``proto_stride=4`` (ours, opt-in) adds one stage before
the projection: the fused features upsampled x2 (bilinear) and refined by a 3x3 ConvModule, so an
8-16 px sprite spans 2-4 prototype cells instead of 1-2.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvModule


class MaskFeatModule(nn.Module):
    """[P3, up(P4), up(P5)] -> 1x1 fusion -> 4 x ConvModule 3x3 [-> up x2 -> ConvModule 3x3] -> 1x1
    projection to prototypes (the bracket with ``proto_stride=4``)."""

    def __init__(self, channels: int, num_levels: int = 3, stacked_convs: int = 4, num_prototypes: int = 8,
                 proto_stride: int = 8):
        super().__init__()
        if proto_stride not in (4, 8):
            raise ValueError(f"proto_stride must be 8 (the reference) or 4, got {proto_stride}")
        self.proto_stride = proto_stride
        self.fusion_conv = nn.Conv2d(num_levels * channels, channels, 1)
        self.stacked_convs = nn.Sequential(*(ConvModule(channels, channels, 3) for _ in range(stacked_convs)))
        if proto_stride == 4:
            self.upsample_conv = ConvModule(channels, channels, 3)
        self.projection = nn.Conv2d(channels, num_prototypes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        ups = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        x = self.fusion_conv(torch.cat([feats[0], *ups], dim=1))  # (B, Co, H/8, W/8), no BN/act
        x = self.stacked_convs(x)
        if self.proto_stride == 4:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.projection(x)  # (B, num_prototypes, H/s, W/s), s = proto_stride
