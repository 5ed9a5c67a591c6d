"""Procedural pixel-art sprites: a deterministic COCO instance-segmentation dataset.

The embedded default dataset: ``python -m experiments.train`` trains on it when no data is given,
on a fresh machine with nothing downloaded. The task mirrors the real use case (find every sprite
in game art with class, box and pixel mask) at a size a tiny detector learns in minutes on a CPU.

Classes (``category_id`` = 1 + index in ``CLASSES``); shape family and palette identify each one,
a random bitmap, colour jitter and size vary within it:

1. ``invader`` - random left-right-mirrored bitmap creature, magenta / lime / orange, dark eyes.
2. ``heart``   - implicit heart curve, red or pink, dark outline and a white glint.
3. ``coin``    - gold disc, sometimes squashed (spinning), embossed ring and shine.
4. ``potion``  - round glass flask with a neck and a cork, partly filled with coloured liquid.
5. ``sword``   - diagonal steel blade, gold cross-guard, brown grip.
6. ``tree``    - round or pine canopy in greens, shaded, on a brown trunk.
7. ``block``   - full square tile: brick, crate or bevelled stone, dark outline.
8. ``gem``     - cut diamond (crown + pavilion facets) in cyan / blue / violet.

Sprites are drawn at native size (about 6-17 px), mirrored at random, scaled by an integer factor
(nearest neighbour, x1..x6 depending on image size) and pasted onto a flat, checker, banded,
dithered or brick background. Later sprites occlude earlier ones, so masks never overlap; sprites
may hang over the image border (masks clipped). An instance is dropped when less than
``MIN_VISIBLE_FRACTION`` of its pixels (or fewer than ``MIN_VISIBLE_PIXELS``) remain visible.

Layout written by ``generate_sprite_dataset(out_dir, ..., split_name="train")``::

    out_dir/train/000000.png ...           RGB, file_name in the json is relative to out_dir/train
    out_dir/annotations/train.json         COCO: images, annotations (compressed RLE), categories

Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so it does not depend on how
many images are generated, and the same seed gives byte-identical json and PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from rtmdet.crop_masks import tight_box
from rtmdet.inference import mask_rles

# Bump when the drawing code or the defaults below change: the cache folder is named after it.
GENERATOR_VERSION = "v1"
DEFAULT_TRAIN_IMAGES = 400
DEFAULT_VAL_IMAGES = 60
DEFAULT_IMAGE_SIZE = 256
DEFAULT_TRAIN_SEED, DEFAULT_VAL_SEED = 0, 1
MIN_VISIBLE_FRACTION = 0.3  # of the sprite's full (unclipped, unoccluded) pixel count
MIN_VISIBLE_PIXELS = 24
MAX_SCALE = 6

Sprite = tuple[np.ndarray, np.ndarray]  # rgb (h, w, 3) float in [0, 255], alpha (h, w) bool
BAYER4 = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]) / 16 + 1 / 32


# ---------------------------------------------------------------- colour and shape helpers

def _jitter(rng: np.random.Generator, base, spread: float = 18.0) -> np.ndarray:
    """A palette colour with brightness and per-channel jitter, (3,) float."""
    c = np.asarray(base, float) * rng.uniform(0.85, 1.15) + rng.uniform(-spread, spread, 3)
    return np.clip(c, 0, 255)


def _shade(c: np.ndarray, f: float) -> np.ndarray:
    """f < 1 darkens towards black, f > 1 lightens towards white."""
    return c * f if f <= 1 else c + (255 - c) * (f - 1)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (h, w) float."""
    y, x = np.mgrid[0:h, 0:w]
    return y + 0.5, x + 0.5


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it: the one-pixel outline."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _canvas(h: int, w: int) -> Sprite:
    return np.zeros((h, w, 3)), np.zeros((h, w), bool)


def _paint(sprite: Sprite, region: np.ndarray, colour: np.ndarray) -> None:
    sprite[0][region] = colour
    sprite[1][region] = True


# ---------------------------------------------------------------- the eight sprite families

