"""Every shipped recipe goes through the training CLI's own parser (``experiments.train.RTMDetCLI``,
with the default config underneath, as ``python -m experiments.train --config F`` runs it) and is
instantiated: a misspelt key or class path fails here, not at the start of a GPU job."""

from pathlib import Path

import pytest
import torch

import experiments.train as train
from datamodules import COCODataModule
from datamodules.sprites import generate_sprite_dataset
from rtmdet import to_mmdet_state_dict
from rtmdet.checkpoint import CheckpointError
from rtmdet.lightning_module import RTMDetInsModule

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # it reads sys.argv, as it should

CONFIGS = sorted((Path(train.__file__).parent / "configs").glob("*.yaml"))
OFFICIAL = {"tiny": (0.004, 32, 0.5), "s": (0.004, 32, 1.0), "m": (0.004, 32, 1.0), "l": (0.004, 32, 1.0),
            "x": (0.002, 16, 1.0)}
REQUIRED_CALLBACKS = {"ExpMomentumEMA", "PipelineSwitch", "ModelCheckpoint"}


class ParsedOnly(train.RTMDetCLI):
    """The CLI up to its checked config: keys are matched against the constructors' signatures and
    class paths imported, nothing is built."""

    def instantiate_classes(self) -> None:
        pass


def cli_args(path: Path, *extra: str) -> dict:
    return dict(args=["--config", str(path), *extra], run=False,
                parser_kwargs={"default_config_files": [str(train.DEFAULT_CONFIG)]})


def parse(path: Path, *extra: str):
    return ParsedOnly(RTMDetInsModule, COCODataModule, **cli_args(path, *extra)).config


def callback_names(cfg) -> list[str]:
    return [c["class_path"].rsplit(".", 1)[-1] for c in cfg.trainer.callbacks]


@pytest.fixture(scope="module")
def sprites(tmp_path_factory):
    """A 2-image sprite dataset standing in for the recipes' data paths."""
    root = tmp_path_factory.mktemp("recipe_data")
    train_file = generate_sprite_dataset(root, num_images=2, image_size=64, split_name="train")
    val_file = generate_sprite_dataset(root, num_images=2, image_size=64, seed=1, split_name="val")
    return [f"--data.train_ann_file={train_file}", f"--data.train_img_dir={root / 'train'}",
            f"--data.val_ann_file={val_file}", f"--data.val_img_dir={root / 'val'}"]


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory) -> Path:
    """An mmdetection-format RTMDet-Ins-tiny checkpoint with 80 classes and random weights."""
    torch.manual_seed(0)
    module = RTMDetInsModule("tiny", num_classes=80)
    with torch.no_grad():
        for t in module.model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    path = tmp_path_factory.mktemp("official") / "rtmdet-ins_tiny.pth"
    torch.save({"meta": {}, "state_dict": to_mmdet_state_dict(module.model)}, path)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_is_complete(path):
    cfg = parse(path)
    assert cfg.model.size in OFFICIAL
    assert REQUIRED_CALLBACKS <= set(callback_names(cfg))


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_coco_recipes_follow_the_official_schedule(size):
    cfg = parse(Path(train.__file__).parent / "configs" / f"coco_{size}.yaml")
    lr, batch, mixup = OFFICIAL[size]
    assert cfg.model.lr == lr and cfg.data.batch_size == batch and cfg.data.mixup_prob == mixup
    assert cfg.trainer.devices * cfg.data.batch_size == cfg.model.base_batch_size
    assert cfg.trainer.max_epochs == 300
    switch = next(c for c in cfg.trainer.callbacks if c["class_path"].endswith("PipelineSwitch"))
    assert switch["init_args"]["switch_epoch"] == 280


@pytest.mark.parametrize("edit, wrong", [
    ("  lr: ", "  lrr: "),  # a misspelt model key
    ("  batch_size: ", "  batchsize: "),  # a misspelt data key
    ("rtmdet.ema.ExpMomentumEMA", "rtmdet.ema.ExpMomentumEma"),  # a misspelt class path
    ("        num_last_epochs: 10", "        num_last_epoch: 10"),  # a misspelt callback argument
])
def test_a_misspelt_key_or_class_path_fails(tmp_path, edit, wrong):
    text = (Path(train.__file__).parent / "configs" / "finetune_tiny_custom.yaml").read_text()
    assert edit in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit, wrong, 1))
    with pytest.raises(SystemExit) as exit_info:  # jsonargparse's usage error, naming the key
        parse(bad)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_instantiates(path, sprites, official_tiny, tmp_path):
    """Model, data, callbacks and logger as the recipe has them; only the data paths are a small
    stand-in, the trainer runs on one CPU and the fine-tune recipe's official file is a local one."""
    extra = [*sprites, f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.devices=1",
             "--trainer.strategy=auto", "--trainer.sync_batchnorm=false", "--trainer.precision=32-true",
             "--data.pin_memory=false"]
    if "finetune" in path.stem:
        extra.append(f"--model.pretrained={official_tiny}")
    cli = train.RTMDetCLI(RTMDetInsModule, COCODataModule, **cli_args(path, *extra))
    cfg = cli.config
    assert isinstance(cli.model, RTMDetInsModule) and cli.model.model.size == cfg.model.size
    assert cli.model.model.num_classes == cli.datamodule.num_classes == 8  # linked from the data
    assert cli.datamodule.hparams.img_size == cfg.data.img_size
    built = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert set(callback_names(cfg)) - {"RichProgressBar", "LearningRateMonitor"} <= built, built


