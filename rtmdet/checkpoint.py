"""Official mmdetection RTMDet-Ins checkpoints <-> our state_dict (spec section 2).

Our module tree mirrors mmdet's names, except in the head, where the shared classification-tower
convs and their per-level BNs are separate modules (``head.cls_convs.i``, ``head.cls_norms.n.i``)
and there is no ``reg_convs`` (an alias of ``cls_convs`` in mmdet). mmdet checkpoints hold every
shared tensor under each of its names (spec 2.3); we read the first and accept the aliases.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

_SHARED_CONV = re.compile(r"head\.cls_convs\.(\d+)\.weight")
_LEVEL_NORM = re.compile(r"head\.cls_norms\.(\d+)\.(\d+)\.(\w+)")


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


def read_checkpoint(path_or_state_dict) -> tuple[dict, str]:
    """Load a file safely (``weights_only=True``: no code runs) and unwrap it to a flat state_dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        if not os.path.isfile(source):
            raise CheckpointError(f"checkpoint file not found: {source}")
        try:
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, truncated, or pickled objects we refuse to run
            raise CheckpointError(
                f"{source} is not a loadable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "Files are read with weights_only=True, which refuses arbitrary pickled objects."
            ) from None
    else:
        source, ckpt = "<state_dict>", path_or_state_dict
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state_dict")
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source} has no state_dict of tensors (top-level keys: {_preview(list(ckpt))})")
    # An mmengine EMA state dict (``ema_state_dict``) prefixes keys with ``module.`` and adds ``steps``.
    if sd and all(k.startswith("module.") or k == "steps" for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items() if k != "steps"}
    return sd, source


def load_mmdet_checkpoint(model: nn.Module, path_or_state_dict, allow_num_classes_mismatch: bool = False) -> LoadReport:
    """Load an official mmdetection RTMDet-Ins checkpoint (or an ImageNet CSPNeXt backbone) into ``model``.

    Accepts a file path or a dict, with or without the ``state_dict`` wrapper, EMA-swapped or an
    ``ema_state_dict``, aliased duplicate keys included. Every tensor is mapped and checked: any
    missing, unexpected or mis-shaped key raises :class:`CheckpointError` listing them. With
    ``allow_num_classes_mismatch`` a checkpoint for another number of classes loads everything
    but the classification layers ``rtm_cls`` (for fine-tuning), and the report says so.
    A backbone-only checkpoint (all keys ``backbone.*``, e.g. ``cspnext-tiny_imagenet_600e.pth``)
    loads into ``model.backbone``; its classifier keys are ignored.
    """
    sd, source = read_checkpoint(path_or_state_dict)
    report = LoadReport(source)
    ours = model.state_dict()
    backbone_only = any(k.startswith("backbone.") for k in sd) and not any(
        k.startswith(("neck.", "bbox_head.")) for k in sd
    )
    if backbone_only:
        ours = {k: v for k, v in ours.items() if k.startswith("backbone.")}
    num_levels = len(getattr(model, "strides", (8, 16, 32)))
    known, missing, mismatched, new_sd = set(), [], [], {}
    for key, value in ours.items():
        names = mmdet_names(key, num_levels)
        known.update(names)
        if names[0] not in sd:
            missing.append(names[0])
            continue
        src = sd[names[0]]
        if src.shape != value.shape:
            if allow_num_classes_mismatch and ".rtm_cls." in key:
                report.skipped.append(key)
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
        parts = [f"cannot load {source} into RTMDet-Ins{'-' + model.size if hasattr(model, 'size') else ''}:"]
        if mismatched:
            parts.append(f"{len(mismatched)} mis-shaped: {_preview(mismatched)}")
            if all(".rtm_cls." in m for m in mismatched):
                parts.append("(only the classification layers differ: pass allow_num_classes_mismatch=True to fine-tune)")
        if missing:
            parts.append(f"{len(missing)} missing: {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_preview(unexpected)}")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(new_sd, strict=False)
    report.loaded = len(new_sd)
    if report.skipped:
        report.skipped = [f"{k} (checkpoint has {sd[mmdet_names(k)[0]].shape[0]} classes, model {model.num_classes})"
                          for k in report.skipped]
    return report


def _preview(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
