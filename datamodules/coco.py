"""COCO-format instance annotations -> training samples (image, boxes, labels, masks).

:class:`CocoAnnotations` parses and checks an annotation file at construction, without decoding
images: malformed files, missing keys, unknown image or category ids raise :class:`DatasetError`
naming the file and the id. Degenerate annotations (polygons under 3 points, boxes under 1 px or
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
import os
import warnings
from collections import Counter
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


def _require(entry: dict, keys: tuple[str, ...], what: str, ann_file: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{ann_file}: {what} has no {', '.join(repr(k) for k in missing)}")


class CocoAnnotations:
    """A checked COCO instance annotation file; ``records`` holds one :class:`ImageRecord` per image.

    ``min_size``: drop images whose width or height is below it (mmdet ``filter_cfg.min_size``).
    ``keep_empty``: keep images without usable instances (negatives / evaluation images).
    """

    def __init__(self, ann_file: str | os.PathLike, img_dir: str | os.PathLike, min_size: int = 0,
                 keep_empty: bool = True):
        self.ann_file, self.img_dir = str(ann_file), str(img_dir)
        data = self._read_json()
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{self.ann_file}: missing top-level key {key!r}")
        for i, c in enumerate(data["categories"]):
            _require(c, ("id", "name"), f"category entry #{i}", self.ann_file)
        self.categories = CategoryMap.from_categories(data["categories"])
        if not self.categories.num_classes or len(set(self.categories.cat_ids)) != self.categories.num_classes:
            raise DatasetError(f"{self.ann_file}: categories must be non-empty with unique ids")
        images = self._check_images(data["images"])
        per_image = self._group_annotations(data["annotations"], images)
        self.skipped = Counter()  # degenerate annotations by reason
        self.records = [self._record(images[i], per_image[i]) for i in images]
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
        return data

    def _check_images(self, entries: list) -> dict[int, dict]:
        images = {}
        for i, im in enumerate(entries):
            _require(im, ("id",), f"image entry #{i}", self.ann_file)
            _require(im, ("file_name", "height", "width"), f"image {im['id']}", self.ann_file)
            if not isinstance(im["id"], int):
                raise DatasetError(f"{self.ann_file}: image id {im['id']!r} is not an integer")
            if im["id"] in images:
                raise DatasetError(f"{self.ann_file}: duplicate image id {im['id']}")
            if int(im["height"]) < 1 or int(im["width"]) < 1:
                raise DatasetError(f"{self.ann_file}: image {im['id']} has size {im['width']}x{im['height']}")
            images[im["id"]] = im
        return images

    def _group_annotations(self, entries: list, images: dict) -> dict[int, list]:
        per_image = {i: [] for i in images}
        known = self.categories.cat_id_to_label
        for i, a in enumerate(entries):
            what = f"annotation {a['id']}" if "id" in a else f"annotation entry #{i}"
            _require(a, ("image_id", "category_id", "bbox"), what, self.ann_file)
            if a["image_id"] not in per_image:
                raise DatasetError(f"{self.ann_file}: {what} refers to unknown image_id {a['image_id']}")
            if a["category_id"] not in known:
                raise DatasetError(f"{self.ann_file}: {what} (image {a['image_id']}) has unknown category_id "
                                   f"{a['category_id']}; categories are {list(known)}")
            if not a.get("iscrowd", 0):
                _require(a, ("segmentation",), f"{what} (image {a['image_id']})", self.ann_file)
            per_image[a["image_id"]].append(a)
        return per_image

    def _record(self, im: dict, anns: list[dict]) -> ImageRecord:
        h, w = int(im["height"]), int(im["width"])
        labels_of = self.categories.cat_id_to_label
        boxes, labels, segs, ids, ignore = [], [], [], [], []
        for a in anns:
            what = f"annotation {a.get('id')} (image {im['id']})"
            bbox = a["bbox"]
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                raise DatasetError(f"{self.ann_file}: {what} has a malformed bbox {bbox!r}")
            x, y, bw, bh = (float(v) for v in bbox)
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
            boxes.append(box), labels.append(labels_of[a["category_id"]]), segs.append(seg), ids.append(a.get("id"))
        return ImageRecord(
            image_id=im["id"], path=os.path.join(self.img_dir, im["file_name"]), height=h, width=w,
            boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
            segmentations=tuple(segs), ann_ids=tuple(ids), ignore_boxes=np.array(ignore, np.float32).reshape(-1, 4),
        )

    def _check_segmentation(self, seg, h: int, w: int, what: str):
        """The usable segmentation (short polygon parts dropped), or None (counted as degenerate)."""
        if isinstance(seg, list):
            if seg and not isinstance(seg[0], (list, tuple)):
                seg = [seg]  # a single flat polygon
            parts = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if not parts:
                self.skipped["polygon under 3 points"] += 1
                return None
            return parts
        if isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                raise DatasetError(f"{self.ann_file}: {what} has an RLE without 'counts'/'size'")
            if list(seg["size"]) != [h, w]:
                raise DatasetError(f"{self.ann_file}: {what} has an RLE of size {seg['size']}, image is {[h, w]}")
            counts = seg["counts"]
            area = sum(counts[1::2]) if isinstance(counts, list) else int(mask_utils.area(seg))
            if area == 0:
                self.skipped["empty mask"] += 1
                return None
            return seg
        raise DatasetError(f"{self.ann_file}: {what} has a malformed segmentation of type {type(seg).__name__}")

    def validate_images(self) -> list[str]:
        """Check every image file quickly (exists, PIL verify, size vs the json); all problems at once."""
        problems = []
        for r in self.records:
            try:
                with Image.open(r.path) as im:
                    im.verify()
                with Image.open(r.path) as im:
                    w, h = im.size
                    if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF transposes: either size is fine
                        h, w = (w, h) if (w, h) == (r.height, r.width) else (h, w)
                if (h, w) != (r.height, r.width):
                    problems.append(f"image {r.image_id}: {r.path} is {w}x{h}, the annotation file says "
                                    f"{r.width}x{r.height}")
            except FileNotFoundError:
                problems.append(f"image {r.image_id}: file not found: {r.path}")
            except Exception as e:  # noqa: BLE001 - any decoder error is a problem to report
                problems.append(f"image {r.image_id}: cannot read {r.path}: {type(e).__name__}: {e}")
        return problems


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3) RGB; transparency composited onto grey 114."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        a = a * (255 / 65535) if a.max() > 255 else a
        return np.repeat(np.clip(a + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
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

