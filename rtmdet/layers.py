"""Building blocks of CSPNeXt and its PAFPN (docs/architecture.md#building-blocks).

Child names (``conv``, ``bn``, ``depthwise_conv``, ``main_conv``...) follow mmdetection so that the
checkpoint mapping is a rename of prefixes only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# The official configs give SyncBN no eps/momentum, so PyTorch's defaults apply, not mmdet's class
# defaults (1e-3, 0.03): docs/architecture.md#batch-normalisation-settings.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class ConvModule(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """k x k depthwise ConvModule then 1x1 pointwise ConvModule, each with its own BN and SiLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__()
        self.depthwise_conv = ConvModule(in_ch, in_ch, kernel_size, groups=in_ch)
        self.pointwise_conv = ConvModule(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 conv then 5x5 depthwise-separable conv, with an optional identity shortcut."""

    def __init__(self, channels: int, add_identity: bool):
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3)
        self.conv2 = DepthwiseSeparableConvModule(channels, channels, 5)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return x + out if self.add_identity else out


class ChannelAttention(nn.Module):
    """Global average pool -> 1x1 conv (bias) -> Hardsigmoid, multiplied back onto the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the official pool runs in fp32
            pooled = x.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * F.hardsigmoid(self.fc(pooled.to(x.dtype)))


class CSPLayer(nn.Module):
    """Cross-stage-partial layer: [blocks(main_conv(x)), short_conv(x)] -> (attention) -> final_conv."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, add_identity: bool, channel_attention: bool):
        super().__init__()
        mid = int(out_ch * 0.5)
        # Registration order = mmdet's state_dict order.
        self.main_conv = ConvModule(in_ch, mid, 1)
        self.short_conv = ConvModule(in_ch, mid, 1)
        self.final_conv = ConvModule(2 * mid, out_ch, 1)
        self.blocks = nn.Sequential(*(CSPNeXtBlock(mid, add_identity) for _ in range(num_blocks)))
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1)  # (B, 2*mid, H, W)
        if self.attention is not None:
            x = self.attention(x)
        return self.final_conv(x)


class SPPBottleneck(nn.Module):
    """Parallel spatial pyramid pooling with max-pools 5, 9, 13 (not the sequential SPPF)."""

    def __init__(self, channels: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvModule(channels, mid, 1)
        self.kernel_sizes = kernel_sizes
        self.conv2 = ConvModule(mid * (len(kernel_sizes) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        # Stride-1 max-pools compose: pool_b(pool_a(x)) = pool_(a+b-1)(x) exactly (the window is the
        # union, the -inf padding never wins), so 9 and 13 reuse the previous pool with a 5 x 5
        # window: 3 x 25 comparisons per pixel instead of 25 + 81 + 169.
        pools, prev = [], 1
        for k in self.kernel_sizes:
            step = k - prev + 1  # odd when the sizes are
            pools.append(F.max_pool2d(pools[-1] if pools else x, step, stride=1, padding=step // 2))
            prev = k
        return self.conv2(torch.cat([x, *pools], dim=1))  # (B, 4*mid, H, W) -> (B, C, H, W)
