"""COCOMetric: equality with raw pycocotools COCOeval, perfect predictions, dedup, DDP gather."""

import contextlib
import importlib.util
import io
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rtmdet.coco_eval import STAT_NAMES, COCOMetric

CAT_IDS = [3, 7, 18]  # non-contiguous COCO category ids of labels 0, 1, 2
HAS_FASTER = importlib.util.find_spec("faster_coco_eval") is not None
BACKENDS = ["pycocotools"] + (["faster_coco_eval"] if HAS_FASTER else [])
# faster-coco-eval's C++ accumulate rounds precision = tp / (tp + fp) differently in the last bit.
FASTER_ABS_TOL = 1e-12
# pycocotools' mask.decode (used by COCO.annToMask here) trips a numpy 2 deprecation of its own.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def ellipse(h, w, cy, cx, ry, rx) -> np.ndarray:
    """(h, w) bool mask of an axis-aligned ellipse."""
    y, x = np.ogrid[:h, :w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def random_ellipse(rng, h, w) -> np.ndarray:
    ry, rx = rng.uniform(3, 70, size=2)  # areas from ~30 px (small) to ~15000 px (large)
    return ellipse(h, w, rng.uniform(0, h), rng.uniform(0, w), ry, rx)


def box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]  # xyxy


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def make_gt(num_images=8, seed=0) -> dict:
    """Images of various sizes (non-contiguous ids), ellipse (RLE) and rectangle (polygon) objects
    of all COCO sizes, one crowd region, and one image without objects."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        img_id, h, w = 100 + 7 * i, int(rng.integers(120, 200)), int(rng.integers(120, 200))
        images.append({"id": img_id, "height": h, "width": w, "file_name": f"{img_id}.jpg"})
        for _ in range(0 if i == num_images - 1 else int(rng.integers(1, 6))):
            if rng.random() < 0.7:
                mask = random_ellipse(rng, h, w)
                if not mask.any():
                    continue
                segmentation = rle_of(mask)
            else:
                x1, y1 = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
                x2, y2 = rng.uniform(x1 + 4, w), rng.uniform(y1 + 4, h)
                segmentation = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, h, w)) if isinstance(segmentation, list) \
                else segmentation
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": int(rng.choice(CAT_IDS)),
                "segmentation": segmentation, "area": float(mask_util.area(rle)),
                "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": 0,
            })
    crowd = ellipse(images[0]["height"], images[0]["width"], 30, 30, 20, 25)
    anns.append({
        "id": len(anns) + 1, "image_id": images[0]["id"], "category_id": CAT_IDS[0],
        "segmentation": rle_of(crowd), "area": float(crowd.sum()), "bbox": box_of(crowd), "iscrowd": 1,
    })
    cats = [{"id": c, "name": f"cat{c}"} for c in CAT_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def make_preds(gt: dict, seed=1) -> tuple[list[dict], list[int]]:
    """Noisy masks and boxes of ~85% of the objects, random scores, some wrong labels, plus false
    positives; the image without objects gets none."""
    rng = np.random.default_rng(seed)
    coco = _silent(COCO)
    coco.dataset = gt
    _silent(coco.createIndex)
    preds, ids = [], []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        masks, boxes, labels = [], [], []
        for ann in coco.imgToAnns[img["id"]]:
            if ann["iscrowd"] or rng.random() > 0.85:
                continue
            x, y, bw, bh = ann["bbox"]
            cy, cx = y + bh / 2 + rng.normal(0, 2), x + bw / 2 + rng.normal(0, 2)
            mask = ellipse(h, w, cy, cx, max(bh / 2 * rng.uniform(0.8, 1.2), 1), max(bw / 2 * rng.uniform(0.8, 1.2), 1))
            label = CAT_IDS.index(ann["category_id"]) if rng.random() < 0.9 else int(rng.integers(3))
            masks.append(mask | (coco.annToMask(ann) > 0) & (rng.random((h, w)) < 0.5))
            labels.append(label)
        if coco.imgToAnns[img["id"]]:
            for _ in range(int(rng.integers(0, 4))):
                masks.append(random_ellipse(rng, h, w))
                labels.append(int(rng.integers(3)))
        keep = [k for k, m in enumerate(masks) if m.any()]
        masks, labels = [masks[k] for k in keep], [labels[k] for k in keep]
        boxes = [np.array(box_of(m)) + rng.normal(0, 1.5, 4) for m in masks]
        n = len(masks)
        preds.append({
            "boxes": torch.tensor(np.array(boxes), dtype=torch.float32).reshape(n, 4),
            "scores": torch.tensor(rng.random(n), dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.array(masks, dtype=bool).reshape(n, h, w)),
        })
        ids.append(img["id"])
    return preds, ids


def empty_pred(h, w) -> dict:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, h, w, dtype=torch.bool)}


def to_coco_results(preds, ids) -> list[dict]:
    """The COCO results json, written independently of COCOMetric."""
    out = []
    for pred, img_id in zip(preds, ids):
        for box, score, label, mask in zip(pred["boxes"].numpy(), pred["scores"].numpy(), pred["labels"].tolist(),
                                           pred["masks"].numpy()):
            x1, y1, x2, y2 = box.tolist()
            out.append({"image_id": img_id, "category_id": CAT_IDS[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score), "segmentation": rle_of(mask)})
    return out


def pycocotools_stats(gt_path, results_path, img_ids, iou_type) -> list[float]:
    """Raw COCOeval on a results json; segm results without their bbox, as mmdetection does."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt_path)
        with open(results_path) as f:
            dts = json.load(f)
        if iou_type == "segm":
            for d in dts:
                d.pop("bbox")
        coco_eval = COCOeval(coco, coco.loadRes(dts), iou_type)
        coco_eval.params.imgIds = sorted(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats.tolist()


def _silent(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    gt = make_gt()
    path = tmp_path_factory.mktemp("coco") / "gt.json"
    path.write_text(json.dumps(gt))
    preds, ids = make_preds(gt)
    return gt, str(path), preds, ids


def stats_of(out: dict, iou_type: str) -> list[float]:
    return [out[f"{iou_type}_{name}"] for name in STAT_NAMES]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_one(data, backend):
    gt, path, _, _ = data
    coco = _silent(COCO, path)
    preds, ids = [], []
    for img in gt["images"]:
        anns = [a for a in coco.imgToAnns[img["id"]] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        preds.append({
            "boxes": boxes, "scores": torch.ones(len(anns)),
            "labels": torch.tensor([CAT_IDS.index(a["category_id"]) for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(np.array([coco.annToMask(a) > 0 for a in anns]).reshape(-1, img["height"],
                                                                                               img["width"])),
        })
        ids.append(img["id"])
    metric = COCOMetric(gt, CAT_IDS, backend=backend)
    metric.update(preds, ids)
    out = metric.compute()
    areas = np.array([a["area"] for a in gt["annotations"] if not a["iscrowd"]])
    has_size = [(areas < 32**2).any(), ((areas >= 32**2) & (areas < 96**2)).any(), (areas >= 96**2).any()]
    assert all(has_size)  # the synthetic set covers every size bucket
    for iou_type in ("bbox", "segm"):
        assert stats_of(out, iou_type)[:6] == [1.0] * 6, iou_type
        assert out[f"{iou_type}_AR_100"] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_raw_pycocotools(data, backend, tmp_path):
    gt, path, preds, ids = data
    preds, ids = preds[1:], ids[1:]  # evaluate on the seen images only
    metric = COCOMetric(path, CAT_IDS, backend=backend)
    metric.update(preds, ids)
    out = metric.compute()
    expected = to_coco_results(preds, ids)
    assert metric.results() == expected
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    for iou_type in ("bbox", "segm"):
        ref = pycocotools_stats(path, tmp_path / "expected.json", ids, iou_type)
        assert 0.1 < ref[0] < 0.9  # a non-trivial case
        if backend == "pycocotools":
            assert stats_of(out, iou_type) == ref, iou_type
        else:
            assert stats_of(out, iou_type) == pytest.approx(ref, rel=0, abs=FASTER_ABS_TOL), iou_type
    metric.save_results(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(expected))


@pytest.mark.skipif(not HAS_FASTER, reason="faster-coco-eval is not installed")
def test_backends_agree(data):
    gt, _, preds, ids = data
    outs = []
    for backend in ("pycocotools", "faster_coco_eval"):
        metric = COCOMetric(gt, CAT_IDS, backend=backend)
        metric.update(preds, ids)
        outs.append(metric.compute())
    assert outs[0].keys() == outs[1].keys()
    assert outs[1] == pytest.approx(outs[0], rel=0, abs=FASTER_ABS_TOL)


def test_bbox_only_ignores_masks(data):
    gt, _, preds, ids = data
    full = COCOMetric(gt, CAT_IDS, backend="pycocotools")
    full.update(preds, ids)
    bbox = COCOMetric(gt, CAT_IDS, iou_types=("bbox",), backend="pycocotools")
    bbox.update([{k: v for k, v in p.items() if k != "masks"} for p in preds], ids)
    expected = {k: v for k, v in full.compute().items() if k.startswith("bbox_")}
    assert bbox.compute() == expected
    assert "segmentation" not in bbox.results()[0]


def test_split_updates_reset_and_duplicates(data):
    gt, _, preds, ids = data
    once = COCOMetric(gt, CAT_IDS, backend="pycocotools")
    once.update(preds, ids)
    split = COCOMetric(gt, CAT_IDS, backend="pycocotools")
    split.update(preds[::-1], ids[::-1])  # forgotten by reset
    split.reset()
    split.update(preds[:3], ids[:3])
    split.update(preds[3:5], torch.tensor(ids[3:5]))
    split.update(preds[5:] + preds[:2], ids[5:] + ids[:2])  # the first two again, as DDP padding
    assert split.results() == once.results()
    assert split.compute() == once.compute()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_detections(data, backend):
    gt, _, _, _ = data
    metric = COCOMetric(gt, CAT_IDS, backend=backend)
    images = gt["images"]
    metric.update([empty_pred(img["height"], img["width"]) for img in images], [img["id"] for img in images])
    out = metric.compute()
    assert metric.results() == []
    for iou_type in ("bbox", "segm"):
        assert stats_of(out, iou_type) == [0.0] * 12  # every size bucket has ground truth


def test_mask_shape_mismatch_names_image(data):
    gt, _, preds, ids = data
    metric = COCOMetric(gt, CAT_IDS, backend="pycocotools")
    bad = dict(preds[2], masks=preds[2]["masks"][:, :-1])
    with pytest.raises(ValueError, match=rf"image {ids[2]}: masks have shape"):
        metric.update([preds[0], bad], [ids[0], ids[2]])
    with pytest.raises(KeyError, match="image id 99999"):
        metric.update(preds[:1], [99999])
    with pytest.raises(ValueError, match="not in the ground truth"):
        COCOMetric(gt, [3, 4], backend="pycocotools")


# Each scenario: (rank 0's image indices, rank 1's, whether rank 1's predictions are emptied).
DDP_SCENARIOS = [
    ([0, 1, 2, 3], [4, 5, 6, 7], True),  # rank 1 has zero detections
    ([0, 1, 2], [3, 4, 5, 6, 7, 0], False),  # uneven; rank 1 repeats image 0 as DistributedSampler padding
    ([0, 1, 2, 3, 4, 5, 6, 7], [], False),  # rank 1 never calls update
]


def _scenario_inputs(preds, ids, gt, scenario):
    idx0, idx1, empty1 = scenario
    p1 = [empty_pred(gt["images"][i]["height"], gt["images"][i]["width"]) if empty1 else preds[i] for i in idx1]
    return ([preds[i] for i in idx0], [ids[i] for i in idx0]), (p1, [ids[i] for i in idx1])


def _ddp_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gt = make_gt()
        preds, ids = make_preds(gt)
        metric = COCOMetric(gt, CAT_IDS)
        outs = []
        for scenario in DDP_SCENARIOS:
            metric.reset()
            p, i = _scenario_inputs(preds, ids, gt, scenario)[rank]
            if i:
                metric.update(p, i)
            outs.append({"compute": metric.compute(), "results": metric.results()})
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(outs, f)
    finally:
        dist.destroy_process_group()


def test_ddp_gather_equals_single_process(data, tmp_path):
    gt, _, preds, ids = data
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        outs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for scenario, out in zip(DDP_SCENARIOS, outs, strict=True):
            single = COCOMetric(gt, CAT_IDS)
            for p, i in _scenario_inputs(preds, ids, gt, scenario):
                if i:
                    single.update(p, i)
            assert out["compute"] == single.compute(), (rank, scenario)
            assert out["results"] == json.loads(json.dumps(single.results())), (rank, scenario)


def test_max_dets_scores_every_instance_of_a_crowded_image():
    """150 sprites on one sheet, all found: COCO's 100-detection cap scores 100 of them (AP and AR
    2/3), a cap of 1000 all of them (1); the third cap equal to 100 is the default exactly."""
    size, side = 300, 20
    images = [{"id": 1, "height": size, "width": size, "file_name": "sheet.png"}]
    anns, preds = [], {"boxes": [], "scores": [], "labels": [], "masks": []}
    for k in range(150):
        mask = np.zeros((size, size), bool)
        y, x = divmod(k, 15)
        mask[y * side + 2:y * side + 14, x * side + 2:x * side + 14] = True
        anns.append({"id": k + 1, "image_id": 1, "category_id": CAT_IDS[0], "iscrowd": 0, "area": int(mask.sum()),
                     "bbox": [x * side + 2.0, y * side + 2.0, 12.0, 12.0], "segmentation": rle_of(mask)})
        preds["boxes"].append(box_of(mask))
        preds["scores"].append(1.0 - k / 1000)
        preds["labels"].append(0)
        preds["masks"].append(mask)
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in CAT_IDS]}
    pred = {"boxes": torch.tensor(preds["boxes"]), "scores": torch.tensor(preds["scores"]),
            "labels": torch.tensor(preds["labels"]), "masks": torch.from_numpy(np.stack(preds["masks"]))}
    stats = {}
    for max_dets in ((1, 10, 100), (1, 10, 1000), None):
        metric = COCOMetric(gt, CAT_IDS, backend="pycocotools", **({"max_dets": max_dets} if max_dets else {}))
        metric.update([pred], [1])
        stats[max_dets] = metric.compute()
    assert stats[None] == stats[(1, 10, 100)]
    for t in ("bbox", "segm"):
        assert stats[None][f"{t}_AR_100"] == pytest.approx(100 / 150)
        assert 0.5 < stats[None][f"{t}_mAP"] < 0.7
        assert stats[(1, 10, 1000)][f"{t}_mAP"] == pytest.approx(1.0)
        assert stats[(1, 10, 1000)][f"{t}_AR_100"] == pytest.approx(1.0)
        assert stats[(1, 10, 1000)][f"{t}_mAP_50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="three increasing"):
        COCOMetric(gt, CAT_IDS, max_dets=(10, 1))
