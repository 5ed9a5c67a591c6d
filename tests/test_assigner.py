"""DynamicSoftLabelAssigner: invariants, and equality with a literal per-GT reading of spec 4.2."""

import pytest
import torch
import torch.nn.functional as F

from rtmdet.assigner import DynamicSoftLabelAssigner, mask_centers
from rtmdet.priors import distance2bbox, grid_priors

C = 5
SIZE = 96


def make_inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    points, strides = grid_priors([(SIZE // s, SIZE // s) for s in (8, 16, 32)], (8, 16, 32))
    dists = torch.rand(batch, len(points), 4, generator=g) * 30 + 1
    logits = torch.randn(batch, len(points), C, generator=g) * 2 - 2
    return distance2bbox(points, dists), logits, points, strides


def make_gts(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * 40 + 4
    xy = torch.rand(n, 2, generator=g) * (SIZE - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    centers = xy + wh * torch.rand(n, 2, generator=g)  # somewhere inside, as a mask centre would be
    return boxes, torch.randint(0, C, (n,), generator=g), centers


def run(assigner, pred, logits, points, strides, gts_per_image, pad_to=None):
    """Pad per-image (boxes, labels, centers) to a batch and assign."""
    G = pad_to or max(1, max(len(b) for b, _, _ in gts_per_image))
    B = len(gts_per_image)
    boxes, labels, centers = torch.zeros(B, G, 4), torch.zeros(B, G, dtype=torch.long), torch.zeros(B, G, 2)
    valid = torch.zeros(B, G, dtype=torch.bool)
    for i, (b, lab, c) in enumerate(gts_per_image):
        boxes[i, :len(b)], labels[i, :len(b)], centers[i, :len(b)], valid[i, :len(b)] = b, lab, c, True
    return assigner(pred, logits, points, strides, boxes, labels, centers, valid)


def reference_assign(pred, logits, points, strides, boxes, labels, centers):
    """Spec 4.2 read literally for one image, one GT at a time, with the full (P, G, C) soft cls cost."""
    P, G = len(pred), len(boxes)
    inside = torch.stack([
        (points[:, 0] > b[0]) & (points[:, 1] > b[1]) & (points[:, 0] < b[2]) & (points[:, 1] < b[3]) for b in boxes
    ], 1)  # (P, G)
    cand = inside.any(1)
    lt = torch.maximum(pred[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(pred[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    iou = inter / (area(pred)[:, None] + area(boxes)[None, :] - inter).clamp(min=1e-6)  # (P, G)
    soft = F.one_hot(labels, C).float()[None] * iou[..., None]  # (P, G, C)
    z = logits[:, None, :].expand(P, G, C)
    cls_cost = (F.binary_cross_entropy_with_logits(z, soft, reduction="none") * (soft - z.sigmoid()) ** 2).sum(-1)
    dist = (points[:, None, :] - centers[None]).norm(dim=-1) / strides[:, None]
    cost = cls_cost - 3 * torch.log(iou + 1e-7) + 10 ** (dist - 3)
    cost[~cand] = float("inf")
    matched = torch.zeros(P, G, dtype=torch.bool)
    n_cand = int(cand.sum())
    for j in range(G):
        k = max(1, int(iou[cand, j].topk(min(13, n_cand)).values.sum()))
        matched[cost[:, j].topk(k, largest=False).indices, j] = True
    gt_index = torch.full((P,), -1)
    for p in range(P):
        js = matched[p].nonzero().flatten()
        if len(js) == 1:
            gt_index[p] = js[0]
        elif len(js) > 1:
            gt_index[p] = cost[p].argmin()
    pos = gt_index >= 0
    return pos, gt_index, iou[torch.arange(P), gt_index.clamp(min=0)] * pos


def test_no_ground_truth_means_all_negative():
    pred, logits, points, strides = make_inputs(2, seed=0)
    a = run(DynamicSoftLabelAssigner(), pred, logits, points, strides, [make_gts(0, 1)] * 2)
    assert not a.pos_mask.any()
    assert (a.labels == C).all() and (a.gt_index == -1).all() and (a.ious == 0).all()


def test_single_gt_takes_dynamic_k_cheapest_priors_inside():
    pred, logits, points, strides = make_inputs(1, seed=2)
    boxes = torch.tensor([[20.0, 12.0, 70.0, 60.0]])
    gts = (boxes, torch.tensor([3]), torch.tensor([[44.0, 35.0]]))
    a = run(DynamicSoftLabelAssigner(), pred, logits, points, strides, [gts])
    pos = a.pos_mask[0]
    inside = (points[:, 0] > 20) & (points[:, 0] < 70) & (points[:, 1] > 12) & (points[:, 1] < 60)
    assert (pos <= inside).all(), "a lone GT only takes priors strictly inside it"
    ref_pos, _, _ = reference_assign(pred[0], logits[0], points, strides, *gts)
    lt, rb = torch.maximum(pred[0, :, :2], boxes[:, :2]), torch.minimum(pred[0, :, 2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    ious = inter / ((pred[0, :, 2:] - pred[0, :, :2]).prod(-1) + 50 * 48 - inter)
    k = max(1, int(ious[inside].topk(13).values.sum()))  # dynamic k of spec 4.2 step 3
    assert int(pos.sum()) == k > 1
    assert torch.equal(pos, ref_pos)
    assert (a.labels[0][pos] == 3).all() and (a.gt_index[0][pos] == 0).all()
    torch.testing.assert_close(a.ious[0][pos], ious[pos])


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_matches_literal_reference_with_conflicts(seed):
    pred, logits, points, strides = make_inputs(1, seed=seed)
    gts = make_gts(9, seed=seed + 100)
    # A GT too small to contain any prior still gets the cheapest candidates of the others.
    tiny = (torch.tensor([[41.0, 41.0, 43.0, 43.0]]), torch.tensor([1]), torch.tensor([[42.0, 42.0]]))
    gts = tuple(torch.cat([x, y]) for x, y in zip(gts, tiny))
    a = run(DynamicSoftLabelAssigner(), pred, logits, points, strides, [gts])
    pos, gt_index, ious = reference_assign(pred[0], logits[0], points, strides, *gts)
    assert torch.equal(a.pos_mask[0], pos)
    assert torch.equal(a.gt_index[0], gt_index)
    assert (a.gt_index[0] == 9).any(), "the prior-less GT is matched"
    torch.testing.assert_close(a.ious[0], ious)


def test_permuting_gts_permutes_assignment():
    pred, logits, points, strides = make_inputs(1, seed=6)
    boxes, labels, centers = make_gts(7, seed=7)
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    a = run(DynamicSoftLabelAssigner(), pred, logits, points, strides, [(boxes, labels, centers)])
    b = run(DynamicSoftLabelAssigner(), pred, logits, points, strides, [(boxes[perm], labels[perm], centers[perm])])
    assert a.pos_mask.sum() > 5
    assert torch.equal(a.pos_mask, b.pos_mask) and torch.equal(a.labels, b.labels)
    assert torch.equal(perm[b.gt_index[b.pos_mask]], a.gt_index[a.pos_mask])
    torch.testing.assert_close(a.ious, b.ious)


def test_batched_equals_per_image_and_padding_is_never_assigned():
    pred, logits, points, strides = make_inputs(2, seed=8)
    gts = [make_gts(3, seed=9), make_gts(8, seed=10)]
    assigner = DynamicSoftLabelAssigner(gt_chunk=3)  # also exercise several GT chunks
    batched = run(assigner, pred, logits, points, strides, gts, pad_to=11)
    for i, g in enumerate(gts):
        alone = run(assigner, pred[i:i + 1], logits[i:i + 1], points, strides, [g])
        for x, y in zip(batched, alone):
            assert torch.equal(x[i], y[0])
        assert (batched.gt_index[i] < len(g[0])).all()


def test_invalid_entries_are_ignored_even_if_they_cover_everything():
    pred, logits, points, strides = make_inputs(1, seed=11)
    boxes, labels, centers = make_gts(4, seed=12)
    pad_boxes = torch.cat([boxes, torch.tensor([[-10.0, -10.0, 200.0, 200.0]] * 2)])[None]  # (1, 6, 4)
    valid = torch.tensor([[True] * 4 + [False] * 2])
    pad_labels = torch.cat([labels, torch.tensor([0, 0])])[None]
    pad_centers = torch.cat([centers, torch.full((2, 2), 48.0)])[None]
    a = DynamicSoftLabelAssigner()(pred, logits, points, strides, pad_boxes, pad_labels, pad_centers, valid)
    b = run(DynamicSoftLabelAssigner(), pred, logits, points, strides, [(boxes, labels, centers)])
    assert (a.gt_index < 4).all()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # Marked valid, the same two entries change the assignment: only the mask keeps them out above.
    c = DynamicSoftLabelAssigner()(pred, logits, points, strides, pad_boxes, pad_labels, pad_centers,
                                   torch.ones_like(valid))
    assert not torch.equal(c.pos_mask, a.pos_mask)


def test_mask_centers():
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 2:5, 10:16] = True  # rows 2..4, columns 10..15
    masks[1, 7, 3] = True
    masks[1, 9, 5] = True
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [4.0, 6.0, 10.0, 8.0]])
    expected = torch.tensor([[12.5, 3.0], [4.0, 8.0], [7.0, 7.0]])  # the empty mask falls back to the box centre
    torch.testing.assert_close(mask_centers(masks, boxes), expected)
    torch.testing.assert_close(mask_centers(masks, boxes, chunk_elements=1), expected)
    assert mask_centers(masks[:0], boxes[:0]).shape == (0, 2)
