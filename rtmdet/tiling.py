"""Tiled prediction: whole screenshots and sprite sheets far larger than the input size.

Letterboxing a 4096 x 4096 sheet into a 640 input shrinks a 16-px sprite to 2.5 px, below the
stride-8 features, and one forward keeps at most ``nms_pre`` candidates per level. Here the image is
cut into overlapping windows of ``tile_size`` original pixels; each window is letterboxed to the
input size exactly as a whole image is and goes through the network in batches; detections are
mapped back to original pixels (masks as :class:`CropMasks`, never an image-sized stack) and merged:

* an instance that touches an inner window edge ("cut") is dropped when a window that holds it
  whole found it too (most of the cut mask lies inside the whole one);
* an instance cut in every window that sees it (larger than the overlap) is merged with its
  counterparts: same class, from another window, masks agreeing inside the two windows' overlap;
  the merged mask is the union of the parts, exact in original pixels;
* duplicates in the overlaps (the same sprite whole in two windows) go by class-aware NMS on mask
  IoU, not box IoU, so touching sprites of one class stay apart.

An optional whole-image pass adds objects larger than a window; its detections rank after the
windows' whole ones (they are coarser) and before cut ones, and merge by the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .crop_masks import CropMasks
from .postprocess import InstancePostProcess
from .preprocess import preprocess


def tile_windows(height: int, width: int, tile_size: int, overlap: float = 0.2) -> torch.Tensor:
    """Windows (T, 4) int64 (x0, y0, x1, y1), end-exclusive, covering an (height, width) image.

    Along each axis: one window when the image fits, else n windows of ``tile_size`` spread evenly
    from edge to edge, n the fewest that overlap neighbours by at least ``overlap`` x tile_size.
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"tile_overlap must be in [0, 1), got {overlap}")

    def starts(length: int) -> list[int]:
        if length <= tile_size:
            return [0]
        step = max(1, math.floor(tile_size * (1 - overlap)))
        n = math.ceil((length - tile_size) / step) + 1
        return [round(i * (length - tile_size) / (n - 1)) for i in range(n)]

    ys, xs = starts(height), starts(width)
    return torch.tensor([[x, y, min(x + tile_size, width), min(y + tile_size, height)] for y in ys for x in xs],
                        dtype=torch.int64)


