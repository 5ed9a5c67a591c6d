"""The prediction overlay (masks tinted per class, boxes, "class score" labels), with numpy and Pillow only.

Shared by ``experiments.predict``, the validation panel of ``experiments.visualize`` and the
torch-free ``experiments.onnx_predict``.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct saturated colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_overlay(image: np.ndarray, pred: dict, names: list[str]) -> Image.Image:
    """image: (H, W, 3) uint8 RGB; pred: numpy boxes (N, 4) xyxy, labels (N,), masks (N, H, W) bool
    or box-local crops (``rtmdet.crop_masks.CropMasks``: anything whose ``mask(k)`` gives (crop,
    (x0, y0, x1, y1))), and optionally scores (N,) (ground truth has none: labels are drawn without
    a score)."""
    scores = pred.get("scores")
    n = len(pred["labels"])
    out = image.astype(np.float32)
    masks = pred["masks"]
    for k in reversed(range(n)):  # the best instance is painted last, on top
        colour = np.array(class_colour(int(pred["labels"][k])), np.float32)
        if hasattr(masks, "mask"):  # crops: paint inside the instance's region only
            m, (x0, y0, x1, y1) = masks.mask(k)
            region = out[y0:y1, x0:x1]
        else:
            m, region = masks[k], out
        region[m] = 0.5 * region[m] + 0.5 * colour
    im = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    width = max(1, round(min(image.shape[:2]) / 300))
    for k in reversed(range(n)):
        label = int(pred["labels"][k])
        colour = class_colour(label)
        x0, y0, x1, y1 = (float(v) for v in pred["boxes"][k])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        name = names[label] if label < len(names) else str(label)
        text = name if scores is None else f"{name} {float(scores[k]):.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), text)
        ty = max(y0 - (ty1 - ty0) - 2, 0)  # above the box, or inside it at the top edge
        draw.rectangle([tx0, ty, tx1 + 2, ty + (ty1 - ty0) + 2], fill=colour)
        draw.text((x0 + 1, ty + 1 - (ty0 - y0)), text, fill=(0, 0, 0))
    return im
