"""One rule set for what counts as an instance: the COCO metric evaluates what the loader keeps.

Each case is an annotation that the loader accepts (skipping it with its warning, or using it)
but on which raw pycocotools fails inside ``COCOeval.evaluate``; the metric must evaluate it the
way the loader reads it. Also: far-away polygon vertices and malformed RLE strings, on which
pycocotools' C code crashes the process, are clipped or reported, never handed to it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datamodules import CocoAnnotations, DatasetError
from datamodules.coco import CocoGroundTruth
from datamodules.masks import clip_polygon, decode_masks
from rtmdet.coco_eval import COCOMetric
from tests._coco_factory import make_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

H, W = 48, 64
SQUARE = [4, 4, 24, 4, 24, 24, 4, 24]  # a 20 x 20 square polygon at (4, 4)


def base_gt() -> dict:
    """One 48 x 64 image with one 20 x 20 square (annotation 1) and one 10 x 10 square (annotation 2)."""
    return {"images": [{"id": 7, "file_name": "a.png", "height": H, "width": W}],
            "categories": [{"id": 3, "name": "a"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 4, 20, 20], "area": 400.0, "iscrowd": 0,
                 "segmentation": [SQUARE]},
                {"id": 2, "image_id": 7, "category_id": 3, "bbox": [40, 20, 10, 10], "area": 100.0, "iscrowd": 0,
                 "segmentation": [[40, 20, 50, 20, 50, 30, 40, 30]]}]}


def predictions() -> list[dict]:
    """Detections of both squares plus one box on the region (30, 30)-(40, 40); masks from the boxes."""
    boxes = torch.tensor([[4.0, 4, 24, 24], [40, 20, 50, 30], [30, 30, 40, 40]])
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        m[y1:y2, x1:x2] = True
    return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.zeros(3, dtype=torch.int64),
             "masks": masks}]


def metric_stats(gt: dict) -> dict:
    metric = COCOMetric(gt, [3], backend="pycocotools")
    metric.update(predictions(), [7])
    return metric.compute()


def raw_pycocotools(gt: dict) -> float:
    """COCOeval straight on the json (what the metric did before): segm mAP of the predictions above."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dts = []
        for box, score, mask in zip(*(predictions()[0][k] for k in ("boxes", "scores", "masks"))):
            rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            x1, y1, x2, y2 = box.tolist()
            dts.append({"image_id": 7, "category_id": 3, "score": float(score), "segmentation": rle,
                        "bbox": [x1, y1, x2 - x1, y2 - y1]})
        coco_eval = COCOeval(coco, coco.loadRes(dts), "segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return float(coco_eval.stats[0])


def _with(edit) -> dict:
    gt = base_gt()
    edit(gt["annotations"][1])
    return gt


def _drop_second(gt: dict) -> dict:
    gt["annotations"] = gt["annotations"][:1]
    return gt


# (name, how annotation 2 is broken, what the loader makes of it as a file, pycocotools' error)
SKIPPED = [  # the loader skips the annotation: the metric evaluates as if it were not in the file
    ("4-number polygon", lambda a: a.update(segmentation=[[40, 20, 50, 30]]), "polygon under 3 points", TypeError),
    ("2-point polygon and a 3-point part of odd length",
     lambda a: a.update(segmentation=[[40, 20, 50], [40, 20, 50, 20, 50, 30, 40]]), "polygon under 3 points", Exception),
    ("empty polygon part", lambda a: a.update(segmentation=[[]]), "polygon under 3 points", Exception),
    ("empty polygon list", lambda a: a.update(segmentation=[]), "polygon under 3 points", IndexError),
]


@pytest.mark.parametrize("name, edit, reason, error", SKIPPED, ids=[c[0] for c in SKIPPED])
def test_skipped_annotation_evaluates_as_absent(name, edit, reason, error):
    gt = _with(edit)
    with pytest.raises(error):
        raw_pycocotools(gt)  # what training validation and experiments.evaluate died of
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = metric_stats(gt)
    messages = [str(w.message) for w in caught if "degenerate" in str(w.message)]
    assert messages == [f"annotation dict: skipped 1 degenerate annotation(s) ({reason}: 1)"]
    assert stats == metric_stats(_drop_second(base_gt()))
    assert stats["segm_mAP"] < 1  # annotation 1 matched, the 3rd detection a false positive


def test_the_metric_warns_exactly_as_the_loader(tmp_path):
    ann_file, img_dir = make_coco(tmp_path, num_images=2, instances=2)
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["segmentation"] = [[1, 1, 5, 5]]
    data["annotations"][1]["bbox"][2] = 0.5
    ann_file.write_text(json.dumps(data))
    messages = []
    for build in (lambda: CocoAnnotations(ann_file, img_dir), lambda: COCOMetric(str(ann_file), [3, 7, 100])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build()
        messages.append([str(w.message) for w in caught if "degenerate" in str(w.message)])
    assert messages[0] == messages[1] == [
        f"{ann_file}: skipped 2 degenerate annotation(s) (box under 1 px: 1, polygon under 3 points: 1)"]
    # The metric's ground truth is the loader's instances (crowd regions aside), image by image.
    gt = CocoGroundTruth(ann_file).dataset
    for record in CocoAnnotations(ann_file, img_dir).records:
        anns = [a for a in gt["annotations"] if a["image_id"] == record.image_id and not a["iscrowd"]]
        assert len(anns) == len(record.ann_ids)
        for a, box in zip(anns, record.boxes):
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], box, atol=1e-4)


