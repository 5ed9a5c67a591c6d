"""COCO-format loading (datamodules.coco): categories, masks vs pycocotools, image modes, bad input."""

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datamodules.coco import CocoAnnotations, DatasetError, load_image, load_sample
from datamodules.images import has_transparency
from datamodules.masks import decode_masks, rle_counts
from tests._coco_factory import make_coco

# pycocotools 2.0.x with numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def quiet_coco(ann_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def minimal(tmp_path, anns=(), images=None, categories=None, size=(20, 30)):
    """A one-image COCO file (image 5, file a.png of h x w = size) with the given annotations."""
    h, w = size
    Image.new("RGB", (w, h), (10, 20, 30)).save(tmp_path / "a.png")
    data = {"images": images if images is not None else [{"id": 5, "file_name": "a.png", "height": h, "width": w}],
            "annotations": list(anns), "categories": categories or [{"id": 1, "name": "thing"}]}
    return write_json(tmp_path / "ann.json", data)


def poly_ann(ann_id, poly, bbox, cat=1):
    return {"id": ann_id, "image_id": 5, "category_id": cat, "bbox": bbox, "iscrowd": 0, "segmentation": [poly]}


def test_category_mapping_round_trip_non_contiguous(tmp_path):
    ann, img = make_coco(tmp_path, num_images=5, instances=4, cat_ids=(100, 3, 7))
    coco = CocoAnnotations(ann, img)
    cats = coco.categories
    assert cats.cat_ids == (3, 7, 100) and cats.num_classes == 3
    assert cats.names == ("class_3", "class_7", "class_100")
    assert cats.cat_id_to_label == {3: 0, 7: 1, 100: 2}
    assert all(cats.label_to_cat_id[cats.cat_id_to_label[c]] == c for c in cats.cat_ids)
    by_id = {a["id"]: a for a in json.loads(ann.read_text())["annotations"]}
    n = 0
    for r in coco.records:
        for label, ann_id in zip(r.labels, r.ann_ids):
            assert cats.label_to_cat_id[int(label)] == by_id[ann_id]["category_id"]
            n += 1
    assert n == 20


def test_masks_match_pycocotools_ann_to_mask(tmp_path):
    """Polygons (one and two parts), compressed and uncompressed RLE; crowds become ignore boxes."""
    ann, img = make_coco(tmp_path, num_images=8, size=(37, 53), instances=6, crowd=True, empty_images=1)
    coco, ref = CocoAnnotations(ann, img), quiet_coco(ann)
    formats = set()
    for r in coco.records:
        s = load_sample(r)
        anns = ref.loadAnns(ref.getAnnIds(imgIds=r.image_id))
        crowd = [a for a in anns if a["iscrowd"]]
        masks = s["masks"].to_array()
        assert masks.shape == (len(r.ann_ids), 37, 53)
        for m, ann_id in zip(masks, r.ann_ids):
            a = ref.anns[ann_id]
            assert not a["iscrowd"]
            seg = a["segmentation"]
            formats.add(f"polygon{len(seg)}" if isinstance(seg, list) else type(seg["counts"]).__name__)
            np.testing.assert_array_equal(m, ref.annToMask(a).astype(bool))
        x, y, w, h = np.array([a["bbox"] for a in crowd], np.float32).reshape(-1, 4).T
        np.testing.assert_allclose(s["ignore_boxes"], np.stack([x, y, x + w, y + h], 1))
        assert len(s["labels"]) == len(anns) - len(crowd)
    assert formats == {"polygon1", "polygon2", "str", "list"}
    assert any(len(r.labels) == 0 for r in coco.records)  # the image without annotations is kept


def test_rle_decoder_edge_cases():
    rng = np.random.default_rng(0)
    h, w = 13, 9
    cases = [np.zeros((h, w), bool), np.ones((h, w), bool), rng.random((h, w)) < 0.5]
    m = np.zeros((h, w), bool)
    m[-1, 2], m[0, 3] = True, True  # a run wrapping from the bottom of a column to the top of the next
    cases.append(m)
    m = np.zeros((h, w), bool)
    m[0, 0] = m[-1, -1] = True  # first and last pixel
    cases.append(m)
    for m in cases:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        counts = rle_counts([rle["counts"]])[0]
        assert counts.sum() == h * w
        np.testing.assert_array_equal(decode_masks([rle], h, w).to_array()[0], m)
        rle_str = {"size": [h, w], "counts": rle["counts"].decode()}
        np.testing.assert_array_equal(decode_masks([rle_str], h, w).to_array()[0], m)


