"""``python -m benchmarks --quick`` runs every part and prints one JSON object with the expected keys.

A smoke test of the benchmark code (tiny inputs, one or two iterations), not a measurement.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_benchmarks(*args: str, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # exactly one JSON object


def test_quick_run_all_parts():
    out = run_benchmarks()
    assert out["parts"] == ["latency", "train_step", "data_pipeline"]
    for part in out["parts"]:
        assert "error" not in json.dumps(out[part]), out[part]
    s = out["summary"]
    for variant in ("plain", "fuse"):
        lat = s[f"latency_{variant}"]
        assert lat["detections"] == 100 and lat["predict_ms"] > 0 and lat["forward_ms"] > 0
    assert all(v > 0 for v in s["train_step_s_eager"].values())
    mem = s["train_memory"]
    assert mem["max_instances"]["peak_rss_mb"] > 0 and mem["max_instances"]["instances_per_image"] > 4
    assert set(mem["per_100_instances_mb"]) == {"peak_rss_mb", "data_rss_mb", "step_peak_mb"}
    assert s["data_pipeline"]["images_per_s"] > 0
    case = next(iter(out["train_step"]["eager"]["cases"].values()))
    assert {"step_s", "first_step_s", "peak_rss_mb", "first_losses"} <= set(case)


def test_quick_tiling_part():
    out = run_benchmarks("--parts", "tiling")
    t = out["tiling"]
    assert "error" not in t, t
    assert t["sheet_size"] == [256, 256] and t["instances_per_sheet"] > 0
    for mode in ("untiled", "tiled"):
        assert t[mode]["seconds"] > 0 and t[mode]["detections"] > 0
    (mem,) = t["memory"]
    assert mem["instances"] == mem["rles"] == 20 < mem["found"] and mem["peak_rss_mb"] > 0
    assert set(out["summary"]["tiling"]) == {"untiled", "tiled", "memory_peak_rss_mb"}


def test_part_selection_and_missing_mmdet_python():
    out = run_benchmarks("--parts", "data_pipeline")
    assert out["parts"] == ["data_pipeline"] and "latency" not in out
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--mmdet-python", "/nonexistent/python"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "mmdet 3.3.0" in proc.stderr and "/nonexistent/python not found" in proc.stderr


@pytest.mark.parametrize("command", [["benchmarks", "--side-by-side"], ["benchmarks.side_by_side"]])
def test_side_by_side_without_an_mmdet_python_says_how_to_give_one(command):
    """No machine-specific default: without the flag or the variable the run stops before any work."""
    env = {k: v for k, v in os.environ.items() if k != "RTMDET_MMDET_PYTHON"}
    proc = subprocess.run([sys.executable, "-m", *command, "--quick"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--mmdet-python" in proc.stderr and "$RTMDET_MMDET_PYTHON" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime (the export extra)")
def test_quick_export_e2e():
    """The end-to-end ONNX benchmark part: both mask layouts exported, timed, and equal to predict."""
    out = run_benchmarks("--parts", "export_e2e")
    r = out["export_e2e"]
    assert "error" not in r, r
    assert r["torch_predict"]["detections"] == 100 and r["torch_predict"]["end_to_end_ms"] > 0
    for mode in ("onnx_logits", "onnx_input"):
        assert r[mode]["file_mb"] > 1 and r[mode]["graph_ms"] > 0 and r[mode]["end_to_end_ms"] > 0
        agreement = r[mode]["agreement_with_predict"]
        assert agreement["detections"] == [100, 100] and agreement["same_labels"], agreement
    assert r["onnx_logits"]["agreement_with_predict"]["min_mask_iou"] >= 0.999
    assert r["onnx_input"]["output_mb_per_image"] > 10 * r["onnx_logits"]["output_mb_per_image"]
    assert set(out["summary"]["export_e2e_end_to_end_ms"]) == {"torch_predict", "onnx_logits", "onnx_input"}


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="needs mmdet 3.3.0 (the parity venv)")
def test_quick_side_by_side_with_mmdet():
    out = run_benchmarks("--parts", "side_by_side", "--mmdet-python", sys.executable, timeout=600)
    sbs = out["side_by_side"]
    assert "error" not in sbs, sbs
    pred, train = sbs["predict"], sbs["train"]
    assert set(pred["contestants"]) == {"ours", "ours+fuse", "mmdet"}
    assert pred["contestants"]["mmdet"]["check"]["nms"].startswith("C port")
    for name, agreement in pred["agreement"].items():  # both sides paste 100 masks
        assert agreement["detections"] == [100, 100], name
    assert all(a["losses_agree_1e-3"] for a in train["agreement"].values())  # same first-step losses
    assert set(out["summary"]["side_by_side_train"]["ratios"]) == {"ours/mmdet", "ours+channels_last/mmdet"}
    assert all(r > 0 for r in pred["ratios"].values())


def test_gpu_benchmark_code_runs_on_cpu():
    """``benchmarks.gpu`` (the README's GPU figures) on a CPU: every part runs and reports; without
    CUDA the default device is refused with a clear message."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out["train"]) == {"bf16-mixed", "32-true"}
    for r in out["train"].values():
        assert r["images_per_s"] > 0 and math.isfinite(r["first_loss"]) and r["peak_memory_mb"] > 0
    # Same weights and batch: bf16 autocast changes the first loss by rounding only (and does change it).
    bf16, fp32 = out["train"]["bf16-mixed"]["first_loss"], out["train"]["32-true"]["first_loss"]
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.05 * fp32
    assert out["host_syncs"] is None  # set_sync_debug_mode is CUDA's
    for name in ("fp32", "fused", "fused+bf16"):
        assert out["predict"][name]["detections"] == 100, out["predict"][name]
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode != 0 and "no CUDA device" in proc.stderr
