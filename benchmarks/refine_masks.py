"""Mask refinement on vs off for one checkpoint's predictions. Prints one JSON object.

    python -m benchmarks.refine_masks --ckpt CKPT --ann-file DIR/annotations/val.json --img-dir DIR/val
        [--img-size 320] [--nearest | --no-nearest] [--tolerance 1] [--limit N]

The same predictions (whole images letterboxed, the checkpoint's postprocess at its evaluation
threshold) are scored twice, as predicted and after ``rtmdet.refine.refine_masks``:

* COCO segm mAP, AP50, AP75 and AP_small (bbox mAP is the same for both: refinement keeps boxes);
* boundary F-score: every ground-truth instance is matched to the prediction of its class with the
  highest mask IoU (>= 0.5, unrefined masks, so both sides score the same pairs); for a pair, the
  boundary pixels of each mask (mask pixels with a 4-neighbour outside it) within ``--tolerance``
  px (square) of the other's boundary give precision and recall, F = 2PR / (P + R); reported as the
  mean F over matched pairs, for all and for small (< 32^2 px) instances, with the share matched;
* the share of pairs whose refined mask equals the ground truth pixel for pixel.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datamodules import load_image
from experiments.tiling_options import ImagePredictor
from rtmdet.checkpoint import load_checkpoint
from rtmdet.coco_eval import COCOMetric
from rtmdet.refine import dilate, refine_masks


def boundary(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool -> its pixels that have a 4-neighbour outside it (or the frame's edge)."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: int = 1) -> float:
    """Boundary F-score of two (H, W) bool masks at ``tolerance`` px (Chebyshev)."""
    bp, bg = boundary(pred), boundary(gt)
    if not bp.any() or not bg.any():
        return float(bp.any() == bg.any())
    precision = (bp & dilate(bg, tolerance)).sum() / bp.sum()
    recall = (bg & dilate(bp, tolerance)).sum() / bg.sum()
    return float(2 * precision * recall / max(precision + recall, 1e-12))


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    loaded = load_checkpoint(args.ckpt, None, device="cpu")
    img_size = args.img_size or loaded.img_size or 640
    nearest = args.nearest if args.nearest is not None else bool(loaded.nearest_resize)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(args.ann_file)
    cat_ids = sorted(coco.getCatIds())  # contiguous label = position of the sorted category id
    metrics = {side: COCOMetric(args.ann_file, cat_ids, iou_types=("segm",)) for side in ("predicted", "refined")}
    options = argparse.Namespace(tile_size="none", whole_image=True, max_det=None, tile_overlap=0.2, batch_size=1,
                                 upscale=1)
    predictor = ImagePredictor(loaded.model.eval(), loaded.postprocess(mask_format="crops"), img_size, nearest,
                               options, "cpu")
    scores: dict[str, list] = {"predicted": [], "refined": []}
    small, exact, gt_total, refine_s = [], [], 0, 0.0
    image_ids = sorted(coco.getImgIds())[:args.limit]
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        image = load_image(f"{args.img_dir}/{info['file_name']}", image_id)
        pred = predictor.whole([image])[0].pred
        t0 = time.perf_counter()
        refined = dict(pred, masks=refine_masks(image, pred["masks"], pred["boxes"]))
        refine_s += time.perf_counter() - t0
        metrics["predicted"].update([pred], [image_id])
        metrics["refined"].update([refined], [image_id])
        dense = {"predicted": pred["masks"].to_dense().numpy(), "refined": refined["masks"].to_dense().numpy()}
        labels = pred["labels"].numpy()
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            gt_total += 1
            gt = mask_utils.decode(coco.annToRLE(ann)).astype(bool)
            same = np.flatnonzero(labels == cat_ids.index(ann["category_id"]))
            if not len(same):
                continue
            cand = dense["predicted"][same]  # (K, H, W)
            inter = (cand & gt).sum((1, 2))
            iou = inter / np.maximum((cand | gt).sum((1, 2)), 1)
            if iou.max() < 0.5:
                continue
            k = same[int(iou.argmax())]
            for side in scores:
                scores[side].append(boundary_f(dense[side][k], gt, args.tolerance))
            small.append(gt.sum() < 32**2)
            exact.append((np.array_equal(dense["predicted"][k], gt), np.array_equal(dense["refined"][k], gt)))
    out = {"checkpoint": str(args.ckpt), "ann_file": args.ann_file, "images": len(image_ids), "img_size": img_size,
           "nearest_resize": nearest, "tolerance_px": args.tolerance, "gt_instances": gt_total,
           "matched_share": round(len(small) / max(gt_total, 1), 4)}
    small = np.array(small, bool)
    for side, metric in metrics.items():
        stats = metric.compute()
        f = np.array(scores[side])
        out[side] = {k: round(float(stats[f"segm_{k}"]), 4) for k in ("mAP", "mAP_50", "mAP_75", "mAP_s")}
        out[side].update(boundary_f=round(float(f.mean()), 4) if len(f) else None,
                         boundary_f_small=round(float(f[small].mean()), 4) if small.any() else None,
                         exact_share=round(float(np.mean([e[side == "refined"] for e in exact])), 4) if exact else None)
    out["refine_ms_per_image"] = round(1000 * refine_s / max(len(image_ids), 1), 1)
    out["wall_s"] = round(time.time() - start, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.refine_masks", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--ann-file", required=True)
    p.add_argument("--img-dir", required=True)
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--nearest", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--tolerance", type=int, default=1, help="boundary match tolerance in px")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    with torch.inference_mode():  # scoped: main() also runs inside other processes' tests
        print(json.dumps(run(p.parse_args(argv)), indent=1))


if __name__ == "__main__":
    main()