def test_crowd_without_segmentation_is_its_box():
    gt = _with(lambda a: (a.update(iscrowd=1), a.pop("segmentation")))
    with pytest.raises(KeyError, match="segmentation"):
        raw_pycocotools(gt)
    region = _with(lambda a: a.update(iscrowd=1, segmentation=[[40, 20, 50, 20, 50, 30, 40, 30]]))
    crowd = CocoGroundTruth(gt).dataset["annotations"][1]
    assert (crowd["iscrowd"], crowd["segmentation"]) == (1, [[40, 20, 50, 20, 50, 30, 40, 30]])
    assert metric_stats(gt) == metric_stats(region)


def test_missing_area_is_the_mask_area_and_missing_iscrowd_is_zero():
    no_area = _with(lambda a: a.pop("area"))
    with pytest.raises(KeyError, match="area"):
        raw_pycocotools(no_area)
    assert CocoGroundTruth(no_area).dataset["annotations"][1]["area"] == 100.0  # the rasterised square
    assert metric_stats(no_area) == metric_stats(base_gt())
    no_crowd = _with(lambda a: a.pop("iscrowd"))
    with pytest.raises(KeyError, match="iscrowd"):
        raw_pycocotools(no_crowd)
    assert metric_stats(no_crowd) == metric_stats(base_gt())


def test_annotation_id_zero_counts_its_match():
    """pycocotools marks a matched detection by the ground truth's id, so a match to id 0 counted as a
    false positive; the metric's ground truth numbers annotations 1..N."""
    gt = base_gt()
    gt["annotations"][0]["id"] = 0
    assert raw_pycocotools(gt) < raw_pycocotools(base_gt())
    assert metric_stats(gt) == metric_stats(base_gt())


def test_the_input_is_not_modified_and_a_coco_object_works():
    gt = _with(lambda a: a.pop("area"))
    before = copy.deepcopy(gt)
    stats = metric_stats(gt)
    assert gt == before
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    metric = COCOMetric(coco, [3], backend="pycocotools")
    metric.update(predictions(), [7])
    assert metric.compute() == stats


def test_problems_raise_the_loaders_error():
    gt = _with(lambda a: a.update(segmentation={"size": [H, W], "counts": "not an rle"}))
    with pytest.raises(DatasetError, match=r"annotation dict: annotation 2 \(image 7\) has a malformed compressed RLE"):
        COCOMetric(gt, [3])


def test_dataset_accepted_by_the_loader_evaluates_in_training_and_evaluate(tmp_path):
    """The issue's crash: validation at the end of the first epoch died in COCOeval. Now a run with
    these annotations in its val file validates, and experiments.evaluate writes metrics."""
    from experiments import evaluate, train
    from rtmdet.lightning_module import RTMDetInsModule

    ann_file, img_dir = make_coco(tmp_path / "data", num_images=2, instances=3)
    data = json.loads(ann_file.read_text())
    anns = data["annotations"]
    anns[0]["segmentation"] = [[1, 1, 5, 5]]  # read as a box by pycocotools
    anns[1].pop("area")
    anns[2].update(iscrowd=1)
    anns[2].pop("segmentation")
    anns[3]["segmentation"] = [[]]
    ann_file.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = train.main([f"--data.train_ann_file={ann_file}", f"--data.train_img_dir={img_dir}",
                              f"--data.val_ann_file={ann_file}", f"--data.val_img_dir={img_dir}",
                              "--data.img_size=64", "--data.batch_size=2", "--data.val_batch_size=2",
                              "--data.num_workers=0", "--trainer.logger=false", "--trainer.max_epochs=1",
                              "--trainer.check_val_every_n_epoch=1",
                              "--trainer.limit_train_batches=1", "--trainer.enable_model_summary=false",
                              f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert payload["global_step"] == 1 and isinstance(payload["segm_mAP"], float)
    assert 0.0 <= payload["segm_mAP"] <= 1.0

    module = RTMDetInsModule("tiny", num_classes=3)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    output = tmp_path / "eval.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = evaluate.main(["--ckpt", str(ckpt), "--data.val_ann_file", str(ann_file), "--data.val_img_dir",
                              str(img_dir), "--data.img_size", "64", "--data.num_workers", "0", "--output",
                              str(output), "--device", "cpu"])
    assert code == 0
    assert 0.0 <= json.loads(output.read_text())["segm_mAP"] <= 1.0