def draw_invader(rng: np.random.Generator) -> Sprite:
    h, half, odd = int(rng.integers(7, 12)), int(rng.integers(4, 7)), int(rng.integers(2))
    left = rng.random((h, half)) < 0.5
    left[1:-1, -2:] |= rng.random((h - 2, 2)) < 0.85  # a dense spine keeps the creature in one piece
    body = np.concatenate([left, left[:, ::-1][:, odd:]], axis=1)  # odd width shares the centre column
    s = _canvas(*body.shape)
    _paint(s, body, _jitter(rng, [(230, 70, 210), (150, 240, 60), (255, 140, 40)][rng.integers(3)]))
    eyes = np.zeros_like(body)
    eyes[h // 3, [half - 3, body.shape[1] - half + 2]] = True
    _paint(s, eyes, _jitter(rng, (20, 20, 30), 10))
    return s


def draw_heart(rng: np.random.Generator) -> Sprite:
    n = int(rng.integers(7, 14))
    y, x = _grid(n, n + int(rng.integers(0, 2)))
    x, y = (x / x.shape[1] - 0.5) * 2.5, 1.35 - y / n * 2.6
    body = (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0  # the classic implicit heart curve
    s = _canvas(*body.shape)
    c = _jitter(rng, [(225, 35, 55), (255, 110, 160)][rng.integers(2)])
    _paint(s, body, c)
    _paint(s, _edge(body), _shade(c, 0.45))
    _paint(s, body & ((x + 0.5) ** 2 + (y - 0.55) ** 2 < 0.06), _shade(c, 1.8))
    return s


def draw_coin(rng: np.random.Generator) -> Sprite:
    d = int(rng.integers(8, 15))
    w = max(4, int(round(d * rng.choice([1.0, 1.0, 0.75, 0.5]))))  # squashed = seen spinning
    y, x = _grid(d, w)
    r = ((y - d / 2) / (d / 2)) ** 2 + ((x - w / 2) / (w / 2)) ** 2
    body = r <= 1.0
    s = _canvas(d, w)
    c = _jitter(rng, (250, 200, 40), 12)
    _paint(s, body, c)
    _paint(s, _edge(r <= 0.45), _shade(c, 0.75))  # embossed inner ring
    _paint(s, _edge(body), _shade(c, 0.55))
    _paint(s, body & (np.abs(y - x * d / w + d * 0.25) < 0.8) & (r < 0.7), _shade(c, 1.7))  # shine
    return s


def draw_potion(rng: np.random.Generator) -> Sprite:
    w = int(rng.integers(8, 13))
    h = w + int(rng.integers(3, 6))
    y, x = _grid(h, w)
    r, cy = w / 2, h - w / 2
    flask = (y - cy) ** 2 + (x - r) ** 2 <= r**2
    neck_w = rng.integers(2, 4) / 2 + 0.5
    neck = (np.abs(x - r) <= neck_w) & (y < cy)
    s = _canvas(h, w)
    glass = _jitter(rng, (205, 225, 245), 10)
    _paint(s, flask | neck, glass)
    liquid = flask & (y > cy - r * rng.uniform(-0.3, 0.6))
    _paint(s, liquid, _jitter(rng, [(220, 40, 90), (60, 200, 90), (70, 110, 240), (170, 70, 220)][rng.integers(4)]))
    _paint(s, _edge(flask | neck), _shade(glass, 0.45))
    _paint(s, neck & (y < 2.0), _jitter(rng, (140, 90, 45), 12))  # cork
    _paint(s, flask & (np.abs(x - r * 0.55) < 0.6) & (np.abs(y - cy + r * 0.2) < r * 0.3), _shade(glass, 1.6))
    return s


def draw_sword(rng: np.random.Generator) -> Sprite:
    n = int(rng.integers(10, 17))
    y, x = np.mgrid[0:n, 0:n]
    off, along = x + y - (n - 1), y - x  # across and along the blade (top-right tip to bottom-left)
    g = n * rng.uniform(0.15, 0.35)  # cross-guard position along the blade, from the grip end
    blade = (off >= -1) & (off <= 0) & (along < g)
    guard = (np.abs(along - g) <= 1) & (np.abs(off) <= 2 + n // 8)
    grip = (off >= -1) & (off <= 0) & (along > g + 1)
    s = _canvas(n, n)
    steel = _jitter(rng, (195, 200, 215), 10)
    _paint(s, blade, steel)
    _paint(s, blade & (off == 0), _shade(steel, 1.5))
    _paint(s, grip, _jitter(rng, (120, 70, 35), 12))
    _paint(s, guard, _jitter(rng, (230, 180, 50), 12))
    return s


def draw_tree(rng: np.random.Generator) -> Sprite:
    w = int(rng.integers(9, 15))
    h = w + int(rng.integers(2, 4))
    y, x = _grid(h, w)
    trunk_h = max(2, h - w)
    if rng.random() < 0.5:  # round canopy: a big blob with two side lobes
        ch = h - trunk_h + 1
        canopy = ((y - ch * 0.45) / (ch * 0.47)) ** 2 + ((x - w / 2) / (w * 0.5)) ** 2 <= 1
    else:  # pine: three stacked triangles
        tier = (h - trunk_h + 1) / 3
        half = (0.35 + 0.65 * ((y % tier) / tier)) * (0.5 + 0.5 * np.floor(y / tier) / 2) * w / 2
        canopy = (np.abs(x - w / 2) <= half) & (y < h - trunk_h + 1)
    trunk = (np.abs(x - w / 2) <= 1.0 + (w > 11)) & (y >= h - trunk_h) & ~canopy
    s = _canvas(h, w)
    green = _jitter(rng, [(50, 160, 60), (30, 110, 70)][rng.integers(2)], 14)
    _paint(s, canopy, green)
    _paint(s, canopy & (x - w / 2 + y > h * 0.45), _shade(green, 0.7))
    _paint(s, canopy & ((x - w * 0.35) ** 2 + (y - h * 0.25) ** 2 < 2), _shade(green, 1.35))
    _paint(s, trunk, _jitter(rng, (120, 75, 35), 12))
    return s


def draw_block(rng: np.random.Generator) -> Sprite:
    n = int(rng.integers(8, 17))
    y, x = np.mgrid[0:n, 0:n]
    full = np.ones((n, n), bool)
    kind = int(rng.integers(3))
    c = _jitter(rng, [(180, 80, 50), (170, 120, 60), (130, 130, 140)][kind], 12)
    s = _canvas(n, n)
    _paint(s, full, c)
    if kind == 0:  # bricks: mortar lines, every other row offset by half a brick
        _paint(s, (y % 4 == 0) | ((x + 3 * (y // 4 % 2)) % 6 == 0), _shade(c, 1.45))
    elif kind == 1:  # crate: a frame and a diagonal brace
        _paint(s, (x <= 1) | (y <= 1) | (x >= n - 2) | (y >= n - 2) | (np.abs(x - y) <= 0), _shade(c, 0.7))
    else:  # stone: light bevel top-left, dark bottom-right
        _paint(s, (x <= 1) | (y <= 1), _shade(c, 1.5))
        _paint(s, ((x >= n - 2) | (y >= n - 2)) & (x + y > 2), _shade(c, 0.6))
    _paint(s, _edge(full), _shade(c, 0.35))
    return s


def draw_gem(rng: np.random.Generator) -> Sprite:
    w = int(rng.integers(8, 15))
    h = max(6, int(round(w * rng.uniform(0.8, 1.05))))
    y, x = _grid(h, w)
    t = h * 0.33  # crown height
    u = np.abs(x - w / 2) / (w / 2)
    crown = (y < t) & (u <= 0.6 + 0.4 * y / t)
    pavilion = (y >= t) & (u + (y - t) / (h - t) <= 1.0)
    body = crown | pavilion
    s = _canvas(h, w)
    c = _jitter(rng, [(60, 220, 230), (70, 110, 250), (170, 80, 240)][rng.integers(3)])
    _paint(s, crown, _shade(c, 1.3))
    _paint(s, pavilion, c)
    _paint(s, pavilion & (x > w / 2) & (u * (h - t) > (y - t) * 0.3), _shade(c, 0.7))
    _paint(s, _edge(body), _shade(c, 0.4))
    _paint(s, crown & (np.abs(x - w * 0.35) < 0.6) & (y > 1), _shade(c, 1.8))
    return s


SPRITES: dict[str, Callable[[np.random.Generator], Sprite]] = {
    "invader": draw_invader, "heart": draw_heart, "coin": draw_coin, "potion": draw_potion,
    "sword": draw_sword, "tree": draw_tree, "block": draw_block, "gem": draw_gem,
}
CLASSES: tuple[str, ...] = tuple(SPRITES)


def draw_sprite(name: str, rng: np.random.Generator) -> Sprite:
    """Draw one sprite of class ``name``, cropped to the tight extent of its alpha."""
    rgb, alpha = SPRITES[name](rng)
    x0, y0, x1, y1 = tight_box(alpha)
    return rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1]


# ---------------------------------------------------------------- backgrounds and images

def _bg_colour(rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0, 255, 3)
    c = c.mean() + (c - c.mean()) * rng.uniform(0.2, 0.8)  # muted
    return c * rng.uniform(0.35, 1.0)


def draw_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Flat, checker, banded gradient, ordered dither or brick wall: (h, w, 3) float."""
    c0 = _bg_colour(rng)
    c1 = _bg_colour(rng) if rng.random() < 0.5 else np.clip(c0 + rng.normal(0, 30, 3), 0, 255)
    y, x = np.mgrid[0:h, 0:w]
    if rng.random() < 0.5:
        y, x = x, y  # patterns run either way
    kind = int(rng.integers(5))
    if kind == 0:
        t = np.zeros((h, w))
    elif kind == 1:
        cell = int(rng.integers(8, 33))
        t = (y // cell + x // cell) % 2
    elif kind == 2:
        n = int(rng.integers(3, 9))
        t = np.floor(y / (y.max() + 1) * n) / (n - 1)
    elif kind == 3:
        p = int(rng.integers(1, 4))  # dither pixel size
        ny, nx = h // 8 + 2, w // 8 + 2
        noise = np.kron(rng.random((ny, nx)), np.ones((8, 8)))[:h, :w]
        t = (0.7 * y / (y.max() + 1) + 0.3 * noise > BAYER4[(y // p) % 4, (x // p) % 4]).astype(float)
    else:
        bh, lw = int(rng.integers(6, 17)), int(rng.integers(1, 3))
        t = ((y % bh < lw) | ((x + (y // bh % 2) * bh) % (2 * bh) < lw)).astype(float)
    return c0 + t[..., None] * (c1 - c0)


def render_image(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene. Returns image (H, W, 3) uint8 RGB, masks (N, H, W) bool (disjoint), labels (N,) int64
    0-based indices into ``CLASSES``, in paint order (back to front)."""
    h, w = size
    assert min(h, w) >= 32, f"image size {size} is too small to hold a sprite"
    image = draw_background(rng, h, w)
    owner = np.full((h, w), -1, np.int32)  # index of the sprite that is visible at each pixel
    crowded = rng.random() < 0.15
    count = int(rng.integers(10, 21) if crowded else rng.integers(1, 9))
    labels, full_area = [], []
    for i in range(count):
        label = int(rng.integers(len(CLASSES)))
        rgb, alpha = draw_sprite(CLASSES[label], rng)
        if rng.random() < 0.5:
            rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
        top = max(1, min(MAX_SCALE, int(min(h, w) / (2.5 * max(alpha.shape)))))
        if crowded:
            top = min(top, 3)
        k = int(rng.integers(min(2, top), top + 1))
        rgb, alpha = rgb.repeat(k, 0).repeat(k, 1), alpha.repeat(k, 0).repeat(k, 1)  # nearest upscale
        sh, sw = alpha.shape
        # at least 60% of the sprite's extent lies inside the image along each axis
        y0 = int(rng.integers(-int(0.4 * sh), h - int(0.6 * sh) + 1))
        x0 = int(rng.integers(-int(0.4 * sw), w - int(0.6 * sw) + 1))
        iy, ix = slice(max(y0, 0), min(y0 + sh, h)), slice(max(x0, 0), min(x0 + sw, w))
        sy, sx = slice(iy.start - y0, iy.stop - y0), slice(ix.start - x0, ix.stop - x0)
        a = alpha[sy, sx]
        image[iy, ix][a] = rgb[sy, sx][a]
        owner[iy, ix][a] = i
        labels.append(label)
        full_area.append(int(alpha.sum()))
    masks = owner[None] == np.arange(count)[:, None, None]  # (N, H, W)
    visible = masks.sum((1, 2))
    keep = (visible >= MIN_VISIBLE_FRACTION * np.array(full_area)) & (visible >= MIN_VISIBLE_PIXELS)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, masks[keep], np.array(labels, np.int64)[keep]


# ---------------------------------------------------------------- COCO files

def mask_annotation(mask: np.ndarray, label: int, image_id: int, ann_id: int) -> dict:
    """COCO annotation of one (H, W) bool mask: compressed RLE, tight bbox, area; ``category_id`` = label + 1."""
    rle = mask_rles(mask[None])[0]
    x0, y0, x1, y1 = tight_box(mask)
    bbox = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    return {"id": ann_id, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
            "area": int(mask.sum()), "bbox": bbox,
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}}


def split_paths(out_dir: str | Path, split_name: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of one split in the layout of the module docstring."""
    out_dir = Path(out_dir)
    return out_dir / "annotations" / f"{split_name}.json", out_dir / split_name


def generate_sprite_dataset(out_dir: str | Path, num_images: int, image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                            seed: int = 0, split_name: str = "train") -> Path:
    """Write ``out_dir/<split_name>/NNNNNN.png`` and ``out_dir/annotations/<split_name>.json``.

    image_size: int or (H, W). Image ids are 1..num_images, annotation ids 1..A, category ids 1..8.
    Returns the annotation file path.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    ann_file, img_dir = split_paths(out_dir, split_name)
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, masks, labels = render_image(np.random.default_rng([seed, index]), (h, w))
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(img_dir / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": h, "width": w})
        for mask, label in zip(masks, labels):
            annotations.append(mask_annotation(mask, int(label), index + 1, len(annotations) + 1))
    coco = {
        "info": {"description": "procedural pixel-art sprites (datamodules/sprites.py)",
                 "version": GENERATOR_VERSION, "seed": seed, "split": split_name},
        "images": images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "sprite"} for i, name in enumerate(CLASSES)],
    }
    ann_file.write_text(json.dumps(coco, separators=(",", ":")))
    return ann_file


def default_sprite_dataset(root: str | Path | None = None) -> dict[str, str]:
    """The default train/val sprite dataset under ``<root>/sprites-<version>``, generated on first use.

    root: ``$RTMDET_DATA`` if set, else ``$XDG_CACHE_HOME/rtmdet``, else ``~/.cache/rtmdet``.
    Returns ``train_ann_file``, ``train_img_dir``, ``val_ann_file``, ``val_img_dir`` (str paths).

    Generation goes to a hidden temp folder beside the target, renamed into place only when complete,
    so an interrupted run never looks complete. When several processes (e.g. DDP ranks) generate at
    once, the first rename wins and the others discard their copy.
    """
    if root is None:
        root = os.environ.get("RTMDET_DATA") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rtmdet"
    folder = Path(root).expanduser() / f"sprites-{GENERATOR_VERSION}"
    paths = {f"{split}_{key}": str(path) for split in ("train", "val")
             for key, path in zip(("ann_file", "img_dir"), split_paths(folder, split))}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published dataset should not be
    try:
        _write_default(tmp)
        try:
            os.rename(tmp, folder)  # atomic; fails if another process already put a non-empty folder there
        except OSError:
            if not all(Path(p).exists() for p in paths.values()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _write_default(folder: Path) -> None:
    generate_sprite_dataset(folder, DEFAULT_TRAIN_IMAGES, DEFAULT_IMAGE_SIZE, DEFAULT_TRAIN_SEED, "train")
    generate_sprite_dataset(folder, DEFAULT_VAL_IMAGES, DEFAULT_IMAGE_SIZE, DEFAULT_VAL_SEED, "val")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate a COCO pixel-art sprite dataset.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=DEFAULT_TRAIN_IMAGES)
    parser.add_argument("--size", type=int, nargs="+", default=[DEFAULT_IMAGE_SIZE], help="S or H W")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="split name: sub-folder and json name")
    args = parser.parse_args(argv)
    size = args.size[0] if len(args.size) == 1 else tuple(args.size[:2])
    start = time.perf_counter()
    ann = generate_sprite_dataset(args.out, args.num_images, size, args.seed, args.split)
    print(f"wrote {args.num_images} images and {ann} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
