"""Export RTMDet-Ins to ONNX or to a ``torch.export`` program (.pt2): the raw network, or end to end.

    python -m experiments.export --ckpt PATH --output model.onnx [--img-size 640] [--size tiny]
        [--format onnx|torch_export] [--opset 17] [--no-verify]
    python -m experiments.export --ckpt PATH --output model.onnx --end-to-end [--max-det 100]
        [--score-thr 0.05] [--nms-pre 1000] [--iou-thr 0.6] [--masks logits|input]

``--end-to-end`` writes ``rtmdet.export_e2e.EndToEnd``: letterboxed RGB uint8 ``images``
(B, 3, S, S) in, normalisation, network, NMS and dynamic masks inside, a padded set of instances
per image out (``num_dets``, ``boxes``, ``scores``, ``labels``, ``mask_logits`` or ``masks``; see
that module). The test-time settings default to the checkpoint's; the ONNX file carries them, the
class names and the letterbox settings as metadata (``rtmdet_e2e``, JSON) for
``experiments.onnx_predict``. It is checked against the PyTorch module on three images.

Without ``--end-to-end``, the raw network (no postprocessing):

Input ``images``: (B, 3, S, S) float32, BGR, normalised (``rtmdet.preprocess``: letterbox to S,
pad 114, ``normalize``); the batch dimension is dynamic, S is fixed at ``--img-size`` (a multiple of
32). Four outputs, flattened over the levels (strides 8, 16, 32) in prior order, P = sum_l (S/s_l)^2:

* ``cls_logits``  (B, P, C): class logits, before the sigmoid;
* ``box_dists``   (B, P, 4): (left, top, right, bottom) distances in input pixels from the prior point;
* ``kernels``     (B, P, 169): dynamic mask-conv parameters (``rtmdet.dynamic_mask`` layout);
* ``mask_protos`` (B, 8, S/8, S/8): mask prototypes at stride 8.

Prior p of a level with stride s sits at (j*s, i*s) for cell (row i, col j), row-major, levels in
order (``rtmdet.priors.grid_priors``); ``rtmdet.InstancePostProcess`` turns these tensors into
instances. The exported file is checked against PyTorch (onnxruntime, when installed, or the
reloaded .pt2): every output within 1e-4 (relative to its magnitude for values above 1).
ONNX needs ``pip install -e '.[export]'`` (onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from experiments.errors import check_img_size
from rtmdet import SIZES, CheckpointError, RTMDetIns
from rtmdet.checkpoint import load_checkpoint
from rtmdet.priors import flatten_levels

from experiments import export_e2e

OUTPUT_NAMES = ("cls_logits", "box_dists", "kernels", "mask_protos")
TOLERANCE = 1e-4


class ExportWrapper(nn.Module):
    """``RTMDetIns.forward`` with the per-level outputs flattened: a plain tuple of four tensors."""

    def __init__(self, model: RTMDetIns):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cls_logits, box_dists, kernels, mask_protos = self.model(images)
        # per level (B, K, H_l, W_l) -> (B, P, K), levels concatenated in prior order
        return flatten_levels(cls_logits), flatten_levels(box_dists), flatten_levels(kernels), mask_protos


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning .ckpt or official mmdetection .pth")
    p.add_argument("--output", required=True, help="model.onnx, or model.pt2 for --format torch_export")
    p.add_argument("--img-size", type=int, help="input size S (default: checkpoint's, or 640)")
    p.add_argument("--size", choices=list(SIZES), help="model size (default: read from the checkpoint)")
    p.add_argument("--format", choices=("onnx", "torch_export"),
                   help="default: torch_export for a .pt2 output, else onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the comparison with PyTorch")
    e2e = p.add_argument_group("end to end (--end-to-end; settings default to the checkpoint's test settings)")
    e2e.add_argument("--end-to-end", action="store_true",
                     help="uint8 images in, NMS and masks inside, padded instances out (rtmdet/export_e2e.py)")
    e2e.add_argument("--max-det", type=int, help="K: instances kept per image, the padded output size")
    e2e.add_argument("--score-thr", type=float, help="candidates must score above this")
    e2e.add_argument("--nms-pre", type=int, help="best candidates per level before NMS")
    e2e.add_argument("--iou-thr", type=float, help="NMS IoU threshold")
    e2e.add_argument("--masks", choices=("logits", "input"), default="logits",
                     help="stride-8 mask logits to paste (default, small and exact in original pixels) "
                          "or bool masks at input resolution")
    return p


def export_onnx(wrapper: ExportWrapper, example: torch.Tensor, path: Path, opset: int = 17) -> None:
    """TorchScript-based exporter (dynamo=False): no extra dependency beyond onnx, robust on CPU."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install -e '.[export]'") from None
    dynamic = {"images": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic, legacy-exporter notice
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
                          do_constant_folding=True)


def export_program(wrapper: ExportWrapper, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the exported file (onnxruntime on CPU, or the reloaded program)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in session.run(list(OUTPUT_NAMES), {"images": images.numpy()})]
    return list(torch.export.load(str(path)).module()(images))


def max_error(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> dict[str, float]:
    """Per output: max |a - e| / max(1, |e|) (absolute below 1, relative above)."""
    return {name: float(((a - e).abs() / e.abs().clamp(min=1)).max())
            for name, e, a in zip(OUTPUT_NAMES, expected, actual)}


def export(args: argparse.Namespace) -> dict:
    loaded = load_checkpoint(args.ckpt, args.size)
    img_size = args.img_size or loaded.img_size or 640
    output = Path(args.output)
    fmt = args.format or ("torch_export" if output.suffix == ".pt2" else "onnx")
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.end_to_end:
        return export_e2e.export(loaded, img_size, output, fmt, args)
    wrapper = ExportWrapper(loaded.model).eval()
    # Batch 2: torch.export specialises a size-1 dimension to a constant.
    example = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if fmt == "onnx":
            export_onnx(wrapper, example, output, args.opset)
        else:
            export_program(wrapper, example, output)
    info = {"output": str(output), "format": fmt, "img_size": img_size, "size": loaded.model.size,
            "num_classes": loaded.model.num_classes, "verified": None}
    if args.verify:
        if fmt == "onnx":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                print("onnxruntime not installed: not verified (pip install -e '.[export]')", file=sys.stderr)
                return info
        images = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))  # another batch
        with torch.no_grad():
            expected = list(wrapper(images))
            errors = max_error(expected, run_exported(output, fmt, images))
        info["max_error"] = errors
        info["verified"] = all(v <= TOLERANCE for v in errors.values())
        if not info["verified"]:
            raise RuntimeError(f"exported outputs differ from PyTorch by more than {TOLERANCE}: {errors}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_img_size(parser, args.img_size, "--img-size")
    if args.opset < 17:
        parser.error(f"--opset must be >= 17, got {args.opset}")
    export_e2e.check_args(parser, args)
    try:
        info = export(args)
    except (CheckpointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check = ("matches PyTorch (max error " + ", ".join(f"{k} {v:.1e}" for k, v in info["max_error"].items()) + ")"
             if info["verified"] else "not verified")
    what = (f"end to end, K={info['max_det']}; outputs {', '.join(info['outputs'])}" if args.end_to_end
            else f"no NMS; outputs {', '.join(OUTPUT_NAMES)}")
    print(f"exported RTMDet-Ins-{info['size']} ({info['num_classes']} classes) at {info['img_size']}px to "
          f"{info['output']} ({info['format']}, {what}): {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
