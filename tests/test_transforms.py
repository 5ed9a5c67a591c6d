"""Transforms of the training / validation pipelines (datamodules.transforms) and InstanceMasks."""

import numpy as np
import pytest
import torch

from datamodules.masks import InstanceMasks, nearest_index
from datamodules.transforms import (
    CachedMixUp,
    CachedMosaic,
    Compose,
    FilterAnnotations,
    Letterbox,
    Pad,
    RandomCrop,
    RandomFlip,
    RandomResize,
    RandomResizeCrop,
    YOLOXHSVRandomAug,
    hsv_shift,
    train_pipeline,
    val_pipeline,
)
from rtmdet.preprocess import letterbox
from tests._coco_factory import category_colour

S = 64  # input size of these tests


def make_sample(rng, h=None, w=None, n=None, overlap=True):
    """Random sample: instances are ellipses painted in their label's colour, boxes = mask extents.

    overlap=False places instances in separate grid cells, so every mask keeps all its pixels.
    """
    h = h or int(rng.integers(24, 100))
    w = w or int(rng.integers(24, 100))
    n = int(rng.integers(0, 6)) if n is None else n
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.full((h, w, 3), 30, np.uint8)
    masks = np.zeros((n, h, w), bool)
    labels = rng.integers(0, 5, n).astype(np.int64)
    for i in range(n):
        if overlap:
            cx, cy, rx, ry = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, w / 3), rng.uniform(1.5, h / 3)
        else:  # cell i of a 3 x 2 grid
            cw, ch = w / 3, h / 2
            cx, cy, rx, ry = (i % 3 + 0.5) * cw, (i // 3 + 0.5) * ch, cw * 0.35, ch * 0.35
        masks[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        image[masks[i]] = category_colour(int(labels[i]))
    keep = masks.any((1, 2))
    masks, labels = masks[keep], labels[keep]
    im = InstanceMasks.from_array(masks)
    return {
        "image": image, "boxes": im.boxes(), "labels": labels, "masks": im,
        "ignore_boxes": np.array([[1, 1, w / 2, h / 2]], np.float32), "image_id": 7,
        "orig_size": (h, w), "scale_factor": (1.0, 1.0),
    }


def check_sample(s, exact=False):
    """Shapes, dtypes, frames; box = mask extent within 1 px (exactly when ``exact``)."""
    h, w = s["image"].shape[:2]
    assert s["image"].dtype == np.uint8 and s["image"].shape[2] == 3
    n = len(s["labels"])
    assert s["boxes"].shape == (n, 4) and s["boxes"].dtype == np.float32
    assert s["labels"].dtype == np.int64 and len(s["masks"]) == n
    assert s["masks"].shape == (n, h, w)
    assert s["ignore_boxes"].ndim == 2 and s["ignore_boxes"].shape[1] == 4
    nonempty = s["masks"].areas() > 0
    extent = s["masks"].boxes()
    err = np.abs(extent - s["boxes"])[nonempty]
    assert (err == 0).all() if exact else (err <= 1.0 + 1e-4).all(), err.max()
    dense = s["masks"].to_array()  # crops stay inside the frame and tight
    np.testing.assert_array_equal(dense.any((1, 2)), nonempty)
    for c in s["masks"].crops:
        assert c.size == 0 or (c[0].any() and c[-1].any() and c[:, 0].any() and c[:, -1].any())


def warm(t, rng, k=6):
    """Fill a cached transform."""
    for _ in range(k):
        t(make_sample(rng, n=3), rng)
    return t


TRANSFORMS = {
    "mosaic": lambda rng: warm(CachedMosaic(S, max_cached=10), rng),
    "resize": lambda rng: RandomResize(2 * S, (0.5, 2.0)),
    "crop": lambda rng: RandomCrop(S),
    "resize_crop": lambda rng: RandomResizeCrop(2 * S, (0.5, 2.0), S),
    "resize_crop_nearest": lambda rng: RandomResizeCrop(S, (0.5, 2.0), S, nearest=True),
    "hsv": lambda rng: YOLOXHSVRandomAug(),
    "flip": lambda rng: RandomFlip(1.0),
    "pad": lambda rng: Pad(128),
    "mixup": lambda rng: warm(CachedMixUp(S, max_cached=5, prob=1.0), rng),
    "filter": lambda rng: FilterAnnotations(),
    "letterbox": lambda rng: Letterbox(S),
}
EXACT = {"mosaic", "resize", "crop", "resize_crop", "resize_crop_nearest", "hsv", "flip", "pad", "mixup", "filter"}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_keeps_boxes_masks_labels_consistent(name):
    rng = np.random.default_rng(0)
    t = TRANSFORMS[name](rng)
    for _ in range(12):
        s = make_sample(rng)
        if name == "pad":
            s = make_sample(rng, h=int(rng.integers(20, 128)), w=int(rng.integers(20, 128)))
        check_sample(s, exact=True)
        out = t(s, rng)
        check_sample(out, exact=name in EXACT)
    empty = make_sample(rng, n=0)
    out = t(empty, rng)  # samples without instances survive every transform
    check_sample(out)
    if name not in ("mosaic", "mixup"):  # those may add instances from their cache
        assert len(out["labels"]) == 0


def test_inputs_are_not_modified():
    rng = np.random.default_rng(1)
    for name in sorted(TRANSFORMS):
        t = TRANSFORMS[name](rng)
        s = make_sample(rng, n=4)
        before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
        dense = s["masks"].to_array()
        t(s, rng)
        for k in ("image", "boxes", "labels", "ignore_boxes"):
            np.testing.assert_array_equal(s[k], before[k], err_msg=f"{name} changed {k}")
        np.testing.assert_array_equal(s["masks"].to_array(), dense, err_msg=name)


def test_instance_masks_ops_match_dense():
    rng = np.random.default_rng(2)
    for _ in range(20):
        s = make_sample(rng, n=5)
        m, dense = s["masks"], s["masks"].to_array()
        h, w = dense.shape[1:]
        np.testing.assert_array_equal(np.asarray(m), dense)
        np.testing.assert_array_equal(m.flip().to_array(), dense[:, :, ::-1])
        nh, nw = int(rng.integers(5, 200)), int(rng.integers(5, 200))
        ref = dense[:, nearest_index(h, nh)][:, :, nearest_index(w, nw)]
        np.testing.assert_array_equal(m.resize(nh, nw).to_array(), ref)
        x0, y0 = int(rng.integers(0, nw)), int(rng.integers(0, nh))
        ww, wh = int(rng.integers(1, nw - x0 + 1)), int(rng.integers(1, nh - y0 + 1))
        np.testing.assert_array_equal(m.resize(nh, nw, (x0, y0, ww, wh)).to_array(), ref[:, y0:y0 + wh, x0:x0 + ww])
        dx, dy = int(rng.integers(-w, w)), int(rng.integers(-h, h))
        moved = np.zeros((len(m), 50, 60), bool)
        src = dense[:, max(-dy, 0):, max(-dx, 0):]
        src = src[:, :max(50 - max(dy, 0), 0), :max(60 - max(dx, 0), 0)]
        moved[:, max(dy, 0):max(dy, 0) + src.shape[1], max(dx, 0):max(dx, 0) + src.shape[2]] = src
        np.testing.assert_array_equal(m.translate(dx, dy, 50, 60).to_array(), moved)
        np.testing.assert_array_equal(m.to_tensor().numpy(), dense)
        np.testing.assert_array_equal(m.paste_on(torch.device("cpu")).numpy(), dense)  # the accelerator path
        keep = rng.random(len(m)) < 0.5
        np.testing.assert_array_equal(m[keep].to_array(), dense[keep])
        np.testing.assert_array_equal(InstanceMasks.concat([m, m[keep]]).to_array(),
                                      np.concatenate([dense, dense[keep]]))


def test_resize_crop_equals_resize_then_crop():
    rng = np.random.default_rng(3)
    for scale, nearest in ((2 * S, False), (S, False), (S, True)):
        for seed in range(8):
            s = make_sample(rng, n=5)
            a = RandomCrop(S)(RandomResize(scale, (0.5, 2.0), nearest)(s, r := np.random.default_rng(seed)), r)
            b = RandomResizeCrop(scale, (0.5, 2.0), S, nearest)(s, np.random.default_rng(seed))
            assert a["image"].shape == b["image"].shape
            assert np.abs(a["image"].astype(int) - b["image"]).max() <= 1
            for k in ("boxes", "labels", "ignore_boxes"):
                np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a["masks"].to_array(), b["masks"].to_array())


def test_labels_follow_their_masks():
    """With nearest resizing and no colour changes, the pixels under each mask keep its label's colour."""
    rng = np.random.default_rng(4)
    pipe = Compose([CachedMosaic(S, max_cached=8, nearest=True), RandomResizeCrop(2 * S, (0.5, 2.0), S, True),
                    RandomFlip(0.5), Pad(S), FilterAnnotations()])
    checked = 0
    for _ in range(20):
        out = pipe(make_sample(rng, h=48, w=72, n=6, overlap=False), rng)
        for m, label in zip(out["masks"].to_array(), out["labels"]):
            colours = out["image"][m]
            assert (colours == category_colour(int(label))).all()
            checked += 1
    assert checked > 50


def test_whole_pipelines_on_random_and_empty_samples():
    rng = np.random.default_rng(5)
    pipes = [train_pipeline(1, S, mosaic_cache=6, mixup_cache=4, mixup_prob=1.0), train_pipeline(2, S),
             train_pipeline(1, S, nearest=True), val_pipeline(S)]
    for pipe in pipes:
        for i in range(15):
            out = pipe(make_sample(rng, n=0 if i % 4 == 0 else None), rng)
            assert out["image"].shape == (S, S, 3)
            check_sample(out, exact=pipe is not pipes[-1])
    # official filter_empty_gt behaviour: samples left without instances are rejected
    reject = train_pipeline(2, S, reject_empty=True)
    assert reject(make_sample(rng, n=0), rng) is None


def run_sequence(seed):
    data_rng = np.random.default_rng(100)
    samples = [make_sample(data_rng, n=int(data_rng.integers(1, 5))) for _ in range(12)]
    pipe, rng = train_pipeline(1, S, mosaic_cache=6, mixup_cache=4, random_pop=True, mixup_prob=1.0), \
        np.random.default_rng(seed)
    return [pipe(s, rng) for s in samples]


def test_mosaic_mixup_caches_deterministic_under_seed():
    a, b, c = run_sequence(0), run_sequence(0), run_sequence(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["boxes"], y["boxes"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
        np.testing.assert_array_equal(x["masks"].to_array(), y["masks"].to_array())
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_mosaic_waits_for_cache_and_builds_2s_canvas():
    rng = np.random.default_rng(6)
    t = CachedMosaic(S, max_cached=10)
    for i in range(6):
        s = make_sample(rng, n=2)
        out = t(s, rng)
        if i < 4:  # no mosaic until the cache holds more than 4 entries
            assert out is s
        else:
            assert out["image"].shape == (2 * S, 2 * S, 3)
            assert (out["image"] == 114).any()


def test_mixup_blends_and_concatenates():
    rng = np.random.default_rng(7)
    t = CachedMixUp(S, max_cached=2, prob=1.0, flip_ratio=2.0)  # flip_ratio > 1: never flip
    a = Pad(S)(make_sample(rng, h=S, w=S, n=2))
    t(a, rng)
    b = Pad(S)(make_sample(rng, h=S, w=S, n=3))
    out = t(b, rng)
    partner = a if not np.array_equal(out["image"], b["image"]) and len(out["labels"]) == 5 else b
    expected = ((b["image"].astype(np.uint16) + partner["image"]) >> 1).astype(np.uint8)
    np.testing.assert_array_equal(out["image"], expected)
    np.testing.assert_array_equal(out["labels"], np.concatenate([b["labels"], partner["labels"]]))


def opencv_hsv_reference(img, dh, ds, dv):
    """OpenCV's 8-bit RGB -> HSV -> RGB formulas (slow, per pixel vectorised in int/float)."""
    x = img.astype(np.int64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, vmin = x.max(-1), x.min(-1)
    diff = v - vmin
    s = (diff * 255 * 2 + v) // np.maximum(2 * v, 1)
    num = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (num * 60 + diff) // np.maximum(2 * diff, 1)
    h = np.where(h < 0, h + 180, h)
    h, s, v = (h + dh) % 180, np.clip(s + ds, 0, 255), np.clip(v + dv, 0, 255)
    hf = h * 6 / 180
    sector = np.floor(hf).astype(int) % 6
    f = hf - np.floor(hf)
    vf, sf = v.astype(float), s / 255
    tab = np.stack([vf, vf * (1 - sf), vf * (1 - sf * f), vf * (1 - sf * (1 - f))])
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])  # r, g, b per sector
    out = np.take_along_axis(tab, order[sector].transpose(2, 0, 1), 0)
    return np.rint(out).transpose(1, 2, 0).astype(np.uint8)


def test_hsv_shift_matches_opencv_formulas():
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    np.testing.assert_array_equal(hsv_shift(img, 0, 0, 0), img)
    for dh, ds, dv in [(4, 0, 0), (-3, 0, 0), (0, 25, 0), (0, -29, 0), (0, 0, 20), (0, 0, -29), (2, -17, 11)]:
        out = hsv_shift(img, dh, ds, dv).astype(int)
        ref = opencv_hsv_reference(img, dh, ds, dv)
        diff = np.abs(out - ref)
        assert diff.max() <= 6 and diff.mean() < 0.6, (dh, ds, dv, diff.max(), diff.mean())
    grey = np.full((4, 4, 3), 100, np.uint8)
    np.testing.assert_array_equal(hsv_shift(grey, 3, 0, 20), np.full((4, 4, 3), 120, np.uint8))
    assert (hsv_shift(grey, 0, 30, 0)[..., 0] == 100).all()  # grey has hue 0: saturating tints it red
    assert (hsv_shift(grey, 0, 30, 0)[..., 1] < 100).all()


def test_letterbox_matches_inference_preprocess():
    rng = np.random.default_rng(9)
    s = make_sample(rng, h=30, w=50, n=3)
    out = Letterbox(S)(s)
    padded, meta = letterbox(s["image"], S)
    np.testing.assert_array_equal(out["image"], padded.permute(1, 2, 0).numpy())
    assert out["scale_factor"] == meta.scale_factor
    np.testing.assert_allclose(out["boxes"], s["boxes"] * np.float32(meta.scale_factor * 2), rtol=1e-6)
    assert out["masks"].shape == (3, S, S) and not out["masks"].to_array()[:, 39:].any()  # 30 * 64 / 50 = 38.4


def test_filter_annotations():
    rng = np.random.default_rng(10)
    s = make_sample(rng, n=3)
    s["boxes"] = np.array([[0, 0, 1, 5], [0, 0, 5, 1], [0, 0, 5, 1.5]], np.float32)
    out = FilterAnnotations()(s)
    assert len(out["labels"]) == 1 and out["labels"][0] == s["labels"][2]
    s["masks"] = InstanceMasks.from_array(np.zeros((3,) + s["image"].shape[:2], bool))  # all masks empty
    assert len(FilterAnnotations()(s)["labels"]) == 0
    assert FilterAnnotations(reject_empty=True)(s) is None


def test_resize_image_window_matches_full_resize():
    from datamodules.transforms import resize_image

    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)
    for nh, nw in ((80, 120), (20, 30), (97, 145)):
        full = resize_image(img, nh, nw)
        ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(nh, nw),
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        assert np.abs(full.astype(float) - ref.round().numpy()).max() <= 1
        win = resize_image(img, nh, nw, window=(3, 5, 16, 12))
        assert np.abs(win.astype(int) - full[5:17, 3:19]).max() <= 1
