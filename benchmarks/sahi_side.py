"""Our tiled prediction against SAHI's sliced prediction, same model, same sheet. Prints one JSON object.

    pip install --target ~/.cache/rtmdet/sahi sahi==0.12.8 opencv-python-headless shapely fire termcolor \
        pybboxes --no-deps                                                # beside our venv, its numpy kept
    python -m benchmarks.sahi_side --ckpt runs/sprites_tiny/checkpoints/last.ckpt \
        --sahi-path ~/.cache/rtmdet/sahi --grid 7 --sheets 1

SAHI (Akyon et al. 2022) is what mmdetection and Ultralytics point users to for large images. It
is not a dependency: ``--sahi-path`` (or ``$RTMDET_SAHI_PATH``) names a folder it was installed
into. Both sides run the same checkpoint with its test settings on the same windows size (the
input size, overlap 0.2, nearest letterbox as trained) over the sprite sheets of
``benchmarks.tiling.make_sheet``:

* ``ours``: ``rtmdet.TiledPredictor`` (masks exact in original pixels, cut instances merged by mask
  agreement, duplicates by class-aware mask-IoU NMS);
* ``sahi_greedynmm_ios``: SAHI's defaults (GREEDYNMM, intersection over smaller box >= 0.5, class
  aware; kept even though SAHI itself switches to NMS under a 0.1 score threshold): each window's
  prediction goes in as SAHI's models hand it over, masks as polygons;
* ``sahi_nms_iou``: SAHI with plain class-aware box-IoU NMS at 0.5.

Each reports segm/bbox mAP and AP_small (all kept detections counted, at most ``--max-det`` a
sheet), recall at mask IoU 0.5 and seconds per sheet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from benchmarks.tiling import make_sheet, recall
from rtmdet.coco_eval import COCOMetric
from rtmdet.crop_masks import CropMasks, tight_box
from rtmdet.preprocess import preprocess
from rtmdet.tiling import TiledPredictor


def sahi_model_class():
    """A SAHI ``DetectionModel`` running our network and postprocess on each slice."""
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
    from sahi.utils.cv import get_coco_segmentation_from_bool_mask

    class RTMDetSahi(DetectionModel):
        def __init__(self, model, postprocess, img_size: int, nearest: bool, **kwargs):
            self._ours = (model, postprocess, img_size, nearest)
            super().__init__(model=model, device="cpu", confidence_threshold=postprocess.score_thr, **kwargs)

        def set_model(self, model, **kwargs) -> None:
            self.model = model

        @torch.inference_mode()
        def perform_inference(self, image: np.ndarray) -> None:
            model, postprocess, img_size, nearest = self._ours
            x, metas = preprocess(np.ascontiguousarray(image[..., :3]), img_size, nearest)
            self._original_predictions = postprocess(model(x), metas)[0]

        def _create_object_prediction_list_from_original_predictions(self, shift_amount_list=[[0, 0]],
                                                                     full_shape_list=None) -> None:
            p = self._original_predictions
            shift = shift_amount_list[0] if shift_amount_list else [0, 0]
            full = None if full_shape_list is None else full_shape_list[0]
            out = []
            for box, score, label, mask in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(),
                                               p["masks"].numpy()):
                segmentation = get_coco_segmentation_from_bool_mask(mask)  # what SAHI's own models do
                if not segmentation:  # SAHI drops masks without a 3-point polygon
                    continue
                out.append(ObjectPrediction(bbox=box, segmentation=segmentation, category_id=int(label),
                                            category_name=str(label), shift_amount=shift, score=score,
                                            full_shape=full))
            self._object_prediction_list_per_image = [out]

    return RTMDetSahi


def sahi_prediction(sahi_model, image: np.ndarray, window: int, postprocess_type: str, metric: str,
                    max_det: int) -> dict:
    """SAHI's merged result as our prediction dict (masks rasterised from its polygons, as crops)."""
    from sahi.predict import get_sliced_prediction

    result = get_sliced_prediction(image, sahi_model, slice_height=window, slice_width=window,
                                   overlap_height_ratio=0.2, overlap_width_ratio=0.2, perform_standard_pred=False,
                                   postprocess_type=postprocess_type, postprocess_match_metric=metric,
                                   postprocess_match_threshold=0.5, postprocess_class_agnostic=False, verbose=0,
                                   force_postprocess_type=True)  # else SAHI uses NMS under a 0.1 threshold
    preds = sorted(result.object_prediction_list, key=lambda o: -o.score.value)[:max_det]
    H, W = image.shape[:2]
    boxes, scores, labels, crops, regions = [], [], [], [], []
    for o in preds:
        boxes.append(o.bbox.to_xyxy())
        scores.append(o.score.value)
        labels.append(o.category.id)
        polygons = [p for p in o.mask.segmentation if len(p) >= 6]
        dense = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, H, W))).astype(bool)
        box = tight_box(dense) or (0, 0, 0, 0)
        crops.append(torch.from_numpy(dense[box[1]:box[3], box[0]:box[2]].copy()))
        regions.append(box)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": CropMasks(crops, torch.tensor(regions, dtype=torch.int64).reshape(-1, 4), (H, W), is_tight=True)}


