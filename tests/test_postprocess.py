import math

import pytest
import torch
import torch.nn.functional as F

from rtmdet.mask_paste import paste_masks, resize_matrices
from rtmdet.outputs import RawOutputs
from rtmdet.postprocess import InstancePostProcess
from rtmdet.preprocess import ImageMeta

STRIDES = (8, 16, 32)


def reference_masks(logits, stride, input_size, meta=None):
    """mmdet's chain: x8 bilinear, then resize to ceil(input / scale) (x/y swapped), crop, sigmoid > 0.5."""
    x = F.interpolate(logits[None], scale_factor=stride, mode="bilinear", align_corners=False)
    if meta is not None:
        (h, w), (ws, hs) = meta.orig_size, meta.scale_factor
        x = F.interpolate(x, size=(math.ceil(x.shape[-2] / ws), math.ceil(x.shape[-1] / hs)), mode="bilinear",
                          align_corners=False)[..., :h, :w]
    return x[0].sigmoid() > 0.5


@pytest.mark.parametrize("meta", [None, ImageMeta((100, 75), (48 / 75, 64 / 100), (64, 64)),
                                  ImageMeta((240, 300), (64 / 300, 51 / 240), (64, 64))])
def test_paste_equals_full_upsampling(meta):
    g = torch.Generator().manual_seed(0)
    # Smooth blobs: a few instances with positive regions of various sizes, one with none.
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    centres = torch.rand(6, 2, generator=g) * 8
    radius = torch.rand(6, generator=g) * 3 + 0.5
    logits = radius[:, None, None] - ((xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2).sqrt()
    logits[5] = -1.0
    ry, rx = resize_matrices((8, 8), 8, (64, 64), meta)
    got = paste_masks(logits, ry, rx)
    want = reference_masks(logits, 8, (64, 64), meta)
    assert got.shape == want.shape
    assert (got != want).sum() <= 2  # float summation order may flip a pixel sitting exactly on 0
    assert not got[5].any()


def _outputs(num_classes=3, size=64):
    """Zero-score outputs for a size x size input: every level at logit -10."""
    cls = [torch.full((1, num_classes, size // s, size // s), -10.0) for s in STRIDES]
    box = [torch.full((1, 4, size // s, size // s), float(s)) for s in STRIDES]
    ker = [torch.zeros(1, 169, size // s, size // s) for s in STRIDES]
    protos = torch.zeros(1, 8, size // 8, size // 8)
    return cls, box, ker, protos


def _rectangle_kernel(bias3=-0.5):
    """Dynamic params whose mask logit is relu(F0) - 0.5: W1[0, 2] = 1 (F0 -> ch 0), W2[0, 0] = 1, W3[0, 0] = 1."""
    k = torch.zeros(169)
    k[0 * 10 + 2] = 1.0
    k[80 + 0] = 1.0
    k[144 + 0] = 1.0
    k[168] = bias3
    return k


def test_known_instance_in_input_and_original_pixels():
    cls, box, ker, protos = _outputs()
    # Level 0 (stride 8), cell row 2 col 3 -> prior point (24, 16); class 1 with logit 2.
    cls[0][0, 1, 2, 3] = 2.0
    box[0][0, :, 2, 3] = torch.tensor([8.0, 8.0, 16.0, 16.0])  # -> box (16, 8, 40, 32)
    ker[0][0, :, 2, 3] = _rectangle_kernel()
    protos[0, 0, 1:4, 2:5] = 1.0  # prototype rectangle rows 1-3, cols 2-4 at stride 8
    post = InstancePostProcess()
    (res,) = post(RawOutputs(cls, box, ker, protos))
    assert res["labels"].tolist() == [1]
    torch.testing.assert_close(res["scores"], torch.sigmoid(torch.tensor([2.0])))
    torch.testing.assert_close(res["boxes"], torch.tensor([[16.0, 8.0, 40.0, 32.0]]))
    low_res = protos[0, :1].relu() - 0.5  # the dynamic convs reduce to relu(F0) - 0.5
    assert torch.equal(res["masks"], reference_masks(low_res, 8, (64, 64)))
    rows, cols = res["masks"][0].any(1).nonzero(), res["masks"][0].any(0).nonzero()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 31, 16, 39)  # the rectangle x8 (corners rounded)
    # Original image 32 x 32 letterboxed by x2: everything halves.
    (res,) = post(RawOutputs(cls, box, ker, protos), [ImageMeta((32, 32), (2.0, 2.0), (64, 64))])
    torch.testing.assert_close(res["boxes"], torch.tensor([[8.0, 4.0, 20.0, 16.0]]))
    assert torch.equal(res["masks"], reference_masks(low_res, 8, (64, 64), ImageMeta((32, 32), (2.0, 2.0), (64, 64))))
    rows, cols = res["masks"][0].any(1).nonzero(), res["masks"][0].any(0).nonzero()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 15, 8, 19)


def test_clip_threshold_multilabel_nms_and_cap():
    cls, box, ker, protos = _outputs()
    cls[0][0, 0, 0, 0] = 3.0  # prior (0, 0): two classes above threshold -> two instances
    cls[0][0, 2, 0, 0] = 1.0
    box[0][0, :, 0, 0] = torch.tensor([20.0, 20.0, 100.0, 10.0])  # clipped to [0, 64]
    cls[0][0, 0, 0, 1] = 2.0  # prior (8, 0), same class 0, nearly the same box -> suppressed by NMS
    box[0][0, :, 0, 1] = torch.tensor([28.0, 20.0, 92.0, 10.0])
    cls[1][0, 1, 3, 3] = math.log(0.04 / 0.96)  # score 0.04 < 0.05: dropped
    (res,) = InstancePostProcess()(RawOutputs(cls, box, ker, protos))
    assert res["labels"].tolist() == [0, 2]
    torch.testing.assert_close(res["boxes"], torch.tensor([[0.0, 0.0, 64.0, 10.0]] * 2))
    assert (res["scores"].diff() <= 0).all()
    (res,) = InstancePostProcess(max_per_img=1)(RawOutputs(cls, box, ker, protos))
    assert res["labels"].tolist() == [0]
    # Lower IoU threshold on a different-class duplicate does nothing (class-aware).
    (res,) = InstancePostProcess(iou_thr=0.01)(RawOutputs(cls, box, ker, protos))
    assert res["labels"].tolist() == [0, 2]


def test_zero_area_boxes_dropped_and_empty_result():
    cls, box, ker, protos = _outputs()
    cls[0][0, 0, 0, 0] = 3.0
    box[0][0, :, 0, 0] = 0.0  # a point: width 0 -> dropped
    post = InstancePostProcess()
    (res,) = post(RawOutputs(cls, box, ker, protos))
    assert res["boxes"].shape == (0, 4) and res["masks"].shape == (0, 64, 64) and res["labels"].dtype == torch.int64
    (res,) = post(RawOutputs(cls, box, ker, protos), [ImageMeta((50, 40), (1.0, 1.0), (64, 64))])
    assert res["masks"].shape == (0, 50, 40) and res["masks"].dtype == torch.bool


def test_nms_pre_per_level():
    cls, box, ker, protos = _outputs(num_classes=1)
    cls[0][:] = torch.linspace(0, 1, 64).view(1, 1, 8, 8)  # 64 candidates on level 0
    box[0][:] = 4.0
    (res,) = InstancePostProcess(nms_pre=5, iou_thr=1.0)(RawOutputs(cls, box, ker, protos))
    assert len(res["scores"]) == 5
    torch.testing.assert_close(res["scores"], torch.linspace(0, 1, 64)[-5:].flip(0).sigmoid())
