"""A development set of real game art: CC0 sprites from a PyPI wheel composited into COCO scenes.

    python -m datamodules.real_art --out DIR [--seed 0] [--size 320] [--train 400 --val 80 --val-heldout 80]
        [--cache ~/.cache/rtmdet/real_art/wheels] [--wheel FILE]

The artwork is Kenney.nl's (CC0) as the ``arcade`` package ships it in its wheel. The wheel is
fetched with pip into a cache (``pip download arcade==3.3.3 --no-deps``) and the PNGs are read
straight out of the zip: no art lives in the repository, and the set is rebuilt from the wheel
and a seed. ``DIR/LICENSES.json`` records, for every source, the package, the wheel and its
sha256, the licence files as shipped (path and text), the licence's URL and every member used.

Eleven categories of designs (``ARCADE``): a design is one drawn object with its animation frames
(a character, a slime of one colour, the red key, ...). A share of each category's designs
(``heldout_fraction``, at least one, never all) is held out from training:

* ``train`` and ``val``: scenes of the training designs;
* ``val_heldout``: scenes of the held-out designs only, which no training image contains.

Scenes are made by ``datamodules/scene_composer.py`` (pixelated sprites 8-32 px, upscaled 1x-4x
by pixel repetition, on tiled terrain, flat, noisy or banded backgrounds with unannotated
scenery; masks are the visible opaque pixels exactly). Layout: ``DIR/<split>/NNNNNN.png`` and
``DIR/annotations/<split>.json``, each annotation with its ``design`` name.

Kept out on purpose (the issue reserves them for an independent check): the ansimuz packs that
arcade also ships (``cybercity_background``, ``miami_synth_parallax``) and pyxel's resources.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scene_composer import Design, write_split

GENERATOR_VERSION = "v1"
SPLITS = ("train", "val", "val_heldout")  # split_code = position: the images' random streams differ
DEFAULT_COUNTS = {"train": 400, "val": 80, "val_heldout": 80}
DEFAULT_SIZE = 320
HELDOUT_FRACTION = 0.25
RESERVED = ("cybercity_background", "miami_synth_parallax")  # ansimuz packs: the independent check's


class RealArtError(RuntimeError):
    """The artwork could not be fetched or read (message says which wheel, member or command)."""


@dataclass(frozen=True)
class ArtSource:
    """Artwork inside one wheel: where it is, under which licence, and what is drawn from it.

    ``licence_files``: wheel members that state the licence (recorded verbatim in the manifest).
    ``designs``: the annotated objects; ``tiles``: background terrain; ``clutter``: unannotated scenery.
    """

    package: str
    version: str
    licence: str
    licence_url: str
    author: str
    licence_files: tuple[str, ...]
    categories: tuple[str, ...]
    designs: tuple[Design, ...]
    tiles: tuple[str, ...]
    clutter: tuple[str, ...]

    def members(self) -> list[str]:
        return sorted({f for d in self.designs for f in d.frames} | set(self.tiles) | set(self.clutter))


# ------------------------------------------------------------------------- arcade's Kenney art

_IMG = "arcade/resources/assets/images/"


def _png(folder: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{_IMG}{folder}/{n}.png" for n in names)


_POSES = ("idle", "walk0", "walk1", "walk2", "walk3", "walk4", "walk5", "walk6", "walk7", "jump", "fall",
          "climb0", "climb1")
_CHARACTERS = {"female_adventurer": "femaleAdventurer", "female_person": "femalePerson",
               "male_adventurer": "maleAdventurer", "male_person": "malePerson", "robot": "robot", "zombie": "zombie"}
_TABLE: dict[str, dict[str, tuple[str, ...]]] = {  # category -> design -> frames
    "character": {
        **{folder: _png(f"animated_characters/{folder}", *(f"{stem}_{p}" for p in _POSES))
           for folder, stem in _CHARACTERS.items()},
        "alienBlue": _png("alien", "alienBlue_front", "alienBlue_walk1", "alienBlue_walk2", "alienBlue_jump",
                          "alienBlue_fall", "alienBlue_climb1", "alienBlue_climb2"),
    },
    "slime": {"slimeBlue": _png("enemies", "slimeBlue", "slimeBlue_move"), "slimeGreen": _png("enemies", "slimeGreen"),
              "slimePurple": _png("enemies", "slimePurple"), "slimeBlock": _png("enemies", "slimeBlock")},
    "critter": {"bee": _png("enemies", "bee"), "fly": _png("enemies", "fly"),
                "frog": _png("enemies", "frog", "frog_move"), "ladybug": _png("enemies", "ladybug"),
                "mouse": _png("enemies", "mouse"), "fishGreen": _png("enemies", "fishGreen"),
                "fishPink": _png("enemies", "fishPink"),
                "wormGreen": _png("enemies", "wormGreen", "wormGreen_move", "wormGreen_dead"),
                "wormPink": _png("enemies", "wormPink")},
    "coin": {"coinGold": _png("items", "coinGold", "coinGold_ll", "coinGold_lr", "coinGold_ul", "coinGold_ur"),
             "coinSilver": _png("items", "coinSilver"), "coinBronze": _png("items", "coinBronze"),
             "goldSpin": _png("items", "gold_1", "gold_2", "gold_3", "gold_4")},
    "gem": {f"gem{c}": _png("items", f"gem{c}") for c in ("Blue", "Green", "Red", "Yellow")},
    "key": {f"key{c}": _png("items", f"key{c}") for c in ("Blue", "Green", "Red", "Yellow")},
    "flag": {f"flag{c}": _png("items", f"flag{c}1", f"flag{c}2", f"flag{c}_down") for c in ("Green", "Red", "Yellow")},
    "crate": {"boxCrate": _png("tiles", "boxCrate"), "boxCrate_double": _png("tiles", "boxCrate_double"),
              "boxCrate_single": _png("tiles", "boxCrate_single")},
    "plant": {"bush": _png("tiles", "bush"), "cactus": _png("tiles", "cactus"),
              "mushroomRed": _png("tiles", "mushroomRed"), "plantPurple": _png("tiles", "plantPurple"),
              "grass_sprout": _png("tiles", "grass_sprout"),
              "treeGreen": _png("topdown_tanks", "treeGreen_large", "treeGreen_small"),
              "treeBrown": _png("topdown_tanks", "treeBrown_large", "treeBrown_small")},
    "spaceship": {"playerShip1_blue": _png("space_shooter", "playerShip1_blue"),
                  "playerShip1_green": _png("space_shooter", "playerShip1_green"),
                  "playerShip1_orange": _png("space_shooter", "playerShip1_orange"),
                  "playerShip2_orange": _png("space_shooter", "playerShip2_orange"),
                  "playerShip3_orange": _png("space_shooter", "playerShip3_orange")},
    "tank": {f"tank_{c}": _png("topdown_tanks", f"tank_{c}") for c in ("blue", "dark", "green", "red", "sand")},
}

ARCADE = ArtSource(
    package="arcade", version="3.3.3", licence="CC0-1.0",
    licence_url="http://creativecommons.org/publicdomain/zero/1.0/", author="Kenney (www.kenney.nl)",
    licence_files=(f"{_IMG}License.txt", f"{_IMG}readme.txt"),
    categories=tuple(_TABLE),
    designs=tuple(Design(name, category, frames) for category, designs in _TABLE.items()
                  for name, frames in designs.items()),
    tiles=_png("tiles", *(f"{t}{p}" for t in ("grass", "dirt", "sand", "snow", "stone", "planet")
                          for p in ("Center", "Mid")), "brickBrown", "brickGrey")
    + _png("topdown_tanks", "tileGrass1", "tileGrass2", "tileSand1", "tileSand2", "tileGrass_roadEast",
           "tileSand_roadNorth"),
    clutter=_png("tiles", "rock", "signExit", "signLeft", "signRight", "torch1", "torchOff", "ladderMid", "spikes",
                 "doorClosed_mid", "leverLeft", "switchRed", "lockYellow", "bomb", "snow_pile")
    + _png("space_shooter", "meteorGrey_big1", "meteorGrey_big3", "meteorGrey_med1", "meteorGrey_small1")
    + _png("items", "star") + _png("enemies", "saw"),
)


# ------------------------------------------------------------------------------ the wheel

def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rtmdet/real_art/wheels`` (else ``~/.cache/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rtmdet" / "real_art" / "wheels"


def cached_wheel(cache_dir: Path, package: str, version: str) -> Path | None:
    found = sorted(Path(cache_dir).glob(f"{package}-{version}-*.whl"))
    return found[0] if found else None


def fetch_wheel(source: ArtSource, cache_dir: Path | None = None) -> Path:
    """The source's wheel in ``cache_dir``, downloaded with this Python's pip when not there yet."""
    cache_dir = Path(cache_dir or default_cache_dir())
    wheel = cached_wheel(cache_dir, source.package, source.version)
    if wheel is not None:
        return wheel
    spec = f"{source.package}=={source.version}"
    by_hand = f"or put {source.package}-{source.version}-*.whl into {cache_dir} yourself (or pass --wheel FILE)"
    if importlib.util.find_spec("pip") is None:
        raise RealArtError(f"cannot fetch {spec}: pip is not installed in {sys.executable}; install pip, {by_hand}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:", "-d", str(cache_dir)]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheel = cached_wheel(cache_dir, source.package, source.version)
    if proc.returncode or wheel is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RealArtError(f"`{' '.join(command[2:])}` failed (exit {proc.returncode}; offline or no package index?), "
                           f"{by_hand}:\n{tail}")
    return wheel


def read_art(wheel: Path, source: ArtSource) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(member -> uint8 (h, w, 4) RGBA, licence file -> text) read from the wheel's zip."""
    for member in source.members():
        if any(f"/{r}/" in member for r in RESERVED):
            raise RealArtError(f"{member} belongs to a pack reserved for the independent check ({', '.join(RESERVED)})")
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise RealArtError(f"{wheel}: not a readable wheel ({e}); delete it to fetch it again") from e
    with zf:
        names = set(zf.namelist())
        missing = [m for m in (*source.licence_files, *source.members()) if m not in names]
        if missing:
            raise RealArtError(f"{wheel}: {len(missing)} member(s) missing, e.g. {missing[:3]}")
        licences = {m: zf.read(m).decode("utf-8", "replace") for m in source.licence_files}
        art = {}
        for m in source.members():
            try:
                with Image.open(io.BytesIO(zf.read(m))) as im:
                    art[m] = np.array(im.convert("RGBA"))
            except OSError as e:
                raise RealArtError(f"{wheel}: {m} is not a readable image ({e})") from e
    return art, licences