class TiledPredictor:
    """Predict one large RGB image window by window and merge (see module doc).

    Args:
        model: ``RTMDetIns`` in eval mode (any device).
        postprocess: the test-time settings; windows are decoded with them, masks as crops, and
            ``max_per_img`` per window raised to ``max_det + 1`` (the image's cap is ``max_det``).
        img_size: network input size (multiple of 32); each window is letterboxed to it.
        tile_size: window side in original pixels (``img_size`` keeps the image's own scale).
        tile_overlap: fraction of a window shared with its neighbour (at least; default 0.2).
        nearest: nearest-neighbour letterbox (pixel art) instead of bilinear.
        batch_size: windows per forward.
        whole_image: also predict the letterboxed whole image, for objects larger than a window.
        max_det: instances kept per image, best first.
        iou_thr: mask IoU above which two detections of one class are duplicates.
    """

    def __init__(self, model, postprocess: InstancePostProcess, img_size: int, tile_size: int,
                 tile_overlap: float = 0.2, nearest: bool = False, batch_size: int = 4, whole_image: bool = False,
                 max_det: int = 300, iou_thr: float = 0.5):
        if max_det < 1:
            raise ValueError(f"max_det must be at least 1, got {max_det}")
        self.model, self.img_size, self.tile_size = model, img_size, tile_size
        self.tile_overlap, self.nearest, self.batch_size = tile_overlap, nearest, batch_size
        self.whole_image, self.max_det, self.iou_thr = whole_image, max_det, iou_thr
        settings = {**postprocess.settings(), "max_per_img": max_det + 1}
        self.postprocess = InstancePostProcess(**settings, strides=postprocess.strides, mask_format="crops")
        tile_scale = img_size / tile_size  # input pixels per original pixel inside a window
        self.edge_margin = max(2, math.ceil(2 / tile_scale))  # original pixels: about two input pixels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> tuple[dict, int]:
        """image: (H, W, 3) uint8 RGB. Returns (prediction, found).

        prediction: ``boxes`` (N, 4) float xyxy, ``scores`` (N,), ``labels`` (N,) int64, ``masks``
        CropMasks (N, H, W), original pixels, by descending score, N <= max_det. found: instances
        after merging, before the ``max_det`` cap (found > N means the cap cut some off).
        """
        H, W = image.shape[:2]
        windows = tile_windows(H, W, self.tile_size, self.tile_overlap)
        parts = []
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i:i + self.batch_size]
            parts += self._predict([image[y0:y1, x0:x1] for x0, y0, x1, y1 in batch.tolist()], batch, (H, W))
        if len(windows) == 1 and not self.whole_image:  # one window is the whole image: nothing to merge
            pred = parts[0]
            rank = torch.zeros(len(pred["scores"]), dtype=torch.int64)
            return self._cap(pred, rank)
        whole = torch.tensor([[0, 0, W, H]])
        if self.whole_image:
            parts += self._predict([image], whole, (H, W))
        pred, window = _cat(parts, (H, W))
        cut = cut_by_window(pred["masks"].boxes(), pred["boxes"], window, (H, W), self.edge_margin)
        is_whole_pass = (window == whole).all(1) if self.whole_image else torch.zeros(len(window), dtype=torch.bool)
        # Priority: whole in a window (0), whole-image pass (1), cut by an inner window edge (2).
        rank = torch.where(cut, 2, torch.where(is_whole_pass, 1, 0))
        merged = merge_detections(pred, window, rank, self.iou_thr)
        return self._cap(merged[0], merged[1])

    def _predict(self, crops: Sequence[np.ndarray], windows: torch.Tensor, size: tuple[int, int]) -> list[dict]:
        """Windows' images -> per-window predictions in the image frame, each with its ``window``."""
        x, metas = preprocess(list(crops), self.img_size, self.nearest)
        param = next(self.model.parameters())
        x = x.to(param.device)
        if param.is_contiguous(memory_format=torch.channels_last) and param.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        preds = self.postprocess(self.model(x), metas)
        out = []
        for (x0, y0, _, _), p, win in zip(windows.tolist(), preds, windows):
            out.append({
                "boxes": p["boxes"].cpu() + torch.tensor([x0, y0, x0, y0], dtype=torch.float32),
                "scores": p["scores"].cpu(), "labels": p["labels"].cpu(),
                "masks": p["masks"].cpu().shift(x0, y0, size).tight(),
                "window": win.expand(len(p["scores"]), 4),
            })
        return out

    def _cap(self, pred: dict, rank: torch.Tensor) -> tuple[dict, int]:
        """Best ``max_det`` by score (ties: lower rank first); returns (prediction, found)."""
        found = len(pred["scores"])
        order = sorted(range(found), key=lambda i: (-float(pred["scores"][i]), int(rank[i])))[:self.max_det]
        idx = torch.tensor(order, dtype=torch.int64)
        keep = {k: pred[k][idx] for k in ("boxes", "scores", "labels", "masks")}
        return keep, found


def _cat(parts: list[dict], size: tuple[int, int]) -> tuple[dict, torch.Tensor]:
    pred = {k: torch.cat([p[k] for p in parts]) for k in ("boxes", "scores", "labels")}
    pred["masks"] = CropMasks.cat([p["masks"] for p in parts], size)
    return pred, torch.cat([p["window"] for p in parts]).reshape(-1, 4)


def cut_by_window(mask_boxes: torch.Tensor, boxes: torch.Tensor, windows: torch.Tensor, size: tuple[int, int],
                  margin: int) -> torch.Tensor:
    """(N,) bool: the detection reaches within ``margin`` px of an inner edge of its window.

    mask_boxes: (N, 4) int tight boxes of the masks (all zero for an empty mask, then ``boxes``,
    the predicted (N, 4) xyxy, is used); windows: (N, 4) the window of each detection; inner edges
    are those not on the image border (size (H, W)).
    """
    H, W = size
    empty = (mask_boxes[:, 2] <= mask_boxes[:, 0]) | (mask_boxes[:, 3] <= mask_boxes[:, 1])
    b = torch.where(empty[:, None], boxes.float(), mask_boxes.float())  # (N, 4)
    w = windows.float()
    left = (w[:, 0] > 0) & (b[:, 0] - w[:, 0] < margin)
    top = (w[:, 1] > 0) & (b[:, 1] - w[:, 1] < margin)
    right = (w[:, 2] < W) & (w[:, 2] - b[:, 2] < margin)
    bottom = (w[:, 3] < H) & (w[:, 3] - b[:, 3] < margin)
    return left | top | right | bottom


