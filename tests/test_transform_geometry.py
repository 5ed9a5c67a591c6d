"""Geometry and random draws of the training augmentations, observed from their outputs.

Tiles carry their own coordinates in their pixels (R = 4 x, G = 4 y, B = 40 x tile id), so where a
pixel of the output came from can be read off it: Mosaic's centre and quadrants, MixUp's crop
offset and flip. RandomResize's ratio and the HSV gains are read back from the output sizes and
colours; their distributions are checked against the documented ones over many draws (bounds
of about 5 standard errors, fixed seeds).
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from datamodules import InstanceMasks
from datamodules.transforms import CachedMixUp, CachedMosaic, RandomResize, YOLOXHSVRandomAug, hsv_shift

S = 64
PAD = 114


def coded_tile(tile_id: int, h: int, w: int, block: tuple[int, int, int, int] | None = None) -> dict:
    """A sample whose pixel (x, y) is (4x, 4y, 40 id); one instance: ``block`` (x0, y0, x1, y1) or
    the whole tile, labelled ``tile_id``."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([4 * xx, 4 * yy, np.full_like(xx, 40 * tile_id)], -1).astype(np.uint8)
    mask = np.zeros((1, h, w), bool)
    x0, y0, x1, y1 = block or (0, 0, w, h)
    mask[0, y0:y1, x0:x1] = True
    masks = InstanceMasks.from_array(mask)
    return {"image": image, "boxes": masks.boxes(), "labels": np.array([tile_id], np.int64), "masks": masks,
            "ignore_boxes": np.zeros((0, 4), np.float32), "image_id": tile_id, "orig_size": (h, w),
            "scale_factor": (1.0, 1.0)}


