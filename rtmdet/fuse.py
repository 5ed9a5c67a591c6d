"""Inference-time folding of every BatchNorm into the convolution before it (``RTMDetIns.fuse``).

In eval mode BN is a per-channel affine map, y = gamma (x - mu) / sqrt(var + eps) + beta. After a
conv with weight W and bias b it merges into one conv with

    W' = W s,  b' = (b - mu) s + beta,  s = gamma / sqrt(var + eps)   (s per output channel)

which saves one full pass over every feature map. The head's classification tower shares its conv
weights across levels but has a BN per level (docs/architecture.md#sepbn-head), so folding there
gives one conv per level:
the shared conv becomes an identity and each per-level BN slot holds that level's folded conv, so
``bn(conv(x))`` in ``RTMDetInsSepBNHead.forward`` still reads the same.

Folding builds new tensors and never writes into the model's existing ones: a ``state_dict`` taken
before fusing keeps the original weights. Fused models are for inference only; checkpoints load
into unfused models (the fused module tree no longer matches the checkpoint layout).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .head import RTMDetInsSepBNHead
from .layers import ConvModule


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) computing ``bn(conv(x))`` of eval mode; ``conv`` and ``bn`` are left untouched.

    The folding is done in float64 and rounded once to the conv's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    w = conv.weight  # (out, in / groups, kh, kw)
    scale = bn.running_var.double().add(bn.eps).rsqrt()  # (out,)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter((w.double() * scale[:, None, None, None]).to(w.dtype))  # keeps w's memory format
    fused.bias = nn.Parameter(bias.to(w.dtype))
    return fused


def _fuse_sepbn_head(head: RTMDetInsSepBNHead) -> None:
    """Shared tower convs x per-level BNs -> one folded conv per level and tower position."""
    folded = False
    for norms in head.cls_norms:  # per level
        for i, bn in enumerate(norms):
            if isinstance(bn, nn.BatchNorm2d):
                norms[i] = fold_conv_bn(head.cls_convs[i], bn)
                folded = True
    if folded:  # only once every level has been folded from the shared weights
        head.cls_convs = nn.ModuleList(nn.Identity() for _ in head.cls_convs)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm of an RTMDet-Ins model into its conv, in place; returns ``model``.

    Idempotent: a fused model has no BatchNorm left, so a second call changes nothing.
    """
    for module in list(model.modules()):  # a snapshot: the loop replaces children
        if isinstance(module, RTMDetInsSepBNHead):
            _fuse_sepbn_head(module)
        elif isinstance(module, ConvModule) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fold_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if left:
        raise RuntimeError(f"fuse_conv_bn: BatchNorm layers without a foldable conv before them: {left}")
    return model
