"""Small COCO-format datasets written to a folder, for the data tests and the data benchmark.

Each instance is a random star-shaped polygon (optionally two parts) stored as a polygon, a
compressed RLE or an uncompressed RLE; its pixels are painted in the colour of its category, so
tests can check that labels follow their masks. ``bbox`` is the exact extent of the rasterised mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

FORMATS = ("polygon", "polygon2", "rle", "rle_uncompressed")


def category_colour(cat_index: int) -> tuple[int, int, int]:
    """Distinct, saturated RGB colour of a category index (0-based)."""
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (0, 0, 128), (128, 128, 0)]
    return palette[cat_index % len(palette)]


def random_polygon(rng: np.random.Generator, h: int, w: int, max_radius: float) -> list[float]:
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    n = int(rng.integers(3, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.4, 1.0, n) * max_radius
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    return np.round(pts, 2).ravel().tolist()


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths starting with a 0-run) of a (h, w) bool mask."""
    flat = mask.ravel(order="F").astype(np.int8)
    starts = np.flatnonzero(np.diff(flat)) + 1  # where a new run begins
    counts = np.diff(np.r_[0, starts, len(flat)])
    counts = np.r_[0, counts] if flat[0] else counts
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def make_coco(root: str | Path, num_images: int = 4, size: tuple[int, int] = (48, 64), instances: int = 3,
              cat_ids: tuple[int, ...] = (3, 7, 100), formats: tuple[str, ...] = FORMATS, crowd: bool = False,
              empty_images: int = 0, max_radius: float | None = None, ext: str = "png",
              seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/images/*.{ext}`` and ``root/ann.json``; returns (ann_file, img_dir).

    ``size`` is (h, w); ``instances`` per image (the last ``empty_images`` images have none);
    ``crowd`` adds one iscrowd RLE region per non-empty image.
    """
    root = Path(root)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    max_radius = max_radius or min(h, w) / 4
    images, annotations = [], []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(num_images):
        image_id = 10 + 3 * i  # ids that are not indices
        canvas = np.stack([xx * 200 // max(w, 1), yy * 200 // max(h, 1), np.full_like(xx, 40)], -1).astype(np.uint8)
        n = 0 if i >= num_images - empty_images else instances
        for k in range(n + (1 if crowd and n else 0)):
            is_crowd = k == n
            cat = int(rng.integers(len(cat_ids)))
            fmt = "rle_uncompressed" if is_crowd else formats[(i + k) % len(formats)]
            parts = [random_polygon(rng, h, w, max_radius) for _ in range(2 if fmt == "polygon2" else 1)]
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, h, w))).astype(bool)
            if not mask.any():
                continue
            if fmt.startswith("polygon"):
                seg = parts
            elif fmt == "rle":
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                seg = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                seg = uncompressed_rle(mask)
            x, y, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))).tolist()
            canvas[mask] = category_colour(cat)
            annotations.append({"id": 1000 + len(annotations), "image_id": image_id, "category_id": cat_ids[cat],
                                "bbox": [x, y, bw, bh], "area": float(mask.sum()), "iscrowd": int(is_crowd),
                                "segmentation": seg})
        file_name = f"{image_id:06d}.{ext}"
        Image.fromarray(canvas).save(img_dir / file_name, quality=90) if ext == "jpg" else \
            Image.fromarray(canvas).save(img_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    categories = [{"id": c, "name": f"class_{c}"} for c in cat_ids]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, img_dir
