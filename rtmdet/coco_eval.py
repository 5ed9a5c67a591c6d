"""COCO bbox / segm AP as a ``torchmetrics.Metric``, computed by pycocotools' ``COCOeval``.

Predictions are stored compactly as tensors (masks as RLE bytes, never dense) so that torchmetrics
can gather them across DDP ranks; ``compute()`` turns them back into a COCO results list and runs
``COCOeval`` (pycocotools, or faster-coco-eval when installed: same numbers) on the seen images.
The ground truth is what the data loader keeps of the annotation file (``CocoGroundTruth``), so a
file the loader accepts always evaluates.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from datamodules.coco import CocoGroundTruth

from .crop_masks import CropMasks
from .inference import mask_rles

# COCOeval.stats[0..11], in order.
STAT_NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
    "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l",
)
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")


class COCOMetric(Metric):
    """COCO box and mask AP / AR over the images passed to ``update``.

    Args:
        ann_file: the ground truth: path of the COCO annotation json, its loaded dict, or a
            ``pycocotools.coco.COCO`` (or ``faster_coco_eval.COCO``, whose ``dataset`` is read). It
            goes through the data loader's checks (``datamodules.coco.CocoGroundTruth``): a file
            with problems raises the loader's ``DatasetError``; degenerate annotations are skipped
            with the loader's warning; what is evaluated is a sanitised copy with the file's image
            and category ids (the input is never modified).
        label_to_cat_id: ``label_to_cat_id[label]`` is the COCO category id of contiguous label
            ``label`` (0..C-1).
        iou_types: any of ``"bbox"``, ``"segm"``. ``"segm"`` needs ``masks`` in every prediction.
        backend: ``"pycocotools"``, ``"faster_coco_eval"`` (optional package, same numbers, faster),
            or ``"auto"``: faster-coco-eval when importable, else pycocotools.
        print_summary: print COCOeval's summary table in ``compute()`` (silent by default).
        max_dets: COCOeval's three detection caps per image (default COCO's 1, 10, 100); AP and
            ``AR_100`` count up to the third, so an image with more instances than 100 (a tiled
            sprite sheet) is scored on all of them with e.g. (1, 10, 1000). The stat names stay.

    ``compute()`` returns python floats ``{iou_type}_{name}`` for ``name`` in ``STAT_NAMES``
    (``bbox_mAP``, ``bbox_mAP_50``, ..., ``segm_AR_l``), i.e. ``COCOeval.stats`` with pycocotools'
    semantics: -1 where nothing can be evaluated (a size bucket without ground truth); no
    detections at all give 0 (not a crash) wherever there is ground truth.

    Mask AP follows mmdetection: segm results are evaluated without their ``bbox`` so that the
    detection's area (which sets its size bucket) is the mask area, not the box area.

    Every rank evaluates the gathered results (as torchmetrics does); detections of an image id seen
    more than once (DistributedSampler pads with repeats) count once, from its first ``update``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        ann_file: str | os.PathLike | dict | COCO,
        label_to_cat_id: Sequence[int],
        iou_types: Sequence[str] = ("bbox", "segm"),
        backend: str = "auto",
        print_summary: bool = False,
        max_dets: Sequence[int] = (1, 10, 100),
    ):
        super().__init__()
        if len(max_dets) != 3 or not 0 < max_dets[0] <= max_dets[1] <= max_dets[2]:
            raise ValueError(f"max_dets must be three increasing positive caps, got {max_dets!r}")
        self.max_dets = [int(m) for m in max_dets]
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not iou_types or any(t not in ("bbox", "segm") for t in iou_types):
            raise ValueError(f"iou_types must be a non-empty subset of ('bbox', 'segm'), got {iou_types!r}")
        if backend == "auto":
            backend = "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
        self.backend = backend
        self.iou_types = tuple(iou_types)
        self.print_summary = print_summary
        self.coco_gt = _load_gt(ann_file, backend)
        self._img_hw = {img["id"]: (img["height"], img["width"]) for img in self.coco_gt.dataset["images"]}
        unknown = sorted(set(label_to_cat_id) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_cat_id has category ids {unknown} that are not in the ground truth")
        self.label_to_cat_id = torch.as_tensor(list(label_to_cat_id), dtype=torch.int64)

        # State layout: one entry per update() call in each list, concatenated along dim 0 by sync.
        empty = {
            "img_ids": torch.zeros(0, dtype=torch.int64),  # (I,) image ids, in update order
            "img_num_dets": torch.zeros(0, dtype=torch.int64),  # (I,) detections of each image
            "det_boxes": torch.zeros(0, 5),  # (D, 5) x1, y1, x2, y2, score; float32, original pixels
            "det_cat_ids": torch.zeros(0, dtype=torch.int64),  # (D,) COCO category ids
        }
        if "segm" in self.iou_types:
            empty["rle_bytes"] = torch.zeros(0, dtype=torch.uint8)  # (B,) all RLE counts strings, joined
            empty["rle_meta"] = torch.zeros(0, 3, dtype=torch.int64)  # (D, 3) num bytes, height, width
        self._empty_states = empty
        for name in empty:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(self, preds: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int] | torch.Tensor) -> None:
        """Store one batch of predictions.

        preds[i]: ``boxes`` (N, 4) float xyxy in original image pixels, ``scores`` (N,),
        ``labels`` (N,) int64 contiguous, and for segm ``masks`` (N, H, W) bool at the original
        image size (H, W) recorded in the ground truth for ``image_ids[i]``.
        """
        image_ids = [int(i) for i in image_ids]
        if len(preds) != len(image_ids):
            raise ValueError(f"got {len(preds)} predictions for {len(image_ids)} image ids")
        num_dets, boxes, cat_ids, rles = [], [], [], []
        for pred, img_id in zip(preds, image_ids):
            if img_id not in self._img_hw:
                raise KeyError(f"image id {img_id} is not in the ground truth")
            b = pred["boxes"].detach().reshape(-1, 4).float().cpu()  # (N, 4) xyxy
            s = pred["scores"].detach().reshape(-1, 1).float().cpu()  # (N, 1)
            labels = pred["labels"].detach().reshape(-1).long().cpu()  # (N,)
            n = b.shape[0]
            if s.shape[0] != n or labels.shape[0] != n:
                raise ValueError(f"image {img_id}: boxes, scores and labels differ in length")
            if n and (labels.min() < 0 or labels.max() >= len(self.label_to_cat_id)):
                raise ValueError(f"image {img_id}: labels must be in [0, {len(self.label_to_cat_id)})")
            num_dets.append(n)
            boxes.append(torch.cat([b, s], 1))  # (N, 5)
            cat_ids.append(self.label_to_cat_id[labels])
            if "segm" in self.iou_types:
                rles += self._encode_masks(pred.get("masks"), n, img_id)

        dev = self.device
        self.img_ids.append(torch.tensor(image_ids, dtype=torch.int64, device=dev))
        self.img_num_dets.append(torch.tensor(num_dets, dtype=torch.int64, device=dev))
        self.det_boxes.append(torch.cat(boxes).to(dev) if boxes else self._empty_states["det_boxes"].to(dev))
        self.det_cat_ids.append(torch.cat(cat_ids).to(dev) if cat_ids else self._empty_states["det_cat_ids"].to(dev))
        if "segm" in self.iou_types:
            joined = np.frombuffer(bytearray(b"".join(r["counts"] for r in rles)), dtype=np.uint8)
            meta = [[len(r["counts"]), *r["size"]] for r in rles]
            self.rle_bytes.append(torch.from_numpy(joined).to(dev))
            self.rle_meta.append(torch.tensor(meta, dtype=torch.int64, device=dev).reshape(-1, 3))

    def _encode_masks(self, masks: torch.Tensor | CropMasks | None, n: int, img_id: int) -> list[dict]:
        """(N, H, W) bool or CropMasks -> N compressed RLEs {size: [H, W], counts: bytes}."""
        if n == 0:
            return []
        h, w = self._img_hw[img_id]
        if masks is None:
            raise ValueError(f"image {img_id}: iou_types has 'segm' but the prediction has no masks")
        if len(masks.shape) != 3 or masks.shape[0] != n or tuple(masks.shape[1:]) != (h, w):
            raise ValueError(
                f"image {img_id}: masks have shape {tuple(masks.shape)}, expected ({n}, {h}, {w}): "
                f"one mask per box at the original image size (height, width) of the ground truth"
            )
        return mask_rles(masks)

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group=None) -> None:
        # A rank that never called update() has empty lists, for which torchmetrics gathers a float32
        # (0,) tensor; all_gather needs every rank's dtype and ndim to agree, so send an empty
        # tensor of the state's own layout instead.
        for name, empty in self._empty_states.items():
            if len(getattr(self, name)) == 0:
                setattr(self, name, [empty.to(self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def forward(self, *args, **kwargs) -> None:
        """Same as ``update``: COCO AP has no per-batch value worth a COCOeval run per step."""
        self.update(*args, **kwargs)

    def compute(self) -> dict[str, float]:
        results, img_ids = self._decode()
        out = {}
        for iou_type in self.iou_types:
            stats = self._evaluate(iou_type, results, img_ids)
            out.update({f"{iou_type}_{name}": float(v) for name, v in zip(STAT_NAMES, stats)})
        return out

    def results(self) -> list[dict]:
        """The COCO results list (gathered over ranks, deduplicated): {image_id, category_id,
        bbox [x, y, w, h], score[, segmentation {size [h, w], counts str}]}. Call it on every rank."""
        synced = self._is_synced
        with self.sync_context(should_sync=self.sync_on_compute and not synced, should_unsync=not synced):
            return self._decode()[0]

    def save_results(self, path: str | os.PathLike) -> None:
        """Write ``results()`` as a COCO results json (on rank 0 only; call it on every rank)."""
        results = self.results()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            with open(path, "w") as f:
                json.dump(results, f)

    def _decode(self) -> tuple[list[dict], list[int]]:
        """States -> (COCO results list, sorted unique seen image ids)."""
        img_ids = _cat(self.img_ids, self._empty_states["img_ids"]).cpu().numpy()
        num_dets = _cat(self.img_num_dets, self._empty_states["img_num_dets"]).cpu().numpy()
        boxes = _cat(self.det_boxes, self._empty_states["det_boxes"]).cpu().double().numpy()  # (D, 5)
        cat_ids = _cat(self.det_cat_ids, self._empty_states["det_cat_ids"]).cpu().tolist()
        # Keep the detections of each image id's first occurrence only.
        seen, first = np.unique(img_ids, return_index=True)
        keep_img = np.zeros(len(img_ids), dtype=bool)
        keep_img[first] = True
        keep = np.repeat(keep_img, num_dets)  # (D,)
        det_img_ids = np.repeat(img_ids, num_dets).tolist()
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]], 1).tolist()  # (D, 4)
        scores = boxes[:, 4].tolist()

        segm = "segm" in self.iou_types
        if segm:
            buf = _cat(self.rle_bytes, self._empty_states["rle_bytes"]).cpu().numpy().tobytes()
            meta = _cat(self.rle_meta, self._empty_states["rle_meta"]).cpu().numpy()  # (D, 3)
            ends = np.cumsum(meta[:, 0]).tolist()
            sizes = meta[:, 1:].tolist()
        results = []
        for i in np.flatnonzero(keep).tolist():
            r = {"image_id": det_img_ids[i], "category_id": cat_ids[i], "bbox": xywh[i], "score": scores[i]}
            if segm:
                start = ends[i] - int(meta[i, 0])
                r["segmentation"] = {"size": sizes[i], "counts": buf[start:ends[i]].decode("ascii")}
            results.append(r)
        return results, seen.tolist()

    def _evaluate(self, iou_type: str, results: list[dict], img_ids: list[int]) -> list[float]:
        """Run COCOeval on ``img_ids``; returns its 12 stats."""
        drop = "bbox" if iou_type == "segm" else "segmentation"  # segm: area from the mask (mmdet)
        dts = [{k: v for k, v in r.items() if k != drop} for r in results]
        log, table = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(log):
            if self.backend == "pycocotools":
                coco_dt = self.coco_gt.loadRes(dts) if dts else _empty_results(self.coco_gt)
                coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
            else:
                from faster_coco_eval import COCOeval_faster

                coco_dt = self.coco_gt.loadRes(dts)  # handles an empty list
                coco_eval = COCOeval_faster(self.coco_gt, coco_dt, iou_type, print_function=print)
            coco_eval.params.imgIds = img_ids
            coco_eval.params.maxDets = list(self.max_dets)
            coco_eval.evaluate()
            coco_eval.accumulate()
        with contextlib.redirect_stdout(table):
            coco_eval.summarize()
        if self.print_summary:
            print(f"COCO {iou_type} on {len(img_ids)} images ({self.backend}):\n{table.getvalue()}", end="")
        stats = [float(v) for v in coco_eval.stats[: len(STAT_NAMES)]]
        if self.max_dets[2] != 100:  # summarize() reads the first AP at a literal 100 detections
            precision = np.asarray(coco_eval.eval["precision"])[:, :, :, 0, 2]  # (T, R, K) all areas, last cap
            valid = precision[precision > -1]
            stats[0] = float(valid.mean()) if valid.size else -1.0
        return stats


def _cat(state: list[torch.Tensor] | torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """A list state (before sync) or its gathered tensor (after) -> one tensor."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else empty


def _load_gt(ann_file, backend: str):
    """The ground truth as the backend's COCO object (loading silently): the annotations that the
    data loader keeps (``datamodules.coco.CocoGroundTruth``: same rules, same skips and warning)."""
    source = ann_file.dataset if hasattr(ann_file, "dataset") else ann_file
    source = CocoGroundTruth(source if isinstance(source, dict) else os.fspath(source)).dataset
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCO as FasterCOCO

            return FasterCOCO(source, print_function=lambda *args, **kwargs: None)
        coco = COCO()
        coco.dataset = source
        coco.createIndex()
        return coco


def _empty_results(coco_gt: COCO) -> COCO:
    """What ``coco_gt.loadRes([])`` would be if pycocotools did not crash on an empty list."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res
