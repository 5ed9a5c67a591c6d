"""Reliability: bad data stops the tools before the first step with one message that lists every
problem; checkpoints are written atomically; a run killed with SIGKILL resumes from ``last``; an
out-of-memory error names its batch. The CLI runs in-process (``cli()``) or, where the real stderr
matters (no traceback) or a process must be killed, as ``python -m experiments.train``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image

from datamodules import COCODataModule, CocoAnnotations, DatasetError
from datamodules.coco import MAX_LISTED
from datamodules.sprites import generate_sprite_dataset
from experiments import evaluate, train
from rtmdet.checkpoint_io import AtomicCheckpointIO
from rtmdet.lightning_module import RTMDetInsModule
from tests._coco_factory import make_coco

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")]  # cli() reads sys.argv, as it should

REPO = Path(__file__).resolve().parents[1]


def train_args(root: Path, ann_file, img_dir, val: tuple | None = None) -> list[str]:
    """``experiments.train`` arguments for a tiny CPU run into ``root`` (no logger)."""
    args = [f"--data.train_ann_file={ann_file}", f"--data.train_img_dir={img_dir}", "--data.img_size=64",
            "--data.batch_size=2", "--data.num_workers=0", "--trainer.logger=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}"]
    if val is not None:
        args += [f"--data.val_ann_file={val[0]}", f"--data.val_img_dir={val[1]}", "--data.val_batch_size=2"]
    return args


def run_cli(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """``python -m experiments.train ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["experiments.train", *args])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    return exit_info.value.code, capsys.readouterr().err


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------ bad annotation files
# Each case breaks a 4-image file (image ids 10, 13, 16, 19) and returns the line that must name it.
def _missing_key(d):
    del d["images"][1]["file_name"]
    return "image 13 has no 'file_name'"


def _unknown_category(d):
    a = d["annotations"][0]
    a["category_id"] = 42
    return f"annotation {a['id']} (image {a['image_id']}) has unknown category_id 42"


def _duplicate_image_id(d):
    d["images"][2]["id"] = 10
    return "duplicate image id 10 (file_name '000010.png' and '000016.png')"


def _duplicate_annotation_id(d):
    first, last = d["annotations"][0], d["annotations"][-1]
    last["id"] = first["id"]
    return f"duplicate annotation id {first['id']} (images {first['image_id']} and {last['image_id']})"


def _annotation_without_bbox(d):
    a = d["annotations"][1]
    del a["bbox"]
    return f"annotation {a['id']} (image {a['image_id']}) has no 'bbox'"


ANNOTATION_CASES = [_missing_key, _unknown_category, _duplicate_image_id, _duplicate_annotation_id,
                    _annotation_without_bbox]


@pytest.fixture
def coco(tmp_path):
    return make_coco(tmp_path / "data", num_images=4, instances=2)


