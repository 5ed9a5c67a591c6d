"""Game scenes composited from sprite artwork, with exact instance masks (the real-art dev set's maker).

Input: RGBA artwork in memory (``frames``: name -> uint8 (h, w, 4)), a table of :class:`Design` s
(one drawn object: a character, a key of one colour, ... with its animation frames) grouped into
categories, background tiles and unannotated clutter. ``datamodules/real_art.py`` reads these
from a wheel; the composer knows nothing of where they come from.

Artwork becomes pixel art the way a game would draw it at a small size:

1. :func:`pixelate`: the frame is cut to its opaque extent and area-averaged (premultiplied alpha)
   so its longer side is ``long_side`` px (8 to 32); alpha is thresholded at one half, so every
   pixel is fully opaque or fully transparent, and the colours of a frame are reduced to at most
   ``PALETTE`` (median cut, no dithering), as sprite palettes are.
2. The sprite is mirrored at random and upscaled 1x to 4x by pixel repetition (hard edges).
3. Scenes: a background (terrain tiles, a flat colour, blocky noise or horizontal bands) with a few
   clutter sprites that are part of the scenery (not annotated), then 4 to 14 sprites. Later
   sprites cover earlier ones; a placement that would leave an instance (or itself, at the border)
   with less than ``MIN_VISIBLE_FRACTION`` of its pixels or fewer than ``MIN_VISIBLE_PIXELS`` is
   redrawn, so every painted sprite is annotated and every annotation is visible.

An instance's mask is exactly its visible opaque pixels (an owner map records which instance
painted each pixel last). Image ``i`` of a split is drawn from ``default_rng([seed, split_code, i])``,
so the output does not depend on how many images are made, and one seed gives identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .sprites import mask_annotation, split_paths

PALETTE = 16  # colours per sprite frame
MIN_VISIBLE_FRACTION = 0.4  # of the sprite's own opaque pixels
MIN_VISIBLE_PIXELS = 16
LONG_SIDE = (8, 32)  # native long side (px) before the nearest upscale, inclusive
SCALES, SCALE_P = (1, 2, 3, 4), (0.45, 0.3, 0.15, 0.1)
MAX_SIDE = 96  # long side after the upscale
SPRITES_PER_IMAGE = (4, 14)
BACKGROUNDS = ("tiles", "solid", "noise", "bands")


@dataclass(frozen=True)
class Design:
    """One drawn object of a category, with all its frames (names in ``frames``, e.g. wheel members)."""

    name: str
    category: str
    frames: tuple[str, ...]


@dataclass
class SceneInstance:
    category: int  # index into the categories list
    design: str
    mask: np.ndarray  # (H, W) bool: the instance's visible pixels


def pixelate(rgba: np.ndarray, long_side: int, palette: int = PALETTE) -> np.ndarray | None:
    """uint8 (h, w, 4) artwork -> uint8 (h', w', 4) sprite, max(h', w') == long_side, alpha 0 or 255.

    Area averaging of premultiplied colour, alpha >= 0.5 opaque, colours of the opaque pixels
    reduced to ``palette`` by median cut (unchanged when they are already that few).
    None when nothing stays opaque (a hairline frame at a tiny size).
    """
    alpha = rgba[..., 3]
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if not len(rows):
        return None
    crop = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    h, w = crop.shape[:2]
    s = long_side / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    a = crop[..., 3] / 255
    planes = [crop[..., c] * a for c in range(3)] + [a]  # premultiplied rgb, alpha

    def area(x: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(x, mode="F").resize((nw, nh), Image.BOX))

    small = [area(p) for p in planes]
    opaque = small[3] >= 0.5  # (nh, nw)
    if not opaque.any():
        return None
    rgb = np.stack(small[:3], -1) / np.maximum(small[3], 1e-6)[..., None]
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)  # (nh, nw, 3)
    pixels = rgb[opaque]  # (P, 3)
    if len(np.unique(pixels, axis=0)) > palette:
        strip = Image.fromarray(pixels[None])  # (1, P, 3)
        reduced = strip.quantize(palette, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        rgb[opaque] = np.asarray(reduced.convert("RGB"))[0]
    out = np.zeros((nh, nw, 4), np.uint8)
    out[..., :3] = np.where(opaque[..., None], rgb, 0)
    out[..., 3] = opaque * 255
    return out


def _upscale(sprite: np.ndarray, k: int) -> np.ndarray:
    return sprite.repeat(k, 0).repeat(k, 1)


def _draw_sprite(rng: np.random.Generator, art: np.ndarray, long_side: tuple[int, int] = LONG_SIDE,
                 scales: tuple[int, ...] = SCALES, scale_p: tuple[float, ...] = SCALE_P,
                 max_side: int = MAX_SIDE) -> np.ndarray | None:
    """A random-size, maybe mirrored, nearest-upscaled pixel sprite (h, w, 4) of one frame."""
    n = int(rng.integers(long_side[0], long_side[1] + 1))
    k = int(rng.choice(scales, p=scale_p))
    k = max(1, min(k, max_side // n))
    sprite = pixelate(art, n)
    if sprite is None:
        return None
    if rng.random() < 0.5:
        sprite = sprite[:, ::-1]
    return _upscale(sprite, k)


# ----------------------------------------------------------------------------- backgrounds

def _background(rng: np.random.Generator, h: int, w: int, tiles: list[np.ndarray]) -> np.ndarray:
    """uint8 (h, w, 3) scenery: terrain tiles, a flat colour, blocky noise or colour bands."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] if tiles else BACKGROUNDS[1 + int(rng.integers(3))]
    base = rng.integers(0, 256, 3)
    if kind == "solid":
        return np.broadcast_to(base.astype(np.uint8), (h, w, 3)).copy()
    if kind == "noise":  # a few jittered colours in square cells: dithered ground, starfields
        cell = int(rng.choice([2, 4, 8, 16]))
        colours = np.clip(base + rng.integers(-40, 41, (int(rng.integers(2, 6)), 3)), 0, 255).astype(np.uint8)
        grid = colours[rng.integers(0, len(colours), (h // cell + 1, w // cell + 1))]
        return np.ascontiguousarray(_upscale(grid, cell)[:h, :w])
    if kind == "bands":  # sky gradient in hard steps
        n = int(rng.integers(3, 9))
        top, bottom = base, rng.integers(0, 256, 3)
        colours = np.round(top + (bottom - top) * np.linspace(0, 1, n)[:, None]).astype(np.uint8)  # (n, 3)
        rows = colours[np.minimum(np.arange(h) * n // h, n - 1)]  # (h, 3)
        return np.ascontiguousarray(np.broadcast_to(rows[:, None], (h, w, 3)))
    out = np.broadcast_to(base.astype(np.uint8), (h, w, 3)).copy()  # under tiles with transparent parts
    for layer in range(int(rng.integers(1, 3))):  # a main terrain, maybe a ground strip of another
        tile = pixelate(tiles[int(rng.integers(len(tiles)))], int(rng.choice([8, 12, 16, 24, 32])))
        if tile is None:
            continue
        tile = _upscale(tile, int(rng.integers(1, 3)))
        th, tw = tile.shape[:2]
        oy, ox = int(rng.integers(th)), int(rng.integers(tw))
        sheet = np.tile(tile, (h // th + 2, w // tw + 2, 1))[oy:oy + h, ox:ox + w]  # (h, w, 4)
        paint = sheet[..., 3] > 0
        if layer == 1:  # the ground strip covers the bottom sixth to half
            paint[:h - int(rng.integers(h // 6, h // 2))] = False
        out[paint] = sheet[..., :3][paint]
    return out


def _paste(canvas: np.ndarray, sprite: np.ndarray, x0: int, y0: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Paint the opaque pixels of ``sprite`` at (x0, y0) (may hang over the border).

    Returns the frame window (rows, cols) and the opaque pixels of the sprite inside it, (wh, ww) bool.
    """
    h, w = canvas.shape[:2]
    sh, sw = sprite.shape[:2]
    iy, ix = slice(max(y0, 0), min(y0 + sh, h)), slice(max(x0, 0), min(x0 + sw, w))
    part = sprite[iy.start - y0:iy.stop - y0, ix.start - x0:ix.stop - x0]
    opaque = part[..., 3] > 0
    canvas[iy, ix][opaque] = part[..., :3][opaque]
    return (iy, ix), opaque


# ----------------------------------------------------------------------------------- scenes

def compose_scene(rng: np.random.Generator, size: tuple[int, int], categories: list[str], designs: list[Design],
                  frames: dict[str, np.ndarray], tiles: list[np.ndarray], clutter: list[np.ndarray],
                  count: tuple[int, int] = SPRITES_PER_IMAGE) -> tuple[np.ndarray, list[SceneInstance]]:
    """One scene: uint8 (H, W, 3) image and its instances (masks = visible opaque pixels, disjoint).

    Sprites are drawn class-balanced: a category uniformly among those that have designs here,
    then a design of it, then a frame of the design.
    """
    h, w = size
    image = _background(rng, h, w, tiles)
    for _ in range(int(rng.integers(0, 4)) if clutter else 0):  # scenery: not annotated
        sprite = _draw_sprite(rng, clutter[int(rng.integers(len(clutter)))])
        if sprite is not None:
            sh, sw = sprite.shape[:2]
            _paste(image, sprite, int(rng.integers(-sw // 2, w)), int(rng.integers(-sh // 2, h)))
    by_category: dict[str, list[Design]] = {}
    for d in designs:
        by_category.setdefault(d.category, []).append(d)
    present = [c for c in categories if c in by_category]
    owner = np.full((h, w), -1, np.int32)  # instance that painted each pixel last
    full, visible, chosen = [], [], []  # per instance: opaque pixels, visible pixels, (category, design)
    wanted = int(rng.integers(count[0], count[1] + 1))
    for _ in range(4 * wanted):
        if len(chosen) == wanted:
            break
        category = present[int(rng.integers(len(present)))]
        design = by_category[category][int(rng.integers(len(by_category[category])))]
        sprite = _draw_sprite(rng, frames[design.frames[int(rng.integers(len(design.frames)))]])
        if sprite is None:
            continue
        sh, sw = sprite.shape[:2]
        x0 = int(rng.integers(-sw // 3, w - 2 * sw // 3 + 1))
        y0 = int(rng.integers(-sh // 3, h - 2 * sh // 3 + 1))
        own = int(np.count_nonzero(sprite[..., 3]))
        iy, ix = slice(max(y0, 0), min(y0 + sh, h)), slice(max(x0, 0), min(x0 + sw, w))
        opaque = sprite[iy.start - y0:iy.stop - y0, ix.start - x0:ix.stop - x0, 3] > 0
        shown = int(np.count_nonzero(opaque))
        taken = np.bincount(owner[iy, ix][opaque] + 1, minlength=len(chosen) + 1)[1:]  # pixels each loses
        left = np.asarray(visible, np.int64) - taken
        if not _enough(shown, own) or not all(_enough(v, f) for v, f in zip(left, full)):
            continue
        _paste(image, sprite, x0, y0)
        owner[iy, ix][opaque] = len(chosen)
        visible = list(left) + [shown]
        full.append(own)
        chosen.append((categories.index(category), design.name))
    instances = [SceneInstance(c, d, owner == i) for i, (c, d) in enumerate(chosen)]
    return image, instances


def _enough(visible: int, full: int) -> bool:
    return visible >= MIN_VISIBLE_PIXELS and visible >= MIN_VISIBLE_FRACTION * full


def write_split(out_dir: str | Path, split: str, split_code: int, num_images: int, seed: int, size: tuple[int, int],
                categories: list[str], designs: list[Design], frames: dict[str, np.ndarray],
                tiles: list[np.ndarray], clutter: list[np.ndarray], info: dict | None = None) -> Path:
    """Write ``out_dir/<split>/NNNNNN.png`` and ``out_dir/annotations/<split>.json`` (COCO, RLE masks).

    Image ids 1..num_images; each annotation carries its ``design`` name besides the COCO keys.
    Returns the annotation file.
    """
    ann_file, img_dir = split_paths(out_dir, split)
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, instances = compose_scene(np.random.default_rng([seed, split_code, index]), size, categories,
                                         designs, frames, tiles, clutter)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(img_dir / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": size[0], "width": size[1]})
        for inst in instances:
            entry = mask_annotation(inst.mask, inst.category, index + 1, len(annotations) + 1)
            entry["design"] = inst.design
            annotations.append(entry)
    coco = {"info": dict(info or {}, split=split, seed=seed),
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "sprite"} for i, n in enumerate(categories)]}
    ann_file.write_text(json.dumps(coco, separators=(",", ":")))
    return ann_file
