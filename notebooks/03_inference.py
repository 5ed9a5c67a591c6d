# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Inference: load a checkpoint, predict, cut out the sprites, time each stage
#
# 1. load a checkpoint (ours or an official mmdetection file) with `rtmdet.inference.load_checkpoint`;
# 2. preprocess → `model.predict` → masks and boxes in original-image pixels, drawn over the image;
# 3. each instance cut out as an RGBA sprite (alpha = mask), as `python -m experiments.predict` does;
# 4. the time spent in preprocessing, the network and the postprocessing.
#
# Nothing can be downloaded here, so the notebook uses the default training run's checkpoint,
# `runs/sprites_tiny/checkpoints/last.ckpt` (what `python -m experiments.train` writes, in about
# 7 minutes on 2 CPU cores) when it exists. Otherwise it trains a tiny model for a few dozen
# steps first, into a temporary folder.

# %%
# %matplotlib inline
import logging
import tempfile
import time
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch

import rtmdet
from datamodules import COCODataModule, PipelineSwitch, load_image, load_sample
from experiments.predict import main as predict_cli
from experiments.visualize import draw_overlay  # the overlay that experiments.predict writes
from rtmdet.checkpoint import load_checkpoint
from rtmdet.inference import cutout
from rtmdet.lightning_module import RTMDetInsModule

REPO = Path(rtmdet.__file__).resolve().parents[1]
CKPT = REPO / "runs" / "sprites_tiny" / "checkpoints" / "last.ckpt"
workdir = tempfile.TemporaryDirectory(prefix="rtmdet-nb03-")  # removed when the kernel stops
TRAINED = CKPT.is_file()
print(f"checkpoint: {CKPT}" if TRAINED else f"no {CKPT.relative_to(REPO)}: training briefly below")

# %% [markdown]
# ## No checkpoint? Train a tiny model for a few seconds
#
# Only when the checkpoint above is missing: RTMDet-Ins-tiny on the sprite dataset at 128 x 128,
# 30 steps of 8 images (twice the recipe's lr, 10 warm-up steps) with the stage-2 pipeline (no
# Mosaic / MixUp, which would shrink the sprites further at this size), no validation, no logger.
# The checkpoint goes to a temporary folder.
#
# **A model trained for 30 steps predicts poorly**: low scores, wrong classes, ragged or missing
# masks, duplicate boxes. It is only there so that the rest of the notebook runs; train the real
# recipe (`python -m experiments.train`) and run this notebook again to see what the model can do.

# %%
if not TRAINED:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no device / tips banners
    L.seed_everything(0, verbose=False)
    dm = COCODataModule(img_size=128, batch_size=8, num_workers=0, nearest_resize=True, seed=0)
    module = RTMDetInsModule("tiny", num_classes=dm.num_classes, lr=0.008, scale_lr=False, warmup_iters=10)
    trainer = L.Trainer(accelerator="cpu", max_steps=30, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PipelineSwitch(switch_epoch=0)], default_root_dir=workdir.name)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    CKPT = Path(workdir.name) / "brief.ckpt"
    trainer.save_checkpoint(CKPT)
    print(f"trained {trainer.global_step} steps in {time.perf_counter() - start:.1f} s -> {CKPT}")

# %% [markdown]
# ## Load the checkpoint
#
# `load_checkpoint` recognises our Lightning checkpoints and official mmdetection files, reads them
# with `torch.load(weights_only=True)`, and returns the model in eval mode with what the file says
# about its data: class names, and the input size and resize mode it was validated with.
# (`load_model` returns just the model and the class names.)

# %%
loaded = load_checkpoint(CKPT)
model, names = loaded.model, list(loaded.class_names)
img_size = loaded.img_size or 640
nearest = bool(loaded.nearest_resize)
print(f"{loaded.format} checkpoint: RTMDet-Ins-{model.size}, {model.num_classes} classes {names}")
print(f"input {img_size} x {img_size}, {'nearest' if nearest else 'bilinear'} resize; test settings: {loaded.test_settings}")

# %% [markdown]
# ## Predict
#
# `rtmdet.preprocess` letterboxes RGB uint8 images of any size to the input size and returns the
# `ImageMeta`s that map back to them; with the metas, `model.predict` returns per image `boxes`
# (N, 4) xyxy, `scores`, `labels` and `masks` (N, h, w) bool in original-image pixels, by descending
# score. The images are from the sprite validation split; ground truth on the left, prediction on
# the right, instances scoring at least `SCORE_THR` (lower for the briefly trained model, whose
# scores stay low).

# %%
SCORE_THR = 0.3 if TRAINED else 0.1
val = COCODataModule(num_workers=0).val_annotations  # the sprite validation split (no decoding yet)
records = val.records[:3]
originals = [load_image(r.path) for r in records]  # (H, W, 3) uint8 RGB

