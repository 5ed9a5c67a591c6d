"""One training step (forward + assign + loss + backward + AdamW step) on CPU: time and peak memory.

    python -m benchmarks.train_step --threads 2

Prints one JSON object. Each case runs in its own subprocess so that its peak RSS (ru_maxrss) is
its own. Cases: tiny at batch 8 x 320^2 and batch 2 x 640^2 with 10 instances per image, and
batch 2 x 640^2 sprite sheets with 100 / 300 / 500 instances per image, from which the memory
growth per 100 instances is fitted. ``data_rss_mb`` is the resident memory once the model and the
batch (full-resolution bool masks included) exist, before the first step; ``step_peak_mb`` is the
peak above it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = {
    "b8_320_10inst": (8, 320, 10),
    "b2_640_10inst": (2, 640, 10),
    "b2_640_100inst": (2, 640, 100),
    "b2_640_300inst": (2, 640, 300),
    "b2_640_500inst": (2, 640, 500),
}


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
    gt = crit.prepare_targets(targets, out.mask_protos)
    a = crit.assigner(boxes, flatten_levels(out.cls_logits), points, strides, gt.boxes, gt.labels, gt.centers, gt.valid)
    return int(a.pos_mask.sum())


def run_case(name: str, size: str, warmup: int, iters: int, mask_chunk: int) -> dict:
    from rtmdet import build_model
    from rtmdet.criterion import RTMDetInsCriterion

    batch, img, num = CASES[name]
    torch.manual_seed(0)
    model = build_model(size).train()
    criterion = RTMDetInsCriterion(model.num_classes, model.strides, mask_chunk_size=mask_chunk or None)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    images = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
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

    for i in range(warmup + iters):
        t0 = time.perf_counter()
        losses = step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "positives": count_positives(model, criterion, images, targets),
        "batch": batch, "img_size": img, "instances_per_image": num,
        "step_s": round(statistics.median(times), 3),
        "peak_rss_mb": round(peak_rss_mb()),
        "data_rss_mb": round(data_rss),
        "step_peak_mb": round(peak_rss_mb() - data_rss),
        "data_creation_peak_mb": round(peak_before),
        "last_losses": losses,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--mask-chunk", type=int, default=64,
                   help="positives per checkpointed mask-loss chunk; 0: unchunked")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.size, args.warmup, args.iters, args.mask_chunk)))
        return
    results = {}
    for name in args.cases:
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--case", name, "--size", args.size,
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--iters", str(args.iters),
               "--mask-chunk", str(args.mask_chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    growth = [results[f"b2_640_{n}inst"] for n in (100, 300, 500) if f"b2_640_{n}inst" in results]
    summary = {"size": args.size, "threads": args.threads, "mask_chunk": args.mask_chunk, "torch": torch.__version__,
               "cases": results}
    if len(growth) >= 2:
        dn = (growth[-1]["instances_per_image"] - growth[0]["instances_per_image"]) / 100
        summary["per_100_instances_mb"] = {
            key: round((growth[-1][key] - growth[0][key]) / dn, 1)
            for key in ("peak_rss_mb", "data_rss_mb", "step_peak_mb")
        }
        summary["per_100_instances_s"] = round((growth[-1]["step_s"] - growth[0]["step_s"]) / dn, 3)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
