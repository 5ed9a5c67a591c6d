"""Build the official mmdetection 3.3.0 RTMDet-Ins next to ours, for the parity tests.

Only importable in the parity venv (see README, "Parity with mmdetection"): mmdet==3.3.0,
mmcv-lite==2.1.0, mmengine==0.10.7. mmcv-lite lacks the compiled ``mmcv._ext``; RTMDet-Ins only
needs its ``nms``, so we register a small pure-torch stand-in (a plain greedy loop, deliberately
independent of our vectorised NMS) before mmdet is imported. Every other op raises if called.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch


def _reference_nms(bboxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0):
    order = scores.argsort(descending=True)
    keep, suppressed = [], torch.zeros(len(order), dtype=torch.bool)
    b = bboxes[order]
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        wh = (torch.minimum(b[i, 2:], b[i + 1:, 2:]) - torch.maximum(b[i, :2], b[i + 1:, :2]) + offset).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (area[i] + area[i + 1:] - inter)
        suppressed[i + 1:] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def _install_ext_stub() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")

    def missing(name):
        def fn(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is not available in mmcv-lite (parity stand-in)")
        return fn

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _reference_nms if name == "nms" else missing(name)

    ext.__getattr__ = getattr_
    sys.modules["mmcv._ext"] = ext


_install_ext_stub()

import mmdet  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

register_all_modules()
CONFIG_DIR = Path(mmdet.__file__).parent / ".mim" / "configs" / "rtmdet"
CONFIGS = {
    "tiny": "rtmdet-ins_tiny_8xb32-300e_coco.py",
    "s": "rtmdet-ins_s_8xb32-300e_coco.py",
    "m": "rtmdet-ins_m_8xb32-300e_coco.py",
    "l": "rtmdet-ins_l_8xb32-300e_coco.py",
    "x": "rtmdet-ins_x_8xb16-300e_coco.py",
}


def load_config(size: str) -> Config:
    return Config.fromfile(str(CONFIG_DIR / CONFIGS[size]))


def build_mmdet_model(size: str, num_classes: int = 80):
    """The official detector, plain BN instead of SyncBN (identical maths on one process), no pretrain."""
    cfg = load_config(size).model
    cfg.backbone.init_cfg = None
    for part in (cfg.backbone, cfg.neck, cfg.bbox_head):
        part.norm_cfg = dict(type="BN")
    cfg.bbox_head.num_classes = num_classes
    model = MODELS.build(cfg)
    model.init_weights()
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-degenerate random weights: random BN statistics/affines and prediction convs that give
    scores spread over (0, 1) instead of the 0.01 prior, and boxes of varied sizes."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
        elif isinstance(m, torch.nn.Conv2d) and "bbox_head" in name:
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if ".rtm_cls." in name or name.endswith("rtm_cls"):
                m.bias.sub_(2.5)
            if ".rtm_reg." in name:
                m.bias.add_(1.5)
