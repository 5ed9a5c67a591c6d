"""COCO-format instance annotations -> training samples (image, boxes, labels, masks).

:class:`CocoAnnotations` parses and checks an annotation file at construction, without decoding
images: missing keys, bad or duplicate ids, unknown image or category ids, malformed boxes and
masks are all collected and raised as one :class:`DatasetError`, one line per problem naming the
file and the id (a file that is not JSON, or lacks a top-level key, raises at once).
:meth:`CocoAnnotations.validate_images` checks the image files (exist, decode, size as in the
json) and returns every problem. Degenerate annotations (polygons under 3 points, boxes under 1 px or
outside the image, empty RLE masks) are skipped with one warning that counts them. ``iscrowd``
instances become ``ignore_boxes``, never targets (mmdet's assigner and losses ignore them).
Category ids of any kind map to labels 0..C-1 in sorted id order (:class:`CategoryMap`).

Images load as RGB uint8 (:func:`load_image`): EXIF orientation applied; grey, palette and CMYK
converted; transparent images (RGBA, LA, palette or grey with a transparency key) composited onto
the pad grey 114, so transparent areas look like padding; 16-bit grey scaled to 8 bits. Masks
decode from RLE straight into tight crops (:class:`InstanceMasks`, in ``masks.py``), never as full frames.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from rtmdet.preprocess import PAD_VALUE

from .errors import DatasetError
from .masks import decode_masks


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids (sorted) <-> contiguous labels 0..C-1, and class names by label."""

    cat_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> "CategoryMap":
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        return cls(tuple(i for i, _ in pairs), tuple(n for _, n in pairs))

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.cat_ids)}

    @property
    def label_to_cat_id(self) -> dict[int, int]:
        return dict(enumerate(self.cat_ids))


@dataclass(frozen=True)
class ImageRecord:
    """One image of the annotation file with its usable (non-crowd, non-degenerate) instances."""

    image_id: int
    path: str
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) float32 xyxy, original pixels, clipped to the image
    labels: np.ndarray  # (N,) int64
    segmentations: tuple  # N polygons (list of parts, each >= 3 points) or RLE dicts
    ann_ids: tuple[int, ...]
    ignore_boxes: np.ndarray  # (M, 4) float32 xyxy crowd regions


MAX_LISTED = 30  # problems spelled out in one error message; the rest are counted


def problems_message(header: str, problems: list[str]) -> str:
    """``header``, then one indented line per problem: at most MAX_LISTED, then '... and N more'."""
    lines = [header, *(f"  {p}" for p in problems[:MAX_LISTED])]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_numbers(values) -> bool:
    """A list of finite numbers. One ``sum`` (TypeError for anything else) keeps COCO's ~1M polygons fast."""
    try:
        return isinstance(values, (list, tuple)) and math.isfinite(sum(values))
    except TypeError:
        return False


