"""Turn stride-8 mask logits into boolean masks at the input or original size, exactly and cheaply.

The reference upsamples every mask logit map x8 (bilinear) to the padded input, resizes it again
to ceil(input / scale) and crops to the original image (docs/architecture.md#test-time-postprocess, steps 8-10). Both resizes
are separable linear maps, so the result for one instance is ``Ry @ L @ Rx.T`` with small
(out, h) and (out, w) interpolation matrices. Bilinear weights are convex, so an output pixel can
only exceed the threshold if one of the low-resolution logits in its support does: we evaluate
each instance only over the output rows/columns whose support meets the bounding box of its
above-threshold logits. That is exact (up to float summation order) and skips the full-size
upsampling of every mask, which dominates the reference's CPU inference time.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _bilinear_taps(out_size: int, in_size: int, ratio: float, device=None):
    """Two taps per output position of PyTorch's bilinear resize (align_corners=False), one axis.

    ``ratio`` is in/out as PyTorch uses it (1 / scale_factor, or in_size / out_size). Output
    positions past the resize's own extent clamp to the last input index.
    Returns indices i0, i1 (out,) and weights w0, w1 (out,) float64.
    """
    dst = torch.arange(out_size, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * ratio - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = src - i0
    return i0, i1, 1 - w1, w1


def bilinear_matrix(out_size: int, in_size: int, ratio: float, device=None) -> torch.Tensor:
    """(out_size, in_size) float64 weights of a bilinear resize along one axis."""
    i0, i1, w0, w1 = _bilinear_taps(out_size, in_size, ratio, device)
    rows = torch.arange(out_size, device=device)
    mat = torch.zeros(out_size, in_size, device=device, dtype=torch.float64)
    mat.index_put_((rows, i0), w0, accumulate=True)
    mat.index_put_((rows, i1), w1, accumulate=True)
    return mat


def _then_resize(mat: torch.Tensor, out_size: int, ratio: float) -> torch.Tensor:
    """Compose ``mat`` (M, h) with a second bilinear resize M -> out_size: (out_size, h), by gathers."""
    i0, i1, w0, w1 = _bilinear_taps(out_size, mat.shape[0], ratio, mat.device)
    return w0[:, None] * mat[i0] + w1[:, None] * mat[i1]


def resize_matrices(
    feat_size: tuple[int, int], stride: int, input_size: tuple[int, int], meta=None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column maps (Ho, h), (Wo, w) from stride-``stride`` logits to the output frame.

    Without ``meta``: the padded input (H, W). With ``meta`` (an ``ImageMeta``: orig_size (h, w),
    scale_factor (w_scale, h_scale)): the original image, as the reference's rescale. The reference sizes the
    height with the x scale and the width with the y scale (docs/architecture.md#mask-rescale);
    we do the same. Where its ceil-rounded size falls a pixel short of the original, the last
    row/column is repeated.
    """
    (h, w), (H, W) = feat_size, input_size
    ry = bilinear_matrix(H, h, 1.0 / stride, device)  # (H, h)
    rx = bilinear_matrix(W, w, 1.0 / stride, device)  # (W, w)
    if meta is not None:
        (ori_h, ori_w), (w_scale, h_scale) = meta.orig_size, meta.scale_factor
        h2, w2 = math.ceil(H / w_scale), math.ceil(W / h_scale)
        ry = _then_resize(ry, ori_h, H / h2)  # (ori_h, h)
        rx = _then_resize(rx, ori_w, W / w2)  # (ori_w, w)
    return ry.float(), rx.float()


