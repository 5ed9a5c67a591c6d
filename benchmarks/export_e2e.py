"""End-to-end ONNX export vs ``model.predict`` on CPU, batch 1. Prints one JSON object.

    python -m benchmarks.export_e2e [--size tiny] [--img-size 640] [--orig 480 640] [--threads 2]
        [--warmup 3] [--iters 10] [--quick]

One image of ``--orig`` pixels, results in its original pixels, three ways:

* ``torch``: ``rtmdet.preprocess`` (letterbox, normalise) + ``model.predict`` with the metas (plain,
  and with ``fuse()``);
* ``onnx_logits``: the default export (``--masks logits``) as ``experiments.onnx_predict`` runs it:
  numpy letterbox, onnxruntime, numpy paste of the stride-8 mask logits into the original image;
* ``onnx_input``: ``--masks input``: the paste to input resolution inside the graph (100 masks of
  S x S), then crop and nearest resize to the original image in numpy.

Reported per way: median milliseconds per stage and end to end (and the end-to-end minimum), all
callables timed in turn round by round; for the exports the file size and the bytes of their
outputs for one image; and how their instances agree with ``model.predict``.

The model is RTMDet-Ins with random prediction layers (``benchmarks.latency.busy_head``: the
postprocess does its full work, 100 masks) and BatchNorm statistics measured on the image itself
(so that scores differ from prior to prior instead of tying).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.latency import busy_head
from experiments import export_e2e, numpy_inference as npi, onnx_predict
from rtmdet import build_model, preprocess
from rtmdet.export_e2e import EndToEnd


def alternate(fns: dict, warmup: int, iters: int) -> dict[str, dict[str, float]]:
    """Median and minimum milliseconds of each callable, timed in turn round by round, so that a
    load that comes and goes (a shared machine) weighs on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": round(statistics.median(t), 2), "min_ms": round(min(t), 2)} for name, t in times.items()}


def busy_model(size: str, image: np.ndarray, img_size: int) -> torch.nn.Module:
    """Random prediction layers scaled on ``image`` (class logits of std 1, small kernel noise around
    the diamond masks), BN statistics of ``image`` (one cumulative pass, variances floored at their
    median so that nearly constant channels do not blow up), eval mode."""
    torch.manual_seed(0)
    model = build_model(size)
    x = preprocess(image, img_size)[0]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
    with torch.no_grad():
        model.train()(x)
        for m in bns:
            m.running_var.clamp_(min=m.running_var.median().item())
        busy_head(model.eval())
        cls, _, kernels, _ = model(x)
        for lvl, head in enumerate(zip(model.head.rtm_cls, model.head.rtm_kernel)):
            head[0].weight.div_(cls[lvl].std())
            head[1].weight.mul_(0.02 / kernels[lvl].std())
    return model


def agreement(got: dict, want: dict) -> dict:
    """Instances of an export (numpy, original pixels) against ``model.predict``'s."""
    want = {k: v.numpy() for k, v in want.items()}
    same = len(got["labels"]) == len(want["labels"]) and np.array_equal(got["labels"], want["labels"])
    out = {"detections": [len(got["labels"]), len(want["labels"])], "same_labels": bool(same)}
    if same and len(want["labels"]):
        inter = (got["masks"] & want["masks"]).sum((1, 2))
        union = (got["masks"] | want["masks"]).sum((1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        out.update(max_box_diff_px=float(np.abs(got["boxes"] - want["boxes"]).max()),
                   max_score_diff=float(np.abs(got["scores"] - want["scores"]).max()),
                   min_mask_iou=round(float(iou.min()), 4), median_mask_iou=round(float(np.median(iou)), 4))
    return out


def prepare_export(model, mask_output: str, image: np.ndarray, img_size: int, threads: int, folder: Path,
                   reference: dict) -> tuple[dict, dict]:
    """Export one mask layout; returns its sizes and agreement, and the callables to time."""
    module = EndToEnd(model, img_size, mask_output=mask_output).eval()
    path = folder / f"e2e_{mask_output}.onnx"
    t0 = time.perf_counter()
    with torch.no_grad():
        export_e2e.write_onnx(module, export_e2e.sample_images(img_size, 2), path, 17, export_e2e.metadata(module))
    export_s = time.perf_counter() - t0
    detector = onnx_predict.Detector(path, threads)
    padded, (orig_size, scale_factor) = npi.letterbox(image, img_size)
    out = detector(padded[None])

    def end_to_end():
        p, (o, s) = npi.letterbox(image, img_size)
        return detector.instances(detector(p[None]), 0, o, s, score_thr=0.0)

    info = {"file_mb": round(path.stat().st_size / 2**20, 2),
            "output_mb_per_image": round(sum(v.nbytes for v in out.values()) / 2**20, 2),
            "export_s": round(export_s, 1), "agreement_with_predict": agreement(end_to_end(), reference)}
    fns = {"letterbox": lambda: npi.letterbox(image, img_size), "graph": lambda: detector(padded[None]),
           "map_back": lambda: detector.instances(out, 0, orig_size, scale_factor, 0.0), "end_to_end": end_to_end}
    return info, fns


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--orig", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                   help="original image size (default: a typical COCO image)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="128 px, 1 warm-up, 2 iterations (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.img_size, args.orig, args.warmup, args.iters = 128, (96, 128), 1, 2
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(0).integers(0, 256, (*args.orig, 3), dtype=np.uint8)
    model = busy_model(args.size, image, args.img_size)
    fused = busy_model(args.size, image, args.img_size).fuse()
    x, metas = preprocess(image, args.img_size)
    with torch.inference_mode():
        reference = model.predict(x, metas)[0]
    parts = {"torch_predict": ({"detections": len(reference["labels"])}, {
        "preprocess": lambda: preprocess(image, args.img_size),
        "predict": lambda: model.predict(x, metas),
        "end_to_end": lambda: model.predict(*preprocess(image, args.img_size)),
        "fused_end_to_end": lambda: fused.predict(*preprocess(image, args.img_size)),
    })}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for mode in ("logits", "input"):
            parts[f"onnx_{mode}"] = prepare_export(model, mode, image, args.img_size, args.threads, Path(tmp),
                                                   reference)
        fns = {(part, name): fn for part, (_, part_fns) in parts.items() for name, fn in part_fns.items()}
        timings = alternate(fns, args.warmup, args.iters)
    result = {}
    for part, (info, part_fns) in parts.items():
        result[part] = {**{f"{name}_ms": timings[(part, name)]["median_ms"] for name in part_fns},
                        "end_to_end_min_ms": timings[(part, "end_to_end")]["min_ms"], **info}
    import onnxruntime

    return {"benchmark": "export_e2e", "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "size": args.size, "img_size": args.img_size, "orig_size": list(args.orig), "threads": args.threads,
            "load_avg_1min": round(os.getloadavg()[0], 2), **result}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