def run(args: argparse.Namespace) -> dict:
    sahi_path = args.sahi_path or os.environ.get("RTMDET_SAHI_PATH")
    if sahi_path:
        sys.path.insert(0, str(Path(sahi_path).expanduser()))
    try:
        import sahi
    except ImportError:
        raise SystemExit("SAHI is not importable: install it into a folder (see this module's docstring) and pass "
                         "--sahi-path or set RTMDET_SAHI_PATH") from None
    from datamodules.sprites import default_sprite_dataset
    from rtmdet.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.ckpt)
    model, img_size, nearest = loaded.model, loaded.img_size or 256, bool(loaded.nearest_resize)
    ours_pp = loaded.postprocess(mask_format="crops")
    sahi_model = sahi_model_class()(model, loaded.postprocess(), img_size, nearest)
    paths = default_sprite_dataset()
    gt_all = json.loads(Path(paths["val_ann_file"]).read_text())
    label_to_cat = [c["id"] for c in sorted(gt_all["categories"], key=lambda c: c["id"])]
    out = {"benchmark": "sahi_side", "sahi": sahi.__version__, "checkpoint": str(args.ckpt), "img_size": img_size,
           "window": img_size, "overlap": 0.2, "grid": args.grid, "sheets": args.sheets, "max_det": args.max_det,
           "threads": args.threads}
    sides = {
        "ours": lambda im: TiledPredictor(model, ours_pp, img_size, img_size, 0.2, nearest, batch_size=4,
                                          max_det=args.max_det)(im)[0],
        "sahi_greedynmm_ios": lambda im: sahi_prediction(sahi_model, im, img_size, "GREEDYNMM", "IOS", args.max_det),
        "sahi_nms_iou": lambda im: sahi_prediction(sahi_model, im, img_size, "NMS", "IOU", args.max_det),
    }
    with tempfile.TemporaryDirectory(prefix="rtmdet-sahi-") as tmp:
        ann = make_sheet(paths["val_ann_file"], paths["val_img_dir"], tmp, (args.grid, args.grid), args.sheets)
        sheet = json.loads(ann.read_text())
        out["sheet_size"] = [sheet["images"][0]["height"], sheet["images"][0]["width"]]
        out["instances_per_sheet"] = round(len(sheet["annotations"]) / args.sheets, 1)
        images = {im["id"]: np.array(Image.open(Path(tmp) / "images" / im["file_name"]).convert("RGB"))
                  for im in sheet["images"]}
        for name, predict in sides.items():
            metric = COCOMetric(str(ann), label_to_cat, max_dets=(1, 10, args.max_det))
            seconds = 0.0
            for image_id, image in images.items():
                t0 = time.perf_counter()
                pred = predict(image)
                seconds += time.perf_counter() - t0
                metric.update([pred], [image_id])
            stats = metric.compute()
            out[name] = {k: round(stats[k], 4) for k in ("segm_mAP", "segm_mAP_s", "bbox_mAP", "bbox_mAP_s")}
            out[name]["recall_mask_iou50"] = round(recall(sheet, metric.results()), 4)
            out[name]["detections"] = len(metric.results())
            out[name]["seconds_per_sheet"] = round(seconds / len(images), 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sahi_side", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a trained sprite checkpoint")
    p.add_argument("--sahi-path", help="folder SAHI is installed in (default: $RTMDET_SAHI_PATH, else importable)")
    p.add_argument("--grid", type=int, default=7)
    p.add_argument("--sheets", type=int, default=1)
    p.add_argument("--max-det", type=int, default=1000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    print(json.dumps(run(p.parse_args(argv)), indent=1))


if __name__ == "__main__":
    main()
