"""The tiling and instance-cap flags that ``experiments.predict`` and ``experiments.evaluate`` share,
and the per-image predictor they drive.

``--tile-size`` is a window side in original pixels, ``auto`` (windows of the input size, so the
image keeps the scale the model was trained at, used only for images larger than the input) or
``none`` (letterbox the whole image, the official behaviour). ``--upscale K`` makes the network
input K times the input size while ``auto`` windows keep the input size in original pixels, so
every image, whole or in windows, is seen K times larger (pixel art: each art pixel K x K with the
nearest letterbox; small sprites cover K^2 as many feature cells). ``--max-det`` caps the instances per
image (default: the checkpoint's ``max_per_img``, 100 officially; 300 for a tiled image); an
image that has more above the threshold is reported, never cut silently.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from rtmdet.postprocess import InstancePostProcess
from rtmdet.preprocess import preprocess
from rtmdet.tiling import TiledPredictor, tile_windows

TILED_MAX_DET = 300


def tile_size_arg(value: str) -> int | str:
    """``auto``, ``none`` or a positive number of pixels."""
    if value in ("auto", "none"):
        return value
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, 'auto' or 'none', got {value!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"the tile size must be a positive number of pixels, got {size}")
    return size


def add_tiling_arguments(p: argparse.ArgumentParser, default_tile: str) -> None:
    p.add_argument("--tile-size", type=tile_size_arg, default=default_tile, metavar="N|auto|none",
                   help="predict large images in overlapping windows of N original pixels; auto: windows of the "
                        "input size, only for images larger than it (keeps the trained scale); none: letterbox "
                        f"the whole image (default: {default_tile})")
    p.add_argument("--upscale", type=int, default=1, metavar="K",
                   help="see every image K times larger: the network input is K x the input size, auto windows "
                        "stay at the input size in original pixels (pixel art at x2: see the README; default 1)")
    p.add_argument("--tile-overlap", type=float, default=0.2, metavar="F",
                   help="fraction of a window shared with its neighbour (default 0.2)")
    p.add_argument("--whole-image", action="store_true",
                   help="with tiling, also predict the whole letterboxed image (objects larger than a window)")
    p.add_argument("--max-det", type=int, metavar="K",
                   help=f"instances kept per image, best first (default: the checkpoint's max_per_img, 100 "
                        f"officially; {TILED_MAX_DET} for a tiled image); images with more are reported")


def check_tiling_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.upscale < 1:
        parser.error(f"--upscale must be a whole factor of at least 1, got {args.upscale}")
    if not 0 <= args.tile_overlap < 1:
        parser.error(f"--tile-overlap must be in [0, 1), got {args.tile_overlap}")
    if args.max_det is not None and args.max_det < 1:
        parser.error(f"--max-det must be at least 1, got {args.max_det}")


@dataclass
class Prediction:
    """One image's prediction (original pixels, masks as CropMasks) and how it was made."""

    pred: dict
    found: int  # instances above the threshold before the cap (a lower bound when capped untiled)
    max_det: int
    tiles: int  # windows used (1: the whole image letterboxed)

    @property
    def capped(self) -> bool:
        return self.found > self.max_det


class ImagePredictor:
    """Predict images following the tiling flags: whole-image batches, or one image in windows."""

    def __init__(self, model, postprocess: InstancePostProcess, img_size: int, nearest: bool,
                 args: argparse.Namespace, device):
        # img_size: the input size an image is seen at x1; the network input is upscale times it.
        self.model, self.nearest, self.device = model, nearest, device
        self.img_size, self.auto_window = img_size * args.upscale, img_size
        self.tile_size, self.whole_image = args.tile_size, args.whole_image
        settings = postprocess.settings()
        self.plain_max_det = args.max_det or settings["max_per_img"]
        # One more than the cap: NMS then tells whether the cap cut anything off.
        self.plain = InstancePostProcess(**{**settings, "max_per_img": self.plain_max_det + 1},
                                         strides=postprocess.strides, mask_format="crops")
        self.tiled_max_det = args.max_det or max(TILED_MAX_DET, settings["max_per_img"])
        self.tile_overlap, self.batch_size = args.tile_overlap, args.batch_size
        self.postprocess = postprocess

    def window(self, height: int, width: int) -> int | None:
        """The window side for an image of this size, or None to letterbox it whole."""
        if self.tile_size == "none":
            return None
        if self.tile_size == "auto":
            return self.auto_window if max(height, width) > self.auto_window else None
        return self.tile_size

    @torch.inference_mode()
    def whole(self, images: list[np.ndarray]) -> list[Prediction]:
        """Letterbox each image whole; one forward for the batch."""
        x, metas = preprocess(images, self.img_size, self.nearest)
        preds = self.plain(self.model(x.to(self.device)), metas)
        out = []
        for p in preds:
            found, k = len(p["scores"]), self.plain_max_det
            out.append(Prediction({key: v[:k] for key, v in p.items()}, found, k, 1))
        return out

    def tiled(self, image: np.ndarray, tile: int) -> Prediction:
        predictor = TiledPredictor(self.model, self.postprocess, self.img_size, tile, self.tile_overlap, self.nearest,
                                   self.batch_size, self.whole_image, self.tiled_max_det)
        pred, found = predictor(image)
        h, w = image.shape[:2]
        return Prediction(pred, found, self.tiled_max_det, len(tile_windows(h, w, tile, self.tile_overlap)))


def cap_report(capped: list[tuple[str, Prediction]]) -> list[str]:
    """Lines naming each image whose instances exceeded the cap."""
    lines = []
    for name, p in capped:
        more = "more than " if p.tiles == 1 and p.found == p.max_det + 1 else ""
        lines.append(f"  {name}: {more}{p.found} instances above the threshold, kept the best {p.max_det} "
                     f"(raise --max-det)")
    return lines
