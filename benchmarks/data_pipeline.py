"""Training data throughput: images/s of COCODataModule's train dataloader (full pipeline + collate).

    python -m benchmarks.data_pipeline                       # synthetic COCO-like data, stage 1
    python -m benchmarks.data_pipeline --stage 2 --num-workers 2
    python -m benchmarks.data_pipeline --ann-file data/coco/annotations/instances_train2017.json \\
        --img-dir data/coco/train2017

Without ``--ann-file`` a synthetic dataset is written to a temporary folder: 640x480 JPEGs with
``--instances`` polygon / RLE instances each (dense: a 4-tile mosaic holds ~4x that many before
cropping). The first ``--warmup`` batches (worker start-up, Mosaic/MixUp caches filling) are not
timed. The loader yields what the workers produce (uint8 images, compact masks);
``finalize_batch`` (dense masks + normalisation), which Lightning runs on the training device,
is timed separately on one batch in this process, or inside the loop with ``--finalize`` (the
CPU-training case). Prints one JSON object; ``cpu_ms_per_image`` (main process + workers, from
/proc) and the rate two free cores would give stand next to the wall-clock rate, which other load
on the machine distorts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of processes (Linux /proc); 0 where unavailable."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ann-file", default=None, help="COCO json (default: synthetic data)")
    p.add_argument("--img-dir", default=None)
    p.add_argument("--num-images", type=int, default=48, help="synthetic images")
    p.add_argument("--instances", type=int, default=30, help="instances per synthetic image")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--stage", type=int, default=1, choices=(1, 2))
    p.add_argument("--batches", type=int, default=40, help="timed batches")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches first")
    p.add_argument("--finalize", action="store_true",
                   help="also run finalize_batch (dense masks, normalisation) in the timed loop, as a CPU run does")
    p.add_argument("--nearest-resize", action="store_true")
    args = p.parse_args(argv)

    from datamodules import COCODataModule, finalize_batch

    with tempfile.TemporaryDirectory() as tmp:
        if args.ann_file is None:
            from tests._coco_factory import make_coco

            ann_file, img_dir = make_coco(tmp, num_images=args.num_images, size=(480, 640), instances=args.instances,
                                          formats=("polygon", "polygon", "polygon2", "rle"), max_radius=60,
                                          ext="jpg", seed=0)
            dataset = f"synthetic {args.num_images} x 480x640 jpg, {args.instances} instances each"
        else:
            ann_file, img_dir, dataset = args.ann_file, args.img_dir, args.ann_file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm = COCODataModule(str(ann_file), str(img_dir), img_size=args.img_size, batch_size=args.batch_size,
                                num_workers=args.num_workers, nearest_resize=args.nearest_resize, seed=0)
        dm.setup("fit")
        dm.set_train_stage(args.stage)
        loader = dm.train_dataloader()
        images = instances = 0
        cpu0 = 0.0
        start = time.perf_counter()
        it = iter(loader)
        pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
        for i in range(args.warmup + args.batches):
            if i == args.warmup:
                start, images, instances, cpu0 = time.perf_counter(), 0, 0, _cpu_seconds(pids)
            try:
                batch = next(it)
            except StopIteration:  # small datasets: the epoch again (workers keep their generator and caches)
                it = iter(loader)
                batch = next(it)
            if args.finalize:
                batch = finalize_batch(batch)
            images += len(batch[1])
            instances += sum(len(t["labels"]) for t in batch[1])
        elapsed = time.perf_counter() - start
        cpu = _cpu_seconds(pids) - cpu0
        del it, loader
        raw = batch if not args.finalize else None
        if raw is not None:  # its cost alone, in this process, on the last batch
            t = time.perf_counter()
            for _ in range(3):
                finalize_batch(raw)
            finalize_s = (time.perf_counter() - t) / 3
    result = {
        "images_per_s": round(images / elapsed, 1),
        "ms_per_batch": round(1000 * elapsed / args.batches, 1),
        # CPU time of the main process and the workers: robust to other load on the machine
        "cpu_ms_per_image": round(1000 * cpu / max(images, 1), 1),
        "images_per_s_if_2_free_cores": round(2 * images / cpu, 1) if cpu else None,
        # dense masks + normalisation of one batch on the CPU (on a GPU run this is done on the device)
        "finalize_ms_per_batch": round(1000 * finalize_s, 1) if not args.finalize else None,
        "finalize_in_timed_loop": args.finalize,
        "mean_instances_per_image": round(instances / max(images, 1), 1),
        "stage": args.stage,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "timed_batches": args.batches,
        "nearest_resize": args.nearest_resize,
        "dataset": dataset,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
