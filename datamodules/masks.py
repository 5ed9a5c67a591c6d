"""Instance masks as tight crops (:class:`InstanceMasks`) and fast COCO RLE / polygon decoding.

Masks are stored as the crop of each instance's box plus its offset, so crops, flips, resizes and
translations only touch the pixels of each instance, and a sprite sheet with hundreds of small
instances costs memory in proportion to their area, not N x H x W. :func:`decode_masks` decodes
polygons and RLE (compressed or not) straight into such crops, identical to pycocotools' ``annToMask``.
:func:`clip_polygon` cuts a polygon to a rectangle (for vertices too far away for pycocotools).
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

from rtmdet.crop_masks import tight_box

from .errors import DatasetError


def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output pixels, nearest-neighbour with pixel centres."""
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64), src - 1)


def _tight(crop: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, int, int]:
    """Shrink a crop to the bounding box of its True pixels (an empty mask -> (0, 0) at 0, 0)."""
    box = tight_box(crop)
    if box is None:
        return np.zeros((0, 0), bool), 0, 0
    bx0, by0, bx1, by1 = box
    if (bx1 - bx0, by1 - by0) == (crop.shape[1], crop.shape[0]):
        return crop, x0, y0
    return crop[by0:by1, bx0:bx1], x0 + bx0, y0 + by0


