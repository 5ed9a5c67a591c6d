"""Prototypes at stride 4 (opt-in ``proto_stride=4``): the extra stage, the maths that must not change
with the grid's density, training, decoding, checkpoints and the end-to-end export."""

import numpy as np
import pytest
import torch

from datamodules.sprites import render_image
from rtmdet import InstancePostProcess, build, build_model, load_mmdet_checkpoint, to_mmdet_state_dict
from rtmdet.checkpoint import load_checkpoint
from rtmdet.dynamic_mask import dynamic_mask_logits
from rtmdet.export_e2e import EndToEnd
from rtmdet.lightning_module import RTMDetInsModule
from rtmdet.mask_paste import paste_masks, resize_matrices
from rtmdet.outputs import RawOutputs
from rtmdet.preprocess import letterbox, normalize


def test_stride_4_adds_one_stage_and_doubles_the_prototype_grid():
    torch.manual_seed(0)
    m8, m4 = build_model("tiny", 3), build_model("tiny", 3, proto_stride=4)
    extra = set(m4.state_dict()) - set(m8.state_dict())
    assert extra and all(k.startswith("head.mask_head.upsample_conv.") for k in extra)
    assert set(m8.state_dict()) <= set(m4.state_dict())
    x = torch.randn(1, 3, 96, 128)
    out8, out4 = m8.eval()(x), m4.eval()(x)
    assert out8.mask_protos.shape == (1, 8, 12, 16) and out4.mask_protos.shape == (1, 8, 24, 32)
    assert (out8.proto_stride(8), out4.proto_stride(8), m4.proto_stride) == (8, 4, 4)
    assert [t.shape for t in out4.cls_logits] == [t.shape for t in out8.cls_logits]
    with pytest.raises(ValueError, match="proto_stride must be 8"):
        build_model("tiny", 3, proto_stride=2)


def test_relative_coordinates_do_not_depend_on_the_grid_density():
    """The dynamic convs see rel = (point - grid) / (8 * prior stride) on either grid: on a stride-4
    grid made of the stride-8 prototypes repeated, every other cell holds the stride-8 logits exactly
    (where the coordinates differ, the stride-4 grid's extra cells, the logits differ)."""
    g = torch.Generator().manual_seed(0)
    protos8 = torch.randn(2, 8, 6, 7, generator=g)
    protos4 = protos8.repeat_interleave(2, 2).repeat_interleave(2, 3)  # (2, 8, 12, 14)
    params = torch.randn(5, 169, generator=g)
    points = torch.rand(5, 2, generator=g) * 48
    strides = torch.tensor([8.0, 16, 32, 8, 16])
    img_idx = torch.tensor([0, 1, 0, 1, 1])
    l8 = dynamic_mask_logits(protos8, params, points, strides, img_idx, 8)
    l4 = dynamic_mask_logits(protos4, params, points, strides, img_idx, 4)
    torch.testing.assert_close(l4[:, ::2, ::2], l8, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(l4[:, 1::2, 1::2], l8, atol=1e-3)


def targets(batch: int, size: int) -> list[dict]:
    out = []
    for b in range(batch):
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 8:20, 10:22] = True  # a 12 px sprite
        masks[1, 30 + b:50, 28:60] = True
        out.append({"boxes": torch.tensor([[10.0, 8, 22, 20], [28, 30 + b, 60, 50]]), "labels": torch.tensor([1, 2]),
                    "masks": masks})
    return out


@pytest.mark.parametrize("mask_loss_stride", [1, 2, 4])
def test_criterion_compares_at_the_mask_loss_stride(mask_loss_stride):
    """With stride-4 prototypes the logits are upsampled 4 / mask_loss_stride times (not at all at 4);
    a finer loss stride than the prototypes' works, a coarser one is refused."""
    torch.manual_seed(0)
    model, criterion, _ = build("tiny", 3, proto_stride=4, mask_loss_stride=mask_loss_stride)
    losses = criterion(model(torch.randn(2, 3, 64, 64)), targets(2, 64))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert model.head.mask_head.upsample_conv.conv.weight.grad.abs().sum() > 0  # the new stage learns
    _, coarse, _ = build("tiny", 3, proto_stride=4, mask_loss_stride=8)
    with pytest.raises(ValueError, match="must divide the prototype stride 4"):
        coarse(model(torch.randn(1, 3, 64, 64)), targets(1, 64))


