"""CSPNeXt backbone, arch P5 (docs/architecture.md#backbone-cspnext)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import ConvModule, CSPLayer, SPPBottleneck

# (in, out, num_blocks, add_identity, use_spp) of the base (deepen = widen = 1) architecture.
ARCH_P5 = (
    (64, 128, 3, True, False),
    (128, 256, 6, True, False),
    (256, 512, 6, True, False),
    (512, 1024, 3, False, True),
)


class CSPNeXt(nn.Module):
    """Stem (stride 2) and four stages (strides 4, 8, 16, 32); returns C3, C4, C5."""

    def __init__(self, deepen_factor: float, widen_factor: float):
        super().__init__()
        stem_ch = int(64 * widen_factor)
        self.stem = nn.Sequential(
            ConvModule(3, int(64 * widen_factor // 2), 3, stride=2),
            ConvModule(int(64 * widen_factor // 2), int(64 * widen_factor // 2), 3),
            ConvModule(int(64 * widen_factor // 2), stem_ch, 3),
        )
        self.out_channels = []
        for i, (in_ch, out_ch, n, add_identity, use_spp) in enumerate(ARCH_P5):
            in_ch, out_ch = int(in_ch * widen_factor), int(out_ch * widen_factor)
            n = max(round(n * deepen_factor), 1)  # Python round: half to even, as the reference
            layers = [ConvModule(in_ch, out_ch, 3, stride=2)]
            if use_spp:
                layers.append(SPPBottleneck(out_ch))
            layers.append(CSPLayer(out_ch, out_ch, n, add_identity, channel_attention=True))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(out_ch)
        self.out_channels = self.out_channels[1:]  # C3, C4, C5

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stage1(self.stem(x))  # (B, c2, H/4, W/4)
        c3 = self.stage2(x)  # (B, c3, H/8, W/8)
        c4 = self.stage3(c3)  # (B, c4, H/16, W/16)
        c5 = self.stage4(c4)  # (B, c5, H/32, W/32)
        return [c3, c4, c5]