def empty_sample(h: int, w: int) -> dict:
    return {"image": np.zeros((h, w, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros(0, np.int64), "masks": InstanceMasks.empty(h, w),
            "ignore_boxes": np.zeros((0, 4), np.float32), "image_id": 0, "orig_size": (h, w), "scale_factor": (1.0, 1.0)}


def assert_uniform_integers(values, lo: int, hi: int) -> None:
    """``values`` look like uniform integers on [lo, hi]: within the bounds, reaching both ends, mean
    and median fraction within 5 standard errors."""
    v = np.asarray(values, np.float64)
    n, width = len(v), hi - lo + 1
    assert v.min() >= lo and v.max() <= hi
    assert v.min() <= lo + 0.05 * width and v.max() >= hi - 0.05 * width
    sd = np.sqrt((width**2 - 1) / 12)
    assert abs(v.mean() - (lo + hi) / 2) < 5 * sd / np.sqrt(n), v.mean()
    assert abs((v < (lo + hi) / 2).mean() - 0.5 + 0.5 * (width % 2) / width) < 5 * 0.5 / np.sqrt(n)


# ---------------------------------------------------------------------------------------- Mosaic
TILE_SIZES = {2: (32, 64), 3: (64, 48), 4: (64, 20), 5: (50, 64), 6: (64, 40)}  # (h, w); max side S: not resized


def test_mosaic_centre_and_quadrants():
    """The current sample is the top-left tile, its bottom-right corner at the centre (cx, cy) with
    cx, cy = int(U(0.5, 1.5) S); three cached tiles fill top-right (bottom-left corner at the centre),
    bottom-left (top-right corner there) and bottom-right (top-left corner there) of a (2S, 2S)
    canvas of 114; each instance's box is its tile's visible part."""
    rng = np.random.default_rng(0)
    t = CachedMosaic(S, max_cached=8, random_pop=True)
    for k, (h, w) in TILE_SIZES.items():
        t(coded_tile(k, h, w), rng)
    centres = []
    for step in range(500):
        k = 2 + step % 5
        t(coded_tile(k, *TILE_SIZES[k]), rng)  # keeps differently sized tiles in the cache
        out = t(coded_tile(1, S, S), rng)  # the current sample: id 1, S x S
        canvas = out["image"].astype(int)
        assert canvas.shape == (2 * S, 2 * S, 3)
        # (31, 31) lies in the top-left tile for every centre in [S/2, 3S/2): its code gives the centre
        cx, cy = 31 + S - canvas[31, 31, 0] // 4, 31 + S - canvas[31, 31, 1] // 4
        assert canvas[31, 31, 2] == 40
        centres.append((cx, cy))
        # the ids of the other quadrants, read at their corner pixel at the centre
        ids = [1, canvas[cy - 1, cx, 2] // 40, canvas[cy, cx - 1, 2] // 40, canvas[cy, cx, 2] // 40]
        sizes = [(S, S)] + [TILE_SIZES.get(i, (S, S)) for i in ids[1:]]
        expected = np.full((2 * S, 2 * S, 3), PAD)
        boxes = []
        for q, (tile_id, (h, w)) in enumerate(zip(ids, sizes)):
            x0 = cx - w if q in (0, 2) else cx  # the tile's top-left corner on the canvas
            y0 = cy - h if q in (0, 1) else cy
            X0, Y0, X1, Y1 = max(x0, 0), max(y0, 0), min(x0 + w, 2 * S), min(y0 + h, 2 * S)
            yy, xx = np.mgrid[Y0:Y1, X0:X1]
            expected[Y0:Y1, X0:X1] = np.stack([4 * (xx - x0), 4 * (yy - y0), np.full_like(xx, 40 * tile_id)], -1)
            boxes.append([X0, Y0, X1, Y1])
        np.testing.assert_array_equal(canvas, expected)
        np.testing.assert_array_equal(out["labels"], ids)
        np.testing.assert_array_equal(out["boxes"], np.array(boxes, np.float32))
    cx, cy = np.array(centres).T
    assert_uniform_integers(cx, S // 2, 3 * S // 2 - 1)
    assert_uniform_integers(cy, S // 2, 3 * S // 2 - 1)
    assert abs(np.corrcoef(cx, cy)[0, 1]) < 5 / np.sqrt(len(cx))  # drawn independently


# ----------------------------------------------------------------------------------------- MixUp

def test_mixup_placement_and_flip():
    """The partner (S x S) is flipped with p 0.5 and cropped at a uniform offset to the current
    (smaller) sample's size; the images are averaged; the partner's instance moves with its pixels."""
    rng = np.random.default_rng(1)
    th, tw = 40, 48  # the current sample: smaller than S, black, no instance
    block = (8, 4, 24, 20)  # the partner's instance, x0, y0, x1, y1
    flips, offsets = [], []
    for _ in range(400):
        t = CachedMixUp(S, max_cached=2, prob=1.0)
        partner = coded_tile(5, S, S, block)
        t(partner, rng)
        out = t(empty_sample(th, tw), rng)
        img = out["image"].astype(int)
        flip = img[0, 1, 0] < img[0, 0, 0]  # the x code runs backwards
        px, oy = img[0, 0, 0] // 2, img[0, 0, 1] // 2  # (black + 4x) >> 1 = 2x: the partner's pixel at (0, 0)
        ox = (S - 1 - px) if flip else px
        flips.append(flip), offsets.append((ox, oy))
        yy, xx = np.mgrid[0:th, 0:tw]
        sx = S - 1 - (xx + ox) if flip else xx + ox  # partner column of each output pixel
        expected = np.stack([4 * sx, 4 * (yy + oy), np.full_like(xx, 200)], -1) >> 1
        np.testing.assert_array_equal(img, expected)
        x0, y0, x1, y1 = block
        if flip:
            x0, x1 = S - x1, S - x0
        box = np.clip([x0 - ox, y0 - oy, x1 - ox, y1 - oy], 0, [tw, th, tw, th])
        if box[2] > box[0] and box[3] > box[1]:
            np.testing.assert_array_equal(out["labels"], [5])
            np.testing.assert_array_equal(out["boxes"], np.array([box], np.float32))
        else:
            assert len(out["labels"]) == 0  # cropped away
    assert abs(np.mean(flips) - 0.5) < 5 * 0.5 / np.sqrt(len(flips))
    ox, oy = np.array(offsets).T
    assert_uniform_integers(ox, 0, S - tw)
    assert_uniform_integers(oy, 0, S - th)


# ---------------------------------------------------------------------------------- RandomResize

def test_random_resize_ratio_range_and_aspect():
    """The long side becomes int(scale x r), r ~ U(ratio_range); the aspect ratio is kept (rounded)."""
    rng = np.random.default_rng(2)
    t = RandomResize(S, (0.5, 2.0))
    longs = []
    for _ in range(2000):
        out = t(coded_tile(1, 20, 40), rng)
        h, w = out["image"].shape[:2]
        assert h == int(w / 2 + 0.5)  # 20 x 40 keeps 1 : 2
        np.testing.assert_array_equal(out["boxes"], [[0, 0, w, h]])  # the whole-tile instance follows
        longs.append(w)
    assert_uniform_integers(longs, S // 2, 2 * S - 1)  # int(64 r) for r in [0.5, 2.0)
    assert len(set(longs)) == 2 * S - S // 2  # every size is reached


# -------------------------------------------------------------------------------------- HSV gains
# Pixels from which the gains are read back: grey (V), green (H) and reds of saturation ~0.5 at many
# values (S: one saturation unit moves a channel by under one level, so many are fitted together).
REDS = np.arange(120, 227)  # values of both parities and scattered saturations near 0.5: their roundings
RED_MIN = (REDS * np.random.default_rng(0).uniform(0.42, 0.58, len(REDS))).astype(int)  # do not lean one way
PROBE = np.array([[[100, 100, 100], [100, 200, 100]] + [[v, m, m] for v, m in zip(REDS, RED_MIN)]], np.uint8)
RED_SATURATION = (REDS - RED_MIN) / REDS


def hue_deg(rgb) -> float:
    return 360 * colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255))[0]


def read_gains(after: np.ndarray) -> tuple[int, int, int]:
    """(dh, ds, dv) of an HSV shift of PROBE, in OpenCV's 8-bit units (hue 0..180: 2 degrees a unit)."""
    px = after[0].astype(float)
    dv = int(px[0].max()) - 100  # grey's value moves by dv whatever hue and saturation do
    dh = round((hue_deg(px[1]) - hue_deg(PROBE[0, 1])) / 2)
    top, chroma = px[2:].max(1), px[2:].max(1) - px[2:].min(1)
    shift = (top * (chroma - RED_SATURATION * top)).sum() / (top * top).sum()  # least squares: chroma = (s + ds) v
    return dh, round(shift * 255), dv


def test_hsv_gains_are_read_back_exactly():
    """The reading below is exact over the whole range of gains."""
    for dh in (-4, 0, 3):
        for dv in (-29, -1, 0, 17, 29):
            for ds in range(-29, 30):
                assert read_gains(hsv_shift(PROBE, dh, ds, dv)) == (dh, ds, dv)


@pytest.fixture(scope="module")
def hsv_gains() -> np.ndarray:
    """(N, 3) gains (dh, ds, dv) of N draws of YOLOXHSVRandomAug."""
    rng = np.random.default_rng(3)
    t = YOLOXHSVRandomAug()
    return np.array([read_gains(t({"image": PROBE}, rng)["image"]) for _ in range(2000)])


@pytest.mark.parametrize("channel, delta", [(0, 5), (1, 30), (2, 30)], ids=["hue", "saturation", "value"])
def test_hsv_gains_distribution(hsv_gains, channel, delta):
    """Each gain is U(-1, 1) x delta, zeroed with p 0.5, truncated: 0 with p 1/2 + 1/(2 delta), any
    other integer k with 0 < |k| < delta with p 1/(4 delta); the three drawn independently."""
    g = hsv_gains[:, channel]
    n = len(g)
    assert set(range(-delta + 1, delta)) == set(g.tolist())  # every value, nothing beyond
    p0 = 0.5 + 0.5 / delta
    assert abs((g == 0).mean() - p0) < 5 * np.sqrt(p0 * (1 - p0) / n)
    assert abs((g > 0).mean() - (g < 0).mean()) < 5 * np.sqrt((1 - p0) / n)  # symmetric
    assert_uniform_integers(np.abs(g[g != 0]), 1, delta - 1)
    other = hsv_gains[:, (channel + 1) % 3] == 0
    both = ((g == 0) & other).mean()
    assert abs(both - (g == 0).mean() * other.mean()) < 5 * np.sqrt(0.25 / n)  # independent zeroing
