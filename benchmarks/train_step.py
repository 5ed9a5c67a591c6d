"""One training step (forward + assign + loss + backward + AdamW step) on CPU: time and peak memory.

    python -m benchmarks.train_step --threads 2

Prints one JSON object. Each case runs in its own subprocess so that its peak RSS (ru_maxrss) is
its own. Cases: tiny at batch 8 x 320^2 and batch 2 x 640^2 with 10 instances per image, and
batch 2 x 640^2 sprite sheets with 100 / 300 / 500 instances per image, from which the memory
growth per 100 instances is fitted. ``data_rss_mb`` is the resident memory once the model and the
batch (full-resolution bool masks included) exist, before the first step; ``step_peak_mb`` is the
peak above it.

``--channels-last`` trains in NHWC; ``--compile`` compiles the network's forward (and with it the
backward) with ``torch.compile``, assignment and losses staying eager. ``first_step_s`` is the
first step's time (with ``--compile`` that is mostly the compilation), excluded from ``step_s``.
Besides the named cases above, any ``b{batch}_{size}_{n}inst`` is accepted (``--quick`` uses small
ones); the memory growth is fitted over the cases that share a batch and size.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = {
    "b8_320_10inst": (8, 320, 10),
    "b2_640_10inst": (2, 640, 10),
    "b2_640_100inst": (2, 640, 100),
    "b2_640_300inst": (2, 640, 300),
    "b2_640_500inst": (2, 640, 500),
}
QUICK_CASES = ["b2_128_4inst", "b2_128_20inst"]  # seconds, for smoke tests
_CASE = re.compile(r"b(\d+)_(\d+)_(\d+)inst")


def parse_case(name: str) -> tuple[int, int, int]:
    """'b{batch}_{size}_{n}inst' -> (batch, image size, instances per image)."""
    if not (m := _CASE.fullmatch(name)):
        raise ValueError(f"case {name!r} is not b{{batch}}_{{size}}_{{instances}}inst")
    return tuple(int(v) for v in m.groups())


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_targets(batch: int, size: int, num: int, num_classes: int, seed: int = 0) -> list[dict]:
    """Sprite-sheet-like ground truth: num boxes of 12-80 px per image with elliptical masks."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(size, dtype=torch.float32)[:, None]
    xs = torch.arange(size, dtype=torch.float32)[None, :]
    targets = []
    for _ in range(batch):
        wh = torch.rand(num, 2, generator=g) * 68 + 12
        xy = torch.rand(num, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.empty(num, size, size, dtype=torch.bool)
        for i in range(0, num, 16):  # bounded float temporaries while rasterising
            c = (boxes[i:i + 16, :2] + boxes[i:i + 16, 2:]) / 2
            r = wh[i:i + 16] / 2
            masks[i:i + 16] = ((xs - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + (
                (ys - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1
        labels = torch.randint(0, num_classes, (num,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return targets


@torch.no_grad()
def count_positives(model, crit, images, targets) -> int:
    """Positives of the assignment for the current weights (the number of masks in the mask loss)."""
    from rtmdet.priors import distance2bbox, flatten_levels, grid_priors

    out = model(images)
    points, strides = grid_priors([x.shape[-2:] for x in out.cls_logits], model.strides)
    boxes = distance2bbox(points, flatten_levels(out.box_dists))
    gt = crit.prepare_targets(targets, out.mask_protos, out.proto_stride(model.strides[0]))
    a = crit.assigner(boxes, flatten_levels(out.cls_logits), points, strides, gt.boxes, gt.labels, gt.centers, gt.valid)
    return int(a.pos_mask.sum())


def run_case(name: str, size: str, warmup: int, iters: int, mask_chunk: int, channels_last: bool = False,
             compile: bool = False, proto_stride: int = 8, mask_loss_stride: int = 4) -> dict:
    from rtmdet import build_model
    from rtmdet.criterion import RTMDetInsCriterion
    from rtmdet.optim import build_optimizer

    batch, img, num = parse_case(name)
    torch.manual_seed(0)
    model = build_model(size, proto_stride=proto_stride).train()
    criterion = RTMDetInsCriterion(model.num_classes, model.strides, mask_chunk_size=mask_chunk or None,
                                   mask_loss_stride=mask_loss_stride)
    opt = build_optimizer(model, lr=4e-3, weight_decay=0.05)  # as the LightningModule
    images = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if compile:
        model.compile()  # in place: state_dict keys unchanged
    targets = make_targets(batch, img, num, model.num_classes)
    data_rss = rss_mb()
    peak_before = peak_rss_mb()
    times = []

    def step():
        losses = criterion(model(images), targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {k: round(float(v.detach()), 4) for k, v in losses.items()}

    for i in range(max(warmup, 1) + iters):
        t0 = time.perf_counter()
        losses = step()
        if i == 0:
            first_step_s, first_losses = time.perf_counter() - t0, losses
        elif i >= max(warmup, 1):
            times.append(time.perf_counter() - t0)
    return {
        "positives": count_positives(model, criterion, images, targets),
        "batch": batch, "img_size": img, "instances_per_image": num,
        "channels_last": channels_last, "compile": compile,
        "step_s": round(statistics.median(times), 3),
        "first_step_s": round(first_step_s, 3),
        "peak_rss_mb": round(peak_rss_mb()),
        "data_rss_mb": round(data_rss),
        "step_peak_mb": round(peak_rss_mb() - data_rss),
        "data_creation_peak_mb": round(peak_before),
        "first_losses": first_losses,
        "last_losses": losses,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (at least the first)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--quick", action="store_true", help=f"small cases {QUICK_CASES}, 1 timed step")
    p.add_argument("--mask-chunk", type=int, default=64,
                   help="positives per checkpointed mask-loss chunk; 0: unchunked")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the network's forward")
    p.add_argument("--proto-stride", type=int, default=8, choices=(4, 8), help="mask prototype stride (official 8)")
    p.add_argument("--mask-loss-stride", type=int, default=4, help="mask loss stride (official 4)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    return p


def memory_summary(results: dict) -> dict:
    """Growth per 100 instances over the largest group of cases sharing (batch, size): between its
    smallest and largest memory case (>= 100 instances; any two cases where there are fewer)."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["batch"], r["img_size"]), []).append(r)
    if not groups:
        return {}
    group = sorted(max(groups.values(), key=len), key=lambda r: r["instances_per_image"])
    if len(crowded := [r for r in group if r["instances_per_image"] >= 100]) >= 2:
        group = crowded
    if len(group) < 2:
        return {}
    lo, hi = group[0], group[-1]
    dn = (hi["instances_per_image"] - lo["instances_per_image"]) / 100
    return {
        "per_100_instances_mb": {k: round((hi[k] - lo[k]) / dn, 1)
                                 for k in ("peak_rss_mb", "data_rss_mb", "step_peak_mb")},
        "per_100_instances_s": round((hi["step_s"] - lo["step_s"]) / dn, 3),
        "max_instances": {"batch": hi["batch"], "img_size": hi["img_size"],
                          "instances_per_image": hi["instances_per_image"],
                          "peak_rss_mb": hi["peak_rss_mb"], "step_s": hi["step_s"]},
    }


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cases = QUICK_CASES if args.quick else args.cases
    iters = 1 if args.quick else args.iters
    for name in cases:
        parse_case(name)
    results = {}
    for name in cases:
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--case", name, "--size", args.size,
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--iters", str(iters),
               "--mask-chunk", str(args.mask_chunk), "--proto-stride", str(args.proto_stride),
               "--mask-loss-stride", str(args.mask_loss_stride)]
        cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode:
            # An honest report of a failing configuration (e.g. torch.compile without a compiler).
            results[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                             f"exit status {proc.returncode}"}
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = {"benchmark": "train_step", "size": args.size, "threads": args.threads, "mask_chunk": args.mask_chunk,
               "proto_stride": args.proto_stride, "mask_loss_stride": args.mask_loss_stride,
               "channels_last": args.channels_last, "compile": args.compile, "torch": torch.__version__,
               "cases": results}
    summary.update(memory_summary({k: v for k, v in results.items() if "error" not in v}))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.case:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.case, args.size, args.warmup, args.iters, args.mask_chunk,
                                  args.channels_last, args.compile, args.proto_stride, args.mask_loss_stride)))
        return
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
