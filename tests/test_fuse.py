"""``RTMDetIns.fuse``: BatchNorm folded into the convs gives the same outputs, in place, for inference only."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.latency import busy_head
from experiments import predict
from rtmdet import CheckpointError, build_model, load_mmdet_checkpoint, to_mmdet_state_dict
from rtmdet.fuse import fold_conv_bn
from rtmdet.preprocess import ImageMeta


@torch.no_grad()
def random_model(size: str = "tiny", seed: int = 0):
    """Non-trivial BN statistics and affines everywhere, a head that predicts many instances."""
    torch.manual_seed(seed)
    model = build_model(size)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    busy_head(model, seed)
    return model.eval()


def images(batch: int = 2, size: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def has_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())


def test_fold_conv_bn_grouped_with_bias_channels_last():
    conv = torch.nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6, bias=True)  # depthwise, with a bias
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.2, 3)
    conv, bn = conv.to(memory_format=torch.channels_last), bn.to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 17, 13).contiguous(memory_format=torch.channels_last)
    fused = fold_conv_bn(conv, bn)
    assert fused.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_fused_raw_outputs_match():
    model = random_model()
    x = images()
    with torch.no_grad():
        ref = model(x)
        out = model.fuse()(x)
    for name, atol in (("cls_logits", 1e-4), ("box_dists", 1e-3), ("kernels", 1e-4)):  # box_dists x stride 32
        for a, b in zip(getattr(out, name), getattr(ref, name)):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
    torch.testing.assert_close(out.mask_protos, ref.mask_protos, atol=1e-4, rtol=0)
    assert not has_batchnorm(model)


def test_fused_predict_matches():
    model = random_model(seed=2)
    x = images(seed=3)
    metas = [ImageMeta((100, 128), (1.0, 1.0), tuple(x.shape[-2:])),
             ImageMeta((256, 200), (0.5, 0.5), tuple(x.shape[-2:]))]
    ref = model.predict(x, metas)
    out = copy.deepcopy(model).fuse().predict(x, metas)
    assert sum(len(r["scores"]) for r in ref) > 20
    for a, b in zip(out, ref):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
        assert a["masks"].shape == b["masks"].shape
        # Instances whose score ties with another's may come in either order; the others match one to one.
        ties = (a["scores"][:, None] - a["scores"][None, :]).abs().lt(1e-5).sum(1) > 1
        assert (~ties).sum() > 5
        for i in (~ties).nonzero()[:, 0]:
            j = (b["scores"] - a["scores"][i]).abs().argmin()
            assert a["labels"][i] == b["labels"][j]
            torch.testing.assert_close(a["boxes"][i], b["boxes"][j], atol=1e-3, rtol=0)
            assert (a["masks"][i] != b["masks"][j]).float().mean() < 1e-3  # pixels at the threshold may flip


def test_fuse_in_place_idempotent_and_state_dict_untouched():
    model = random_model(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refs = model.state_dict()  # tensors that alias the model's parameters
    x = images(seed=5)
    assert model.fuse() is model
    for k, v in refs.items():  # fusing wrote into no existing tensor
        assert torch.equal(v, before[k]), k
    fused_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        once = model(x)
        twice = model.fuse()(x)
    assert model.state_dict().keys() == fused_sd.keys()
    assert all(torch.equal(v, fused_sd[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(once.cls_logits, twice.cls_logits))
    # Checkpoints load into unfused models: the original weights round-trip, the fused tree refuses.
    fresh = build_model("tiny").eval()
    load_mmdet_checkpoint(fresh, to_mmdet_state_dict(before))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(CheckpointError, match=r"cannot load .* into RTMDet-Ins-tiny:[\s\S]* missing: "
                                              r"backbone\.stem\.0\.conv\.bias"):
        load_mmdet_checkpoint(model, to_mmdet_state_dict(before))  # BN folded: conv biases, no BN weights
    assert all(torch.equal(v, fused_sd[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_fuse_refuses_training_mode():
    model = build_model("tiny").train()
    with pytest.raises(RuntimeError, match="inference only.*model.eval"):
        model.fuse()
    assert has_batchnorm(model)


def test_predict_cli_fuse_same_results(tmp_path):
    model = random_model(seed=6)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": to_mmdet_state_dict(model)}, ckpt)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(src / f"im{i}.png")
    results = []
    for flags in ([], ["--fuse"]):
        out = tmp_path / f"out{len(flags)}"
        assert predict.main(["--ckpt", str(ckpt), "--input", str(src), "--output", str(out), "--img-size", "128",
                             "--score-thr", "0.05", "--device", "cpu", *flags]) == 0
        results.append(json.loads((out / "results.json").read_text()))
    a, b = results
    assert len(a) > 5 and len(a) == len(b)
    assert np.allclose(sorted(r["score"] for r in a), sorted(r["score"] for r in b), atol=1e-5)
    # Instances whose score ties with another's may swap places (and NMS survivors); the others are identical.
    def same_image_and_score(r, o):
        return r["file_name"] == o["file_name"] and abs(r["score"] - o["score"]) < 1e-5

    unique = [r for r in a if sum(same_image_and_score(r, o) for o in a) == 1]
    assert len(unique) > 5
    for r in unique:
        (match,) = [o for o in b if same_image_and_score(r, o)]
        assert (match["category_id"], match["segmentation"]["counts"]) == (
            r["category_id"], r["segmentation"]["counts"])
        assert np.allclose(match["bbox"], r["bbox"], atol=1e-2)