class CocoAnnotations:
    """A checked COCO instance annotation file; ``records`` holds one :class:`ImageRecord` per image.

    ``min_size``: drop images whose width or height is below it (mmdet ``filter_cfg.min_size``).
    ``keep_empty``: keep images without usable instances (negatives / evaluation images).
    Problems are collected while parsing and raised together at the end as one :class:`DatasetError`
    (the message alone when there is one), so that a single run shows everything to fix.
    """

    def __init__(self, ann_file: str | os.PathLike, img_dir: str | os.PathLike, min_size: int = 0,
                 keep_empty: bool = True):
        self.ann_file, self.img_dir = str(ann_file), str(img_dir)
        data = self._read_json()  # not JSON, or a top-level key missing: raises at once
        self._problems: list[str] = []
        self.categories, category_ids = self._check_categories(data["categories"])
        images, image_ids = self._check_images(data["images"])
        per_image = self._group_annotations(data["annotations"], images, image_ids, category_ids)
        self.skipped = Counter()  # degenerate annotations by reason
        self.records = [self._record(images[i], per_image[i]) for i in images]  # may add problems too
        if self._problems:
            n = len(self._problems)
            raise DatasetError(self._problems[0] if n == 1 else
                               problems_message(f"{self.ann_file}: {n} problems:", self._problems))
        n = sum(self.skipped.values())
        if n:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            warnings.warn(f"{self.ann_file}: skipped {n} degenerate annotation(s) ({reasons})", stacklevel=2)
        self.records = [r for r in self.records if min(r.height, r.width) >= min_size and (keep_empty or len(r.labels))]

    def _read_json(self) -> dict:
        try:
            with open(self.ann_file, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DatasetError(f"annotation file not found: {self.ann_file}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{self.ann_file}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{self.ann_file}: expected a JSON object with images/annotations/categories")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{self.ann_file}: missing top-level key {key!r}")
            if not isinstance(data[key], list):
                raise DatasetError(f"{self.ann_file}: {key!r} must be a list, not {type(data[key]).__name__}")
        return data

    def _problem(self, message: str) -> None:
        self._problems.append(f"{self.ann_file}: {message}")

    def _has(self, entry, keys: tuple[str, ...], what: str) -> bool:
        """Whether ``entry`` is a JSON object with all ``keys``; records the problem if not."""
        if not isinstance(entry, dict):
            self._problem(f"{what} is not a JSON object")
            return False
        missing = [k for k in keys if k not in entry]
        if missing:
            self._problem(f"{what} has no {', '.join(repr(k) for k in missing)}")
        return not missing

    def _check_categories(self, entries: list) -> tuple[CategoryMap, set[int]]:
        """The map of the valid categories, and every integer id listed (so that an annotation of a
        broken category entry is not reported a second time as unknown)."""
        valid, ids = [], set()
        for i, c in enumerate(entries):
            complete = self._has(c, ("id", "name"), f"category entry #{i}")
            cat_id = c.get("id") if isinstance(c, dict) else None
            if complete and not _is_int(cat_id):
                self._problem(f"category id {cat_id!r} is not an integer")
            elif complete and cat_id in ids:
                self._problem(f"duplicate category id {cat_id}")
            elif complete:
                valid.append(c)
            if _is_int(cat_id):
                ids.add(cat_id)
        if not entries:
            self._problem("categories must be non-empty with unique ids")
        return CategoryMap.from_categories(valid), ids

    def _check_images(self, entries: list) -> tuple[dict[int, dict], set[int]]:
        """The valid image entries by id, and every integer id listed."""
        images, seen = {}, {}
        for i, im in enumerate(entries):
            if not self._has(im, ("id",), f"image entry #{i}"):
                continue
            image_id = im["id"]
            if not _is_int(image_id):
                self._problem(f"image id {image_id!r} is not an integer")
                continue
            if image_id in seen:
                self._problem(f"duplicate image id {image_id} (file_name {seen[image_id].get('file_name')!r} "
                              f"and {im.get('file_name')!r})")
                continue
            seen[image_id] = im
            if not self._has(im, ("file_name", "height", "width"), f"image {image_id}"):
                continue
            if not (isinstance(im["file_name"], str) and im["file_name"]):
                self._problem(f"image {image_id} has file_name {im['file_name']!r}")
            elif not (_is_numbers([im["height"], im["width"]]) and min(im["height"], im["width"]) >= 1):
                self._problem(f"image {image_id} has size {im['width']}x{im['height']}")
            else:
                images[image_id] = im
        return images, set(seen)

    def _group_annotations(self, entries: list, images: dict, image_ids: set[int],
                           category_ids: set[int]) -> dict[int, list]:
        """Annotations by image id, those without problems only."""
        per_image = {i: [] for i in images}
        known = self.categories.cat_id_to_label
        seen = {}  # annotation id -> its image id
        for i, a in enumerate(entries):
            what = f"annotation {a['id']}" if isinstance(a, dict) and "id" in a else f"annotation entry #{i}"
            if not self._has(a, ("id", "image_id"), what):
                continue
            ann_id, image_id = a["id"], a["image_id"]
            if not (_is_int(image_id) and image_id in image_ids):
                self._problem(f"{what} refers to unknown image_id {image_id!r}")
                continue
            where = f"{what} (image {image_id})"
            required = ("category_id", "bbox") if a.get("iscrowd", 0) else ("category_id", "bbox", "segmentation")
            problems = len(self._problems)
            self._has(a, required, where)
            if not _is_int(ann_id):
                self._problem(f"annotation id {ann_id!r} (image {image_id}) is not an integer")
            elif ann_id in seen:
                self._problem(f"duplicate annotation id {ann_id} (images {seen[ann_id]} and {image_id})")
            else:
                seen[ann_id] = image_id
            if "category_id" in a and not (_is_int(a["category_id"]) and a["category_id"] in category_ids):
                self._problem(f"{where} has unknown category_id {a['category_id']!r}; categories are {list(known)}")
            if "bbox" in a and not (_is_numbers(a["bbox"]) and len(a["bbox"]) == 4):
                self._problem(f"{where} has a malformed bbox {a['bbox']!r}")
            # Kept if it has no problem, nor its image or category entry (reported there).
            if len(self._problems) == problems and image_id in per_image and a["category_id"] in known:
                per_image[image_id].append(a)
        return per_image

    def _record(self, im: dict, anns: list[dict]) -> ImageRecord:
        h, w = int(im["height"]), int(im["width"])
        labels_of = self.categories.cat_id_to_label
        boxes, labels, segs, ids, ignore = [], [], [], [], []
        for a in anns:
            what = f"annotation {a['id']} (image {im['id']})"
            x, y, bw, bh = (float(v) for v in a["bbox"])
            box = [max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)]
            if bw < 1 or bh < 1:
                self.skipped["box under 1 px"] += 1
                continue
            if box[2] <= box[0] or box[3] <= box[1]:
                self.skipped["box outside the image"] += 1
                continue
            if a.get("iscrowd", 0):
                ignore.append(box)
                continue
            seg = self._check_segmentation(a["segmentation"], h, w, what)
            if seg is None:
                continue
            boxes.append(box), labels.append(labels_of[a["category_id"]]), segs.append(seg), ids.append(a["id"])
        return ImageRecord(
            image_id=im["id"], path=os.path.join(self.img_dir, im["file_name"]), height=h, width=w,
            boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
            segmentations=tuple(segs), ann_ids=tuple(ids), ignore_boxes=np.array(ignore, np.float32).reshape(-1, 4),
        )

    def _check_segmentation(self, seg, h: int, w: int, what: str):
        """The usable segmentation (short polygon parts dropped), or None: degenerate (counted) or
        malformed (a problem)."""
        if isinstance(seg, list):
            if seg and not isinstance(seg[0], (list, tuple)):
                seg = [seg]  # a single flat polygon
            if not all(_is_numbers(p) for p in seg):
                self._problem(f"{what} has a malformed polygon (each part must be a list of numbers)")
                return None
            parts = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if not parts:
                self.skipped["polygon under 3 points"] += 1
                return None
            return parts
        try:
            area = self._rle_area(seg, h, w)
        except ValueError as e:
            self._problem(f"{what} {e}")
            return None
        if area == 0:
            self.skipped["empty mask"] += 1
            return None
        return seg

    @staticmethod
    def _rle_area(seg, h: int, w: int) -> int:
        """Foreground pixels of the RLE ``seg`` of an h x w image; a ValueError says what is malformed."""
        if not isinstance(seg, dict):
            raise ValueError(f"has a malformed segmentation of type {type(seg).__name__}")
        if "counts" not in seg or "size" not in seg:
            raise ValueError("has an RLE without 'counts'/'size'")
        if seg["size"] != [h, w]:
            raise ValueError(f"has an RLE of size {seg['size']}, image is {[h, w]}")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed: run lengths, background first
            total = sum(counts) if _is_numbers(counts) else None
            if total != h * w:
                raise ValueError(f"has malformed RLE counts (sum {total}, the image has {h * w} pixels)")
            return sum(counts[1::2])
        try:
            return int(mask_utils.area(seg))
        except Exception as e:  # noqa: BLE001 - pycocotools raises several types for bad strings
            raise ValueError(f"has a malformed compressed RLE ({type(e).__name__}: {e})") from None

    def validate_images(self, threads: int = 8) -> list[str]:
        """Check every image file; all problems at once, one line each naming the image id and path.

        Catches missing files, files that are not images, truncated files (PNGs are verified chunk
        by chunk up to IEND, other formats decoded, JPEG at 1/8 scale, which still reads the whole
        file) and sizes unlike the json. About 1 ms a COCO image, in ``threads`` threads (PIL
        releases the GIL while decoding).
        """
        with ThreadPoolExecutor(threads) as pool:
            return [p for p in pool.map(_image_file_problem, self.records) if p]


