"""Any RTMDet-Ins checkpoint -> a ready model; predictions -> COCO results entries and sprite cut-outs.

Two checkpoint formats are recognised from their keys (files are read with ``weights_only=True``):

* ours: a Lightning checkpoint of ``RTMDetInsModule`` (``state_dict`` keys ``model.*``, the EMA
  weights when trained with the EMA callback). Size, class count and test-time settings come from
  ``hyper_parameters``; class names, input size and resize mode from the datamodule's settings
  (``class_names`` in the hyper-parameters, else the categories of its annotation file if that
  file still exists).
* official mmdetection RTMDet-Ins (``backbone.* / neck.* / bbox_head.*``, with or without the
  ``state_dict`` wrapper, EMA-swapped or ``ema_state_dict``), mapped by ``load_mmdet_checkpoint``.
  The class count is read from ``bbox_head.rtm_cls.0.weight``; class names from
  ``meta.dataset_meta.classes`` when present, else the COCO names for an 80-class head.

The size (tiny ... x) is read from the hyper-parameters or recognised from the tensor shapes
(every size has its own widths); a ``size`` or ``num_classes`` that disagrees with the file raises
:class:`CheckpointError` naming the file, as do missing, unexpected or mis-shaped keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
import torch

from .checkpoint import CheckpointError, _preview, load_mmdet_checkpoint, mmdet_names, read_checkpoint
from .model import SIZES, RTMDetIns

# Label order of mmdetection's CocoDataset (= sorted COCO category ids).
COCO_CLASSES = tuple(
    "person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|stop sign|"
    "parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|backpack|umbrella|"
    "handbag|tie|suitcase|frisbee|skis|snowboard|sports ball|kite|baseball bat|baseball glove|skateboard|"
    "surfboard|tennis racket|bottle|wine glass|cup|fork|knife|spoon|bowl|banana|apple|sandwich|orange|"
    "broccoli|carrot|hot dog|pizza|donut|cake|chair|couch|potted plant|bed|dining table|toilet|tv|laptop|"
    "mouse|remote|keyboard|cell phone|microwave|oven|toaster|sink|refrigerator|book|clock|vase|scissors|"
    "teddy bear|hair drier|toothbrush".split("|")
)
POSTPROCESS_KEYS = ("score_thr", "nms_pre", "iou_thr", "max_per_img", "mask_thr")


@dataclass
class LoadedCheckpoint:
    """A model ready for inference (eval mode, on its device) and what the file says about its data."""

    model: RTMDetIns
    class_names: tuple[str, ...] | None
    format: str  # "lightning" or "mmdet"
    img_size: int | None = None  # input size it was validated at (Lightning checkpoints with a datamodule)
    nearest_resize: bool | None = None


def load_model(ckpt_path, size: str | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu") -> tuple[RTMDetIns, tuple[str, ...] | None]:
    """Load a Lightning or official mmdetection checkpoint; returns (model in eval mode, class names or None)."""
    loaded = load_checkpoint(ckpt_path, size, num_classes, device)
    return loaded.model, loaded.class_names


def load_checkpoint(ckpt_path, size: str | None = None, num_classes: int | None = None,
                    device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Like :func:`load_model`, with the input size and resize mode recorded in a Lightning checkpoint."""
    if size is not None and size not in SIZES:
        raise CheckpointError(f"unknown RTMDet-Ins size {size!r}; choose one of {list(SIZES)}")
    path = os.fspath(ckpt_path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    ckpt = _torch_load(path)
    try:
        sd, _ = read_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("<state_dict>", path)) from None
    if sd and all(k.startswith("model.") for k in sd):
        loaded = _from_lightning(ckpt, sd, path, size, num_classes)
    else:
        loaded = _from_mmdet(ckpt, sd, path, size, num_classes)
    loaded.model.to(device).eval()
    return loaded


