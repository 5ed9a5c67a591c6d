"""One function builds the three parts side by side: the network, its training objective, its decoding.

Like DETR's ``build``: nothing mutates another part's settings afterwards. A caller that wants
other test-time settings builds its own ``InstancePostProcess``.
"""

from __future__ import annotations

from .criterion import RTMDetInsCriterion
from .model import RTMDetIns
from .postprocess import InstancePostProcess


def build(
    size: str = "tiny",
    num_classes: int = 80,
    *,
    score_thr: float = 0.05,
    nms_pre: int = 1000,
    iou_thr: float = 0.6,
    max_per_img: int = 100,
    mask_thr: float = 0.5,
    mask_format: str = "dense",
    mask_loss_stride: int = 4,
    proto_stride: int = 8,
) -> tuple[RTMDetIns, RTMDetInsCriterion, InstancePostProcess]:
    """RTMDet-Ins of one of the official sizes (freshly initialised), its criterion and its postprocess.

    The keyword arguments are the test-time settings (defaults: the official ones), the
    mask-loss stride (official: 4) and the prototype stride (official: 8; 4 adds an upsampling
    stage to the mask branch, ``rtmdet/mask_feat.py``).
    """
    model = RTMDetIns(num_classes=num_classes, size=size, proto_stride=proto_stride)
    criterion = RTMDetInsCriterion(num_classes, model.strides, mask_loss_stride=mask_loss_stride)
    postprocess = InstancePostProcess(score_thr, nms_pre, iou_thr, max_per_img, mask_thr, model.strides, mask_format)
    return model, criterion, postprocess
