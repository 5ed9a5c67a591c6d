"""Simple Copy-Paste (datamodules/transforms/copy_paste.py) and its place in the pipelines."""

import numpy as np
import pytest

from datamodules import COCODataModule
from datamodules.masks import InstanceMasks
from datamodules.transforms import CachedMixUp, CopyPaste, Pad, train_pipeline
from tests._coco_factory import make_coco
from tests.test_transforms import check_sample, make_sample

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BACKGROUND = (30, 30, 30)


def flat_sample(h, w, rects, colours, labels):
    """Instances are rectangles (x0, y0, x1, y1) of unique flat colours; later ones cover earlier ones."""
    image = np.full((h, w, 3), BACKGROUND, np.uint8)
    owner = np.full((h, w), -1)
    for i, ((x0, y0, x1, y1), c) in enumerate(zip(rects, colours)):
        image[y0:y1, x0:x1] = c
        owner[y0:y1, x0:x1] = i
    masks = InstanceMasks.from_array(owner[None] == np.arange(len(rects))[:, None, None])
    return {"image": image, "boxes": masks.boxes(), "labels": np.array(labels, np.int64), "masks": masks,
            "ignore_boxes": np.array([[0, 0, 4, 4]], np.float32), "image_id": 1, "orig_size": (h, w),
            "scale_factor": (1.0, 1.0)}


def test_pasted_and_occluded_masks_are_exact():
    # Target: A (fully under the pasted P), B (its top-left under P: an L-shape remains), C (untouched).
    # Partner: only P.
    target = flat_sample(40, 60, [(5, 5, 15, 15), (20, 5, 40, 25), (45, 30, 55, 38)],
                         [(200, 0, 0), (0, 200, 0), (0, 0, 200)], [0, 1, 2])
    partner = flat_sample(40, 60, [(2, 2, 30, 20)], [(250, 250, 0)], [3])
    t = CopyPaste(prob=1.0, max_instances=5)
    rng = np.random.default_rng(0)
    assert t(partner, rng) is partner  # a single cached sample: nothing to paste from
    out = t(target, rng)
    check_sample(out, exact=True)
    assert out["labels"].tolist() == [1, 2, 3]  # A dropped (covered entirely), P on top, last
    colours = {1: (0, 200, 0), 2: (0, 0, 200), 3: (250, 250, 0)}
    for label, mask in zip(out["labels"], out["masks"].to_array()):
        np.testing.assert_array_equal(mask, (out["image"] == colours[int(label)]).all(-1))
    np.testing.assert_array_equal(out["boxes"], [[20, 5, 40, 25], [45, 30, 55, 38], [2, 2, 30, 20]])
    np.testing.assert_array_equal(out["ignore_boxes"], target["ignore_boxes"])
    assert (target["image"][5, 5] == (200, 0, 0)).all() and len(target["labels"]) == 3  # input untouched


def test_random_subsets_keep_every_mask_exact():
    """Many draws: each instance's mask is exactly the pixels of its unique colour."""
    rng = np.random.default_rng(1)
    colour_rng = np.random.default_rng(2)
    t = CopyPaste(prob=1.0, max_instances=3, max_cached=4)
    seen_drop = seen_partial = False
    for step in range(30):
        n = int(rng.integers(1, 6))
        rects = []
        for _ in range(n):
            x0, y0 = int(rng.integers(0, 50)), int(rng.integers(0, 30))
            rects.append((x0, y0, x0 + int(rng.integers(3, 20)), y0 + int(rng.integers(3, 20))))
        colours = [tuple(int(v) for v in colour_rng.integers(40, 256, 3)) for _ in range(n)]
        sample = flat_sample(40, 60, rects, colours, list(range(n)))
        visible = {tuple(c): m for c, m in zip(colours, sample["masks"].to_array()) if m.any()}
        out = t(sample, rng)
        check_sample(out, exact=True)
        image = out["image"]
        for mask in out["masks"].to_array():
            colour = tuple(int(v) for v in image[mask][0])
            np.testing.assert_array_equal(mask, (image == colour).all(-1))
            if colour in visible and mask.sum() < visible[colour].sum():
                seen_partial = True
        seen_drop |= any(not (image == c).all(-1).any() for c in visible)
    assert seen_drop and seen_partial


def test_deterministic_under_a_seed_and_prob_zero_is_identity():
    def run(seed, prob=1.0):
        t, rng, data_rng = CopyPaste(prob, 4), np.random.default_rng(seed), np.random.default_rng(9)
        inputs = [make_sample(data_rng, 48, 48) for _ in range(8)]
        return inputs, [t(s, rng) for s in inputs]

    (_, a), (_, b), (_, c) = run(3), run(3), run(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["masks"].to_array(), y["masks"].to_array())
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
    inputs, outputs = run(3, prob=0.0)
    assert all(out is s for s, out in zip(inputs, outputs))


def test_partner_of_another_size_is_cut_to_the_frame():
    rng = np.random.default_rng(5)
    t = CopyPaste(prob=1.0, max_instances=10)
    big = make_sample(np.random.default_rng(6), 90, 90, n=5, overlap=False)
    t(big, rng)
    for _ in range(5):
        out = t(make_sample(np.random.default_rng(7), 40, 50, n=3), rng)
        check_sample(out, exact=True)
        assert out["image"].shape == (40, 50, 3)


def test_off_leaves_the_official_pipeline_unchanged():
    official, off = train_pipeline(1, 64), train_pipeline(1, 64, copy_paste_prob=0.0)
    assert repr(official) == repr(off) and "CopyPaste" not in repr(official)
    rng_a, rng_b, data = np.random.default_rng(0), np.random.default_rng(0), np.random.default_rng(1)
    for _ in range(12):
        s = make_sample(data)
        x, y = official(s, rng_a), off(s, rng_b)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["masks"].to_array(), y["masks"].to_array())
    on = train_pipeline(1, 64, copy_paste_prob=0.5, copy_paste_max_instances=7)
    kinds = [type(t) for t in on.transforms]
    assert kinds.index(CopyPaste) == kinds.index(Pad) + 1 == kinds.index(CachedMixUp) - 1
    assert on.transforms[kinds.index(CopyPaste)].max_instances == 7
    assert "CopyPaste" not in repr(train_pipeline(2, 64, copy_paste_prob=0.5))  # stage 2 stays clean
    rng = np.random.default_rng(2)
    for _ in range(12):
        out = on(make_sample(data), rng)
        if out is not None:
            check_sample(out, exact=True)


def test_datamodule_option(tmp_path):
    ann, img_dir = make_coco(tmp_path, num_images=2)
    dm = COCODataModule(str(ann), str(img_dir), img_size=64, num_workers=0, check_images=False)
    assert dm.hparams.copy_paste_prob == 0.0 and "CopyPaste" not in repr(dm._train_pipeline(1))
    dm = COCODataModule(str(ann), str(img_dir), img_size=64, num_workers=0, check_images=False,
                        copy_paste_prob=0.3, copy_paste_max_instances=5)
    step = next(t for t in dm._train_pipeline(1).transforms if isinstance(t, CopyPaste))
    assert (step.prob, step.max_instances) == (0.3, 5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="prob"):
        CopyPaste(prob=1.5)
