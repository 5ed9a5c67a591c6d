"""benchmarks/recipe_ab.py: the arms' configs are the shipped recipes plus exactly their overrides."""

import yaml

from benchmarks import recipe_ab


def test_arm_config_is_the_recipe_with_its_overrides_and_budget(tmp_path):
    data = {"train_ann_file": "a.json", "train_img_dir": "a", "val_ann_file": "b.json", "val_img_dir": "b"}
    official = recipe_ab.arm_config("official", data, epochs=10, val_every=2, img_size=320, out=tmp_path)
    lever = recipe_ab.arm_config("mask_stride_2", data, epochs=10, val_every=2, img_size=320, out=tmp_path)
    recipe = yaml.safe_load((recipe_ab.CONFIGS / "sprites_tiny.yaml").read_text())
    assert lever["model"] == dict(official["model"], mask_loss_stride=2) and official["model"] == recipe["model"]
    assert lever["data"] == official["data"] == dict(recipe["data"], **data, img_size=320)
    trainer = official["trainer"]
    assert (trainer["max_epochs"], trainer["check_val_every_n_epoch"]) == (10, 2)
    assert trainer["logger"]["class_path"].endswith("CSVLogger")
    names = [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]]
    assert names == ["ExpMomentumEMA", "PipelineSwitch", "ModelCheckpoint", "ModelCheckpoint"]
    switch = {c["class_path"]: c for c in recipe["trainer"]["callbacks"]}["datamodules.PipelineSwitch"]
    share = switch["init_args"]["num_last_epochs"] / recipe["trainer"]["max_epochs"]  # stage 2 keeps its share
    assert trainer["callbacks"][1]["init_args"]["num_last_epochs"] == max(1, round(share * 10))
    pixel = recipe_ab.arm_config("pixelart", data, epochs=10, val_every=2, img_size=None, out=tmp_path)
    assert pixel["model"]["mask_loss_stride"] == 2 and "pretrained" not in pixel["model"]
    first = recipe_ab.arm_config("all_three", data, epochs=10, val_every=2, img_size=None, out=tmp_path)
    assert first["model"] == pixel["model"] and first["data"] == dict(
        pixel["data"], random_resize_ratio=[1.0, 2.0], copy_paste_prob=0.5, copy_paste_max_instances=10)
    tuned = recipe_ab.arm_config("official", data, epochs=10, val_every=2, img_size=320, out=tmp_path,
                                 pretrained=tmp_path / "sprites.ckpt")
    assert tuned["model"] == dict(official["model"], pretrained=str(tmp_path / "sprites.ckpt"),
                                  allow_num_classes_mismatch=True)
    slow = recipe_ab.arm_config("pixelart_lr_half", data, epochs=10, val_every=2, img_size=None, out=tmp_path)
    assert slow["model"] == dict(pixel["model"], lr=pixel["model"]["lr"] / 2) and slow["data"] == pixel["data"]
    short = recipe_ab.arm_config("pixelart_stage2_tenth", data, epochs=30, val_every=2, img_size=None, out=tmp_path)
    assert short["trainer"]["callbacks"][1]["init_args"]["num_last_epochs"] == 3  # 0.1 x 30
    assert short["model"] == pixel["model"] and short["data"] == pixel["data"]
    assert official["seed_everything"] == official["data"]["seed"] == 0
    reseeded = recipe_ab.arm_config("official", data, epochs=10, val_every=2, img_size=320, out=tmp_path, seed=3)
    assert reseeded["seed_everything"] == reseeded["data"]["seed"] == 3
    assert reseeded["model"] == official["model"] and reseeded["trainer"] == official["trainer"]
    assert {k: v for k, v in reseeded["data"].items() if k != "seed"} == {
        k: v for k, v in official["data"].items() if k != "seed"}


def test_curve_reads_the_csv_log(tmp_path):
    log = tmp_path / "csv" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text(
        "epoch,step,train/loss,val/segm_mAP,val/bbox_mAP\n"
        "0,9,3.0,,\n0,19,2.0,,\n0,19,,0.1,0.2\n1,29,1.0,,\n1,39,,0.3,0.4\n")
    c = recipe_ab.curve(tmp_path)
    assert c["train_loss"] == {0: 2.5, 1: 1.0}
    assert c["val"] == {0: {"segm_mAP": 0.1, "bbox_mAP": 0.2}, 1: {"segm_mAP": 0.3, "bbox_mAP": 0.4}}