def test_postprocess_pastes_stride_4_prototypes_into_the_original_frame():
    """Same heads, prototypes given at stride 4 as the stride-8 ones repeated: same instances, masks of
    the original size and nearly the same (the paste interpolates from a twice denser grid)."""
    torch.manual_seed(0)
    from benchmarks.latency import busy_head

    model = build_model("tiny", 3).eval()
    busy_head(model)
    image = render_image(np.random.default_rng(0), (100, 140))[0]
    x, meta = letterbox(image, 128)
    with torch.no_grad():
        out8 = model(normalize(x[None]))
    protos4 = out8.mask_protos.repeat_interleave(2, 2).repeat_interleave(2, 3)
    out4 = RawOutputs(out8.cls_logits, out8.box_dists, out8.kernels, protos4)
    pp = InstancePostProcess(max_per_img=20)
    r8, r4 = pp(out8, [meta])[0], pp(out4, [meta])[0]
    assert len(r8["scores"]) == 20
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(r8[k], r4[k]), k
    assert r4["masks"].shape == (20, 100, 140)
    inter = (r8["masks"] & r4["masks"]).flatten(1).sum(1).float()
    union = (r8["masks"] | r4["masks"]).flatten(1).sum(1).float()
    assert (inter / union.clamp(min=1) > 0.8).all()


def test_lightning_step_and_checkpoints_keep_the_prototype_stride(tmp_path):
    torch.manual_seed(0)
    module = RTMDetInsModule("tiny", num_classes=3, proto_stride=4, mask_loss_stride=2, channels_last=False)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    loss = module.training_step((normalize(images), targets(2, 64)), 0)
    assert torch.isfinite(loss)
    path = tmp_path / "p4.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    loaded = load_checkpoint(path)
    assert loaded.model.proto_stride == 4
    for a, b in zip(loaded.model.state_dict().values(), module.model.state_dict().values()):
        assert torch.equal(a, b)
    # Official (stride-8) weights start a stride-4 model: all they have, the new stage kept initialised.
    official = tmp_path / "official.pth"
    torch.save({"state_dict": to_mmdet_state_dict(build_model("tiny", 3))}, official)
    report = load_mmdet_checkpoint(build_model("tiny", 3, proto_stride=4), str(official))
    assert report.skipped and all("upsample_conv" in s for s in report.skipped)
    # Ours in mmdet's layout keeps the stage and loads back as stride 4.
    mm = tmp_path / "p4_mmdet.pth"
    torch.save({"state_dict": to_mmdet_state_dict(module.model)}, mm)
    assert load_checkpoint(mm).model.proto_stride == 4


def test_end_to_end_module_decodes_stride_4_like_predict():
    torch.manual_seed(0)
    from benchmarks.latency import busy_head

    model = build_model("tiny", 3, proto_stride=4).eval()
    busy_head(model)
    image = render_image(np.random.default_rng(1), (128, 128))[0]
    x, _ = letterbox(image, 128)
    settings = {"score_thr": 0.05, "nms_pre": 1000, "iou_thr": 0.6}
    with torch.no_grad():
        want = InstancePostProcess(**settings, max_per_img=30)(model(normalize(x[None])))[0]
        num, boxes, scores, labels, logits = EndToEnd(model, 128, **settings, max_det=30).eval()(x[None])
    n = int(num[0])
    assert n == len(want["scores"]) > 0
    torch.testing.assert_close(boxes[0, :n], want["boxes"], rtol=0, atol=1e-4)
    assert torch.equal(labels[0, :n], want["labels"])
    assert logits.shape[-2:] == (32, 32)  # stride-4 logits
    ry, rx = resize_matrices((32, 32), 4, (128, 128))
    masks = paste_masks(logits[0, :n], ry, rx)
    inter = (masks & want["masks"]).flatten(1).sum(1).float()
    union = (masks | want["masks"]).flatten(1).sum(1).float()
    assert (inter / union.clamp(min=1) >= 0.999).all()
