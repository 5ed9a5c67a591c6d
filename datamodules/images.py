"""Image files -> uint8 (H, W, 3) RGB arrays, and the check of an image file before training.

Every PIL mode loads the same way, for training, evaluation and ``experiments.predict`` alike:

* EXIF orientation applied (unless the annotations were made on the stored pixels, see
  :func:`load_image`);
* grey (L), palette (P), CMYK (JPEG, Adobe-inverted or not) converted to RGB;
* transparency (RGBA, LA, PA, palette or grey with a transparency key) composited onto the pad grey
  114, so that transparent areas look like the letterbox padding;
* 16- and 32-bit integer grey (I;16, I) read as the smallest bit depth >= 8 that holds the image's
  brightest value, then scaled to 8 bits: full-range 16-bit divides by 257, 12-bit data stored in 16
  bits (max <= 4095) divides by 16.06, and a dark image whose values are all <= 255 keeps them as
  8-bit levels. Negative values are 0. Float images (F) in [0, 1] are scaled by 255, others as the
  integers;
* multi-frame files (animated GIF, multi-page TIFF): the first frame; an :class:`ImageWarning` says
  so, naming the file and the frame count;
* images over the pixel limit (PIL's decompression-bomb guard: 2 x ``PIL.Image.MAX_IMAGE_PIXELS``,
  178,956,970 pixels by default) are refused with a :class:`DatasetError` naming the file, its size
  and the limit. The environment variable ``RTMDET_MAX_IMAGE_PIXELS=N`` raises (or lowers) the
  limit to N pixels for every tool and dataloader worker; 0 removes it.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from rtmdet.preprocess import PAD_VALUE

from .errors import DatasetError

MAX_PIXELS_ENV = "RTMDET_MAX_IMAGE_PIXELS"
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # PIL modes with an alpha band


def has_transparency(im: Image.Image) -> bool:
    """Whether ``im`` has an alpha band or a transparency key (palette or grey with ``transparency``):
    what loading composites onto grey and what predict's cut-outs keep as alpha."""
    return im.mode in TRANSPARENT_MODES or "transparency" in im.info


class ImageWarning(UserWarning):
    """Something about an image file that the user should know (e.g. only its first frame is used)."""


def pixel_limit() -> int | None:
    """Most pixels an image may have: ``RTMDET_MAX_IMAGE_PIXELS`` (0: none), else PIL's error threshold.

    Setting the variable also sets ``PIL.Image.MAX_IMAGE_PIXELS`` to it, so that PIL's own guard
    (which opens the file before we see its size) lets those images through.
    """
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if value:
        try:
            limit = int(value)
        except ValueError:
            raise DatasetError(f"{MAX_PIXELS_ENV}={value!r} is not an integer number of pixels") from None
        Image.MAX_IMAGE_PIXELS = limit or None
        return limit or None
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _limit_message(image_id, path: str, pixels: int, limit: int) -> str:
    return (f"image {image_id}: {path} has {pixels:,} pixels, over the limit of {limit:,} (PIL's "
            f"decompression-bomb guard); if the file is trusted, raise it with {MAX_PIXELS_ENV}=N (0: no limit)")


def open_image(path: str, image_id=None) -> Image.Image:
    """``Image.open`` with the errors every reader here reports the same way (a :class:`DatasetError`
    naming the image id and file): missing, empty (0 bytes), not an image, over the pixel limit.
    The caller closes the image."""
    limit = pixel_limit()
    try:
        if os.path.getsize(path) == 0:
            raise DatasetError(f"image {image_id}: {path} is empty (0 bytes)")
        im = Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"image {image_id}: file not found: {path}") from None
    except Image.DecompressionBombError as e:  # PIL's own check, before the size is ours to read
        pixels = int(str(e).split("(", 1)[1].split()[0]) if str(e).startswith("Image size (") else -1
        raise DatasetError(_limit_message(image_id, path, pixels, limit or 0)) from None
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for files that are not images
        raise DatasetError(f"image {image_id}: cannot read {path}: {type(e).__name__}: {e}") from None
    if limit is not None and im.width * im.height > limit:
        im.close()
        raise DatasetError(_limit_message(image_id, path, im.width * im.height, limit))
    return im


def _frames_note(im: Image.Image, path: str) -> None:
    n = getattr(im, "n_frames", 1)
    if n > 1:
        warnings.warn(f"{path}: {n} frames ({im.format}); the first frame is used", ImageWarning, stacklevel=3)


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3) RGB (see the module docstring for how each mode maps)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode == "F" and top <= 1.0:
            a = a * 255.0
        elif top > 255:
            a = a * (255.0 / (2.0 ** np.ceil(np.log2(top + 1)) - 1))  # the smallest bit depth holding top
        return np.repeat(np.clip(a + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if has_transparency(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (PAD_VALUE,) * 3 + (255,)), rgba)
    return np.array(im.convert("RGB"))


def load_image(path: str, image_id: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) RGB, EXIF orientation applied (modes: module docstring).

    ``size``: the (h, w) the annotations were made on. When only the un-rotated image matches it,
    the EXIF orientation is ignored (the annotations follow the stored pixels); when neither
    matches, a :class:`DatasetError` names the file and image id. Every failure is a
    :class:`DatasetError` naming the file and ``image_id``.
    """
    with open_image(path, image_id) as raw:
        try:
            _frames_note(raw, path)
            raw.load()
            im = ImageOps.exif_transpose(raw)
            if size is not None and (im.height, im.width) != tuple(size) and (raw.height, raw.width) == tuple(size):
                im = raw
            if size is not None and (im.height, im.width) != tuple(size):
                raise DatasetError(f"image {image_id}: {path} is {im.width}x{im.height}, the annotation file "
                                   f"says {size[1]}x{size[0]}")
            return to_rgb(im)
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise DatasetError(f"image {image_id}: cannot read {path}: {type(e).__name__}: {e}") from None


def load_image_noted(path: str, image_id: int | None = None) -> tuple[np.ndarray, list[str]]:
    """:func:`load_image`, and the :class:`ImageWarning` messages it raised (to list beside results)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImageWarning)
        image = load_image(path, image_id)
    for w in caught:  # anything else goes on to the usual warning filters
        if not issubclass(w.category, ImageWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return image, [str(w.message) for w in caught if issubclass(w.category, ImageWarning)]


def image_file_problem(path: str, image_id, height: int, width: int) -> str | None:
    """What is wrong with the image file of image ``image_id`` (expected ``height`` x ``width``), or None.

    PNGs are verified chunk by chunk up to IEND without decompressing; other formats are decoded
    (JPEG at 1/8 scale in the DCT domain, which still reads the whole stream).
    """
    try:
        with open_image(path, image_id) as im:
            if im.format == "PNG":
                im.verify()  # every chunk's CRC, up to IEND
        with open_image(path, image_id) as im:  # (after verify an image must be reopened)
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF transposes: either size is fine
                h, w = (w, h) if (w, h) == (height, width) else (h, w)
            if im.format != "PNG":
                im.draft(im.mode, (1, 1))
                im.load()
    except DatasetError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any decoder error is a problem to report
        return f"image {image_id}: cannot read {path}: {type(e).__name__}: {e}"
    if (h, w) != (height, width):
        return f"image {image_id}: {path} is {w}x{h}, the annotation file says {width}x{height}"
    return None
