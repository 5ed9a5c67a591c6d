"""COCO-format instance annotations -> training samples (image, boxes, labels, masks) and the
ground truth that COCO evaluation compares with: one rule set for what counts as an instance.

:class:`CocoAnnotations` parses and checks an annotation file at construction, without decoding
images: missing keys, bad, duplicate or out-of-range ids, unknown image or category ids, image
sizes that are not whole numbers, malformed boxes, ``iscrowd`` flags and masks are all collected
and raised as one :class:`DatasetError`, one line per problem naming the file and the id (a file
that is not JSON, or lacks a top-level key, raises at once). :meth:`CocoAnnotations.validate_images`
checks the image files (exist, decode, size as in the json) and returns every problem.

Degenerate annotations are skipped with one warning that counts them by reason: boxes under 1 px
or outside the image, polygons without a part of >= 3 points (parts under 3 points or of odd
length are dropped), polygons wholly outside the image, empty RLE masks. Polygon parts reaching
further than one image size outside the image are clipped to that margin (pycocotools' rasteriser
allocates by perimeter and crashes on far-away vertices; inside the image the clipped part covers
the same pixels up to rounding along the cut edges). ``iscrowd``
instances become ``ignore_boxes``, never targets (mmdet's assigner and losses ignore them); a crowd
region without a usable segmentation is its box. Category ids of any kind map to labels 0..C-1 in
sorted id order (:class:`CategoryMap`).

:class:`CocoGroundTruth` applies the same rules and keeps what passes as a COCO dict, with the
file's image and category ids: ``rtmdet.coco_eval.COCOMetric`` evaluates against it, so every file
the loader accepts evaluates (pycocotools itself reads a 4-number polygon as a box and fails inside
``COCOeval.evaluate``; it also needs ``area``, ``iscrowd`` and a crowd's segmentation).

Images load as RGB uint8 (:func:`load_image`, in ``images.py``: EXIF, every PIL mode, multi-frame
files, the pixel limit). Masks decode from RLE straight into tight crops (:class:`InstanceMasks`,
in ``masks.py``), never as full frames.
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

from .errors import DatasetError
from .images import image_file_problem, load_image
from .masks import clip_polygon, decode_masks, rle_counts

__all__ = ["CategoryMap", "CocoAnnotations", "CocoGroundTruth", "DatasetError", "ImageRecord", "load_image",
           "load_sample", "problems_message"]

ID_RANGE = 2**63  # ids are int64 tensors in batches and metric states
MAX_PIXELS = 2**32  # COCO RLE run lengths are 32-bit: a larger image cannot be encoded

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


def _is_number(value) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _is_numbers(values) -> bool:
    """A list of finite numbers. One ``sum`` (TypeError for anything else) keeps COCO's ~1M polygons fast."""
    try:
        return isinstance(values, (list, tuple)) and math.isfinite(sum(values))
    except (TypeError, OverflowError):
        return False


def _id_problem(value) -> str | None:
    """Why ``value`` is not a usable id, or None."""
    if not _is_int(value):
        return "is not an integer"
    if not -ID_RANGE <= value < ID_RANGE:
        return "is outside the 64-bit integer range"
    return None


def _rle_string_counts(counts: str | bytes, h: int, w: int) -> np.ndarray:
    """Run lengths of a compressed RLE string, checked so that pycocotools decodes it safely.

    pycocotools trusts the string: characters outside '0'..'o', a number cut short, a negative or
    over-long run make it read or write past its buffers. Raises ValueError saying what is wrong.
    """
    raw = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if len(c) and (c.min() < 0 or c.max() > 63):
        raise ValueError("has a malformed compressed RLE (characters outside '0'..'o')")
    more = (c & 0x20) != 0  # "another 5-bit chunk follows"
    if len(c) and more[-1]:
        raise ValueError("has a malformed compressed RLE (the last number is cut short)")
    ends = np.flatnonzero(~more)
    if len(ends) and np.diff(np.r_[-1, ends]).max() > 7:  # 7 chunks hold any 32-bit run (and its sign)
        raise ValueError("has a malformed compressed RLE (a run longer than 32 bits)")
    runs = rle_counts([raw])[0] if len(c) else np.zeros(0, np.int64)
    if len(runs) and (runs.min() < 0 or runs.max() >= 2**32):
        raise ValueError("has malformed RLE counts (a run is negative or over 32 bits)")
    if runs.sum() != h * w:
        raise ValueError(f"has malformed RLE counts (sum {runs.sum()}, the image has {h * w} pixels)")
    return runs


