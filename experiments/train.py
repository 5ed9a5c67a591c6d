"""Train RTMDet-Ins: ``python -m experiments.train [--config FILE] [--model.* ...] [--data.* ...] [--trainer.* ...]``.

With no arguments it trains RTMDet-Ins-tiny on the embedded pixel-sprite dataset
(``experiments/configs/sprites_tiny.yaml``). At the end of the fit it writes ``results.json`` (final
validation metrics, checkpoint paths, wall time) into the run folder and prints its path.

Before the first step the annotation files and every image file are checked (``--data.check_images``);
bad data ends the run with one ``error: ...`` listing every problem and exit code 2. Checkpoints are
written atomically (``rtmdet.checkpoint_io.AtomicCheckpointIO``), so ``--ckpt_path last`` resumes
even after ``kill -9`` or a full disk during a save.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules import COCODataModule, DatasetError
from experiments.errors import cli_error_message
from rtmdet.checkpoint import CheckpointError
from rtmdet.checkpoint_io import AtomicCheckpointIO
from rtmdet.lightning_module import RTMDetInsModule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "sprites_tiny.yaml"
METRIC_KEYS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


class RTMDetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from a checkpoint file, or 'last' for the run's last.ckpt")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # Atomic checkpoint saves by default, visible in --print_config (a config's own plugins replace it).
        parser.set_defaults({"trainer.plugins": [{"class_path": "rtmdet.checkpoint_io.AtomicCheckpointIO"}]})

    def before_instantiate_classes(self) -> None:
        # One run folder: checkpoints, W&B files and results.json under trainer.default_root_dir.
        trainer = self.config.trainer
        root = trainer.get("default_root_dir") or "runs/default"
        trainer["default_root_dir"] = root
        for cb in trainer.get("callbacks") or []:
            if str(cb.get("class_path", "")).endswith("ModelCheckpoint") and not cb.init_args.get("dirpath"):
                cb.init_args["dirpath"] = str(Path(root) / "checkpoints")
        logger = trainer.get("logger")
        if logger in (False, None, "false", "False"):  # --trainer.logger false: nothing to log the lr to
            trainer["callbacks"] = [cb for cb in trainer.get("callbacks") or []
                                    if not str(cb.get("class_path", "")).endswith("LearningRateMonitor")]
        if hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("AutoWandbLogger"):
            if not logger.init_args.get("save_dir"):
                logger.init_args["save_dir"] = root

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # plugins given without a CheckpointIO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def results_payload(module, trainer, wall_time: float) -> dict:
    metrics = getattr(module, "last_metrics", {}) or {}
    payload = {f"{t}_{k}": metrics.get(f"{t}_{k}") for t in ("bbox", "segm") for k in METRIC_KEYS}
    ckpt = trainer.checkpoint_callback
    payload.update(
        best_checkpoint=getattr(ckpt, "best_model_path", None) or None,
        last_checkpoint=last_checkpoint(trainer),
        best_segm_mAP=float(ckpt.best_model_score) if getattr(ckpt, "best_model_score", None) is not None else None,
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        wall_time_s=round(wall_time, 1),
    )
    return payload


def last_checkpoint(trainer) -> str | None:
    """The path of last.ckpt: a callback's ``save_last`` file, or the recipes' every-epoch callback
    (``filename: last``, top-1 without a monitor = the latest epoch)."""
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or (
            getattr(cb, "best_model_path", "") if cb.monitor is None and cb.filename == "last" else "")
        if path:
            return path
    return None


def run_dir(trainer) -> Path:
    return Path(trainer.default_root_dir)


def main(args: list[str] | None = None) -> dict:
    args = sys.argv[1:] if args is None else args
    start = time.time()
    cli = RTMDetCLI(
        RTMDetInsModule,
        COCODataModule,
        args=args,
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
    )
    ckpt_path = cli.config.get("ckpt_path")  # "last": Lightning finds last.ckpt in the checkpoint folder
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    payload = results_payload(cli.model, cli.trainer, time.time() - start)
    if cli.trainer.is_global_zero:
        out = run_dir(cli.trainer) / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
        print(f"results: {out}")
    return payload


def cli() -> None:
    """Entry point: bad data or checkpoints end with their message and exit code 2, no traceback."""
    try:
        main()
    except (DatasetError, CheckpointError) as e:
        print(f"error: {cli_error_message(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
