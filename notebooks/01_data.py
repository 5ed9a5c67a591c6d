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
# # 01 · The data: a COCO instance-segmentation dataset and its training augmentations
#
# What the model is trained on, and what the augmentation pipeline does to it:
#
# 1. browse a few images with their instance masks and boxes;
# 2. class and size statistics (instances per class, box sizes, instances per image);
# 3. each training transform of `datamodules/transforms/` on one fixed sample, then the full
#    stage-1 and stage-2 pipelines and the validation letterbox, and the batch the model receives.
#
# By default this is the embedded procedural sprite dataset (`datamodules/sprites.py`: 8 classes,
# 400 train / 60 val images at 256 px, generated into `~/.cache/rtmdet` in about 3 s on first use).
# Point `TRAIN_ANN_FILE` / `TRAIN_IMG_DIR` below at your own COCO json and image folder to browse yours.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from datamodules import COCODataModule, collate, finalize_batch, load_sample, train_pipeline, val_pipeline
from datamodules.transforms import (
    CachedMixUp,
    CachedMosaic,
    Pad,
    RandomCrop,
    RandomFlip,
    RandomResize,
    YOLOXHSVRandomAug,
    hsv_shift,
)

TRAIN_ANN_FILE = None  # None: the embedded sprite dataset (with its val split); else a COCO json
TRAIN_IMG_DIR = None  # folder the json's file_name entries are relative to
IMG_SIZE = 256  # network input size S of the sprite recipe (experiments/configs/sprites_tiny.yaml)
NEAREST = True  # nearest-neighbour resizing keeps pixel art crisp; False (bilinear) for photographs
SEED = 0  # DataModule shuffling and worker generators
AUG_SEED = 10  # the one-transform-at-a-time demo: a draw whose crop keeps several instances

# The sprite recipe's data settings; num_workers=0 loads in this process (nothing to spawn).
dm = COCODataModule(TRAIN_ANN_FILE, TRAIN_IMG_DIR, img_size=IMG_SIZE, batch_size=8, num_workers=0,
                    nearest_resize=NEAREST, mixup_prob=0.5, seed=SEED)
records = dm.train_annotations.records  # one ImageRecord per image: boxes (N, 4) xyxy, labels (N,)
val_records = dm.val_annotations.records if dm.val_annotations else []
names = dm.class_names
print(f"{len(records)} training images, {len(val_records)} validation images, "
      f"{dm.num_classes} classes: {', '.join(names)}")

# %% [markdown]
# ## Images with their masks
#
# A sample is a dict: `image` uint8 (H, W, 3) RGB, `boxes` (N, 4) float xyxy pixels, `labels` (N,)
# in 0..C-1, `masks` (N, H, W) stored as tight crops (`InstanceMasks`; `np.asarray` makes them
# dense). A small plotting helper tints each mask in its class colour and outlines its box.

# %%
COLOURS = plt.cm.tab10(np.arange(10))  # (10, 4) RGBA, one per class (wraps after 10)


def show(ax, sample: dict, title: str = "") -> None:
    """Draw a sample's image, its masks (tinted by class) and boxes on a matplotlib axis."""
    image, labels = sample["image"], sample["labels"]
    ax.imshow(image, interpolation="nearest")
    masks = np.asarray(sample["masks"])  # (N, H, W) bool
    tint = np.zeros((*image.shape[:2], 4))  # RGBA overlay, transparent where there is no instance
    for mask, label in zip(masks, labels):
        tint[mask] = COLOURS[label % 10] * [1, 1, 1, 0.55]
    ax.imshow(tint, interpolation="nearest")
    for (x0, y0, x1, y1), label in zip(sample["boxes"], labels):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1, ec=COLOURS[label % 10]))
    ax.set_title(title or f"{len(labels)} instances", fontsize=8)
    ax.axis("off")


fig, axes = plt.subplots(2, 4, figsize=(10, 5.2))
for ax, record in zip(axes.flat, records[:8]):
    show(ax, load_sample(record), f"image {record.image_id}: {len(record.labels)} instances")
handles = [Rectangle((0, 0), 1, 1, color=COLOURS[i % 10]) for i in range(len(names))]
fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
fig.tight_layout(rect=(0, 0.05, 1, 1))
plt.show()

