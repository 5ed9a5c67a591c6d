"""Odd image files through ``experiments.predict`` and ``experiments.evaluate``, and how each PIL
mode is read: each file predicts (results at its original size) or is skipped with its reason
listed; no run ends with a traceback.

The checkpoint is RTMDet-Ins-tiny with the hand-set head of ``test_entry_points`` (4 diamonds on a
64 px input), so every image that reaches the model has detections whose masks must come back at
the image's own size.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from datamodules import DatasetError, load_image
from datamodules.images import MAX_PIXELS_ENV, ImageWarning, load_image_noted
from experiments import evaluate, predict, tiling_options
from rtmdet.lightning_module import RTMDetInsModule
from rtmdet.preprocess import letterbox, letterbox_size
from tests.test_entry_points import set_known_head

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

S = 64
_Y, _X = np.mgrid[0:40, 0:50]
RGB = np.stack([_X * 5, _Y * 6, 255 - (_X + _Y) * 2], -1).astype(np.uint8)  # (40, 50, 3) smooth: JPEG keeps it


def exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 40 wide, 50 high
    Image.fromarray(RGB).save(path, exif=exif, quality=95)


def two_frames(path, **kw):
    frames = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
    frames[0].save(path, save_all=True, append_images=frames[1:], **kw)


# name -> (writer, displayed (h, w)); every one of them must predict
ODD = {
    "one.png": (lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p), (1, 1)),
    "wide.png": (lambda p: Image.new("RGB", (2000, 1), (200, 10, 10)).save(p), (1, 2000)),
    "tall.png": (lambda p: Image.new("RGB", (1, 2000), (200, 10, 10)).save(p), (2000, 1)),
    "grey.png": (lambda p: Image.fromarray(RGB[..., 0]).save(p), (40, 50)),
    "i16.png": (lambda p: Image.fromarray(RGB[..., 0].astype(np.uint16) * 257).save(p), (40, 50)),
    "i16_dark.png": (lambda p: Image.fromarray(RGB[..., 0].astype(np.uint16) * 4).save(p), (40, 50)),
    "palette.png": (lambda p: Image.fromarray(RGB).convert("P").save(p), (40, 50)),
    "palette_transparent.png": (lambda p: Image.fromarray(RGB).convert("P").save(p, transparency=3), (40, 50)),
    "la.png": (lambda p: Image.fromarray(RGB).convert("LA").save(p), (40, 50)),
    "rgba.png": (lambda p: Image.fromarray(np.dstack([RGB, RGB[..., 0]])).save(p), (40, 50)),
    "cmyk.jpg": (lambda p: Image.fromarray(RGB).convert("CMYK").save(p, quality=95), (40, 50)),
    "exif.jpg": (exif_rotated, (50, 40)),
    "anim.gif": (two_frames, (40, 50)),
    "pages.tif": (two_frames, (40, 50)),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    torch.manual_seed(0)
    module = RTMDetInsModule(size="tiny", num_classes=3)
    set_known_head(module.model)
    path = root / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def run_predict(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = predict.main(args)
    return code, err.getvalue()


def test_letterbox_keeps_at_least_one_pixel():
    assert letterbox_size(1, 2000, 640) == (1, 640)  # 0.32 px rounds to 0 without the floor
    assert letterbox_size(2000, 1, 64) == (64, 1)
    assert letterbox_size(1, 1, 64) == (64, 64)
    padded, meta = letterbox(np.full((1, 2000, 3), 200, np.uint8), 64)
    assert (padded[:, 0] == 200).all() and (padded[:, 1:] == 114).all()
    assert meta.scale_factor == (64 / 2000, 1.0)


def test_predict_reads_or_lists_every_odd_file(ckpt, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for name, (write, _) in ODD.items():
        write(src / name)
    (src / "empty.png").write_bytes(b"")
    Image.new("RGB", (100, 100)).save(src / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)  # PIL's guard: refuse over 2 x 2500 pixels
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    out = tmp_path / "out"
    code, err = run_predict(["--ckpt", str(ckpt), "--input", str(src), "--output", str(out), "--img-size", str(S),
                             "--batch-size", "3"])
    assert code == 0 and "Traceback" not in err
    listed = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    assert err.count("could not be read") == 1 and len(listed) == 2, err
    assert listed[0] == f"{src / 'empty.png'}: {src / 'empty.png'} is empty (0 bytes)"
    assert listed[1].startswith(f"{src / 'huge.png'}: {src / 'huge.png'} has 10,000 pixels, over the limit of 5,000")
    assert f"{MAX_PIXELS_ENV}=N" in listed[1]
    for name in ("anim.gif", "pages.tif"):
        assert f"note: {src / name}: 2 frames" in err and "the first frame is used" in err
    results = json.loads((out / "results.json").read_text())
    for name, (_, (h, w)) in ODD.items():
        stem = name.rsplit(".", 1)[0]
        assert Image.open(out / "overlays" / f"{stem}.png").size == (w, h), name
        mine = [r for r in results if r["file_name"] == name]
        assert mine, name  # the known head detects on every image
        masks = [mask_util.decode(r["segmentation"]) for r in mine]
        assert all(m.shape == (h, w) for m in masks), name
        assert any(m.any() for m in masks) or name == "one.png", name  # no diamond covers the centre of 1 x 1
        for r in mine:  # boxes are clipped to the padded input (as mmdet), so in original pixels to S / scale
            x, y, bw, bh = r["bbox"]
            nh, nw = letterbox_size(h, w, S)
            assert 0 <= x and 0 <= y and 0 < bw and 0 < bh, name
            assert x + bw <= S * w / nw + 0.01 and y + bh <= S * h / nh + 0.01, name

    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")  # the documented way to let a trusted big file through
    code, err = run_predict(["--ckpt", str(ckpt), "--input", str(src / "huge.png"), "--output", str(tmp_path / "o2"),
                             "--img-size", str(S)])
    assert code == 0 and "could not be read" not in err
    assert (tmp_path / "o2" / "overlays" / "huge.png").exists()


def test_predict_lists_a_batch_that_fails_and_goes_on(ckpt, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(RGB).save(src / f"{i}.png")
    real = tiling_options.preprocess  # what predict letterboxes whole images with
    calls = []

    def flaky(images, *args):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(images, *args)

    monkeypatch.setattr(tiling_options, "preprocess", flaky)
    code, err = run_predict(["--ckpt", str(ckpt), "--input", str(src), "--output", str(tmp_path / "out"),
                             "--img-size", str(S), "--batch-size", "2"])
    assert code == 0 and calls == [2, 1]
    assert "2 file(s) could not be read" in err and "RuntimeError: out of memory (simulated)" in err
    assert [p.name for p in sorted((tmp_path / "out" / "overlays").iterdir())] == ["2.png"]


def test_evaluate_on_a_dataset_of_odd_images(ckpt, tmp_path):
    """Every odd file as a COCO image with one box annotation covering its top-left quarter."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, annotations = [], []
    for i, (name, (write, (h, w))) in enumerate(ODD.items(), start=1):
        write(img_dir / name)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        bw, bh = max(w // 2, 1), max(h // 2, 1)
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, bw, bh], "area": bw * bh,
                            "iscrowd": 0, "segmentation": [[0, 0, bw, 0, bw, bh, 0, bh]]})
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}))
    output = tmp_path / "eval" / "metrics.json"
    args = ["--ckpt", str(ckpt), "--data.val_ann_file", str(ann_file), "--data.val_img_dir", str(img_dir),
            "--data.img_size", str(S), "--data.num_workers", "0", "--data.val_batch_size", "4", "--output", str(output),
            "--device", "cpu"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluate.main(args) == 0
    frames = sorted(str(w.message) for w in caught if issubclass(w.category, ImageWarning))
    assert any("anim.gif: 2 frames (GIF); the first frame is used" in m for m in frames)
    assert any("pages.tif: 2 frames (TIFF); the first frame is used" in m for m in frames)
    metrics = json.loads(output.read_text())
    assert metrics["num_images"] == len(ODD) and 0 <= metrics["segm_mAP"] <= 1
    detections = json.loads((tmp_path / "eval" / "metrics.detections.json").read_text())
    for im in images:
        mine = [d for d in detections if d["image_id"] == im["id"]]
        assert mine and all(d["segmentation"]["size"] == [im["height"], im["width"]] for d in mine), im

    (img_dir / "one.png").write_bytes(b"")  # an unreadable file: listed, no traceback, nothing evaluated
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert evaluate.main(args) == 2
    assert f"image 1: {img_dir / 'one.png'} is empty (0 bytes)" in err.getvalue()
    assert "Traceback" not in err.getvalue()


# ------------------------------------------------------------------------------ how modes are read

def test_sixteen_bit_grey_scales_from_its_bit_depth(tmp_path):
    values = np.array([[0, 100, 1000, 4095]], np.uint16)  # 12-bit data in a 16-bit file
    Image.fromarray(values).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.png"))[..., 0], [[0, 6, 62, 255]])  # x 255 / 4095
    full = np.array([[0, 257, 65535]], np.uint16)
    Image.fromarray(full).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "b.png"))[..., 0], [[0, 1, 255]])  # / 257
    dark = np.array([[0, 7, 200]], np.uint16)  # a dark image: its values stay as 8-bit levels
    Image.fromarray(dark).save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "c.png")), np.repeat(dark[..., None], 3, 2))
    Image.fromarray(np.zeros((2, 2), np.uint16)).save(tmp_path / "d.png")
    assert not load_image(str(tmp_path / "d.png")).any()


