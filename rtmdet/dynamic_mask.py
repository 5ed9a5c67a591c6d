"""Dynamic-kernel mask generation, CondInst style. Serves the loss and inference.

Each instance carries 169 parameters (for 8 prototypes, 8 channels, 3 layers), laid out weights
first then biases: W1 (8 x 10), W2 (8 x 8), W3 (1 x 8), b1 (8), b2 (8), b3 (1); weights out-major.
The input of the first 1x1 conv is [rel_x, rel_y, F_0..F_7] on the prototype grid (stride 8, or 4
opt-in), with rel = (instance point - grid point) / (8 * instance stride): the 8 is a fixed
normaliser, not the grid's stride, so a stride-4 grid sees the same coordinates at twice the density.
"""

from __future__ import annotations

import torch

COORD_NORM = 8  # rel = (point - grid) / (COORD_NORM * prior stride)


def num_dynamic_params(num_prototypes: int = 8, channels: int = 8, num_layers: int = 3) -> int:
    weights, biases = _layer_sizes(num_prototypes, channels, num_layers)
    return sum(o * i for o, i in weights) + sum(biases)


def _layer_sizes(num_prototypes: int, channels: int, num_layers: int):
    ins = [num_prototypes + 2] + [channels] * (num_layers - 1)
    outs = [channels] * (num_layers - 1) + [1]
    return list(zip(outs, ins)), outs


def split_dynamic_params(params: torch.Tensor, num_prototypes: int = 8, channels: int = 8, num_layers: int = 3):
    """(K, 169) -> weights [(K, out, in)] and biases [(K, out, 1)] per layer."""
    shapes, outs = _layer_sizes(num_prototypes, channels, num_layers)
    sizes = [o * i for o, i in shapes] + outs
    chunks = params.split(sizes, dim=1)
    weights = [w.reshape(-1, o, i) for w, (o, i) in zip(chunks[:num_layers], shapes)]
    biases = [b.reshape(-1, o, 1) for b, o in zip(chunks[num_layers:], outs)]
    return weights, biases


def dynamic_mask_logits(
    mask_protos: torch.Tensor,
    params: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    img_idx: torch.Tensor,
    proto_stride: int = 8,
    channels: int = 8,
) -> torch.Tensor:
    """Mask logits of K instances at the prototype resolution.

    mask_protos: (B, P, h, w) stride-``proto_stride`` prototypes. params: (K, 169) dynamic params.
    points: (K, 2) xy prior points in input pixels; strides: (K,) their prior strides;
    img_idx: (K,) int64 image of each instance; channels: dynamic conv width D. Returns (K, h, w) logits (before sigmoid).
    """
    B, P, h, w = mask_protos.shape
    K = params.shape[0]
    dtype = torch.promote_types(mask_protos.dtype, params.dtype)
    if K == 0:
        return mask_protos.new_zeros((0, h, w), dtype=dtype)
    mask_protos, params = mask_protos.to(dtype), params.to(dtype)
    (w1, w2, w3), (b1, b2, b3) = split_dynamic_params(params, P, channels, 3)
    # rel_x = (px - gx) / (8 s) is affine in the grid coordinate gx, so the coordinate part of the
    # first conv folds into one GEMM over [gx, gy, F_0..F_{P-1}]: weights -W_x / (8 s), -W_y / (8 s)
    # on the grid channels, and W_x px / (8 s) + W_y py / (8 s) added to the bias.
    inv_norm = 1.0 / (strides.to(dtype) * COORD_NORM)  # (K,)
    w_xy = w1[:, :, :2] * inv_norm[:, None, None]  # (K, D, 2)
    b1 = b1 + (w_xy * points.to(dtype)[:, None, :]).sum(-1, keepdim=True)  # (K, D, 1)
    w1 = torch.cat([-w_xy, w1[:, :, 2:]], dim=2)  # (K, D, 2 + P)
    gy, gx = torch.meshgrid(
        torch.arange(h, device=params.device, dtype=dtype) * proto_stride,
        torch.arange(w, device=params.device, dtype=dtype) * proto_stride,
        indexing="ij",
    )
    grid = torch.stack([gx, gy]).reshape(1, 2, h * w).expand(B, 2, h * w)
    feats = torch.cat([grid, mask_protos.reshape(B, P, h * w)], dim=1)  # (B, 2 + P, h*w)
    # Pixel chunks keep the (K, D, chunk) intermediates in cache (about 2x faster for 100 instances).
    chunk = max(256, 2**20 // (K * channels))
    out = [_mlp(w1, b1, w2, b2, w3, b3, feats[..., i : i + chunk], img_idx) for i in range(0, h * w, chunk)]
    return torch.cat(out, dim=2).view(K, h, w)


def _mlp(w1, b1, w2, b2, w3, b3, feats: torch.Tensor, img_idx: torch.Tensor) -> torch.Tensor:
    """Three per-instance 1x1 convs on feats (B, 2+P, n) -> (K, 1, n) logits."""
    K, D, C = w1.shape
    if feats.shape[0] == 1:  # one image (inference): a single (K*D, C) @ (C, n) GEMM, no gather
        x = torch.mm(w1.reshape(K * D, C), feats[0]).view(K, D, -1)
    else:
        x = torch.bmm(w1, feats[img_idx])  # (K, D, n)
    x = torch.bmm(w2, x.add_(b1).relu_()).add_(b2).relu_()  # (K, D, n)
    return torch.bmm(w3, x).add_(b3)  # (K, 1, n)
