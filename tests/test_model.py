import math

import pytest
import torch

from rtmdet import SIZES, build_model, count_parameters
from rtmdet.dynamic_mask import dynamic_mask_logits, num_dynamic_params, split_dynamic_params

# Spec 1.8: unique parameters for 80 classes, verified against mmdet 3.3.0 instantiations.
EXPECTED_PARAMS = {"tiny": 5_638_187, "s": 10_183_311, "m": 27_575_111, "l": 57_365_663, "x": 102_703_767}
EXPECTED_BACKBONE = {"tiny": 2_348_700, "s": 4_378_320, "m": 12_279_432, "l": 26_138_912, "x": 47_569_560}
EXPECTED_NECK = {"tiny": 2_188_944, "s": 3_883_200, "m": 11_049_408, "l": 23_746_688, "x": 43_511_040}
EXPECTED_MASK_HEAD = {"tiny": 361_064, "s": 641_160, "m": 1_440_968, "l": 2_560_264, "x": 3_999_048}


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_counts(size):
    with torch.device("meta"):
        model = build_model(size)
    assert count_parameters(model) == EXPECTED_PARAMS[size]
    assert count_parameters(model.backbone) == EXPECTED_BACKBONE[size]
    assert count_parameters(model.neck) == EXPECTED_NECK[size]
    assert count_parameters(model.head.mask_head) == EXPECTED_MASK_HEAD[size]


def test_output_shapes_per_level():
    model = build_model("tiny", num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 192))
    for lvl, s in enumerate((8, 16, 32)):
        hw = (128 // s, 192 // s)
        assert out.cls_logits[lvl].shape == (2, 7, *hw)
        assert out.box_dists[lvl].shape == (2, 4, *hw)
        assert out.kernels[lvl].shape == (2, 169, *hw)
        assert (out.box_dists[lvl] >= 0).all()  # ReLU(raw) * stride
    assert out.mask_protos.shape == (2, 8, 16, 24)


def test_head_initialisation():
    head = build_model("tiny").head
    for conv in head.rtm_cls:
        torch.testing.assert_close(conv.bias, torch.full_like(conv.bias, -math.log(99.0)))
    for conv in head.rtm_reg:
        torch.testing.assert_close(conv.bias, torch.ones_like(conv.bias))
    w = head.kernel_convs[0][0].conv.weight
    assert abs(w.std().item() - 0.01) < 1e-3 and abs(w.mean().item()) < 1e-3
    # A fresh model predicts the 0.01 prior everywhere and boxes of 1 stride per side.
    model = build_model("tiny").eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    torch.testing.assert_close(out.cls_logits[0].sigmoid().mean(), torch.tensor(0.01), atol=2e-3, rtol=0)
    torch.testing.assert_close(out.box_dists[0].mean(), torch.tensor(8.0), atol=0.5, rtol=0)


def test_shared_cls_tower_and_bn_momentum():
    head = build_model("tiny").head
    # One conv per tower layer shared by the three levels; BN separate per level.
    assert len(head.cls_convs) == 2 and len(head.cls_norms) == 3
    # Reference runs the cls tower twice in training: two BN updates with momentum 0.1 = one with 0.19.
    bn = head.cls_norms[0][0]
    assert bn.momentum == pytest.approx(1 - 0.9**2)
    bn.train()
    x = torch.randn(4, bn.num_features, 3, 3)
    ref = torch.nn.BatchNorm2d(bn.num_features, eps=1e-5, momentum=0.1).train()
    ref(x), ref(x)
    bn(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_dynamic_params_layout():
    assert num_dynamic_params(8, 8, 3) == 169
    params = torch.arange(169.0)[None]
    (w1, w2, w3), (b1, b2, b3) = split_dynamic_params(params)
    assert w1.shape == (1, 8, 10) and w1[0, 0, 0] == 0 and w1[0, 1, 0] == 10  # out-major
    assert w2[0, 0, 0] == 80 and w3[0, 0, 0] == 144
    assert b1[0, :, 0].tolist() == list(range(152, 160)) and b3.item() == 168


def test_dynamic_mask_matches_grouped_conv():
    """The batched formulation equals mmdet's per-instance 1x1 conv chain on [rel_x, rel_y, protos]."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(2, 8, 6, 7, generator=g)
    params = torch.randn(5, 169, generator=g)
    points = torch.tensor([[0.0, 0.0], [16.0, 8.0], [32.0, 32.0], [8.0, 40.0], [48.0, 16.0]])
    strides = torch.tensor([8.0, 8.0, 16.0, 8.0, 32.0])
    img_idx = torch.tensor([0, 1, 1, 0, 1])
    got = dynamic_mask_logits(protos, params, points, strides, img_idx)
    (w1, w2, w3), (b1, b2, b3) = split_dynamic_params(params)
    ys, xs = torch.meshgrid(torch.arange(6.0) * 8, torch.arange(7.0) * 8, indexing="ij")
    for k in range(5):
        rel = torch.stack([(points[k, 0] - xs), (points[k, 1] - ys)]) / (strides[k] * 8)  # (2, h, w)
        x = torch.cat([rel, protos[img_idx[k]]])[None]  # coords first, then prototypes
        x = torch.conv2d(x, w1[k][..., None, None], b1[k, :, 0]).relu()
        x = torch.conv2d(x, w2[k][..., None, None], b2[k, :, 0]).relu()
        x = torch.conv2d(x, w3[k][..., None, None], b3[k, :, 0])
        torch.testing.assert_close(got[k], x[0, 0], atol=1e-5, rtol=1e-5)
    assert dynamic_mask_logits(protos, params[:0], points[:0], strides[:0], img_idx[:0]).shape == (0, 6, 7)


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown RTMDet-Ins size"):
        build_model("huge")
