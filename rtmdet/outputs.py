"""What the network returns: raw per-level tensors, before any decoding (see docs/architecture.md)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RawOutputs(NamedTuple):
    """``RTMDetIns.forward``'s result: per-level lists plus the mask prototypes (stride 8; 4 opt-in).

    The criterion (training) and ``InstancePostProcess`` (inference) both start from it.
    """

    cls_logits: list[torch.Tensor]  # (B, C, H_l, W_l) raw logits
    box_dists: list[torch.Tensor]  # (B, 4, H_l, W_l) (l, t, r, b) in input pixels, ReLU(raw) * stride
    kernels: list[torch.Tensor]  # (B, 169, H_l, W_l) dynamic conv parameters
    mask_protos: torch.Tensor  # (B, 8, H/s, W/s), s the prototype stride (8; 4 opt-in)

    def proto_stride(self, level0_stride: int) -> int:
        """Prototype stride, read off the shapes: level 0's map is (H / level0_stride, W / ...)."""
        return level0_stride * self.cls_logits[0].shape[-2] // self.mask_protos.shape[-2]
