"""``python -m experiments.export --end-to-end``: write ``rtmdet.export_e2e.EndToEnd`` and check it.

ONNX goes through the TorchScript exporter (``dynamo=False``, as the raw export) with the NMS op
written as ``NonMaxSuppression``; the batch dimension is dynamic. The settings the runner needs
(input size, letterbox mode, class names, thresholds, output layout) travel in the file: ONNX
``metadata_props`` key ``rtmdet_e2e``, or ``rtmdet_e2e.json`` among a .pt2's extra files.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from datamodules.sprites import render_image
from rtmdet.export_e2e import EndToEnd, register_onnx_symbolic
from rtmdet.checkpoint import LoadedCheckpoint
from rtmdet.preprocess import letterbox

METADATA_KEY = "rtmdet_e2e"
FLAGS = {"max_det": "--max-det", "score_thr": "--score-thr", "nms_pre": "--nms-pre", "iou_thr": "--iou-thr"}
TOLERANCE = {"boxes": 1e-3, "scores": 1e-4, "mask_logits": 1e-3}  # |a - e| / max(1, |e|); boxes in pixels
MASK_PIXEL_TOLERANCE = 1e-3  # fraction of input-resolution mask pixels that may differ


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for end-to-end settings out of range, or given without ``--end-to-end``."""
    given = [flag for key, flag in FLAGS.items() if getattr(args, key) is not None]
    if not args.end_to_end:
        if given or args.masks != "logits":
            parser.error(f"{', '.join(given) or '--masks'} only apply with --end-to-end")
        return
    for key in ("max_det", "nms_pre"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"{FLAGS[key]} must be at least 1, got {getattr(args, key)}")
    if args.score_thr is not None and not 0 <= args.score_thr < 1:
        parser.error(f"--score-thr must be in [0, 1), got {args.score_thr}")
    if args.iou_thr is not None and not 0 <= args.iou_thr <= 1:
        parser.error(f"--iou-thr must be in [0, 1], got {args.iou_thr}")


def build(loaded: LoadedCheckpoint, img_size: int, args: argparse.Namespace) -> EndToEnd:
    """The end-to-end module: the checkpoint's test-time settings, overridden by the flags given."""
    post = loaded.postprocess()  # the checkpoint's test-time settings
    value = {key: getattr(args, key) for key in FLAGS}
    return EndToEnd(
        loaded.model, img_size,
        score_thr=post.score_thr if value["score_thr"] is None else value["score_thr"],
        nms_pre=value["nms_pre"] or post.nms_pre,
        iou_thr=post.iou_thr if value["iou_thr"] is None else value["iou_thr"],
        max_det=value["max_det"] or post.max_per_img,
        mask_thr=post.mask_thr, mask_output=args.masks,
    ).eval()


def metadata(module: EndToEnd, class_names=None, nearest_resize: bool = False) -> dict:
    """What a runner needs besides the graph (JSON-serialisable): class names (default class0 ...),
    letterbox settings, the baked test-time settings and the output layout."""
    model = module.model
    names = class_names or [f"class{i}" for i in range(model.num_classes)]
    return {
        "format": "rtmdet_e2e/1", "size": model.size, "num_classes": model.num_classes, "class_names": list(names),
        "img_size": module.img_size, "nearest_resize": bool(nearest_resize), "pad_value": 114,
        "score_thr": module.score_thr, "nms_pre": module.nms_pre, "iou_thr": module.iou_thr,
        "max_det": module.max_det, "mask_thr": module.mask_thr, "mask_output": module.mask_output,
        "mask_stride": model.proto_stride, "outputs": list(module.output_names),
    }


def sample_images(img_size: int, num: int, seed: int = 0) -> torch.Tensor:
    """``num`` letterboxed sprite scenes (uint8 (num, 3, S, S)) of various aspect ratios."""
    rng = np.random.default_rng(seed)
    shapes = [(img_size, img_size), (img_size * 3 // 4, img_size), (img_size, img_size // 2)]
    return torch.stack([letterbox(render_image(rng, shapes[i % 3])[0], img_size)[0] for i in range(num)])


def write_onnx(module: EndToEnd, example: torch.Tensor, path: Path, opset: int, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install -e '.[export]'") from None
    register_onnx_symbolic(opset)
    names = list(module.output_names)
    dynamic = {"images": {0: "batch"}, **{name: {0: "batch"} for name in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic, legacy-exporter notice
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=names, dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_program(module: EndToEnd, example: torch.Tensor, path: Path, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path), extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> list[np.ndarray]:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        return [o.numpy() for o in torch.export.load(str(path)).module()(images)]


def compare(names: tuple[str, ...], expected: list[np.ndarray], actual: list[np.ndarray]) -> dict[str, float]:
    """Max errors of the exported outputs; raises when the instances differ (count or labels)."""
    exp, act = dict(zip(names, expected)), dict(zip(names, actual))
    if not (np.array_equal(exp["num_dets"], act["num_dets"]) and np.array_equal(exp["labels"], act["labels"])):
        raise RuntimeError(f"the exported graph keeps other instances than PyTorch: num_dets "
                           f"{act['num_dets'].tolist()} vs {exp['num_dets'].tolist()} (or other labels)")
    errors = {k: float((np.abs(act[k] - exp[k]) / np.maximum(np.abs(exp[k]), 1)).max(initial=0))
              for k in ("boxes", "scores", "mask_logits") if k in exp}
    if "masks" in exp:
        errors["masks"] = float((act["masks"] != exp["masks"]).mean())
    return errors


def export(loaded: LoadedCheckpoint, img_size: int, output: Path, fmt: str, args: argparse.Namespace) -> dict:
    """Write the end-to-end export of ``loaded`` to ``output`` (``fmt`` onnx or torch_export), verify it."""
    module = build(loaded, img_size, args)
    meta = metadata(module, loaded.class_names, loaded.nearest_resize)
    example = sample_images(img_size, 2)  # batch 2: torch.export specialises a size-1 dimension
    with torch.no_grad():
        if fmt == "onnx":
            write_onnx(module, example, output, args.opset, meta)
        else:
            write_program(module, example, output, meta)
    info = {"output": str(output), "format": fmt, "img_size": img_size, "size": loaded.model.size,
            "num_classes": loaded.model.num_classes, "max_det": module.max_det, "outputs": meta["outputs"],
            "verified": None}
    if args.verify:
        if fmt == "onnx":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                print("onnxruntime not installed: not verified (pip install -e '.[export]')", file=sys.stderr)
                return info
        images = sample_images(img_size, 3, seed=1)  # another batch size than the example
        with torch.no_grad():
            expected = [o.numpy() for o in module(images)]
        errors = compare(module.output_names, expected, run_exported(output, fmt, images))
        info["max_error"] = errors
        info["num_dets"] = expected[0].tolist()
        limits = {**TOLERANCE, "masks": MASK_PIXEL_TOLERANCE}
        info["verified"] = all(v <= limits[k] for k, v in errors.items())
        if not info["verified"]:
            raise RuntimeError(f"exported outputs differ from PyTorch by more than {limits}: {errors}")
    return info