# %% [markdown]
# ## Class and size statistics
#
# Counts come from the parsed annotation file (no image decoding). Box size is $\sqrt{w h}$ in
# original pixels; the dashed lines are COCO's small / medium / large limits (32 and 96), which
# the `mAP_s/m/l` metrics use. The sprites are drawn at an integer scale (x1 to x6) of a 6-17 px
# bitmap, so most of them are "small" or "medium" objects.

# %%
labels = np.concatenate([r.labels for r in records])  # (total instances,)
boxes = np.concatenate([r.boxes for r in records]).reshape(-1, 4)  # (total, 4) xyxy
box_size = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
per_class = np.bincount(labels, minlength=len(names))
per_image = np.array([len(r.labels) for r in records])

print(f"{len(labels)} instances; per image: mean {per_image.mean():.1f}, median {np.median(per_image):.0f}, "
      f"max {per_image.max()}, images without instances: {(per_image == 0).sum()}")
print(f"box size sqrt(wh): median {np.median(box_size):.1f} px, "
      f"small (< 32) {np.mean(box_size < 32):.0%}, medium {np.mean((box_size >= 32) & (box_size < 96)):.0%}, "
      f"large (>= 96) {np.mean(box_size >= 96):.0%}")

fig, (a, b, c) = plt.subplots(1, 3, figsize=(11, 2.8))
a.bar(range(len(names)), per_class, color=[COLOURS[i % 10] for i in range(len(names))])
a.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
a.set_title("instances per class", fontsize=9)
b.hist(box_size, bins=np.geomspace(8, max(box_size.max(), 128), 30), color="grey")
b.set_xscale("log")
for limit in (32, 96):
    b.axvline(limit, ls="--", c="k", lw=0.8)
