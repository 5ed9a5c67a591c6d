"""Reading and writing checkpoints: ours (Lightning) and official mmdetection RTMDet-Ins, in one place.

Two formats are recognised from their keys. Files are read with ``weights_only=True`` (no pickled
code runs):

* ours: a Lightning checkpoint of ``RTMDetInsModule`` (``state_dict`` keys ``model.*``, the EMA
  weights when trained with the EMA callback). Size, class count and test-time settings come from
  ``hyper_parameters``; class names, input size and resize mode from the datamodule's settings
  (``class_names`` in the hyper-parameters, else the categories of its annotation file if that
  file still exists).
* official mmdetection RTMDet-Ins (``backbone.* / neck.* / bbox_head.*``, with or without the
  ``state_dict`` wrapper, EMA-swapped or ``ema_state_dict``). Our module tree mirrors mmdet's
  names, except in the head, where the shared classification-tower convs and their per-level BNs
  are separate modules (``head.cls_convs.i``, ``head.cls_norms.n.i``) and there is no
  ``reg_convs`` (an alias of ``cls_convs`` in mmdet). mmdet checkpoints hold every shared tensor
  under each of its names (docs/architecture.md#checkpoint-key-layout); we read the first and
  accept the aliases. The class count is read from ``bbox_head.rtm_cls.0.weight``; class names
  from ``meta.dataset_meta.classes`` when present, else the COCO names for an 80-class head.

The size (tiny ... x) is read from the hyper-parameters or recognised from the tensor shapes
(every size has its own widths). Anything that does not fit raises :class:`CheckpointError`
naming the file and listing the missing, unexpected or mis-shaped keys.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .model import SIZES, RTMDetIns
from .postprocess import TEST_SETTINGS, InstancePostProcess

_SHARED_CONV = re.compile(r"head\.cls_convs\.(\d+)\.weight")
_LEVEL_NORM = re.compile(r"head\.cls_norms\.(\d+)\.(\d+)\.(\w+)")


UPSAMPLE_STAGE = "mask_head.upsample_conv."  # the keys of proto_stride=4's extra stage


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message lists the offending keys."""


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)  # model keys deliberately left untouched
    ignored: list[str] = field(default_factory=list)  # checkpoint keys not used (aliases excluded)

    def __str__(self) -> str:
        msg = f"loaded {self.loaded} tensors from {self.source}"
        if self.skipped:
            msg += f"; not loaded (kept initialised): {', '.join(self.skipped)}"
        if self.ignored:
            msg += f"; ignored checkpoint keys: {_preview(self.ignored)}"
        return msg


def mmdet_names(key: str, num_levels: int = 3) -> list[str]:
    """Our state_dict key -> its mmdet key(s), the first being the one we read (the rest are aliases)."""
    if m := _SHARED_CONV.fullmatch(key):
        i = m.group(1)
        return [f"bbox_head.{tower}.{n}.{i}.conv.weight" for tower in ("cls_convs", "reg_convs") for n in range(num_levels)]
    if m := _LEVEL_NORM.fullmatch(key):
        n, i, p = m.groups()
        return [f"bbox_head.{tower}.{n}.{i}.bn.{p}" for tower in ("cls_convs", "reg_convs")]
    if key.startswith("head."):
        return ["bbox_head." + key[len("head."):]]
    return [key]


def to_mmdet_state_dict(model_or_state_dict: nn.Module | dict) -> OrderedDict:
    """Our weights in mmdet's key layout, aliases included (what mmdet's own ``state_dict()`` gives)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    out = OrderedDict()
    for key, value in sd.items():
        for name in mmdet_names(key):
            out[name] = value
    return out


def torch_load(path: str | os.PathLike) -> object:
    """``torch.load(weights_only=True)`` of a file, with a one-line reason naming it when that fails."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
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


def read_checkpoint(path_or_checkpoint, source: str | None = None) -> tuple[dict, str]:
    """A file (read safely, see :func:`torch_load`) or a loaded checkpoint -> (flat state_dict, source).

    ``source`` names a loaded checkpoint in messages (default: its path, or ``<state_dict>``).
    """
    if isinstance(path_or_checkpoint, (str, os.PathLike)):
        source = source or os.fspath(path_or_checkpoint)
        ckpt = torch_load(path_or_checkpoint)
    else:
        source, ckpt = source or "<state_dict>", path_or_checkpoint
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state_dict")
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source} has no state_dict of tensors (top-level keys: {_preview(list(ckpt))})")
    # An mmengine EMA state dict (``ema_state_dict``) prefixes keys with ``module.`` and adds ``steps``.
    if sd and all(k.startswith("module.") or k == "steps" for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items() if k != "steps"}
    return sd, source