def image_file_problems(*annotations: CocoAnnotations) -> list[str]:
    """:meth:`CocoAnnotations.validate_images` of each, one line per problem (once when two sets,
    e.g. train and val, share an image)."""
    return list(dict.fromkeys(p for a in annotations for p in a.validate_images()))


def check_image_files(*annotations: CocoAnnotations) -> None:
    """Open every image file of ``annotations`` and raise one :class:`DatasetError` listing all the
    problems, so that a run stops before its first step, not hours in when the loader reaches a file."""
    problems = image_file_problems(*annotations)
    if problems:
        raise DatasetError(problems_message(f"{len(problems)} image file problem(s); fix or remove these images:",
                                            problems))


def _image_file_problem(r: ImageRecord) -> str | None:
    """What is wrong with the image file of ``r``, or None."""
    try:
        with Image.open(r.path) as im:
            if im.format == "PNG":
                im.verify()  # every chunk's CRC, up to IEND, without decompressing
        with Image.open(r.path) as im:  # (after verify an image must be reopened)
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF transposes: either size is fine
                h, w = (w, h) if (w, h) == (r.height, r.width) else (h, w)
            if im.format != "PNG":
                im.draft(im.mode, (1, 1))  # JPEG: DCT-domain downscale; the whole stream is still read
                im.load()
    except FileNotFoundError:
        return f"image {r.image_id}: file not found: {r.path}"
    except Exception as e:  # noqa: BLE001 - any decoder error is a problem to report
        return f"image {r.image_id}: cannot read {r.path}: {type(e).__name__}: {e}"
    if (h, w) != (r.height, r.width):
        return f"image {r.image_id}: {r.path} is {w}x{h}, the annotation file says {r.width}x{r.height}"
    return None


