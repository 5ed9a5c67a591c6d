"""Property-based fuzzing of the data path: random mutations of a small valid COCO dataset (its json
and its image files) go through the loader, the COCO metric and one training step. Each either
ends in a ``DatasetError`` whose every line names the annotation file, or an image id and its file,
or gives a result; never another exception (nor a crash of pycocotools' C code).

Mutations: values of any JSON type in any field, missing keys, removed or duplicated entries,
degenerate, out-of-image and huge geometry, huge / negative / duplicate ids, unicode and nested
file names (the file moved there, or not), RLE of the wrong size or with random counts, image
files truncated, emptied, overwritten, resized or saved in another mode or format.

CI runs a bounded, derandomised number of examples (a fixed set, ~1 min in all); the ``slow``
variants run many more: ``python -m pytest -m slow tests/test_fuzz.py``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from datamodules import COCODataModule, CocoAnnotations, DatasetError, collate, finalize_batch, load_sample
from rtmdet import build_model
from rtmdet.coco_eval import COCOMetric
from tests._coco_factory import make_coco

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # skipped annotations, frames, PIL
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools

H, W = 48, 64  # the base images


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------- the dataset

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """3 images of 48 x 64 (ids 10, 13, 16) with 2 instances each as polygon / RLE / uncompressed
    RLE and a crowd region; categories 3, 7, 100."""
    root = tmp_path_factory.mktemp("fuzz_base")
    make_coco(root, num_images=3, instances=2, crowd=True)
    return root


# ------------------------------------------------------------------------------- the mutations
# Each mutation is drawn as a function (data dict, dataset folder) -> None that edits both in place.

NUMBERS = st.one_of(
    st.integers(-3, 70), st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1, 2**63, -2**63 - 1, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e3, 1e3), st.sampled_from([0.5, 1e-9, 1e308, -1e308]))
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=6),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10)
NAMES = st.sampled_from(["ñandú.png", "日本/画像.png", "a/b/c/deep.png", "with space.png", "../escape.png",
                         "x.PNG", ".png", "/", "\u0000.png", "dir/", "e\u0301.png"])
KEYS = {"images": ["id", "file_name", "height", "width"],
        "annotations": ["id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd"],
        "categories": ["id", "name"]}


INDEX = st.integers(0, 99)  # an entry / key position, taken modulo the length when applied


class Mutation:
    """An edit of (data dict, dataset folder), shown by what it does when hypothesis reports it."""

    def __init__(self, description: str, apply):
        self.description, self.apply = description, apply

    def __call__(self, data: dict, root: Path) -> None:
        self.apply(data, root)

    def __repr__(self) -> str:
        return self.description


def _pick(items, i: int):
    return items[i % len(items)] if isinstance(items, list) and items else None


@st.composite
def set_value(draw):
    """Any JSON value in any field (or a new one) of any entry."""
    section, i, k, value = draw(st.sampled_from(list(KEYS))), draw(INDEX), draw(INDEX), draw(JSON)

    def apply(data, root):
        entry = _pick(data.get(section), i)
        if isinstance(entry, dict):
            entry[_pick(KEYS[section] + ["extra"], k)] = value
    return Mutation(f"{section}[{i}].{_pick(KEYS[section] + ['extra'], k)} = {value!r}", apply)


@st.composite
def remove_key(draw):
    section, i, k = draw(st.sampled_from(list(KEYS))), draw(INDEX), draw(INDEX)

    def apply(data, root):
        entry = _pick(data.get(section), i)
        if isinstance(entry, dict) and entry:
            entry.pop(_pick(sorted(entry), k))
    return Mutation(f"del {section}[{i}][key #{k}]", apply)


@st.composite
def remove_or_duplicate_entry(draw):
    section, i, remove = draw(st.sampled_from(list(KEYS))), draw(INDEX), draw(st.booleans())

    def apply(data, root):
        entries = data.get(section)
        if isinstance(entries, list) and entries:
            if remove:
                entries.pop(i % len(entries))
            else:
                entries.append(copy.deepcopy(entries[i % len(entries)]))
    return Mutation(f"{'remove' if remove else 'duplicate'} {section}[{i}]", apply)


@st.composite
def top_level(draw):
    key, remove, value = draw(st.sampled_from(list(KEYS))), draw(st.booleans()), draw(JSON)

    def apply(data, root):
        if remove:
            data.pop(key, None)
        else:
            data[key] = value
    return Mutation(f"del {key}" if remove else f"{key} = {value!r}", apply)


@st.composite
def geometry(draw):
    """Degenerate, out-of-image or huge boxes and polygons, RLE of the wrong size or random counts."""
    coord = st.one_of(st.floats(-80, 150), st.sampled_from([0.0, 1e-7, -1e9, 1e9, 1e12, 4e8]))
    kind, i = draw(st.sampled_from(["bbox", "polygon", "rle_size", "rle_string", "rle_list", "crowd"])), draw(INDEX)
    bbox = draw(st.lists(coord, min_size=4, max_size=4))
    polygon = draw(st.lists(st.lists(coord, max_size=14), max_size=3))
    h, w = draw(st.sampled_from([(H, W), (W, H), (1, 1), (H, W + 1), (0, 0)]))
    counts_string = draw(st.text(st.characters(min_codepoint=32, max_codepoint=130), max_size=20))
    counts_list = draw(st.lists(st.integers(-5, H * W + 5), max_size=6))

    def apply(data, root):
        a = _pick(data.get("annotations"), i)
        if not isinstance(a, dict):
            return
        if kind == "bbox":
            a["bbox"] = bbox
        elif kind == "polygon":
            a["segmentation"] = polygon
        elif kind == "rle_size":
            a["segmentation"] = {"size": [h, w], "counts": [h * w]}
        elif kind == "rle_string":
            a["segmentation"] = {"size": [H, W], "counts": counts_string}
        elif kind == "rle_list":
            a["segmentation"] = {"size": [H, W], "counts": counts_list + [max(H * W - sum(counts_list), 0)]}
        else:
            a["iscrowd"] = 1 - a.get("iscrowd", 0) if a.get("iscrowd", 0) in (0, 1) else 0
    return Mutation(f"annotations[{i}]: {kind} ({bbox=}, {polygon=}, {h=}, {w=}, {counts_string=}, {counts_list=})",
                    apply)


@st.composite
def ids(draw):
    """Huge, negative, zero or duplicate ids."""
    value = draw(st.sampled_from([0, -1, -7, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 10**40, 10, 13]))
    section, i, move = draw(st.sampled_from(list(KEYS))), draw(INDEX), draw(st.booleans())

    def apply(data, root):
        entry = _pick(data.get(section), i)
        if not isinstance(entry, dict):
            return
        old, entry["id"] = entry.get("id"), value
        if section == "images" and move and isinstance(data.get("annotations"), list):
            for a in data["annotations"]:  # the image's annotations move along
                if isinstance(a, dict) and a.get("image_id") == old:
                    a["image_id"] = value
    return Mutation(f"{section}[{i}].id = {value}{' (with its annotations)' if move else ''}", apply)


@st.composite
def file_name(draw):
    """A unicode / nested / odd file name; the file is moved there or not."""
    name, move, i = draw(NAMES), draw(st.booleans()), draw(INDEX)

    def apply(data, root):
        entry = _pick(data.get("images"), i)
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            return
        src, dst = root / "images" / entry["file_name"], root / "images" / name
        if (move and "\u0000" not in name and not name.endswith("/") and src.is_file() and src != dst
                and dst.parent.is_relative_to(root)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
        entry["file_name"] = name
    return Mutation(f"images[{i}].file_name = {name!r}{' (file moved)' if move else ''}", apply)


@st.composite
def image_size(draw):
    value = draw(st.sampled_from([0, -1, 1, 47, 48.0, 48.5, 64, 2**16, 2**40, "48", None, float("nan"), True]))
    key, i = draw(st.sampled_from(["height", "width"])), draw(INDEX)

    def apply(data, root):
        entry = _pick(data.get("images"), i)
        if isinstance(entry, dict):
            entry[key] = value
    return Mutation(f"images[{i}].{key} = {value!r}", apply)


@st.composite
def image_file(draw):
    """Corrupt, empty, resized or re-encoded image files."""
    kind = draw(st.sampled_from(["truncate", "flip", "empty", "text", "resize", "resize_json", "mode", "format",
                                 "frames"]))
    index, cut = draw(st.integers(0, 2)), draw(st.floats(0, 1))
    mode = draw(st.sampled_from(["L", "P", "P+transparency", "LA", "RGBA", "I;16", "1", "CMYK"]))
    size = draw(st.sampled_from([(1, 1), (W, H + 1), (2000, 1), (H, W)]))
    fmt = draw(st.sampled_from(["JPEG", "GIF", "BMP", "WEBP"]))

    def apply(data, root):
        path = root / "images" / f"{10 + 3 * index:06d}.png"
        if not path.is_file():
            return
        raw = path.read_bytes()
        if kind == "truncate":
            path.write_bytes(raw[: int(len(raw) * cut)])
        elif kind == "flip":
            b = bytearray(raw)
            b[int((len(b) - 1) * cut)] ^= 0xFF
            path.write_bytes(bytes(b))
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("id,label\n1,cat\n")
        else:
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
            except Exception:  # noqa: BLE001 - an earlier mutation broke it already
                return
            if kind == "resize":
                im.resize(size).save(path, format="PNG")
            elif kind == "resize_json":  # the json follows: a valid 1 x 1 or 1 x 2000 image
                im.resize(size).save(path, format="PNG")
                for entry in data.get("images") if isinstance(data.get("images"), list) else []:
                    if isinstance(entry, dict) and entry.get("file_name") == path.name:
                        entry["width"], entry["height"] = size
            elif kind == "mode" and mode == "P+transparency":
                im.convert("P").save(path, format="PNG", transparency=0)
            elif kind == "mode":
                converted = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
                converted.save(path, format="TIFF" if mode == "CMYK" else "PNG")
            elif kind == "format":  # a JPEG / GIF / BMP / WebP behind a .png name
                im.save(path, format=fmt)
            else:
                im.save(path, format="GIF", save_all=True, append_images=[im.rotate(90)])
    return Mutation(f"image file #{index}: {kind} ({cut=}, {mode=}, {size=} (w, h), {fmt=})", apply)


MUTATION = st.one_of(set_value(), remove_key(), remove_or_duplicate_entry(), top_level(), geometry(), ids(),
                     file_name(), image_size(), image_file())
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)
# Mostly files the loader accepts (odd geometry, ids, names, image modes and sizes): they reach the transforms.
ACCEPTABLE = st.lists(st.one_of(geometry(), ids(), file_name(), image_file()), min_size=1, max_size=3)


def mutated_copy(base: Path, mutations) -> tuple[Path, Path, Path]:
    """A copy of the base dataset with the mutations applied: (folder, ann_file, img_dir)."""
    root = Path(tempfile.mkdtemp(prefix="fuzz_"))
    shutil.copytree(base / "images", root / "images")
    data = json.loads((base / "ann.json").read_text())
    for apply in mutations:
        apply(data, root)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))  # NaN / Infinity as JSON's common extension, which json reads
    return root, ann_file, root / "images"


# ------------------------------------------------------------------------------- the properties

def assert_names_file_and_id(e: DatasetError, ann_file: Path, img_dir: Path) -> None:
    """Every line names the annotation file, or an image id and that image's file."""
    data = json.loads(ann_file.read_text())
    images = data.get("images") if isinstance(data, dict) else None
    paths = {os.path.join(img_dir, im["file_name"]) for im in (images if isinstance(images, list) else [])
             if isinstance(im, dict) and isinstance(im.get("file_name"), str)}
    for line in str(e).splitlines():
        line = line.strip()
        if not line or re.fullmatch(r"\.\.\. and \d+ more|\d+ image file problem\(s\); fix or remove these images:",
                                    line):
            continue
        assert str(ann_file) in line or (re.match(r"image -?\d+[: ]", line) and any(p in line for p in paths)), str(e)