def _key_report(header: str, mismatched: list[str], missing: list[str], unexpected: list[str]) -> CheckpointError:
    """One error listing the mis-shaped, missing and unexpected keys under ``header``."""
    parts = [header]
    for what, keys in (("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what}: {_preview(keys)}")
    if mismatched and all(".rtm_cls." in m for m in mismatched):
        parts.append("(only the classification layers differ: pass allow_num_classes_mismatch=True to fine-tune)")
    return CheckpointError("\n  ".join(parts))


def load_mmdet_checkpoint(model: nn.Module, path_or_state_dict, allow_num_classes_mismatch: bool = False,
                          source: str | None = None) -> LoadReport:
    """Load an official mmdetection RTMDet-Ins checkpoint (or an ImageNet CSPNeXt backbone) into ``model``.

    Accepts a file path or a dict, with or without the ``state_dict`` wrapper, EMA-swapped or an
    ``ema_state_dict``, aliased duplicate keys included. Every tensor is mapped and checked: any
    missing, unexpected or mis-shaped key raises :class:`CheckpointError` listing them. With
    ``allow_num_classes_mismatch`` a checkpoint for another number of classes loads everything
    but the classification layers ``rtm_cls`` (for fine-tuning), and the report says so.
    A backbone-only checkpoint (all keys ``backbone.*``, e.g. ``cspnext-tiny_imagenet_600e.pth``)
    loads into ``model.backbone``; its classifier keys are ignored. One of our Lightning checkpoints
    (keys ``model.*``, e.g. a model pretrained on the procedural sprites) loads the same way, with
    the same checks, so it can start a fine-tuning run too.
    """
    sd, source = read_checkpoint(path_or_state_dict, source)
    report = LoadReport(source)
    ours = model.state_dict()
    num_levels = len(getattr(model, "strides", (8, 16, 32)))
    if sd and all(k.startswith("model.") for k in sd):  # ours: our module tree, named as mmdet names it
        sd = {mmdet_names(k[len("model."):], num_levels)[0]: v for k, v in sd.items()}
    backbone_only = any(k.startswith("backbone.") for k in sd) and not any(
        k.startswith(("neck.", "bbox_head.")) for k in sd
    )
    if backbone_only:
        ours = {k: v for k, v in ours.items() if k.startswith("backbone.")}
    known, missing, mismatched, new_sd = set(), [], [], {}
    new_stage = not any(UPSAMPLE_STAGE in k for k in sd)  # a stride-8 file into a stride-4 model
    for key, value in ours.items():
        names = mmdet_names(key, num_levels)
        known.update(names)
        if names[0] not in sd:
            if new_stage and UPSAMPLE_STAGE in key:
                report.skipped.append(f"{key} (a layer of proto_stride=4 the checkpoint has not)")
                continue
            missing.append(names[0])
            continue
        src = sd[names[0]]
        if src.shape != value.shape:
            if allow_num_classes_mismatch and ".rtm_cls." in key:
                report.skipped.append(f"{key} (checkpoint has {src.shape[0]} classes, model {value.shape[0]})")
                continue
            mismatched.append(f"{names[0]}: checkpoint {tuple(src.shape)} vs model {tuple(value.shape)}")
            continue
        new_sd[key] = src
    unexpected = [k for k in sd if k not in known and not k.startswith("data_preprocessor.")]
    if backbone_only:
        report.ignored, unexpected = [k for k in unexpected if not k.startswith("backbone.")], [
            k for k in unexpected if k.startswith("backbone.")
        ]
    if missing or unexpected or mismatched:
        name = f"RTMDet-Ins-{model.size}" if hasattr(model, "size") else "RTMDet-Ins"
        raise _key_report(f"cannot load {source} into {name}:", mismatched, missing, unexpected)
    model.load_state_dict(new_sd, strict=False)
    report.loaded = len(new_sd)
    return report


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


@dataclass
class LoadedCheckpoint:
    """A model ready for inference (eval mode, on its device) and what the file says about its data."""

    model: RTMDetIns
    class_names: tuple[str, ...] | None
    format: str  # "lightning" or "mmdet"
    img_size: int | None = None  # input size it was validated at (Lightning checkpoints with a datamodule)
    nearest_resize: bool | None = None
    test_settings: dict = field(default_factory=dict)  # the test-time settings it was validated with

    def postprocess(self, **overrides) -> InstancePostProcess:
        """A postprocess with the checkpoint's test-time settings (official defaults for the rest),
        ``overrides`` (e.g. ``score_thr=0.3``, ``mask_format="crops"``) applied."""
        return InstancePostProcess(**{**self.test_settings, "strides": self.model.strides, **overrides})


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
    ckpt = torch_load(path)
    sd, _ = read_checkpoint(ckpt, source=path)
    if sd and all(k.startswith("model.") for k in sd):
        loaded = _from_lightning(ckpt, sd, path, size, num_classes)
    else:
        loaded = _from_mmdet(ckpt, sd, path, size, num_classes)
    loaded.model.to(device).eval()
    return loaded


def _from_lightning(ckpt: dict, sd: dict, path: str, size: str | None, num_classes: int | None) -> LoadedCheckpoint:
    hp = ckpt.get("hyper_parameters") or {}
    sd = {k[len("model."):]: v for k, v in sd.items()}
    cls_key = "head.rtm_cls.0.weight"
    if cls_key not in sd:
        raise CheckpointError(f"{path}: a Lightning checkpoint without {'model.' + cls_key}: not RTMDet-Ins")
    found_classes = int(hp.get("num_classes") or sd[cls_key].shape[0])
    found_size = hp.get("size") or _recognise_size(sd, found_classes, path, lambda k: k, size)
    _check_requested(path, found_size, found_classes, size, num_classes)
    model = RTMDetIns(found_classes, found_size, _proto_stride(sd))
    ours = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in ours.items() if k in sd and sd[k].shape != v.shape]
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    if mismatched or missing or unexpected:
        raise _key_report(f"cannot load {path} into RTMDet-Ins-{found_size} ({found_classes} classes):",
                          mismatched, missing, unexpected)
    model.load_state_dict(sd)
    test_settings = {k: hp[k] for k in TEST_SETTINGS if k in hp}  # the settings it was validated with
    data = ckpt.get("datamodule_hyper_parameters") or {}
    names = hp.get("class_names") or _names_from_ann_files(data, found_classes)
    return LoadedCheckpoint(model, tuple(names) if names else None, "lightning",
                            data.get("img_size"), data.get("nearest_resize"), test_settings)