def test_finetune_recipe_loads_pretrained_through_the_module(sprites, official_tiny, tmp_path):
    """The fine-tune recipe's path: RTMDetInsModule(pretrained=..., allow_num_classes_mismatch=true)
    with an 80-class official checkpoint and an 8-class dataset: everything but the classifier loads."""
    path = Path(train.__file__).parent / "configs" / "finetune_tiny_custom.yaml"
    cli = train.RTMDetCLI(RTMDetInsModule, COCODataModule, **cli_args(
        path, *sprites, f"--model.pretrained={official_tiny}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false"))
    source = torch.load(official_tiny, weights_only=True)["state_dict"]
    mine = to_mmdet_state_dict(cli.model.model)
    classifier = [k for k in source if ".rtm_cls." in k]
    assert len(classifier) == 6 and all(mine[k].shape[0] == 8 != source[k].shape[0] for k in classifier)
    for k, v in source.items():
        if k not in classifier:
            assert torch.equal(mine[k], v), k
    with pytest.raises(CheckpointError, match="allow_num_classes_mismatch"):  # not without the flag
        RTMDetInsModule("tiny", num_classes=8, pretrained=str(official_tiny))
    with pytest.raises(CheckpointError, match="not found"):
        RTMDetInsModule("tiny", num_classes=8, pretrained=str(tmp_path / "missing.pth"))


def test_pixelart_recipe_differs_from_the_sprite_recipe_only_by_its_levers():
    pixel, sprite = (parse(Path(train.__file__).parent / "configs" / f"{n}_tiny.yaml") for n in ("pixelart", "sprites"))
    assert pixel.model.mask_loss_stride in (1, 2) and sprite.model.mask_loss_stride == 4  # 4: the reference's
    assert pixel.data.nearest_resize is True
    levers = {"mask_loss_stride"}  # the one lever kept by the A/B on the real-art set

    def without_levers(ns):
        return {k: v for k, v in ns.as_dict().items() if k not in levers}
    assert without_levers(pixel.model) == without_levers(sprite.model)
    assert without_levers(pixel.data) == without_levers(sprite.data)
    # The schedule: 30 epochs for 400 images, the stage-2 switch at the sprite recipe's share.
    switch = {name: next(c.init_args.num_last_epochs for c in r.trainer.callbacks
                         if c.class_path.endswith("PipelineSwitch")) for name, r in (("pixel", pixel), ("sprite", sprite))}
    assert pixel.trainer.max_epochs == 30
    assert switch["pixel"] / pixel.trainer.max_epochs == switch["sprite"] / sprite.trainer.max_epochs
    same = ("precision", "check_val_every_n_epoch", "accelerator", "devices", "log_every_n_steps")
    assert {k: pixel.trainer[k] for k in same} == {k: sprite.trainer[k] for k in same}


@pytest.mark.parametrize("name", ["coco_tiny", "coco_s", "coco_m", "coco_l", "coco_x", "finetune_tiny_custom"])
def test_official_recipes_inherit_nothing_from_the_default_recipe(name):
    """Every run starts from the default (sprite) recipe's file: an official recipe must state each
    model/data value the sprite recipe changes, or it silently trains with the sprite setting
    (e.g. nearest-neighbour resizing). Each parsed value is the recipe's own or the constructor's default."""
    import inspect

    import yaml

    path = Path(train.__file__).parent / "configs" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = parse(path)
    for section, cls in (("model", RTMDetInsModule), ("data", COCODataModule)):
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        parsed = cfg[section].as_dict()
        for key, value in parsed.items():
            if key in (raw.get(section) or {}) or key not in defaults:
                continue
            want = defaults[key]
            same = list(value) == list(want) if isinstance(want, (tuple, list)) else value == want
            assert same, f"{name}: {section}.{key} = {value!r} comes from the default recipe (official: {want!r})"