def _torch_load(path: str) -> object:
    """torch.load(weights_only=True) with a one-line reason when it fails."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (legacy: a pickle)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle: "
                              f"starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or pickled objects we refuse to run
        msg = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        reason = " ".join(msg.split()).split(". ")[0].rstrip(".")  # its first sentence
        raise CheckpointError(f"{path} is not a loadable PyTorch checkpoint ({type(e).__name__}: {reason}). "
                              "Files are read with weights_only=True, which refuses arbitrary pickled objects."
                              ) from None


def _from_lightning(ckpt: dict, sd: dict, path: str, size: str | None, num_classes: int | None) -> LoadedCheckpoint:
    hp = ckpt.get("hyper_parameters") or {}
    sd = {k[len("model."):]: v for k, v in sd.items()}
    cls_key = "head.rtm_cls.0.weight"
    if cls_key not in sd:
        raise CheckpointError(f"{path}: a Lightning checkpoint without {'model.' + cls_key}: not RTMDet-Ins")
    found_classes = int(hp.get("num_classes") or sd[cls_key].shape[0])
    found_size = hp.get("size") or _recognise_size(sd, found_classes, path, lambda k: k, size)
    _check_requested(path, found_size, found_classes, size, num_classes)
    model = RTMDetIns(found_classes, found_size)
    ours = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in ours.items() if k in sd and sd[k].shape != v.shape]
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    if mismatched or missing or unexpected:
        parts = [f"cannot load {path} into RTMDet-Ins-{found_size} ({found_classes} classes):"]
        for what, keys in (("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what}: {_preview(keys)}")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(sd)
    post = model.postprocess
    for key in POSTPROCESS_KEYS:  # the test-time settings it was validated with
        if key in hp:
            setattr(post, key, hp[key])
    data = ckpt.get("datamodule_hyper_parameters") or {}
    names = hp.get("class_names") or _names_from_ann_files(data, found_classes)
    return LoadedCheckpoint(model, tuple(names) if names else None, "lightning",
                            data.get("img_size"), data.get("nearest_resize"))


def _from_mmdet(ckpt: dict, sd: dict, path: str, size: str | None, num_classes: int | None) -> LoadedCheckpoint:
    cls_key = "bbox_head.rtm_cls.0.weight"
    if cls_key not in sd:
        raise CheckpointError(f"{path} is neither one of our Lightning checkpoints (keys model.*) nor an "
                              f"mmdetection RTMDet-Ins checkpoint (no {cls_key}; keys: {_preview(list(sd))})")
    found_classes = int(sd[cls_key].shape[0])
    found_size = _recognise_size(sd, found_classes, path, lambda k: mmdet_names(k)[0], requested=size)
    _check_requested(path, found_size, found_classes, size, num_classes)
    model = RTMDetIns(found_classes, found_size)
    try:
        load_mmdet_checkpoint(model, sd)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("<state_dict>", path)) from None
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    names = (meta.get("dataset_meta") or {}).get("classes")
    if names is None and found_classes == len(COCO_CLASSES):
        names = COCO_CLASSES
    return LoadedCheckpoint(model, tuple(names) if names else None, "mmdet")


def _mismatches(size: str, num_classes: int, sd: dict, name) -> list[str]:
    """Keys of an RTMDet-Ins-``size`` that ``sd`` lacks or holds with another shape (sd's names)."""
    with torch.device("meta"):  # shapes only, nothing allocated
        ours = RTMDetIns(num_classes, size).state_dict()
    problems = []
    for key, value in ours.items():
        src = sd.get(name(key))
        if src is None:
            problems.append(f"{name(key)} missing")
        elif src.shape != value.shape:
            problems.append(f"{name(key)}: checkpoint {tuple(src.shape)} vs {size} {tuple(value.shape)}")
    return problems


def _recognise_size(sd: dict, num_classes: int, path: str, name, requested: str | None = None) -> str:
    """The one size whose tensor shapes all match ``sd`` (the sizes differ in every width).

    With ``requested`` and no size matching, returns ``requested``: loading then lists the bad keys.
    """
    if requested is not None and not _mismatches(requested, num_classes, sd, name):
        return requested
    problems = {}
    for size in SIZES:
        problems[size] = _mismatches(size, num_classes, sd, name)
        if not problems[size]:
            return size
    if requested is not None:
        return requested
    closest = min(problems, key=lambda s: len(problems[s]))
    raise CheckpointError(f"{path} matches no RTMDet-Ins size ({', '.join(SIZES)}); closest is {closest}, with "
                          f"{len(problems[closest])} missing or mis-shaped keys: {_preview(problems[closest])}")


def _check_requested(path: str, found_size: str, found_classes: int, size: str | None, num_classes: int | None):
    if size is not None and size != found_size:
        raise CheckpointError(f"{path} holds RTMDet-Ins-{found_size} weights, but size {size!r} was requested "
                              f"(leave the size out to use the checkpoint's)")
    if num_classes is not None and num_classes != found_classes:
        raise CheckpointError(f"{path} has a {found_classes}-class head, but num_classes={num_classes} was requested")


def _names_from_ann_files(data_hparams: dict, num_classes: int) -> list[str] | None:
    """Class names (label order = sorted category ids) from the datamodule's annotation file, if still there."""
    for key in ("val_ann_file", "train_ann_file"):
        ann_file = data_hparams.get(key)
        if not ann_file or not os.path.isfile(ann_file):
            continue
        try:
            with open(ann_file, "rb") as f:
                categories = json.load(f)["categories"]
            names = [str(c["name"]) for c in sorted(categories, key=lambda c: int(c["id"]))]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if len(names) == num_classes:
            return names
    return None


# ----------------------------------------------------------------------------- results, cut-outs

def coco_results(pred: dict[str, torch.Tensor], image_id: int, label_to_cat_id=None) -> list[dict]:
    """One image's ``RTMDetIns.predict`` output (original pixels) -> COCO results entries.

    Each: ``image_id``, ``category_id`` (``label_to_cat_id[label]``, or the contiguous label 0..C-1
    when None), ``bbox`` [x, y, w, h] (rounded to 0.01 px), ``score`` (to 1e-5), ``segmentation``
    (compressed RLE, ``counts`` str) and ``area`` (mask pixels) when the prediction has masks.
    """
    boxes = pred["boxes"].detach().float().cpu().reshape(-1, 4)  # (N, 4) xyxy
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores = pred["scores"].detach().float().cpu().tolist()
    labels = pred["labels"].detach().cpu().tolist()
    rles = []
    if pred.get("masks") is not None and len(labels):
        m = pred["masks"].detach().cpu().numpy().astype(np.uint8)  # (N, H, W)
        rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0)))  # wants (H, W, N) Fortran order
    out = []
    for i, (label, box, score) in enumerate(zip(labels, xywh, scores)):
        cat_id = label if label_to_cat_id is None else label_to_cat_id[label]
        r = {"image_id": int(image_id), "category_id": int(cat_id), "bbox": [round(v, 2) for v in box],
             "score": round(score, 5)}
        if rles:
            r["segmentation"] = {"size": [int(s) for s in rles[i]["size"]], "counts": rles[i]["counts"].decode("ascii")}
            r["area"] = int(mask_util.area(rles[i]))
        out.append(r)
    return out


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1), end-exclusive, of a (H, W) bool mask; None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def cutout(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Cut one instance out of an image: RGBA (h, w, 4) uint8 cropped to the mask's tight box.

    image: (H, W, 3) RGB or (H, W, 4) RGBA uint8, original pixels; mask: (H, W) bool. The colour is
    the image's own; alpha is 255 inside the mask and 0 outside (times the image's alpha, if any).
    Returns (rgba, (x0, y0, x1, y1)) or None for an empty mask.
    """
    box = mask_box(mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1]
    alpha = mask[y0:y1, x0:x1].astype(np.uint8) * 255  # (h, w)
    if crop.shape[2] == 4:
        alpha = np.minimum(alpha, crop[..., 3])
    return np.dstack([crop[..., :3], alpha]), box
