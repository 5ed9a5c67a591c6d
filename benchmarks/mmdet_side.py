"""mmdetection 3.3.0 worker of ``benchmarks/side_by_side.py`` (runs only in the parity venv).

    .venv-mmdet/bin/python -m benchmarks.mmdet_side --setup FILE [--threads 2] [--warmup 2]

Builds the official RTMDet-Ins (``tests/mmdet_reference.py``: plain BN, the configs' test_cfg),
loads the weights of the setup file strictly, and serves timed runs of its end-to-end
``model.predict`` or of one training step (``model.loss`` -> ``parse_losses`` -> backward ->
AdamW step) over the setup's inputs, as the worker protocol of ``side_by_side.serve`` describes.

NMS: mmcv-lite lacks the compiled ``mmcv._ext``. The parity tests' stand-in is a deliberately
plain Python loop, which would slow mmdet's predict by tens of milliseconds and flatter us. Here
``mmcv._ext.nms`` is a C port of mmcv's ``nms_cpu`` (same sort, same greedy loop, same
``offset``), built with the system C compiler into a temporary folder and called through ctypes.
Without a compiler the Python stand-in is used and ``check.nms`` says so.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.side_by_side import serve
from tests.mmdet_reference import build_mmdet_model  # installs the mmcv._ext stand-in, imports mmdet

from mmdet.structures import DetDataSample  # noqa: E402, I001
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

# mmcv/ops/csrc/pytorch/cpu/nms.cpp (nms_cpu), on boxes already sorted by descending score.
NMS_C = r"""
#include <stdint.h>
void nms_sorted(const float *b, int64_t n, float thr, float offset, uint8_t *keep) {
    for (int64_t i = 0; i < n; i++) {
        if (!keep[i]) continue;
        float ix1 = b[4 * i], iy1 = b[4 * i + 1], ix2 = b[4 * i + 2], iy2 = b[4 * i + 3];
        float iarea = (ix2 - ix1 + offset) * (iy2 - iy1 + offset);
        for (int64_t j = i + 1; j < n; j++) {
            if (!keep[j]) continue;
            float x1 = b[4 * j], y1 = b[4 * j + 1], x2 = b[4 * j + 2], y2 = b[4 * j + 3];
            float xx1 = ix1 > x1 ? ix1 : x1, yy1 = iy1 > y1 ? iy1 : y1;
            float xx2 = ix2 < x2 ? ix2 : x2, yy2 = iy2 < y2 ? iy2 : y2;
            float w = xx2 - xx1 + offset, h = yy2 - yy1 + offset;
            w = w > 0.f ? w : 0.f;
            h = h > 0.f ? h : 0.f;
            float inter = w * h;
            float area = (x2 - x1 + offset) * (y2 - y1 + offset);
            if (inter / (iarea + area - inter) > thr) keep[j] = 0;
        }
    }
}
"""

NMS_CALLS_S: list[float] = []  # time spent in NMS, per call


def _build_c_nms():
    """The compiled NMS as a torch function, or None where no C compiler works."""
    folder = Path(tempfile.mkdtemp(prefix="rtmdet-nms-"))
    (folder / "nms.c").write_text(NMS_C)
    try:
        subprocess.run(["cc", "-O3", "-shared", "-fPIC", "-o", str(folder / "nms.so"), str(folder / "nms.c")],
                       check=True, capture_output=True)
        lib = ctypes.CDLL(str(folder / "nms.so"))
    except (OSError, subprocess.CalledProcessError):
        return None
    lib.nms_sorted.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_void_p]

    def nms(bboxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
        if bboxes.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        order = scores.sort(0, descending=True)[1]  # as nms_cpu
        boxes = bboxes[order].float().contiguous()
        keep = torch.ones(len(order), dtype=torch.uint8)
        lib.nms_sorted(boxes.data_ptr(), len(order), iou_threshold, float(offset), keep.data_ptr())
        return order[keep.bool()]

    return nms


def install_nms() -> str:
    ext = sys.modules["mmcv._ext"]
    fast = _build_c_nms()
    impl = fast if fast is not None else ext.nms  # the module's __getattr__: the Python stand-in

    def timed_nms(*args, **kwargs):
        t0 = time.perf_counter()
        out = impl(*args, **kwargs)
        NMS_CALLS_S.append(time.perf_counter() - t0)
        return out

    ext.nms = timed_nms  # an attribute wins over the stand-in module's __getattr__
    return "C port of mmcv nms_cpu (ctypes)" if fast is not None else "pure-Python stand-in (no C compiler): slow"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setup", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variant", default="plain", choices=["plain", "channels_last"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nms_impl = install_nms()
    data = torch.load(args.setup, weights_only=True)
    model = build_mmdet_model(data["size"])
    model.load_state_dict(data["state_dict"], strict=True)
    images = data["images"]
    if args.variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    h, w = images.shape[-2:]
    meta = {"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w), "batch_input_shape": (h, w),
            "scale_factor": (1.0, 1.0)}
    t0 = time.perf_counter()
    if data["task"] == "predict":
        model.eval()
        samples = [DetDataSample(metainfo=meta)]

        def step(_):
            with torch.no_grad():  # as mmengine's test loop
                return model.predict(images, samples, rescale=True)

        res = step(None)[0].pred_instances
        check = {"detections": len(res.scores), "top_scores": [round(float(s), 4) for s in res.scores[:5]],
                 "mean_mask_fraction": round(res.masks.float().mean().item(), 4),
                 "masks_shape": list(res.masks.shape), "nms": nms_impl}
        setup = None
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
        gts = [(t["boxes"], t["labels"], t["masks"].numpy().astype(np.uint8)) for t in data["targets"]]

        def setup():  # what mmdet's dataloader hands over; its loss converts the masks in place
            samples = []
            for boxes, labels, masks in gts:
                s = DetDataSample(metainfo=meta)
                s.gt_instances = InstanceData(bboxes=boxes.clone(), labels=labels.clone(),
                                              masks=BitmapMasks(masks, h, w))
                samples.append(s)
            return samples

        def step(samples):
            losses = model.loss(images, samples)
            loss, log_vars = model.parse_losses(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {k: round(float(log_vars[k]), 5) for k in ("loss_cls", "loss_bbox", "loss_mask")}

        check = {"first_step_losses": step(setup())}
    check["first_call_s"] = round(time.perf_counter() - t0, 2)
    check["variant"] = args.variant
    if NMS_CALLS_S:
        check["nms_ms"] = round(statistics.median(NMS_CALLS_S) * 1e3, 2)
    serve(step, check, args.warmup, setup)


if __name__ == "__main__":
    main()