def save_image(path, im, **kw):
    im.save(path, **kw)
    return str(path)


def test_image_modes_load_as_rgb(tmp_path):
    grey = save_image(tmp_path / "l.png", Image.new("L", (4, 3), 77))
    np.testing.assert_array_equal(load_image(grey), np.full((3, 4, 3), 77, np.uint8))

    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    np.testing.assert_array_equal(load_image(save_image(tmp_path / "p.png", pal)), np.full((3, 4, 3), (200, 10, 20)))

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[0, 0, 3], rgba[1, 1, 3] = 250, 255, 128  # opaque, half, fully transparent pixels
    out = load_image(save_image(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA")))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], (250, 0, 0))
    np.testing.assert_array_equal(out[2, 3], (114, 114, 114))  # transparent -> the pad grey
    assert abs(int(out[1, 1, 0]) - (250 + 114) // 2) <= 1 and abs(int(out[1, 1, 1]) - 57) <= 1

    la = Image.fromarray(np.stack([np.full((3, 4), 10, np.uint8), np.zeros((3, 4), np.uint8)], -1), "LA")
    np.testing.assert_array_equal(load_image(save_image(tmp_path / "la.png", la)), np.full((3, 4, 3), 114))

    pt = Image.new("P", (4, 3), 0)
    pt.putpalette([9, 9, 9, 200, 10, 20] + [0] * 762)
    pt.putpixel((1, 1), 1)
    out = load_image(save_image(tmp_path / "pt.png", pt, transparency=0))
    np.testing.assert_array_equal(out[0, 0], (114, 114, 114))
    np.testing.assert_array_equal(out[1, 1], (200, 10, 20))

    deep = Image.fromarray(np.full((3, 4), 65535, np.uint16))
    np.testing.assert_array_equal(load_image(save_image(tmp_path / "i16.png", deep)), np.full((3, 4, 3), 255))


def test_transparency_is_one_rule_for_loading_and_cutouts(tmp_path):
    """``has_transparency`` decides both the grey compositing of ``load_image`` and whether
    ``experiments.predict`` keeps the alpha for its cut-outs."""
    from experiments.predict_files import read_rgba

    pt = Image.new("P", (4, 3), 0)
    pt.putpalette([9, 9, 9] + [0] * 765)
    cases = {"rgba.png": (Image.new("RGBA", (4, 3)), {}), "la.png": (Image.new("LA", (4, 3)), {}),
             "pt.png": (pt, {"transparency": 0}), "lt.png": (Image.new("L", (4, 3)), {"transparency": 0}),
             "rgb.png": (Image.new("RGB", (4, 3)), {}), "l.png": (Image.new("L", (4, 3)), {}),
             "p.png": (pt, {})}
    for name, (image, kw) in cases.items():
        path = save_image(tmp_path / name, image, **kw)
        with Image.open(path) as im:
            transparent = has_transparency(im)
        assert transparent == (name in ("rgba.png", "la.png", "pt.png", "lt.png")), name
        rgba = read_rgba(Path(path))
        assert (rgba is not None) == transparent, name
        if transparent:  # fully transparent everywhere: loaded as the pad grey, cut out with alpha 0
            assert rgba.shape == (3, 4, 4) and (rgba[..., 3] == 0).all(), name
            np.testing.assert_array_equal(load_image(path), np.full((3, 4, 3), 114))


def test_exif_orientation(tmp_path):
    raw = np.zeros((8, 12, 3), np.uint8)  # stored 12 wide, 8 high; top-left block red
    raw[:4, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = save_image(tmp_path / "rot.jpg", Image.fromarray(raw), exif=exif, quality=100)
    out = load_image(path, 1, (12, 8))  # annotations on the displayed (rotated) image: 8 wide, 12 high
    assert out.shape == (12, 8, 3)
    assert out[1, -2, 0] > 200 and out[1, -2, 1] < 60 and out[1, 1, 0] < 60  # the red corner is top-right
    out = load_image(path, 1, (8, 12))  # annotations on the stored pixels: EXIF ignored
    assert out.shape == (8, 12, 3) and out[1, 1, 0] > 200
    with pytest.raises(DatasetError, match=r"image 1: .*rot.jpg is 8x12, the annotation file says 5x5"):
        load_image(path, 1, (5, 5))


def one_image(*annotations, image=None):
    """JSON text of a one-image file (image 4, 2 x 2) with the given annotations."""
    image = image or {"id": 4, "file_name": "x.png", "height": 2, "width": 2}
    return json.dumps({"images": [image], "annotations": list(annotations), "categories": [{"id": 1, "name": "a"}]})


@pytest.mark.parametrize("content, match", [
    ("{not json", r"ann.json: not valid JSON"),
    (json.dumps({"images": [], "categories": []}), r"ann.json: missing top-level key 'annotations'"),
    (one_image(image={"id": 4, "height": 2, "width": 2}), r"ann.json: image 4 has no 'file_name'"),
    (one_image({"id": 77, "image_id": 4, "category_id": 9, "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1]]}),
     r"ann.json: annotation 77 \(image 4\) has unknown category_id 9"),
    (one_image({"id": 78, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}),
     r"ann.json: annotation 78 refers to unknown image_id 5"),
    (one_image({"id": 79, "image_id": 4, "category_id": 1, "bbox": [0, 0, 1, 1]}),
     r"ann.json: annotation 79 \(image 4\) has no 'segmentation'"),
    (one_image({"id": 80, "image_id": 4, "category_id": 1, "bbox": [0, 1], "segmentation": []}),
     r"ann.json: annotation 80 \(image 4\) has a malformed bbox"),
])
def test_malformed_annotation_files_raise_at_construction(tmp_path, content, match):
    (tmp_path / "ann.json").write_text(content)
    with pytest.raises(DatasetError, match=match):
        CocoAnnotations(tmp_path / "ann.json", tmp_path)
    assert issubclass(DatasetError, ValueError)


def test_missing_and_unreadable_images_raise_when_loading(tmp_path):
    ann = minimal(tmp_path, images=[{"id": 5, "file_name": "a.png", "height": 20, "width": 30},
                                    {"id": 6, "file_name": "gone.png", "height": 20, "width": 30},
                                    {"id": 7, "file_name": "broken.png", "height": 20, "width": 30},
                                    {"id": 8, "file_name": "a.png", "height": 21, "width": 30}])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    coco = CocoAnnotations(ann, tmp_path)  # construction does not touch the images
    load_sample(coco.records[0])
    with pytest.raises(DatasetError, match=r"image 6: file not found: .*gone.png"):
        load_sample(coco.records[1])
    with pytest.raises(DatasetError, match=r"image 7: cannot read .*broken.png"):
        load_sample(coco.records[2])
    with pytest.raises(DatasetError, match=r"image 8: .*a.png is 30x20, the annotation file says 30x21"):
        load_sample(coco.records[3])
    problems = coco.validate_images()  # all problems at once
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["image 6", "image 7", "image 8"]


def test_degenerate_annotations_warn_once_with_count(tmp_path):
    anns = [
        poly_ann(1, [2, 2, 10, 2, 10, 10], [2, 2, 8, 8]),  # fine
        poly_ann(2, [2, 2, 10, 2], [2, 2, 8, 1]),  # 2-point polygon (and a thin box)
        poly_ann(3, [2, 2, 10, 2, 10, 10], [2, 2, 0, 5]),  # zero-width box
        poly_ann(4, [2, 2, 10, 2, 10, 10], [40, 2, 5, 5]),  # box outside the 30-wide image
        {"id": 5, "image_id": 5, "category_id": 1, "bbox": [2, 2, 3, 3], "iscrowd": 0,
         "segmentation": {"size": [20, 30], "counts": [600]}},  # empty RLE mask
        {"id": 6, "image_id": 5, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0,
         "segmentation": [[1, 1, 4, 1], [1, 1, 4, 1, 4, 4]]},  # a short part dropped, the other kept
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coco = CocoAnnotations(minimal(tmp_path, anns), tmp_path)
    messages = [str(w.message) for w in caught if "degenerate" in str(w.message)]
    assert len(messages) == 1 and "skipped 4 degenerate annotation(s)" in messages[0], messages
    assert "ann.json" in messages[0]
    assert coco.records[0].ann_ids == (1, 6)


def test_empty_images_and_min_size_filters(tmp_path):
    ann, img = make_coco(tmp_path, num_images=4, instances=2, empty_images=2)
    assert len(CocoAnnotations(ann, img).records) == 4
    assert len(CocoAnnotations(ann, img, keep_empty=False).records) == 2
    assert len(CocoAnnotations(ann, img, min_size=49).records) == 0  # images are 48 x 64


def test_rle_size_mismatch_is_an_error(tmp_path):
    ann = {"id": 9, "image_id": 5, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0,
           "segmentation": {"size": [10, 10], "counts": [100]}}
    with pytest.raises(DatasetError, match=r"annotation 9 \(image 5\) has an RLE of size \[10, 10\]"):
        CocoAnnotations(minimal(tmp_path, [ann]), tmp_path)
