from pathlib import Path

import pytest
import torch

from rtmdet import CheckpointError, build_model, load_mmdet_checkpoint, to_mmdet_state_dict

# Key, shape, dtype and aliasing of every entry of the official RTMDet-Ins-tiny state_dict (mmdet 3.3.0).
OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "rtmdet-ins-tiny-state-dict.tsv"


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def test_mmdet_layout_matches_official_key_listing():
    rows = [line.rstrip("\n").split("\t") for line in OFFICIAL_KEYS.read_text().splitlines()
            if not line.startswith("#")]
    sd = to_mmdet_state_dict(build_model("tiny"))
    assert set(sd) == {r[0] for r in rows}
    assert len(sd) == 546
    for key, shape, dtype, alias in rows:
        assert _shape(sd[key]) == shape, key
        assert str(sd[key].dtype) == f"torch.{dtype}", key
        if alias:  # aliased keys are the very same tensor
            assert sd[key].data_ptr() == sd[alias].data_ptr(), key


def _randomised(size="tiny", num_classes=80, seed=0):
    torch.manual_seed(seed)
    model = build_model(size, num_classes)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


def test_round_trip_through_mmdet_layout(tmp_path):
    src = _randomised()
    path = tmp_path / "ckpt.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": to_mmdet_state_dict(src)}, path)
    dst = build_model("tiny")
    report = load_mmdet_checkpoint(dst, path)
    assert report.loaded == len(src.state_dict())
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_unwrapped_and_ema_state_dicts():
    src = _randomised(seed=1)
    mm = to_mmdet_state_dict(src)
    for ckpt in (dict(mm), {"module." + k: v for k, v in mm.items()} | {"steps": torch.tensor(5)}):
        dst = build_model("tiny")
        load_mmdet_checkpoint(dst, ckpt)
        assert torch.equal(dst.head.rtm_kernel[2].weight, src.head.rtm_kernel[2].weight)


def test_clear_errors_for_missing_unexpected_misshaped():
    mm = to_mmdet_state_dict(_randomised())
    broken = dict(mm)
    del broken["neck.out_convs.0.conv.weight"]
    broken["bbox_head.rtm_obj.0.weight"] = torch.zeros(1)
    broken["backbone.stem.0.conv.weight"] = torch.zeros(1, 3, 3, 3)
    with pytest.raises(CheckpointError) as e:
        load_mmdet_checkpoint(build_model("tiny"), broken)
    msg = str(e.value)
    assert "neck.out_convs.0.conv.weight" in msg and "missing" in msg
    assert "bbox_head.rtm_obj.0.weight" in msg and "unexpected" in msg
    assert "backbone.stem.0.conv.weight: checkpoint (1, 3, 3, 3) vs model (12, 3, 3, 3)" in msg
    with pytest.raises(CheckpointError, match="mis-shaped"):  # another size
        load_mmdet_checkpoint(build_model("s"), mm)


def test_num_classes_mismatch_for_fine_tuning():
    mm = to_mmdet_state_dict(_randomised(num_classes=80))
    model = build_model("tiny", num_classes=3)
    with pytest.raises(CheckpointError, match="allow_num_classes_mismatch"):
        load_mmdet_checkpoint(model, mm)
    init_cls = model.head.rtm_cls[0].weight.clone()
    report = load_mmdet_checkpoint(model, mm, allow_num_classes_mismatch=True)
    assert len(report.skipped) == 6 and "80 classes, model 3" in str(report)
    assert torch.equal(model.head.rtm_cls[0].weight, init_cls)
    assert torch.equal(model.head.rtm_reg[0].weight, mm["bbox_head.rtm_reg.0.weight"])


def test_backbone_only_imagenet_checkpoint():
    src = _randomised(seed=2)
    sd = {k: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    sd["head.fc.weight"] = torch.zeros(1000, 384)  # the ImageNet classifier is ignored
    model = build_model("tiny")
    neck_before = model.neck.out_convs[0].conv.weight.clone()
    report = load_mmdet_checkpoint(model, {"state_dict": sd})
    assert report.ignored == ["head.fc.weight"]
    assert torch.equal(model.backbone.stage4[2].attention.fc.weight, src.backbone.stage4[2].attention.fc.weight)
    assert torch.equal(model.neck.out_convs[0].conv.weight, neck_before)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes.txt is not a PyTorch checkpoint \(neither a zip archive"):
        load_mmdet_checkpoint(build_model("tiny"), bad)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(b"PK\x03\x04 and then nothing")
    with pytest.raises(CheckpointError, match="cut.pth is not a loadable PyTorch checkpoint"):
        load_mmdet_checkpoint(build_model("tiny"), truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_mmdet_checkpoint(build_model("tiny"), tmp_path / "missing.pth")


def test_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_mmdet_checkpoint(build_model("tiny"), path)


def test_our_lightning_checkpoint_starts_a_fine_tuning_run(tmp_path):
    """A model pretrained here (a Lightning checkpoint, keys model.*) loads into another class count
    like an official file: everything but the classifier, with the same checks."""
    from rtmdet.lightning_module import RTMDetInsModule

    torch.manual_seed(0)
    source = RTMDetInsModule("tiny", num_classes=8)
    with torch.no_grad():
        for t in source.model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    path = tmp_path / "sprites.ckpt"
    torch.save({"state_dict": source.state_dict(), "pytorch-lightning_version": "2.6.0"}, path)
    module = RTMDetInsModule("tiny", num_classes=11, pretrained=str(path), allow_num_classes_mismatch=True)
    got, want = module.model.state_dict(), source.model.state_dict()
    for k, v in want.items():
        if ".rtm_cls." in k:
            assert got[k].shape[0] == 11 and v.shape[0] == 8
        else:
            assert torch.equal(got[k], v), k
    with pytest.raises(CheckpointError, match="allow_num_classes_mismatch"):
        load_mmdet_checkpoint(build_model("tiny", 11), str(path))
    with pytest.raises(CheckpointError, match="mis-shaped"):  # another size: every width differs
        load_mmdet_checkpoint(build_model("s", 8), str(path))