class InstanceMasks:
    """An (N, H, W) bool mask stack stored as tight crops: ``crops[i]`` is at ``offsets[i]`` = (x0, y0).

    Crops lie inside the H x W frame; an empty mask is a (0, 0) crop at (0, 0). Geometric operations
    return new objects and only touch the pixels of each instance's box. ``np.asarray(masks)`` or
    :meth:`to_array` gives the dense (N, H, W) bool array; indexing with int / bool arrays or slices
    selects instances.
    """

    def __init__(self, crops: list[np.ndarray], offsets, height: int, width: int):
        self.crops = list(crops)
        self.offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
        self.height, self.width = int(height), int(width)

    @classmethod
    def empty(cls, height: int, width: int) -> "InstanceMasks":
        return cls([], np.zeros((0, 2)), height, width)

    @classmethod
    def from_array(cls, masks: np.ndarray) -> "InstanceMasks":
        """From a dense (N, H, W) bool array."""
        masks = np.asarray(masks, bool)
        crops, offsets = [], []
        for m in masks:
            c, x, y = _tight(m, 0, 0)
            crops.append(c.copy()), offsets.append((x, y))
        return cls(crops, offsets, *masks.shape[1:])

    @classmethod
    def concat(cls, items: list["InstanceMasks"]) -> "InstanceMasks":
        if len({(m.height, m.width) for m in items}) != 1:
            raise ValueError("InstanceMasks.concat needs masks of one frame size")
        return cls([c for m in items for c in m.crops], np.concatenate([m.offsets for m in items]),
                   items[0].height, items[0].width)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.crops), self.height, self.width

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index) -> "InstanceMasks":
        idx = np.arange(len(self))[index].reshape(-1)
        return InstanceMasks([self.crops[i] for i in idx], self.offsets[idx], self.height, self.width)

    def __repr__(self) -> str:
        return f"InstanceMasks(n={len(self)}, height={self.height}, width={self.width})"

    def sizes(self) -> np.ndarray:
        """(N, 2) int64 crop (h, w)."""
        return np.array([c.shape for c in self.crops], np.int64).reshape(-1, 2)

    def areas(self) -> np.ndarray:
        return np.array([np.count_nonzero(c) for c in self.crops], np.int64)

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 xyxy mask extents (x2, y2 exclusive); zeros for empty masks."""
        hw = self.sizes()
        xy = np.where(hw.min(1, keepdims=True) > 0, self.offsets, 0)
        return np.concatenate([xy, xy + hw[:, ::-1]], 1).astype(np.float32).reshape(-1, 4)

    def to_array(self, out: np.ndarray | None = None, out_is_zero: bool = False) -> np.ndarray:
        """Dense (N, H, W) bool masks; ``out``: an existing array to fill (zeroed first unless
        ``out_is_zero``)."""
        if out is None:
            out = np.zeros(self.shape, bool)
        elif not out_is_zero:
            out[...] = False
        for i, (c, (x, y)) in enumerate(zip(self.crops, self.offsets)):
            out[i, y:y + c.shape[0], x:x + c.shape[1]] = c
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.to_array()
        return a if dtype is None else a.astype(dtype)

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense (N, H, W) bool tensor on ``device``; off the CPU only the crops travel there."""
        device = torch.device(device or "cpu")
        return torch.from_numpy(self.to_array()) if device.type == "cpu" else self.paste_on(device)

    def paste_on(self, device: torch.device) -> torch.Tensor:
        """Dense (N, H, W) bool tensor built on ``device``: one copy of all crops, then N pastes there."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=device)
        if len(self):
            flat = torch.from_numpy(np.concatenate([c.ravel() for c in self.crops])).to(device, non_blocking=True)
            start = 0
            for i, (c, (x, y)) in enumerate(zip(self.crops, self.offsets)):
                out[i, y:y + c.shape[0], x:x + c.shape[1]] = flat[start:start + c.size].view(c.shape)
                start += c.size
        return out

    def translate(self, dx: int, dy: int, height: int, width: int) -> "InstanceMasks":
        """Move by (dx, dy) into a height x width frame; parts outside it are cut (crops re-tightened)."""
        hw = self.sizes()
        x0, y0 = self.offsets[:, 0] + dx, self.offsets[:, 1] + dy
        x1, y1 = x0 + hw[:, 1], y0 + hw[:, 0]
        cx0, cx1 = np.clip(x0, 0, width), np.clip(x1, 0, width)
        cy0, cy1 = np.clip(y0, 0, height), np.clip(y1, 0, height)
        crops, offsets = list(self.crops), np.stack([x0, y0], 1)
        for i in np.flatnonzero((cx0 != x0) | (cx1 != x1) | (cy0 != y0) | (cy1 != y1) | (hw.min(1) == 0)):
            c = self.crops[i][cy0[i] - y0[i]:max(cy1[i] - y0[i], 0), cx0[i] - x0[i]:max(cx1[i] - x0[i], 0)]
            crops[i], x, y = _tight(c, cx0[i], cy0[i])
            offsets[i] = (x, y)
        return InstanceMasks(crops, offsets, height, width)

    def resize(self, height: int, width: int, window: tuple[int, int, int, int] | None = None) -> "InstanceMasks":
        """Nearest-neighbour resize of the frame to height x width (pixel centres, as the images).

        ``window`` = (x0, y0, w, h): compute only that part of the resized frame, which becomes the
        new frame; the same as ``resize(height, width).translate(-x0, -y0, h, w)``, without
        resampling pixels that fall outside.
        """
        wx, wy, ww, wh = window if window is not None else (0, 0, width, height)
        if (height, width, ww, wh) == (self.height, self.width, width, height) and wx == wy == 0:
            return self
        sy = nearest_index(self.height, height)[wy:wy + wh]  # source row of each window row
        sx = nearest_index(self.width, width)[wx:wx + ww]
        hw = self.sizes()
        x0, y0 = self.offsets[:, 0], self.offsets[:, 1]
        r0, r1 = np.searchsorted(sy, y0), np.searchsorted(sy, y0 + hw[:, 0])  # window rows of each crop
        c0, c1 = np.searchsorted(sx, x0), np.searchsorted(sx, x0 + hw[:, 1])
        # sampling may skip edge rows / cols of a crop, the window may cut it: re-tighten then
        tighten = height < self.height or width < self.width or window is not None
        crops, offsets = [], []
        empty = np.zeros((0, 0), bool)
        for i, c in enumerate(self.crops):
            if r1[i] <= r0[i] or c1[i] <= c0[i]:  # nothing of it in the (window of the) new frame
                crops.append(empty), offsets.append((0, 0))
                continue
            c = c[(sy[r0[i]:r1[i]] - y0[i])[:, None], sx[c0[i]:c1[i]] - x0[i]]
            c, x, y = _tight(c, c0[i], r0[i]) if tighten else (c, c0[i], r0[i])
            crops.append(c), offsets.append((x, y))
        return InstanceMasks(crops, offsets, wh, ww)

    def erase(self, covered: np.ndarray) -> "InstanceMasks":
        """The masks minus the pixels of ``covered`` ((H, W) bool, e.g. what was pasted over them);
        crops re-tightened, a mask covered entirely becomes empty."""
        crops, offsets = list(self.crops), self.offsets.copy()
        for i, (c, (x, y)) in enumerate(zip(self.crops, self.offsets)):
            hit = covered[y:y + c.shape[0], x:x + c.shape[1]]
            if c.size and (c & hit).any():
                crops[i], offsets[i, 0], offsets[i, 1] = _tight(c & ~hit, x, y)
        return InstanceMasks(crops, offsets, self.height, self.width)

    def flip(self) -> "InstanceMasks":
        """Left-right mirror in the frame."""
        hw = self.sizes()
        x0 = np.where(hw[:, 1] > 0, self.width - self.offsets[:, 0] - hw[:, 1], 0)
        crops = [np.ascontiguousarray(c[:, ::-1]) for c in self.crops]
        return InstanceMasks(crops, np.stack([x0, self.offsets[:, 1]], 1), self.height, self.width)


def _segmented_cumsum(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sum of x restarting at every position where ``starts`` is True."""
    cs = np.cumsum(x)
    first = np.flatnonzero(starts)
    return cs - (cs[first] - x[first])[np.cumsum(starts) - 1]


