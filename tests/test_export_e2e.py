"""End-to-end export (``rtmdet/export_e2e.py``, ``experiments.export --end-to-end``) and the torch-free
runner ``experiments.onnx_predict``, checked against ``model.predict``.

The model is RTMDet-Ins-tiny with random weights (BatchNorm statistics measured on sprite scenes, so
that activations neither vanish nor explode) and a hand-set classification layer: every class
logit is ``ALPHA * (f . u - t_l) + noise``, where ``f`` are the classification-tower features and
``u`` is the direction in which a plain white image differs from sprite scenes. Sprite scenes then
get tens of detections with distinct scores, boxes of many sizes and non-empty diamond masks, and a
white image gets none: a batch of the two has an image with no detection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from benchmarks.latency import busy_head
from datamodules import load_image
from datamodules.sprites import render_image
from experiments import export, export_e2e, numpy_inference as npi, onnx_predict, predict
from rtmdet import ImageMeta, InstancePostProcess, build_model, letterbox, normalize, preprocess
from rtmdet.export_e2e import EndToEnd
from rtmdet.inference import cutout
from rtmdet.lightning_module import RTMDetInsModule
from rtmdet.mask_paste import paste_masks, resize_matrices

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 8
ALPHA = 30.0  # logit per unit of the feature projection
SETTINGS = {"score_thr": 0.05, "nms_pre": 1000, "iou_thr": 0.6}


def known_model(seed: int = 0) -> torch.nn.Module:
    """The model of the module docstring (eval mode)."""
    torch.manual_seed(seed)
    model = build_model("tiny", NUM_CLASSES)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 100)
    calib, _ = preprocess([render_image(rng, (128, 128))[0] for _ in range(16)], 128)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # one cumulative pass: exactly the calibration batch's statistics
        model.train()(calib)
        model.eval()
        for m in model.modules():  # a channel nearly constant on the calibration scenes must not amplify noise
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.clamp_(min=m.running_var.median().item())
        busy_head(model, seed)  # random prediction layers, diamond-shaped dynamic masks
        feats = {}
        hooks = [conv.register_forward_pre_hook(lambda _, x, lvl=lvl: feats.__setitem__(lvl, x[0]))
                 for lvl, conv in enumerate(model.head.rtm_cls)]
        white = preprocess(np.full((64, 64, 3), 255, np.uint8), 128)[0]
        cls, reg, ker, _ = model(torch.cat([calib, white]))
        for h in hooks:
            h.remove()
        head = model.head
        for lvl in range(3):
            f = feats[lvl]  # (17, Co, H, W); the last one is white
            u = f[:-1].mean((0, 2, 3)) - f[-1].mean((1, 2))
            u = u / u.norm()
            proj = torch.einsum("c,nchw->nhw", u, f).flatten(1).amax(1)  # (17,) best projection per image
            assert (proj[:-1] > proj[-1] + 0.05).all()
            t = proj[-1] + 8 / ALPHA  # the white image's best logit: -8 at 128 px, up to the noise (-5 at others)
            weight = u[None, :, None, None].expand_as(head.rtm_cls[lvl].weight)
            noise = torch.randn(head.rtm_cls[lvl].weight.shape, generator=g) * 0.3 / f.shape[1] ** 0.5
            head.rtm_cls[lvl].weight.copy_(ALPHA * (weight + noise))
            head.rtm_cls[lvl].bias.copy_(-ALPHA * t + torch.randn(NUM_CLASSES, generator=g) * 0.5)
            head.rtm_kernel[lvl].weight.mul_(0.02 / ker[lvl].std(dim=(0, 2, 3)).mean())
            head.rtm_reg[lvl].weight.mul_(0.5 / (reg[lvl] / model.strides[lvl]).std())
    return model


@pytest.fixture(scope="module")
def model():
    return known_model()


@pytest.fixture(scope="module")
def scenes():
    """Two sprite scenes (not square: letterboxed) and a white image."""
    rng = np.random.default_rng(7)
    return {"wide": render_image(rng, (100, 140))[0], "tall": render_image(rng, (150, 90))[0],
            "white": np.full((64, 64, 3), 255, np.uint8)}


def reference(model, images: list[np.ndarray], size: int, max_det: int = 100, frame: str = "original"):
    """``model.predict``'s instances with its own postprocess, and the uint8 letterboxed batch."""
    padded, metas = zip(*(letterbox(im, size) for im in images))
    u8 = torch.stack(padded)
    post = InstancePostProcess(**SETTINGS, max_per_img=max_det)
    with torch.no_grad():
        preds = post(model(normalize(u8)), list(metas) if frame == "original" else None)
    return preds, u8, metas


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-instance IoU of (N, H, W) bool masks (1 where both are empty)."""
    inter, union = (a & b).sum((1, 2)), (a | b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def assert_same_instances(got: dict, want: dict, box_tol: float = 1e-3, score_tol: float = 1e-4):
    want = {k: v.numpy() for k, v in want.items()}
    assert len(got["labels"]) == len(want["labels"])
    assert np.array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=0, atol=box_tol)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=score_tol)
    assert got["masks"].shape == want["masks"].shape
    assert (mask_iou(got["masks"], want["masks"]) >= 0.999).all()


# ---------------------------------------------------------------------------------- the module

def test_eager_module_equals_predict(model, scenes):
    preds, u8, _ = reference(model, [scenes["wide"], scenes["white"]], 128, frame="input")
    assert len(preds[0]["labels"]) >= 10 and len(preds[1]["labels"]) == 0  # the test model does what it says
    assert (preds[0]["masks"].flatten(1).sum(1) > 0).all()
    with torch.no_grad():
        num_dets, boxes, scores, labels, logits = EndToEnd(model, 128, **SETTINGS).eval()(u8)
        _, _, _, _, masks = EndToEnd(model, 128, **SETTINGS, mask_output="input").eval()(u8)
    assert num_dets.tolist() == [len(p["labels"]) for p in preds]
    ry, rx = resize_matrices((16, 16), 8, (128, 128))
    for b, pred in enumerate(preds):
        n = int(num_dets[b])
        got = {"boxes": boxes[b, :n].numpy(), "scores": scores[b, :n].numpy(), "labels": labels[b, :n].numpy(),
               "masks": paste_masks(logits[b, :n], ry, rx).numpy()}
        assert_same_instances(got, pred, box_tol=1e-5, score_tol=1e-6)
        assert (mask_iou(masks[b, :n].numpy(), pred["masks"].numpy()) >= 0.999).all()  # pasted inside the graph
        # padding rows
        assert (labels[b, n:] == -1).all() and (scores[b, n:] == 0).all() and (boxes[b, n:] == 0).all()
        assert not masks[b, n:].any() and (logits[b, n:] < -1e3).all()


@pytest.mark.parametrize("size", [128, 192])
def test_onnx_graph_equals_predict_in_original_pixels(model, scenes, size, tmp_path):
    """uint8 letterboxed batch of 2 (a scene and the white image) -> ONNX -> numpy map-back =
    ``model.predict`` with metas; run alone, the scene gives the same instances (batch-independent)."""
    pytest.importorskip("onnxruntime")
    module = EndToEnd(model, size, **SETTINGS).eval()
    path = tmp_path / "e2e.onnx"
    with torch.no_grad():
        export_e2e.write_onnx(module, export_e2e.sample_images(size, 2), path, 17, export_e2e.metadata(module))
    images = [scenes["tall" if size == 192 else "wide"], scenes["white"]]
    preds, u8, metas = reference(model, images, size)
    assert len(preds[0]["labels"]) >= 10 and len(preds[1]["labels"]) == 0
    detector = onnx_predict.Detector(path)
    for batch in (u8, u8[:1]):
        out = detector(batch.numpy())
        assert out["num_dets"].tolist() == [len(p["labels"]) for p in preds][: len(batch)]
        for b in range(len(batch)):
            got = detector.instances(out, b, metas[b].orig_size, metas[b].scale_factor, score_thr=0.0)
            assert_same_instances(got, preds[b])


def test_torch_export_program(model, scenes, tmp_path):
    """``torch.export`` of the whole module, dynamic batch; the NMS stays the custom op
    ``rtmdet_e2e::nms`` (a Python kernel: importing ``rtmdet.export_e2e`` registers it)."""
    module = EndToEnd(model, 128, **SETTINGS, max_det=20).eval()
    images = export_e2e.sample_images(128, 2)
    with torch.no_grad():
        export_e2e.write_program(module, images, tmp_path / "e2e.pt2", {"img_size": 128})
    extra = {"rtmdet_e2e.json": ""}
    program = torch.export.load(str(tmp_path / "e2e.pt2"), extra_files=extra)
    assert json.loads(extra["rtmdet_e2e.json"]) == {"img_size": 128}
    assert any(n.target is torch.ops.rtmdet_e2e.nms.default for n in program.graph.nodes)
    _, u8, _ = reference(model, [scenes["wide"], scenes["white"], scenes["tall"]], 128)
    with torch.no_grad():
        expected = module(u8)
        actual = program.module()(u8)  # batch 3, traced with 2
    assert expected[0].tolist()[1] == 0 and expected[0].tolist()[0] > 0
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_input_resolution_masks_map_back_close_to_the_paste(model, scenes):
    """``--masks input``: the runner crops and resizes the input-resolution masks nearest-neighbour,
    an approximation of pasting the logits (the boundary moves by up to a pixel of the input)."""
    preds, u8, metas = reference(model, [scenes["tall"], scenes["wide"]], 128)
    module = EndToEnd(model, 128, **SETTINGS, mask_output="input").eval()
    with torch.no_grad():
        out = dict(zip(module.output_names, (o.numpy() for o in module(u8))))
    meta = export_e2e.metadata(module)
    for b, pred in enumerate(preds):
        got = onnx_predict.instances(out, b, meta, metas[b].orig_size, metas[b].scale_factor, score_thr=0.0)
        assert np.array_equal(got["labels"], pred["labels"].numpy())
        big = pred["masks"].flatten(1).sum(1).numpy() >= 200
        assert big.sum() >= 5 and (mask_iou(got["masks"], pred["masks"].numpy())[big] >= 0.8).all()


# ------------------------------------------------------------------------------- the CLI tools

@pytest.fixture(scope="module")
def ws(model, scenes, tmp_path_factory):
    """A Lightning checkpoint of the known model (validated at 128 px, bilinear), its end-to-end
    ONNX export through the CLI, and a folder: two scenes, the white image, an RGBA PNG, garbage."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("export_e2e")
    module = RTMDetInsModule(size="tiny", num_classes=NUM_CLASSES)
    module.model.load_state_dict(model.state_dict())
    names = [f"sprite {i}" for i in range(NUM_CLASSES)]
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.0",
                "state_dict": module.state_dict(), "hyper_parameters": {**module.hparams, "class_names": names},
                "datamodule_hyper_parameters": {"img_size": 128, "nearest_resize": False}}, root / "tiny.ckpt")
    onnx_path = root / "model.onnx"
    assert export.main(["--ckpt", str(root / "tiny.ckpt"), "--output", str(onnx_path), "--end-to-end"]) == 0
    src = root / "inputs"
    src.mkdir()
    Image.fromarray(scenes["wide"]).save(src / "a_wide.png")
    Image.fromarray(scenes["tall"]).save(src / "b_tall.jpg", quality=95)
    Image.fromarray(scenes["white"]).save(src / "c_white.png")
    rgba = np.dstack([scenes["wide"][:, 20:], np.full((100, 120), 200, np.uint8)])
    rgba[:30, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(src / "d_rgba.png")
    (src / "garbage.png").write_bytes(b"\x89PNG not really")
    return {"root": root, "ckpt": root / "tiny.ckpt", "onnx": onnx_path, "src": src, "names": names}


BLOCK_TORCH = """
import runpy, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "lightning", "pycocotools", "datamodules", "rtmdet"}:
            raise ModuleNotFoundError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
sys.argv = ["onnx_predict", *sys.argv[1:]]
try:
    runpy.run_module("experiments.onnx_predict", run_name="__main__")
finally:
    assert not any(m.split(".")[0] in {"torch", "rtmdet"} for m in sys.modules)
"""


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_onnx_predict_without_torch_matches_predict(ws):
    out_onnx, out_torch = ws["root"] / "out_onnx", ws["root"] / "out_torch"
    proc = run_without_torch("--model", str(ws["onnx"]), "--input", str(ws["src"]), "--output", str(out_onnx),
                             "--score-thr", "0.1", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    assert "1 file(s) could not be read" in proc.stderr and "garbage.png" in proc.stderr
    assert predict.main(["--ckpt", str(ws["ckpt"]), "--input", str(ws["src"]), "--output", str(out_torch),
                         "--score-thr", "0.1", "--tile-size", "none"]) == 0  # the runner letterboxes whole
    got = json.loads((out_onnx / "results.json").read_text())
    want = json.loads((out_torch / "results.json").read_text())
    assert len(want) >= 20 and {r["file_name"] for r in want} == {"a_wide.png", "b_tall.jpg", "d_rgba.png"}
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)  # same keys, same order
        for key in ("image_id", "file_name", "category_id", "category_name", "cutout"):
            assert g[key] == w[key]
        assert max(abs(a - b) for a, b in zip(g["bbox"], w["bbox"])) <= 0.011  # 1e-3 px, then rounded to 0.01
        assert abs(g["score"] - w["score"]) <= 2e-5
        iou = mask_util.iou([g["segmentation"]], [w["segmentation"]], [0])[0, 0]
        assert w["area"] > 0 and iou >= 0.999 and abs(g["area"] - w["area"]) <= 0.002 * w["area"]
    assert sorted(p.name for p in (out_onnx / "overlays").iterdir()) == \
        sorted(p.name for p in (out_torch / "overlays").iterdir())
    for r in want:  # cut-outs: same files, same RGBA crops (the RGBA source keeps its alpha)
        a = np.asarray(Image.open(out_onnx / r["cutout"]))
        b = np.asarray(Image.open(out_torch / r["cutout"]))
        assert a.shape == b.shape and (a != b).any(-1).mean() <= 0.01
    overlay_a = np.asarray(Image.open(out_onnx / "overlays" / "a_wide.png"), np.int16)
    overlay_b = np.asarray(Image.open(out_torch / "overlays" / "a_wide.png"), np.int16)
    assert (overlay_a != overlay_b).any(-1).mean() < 0.01


def test_onnx_predict_errors(ws, tmp_path):
    proc = run_without_torch("--model", str(ws["onnx"]), "--input", str(ws["src"]), "--output", str(tmp_path),
                             "--score-thr", "0.01")
    assert proc.returncode == 2 and "below the threshold 0.05 baked into" in proc.stderr
    (tmp_path / "raw.onnx").write_bytes(b"not a model")
    proc = run_without_torch("--model", str(tmp_path / "raw.onnx"), "--input", str(ws["src"]), "--output",
                             str(tmp_path))
    assert proc.returncode == 2 and "not a loadable ONNX model" in proc.stderr


def test_export_cli_metadata_and_flag_checks(ws, capsys):
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(ws["onnx"])).metadata_props}["rtmdet_e2e"])
    assert meta["class_names"] == ws["names"] and meta["img_size"] == 128 and meta["max_det"] == 100
    assert (meta["score_thr"], meta["nms_pre"], meta["iou_thr"]) == (0.05, 1000, 0.6)  # the checkpoint's
    assert meta["outputs"] == ["num_dets", "boxes", "scores", "labels", "mask_logits"]
    for args, message in ((["--max-det", "10"], "only apply with --end-to-end"),
                          (["--end-to-end", "--max-det", "0"], "--max-det must be at least 1"),
                          (["--end-to-end", "--iou-thr", "1.5"], "--iou-thr must be in [0, 1]")):
        with pytest.raises(SystemExit) as exit_info:
            export.main(["--ckpt", str(ws["ckpt"]), "--output", "m.onnx", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------- numpy equivalents

@pytest.mark.parametrize("nearest", [False, True])
def test_numpy_letterbox_matches_torch(nearest):
    rng = np.random.default_rng(0)
    for (h, w), size in [((100, 140), 128), ((517, 333), 320), ((50, 60), 256), ((1000, 750), 640)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want, meta = letterbox(image, size, nearest)
        got, (orig_size, scale_factor) = npi.letterbox(image, size, nearest)
        assert (orig_size, scale_factor) == (meta.orig_size, meta.scale_factor)
        diff = np.abs(got.astype(int) - want.numpy())
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-4  # float rounding at .5 only


def test_numpy_paste_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 16, 16, generator=g) * 3 - 2
    for meta in (None, ImageMeta((100, 140), (128 / 140, 91 / 100), (128, 128)),
                 ImageMeta((333, 517), (128 / 517, 82 / 333), (128, 128))):
        ry, rx = resize_matrices((16, 16), 8, (128, 128), meta)
        frame = (None, None) if meta is None else (meta.orig_size, meta.scale_factor)
        nry, nrx = npi.resize_matrices((16, 16), 8, (128, 128), *frame)
        assert np.array_equal(nry, ry.numpy()) and np.array_equal(nrx, rx.numpy())
        assert np.array_equal(npi.paste_masks(logits.numpy(), nry, nrx), paste_masks(logits, ry, rx).numpy())


def test_rle_cutout_and_read_image_match_the_torch_side(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()
        want = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert npi.rle_encode(mask) == {"size": list(want["size"]), "counts": want["counts"].decode()}
    image = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 8:9] = mask[12, 3:30] = True
    got, want = npi.cutout(image, mask), cutout(image, mask)
    assert got[1] == want[1] and np.array_equal(got[0], want[0])
    assert npi.cutout(image, np.zeros((30, 40), bool)) is None
    Image.fromarray(image, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(image[..., 0], "L").save(tmp_path / "grey.png")
    Image.fromarray(image[..., :3]).convert("P").save(tmp_path / "palette.png")
    for name in ("rgba.png", "grey.png", "palette.png"):
        assert np.array_equal(npi.read_image(tmp_path / name), load_image(str(tmp_path / name)))
    with pytest.raises(npi.ImageReadError, match=r"image 7: cannot read .*nothing\.png"):
        (tmp_path / "nothing.png").write_bytes(b"")
        npi.read_image(tmp_path / "nothing.png", 7)
