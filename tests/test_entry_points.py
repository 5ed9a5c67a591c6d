"""The command-line tools (predict, evaluate, export) and ``rtmdet.inference.load_model``, end to end.

The model is RTMDet-Ins-tiny with hand-set head weights, so that predictions are known without
training: on stride 32 every prior predicts class 1 ("heart") at sigmoid(2) = 0.88 with a 64 px box
centred on it and a diamond mask |dx| + |dy| < 20 px around it; the other levels predict nothing.
On a 64 px input that is 4 instances per image, with masks cut by the image border.
"""

import contextlib
import io
import json
import shutil

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datamodules.sprites import generate_sprite_dataset
from experiments import evaluate, export, predict
from rtmdet import CheckpointError, InstancePostProcess, RawOutputs, build_model, preprocess, to_mmdet_state_dict
from rtmdet.checkpoint import load_checkpoint, load_model
from rtmdet.coco_eval import STAT_NAMES
from rtmdet.inference import coco_results, cutout
from rtmdet.lightning_module import RTMDetInsModule

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

S = 64  # input size
NUM_CLASSES = 8  # the sprite dataset's categories
RADIUS = 20.0  # diamond mask radius in input pixels


def set_known_head(model) -> None:
    """The hand-set head described in the module docstring."""
    head = model.head
    with torch.no_grad():
        for lvl in range(3):
            for conv in (head.rtm_cls[lvl], head.rtm_reg[lvl], head.rtm_kernel[lvl]):
                conv.weight.zero_()
            head.rtm_cls[lvl].bias.fill_(-10.0)
            head.rtm_reg[lvl].bias.fill_(1.0)  # distances = stride
        head.rtm_cls[2].bias[1] = 2.0
        # Dynamic params (weights first: W1 8x10, W2 8x8, W3 1x8, then b1 8, b2 8, b3 1); input [rel_x, rel_y, F].
        w1, w2, w3 = torch.zeros(8, 10), torch.zeros(8, 8), torch.zeros(1, 8)
        w1[0, 0], w1[1, 0], w1[2, 1], w1[3, 1] = 1, -1, 1, -1  # relu(+-rel_x), relu(+-rel_y)
        w2[:4, :4] = torch.eye(4)
        w3[0, :4] = -1  # logit = b3 - |rel_x| - |rel_y|, rel in units of 8 * stride
        b3 = torch.tensor([RADIUS / (8 * 32)])
        head.rtm_kernel[2].bias.copy_(torch.cat([w1.flatten(), w2.flatten(), w3.flatten(), torch.zeros(16), b3]))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A sprite dataset (4 images of 64 px), a Lightning checkpoint of the known model, its mmdet twin."""
    root = tmp_path_factory.mktemp("entry_points")
    ann_file = generate_sprite_dataset(root / "data", num_images=4, image_size=S)
    img_dir = root / "data" / "train"
    torch.manual_seed(0)
    module = RTMDetInsModule(size="tiny", num_classes=NUM_CLASSES)
    set_known_head(module.model)
    ckpt = root / "tiny.ckpt"
    torch.save({  # what Lightning writes, less the optimiser and loop states
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.0",
        "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": {"val_ann_file": str(ann_file), "val_img_dir": str(img_dir),
                                        "img_size": S, "nearest_resize": True},
    }, ckpt)
    mmdet_ckpt = root / "tiny_mmdet.pth"
    torch.save({"meta": {}, "state_dict": to_mmdet_state_dict(module.model)}, mmdet_ckpt)
    return {"root": root, "ann_file": ann_file, "img_dir": img_dir, "ckpt": ckpt, "mmdet_ckpt": mmdet_ckpt,
            "model": module.model.eval()}


# ------------------------------------------------------------------------------------ load_model

def test_load_model_reads_our_checkpoint_and_mmdet_twin(ws):
    model, names = load_model(ws["ckpt"])
    assert (model.size, model.num_classes, model.training) == ("tiny", NUM_CLASSES, False)
    assert names[:2] == ("invader", "heart")  # from the datamodule's annotation file
    for a, b in zip(model.state_dict().values(), ws["model"].state_dict().values()):
        assert torch.equal(a, b)
    loaded = load_checkpoint(ws["mmdet_ckpt"])  # size recognised from the shapes
    assert (loaded.format, loaded.model.size, loaded.model.num_classes) == ("mmdet", "tiny", NUM_CLASSES)
    assert torch.equal(loaded.model.head.rtm_kernel[2].bias, ws["model"].head.rtm_kernel[2].bias)


def test_load_model_clear_errors(ws, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt is not a PyTorch checkpoint"):
        load_model(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
    for path in (ws["ckpt"], ws["mmdet_ckpt"]):
        with pytest.raises(CheckpointError, match=r"holds RTMDet-Ins-tiny weights, but size 's' was requested"):
            load_model(path, size="s")
    with pytest.raises(CheckpointError, match="8-class head, but num_classes=80"):
        load_model(ws["mmdet_ckpt"], num_classes=80)
    other = tmp_path / "s.pth"  # an RTMDet-Ins-s mmdet checkpoint asked for as tiny
    torch.save(to_mmdet_state_dict(build_model("s", 3)), other)
    with pytest.raises(CheckpointError, match="holds RTMDet-Ins-s weights"):
        load_model(other, size="tiny")
    ckpt = torch.load(ws["ckpt"], weights_only=True)
    ckpt["state_dict"]["model.neck.out_convs.0.conv.weight"] = torch.zeros(3, 3)
    del ckpt["state_dict"]["model.head.rtm_reg.1.bias"]
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(CheckpointError, match=r"broken\.ckpt[\s\S]*mis-shaped: neck\.out_convs\.0\.conv\.weight"
                                              r"[\s\S]*missing: head\.rtm_reg\.1\.bias"):
        load_model(broken)


def test_cutout_and_coco_results_helpers():
    image = np.arange(6 * 8 * 4, dtype=np.uint8).reshape(6, 8, 4)  # RGBA
    mask = np.zeros((6, 8), bool)
    mask[2:4, 3:7] = True
    mask[3, 6] = False
    rgba, box = cutout(image, mask)
    assert box == (3, 2, 7, 4) and rgba.shape == (2, 4, 4)
    assert np.array_equal(rgba[..., :3], image[2:4, 3:7, :3])
    assert np.array_equal(rgba[..., 3], np.minimum(mask[2:4, 3:7] * 255, image[2:4, 3:7, 3]))
    assert cutout(image[..., :3], np.zeros((6, 8), bool)) is None
    pred = {"boxes": torch.tensor([[3.0, 2.0, 7.0, 4.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([2]), "masks": torch.from_numpy(mask)[None]}
    (r,) = coco_results(pred, image_id=7, label_to_cat_id=[1, 5, 9])
    assert (r["image_id"], r["category_id"], r["bbox"], r["area"]) == (7, 9, [3.0, 2.0, 4.0, 2.0], 7)
    assert np.array_equal(mask_util.decode(r["segmentation"]).astype(bool), mask)


# --------------------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def predictions(ws):
    """Run predict once on a folder: 3 sprite images (one cropped to 48 x 64), an RGBA one, garbage."""
    src = ws["root"] / "inputs"
    src.mkdir()
    files = sorted(ws["img_dir"].glob("*.png"))
    shutil.copy(files[0], src / "a.png")
    shutil.copy(files[1], src / "b.png")
    Image.open(files[2]).crop((0, 0, 64, 48)).save(src / "c_wide.jpg", quality=95)
    rgba = np.dstack([np.asarray(Image.open(files[3])), np.full((S, S), 128, np.uint8)])
    rgba[:, :16, 3] = 0
    Image.fromarray(rgba, "RGBA").save(src / "d_rgba.png")
    (src / "garbage.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("not an image")
    out = ws["root"] / "pred"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(src), "--output", str(out),
                             "--batch-size", "3"])
    return {"code": code, "src": src, "out": out, "rgba": rgba, "stderr": stderr.getvalue()}


def test_predict_outputs(predictions):
    assert predictions["code"] == 0
    assert "1 file(s) could not be read" in predictions["stderr"] and "garbage.png" in predictions["stderr"]
    assert "notes.txt" not in predictions["stderr"]  # not an image extension: not tried
    out = predictions["out"]
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["a.png", "b.png", "c_wide.png", "d_rgba.png"]
    assert Image.open(out / "overlays" / "c_wide.png").size == (64, 48)  # original size
    results = json.loads((out / "results.json").read_text())
    assert {r["file_name"] for r in results} == {"a.png", "b.png", "c_wide.jpg", "d_rgba.png"}
    assert all(r["category_name"] == "heart" and r["category_id"] == 1 and r["score"] > 0.85 for r in results)
    assert len([r for r in results if r["file_name"] == "a.png"]) == 4
    assert all(r["cutout"] for r in results)
    for r in results:
        mask = mask_util.decode(r["segmentation"]).astype(bool)
        assert 0 < mask.sum() < mask.size  # a diamond cut by the border, not the whole image
        cut = Image.open(out / r["cutout"])
        assert cut.mode == "RGBA"
        cut = np.asarray(cut)
        ys, xs = np.nonzero(mask)
        assert cut.shape == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, 4)  # tight box
        window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        if r["file_name"] == "d_rgba.png":  # alpha = mask x the image's own alpha; colour = original
            rgba = predictions["rgba"][window]
            assert np.array_equal(cut[..., 3], np.minimum(mask[window] * 255, rgba[..., 3]))
            assert np.array_equal(cut[..., :3], rgba[..., :3])
        else:
            assert np.array_equal(cut[..., 3], mask[window] * 255)
            original = np.asarray(Image.open(predictions["src"] / r["file_name"]).convert("RGB"))
            assert np.array_equal(cut[..., :3], original[window])


def test_predict_failures_and_errors(ws, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    (bad / "y.jpg").write_bytes(b"")
    assert predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(bad), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "2 file(s) could not be read" in err and "x.png" in err and "y.jpg" in err
    one = sorted(ws["img_dir"].glob("*.png"))[0]
    assert predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(one), "--output", str(tmp_path / "one"),
                         "--no-nearest", "--img-size", "96"]) == 0
    assert (tmp_path / "one" / "overlays" / f"{one.stem}.png").exists()
    assert predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(tmp_path / "nope"), "--output", "o"]) == 2
    assert "input not found" in capsys.readouterr().err
    garbage = tmp_path / "g.ckpt"
    garbage.write_bytes(b"garbage")
    assert predict.main(["--ckpt", str(garbage), "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "g.ckpt is not a PyTorch checkpoint" in err and "Traceback" not in err


def test_predict_refine_masks_snaps_to_the_sprite(ws, tmp_path):
    """A flat red square inside the known model's diamond around (32, 32): refined, that mask is the
    square; the diamonds on flat grey alone have no colour evidence and stay as predicted."""
    image = np.full((S, S, 3), 90, np.uint8)
    image[27:37, 27:37] = (200, 50, 50)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(image).save(src / "square.png")
    masks = {}
    for flag in ([], ["--refine-masks"]):
        out = tmp_path / f"out{len(flag)}"
        assert predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(src), "--output", str(out), *flag]) == 0
        results = json.loads((out / "results.json").read_text())
        masks[bool(flag)] = {tuple(r["bbox"]): mask_util.decode(r["segmentation"]).astype(bool) for r in results}
    assert masks[False].keys() == masks[True].keys() and len(masks[True]) == 4
    square = np.zeros((S, S), bool)
    square[27:37, 27:37] = True
    changed = [k for k in masks[True] if not np.array_equal(masks[True][k], masks[False][k])]
    assert len(changed) == 1 and np.array_equal(masks[True][changed[0]], square)
    assert masks[False][changed[0]][square].all()


def test_refine_benchmark_scores_both_sides(ws, capsys):
    from benchmarks import refine_masks

    refine_masks.main(["--ckpt", str(ws["ckpt"]), "--ann-file", str(ws["ann_file"]), "--img-dir", str(ws["img_dir"])])
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["gt_instances"] > 0
    for side in ("predicted", "refined"):
        assert set(out[side]) >= {"mAP", "mAP_s", "boundary_f", "exact_share"}


# -------------------------------------------------------------------------------------- evaluate

def test_evaluate_writes_metrics(ws, predictions, tmp_path, capsys):
    output = tmp_path / "eval" / "results.json"
    code = evaluate.main(["--ckpt", str(ws["ckpt"]), "--data.val_ann_file", str(ws["ann_file"]),
                          "--data.val_img_dir", str(ws["img_dir"]), "--data.val_batch_size", "3",
                          "--data.num_workers", "0", "--output", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bbox" in printed and "segm" in printed and "mAP_50" in printed
    metrics = json.loads(output.read_text())
    assert (metrics["num_images"], metrics["img_size"], metrics["nearest_resize"]) == (4, S, True)
    detections = json.loads((tmp_path / "eval" / "results.detections.json").read_text())
    # The metrics are COCOeval's on the written detections (segm without their boxes, as mmdet).
    for t in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ws["ann_file"]))
            dts = [{k: v for k, v in d.items() if not (t == "segm" and k == "bbox")} for d in detections]
            coco_eval = COCOeval(gt, gt.loadRes(dts), t)
            coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
        assert [metrics[f"{t}_{k}"] for k in STAT_NAMES] == coco_eval.stats.tolist(), t
    # Against ground truth that is the model's own detections: AP and AR 1, but AR at 1 detection per image
    # 1 / 4 (4 instances an image); all instances are small (< 32^2 px), so medium and large have nothing (-1).
    gt = json.loads(ws["ann_file"].read_text())
    gt["annotations"] = [{"id": i + 1, "image_id": d["image_id"], "category_id": d["category_id"], "bbox": d["bbox"],
                          "area": float(mask_util.area(d["segmentation"])), "iscrowd": 0,
                          "segmentation": d["segmentation"]} for i, d in enumerate(detections)]
    own = tmp_path / "own.json"
    own.write_text(json.dumps(gt))
    out = tmp_path / "own_metrics.json"
    assert evaluate.main(["--ckpt", str(ws["ckpt"]), "--data.val_ann_file", str(own), "--data.val_img_dir",
                          str(ws["img_dir"]), "--data.num_workers", "0", "--output", str(out)]) == 0
    perfect = json.loads(out.read_text())
    expected = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 0.25, 1.0, 1.0, 1.0, -1.0, -1.0]  # in STAT_NAMES order
    for t in ("bbox", "segm"):
        assert [perfect[f"{t}_{k}"] for k in STAT_NAMES] == pytest.approx(expected, abs=1e-9), t
    assert len(detections) == 4 * 4 and {d["category_id"] for d in detections} == {2}  # label 1 = category 2
    assert all("segmentation" in d for d in detections)
    # The same instances as predict finds on the same image (a.png is 000000.png, image id 1).
    predicted = [r for r in json.loads((predictions["out"] / "results.json").read_text()) if r["file_name"] == "a.png"]
    evaluated = [d for d in detections if d["image_id"] == 1]
    key = lambda r: (r["segmentation"]["counts"], round(r["score"], 4))  # noqa: E731
    assert sorted(map(key, predicted)) == sorted(map(key, evaluated))
    for p, e in zip(sorted(predicted, key=key), sorted(evaluated, key=key)):
        np.testing.assert_allclose(p["bbox"], e["bbox"], atol=0.01)


@pytest.mark.parametrize("tiles", [[], ["--tile-size", "48"]], ids=["whole", "tiled"])
def test_evaluate_refine_masks_scores_the_refined_masks(ws, tmp_path, tiles):
    """evaluate --refine-masks writes (and scores) exactly refine_masks() of the plain run's masks, on the
    original image, whether images go through the batched loader or window by window; boxes unchanged."""
    from rtmdet.crop_masks import CropMasks
    from rtmdet.refine import refine_masks

    common = ["--ckpt", str(ws["ckpt"]), "--data.val_ann_file", str(ws["ann_file"]), "--data.val_img_dir",
              str(ws["img_dir"]), "--data.num_workers", "0", *tiles]
    runs = {}
    for flag in ([], ["--refine-masks"]):
        output = tmp_path / f"r{len(flag)}.json"
        assert evaluate.main([*common, "--output", str(output), *flag]) == 0
        runs[bool(flag)] = (json.loads(output.read_text()),
                            json.loads(output.with_name(output.stem + ".detections.json").read_text()))
    assert runs[True][0]["refine_masks"] is True and runs[False][0]["refine_masks"] is False
    plain, refined = runs[False][1], runs[True][1]
    assert [(d["image_id"], d["bbox"], d["score"]) for d in plain] == [(d["image_id"], d["bbox"], d["score"])
                                                                      for d in refined]
    images = {im["id"]: im["file_name"] for im in json.loads(ws["ann_file"].read_text())["images"]}
    changed = 0
    for image_id, name in images.items():
        mine = [i for i, d in enumerate(plain) if d["image_id"] == image_id]
        dense = torch.from_numpy(np.stack([mask_util.decode(plain[i]["segmentation"]) for i in mine]).astype(bool))
        boxes = torch.tensor([[plain[i]["bbox"][0], plain[i]["bbox"][1], plain[i]["bbox"][0] + plain[i]["bbox"][2],
                               plain[i]["bbox"][1] + plain[i]["bbox"][3]] for i in mine])
        image = np.asarray(Image.open(ws["img_dir"] / name).convert("RGB"))
        want = refine_masks(image, CropMasks.from_dense(dense), boxes).to_dense().numpy()
        got = np.stack([mask_util.decode(refined[i]["segmentation"]).astype(bool) for i in mine])
        assert np.array_equal(got, want), image_id
        changed += int((got != dense.numpy()).any(axis=(1, 2)).sum())
    assert changed > 0  # the sprites' colours move some of the diamonds


def test_evaluate_errors(ws, tmp_path, capsys):
    args = ["--data.val_ann_file", str(ws["ann_file"]), "--data.val_img_dir", str(ws["img_dir"]),
            "--data.num_workers", "0", "--output", str(tmp_path / "r.json")]
    assert evaluate.main(["--ckpt", str(ws["ckpt"]), "--size", "m", *args]) == 2
    assert "holds RTMDet-Ins-tiny weights, but size 'm'" in capsys.readouterr().err
    other = tmp_path / "three.pth"
    torch.save(to_mmdet_state_dict(build_model("tiny", 3)), other)
    assert evaluate.main(["--ckpt", str(other), *args]) == 2
    assert "has 8 categories, but" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- export

def test_export_onnx_matches_onnxruntime(ws, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert export.main(["--ckpt", str(ws["ckpt"]), "--output", str(path), "--img-size", str(S)]) == 0
    image = np.array(Image.open(sorted(ws["img_dir"].glob("*.png"))[0]).convert("RGB"))
    images, _ = preprocess([image, image[:, ::-1].copy()], S)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.numpy()})
    assert [o.name for o in session.get_outputs()] == list(export.OUTPUT_NAMES)
    with torch.no_grad():
        expected = export.ExportWrapper(ws["model"])(images)
    num_priors = (S // 8) ** 2 + (S // 16) ** 2 + (S // 32) ** 2
    shapes = [(2, num_priors, NUM_CLASSES), (2, num_priors, 4), (2, num_priors, 169), (2, 8, S // 8, S // 8)]
    for out, ref, shape in zip(outputs, expected, shapes):
        assert out.shape == shape
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
    _, metas = preprocess([image, image[:, ::-1].copy()], S)
    with torch.no_grad():
        assert_same_instances(instances_of_export(outputs, ws["model"], metas), ws["model"].predict(images, metas))


def unflatten_levels(flat: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, P, K) in prior order -> per level (B, K, H_l, W_l): the inverse of the export's flattening,
    written from the documented layout (levels in order, row-major cells)."""
    out, start = [], 0
    for h, w in sizes:
        out.append(flat[:, start:start + h * w].reshape(flat.shape[0], h, w, -1).permute(0, 3, 1, 2))
        start += h * w
    assert start == flat.shape[1]
    return out


