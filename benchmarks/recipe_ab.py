"""A/B of training recipes and levers on one dataset, same seed and budget. Prints one JSON object.

    python -m benchmarks.recipe_ab --data real_art --root data/real_art --epochs 10 --img-size 320 \
        --arms official pixelart --out runs/ab_real_art
    python -m benchmarks.recipe_ab --data sprites --epochs 20 --out runs/ab_sprites   # embedded sprites

Each arm is a shipped recipe (``experiments/configs/<recipe>.yaml``) with a few overrides (see
``ARMS``); it is trained with ``python -m experiments.train`` for ``--epochs`` epochs (the stage-2
switch kept at the recipe's share of the schedule, validation every ``--val-every`` epochs, a CSV
log), then its last checkpoint is evaluated with ``python -m experiments.evaluate`` on ``val`` and,
where the set has one, ``val_heldout`` (designs never seen in training), each with masks as
predicted and with ``--refine-masks``. Arms run one after the other, each process on its own.
``--pretrained CKPT`` starts every arm from a checkpoint (the procedural-sprite pretraining lever:
all weights but the classifier when the class counts differ).

Output: per arm, training wall time, the metrics of every evaluation (segm mAP, AP_small, bbox
mAP, bbox AP_small, segm/bbox AP_small ratio) and the validation curve; ``--plot PNG`` draws the
learning curves (training loss and validation segm mAP per epoch) with matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"

# arm -> (recipe, overrides of the recipe as dotted keys). "official" is the sprite recipe with the
# reference's pipeline; each single lever is that recipe plus one change. "pixelart" is the recipe
# the A/B kept (the sprite recipe + mask_loss_stride 2); "all_three" the first one, with every lever.
COPY_PASTE = {"data.copy_paste_prob": 0.5, "data.copy_paste_max_instances": 10}
MASK_STRIDE_2 = {"model.mask_loss_stride": 2}
RESIZE_1_2 = {"data.random_resize_ratio": [1.0, 2.0]}
ARMS = {
    "official": ("sprites_tiny", {}),
    "pixelart": ("pixelart_tiny", {}),
    "copy_paste": ("sprites_tiny", COPY_PASTE),
    "mask_stride_2": ("sprites_tiny", MASK_STRIDE_2),
    "mask_stride_1": ("sprites_tiny", {"model.mask_loss_stride": 1}),
    "resize_1_2": ("sprites_tiny", RESIZE_1_2),
    "copy_paste_mask_stride_2": ("sprites_tiny", {**COPY_PASTE, **MASK_STRIDE_2}),
    "proto_stride_4": ("sprites_tiny", {"model.proto_stride": 4, **MASK_STRIDE_2}),
    # the three levers together (the first pixel-art recipe), alone and with stride-4 prototypes
    "all_three": ("sprites_tiny", {**COPY_PASTE, **MASK_STRIDE_2, **RESIZE_1_2}),
    "all_three_proto_stride_4": ("sprites_tiny", {**COPY_PASTE, **MASK_STRIDE_2, **RESIZE_1_2, "model.proto_stride": 4}),
    # the schedule for a 400-image set, on the kept recipe: half the learning rate; the stage-2
    # pipeline (no Mosaic/MixUp) for a tenth of the epochs instead of the recipe's fifth
    "pixelart_lr_half": ("pixelart_tiny", {"model.lr": 0.002}),
    "pixelart_stage2_tenth": ("pixelart_tiny", {"trainer.stage2_share": 0.1}),
}
KEPT_CALLBACKS = ("ExpMomentumEMA", "PipelineSwitch", "ModelCheckpoint")  # no progress bar, W&B panel, lr monitor


def arm_config(arm: str, data: dict, epochs: int, val_every: int, img_size: int | None, out: Path,
               pretrained: Path | None = None, seed: int | None = None) -> dict:
    """The recipe of ``arm`` with its overrides, the run's data, budget and a CSV logger; with
    ``pretrained``, its weights start the run (all but the classifier when the class count differs);
    ``seed`` replaces the recipe's seed of both the weights' initialisation and the augmentation."""
    recipe, overrides = ARMS[arm]
    cfg = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    overrides = dict(overrides)
    stage2_share = overrides.pop("trainer.stage2_share", None)  # a share of the epochs, whatever --epochs is
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg[section][name] = value
    if pretrained is not None:
        cfg["model"].update(pretrained=str(pretrained), allow_num_classes_mismatch=True)
    cfg["data"].update(data)
    if img_size:
        cfg["data"]["img_size"] = img_size
    if seed is not None:
        cfg["seed_everything"] = cfg["data"]["seed"] = seed
    trainer = cfg["trainer"]
    if stage2_share is None:  # the recipe's own share
        stage2_share = next(c["init_args"]["num_last_epochs"] for c in trainer["callbacks"]
                            if c["class_path"].endswith("PipelineSwitch")) / trainer["max_epochs"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].rsplit(".", 1)[-1] in KEPT_CALLBACKS]
    for c in trainer["callbacks"]:
        if c["class_path"].endswith("PipelineSwitch"):
            c["init_args"]["num_last_epochs"] = max(1, round(stage2_share * epochs))
    trainer.update(max_epochs=epochs, check_val_every_n_epoch=val_every, default_root_dir=str(out),
                   enable_progress_bar=False, enable_model_summary=False,
                   logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(out), "name": "csv", "version": 0}})
    return cfg


def dataset_paths(kind: str, root: Path | None) -> tuple[dict, dict]:
    """(data section paths for training, {split: (ann_file, img_dir)} to evaluate on)."""
    if kind == "sprites":
        from datamodules.sprites import default_sprite_dataset

        paths = default_sprite_dataset(root)
        return paths, {"val": (paths["val_ann_file"], paths["val_img_dir"])}
    if root is None:
        raise SystemExit("--data real_art needs --root (made by: python -m datamodules.real_art --out ROOT)")
    ann = root / "annotations"
    if not (ann / "train.json").exists():
        raise SystemExit(f"{ann / 'train.json'} not found; make the set: python -m datamodules.real_art --out {root}")
    data = {"train_ann_file": str(ann / "train.json"), "train_img_dir": str(root / "train"),
            "val_ann_file": str(ann / "val.json"), "val_img_dir": str(root / "val")}
    splits = {s: (str(ann / f"{s}.json"), str(root / s)) for s in ("val", "val_heldout") if (ann / f"{s}.json").exists()}
    return data, splits


def curve(run_dir: Path) -> dict:
    """Per epoch: mean training loss and validation segm/bbox mAP, from the CSV log."""
    path = run_dir / "csv" / "version_0" / "metrics.csv"
    losses: dict[int, list[float]] = {}
    val: dict[int, dict] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            epoch = int(float(row["epoch"])) if row.get("epoch") else None
            if epoch is None:
                continue
            if row.get("train/loss"):
                losses.setdefault(epoch, []).append(float(row["train/loss"]))
            if row.get("val/segm_mAP"):
                val[epoch] = {"segm_mAP": float(row["val/segm_mAP"]), "bbox_mAP": float(row["val/bbox_mAP"])}
    return {"train_loss": {e: sum(v) / len(v) for e, v in sorted(losses.items())}, "val": dict(sorted(val.items()))}


def summary(metrics: dict) -> dict:
    keys = ("segm_mAP", "segm_mAP_s", "bbox_mAP", "bbox_mAP_s")
    out = {k: round(metrics[k], 4) for k in keys}
    out["segm_over_bbox_small"] = round(metrics["segm_mAP_s"] / metrics["bbox_mAP_s"], 3) if metrics["bbox_mAP_s"] > 0 else None
    return out


def run_arm(arm: str, args: argparse.Namespace, data: dict, splits: dict) -> dict:
    out = args.out / arm
    out.mkdir(parents=True, exist_ok=True)
    cfg = arm_config(arm, data, args.epochs, args.val_every, args.img_size, out, args.pretrained, args.seed)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = out / "train.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config", str(config)], cwd=REPO,
                              stdout=f, stderr=subprocess.STDOUT)
    train_s = time.perf_counter() - t0
    if proc.returncode:
        return {"error": f"training exited with {proc.returncode}; log: {log}"}
    result = {"recipe": ARMS[arm][0], "overrides": ARMS[arm][1], "epochs": args.epochs, "seed": cfg["seed_everything"],
              "pretrained": str(args.pretrained) if args.pretrained else None,
              "train_wall_s": round(train_s, 1), "curve": curve(out)}
    ckpt = out / "checkpoints" / "last.ckpt"
    for split, (ann_file, img_dir) in splits.items():
        for refine in (False, True):
            name = f"{split}{'_refined' if refine else ''}"
            output = out / f"eval_{name}.json"
            cmd = [sys.executable, "-m", "experiments.evaluate", "--ckpt", str(ckpt), "--data.val_ann_file", ann_file,
                   "--data.val_img_dir", img_dir, "--output", str(output)] + (["--refine-masks"] if refine else [])
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            result[name] = summary(json.loads(output.read_text())) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    return result


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 3.8))
    for arm, r in results.items():
        if "curve" not in r:
            continue
        loss, val = r["curve"]["train_loss"], r["curve"]["val"]
        ax_loss.plot([int(e) + 1 for e in loss], list(loss.values()), label=arm)
        ax_map.plot([int(e) + 1 for e in val], [v["segm_mAP"] for v in val.values()], marker="o", label=arm)
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean)", title=title)
    ax_map.set(xlabel="epoch", ylabel="val segm mAP")
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
    ax_map.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)  # beside the curves, never over them
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("sprites", "real_art"), default="sprites")
    p.add_argument("--root", type=Path, help="real_art: the set's folder; sprites: the cache root (default: as training)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["official", "pixelart"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--val-every", type=int, default=None, help="validation interval in epochs (default: ~5 points)")
    p.add_argument("--img-size", type=int, help="input size (default: the recipe's)")
    p.add_argument("--out", type=Path, default=Path("runs/recipe_ab"))
    p.add_argument("--plot", type=Path, help="PNG of the learning curves")
    p.add_argument("--pretrained", type=Path,
                   help="start every arm from these weights (e.g. a model trained on the embedded sprites)")
    p.add_argument("--seed", type=int, help="seed of every arm (default: the recipe's, 0); another seed shows "
                   "how much of a difference between arms is the draw")
    args = p.parse_args(argv)
    args.val_every = args.val_every or max(1, math.ceil(args.epochs / 5))
    if args.epochs % args.val_every:
        raise SystemExit(f"--epochs {args.epochs} is not a multiple of --val-every {args.val_every}: "
                         f"the last epoch would not be validated")
    data, splits = dataset_paths(args.data, args.root)
    results = {}
    for arm in args.arms:
        results[arm] = run_arm(arm, args, data, splits)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))  # partial results survive a stop
    if args.plot:
        plot(results, args.plot, f"{args.data}, {args.epochs} epochs")
    print(json.dumps({"data": args.data, "epochs": args.epochs, "img_size": args.img_size, "seed": args.seed,
                      "arms": results}, indent=1))


if __name__ == "__main__":
    main()
