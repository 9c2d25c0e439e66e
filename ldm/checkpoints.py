"""The one checkpoint loader: reading a checkpoint file, loading it into a module, finding a run's checkpoint.

- :func:`read_checkpoint` / :func:`read_state_dict`: a Lightning ``.ckpt``, a bare ``torch.save`` state dict or a
  safetensors file, read with ``weights_only=True`` unless the caller (``--unsafe-load``) or ``LDM_UNSAFE_LOAD=1``
  opts out; a file that needs full unpickling raises :class:`UnsafeCheckpointError` (told apart by the exception type torch raises and
  the file being a ``torch.save`` archive, never by the message text).
- :func:`load_weights`: never a silent half-load: other shapes, unexpected keys (unless allowed) or missing
  required keys raise :class:`CheckpointMismatchError` naming the file, before anything is loaded; other missing
  or unexpected keys are logged; :func:`check_fits` is that check alone (``main.py`` runs it before resuming).
- :func:`locate_run`: a run directory (``logs/<run>/{checkpoints/last.ckpt, configs/}``) or a checkpoint file
  -> ``(checkpoint, run directory or None)``; ``scripts/sample.py`` and ``main.py -r`` both use it.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

UNSAFE_LOAD_ENV = "LDM_UNSAFE_LOAD"
CHECKPOINT_NAMES = ("last.ckpt", "last.safetensors", "model.ckpt", "model.safetensors")


class UnsafeCheckpointError(ValueError):
    """A ``torch.save`` archive that ``torch.load(weights_only=True)`` refuses: it holds pickled objects."""


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model (other shapes, unexpected or missing keys); nothing was loaded."""


def read_checkpoint(path: str, weights_only: bool = True) -> dict:
    """The whole object of a ``torch.save`` file (a Lightning ``.ckpt``: ``state_dict``, ``optimizer_states``, ...)
    or a safetensors file (its tensors), read with ``weights_only=True`` unless the caller or ``LDM_UNSAFE_LOAD=1``
    opts out.

    Raises ``FileNotFoundError`` for a missing file, :class:`UnsafeCheckpointError` for a file that needs full
    unpickling (only for files you trust: ``weights_only=False`` or ``LDM_UNSAFE_LOAD=1``) and ``ValueError``
    for a file that is not a checkpoint (damaged, truncated, foreign).
    """
    if os.environ.get(UNSAFE_LOAD_ENV, "") not in ("", "0"):
        weights_only = False
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"could not read checkpoint {path}: {type(err).__name__}: {str(err)[:300]}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:  # what torch raises when weights_only refuses a file
        if weights_only and zipfile.is_zipfile(path):  # a torch.save archive, so not a damaged file
            raise UnsafeCheckpointError(
                f"checkpoint {path} holds objects that need full unpickling, which can run arbitrary code, so it "
                f"was refused. Only for files you trust, set {UNSAFE_LOAD_ENV}=1 (or pass --unsafe-load to the "
                "scripts that have it).") from err
        raise ValueError(f"could not read checkpoint {path}: {type(err).__name__} (not a torch.save archive; "
                         f"a legacy pickle needs {UNSAFE_LOAD_ENV}=1 / --unsafe-load, for trusted files only)") from err
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"could not read checkpoint {path}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:300] if str(err) else ''}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds no state dict (got {type(obj).__name__})")
    return dict(obj)