def instances_of_export(outputs, model, metas) -> list[dict]:
    """The exported graph's four outputs put through an InstancePostProcess (official settings, as predict's)."""
    cls_logits, box_dists, kernels, protos = (torch.as_tensor(o) for o in outputs)
    sizes = [(S // s, S // s) for s in model.strides]
    raw = RawOutputs(unflatten_levels(cls_logits, sizes), unflatten_levels(box_dists, sizes),
                     unflatten_levels(kernels, sizes), protos)
    return InstancePostProcess(strides=model.strides)(raw, metas)


def assert_same_instances(got: list[dict], expected: list[dict]) -> None:
    assert sum(len(r["scores"]) for r in expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        assert a["masks"].shape == b["masks"].shape and (a["masks"] != b["masks"]).float().mean() < 1e-3


def test_export_torch_program(ws, tmp_path):
    path = tmp_path / "model.pt2"
    assert export.main(["--ckpt", str(ws["ckpt"]), "--output", str(path), "--img-size", str(S)]) == 0
    images = torch.randn(3, 3, S, S)
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        outputs = program(images)
        expected = export.ExportWrapper(ws["model"])(images)
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # What a deployment gets from the exported graph + InstancePostProcess is what model.predict gives.
    files = sorted(ws["img_dir"].glob("*.png"))[:2]
    batch, metas = preprocess([np.array(Image.open(f).convert("RGB")) for f in files], S)
    with torch.no_grad():
        exported = program(batch)
        assert_same_instances(instances_of_export(exported, ws["model"], metas), ws["model"].predict(batch, metas))


@pytest.mark.parametrize("tool, args", [
    ("evaluate", ["--ckpt", "x.ckpt", "--data.img_size", "100"]),
    ("predict", ["--ckpt", "x.ckpt", "--input", "in", "--output", "out", "--img-size", "100"]),
    ("export", ["--ckpt", "x.ckpt", "--output", "m.onnx", "--img-size", "-32"]),
])
def test_input_size_must_be_a_positive_multiple_of_32(tool, args, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"experiments.{tool}").main(args)
    assert exit_info.value.code == 2
    assert "must be a positive multiple of 32, got" in capsys.readouterr().err
