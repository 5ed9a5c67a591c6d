"""All benchmarks in one run, one JSON object on stdout.

    python -m benchmarks                                    # latency, train step (+ memory), data pipeline
    python -m benchmarks --compile                          # + torch.compile timings (minutes: compilation)
    python -m benchmarks --mmdet-python PATH/bin/python     # + ours vs mmdetection 3.3.0 (its venv's python)
    python -m benchmarks --side-by-side                     # the same, the python from $RTMDET_MMDET_PYTHON
    python -m benchmarks --parts latency --quick            # selected parts, few iterations (smoke test)
    python -m benchmarks --parts export_e2e                 # end-to-end ONNX vs predict (needs onnxruntime)
    python -m benchmarks --parts tiling --ckpt CKPT         # tiled vs untiled on sprite sheets (+ memory)

Each part runs in its own process (``python -m benchmarks.<part>``), one after the other, so that
they do not compete for the cores and each one's peak memory is its own:

* ``latency``: predict (forward + postprocess, 100 detections) at 640 for our configurations
  ``plain``, ``fuse`` and ``fuse + channels_last`` (``--compile``: also torch.compile, compile
  time reported apart);
* ``train_step``: one training step for the cases of ``benchmarks/train_step.py``, 500
  instances per image and the memory growth per 100 instances included, plus ``channels_last``
  (and with ``--compile``, compiled) on the 320 px case;
* ``data_pipeline``: images/s of the training loader;
* ``side_by_side``: ours / mmdet time ratios, measured alternately (``benchmarks/side_by_side.py``);
* ``export_e2e`` (only when asked for): the end-to-end ONNX export run by onnxruntime against
  ``model.predict`` at 640, file and output sizes (``benchmarks/export_e2e.py``);
* ``tiling`` (only when asked for): sprite sheets predicted whole, in windows and image by image
  (recall, mAP with ``--ckpt``, time per megapixel), and peak memory with 500 and 2,000 instances
  on a 4096 x 4096 image (``benchmarks/tiling.py``).

Two measurements that need a trained model and minutes to hours run on their own:
``python -m benchmarks.refine_masks --ckpt CKPT ...`` (mask refinement on vs off) and
``python -m benchmarks.recipe_ab ...`` (training recipes and levers A/B, same seed and budget).

``summary`` collects the headline numbers; the full outputs of every part follow it. Timings
depend on the machine's load: ``load_avg_1min`` is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("latency", "train_step", "data_pipeline", "side_by_side", "export_e2e", "tiling")


def run_part(module: str, args: list[str]) -> dict:
    """``python -m benchmarks.<module> ARGS`` -> its JSON output (or the error it ended with)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO, capture_output=True,
                          text=True)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-5:] or [f"exit status {proc.returncode}"]
        return {"error": "\n".join(tail), "command": " ".join(["python -m", f"benchmarks.{module}", *args])}
    out = proc.stdout
    start = out.find("{")  # parts print exactly one JSON object (possibly indented over many lines)
    result, _ = json.JSONDecoder().raw_decode(out[start:])
    result["wall_s"] = wall
    return result


def latency(args) -> dict:
    base = ["--threads", str(args.threads), "--sizes", args.size]
    base += ["--img-size", "256", "--warmup", "1", "--iters", "2"] if args.quick else []
    variants = {"plain": [], "fuse": ["--fuse"]}
    if not args.quick:
        variants["fuse+channels_last"] = ["--fuse", "--channels-last"]
    if args.compile:
        variants["plain"] = ["--compile"]  # its output holds eager and compiled timings
    return {name: run_part("latency", base + flags) for name, flags in variants.items()}


def train_step(args) -> dict:
    base = ["--threads", str(args.threads), "--size", args.size]
    out = {"eager": run_part("train_step", base + (["--quick"] if args.quick else []))}
    if not args.quick:
        out["channels_last"] = run_part("train_step", base + ["--cases", "b8_320_10inst", "b2_640_10inst",
                                                              "--channels-last"])
    if args.compile:
        out["compile"] = run_part("train_step", base + ["--compile"] + (
            ["--quick"] if args.quick else ["--cases", "b8_320_10inst", "--iters", "5"]))
    return out


def data_pipeline(args) -> dict:
    quick = ["--num-images", "4", "--instances", "3", "--img-size", "128", "--batch-size", "2",
             "--num-workers", "0", "--batches", "2", "--warmup", "1"]
    return run_part("data_pipeline", quick if args.quick else [])


