"""`python -m experiments.train` end to end on a tiny generated dataset (CPU, a few seconds)."""

import json

import pytest
import torch

from datamodules.sprites import generate_sprite_dataset
from experiments import evaluate
from experiments.train import main


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sprites")
    train = generate_sprite_dataset(root, num_images=6, image_size=64, seed=0, split_name="train")
    val = generate_sprite_dataset(root, num_images=3, image_size=64, seed=1, split_name="val")
    return [
        f"--data.train_ann_file={train}", f"--data.train_img_dir={root / 'train'}",
        f"--data.val_ann_file={val}", f"--data.val_img_dir={root / 'val'}",
        "--data.img_size=64", "--data.batch_size=2", "--data.val_batch_size=3", "--data.num_workers=0",
        "--trainer.logger=false", "--trainer.enable_model_summary=false",
    ]


def test_fast_dev_run(tiny_dataset, tmp_path):
    payload = main([*tiny_dataset, f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=true"])
    assert payload["global_step"] == 1
    assert (tmp_path / "results.json").exists()


def test_pixelart_recipe_builds_and_trains_a_step(tiny_dataset, tmp_path):
    from experiments.train import CONFIG_DIR

    payload = main(["--config", str(CONFIG_DIR / "pixelart_tiny.yaml"), *tiny_dataset,
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=true"])
    assert payload["global_step"] == 1  # the recipe as shipped builds and trains a step


def test_two_epochs_results_json_and_resume_from_last(tiny_dataset, tmp_path):
    args = [*tiny_dataset, f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_train_batches=2",
            "--trainer.check_val_every_n_epoch=1"]
    # A young model scores low: keep its detections, so that the metrics are not all 0. Contiguous
    # weights, as evaluate runs them: channels-last convolutions round differently, which reorders
    # near-tied scores.
    main([*args, "--trainer.max_epochs=2", "--model.score_thr=0.001", "--model.channels_last=false"])
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75",
                "segm_mAP_s", "segm_mAP_m", "segm_mAP_l", "best_checkpoint", "last_checkpoint", "wall_time_s"):
        assert key in results, key
    assert results["global_step"] == 4
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert results["last_checkpoint"] == str(last) and last.exists()
    # The reported metrics are those of the saved weights: evaluating last.ckpt gives them again.
    val = [a.split("=", 1)[1] for a in tiny_dataset if a.startswith(("--data.val_ann_file", "--data.val_img_dir"))]
    out = tmp_path / "eval.json"
    assert evaluate.main(["--ckpt", str(last), "--data.val_ann_file", val[0], "--data.val_img_dir", val[1],
                          "--data.num_workers", "0", "--output", str(out), "--device", "cpu"]) == 0
    evaluated = json.loads(out.read_text())
    assert results["bbox_mAP"] > 0
    for key in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"):
        assert 0.0 <= results[key] <= 1.0 and results[key] == evaluated[key], key
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert "current_model_state" in ckpt  # EMA weights in state_dict, raw weights kept for resuming
    # Resume: the schedule continues from step 4 to 6.
    payload = main([*args, "--trainer.max_epochs=3", "--ckpt_path=last"])
    assert payload["global_step"] == 6 and payload["epochs"] == 3


def test_bad_annotation_file_ends_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "train.json"
    bad.write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--data.train_ann_file={bad}", f"--data.train_img_dir={tmp_path}",
         "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"error: {bad}: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
