import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datamodules import sprites
from datamodules.sprites import CLASSES, generate_sprite_dataset, render_image

# pycocotools 2.0.x with numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 images of 128 x 160 (H x W), so a transposed width/height would show."""
    out = tmp_path_factory.mktemp("sprites")
    ann = generate_sprite_dataset(out, 10, (128, 160), seed=3, split_name="train")
    return out, ann


def quiet_coco(ann_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def test_layout_and_categories(dataset):
    out, ann = dataset
    assert ann == out / "annotations" / "train.json"
    coco = json.loads(ann.read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(CLASSES) + 1))
    assert [im["id"] for im in coco["images"]] == list(range(1, 11))
    assert len(coco["annotations"]) > 10
    assert len({a["category_id"] for a in coco["annotations"]}) >= 4
    for im in coco["images"]:
        with Image.open(out / "train" / im["file_name"]) as img:
            assert img.mode == "RGB"
            assert img.size == (im["width"], im["height"]) == (160, 128)


def test_boxes_are_tight_mask_extents(dataset):
    _, ann = dataset
    coco = quiet_coco(ann)
    for a in coco.dataset["annotations"]:
        assert a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)
        m = coco.annToMask(a).astype(bool)  # (H, W)
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == m.sum() == mask_utils.area(a["segmentation"])
        assert a["area"] >= sprites.MIN_VISIBLE_PIXELS


def test_masks_do_not_overlap(dataset):
    _, ann = dataset
    coco = quiet_coco(ann)
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        if masks:
            assert np.stack(masks).sum(0).max() == 1  # each pixel belongs to at most one instance


def test_ground_truth_scores_perfect_ap(dataset):
    _, ann = dataset
    gt = quiet_coco(ann)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "segmentation": a["segmentation"], "score": 1.0} for a in gt.dataset["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        for iou_type in ("bbox", "segm"):
            e = COCOeval(gt, gt.loadRes(dets), iou_type)
            e.evaluate()
            e.accumulate()
            e.summarize()
            assert e.stats[0] == pytest.approx(1.0), iou_type  # AP @ IoU 0.50:0.95


def test_deterministic(tmp_path):
    a = generate_sprite_dataset(tmp_path / "a", 4, 96, seed=7)
    b = generate_sprite_dataset(tmp_path / "b", 4, 96, seed=7)
    c = generate_sprite_dataset(tmp_path / "c", 4, 96, seed=8)
    assert a.read_bytes() == b.read_bytes()
    for name in sorted(os.listdir(tmp_path / "a" / "train")):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()
    assert json.loads(a.read_text())["annotations"] != json.loads(c.read_text())["annotations"]
    pa, pc = (np.asarray(Image.open(p / "train" / "000000.png")) for p in (tmp_path / "a", tmp_path / "c"))
    assert not np.array_equal(pa, pc)


def test_image_does_not_depend_on_count(tmp_path):
    """Image i of a 2-image and of a 5-image dataset (same seed) is the same file with the same
    annotations: each image draws from its own generator, not from one shared by all."""
    few = json.loads(generate_sprite_dataset(tmp_path / "few", 2, 64, seed=5).read_text())
    many = json.loads(generate_sprite_dataset(tmp_path / "many", 5, 64, seed=5).read_text())
    for image in few["images"]:
        name = image["file_name"]
        assert (tmp_path / "few" / "train" / name).read_bytes() == (tmp_path / "many" / "train" / name).read_bytes()
        anns = [[a for a in d["annotations"] if a["image_id"] == image["id"]] for d in (few, many)]
        assert anns[0] == anns[1] and anns[0]
    assert len(many["images"]) == 5 and many["annotations"] != few["annotations"]
    # image 3 is the scene of its own generator [seed, 3], whatever came before it
    scene, masks, _ = render_image(np.random.default_rng([5, 3]), (64, 64))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "many" / "train" / "000003.png")), scene)
    assert len([a for a in many["annotations"] if a["image_id"] == 4]) == len(masks)


def test_every_class_draws_a_nonempty_sprite():
    rng = np.random.default_rng(0)
    for name in CLASSES:
        for _ in range(50):
            rgb, alpha = sprites.draw_sprite(name, rng)
            assert rgb.shape == alpha.shape + (3,) and alpha.any(), name
            assert max(alpha.shape) <= 17 and alpha.any(0).all() and alpha.any(1).all(), name  # tight


@pytest.fixture
def tiny_defaults(monkeypatch):
    monkeypatch.setattr(sprites, "DEFAULT_TRAIN_IMAGES", 3)
    monkeypatch.setattr(sprites, "DEFAULT_VAL_IMAGES", 2)
    monkeypatch.setattr(sprites, "DEFAULT_IMAGE_SIZE", 64)


def test_default_dataset_created_then_reused(tmp_path, tiny_defaults):
    paths = sprites.default_sprite_dataset(root=tmp_path)
    assert set(paths) == {"train_ann_file", "train_img_dir", "val_ann_file", "val_img_dir"}
    folder = tmp_path / f"sprites-{sprites.GENERATOR_VERSION}"
    assert paths["train_ann_file"] == str(folder / "annotations" / "train.json")
    assert len(os.listdir(paths["train_img_dir"])) == 3 and len(os.listdir(paths["val_img_dir"])) == 2
    assert os.listdir(tmp_path) == [folder.name]  # no temp folder left behind
    mtime = os.stat(paths["train_ann_file"]).st_mtime_ns
    assert sprites.default_sprite_dataset(root=tmp_path) == paths
    assert os.stat(paths["train_ann_file"]).st_mtime_ns == mtime


def test_default_dataset_from_environment(tmp_path, tiny_defaults, monkeypatch):
    monkeypatch.setenv("RTMDET_DATA", str(tmp_path / "data"))
    paths = sprites.default_sprite_dataset()
    assert paths["val_img_dir"] == str(tmp_path / "data" / f"sprites-{sprites.GENERATOR_VERSION}" / "val")


def test_interrupted_generation_is_not_taken_as_complete(tmp_path, tiny_defaults):
    stale = tmp_path / f".sprites-{sprites.GENERATOR_VERSION}.tmp-dead"  # what a killed run leaves
    generate_sprite_dataset(stale, 1, 64, split_name="train")
    paths = sprites.default_sprite_dataset(root=tmp_path)
    assert os.path.exists(paths["val_ann_file"]) and len(os.listdir(paths["train_img_dir"])) == 3


def test_concurrent_generation_loser_uses_winner(tmp_path, tiny_defaults, monkeypatch):
    folder = tmp_path / f"sprites-{sprites.GENERATOR_VERSION}"
    write = sprites._write_default

    def race(tmp):  # another process finishes and publishes while this one is still writing
        write(folder)
        (folder / "winner").touch()
        write(tmp)

    monkeypatch.setattr(sprites, "_write_default", race)
    paths = sprites.default_sprite_dataset(root=tmp_path)
    assert (folder / "winner").exists() and os.path.exists(paths["train_ann_file"])
    assert os.listdir(tmp_path) == [folder.name]  # the loser's copy is discarded


def test_cli(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        sprites.main(["--out", str(tmp_path), "--num-images", "2", "--size", "48", "64", "--seed", "1", "--split", "val"])
    assert "val.json" in out.getvalue()
    coco = json.loads((tmp_path / "annotations" / "val.json").read_text())
    assert [(im["height"], im["width"]) for im in coco["images"]] == [(48, 64)] * 2