def side_by_side(args) -> dict:
    flags = ["--mmdet-python", args.mmdet_python, "--threads", str(args.threads), "--size", args.size]
    return run_part("side_by_side", flags + (["--quick"] if args.quick else []))


def export_e2e(args) -> dict:
    return run_part("export_e2e", ["--threads", str(args.threads), "--size", args.size]
                    + (["--quick"] if args.quick else []))


def tiling(args) -> dict:
    flags = ["--threads", str(args.threads)] + (["--ckpt", args.ckpt] if args.ckpt else [])
    return run_part("tiling", flags + (["--quick"] if args.quick else []))


def summarize(results: dict) -> dict:
    """Headline numbers of the parts that ran (missing ones are left out)."""
    s: dict = {}

    def get(*keys):
        d = results
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    for variant, r in (get("latency") or {}).items():
        if m := next(iter((r.get("sizes") or {}).values()), None):  # the (first) model size
            s[f"latency_{variant}"] = {k: m[k] for k in ("forward_ms", "postprocess_ms", "predict_ms", "detections")}
            if "compiled" in m:
                s["latency_compiled"] = m["compiled"]
    for variant, r in (get("train_step") or {}).items():
        for case, c in (r.get("cases") or {}).items():
            if "step_s" in c:
                s.setdefault(f"train_step_s_{variant}", {})[case] = c["step_s"]
            if variant == "compile" and "first_step_s" in c:
                s.setdefault("train_compile_first_step_s", {})[case] = c["first_step_s"]
    if mem := get("train_step", "eager", "max_instances"):
        s["train_memory"] = {"max_instances": mem, "per_100_instances_mb": get("train_step", "eager",
                                                                              "per_100_instances_mb")}
    if d := get("data_pipeline"):
        s["data_pipeline"] = {k: d.get(k) for k in ("images_per_s", "cpu_ms_per_image", "images_per_s_if_2_free_cores")}
    if get("export_e2e"):
        s["export_e2e_end_to_end_ms"] = {k: get("export_e2e", *path) for k, path in (
            ("torch_predict", ("torch_predict", "end_to_end_ms")), ("onnx_logits", ("onnx_logits", "end_to_end_ms")),
            ("onnx_input", ("onnx_input", "end_to_end_ms")))}
    if get("tiling"):
        s["tiling"] = {mode: {k: get("tiling", mode, k) for k in ("recall_mask_iou50", "segm_mAP", "s_per_megapixel")}
                       for mode in ("untiled", "tiled")}
        s["tiling"]["memory_peak_rss_mb"] = {m["instances"]: m["peak_rss_mb"] for m in get("tiling", "memory") or []}
    for task in ("predict", "train"):
        if r := get("side_by_side", task):
            s[f"side_by_side_{task}"] = {"ratios": r["ratios"], "target_ratio": r["target_ratio"],
                                         "medians": {n: c["median"] for n, c in r["contestants"].items()},
                                         "unit": r["unit"], "agreement": r["agreement"]}
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS,
                   help="default: all but side_by_side (see --side-by-side), export_e2e and tiling")
    p.add_argument("--quick", action="store_true",
                   help="small inputs and few iterations (a smoke test, not a measurement)")
    p.add_argument("--compile", action="store_true", help="add torch.compile timings (compilation takes minutes)")
    p.add_argument("--side-by-side", action="store_true", help="add the side-by-side comparison with mmdetection")
    p.add_argument("--mmdet-python", help="Python of an mmdet 3.3.0 venv (implies --side-by-side; default "
                                          "$RTMDET_MMDET_PYTHON)")
    p.add_argument("--size", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt", help="a trained sprite checkpoint for the tiling part's accuracy figures")
    args = p.parse_args(argv)
    from benchmarks.side_by_side import MMDET_PYTHON_ENV, mmdet_python_problem

    parts = list(args.parts or PARTS[:3])
    if (args.side_by_side or args.mmdet_python) and "side_by_side" not in parts:
        parts.append("side_by_side")
    args.mmdet_python = args.mmdet_python or os.environ.get(MMDET_PYTHON_ENV)
    if "side_by_side" in parts and (problem := mmdet_python_problem(args.mmdet_python)):
        p.error(problem)
    header = {
        "benchmark": "all", "parts": parts, "quick": args.quick, "size": args.size, "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_avg_1min_start": round(os.getloadavg()[0], 2),
    }
    runners = {"latency": latency, "train_step": train_step, "data_pipeline": data_pipeline,
               "side_by_side": side_by_side, "export_e2e": export_e2e, "tiling": tiling}
    results = {part: runners[part](args) for part in parts}
    header["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps({**header, "summary": summarize(results), **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
