"""COCO box and mask AP of a checkpoint (ours or official mmdetection) on a COCO-format dataset.

    python -m experiments.evaluate --ckpt PATH [--size tiny] [--data.val_ann_file F --data.val_img_dir D]
        [--data.img_size 640] [--data.nearest_resize] [--data.val_batch_size 5] [--data.num_workers 2]
        [--output results.json] [--device cpu] [--no-data.check_images]
        [--tile-size none|auto|N] [--tile-overlap 0.2] [--whole-image] [--max-det K] [--refine-masks]
        [--upscale K]

No data given: the embedded sprite dataset's val split. The input size and resize mode default to
those the checkpoint was validated with (Lightning checkpoints), else 640 and bilinear. Prints a
table and writes the metrics (``bbox_mAP`` ... ``segm_AR_l`` and the run's settings) to
``--output`` and the detections, as a COCO results list, beside it (``<output>.detections.json``).
Bad data (annotation problems; image files missing, unreadable, truncated or of another size than
the json says) ends with one ``error: ...`` listing every problem, before the model runs.

``--tile-size`` evaluates large images window by window, as ``experiments.predict`` predicts them
(default ``none``: the whole image letterboxed, as the official numbers are measured); images that
hit ``--max-det`` are listed. AP and AR_100 count COCO's 100 detections an image, or all kept ones
where ``--max-det`` or tiling (300 an image) allow more (``metric_max_dets`` in the output). ``--refine-masks`` scores the masks after the pixel-art
refinement of ``rtmdet/refine.py`` (as ``experiments.predict --refine-masks`` writes them); boxes
and scores are unchanged by it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datamodules import CocoAnnotations, CocoDataset, DatasetError, collate, load_image, val_pipeline
from datamodules.coco import check_image_files
from experiments.errors import check_img_size, cli_error_message
from experiments.tiling_options import (
    ImagePredictor,
    Prediction,
    add_tiling_arguments,
    cap_report,
    check_tiling_arguments,
)
from rtmdet import SIZES, CheckpointError, normalize
from rtmdet.coco_eval import COCOMetric
from rtmdet.checkpoint import load_checkpoint
from rtmdet.refine import refine_masks

TABLE_STATS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning .ckpt or official mmdetection .pth")
    p.add_argument("--size", choices=list(SIZES), help="model size (default: read from the checkpoint)")
    p.add_argument("--data.val_ann_file", dest="ann_file", metavar="FILE", help="COCO json (default: the sprite val split)")
    p.add_argument("--data.val_img_dir", dest="img_dir", metavar="DIR", help="folder the json's file_name entries are in")
    p.add_argument("--data.img_size", dest="img_size", type=int, metavar="S", help="input size (default: checkpoint's, or 640)")
    p.add_argument("--data.nearest_resize", dest="nearest", action=argparse.BooleanOptionalAction,
                   help="nearest-neighbour letterbox (default: checkpoint's, or bilinear)")
    p.add_argument("--data.val_batch_size", dest="batch_size", type=int, default=5, metavar="N")
    p.add_argument("--data.num_workers", dest="num_workers", type=int, default=2, metavar="N")
    p.add_argument("--data.check_images", dest="check_images", action=argparse.BooleanOptionalAction, default=True,
                   help="open every image file first and report all bad ones at once (default: on)")
    p.add_argument("--output", default="results.json", help="metrics json (detections go beside it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--refine-masks", action="store_true",
                   help="score the masks snapped to the image's pixel-art colours (rtmdet/refine.py)")
    add_tiling_arguments(p, default_tile="none")
    return p


def evaluate(args: argparse.Namespace) -> dict:
    start = time.time()
    if (args.ann_file is None) != (args.img_dir is None):
        raise DatasetError("give both --data.val_ann_file and --data.val_img_dir, or neither (sprite val split)")
    if args.ann_file is None:
        from datamodules.sprites import default_sprite_dataset

        paths = default_sprite_dataset()
        args.ann_file, args.img_dir = paths["val_ann_file"], paths["val_img_dir"]
    loaded = load_checkpoint(args.ckpt, args.size, device=args.device)
    model = loaded.model
    img_size = args.img_size or loaded.img_size or 640
    nearest = args.nearest if args.nearest is not None else bool(loaded.nearest_resize)
    annotations = CocoAnnotations(args.ann_file, args.img_dir)
    if args.check_images:
        check_image_files(annotations)
    categories = annotations.categories
    if categories.num_classes != model.num_classes:
        raise DatasetError(f"{args.ann_file} has {categories.num_classes} categories, but {args.ckpt} predicts "
                           f"{model.num_classes} classes")
    if loaded.class_names and tuple(loaded.class_names) != categories.names:
        print(f"warning: class names differ (checkpoint {list(loaded.class_names)[:5]}..., dataset "
              f"{list(categories.names)[:5]}...); labels are matched by position", file=sys.stderr)
    postprocess = loaded.postprocess(mask_format="crops")  # no (N, H, W) stack of the original size
    predictor = ImagePredictor(model, postprocess, img_size, nearest, args, args.device)
    # COCO scores at most 100 detections an image; where the caps allow more, all that are kept count.
    metric_max_det = max(100, predictor.plain_max_det, predictor.tiled_max_det if args.tile_size != "none" else 0)
    metric = COCOMetric(args.ann_file, [categories.label_to_cat_id[i] for i in range(categories.num_classes)],
                        max_dets=(1, 10, metric_max_det))
    args.capped = []
    records = {r.image_id: r for r in annotations.records}

    def refined(pred: dict, image_id: int, image=None) -> dict:
        if not args.refine_masks:
            return pred
        if image is None:  # the batched path holds only the letterboxed input
            record = records[image_id]
            image = load_image(record.path, image_id, (record.height, record.width))
        return dict(pred, masks=refine_masks(image, pred["masks"], pred["boxes"]))

    indices = []  # images letterboxed whole, batched through the data pipeline
    with torch.inference_mode():
        for i, record in enumerate(annotations.records):  # windows need the original image: loaded one by one
            tile = predictor.window(record.height, record.width)
            if tile is None:
                indices.append(i)
                continue
            image = load_image(record.path, record.image_id)
            p = predictor.tiled(image, tile)
            metric.update([refined(p.pred, record.image_id, image)], [record.image_id])
            if p.capped:
                args.capped.append((f"image {record.image_id} ({Path(record.path).name})", p))
        dataset = CocoDataset(annotations, val_pipeline(predictor.img_size, nearest))
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=args.batch_size,
                            num_workers=args.num_workers, collate_fn=collate)
        for images, targets in loader if indices else []:  # targets: only image_id and meta are used
            preds = predictor.plain(model(normalize(images.to(args.device))), [t["meta"] for t in targets])
            for t, pred in zip(targets, preds):
                found, k = len(pred["scores"]), predictor.plain_max_det
                metric.update([refined({key: v[:k] for key, v in pred.items()}, t["image_id"])], [t["image_id"]])
                if found > k:
                    args.capped.append((f"image {t['image_id']}", Prediction(pred, found, k, 1)))
    stats = metric.compute()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    detections = output.with_name(output.stem + ".detections.json")
    metric.save_results(detections)
    payload = dict(stats, checkpoint=str(args.ckpt), format=loaded.format, size=model.size,
                   num_classes=model.num_classes, ann_file=str(args.ann_file), img_dir=str(args.img_dir),
                   num_images=len(annotations.records), img_size=predictor.img_size, upscale=args.upscale,
                   nearest_resize=nearest, tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                   whole_image=args.whole_image,
                   max_det=args.max_det, images_over_max_det=len(args.capped), refine_masks=args.refine_masks,
                   metric_max_dets=metric_max_det,
                   detections_file=str(detections), wall_time_s=round(time.time() - start, 1))
    output.write_text(json.dumps(payload, indent=2))
    return payload


def format_table(stats: dict) -> str:
    """bbox / segm rows of mAP, mAP_50, ..., mAP_l; '-' where COCOeval has nothing to evaluate (-1)."""
    lines = [f"{'':6}" + "".join(f"{s:>8}" for s in TABLE_STATS)]
    for iou_type in ("bbox", "segm"):
        vals = [stats[f"{iou_type}_{s}"] for s in TABLE_STATS]
        lines.append(f"{iou_type:6}" + "".join(f"{v:8.3f}" if v >= 0 else f"{'-':>8}" for v in vals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_img_size(parser, args.img_size, "--data.img_size")
    check_tiling_arguments(parser, args)
    try:
        payload = evaluate(args)
    except (CheckpointError, DatasetError) as e:
        print(f"error: {cli_error_message(e)}", file=sys.stderr)
        return 2
    print(f"{payload['checkpoint']} (RTMDet-Ins-{payload['size']}, {payload['format']}) on {payload['num_images']} "
          f"images of {payload['ann_file']} at {payload['img_size']}px:")
    print(format_table(payload))
    print(f"metrics: {args.output}  detections: {payload['detections_file']}")
    if args.capped:
        print(f"{len(args.capped)} image(s) had more instances than --max-det:", file=sys.stderr)
        print("\n".join(cap_report(args.capped)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
