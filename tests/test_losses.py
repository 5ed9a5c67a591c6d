"""Each loss against numbers worked out by hand with plain formulas (math module, no torch maths)."""

import math

import torch

from rtmdet.losses import dice_loss, giou_loss, quality_focal_loss


def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


def _bce(z, y):  # -[y ln sigmoid(z) + (1 - y) ln(1 - sigmoid(z))]
    return -(y * math.log(_sigmoid(z)) + (1 - y) * math.log(1 - _sigmoid(z)))


def test_quality_focal_loss_known_values():
    logits = torch.tensor([[0.0, 1.0], [-2.0, 0.5]])
    labels = torch.tensor([1, 2])  # row 0: positive of class 1 with IoU 0.25; row 1: background (C = 2)
    scores = torch.tensor([0.25, 0.9])  # the background row's score is ignored
    # Row 0: class 0 is a negative term, BCE(0, 0) s(0)^2 = ln 2 / 4; class 1 the soft target 0.25.
    row0 = _bce(0.0, 0.0) * _sigmoid(0.0) ** 2 + _bce(1.0, 0.25) * (0.25 - _sigmoid(1.0)) ** 2
    row1 = _bce(-2.0, 0.0) * _sigmoid(-2.0) ** 2 + _bce(0.5, 0.0) * _sigmoid(0.5) ** 2
    assert abs(row0 - (math.log(2) / 4 + 1.0632617 * 0.2314174)) < 1e-6  # the numbers written out
    loss = quality_focal_loss(logits, labels, scores)
    torch.testing.assert_close(loss, torch.tensor([row0, row1]), atol=1e-6, rtol=0)


def test_quality_focal_loss_is_zero_when_prediction_equals_target():
    z = math.log(0.6 / 0.4)  # sigmoid(z) = 0.6
    loss = quality_focal_loss(torch.tensor([[z, -30.0]]), torch.tensor([0]), torch.tensor([0.6]))
    assert loss.item() < 1e-9


def test_giou_loss_known_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    # Overlap 1, union 4 + 4 - 1 = 7, enclosing 3 x 3 = 9: GIoU = 1/7 - 2/9.
    # Disjoint: IoU 0, union 2, enclosing 3 x 1: GIoU = -1/3. Identical: GIoU = 1.
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 1 / 3, 0.0])
    torch.testing.assert_close(giou_loss(pred, target), expected, atol=1e-6, rtol=0)


def test_dice_loss_known_values():
    probs = torch.tensor([[[0.5, 1.0], [0.0, 0.5]], [[0.2, 0.2], [0.2, 0.2]]])
    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    eps = 5e-6
    # Instance 0: sum pq = 1.5, sum p^2 = 1.5, sum q^2 = 2. Instance 1: empty target, sum p^2 = 0.16.
    expected = torch.tensor([1 - 3.0 / ((1.5 + eps) + (2.0 + eps)), 1 - 0.0 / ((0.16 + eps) + eps)])
    torch.testing.assert_close(dice_loss(probs, target, eps), expected, atol=1e-6, rtol=0)
    perfect = dice_loss(target[:1].float(), target[:1], eps)
    assert perfect.item() < 1e-5