def metric_runs(annotations: CocoAnnotations, ann_file: Path, img_dir: Path) -> None:
    """The metric on what the loader keeps, with the instances of each loadable image as detections."""
    cats = annotations.categories
    metric = COCOMetric(str(ann_file), [cats.label_to_cat_id[i] for i in range(cats.num_classes)])
    preds, image_ids = [], []
    for r in annotations.records:
        try:
            s = load_sample(r)
            masks = s["masks"].to_tensor()
            boxes = torch.from_numpy(np.asarray(s["boxes"], np.float32)).reshape(-1, 4)
            labels = torch.from_numpy(np.asarray(s["labels"], np.int64))
        except DatasetError as e:
            assert_names_file_and_id(e, ann_file, img_dir)
            masks, boxes, labels = torch.zeros(0, r.height, r.width, dtype=torch.bool), torch.zeros(0, 4), \
                torch.zeros(0, dtype=torch.int64)
        n = len(labels)
        preds.append({"boxes": boxes, "labels": labels, "scores": torch.linspace(1, 0.5, n), "masks": masks})
        image_ids.append(r.image_id)
    metric.update(preds, image_ids)
    stats = metric.compute()
    assert all(-1.0 <= v <= 1.0 for v in stats.values()), stats


def loader_and_metric(base: Path, mutations) -> CocoAnnotations | None:
    root, ann_file, img_dir = mutated_copy(base, mutations)
    try:
        try:
            annotations = CocoAnnotations(ann_file, img_dir)
        except DatasetError as e:
            assert_names_file_and_id(e, ann_file, img_dir)
            return None
        for problem in annotations.validate_images():
            assert_names_file_and_id(DatasetError(problem), ann_file, img_dir)
        metric_runs(annotations, ann_file, img_dir)
        return annotations
    finally:
        shutil.rmtree(root, ignore_errors=True)