def _from_mmdet(ckpt: dict, sd: dict, path: str, size: str | None, num_classes: int | None) -> LoadedCheckpoint:
    cls_key = "bbox_head.rtm_cls.0.weight"
    if cls_key not in sd:
        raise CheckpointError(f"{path} is neither one of our Lightning checkpoints (keys model.*) nor an "
                              f"mmdetection RTMDet-Ins checkpoint (no {cls_key}; keys: {_preview(list(sd))})")
    found_classes = int(sd[cls_key].shape[0])
    found_size = _recognise_size(sd, found_classes, path, lambda k: mmdet_names(k)[0], requested=size)
    _check_requested(path, found_size, found_classes, size, num_classes)
    model = RTMDetIns(found_classes, found_size, _proto_stride(sd))
    load_mmdet_checkpoint(model, sd, source=path)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    names = (meta.get("dataset_meta") or {}).get("classes")
    if names is None and found_classes == len(COCO_CLASSES):
        names = COCO_CLASSES
    return LoadedCheckpoint(model, tuple(names) if names else None, "mmdet")


def _proto_stride(sd: dict) -> int:
    """4 when the weights hold the mask branch's upsampling stage (``proto_stride=4``), else 8."""
    return 4 if any(UPSAMPLE_STAGE in k for k in sd) else 8


def _mismatches(size: str, num_classes: int, sd: dict, name) -> list[str]:
    """Keys of an RTMDet-Ins-``size`` that ``sd`` lacks or holds with another shape (sd's names)."""
    with torch.device("meta"):  # shapes only, nothing allocated
        ours = RTMDetIns(num_classes, size, _proto_stride(sd)).state_dict()
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


def _preview(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
