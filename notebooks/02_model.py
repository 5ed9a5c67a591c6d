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
# # 02 · The model, piece by piece
#
# RTMDet-Ins ([arXiv 2212.07784](https://arxiv.org/abs/2212.07784)) is
# **CSPNeXt backbone → CSPNeXtPAFPN neck → SepBN head**. The head predicts, at every point prior
# of three levels (strides 8, 16, 32), class logits, box distances and the 169 parameters of a small
# per-instance "dynamic" mask network, which runs on 8 shared mask prototypes at stride 8.
#
# This notebook builds the model, follows a 640 x 640 input through it, counts the parameters of
# the five sizes, draws the point priors, takes the 169-parameter kernel apart, and shows which
# priors the assigner makes positive for one training image. Nothing is trained: the weights are
# the (seeded) initialisation.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

import rtmdet
from datamodules import COCODataModule, collate, finalize_batch, load_image
from rtmdet.dynamic_mask import num_dynamic_params, split_dynamic_params
from rtmdet.priors import distance2bbox, flatten_levels, grid_priors

torch.manual_seed(0)  # the initial weights
model = rtmdet.build_model("tiny", num_classes=80).eval()
print(f"RTMDet-Ins-{model.size}: {rtmdet.count_parameters(model):,} parameters, strides {model.strides}")
for name, part in model.named_children():
    print(f"  {name:12s} {type(part).__name__:22s} {rtmdet.count_parameters(part):>10,}")

# %% [markdown]
# ## A 640 x 640 input, stage by stage
#
# `rtmdet.preprocess` letterboxes an RGB uint8 image to 640 (keep ratio, pad 114) and normalises it
# to the BGR float input the official weights expect. The backbone returns C3-C5 (strides 8-32),
# the neck fuses them into three maps of equal width, and the head returns a `RawOutputs`: raw
# tensors only, no loss and no NMS inside the model.

# %%
dm = COCODataModule(img_size=256, num_workers=0, nearest_resize=True, seed=0)  # the sprite dataset
record = dm.val_annotations.records[0]
image = load_image(record.path)  # (256, 256, 3) uint8 RGB
images, metas = rtmdet.preprocess([image], size=640, nearest=True)  # (1, 3, 640, 640), [ImageMeta]
print(f"input {tuple(images.shape)}, {metas[0]}")

with torch.no_grad():
    c3_c5 = model.backbone(images)
    p3_p5 = model.neck(c3_c5)
    out = model.head(p3_p5)
    outputs = rtmdet.RawOutputs(*out)  # what model(images) returns
for stride, c, p in zip(model.strides, c3_c5, p3_p5):
    print(f"stride {stride:2d}: backbone {tuple(c.shape)}  neck {tuple(p.shape)}")

# %%
print(f"{'stride':>6} {'cls_logits':>20} {'box_dists':>18} {'kernels':>20}")
for stride, cls, box, ker in zip(model.strides, outputs.cls_logits, outputs.box_dists, outputs.kernels):
    print(f"{stride:>6} {str(tuple(cls.shape)):>20} {str(tuple(box.shape)):>18} {str(tuple(ker.shape)):>20}")
print(f"mask_protos {tuple(outputs.mask_protos.shape)} (8 prototypes at stride 8)")
num_priors = sum(x.shape[-2] * x.shape[-1] for x in outputs.cls_logits)
print(f"{num_priors} priors in all (80x80 + 40x40 + 20x20)")

# %% [markdown]
# ## Parameters of the five sizes
#
# Sizes are data: `rtmdet.SIZES` holds the depth/width factors and the neck (= head) width of
# each. The models are built on PyTorch's `meta` device (shapes only, no memory, a fraction of a
# second); the totals equal the official checkpoints' parameter counts (`tests/test_model.py`).

# %%
print(f"{'size':>5} {'deepen':>7} {'widen':>6} {'width':>6} {'backbone':>12} {'neck':>11} {'head':>11} {'total':>13}")
for size, cfg in rtmdet.SIZES.items():
    with torch.device("meta"):  # parameters get shapes but no storage
        m = rtmdet.build_model(size, num_classes=80)
    counts = [rtmdet.count_parameters(part) for part in (m.backbone, m.neck, m.head)]
    print(f"{size:>5} {cfg.deepen_factor:>7} {cfg.widen_factor:>6} {cfg.neck_channels:>6} "
          + " ".join(f"{n:>11,}" for n in counts) + f" {rtmdet.count_parameters(m):>13,}")

