"""Point priors and distance box coding (docs/architecture.md#priors-and-box-coding).

A prior of cell (row i, col j) on a level of stride s is the point (j*s, i*s): offset 0, the cell's
top-left corner. Priors are ordered row-major (x fastest) within a level, levels 8 -> 16 -> 32.
"""

from __future__ import annotations

import torch


def grid_priors(
    featmap_sizes: list[tuple[int, int]], strides: tuple[int, ...], device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns points (P, 2) xy in input pixels and their strides (P,), P = sum of H_l * W_l."""
    points, point_strides = [], []
    for (h, w), s in zip(featmap_sizes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) * s
        xs = torch.arange(w, device=device, dtype=dtype) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))  # (H*W, 2)
        point_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)


def distance2bbox(points: torch.Tensor, dists: torch.Tensor) -> torch.Tensor:
    """points (..., 2) xy and distances (..., 4) (l, t, r, b) -> boxes (..., 4) xyxy."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack(
        [x - dists[..., 0], y - dists[..., 1], x + dists[..., 2], y + dists[..., 3]], dim=-1
    )


def flatten_levels(per_level: list[torch.Tensor]) -> torch.Tensor:
    """List of (B, C, H_l, W_l) -> (B, P, C) in prior order."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in per_level], dim=1)