# The checkpoint's test-time settings with our threshold (a threshold before NMS gives the same
# result as after it); a postprocess is built, never changed afterwards.
postprocess = loaded.postprocess(score_thr=SCORE_THR)
images, metas = rtmdet.preprocess(originals, size=img_size, nearest=nearest)
preds = model.predict(images, metas, postprocess)
preds = [{k: v.numpy() for k, v in p.items()} for p in preds]

fig, axes = plt.subplots(len(records), 2, figsize=(7, 3.4 * len(records)))
for (ax_gt, ax_pred), record, image, pred in zip(axes, records, originals, preds):
    gt = load_sample(record)  # the annotations at the original size
    gt = {"boxes": gt["boxes"], "labels": gt["labels"], "masks": np.asarray(gt["masks"])}  # dense masks
    ax_gt.imshow(draw_overlay(image, gt, names))
    ax_gt.set_title(f"image {record.image_id}: ground truth ({len(record.labels)})", fontsize=9)
    ax_pred.imshow(draw_overlay(image, pred, names))
    ax_pred.set_title(f"predicted ({len(pred['scores'])} at score >= {SCORE_THR})", fontsize=9)
    for ax in (ax_gt, ax_pred):
        ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Cut-outs
#
# `rtmdet.inference.cutout` (what `experiments.predict` uses for its `cutouts/` folder) crops an
# instance to its mask's tight box and returns its original pixels as RGBA, alpha = mask. They are
# drawn here over a checkerboard, so the transparent pixels show.

# %%
image, pred = originals[0], preds[0]
cuts = []  # (rgba (h, w, 4) uint8, box (x0, y0, x1, y1), label, score) of the 8 best instances
for mask, label, score in zip(pred["masks"][:8], pred["labels"], pred["scores"]):
    cut = cutout(image, mask)  # None for an empty mask
    if cut is not None:
        cuts.append((*cut, label, score))
if cuts:
    fig, axes = plt.subplots(1, len(cuts), figsize=(1.4 * len(cuts), 1.8), squeeze=False)
    for ax, (rgba, (x0, y0, x1, y1), label, score) in zip(axes[0], cuts):
        cell = max(2, max(rgba.shape[:2]) // 6)  # a grey checkerboard of about 6 squares across
        yy, xx = np.indices(rgba.shape[:2]) // cell
        checker = ((yy + xx) % 2)[..., None] * 60 + 150
        alpha = rgba[..., 3:] / 255
        ax.imshow((rgba[..., :3] * alpha + checker * (1 - alpha)).astype(np.uint8), interpolation="nearest")
        ax.set_title(f"{names[label]} {score:.2f}\n{x1 - x0}x{y1 - y0}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    plt.show()
else:
    print("no instance above the score threshold on this image: nothing to cut out")

# %% [markdown]
# The command line does the same for a file or a folder and writes the overlays, the cut-outs and a
# COCO-style `results.json` (here into the temporary folder):

# %%
out_dir = Path(workdir.name) / "predict"
predict_cli(["--ckpt", str(CKPT), "--input", records[0].path, "--output", str(out_dir),
             "--score-thr", str(SCORE_THR)])
files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
print(f"{len(files)} files:", files[:5], "...")

# %% [markdown]
# ## Where the time goes
#
# The three stages of `model.predict`, timed separately (median of a few runs, one image, this
# machine's CPU threads): letterbox + normalise, the network (`model(images)`, raw outputs), and the
# postprocessing (`postprocess`, an `InstancePostProcess`: score threshold and top-k per level, box decoding, NMS,
# dynamic masks, pasting them at the original size). At the checkpoint's input size and at 640,
# the COCO size, where the same 256 x 256 image is upscaled 2.5x.

# %%
def median_ms(fn, repeats: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


image = originals[0]
timings = {}  # input size -> stage -> ms
with torch.inference_mode():
    for size in dict.fromkeys([img_size, 640]):  # unique, in order
        x, m = rtmdet.preprocess(image, size=size, nearest=nearest)
        outputs = model(x)
        timings[size] = {
            "preprocess": median_ms(lambda: rtmdet.preprocess(image, size=size, nearest=nearest)),
            "forward": median_ms(lambda: model(x)),
            "postprocess": median_ms(lambda: postprocess(outputs, m)),
        }
print(f"{'input':>7} {'preprocess':>11} {'forward':>9} {'postprocess':>12}   (ms, {torch.get_num_threads()} threads)")
for size, t in timings.items():
    print(f"{size:>7} {t['preprocess']:>11.1f} {t['forward']:>9.1f} {t['postprocess']:>12.1f}")

fig, ax = plt.subplots(figsize=(6, 1.2 + 0.4 * len(timings)))
left = np.zeros(len(timings))
for stage, colour in zip(("preprocess", "forward", "postprocess"), ("tab:blue", "tab:orange", "tab:green")):
    widths = [t[stage] for t in timings.values()]
    ax.barh([f"{s} px" for s in timings], widths, left=left, color=colour, label=stage)
    left += widths
ax.set_xlabel("ms per image")
ax.legend(fontsize=8, ncol=3, loc="lower right")
fig.tight_layout()
plt.show()