TRANSPARENT_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # PIL modes with an alpha band


def has_transparency(im: Image.Image) -> bool:
    """Whether ``im`` has an alpha band or a transparency key (palette or grey with ``transparency``)."""
    return im.mode in TRANSPARENT_MODES or "transparency" in im.info


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3) RGB; transparency composited onto grey 114."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        a = a * (255 / 65535) if a.max() > 255 else a
        return np.repeat(np.clip(a + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if has_transparency(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (PAD_VALUE,) * 3 + (255,)), rgba)
    return np.array(im.convert("RGB"))


def load_image(path: str, image_id: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) RGB, EXIF orientation applied.

    ``size``: the (h, w) the annotations were made on. When only the un-rotated image matches it,
    the EXIF orientation is ignored (the annotations follow the stored pixels); when neither
    matches, a :class:`DatasetError` names the file and image id.
    """
    try:
        with Image.open(path) as raw:
            raw.load()
            im = ImageOps.exif_transpose(raw)
            if size is not None and (im.height, im.width) != tuple(size) and (raw.height, raw.width) == tuple(size):
                im = raw
            if size is not None and (im.height, im.width) != tuple(size):
                raise DatasetError(f"image {image_id}: {path} is {im.width}x{im.height}, the annotation file "
                                   f"says {size[1]}x{size[0]}")
            return _to_rgb(im)
    except FileNotFoundError:
        raise DatasetError(f"image {image_id}: file not found: {path}") from None
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise DatasetError(f"image {image_id}: cannot read {path}: {type(e).__name__}: {e}") from None


def load_sample(record: ImageRecord) -> dict:
    """The sample dict of one image at its original size (see ``datamodules.transforms``)."""
    image = load_image(record.path, record.image_id, (record.height, record.width))
    try:
        masks = decode_masks(record.segmentations, record.height, record.width)
    except DatasetError as e:
        raise DatasetError(f"image {record.image_id} ({record.path}): {e}") from None
    keep = masks.areas() > 0  # polygons too thin to cover a pixel centre
    return {
        "image": image,  # (H, W, 3) uint8 RGB
        "boxes": record.boxes[keep],  # (N, 4) float32 xyxy
        "labels": record.labels[keep],  # (N,) int64
        "masks": masks[keep],  # (N, H, W) InstanceMasks
        "ignore_boxes": record.ignore_boxes,  # (M, 4) float32 xyxy crowd regions
        "image_id": record.image_id,
        "orig_size": (record.height, record.width),
        "scale_factor": (1.0, 1.0),
    }

