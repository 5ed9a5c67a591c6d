"""Instance masks of a large image kept compact: each mask as a bool crop inside its own box.

A dense (N, H, W) stack of a 4096 x 4096 sheet with 2,000 sprites is 32 GB; the same masks as crops
cost their boxes' areas. :class:`CropMasks` is what the postprocess pastes into (``mask_format=
"crops"``), what tiled prediction shifts and merges, and what the results writer encodes as COCO
RLE and cuts sprites out of, without ever allocating the image-sized stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch


class CropMasks:
    """N bool masks of an (H, W) frame, mask k being ``crops[k]`` at ``regions[k]`` and False elsewhere.

    Args:
        crops: N bool tensors, crop k of shape (y1 - y0, x1 - x0) of ``regions[k]``.
        regions: (N, 4) int64 (x0, y0, x1, y1), end-exclusive, inside the frame.
        size: (H, W) of the frame.
        is_tight: the caller's promise that every crop is its mask's tight box (an empty mask a
            0 x 0 crop at region (0, 0, 0, 0)), as :meth:`tight` makes them; then :meth:`boxes`
            is the regions, with no pass over the pixels.
    """

    def __init__(self, crops: Sequence[torch.Tensor], regions: torch.Tensor, size: tuple[int, int],
                 is_tight: bool = False):
        self.crops = list(crops)
        self.regions = regions.reshape(-1, 4).to(torch.int64)
        self.size = (int(size[0]), int(size[1]))
        self.is_tight = is_tight
        if len(self.crops) != len(self.regions):
            raise ValueError(f"{len(self.crops)} crops but {len(self.regions)} regions")

    # ------------------------------------------------------------------------------ containers
    @classmethod
    def from_dense(cls, masks: torch.Tensor) -> CropMasks:
        """(N, H, W) bool -> CropMasks, each crop its mask's tight box."""
        n, h, w = masks.shape
        return cls(list(masks), torch.tensor([[0, 0, w, h]] * n, dtype=torch.int64).reshape(n, 4), (h, w)).tight()

    @classmethod
    def cat(cls, items: Sequence[CropMasks], size: tuple[int, int] | None = None) -> CropMasks:
        """Concatenate masks of one frame (``size``: the frame when ``items`` is empty)."""
        if not items:
            if size is None:
                raise ValueError("CropMasks.cat of nothing needs the frame size")
            return cls([], torch.zeros(0, 4, dtype=torch.int64), size)
        frames = {m.size for m in items}
        if len(frames) != 1:
            raise ValueError(f"cannot concatenate masks of different frames {sorted(frames)}")
        return cls([c for m in items for c in m.crops], torch.cat([m.regions.cpu() for m in items]), items[0].size,
                   is_tight=all(m.is_tight for m in items))

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), *self.size)

    def __repr__(self) -> str:
        return f"CropMasks({len(self)} masks of {self.size[0]}x{self.size[1]}, {int(self.areas().sum())} pixels set)"

    def __getitem__(self, index) -> CropMasks:
        """Index with an int tensor, a bool tensor, a list of ints or a slice; returns CropMasks."""
        if isinstance(index, slice):
            idx = list(range(len(self)))[index]
        else:
            idx = torch.as_tensor(index)
            idx = idx.nonzero().flatten().tolist() if idx.dtype == torch.bool else idx.flatten().tolist()
        return CropMasks([self.crops[i] for i in idx], self.regions[idx] if idx else self.regions[:0], self.size,
                         is_tight=self.is_tight)

    def to(self, device) -> CropMasks:
        return CropMasks([c.to(device) for c in self.crops], self.regions, self.size, is_tight=self.is_tight)

    def cpu(self) -> CropMasks:
        return self.to("cpu")

    # ---------------------------------------------------------------------------- measurements
    def areas(self) -> torch.Tensor:
        """(N,) int64 pixels set per mask."""
        return torch.tensor([np.count_nonzero(c) for c in self._numpy()], dtype=torch.int64)

    def boxes(self) -> torch.Tensor:
        """(N, 4) int64 tight boxes (x0, y0, x1, y1), end-exclusive; (0, 0, 0, 0) for an empty mask."""
        return self.regions.clone() if self.is_tight else self.tight().regions

    def tight(self) -> CropMasks:
        """The same masks with every crop shrunk to its mask's tight box (empty masks: a 0 x 0 crop)."""
        if self.is_tight:
            return self
        crops, regions = [], [(0, 0, 0, 0)] * len(self)
        for k, (crop, (x0, y0, _, _)) in enumerate(zip(self.crops, self.regions.tolist())):
            box = tight_box(crop)
            if box is None:
                crops.append(crop[:0, :0])
                continue
            bx0, by0, bx1, by1 = box
            crops.append(crop[by0:by1, bx0:bx1])
            regions[k] = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
        return CropMasks(crops, torch.tensor(regions, dtype=torch.int64).reshape(-1, 4), self.size, is_tight=True)

    def intersections(self, i: torch.Tensor, other: CropMasks, j: torch.Tensor) -> torch.Tensor:
        """(K,) int64 pixels shared by ``self[i[k]]`` and ``other[j[k]]`` (same frame), pair by pair.

        Only the overlap of the two regions is read, so the cost is that of the overlaps. Pairs are
        ragged rectangles, so this is a loop over pairs, in numpy (CPU crops; a few microseconds
        a pair, where small torch ops cost ten times that).
        """
        out = np.zeros(len(i), dtype=np.int64)
        ra, rb = self.regions[i].tolist(), other.regions[j].tolist()
        ca, cb = self._numpy(), other._numpy()
        for k, (a, b, (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1)) in enumerate(zip(i.tolist(), j.tolist(), ra, rb)):
            x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
            if x1 > x0 and y1 > y0:
                pa = ca[a][y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
                pb = cb[b][y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
                out[k] = np.count_nonzero(pa & pb)
        return torch.from_numpy(out)

    def _numpy(self) -> list[np.ndarray]:
        """The crops as numpy arrays (views of CPU tensors)."""
        return [c.cpu().numpy() for c in self.crops]

    # -------------------------------------------------------------------------------- frames
    def shift(self, dx: int, dy: int, size: tuple[int, int]) -> CropMasks:
        """Move the masks by (dx, dy) into a frame of ``size`` (h, w); what falls outside is cut off."""
        h, w = int(size[0]), int(size[1])
        crops, regions = [], []
        for crop, (x0, y0, x1, y1) in zip(self.crops, self.regions.tolist()):
            nx0, ny0 = min(max(x0 + dx, 0), w), min(max(y0 + dy, 0), h)
            nx1, ny1 = max(min(x1 + dx, w), nx0), max(min(y1 + dy, h), ny0)
            crops.append(crop[ny0 - (y0 + dy):ny1 - (y0 + dy), nx0 - (x0 + dx):nx1 - (x0 + dx)])
            regions.append((nx0, ny0, nx1, ny1))
        return CropMasks(crops, torch.tensor(regions, dtype=torch.int64).reshape(-1, 4), (h, w))

    def to_dense(self) -> torch.Tensor:
        """(N, H, W) bool. Allocates the full stack: for small frames and tests."""
        device = self.crops[0].device if self.crops else "cpu"
        out = torch.zeros((len(self), *self.size), dtype=torch.bool, device=device)
        for k, (crop, (x0, y0, x1, y1)) in enumerate(zip(self.crops, self.regions.tolist())):
            out[k, y0:y1, x0:x1] = crop
        return out

    def mask(self, k: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Instance k as (bool crop (h, w) numpy, (x0, y0, x1, y1) region)."""
        x0, y0, x1, y1 = self.regions[k].tolist()
        return self.crops[k].cpu().numpy(), (x0, y0, x1, y1)

    def to_rle(self) -> list[dict]:
        """COCO compressed RLE per mask (``size`` [H, W], ``counts`` bytes), encoded from the crops.

        COCO RLE runs over the frame in column-major order. Inside a crop's columns the runs are
        those of the crop padded with a False row above and below; the False gaps between columns
        are the frame outside the crop. So a run boundary at padded row r of crop column c lies at
        frame index (x0 + c) * H + y0 + r - 1, and no frame-sized array is needed.
        """
        H, W = self.size
        out = []
        for crop, (x0, y0, x1, y1) in zip(self.crops, self.regions.tolist()):
            c = crop.cpu().numpy()
            h, w = c.shape
            if h == 0 or w == 0 or not c.any():
                counts = [H * W]
            else:
                padded = np.zeros((h + 2, w), dtype=np.int8)
                padded[1:-1] = c
                flat = padded.ravel(order="F")
                change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # padded positions starting a new run
                col, row = np.divmod(change, h + 2)
                bounds = (x0 + col) * H + y0 + row - 1  # frame indices starting a new run
                # A crop as tall as the frame: a run ending at a column's bottom and one starting at the
                # next column's top meet at the same index and are one run; drop both boundaries.
                dup = np.zeros(len(bounds), dtype=bool)
                same = bounds[1:] == bounds[:-1]
                dup[1:] |= same
                dup[:-1] |= same
                bounds = bounds[~dup & (bounds < H * W)]  # a run reaching the frame's last pixel ends there
                counts = np.diff(np.concatenate([[0], bounds, [H * W]])).tolist()
            out.append(mask_util.frPyObjects({"counts": counts, "size": [H, W]}, H, W))
        return out


def tight_box(mask) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1), end-exclusive, of a (h, w) bool mask (numpy or tensor); None when empty."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.size == 0:
        return None
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1

