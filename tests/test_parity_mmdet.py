"""Parity with mmdetection 3.3.0 on identical random weights (runs only in the parity venv).

    /path/to/parity-venv/bin/python -m pytest -m parity tests/test_parity_mmdet.py
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmdet", reason="parity tests need mmdet 3.3.0 (see README: Parity with mmdetection)")

from rtmdet import build_model, load_mmdet_checkpoint  # noqa: E402
from rtmdet.box_ops import box_iou  # noqa: E402
from rtmdet.preprocess import ImageMeta  # noqa: E402

from .mmdet_reference import build_mmdet_model, randomize  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("two_threads")]


def _pair(size: str, seed: int = 0):
    ref = build_mmdet_model(size).eval()
    randomize(ref, seed)
    ours = build_model(size).eval()
    load_mmdet_checkpoint(ours, ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("size", ["tiny", "s"])
def test_raw_outputs_match(size):
    ref, ours = _pair(size)
    x = torch.randn(2, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_r, box_r, ker_r, protos_r = ref.bbox_head(ref.neck(ref.backbone(x)))
        out = ours(x)
    for a, b in zip(out.cls_logits, cls_r):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    for a, b in zip(out.box_dists, box_r):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=0)
    for a, b in zip(out.kernels, ker_r):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    torch.testing.assert_close(out.mask_protos, protos_r, atol=1e-3, rtol=0)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@pytest.mark.parametrize("size", ["tiny", "s"])
def test_postprocessed_detections_match(size):
    from mmengine.config import ConfigDict

    from .mmdet_reference import load_config

    ref, ours = _pair(size, seed=3)
    x = torch.randn(2, 3, 320, 320, generator=torch.Generator().manual_seed(4))
    # Two letterboxed originals: 250 x 300 (h, w) and 480 x 200, resized to fit 320.
    metas = []
    for h, w in [(250, 300), (480, 200)]:
        s = min(320 / h, 320 / w)
        nh, nw = int(h * s + 0.5), int(w * s + 0.5)
        metas.append(ImageMeta((h, w), (nw / w, nh / h), (320, 320)))
    mm_metas = [
        {"img_shape": (320, 320), "ori_shape": m.orig_size, "scale_factor": m.scale_factor, "pad_shape": (320, 320)}
        for m in metas
    ]
    test_cfg = ConfigDict(load_config(size).model.test_cfg)
    with torch.no_grad():
        feats = ref.bbox_head(ref.neck(ref.backbone(x)))
        ref_results = ref.bbox_head.predict_by_feat(*feats, batch_img_metas=mm_metas, cfg=test_cfg, rescale=True)
        our_results = ours.predict(x, metas)
    total = 0
    for r, o, m in zip(ref_results, our_results, metas):
        n = len(r.scores)
        assert n > 10, "random weights should give plenty of detections"
        assert len(o["scores"]) == n
        total += n
        # Match each reference detection to ours (equal scores may come in either order).
        same = (o["labels"][None, :] == r.labels[:, None]) & ((o["scores"][None, :] - r.scores[:, None]).abs() < 1e-3)
        iou = box_iou(r.bboxes, o["boxes"]) * same  # (n_ref, n_ours)
        best_iou, match = iou.max(dim=1)
        assert len(set(match.tolist())) == n, "one-to-one match"
        assert best_iou.min() > 0.98
        assert o["masks"].shape == r.masks.shape == (n, *m.orig_size)
        assert _mask_iou(o["masks"][match], r.masks).mean() > 0.99
    assert total > 0
