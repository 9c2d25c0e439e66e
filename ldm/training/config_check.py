"""Checks ``main.py`` runs on a merged config before anything is built, and on a checkpoint before it resumes.

- :func:`check_overrides`: a trailing ``a.b.c=value`` must set a key that exists in the configs, or add one where
  new keys are expected (a target's ``params``, ``lightning.trainer``/``callbacks``, a new top-level section).
- :func:`check_config_tree`: every ``{target, params}`` node of ``model``, ``data``, ``lightning.callbacks``
  and ``lightning.logger`` imports and takes the parameters it is given (:func:`ldm.util.check_config`).
- :func:`check_resume_checkpoint`: the checkpoint ``-r``/``--resume_from_checkpoint`` resumes from is read with
  ``weights_only=True`` (``LDM_UNSAFE_LOAD=1`` opts out) and fits the model, before Lightning loads it.

Each raises ``ValueError`` subclasses with one line; ``ldm.training.cli`` turns them into ``UsageError``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.checkpoints import UNSAFE_LOAD_ENV, CheckpointMismatchError, check_fits, read_checkpoint
from ldm.util import ConfigError, check_config, closest

SECTIONS = ("model", "data", "lightning")
LIGHTNING_SECTIONS = ("trainer", "callbacks", "modelcheckpoint", "logger")
# Below these keys any new name is accepted here and checked where it is used: lightning.trainer against
# Lightning's Trainer signature, lightning.callbacks by check_config_tree.
OPEN_SECTIONS = (("lightning", "trainer"), ("lightning", "callbacks"))


def _new_key_allowed(path: list[str], node: Any, name: str) -> bool:
    """May ``name`` be added under ``path`` (whose value is ``node``)?"""
    if not path:
        return name in SECTIONS
    if path == ["lightning"]:
        return name in LIGHTNING_SECTIONS
    if any(tuple(path[:len(s)]) == s for s in OPEN_SECTIONS):
        return True
    if path[-1] == "params":  # a target's parameters: check_config_tree checks them against its signature
        return True
    return isinstance(node, dict) and name in ("target", "params") and (
        "target" in node or tuple(path) in (("lightning", "modelcheckpoint"), ("lightning", "logger")))


def check_overrides(base: DictConfig, items: Sequence[str]) -> None:
    """Refuse (``ConfigError``) an override of a key that exists in no config and is not a place for new keys,
    naming the closest existing key."""
    tree = OmegaConf.to_container(base, resolve=False)
    for item in items:
        key = item.split("=", 1)[0].strip()
        node: Any = tree
        path: list[str] = []
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node, path = node[part], path + [part]
                continue
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node, path = node[int(part)], path + [part]
                continue
            if not isinstance(node, (dict, list)) or _new_key_allowed(path, node, part):
                break
            where = ".".join(path) or "the top level"
            siblings = [str(k) for k in node] if isinstance(node, dict) else []
            found = closest(part, siblings)
            hint = f" (did you mean {'.'.join(path + [found])}?)" if found else ""
            raise ConfigError(f"override {item!r}: {key} exists in no config{hint}; {where} has "
                              f"{sorted(siblings) or 'no keys'}. Fix the name, or add the key to a config file")


def check_config_tree(config: DictConfig) -> None:
    """:func:`ldm.util.check_config` over ``model``, ``data`` and ``lightning.callbacks``/``lightning.logger``,
    all before anything is built."""
    for section in ("model", "data"):
        if section in config:
            check_config(config[section], section)
    lightning = config.get("lightning") or {}
    if lightning.get("callbacks") is not None:
        check_config(lightning["callbacks"], "lightning.callbacks")
    logger = lightning.get("logger")
    if logger is not None and "TestTube" not in str(logger.get("target", "")):  # main.py replaces PL 1.x's
        check_config(logger, "lightning.logger")


def unsafe_load() -> bool:
    return os.environ.get(UNSAFE_LOAD_ENV, "") not in ("", "0")


def check_resume_checkpoint(path: str, model: Any, training: bool) -> Optional[str]:
    """Read ``path`` as the project reads every checkpoint (``weights_only=True`` unless ``LDM_UNSAFE_LOAD=1``;
    a pickled object gives :class:`ldm.checkpoints.UnsafeCheckpointError`) and check that it is a Lightning
    checkpoint whose weights fit ``model`` (:class:`ldm.checkpoints.CheckpointMismatchError`), so that neither
    Lightning's unpickling nor its shape errors are reached. Returns the run id the checkpoint carries
    (:mod:`ldm.training.run_identity`), None when it has none."""
    from ldm.training.run_identity import checkpoint_run_id

    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint (no state_dict), so it cannot be resumed; "
                                      "to start from its weights set ckpt_path in the model's params")
    if training and "optimizer_states" not in ckpt:
        raise CheckpointMismatchError(f"{path} holds weights but no training state (optimizer_states), so training "
                                      "cannot resume from it; start a new run with the weights as ckpt_path")
    strict = bool(getattr(model, "strict_loading", True))
    check_fits(model, ckpt["state_dict"], source=path, allow_unexpected=not strict,
               required=(lambda key: True) if strict else None)
    return checkpoint_run_id(ckpt)


def load_kwargs(method: Callable[..., Any]) -> dict[str, Any]:
    """``weights_only`` for Lightning's ``Trainer.fit``/``test`` when this Lightning takes it: True unless
    ``LDM_UNSAFE_LOAD=1``."""
    try:
        takes = "weights_only" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        takes = False
    return {"weights_only": not unsafe_load()} if takes else {}