# %% [markdown]
# ## Point priors
#
# Every cell (row i, column j) of a level with stride s is one prior at the point (j s, i s): the
# cell's top-left corner (offset 0, as in the reference). Priors are ordered row-major within a level
# and levels 8 → 16 → 32, the order of `flatten_levels` (B, C, H, W per level → (B, P, C)). A prior's
# box is its point minus/plus the predicted distances (l, t, r, b): `distance2bbox`.

# %%
sizes = [tuple(x.shape[-2:]) for x in outputs.cls_logits]  # [(80, 80), (40, 40), (20, 20)]
points, point_strides = grid_priors(sizes, model.strides)  # (8400, 2) xy input pixels, (8400,)
for start, stride in zip(np.cumsum([0] + [h * w for h, w in sizes[:-1]]), model.strides):
    print(f"stride {stride:2d}: priors {start}.. start at", points[start:start + 3].int().tolist(), "...")

boxes = distance2bbox(points, flatten_levels(outputs.box_dists)[0])  # (8400, 4) xyxy
print(f"at initialisation every box is (x - s, y - s, x + s, y + s) (reg bias 1, ReLU x stride): "
      f"prior {points[100].tolist()} -> box {boxes[100].tolist()}")

fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
crop = 160  # a 160 x 160 corner of the input, so that the stride-8 points stay visible
for ax, stride, marker in zip(axes, model.strides, ("o", "s", "D")):
    ax.imshow(rtmdet.letterbox(image, 640, nearest=True)[0].permute(1, 2, 0)[:crop, :crop])
    sel = (point_strides == stride) & (points < crop).all(1)
    ax.scatter(points[sel, 0], points[sel, 1], s=12, marker=marker, c="yellow", edgecolors="k", linewidths=0.5)
    ax.set_title(f"stride {stride}: {int((point_strides == stride).sum())} priors", fontsize=9)
    ax.set_xlim(-4, crop), ax.set_ylim(crop, -4), ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The 169 dynamic-kernel parameters
#
# Per instance the head predicts the weights and biases of three 1x1 convolutions (CondInst style,
# `rtmdet/dynamic_mask.py`): 10 → 8 → 8 → 1 channels. The 10 input channels are the prior-relative
# coordinates (rel_x, rel_y) followed by the 8 prototypes. The layout is weights first, then biases:
# W1 (8 x 10) = 80, W2 (8 x 8) = 64, W3 (1 x 8) = 8, b1 8, b2 8, b3 1: 169 in all.
# `split_dynamic_params` cuts a (K, 169) tensor into those pieces; here the parameters are their own
# index, so the ranges show.

# %%
params = torch.arange(num_dynamic_params(), dtype=torch.float32)[None]  # (1, 169): value = position
weights, biases = split_dynamic_params(params)
for kind, tensors in (("W", weights), ("b", biases)):
    for i, t in enumerate(tensors, 1):
        print(f"{kind}{i}: {str(tuple(t.shape[1:])):8s} params {int(t.min()):3d}..{int(t.max()):3d}")
print("W1 row 0 (output channel 0) over its inputs [rel_x, rel_y, F0..F7]:", weights[0][0, 0].int().tolist())

fig, ax = plt.subplots(figsize=(9, 1.3))
start = 0
pieces = [(f"W{i}", w) for i, w in enumerate(weights, 1)] + [(f"b{i}", b) for i, b in enumerate(biases, 1)]
for k, ((label, t), colour) in enumerate(zip(pieces, plt.cm.Set2.colors)):
    ax.barh(0, t.numel(), left=start, color=colour, edgecolor="k")
    narrow = t.numel() < 20  # label the narrow pieces above the bar, staggered
    ax.text(start + t.numel() / 2, 0.55 + 0.3 * (k % 2) if narrow else 0, f"{label} ({t.numel()})",
            ha="center", va="center", fontsize=8)
    start += t.numel()
