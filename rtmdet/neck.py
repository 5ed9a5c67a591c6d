"""CSPNeXtPAFPN neck (docs/architecture.md#neck-cspnextpafpn)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvModule, CSPLayer


class CSPNeXtPAFPN(nn.Module):
    """Top-down then bottom-up path aggregation over (C3, C4, C5) -> (P3, P4, P5), all ``out_channels``."""

    def __init__(self, in_channels: list[int], out_channels: int, num_csp_blocks: int):
        super().__init__()
        c3, c4, c5 = in_channels

        def csp(i: int, o: int) -> CSPLayer:
            return CSPLayer(i, o, num_csp_blocks, add_identity=False, channel_attention=False)

        self.reduce_layers = nn.ModuleList([ConvModule(c5, c4, 1), ConvModule(c4, c3, 1)])
        self.top_down_blocks = nn.ModuleList([csp(2 * c4, c4), csp(2 * c3, c3)])
        self.downsamples = nn.ModuleList([ConvModule(c3, c3, 3, stride=2), ConvModule(c4, c4, 3, stride=2)])
        self.bottom_up_blocks = nn.ModuleList([csp(2 * c3, c4), csp(2 * c4, c5)])
        self.out_convs = nn.ModuleList([ConvModule(c, out_channels, 3) for c in (c3, c4, c5)])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = feats
        r5 = self.reduce_layers[0](c5)  # (B, c4, H/32, W/32)
        t4 = self.top_down_blocks[0](torch.cat([F.interpolate(r5, scale_factor=2.0, mode="nearest"), c4], 1))
        r4 = self.reduce_layers[1](t4)  # (B, c3, H/16, W/16)
        t3 = self.top_down_blocks[1](torch.cat([F.interpolate(r4, scale_factor=2.0, mode="nearest"), c3], 1))
        # The bottom-up path concatenates the *reduced* maps r4, r5 (not t4, c5), as the reference.
        b4 = self.bottom_up_blocks[0](torch.cat([self.downsamples[0](t3), r4], 1))  # (B, c4, H/16, W/16)
        b5 = self.bottom_up_blocks[1](torch.cat([self.downsamples[1](b4), r5], 1))  # (B, c5, H/32, W/32)
        return [conv(x) for conv, x in zip(self.out_convs, (t3, b4, b5))]