# ------------------------------------------------------------------ what would crash pycocotools' C code

def test_far_away_polygon_vertices_are_clipped(tmp_path):
    """A vertex at 1e9 makes pycocotools' rasteriser overflow (segmentation fault); such parts are
    clipped to one image size around the image, which keeps the pixels (up to edge rounding)."""
    gt = _with(lambda a: a.update(segmentation=[[40, 20, 1e9, 20, 40, 1e9]]))
    part = CocoGroundTruth(gt).dataset["annotations"][1]["segmentation"][0]
    assert max(part) <= 2 * W and min(part) >= -W
    mask = decode_masks([[part]], H, W).to_array()[0]
    assert mask[20:, 40:].all() and not mask[:20].any() and not mask[:, :40].any()  # the whole corner
    metric_stats(gt)  # no crash
    # Reaching 10 image sizes out (pycocotools still copes): clipping changes a few outline pixels at most.
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = np.c_[rng.uniform(-10 * W, 11 * W, 5), rng.uniform(-10 * W, 11 * W, 5)].ravel().tolist()
        raw = mask_util.decode(mask_util.frPyObjects([p], H, W))[..., 0].astype(bool)
        c = clip_polygon(p, -W, -W, 2 * W, 2 * W)
        clipped = decode_masks([[c]], H, W).to_array()[0] if c else np.zeros((H, W), bool)
        padded = np.pad(raw, 1, mode="edge")
        edge = np.zeros_like(raw)  # pixels with a 4-neighbour of the other value
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            edge |= padded[dy:dy + H, dx:dx + W] != raw
        assert edge[raw != clipped].all() and (raw != clipped).sum() <= 0.01 * H * W


def test_clip_polygon_known_values():
    assert clip_polygon([0, 0, 10, 0, 0, 10], -1, -1, 20, 20) == [0, 0, 10, 0, 0, 10]  # inside: unchanged
    # a right triangle cut by x <= 5: the quadrilateral (0,0) (5,0) (5,5) (0,10)
    assert clip_polygon([0, 0, 10, 0, 0, 10], -1, -1, 5, 20) == [0, 0, 5, 0, 5, 5, 0, 10]
    assert clip_polygon([30, 30, 40, 30, 30, 40], 0, 0, 20, 20) == []  # outside


@pytest.mark.parametrize("counts, why", [
    ("0!!", "characters outside"),
    ("PP", "last number is cut short"),  # 'P' = 32 + 16: 'more' set on the last chunk
    ("0" + "o" * 9 + "0", "longer than 32 bits"),
    ("@0", "negative or over 32 bits"),  # '@': a one-chunk negative number
    ("0" * 3, "sum 0, the image has 3072"),
])
def test_malformed_compressed_rle_is_reported_not_decoded(counts, why):
    gt = _with(lambda a: a.update(segmentation={"size": [H, W], "counts": counts}))
    with pytest.raises(DatasetError, match=rf"annotation 2 \(image 7\) has (a )?malformed .*{why}"):
        CocoGroundTruth(gt)


def test_uncompressed_rle_needs_whole_non_negative_runs():
    for counts in ([-10, H * W + 10], [0.5, H * W - 0.5]):
        gt = _with(lambda a: a.update(segmentation={"size": [H, W], "counts": counts}))
        with pytest.raises(DatasetError, match=r"annotation 2 \(image 7\) has malformed RLE counts \(runs must be"):
            CocoGroundTruth(gt)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"][0].update(id=2**63), "image id 9223372036854775808 is outside the 64-bit integer range"),
    (lambda d: d["annotations"][0].update(id=-2**64), "is outside the 64-bit integer range"),
    (lambda d: d["categories"][0].update(id=2**70), "category id 1180591620717411303424 is outside"),
    (lambda d: d["images"][0].update(height=47.5), "image 7 has size 64x47.5 (width x height must be whole"),
    (lambda d: d["images"][0].update(width=True), "image 7 has size Truex48"),
    (lambda d: d["images"][0].update(height=2**16, width=2**16), "image 7 has size 65536x65536: 2^32 pixels or more"),
    (lambda d: d["annotations"][0].update(iscrowd=2), "annotation 1 (image 7) has iscrowd 2; expected 0 or 1"),
    (lambda d: d["annotations"][0].update(iscrowd=1, segmentation={"size": [1, 1], "counts": [1]}),
     "annotation 1 (image 7) has an RLE of size [1, 1], image is [48, 64]"),  # crowd regions are checked too
])
def test_ids_sizes_and_flags_out_of_range_are_problems(edit, message):
    gt = base_gt()
    edit(gt)
    with pytest.raises(DatasetError) as info:
        CocoAnnotations(gt, "")
    assert message in str(info.value)
