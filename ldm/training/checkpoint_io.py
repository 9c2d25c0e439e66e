"""How ``main.py`` writes every checkpoint (``last.ckpt``, top-k, emergency saves): :class:`AtomicCheckpointIO`.

Lightning's ``TorchCheckpointIO`` stages a local checkpoint through fsspec in ``$TMPDIR`` and then moves it: when
``$TMPDIR`` is on another filesystem that move is a copy, so a full logs disk leaves a truncated checkpoint under its
final name (it fails to load and survives the resume), and a small ``$TMPDIR`` stops every save although the logs
disk has room. Here a checkpoint is written beside its target (same folder, so the rename is atomic), fsynced, its
zip directory read back, and only then renamed into place (:func:`ldm.atomic_io.save_torch`); a failure removes the
partial file, leaves the previous file under the name, and raises :class:`ldm.atomic_io.WriteError` naming the path
and the reason (``No space left on device``). Remote paths (``s3://...``) keep Lightning's own handling.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.atomic_io import save_torch


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are staged beside their target and renamed (see module docstring);
    loading and removing are Lightning's. ``main.py`` passes it as ``Trainer(plugins=[...])``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        text = os.fspath(path)
        if "://" in text and not text.startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r})")
        text = text[len("file://"):] if text.startswith("file://") else text
        folder = os.path.dirname(text)
        if folder:
            os.makedirs(folder, exist_ok=True)
        save_torch(checkpoint, text)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` (a Trainer setting: None, one plugin or a list) with :class:`AtomicCheckpointIO` added, unless it
    already names a ``CheckpointIO`` (a user's choice is kept)."""
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in items):
        return items
    return items + [AtomicCheckpointIO()]
