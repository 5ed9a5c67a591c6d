"""Input listing and output naming shared by ``experiments.predict`` and ``experiments.onnx_predict``.

numpy and Pillow only (no torch), so that the torch-free runner can use it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_inputs(path: Path) -> list[Path]:
    """An image file, or the image files of a folder (non-recursive, by extension), sorted."""
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}")
    return files


def has_transparency(im: Image.Image) -> bool:
    """``datamodules.images.has_transparency``'s rule, restated here because this module must not
    import torch (the ONNX runner uses it); tests/test_coco_loading.py checks that both agree."""
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def read_rgba(path: Path) -> np.ndarray | None:
    """The image as RGBA (H, W, 4) when it has transparency (for the cut-outs' alpha), else None."""
    with Image.open(path) as im:
        if has_transparency(im):
            return np.array(ImageOps.exif_transpose(im).convert("RGBA"))
    return None


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (runs of other characters -> "-")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def unique_stems(files: list[Path]) -> dict[Path, str]:
    """Output name per input: its stem, or stem_ext when two inputs share a stem."""
    counts: dict[str, int] = {}
    for f in files:
        counts[f.stem] = counts.get(f.stem, 0) + 1
    return {f: slug(f.stem if counts[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.')}") for f in files}