def merge_detections(pred: dict, windows: torch.Tensor, rank: torch.Tensor,
                     iou_thr: float = 0.5, contain_thr: float = 0.5) -> tuple[dict, torch.Tensor]:
    """Merge detections of overlapping windows into one instance per object (see module doc).

    pred: ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,), ``masks`` CropMasks, all in the image
    frame; windows: (N, 4) the window each came from; rank: (N,) 0 whole in its window, 1 whole-image
    pass, 2 cut by an inner window edge. Detections are taken greedily by (rank, -score):

    * rank 0/1: a duplicate (mask IoU > ``iou_thr`` with a kept one of its class) is dropped;
    * rank 2: dropped when at least ``contain_thr`` of its mask lies in a kept whole (rank 0/1)
      instance of its class; merged into a kept cut instance of its class from another window
      whose mask agrees with it inside the two windows' overlap (IoU there >= ``contain_thr``);
      dropped as a duplicate as above; else kept.

    Returns the merged prediction (masks unioned, boxes their union, score the best) and its rank.
    Mask statistics are computed only for pairs of one class whose masks' boxes intersect.
    """
    n = len(pred["scores"])
    masks: CropMasks = pred["masks"]
    areas = masks.areas().tolist()
    boxes = pred["boxes"].float()
    # Where each detection can be: its box and its mask's region (an empty mask has only its box).
    reach = torch.where((masks.regions[:, 2:] > masks.regions[:, :2]).all(1, keepdim=True),
                        torch.cat([torch.minimum(boxes[:, :2], masks.regions[:, :2].float()),
                                   torch.maximum(boxes[:, 2:], masks.regions[:, 2:].float())], 1), boxes)
    pairs = _touching_pairs(reach, pred["labels"], windows)  # (K, 2), i < j
    inter = masks.intersections(pairs[:, 0], masks, pairs[:, 1]).tolist() if len(pairs) else []
    stats: dict[int, list[tuple[int, int]]] = {i: [] for i in range(n)}  # i -> [(j, mask intersection)]
    for (i, j), s in zip(pairs.tolist(), inter):
        stats[i].append((j, s))
        stats[j].append((i, s))
    ranks, scores = rank.tolist(), pred["scores"].tolist()
    wins = [tuple(w) for w in windows.tolist()]
    order = sorted(range(n), key=lambda i: (ranks[i], -scores[i]))
    group_of: dict[int, int] = {}  # detection -> index of its group in ``groups``
    groups: list[list[int]] = []
    for c in order:
        kept = [(group_of[j], j, s) for j, s in stats[c] if j in group_of]
        if ranks[c] == 2:
            if areas[c] == 0:  # a sliver at the window edge whose mask vanished: judge by its box
                if any(_box_inside(boxes[c], boxes[j]) >= contain_thr for _, j, _ in kept):
                    continue
            elif any(ranks[j] < 2 and s >= contain_thr * areas[c] for _, j, s in kept):
                continue  # a window holds it whole
            partner = next((g for g, j, _ in kept if ranks[j] == 2 and wins[j] != wins[c]
                            and _overlap_iou(masks, c, j, wins) >= contain_thr), None)
            if partner is not None:
                group_of[c] = partner
                groups[partner].append(c)
                continue
        if any(s / max(areas[c] + areas[j] - s, 1) > iou_thr for _, j, s in kept):
            continue  # a duplicate from an overlap
        group_of[c] = len(groups)
        groups.append([c])
    return _union(pred, groups, rank)