_MODELS: dict[int, torch.nn.Module] = {}


def training_step(base: Path, mutations) -> str:
    """The DataModule's checks, Mosaic / MixUp (stage 1) and stage-2 samples, one forward / backward."""
    root, ann_file, img_dir = mutated_copy(base, mutations)
    try:
        try:
            dm = COCODataModule(str(ann_file), str(img_dir), val_ann_file=str(ann_file), val_img_dir=str(img_dir),
                                img_size=64, batch_size=2, num_workers=0, mosaic_cache=5, mixup_cache=3,
                                mixup_prob=1.0, seed=0)
            dm.setup("fit")
            ds = dm.train_dataset
            if len(ds) == 0:
                return "no training image"
            samples = [ds[(i % len(ds), 1)] for i in range(7)]  # Mosaic from the 5th, MixUp from the 2nd
            samples.append(ds[(0, 2)])
            val = [dm.val_dataset[i] for i in range(len(dm.val_dataset))]
        except DatasetError as e:
            assert_names_file_and_id(e, ann_file, img_dir)
            return "reported"
        if dm.num_classes not in _MODELS:
            torch.manual_seed(0)
            _MODELS[dm.num_classes] = build_model("tiny", dm.num_classes)
        model = _MODELS[dm.num_classes].train()
        images, targets = finalize_batch(collate(samples[-2:]))
        losses = model.loss(model(images), targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        assert set(losses) and all(v.ndim == 0 for v in losses.values())
        images, targets = finalize_batch(collate(val[:2]))
        with torch.no_grad():
            preds = model.eval().predict(images, [t["meta"] for t in targets])
        assert len(preds) == len(targets)
        return "trained"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------- tests

def test_the_base_dataset_passes(base):
    assert len(loader_and_metric(base, []).records) == 3
    assert training_step(base, []) == "trained"


@fuzz_settings(120)
@given(mutations=MUTATIONS)
def test_fuzz_loader_and_metric(base, mutations):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        event("loader accepts" if loader_and_metric(base, mutations) else "loader reports")


@fuzz_settings(20)
@given(mutations=ACCEPTABLE)
def test_fuzz_training_step(base, mutations):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        event(training_step(base, mutations))


@pytest.mark.slow
@fuzz_settings(3000)
@given(mutations=MUTATIONS)
def test_fuzz_loader_and_metric_many(base, mutations):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        event("loader accepts" if loader_and_metric(base, mutations) else "loader reports")


@pytest.mark.slow
@fuzz_settings(500)
@given(mutations=ACCEPTABLE)
def test_fuzz_training_step_many(base, mutations):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        event(training_step(base, mutations))
