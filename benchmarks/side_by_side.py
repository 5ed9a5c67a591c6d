"""Ours vs mmdetection 3.3.0, timed alternately on the same machine, weights, inputs and threads.

    python -m benchmarks.side_by_side --mmdet-python .venv-mmdet/bin/python
    python -m benchmarks --side-by-side --mmdet-python .venv-mmdet/bin/python   # inside the full benchmark JSON

The mmdet side runs in a Python with mmdet 3.3.0 (the parity venv of the README); give it with
``--mmdet-python`` or ``$RTMDET_MMDET_PYTHON``. There is no default.

Two tasks, each a ratio ours / mmdet of median times (lower is better for us):

* ``predict``: batch 1 x 3 x 640 x 640, forward + full postprocess of 100 detections whose masks are
  pasted into a 640 x 640 original. Ours: ``model.predict(images, metas)``; mmdet: its end-to-end
  ``model.predict(inputs, [DetDataSample])`` with ``ori_shape`` / ``scale_factor`` set (rescale=True).
  The head's prediction layers are randomised as in ``benchmarks/latency.py`` (``busy_head``).
* ``train``: batch 8 at 320 x 320 with 10 ground truths per image (the same boxes, labels and
  masks on both sides): forward + assignment + loss + backward + AdamW step, from the same fresh
  initialisation. mmdet: ``model.loss`` -> ``parse_losses`` -> backward -> step, its GT masks given
  as ``BitmapMasks`` as its pipeline does (rebuilt outside the timed region before every step,
  since its loss converts them in place).

Contestants: ours as is (``ours``) and in the variants given (default: ``fuse`` for predict,
``channels_last`` for train), and mmdet as is, the reference of every ratio (``--mmdet-variants
channels_last`` adds mmdet in NHWC, to see what that layout gives it). ``agreement`` checks that
both sides did the same work: the same number of detections, equal first-step losses.

Every contestant is a separate worker process that builds its model once, checks its outputs,
warms up, then waits. The workers are driven in
alternating order (A B C, C B A, A B C, ...), each running a few timed iterations per round while
the others sleep, so drifts in machine load hit all of them alike. Weights (ours, exported in
mmdet's key layout) and inputs are written by this process to one file that every worker reads.

mmcv-lite has no compiled ops; mmdet's NMS gets a C port of mmcv's ``nms_cpu`` (built with the
system C compiler on start, see ``benchmarks/mmdet_side.py``) so that it is not slowed down by a
Python stand-in. Its share of the time is reported (``nms_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MMDET_PYTHON_ENV = "RTMDET_MMDET_PYTHON"  # the default of --mmdet-python


def mmdet_python_problem(path: str | None) -> str | None:
    """Why ``path`` cannot be the mmdet side's Python, or None when it can (it exists)."""
    if not path:
        return (f"side-by-side needs a Python with mmdet 3.3.0: give --mmdet-python PATH or set "
                f"${MMDET_PYTHON_ENV} (README: Parity with mmdetection)")
    if not Path(path).exists():
        return f"side-by-side needs a Python with mmdet 3.3.0: {path} not found (--mmdet-python / ${MMDET_PYTHON_ENV})"
    return None
TARGETS = {"predict": 0.5, "train": 0.7}  # issue #6: ours / mmdet


# ------------------------------------------------------------------------------ worker protocol
def serve(step, check: dict, warmup: int, setup=None) -> None:
    """Worker loop: report ``check`` once warm, then time ``step`` k times per ``run k`` line on stdin.

    ``setup`` (optional) prepares one step outside the timed region and returns its argument.
    """
    for _ in range(warmup):
        step(setup() if setup else None)
    _reply({"ready": True, "check": check})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        times = []
        for _ in range(int(cmd[1])):
            arg = setup() if setup else None
            t0 = time.perf_counter()
            step(arg)
            times.append(time.perf_counter() - t0)
        _reply({"times": times})


def _reply(obj: dict) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")  # a prefix: libraries may print to stdout too
    sys.stdout.flush()