def _segments(lengths: np.ndarray) -> np.ndarray:
    """Position of every element inside its segment, for segments of the given lengths."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def rle_counts(strings: list) -> list[np.ndarray]:
    """Run lengths of compressed COCO RLE strings (str / bytes), all decoded in one vectorised pass.

    Each count is 5-bit chunks + 48 with 0x20 = "more chunks", the last chunk's 0x10 = negative;
    counts from the 4th on are deltas to the count two before (pycocotools ``rleFrString``).
    """
    strings = [s.encode() if isinstance(s, str) else bytes(s) for s in strings]
    if not strings:
        return []
    c = np.frombuffer(b"".join(strings), np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0  # last chunk of each number
    num = np.cumsum(last) - last  # number index of each chunk
    first = np.flatnonzero(np.r_[True, last[:-1]])
    shift = 5 * (np.arange(len(c)) - first[num])
    x = np.bincount(num, weights=(c & 0x1F) << shift, minlength=len(first)).astype(np.int64)
    neg = (c[last] & 0x10) != 0
    x[neg] -= np.left_shift(1, 5 * np.diff(np.r_[first, len(c)])[neg])
    char_lengths = np.array([len(s) for s in strings])
    lengths = np.bincount(np.repeat(np.arange(len(strings)), char_lengths)[first], minlength=len(strings))
    local = _segments(lengths)
    for parity, begin in ((1, 1), (0, 2)):  # odd and even positions are two chains of deltas
        idx = np.flatnonzero((local % 2 == parity) & (local >= begin))
        x[idx] = _segmented_cumsum(x[idx], local[idx] == begin)
    return np.split(x, np.cumsum(lengths)[:-1])


def crops_from_counts(counts: list[np.ndarray], height: int, width: int) -> InstanceMasks:
    """Column-major run lengths of N masks -> InstanceMasks, touching only each mask's columns.

    All masks at once: foreground runs are marked +1 / -1 in one buffer holding every mask's
    column-major crop (+1 spare element), and a single cumulative sum fills them.
    """
    n = len(counts)
    sums = np.array([x.sum() for x in counts], np.int64)
    if np.any(sums != height * width):
        bad = int(np.flatnonzero(sums != height * width)[0])
        raise DatasetError(f"RLE #{bad} counts sum to {sums[bad]}, expected {height}x{width}")
    empty = InstanceMasks([np.zeros((0, 0), bool)] * n, np.zeros((n, 2)), height, width)
    if not n:
        return empty
    lengths = np.array([len(x) for x in counts], np.int64)
    x, inst, local = np.concatenate(counts), np.repeat(np.arange(n), lengths), _segments(lengths)
    ends = _segmented_cumsum(x, local == 0)
    fg = (local % 2 == 1) & (x > 0)  # foreground runs [end - count, end) in column-major order
    e, s, inst = ends[fg], ends[fg] - x[fg], inst[fg]
    if not len(s):
        return empty
    touch = (s[1:] == e[:-1]) & (inst[1:] == inst[:-1])  # zero-length gaps: merge the runs
    s, e, inst = s[np.r_[True, ~touch]], e[np.r_[~touch, True]], inst[np.r_[True, ~touch]]
    ids, first = np.unique(inst, return_index=True)  # masks with pixels, index of their first run
    last = np.r_[first[1:], len(s)] - 1
    col0 = np.zeros(n, np.int64)
    ncols = np.zeros(n, np.int64)
    col0[ids] = s[first] // height
    ncols[ids] = (e[last] - 1) // height - col0[ids] + 1
    wraps = s // height != (e - 1) // height  # a run crossing columns spans every row
    row0, row1 = np.zeros(n, np.int64), np.zeros(n, np.int64)
    row0[ids] = np.minimum.reduceat(np.where(wraps, 0, s % height), first)
    row1[ids] = np.maximum.reduceat(np.where(wraps, height - 1, (e - 1) % height), first)
    rows = np.where(ncols > 0, row1 - row0 + 1, 0)  # crop height; the full height if a run wraps
    start = np.r_[0, np.cumsum(ncols * rows + 1)]  # each crop, column-major, in one buffer
    begin = start[inst] + (s // height - col0[inst]) * rows[inst] + s % height - row0[inst]
    end = begin + e - s
    touch = begin[1:] == end[:-1]  # runs of adjacent columns meet in the crop: merge them
    diff = np.zeros(start[-1], np.int8)
    diff[begin[np.r_[True, ~touch]]], diff[end[np.r_[~touch, True]]] = 1, -1
    buf = np.cumsum(diff, dtype=np.int8).view(bool)
    crops = list(empty.crops)
    for i in ids:
        crops[i] = np.ascontiguousarray(buf[start[i]:start[i + 1] - 1].reshape(ncols[i], rows[i]).T)
    return InstanceMasks(crops, np.stack([col0, row0], 1), height, width)


def decode_masks(segmentations, height: int, width: int) -> InstanceMasks:
    """Polygons (list of parts) / RLE dicts -> InstanceMasks, identical to pycocotools ``annToMask``."""
    compressed, kinds = [], []
    for seg in segmentations:
        if isinstance(seg, list):  # polygon parts, rasterised by pycocotools, united
            rles = mask_utils.frPyObjects(seg, height, width)
            compressed.append((mask_utils.merge(rles) if len(rles) > 1 else rles[0])["counts"])
            kinds.append(None)
        elif isinstance(seg["counts"], (list, tuple)):  # uncompressed RLE
            kinds.append(np.asarray(seg["counts"], np.int64))
        else:
            compressed.append(seg["counts"])
            kinds.append(None)
    parsed = iter(rle_counts(compressed))
    return crops_from_counts([next(parsed) if k is None else k for k in kinds], height, width)


def clip_polygon(coords, x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A polygon (flat list x1, y1, x2, y2, ...) intersected with the rectangle [x0, x1] x [y0, y1].

    Sutherland-Hodgman, one rectangle side at a time; the edges inside the rectangle are the
    original ones, so a rasteriser sees the same outline there. Returns [] when under 3 points remain.
    """
    pts = np.asarray(coords, np.float64).reshape(-1, 2)  # (P, 2) x, y
    for axis, bound, below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
        if len(pts) < 3:
            return []
        nxt = np.roll(pts, -1, 0)  # edge i runs pts[i] -> nxt[i]
        a, b = pts[:, axis], nxt[:, axis]
        in_a, in_b = (a <= bound, b <= bound) if below else (a >= bound, b >= bound)
        cross = in_a != in_b
        t = np.divide(bound - a, b - a, out=np.zeros_like(a), where=cross)
        hit = pts + t[:, None] * (nxt - pts)  # (P, 2) where edge i crosses the side
        hit[:, axis] = bound
        # each edge emits its start point if inside, then the crossing if it crosses: (2P, 2) in order
        cand = np.stack([pts, hit], 1).reshape(-1, 2)
        pts = cand[np.stack([in_a, cross], 1).reshape(-1)]
    return pts.ravel().tolist() if len(pts) >= 3 else []
