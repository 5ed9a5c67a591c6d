"""GPU figures in one run: training throughput, host synchronisations, predict latency.

    python -m benchmarks.gpu                          # on a CUDA machine: tiny, batch 32 at 640
    python -m benchmarks.gpu --device cpu --quick     # smoke test of this code (CI); not a measurement

Prints one JSON object, the source of the README's GPU section:

* ``train``: the training step as the LightningModule runs it (channels-last network and images;
  forward + assign + loss + backward + fused AdamW) at batch 32 x 640 x 640, the official per-GPU
  batch, 10 ground truths per image. Per precision: ``bf16-mixed`` is what Lightning's flag does
  (autocast to bfloat16 around forward and loss, fp32 weights; our losses compute in fp32),
  ``32-true`` plain fp32. ``images_per_s`` is the batch times the steps over their total time
  (steps queued back to back, one synchronisation at the end), with the peak memory.
* ``host_syncs``: the host synchronisations of one bf16 training step (``bf16-mixed`` must be
  among the precisions) as ``torch.cuda.set_sync_debug_mode("warn")`` reports them, per phase
  (forward, loss, backward, optimiser), each with the line that caused it; the LightningModule
  adds one more, its non-finite loss check. CUDA only (``null`` elsewhere).
* ``predict``: ``model.predict`` latency, batch 1 at 640 with 100 detections whose masks are pasted
  at 640 x 640 (the head randomised as in ``benchmarks/latency.py``), for fp32, fused BN and fused
  BN under bf16 autocast; and the forward's throughput at the training batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from contextlib import nullcontext

import torch

from benchmarks.latency import busy_head
from benchmarks.train_step import make_targets
from rtmdet import build_model
from rtmdet.optim import build_optimizer
from rtmdet.preprocess import ImageMeta

PRECISIONS = {"bf16-mixed": torch.bfloat16, "32-true": None}  # Lightning's names -> autocast dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20), "memory": "cuda allocated"}
    # No per-phase peak on a CPU: the process's peak resident memory so far.
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "memory": "cpu process peak rss"}


def time_back_to_back(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn``, calls queued back to back with one synchronisation at the end."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / iters


def time_each(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of one call of ``fn`` (a latency: synchronised after every call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# ------------------------------------------------------------------------------------ training
class TrainStep:
    """One training step of the tiny (or given) model, split into the phases the sync report names."""

    def __init__(self, size: str, batch: int, img_size: int, instances: int, device: torch.device,
                 dtype: torch.dtype | None):
        torch.manual_seed(0)
        self.device, self.dtype = device, dtype
        self.model = build_model(size).train().to(device, memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, lr=4e-3, weight_decay=0.05)  # fused where available
        images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
        self.images = images.to(device).contiguous(memory_format=torch.channels_last)
        self.targets = [{k: v.to(device) for k, v in t.items()}
                        for t in make_targets(batch, img_size, instances, self.model.num_classes)]

    def forward(self):
        with autocast(self.device, self.dtype):
            return self.model(self.images)

    def loss(self, outputs) -> torch.Tensor:
        with autocast(self.device, self.dtype):  # Lightning's autocast covers training_step: the loss too
            return sum(self.model.loss(outputs, self.targets).values())

    def optimize(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> torch.Tensor:
        loss = self.loss(self.forward())
        loss.backward()
        self.optimize()
        return loss.detach()


def measure_training(args, device: torch.device) -> tuple[dict, dict[str, TrainStep]]:
    """Per precision: the timings, and the (warm) step itself for the sync report."""
    out, steps = {}, {}
    for name in args.precisions:
        step = steps[name] = TrainStep(args.size, args.batch, args.img_size, args.instances, device,
                                       PRECISIONS[name])
        first_loss = float(step())
        reset_peak_memory(device)
        seconds = time_back_to_back(step, device, args.warmup, args.iters)
        out[name] = {"step_ms": round(seconds * 1e3, 2), "images_per_s": round(args.batch / seconds, 1),
                     "first_loss": round(first_loss, 4), **peak_memory_mb(device)}
    return out, steps


def count_host_syncs(step: TrainStep | None) -> dict | None:
    """Synchronisations of one training step (already warm), per phase, with the line causing each."""
    if step is None or step.device.type != "cuda":
        return None
    synchronize(step.device)
    state: dict = {}
    run_phase = {
        "forward": lambda: state.update(outputs=step.forward()),
        "loss": lambda: state.update(loss=step.loss(state["outputs"])),
        "backward": lambda: state["loss"].backward(),
        "optimizer": step.optimize,
    }
    phases: dict[str, list[str]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for phase, run in run_phase.items():
                start = len(caught)
                run()
                phases[phase] = [f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}" for w in caught[start:]
                                 if "synchroniz" in str(w.message)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(step.device)
    return {"total": sum(len(v) for v in phases.values()), "per_phase": phases}


# ------------------------------------------------------------------------------------ inference
def measure_predict(args, device: torch.device) -> dict:
    model = build_model(args.size).eval()
    busy_head(model)
    model = model.to(device, memory_format=torch.channels_last)
    size = args.predict_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    metas = [ImageMeta((size, size), (1.0, 1.0), (size, size))]
    batch = x.expand(args.batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    out = {}
    with torch.no_grad():
        for name, dtype in (("fp32", None), ("fused", None), ("fused+bf16", torch.bfloat16)):
            if name == "fused":
                model.fuse()  # in place: the fused variants follow

            def predict():
                with autocast(device, dtype):
                    return model.predict(x, metas)

            def forward():
                with autocast(device, dtype):
                    return model(batch)

            try:
                detections = len(predict()[0]["scores"])
                latency = time_each(predict, device, args.warmup, args.iters)
                fwd = time_back_to_back(forward, device, args.warmup, args.iters)
                out[name] = {"predict_ms": round(latency, 2), "detections": detections,
                             f"forward_images_per_s_batch{args.batch}": round(args.batch / fwd, 1)}
            except Exception as e:  # an honest report of a configuration that fails (e.g. no bf16 kernel)
                out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--predict-size", type=int, default=640)
    p.add_argument("--instances", type=int, default=10, help="ground truths per training image")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="batch 2 at 128, one timed iteration (a smoke test)")
    return p


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.batch, args.img_size, args.predict_size, args.instances, args.warmup, args.iters = 2, 128, 128, 3, 0, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible (use --device cpu for a smoke test)")
    header = {"benchmark": "gpu", "torch": torch.__version__, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "size": args.size, "batch": args.batch, "img_size": args.img_size, "instances": args.instances,
              "quick": args.quick}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    train, steps = measure_training(args, device)
    return {**header, "train": train, "host_syncs": count_host_syncs(steps.get("bf16-mixed")),
            "predict": measure_predict(args, device)}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