class Worker:
    def __init__(self, name: str, cmd: list[str]):
        self.name = name
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: chatty workers cannot block
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        t0 = time.perf_counter()
        self.check = self._read()["check"]
        self.start_s = round(time.perf_counter() - t0, 1)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read().strip().splitlines()
        raise RuntimeError(f"worker {self.name} died: " + "\n".join(err[-15:]))

    def run(self, iters: int) -> list[float]:
        self.proc.stdin.write(f"run {iters}\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.stderr.close()


# ----------------------------------------------------------------------------------- our side
def make_setup(path: Path, task: str, size: str, img_size: int, batch: int, instances: int) -> None:
    """Weights (mmdet key layout) and inputs of one task, shared by every worker."""
    from rtmdet import build_model, to_mmdet_state_dict

    torch.manual_seed(0)
    model = build_model(size)
    data = {"size": size, "task": task}
    if task == "predict":
        from benchmarks.latency import busy_head

        busy_head(model)
        data["images"] = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    else:
        from benchmarks.train_step import make_targets

        data["images"] = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
        data["targets"] = make_targets(batch, img_size, instances, model.num_classes)
    data["state_dict"] = dict(to_mmdet_state_dict(model))
    torch.save(data, path)


def ours_worker(args: argparse.Namespace) -> None:
    from rtmdet import build_model, load_mmdet_checkpoint
    from rtmdet.optim import build_optimizer
    from rtmdet.preprocess import ImageMeta

    torch.set_num_threads(args.threads)
    data = torch.load(args.setup, weights_only=True)
    variant = set(filter(None, args.variant.split(",")))
    model = build_model(data["size"])
    load_mmdet_checkpoint(model, data["state_dict"])
    images = data["images"]
    model.train(data["task"] == "train")
    if "fuse" in variant:
        model.fuse()
    if "channels_last" in variant:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if "compile" in variant:
        model.compile()
    t0 = time.perf_counter()
    if data["task"] == "predict":
        h, w = images.shape[-2:]
        metas = [ImageMeta((h, w), (1.0, 1.0), (h, w))]  # a 640 x 640 original: masks pasted at 640

        def step(_):
            return model.predict(images, metas)

        res = step(None)[0]
        check = {"detections": len(res["scores"]), "top_scores": [round(float(s), 4) for s in res["scores"][:5]],
                 "mean_mask_fraction": round(res["masks"].float().mean().item(), 4),
                 "masks_shape": list(res["masks"].shape)}
    else:
        targets = data["targets"]
        opt = build_optimizer(model, lr=4e-3, weight_decay=0.05)  # as the LightningModule

        def step(_):
            losses = model.loss(model(images), targets)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
            return {k: round(float(v.detach()), 5) for k, v in losses.items()}

        check = {"first_step_losses": step(None)}
    check["first_call_s"] = round(time.perf_counter() - t0, 2)
    check["variant"] = sorted(variant)
    serve(step, check, args.warmup)


# ---------------------------------------------------------------------------------- orchestration
def compare(task: str, args: argparse.Namespace, workdir: Path, variants: list[str]) -> dict:
    img, batch, inst = (args.predict_size, 1, 0) if task == "predict" else (args.train_size, args.train_batch,
                                                                            args.train_instances)
    setup = workdir / f"{task}.pt"
    make_setup(setup, task, args.size, img, batch, inst)
    common = ["--setup", str(setup), "--threads", str(args.threads), "--warmup", str(args.warmup)]
    specs = {_name("ours", v): [sys.executable, "-m", "benchmarks.side_by_side", "--worker", "--variant", v, *common]
             for v in variants}
    for v in ["plain", *(m for m in args.mmdet_variants if m != "plain")]:  # plain mmdet: the reference
        specs[_name("mmdet", v)] = [args.mmdet_python, "-m", "benchmarks.mmdet_side", "--variant", v, *common]
    workers: dict[str, Worker] = {}
    try:
        for name, cmd in specs.items():  # started one after the other: warm-ups do not overlap
            workers[name] = Worker(name, cmd)
        names = list(workers)
        times: dict[str, list[float]] = {n: [] for n in names}
        round_medians: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                t = workers[name].run(args.iters)
                times[name] += t
                round_medians[name].append(statistics.median(t))
    finally:
        for w in workers.values():
            w.close()
    unit = 1e3 if task == "predict" else 1.0
    result = {
        "setup": (f"batch 1 x 3 x {img} x {img}, forward + postprocess, masks pasted at {img} x {img}"
                  if task == "predict" else
                  f"batch {batch} x 3 x {img} x {img}, {inst} GT per image, "
                  "forward + assign + loss + backward + AdamW"),
        "unit": "ms" if task == "predict" else "s",
        "contestants": {
            n: {"median": round(statistics.median(times[n]) * unit, 3 if unit == 1.0 else 2),
                "min": round(min(times[n]) * unit, 3 if unit == 1.0 else 2),
                "samples": len(times[n]), "start_s": workers[n].start_s, "check": workers[n].check}
            for n in names
        },
    }
    mm = statistics.median(times["mmdet"])
    result["ratios"] = {f"{n}/mmdet": round(statistics.median(times[n]) / mm, 3) for n in names if n != "mmdet"}
    # The same ratio from each round's medians (both measured within seconds of each other).
    result["per_round_ratio_median"] = {
        f"{n}/mmdet": round(statistics.median(a / b for a, b in zip(round_medians[n], round_medians["mmdet"])), 3)
        for n in names if n != "mmdet"
    }
    result["target_met"] = {k: v <= TARGETS[task] for k, v in result["ratios"].items() if k.startswith("ours")}
    result["target_ratio"] = TARGETS[task]
    result["agreement"] = _agreement(task, {n: w.check for n, w in workers.items()})
    return result


def _name(side: str, variant: str) -> str:
    return side + "".join(f"+{v}" for v in variant.split(",") if v != "plain")


def _agreement(task: str, checks: dict[str, dict]) -> dict:
    """Both sides must do the same work: same detection count / first-step losses."""
    ref = checks["mmdet"]
    out = {}
    for name, c in checks.items():
        if name == "mmdet":
            continue
        if task == "predict":
            out[name] = {"detections": [c["detections"], ref["detections"]],
                         "same_detection_count": c["detections"] == ref["detections"],
                         "max_top_score_diff": max((abs(a - b) for a, b in zip(c["top_scores"], ref["top_scores"])),
                                                   default=0.0)}
        else:
            ours, theirs = c["first_step_losses"], ref["first_step_losses"]
            rel = {k: abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-6) for k in ours}
            out[name] = {"first_step_losses_rel_diff": {k: round(v, 6) for k, v in rel.items()},
                         "losses_agree_1e-3": all(v <= 1e-3 for v in rel.values())}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.side_by_side", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mmdet-python", default=os.environ.get(MMDET_PYTHON_ENV),
                   help=f"a Python with mmdet 3.3.0 (README: Parity with mmdetection); default ${MMDET_PYTHON_ENV}")
    p.add_argument("--tasks", nargs="+", default=["predict", "train"], choices=["predict", "train"])
    p.add_argument("--size", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per contestant and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--predict-size", type=int, default=640)
    p.add_argument("--train-size", type=int, default=320)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-instances", type=int, default=10)
    p.add_argument("--predict-variants", nargs="+", default=["plain", "fuse"],
                   help="our configurations for predict: plain, or comma-joined fuse / channels_last / compile")
    p.add_argument("--train-variants", nargs="+", default=["plain", "channels_last"],
                   help="our configurations for train: plain, or comma-joined channels_last / compile")
    p.add_argument("--mmdet-variants", nargs="+", default=["plain"], choices=["plain", "channels_last"],
                   help="mmdet configurations (plain always runs: the ratios' reference); channels_last "
                        "shows what NHWC gives mmdet too")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 rounds of 1 iteration (smoke test)")
    # internal: one of our workers
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    return p


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.iters, args.warmup = 2, 1, 1
        args.predict_size, args.train_size, args.train_batch, args.train_instances = 256, 128, 2, 4
    if problem := mmdet_python_problem(args.mmdet_python):
        raise FileNotFoundError(problem)
    result = {"benchmark": "side_by_side", "size": args.size, "threads": args.threads, "rounds": args.rounds,
              "iters_per_round": args.iters, "mmdet_python": args.mmdet_python, "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "load_avg_1min_start":
              round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="rtmdet-sbs-") as tmp:
        for task in args.tasks:
            variants = args.predict_variants if task == "predict" else args.train_variants
            result[task] = compare(task, args, Path(tmp), variants)
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        ours_worker(args)
        return
    if problem := mmdet_python_problem(args.mmdet_python):
        parser.error(problem)
    print(json.dumps(run(argv), indent=1))


if __name__ == "__main__":
    main()
