import torch

from rtmdet.box_ops import box_iou
from rtmdet.nms import batched_nms, nms


def brute_force_nms(boxes, scores, thr):
    """Textbook greedy NMS, one box at a time."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    iou = box_iou(boxes, boxes).tolist()
    keep = []
    for i in order:
        if all(iou[i][j] <= thr for j in keep):
            keep.append(i)
    return keep


def random_boxes(n, g, clustered=True):
    centres = torch.rand(max(n // 6, 1), 2, generator=g) * 200 if clustered else None
    xy = (centres[torch.randint(len(centres), (n,), generator=g)] if clustered else torch.rand(n, 2, generator=g) * 200)
    xy = xy + torch.randn(n, 2, generator=g) * 6
    wh = torch.rand(n, 2, generator=g) * 40 + 4
    return torch.cat([xy, xy + wh], 1)


def test_nms_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 120, (1,), generator=g))
        boxes = random_boxes(n, g, clustered=trial % 2 == 0)
        scores = torch.rand(n, generator=g)
        for thr in (0.3, 0.6):
            expected = brute_force_nms(boxes, scores, thr)
            assert nms(boxes, scores, thr).tolist() == expected
            assert nms(boxes, scores, thr, max_keep=3).tolist() == expected[:3]  # stops early
            for block in (1, 7, 32):  # boxes decided across blocks: kept ones of earlier blocks suppress
                assert nms(boxes, scores, thr, block=block).tolist() == expected
                assert nms(boxes, scores, thr, max_keep=5, block=block).tolist() == expected[:5]


def test_nms_of_a_thousand_candidates_equals_brute_force():
    """The postprocess's nms_pre: 1000 clustered candidates, several default-sized blocks."""
    g = torch.Generator().manual_seed(1)
    boxes, scores = random_boxes(1000, g), torch.rand(1000, generator=g)
    expected = brute_force_nms(boxes, scores, 0.6)
    assert 100 < len(expected) < 1000
    assert nms(boxes, scores, 0.6).tolist() == expected
    assert nms(boxes, scores, 0.6, max_keep=100).tolist() == expected[:100]


def test_nms_long_suppression_chain():
    # Each box overlaps only its neighbours: greedy keeps every other box (a chain of dependencies).
    x = torch.arange(30.0) * 2  # neighbours IoU 0.67, next-but-one 0.43
    boxes = torch.stack([x, torch.zeros(30), x + 10, torch.full((30,), 10.0)], 1)
    scores = torch.linspace(1, 0.1, 30)
    assert nms(boxes, scores, 0.5).tolist() == list(range(0, 30, 2)) == brute_force_nms(boxes, scores, 0.5)
    assert nms(boxes, scores, 0.5, block=4).tolist() == list(range(0, 30, 2))  # the chain crosses blocks


def test_batched_nms_is_class_aware():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(80, g)
    scores = torch.rand(80, generator=g)
    labels = torch.randint(0, 3, (80,), generator=g)
    keep = batched_nms(boxes, scores, labels, 0.6)
    expected = []
    for c in range(3):
        idx = (labels == c).nonzero().squeeze(1)
        expected += idx[brute_force_nms(boxes[idx], scores[idx], 0.6)].tolist()
    assert sorted(keep.tolist()) == sorted(expected)
    assert (scores[keep].diff() <= 0).all()  # sorted by score
    # Identical boxes of different classes both survive.
    same = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist() == [0, 1]


def test_empty():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
