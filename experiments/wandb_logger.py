"""W&B logger that works with no account: offline unless an API key is configured."""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger


def wandb_api_key_configured() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``wandb login`` stored a key in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` whose ``offline`` defaults to "no API key configured".

    ``WANDB_MODE=disabled`` (as in the tests) turns W&B off entirely; ``--trainer.logger false``
    runs without any logger. Offline runs are synced later with ``wandb sync runs/wandb/offline-run-*``.
    """

    def __init__(
        self,
        project: str = "rtmdet-ins",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        tags: list[str] | None = None,
    ):
        if offline is None:
            mode = os.environ.get("WANDB_MODE")  # an explicit mode (disabled, offline, online) wins
            offline = mode in ("offline", "dryrun") if mode else not wandb_api_key_configured()
        save_dir = save_dir or "runs"
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model, tags=tags)
