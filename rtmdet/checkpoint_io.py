"""Atomic checkpoint files: a crash, a full disk or ``kill -9`` during a save never leaves a torn file.

Lightning's ``TorchCheckpointIO`` serialises the checkpoint in memory, writes it to the system
temp folder (fsspec) and moves it onto the target. When that folder is another file system (often
a tmpfs) the move is a copy onto the target, so a kill during it leaves a torn ``last.ckpt``, and
nothing is fsynced. :class:`AtomicCheckpointIO` streams ``torch.save`` into a hidden temporary file
in the target's folder, flushes and fsyncs it, then ``os.replace``-s it onto the target: readers
see the old file or the new one, never a part. The temporary file is removed when the save fails;
leftovers of a killed save (``.NAME.*.tmp``, never matched by ``*.ckpt``) go at the next save of
that name. ``python -m experiments.train`` uses it by default (``trainer.plugins``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import uuid
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves to local paths are atomic and durable (URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # URLs (s3://, file://): fsspec's way
            return super().save_checkpoint(checkpoint, path, storage_options)  # raises on storage_options
        path = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")  # same folder: rename is atomic
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except BaseException:  # KeyboardInterrupt too: never leave the partial file behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_folder(folder)  # make the rename itself survive a power cut
        for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
            with contextlib.suppress(OSError):  # a save of this name killed earlier
                os.remove(stale)


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not possible on Windows: the rename is still atomic
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
