"""Tiled prediction (rtmdet/tiling.py) and the tiling flags of predict / evaluate.

A stand-in network whose outputs are known in closed form makes the merge testable: it finds the
pure-red and pure-blue pixels of its input (classes 0 and 1), fires one prior per class at the
object's centre cell with its exact box, and hands the dynamic mask head a prototype that is the
class's pixel fraction per stride-8 cell, with a kernel that thresholds it at one half. Being local
and aligned to the 8-px grid, it predicts the same mask for an object whatever window it sits in,
as long as the window's origin is a multiple of 8.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from benchmarks.latency import busy_head
from benchmarks.tiling import make_sheet
from experiments import evaluate, predict
from rtmdet import InstancePostProcess, RawOutputs, build_model, preprocess
from rtmdet.crop_masks import CropMasks
from rtmdet.preprocess import MEAN_BGR, STD_BGR
from rtmdet.tiling import TiledPredictor, tile_windows

from .test_entry_points import ws  # noqa: F401  (the known-head checkpoint and its sprite images)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

COLOURS = ((255, 0, 0), (0, 0, 255))  # class 0 red, class 1 blue


class ColourNet(nn.Module):
    """Stand-in for RTMDetIns: one instance per colour present (see module doc)."""

    strides = (8, 16, 32)
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a device and dtype for the predictor

    def forward(self, x: torch.Tensor) -> RawOutputs:
        B, _, H, W = x.shape
        bgr = x * x.new_tensor(STD_BGR).view(1, 3, 1, 1) + x.new_tensor(MEAN_BGR).view(1, 3, 1, 1)
        rgb = bgr.flip(1).round()
        cls = [torch.full((B, 2, H // s, W // s), -10.0) for s in self.strides]
        box = [torch.ones(B, 4, H // s, W // s) for s in self.strides]
        ker = [torch.zeros(B, 169, H // s, W // s) for s in self.strides]
        protos = torch.zeros(B, 8, H // 8, W // 8)
        for c, colour in enumerate(COLOURS):
            hit = (rgb == rgb.new_tensor(colour).view(1, 3, 1, 1)).all(1).float()  # (B, H, W)
            protos[:, c] = F.avg_pool2d(hit[:, None], 8)[:, 0]
            for b in range(B):
                ys, xs = hit[b].nonzero(as_tuple=True)
                if not len(ys):
                    continue
                x0, y0, x1, y1 = xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1
                cy, cx = (y0 + y1) // 2 // 8, (x0 + x1) // 2 // 8
                px, py = cx * 8, cy * 8
                cls[0][b, c, cy, cx] = 5.0
                box[0][b, :, cy, cx] = torch.tensor([px - x0, py - y0, x1 - px, y1 - py], dtype=torch.float32)
                params = torch.zeros(169)
                params[2 + c] = 1.0  # layer 1, channel 0 = prototype c
                params[80] = 1.0  # layer 2, channel 0 = channel 0
                params[144], params[168] = 20.0, -10.0  # logit = 20 * fraction - 10 > 0 iff fraction > 1/2
                ker[0][b, :, cy, cx] = params
        return RawOutputs(cls, box, ker, protos)


def scene(width: int, height: int, rects: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Grey image with filled rectangles (x0, y0, x1, y1, class)."""
    image = np.full((height, width, 3), 90, np.uint8)
    for x0, y0, x1, y1, c in rects:
        image[y0:y1, x0:x1] = COLOURS[c]
    return image


@torch.no_grad()
def plain(net, image: np.ndarray, size: int) -> dict:
    x, metas = preprocess(image, size)
    return InstancePostProcess(mask_format="crops")(net(x), metas)[0]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


# ----------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("h, w, tile, overlap", [(100, 100, 128, 0.2), (224, 130, 128, 0.2), (1000, 700, 256, 0.3),
                                                 (640, 641, 640, 0.0)])
def test_windows_cover_the_image_with_the_overlap(h, w, tile, overlap):
    win = tile_windows(h, w, tile, overlap)
    covered = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in win.tolist():
        assert x1 - x0 == min(tile, w) and y1 - y0 == min(tile, h)  # full windows, inside the image
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    for axis in (0, 1):
        starts = sorted(set(win[:, axis].tolist()))
        assert all(b - a <= tile * (1 - overlap) for a, b in zip(starts, starts[1:]))  # neighbours share enough


def test_one_window_equals_plain_predict():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3).eval()
    busy_head(model)
    image = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    ref = plain(model, image, 256)  # the official cap of 100 instances, reached here
    got, found = TiledPredictor(model, InstancePostProcess(), 256, tile_size=256, max_det=100)(image)
    assert len(got["scores"]) == len(ref["scores"]) == 100 and found == 101  # NMS ran to one past the cap
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(got[k], ref[k]), k
    assert torch.equal(got["masks"].to_dense(), ref["masks"].to_dense())


# --------------------------------------------------------------------------------------- merge

