"""Tiled vs untiled prediction on large sprite sheets. Prints one JSON object.

    python -m benchmarks.tiling --ckpt runs/sprites_tiny/checkpoints/last.ckpt   # accuracy + speed
    python -m benchmarks.tiling                                               # speed and memory only
    python -m benchmarks.tiling --quick                                       # smoke test

Sheets are collages of ``--grid`` x ``--grid`` images of the embedded sprite dataset's validation
split (256 px each: an 8 x 8 grid is a 2048 x 2048 sheet with a few hundred sprites at the scale the
model was trained at), written with their annotations as a COCO set (``make_sheet``). With a trained
checkpoint the benchmark reports, for the sheets predicted

* ``untiled``: letterboxed whole into the input size (the official test pipeline);
* ``tiled``: in windows of the input size (``rtmdet.tiling.TiledPredictor``, 0.2 overlap), at
  most ``--max-det`` instances a sheet (1000), all of them counted by the metric (COCO's cap of 100
  detections an image would score a sheet of 250 sprites on 100);
* ``regions``: each of the sheet's source images predicted on its own (the upper bound tiling
  should approach, and the time it should beat);

segm/bbox mAP, recall (COCO AR@100 is capped at 100 per image, so recall here is the share of
ground-truth instances matched at mask IoU 0.5 by a detection of their class), time per megapixel
and windows per second. Without a checkpoint (a random model with a busy head) only speeds are
meaningful. ``memory`` runs tiled prediction (windows of 640) on a 4096 x 4096 image with a busy
head whose masks are sprite-sized, keeping 500 and 2,000 instances, each in its own process: peak
RSS against the dense N x H x W stack that ``model.predict`` would allocate.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from rtmdet.crop_masks import CropMasks


def make_sheet(ann_file, img_dir, out_root, grid: tuple[int, int] = (8, 8), num_sheets: int = 2,
               seed: int = 0) -> Path:
    """Collages of a COCO set's images, ``grid`` (rows, cols) per sheet, as a new COCO set.

    Images are drawn without replacement (seeded) and placed in reading order on a canvas sized
    by the largest image (smaller ones padded with grey); annotations move with their image.
    Writes ``out_root/images/sheet_XXX.png`` and returns the path of ``out_root/sheets.json``.
    """
    data = json.loads(Path(ann_file).read_text())
    rows, cols = grid
    images = sorted(data["images"], key=lambda im: im["id"])
    need = rows * cols * num_sheets
    if need > len(images):
        raise ValueError(f"{ann_file} has {len(images)} images; {num_sheets} sheets of {rows}x{cols} need {need}")
    pick = np.random.default_rng(seed).permutation(len(images))[:need]
    cell_h, cell_w = max(im["height"] for im in images), max(im["width"] for im in images)
    anns_of: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    out_root = Path(out_root)
    (out_root / "images").mkdir(parents=True, exist_ok=True)
    sheets, annotations = [], []
    H, W = rows * cell_h, cols * cell_w
    for s in range(num_sheets):
        canvas = np.full((H, W, 3), 114, np.uint8)
        for k, idx in enumerate(pick[s * rows * cols:(s + 1) * rows * cols]):
            im = images[idx]
            y0, x0 = (k // cols) * cell_h, (k % cols) * cell_w
            canvas[y0:y0 + im["height"], x0:x0 + im["width"]] = np.asarray(
                Image.open(Path(img_dir) / im["file_name"]).convert("RGB"))
            for a in anns_of.get(im["id"], []):
                seg = a["segmentation"]
                if isinstance(seg, list):
                    seg = mask_util.merge(mask_util.frPyObjects(seg, im["height"], im["width"]))
                elif isinstance(seg["counts"], list):
                    seg = mask_util.frPyObjects(seg, im["height"], im["width"])
                m = torch.from_numpy(mask_util.decode(seg).astype(bool))
                rle = CropMasks.from_dense(m[None]).shift(x0, y0, (H, W)).to_rle()[0]
                bx, by, bw, bh = a["bbox"]
                annotations.append({"id": len(annotations) + 1, "image_id": s + 1, "category_id": a["category_id"],
                                    "bbox": [bx + x0, by + y0, bw, bh], "area": a.get("area", int(m.sum())),
                                    "iscrowd": a.get("iscrowd", 0),
                                    "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")}})
        name = f"sheet_{s:03d}.png"
        Image.fromarray(canvas).save(out_root / "images" / name)
        sheets.append({"id": s + 1, "file_name": name, "height": H, "width": W})
    out = out_root / "sheets.json"
    out.write_text(json.dumps({"images": sheets, "annotations": annotations, "categories": data["categories"]}))
    return out


def recall(gt: dict, dets: list[dict], iou: float = 0.5) -> float:
    """Share of ground-truth instances matched (mask IoU >= iou, same class) by some detection."""
    found = total = 0
    by_image: dict[int, list[dict]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    for im in gt["images"]:
        g = [a for a in gt["annotations"] if a["image_id"] == im["id"] and not a.get("iscrowd")]
        d = by_image.get(im["id"], [])
        total += len(g)
        if not g or not d:
            continue
        ious = mask_util.iou([x["segmentation"] for x in d], [a["segmentation"] for a in g], [0] * len(g))
        same = np.array([[x["category_id"] == a["category_id"] for a in g] for x in d])
        found += int(((np.asarray(ious) >= iou) & same).any(0).sum())
    return found / max(total, 1)


def _evaluate(model, postprocess, ann_file, img_dir, img_size, nearest, mode: str, label_to_cat,
              max_det: int = 1000) -> dict:
    from rtmdet.coco_eval import COCOMetric
    from rtmdet.preprocess import preprocess
    from rtmdet.tiling import TiledPredictor, tile_windows

    gt = json.loads(Path(ann_file).read_text())
    metric = COCOMetric(str(ann_file), label_to_cat, max_dets=(1, 10, max_det))  # every kept instance counts
    seconds, windows, pixels = 0.0, 0, 0
    for im in gt["images"]:
        image = np.array(Image.open(Path(img_dir) / im["file_name"]).convert("RGB"))
        pixels += image.shape[0] * image.shape[1]
        t0 = time.perf_counter()
        if mode == "untiled":
            with torch.inference_mode():
                x, metas = preprocess(image, img_size, nearest)
                pred = postprocess(model(x), metas)[0]
            windows += 1
        else:
            tiler = TiledPredictor(model, postprocess, img_size, img_size, 0.2, nearest, batch_size=4, max_det=max_det)
            pred, _ = tiler(image)
            windows += len(tile_windows(*image.shape[:2], img_size, 0.2))
        seconds += time.perf_counter() - t0
        metric.update([pred], [im["id"]])
    stats = metric.compute()
    return {"segm_mAP": round(stats["segm_mAP"], 4), "segm_mAP_s": round(stats["segm_mAP_s"], 4),
            "bbox_mAP": round(stats["bbox_mAP"], 4), "recall_mask_iou50": round(recall(gt, metric.results()), 4),
            "detections": len(metric.results()), "seconds": round(seconds, 2),
            "s_per_megapixel": round(seconds / (pixels / 1e6), 3), "windows_per_s": round(windows / seconds, 2)}


def _regions(model, postprocess, ann_file, img_dir, img_size, nearest, label_to_cat) -> dict:
    """The sheets' source images one by one (batch 1), timed, and their own mAP."""
    r = _evaluate(model, postprocess, ann_file, img_dir, img_size, nearest, "untiled", label_to_cat, 100)
    return {k: r[k] for k in ("segm_mAP", "segm_mAP_s", "bbox_mAP", "recall_mask_iou50", "seconds")}


