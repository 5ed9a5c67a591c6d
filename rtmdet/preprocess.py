"""Test-time input pipeline of the official RTMDet-Ins: letterbox resize, pad 114, BGR normalise.

The official weights expect BGR images (OpenCV order) normalised with the mean/std below, given in
B, G, R order (docs/architecture.md#input-normalisation-and-letterbox). Images are resized to fit
``size x size`` keeping the aspect
ratio, then padded bottom/right to exactly ``size x size`` with the raw pixel value 114.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
PAD_VALUE = 114


class ImageMeta(NamedTuple):
    """How one input image maps back to its original pixels: the one image-meta type, from the
    letterbox (or the data pipeline's collate) to the postprocess and the mask paste.

    ``scale_factor`` is (w_scale, h_scale) = (new_w / orig_w, new_h / orig_h); the resized image sits
    at the top-left of the padded input, so original = input / scale_factor. Immutable and
    hashable, so that resize matrices are cached per geometry (with ``image_id=None``). A
    NamedTuple rather than a frozen dataclass: Lightning's batch transfer rebuilds tuples but
    refuses frozen dataclasses.
    """

    orig_size: tuple[int, int]  # (h, w) of the original image
    scale_factor: tuple[float, float]  # (w_scale, h_scale)
    input_size: tuple[int, int]  # (H, W) of the padded network input
    image_id: int | None = None  # the dataset's id, when there is one


def normalize(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 (B, 3, H, W) or (3, H, W) -> float32 BGR normalised, the model's input."""
    x = images.flip(-3).float()  # RGB -> BGR
    mean = x.new_tensor(MEAN_BGR).view(3, 1, 1)
    std = x.new_tensor(STD_BGR).view(3, 1, 1)
    return (x - mean) / std


def letterbox_size(orig_h: int, orig_w: int, size: int) -> tuple[int, int]:
    """New (h, w) after a keep-ratio resize that fits in size x size (mmcv rescale_size rounding);
    each side at least 1 pixel (a 1 x 2000 image would round to height 0)."""
    scale = min(size / orig_h, size / orig_w)
    return max(int(orig_h * scale + 0.5), 1), max(int(orig_w * scale + 0.5), 1)


def letterbox(
    image: torch.Tensor | np.ndarray, size: int = 640, nearest: bool = False
) -> tuple[torch.Tensor, ImageMeta]:
    """Resize an RGB uint8 image (H, W, 3) numpy or (3, H, W) tensor to fit ``size``, pad with 114.

    Returns the padded uint8 (3, size, size) tensor and its :class:`ImageMeta`. ``nearest`` uses
    nearest-neighbour resizing (crisp pixel art) instead of the official bilinear.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, H, W) RGB tensor, got {image.dtype} {tuple(image.shape)}")
    h, w = image.shape[1:]
    new_h, new_w = letterbox_size(h, w, size)
    if (new_h, new_w) != (h, w):
        mode = "nearest-exact" if nearest else "bilinear"
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=mode,
                                align_corners=False if not nearest else None)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    out = torch.full((3, size, size), PAD_VALUE, dtype=torch.uint8)
    out[:, :new_h, :new_w] = image
    meta = ImageMeta(orig_size=(h, w), scale_factor=(new_w / w, new_h / h), input_size=(size, size))
    return out, meta


def preprocess(
    images: torch.Tensor | np.ndarray | list, size: int = 640, nearest: bool = False
) -> tuple[torch.Tensor, list[ImageMeta]]:
    """RGB uint8 image(s) -> (normalised float (B, 3, size, size) BGR input, list of ImageMeta).

    ``images``: one image (H, W, 3) numpy / (3, H, W) tensor, a list of them (any sizes), or a
    uint8 batch (B, 3, H, W). Pass the metas to ``model.predict`` to get results in original pixels.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    padded, metas = zip(*(letterbox(im, size, nearest) for im in images))
    return normalize(torch.stack(padded)), list(metas)