@pytest.mark.parametrize("case", ANNOTATION_CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_annotation_file_exits_naming_file_and_id(coco, tmp_path, monkeypatch, capsys, case):
    ann_file, img_dir = coco
    expected = []
    edit_json(ann_file, lambda d: expected.append(case(d)))
    code, err = run_cli(monkeypatch, capsys, [*train_args(tmp_path, ann_file, img_dir), "--trainer.fast_dev_run=true"])
    assert code == 2
    assert err.startswith("error: ") and f"{ann_file}: {expected[0]}" in err, err
    assert not (tmp_path / "results.json").exists()  # stopped before training


def test_annotation_file_not_json(coco, tmp_path, monkeypatch, capsys):
    ann_file, img_dir = coco
    ann_file.write_text('{"images": [')
    code, err = run_cli(monkeypatch, capsys, train_args(tmp_path, ann_file, img_dir))
    assert code == 2 and f"error: {ann_file}: not valid JSON" in err


def test_all_annotation_problems_in_one_message(coco, tmp_path, monkeypatch, capsys):
    ann_file, img_dir = coco
    expected = []
    edit_json(ann_file, lambda d: expected.extend(case(d) for case in ANNOTATION_CASES))
    code, err = run_cli(monkeypatch, capsys, [*train_args(tmp_path, ann_file, img_dir), "--trainer.fast_dev_run=true"])
    assert code == 2
    lines = err.strip().splitlines()
    # The header counts them; image 16's annotations now refer to an unknown image: more than 5 problems.
    assert lines[0].startswith(f"error: {ann_file}: ") and lines[0].endswith(" problems:")
    assert int(lines[0].split()[-2]) == len(lines) - 1 > len(expected)
    for line in expected:
        assert any(x.startswith(f"  {ann_file}: {line}") for x in lines), line



def test_train_and_val_file_problems_in_one_run(coco, tmp_path, monkeypatch, capsys):
    ann_file, img_dir = coco
    val_file = ann_file.with_name("val.json")
    val_file.write_text(ann_file.read_text())
    train_expected, val_expected = [], []
    edit_json(ann_file, lambda d: train_expected.append(_missing_key(d)))
    edit_json(val_file, lambda d: val_expected.append(_unknown_category(d)))
    code, err = run_cli(monkeypatch, capsys, [*train_args(tmp_path, ann_file, img_dir, val=(val_file, img_dir)),
                                              "--trainer.fast_dev_run=true"])
    assert code == 2
    assert f"{ann_file}: {train_expected[0]}" in err and f"{val_file}: {val_expected[0]}" in err, err

def test_malformed_geometry_is_reported_and_long_lists_are_capped(tmp_path):
    ann_file, img_dir = make_coco(tmp_path, num_images=1, instances=0)
    original = ann_file.read_text()

    def add_annotations(anns: list[dict]) -> list[str]:
        ann_file.write_text(original)
        edit_json(ann_file, lambda d: d["annotations"].extend({"image_id": 10, "category_id": 3, **a} for a in anns))
        with pytest.raises(DatasetError) as info:
            CocoAnnotations(ann_file, img_dir)
        return str(info.value).splitlines()

    lines = add_annotations([  # image 10 is 48 x 64
        {"id": 1, "bbox": [0, 0, "w", 5], "segmentation": [[0, 0, 5, 0, 5, 5]]},
        {"id": 2, "bbox": [0, 0, 5, 5], "segmentation": [["a", "b", "c", "d", "e", "f"]]},
        {"id": 3, "bbox": [0, 0, 5, 5], "segmentation": {"size": [48, 64], "counts": [5, 5]}},
        {"id": 4, "bbox": [0, 0, 5, 5], "segmentation": {"size": [10, 10], "counts": [100]}},
        {"id": "5", "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]}])
    assert lines[0] == f"{ann_file}: 5 problems:"
    assert [line.removeprefix(f"  {ann_file}: ") for line in lines[1:]] == [
        "annotation 1 (image 10) has a malformed bbox [0, 0, 'w', 5]",
        "annotation id '5' (image 10) is not an integer",
        "annotation 2 (image 10) has a malformed polygon (each part must be a list of numbers)",
        "annotation 3 (image 10) has malformed RLE counts (sum 10, the image has 3072 pixels)",
        "annotation 4 (image 10) has an RLE of size [10, 10], image is [48, 64]"]

    n = MAX_LISTED + 5
    lines = add_annotations([{"id": 100 + i, "category_id": 9999, "bbox": [0, 0, 5, 5],
                              "segmentation": [[0, 0, 5, 0, 5, 5]]} for i in range(n)])
    assert lines[0] == f"{ann_file}: {n} problems:" and len(lines) == 1 + MAX_LISTED + 1
    assert lines[1].startswith(f"  {ann_file}: annotation 100 (image 10) has unknown category_id 9999")
    assert lines[-1] == "  ... and 5 more"

    ann_file.write_text(original)
    edit_json(ann_file, lambda d: d["categories"][0].pop("name"))  # category 3, used by every annotation
    original = ann_file.read_text()
    assert add_annotations([{"id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]}]) == [
        f"{ann_file}: category entry #0 has no 'name'"]  # and its annotation is not reported twice


# ----------------------------------------------------------------------------- bad image files
def break_images(img_dir: Path) -> dict[int, str]:
    """Break 4 of the 5 images of a make_coco folder (ids 10..22): {image id: what the line says}."""
    (img_dir / "000013.png").unlink()
    data = (img_dir / "000016.png").read_bytes()
    (img_dir / "000016.png").write_bytes(data[: len(data) // 2])  # truncated
    (img_dir / "000019.png").write_text("id,label\n1,cat\n")  # a text file renamed .png
    Image.new("RGB", (64, 40)).save(img_dir / "000022.png")  # the json says 64 x 48
    return {13: f"image 13: file not found: {img_dir / '000013.png'}",
            16: f"image 16: cannot read {img_dir / '000016.png'}",
            19: f"image 19: cannot read {img_dir / '000019.png'}: UnidentifiedImageError",
            22: f"image 22: {img_dir / '000022.png'} is 64x40, the annotation file says 64x48"}


def test_bad_image_files_are_all_reported_before_training(tmp_path):
    """Train and val images are checked together; the real stderr has the message and no traceback."""
    train_files = make_coco(tmp_path / "train", num_images=5, instances=2)
    val_ann, val_img = make_coco(tmp_path / "val", num_images=2, instances=1, seed=1)
    expected = list(break_images(train_files[1]).values())
    (val_img / "000010.png").unlink()
    expected.append(f"image 10: file not found: {val_img / '000010.png'}")
    proc = subprocess.run([sys.executable, "-m", "experiments.train",
                           *train_args(tmp_path / "run", *train_files, val=(val_ann, val_img))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: 5 image file problem(s); fix or remove these images:" in proc.stderr
    listed = [line.strip() for line in proc.stderr.splitlines() if line.startswith("  image ")]
    assert len(listed) == 5
    for line in expected:
        assert any(x.startswith(line) for x in listed), line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_jpeg_is_caught(tmp_path):
    """PIL's verify() does not read a JPEG's scan data: the check decodes it (at 1/8 scale)."""
    ann_file, img_dir = make_coco(tmp_path, num_images=2, ext="jpg")
    data = (img_dir / "000013.jpg").read_bytes()
    (img_dir / "000013.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert [p.split(": ")[:2] for p in CocoAnnotations(ann_file, img_dir).validate_images()] == [
        ["image 13", f"cannot read {img_dir / '000013.jpg'}"]]


def test_check_images_false_skips_the_check(tmp_path):
    ann_file, img_dir = make_coco(tmp_path, num_images=5, instances=2)
    break_images(img_dir)
    with pytest.raises(DatasetError, match=r"(?s)4 image file problem\(s\).*image 13: file not found"):
        COCODataModule(str(ann_file), str(img_dir), img_size=64, num_workers=0).setup("fit")
    dm = COCODataModule(str(ann_file), str(img_dir), img_size=64, num_workers=0, check_images=False)
    dm.setup("fit")  # huge, already checked datasets: no pass over the files
    assert len(dm.train_dataset) == 5


def test_evaluate_checks_its_images(tmp_path, capsys):
    ann_file, img_dir = make_coco(tmp_path, num_images=5, instances=2)
    expected = break_images(img_dir)
    module = RTMDetInsModule("tiny", num_classes=3)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    args = ["--ckpt", str(ckpt), "--data.val_ann_file", str(ann_file), "--data.val_img_dir", str(img_dir),
            "--data.img_size", "64", "--data.num_workers", "0", "--output", str(tmp_path / "r.json"), "--device", "cpu"]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 image file problem(s)") and all(line in err for line in expected.values())
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------ degenerate annotations
def test_degenerate_annotations_are_skipped_with_one_warning_and_training_runs(coco, tmp_path):
    ann_file, img_dir = coco
    degenerate = [{"bbox": [2, 2, 8, 8], "segmentation": [[2, 2, 10, 2]]},  # a 2-point polygon
                  {"bbox": [2, 2, 0, 8], "segmentation": [[2, 2, 10, 2, 10, 10]]},  # zero width
                  {"bbox": [200, 2, 5, 5], "segmentation": [[2, 2, 10, 2, 10, 10]]}]  # outside the image
    edit_json(ann_file, lambda d: d["annotations"].extend(
        {"id": 5000 + i, "image_id": 10, "category_id": 3, "iscrowd": 0, **a} for i, a in enumerate(degenerate)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        payload = train.main([*train_args(tmp_path, ann_file, img_dir), "--trainer.fast_dev_run=true"])
    messages = [str(w.message) for w in caught if "degenerate annotation" in str(w.message)]
    assert len(messages) == 1 and f"{ann_file}: skipped 3 degenerate annotation(s)" in messages[0], messages
    assert payload["global_step"] == 1


# ------------------------------------------------------------------------- atomic checkpoints
def test_cli_saves_checkpoints_atomically_by_default(coco, tmp_path, monkeypatch, capsys):
    ann_file, img_dir = coco
    args = train_args(tmp_path, ann_file, img_dir)
    monkeypatch.setattr(sys, "argv", ["experiments.train", *args, "--print_config"])
    with pytest.raises(SystemExit):
        train.main()
    assert "- class_path: rtmdet.checkpoint_io.AtomicCheckpointIO" in capsys.readouterr().out
    for extra in ([], ["--trainer.plugins=lightning.pytorch.plugins.environments.LightningEnvironment"]):
        cli = train.RTMDetCLI(RTMDetInsModule, COCODataModule, args=[*args, *extra], run=False,
                              parser_kwargs={"default_config_files": [str(train.DEFAULT_CONFIG)]})
        assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO), extra  # plugins of one's own too


def test_crash_during_save_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    def fit(max_epochs: int, ckpt_path=None) -> L.Trainer:
        trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=0, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)
        return trainer

    last = tmp_path / "ckpt" / "last.ckpt"
    fit(1)
    before = last.read_bytes()

    def torn_save(obj, f, *args, **kwargs):  # the disk fills up half-way through the file
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", torn_save)
        with pytest.raises(OSError, match="No space left"):
            fit(2, ckpt_path="last")
    assert last.read_bytes() == before  # untouched, and it still loads
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no temp file

    stale = last.parent / ".last.ckpt.0123456789ab.tmp"  # what kill -9 during a save leaves
    stale.write_bytes(before[:100])
    trainer = fit(2, ckpt_path="last")  # Lightning's "last" lookup ignores it; the next save removes it
    assert trainer.current_epoch == 2 and trainer.global_step == 4
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert not stale.exists()


# ------------------------------------------------------------------------------ kill -9, resume
class StepLog(L.Callback):
    """One JSON line per training step in ``<default_root_dir>/steps.jsonl``: epoch, step, stage, loss."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                "stage": trainer.datamodule.train_stage, "loss": float(outputs["loss"])}
        with open(Path(trainer.default_root_dir) / "steps.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


class Freeze(L.Callback):
    """Stand still one step into ``epoch`` after creating ``<default_root_dir>/frozen``: time for kill -9."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            (Path(trainer.default_root_dir) / "frozen").touch()
            time.sleep(600)


def steps(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "steps.jsonl").read_text().splitlines()]


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_kill_9_then_resume_from_last_matches_an_uninterrupted_run(tmp_path):
    """Killed one step into epoch 2 of 3, resumed with ``--ckpt_path last``: counters, EMA, data
    stage and schedule continue; losses and metrics equal those of a run never interrupted.

    Every training sample is a function of (seed, rank, epoch) and the data seed is in the
    checkpoint, so the resumed epoch draws the same augmentations: losses bit-identical, step for
    step (tests/test_resume.py checks this with dataloader workers too). About 20 s: the killed
    run and the reference run side by side.
    """
    epochs, kill_epoch = 3, 2  # the stage-2 pipeline starts at the killed epoch
    root = tmp_path / "data"
    train_ann = generate_sprite_dataset(root, num_images=6, image_size=64, seed=0, split_name="train")
    val_ann = generate_sprite_dataset(root, num_images=2, image_size=64, seed=1, split_name="val")
    callbacks = [{"class_path": "rtmdet.ema.ExpMomentumEMA"},
                 {"class_path": "datamodules.PipelineSwitch", "init_args": {"switch_epoch": kill_epoch}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "save_top_k": -1, "filename": "epoch{epoch}",
                                "auto_insert_metric_name": False}},
                 {"class_path": "tests.test_reliability.StepLog"}]
    config = tmp_path / "config.yaml"  # json is yaml; replaces the default recipe's callbacks
    config.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    frozen_config = tmp_path / "frozen.yaml"
    frozen_config.write_text(json.dumps({"trainer": {"callbacks": [
        *callbacks, {"class_path": "tests.test_reliability.Freeze", "init_args": {"epoch": kill_epoch}}]}}))

    def command(run: str, cfg: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "experiments.train", f"--config={cfg}",
                *train_args(tmp_path / run, train_ann, root / "train", val=(val_ann, root / "val")),
                f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                "--trainer.check_val_every_n_epoch=1", "--trainer.num_sanity_val_steps=0",
                "--trainer.enable_progress_bar=false", *extra]

    # The interrupted run starts first and is killed while the reference runs (2 cores).
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(command("b", frozen_config), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            reference = subprocess.run(command("a", config), cwd=REPO, capture_output=True, text=True, timeout=400)
            assert reference.returncode == 0, reference.stderr[-3000:]
            deadline = time.time() + 300
            while not (tmp_path / "b" / "frozen").exists():
                assert killed.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
                time.sleep(0.2)
            os.kill(killed.pid, signal.SIGKILL)
        finally:
            killed.kill()
            killed.wait()
    assert killed.returncode == -signal.SIGKILL
    a, b = tmp_path / "a", tmp_path / "b"
    left = ckpt(b / "checkpoints" / "last.ckpt")  # what the killed run left: the end of the previous epoch
    assert (left["epoch"], left["global_step"]) == (kill_epoch - 1, 3 * kill_epoch)
    before_kill = ckpt(a / "checkpoints" / f"epoch{kill_epoch - 1}.ckpt")
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights, bit for bit
        assert all(torch.equal(v, before_kill[key][k]) for k, v in left[key].items()), key
    assert not [p for p in (b / "checkpoints").iterdir() if p.suffix != ".ckpt"]  # no temporary file
    killed_steps = len(steps(b))
    assert steps(b)[: 3 * kill_epoch] == steps(a)[: 3 * kill_epoch] and killed_steps == 3 * kill_epoch + 1

    resumed = subprocess.run(command("b", config, "--ckpt_path=last"), cwd=REPO, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_results, results = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert (results["epochs"], results["global_step"]) == (ref_results["epochs"], ref_results["global_step"]) == \
        (epochs, 3 * epochs)
    for key in ("bbox_mAP", "segm_mAP", "segm_mAP_50"):
        assert results[key] == ref_results[key], key
    ref_final, final = ckpt(a / "checkpoints" / "last.ckpt"), ckpt(b / "checkpoints" / "last.ckpt")
    assert (final["epoch"], final["global_step"]) == (ref_final["epoch"], ref_final["global_step"])
    # EMA restored, not restarted: it has averaged every step of the run (not only those after the resume).
    assert int(final["averaging_state"]["n_averaged"]) == int(ref_final["averaging_state"]["n_averaged"]) > 3
    assert final["callbacks"]["ExpMomentumEMA"] == ref_final["callbacks"]["ExpMomentumEMA"]  # its last update step
    assert final["lr_schedulers"][0]["last_epoch"] == ref_final["lr_schedulers"][0]["last_epoch"] == 3 * epochs
    after = steps(b)[killed_steps:]  # the resumed run's steps: the last epoch, in the stage-2 pipeline
    ref_last = steps(a)[3 * kill_epoch:]
    assert after == ref_last  # epoch, step, stage and loss (bit for bit) of every step
    assert {s["stage"] for s in after} == {2} and {s["stage"] for s in steps(a)[: 3 * kill_epoch]} == {1}
    assert final["COCODataModule"] == ref_final["COCODataModule"] == {"seed": 0, "train_stage": 2}


# ------------------------------------------------------------------------------ out of memory
def oom_batch() -> tuple[torch.Tensor, list[dict]]:
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]] * n), "labels": torch.zeros(n, dtype=torch.int64),
                "masks": torch.ones(n, 64, 64, dtype=torch.bool), "image_id": image_id}
               for image_id, n in ((7, 3), (11, 0))]
    return torch.zeros(2, 3, 64, 64), targets


class _OomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def test_out_of_memory_names_the_batch(monkeypatch):
    module = RTMDetInsModule("tiny", num_classes=3)
    batch = oom_batch()

    def forward_oom(images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(module.model, "forward", forward_oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory at training step 0 on batch \(2, 3, 64, 64\), "
                                                     r"image ids \[7, 11\], instances \[3, 0\]") as info:
        module.training_step(batch, 0)
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in str(info.value)  # kept for Lightning's OOM checks
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)

    # In backward (CPU allocator message): the same, through the LightningModule.backward hook.
    monkeypatch.setattr(module.model, "forward", lambda images: None)
    monkeypatch.setattr(module.criterion, "forward", lambda out, targets: {
        "loss_cls": _OomInBackward.apply(torch.ones(2, requires_grad=True))})
    loss = module.training_step(batch, 0)
    with pytest.raises(RuntimeError, match=r"image ids \[7, 11\], instances \[3, 0\].*DefaultCPUAllocator"):
        module.backward(loss)

    def forward_bug(images):  # other errors pass through unchanged
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(module.model, "forward", forward_bug)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        module.training_step(batch, 0)
