"""NumPy equivalents of the steps around an end-to-end export, for a runner without torch.

Each mirrors its torch original and is tested against it:

* :func:`read_image` = ``datamodules.load_image`` (EXIF orientation, transparency onto grey 114);
* :func:`letterbox` = ``rtmdet.preprocess.letterbox``: the same size rounding and the same resize
  as ``F.interpolate`` (bilinear, ``align_corners=False``, no antialiasing; or nearest-exact),
  computed in float32 with the same source indices and weights. Only float rounding can differ
  (the order of the multiply-adds), so a pixel can differ by 1 where the value sits at .5. Pillow's
  ``resize`` is not used: its bilinear filter widens its support when it shrinks an image
  (antialiasing), which changes every downscaled pixel, not only the rounding;
* :func:`resize_matrices` and :func:`paste_masks` = ``rtmdet.mask_paste``: stride-8 mask logits
  to boolean masks in original pixels (bilinear x8 to the input, then to ``ceil(input / scale)``,
  cropped), evaluated only over the rows/columns that can exceed the threshold;
* :func:`coco_entries` = ``rtmdet.inference.coco_results``, with :func:`rle_encode` writing
  pycocotools' compressed RLE (so pycocotools is not needed);
* :func:`cutout` = ``rtmdet.inference.cutout``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

PAD_VALUE = 114


class ImageReadError(ValueError):
    """An input image that cannot be read; the message names the file and the image id."""


# ------------------------------------------------------------------------------------- input

def read_image(path, image_id: int | None = None) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) RGB, EXIF orientation applied, transparency composited on 114."""
    try:
        with Image.open(path) as raw:
            raw.load()
            im = ImageOps.exif_transpose(raw)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                a = np.asarray(im, dtype=np.float64)
                a = a * (255 / 65535) if a.max() > 255 else a
                return np.repeat(np.clip(a + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (PAD_VALUE,) * 3 + (255,)), rgba)
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise ImageReadError(f"image {image_id}: file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageReadError(f"image {image_id}: cannot read {path}: {type(e).__name__}: {e}") from None


def letterbox_size(orig_h: int, orig_w: int, size: int) -> tuple[int, int]:
    """New (h, w) after a keep-ratio resize that fits in size x size (mmcv rescale_size rounding)."""
    scale = min(size / orig_h, size / orig_w)
    return int(orig_h * scale + 0.5), int(orig_w * scale + 0.5)


def _linear_taps(out_size: int, in_size: int):
    """Source indices i0, i1 (out,) and float32 weights w0, w1 of torch's bilinear resize, one axis."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0, 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def _nearest_exact_index(out_size: int, in_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64),
                      in_size - 1)


def resize(image: np.ndarray, new_h: int, new_w: int, nearest: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 -> (new_h, new_w, 3) uint8, as ``F.interpolate`` on the float image, rounded."""
    h, w = image.shape[:2]
    if nearest:
        return image[_nearest_exact_index(new_h, h)][:, _nearest_exact_index(new_w, w)]
    y0, y1, hy0, hy1 = _linear_taps(new_h, h)
    x0, x1, wx0, wx1 = _linear_taps(new_w, w)
    img = image.astype(np.float32)
    top, bottom = img[y0], img[y1]  # (new_h, W, 3)
    wx0, wx1 = wx0[None, :, None], wx1[None, :, None]
    # torch's order: h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11)
    out = (hy0[:, None, None] * (wx0 * top[:, x0] + wx1 * top[:, x1])
           + hy1[:, None, None] * (wx0 * bottom[:, x0] + wx1 * bottom[:, x1]))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def letterbox(image: np.ndarray, size: int, nearest: bool = False):
    """RGB uint8 (H, W, 3) -> padded (3, size, size) uint8 and (orig_size (h, w), scale_factor (w_scale, h_scale))."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w = letterbox_size(h, w, size)
    if (new_h, new_w) != (h, w):
        image = resize(image, new_h, new_w, nearest)
    out = np.full((3, size, size), PAD_VALUE, dtype=np.uint8)
    out[:, :new_h, :new_w] = image.transpose(2, 0, 1)
    return out, ((h, w), (new_w / w, new_h / h))


# ------------------------------------------------------------------------------------- masks

def _bilinear_taps(out_size: int, in_size: int, ratio: float):
    """Two taps per output position of a bilinear resize (align_corners=False), float64, one axis."""
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * ratio - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    return i0, i1, 1 - w1, w1


def bilinear_matrix(out_size: int, in_size: int, ratio: float) -> np.ndarray:
    """(out_size, in_size) float64 weights of a bilinear resize along one axis."""
    i0, i1, w0, w1 = _bilinear_taps(out_size, in_size, ratio)
    rows = np.arange(out_size)
    mat = np.zeros((out_size, in_size))
    np.add.at(mat, (rows, i0), w0)
    np.add.at(mat, (rows, i1), w1)
    return mat


def resize_matrices(feat_size: tuple[int, int], stride: int, input_size: tuple[int, int],
                    orig_size: tuple[int, int] | None = None, scale_factor: tuple[float, float] | None = None):
    """Row and column maps (Ho, h), (Wo, w) float32 from stride-``stride`` logits to the input frame,
    or, with ``orig_size`` and ``scale_factor``, to the original image (``rtmdet.mask_paste``'s rule:
    height sized with the x scale, width with the y scale, as the reference)."""
    (h, w), (H, W) = feat_size, input_size
    ry = bilinear_matrix(H, h, 1.0 / stride)  # (H, h)
    rx = bilinear_matrix(W, w, 1.0 / stride)  # (W, w)
    if orig_size is not None:
        (ori_h, ori_w), (w_scale, h_scale) = orig_size, scale_factor
        h2, w2 = math.ceil(H / w_scale), math.ceil(W / h_scale)
        ry = _then_resize(ry, ori_h, H / h2)  # (ori_h, h)
        rx = _then_resize(rx, ori_w, W / w2)  # (ori_w, w)
    return ry.astype(np.float32), rx.astype(np.float32)


def _then_resize(mat: np.ndarray, out_size: int, ratio: float) -> np.ndarray:
    i0, i1, w0, w1 = _bilinear_taps(out_size, mat.shape[0], ratio)
    return w0[:, None] * mat[i0] + w1[:, None] * mat[i1]


def paste_masks(logits: np.ndarray, ry: np.ndarray, rx: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """logits (N, h, w) float32, ry (Ho, h), rx (Wo, w) -> bool masks (N, Ho, Wo) of (Ry L Rx^T) > threshold.

    Bilinear weights are convex: an output pixel can exceed the threshold only where a low-res
    logit in its support does, so each instance is evaluated over that window only.
    """
    n = logits.shape[0]
    masks = np.zeros((n, ry.shape[0], rx.shape[0]), dtype=bool)
    if n == 0:
        return masks
    rows = _output_span(logits.max(axis=2) > threshold, ry)  # (N, 4)
    cols = _output_span(logits.max(axis=1) > threshold, rx)
    logits, rx_t = logits.astype(np.float32), rx.T
    for k, ((y0, y1, a0, a1), (x0, x1, b0, b1)) in enumerate(zip(rows.tolist(), cols.tolist())):
        if y1 > y0 and x1 > x0:
            region = ry[y0:y1, a0:a1] @ (logits[k, a0:a1, b0:b1] @ rx_t[b0:b1, x0:x1])
            masks[k, y0:y1, x0:x1] = region > threshold
    return masks


def _output_span(active: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """active (N, h) low-res lines above threshold; mat (Ho, h) -> (N, 4) int64: output span
    [start, end) whose support meets the active lines, and the low-res lines [first, last) it reads."""
    h = active.shape[1]
    idx = np.arange(h)
    a = np.where(active, idx, h).min(axis=1)  # first active line (h if none)
    b = np.where(active, idx, -1).max(axis=1)  # last active line (-1 if none)
    nz = mat != 0
    lo = np.where(nz, idx, h).min(axis=1)  # (Ho,) first low-res line each output line reads
    hi = np.where(nz, idx, -1).max(axis=1)
    start = np.searchsorted(hi, a, side="left")  # first output line with hi >= a
    end = np.maximum(np.searchsorted(lo, b, side="right"), start)  # past the last with lo <= b
    last = mat.shape[0] - 1
    low0 = lo[np.minimum(start, last)]
    low1 = hi[np.clip(end - 1, 0, last)] + 1
    return np.stack([start, end, low0, np.maximum(low1, low0)], axis=1)


def nearest_masks(masks: np.ndarray, new_size: tuple[int, int], orig_size: tuple[int, int]) -> np.ndarray:
    """Input-resolution bool masks (N, S, S) -> original pixels (N, h, w): crop the letterboxed
    (new_h, new_w) region and resize it nearest-neighbour (an approximation of the logit paste)."""
    (new_h, new_w), (h, w) = new_size, orig_size
    ys = np.minimum(((np.arange(h) + 0.5) * new_h / h).astype(np.int64), new_h - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * new_w / w).astype(np.int64), new_w - 1)
    return masks[:, ys][:, :, xs]


# ----------------------------------------------------------------------------------- results

def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO compressed RLE {"size": [H, W], "counts": str}, as pycocotools.mask.encode.

    Runs of the column-major pixels, starting with a (possibly empty) run of zeros; each count
    (from the third on, minus the count two before) is written 5 bits per character, LEB128 style.
    """
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    chars = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative deltas end at -1
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return {"size": [h, w], "counts": "".join(chars)}


def coco_entries(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                 image_id: int) -> list[dict]:
    """One image's instances in original pixels -> COCO results entries, as ``rtmdet.inference.coco_results``.

    boxes (N, 4) xyxy float32, scores (N,) float32, labels (N,) int, masks (N, H, W) bool or None.
    ``bbox`` [x, y, w, h] to 0.01 px, ``score`` to 1e-5, ``segmentation`` compressed RLE, ``area``.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    out = []
    for k, (label, box, score) in enumerate(zip(labels.tolist(), xywh, np.asarray(scores, np.float32).tolist())):
        r = {"image_id": int(image_id), "category_id": int(label), "bbox": [round(v, 2) for v in box],
             "score": round(score, 5)}
        if masks is not None:
            r["segmentation"] = rle_encode(masks[k])
            r["area"] = int(masks[k].sum())
        out.append(r)
    return out


def cutout(image: np.ndarray, mask: np.ndarray):
    """RGBA (h, w, 4) uint8 of one instance cropped to its mask's tight box, and the box
    (x0, y0, x1, y1) end-exclusive; None for an empty mask. Alpha: 255 in the mask (times the
    image's own alpha for an RGBA image), 0 outside."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    crop = image[y0:y1, x0:x1]
    alpha = mask[y0:y1, x0:x1].astype(np.uint8) * 255
    if crop.shape[2] == 4:
        alpha = np.minimum(alpha, crop[..., 3])
    return np.dstack([crop[..., :3], alpha]), (x0, y0, x1, y1)
