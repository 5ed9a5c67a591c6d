"""Training-loss parity with mmdetection 3.3.0 on identical random weights (parity venv only).

    /path/to/parity-venv/bin/python -m pytest -m parity tests/test_parity_loss.py -q -W ignore
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmdet", reason="parity tests need mmdet 3.3.0 (see README: Parity with mmdetection)")

import numpy as np  # noqa: E402

from rtmdet import build_model, load_mmdet_checkpoint  # noqa: E402
from rtmdet.assigner import DynamicSoftLabelAssigner, mask_centers  # noqa: E402
from rtmdet.priors import distance2bbox, grid_priors  # noqa: E402

from ._targets import ellipse_targets  # noqa: E402
from .mmdet_reference import build_mmdet_model, randomize  # noqa: E402  (installs the mmcv._ext stand-in first)

from mmdet.models.task_modules.assigners import DynamicSoftLabelAssigner as RefAssigner  # noqa: E402, I001
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("two_threads")]
SIZE = 320


def make_targets(counts, seed, size=SIZE, num_classes=80):
    """Per image: random boxes (some smaller than a stride) with elliptical masks inside them."""
    return ellipse_targets(counts, seed, size, num_classes, max_frac=0.45, min_wh=3.0, never_empty=True)


def to_mmdet(targets):
    return [
        InstanceData(bboxes=t["boxes"].clone(), labels=t["labels"].clone(),
                     masks=BitmapMasks(t["masks"].numpy().astype(np.uint8), SIZE, SIZE))
        for t in targets
    ]


METAS = [{"img_shape": (SIZE, SIZE), "pad_shape": (SIZE, SIZE), "batch_input_shape": (SIZE, SIZE)}] * 2


def _pair(size: str, seed: int = 0):
    ref = build_mmdet_model(size).eval()
    randomize(ref, seed)
    ours = build_model(size).eval()
    load_mmdet_checkpoint(ours, ref.state_dict())
    return ref, ours


def _assert_rel(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3):
    a, b = float(a), float(b)
    assert abs(a - b) <= rtol * max(abs(b), 1e-6), (a, b)


@pytest.mark.parametrize("size,counts", [("tiny", (12, 5)), ("s", (12, 5)), ("tiny", (30, 0)), ("tiny", (90, 60))])
def test_losses_match(size, counts):
    ref, ours = _pair(size, seed=5)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    targets = make_targets(counts, seed=7)
    with torch.no_grad():
        ref_losses = ref.bbox_head.loss_by_feat(*ref.bbox_head(ref.neck(ref.backbone(x))), to_mmdet(targets), METAS)
        our_losses = ours.loss(ours(x), targets)
    for name in ("loss_cls", "loss_bbox", "loss_mask"):
        r = ref_losses[name]
        r = sum(r) if isinstance(r, (list, tuple)) else r
        assert our_losses[name].dtype == torch.float32
        _assert_rel(our_losses[name], r)


def test_gradients_match():
    """Same raw outputs into both losses: the gradients w.r.t. every raw output agree."""
    ref, ours = _pair("tiny", seed=8)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    targets = make_targets((9, 6), seed=10)
    with torch.no_grad():
        raw = ours(x)
    leaves_ref = [[t.clone().requires_grad_() for t in part] for part in raw[:3]] + [raw[3].clone().requires_grad_()]
    leaves_our = [[t.clone().requires_grad_() for t in part] for part in raw[:3]] + [raw[3].clone().requires_grad_()]
    ref_losses = ref.bbox_head.loss_by_feat(*leaves_ref, to_mmdet(targets), METAS)
    total_ref = sum(sum(v) if isinstance(v, (list, tuple)) else v for v in ref_losses.values())
    total_ref.backward()
    sum(ours.loss(type(raw)(*leaves_our), targets).values()).backward()
    flat_ref = [*leaves_ref[0], *leaves_ref[1], *leaves_ref[2], leaves_ref[3]]
    flat_our = [*leaves_our[0], *leaves_our[1], *leaves_our[2], leaves_our[3]]
    for a, b in zip(flat_our, flat_ref):
        scale = b.grad.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(a.grad / scale, b.grad / scale, atol=1e-4, rtol=0)


def test_assignment_matches_mmdet_per_image():
    """Many overlapping GTs, some with no prior inside: identical positives, GTs and IoU targets."""
    g = torch.Generator().manual_seed(11)
    sizes, strides = [(40, 40), (20, 20), (10, 10)], (8, 16, 32)
    points, point_strides = grid_priors(sizes, strides)
    P, C = len(points), 80
    dists = torch.rand(2, P, 4, generator=g) * 60 + 2
    logits = torch.randn(2, P, C, generator=g) * 2 - 3
    pred_boxes = distance2bbox(points, dists)
    targets = make_targets((60, 17), seed=12)
    ours = DynamicSoftLabelAssigner(gt_chunk=16)  # several chunks of GTs
    G = 60
    gt_boxes = torch.zeros(2, G, 4)
    gt_labels = torch.zeros(2, G, dtype=torch.long)
    centers = torch.zeros(2, G, 2)
    valid = torch.zeros(2, G, dtype=torch.bool)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        gt_boxes[b, :n], gt_labels[b, :n], valid[b, :n] = t["boxes"], t["labels"], True
        centers[b, :n] = mask_centers(t["masks"], t["boxes"])
    a = ours(pred_boxes, logits, points, point_strides, gt_boxes, gt_labels, centers, valid)
    priors4 = torch.cat([points, point_strides[:, None].expand(-1, 2)], 1)
    for b, t in enumerate(targets):
        res = RefAssigner(topk=13).assign(
            InstanceData(bboxes=pred_boxes[b], scores=logits[b], priors=priors4),
            InstanceData(bboxes=t["boxes"], labels=t["labels"], masks=t["masks"]),
        )
        pos = res.gt_inds > 0
        assert pos.sum() > 0
        assert torch.equal(a.pos_mask[b], pos)
        assert torch.equal(a.gt_index[b][pos], res.gt_inds[pos] - 1)
        assert torch.equal(a.labels[b][pos], res.labels[pos])
        torch.testing.assert_close(a.ious[b][pos], res.max_overlaps[pos], atol=1e-6, rtol=0)

