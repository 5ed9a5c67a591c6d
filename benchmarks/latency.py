"""End-to-end predict latency (forward + postprocess), batch 1, per size. Prints one JSON object.

    python -m benchmarks.latency --sizes tiny --img-size 640 --threads 2 [--fuse] [--channels-last] [--compile]
        [--proto-stride 4]

``--proto-stride 4`` times the opt-in stride-4 prototypes (the cost of the extra mask stage and of
4x the dynamic-conv pixels). ``--fuse`` folds the BatchNorms into the convs (``RTMDetIns.fuse``), ``--channels-last`` runs the
network in NHWC, ``--compile`` additionally times ``torch.compile`` of the network's forward (the
postprocess stays eager): its compile time (the first call) is reported separately from the
steady-state forward and predict times and their speed-up over eager with the same flags.

Leave OMP_WAIT_POLICY unset (libgomp's default): PASSIVE makes every parallel region pay a thread
wake-up, which costs the forward about 40% and the postprocess's many small ops about 2.5x here.

The head's prediction layers are randomised so that the postprocess does its full work
(1000 candidates per level, NMS, 100 masks) as on a busy real image; a freshly initialised model
would predict nothing above the score threshold and flatter the postprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rtmdet import InstancePostProcess, build_model
from rtmdet.preprocess import ImageMeta


@torch.no_grad()
def busy_head(model: torch.nn.Module, seed: int = 0) -> None:
    """Random prediction convs: scores spread over (0, 1) and boxes of many sizes; dynamic kernels
    that draw a diamond around each instance's point, radius 4 strides, with some random variation
    (random kernels give masks that are all or nothing)."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.head.named_modules():
        if isinstance(m, torch.nn.Conv2d) and name.startswith(("rtm_", "mask_head")):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            if m.bias is not None:
                shift = -2.5 if "rtm_cls" in name else 1.5 if "rtm_reg" in name else 0.0
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1 + shift)
    diamond = torch.zeros(169)
    for ch, (coord, sign) in enumerate([(0, 1), (0, -1), (1, 1), (1, -1)]):
        diamond[ch * 10 + coord] = sign  # layer 1: +-rel_x, +-rel_y, ReLU -> |rel_x|, |rel_y| halves
        diamond[80 + ch] = 1.0  # layer 2, channel 0: |rel_x| + |rel_y| (L1 distance / (8 stride))
    diamond[144] = -1.0  # layer 3: 0.5 - distance
    diamond[168] = 0.5
    for conv in model.head.rtm_kernel:
        conv.weight.mul_(0.02)
        conv.bias.copy_(diamond)


def timeit(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(size: str, img_size: int, warmup: int, iters: int, channels_last: bool,
            orig: tuple[int, int], fuse: bool = False, compile: bool = False, proto_stride: int = 8) -> dict:
    model = build_model(size, proto_stride=proto_stride).eval()
    busy_head(model)
    if fuse:
        model.fuse()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # The original image letterboxed into the input: boxes and masks come back at its size.
    (oh, ow), s = orig, min(img_size / orig[0], img_size / orig[1])
    metas = [ImageMeta((oh, ow), (round(ow * s) / ow, round(oh * s) / oh), (img_size, img_size))]
    post = InstancePostProcess(strides=model.strides)
    with torch.no_grad():
        out = model(x)
        res = post(out, metas)[0]
        dets, mask_fraction = len(res["scores"]), res["masks"].float().mean().item()
        forward_ms = timeit(lambda: model(x), warmup, iters)
        post_ms = timeit(lambda: post(out, metas), warmup, iters)
        predict_ms = timeit(lambda: model.predict(x, metas, post), warmup, iters)
    result = {
        "forward_ms": round(forward_ms, 2),
        "postprocess_ms": round(post_ms, 2),
        "predict_ms": round(predict_ms, 2),
        "postprocess_fraction_of_forward": round(post_ms / forward_ms, 3),
        "detections": dets,
        "mean_mask_fraction_of_image": round(mask_fraction, 3),
    }
    if compile:
        result["compiled"] = measure_compiled(model, x, out, metas, warmup, iters, forward_ms, predict_ms)
    return result


def measure_compiled(model, x, eager_out, metas, warmup: int, iters: int, eager_forward_ms: float,
                     eager_predict_ms: float) -> dict:
    """torch.compile of the forward: compile time (first call), steady-state times, gain over eager."""
    model.compile()  # in place (nn.Module.compile): predict() calls the compiled forward
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(x)
        compile_s = time.perf_counter() - t0
        max_diff = max((a - b).abs().max().item() for a, b in zip(out.cls_logits, eager_out.cls_logits))
        forward_ms = timeit(lambda: model(x), warmup, iters)
        predict_ms = timeit(lambda: model.predict(x, metas), warmup, iters)
    return {
        "compile_s": round(compile_s, 1),
        "forward_ms": round(forward_ms, 2),
        "predict_ms": round(predict_ms, 2),
        "forward_speedup": round(eager_forward_ms / forward_ms, 3),
        "predict_speedup": round(eager_predict_ms / predict_ms, 3),
        "max_abs_diff_cls_logits": max_diff,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny"])
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--fuse", action="store_true", help="fold BatchNorm into the convs (RTMDetIns.fuse)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--proto-stride", type=int, default=8, choices=(4, 8), help="mask prototype stride (official 8)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the forward (compile time reported separately)")
    p.add_argument("--orig", type=int, nargs=2, default=(640, 640), metavar=("H", "W"),
                   help="original image size the results are mapped back to (default: a 640x640 image; "
                        "480 640 is a typical COCO image)")
    return p


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    return {
        "benchmark": "latency",
        "torch": torch.__version__,
        "threads": args.threads,
        "img_size": args.img_size,
        "fuse": args.fuse,
        "channels_last": args.channels_last,
        "orig_size": list(args.orig),
        "proto_stride": args.proto_stride,
        "sizes": {s: measure(s, args.img_size, args.warmup, args.iters, args.channels_last, tuple(args.orig),
                             args.fuse, args.compile, args.proto_stride) for s in args.sizes},
    }


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
