"""Every shipped recipe parses into the model, data and trainer it promises (nothing is built)."""

from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

import experiments.train as train

CONFIGS = sorted((Path(train.__file__).parent / "configs").glob("*.yaml"))
OFFICIAL = {"tiny": (0.004, 32, 0.5), "s": (0.004, 32, 1.0), "m": (0.004, 32, 1.0), "l": (0.004, 32, 1.0),
            "x": (0.002, 16, 1.0)}


def _load(path):
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_argument("--seed_everything", type=int)
    parser.add_argument("--model", type=dict)
    parser.add_argument("--data", type=dict)
    parser.add_argument("--trainer", type=dict)
    return parser.parse_args(["--config", str(path)])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_is_complete(path):
    cfg = _load(path)
    assert cfg.model["size"] in OFFICIAL
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in cfg.trainer["callbacks"]]
    assert {"ExpMomentumEMA", "PipelineSwitch", "ModelCheckpoint"} <= set(callbacks)


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_coco_recipes_follow_the_official_schedule(size):
    cfg = _load(Path(train.__file__).parent / "configs" / f"coco_{size}.yaml")
    lr, batch, mixup = OFFICIAL[size]
    assert cfg.model["lr"] == lr and cfg.data["batch_size"] == batch and cfg.data["mixup_prob"] == mixup
    assert cfg.trainer["devices"] * cfg.data["batch_size"] == cfg.model["base_batch_size"]
    assert cfg.trainer["max_epochs"] == 300
    switch = next(c for c in cfg.trainer["callbacks"] if c["class_path"].endswith("PipelineSwitch"))
    assert switch["init_args"]["switch_epoch"] == 280


def test_pixelart_recipe_differs_from_the_sprite_recipe_only_by_its_levers():
    pixel, sprite = (_load(Path(train.__file__).parent / "configs" / f"{n}_tiny.yaml") for n in ("pixelart", "sprites"))
    assert pixel.model["mask_loss_stride"] in (1, 2) and "mask_loss_stride" not in sprite.model
    assert pixel.data["copy_paste_prob"] > 0 and pixel.data["nearest_resize"] is True
    assert min(pixel.data["random_resize_ratio"]) * 8 >= 8  # an 8-px sprite stays at least one P3 cell wide
    levers = {"mask_loss_stride", "copy_paste_prob", "copy_paste_max_instances", "random_resize_ratio"}
    assert {k: v for k, v in pixel.model.items() if k not in levers} == sprite.model
    assert {k: v for k, v in pixel.data.items() if k not in levers} == {k: v for k, v in sprite.data.items()
                                                                         if k != "random_resize_ratio"}