def _memory_child(num_instances: int, size: int, img_size: int, queue) -> None:
    from benchmarks.latency import busy_head
    from rtmdet import InstancePostProcess, build_model
    from rtmdet.tiling import TiledPredictor

    torch.manual_seed(0)
    model = build_model("tiny", num_classes=8).eval()
    busy_head(model)
    with torch.no_grad():  # sprite-sized masks: diamonds of radius 0.8 strides, not 4
        for conv in model.head.rtm_kernel:
            conv.bias[168] = 0.1
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    pred, found = TiledPredictor(model, InstancePostProcess(score_thr=0.05), img_size, img_size,
                                 max_det=num_instances)(image)
    rles = pred["masks"].to_rle()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"instances": len(pred["scores"]), "found": found, "rles": len(rles),
               "peak_rss_mb": round(peak / 1024), "growth_during_predict_mb": round((peak - before) / 1024),
               "dense_stack_would_be_mb": round(len(pred["scores"]) * size * size / 2**20),
               "mask_crop_pixels_mb": round(sum(c.numel() for c in pred["masks"].crops) / 2**20, 1),
               "seconds": round(seconds, 1)})


def memory(instances: list[int], size: int, img_size: int) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")  # a fresh process each: its own peak RSS
    out = []
    for n in instances:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(n, size, img_size, queue))
        proc.start()
        out.append(queue.get())
        proc.join()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="a trained sprite checkpoint (accuracy figures); default: a random busy head")
    p.add_argument("--grid", type=int, default=8, help="sheet = grid x grid validation images (default 8)")
    p.add_argument("--sheets", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--max-det", type=int, default=1000,
                   help="instances kept per sheet when tiled, and counted by the metric (default 1000)")
    p.add_argument("--memory-size", type=int, default=4096, help="side of the memory test image")
    p.add_argument("--memory-instances", type=int, nargs="*", default=[500, 2000])
    p.add_argument("--quick", action="store_true", help="a 2 x 2 sheet, small memory test (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.grid, args.sheets, args.memory_size, args.memory_instances = 2, 1, 384, [20]

    from benchmarks.latency import busy_head
    from datamodules.sprites import default_sprite_dataset, generate_sprite_dataset
    from rtmdet import InstancePostProcess, build_model
    from rtmdet.checkpoint import load_checkpoint

    if args.ckpt:
        loaded = load_checkpoint(args.ckpt)
        model, img_size, nearest = loaded.model, loaded.img_size or 256, bool(loaded.nearest_resize)
        postprocess = loaded.postprocess(mask_format="crops")
    else:
        torch.manual_seed(0)
        model, img_size, nearest = build_model("tiny", num_classes=8).eval(), 256, True
        busy_head(model)
        postprocess = InstancePostProcess(mask_format="crops")
    quick_dir = tempfile.TemporaryDirectory(prefix="rtmdet-quick-")
    if args.quick:  # four small generated images instead of the validation split
        ann = generate_sprite_dataset(quick_dir.name, num_images=4, image_size=128, seed=1, split_name="val")
        paths = {"val_ann_file": str(ann), "val_img_dir": str(Path(quick_dir.name) / "val")}
        img_size = 128
    else:
        paths = default_sprite_dataset()
    gt = json.loads(Path(paths["val_ann_file"]).read_text())
    label_to_cat = [c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    result = {"benchmark": "tiling", "checkpoint": args.ckpt, "img_size": img_size, "grid": args.grid,
              "sheets": args.sheets, "threads": args.threads, "max_det": args.max_det}
    with tempfile.TemporaryDirectory(prefix="rtmdet-sheets-") as tmp:
        ann = make_sheet(paths["val_ann_file"], paths["val_img_dir"], tmp, (args.grid, args.grid), args.sheets)
        sheet = json.loads(ann.read_text())
        result["sheet_size"] = [sheet["images"][0]["height"], sheet["images"][0]["width"]]
        result["instances_per_sheet"] = round(len(sheet["annotations"]) / args.sheets, 1)
        for mode in ("untiled", "tiled"):
            result[mode] = _evaluate(model, postprocess, ann, Path(tmp) / "images", img_size, nearest, mode,
                                     label_to_cat, args.max_det)
        # The same images one by one: the source images of the sheets, as their own COCO set.
        picked = np.random.default_rng(0).permutation(len(gt["images"]))[:args.grid ** 2 * args.sheets]
        images = sorted(gt["images"], key=lambda im: im["id"])
        keep = {images[i]["id"] for i in picked}
        sub = {"images": [im for im in images if im["id"] in keep], "categories": gt["categories"],
               "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
        sub_file = Path(tmp) / "regions.json"
        sub_file.write_text(json.dumps(sub))
        result["regions"] = _regions(model, postprocess, sub_file, paths["val_img_dir"], img_size, nearest,
                                     label_to_cat)
    result["tiled_time_vs_regions"] = round(result["tiled"]["seconds"] / result["regions"]["seconds"], 3)
    result["memory"] = memory(args.memory_instances, args.memory_size, 640 if not args.quick else 256)
    quick_dir.cleanup()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
