"""Detect and cut out instances in images: overlays, COCO-style results and one RGBA cut-out per instance.

    python -m experiments.predict --ckpt PATH --input IMG_OR_DIR --output DIR [--score-thr 0.3]
        [--img-size 640] [--nearest | --no-nearest] [--size tiny] [--batch-size 4] [--device cpu]
        [--fuse] [--compile]

Writes into DIR:

* ``overlays/<name>.png``: the image with masks tinted per class, boxes and "class score" labels;
* ``cutouts/<name>/<name>_<k>_<class>.png``: instance k (by descending score) as RGBA, the original
  pixels with the mask as alpha (times the image's own alpha), cropped to the mask's tight box;
* ``results.json``: a COCO results list over all images (``image_id`` = position in the sorted
  input list, ``file_name``, ``category_id`` = contiguous label 0..C-1, ``category_name``, ``bbox``
  [x, y, w, h], ``score``, ``segmentation`` RLE, ``area``, ``cutout`` path relative to DIR).

A folder is read non-recursively (image extensions only). Unreadable files are skipped and listed
at the end; the exit status is 1 only if no image could be read. Input size and resize mode default
to those the checkpoint was validated with (Lightning checkpoints), else 640 and bilinear.
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

from datamodules import DatasetError, load_image
from rtmdet import SIZES, CheckpointError, preprocess
from experiments.errors import check_img_size
from experiments.overlay import draw_overlay
from experiments.predict_files import list_inputs, read_rgba, slug, unique_stems
from rtmdet.inference import coco_results, cutout, load_checkpoint


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
    return p


def predict(args: argparse.Namespace) -> tuple[list[dict], list[tuple[str, str]], int]:
    """Returns (results entries, failures [(file, reason)], number of images processed)."""
    files = list_inputs(Path(args.input))
    loaded = load_checkpoint(args.ckpt, args.size, device=args.device)
    model = loaded.model
    if args.fuse:
        model.fuse()
    if args.compile:
        model.compile()
    model.postprocess.score_thr = args.score_thr  # a threshold commutes with NMS: filter before it
    img_size = args.img_size or loaded.img_size or 640
    nearest = args.nearest if args.nearest is not None else bool(loaded.nearest_resize)
    names = list(loaded.class_names or [f"class{i}" for i in range(model.num_classes)])
    out_dir = Path(args.output)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    stems = unique_stems(files)
    results, failures, done = [], [], 0
    batch: list[tuple[int, Path, np.ndarray]] = []

    def flush():
        nonlocal done
        images, metas = preprocess([im for _, _, im in batch], img_size, nearest)
        with torch.inference_mode():
            preds = model.predict(images.to(args.device), metas)
        for (image_id, path, image), pred in zip(batch, preds):
            results.extend(_save_image(image_id, path, image, pred, stems[path], names, out_dir))
            done += 1
        batch.clear()

    for image_id, path in enumerate(files, start=1):
        try:
            batch.append((image_id, path, load_image(str(path), image_id)))
        except DatasetError as e:
            failures.append((str(path), str(e).split(": ", 1)[-1]))
            continue
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
    pred = {k: v.cpu().numpy() for k, v in pred.items()}
    draw_overlay(image, pred, names).save(out_dir / "overlays" / f"{stem}.png")
    source = image
    if len(entries):
        rgba = read_rgba(path)
        source = rgba if rgba is not None and rgba.shape[:2] == image.shape[:2] else image
    for k, entry in enumerate(entries):
        label = int(pred["labels"][k])
        entry.update(file_name=path.name, category_name=names[label], cutout=None)
        cut = cutout(source, pred["masks"][k])
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
    if failures:
        print(f"{len(failures)} file(s) could not be read:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 1 if done == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