def read_state_dict(path: str, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of a Lightning ``.ckpt``, a bare ``torch.save`` state dict or a safetensors file, read by
    :func:`read_checkpoint` (same errors)."""
    obj = read_checkpoint(path, weights_only)
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{path} holds no state dict (got {type(obj).__name__})")
    return dict(obj)


def check_fits(module: nn.Module, sd: Mapping[str, Any], source: str, allow_unexpected: bool = False,
               required: Optional[Callable[[str], bool]] = None) -> tuple[list[str], list[str]]:
    """Raise :class:`CheckpointMismatchError` when ``sd`` does not fit ``module``: tensors of other shapes, keys
    the module lacks (unless ``allow_unexpected``), missing keys for which ``required(key)`` is true. Returns
    ``(missing, unexpected)``."""
    own = module.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointMismatchError(f"checkpoint {source} does not fit this model: {len(bad)} tensors have other "
                                      f"shapes, e.g. {'; '.join(bad[:5])}. Is the config the one it was trained with?")
    unexpected = [k for k in sd if k not in own]
    if unexpected and not allow_unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {source} has {len(unexpected)} keys this model does not have (e.g. {unexpected[:5]}): "
            "it was trained with another config; fix the config or pass ignore_keys to skip them")
    missing = [k for k in own if k not in sd]
    lacking = [k for k in missing if required is not None and required(k)]
    if lacking:
        raise CheckpointMismatchError(f"checkpoint {source} lacks {len(lacking)} weights of this model (e.g. "
                                      f"{lacking[:5]}); is the config the one it was trained with?")
    return missing, unexpected


def load_weights(module: nn.Module, checkpoint: Union[str, Mapping[str, torch.Tensor]], *,
                 ignore_keys: Sequence[str] = (), only_model: bool = False, allow_unexpected: bool = False,
                 required: Optional[Callable[[str], bool]] = None, source: Optional[str] = None,
                 strict: bool = False) -> tuple[list[str], list[str]]:
    """Load ``checkpoint`` (a path for :func:`read_state_dict`, or a state dict) into ``module``.

    Keys starting with any of ``ignore_keys`` are dropped first; ``only_model`` loads into ``module.model``
    (accepting its own keys or the full model's ``model.*`` keys). Tensors of other shapes, keys the module lacks
    (unless ``allow_unexpected``) and missing keys for which ``required(key)`` is true raise
    :class:`CheckpointMismatchError` before anything is loaded; ``strict`` requires every key (as
    ``load_state_dict(strict=True)``). Returns ``(missing, unexpected)``, both logged.
    """
    if strict:
        allow_unexpected, required = False, (lambda key: True)
    source = source or (checkpoint if isinstance(checkpoint, str) else "state dict")
    sd = read_state_dict(checkpoint) if isinstance(checkpoint, str) else dict(checkpoint)
    prefixes = tuple(ignore_keys)
    dropped = [k for k in sd if prefixes and k.startswith(prefixes)]
    if dropped:
        logger.info("Ignoring %d keys of %s that start with %s", len(dropped), source, list(prefixes))
        sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    target = module.model if only_model else module
    if only_model and any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    missing, unexpected = check_fits(target, sd, source, allow_unexpected, required)
    if not sd:
        raise CheckpointMismatchError(f"checkpoint {source} holds no weights for this model (after ignore_keys)")
    target.load_state_dict(sd, strict=False)
    if missing:
        logger.warning("Loading %s: %d missing keys, e.g. %s", source, len(missing), missing[:8])
    if unexpected:
        logger.warning("Loading %s: %d unexpected keys, e.g. %s", source, len(unexpected), unexpected[:8])
    if not missing and not unexpected:
        logger.info("Loaded %s: all %d keys matched.", source, len(sd))
    return missing, unexpected


def locate_run(path: str, names: Sequence[str] = CHECKPOINT_NAMES) -> tuple[str, Optional[str]]:
    """``(checkpoint, run_dir)`` for a run directory (its ``checkpoints/<name>`` for the first of ``names`` that
    exists) or a checkpoint file (``run_dir``: the folder above a ``checkpoints/`` ancestor, or the file's folder
    when it has ``configs/``, else None)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"-r {path}: neither a run directory nor a checkpoint file")
    if os.path.isdir(path):
        run_dir = str(Path(path)).rstrip("/") or path
        for name in names:
            for candidate in (os.path.join(run_dir, "checkpoints", name), os.path.join(run_dir, name)):
                if os.path.isfile(candidate):
                    return candidate, run_dir
        found = sorted(str(p) for p in Path(run_dir, "checkpoints").rglob("*.ckpt"))
        raise FileNotFoundError(f"no checkpoint in run directory {run_dir}: checkpoints/{names[0]} does not exist"
                                + (f"; pass one of {found} instead" if found else ""))
    for parent in Path(path).parents:
        if parent.name == "checkpoints":
            return path, str(parent.parent)
    parent = os.path.dirname(os.path.abspath(path))
    return path, (parent if os.path.isdir(os.path.join(parent, "configs")) else None)
