"""Detect and cut out instances with an end-to-end ONNX export; needs only numpy, Pillow and onnxruntime.

    python -m experiments.onnx_predict --model model.onnx --input IMG_OR_DIR --output DIR
        [--score-thr 0.3] [--batch-size 4] [--nearest | --no-nearest] [--threads N]

``model.onnx`` comes from ``python -m experiments.export --ckpt CKPT --output model.onnx --end-to-end``.
Writes the same files as ``experiments.predict``: ``overlays/<name>.png``, ``cutouts/<name>/...png``
(RGBA) and ``results.json`` (same keys). Per batch: read and letterbox the images (numpy, the
same rounding as ``rtmdet.preprocess``), run the graph, keep each image's ``num_dets`` instances
scoring at least ``--score-thr``, and map them back to original pixels: boxes divided by the
letterbox scale, stride-8 mask logits pasted with the bilinear maps of ``rtmdet.mask_paste``
(``experiments/numpy_inference.py``). A model exported with ``--masks input`` has its
input-resolution masks cropped and resized nearest-neighbour instead (approximate).

No torch import anywhere on this path (``tests/test_export_e2e.py`` runs it with torch blocked).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from experiments import numpy_inference as npi
from experiments.overlay import draw_overlay
from experiments.predict_files import list_inputs, read_rgba, slug, unique_stems

METADATA_KEY = "rtmdet_e2e"  # as experiments.export_e2e writes it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.onnx_predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an end-to-end ONNX export (experiments.export --end-to-end)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--score-thr", type=float, default=0.3,
                   help="keep instances scoring at least this (not below the threshold baked into the model)")
    p.add_argument("--batch-size", type=int, default=4, help="images per run of the graph")
    p.add_argument("--nearest", action=argparse.BooleanOptionalAction,
                   help="nearest-neighbour letterbox (default: as the checkpoint was validated)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its own)")
    return p


class Detector:
    """An end-to-end ONNX session and the metadata it was exported with."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FileNotFoundError(f"model not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle pool threads would spin after each run, taking the cores from the numpy paste that follows.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise ValueError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {e})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} has no '{METADATA_KEY}' metadata: not an end-to-end export "
                             "(python -m experiments.export ... --end-to-end)")
        self.meta = json.loads(raw)
        self.img_size = int(self.meta["img_size"])
        self.names = list(self.meta["class_names"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images: uint8 (B, 3, S, S) letterboxed RGB -> the graph's outputs by name."""
        return dict(zip(self.output_names, self.session.run(None, {"images": images})))

    def instances(self, out: dict[str, np.ndarray], b: int, orig_size: tuple[int, int],
                  scale_factor: tuple[float, float], score_thr: float) -> dict[str, np.ndarray]:
        """Image ``b``'s instances in original pixels; see :func:`instances`."""
        return instances(out, b, self.meta, orig_size, scale_factor, score_thr)


def instances(out: dict[str, np.ndarray], b: int, meta: dict, orig_size: tuple[int, int],
              scale_factor: tuple[float, float], score_thr: float) -> dict[str, np.ndarray]:
    """Image ``b`` of the graph's outputs ``out``: its instances scoring >= ``score_thr`` in original
    pixels, numpy boxes (N, 4) xyxy float32, scores (N,), labels (N,) int64, masks (N, h, w) bool,
    by descending score. ``meta``: the export's metadata; ``orig_size`` (h, w) and ``scale_factor``
    (w_scale, h_scale) from the letterbox."""
    n = int(out["num_dets"][b])
    n = int((out["scores"][b, :n] >= score_thr).sum())  # scores descend: a prefix
    w_scale, h_scale = scale_factor
    boxes = out["boxes"][b, :n] / np.array([w_scale, h_scale, w_scale, h_scale], np.float32)
    S = int(meta["img_size"])
    if "mask_logits" in out:
        logits = out["mask_logits"][b, :n]  # (n, S/8, S/8)
        ry, rx = _resize_matrices(logits.shape[1:], int(meta["mask_stride"]), S, orig_size, scale_factor)
        masks = npi.paste_masks(logits, ry, rx, math.log(meta["mask_thr"] / (1 - meta["mask_thr"])))
    else:
        masks = npi.nearest_masks(out["masks"][b, :n], npi.letterbox_size(*orig_size, S), orig_size)
    return {"boxes": boxes, "scores": out["scores"][b, :n], "labels": out["labels"][b, :n].astype(np.int64),
            "masks": masks}


_MATRICES: dict = {}


def _resize_matrices(feat_size, stride: int, img_size: int, orig_size, scale_factor):
    """``npi.resize_matrices``, kept for the last few original sizes (a folder often repeats one)."""
    key = (tuple(feat_size), stride, img_size, tuple(orig_size), tuple(scale_factor))
    if key not in _MATRICES:
        if len(_MATRICES) >= 16:
            _MATRICES.pop(next(iter(_MATRICES)))
        _MATRICES[key] = npi.resize_matrices(tuple(feat_size), stride, (img_size, img_size), orig_size, scale_factor)
    return _MATRICES[key]


def predict(args: argparse.Namespace) -> tuple[list[dict], list[tuple[str, str]], int]:
    """Returns (results entries, failures [(file, reason)], number of images processed)."""
    files = list_inputs(Path(args.input))
    detector = Detector(args.model, args.threads)
    if args.score_thr < detector.meta["score_thr"]:
        raise ValueError(f"--score-thr {args.score_thr} is below the threshold {detector.meta['score_thr']} baked "
                         f"into {args.model}: it holds no instance below that (re-export with --score-thr)")
    nearest = args.nearest if args.nearest is not None else bool(detector.meta["nearest_resize"])
    out_dir = Path(args.output)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    stems = unique_stems(files)
    results, failures, done = [], [], 0
    batch: list[tuple[int, Path, np.ndarray]] = []

    def flush():
        nonlocal done
        padded, frames = zip(*(npi.letterbox(im, detector.img_size, nearest) for _, _, im in batch))
        out = detector(np.stack(padded))
        for b, ((image_id, path, image), (orig_size, scale_factor)) in enumerate(zip(batch, frames)):
            pred = detector.instances(out, b, orig_size, scale_factor, args.score_thr)
            results.extend(_save_image(image_id, path, image, pred, stems[path], detector.names, out_dir))
            done += 1
        batch.clear()

    for image_id, path in enumerate(files, start=1):
        try:
            batch.append((image_id, path, npi.read_image(path, image_id)))
        except npi.ImageReadError as e:
            failures.append((str(path), str(e).split(": ", 1)[-1]))
            continue
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    (out_dir / "results.json").write_text(json.dumps(results))
    return results, failures, done


def _save_image(image_id: int, path: Path, image: np.ndarray, pred: dict, stem: str, names: list[str],
                out_dir: Path) -> list[dict]:
    """Overlay and cut-outs of one image, as ``experiments.predict`` writes them; returns its results entries."""
    entries = npi.coco_entries(pred["boxes"], pred["scores"], pred["labels"], pred["masks"], image_id)
    draw_overlay(image, pred, names).save(out_dir / "overlays" / f"{stem}.png")
    source = image
    if len(entries):
        rgba = read_rgba(path)
        source = rgba if rgba is not None and rgba.shape[:2] == image.shape[:2] else image
    for k, entry in enumerate(entries):
        label = int(pred["labels"][k])
        entry.update(file_name=path.name, category_name=names[label], cutout=None)
        cut = npi.cutout(source, pred["masks"][k])
        if cut is not None:
            rel = Path("cutouts") / stem / f"{stem}_{k:03d}_{slug(names[label])}.png"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(cut[0], "RGBA").save(out_dir / rel)
            entry["cutout"] = rel.as_posix()
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    start = time.time()
    try:
        results, failures, done = predict(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    num_cutouts = sum(r["cutout"] is not None for r in results)
    print(f"{done} image(s), {len(results)} instance(s) at score >= {args.score_thr}, {num_cutouts} cut-out(s) "
          f"in {time.time() - start:.1f} s -> {args.output} (overlays/, cutouts/, results.json)")
    if failures:
        print(f"{len(failures)} file(s) could not be read:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 1 if done == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
