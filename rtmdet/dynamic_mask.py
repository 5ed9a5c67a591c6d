"""Dynamic-kernel mask generation, CondInst style (spec section 1.7). Serves the loss and inference.

Each instance carries 169 parameters (for 8 prototypes, 8 channels, 3 layers), laid out weights
first then biases: W1 (8 x 10), W2 (8 x 8), W3 (1 x 8), b1 (8), b2 (8), b3 (1); weights out-major.
The input of the first 1x1 conv is [rel_x, rel_y, F_0..F_7] on the stride-8 prototype grid, with
rel = (instance point - grid point) / (8 * instance stride).
"""

from __future__ import annotations

import torch


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
    weights, biases = split_dynamic_params(params, P, channels, 3)
    # Relative coordinates are separable: rel_x depends on the column only, rel_y on the row only.
    norm = (strides.to(dtype) * proto_stride)[:, None]  # (K, 1)
    grid_x = torch.arange(w, device=params.device, dtype=dtype) * proto_stride
    grid_y = torch.arange(h, device=params.device, dtype=dtype) * proto_stride
    rel_x = (points[:, 0:1].to(dtype) - grid_x) / norm  # (K, w)
    rel_y = (points[:, 1:2].to(dtype) - grid_y) / norm  # (K, h)
    w1 = weights[0]  # (K, D, 2 + P): columns [rel_x, rel_y, F_0..F_{P-1}]
    protos = mask_protos[img_idx].reshape(K, P, h * w)  # (K, P, h*w)
    x = torch.baddbmm(biases[0], w1[:, :, 2:], protos).view(K, channels, h, w)  # (K, D, h, w)
    x = x + w1[:, :, 0, None, None] * rel_x[:, None, None, :] + w1[:, :, 1, None, None] * rel_y[:, None, :, None]
    x = x.relu().flatten(2)  # (K, D, h*w)
    x = torch.baddbmm(biases[1], weights[1], x).relu()  # (K, D, h*w)
    x = torch.baddbmm(biases[2], weights[2], x)  # (K, 1, h*w)
    return x.view(K, h, w)