def test_cmyk_jpeg_and_exif_and_frames(tmp_path):
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    rgb = load_image(str(tmp_path / "c.jpg")).astype(int)
    assert np.abs(rgb - RGB).mean() < 6  # CMYK -> RGB, not inverted
    exif_rotated(tmp_path / "r.jpg")
    rotated = load_image(str(tmp_path / "r.jpg")).astype(int)
    assert rotated.shape == (50, 40, 3) and np.abs(rotated - np.rot90(RGB, -1)).mean() < 8
    two_frames(tmp_path / "f.tif")
    image, notes = load_image_noted(str(tmp_path / "f.tif"), 3)
    np.testing.assert_array_equal(image, RGB)  # the first frame (the second is the negative)
    assert notes == [f"{tmp_path / 'f.tif'}: 2 frames (TIFF); the first frame is used"]


def test_pixel_limit_names_file_and_limit(tmp_path, monkeypatch):
    Image.new("RGB", (60, 50)).save(tmp_path / "big.png")
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses over 2000 pixels itself
    with pytest.raises(DatasetError, match=r"image 4: .*big\.png has 3,000 pixels, over the limit of 2,000 "):
        load_image(str(tmp_path / "big.png"), 4)
    monkeypatch.setenv(MAX_PIXELS_ENV, "2999")
    with pytest.raises(DatasetError, match=r"has 3,000 pixels, over the limit of 2,999 "):
        load_image(str(tmp_path / "big.png"), 4)
    monkeypatch.setenv(MAX_PIXELS_ENV, "3000")
    assert load_image(str(tmp_path / "big.png"), 4).shape == (50, 60, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # no limit
    assert load_image(str(tmp_path / "big.png"), 4).shape == (50, 60, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(DatasetError, match=f"{MAX_PIXELS_ENV}='lots' is not an integer"):
        load_image(str(tmp_path / "big.png"), 4)