class CocoAnnotations:
    """A checked COCO instance annotation file; ``records`` holds one :class:`ImageRecord` per image.

    ``ann_file``: the json's path, or its already-parsed dict (named "annotation dict" in messages).
    ``min_size``: drop images whose width or height is below it (mmdet ``filter_cfg.min_size``).
    ``keep_empty``: keep images without usable instances (negatives / evaluation images).
    Problems are collected while parsing and raised together at the end as one :class:`DatasetError`
    (the message alone when there is one), so that a single run shows everything to fix.
    """

    def __init__(self, ann_file: str | os.PathLike | dict, img_dir: str | os.PathLike, min_size: int = 0,
                 keep_empty: bool = True):
        self.ann_file = "annotation dict" if isinstance(ann_file, dict) else str(ann_file)
        self.img_dir = str(img_dir)
        data = self._read_json(ann_file)  # not JSON, or a top-level key missing: raises at once
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

    def _read_json(self, source) -> dict:
        if isinstance(source, dict):
            data = source
        else:
            try:
                with open(self.ann_file, "rb") as f:
                    data = json.load(f)
            except FileNotFoundError:
                raise DatasetError(f"annotation file not found: {self.ann_file}") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DatasetError(f"{self.ann_file}: not valid JSON ({e})") from None
            except RecursionError:
                raise DatasetError(f"{self.ann_file}: not valid JSON (nested too deeply)") from None
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
            bad_id = _id_problem(cat_id)
            if complete and bad_id:
                self._problem(f"category id {cat_id!r} {bad_id}")
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
            bad_id = _id_problem(image_id)
            if bad_id:
                self._problem(f"image id {image_id!r} {bad_id}")
                continue
            if image_id in seen:
                self._problem(f"duplicate image id {image_id} (file_name {seen[image_id].get('file_name')!r} "
                              f"and {im.get('file_name')!r})")
                continue
            seen[image_id] = im
            if not self._has(im, ("file_name", "height", "width"), f"image {image_id}"):
                continue
            h, w = im["height"], im["width"]
            if not (isinstance(im["file_name"], str) and im["file_name"]):
                self._problem(f"image {image_id} has file_name {im['file_name']!r}")
            elif not (_is_number(h) and _is_number(w) and h == int(h) >= 1 and w == int(w) >= 1):
                self._problem(f"image {image_id} has size {w!r}x{h!r} (width x height must be whole numbers >= 1)")
            elif h * w >= MAX_PIXELS:
                self._problem(f"image {image_id} has size {w}x{h}: 2^32 pixels or more, beyond COCO RLE's 32-bit runs")
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
            what = f"annotation {a['id']!r}" if isinstance(a, dict) and "id" in a else f"annotation entry #{i}"
            if not self._has(a, ("id", "image_id"), what):
                continue
            ann_id, image_id = a["id"], a["image_id"]
            if not (_is_int(image_id) and image_id in image_ids):
                self._problem(f"{what} refers to unknown image_id {image_id!r}")
                continue
            where = f"{what} (image {image_id})"
            crowd = a.get("iscrowd", 0)
            required = ("category_id", "bbox") if crowd else ("category_id", "bbox", "segmentation")
            problems = len(self._problems)
            self._has(a, required, where)
            bad_id = _id_problem(ann_id)
            if bad_id:
                self._problem(f"annotation id {ann_id!r} (image {image_id}) {bad_id}")
            elif ann_id in seen:
                self._problem(f"duplicate annotation id {ann_id} (images {seen[ann_id]} and {image_id})")
            else:
                seen[ann_id] = image_id
            if crowd not in (0, 1):  # (True and 1.0 are 1)
                self._problem(f"{where} has iscrowd {crowd!r}; expected 0 or 1")
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
            crowd = bool(a.get("iscrowd", 0))
            seg, degenerate = None, None
            if not crowd or a.get("segmentation") is not None:
                problems = len(self._problems)
                seg, degenerate = self._check_segmentation(a["segmentation"], h, w, what)
                if len(self._problems) > problems:
                    continue
            if crowd:  # an ignore region; the box when its segmentation is missing or degenerate
                ignore.append(box)
                self._accepted(a, im, seg if seg is not None else [[box[0], box[1], box[2], box[1], box[2], box[3],
                                                                      box[0], box[3]]])
                continue
            if seg is None:
                self.skipped[degenerate] += 1
                continue
            boxes.append(box), labels.append(labels_of[a["category_id"]]), segs.append(seg), ids.append(a["id"])
            self._accepted(a, im, seg)
        return ImageRecord(
            image_id=im["id"], path=os.path.join(self.img_dir, im["file_name"]), height=h, width=w,
            boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
            segmentations=tuple(segs), ann_ids=tuple(ids), ignore_boxes=np.array(ignore, np.float32).reshape(-1, 4),
        )

    def _accepted(self, ann: dict, image: dict, segmentation) -> None:
        """Called for every annotation kept (crowd regions too) with its usable segmentation."""

    def _check_segmentation(self, seg, h: int, w: int, what: str) -> tuple[object, str | None]:
        """(the usable segmentation, None), or (None, why it is degenerate); a malformed one is
        recorded as a problem (and gives (None, None)).

        Polygons: parts under 3 points or of odd length are dropped, parts reaching more than one
        image size outside the image are clipped to that margin.
        """
        if isinstance(seg, list):
            if seg and not isinstance(seg[0], (list, tuple)):
                seg = [seg]  # a single flat polygon
            if not all(_is_numbers(p) for p in seg):
                self._problem(f"{what} has a malformed polygon (each part must be a list of numbers)")
                return None, None
            parts = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if not parts:
                return None, "polygon under 3 points"
            m = max(h, w)
            parts = [p if -m <= min(p) and max(p) <= 2 * m else clip_polygon(p, -m, -m, 2 * m, 2 * m) for p in parts]
            parts = [p for p in parts if p]
            if not parts:
                return None, "polygon outside the image"
            return parts, None
        try:
            area = self._rle_area(seg, h, w)
        except ValueError as e:
            self._problem(f"{what} {e}")
            return None, None
        if area == 0:
            return None, "empty mask"
        return seg, None

    @staticmethod
    def _rle_area(seg, h: int, w: int) -> int:
        """Foreground pixels of the RLE ``seg`` of an h x w image; a ValueError says what is malformed."""
        if not isinstance(seg, dict):
            raise ValueError(f"has a malformed segmentation of type {type(seg).__name__}")
        if "counts" not in seg or "size" not in seg:
            raise ValueError("has an RLE without 'counts'/'size'")
        if seg["size"] != [h, w]:
            raise ValueError(f"has an RLE of size {seg['size']!r}, image is {[h, w]}")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed: run lengths, background first
            if not _is_numbers(counts):
                raise ValueError("has malformed RLE counts (not a list of numbers)")
            runs = np.asarray(counts, np.float64)
            if len(runs) and (runs.min() < 0 or (runs != np.floor(runs)).any()):
                raise ValueError("has malformed RLE counts (runs must be whole numbers >= 0)")
            if runs.sum() != h * w:
                raise ValueError(f"has malformed RLE counts (sum {runs.sum():g}, the image has {h * w} pixels)")
            return int(runs[1::2].sum())
        if not isinstance(counts, (str, bytes)):
            raise ValueError(f"has malformed RLE counts of type {type(counts).__name__}")
        return int(_rle_string_counts(counts, h, w)[1::2].sum())

    def validate_images(self, threads: int = 8) -> list[str]:
        """Check every image file; all problems at once, one line each naming the image id and path.

        Catches missing and empty files, files that are not images, truncated files (PNGs are
        verified chunk by chunk up to IEND, other formats decoded, JPEG at 1/8 scale, which still
        reads the whole file), images over the pixel limit and sizes unlike the json. About 1 ms a
        COCO image, in ``threads`` threads (PIL releases the GIL while decoding).
        """
        with ThreadPoolExecutor(threads) as pool:
            problems = pool.map(lambda r: image_file_problem(r.path, r.image_id, r.height, r.width), self.records)
            return [p for p in problems if p]


