"""Detect and cut out instances in images: overlays, COCO-style results and one RGBA cut-out per instance.

    python -m experiments.predict --ckpt PATH --input IMG_OR_DIR --output DIR [--score-thr 0.3]
        [--img-size 640] [--nearest | --no-nearest] [--size tiny] [--batch-size 4] [--device cpu]
        [--fuse] [--compile] [--tile-size auto|none|N] [--tile-overlap 0.2] [--whole-image] [--max-det K]
        [--refine-masks] [--upscale K]

Writes into DIR:

* ``overlays/<name>.png``: the image with masks tinted per class, boxes and "class score" labels;
* ``cutouts/<name>/<name>_<k>_<class>.png``: instance k (by descending score) as RGBA, the original
  pixels with the mask as alpha (times the image's own alpha), cropped to the mask's tight box;
* ``results.json``: a COCO results list over all images (``image_id`` = position in the sorted
  input list, ``file_name``, ``category_id`` = contiguous label 0..C-1, ``category_name``, ``bbox``
  [x, y, w, h], ``score``, ``segmentation`` RLE, ``area``, ``cutout`` path relative to DIR).

A folder is read non-recursively (image extensions only). Unreadable files (empty, not an image,
truncated, over the pixel limit that ``RTMDET_MAX_IMAGE_PIXELS=N`` raises) are skipped and listed
at the end; the exit status is 1 only if no image could be read. Every PIL mode is read as
``datamodules.images`` describes (multi-frame GIF/TIFF: the first frame, with a note on stderr).
Input size and resize mode default to those the checkpoint was validated with (Lightning
checkpoints), else 640 and bilinear.

Large images (screenshots, sprite sheets): by default (``--tile-size auto``) an image larger than
the input size is predicted in overlapping windows of the input size, so sprites keep the scale the
model was trained at, and the windows' detections are merged (``rtmdet/tiling.py``). Masks travel
as crops from the paste to the results and cut-outs. An image with more instances than
``--max-det`` is listed at the end with its count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules import DatasetError
from datamodules.images import load_image_noted
from rtmdet import SIZES, CheckpointError, preprocess
from experiments.errors import check_img_size
from experiments.overlay import draw_overlay
from experiments.predict_files import list_inputs, read_rgba, slug, unique_stems
from experiments.tiling_options import ImagePredictor, add_tiling_arguments, cap_report, check_tiling_arguments
from rtmdet.checkpoint import load_checkpoint
from rtmdet.inference import coco_results, cutouts
from rtmdet.refine import refine_masks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning .ckpt or official mmdetection .pth")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--score-thr", type=float, default=0.3, help="keep instances scoring at least this")
    p.add_argument("--img-size", type=int, help="network input size (default: checkpoint's, or 640)")
    p.add_argument("--nearest", action=argparse.BooleanOptionalAction,
                   help="nearest-neighbour letterbox, for pixel art (default: checkpoint's, or bilinear)")
    p.add_argument("--size", choices=list(SIZES), help="model size (default: read from the checkpoint)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fuse", action="store_true", help="fold BatchNorm into the convs (same results, faster)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (pays off over many images; the first batch compiles)")
    p.add_argument("--refine-masks", action="store_true",
                   help="snap masks to the image's pixel-art colours (rtmdet/refine.py; lossless pixel art)")
    add_tiling_arguments(p, default_tile="auto")
    return p


def predict(args: argparse.Namespace) -> tuple[list[dict], list[tuple[str, str]], int]:
    """Returns (results entries, failures [(file, reason)], number of images processed).

    Also sets ``args.capped``: [(file name, Prediction)] of the images that hit ``--max-det``.
    """
    files = list_inputs(Path(args.input))
    loaded = load_checkpoint(args.ckpt, args.size, device=args.device)
    model = loaded.model
    if args.fuse:
        model.fuse()
    if args.compile:
        model.compile()
    # A threshold commutes with NMS: filter before it. Masks as crops: no (N, H, W) original-size stack.
    postprocess = loaded.postprocess(score_thr=args.score_thr, mask_format="crops")
    img_size = args.img_size or loaded.img_size or 640
    nearest = args.nearest if args.nearest is not None else bool(loaded.nearest_resize)
    predictor = ImagePredictor(model, postprocess, img_size, nearest, args, args.device)
    names = list(loaded.class_names or [f"class{i}" for i in range(model.num_classes)])
    out_dir = Path(args.output)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    stems = unique_stems(files)
    results, failures, done, args.capped = [], [], 0, []
    batch: list[tuple[int, Path, np.ndarray]] = []

    def save(image_id: int, path: Path, image: np.ndarray, p) -> None:
        nonlocal done
        if args.refine_masks:
            p.pred["masks"] = refine_masks(image, p.pred["masks"], p.pred["boxes"])
        results.extend(_save_image(image_id, path, image, p.pred, stems[path], names, out_dir))
        if p.capped:
            args.capped.append((path.name, p))
        done += 1

    def flush():
        saved = 0
        try:  # one file must not end the folder: what fails here (e.g. out of memory) is listed
            for (image_id, path, image), p in zip(batch, predictor.whole([im for _, _, im in batch])):
                save(image_id, path, image, p)
                saved += 1
        except Exception as e:  # noqa: BLE001 - listed with the unreadable files
            failures.extend((str(p), f"{type(e).__name__}: {e}") for _, p, _ in batch[saved:])
        batch.clear()

    for image_id, path in enumerate(files, start=1):
        try:
            image, notes = load_image_noted(str(path), image_id)  # notes: e.g. which frame of a GIF is used
        except DatasetError as e:
            failures.append((str(path), str(e).split(": ", 1)[-1]))
            continue
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        tile = predictor.window(*image.shape[:2])
        if tile is not None:
            try:  # as for a batch: a failing image is listed, the folder goes on
                save(image_id, path, image, predictor.tiled(image, tile))
            except Exception as e:  # noqa: BLE001
                failures.append((str(path), f"{type(e).__name__}: {e}"))
            continue
        batch.append((image_id, path, image))
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    (out_dir / "results.json").write_text(json.dumps(results))
    return results, failures, done


def _save_image(image_id: int, path: Path, image: np.ndarray, pred: dict, stem: str, names: list[str],
                out_dir: Path) -> list[dict]:
    """Overlay and cut-outs of one image; returns its results entries."""
    entries = coco_results(pred, image_id)
    pred = {k: v.cpu() if k == "masks" else v.cpu().numpy() for k, v in pred.items()}
    draw_overlay(image, pred, names).save(out_dir / "overlays" / f"{stem}.png")
    source = image
    if len(entries):
        rgba = read_rgba(path)
        source = rgba if rgba is not None and rgba.shape[:2] == image.shape[:2] else image
    cuts = cutouts(source, pred["masks"]) if entries else []
    for k, (entry, cut) in enumerate(zip(entries, cuts)):
        label = int(pred["labels"][k])
        entry.update(file_name=path.name, category_name=names[label], cutout=None)
        if cut is not None:
            rel = Path("cutouts") / stem / f"{stem}_{k:03d}_{slug(names[label])}.png"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(cut[0], "RGBA").save(out_dir / rel)
            entry["cutout"] = rel.as_posix()
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_img_size(parser, args.img_size, "--img-size")
    check_tiling_arguments(parser, args)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    start = time.time()
    try:
        results, failures, done = predict(args)
    except (CheckpointError, DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    num_cutouts = sum(r["cutout"] is not None for r in results)
    print(f"{done} image(s), {len(results)} instance(s) at score >= {args.score_thr}, {num_cutouts} cut-out(s) "
          f"in {time.time() - start:.1f} s -> {args.output} (overlays/, cutouts/, results.json)")
    if args.capped:
        print(f"{len(args.capped)} image(s) had more instances than --max-det:", file=sys.stderr)
        print("\n".join(cap_report(args.capped)), file=sys.stderr)
    if failures:
        print(f"{len(failures)} file(s) could not be read:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 1 if done == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