# ----------------------------------------------------------------------------- the data set

def split_designs(source: ArtSource, heldout_fraction: float = HELDOUT_FRACTION,
                  seed: int = 0) -> tuple[list[Design], list[Design]]:
    """(train designs, held-out designs): per category ``round(fraction * n)`` held out, at least one
    and at most n - 1, chosen by a permutation drawn from ``seed`` (names sorted first)."""
    rng = np.random.default_rng([seed, 1000])
    train, heldout = [], []
    for category in source.categories:
        designs = sorted((d for d in source.designs if d.category == category), key=lambda d: d.name)
        if len(designs) < 2:
            raise RealArtError(f"category {category!r} needs two designs to hold one out, has {len(designs)}")
        k = min(max(round(heldout_fraction * len(designs)), 1), len(designs) - 1)
        out = set(rng.permutation(len(designs))[:k].tolist())
        for i, d in enumerate(designs):
            (heldout if i in out else train).append(d)
    return train, heldout


def build_real_art(out_dir: str | Path, wheel: str | Path, source: ArtSource = ARCADE, seed: int = 0,
                   counts: dict[str, int] | None = None, size: int = DEFAULT_SIZE,
                   heldout_fraction: float = HELDOUT_FRACTION) -> dict:
    """Write the three splits and ``LICENSES.json`` into ``out_dir``; returns the manifest."""
    counts = dict(DEFAULT_COUNTS, **(counts or {}))
    wheel, out_dir = Path(wheel), Path(out_dir)
    art, licences = read_art(wheel, source)
    train_designs, heldout_designs = split_designs(source, heldout_fraction, seed)
    tiles, clutter = [art[m] for m in source.tiles], [art[m] for m in source.clutter]
    info = {"description": f"real game art ({source.author}, {source.licence}) from {wheel.name} "
                           "composited by datamodules/real_art.py", "version": GENERATOR_VERSION}
    files = {}
    for code, split in enumerate(SPLITS):
        designs = heldout_designs if split == "val_heldout" else train_designs
        ann = write_split(out_dir, split, code, counts[split], seed, (size, size), list(source.categories), designs,
                          art, tiles, clutter, info)
        files[split] = str(ann.relative_to(out_dir))
    manifest = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "counts": counts,
        "heldout_fraction": heldout_fraction, "annotation_files": files,
        "designs": {"train": sorted(d.name for d in train_designs), "heldout": sorted(d.name for d in heldout_designs)},
        "sources": [{
            "package": source.package, "version": source.version, "wheel": wheel.name,
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "author": source.author, "licence": source.licence, "licence_url": source.licence_url,
            "licence_files": [{"path": p, "text": t} for p, t in licences.items()],
            "members_used": source.members(),
        }],
        "not_used": f"the ansimuz packs in {source.package} ({', '.join(RESERVED)}) and pyxel's resources: "
                    "kept for an independent check",
    }
    (out_dir / "LICENSES.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.real_art", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="square image side (px)")
    for split in SPLITS:
        p.add_argument(f"--{split.replace('_', '-')}", dest=split, type=int, default=DEFAULT_COUNTS[split],
                       metavar="N", help=f"images in {split} (default {DEFAULT_COUNTS[split]})")
    p.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION,
                   help="share of each category's designs kept out of training (default 0.25)")
    p.add_argument("--cache", type=Path, default=None, help=f"wheel cache (default {default_cache_dir()})")
    p.add_argument("--wheel", type=Path, default=None, help=f"use this {ARCADE.package}-{ARCADE.version} wheel file")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        wheel = args.wheel or fetch_wheel(ARCADE, args.cache)
        manifest = build_real_art(args.out, wheel, ARCADE, args.seed, {s: getattr(args, s) for s in SPLITS},
                                  args.size, args.heldout_fraction)
    except RealArtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, rel in manifest["annotation_files"].items():
        anns = json.loads((args.out / rel).read_text())["annotations"]
        small = np.mean([a["area"] < 32**2 for a in anns]) if anns else 0.0
        print(f"{split:12} {manifest['counts'][split]:4d} images {len(anns):5d} instances ({small:.0%} under 32^2 px) "
              f"-> {args.out / rel}")
    print(f"licences: {args.out / 'LICENSES.json'}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