ax.set_xlim(0, start + 8), ax.set_ylim(-0.5, 1.1), ax.set_yticks([])
ax.set_xlabel("position along the 169 kernel channels", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Which priors learn from which instance: the assigner
#
# During training the loss (`model.loss` → `RTMDetInsCriterion`) decodes the boxes, prepares the
# targets and calls `DynamicSoftLabelAssigner` (`rtmdet/assigner.py`). Candidates are the priors
# inside a ground-truth box; each is scored by a cost = soft classification cost + 3 x (-ln IoU) +
# a soft centre prior 10^(d / stride - 3), d its distance to the instance's mask centre. Each ground
# truth takes its k cheapest candidates, with k = the sum of its 13 best IoUs (at least 1); a prior
# picked twice goes to the cheaper ground truth.
#
# Below are the same calls as in `RTMDetInsCriterion.forward`, on one validation image at the sprite
# recipe's 256 x 256, with a freshly initialised 8-class model in training mode (batch-statistics
# BatchNorm, as in a training step). At initialisation every predicted box is about a 2s x 2s square
# around its prior, so the IoUs, and with them k, are small; as training improves the boxes, k grows
# (up to 13).

# %%
dm.setup("validate")
sample = dm.val_dataset[3]  # letterboxed validation sample: image (256, 256, 3) uint8, boxes, masks, ...
images, targets = finalize_batch(collate([sample]))  # (1, 3, 256, 256) normalised, dense target masks
torch.manual_seed(0)
model, criterion, _ = rtmdet.build("tiny", num_classes=dm.num_classes)  # the 8 sprite classes, side by side
model.train()
with torch.no_grad():
    outputs = model(images)
    losses = criterion(outputs, targets)  # what a training step back-propagates (weighted)
    # The loss's own steps up to the assignment (rtmdet/criterion.py, RTMDetInsCriterion.forward):
    cls_logits = flatten_levels(outputs.cls_logits)  # (1, P, C)
    sizes = [tuple(x.shape[-2:]) for x in outputs.cls_logits]
    points, point_strides = grid_priors(sizes, model.strides)  # (P, 2), (P,)
    pred_boxes = distance2bbox(points, flatten_levels(outputs.box_dists))  # (1, P, 4) xyxy
    gt = criterion.prepare_targets(targets, outputs.mask_protos)  # padded boxes, labels, mask centres
    assignment = criterion.assigner(pred_boxes, cls_logits, points, point_strides,
                                    gt.boxes, gt.labels, gt.centers, gt.valid)
print({k: round(v.item(), 3) for k, v in losses.items()})

pos = assignment.pos_mask[0]  # (P,) bool
gt_index = assignment.gt_index[0]  # (P,) -1 for negatives
# (P, G) prior strictly inside GT box: the assigner's candidate rule
inside = ((points[:, None] > gt.boxes[0, None, :, :2]) & (points[:, None] < gt.boxes[0, None, :, 2:])).all(-1)
print(f"{len(points)} priors, {int(inside.any(1).sum())} candidates (inside a box), {int(pos.sum())} positives")
for g, label in enumerate(gt.labels[0].tolist()):
    picked = pos & (gt_index == g)
    print(f"  GT {g} {dm.class_names[label]:8s} box {[round(v) for v in gt.boxes[0, g].tolist()]}: "
          f"{int(picked.sum())} positive(s) at strides {point_strides[picked].int().tolist()}, "
          f"IoU targets {[round(v, 2) for v in assignment.ious[0, picked].tolist()]}")

# %%
fig, ax = plt.subplots(figsize=(5.5, 5.5))
ax.imshow(sample["image"])
colours = plt.cm.tab10(np.arange(10))
for g, (x0, y0, x1, y1) in enumerate(gt.boxes[0].tolist()):
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ec=colours[g % 10]))
    ax.plot(*gt.centers[0, g].tolist(), "x", c=colours[g % 10], ms=6)  # the mask's centre of mass
cand = inside.any(1) & ~pos
ax.scatter(points[cand, 0], points[cand, 1], s=6, c="w", edgecolors="k", linewidths=0.3,
           label="candidate (inside a box)")
sizes_by_stride = {8: 18, 16: 40, 32: 80}
for g in range(len(gt.labels[0])):
    sel = pos & (gt_index == g)
    ax.scatter(points[sel, 0], points[sel, 1], s=[sizes_by_stride[int(s)] for s in point_strides[sel]],
               c=[colours[g % 10]], edgecolors="k", linewidths=0.8)
ax.set_title("positive priors, coloured by their ground truth (marker size = stride)\n"
             "x = mask centre of mass", fontsize=9)
ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), fontsize=8, frameon=False)
ax.axis("off")
plt.show()