def test_seam_instance_comes_out_once_with_its_whole_mask():
    net = ColourNet()
    # Windows of 128 with 0.2 overlap over a 224-wide image start at x = 0 and 96 (multiples of 8).
    # Red straddles both inner edges (cut in both windows), blue sits whole in the overlap band.
    red, blue = (80, 40, 144, 88, 0), (100, 16, 124, 32, 1)
    image = scene(224, 128, [red, blue])
    assert tile_windows(128, 224, 128, 0.2)[:, 0].tolist() == [0, 96]
    got, found = TiledPredictor(net, InstancePostProcess(), 128, tile_size=128, tile_overlap=0.2)(image)
    assert found == 2 and sorted(got["labels"].tolist()) == [0, 1]
    # Against the untiled prediction of a region holding red whole, at the same scale and 8-px grid.
    region = plain(net, image[:, 48:176], 128)
    k_region = int((region["labels"] == 0).nonzero()[0])
    want = region["masks"][[k_region]].shift(48, 0, (128, 224)).to_dense()[0]
    k = int((got["labels"] == 0).nonzero()[0])
    assert mask_iou(got["masks"][[k]].to_dense()[0], want) >= 0.99
    assert got["boxes"][k].tolist() == [80.0, 40.0, 144.0, 88.0]  # the union of the two parts' boxes
    truth = torch.zeros(128, 224, dtype=torch.bool)
    truth[40:88, 80:144] = True
    assert mask_iou(got["masks"][[k]].to_dense()[0], truth) >= 0.99


def test_cut_part_gives_way_to_the_window_holding_it_whole():
    net = ColourNet()
    # Red lies whole in the first window (x < 128) but crosses the second window's left edge (96).
    image = scene(224, 128, [(72, 40, 112, 80, 0)])
    got, found = TiledPredictor(net, InstancePostProcess(), 128, tile_size=128)(image)
    assert found == 1
    assert got["boxes"][0].tolist() == [72.0, 40.0, 112.0, 80.0]


def test_touching_sprites_of_one_class_stay_apart():
    net = ColourNet()
    # Two red squares side by side would be one connected blob: keep them in separate windows' interiors
    # instead and check the mask-IoU NMS keeps distinct sprites of one class (box IoU 0, mask IoU 0).
    image = scene(352, 128, [(8, 40, 48, 80, 0), (280, 40, 320, 80, 0)])
    got, found = TiledPredictor(net, InstancePostProcess(), 128, tile_size=128)(image)
    assert found == 2 and got["labels"].tolist() == [0, 0]


def test_max_det_cap_reports_what_it_cut():
    image = scene(352, 128, [(8, 40, 48, 80, 0), (200, 40, 240, 80, 1), (280, 40, 320, 80, 0)])
    got, found = TiledPredictor(ColourNet(), InstancePostProcess(), 128, tile_size=128, max_det=2)(image)
    assert len(got["scores"]) == 2 and found == 3


def test_crop_masks_rle_equals_dense_encoding():
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(5, 23, 31, generator=g) > 0.6
    dense[1] = False
    dense[2] = True
    dense[3, :, 4:9] = True  # full-height columns: runs continue across columns
    masks = CropMasks.from_dense(dense)
    want = mask_util.encode(np.asfortranarray(dense.numpy().transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in masks.to_rle()] == [r["counts"] for r in want]
    assert torch.equal(masks.to_dense(), dense)
    assert torch.equal(masks.areas(), dense.flatten(1).sum(1))


def test_crop_masks_boxes_are_the_tight_boxes_whether_or_not_known_tight():
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(6, 17, 29, generator=g) > 0.97
    dense[2] = False
    want = torch.tensor([[0, 0, 0, 0] if not m.any() else
                         [m.any(0).nonzero().min(), m.any(1).nonzero().min(), m.any(0).nonzero().max() + 1,
                          m.any(1).nonzero().max() + 1] for m in dense])
    loose = CropMasks(list(dense), torch.tensor([[0, 0, 29, 17]] * 6), (17, 29))
    tight = CropMasks.from_dense(dense)
    assert not loose.is_tight and tight.is_tight and tight.tight() is tight
    assert torch.equal(loose.boxes(), want) and torch.equal(tight.boxes(), want)
    assert torch.equal(tight.regions, want) and tight[[0, 2]].is_tight and CropMasks.cat([tight, tight]).is_tight
    assert not tight.shift(3, 0, (17, 29)).is_tight  # a shift can cut a mask: tightness is not claimed
    assert torch.equal(tight.shift(-5, 2, (17, 29)).boxes(), CropMasks.from_dense(
        torch.nn.functional.pad(dense, (0, 0, 2, 0))[:, :17, :].roll(-5, 2) & (torch.arange(29) < 24)).boxes())


def test_union_of_parts_ignores_empty_ones():
    """A group holding an empty part (a sliver whose mask vanished): the merged mask and its region are
    those of the non-empty parts, tight."""
    from rtmdet.tiling import _union

    dense = torch.zeros(3, 40, 60, dtype=torch.bool)
    dense[0, 10:20, 30:40] = True
    dense[2, 15:25, 38:50] = True
    pred = {"boxes": torch.tensor([[30.0, 10, 40, 20], [0, 0, 2, 2], [38, 15, 50, 25]]),
            "scores": torch.tensor([0.9, 0.3, 0.8]), "labels": torch.tensor([1, 1, 1]),
            "masks": CropMasks.from_dense(dense)}
    merged, rank = _union(pred, [[0, 1, 2]], torch.tensor([2, 2, 0]))
    assert merged["masks"].regions.tolist() == [[30, 10, 50, 25]] and merged["masks"].is_tight
    assert torch.equal(merged["masks"].to_dense()[0], dense[0] | dense[2])
    assert merged["boxes"].tolist() == [[0.0, 0.0, 50.0, 25.0]] and merged["scores"].tolist() == [pytest.approx(0.9)]
    assert rank.tolist() == [0] and merged["labels"].tolist() == [1]


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def sheet(ws, tmp_path_factory):  # noqa: F811
    """A 2 x 2 collage of the 64-px sprite images (128 x 128) as a one-image COCO dataset."""
    root = tmp_path_factory.mktemp("sheet")
    ann_file = make_sheet(ws["ann_file"], ws["img_dir"], root, grid=(2, 2), num_sheets=1)
    return {"ann_file": ann_file, "img_dir": root / "images"}


def test_predict_cli_tiles_large_images_and_reports_the_cap(ws, sheet, tmp_path):  # noqa: F811
    out = tmp_path / "pred"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(sheet["img_dir"]), "--output", str(out),
                             "--tile-size", "64", "--max-det", "5"])
    assert code == 0
    assert "had more instances than --max-det" in stderr.getvalue() and "kept the best 5" in stderr.getvalue()
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 5
    assert all(r["segmentation"]["size"] == [128, 128] for r in results)
    assert Image.open(out / "overlays" / "sheet_000.png").size == (128, 128)
    # The known head fires everywhere (4 diamonds per 64-px window): far more than 5 instances.
    with contextlib.redirect_stderr(io.StringIO()):
        assert predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(sheet["img_dir"]), "--output",
                             str(tmp_path / "all")]) == 0  # auto: windows of the checkpoint's 64 px
    everything = json.loads((tmp_path / "all" / "results.json").read_text())
    assert len(everything) > 9