def _box_inside(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of box a (4,) xyxy inside box b."""
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    area = ((a[2] - a[0]) * (a[3] - a[1])).clamp(min=1e-6)
    return float(w * h / area)


def _touching_pairs(reach: torch.Tensor, labels: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(K, 2) int64 pairs i < j of one class, from two different windows, whose ``reach`` boxes
    (N, 4) xyxy intersect.

    Within a window NMS has already run, so only detections of two overlapping windows that both
    reach into the windows' overlap can be the same object: the pairs are found window pair by
    window pair, on small matrices, never on an N x N one.
    """
    rects, which = torch.unique(windows, dim=0, return_inverse=True)  # (U, 4), (N,)
    members = [(which == u).nonzero().flatten() for u in range(len(rects))]
    out = []
    for a in range(len(rects)):
        for b in range(a + 1, len(rects)):
            band = torch.cat([torch.maximum(rects[a, :2], rects[b, :2]), torch.minimum(rects[a, 2:], rects[b, 2:])])
            if (band[2:] <= band[:2]).any():
                continue  # the windows do not overlap
            ia, ib = _reaching(members[a], reach, band), _reaching(members[b], reach, band)
            if not len(ia) or not len(ib):
                continue
            ra, rb = reach[ia], reach[ib]
            ix = torch.minimum(ra[:, None, 2], rb[None, :, 2]) > torch.maximum(ra[:, None, 0], rb[None, :, 0])
            iy = torch.minimum(ra[:, None, 3], rb[None, :, 3]) > torch.maximum(ra[:, None, 1], rb[None, :, 1])
            hit = (ix & iy & (labels[ia][:, None] == labels[ib][None, :])).nonzero()
            out.append(torch.stack([ia[hit[:, 0]], ib[hit[:, 1]]], 1))
    if not out:
        return torch.zeros(0, 2, dtype=torch.int64)
    pairs = torch.cat(out)
    return torch.stack([pairs.amin(1), pairs.amax(1)], 1)


def _reaching(idx: torch.Tensor, reach: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """The detections of ``idx`` whose reach box intersects ``band`` (4,) xyxy."""
    r = reach[idx]
    inside = (r[:, 2] > band[0]) & (r[:, 0] < band[2]) & (r[:, 3] > band[1]) & (r[:, 1] < band[3])
    return idx[inside]


def _overlap_iou(masks: CropMasks, i: int, j: int, windows: Sequence[tuple[int, int, int, int]]) -> float:
    """Mask IoU of detections i and j restricted to the overlap of their windows (x0, y0, x1, y1)."""
    wi, wj = windows[i], windows[j]
    band = (max(wi[0], wj[0]), max(wi[1], wj[1]), min(wi[2], wj[2]), min(wi[3], wj[3]))
    if band[2] <= band[0] or band[3] <= band[1]:
        return 0.0
    a, b = _window_view(masks, i, band), _window_view(masks, j, band)
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _window_view(masks: CropMasks, k: int, band: tuple[int, int, int, int]) -> torch.Tensor:
    """Mask k inside ``band`` (x0, y0, x1, y1), as a bool tensor of the band's size."""
    x0, y0, x1, y1 = band
    out = torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
    rx0, ry0, rx1, ry1 = masks.regions[k].tolist()
    ax0, ay0, ax1, ay1 = max(x0, rx0), max(y0, ry0), min(x1, rx1), min(y1, ry1)
    if ax1 > ax0 and ay1 > ay0:
        out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = masks.crops[k][ay0 - ry0:ay1 - ry0, ax0 - rx0:ax1 - rx0].cpu()
    return out


def _union(pred: dict, groups: list[list[int]], rank: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One instance per group: union of masks and boxes, best score, the group's label and best rank."""
    masks: CropMasks = pred["masks"]
    n = len(groups)
    first = torch.tensor([g[0] for g in groups], dtype=torch.int64)  # (G,) the group's leader
    member = torch.tensor([k for g in groups for k in g], dtype=torch.int64)  # (M,)
    group = torch.repeat_interleave(torch.arange(n), torch.tensor([len(g) for g in groups], dtype=torch.int64))
    b = pred["boxes"][member]
    boxes = torch.cat([torch.full((n, 2), math.inf).scatter_reduce(0, group[:, None].expand(-1, 2), b[:, :2], "amin"),
                       torch.full((n, 2), -math.inf).scatter_reduce(0, group[:, None].expand(-1, 2), b[:, 2:], "amax")],
                      1).to(pred["boxes"].dtype)
    scores = pred["scores"].new_full((n,), -math.inf).scatter_reduce(0, group, pred["scores"][member], "amax")
    ranks = rank.new_full((n,), 3).scatter_reduce(0, group, rank[member], "amin")
    crops, regions = [masks.crops[k] for k in first.tolist()], masks.regions[first].clone()
    for i, g in enumerate(groups):
        if len(g) == 1:
            continue
        r = masks.regions[torch.tensor(g)]
        r = r[(r[:, 2:] > r[:, :2]).all(1)]  # empty parts add nothing (and have no place)
        if not len(r):
            continue
        region = (int(r[:, 0].min()), int(r[:, 1].min()), int(r[:, 2].max()), int(r[:, 3].max()))
        crops[i] = _window_view(masks, g[0], region)
        for k in g[1:]:
            crops[i] |= _window_view(masks, k, region)
        regions[i] = torch.tensor(region)
    merged = {"boxes": boxes, "scores": scores, "labels": pred["labels"][first],
              "masks": CropMasks(crops, regions, masks.size, is_tight=masks.is_tight)}
    return merged, ranks