class CocoGroundTruth(CocoAnnotations):
    """The annotations :class:`CocoAnnotations` keeps, as a COCO dict for ``COCOeval`` (``dataset``).

    The same checks, skips and warning as the loader; the file's image ids, category ids and
    names, file names, boxes and areas are kept. What changes: annotation ids are 1..N in file
    order (pycocotools counts a detection matched to annotation id 0 as a false positive); polygons
    keep their usable parts (clipped far outside the image, see the module docstring); image sizes
    and RLE sizes are integers; ``iscrowd`` is 0 or 1; a missing or non-numeric ``area`` is the
    mask's pixel count; a crowd region without a usable segmentation is its box (clipped to the image).
    """

    def __init__(self, ann_file: str | os.PathLike | dict):
        self._annotations: list[dict] = []
        super().__init__(ann_file, img_dir="")
        self.dataset = {
            "images": [{"id": r.image_id, "file_name": r.path, "height": r.height, "width": r.width}
                       for r in self.records],
            "annotations": self._annotations,
            "categories": [{"id": c, "name": n} for c, n in zip(self.categories.cat_ids, self.categories.names)],
        }

    def _accepted(self, ann: dict, image: dict, segmentation) -> None:
        h, w = int(image["height"]), int(image["width"])
        if isinstance(segmentation, dict):
            segmentation = {"size": [h, w], "counts": segmentation["counts"]}
        area = ann.get("area")
        if not (_is_number(area) and area >= 0):
            area = float(decode_masks([segmentation], h, w).areas()[0])
        self._annotations.append({
            "id": len(self._annotations) + 1, "image_id": image["id"], "category_id": ann["category_id"],
            "bbox": [float(v) for v in ann["bbox"]], "area": area, "iscrowd": int(bool(ann.get("iscrowd", 0))),
            "segmentation": segmentation,
        })


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

