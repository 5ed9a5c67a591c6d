"""Mask feature module: fuses P3-P5 into the stride-8 mask prototypes (docs/architecture.md#mask-feature-module)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvModule


class MaskFeatModule(nn.Module):
    """[P3, up(P4), up(P5)] -> 1x1 fusion -> 4 x ConvModule 3x3 -> 1x1 projection to prototypes."""

    def __init__(self, channels: int, num_levels: int = 3, stacked_convs: int = 4, num_prototypes: int = 8):
        super().__init__()
        self.fusion_conv = nn.Conv2d(num_levels * channels, channels, 1)
        self.stacked_convs = nn.Sequential(*(ConvModule(channels, channels, 3) for _ in range(stacked_convs)))
        self.projection = nn.Conv2d(channels, num_prototypes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        ups = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        x = self.fusion_conv(torch.cat([feats[0], *ups], dim=1))  # (B, Co, H/8, W/8), no BN/act
        return self.projection(self.stacked_convs(x))  # (B, num_prototypes, H/8, W/8)