b.set_title("box size sqrt(w h), px", fontsize=9)
c.hist(per_image, bins=np.arange(per_image.max() + 2) - 0.5, color="grey")
c.set_title("instances per image", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The training augmentations, one at a time
#
# The stage-1 pipeline of the official recipe (`train_pipeline(1, ...)`) is
# **CachedMosaic → RandomResize → RandomCrop → YOLOXHSVRandomAug → RandomFlip → Pad → CachedMixUp
# → FilterAnnotations**. Every transform is `t(sample, rng) -> sample`, so each can be applied on its
# own. Geometric steps recompute the boxes from the transformed masks, which is why box and mask
# always agree in training. The sprite recipe resizes with nearest neighbour (`nearest=True`) to keep
# pixel art crisp.
#
# Everything below uses one fixed sample and a seeded generator, so the figures are reproducible.

# %%
S = IMG_SIZE
rng = np.random.default_rng(AUG_SEED)
base = load_sample(records[3])  # the fixed sample
others = [load_sample(r) for r in records[4:9]]  # cache fillers for Mosaic / MixUp

# Mosaic: 4 tiles on a (2S, 2S) grey canvas around a random centre: the incoming sample is the
# top-left tile, three others come from a cache of recent samples (it needs more than 4 cached).
mosaic_t = CachedMosaic(S, max_cached=20, nearest=NEAREST)
for s in others[:4]:
    mosaic_t(s, rng)  # fills the cache; these pass through unchanged
mosaic = mosaic_t(base, rng)

# RandomResize: keep-ratio resize to fit (2S * r)^2 with r ~ U(0.5, 2.0); then RandomCrop(S) takes an
# S x S window. (The pipeline fuses both into RandomResizeCrop, resampling only the kept window.)
resized = RandomResize(2 * S, (0.5, 2.0), nearest=NEAREST)(mosaic, rng)
cropped = RandomCrop(S)(resized, rng)

# HSV: random gains U(-1, 1) x (5, 30, 30) on hue / saturation / value, each zeroed with p 0.5.
hsv = YOLOXHSVRandomAug()(cropped, rng)
# Flip: horizontal with p 0.5 (forced here so that it shows).
flipped = RandomFlip(prob=1.0)(hsv, rng)
# Pad: bottom/right to S x S with grey 114; only smaller images change, so shrink the sample first.
padded = Pad(S)(RandomResize(S, (0.6, 0.6), nearest=NEAREST)(base, rng))
# MixUp: 0.5/0.5 blend with a cached partner (resized to fit S, maybe flipped, randomly placed); the
# partner's instances are added. Probability 0.5 in the tiny recipe, forced to 1 here.
mixup_t = CachedMixUp(S, max_cached=10, prob=1.0, nearest=NEAREST)
for s in others:
    mixup_t(s, rng)  # partners in the cache (the incoming sample joins it too, and may be its own partner)
mixed = mixup_t(flipped, rng)

steps = [(base, "original"), (mosaic, "CachedMosaic (2S x 2S)"), (resized, "RandomResize"),
         (cropped, "RandomCrop (S x S)"), (hsv, "YOLOXHSVRandomAug"), (flipped, "RandomFlip"),
         (padded, "Pad (after a 0.6x resize)"), (mixed, "CachedMixUp")]
fig, axes = plt.subplots(2, 4, figsize=(11, 6.2))
for ax, (sample, title) in zip(axes.flat, steps):
    h, w = sample["image"].shape[:2]
    show(ax, sample, f"{title}\n{w}x{h}, {len(sample['labels'])} instances")
fig.tight_layout()
plt.show()

# %% [markdown]
# The HSV gains are small on purpose; at their extremes (hue ±5 of OpenCV's 180 units, saturation
# and value ±30 of 255) they look like this (`hsv_shift` is the colour maths behind the transform):

# %%
extremes = [(0, 0, 0), (5, 0, 0), (-5, 0, 0), (0, 30, 0), (0, -30, 0), (0, 0, 30), (0, 0, -30)]
fig, axes = plt.subplots(1, len(extremes), figsize=(11, 1.9))
for ax, (dh, ds, dv) in zip(axes, extremes):
    ax.imshow(hsv_shift(base["image"], dh, ds, dv), interpolation="nearest")
    ax.set_title(f"h {dh:+d} s {ds:+d} v {dv:+d}", fontsize=8)
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The full pipelines, as training sees them
#
# The DataModule's training dataset picks the pipeline from the `(index, stage, random stream)` items
# its sampler yields: stage 1 (above, with Mosaic and MixUp) for most epochs, stage 2 (RandomResize(S) →
# RandomCrop → Filter → HSV → Flip → Pad: no Mosaic, no MixUp) for the last ones, switched by the
# `PipelineSwitch` callback. Validation only letterboxes: keep-ratio resize to fit S, pad with 114.
# The first samples of stage 1 are still warming the Mosaic cache (plain resize-crops), so the figure
# shows later ones.

# %%
dm.setup("fit")
train_set = dm.train_dataset  # CocoDataset, seeded: the same samples on every run
index = list(range(3, 11))
stage1 = [train_set[(i, 1)] for i in index][-4:]  # after the cache warm-up
stage2 = [train_set[(i, 2)] for i in index][:4]
letterboxed = [val_pipeline(S, NEAREST)(load_sample(r), rng) for r in (val_records or records)[:4]]
print(train_pipeline(2, S, nearest=NEAREST))  # the stage-2 transforms and their settings

fig, axes = plt.subplots(3, 4, figsize=(10, 7.8))
for row, (samples, what) in enumerate([(stage1, "stage 1"), (stage2, "stage 2"), (letterboxed, "val letterbox")]):
    for ax, sample in zip(axes[row], samples):
        show(ax, sample, f"{what}: {len(sample['labels'])} instances")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The batch the model receives
#
# `collate` stacks uint8 images and keeps masks compact (that is what crosses from the dataloader
# workers); `finalize_batch` (called by Lightning after the batch reached the device) normalises the
# images to BGR float and makes the masks dense. Boxes are xyxy in input pixels.

# %%
images, targets = finalize_batch(collate(stage2))
print(f"images {tuple(images.shape)} {images.dtype} (BGR, normalised: mean {images.mean():+.2f}, "
      f"std {images.std():.2f})")
for key, value in targets[0].items():
    print(f"  targets[0][{key!r}]: {tuple(value.shape) if hasattr(value, 'shape') else value}"
          f"{' ' + str(value.dtype) if hasattr(value, 'dtype') else ''}")