def test_evaluate_cli_with_tiles(ws, sheet, tmp_path):  # noqa: F811
    out = tmp_path / "metrics.json"
    code = evaluate.main(["--ckpt", str(ws["ckpt"]), "--data.val_ann_file", str(sheet["ann_file"]),
                          "--data.val_img_dir", str(sheet["img_dir"]), "--tile-size", "64", "--output", str(out),
                          "--data.num_workers", "0"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["tile_size"] == 64 and 0 <= payload["segm_mAP"] <= 1
    assert payload["metric_max_dets"] == 300  # a tiled image keeps up to 300, and all of them are scored
    detections = json.loads(out.with_name("metrics.detections.json").read_text())
    assert detections and all(d["segmentation"]["size"] == [128, 128] for d in detections)


def test_upscale_sees_whole_and_tiled_images_k_times_larger(ws, sheet, tmp_path):  # noqa: F811
    """--upscale 2: the input doubles (128 for the 64-px checkpoint) and auto windows stay 64 original
    pixels, so the 128-px sheet is tiled like --img-size 128 --tile-size 64 (plain --img-size 128 would
    letterbox it whole), and a 64-px image is letterboxed whole like --data.img_size 128."""
    runs = {}
    for name, extra in (("upscale", ["--upscale", "2"]), ("explicit", ["--img-size", "128", "--tile-size", "64"]),
                        ("input_only", ["--img-size", "128"])):
        with contextlib.redirect_stderr(io.StringIO()):
            assert predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(sheet["img_dir"]), "--output",
                                 str(tmp_path / name), "--max-det", "300"] + extra) == 0
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["upscale"] == runs["explicit"] and runs["upscale"] != runs["input_only"]
    metrics = {}
    for name, extra in (("upscale", ["--upscale", "2"]), ("input", ["--data.img_size", "128"])):
        out = tmp_path / f"{name}.json"
        assert evaluate.main(["--ckpt", str(ws["ckpt"]), "--data.val_ann_file", str(ws["ann_file"]),
                              "--data.val_img_dir", str(ws["img_dir"]), "--output", str(out),
                              "--data.num_workers", "0"] + extra) == 0
        metrics[name] = json.loads(out.read_text())
    assert metrics["upscale"]["img_size"] == metrics["input"]["img_size"] == 128
    assert (metrics["upscale"]["upscale"], metrics["input"]["upscale"]) == (2, 1)
    assert {k: v for k, v in metrics["upscale"].items() if k.startswith(("segm_", "bbox_"))} == {
        k: v for k, v in metrics["input"].items() if k.startswith(("segm_", "bbox_"))}


def test_upscale_must_be_a_whole_factor(ws, tmp_path):  # noqa: F811
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                      "--upscale", "0"])
    assert "--upscale must be a whole factor of at least 1, got 0" in stderr.getvalue()