def paste_masks(logits: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """logits (N, h, w), ry (Ho, h), rx (Wo, w) -> bool masks (N, Ho, Wo) of (Ry L Rx^T) > threshold."""
    n, (ho, wo) = logits.shape[0], (ry.shape[0], rx.shape[0])
    masks = _lazy_zeros((n, ho, wo), logits.device)
    for k, (y0, y1, x0, x1), region in _regions(logits, ry, rx, threshold):
        torch.gt(region, threshold, out=masks[k, y0:y1, x0:x1])
    return masks


def paste_mask_crops(logits: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor,
                     threshold: float = 0.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Like :func:`paste_masks`, but each mask only inside the output region it can reach.

    Returns the crops [(y1 - y0, x1 - x0) bool] and their regions (N, 4) int64 (x0, y0, x1, y1),
    end-exclusive, in the output frame; every pixel outside its region is False. Nothing of the
    output frame's size is allocated, so memory grows with the instances' areas only.
    """
    n = logits.shape[0]
    crops = [torch.zeros((0, 0), dtype=torch.bool, device=logits.device)] * n
    regions = [(0, 0, 0, 0)] * n
    for k, (y0, y1, x0, x1), region in _regions(logits, ry, rx, threshold):
        crops[k] = region > threshold
        regions[k] = (x0, y0, x1, y1)
    return crops, torch.tensor(regions, dtype=torch.int64, device=logits.device).reshape(n, 4)


def _regions(logits: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor, threshold: float):
    """Yield (k, (y0, y1, x0, x1), logits of that output region) for every instance that can pass."""
    if logits.shape[0] == 0:
        return
    rows = _output_span(logits.amax(dim=2) > threshold, ry)  # (N, 4): low-res rows with a logit above
    cols = _output_span(logits.amax(dim=1) > threshold, rx)  # (N, 4): ... and columns
    logits, rx_t = logits.to(ry.dtype), rx.t()
    # Regions are ragged (one rectangle per instance), so each instance gets its own pair of small
    # GEMMs over the low-res window its rows/cols depend on. A padded batch costs
    # O(N x largest region) plus the same per-instance copies; measured slower.
    for k, ((y0, y1, a0, a1), (x0, x1, b0, b1)) in enumerate(zip(rows.tolist(), cols.tolist())):
        if y1 > y0 and x1 > x0:
            yield k, (y0, y1, x0, x1), ry[y0:y1, a0:a1] @ (logits[k, a0:a1, b0:b1] @ rx_t[b0:b1, x0:x1])


def _lazy_zeros(shape: tuple[int, ...], device) -> torch.Tensor:
    """All-False bool tensor. On CPU it comes from calloc (numpy), whose zero pages the OS maps
    on first write: 100 original-size masks cost only the pages their instances touch."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=np.bool_))
    return torch.zeros(shape, dtype=torch.bool, device=device)


def _output_span(active: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """active (N, h) low-res lines with a logit above threshold; mat (Ho, h) interpolation rows.

    An output line is a candidate iff its support [lo, hi] (nonzero columns of ``mat``) meets the
    instance's active range [a, b]. lo and hi grow with the output index, so the candidates form
    one span [start, end), found with searchsorted; it depends on low-res lines [lo[start], hi[end-1]].
    Returns (N, 4) int64: start, end, first and one-past-last low-res line.
    """
    h = active.shape[1]
    idx = torch.arange(h, device=active.device)
    a = torch.where(active, idx, h).min(dim=1).values  # first active line (h if none)
    b = torch.where(active, idx, -1).max(dim=1).values  # last active line (-1 if none)
    nz = mat != 0
    lo = torch.where(nz, idx, h).min(dim=1).values.contiguous()  # (Ho,)
    hi = torch.where(nz, idx, -1).max(dim=1).values.contiguous()
    start = torch.searchsorted(hi, a.contiguous())  # first output line with hi >= a
    end = torch.maximum(torch.searchsorted(lo, b.contiguous(), right=True), start)  # past the last with lo <= b
    last = mat.shape[0] - 1
    low0 = lo[start.clamp(max=last)]
    low1 = hi[(end - 1).clamp(min=0, max=last)] + 1
    return torch.stack([start, end, low0, torch.maximum(low1, low0)], dim=1)
